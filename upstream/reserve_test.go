package upstream

import (
	"context"
	"testing"
	"time"

	"github.com/rolegate/rolegate/config"
)

// Reservations as two rolegate instances see them: each instance's census
// counts the other's, never its own; they show in pg_locks on the lock
// session, and nothing is left once they are released.
func TestReserve(t *testing.T) {
	t.Parallel()
	c := controlCluster(t)
	for _, q := range []string{"create role res_r login", "create role res_other login", "create database res_db"} {
		if err := c.Exec(t.Context(), q); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	dsn := c.DSN("rolegate", controlPW, "postgres")
	a := newControl(t, config.Control{DSN: dsn, MaxConns: 2}, "")
	b := newControl(t, config.Control{DSN: dsn, MaxConns: 2}, "")
	su := connect(t, c.SuperDSN())

	reserved := func(ctl *Control, role, db string) (roles, dbs int) {
		t.Helper()
		hs, err := ctl.Census(ctx, role, db)
		if err != nil {
			t.Fatal(err)
		}
		for _, h := range hs {
			if !h.Reserved {
				continue
			}
			if h.PID != 0 || h.Superuser || h.Protected {
				t.Errorf("reservation row %+v", h)
			}
			switch {
			case h.Role == role && h.Database == "":
				roles++
			case h.Database == db && h.Role == "":
				dbs++
			default:
				t.Errorf("reservation row %+v for role %q database %q", h, role, db)
			}
		}
		return roles, dbs
	}
	// locks counts the reservation rows in pg_locks and who holds them.
	locks := func() (n int, holders map[string]int) {
		t.Helper()
		rows, err := su.Query(ctx, `select coalesce(a.application_name, '') from pg_locks l
			join pg_stat_activity a on a.pid = l.pid
			where l.locktype = 'advisory' and l.objsubid = 1`)
		if err != nil {
			t.Fatal(err)
		}
		holders = map[string]int{}
		for rows.Next() {
			var app string
			if err := rows.Scan(&app); err != nil {
				t.Fatal(err)
			}
			n++
			holders[app]++
		}
		if err := rows.Err(); err != nil {
			t.Fatal(err)
		}
		return n, holders
	}

	r1, err := a.Reserve(ctx, "res_r", "res_db") // role and database
	if err != nil {
		t.Fatal(err)
	}
	r2, err := a.Reserve(ctx, "res_r", "") // the role only
	if err != nil {
		t.Fatal(err)
	}
	r3, err := b.Reserve(ctx, "res_other", "res_db")
	if err != nil {
		t.Fatal(err)
	}
	if roles, dbs := reserved(b, "res_r", "res_db"); roles != 2 || dbs != 1 {
		t.Errorf("b sees %d role and %d database reservations of a, want 2 and 1", roles, dbs)
	}
	if roles, dbs := reserved(a, "res_r", "res_db"); roles != 0 || dbs != 1 {
		t.Errorf("a sees %d role and %d database reservations, want its own left out and b's database one", roles, dbs)
	}
	if roles, dbs := reserved(a, "res_other", "postgres"); roles != 1 || dbs != 0 {
		t.Errorf("a sees %d reservations of res_other and %d of postgres, want 1 and 0", roles, dbs)
	}
	if n, holders := locks(); n != 5 || holders["rolegate"] != 5 {
		t.Errorf("pg_locks: %d reservation locks, held by %v; want 5 held by rolegate", n, holders)
	}

	// A role lock taken and dropped meanwhile leaves the reservations held.
	unlock, err := a.LockRole(ctx, "res_r")
	if err != nil {
		t.Fatal(err)
	}
	unlock()
	if roles, _ := reserved(b, "res_r", "res_db"); roles != 2 {
		t.Errorf("after a role lock came and went, b sees %d role reservations, want 2", roles)
	}

	r1()
	r1() // twice is harmless
	if roles, dbs := reserved(b, "res_r", "res_db"); roles != 1 || dbs != 0 {
		t.Errorf("after one release b sees %d and %d, want 1 and 0", roles, dbs)
	}
	r2()
	r3()
	if n, _ := locks(); n != 0 {
		t.Errorf("%d reservation locks left after every release", n)
	}
	if roles, dbs := reserved(b, "res_r", "res_db"); roles != 0 || dbs != 0 {
		t.Errorf("after every release b sees %d and %d", roles, dbs)
	}
	// The lock session went back to the pool with its last lock.
	if pid := a.locks.lockPID.Load(); pid != 0 {
		t.Errorf("a still keeps lock session %d", pid)
	}

	// A closed control reserves nothing.
	a.Close()
	r, err := a.Reserve(ctx, "res_r", "")
	if err == nil {
		t.Error("Reserve after Close succeeded")
	}
	r()
}
