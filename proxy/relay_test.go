package proxy

import (
	"bytes"
	"context"
	"crypto/md5"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/internal/pgtest"
)

// connectConfig opens a pgx connection whose config edit may change; it is
// closed at cleanup.
func connectConfig(t testing.TB, dsn string, edit func(*pgx.ConnConfig)) *pgx.Conn {
	t.Helper()
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatalf("parse %q: %v", redact(dsn), err)
	}
	edit(cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatalf("connect %q: %v", redact(dsn), err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// uniqueName is a fresh SQL identifier (table, channel, application_name) for
// one test, so that parallel tests on the shared cluster never meet.
func uniqueName(prefix string) string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return prefix + "_" + hex.EncodeToString(b[:])
}

// directApp is a superuser connection straight to the shared server's database
// app, bypassing the proxy: the other side of every comparison.
func directApp(t testing.TB) *pgx.Conn {
	t.Helper()
	return connect(t, shared.DSN(shared.SuperUser, shared.SuperPassword, "app"))
}

// appTable creates a table in database app on the server directly, open to
// every role, and drops it at cleanup. It returns the table's name.
func appTable(t testing.TB, columns string) string {
	t.Helper()
	name := uniqueName("relay")
	ctx := context.Background()
	c, err := pgx.Connect(ctx, shared.DSN(shared.SuperUser, shared.SuperPassword, "app"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	if _, err := c.Exec(ctx, fmt.Sprintf("create table %s (%s); grant all on %s to public", name, columns, name)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c, err := pgx.Connect(ctx, shared.DSN(shared.SuperUser, shared.SuperPassword, "app"))
		if err != nil {
			t.Errorf("drop %s: %v", name, err)
			return
		}
		defer c.Close(ctx)
		if _, err := c.Exec(ctx, "drop table "+name); err != nil {
			t.Errorf("drop %s: %v", name, err)
		}
	})
	return name
}

// liveSession is the registry snapshot of the session named app, or nil.
func liveSession(p *testProxy, app string) *SessionInfo {
	for _, s := range p.Sessions() {
		if s.ApplicationName == app {
			return &s
		}
	}
	return nil
}

// pgCode is the SQLSTATE of a PostgreSQL error, or "" for any other error.
func pgCode(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return ""
}

// ctxTimeout is a context that ends after d or with the test.
func ctxTimeout(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// Both query protocols, in every pgx execution mode, with parameters of several
// types, NULLs, many rows, named prepared statements and a pipelined batch.
func TestRelayQueryProtocols(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})
	modes := []pgx.QueryExecMode{
		pgx.QueryExecModeSimpleProtocol,
		pgx.QueryExecModeCacheStatement, // pgx's default: extended protocol, named statements
		pgx.QueryExecModeCacheDescribe,
		pgx.QueryExecModeDescribeExec,
		pgx.QueryExecModeExec,
	}
	for _, mode := range modes {
		t.Run(mode.String(), func(t *testing.T) {
			t.Parallel()
			app := uniqueName("protocols")
			c := connectConfig(t, p.DSN("scram_user", scramPW, "app", "application_name="+app), func(cfg *pgx.ConnConfig) {
				cfg.DefaultQueryExecMode = mode
			})
			ctx := ctxTimeout(t, 20*time.Second)

			var (
				sum   int64
				text  string
				blob  []byte
				null  *string
				stamp time.Time
			)
			err := c.QueryRow(ctx, "select $1::int8 + $2::int8, $3::text || '!', $4::bytea, $5::text, $6::timestamptz",
				int64(40), int64(2), "it's ünïcode", []byte{0, 1, 2, 255}, nil, time.Date(2024, 2, 29, 12, 0, 0, 0, time.UTC)).
				Scan(&sum, &text, &blob, &null, &stamp)
			if err != nil {
				t.Fatal(err)
			}
			if sum != 42 || text != "it's ünïcode!" || !bytes.Equal(blob, []byte{0, 1, 2, 255}) || null != nil ||
				!stamp.Equal(time.Date(2024, 2, 29, 12, 0, 0, 0, time.UTC)) {
				t.Errorf("got %d %q %v %v %v", sum, text, blob, null, stamp)
			}

			rows, err := c.Query(ctx, "select i, md5(i::text) from generate_series(1, $1::int) i", 5000)
			if err != nil {
				t.Fatal(err)
			}
			var n, total int64
			for rows.Next() {
				var i int64
				var h string
				if err := rows.Scan(&i, &h); err != nil {
					t.Fatal(err)
				}
				if want := fmt.Sprintf("%x", md5Sum(fmt.Sprint(i))); h != want {
					t.Fatalf("row %d: md5 %q, want %q", i, h, want)
				}
				n++
				total += i
			}
			if err := rows.Err(); err != nil {
				t.Fatal(err)
			}
			if n != 5000 || total != 5000*5001/2 {
				t.Errorf("%d rows summing to %d", n, total)
			}

			// A named prepared statement, run many times with different parameters.
			if _, err := c.Prepare(ctx, "square", "select $1::int8 * $1::int8, $2::text"); err != nil {
				t.Fatal(err)
			}
			for i := int64(0); i < 50; i++ {
				var sq int64
				var s string
				if err := c.QueryRow(ctx, "square", i, fmt.Sprint("n", i)).Scan(&sq, &s); err != nil {
					t.Fatal(err)
				}
				if sq != i*i || s != fmt.Sprint("n", i) {
					t.Fatalf("square(%d) = %d %q", i, sq, s)
				}
			}

			// A batch goes out in one write and comes back in one stream.
			b := &pgx.Batch{}
			for i := range 100 {
				b.Queue("select $1::int * 3", i)
			}
			br := c.SendBatch(ctx, b)
			for i := range 100 {
				var v int
				if err := br.QueryRow().Scan(&v); err != nil {
					t.Fatal(err)
				}
				if v != 3*i {
					t.Fatalf("batch query %d = %d", i, v)
				}
			}
			if err := br.Close(); err != nil {
				t.Fatal(err)
			}

			// The proxy followed every round trip back to idle.
			if s := liveSession(p, app); s == nil || s.State != StateIdle {
				t.Errorf("session after the queries: %+v, want idle", s)
			}
		})
	}
}

// md5Sum is md5 of a string, as PostgreSQL's md5() computes it.
func md5Sum(s string) [16]byte { return md5.Sum([]byte(s)) }

// psql's simple queries, psql variables, server-side PREPARE/EXECUTE and
// transaction blocks, and a multi-statement script from standard input.
func TestRelayPsqlQueries(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})
	dsn := p.DSN("scram_user", scramPW, "app")

	out, errOut, err := psql(t, dsn, "", "-A", "-t", "-c", "select 6 * 7, current_user, current_database()")
	if err != nil || out != "42|scram_user|app\n" {
		t.Errorf("psql -c: %q, %q, %v", out, errOut, err)
	}

	script := `select 'a' || 'b';
\set x 41
select :x + 1;
prepare twice(int) as select $1 * 2;
execute twice(21);
begin;
create temp table t (v int);
insert into t select generate_series(1, 1000);
select count(*), sum(v) from t;
commit;
select string_agg(v::text, ',') from (select generate_series(1, 5) v) s;
`
	out, errOut, err = psql(t, dsn, script, "-q", "-A", "-t")
	want := "ab\n42\n42\n1000|500500\n1,2,3,4,5\n"
	if err != nil || out != want {
		t.Errorf("psql script: %q (stderr %q, %v), want %q", out, errOut, err, want)
	}
}

