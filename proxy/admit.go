package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/internal/wire"
	"github.com/rolegate/rolegate/limiter"
	"github.com/rolegate/rolegate/upstream"
)

// ServerView is what admission needs from the server, through rolegate's control
// connection (upstream.Control implements it).
type ServerView interface {
	// Census lists the client backends holding slots of role or database.
	Census(ctx context.Context, role, database string) ([]limiter.Holder, error)
	// ServerLimits returns rolconnlimit, rolsuper and datconnlimit, cached for ttl.
	ServerLimits(ctx context.Context, role, database string, ttl time.Duration) (roleLimit int, superuser bool, dbLimit int, err error)
	// Terminate runs pg_terminate_backend(t.PID, timeout) if the backend
	// still passes t's guards (the census's backend_start, and for
	// evict-idle its idle state_change), in the same statement; a guard
	// that fails is not an error (upstream.Control.Terminate).
	Terminate(ctx context.Context, t upstream.Target, timeout time.Duration) (upstream.Termination, error)
	// Present reports whether t's backend is still in pg_stat_activity
	// (upstream.Control.Present).
	Present(ctx context.Context, t upstream.Target) (bool, error)
}

// Timings of admission. A victim rolegate holds frees its slot when its server
// socket closes, usually within a millisecond or two of the signal; one
// opened elsewhere is looked for in pg_stat_activity until it has left
// (goneChecks), at most victimGoneTimeout after the signal.
const (
	victimGoneTimeout = 5 * time.Second
	waitPoll          = 250 * time.Millisecond
	serverRetries     = 3
	// maxEvictRounds bounds the rounds of census and eviction in one
	// decide. Every round either frees a slot or rules a victim out for the
	// login (a victim that could not be evicted is never chosen for it
	// again), so only sessions arriving from elsewhere faster than rolegate
	// evicts them, or a bug, need more; the login then fails with 08006
	// instead of spinning with the role's locks held.
	maxEvictRounds = 32
)

// admission is one login's pass through the limiter.
type admission struct {
	s       *Server
	lim     *Limits
	sess    *session
	log     *slog.Logger
	client  net.Conn      // for the hang-up watch while it waits
	cr      *bufio.Reader // the client's reader, which the watch peeks at
	login   limiter.Login
	role    limiter.Rule
	db      limiter.Rule
	self    uint32 // the login's own backend (passthrough), not counted
	authOut []byte // passthrough: the server's messages up to AuthenticationOk, not yet sent
	// failed are the victims this login could not evict, and why, for the
	// DETAIL of a rejection its fallback then decides.
	failed []evictFailure
	// roleSource and dbSource say where the role's and the database's
	// limits come from (Limits.Effective), for the DETAIL of a rejection.
	roleSource, dbSource string
	// seen is the last census, less the victims evicted since, for the
	// DETAIL of a rejection: who holds the slots.
	seen []limiter.Holder
	// waited is how long the login waited before its admission time ran
	// out (timedOut), for the DETAIL of its rejection.
	waited time.Duration
	// inLine: the login has waited in line; the admin views keep showing its
	// place there while it checks again, not the lock or the census.
	inLine bool
	// recheck, after a wake-up that found no slot, is when to look again:
	// the session whose end woke the login may still be leaving the server
	// (its backend exits a moment after its socket closes), so the login
	// looks again soon, backing off to the poll interval.
	recheck time.Duration
	// dryRun: a dry-run rule would not have admitted the login; the
	// server's own 53300 to it then reaches the client as it is.
	dryRun bool
}

// Re-checks after a wake-up that found no slot: the first after
// recheckFirst, each later one twice as long, up to the poll interval.
const recheckFirst = 5 * time.Millisecond

// evictFailure is one victim admission could not evict; cause is in words a
// client may read (the server's message, or what did not happen), never a
// connection string or a secret.
type evictFailure struct {
	pid   uint32
	cause string
}

// admit decides whether the client may log in (proxy mode, before it has a
// backend), evicting or waiting as the role's policy says. The admission
// locks are held only while it decides; an admitted login gets a lease on a
// reserved slot (c.lease), which every census counts until the login
// releases it: once its backend is in pg_stat_activity, or when it failed.
// The lease is nil when nothing was reserved (no limits, exempt).
func (c *clientConn) admit() error {
	l, err := c.admission(0)
	c.lease = l
	return err
}

// admitPassthrough decides on a passthrough login, which the server has
// authenticated and given a backend (left out of the count) before the
// client hears AuthenticationOk; a rejection still sends the server's last
// authentication messages (c.authOut).
func (c *clientConn) admitPassthrough() error {
	s, sess := c.s, c.sess
	s.pending.setPID(sess, sess.backendPID)
	l, err := c.admission(sess.backendPID)
	if err != nil {
		return err
	}
	// Admitted: round took the backend out of the pending set under the
	// admission locks, so the next login of the role counts it.
	l.release(true) // nothing reserved: the backend is counted already
	// Time spent waiting for a slot does not count against the login.
	_ = c.client.SetDeadline(time.Now().Add(s.cfg.StartupTimeout / 2))
	return nil
}

