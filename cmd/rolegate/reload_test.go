package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rolegate/rolegate/internal/pgtest"
)

// The log lines reload writes.
const (
	reloadedLine     = `msg="reloaded limits and policies for new logins"`
	reloadFailedLine = `msg="reload failed; keeping the previous configuration"`
)

// dsnAs is a libpq/pgx connection string for role through rolegate.
func (p *proc) dsnAs(role, password string) string {
	host, port, _ := net.SplitHostPort(p.addr)
	return fmt.Sprintf("host=%s port=%s user=%s password=%s dbname=postgres sslmode=disable", host, port, role, password)
}

// reload sends SIGHUP and waits for reload's log line (success or failure),
// returning the complete log lines written since the signal.
func (p *proc) reload(t *testing.T) string {
	t.Helper()
	from := len(p.stderr.String())
	p.signal(t, syscall.SIGHUP)
	var since string
	waitFor(t, 30*time.Second, "the reload log line", func() bool {
		if p.done() {
			t.Fatalf("rolegate exited on SIGHUP: %v", p.cmd.ProcessState)
		}
		out := p.stderr.String()[from:]
		since = out[:strings.LastIndexByte(out, '\n')+1] // whole lines only
		return strings.Contains(since, reloadedLine) || strings.Contains(since, reloadFailedLine)
	})
	return since
}

// evictions counts the eviction log lines so far.
func (p *proc) evictions() int { return strings.Count(p.stderr.String(), "msg=evicted") }