// hashRows runs a query and hashes every value of every row in order, with its
// length, so that both the bytes and the framing must match. It also returns the
// number of value bytes seen.
func hashRows(t testing.TB, c *pgx.Conn, sql string, args ...any) (sum string, rowsN, n int) {
	t.Helper()
	ctx := ctxTimeout(t, 60*time.Second)
	rows, err := c.Query(ctx, sql, args...)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	for rows.Next() {
		rowsN++
		for _, v := range rows.RawValues() {
			_ = binary.Write(h, binary.BigEndian, int64(len(v)))
			h.Write(v)
			n += len(v)
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil)), rowsN, n
}

// Large results arrive through the proxy exactly as from the server: 50 MB of
// rows, and single values far larger than a relay buffer, in text and binary.
func TestRelayLargeResult(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})
	app := uniqueName("large")
	viaProxy := connect(t, p.DSN("scram_user", scramPW, "app", "application_name="+app))
	direct := directApp(t)
	bigParam := make([]byte, 16<<20)
	_, _ = rand.Read(bigParam)
	cases := []struct {
		name     string
		sql      string
		args     []any
		rows     int
		minBytes int
	}{
		{"50 MB in 50000 rows", "select i, repeat(md5(i::text), 32) from generate_series(1, 50000) i", nil, 50000, 50_000_000},
		{"one 24 MB text value", "select repeat('0123456789abcdef', 1536 * 1024)", nil, 1, 24 << 20},
		{"one 16 MB bytea in binary", "select decode(repeat(md5('rolegate'), $1::int), 'hex')", []any{1 << 20}, 1, 16 << 20},
		// And the other way: a message from the client far larger than a buffer.
		{"a 16 MB parameter", "select md5($1::bytea), length($1::bytea)", []any{bigParam}, 1, 32},
	}
	var moved int
	var gotMD5 string
	if err := viaProxy.QueryRow(context.Background(), "select md5($1::bytea)", bigParam).Scan(&gotMD5); err != nil ||
		gotMD5 != fmt.Sprintf("%x", md5.Sum(bigParam)) {
		t.Errorf("md5 of the 16 MB parameter through the proxy: %s, %v; want %x", gotMD5, err, md5.Sum(bigParam))
	}
	for _, tc := range cases {
		wantSum, wantRows, wantN := hashRows(t, direct, tc.sql, tc.args...)
		gotSum, gotRows, gotN := hashRows(t, viaProxy, tc.sql, tc.args...)
		if gotSum != wantSum || gotRows != wantRows || gotN != wantN {
			t.Errorf("%s: through the proxy %s (%d rows, %d bytes), direct %s (%d rows, %d bytes)",
				tc.name, gotSum, gotRows, gotN, wantSum, wantRows, wantN)
		}
		if wantRows != tc.rows || wantN < tc.minBytes {
			t.Errorf("%s: the query returned %d rows, %d bytes; want %d rows, at least %d bytes", tc.name, wantRows, wantN, tc.rows, tc.minBytes)
		}
		moved += gotN
	}
	s := liveSession(p, app)
	if s == nil || s.BytesOut < int64(moved) || s.BytesIn < 2*int64(len(bigParam)) || s.State != StateIdle {
		t.Errorf("session %+v, want idle with at least %d bytes out and %d in", s, moved, 2*len(bigParam))
	}
	// The session is in a sane state after it all.
	var one int
	if err := viaProxy.QueryRow(context.Background(), "select 1").Scan(&one); err != nil || one != 1 {
		t.Errorf("select 1 after the large results: %d, %v", one, err)
	}
}

