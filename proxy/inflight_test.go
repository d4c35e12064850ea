package proxy

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/limiter"
)

// sessionFrom finds the listed session of the client at local address addr.
func sessionFrom(p *testProxy, addr net.Addr) *SessionInfo {
	for _, s := range p.Sessions() {
		if s.ClientAddr == addr.String() {
			return &s
		}
	}
	return nil
}

// waitSession waits until the session of the client at addr is listed and
// cond holds for it, and returns it.
func waitSession(t *testing.T, p *testProxy, addr net.Addr, what string, cond func(SessionInfo) bool) SessionInfo {
	t.Helper()
	var got *SessionInfo
	waitUntil(t, 30*time.Second, what, func() bool {
		got = sessionFrom(p, addr)
		return got != nil && cond(*got)
	})
	return *got
}

// noServerSide checks that an in-flight login has no backend pid, no cancel
// key and no name it has not proved.
func noServerSide(t *testing.T, p *testProxy, s SessionInfo) {
	t.Helper()
	if s.BackendPID != 0 || s.Verified || s.User != "" || s.Database != "" || s.ApplicationName != "" {
		t.Errorf("login in flight shows %+v; want no pid and no unproven names", s)
	}
	p.registry.mu.Lock()
	keys, pids := len(p.registry.byKey), len(p.registry.byPID)
	p.registry.mu.Unlock()
	if keys != 0 || pids != 0 {
		t.Errorf("%d cancel keys and %d pids registered for logins without a backend", keys, pids)
	}
}

// Connections are listed from accept: one that has sent nothing is in
// startup, one that never answers the password request is authenticating
// (in proxy mode and passthrough), neither shows the names it claims, and
// both are gone once they leave. A login that completes is idle, with its pid.
func TestInFlightStartupAndAuthentication(t *testing.T) {
	t.Parallel()
	ctl := superControl(t, shared)
	for _, tt := range []struct {
		mode string
		auth *ClientAuth
		user string
		ask  func(*testing.T, *pgproto3.Frontend)
	}{
		{"proxy", proxyAuth(time.Minute, auth.SourceFunc(ctl.Secret)), "scram_user", func(t *testing.T, fe *pgproto3.Frontend) {
			receive[*pgproto3.AuthenticationSASL](t, fe)
		}},
		{"passthrough", nil, "password_user", func(t *testing.T, fe *pgproto3.Frontend) {
			receive[*pgproto3.AuthenticationCleartextPassword](t, fe)
		}},
	} {
		t.Run(tt.mode, func(t *testing.T) {
			t.Parallel()
			// Long enough that rolegate never ends the silent logins itself.
			p := startProxy(t, proxyOpts{auth: tt.auth, startupTimeout: 5 * time.Minute})

			silent := rawConn(t, p)
			s := waitSession(t, p, silent.LocalAddr(), "the silent connection in startup", func(s SessionInfo) bool {
				return s.State == StateStartup
			})
			noServerSide(t, p, s)

			stuck := rawConn(t, p)
			startupMessage(t, stuck, 3, 0, "user", tt.user, "database", "app", "application_name", "claimed")
			tt.ask(t, pgproto3.NewFrontend(stuck, stuck)) // and never answered
			s = waitSession(t, p, stuck.LocalAddr(), "the login stuck in authentication", func(s SessionInfo) bool {
				return s.State == StateAuthenticating
			})
			noServerSide(t, p, s)
			if s.Wait != "" {
				t.Errorf("an authenticating login waits for %q", s.Wait)
			}
			if n := len(p.Sessions()); n != 2 {
				t.Errorf("%d sessions listed, want the two logins in flight: %+v", n, p.Sessions())
			}

			silent.Close()
			stuck.Close()
			waitUntil(t, 30*time.Second, "the logins that left to be gone", func() bool { return len(p.Sessions()) == 0 })

			pw := map[string]string{"scram_user": scramPW, "password_user": passwordPW}[tt.user]
			c := connect(t, p.DSN(tt.user, pw, "app", "application_name=inflight_done"))
			pid := backendPID(t, c)
			waitUntil(t, 30*time.Second, "the logged-in session idle with its pid", func() bool {
				s := sessionByApp(p, "inflight_done")
				return s != nil && s.State == StateIdle && s.BackendPID == pid && s.Verified && s.User == tt.user
			})
		})
	}
}

