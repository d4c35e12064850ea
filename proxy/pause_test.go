package proxy

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/limiter"
)

// pausedLogins counts the logins of role waiting in state waiting for an
// operator's PAUSE.
func pausedLogins(p *testProxy, role string) int {
	n := 0
	for _, s := range p.Sessions() {
		if s.User == role && s.State == StateWaiting && strings.Contains(s.Wait, "paused by an operator") {
			n++
		}
	}
	return n
}

// loggedIn waits for an asynchronous login and checks that it works.
func loggedIn(t *testing.T, ch <-chan asyncLogin, what string) {
	t.Helper()
	select {
	case l := <-ch:
		if l.err != nil {
			t.Fatalf("%s: %v", what, l.err)
		}
		defer l.conn.Close(context.Background())
		alivePgx(t, l.conn, what)
	case <-time.After(2 * time.Minute):
		t.Fatalf("%s: still not logged in", what)
	}
}

func alivePgx(t *testing.T, c *pgx.Conn, what string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var n int
	if err := c.QueryRow(ctx, "select 7").Scan(&n); err != nil || n != 7 {
		t.Fatalf("%s: select 7 = %d, %v", what, n, err)
	}
}

// PAUSE of a role and of a database, in both authentication modes: new
// logins wait (shown as waiting), sessions already in go on, RESUME lets the
// waiting logins in, and a paused login whose client hangs up leaves.
func TestPauseResume(t *testing.T) {
	t.Parallel()
	const role = "pause_user"
	pw := newRole(t, role, -1)
	ctl := superControl(t, shared)
	for _, mode := range []struct {
		name string
		o    proxyOpts
	}{
		{"proxy", proxyOpts{auth: proxyAuth(time.Minute, auth.SourceFunc(ctl.Secret))}},
		{"passthrough", proxyOpts{}},
	} {
		t.Run(mode.name, func(t *testing.T) {
			p := startProxy(t, mode.o)
			dsn := p.DSN(role, pw, "app")
			held := connect(t, dsn)

			for _, g := range []struct {
				scope limiter.Scope
				name  string
			}{{limiter.ScopeRole, role}, {limiter.ScopeDatabase, "app"}} {
				if !p.Pause(g.scope, g.name, "test") || p.Pause(g.scope, g.name, "test") {
					t.Fatalf("Pause %v %s: want true, then false (already paused)", g.scope, g.name)
				}
				if gs := p.Gates(); len(gs) != 1 || !gs[0].Paused || gs[0].Name != g.name || gs[0].PausedBy != "test" {
					t.Fatalf("Gates: %+v", gs)
				}
				waiting := loginAsync(dsn)
				waitUntil(t, 60*time.Second, "the new login paused", func() bool { return pausedLogins(p, role) == 1 })
				alivePgx(t, held, "the session opened before the pause")
				// A database's pause holds no login into another database.
				if g.scope == limiter.ScopeDatabase {
					other := connect(t, p.DSN(role, pw, "postgres"))
					alivePgx(t, other, "a login into another database")
				}
				if !p.Resume(g.scope, g.name, "test") || p.Resume(g.scope, g.name, "test") {
					t.Fatalf("Resume %v %s: want true, then false (not paused)", g.scope, g.name)
				}
				loggedIn(t, waiting, "the paused login after RESUME")
			}

			// A paused login whose client hangs up leaves at once.
			p.Pause(limiter.ScopeRole, role, "test")
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() {
				c, err := pgx.Connect(ctx, dsn)
				if err == nil {
					c.Close(context.Background())
				}
				done <- err
			}()
			waitUntil(t, 60*time.Second, "the login paused", func() bool { return pausedLogins(p, role) == 1 })
			cancel()
			if err := <-done; err == nil {
				t.Fatal("a login cancelled while paused got in")
			}
			waitUntil(t, 60*time.Second, "the hung-up login gone", func() bool {
				for _, s := range p.Sessions() {
					if s.State.LoggingIn() {
						return false
					}
				}
				return true
			})
			p.Resume(limiter.ScopeRole, role, "test")
			if !strings.Contains(p.logs.String(), "login paused by an operator") {
				t.Errorf("no log line for the paused login:\n%s", p.logs.String())
			}
		})
	}
}

