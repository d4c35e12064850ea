package upstream

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/rolegate/rolegate/limiter"
)

// What the control connection tells admission: who holds slots
// (pg_stat_activity), what the server's own limits are (pg_roles,
// pg_database), and how to make room (pg_terminate_backend). LockRole
// serializes one role's admissions across rolegate instances with advisory
// locks held on the server.
//
// The control role needs pg_read_all_stats to see the state and start time of
// other roles' sessions, and pg_signal_backend to terminate them
// (sql/setup.sql grants both).

const (
	// Advisory lock keys are pg_advisory_lock(class, hashtext(name)), with a
	// class of rolegate's own, so that they cannot be confused with an
	// application's single-bigint locks or with each other. An operator
	// finds them in pg_locks: locktype 'advisory', classid = class, objid =
	// hashtext(name), objsubid = 2.
	lockClassRole     int32 = 0x726f6c65 // "role"
	lockClassDatabase int32 = 0x64617461 // "data"

	// lockQueryTimeout bounds one query on the lock session. The queries
	// never wait for a lock on the server, so only a server or network in
	// trouble takes this long; the session is then dropped.
	lockQueryTimeout = 5 * time.Second
	// A lock held by another rolegate instance is polled for, starting
	// after lockPollMin and backing off to lockPollMax.
	lockPollMin = 2 * time.Millisecond
	lockPollMax = 50 * time.Millisecond
)

// census is the state Census, ServerLimits and the locks keep between calls,
// a field of Control. Its zero value is ready: init fills it on first use.
type census struct {
	once     sync.Once
	appName  string // the control pool's application_name
	now      func() time.Time
	limitsMu sync.Mutex
	// limitsFetch lets one login at a time read a new snapshot: the logins
	// that find the old one expired together wait for it, not all query.
	limitsFetch sync.Mutex
	limits      *limitSnapshot // nil until fetched, and after ForgetLimits

	keysMu sync.Mutex
	keys   map[limitKey]*keyToken // in-process lock tokens, by class and name

	// session guards the fields below: a token in the channel while held.
	session chan struct{}
	conn    *pgxpool.Conn // the lock session while it holds any lock, else nil
	held    int           // locks conn holds (reservations too)
	gen     uint64        // bumped for every new session, so stale unlocks do nothing
	closed  bool          // Close was called: no new session

	// lockPID is the lock session's backend pid (0 while there is none),
	// which Census reads without the session token: reservations held
	// there are this instance's own, counted by its limiter instead.
	lockPID atomic.Uint32
	// reserveSeq numbers reservations; it starts at a random value so that
	// instances rarely pick the same key (a clash only costs a retry).
	reserveSeq atomic.Uint32
}

func (c *Control) state() *census {
	s := &c.census
	s.once.Do(func() {
		s.appName = c.pool.Config().ConnConfig.RuntimeParams["application_name"]
		if s.now == nil {
			s.now = time.Now
		}
		s.keys = make(map[limitKey]*keyToken)
		s.session = make(chan struct{}, 1)
		s.reserveSeq.Store(rand.Uint32())
	})
	return s
}

const censusQuery = `SELECT a.pid, a.usename::text, coalesce(a.datname::text, ''),
	a.backend_start, coalesce(a.state, ''), a.state_change,
	coalesce(r.rolsuper, false),
	coalesce(a.application_name = $3 AND a.usename = session_user, false),
	coalesce(host(a.client_addr), ''), coalesce(a.client_port, -1)
FROM pg_catalog.pg_stat_activity a
LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.usesysid
WHERE a.backend_type = 'client backend'
	AND a.usename IS NOT NULL
	AND (a.usename = $1 OR a.datname = $2)
	AND a.pid <> pg_catalog.pg_backend_pid()
UNION ALL
SELECT 0, CASE WHEN l.objid::int8 < 2147483648 THEN $1::text ELSE '' END,
	CASE WHEN l.objid::int8 >= 2147483648 THEN $2::text ELSE '' END,
	NULL::timestamptz, '', NULL::timestamptz, false, false, '', -1
FROM pg_catalog.pg_locks l
WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
	AND l.pid <> $4
	AND (l.classid::int8 = (pg_catalog.hashtext($1)::int8 & 4294967295) AND l.objid::int8 < 2147483648
		OR l.classid::int8 = (pg_catalog.hashtext($2)::int8 & 4294967295) AND l.objid::int8 >= 2147483648)
ORDER BY backend_start, pid`

