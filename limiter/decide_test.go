package limiter

import (
	"slices"
	"strings"
	"testing"
	"time"
)

func TestEffective(t *testing.T) {
	for _, c := range []struct{ config, server, want int }{
		{-1, -1, -1},
		{5, -1, 5},
		{-1, 3, 3},
		{5, 3, 3},
		{2, 7, 2},
		{0, 5, 0},
		{5, 0, 0},
		{-7, -3, -1},
		{-7, 4, 4},
	} {
		if got := Effective(c.config, c.server); got != c.want {
			t.Errorf("Effective(%d, %d) = %d, want %d", c.config, c.server, got, c.want)
		}
	}
}

func TestParsePolicy(t *testing.T) {
	for _, s := range []string{"reject", "wait", "newest-wins", "evict-idle"} {
		p, err := ParsePolicy(s)
		if err != nil || string(p) != s {
			t.Errorf("ParsePolicy(%q) = %q, %v", s, p, err)
		}
	}
	for _, s := range []string{"", "Reject", " wait", "newest_wins", "evict"} {
		if p, err := ParsePolicy(s); err == nil {
			t.Errorf("ParsePolicy(%q) = %q, want an error", s, p)
		}
	}
}

func TestRuleValidate(t *testing.T) {
	good := Rule{MaxSessions: 1, Policy: PolicyNewestWins, Fallback: PolicyWait, MinSessionAge: time.Second, WaitTimeout: time.Second}
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	if err := NoLimit().Validate(); err != nil || NoLimit().Limited() {
		t.Fatalf("NoLimit: %v, limited %v", err, NoLimit().Limited())
	}
	for name, r := range map[string]Rule{
		"policy":   {Policy: "oldest-wins"},
		"fallback": {Policy: PolicyEvictIdle, Fallback: PolicyNewestWins},
		"age":      {Policy: PolicyReject, MinSessionAge: -time.Second},
		"timeout":  {Policy: PolicyWait, WaitTimeout: -time.Second},
	} {
		if err := r.Validate(); err == nil || !strings.Contains(err.Error(), map[string]string{
			"policy": "policy", "fallback": "fallback", "age": "min_session_age", "timeout": "wait_timeout"}[name]) {
			t.Errorf("%s: Validate() = %v", name, err)
		}
	}
}

