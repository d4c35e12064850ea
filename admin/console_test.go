package admin

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/limiter"
	"github.com/rolegate/rolegate/proxy"
)

// consoleClient is a console conversation seen from the client's side: a
// pgproto3.Frontend on one end of a loopback TCP pair, ServeConsole on the
// other.
type consoleClient struct {
	conn net.Conn
	fe   *pgproto3.Frontend
}

// startConsole serves opts' console to one loopback client as user; the test's
// cleanup closes the client and checks that ServeConsole returned nil.
func startConsole(t *testing.T, opts Options, user string) *consoleClient {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	con := NewConsole(opts)
	done := make(chan error, 1)
	go func() {
		defer server.Close()
		done <- con.ServeConsole(t.Context(), server, bufio.NewReader(server), user)
	}()
	t.Cleanup(func() {
		client.Close()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("ServeConsole returned %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("ServeConsole did not return after the client closed")
		}
	})
	return &consoleClient{conn: client, fe: pgproto3.NewFrontend(client, client)}
}

// result is what the console answered to one Query, up to ReadyForQuery.
type result struct {
	columns []string
	oids    []uint32
	rows    [][]*string // nil is NULL
	tags    []string
	errs    []pgproto3.ErrorResponse
	notices []string
	empty   bool
}

func (r result) col(name string) int {
	for i, c := range r.columns {
		if c == name {
			return i
		}
	}
	return -1
}

// cell returns row i's value of column name ("NULL" for NULL).
func (r result) cell(t *testing.T, i int, name string) string {
	t.Helper()
	c := r.col(name)
	if c < 0 || i >= len(r.rows) {
		t.Fatalf("no column %q or row %d in %+v", name, i, r)
	}
	if r.rows[i][c] == nil {
		return "NULL"
	}
	return *r.rows[i][c]
}

func (cc *consoleClient) send(t *testing.T, msgs ...pgproto3.FrontendMessage) {
	t.Helper()
	for _, m := range msgs {
		cc.fe.Send(m)
	}
	if err := cc.fe.Flush(); err != nil {
		t.Fatal(err)
	}
}

// read collects messages up to ReadyForQuery.
func (cc *consoleClient) read(t *testing.T) result {
	t.Helper()
	_ = cc.conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	var r result
	for {
		m, err := cc.fe.Receive()
		if err != nil {
			t.Fatalf("receive: %v (so far %+v)", err, r)
		}
		switch m := m.(type) {
		case *pgproto3.RowDescription:
			r.columns, r.oids = nil, nil
			for _, f := range m.Fields {
				r.columns = append(r.columns, string(f.Name))
				r.oids = append(r.oids, f.DataTypeOID)
			}
		case *pgproto3.DataRow:
			row := make([]*string, len(m.Values))
			for i, v := range m.Values {
				if v != nil {
					s := string(v)
					row[i] = &s
				}
			}
			r.rows = append(r.rows, row)
		case *pgproto3.CommandComplete:
			r.tags = append(r.tags, string(m.CommandTag))
		case *pgproto3.ErrorResponse:
			r.errs = append(r.errs, *m)
		case *pgproto3.NoticeResponse:
			r.notices = append(r.notices, m.Message)
		case *pgproto3.EmptyQueryResponse:
			r.empty = true
		case *pgproto3.ReadyForQuery:
			if m.TxStatus != 'I' {
				t.Fatalf("ReadyForQuery %q, want 'I'", m.TxStatus)
			}
			return r
		default:
			t.Fatalf("unexpected %T", m)
		}
	}
}

func (cc *consoleClient) query(t *testing.T, sql string) result {
	t.Helper()
	cc.send(t, &pgproto3.Query{String: sql})
	return cc.read(t)
}

// ok runs sql and fails on an error answer.
func (cc *consoleClient) ok(t *testing.T, sql string, tag string) result {
	t.Helper()
	r := cc.query(t, sql)
	if len(r.errs) > 0 || len(r.tags) == 0 || r.tags[len(r.tags)-1] != tag {
		t.Fatalf("%q: %+v, want success with tag %q", sql, r, tag)
	}
	return r
}

