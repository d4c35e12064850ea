package proxy

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

// The relay's bookkeeping on its own: each Query, Sync or FunctionCall awaits one
// ReadyForQuery, and only the last one awaited sets the state.
func TestSessionStateFromEvents(t *testing.T) {
	t.Parallel()
	type step struct {
		client bool    // from the client (else from the server)
		evs    []event // the events in one buffer
		n      int     // its size
		state  State   // the state after it
	}
	cases := []struct {
		name  string
		steps []step
	}{
		{"a simple query", []step{
			{true, []event{{typ: 'Q', first: 's'}}, 14, StateActive},
			{false, nil, 100, StateActive}, // rows, no ReadyForQuery yet
			{false, []event{{typ: 'Z', first: 'I'}}, 6, StateIdle},
		}},
		{"a transaction and its failure", []step{
			{true, []event{{typ: 'Q', first: 'b'}}, 11, StateActive},
			{false, []event{{typ: 'Z', first: 'T'}}, 20, StateIdleInTransaction},
			{true, []event{{typ: 'S', first: 0}}, 40, StateActive},
			{false, []event{{typ: 'Z', first: 'E'}}, 90, StateIdleInFailedTransaction},
			{true, []event{{typ: 'Q', first: 'r'}}, 14, StateActive},
			{false, []event{{typ: 'Z', first: 'I'}}, 20, StateIdle},
		}},
		{"a pipeline stays active until its last ReadyForQuery", []step{
			{true, []event{{typ: 'S', first: 0}, {typ: 'S', first: 0}, {typ: 'Q', first: 'c'}}, 80, StateActive},
			{false, []event{{typ: 'Z', first: 'T'}}, 30, StateActive},
			{false, []event{{typ: 'Z', first: 'E'}}, 30, StateActive},
			{false, []event{{typ: 'Z', first: 'I'}}, 30, StateIdle},
		}},
		{"several ReadyForQuery in one buffer", []step{
			{true, []event{{typ: 'S', first: 0}}, 5, StateActive},
			{true, []event{{typ: 'S', first: 0}, {typ: 'F', first: 0}}, 30, StateActive},
			{false, []event{{typ: 'Z', first: 'I'}, {typ: 'Z', first: 'T'}, {typ: 'Z', first: 'E'}}, 18, StateIdleInFailedTransaction},
		}},
		{"an unasked-for ReadyForQuery", []step{
			{false, []event{{typ: 'Z', first: 'T'}}, 6, StateIdleInTransaction},
			{true, []event{{typ: 'Q', first: 's'}}, 14, StateActive},
			{false, []event{{typ: 'Z', first: 'I'}}, 6, StateIdle},
		}},
		{"Terminate", []step{
			{true, []event{{typ: 'X', first: 0}}, 5, StateClosing},
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := &session{}
			s.setState(StateIdle)
			var in, out int64
			for i, st := range tc.steps {
				before := s.lastActivity.Load()
				if st.client {
					s.fromClient(st.evs, st.n)
					in += int64(st.n)
					if s.lastActivity.Load() <= before {
						t.Errorf("step %d: a client buffer did not count as activity", i)
					}
				} else {
					s.fromServer(st.evs, st.n)
					out += int64(st.n)
				}
				if got := State(s.state.Load()); got != st.state {
					t.Fatalf("step %d: state %v, want %v", i, got, st.state)
				}
				if s.pending.Load() < 0 {
					t.Fatalf("step %d: %d pending", i, s.pending.Load())
				}
			}
			if s.bytesIn.Load() != in || s.bytesOut.Load() != out {
				t.Errorf("bytes in %d out %d, want %d and %d", s.bytesIn.Load(), s.bytesOut.Load(), in, out)
			}
		})
	}
}

// activityState is the backend's state in pg_stat_activity, read on the server.
func activityState(t testing.TB, direct *pgx.Conn, pid uint32) string {
	t.Helper()
	var state string
	if err := direct.QueryRow(context.Background(), "select state from pg_stat_activity where pid = $1", pid).Scan(&state); err != nil {
		t.Fatalf("pg_stat_activity for %d: %v", pid, err)
	}
	return state
}

