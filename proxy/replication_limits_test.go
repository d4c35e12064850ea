package proxy

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/internal/pgtest"
	"github.com/rolegate/rolegate/limiter"
)

// TestLimitReplication: PostgreSQL 15.18 (the server these tests run) neither
// counts walsenders against a role's or a database's connection limit nor
// checks a replication login against them, logical (replication=database) or
// physical (replication=true); the first subtest shows it. rolegate does the
// same: a replica gets in wherever the server lets it in, takes nobody's slot,
// and is never an eviction victim, while ordinary logins beside it get their
// policy as before.
func TestLimitReplication(t *testing.T) {
	t.Parallel()
	c := pgtest.Start(t, pgtest.Options{HBA: []string{"host replication all 127.0.0.1/32 scram-sha-256"}})
	ctx := ctxTimeout(t, 2*time.Minute)
	for _, q := range []string{
		"create role repl_r login replication password 'repl_pw' connection limit 1",
		"create role repl_d login replication password 'repl_pw'",
		"create database repl_db connection limit 1",
	} {
		if err := c.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	su := connect(t, c.SuperDSN())
	// gone waits until the server has no backend of role left, walsenders
	// included, so that the next step starts from an empty role.
	gone := func(t *testing.T, role string) {
		t.Helper()
		waitUntil(t, 30*time.Second, "the backends of "+role+" to end", func() bool {
			var n int
			err := su.QueryRow(ctx, "select count(*) from pg_stat_activity where usename = $1", role).Scan(&n)
			return err == nil && n == 0
		})
	}
	// walsenders counts the walsenders of role, as pg_stat_activity shows them.
	walsenders := func(t *testing.T, role string) int {
		t.Helper()
		var n int
		if err := su.QueryRow(ctx, "select count(*) from pg_stat_activity where usename = $1 and backend_type = 'walsender'",
			role).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	refused := func(t *testing.T, dsn, what, name string) {
		t.Helper()
		n, err := tryConnect(dsn, 15*time.Second, nil)
		if err == nil {
			n.Close(ctx)
			t.Fatalf("a login to %s %s was let in beyond its limit", what, name)
		}
		wantTooMany(t, err, what, name)
	}

	t.Run("server", func(t *testing.T) {
		direct := func(role, db string) string { return c.DSN(role, "repl_pw", db) }
		normal := connect(t, direct("repl_r", "postgres"))
		refused(t, direct("repl_r", "postgres"), "role", "repl_r") // the limit holds for ordinary logins
		// Replication logins beside a session at the role's limit are let in.
		logical := mustReplConnect(t, direct("repl_r", "postgres"), "database")
		physical := mustReplConnect(t, direct("repl_r", "postgres"), "true")
		identifySystem(t, logical)
		identifySystem(t, physical)
		if n := walsenders(t, "repl_r"); n != 2 {
			t.Fatalf("%d walsenders of repl_r, want 2", n)
		}
		// They hold no slot either: with the session gone, one login gets in.
		normal.Close(ctx)
		waitUntil(t, 30*time.Second, "the session to end", func() bool {
			n, err := tryConnect(direct("repl_r", "postgres"), 15*time.Second, nil)
			if err != nil {
				return false
			}
			n.Close(ctx)
			return true
		})
		logical.Close(ctx)
		physical.Close(ctx)
		gone(t, "repl_r")

		// The database's limit does not count a logical walsender in it.
		w := mustReplConnect(t, direct("repl_d", "repl_db"), "database")
		connect(t, direct("repl_d", "repl_db"))
		refused(t, direct("repl_d", "repl_db"), "database", "repl_db")
		identifySystem(t, w)
	})
	gone(t, "repl_r")
	gone(t, "repl_d")

	ctl := superControl(t, c)
	lim := &Limits{Limiter: limiter.New(time.Now), Server: ctl}
	lim.SetRules(mapRules{
		roles: map[string]limiter.Rule{"repl_r": {MaxSessions: -1, Policy: limiter.PolicyNewestWins, Fallback: limiter.PolicyReject}},
		dbs:   map[string]limiter.Rule{"repl_db": {MaxSessions: -1, Policy: limiter.PolicyReject}},
	}, true, 0)
	p := startProxy(t, proxyOpts{server: c, auth: proxyAuth(time.Minute, auth.SourceFunc(ctl.Secret)), limits: lim})
	via := func(role, db string, extra ...string) string { return p.DSN(role, "repl_pw", db, extra...) }
	// wantLastEvent waits for the newest event to be what want accepts: a
	// rejection is recorded just after the client has been told.
	wantLastEvent := func(t *testing.T, what string, want func(Event) bool) {
		t.Helper()
		var last Event
		deadline := time.Now().Add(30 * time.Second)
		for {
			if ev := p.Events(); len(ev) > 0 { // newest first
				last = ev[0]
			}
			if want(last) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("last event %+v, want %s", last, what)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}

	t.Run("rolegate", func(t *testing.T) {
		normal := connect(t, via("repl_r", "postgres"))
		normalPID := backendPID(t, normal)
		// Replication logins at the role's limit are let in, as by the
		// server, and evict nobody.
		logical := mustReplConnect(t, via("repl_r", "postgres"), "database")
		physical := mustReplConnect(t, via("repl_r", "postgres"), "true")
		identifySystem(t, logical)
		identifySystem(t, physical)
		wantAlive(t, normal, "the session at the limit")
		if ev := p.Events(); len(ev) != 0 {
			t.Errorf("replication logins made events: %+v", ev)
		}

		// An ordinary login at the limit: newest-wins evicts the ordinary
		// session, never a walsender (which holds no slot anyway).
		newer := connect(t, via("repl_r", "postgres"))
		wantEvicted(t, normal, "role", "repl_r", limiter.PolicyNewestWins)
		wantLastEvent(t, fmt.Sprintf("the eviction of pid %d", normalPID), func(ev Event) bool {
			return ev.Kind == "eviction" && ev.VictimPID == normalPID
		})
		identifySystem(t, logical)
		identifySystem(t, physical)

		// Under reject: a replication login still gets in (psql, running
		// ordinary replication commands); an ordinary one is refused, and
		// rolegate counts one session, not the walsenders.
		reject, newest := limiter.PolicyReject, limiter.PolicyNewestWins
		lim.Override("repl_r", nil, &reject)
		defer lim.Override("repl_r", nil, &newest)
		out, errOut, err := psql(t, via("repl_r", "postgres", "replication=database"), "", "-Atc", "IDENTIFY_SYSTEM")
		if err != nil || !strings.HasSuffix(out, "|postgres\n") {
			t.Fatalf("psql replication=database at the limit: %v, %q, %q", err, out, errOut)
		}
		refused(t, via("repl_r", "postgres"), "role", "repl_r")
		wantLastEvent(t, "rolegate's rejection counting 1 session", func(ev Event) bool {
			return ev.Kind == "rejection" && strings.Contains(ev.Reason, `role "repl_r" at limit 1 (1 session): policy reject`)
		})
		wantAlive(t, newer, "the session at the limit")
		// psql's walsender ends shortly after psql does; the two held
		// here are left, and still answer.
		waitUntil(t, 30*time.Second, "2 walsenders of repl_r", func() bool { return walsenders(t, "repl_r") == 2 })
		identifySystem(t, logical)
		identifySystem(t, physical)
	})

	t.Run("rolegate: a database's limit", func(t *testing.T) {
		w := mustReplConnect(t, via("repl_d", "repl_db"), "database")
		identifySystem(t, w)
		connect(t, via("repl_d", "repl_db"))
		refused(t, via("repl_d", "repl_db"), "database", "repl_db")
		wantLastEvent(t, "rolegate's rejection counting 1 session", func(ev Event) bool {
			return ev.Kind == "rejection" && ev.Scope == "database" &&
				strings.Contains(ev.Reason, `database "repl_db" at limit 1 (1 session)`)
		})
		identifySystem(t, w)
	})
}

// replConnect opens a replication connection (mode "database" or "true") with
// pgconn, closed at cleanup.
func replConnect(t *testing.T, dsn, mode string) (*pgconn.PgConn, error) {
	t.Helper()
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		t.Fatalf("parse %q: %v", redact(dsn), err)
	}
	cfg.RuntimeParams["replication"] = mode
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	pc, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { pc.Close(context.Background()) })
	return pc, nil
}

func mustReplConnect(t *testing.T, dsn, mode string) *pgconn.PgConn {
	t.Helper()
	pc, err := replConnect(t, dsn, mode)
	if err != nil {
		t.Fatalf("replication=%s: %v", mode, err)
	}
	return pc
}

// identifySystem runs IDENTIFY_SYSTEM on a replication connection.
func identifySystem(t *testing.T, pc *pgconn.PgConn) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	res, err := pc.Exec(ctx, "IDENTIFY_SYSTEM").ReadAll()
	if err != nil || len(res) != 1 || len(res[0].Rows) != 1 {
		t.Fatalf("IDENTIFY_SYSTEM: %+v, %v", res, err)
	}
}
