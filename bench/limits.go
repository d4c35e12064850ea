package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/internal/pgtest"
)

// The newest-wins benchmark (issue 4): the latency of a login that finds its
// role at the limit and evicts the oldest session, against a plain login
// through rolegate and against doing the same by hand on the server.
const (
	// limitsTarget is the rolegate instance of this test: the same binary
	// with [roles.lim_bench] policy = "newest-wins" and an info-level JSON
	// log, from which the server-53300 retries are counted.
	limitsTarget = "rolegate-limits"
	// limRole has CONNECTION LIMIT 1 on the server; limPlainRole has no
	// limit. Both log in to limDatabase with the same password.
	limRole      = "lim_bench"
	limPlainRole = "lim_plain"
	limDatabase  = "postgres"
	// limBatch is how many iterations (one timed login per row each) run
	// between two CPU checks; a batch during which other work used the CPU
	// is run again.
	limBatch = 25
	// limWarmup is how many unrecorded iterations come first.
	limWarmup = 5
	// limGoneTimeout bounds the wait for a closed session's backend to
	// leave the server.
	limGoneTimeout = 5 * time.Second
	// limFloorWaitMs is the timeout of the waiting form of
	// pg_terminate_backend in row (3b).
	limFloorWaitMs = 5000
	// limMaxFailures ends the test: something is broken, not slow.
	limMaxFailures = 30
	// limShown is how many failures and odd victim answers the report quotes.
	limShown = 5
	// serverFullMsg is the start of the message rolegate logs when the
	// server answers 53300 to a login it admitted, and it admits again.
	serverFullMsg = "server at its limit after admission"
)

// limitsConfig is appended to rolegate-limits' configuration. The limit
// itself is the server's: lim_bench's CONNECTION LIMIT 1.
const limitsConfig = `
[limits]
server_limits = true       # the default: lim_bench's CONNECTION LIMIT 1 is the limit
min_session_age = "0s"     # the default: any session may be evicted
limits_cache_ttl = "60s"   # the default

[roles.lim_bench]
policy = "newest-wins"
max_evictions = "off"      # the benchmark evicts in a loop on purpose: no thrash guard (default 60/min)
`

// limitKind is one row of the newest-wins table.
type limitKind int

const (
	limPlain           limitKind = iota // lim_plain through rolegate: no limit, no admission work
	limUnder                            // lim_bench through rolegate with no session held: admission, no eviction
	limNewest                           // lim_bench through rolegate with one session held: newest-wins evicts it
	limFloor                            // by hand, direct: pg_terminate_backend(pid), then the login retried on 53300
	limFloorWait                        // by hand, direct: pg_terminate_backend(pid, 5000), then the login
	limDirect                           // lim_plain directly on the server: what the by-hand rows start from
	limNewestElsewhere                  // lim_bench through rolegate with one session held that was opened directly
)

var limitKinds = []limitKind{limPlain, limUnder, limNewest, limNewestElsewhere, limFloor, limFloorWait, limDirect}

// name is the row's short name, for the progress log.
func (k limitKind) name() string {
	switch k {
	case limPlain:
		return "plain"
	case limUnder:
		return "under the limit"
	case limNewest:
		return "newest-wins"
	case limFloor:
		return "by hand"
	case limFloorWait:
		return "by hand, waiting"
	case limNewestElsewhere:
		return "newest-wins, victim opened directly"
	default:
		return "direct"
	}
}

// rowLabel is the row's name in the tables.
func (k limitKind) rowLabel() string {
	switch k {
	case limPlain:
		return "(1) plain login via rolegate (lim_plain, no limit)"
	case limUnder:
		return "(1b) lim_bench via rolegate, no session held"
	case limNewest:
		return "(2) newest-wins via rolegate, one lim_bench session held"
	case limFloor:
		return "(3) by hand, direct: pg_terminate_backend(pid), login retried on 53300"
	case limFloorWait:
		return fmt.Sprintf("(3b) by hand, direct: pg_terminate_backend(pid, %d), login", limFloorWaitMs)
	case limNewestElsewhere:
		return "(2e) newest-wins via rolegate, the held session opened directly"
	default:
		return "(4) plain login direct (lim_plain, no limit)"
	}
}