func TestDecide(t *testing.T) {
	const m = time.Minute
	app := func(l Login) Login {
		if l.Role == "" {
			l.Role = "app"
		}
		if l.Database == "" {
			l.Database = "d"
		}
		return l
	}
	withMinAge := func(r Rule, d time.Duration) Rule { r.MinSessionAge = d; return r }
	withFallback := func(r Rule, p Policy) Rule { r.Fallback = p; return r }
	super := func(h Holder) Holder { h.Superuser = true; return h }
	repl := func(h Holder) Holder { h.Replication = true; return h }
	prot := func(h Holder) Holder { h.Protected = true; return h }

	cases := []struct {
		name     string
		login    Login
		role, db Rule
		holders  []Holder
		kind     Kind
		victims  []uint32
		scope    Scope
		fallback bool
		reason   string // a substring of Reason
	}{
		{name: "no limits", role: NoLimit(), db: NoLimit(),
			holders: []Holder{idle(1, "app", "d", m), idle(2, "app", "d", m)}, kind: Admit},
		{name: "below limit", role: rule(2, PolicyReject), db: NoLimit(),
			holders: []Holder{idle(1, "app", "d", m)}, kind: Admit, reason: `role "app" 1 of 2`},
		{name: "exactly at limit rejects", role: rule(1, PolicyReject), db: NoLimit(),
			holders: []Holder{idle(1, "app", "d", m)}, kind: Reject, scope: ScopeRole, reason: `role "app" at limit 1 (1 session): policy reject`},
		{name: "other roles do not count", role: rule(1, PolicyReject), db: NoLimit(),
			holders: []Holder{idle(1, "other", "d", m), idle(2, "x", "d", m)}, kind: Admit},
		{name: "empty policy means reject", role: Rule{MaxSessions: 1}, db: NoLimit(),
			holders: []Holder{idle(1, "app", "d", m)}, kind: Reject, scope: ScopeRole},
		{name: "unknown policy means reject", role: Rule{MaxSessions: 1, Policy: "oldest-wins"}, db: NoLimit(),
			holders: []Holder{idle(1, "app", "d", m)}, kind: Reject, scope: ScopeRole},
		{name: "wait at limit", role: rule(1, PolicyWait), db: NoLimit(),
			holders: []Holder{idle(1, "app", "d", m)}, kind: Wait, scope: ScopeRole, reason: "policy wait"},
		{name: "wait with wait_timeout 0 rejects", role: Rule{MaxSessions: 1, Policy: PolicyWait}, db: NoLimit(),
			holders: []Holder{idle(1, "app", "d", m)}, kind: Reject, scope: ScopeRole, reason: "wait_timeout is 0"},

		{name: "newest-wins evicts the oldest by backend_start", role: rule(3, PolicyNewestWins), db: NoLimit(),
			holders: []Holder{idle(1, "app", "d", 1*m), idle(2, "app", "d", 5*m), idle(3, "app", "d", 3*m)},
			kind:    Evict, victims: []uint32{2}, scope: ScopeRole, reason: `role "app" at limit 3 (3 sessions): oldest session pid 2 (age 5m0s) evicted for newest-wins`},
		{name: "newest-wins evicts whatever the state", role: rule(2, PolicyNewestWins), db: NoLimit(),
			holders: []Holder{sess(1, "app", "d", 9*m, "active", m), sess(2, "app", "d", 5*m, "idle in transaction", m)},
			kind:    Evict, victims: []uint32{1}, scope: ScopeRole},
		{name: "newest-wins ties broken by pid", role: rule(2, PolicyNewestWins), db: NoLimit(),
			holders: []Holder{idle(7, "app", "d", m), idle(4, "app", "d", m)}, kind: Evict, victims: []uint32{4}, scope: ScopeRole},
		{name: "over the limit evicts enough for one more", role: rule(2, PolicyNewestWins), db: NoLimit(),
			holders: []Holder{idle(1, "app", "d", 1*m), idle(2, "app", "d", 2*m), idle(3, "app", "d", 3*m), idle(4, "app", "d", 4*m)},
			kind:    Evict, victims: []uint32{4, 3, 2}, scope: ScopeRole, reason: "oldest sessions pid 4 (age 4m0s), pid 3 (age 3m0s), pid 2"},

		{name: "evict-idle evicts the longest idle by state_change, never a busy one", role: rule(8, PolicyEvictIdle), db: NoLimit(),
			holders: []Holder{
				sess(1, "app", "d", 60*m, "idle", 1*m),
				sess(2, "app", "d", 20*m, "idle", 10*m),
				sess(3, "app", "d", 90*m, "active", 80*m),
				sess(4, "app", "d", 90*m, "idle in transaction", 80*m),
				sess(5, "app", "d", 90*m, "idle in transaction (aborted)", 80*m),
				sess(6, "app", "d", 90*m, "fastpath function call", 80*m),
				sess(7, "app", "d", 90*m, "", 80*m),
				sess(8, "app", "d", 90*m, "disabled", 80*m),
			},
			kind: Evict, victims: []uint32{2}, scope: ScopeRole, reason: "longest-idle session pid 2 (idle 10m0s) evicted for evict-idle"},
		{name: "evict-idle with nobody idle falls back to reject", role: rule(2, PolicyEvictIdle), db: NoLimit(),
			holders: []Holder{sess(1, "app", "d", m, "active", m), sess(2, "app", "d", m, "idle in transaction", m)},
			kind:    Reject, scope: ScopeRole, fallback: true, reason: "no session can be evicted for evict-idle (2 not idle); fallback reject"},
		{name: "evict-idle with nobody idle falls back to wait", role: withFallback(rule(1, PolicyEvictIdle), PolicyWait), db: NoLimit(),
			holders: []Holder{sess(1, "app", "d", m, "active", m)}, kind: Wait, scope: ScopeRole, fallback: true, reason: "fallback wait"},

		{name: "min_session_age: all too young, fallback reject", role: withMinAge(rule(2, PolicyNewestWins), 30*time.Second), db: NoLimit(),
			holders: []Holder{idle(1, "app", "d", 10*time.Second), idle(2, "app", "d", 20*time.Second)},
			kind:    Reject, scope: ScopeRole, fallback: true, reason: "2 younger than min_session_age 30s"},
		{name: "min_session_age: all too young, fallback wait", role: withFallback(withMinAge(rule(1, PolicyNewestWins), 30*time.Second), PolicyWait), db: NoLimit(),
			holders: []Holder{idle(1, "app", "d", 10*time.Second)}, kind: Wait, scope: ScopeRole, fallback: true},
		{name: "min_session_age: exactly old enough is evictable", role: withMinAge(rule(1, PolicyNewestWins), 30*time.Second), db: NoLimit(),
			holders: []Holder{idle(1, "app", "d", 30*time.Second)}, kind: Evict, victims: []uint32{1}, scope: ScopeRole},
		{name: "min_session_age under evict-idle skips a young idle session", role: withMinAge(rule(2, PolicyEvictIdle), 30*time.Second), db: NoLimit(),
			holders: []Holder{sess(1, "app", "d", 25*time.Second, "idle", 20*time.Second), sess(2, "app", "d", 60*m, "idle", 5*time.Second)},
			kind:    Evict, victims: []uint32{2}, scope: ScopeRole},

		{name: "superuser login is exempt even at limit 0", login: Login{Superuser: true}, role: rule(0, PolicyReject), db: rule(0, PolicyReject),
			holders: []Holder{idle(1, "app", "d", m)}, kind: Admit, reason: "superuser"},
		{name: "replication login is not limited", login: Login{Replication: true}, role: rule(0, PolicyReject), db: rule(0, PolicyReject),
			kind: Admit, reason: "replication"},
		{name: "superuser sessions do not count against a role", role: rule(1, PolicyReject), db: NoLimit(),
			holders: []Holder{super(idle(1, "app", "d", m))}, kind: Admit},
		{name: "superuser sessions count against a database but are never evicted", role: NoLimit(), db: rule(1, PolicyNewestWins),
			holders: []Holder{super(idle(1, "postgres", "d", m))}, kind: Reject, scope: ScopeDatabase, fallback: true, reason: "1 superuser"},
		{name: "superuser sessions are skipped as database victims", role: NoLimit(), db: rule(2, PolicyNewestWins),
			holders: []Holder{super(idle(1, "postgres", "d", 9*m)), idle(2, "x", "d", m)}, kind: Evict, victims: []uint32{2}, scope: ScopeDatabase},
		{name: "replication sessions are not counted", role: rule(1, PolicyReject), db: rule(1, PolicyReject),
			holders: []Holder{repl(idle(1, "app", "d", m))}, kind: Admit},
		{name: "replication sessions are never victims, however old", role: rule(1, PolicyNewestWins), db: rule(1, PolicyNewestWins),
			holders: []Holder{repl(idle(1, "app", "d", 9*m)), idle(2, "app", "d", m)}, kind: Evict, victims: []uint32{2}, scope: ScopeRole},
		{name: "only replication sessions: admitted under newest-wins", role: rule(1, PolicyNewestWins), db: rule(1, PolicyNewestWins),
			holders: []Holder{repl(idle(1, "app", "d", 9*m)), repl(idle(2, "app", "", 9*m))}, kind: Admit},
		{name: "protected sessions count but are never evicted", role: rule(2, PolicyNewestWins), db: NoLimit(),
			holders: []Holder{prot(idle(1, "app", "d", 9*m)), idle(2, "app", "d", m)}, kind: Evict, victims: []uint32{2}, scope: ScopeRole},
		{name: "only protected sessions: fallback", role: rule(1, PolicyNewestWins), db: NoLimit(),
			holders: []Holder{prot(idle(1, "app", "d", 9*m))}, kind: Reject, scope: ScopeRole, fallback: true, reason: "1 protected"},
		{name: "a duplicate row marked protected protects", role: rule(1, PolicyNewestWins), db: NoLimit(),
			holders: []Holder{idle(1, "app", "d", 9*m), prot(idle(1, "app", "d", 9*m))}, kind: Reject, scope: ScopeRole, fallback: true},
		{name: "a duplicate pid counts once", role: rule(2, PolicyReject), db: NoLimit(),
			holders: []Holder{idle(1, "app", "d", 9*m), idle(1, "app", "d", 9*m)}, kind: Admit},
		{name: "pid 0 counts but is never evicted", role: rule(1, PolicyNewestWins), db: NoLimit(),
			holders: []Holder{idle(0, "app", "d", 9*m)}, kind: Reject, scope: ScopeRole, fallback: true},

		{name: "limit 0 with nothing to evict rejects under newest-wins", role: rule(0, PolicyNewestWins), db: NoLimit(),
			kind: Reject, scope: ScopeRole, fallback: true, reason: `role "app" at limit 0 (0 sessions): no session can be evicted`},
		{name: "limit 0 cannot be met by evicting", role: rule(0, PolicyNewestWins), db: NoLimit(),
			holders: []Holder{idle(1, "app", "d", m)}, kind: Reject, scope: ScopeRole, fallback: true, reason: "only 1 of the 2 sessions needed"},
		{name: "limit 0 with wait rejects after the timeout only", role: rule(0, PolicyWait), db: NoLimit(),
			kind: Wait, scope: ScopeRole},

		{name: "database limit evicts a session of that database, any role", role: NoLimit(), db: rule(1, PolicyNewestWins),
			holders: []Holder{idle(1, "x", "other", 9*m), idle(2, "y", "d", m)}, kind: Evict, victims: []uint32{2}, scope: ScopeDatabase,
			reason: `database "d" at limit 1 (1 session): oldest session pid 2`},
		{name: "database limit reject", role: NoLimit(), db: rule(1, PolicyReject),
			holders: []Holder{idle(2, "y", "d", m)}, kind: Reject, scope: ScopeDatabase},
		{name: "database limit wait", role: NoLimit(), db: rule(1, PolicyWait),
			holders: []Holder{idle(2, "y", "d", m)}, kind: Wait, scope: ScopeDatabase},
		{name: "role limit is checked before database limit", role: rule(1, PolicyReject), db: rule(1, PolicyReject),
			holders: []Holder{idle(1, "app", "other", m), idle(2, "y", "d", m)}, kind: Reject, scope: ScopeRole},
		{name: "role fine, database full", role: rule(5, PolicyReject), db: rule(1, PolicyReject),
			holders: []Holder{idle(1, "app", "other", m), idle(2, "y", "d", m)}, kind: Reject, scope: ScopeDatabase},
		{name: "both full: a role victim inside the database frees both", role: rule(2, PolicyNewestWins), db: rule(1, PolicyNewestWins),
			holders: []Holder{idle(1, "app", "other", 10*m), idle(2, "app", "d", 5*m)}, kind: Evict, victims: []uint32{2}, scope: ScopeRole},
		{name: "both full: the database policy may reject even if the role could evict", role: rule(1, PolicyNewestWins), db: rule(1, PolicyReject),
			holders: []Holder{idle(1, "app", "other", 10*m), idle(2, "y", "d", 5*m)}, kind: Reject, scope: ScopeDatabase},
		{name: "both full: role victim inside the database satisfies a rejecting database", role: rule(1, PolicyNewestWins), db: rule(1, PolicyReject),
			holders: []Holder{idle(1, "app", "d", 10*m)}, kind: Evict, victims: []uint32{1}, scope: ScopeRole},
		{name: "both full: one victim for each", role: rule(1, PolicyNewestWins), db: rule(1, PolicyNewestWins),
			holders: []Holder{idle(1, "app", "other", 10*m), idle(2, "y", "d", 5*m)}, kind: Evict, victims: []uint32{1, 2}, scope: ScopeRole,
			reason: `role "app" at limit 1 (1 session): oldest session pid 1 (age 10m0s) evicted for newest-wins; database "d" at limit 1 (1 session): oldest session pid 2`},
		{name: "both limited: role victims by age when the database is not full", role: rule(2, PolicyNewestWins), db: rule(5, PolicyReject),
			holders: []Holder{idle(1, "app", "other", 10*m), idle(2, "app", "d", 5*m), idle(3, "y", "d", 5*m)}, kind: Evict, victims: []uint32{1}, scope: ScopeRole},
		{name: "both full: database victims use the database's criteria", role: rule(1, PolicyNewestWins), db: rule(2, PolicyEvictIdle),
			holders: []Holder{idle(1, "app", "other", 10*m), sess(2, "y", "d", 50*m, "active", m), sess(3, "y", "d", 5*m, "idle", 4*m)},
			kind:    Evict, victims: []uint32{1, 3}, scope: ScopeRole},
		{name: "both full: database fallback keeps the role victims alive", role: rule(1, PolicyNewestWins), db: rule(1, PolicyEvictIdle),
			holders: []Holder{idle(1, "app", "other", 10*m), sess(2, "y", "d", 50*m, "active", m)},
			kind:    Reject, scope: ScopeDatabase, fallback: true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			l := New(newClock().Now)
			d := l.Decide(app(c.login), c.role, c.db, c.holders)
			if d.Kind != c.kind || d.Scope != c.scope || d.Fallback != c.fallback {
				t.Fatalf("got %v scope %v fallback %v (%s), want %v scope %v fallback %v", d.Kind, d.Scope, d.Fallback, d.Reason, c.kind, c.scope, c.fallback)
			}
			if got := pids(d.Victims); !slices.Equal(got, c.victims) && !(len(got) == 0 && len(c.victims) == 0) {
				t.Fatalf("victims %v, want %v (%s)", got, c.victims, d.Reason)
			}
			if !strings.Contains(d.Reason, c.reason) {
				t.Fatalf("reason %q does not contain %q", d.Reason, c.reason)
			}
			if (d.Ticket != nil) != (d.Kind == Wait || d.Kind == Evict) {
				t.Fatalf("%v with ticket %v", d.Kind, d.Ticket)
			}
			snap := l.Snapshot()
			if got := len(snap.Evicting); got != len(c.victims) {
				t.Fatalf("%d evictions in flight, want %d", got, len(c.victims))
			}
			if d.Kind != Admit && d.Limit != map[Scope]Rule{ScopeRole: c.role, ScopeDatabase: c.db}[d.Scope].MaxSessions {
				t.Fatalf("limit %d for scope %v", d.Limit, d.Scope)
			}
			d.Ticket.Leave()
		})
	}
}

