package limiter

import (
	"net/netip"
	"slices"
	"time"
)

// A Reservation is a slot held for a login that Decide admitted and that is
// now logging in to the server. Until its backend appears in the census the
// login is invisible there, so the reservation stands in for it: every Decide
// counts it against the login's role and database, and the caller may let the
// next login of the role decide at once instead of holding a lock across the
// whole server login.
//
// The caller releases it exactly once, when the login ends either way:
// Release(true) once the login's backend is visible in the census (the slot
// passes to the backend; only a login waiting to evict a login in flight is
// woken), Release(false) when the login failed (the slot is free again; the
// first waiters are woken). Between the
// backend appearing and Release(true) a census shows the login's backend as
// well: the caller tells the reservation how to recognize it (Identify), and
// the login is then counted once, as a login still logging in, which no
// evicting policy picks as a victim. A backend not recognized is counted
// twice: that errs toward waiting, refusing or evicting one session too many,
// never toward admitting one too many.
type Reservation struct {
	l        *Limiter
	loginID  uint64
	role     string
	database string
	since    time.Time

	// Guarded by l.mu.
	gone   bool
	client netip.AddrPort // the login's server connection, as the census shows it
	pid    uint32         // its backend, once known
}

// Identify records how a census shows the login's backend: client is the
// local end of its server connection (the backend's client_addr and
// client_port), pid the backend's pid once the server has sent it. Either
// may be the zero value (not known, or not shown: a Unix socket); a later
// call keeps what it does not replace, except that a new server connection
// (the login tried again) forgets the pid of the last one's backend.
func (r *Reservation) Identify(client netip.AddrPort, pid uint32) {
	if r == nil {
		return
	}
	r.l.mu.Lock()
	defer r.l.mu.Unlock()
	if client.IsValid() && client != r.client {
		r.client, r.pid = client, 0
	}
	if pid != 0 {
		r.pid = pid
	}
}

// identifies reports whether census row h is the backend of the login that
// holds (or held) a reservation known by client and pid.
func identifies(client netip.AddrPort, pid uint32, h Holder) bool {
	if client.IsValid() && h.Client.IsValid() {
		return client == h.Client
	}
	return pid != 0 && h.PID == pid
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
		l.landed = append(l.landed, landing{role: r.role, database: r.database, seq: l.epoch, at: now, client: r.client, pid: r.pid})
		l.pruneLanded(now)
		// A login that waits to evict one of the logins in flight may
		// now find it among the sessions.
		l.wakeLanding(queueKey{ScopeRole, r.role})
		l.wakeLanding(queueKey{ScopeDatabase, r.database})
		return
	}
	l.wake(queueKey{ScopeRole, r.role}, 1, nil)
	l.wake(queueKey{ScopeDatabase, r.database}, 1, nil)
}

// landing is a reservation released as logged in, numbered by the limiter's
// epoch.
type landing struct {
	role, database string
	seq            uint64
	at             time.Time
	client         netip.AddrPort // as Identify recorded them
	pid            uint32
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

// reservedFor counts the reservations that hold slots of the limit s and
// are not in the census rows themselves: those held, and those released as
// logged in after the census was read (epoch). A reservation whose backend
// is a row is counted by the row (census marks a held one's row Reserved).
func (l *Limiter) reservedFor(s *scopeView, epoch uint64, rows []Holder) int {
	of := func(role, database string) bool {
		return s.key.scope == ScopeRole && role == s.key.name || s.key.scope == ScopeDatabase && database == s.key.name
	}
	inCensus := func(client netip.AddrPort, pid uint32) bool {
		return slices.ContainsFunc(rows, func(h Holder) bool { return identifies(client, pid, h) })
	}
	n := 0
	for r := range l.reserved {
		if of(r.role, r.database) && !inCensus(r.client, r.pid) {
			n++
		}
	}
	if epoch == 0 {
		return n
	}
	for _, g := range l.landed {
		if g.seq > epoch && of(g.role, g.database) && !inCensus(g.client, g.pid) {
			n++
		}
	}
	return n
}

// markLoggingIn flags the census rows that are the backends of logins
// still holding their reservations: they are counted once, by the row, as
// logins still logging in (Reserved), never victims. l.mu is held.
func (l *Limiter) markLoggingIn(rows []Holder) {
	for r := range l.reserved {
		if !r.client.IsValid() && r.pid == 0 {
			continue
		}
		for i := range rows {
			if identifies(r.client, r.pid, rows[i]) {
				rows[i].Reserved = true
			}
		}
	}
}