// Census returns the client backends that hold slots of role or database:
// the pg_stat_activity rows with backend_type 'client backend' whose usename
// is role or whose datname is database, except the connection that runs the
// query. Superuser is the login role's rolsuper; Protected marks rolegate's own
// control connections (the control pool's application_name, "rolegate" by
// default, and the control role). Backends still authenticating (no usename
// yet) and walsenders are left out, as the server leaves them out of its own
// counts. ViaRolegate is the caller's to set. Client is the address and port
// the backend's client connected from (rolegate's own, for its sessions).
//
// Slots other rolegate instances reserved (Reserve) for logins of role or
// into database that have not reached pg_stat_activity yet are rows too,
// with PID 0 and Reserved set: Role is role for a reservation of the role,
// Database is database for one of the database. This instance's own
// reservations are left out; its limiter counts them.
//
// Without pg_read_all_stats the control role sees no state, backend_start or
// client address of other roles' sessions: State is then "", the times are
// zero and Client is invalid.
func (c *Control) Census(ctx context.Context, role, database string) ([]limiter.Holder, error) {
	s := c.state()
	rows, err := c.pool.Query(ctx, censusQuery, controlText(role), controlText(database), s.appName, int32(s.lockPID.Load()))
	if err != nil {
		return nil, fmt.Errorf("census: %w", err)
	}
	defer rows.Close()
	var holders []limiter.Holder
	for rows.Next() {
		var (
			h           limiter.Holder
			pid         int32
			start, chg  *time.Time
			super, prot bool
			addr        string
			port        int32
		)
		if err := rows.Scan(&pid, &h.Role, &h.Database, &start, &h.State, &chg, &super, &prot, &addr, &port); err != nil {
			return nil, fmt.Errorf("census: %w", err)
		}
		h.PID, h.Superuser, h.Protected = uint32(pid), super, prot
		h.Reserved = pid == 0
		if start != nil {
			h.BackendStart = *start
		}
		if chg != nil {
			h.StateChange = *chg
		}
		if ip, err := netip.ParseAddr(addr); err == nil && port > 0 && port <= math.MaxUint16 {
			h.Client = netip.AddrPortFrom(ip.Unmap(), uint16(port))
		}
		holders = append(holders, h)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("census: %w", err)
	}
	return holders, nil
}

// limitKey names a cached limit (and an in-process lock): a role or a
// database, by class.
type limitKey struct {
	class int32
	name  string
}

// limitSnapshot is every limit the server sets, read in one query: the roles
// with a connection limit or rolsuper, and the databases with a limit. A role
// or database it does not name has no limit, so with a fresh snapshot a login
// of a role without a limit anywhere costs no query at all.
type limitSnapshot struct {
	roles   map[string]roleLimits
	dbs     map[string]int
	fetched time.Time
}

type roleLimits struct {
	limit int // rolconnlimit; -1 for none
	super bool
}

const allLimitsQuery = `SELECT true, rolname::text, rolconnlimit, rolsuper FROM pg_catalog.pg_roles
	WHERE rolconnlimit >= 0 OR rolsuper
UNION ALL
SELECT false, datname::text, datconnlimit, false FROM pg_catalog.pg_database
	WHERE datconnlimit >= 0`

const limitsQuery = `SELECT
	coalesce((SELECT rolconnlimit FROM pg_catalog.pg_roles WHERE rolname = $1), -1),
	coalesce((SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = $1), false),
	coalesce((SELECT datconnlimit FROM pg_catalog.pg_database WHERE datname = $2), -1)`

