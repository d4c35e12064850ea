package upstream

import (
	"context"
	"fmt"
	"sync"

	"github.com/jackc/pgx/v5/pgxpool"
)

// Reservations: a slot held on the server for a login that rolegate admitted
// and that is logging in to the server, so that every other rolegate instance
// counts it before its backend appears in pg_stat_activity. Admission decides
// under the role's advisory lock, reserves, and lets go of the lock; the
// server login (backend start, authentication) then runs without it.
//
// A reservation is a session-level advisory lock on the instance's lock
// session (the one that holds LockRole's locks), taken in the one-bigint form
// so that it never meets LockRole's two-int keys:
//
//	key = hashtext(name) << 32 | kind << 31 | id
//
// kind is 0 for the role, 1 for the database; id is 31 bits, numbered per
// instance from a random start. In pg_locks a reservation is a row with
// locktype 'advisory', objsubid 1, classid = hashtext(name) as an unsigned
// 32-bit number, and objid = kind << 31 | id; its pid is the reserving
// instance's lock session (application_name "rolegate" by default). A login
// that hits a database limit holds two: one for its role and one for its
// database. The census counts these rows, matching the hash of the role
// (objid below 2^31) or of the database (objid from 2^31 on).
//
// Why advisory locks and not a table: the server releases them when the
// session ends, so an instance that crashes or loses its connection leaves
// nothing behind, and taking and dropping one is a round trip without
// writes. Two names with the same hashtext count each other's reservations,
// and so would an application's own one-bigint advisory lock that happens to
// have the same 64 bits: both can only make rolegate count too many, never
// too few.
//
// A reservation is dropped when the login's backend is in pg_stat_activity
// (rolegate has its BackendKeyData or ReadyForQuery; the server reports a
// backend there before it sends them) or when the login failed. Between the
// two, a census may see both the backend and the reservation: the login is
// counted twice for a round trip, which can only make another login wait or
// be refused, never admit one more than the limit.
//
// If the lock session fails, the server drops its reservations with it; the
// instance's own logins stay counted by its limiter, but other instances
// stop seeing them until those logins reach pg_stat_activity.

const (
	reserveQuery = `SELECT pg_catalog.pg_try_advisory_lock((pg_catalog.hashtext($1)::int8 << 32) | $3::int8),
	CASE WHEN $2::text IS NULL THEN true
		ELSE pg_catalog.pg_try_advisory_lock((pg_catalog.hashtext($2)::int8 << 32) | $3::int8 | 2147483648) END`
	unreserveQuery = `SELECT CASE WHEN $4 THEN pg_catalog.pg_advisory_unlock((pg_catalog.hashtext($1)::int8 << 32) | $3::int8) END,
	CASE WHEN $2::text IS NOT NULL AND $5 THEN pg_catalog.pg_advisory_unlock((pg_catalog.hashtext($2)::int8 << 32) | $3::int8 | 2147483648) END`
	// reserveTries bounds the keys tried when another instance holds the
	// one picked (ids clash only by chance).
	reserveTries = 8
)

// Reserve holds a slot of role, and of database unless it is "", on the
// server until release is called, for a login admitted and not yet in
// pg_stat_activity; Census on every other instance counts it. release is
// safe to call more than once; on an error Reserve returns a no-op release
// and holds nothing.
func (c *Control) Reserve(ctx context.Context, role, database string) (release func(), err error) {
	s := &c.locks
	role = controlText(role)
	var db *string
	if database != "" {
		d := controlText(database)
		db = &d
	}
	for range reserveTries {
		id := int64(s.reserveSeq.Add(1) & 0x7fffffff)
		var gotRole, gotDB bool
		gen, err := s.onSession(ctx, c.pool, func(ctx context.Context, conn *pgxpool.Conn) (int, error) {
			if err := conn.QueryRow(ctx, reserveQuery, role, db, id).Scan(&gotRole, &gotDB); err != nil {
				return 0, err
			}
			return held(gotRole) + held(gotDB && db != nil), nil
		})
		if err != nil {
			return func() {}, fmt.Errorf("reserve a slot of role %q: %w", role, err)
		}
		unreserve := func(r, d bool) {
			s.release(gen, held(r)+held(d && db != nil), func(ctx context.Context, conn *pgxpool.Conn) error {
				var a, b *bool
				return conn.QueryRow(ctx, unreserveQuery, role, db, id, r, d).Scan(&a, &b)
			})
		}
		if gotRole && gotDB {
			var once sync.Once
			return func() { once.Do(func() { unreserve(true, true) }) }, nil
		}
		if gotRole || gotDB && db != nil {
			unreserve(gotRole, gotDB) // half of it: another instance has the other key
		}
	}
	return func() {}, fmt.Errorf("reserve a slot of role %q: %d keys in a row held elsewhere", role, reserveTries)
}

func held(b bool) int {
	if b {
		return 1
	}
	return 0
}
