package limiter

import (
	"cmp"
	"slices"
	"time"
)

// A Ticket is a login's place in line. Decide hands one out with its first
// Wait or Evict decision; the caller passes it back in Login.Ticket on every
// later Decide for that login, so that the login keeps its position: a login
// is never admitted ahead of earlier waiters for the same limit, and a login
// that evicted for a slot is not overtaken by someone who started waiting
// after it. Admit and Reject decisions retire the ticket; a caller that gives
// up earlier (client gone, context cancelled) calls Leave.
//
// A ticket belongs to one login: only the goroutine handling that login passes
// it to Decide.
type Ticket struct {
	l     *Limiter
	ready chan struct{} // capacity 1: a pending wake-up

	// Guarded by l.mu.
	seq      uint64 // arrival order
	loginID  uint64
	role     string
	database string
	queued   bool     // waiting in queues[queue]
	queue    queueKey // the limit it waits for
	woken    bool     // signalled and not yet back in Decide
	// landing: it waits for logins in flight to become sessions it may
	// evict (an evicting policy that found too few victims among the
	// sessions); a reservation released as logged in wakes it.
	landing   bool
	waitStart time.Time // when it first had to wait
	deadline  time.Time
	gone      bool
	// failed are the victims this login could not evict (EvictFailed), by
	// pid, with their backend_start: they are not chosen for it again. A
	// newer backend that reuses the pid is not one of them.
	failed map[uint32]time.Time
	// told and budgeted: the login's dry-run decisions and its turn-away
	// by an eviction budget were counted already; a login that decides
	// again while it waits is counted once.
	told, budgeted bool
}

// queueKey names one wait queue: the role's or the database's limit.
type queueKey struct {
	scope Scope
	name  string
}

// Ready is signalled when a slot may have freed for this ticket: it is the
// first waiter not yet woken for its limit and Released was called for that
// role or database, or a Decide saw a free slot in the census, or an earlier
// waiter left without using its wake-up. The caller then runs the census and
// Decide again. It must also re-check on a poll interval and at Deadline,
// because sessions opened directly against the server end without telling
// rolegate, and because an evicting policy may find a victim later (sessions
// age past min_session_age, go idle).
func (t *Ticket) Ready() <-chan struct{} { return t.ready }

// Deadline is when the wait ends in a rejection: the moment the login first
// had to wait plus that limit's WaitTimeout. It is zero while the login has
// not waited. The caller sets its timer to it and then calls Decide once
// more, which admits the login if a slot freed in time and rejects it
// otherwise.
func (t *Ticket) Deadline() time.Time {
	t.l.mu.Lock()
	defer t.l.mu.Unlock()
	return t.deadline
}

// First reports whether the ticket is the first waiter for its limit (or not
// waiting at all). Only the first waiter needs to re-check on a poll
// interval, for slots freed by sessions that end without telling rolegate
// (opened directly or through another instance): nobody behind it can be
// admitted before it. The others sleep until Ready or Deadline; when the
// first leaves the queue the next one is signalled, and re-checks as the new
// first.
func (t *Ticket) First() bool {
	t.l.mu.Lock()
	defer t.l.mu.Unlock()
	if !t.queued {
		return true
	}
	q := t.l.queues[t.queue]
	return len(q) > 0 && q[0] == t
}

// Abandon is Leave for a login whose admission broke off (a panic): any
// eviction it was handed and did not report is reported as failed, so that
// the victim does not hold a slot in the limiter's books for good. After
// every eviction was reported it is the same as Leave.
func (t *Ticket) Abandon() {
	if t == nil {
		return
	}
	t.l.mu.Lock()
	defer t.l.mu.Unlock()
	if !t.gone {
		for pid, e := range t.l.evicting {
			if e.claimant == t {
				delete(t.l.evicting, pid)
				t.l.counter(e.key).EvictFailures++
			}
		}
	}
	t.l.retire(t)
}

// Position is the login's place in line for the limit it waits for: 1 for
// the first waiter, 0 when it is not in line (it has not waited yet, was
// admitted or rejected, or left). For the admin views; a decision never
// depends on it.
func (t *Ticket) Position() int {
	if t == nil {
		return 0
	}
	t.l.mu.Lock()
	defer t.l.mu.Unlock()
	if t.gone || !t.queued {
		return 0
	}
	i, found := slices.BinarySearchFunc(t.l.queues[t.queue], t.seq, func(u *Ticket, seq uint64) int {
		return cmp.Compare(u.seq, seq)
	})
	if !found {
		return 0
	}
	return i + 1
}

// Leave takes the login out of line at once: the client disconnected, its
// context ended, or the caller is done with the login. A wake-up it had not
// used passes to the next waiter. Leaving twice, or after Admit or Reject, is
// harmless.
func (t *Ticket) Leave() {
	if t == nil {
		return
	}
	t.l.mu.Lock()
	defer t.l.mu.Unlock()
	t.l.retire(t)
}

