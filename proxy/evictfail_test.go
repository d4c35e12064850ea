package proxy

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/config"
	"github.com/rolegate/rolegate/limiter"
	"github.com/rolegate/rolegate/upstream"
)

// fakeLimitedProxy is a proxy in proxy authentication mode whose admission
// reads view instead of a server, with rules for roles (the server's own
// limits off). Clients authenticate against a userlist (user: password
// user+"_pw"), so no server is asked who they are; a login that is admitted
// still logs in to the shared cluster, which knows trust_user (trust).
func fakeLimitedProxy(t *testing.T, view ServerView, roles map[string]limiter.Rule, o proxyOpts, users ...string) *testProxy {
	t.Helper()
	lim := &Limits{Limiter: limiter.New(time.Now), Server: view}
	lim.SetRules(mapRules{roles: roles}, false, 0)
	ul := auth.Userlist{}
	for _, u := range users {
		ul[u] = auth.Secret{Kind: auth.Plain, Plain: u + "_pw"}
	}
	o.auth, o.limits = proxyAuth(time.Minute, ul), lim
	return startProxy(t, o)
}

// fakeSession is a census row of a session opened elsewhere, idle since it
// started at start.
func fakeSession(pid uint32, role, database string, start time.Time) limiter.Holder {
	return limiter.Holder{PID: pid, Role: role, Database: database, BackendStart: start, State: "idle", StateChange: start}
}

// wantNoSlot checks that err is PostgreSQL's 53300 for role, whose DETAIL
// names the limit and has detail (why the evictions failed) as a sentence
// of its own, and which has a HINT.
func wantNoSlot(t *testing.T, err error, role, detail string) {
	t.Helper()
	wantTooMany(t, err, "role", role)
	var pe *pgconn.PgError
	if errors.As(err, &pe) && (!strings.HasPrefix(pe.Detail, "The limit of ") || !strings.Contains(pe.Detail, ". "+detail+".") || pe.Hint == "") {
		t.Fatalf("DETAIL %q (HINT %q), want the limit and %q.", pe.Detail, pe.Hint, detail)
	}
}

var errDenied = &pgconn.PgError{Severity: "ERROR", Code: "42501", Message: "permission denied to terminate process",
	Detail: `Only roles with privileges of the role whose process is being terminated or with privileges of the "pg_signal_backend" role may terminate this process.`}

