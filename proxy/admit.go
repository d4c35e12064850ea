package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/internal/pgname"
	"github.com/rolegate/rolegate/internal/wire"
	"github.com/rolegate/rolegate/limiter"
)

// ServerView is what admission needs from the server, through rolegate's control
// connection (upstream.Control implements it).
type ServerView interface {
	// Census lists the client backends holding slots of role or database.
	Census(ctx context.Context, role, database string) ([]limiter.Holder, error)
	// ServerLimits returns rolconnlimit, rolsuper and datconnlimit, cached for ttl.
	ServerLimits(ctx context.Context, role, database string, ttl time.Duration) (roleLimit int, superuser bool, dbLimit int, err error)
	// Terminate runs pg_terminate_backend(pid, timeout).
	Terminate(ctx context.Context, pid uint32, timeout time.Duration) (bool, error)
}

// Rules gives the limits proxy.toml sets for a role and a database
// (config.Config implements it); a reload swaps in a new one.
type Rules interface {
	RoleRule(role string) limiter.Rule
	DatabaseRule(database string) limiter.Rule
}

// Limits turns on connection limits. In proxy authentication mode they apply
// once rolegate has verified the client, before any server connection; in
// passthrough mode once the server has authenticated it (the client must have
// proved who it is before rolegate counts, waits or evicts for it).
type Limits struct {
	Limiter *limiter.Limiter
	Server  ServerView

	rules atomic.Pointer[rulesBox]

	mu        sync.Mutex
	overrides map[string]Override // by role; cleared by SetRules (a reload)
}

// Override is an operator's runtime change to one role's rule (the console's
// SET LIMIT and SET POLICY); it lasts until the next reload.
type Override struct {
	MaxSessions *int
	Policy      *limiter.Policy
}

// Override sets or changes role's override; nil leaves a field as it is. A
// role name over 63 bytes names the role CREATE ROLE stored for it, as in
// proxy.toml.
func (l *Limits) Override(role string, maxSessions *int, policy *limiter.Policy) {
	role = pgname.Identifier(role)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.overrides == nil {
		l.overrides = make(map[string]Override)
	}
	o := l.overrides[role]
	if maxSessions != nil {
		n := *maxSessions
		o.MaxSessions = &n
	}
	if policy != nil {
		p := *policy
		o.Policy = &p
	}
	l.overrides[role] = o
}

// Overrides returns a copy of the overrides in force.
func (l *Limits) Overrides() map[string]Override {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make(map[string]Override, len(l.overrides))
	for role, o := range l.overrides {
		out[role] = o
	}
	return out
}

func (l *Limits) override(role string) (Override, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	o, ok := l.overrides[role]
	return o, ok
}

// rulesBox is one configuration of the limits, swapped whole on reload.
type rulesBox struct {
	Rules
	serverLimits bool          // honour rolconnlimit and datconnlimit too; the smaller wins
	ttl          time.Duration // how long the server's limits are cached
}

// SetRules installs what new logins use: the rules from proxy.toml, whether
// the server's own limits count too, and how long those are cached. Sessions
// already in are not touched.
func (l *Limits) SetRules(r Rules, serverLimits bool, ttl time.Duration) {
	l.mu.Lock()
	l.overrides = nil // a reload ends the operators' runtime changes
	l.mu.Unlock()
	l.rules.Store(&rulesBox{Rules: r, serverLimits: serverLimits, ttl: ttl})
}

// Timings of admission. A victim rolegate holds frees its slot when its server
// socket closes, usually within tens of milliseconds of the signal; one opened
// elsewhere is awaited by pg_terminate_backend's own timeout form.
const (
	victimGoneTimeout = 5 * time.Second
	waitPoll          = 250 * time.Millisecond
	serverRetries     = 3
)

// admission is one login's pass through the limiter.
type admission struct {
	s       *Server
	lim     *Limits
	sess    *session
	log     *slog.Logger
	login   limiter.Login
	role    limiter.Rule
	db      limiter.Rule
	unlock  func()
	self    uint32 // the login's own backend (passthrough), not counted
	authOut []byte // passthrough: the server's messages up to AuthenticationOk, not yet sent
}

