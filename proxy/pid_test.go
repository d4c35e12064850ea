package proxy

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/rolegate/rolegate/auth"
)

// pidModes are the two ways rolegate logs a client in; the pid a client is
// given is the server's in both.
var pidModes = []struct {
	name  string
	start func(t *testing.T) *testProxy
}{
	{"passthrough", func(t *testing.T) *testProxy { return startProxy(t, proxyOpts{}) }},
	{"proxy auth", func(t *testing.T) *testProxy {
		return startProxy(t, proxyOpts{auth: proxyAuth(time.Minute, auth.SourceFunc(superControl(t, shared).Secret))})
	}},
}

// The pid in the BackendKeyData a client gets through rolegate is the
// server's: pg_backend_pid(), pgx's PgConn().PID(), libpq's PQbackendPID
// (psql's %p) and the session list agree. The secret is rolegate's own, not
// the server's.
func TestBackendPIDIsServers(t *testing.T) {
	t.Parallel()
	for _, mode := range pidModes {
		t.Run(mode.name, func(t *testing.T) {
			t.Parallel()
			p := mode.start(t)
			app := uniqueName("pid")
			c := connect(t, p.DSN("scram_user", scramPW, "app", "application_name="+app))
			pid := backendPIDOf(t, c)
			if got := c.PgConn().PID(); got != pid {
				t.Errorf("pgx PID() %d, pg_backend_pid() %d", got, pid)
			}
			s := liveSession(p, app)
			if s == nil || s.BackendPID != pid {
				t.Fatalf("session list: %+v, want backend pid %d", s, pid)
			}
			held := p.registry.byBackendPID(pid)
			if held == nil || len(held.backendKey) != 4 || bytes.Equal(held.backendKey, c.PgConn().SecretKey()) {
				t.Errorf("the client's secret %x is the server's (%v)", c.PgConn().SecretKey(), held)
			}

			// libpq: psql shows PQbackendPID in its prompt (%p), which it
			// prints only on a terminal.
			libpqPID, serverPID := psqlPIDs(t, p.DSN("scram_user", scramPW, "app"))
			if libpqPID != serverPID {
				t.Errorf("psql: PQbackendPID %d, pg_backend_pid() %d", libpqPID, serverPID)
			}
		})
	}
}