// limitsResult is the newest-wins test: every timed login per row, and what
// happened around them.
type limitsResult struct {
	took map[limitKind][]time.Duration
	// retried counts logins that met the server's 53300 after admission
	// and were retried: through rolegate, from rolegate's log ("server at
	// its limit after admission"); by hand, the benchmark's own retries.
	// retries counts the retries in all.
	retried, retries map[limitKind]int
	// failed counts failed timed logins in every batch, also in batches
	// that were run again; failures quotes the first few.
	failed   map[limitKind]int
	failures []string
	// evictions counts rolegate's "evicted" log lines of newest-wins logins;
	// told, the evicted sessions that received the FATAL 57P01 (rolegate's
	// own for (2), the server's for (2e)); notTold quotes what the others
	// got.
	evictions, told map[limitKind]int
	notTold         []string
	// logLines counts rolegate-limits' log lines by message over the
	// whole test, warm-up and repeated batches included; logWarnings
	// quotes its first warnings and errors.
	logLines    map[string]int
	logWarnings []string
	warnings    int
	batches     int
	// repeated counts batches run again; skewed, batches kept although
	// other work used the CPU during them.
	repeated, skewed int
}

// limBatchResult is one batch's share of limitsResult, merged only when the
// batch is kept.
type limBatchResult struct {
	took             map[limitKind][]time.Duration
	retried, retries map[limitKind]int
	evictions, told  map[limitKind]int
	notTold          []string
	// clients maps the client address of each timed login through
	// rolegate to its row, to attribute rolegate's log lines.
	clients map[string]limitKind
}

func newLimBatch() *limBatchResult {
	return &limBatchResult{
		took:      make(map[limitKind][]time.Duration),
		retried:   make(map[limitKind]int),
		retries:   make(map[limitKind]int),
		evictions: make(map[limitKind]int),
		told:      make(map[limitKind]int),
		clients:   make(map[string]limitKind),
	}
}

func (b *limBatchResult) add(k limitKind, d time.Duration, c *pgconn.PgConn) {
	b.took[k] = append(b.took[k], d)
	if c != nil {
		b.clients[c.Conn().LocalAddr().String()] = k
	}
}

// limRunner runs the iterations.
type limRunner struct {
	o                                     options
	rgBench, rgPlain, direct, directPlain *pgconn.Config
	// super is the superuser's session for the by-hand rows and for
	// watching pg_stat_activity.
	super   *pgconn.PgConn
	res     *limitsResult
	logFile string
	logOff  int64
	// held is the lim_bench session through rolegate that the next
	// newest-wins login evicts.
	held    *pgconn.PgConn
	heldPID int
}

