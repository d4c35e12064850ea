package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"golang.org/x/sys/unix"

	"github.com/rolegate/rolegate/internal/pgtest"
)

// The login storm (issue 11, item 4): -storm-logins SCRAM logins of one role
// with a limit of -storm-limit, all started at once, through a rolegate of
// its own per policy (reject, wait, newest-wins), against the same storm
// straight at the server for the role with CONNECTION LIMIT -storm-limit.
const (
	// stormRole is the role of every storm login, on stormDatabase. It has
	// CONNECTION LIMIT -storm-limit for the direct storm and none for the
	// storms through rolegate, whose [roles.storm_bench] max_sessions is then
	// the only limit, so the server's count of the role's sessions shows
	// rolegate's enforcement and nothing else.
	stormRole     = "storm_bench"
	stormDatabase = "postgres"
	// stormSampleEvery is how often the superuser's session counts the
	// role's sessions in pg_stat_activity during a storm.
	stormSampleEvery = 20 * time.Millisecond
	// stormHealthEvery is how often rolegate's /healthz is asked during a
	// storm; stormHealthTimeout bounds one request.
	stormHealthEvery   = 50 * time.Millisecond
	stormHealthTimeout = 10 * time.Second
	// stormGoneTimeout bounds the wait, after a storm, for the role's
	// sessions to leave the server.
	stormGoneTimeout = 60 * time.Second
	// stormBoundSlack is how much longer than the wait policy's
	// wait_timeout any storm login may take to be answered before it counts
	// as a hang.
	stormBoundSlack = 2 * time.Minute
	// stormShown is how many failures and warnings the report quotes.
	stormShown = 5
	// The targets: rolegate's peak RSS, /healthz's latency, and the
	// time to answer every login under reject against the direct storm.
	stormRSSGoalKiB = 256 << 10
	stormHealthGoal = 100 * time.Millisecond
	stormRatioGoal  = 1.5
)

// stormKind is one storm: direct, or through rolegate under one policy.
type stormKind int

const (
	stormDirect stormKind = iota
	stormReject
	stormWait
	stormNewest
)

// stormKinds is the order the storms run in: the direct one first, the
// baseline of the others.
var stormKinds = []stormKind{stormDirect, stormReject, stormWait, stormNewest}

// policy is [roles.storm_bench] policy; empty for the direct storm.
func (k stormKind) policy() string {
	switch k {
	case stormReject:
		return "reject"
	case stormWait:
		return "wait"
	case stormNewest:
		return "newest-wins"
	default:
		return ""
	}
}

// target is the name of the rolegate instance of the storm, "direct" for the
// direct one.
func (k stormKind) target() string {
	if k == stormDirect {
		return "direct"
	}
	return "rolegate-storm-" + k.policy()
}

// label is the storm's row name.
func (k stormKind) label() string {
	if k == stormDirect {
		return "direct, CONNECTION LIMIT (the server's 53300)"
	}
	return "rolegate, " + k.policy()
}

// stormOptions are the storm's settings, from the flags.
type stormOptions struct {
	logins, limit int
	hold          time.Duration
}

// waitTimeout is the wait policy's wait_timeout: four times what the whole
// storm needs with every slot busy (logins × (hold + 10 ms for the login and
// the close) / limit), and at least a minute, so that on a slow machine the
// wait policy still admits every login in the end; whole seconds.
func (so stormOptions) waitTimeout() time.Duration {
	need := time.Duration(so.logins) * (so.hold + 10*time.Millisecond) / time.Duration(max(so.limit, 1))
	return max(time.Minute, (4 * need).Round(time.Second))
}

// bound is how long any storm login may take to be answered before it
// counts as a hang.
func (so stormOptions) bound() time.Duration { return so.waitTimeout() + stormBoundSlack }

