package limiter

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"
)

// Holder is one session holding a slot, as the caller's census reports it:
// a client-backend row of pg_stat_activity merged with what rolegate knows of
// its own sessions. Times are in the limiter's clock; the caller corrects for
// the server's clock if the two differ (for example by selecting
// clock_timestamp() with the census and shifting by the difference), since
// min_session_age and idle times compare them with the limiter's now.
type Holder struct {
	PID          uint32 // backend pid; 0 when unknown: counted, never evicted
	Role         string // the login role (usename), which SET ROLE does not change
	Database     string
	BackendStart time.Time
	State        string // pg_stat_activity.state: only "idle" may be evicted by evict-idle
	StateChange  time.Time
	// Superuser sessions are exempt: they never count against a role limit
	// and are never evicted. They do count against a database limit, because
	// the server counts them there too (CountDBConnections counts every
	// backend in the database); not counting them would admit logins the
	// server then refuses.
	Superuser bool
	// Protected sessions (rolegate's own control connections) count but are
	// never evicted.
	Protected bool
	// Replication connections (walsenders, logical or physical) do not
	// count against any limit and are never evicted: PostgreSQL 15.18
	// counts them against neither rolconnlimit nor datconnlimit (the
	// proxy's TestLimitReplication checks the server), and a replica must
	// never be cut off to let a login in.
	Replication bool
	// Reserved marks a slot another rolegate instance reserved for a login
	// that has not reached the census yet (its PID is 0): it counts, and is
	// never evicted. This instance's own reservations are the limiter's
	// (Reserve), not census rows; Decide sets Reserved on the row of such a
	// login's backend when it recognizes it (Reservation.Identify).
	Reserved bool
	// ViaRolegate is not used by the limiter; it travels with a victim so
	// the caller knows whether to terminate with timeout 0 and wait for EOF
	// on its own server socket, or to use the timeout form.
	ViaRolegate bool
	// ApplicationName is pg_stat_activity's application_name, which a
	// rule's protect list may match.
	ApplicationName string
	// Client is the backend's client address and port as the server sees
	// them (pg_stat_activity's client_addr and client_port); invalid for a
	// Unix socket or when the control role may not see them. A rule's
	// protect list may match it; the caller recognizes its own server
	// connections by it.
	Client netip.AddrPort
	// Origin is the address of the client that opened the session, when
	// the caller knows it better than Client: for a session rolegate
	// relays, Client is rolegate's own end of the server connection and
	// Origin the address of rolegate's client. Protect lists and
	// evict_scope same-client match the origin.
	Origin netip.Addr
}

// origin is where the session comes from: Origin, else Client's address.
func (h Holder) origin() netip.Addr {
	if h.Origin.IsValid() {
		return h.Origin.Unmap()
	}
	if h.Client.IsValid() {
		return h.Client.Addr().Unmap()
	}
	return netip.Addr{}
}

// Login is a client that has authenticated and asks for a slot.
type Login struct {
	// ID identifies the login in snapshots and logs (the proxy's session id).
	ID       uint64
	Role     string
	Database string
	// Superuser (rolsuper of the login role itself, not membership) and
	// Replication (walsender) logins are admitted without counting, as
	// PostgreSQL does: 15.18 checks neither against a connection limit.
	Superuser   bool
	Replication bool
	// Ticket is the ticket an earlier Wait or Evict decision for this login
	// returned, nil on the first Decide. It keeps the login's place in line.
	Ticket *Ticket
	// CensusEpoch is Epoch() read just before the census passed to Decide
	// was taken. A reservation released as logged in after that counts as
	// held, as the census may have been read before the login's backend
	// appeared in it (it errs toward counting a login twice, never not at
	// all). 0: not tracked, and released reservations are not counted.
	CensusEpoch uint64
	// ApplicationName and Client are the login's, for evict_scope and for
	// naming the clients that spend an eviction budget.
	ApplicationName string
	Client          netip.Addr
}