// ServerLimits returns role's rolconnlimit and rolsuper and database's
// datconnlimit; -1 means no limit (also for an unknown role or database,
// which is not a superuser either). With ttl > 0 the answer comes from a
// snapshot of every limit on the server, read in one query and kept for ttl,
// so a role without a limit anywhere costs no query per login; ttl <= 0 asks
// the server about role and database every time. The ttl of each call
// decides, so a reload that shortens it applies at once.
func (c *Control) ServerLimits(ctx context.Context, role, database string, ttl time.Duration) (roleLimit int, superuser bool, dbLimit int, err error) {
	s := c.state()
	if ttl <= 0 {
		var rl, dl int32
		if err := c.pool.QueryRow(ctx, limitsQuery, controlText(role), controlText(database)).Scan(&rl, &superuser, &dl); err != nil {
			return 0, false, 0, fmt.Errorf("server limits: %w", err)
		}
		return noLimit(rl), superuser, noLimit(dl), nil
	}
	current := func() *limitSnapshot {
		s.limitsMu.Lock()
		defer s.limitsMu.Unlock()
		if s.limits == nil || s.now().Sub(s.limits.fetched) >= ttl {
			return nil
		}
		return s.limits
	}
	snap := current()
	if snap == nil {
		s.limitsFetch.Lock()
		if snap = current(); snap == nil { // not read meanwhile by the login before
			snap, err = c.fetchLimits(ctx)
			if err == nil {
				s.limitsMu.Lock()
				s.limits = snap
				s.limitsMu.Unlock()
			}
		}
		s.limitsFetch.Unlock()
		if err != nil {
			return 0, false, 0, err
		}
	}
	r, ok := snap.roles[role]
	if !ok {
		r.limit = -1
	}
	d, ok := snap.dbs[database]
	if !ok {
		d = -1
	}
	return r.limit, r.super, d, nil
}

func (c *Control) fetchLimits(ctx context.Context) (*limitSnapshot, error) {
	snap := &limitSnapshot{roles: map[string]roleLimits{}, dbs: map[string]int{}, fetched: c.state().now()}
	rows, err := c.pool.Query(ctx, allLimitsQuery)
	if err != nil {
		return nil, fmt.Errorf("server limits: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var isRole, super bool
		var name string
		var limit int32
		if err := rows.Scan(&isRole, &name, &limit, &super); err != nil {
			return nil, fmt.Errorf("server limits: %w", err)
		}
		if isRole {
			snap.roles[name] = roleLimits{limit: noLimit(limit), super: super}
		} else {
			snap.dbs[name] = noLimit(limit)
		}
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("server limits: %w", err)
	}
	return snap, nil
}

// noLimit maps anything negative to -1: PostgreSQL 16 and later (and the
// latest minor releases before) mark a database left invalid by an interrupted
// DROP DATABASE with datconnlimit -2; the server refuses it anyway.
func noLimit(v int32) int { return max(int(v), -1) }

// ForgetLimits empties the ServerLimits cache (on reload, or when an
// operator changed a limit and says so).
func (c *Control) ForgetLimits() {
	s := c.state()
	s.limitsMu.Lock()
	s.limits = nil
	s.limitsMu.Unlock()
}

// LockRole serializes admissions of role across every rolegate instance that
// fronts the server (and, through its in-process part, within this one): it
// returns once this caller holds the role's advisory lock on the server,
// pg_try_advisory_lock(1919904869, hashtext(role)) (0x726f6c65, "role"),
// and unlock releases it.
// unlock is safe to call more than once; on an error LockRole returns a no-op
// unlock, so a deferred unlock is harmless either way.
//
// All locks this instance holds live on one session, a connection taken from
// the control pool while any lock is held and returned when none is: however
// many roles are being admitted at once, locking costs one connection (so
// max_conns must be at least 2: the census and the evictions need another),
// and a holder never waits for a pool connection that another holder keeps.
// The session never waits on the server: a lock held elsewhere is polled for
// (every 2 ms, backing off to 50 ms), with ctx checked between polls, so a
// cancelled ctx never leaves a lock wait behind on the server. ctx ending
// while waiting returns its cause (wrapped) and leaves nothing held.
//
// If the lock session fails (the server restarts, the network drops) it is
// closed, and the server releases every lock it held: holders then run
// unserialized until their unlock, which does nothing. Within this instance
// the in-process part (and limiter.Lock) still serializes them. Close closes
// the lock session too, without waiting for holders to unlock.
func (c *Control) LockRole(ctx context.Context, role string) (unlock func(), err error) {
	return c.lock(ctx, lockClassRole, role)
}

// LockDatabase does for a database what LockRole does for a role, for
// callers that make database limits exact across instances too. Take it
// after LockRole, never before (one order, so no two logins wait on each
// other).
func (c *Control) LockDatabase(ctx context.Context, database string) (unlock func(), err error) {
	return c.lock(ctx, lockClassDatabase, database)
}

func (c *Control) lock(ctx context.Context, class int32, name string) (func(), error) {
	s := c.state()
	noop := func() {}
	key := limitKey{class, controlText(name)}
	release, err := s.token(ctx, key)
	if err != nil {
		return noop, lockError(class, name, err)
	}
	poll := lockPollMin
	for {
		gen, got, err := s.try(ctx, c.pool, key)
		if err != nil {
			release()
			return noop, lockError(class, name, err)
		}
		if got {
			var once sync.Once
			unlock := func() {
				once.Do(func() {
					s.unlock(key, gen)
					release()
				})
			}
			if ctx.Err() != nil {
				unlock()
				return noop, lockError(class, name, context.Cause(ctx))
			}
			return unlock, nil
		}
		// Held by another instance: wait a little, ±25 %, so that instances
		// polling for one role do not keep meeting.
		d := poll*3/4 + rand.N(poll/2+1)
		poll = min(2*poll, lockPollMax)
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			release()
			return noop, lockError(class, name, context.Cause(ctx))
		}
	}
}

