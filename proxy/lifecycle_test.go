package proxy

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"go.uber.org/goleak"

	"github.com/rolegate/rolegate/config"
	"github.com/rolegate/rolegate/upstream"
)

// noLeaks checks, after every other cleanup of the test, that the test left no
// goroutine behind. Only for tests that do not run in parallel.
func noLeaks(t *testing.T) {
	opt := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, opt) })
}

// serveResult returns what Serve returned, without taking it from the proxy's
// cleanup, which checks it too.
func serveResult(t *testing.T, p *testProxy) error {
	t.Helper()
	select {
	case err := <-p.done:
		p.done <- err
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return")
		return nil
	}
}

// refused reports whether the proxy refuses new TCP connections.
func refused(p *testProxy) bool {
	c, err := net.DialTimeout("tcp", p.Addr(), time.Second)
	if err != nil {
		return true
	}
	c.Close()
	return false
}

// shutdownAsync runs Shutdown in a goroutine; the channel yields its result.
func shutdownAsync(p *testProxy, ctx context.Context) <-chan error {
	ch := make(chan error, 1)
	go func() { ch <- p.Shutdown(ctx) }()
	return ch
}

func TestShutdownDrains(t *testing.T) {
	noLeaks(t)
	p := startProxy(t, proxyOpts{})
	c := connect(t, p.DSN("trust_user", "", "app"))

	done := shutdownAsync(p, context.Background())
	waitUntil(t, 30*time.Second, "new connections to be refused", func() bool { return refused(p) })
	if err := serveResult(t, p); !errors.Is(err, ErrServerClosed) {
		t.Errorf("Serve returned %v, want ErrServerClosed", err)
	}

	// The open session goes on, and Shutdown waits for it.
	var n int
	if err := c.QueryRow(t.Context(), "select 42").Scan(&n); err != nil || n != 42 {
		t.Fatalf("query during shutdown: %d, %v", n, err)
	}
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned %v with a session open", err)
	default:
	}
	// The probes of refused were listed while their connections lasted.
	waitUntil(t, 30*time.Second, "the open session alone to be listed during shutdown", func() bool { return len(p.Sessions()) == 1 })

	if err := c.Close(t.Context()); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Shutdown returned %v, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown did not return after the session closed")
	}
	if len(p.Sessions()) != 0 {
		t.Errorf("sessions after shutdown: %+v", p.Sessions())
	}
}

func TestShutdownDeadline(t *testing.T) {
	noLeaks(t)
	p := startProxy(t, proxyOpts{})
	c := connect(t, p.DSN("trust_user", "", "app"))
	// A second session, in the middle of a query.
	busy := connect(t, p.DSN("trust_user", "", "app", "application_name=busy"))
	queryDone := make(chan error, 1)
	go func() {
		_, err := busy.Exec(context.Background(), "select pg_sleep(30)")
		queryDone <- err
	}()
	waitUntil(t, 30*time.Second, "the query to be active", func() bool {
		s := sessionByApp(p, "busy")
		return s != nil && s.State == StateActive
	})

	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	err := p.Shutdown(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Shutdown returned %v, want context.DeadlineExceeded", err)
	}
	// Not a duration: whether the deadline had passed when Shutdown returned.
	if ctx.Err() == nil {
		t.Errorf("Shutdown returned before its deadline")
	}
	// Shutdown closed what was left before it returned.
	if s := p.Sessions(); len(s) != 0 {
		t.Errorf("sessions after Shutdown: %+v", s)
	}
	// Both were told why, as PostgreSQL's fast shutdown tells its clients:
	// each had been sent whole messages only.
	wantShutdownFatal := func(what string, err error) {
		t.Helper()
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || pe.Severity != "FATAL" || pe.Code != "57P01" ||
			pe.Message != "terminating connection because rolegate is shutting down" {
			t.Errorf("%s: %v, want FATAL 57P01 terminating connection because rolegate is shutting down", what, err)
		}
	}
	wantShutdownFatal("the idle session", c.Ping(t.Context()))
	select {
	case err := <-queryDone:
		wantShutdownFatal("the busy session's query", err)
	case <-time.After(10 * time.Second):
		t.Fatal("the busy session's query did not end")
	}
	if err := serveResult(t, p); !errors.Is(err, ErrServerClosed) {
		t.Errorf("Serve returned %v, want ErrServerClosed", err)
	}
}