// copyRows builds COPY text-format input in its canonical form (as COPY TO
// writes it), with NULLs, escapes and multi-byte characters.
func copyRows(n int) []byte {
	var b bytes.Buffer
	b.Grow(n * 64)
	for i := 1; i <= n; i++ {
		note := `\N`
		switch i % 5 {
		case 1:
			note = fmt.Sprintf("tab\\there\\\\%d", i)
		case 2:
			note = "ünïcödé ✓"
		case 3:
			note = fmt.Sprintf("line\\nbreak %d", i*7)
		}
		fmt.Fprintf(&b, "%d\t%x\t%s\n", i, md5Sum(fmt.Sprint(i)), note)
	}
	return b.Bytes()
}

// 100k rows in with COPY FROM STDIN and out with COPY TO STDOUT, through pgx and
// psql, compared byte for byte with the input and with the server's own view.
func TestRelayCopy(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})
	const n = 100000
	input := copyRows(n)
	dump := func(tbl string) string { return "copy (select * from " + tbl + " order by id) to stdout" }

	t.Run("pgx", func(t *testing.T) {
		t.Parallel()
		tbl := appTable(t, "id int primary key, hash text, note text")
		c := connect(t, p.DSN("scram_user", scramPW, "app"))
		direct := directApp(t)
		ctx := ctxTimeout(t, 60*time.Second)
		tag, err := c.PgConn().CopyFrom(ctx, bytes.NewReader(input), "copy "+tbl+" from stdin")
		if err != nil || tag.RowsAffected() != n {
			t.Fatalf("copy from stdin: %v, %v", tag, err)
		}
		var out bytes.Buffer
		tag, err = c.PgConn().CopyTo(ctx, &out, dump(tbl))
		if err != nil || tag.RowsAffected() != n {
			t.Fatalf("copy to stdout: %v, %v", tag, err)
		}
		if !bytes.Equal(out.Bytes(), input) {
			t.Errorf("COPY TO through the proxy differs from the input (%d vs %d bytes)", out.Len(), len(input))
		}
		var fromServer bytes.Buffer
		if _, err := direct.PgConn().CopyTo(ctx, &fromServer, dump(tbl)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(fromServer.Bytes(), input) {
			t.Errorf("the server's copy of the table differs from the input (%d vs %d bytes)", fromServer.Len(), len(input))
		}

		// A COPY that fails part-way ends in an error, and the session goes on.
		var bad bytes.Buffer
		for i := n + 1; i <= n+1000; i++ {
			fmt.Fprintf(&bad, "%d\tx\ty\n", i)
		}
		bad.WriteString("not-a-number\tx\ty\n")
		_, err = c.PgConn().CopyFrom(ctx, &bad, "copy "+tbl+" from stdin")
		if pgCode(err) != "22P02" {
			t.Errorf("copy of a malformed row: %v, want 22P02", err)
		}
		var count int
		if err := c.QueryRow(ctx, "select count(*) from "+tbl).Scan(&count); err != nil || count != n {
			t.Errorf("count after the failed copy: %d, %v; want %d", count, err, n)
		}
	})

	t.Run("psql", func(t *testing.T) {
		t.Parallel()
		tbl := appTable(t, "id int primary key, hash text, note text")
		dsn := p.DSN("md5_user", md5PW, "app")
		direct := directApp(t)
		stdin := "copy " + tbl + " from stdin;\n" + string(input) + "\\.\n"
		if out, errOut, err := psql(t, dsn, stdin, "-q"); err != nil || out != "" {
			t.Fatalf("copy from stdin: %q, %q, %v", out, errOut, err)
		}
		out, errOut, err := psql(t, dsn, "", "-c", dump(tbl))
		if err != nil || out != string(input) {
			t.Errorf("copy to stdout: %d bytes (want %d), equal %v, stderr %q, %v", len(out), len(input), out == string(input), errOut, err)
		}
		out, errOut, err = psql(t, dsn, "", "-c", `\copy (select * from `+tbl+` order by id) to stdout`)
		if err != nil || out != string(input) {
			t.Errorf(`\copy to stdout: %d bytes (want %d), equal %v, stderr %q, %v`, len(out), len(input), out == string(input), errOut, err)
		}
		var count, sum int64
		if err := direct.QueryRow(context.Background(), "select count(*), sum(id) from "+tbl).Scan(&count, &sum); err != nil ||
			count != n || sum != n*(n+1)/2 {
			t.Errorf("on the server: %d rows summing to %d, %v", count, sum, err)
		}
	})
}

