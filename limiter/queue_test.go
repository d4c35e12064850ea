package limiter

import (
	"strings"
	"testing"
	"time"
)

// waitSetup is a role "app" at its limit of 1 (pid 1) under policy wait.
func waitSetup() (*Limiter, *fakeClock, Rule, []Holder) {
	clk := newClock()
	return New(clk.Now), clk, rule(1, PolicyWait), []Holder{idle(1, "app", "d", time.Hour)}
}

func login(id uint64) Login { return Login{ID: id, Role: "app", Database: "d"} }

func mustWait(t *testing.T, d Decision) *Ticket {
	t.Helper()
	if d.Kind != Wait || d.Ticket == nil {
		t.Fatalf("got %v (%s), want wait", d.Kind, d.Reason)
	}
	return d.Ticket
}

func TestWaitFIFO(t *testing.T) {
	l, _, r, census := waitSetup()
	a, b := login(1), login(2)
	a.Ticket = mustWait(t, l.Decide(a, r, NoLimit(), census))
	b.Ticket = mustWait(t, l.Decide(b, r, NoLimit(), census))
	if s := l.Snapshot(); s.WaitingByRole["app"] != 2 || s.WaitingByDatabase["d"] != 2 {
		t.Fatalf("waiting %v %v", s.WaitingByRole, s.WaitingByDatabase)
	}
	if ready(a.Ticket) || ready(b.Ticket) {
		t.Fatal("woken before anything ended")
	}

	// pid 1 ends: only the head wakes.
	l.Released("app", "d")
	if !isReady(a.Ticket) || isReady(b.Ticket) {
		t.Fatalf("after Released: a %v b %v, want only a", isReady(a.Ticket), isReady(b.Ticket))
	}
	// b gets there first (its poll fired): it must not take a's slot.
	free := without(census, 1)
	if d := l.Decide(b, r, NoLimit(), free); d.Kind != Wait || !strings.Contains(d.Reason, `role "app" limit 1 (0 sessions, 1 waiting before this login): waiting in line`) {
		t.Fatalf("b jumped the queue: %v (%s)", d.Kind, d.Reason)
	}
	if d := l.Decide(a, r, NoLimit(), free); d.Kind != Admit || d.Ticket != nil {
		t.Fatalf("a: %v (%s)", d.Kind, d.Reason)
	}
	// b is first now: it is signalled once, to re-check as the one waiter
	// that polls (First); it finds a in and waits on.
	if !ready(b.Ticket) || !b.Ticket.First() {
		t.Fatal("b not signalled as the new first waiter")
	}
	// a is in; a ends; b wakes and gets in.
	withA := append(free, idle(2, "app", "d", 0))
	if d := l.Decide(b, r, NoLimit(), withA); d.Kind != Wait {
		t.Fatalf("b: %v (%s)", d.Kind, d.Reason)
	}
	if isReady(b.Ticket) {
		t.Fatal("b woken again although a took the only slot")
	}
	l.Released("app", "d")
	if !ready(b.Ticket) {
		t.Fatal("b not woken")
	}
	if d := l.Decide(b, r, NoLimit(), free); d.Kind != Admit {
		t.Fatalf("b: %v (%s)", d.Kind, d.Reason)
	}
	if s := l.Snapshot(); len(s.WaitingByRole) != 0 || len(l.queues) != 0 || len(l.tickets) != 0 {
		t.Fatalf("left behind: %v queues %d tickets %d", s.WaitingByRole, len(l.queues), len(l.tickets))
	}
}

// TestNewcomerQueuesBehindWaiters: a slot that frees without a Released
// call (a session opened directly against the server ended) goes to the
// waiter, and the newcomer that noticed wakes it.
func TestNewcomerQueuesBehindWaiters(t *testing.T) {
	for _, p := range []Policy{PolicyWait, PolicyNewestWins, PolicyEvictIdle, PolicyReject} {
		t.Run(string(p), func(t *testing.T) {
			l, _, _, census := waitSetup()
			a := login(1)
			a.Ticket = mustWait(t, l.Decide(a, rule(1, PolicyWait), NoLimit(), census))
			r := rule(1, p)
			r.Fallback = PolicyWait
			c := l.Decide(login(3), r, NoLimit(), nil) // pid 1 is gone
			want := Wait
			if p == PolicyReject {
				want = Reject // reject never queues; the waiter has the slot
			}
			if c.Kind != want {
				t.Fatalf("newcomer: %v (%s), want %v", c.Kind, c.Reason, want)
			}
			if !isReady(a.Ticket) {
				t.Fatal("the waiter was not woken for the free slot")
			}
			if d := l.Decide(a, r, NoLimit(), nil); d.Kind != Admit {
				t.Fatalf("a: %v (%s)", d.Kind, d.Reason)
			}
			c.Ticket.Leave()
		})
	}
}