// measureLimits runs the newest-wins test: it creates lim_bench and
// lim_plain, starts rolegate-limits, runs -limit-logins iterations and stops
// rolegate-limits again. otherPids are the other proxies, idle meanwhile.
func measureLimits(ctx context.Context, o options, c *pgtest.Cluster, bin, work string, ctl controlSetup,
	meter *cpuMeter, otherPids []int, r *report) error {
	if o.limitLogins == 0 {
		return nil
	}
	password := pgtest.RandomHex(12)
	for _, sql := range []string{
		fmt.Sprintf("create role %s login connection limit 1 password '%s'", limRole, password),
		fmt.Sprintf("create role %s login password '%s'", limPlainRole, password),
	} {
		if err := c.Exec(ctx, sql); err != nil {
			return fmt.Errorf("newest-wins: setting up the roles: %w", err)
		}
	}
	rg, err := startRolegate(ctx, bin, work, c.Addr(), ctl,
		rolegateInstance{name: limitsTarget, logLevel: "info", logFormat: "json", extraConfig: limitsConfig})
	if err != nil {
		return err
	}
	defer rg.stop(syscall.SIGINT)
	pids := append([]int{rg.pid}, otherPids...)

	lr := &limRunner{o: o, logFile: rg.logFile, res: &limitsResult{
		took:      make(map[limitKind][]time.Duration),
		retried:   make(map[limitKind]int),
		retries:   make(map[limitKind]int),
		failed:    make(map[limitKind]int),
		evictions: make(map[limitKind]int),
		told:      make(map[limitKind]int),
		logLines:  make(map[string]int),
	}}
	r.limits = lr.res
	for _, cf := range []struct {
		dst        **pgconn.Config
		role, host string
		port       int
	}{
		{&lr.rgBench, limRole, rg.host, rg.port},
		{&lr.rgPlain, limPlainRole, rg.host, rg.port},
		{&lr.direct, limRole, c.Host, c.Port},
		{&lr.directPlain, limPlainRole, c.Host, c.Port},
	} {
		if *cf.dst, err = sessionConfig(cf.role, password, limDatabase, cf.host, cf.port); err != nil {
			return fmt.Errorf("newest-wins: %w", err)
		}
	}
	if lr.super, err = pgconn.Connect(ctx, c.SuperDSN()); err != nil {
		return fmt.Errorf("newest-wins: superuser session: %w", err)
	}
	defer lr.closeAll()

	fail := func(err error) error {
		return fmt.Errorf("newest-wins: %w%s", err, logTail(rg.target))
	}
	if err := lr.openHeld(ctx); err != nil {
		return fail(err)
	}
	logf("newest-wins: %d unrecorded iterations", limWarmup)
	for range limWarmup {
		if err := lr.iteration(ctx, newLimBatch()); err != nil {
			return fail(err)
		}
	}
	lr.scanLog(newLimBatch())
	res := lr.res
	for done := 0; done < o.limitLogins; {
		n := min(limBatch, o.limitLogins-done)
		for attempt := 0; ; attempt++ {
			if err := waitQuiet(ctx, o.quietWait, meter, pids); err != nil {
				return err
			}
			before := meter.take(pids...)
			b := newLimBatch()
			for range n {
				if err := lr.iteration(ctx, b); err != nil {
					return fail(err)
				}
			}
			meter.settle()
			u := meter.take(pids...).since(before, 0)
			lr.scanLog(b)
			if u.other > skewedCores && attempt < o.repeats {
				logf("newest-wins: other work used %.2f cores during iterations %d–%d; running them again", u.other, done+1, done+n)
				res.repeated++
				continue
			}
			if u.other > skewedCores {
				res.skewed++
			}
			res.merge(b)
			break
		}
		done += n
		logf("newest-wins: %d/%d logins per row%s", done, o.limitLogins, res.progress())
	}
	return nil
}

// iteration times one login of every row. It starts and ends with lr.held, a
// lim_bench session through rolegate, and no other lim_bench session.
func (lr *limRunner) iteration(ctx context.Context, b *limBatchResult) error {
	var gone []int // backends of lim_bench to see leave before the next step

	// (2) newest-wins: the login evicts lr.held.
	gone = append(gone, lr.heldPID)
	n, d, err := timedLogin(ctx, lr.rgBench)
	if err != nil {
		if err := lr.fail(limNewest, err); err != nil {
			return err
		}
	} else {
		b.add(limNewest, d, n)
	}
	held := lr.held
	lr.held = nil
	checkVictim(ctx, b, limNewest, held, lr.heldPID)
	if n != nil {
		pid, err := backendPID(ctx, n)
		if err != nil {
			return fmt.Errorf("the session of a newest-wins login: %w", err)
		}
		gone = append(gone, pid)
	}

	// (1) plain: lim_plain, no limit.
	if p, d, err := timedLogin(ctx, lr.rgPlain); err != nil {
		if err := lr.fail(limPlain, err); err != nil {
			return err
		}
	} else {
		b.add(limPlain, d, p)
		closeConn(p)
	}

	// (4) lim_plain directly on the server.
	if p, d, err := timedLogin(ctx, lr.directPlain); err != nil {
		if err := lr.fail(limDirect, err); err != nil {
			return err
		}
	} else {
		b.took[limDirect] = append(b.took[limDirect], d)
		closeConn(p)
	}

	// (1b) lim_bench with no session held.
	closeConn(n)
	if err := lr.waitGone(ctx, gone...); err != nil {
		return err
	}
	if u, d, err := timedLogin(ctx, lr.rgBench); err != nil {
		if err := lr.fail(limUnder, err); err != nil {
			return err
		}
	} else {
		b.add(limUnder, d, u)
		pid, err := backendPID(ctx, u)
		if err != nil {
			return fmt.Errorf("the session of a login under the limit: %w", err)
		}
		closeConn(u)
		if err := lr.waitGone(ctx, pid); err != nil {
			return err
		}
	}

	// (3) and (3b) by hand, directly on the server.
	d0, err := connectRetry(ctx, lr.direct)
	if err != nil {
		return fmt.Errorf("direct %s session: %w", limRole, err)
	}
	gone = []int{int(d0.PID())}
	var d2 *pgconn.PgConn
	d1, d, retries, err := lr.terminateAndLogin(ctx, d0.PID(), 0)
	closeConn(d0)
	if err != nil {
		if err := lr.fail(limFloor, err); err != nil {
			return err
		}
	} else {
		b.took[limFloor] = append(b.took[limFloor], d)
		b.countRetries(limFloor, retries)
		gone = append(gone, int(d1.PID()))
		d2, d, retries, err = lr.terminateAndLogin(ctx, d1.PID(), limFloorWaitMs)
		closeConn(d1)
		if err != nil {
			if err := lr.fail(limFloorWait, err); err != nil {
				return err
			}
		} else {
			b.took[limFloorWait] = append(b.took[limFloorWait], d)
			b.countRetries(limFloorWait, retries)
		}
	}

	// (2e) newest-wins evicting the session (3b) opened directly; the new
	// session is the next iteration's held one.
	if d2 != nil {
		if err := lr.waitExited(ctx, gone...); err != nil {
			return err
		}
		pid2 := int(d2.PID())
		n, d, err := timedLogin(ctx, lr.rgBench)
		checkVictim(ctx, b, limNewestElsewhere, d2, pid2)
		gone = append(gone, pid2)
		if err != nil {
			if err := lr.fail(limNewestElsewhere, err); err != nil {
				return err
			}
		} else {
			b.add(limNewestElsewhere, d, n)
			pid, err := backendPID(ctx, n)
			if err != nil {
				closeConn(n)
				return fmt.Errorf("the session of a newest-wins login: %w", err)
			}
			lr.held, lr.heldPID = n, pid
			return lr.waitExited(ctx, gone...)
		}
	}
	if err := lr.waitGone(ctx, gone...); err != nil {
		return err
	}
	return lr.openHeld(ctx)
}