// admission runs one login through admission; self is its own backend
// (passthrough), which the census leaves out. A failure of rolegate's own
// (the census, the locks) is FATAL 08006 to the client.
func (c *clientConn) admission(self uint32) (*lease, error) {
	if err := c.gate(); err != nil { // an operator's PAUSE or DISABLE, before any limit
		return nil, err
	}
	l, err := c.admitOnce(self)
	if err != nil && !isTooMany(err) && !errors.Is(err, errClientClosed) &&
		!errors.Is(context.Cause(c.ctx), errShutdown) { // shutdown is not a failure, and the socket is gone
		c.s.quiet.log(c.log, slog.LevelWarn, "", "admission failed", "err", err)
		return l, &clientError{code: "08006", msg: "rolegate could not check the connection limits: " + admissionCause(err),
			class: ReasonServerError, err: err}
	}
	return l, err
}

// isTooMany reports whether err is a login refused at a limit (53300).
func isTooMany(err error) bool {
	var ce *clientError
	return errors.As(err, &ce) && ce.class == ReasonTooMany
}

// controlTimeout bounds each query admission sends on the control connection.
const controlTimeout = 10 * time.Second

func (c *clientConn) admitOnce(self uint32) (l *lease, err error) {
	s, ctx, sess, log := c.s, c.ctx, c.sess, c.log
	lim := s.cfg.Limits
	if lim == nil || sess.replication {
		return nil, nil
	}
	a := &admission{s: s, lim: lim, sess: sess, log: log, client: c.client, cr: c.cr, self: self, authOut: c.authOut,
		login: limiter.Login{ID: sess.id, Role: sess.user, Database: sess.database,
			ApplicationName: sess.appName, Client: sess.clientIP}}
	if err := a.rules(ctx); err != nil {
		return nil, err
	}
	if a.login.Superuser || !a.role.Limited() && !a.db.Limited() {
		return nil, nil // no limit anywhere costs nothing more
	}
	c.counted = true
	// A login waits at most its wait_timeout for a slot, plus the time its own
	// evictions and queries take; nothing here may hang it for good.
	ctx, cancel := context.WithTimeout(ctx, s.cfg.StartupTimeout+max(a.role.WaitTimeout, a.db.WaitTimeout))
	defer cancel()
	started := time.Now()
	waiting := false
	// Abandon, not Leave: after a panic in decide or evict, victims handed
	// out and not reported must not hold slots in the limiter's books.
	defer func() { a.login.Ticket.Abandon() }()
	defer func() {
		if waiting { // counted once per login, however many rounds it waited
			s.obs.Waited(sess.user, time.Since(started), err == nil)
		}
	}()
	// What the login waits for when its time runs out: the limit it last
	// waited on, or, in the lock, the role's (or the database's).
	waitedOn := a.lockWait()
	// Passthrough admits a login whose backend exists and is counted
	// already: there is nothing to reserve.
	reserve := c.authOut == nil
	for {
		// A login in line keeps showing its place while it checks again.
		if !a.inLine {
			sess.setWaiting(waitingFor{what: `waiting for the admission lock of role "` + sess.user + `"`})
		}
		d, l, err := a.round(ctx, reserve)
		if err != nil {
			var locking *lockError
			if errors.As(err, &locking) && ranOut(ctx) {
				// The logins of the role ahead of it took all its time: it
				// found no slot, which is 53300, not a failure of rolegate.
				return nil, a.reject(a.timedOut(waitedOn, started, "waited for the admission lock"))
			}
			return nil, err
		}
		switch d.Kind {
		case limiter.Admit:
			if waiting {
				log.Info("admitted after waiting", "waited", time.Since(started).Round(time.Millisecond))
			}
			c.dryRun = a.dryRun
			sess.setState(StateConnecting)
			return l, nil
		case limiter.Reject:
			return nil, a.reject(d)
		}
		// Wait: the locks are free; other logins of the role decide meanwhile.
		sess.setWaiting(slotWait(sess, d))
		if d.Landing {
			// Part of evicting, not a wait for a slot: the login it will
			// evict is still logging in.
			log.Debug("waiting for a login in flight to evict", "reason", d.Reason)
		} else if d.Ticket != nil && !waiting {
			waiting, a.inLine = true, true
			log.Info("waiting for a slot", "scope", d.Scope.String(), "limit", d.Limit, "reason", d.Reason)
		}
		waitedOn = d
		if err := a.wait(ctx, d); err != nil {
			if ranOut(ctx) {
				return nil, a.reject(a.timedOut(waitedOn, started, "waited"))
			}
			if waiting {
				log.Info("left the wait queue", "waited", time.Since(started).Round(time.Millisecond), "why", err.Error())
			}
			return nil, err
		}
	}
}

// ranOut reports whether the admission's own time (startup_timeout plus
// wait_timeout) is over, while the session itself goes on.
func ranOut(ctx context.Context) bool {
	return errors.Is(context.Cause(ctx), context.DeadlineExceeded)
}

// lockWait is the decision a login that runs out of time waiting for the
// admission lock gets: the role's limit, or the database's if only that is set.
func (a *admission) lockWait() limiter.Decision {
	if a.role.Limited() {
		return limiter.Decision{Kind: limiter.Wait, Scope: limiter.ScopeRole, Limit: a.role.MaxSessions, Policy: a.role.Policy}
	}
	return limiter.Decision{Kind: limiter.Wait, Scope: limiter.ScopeDatabase, Limit: a.db.MaxSessions, Policy: a.db.Policy}
}

