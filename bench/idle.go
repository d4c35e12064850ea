package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rolegate/rolegate/internal/pgtest"
)

const (
	// pgbouncerIdleDB is the alias in PgBouncer's [databases] that the
	// idle-session test logs in to: the server's database bench with a pool
	// of its own, as large as the test's sessions, which the test empties
	// afterwards (KILL on PgBouncer's console). The pool of the other rows
	// is never touched.
	pgbouncerIdleDB = "bench_idle"
	// idleSpareSlots is how many server connection slots, beyond one per
	// session, must be free before the test opens its sessions: room for
	// the proxies' own connections (rolegate's control pool, PgBouncer's
	// auth_user).
	idleSpareSlots = 10
	// idleGoneTimeout bounds the wait for the server to end the backends of
	// the closed sessions.
	idleGoneTimeout = 30 * time.Second
)

// idleTarget is a proxy the idle-session test opens its sessions through.
type idleTarget struct {
	*target
	// database is what the sessions log in to: bench, or PgBouncer's alias.
	database string
	// release drops the server connections the proxy keeps for reuse once
	// its clients are gone (PgBouncer's pool); nil for a proxy that closes
	// them with the client (rolegate).
	release func(ctx context.Context) error
}

// procMemory is what a process's memory counters say, in KiB; -1 where a
// counter could not be read.
type procMemory struct {
	rss, pss, privateDirty int64
}

// readProcMemory reads VmRSS from /proc/PID/status and Pss and
// Private_Dirty from /proc/PID/smaps_rollup (Linux 4.14 and later; another
// user's process needs root).
func readProcMemory(pid int) procMemory {
	m := procMemory{rss: -1, pss: -1, privateDirty: -1}
	if data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid)); err == nil {
		m.rss = kibField(string(data), "VmRSS")
	}
	if data, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid)); err == nil {
		m.pss = kibField(string(data), "Pss")
		m.privateDirty = kibField(string(data), "Private_Dirty")
	}
	return m
}

// kibField is the value of the line "name: N kB" in a /proc file, -1 when
// there is none.
func kibField(text, name string) int64 {
	for line := range strings.SplitSeq(text, "\n") {
		rest, ok := strings.CutPrefix(line, name+":")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) != 2 || f[1] != "kB" {
			return -1
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return -1
		}
		return n
	}
	return -1
}

// idleMemory is one proxy's memory before and with the idle sessions.
type idleMemory struct {
	target        string
	sessions      int
	before, after procMemory
}

// perSession is the growth of one counter per session, in KiB; false when
// the counter was not readable.
func (m idleMemory) perSession(counter func(procMemory) int64) (float64, bool) {
	before, after := counter(m.before), counter(m.after)
	if before < 0 || after < 0 || m.sessions == 0 {
		return 0, false
	}
	return float64(after-before) / float64(m.sessions), true
}

// measureIdle opens o.idleSessions sessions through each of targets, one
// proxy after the other, and reads the proxy's memory before and with them.
func measureIdle(ctx context.Context, o options, c *pgtest.Cluster, password string, targets []idleTarget, r *report) error {
	if o.idleSessions == 0 || len(targets) == 0 {
		return nil
	}
	super, err := pgconn.Connect(ctx, c.SuperDSN())
	if err != nil {
		return fmt.Errorf("idle sessions: superuser session: %w", err)
	}
	defer closeConn(super)
	for _, t := range targets {
		m, err := idleOnce(ctx, o.idleSessions, super, password, t)
		if err != nil {
			return fmt.Errorf("idle sessions via %s: %w", t.name, err)
		}
		r.idleMem = append(r.idleMem, m)
		kib, _ := m.perSession(func(p procMemory) int64 { return p.rss })
		logf("idle sessions via %-13s VmRSS %s → %s, %.1f KiB per session", t.name, fmtKiB(m.before.rss), fmtKiB(m.after.rss), kib)
	}
	return nil
}

