// Command bench compares, in one run on one machine, a direct connection to
// PostgreSQL, rolegate in proxy mode, and PgBouncer in session mode. It is
// run by hand (bench/run.sh, `make bench`), never in CI, and asserts
// nothing: it prints medians, ratios and every individual run.
//
//	go run ./bench [-rolegate bin/rolegate] [-rounds 3] [-duration 10s] [-copy-mb 500] [-logins 500] [-limit-logins 300] [-pinned] [-idle-sessions 200]
//	go run ./bench -only limits [-limit-logins 300]
//	go run ./bench -only storm [-storm-logins 5000] [-storm-limit 5] [-storm-hold 50ms]
//	go run ./bench -only cluster-storm [-cluster-instances 3] [-cluster-logins 3000] [-cluster-limit 5] [-cluster-direct 10]
//	go run ./bench -only tls [-rounds 3] [-pinned]
//
// One run starts a throwaway PostgreSQL cluster (internal/pgtest), creates
// the role bench and loads `pgbench -i -s 10` as that role, sets up
// rolegate's control role (sql/setup.sql) and PgBouncer's auth_user, starts
// rolegate (also a second time with GOMAXPROCS=1) and PgBouncer (installing
// it first when it is missing and we are root) in front of it, times
// sequential logins through each, and then runs, interleaved over the
// targets in every round, pgbench select-only with -M simple and -M
// extended, a bulk COPY ... TO STDOUT read by psql into /dev/null, and
// pgbench -C (a new SCRAM login per transaction), and then the select-only
// rows again with the server and pgbench on one CPU and each proxy on
// another (affinity.go). The select-only rows run a second time with TLS on
// both legs (issue 11: the server with ssl on, direct-tls, rolegate-tls and
// pgbouncer-tls; tls.go), unpinned and pinned; -no-tls leaves them out and
// `-only tls` runs them alone. Before the rounds it measures each proxy's memory
// per idle session (idle.go). Last comes the newest-wins
// test (issue 4, limits.go): logins of a role at its limit that evict its
// oldest session, through a rolegate of their own, against plain logins and
// against terminating the session by hand; `-only limits` runs that test
// alone. After it, the login storm (issue 11, storm.go): thousands of
// logins of a role with a small limit started at once, straight at the
// server and through a rolegate of their own per policy; `-only storm` runs
// it alone. `-only cluster-storm` runs, alone only, the same storm through
// several rolegate instances in front of the one server with a share of the
// logins straight at the server, per policy (issue 12, cluster.go).
// Everything it started is stopped and removed on exit, also on
// Ctrl-C.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"golang.org/x/sys/unix"

	"github.com/rolegate/rolegate/internal/pgtest"
)

const (
	// benchRole is the role (and database) the benchmark logs in as.
	benchRole = "bench"
	// copyRowLen is the width of one COPY row without its newline.
	copyRowLen = 1000
	// listenTimeout is how long rolegate or PgBouncer may take to open its port.
	listenTimeout = 15 * time.Second
	// stopTimeout is how long a proxy may take to exit after its stop signal.
	stopTimeout = 10 * time.Second
	// idleCheck is how long the machine is watched, with everything started
	// and idle, before the first run.
	idleCheck = 2 * time.Second
	// quietSample is how long waitQuiet watches the machine at a time, and
	// quietCores how much CPU other work may use for it to count as quiet.
	quietSample = time.Second
	quietCores  = 0.1
	// skewedCores is how much CPU other work may use during a run before
	// the run counts as skewed and is repeated (-repeats).
	skewedCores = 0.2
)

// options are the command-line flags.
type options struct {
	rolegate    string
	rounds      int
	duration    time.Duration
	warmup      time.Duration
	copyMB      int
	clients     int
	jobs        int
	scale       int
	noPgBouncer bool
	quietWait   time.Duration
	repeats     int
	// connectClients is pgbench -c for the connect-rate row.
	connectClients int
	// logins is how many logins the login-latency test times per target.
	logins int
	// gomaxprocs1 adds the target rolegate-gmp1: rolegate with GOMAXPROCS=1.
	gomaxprocs1 bool
	// setupSQL is the control role's set-up script; empty looks for
	// sql/setup.sql in the repository.
	setupSQL string
	// only runs one test alone: "limits" (the newest-wins test); empty
	// runs everything.
	only string
	// limitLogins is how many logins the newest-wins test times per row.
	limitLogins int
	// pinned adds the pinned select-only rows (cpuPlan).
	pinned bool
	// idleSessions is how many idle sessions the idle-session test opens
	// through each proxy; 0 skips it.
	idleSessions int
	// stormLogins is how many logins the storm test starts at once; 0
	// skips it in a full run. stormLimit is the role's limit, stormHold how
	// long an admitted login holds its session.
	stormLogins, stormLimit int
	stormHold               time.Duration
	// noTLS leaves out the select-only rows with TLS on both legs.
	noTLS bool
	// clusterInstances, clusterLogins and clusterLimit are the cluster
	// storm's instances, logins and role limit; clusterDirect is the share
	// of its logins, in percent, that go straight to the server.
	clusterInstances, clusterLogins, clusterLimit, clusterDirect int
}