// A terminate that fails (the control role may not signal the role's
// sessions) under newest-wins: each candidate is tried once, then the
// fallback rejects at once with the server's reason in the DETAIL; the
// failure is logged once per cause however often it happens; another role's
// evictions go on.
func TestEvictFailTerminateError(t *testing.T) {
	t.Parallel()
	view := newFakeView()
	start := time.Now().Add(-time.Hour)
	view.add(fakeSession(101, "fx", "app", start), fakeSession(102, "fx", "app", start.Add(time.Minute)),
		fakeSession(201, "trust_user", "postgres", start))
	view.onTerminate(func(tg upstream.Target, _ time.Duration) (upstream.Termination, error) {
		if tg.PID < 200 {
			return 0, fmt.Errorf("terminate backend %d: %w", tg.PID, errDenied)
		}
		return view.end(tg), nil
	})
	nw := limiter.Rule{MaxSessions: 2, Policy: limiter.PolicyNewestWins, Fallback: limiter.PolicyReject}
	p := fakeLimitedProxy(t, view, map[string]limiter.Rule{"fx": nw, "trust_user": {MaxSessions: 1, Policy: limiter.PolicyNewestWins}},
		proxyOpts{throttle: throttleOptions{burst: 1, every: time.Hour}}, "fx", "trust_user")

	const detail = "rolegate could not evict pid 101: permission denied to terminate process; pid 102: permission denied to terminate process"
	for i := range 3 {
		_, err := tryConnect(p.DSN("fx", "fx_pw", "app"), 30*time.Second, nil)
		wantNoSlot(t, err, "fx", detail)
		// Each login tries each candidate once, oldest first, guarded by
		// its backend_start (newest-wins: no idle guard).
		got := view.terminated()
		if len(got) != 2*(i+1) {
			t.Fatalf("after %d logins: %d terminate calls %+v, want %d", i+1, len(got), got, 2*(i+1))
		}
		for j, pid := range []uint32{101, 102} {
			tg := got[2*i+j]
			if tg.PID != pid || !tg.BackendStart.Equal(start.Add(time.Duration(j)*time.Minute)) || !tg.IdleSince.IsZero() {
				t.Errorf("terminate call %d: %+v", 2*i+j, tg)
			}
		}
	}
	// Six failures, one cause: one line (the throttle lets one a hour
	// through here), written before the client was told.
	if lines := logLines(p, "msg=\"eviction failed\"", "victim_role=fx"); len(lines) != 1 || !strings.Contains(lines[0], "permission denied to terminate process") {
		t.Errorf("eviction failure lines:\n%s", strings.Join(lines, "\n"))
	}
	lines := logged(t, p, 1, "msg=rejected", "role=fx")
	if !strings.Contains(lines[0], "could not be evicted for this login") || !strings.Contains(lines[0], "detail=") {
		t.Errorf("rejection line: %s", lines[0])
	}

	// Another role: its victim is evicted and its login goes on to the server.
	c, err := tryConnect(p.DSN("trust_user", "trust_user_pw", "postgres"), 30*time.Second, nil)
	if err != nil {
		t.Fatalf("trust_user: %v", err)
	}
	defer c.Close(context.Background())
	wantAlive(t, c, "trust_user's new session")
	if got := view.terminated(); len(got) != 7 || got[6].PID != 201 {
		t.Errorf("terminate calls %+v", got)
	}
	if n := p.cfg.Limits.Limiter.Snapshot().Counters[limiter.CounterKey{Role: "fx", Policy: limiter.PolicyNewestWins}]; n.EvictFailures != 6 || n.Rejections != 3 {
		t.Errorf("fx counters %+v", n)
	}
}

// The terminate does not end the victim: it did not exit in time (the
// timeout form), it is no longer idle (evict-idle), or its pid now belongs to
// another session or to none. The victim is not chosen again for the login;
// what the client is told says why.
func TestEvictFailNotEvicted(t *testing.T) {
	t.Parallel()
	start := time.Now().Add(-time.Hour)
	for _, c := range []struct {
		name   string
		policy limiter.Policy
		// terminate is the server's answer; it may change the census.
		terminate func(view *fakeView, tg upstream.Target) upstream.Termination
		detail    string // "" : admitted
		calls     int
	}{
		// Signalled, and still in pg_stat_activity when victimGoneTimeout
		// has passed.
		{"did not exit", limiter.PolicyNewestWins, func(*fakeView, upstream.Target) upstream.Termination { return upstream.Terminated },
			"rolegate could not evict pid 301: it did not exit within 5s", 1},
		{"busy since the census", limiter.PolicyEvictIdle, func(view *fakeView, tg upstream.Target) upstream.Termination {
			// The session opened a transaction after the census.
			view.remove(301)
			view.add(limiter.Holder{PID: 301, Role: "trust_user", Database: "postgres", BackendStart: start,
				State: "idle in transaction", StateChange: time.Now()})
			return view.end(tg)
		}, "rolegate could not evict pid 301: it is no longer idle since it was chosen", 1},
		{"busy under newest-wins", limiter.PolicyNewestWins, func(view *fakeView, tg upstream.Target) upstream.Termination {
			// newest-wins does not care: the session ends.
			view.remove(301)
			view.add(limiter.Holder{PID: 301, Role: "trust_user", Database: "postgres", BackendStart: start,
				State: "active", StateChange: time.Now()})
			return view.end(tg)
		}, "", 1},
		{"pid reused", limiter.PolicyNewestWins, func(view *fakeView, tg upstream.Target) upstream.Termination {
			if tg.BackendStart.Equal(start) {
				// The victim ended; a newer backend got its pid.
				view.remove(301)
				view.add(fakeSession(301, "trust_user", "postgres", start.Add(time.Minute)))
			}
			// The newer one may be evicted in turn: it is another session.
			return view.end(tg)
		}, "", 2},
		{"already gone", limiter.PolicyNewestWins, func(view *fakeView, tg upstream.Target) upstream.Termination {
			view.remove(301)
			return view.end(tg)
		}, "", 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			view := newFakeView()
			view.add(fakeSession(301, "trust_user", "postgres", start))
			view.onTerminate(func(tg upstream.Target, timeout time.Duration) (upstream.Termination, error) {
				if timeout != 0 {
					t.Errorf("a victim opened elsewhere terminated with timeout %v, want 0 (not waited for)", timeout)
				}
				if want := c.policy == limiter.PolicyEvictIdle; !tg.IdleSince.IsZero() != want || tg.BackendStart.IsZero() {
					t.Errorf("guards %+v under %s", tg, c.policy)
				}
				return c.terminate(view, tg), nil
			})
			p := fakeLimitedProxy(t, view, map[string]limiter.Rule{"trust_user": {MaxSessions: 1, Policy: c.policy}}, proxyOpts{}, "trust_user")
			conn, err := tryConnect(p.DSN("trust_user", "trust_user_pw", "postgres"), 30*time.Second, nil)
			if c.detail != "" {
				wantNoSlot(t, err, "trust_user", c.detail)
			} else {
				if err != nil {
					t.Fatalf("login: %v", err)
				}
				wantAlive(t, conn, "the new session")
				conn.Close(context.Background())
			}
			if _, n, _ := view.counts(); n != c.calls {
				t.Errorf("%d terminate calls %+v, want %d", n, view.terminated(), c.calls)
			}
		})
	}
}