// fails runs sql and wants exactly one error with code, its message holding msg.
func (cc *consoleClient) fails(t *testing.T, sql, code, msg string) pgproto3.ErrorResponse {
	t.Helper()
	r := cc.query(t, sql)
	if len(r.errs) != 1 || r.errs[0].Code != code || !strings.Contains(r.errs[0].Message, msg) {
		t.Fatalf("%q: %+v, want one error %s with %q", sql, r, code, msg)
	}
	return r.errs[0]
}

// overrideLog records Override calls and answers Overrides from them.
type overrideLog struct {
	mu    sync.Mutex
	calls []string
	set   map[string]proxy.Override
}

func (o *overrideLog) override(role string, n *int, p *limiter.Policy) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.set == nil {
		o.set = map[string]proxy.Override{}
	}
	cur := o.set[role]
	call := role
	if n != nil {
		cur.MaxSessions = n
		call += " limit " + strconv.Itoa(*n)
	}
	if p != nil {
		cur.Policy = p
		call += " policy " + p.String()
	}
	o.set[role] = cur
	o.calls = append(o.calls, call)
}

// dryRun records OverrideDryRun as a call of its own.
func (o *overrideLog) dryRun(role string, on bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.set == nil {
		o.set = map[string]proxy.Override{}
	}
	cur := o.set[role]
	cur.DryRun = &on
	o.set[role] = cur
	o.calls = append(o.calls, fmt.Sprintf("%s dry run %v", role, on))
}

func (o *overrideLog) overrides() map[string]proxy.Override {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := make(map[string]proxy.Override, len(o.set))
	for k, v := range o.set {
		out[k] = v
	}
	return out
}

func (o *overrideLog) lastCall() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.calls) == 0 {
		return ""
	}
	return o.calls[len(o.calls)-1]
}