func (b *limBatchResult) countRetries(k limitKind, retries int) {
	if retries > 0 {
		b.retried[k]++
		b.retries[k] += retries
	}
}

// timedLogin logs in once and returns the session and the time from the
// dial to ReadyForQuery.
func timedLogin(ctx context.Context, cfg *pgconn.Config) (*pgconn.PgConn, time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, loginTimeout)
	defer cancel()
	start := time.Now()
	c, err := pgconn.ConnectConfig(ctx, cfg)
	return c, time.Since(start), err
}

// is53300 reports whether err is the server's "too many connections".
func is53300(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "53300"
}

// connectRetry logs in, retrying at once on 53300, untimed.
func connectRetry(ctx context.Context, cfg *pgconn.Config) (*pgconn.PgConn, error) {
	ctx, cancel := context.WithTimeout(ctx, loginTimeout)
	defer cancel()
	for {
		c, err := pgconn.ConnectConfig(ctx, cfg)
		if !is53300(err) || ctx.Err() != nil {
			return c, err
		}
	}
}

// terminateAndLogin is the by-hand floor: the superuser's session, already
// open, runs pg_terminate_backend(pid) (timeoutMs 0) or
// pg_terminate_backend(pid, timeoutMs), and then lim_bench logs in directly,
// at once again after each 53300. It returns the new session, the time from
// sending the terminate to the login's ReadyForQuery, and the retries.
func (lr *limRunner) terminateAndLogin(ctx context.Context, pid uint32, timeoutMs int) (*pgconn.PgConn, time.Duration, int, error) {
	ctx, cancel := context.WithTimeout(ctx, loginTimeout+limFloorWaitMs*time.Millisecond)
	defer cancel()
	sql := fmt.Sprintf("select pg_terminate_backend(%d)", pid)
	if timeoutMs > 0 {
		sql = fmt.Sprintf("select pg_terminate_backend(%d, %d)", pid, timeoutMs)
	}
	start := time.Now()
	ok, err := queryBool(ctx, lr.super, sql)
	if err != nil {
		return nil, 0, 0, fmt.Errorf("%s: %w", sql, err)
	}
	for retries := 0; ; retries++ {
		c, err := pgconn.ConnectConfig(ctx, lr.direct)
		if is53300(err) && ctx.Err() == nil {
			continue
		}
		took := time.Since(start)
		if err != nil {
			return nil, 0, retries, fmt.Errorf("login after %s (%d retries): %w", sql, retries, err)
		}
		if !ok {
			closeConn(c)
			return nil, 0, retries, fmt.Errorf("%s returned false", sql)
		}
		return c, took, retries, nil
	}
}

