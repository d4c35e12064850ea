package limiter

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"
)

// A reservation holds a slot until it is released; a failed login's release
// wakes the first waiter, a login that reached the census wakes nobody.
func TestReservationCounts(t *testing.T) {
	l, _, r, census := waitSetup() // limit 1, pid 1 holds it
	free := without(census, 1)
	a := login(1)
	if d := l.Decide(a, r, NoLimit(), free); d.Kind != Admit {
		t.Fatalf("a: %v (%s)", d.Kind, d.Reason)
	}
	res := l.Reserve(a)

	// a is logging in and not in the census yet: b must not get its slot.
	b := login(2)
	d := l.Decide(b, r, NoLimit(), free)
	b.Ticket = mustWait(t, d)
	if !strings.Contains(d.Reason, "1 session, 1 logging in") {
		t.Errorf("reason %q does not show the login in progress", d.Reason)
	}
	// Under reject the same census refuses.
	if d := l.Decide(login(3), rule(1, PolicyReject), NoLimit(), free); d.Kind != Reject {
		t.Fatalf("reject policy: %v (%s)", d.Kind, d.Reason)
	}

	// a's login failed: the slot frees and b, first in line, is woken.
	res.Release(false)
	if !ready(b.Ticket) {
		t.Fatal("b not woken by a failed login's release")
	}
	res.Release(false) // a second release does nothing
	if d := l.Decide(b, r, NoLimit(), free); d.Kind != Admit {
		t.Fatalf("b: %v (%s)", d.Kind, d.Reason)
	}
	resB := l.Reserve(b)

	// c waits; b's backend reaches the census and its reservation passes
	// the slot on to it: nobody is woken, and the slot is counted once.
	c := login(3)
	c.Ticket = mustWait(t, l.Decide(c, r, NoLimit(), free))
	withB := append(free, idle(2, "app", "d", 0))
	resB.Release(true)
	if isReady(c.Ticket) {
		t.Fatal("c woken by a login that took its slot")
	}
	if d := l.Decide(c, r, NoLimit(), withB); d.Kind != Wait || !strings.Contains(d.Reason, "(1 session)") {
		t.Fatalf("c: %v (%s)", d.Kind, d.Reason)
	}
	c.Ticket.Leave()
	var nilRes *Reservation
	nilRes.Release(true) // nil-safe
	if len(l.reserved) != 0 {
		t.Fatalf("%d reservations left", len(l.reserved))
	}
}

// Reservations count against the database limit of their database too, and
// only against their own role and database.
func TestReservationScopes(t *testing.T) {
	l := New(newClock().Now)
	res := l.Reserve(Login{ID: 1, Role: "app", Database: "d"})
	defer res.Release(false)
	db1 := rule(1, PolicyReject)
	if d := l.Decide(Login{ID: 2, Role: "other", Database: "d"}, NoLimit(), db1, nil); d.Kind != Reject || d.Scope != ScopeDatabase {
		t.Fatalf("same database: %v %v (%s)", d.Kind, d.Scope, d.Reason)
	}
	if d := l.Decide(Login{ID: 3, Role: "other", Database: "e"}, rule(1, PolicyReject), db1, nil); d.Kind != Admit {
		t.Fatalf("another role and database: %v (%s)", d.Kind, d.Reason)
	}
}

// Another instance's reservation is a census row with Reserved: counted and
// never evicted. Under newest-wins the login waits for it to land as a
// session (to evict that), unless min_session_age would spare the session
// anyway: then the fallback decides, and the reason names the login in flight.
func TestReservedHolderNeverEvicted(t *testing.T) {
	l := New(newClock().Now)
	census := []Holder{{Role: "app", Reserved: true}}
	d := l.Decide(login(1), rule(1, PolicyNewestWins), NoLimit(), census)
	if d.Kind != Wait || len(d.Victims) != 0 || !strings.Contains(d.Reason, "1 login in flight") {
		t.Fatalf("got %v %v (%s)", d.Kind, pids(d.Victims), d.Reason)
	}
	d.Ticket.Leave()
	r := rule(1, PolicyNewestWins)
	r.MinSessionAge = time.Minute
	d = l.Decide(login(2), r, NoLimit(), census)
	if d.Kind != Reject || !strings.Contains(d.Reason, "1 still logging in") {
		t.Fatalf("with min_session_age: got %v (%s)", d.Kind, d.Reason)
	}
}

