package limiter

import (
	"cmp"
	"slices"
	"sync"
	"time"

	"github.com/rolegate/rolegate/internal/keylock"
)

// Limiter holds what the census cannot tell: which sessions are being evicted
// and for whom, who is waiting in which order, which admissions are in
// progress, and the counters. Everything else comes in with each Decide call.
//
// All state sits behind one mutex that is never held while calling out (not
// even the injected clock), so every method is safe for concurrent use and
// returns promptly; only Lock and LockDatabase block, and they honour their
// context.
type Limiter struct {
	now func() time.Time

	mu       sync.Mutex
	evicting map[uint32]*eviction   // by victim pid, until Evicted or EvictFailed
	tickets  map[*Ticket]struct{}   // tickets that have not left
	queues   map[queueKey][]*Ticket // waiting tickets by the limit they wait for, in arrival order
	seq      uint64                 // last ticket sequence number handed out
	counters map[CounterKey]*Counters
	locks    keylock.Map[string]       // Lock and LockDatabase; its own mutex, not mu
	reserved map[*Reservation]struct{} // admitted logins not yet in the census
	// landed are reservations released as logged in, newest last: a census
	// taken before the release may lack the login's backend (see
	// Login.CensusEpoch). epoch numbers them.
	landed []landing
	epoch  uint64
	// spent books the evictions of each limit with a budget, oldest
	// first, within the budget's window; thrashing are the limits whose
	// budget turned a login away.
	spent     map[budgetKey][]spending
	thrashing map[queueKey]*thrash
}

// New returns an empty limiter reading time from now (time.Now in production,
// a fake clock in tests). now is called outside the limiter's lock.
func New(now func() time.Time) *Limiter {
	if now == nil {
		now = time.Now
	}
	return &Limiter{
		now:      now,
		evicting: make(map[uint32]*eviction),
		tickets:  make(map[*Ticket]struct{}),
		queues:   make(map[queueKey][]*Ticket),
		counters: make(map[CounterKey]*Counters),
		reserved: make(map[*Reservation]struct{}),
		epoch:    1, // 0 is a Login that does not track it
	}
}

// eviction is a victim handed out in an Evict decision whose fate the caller
// has not reported yet. Until it does, the victim still holds its slot (it is
// counted even once it drops out of pg_stat_activity, which happens slightly
// before the server frees its slot) and is never handed out again.
type eviction struct {
	victim   Holder
	claimant *Ticket // the login the slot is freed for; nil once it left
	loginID  uint64
	key      CounterKey
	scope    Scope
	since    time.Time
}

// Evicted reports that a victim is gone: its server socket closed, or the
// timeout form of pg_terminate_backend returned true. Its slot is free from
// now on and the census must no longer list it. Unknown pids are ignored, so
// reporting twice is harmless.
func (l *Limiter) Evicted(pid uint32) {
	l.mu.Lock()
	defer l.mu.Unlock()
	e := l.evicting[pid]
	if e == nil {
		return
	}
	delete(l.evicting, pid)
	// Only a login that waits on its own evictions (it decided again before
	// reporting them) needs waking; anyone else queued would find the slot
	// claimed.
	if c := e.claimant; c != nil && c.queued {
		l.signal(c)
	}
}

// EvictFailed reports that a victim could not be terminated (not permitted,
// the timeout passed, the control connection failed, the session was no
// longer the one the census saw) or that the caller no longer knows its
// fate. The limiter forgets the eviction: if the session is still in the
// census it counts as an ordinary session again. It is never handed out
// again to the login it was evicted for (that login's fallback decides once
// no other victim is left), so a victim that cannot be evicted makes no
// login try again and again; other logins may still choose it.
func (l *Limiter) EvictFailed(pid uint32) {
	l.mu.Lock()
	defer l.mu.Unlock()
	e := l.evicting[pid]
	if e == nil {
		return
	}
	delete(l.evicting, pid)
	l.counter(e.key).EvictFailures++
	if c := e.claimant; c != nil && !c.gone {
		if c.failed == nil {
			c.failed = make(map[uint32]time.Time)
		}
		c.failed[pid] = e.victim.BackendStart
	}
	if c := e.claimant; c != nil && c.queued {
		l.signal(c)
	}
}

// CounterKey names one set of Counters: the role of the login and the policy
// of the limit that decided (for admissions: the role's policy).
type CounterKey struct {
	Role   string
	Policy Policy
}

// Counters count decisions since the limiter was created. They only grow.
type Counters struct {
	Admitted      uint64 // Admit decisions
	Evictions     uint64 // victims handed out in Evict decisions
	EvictFailures uint64 // victims reported with EvictFailed
	Rejections    uint64 // Reject decisions, wait timeouts included
	WaitTimeouts  uint64 // rejections because a wait reached its WaitTimeout
	Waits         uint64 // logins that started waiting (once per login)
	// What dry-run rules decided and did not do (Rule.DryRun).
	DryRunEvictions  uint64 // victims a dry-run rule would have evicted
	DryRunRejections uint64 // logins it would have rejected
	DryRunWaits      uint64 // logins it would have made wait
	// BudgetFallbacks are decisions the fallback took because the eviction
	// budget was spent (Rule.Budget).
	BudgetFallbacks uint64
}

func (l *Limiter) counter(k CounterKey) *Counters {
	c := l.counters[k]
	if c == nil {
		c = new(Counters)
		l.counters[k] = c
	}
	return c
}

// Eviction is a victim in flight, as Snapshot reports it.
type Eviction struct {
	Victim  Holder
	LoginID uint64 // the login it was evicted for
	Role    string // that login's role
	Scope   Scope  // the limit that needed the slot
	Policy  Policy
	Since   time.Time // when Decide handed it out
}

// Snapshot is a copy of the limiter's state for the admin surface. Nothing in
// it is shared with the limiter, so it may be kept, sorted and printed freely.
type Snapshot struct {
	Taken time.Time
	// WaitingByRole and WaitingByDatabase count the logins waiting, each
	// under its role and under its database, whichever limit it waits for.
	WaitingByRole     map[string]int
	WaitingByDatabase map[string]int
	// Evicting lists the victims handed out and not yet reported, by pid.
	Evicting []Eviction
	Counters map[CounterKey]Counters
	// Thrashing lists the limits whose eviction budget turned a login away
	// within the budget's window.
	Thrashing []Thrash
}

// Snapshot copies the current state.
func (l *Limiter) Snapshot() Snapshot {
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	s := Snapshot{
		Taken:             now,
		WaitingByRole:     make(map[string]int),
		WaitingByDatabase: make(map[string]int),
		Evicting:          make([]Eviction, 0, len(l.evicting)),
		Counters:          make(map[CounterKey]Counters, len(l.counters)),
	}
	for t := range l.tickets {
		if t.queued {
			s.WaitingByRole[t.role]++
			s.WaitingByDatabase[t.database]++
		}
	}
	for _, e := range l.evicting {
		s.Evicting = append(s.Evicting, Eviction{
			Victim: e.victim, LoginID: e.loginID, Role: e.key.Role,
			Scope: e.scope, Policy: e.key.Policy, Since: e.since,
		})
	}
	slices.SortFunc(s.Evicting, func(a, b Eviction) int { return cmp.Compare(a.Victim.PID, b.Victim.PID) })
	for k, c := range l.counters {
		s.Counters[k] = *c
	}
	s.Thrashing = l.thrashes(now)
	return s
}