// stormRun is one storm's outcome.
type stormRun struct {
	kind stormKind
	// name is the storm's label, quoted in its failures.
	name   string
	logins int
	// admitted logins reached ReadyForQuery; evicted of them received a
	// FATAL 57P01 while they held their session, and evictedAtLogin logins
	// received it before ReadyForQuery. refused got 53300, counted by
	// message in refusedBy. failed got anything else (an error, or no
	// answer within the bound: hung of them), at the login or while
	// holding the session; failures quotes the first few.
	admitted, evicted, evictedAtLogin, refused, failed, hung int
	refusedBy                                                map[string]int
	failures                                                 []string
	// answers are the times from the storm's start to each login's answer
	// (ReadyForQuery, an error, or a failure), hangs left out; last is the
	// latest of them.
	answers []time.Duration
	last    time.Duration
	sessionSamples
	// hwmKiB is rolegate's VmHWM at the end of the storm (-1: unknown; 0:
	// the direct storm).
	hwmKiB int64
	// health are the latencies of rolegate's /healthz during the storm;
	// healthFailed counts requests that failed or did not answer 200, and
	// healthErr quotes the first.
	health       []time.Duration
	healthFailed int
	healthErr    string
	// cpu is where the machine's CPU went during the storm (the client is
	// this benchmark process).
	cpu cpuUse
	// logLines counts rolegate's log lines by message; warnings counts its
	// warnings and errors and logWarnings quotes the first few.
	logLines    map[string]int
	warnings    int
	logWarnings []string
}

func newStormRun(k stormKind, logins int) *stormRun {
	run := newLoginTally(k.label(), logins)
	run.kind = k
	return run
}

// newLoginTally is a stormRun that counts logins under name: a storm's, or
// a share of a cluster storm's (cluster.go).
func newLoginTally(name string, logins int) *stormRun {
	return &stormRun{name: name, logins: logins, refusedBy: make(map[string]int), logLines: make(map[string]int), hwmKiB: -1}
}

// sessionSamples is what the sampling of the role's sessions found:
// serverMax is the most sessions of the role pg_stat_activity showed in
// samples taken every stormSampleEvery; sampleErr is the first failed
// sample, which ends the sampling.
type sessionSamples struct {
	serverMax, samples int
	sampleErr          string
}

// stormResult is the storm test.
type stormResult struct {
	opts stormOptions
	stormHost
	runs []*stormRun
}

// stormHost is what a storm found of the machine and the server: nofile is
// RLIMIT_NOFILE after raising it (rolegate inherits it); somaxconn the
// kernel's cap on a listen backlog; maxConnections the server's
// max_connections.
type stormHost struct {
	nofile         uint64
	somaxconn      string
	maxConnections string
}

// prepareStorm readies the machine and the server for logins clients at
// once: it raises the open file limit (one descriptor per client here, and
// in rolegate, which inherits the limit, one per client and one per server
// connection), opens a superuser session (the caller closes it) and reads
// max_connections. what names the storm in errors, flag the flag of its
// logins.
func prepareStorm(ctx context.Context, c *pgtest.Cluster, what, flag string, logins int) (stormHost, *pgconn.PgConn, int, error) {
	h := stormHost{somaxconn: strings.TrimSpace(readFile("/proc/sys/net/core/somaxconn"))}
	var err error
	if h.nofile, err = raiseNoFile(uint64(2*logins + 1024)); err != nil {
		return h, nil, 0, fmt.Errorf("%s: %w", what, err)
	}
	if h.nofile < uint64(logins+256) {
		return h, nil, 0, fmt.Errorf("%s: the open file limit is %d, too low for %d clients; raise it (ulimit -n %d) or lower %s", what, h.nofile, logins, 2*logins+1024, flag)
	}
	super, err := pgconn.Connect(ctx, c.SuperDSN())
	if err != nil {
		return h, nil, 0, fmt.Errorf("%s: superuser session: %w", what, err)
	}
	maxConns, err := queryInt(ctx, super, "show max_connections")
	if err != nil {
		closeConn(super)
		return h, nil, 0, fmt.Errorf("%s: max_connections: %w", what, err)
	}
	h.maxConnections = strconv.Itoa(maxConns)
	return h, super, maxConns, nil
}

// createStormRole creates the storm's role with the server connection limit
// given and a random password, which it returns.
func createStormRole(ctx context.Context, c *pgtest.Cluster, what string, limit int) (string, error) {
	password := pgtest.RandomHex(12)
	if err := c.Exec(ctx, fmt.Sprintf("create role %s login connection limit %d password '%s'", stormRole, limit, password)); err != nil {
		return "", fmt.Errorf("%s: creating %s: %w", what, stormRole, err)
	}
	return password, nil
}