// admitFor is what passthrough mode adds to an admission: the server has
// already given the login a backend (left out of the count) and ended the
// authentication exchange, whose last messages a rejection must still send.
type admitFor struct {
	self    uint32
	authOut []byte
}

// tooManyError is a login refused at a limit; the client has been told.
type tooManyError struct{ msg string }

func (e *tooManyError) Error() string { return e.msg }

// admit decides whether sess may log in, evicting or waiting as the role's
// policy says. On success it returns holding the role's admission lock: the
// caller logs in to the server and then calls done, so that the next login of
// the role sees this session in its census.
func (s *Server) admit(ctx context.Context, sess *session, client net.Conn, cr *bufio.Reader, log *slog.Logger, pass admitFor) (done func(), err error) {
	done, err = s.admitOnce(ctx, sess, client, cr, log, pass)
	var tooMany *tooManyError
	if err != nil && !errors.As(err, &tooMany) && !errors.Is(err, errClientClosed) &&
		!errors.Is(context.Cause(ctx), errShutdown) { // shutdown is not a failure, and the socket is gone
		s.quiet.log(log, slog.LevelWarn, "", "admission failed", "err", err)
		sendFatal(client, "08006", "rolegate could not check the connection limits: "+err.Error())
	}
	return done, err
}

// controlTimeout bounds each query admission sends on the control connection.
const controlTimeout = 10 * time.Second

func (s *Server) admitOnce(ctx context.Context, sess *session, client net.Conn, cr *bufio.Reader, log *slog.Logger, pass admitFor) (done func(), err error) {
	lim := s.cfg.Limits
	if lim == nil || sess.replication {
		return func() {}, nil
	}
	a := &admission{s: s, lim: lim, sess: sess, log: log, self: pass.self, authOut: pass.authOut,
		login: limiter.Login{ID: sess.id, Role: sess.user, Database: sess.database}}
	if err := a.rules(ctx); err != nil {
		return nil, err
	}
	if a.login.Superuser || !a.role.Limited() && !a.db.Limited() {
		return func() {}, nil // no limit anywhere costs nothing more
	}
	// A login waits at most its wait_timeout for a slot, plus the time its own
	// evictions and queries take; nothing here may hang it for good.
	ctx, cancel := context.WithTimeout(ctx, s.cfg.StartupTimeout+max(a.role.WaitTimeout, a.db.WaitTimeout))
	defer cancel()
	started := time.Now()
	waiting := false
	defer func() { a.login.Ticket.Leave() }()
	defer func() {
		if waiting { // counted once per login, however many rounds it waited
			s.obs.Waited(sess.user, time.Since(started), err == nil)
		}
	}()
	for {
		// A login in line keeps showing its place while it checks again.
		if !waiting {
			sess.setWaiting(waitingFor{what: `waiting for the admission lock of role "` + sess.user + `"`})
		}
		if a.unlock, err = a.lock(ctx); err != nil {
			return nil, err
		}
		if !waiting {
			sess.setWaiting(waitingFor{what: `waiting for the census of role "` + sess.user + `"`})
		}
		d, err := a.decide(ctx)
		if err != nil {
			a.unlock()
			return nil, err
		}
		switch d.Kind {
		case limiter.Admit:
			if waiting {
				log.Info("admitted after waiting", "waited", time.Since(started).Round(time.Millisecond))
			}
			sess.setState(StateConnecting)
			return a.unlock, nil
		case limiter.Reject:
			a.unlock()
			return nil, a.reject(client, d)
		}
		a.unlock() // Wait: let other logins of the role through while this one waits
		sess.setWaiting(slotWait(sess, d))
		if d.Ticket != nil && !waiting {
			waiting = true
			log.Info("waiting for a slot", "scope", d.Scope.String(), "limit", d.Limit, "reason", d.Reason)
		}
		if err := a.wait(ctx, d, client, cr); err != nil {
			if waiting {
				log.Info("left the wait queue", "waited", time.Since(started).Round(time.Millisecond), "why", err.Error())
			}
			return nil, err
		}
	}
}

