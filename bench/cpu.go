package main

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// clockTicks is USER_HZ, the unit of /proc CPU times: 100 on every Linux
// architecture Go runs on.
const clockTicks = 100

// cpuMeter splits the machine's CPU time during a run into the server, the
// client tool, the proxy and everything else. The rest shows other work on
// the machine, which skews the comparison.
type cpuMeter struct {
	// postmaster is the server's pid, 0 when unknown.
	postmaster int
}

// newCPUMeter finds the cluster's postmaster through postmaster.pid in
// dataDir.
func newCPUMeter(dataDir string) *cpuMeter {
	m := &cpuMeter{}
	data, err := os.ReadFile(filepath.Join(dataDir, "postmaster.pid"))
	if err != nil {
		return m
	}
	line, _, _ := strings.Cut(string(data), "\n")
	m.postmaster, _ = strconv.Atoi(strings.TrimSpace(line))
	return m
}

// cpuSnapshot holds cumulative CPU counters at one moment, in clock ticks.
type cpuSnapshot struct {
	at             time.Time
	machineBusy    uint64 // user, nice, system, irq, softirq over all CPUs
	server         uint64 // the postmaster, its live children, its reaped children
	proxies        uint64
	self           uint64 // this benchmark process
	machineOK      bool
	serverOK       bool
	proxiesOK      bool
	selfOK         bool
	proxiesCounted bool
}

// procStat is the part of /proc/pid/stat the meter uses.
type procStat struct {
	state                        string
	ppid                         int
	utime, stime, cutime, cstime uint64
}

func readProcStat(path string) (procStat, bool) {
	data, err := os.ReadFile(path)
	if err != nil {
		return procStat{}, false
	}
	// The command name may hold spaces and parentheses; the fields that
	// follow it start after the last ") ".
	i := strings.LastIndex(string(data), ") ")
	if i < 0 {
		return procStat{}, false
	}
	f := strings.Fields(string(data)[i+2:])
	if len(f) < 15 {
		return procStat{}, false
	}
	st := procStat{state: f[0]}
	st.ppid, _ = strconv.Atoi(f[1])
	for _, p := range []struct {
		dst *uint64
		idx int
	}{{&st.utime, 11}, {&st.stime, 12}, {&st.cutime, 13}, {&st.cstime, 14}} {
		n, err := strconv.ParseUint(f[p.idx], 10, 64)
		if err != nil {
			return procStat{}, false
		}
		*p.dst = n
	}
	return st, true
}

// settleTimeout bounds how long settle waits for the server's children.
const settleTimeout = time.Second

// settle returns once the server has reaped the backends of the sessions
// that just ended: a backend that has exited shows no CPU time until the
// postmaster reaps it and adds its time to its own cutime, so a snapshot
// taken in between would miss the backend's time.
func (m *cpuMeter) settle() {
	if m.postmaster == 0 {
		return
	}
	deadline := time.Now().Add(settleTimeout)
	var last []int
	for time.Now().Before(deadline) {
		children, zombies := m.children()
		if zombies == 0 && slices.Equal(children, last) {
			return
		}
		last = children
		time.Sleep(20 * time.Millisecond)
	}
}

// children lists the postmaster's children and counts the zombies among them.
func (m *cpuMeter) children() (pids []int, zombies int) {
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, path := range stats {
		st, ok := readProcStat(path)
		if !ok || st.ppid != m.postmaster {
			continue
		}
		pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(path)))
		pids = append(pids, pid)
		if st.state == "Z" {
			zombies++
		}
	}
	slices.Sort(pids)
	return pids, zombies
}

// take reads the counters; proxies are the pids of the proxies to count.
func (m *cpuMeter) take(proxies ...int) cpuSnapshot {
	s := cpuSnapshot{at: time.Now()}
	if data, err := os.ReadFile("/proc/stat"); err == nil {
		line, _, _ := strings.Cut(string(data), "\n")
		f := strings.Fields(line)
		if len(f) >= 8 && f[0] == "cpu" {
			s.machineOK = true
			for _, i := range []int{1, 2, 3, 6, 7} { // user nice system irq softirq
				n, err := strconv.ParseUint(f[i], 10, 64)
				if err != nil {
					s.machineOK = false
				}
				s.machineBusy += n
			}
		}
	}
	if st, ok := readProcStat("/proc/self/stat"); ok {
		s.self, s.selfOK = st.utime+st.stime, true
	}
	s.proxiesCounted = len(proxies) > 0
	s.proxiesOK = true
	for _, pid := range proxies {
		st, ok := readProcStat(fmt.Sprintf("/proc/%d/stat", pid))
		if !ok {
			s.proxiesOK = false
			continue
		}
		// PgBouncer and rolegate fork nothing; a proxy's own time is all.
		s.proxies += st.utime + st.stime
	}
	if m.postmaster != 0 {
		if st, ok := readProcStat(fmt.Sprintf("/proc/%d/stat", m.postmaster)); ok {
			// Backends that exited and were reaped are in cutime/cstime.
			s.server, s.serverOK = st.utime+st.stime+st.cutime+st.cstime, true
			stats, _ := filepath.Glob("/proc/[0-9]*/stat")
			for _, path := range stats {
				if st, ok := readProcStat(path); ok && st.ppid == m.postmaster {
					s.server += st.utime + st.stime
				}
			}
		}
	}
	return s
}

// cpuUse is where the CPU time of one run went, in cores: CPU seconds per
// second of wall time, so 1.0 is one CPU flat out. A value is -1 when it is
// unknown or does not apply (proxy for the direct target).
type cpuUse struct {
	machine, server, client, proxy, other float64
}

// since returns the use between before and s; client is the CPU time of
// the client tool (pgbench or psql) that ran in between.
func (s cpuSnapshot) since(before cpuSnapshot, client time.Duration) cpuUse {
	u := cpuUse{machine: -1, server: -1, client: -1, proxy: -1, other: -1}
	wall := s.at.Sub(before.at).Seconds()
	if wall <= 0 {
		return u
	}
	cores := func(after, before uint64) float64 {
		if after < before { // a process went away; the counter is not comparable
			return -1
		}
		return float64(after-before) / clockTicks / wall
	}
	if s.machineOK && before.machineOK {
		u.machine = cores(s.machineBusy, before.machineBusy)
	}
	if s.serverOK && before.serverOK {
		u.server = cores(s.server, before.server)
	}
	if s.proxiesCounted && s.proxiesOK && before.proxiesOK {
		u.proxy = cores(s.proxies, before.proxies)
	}
	if client >= 0 {
		u.client = client.Seconds() / wall
	}
	if u.machine >= 0 && u.server >= 0 && u.client >= 0 && s.selfOK && before.selfOK {
		u.other = u.machine - u.server - u.client - cores(s.self, before.self)
		if u.proxy > 0 {
			u.other -= u.proxy
		}
		// Tick rounding makes a quiet machine come out a little below 0.
		u.other = max(u.other, 0)
	}
	return u
}

func (u cpuUse) String() string {
	f := func(v float64) string {
		if v < 0 {
			return "?"
		}
		return fmt.Sprintf("%.2f", v)
	}
	s := fmt.Sprintf("CPU cores: machine %s = server %s + client %s", f(u.machine), f(u.server), f(u.client))
	if u.proxy >= 0 {
		s += " + proxy " + f(u.proxy)
	}
	return s + " + other " + f(u.other)
}