func lockError(class int32, name string, err error) error {
	what := "role"
	if class == lockClassDatabase {
		what = "database"
	}
	return fmt.Errorf("lock %s %q: %w", what, name, err)
}

// keyToken serializes one key within this instance: a token in ch while
// held; refs counts holders and waiters so that unused entries go away.
type keyToken struct {
	ch   chan struct{}
	refs int
}

// token waits for key's in-process token. Only its holder tries the server
// lock, so an instance's own logins queue here in arrival order instead of
// polling the server, and the shared session never takes one key twice.
func (s *census) token(ctx context.Context, key limitKey) (release func(), err error) {
	if ctx.Err() != nil {
		return nil, context.Cause(ctx)
	}
	s.keysMu.Lock()
	k := s.keys[key]
	if k == nil {
		k = &keyToken{ch: make(chan struct{}, 1)}
		s.keys[key] = k
	}
	k.refs++
	s.keysMu.Unlock()
	unref := func() {
		s.keysMu.Lock()
		defer s.keysMu.Unlock()
		if k.refs--; k.refs == 0 {
			delete(s.keys, key)
		}
	}
	select {
	case k.ch <- struct{}{}:
		return func() { <-k.ch; unref() }, nil
	case <-ctx.Done():
		unref()
		return nil, context.Cause(ctx)
	}
}

// try takes key's lock on the lock session if it is free on the server. It
// returns the session's generation, for unlock.
func (s *census) try(ctx context.Context, pool *pgxpool.Pool, key limitKey) (gen uint64, got bool, err error) {
	gen, err = s.onSession(ctx, pool, func(ctx context.Context, conn *pgxpool.Conn) (int, error) {
		err := conn.QueryRow(ctx, "SELECT pg_catalog.pg_try_advisory_lock($1, pg_catalog.hashtext($2))", key.class, key.name).Scan(&got)
		if err != nil || !got {
			return 0, err
		}
		return 1, nil
	})
	return gen, got, err
}

// onSession runs f, one short query that takes locks, on the lock session,
// first taking a session from the pool when there is none; f returns how
// many locks it took. onSession returns the session's generation, for
// unlock. The session token is never held while waiting for the pool, only
// across one short query, so unlock and closeLocks never wait long for it.
// A session left holding nothing goes back to the pool.
func (s *census) onSession(ctx context.Context, pool *pgxpool.Pool, f func(context.Context, *pgxpool.Conn) (int, error)) (gen uint64, err error) {
	if err := s.take(ctx); err != nil {
		return 0, err
	}
	if s.conn == nil && !s.closed {
		<-s.session
		conn, err := pool.Acquire(ctx)
		if err != nil {
			return 0, err
		}
		if err := s.take(ctx); err != nil {
			conn.Release()
			return 0, err
		}
		if s.conn == nil && !s.closed {
			s.conn, s.held = conn, 0
			s.gen++
			s.lockPID.Store(conn.Conn().PgConn().PID())
		} else {
			conn.Release() // another caller was quicker, or Close came
		}
	}
	defer func() { <-s.session }()
	if s.closed {
		return 0, errControlClosed
	}
	// Not ctx: a query cancelled half-way would leave it unknown whether
	// the lock was taken. The query does not wait on the server, so it is
	// short unless something is wrong.
	qctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), lockQueryTimeout)
	defer cancel()
	n, err := f(qctx, s.conn)
	if err != nil {
		s.drop()
		return 0, err
	}
	s.held += n
	if s.held == 0 {
		s.releaseSession() // do not keep a pool connection while polling
	}
	return s.gen, nil
}