// Kind is what the caller must do with a login.
type Kind int

// The kinds of decision. They start at 1 so that a zero Decision is not an
// admission.
const (
	// Admit: log in to the server now.
	Admit Kind = iota + 1
	// Evict: terminate every victim, report each with Evicted or EvictFailed,
	// then run the census and Decide again (with the returned Ticket).
	Evict
	// Wait: wait on Ticket.Ready, a poll interval or Ticket.Deadline (when
	// set and not past), whichever comes first, then run the census and
	// Decide again.
	Wait
	// Reject: send PostgreSQL's 53300 error for Scope after AuthenticationOk.
	Reject
)

var kindNames = [...]string{Admit: "admit", Evict: "evict", Wait: "wait", Reject: "reject"}

func (k Kind) String() string {
	if k > 0 && int(k) < len(kindNames) {
		return kindNames[k]
	}
	return fmt.Sprintf("Kind(%d)", int(k))
}

// Scope says which limit a decision is about.
type Scope int

// The scopes. The error text the proxy sends depends on it:
// `too many connections for role "R"` or `... for database "D"`.
const (
	ScopeNone Scope = iota // admissions, and exempt logins
	ScopeRole
	ScopeDatabase
)

var scopeNames = [...]string{ScopeNone: "none", ScopeRole: "role", ScopeDatabase: "database"}

func (s Scope) String() string {
	if s >= 0 && int(s) < len(scopeNames) {
		return scopeNames[s]
	}
	return fmt.Sprintf("Scope(%d)", int(s))
}

// Decision is what Decide tells the caller to do.
type Decision struct {
	Kind Kind
	// Victims are the sessions to terminate (Evict only), in the order the
	// policy chose them. They may come from both limits when the login hits
	// its role limit and its database limit.
	Victims []Holder
	// VictimPolicies is, for each of Victims, the policy that chose it: the
	// caller terminates a victim chosen by evict-idle only if it is still
	// idle since the census (and any victim only if its pid still belongs
	// to the backend the census saw).
	VictimPolicies []Policy
	// Scope, Limit and Count describe the limit that decided: for Evict the
	// role's if it needed victims, else the database's. Count is the number of
	// sessions holding that limit's slots, victims in flight included. They
	// are zero for Admit.
	Scope Scope
	Limit int
	Count int
	// Policy is the policy of that limit (for Admit: the role's).
	Policy Policy
	// Fallback is set when an evicting policy found no victim and its
	// fallback decided (Wait or Reject).
	Fallback bool
	// Landing is set for a Wait under an evicting policy whose victims
	// must be logins still logging in (reservations): once one lands as a
	// session (Reservation.Release(true) wakes the login) it can be evicted.
	// Such a wait is part of evicting: wait_timeout does not bound it and
	// Ticket.Deadline stays as it was.
	Landing bool
	// Ticket is set for Wait and Evict: pass it back in Login.Ticket, and
	// Leave it if the login ends before an Admit or Reject.
	Ticket *Ticket
	// Reason is a sentence for the log, e.g. `role "app" at limit 1 (1
	// session): oldest session pid 123 (age 5m0s) evicted for newest-wins`.
	Reason string
	// Would lists what dry-run rules decided and did not carry out (the
	// role's first, then the database's): each has the Kind, Victims,
	// Scope, Limit, Count, Policy and Reason the rule would have acted on.
	// The decision itself goes on without them. A login that decides
	// again (it waits, or evicts, under the other limit) gets them, and
	// has them counted, on its first decision only.
	Would []Decision
	// Thrashing is set when an eviction budget (Rule.Budget) was spent and
	// the fallback decided in its place; Evictors then names the clients
	// that spent it (application_name@address, most recent first).
	Thrashing bool
	Evictors  []string
}