// -only's values: the newest-wins test alone, the login storm alone, the
// select-only rows with TLS on both legs alone, the cluster storm.
const (
	onlyLimits = "limits"
	onlyStorm  = "storm"
	onlyTLS    = "tls"
	// onlyCluster is the cluster storm (issue 12), which only runs alone.
	onlyCluster = "cluster-storm"
)

// alone says whether the run is a test of its own instead of the rounds
// (-only limits, storm or cluster-storm). -only tls runs the rounds, with the TLS rows
// alone.
func (o options) alone() bool {
	return o.only == onlyLimits || o.only == onlyStorm || o.only == onlyCluster
}

// serverSettings are the test server's postgresql.conf settings beyond
// pgtest's: the cluster storm's max_connections.
func (o options) serverSettings() map[string]string {
	if o.only != onlyCluster {
		return nil
	}
	return map[string]string{"max_connections": strconv.Itoa(o.cluster().maxConnections())}
}

// plainRows says whether the rounds include the rows without TLS.
func (o options) plainRows() bool { return o.only == "" }

// tlsRows says whether the rounds include the rows with TLS on both legs.
func (o options) tlsRows() bool { return !o.noTLS && (o.only == "" || o.only == onlyTLS) }

// limitsOnly says whether the run is the newest-wins test alone.
func (o options) limitsOnly() bool { return o.only == onlyLimits }

// runs says whether the run includes the test named by an -only value.
func (o options) runs(test string) bool { return o.only == "" || o.only == test }

func main() {
	if addr := os.Getenv(healthPollerEnv); addr != "" {
		// This process is the storm test's /healthz poller (storm.go).
		os.Exit(runHealthPoller(addr))
	}
	var o options
	flag.StringVar(&o.rolegate, "rolegate", "", "rolegate binary; empty builds ./cmd/rolegate into the temp dir")
	flag.IntVar(&o.rounds, "rounds", 3, "rounds; each runs every test against every target")
	flag.DurationVar(&o.duration, "duration", 10*time.Second, "length of each pgbench run (whole seconds)")
	flag.DurationVar(&o.warmup, "warmup", 5*time.Second, "unrecorded pgbench run per target before round 1 (0 skips it)")
	flag.IntVar(&o.copyMB, "copy-mb", 500, "size of the COPY output in MB (10^6 bytes)")
	flag.IntVar(&o.clients, "clients", 16, "pgbench -c")
	flag.IntVar(&o.jobs, "jobs", 2, "pgbench -j")
	flag.IntVar(&o.scale, "scale", 10, "pgbench -i -s")
	flag.BoolVar(&o.noPgBouncer, "no-pgbouncer", false, "leave PgBouncer out")
	flag.DurationVar(&o.quietWait, "quiet-wait", 2*time.Minute, "before each run, wait up to this long for other work on the machine to stop (0: do not wait)")
	flag.IntVar(&o.repeats, "repeats", 2, "run a test again, up to this many times, when other work used the CPU during it")
	flag.IntVar(&o.connectClients, "connect-clients", 8, "pgbench -c for the connect-rate row (pgbench -C)")
	flag.IntVar(&o.logins, "logins", 500, "sequential logins timed per target for the login latency (0 skips it)")
	flag.StringVar(&o.setupSQL, "setup-sql", "", "rolegate's control-role script; empty: sql/setup.sql of the repository, and without one the superuser")
	flag.StringVar(&o.only, "only", "", `run one test alone: "limits" (newest-wins at the limit, issue 4), "storm" (the login storm, issue 11), "cluster-storm" (the login storm through several instances, issue 12; only alone) or "tls" (the select-only rows with TLS on both legs, issue 11); empty runs everything`)
	flag.BoolVar(&o.noTLS, "no-tls", false, "leave out the select-only rows with TLS on both legs (direct-tls, rolegate-tls, pgbouncer-tls)")
	flag.IntVar(&o.limitLogins, "limit-logins", 300, "newest-wins test: logins timed per row (0 skips the test in a full run)")
	flag.BoolVar(&o.gomaxprocs1, "gomaxprocs1", true, "also run rolegate with GOMAXPROCS=1 (target rolegate-gmp1) in the select-only and connect-rate rows")
	flag.BoolVar(&o.pinned, "pinned", runtime.NumCPU() >= 2, "also run the select-only rows with the server and pgbench on one CPU and each proxy on another (needs 2 CPUs)")
	flag.IntVar(&o.idleSessions, "idle-sessions", 200, "idle sessions opened through each proxy for its memory per session (0 skips the test)")
	flag.IntVar(&o.stormLogins, "storm-logins", 5000, "login storm: logins started at once per storm (0 skips the test in a full run)")
	flag.IntVar(&o.stormLimit, "storm-limit", 5, "login storm: the role's session limit")
	flag.DurationVar(&o.stormHold, "storm-hold", 50*time.Millisecond, "login storm: how long an admitted login holds its session (select pg_sleep; the cluster storm holds it idle)")
	flag.IntVar(&o.clusterInstances, "cluster-instances", 3, "cluster storm: rolegate instances in front of the server")
	flag.IntVar(&o.clusterLogins, "cluster-logins", 3000, "cluster storm: logins started at once per policy")
	flag.IntVar(&o.clusterLimit, "cluster-limit", 5, "cluster storm: the role's session limit")
	flag.IntVar(&o.clusterDirect, "cluster-direct", 10, "cluster storm: percent of the logins that go straight to the server")
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "bench: unexpected arguments: %v\n", flag.Args())
		os.Exit(2)
	}
	if err := o.validate(); err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		os.Exit(2)
	}
	os.Exit(run(o))
}