// TestNewcomerPokesEvictingWaiter: under an evicting policy a newcomer
// queues behind the waiter and wakes it, because the waiter may now find a
// victim (here: the session aged past min_session_age).
func TestNewcomerPokesEvictingWaiter(t *testing.T) {
	l, clk, _, _ := waitSetup()
	r := Rule{MaxSessions: 1, Policy: PolicyNewestWins, Fallback: PolicyWait, MinSessionAge: time.Minute, WaitTimeout: 10 * time.Minute}
	census := []Holder{idle(1, "app", "d", 0)}
	a := login(1)
	a.Ticket = mustWait(t, l.Decide(a, r, NoLimit(), census))
	clk.Advance(2 * time.Minute)
	c := login(2)
	c.Ticket = mustWait(t, l.Decide(c, r, NoLimit(), census))
	if !ready(a.Ticket) {
		t.Fatal("waiter not poked")
	}
	if d := l.Decide(a, r, NoLimit(), census); d.Kind != Evict || d.Victims[0].PID != 1 {
		t.Fatalf("a: %v (%s)", d.Kind, d.Reason)
	}
	c.Ticket.Leave()
	a.Ticket.Leave()
}

func TestLeave(t *testing.T) {
	l, _, r, census := waitSetup()
	a, b, c := login(1), login(2), login(3)
	a.Ticket = mustWait(t, l.Decide(a, r, NoLimit(), census))
	b.Ticket = mustWait(t, l.Decide(b, r, NoLimit(), census))
	c.Ticket = mustWait(t, l.Decide(c, r, NoLimit(), census))

	// c gives up: gone at once, nobody woken.
	c.Ticket.Leave()
	c.Ticket.Leave()
	if n := l.Snapshot().WaitingByRole["app"]; n != 2 {
		t.Fatalf("%d waiting, want 2", n)
	}
	if isReady(a.Ticket) || isReady(b.Ticket) {
		t.Fatal("a departure woke someone")
	}
	// a is woken and disconnects before using it: the wake-up passes to b.
	l.Released("app", "d")
	a.Ticket.Leave()
	if !isReady(b.Ticket) {
		t.Fatal("b did not inherit a's wake-up")
	}
	if d := l.Decide(b, r, NoLimit(), nil); d.Kind != Admit {
		t.Fatalf("b: %v (%s)", d.Kind, d.Reason)
	}
	// A ticket that left is no ticket: the login starts over at the back.
	if d := l.Decide(a, r, NoLimit(), census); d.Kind != Wait || d.Ticket == a.Ticket {
		t.Fatalf("a after leaving: %v, same ticket %v", d.Kind, d.Ticket == a.Ticket)
	} else {
		d.Ticket.Leave()
	}
	var none *Ticket
	none.Leave() // nil-safe for deferred calls
}

func TestWaitTimeout(t *testing.T) {
	l, clk, r, census := waitSetup()
	a := login(1)
	a.Ticket = mustWait(t, l.Decide(a, r, NoLimit(), census))
	if got := a.Ticket.Deadline(); !got.Equal(t0.Add(10 * time.Second)) {
		t.Fatalf("deadline %v", got)
	}
	clk.Advance(9 * time.Second)
	if d := l.Decide(a, r, NoLimit(), census); d.Kind != Wait || d.Ticket != a.Ticket {
		t.Fatalf("before the deadline: %v", d.Kind)
	}
	if got := a.Ticket.Deadline(); !got.Equal(t0.Add(10 * time.Second)) {
		t.Fatalf("deadline moved to %v", got)
	}
	clk.Advance(time.Second)
	d := l.Decide(a, r, NoLimit(), census)
	if d.Kind != Reject || d.Scope != ScopeRole || !strings.Contains(d.Reason, "waited 10s, wait_timeout reached") {
		t.Fatalf("at the deadline: %v %v (%s)", d.Kind, d.Scope, d.Reason)
	}
	if n := l.Snapshot().WaitingByRole["app"]; n != 0 {
		t.Fatalf("%d still waiting", n)
	}
	c := l.Snapshot().Counters[CounterKey{"app", PolicyWait}]
	if c != (Counters{Waits: 1, Rejections: 1, WaitTimeouts: 1}) {
		t.Fatalf("counters %+v", c)
	}

	// A slot that frees by the deadline still admits.
	b := login(2)
	b.Ticket = mustWait(t, l.Decide(b, r, NoLimit(), census))
	clk.Advance(time.Hour)
	if d := l.Decide(b, r, NoLimit(), nil); d.Kind != Admit {
		t.Fatalf("b: %v (%s)", d.Kind, d.Reason)
	}
}

