package main

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// testKind is one row of the table.
type testKind int

const (
	simple testKind = iota
	extended
	copyOut
	connect
	// pinnedSimple and pinnedExtended are the select-only rows with the
	// server and pgbench on one CPU and the proxy on another (cpuPlan).
	pinnedSimple
	pinnedExtended
	// tlsSimple and tlsExtended are the select-only rows with TLS on both
	// legs, against the TLS targets only (issue 11); tlsPinnedSimple and
	// tlsPinnedExtended are the same pinned.
	tlsSimple
	tlsExtended
	tlsPinnedSimple
	tlsPinnedExtended
)

// tests are the rows, in the order they run within a round.
var tests = []testKind{simple, extended, copyOut, connect}

// pinnedTests are the pinned rows, which run after tests in each round.
var pinnedTests = []testKind{pinnedSimple, pinnedExtended}

// tlsTests are the TLS rows, which run after tests in each round, and
// tlsPinnedTests the pinned ones, after pinnedTests.
var (
	tlsTests       = []testKind{tlsSimple, tlsExtended}
	tlsPinnedTests = []testKind{tlsPinnedSimple, tlsPinnedExtended}
)

// includes says whether row k runs against t: the TLS rows against the TLS
// targets and the other rows against the others, where an extra target
// (rolegate-gmp1) runs only the select-only and connect-rate rows.
func (k testKind) includes(t *target) bool {
	if k.tls() != t.tls {
		return false
	}
	return !t.extra || k != copyOut
}

// tls says whether k is a row with TLS on both legs.
func (k testKind) tls() bool {
	return k == tlsSimple || k == tlsExtended || k == tlsPinnedSimple || k == tlsPinnedExtended
}

// base is the target the row's ratios are to: direct, or direct-tls for the
// TLS rows.
func (k testKind) base() string {
	if k.tls() {
		return directTLS
	}
	return "direct"
}

// goal is the target for rolegate's throughput relative to direct:
// 0.95 for the select-only rows and COPY (issue 2), 0.9 for the connect
// rate (issue 3).
func (k testKind) goal() float64 {
	if k == connect {
		return 0.9
	}
	return 0.95
}

// mode is pgbench's -M for the pgbench rows.
func (k testKind) mode() string {
	if k == extended || k == pinnedExtended || k == tlsExtended || k == tlsPinnedExtended {
		return "extended"
	}
	return "simple"
}

func (k testKind) label() string {
	switch k {
	case simple:
		return "select-only -M simple"
	case extended:
		return "select-only -M extended"
	case connect:
		return "connect rate -C"
	case pinnedSimple, pinnedExtended:
		return fmt.Sprintf("select-only -M %s, pinned", k.mode())
	case tlsSimple, tlsExtended:
		return fmt.Sprintf("select-only -M %s, TLS", k.mode())
	case tlsPinnedSimple, tlsPinnedExtended:
		return fmt.Sprintf("select-only -M %s, TLS, pinned", k.mode())
	default:
		return "COPY out"
	}
}

// rowLabel is the row's name in the tables, with its unit.
func (k testKind) rowLabel(spec copySpec) string {
	switch k {
	case simple, extended:
		return fmt.Sprintf("select-only TPS, -M %s", k.mode())
	case connect:
		return "connect rate, logins/s (pgbench -C)"
	case pinnedSimple, pinnedExtended:
		return fmt.Sprintf("select-only TPS, -M %s, pinned", k.mode())
	case tlsSimple, tlsExtended:
		return fmt.Sprintf("select-only TPS, -M %s, TLS on both legs", k.mode())
	case tlsPinnedSimple, tlsPinnedExtended:
		return fmt.Sprintf("select-only TPS, -M %s, TLS on both legs, pinned", k.mode())
	default:
		return fmt.Sprintf("COPY %d MB out, seconds", spec.bytes/1_000_000)
	}
}

// higherIsBetter is true for TPS and false for COPY seconds.
func (k testKind) higherIsBetter() bool { return k != copyOut }

func (k testKind) format(v float64) string {
	if k == copyOut {
		return fmt.Sprintf("%.2f", v)
	}
	return fmt.Sprintf("%.0f", v)
}

