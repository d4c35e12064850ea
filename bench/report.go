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
)

// tests are the rows, in the order they run within a round.
var tests = []testKind{simple, extended, copyOut}

// mode is pgbench's -M for the select-only rows.
func (k testKind) mode() string {
	if k == extended {
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
	default:
		return "COPY out"
	}
}

// rowLabel is the row's name in the tables, with its unit.
func (k testKind) rowLabel(spec copySpec) string {
	switch k {
	case simple, extended:
		return fmt.Sprintf("select-only TPS, -M %s", k.mode())
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
	proxyLogs []string
	// idle is the CPU use before the first run, with everything started
	// and nothing of the benchmark's doing work.
	idle cpuUse
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

// ratio is target/direct of the medians: TPS for the select-only rows,
// seconds (so above 1 is slower) for COPY.
func (r *report) ratio(k testKind, target string) float64 {
	return r.median(k, target) / r.median(k, "direct")
}

func (r *report) proxies() []*target { return r.targets[1:] }

func (r *report) has(name string) bool {
	return slices.ContainsFunc(r.targets, func(t *target) bool { return t.name == name })
}

// settings is one line describing what ran.
func (r *report) settings() string {
	o := r.opts
	return fmt.Sprintf("%d rounds, interleaved; pgbench -n -S -c %d -j %d -T %d (scale %d); COPY (select repeat('x', %d) from generate_series(1, %d)) TO STDOUT, %d bytes, psql > /dev/null",
		o.rounds, o.clients, o.jobs, int(o.duration/time.Second), o.scale, copyRowLen, r.copy.rows, r.copy.bytes)
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

// verdicts compares the medians with the targets from the issue: rolegate
// at least 0.95× direct on every row (for COPY: at most 1/0.95 the time)
// and ahead of PgBouncer.
func (r *report) verdicts() []string {
	if !r.has("rolegate") {
		return nil
	}
	var out []string
	for _, k := range tests {
		ratio := r.ratio(k, "rolegate")
		throughput := ratio
		if !k.higherIsBetter() {
			throughput = 1 / ratio
		}
		ok := "met"
		if throughput < 0.95 {
			ok = "MISSED"
		}
		line := fmt.Sprintf("%s: rolegate at %.2f× direct throughput: ≥ 0.95× %s", k.label(), throughput, ok)
		if r.has("pgbouncer") {
			rg, pb := r.median(k, "rolegate"), r.median(k, "pgbouncer")
			ahead := rg > pb
			if !k.higherIsBetter() {
				ahead = rg < pb
			}
			if ahead {
				line += "; ahead of PgBouncer"
			} else {
				line += "; NOT ahead of PgBouncer"
			}
		}
		out = append(out, line)
	}
	return out
}

// print writes the plain-text report and then the same as Markdown.
func (r *report) print(w io.Writer) {
	fmt.Fprintf(w, "\nrolegate benchmark, %s, wall time %s\n", r.started.UTC().Format("2006-01-02 15:04 UTC"), r.wall.Round(time.Second))
	fmt.Fprintf(w, "machine: %s\n", r.machineLine())
	fmt.Fprintf(w, "runs:    %s\n", r.settings())
	if r.machine.pgbouncerNote != "" {
		fmt.Fprintf(w, "NOTE:    %s\n", r.machine.pgbouncerNote)
	}

	fmt.Fprintf(w, "\nMedians (TPS: higher is better; COPY: seconds, lower is better, ratio is time target/direct)\n\n")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	header := []string{""}
	for _, t := range r.targets {
		header = append(header, t.name)
	}
	for _, t := range r.proxies() {
		header = append(header, t.name+"/direct")
	}
	fmt.Fprintln(tw, strings.Join(header, "\t")+"\t")
	for _, k := range tests {
		row := []string{k.rowLabel(r.copy)}
		for _, t := range r.targets {
			row = append(row, k.format(r.median(k, t.name)))
		}
		for _, t := range r.proxies() {
			row = append(row, fmt.Sprintf("%.2f×", r.ratio(k, t.name)))
		}
		fmt.Fprintln(tw, strings.Join(row, "\t")+"\t")
	}
	tw.Flush()

	fmt.Fprintf(w, "\nEvery run (CPU in cores, %d in all: the machine's busy time split into the server, the client tool, the proxy and other work)\n\n", r.machine.cpus)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, k := range tests {
		for _, t := range r.targets {
			for i, s := range r.runs[k][t.name] {
				fmt.Fprintf(tw, "%s\t%s\tround %d\t%s\n", k.label(), t.name, i+1, s.describe(k, r.copy))
			}
		}
	}
	tw.Flush()

	fmt.Fprintf(w, "\n%s\n", r.skewSummary())

	if v := r.verdicts(); len(v) > 0 {
		fmt.Fprintf(w, "\nTargets (rolegate ≥ 0.95× direct on every row, ahead of PgBouncer):\n")
		for _, line := range v {
			fmt.Fprintf(w, "  %s\n", line)
		}
	}
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
	fmt.Fprintf(w, "- Runs: %s\n", r.settings())
	if r.machine.pgbouncerNote != "" {
		fmt.Fprintf(w, "- Note: %s\n", r.machine.pgbouncerNote)
	}
	fmt.Fprintln(w)

	cols := []string{"Median of the rounds"}
	align := []string{"---"}
	for _, t := range r.targets {
		cols = append(cols, t.name)
		align = append(align, "--:")
	}
	for _, t := range r.proxies() {
		cols = append(cols, t.name+" / direct")
		align = append(align, "--:")
	}
	mdRow(w, cols)
	mdRow(w, align)
	for _, k := range tests {
		label := k.rowLabel(r.copy)
		if k == copyOut {
			label += " (ratio: time)"
		}
		row := []string{label}
		for _, t := range r.targets {
			row = append(row, k.format(r.median(k, t.name)))
		}
		for _, t := range r.proxies() {
			row = append(row, fmt.Sprintf("%.2f×", r.ratio(k, t.name)))
		}
		mdRow(w, row)
	}

	fmt.Fprintf(w, "\nEvery run, in the order they ran within each round:\n\n")
	cols = []string{"Row", "Target"}
	align = []string{"---", "---"}
	for i := 1; i <= r.opts.rounds; i++ {
		cols = append(cols, fmt.Sprintf("round %d", i))
		align = append(align, "--:")
	}
	mdRow(w, cols)
	mdRow(w, align)
	for _, k := range tests {
		for _, t := range r.targets {
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
	for _, k := range tests {
		for _, t := range r.targets {
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
	if v := r.verdicts(); len(v) > 0 {
		fmt.Fprintf(w, "\nAgainst the targets:\n\n")
		for _, line := range v {
			fmt.Fprintf(w, "- %s\n", line)
		}
	}
}

// proxyCost is the proxy's CPU time per transaction (select-only rows) or
// per GB of COPY output, from the median run; "–" for the direct target.
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
	if k == copyOut {
		return fmt.Sprintf("%.2f s/GB", median(costs))
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