// TestWaitMovesBetweenLimits: a login that waited for its role and then finds
// its database full waits for the database, keeping its arrival order there.
func TestWaitMovesBetweenLimits(t *testing.T) {
	l := New(newClock().Now)
	role, db := rule(1, PolicyWait), rule(1, PolicyWait)
	a := login(1)
	a.Ticket = mustWait(t, l.Decide(a, role, db, []Holder{idle(1, "app", "other", time.Hour)}))
	// Someone of another role starts waiting for database d.
	x := Login{ID: 2, Role: "x", Database: "d"}
	full := []Holder{idle(1, "app", "other", time.Hour), idle(2, "y", "d", time.Hour)}
	x.Ticket = mustWait(t, l.Decide(x, NoLimit(), db, full))

	// The app session ends; a now waits for the database, ahead of x.
	d := l.Decide(a, role, db, []Holder{idle(2, "y", "d", time.Hour)})
	if d.Kind != Wait || d.Scope != ScopeDatabase {
		t.Fatalf("a: %v %v (%s)", d.Kind, d.Scope, d.Reason)
	}
	s := l.Snapshot()
	if s.WaitingByRole["app"] != 1 || s.WaitingByDatabase["d"] != 2 {
		t.Fatalf("waiting %v %v", s.WaitingByRole, s.WaitingByDatabase)
	}
	// The database frees: only its head (a) wakes, and x cannot go first.
	l.Released("y", "d")
	if !isReady(a.Ticket) || isReady(x.Ticket) {
		t.Fatalf("a %v x %v", isReady(a.Ticket), isReady(x.Ticket))
	}
	if d := l.Decide(x, NoLimit(), db, nil); d.Kind != Wait {
		t.Fatalf("x jumped: %v (%s)", d.Kind, d.Reason)
	}
	if d := l.Decide(a, role, db, nil); d.Kind != Admit {
		t.Fatalf("a: %v (%s)", d.Kind, d.Reason)
	}
	x.Ticket.Leave()
}

// TestLimitRemovedWakesAll: after a reload drops a limit, the next Decide
// wakes every waiter.
func TestLimitRemovedWakesAll(t *testing.T) {
	l, _, r, census := waitSetup()
	a, b := login(1), login(2)
	a.Ticket = mustWait(t, l.Decide(a, r, NoLimit(), census))
	b.Ticket = mustWait(t, l.Decide(b, r, NoLimit(), census))
	if d := l.Decide(login(3), NoLimit(), NoLimit(), census); d.Kind != Admit {
		t.Fatal(d.Kind)
	}
	if !isReady(a.Ticket) || !isReady(b.Ticket) {
		t.Fatal("waiters not woken")
	}
	a.Ticket.Leave()
	b.Ticket.Leave()
}

// TestReleasedWakesNextUnwoken: two sessions end, two waiters wake.
func TestReleasedWakesNextUnwoken(t *testing.T) {
	l, _, r, census := waitSetup()
	ts := make([]*Ticket, 3)
	for i := range ts {
		ts[i] = mustWait(t, l.Decide(login(uint64(i+1)), r, NoLimit(), census))
	}
	l.Released("app", "d")
	l.Released("app", "d")
	if !isReady(ts[0]) || !isReady(ts[1]) || isReady(ts[2]) {
		t.Fatalf("ready %v %v %v", isReady(ts[0]), isReady(ts[1]), isReady(ts[2]))
	}
	l.Released("other", "elsewhere") // no queue: nothing happens
	for _, tk := range ts {
		tk.Leave()
	}
}

