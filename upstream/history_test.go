package upstream

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/rolegate/rolegate/config"
	"github.com/rolegate/rolegate/internal/testutil"
)

// TestHistory runs the eviction history against one server with
// sql/setup.sql applied, as its least-privilege control role. The subtests
// share the table, so they run one after the other, each on an empty table.
func TestHistory(t *testing.T) {
	t.Parallel()
	c := controlCluster(t)
	if err := c.Exec(t.Context(), "create database nohistory_db"); err != nil {
		t.Fatal(err)
	}
	super, err := pgx.Connect(t.Context(), c.SuperDSN())
	if err != nil {
		t.Fatal(err)
	}
	defer super.Close(context.Background())
	count := func(t *testing.T) int {
		t.Helper()
		var n int
		if err := super.QueryRow(t.Context(), "select count(*) from rolegate.events").Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	empty := func(t *testing.T) {
		t.Helper()
		if _, err := super.Exec(t.Context(), "delete from rolegate.events"); err != nil {
			t.Fatal(err)
		}
	}
	rolegateDSN := c.DSN("rolegate", controlPW, "postgres")
	open := func(t *testing.T, opts HistoryOptions) *History {
		t.Helper()
		ctl := newControl(t, config.Control{DSN: rolegateDSN}, "")
		h, err := ctl.OpenHistory(t.Context(), opts)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(h.Close) // before ctl.Close: cleanups run last first
		return h
	}
	recent := func(t *testing.T, h *History, want int) []HistoryEvent {
		t.Helper()
		var got []HistoryEvent
		testutil.WaitFor(t, 30*time.Second, "the events in the table", func() bool {
			var err error
			got, err = h.Recent(t.Context(), 100)
			if err != nil {
				t.Fatal(err)
			}
			return len(got) >= want
		})
		if len(got) != want {
			t.Fatalf("%d events, want %d: %+v", len(got), want, got)
		}
		return got
	}

	t.Run("written and read back, newest first", func(t *testing.T) {
		empty(t)
		h := open(t, HistoryOptions{Keep: 24 * time.Hour})
		base := time.Date(2030, 1, 2, 3, 4, 5, 6000, time.UTC) // microseconds: the server keeps no finer
		full := HistoryEvent{At: base, Instance: "inst-a", Kind: "eviction", Policy: "newest-wins", Scope: "role",
			Role: "app", Database: "appdb", Client: "10.0.0.1:5000", VictimPID: 4242, VictimRole: "app",
			VictimApplicationName: "worker", VictimClient: "10.0.0.2:6000", VictimAge: 90 * time.Second,
			VictimIdle: 1500 * time.Millisecond, ViaRolegate: true, Reason: "oldest session"}
		h.Write(HistoryEvent{At: base.Add(-time.Hour), Instance: "inst-b", Kind: "rejection", Role: "app", Policy: "reject"})
		h.Write(full)
		h.Write(HistoryEvent{At: base.Add(time.Hour), Instance: "inst-a", Kind: "kill", VictimPID: 7, Reason: "operator: x",
			VictimApplicationName: "bad \xff name"}) // not UTF-8: stored as NULL
		got := recent(t, h, 3)
		if got[0].Kind != "kill" || got[1].Kind != "eviction" || got[2].Kind != "rejection" {
			t.Errorf("order %s, %s, %s; want kill, eviction, rejection (newest first)", got[0].Kind, got[1].Kind, got[2].Kind)
		}
		if ev := got[1]; !ev.At.Equal(full.At) || func() bool { ev.At = full.At; return ev != full }() {
			t.Errorf("read back %+v\nwant %+v", got[1], full)
		}
		if got[0].VictimApplicationName != "" || got[0].VictimAge != 0 || got[2].VictimPID != 0 || got[2].Instance != "inst-b" {
			t.Errorf("empty fields read back as %+v and %+v", got[0], got[2])
		}
		// Empty strings and unknown ages are NULL in the table, for SQL readers.
		var nulls int
		if err := super.QueryRow(t.Context(), `select count(*) from rolegate.events
			where kind = 'rejection' and victim_pid is null and victim_age is null and client is null`).Scan(&nulls); err != nil || nulls != 1 {
			t.Errorf("NULLs for the rejection's empty fields: %d rows, %v", nulls, err)
		}
		// The zero time stores the server's now().
		h.Write(HistoryEvent{Instance: "inst-a", Kind: "rejection"})
		testutil.WaitFor(t, 30*time.Second, "the row without a time", func() bool { return count(t) == 4 })
		var future bool
		if err := super.QueryRow(t.Context(), "select at > now() - interval '1 day' from rolegate.events where victim_pid is null and policy is null").Scan(&future); err != nil || !future {
			t.Errorf("row without a time: at is not the server's now (%v, %v)", future, err)
		}
		h.Close()
		h.Close()                                // safe twice
		h.Write(HistoryEvent{Kind: "rejection"}) // after Close: never blocks, never written
		if n := count(t); n != 4 {
			t.Errorf("%d rows after Close, want 4", n)
		}
	})

	t.Run("a full queue drops without waiting", func(t *testing.T) {
		empty(t)
		h := open(t, HistoryOptions{Keep: 24 * time.Hour, Queue: 4, Batch: 1})
		// The writer has pruned once it has written a first event: it
		// prunes first, one thing at a time.
		h.Write(HistoryEvent{Instance: "x", Kind: "rejection"})
		recent(t, h, 1)
		tx, err := super.Begin(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Rollback(context.Background())
		if _, err := tx.Exec(t.Context(), "lock table rolegate.events in access exclusive mode"); err != nil {
			t.Fatal(err)
		}
		h.Write(HistoryEvent{Instance: "x", Kind: "rejection"})
		// The writer's INSERT waits for the lock, in its Bind or in its Parse
		// (a connection that has not prepared it yet parses it now, and
		// pg_stat_activity then still shows that connection's previous
		// query): pg_locks says which, whatever the text.
		testutil.WaitFor(t, 30*time.Second, "the writer to wait for the lock", func() bool {
			var n int
			if err := super.QueryRow(t.Context(), `select count(*) from pg_catalog.pg_locks l
				join pg_catalog.pg_stat_activity a on a.pid = l.pid
				where not l.granted and l.relation = 'rolegate.events'::regclass and a.usename = 'rolegate'`).Scan(&n); err != nil {
				t.Fatal(err)
			}
			return n == 1
		})
		// The writer holds one event; the queue takes 4; the rest are
		// dropped, and no Write waits (a Write that did would hang here).
		for range 10 {
			h.Write(HistoryEvent{Instance: "x", Kind: "rejection"})
		}
		if d := h.Dropped(); d != 6 {
			t.Errorf("dropped %d, want 6", d)
		}
		if err := tx.Commit(t.Context()); err != nil {
			t.Fatal(err)
		}
		testutil.WaitFor(t, 30*time.Second, "the queued events", func() bool { return count(t) == 1+1+4 })
		if f := h.Failed(); f != 0 {
			t.Errorf("failed %d, want 0", f)
		}
	})

	t.Run("prune deletes rows older than keep", func(t *testing.T) {
		empty(t)
		if _, err := super.Exec(t.Context(), `insert into rolegate.events (at, instance, kind) values
			(now() - interval '8 days', 'old', 'rejection')`); err != nil {
			t.Fatal(err)
		}
		h := open(t, HistoryOptions{Keep: 7 * 24 * time.Hour})
		// The writer prunes at start.
		testutil.WaitFor(t, 30*time.Second, "the old row to be pruned at start", func() bool { return count(t) == 0 })
		if _, err := super.Exec(t.Context(), `insert into rolegate.events (at, instance, kind) values
			(now() - interval '7 days 1 minute', 'old', 'rejection'),
			(now() - interval '6 days 23 hours', 'kept', 'rejection'),
			(now(), 'new', 'eviction')`); err != nil {
			t.Fatal(err)
		}
		n, err := h.Prune(t.Context())
		if err != nil || n != 1 {
			t.Fatalf("prune deleted %d rows (%v), want 1", n, err)
		}
		got := recent(t, h, 2)
		if got[0].Instance != "new" || got[1].Instance != "kept" {
			t.Errorf("left %+v", got)
		}
	})

	t.Run("the control role may do nothing else to the table", func(t *testing.T) {
		conn, err := pgx.Connect(t.Context(), rolegateDSN)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(context.Background())
		for _, q := range []string{
			"update rolegate.events set reason = 'x'",
			"truncate rolegate.events",
			"alter table rolegate.events add column x int",
			"drop table rolegate.events",
		} {
			_, err := conn.Exec(t.Context(), q)
			wantSQLState(t, err, "42501")
		}
	})

	t.Run("unusable tables are reported", func(t *testing.T) {
		if err := c.Exec(t.Context(), "create role nohist_r login password '"+controlPW+"'"); err != nil {
			t.Fatal(err)
		}
		for _, tt := range []struct {
			name, dsn, setup, undo, want string
		}{
			{"missing", c.DSN("rolegate", controlPW, "nohistory_db"), "", "", `relation "rolegate.events" does not exist`},
			{"no privileges", c.DSN("nohist_r", controlPW, "postgres"), "", "", "permission denied for schema rolegate"},
			{"no delete", rolegateDSN, "revoke delete on rolegate.events from rolegate",
				"grant delete on rolegate.events to rolegate", "permission denied for table events"},
			{"no sequence", rolegateDSN, "revoke usage on sequence rolegate.events_id_seq from rolegate",
				"grant usage on sequence rolegate.events_id_seq to rolegate", "no USAGE on the sequence"},
			{"a column missing", rolegateDSN, "alter table rolegate.events rename column victim_idle to old_idle",
				"alter table rolegate.events rename column old_idle to victim_idle", `column "victim_idle"`},
			{"unreachable", "postgres://rolegate@127.0.0.1:1/postgres?connect_timeout=5", "", "", "eviction history"},
		} {
			t.Run(tt.name, func(t *testing.T) {
				if tt.setup != "" {
					if err := c.Exec(t.Context(), tt.setup); err != nil {
						t.Fatal(err)
					}
					defer func() {
						if err := c.Exec(context.Background(), tt.undo); err != nil {
							t.Fatal(err)
						}
					}()
				}
				ctl := newControl(t, config.Control{DSN: tt.dsn}, "")
				h, err := ctl.OpenHistory(t.Context(), HistoryOptions{Keep: time.Hour})
				if err == nil {
					h.Close()
					t.Fatal("opened")
				}
				if !strings.Contains(err.Error(), tt.want) || !strings.HasPrefix(err.Error(), "eviction history: ") {
					t.Errorf("error %q, want it to name %q", err, tt.want)
				}
			})
		}
		ctl := newControl(t, config.Control{DSN: rolegateDSN}, "")
		if _, err := ctl.OpenHistory(t.Context(), HistoryOptions{}); !errors.Is(err, ErrHistoryOff) {
			t.Errorf("keep 0: %v, want ErrHistoryOff", err)
		}
	})

	t.Run("failed writes are counted and logged", func(t *testing.T) {
		empty(t)
		log := &testutil.SyncBuffer{}
		h := open(t, HistoryOptions{Keep: time.Hour, Logger: slog.New(slog.NewTextHandler(log, nil))})
		h.Write(HistoryEvent{Kind: "rejection"})
		recent(t, h, 1)
		if err := c.Exec(t.Context(), "revoke insert on rolegate.events from rolegate"); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := c.Exec(context.Background(), "grant insert on rolegate.events to rolegate"); err != nil {
				t.Fatal(err)
			}
		}()
		h.Write(HistoryEvent{Kind: "rejection"})
		testutil.WaitFor(t, 30*time.Second, "the failed write", func() bool { return h.Failed() == 1 })
		if out := log.String(); !strings.Contains(out, "write to rolegate.events failed") || !strings.Contains(out, "events=1") {
			t.Errorf("log:\n%s", out)
		}
	})
}
