package upstream

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// The eviction history: every instance's evictions, rejections and kills in
// the table rolegate.events (sql/setup.sql creates it), so that the history
// spans instances and restarts. Writes never wait: they go to a bounded
// queue that one goroutine empties in batches; a full queue drops the event
// and counts it. The same goroutine deletes rows older than the retention.

// HistoryEvent is one row of rolegate.events. upstream does not know the
// proxy's Event: the proxy converts (the dependency goes proxy → upstream).
type HistoryEvent struct {
	At       time.Time // when rolegate decided; the zero time stores the server's now()
	Instance string    // the rolegate instance that decided
	Kind     string    // "eviction", "rejection" or "kill"
	Policy   string
	Scope    string // "role" or "database"
	Role     string // the login's role
	Database string
	Client   string // the login's client address
	// The victim, for evictions and kills.
	VictimPID             uint32
	VictimRole            string
	VictimApplicationName string
	VictimClient          string
	VictimAge             time.Duration // since its backend_start; 0 when unknown (NULL)
	VictimIdle            time.Duration // idle for; 0 when it was not idle or it is unknown (NULL)
	ViaRolegate           bool
	Reason                string
}

// HistoryOptions configure a History; a zero field takes its default.
type HistoryOptions struct {
	// Keep is how long rows stay: older ones are deleted at start and every
	// PruneEvery, by every instance. Required (> 0).
	Keep time.Duration
	// Queue is how many events may wait to be written (1024); more are
	// dropped and counted (Dropped).
	Queue int
	// Batch is the most events one round trip writes (128).
	Batch int
	// PruneEvery is the pause between prunes (5 minutes).
	PruneEvery time.Duration
	// Logger receives write failures and drops, at most one line per
	// historyLogEvery. nil: slog.Default().
	Logger *slog.Logger
}

const (
	historyQueue      = 1024
	historyBatch      = 128
	historyPruneEvery = 5 * time.Minute
	// historyTimeout bounds one statement of the writer: a stalled server
	// (a lock on the table, a network in trouble) costs the writer this
	// long and the events queued meanwhile, never a login.
	historyTimeout = 10 * time.Second
	// historyFlushTimeout is how long Close lets the writer write what is
	// still queued before it cancels it.
	historyFlushTimeout = 2 * time.Second
	// historyLogEvery rate-limits the writer's warnings.
	historyLogEvery = time.Minute
)

// History writes events to rolegate.events and reads them back. Its
// goroutine is started by OpenHistory and ended by Close.
type History struct {
	pool  *pgxpool.Pool
	opts  HistoryOptions
	log   *slog.Logger
	queue chan HistoryEvent

	dropped atomic.Uint64 // events Write could not queue
	failed  atomic.Uint64 // events lost to failed inserts

	ctx       context.Context // the writer's; cancelled by Close
	cancel    context.CancelFunc
	stop      chan struct{} // closed by Close: write what is queued and end
	closeOnce sync.Once
	done      chan struct{} // closed when the writer has ended

	// The writer's own (its goroutine alone touches them).
	lastWarn          time.Time
	warnedDropped     uint64
	skippedFailWarns  int
	skippedFailEvents uint64
}

// historyColumns are rolegate.events' columns as History writes and reads
// them, in HistoryEvent's order.
const historyColumns = `at, instance, kind, policy, scope, role, database, client,
	victim_pid, victim_role, victim_application_name, victim_client,
	victim_age, victim_idle, via_rolegate, reason`

// historyInsert inserts one event. Ages travel as microseconds: an interval
// of NULL microseconds is NULL.
const historyInsert = `INSERT INTO rolegate.events (` + historyColumns + `)
VALUES (coalesce($1, now()), $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
	$13::int8 * interval '1 microsecond', $14::int8 * interval '1 microsecond', $15, $16)`

// historyCheck inserts nothing and deletes nothing: it fails as a real
// insert or delete would when the table, a column or a privilege is missing
// (the sequence behind id is checked apart: nextval is not called for no row).
var historyCheck = []string{
	`INSERT INTO rolegate.events (` + historyColumns + `)
	SELECT now(), '', '', '', '', '', '', '', 0, '', '', '', interval '0', interval '0', false, '' WHERE false`,
	`DELETE FROM rolegate.events WHERE false`,
	`SELECT id, ` + historyColumns + ` FROM rolegate.events LIMIT 0`,
}

const historySequenceCheck = `SELECT coalesce(pg_catalog.has_sequence_privilege(
	pg_catalog.pg_get_serial_sequence('rolegate.events', 'id'), 'USAGE'), false)`