func (o options) validate() error {
	switch {
	case o.rounds < 1:
		return errors.New("-rounds must be at least 1")
	case o.duration < time.Second || o.duration%time.Second != 0:
		return fmt.Errorf("-duration %v: pgbench -T takes whole seconds, at least 1s", o.duration)
	case o.warmup < 0 || o.warmup%time.Second != 0:
		return fmt.Errorf("-warmup %v: whole seconds, 0 or more", o.warmup)
	case o.copyMB < 1:
		return errors.New("-copy-mb must be at least 1")
	case o.clients < 1 || o.jobs < 1 || o.clients%o.jobs != 0:
		return fmt.Errorf("-clients %d -jobs %d: pgbench needs clients to be a multiple of jobs", o.clients, o.jobs)
	case o.connectClients < 1 || o.connectClients%o.jobs != 0:
		return fmt.Errorf("-connect-clients %d -jobs %d: pgbench needs clients to be a multiple of jobs", o.connectClients, o.jobs)
	case o.logins < 0:
		return errors.New("-logins must be 0 or more")
	case o.scale < 1:
		return errors.New("-scale must be at least 1")
	case o.repeats < 0:
		return errors.New("-repeats must be 0 or more")
	case o.only != "" && o.only != onlyLimits && o.only != onlyStorm && o.only != onlyCluster && o.only != onlyTLS:
		return fmt.Errorf("-only %q: the tests that run alone are %q, %q, %q and %q", o.only, onlyLimits, onlyStorm, onlyCluster, onlyTLS)
	case o.only == onlyTLS && o.noTLS:
		return errors.New("-only tls and -no-tls leave nothing to run")
	case o.limitLogins < 0:
		return errors.New("-limit-logins must be 0 or more")
	case o.limitsOnly() && o.limitLogins == 0:
		return errors.New("-only limits needs -limit-logins of at least 1")
	case o.idleSessions < 0:
		return errors.New("-idle-sessions must be 0 or more")
	case o.stormLogins < 0:
		return errors.New("-storm-logins must be 0 or more")
	case o.only == onlyStorm && o.stormLogins == 0:
		return errors.New("-only storm needs -storm-logins of at least 1")
	case o.stormLimit < 1:
		return errors.New("-storm-limit must be at least 1")
	case o.stormHold < 0:
		return errors.New("-storm-hold must be 0 or more")
	}
	if o.only == onlyCluster {
		return o.cluster().validate()
	}
	return nil
}

// logf prints progress to standard error; the results go to standard output.
func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "bench %s: %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

// run returns the exit status, so that the deferred cleanups run before the
// process exits.
func run(o options) int {
	began := time.Now()
	// Signals are caught from here on, so a Ctrl-C at any point still stops
	// what was started. Once one has arrived the default handling comes back:
	// a second Ctrl-C ends the program at once.
	ctx, stopSignals := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stopSignals()
	context.AfterFunc(ctx, stopSignals)

	err := bench(ctx, o, began)
	switch {
	case err == nil:
		return 0
	case ctx.Err() != nil:
		logf("interrupted (%v); everything started was stopped and removed", err)
		return 130
	default:
		logf("%v", err)
		return 1
	}
}