// A victim is signalled without waiting, and admission looks for it in
// pg_stat_activity until it has left: one opened elsewhere that leaves after
// a few looks makes room for the login; a look that fails is an eviction
// failure, reported as the control connection's, unless the victim is one
// rolegate relays: its server's close then still says it has left.
func TestEvictAwaitsExit(t *testing.T) {
	t.Parallel()
	start := time.Now().Add(-time.Hour)
	rules := map[string]limiter.Rule{"trust_user": {MaxSessions: 1, Policy: limiter.PolicyNewestWins}}
	t.Run("leaves", func(t *testing.T) {
		t.Parallel()
		view := newFakeView()
		view.add(fakeSession(311, "trust_user", "postgres", start))
		view.onTerminate(func(upstream.Target, time.Duration) (upstream.Termination, error) {
			return upstream.Terminated, nil // signalled; it leaves later
		})
		view.onPresent(func(tg upstream.Target, calls int) error {
			if calls == 4 {
				view.remove(tg.PID)
			}
			return nil
		})
		p := fakeLimitedProxy(t, view, rules, proxyOpts{}, "trust_user")
		conn, err := tryConnect(p.DSN("trust_user", "trust_user_pw", "postgres"), 30*time.Second, nil)
		if err != nil {
			t.Fatalf("login: %v", err)
		}
		wantAlive(t, conn, "the new session")
		conn.Close(context.Background())
		if n := view.presentCalls(); n != 4 {
			t.Errorf("%d looks for the victim, want 4 (it left at the fourth)", n)
		}
		// Once the victim has left, the census that chose it (less the
		// victim) decides: the admission locks were held throughout.
		if census, _, _ := view.counts(); census != 1 {
			t.Errorf("%d censuses, want 1", census)
		}
		if got, timeouts := view.terminated(), view.terminateTimeouts(); len(got) != 1 || got[0].PID != 311 || timeouts[0] != 0 {
			t.Errorf("terminate calls %+v, timeouts %v; want one for pid 311, not waited for", got, timeouts)
		}
		if lines := logLines(p, `msg=evicted`, "victim_pid=311"); len(lines) != 1 {
			t.Errorf("eviction lines:\n%s", strings.Join(lines, "\n"))
		}
	})
	t.Run("look fails", func(t *testing.T) {
		t.Parallel()
		view := newFakeView()
		view.add(fakeSession(312, "trust_user", "postgres", start))
		view.onTerminate(func(upstream.Target, time.Duration) (upstream.Termination, error) {
			return upstream.Terminated, nil
		})
		view.onPresent(func(tg upstream.Target, _ int) error {
			return fmt.Errorf("look for backend %d: %w", tg.PID, errDenied)
		})
		p := fakeLimitedProxy(t, view, rules, proxyOpts{}, "trust_user")
		_, err := tryConnect(p.DSN("trust_user", "trust_user_pw", "postgres"), 30*time.Second, nil)
		wantNoSlot(t, err, "trust_user", "rolegate could not evict pid 312: "+errDenied.Message)
		if lines := logLines(p, `msg="eviction failed"`, "victim_pid=312"); len(lines) != 1 {
			t.Errorf("eviction failure lines:\n%s", strings.Join(lines, "\n"))
		}
	})
	t.Run("look fails, relayed", func(t *testing.T) {
		t.Parallel()
		view := newFakeView()
		su := connect(t, shared.SuperDSN())
		// The signal goes out only with the first look, which fails: the
		// server's close comes after it.
		view.onTerminate(func(upstream.Target, time.Duration) (upstream.Termination, error) {
			return upstream.Terminated, nil
		})
		view.onPresent(func(tg upstream.Target, calls int) error {
			if calls == 1 {
				if _, err := su.Exec(context.Background(), "select pg_terminate_backend($1)", int32(tg.PID)); err != nil {
					return err
				}
				view.remove(tg.PID)
			}
			return fmt.Errorf("look for backend %d: %w", tg.PID, errDenied)
		})
		p := fakeLimitedProxy(t, view, rules, proxyOpts{}, "trust_user")
		dsn := p.DSN("trust_user", "trust_user_pw", "postgres")
		first := connect(t, dsn)
		pid := backendPID(t, first)
		view.add(fakeSession(pid, "trust_user", "postgres", start))
		second, err := tryConnect(dsn, 30*time.Second, nil)
		if err != nil {
			t.Fatalf("login: %v", err)
		}
		defer second.Close(context.Background())
		wantEvicted(t, first, "role", "trust_user", limiter.PolicyNewestWins)
		if n := view.presentCalls(); n != 1 {
			t.Errorf("%d looks, want 1 (then the server's close)", n)
		}
		if lines := logLines(p, `msg=evicted`, fmt.Sprintf("victim_pid=%d", pid)); len(lines) != 1 {
			t.Errorf("eviction lines:\n%s", strings.Join(logLines(p, "evict"), "\n"))
		}
	})
}

