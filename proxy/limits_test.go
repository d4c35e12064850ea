package proxy

import (
	"fmt"
	"maps"
	"net"
	"net/url"
	"regexp"
	"slices"
	"sync"
	"sync/atomic"

	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/limiter"
	"github.com/rolegate/rolegate/upstream"
)

// mapRules is proxy.toml's limits in miniature.
type mapRules struct {
	roles map[string]limiter.Rule
	dbs   map[string]limiter.Rule
}

func (m mapRules) RoleRule(role string) limiter.Rule {
	if r, ok := m.roles[role]; ok {
		return r
	}
	return limiter.NoLimit()
}

func (m mapRules) DatabaseRule(database string) limiter.Rule {
	if r, ok := m.dbs[database]; ok {
		return r
	}
	return limiter.NoLimit()
}

// limitedProxy is a proxy in proxy-auth mode with limits on, reading the
// server's own rolconnlimit, and rules for the given roles.
func limitedProxy(t *testing.T, roles map[string]limiter.Rule) *testProxy {
	t.Helper()
	return rulesProxy(t, mapRules{roles: roles})
}

// rulesProxy is limitedProxy with rules for databases too.
func rulesProxy(t *testing.T, rules mapRules) *testProxy {
	t.Helper()
	return rulesProxyWith(t, rules, proxyOpts{})
}

// rulesProxyWith is rulesProxy with more options; it sets auth and limits.
func rulesProxyWith(t *testing.T, rules mapRules, o proxyOpts) *testProxy {
	t.Helper()
	ctl := superControl(t, shared)
	lim := &Limits{Limiter: limiter.New(time.Now), Server: ctl}
	lim.SetRules(rules, true, 0)
	o.auth, o.limits = proxyAuth(time.Minute, auth.SourceFunc(ctl.Secret)), lim
	return startProxy(t, o)
}

// admissionWarnings are the WARN and ERROR lines of p's log but for a
// password lookup that outlasted its patience on a busy machine and was
// answered by the role's password fetched a moment before: that is the
// lookup's load shedding (README, Password lookups), not a failure.
func admissionWarnings(p *testProxy) []string {
	return slices.DeleteFunc(append(logLines(p, "level=WARN"), logLines(p, "level=ERROR")...), func(line string) bool {
		return strings.Contains(line, `msg="password lookup failed; using the role's password as fetched earlier"`)
	})
}

// sessionsOf counts the role's client backends, on a connection of its own
// that it closes (callers poll it).
func sessionsOf(t *testing.T, role string) int {
	t.Helper()
	c := connect(t, shared.SuperDSN())
	defer c.Close(context.Background())
	var n int
	if err := c.QueryRow(context.Background(),
		"select count(*) from pg_stat_activity where usename = $1 and backend_type = 'client backend'", role).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// The seed: a role with connection limit 1 and one session held.
func TestLimitSeed(t *testing.T) {
	ctx := context.Background()
	if err := shared.Exec(ctx, "drop role if exists seed_user; create role seed_user login password 'seed_pw' connection limit 1"); err != nil {
		t.Fatal(err)
	}
	// Each subtest starts from no seed_user session: a backend of the one
	// before, still on its way out, would be counted and evicted.
	noSessions := func(t *testing.T) {
		t.Helper()
		waitUntil(t, 30*time.Second, "no seed_user sessions left", func() bool { return sessionsOf(t, "seed_user") == 0 })
	}
	t.Run("reject", func(t *testing.T) {
		noSessions(t)
		p := limitedProxy(t, map[string]limiter.Rule{"seed_user": {MaxSessions: -1, Policy: limiter.PolicyReject, Fallback: limiter.PolicyReject}})
		first := connect(t, p.DSN("seed_user", "seed_pw", "app"))
		_, errOut, err := psql(t, p.DSN("seed_user", "seed_pw", "app"), "", "-c", "select 1")
		if err == nil || !strings.Contains(errOut, `FATAL:  too many connections for role "seed_user"`) {
			t.Fatalf("second login: %v, %q", err, errOut)
		}
		if err := first.Ping(ctx); err != nil {
			t.Fatalf("the held session was disturbed: %v", err)
		}
		// The event, like the log line, is recorded once the client has been told.
		waitUntil(t, 30*time.Second, "the rejection event", func() bool { return len(p.Events()) > 0 })
		if ev := p.Events(); len(ev) != 1 || ev[0].Kind != "rejection" || ev[0].Role != "seed_user" || ev[0].Policy != "reject" {
			t.Errorf("events: %+v", ev)
		}
		first.Close(ctx)
	})
	t.Run("newest-wins", func(t *testing.T) {
		noSessions(t)
		p := limitedProxy(t, map[string]limiter.Rule{"seed_user": {MaxSessions: -1, Policy: limiter.PolicyNewestWins, Fallback: limiter.PolicyReject}})
		first := connect(t, p.DSN("seed_user", "seed_pw", "app"))
		out, errOut, err := psql(t, p.DSN("seed_user", "seed_pw", "app"), "", "-Atc", "select current_user")
		if err != nil || strings.TrimSpace(out) != "seed_user" {
			t.Fatalf("second login: %v, %q %q", err, out, errOut)
		}
		_, err = first.Exec(ctx, "select 1")
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || pe.Code != "57P01" || !evictedText("role", "seed_user", "newest-wins").MatchString(pe.Message) {
			t.Fatalf("the old session got %v", err)
		}
		noSessions(t) // psql's backend ends shortly after psql does
		if !strings.Contains(p.logs.String(), "msg=evicted") {
			t.Errorf("no eviction log line:\n%s", p.logs.String())
		}
		if ev := p.Events(); len(ev) != 1 || ev[0].Kind != "eviction" || ev[0].VictimPID == 0 || !ev[0].ViaRolegate ||
			ev[0].VictimClient == "" || ev[0].Policy != "newest-wins" {
			t.Errorf("events: %+v", ev)
		}
	})
	t.Run("newest-wins evicts a session opened directly", func(t *testing.T) {
		noSessions(t)
		p := limitedProxy(t, map[string]limiter.Rule{"seed_user": {MaxSessions: -1, Policy: limiter.PolicyNewestWins, Fallback: limiter.PolicyReject}})
		direct := connect(t, shared.DSN("seed_user", "seed_pw", "app"))
		out, errOut, err := psql(t, p.DSN("seed_user", "seed_pw", "app"), "", "-Atc", "select count(*) from pg_stat_activity where usename = 'seed_user'")
		if err != nil || strings.TrimSpace(out) != "1" {
			t.Fatalf("login through rolegate: %v, %q %q", err, out, errOut)
		}
		_, err = direct.Exec(ctx, "select 1")
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || pe.Code != "57P01" {
			t.Fatalf("the direct session got %v", err)
		}
	})
}

// newRole creates a login role with the password name+"_pw" and the given
// server connection limit (-1: none), plus any extra role options
// (superuser, ...), and returns the password. A role left by an earlier run
// in the same cluster (go test -count=N) is dropped first.
func newRole(t *testing.T, name string, limit int, options ...string) string {
	t.Helper()
	q := fmt.Sprintf("drop role if exists %s; create role %s login password '%s_pw' connection limit %d %s", name, name, name, limit, strings.Join(options, " "))
	if err := shared.Exec(context.Background(), q); err != nil {
		t.Fatal(err)
	}
	return name + "_pw"
}

// newDatabase creates a database with the server connection limit given
// (-1: none), dropping one left by an earlier run (go test -count=N) first.
func newDatabase(t *testing.T, name string, limit int) {
	t.Helper()
	if err := shared.Exec(context.Background(), fmt.Sprintf("drop database if exists %s with (force)", name)); err != nil {
		t.Fatal(err)
	}
	if err := shared.Exec(context.Background(), fmt.Sprintf("create database %s connection limit %d", name, limit)); err != nil {
		t.Fatal(err)
	}
}

// tryConnect is pgx.Connect with a timeout; the caller closes what it gets.
// dialed, when not nil, receives the client's local address once the TCP
// connection is up, which is how rolegate's log names the client.
func tryConnect(dsn string, timeout time.Duration, dialed *string) (*pgx.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, err
	}
	if dialed != nil {
		dial := cfg.DialFunc
		cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := dial(ctx, network, addr)
			if err == nil {
				*dialed = c.LocalAddr().String()
			}
			return c, err
		}
	}
	return pgx.ConnectConfig(ctx, cfg)
}