// Decide tells the caller what to do with login, given the rules for its
// role and its database (MaxSessions already the effective limit) and the
// census of sessions holding slots. holders may list the whole server: only
// the login's role and database matter. A pid listed twice counts once (the
// first row wins, except that Protected from any row sticks).
//
// PostgreSQL counts the login itself, so a limit is reached when the
// sessions already counted are >= the limit. The role limit is checked
// before the database limit, as the server does, so a login that hits both is
// refused with the role's error. For a login that hits both, Decide plans
// both before acting: it takes the role's victims from the login's database
// first (so one eviction frees a slot under both limits), lets the database
// policy find any further victims among the other sessions of the database,
// and evicts nobody unless the plan admits the login under both limits.
//
// Waiting is FIFO per limit: a login is admitted only if the slots free in
// the census outnumber the waiters ahead of it for the same limit, and a
// login never evicts while earlier waiters for that limit exist (it waits
// behind them and wakes the first, which may now find a victim), except that
// under an evicting policy a login whose wait is over (or may not wait at
// all) does not stay behind them: it evicts for itself, or its fallback
// decides.
//
// Decide records the victims it hands out (never the same session twice
// until it is reported with Evicted or EvictFailed; never again to a login
// that reported it with EvictFailed) and counts the decision.
func (l *Limiter) Decide(login Login, role, db Rule, holders []Holder) Decision {
	return l.decide(login, role, db, holders, false)
}

// Explain is Decide for a login that is not there: it runs the same
// decision on the same state and changes nothing (no ticket, no victim
// handed out, no counter). Its Decision is what a login would get now;
// login.Ticket is ignored.
func (l *Limiter) Explain(login Login, role, db Rule, holders []Holder) Decision {
	login.Ticket = nil
	return l.decide(login, role, db, holders, true)
}

func (l *Limiter) decide(login Login, role, db Rule, holders []Holder, explain bool) Decision {
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()

	t := l.ticketFor(login.Ticket)
	if t != nil {
		t.consume()
	}
	if login.Superuser || login.Replication {
		if !explain {
			l.retire(t)
			l.counter(CounterKey{login.Role, role.policy()}).Admitted++
		}
		reason := "superuser: exempt from connection limits"
		if !login.Superuser {
			reason = "replication connection: not counted against connection limits"
		}
		return Decision{Kind: Admit, Policy: role.policy(), Reason: reason}
	}

	rv := &scopeView{key: queueKey{ScopeRole, login.Role}, rule: role, login: &login}
	dv := &scopeView{key: queueKey{ScopeDatabase, login.Database}, rule: db, login: &login}
	l.census(holders, t, login.CensusEpoch, !explain, rv, dv)
	for _, v := range []*scopeView{rv, dv} {
		v.ahead = l.ahead(v.key, t)
		// Under an evicting policy the line only keeps the order in which
		// waiters act; it must not turn into a rejection. A login that may
		// wait no longer (its wait_timeout ran out while an earlier waiter
		// had not acted yet, or it is 0) acts itself now: it evicts if its
		// policy finds a victim, else its fallback decides. Rejecting it
		// for its place in line would refuse a newest-wins login although
		// a session could be evicted for it.
		if v.ahead > 0 && v.rule.policy().Evicts() && !mayWait(now, t, v.rule) {
			v.passed, v.ahead = v.ahead, 0
		}
	}

	// A dry-run rule's verdict is kept aside and the login goes on as if
	// the rule had admitted it; the other rule still decides for real.
	var would []outcome
	dry := func(v *scopeView, o outcome) outcome {
		if !v.rule.DryRun || o.kind == Admit {
			return o
		}
		would = append(would, o)
		return outcome{kind: Admit, view: v}
	}
	o := dry(rv, l.judge(now, rv, nil, dv))
	if o.kind == Admit || o.kind == Evict {
		do := dry(dv, l.judge(now, dv, o.victims, nil))
		switch {
		case do.kind == Wait || do.kind == Reject:
			o = do // the role's victims, if any, are not evicted in vain
		case len(o.victims)+len(do.victims) == 0:
			o = outcome{kind: Admit, view: rv, reason: "admitted: " + rv.usage() + ", " + dv.usage()}
		case len(o.victims) == 0:
			o = do
		case len(do.victims) > 0:
			o.victims = append(o.victims, do.victims...)
			o.chosenBy = append(o.chosenBy, do.chosenBy...)
			o.reason += "; " + do.reason
		}
	}
	if explain {
		d := l.verdict(now, t, o)
		for _, w := range would {
			d.Would = append(d.Would, l.verdict(now, t, w))
		}
		return d
	}
	d := l.settle(now, login, t, rv, dv, o)
	if t := d.Ticket; t != nil && t.told {
		return d // told once per login, however many times it decides
	} else if t != nil && len(would) > 0 {
		t.told = true
	}
	for _, w := range would {
		d.Would = append(d.Would, l.settleWould(now, login, w))
	}
	return d
}