// The console against a real proxy in proxy-auth mode with limits, a real
// pgx session through it and a real server.
func TestConsole(t *testing.T) {
	r := startRig(t, rules{"lim_user": {MaxSessions: 1, Policy: limiter.PolicyNewestWins, Fallback: limiter.PolicyReject}})
	if err := r.cluster.Exec(t.Context(), "create role lim_user login password 'lim_pw'"); err != nil {
		t.Fatal(err)
	}
	var (
		reloadMu  sync.Mutex
		reloadErr error
		reloadBy  []string
	)
	ovr := &overrideLog{}
	opts := Options{
		Proxy:   r.srv,
		Limiter: r.limits.Limiter.Snapshot,
		Reload: func(by string) error {
			reloadMu.Lock()
			defer reloadMu.Unlock()
			reloadBy = append(reloadBy, by)
			return reloadErr
		},
		ConfigText:     func() string { return "[server]\naddress = \"x\"\n\n[control]\ndsn = \"<redacted>\"\n" },
		Version:        "1.2.3",
		Override:       ovr.override,
		OverrideDryRun: ovr.dryRun,
		Overrides:      ovr.overrides,
		Logger:         r.logger,
	}
	cc := startConsole(t, opts, "opsadmin")

	app := r.connect(t, "lim_user", "lim_pw")
	pid := backendPID(t, app)
	waitFor(t, "the session's backend pid", func() bool {
		for _, s := range r.srv.Sessions() {
			if s.BackendPID == pid {
				return true
			}
		}
		return false
	})

	t.Run("show sessions", func(t *testing.T) {
		res := cc.ok(t, "  show   Sessions ; ", "SHOW")
		if res.oids[res.col("pid")] != oidInt4 || res.oids[res.col("role")] != oidText {
			t.Errorf("column types %v", res.oids)
		}
		found := false
		for i := range res.rows {
			if res.cell(t, i, "pid") == strconv.Itoa(int(pid)) {
				found = true
				if got := res.cell(t, i, "role"); got != "lim_user" {
					t.Errorf("role %q", got)
				}
				if got := res.cell(t, i, "database"); got != "postgres" {
					t.Errorf("database %q", got)
				}
				if got := res.cell(t, i, "via_rolegate"); got != "true" {
					t.Errorf("via_rolegate %q", got)
				}
				if got := res.cell(t, i, "state"); got != "idle" {
					t.Errorf("state %q", got)
				}
				if res.cell(t, i, "started") == "NULL" || res.cell(t, i, "idle_since") == "NULL" {
					t.Errorf("started/idle_since missing: %+v", res.rows[i])
				}
				if n, _ := strconv.Atoi(res.cell(t, i, "bytes_out")); n <= 0 {
					t.Errorf("bytes_out %q", res.cell(t, i, "bytes_out"))
				}
			}
		}
		if !found {
			t.Fatalf("pid %d not in %+v", pid, res.rows)
		}
	})

	t.Run("show roles databases stats", func(t *testing.T) {
		res := cc.ok(t, "SHOW ROLES", "SHOW")
		row := -1
		for i := range res.rows {
			if res.cell(t, i, "role") == "lim_user" {
				row = i
			}
		}
		if row < 0 {
			t.Fatalf("lim_user not in %+v", res.rows)
		}
		if got := res.cell(t, row, "sessions_via_rolegate"); got != "1" {
			t.Errorf("sessions %q", got)
		}
		if got := res.cell(t, row, "admitted"); got != "1" {
			t.Errorf("admitted %q", got)
		}
		res = cc.ok(t, "show databases", "SHOW")
		if len(res.rows) != 1 || res.cell(t, 0, "database") != "postgres" || res.cell(t, 0, "sessions_via_rolegate") != "1" {
			t.Errorf("databases %+v", res.rows)
		}
		res = cc.ok(t, "show stats", "SHOW")
		if len(res.rows) != 1 || res.cell(t, 0, "sessions") != "1" || res.cell(t, 0, "admitted") != "1" {
			t.Errorf("stats %v %+v", res.columns, res.rows)
		}
		res = cc.ok(t, "SHOW VERSION;", "SHOW")
		if len(res.rows) != 1 || res.cell(t, 0, "version") != "rolegate 1.2.3" {
			t.Errorf("version %+v", res.rows)
		}
		res = cc.ok(t, "show config", "SHOW")
		if len(res.rows) != 5 || res.cell(t, 0, "line") != "[server]" || res.cell(t, 4, "line") != `dsn = "<redacted>"` {
			t.Errorf("config %+v", res.rows)
		}
	})

	t.Run("several statements", func(t *testing.T) {
		res := cc.query(t, "show version; show stats;;")
		if len(res.errs) != 0 || strings.Join(res.tags, ",") != "SHOW,SHOW" {
			t.Fatalf("%+v", res)
		}
		// The first error ends the query.
		res = cc.query(t, "show version; bogus; show stats")
		if len(res.errs) != 1 || strings.Join(res.tags, ",") != "SHOW" {
			t.Fatalf("%+v", res)
		}
	})

	t.Run("empty query", func(t *testing.T) {
		if res := cc.query(t, "  ;  "); !res.empty || len(res.errs) != 0 {
			t.Fatalf("%+v", res)
		}
	})

	t.Run("unknown command", func(t *testing.T) {
		for _, q := range []string{"select 1", "show nothing", "kill", "set limit lim_user", "reload now"} {
			e := cc.fails(t, q, "42601", "syntax error in rolegate console command")
			if !strings.Contains(e.Hint, "SHOW SESSIONS") || !strings.Contains(e.Hint, "SET POLICY") {
				t.Errorf("%q: hint %q", q, e.Hint)
			}
		}
	})

	t.Run("extended protocol", func(t *testing.T) {
		cc.send(t, &pgproto3.Parse{Query: "show version"}, &pgproto3.Bind{}, &pgproto3.Describe{ObjectType: 'P'},
			&pgproto3.Execute{}, &pgproto3.Query{String: "show version"}, &pgproto3.Sync{})
		res := cc.read(t)
		if len(res.errs) != 1 || res.errs[0].Code != "0A000" ||
			res.errs[0].Message != "the rolegate console accepts only simple queries" || len(res.tags) != 0 {
			t.Fatalf("%+v", res)
		}
		cc.ok(t, "show version", "SHOW") // still works
		// Another message type: 08P01, and the console goes on.
		cc.send(t, &pgproto3.FunctionCall{Function: 1})
		if res := cc.read(t); len(res.errs) != 1 || res.errs[0].Code != "08P01" {
			t.Fatalf("%+v", res)
		}
		cc.ok(t, "show version", "SHOW")
	})

	t.Run("set", func(t *testing.T) {
		res := cc.ok(t, "SET LIMIT lim_user 3", "SET")
		if got := ovr.lastCall(); got != "lim_user limit 3" {
			t.Errorf("override call %q", got)
		}
		if len(res.notices) != 1 {
			t.Errorf("notices %v", res.notices)
		}
		cc.ok(t, `set policy "lim_user" newest-wins DRY RUN`, "SET")
		if got := ovr.lastCall(); got != "lim_user dry run true" {
			t.Errorf("override call %q", got)
		}
		cc.ok(t, `set policy "lim_user" Wait;`, "SET")
		if got := ovr.lastCall(); got != "lim_user dry run false" {
			t.Errorf("override call %q", got)
		}
		cc.fails(t, "set policy lim_user wait dry walk", "42601", "syntax error")
		e := cc.fails(t, "set policy lim_user oldest-wins", "22023", `invalid policy "oldest-wins"`)
		for _, p := range []string{"reject", "wait", "newest-wins", "evict-idle"} {
			if !strings.Contains(e.Message, p) {
				t.Errorf("message %q does not list %s", e.Message, p)
			}
		}
		cc.fails(t, "set limit lim_user -1", "22023", "invalid limit")
		cc.fails(t, "set limit lim_user many", "22023", "invalid limit")
		if got := ovr.lastCall(); got != "lim_user dry run false" {
			t.Errorf("a refused SET called Override: %q", got)
		}
		res = cc.ok(t, "show roles", "SHOW")
		for i := range res.rows {
			if res.cell(t, i, "role") == "lim_user" {
				if res.cell(t, i, "override_max_sessions") != "3" || res.cell(t, i, "override_policy") != "wait" {
					t.Errorf("overrides not shown: %v %+v", res.columns, res.rows[i])
				}
			}
		}
		for _, want := range []string{`by="console user opsadmin" role=lim_user max_sessions=3`, `by="console user opsadmin" role=lim_user policy=wait`} {
			if !strings.Contains(r.logs.String(), want) {
				t.Errorf("log has no %q", want)
			}
		}
	})

	t.Run("reload", func(t *testing.T) {
		cc.ok(t, "reload", "RELOAD")
		reloadMu.Lock()
		reloadErr = errors.New("proxy.toml: line 3: bad value")
		reloadMu.Unlock()
		cc.fails(t, "RELOAD;", "F0000", "bad value")
		reloadMu.Lock()
		defer reloadMu.Unlock()
		if len(reloadBy) != 2 || reloadBy[0] != "console user opsadmin" {
			t.Errorf("reload callers %q", reloadBy)
		}
	})

	t.Run("kill", func(t *testing.T) {
		cc.fails(t, "kill 999999", "42704", "no session with pid 999999")
		cc.fails(t, "kill abc", "22P02", "invalid pid")
		res := cc.ok(t, "KILL "+strconv.Itoa(int(pid)), "KILL")
		if len(res.rows) != 1 || res.cell(t, 0, "terminated") != "true" {
			t.Errorf("%+v", res)
		}
		wantTerminated(t, app, "killed from the console")
		if !strings.Contains(r.logs.String(), `by="console user opsadmin"`) {
			t.Errorf("no kill log line naming the console user")
		}
		waitFor(t, "the killed session to leave", func() bool { return len(r.srv.Sessions()) == 0 })
		res = cc.ok(t, "show evictions", "SHOW")
		if len(res.rows) == 0 || res.cell(t, 0, "kind") != "kill" || res.cell(t, 0, "victim_pid") != strconv.Itoa(int(pid)) ||
			res.cell(t, 0, "victim_role") != "lim_user" || !strings.Contains(res.cell(t, 0, "reason"), "console user opsadmin") {
			t.Errorf("evictions %v %+v", res.columns, res.rows)
		}
	})

	t.Run("terminate ends the console", func(t *testing.T) {
		cc.send(t, &pgproto3.Terminate{})
		_ = cc.conn.SetReadDeadline(time.Now().Add(30 * time.Second))
		if _, err := cc.fe.Receive(); err == nil {
			t.Fatal("console answered after Terminate")
		}
	})
}