// sqlstate is the SQLSTATE of a PostgreSQL error in err's chain, or "".
func sqlstate(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

// wantTooMany checks that err is PostgreSQL's own 53300 for what ("role" or
// "database") name.
func wantTooMany(t *testing.T, err error, what, name string) {
	t.Helper()
	var pe *pgconn.PgError
	want := fmt.Sprintf("too many connections for %s %q", what, name)
	if !errors.As(err, &pe) || pe.Code != "53300" || pe.Message != want || pe.Severity != "FATAL" {
		t.Fatalf("got %v, want FATAL 53300 %s", err, want)
	}
}

// wantEvicted checks that c was evicted by rolegate for a newer login under
// policy: its next query gets 57P01 with rolegate's reason.
func wantEvicted(t *testing.T, c *pgx.Conn, scope, name string, policy limiter.Policy) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := c.Exec(ctx, "select 1")
	want := evictedText(scope, name, policy.String())
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "57P01" || !want.MatchString(pe.Message) {
		t.Fatalf("evicted session got %v, want 57P01 matching %s", err, want)
	}
	if !strings.HasPrefix(pe.Hint, "Connect again if you still need a session: the limit's policy ended") {
		t.Errorf("evicted session's HINT %q does not say what to do", pe.Hint)
	}
}

// evictedText matches the 57P01 message of a session evicted for a newer
// login of role name (scope "role") or to database name, under policy: it
// names the newer login's application_name and client address (and, for a
// database, its role).
func evictedText(scope, name, policy string) *regexp.Regexp {
	who := `(application_name "(\\.|[^"\\])*"|no application_name), client \S+, policy ` + regexp.QuoteMeta(policy) + `\)$`
	if scope == "database" {
		return regexp.MustCompile(`^terminating connection: rolegate evicted this session for a newer login to database ` +
			regexp.QuoteMeta(`"`+name+`"`) + ` \(role "[^"]*", ` + who)
	}
	return regexp.MustCompile(`^terminating connection: rolegate evicted this session for a newer login of role ` +
		regexp.QuoteMeta(`"`+name+`"`) + ` \(` + who)
}

// wantAlive checks that c still answers queries.
func wantAlive(t *testing.T, c *pgx.Conn, what string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var one int
	if err := c.QueryRow(ctx, "select 1").Scan(&one); err != nil || one != 1 {
		t.Fatalf("%s was disturbed: %v", what, err)
	}
}