// releaseSession gives the lock session, which holds nothing, back to the pool.
func (s *census) releaseSession() {
	s.conn.Release()
	s.conn, s.held = nil, 0
	s.lockPID.Store(0)
}

// take waits for the session token.
func (s *census) take(ctx context.Context) error {
	select {
	case s.session <- struct{}{}:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

// errControlClosed is LockRole's error after Close.
var errControlClosed = errors.New("control connection closed")

// closeLocks is Close's first step: it closes the lock session, so that the
// pool's Close does not wait for holders to unlock (the server releases
// their locks; their unlocks do nothing), and refuses further locks.
func (c *Control) closeLocks() {
	s := c.state()
	s.session <- struct{}{}
	defer func() { <-s.session }()
	s.closed = true
	if s.conn != nil {
		s.drop()
	}
}

// unlock releases key's lock taken on session generation gen.
func (s *census) unlock(key limitKey, gen uint64) {
	s.release(gen, 1, func(ctx context.Context, conn *pgxpool.Conn) error {
		var ok bool
		// ok is false only if the lock was not held, which the in-process
		// tokens rule out; there is nothing better to do than go on.
		return conn.QueryRow(ctx, "SELECT pg_catalog.pg_advisory_unlock($1, pg_catalog.hashtext($2))", key.class, key.name).Scan(&ok)
	})
}

// release runs f, a query that releases n locks taken on session
// generation gen, unless that session is gone (the server released its
// locks with it). A failed query drops the session, which releases them too.
func (s *census) release(gen uint64, n int, f func(context.Context, *pgxpool.Conn) error) {
	s.session <- struct{}{}
	defer func() { <-s.session }()
	if s.conn == nil || s.gen != gen {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), lockQueryTimeout)
	defer cancel()
	if err := f(ctx, s.conn); err != nil {
		s.drop()
		return
	}
	if s.held -= n; s.held <= 0 {
		s.releaseSession()
	}
}

// drop closes a failed lock session; the server releases its locks when the
// backend sees the connection gone.
func (s *census) drop() {
	conn := s.conn.Hijack()
	s.conn, s.held = nil, 0
	s.lockPID.Store(0)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = conn.Close(ctx)
}

// Backend is one client backend of the server, as Sessions lists it: a
// session opened through rolegate or directly against the server.
type Backend struct {
	PID             uint32
	Role            string
	Database        string
	ApplicationName string
	ClientAddr      string // host:port, "local" for a Unix socket, "" when hidden
	State           string // "" when the control role may not see it
	BackendStart    time.Time
	StateChange     time.Time
}

const sessionsQuery = `SELECT a.pid, a.usename::text, coalesce(a.datname::text, ''),
	coalesce(a.application_name, ''),
	CASE WHEN a.client_addr IS NOT NULL THEN pg_catalog.host(a.client_addr) || ':' || a.client_port::text
		WHEN a.client_port = -1 THEN 'local' ELSE '' END,
	coalesce(a.state, ''), a.backend_start, a.state_change
FROM pg_catalog.pg_stat_activity a
WHERE a.backend_type = 'client backend'
	AND a.usename = ANY($1::text[])
	AND a.pid <> pg_catalog.pg_backend_pid()
ORDER BY a.backend_start, a.pid`

// Sessions returns the client backends (pg_stat_activity rows with
// backend_type 'client backend') whose usename is one of roles, however they
// were opened, except the connection that runs the query. Without
// pg_read_all_stats the control role sees no state, client or times of other
// roles' sessions: those fields are then empty or zero.
func (c *Control) Sessions(ctx context.Context, roles []string) ([]Backend, error) {
	if len(roles) == 0 {
		return nil, nil
	}
	rows, err := c.pool.Query(ctx, sessionsQuery, roles)
	if err != nil {
		return nil, fmt.Errorf("sessions: %w", err)
	}
	defer rows.Close()
	var out []Backend
	for rows.Next() {
		var (
			b          Backend
			pid        int32
			start, chg *time.Time
		)
		if err := rows.Scan(&pid, &b.Role, &b.Database, &b.ApplicationName, &b.ClientAddr, &b.State, &start, &chg); err != nil {
			return nil, fmt.Errorf("sessions: %w", err)
		}
		b.PID = uint32(pid)
		if start != nil {
			b.BackendStart = *start
		}
		if chg != nil {
			b.StateChange = *chg
		}
		out = append(out, b)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("sessions: %w", err)
	}
	return out, nil
}