// slotWait is what a login that Decide told to wait waits for: a slot of
// the limit that decided, with its place in line.
func slotWait(sess *session, d limiter.Decision) waitingFor {
	what := `waiting for a slot of role "` + sess.user + `"`
	if d.Scope == limiter.ScopeDatabase {
		what = `waiting for a slot of database "` + sess.database + `"`
	}
	return waitingFor{what: what, limit: d.Limit, ticket: d.Ticket}
}

// serverLocker serializes admissions across rolegate instances with the
// server's advisory locks (upstream.Control implements it).
type serverLocker interface {
	LockRole(ctx context.Context, role string) (unlock func(), err error)
	LockDatabase(ctx context.Context, database string) (unlock func(), err error)
}

// lock takes the role's admission lock and, when the database has a limit,
// the database's (always in that order: logins of other roles count against
// the same database limit): first inside this instance, then on the server,
// so that several instances admit one role's logins one at a time.
func (a *admission) lock(ctx context.Context) (unlock func(), err error) {
	steps := []func(context.Context, string) (func(), error){a.lim.Limiter.Lock}
	keys := []string{a.sess.user}
	remote, shared := a.lim.Server.(serverLocker)
	if shared {
		steps, keys = append(steps, remote.LockRole), append(keys, a.sess.user)
	}
	if a.db.Limited() {
		steps, keys = append(steps, a.lim.Limiter.LockDatabase), append(keys, a.sess.database)
		if shared {
			steps, keys = append(steps, remote.LockDatabase), append(keys, a.sess.database)
		}
	}
	var held []func()
	release := func() {
		for i := len(held) - 1; i >= 0; i-- {
			held[i]()
		}
	}
	for i, step := range steps {
		u, err := step(ctx, keys[i])
		if err != nil {
			release()
			return nil, err
		}
		held = append(held, u)
	}
	return release, nil
}

// rules resolves the effective rules of the login's role and database.
func (a *admission) rules(ctx context.Context) error {
	var err error
	a.role, a.db, _, _, a.login.Superuser, err = a.lim.effective(ctx, a.sess.user, a.sess.database)
	return err
}

// Limit sources, as Effective reports them.
const (
	SourceNone     = "none"
	SourceConfig   = "proxy.toml"
	SourceServer   = "server"
	SourceOverride = "override"
)

// Effective returns the rules admission applies to a login of role to
// database now: proxy.toml's, a runtime override's, and the server's own
// limits (rolconnlimit, datconnlimit) when server_limits is on, the smaller
// limit winning. Each source says where the limit comes from: "proxy.toml",
// "override", "server" or "none" (no limit). Without limits configured at all
// both rules are limiter.NoLimit().
func (l *Limits) Effective(ctx context.Context, role, database string) (roleRule, dbRule limiter.Rule, roleSource, dbSource string, err error) {
	roleRule, dbRule, roleSource, dbSource, _, err = l.effective(ctx, role, database)
	return roleRule, dbRule, roleSource, dbSource, err
}

// effective is Effective and whether role is a superuser (known only when
// some limit made it ask the server).
func (l *Limits) effective(ctx context.Context, role, database string) (roleRule, dbRule limiter.Rule, roleSource, dbSource string, super bool, err error) {
	box := l.rules.Load()
	if box == nil {
		return limiter.NoLimit(), limiter.NoLimit(), SourceNone, SourceNone, false, nil
	}
	roleRule, dbRule = box.RoleRule(role), box.DatabaseRule(database)
	roleSource, dbSource = sourceOf(roleRule, SourceConfig), sourceOf(dbRule, SourceConfig)
	if o, ok := l.override(role); ok {
		if o.MaxSessions != nil {
			roleRule.MaxSessions = *o.MaxSessions
			roleSource = sourceOf(roleRule, SourceOverride)
		}
		if o.Policy != nil {
			roleRule.Policy = *o.Policy
		}
	}
	if !box.serverLimits && !roleRule.Limited() && !dbRule.Limited() {
		return roleRule, dbRule, roleSource, dbSource, false, nil
	}
	cctx, cancel := context.WithTimeout(ctx, controlTimeout)
	defer cancel()
	roleLimit, super, dbLimit, err := l.Server.ServerLimits(cctx, role, database, box.ttl)
	if err != nil {
		return roleRule, dbRule, roleSource, dbSource, false, fmt.Errorf("read limits of role %q: %w", role, err)
	}
	if box.serverLimits {
		if e := limiter.Effective(roleRule.MaxSessions, roleLimit); e != roleRule.MaxSessions {
			roleRule.MaxSessions, roleSource = e, SourceServer
		}
		if e := limiter.Effective(dbRule.MaxSessions, dbLimit); e != dbRule.MaxSessions {
			dbRule.MaxSessions, dbSource = e, SourceServer
		}
	}
	return roleRule, dbRule, roleSource, dbSource, super, nil
}