// timedOut turns the last wait of a login whose admission time ran out into
// its rejection.
func (a *admission) timedOut(d limiter.Decision, started time.Time, what string) limiter.Decision {
	d.Kind = limiter.Reject
	a.waited = time.Since(started)
	why := what + " " + time.Since(started).Round(time.Millisecond).String() + ", admission time (startup_timeout + wait_timeout) ran out"
	if d.Reason != "" {
		why = d.Reason + "; " + why
	}
	d.Reason = why
	return d
}

// lockError is a login that could not take the admission locks (in time).
type lockError struct{ err error }

func (e *lockError) Error() string { return e.err.Error() }
func (e *lockError) Unwrap() error { return e.err }

// round is one pass of a login through admission: take the locks, decide
// (census, Decide, evictions) and, for a login admitted before it has a
// backend, reserve its slot. The locks are released when round returns, on
// every path: an error, a panic in decide or evict (handle recovers it; the
// role must not stay locked on every instance), and an admission, whose
// server login runs without them because the reservation stands in for it.
// Under newest-wins and evict-idle a login that needs a slot held by a
// reservation waits for that login to land as a session, then evicts it
// (limiter: waiting for logins in flight).
func (a *admission) round(ctx context.Context, reserve bool) (d limiter.Decision, l *lease, err error) {
	unlock, err := a.lock(ctx)
	if err != nil {
		return d, nil, &lockError{&admissionError{what: `the admission lock of role "` + a.sess.user + `"`, err: err}}
	}
	if !a.inLine {
		a.sess.setWaiting(waitingFor{what: `waiting for the census of role "` + a.sess.user + `"`})
	}
	defer unlock()
	if d, err = a.decide(ctx); err != nil || d.Kind != limiter.Admit {
		return d, nil, err
	}
	if !reserve {
		// Passthrough: the admitted backend counts from here on. It must leave
		// the pending set while the locks are held, or the next login's
		// census, taken once they are released, would skip it as pending.
		a.s.pending.remove(a.sess)
		return d, nil, nil
	}
	l, err = a.reserve(ctx)
	return d, l, err
}

// slotWait is what a login that Decide told to wait waits for: a slot of
// the limit that decided, with its place in line.
func slotWait(sess *session, d limiter.Decision) waitingFor {
	what := `waiting for a slot of role "` + sess.user + `"`
	if d.Scope == limiter.ScopeDatabase {
		what = `waiting for a slot of database "` + sess.database + `"`
	}
	if d.Landing {
		what += " (held by logins in flight: it evicts one once it is a session)"
	}
	return waitingFor{what: what, limit: d.Limit, ticket: d.Ticket}
}

// serverLocker serializes admissions across rolegate instances with the
// server's advisory locks (upstream.Control implements it). Its locks
// serialize the instance's own logins too.
type serverLocker interface {
	LockRole(ctx context.Context, role string) (unlock func(), err error)
	LockDatabase(ctx context.Context, database string) (unlock func(), err error)
}

// lock takes the role's admission lock and, when the database has a limit,
// the database's (always in that order: logins of other roles count against
// the same database limit). With a server that has advisory locks those are
// the locks (they serialize this instance's logins first, then the
// instances'), else the limiter's in-process ones. unlock releases what was
// taken, once; on an error or a panic while locking nothing stays held.
func (a *admission) lock(ctx context.Context) (unlock func(), err error) {
	role, database := a.lim.Limiter.Lock, a.lim.Limiter.LockDatabase
	if remote, ok := a.lim.Server.(serverLocker); ok {
		role, database = remote.LockRole, remote.LockDatabase
	}
	steps := []func(context.Context, string) (func(), error){role}
	keys := []string{a.sess.user}
	if a.db.Limited() {
		steps, keys = append(steps, database), append(keys, a.sess.database)
	}
	var held []func()
	var once sync.Once
	release := func() {
		once.Do(func() {
			for i := len(held) - 1; i >= 0; i-- {
				held[i]()
			}
		})
	}
	locked := false
	defer func() {
		if !locked {
			release()
		}
	}()
	for i, step := range steps {
		u, err := step(ctx, keys[i])
		if err != nil {
			return nil, err
		}
		held = append(held, u)
	}
	locked = true
	return release, nil
}

// serverReserver holds reserved slots on the server, where every rolegate
// instance's census counts them (upstream.Control implements it).
type serverReserver interface {
	Reserve(ctx context.Context, role, database string) (release func(), err error)
}

// A lease is an admitted login's reserved slot, from the decision until the
// login's backend is in pg_stat_activity (the login is counted there from
// then on) or the login failed. It is the limiter's reservation, which this
// instance's admissions count, and, with a server that can hold them, an
// advisory lock that other instances' census counts. release runs once
// whatever the path; a nil lease releases nothing.
type lease struct {
	once   sync.Once
	local  *limiter.Reservation
	server func()
	signal func(upstream.SlotKind) // tells the other instances how it ended
}

// reserved reports whether the lease holds a reserved slot.
func (l *lease) reserved() bool { return l != nil && l.local != nil }

// identify tells this instance's census how the login's backend shows in
// pg_stat_activity before the lease ends, so that it counts the login once
// and never picks it as a victim (limiter.Reservation.Identify).
func (l *lease) identify(client netip.AddrPort, pid uint32) {
	if l != nil {
		l.local.Identify(client, pid)
	}
}

