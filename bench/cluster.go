package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rolegate/rolegate/internal/pgtest"
)

// The cluster storm (issue 12, item 2): -cluster-logins SCRAM logins of one
// role with a limit of -cluster-limit, all started at once, spread
// round-robin over -cluster-instances rolegate instances in front of the
// same server, with -cluster-direct percent of them straight at the server,
// once per policy. Only `-only cluster-storm` runs it.
const (
	// clusterRegisterTimeout bounds the wait for the instances to register
	// on the server (application_name 'rolegate <tag> <address>').
	clusterRegisterTimeout = 30 * time.Second
	// clusterServerSlack is what max_connections has beyond the direct
	// logins: the limit's sessions, the instances' control connections, the
	// benchmark's superuser sessions, room.
	clusterServerSlack = 64
)

// clusterPolicies are the policies, in the order their storms run.
var clusterPolicies = []string{"reject", "wait", "newest-wins", "evict-idle"}

// clusterOptions are the cluster storm's settings, from the flags.
type clusterOptions struct {
	instances, logins, limit int
	// directPct is the share of the logins, in percent, that go straight
	// to the server.
	directPct int
	hold      time.Duration
}

func (o options) cluster() clusterOptions {
	return clusterOptions{instances: o.clusterInstances, logins: o.clusterLogins, limit: o.clusterLimit,
		directPct: o.clusterDirect, hold: o.stormHold}
}

// validate checks the -cluster-* flags; only -only cluster-storm uses them.
func (co clusterOptions) validate() error {
	switch {
	case co.instances < 1:
		return errors.New("-cluster-instances must be at least 1")
	case co.logins < 1:
		return errors.New("-cluster-logins must be at least 1")
	case co.limit < 1:
		return errors.New("-cluster-limit must be at least 1")
	case co.directPct < 0 || co.directPct > 99:
		return fmt.Errorf("-cluster-direct %d: a percentage of the logins, 0 to 99 (some must go through rolegate)", co.directPct)
	}
	return nil
}

// storm is the single-instance storm of the same size, for its wait_timeout
// and bound.
func (co clusterOptions) storm() stormOptions {
	return stormOptions{logins: co.logins, limit: co.limit, hold: co.hold}
}

// directs is how many of the logins go straight to the server.
func (co clusterOptions) directs() int { return co.logins * co.directPct / 100 }

// maxConnections is the server's max_connections for the cluster storm: the
// direct logins may all be connected at once, and must not take the slots
// of the instances' control connections or their server logins, so that a
// 53300 is the role's limit and not "sorry, too many clients already".
func (co clusterOptions) maxConnections() int {
	return max(300, co.directs()+co.limit+co.instances*8+clusterServerSlack)
}

// clusterPlan is where each login goes: -1 straight to the server, else
// the instance's index. The direct logins are spread evenly among the
// others, which go round-robin over the instances.
func clusterPlan(logins, instances, directs int) []int {
	plan := make([]int, logins)
	next := 0
	for i := range plan {
		// i is direct when the count of directs up to it steps up.
		if (i+1)*directs/logins > i*directs/logins {
			plan[i] = -1
			continue
		}
		plan[i] = next
		next = (next + 1) % instances
	}
	return plan
}

// clusterConfig is appended to the configuration of every instance of the
// storm under policy: the storm's [roles.storm_bench], and for every policy
// the wait policy's wait_timeout, because admission as a whole (the role's
// admission lock included) gets startup_timeout + wait_timeout, which the
// logins queued behind thousands of others need under any policy.
func clusterConfig(co clusterOptions, policy string) string {
	s := stormConfig(co.storm(), policy)
	if policy != "wait" {
		s += fmt.Sprintf("wait_timeout = %q   # as for the wait policy: the admission budget of a login queued behind the storm\n", co.storm().waitTimeout().String())
	}
	return s
}

// idleHold holds a session idle for d, then runs select 1, which returns
// the 57P01 of an eviction meanwhile (the server's FATAL waits in the
// socket): an idle session is what evict-idle evicts.
func idleHold(d time.Duration) holdFunc {
	return func(ctx context.Context, c *pgconn.PgConn) error {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-t.C:
		}
		_, err := c.Exec(ctx, "select 1").ReadAll()
		return err
	}
}

// clusterRun is one policy's cluster storm.
type clusterRun struct {
	policy string
	// via counts the logins through the instances, direct those straight
	// at the server; the log lines of every instance go to via.
	via, direct *stormRun
	sessionSamples
	// instances are the instances' names; hwmKiB their VmHWM after the
	// storm (-1: unknown).
	instances []string
	hwmKiB    []int64
	// registered is how many instances the server listed before the storm.
	registered int
	cpu        cpuUse
}