// queryValue runs sql, which returns one value, in text.
func queryValue(ctx context.Context, c *pgconn.PgConn, sql string) (string, error) {
	res, err := c.Exec(ctx, sql).ReadAll()
	if err != nil {
		return "", err
	}
	if len(res) != 1 || len(res[0].Rows) != 1 || len(res[0].Rows[0]) != 1 {
		return "", fmt.Errorf("%s: unexpected result", sql)
	}
	return string(res[0].Rows[0][0]), nil
}

// queryBool runs sql, which returns one boolean.
func queryBool(ctx context.Context, c *pgconn.PgConn, sql string) (bool, error) {
	v, err := queryValue(ctx, c, sql)
	return v == "t", err
}

// queryInt runs sql, which returns one integer.
func queryInt(ctx context.Context, c *pgconn.PgConn, sql string) (int, error) {
	v, err := queryValue(ctx, c, sql)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(v)
}

// backendPID asks a session for its server backend's pid: through rolegate
// the client's BackendKeyData holds rolegate's own key, not the server's.
func backendPID(ctx context.Context, c *pgconn.PgConn) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, loginTimeout)
	defer cancel()
	return queryInt(ctx, c, "select pg_backend_pid()")
}

// closeConn ends a session (Terminate) and ignores errors: an evicted or
// terminated session is closed already.
func closeConn(c *pgconn.PgConn) {
	if c == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = c.Close(ctx)
}

// openHeld opens the lim_bench session through rolegate that the next
// newest-wins login evicts; there must be no other lim_bench session.
func (lr *limRunner) openHeld(ctx context.Context) error {
	c, err := connectRetry(ctx, lr.rgBench)
	if err != nil {
		return fmt.Errorf("opening the held %s session through rolegate: %w", limRole, err)
	}
	pid, err := backendPID(ctx, c)
	if err != nil {
		closeConn(c)
		return fmt.Errorf("the held %s session: %w", limRole, err)
	}
	lr.held, lr.heldPID = c, pid
	return nil
}

// checkVictim reads what an evicted session got, expecting a FATAL 57P01:
// rolegate's own for a session through rolegate (row limNewest), the
// server's for one opened directly (limNewestElsewhere); then it closes the
// session.
func checkVictim(ctx context.Context, b *limBatchResult, k limitKind, victim *pgconn.PgConn, pid int) {
	if victim == nil {
		return
	}
	defer closeConn(victim)
	rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	code, msg := "", ""
	for range 5 {
		m, err := victim.ReceiveMessage(rctx)
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) {
			code, msg = pgErr.Code, pgErr.Message
			break
		}
		if err != nil {
			msg = err.Error()
			break
		}
		if e, ok := m.(*pgproto3.ErrorResponse); ok {
			code, msg = e.Code, e.Message
			break
		}
	}
	if code == "57P01" && (k != limNewest || strings.Contains(msg, "rolegate evicted this session")) {
		b.told[k]++
		return
	}
	if len(b.notTold) < limShown {
		b.notTold = append(b.notTold, fmt.Sprintf("%s, pid %d: %s %s", k.name(), pid, code, msg))
	}
}

// waitGone returns once pg_stat_activity shows no lim_bench session and each
// of pids has exited (kill(pid, 0) finds no process: the postmaster has
// reaped it, so it has left the server's process array and its slot is free).
func (lr *limRunner) waitGone(ctx context.Context, pids ...int) error {
	deadline := time.Now().Add(limGoneTimeout)
	sql := fmt.Sprintf("select pid from pg_stat_activity where usename = '%s'", limRole)
	for {
		res, err := lr.super.Exec(ctx, sql).ReadAll()
		if err != nil {
			return fmt.Errorf("watching pg_stat_activity: %w", err)
		}
		var alive []string
		if len(res) == 1 {
			for _, row := range res[0].Rows {
				alive = append(alive, string(row[0]))
				if pid, err := strconv.Atoi(string(row[0])); err == nil && !slices.Contains(pids, pid) {
					pids = append(pids, pid)
				}
			}
		}
		for _, pid := range pids {
			if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
				alive = append(alive, strconv.Itoa(pid))
			}
		}
		if len(alive) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s backends %s still there %v after their sessions were closed", limRole, strings.Join(alive, ", "), limGoneTimeout)
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-time.After(time.Millisecond):
		}
	}
}