// A victim rolegate relays that does not exit once signalled: admission
// waits for its server socket for victimGoneTimeout, then gives up on it; it
// is not chosen again, and the fallback rejects. The fake's terminate
// reports the signal sent without sending it, so the session lives on.
func TestEvictFailRelayedVictimStays(t *testing.T) {
	t.Parallel()
	view := newFakeView()
	view.onTerminate(func(upstream.Target, time.Duration) (upstream.Termination, error) { return upstream.Terminated, nil })
	p := fakeLimitedProxy(t, view, map[string]limiter.Rule{"trust_user": {MaxSessions: 1, Policy: limiter.PolicyNewestWins}}, proxyOpts{}, "trust_user")
	dsn := p.DSN("trust_user", "trust_user_pw", "postgres")
	first := connect(t, dsn)
	pid := backendPID(t, first)
	view.add(fakeSession(pid, "trust_user", "postgres", time.Now().Add(-time.Hour)))

	_, err := tryConnect(dsn, 60*time.Second, nil)
	wantNoSlot(t, err, "trust_user", fmt.Sprintf("rolegate could not evict pid %d: it did not exit within 5s", pid))
	wantAlive(t, first, "the victim that was not terminated")
	if got, timeouts := view.terminated(), view.terminateTimeouts(); len(got) != 1 || got[0].PID != pid || timeouts[0] != 0 {
		t.Errorf("terminate calls %+v, timeouts %v", got, timeouts)
	}
	if lines := logLines(p, "msg=\"eviction failed\"", fmt.Sprintf("victim_pid=%d", pid)); len(lines) != 1 || !strings.Contains(lines[0], "did not exit") {
		t.Errorf("eviction failure lines:\n%s", strings.Join(lines, "\n"))
	}
}

