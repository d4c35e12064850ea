package limiter

import (
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

// A dry-run rule decides as it would, counts and reports the decision, and
// admits the login: nobody is handed out as a victim, nobody waits.
func TestDecideDryRun(t *testing.T) {
	t.Parallel()
	clk := newClock()
	l := New(clk.Now)
	census := []Holder{idle(10, "app", "db", time.Hour), idle(11, "app", "db", time.Minute)}
	census[0].ApplicationName = "psql"
	for _, c := range []struct {
		policy   Policy
		wantKind Kind
		count    func(Counters) uint64
	}{
		{PolicyNewestWins, Evict, func(c Counters) uint64 { return c.DryRunEvictions }},
		{PolicyReject, Reject, func(c Counters) uint64 { return c.DryRunRejections }},
		{PolicyWait, Wait, func(c Counters) uint64 { return c.DryRunWaits }},
	} {
		r := rule(2, c.policy)
		r.DryRun = true
		d := l.Decide(Login{ID: 1, Role: "app", Database: "db"}, r, NoLimit(), census)
		if d.Kind != Admit || d.Ticket != nil || len(d.Victims) != 0 {
			t.Fatalf("%s dry run: %v %v ticket %v; want a plain Admit", c.policy, d.Kind, pids(d.Victims), d.Ticket)
		}
		if len(d.Would) != 1 || d.Would[0].Kind != c.wantKind || d.Would[0].Scope != ScopeRole || d.Would[0].Limit != 2 {
			t.Fatalf("%s dry run: Would = %+v; want one %v for the role limit", c.policy, d.Would, c.wantKind)
		}
		if c.policy == PolicyNewestWins {
			w := d.Would[0]
			if !slices.Equal(pids(w.Victims), []uint32{10}) || !strings.Contains(w.Reason, `pid 10 (age 1h0m0s, application "psql")`) {
				t.Errorf("would evict %v, reason %q; want pid 10, named with its application", pids(w.Victims), w.Reason)
			}
		}
		snap := l.Snapshot()
		if got := c.count(snap.Counters[CounterKey{"app", c.policy}]); got != 1 {
			t.Errorf("%s dry run counted %d times, want 1", c.policy, got)
		}
		if len(snap.Evicting) != 0 || snap.WaitingByRole["app"] != 0 {
			t.Errorf("%s dry run left state: evicting %v, waiting %d", c.policy, snap.Evicting, snap.WaitingByRole["app"])
		}
	}
	// A real database limit still decides when the role's rule is a dry run.
	r := rule(2, PolicyNewestWins)
	r.DryRun = true
	d := l.Decide(Login{ID: 2, Role: "app", Database: "db"}, r, rule(2, PolicyReject), census)
	if d.Kind != Reject || d.Scope != ScopeDatabase || len(d.Would) != 1 {
		t.Errorf("dry-run role, full real database: %v %v would %d; want the database's Reject and the role's would-evict", d.Kind, d.Scope, len(d.Would))
	}
}

// Explain answers what Decide would, and changes nothing.
func TestExplainChangesNothing(t *testing.T) {
	t.Parallel()
	clk := newClock()
	l := New(clk.Now)
	census := []Holder{idle(10, "app", "db", time.Hour), idle(11, "app", "db", time.Minute)}
	before := l.Snapshot()
	for _, p := range []Policy{PolicyNewestWins, PolicyReject, PolicyWait, PolicyEvictIdle} {
		e := l.Explain(Login{Role: "app", Database: "db"}, rule(2, p), NoLimit(), census)
		if e.Ticket != nil {
			t.Errorf("%s: Explain handed out a ticket", p)
		}
		if after := l.Snapshot(); !reflect.DeepEqual(before, after) {
			t.Fatalf("%s: Explain changed the limiter:\n%+v\n%+v", p, before, after)
		}
		d := l.Decide(Login{ID: 1, Role: "app", Database: "db"}, rule(2, p), NoLimit(), census)
		if d.Kind != e.Kind || !slices.Equal(pids(d.Victims), pids(e.Victims)) || d.Reason != e.Reason {
			t.Errorf("%s: Explain %v %v %q, Decide %v %v %q", p, e.Kind, pids(e.Victims), e.Reason, d.Kind, pids(d.Victims), d.Reason)
		}
		d.Ticket.Leave()
		for _, v := range d.Victims {
			l.EvictFailed(v.PID)
		}
		before = l.Snapshot()
	}
	// A login waiting in line is seen by Explain, which would wait behind it.
	w := l.Decide(Login{ID: 2, Role: "app", Database: "db"}, rule(2, PolicyWait), NoLimit(), census)
	defer w.Ticket.Leave()
	e := l.Explain(Login{Role: "app", Database: "db"}, rule(3, PolicyWait), NoLimit(), census)
	if e.Kind != Wait || !strings.Contains(e.Reason, "1 waiting before this login") {
		t.Errorf("Explain behind a waiter: %v %q; want Wait behind it", e.Kind, e.Reason)
	}
}

// evict_scope narrows the victims to the login's application or client;
// with none in scope the fallback decides.
func TestDecideEvictScope(t *testing.T) {
	t.Parallel()
	l := New(newClock().Now)
	a := idle(10, "app", "db", time.Hour)
	a.ApplicationName, a.Client = "billing", netip.MustParseAddrPort("10.0.0.1:4000")
	b := idle(11, "app", "db", time.Minute)
	b.ApplicationName, b.Client = "psql", netip.MustParseAddrPort("10.0.0.2:4000")
	// A session rolegate relays: its census address is rolegate's, its origin the client's.
	c := idle(12, "app", "db", 2*time.Minute)
	c.ApplicationName, c.Client, c.Origin = "psql", netip.MustParseAddrPort("127.0.0.1:5000"), netip.MustParseAddr("10.0.0.1")
	census := []Holder{a, b, c}
	for _, tc := range []struct {
		scope  EvictScope
		app    string
		client string
		want   []uint32 // nil: the fallback rejects
	}{
		{EvictAny, "psql", "10.0.0.9", []uint32{10}},
		{EvictSameApplication, "psql", "10.0.0.9", []uint32{12}},
		{EvictSameApplication, "billing", "10.0.0.9", []uint32{10}},
		{EvictSameApplication, "other", "10.0.0.1", nil},
		{EvictSameClient, "x", "10.0.0.2", []uint32{11}},
		{EvictSameClient, "x", "10.0.0.1", []uint32{10}},
		{EvictSameClient, "x", "::ffff:10.0.0.2", []uint32{11}},
		{EvictSameClient, "x", "10.0.0.3", nil},
	} {
		r := rule(3, PolicyNewestWins)
		r.EvictScope = tc.scope
		login := Login{Role: "app", Database: "db", ApplicationName: tc.app, Client: netip.MustParseAddr(tc.client)}
		d := l.Explain(login, r, NoLimit(), census)
		switch {
		case tc.want == nil && (d.Kind != Reject || !d.Fallback || !strings.Contains(d.Reason, "outside evict_scope "+string(tc.scope))):
			t.Errorf("%s for %s@%s: %v %q; want the fallback's Reject naming the scope", tc.scope, tc.app, tc.client, d.Kind, d.Reason)
		case tc.want != nil && (d.Kind != Evict || !slices.Equal(pids(d.Victims), tc.want)):
			t.Errorf("%s for %s@%s: %v %v; want Evict %v", tc.scope, tc.app, tc.client, d.Kind, pids(d.Victims), tc.want)
		}
	}
}

// Past its eviction budget a limit's fallback decides, the limit is
// reported as thrashing with the clients that spent the budget, and once
// the window has passed it evicts again.
func TestDecideBudget(t *testing.T) {
	t.Parallel()
	clk := newClock()
	l := New(clk.Now)
	r := rule(1, PolicyNewestWins)
	r.Budget = Budget{Evictions: 2, Per: time.Minute}
	pid := uint32(100)
	login := func(id uint64) Decision {
		census := []Holder{idle(pid, "app", "db", time.Hour)}
		return l.Decide(Login{ID: id, Role: "app", Database: "db", ApplicationName: "pool",
			Client: netip.MustParseAddr("10.9.9.9")}, r, NoLimit(), census)
	}
	for i := range 2 {
		d := login(uint64(i))
		if d.Kind != Evict {
			t.Fatalf("eviction %d within the budget: %v %q", i+1, d.Kind, d.Reason)
		}
		l.Evicted(d.Victims[0].PID)
		pid++
		clk.Advance(time.Second)
	}
	d := login(3)
	if d.Kind != Reject || !d.Fallback || !d.Thrashing || !strings.Contains(d.Reason, "max_evictions 2/min spent") {
		t.Fatalf("third eviction in a minute: %v fallback %v thrashing %v %q; want the fallback's Reject for the budget", d.Kind, d.Fallback, d.Thrashing, d.Reason)
	}
	if !slices.Equal(d.Evictors, []string{"pool@10.9.9.9"}) {
		t.Errorf("evictors %v, want [pool@10.9.9.9]", d.Evictors)
	}
	snap := l.Snapshot()
	if len(snap.Thrashing) != 1 || snap.Thrashing[0].Name != "app" || snap.Thrashing[0].Scope != ScopeRole {
		t.Errorf("Snapshot.Thrashing = %+v; want role app", snap.Thrashing)
	}
	if c := snap.Counters[CounterKey{"app", PolicyNewestWins}]; c.BudgetFallbacks != 1 || c.Evictions != 2 {
		t.Errorf("counters %+v; want 2 evictions and 1 budget fallback", c)
	}
	clk.Advance(time.Minute)
	if d := login(4); d.Kind != Evict {
		t.Errorf("after the window: %v %q; want Evict", d.Kind, d.Reason)
	} else {
		l.Evicted(d.Victims[0].PID)
	}
	if snap := l.Snapshot(); len(snap.Thrashing) != 0 {
		t.Errorf("still thrashing a window later: %+v", snap.Thrashing)
	}
}

func TestParseBudget(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		in   string
		want Budget
		err  bool
	}{
		{"30/min", Budget{30, time.Minute}, false},
		{"5/s", Budget{5, time.Second}, false},
		{"100/hour", Budget{100, time.Hour}, false},
		{"10/30s", Budget{10, 30 * time.Second}, false},
		{"off", Budget{}, false},
		{"0/min", Budget{0, time.Minute}, false},
		{"30", Budget{}, true},
		{"-1/min", Budget{}, true},
		{"3/fortnight", Budget{}, true},
		{"3/-1s", Budget{}, true},
	} {
		b, err := ParseBudget(c.in)
		if (err != nil) != c.err || b != c.want {
			t.Errorf("ParseBudget(%q) = %v, %v; want %v, error %v", c.in, b, err, c.want, c.err)
		}
	}
	if s := (Budget{30, time.Minute}).String(); s != "30/min" {
		t.Errorf("String = %q", s)
	}
}