// waitExited returns once each of pids has exited.
func (lr *limRunner) waitExited(ctx context.Context, pids ...int) error {
	deadline := time.Now().Add(limGoneTimeout)
	for {
		var alive []string
		for _, pid := range pids {
			if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
				alive = append(alive, strconv.Itoa(pid))
			}
		}
		if len(alive) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s backends %s still there %v after they were terminated or closed", limRole, strings.Join(alive, ", "), limGoneTimeout)
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-time.After(time.Millisecond):
		}
	}
}

// fail counts a failed timed login, and ends the test after too many.
func (lr *limRunner) fail(k limitKind, err error) error {
	res := lr.res
	res.failed[k]++
	if len(res.failures) < limShown {
		res.failures = append(res.failures, fmt.Sprintf("%s: %v", k.name(), err))
	}
	total := 0
	for _, n := range res.failed {
		total += n
	}
	if total > limMaxFailures {
		return fmt.Errorf("%d logins failed; the first: %s", total, strings.Join(res.failures, "; "))
	}
	return nil
}

func (lr *limRunner) closeAll() {
	closeConn(lr.held)
	lr.held = nil
	closeConn(lr.super)
}

// logLine is what scanLog reads from rolegate's JSON log.
type logLine struct {
	Level  string `json:"level"`
	Msg    string `json:"msg"`
	Client string `json:"client"`
}

// logTally counts a rolegate's JSON log lines by message, and its warnings
// and errors, quoting the first few.
type logTally struct {
	lines    map[string]int
	warnings int
	quoted   []string
	most     int // how many warnings to quote
}

// add counts one raw log line and returns it decoded; ok is false for a
// blank line, a gctrace line (gc.go reads those) and one that is not JSON
// (counted as such).
func (t *logTally) add(raw []byte) (l logLine, ok bool) {
	if len(bytes.TrimSpace(raw)) == 0 || gctraceLine.Match(raw) {
		return l, false
	}
	if err := json.Unmarshal(raw, &l); err != nil {
		t.lines["(not JSON)"]++
		return l, false
	}
	msg := l.Msg
	if strings.HasPrefix(msg, serverFullMsg) {
		msg = serverFullMsg
	}
	t.lines[msg]++
	if l.Level == "WARN" || l.Level == "ERROR" {
		t.warnings++
		if len(t.quoted) < t.most {
			t.quoted = append(t.quoted, string(raw))
		}
	}
	return l, true
}

// scanLog reads what rolegate-limits logged since the last call: it counts
// the lines by message and attributes the retries and evictions to b's
// logins by their client address.
func (lr *limRunner) scanLog(b *limBatchResult) {
	f, err := os.Open(lr.logFile)
	if err != nil {
		return
	}
	defer f.Close()
	if _, err := f.Seek(lr.logOff, io.SeekStart); err != nil {
		return
	}
	data, err := io.ReadAll(f)
	if err != nil {
		return
	}
	end := bytes.LastIndexByte(data, '\n') + 1 // a line being written waits for the next call
	lr.logOff += int64(end)
	res := lr.res
	retried := make(map[string]bool)
	tally := logTally{lines: res.logLines, warnings: res.warnings, quoted: res.logWarnings, most: limShown}
	defer func() { res.warnings, res.logWarnings = tally.warnings, tally.quoted }()
	for _, raw := range bytes.Split(data[:end], []byte("\n")) {
		l, ok := tally.add(raw)
		if !ok {
			continue
		}
		k, ok := b.clients[l.Client]
		if !ok {
			continue
		}
		switch {
		case strings.HasPrefix(l.Msg, serverFullMsg):
			b.retries[k]++
			if !retried[l.Client] {
				retried[l.Client] = true
				b.retried[k]++
			}
		case l.Msg == "evicted":
			b.evictions[k]++
		}
	}
}

// merge adds a kept batch.
func (res *limitsResult) merge(b *limBatchResult) {
	for k, xs := range b.took {
		res.took[k] = append(res.took[k], xs...)
	}
	for k, n := range b.retried {
		res.retried[k] += n
	}
	for k, n := range b.retries {
		res.retries[k] += n
	}
	for k, n := range b.evictions {
		res.evictions[k] += n
	}
	for k, n := range b.told {
		res.told[k] += n
	}
	for _, s := range b.notTold {
		if len(res.notTold) < limShown {
			res.notTold = append(res.notTold, s)
		}
	}
	res.batches++
}