// bench does the whole run; its deferred calls are the cleanup.
func bench(ctx context.Context, o options, began time.Time) (err error) {
	tools := []string{"pgbench", "psql"}
	if o.alone() {
		tools = []string{"psql"} // for sql/setup.sql
	}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s not found on PATH: install the PostgreSQL client tools (Debian/Ubuntu: apt-get install postgresql-client postgresql-contrib), or run scripts/ensure-postgres.sh", tool)
		}
	}

	work, err := os.MkdirTemp("", "rolegate-bench-")
	if err != nil {
		return fmt.Errorf("temp dir: %w", err)
	}
	defer func() {
		if rerr := os.RemoveAll(work); rerr != nil {
			logf("removing %s: %v", work, rerr)
		}
	}()
	// Traversable by PgBouncer's user, whose own dir is inside.
	if err := os.Chmod(work, 0o755); err != nil {
		return fmt.Errorf("temp dir: %w", err)
	}

	rolegateBin, err := rolegateBinary(ctx, o.rolegate, work)
	if err != nil {
		return err
	}

	var bouncerBin, bouncerNote string
	if o.alone() {
		// Nothing to say: the test has no PgBouncer column.
	} else if o.noPgBouncer {
		bouncerNote = "PgBouncer left out (-no-pgbouncer)"
	} else if bouncerBin, bouncerNote, err = ensurePgBouncer(ctx); err != nil {
		return err
	}
	if bouncerNote != "" {
		logf("%s", bouncerNote)
	}

	logf("starting PostgreSQL")
	// ssl = on changes nothing for the plain rows, whose clients do not
	// ask for TLS.
	cluster, err := pgtest.New(ctx, pgtest.Options{Logf: logf, SSL: o.tlsRows(), Settings: o.serverSettings()})
	if err != nil {
		return fmt.Errorf("starting PostgreSQL: %w", err)
	}
	defer func() {
		if cerr := cluster.Close(); cerr != nil {
			logf("stopping PostgreSQL: %v", cerr)
		}
	}()

	password := pgtest.RandomHex(12)
	env := clientEnv(password)
	serverVersion, err := setUpRole(ctx, cluster, password)
	if err != nil {
		return err
	}
	ctl, err := setUpControl(ctx, cluster, o.setupSQL)
	if err != nil {
		return err
	}
	logf("rolegate control: %s", ctl.describe)
	if !o.alone() {
		logf("pgbench -i -s %d as %s", o.scale, benchRole)
		if _, _, err := runTool(ctx, env, "pgbench", "-i", "-q", "-s", strconv.Itoa(o.scale),
			"-h", cluster.Host, "-p", strconv.Itoa(cluster.Port), "-U", benchRole, benchRole); err != nil {
			return fmt.Errorf("loading pgbench data: %w", err)
		}
	}

	var targets []*target
	var daemons []*daemon
	var instances []rolegateInstance
	var idleTargets []idleTarget
	if o.plainRows() {
		targets = append(targets, &target{name: "direct", host: cluster.Host, port: cluster.Port})
		instances = append(instances, rolegateInstance{name: "rolegate"})
		if o.gomaxprocs1 {
			instances = append(instances, rolegateInstance{name: gmp1Target, gomaxprocs: 1})
		}
		instances = append(instances, rolegateInstance{name: goroutinesTarget, relay: "goroutines"})
	}
	for _, inst := range instances {
		rg, err := startRolegate(ctx, rolegateBin, work, cluster.Addr(), ctl, inst)
		if err != nil {
			return err
		}
		defer rg.stop(syscall.SIGINT) // SIGINT: close at once; nothing is left to drain
		rg.extra = inst.name == gmp1Target || inst.name == goroutinesTarget
		targets = append(targets, rg.target)
		daemons = append(daemons, rg)
		idleTargets = append(idleTargets, idleTarget{target: rg.target, database: benchRole})
	}

	var pbAuth pgbouncerAuth
	if bouncerBin != "" {
		if pbAuth, err = setUpPgBouncerAuth(ctx, cluster); err != nil {
			return err
		}
		logf("PgBouncer auth: %s", pbAuth.describe)
	}
	if bouncerBin != "" && o.plainRows() {
		pb, err := startPgBouncer(ctx, bouncerBin, work, cluster, pbAuth,
			pgbouncerInstance{name: "pgbouncer", idleSessions: o.idleSessions})
		if err != nil {
			return err
		}
		defer pb.stop(syscall.SIGTERM) // SIGTERM: PgBouncer's immediate shutdown
		targets = append(targets, pb.target)
		daemons = append(daemons, pb)
		fresh, err := startPgBouncer(ctx, bouncerBin, work, cluster, pbAuth,
			pgbouncerInstance{name: pgbouncerFresh, fresh: true})
		if err != nil {
			return err
		}
		defer fresh.stop(syscall.SIGTERM)
		targets = append(targets, fresh.target)
		daemons = append(daemons, fresh)
		idleTargets = append(idleTargets, idleTarget{target: pb.target, database: pgbouncerIdleDB,
			release: func(ctx context.Context) error { return killPgBouncerPool(ctx, pb.target, pbAuth) }})
	}
	if o.tlsRows() {
		// The same server, rolegate and PgBouncer with TLS on both legs,
		// after the plain targets: their rows come after the plain rows.
		tlsEnv := tlsClientEnv(env, cluster.CACertFile)
		targets = append(targets, &target{name: directTLS, host: cluster.Host, port: cluster.Port, tls: true, env: tlsEnv})
		cert, key, err := cluster.IssueServerCert(work, rolegateTLS)
		if err != nil {
			return fmt.Errorf("%s: %w", rolegateTLS, err)
		}
		rg, err := startRolegate(ctx, rolegateBin, work, cluster.Addr(), ctl,
			rolegateInstance{name: rolegateTLS, tlsCert: cert, tlsKey: key, serverSSLMode: "require"})
		if err != nil {
			return err
		}
		defer rg.stop(syscall.SIGINT)
		rg.env = tlsEnv
		targets = append(targets, rg.target)
		daemons = append(daemons, rg)
		if bouncerBin != "" {
			pb, err := startPgBouncer(ctx, bouncerBin, work, cluster, pbAuth, pgbouncerInstance{name: pgbouncerTLS, tls: true})
			if err != nil {
				return err
			}
			defer pb.stop(syscall.SIGTERM)
			pb.env = tlsEnv
			targets = append(targets, pb.target)
			daemons = append(daemons, pb)
		}
	}

	m := machineInfo(ctx, rolegateBin, bouncerBin, serverVersion)
	m.pgbouncerNote = bouncerNote
	m.control = ctl.describe
	m.pgbouncerAuth = pbAuth.describe
	r := &report{opts: o, machine: m, targets: targets, copy: newCopySpec(o.copyMB), started: began}

	// Other work on the machine skews every number; look before starting.
	meter := newCPUMeter(filepath.Join(cluster.Dir, "data"))
	var pids []int
	for _, d := range daemons {
		pids = append(pids, d.pid)
	}
	before := meter.take(pids...)
	select {
	case <-ctx.Done():
		return context.Cause(ctx)
	case <-time.After(idleCheck):
	}
	r.idle = meter.take(pids...).since(before, 0)
	if r.idle.other > quietCores {
		logf("with the benchmark idle, other work used %.2f cores; each run waits for quiet (-quiet-wait %v)", r.idle.other, o.quietWait)
	}

	if !o.alone() {
		if r.plan, r.pinnedNote, err = setUpPinning(o, meter, pids); err != nil {
			return err
		}
		if err := warmUp(ctx, o, env, targets, r.copy); err != nil {
			return err
		}
		if o.plainRows() {
			if err := measureLogins(ctx, o, password, targets, meter, r); err != nil {
				return err
			}
			if err := measureIdle(ctx, o, cluster, password, idleTargets, r); err != nil {
				return err
			}
		}
		if err := measure(ctx, o, env, targets, meter, r); err != nil {
			return err
		}
	}
	if o.runs(onlyLimits) {
		if err := measureLimits(ctx, o, cluster, rolegateBin, work, ctl, meter, pids, r); err != nil {
			return err
		}
	}
	if o.runs(onlyStorm) {
		if err := measureStorm(ctx, o, cluster, rolegateBin, work, ctl, meter, pids, r); err != nil {
			return err
		}
	}
	if o.only == onlyCluster {
		if err := measureCluster(ctx, o, cluster, rolegateBin, work, ctl, meter, r); err != nil {
			return err
		}
	}
	r.wall = time.Since(began)
	r.proxyLogs = logSummary(daemons)
	for _, d := range daemons {
		if !strings.HasPrefix(d.target.name, "rolegate") {
			continue
		}
		if g, err := readGCPauses(d.target.name, d.logFile); err == nil {
			r.gc = append(r.gc, g)
		}
	}
	r.print(os.Stdout)
	return nil
}