// TestNoDoubleEviction: logins decided in a row without reporting never get
// the same victim, victims in flight keep their slot (even after leaving the
// census) until reported, and a failed eviction makes the session a
// candidate again.
func TestNoDoubleEviction(t *testing.T) {
	clk := newClock()
	l := New(clk.Now)
	r := rule(2, PolicyNewestWins)
	census := []Holder{idle(1, "app", "d", 9*time.Minute), idle(2, "app", "d", 5*time.Minute)}

	a := Login{ID: 1, Role: "app", Database: "d"}
	da := l.Decide(a, r, NoLimit(), census)
	if da.Kind != Evict || !slices.Equal(pids(da.Victims), []uint32{1}) {
		t.Fatalf("a: %v %v", da.Kind, pids(da.Victims))
	}
	b := Login{ID: 2, Role: "app", Database: "d"}
	db := l.Decide(b, r, NoLimit(), census)
	if db.Kind != Evict || !slices.Equal(pids(db.Victims), []uint32{2}) {
		t.Fatalf("b: %v %v (%s)", db.Kind, pids(db.Victims), db.Reason)
	}
	c := Login{ID: 3, Role: "app", Database: "d"}
	if dc := l.Decide(c, r, NoLimit(), census); dc.Kind != Reject || !strings.Contains(dc.Reason, "2 already being evicted") {
		t.Fatalf("c: %v (%s)", dc.Kind, dc.Reason)
	}

	// pid 1 left pg_stat_activity but is not reported: it still holds its
	// slot, so a newcomer still finds nothing to evict.
	gone1 := without(census, 1)
	if d := l.Decide(c, r, NoLimit(), gone1); d.Kind != Reject || d.Count != 2 {
		t.Fatalf("c with pid 1 gone unreported: %v count %d (%s)", d.Kind, d.Count, d.Reason)
	}
	// a decides again before reporting: it waits for its own victim.
	a.Ticket = da.Ticket
	if d := l.Decide(a, r, NoLimit(), census); d.Kind != Wait || !strings.Contains(d.Reason, "its own eviction of pid 1") {
		t.Fatalf("a again: %v (%s)", d.Kind, d.Reason)
	}
	// Reported: a's slot is free and a is admitted.
	l.Evicted(1)
	if !isReady(a.Ticket) {
		t.Fatal("a not woken by the report of its own victim")
	}
	if d := l.Decide(a, r, NoLimit(), gone1); d.Kind != Admit {
		t.Fatalf("a after Evicted: %v (%s)", d.Kind, d.Reason)
	}
	census = append(gone1, idle(10, "app", "d", 0))

	// b's eviction failed: pid 2 counts as an ordinary session again, but
	// b never chooses it again; it takes the next candidate.
	l.EvictFailed(2)
	b.Ticket = db.Ticket
	d := l.Decide(b, r, NoLimit(), census)
	if d.Kind != Evict || !slices.Equal(pids(d.Victims), []uint32{10}) || !slices.Equal(d.VictimPolicies, []Policy{PolicyNewestWins}) {
		t.Fatalf("b after EvictFailed: %v %v %v (%s)", d.Kind, pids(d.Victims), d.VictimPolicies, d.Reason)
	}
	if s := l.Snapshot(); len(s.Evicting) != 1 || s.Evicting[0].LoginID != 2 || s.Evicting[0].Victim.PID != 10 {
		t.Fatalf("evicting %+v", s.Evicting)
	}
	// That one fails too: b has no candidate left, and its fallback (reject)
	// decides at once, saying why.
	l.EvictFailed(10)
	b.Ticket = d.Ticket
	d = l.Decide(b, r, NoLimit(), census)
	if d.Kind != Reject || !d.Fallback || !strings.Contains(d.Reason, "2 could not be evicted for this login") {
		t.Fatalf("b with both evictions failed: %v %v (%s)", d.Kind, pids(d.Victims), d.Reason)
	}
	// Another login may choose pid 2: it failed for b, not for c.
	c.Ticket = nil
	d = l.Decide(c, r, NoLimit(), census)
	if d.Kind != Evict || !slices.Equal(pids(d.Victims), []uint32{2}) {
		t.Fatalf("c: %v %v (%s)", d.Kind, pids(d.Victims), d.Reason)
	}
	// Reporting twice or unknown pids is harmless.
	l.Evicted(2)
	l.Evicted(2)
	l.EvictFailed(99)
	if s := l.Snapshot(); len(s.Evicting) != 0 {
		t.Fatalf("evicting %+v", s.Evicting)
	}
	if s := l.Snapshot(); s.Counters[CounterKey{"app", PolicyNewestWins}].EvictFailures != 2 {
		t.Fatalf("counters %+v", s.Counters)
	}
}