// TestEvictingLoginPassesStalledLine: under an evicting policy, a login
// waiting in line behind an earlier waiter that has not acted is not
// rejected at its deadline (or at once, with wait_timeout 0) while a session
// could be evicted for it: it evicts for itself. FuzzDecide found this
// (testdata/fuzz/FuzzDecide/699222d54208ae09). Under policy wait the line
// still holds to the end.
func TestEvictingLoginPassesStalledLine(t *testing.T) {
	for _, c := range []struct {
		name    string
		timeout time.Duration
		policy  Policy
		want    Kind
	}{
		{"newest-wins at its deadline", 10 * time.Second, PolicyNewestWins, Evict},
		{"evict-idle at its deadline", 10 * time.Second, PolicyEvictIdle, Evict},
		{"newest-wins with wait_timeout 0", 0, PolicyNewestWins, Evict},
		{"wait at its deadline", 10 * time.Second, PolicyWait, Reject},
	} {
		t.Run(c.name, func(t *testing.T) {
			clk := newClock()
			l := New(clk.Now)
			r := Rule{MaxSessions: 2, Policy: c.policy, WaitTimeout: c.timeout}
			// a evicts pid 1 and, deciding again before its report, waits
			// for its own victim: it stands in line.
			census := []Holder{idle(1, "app", "d", time.Hour), idle(2, "app", "d", time.Minute)}
			a := login(1)
			if c.policy == PolicyWait {
				r.WaitTimeout = 10 * time.Second // a must be able to wait
				a.Ticket = mustWait(t, l.Decide(a, r, NoLimit(), census))
				r.WaitTimeout = c.timeout
			} else {
				da := l.Decide(a, r, NoLimit(), census)
				if da.Kind != Evict || da.Victims[0].PID != 1 {
					t.Fatalf("a: %v (%s)", da.Kind, da.Reason)
				}
				a.Ticket = da.Ticket
				r.WaitTimeout = 10 * time.Second // a waits for its own victim
				a.Ticket = mustWait(t, l.Decide(a, r, NoLimit(), census))
				r.WaitTimeout = c.timeout
			}
			// b arrives and finds a ahead of it.
			b := login(2)
			db := l.Decide(b, r, NoLimit(), census)
			if c.timeout > 0 {
				b.Ticket = mustWait(t, db)
				if !strings.Contains(db.Reason, "1 waiting before this login") {
					t.Fatalf("b: %s", db.Reason)
				}
				// a is slow to come back; b's wait runs out.
				clk.Advance(c.timeout)
				db = l.Decide(b, r, NoLimit(), census)
			}
			if db.Kind != c.want {
				t.Fatalf("b: %v (%s), want %v", db.Kind, db.Reason, c.want)
			}
			if c.want == Evict {
				if db.Victims[0].PID != 2 || !strings.Contains(db.Reason, "passed as this login may wait no longer") {
					t.Fatalf("b: victims %v (%s)", pids(db.Victims), db.Reason)
				}
				l.Evicted(2)
			}
			db.Ticket.Leave()
			l.Evicted(1)
			a.Ticket.Leave()
			if len(l.tickets) != 0 || len(l.queues) != 0 || len(l.evicting) != 0 {
				t.Fatalf("left behind: tickets %d queues %d evicting %d", len(l.tickets), len(l.queues), len(l.evicting))
			}
		})
	}
}

// Position is a ticket's place in its line, and moves up when a login ahead
// leaves; a ticket not in line has none.
func TestTicketPosition(t *testing.T) {
	l, _, r, census := waitSetup()
	a, b, c := login(1), login(2), login(3)
	a.Ticket = mustWait(t, l.Decide(a, r, NoLimit(), census))
	b.Ticket = mustWait(t, l.Decide(b, r, NoLimit(), census))
	c.Ticket = mustWait(t, l.Decide(c, r, NoLimit(), census))
	if got := []int{a.Ticket.Position(), b.Ticket.Position(), c.Ticket.Position()}; got[0] != 1 || got[1] != 2 || got[2] != 3 {
		t.Fatalf("positions %v, want [1 2 3]", got)
	}
	b.Ticket.Leave()
	if pa, pb, pc := a.Ticket.Position(), b.Ticket.Position(), c.Ticket.Position(); pa != 1 || pb != 0 || pc != 2 {
		t.Fatalf("after b left: a %d b %d c %d, want 1 0 2", pa, pb, pc)
	}
	if d := l.Decide(a, r, NoLimit(), without(census, 1)); d.Kind != Admit {
		t.Fatalf("a: %v (%s)", d.Kind, d.Reason)
	}
	if pa, pc := a.Ticket.Position(), c.Ticket.Position(); pa != 0 || pc != 1 {
		t.Fatalf("after a was admitted: a %d c %d, want 0 1", pa, pc)
	}
	var none *Ticket
	if none.Position() != 0 {
		t.Fatal("a nil ticket has a position")
	}
	c.Ticket.Leave()
}