// ErrHistoryOff is OpenHistory's error for a Keep of zero.
var ErrHistoryOff = errors.New("eviction history: keep is 0")

// OpenHistory checks that the control role can write, read and prune
// rolegate.events, and starts the writer, which prunes at once. The error
// says why the table cannot be used (missing: run sql/setup.sql; a missing
// privilege; the server unreachable); the caller then keeps its history in
// memory. The check runs once: a table created later is used after a restart.
func (c *Control) OpenHistory(ctx context.Context, opts HistoryOptions) (*History, error) {
	if opts.Keep <= 0 {
		return nil, ErrHistoryOff
	}
	if opts.Queue <= 0 {
		opts.Queue = historyQueue
	}
	if opts.Batch <= 0 {
		opts.Batch = historyBatch
	}
	if opts.PruneEvery <= 0 {
		opts.PruneEvery = historyPruneEvery
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if err := checkHistory(ctx, c.pool); err != nil {
		return nil, err
	}
	h := &History{pool: c.pool, opts: opts, log: opts.Logger, queue: make(chan HistoryEvent, opts.Queue),
		stop: make(chan struct{}), done: make(chan struct{})}
	h.ctx, h.cancel = context.WithCancel(context.Background())
	go h.run()
	return h, nil
}

func checkHistory(ctx context.Context, pool *pgxpool.Pool) error {
	ctx, cancel := context.WithTimeout(ctx, historyTimeout)
	defer cancel()
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("eviction history: %w", err)
	}
	defer conn.Release()
	for _, q := range historyCheck {
		if _, err := conn.Exec(ctx, q); err != nil {
			return fmt.Errorf("eviction history: table rolegate.events: %w", err)
		}
	}
	var seq bool
	if err := conn.QueryRow(ctx, historySequenceCheck).Scan(&seq); err != nil {
		return fmt.Errorf("eviction history: table rolegate.events: %w", err)
	}
	if !seq {
		return errors.New("eviction history: table rolegate.events: no USAGE on the sequence of its id column")
	}
	return nil
}

// Write queues e for the table. It never waits: when the queue is full (the
// server is slow or the table locked), e is dropped and counted.
func (h *History) Write(e HistoryEvent) {
	select {
	case h.queue <- e:
	default:
		h.dropped.Add(1)
	}
}

// Dropped is how many events Write could not queue.
func (h *History) Dropped() uint64 { return h.dropped.Load() }

// Failed is how many queued events were lost to inserts that failed.
func (h *History) Failed() uint64 { return h.failed.Load() }

// Close writes what is queued (for up to historyFlushTimeout), ends the
// writer and waits for it. It is safe to call twice. It does not close the
// control pool, which must outlive it.
func (h *History) Close() {
	h.closeOnce.Do(func() { close(h.stop) })
	t := time.NewTimer(historyFlushTimeout)
	select {
	case <-h.done:
	case <-t.C:
	}
	t.Stop()
	h.cancel()
	<-h.done
}

func (h *History) run() {
	defer close(h.done)
	h.prune()
	tick := time.NewTicker(h.opts.PruneEvery)
	defer tick.Stop()
	batch := make([]HistoryEvent, 0, h.opts.Batch)
	for {
		select {
		case <-h.stop:
			for {
				batch = h.take(batch[:0])
				if len(batch) == 0 {
					return
				}
				h.write(batch)
			}
		case <-tick.C:
			h.prune()
		case e := <-h.queue:
			h.write(h.take(append(batch[:0], e)))
		}
	}
}

// take adds queued events to batch, up to its capacity, without waiting.
func (h *History) take(batch []HistoryEvent) []HistoryEvent {
	for len(batch) < cap(batch) {
		select {
		case e := <-h.queue:
			batch = append(batch, e)
		default:
			return batch
		}
	}
	return batch
}

// write inserts batch in one round trip, all or nothing.
func (h *History) write(batch []HistoryEvent) {
	ctx, cancel := context.WithTimeout(h.ctx, historyTimeout)
	defer cancel()
	b := &pgx.Batch{}
	for _, e := range batch {
		b.Queue(historyInsert, historyArgs(e)...)
	}
	err := h.pool.SendBatch(ctx, b).Close()
	if err != nil {
		h.failed.Add(uint64(len(batch)))
		h.skippedFailWarns++
		h.skippedFailEvents += uint64(len(batch))
	}
	h.warn(err)
}