// run is the storm of kind k, nil when it did not run.
func (res *stormResult) run(k stormKind) *stormRun {
	for _, r := range res.runs {
		if r.kind == k {
			return r
		}
	}
	return nil
}

// measureStorm runs the storm test: it creates storm_bench, raises the open
// file limit, runs the direct storm and then one storm per policy, each
// through a rolegate of its own that it stops afterwards. otherPids are the
// other proxies, idle meanwhile.
func measureStorm(ctx context.Context, o options, c *pgtest.Cluster, bin, work string, ctl controlSetup,
	meter *cpuMeter, otherPids []int, r *report) error {
	if o.stormLogins == 0 {
		return nil
	}
	so := stormOptions{logins: o.stormLogins, limit: o.stormLimit, hold: o.stormHold}
	res := &stormResult{opts: so}
	r.storm = res
	host, super, maxConns, err := prepareStorm(ctx, c, "storm", "-storm-logins", so.logins)
	res.stormHost = host
	if err != nil {
		return err
	}
	defer closeConn(super)
	// The limit's sessions, rolegate's control pool, the sampler and this
	// superuser session, and the other proxies' control connections.
	if need := so.limit + 4 + 8; maxConns < need {
		return fmt.Errorf("storm: the server's max_connections is %d; the storm needs at least %d (the limit %d, rolegate's control pool, the benchmark's sessions)", maxConns, need, so.limit)
	}

	password, err := createStormRole(ctx, c, "storm", so.limit)
	if err != nil {
		return err
	}
	pids := otherPids
	for _, k := range stormKinds {
		if k == stormReject {
			// From here on rolegate's max_sessions is the only limit.
			if err := c.Exec(ctx, fmt.Sprintf("alter role %s connection limit -1", stormRole)); err != nil {
				return fmt.Errorf("storm: %w", err)
			}
		}
		if err := waitQuiet(ctx, o.quietWait, meter, pids); err != nil {
			return err
		}
		run, err := stormOnce(ctx, so, c, bin, work, ctl, password, super, meter, pids, k)
		if run != nil {
			res.runs = append(res.runs, run)
		}
		if err != nil {
			return fmt.Errorf("storm %s: %w", k.label(), err)
		}
		logf("storm %s: %s", k.label(), run.describe(so))
		if err := waitRoleGone(ctx, super, stormRole, stormGoneTimeout); err != nil {
			return fmt.Errorf("storm %s: %w", k.label(), err)
		}
	}
	return nil
}

// raiseNoFile raises RLIMIT_NOFILE's soft limit to its hard limit, and the
// hard limit to want first where it is lower (which needs root); it returns
// the soft limit in force.
func raiseNoFile(want uint64) (uint64, error) {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("getrlimit(RLIMIT_NOFILE): %w", err)
	}
	if lim.Max < want {
		raised := unix.Rlimit{Cur: want, Max: want}
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &raised); err == nil {
			return want, nil
		}
		// Not root: the hard limit stays; take what it allows.
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
			return 0, fmt.Errorf("setrlimit(RLIMIT_NOFILE, %d): %w", lim.Cur, err)
		}
	}
	return lim.Cur, nil
}

// stormConfig is appended to the configuration of the rolegate of a storm
// under policy.
func stormConfig(so stormOptions, policy string) string {
	s := fmt.Sprintf(`
[roles.%s]
max_sessions = %d
policy = %q
max_evictions = "off"   # the storm measures eviction under load, not the thrash guard (default 60/min)
`, stormRole, so.limit, policy)
	if policy == "wait" {
		s += fmt.Sprintf("wait_timeout = %q   # logins × (hold + 10 ms) / limit, four times, at least 1m\n", so.waitTimeout().String())
	}
	return s
}

