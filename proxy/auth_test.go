package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rolegate/rolegate/internal/testutil"
)

// authCases are the shared cluster's roles, one per authentication method.
var authCases = []struct {
	method, user, password string
}{
	{"trust", "trust_user", ""},
	{"password", "password_user", passwordPW},
	{"md5", "md5_user", md5PW},
	{"scram-sha-256", "scram_user", scramPW},
}

// wantPgError checks err is the server's error with code and message.
func wantPgError(t *testing.T, err error, severity, code, msg string) *pgconn.PgError {
	t.Helper()
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		t.Fatalf("error %v (%T), want a PgError %s", err, err, code)
	}
	if pgErr.Severity != severity || pgErr.Code != code || !strings.Contains(pgErr.Message, msg) {
		t.Errorf("got %s %s %q, want %s %s containing %q", pgErr.Severity, pgErr.Code, pgErr.Message, severity, code, msg)
	}
	return pgErr
}

func TestAuthMethods(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})
	for _, tc := range authCases {
		t.Run(tc.method+"/pgx", func(t *testing.T) {
			t.Parallel()
			c := connect(t, p.DSN(tc.user, tc.password, "app"))
			var user, db string
			if err := c.QueryRow(t.Context(), "select current_user, current_database()").Scan(&user, &db); err != nil {
				t.Fatal(err)
			}
			if user != tc.user || db != "app" {
				t.Errorf("current_user %q, database %q; want %q, app", user, db, tc.user)
			}
		})
		t.Run(tc.method+"/psql", func(t *testing.T) {
			t.Parallel()
			out, errOut, err := psql(t, p.DSN(tc.user, tc.password, "app"), "", "-At", "-c", "select current_user")
			if err != nil {
				t.Fatalf("psql: %v\n%s", err, errOut)
			}
			if got := strings.TrimSpace(out); got != tc.user {
				t.Errorf("current_user %q, want %q", got, tc.user)
			}
		})
		if tc.password == "" {
			continue
		}
		wantMsg := fmt.Sprintf("password authentication failed for user %q", tc.user)
		t.Run(tc.method+"/pgx wrong password", func(t *testing.T) {
			t.Parallel()
			_, err := pgx.Connect(t.Context(), p.DSN(tc.user, tc.password+"x", "app"))
			pgErr := wantPgError(t, err, "FATAL", "28P01", wantMsg)
			if pgErr != nil && pgErr.Message != wantMsg {
				t.Errorf("message %q, want exactly %q", pgErr.Message, wantMsg)
			}
		})
		t.Run(tc.method+"/psql wrong password", func(t *testing.T) {
			t.Parallel()
			_, errOut, err := psql(t, p.DSN(tc.user, "wrong", "app"), "", "-c", "select 1")
			if err == nil {
				t.Fatal("psql logged in with a wrong password")
			}
			if !strings.Contains(errOut, "FATAL:  "+wantMsg) {
				t.Errorf("psql stderr %q does not contain %q", errOut, wantMsg)
			}
		})
		// libpq hangs up when it has no password to give; the proxy lets go too.
		t.Run(tc.method+"/psql no password", func(t *testing.T) {
			t.Parallel()
			_, errOut, err := psql(t, p.DSN(tc.user, "", "app"), "", "-w", "-c", "select 1")
			if err == nil || !strings.Contains(errOut, "no password supplied") {
				t.Errorf("psql -w without a password: %v, stderr %q", err, errOut)
			}
		})
	}
	// A role that does not exist gets the same message, as from the server.
	t.Run("unknown role", func(t *testing.T) {
		t.Parallel()
		_, err := pgx.Connect(t.Context(), p.DSN("no_such_role", "pw", "app"))
		wantPgError(t, err, "FATAL", "28P01", `password authentication failed for user "no_such_role"`)
	})
	t.Run("unknown database", func(t *testing.T) {
		t.Parallel()
		_, err := pgx.Connect(t.Context(), p.DSN("trust_user", "", "no_such_db"))
		wantPgError(t, err, "FATAL", "3D000", `database "no_such_db" does not exist`)
	})

	// Every failed login is over and nothing is left registered.
	t.Cleanup(func() {
		waitUntil(t, 30*time.Second, "every session to be gone", func() bool { return len(p.Sessions()) == 0 })
	})
}