// TestEvictFailedNewBackendOnPID: a login that could not evict a session
// may evict a newer backend that got the same pid.
func TestEvictFailedNewBackendOnPID(t *testing.T) {
	l := New(newClock().Now)
	r := rule(1, PolicyNewestWins)
	lg := Login{ID: 1, Role: "app", Database: "d"}
	d := l.Decide(lg, r, NoLimit(), []Holder{idle(7, "app", "d", time.Hour)})
	if d.Kind != Evict {
		t.Fatal(d.Kind)
	}
	l.EvictFailed(7)
	lg.Ticket = d.Ticket
	if d := l.Decide(lg, r, NoLimit(), []Holder{idle(7, "app", "d", time.Hour)}); d.Kind != Reject || !d.Fallback {
		t.Fatalf("same session: %v (%s)", d.Kind, d.Reason)
	}
	lg.Ticket = nil // that login is over; a new one fails on pid 7 too
	d = l.Decide(lg, r, NoLimit(), []Holder{idle(7, "app", "d", time.Hour)})
	l.EvictFailed(7)
	lg.Ticket = d.Ticket
	reused := idle(7, "app", "d", time.Minute)
	d = l.Decide(lg, r, NoLimit(), []Holder{reused})
	if d.Kind != Evict || d.Victims[0].BackendStart != reused.BackendStart {
		t.Fatalf("new backend on pid 7: %v %+v (%s)", d.Kind, d.Victims, d.Reason)
	}
	l.Evicted(7)
	d.Ticket.Leave()
}