// stormOnce runs one storm: for a rolegate storm it starts the instance
// first and stops it afterwards.
func stormOnce(ctx context.Context, so stormOptions, c *pgtest.Cluster, bin, work string, ctl controlSetup,
	password string, super *pgconn.PgConn, meter *cpuMeter, otherPids []int, k stormKind) (*stormRun, error) {
	host, port := c.Host, c.Port
	var rg *daemon
	adminAddr := ""
	if k != stormDirect {
		adminPort, err := pgtest.FreePort()
		if err != nil {
			return nil, err
		}
		adminAddr = net.JoinHostPort("127.0.0.1", strconv.Itoa(adminPort))
		rg, err = startRolegate(ctx, bin, work, c.Addr(), ctl, rolegateInstance{
			name: k.target(), logLevel: "info", logFormat: "json",
			extraConfig: stormConfig(so, k.policy()), adminHTTP: adminAddr,
		})
		if err != nil {
			return nil, err
		}
		defer rg.stop(syscall.SIGINT)
		if err := waitHealthy(ctx, adminAddr); err != nil {
			return nil, fmt.Errorf("%w%s", err, logTail(rg.target))
		}
		host, port = rg.host, rg.port
	}
	cfg, err := sessionConfig(stormRole, password, stormDatabase, host, port)
	if err != nil {
		return nil, err
	}
	pids := otherPids
	if rg != nil {
		pids = append([]int{rg.pid}, otherPids...)
	}
	logf("storm %s: %d logins at once, limit %d", k.label(), so.logins, so.limit)
	run := newStormRun(k, so.logins)
	before := meter.take(pids...)
	if err := storm(ctx, so, cfg, super, adminAddr, run); err != nil {
		return run, err
	}
	meter.settle()
	// The client is this process, which the meter counts as itself and
	// leaves out of the other work.
	after := meter.take(pids...)
	run.cpu = after.since(before, 0)
	if wall := after.at.Sub(before.at).Seconds(); wall > 0 && after.selfOK && before.selfOK {
		run.cpu.client = float64(after.self-before.self) / clockTicks / wall
	}
	if rg != nil {
		run.hwmKiB = kibField(readFile(fmt.Sprintf("/proc/%d/status", rg.pid)), "VmHWM")
		run.scanLog(rg.logFile)
	}
	return run, nil
}