// A login waiting for a slot is listed in state waiting, with what it waits
// for and its place in line, without a backend; admitted, it is idle with
// its backend pid. In passthrough, the waiting login already has a backend.
func TestInFlightWaiting(t *testing.T) {
	t.Parallel()
	waitRule := limiter.Rule{MaxSessions: -1, Policy: limiter.PolicyWait, Fallback: limiter.PolicyReject, WaitTimeout: 5 * time.Minute}

	t.Run("proxy", func(t *testing.T) {
		t.Parallel()
		const role = "lim_inflight_wait"
		pw := newRole(t, role, 1)
		p := limitedProxy(t, map[string]limiter.Rule{role: waitRule})
		held := connect(t, p.DSN(role, pw, "app"))

		type result struct {
			c   *pgx.Conn
			err error
		}
		login := func(app string) <-chan result {
			ch := make(chan result, 1)
			go func() {
				c, err := tryConnect(p.DSN(role, pw, "app", "application_name="+app), 2*time.Minute, nil)
				ch <- result{c, err}
			}()
			return ch
		}
		waiting := func(app, place string) {
			t.Helper()
			want := `waiting for a slot of role "` + role + `" (limit 1, ` + place + ` in line)`
			var s *SessionInfo
			waitUntil(t, 30*time.Second, app+" "+place+" in line", func() bool {
				s = sessionByApp(p, app)
				return s != nil && s.State == StateWaiting && s.Wait == want
			})
			if s.BackendPID != 0 || !s.Verified || s.User != role || s.Database != "app" {
				t.Errorf("waiting login %+v: want no pid, and its proven role and database", *s)
			}
		}
		first := login("first")
		waiting("first", "1st")
		second := login("second")
		waiting("second", "2nd")

		held.Close(context.Background())
		r := <-first
		if r.err != nil {
			t.Fatalf("the first waiter: %v", r.err)
		}
		defer r.c.Close(context.Background())
		pid := backendPID(t, r.c)
		waitUntil(t, 30*time.Second, "the admitted waiter idle with its pid", func() bool {
			s := sessionByApp(p, "first")
			return s != nil && s.State == StateIdle && s.BackendPID == pid && s.Wait == ""
		})
		waiting("second", "1st")

		r.c.Close(context.Background())
		r = <-second
		if r.err != nil {
			t.Fatalf("the second waiter: %v", r.err)
		}
		r.c.Close(context.Background())
		waitUntil(t, 30*time.Second, "every session to be gone", func() bool { return len(p.Sessions()) == 0 })
	})

	t.Run("passthrough", func(t *testing.T) {
		t.Parallel()
		const role = "lim_inflight_pass"
		// The server lets the waiter's backend in (it checks its own limit
		// before rolegate's admission); rolegate's rule makes it wait.
		pw := newRole(t, role, 5)
		rule := waitRule
		rule.MaxSessions = 1
		lim := &Limits{Limiter: limiter.New(time.Now), Server: superControl(t, shared)}
		lim.SetRules(mapRules{roles: map[string]limiter.Rule{role: rule}}, true, 0)
		p := startProxy(t, proxyOpts{limits: lim})
		held := connect(t, p.DSN(role, pw, "app"))

		done := make(chan error, 1)
		go func() {
			c, err := tryConnect(p.DSN(role, pw, "app", "application_name=pass_waiter"), 2*time.Minute, nil)
			if err == nil {
				c.Close(context.Background())
			}
			done <- err
		}()
		var s *SessionInfo
		waitUntil(t, 30*time.Second, "the passthrough login waiting", func() bool {
			s = sessionByApp(p, "pass_waiter")
			return s != nil && s.State == StateWaiting && s.Wait == `waiting for a slot of role "`+role+`" (limit 1, 1st in line)`
		})
		// The server authenticated it on a backend of its own, which it
		// holds while it waits.
		if s.BackendPID == 0 || !s.Verified {
			t.Errorf("passthrough waiter %+v: want its backend pid", *s)
		}
		held.Close(context.Background())
		if err := <-done; err != nil {
			t.Fatalf("the passthrough waiter: %v", err)
		}
		waitUntil(t, 30*time.Second, "every session to be gone", func() bool { return len(p.Sessions()) == 0 })
	})
}
