package upstream

import (
	"context"
	"fmt"
	"sync"
	"time"
)

// limitCache is what ServerLimits keeps between calls, a field of Control:
// the last snapshot of the server's limits and the clock that ages it.
type limitCache struct {
	now func() time.Time
	mu  sync.Mutex
	// fetch lets one login at a time read a new snapshot: the logins that
	// find the old one expired together wait for it, not all query.
	fetch sync.Mutex
	snap  *limitSnapshot // nil until fetched, and after ForgetLimits
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
	if ttl <= 0 {
		var rl, dl int32
		if err := c.pool.QueryRow(ctx, limitsQuery, controlText(role), controlText(database)).Scan(&rl, &superuser, &dl); err != nil {
			return 0, false, 0, fmt.Errorf("server limits: %w", err)
		}
		return noLimit(rl), superuser, noLimit(dl), nil
	}
	current := func() *limitSnapshot {
		c.limits.mu.Lock()
		defer c.limits.mu.Unlock()
		if c.limits.snap == nil || c.limits.now().Sub(c.limits.snap.fetched) >= ttl {
			return nil
		}
		return c.limits.snap
	}
	snap := current()
	if snap == nil {
		c.limits.fetch.Lock()
		if snap = current(); snap == nil { // not read meanwhile by the login before
			snap, err = c.fetchLimits(ctx)
			if err == nil {
				c.limits.mu.Lock()
				c.limits.snap = snap
				c.limits.mu.Unlock()
			}
		}
		c.limits.fetch.Unlock()
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
	snap := &limitSnapshot{roles: map[string]roleLimits{}, dbs: map[string]int{}, fetched: c.limits.now()}
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
	c.limits.mu.Lock()
	c.limits.snap = nil
	c.limits.mu.Unlock()
}