// backendPID is the server's pid for a session, as the server reports it.
func backendPID(t *testing.T, c *pgx.Conn) uint32 {
	t.Helper()
	var pid uint32
	if err := c.QueryRow(context.Background(), "select pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	return pid
}

// waitWaiting waits until exactly n logins of role are in rolegate's wait
// queue, as the limiter's snapshot counts them.
func waitWaiting(t *testing.T, p *testProxy, role string, n int) {
	t.Helper()
	waitUntil(t, 60*time.Second, fmt.Sprintf("%d logins of %s waiting", n, role), func() bool {
		return p.cfg.Limits.Limiter.Snapshot().WaitingByRole[role] == n
	})
}

// waitStates waits until the role's client backends are in exactly the given
// pg_stat_activity states, by count.
func waitStates(t *testing.T, su *pgx.Conn, role string, want map[string]int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		rows, err := su.Query(context.Background(),
			"select coalesce(state, ''), count(*) from pg_stat_activity where usename = $1 and backend_type = 'client backend' group by 1", role)
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]int{}
		for rows.Next() {
			var s string
			var n int
			if err := rows.Scan(&s, &n); err != nil {
				t.Fatal(err)
			}
			got[s] = n
		}
		if rows.Err() != nil {
			t.Fatal(rows.Err())
		}
		if maps.Equal(got, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("sessions of %s in states %v, want %v", role, got, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// dbSessions counts the client backends in a database.
func dbSessions(t *testing.T, su *pgx.Conn, database string) int {
	t.Helper()
	var n int
	if err := su.QueryRow(context.Background(),
		"select count(*) from pg_stat_activity where datname = $1 and backend_type = 'client backend'", database).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// logLines returns rolegate's log lines that contain every one of parts.
func logLines(p *testProxy, parts ...string) []string {
	var out []string
	for line := range strings.SplitSeq(p.logs.String(), "\n") {
		ok := line != ""
		for _, part := range parts {
			ok = ok && strings.Contains(line, part)
		}
		if ok {
			out = append(out, line)
		}
	}
	return out
}

// logged waits until rolegate's log holds at least n lines that contain every
// one of parts, and returns them all. rolegate logs a rejection or a failed
// login after it has told the client, so a test that has just seen the
// failure may be ahead of the line.
func logged(t *testing.T, p *testProxy, n int, parts ...string) []string {
	t.Helper()
	waitUntil(t, 30*time.Second, fmt.Sprintf("%d log lines with %q", n, parts), func() bool { return len(logLines(p, parts...)) >= n })
	return logLines(p, parts...)
}

// clientLines returns the log lines about one client above debug level.
func clientLines(p *testProxy, addr string) []string {
	var out []string
	for _, l := range logLines(p, "client="+addr+" ") {
		if !strings.Contains(l, "level=DEBUG") {
			out = append(out, l)
		}
	}
	return out
}

// evict-idle never takes a session inside a transaction or running a query.
func TestLimitEvictIdle(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	rule := limiter.Rule{MaxSessions: -1, Policy: limiter.PolicyEvictIdle, Fallback: limiter.PolicyReject}

	// busy opens, through p, one session idle in a transaction and one
	// running a query that stays active until the returned function lets
	// it end (it waits for an advisory lock the test holds, so it is active
	// however slow the machine, not for a fixed time); that function then
	// checks the query was not disturbed.
	busy := func(t *testing.T, p *testProxy, role, pw string) (pgx.Tx, func()) {
		inTx := connect(t, p.DSN(role, pw, "app"))
		tx, err := inTx.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, "create temp table held(x int)"); err != nil {
			t.Fatal(err)
		}
		// A lock class of the tests' own ("test"), apart from rolegate's
		// admission locks; advisory locks belong to a database.
		const lockQuery = "select pg_advisory_lock(1952805748, hashtext($1))"
		su := connect(t, shared.DSN(shared.SuperUser, shared.SuperPassword, "app"))
		if _, err := su.Exec(ctx, lockQuery, role); err != nil {
			t.Fatal(err)
		}
		unlocked := false
		unlock := func() {
			if !unlocked {
				unlocked = true
				if _, err := su.Exec(ctx, "select pg_advisory_unlock(1952805748, hashtext($1))", role); err != nil {
					t.Errorf("advisory unlock: %v", err)
				}
			}
		}
		sleeper := connect(t, p.DSN(role, pw, "app"))
		done := make(chan struct{})
		var slept error
		go func() {
			defer close(done)
			_, slept = sleeper.Exec(ctx, lockQuery, role)
		}()
		t.Cleanup(func() { unlock(); <-done }) // before connect's cleanup closes sleeper and su
		return tx, func() {
			t.Helper()
			unlock()
			<-done
			if slept != nil {
				t.Errorf("the session running a query was disturbed: %v", slept)
			}
		}
	}

	t.Run("none idle: fallback reject, nobody evicted", func(t *testing.T) {
		t.Parallel()
		const role = "lim_ei_busy"
		pw := newRole(t, role, 2)
		p := limitedProxy(t, map[string]limiter.Rule{role: rule})
		su := connect(t, shared.SuperDSN())
		tx, sleepOK := busy(t, p, role, pw)
		waitStates(t, su, role, map[string]int{"idle in transaction": 1, "active": 1})

		_, errOut, err := psql(t, p.DSN(role, pw, "app"), "", "-c", "select 1")
		if err == nil || !strings.Contains(errOut, `FATAL:  too many connections for role "`+role+`"`) {
			t.Fatalf("login at the limit: %v, %q", err, errOut)
		}
		sleepOK()
		if _, err := tx.Exec(ctx, "insert into held values (1)"); err != nil {
			t.Fatalf("the session in a transaction was disturbed: %v", err)
		}
		if err := tx.Commit(ctx); err != nil {
			t.Fatalf("commit: %v", err)
		}
		if l := logLines(p, "msg=evicted"); len(l) != 0 {
			t.Errorf("evict-idle evicted a busy session: %q", l)
		}
		rej := logged(t, p, 1, "msg=rejected")
		if len(rej) != 1 || !strings.Contains(rej[0], "policy=evict-idle") ||
			!strings.Contains(rej[0], "no session can be evicted for evict-idle (2 not idle); fallback reject") {
			t.Errorf("rejection log lines: %q", rej)
		}
	})

	t.Run("the idle one is evicted", func(t *testing.T) {
		t.Parallel()
		const role = "lim_ei_idle"
		pw := newRole(t, role, 3)
		p := limitedProxy(t, map[string]limiter.Rule{role: rule})
		su := connect(t, shared.SuperDSN())
		idle := connect(t, p.DSN(role, pw, "app", "application_name=lim_ei_victim"))
		idlePID := backendPID(t, idle)
		idleAddr := idle.PgConn().Conn().LocalAddr().String()
		tx, sleepOK := busy(t, p, role, pw)
		waitStates(t, su, role, map[string]int{"idle": 1, "idle in transaction": 1, "active": 1})

		out, errOut, err := psql(t, p.DSN(role, pw, "app"), "", "-Atc", "select count(*) from pg_stat_activity where usename = current_user")
		if err != nil || strings.TrimSpace(out) != "3" {
			t.Fatalf("login at the limit: %v, %q %q", err, out, errOut)
		}
		wantEvicted(t, idle, "role", role, limiter.PolicyEvictIdle)
		sleepOK()
		if _, err := tx.Exec(ctx, "insert into held values (1)"); err != nil {
			t.Fatalf("the session in a transaction was disturbed: %v", err)
		}
		if err := tx.Commit(ctx); err != nil {
			t.Fatalf("commit: %v", err)
		}

		// The eviction's one log line names the victim and the policy.
		ev := logLines(p, "msg=evicted")
		if len(ev) != 1 {
			t.Fatalf("eviction log lines: %q", ev)
		}
		for _, want := range []string{
			fmt.Sprintf("victim_pid=%d ", idlePID),
			"victim_client=" + idleAddr + " ",
			"victim_application_name=lim_ei_victim",
			"victim_state=idle ",
			"victim_role=" + role,
			"policy=evict-idle",
		} {
			if !strings.Contains(ev[0], want) {
				t.Errorf("eviction log line lacks %q: %s", want, ev[0])
			}
		}
		if m := regexp.MustCompile(`victim_age=(\S+)`).FindStringSubmatch(ev[0]); m == nil {
			t.Errorf("eviction log line has no victim_age: %s", ev[0])
		} else if age, err := time.ParseDuration(m[1]); err != nil || age <= 0 || age > time.Minute {
			t.Errorf("victim_age=%s: %v", m[1], err)
		}
	})
}

// wait queues a login until a slot frees or wait_timeout passes; a waiter
// that hangs up leaves the line at once.
func TestLimitWait(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	waitRule := func(timeout time.Duration) limiter.Rule {
		return limiter.Rule{MaxSessions: -1, Policy: limiter.PolicyWait, Fallback: limiter.PolicyReject, WaitTimeout: timeout}
	}
	type result struct {
		conn *pgx.Conn
		err  error
		at   time.Time
	}

	t.Run("admitted when the held session closes", func(t *testing.T) {
		t.Parallel()
		const role = "lim_wait_free"
		pw := newRole(t, role, 1)
		// wait_timeout far beyond any login: the waiter is admitted by the
		// release, never by running out of time.
		p := limitedProxy(t, map[string]limiter.Rule{role: waitRule(5 * time.Minute)})
		held, err := tryConnect(p.DSN(role, pw, "app"), 30*time.Second, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer held.Close(ctx)

		res := make(chan result, 1)
		var addr string
		go func() {
			c, err := tryConnect(p.DSN(role, pw, "app"), 60*time.Second, &addr)
			res <- result{c, err, time.Now()}
		}()
		waitWaiting(t, p, role, 1)
		select { // in line, with the slot held: it cannot have been answered
		case r := <-res:
			t.Fatalf("the waiter did not wait: %v", r.err)
		default:
		}
		closed := time.Now()
		held.Close(ctx)
		var r result
		select {
		case r = <-res:
		case <-time.After(60 * time.Second):
			t.Fatal("the waiter was not admitted")
		}
		if r.err != nil {
			t.Fatalf("the waiter: %v", r.err)
		}
		defer r.conn.Close(ctx)
		// Both times are this process's monotonic clock: an answer that came
		// before the close began is one that did not wait for it.
		if r.at.Before(closed) {
			t.Errorf("admitted before the held session closed")
		}
		wantAlive(t, r.conn, "the admitted waiter")
		// One line for the wait however many polls it took, one for the admission.
		if l := logLines(p, "client="+addr+" ", `msg="waiting for a slot"`); len(l) != 1 || !strings.Contains(l[0], "policy wait") {
			t.Errorf("wait log lines: %q", l)
		}
		if l := logLines(p, "client="+addr+" ", `msg="admitted after waiting"`); len(l) != 1 {
			t.Errorf("admission log lines: %q", l)
		}
		if l := logLines(p, "msg=rejected"); len(l) != 0 {
			t.Errorf("rejections: %q", l)
		}
	})

	t.Run("rejected after wait_timeout", func(t *testing.T) {
		t.Parallel()
		const role = "lim_wait_timeout"
		pw := newRole(t, role, 1)
		p := limitedProxy(t, map[string]limiter.Rule{role: waitRule(500 * time.Millisecond)})
		held := connect(t, p.DSN(role, pw, "app"))
		var addr string
		start := time.Now()
		c, err := tryConnect(p.DSN(role, pw, "app"), 30*time.Second, &addr)
		took := time.Since(start)
		if err == nil {
			c.Close(ctx)
			t.Fatal("admitted with the slot held")
		}
		wantTooMany(t, err, "role", role)
		// start precedes the wait, so this lower bound holds however slow the
		// machine; that the rejection is the wait's own (not a later timeout)
		// the 53300 above and the log line below show.
		if took < 500*time.Millisecond {
			t.Errorf("rejected after %s, before wait_timeout 500ms", took)
		}
		wantAlive(t, held, "the held session")
		logged(t, p, 1, "client="+addr+" ", "msg=rejected")
		lines := clientLines(p, addr)
		if len(lines) != 2 || !strings.Contains(lines[0], `msg="waiting for a slot"`) ||
			!strings.Contains(lines[1], "msg=rejected") || !strings.Contains(lines[1], "wait_timeout reached") {
			t.Errorf("want one wait line and one rejection line for the client, got:\n%s", strings.Join(lines, "\n"))
		}
	})

	t.Run("a waiter that hangs up leaves the line", func(t *testing.T) {
		t.Parallel()
		const role = "lim_wait_gone"
		pw := newRole(t, role, 1)
		p := limitedProxy(t, map[string]limiter.Rule{role: waitRule(5 * time.Minute)})
		held, err := tryConnect(p.DSN(role, pw, "app"), 30*time.Second, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer held.Close(ctx)

		// The impatient client gives up once it is in line, whenever that is.
		var gone string
		impatient, giveUp := context.WithCancel(ctx)
		defer giveUp()
		gaveUp := make(chan error, 1)
		go func() {
			cfg, err := pgx.ParseConfig(p.DSN(role, pw, "app"))
			if err != nil {
				gaveUp <- err
				return
			}
			dial := cfg.DialFunc
			cfg.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
				c, err := dial(ctx, network, addr)
				if err == nil {
					gone = c.LocalAddr().String()
				}
				return c, err
			}
			c, err := pgx.ConnectConfig(impatient, cfg)
			if err == nil {
				c.Close(ctx)
				err = errors.New("admitted with the slot held")
			}
			gaveUp <- err
		}()
		waitWaiting(t, p, role, 1)
		giveUp()
		if err := <-gaveUp; !errors.Is(err, context.Canceled) {
			t.Fatalf("the impatient waiter: %v", err)
		}
		waitWaiting(t, p, role, 0)
		waitUntil(t, 30*time.Second, "the waiter to leave the line", func() bool {
			return len(logLines(p, "client="+gone+" ", `msg="left the wait queue"`)) == 1
		})

		held.Close(ctx)
		waitUntil(t, 30*time.Second, "the held session to end", func() bool { return sessionsOf(t, role) == 0 })
		var addr string
		next, err := tryConnect(p.DSN(role, pw, "app"), 30*time.Second, &addr)
		if err != nil {
			t.Fatalf("the next login: %v", err)
		}
		defer next.Close(ctx)
		// With wait_timeout 5 minutes, a login that waited behind the client
		// that left would not be here; the log says it did not wait at all.
		wantAlive(t, next, "the next login")
		if l := logLines(p, "client="+addr+" ", "waiting for a slot"); len(l) != 0 {
			t.Errorf("the next login waited behind a client that had left: %q", l)
		}
		if l := clientLines(p, gone); len(l) != 2 || !strings.Contains(l[0], `msg="waiting for a slot"`) {
			t.Errorf("log lines of the client that left: want waiting and left, got:\n%s", strings.Join(l, "\n"))
		}
		if l := logLines(p, "admitted after waiting"); len(l) != 0 {
			t.Errorf("the client that left was admitted: %q", l)
		}
		if n := sessionsOf(t, role); n != 1 {
			t.Errorf("%d sessions of %s, want 1", n, role)
		}
	})
}

// A wrong password at the limit evicts nobody and waits for nobody.
func TestLimitWrongPasswordAtLimit(t *testing.T) {
	t.Parallel()
	t.Run("newest-wins", func(t *testing.T) {
		t.Parallel()
		const role = "lim_pw_nw"
		pw := newRole(t, role, 1)
		p := limitedProxy(t, map[string]limiter.Rule{role: {MaxSessions: -1, Policy: limiter.PolicyNewestWins, Fallback: limiter.PolicyReject}})
		held := connect(t, p.DSN(role, pw, "app"))
		c, err := tryConnect(p.DSN(role, "not "+pw, "app"), 30*time.Second, nil)
		if err == nil {
			c.Close(context.Background())
			t.Fatal("a wrong password logged in")
		}
		if code := sqlstate(err); code != "28P01" {
			t.Fatalf("wrong password: %v, want 28P01", err)
		}
		wantAlive(t, held, "the held session")
		if n := sessionsOf(t, role); n != 1 {
			t.Errorf("%d sessions of %s, want 1", n, role)
		}
		if l := logLines(p, "msg=evicted"); len(l) != 0 {
			t.Errorf("a wrong password evicted: %q", l)
		}
	})
	t.Run("wait", func(t *testing.T) {
		t.Parallel()
		const role = "lim_pw_wait"
		pw := newRole(t, role, 1)
		// A wrong password that waited would outlast psql's own 60 s bound
		// and never see the password error.
		p := limitedProxy(t, map[string]limiter.Rule{role: {MaxSessions: -1, Policy: limiter.PolicyWait, WaitTimeout: 5 * time.Minute}})
		held := connect(t, p.DSN(role, pw, "app"))
		_, errOut, err := psql(t, p.DSN(role, "not "+pw, "app"), "", "-c", "select 1")
		if err == nil || !strings.Contains(errOut, `FATAL:  password authentication failed for user "`+role+`"`) {
			t.Fatalf("wrong password: %v, %q", err, errOut)
		}
		wantAlive(t, held, "the held session")
		if l := logLines(p, "waiting for a slot"); len(l) != 0 {
			t.Errorf("a wrong password waited: %q", l)
		}
		if l := logLines(p, "msg=rejected"); len(l) != 0 {
			t.Errorf("a wrong password reached admission: %q", l)
		}
	})
}

// Superusers are exempt as logins and never evicted; their sessions count
// against a database limit, as the server counts them.
func TestLimitSuperuser(t *testing.T) {
	t.Parallel()
	newest := limiter.Rule{MaxSessions: 1, Policy: limiter.PolicyNewestWins, Fallback: limiter.PolicyReject}

	t.Run("superuser login at its role limit", func(t *testing.T) {
		t.Parallel()
		const role = "lim_su_role"
		pw := newRole(t, role, 1, "superuser")
		p := limitedProxy(t, map[string]limiter.Rule{role: newest})
		first := connect(t, p.DSN(role, pw, "app"))
		second := connect(t, p.DSN(role, pw, "app"))
		wantAlive(t, first, "the first superuser session")
		wantAlive(t, second, "the second superuser session")
		if n := sessionsOf(t, role); n != 2 {
			t.Errorf("%d sessions of %s, want 2", n, role)
		}
		if l := logLines(p, "msg=evicted"); len(l) != 0 {
			t.Errorf("a superuser session was evicted: %q", l)
		}
	})

	t.Run("database limit", func(t *testing.T) {
		t.Parallel()
		const db, super = "lim_su_db", "lim_su_dbsuper"
		newDatabase(t, db, -1)
		superPW := newRole(t, super, -1, "superuser")
		pw1, pw2, pw3 := newRole(t, "lim_su_n1", -1), newRole(t, "lim_su_n2", -1), newRole(t, "lim_su_n3", -1)
		p := rulesProxy(t, mapRules{dbs: map[string]limiter.Rule{db: {MaxSessions: 2, Policy: limiter.PolicyNewestWins, Fallback: limiter.PolicyReject}}})
		su := connect(t, shared.SuperDSN())

		s1 := connect(t, p.DSN(super, superPW, db)) // the oldest session in the database
		n1 := connect(t, p.DSN("lim_su_n1", pw1, db))
		// At the limit: the victim is the oldest session that is not a superuser's.
		n2 := connect(t, p.DSN("lim_su_n2", pw2, db))
		wantEvicted(t, n1, "database", db, limiter.PolicyNewestWins)
		wantAlive(t, s1, "the superuser session")
		// A superuser logs in at the limit.
		s2 := connect(t, p.DSN(super, superPW, db))
		wantAlive(t, s2, "the superuser login at the limit")
		if n := dbSessions(t, su, db); n != 3 {
			t.Errorf("%d sessions in %s, want 3", n, db)
		}
		// Two superuser sessions and one other hold the database's 2 slots:
		// a login needs two victims and may take only one, so it is refused.
		_, err := tryConnect(p.DSN("lim_su_n3", pw3, db), 30*time.Second, nil)
		wantTooMany(t, err, "database", db)
		wantAlive(t, s1, "the first superuser session")
		wantAlive(t, s2, "the second superuser session")
		wantAlive(t, n2, "the session of lim_su_n2")
		if l := logLines(p, "msg=evicted"); len(l) != 1 || !strings.Contains(l[0], "victim_role=lim_su_n1") {
			t.Errorf("evictions: %q", l)
		}
		if l := logged(t, p, 1, "msg=rejected"); len(l) != 1 || !strings.Contains(l[0], "2 superuser") || !strings.Contains(l[0], "scope=database") {
			t.Errorf("rejections: %q", l)
		}
	})
}

// min_session_age keeps a young session from being evicted. The limiter's
// clock is the test's: a session's age is whatever the test says, however long
// the logins take.
func TestLimitMinSessionAge(t *testing.T) {
	t.Parallel()
	const role = "lim_age"
	pw := newRole(t, role, 1)
	var ahead atomic.Int64 // how far the limiter's clock runs ahead of the wall clock
	clock := func() time.Time { return time.Now().Add(time.Duration(ahead.Load())) }
	ctl := superControl(t, shared)
	lim := &Limits{Limiter: limiter.New(clock), Server: ctl}
	lim.SetRules(mapRules{roles: map[string]limiter.Rule{role: {MaxSessions: -1, Policy: limiter.PolicyNewestWins,
		Fallback: limiter.PolicyReject, MinSessionAge: time.Hour}}}, true, 0)
	p := startProxy(t, proxyOpts{auth: proxyAuth(time.Minute, auth.SourceFunc(ctl.Secret)), limits: lim})

	first := connect(t, p.DSN(role, pw, "app"))
	_, err := tryConnect(p.DSN(role, pw, "app"), 30*time.Second, nil)
	wantTooMany(t, err, "role", role)
	wantAlive(t, first, "the young session")
	if l := logged(t, p, 1, "msg=rejected"); len(l) != 1 || !strings.Contains(l[0], "younger than min_session_age 1h0m0s") {
		t.Errorf("rejections: %q", l)
	}

	ahead.Store(int64(time.Hour)) // the first session is now older than min_session_age
	third := connect(t, p.DSN(role, pw, "app"))
	wantEvicted(t, first, "role", role, limiter.PolicyNewestWins)
	wantAlive(t, third, "the login after min_session_age")
}

// Database limits: proxy.toml's [databases.X] and the server's datconnlimit.
func TestLimitDatabase(t *testing.T) {
	t.Parallel()
	t.Run("reject", func(t *testing.T) {
		t.Parallel()
		const db = "lim_db_reject"
		newDatabase(t, db, -1)
		pwA, pwB, pwC := newRole(t, "lim_dbr_a", -1), newRole(t, "lim_dbr_b", -1), newRole(t, "lim_dbr_c", -1)
		p := rulesProxy(t, mapRules{dbs: map[string]limiter.Rule{db: {MaxSessions: 2, Policy: limiter.PolicyReject}}})
		a := connect(t, p.DSN("lim_dbr_a", pwA, db))
		b := connect(t, p.DSN("lim_dbr_b", pwB, db))
		_, errOut, err := psql(t, p.DSN("lim_dbr_c", pwC, db), "", "-c", "select 1")
		if err == nil || !strings.Contains(errOut, `FATAL:  too many connections for database "`+db+`"`) {
			t.Fatalf("third login: %v, %q", err, errOut)
		}
		_, err = tryConnect(p.DSN("lim_dbr_a", pwA, db), 30*time.Second, nil)
		wantTooMany(t, err, "database", db)
		// The limit is the database's, not the roles': elsewhere they log in.
		other := connect(t, p.DSN("lim_dbr_c", pwC, "app"))
		wantAlive(t, other, "a session in another database")
		wantAlive(t, a, "the first session")
		wantAlive(t, b, "the second session")
		if l := logged(t, p, 2, "msg=rejected", "scope=database", "limit=2"); len(l) != 2 {
			t.Errorf("rejections: %q", l)
		}
	})

	t.Run("newest-wins", func(t *testing.T) {
		t.Parallel()
		const db = "lim_db_newest"
		newDatabase(t, db, -1)
		pwA, pwB, pwC := newRole(t, "lim_dbn_a", -1), newRole(t, "lim_dbn_b", -1), newRole(t, "lim_dbn_c", -1)
		p := rulesProxy(t, mapRules{dbs: map[string]limiter.Rule{db: {MaxSessions: 2, Policy: limiter.PolicyNewestWins}}})
		su := connect(t, shared.SuperDSN())
		a := connect(t, p.DSN("lim_dbn_a", pwA, db))
		b := connect(t, p.DSN("lim_dbn_b", pwB, db))
		c := connect(t, p.DSN("lim_dbn_c", pwC, db))
		wantEvicted(t, a, "database", db, limiter.PolicyNewestWins)
		wantAlive(t, b, "the second session")
		wantAlive(t, c, "the newest session")
		// A session opened directly is the oldest now that b is: it goes next.
		direct := connect(t, shared.DSN("lim_dbn_a", pwA, db))
		if n := dbSessions(t, su, db); n != 3 {
			t.Fatalf("%d sessions in %s, want 3", n, db)
		}
		d := connect(t, p.DSN("lim_dbn_a", pwA, db))
		// Two victims: b (oldest), then c; the direct session is newer than both.
		wantEvicted(t, b, "database", db, limiter.PolicyNewestWins)
		wantEvicted(t, c, "database", db, limiter.PolicyNewestWins)
		wantAlive(t, d, "the newest session")
		wantAlive(t, direct, "the direct session")
		if n := dbSessions(t, su, db); n != 2 {
			t.Errorf("%d sessions in %s, want 2", n, db)
		}
	})

	t.Run("datconnlimit", func(t *testing.T) {
		t.Parallel()
		const db = "lim_db_server"
		newDatabase(t, db, 1)
		pwA, pwB := newRole(t, "lim_dbs_a", -1), newRole(t, "lim_dbs_b", -1)
		p := rulesProxy(t, mapRules{})
		a := connect(t, p.DSN("lim_dbs_a", pwA, db))
		_, errOut, err := psql(t, p.DSN("lim_dbs_b", pwB, db), "", "-c", "select 1")
		if err == nil || !strings.Contains(errOut, `FATAL:  too many connections for database "`+db+`"`) {
			t.Fatalf("second login: %v, %q", err, errOut)
		}
		wantAlive(t, a, "the session holding the slot")
		// rolegate refused it itself, without a server connection.
		if l := logged(t, p, 1, "msg=rejected", "scope=database", "limit=1"); len(l) != 1 {
			t.Errorf("rejections: %q\n%s", l, p.logs.String())
		}
		if l := logLines(p, "refused by server"); len(l) != 0 {
			t.Errorf("the server refused a login rolegate let through: %q", l)
		}
	})
}

// sampleSessions samples the client backends of role.
func sampleSessions(t *testing.T, role string) (stop func() (most, samples int)) {
	t.Helper()
	return sample(t, "usename", role)
}

// sample polls pg_stat_activity every 5 ms, as a superuser, for the client
// backends whose column (usename or datname) is value; stop returns the most
// it saw at once and how many samples it took. The last sample is taken after
// stop is called, so the state the caller stopped in is always counted.
func sample(t *testing.T, column, value string) (stop func() (most, samples int)) {
	t.Helper()
	c := connect(t, shared.SuperDSN())
	quit, done := make(chan struct{}), make(chan struct{})
	var most, samples int
	var failed error
	go func() {
		defer close(done)
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for last := false; !last; {
			select {
			case <-quit:
				last = true
			default:
			}
			var n int
			if err := c.QueryRow(context.Background(),
				"select count(*) from pg_stat_activity where "+column+" = $1 and backend_type = 'client backend'", value).Scan(&n); err != nil {
				failed = err
				return
			}
			most, samples = max(most, n), samples+1
			select {
			case <-quit:
			case <-tick.C:
			}
		}
	}()
	var once sync.Once
	stop = func() (int, int) {
		once.Do(func() { close(quit); <-done })
		if failed != nil {
			t.Errorf("sampler: %v", failed)
		}
		return most, samples
	}
	t.Cleanup(func() { stop() })
	return stop
}

// orderView is the control connection as admission's ServerView, noting for
// every session of a role a census lists its server-side backend_start and
// state_change (the orders newest-wins and evict-idle go by), by
// application_name. A victim
// is always in the census that chose it, and alive until that census returns,
// so every session rolegate evicts is noted.
type orderView struct {
	*upstream.Control // its LockRole and LockDatabase too

	mu    sync.Mutex
	su    *pgx.Conn
	seen  map[string]serverTimes
	fails []error
}

// serverTimes are a session's times by the server's clock.
type serverTimes struct {
	BackendStart, StateChange time.Time
}

func (v *orderView) Census(ctx context.Context, role, database string) ([]limiter.Holder, error) {
	holders, err := v.Control.Census(ctx, role, database)
	if err != nil {
		return holders, err
	}
	pids := make([]int64, len(holders))
	for i, h := range holders {
		pids[i] = int64(h.PID)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	rows, err := v.su.Query(ctx, "select pid, application_name from pg_stat_activity where pid = any($1)", pids)
	if err != nil {
		v.fails = append(v.fails, err)
		return holders, nil
	}
	apps := map[uint32]string{}
	for rows.Next() {
		var pid int64
		var app string
		if err := rows.Scan(&pid, &app); err != nil {
			v.fails = append(v.fails, err)
		}
		apps[uint32(pid)] = app
	}
	if err := rows.Err(); err != nil {
		v.fails = append(v.fails, err)
	}
	for _, h := range holders {
		// The census lists the database's other sessions too.
		if app := apps[h.PID]; app != "" && h.Role == role {
			v.seen[app] = serverTimes{h.BackendStart, h.StateChange}
		}
	}
	return holders, nil
}

// Many logins at once, through rolegate and directly: the limit is never
// exceeded, and each policy keeps its promise. Nothing here depends on how
// fast logins are: bounds are generous, waits are forced by holding the
// slots, and sessions are ordered by the server's clock, never the client's.
func TestLimitConcurrentLogins(t *testing.T) {
	t.Parallel()
	const (
		clients = 50 // through rolegate
		directs = 10 // straight to the server, for reject and newest-wins
		limit   = 3
	)
	type login struct {
		conn   *pgx.Conn
		err    error
		app    string // application_name, unique to the login
		addr   string // the client's address, as rolegate's log names it
		direct bool
		worked error // the work done in the session
	}
	// stormProxy is a proxy with limits for role under policy and a
	// startup timeout beyond any login on a busy machine (logins of a role
	// wait for each other's victims, and 60 of them may take many seconds).
	stormProxy := func(t *testing.T, role string, policy limiter.Policy, o proxyOpts) (*testProxy, *orderView) {
		t.Helper()
		ctl := superControl(t, shared)
		view := &orderView{Control: ctl, su: connect(t, shared.SuperDSN()), seen: map[string]serverTimes{}}
		lim := &Limits{Limiter: limiter.New(time.Now), Server: view}
		lim.SetRules(mapRules{roles: map[string]limiter.Rule{role: {MaxSessions: limit, Policy: policy,
			Fallback: limiter.PolicyReject, WaitTimeout: 5 * time.Minute}}}, true, 0)
		o.auth, o.limits, o.startupTimeout = proxyAuth(time.Minute, auth.SourceFunc(ctl.Secret)), lim, time.Minute
		return startProxy(t, o), view
	}
	// storm logs in clients times through p (and directs times directly when
	// asked) all at once; each login runs work, if any, and closes, or is kept
	// open (and closed at cleanup) when work is nil. during, if not nil, runs
	// while the logins are under way.
	storm := func(t *testing.T, p *testProxy, role, pw string, withDirect bool, work func(*pgx.Conn) error, during func()) []*login {
		t.Helper()
		n := clients
		if withDirect {
			n += directs
		}
		logins := make([]*login, n)
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i := range logins {
			l := &login{direct: i >= clients, app: fmt.Sprintf("%s_%d", role, i)}
			logins[i] = l
			dsn := p.DSN(role, pw, "app", "application_name="+l.app)
			if l.direct {
				u, err := url.Parse(shared.DSN(role, pw, "app"))
				if err != nil {
					t.Fatal(err)
				}
				q := u.Query()
				q.Set("application_name", l.app)
				u.RawQuery = q.Encode()
				dsn = u.String()
			}
			wg.Go(func() {
				<-start
				l.conn, l.err = tryConnect(dsn, 3*time.Minute, &l.addr)
				if l.err != nil || work == nil {
					return
				}
				l.worked = work(l.conn)
				l.conn.Close(context.Background())
				l.conn = nil
			})
		}
		t.Cleanup(func() {
			for _, l := range logins {
				if l.conn != nil {
					l.conn.Close(context.Background())
				}
			}
		})
		began := time.Now()
		close(start)
		if during != nil {
			during()
		}
		wg.Wait()
		t.Logf("%d logins took %s", n, time.Since(began).Round(time.Millisecond))
		return logins
	}
	sleep := func(c *pgx.Conn) error {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, err := c.Exec(ctx, "select pg_sleep(0.05)")
		return err
	}
	// survivors checks, for policies that evict, that exactly limit sessions
	// are left, that they are the newest logins by the policy's own order
	// (the server's backend_start for newest-wins, the time it went idle
	// for evict-idle), and that every other one was evicted with 57P01.
	survivors := func(t *testing.T, role string, policy limiter.Policy, view *orderView, logins []*login) {
		t.Helper()
		// The survivors' times, read before anything runs in them.
		su := connect(t, shared.SuperDSN())
		rows, err := su.Query(context.Background(),
			"select application_name, backend_start, state_change from pg_stat_activity where usename = $1 and backend_type = 'client backend'", role)
		if err != nil {
			t.Fatal(err)
		}
		view.mu.Lock()
		defer view.mu.Unlock()
		for _, err := range view.fails {
			t.Errorf("orderView: %v", err)
		}
		times := maps.Clone(view.seen)
		for rows.Next() {
			var app string
			var st serverTimes
			if err := rows.Scan(&app, &st.BackendStart, &st.StateChange); err != nil {
				t.Fatal(err)
			}
			times[app] = st
		}
		if rows.Err() != nil {
			t.Fatal(rows.Err())
		}
		key := func(l *login) time.Time {
			if policy == limiter.PolicyEvictIdle {
				return times[l.app].StateChange
			}
			return times[l.app].BackendStart
		}
		var in []*login
		for _, l := range logins {
			if l.err != nil {
				continue
			}
			if _, ok := times[l.app]; !ok {
				t.Errorf("login %s (direct %v) is neither alive nor in any census: who ended it?", l.app, l.direct)
				continue
			}
			in = append(in, l)
		}
		slices.SortFunc(in, func(a, b *login) int { return key(a).Compare(key(b)) })
		var alive []int
		for i, l := range in {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			_, err := l.conn.Exec(ctx, "select 1")
			cancel()
			if err == nil {
				alive = append(alive, i)
				continue
			}
			var pe *pgconn.PgError
			if !errors.As(err, &pe) || pe.Code != "57P01" {
				t.Errorf("login %d of %d (direct %v): %v, want alive or evicted (57P01)", i+1, len(in), l.direct, err)
			} else if !l.direct && !evictedText("role", role, policy.String()).MatchString(pe.Message) {
				t.Errorf("evicted rolegate client got %q", pe.Message)
			}
		}
		if want := []int{len(in) - 3, len(in) - 2, len(in) - 1}; !slices.Equal(alive, want) {
			t.Errorf("surviving logins (by the server's order, of %d): %v, want the newest %v", len(in), alive, want)
			for i, l := range in {
				t.Logf("%d: %s (direct %v) %s", i, l.app, l.direct, key(l).Format(time.RFC3339Nano))
			}
		}
		if n := sessionsOf(t, role); n != limit {
			t.Errorf("%d sessions of %s left, want %d", n, role, limit)
		}
	}
	// tally counts the outcomes and checks that every failure is the role's 53300.
	tally := func(t *testing.T, role string, logins []*login) (in, rejectedViaRolegate int) {
		t.Helper()
		for _, l := range logins {
			switch {
			case l.err == nil:
				in++
				if l.worked != nil {
					t.Errorf("session (direct %v): %v", l.direct, l.worked)
				}
			case sqlstate(l.err) == "53300" && strings.Contains(l.err.Error(), fmt.Sprintf("too many connections for role %q", role)):
				if !l.direct {
					rejectedViaRolegate++
				}
			default:
				t.Errorf("login (direct %v): %v", l.direct, l.err)
			}
		}
		return in, rejectedViaRolegate
	}
	noWarnings := func(t *testing.T, p *testProxy) {
		t.Helper()
		if l := admissionWarnings(p); len(l) != 0 {
			t.Errorf("warnings in the log:\n%s", strings.Join(l, "\n"))
		}
	}
	// onceEach checks that no session was evicted twice: a victim's slot
	// must be free before the login goes on, so it is never seen again.
	onceEach := func(t *testing.T, p *testProxy) {
		t.Helper()
		seen := map[string]bool{}
		for _, l := range logLines(p, "msg=evicted") {
			pid := regexp.MustCompile(`victim_pid=\d+`).FindString(l)
			if seen[pid] {
				t.Errorf("%s evicted twice", pid)
			}
			seen[pid] = true
		}
	}

	t.Run("reject", func(t *testing.T) {
		t.Parallel()
		const role = "lim_many_reject"
		pw := newRole(t, role, limit)
		// Every rejection logged, however many at once: the count below reads the log.
		p, _ := stormProxy(t, role, limiter.PolicyReject, proxyOpts{throttle: throttleOptions{burst: clients + directs}})
		stop := sampleSessions(t, role)
		logins := storm(t, p, role, pw, true, sleep, nil)
		most, samples := stop()
		in, rejected := tally(t, role, logins)
		t.Logf("%d in, %d rejected by rolegate; at most %d sessions in %d samples", in, rejected, most, samples)
		if most > limit || most < 1 {
			t.Errorf("at most %d sessions of %s seen at once, limit %d", most, role, limit)
		}
		if in < limit {
			t.Errorf("only %d logins got in", in)
		}
		// Every rejection is one log line: rolegate's own, or the server's
		// 53300 passed on after a race with a direct login.
		var own, passed int
		count := func() bool {
			own = len(logLines(p, "msg=rejected", "sqlstate=53300", "role="+role))
			passed = len(logLines(p, `msg="login failed"`, "sqlstate=53300"))
			return own+passed >= rejected
		}
		// Each line is written once its client has been told.
		waitUntil(t, 30*time.Second, fmt.Sprintf("%d rejection log lines", rejected), count)
		if count(); own+passed != rejected {
			t.Errorf("%d rejections through rolegate, %d rejection log lines and %d passed-on server refusals", rejected, own, passed)
		}
		noWarnings(t, p)
	})

	t.Run("wait", func(t *testing.T) {
		t.Parallel()
		const role = "lim_many_wait"
		pw := newRole(t, role, limit)
		p, _ := stormProxy(t, role, limiter.PolicyWait, proxyOpts{})
		// The slots are held until every login of the storm waits in line, so
		// each one must wait, and be admitted, however fast or slow the logins.
		held := make([]*pgx.Conn, limit)
		for i := range held {
			held[i] = connect(t, p.DSN(role, pw, "app"))
		}
		stop := sampleSessions(t, role)
		logins := storm(t, p, role, pw, false, sleep, func() {
			waitWaiting(t, p, role, clients)
			for _, c := range held {
				c.Close(context.Background())
			}
		})
		most, samples := stop()
		in, _ := tally(t, role, logins)
		t.Logf("at most %d sessions in %d samples", most, samples)
		if in != clients {
			t.Errorf("%d of %d logins got in", in, clients)
		}
		if most != limit {
			t.Errorf("at most %d sessions of %s seen at once, limit %d", most, role, limit)
		}
		waited := 0
		for _, l := range logins {
			switch n := len(logLines(p, "client="+l.addr+" ", `msg="waiting for a slot"`)); n {
			case 0:
			case 1:
				waited++
			default:
				t.Errorf("client %s: %d wait log lines, want 1", l.addr, n)
			}
		}
		if admitted := len(logLines(p, `msg="admitted after waiting"`)); waited != clients || admitted != clients {
			t.Errorf("%d logins waited, %d admitted after waiting; want all %d", waited, admitted, clients)
		}
		noWarnings(t, p)
	})

	t.Run("newest-wins", func(t *testing.T) {
		t.Parallel()
		const role = "lim_many_newest"
		pw := newRole(t, role, limit)
		p, view := stormProxy(t, role, limiter.PolicyNewestWins, proxyOpts{})
		stop := sampleSessions(t, role)
		logins := storm(t, p, role, pw, true, nil, nil)
		most, samples := stop()
		for _, l := range logins[:clients] {
			if l.err != nil {
				t.Errorf("login through rolegate under newest-wins: %v", l.err)
			}
		}
		in, _ := tally(t, role, logins)
		t.Logf("%d in; at most %d sessions in %d samples", in, most, samples)
		if most != limit {
			t.Errorf("at most %d sessions of %s seen at once, limit %d", most, role, limit)
		}
		survivors(t, role, limiter.PolicyNewestWins, view, logins)
		onceEach(t, p)
	})

	t.Run("evict-idle", func(t *testing.T) {
		t.Parallel()
		const role = "lim_many_idle"
		pw := newRole(t, role, limit)
		p, view := stormProxy(t, role, limiter.PolicyEvictIdle, proxyOpts{})
		stop := sampleSessions(t, role)
		logins := storm(t, p, role, pw, false, nil, nil)
		most, samples := stop()
		in, _ := tally(t, role, logins)
		t.Logf("at most %d sessions in %d samples", most, samples)
		if in != clients {
			t.Errorf("%d of %d logins got in", in, clients)
		}
		if most != limit {
			t.Errorf("at most %d sessions of %s seen at once, limit %d", most, role, limit)
		}
		survivors(t, role, limiter.PolicyEvictIdle, view, logins)
		if n := len(logLines(p, "msg=evicted", "policy=evict-idle", "victim_state=idle ", "via_rolegate=true")); n != clients-limit {
			t.Errorf("%d eviction log lines, want %d", n, clients-limit)
		}
		onceEach(t, p)
		if l := logLines(p, "server at its limit after admission"); len(l) != 0 {
			t.Errorf("logins admitted before their victim's slot was free:\n%s", strings.Join(l, "\n"))
		}
		noWarnings(t, p)
	})
}

// A database limit holds when logins of many roles arrive at once: each role
// has its own admission lock, so the database needs one too.
func TestLimitDatabaseConcurrentLogins(t *testing.T) {
	t.Parallel()
	const roles, limit = 20, 3
	for _, policy := range []limiter.Policy{limiter.PolicyReject, limiter.PolicyNewestWins} {
		t.Run(string(policy), func(t *testing.T) {
			t.Parallel()
			db := "lim_dbmany_" + strings.ReplaceAll(string(policy), "-", "_")
			newDatabase(t, db, -1)
			var create strings.Builder
			for i := range roles {
				fmt.Fprintf(&create, "drop role if exists %[1]s_%[2]d; create role %[1]s_%[2]d login password 'pw';", db, i)
			}
			if err := shared.Exec(context.Background(), create.String()); err != nil {
				t.Fatal(err)
			}
			// Logins of the database evict each other in turn: a startup
			// timeout beyond any login on a busy machine.
			p := rulesProxyWith(t, mapRules{dbs: map[string]limiter.Rule{db: {MaxSessions: limit, Policy: policy}}},
				proxyOpts{startupTimeout: time.Minute})
			stop := sample(t, "datname", db)
			conns := make([]*pgx.Conn, roles)
			errs := make([]error, roles)
			start := make(chan struct{})
			var wg sync.WaitGroup
			for i := range roles {
				wg.Go(func() {
					<-start
					conns[i], errs[i] = tryConnect(p.DSN(fmt.Sprintf("%s_%d", db, i), "pw", db), 3*time.Minute, nil)
				})
			}
			t.Cleanup(func() {
				for _, c := range conns {
					if c != nil {
						c.Close(context.Background())
					}
				}
			})
			close(start)
			wg.Wait()
			most, samples := stop()
			in := 0
			for _, err := range errs {
				switch {
				case err == nil:
					in++
				case policy == limiter.PolicyReject && sqlstate(err) == "53300" &&
					strings.Contains(err.Error(), fmt.Sprintf("too many connections for database %q", db)):
				default:
					t.Errorf("login: %v", err)
				}
			}
			t.Logf("%d in; at most %d sessions in %d samples", in, most, samples)
			if most > limit {
				t.Errorf("%d sessions in database %s at once, limit %d", most, db, limit)
			}
			if policy == limiter.PolicyReject && in != limit {
				t.Errorf("%d logins in, want %d", in, limit)
			}
			if n := dbSessions(t, connect(t, shared.SuperDSN()), db); n != limit {
				t.Errorf("%d sessions left in %s, want %d", n, db, limit)
			}
		})
	}
}

// In passthrough mode the server authenticates the client; limits from the
// rules apply from then on, with the login's own new backend not counted.
func TestLimitPassthrough(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	if err := shared.Exec(ctx, "drop role if exists lim_pt; create role lim_pt login password 'pt_pw'"); err != nil {
		t.Fatal(err)
	}
	for _, policy := range []limiter.Policy{limiter.PolicyReject, limiter.PolicyNewestWins} {
		t.Run(string(policy), func(t *testing.T) {
			ctl := superControl(t, shared)
			lim := &Limits{Limiter: limiter.New(time.Now), Server: ctl}
			lim.SetRules(mapRules{roles: map[string]limiter.Rule{"lim_pt": {MaxSessions: 1, Policy: policy, Fallback: limiter.PolicyReject}}}, true, 0)
			p := startProxy(t, proxyOpts{limits: lim}) // no auth: passthrough
			first := connect(t, p.DSN("lim_pt", "pt_pw", "app"))
			out, errOut, err := psql(t, p.DSN("lim_pt", "pt_pw", "app"), "", "-Atc", "select current_user")
			_, firstErr := first.Exec(ctx, "select 1")
			switch policy {
			case limiter.PolicyReject:
				if err == nil || !strings.Contains(errOut, `FATAL:  too many connections for role "lim_pt"`) {
					t.Fatalf("second login: %v, %q %q", err, out, errOut)
				}
				if firstErr != nil {
					t.Fatalf("the held session was disturbed: %v", firstErr)
				}
				// pgx checks that the SCRAM exchange ends with the server's
				// SASLFinal before AuthenticationOk: the rejection must keep it.
				cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				_, err := pgx.Connect(cctx, p.DSN("lim_pt", "pt_pw", "app"))
				cancel()
				var pe *pgconn.PgError
				if !errors.As(err, &pe) || pe.Code != "53300" || pe.Message != `too many connections for role "lim_pt"` {
					t.Fatalf("pgx at the limit: %v", err)
				}
			case limiter.PolicyNewestWins:
				if err != nil || strings.TrimSpace(out) != "lim_pt" {
					t.Fatalf("second login: %v, %q %q", err, out, errOut)
				}
				var pe *pgconn.PgError
				if !errors.As(firstErr, &pe) || pe.Code != "57P01" || !strings.Contains(pe.Message, "rolegate evicted this session") {
					t.Fatalf("the held session got %v", firstErr)
				}
			}
			// A wrong password never reaches admission: the server refuses it first.
			_, errOut, err = psql(t, p.DSN("lim_pt", "wrong", "app"), "", "-c", "select 1")
			if err == nil || !strings.Contains(errOut, `password authentication failed for user "lim_pt"`) {
				t.Fatalf("wrong password: %v, %q", err, errOut)
			}
		})
	}
}

// replication=false is an ordinary session: it must not skip admission.
func TestLimitReplicationFalseIsCounted(t *testing.T) {
	t.Parallel()
	for v, want := range map[string]bool{"": false, "false": false, "off": false, "0": false, "no": false,
		"true": true, "on": true, "1": true, "yes": true, "database": true, "TRUE": true} {
		if got := isReplication(v); got != want {
			t.Errorf("isReplication(%q) = %v, want %v", v, got, want)
		}
	}
	ctx := context.Background()
	if err := shared.Exec(ctx, "drop role if exists lim_replfalse; create role lim_replfalse login password 'rf_pw'"); err != nil {
		t.Fatal(err)
	}
	p := limitedProxy(t, map[string]limiter.Rule{"lim_replfalse": {MaxSessions: 1, Policy: limiter.PolicyReject, Fallback: limiter.PolicyReject}})
	connect(t, p.DSN("lim_replfalse", "rf_pw", "app"))
	_, errOut, err := psql(t, p.DSN("lim_replfalse", "rf_pw", "app", "replication=false"), "", "-c", "select 1")
	if err == nil || !strings.Contains(errOut, `too many connections for role "lim_replfalse"`) {
		t.Fatalf("replication=false skipped the limit: %v, %q", err, errOut)
	}
}

func TestKill(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	if err := shared.Exec(ctx, "drop role if exists lim_kill; create role lim_kill login password 'kill_pw'"); err != nil {
		t.Fatal(err)
	}
	p := limitedProxy(t, map[string]limiter.Rule{})
	c := connect(t, p.DSN("lim_kill", "kill_pw", "app"))
	pid := p.Sessions()[0].BackendPID
	ok, err := p.Kill(ctx, pid, "test")
	if err != nil || !ok {
		t.Fatalf("Kill: %v, %v", ok, err)
	}
	_, err = c.Exec(ctx, "select 1")
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "57P01" || !strings.Contains(pe.Message, "at an operator's request (test)") {
		t.Fatalf("killed session got %v", err)
	}
	if ok, err := p.Kill(ctx, 999999, "test"); err != nil || ok {
		t.Fatalf("Kill of no such pid: %v, %v", ok, err)
	}
	if ev := p.Events(); len(ev) != 1 || ev[0].Kind != "kill" || ev[0].VictimPID != pid {
		t.Errorf("events: %+v", ev)
	}
	bare := startProxy(t, proxyOpts{})
	if _, err := bare.Kill(ctx, pid, "test"); !errors.Is(err, ErrNoControl) {
		t.Errorf("Kill without a control connection: %v", err)
	}
}

// SET LIMIT and SET POLICY of the console: runtime overrides until a reload.
func TestLimitOverrides(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	if err := shared.Exec(ctx, "drop role if exists lim_over; create role lim_over login password 'over_pw'"); err != nil {
		t.Fatal(err)
	}
	ctl := superControl(t, shared)
	lim := &Limits{Limiter: limiter.New(time.Now), Server: ctl}
	lim.SetRules(mapRules{}, true, 0)
	p := startProxy(t, proxyOpts{auth: proxyAuth(time.Minute, auth.SourceFunc(ctl.Secret)), limits: lim})
	one, reject, newest := 1, limiter.PolicyReject, limiter.PolicyNewestWins
	lim.Override("lim_over", &one, &reject)
	first := connect(t, p.DSN("lim_over", "over_pw", "app"))
	_, errOut, err := psql(t, p.DSN("lim_over", "over_pw", "app"), "", "-c", "select 1")
	if err == nil || !strings.Contains(errOut, `too many connections for role "lim_over"`) {
		t.Fatalf("override limit 1 reject: %v, %q", err, errOut)
	}
	lim.Override("lim_over", nil, &newest)
	if o := lim.Overrides()["lim_over"]; o.MaxSessions == nil || *o.MaxSessions != 1 || o.Policy == nil || *o.Policy != newest {
		t.Fatalf("overrides: %+v", lim.Overrides())
	}
	if _, errOut, err := psql(t, p.DSN("lim_over", "over_pw", "app"), "", "-c", "select 1"); err != nil {
		t.Fatalf("override newest-wins: %v, %q", err, errOut)
	}
	if _, err := first.Exec(ctx, "select 1"); err == nil {
		t.Fatal("the first session survived newest-wins")
	}
	lim.SetRules(mapRules{}, true, 0) // a reload ends the overrides
	if len(lim.Overrides()) != 0 {
		t.Fatalf("overrides after a reload: %+v", lim.Overrides())
	}
	a := connect(t, p.DSN("lim_over", "over_pw", "app"))
	b := connect(t, p.DSN("lim_over", "over_pw", "app"))
	if err := a.Ping(ctx); err != nil {
		t.Fatalf("no limit after the reload, yet: %v", err)
	}
	_ = b
}
