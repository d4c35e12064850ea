package limiter

import "time"

// A Reservation is a slot held for a login that Decide admitted and that is
// now logging in to the server. Until its backend appears in the census the
// login is invisible there, so the reservation stands in for it: every Decide
// counts it against the login's role and database, and the caller may let the
// next login of the role decide at once instead of holding a lock across the
// whole server login.
//
// The caller releases it exactly once, when the login ends either way:
// Release(true) once the login's backend is visible in the census (the slot
// passes to the backend; nobody is woken), Release(false) when the login
// failed (the slot is free again; the first waiters are woken). Between the
// backend appearing and Release(true) a census counts the login twice: that
// errs on the safe side (a concurrent login may wait or be refused), never
// admits one too many.
type Reservation struct {
	l        *Limiter
	loginID  uint64
	role     string
	database string
	since    time.Time

	gone bool // guarded by l.mu
}

// Reserve holds a slot of login's role and database for it, counted by every
// Decide until Release. Call it right after Decide admitted the login, under
// the same lock, so that no other login decides without it.
func (l *Limiter) Reserve(login Login) *Reservation {
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	r := &Reservation{l: l, loginID: login.ID, role: login.Role, database: login.Database, since: now}
	l.reserved[r] = struct{}{}
	return r
}

// Release ends the reservation; calls after the first do nothing, and so does
// a nil Reservation. loggedIn says the login's backend is in the census now;
// otherwise its slot is free and the first waiter of the role's queue and of
// the database's queue (not yet woken) is woken, in arrival order.
func (r *Reservation) Release(loggedIn bool) {
	if r == nil {
		return
	}
	l := r.l
	now := l.now() // outside the lock, as everywhere
	l.mu.Lock()
	defer l.mu.Unlock()
	if r.gone {
		return
	}
	r.gone = true
	delete(l.reserved, r)
	if loggedIn {
		// Admission reads the census without the lock that Release would
		// need: a census read before the backend appeared must still count
		// the login, so the slot stays booked for it (see Login.CensusEpoch).
		l.epoch++
		l.landed = append(l.landed, landing{role: r.role, database: r.database, seq: l.epoch, at: now})
		l.pruneLanded(now)
	}
	if !loggedIn {
		l.wake(queueKey{ScopeRole, r.role}, 1, nil)
		l.wake(queueKey{ScopeDatabase, r.database}, 1, nil)
	}
}

// landing is a reservation released as logged in, numbered by the limiter's
// epoch.
type landing struct {
	role, database string
	seq            uint64
	at             time.Time
}

// landedKeep is how long a landing is remembered: longer than any census
// query admission waits for.
const landedKeep = time.Minute

// Epoch numbers the reservations released as logged in so far; read it just
// before taking a census and pass it to Decide as Login.CensusEpoch.
func (l *Limiter) Epoch() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.epoch
}

// pruneLanded forgets landings older than landedKeep; l.mu is held.
func (l *Limiter) pruneLanded(now time.Time) {
	i := 0
	for i < len(l.landed) && now.Sub(l.landed[i].at) > landedKeep {
		i++
	}
	l.landed = l.landed[i:]
}

// reservedFor counts the reservations that hold slots of the limit s: those
// held, and those released as logged in after the census was read (epoch).
func (l *Limiter) reservedFor(s *scopeView, epoch uint64) int {
	of := func(role, database string) bool {
		return s.key.scope == ScopeRole && role == s.key.name || s.key.scope == ScopeDatabase && database == s.key.name
	}
	n := 0
	for r := range l.reserved {
		if of(r.role, r.database) {
			n++
		}
	}
	if epoch == 0 {
		return n
	}
	for _, g := range l.landed {
		if g.seq > epoch && of(g.role, g.database) {
			n++
		}
	}
	return n
}