// Notifications cross between two proxied sessions of different roles, whether
// the listener is idle, waiting, or itself running a query; a notification sent
// in a rolled-back transaction never arrives.
func TestRelayListenNotify(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})
	app := uniqueName("listener")
	listener := connect(t, p.DSN("scram_user", scramPW, "app", "application_name="+app))
	notifier := connect(t, p.DSN("md5_user", md5PW, "app"))
	ctx := ctxTimeout(t, 60*time.Second)
	ch := uniqueName("chan")

	if _, err := listener.Exec(ctx, "listen "+ch); err != nil {
		t.Fatal(err)
	}
	var notifierPID uint32
	if err := notifier.QueryRow(ctx, "select pg_backend_pid()").Scan(&notifierPID); err != nil {
		t.Fatal(err)
	}
	wait := func(wantPayload string) {
		t.Helper()
		wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		n, err := listener.WaitForNotification(wctx)
		if err != nil {
			t.Fatalf("waiting for %q: %v", wantPayload, err)
		}
		if n.Channel != ch || n.Payload != wantPayload {
			t.Fatalf("notification %q on %q, want %q on %q", n.Payload, n.Channel, wantPayload, ch)
		}
		if wantPayload != "self" && n.PID != notifierPID {
			t.Errorf("notification from pid %d, want the notifier's %d", n.PID, notifierPID)
		}
	}

	// Sent while the listener is idle.
	if _, err := notifier.Exec(ctx, "select pg_notify($1, $2)", ch, "hello 1"); err != nil {
		t.Fatal(err)
	}
	tx, err := notifier.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "notify "+ch+", 'rolled back'"); err != nil {
		t.Fatal(err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	tx, err = notifier.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "notify "+ch+", 'hello 2'"); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	// Arriving at an idle session does not make it look busy.
	if _, err := notifier.Exec(ctx, "select 1"); err != nil {
		t.Fatal(err)
	}
	if s := liveSession(p, app); s == nil || s.State != StateIdle {
		t.Errorf("listener after notifications: %+v, want idle", s)
	}
	wait("hello 1")
	wait("hello 2") // not "rolled back"

	// Sent while the listener waits.
	got := make(chan error, 1)
	var waiting sync.WaitGroup
	t.Cleanup(waiting.Wait) // before the connection closes, even when the test fails
	waiting.Go(func() {
		wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		n, err := listener.WaitForNotification(wctx)
		if err == nil && n.Payload != "hello 3" {
			err = fmt.Errorf("payload %q, want hello 3", n.Payload)
		}
		got <- err
	})
	if _, err := notifier.Exec(ctx, "select pg_notify($1, 'hello 3')", ch); err != nil {
		t.Fatal(err)
	}
	if err := <-got; err != nil {
		t.Fatal(err)
	}

	// A notification to itself arrives inside its own query's response.
	if _, err := listener.Exec(ctx, "notify "+ch+", 'self'"); err != nil {
		t.Fatal(err)
	}
	wait("self")
}

// cancelByContext makes pgx cancel a query whose context ends with a
// CancelRequest (sent to the proxy, on a new connection) instead of closing the
// connection, its default.
func cancelByContext(cfg *pgx.ConnConfig) {
	cfg.BuildContextWatcherHandler = func(c *pgconn.PgConn) ctxwatch.Handler {
		return &pgconn.CancelRequestContextWatcherHandler{Conn: c, DeadlineDelay: 10 * time.Second}
	}
}

// serverRunning reports whether the server is executing query for the session
// named app. The proxy marks a session active as it forwards the query; a
// cancel that reaches the server before the query does is discarded, as it is
// without a proxy, so cancel tests wait for this instead.
func serverRunning(direct *pgx.Conn, app, query string) bool {
	var n int
	err := direct.QueryRow(context.Background(),
		"select count(*) from pg_stat_activity where application_name = $1 and state = 'active' and query = $2", app, query).Scan(&n)
	return err == nil && n == 1
}

// A query cancelled by its context stops with 57014 (pg_sleep(30) that ran to
// its end would return no error) and the session goes on; so does psql's on
// SIGINT.
func TestRelayCancelQuery(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})

	t.Run("pgx", func(t *testing.T) {
		t.Parallel()
		app := uniqueName("cancel")
		c := connectConfig(t, p.DSN("scram_user", scramPW, "app", "application_name="+app), cancelByContext)
		direct := directApp(t)
		var canceller sync.WaitGroup
		t.Cleanup(canceller.Wait) // before direct closes, even when the test fails
		for round := range 2 {    // the second round proves the session and its key still work
			ctx, cancel := context.WithCancel(context.Background())
			var cancelled atomic.Int64
			canceller.Go(func() { // cancel once the server runs the query
				for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
					if s := liveSession(p, app); s != nil && s.State == StateActive && serverRunning(direct, app, "select pg_sleep(30)") {
						break
					}
				}
				cancelled.Store(time.Now().UnixNano())
				cancel()
			})
			_, err := c.Exec(ctx, "select pg_sleep(30)")
			took := time.Since(time.Unix(0, cancelled.Load()))
			cancel()
			canceller.Wait()
			if pgCode(err) != "57014" {
				t.Fatalf("round %d: %v, want 57014 canceling statement due to user request", round, err)
			}
			t.Logf("round %d: the query ended %v after the cancel", round, took)
			var v int
			if err := c.QueryRow(context.Background(), "select $1::int + 1", 41).Scan(&v); err != nil || v != 42 {
				t.Fatalf("round %d: the session after the cancel: %d, %v", round, v, err)
			}
		}
		// Logged once the server has the request, which may be after the
		// query has ended.
		waitUntil(t, 30*time.Second, "2 log lines for forwarded cancel requests", func() bool {
			return strings.Count(p.logs.String(), "cancel request forwarded") >= 2
		})
	})

	t.Run("psql", func(t *testing.T) {
		t.Parallel()
		app := uniqueName("psqlcancel")
		ctx := ctxTimeout(t, 60*time.Second)
		cmd := exec.CommandContext(ctx, "psql", "-X", "-d", p.DSN("scram_user", scramPW, "app", "application_name="+app),
			"-c", "select pg_sleep(30)")
		cmd.Env = append(os.Environ(), "PGCONNECT_TIMEOUT=10")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		direct := directApp(t)
		waitUntil(t, 30*time.Second, "psql's query to start", func() bool {
			s := liveSession(p, app)
			return s != nil && s.State == StateActive && serverRunning(direct, app, "select pg_sleep(30)")
		})
		start := time.Now()
		if err := cmd.Process.Signal(os.Interrupt); err != nil {
			t.Fatal(err)
		}
		err := <-exited
		t.Logf("psql ended %v after SIGINT", time.Since(start))
		if err == nil || !strings.Contains(stderr.String(), "canceling statement due to user request") {
			t.Errorf("psql: %v, stderr %q; want the query cancelled", err, stderr.String())
		}
	})
}