// release ends the lease: loggedIn once the backend is in pg_stat_activity
// (rolegate has the server's ReadyForQuery), false when the login failed,
// which frees the slot and wakes the first waiters.
func (l *lease) release(loggedIn bool) {
	if l == nil {
		return
	}
	l.once.Do(func() {
		if l.signal != nil {
			kind := upstream.SlotFreed
			if loggedIn {
				kind = upstream.SlotLanded
			}
			defer l.signal(kind) // once the slot is released here
		}
		if l.server != nil {
			l.server()
		}
		l.local.Release(loggedIn)
	})
}

// reserve takes the lease of a login just admitted, while the admission
// locks are held, so that the next login to decide counts it.
func (a *admission) reserve(ctx context.Context) (_ *lease, err error) {
	l := &lease{local: a.lim.Limiter.Reserve(a.login)}
	remote, ok := a.lim.Server.(serverReserver)
	if !ok {
		return l, nil
	}
	taken := false
	defer func() {
		if !taken { // an error or a panic: the login will not use the slot
			l.local.Release(false)
		}
	}()
	database := "" // a database without a limit needs no count
	if a.db.Limited() {
		database = a.sess.database
	}
	cctx, cancel := context.WithTimeout(ctx, controlTimeout)
	defer cancel()
	release, err := remote.Reserve(cctx, a.sess.user, database)
	if err != nil {
		return nil, &admissionError{what: `reserving a slot of role "` + a.sess.user + `"`, err: err}
	}
	l.server, taken = release, true
	role, db := a.sess.user, a.sess.database
	// Only a login waiting to evict a login in flight waits for one to land.
	evicts := a.role.Limited() && a.role.Policy.Evicts() || a.db.Limited() && a.db.Policy.Evicts()
	l.signal = func(kind upstream.SlotKind) {
		if kind == upstream.SlotFreed || evicts {
			a.s.signalSlot(kind, role, db)
		}
	}
	return l, nil
}

// rules resolves the effective rules of the login's role and database.
func (a *admission) rules(ctx context.Context) error {
	var err error
	a.role, a.db, a.roleSource, a.dbSource, a.login.Superuser, err = a.lim.effective(ctx, a.sess.user, a.sess.database)
	if err != nil {
		return &admissionError{what: `reading the connection limits of role "` + a.sess.user + `"`, err: err}
	}
	return nil
}

// admissionError is a step of admission that failed: what names it in words
// a client may read; err, the cause, may name the control role and host
// (a driver's text) and goes only to the log.
type admissionError struct {
	what string
	err  error // nil: what says it all
}

func (e *admissionError) Error() string {
	if e.err == nil {
		return e.what
	}
	return e.what + ": " + e.err.Error()
}

func (e *admissionError) Unwrap() error { return e.err }

// admissionCause is why admission failed, for the client: the step, and
// whether the control connection failed or did not answer in time.
func admissionCause(err error) string {
	var ae *admissionError
	what := "admission"
	if errors.As(err, &ae) {
		if ae.err == nil {
			return ae.what
		}
		what = ae.what
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return what + " failed: the control connection did not answer in time"
	}
	return what + " failed: the control connection failed"
}

// decide takes the census and asks the limiter until the answer is not Evict,
// carrying out each eviction. A victim that could not be evicted is reported
// with EvictFailed, which rules it out for this login, so the rounds end once
// the candidates are exhausted (the rule's fallback decides); maxEvictRounds
// bounds them whatever happens.
func (a *admission) decide(ctx context.Context) (limiter.Decision, error) {
	var reuse []limiter.Holder // the last census less its victims, when they all left
	for round := 0; ; round++ {
		if round == maxEvictRounds {
			return limiter.Decision{}, &admissionError{what: fmt.Sprintf("admission of role %q gave up after %d rounds of census and eviction", a.sess.user, maxEvictRounds)}
		}
		holders, fresh := reuse, reuse == nil
		reuse = nil
		if fresh {
			var err error
			if holders, err = a.census(ctx); err != nil {
				return limiter.Decision{}, err
			}
		}
		d := a.lim.Limiter.Decide(a.login, a.role, a.db, holders)
		a.login.Ticket = d.Ticket
		a.tell(d)
		if d.Kind != limiter.Evict {
			return d, nil
		}
		gone := 0
		for i, v := range d.Victims {
			policy := d.Policy
			if i < len(d.VictimPolicies) {
				policy = d.VictimPolicies[i]
			}
			if a.evict(ctx, v, policy, d) {
				a.lim.Limiter.Evicted(v.PID)
				gone++
			} else {
				a.lim.Limiter.EvictFailed(v.PID)
			}
		}
		if fresh && gone == len(d.Victims) {
			// Every victim has left, and the admission locks were held
			// throughout: no other login of the role (or database) was
			// admitted meanwhile, here or on another instance. The census,
			// less its victims, still stands, so the next decision is taken
			// on it, sparing a census (about a millisecond). Its epoch stays
			// the old one: a reservation that landed since is counted as
			// well as its row, never missed. A session opened directly in
			// between meets the server's own limit, as it could between any
			// census and login. Once only: a decision that evicts again
			// reads a fresh census after that.
			reuse = slices.DeleteFunc(slices.Clone(holders), func(h limiter.Holder) bool {
				return slices.ContainsFunc(d.Victims, func(v limiter.Holder) bool { return v.PID == h.PID })
			})
			if reuse == nil {
				reuse = []limiter.Holder{}
			}
		}
	}
}

