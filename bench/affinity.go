package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"runtime"
	"strconv"

	"golang.org/x/sys/unix"
)

// taskPasses bounds how often setTasks goes over a process's threads.
const taskPasses = 10

// cpuPlan is where the pinned rows run: the server (the postmaster and every
// process it has forked) and pgbench on one CPU, each proxy's threads on
// another. Outside the pinned rows everything may use all the CPUs the
// benchmark itself may use.
type cpuPlan struct {
	serverCPU, proxyCPU int
	server, proxy, all  unix.CPUSet
}

// newCPUPlan takes the first two CPUs the benchmark may use (its own
// affinity, which the server and the proxies inherited): the server's and
// the proxy's. It fails on a machine, or in a cpuset, with fewer.
func newCPUPlan() (*cpuPlan, error) {
	p := &cpuPlan{}
	if err := unix.SchedGetaffinity(0, &p.all); err != nil {
		return nil, fmt.Errorf("sched_getaffinity: %w", err)
	}
	cpus := cpuList(&p.all)
	if len(cpus) < 2 {
		return nil, fmt.Errorf("the benchmark may use %d CPU (sched_getaffinity); the pinned rows need 2", len(cpus))
	}
	p.serverCPU, p.proxyCPU = cpus[0], cpus[1]
	p.server.Set(p.serverCPU)
	p.proxy.Set(p.proxyCPU)
	return p, nil
}

// cpuList is the CPUs in s, in ascending order.
func cpuList(s *unix.CPUSet) []int {
	var cpus []int
	for cpu := 0; len(cpus) < s.Count(); cpu++ {
		if s.IsSet(cpu) {
			cpus = append(cpus, cpu)
		}
	}
	return cpus
}

// describe says where the pinned rows run, for the report.
func (p *cpuPlan) describe() string {
	return fmt.Sprintf("the server (the postmaster and every process it forked) and pgbench on CPU %d, each proxy (all its threads) on CPU %d, which direct leaves idle",
		p.serverCPU, p.proxyCPU)
}

// pin puts the server on its CPU and the proxies on theirs. The postmaster
// comes first: a backend it forks from then on inherits its mask, so the
// sessions pgbench opens afterwards are pinned too, and the processes it
// forked before (background workers, the backends of PgBouncer's pooled
// server connections and of rolegate's control connections) are set one by
// one.
func (p *cpuPlan) pin(meter *cpuMeter, proxies []int) error {
	return p.place(meter, proxies, &p.server, &p.proxy)
}

// unpin gives the server, every process it forked meanwhile included, and
// the proxies all the CPUs back.
func (p *cpuPlan) unpin(meter *cpuMeter, proxies []int) error {
	return p.place(meter, proxies, &p.all, &p.all)
}

func (p *cpuPlan) place(meter *cpuMeter, proxies []int, server, proxy *unix.CPUSet) error {
	if meter.postmaster == 0 {
		return errors.New("the postmaster's pid is unknown")
	}
	if err := setTasks(meter.postmaster, server); err != nil {
		return fmt.Errorf("the postmaster: %w", err)
	}
	children, _ := meter.children()
	for _, pid := range children {
		if err := setTasks(pid, server); err != nil {
			return fmt.Errorf("a server process: %w", err)
		}
	}
	for _, pid := range proxies {
		if err := setTasks(pid, proxy); err != nil {
			return fmt.Errorf("a proxy: %w", err)
		}
	}
	return nil
}

// setTasks sets the affinity of every thread of process pid. A thread
// created meanwhile by one not yet set would keep the old mask (a new thread
// inherits its creator's), so it goes over the threads again until a pass
// finds no new one. A process or thread that exits meanwhile is no error.
func setTasks(pid int, cpus *unix.CPUSet) error {
	done := make(map[int]bool)
	for range taskPasses {
		entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		fresh := false
		for _, e := range entries {
			tid, err := strconv.Atoi(e.Name())
			if err != nil || done[tid] {
				continue
			}
			if err := unix.SchedSetaffinity(tid, cpus); err != nil && !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("sched_setaffinity(%d, CPUs %v) of process %d: %w", tid, cpuList(cpus), pid, err)
			}
			done[tid] = true
			fresh = true
		}
		if !fresh {
			return nil
		}
	}
	return fmt.Errorf("process %d kept starting threads while its affinity was set", pid)
}

// startOn starts cmd on cpus (nil: wherever). A child inherits the affinity
// of the thread that forks it, so the fork runs on a thread of its own whose
// mask is cpus for that moment; setting the child's threads after the start
// would race with the threads it starts (pgbench -j).
func startOn(cmd *exec.Cmd, cpus *unix.CPUSet) error {
	if cpus == nil {
		return cmd.Start()
	}
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		var old unix.CPUSet
		if err := unix.SchedGetaffinity(0, &old); err != nil {
			runtime.UnlockOSThread()
			started <- fmt.Errorf("sched_getaffinity: %w", err)
			return
		}
		if err := unix.SchedSetaffinity(0, cpus); err != nil {
			runtime.UnlockOSThread()
			started <- fmt.Errorf("sched_setaffinity(CPUs %v): %w", cpuList(cpus), err)
			return
		}
		err := cmd.Start()
		// A thread whose mask could not be restored stays locked, and the
		// runtime ends it with this goroutine.
		if unix.SchedSetaffinity(0, &old) == nil {
			runtime.UnlockOSThread()
		}
		started <- err
	}()
	return <-started
}

// setUpPinning returns the plan for the pinned rows, or nil and why they do
// not run. It pins and unpins once, so that a machine that does not let the
// benchmark set the affinity skips the rows before the rounds instead of
// failing in the first; an unpin that fails is an error, since the other
// rows would run pinned.
func setUpPinning(o options, meter *cpuMeter, proxies []int) (*cpuPlan, string, error) {
	if !o.pinned {
		return nil, "left out (-pinned=false)", nil
	}
	plan, err := newCPUPlan()
	if err != nil {
		logf("pinned rows skipped: %v", err)
		return nil, err.Error(), nil
	}
	if err := plan.pin(meter, proxies); err != nil {
		if uerr := plan.unpin(meter, proxies); uerr != nil {
			return nil, "", fmt.Errorf("pinning failed (%v), and so did giving the CPUs back: %w", err, uerr)
		}
		logf("pinned rows skipped: pinning failed: %v", err)
		return nil, "pinning failed: " + err.Error(), nil
	}
	if err := plan.unpin(meter, proxies); err != nil {
		return nil, "", fmt.Errorf("giving the CPUs back after a trial pin: %w", err)
	}
	logf("pinned rows: %s", plan.describe())
	return plan, "", nil
}