// sendCancel sends a protocol 3.0 CancelRequest to the proxy on a connection of
// its own and waits until the proxy has handled it and closed the connection.
func sendCancel(t testing.TB, addr string, pid uint32, key []byte) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	msg := binary.BigEndian.AppendUint32(nil, uint32(12+len(key)))
	msg = binary.BigEndian.AppendUint32(msg, codeCancel)
	msg = binary.BigEndian.AppendUint32(msg, pid)
	msg = append(msg, key...)
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Read(make([]byte, 64)); err != io.EOF {
		t.Fatalf("after a cancel request: read %d bytes, %v; want EOF", n, err)
	}
}

// CancelRequests that do not carry exactly the key rolegate issued to a live
// session cancel nothing: the query they aim at runs to its end. The pid in
// the key is the server's, which is public; the secret is rolegate's, and the
// server's own secret does not work through rolegate. The right key cancels.
func TestRelayCancelWrongKey(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})
	app := uniqueName("wrongkey")
	c := connect(t, p.DSN("scram_user", scramPW, "app", "application_name="+app))
	pid, key := c.PgConn().PID(), c.PgConn().SecretKey()
	if len(key) != 4 {
		t.Fatalf("issued key %x, want 4 bytes", key)
	}
	var serverPID uint32
	if err := c.QueryRow(context.Background(), "select pg_backend_pid()").Scan(&serverPID); err != nil {
		t.Fatal(err)
	}
	if serverPID != pid {
		t.Errorf("the client was given pid %d, the server's is %d", pid, serverPID)
	}
	held := p.registry.byBackendPID(serverPID)
	if held == nil || len(held.backendKey) != 4 {
		t.Fatalf("no session with the server's key for pid %d", serverPID)
	}
	serverKey := bytes.Clone(held.backendKey)
	if bytes.Equal(serverKey, key) {
		t.Fatalf("the client was given the server's secret %x", key)
	}
	// The key of a session that has ended dies with it.
	old := connect(t, p.DSN("trust_user", "", "app"))
	oldPID, oldKey := old.PgConn().PID(), old.PgConn().SecretKey()
	if err := old.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 30*time.Second, "the old session to end", func() bool { return len(p.Sessions()) == 1 })

	direct := directApp(t)
	// A query the wrong keys must leave alone sleeps 1 s; the one the right
	// key cancels would sleep 30 s, so that the cancel surely finds it running.
	var running sync.WaitGroup
	t.Cleanup(running.Wait) // before the connection closes, even when the test fails
	sleep := func(query string) chan error {
		done := make(chan error, 1)
		running.Go(func() {
			var v int
			err := c.QueryRow(context.Background(), query).Scan(&v)
			if err == nil && v != 7 {
				err = fmt.Errorf("got %d, want 7", v)
			}
			done <- err
		})
		// Keys are sent while the server runs the query, where a right one
		// cancels it.
		waitUntil(t, 30*time.Second, "the query to start", func() bool {
			s := liveSession(p, app)
			return s != nil && s.State == StateActive && serverRunning(direct, app, query)
		})
		return done
	}
	done := sleep("select 7 from pg_sleep(1)")
	wrong := bytes.Clone(key)
	wrong[3] ^= 1
	sendCancel(t, p.Addr(), pid, wrong)                       // the right pid, a wrong secret
	sendCancel(t, p.Addr(), pid, serverKey)                   // the server's own key
	sendCancel(t, p.Addr(), pid+1, key)                       // another pid with the issued secret
	sendCancel(t, p.Addr(), pid, append(bytes.Clone(key), 0)) // a longer key
	sendCancel(t, p.Addr(), oldPID, oldKey)                   // an ended session's key
	if err := <-done; err != nil {
		t.Fatalf("the query after wrong cancel keys: %v; want it to finish", err)
	}
	if got := strings.Count(p.logs.String(), "cancel request with an unknown key ignored"); got != 5 {
		t.Errorf("%d log lines for ignored cancel requests, want 5", got)
	}
	if strings.Contains(p.logs.String(), "cancel request forwarded") {
		t.Error("a cancel request was forwarded")
	}

	done = sleep("select 7 from pg_sleep(30)")
	sendCancel(t, p.Addr(), pid, key)
	if err := <-done; pgCode(err) != "57014" {
		t.Fatalf("the query after the right cancel key: %v; want 57014", err)
	}
}