// rolegateBinary returns path when set, and otherwise builds ./cmd/rolegate
// of this module into dir.
func rolegateBinary(ctx context.Context, path, dir string) (string, error) {
	if path != "" {
		abs, err := filepath.Abs(path)
		if err != nil {
			return "", fmt.Errorf("-rolegate %s: %w", path, err)
		}
		if _, err := os.Stat(abs); err != nil {
			return "", fmt.Errorf("-rolegate: %w", err)
		}
		return abs, nil
	}
	root, err := moduleRoot(ctx)
	if err != nil {
		return "", fmt.Errorf("finding the module to build rolegate from (%v); run from the repository or pass -rolegate", err)
	}
	// The version stamp says in the report what was measured, as `make
	// build` does.
	version := "dev"
	describe := exec.CommandContext(ctx, "git", "describe", "--tags", "--always", "--dirty")
	describe.Dir = root
	if out, err := describe.Output(); err == nil {
		version = strings.TrimSpace(string(out))
	}
	bin := filepath.Join(dir, "rolegate")
	logf("building rolegate %s", version)
	cmd := exec.CommandContext(ctx, "go", "build", "-ldflags", "-X main.version="+version, "-o", bin, "./cmd/rolegate")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/rolegate: %w\n%s", err, out)
	}
	return bin, nil
}

// moduleRoot is the directory of the go.mod of the module we run in: the
// repository.
func moduleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	gomod := strings.TrimSpace(string(out))
	if err != nil || gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("go env GOMOD: %q, %v", gomod, err)
	}
	return filepath.Dir(gomod), nil
}