// DISABLE refuses new logins, after authentication, with FATAL 55000 and a
// HINT; a login paused at the time is refused too; sessions already in go
// on; ENABLE lets logins in again. The server's own refusal of a login it
// does not accept (datallowconn false) has the same shape: FATAL 55000
// once the client authenticated.
func TestDisableEnable(t *testing.T) {
	t.Parallel()
	const role = "disable_user"
	pw := newRole(t, role, -1)
	newDatabase(t, "disable_db", -1)
	ctl := superControl(t, shared)
	ctx := context.Background()

	if err := shared.Exec(ctx, "alter database disable_db allow_connections false"); err != nil {
		t.Fatal(err)
	}
	_, err := pgx.Connect(ctx, shared.DSN(role, pw, "disable_db"))
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "55000" || pe.Severity != "FATAL" {
		t.Fatalf("the server's own refusal: %v", err)
	}
	if err := shared.Exec(ctx, "alter database disable_db allow_connections true"); err != nil {
		t.Fatal(err)
	}

	for _, mode := range []struct {
		name string
		o    proxyOpts
	}{
		{"proxy", proxyOpts{auth: proxyAuth(time.Minute, auth.SourceFunc(ctl.Secret))}},
		{"passthrough", proxyOpts{}},
	} {
		t.Run(mode.name, func(t *testing.T) {
			p := startProxy(t, mode.o)
			dsn := p.DSN(role, pw, "disable_db")
			held := connect(t, dsn)

			for _, g := range []struct {
				scope      limiter.Scope
				name, msg  string
				hint       string
				otherLogin string // a login the hold does not concern
			}{
				{limiter.ScopeRole, role, `logins of role "disable_user" are disabled by an operator of rolegate`,
					"ENABLE ROLE disable_user", p.DSN("scram_user", scramPW, "disable_db")},
				{limiter.ScopeDatabase, "disable_db", `logins to database "disable_db" are disabled by an operator of rolegate`,
					"ENABLE DATABASE disable_db", p.DSN(role, pw, "app")},
			} {
				// A login paused before the DISABLE is refused by it.
				p.Pause(g.scope, g.name, "test")
				paused := loginAsync(dsn)
				waitUntil(t, 60*time.Second, "the login paused", func() bool { return pausedLogins(p, role) == 1 })
				if !p.Disable(g.scope, g.name, "test") || p.Disable(g.scope, g.name, "test") {
					t.Fatalf("Disable %s: want true, then false", g.name)
				}
				var l asyncLogin
				select {
				case l = <-paused:
				case <-time.After(2 * time.Minute):
					t.Fatal("the paused login was not refused by DISABLE")
				}
				for i, err := range []error{l.err, func() error {
					c, err := pgx.Connect(ctx, dsn)
					if err == nil {
						c.Close(ctx)
					}
					return err
				}()} {
					if !errors.As(err, &pe) || pe.Code != "55000" || pe.Severity != "FATAL" || pe.Message != g.msg ||
						!strings.Contains(pe.Hint, g.hint) {
						t.Fatalf("login %d while %s is disabled: %#v", i, g.name, err)
					}
				}
				// psql (libpq) shows the message and the hint.
				_, errOut, err := psql(t, dsn, "", "-c", "select 1")
				if err == nil || !strings.Contains(errOut, g.msg) || !strings.Contains(errOut, "HINT:") {
					t.Fatalf("psql while disabled: %v, %s", err, errOut)
				}
				alivePgx(t, held, "the session opened before the DISABLE")
				other := connect(t, g.otherLogin)
				alivePgx(t, other, "a login the DISABLE does not concern")
				p.Resume(g.scope, g.name, "test")
				if !p.Enable(g.scope, g.name, "test") || p.Enable(g.scope, g.name, "test") {
					t.Fatalf("Enable %s: want true, then false", g.name)
				}
				alivePgx(t, connect(t, dsn), "a login after ENABLE")
			}
			if len(p.Gates()) != 0 {
				t.Errorf("holds left: %+v", p.Gates())
			}
			if !strings.Contains(p.logs.String(), "reason=\"disabled by an operator\"") {
				t.Errorf("no log line for the refused login:\n%s", p.logs.String())
			}
		})
	}
}

// KILL ROLE ends every session of the role, those rolegate relays (each
// told why, with 57P01) and one opened directly against the server;
// another role's session lives on.
func TestKillRole(t *testing.T) {
	t.Parallel()
	const role = "killrole_user"
	pw := newRole(t, role, -1)
	ctl := superControl(t, shared)
	lim := &Limits{Limiter: limiter.New(time.Now), Server: ctl}
	lim.SetRules(mapRules{}, true, 0)
	p := startProxy(t, proxyOpts{auth: proxyAuth(time.Minute, auth.SourceFunc(ctl.Secret)), limits: lim})
	ctx := context.Background()

	relayed := []*pgx.Conn{connect(t, p.DSN(role, pw, "app")), connect(t, p.DSN(role, pw, "app"))}
	direct := connect(t, shared.DSN(role, pw, "app"))
	other := connect(t, p.DSN("scram_user", scramPW, "app"))
	var want []uint32
	for _, c := range append(slices.Clone(relayed), direct) {
		want = append(want, c.PgConn().PID())
	}

	pids, err := p.KillRole(ctx, role, "console user test")
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(pids)
	slices.Sort(want)
	if !slices.Equal(pids, want) {
		t.Fatalf("KillRole terminated %v, want %v", pids, want)
	}
	for i, c := range relayed {
		qctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		_, err := c.Exec(qctx, "select 1")
		cancel()
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || pe.Code != "57P01" ||
			pe.Message != "terminating connection: rolegate terminated this session at an operator's request (KILL ROLE killrole_user, console user test)" {
			t.Fatalf("relayed session %d: %#v", i, err)
		}
		if pe.Hint != "Connect again if you still need a session, or ask the operator who ended it why." {
			t.Errorf("relayed session %d: HINT %q", i, pe.Hint)
		}
	}
	qctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	_, err = direct.Exec(qctx, "select 1")
	cancel()
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "57P01" {
		t.Fatalf("direct session: %#v", err)
	}
	alivePgx(t, other, "another role's session")
	// The kills are in the history, once each.
	kills := 0
	for _, e := range p.Events() {
		if e.Kind == "kill" && e.VictimRole == role && strings.Contains(e.Reason, "KILL ROLE") {
			kills++
		}
	}
	if kills != 3 {
		t.Errorf("%d kill events, want 3: %+v", kills, p.Events())
	}
	// Nothing left to kill: an empty answer, no error.
	if pids, err := p.KillRole(ctx, role, "test"); err != nil || len(pids) != 0 {
		t.Fatalf("second KillRole: %v, %v", pids, err)
	}
}

// KILL ROLE needs the control connection.
func TestKillRoleWithoutControl(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})
	if _, err := p.KillRole(context.Background(), "anyone", "test"); !errors.Is(err, ErrNoControl) {
		t.Fatalf("KillRole without limits: %v", err)
	}
}