// census reads the census of the login's role and database, less its own
// backend (passthrough) and the passthrough logins not yet admitted, with
// rolegate's own sessions marked.
func (a *admission) census(ctx context.Context) ([]limiter.Holder, error) {
	cctx, cancel := context.WithTimeout(ctx, controlTimeout)
	defer cancel()
	a.login.CensusEpoch = a.lim.Limiter.Epoch() // before the census, see limiter.Login
	holders, err := a.lim.Server.Census(cctx, a.sess.user, a.sess.database)
	if err != nil {
		return nil, &admissionError{what: `the census of role "` + a.sess.user + `"`, err: err}
	}
	pending := a.s.pending.matcher()
	holders = slices.DeleteFunc(holders, func(h limiter.Holder) bool {
		return a.self != 0 && h.PID == a.self || pending(h)
	})
	a.s.markOwn(holders)
	a.seen = holders
	return holders, nil
}

// evict terminates one victim, chosen under policy (which decides the
// guard; the messages name the decision's policy), and returns once its slot
// is free. It reports false when the victim was not evicted: the terminate
// failed, the victim was no longer the session the census saw (its pid
// reused, or, under evict-idle, no longer idle), or it did not exit in time.
func (a *admission) evict(ctx context.Context, v limiter.Holder, policy limiter.Policy, d limiter.Decision) bool {
	a.sess.setWaiting(waitingFor{what: fmt.Sprintf("waiting for pid %d to exit (evicted for this login, policy %s)", v.PID, policy)})
	why := evictMessage(d.Scope, d.Policy, a.sess.user, a.sess.database, a.sess.appName, a.sess.clientAddr)
	attrs := []any{"victim_pid", v.PID, "victim_role", v.Role, "victim_database", v.Database,
		"victim_state", v.State, "victim_age", time.Since(v.BackendStart).Round(time.Millisecond),
		"via_rolegate", v.ViaRolegate, "policy", d.Policy.String(), "scope", d.Scope.String(), "reason", d.Reason}
	// The server signals the victim only if it is still the session the
	// census saw: same backend_start (the pid was not reused) and, for
	// evict-idle, still idle since the same state_change.
	target := upstream.Target{PID: v.PID, BackendStart: v.BackendStart}
	if policy == limiter.PolicyEvictIdle {
		target.IdleSince = v.StateChange
	}
	held := a.s.registry.byBackendPID(v.PID)
	if held != nil {
		attrs = append(attrs, "victim_client", held.clientAddr, "victim_application_name", held.appName)
	}
	r, err := a.s.terminate(ctx, target, held, why)
	if r == upstream.Terminated && err == nil {
		var closed <-chan struct{}
		if held != nil {
			closed = held.serverGone
		}
		r, err = a.s.awaitGone(ctx, target, closed)
	}
	if ctx.Err() != nil {
		return false // the login is over (its client left, or shutdown): no failure to report
	}
	if r != upstream.Terminated || err != nil {
		return a.notEvicted(v, r, err, attrs)
	}
	a.log.Info("evicted", attrs...)
	// The victim no longer holds a slot: a rejection's DETAIL must not list it.
	a.seen = slices.DeleteFunc(slices.Clone(a.seen), func(h limiter.Holder) bool { return h.PID == v.PID })
	now := time.Now()
	ev := Event{Time: now, Kind: "eviction", Role: a.sess.user, Database: a.sess.database,
		Client: a.sess.clientAddr, Policy: d.Policy.String(), Scope: d.Scope.String(),
		VictimPID: v.PID, VictimRole: v.Role, VictimClient: clientOf(held), ViaRolegate: held != nil, Reason: d.Reason,
		VictimIdle: idleFor(v.State, v.StateChange, now)}
	if !v.BackendStart.IsZero() {
		ev.VictimAge = now.Sub(v.BackendStart)
	}
	if held != nil {
		ev.VictimApplicationName = held.appName
	} else if v.Client.IsValid() {
		ev.VictimClient = v.Client.String() // as the server saw it
	}
	a.s.record(ev)
	return true
}

// goneChecks are the pauses between looks for a signalled victim in
// pg_stat_activity, the last repeated. An idle backend leaves it about 2 ms
// after the signal on an unloaded machine, so the first looks come every
// quarter millisecond (a look is one small query on the control
// connection; an eviction makes a dozen). pg_terminate_backend's timeout
// form looks only every 100 ms, which made an eviction cost 100 ms.
var goneChecks = [...]time.Duration{
	250 * time.Microsecond, 250 * time.Microsecond, 250 * time.Microsecond, 250 * time.Microsecond,
	250 * time.Microsecond, 250 * time.Microsecond, 250 * time.Microsecond, 250 * time.Microsecond,
	500 * time.Microsecond, 500 * time.Microsecond, time.Millisecond, time.Millisecond,
	2 * time.Millisecond, 4 * time.Millisecond, 8 * time.Millisecond, 16 * time.Millisecond, 32 * time.Millisecond,
}

// relayedLookAfter is how long admission waits for the server's close of a
// victim rolegate relays before it looks for the backend in pg_stat_activity
// too. The close is the sign to wait for: the server closes once the backend
// has left and freed its slot, while pg_stat_activity drops it a moment
// before. But the close stays unread behind a result that the victim's client
// stopped reading, and the backend, blocked writing to rolegate, exits on
// the signal all the same.
const relayedLookAfter = 50 * time.Millisecond