// A newest-wins login that finds its role's slots held by logins still
// logging in (this instance's reservations) waits for one to land, whatever
// its wait_timeout, is woken when it does, and then evicts it.
func TestEvictAfterLanding(t *testing.T) {
	for _, p := range []Policy{PolicyNewestWins, PolicyEvictIdle} {
		t.Run(p.String(), func(t *testing.T) {
			l := New(newClock().Now)
			r := Rule{MaxSessions: 1, Policy: p} // wait_timeout 0: it may not wait for a slot
			first := login(1)
			if d := l.Decide(first, r, NoLimit(), nil); d.Kind != Admit {
				t.Fatalf("first login: %v (%s)", d.Kind, d.Reason)
			}
			res := l.Reserve(first)
			second := login(2)
			second.CensusEpoch = l.Epoch()
			d := l.Decide(second, r, NoLimit(), nil)
			if d.Kind != Wait || d.Ticket == nil || !d.Ticket.Deadline().IsZero() {
				t.Fatalf("second login: %v (%s)", d.Kind, d.Reason)
			}
			second.Ticket = d.Ticket
			if ready(d.Ticket) {
				t.Fatal("woken before the first login landed")
			}
			res.Release(true)
			if !ready(d.Ticket) {
				t.Fatal("not woken when the first login landed")
			}
			second.CensusEpoch = l.Epoch()
			landed := idle(7, "app", "d", 0)
			d = l.Decide(second, r, NoLimit(), []Holder{landed})
			if d.Kind != Evict || !slices.Equal(pids(d.Victims), []uint32{7}) {
				t.Fatalf("after landing: %v %v (%s)", d.Kind, pids(d.Victims), d.Reason)
			}
			l.Evicted(7)
			second.Ticket = d.Ticket
			if d := l.Decide(second, r, NoLimit(), nil); d.Kind != Admit {
				t.Fatalf("after the eviction: %v (%s)", d.Kind, d.Reason)
			}
		})
	}
}

// A login in flight that fails frees its slot: the login waiting for it to
// land is woken and admitted.
func TestLandingFailed(t *testing.T) {
	l := New(newClock().Now)
	r := Rule{MaxSessions: 1, Policy: PolicyNewestWins}
	res := l.Reserve(login(1))
	second := login(2)
	d := l.Decide(second, r, NoLimit(), nil)
	second.Ticket = mustWait(t, d)
	res.Release(false)
	if !ready(d.Ticket) {
		t.Fatal("not woken when the login in flight failed")
	}
	if d := l.Decide(second, r, NoLimit(), nil); d.Kind != Admit {
		t.Fatalf("got %v (%s)", d.Kind, d.Reason)
	}
}

// A login that lands wakes only logins waiting to evict it, not those
// waiting for a slot under policy wait (the slot is not free).
func TestLandingWakesOnlyEvictors(t *testing.T) {
	l := New(newClock().Now)
	res := l.Reserve(login(1))
	w := login(2)
	w.Ticket = mustWait(t, l.Decide(w, rule(1, PolicyWait), NoLimit(), nil))
	res.Release(true)
	if ready(w.Ticket) {
		t.Fatal("a waiter under policy wait was woken by a login landing")
	}
	w.Ticket.Leave()
}

// Only the first waiter is First; when it leaves, the next is signalled and
// becomes First.
func TestFirstWaiter(t *testing.T) {
	l, _, r, census := waitSetup()
	a, b := login(1), login(2)
	a.Ticket = mustWait(t, l.Decide(a, r, NoLimit(), census))
	b.Ticket = mustWait(t, l.Decide(b, r, NoLimit(), census))
	if !a.Ticket.First() || b.Ticket.First() {
		t.Fatalf("first: a %v b %v", a.Ticket.First(), b.Ticket.First())
	}
	if ready(b.Ticket) {
		t.Fatal("b signalled while a waits")
	}
	a.Ticket.Leave()
	if !ready(b.Ticket) || !b.Ticket.First() {
		t.Fatal("b not signalled as the new first waiter")
	}
	b.Ticket.Leave()
}

// A login whose admission broke off with an eviction unreported (a panic)
// abandons its ticket: the victim no longer holds a slot in the books once
// it has left the census.
func TestAbandonForgetsEvictions(t *testing.T) {
	l := New(newClock().Now)
	census := []Holder{idle(1, "app", "d", time.Hour)}
	nw := rule(1, PolicyNewestWins)
	a := login(1)
	d := l.Decide(a, nw, NoLimit(), census)
	if d.Kind != Evict {
		t.Fatalf("a: %v (%s)", d.Kind, d.Reason)
	}
	d.Ticket.Abandon()
	if s := l.Snapshot(); len(s.Evicting) != 0 || s.Counters[CounterKey{"app", PolicyNewestWins}].EvictFailures != 1 {
		t.Fatalf("after Abandon: %+v", s)
	}
	// The victim is gone: the next login gets its slot.
	if d := l.Decide(login(2), nw, NoLimit(), nil); d.Kind != Admit {
		t.Fatalf("next login: %v (%s)", d.Kind, d.Reason)
	}
	var none *Ticket
	none.Abandon() // nil-safe
}