// Many logins at once, of every method, all pass through.
func TestAuthConcurrentLogins(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})
	var wg sync.WaitGroup
	errs := make(chan error, 40)
	for i := range 40 {
		tc := authCases[i%len(authCases)]
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			c, err := pgx.Connect(ctx, p.DSN(tc.user, tc.password, "app"))
			if err != nil {
				errs <- fmt.Errorf("%s: %w", tc.user, err)
				return
			}
			defer c.Close(ctx)
			var user string
			if err := c.QueryRow(ctx, "select current_user").Scan(&user); err != nil || user != tc.user {
				errs <- fmt.Errorf("%s: current_user %q, %v", tc.user, user, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestServerUnreachable(t *testing.T) {
	t.Parallel()
	addr := testutil.ClosedAddr(t)
	p := startProxy(t, proxyOpts{serverAddr: addr})
	wantMsg := "rolegate could not connect to server " + addr + ": connection refused while opening the TCP connection"
	for i := range 2 { // the proxy keeps serving after the first failure
		_, err := pgx.Connect(t.Context(), p.DSN("trust_user", "", "app"))
		pgErr := wantPgError(t, err, "FATAL", "08006", wantMsg)
		if pgErr != nil && !strings.Contains(pgErr.Message, "connection refused") {
			t.Errorf("attempt %d: message %q does not name the cause", i, pgErr.Message)
		}
	}
	_, errOut, err := psql(t, p.DSN("trust_user", "", "app"), "", "-c", "select 1")
	if err == nil || !strings.Contains(errOut, "FATAL:  "+wantMsg) || !strings.Contains(errOut, "connection refused") {
		t.Errorf("psql: %v, stderr %q", err, errOut)
	}
	wantNoInternals(t, errOut)
	// A login is listed from accept until its connection closes, which
	// follows the client's error.
	waitUntil(t, 30*time.Second, "the failed logins to leave the sessions", func() bool { return len(p.Sessions()) == 0 })
}

// fakeServer accepts TCP connections and hands each to serve; everything is
// closed at cleanup.
func fakeServer(t *testing.T, serve func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Go(func() { serve(c) })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

// A server that accepts and hangs up before answering: the client is told, with
// 08006, and the proxy goes on.
func TestServerHangsUpDuringLogin(t *testing.T) {
	t.Parallel()
	addr := fakeServer(t, func(c net.Conn) {
		_, _ = c.Read(make([]byte, 1024))
		c.Close()
	})
	p := startProxy(t, proxyOpts{serverAddr: addr, sslmode: "disable"})
	for range 2 {
		_, err := pgx.Connect(t.Context(), p.DSN("trust_user", "", "app"))
		wantPgError(t, err, "FATAL", "08006", "rolegate could not connect to server "+addr+
			": server closed the connection unexpectedly while waiting for the server's answer to the startup message")
	}
}

// A server that accepts and never answers holds the client no longer than the
// startup timeout.
func TestServerSilentDuringLogin(t *testing.T) {
	t.Parallel()
	addr := fakeServer(t, func(c net.Conn) {
		_, _ = c.Read(make([]byte, 1<<16))
		_, _ = c.Read(make([]byte, 1)) // until the proxy or the cleanup closes it
	})
	const timeout = 500 * time.Millisecond
	p := startProxy(t, proxyOpts{serverAddr: addr, sslmode: "disable", startupTimeout: timeout})
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	start := time.Now()
	_, err := pgx.Connect(ctx, p.DSN("trust_user", "", "app"))
	if err == nil {
		t.Fatal("login succeeded against a silent server")
	}
	if ctx.Err() != nil {
		t.Fatalf("the proxy held the client past its startup timeout: %v", err)
	}
	if elapsed := time.Since(start); elapsed < timeout-50*time.Millisecond {
		t.Errorf("gave up after %v, before the startup timeout", elapsed)
	}
}