// The registry follows one session from login to its end: who it is, the
// server's pid, every state the server reports in pg_stat_activity, the bytes
// it moved; it forgets the session when the client leaves, and the log has the
// login and the end with role, database and pid.
func TestSessionRegistry(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})
	app := uniqueName("registry")
	before := time.Now()
	c := connect(t, p.DSN("scram_user", scramPW, "app", "application_name="+app))
	after := time.Now()
	direct := directApp(t)
	ctx := ctxTimeout(t, 30*time.Second)

	s := liveSession(p, app)
	if s == nil {
		t.Fatalf("no session named %s in %+v", app, p.Sessions())
	}
	if s.User != "scram_user" || s.Database != "app" || s.ApplicationName != app || s.ID == 0 ||
		s.ClientAddr != c.PgConn().Conn().LocalAddr().String() || s.ClientTLS || s.Replication ||
		s.Start.Before(before) || s.Start.After(after) || s.State != StateIdle {
		t.Errorf("session after login: %+v", s)
	}
	var pid uint32
	if err := c.QueryRow(ctx, "select pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	if s.BackendPID != pid {
		t.Errorf("BackendPID %d, but the session's pg_backend_pid() is %d", s.BackendPID, pid)
	}
	if pid != c.PgConn().PID() {
		t.Errorf("the client holds pid %d, the server's is %d", c.PgConn().PID(), pid)
	}

	// The state follows the server's, and the counters grow with each round.
	last := *liveSession(p, app)
	check := func(what string, want State) {
		t.Helper()
		cur := liveSession(p, app)
		if cur == nil {
			t.Fatalf("%s: the session is gone", what)
		}
		if cur.State != want {
			t.Errorf("%s: state %v, want %v", what, cur.State, want)
		}
		if server := activityState(t, direct, pid); server != want.String() {
			t.Errorf("%s: pg_stat_activity says %q, the proxy %q", what, server, want)
		}
		if cur.BytesIn <= last.BytesIn || cur.BytesOut <= last.BytesOut || cur.LastActivity.Before(last.LastActivity) {
			t.Errorf("%s: bytes in %d out %d, last activity %v; before: %d, %d, %v", what,
				cur.BytesIn, cur.BytesOut, cur.LastActivity, last.BytesIn, last.BytesOut, last.LastActivity)
		}
		last = *cur
	}
	exec := func(sql string, args ...any) error {
		_, err := c.Exec(ctx, sql, args...)
		return err
	}
	if err := exec("select $1::int", 1); err != nil {
		t.Fatal(err)
	}
	check("after a query", StateIdle)
	if err := exec("begin"); err != nil {
		t.Fatal(err)
	}
	check("after BEGIN", StateIdleInTransaction)
	if err := exec("select $1::text", "in a transaction"); err != nil {
		t.Fatal(err)
	}
	check("after a query in the transaction", StateIdleInTransaction)
	if err := exec("savepoint sp"); err != nil {
		t.Fatal(err)
	}
	if err := exec("select 1/0"); pgCode(err) != "22012" {
		t.Fatalf("select 1/0: %v", err)
	}
	check("after an error in the transaction", StateIdleInFailedTransaction)
	if err := exec("select 1"); pgCode(err) != "25P02" {
		t.Fatalf("a query in the failed transaction: %v", err)
	}
	check("after a query in the failed transaction", StateIdleInFailedTransaction)
	if err := exec("rollback to savepoint sp"); err != nil {
		t.Fatal(err)
	}
	check("after ROLLBACK TO SAVEPOINT", StateIdleInTransaction)
	if err := exec("commit"); err != nil {
		t.Fatal(err)
	}
	check("after COMMIT", StateIdle)
	if err := exec("begin"); err != nil {
		t.Fatal(err)
	}
	if err := exec("select 1/0"); pgCode(err) != "22012" {
		t.Fatalf("select 1/0: %v", err)
	}
	check("after an error in a second transaction", StateIdleInFailedTransaction)
	if err := exec("rollback"); err != nil {
		t.Fatal(err)
	}
	check("after ROLLBACK", StateIdle)

	// Active while a query runs.
	done := make(chan error, 1)
	var running sync.WaitGroup
	t.Cleanup(running.Wait) // before the connection closes, even when the test fails
	running.Go(func() { done <- exec("select pg_sleep(1)") })
	// The proxy marks the session active as it forwards the query, so by the
	// time the server runs it the proxy must say so.
	waitUntil(t, 10*time.Second, "the server to run pg_sleep", func() bool {
		return serverRunning(direct, app, "select pg_sleep(1)")
	})
	if s := liveSession(p, app); s == nil || s.State != StateActive {
		t.Errorf("while pg_sleep runs: %+v, want active", s)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	check("after pg_sleep", StateIdle)

	// Gone once the client has left.
	if err := c.Close(ctx); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "the session to leave the registry", func() bool { return liveSession(p, app) == nil })
	logs := p.logs.String()
	login := regexp.MustCompile(`msg=login .*role=scram_user database=app pid=` + strconv.Itoa(int(pid)) + ` application_name=` + app)
	ended := regexp.MustCompile(`msg="session ended" .*role=scram_user database=app pid=` + strconv.Itoa(int(pid)) +
		` reason="client closed the connection" .*bytes_in=` + strconv.FormatInt(last.BytesIn+5, 10)) // and Terminate
	if !login.MatchString(logs) {
		t.Errorf("no login line matching %s in the log", login)
	}
	if !ended.MatchString(logs) {
		t.Errorf("no end line matching %s in the log", ended)
	}
}