// progress is the running medians, for the log.
func (res *limitsResult) progress() string {
	s := ""
	for _, k := range limitKinds {
		s += fmt.Sprintf("; %s %s", k.name(), fmtMs(percentile(res.took[k], 50)))
	}
	return s
}

func (res *limitsResult) p(k limitKind, q float64) time.Duration { return percentile(res.took[k], q) }

// rows is the table, header first.
func (res *limitsResult) rows() [][]string {
	rows := [][]string{{"Login", "logins", "median", "p99", "over (1) at the median", "over (1) at p99", "needed the 53300 retry", "failed"}}
	for _, k := range limitKinds {
		row := []string{k.rowLabel(), strconv.Itoa(len(res.took[k])), fmtMs(res.p(k, 50)), fmtMs(res.p(k, 99)), "–", "–", "", strconv.Itoa(res.failed[k])}
		if k != limPlain {
			row[4] = fmtAddedMs(res.p(k, 50) - res.p(limPlain, 50))
			row[5] = fmtAddedMs(res.p(k, 99) - res.p(limPlain, 99))
		}
		row[6] = strconv.Itoa(res.retried[k])
		if res.retries[k] != res.retried[k] {
			row[6] += fmt.Sprintf(" (%d retries)", res.retries[k])
		}
		rows = append(rows, row)
	}
	return rows
}

// Issue 4's targets: a newest-wins login at most this much slower than a
// plain one.
const (
	limGoalMedian = 5 * time.Millisecond
	limGoalP99    = 30 * time.Millisecond
)

// verdicts compares with issue 4's targets and the floor.
func (res *limitsResult) verdicts() []string {
	met := func(d, goal time.Duration) string {
		if d <= goal {
			return "met"
		}
		return "MISSED"
	}
	add50 := res.p(limNewest, 50) - res.p(limPlain, 50)
	add99 := res.p(limNewest, 99) - res.p(limPlain, 99)
	addE50 := res.p(limNewestElsewhere, 50) - res.p(limPlain, 50)
	addE99 := res.p(limNewestElsewhere, 99) - res.p(limPlain, 99)
	ratio := func(k limitKind, q float64) string {
		if res.p(k, q) == 0 {
			return "?"
		}
		return fmt.Sprintf("%.2f×", float64(res.p(limNewest, q))/float64(res.p(k, q)))
	}
	nw := len(res.took[limNewest])
	lines := []string{
		fmt.Sprintf("newest-wins login at the limit: %s over a plain login at the median (target ≤ +%v: %s), %s at p99 (target ≤ +%v: %s)",
			fmtAddedMs(add50), limGoalMedian, met(add50, limGoalMedian), fmtAddedMs(add99), limGoalP99, met(add99, limGoalP99)),
		fmt.Sprintf("newest-wins against the by-hand floor (3): %s at the median, %s at p99; against pg_terminate_backend(pid, %d) and a login (3b): %s and %s",
			ratio(limFloor, 50), ratio(limFloor, 99), limFloorWaitMs, ratio(limFloorWait, 50), ratio(limFloorWait, 99)),
		fmt.Sprintf("of that, admission without eviction (1b over 1): %s at the median, %s at p99; eviction (2 over 1b): %s and %s",
			fmtAddedMs(res.p(limUnder, 50)-res.p(limPlain, 50)), fmtAddedMs(res.p(limUnder, 99)-res.p(limPlain, 99)),
			fmtAddedMs(res.p(limNewest, 50)-res.p(limUnder, 50)), fmtAddedMs(res.p(limNewest, 99)-res.p(limUnder, 99))),
		fmt.Sprintf("by hand, terminating and logging in (3) costs %s at the median and %s at p99 over a plain direct login (4), against rolegate's %s and %s (2 over 1)",
			fmtAddedMs(res.p(limFloor, 50)-res.p(limDirect, 50)), fmtAddedMs(res.p(limFloor, 99)-res.p(limDirect, 99)), fmtAddedMs(add50), fmtAddedMs(add99)),
		fmt.Sprintf("newest-wins logins (2): %d kept, %d failed (in all batches), %d needed the server-53300 retry (rolegate's log: %q); %d evictions logged for them; %d of the evicted sessions received rolegate's FATAL 57P01",
			nw, res.failed[limNewest], res.retried[limNewest], serverFullMsg, res.evictions[limNewest], res.told[limNewest]),
		fmt.Sprintf("newest-wins evicting a session opened directly (2e), which rolegate terminates with pg_terminate_backend(pid, 5000): %s over a plain login at the median (%s against the same target), %s at p99 (%s); %d kept, %d failed, %d needed the server-53300 retry, %d evictions logged, %d victims received the server's FATAL 57P01",
			fmtAddedMs(addE50), met(addE50, limGoalMedian), fmtAddedMs(addE99), met(addE99, limGoalP99),
			len(res.took[limNewestElsewhere]), res.failed[limNewestElsewhere], res.retried[limNewestElsewhere], res.evictions[limNewestElsewhere], res.told[limNewestElsewhere]),
	}
	if len(res.notTold) > 0 {
		lines = append(lines, "evicted sessions without rolegate's 57P01: "+strings.Join(res.notTold, "; "))
	}
	if len(res.failures) > 0 {
		lines = append(lines, "failed logins: "+strings.Join(res.failures, "; "))
	}
	return lines
}