// waitHealthy returns once /healthz at addr answers 200.
func waitHealthy(ctx context.Context, addr string) error {
	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(listenTimeout)
	for {
		_, err := getHealth(ctx, client, addr)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("rolegate's /healthz at %s: %w", addr, err)
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// getHealth asks /healthz once and returns how long the answer took.
func getHealth(ctx context.Context, client *http.Client, addr string) (time.Duration, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/healthz", nil)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	took := time.Since(start)
	if resp.StatusCode != http.StatusOK {
		return took, fmt.Errorf("/healthz: %s", resp.Status)
	}
	return took, nil
}

// stormLogin is what one login of a storm got.
type stormLogin struct {
	// at is the time from the storm's start to the login's answer.
	at time.Duration
	// admitted: ReadyForQuery. code is the SQLSTATE of the error that ended
	// the login or the session, msg its message.
	admitted  bool
	code, msg string
	// err is any other error; hung says it was the bound running out.
	err  error
	hung bool
	// during says err or code came while the session was held.
	during bool
}

// storm starts so.logins logins of cfg at once, each holding its session for
// so.hold once admitted, while super samples the role's sessions and, with
// adminAddr, /healthz is polled; it fills run.
func storm(ctx context.Context, so stormOptions, cfg *pgconn.Config, super *pgconn.PgConn, adminAddr string, run *stormRun) error {
	// The poller runs from just before the storm until every login is
	// answered and its session closed.
	var poller *healthPoller
	if adminAddr != "" {
		var err error
		if poller, err = startHealthPoller(adminAddr); err != nil {
			return err
		}
	}
	cfgs := make([]*pgconn.Config, so.logins)
	for i := range cfgs {
		cfgs[i] = cfg
	}
	logins, err := loginsAtOnce(ctx, cfgs, execHold(so.hold), so.bound(), super, &run.sessionSamples)
	if poller != nil {
		poller.stop(run)
	}
	if err != nil {
		return err
	}
	for _, l := range logins {
		run.add(l)
	}
	return nil
}

// holdFunc holds an admitted login's session, and returns the error that
// ended it early.
type holdFunc func(ctx context.Context, c *pgconn.PgConn) error

// execHold holds a session for d with select pg_sleep: a session running a
// query, never idle.
func execHold(d time.Duration) holdFunc {
	sql := fmt.Sprintf("select pg_sleep(%g)", d.Seconds())
	return func(ctx context.Context, c *pgconn.PgConn) error {
		_, err := c.Exec(ctx, sql).ReadAll()
		return err
	}
}

// loginsAtOnce starts one login per entry of cfgs at once, each holding its
// session with hold once admitted and answered within bound, while super
// samples the role's sessions into samp, from just before the logins until
// every login is answered and its session closed. It returns what each
// login got, in the order of cfgs.
func loginsAtOnce(ctx context.Context, cfgs []*pgconn.Config, hold holdFunc, bound time.Duration,
	super *pgconn.PgConn, samp *sessionSamples) ([]stormLogin, error) {
	logins := make([]stormLogin, len(cfgs))
	start := make(chan struct{})
	var t0 time.Time
	var wg sync.WaitGroup
	for i, cfg := range cfgs {
		wg.Go(func() {
			<-start
			logins[i] = stormOne(ctx, cfg, hold, bound, t0)
		})
	}

	stop, stopWatching := context.WithCancel(ctx)
	var watchers sync.WaitGroup
	watchers.Go(func() { sampleSessions(ctx, stop, super, samp) })
	t0 = time.Now()
	close(start) // t0 is written before the close, read after it
	wg.Wait()
	stopWatching()
	watchers.Wait()
	if err := context.Cause(ctx); err != nil {
		return nil, err
	}
	return logins, nil
}

// stormOne is one login of the storm: connect, hold, close.
func stormOne(ctx context.Context, cfg *pgconn.Config, hold holdFunc, bound time.Duration, t0 time.Time) stormLogin {
	lctx, cancel := context.WithTimeout(ctx, bound)
	defer cancel()
	var l stormLogin
	c, err := pgconn.ConnectConfig(lctx, cfg)
	l.at = time.Since(t0)
	if err == nil {
		l.admitted = true
		err = hold(lctx, c)
		l.during = err != nil
		closeConn(c)
	}
	var pgErr *pgconn.PgError
	switch {
	case err == nil:
	case errors.As(err, &pgErr):
		l.code, l.msg = pgErr.Code, pgErr.Message
	default:
		l.err = err
		l.hung = lctx.Err() != nil && ctx.Err() == nil
	}
	return l
}

// add counts one login.
func (run *stormRun) add(l stormLogin) {
	if !l.hung {
		run.answers = append(run.answers, l.at)
		run.last = max(run.last, l.at)
	}
	if l.admitted {
		run.admitted++
	}
	switch {
	case l.err == nil && l.code == "":
		return
	case l.code == "57P01":
		if l.during {
			run.evicted++
		} else {
			run.evictedAtLogin++
		}
		return
	case l.code == "53300" && !l.during:
		run.refused++
		run.refusedBy[l.msg]++
		return
	}
	run.failed++
	if l.hung {
		run.hung++
	}
	if len(run.failures) < stormShown {
		when := "at the login"
		if l.during {
			when = "while holding the session"
		}
		what := fmt.Sprintf("%v", l.err)
		if l.hung {
			what = "no answer within the bound: " + what
		} else if l.err == nil {
			what = l.code + " " + l.msg
		}
		run.failures = append(run.failures, fmt.Sprintf("%s, %s after %s: %s", run.name, when, fmtSec(l.at), what))
	}
}

// sampleSessions counts the role's sessions in pg_stat_activity every
// stormSampleEvery until stop ends. Each query runs under ctx, not stop: a
// query cancelled midway would break super, which the next storm needs.
func sampleSessions(ctx, stop context.Context, super *pgconn.PgConn, run *sessionSamples) {
	sql := fmt.Sprintf("select count(*) from pg_stat_activity where usename = '%s'", stormRole)
	tick := time.NewTicker(stormSampleEvery)
	defer tick.Stop()
	for {
		n, err := queryInt(ctx, super, sql)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			run.sampleErr = err.Error()
			return
		}
		run.samples++
		run.serverMax = max(run.serverMax, n)
		select {
		case <-stop.Done():
			return
		case <-tick.C:
		}
	}
}

// healthPollerEnv, set to rolegate's admin address, makes the benchmark's
// binary the /healthz poller (runHealthPoller) instead of the benchmark. The
// poller is a process of its own because the benchmark's own goroutines,
// thousands of SCRAM clients in a storm, would delay its requests and its
// clock far more than rolegate does.
const healthPollerEnv = "ROLEGATE_BENCH_HEALTHZ_POLLER"

// runHealthPoller asks /healthz at addr every stormHealthEvery until its
// standard input ends, and writes one line per request to standard output:
// "ok NANOSECONDS" or "err MESSAGE". It returns the exit status.
func runHealthPoller(addr string) int {
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		// The parent closes our standard input to stop us.
		_, _ = io.Copy(io.Discard, os.Stdin)
		cancel()
	}()
	client := &http.Client{Timeout: stormHealthTimeout}
	defer client.CloseIdleConnections()
	tick := time.NewTicker(stormHealthEvery)
	defer tick.Stop()
	for {
		took, err := getHealth(ctx, client, addr)
		if ctx.Err() != nil {
			return 0
		}
		line := fmt.Sprintf("ok %d\n", took.Nanoseconds())
		if err != nil {
			line = "err " + strings.ReplaceAll(err.Error(), "\n", " ") + "\n"
		}
		if _, err := os.Stdout.WriteString(line); err != nil {
			return 1
		}
		select {
		case <-ctx.Done():
			return 0
		case <-tick.C:
		}
	}
}