// awaitGone waits until the signalled victim t has left: closed (the
// server's close of a victim rolegate relays, nil for others) is closed, or
// the backend is no longer in pg_stat_activity (for a relayed victim, looked
// at only after relayedLookAfter). It reports NotGone when neither happened
// within victimGoneTimeout of the signal. Leaving pg_stat_activity comes
// just before the server frees the slot; a login that meets the server's
// 53300 in between tries again with its reserved slot (admitAndLogIn).
func (s *Server) awaitGone(ctx context.Context, t upstream.Target, closed <-chan struct{}) (upstream.Termination, error) {
	deadline := time.Now().Add(victimGoneTimeout)
	i, first := 0, goneChecks[0]
	if closed != nil {
		i, first = len(goneChecks)-1, relayedLookAfter
	}
	timer := time.NewTimer(first)
	defer timer.Stop()
	for ; ; i++ {
		select {
		case <-closed:
			return upstream.Terminated, nil
		case <-timer.C:
		case <-ctx.Done():
			return 0, context.Cause(ctx)
		}
		timer.Reset(goneChecks[min(i+1, len(goneChecks)-1)])
		cctx, cancel := context.WithTimeout(ctx, controlTimeout)
		present, err := s.cfg.Limits.Server.Present(cctx, t)
		cancel()
		switch {
		case err != nil && closed != nil:
			// The server's close still tells: wait for it alone.
			return awaitClose(ctx, closed, deadline)
		case err != nil:
			return 0, err
		case !present:
			return upstream.Terminated, nil
		case time.Now().After(deadline):
			return upstream.NotGone, nil
		}
	}
}

// awaitClose waits for closed until deadline (NotGone).
func awaitClose(ctx context.Context, closed <-chan struct{}, deadline time.Time) (upstream.Termination, error) {
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case <-closed:
		return upstream.Terminated, nil
	case <-t.C:
		return upstream.NotGone, nil
	case <-ctx.Done():
		return 0, context.Cause(ctx)
	}
}

// notEvicted logs why victim v was not evicted (r, or err) and remembers it
// for the DETAIL of a rejection; it returns false, for evict. A victim that
// had already ended, or whose pid a newer backend has, is no failure: its
// slot is free, and the next census shows it. The lines are rate-limited
// per role and cause, so a cause that hits every login of a role (the
// control role may not signal its sessions) costs a line a second.
func (a *admission) notEvicted(v limiter.Holder, r upstream.Termination, err error, attrs []any) bool {
	switch {
	case err != nil:
		cause, class := clientCause(err)
		a.failed = append(a.failed, evictFailure{pid: v.PID, cause: cause})
		a.s.quiet.log(a.log, slog.LevelWarn, a.sess.user+" "+class, "eviction failed", append(attrs, "err", err)...)
	case r == upstream.NotIdle || r == upstream.NotGone:
		cause := r.String()
		if r == upstream.NotGone {
			cause = "it did not exit within " + victimGoneTimeout.String()
		}
		a.failed = append(a.failed, evictFailure{pid: v.PID, cause: cause})
		a.s.quiet.log(a.log, slog.LevelWarn, a.sess.user+" "+cause, "eviction failed", append(attrs, "why", cause)...)
	default:
		a.s.quiet.log(a.log, slog.LevelInfo, a.sess.user+" "+r.String(), "not evicted", append(attrs, "why", r.String())...)
	}
	return false
}

// clientCause is why a terminate failed, in words a client may read (the
// server's own message for the terminate, or what kind of failure it was),
// and a class that keys the log throttle. A failure to connect says no more
// than that: its message would name the control role and its server.
func clientCause(err error) (cause, class string) {
	var pe *pgconn.PgError
	var ce *pgconn.ConnectError
	switch {
	case errors.As(err, &ce):
		return "the control connection failed", "connect"
	case errors.As(err, &pe):
		return pe.Message, pe.Code
	case errors.Is(err, context.DeadlineExceeded):
		return "the control connection did not answer in time", "timeout"
	case errors.Is(err, context.Canceled):
		return "the login ended", "canceled"
	}
	return "the control connection failed", "control"
}

// failureDetail is the DETAIL of a rejection after failed evictions:
// `rolegate could not evict pid 4242: permission denied to terminate
// process`, naming at most a few victims.
func (a *admission) failureDetail() string {
	if len(a.failed) == 0 {
		return ""
	}
	const most = 3
	parts := make([]string, 0, most)
	for _, f := range a.failed[:min(len(a.failed), most)] {
		parts = append(parts, fmt.Sprintf("pid %d: %s", f.pid, f.cause))
	}
	detail := "rolegate could not evict " + strings.Join(parts, "; ")
	if n := len(a.failed) - most; n > 0 {
		detail += fmt.Sprintf("; and %d more", n)
	}
	return detail
}