// sample is one measured run.
type sample struct {
	value float64 // TPS, or seconds for COPY
	cpu   cpuUse
	// repeats is how often the run was repeated because other work skewed
	// it; this sample is the last attempt.
	repeats int
}

// skewed reports whether other work on the machine used enough CPU during
// the run to skew it.
func (s sample) skewed() bool { return s.cpu.other > skewedCores }

func (s sample) describe(k testKind, spec copySpec) string {
	var b strings.Builder
	if k == copyOut {
		fmt.Fprintf(&b, "%7.2f s (%.0f MB/s)", s.value, float64(spec.bytes)/1e6/s.value)
	} else {
		fmt.Fprintf(&b, "%7.0f TPS", s.value)
	}
	b.WriteString("  " + s.cpu.String())
	if s.repeats > 0 {
		fmt.Fprintf(&b, " (attempt %d)", s.repeats+1)
	}
	if s.skewed() {
		b.WriteString(" SKEWED by other work")
	}
	return b.String()
}

// report is everything the run prints at the end.
type report struct {
	opts      options
	machine   machine
	targets   []*target
	copy      copySpec
	started   time.Time
	wall      time.Duration
	runs      map[testKind]map[string][]sample
	logins    *loginResult   // nil when -logins 0
	limits    *limitsResult  // nil when -limit-logins 0
	storm     *stormResult   // nil when -storm-logins 0
	cluster   *clusterResult // nil unless -only cluster-storm
	proxyLogs []string
	gc        []gcPauses // per rolegate, from its gctrace lines
	// idle is the CPU use before the first run, with everything started
	// and nothing of the benchmark's doing work.
	idle cpuUse
	// plan is where the pinned rows ran; nil when they did not, and
	// pinnedNote then says why.
	plan       *cpuPlan
	pinnedNote string
	// idleMem is the idle-session test, one entry per proxy.
	idleMem []idleMemory
}

// roundRows are the unpinned rows, in the order they run within a round:
// the plain rows (not with -only tls), then the TLS rows (not with -no-tls).
func (r *report) roundRows() []testKind {
	var rows []testKind
	if r.opts.plainRows() {
		rows = append(rows, tests...)
	}
	if r.opts.tlsRows() {
		rows = append(rows, tlsTests...)
	}
	return rows
}

// pinnedRows are the pinned rows, in the order they run after roundRows
// within a round; none when the pinned rows do not run.
func (r *report) pinnedRows() []testKind {
	if r.plan == nil {
		return nil
	}
	var rows []testKind
	if r.opts.plainRows() {
		rows = append(rows, pinnedTests...)
	}
	if r.opts.tlsRows() {
		rows = append(rows, tlsPinnedTests...)
	}
	return rows
}