// healthPoller is a running runHealthPoller process.
type healthPoller struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	done  chan struct{}
	// read from the poller's output until done is closed
	took     []time.Duration
	failed   int
	firstErr string
}

// startHealthPoller starts this binary as the /healthz poller of addr.
func startHealthPoller(addr string) (*healthPoller, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("the /healthz poller: %w", err)
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), healthPollerEnv+"="+addr)
	cmd.Stderr = os.Stderr
	// A benchmark killed hard must not leave the poller running.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("the /healthz poller: %w", err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("the /healthz poller: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("the /healthz poller: %w", err)
	}
	p := &healthPoller{cmd: cmd, stdin: stdin, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			kind, rest, _ := strings.Cut(sc.Text(), " ")
			if ns, err := strconv.ParseInt(rest, 10, 64); kind == "ok" && err == nil {
				p.took = append(p.took, time.Duration(ns))
				continue
			}
			p.failed++
			if p.firstErr == "" {
				p.firstErr = rest
			}
		}
	}()
	return p, nil
}

// stop ends the poller and puts what it measured in run.
func (p *healthPoller) stop(run *stormRun) {
	_ = p.stdin.Close()
	<-p.done
	if err := p.cmd.Wait(); err != nil && p.firstErr == "" {
		p.failed++
		p.firstErr = fmt.Sprintf("the poller: %v", err)
	}
	run.health, run.healthFailed, run.healthErr = p.took, p.failed, p.firstErr
}