// Fallback wait: a login whose victims all failed waits, without trying
// them again, and goes in when a slot frees; one whose wait runs out gets
// the 53300 with the reason.
func TestEvictFailFallbackWait(t *testing.T) {
	t.Parallel()
	view := newFakeView()
	start := time.Now().Add(-time.Hour)
	view.add(fakeSession(401, "trust_user", "postgres", start), fakeSession(501, "fw", "app", start))
	view.onTerminate(func(tg upstream.Target, _ time.Duration) (upstream.Termination, error) {
		return 0, fmt.Errorf("terminate backend %d: %w", tg.PID, errDenied)
	})
	rule := func(timeout time.Duration) limiter.Rule {
		return limiter.Rule{MaxSessions: 1, Policy: limiter.PolicyNewestWins, Fallback: limiter.PolicyWait, WaitTimeout: timeout}
	}
	p := fakeLimitedProxy(t, view, map[string]limiter.Rule{"trust_user": rule(time.Minute), "fw": rule(time.Second)},
		proxyOpts{startupTimeout: time.Minute}, "trust_user", "fw")

	type result struct {
		conn *pgx.Conn
		err  error
	}
	done := make(chan result, 1)
	go func() {
		c, err := tryConnect(p.DSN("trust_user", "trust_user_pw", "postgres"), 90*time.Second, nil)
		done <- result{c, err}
	}()
	waitWaiting(t, p, "trust_user", 1)
	// It re-checks on a poll interval: several censuses, no new terminate.
	before, _, _ := view.counts()
	waitUntil(t, 30*time.Second, "the waiting login to re-check a few times", func() bool {
		n, _, _ := view.counts()
		return n >= before+3
	})
	if _, n, _ := view.counts(); n != 1 {
		t.Errorf("%d terminate calls while waiting, want 1: %+v", n, view.terminated())
	}
	view.remove(401) // the session ends on its own
	r := <-done
	if r.err != nil {
		t.Fatalf("waiting login: %v", r.err)
	}
	wantAlive(t, r.conn, "the login that waited")
	r.conn.Close(context.Background())

	_, err := tryConnect(p.DSN("fw", "fw_pw", "app"), 60*time.Second, nil)
	wantNoSlot(t, err, "fw", "rolegate could not evict pid 501: permission denied to terminate process")
	if _, n, _ := view.counts(); n != 2 {
		t.Errorf("%d terminate calls, want 2: %+v", n, view.terminated())
	}
}

// However the census and the terminates go, one decide runs a bounded
// number of rounds: here every census shows a new session (sessions
// arriving from elsewhere as fast as they are chosen) and every terminate
// fails.
func TestEvictFailRoundsBounded(t *testing.T) {
	t.Parallel()
	view := newFakeView()
	var mu sync.Mutex
	next := uint32(1000)
	view.onCensus(func(role, database string, _ []limiter.Holder) ([]limiter.Holder, error) {
		mu.Lock()
		defer mu.Unlock()
		next++
		return []limiter.Holder{fakeSession(next, role, database, time.Now().Add(-time.Hour))}, nil
	})
	view.onTerminate(func(tg upstream.Target, _ time.Duration) (upstream.Termination, error) {
		return 0, fmt.Errorf("terminate backend %d: %w", tg.PID, errDenied)
	})
	p := fakeLimitedProxy(t, view, map[string]limiter.Rule{"fz": {MaxSessions: 1, Policy: limiter.PolicyNewestWins}}, proxyOpts{}, "fz")
	_, err := tryConnect(p.DSN("fz", "fz_pw", "app"), 60*time.Second, nil)
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "08006" ||
		!strings.Contains(pe.Message, fmt.Sprintf(`admission of role "fz" gave up after %d rounds of census and eviction`, maxEvictRounds)) {
		t.Fatalf("got %v, want 08006 giving up", err)
	}
	if census, term, _ := view.counts(); census != maxEvictRounds || term != maxEvictRounds {
		t.Errorf("%d censuses and %d terminates, want %d each", census, term, maxEvictRounds)
	}
}