// scopeView is one limit as the census shows it to one login.
type scopeView struct {
	key     queueKey
	rule    Rule
	members []Holder             // census rows that count against the limit
	ghosts  int                  // victims in flight that already left the census
	booked  int                  // this instance's reservations (Reserve)
	logging int                  // booked + reserved census rows: logins not yet in the census
	count   int                  // members + ghosts + booked: the slots held
	leaving int                  // how many of count are victims in flight
	ahead   int                  // waiters for this limit that arrived before the login
	passed  int                  // earlier waiters the login passes: it may wait no longer
	mine    []uint32             // the login's own victims in flight under this limit
	failed  map[uint32]time.Time // victims the login could not evict (its ticket's)
	login   *Login
}

// unseen counts the logins in flight whose backends the census may show
// without telling they are theirs: this instance's reservations not
// recognized in it, and other instances' (rows without a pid).
func (s *scopeView) unseen() int {
	n := s.booked
	for _, h := range s.members {
		if h.Reserved && h.PID == 0 {
			n++
		}
	}
	return n
}

// failedFor reports whether the login could not evict h before: the same
// pid with the same backend_start (a newer backend on the pid is another
// session).
func (s *scopeView) failedFor(h Holder) bool {
	start, ok := s.failed[h.PID]
	return ok && (start.IsZero() || h.BackendStart.IsZero() || start.Equal(h.BackendStart))
}

// counts reports whether h holds one of this limit's slots.
func (s *scopeView) counts(h Holder) bool {
	if h.Replication {
		return false
	}
	if s.key.scope == ScopeRole {
		return h.Role == s.key.name && !h.Superuser
	}
	return h.Database == s.key.name
}

// census fills the views from the caller's rows and the victims in flight.
func (l *Limiter) census(holders []Holder, t *Ticket, epoch uint64, forget bool, views ...*scopeView) {
	seen := make(map[uint32]int, len(holders))
	rows := make([]Holder, 0, len(holders))
	for _, h := range holders {
		if h.PID != 0 {
			if i, dup := seen[h.PID]; dup {
				rows[i].Protected = rows[i].Protected || h.Protected
				continue
			}
			seen[h.PID] = len(rows)
		}
		rows = append(rows, h)
	}
	stale := map[uint32]bool{}
	for pid, e := range l.evicting {
		// The pid now belongs to a newer backend: the victim is long gone
		// and its report was lost. Forget it rather than protect a stranger
		// (Explain only looks past it).
		if i, ok := seen[pid]; ok {
			a, b := e.victim.BackendStart, rows[i].BackendStart
			if !a.IsZero() && !b.IsZero() && !a.Equal(b) {
				stale[pid] = true
				if forget {
					delete(l.evicting, pid)
				}
			}
		}
	}
	l.markLoggingIn(rows)
	for _, s := range views {
		if t != nil {
			s.failed = t.failed
		}
		for _, h := range rows {
			if s.counts(h) {
				s.members = append(s.members, h)
			}
		}
		for pid, e := range l.evicting {
			if !s.counts(e.victim) || stale[pid] {
				continue
			}
			s.leaving++
			if _, present := seen[pid]; !present {
				s.ghosts++
			}
			if t != nil && e.claimant == t {
				s.mine = append(s.mine, pid)
			}
		}
		s.booked = l.reservedFor(s, epoch, rows)
		s.logging = s.booked
		for _, h := range s.members {
			if h.Reserved {
				s.logging++
			}
		}
		s.count = len(s.members) + s.ghosts + s.booked
		slices.Sort(s.mine)
	}
}