// Without limits, control or configuration text, the commands that need them
// say so; a cancelled context ends the console with FATAL 57P01.
func TestConsoleWithoutLimits(t *testing.T) {
	p := &fakeProxy{}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	cc, done := serveConsolePair(t, ctx, Options{Proxy: p})

	cc.fails(t, "set limit app 1", "55000", "limits are not enabled")
	cc.fails(t, "set policy app wait", "55000", "limits are not enabled")
	cc.fails(t, "kill 42", "55000", "control connection")
	cc.fails(t, "reload", "55000", "not available")
	cc.fails(t, "show config", "55000", "not available")
	if res := cc.ok(t, "show roles; show stats; show evictions; show sessions; show databases", "SHOW"); len(res.tags) != 5 {
		t.Fatalf("%+v", res)
	}

	cancel()
	_ = cc.conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	m, err := cc.fe.Receive()
	if e, ok := m.(*pgproto3.ErrorResponse); err != nil || !ok || e.Code != "57P01" || e.Severity != "FATAL" {
		t.Fatalf("after cancel: %#v %v, want FATAL 57P01", m, err)
	}
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("ServeConsole returned %v, want context.Canceled", err)
	}
}

// fakeProxy has no sessions and no control connection.
type fakeProxy struct{}

func (fakeProxy) Sessions() []proxy.SessionInfo              { return nil }
func (fakeProxy) Events() []proxy.Event                      { return nil }
func (fakeProxy) History(context.Context, int) []proxy.Event { return nil }
func (fakeProxy) Kill(context.Context, uint32, string) (bool, error) {
	return false, proxy.ErrNoControl
}

