package proxy

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/rolegate/rolegate/config"
	"github.com/rolegate/rolegate/limiter"
	"github.com/rolegate/rolegate/upstream"
)

// noPoll makes a proxy's waiters re-check only when signalled (or at their
// deadline): a waiter admitted while it waits was woken by a signal.
func noPoll(c *Config) {
	c.poll = time.Hour
	c.StartupTimeout = 10 * time.Minute
}

// waitListening waits until every control connection hears the other
// instances' slot signals.
func waitListening(t *testing.T, ctls ...*upstream.Control) {
	t.Helper()
	waitUntil(t, time.Minute, "the instances listening for slot signals", func() bool {
		for _, c := range ctls {
			if !c.SlotListening() {
				return false
			}
		}
		return true
	})
}

// A session ending on one instance wakes a login waiting for its slot on
// another, through the server (NOTIFY): the waiter re-checks on no timer.
func TestSlotFreedElsewhereWakesWaiter(t *testing.T) {
	t.Parallel()
	const role = "sig_freed"
	pw := newRole(t, role, -1)
	rule := limiter.Rule{MaxSessions: 1, Policy: limiter.PolicyWait, WaitTimeout: 5 * time.Minute}
	ctlA, ctlB := superControl(t, shared), superControl(t, shared)
	a := viewProxy(t, ctlA, ctlA, role, rule, noPoll)
	b := viewProxy(t, ctlB, ctlB, role, rule, noPoll)
	waitListening(t, ctlA, ctlB)

	holder := connect(t, a.DSN(role, pw, "app"))
	waiter := startLogin(b.DSN(role, pw, "app"))
	waitUntil(t, time.Minute, "a login waiting for the slot on the second instance", func() bool {
		return strings.Contains(waitOf(b, role), "slot of role")
	})
	holder.Close(context.Background())
	wantAlive(t, waiter.wait(t, "waiter"), "the waiter")
}

// A login that lands on one instance wakes a newest-wins login on another
// that waits to evict it; it is evicted (by the server's terminate: the
// instance relaying it is not told why) and the newer login stays.
func TestSlotLandedElsewhereWakesEvictor(t *testing.T) {
	t.Parallel()
	const role = "sig_landed"
	pw := newRole(t, role, -1)
	rule := limiter.Rule{MaxSessions: 1, Policy: limiter.PolicyNewestWins, Fallback: limiter.PolicyReject}
	ctlA, ctlB := superControl(t, shared), superControl(t, shared)
	g := newGate(t, shared.Addr())
	a := viewProxy(t, ctlA, ctlA, role, rule, func(c *Config) {
		noPoll(c)
		d, err := upstream.NewDialer(config.Server{Address: g.addr(), SSLMode: config.SSLDisable, ConnectTimeout: "30s"})
		if err != nil {
			t.Fatal(err)
		}
		c.Upstream = d
	})
	b := viewProxy(t, ctlB, ctlB, role, rule, noPoll)
	waitListening(t, ctlA, ctlB)

	first := make(chan error, 1)
	go func() {
		c, err := tryConnect(a.DSN(role, pw, "app"), 5*time.Minute, nil)
		if err == nil {
			defer c.Close(context.Background())
			_, err = c.Exec(context.Background(), "select pg_sleep(300)")
		}
		first <- err
	}()
	waitUntil(t, time.Minute, "the first login in its server login", func() bool {
		return sessionIn(a, role, StateConnecting)
	})
	second := startLogin(b.DSN(role, pw, "app"))
	waitUntil(t, time.Minute, "the second instance's login waiting for the login in flight", func() bool {
		return strings.Contains(waitOf(b, role), "held by logins in flight")
	})
	g.open()
	secondConn := second.wait(t, "newer login")
	if err := <-first; sqlstate(err) != "57P01" {
		t.Fatalf("the evicted session got %v, want 57P01", err)
	}
	wantAlive(t, secondConn, "the newer login")
}

// waitOf is what a waiting session of role waits for, or "".
func waitOf(p *testProxy, role string) string {
	for _, s := range p.Sessions() {
		if s.User == role && s.State == StateWaiting {
			return s.Wait
		}
	}
	return ""
}

// A chain of hand-offs under wait with limit 1 and no re-check timer: each
// session's end wakes the next login, which may find the ended session's
// backend still leaving the server; it then looks again soon (recheck),
// without the poll, and every login in the chain gets in.
func TestWaitHandOffWithoutPoll(t *testing.T) {
	t.Parallel()
	const role = "handoff_chain"
	pw := newRole(t, role, -1)
	ctl := superControl(t, shared)
	p := viewProxy(t, ctl, ctl, role, limiter.Rule{MaxSessions: 1, Policy: limiter.PolicyWait, WaitTimeout: 5 * time.Minute}, noPoll)
	holder := connect(t, p.DSN(role, pw, "app"))
	for i := range 10 {
		next := startLogin(p.DSN(role, pw, "app"))
		waitUntil(t, time.Minute, "the next login waiting", func() bool {
			return strings.Contains(waitOf(p, role), "slot of role")
		})
		holder.Close(context.Background())
		holder = next.wait(t, fmt.Sprintf("login %d of the chain", i))
		wantAlive(t, holder, "the new holder")
	}
}