// outcome is one limit's verdict, or the merged plan.
type outcome struct {
	kind     Kind
	view     *scopeView   // the limit that decided
	victims  []Holder     // Evict
	chosenBy []*scopeView // per victim: the limit it was chosen for
	fallback bool
	poke     bool // waiting behind others under an evicting policy
	landing  bool // waiting for logins in flight to become sessions to evict
	thrash   bool // the eviction budget was spent: the fallback decided
	evictors []string
	reason   string
}

// judge applies one limit to the login. chosen are the victims already
// picked for the role limit (when judging the database); other is the
// database view (when judging the role), so that role victims can be taken
// from the login's database when that is full too.
func (l *Limiter) judge(now time.Time, s *scopeView, chosen []Holder, other *scopeView) outcome {
	if !s.rule.Limited() {
		return outcome{kind: Admit, view: s}
	}
	need := s.count + 1 - s.rule.MaxSessions // slots to free for this login
	for _, v := range chosen {
		if s.counts(v) {
			need--
		}
	}
	if need+s.ahead <= 0 {
		return outcome{kind: Admit, view: s}
	}
	p := s.rule.policy()
	at := s.describe()
	if s.ahead > 0 {
		if p == PolicyReject {
			return outcome{kind: Reject, view: s, reason: at + ": policy reject"}
		}
		return outcome{kind: Wait, view: s, poke: p.Evicts(), reason: at + ": waiting in line"}
	}
	if need <= len(s.mine) {
		return outcome{kind: Wait, view: s,
			reason: fmt.Sprintf("%s: waiting for its own eviction of %s", at, pidList(s.mine))}
	}
	need -= len(s.mine)
	switch p {
	case PolicyReject:
		return outcome{kind: Reject, view: s, reason: at + ": policy reject"}
	case PolicyWait:
		return outcome{kind: Wait, view: s, reason: at + ": policy wait"}
	}
	cands, why := l.candidates(now, s, chosen, other)
	// Slots held by logins still logging in (reservations) are freed by
	// evicting those logins once they are sessions, as they would have been
	// had they logged in a moment earlier; the login evicts older sessions
	// first. A login in flight that the census does not show as such (a
	// reservation of another instance, or of this one whose backend is not
	// recognized yet) may be counted twice, by its reservation and by its
	// backend: the login evicts only for the slots such logins do not hold
	// and waits for them to land, so it never evicts a session too many.
	// With min_session_age the logins in flight could not be evicted once
	// they land, so they are not waited for.
	unseen := 0
	if s.rule.MinSessionAge == 0 {
		unseen = min(s.unseen(), need)
	}
	spent, budget := l.budgetLeft(now, s)
	if evict := need - unseen; evict > 0 && len(cands) >= evict && evict <= budget {
		victims := slices.Clone(cands[:evict])
		by := make([]*scopeView, evict)
		for i := range by {
			by[i] = s
		}
		return outcome{kind: Evict, view: s, victims: victims, chosenBy: by,
			reason: fmt.Sprintf("%s: %s evicted for %s", at, describeVictims(now, p, victims), p)}
	}
	if s.logging > 0 && s.rule.MinSessionAge == 0 && len(cands)+s.logging >= need {
		// Waiting for them is part of evicting (their server login takes
		// milliseconds): wait_timeout does not bound it.
		return outcome{kind: Wait, view: s, landing: true,
			reason: fmt.Sprintf("%s: waiting for %s in flight to become sessions to evict for %s", at, plural(s.logging, "login"), p)}
	}
	fb := s.rule.fallback()
	k := Reject
	if fb == PolicyWait {
		k = Wait
	}
	if evict := need - unseen; evict > 0 && len(cands) >= evict {
		// Victims there are, but the budget is spent: the limit thrashes
		// (a pool larger than it evicting its own sessions in a loop).
		return outcome{kind: k, view: s, fallback: true, thrash: true, evictors: evictors(spent),
			reason: fmt.Sprintf("%s: eviction budget max_evictions %s spent (%d in the last %s) for %s; fallback %s",
				at, s.rule.Budget, len(spent), human(s.rule.Budget.Per), p, fb)}
	}
	short := "no session can be evicted"
	if len(cands) > 0 {
		short = fmt.Sprintf("only %d of the %d sessions needed can be evicted", len(cands), need)
	}
	return outcome{kind: k, view: s, fallback: true,
		reason: fmt.Sprintf("%s: %s for %s%s; fallback %s", at, short, p, why, fb)}
}

