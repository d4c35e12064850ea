package limiter

import (
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

// Another instance's reservation is a census row with Reserved: counted,
// never evicted, and named in the reason.
func TestReservedHolderNeverEvicted(t *testing.T) {
	l := New(newClock().Now)
	census := []Holder{{Role: "app", Reserved: true}}
	d := l.Decide(login(1), rule(1, PolicyNewestWins), NoLimit(), census)
	if d.Kind != Reject || !strings.Contains(d.Reason, "1 still logging in") {
		t.Fatalf("got %v (%s)", d.Kind, d.Reason)
	}
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
