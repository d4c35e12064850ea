// Package limiter decides what happens to a login when its role or database
// is at its connection limit: admit it, make it wait, evict other sessions
// for it, or reject it.
//
// The package is pure state and decisions. It does no I/O and no logging and
// reads time from an injected clock; the proxy takes the census (rows of
// pg_stat_activity merged with its own sessions), asks Decide, and carries
// the decision out: it terminates victims, waits, or sends PostgreSQL's
// `too many connections for role "R"` / `... for database "D"` (53300). The
// limiter is a mutex-guarded state machine and never calls out while holding
// its lock.
//
// What the census cannot tell, the limiter remembers: victims handed out and
// not yet reported (they keep their slot until the caller says they are gone,
// are never handed out twice, and count for the login they were evicted for,
// so several logins decided in a row do not over-evict), the order of waiting
// logins, and the counters that Snapshot copies out for the admin surface.
//
// # The caller's loop
//
// For each authenticated login (sketch; the poll interval catches sessions
// that ended without rolegate's knowledge):
//
//	login := limiter.Login{ID: id, Role: role, Database: db, Superuser: rolsuper}
//	defer func() { login.Ticket.Leave() }() // nil-safe; a no-op after Admit or Reject
//	for {
//		// The lock is held across census, evictions and the reservation,
//		// so no other login of the role takes the slot an eviction freed.
//		unlock, err := l.Lock(ctx, login.Role)
//		if err != nil {
//			return err
//		}
//		d := l.Decide(login, roleRule, dbRule, census())
//		for d.Kind == limiter.Evict {
//			for _, v := range d.Victims {
//				if terminateAndWaitGone(v) {
//					l.Evicted(v.PID)
//				} else {
//					l.EvictFailed(v.PID)
//				}
//			}
//			login.Ticket = d.Ticket
//			d = l.Decide(login, roleRule, dbRule, census())
//		}
//		login.Ticket = d.Ticket
//		switch d.Kind {
//		case limiter.Admit:
//			r := l.Reserve(login) // counted until the session is in the census
//			unlock()
//			err := dialAndLogIn()
//			r.Release(err == nil)
//			return err
//		case limiter.Reject:
//			unlock()
//			return tooManyConnections(d.Scope)
//		}
//		unlock() // Wait
//		select {
//		case <-d.Ticket.Ready():
//		case <-time.After(time.Until(d.Ticket.Deadline())): // Decide then rejects, unless a slot freed
//		case <-poll.C: // only while d.Ticket.First()
//		case <-ctx.Done():
//			return ctx.Err()
//		}
//	}
//
// The inner loop ends: a victim reported with EvictFailed is never chosen
// again for the same login (its ticket remembers it), so once the login's
// candidates are exhausted its fallback decides. A caller should still bound
// the rounds, as the proxy does, so that a bug cannot spin with the locks
// held.
//
// When a session that held a slot ends (its server socket closes), the proxy
// calls Released(role, database), which wakes the first waiter; a reserved
// login that failed (Release(false)) does the same.
//
// # Combined role and database limits
//
// The role limit is checked first, as PostgreSQL does. A login that hits both
// limits is planned as a whole: the role's victims are taken from the login's
// database first (one eviction frees both slots), the database's policy finds
// any further victims among the database's other sessions, and if either
// limit ends in Wait or Reject nobody is evicted. The choice is greedy, not an
// optimal search over all victim sets.
package limiter