// setUpRole creates the role and database bench and returns the server
// version.
func setUpRole(ctx context.Context, c *pgtest.Cluster, password string) (version string, err error) {
	conn, err := pgx.Connect(ctx, c.SuperDSN())
	if err != nil {
		return "", fmt.Errorf("connect as superuser: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	// CREATE DATABASE cannot run inside the implicit transaction of a
	// multi-statement query, so the statements go one by one.
	for _, sql := range []string{
		fmt.Sprintf("create role %s login password '%s'", benchRole, password),
		fmt.Sprintf("create database %s owner %s", benchRole, benchRole),
	} {
		if _, err := conn.Exec(ctx, sql); err != nil {
			return "", fmt.Errorf("setting up role %s: %w", benchRole, err)
		}
	}
	var verifier string
	if err := conn.QueryRow(ctx, "select rolpassword from pg_authid where rolname = $1", benchRole).Scan(&verifier); err != nil {
		return "", fmt.Errorf("reading the SCRAM verifier of %s: %w", benchRole, err)
	}
	if !strings.HasPrefix(verifier, "SCRAM-SHA-256$") {
		return "", fmt.Errorf("role %s has no SCRAM verifier (password_encryption is not scram-sha-256?)", benchRole)
	}
	if err := conn.QueryRow(ctx, "show server_version").Scan(&version); err != nil {
		return "", fmt.Errorf("reading the server version: %w", err)
	}
	return version, nil
}

// controlRole is the least-privilege control role sql/setup.sql creates.
const controlRole = "rolegate"

// setUpControl prepares rolegate's control connection: with setupSQL (or,
// when it is empty, sql/setup.sql in the repository), the least-privilege
// role rolegate (which the script creates; we give it a random password)
// and its auth query; without one, the superuser and rolegate's default
// auth query on pg_authid.
func setUpControl(ctx context.Context, c *pgtest.Cluster, setupSQL string) (controlSetup, error) {
	if setupSQL != "" {
		if _, err := os.Stat(setupSQL); err != nil {
			return controlSetup{}, fmt.Errorf("-setup-sql: %w", err)
		}
	} else if root, err := moduleRoot(ctx); err == nil {
		if _, err := os.Stat(filepath.Join(root, "sql", "setup.sql")); err == nil {
			setupSQL = filepath.Join(root, "sql", "setup.sql")
		}
	}
	if setupSQL == "" {
		return controlSetup{
			dsn:       controlDSN(c, c.SuperUser),
			password:  c.SuperPassword,
			authQuery: "SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname = $1",
			describe: fmt.Sprintf("superuser %s (no sql/setup.sql found), auth_query on pg_authid, cache_ttl %s",
				c.SuperUser, rolegateCacheTTL),
		}, nil
	}
	logf("psql -f %s as %s", setupSQL, c.SuperUser)
	superEnv := clientEnv(c.SuperPassword)
	if _, _, err := runTool(ctx, superEnv, "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1",
		"-h", c.Host, "-p", strconv.Itoa(c.Port), "-U", c.SuperUser, "-d", "postgres", "-f", setupSQL); err != nil {
		return controlSetup{}, fmt.Errorf("running sql/setup.sql: %w", err)
	}
	password := pgtest.RandomHex(12)
	if err := c.Exec(ctx, fmt.Sprintf("alter role %s password '%s'", controlRole, password)); err != nil {
		return controlSetup{}, fmt.Errorf("setting the password of the control role: %w", err)
	}
	return controlSetup{
		dsn:       controlDSN(c, controlRole),
		password:  password,
		authQuery: "SELECT rolegate.get_secret($1)",
		describe: fmt.Sprintf("role %s from sql/setup.sql (not a superuser), auth_query SELECT rolegate.get_secret($1), cache_ttl %s",
			controlRole, rolegateCacheTTL),
	}, nil
}

// controlDSN names role on database postgres, without a password.
func controlDSN(c *pgtest.Cluster, role string) string {
	return fmt.Sprintf("postgres://%s@%s/postgres?sslmode=disable", role, c.Addr())
}

// pgbouncerAuthUser is PgBouncer's auth_user. Its auth_query reads
// pg_shadow, which only a superuser may.
const pgbouncerAuthUser = "pgbouncer_auth"

// setUpPgBouncerAuth creates PgBouncer's auth_user. PgBouncer 1.18 logs in
// to the server as auth_user itself, without a client whose SCRAM keys it
// could pass on, so a SCRAM verifier in the auth_file cannot log it in
// ("cannot do SCRAM authentication: password is SCRAM secret but client
// authentication did not provide SCRAM keys"): its auth_file entry is its
// plain-text password, in a file only PgBouncer's user can read.
func setUpPgBouncerAuth(ctx context.Context, c *pgtest.Cluster) (pgbouncerAuth, error) {
	password := pgtest.RandomHex(12)
	if err := c.Exec(ctx, fmt.Sprintf("create role %s login superuser password '%s'", pgbouncerAuthUser, password)); err != nil {
		return pgbouncerAuth{}, fmt.Errorf("creating PgBouncer's auth_user: %w", err)
	}
	return pgbouncerAuth{
		user:       pgbouncerAuthUser,
		fileSecret: password,
		describe: fmt.Sprintf("auth_type scram-sha-256, auth_user %s (superuser, for pg_shadow) with auth_query %q; "+
			"the auth_file holds only %s's plain-text password (PgBouncer 1.18 cannot log auth_user in to a SCRAM server with a verifier)",
			pgbouncerAuthUser, pgbouncerAuthQuery, pgbouncerAuthUser),
	}, nil
}

// clientEnv is the environment for pgbench and psql: ours without PG*
// variables that could redirect them and without locale variables (pgbench's
// output is parsed), plus the password.
func clientEnv(password string) []string {
	return append(pgtest.CleanEnv(), "PGPASSWORD="+password, "PGSSLMODE=disable", "PGCONNECT_TIMEOUT=10")
}

// runTool runs a client tool to completion and returns its standard output
// and its CPU time; a failure carries the tail of what it printed.
func runTool(ctx context.Context, env []string, name string, args ...string) (string, time.Duration, error) {
	return runToolOn(ctx, env, nil, name, args...)
}

// runToolOn is runTool with the tool on cpus (nil: wherever).
func runToolOn(ctx context.Context, env []string, cpus *unix.CPUSet, name string, args ...string) (string, time.Duration, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = env
	var stdout, stderr strings.Builder
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	err := startOn(cmd, cpus)
	if err == nil {
		err = cmd.Wait()
	}
	if err != nil {
		return stdout.String(), 0, fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, tail(stdout.String()+stderr.String(), 15))
	}
	return stdout.String(), cpuTime(cmd), nil
}

// cpuTime is the user and system time of a process that has exited.
func cpuTime(cmd *exec.Cmd) time.Duration {
	return cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
}

// tail returns the last n lines of s, indented.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "\t" + strings.Join(lines, "\n\t")
}