func newClusterRun(policy string, via, direct int) *clusterRun {
	return &clusterRun{policy: policy,
		via:    newLoginTally(policy+", through rolegate", via),
		direct: newLoginTally(policy+", direct", direct)}
}

// last is the time to answer every login.
func (run *clusterRun) last() time.Duration { return max(run.via.last, run.direct.last) }

// failed is how many logins got anything but an answer, hung how many of
// them none at all.
func (run *clusterRun) failed() (failed, hung int) {
	return run.via.failed + run.direct.failed, run.via.hung + run.direct.hung
}

// clusterResult is the cluster storm test.
type clusterResult struct {
	opts clusterOptions
	stormHost
	runs []*clusterRun
}

// measureCluster runs the cluster storm: it creates storm_bench with
// CONNECTION LIMIT the limit (for the direct logins; through rolegate the
// instances' max_sessions is the same), and per policy starts the
// instances, storms them and the server, and stops them.
func measureCluster(ctx context.Context, o options, c *pgtest.Cluster, bin, work string, ctl controlSetup,
	meter *cpuMeter, r *report) error {
	co := o.cluster()
	res := &clusterResult{opts: co}
	r.cluster = res
	host, super, _, err := prepareStorm(ctx, c, "cluster storm", "-cluster-logins", co.logins)
	res.stormHost = host
	if err != nil {
		return err
	}
	defer closeConn(super)
	password, err := createStormRole(ctx, c, "cluster storm", co.limit)
	if err != nil {
		return err
	}
	for _, policy := range clusterPolicies {
		if err := waitQuiet(ctx, o.quietWait, meter, nil); err != nil {
			return err
		}
		run, err := clusterOnce(ctx, co, c, bin, work, ctl, password, super, meter, policy)
		if run != nil {
			res.runs = append(res.runs, run)
		}
		if err != nil {
			return fmt.Errorf("cluster storm %s: %w", policy, err)
		}
		logf("cluster storm %s: %s", policy, run.describe())
		if err := waitRoleGone(ctx, super, stormRole, stormGoneTimeout); err != nil {
			return fmt.Errorf("cluster storm %s: %w", policy, err)
		}
	}
	return nil
}

// clusterOnce starts the instances under policy, runs the storm, and stops
// them.
func clusterOnce(ctx context.Context, co clusterOptions, c *pgtest.Cluster, bin, work string, ctl controlSetup,
	password string, super *pgconn.PgConn, meter *cpuMeter, policy string) (*clusterRun, error) {
	plan := clusterPlan(co.logins, co.instances, co.directs())
	run := newClusterRun(policy, co.logins-co.directs(), co.directs())
	var rgs []*daemon
	for i := range co.instances {
		adminPort, err := pgtest.FreePort()
		if err != nil {
			return nil, err
		}
		adminAddr := net.JoinHostPort("127.0.0.1", strconv.Itoa(adminPort))
		name := fmt.Sprintf("rolegate-cluster-%s-%d", policy, i+1)
		rg, err := startRolegate(ctx, bin, work, c.Addr(), ctl, rolegateInstance{
			name: name, logLevel: "info", logFormat: "json",
			extraConfig: clusterConfig(co, policy), adminHTTP: adminAddr,
		})
		if err != nil {
			return nil, err
		}
		defer rg.stop(syscall.SIGINT)
		if err := waitHealthy(ctx, adminAddr); err != nil {
			return nil, fmt.Errorf("%w%s", err, logTail(rg.target))
		}
		rgs = append(rgs, rg)
		run.instances = append(run.instances, name)
	}
	var err error
	if run.registered, err = waitRegistered(ctx, super, co.instances); err != nil {
		return nil, err
	}
	direct, err := sessionConfig(stormRole, password, stormDatabase, c.Host, c.Port)
	if err != nil {
		return nil, err
	}
	var via []*pgconn.Config
	var pids []int
	for _, rg := range rgs {
		cfg, err := sessionConfig(stormRole, password, stormDatabase, rg.host, rg.port)
		if err != nil {
			return nil, err
		}
		via = append(via, cfg)
		pids = append(pids, rg.pid)
	}
	cfgs := make([]*pgconn.Config, len(plan))
	for i, to := range plan {
		if to < 0 {
			cfgs[i] = direct
		} else {
			cfgs[i] = via[to]
		}
	}
	logf("cluster storm %s: %d logins at once, %d through %d instances round-robin and %d direct, limit %d",
		policy, co.logins, run.via.logins, co.instances, run.direct.logins, co.limit)
	before := meter.take(pids...)
	logins, err := loginsAtOnce(ctx, cfgs, idleHold(co.hold), co.storm().bound(), super, &run.sessionSamples)
	if err != nil {
		return run, err
	}
	meter.settle()
	after := meter.take(pids...)
	run.cpu = after.since(before, 0)
	if wall := after.at.Sub(before.at).Seconds(); wall > 0 && after.selfOK && before.selfOK {
		run.cpu.client = float64(after.self-before.self) / clockTicks / wall
	}
	for i, l := range logins {
		if plan[i] < 0 {
			run.direct.add(l)
		} else {
			run.via.add(l)
		}
	}
	for _, rg := range rgs {
		run.hwmKiB = append(run.hwmKiB, kibField(readFile(fmt.Sprintf("/proc/%d/status", rg.pid)), "VmHWM"))
		run.via.scanLog(rg.logFile)
	}
	return run, nil
}