// candidates lists the sessions the limit's policy may evict, best victim
// first, and explains the ones it may not.
func (l *Limiter) candidates(now time.Time, s *scopeView, chosen []Holder, other *scopeView) ([]Holder, string) {
	p := s.rule.policy()
	var c []Holder
	var superuser, protected, leaving, failed, young, busy, logging, outside int
	for _, h := range s.members {
		switch {
		case slices.ContainsFunc(chosen, func(v Holder) bool { return v.PID == h.PID }):
			// already a victim for the role limit
		case h.Superuser:
			superuser++
		case h.Reserved:
			logging++
		case h.Protected || h.PID == 0 || s.rule.protects(h):
			protected++
		case !s.inScope(h):
			outside++
		case l.evicting[h.PID] != nil:
			leaving++
		case s.failedFor(h):
			failed++
		case s.rule.MinSessionAge > 0 && now.Sub(h.BackendStart) < s.rule.MinSessionAge:
			young++
		case p == PolicyEvictIdle && h.State != "idle":
			busy++
		default:
			c = append(c, h)
		}
	}
	slices.SortFunc(c, func(a, b Holder) int {
		if p == PolicyEvictIdle {
			if x := a.StateChange.Compare(b.StateChange); x != 0 {
				return x
			}
		}
		if x := a.BackendStart.Compare(b.BackendStart); x != 0 {
			return x
		}
		return cmp.Compare(a.PID, b.PID)
	})
	if other != nil && other.rule.Limited() && other.count+other.ahead+1 > other.rule.MaxSessions {
		// The database is full too: victims inside it free both slots.
		inside := slices.DeleteFunc(slices.Clone(c), func(h Holder) bool { return !other.counts(h) })
		outside := slices.DeleteFunc(c, other.counts)
		c = append(inside, outside...)
	}

	var why []string
	add := func(n int, what string) {
		if n > 0 {
			why = append(why, fmt.Sprintf("%d %s", n, what))
		}
	}
	add(young, "younger than min_session_age "+s.rule.MinSessionAge.String())
	add(busy, "not idle")
	add(leaving, "already being evicted")
	add(failed, "could not be evicted for this login")
	add(protected, "protected")
	add(outside, "outside evict_scope "+string(s.rule.EvictScope))
	add(logging, "still logging in")
	add(superuser, "superuser")
	if len(why) == 0 {
		return c, ""
	}
	return c, " (" + strings.Join(why, ", ") + ")"
}