// A login that decides again while it waits is told (and counted) once:
// its dry-run decisions, and its turn-away by a spent eviction budget.
func TestDecideCountsOncePerLogin(t *testing.T) {
	t.Parallel()
	clk := newClock()
	l := New(clk.Now)
	census := []Holder{idle(10, "app", "db", time.Hour)}
	dry := rule(1, PolicyNewestWins)
	dry.DryRun = true
	login := Login{ID: 1, Role: "app", Database: "db"}
	d := l.Decide(login, dry, rule(1, PolicyWait), census)
	if d.Kind != Wait || len(d.Would) != 1 {
		t.Fatalf("first decision: %v would %d; want the database's Wait and the role's would-evict", d.Kind, len(d.Would))
	}
	login.Ticket = d.Ticket
	d = l.Decide(login, dry, rule(1, PolicyWait), census)
	if d.Kind != Wait || len(d.Would) != 0 {
		t.Errorf("second decision: %v would %d; want Wait, told nothing again", d.Kind, len(d.Would))
	}
	d.Ticket.Leave()
	if c := l.Snapshot().Counters[CounterKey{"app", PolicyNewestWins}]; c.DryRunEvictions != 1 {
		t.Errorf("dry-run evictions %d, want 1", c.DryRunEvictions)
	}

	r := rule(1, PolicyNewestWins)
	r.Fallback, r.Budget = PolicyWait, Budget{Evictions: 0, Per: time.Minute}
	login = Login{ID: 2, Role: "pool", Database: "db"}
	census = []Holder{idle(20, "pool", "db", time.Hour)}
	for range 3 {
		d = l.Decide(login, r, NoLimit(), census)
		if d.Kind != Wait || !d.Thrashing {
			t.Fatalf("budget 0: %v thrashing %v; want the fallback's Wait", d.Kind, d.Thrashing)
		}
		login.Ticket = d.Ticket
	}
	d.Ticket.Leave()
	if c := l.Snapshot().Counters[CounterKey{"pool", PolicyNewestWins}]; c.BudgetFallbacks != 1 {
		t.Errorf("budget fallbacks %d for one login, want 1", c.BudgetFallbacks)
	}
}