// An error ends the statement, not the session, in both protocols and in psql;
// a rolled-back transaction leaves nothing behind.
func TestRelayErrorsAndRollback(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})
	tbl := appTable(t, "v int")
	app := uniqueName("errors")
	c := connect(t, p.DSN("scram_user", scramPW, "app", "application_name="+app))
	other := connect(t, p.DSN("password_user", passwordPW, "app"))
	ctx := ctxTimeout(t, 20*time.Second)

	if _, err := c.Exec(ctx, "select 1/0"); pgCode(err) != "22012" {
		t.Errorf("simple protocol: %v, want 22012", err)
	}
	var v int
	if err := c.QueryRow(ctx, "select 10 / $1::int", 0).Scan(&v); pgCode(err) != "22012" {
		t.Errorf("extended protocol: %v, want 22012", err)
	}
	if err := c.QueryRow(ctx, "select no_such_column").Scan(&v); pgCode(err) != "42703" {
		t.Errorf("error at parse time: %v, want 42703", err)
	}
	if err := c.QueryRow(ctx, "select 10 / $1::int", 5).Scan(&v); err != nil || v != 2 {
		t.Fatalf("after the errors: %d, %v", v, err)
	}

	// Rolled back after an error inside the transaction.
	tx, err := c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "insert into "+tbl+" values (1), (2)"); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "select 1/0"); pgCode(err) != "22012" {
		t.Fatalf("in the transaction: %v", err)
	}
	if _, err := tx.Exec(ctx, "insert into "+tbl+" values (3)"); pgCode(err) != "25P02" {
		t.Errorf("in the aborted transaction: %v, want 25P02", err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	// Rolled back without an error.
	tx, err = c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "insert into "+tbl+" values (4)"); err != nil {
		t.Fatal(err)
	}
	var inside int
	if err := tx.QueryRow(ctx, "select count(*) from "+tbl).Scan(&inside); err != nil || inside != 1 {
		t.Errorf("inside the transaction: %d rows, %v", inside, err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	var count int
	if err := other.QueryRow(ctx, "select count(*) from "+tbl).Scan(&count); err != nil || count != 0 {
		t.Errorf("another session sees %d rows (%v) after the rollbacks, want 0", count, err)
	}
	if s := liveSession(p, app); s == nil || s.State != StateIdle {
		t.Errorf("session after the rollbacks: %+v, want idle", s)
	}
	// A committed row is seen, so the check above could have failed.
	if _, err := c.Exec(ctx, "insert into "+tbl+" values (5)"); err != nil {
		t.Fatal(err)
	}
	if err := other.QueryRow(ctx, "select count(*) from "+tbl).Scan(&count); err != nil || count != 1 {
		t.Errorf("another session sees %d rows (%v) after a commit, want 1", count, err)
	}

	// psql goes on after an error when told to.
	out, errOut, _ := psql(t, p.DSN("scram_user", scramPW, "app"), "select 1/0;\nselect 'still here';\n",
		"-v", "ON_ERROR_STOP=0", "-A", "-t")
	if out != "still here\n" || !strings.Contains(errOut, "division by zero") {
		t.Errorf("psql: %q, stderr %q", out, errOut)
	}
}

// 200 sessions at once, each running small queries in both protocols and a
// short sleep; all succeed, and the registry sees them all at the same time.
func TestRelayConcurrentSessions(t *testing.T) {
	// Not parallel: the 200 server connections must not meet other tests'.
	p := startProxy(t, proxyOpts{})
	const sessions, queries = 200, 20
	ctx := ctxTimeout(t, 60*time.Second)
	var (
		connected sync.WaitGroup
		finished  sync.WaitGroup
		all       = make(chan struct{})
		errs      = make(chan error, sessions)
	)
	connected.Add(sessions)
	finished.Add(sessions)
	for i := range sessions {
		go func() {
			defer finished.Done()
			var once sync.Once
			arrived := func() { once.Do(connected.Done) }
			defer arrived()
			user, pw := "trust_user", ""
			if i%10 == 0 { // a few go through SCRAM too
				user, pw = "scram_user", scramPW
			}
			c, err := pgx.Connect(ctx, p.DSN(user, pw, "app", fmt.Sprintf("application_name=many_%d", i)))
			if err != nil {
				errs <- fmt.Errorf("session %d: connect: %w", i, err)
				return
			}
			defer c.Close(context.Background())
			arrived()
			select {
			case <-all:
			case <-ctx.Done():
				errs <- fmt.Errorf("session %d: %w", i, ctx.Err())
				return
			}
			for q := range queries {
				var got int
				var err error
				if q%2 == 0 {
					err = c.QueryRow(ctx, "select $1::int * 2", i*q).Scan(&got)
				} else {
					err = c.QueryRow(ctx, fmt.Sprintf("select %d * 2", i*q), pgx.QueryExecModeSimpleProtocol).Scan(&got)
				}
				if err != nil || got != 2*i*q {
					errs <- fmt.Errorf("session %d, query %d: %d, %v", i, q, got, err)
					return
				}
			}
			if _, err := c.Exec(ctx, "select pg_sleep(0.01)"); err != nil {
				errs <- fmt.Errorf("session %d: sleep: %w", i, err)
			}
		}()
	}
	connected.Wait()
	if n := len(p.Sessions()); n != sessions && len(errs) == 0 {
		t.Errorf("%d sessions registered while all %d were connected", n, sessions)
	}
	close(all)
	finished.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	waitUntil(t, 30*time.Second, "all sessions to end", func() bool { return len(p.Sessions()) == 0 })
}

// Replication connections pass through: IDENTIFY_SYSTEM with pgconn and psql,
// and a physical stream (CopyBoth, no ReadyForQuery while it runs) ended by the
// client.
func TestRelayReplicationConnection(t *testing.T) {
	t.Parallel()
	c := pgtest.Start(t, pgtest.Options{HBA: []string{"host replication all 127.0.0.1/32 scram-sha-256"}})
	p := startProxy(t, proxyOpts{server: c})
	ctx := ctxTimeout(t, 30*time.Second)

	var systemID string
	dc, err := pgx.Connect(ctx, c.SuperDSN())
	if err != nil {
		t.Fatal(err)
	}
	defer dc.Close(context.Background())
	if err := dc.QueryRow(ctx, "select system_identifier::text from pg_control_system()").Scan(&systemID); err != nil {
		t.Fatal(err)
	}

	identify := func(t *testing.T, pc *pgconn.PgConn) (xlogpos string) {
		t.Helper()
		res, err := pc.Exec(ctx, "IDENTIFY_SYSTEM").ReadAll()
		if err != nil {
			t.Fatal(err)
		}
		if len(res) != 1 || len(res[0].Rows) != 1 || len(res[0].Rows[0]) != 4 {
			t.Fatalf("IDENTIFY_SYSTEM: %+v", res)
		}
		row := res[0].Rows[0]
		if string(row[0]) != systemID || string(row[1]) != "1" {
			t.Errorf("IDENTIFY_SYSTEM: system %s timeline %s, want %s and 1", row[0], row[1], systemID)
		}
		return string(row[2])
	}
	replConnect := func(t *testing.T, mode, app string) *pgconn.PgConn {
		t.Helper()
		cfg, err := pgconn.ParseConfig(p.DSN(c.SuperUser, c.SuperPassword, "postgres", "application_name="+app))
		if err != nil {
			t.Fatal(err)
		}
		cfg.RuntimeParams["replication"] = mode
		pc, err := pgconn.ConnectConfig(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pc.Close(context.Background()) })
		return pc
	}

	t.Run("IDENTIFY_SYSTEM with pgconn", func(t *testing.T) {
		app := uniqueName("repl")
		pc := replConnect(t, "database", app)
		identify(t, pc)
		if s := liveSession(p, app); s == nil || !s.Replication || s.State != StateIdle || s.User != c.SuperUser {
			t.Errorf("replication session: %+v", s)
		}
	})

	t.Run("IDENTIFY_SYSTEM with psql", func(t *testing.T) {
		out, errOut, err := psql(t, p.DSN(c.SuperUser, c.SuperPassword, "postgres", "replication=database"),
			"", "-A", "-t", "-c", "IDENTIFY_SYSTEM")
		if err != nil || !strings.HasPrefix(out, systemID+"|1|") || !strings.HasSuffix(out, "|postgres\n") {
			t.Errorf("psql IDENTIFY_SYSTEM: %q, %q, %v", out, errOut, err)
		}
	})

	t.Run("physical stream", func(t *testing.T) {
		app := uniqueName("stream")
		pc := replConnect(t, "true", app)
		start := identify(t, pc)
		fe := pc.Frontend()
		fe.Send(&pgproto3.Query{String: "START_REPLICATION PHYSICAL " + start})
		if err := fe.Flush(); err != nil {
			t.Fatal(err)
		}
		m, err := pc.ReceiveMessage(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := m.(*pgproto3.CopyBothResponse); !ok {
			t.Fatalf("after START_REPLICATION: %T %+v, want CopyBothResponse", m, m)
		}
		if s := liveSession(p, app); s == nil || s.State != StateActive || !s.Replication {
			t.Errorf("streaming session: %+v, want active", s)
		}
		// Write some WAL on the server and wait for it in the stream.
		tbl := uniqueName("wal")
		if _, err := dc.Exec(ctx, "create table "+tbl+" as select generate_series(1, 1000) v"); err != nil {
			t.Fatal(err)
		}
		var walBytes int
		for walBytes == 0 {
			m, err := pc.ReceiveMessage(ctx)
			if err != nil {
				t.Fatalf("waiting for WAL: %v", err)
			}
			if cd, ok := m.(*pgproto3.CopyData); ok && len(cd.Data) > 25 && cd.Data[0] == 'w' {
				walBytes = len(cd.Data) - 25
			}
		}
		fe.Send(&pgproto3.CopyDone{})
		if err := fe.Flush(); err != nil {
			t.Fatal(err)
		}
		var sawCopyDone, sawComplete bool
		for {
			m, err := pc.ReceiveMessage(ctx)
			if err != nil {
				t.Fatalf("ending the stream: %v", err)
			}
			switch m := m.(type) {
			case *pgproto3.CopyDone:
				sawCopyDone = true
			case *pgproto3.CommandComplete:
				sawComplete = true
			case *pgproto3.ErrorResponse:
				t.Fatalf("ending the stream: %s %s", m.Code, m.Message)
			}
			if _, ok := m.(*pgproto3.ReadyForQuery); ok {
				break
			}
		}
		if !sawCopyDone || !sawComplete {
			t.Errorf("stream ended without CopyDone (%v) or CommandComplete (%v)", sawCopyDone, sawComplete)
		}
		if s := liveSession(p, app); s == nil || s.State != StateIdle || s.BytesOut < int64(walBytes) {
			t.Errorf("session after the stream: %+v, want idle with at least %d bytes out", s, walBytes)
		}
		identify(t, pc) // the connection is usable again
	})
}

// A client that sends a message with a broken length (< 4) loses its own
// session, server connection included; other sessions carry on.
func TestRelayBrokenLengthEndsOnlyThatSession(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})
	ctx := ctxTimeout(t, 20*time.Second)
	bystander := connect(t, p.DSN("scram_user", scramPW, "app"))
	direct := directApp(t)

	for _, length := range []uint32{0, 3} {
		t.Run(fmt.Sprint("length ", length), func(t *testing.T) {
			app := uniqueName("broken")
			pc, err := pgconn.Connect(ctx, p.DSN("trust_user", "", "app", "application_name="+app))
			if err != nil {
				t.Fatal(err)
			}
			hc, err := pc.Hijack()
			if err != nil {
				t.Fatal(err)
			}
			conn := hc.Conn
			defer conn.Close()
			s := liveSession(p, app)
			if s == nil {
				t.Fatal("session not registered")
			}
			backend := s.BackendPID
			// A good query first, then a Query whose length word is broken.
			good := encodeAll(t, &pgproto3.Query{String: "select 1"})
			if _, err := conn.Write(good); err != nil {
				t.Fatal(err)
			}
			fe := pgproto3.NewFrontend(conn, conn)
			_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
			for {
				m, err := fe.Receive()
				if err != nil {
					t.Fatal(err)
				}
				if _, ok := m.(*pgproto3.ReadyForQuery); ok {
					break
				}
			}
			if _, err := conn.Write(rawMsg('Q', length, []byte("select 2\x00"))); err != nil {
				t.Fatal(err)
			}
			// The proxy hangs up on the client...
			if n, err := io.Copy(io.Discard, conn); err != nil {
				t.Errorf("reading after the broken message: %d bytes, %v; want EOF", n, err)
			}
			waitUntil(t, 30*time.Second, "the broken session to leave the registry", func() bool { return liveSession(p, app) == nil })
			// ...and on the server.
			waitUntil(t, 30*time.Second, "the server backend to end", func() bool {
				var n int
				err := direct.QueryRow(ctx, "select count(*) from pg_stat_activity where pid = $1", backend).Scan(&n)
				return err == nil && n == 0
			})
			if !strings.Contains(p.logs.String(), fmt.Sprintf("protocol error from client: invalid message length %d", length)) {
				t.Errorf("no log line for the broken message")
			}
			var v int
			if err := bystander.QueryRow(ctx, "select $1::int", 5).Scan(&v); err != nil || v != 5 {
				t.Errorf("the other session: %d, %v", v, err)
			}
		})
	}
	if n := len(p.Sessions()); n != 1 {
		t.Errorf("%d sessions left, want the bystander only", n)
	}
}

