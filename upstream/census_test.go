package upstream

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/config"
	"github.com/rolegate/rolegate/internal/pgtest"
)

// rolePW is the password of every role the census tests create.
const rolePW = "census pass"

// TestServerView runs Census, ServerLimits, Terminate and LockRole against
// one server; the subtests use roles and databases of their own, so they run
// in parallel. The control role is sql/setup.sql's least-privilege rolegate.
func TestServerView(t *testing.T) {
	t.Parallel()
	c := controlCluster(t)
	for _, q := range []string{
		"create role census_r login password '" + rolePW + "'",
		"create role census_other login password '" + rolePW + "'",
		"create role census_super superuser login password '" + rolePW + "'",
		"create role census_repl replication login password '" + rolePW + "'",
		"create role limits_r login password '" + rolePW + "' connection limit 2",
		"create role term_r login password '" + rolePW + "'",
		"create role guard_r login password '" + rolePW + "'",
		"create role sessions_r login password '" + rolePW + "'",
		"create role sessions_s login password '" + rolePW + "'",
		"create database sessions_db",
		"create database census_db",
		"create database guard_db",
		"create database census_elsewhere",
		"create database limits_db",
		"alter database limits_db connection limit 3",
		"create database limits_invalid",
		// What an interrupted DROP DATABASE leaves (PostgreSQL 16, and the
		// minor releases of 15 from 15.4): the server refuses logins to it.
		"update pg_database set datconnlimit = -2 where datname = 'limits_invalid'",
	} {
		if err := c.Exec(t.Context(), q); err != nil {
			t.Fatal(err)
		}
	}
	controlDSN := c.DSN("rolegate", controlPW, "postgres")
	control := func(t *testing.T, maxConns int) *Control {
		return newControl(t, config.Control{DSN: controlDSN, MaxConns: maxConns}, "SELECT rolegate.get_secret($1)")
	}

	t.Run("sessions", func(t *testing.T) {
		t.Parallel()
		ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
		defer cancel()
		a := connect(t, c.DSN("sessions_r", rolePW, "sessions_db")+"&application_name=app_a")
		b := connect(t, c.DSN("sessions_s", rolePW, "sessions_db"))
		connect(t, c.DSN("census_other", rolePW, "sessions_db")) // not asked for
		pidOf := func(conn *pgx.Conn) uint32 { return conn.PgConn().PID() }
		ctl := control(t, 2)
		got, err := ctl.Sessions(ctx, []string{"sessions_r", "sessions_s", "nobody"})
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 2 {
			t.Fatalf("sessions %+v", got)
		}
		byPID := map[uint32]Backend{}
		for _, s := range got {
			byPID[s.PID] = s
		}
		sa, sb := byPID[pidOf(a)], byPID[pidOf(b)]
		if sa.Role != "sessions_r" || sa.Database != "sessions_db" || sa.ApplicationName != "app_a" || sa.State != "idle" ||
			sa.BackendStart.IsZero() || sa.StateChange.IsZero() || sa.ClientAddr == "" {
			t.Errorf("session a %+v", sa)
		}
		if sb.Role != "sessions_s" || sb.Database != "sessions_db" {
			t.Errorf("session b %+v", sb)
		}
		if got, err := ctl.Sessions(ctx, nil); err != nil || len(got) != 0 {
			t.Errorf("no roles: %+v %v", got, err)
		}
	})

	t.Run("census", func(t *testing.T) {
		t.Parallel()
		ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
		defer cancel()
		su := connect(t, c.SuperDSN())

		idle := connect(t, c.DSN("census_r", rolePW, "census_db"))
		inTx := connect(t, c.DSN("census_r", rolePW, "census_db"))
		if _, err := inTx.Exec(ctx, "begin; select 1"); err != nil {
			t.Fatal(err)
		}
		active := connect(t, c.DSN("census_r", rolePW, "census_db"))
		sleep(t, active)
		roleElsewhere := connect(t, c.DSN("census_r", rolePW, "census_elsewhere"))
		otherInDB := connect(t, c.DSN("census_other", rolePW, "census_db")+"&application_name=rolegate")
		superInDB := connect(t, c.DSN("census_super", rolePW, "census_db"))
		// Neither the role nor the database: not counted.
		connect(t, c.DSN("census_other", rolePW, "census_elsewhere"))
		connect(t, c.DSN("census_super", rolePW, "postgres"))
		// A walsender of the database (logical replication connection):
		// not a client backend, not counted by the server either.
		walsender := replicationConn(t, c, "census_repl", "census_db")
		// A login of the role still authenticating. PostgreSQL 15 does not
		// list it in pg_stat_activity yet; 17 and later list it without a
		// usename, and it must not be counted (the server does not).
		authenticating(t, c, "census_r", "census_db")

		waitState(t, su, active.PgConn().PID(), "active")
		var walType string
		if err := su.QueryRow(ctx, "select backend_type from pg_stat_activity where pid = $1",
			int32(walsender.PID())).Scan(&walType); err != nil || walType != "walsender" {
			t.Fatalf("the replication connection: backend_type %q, %v; want walsender", walType, err)
		}

		ctl := control(t, 1)
		before := time.Now()
		holders, err := ctl.Census(ctx, "census_r", "census_db")
		if err != nil {
			t.Fatal(err)
		}
		type want struct {
			role, db, state  string
			super, protected bool
		}
		wants := map[uint32]want{
			idle.PgConn().PID():          {"census_r", "census_db", "idle", false, false},
			inTx.PgConn().PID():          {"census_r", "census_db", "idle in transaction", false, false},
			active.PgConn().PID():        {"census_r", "census_db", "active", false, false},
			roleElsewhere.PgConn().PID(): {"census_r", "census_elsewhere", "idle", false, false},
			// application_name rolegate alone does not make a session rolegate's.
			otherInDB.PgConn().PID(): {"census_other", "census_db", "idle", false, false},
			superInDB.PgConn().PID(): {"census_super", "census_db", "idle", true, false},
		}
		// Client is the backend's client end: here the pgx connection's own.
		clients := make(map[uint32]netip.AddrPort)
		for _, conn := range []*pgx.Conn{idle, inTx, active, roleElsewhere, otherInDB, superInDB} {
			a := conn.PgConn().Conn().LocalAddr().(*net.TCPAddr).AddrPort()
			clients[conn.PgConn().PID()] = netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
		}
		got := make(map[uint32]want)
		for i, h := range holders {
			got[h.PID] = want{h.Role, h.Database, h.State, h.Superuser, h.Protected}
			if h.Client != clients[h.PID] {
				t.Errorf("pid %d: client %v, want %v", h.PID, h.Client, clients[h.PID])
			}
			if h.BackendStart.IsZero() || h.BackendStart.After(before) || h.StateChange.Before(h.BackendStart) || h.StateChange.After(before) {
				t.Errorf("pid %d: backend_start %v, state_change %v", h.PID, h.BackendStart, h.StateChange)
			}
			if i > 0 && h.BackendStart.Before(holders[i-1].BackendStart) {
				t.Errorf("holders not in backend_start order: %v", holders)
			}
			if h.Replication || h.ViaRolegate {
				t.Errorf("pid %d: Replication %v, ViaRolegate %v", h.PID, h.Replication, h.ViaRolegate)
			}
		}
		if !maps.Equal(got, wants) {
			t.Errorf("census of census_r / census_db:\n got %v\nwant %v", got, wants)
		}

		// Only a role, only a database, neither.
		onlyRole, err := ctl.Census(ctx, "census_r", "")
		if err != nil || len(onlyRole) != 4 {
			t.Errorf("census of census_r alone: %d holders, %v; want 4", len(onlyRole), err)
		}
		onlyDB, err := ctl.Census(ctx, "", "census_db")
		if err != nil || len(onlyDB) != 5 {
			t.Errorf("census of census_db alone: %d holders, %v; want 5", len(onlyDB), err)
		}
		if none, err := ctl.Census(ctx, "no_such_role", "no_such_db"); err != nil || len(none) != 0 {
			t.Errorf("census of nobody: %v, %v", none, err)
		}

		// rolegate's own control sessions are protected, except the one
		// that runs the census, which is not listed at all.
		var own uint32
		if err := ctl.pool.QueryRow(ctx, "select pg_backend_pid()").Scan(&own); err != nil {
			t.Fatal(err)
		}
		mine := connect(t, controlDSN+"&application_name=rolegate") // another instance's, say
		psql := connect(t, controlDSN+"&application_name=psql")     // the control role, by hand
		custom := connect(t, controlDSN+"&application_name=rg-east")
		ctlEast := newControl(t, config.Control{DSN: controlDSN + "&application_name=rg-east", MaxConns: 1}, "")
		for _, tt := range []struct {
			ctl  *Control
			self uint32
			want map[uint32]bool // pid: Protected
		}{
			{ctl, own, map[uint32]bool{mine.PgConn().PID(): true, psql.PgConn().PID(): false, custom.PgConn().PID(): false}},
			{ctlEast, 0, map[uint32]bool{mine.PgConn().PID(): false, psql.PgConn().PID(): false, custom.PgConn().PID(): true}},
		} {
			if err := tt.ctl.pool.QueryRow(ctx, "select pg_backend_pid()").Scan(&tt.self); err != nil {
				t.Fatal(err)
			}
			holders, err := tt.ctl.Census(ctx, "rolegate", "")
			if err != nil {
				t.Fatal(err)
			}
			seen := 0
			for _, h := range holders {
				if h.PID == tt.self {
					t.Errorf("the census lists its own control connection %d", h.PID)
				}
				if p, ok := tt.want[h.PID]; ok {
					seen++
					if h.Protected != p {
						t.Errorf("pid %d: Protected %v, want %v", h.PID, h.Protected, p)
					}
				}
			}
			if seen != len(tt.want) {
				t.Errorf("census of rolegate: %v; want the pids %v among them", holders, tt.want)
			}
		}
	})

	t.Run("server limits", func(t *testing.T) {
		t.Parallel()
		ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
		defer cancel()
		ctl := control(t, 2)
		check := func(role, db string, ttl time.Duration, wantRole int, wantSuper bool, wantDB int) {
			t.Helper()
			r, s, d, err := ctl.ServerLimits(ctx, role, db, ttl)
			if err != nil || r != wantRole || s != wantSuper || d != wantDB {
				t.Errorf("ServerLimits(%q, %q, %v) = %d, %v, %d, %v; want %d, %v, %d",
					role, db, ttl, r, s, d, err, wantRole, wantSuper, wantDB)
			}
		}
		check("limits_r", "limits_db", time.Minute, 2, false, 3)
		check("census_super", "postgres", time.Minute, -1, true, -1)
		check("no_such_role", "no_such_db", time.Minute, -1, false, -1)
		check("", "", 0, -1, false, -1)
		check("limits_r", "limits_invalid", 0, 2, false, -1) // -2: no limit of its own

		// Cached: a change on the server is seen after ForgetLimits, or
		// with ttl 0, which neither reads nor fills the cache.
		if err := c.Exec(ctx, "alter role limits_r connection limit 5; alter database limits_db connection limit 0"); err != nil {
			t.Fatal(err)
		}
		check("limits_r", "limits_db", time.Minute, 2, false, 3)
		check("limits_r", "limits_db", 0, 5, false, 0)
		check("limits_r", "limits_db", time.Minute, 2, false, 3)
		// A role cached with another database: the database is asked for.
		check("limits_r", "postgres", time.Minute, 2, false, -1)
		ctl.ForgetLimits()
		check("limits_r", "limits_db", time.Minute, 5, false, 0)
		// Unknown names are cached too; a role created later is seen once
		// the entry expires.
		if err := c.Exec(ctx, "create role limits_new login connection limit 7"); err != nil {
			t.Fatal(err)
		}
		check("limits_new", "limits_db", 0, 7, false, 0)
		if err := c.Exec(ctx, "alter role limits_r connection limit -1; alter database limits_db connection limit -1"); err != nil {
			t.Fatal(err)
		}
		check("limits_r", "limits_db", time.Minute, 5, false, 0)
		ctl.ForgetLimits()
		check("limits_r", "limits_db", time.Minute, -1, false, -1)
		ctl.ForgetLimits() // twice is fine

		// Expiry, by an injected clock.
		clocked := control(t, 1)
		var mu sync.Mutex
		now := time.Now()
		clocked.limits.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
		advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
		limit := func() int {
			r, _, _, err := clocked.ServerLimits(ctx, "limits_new", "postgres", time.Minute)
			if err != nil {
				t.Fatal(err)
			}
			return r
		}
		if got := limit(); got != 7 {
			t.Fatalf("limit %d, want 7", got)
		}
		if err := c.Exec(ctx, "alter role limits_new connection limit 8"); err != nil {
			t.Fatal(err)
		}
		advance(59 * time.Second)
		if got := limit(); got != 7 {
			t.Errorf("after 59 s of a 1 min ttl: limit %d, want the cached 7", got)
		}
		advance(time.Second)
		if got := limit(); got != 8 {
			t.Errorf("after the ttl: limit %d, want 8", got)
		}
		// A shorter ttl on the next call applies to what is cached already.
		if err := c.Exec(ctx, "alter role limits_new connection limit 9"); err != nil {
			t.Fatal(err)
		}
		advance(10 * time.Second)
		if r, _, _, err := clocked.ServerLimits(ctx, "limits_new", "postgres", 5*time.Second); err != nil || r != 9 {
			t.Errorf("with a shorter ttl: %d, %v; want 9", r, err)
		}
	})

	t.Run("terminate", func(t *testing.T) {
		t.Parallel()
		ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
		defer cancel()
		su := connect(t, c.SuperDSN())
		ctl := control(t, 2)
		gone := func(pid uint32) bool {
			var n int
			if err := su.QueryRow(ctx, "select count(*) from pg_stat_activity where pid = $1", int32(pid)).Scan(&n); err != nil {
				t.Fatal(err)
			}
			return n == 0
		}

		// Timeout 0: the signal is sent, the victim's query ends with 57P01.
		busy := connect(t, c.DSN("term_r", rolePW, "postgres"))
		busyErr := sleep(t, busy)
		waitState(t, su, busy.PgConn().PID(), "active")
		if r, err := ctl.Terminate(ctx, Target{PID: busy.PgConn().PID()}, 0); r != Terminated || err != nil {
			t.Fatalf("Terminate(busy, 0) = %v, %v", r, err)
		}
		select {
		case err := <-busyErr:
			wantSQLState(t, err, "57P01")
		case <-ctx.Done():
			t.Fatal("the terminated session's query did not end")
		}
		// Present sees a signalled backend until it has left, and never a
		// pid that a newer backend has (another backend_start) or none.
		for {
			present, err := ctl.Present(ctx, Target{PID: busy.PgConn().PID()})
			if err != nil {
				t.Fatal(err)
			}
			if !present {
				break
			}
			if ctx.Err() != nil {
				t.Fatal("the signalled backend did not leave pg_stat_activity")
			}
			time.Sleep(5 * time.Millisecond)
		}
		alive := connect(t, c.DSN("term_r", rolePW, "postgres"))
		var started time.Time
		if err := su.QueryRow(ctx, "select backend_start from pg_stat_activity where pid = $1", int32(alive.PgConn().PID())).Scan(&started); err != nil {
			t.Fatal(err)
		}
		for _, c := range []struct {
			t    Target
			want bool
		}{
			{Target{PID: alive.PgConn().PID()}, true},
			{Target{PID: alive.PgConn().PID(), BackendStart: started}, true},
			{Target{PID: alive.PgConn().PID(), BackendStart: started.Add(-time.Second)}, false},
			{Target{PID: busy.PgConn().PID()}, false},
			{Target{PID: 0}, false},
			{Target{PID: math.MaxUint32}, false},
		} {
			if got, err := ctl.Present(ctx, c.t); got != c.want || err != nil {
				t.Errorf("Present(%+v) = %v, %v; want %v", c.t, got, err, c.want)
			}
		}

		// With a timeout: the backend is gone when Terminate returns. The
		// victim is idle, reading; it is told 57P01 too.
		idle := connect(t, c.DSN("term_r", rolePW, "postgres"))
		idleErr := make(chan error, 1)
		go func() { idleErr <- idle.PgConn().WaitForNotification(ctx) }()
		pid := idle.PgConn().PID()
		if r, err := ctl.Terminate(ctx, Target{PID: pid}, 5*time.Second); r != Terminated || err != nil {
			t.Fatalf("Terminate(idle, 5s) = %v, %v", r, err)
		}
		if !gone(pid) {
			t.Errorf("pid %d still in pg_stat_activity after Terminate with a timeout", pid)
		}
		wantSQLState(t, <-idleErr, "57P01")

		// A timeout that passes: NotGone (the server warns), not an error; the
		// signal still ends the session. The victim is stopped (SIGSTOP) so
		// that it cannot exit within the 1 ms however the machine schedules
		// it; it goes on, and ends, once continued.
		slow := connect(t, c.DSN("term_r", rolePW, "postgres"))
		slowErr := make(chan error, 1)
		go func() { slowErr <- slow.PgConn().WaitForNotification(ctx) }()
		stopped, err := os.FindProcess(int(slow.PgConn().PID()))
		if err != nil {
			t.Fatal(err)
		}
		if err := stopped.Signal(syscall.SIGSTOP); err != nil {
			t.Fatalf("stop the victim: %v", err)
		}
		resume := sync.OnceFunc(func() {
			if err := stopped.Signal(syscall.SIGCONT); err != nil {
				t.Errorf("continue the victim: %v", err)
			}
		})
		t.Cleanup(resume)
		if r, err := ctl.Terminate(ctx, Target{PID: slow.PgConn().PID()}, time.Millisecond); r != NotGone || err != nil {
			t.Errorf("Terminate(slow, 1ms) = %v, %v; want NotGone, nil", r, err)
		}
		resume()
		wantSQLState(t, <-slowErr, "57P01")

		// A pid that is no backend (any more): NoBackend, not an error,
		// with and without a timeout.
		for _, p := range []uint32{pid, busy.PgConn().PID(), 0, math.MaxInt32 + 1, math.MaxUint32} {
			for _, timeout := range []time.Duration{0, time.Millisecond, 200 * time.Microsecond} {
				if r, err := ctl.Terminate(ctx, Target{PID: p}, timeout); r != NoBackend || err != nil {
					t.Errorf("Terminate(%d, %v) = %v, %v; want NoBackend, nil", p, timeout, r, err)
				}
			}
		}

		// The least-privilege control role may not terminate a superuser.
		super := connect(t, c.DSN("census_super", rolePW, "postgres"))
		r, err := ctl.Terminate(ctx, Target{PID: super.PgConn().PID()}, 0)
		if r == Terminated || err == nil {
			t.Errorf("Terminate(superuser) = %v, %v; want an error", r, err)
		}
		wantSQLState(t, err, "42501")
		if gone(super.PgConn().PID()) {
			t.Error("the superuser's session is gone")
		}
	})

	t.Run("terminate guards", func(t *testing.T) {
		t.Parallel()
		ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
		defer cancel()
		su := connect(t, c.SuperDSN())
		ctl := control(t, 2)
		// seen is the census's row for conn, as admission would pass it on.
		seen := func(conn *pgx.Conn) Target {
			t.Helper()
			holders, err := ctl.Census(ctx, "guard_r", "guard_db")
			if err != nil {
				t.Fatal(err)
			}
			for _, h := range holders {
				if h.PID == conn.PgConn().PID() {
					if h.BackendStart.IsZero() || h.StateChange.IsZero() {
						t.Fatalf("census without times: %+v", h)
					}
					return Target{PID: h.PID, BackendStart: h.BackendStart, IdleSince: h.StateChange}
				}
			}
			t.Fatalf("pid %d not in the census %+v", conn.PgConn().PID(), holders)
			return Target{}
		}
		alive := func(conn *pgx.Conn, what string) {
			t.Helper()
			if _, err := conn.Exec(ctx, "select 1"); err != nil {
				t.Fatalf("%s was terminated: %v", what, err)
			}
		}
		for _, timeout := range []time.Duration{0, 5 * time.Second} {
			// pid reuse: the pid's backend_start is not the census's, by a
			// microsecond either way (the server's precision). The
			// backend is not signalled.
			a := connect(t, c.DSN("guard_r", rolePW, "guard_db"))
			ta := seen(a)
			for _, d := range []time.Duration{time.Microsecond, -time.Microsecond} {
				other := Target{PID: ta.PID, BackendStart: ta.BackendStart.Add(d)}
				if r, err := ctl.Terminate(ctx, other, timeout); r != Replaced || err != nil {
					t.Errorf("Terminate(backend_start %+v, %v) = %v, %v; want Replaced", d, timeout, r, err)
				}
			}
			alive(a, "a session whose backend_start did not match")

			// evict-idle: the session opened a transaction since the
			// census, or ran a query and is idle again (a new
			// state_change): not signalled.
			b := connect(t, c.DSN("guard_r", rolePW, "guard_db"))
			tb := seen(b)
			if _, err := b.Exec(ctx, "begin"); err != nil {
				t.Fatal(err)
			}
			waitState(t, su, tb.PID, "idle in transaction")
			if r, err := ctl.Terminate(ctx, tb, timeout); r != NotIdle || err != nil {
				t.Errorf("Terminate(in a transaction, %v) = %v, %v; want NotIdle", timeout, r, err)
			}
			if _, err := b.Exec(ctx, "commit"); err != nil {
				t.Fatalf("the session in a transaction was terminated: %v", err)
			}
			waitState(t, su, tb.PID, "idle")
			if r, err := ctl.Terminate(ctx, tb, timeout); r != NotIdle || err != nil {
				t.Errorf("Terminate(idle again since, %v) = %v, %v; want NotIdle", timeout, r, err)
			}
			alive(b, "a session that was busy since the census")
			// Without the idle guard (newest-wins), a busy session is
			// terminated; with the census's own values, an idle one.
			if _, err := b.Exec(ctx, "begin"); err != nil {
				t.Fatal(err)
			}
			if r, err := ctl.Terminate(ctx, Target{PID: tb.PID, BackendStart: tb.BackendStart}, timeout); r != Terminated || err != nil {
				t.Errorf("Terminate(newest-wins, in a transaction, %v) = %v, %v", timeout, r, err)
			}
			// a ran a query since its census: a new census, whose values
			// the server finds exactly as it reported them.
			if r, err := ctl.Terminate(ctx, seen(a), timeout); r != Terminated || err != nil {
				t.Errorf("Terminate(census values, %v) = %v, %v", timeout, r, err)
			}
			for _, conn := range []*pgx.Conn{a, b} {
				_, err := conn.Exec(ctx, "select 1")
				wantSQLState(t, err, "57P01")
			}
		}
	})

	t.Run("lock role", func(t *testing.T) {
		t.Parallel()
		ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
		defer cancel()
		su := connect(t, c.SuperDSN())
		// a and b are two rolegate instances.
		a, b := control(t, 2), control(t, 2)
		// locks lists the advisory locks on name of class, as pid: granted.
		locks := func(class int32, name string) map[uint32]bool {
			t.Helper()
			rows, err := su.Query(ctx, `select pid, granted from pg_locks
				where locktype = 'advisory' and classid = $1::int4::oid and objsubid = 2
				and objid = ((pg_catalog.hashtext($2)::int8 + 4294967296) % 4294967296)::oid`, class, name)
			if err != nil {
				t.Fatal(err)
			}
			m := make(map[uint32]bool)
			var pid uint32
			var granted bool
			if _, err := pgx.ForEachRow(rows, []any{&pid, &granted}, func() error { m[pid] = granted; return nil }); err != nil {
				t.Fatal(err)
			}
			return m
		}
		wantIdle := func(ctls ...*Control) {
			t.Helper()
			for _, ctl := range ctls {
				if n := ctl.pool.Stat().AcquiredConns(); n != 0 {
					t.Errorf("%d control connections still acquired", n)
				}
				if n := ctl.locks.keys.Len(); n != 0 {
					t.Errorf("%d in-process lock entries left", n)
				}
			}
		}
		lockAsync := func(ctl *Control, role string) <-chan func() {
			ch := make(chan func(), 1)
			go func() {
				unlock, err := ctl.LockRole(ctx, role)
				if err != nil && ctx.Err() == nil {
					t.Errorf("LockRole(%q): %v", role, err)
				}
				ch <- unlock
			}()
			return ch
		}
		blocked := func(ch <-chan func()) {
			t.Helper()
			select {
			case unlock := <-ch:
				unlock()
				t.Fatal("a second LockRole did not wait for the first")
			case <-time.After(150 * time.Millisecond):
			}
		}
		next := func(ch <-chan func()) func() {
			t.Helper()
			select {
			case unlock := <-ch:
				return unlock
			case <-time.After(30 * time.Second):
				t.Fatal("LockRole did not return after the holder unlocked")
				return nil
			}
		}

		// Two instances: the second waits until the first unlocks.
		unlockA, err := a.LockRole(ctx, "lock_r")
		if err != nil {
			t.Fatal(err)
		}
		held := locks(lockClassRole, "lock_r")
		if len(held) != 1 || !slices.Contains(slices.Collect(maps.Values(held)), true) {
			t.Fatalf("pg_locks for lock_r: %v, want one granted lock", held)
		}
		fromB := lockAsync(b, "lock_r")
		blocked(fromB)
		unlockA()
		unlockB := next(fromB)
		if held := locks(lockClassRole, "lock_r"); len(held) != 1 {
			t.Errorf("pg_locks for lock_r while b holds it: %v", held)
		}
		unlockB()
		unlockB() // twice is safe
		unlockA() // so is an unlock long after
		if held := locks(lockClassRole, "lock_r"); len(held) != 0 {
			t.Errorf("pg_locks for lock_r after both unlocked: %v", held)
		}
		wantIdle(a, b)

		// Within one instance too.
		unlock1, err := a.LockRole(ctx, "lock_r")
		if err != nil {
			t.Fatal(err)
		}
		second := lockAsync(a, "lock_r")
		blocked(second)
		unlock1()
		next(second)()
		wantIdle(a)

		// Different roles, and a database of the same name, do not wait
		// for each other; one instance holds all its locks on one session.
		var unlocks []func()
		for _, f := range []func(context.Context, string) (func(), error){a.LockRole, a.LockRole, a.LockDatabase} {
			name := fmt.Sprintf("r%d", len(unlocks))
			if len(unlocks) == 2 {
				name = "r0"
			}
			u, err := f(ctx, name)
			if err != nil {
				t.Fatal(err)
			}
			unlocks = append(unlocks, u)
		}
		if n := a.pool.Stat().AcquiredConns(); n != 1 {
			t.Errorf("three locks held on %d connections, want 1", n)
		}
		r0, r1, d0 := locks(lockClassRole, "r0"), locks(lockClassRole, "r1"), locks(lockClassDatabase, "r0")
		if len(r0) != 1 || !maps.Equal(r0, r1) || !maps.Equal(r0, d0) {
			t.Errorf("pg_locks: role r0 %v, role r1 %v, database r0 %v; want one session holding all", r0, r1, d0)
		}
		for _, u := range unlocks {
			u()
		}
		wantIdle(a)

		// A ctx that ends while waiting: an error, and nothing held, on the
		// server or in the pool; the lock is free for the next caller.
		unlockA, err = a.LockRole(ctx, "lock_r")
		if err != nil {
			t.Fatal(err)
		}
		for _, ctl := range []*Control{b, a} { // waiting on the server, and in-process
			short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
			unlock, err := ctl.LockRole(short, "lock_r")
			cancel()
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("LockRole with a ctx that ends: %v, want context.DeadlineExceeded", err)
			}
			unlock() // a no-op, safe to call
		}
		if held := locks(lockClassRole, "lock_r"); len(held) != 1 {
			t.Errorf("pg_locks after the cancelled waits: %v, want a's lock alone", held)
		}
		wantIdle(b)
		unlockA()
		wantIdle(a, b)
		if held := locks(lockClassRole, "lock_r"); len(held) != 0 {
			t.Errorf("pg_locks after unlock: %v", held)
		}
		unlockB, err = b.LockRole(ctx, "lock_r")
		if err != nil {
			t.Fatal(err)
		}
		unlockB()
		done, cancelDone := context.WithCancel(ctx)
		cancelDone()
		if _, err := a.LockRole(done, "lock_r"); !errors.Is(err, context.Canceled) {
			t.Errorf("LockRole with a cancelled ctx: %v", err)
		}

		// The lock session dies: the server has released the lock, unlock
		// copes, and the next LockRole starts a new session.
		unlockA, err = a.LockRole(ctx, "lock_r")
		if err != nil {
			t.Fatal(err)
		}
		var sessionPID uint32
		for pid := range locks(lockClassRole, "lock_r") {
			sessionPID = pid
		}
		var ok bool
		if err := su.QueryRow(ctx, "select pg_terminate_backend($1, 5000)", int32(sessionPID)).Scan(&ok); err != nil || !ok {
			t.Fatalf("terminating the lock session: %v, %v", ok, err)
		}
		if held := locks(lockClassRole, "lock_r"); len(held) != 0 {
			t.Errorf("pg_locks after the lock session died: %v", held)
		}
		unlockB, err = b.LockRole(ctx, "lock_r")
		if err != nil {
			t.Fatal(err)
		}
		unlockB()
		unlockA()
		wantIdle(a, b)
		unlockA, err = a.LockRole(ctx, "lock_r")
		if err != nil {
			t.Fatalf("LockRole after the lock session died: %v", err)
		}
		unlockA()
		wantIdle(a, b)

		// Close with a lock held returns at once and the server releases
		// the lock; the holder's unlock does nothing, and there are no
		// more locks.
		closing := control(t, 2)
		unlockC, err := closing.LockRole(ctx, "lock_closing")
		if err != nil {
			t.Fatal(err)
		}
		closed := make(chan struct{})
		go func() { closing.Close(); close(closed) }()
		select {
		case <-closed:
		case <-time.After(30 * time.Second):
			t.Fatal("Close waited for the lock holder")
		}
		unlockC()
		if _, err := closing.LockRole(ctx, "lock_closing"); err == nil {
			t.Error("LockRole after Close succeeded")
		}
		unlockB, err = b.LockRole(ctx, "lock_closing") // the server released it
		if err != nil {
			t.Fatal(err)
		}
		unlockB()
		wantIdle(b)
	})
}

