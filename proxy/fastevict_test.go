package proxy

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rolegate/rolegate/limiter"
	"github.com/rolegate/rolegate/upstream"
)

// termView is the control connection as admission's ServerView (its
// advisory locks and reservations too), recording every Terminate. With
// withhold set, Terminate checks nothing and signals nobody: it reports
// Terminated at once and keeps the target, which the test signals itself
// later (signal), or never (a victim that does not exit).
type termView struct {
	*upstream.Control
	withhold bool

	mu       sync.Mutex
	timeouts []time.Duration
	held     []upstream.Target
}

func (v *termView) Terminate(ctx context.Context, t upstream.Target, timeout time.Duration) (upstream.Termination, error) {
	v.mu.Lock()
	v.timeouts = append(v.timeouts, timeout)
	if v.withhold {
		v.held = append(v.held, t)
		v.mu.Unlock()
		return upstream.Terminated, nil
	}
	v.mu.Unlock()
	return v.Control.Terminate(ctx, t, timeout)
}

// calls returns the timeout of every Terminate so far.
func (v *termView) calls() []time.Duration {
	v.mu.Lock()
	defer v.mu.Unlock()
	return slices.Clone(v.timeouts)
}

// signal sends the withheld terminations, as the server would have.
func (v *termView) signal(t *testing.T) {
	t.Helper()
	v.mu.Lock()
	held := v.held
	v.held = nil
	v.mu.Unlock()
	for _, tg := range held {
		if r, err := v.Control.Terminate(context.Background(), tg, 0); err != nil || r != upstream.Terminated {
			t.Fatalf("terminate %+v: %v %v", tg, r, err)
		}
	}
}

// A newest-wins login whose victim is a session opened directly against the
// server, which enforces the role's limit itself: rolegate signals the
// victim without waiting for it to exit (pg_terminate_backend(pid, 0)) and
// logs in at once, trying again on the server's 53300 until the victim has
// left. The victim gets the server's 57P01, the server never counts more
// sessions of the role than its limit, and the login gets in.
func TestEvictDirectOverlap(t *testing.T) {
	t.Parallel()
	const role = "fast_direct"
	pw := newRole(t, role, 1)
	ctl := superControl(t, shared)
	view := &termView{Control: ctl}
	p := viewProxy(t, ctl, view, role, limiter.Rule{MaxSessions: -1, Policy: limiter.PolicyNewestWins}, nil)
	most := sampleSessions(t, role)
	ctx := context.Background()

	// login opens a direct victim, then logs in through rolegate, which
	// evicts it. It runs on the test's goroutine or another, so it returns
	// what went wrong.
	login := func(what string) error {
		victim, err := tryConnect(shared.DSN(role, pw, "app"), 30*time.Second, nil)
		if err != nil {
			return fmt.Errorf("%s: the direct session: %w", what, err)
		}
		defer victim.Close(ctx)
		c, err := tryConnect(p.DSN(role, pw, "app"), 30*time.Second, nil)
		if err != nil {
			return fmt.Errorf("%s: login through rolegate: %w", what, err)
		}
		defer c.Close(ctx)
		var one int
		if err := c.QueryRow(ctx, "select 1").Scan(&one); err != nil {
			return fmt.Errorf("%s: the new session: %w", what, err)
		}
		_, err = victim.Exec(ctx, "select 1")
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || pe.Code != "57P01" || pe.Message != "terminating connection due to administrator command" {
			return fmt.Errorf("%s: the direct session got %v, want the server's 57P01", what, err)
		}
		return nil
	}
	noSessions := func() {
		t.Helper()
		waitUntil(t, 30*time.Second, "no session of the role left", func() bool { return sessionsOf(t, role) == 0 })
	}

	// As it happens: the login may or may not meet the server's 53300,
	// depending on how fast the victim exits.
	if err := login("overlapped"); err != nil {
		t.Fatal(err)
	}
	noSessions()
	// The victim outlives the first server logins: the signal is sent only
	// once the login met the server's 53300 and said it tries again.
	view.mu.Lock()
	view.withhold = true
	view.mu.Unlock()
	done := make(chan error, 1)
	go func() { done <- login("withheld signal") }()
	logged(t, p, 1, `msg="server at its limit after admission; trying again"`, "waiting_for=")
	view.signal(t)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	noSessions()

	for i, timeout := range view.calls() {
		if timeout != 0 {
			t.Errorf("terminate %d waited %v for the victim to exit", i, timeout)
		}
	}
	if n := len(view.calls()); n != 2 {
		t.Errorf("%d terminate calls, want 2", n)
	}
	if n, _ := most(); n > 1 {
		t.Errorf("the server counted %d sessions of the role at once, limit 1", n)
	}
	if n := len(logLines(p, "msg=evicted", "awaited=false")); n != 2 {
		t.Errorf("%d eviction lines with awaited=false, want 2:\n%s", n, p.logs.String())
	}
}

// A signalled victim that does not exit: the login tries the server again
// until its time for that runs out (victimGoneTimeout from the signal), then
// gets the server's 53300 with a DETAIL that says why; the victim, never
// really signalled here, lives on, and the server's count never exceeded
// the limit.
func TestEvictDirectVictimStays(t *testing.T) {
	t.Parallel()
	const role = "fast_stays"
	pw := newRole(t, role, 1)
	ctl := superControl(t, shared)
	view := &termView{Control: ctl, withhold: true}
	p := viewProxy(t, ctl, view, role, limiter.Rule{MaxSessions: -1, Policy: limiter.PolicyEvictIdle}, nil)
	most := sampleSessions(t, role)

	victim := connect(t, shared.DSN(role, pw, "app"))
	pid := backendPID(t, victim)
	_, err := tryConnect(p.DSN(role, pw, "app"), 30*time.Second, nil)
	wantTooMany(t, err, "role", role)
	var pe *pgconn.PgError
	errors.As(err, &pe)
	want := fmt.Sprintf("rolegate terminated pid %d to make room for this login, and the server still counted it ", pid)
	if !strings.HasPrefix(pe.Detail, want) || !strings.HasSuffix(pe.Detail, " later") {
		t.Errorf("DETAIL %q, want %q...", pe.Detail, want)
	}
	wantAlive(t, victim, "the victim that did not exit")
	if calls := view.calls(); len(calls) != 1 || calls[0] != 0 {
		t.Errorf("terminate calls with timeouts %v, want one with 0", calls)
	}
	if n := len(logLines(p, `msg="server at its limit after admission; trying again"`)); n == 0 {
		t.Error("the login never tried the server again")
	}
	if n, _ := most(); n > 1 {
		t.Errorf("the server counted %d sessions of the role at once, limit 1", n)
	}
	// The server's reservation and the limiter's are gone.
	su := connect(t, shared.SuperDSN())
	waitUntil(t, 30*time.Second, "no reservation of the role", func() bool {
		_, r := roleLocks(t, su, role)
		return r == 0
	})
}
