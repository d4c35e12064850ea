package main

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/rolegate/rolegate/internal/pgtest"
)

// TestConsoleBinary runs every console command through psql (and a few through
// pgx) against the real binary, and checks that a RELOAD of a broken file
// answers with the error and keeps serving with the old limits.
func TestConsoleBinary(t *testing.T) {
	t.Parallel()
	bin := buildBinary(t)
	c := pgtest.Start(t, pgtest.Options{})
	ctx := t.Context()
	if err := c.Exec(ctx, "create role con_user login password 'con_pw'"); err != nil {
		t.Fatal(err)
	}
	conf := func(rule string) string {
		return fmt.Sprintf("[control]\ndsn = %q\nmax_conns = 4\n[admin]\nhttp = \"\"\nusers = [%q]\n"+
			"[databases.quiet_db]\nmax_sessions = 7\n[roles.con_user]\n%s\n",
			c.SuperDSN(), c.SuperUser, rule)
	}
	p := startBinary(t, bin, c, conf("max_sessions = 1\npolicy = \"reject\""))
	console := strings.Replace(p.dsnAs(c.SuperUser, c.SuperPassword), "dbname=postgres", "dbname=rolegate", 1)
	held := login(t, p.dsnAs("con_user", "con_pw"))
	pid := held.PgConn().PID() // the server's pid: the console shows the same

	run := func(q string) string {
		t.Helper()
		out, errOut, err := psqlQuery(t, console, q)
		if err != nil {
			t.Fatalf("psql %q: %v, %s", q, err, errOut)
		}
		return out
	}
	sessions := run("show sessions")
	if !strings.Contains(sessions, "con_user") {
		t.Fatalf("show sessions:\n%s", sessions)
	}
	serverPID, err := strconv.Atoi(strings.SplitN(strings.SplitN(sessions, "\n", 2)[0], "|", 2)[0])
	if err != nil || uint32(serverPID) != pid {
		t.Fatalf("server pid from show sessions %q: %v", sessions, err)
	}
	if out := run("show roles"); !strings.Contains(out, "con_user") || !strings.Contains(out, "proxy.toml") {
		t.Errorf("show roles:\n%s", out)
	}
	// quiet_db has a rule and no session: it shows all the same.
	if out := run("show databases"); !strings.Contains(out, "postgres") || !strings.Contains(out, "quiet_db|7|proxy.toml|") {
		t.Errorf("show databases:\n%s", out)
	}
	if _, errOut, err := psqlQuery(t, p.dsnAs("con_user", "con_pw"), "select 1"); err == nil ||
		!strings.Contains(errOut, `too many connections for role "con_user"`) {
		t.Fatalf("second login under reject: %v, %s", err, errOut)
	}
	// The rejection is recorded once the client has been told.
	waitFor(t, 30*time.Second, "the rejection in show evictions", func() bool {
		return strings.Contains(run("show evictions"), "rejection")
	})
	if out := run("show config"); !strings.Contains(out, "redacted") || strings.Contains(out, c.SuperPassword) {
		t.Errorf("show config shows the control password or redacts nothing:\n%s", out)
	}
	if out := run("show stats"); !strings.Contains(out, "|") {
		t.Errorf("show stats:\n%s", out)
	}
	if out := run("show version"); !strings.Contains(out, "rolegate") {
		t.Errorf("show version:\n%s", out)
	}
	run("set limit con_user 2")
	second := login(t, p.dsnAs("con_user", "con_pw")) // the override lets it in
	alive(t, second, "second session under the override")
	run("set policy con_user newest-wins")
	run(fmt.Sprintf("kill %d", serverPID))
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	_, err = held.Exec(cctx, "select 1")
	cancel()
	if err == nil || !strings.Contains(err.Error(), "operator's request") {
		t.Fatalf("killed session got %v", err)
	}

	// pgx scans console rows.
	cfg, err := pgx.ParseConfig(console)
	if err != nil {
		t.Fatal(err)
	}
	cfg.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
	pc, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close(context.Background())
	var version string
	if err := pc.QueryRow(ctx, "show version").Scan(&version); err != nil || !strings.HasPrefix(version, "rolegate") {
		t.Fatalf("pgx show version: %q, %v", version, err)
	}

	// RELOAD: a good file ends the overrides; a broken one is the answer and
	// the old limits stay.
	p.configure(t, conf("max_sessions = 1\npolicy = \"reject\""))
	run("reload")
	p.configure(t, conf("max_sessions = 1\npolicy = \"oldest-loses\""))
	_, errOut, err := psqlQuery(t, console, "reload")
	if err == nil || !strings.Contains(errOut, "reload failed") || !strings.Contains(errOut, "roles.con_user.policy") {
		t.Fatalf("reload of a broken file: %v, %s", err, errOut)
	}
	if _, errOut, err := psqlQuery(t, p.dsnAs("con_user", "con_pw"), "select 1"); err == nil ||
		!strings.Contains(errOut, `too many connections for role "con_user"`) {
		t.Fatalf("after the failed reload, the old limit (1, reject) must still apply: %v, %s", err, errOut)
	}
	alive(t, second, "the session held across both reloads")
	if _, errOut, err := psqlQuery(t, p.dsnAs("con_user", "con_pw"), "select 1"); err == nil {
		t.Fatalf("unexpected login: %s", errOut)
	}
	// Not a console user: refused.
	if _, errOut, err := psqlQuery(t, strings.Replace(p.dsnAs("con_user", "con_pw"), "dbname=postgres", "dbname=rolegate", 1), "show version"); err == nil ||
		!strings.Contains(errOut, "not allowed to use the rolegate console") {
		t.Fatalf("console as con_user: %v, %s", err, errOut)
	}
}
