package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/config"
	"github.com/rolegate/rolegate/internal/pgtest"
	"github.com/rolegate/rolegate/upstream"
)

// A password lookup that never ends is bounded by LookupTimeout ([server]
// connect_timeout) and ends in FATAL 08006 naming the step, long before the
// startup timeout, which is set so large here that only the lookup's bound
// can fire. The client never sees the driver's text.
func TestPasswordLookupTimeout(t *testing.T) {
	t.Parallel()
	const want = "rolegate could not look up the role's password: timeout after 1s"
	// A control connection to a server that accepts and never answers.
	silent := fakeServer(t, func(c net.Conn) {
		_, _ = c.Read(make([]byte, 1<<16))
		_, _ = c.Read(make([]byte, 1)) // until pgx or the cleanup closes it
	})
	ctl, err := upstream.NewControl(t.Context(), config.Control{DSN: "postgres://rolegate@" + silent + "/postgres?sslmode=disable", MaxConns: 2},
		config.DefaultAuthQuery)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ctl.Close)
	// And a source that blocks until its context ends.
	blocking := auth.SourceFunc(func(ctx context.Context, _ string) (auth.Secret, bool, error) {
		<-ctx.Done()
		return auth.Secret{}, false, ctx.Err()
	})
	for _, tt := range []struct {
		name string
		src  auth.Source
	}{{"silent control server", auth.SourceFunc(ctl.Secret)}, {"blocking source", blocking}} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			a := proxyAuth(time.Hour, tt.src)
			a.LookupTimeout = time.Second
			p := startProxy(t, proxyOpts{auth: a, startupTimeout: time.Hour})
			ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
			defer cancel()
			_, err := pgx.Connect(ctx, p.DSN("scram_user", scramPW, "postgres"))
			if pgErr := wantPgError(t, err, "FATAL", "08006", want); pgErr != nil && pgErr.Message != want {
				t.Errorf("message %q, want exactly %q", pgErr.Message, want)
			}
			_, errOut, err := psql(t, p.DSN("md5_user", md5PW, "postgres"), "", "-c", "select 1")
			if err == nil || !strings.Contains(errOut, "FATAL:  "+want+"\n") {
				t.Errorf("psql: %v, stderr %q", err, errOut)
			}
			wantFailureLines(t, p, 2, map[string]int{"lookup failed": 2})
		})
	}
}

// A lookup that outlasts the startup timeout (no LookupTimeout) ends like
// any authentication timeout: closed without a word, as PostgreSQL does at
// authentication_timeout. A lookup cut short by the proxy's Close ends the
// login as a shutdown.
func TestPasswordLookupOutlived(t *testing.T) {
	t.Parallel()
	blocking := func(entered chan struct{}) auth.Source {
		return auth.SourceFunc(func(ctx context.Context, _ string) (auth.Secret, bool, error) {
			entered <- struct{}{}
			<-ctx.Done()
			return auth.Secret{}, false, ctx.Err()
		})
	}
	t.Run("startup timeout", func(t *testing.T) {
		t.Parallel()
		// The timeout must run out during the lookup, not before rolegate
		// has read the startup packet, which a busy machine can take longer
		// than the timeout to do: then the login is tried again with twice
		// the timeout. Either way ends in a log line before the close.
		for timeout := 300 * time.Millisecond; ; timeout *= 2 {
			p := startProxy(t, proxyOpts{auth: proxyAuth(time.Hour, blocking(make(chan struct{}, 10))), startupTimeout: timeout})
			c, fe := rawLogin(t, p, "scram_user")
			if m, err := fe.Receive(); err == nil {
				t.Fatalf("got %T %+v, want the connection closed", m, m)
			}
			c.Close()
			if strings.Contains(p.logs.String(), "startup timed out") {
				if timeout > 30*time.Second {
					t.Fatalf("no login got to its lookup within the startup timeout, up to %v", timeout)
				}
				t.Logf("the startup timeout (%v) ran out before the lookup began; trying again with twice that", timeout)
				continue
			}
			wantFailureLines(t, p, 1, map[string]int{"authentication timeout": 1})
			return
		}
	})
	t.Run("proxy closed", func(t *testing.T) {
		t.Parallel()
		entered := make(chan struct{}, 10)
		p := startProxy(t, proxyOpts{auth: proxyAuth(time.Hour, blocking(entered)), startupTimeout: time.Hour})
		_, fe := rawLogin(t, p, "scram_user")
		<-entered
		p.Close()
		if m, err := fe.Receive(); err == nil {
			t.Fatalf("got %T %+v, want the connection closed", m, m)
		}
		waitUntil(t, 30*time.Second, "the login ended by the shutdown", func() bool {
			return strings.Contains(p.logs.String(), "login ended by shutdown")
		})
	})
}