// Against a real server: a control role without pg_signal_backend cannot
// evict under newest-wins. The login gets the server's own 53300 at once,
// with the server's reason in the DETAIL; a role whose sessions the control
// role may signal (one it is a member of) evicts as usual.
func TestEvictFailNoSignalBackend(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	pw := newRole(t, "nosig_r", 1)
	otherPW := newRole(t, "nosig_other", 1)
	ctlPW := newRole(t, "nosig_ctl", -1)
	// What sql/setup.sql grants, but pg_signal_backend.
	if err := shared.Exec(ctx, "grant pg_read_all_stats to nosig_ctl; grant nosig_other to nosig_ctl"); err != nil {
		t.Fatal(err)
	}
	ctl, err := upstream.NewControl(ctx, config.Control{DSN: shared.DSN("nosig_ctl", ctlPW, "postgres"), MaxConns: 2}, config.DefaultAuthQuery)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ctl.Close)
	lim := &Limits{Limiter: limiter.New(time.Now), Server: ctl}
	nw := limiter.Rule{MaxSessions: -1, Policy: limiter.PolicyNewestWins, Fallback: limiter.PolicyReject}
	lim.SetRules(mapRules{roles: map[string]limiter.Rule{"nosig_r": nw, "nosig_other": nw}}, true, 0)
	p := startProxy(t, proxyOpts{auth: proxyAuth(time.Minute, auth.SourceFunc(superControl(t, shared).Secret)), limits: lim})

	held := connect(t, shared.DSN("nosig_r", pw, "postgres"))
	pid := backendPID(t, held)
	// The server's own answers: the limit, and the control role's terminate.
	_, direct := tryConnect(shared.DSN("nosig_r", pw, "postgres"), 30*time.Second, nil)
	var serverLimit *pgconn.PgError
	if !errors.As(direct, &serverLimit) || serverLimit.Code != "53300" {
		t.Fatalf("direct login at the limit: %v", direct)
	}
	asCtl := connect(t, shared.DSN("nosig_ctl", ctlPW, "postgres"))
	_, termErr := asCtl.Exec(ctx, "select pg_terminate_backend($1)", int32(pid))
	var denied *pgconn.PgError
	if !errors.As(termErr, &denied) || denied.Code != "42501" {
		t.Fatalf("terminate as the control role: %v", termErr)
	}

	for range 2 {
		_, err = tryConnect(p.DSN("nosig_r", pw, "postgres"), 30*time.Second, nil)
		wantNoSlot(t, err, "nosig_r", fmt.Sprintf("rolegate could not evict pid %d: %s", pid, denied.Message))
		var pe *pgconn.PgError
		if errors.As(err, &pe) && pe.Message != serverLimit.Message {
			t.Errorf("message %q, the server says %q", pe.Message, serverLimit.Message)
		}
	}
	wantAlive(t, held, "the session the control role may not terminate")

	// nosig_ctl is a member of nosig_other: it may terminate its sessions.
	old := connect(t, shared.DSN("nosig_other", otherPW, "postgres"))
	c, err := tryConnect(p.DSN("nosig_other", otherPW, "postgres"), 30*time.Second, nil)
	if err != nil {
		t.Fatalf("nosig_other: %v", err)
	}
	defer c.Close(context.Background())
	wantAlive(t, c, "nosig_other's new session")
	_, err = old.Exec(ctx, "select 1")
	if sqlstate(err) != "57P01" {
		t.Fatalf("nosig_other's old session: %v, want 57P01", err)
	}
}