// settle turns the outcome into a Decision and updates the state: tickets,
// queues, victims in flight, counters, wake-ups.
func (l *Limiter) settle(now time.Time, login Login, t *Ticket, rv, dv *scopeView, o outcome) Decision {
	s := o.view
	d := l.verdict(now, t, o)
	if o.kind == Admit {
		d.Policy = rv.rule.policy()
	}
	key := CounterKey{login.Role, d.Policy}
	if o.kind == Wait && d.Kind == Reject && t != nil && !t.deadline.IsZero() {
		l.counter(key).WaitTimeouts++
	}
	if o.thrash {
		l.thrashed(now, s, d)
	}

	switch d.Kind {
	case Admit:
		l.retire(t)
		l.counter(key).Admitted++
	case Reject:
		l.retire(t)
		l.counter(key).Rejections++
	case Evict:
		if t == nil {
			t = l.newTicket(login)
		}
		l.dequeue(t) // it is acting now, not waiting; it keeps its place
		d.Ticket = t
		for i, v := range o.victims {
			by := o.chosenBy[i]
			k := CounterKey{login.Role, by.rule.policy()}
			l.evicting[v.PID] = &eviction{victim: v, claimant: t, loginID: login.ID, key: k, scope: by.key.scope, since: now}
			l.counter(k).Evictions++
			l.spend(now, by, login)
		}
	case Wait:
		if t == nil {
			t = l.newTicket(login)
		}
		if t.deadline.IsZero() && !o.landing {
			t.waitStart = now
			t.deadline = now.Add(s.rule.WaitTimeout)
			l.counter(key).Waits++
		}
		t.landing = o.landing
		l.enqueue(t, s.key)
		d.Ticket = t
		if o.poke && l.wokenIn(s.key) == 0 {
			l.wake(s.key, 1, t)
		}
	}
	if o.thrash && (t == nil || !t.budgeted) { // once per login
		l.counter(key).BudgetFallbacks++
		if t != nil {
			t.budgeted = true
		}
	}
	l.wakeFree(rv, d.Kind, t)
	l.wakeFree(dv, d.Kind, t)
	return d
}

// verdict is the Decision for outcome o, without changing any state: the
// part of settle that Explain shares. A Wait the login may not wait for
// (its wait_timeout) is a Reject.
func (l *Limiter) verdict(now time.Time, t *Ticket, o outcome) Decision {
	s := o.view
	d := Decision{Kind: o.kind, Policy: s.rule.policy(), Fallback: o.fallback, Landing: o.landing, Reason: o.reason,
		Thrashing: o.thrash, Evictors: o.evictors}
	if o.kind != Admit {
		d.Scope, d.Limit, d.Count = s.key.scope, s.rule.MaxSessions, s.count
	}
	if o.kind == Evict {
		d.Victims = o.victims
		d.VictimPolicies = make([]Policy, len(o.victims))
		for i := range o.victims {
			d.VictimPolicies[i] = o.chosenBy[i].rule.policy()
		}
	}
	if o.kind == Wait && !o.landing && !mayWait(now, t, s.rule) {
		d.Kind = Reject
		if t != nil && !t.deadline.IsZero() {
			d.Reason = fmt.Sprintf("%s; waited %s, wait_timeout reached", o.reason, human(now.Sub(t.waitStart)))
		} else {
			d.Reason = o.reason + "; wait_timeout is 0"
		}
	}
	return d
}

// settleWould counts what a dry-run rule decided, and books its victims
// against the rule's eviction budget as if they had been evicted (apart
// from the live bookings: see budgetKey), so that a dry run shows when the
// budget would stop the policy too.
func (l *Limiter) settleWould(now time.Time, login Login, o outcome) Decision {
	d := l.verdict(now, nil, o)
	c := l.counter(CounterKey{login.Role, d.Policy})
	switch d.Kind {
	case Evict:
		c.DryRunEvictions += uint64(len(d.Victims))
		for range d.Victims {
			l.spend(now, o.view, login)
		}
	case Wait:
		c.DryRunWaits++
	case Reject:
		c.DryRunRejections++
	}
	if o.thrash {
		// Told in d (Thrashing, Evictors, the reason); a dry run's limit
		// is not reported as thrashing, as nothing was evicted.
		c.BudgetFallbacks++
	}
	return d
}