// TestEvictFailedFallbackWait: with fallback wait, a login whose victims all
// failed waits, and is admitted when a slot frees.
func TestEvictFailedFallbackWait(t *testing.T) {
	clk := newClock()
	l := New(clk.Now)
	r := withFallbackWait(rule(1, PolicyEvictIdle))
	census := []Holder{idle(3, "app", "d", time.Hour)}
	lg := Login{ID: 1, Role: "app", Database: "d"}
	d := l.Decide(lg, r, NoLimit(), census)
	if d.Kind != Evict || !slices.Equal(d.VictimPolicies, []Policy{PolicyEvictIdle}) {
		t.Fatalf("%v %v (%s)", d.Kind, d.VictimPolicies, d.Reason)
	}
	l.EvictFailed(3)
	lg.Ticket = d.Ticket
	d = l.Decide(lg, r, NoLimit(), census)
	if d.Kind != Wait || !d.Fallback || !strings.Contains(d.Reason, "1 could not be evicted for this login") {
		t.Fatalf("after the failure: %v (%s)", d.Kind, d.Reason)
	}
	// Woken again while the victim is still there: still no victim.
	clk.Advance(time.Second)
	lg.Ticket = d.Ticket
	if d = l.Decide(lg, r, NoLimit(), census); d.Kind != Wait {
		t.Fatalf("again: %v (%s)", d.Kind, d.Reason)
	}
	lg.Ticket = d.Ticket
	if d = l.Decide(lg, r, NoLimit(), nil); d.Kind != Admit {
		t.Fatalf("slot freed: %v (%s)", d.Kind, d.Reason)
	}
}