// Released tells the limiter that a session of role in database ended (the
// proxy calls it when a session's server socket closes). It wakes the first
// waiter of the role's queue and of the database's queue that has not been
// woken yet; the others stay asleep, so one freed slot costs one census.
func (l *Limiter) Released(role, database string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.wake(queueKey{ScopeRole, role}, 1, nil)
	l.wake(queueKey{ScopeDatabase, database}, 1, nil)
}

// Landed tells the limiter that a login of role into database, admitted by
// another rolegate instance, became a session (this instance's own logins
// say so with Reservation.Release(true)). It wakes the first login of the
// role's queue and of the database's that waits to evict a login in flight
// (Decision.Landing): it may find that session now.
func (l *Limiter) Landed(role, database string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.wakeLanding(queueKey{ScopeRole, role})
	l.wakeLanding(queueKey{ScopeDatabase, database})
}

// ticketFor returns the caller's ticket if it is a live one of this limiter.
// A ticket that already left is treated as none: its login starts over at the
// back of the line.
func (l *Limiter) ticketFor(t *Ticket) *Ticket {
	if t == nil || t.l != l || t.gone {
		return nil
	}
	return t
}

// newTicket creates a ticket for a login that starts waiting or evicting now.
func (l *Limiter) newTicket(login Login) *Ticket {
	l.seq++
	t := &Ticket{
		l: l, ready: make(chan struct{}, 1),
		seq: l.seq, loginID: login.ID, role: login.Role, database: login.Database,
	}
	l.tickets[t] = struct{}{}
	return t
}

// retire removes t from everything. A wake-up t had not used passes on.
func (l *Limiter) retire(t *Ticket) {
	if t == nil || t.gone {
		return
	}
	t.gone = true
	delete(l.tickets, t)
	if t.queued {
		l.dequeue(t)
		if t.woken {
			t.woken = false
			l.wake(t.queue, 1, nil)
		}
	}
	for _, e := range l.evicting {
		if e.claimant == t {
			e.claimant = nil
		}
	}
}

// enqueue puts t in the queue for key at its arrival position, moving it
// there if it waited for the other limit before.
func (l *Limiter) enqueue(t *Ticket, key queueKey) {
	if t.queued && t.queue == key {
		return
	}
	if t.queued {
		l.dequeue(t)
	}
	q := l.queues[key]
	i, _ := slices.BinarySearchFunc(q, t.seq, func(u *Ticket, seq uint64) int {
		switch {
		case u.seq < seq:
			return -1
		case u.seq > seq:
			return 1
		}
		return 0
	})
	l.queues[key] = slices.Insert(q, i, t)
	t.queued, t.queue = true, key
}

// dequeue takes t out of its queue; it keeps its ticket (and position). If t
// was first, the new first waiter is signalled: it is the one that re-checks
// on a poll interval from now on (see First).
func (l *Limiter) dequeue(t *Ticket) {
	if !t.queued {
		return
	}
	q := l.queues[t.queue]
	first := len(q) > 0 && q[0] == t
	q = slices.DeleteFunc(q, func(u *Ticket) bool { return u == t })
	if len(q) == 0 {
		delete(l.queues, t.queue)
	} else {
		l.queues[t.queue] = q
		if first && !q[0].woken {
			l.signal(q[0])
		}
	}
	t.queued = false
}

// ahead counts the tickets waiting for key that arrived before t (all of them
// when t is nil: a newcomer goes to the back).
func (l *Limiter) ahead(key queueKey, t *Ticket) int {
	n := 0
	for _, u := range l.queues[key] {
		if t != nil && u.seq >= t.seq {
			break
		}
		n++
	}
	return n
}

// wake signals up to n waiters of key that are not woken yet, in order,
// skipping except (the ticket whose Decide is running). n < 0 wakes all.
func (l *Limiter) wake(key queueKey, n int, except *Ticket) {
	for _, u := range l.queues[key] {
		if n == 0 {
			return
		}
		if u.woken || u == except {
			continue
		}
		l.signal(u)
		n--
	}
}

// wakeLanding signals the first waiter of key that waits for a login in
// flight to land (see Ticket.landing) and is not woken yet.
func (l *Limiter) wakeLanding(key queueKey) {
	for _, u := range l.queues[key] {
		if u.landing && !u.woken {
			l.signal(u)
			return
		}
	}
}

// wokenIn counts the waiters of key that were signalled and have not come back.
func (l *Limiter) wokenIn(key queueKey) int {
	n := 0
	for _, u := range l.queues[key] {
		if u.woken {
			n++
		}
	}
	return n
}

func (l *Limiter) signal(t *Ticket) {
	t.woken = true
	select {
	case t.ready <- struct{}{}:
	default: // already pending
	}
}

// consume marks t's wake-up as used: its login is deciding again.
func (t *Ticket) consume() {
	t.woken = false
	select {
	case <-t.ready:
	default:
	}
}