// rows are the rows that ran, in the order they ran within a round.
func (r *report) rows() []testKind {
	return append(r.roundRows(), r.pinnedRows()...)
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

func (r *report) values(k testKind, target string, pick func(sample) float64) []float64 {
	var xs []float64
	for _, s := range r.runs[k][target] {
		xs = append(xs, pick(s))
	}
	return xs
}

func (r *report) median(k testKind, target string) float64 {
	return median(r.values(k, target, func(s sample) float64 { return s.value }))
}

// ratio is target/direct (direct-tls for the TLS rows) of the medians: TPS
// for the select-only and connect-rate rows, seconds (so above 1 is slower)
// for COPY.
func (r *report) ratio(k testKind, target string) float64 {
	return r.median(k, target) / r.median(k, k.base())
}

// medianCell is the row's median for t, "–" when the row does not run
// against t.
func (r *report) medianCell(k testKind, t *target) string {
	if !k.includes(t) {
		return "–"
	}
	return k.format(r.median(k, t.name))
}

// ratioCell is ratio formatted, "–" when the row does not run against t.
func (r *report) ratioCell(k testKind, t *target) string {
	if !k.includes(t) {
		return "–"
	}
	return fmt.Sprintf("%.2f×", r.ratio(k, t.name))
}

// proxies are the targets through a proxy without TLS.
func (r *report) proxies() []*target {
	var ps []*target
	for _, t := range r.targets {
		if t.pid != 0 && !t.tls {
			ps = append(ps, t)
		}
	}
	return ps
}

func (r *report) has(name string) bool {
	return slices.ContainsFunc(r.targets, func(t *target) bool { return t.name == name })
}

func (r *report) target(name string) *target {
	for _, t := range r.targets {
		if t.name == name {
			return t
		}
	}
	return nil
}

// settings is one line describing what ran in the rounds and the login
// latency; empty for -only.
func (r *report) settings() string {
	o := r.opts
	if o.alone() {
		return ""
	}
	if o.only == onlyTLS {
		return fmt.Sprintf("%d rounds, interleaved; the TLS rows only (-only tls): pgbench -n -S -c %d -j %d -T %d (scale %d) with PGSSLMODE=require",
			o.rounds, o.clients, o.jobs, int(o.duration/time.Second), o.scale)
	}
	s := fmt.Sprintf("%d rounds, interleaved; pgbench -n -S -c %d -j %d -T %d (scale %d); COPY (select repeat('x', %d) from generate_series(1, %d)) TO STDOUT, %d bytes, psql > /dev/null; connect rate pgbench -n -S -C -c %d -j %d -T %d",
		o.rounds, o.clients, o.jobs, int(o.duration/time.Second), o.scale, copyRowLen, r.copy.rows, r.copy.bytes,
		o.connectClients, o.jobs, int(o.duration/time.Second))
	if o.logins > 0 {
		s += fmt.Sprintf("; login latency: %d sequential pgconn.Connect logins per target, alternating, before the rounds", o.logins)
	}
	if o.tlsRows() {
		s += "; the select-only rows again with TLS on both legs (PGSSLMODE=require)"
	}
	return s
}

// setupLines say how the proxies were set up.
func (r *report) setupLines() []string {
	m := r.machine
	name := "rolegate"
	switch r.opts.only {
	case onlyLimits:
		name = limitsTarget
	case onlyStorm:
		name = "rolegate-storm-*"
	case onlyCluster:
		name = "rolegate-cluster-*"
	case onlyTLS:
		name = rolegateTLS
	}
	lines := []string{name + ": proxy mode (SCRAM with the client, the recovered ClientKey to the server), control connection " + m.control}
	if r.has(gmp1Target) {
		lines = append(lines, gmp1Target+": the same binary and configuration, started with GOMAXPROCS=1; it runs the select-only and connect-rate rows only")
	}
	if m.pgbouncerAuth != "" {
		lines = append(lines, "PgBouncer: session mode, "+m.pgbouncerAuth)
	}
	if r.has(directTLS) {
		lines = append(lines, "TLS on both legs: "+tlsSetup)
	}
	if r.limits != nil {
		lines = append(lines, limitsSetupLine)
	}
	if r.storm != nil {
		lines = append(lines, stormSetupLine)
	}
	if r.cluster != nil {
		lines = append(lines, clusterSetupLine)
	}
	return lines
}

func (r *report) machineLine() string {
	m := r.machine
	s := fmt.Sprintf("%d CPUs (nproc), %s, %s RAM, Linux %s; PostgreSQL %s; %s; ", m.cpus, m.cpuModel, m.memory, m.kernel, m.postgres, m.pgbench)
	if m.pgbouncer != "" {
		s += m.pgbouncer + "; "
	}
	s += fmt.Sprintf("%s; %s", m.goVersion, m.rolegate)
	if r.idle.other >= 0 {
		s += fmt.Sprintf("; other work used %.2f cores in the %v before the first run", r.idle.other, idleCheck)
	}
	return s
}

// verdicts compares the medians with the targets from the issues: rolegate
// at least 0.95× direct on the select-only rows and COPY (for COPY: at most
// 1/0.95 the time) and ahead of PgBouncer (issue 2), and at least 0.9×
// direct on the connect rate (issue 3); then the login latency rolegate
// adds. rolegate-gmp1 gets the same lines, for comparison.
func (r *report) verdicts() []string {
	var out []string
	for _, name := range []string{"rolegate", gmp1Target, goroutinesTarget} {
		t := r.target(name)
		if t == nil {
			continue
		}
		for _, k := range tests {
			if !k.includes(t) {
				continue
			}
			ratio := r.ratio(k, name)
			throughput := ratio
			if !k.higherIsBetter() {
				throughput = 1 / ratio
			}
			ok := "met"
			if throughput < k.goal() {
				ok = "MISSED"
			}
			line := fmt.Sprintf("%s, %s: %.2f× direct throughput: ≥ %.2f× %s", k.label(), name, throughput, k.goal(), ok)
			if r.has("pgbouncer") {
				rg, pb := r.median(k, name), r.median(k, "pgbouncer")
				ahead := rg > pb
				if !k.higherIsBetter() {
					ahead = rg < pb
				}
				pbThroughput := r.ratio(k, "pgbouncer")
				if !k.higherIsBetter() {
					pbThroughput = 1 / pbThroughput
				}
				switch {
				case k == connect:
					line += fmt.Sprintf(" (PgBouncer: %.2f×)", pbThroughput)
				case ahead:
					line += "; ahead of PgBouncer"
				default:
					line += fmt.Sprintf("; NOT ahead of PgBouncer (%.2f×)", pbThroughput)
				}
			}
			if f := r.target(pgbouncerFresh); f != nil && k.includes(f) && k != connect {
				// Fresh backends, as a 1:1 proxy has: the fair throughput
				// comparison (issue 11), where the warm pool's lead is the
				// backends' memory, not the relay.
				fresh := r.ratio(k, pgbouncerFresh)
				if !k.higherIsBetter() {
					fresh = 1 / fresh
				}
				verdict := "at least level with"
				if throughput < fresh {
					verdict = "BEHIND"
				}
				line += fmt.Sprintf("; %s PgBouncer with fresh backends (%.2f×)", verdict, fresh)
			}
			out = append(out, line)
		}
	}
	if res := r.logins; res != nil && r.has("rolegate") {
		for _, t := range r.proxies() {
			if !loginsInclude(t) {
				continue
			}
			out = append(out, fmt.Sprintf("login latency, %s: adds %s at the median and %s at p99 to a direct login (%s and %s)",
				t.name, fmtAddedMs(res.percentile(t.name, 50)-res.percentile("direct", 50)),
				fmtAddedMs(res.percentile(t.name, 99)-res.percentile("direct", 99)),
				fmtMs(res.percentile("direct", 50)), fmtMs(res.percentile("direct", 99))))
		}
	}
	return out
}

// print writes the plain-text report and then the same as Markdown.
func (r *report) print(w io.Writer) {
	fmt.Fprintf(w, "\nrolegate benchmark, %s, wall time %s\n", r.started.UTC().Format("2006-01-02 15:04 UTC"), r.wall.Round(time.Second))
	fmt.Fprintf(w, "machine: %s\n", r.machineLine())
	if s := r.settings(); s != "" {
		fmt.Fprintf(w, "runs:    %s\n", s)
	}
	if len(r.idleMem) > 0 {
		fmt.Fprintf(w, "idle:    %s\n", idleSettings(r.opts))
	}
	if r.limits != nil {
		fmt.Fprintf(w, "limits:  %s\n", limitsSettings(r.opts))
	}
	if r.storm != nil {
		fmt.Fprintf(w, "storm:   %s\n", stormSettings(r.opts, r.storm))
	}
	if r.cluster != nil {
		fmt.Fprintf(w, "cluster: %s\n", clusterSettings(r.opts, r.cluster))
	}
	for _, line := range r.setupLines() {
		fmt.Fprintf(w, "setup:   %s\n", line)
	}
	if r.machine.pgbouncerNote != "" {
		fmt.Fprintf(w, "NOTE:    %s\n", r.machine.pgbouncerNote)
	}
	if r.opts.alone() {
		if r.limits != nil {
			r.printLimits(w)
		}
		if r.storm != nil {
			r.printStorm(w, false)
		}
		if r.cluster != nil {
			r.printCluster(w, false)
		}
		r.printAloneVerdicts(w, false)
		fmt.Fprintf(w, "\n----- Markdown, for bench/README.md -----\n\n")
		r.markdown(w)
		return
	}

	if r.opts.plainRows() {
		fmt.Fprintf(w, "\nMedians (TPS and logins/s: higher is better; COPY: seconds, lower is better, ratio is time target/direct)\n\n")
		printTable(w, r.medianRows(tests, false))
		r.printPinned(w, false)
	}
	r.printTLS(w, false)

	if r.logins != nil {
		fmt.Fprintf(w, "\nLogin latency, dial to ReadyForQuery (%d logins per target)\n\n", r.opts.logins)
		printTable(w, r.loginRows())
		fmt.Fprintf(w, "\n%s\n", r.logins.skewSummary(r.opts.repeats))
	}
	r.printIdle(w, false)
	if r.limits != nil {
		r.printLimits(w)
	}
	if len(r.gc) > 0 {
		fmt.Fprintf(w, "\nGarbage collection over the whole run (GODEBUG=gctrace=1)\n\n")
		for _, g := range r.gc {
			fmt.Fprintf(w, "  %s\n", g.describe())
		}
	}
	if r.storm != nil {
		r.printStorm(w, false)
	}

	fmt.Fprintf(w, "\nEvery run (CPU in cores, %d in all: the machine's busy time split into the server, the client tool, the proxy and other work)\n\n", r.machine.cpus)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, k := range r.rows() {
		for _, t := range r.targets {
			if !k.includes(t) {
				continue
			}
			for i, s := range r.runs[k][t.name] {
				fmt.Fprintf(tw, "%s\t%s\tround %d\t%s\n", k.label(), t.name, i+1, s.describe(k, r.copy))
			}
		}
	}
	tw.Flush()

	fmt.Fprintf(w, "\n%s\n", r.skewSummary())

	if v := r.verdicts(); len(v) > 0 {
		fmt.Fprintf(w, "\nTargets (rolegate ≥ 0.95× direct on select-only and COPY and ahead of PgBouncer; ≥ 0.9× on the connect rate):\n")
		for _, line := range v {
			fmt.Fprintf(w, "  %s\n", line)
		}
	}
	if v := r.tlsVerdicts(); len(v) > 0 {
		fmt.Fprintf(w, "\nWith TLS on both legs (issue 11: rolegate at least level with PgBouncer there too):\n")
		for _, line := range v {
			fmt.Fprintf(w, "  %s\n", line)
		}
	}
	r.printAloneVerdicts(w, false)
	if len(r.proxyLogs) > 0 {
		fmt.Fprintf(w, "\nProxy logs:\n")
		for _, line := range r.proxyLogs {
			fmt.Fprintf(w, "  %s\n", line)
		}
	}

	fmt.Fprintf(w, "\n----- Markdown, for bench/README.md -----\n\n")
	r.markdown(w)
}

// markdown writes the results section's body.
func (r *report) markdown(w io.Writer) {
	fmt.Fprintf(w, "Run %s, wall time %s.\n\n", r.started.UTC().Format("2006-01-02 15:04 UTC"), r.wall.Round(time.Second))
	fmt.Fprintf(w, "- Machine: %s\n", r.machineLine())
	if s := r.settings(); s != "" {
		fmt.Fprintf(w, "- Runs: %s\n", s)
	}
	if len(r.idleMem) > 0 {
		fmt.Fprintf(w, "- Idle sessions: %s\n", idleSettings(r.opts))
	}
	if r.limits != nil {
		fmt.Fprintf(w, "- Newest-wins: %s\n", strings.TrimPrefix(limitsSettings(r.opts), "newest-wins: "))
	}
	if r.storm != nil {
		fmt.Fprintf(w, "- Login storm: %s\n", stormSettings(r.opts, r.storm))
	}
	if r.cluster != nil {
		fmt.Fprintf(w, "- Cluster storm: %s\n", clusterSettings(r.opts, r.cluster))
	}
	for _, line := range r.setupLines() {
		fmt.Fprintf(w, "- %s\n", line)
	}
	if r.machine.pgbouncerNote != "" {
		fmt.Fprintf(w, "- Note: %s\n", r.machine.pgbouncerNote)
	}
	if r.opts.alone() {
		if r.limits != nil {
			r.markdownLimits(w)
		}
		if r.storm != nil {
			r.printStorm(w, true)
		}
		if r.cluster != nil {
			r.printCluster(w, true)
		}
		r.printAloneVerdicts(w, true)
		return
	}
	if r.opts.plainRows() {
		fmt.Fprintln(w)
		mdTable(w, r.medianRows(tests, true))
		r.printPinned(w, true)
	}
	r.printTLS(w, true)

	if r.logins != nil {
		fmt.Fprintf(w, "\nLogin latency, from the dial to ReadyForQuery, %d sequential logins per target (pgx pgconn.Connect, SCRAM, sslmode=disable), the targets alternating login by login:\n\n", r.opts.logins)
		mdTable(w, r.loginRows())
		fmt.Fprintf(w, "\n%s\n", r.logins.skewSummary(r.opts.repeats))
	}
	r.printIdle(w, true)
	if r.limits != nil {
		r.markdownLimits(w)
	}
	if r.storm != nil {
		r.printStorm(w, true)
	}

	fmt.Fprintf(w, "\nEvery run, in the order they ran within each round:\n\n")
	cols := []string{"Row", "Target"}
	align := []string{"---", "---"}
	for i := 1; i <= r.opts.rounds; i++ {
		cols = append(cols, fmt.Sprintf("round %d", i))
		align = append(align, "--:")
	}
	mdRow(w, cols)
	mdRow(w, align)
	for _, k := range r.rows() {
		for _, t := range r.targets {
			if !k.includes(t) {
				continue
			}
			row := []string{k.label(), t.name}
			for _, s := range r.runs[k][t.name] {
				cell := k.format(s.value)
				if s.skewed() {
					cell += " †"
				}
				row = append(row, cell)
			}
			mdRow(w, row)
		}
	}
	fmt.Fprintf(w, "\n%s\n", r.skewSummary())

	fmt.Fprintf(w, "\nCPU during the runs, in cores (%d in all), median of the rounds: the machine's busy time, and the server's (postmaster and backends), the client tool's (pgbench or psql), the proxy's and the rest's (other work on the machine) share of it:\n\n", r.machine.cpus)
	mdRow(w, []string{"Row", "Target", "machine", "server", "client", "proxy", "other", "proxy CPU per unit of work"})
	mdRow(w, []string{"---", "---", "--:", "--:", "--:", "--:", "--:", "--:"})
	for _, k := range r.rows() {
		for _, t := range r.targets {
			if !k.includes(t) {
				continue
			}
			row := []string{k.label(), t.name}
			for _, pick := range []func(cpuUse) float64{
				func(u cpuUse) float64 { return u.machine },
				func(u cpuUse) float64 { return u.server },
				func(u cpuUse) float64 { return u.client },
				func(u cpuUse) float64 { return u.proxy },
				func(u cpuUse) float64 { return u.other },
			} {
				v := median(r.values(k, t.name, func(s sample) float64 { return pick(s.cpu) }))
				cell := "–"
				if v >= 0 {
					cell = fmt.Sprintf("%.2f", v)
				}
				row = append(row, cell)
			}
			mdRow(w, append(row, r.proxyCost(k, t)))
		}
	}
	v := append(r.verdicts(), r.tlsVerdicts()...)
	if r.limits != nil {
		v = append(v, r.limits.verdicts()...)
	}
	if r.storm != nil {
		v = append(v, r.storm.verdicts()...)
	}
	if len(v) > 0 {
		fmt.Fprintf(w, "\nAgainst the targets:\n\n")
		for _, line := range v {
			fmt.Fprintf(w, "- %s\n", line)
		}
	}
}

// printAloneVerdicts writes the newest-wins and storm tests' verdicts, each
// under its issue's targets, as text or as Markdown.
func (r *report) printAloneVerdicts(w io.Writer, md bool) {
	section := func(title string, lines []string) {
		if md {
			fmt.Fprintf(w, "\n%s:\n\n", title)
		} else {
			fmt.Fprintf(w, "\n%s:\n", title)
		}
		for _, line := range lines {
			if md {
				fmt.Fprintf(w, "- %s\n", line)
			} else {
				fmt.Fprintf(w, "  %s\n", line)
			}
		}
	}
	if r.limits != nil {
		section("Against issue 4's target (a newest-wins login at most 5 ms more than a plain login at the median, 30 ms at p99)", r.limits.verdicts())
	}
	if r.storm != nil {
		section("Against issue 11's storm targets (every login answered, the server never above the limit, rolegate's peak RSS under 256 MiB, /healthz within 100 ms, every login answered under reject within 1.5× of the direct storm)", r.storm.verdicts())
	}
	if r.cluster != nil {
		section("Against issue 12's requirements (the server's count of the role's sessions never above the limit; every login answered: admitted, 53300 or evicted with 57P01; under newest-wins no login through rolegate gets 53300)", r.cluster.verdicts())
	}
}

// proxyCost is the proxy's CPU time per transaction (select-only rows), per
// connection (connect rate) or per GB of COPY output, the median of the
// rounds; "–" for the direct target.
func (r *report) proxyCost(k testKind, t *target) string {
	if t.pid == 0 {
		return "–"
	}
	var costs []float64
	for _, s := range r.runs[k][t.name] {
		if s.cpu.proxy < 0 {
			return "?"
		}
		if k == copyOut {
			// cores × seconds = CPU seconds, per GB.
			costs = append(costs, s.cpu.proxy*s.value/(float64(r.copy.bytes)/1e9))
		} else {
			// cores / TPS = CPU seconds per transaction.
			costs = append(costs, s.cpu.proxy/s.value*1e6)
		}
	}
	switch k {
	case copyOut:
		return fmt.Sprintf("%.2f s/GB", median(costs))
	case connect:
		return fmt.Sprintf("%.0f µs/login", median(costs))
	}
	return fmt.Sprintf("%.1f µs/txn", median(costs))
}

// skewSummary says how many runs other work on the machine got in the way
// of.
func (r *report) skewSummary() string {
	var runs, repeated, repeats, skewed int
	for _, byTarget := range r.runs {
		for _, samples := range byTarget {
			for _, s := range samples {
				runs++
				if s.repeats > 0 {
					repeated++
					repeats += s.repeats
				}
				if s.skewed() {
					skewed++
				}
			}
		}
	}
	line := fmt.Sprintf("Other work on the machine: %d of %d runs were repeated (%d repeats in all) because other processes used more than %.2f cores during them", repeated, runs, repeats, skewedCores)
	if skewed > 0 {
		line += fmt.Sprintf("; %d of the runs kept (marked †) were still skewed after %d repeats", skewed, r.opts.repeats)
	}
	return line + "."
}

func mdRow(w io.Writer, cells []string) {
	fmt.Fprintf(w, "| %s |\n", strings.Join(cells, " | "))
}

// mdTable writes rows, header first, as a Markdown table with the first
// column left-aligned and the others right-aligned.
func mdTable(w io.Writer, rows [][]string) {
	mdRow(w, rows[0])
	align := []string{"---"}
	for range rows[0][1:] {
		align = append(align, "--:")
	}
	mdRow(w, align)
	for _, row := range rows[1:] {
		mdRow(w, row)
	}
}

// medianRows is the table of medians of kinds, header first: per target
// the median, then per proxy the ratio to direct. kinds are all TLS rows or
// none (its columns are then the TLS targets, and the ratios are to
// direct-tls). md names the table's first column and says that COPY's
// ratio is one of times, as the text report says above its table.
func (r *report) medianRows(kinds []testKind, md bool) [][]string {
	withTLS := len(kinds) > 0 && kinds[0].tls()
	base := "direct"
	if withTLS {
		base = directTLS
	}
	var cols, proxies []*target
	for _, t := range r.targets {
		if t.tls != withTLS {
			continue
		}
		cols = append(cols, t)
		if t.pid != 0 {
			proxies = append(proxies, t)
		}
	}
	header := []string{""}
	sep := "/"
	if md {
		header, sep = []string{"Median of the rounds"}, " / "
	}
	for _, t := range cols {
		header = append(header, t.name)
	}
	for _, t := range proxies {
		header = append(header, t.name+sep+base)
	}
	rows := [][]string{header}
	for _, k := range kinds {
		label := k.rowLabel(r.copy)
		if md && k == copyOut {
			label += " (ratio: time)"
		}
		row := []string{label}
		for _, t := range cols {
			row = append(row, r.medianCell(k, t))
		}
		for _, t := range proxies {
			row = append(row, r.ratioCell(k, t))
		}
		rows = append(rows, row)
	}
	return rows
}

// printTLS writes the TLS rows' medians, the pinned ones included when they
// ran, as text or as Markdown; nothing with -no-tls.
func (r *report) printTLS(w io.Writer, md bool) {
	if !r.opts.tlsRows() {
		return
	}
	where := "alone (-only tls)"
	if r.opts.plainRows() {
		where = "after the plain rows of each round"
	}
	if r.plan != nil {
		where += ", pinned last in each round (" + r.plan.describe() + ")"
	}
	fmt.Fprintf(w, "\nSelect-only rows with TLS on both legs (issue 11), %s; set up as the TLS line above says; pgbouncer-tls has PgBouncer's warm pool, as pgbouncer (TPS, higher is better):\n\n", where)
	kinds := append(slices.Clone(tlsTests), tlsPinnedTests...)
	if r.plan == nil {
		kinds = tlsTests
	}
	if md {
		mdTable(w, r.medianRows(kinds, true))
	} else {
		printTable(w, r.medianRows(kinds, false))
	}
	if r.plan == nil && r.pinnedNote != "" && !r.opts.plainRows() {
		// A full run has said so under the plain pinned rows.
		fmt.Fprintf(w, "\nPinned rows: not run: %s.\n", r.pinnedNote)
	}
}

// tlsVerdicts compares rolegate-tls with direct-tls and with pgbouncer-tls
// on the TLS rows: issue 11 asks for rolegate at least level with
// PgBouncer there too.
func (r *report) tlsVerdicts() []string {
	if !r.has(rolegateTLS) {
		return nil
	}
	var out []string
	for _, k := range r.rows() {
		if !k.tls() {
			continue
		}
		line := fmt.Sprintf("%s, %s: %.2f× %s throughput", k.label(), rolegateTLS, r.ratio(k, rolegateTLS), directTLS)
		if r.has(pgbouncerTLS) {
			verdict := "at least level with"
			if r.median(k, rolegateTLS) < r.median(k, pgbouncerTLS) {
				verdict = "BEHIND"
			}
			line += fmt.Sprintf("; %s %s (%.2f×)", verdict, pgbouncerTLS, r.ratio(k, pgbouncerTLS))
		}
		out = append(out, line)
	}
	return out
}

// printPinned writes the pinned rows' medians, as text or as Markdown, or
// why they did not run.
func (r *report) printPinned(w io.Writer, md bool) {
	if r.plan == nil {
		if r.pinnedNote != "" {
			fmt.Fprintf(w, "\nPinned rows: not run: %s.\n", r.pinnedNote)
		}
		return
	}
	fmt.Fprintf(w, "\nPinned select-only rows, after the other rows of each round: %s. A proxy with a CPU of its own, as on another host; not the issues' target rows. rolegate's Go runtime follows its affinity and runs with GOMAXPROCS=1 there, as rolegate-gmp1 does (TPS, higher is better):\n\n", r.plan.describe())
	if md {
		mdTable(w, r.medianRows(pinnedTests, true))
	} else {
		printTable(w, r.medianRows(pinnedTests, false))
	}
}

// loginRows is the login-latency table, header first: per target the median
// and p99, and for the proxies what they add to a direct login.
func (r *report) loginRows() [][]string {
	res := r.logins
	rows := [][]string{{"Login latency", "median", "p99", "added at the median", "added at p99"}}
	d50, d99 := res.percentile("direct", 50), res.percentile("direct", 99)
	for _, t := range r.targets {
		if !loginsInclude(t) {
			continue
		}
		p50, p99 := res.percentile(t.name, 50), res.percentile(t.name, 99)
		row := []string{t.name, fmtMs(p50), fmtMs(p99), "–", "–"}
		if t.pid != 0 {
			row[3], row[4] = fmtAddedMs(p50-d50), fmtAddedMs(p99-d99)
		}
		rows = append(rows, row)
	}
	return rows
}

// skewSummary says how much other work got in the way of the logins.
func (res *loginResult) skewSummary(repeats int) string {
	line := fmt.Sprintf("Login latency: %d of %d batches of %d logins per target were run again because other processes used more than %.2f cores during them", res.repeated, res.batches+res.repeated, loginBatch, skewedCores)
	if res.skewed > 0 {
		line += fmt.Sprintf("; %d of the batches kept were still skewed after %d repeats", res.skewed, repeats)
	}
	return line + "."
}

// printTable writes rows as a right-aligned plain-text table.
func printTable(w io.Writer, rows [][]string) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	for _, row := range rows {
		fmt.Fprintln(tw, strings.Join(row, "\t")+"\t")
	}
	tw.Flush()
}