// idleOnce opens n sessions through t, each logged in and having run
// select 1, reads t's memory before and with them, closes them, and returns
// once the server has ended their backends.
func idleOnce(ctx context.Context, n int, super *pgconn.PgConn, password string, t idleTarget) (idleMemory, error) {
	m := idleMemory{target: t.name, sessions: n}
	cfg, err := sessionConfig(benchRole, password, t.database, t.host, t.port)
	if err != nil {
		return m, err
	}
	// Roles that are not superusers may use max_connections less the
	// reserved slots; the superuser's own session takes one of those too.
	free, err := queryInt(ctx, super, `select current_setting('max_connections')::int
		- current_setting('superuser_reserved_connections')::int
		- coalesce(current_setting('reserved_connections', true)::int, 0)
		- (select count(*) from pg_stat_activity where backend_type = 'client backend')::int`)
	if err != nil {
		return m, fmt.Errorf("counting the server's free connection slots: %w", err)
	}
	if free < n+idleSpareSlots {
		return m, fmt.Errorf("the server has %d free connection slots; %d sessions and %d to spare need %d: lower -idle-sessions", free, n, idleSpareSlots, n+idleSpareSlots)
	}
	countSQL := fmt.Sprintf("select count(*) from pg_stat_activity where usename = '%s'", benchRole)
	baseline, err := queryInt(ctx, super, countSQL)
	if err != nil {
		return m, fmt.Errorf("counting %s's sessions: %w", benchRole, err)
	}

	m.before = readProcMemory(t.pid)
	conns := make([]*pgconn.PgConn, 0, n)
	closeAll := func() {
		for _, conn := range conns {
			closeConn(conn)
		}
		conns = nil
	}
	defer closeAll()
	for i := range n {
		conn, err := openIdle(ctx, cfg)
		if err != nil {
			return m, fmt.Errorf("session %d of %d: %w%s", i+1, n, err, logTail(t.target))
		}
		conns = append(conns, conn)
	}
	m.after = readProcMemory(t.pid)
	closeAll()

	if t.release != nil {
		if err := t.release(ctx); err != nil {
			return m, err
		}
	}
	deadline := time.Now().Add(idleGoneTimeout)
	for {
		count, err := queryInt(ctx, super, countSQL)
		if err != nil {
			return m, fmt.Errorf("counting %s's sessions: %w", benchRole, err)
		}
		if count <= baseline {
			return m, nil
		}
		if time.Now().After(deadline) {
			return m, fmt.Errorf("%d backends of %s still there %v after the sessions were closed (%d before)", count, benchRole, idleGoneTimeout, baseline)
		}
		select {
		case <-ctx.Done():
			return m, context.Cause(ctx)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// openIdle logs in and runs select 1.
func openIdle(ctx context.Context, cfg *pgconn.Config) (*pgconn.PgConn, error) {
	ctx, cancel := context.WithTimeout(ctx, loginTimeout)
	defer cancel()
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if _, err := queryInt(ctx, conn, "select 1"); err != nil {
		closeConn(conn)
		return nil, fmt.Errorf("select 1: %w", err)
	}
	return conn, nil
}

// killPgBouncerPool drops the server connections of PgBouncer's idle-test
// pool, which session mode keeps for the next clients: KILL on PgBouncer's
// console (as pa.user, one of its admin_users) drops them at once, and
// RESUME lets clients in to the alias again.
func killPgBouncerPool(ctx context.Context, t *target, pa pgbouncerAuth) error {
	cfg, err := sessionConfig(pa.user, pa.fileSecret, "pgbouncer", t.host, t.port)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, loginTimeout)
	defer cancel()
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("PgBouncer's console: %w", err)
	}
	defer closeConn(conn)
	for _, cmd := range []string{"KILL " + pgbouncerIdleDB, "RESUME " + pgbouncerIdleDB} {
		if _, err := conn.Exec(ctx, cmd).ReadAll(); err != nil {
			return fmt.Errorf("PgBouncer's console: %s: %w", cmd, err)
		}
	}
	return nil
}

// idleSettings says what the idle-session test did, for the report.
func idleSettings(o options) string {
	return fmt.Sprintf("%d sessions per proxy, opened one after the other with pgx pgconn.Connect (SCRAM, sslmode=disable), each logged in and having run select 1, all held open while the proxy's memory is read; once per run, after the login latency and before the rounds; through PgBouncer to the alias %s, a pool of its own with pool_size %d, emptied afterwards", o.idleSessions, pgbouncerIdleDB, o.idleSessions)
}

// idleRows is the idle-session table, header first.
func (r *report) idleRows() [][]string {
	rows := [][]string{{"Idle sessions", "sessions", "VmRSS before", "VmRSS with them", "VmRSS per session", "Pss per session", "Private_Dirty per session"}}
	for _, m := range r.idleMem {
		row := []string{m.target, strconv.Itoa(m.sessions), fmtKiB(m.before.rss), fmtKiB(m.after.rss)}
		for _, counter := range []func(procMemory) int64{
			func(p procMemory) int64 { return p.rss },
			func(p procMemory) int64 { return p.pss },
			func(p procMemory) int64 { return p.privateDirty },
		} {
			cell := "?"
			if kib, ok := m.perSession(counter); ok {
				cell = fmt.Sprintf("%.1f KiB", kib)
			}
			row = append(row, cell)
		}
		rows = append(rows, row)
	}
	return rows
}

// printIdle writes the idle-session table, as text or as Markdown.
func (r *report) printIdle(w io.Writer, md bool) {
	if len(r.idleMem) == 0 {
		if r.opts.idleSessions == 0 {
			fmt.Fprintf(w, "\nIdle sessions: left out (-idle-sessions 0).\n")
		}
		return
	}
	fmt.Fprintf(w, "\nIdle sessions: each proxy's memory (/proc/PID/status VmRSS; Pss and Private_Dirty from smaps_rollup) before and with %d idle sessions open, and its growth per session:\n\n", r.opts.idleSessions)
	if md {
		mdTable(w, r.idleRows())
	} else {
		printTable(w, r.idleRows())
	}
}

// fmtKiB prints a KiB count in MiB, "?" when unknown.
func fmtKiB(kib int64) string {
	if kib < 0 {
		return "?"
	}
	return fmt.Sprintf("%.1f MiB", float64(kib)/1024)
}