// Sessions are listed oldest first, and each one independently.
func TestSessionsListedOldestFirst(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})
	users := []struct{ user, pw string }{{"trust_user", ""}, {"password_user", passwordPW}, {"md5_user", md5PW}, {"scram_user", scramPW}}
	pids := make([]uint32, len(users))
	for i, u := range users {
		c := connect(t, p.DSN(u.user, u.pw, "app", fmt.Sprintf("application_name=order_%d", i)))
		if err := c.QueryRow(context.Background(), "select pg_backend_pid()").Scan(&pids[i]); err != nil {
			t.Fatal(err)
		}
	}
	got := p.Sessions()
	if len(got) != len(users) {
		t.Fatalf("%d sessions, want %d", len(got), len(users))
	}
	for i, s := range got {
		if s.User != users[i].user || s.ApplicationName != fmt.Sprintf("order_%d", i) || s.BackendPID != pids[i] {
			t.Errorf("session %d: %s %s pid %d, want %s order_%d pid %d", i, s.User, s.ApplicationName, s.BackendPID, users[i].user, i, pids[i])
		}
		if i > 0 && s.Start.Before(got[i-1].Start) {
			t.Errorf("session %d started before session %d", i, i-1)
		}
	}
}

// A pipeline of three syncs keeps the session active until the last
// ReadyForQuery, even when an earlier one says "in a transaction". The second
// step waits for an advisory lock another session holds, so the check does not
// depend on timing.
func TestSessionPipelineStaysActive(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})
	app := uniqueName("pipeline")
	ctx := ctxTimeout(t, 20*time.Second)
	holder := connect(t, p.DSN("trust_user", "", "app"))
	key := strconv.FormatInt(rand.Int64N(1<<40), 10)
	if _, err := holder.Exec(ctx, "select pg_advisory_lock("+key+")"); err != nil {
		t.Fatal(err)
	}
	pc, err := pgconn.Connect(ctx, p.DSN("scram_user", scramPW, "app", "application_name="+app))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close(context.Background()) })

	pl := pc.StartPipeline(ctx)
	pl.SendQueryParams("begin", nil, nil, nil, nil)
	pl.SendPipelineSync()
	pl.SendQueryParams("select pg_advisory_xact_lock($1::int8)", [][]byte{[]byte(key)}, nil, nil, nil)
	pl.SendPipelineSync()
	pl.SendQueryParams("commit", nil, nil, nil, nil)
	pl.SendPipelineSync()
	if err := pl.Flush(); err != nil {
		t.Fatal(err)
	}
	next := func() any {
		t.Helper()
		r, err := pl.GetResults()
		if err != nil {
			t.Fatal(err)
		}
		if rr, ok := r.(*pgconn.ResultReader); ok {
			if _, err := rr.Close(); err != nil {
				t.Fatal(err)
			}
		}
		return r
	}
	next() // begin
	if _, ok := next().(*pgconn.PipelineSync); !ok {
		t.Fatal("want the first sync")
	}
	if s := liveSession(p, app); s == nil || s.State != StateActive {
		t.Errorf("after the first of three syncs: %+v, want active", s)
	}
	if _, err := holder.Exec(ctx, "select pg_advisory_unlock("+key+")"); err != nil {
		t.Fatal(err)
	}
	next() // the lock
	next() // its sync
	next() // commit
	if _, ok := next().(*pgconn.PipelineSync); !ok {
		t.Fatal("want the last sync")
	}
	if s := liveSession(p, app); s == nil || s.State != StateIdle {
		t.Errorf("after the last sync: %+v, want idle", s)
	}
	if err := pl.Close(); err != nil {
		t.Fatal(err)
	}
}

