package main

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rolegate/rolegate/internal/pgtest"
)

// historyWarning is the line rolegate writes at start when the history
// table cannot be used.
const historyWarning = `level=WARN msg="eviction history: table rolegate.events unusable`

// TestHistoryBinary runs several rolegate binaries in front of one server
// with sql/setup.sql applied: an eviction by one instance shows in
// another's SHOW EVICTIONS with the first one's name, and in a restarted
// instance's; an instance whose control connection finds no table says so
// once and keeps its own history in memory.
func TestHistoryBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary against PostgreSQL")
	}
	t.Parallel()
	bin := buildBinary(t)
	c := pgtest.Start(t, pgtest.Options{})
	ctx := t.Context()
	setup, err := filepath.Abs(filepath.Join("..", "..", "sql", "setup.sql"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", c.SuperDSN(), "-f", setup)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("psql -f sql/setup.sql: %v\n%s", err, out)
	}
	for _, q := range []string{
		"alter role rolegate password 'control_pw'",
		"create role hist_user login password 'hist_pw'",
		"create database nohistory_db",
	} {
		if err := c.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	conf := func(instance, controlDSN, authQuery string) string {
		return fmt.Sprintf("instance = %q\n[control]\ndsn = %q\n[auth]\nauth_query = %q\n"+
			"[admin]\nhttp = \"\"\nusers = [%q]\n[roles.hist_user]\nmax_sessions = 1\npolicy = \"newest-wins\"\n",
			instance, controlDSN, authQuery, c.SuperUser)
	}
	withTable := func(instance string) string {
		return conf(instance, c.DSN("rolegate", "control_pw", "postgres"), "SELECT rolegate.get_secret($1)")
	}
	console := func(p *proc) string {
		return strings.Replace(p.dsnAs(c.SuperUser, c.SuperPassword), "dbname=postgres", "dbname=rolegate", 1)
	}
	// evictions is p's SHOW EVICTIONS, one []string of cells per row.
	evictions := func(t *testing.T, p *proc) [][]string {
		t.Helper()
		out, errOut, err := psqlQuery(t, console(p), "show evictions")
		if err != nil {
			t.Fatalf("show evictions: %v, %s", err, errOut)
		}
		var rows [][]string
		for line := range strings.Lines(out) {
			rows = append(rows, strings.Split(strings.TrimRight(line, "\n"), "|"))
		}
		return rows
	}
	// evictionBy waits for an eviction of pid by instance in p's SHOW EVICTIONS.
	evictionBy := func(t *testing.T, p *proc, instance string, pid uint32) {
		t.Helper()
		waitFor(t, 30*time.Second, fmt.Sprintf("the eviction of pid %d by %s", pid, instance), func() bool {
			for _, r := range evictions(t, p) {
				// time|instance|kind|role|database|client|victim_pid|...
				if len(r) > 7 && r[1] == instance && r[2] == "eviction" && r[3] == "hist_user" && r[6] == fmt.Sprint(pid) {
					return true
				}
			}
			return false
		})
	}

	a := startBinary(t, bin, c, withTable("inst-a"))
	b := startBinary(t, bin, c, withTable("inst-b"))
	first := login(t, a.dsnAs("hist_user", "hist_pw"))
	pid := first.PgConn().PID()
	login(t, a.dsnAs("hist_user", "hist_pw")) // newest-wins: evicts first
	evicted(t, first, "the first session", "hist_user", "newest-wins")

	t.Run("another instance shows the eviction", func(t *testing.T) {
		evictionBy(t, b, "inst-a", pid)
	})

	t.Run("a restarted instance still shows it", func(t *testing.T) {
		a.signal(t, syscall.SIGINT)
		a.wantExit(t, 30*time.Second)
		a2 := startBinary(t, bin, c, withTable("")) // a random name this time
		evictionBy(t, a2, "inst-a", pid)
		m := regexp.MustCompile(`msg="rolegate started".* instance=([0-9a-f]{8})\b`).FindStringSubmatch(a2.stderr.String())
		if m == nil {
			t.Fatalf("no random instance tag in the start line:\n%s", a2.stderr.String())
		}
		// Its own evictions carry the tag.
		third := login(t, a2.dsnAs("hist_user", "hist_pw"))
		thirdPID := third.PgConn().PID()
		login(t, a2.dsnAs("hist_user", "hist_pw"))
		evictionBy(t, b, m[1], thirdPID)
		for _, p := range []*proc{a, b, a2} {
			if strings.Contains(p.stderr.String(), "level=WARN") {
				t.Errorf("a warning with a usable table:\n%s", p.stderr.String())
			}
		}
	})

	t.Run("no table: one warning, the history in memory", func(t *testing.T) {
		// The superuser's control connection to a database without
		// sql/setup.sql's schema, with the default auth query.
		p := startBinary(t, bin, c, conf("inst-c", c.DSN(c.SuperUser, c.SuperPassword, "nohistory_db"),
			"SELECT rolname::text, rolpassword FROM pg_catalog.pg_authid WHERE rolname = $1"))
		held := login(t, p.dsnAs("hist_user", "hist_pw"))
		heldPID := held.PgConn().PID()
		login(t, p.dsnAs("hist_user", "hist_pw"))
		evicted(t, held, "the session through the instance without a table", "hist_user", "newest-wins")
		evictionBy(t, p, "inst-c", heldPID)
		// Only this instance's events: the table's are not read.
		for _, r := range evictions(t, p) {
			if r[1] != "inst-c" {
				t.Errorf("an event of %s without a table: %q", r[1], r)
			}
		}
		log := p.stderr.String()
		if n := strings.Count(log, historyWarning); n != 1 || !strings.Contains(log, `relation \"rolegate.events\" does not exist`) {
			t.Errorf("%d warnings about the table (want 1, naming the missing relation):\n%s", n, log)
		}
		if n := strings.Count(log, "level=WARN"); n != 1 {
			t.Errorf("%d warnings, want only the table's:\n%s", n, log)
		}
	})
}