// wait blocks until the login's turn may have come: a slot freed, the poll
// interval passed (sessions elsewhere end without telling rolegate), or the
// wait timed out (the next Decide then rejects unless a slot freed). A client
// that hangs up while it waits leaves at once: rolegate watches its socket.
func (a *admission) wait(ctx context.Context, d limiter.Decision) error {
	poll := waitPoll
	if a.s.cfg.poll > 0 {
		poll = a.s.cfg.poll
	}
	delay := poll
	var ready <-chan struct{}
	if t := d.Ticket; t != nil {
		// Only the first waiter polls; the others are signalled when a
		// slot frees here or when they become first (limiter.Ticket.First).
		// A login waiting for logins in flight to land, to evict one, has
		// no deadline of its own (its admission time bounds it), nor has
		// one whose deadline passed while it waited in line and now acts.
		if dl := t.Deadline(); dl.After(time.Now()) {
			delay = max(time.Until(dl), time.Millisecond)
		}
		if t.First() {
			delay = min(poll, delay)
		}
		ready = t.Ready()
	}
	if a.recheck > 0 {
		delay = min(delay, a.recheck)
		a.recheck *= 2
		if a.recheck >= poll {
			a.recheck = 0
		}
	}
	timer := time.NewTimer(delay)
	defer timer.Stop()
	left := watchHangUp(a.client, a.cr)
	defer left.stop()
	select {
	case <-ready:
		a.recheck = recheckFirst
	case <-timer.C:
	case <-left.gone:
		return errClientClosed
	case <-ctx.Done():
		return context.Cause(ctx)
	}
	return nil
}

// hangUpWatch reads ahead on a client that should be silent (it waits for
// AuthenticationOk), to notice when it goes away. A byte it reads stays in the
// buffered reader for whoever reads next.
type hangUpWatch struct {
	conn     net.Conn
	gone     chan struct{} // closed when the client hung up
	finished chan struct{}
}

func watchHangUp(conn net.Conn, cr *bufio.Reader) *hangUpWatch {
	w := &hangUpWatch{conn: conn, gone: make(chan struct{}), finished: make(chan struct{})}
	_ = conn.SetReadDeadline(time.Time{})
	go func() {
		defer close(w.finished)
		if _, err := cr.Peek(1); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			close(w.gone)
		}
	}()
	return w
}

// stop ends the watch: a read deadline in the past wakes the blocked read.
func (w *hangUpWatch) stop() {
	_ = w.conn.SetReadDeadline(time.Now())
	<-w.finished
	_ = w.conn.SetReadDeadline(time.Time{})
}

// reject answers as PostgreSQL does: AuthenticationOk, then the FATAL 53300,
// in one write (fail sends it), without a server connection ever being
// opened. The login's startup deadline may be long past (it waited): the
// write has a bound of its own (writeClient), so a client that does not read
// cannot keep the session open.
func (a *admission) reject(d limiter.Decision) error {
	// PostgreSQL quotes names as they are, without escaping.
	msg := `too many connections for role "` + a.sess.user + `"`
	if d.Scope == limiter.ScopeDatabase {
		msg = `too many connections for database "` + a.sess.database + `"`
	}
	out := a.authOut // passthrough: SASLFinal and AuthenticationOk from the server
	if out == nil {
		out = wire.Encode(nil, &pgproto3.AuthenticationOk{})
	}
	// The first line is PostgreSQL's, which clients match on; DETAIL says
	// which limit, from where, who holds it (and why the policy's
	// evictions or a wait did not help); HINT, how to get a slot.
	e := &clientError{code: "53300", msg: msg, before: out, class: ReasonTooMany,
		detail: a.rejectDetail(d), hint: rejectHint(d)}
	// Recorded before the client is told: what a client has seen is
	// already in the events, the metrics and the log.
	a.s.record(Event{Time: time.Now(), Kind: "rejection", Role: a.sess.user, Database: a.sess.database,
		Client: a.sess.clientAddr, Policy: d.Policy.String(), Scope: d.Scope.String(), Reason: d.Reason})
	a.s.obs.LoginFailed(a.sess.user, ReasonTooMany) // the client proved who it is before admission
	// A leaked pool retrying at its limit is rejected thousands of times a
	// second; the events and the metrics still count every rejection.
	attrs := []any{"sqlstate", "53300", "scope", d.Scope.String(),
		"limit", d.Limit, "sessions", d.Count, "policy", d.Policy.String(), "reason", d.Reason}
	if f := a.failureDetail(); f != "" {
		attrs = append(attrs, "detail", f)
	}
	a.s.quiet.log(a.log, slog.LevelInfo, a.sess.user, "rejected", attrs...)
	return e
}

// errServerFull is the server's own 53300 during a login rolegate admitted: a
// session raced in from elsewhere, and admission runs again.
var errServerFull = errors.New("server at its connection limit")

// markOwn flags the census rows that are sessions rolegate holds.
func (s *Server) markOwn(holders []limiter.Holder) {
	own := s.registry.origins()
	for i := range holders {
		origin, ok := own[holders[i].PID]
		holders[i].ViaRolegate = ok
		holders[i].Origin = origin // protect lists and same-client match the real client
	}
}

// pendingLogins are the passthrough logins from their server connection to
// their admission. In passthrough the server logs a client in before rolegate
// decides on it, so a census taken meanwhile lists the backend of every login
// still in admission. Such a backend holds no slot in rolegate's count: it is
// left out of every census (not only its own login's) and never chosen as a
// victim, so pending logins neither wait for nor evict each other; a login
// leaves the set when it is admitted, with its role's admission lock still
// held, and counts from then on.
//
// What holds: rolegate admits one login of a role (and of a limited database)
// at a time and counts every admitted session, so admitted sessions never
// exceed the limit. The server's own count is higher while logins are
// pending: it counts their backends, which it let in when each logged in
// (PostgreSQL checks rolconnlimit and datconnlimit once, at backend start,
// never later). A pending backend therefore cannot make the server refuse a
// login it already let in; it can make the server refuse a new login at the
// server's own limit (the server's 53300, as without rolegate), and a pending
// login rolegate rejects stays pending until its backend has exited (close).
type pendingLogins struct {
	mu     sync.Mutex
	logins map[*session]pendingLogin
}