// connect opens a pgx connection, closed when the test ends.
func connect(t *testing.T, dsn string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// sleep starts a long query on conn; its error arrives on the channel. The
// query is cancelled when the test ends.
func sleep(t *testing.T, conn *pgx.Conn) <-chan error {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	var wg sync.WaitGroup
	wg.Go(func() {
		_, err := conn.Exec(ctx, "select pg_sleep(60)")
		errc <- err
	})
	// Registered after connect's cleanup, so it runs first.
	t.Cleanup(func() { cancel(); wg.Wait() })
	return errc
}

// waitState waits until pid's pg_stat_activity state is state.
func waitState(t *testing.T, su *pgx.Conn, pid uint32, state string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var got *string
		err := su.QueryRow(t.Context(), "select state from pg_stat_activity where pid = $1", int32(pid)).Scan(&got)
		if err == nil && got != nil && *got == state {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d: state %v, %v; want %q", pid, got, err, state)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// replicationConn opens a logical replication connection (a walsender).
func replicationConn(t *testing.T, c *pgtest.Cluster, user, db string) *pgconn.PgConn {
	t.Helper()
	cfg, err := pgconn.ParseConfig(c.DSN(user, rolePW, db))
	if err != nil {
		t.Fatal(err)
	}
	cfg.RuntimeParams["replication"] = "database"
	conn, err := pgconn.ConnectConfig(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// authenticating starts a login and stops at the server's SASL challenge;
// the connection is closed when the test ends.
func authenticating(t *testing.T, c *pgtest.Cluster, user, db string) {
	t.Helper()
	nc, err := net.Dial("tcp", c.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	fe := pgproto3.NewFrontend(nc, nc)
	fe.Send(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersionNumber,
		Parameters: map[string]string{"user": user, "database": db}})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := nc.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	msg, err := fe.Receive()
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := msg.(*pgproto3.AuthenticationSASL); !ok {
		t.Fatalf("the server answered a startup with %T, want AuthenticationSASL", msg)
	}
}

// TestTerminationValues: the numbers the terminate statement returns are
// Termination's.
func TestTerminationValues(t *testing.T) {
	for want, got := range map[Termination]int{Terminated: 1, NoBackend: 2, Replaced: 3, NotIdle: 4, NotGone: 5} {
		if int(want) != got {
			t.Errorf("%v is %d, the statement says %d", want, int(want), got)
		}
	}
	if !strings.Contains(terminateNow, "ELSE 2 END") || !strings.Contains(terminateWait, "ELSE 5 END") {
		t.Error("the statements' ELSE values are not NoBackend and NotGone")
	}
}

// The census reads pg_locks before pg_stat_activity (see censusQuery): the
// plan scans pg_lock_status first.
func TestCensusReadsReservationsFirst(t *testing.T) {
	t.Parallel()
	c := pgtest.Start(t, pgtest.Options{})
	su := connect(t, c.SuperDSN())
	rows, err := su.Query(t.Context(), "EXPLAIN "+censusQuery, "r", "d", "rolegate", int32(0))
	if err != nil {
		t.Fatal(err)
	}
	var plan strings.Builder
	for rows.Next() {
		var line string
		if err := rows.Scan(&line); err != nil {
			t.Fatal(err)
		}
		plan.WriteString(line + "\n")
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	p := plan.String()
	locks, activity := strings.Index(p, "pg_lock_status"), strings.Index(p, "pg_stat_get_activity")
	if locks < 0 || activity < 0 || locks > activity {
		t.Fatalf("the plan does not read pg_locks before pg_stat_activity:\n%s", p)
	}
}