// A lookup cut short by the session's end returns that end even when the
// login's own context does not show it yet: a cancel reaches a context's
// children one by one, so the lookup (one child) can end and wake the login
// before its context (another child) is cancelled. Here the login's context
// is one the cancel never reaches, which is that window held open. The
// client hears nothing: its socket is closing for the shutdown.
func TestPasswordLookupEndedBySession(t *testing.T) {
	t.Parallel()
	entered := make(chan struct{}, 1)
	src := auth.SourceFunc(func(ctx context.Context, _ string) (auth.Secret, bool, error) {
		entered <- struct{}{}
		<-ctx.Done()
		return auth.Secret{}, false, ctx.Err()
	})
	sessCtx, end := context.WithCancelCause(t.Context())
	lk := proxyAuth(time.Hour, src).startLookup(sessCtx, "scram_user", time.Now().Add(time.Hour))
	defer lk.stop()
	<-entered
	end(errShutdown)
	<-lk.done

	client, peer := net.Pipe()
	heard := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(peer)
		heard <- b
	}()
	var logs strings.Builder
	a := &clientAuth{cfg: proxyAuth(time.Hour), sess: &session{user: "scram_user"}, client: client, lk: lk,
		log: slog.New(slog.NewTextHandler(&logs, nil)), quiet: newLogThrottle(throttleOptions{now: time.Now})}
	err := a.resolve(context.Background())
	client.Close()
	if !errors.Is(err, errShutdown) {
		t.Errorf("resolve: %v, want the session's end (%v)", err, errShutdown)
	}
	if b := <-heard; len(b) > 0 {
		t.Errorf("the client was sent %q", b)
	}
	if logs.Len() > 0 {
		t.Errorf("logged:\n%s", logs.String())
	}
}

// lockedQuery is an auth query that waits for advisory lock key (shared) before
// it reads pg_authid, so a test can hold it up by taking the lock.
func lockedQuery(key int) string {
	return fmt.Sprintf("SELECT rolpassword FROM pg_catalog.pg_authid, (SELECT pg_catalog.pg_advisory_xact_lock_shared(%d)) l WHERE rolname = $1", key)
}