type pendingLogin struct {
	// client is the server connection's local end: pg_stat_activity shows it
	// as the backend's client_addr and client_port from the backend's first
	// row on, before rolegate knows the backend's pid.
	client netip.AddrPort
	pid    uint32 // the backend, once its BackendKeyData has come
}

// add records sess, whose server connection is server, as pending.
func (p *pendingLogins) add(sess *session, server net.Conn) {
	client := backendClient(server)
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.logins == nil {
		p.logins = make(map[*session]pendingLogin)
	}
	p.logins[sess] = pendingLogin{client: client}
}

// backendClient is how pg_stat_activity shows the backend of server
// connection server: its client_addr and client_port are the connection's
// local end. Invalid for a Unix socket (the census shows no address then).
func backendClient(server net.Conn) netip.AddrPort {
	a, ok := server.LocalAddr().(*net.TCPAddr)
	if !ok {
		return netip.AddrPort{}
	}
	client := a.AddrPort()
	return netip.AddrPortFrom(client.Addr().Unmap(), client.Port())
}

// setPID records the backend pid of a pending login.
func (p *pendingLogins) setPID(sess *session, pid uint32) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if l, ok := p.logins[sess]; ok {
		l.pid = pid
		p.logins[sess] = l
	}
}

// remove ends sess's pending state; removing twice is harmless.
func (p *pendingLogins) remove(sess *session) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.logins, sess)
}

// matcher returns a test for census rows of pending logins, as of now. A row
// is matched by its client address when the census shows one (exact: the
// server connection is open while its login is pending, so no other
// connection has its port), else by pid.
func (p *pendingLogins) matcher() func(limiter.Holder) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.logins) == 0 {
		return func(limiter.Holder) bool { return false }
	}
	clients := make(map[netip.AddrPort]bool, len(p.logins))
	pids := make(map[uint32]bool, len(p.logins))
	for _, l := range p.logins {
		if l.client.IsValid() {
			clients[l.client] = true
		}
		if l.pid != 0 {
			pids[l.pid] = true
		}
	}
	return func(h limiter.Holder) bool {
		if h.Client.IsValid() {
			return clients[h.Client]
		}
		return h.PID != 0 && pids[h.PID]
	}
}

// ErrNoControl is returned by Kill when rolegate has no control connection to
// terminate backends through.
var ErrNoControl = errors.New("terminating sessions needs the control connection ([control] dsn) and limits")

// Kill terminates one server backend for an operator, whether rolegate relays
// it or not. A client rolegate relays is told why, with the server's SQLSTATE
// 57P01. It reports false when no such backend was there to terminate.
func (s *Server) Kill(ctx context.Context, pid uint32, by string) (bool, error) {
	lim := s.cfg.Limits
	if lim == nil {
		return false, ErrNoControl
	}
	held := s.registry.byBackendPID(pid)
	// An operator names a pid: no census to guard with, as with
	// pg_terminate_backend by hand.
	r, err := s.terminate(ctx, upstream.Target{PID: pid}, held,
		"terminating connection: rolegate terminated this session at an operator's request ("+by+")")
	ok := r == upstream.Terminated
	attrs := []any{"pid", pid, "by", by, "via_rolegate", held != nil}
	if held != nil {
		attrs = append(attrs, "role", held.user, "database", held.database, "client", held.clientAddr)
	}
	switch {
	case err != nil:
		s.log.Warn("kill failed", append(attrs, "err", err)...)
		return false, fmt.Errorf("terminate backend %d: %w", pid, err)
	case !ok:
		s.log.Info("kill: no such backend", attrs...)
		return false, nil
	}
	s.log.Info("killed", attrs...)
	ev := Event{Time: time.Now(), Kind: "kill", Role: "", VictimPID: pid, ViaRolegate: held != nil,
		VictimClient: clientOf(held), VictimRole: roleOf(held), Reason: "operator: " + by}
	if held != nil {
		ev.VictimApplicationName = held.appName
	}
	s.record(ev)
	return true, nil
}

// terminate signals one server backend with pg_terminate_backend(pid, 0),
// if it passes t's guards. When rolegate relays it (held), its client is
// told why in place of the server's 57P01 text; if the signal fails or is
// not sent, the session goes on untouched. Another instance that relays it
// is told first (noticePeers), and tells its client the same.
func (s *Server) terminate(ctx context.Context, t upstream.Target, held *session, why string) (upstream.Termination, error) {
	if held != nil {
		held.evictMsg.Store(&why)
	} else {
		s.noticePeers(ctx, t.PID, why) // another instance may relay it
	}
	ctx, cancel := context.WithTimeout(ctx, controlTimeout)
	defer cancel()
	r, err := s.cfg.Limits.Server.Terminate(ctx, t, 0)
	if (err != nil || r != upstream.Terminated) && held != nil {
		held.evictMsg.Store(nil)
	}
	return r, err
}

func clientOf(s *session) string {
	if s == nil {
		return ""
	}
	return s.clientAddr
}

func roleOf(s *session) string {
	if s == nil {
		return ""
	}
	return s.user
}