// A census read before an admitted login's backend appeared, with the
// login's reservation released (as logged in) before Decide: the login must
// still count, or one login too many gets in. A census read after the
// release counts the backend and not the reservation.
func TestReservationLandedDuringCensus(t *testing.T) {
	l := New(nil)
	r := rule(1, PolicyReject)
	a := login(1)
	if d := l.Decide(a, r, NoLimit(), nil); d.Kind != Admit {
		t.Fatalf("a: %v (%s)", d.Kind, d.Reason)
	}
	res := l.Reserve(a)

	b := login(2)
	b.CensusEpoch = l.Epoch() // b's census starts: a's backend is not in it yet
	res.Release(true)         // a reaches ReadyForQuery while b's census runs
	if d := l.Decide(b, r, NoLimit(), nil); d.Kind != Reject {
		t.Fatalf("b, whose census missed a's backend: %v (%s), want a rejection", d.Kind, d.Reason)
	}

	c := login(3)
	c.CensusEpoch = l.Epoch() // after the release: a's backend is in c's census
	withA := []Holder{idle(10, "app", "d", 0)}
	d := l.Decide(c, r, NoLimit(), withA)
	if d.Kind != Reject || !strings.Contains(d.Reason, "(1 session)") {
		t.Fatalf("c: %v (%s), want a rejection counting 1 session", d.Kind, d.Reason)
	}
	if d := l.Decide(login(4), r, NoLimit(), nil); d.Kind != Admit {
		t.Fatalf("a login that does not track the epoch, on an empty census: %v (%s)", d.Kind, d.Reason)
	}
}

// A login in flight whose backend is in the census already is counted once,
// by its row, and is not a victim: the login waiting to evict it waits for
// it to land, then evicts it (counted once again, by its row).
func TestReservationRecognizedInCensus(t *testing.T) {
	l := New(newClock().Now)
	r := Rule{MaxSessions: 2, Policy: PolicyNewestWins}
	addr := netip.MustParseAddrPort("127.0.0.1:50001")
	old := idle(3, "app", "d", time.Hour)
	res := l.Reserve(login(1))
	res.Identify(addr, 0)
	mine := idle(7, "app", "d", 0)
	mine.Client = addr
	census := []Holder{old, mine}
	// Counted twice, the role would hold 3 slots of 2 and the login would
	// evict both pid 3 and the login in flight; counted once it evicts pid 3.
	d := l.Decide(login(2), r, NoLimit(), census)
	if d.Kind != Evict || !slices.Equal(pids(d.Victims), []uint32{3}) {
		t.Fatalf("got %v %v (%s)", d.Kind, pids(d.Victims), d.Reason)
	}
	l.Evicted(3)
	third := login(3)
	third.CensusEpoch = l.Epoch()
	d = l.Decide(third, r, NoLimit(), []Holder{mine})
	if d.Kind != Admit {
		t.Fatalf("with one slot free: %v (%s)", d.Kind, d.Reason)
	}
	res2 := l.Reserve(third)
	fourth := login(4)
	fourth.CensusEpoch = l.Epoch()
	d = l.Decide(fourth, r, NoLimit(), []Holder{mine})
	if d.Kind != Wait || !d.Landing || !strings.Contains(d.Reason, "2 logging in") {
		t.Fatalf("both slots in flight: %v (%s)", d.Kind, d.Reason)
	}
	fourth.Ticket = d.Ticket
	res.Identify(netip.AddrPort{}, 7)
	res.Release(true) // after the census below was started: counted once, by its row
	// The third login is in flight and not recognized in the census: its
	// backend may be a row already, so the login does not evict pid 7 for
	// it yet but waits for it to land.
	d = l.Decide(fourth, r, NoLimit(), []Holder{mine})
	if d.Kind != Wait || !d.Landing || !strings.Contains(d.Reason, "2 sessions, 1 logging in") {
		t.Fatalf("one landed, one in flight: %v %v (%s)", d.Kind, pids(d.Victims), d.Reason)
	}
	// Recognized, it holds its slot as a login in flight: the login evicts
	// the older session, pid 7.
	theirs := idle(8, "app", "d", 0)
	res2.Identify(netip.AddrPort{}, 8)
	d = l.Decide(fourth, r, NoLimit(), []Holder{mine, theirs})
	if d.Kind != Evict || !slices.Equal(pids(d.Victims), []uint32{7}) {
		t.Fatalf("the third login recognized: %v %v (%s)", d.Kind, pids(d.Victims), d.Reason)
	}
	l.Evicted(7)
	res2.Release(false)
	d.Ticket.Leave()
}

// Another instance's login landing (Landed) wakes a login waiting to evict
// a login in flight, and only such a login.
func TestLandedElsewhere(t *testing.T) {
	l := New(newClock().Now)
	census := []Holder{{Role: "app", Reserved: true}}
	evictor := login(1)
	evictor.Ticket = mustWait(t, l.Decide(evictor, rule(1, PolicyNewestWins), NoLimit(), census))
	waiter := login(2)
	waiter.Ticket = mustWait(t, l.Decide(waiter, rule(1, PolicyWait), NoLimit(), census))
	l.Landed("app", "d")
	if !ready(evictor.Ticket) || ready(waiter.Ticket) {
		t.Fatalf("after Landed: evictor woken %v, waiter woken %v; want true, false", ready(evictor.Ticket), ready(waiter.Ticket))
	}
	evictor.Ticket.Leave()
	waiter.Ticket.Leave()
}