// mayWait reports whether a Wait decision under r lets the login wait: its
// deadline (set when it first waited) has not come, or, before its first
// wait, r's WaitTimeout is above 0.
func mayWait(now time.Time, t *Ticket, r Rule) bool {
	if t != nil && !t.deadline.IsZero() {
		return now.Before(t.deadline)
	}
	return r.WaitTimeout > 0
}

// wakeFree wakes as many waiters of the limit as the census shows free
// slots, minus those already woken: slots can free without a Released call
// (sessions opened directly against the server), and a Decide is the first to
// see it.
func (l *Limiter) wakeFree(s *scopeView, k Kind, t *Ticket) {
	if len(l.queues[s.key]) == 0 {
		return
	}
	if !s.rule.Limited() {
		l.wake(s.key, -1, t) // the limit is gone (reload): nobody needs to wait
		return
	}
	free := s.rule.MaxSessions - s.count
	if k == Admit {
		free--
	}
	if free -= l.wokenIn(s.key); free > 0 {
		l.wake(s.key, free, t)
	}
}

// describe is the limit and its use, for reasons: `role "app" at limit 1 (1
// session)`.
func (s *scopeView) describe() string {
	state := "at limit"
	if s.count < s.rule.MaxSessions {
		state = "limit"
	}
	use := plural(s.count, "session")
	if s.leaving > 0 {
		use += fmt.Sprintf(", %d being evicted", s.leaving)
	}
	if s.logging > 0 {
		use += fmt.Sprintf(", %d logging in", s.logging)
	}
	if s.ahead > 0 {
		use += fmt.Sprintf(", %d waiting before this login", s.ahead)
	}
	if s.passed > 0 {
		use += fmt.Sprintf(", %d waiting before this login, passed as this login may wait no longer", s.passed)
	}
	return fmt.Sprintf("%s %q %s %d (%s)", s.key.scope, s.key.name, state, s.rule.MaxSessions, use)
}

// usage is the limit's use for an admission: `role "app" 1 of 2`.
func (s *scopeView) usage() string {
	if !s.rule.Limited() {
		return fmt.Sprintf("%s %q no limit", s.key.scope, s.key.name)
	}
	return fmt.Sprintf("%s %q %d of %d", s.key.scope, s.key.name, s.count, s.rule.MaxSessions)
}

func describeVictims(now time.Time, p Policy, victims []Holder) string {
	parts := make([]string, len(victims))
	for i, v := range victims {
		what := fmt.Sprintf("age %s", human(now.Sub(v.BackendStart)))
		if p == PolicyEvictIdle {
			what = fmt.Sprintf("idle %s", human(now.Sub(v.StateChange)))
		}
		if v.ApplicationName != "" {
			what += fmt.Sprintf(", application %q", v.ApplicationName)
		}
		parts[i] = fmt.Sprintf("pid %d (%s)", v.PID, what)
	}
	what := "oldest session"
	if p == PolicyEvictIdle {
		what = "longest-idle session"
	}
	if len(victims) > 1 {
		what += "s"
	}
	return what + " " + strings.Join(parts, ", ")
}

func pidList(pids []uint32) string {
	parts := make([]string, len(pids))
	for i, p := range pids {
		parts[i] = fmt.Sprint(p)
	}
	return "pid " + strings.Join(parts, ", ")
}

func plural(n int, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return fmt.Sprintf("%d %ss", n, what)
}

// human rounds a duration for a log line.
func human(d time.Duration) string {
	switch {
	case d >= time.Second:
		return d.Round(time.Second).String()
	case d >= time.Millisecond:
		return d.Round(time.Millisecond).String()
	}
	return d.String()
}