// startConsoleRig is startRig with the console on database "rolegate" for
// role opsadmin (password ops_pw), wired the way cmd/rolegate wires it.
func startConsoleRig(t *testing.T, roleRules rules) *rig {
	t.Helper()
	return startConsoleRigWith(t, roleRules, nil)
}

// startConsoleRigWith is startConsoleRig with a last word on the proxy's Config.
func startConsoleRigWith(t *testing.T, roleRules rules, adjust func(*proxy.Config)) *rig {
	t.Helper()
	r := startRigWith(t, roleRules, func(c *proxy.Config) {
		c.ConsoleDatabase = "rolegate"
		c.ConsoleUsers = []string{"opsadmin"}
		if adjust != nil {
			adjust(c)
		}
	})
	r.srv.SetConsole(NewConsole(Options{
		Proxy:          r.srv,
		Limiter:        r.limits.Limiter.Snapshot,
		Reload:         func(string) error { return nil },
		ConfigText:     func() string { return "[admin]\nusers = [\"opsadmin\"]\n" },
		Version:        "test",
		Override:       r.limits.Override,
		OverrideDryRun: r.limits.OverrideDryRun,
		Overrides:      r.limits.Overrides,
		Effective:      r.limits.Effective,
		ServerSessions: r.control.Sessions,
		Logger:         r.logger,
	}))
	for _, q := range []string{"create role opsadmin login password 'ops_pw'", "create role lim_user login password 'lim_pw'"} {
		if err := r.cluster.Exec(t.Context(), q); err != nil {
			t.Fatal(err)
		}
	}
	return r
}

// consolePgx is a pgx connection to the console as opsadmin, on the simple
// protocol the console speaks; the test's cleanup closes it.
func (r *rig) consolePgx(t *testing.T) *pgx.Conn {
	t.Helper()
	cfg, err := pgx.ParseConfig(r.consoleDSN("opsadmin", "ops_pw"))
	if err != nil {
		t.Fatal(err)
	}
	cfg.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
	con, err := pgx.ConnectConfig(t.Context(), cfg)
	if err != nil {
		t.Fatalf("console login: %v", err)
	}
	t.Cleanup(func() { con.Close(context.Background()) })
	return con
}

func (r *rig) consoleDSN(user, password string) string {
	return strings.Replace(r.dsn(user, password), "dbname=postgres", "dbname=rolegate", 1)
}