// A client may send its first queries right behind its password, before the
// login has finished: the proxy holds them in its login buffer and must relay
// them once the session is up.
func TestRelayQueriesPipelinedWithLogin(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})
	app := uniqueName("eager")
	conn, err := net.DialTimeout("tcp", p.Addr(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(15 * time.Second))
	fe := pgproto3.NewFrontend(conn, conn)
	fe.Send(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30,
		Parameters: map[string]string{"user": "password_user", "database": "app", "application_name": app}})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	if m, err := fe.Receive(); err != nil {
		t.Fatal(err)
	} else if _, ok := m.(*pgproto3.AuthenticationCleartextPassword); !ok {
		t.Fatalf("got %T, want a cleartext password request", m)
	}
	// Password, a simple query and an extended-protocol round, in one write.
	fe.Send(&pgproto3.PasswordMessage{Password: passwordPW})
	fe.Send(&pgproto3.Query{String: "select 'early', current_user"})
	fe.Send(&pgproto3.Parse{Query: "select $1::int * 2"})
	fe.Send(&pgproto3.Bind{Parameters: [][]byte{[]byte("21")}})
	fe.Send(&pgproto3.Execute{})
	fe.Send(&pgproto3.Sync{})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	var got []string
	for ready := 0; ready < 3; {
		m, err := fe.Receive()
		if err != nil {
			t.Fatalf("after %q: %v", got, err)
		}
		switch m := m.(type) {
		case *pgproto3.DataRow:
			for _, v := range m.Values {
				got = append(got, string(v))
			}
		case *pgproto3.ReadyForQuery:
			ready++
			got = append(got, "Z"+string(m.TxStatus))
		case *pgproto3.ErrorResponse:
			t.Fatalf("error: %s %s", m.Code, m.Message)
		}
	}
	want := []string{"ZI", "early", "password_user", "ZI", "42", "ZI"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("got %q, want %q", got, want)
	}
	if s := liveSession(p, app); s == nil || s.State != StateIdle {
		t.Errorf("session: %+v, want idle", s)
	}
}