// sourceOf is source for a rule with a limit, "none" for one without.
func sourceOf(r limiter.Rule, source string) string {
	if r.Limited() {
		return source
	}
	return SourceNone
}

// decide takes the census and asks the limiter until the answer is not Evict,
// carrying out each eviction.
func (a *admission) decide(ctx context.Context) (limiter.Decision, error) {
	for {
		cctx, cancel := context.WithTimeout(ctx, controlTimeout)
		holders, err := a.lim.Server.Census(cctx, a.sess.user, a.sess.database)
		cancel()
		if err != nil {
			return limiter.Decision{}, fmt.Errorf("census of role %q: %w", a.sess.user, err)
		}
		holders = slices.DeleteFunc(holders, func(h limiter.Holder) bool { return a.self != 0 && h.PID == a.self })
		a.s.markOwn(holders)
		d := a.lim.Limiter.Decide(a.login, a.role, a.db, holders)
		a.login.Ticket = d.Ticket
		if d.Kind != limiter.Evict {
			return d, nil
		}
		for _, v := range d.Victims {
			if a.evict(ctx, v, d) {
				a.lim.Limiter.Evicted(v.PID)
			} else {
				a.lim.Limiter.EvictFailed(v.PID)
			}
		}
	}
}

// evict terminates one victim and returns once its slot is free.
func (a *admission) evict(ctx context.Context, v limiter.Holder, d limiter.Decision) bool {
	a.sess.setWaiting(waitingFor{what: fmt.Sprintf("waiting for pid %d to exit (evicted for this login, policy %s)", v.PID, d.Policy)})
	why := `terminating connection: rolegate evicted this session for a newer login of role "` + a.sess.user +
		`" (policy ` + d.Policy.String() + `)`
	if d.Scope == limiter.ScopeDatabase {
		why = `terminating connection: rolegate evicted this session for a newer login to database "` + a.sess.database +
			`" (policy ` + d.Policy.String() + `)`
	}
	attrs := []any{"victim_pid", v.PID, "victim_role", v.Role, "victim_database", v.Database,
		"victim_state", v.State, "victim_age", time.Since(v.BackendStart).Round(time.Millisecond),
		"via_rolegate", v.ViaRolegate, "policy", d.Policy.String(), "scope", d.Scope.String(), "reason", d.Reason}
	held := a.s.registry.byBackendPID(v.PID)
	if held != nil {
		attrs = append(attrs, "victim_client", held.clientAddr, "victim_application_name", held.appName)
		if ok, err := a.s.terminate(ctx, v.PID, held, why); err != nil || !ok {
			a.s.quiet.log(a.log, slog.LevelWarn, a.sess.user, "eviction failed", append(attrs, "err", err)...)
			return false
		}
		// The server closes the socket only once the backend has left, so its
		// close is the moment the slot is free.
		select {
		case <-held.serverGone:
		case <-time.After(victimGoneTimeout):
			a.s.quiet.log(a.log, slog.LevelWarn, a.sess.user, "evicted session did not end in time", attrs...)
			return false
		case <-ctx.Done():
			return false
		}
	} else {
		tctx, cancel := context.WithTimeout(ctx, controlTimeout+victimGoneTimeout)
		ok, err := a.lim.Server.Terminate(tctx, v.PID, victimGoneTimeout)
		cancel()
		if err != nil || !ok {
			a.s.quiet.log(a.log, slog.LevelWarn, a.sess.user, "eviction failed", append(attrs, "err", err)...)
			return false
		}
	}
	a.log.Info("evicted", attrs...)
	ev := Event{Time: time.Now(), Kind: "eviction", Role: a.sess.user, Database: a.sess.database,
		Client: a.sess.clientAddr, Policy: d.Policy.String(), Scope: d.Scope.String(),
		VictimPID: v.PID, VictimRole: v.Role, VictimClient: clientOf(held), ViaRolegate: held != nil, Reason: d.Reason}
	a.s.events.add(ev)
	return true
}