// However a session ends — the client hangs up without Terminate, or the server
// terminates the backend — it leaves the registry, its server connection goes,
// and the log says why.
func TestSessionEnds(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})
	direct := directApp(t)
	ctx := ctxTimeout(t, 20*time.Second)
	gone := func(t *testing.T, app string, pid uint32) {
		t.Helper()
		waitUntil(t, 10*time.Second, "the session to leave the registry", func() bool { return liveSession(p, app) == nil })
		waitUntil(t, 10*time.Second, "the backend to end", func() bool {
			var n int
			return direct.QueryRow(ctx, "select count(*) from pg_stat_activity where pid = $1", pid).Scan(&n) == nil && n == 0
		})
	}

	t.Run("client hangs up", func(t *testing.T) {
		app := uniqueName("hangup")
		pc, err := pgconn.Connect(ctx, p.DSN("md5_user", md5PW, "app", "application_name="+app))
		if err != nil {
			t.Fatal(err)
		}
		s := liveSession(p, app)
		if s == nil {
			t.Fatal("not registered")
		}
		hc, err := pc.Hijack()
		if err != nil {
			t.Fatal(err)
		}
		hc.Conn.Close() // no Terminate
		gone(t, app, s.BackendPID)
		want := regexp.MustCompile(`msg="session ended" .*role=md5_user database=app pid=` +
			strconv.Itoa(int(s.BackendPID)) + ` reason="client closed the connection"`)
		if !want.MatchString(p.logs.String()) {
			t.Errorf("no log line matching %s", want)
		}
	})

	t.Run("client hangs up in the middle of a large result", func(t *testing.T) {
		app := uniqueName("midresult")
		pc, err := pgconn.Connect(ctx, p.DSN("trust_user", "", "app", "application_name="+app))
		if err != nil {
			t.Fatal(err)
		}
		s := liveSession(p, app)
		if s == nil {
			t.Fatal("not registered")
		}
		hc, err := pc.Hijack()
		if err != nil {
			t.Fatal(err)
		}
		defer hc.Conn.Close()
		q, err := (&pgproto3.Query{String: "select repeat('x', 1000) from generate_series(1, 200000)"}).Encode(nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := hc.Conn.Write(q); err != nil {
			t.Fatal(err)
		}
		_ = hc.Conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(hc.Conn, make([]byte, 256<<10)); err != nil {
			t.Fatalf("reading the start of the result: %v", err)
		}
		hc.Conn.Close() // with most of 200 MB still to come
		gone(t, app, s.BackendPID)
		if cur := p.Sessions(); len(cur) != 0 {
			t.Errorf("sessions left: %+v", cur)
		}
	})

	// The server closes its connection as soon as it reads Terminate, often
	// before the proxy sees the client's own close; the session still ended
	// because the client asked. Here the client keeps its socket open.
	t.Run("client sends Terminate", func(t *testing.T) {
		app := uniqueName("terminate")
		pc, err := pgconn.Connect(ctx, p.DSN("trust_user", "", "app", "application_name="+app))
		if err != nil {
			t.Fatal(err)
		}
		s := liveSession(p, app)
		if s == nil {
			t.Fatal("not registered")
		}
		hc, err := pc.Hijack()
		if err != nil {
			t.Fatal(err)
		}
		defer hc.Conn.Close()
		if _, err := hc.Conn.Write([]byte{'X', 0, 0, 0, 4}); err != nil {
			t.Fatal(err)
		}
		gone(t, app, s.BackendPID)
		want := regexp.MustCompile(`msg="session ended" .*role=trust_user database=app pid=` +
			strconv.Itoa(int(s.BackendPID)) + ` reason="client closed the connection"`)
		if !want.MatchString(p.logs.String()) {
			t.Errorf("no log line matching %s", want)
		}
	})

	t.Run("server terminates the backend", func(t *testing.T) {
		app := uniqueName("terminated")
		c := connect(t, p.DSN("password_user", passwordPW, "app", "application_name="+app))
		s := liveSession(p, app)
		if s == nil {
			t.Fatal("not registered")
		}
		var ok bool
		if err := direct.QueryRow(ctx, "select pg_terminate_backend($1, 5000)", s.BackendPID).Scan(&ok); err != nil || !ok {
			t.Fatalf("pg_terminate_backend: %v, %v", ok, err)
		}
		gone(t, app, s.BackendPID)
		// The client hears the server's own reason.
		if _, err := c.Exec(ctx, "select 1"); pgCode(err) != "57P01" && !c.IsClosed() {
			t.Errorf("query after the termination: %v, want 57P01 or a closed connection", err)
		}
		want := regexp.MustCompile(`msg="session ended" .*role=password_user database=app pid=` +
			strconv.Itoa(int(s.BackendPID)) + ` reason="server closed the connection"`)
		if !want.MatchString(p.logs.String()) {
			t.Errorf("no log line matching %s", want)
		}
	})
}