// copySpec is the COPY every target runs: rows of copyRowLen 'x' made by
// generate_series, which the server produces faster than it reads a stored
// table of the same size.
type copySpec struct {
	rows  int
	bytes int64
	sql   string
}

func newCopySpec(mb int) copySpec {
	rowBytes := int64(copyRowLen + 1) // text format: the value and a newline
	rows := (int64(mb)*1_000_000 + rowBytes - 1) / rowBytes
	return copySpec{
		rows:  int(rows),
		bytes: rows * rowBytes,
		sql:   fmt.Sprintf("copy (select repeat('x', %d) from generate_series(1, %d)) to stdout", copyRowLen, rows),
	}
}

// psqlArgs are the arguments for psql to run sql against t as bench.
func psqlArgs(t *target, sql string) []string {
	return []string{"-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", t.host, "-p", strconv.Itoa(t.port),
		"-U", benchRole, "-d", benchRole, "-c", sql}
}

// runCopy runs the COPY through psql with its output going to out and
// returns the wall time from psql's start to its exit, and psql's CPU time.
func runCopy(ctx context.Context, env []string, t *target, spec copySpec, out io.Writer) (took, cpu time.Duration, err error) {
	cmd := exec.CommandContext(ctx, "psql", psqlArgs(t, spec.sql)...)
	cmd.Env = env
	cmd.Stdout = out
	var stderr strings.Builder
	cmd.Stderr = &stderr
	start := time.Now()
	err = cmd.Run()
	took = time.Since(start)
	if err != nil {
		return 0, 0, fmt.Errorf("COPY via %s: psql: %w\n%s", t.name, err, tail(stderr.String(), 10))
	}
	return took, cpuTime(cmd), nil
}

// tpsLine is pgbench's result line (PostgreSQL 14 and later): "without
// initial connection time" for persistent sessions, "including reconnection
// times" with -C.
var tpsLine = regexp.MustCompile(`(?m)^tps = ([0-9.]+) \((?:without initial connection time|including reconnection times)\)`)

// pgbenchArgs are pgbench's arguments for row k (simple, extended or
// connect) against t for d.
func pgbenchArgs(o options, t *target, k testKind, d time.Duration) []string {
	args := []string{"-n", "-S"}
	clients := o.clients
	if k == connect {
		// A new connection, and so a new SCRAM login, per transaction.
		args = append(args, "-C")
		clients = o.connectClients
	}
	return append(args,
		"-c", strconv.Itoa(clients), "-j", strconv.Itoa(o.jobs),
		"-T", strconv.Itoa(int(d/time.Second)), "-M", k.mode(),
		"-h", t.host, "-p", strconv.Itoa(t.port), "-U", benchRole, benchRole)
}

// runPgbench runs pgbench select-only for row k against t on cpus (nil:
// wherever) and returns its TPS and pgbench's CPU time.
func runPgbench(ctx context.Context, o options, env []string, t *target, k testKind, d time.Duration, cpus *unix.CPUSet) (tps float64, cpu time.Duration, err error) {
	out, cpu, err := runToolOn(ctx, envFor(env, t), cpus, "pgbench", pgbenchArgs(o, t, k, d)...)
	if err != nil {
		return 0, 0, fmt.Errorf("pgbench %s via %s: %w", k.label(), t.name, err)
	}
	m := tpsLine.FindStringSubmatch(out)
	if m == nil {
		return 0, 0, fmt.Errorf("pgbench %s via %s: no tps line in its output:\n%s", k.label(), t.name, tail(out, 15))
	}
	tps, err = strconv.ParseFloat(m[1], 64)
	if err != nil {
		return 0, 0, fmt.Errorf("pgbench %s via %s: tps %q: %w", k.label(), t.name, m[1], err)
	}
	return tps, cpu, nil
}

// logTail is the end of t's log, for an error message; empty for the
// direct target.
func logTail(t *target) string {
	if t.logFile == "" {
		return ""
	}
	return fmt.Sprintf("\n%s's log ends:\n%s", t.name, tail(readFile(t.logFile), 10))
}

// countingWriter counts and discards what is written to it.
type countingWriter struct{ n int64 }

func (w *countingWriter) Write(p []byte) (int, error) {
	w.n += int64(len(p))
	return len(p), nil
}

// warmUp runs each target once, unrecorded: a short pgbench (caches, the
// proxies' first sessions and the verifier cache) and, for the targets in
// the COPY row, one COPY whose bytes are counted, which proves that every
// target delivers the whole output before anything is timed. A TLS target
// must have TLS on both legs (checkTLS).
func warmUp(ctx context.Context, o options, env []string, targets []*target, spec copySpec) error {
	for _, t := range targets {
		if t.tls {
			version, err := checkTLS(ctx, env, t)
			if err != nil {
				return fmt.Errorf("warm-up: %w", err)
			}
			logf("via %s: TLS on both legs, the server's leg %s", t.name, version)
		}
		if o.warmup > 0 {
			logf("warm-up via %s: pgbench %v", t.name, o.warmup)
			if _, _, err := runPgbench(ctx, o, env, t, simple, o.warmup, nil); err != nil {
				return fmt.Errorf("warm-up: %w%s", err, logTail(t))
			}
		}
		if !copyOut.includes(t) {
			continue
		}
		logf("warm-up via %s: COPY of %d bytes, counted", t.name, spec.bytes)
		var w countingWriter
		if _, _, err := runCopy(ctx, env, t, spec, &w); err != nil {
			return fmt.Errorf("warm-up: %w%s", err, logTail(t))
		}
		if w.n != spec.bytes {
			return fmt.Errorf("warm-up: COPY via %s delivered %d bytes, want %d", t.name, w.n, spec.bytes)
		}
	}
	return nil
}