// The console through the real proxy, with pgx and psql as the clients.
func TestConsoleThroughProxy(t *testing.T) {
	r := startConsoleRig(t, rules{"lim_user": {MaxSessions: 2, Policy: limiter.PolicyReject, Fallback: limiter.PolicyReject}})
	ctx := t.Context()
	app := r.connect(t, "lim_user", "lim_pw")
	pid := backendPID(t, app)
	con := r.consolePgx(t)

	t.Run("pgx scans show sessions", func(t *testing.T) {
		rows, err := con.Query(ctx, "SHOW SESSIONS")
		if err != nil {
			t.Fatal(err)
		}
		type row struct {
			PID             *int32
			Role            *string
			Database        *string
			ApplicationName string
			ClientAddr      string
			State           string
			Started         *string
			IdleSince       *string
			ViaRolegate     string
			BytesIn         int64
			BytesOut        int64
			Wait            *string
			Instance        *string
		}
		got, err := pgx.CollectRows(rows, pgx.RowToStructByPos[row])
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, s := range got {
			if s.PID != nil && uint32(*s.PID) == pid {
				found = s.Role != nil && *s.Role == "lim_user" && s.ViaRolegate == "true" && s.BytesOut > 0 && s.Wait == nil
			}
		}
		if !found {
			t.Fatalf("pid %d not listed right in %+v", pid, got)
		}
	})

	t.Run("pgx extended protocol is refused and the console goes on", func(t *testing.T) {
		var v string
		err := con.QueryRow(ctx, "show version", pgx.QueryExecModeDescribeExec).Scan(&v)
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || pe.Code != "0A000" {
			t.Fatalf("extended protocol: %v, want 0A000", err)
		}
		if err := con.QueryRow(ctx, "show version").Scan(&v); err != nil || v != "rolegate test" {
			t.Fatalf("after the refusal: %q %v", v, err)
		}
	})

	t.Run("pgx set limit overrides the limiter", func(t *testing.T) {
		if _, err := con.Exec(ctx, "SET LIMIT lim_user 1; set policy lim_user newest-wins"); err != nil {
			t.Fatal(err)
		}
		o := r.limits.Overrides()["lim_user"]
		if o.MaxSessions == nil || *o.MaxSessions != 1 || o.Policy == nil || *o.Policy != limiter.PolicyNewestWins {
			t.Fatalf("overrides %+v", o)
		}
		var maxS int32
		var pol, dry, thrashing string
		if err := con.QueryRow(ctx, "show roles").Scan(nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, &maxS, &pol,
			&dry, nil, nil, nil, nil, &thrashing, nil, nil); err != nil || maxS != 1 || pol != "newest-wins" || dry != "false" || thrashing != "no" {
			t.Fatalf("show roles: %d %q dry run %q thrashing %q %v", maxS, pol, dry, thrashing, err)
		}
	})

	t.Run("psql", func(t *testing.T) {
		psql, err := exec.LookPath("psql")
		if err != nil {
			t.Fatalf("psql is needed for this test: %v", err)
		}
		run := func(sql string) (string, error) {
			cmd := exec.CommandContext(ctx, psql, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql, r.consoleDSN("opsadmin", "ops_pw"))
			cmd.Env = append(os.Environ(), "PGCONNECT_TIMEOUT=10")
			out, err := cmd.CombinedOutput()
			return string(out), err
		}
		if out, err := run("show version"); err != nil || strings.TrimSpace(out) != "rolegate test" {
			t.Fatalf("psql show version: %q %v", out, err)
		}
		if out, err := run("show databases"); err != nil || !strings.Contains(out, "postgres||none|reject|1|0|0") {
			t.Fatalf("psql show databases: %q %v", out, err)
		}
		out, err := run("show nothing")
		if err == nil || !strings.Contains(out, "syntax error in rolegate console command") || !strings.Contains(out, "HINT:  commands: SHOW SESSIONS") {
			t.Fatalf("psql unknown command: %q %v", out, err)
		}
		if out, err := run("kill " + strconv.Itoa(int(pid))); err != nil || !strings.Contains(out, strconv.Itoa(int(pid))+"|true") {
			t.Fatalf("psql kill: %q %v", out, err)
		}
		wantTerminated(t, app, "killed with psql")
	})

	t.Run("a role not in [admin] users is refused", func(t *testing.T) {
		_, err := pgx.Connect(ctx, r.consoleDSN("lim_user", "lim_pw"))
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || pe.Code != "28000" {
			t.Fatalf("got %v, want 28000", err)
		}
	})
}