// TestEvictionPIDReused: a victim whose report got lost is forgotten when its
// pid shows up again with another backend_start.
func TestEvictionPIDReused(t *testing.T) {
	l := New(newClock().Now)
	r := rule(1, PolicyNewestWins)
	old := idle(1, "app", "d", 9*time.Minute)
	d := l.Decide(Login{ID: 1, Role: "app", Database: "d"}, r, NoLimit(), []Holder{old})
	if d.Kind != Evict {
		t.Fatal(d.Kind)
	}
	d.Ticket.Leave() // the login gave up; its victim is still in flight
	reused := idle(1, "app", "d", time.Minute)
	d = l.Decide(Login{ID: 2, Role: "app", Database: "d"}, r, NoLimit(), []Holder{reused})
	if d.Kind != Evict || d.Victims[0].BackendStart != reused.BackendStart {
		t.Fatalf("%v %+v (%s)", d.Kind, d.Victims, d.Reason)
	}
}

// TestEvictingLoginKeepsItsPlace: a login that evicted for a slot is not
// overtaken by one that started waiting after it.
func TestEvictingLoginKeepsItsPlace(t *testing.T) {
	l := New(newClock().Now)
	r := withFallbackWait(rule(1, PolicyNewestWins))
	census := []Holder{idle(1, "app", "d", time.Hour)}
	a := Login{ID: 1, Role: "app", Database: "d"}
	da := l.Decide(a, r, NoLimit(), census)
	if da.Kind != Evict {
		t.Fatal(da.Kind)
	}
	b := Login{ID: 2, Role: "app", Database: "d"}
	db := l.Decide(b, r, NoLimit(), census)
	if db.Kind != Wait || !db.Fallback {
		t.Fatalf("b: %v (%s)", db.Kind, db.Reason)
	}
	l.Evicted(1)
	a.Ticket = da.Ticket
	if d := l.Decide(a, r, NoLimit(), nil); d.Kind != Admit {
		t.Fatalf("a: %v (%s)", d.Kind, d.Reason)
	}
	// b was woken by that Decide? No: a took the slot.
	if isReady(db.Ticket) {
		t.Fatal("b woken although a took the slot")
	}
	db.Ticket.Leave()
}

func withFallbackWait(r Rule) Rule { r.Fallback = PolicyWait; return r }

func TestKindScopeStrings(t *testing.T) {
	for v, want := range map[interface{ String() string }]string{
		Admit: "admit", Evict: "evict", Wait: "wait", Reject: "reject", Kind(0): "Kind(0)",
		ScopeNone: "none", ScopeRole: "role", ScopeDatabase: "database", Scope(9): "Scope(9)",
		PolicyNewestWins: "newest-wins",
	} {
		if got := v.String(); got != want {
			t.Errorf("%#v.String() = %q, want %q", v, got, want)
		}
	}
}