// A dry run books its would-be evictions against a budget of its own: it
// shows when the budget would stop the policy, the limit is not reported
// as thrashing (nothing was evicted), and going live starts with the whole
// budget.
func TestDryRunBudgetApart(t *testing.T) {
	t.Parallel()
	l := New(newClock().Now)
	r := rule(1, PolicyNewestWins)
	r.Budget, r.DryRun = Budget{Evictions: 1, Per: time.Hour}, true
	census := []Holder{idle(10, "app", "db", time.Hour)}
	for i, wantThrash := range []bool{false, true} {
		d := l.Decide(Login{ID: uint64(i), Role: "app", Database: "db"}, r, NoLimit(), census)
		if d.Kind != Admit || len(d.Would) != 1 || d.Would[0].Thrashing != wantThrash {
			t.Fatalf("dry run %d: %v would %+v; want Admit, thrashing %v", i, d.Kind, d.Would, wantThrash)
		}
	}
	if snap := l.Snapshot(); len(snap.Thrashing) != 0 {
		t.Errorf("a dry run reported as thrashing: %+v", snap.Thrashing)
	}
	r.DryRun = false
	if d := l.Decide(Login{ID: 9, Role: "app", Database: "db"}, r, NoLimit(), census); d.Kind != Evict {
		t.Errorf("live after the dry run: %v %q; want Evict with the whole budget", d.Kind, d.Reason)
	}
}