// waitRegistered returns once the server lists n rolegate instances (the
// registration of each, application_name 'rolegate <tag> <address>' on its
// slot-signal connection), so that the storm starts with every instance
// known to the others.
func waitRegistered(ctx context.Context, super *pgconn.PgConn, n int) (int, error) {
	const sql = `select count(*) from pg_stat_activity where application_name like 'rolegate %' and backend_type = 'client backend'`
	deadline := time.Now().Add(clusterRegisterTimeout)
	for {
		got, err := queryInt(ctx, super, sql)
		if err != nil {
			return 0, fmt.Errorf("counting the registered instances: %w", err)
		}
		if got == n {
			return got, nil
		}
		if time.Now().After(deadline) {
			return got, fmt.Errorf("the server lists %d registered rolegate instances after %v, want %d", got, clusterRegisterTimeout, n)
		}
		select {
		case <-ctx.Done():
			return got, context.Cause(ctx)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// evicted is how many logins got a 57P01, at the login or later, and how
// many of them were direct.
func (run *clusterRun) evicted() (all, direct int) {
	direct = run.direct.evicted + run.direct.evictedAtLogin
	return run.via.evicted + run.via.evictedAtLogin + direct, direct
}

// describe is the storm's outcome in one line, for the progress log.
func (run *clusterRun) describe() string {
	ev, evDirect := run.evicted()
	failed, hung := run.failed()
	return fmt.Sprintf("%d admitted, 53300 %d via rolegate and %d direct, %d evicted (%d direct), %d failed (%d hung); every answer in %s, via rolegate median %s p99 %s; server max %d sessions; VmHWM %s; %s",
		run.via.admitted+run.direct.admitted, run.via.refused, run.direct.refused, ev, evDirect, failed, hung,
		fmtSec(run.last()), fmtSec(percentile(run.via.answers, 50)), fmtSec(percentile(run.via.answers, 99)),
		run.serverMax, run.hwmList(), run.cpu.String())
}

// hwmList is the instances' VmHWM, one after the other.
func (run *clusterRun) hwmList() string {
	var s []string
	for _, kib := range run.hwmKiB {
		s = append(s, fmtKiB(kib))
	}
	return strings.Join(s, " / ")
}

// rows is the cluster storm table, header first.
func (res *clusterResult) rows() [][]string {
	rows := [][]string{{"Policy", "logins via rolegate / direct", "admitted", "53300 via rolegate", "53300 direct",
		"evicted 57P01 (of them direct)", "other errors", "server's max sessions", "median login via rolegate",
		"p99 login via rolegate", "every login answered in", "VmHWM per instance"}}
	for _, run := range res.runs {
		ev, evDirect := run.evicted()
		failed, hung := run.failed()
		other := strconv.Itoa(failed)
		if hung > 0 {
			other += fmt.Sprintf(" (%d hung)", hung)
		}
		rows = append(rows, []string{run.policy,
			fmt.Sprintf("%d / %d", run.via.logins, run.direct.logins),
			strconv.Itoa(run.via.admitted + run.direct.admitted),
			strconv.Itoa(run.via.refused), strconv.Itoa(run.direct.refused),
			fmt.Sprintf("%d (%d)", ev, evDirect), other, strconv.Itoa(run.serverMax),
			fmtSec(percentile(run.via.answers, 50)), fmtSec(percentile(run.via.answers, 99)),
			fmtSec(run.last()), run.hwmList()})
	}
	return rows
}

// notes are the details under the table: the 53300 texts, the sampling,
// the CPU, the instances' logs and the failures.
func (res *clusterResult) notes() []string {
	var out []string
	for _, run := range res.runs {
		s := run.policy + ": "
		for _, t := range []*stormRun{run.via, run.direct} {
			var parts []string
			for _, msg := range sortedKeys(t.refusedBy) {
				parts = append(parts, fmt.Sprintf("%d × %q", t.refusedBy[msg], msg))
			}
			if len(parts) > 0 {
				s += fmt.Sprintf("53300 %s: %s; ", strings.TrimPrefix(t.name, run.policy+", "), strings.Join(parts, ", "))
			}
		}
		s += fmt.Sprintf("%d instances registered before the storm; %d samples of pg_stat_activity", run.registered, run.samples)
		if run.sampleErr != "" {
			s += fmt.Sprintf(" (sampling stopped: %s)", run.sampleErr)
		}
		s += "; " + run.cpu.String() + " (proxy: the instances together; client: this benchmark's SCRAM clients)"
		var lines []string
		for _, msg := range sortedKeys(run.via.logLines) {
			lines = append(lines, fmt.Sprintf("%q %d", msg, run.via.logLines[msg]))
		}
		s += fmt.Sprintf("; the instances logged %s; %d warnings or errors", strings.Join(lines, ", "), run.via.warnings)
		if len(run.via.logWarnings) > 0 {
			s += ": " + strings.Join(run.via.logWarnings, " | ")
		}
		if failures := append(append([]string(nil), run.via.failures...), run.direct.failures...); len(failures) > 0 {
			s += "; failures: " + strings.Join(failures, "; ")
		}
		out = append(out, s)
	}
	return out
}

// verdicts compares with issue 12's requirements.
func (res *clusterResult) verdicts() []string {
	met := func(ok bool) string {
		if ok {
			return "met"
		}
		return "MISSED"
	}
	var out []string
	for _, run := range res.runs {
		failed, hung := run.failed()
		s := fmt.Sprintf("%s: the server's sessions of the role at most %d (limit %d): %s; every login answered (admitted, 53300 or 57P01): %d other errors, %d of them hung: %s",
			run.policy, run.serverMax, res.opts.limit, met(run.serverMax <= res.opts.limit && run.sampleErr == "" && run.samples > 0),
			failed, hung, met(failed == 0))
		if run.policy == "newest-wins" {
			s += fmt.Sprintf("; 53300 through rolegate: %d (target 0): %s", run.via.refused, met(run.via.refused == 0))
		}
		out = append(out, s)
	}
	return out
}

// clusterSettings describes the test in one line.
func clusterSettings(o options, res *clusterResult) string {
	co := o.cluster()
	s := fmt.Sprintf("%d SCRAM logins of role %s (database %s) started at once, each its own pgx pgconn connection (sslmode=disable): %d (%d%%) straight at the server, spread evenly among the others, which go round-robin over %d rolegate instances in front of the same server; an admitted login holds its session idle for %v, then runs select 1 (which returns an eviction's 57P01) and closes; CONNECTION LIMIT %d on the server and [roles.%s] max_sessions = %d on every instance; wait_timeout %v under every policy; a login not answered within %v counts as hung; pg_stat_activity sampled every %v",
		co.logins, stormRole, stormDatabase, co.directs(), co.directPct, co.instances, co.hold, co.limit, stormRole, co.limit,
		co.storm().waitTimeout(), co.storm().bound(), stormSampleEvery)
	if res != nil {
		s += fmt.Sprintf("; RLIMIT_NOFILE %d, somaxconn %s, the server's max_connections %s", res.nofile, res.somaxconn, res.maxConnections)
	}
	return s
}

// clusterSetupLine says how the cluster storm's rolegates were set up.
const clusterSetupLine = "rolegate-cluster-<policy>-1, -2, …: per policy, -cluster-instances instances of the same binary with the same configuration and control role, started together and stopped after their storm: each its own listen port and [admin] http port, [cluster] left out (the instances register themselves on the server), [roles.storm_bench] max_sessions = the limit, policy = the storm's, wait_timeout as above, max_evictions = \"off\" ([limits] defaults otherwise), [log] level = \"info\", format = \"json\""

// printCluster writes the cluster storm section, as text or as Markdown.
func (r *report) printCluster(w io.Writer, md bool) {
	res := r.cluster
	fmt.Fprintf(w, "\nCluster storm (issue 12), %d instances, %d logins at once, limit %d, times from the storm's start:\n\n", res.opts.instances, res.opts.logins, res.opts.limit)
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