// hookView is the control connection as admission's ServerView, with a hook
// that runs between the census that chose a victim and its terminate.
type hookView struct {
	*upstream.Control
	beforeTerminate func(upstream.Target)
}

func (v *hookView) Terminate(ctx context.Context, t upstream.Target, timeout time.Duration) (upstream.Termination, error) {
	if v.beforeTerminate != nil {
		v.beforeTerminate(t)
	}
	return v.Control.Terminate(ctx, t, timeout)
}

// Against a real server: under evict-idle, a session chosen as idle that
// opens a transaction before the terminate is not terminated; the login is
// refused with the reason. Both for a victim rolegate relays (terminated
// with timeout 0) and one opened directly (the timeout form).
func TestEvictIdleGuard(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name    string
		role    string
		relayed bool
	}{{"relayed", "guard_relayed", true}, {"direct", "guard_direct", false}} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			pw := newRole(t, c.role, 1)
			su := connect(t, shared.SuperDSN())
			view := &hookView{Control: superControl(t, shared)}
			lim := &Limits{Limiter: limiter.New(time.Now), Server: view}
			lim.SetRules(mapRules{roles: map[string]limiter.Rule{c.role: {MaxSessions: -1, Policy: limiter.PolicyEvictIdle}}}, true, 0)
			p := startProxy(t, proxyOpts{auth: proxyAuth(time.Minute, auth.SourceFunc(view.Secret)), limits: lim})

			dsn := shared.DSN(c.role, pw, "postgres")
			if c.relayed {
				dsn = p.DSN(c.role, pw, "postgres")
			}
			victim := connect(t, dsn)
			pid := backendPID(t, victim)
			waitStates(t, su, c.role, map[string]int{"idle": 1})
			var calls atomic.Int32
			view.beforeTerminate = func(tg upstream.Target) {
				calls.Add(1)
				if tg.PID != pid || tg.IdleSince.IsZero() || tg.BackendStart.IsZero() {
					t.Errorf("target %+v, want pid %d with both guards", tg, pid)
				}
				// The admission goroutine runs this while the test waits
				// for the login, so victim has one user at a time.
				if _, err := victim.Exec(ctx, "begin"); err != nil {
					t.Errorf("begin: %v", err)
				}
				// Not waitStates: this is not the test's goroutine.
				for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(5 * time.Millisecond) {
					var state string
					err := su.QueryRow(ctx, "select coalesce(state, '') from pg_stat_activity where pid = $1", int32(pid)).Scan(&state)
					if err == nil && state == "idle in transaction" {
						return
					}
					if time.Now().After(deadline) {
						t.Errorf("the victim's state: %q, %v", state, err)
						return
					}
				}
			}
			_, err := tryConnect(p.DSN(c.role, pw, "postgres"), 60*time.Second, nil)
			wantNoSlot(t, err, c.role, fmt.Sprintf("rolegate could not evict pid %d: it is no longer idle since it was chosen", pid))
			if n := calls.Load(); n != 1 {
				t.Errorf("%d terminates, want 1", n)
			}
			if _, err := victim.Exec(ctx, "commit"); err != nil {
				t.Fatalf("the session that opened a transaction was terminated: %v", err)
			}
			wantAlive(t, victim, "the session that opened a transaction")
		})
	}
}

// What a client is told of a terminate that failed: the server's message for
// the terminate itself, else only the kind of failure (a failure to connect
// would name the control role and its server).
func TestEvictFailClientCause(t *testing.T) {
	for _, c := range []struct {
		err          error
		cause, class string
	}{
		{fmt.Errorf("terminate backend 7: %w", errDenied), "permission denied to terminate process", "42501"},
		{fmt.Errorf("terminate backend 7: %w", &pgconn.ConnectError{}), "the control connection failed", "connect"},
		{fmt.Errorf("terminate backend 7: %w", context.DeadlineExceeded), "the control connection did not answer in time", "timeout"},
		{fmt.Errorf("terminate backend 7: %w", context.Canceled), "the login ended", "canceled"},
		{errors.New("conn closed"), "the control connection failed", "control"},
	} {
		if cause, class := clientCause(c.err); cause != c.cause || class != c.class {
			t.Errorf("clientCause(%v) = %q, %q; want %q, %q", c.err, cause, class, c.cause, c.class)
		}
	}
}