// TestPasswordLookup drives the lookup's failure paths against a real server
// that logs every statement.
func TestPasswordLookup(t *testing.T) {
	t.Parallel()
	c := pgtest.Start(t, pgtest.Options{Settings: map[string]string{"log_statement": "all"}})
	if err := c.Exec(t.Context(), "create role lk_user login password 'lk pw'"); err != nil {
		t.Fatal(err)
	}
	// control is a control pool as the superuser, with application_name app.
	control := func(t *testing.T, app, query string) *upstream.Control {
		t.Helper()
		ctl, err := upstream.NewControl(t.Context(), config.Control{DSN: c.SuperDSN() + "&application_name=" + app, MaxConns: 2}, query)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(ctl.Close)
		return ctl
	}
	// hold takes advisory lock key on a connection of its own and returns
	// the function that releases it.
	hold := func(t *testing.T, key int) (release func()) {
		t.Helper()
		conn := connect(t, c.SuperDSN())
		if _, err := conn.Exec(t.Context(), "select pg_advisory_lock($1)", key); err != nil {
			t.Fatal(err)
		}
		var once sync.Once
		return func() {
			once.Do(func() {
				if _, err := conn.Exec(context.Background(), "select pg_advisory_unlock($1)", key); err != nil {
					t.Error(err)
				}
			})
		}
	}
	// waiting is the pid of the backend of application app that waits for an advisory lock.
	waiting := func(t *testing.T, app string) int32 {
		t.Helper()
		conn := connect(t, c.SuperDSN())
		defer conn.Close(context.Background())
		var pid int32
		waitUntil(t, 30*time.Second, "the auth query waiting for its lock", func() bool {
			err := conn.QueryRow(t.Context(), `select pid from pg_stat_activity
				where application_name = $1 and wait_event_type = 'Lock' and wait_event = 'advisory'`, app).Scan(&pid)
			return err == nil
		})
		return pid
	}

	// A control connection that dies while the auth query runs: the query
	// runs again on a fresh connection and the login succeeds. Nothing can
	// stand in (cache_ttl 0, first login), so only the retry can let it in.
	t.Run("control connection killed mid-login", func(t *testing.T) {
		t.Parallel()
		const app = "rolegate_kill"
		a := proxyAuth(0, auth.SourceFunc(control(t, app, lockedQuery(1)).Secret))
		a.LookupTimeout = 30 * time.Second
		p := startProxy(t, proxyOpts{server: c, sslmode: config.SSLDisable, auth: a})
		release := hold(t, 1)
		defer release()
		login := make(chan error, 1)
		go func() {
			conn, err := pgx.Connect(t.Context(), p.DSN("lk_user", "lk pw", "postgres"))
			if err == nil {
				conn.Close(context.Background())
			}
			login <- err
		}()
		pid := waiting(t, app)
		var killed bool
		super := connect(t, c.SuperDSN())
		if err := super.QueryRow(t.Context(), "select pg_terminate_backend($1)", pid).Scan(&killed); err != nil || !killed {
			t.Fatalf("pg_terminate_backend(%d) = %v, %v", pid, killed, err)
		}
		release()
		if err := <-login; err != nil {
			t.Fatalf("login after the control connection died: %v", err)
		}
	})

	// A slow control connection: a role with a recent answer logs in with
	// it after the store's patience, and the log says so.
	t.Run("slow auth query, recent answer stands in", func(t *testing.T) {
		t.Parallel()
		const app = "rolegate_slow"
		a := proxyAuth(time.Hour, auth.SourceFunc(control(t, app, lockedQuery(2)).Secret))
		a.LookupTimeout = 30 * time.Second
		p := startProxy(t, proxyOpts{server: c, sslmode: config.SSLDisable, auth: a})
		connect(t, p.DSN("lk_user", "lk pw", "postgres")).Close(t.Context())
		release := hold(t, 2)
		defer release()
		connect(t, p.DSN("lk_user", "lk pw", "postgres")).Close(t.Context())
		if !strings.Contains(p.logs.String(), "password lookup failed; using the role's password as fetched earlier") {
			t.Error("the log does not say a stand-in was used")
		}
		release()
		wantNoSecrets(t, p, "lk pw")
	})

	// A role name that is not valid UTF-8 gets the server's own answer for
	// an unknown role, and is never sent on the control connection (which
	// speaks UTF8: the server would log an encoding ERROR instead).
	t.Run("role name not valid UTF-8", func(t *testing.T) {
		t.Parallel()
		const bad = "bad\xffname"
		// PostgreSQL quotes the name's bytes as they are.
		const failed = `password authentication failed for user "` + bad + `"`
		p := startProxy(t, proxyOpts{server: c, sslmode: config.SSLDisable,
			auth: proxyAuth(time.Hour, auth.SourceFunc(control(t, "rolegate_utf8", config.DefaultAuthQuery).Secret))})
		login := func(addr string) error {
			cfg, err := pgx.ParseConfig(fmt.Sprintf("postgres://%s/postgres?sslmode=disable", addr))
			if err != nil {
				t.Fatal(err)
			}
			cfg.User, cfg.Password = bad, "some pw"
			_, err = pgx.ConnectConfig(t.Context(), cfg)
			return err
		}
		direct := wantPgError(t, login(c.Addr()), "FATAL", "28P01", failed)
		via := wantPgError(t, login(p.Addr()), "FATAL", "28P01", failed)
		if direct != nil && via != nil && via.Message != direct.Message {
			t.Errorf("through rolegate %q, directly %q", via.Message, direct.Message)
		}
		_, errOut, err := psql(t, p.DSN(bad, "some pw", "postgres"), "", "-c", "select 1")
		if err == nil || !strings.Contains(errOut, "FATAL:  "+failed+"\n") {
			t.Errorf("psql: %v, stderr %q", err, errOut)
		}
		wantFailureLines(t, p, 2, map[string]int{"unknown role": 2})
		// Any auth query for it would have been logged before the client
		// heard the answer. A valid unknown name shows what one looks like.
		wantPgError(t, login2(t, p, "lk_ghost"), "FATAL", "28P01", passwordFailed("lk_ghost"))
		log := serverLog(t, c)
		if !strings.Contains(log, "$1 = 'lk_ghost'") {
			t.Fatalf("the server log lacks the auth query for lk_ghost; log_statement is not at work:\n%s", log)
		}
		if strings.Contains(log, "$1 = 'bad") || strings.Contains(log, "invalid byte sequence") {
			t.Errorf("the invalid name reached the server:\n%s", log)
		}
	})
}

// login2 logs in through p as user with a wrong password.
func login2(t *testing.T, p *testProxy, user string) error {
	t.Helper()
	_, err := pgx.Connect(t.Context(), p.DSN(user, "some pw", "postgres"))
	return err
}

func serverLog(t *testing.T, c *pgtest.Cluster) string {
	t.Helper()
	b, err := os.ReadFile(c.LogFile)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
