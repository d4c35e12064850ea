package upstream

import (
	"context"
	"fmt"
	"math"
	"net/netip"
	"time"

	"github.com/rolegate/rolegate/limiter"
)

// What the control connection tells admission: who holds slots
// (pg_stat_activity, here), what the server's own limits are (pg_roles,
// pg_database: limits.go), and how to make room (pg_terminate_backend:
// terminate.go). LockRole serializes one role's admissions across rolegate
// instances with advisory locks held on the server (locks.go), and Reserve
// holds an admitted login's slot until its backend is counted (reserve.go).
//
// The control role needs pg_read_all_stats to see the state and start time of
// other roles' sessions, and pg_signal_backend to terminate them
// (sql/setup.sql grants both).

// censusQuery reads other instances' reservations (pg_locks) before the
// sessions (pg_stat_activity): the server runs the branches of a UNION ALL
// in order, and each function takes its snapshot when first read. A login
// elsewhere shows its backend in pg_stat_activity before it drops its
// reservation, so read in this order it is counted once or twice, never
// missed; read the other way round it could fall between the two reads. No
// new reservation of the role appears meanwhile: other instances reserve
// under the role's advisory lock, which admission holds while it counts.
const censusQuery = `SELECT 0 AS pid, CASE WHEN l.objid::int8 < 2147483648 THEN $1::text ELSE '' END,
	CASE WHEN l.objid::int8 >= 2147483648 THEN $2::text ELSE '' END,
	NULL::timestamptz AS backend_start, '', NULL::timestamptz, false, false, '', -1, ''
FROM pg_catalog.pg_locks l
WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
	AND l.pid <> $4
	AND (l.classid::int8 = (pg_catalog.hashtext($1)::int8 & 4294967295) AND l.objid::int8 < 2147483648
		OR l.classid::int8 = (pg_catalog.hashtext($2)::int8 & 4294967295) AND l.objid::int8 >= 2147483648)
UNION ALL
SELECT a.pid, a.usename::text, coalesce(a.datname::text, ''),
	a.backend_start, coalesce(a.state, ''), a.state_change,
	coalesce(r.rolsuper, false),
	coalesce(a.application_name = $3 AND a.usename = session_user, false),
	coalesce(host(a.client_addr), ''), coalesce(a.client_port, -1), coalesce(a.application_name, '')
FROM pg_catalog.pg_stat_activity a
LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.usesysid
WHERE a.backend_type = 'client backend'
	AND a.usename IS NOT NULL
	AND (a.usename = $1 OR a.datname = $2)
	AND a.pid <> pg_catalog.pg_backend_pid()
ORDER BY backend_start, pid`

// Census returns the client backends that hold slots of role or database:
// the pg_stat_activity rows with backend_type 'client backend' whose usename
// is role or whose datname is database, except the connection that runs the
// query. Superuser is the login role's rolsuper; Protected marks rolegate's own
// control connections (the control pool's application_name, "rolegate" by
// default, and the control role). Backends still authenticating (no usename
// yet) and walsenders are left out, as the server leaves them out of its own
// counts. ViaRolegate is the caller's to set. Client is the address and port
// the backend's client connected from (rolegate's own, for its sessions);
// ApplicationName is the session's.
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
	rows, err := c.pool.Query(ctx, censusQuery, controlText(role), controlText(database), c.appName, int32(c.locks.lockPID.Load()))
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
		if err := rows.Scan(&pid, &h.Role, &h.Database, &start, &h.State, &chg, &super, &prot, &addr, &port, &h.ApplicationName); err != nil {
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
