package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestCPUList(t *testing.T) {
	for _, tc := range []struct {
		set  []int
		want []int
	}{
		{nil, nil},
		{[]int{0}, []int{0}},
		{[]int{1, 0}, []int{0, 1}},
		{[]int{3, 64, 1023}, []int{3, 64, 1023}},
	} {
		var s unix.CPUSet
		for _, cpu := range tc.set {
			s.Set(cpu)
		}
		if got := cpuList(&s); !slices.Equal(got, tc.want) {
			t.Errorf("cpuList(%v) = %v, want %v", tc.set, got, tc.want)
		}
	}
}

// allowedList is the Cpus_allowed_list line of a /proc status file.
func allowedList(t *testing.T, status string) string {
	t.Helper()
	for line := range strings.SplitSeq(status, "\n") {
		if v, ok := strings.CutPrefix(line, "Cpus_allowed_list:"); ok {
			return strings.TrimSpace(v)
		}
	}
	t.Fatalf("no Cpus_allowed_list in:\n%s", status)
	return ""
}

// ownCPUs is this process's affinity and one CPU of it, the last.
func ownCPUs(t *testing.T) (all unix.CPUSet, last int) {
	t.Helper()
	if err := unix.SchedGetaffinity(0, &all); err != nil {
		t.Fatal(err)
	}
	cpus := cpuList(&all)
	return all, cpus[len(cpus)-1]
}

// threadsAllowed is the Cpus_allowed_list of every thread of this process.
func threadsAllowed(t *testing.T) []string {
	t.Helper()
	paths, err := filepath.Glob("/proc/self/task/*/status")
	if err != nil {
		t.Fatal(err)
	}
	var lists []string
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err != nil {
			continue // the thread ended
		}
		lists = append(lists, allowedList(t, string(data)))
	}
	return lists
}

func TestStartOnPinsTheChildOnly(t *testing.T) {
	_, last := ownCPUs(t)
	before := threadsAllowed(t)
	var one unix.CPUSet
	one.Set(last)
	cmd := exec.Command("cat", "/proc/self/status")
	var out strings.Builder
	cmd.Stdout = &out
	if err := startOn(cmd, &one); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	if got, want := allowedList(t, out.String()), fmt.Sprint(last); got != want {
		t.Errorf("the child's Cpus_allowed_list = %s, want %s", got, want)
	}
	// Every thread of ours keeps the mask it had: the forking thread's was
	// restored.
	want := before[0]
	for _, got := range threadsAllowed(t) {
		if got != want {
			t.Errorf("a thread of the test has Cpus_allowed_list %s after startOn, want %s", got, want)
		}
	}
}

func TestSetTasks(t *testing.T) {
	all, last := ownCPUs(t)
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}()
	status := func() string {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid))
		if err != nil {
			t.Fatal(err)
		}
		return allowedList(t, string(data))
	}
	wantAll := status()
	var one unix.CPUSet
	one.Set(last)
	if err := setTasks(cmd.Process.Pid, &one); err != nil {
		t.Fatal(err)
	}
	if got, want := status(), fmt.Sprint(last); got != want {
		t.Errorf("after setTasks to CPU %d: Cpus_allowed_list %s, want %s", last, got, want)
	}
	if err := setTasks(cmd.Process.Pid, &all); err != nil {
		t.Fatal(err)
	}
	if got := status(); got != wantAll {
		t.Errorf("after setTasks back: Cpus_allowed_list %s, want %s", got, wantAll)
	}
	// A process that is gone is no error.
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	if err := setTasks(cmd.Process.Pid, &all); err != nil {
		t.Errorf("setTasks of an exited process: %v", err)
	}
}