// login opens a pgx session; it is closed at cleanup.
func login(t *testing.T, dsn string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("login through rolegate: %v", err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// psqlQuery runs one query with psql, returning its stdout and stderr.
func psqlQuery(t *testing.T, dsn, query string) (stdout, stderr string, err error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "psql", "-X", "-At", "-d", dsn, "-c", query)
	var out, errOut strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err = cmd.Run()
	return out.String(), errOut.String(), err
}

// alive fails the test unless c still answers queries.
func alive(t *testing.T, c *pgx.Conn, what string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	var n int
	if err := c.QueryRow(ctx, "select 41 + 1").Scan(&n); err != nil || n != 42 {
		t.Fatalf("%s: got %d, %v; want it alive", what, n, err)
	}
}

// evicted fails the test unless c's next query gets rolegate's 57P01 for a
// newer login of role under policy.
func evicted(t *testing.T, c *pgx.Conn, what, role, policy string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	_, err := c.Exec(ctx, "select 1")
	// The message goes on to name the newer login's application_name and
	// client address, then the policy.
	prefix := fmt.Sprintf("terminating connection: rolegate evicted this session for a newer login of role %q (", role)
	suffix := fmt.Sprintf(", policy %s)", policy)
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "57P01" || !strings.HasPrefix(pe.Message, prefix) || !strings.HasSuffix(pe.Message, suffix) {
		t.Fatalf("%s: got %v; want 57P01 %q...%q", what, err, prefix, suffix)
	}
}

// lineOf is the 1-based number of the first line of doc that contains s.
func lineOf(t *testing.T, doc, s string) int {
	t.Helper()
	for i, l := range strings.Split(doc, "\n") {
		if strings.Contains(l, s) {
			return i + 1
		}
	}
	t.Fatalf("%q not in\n%s", s, doc)
	return 0
}

// TestReload runs the binary and changes its limits with SIGHUP: new logins
// get the new rules (and the server's current limits) at once, a bad file
// keeps the old rules and says why, and no session is dropped by a reload.
func TestReload(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary against PostgreSQL")
	}
	t.Parallel()
	bin := buildBinary(t)
	c := pgtest.Start(t, pgtest.Options{})
	ctx := t.Context()
	for _, q := range []string{
		"create role reload_user login password 'reload_pw'",
		"create role srv_user login password 'srv_pw'",
		"create role bystander login password 'bystander_pw'",
	} {
		if err := c.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	// Every version of the file: the superuser's control connection, server
	// limits cached for an hour (only a reload clears them), srv_user under
	// newest-wins with no limit of its own, and reload_user's table.
	conf := func(reloadUser string) string {
		return fmt.Sprintf("[control]\ndsn = %q\nmax_conns = 4\n[limits]\nlimits_cache_ttl = \"1h\"\n"+
			"[roles.srv_user]\npolicy = \"newest-wins\"\n[roles.reload_user]\n%s\n", c.SuperDSN(), reloadUser)
	}
	p := startBinary(t, bin, c, conf("max_sessions = 1\npolicy = \"reject\""))
	reloadDSN := p.dsnAs("reload_user", "reload_pw")

	// A session of another role, inside a transaction, open across every reload.
	bystander := login(t, p.dsnAs("bystander", "bystander_pw"))
	tx, err := bystander.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "create temp table kept as select 42 as v"); err != nil {
		t.Fatal(err)
	}

	// Config 1, reject: the second login is refused, the first keeps going.
	first := login(t, reloadDSN)
	if _, errOut, err := psqlQuery(t, reloadDSN, "select 1"); err == nil ||
		!strings.Contains(errOut, `FATAL:  too many connections for role "reload_user"`) {
		t.Fatalf("second login under reject: %v, stderr %q", err, errOut)
	}
	alive(t, first, "the first session after a rejected login")
	// rolegate logs the rejection once the client has been told.
	waitFor(t, 30*time.Second, "the rejection log line under policy reject", func() bool {
		log := p.stderr.String()
		return strings.Contains(log, "msg=rejected") && strings.Contains(log, "policy=reject")
	})

	// Config 2, newest-wins: the session open across the reload survives it,
	// and the next login evicts it.
	p.configure(t, conf("max_sessions = 1\npolicy = \"newest-wins\""))
	if out := p.reload(t); !strings.Contains(out, reloadedLine) || !strings.Contains(out, "server_limits_cache=cleared") {
		t.Fatalf("reload to newest-wins:\n%s", out)
	}
	alive(t, first, "the session open across the reload")
	if n := p.evictions(); n != 0 {
		t.Fatalf("%d evictions before any login under newest-wins", n)
	}
	second := login(t, reloadDSN)
	evicted(t, first, "the first session, after a login under newest-wins", "reload_user", "newest-wins")
	alive(t, second, "the login that evicted")
	if n := p.evictions(); n != 1 {
		t.Fatalf("%d eviction log lines, want 1", n)
	}

	// Broken files: each would change the rules (more sessions, reject) if
	// any of it were applied. The reload fails naming file, line and key.
	for _, bad := range []struct{ name, rule, line, key, why string }{
		{"unknown key", "max_sessions = 5\npolicy = \"reject\"\nmax_session = 1", "max_session = 1", "roles.reload_user.max_session", "unknown key"},
		{"bad policy", "max_sessions = 5\npolicy = \"oldest-loses\"", `policy = "oldest-loses"`, "roles.reload_user.policy", "oldest-loses"},
	} {
		doc := p.configure(t, conf(bad.rule))
		out := p.reload(t)
		want := fmt.Sprintf("%s:%d: %s: ", p.path, lineOf(t, doc, bad.line), bad.key)
		if !strings.Contains(out, reloadFailedLine) || strings.Contains(out, reloadedLine) ||
			!strings.Contains(out, want) || !strings.Contains(out, bad.why) {
			t.Fatalf("reload with a bad file (%s): want the failure naming %q and %q, got\n%s", bad.name, want, bad.why, out)
		}
		if p.done() || refusing(p.addr) {
			t.Fatalf("rolegate stopped serving after a bad file (%s)", bad.name)
		}
		alive(t, second, "the session open across a failed reload ("+bad.name+")")
	}
	// The previous rules still apply: one session, newest wins.
	third := login(t, reloadDSN)
	evicted(t, second, "the second session, after a login under the kept rules", "reload_user", "newest-wins")
	alive(t, third, "the login under the kept rules")
	if n := p.evictions(); n != 2 {
		t.Fatalf("%d eviction log lines, want 2", n)
	}

	// Two sessions allowed: a second login gets in without evicting, a third
	// evicts the oldest.
	p.configure(t, conf("max_sessions = 2\npolicy = \"newest-wins\""))
	if out := p.reload(t); !strings.Contains(out, reloadedLine) {
		t.Fatalf("reload to max_sessions = 2:\n%s", out)
	}
	alive(t, third, "the session open across the reload to max_sessions = 2")
	fourth := login(t, reloadDSN)
	alive(t, third, "the older session after a login within max_sessions = 2")
	alive(t, fourth, "the login within max_sessions = 2")
	if n := p.evictions(); n != 2 {
		t.Fatalf("%d eviction log lines after a login within the limit, want 2", n)
	}
	fifth := login(t, reloadDSN)
	evicted(t, third, "the oldest session, after a third login with max_sessions = 2", "reload_user", "newest-wins")
	alive(t, fourth, "the second-oldest session with max_sessions = 2")
	alive(t, fifth, "the third login with max_sessions = 2")

	// The server's own limit, set after a login cached the role's limits: the
	// cache hides it (the server refuses the next login itself, nobody is
	// evicted) until a reload clears the cache; then it applies to the next
	// login, under the role's policy.
	held := login(t, p.dsnAs("srv_user", "srv_pw"))
	if err := c.Exec(ctx, "alter role srv_user connection limit 1"); err != nil {
		t.Fatal(err)
	}
	evictionsBefore := p.evictions()
	if _, errOut, err := psqlQuery(t, p.dsnAs("srv_user", "srv_pw"), "select 1"); err == nil ||
		!strings.Contains(errOut, `FATAL:  too many connections for role "srv_user"`) {
		t.Fatalf("login with the server's limit cached as none: %v, stderr %q", err, errOut)
	}
	alive(t, held, "the srv_user session while the server's new limit is not known yet")
	if n := p.evictions(); n != evictionsBefore {
		t.Fatalf("an eviction with the server's limit cached as none:\n%s", p.stderr.String())
	}
	// The server's refusal is logged once the client has been told; by then a
	// rejection of rolegate's own would have been logged too.
	waitFor(t, 30*time.Second, "the server's refusal in the log", func() bool {
		for _, l := range strings.Split(p.stderr.String(), "\n") {
			if strings.Contains(l, `msg="login failed"`) && strings.Contains(l, "role=srv_user") && strings.Contains(l, "refused by server") {
				return true
			}
		}
		return false
	})
	for _, l := range strings.Split(p.stderr.String(), "\n") {
		if strings.Contains(l, "msg=rejected") && strings.Contains(l, "role=srv_user") {
			t.Fatalf("rolegate knew the server's new limit before the reload: %s", l)
		}
	}
	if out := p.reload(t); !strings.Contains(out, reloadedLine) {
		t.Fatalf("reload to clear the server limits:\n%s", out)
	}
	alive(t, held, "the srv_user session open across the reload")
	newer := login(t, p.dsnAs("srv_user", "srv_pw"))
	evicted(t, held, "the srv_user session, after a login under the server's new limit", "srv_user", "newest-wins")
	alive(t, newer, "the srv_user login under the server's new limit")

	// No reload dropped anything: the bystander's transaction is intact, and
	// the reload_user sessions nobody evicted still work.
	var v int
	if err := tx.QueryRow(ctx, "select v from kept").Scan(&v); err != nil || v != 42 {
		t.Fatalf("the bystander's transaction after the reloads: %d, %v", v, err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	alive(t, bystander, "the bystander after the reloads")
	alive(t, fourth, "a reload_user session at the end")
	alive(t, fifth, "the newest reload_user session at the end")
	if n := strings.Count(p.stderr.String(), "msg=evicted"); n != 4 {
		t.Errorf("%d eviction log lines, want 4 (the ones made on purpose)", n)
	}
	if p.done() {
		t.Fatal("rolegate exited")
	}
}