// Sessions opened directly against the server show in SHOW SESSIONS and
// /api/sessions, and SHOW ROLES / SHOW DATABASES / /api/roles give each limit
// with its source: proxy.toml, server, override.
func TestServerSessionsAndLimits(t *testing.T) {
	roleRules := rules{"lim_user": {MaxSessions: 2, Policy: limiter.PolicyNewestWins, Fallback: limiter.PolicyReject}}
	r := startRig(t, roleRules)
	for _, q := range []string{
		"create role lim_user login password 'lim_pw'",
		"create role srv_user login password 'srv_pw' connection limit 1",
		"create role ovr_user login password 'ovr_pw'",
	} {
		if err := r.cluster.Exec(t.Context(), q); err != nil {
			t.Fatal(err)
		}
	}
	opts := Options{
		Proxy:           r.srv,
		Limiter:         r.limits.Limiter.Snapshot,
		Override:        r.limits.Override,
		OverrideDryRun:  r.limits.OverrideDryRun,
		Overrides:       r.limits.Overrides,
		Effective:       r.limits.Effective,
		ServerSessions:  r.control.Sessions,
		ConfiguredRoles: func() []string { return slices.Sorted(maps.Keys(roleRules)) },
		Logger:          r.logger,
	}
	cc := startConsole(t, opts, "opsadmin")
	base := startHTTP(t, opts)

	via := r.connect(t, "srv_user", "srv_pw") // known through its session via rolegate
	viaPID := backendPID(t, via)
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	direct, err := pgx.Connect(ctx, r.cluster.DSN("lim_user", "lim_pw", "postgres")+"&application_name=direct_app")
	if err != nil {
		t.Fatalf("direct connection: %v", err)
	}
	t.Cleanup(func() { direct.Close(context.Background()) })
	directPID := backendPID(t, direct)

	t.Run("show sessions", func(t *testing.T) {
		res := cc.ok(t, "show sessions", "SHOW")
		seen := map[string]bool{}
		for i := range res.rows {
			switch res.cell(t, i, "pid") {
			case strconv.Itoa(int(directPID)):
				seen["direct"] = true
				if res.cell(t, i, "via_rolegate") != "false" || res.cell(t, i, "role") != "lim_user" ||
					res.cell(t, i, "database") != "postgres" || res.cell(t, i, "application_name") != "direct_app" ||
					res.cell(t, i, "state") != "idle" || res.cell(t, i, "started") == "NULL" ||
					!strings.HasPrefix(res.cell(t, i, "client_addr"), "127.0.0.1:") || res.cell(t, i, "bytes_in") != "NULL" {
					t.Errorf("direct session row %v %+v", res.columns, res.rows[i])
				}
			case strconv.Itoa(int(viaPID)):
				seen["via"] = true
				if res.cell(t, i, "via_rolegate") != "true" || res.cell(t, i, "bytes_out") == "NULL" {
					t.Errorf("rolegate session row %+v", res.rows[i])
				}
			}
		}
		if !seen["direct"] || !seen["via"] || len(res.rows) != 2 {
			t.Fatalf("sessions %+v (direct pid %d, via pid %d)", res.rows, directPID, viaPID)
		}
	})

	t.Run("api sessions", func(t *testing.T) {
		got := getJSON[[]session](t, base+"/api/sessions")
		n := 0
		for _, s := range got {
			if s.PID == directPID {
				n++
				if s.ViaRolegate || s.Role != "lim_user" || s.ApplicationName != "direct_app" {
					t.Errorf("direct session %+v", s)
				}
			}
			if s.PID == viaPID && !s.ViaRolegate {
				t.Errorf("rolegate's session %+v", s)
			}
		}
		if n != 1 || len(got) != 2 {
			t.Fatalf("sessions %+v", got)
		}
	})

	roleRow := func(t *testing.T, res result, name string) int {
		t.Helper()
		for i := range res.rows {
			if res.cell(t, i, "role") == name {
				return i
			}
		}
		t.Fatalf("%s not in %+v", name, res.rows)
		return -1
	}
	t.Run("show roles", func(t *testing.T) {
		res := cc.ok(t, "show roles", "SHOW")
		i := roleRow(t, res, "lim_user")
		if res.cell(t, i, "limit") != "2" || res.cell(t, i, "limit_source") != "proxy.toml" || res.cell(t, i, "policy") != "newest-wins" ||
			res.cell(t, i, "sessions_via_rolegate") != "0" || res.cell(t, i, "sessions_elsewhere") != "1" {
			t.Errorf("lim_user %v %+v", res.columns, res.rows[i])
		}
		i = roleRow(t, res, "srv_user")
		if res.cell(t, i, "limit") != "1" || res.cell(t, i, "limit_source") != "server" || res.cell(t, i, "policy") != "reject" ||
			res.cell(t, i, "sessions_via_rolegate") != "1" || res.cell(t, i, "sessions_elsewhere") != "0" {
			t.Errorf("srv_user %v %+v", res.columns, res.rows[i])
		}

		cc.ok(t, "set limit ovr_user 4; set limit srv_user 5", "SET")
		res = cc.ok(t, "show roles", "SHOW")
		i = roleRow(t, res, "ovr_user")
		if res.cell(t, i, "limit") != "4" || res.cell(t, i, "limit_source") != "override" {
			t.Errorf("ovr_user %+v", res.rows[i])
		}
		i = roleRow(t, res, "srv_user") // the server's 1 is still smaller
		if res.cell(t, i, "limit") != "1" || res.cell(t, i, "limit_source") != "server" || res.cell(t, i, "override_max_sessions") != "5" {
			t.Errorf("srv_user after SET LIMIT %+v", res.rows[i])
		}
	})

	t.Run("api roles", func(t *testing.T) {
		got := getJSON[[]role](t, base+"/api/roles")
		found := 0
		for _, r := range got {
			switch r.Role {
			case "srv_user":
				found++
				if r.Limit == nil || *r.Limit != 1 || r.LimitSource != "server" || r.Sessions != 1 {
					t.Errorf("srv_user %+v", r)
				}
			case "lim_user":
				found++
				if r.Limit == nil || *r.Limit != 2 || r.LimitSource != "proxy.toml" || r.SessionsElsewhere != 1 {
					t.Errorf("lim_user %+v", r)
				}
			}
		}
		if found != 2 {
			t.Fatalf("roles %+v", got)
		}
	})

	t.Run("show databases", func(t *testing.T) {
		if err := r.cluster.Exec(t.Context(), "alter database postgres connection limit 50"); err != nil {
			t.Fatal(err)
		}
		res := cc.ok(t, "show databases", "SHOW")
		if len(res.rows) != 1 || res.cell(t, 0, "database") != "postgres" || res.cell(t, 0, "limit") != "50" ||
			res.cell(t, 0, "limit_source") != "server" || res.cell(t, 0, "sessions_via_rolegate") != "1" ||
			res.cell(t, 0, "sessions_elsewhere") != "1" {
			t.Errorf("databases %v %+v", res.columns, res.rows)
		}
	})
	cc.send(t, &pgproto3.Terminate{})
	_ = cc.conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	_, _ = cc.fe.Receive()
}