// waitRoleGone returns once pg_stat_activity shows no session of role.
func waitRoleGone(ctx context.Context, super *pgconn.PgConn, role string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	sql := fmt.Sprintf("select count(*) from pg_stat_activity where usename = '%s'", role)
	for {
		n, err := queryInt(ctx, super, sql)
		if err != nil {
			return fmt.Errorf("watching pg_stat_activity: %w", err)
		}
		if n == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d sessions of %s still on the server %v after the storm", n, role, timeout)
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// scanLog counts rolegate's log lines by message and quotes its first
// warnings and errors.
func (run *stormRun) scanLog(path string) {
	f, err := os.Open(path)
	if err != nil {
		run.logLines[fmt.Sprintf("(log unreadable: %v)", err)]++
		return
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	tally := logTally{lines: run.logLines, warnings: run.warnings, quoted: run.logWarnings, most: stormShown}
	for sc.Scan() {
		tally.add(sc.Bytes())
	}
	run.warnings, run.logWarnings = tally.warnings, tally.quoted
}

// describe is the storm's outcome in one line, for the progress log.
func (run *stormRun) describe(so stormOptions) string {
	s := fmt.Sprintf("%d admitted (%d evicted later), %d refused 53300, %d failed; every answer in %s, median %s; server max %d sessions",
		run.admitted, run.evicted, run.refused, run.failed, fmtSec(run.last), fmtSec(percentile(run.answers, 50)), run.serverMax)
	if run.kind != stormDirect {
		s += fmt.Sprintf("; VmHWM %s; /healthz max %s", fmtKiB(run.hwmKiB), fmtMs(maxDuration(run.health)))
	}
	return s + "; " + run.cpu.String()
}

func maxDuration(xs []time.Duration) time.Duration {
	var m time.Duration
	for _, x := range xs {
		m = max(m, x)
	}
	return m
}

// fmtSec prints a duration in seconds with two decimals.
func fmtSec(d time.Duration) string {
	return fmt.Sprintf("%.2f s", d.Seconds())
}

// ratioToDirect is the time to answer every login of run against the direct
// storm's, "–" for the direct storm itself or when there is none.
func (res *stormResult) ratioToDirect(run *stormRun) string {
	d := res.run(stormDirect)
	if run.kind == stormDirect || d == nil || d.last <= 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f×", float64(run.last)/float64(d.last))
}

// rows is the storm table, header first.
func (res *stormResult) rows() [][]string {
	rows := [][]string{{"Storm", "logins", "admitted", "evicted later (57P01)", "53300", "failed",
		"every login answered in", "median answer", "p99 answer", "server's max sessions", "rolegate VmHWM",
		"/healthz max", "/healthz p99", "all answered / direct"}}
	for _, run := range res.runs {
		evicted := strconv.Itoa(run.evicted)
		if run.evictedAtLogin > 0 {
			evicted += fmt.Sprintf(" (+%d before ReadyForQuery)", run.evictedAtLogin)
		}
		failed := strconv.Itoa(run.failed)
		if run.hung > 0 {
			failed += fmt.Sprintf(" (%d hung)", run.hung)
		}
		row := []string{run.kind.label(), strconv.Itoa(run.logins), strconv.Itoa(run.admitted), evicted,
			strconv.Itoa(run.refused), failed, fmtSec(run.last), fmtSec(percentile(run.answers, 50)),
			fmtSec(percentile(run.answers, 99)), strconv.Itoa(run.serverMax), "–", "–", "–", res.ratioToDirect(run)}
		if run.kind != stormDirect {
			row[10] = fmtKiB(run.hwmKiB)
			row[11], row[12] = fmtMs(maxDuration(run.health)), fmtMs(percentile(run.health, 99))
		}
		rows = append(rows, row)
	}
	return rows
}

// notes are the storm's details under the table: the 53300 texts, the
// sampling, the polling, the CPU, rolegate's log and the failures.
func (res *stormResult) notes() []string {
	var out []string
	for _, run := range res.runs {
		var parts []string
		for _, msg := range sortedKeys(run.refusedBy) {
			parts = append(parts, fmt.Sprintf("%d × %q", run.refusedBy[msg], msg))
		}
		s := run.kind.label() + ": "
		if len(parts) > 0 {
			s += "53300: " + strings.Join(parts, ", ") + "; "
		}
		s += fmt.Sprintf("%d samples of pg_stat_activity", run.samples)
		if run.sampleErr != "" {
			s += fmt.Sprintf(" (sampling stopped: %s)", run.sampleErr)
		}
		if run.kind != stormDirect {
			s += fmt.Sprintf("; %d /healthz answers, %d failed", len(run.health), run.healthFailed)
			if run.healthErr != "" {
				s += fmt.Sprintf(" (the first: %s)", run.healthErr)
			}
		}
		s += "; " + run.cpu.String() + " (client: this benchmark's SCRAM clients)"
		if run.kind != stormDirect {
			var lines []string
			for _, msg := range sortedKeys(run.logLines) {
				lines = append(lines, fmt.Sprintf("%q %d", msg, run.logLines[msg]))
			}
			s += fmt.Sprintf("; %s logged %s; %d warnings or errors", run.kind.target(), strings.Join(lines, ", "), run.warnings)
			if len(run.logWarnings) > 0 {
				s += ": " + strings.Join(run.logWarnings, " | ")
			}
		}
		if len(run.failures) > 0 {
			s += "; failures: " + strings.Join(run.failures, "; ")
		}
		out = append(out, s)
	}
	return out
}

// verdicts compares with issue 11's targets.
func (res *stormResult) verdicts() []string {
	met := func(ok bool) string {
		if ok {
			return "met"
		}
		return "MISSED"
	}
	var out []string
	for _, run := range res.runs {
		if run.kind == stormDirect {
			continue
		}
		hw := fmtKiB(run.hwmKiB)
		out = append(out, fmt.Sprintf("%s: every login answered (admitted, 53300 or 57P01): %d failed, %d of them hung: %s; the server's sessions of the role at most %d (limit %d): %s; VmHWM %s (target < 256 MiB): %s; /healthz at most %s, p99 %s, %d failed (target ≤ %v): %s",
			run.kind.label(), run.failed, run.hung, met(run.failed == 0), run.serverMax, res.opts.limit, met(run.serverMax <= res.opts.limit && run.sampleErr == ""),
			hw, met(run.hwmKiB >= 0 && run.hwmKiB < stormRSSGoalKiB),
			fmtMs(maxDuration(run.health)), fmtMs(percentile(run.health, 99)), run.healthFailed, stormHealthGoal,
			met(run.healthFailed == 0 && len(run.health) > 0 && maxDuration(run.health) <= stormHealthGoal)))
	}
	if d, rj := res.run(stormDirect), res.run(stormReject); d != nil && rj != nil && d.last > 0 {
		ratio := float64(rj.last) / float64(d.last)
		out = append(out, fmt.Sprintf("every login answered under reject in %s against %s direct: %.2f× (target ≤ %.1f×): %s",
			fmtSec(rj.last), fmtSec(d.last), ratio, stormRatioGoal, met(ratio <= stormRatioGoal)))
	}
	return out
}

// stormSettings describes the test in one line.
func stormSettings(o options, res *stormResult) string {
	so := stormOptions{logins: o.stormLogins, limit: o.stormLimit, hold: o.stormHold}
	s := fmt.Sprintf("%d SCRAM logins of role %s (database %s) started at once, each its own pgx pgconn connection (sslmode=disable); an admitted login runs select pg_sleep(%g) and closes; role limit %d: CONNECTION LIMIT %d on the server for the direct storm, [roles.%s] max_sessions = %d (and no server limit) through rolegate; the wait policy's wait_timeout %v; a login not answered within %v counts as hung; pg_stat_activity sampled every %v, /healthz every %v",
		so.logins, stormRole, stormDatabase, so.hold.Seconds(), so.limit, so.limit, stormRole, so.limit, so.waitTimeout(), so.bound(), stormSampleEvery, stormHealthEvery)
	if res != nil {
		s += fmt.Sprintf("; RLIMIT_NOFILE %d, somaxconn %s, the server's max_connections %s", res.nofile, res.somaxconn, res.maxConnections)
	}
	return s
}

// stormSetupLine says how the storm's rolegates were set up.
const stormSetupLine = "rolegate-storm-reject, -wait, -newest-wins (the storm test only, one at a time): the same binary and control connection, with [roles.storm_bench] max_sessions = the limit and policy = the storm's max_evictions = \"off\" ([limits] defaults otherwise), [admin] http on a free loopback port for /healthz, and [log] level = \"info\", format = \"json\""

// printStorm writes the storm section, as text or as Markdown.
func (r *report) printStorm(w io.Writer, md bool) {
	res := r.storm
	fmt.Fprintf(w, "\nLogin storm (issue 11), %d logins at once, limit %d, times from the storm's start:\n\n", res.opts.logins, res.opts.limit)
	if md {
		mdTable(w, res.rows())
	} else {
		printTable(w, res.rows())
	}
	fmt.Fprintln(w)
	for _, line := range res.notes() {
		if md {
			fmt.Fprintf(w, "- %s\n", line)
		} else {
			fmt.Fprintf(w, "%s\n", line)
		}
	}
}
