package limiter

import (
	"maps"
	"testing"
	"time"
)

func TestSnapshotCounters(t *testing.T) {
	clk := newClock()
	l := New(clk.Now)
	nw := rule(2, PolicyNewestWins)

	// newest-wins: evict, fail, evict another, succeed, admit.
	a := Login{ID: 1, Role: "app", Database: "d"}
	census := []Holder{idle(1, "app", "d", time.Hour), idle(9, "app", "d", time.Minute)}
	d := l.Decide(a, nw, NoLimit(), census)
	a.Ticket = d.Ticket
	if s := l.Snapshot(); len(s.Evicting) != 1 || s.Evicting[0] != (Eviction{
		Victim: census[0], LoginID: 1, Role: "app", Scope: ScopeRole, Policy: PolicyNewestWins, Since: t0}) {
		t.Fatalf("evicting %+v", s.Evicting)
	}
	l.EvictFailed(1)
	if d = l.Decide(a, nw, NoLimit(), census); d.Kind != Evict || d.Victims[0].PID != 9 {
		t.Fatalf("%v %+v (%s)", d.Kind, d.Victims, d.Reason)
	}
	a.Ticket = d.Ticket
	l.Evicted(9)
	if d := l.Decide(a, nw, NoLimit(), census[:1]); d.Kind != Admit {
		t.Fatal(d.Kind)
	}

	// wait: one wait however often it re-decides, then a timeout.
	w := Login{ID: 2, Role: "w", Database: "d"}
	wr := rule(1, PolicyWait)
	wc := []Holder{idle(2, "w", "d", time.Hour)}
	w.Ticket = l.Decide(w, wr, NoLimit(), wc).Ticket
	w.Ticket = l.Decide(w, wr, NoLimit(), wc).Ticket
	clk.Advance(wr.WaitTimeout)
	if d := l.Decide(w, wr, NoLimit(), wc); d.Kind != Reject {
		t.Fatal(d.Kind)
	}

	// A database decision counts under the login's role and the database's policy.
	if d := l.Decide(Login{ID: 3, Role: "x", Database: "full"}, NoLimit(), rule(0, PolicyReject), nil); d.Kind != Reject {
		t.Fatal(d.Kind)
	}
	// Exempt logins count as admissions under their role's policy.
	l.Decide(Login{ID: 4, Role: "postgres", Database: "d", Superuser: true}, rule(0, PolicyEvictIdle), rule(0, PolicyReject), nil)

	want := map[CounterKey]Counters{
		{"app", PolicyNewestWins}:     {Admitted: 1, Evictions: 2, EvictFailures: 1},
		{"w", PolicyWait}:             {Waits: 1, Rejections: 1, WaitTimeouts: 1},
		{"x", PolicyReject}:           {Rejections: 1},
		{"postgres", PolicyEvictIdle}: {Admitted: 1},
	}
	s := l.Snapshot()
	if !maps.Equal(s.Counters, want) {
		t.Fatalf("counters\n got %+v\nwant %+v", s.Counters, want)
	}
	if !s.Taken.Equal(t0.Add(wr.WaitTimeout)) || len(s.Evicting) != 0 || len(s.WaitingByRole) != 0 {
		t.Fatalf("snapshot %+v", s)
	}

	// A snapshot is a copy.
	s.Counters[CounterKey{"app", PolicyNewestWins}] = Counters{}
	w2 := Login{ID: 5, Role: "w", Database: "d"}
	tk := l.Decide(w2, wr, NoLimit(), wc).Ticket
	s2 := l.Snapshot()
	s2.WaitingByRole["w"] = 99
	if s3 := l.Snapshot(); s3.Counters[CounterKey{"app", PolicyNewestWins}].Admitted != 1 || s3.WaitingByRole["w"] != 1 {
		t.Fatalf("snapshot shares state: %+v", s3)
	}
	tk.Leave()
}