// SHOW STATS reads the login, failure and byte totals the metrics keep.
func TestConsoleStatsFromMetrics(t *testing.T) {
	m := NewMetrics()
	m.LoginDone("r", "d", time.Millisecond)
	m.LoginDone("r", "d", time.Millisecond)
	m.LoginFailed(proxyUnknownRole, "unknown role")
	m.SessionEnded("r", "d", 10, 20)
	cc, done := serveConsolePair(t, t.Context(), Options{Proxy: &fakeProxy{}, Metrics: m})
	res := cc.ok(t, "show stats", "SHOW")
	if len(res.rows) != 1 || res.cell(t, 0, "logins") != "2" || res.cell(t, 0, "login_failures") != "1" ||
		res.cell(t, 0, "bytes_in") != "10" || res.cell(t, 0, "bytes_out") != "20" {
		t.Errorf("stats %v %+v", res.columns, res.rows)
	}
	cc.send(t, &pgproto3.Terminate{})
	if err := <-done; err != nil {
		t.Errorf("ServeConsole: %v", err)
	}
}

const proxyUnknownRole = "unknown"

// serveConsolePair serves a console for user "ops" on one end of a loopback
// TCP pair and returns a client on the other; done receives ServeConsole's
// result. Both ends are closed at cleanup.
func serveConsolePair(t *testing.T, ctx context.Context, opts Options) (*consoleClient, <-chan error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	server, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { server.Close() })
	done := make(chan error, 1)
	go func() { done <- NewConsole(opts).ServeConsole(ctx, server, nil, "ops") }()
	return &consoleClient{conn: client, fe: pgproto3.NewFrontend(client, client)}, done
}