// warn logs a failed write, and drops since the last line, at most once per
// historyLogEvery, with counts of what the skipped lines would have said.
func (h *History) warn(err error) {
	dropped := h.dropped.Load()
	if (err == nil && dropped == h.warnedDropped) || time.Since(h.lastWarn) < historyLogEvery {
		return
	}
	h.lastWarn = time.Now()
	if dropped != h.warnedDropped {
		h.log.Warn("eviction history: queue full; events not written to rolegate.events",
			"dropped", dropped-h.warnedDropped, "dropped_total", dropped)
		h.warnedDropped = dropped
	}
	if err != nil {
		h.log.Warn("eviction history: write to rolegate.events failed", "events", h.skippedFailEvents,
			"failed_writes", h.skippedFailWarns, "err", err)
		h.skippedFailWarns, h.skippedFailEvents = 0, 0
	}
}

func historyArgs(e HistoryEvent) []any {
	var at any
	if !e.At.IsZero() {
		at = e.At
	}
	var pid any
	if e.VictimPID != 0 {
		pid = int64(e.VictimPID)
	}
	return []any{at, e.Instance, e.Kind, null(e.Policy), null(e.Scope), null(e.Role), null(e.Database), null(e.Client),
		pid, null(e.VictimRole), null(controlText(e.VictimApplicationName)), null(e.VictimClient),
		micros(e.VictimAge), micros(e.VictimIdle), e.ViaRolegate, null(e.Reason)}
}

// null is s, or NULL for "" (and for a name that is not UTF-8, which the
// control connection cannot send: see controlText).
func null(s string) any {
	if s == "" || controlText(s) != s {
		return nil
	}
	return s
}

func micros(d time.Duration) any {
	if d <= 0 {
		return nil
	}
	return d.Microseconds()
}

// Prune deletes the rows older than Keep and returns how many it deleted.
func (h *History) Prune(ctx context.Context) (int64, error) {
	tag, err := h.pool.Exec(ctx, `DELETE FROM rolegate.events WHERE at < now() - $1::int8 * interval '1 microsecond'`,
		h.opts.Keep.Microseconds())
	if err != nil {
		return 0, fmt.Errorf("eviction history: prune: %w", err)
	}
	return tag.RowsAffected(), nil
}

func (h *History) prune() {
	ctx, cancel := context.WithTimeout(h.ctx, historyTimeout)
	defer cancel()
	n, err := h.Prune(ctx)
	switch {
	case err != nil && h.ctx.Err() == nil:
		h.log.Warn("eviction history: prune failed", "err", err)
	case n > 0:
		h.log.Debug("eviction history: pruned", "rows", n, "keep", h.opts.Keep)
	}
}

// Recent returns up to limit events, newest first, every instance's.
func (h *History) Recent(ctx context.Context, limit int) ([]HistoryEvent, error) {
	rows, err := h.pool.Query(ctx, `SELECT at, coalesce(instance, ''), coalesce(kind, ''), coalesce(policy, ''),
	coalesce(scope, ''), coalesce(role, ''), coalesce(database, ''), coalesce(client, ''), coalesce(victim_pid, 0),
	coalesce(victim_role, ''), coalesce(victim_application_name, ''), coalesce(victim_client, ''),
	coalesce((extract(epoch FROM victim_age) * 1000000)::int8, 0),
	coalesce((extract(epoch FROM victim_idle) * 1000000)::int8, 0),
	coalesce(via_rolegate, false), coalesce(reason, '')
FROM rolegate.events ORDER BY at DESC, id DESC LIMIT $1`, limit)
	if err != nil {
		return nil, fmt.Errorf("eviction history: read: %w", err)
	}
	defer rows.Close()
	var out []HistoryEvent
	for rows.Next() {
		var (
			e         HistoryEvent
			pid       int32
			age, idle int64
		)
		if err := rows.Scan(&e.At, &e.Instance, &e.Kind, &e.Policy, &e.Scope, &e.Role, &e.Database, &e.Client, &pid,
			&e.VictimRole, &e.VictimApplicationName, &e.VictimClient, &age, &idle, &e.ViaRolegate, &e.Reason); err != nil {
			return nil, fmt.Errorf("eviction history: read: %w", err)
		}
		e.VictimPID = uint32(pid)
		e.VictimAge, e.VictimIdle = time.Duration(age)*time.Microsecond, time.Duration(idle)*time.Microsecond
		out = append(out, e)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("eviction history: read: %w", err)
	}
	return out, nil
}