// logSummary says what rolegate-limits logged.
func (res *limitsResult) logSummary() string {
	var parts []string
	for _, msg := range sortedKeys(res.logLines) {
		parts = append(parts, fmt.Sprintf("%q %d", msg, res.logLines[msg]))
	}
	s := fmt.Sprintf("%s logged (warm-up and repeated batches included): %s; %d warnings or errors", limitsTarget, strings.Join(parts, ", "), res.warnings)
	if len(res.logWarnings) > 0 {
		s += ": " + strings.Join(res.logWarnings, " | ")
	}
	return s
}

// sortedKeys are m's keys, the largest count first, then by name.
func sortedKeys(m map[string]int) []string {
	keys := slices.Collect(maps.Keys(m))
	slices.SortFunc(keys, func(a, b string) int {
		if c := cmp.Compare(m[b], m[a]); c != 0 {
			return c
		}
		return strings.Compare(a, b)
	})
	return keys
}

// skewSummary says how much other work got in the way.
func (res *limitsResult) skewSummary(repeats int) string {
	line := fmt.Sprintf("Newest-wins: %d of %d batches of up to %d iterations were run again because other processes used more than %.2f cores during them", res.repeated, res.batches+res.repeated, limBatch, skewedCores)
	if res.skewed > 0 {
		line += fmt.Sprintf("; %d of the batches kept were still skewed after %d repeats", res.skewed, repeats)
	}
	return line + "."
}

// limitsSettings describes the test in one line.
func limitsSettings(o options) string {
	return fmt.Sprintf("newest-wins: %d iterations (after %d unrecorded), each timing one login per row in the order (2), (1), (4), (1b), (3), (3b), (2e), in batches of up to %d; pgx pgconn.Connect, SCRAM, sslmode=disable, dial to ReadyForQuery; role %s (CONNECTION LIMIT 1) and %s (no limit), database %s",
		o.limitLogins, limWarmup, limBatch, limRole, limPlainRole, limDatabase)
}

// limitsSetupLine says how rolegate-limits was set up.
const limitsSetupLine = limitsTarget + " (the newest-wins test only): the same binary and control connection, with [limits] server_limits = true, min_session_age = \"0s\" (defaults), [roles.lim_bench] policy = \"newest-wins\", max_evictions = \"off\", [control] max_conns = 4, and [log] level = \"info\", format = \"json\" (to attribute its retries and evictions to the timed logins)"

// printLimits writes the newest-wins section as text.
func (r *report) printLimits(w io.Writer) {
	res := r.limits
	fmt.Fprintf(w, "\nNewest-wins at the limit (issue 4), dial to ReadyForQuery, %d iterations\n\n", r.opts.limitLogins)
	printTable(w, res.rows())
	fmt.Fprintf(w, "\n%s\n", res.skewSummary(r.opts.repeats))
	fmt.Fprintf(w, "%s\n", res.logSummary())
}

// markdownLimits writes the newest-wins section as Markdown.
func (r *report) markdownLimits(w io.Writer) {
	res := r.limits
	fmt.Fprintf(w, "\nNewest-wins at the limit (issue 4), from the dial to ReadyForQuery, %d iterations, one timed login per row each:\n\n", r.opts.limitLogins)
	mdTable(w, res.rows())
	fmt.Fprintf(w, "\n%s\n\n%s\n", res.skewSummary(r.opts.repeats), res.logSummary())
}