// Shutdown with nothing open returns at once.
func TestShutdownIdle(t *testing.T) {
	noLeaks(t)
	p := startProxy(t, proxyOpts{})
	c := connect(t, p.DSN("trust_user", "", "app")) // one session that has come and gone
	if err := c.Close(t.Context()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := p.Shutdown(ctx); err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	if !refused(p) {
		t.Error("connections accepted after Shutdown")
	}
	if err := serveResult(t, p); !errors.Is(err, ErrServerClosed) {
		t.Errorf("Serve returned %v, want ErrServerClosed", err)
	}
	// And again: nothing left to do.
	if err := p.Shutdown(ctx); err != nil {
		t.Errorf("second Shutdown: %v", err)
	}
}

// Close ends sessions in every phase at once: logged in, waiting for a
// password, and still in startup.
func TestCloseEndsEverything(t *testing.T) {
	noLeaks(t)
	p := startProxy(t, proxyOpts{})
	c := connect(t, p.DSN("trust_user", "", "app"))

	inStartup := rawConn(t, p)
	if _, err := inStartup.Write(packet(version(3, 0))[:6]); err != nil {
		t.Fatal(err)
	}
	inAuth := rawConn(t, p)
	startupMessage(t, inAuth, 3, 0, "user", "password_user", "database", "app")
	if _, err := io.ReadFull(inAuth, make([]byte, 9)); err != nil { // AuthenticationCleartextPassword
		t.Fatal(err)
	}

	closeWithin(t, p, 10*time.Second, "")
	for name, conn := range map[string]net.Conn{"startup": inStartup, "auth": inAuth} {
		if _, err := io.ReadAll(conn); err != nil {
			t.Errorf("%s connection not closed by Close: %v", name, err)
		}
	}
	if err := c.Ping(t.Context()); err == nil {
		t.Error("session still works after Close")
	}
	if err := p.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if err := serveResult(t, p); !errors.Is(err, ErrServerClosed) {
		t.Errorf("Serve returned %v, want ErrServerClosed", err)
	}
	if !refused(p) {
		t.Error("connections accepted after Close")
	}
}

// Close during a draining Shutdown ends it: Shutdown returns once every
// session is gone.
func TestCloseDuringShutdown(t *testing.T) {
	noLeaks(t)
	p := startProxy(t, proxyOpts{})
	c := connect(t, p.DSN("trust_user", "", "app"))
	done := shutdownAsync(p, context.Background())
	waitUntil(t, 30*time.Second, "new connections to be refused", func() bool { return refused(p) })
	if err := p.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Shutdown returned %v after Close, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown did not return after Close")
	}
	if err := c.Ping(t.Context()); err == nil {
		t.Error("session still works after Close")
	}
}

func newBareServer(t *testing.T) *Server {
	t.Helper()
	d, err := upstream.NewDialer(config.Server{Address: shared.Addr(), SSLMode: config.SSLDisable, ConnectTimeout: "5s"})
	if err != nil {
		t.Fatal(err)
	}
	return New(Config{Upstream: d, StartupTimeout: 5 * time.Second, Logger: slog.New(slog.DiscardHandler)})
}

func TestServeAfterClose(t *testing.T) {
	noLeaks(t)
	for _, stop := range []struct {
		name string
		do   func(*Server) error
	}{
		{"Close", (*Server).Close},
		{"Shutdown", func(s *Server) error { return s.Shutdown(context.Background()) }},
	} {
		t.Run(stop.name, func(t *testing.T) {
			s := newBareServer(t)
			if err := stop.do(s); err != nil {
				t.Fatal(err)
			}
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			if err := s.Serve(ln); !errors.Is(err, ErrServerClosed) {
				t.Errorf("Serve after %s returned %v, want ErrServerClosed", stop.name, err)
			}
			// Serve closed the listener it was given.
			if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
				t.Errorf("listener after Serve: %v, want net.ErrClosed", err)
			}
			if err := s.Close(); err != nil {
				t.Errorf("Close after %s: %v", stop.name, err)
			}
		})
	}
}

// One server may serve several listeners; Close stops them all.
func TestServeSeveralListeners(t *testing.T) {
	noLeaks(t)
	s := newBareServer(t)
	var lns []net.Listener
	results := make(chan error, 2)
	for range 2 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lns = append(lns, ln)
		go func() { results <- s.Serve(ln) }()
	}
	for _, ln := range lns {
		p := &testProxy{Server: s, Host: "127.0.0.1", Port: ln.Addr().(*net.TCPAddr).Port}
		wantLogin(t, p)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	for range lns {
		select {
		case err := <-results:
			if !errors.Is(err, ErrServerClosed) {
				t.Errorf("Serve returned %v, want ErrServerClosed", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Serve did not return after Close")
		}
	}
}

// A client that stops reading in the middle of a large result cannot hold
// Close up: the relay's write to it is bounded, and the session ends.
func TestCloseWithAClientThatDoesNotRead(t *testing.T) {
	noLeaks(t)
	p := startProxy(t, proxyOpts{})
	c, fe := rawLogin(t, p, "trust_user")
	for {
		m, err := fe.Receive()
		if err != nil {
			t.Fatalf("login: %v", err)
		}
		if _, ok := m.(*pgproto3.ReadyForQuery); ok {
			break
		}
	}
	fe.Send(&pgproto3.Query{String: "select repeat('x', 100000) from generate_series(1, 1000)"})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 30*time.Second, "the relay to fill the client's buffers", func() bool {
		s := p.Sessions()
		return len(s) == 1 && s[0].BytesOut > 1<<20
	})
	time.Sleep(200 * time.Millisecond) // the relay is now blocked writing to c
	closeWithin(t, p, 10*time.Second, " while a client was not reading")
	c.Close()
}

// closeWithin calls p.Close and fails the test if it does not return within d.
func closeWithin(t *testing.T, p *testProxy, d time.Duration, while string) {
	t.Helper()
	closed := make(chan error, 1)
	go func() { closed <- p.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Errorf("Close: %v", err)
		}
	case <-time.After(d):
		t.Fatal("Close did not return" + while)
	}
}