// measure runs the rounds. Within a round each test runs against every
// target in turn, so slow drift of the machine hits all targets alike; the
// pinned rows come last in each round, between a pin and an unpin.
func measure(ctx context.Context, o options, env []string, targets []*target, meter *cpuMeter, r *report) error {
	devNull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", os.DevNull, err)
	}
	defer devNull.Close()

	var idlePids []int // every proxy: all of them idle between runs
	for _, t := range targets {
		if t.pid != 0 {
			idlePids = append(idlePids, t.pid)
		}
	}
	r.runs = make(map[testKind]map[string][]sample)
	for _, k := range r.rows() {
		r.runs[k] = make(map[string][]sample)
	}
	// runRow runs row k against every target, pgbench on cpus (nil:
	// wherever).
	runRow := func(round int, k testKind, cpus *unix.CPUSet) error {
		for _, t := range targets {
			if !k.includes(t) {
				continue
			}
			var s sample
			for attempt := 0; ; attempt++ {
				if err := waitQuiet(ctx, o.quietWait, meter, idlePids); err != nil {
					return err
				}
				s, err = runOnce(ctx, o, env, t, k, cpus, meter, r.copy, devNull)
				if err != nil {
					return fmt.Errorf("round %d: %w", round, err)
				}
				s.repeats = attempt
				logf("round %d/%d  %-36s %-19s %s", round, o.rounds, k.label(), t.name, s.describe(k, r.copy))
				if !s.skewed() || attempt >= o.repeats {
					break
				}
				logf("other work used %.2f cores during that run; running it again", s.cpu.other)
			}
			r.runs[k][t.name] = append(r.runs[k][t.name], s)
		}
		return nil
	}
	// runPinned runs the pinned rows between a pin and an unpin, which
	// also follows a failure: the next rows must not run pinned.
	runPinned := func(round int) (err error) {
		if err := r.plan.pin(meter, idlePids); err != nil {
			return fmt.Errorf("round %d: pinning: %w", round, err)
		}
		defer func() {
			if uerr := r.plan.unpin(meter, idlePids); uerr != nil {
				err = errors.Join(err, fmt.Errorf("round %d: unpinning: %w", round, uerr))
			}
		}()
		for _, k := range r.pinnedRows() {
			if err := runRow(round, k, &r.plan.server); err != nil {
				return err
			}
		}
		return nil
	}
	for round := 1; round <= o.rounds; round++ {
		for _, k := range r.roundRows() {
			if err := runRow(round, k, nil); err != nil {
				return err
			}
		}
		if r.plan != nil {
			if err := runPinned(round); err != nil {
				return err
			}
		}
	}
	return nil
}

// runOnce runs test k against t once, pgbench on cpus (nil: wherever), and
// measures it.
func runOnce(ctx context.Context, o options, env []string, t *target, k testKind, cpus *unix.CPUSet, meter *cpuMeter, spec copySpec, devNull *os.File) (sample, error) {
	var proxy []int
	if t.pid != 0 {
		proxy = append(proxy, t.pid)
	}
	before := meter.take(proxy...)
	var s sample
	var client time.Duration
	switch k {
	case simple, extended, connect, pinnedSimple, pinnedExtended, tlsSimple, tlsExtended, tlsPinnedSimple, tlsPinnedExtended:
		tps, cpu, err := runPgbench(ctx, o, env, t, k, o.duration, cpus)
		if err != nil {
			return s, err
		}
		s.value, client = tps, cpu
	case copyOut:
		// An *os.File goes to psql as its stdout: no copying in this
		// process.
		took, cpu, err := runCopy(ctx, env, t, spec, devNull)
		if err != nil {
			return s, err
		}
		s.value, client = took.Seconds(), cpu
	}
	meter.settle()
	s.cpu = meter.take(proxy...).since(before, client)
	return s, nil
}

// waitQuiet returns once other work on the machine uses less than
// quietCores, or when maxWait has passed (with a warning), so a run does not
// start while, say, a test suite runs next to it.
func waitQuiet(ctx context.Context, maxWait time.Duration, meter *cpuMeter, pids []int) error {
	if maxWait <= 0 {
		return nil
	}
	start := time.Now()
	warned := false
	for {
		before := meter.take(pids...)
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-time.After(quietSample):
		}
		u := meter.take(pids...).since(before, 0)
		if u.other < 0 || u.other < quietCores {
			if warned {
				logf("quiet again after %v", time.Since(start).Round(time.Second))
			}
			return nil
		}
		if time.Since(start) >= maxWait {
			logf("WARNING: other work still uses %.2f cores after %v of waiting; running anyway", u.other, maxWait)
			return nil
		}
		if !warned {
			logf("other work uses %.2f cores; waiting up to %v for the machine to be quiet", u.other, maxWait)
			warned = true
		}
	}
}