// A control connection that fails or stalls during admission: the client
// gets 08006 naming the step, never the driver's text (which names the
// control role and host); the log line keeps the cause.
func TestAdmissionFailureNamesStep(t *testing.T) {
	t.Parallel()
	const driverText = "failed to connect to `user=rolegate database=postgres`: 10.9.9.9:5432: connection refused"
	tests := []struct {
		name   string
		census func(role, database string, _ []limiter.Holder) ([]limiter.Holder, error)
		want   string
	}{
		{"census fails", func(string, string, []limiter.Holder) ([]limiter.Holder, error) {
			return nil, errors.New(driverText)
		}, `rolegate could not check the connection limits: the census of role "fc" failed: the control connection failed`},
		{"census times out", func(string, string, []limiter.Holder) ([]limiter.Holder, error) {
			return nil, fmt.Errorf("census: %s: %w", driverText, context.DeadlineExceeded)
		}, `rolegate could not check the connection limits: the census of role "fc" failed: the control connection did not answer in time`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			view := newFakeView()
			view.onCensus(tt.census)
			p := fakeLimitedProxy(t, view, map[string]limiter.Rule{"fc": {MaxSessions: 1, Policy: limiter.PolicyReject}}, proxyOpts{}, "fc")
			_, err := tryConnect(p.DSN("fc", "fc_pw", "app"), 60*time.Second, nil)
			var pe *pgconn.PgError
			if !errors.As(err, &pe) || pe.Code != "08006" || pe.Message != tt.want {
				t.Fatalf("got %v, want 08006 %q", err, tt.want)
			}
			lines := logged(t, p, 1, "msg=\"admission failed\"")
			if !strings.Contains(lines[0], "connection refused") {
				t.Errorf("the log line lost the cause: %s", lines[0])
			}
		})
	}
}

// A victim whose client stopped reading in the middle of a large result: the
// server's close waits, unread, behind the result in rolegate's relay, while
// the backend, blocked writing, exits on the signal all the same. Admission
// sees it leave pg_stat_activity and lets the new login in; the stalled
// client, once it reads, gets the rest and the end of its session.
func TestEvictVictimThatDoesNotRead(t *testing.T) {
	t.Parallel()
	pw := newRole(t, "evict_stall", -1)
	p := limitedProxy(t, map[string]limiter.Rule{"evict_stall": {MaxSessions: 1, Policy: limiter.PolicyNewestWins}})
	dsn := p.DSN("evict_stall", pw, "postgres")
	stalled := connect(t, dsn)
	pid := backendPID(t, stalled)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// pgconn sends the query and reads nothing until asked to.
	result := stalled.PgConn().Exec(ctx, "select repeat('x', 100000) from generate_series(1, 500)")
	waitUntil(t, 30*time.Second, "the relay to fill the stalled client's buffers", func() bool {
		for _, s := range p.Sessions() {
			if s.BackendPID == pid && s.BytesOut > 1<<20 {
				return true
			}
		}
		return false
	})
	fresh, err := tryConnect(dsn, 60*time.Second, nil)
	if err != nil {
		t.Fatalf("login over the stalled session: %v", err)
	}
	defer fresh.Close(context.Background())
	wantAlive(t, fresh, "the new session")
	if lines := logLines(p, `msg=evicted`, fmt.Sprintf("victim_pid=%d", pid)); len(lines) != 1 {
		t.Errorf("eviction lines for pid %d:\n%s", pid, strings.Join(logLines(p, "evict"), "\n"))
	}
	// The stalled client reads at last: its result ends early, with an error.
	_, err = result.ReadAll()
	if err == nil {
		t.Error("the evicted session's result ended without an error")
	}
}
