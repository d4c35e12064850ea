package upstream

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/rolegate/rolegate/internal/keylock"
)

// Advisory locks: LockRole and LockDatabase serialize one role's (or
// database's) admissions across rolegate instances with advisory locks held
// on the server, on one lock session per instance, which holds Reserve's
// reservations too (reserve.go).

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

// lockSession is the state of the instance's advisory locks, a field of
// Control: the in-process lock per key, and the one pooled connection that
// holds every lock and reservation of the instance while any is held.
type lockSession struct {
	// keys serializes each key within this instance. Only its holder tries
	// the server lock, so an instance's own logins queue here in arrival
	// order instead of polling the server, and the shared session never
	// takes one key twice.
	keys keylock.Map[lockKey]

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

func (s *lockSession) init() {
	s.session = make(chan struct{}, 1)
	s.reserveSeq.Store(rand.Uint32())
}

// lockKey names an in-process lock and its advisory lock: a role or a
// database, by class.
type lockKey struct {
	class int32
	name  string
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
	s := &c.locks
	noop := func() {}
	key := lockKey{class, controlText(name)}
	release, err := s.keys.Lock(ctx, key)
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

// try takes key's lock on the lock session if it is free on the server. It
// returns the session's generation, for unlock.
func (s *lockSession) try(ctx context.Context, pool *pgxpool.Pool, key lockKey) (gen uint64, got bool, err error) {
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
func (s *lockSession) onSession(ctx context.Context, pool *pgxpool.Pool, f func(context.Context, *pgxpool.Conn) (int, error)) (gen uint64, err error) {
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
func (s *lockSession) releaseSession() {
	s.conn.Release()
	s.conn, s.held = nil, 0
	s.lockPID.Store(0)
}

// take waits for the session token.
func (s *lockSession) take(ctx context.Context) error {
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
	s := &c.locks
	s.session <- struct{}{}
	defer func() { <-s.session }()
	s.closed = true
	if s.conn != nil {
		s.drop()
	}
}

// unlock releases key's lock taken on session generation gen.
func (s *lockSession) unlock(key lockKey, gen uint64) {
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
func (s *lockSession) release(gen uint64, n int, f func(context.Context, *pgxpool.Conn) error) {
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
func (s *lockSession) drop() {
	conn := s.conn.Hijack()
	s.conn, s.held = nil, 0
	s.lockPID.Store(0)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = conn.Close(ctx)
}