// wait blocks until the login's turn may have come: a slot freed, the poll
// interval passed (sessions elsewhere end without telling rolegate), or the
// wait timed out (the next Decide then rejects unless a slot freed). A client
// that hangs up while it waits leaves at once: rolegate watches its socket.
func (a *admission) wait(ctx context.Context, d limiter.Decision, client net.Conn, cr *bufio.Reader) error {
	delay := waitPoll
	var ready <-chan struct{}
	if t := d.Ticket; t != nil {
		delay = min(waitPoll, max(time.Until(t.Deadline()), time.Millisecond))
		ready = t.Ready()
	}
	timer := time.NewTimer(delay)
	defer timer.Stop()
	left := watchHangUp(client, cr)
	defer left.stop()
	select {
	case <-ready:
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
// in one write, without a server connection ever being opened.
func (a *admission) reject(client net.Conn, d limiter.Decision) error {
	// PostgreSQL quotes names as they are, without escaping.
	msg := `too many connections for role "` + a.sess.user + `"`
	if d.Scope == limiter.ScopeDatabase {
		msg = `too many connections for database "` + a.sess.database + `"`
	}
	out := a.authOut // passthrough: SASLFinal and AuthenticationOk from the server
	if out == nil {
		out = wire.Encode(nil, &pgproto3.AuthenticationOk{})
	}
	out = wire.Encode(out, wire.Error("FATAL", "53300", msg))
	_, _ = client.Write(out)
	a.s.events.add(Event{Time: time.Now(), Kind: "rejection", Role: a.sess.user, Database: a.sess.database,
		Client: a.sess.clientAddr, Policy: d.Policy.String(), Scope: d.Scope.String(), Reason: d.Reason})
	// A leaked pool retrying at its limit is rejected thousands of times a
	// second; the events and the metrics still count every rejection.
	a.s.quiet.log(a.log, slog.LevelInfo, a.sess.user, "rejected", "sqlstate", "53300", "scope", d.Scope.String(),
		"limit", d.Limit, "sessions", d.Count, "policy", d.Policy.String(), "reason", d.Reason)
	return &tooManyError{msg: msg}
}

// errServerFull is the server's own 53300 during a login rolegate admitted: a
// session raced in from elsewhere, and admission runs again.
var errServerFull = errors.New("server at its connection limit")

// markOwn flags the census rows that are sessions rolegate holds.
func (s *Server) markOwn(holders []limiter.Holder) {
	own := s.registry.backendPIDs()
	for i := range holders {
		holders[i].ViaRolegate = own[holders[i].PID]
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
	ok, err := s.terminate(ctx, pid, held,
		"terminating connection: rolegate terminated this session at an operator's request ("+by+")")
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
	s.events.add(Event{Time: time.Now(), Kind: "kill", Role: "", VictimPID: pid, ViaRolegate: held != nil,
		VictimClient: clientOf(held), VictimRole: roleOf(held), Reason: "operator: " + by})
	return true, nil
}

// terminate signals one server backend with pg_terminate_backend(pid, 0).
// When rolegate relays it (held), its client is told why in place of the
// server's 57P01 text; if the signal fails, the session goes on untouched.
func (s *Server) terminate(ctx context.Context, pid uint32, held *session, why string) (bool, error) {
	if held != nil {
		held.evictMsg.Store(&why)
	}
	ctx, cancel := context.WithTimeout(ctx, controlTimeout)
	defer cancel()
	ok, err := s.cfg.Limits.Server.Terminate(ctx, pid, 0)
	if (err != nil || !ok) && held != nil {
		held.evictMsg.Store(nil)
	}
	return ok, err
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