func backendPIDOf(t *testing.T, c *pgx.Conn) uint32 {
	t.Helper()
	var pid uint32
	if err := c.QueryRow(context.Background(), "select pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	return pid
}

// psqlPIDs runs psql on a pseudo-terminal (script(1)) with a prompt that shows
// libpq's PQbackendPID, and returns it with the server's pg_backend_pid().
func psqlPIDs(t *testing.T, dsn string) (libpq, server int) {
	t.Helper()
	if _, err := exec.LookPath("script"); err != nil {
		t.Fatalf("script(1), which runs psql on a terminal, is missing: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "script", "-qec", "psql -X -P pager=off -d "+shellQuote(dsn), "/dev/null")
	cmd.Env = append(os.Environ(), "PGCONNECT_TIMEOUT=10", "PGPASSWORD=", "PGSERVICEFILE=/nonexistent", "TERM=dumb", "PAGER=cat")
	cmd.Stdin = strings.NewReader("\\set PROMPT1 'LIBPQ_PID[%p]> '\nselect 'SERVER_PID[' || pg_backend_pid() || ']';\n\\q\n")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("psql on a terminal: %v\n%s", err, out)
	}
	find := func(re string) int {
		m := regexp.MustCompile(re).FindSubmatch(out)
		if m == nil {
			t.Fatalf("no %s in psql's output:\n%q", re, out)
		}
		n, _ := strconv.Atoi(string(m[1]))
		return n
	}
	return find(`LIBPQ_PID\[(\d+)\]> select`), find(` SERVER_PID\[(\d+)\]`)
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// pg_terminate_backend and pg_cancel_backend with the pid the driver reports
// reach that session, from another connection through rolegate.
func TestBackendPIDSignals(t *testing.T) {
	t.Parallel()
	for _, mode := range pidModes {
		t.Run(mode.name, func(t *testing.T) {
			t.Parallel()
			p := mode.start(t)
			ctx := context.Background()
			app := uniqueName("signal")
			victim := connect(t, p.DSN("scram_user", scramPW, "app", "application_name="+app))
			other := connect(t, p.DSN("scram_user", scramPW, "app"))

			// pg_cancel_backend: the victim's running query ends with 57014,
			// the session lives on.
			done := make(chan error, 1)
			go func() { _, err := victim.Exec(ctx, "select pg_sleep(30)"); done <- err }()
			direct := directApp(t)
			waitUntil(t, 10*time.Second, "the query to run", func() bool { return serverRunning(direct, app, "select pg_sleep(30)") })
			var ok bool
			if err := other.QueryRow(ctx, "select pg_cancel_backend($1)", int64(victim.PgConn().PID())).Scan(&ok); err != nil || !ok {
				t.Fatalf("pg_cancel_backend(driver pid): %v, %v", ok, err)
			}
			select {
			case err := <-done:
				if pgCode(err) != "57014" {
					t.Fatalf("the cancelled query: %v, want 57014", err)
				}
			case <-time.After(20 * time.Second):
				t.Fatal("the query was not cancelled within 20 s")
			}
			wantAlive(t, victim, "the session whose query was cancelled")

			// pg_terminate_backend: the session ends with the server's 57P01.
			if err := other.QueryRow(ctx, "select pg_terminate_backend($1)", int64(victim.PgConn().PID())).Scan(&ok); err != nil || !ok {
				t.Fatalf("pg_terminate_backend(driver pid): %v, %v", ok, err)
			}
			qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			_, err := victim.Exec(qctx, "select 1")
			cancel()
			wantPgError(t, err, "FATAL", "57P01", "terminating connection due to administrator command")
			waitUntil(t, 10*time.Second, "rolegate to forget the session", func() bool { return liveSession(p, app) == nil })
			wantAlive(t, other, "the connection that terminated it")
		})
	}
}

// pgxpool's liveness checks work through rolegate: a pooled connection whose
// backend was terminated by the pid the driver reports is found dead
// (CheckConn, the ping on acquire) and replaced, and the health check closes
// idle connections, whose backends then leave the server.
func TestBackendPIDPool(t *testing.T) {
	t.Parallel()
	for _, mode := range pidModes {
		t.Run(mode.name, func(t *testing.T) {
			t.Parallel()
			p := mode.start(t)
			ctx := context.Background()
			su := directApp(t)
			alive := func(pid uint32) bool {
				var n int
				if err := su.QueryRow(ctx, "select count(*) from pg_stat_activity where pid = $1", int64(pid)).Scan(&n); err != nil {
					t.Fatal(err)
				}
				return n == 1
			}

			cfg, err := pgxpool.ParseConfig(p.DSN("scram_user", scramPW, "app"))
			if err != nil {
				t.Fatal(err)
			}
			cfg.MaxConns = 2
			cfg.ShouldPing = func(context.Context, pgxpool.ShouldPingParams) bool { return true }
			pool, err := pgxpool.NewWithConfig(ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer pool.Close()

			conn, err := pool.Acquire(ctx)
			if err != nil {
				t.Fatal(err)
			}
			pid := conn.Conn().PgConn().PID()
			if !alive(pid) {
				t.Fatalf("no backend with the driver's pid %d", pid)
			}
			var ok bool
			if err := su.QueryRow(ctx, "select pg_terminate_backend($1)", int64(pid)).Scan(&ok); err != nil || !ok {
				t.Fatalf("pg_terminate_backend(%d): %v, %v", pid, ok, err)
			}
			waitUntil(t, 10*time.Second, "CheckConn to see the terminated connection", func() bool {
				return conn.Conn().PgConn().CheckConn() != nil
			})
			conn.Release()
			// The pool pings the connection it hands out: the dead one goes,
			// a live one comes.
			var got uint32
			if err := pool.QueryRow(ctx, "select pg_backend_pid()").Scan(&got); err != nil {
				t.Fatalf("a query on the pool after its connection was terminated: %v", err)
			}
			if got == pid {
				t.Fatalf("the pool kept the terminated connection %d", pid)
			}

			// An idle pool connection is closed by the health check; its
			// backend leaves the server.
			idleCfg := cfg.Copy()
			idleCfg.MaxConnIdleTime = 50 * time.Millisecond
			idleCfg.HealthCheckPeriod = 50 * time.Millisecond
			idlePool, err := pgxpool.NewWithConfig(ctx, idleCfg)
			if err != nil {
				t.Fatal(err)
			}
			defer idlePool.Close()
			var idlePID uint32
			if err := idlePool.AcquireFunc(ctx, func(c *pgxpool.Conn) error {
				idlePID = c.Conn().PgConn().PID()
				return c.Ping(ctx)
			}); err != nil {
				t.Fatal(err)
			}
			waitUntil(t, 20*time.Second, "the idle connection's backend to leave", func() bool { return !alive(idlePID) })
			if idlePool.Stat().MaxIdleDestroyCount() == 0 {
				t.Error("the health check closed no idle connection")
			}
		})
	}
}
