package main

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// TestStormAdd checks how a storm login's answer is counted: ReadyForQuery,
// 53300 and 57P01 are answers; anything else, a 53300 while the session was
// held, and no answer within the bound are failures, quoted.
func TestStormAdd(t *testing.T) {
	run := newStormRun(stormNewest, 7)
	for _, l := range []stormLogin{
		{at: 1 * time.Second, admitted: true},
		{at: 2 * time.Second, admitted: true, during: true, code: "57P01", msg: "terminating connection due to administrator command"},
		{at: 3 * time.Second, code: "57P01", msg: "evicted"},
		{at: 4 * time.Second, code: "53300", msg: `too many connections for role "storm_bench"`},
		{at: 5 * time.Second, admitted: true, during: true, code: "53300", msg: "odd"},
		{at: 6 * time.Second, err: errors.New("unexpected EOF")},
		{at: 9 * time.Second, err: errors.New("context deadline exceeded"), hung: true},
	} {
		run.add(l)
	}
	if run.admitted != 3 || run.evicted != 1 || run.evictedAtLogin != 1 || run.refused != 1 || run.failed != 3 || run.hung != 1 {
		t.Errorf("admitted %d evicted %d at login %d refused %d failed %d hung %d, want 3 1 1 1 3 1",
			run.admitted, run.evicted, run.evictedAtLogin, run.refused, run.failed, run.hung)
	}
	if run.refusedBy[`too many connections for role "storm_bench"`] != 1 {
		t.Errorf("refusedBy %v", run.refusedBy)
	}
	if len(run.answers) != 6 || run.last != 6*time.Second {
		t.Errorf("answers %v last %v: the hung login is no answer", run.answers, run.last)
	}
	want := []string{
		"rolegate, newest-wins, while holding the session after 5.00 s: 53300 odd",
		"rolegate, newest-wins, at the login after 6.00 s: unexpected EOF",
		"rolegate, newest-wins, at the login after 9.00 s: no answer within the bound: context deadline exceeded",
	}
	if strings.Join(run.failures, "\n") != strings.Join(want, "\n") {
		t.Errorf("failures:\n%s\nwant:\n%s", strings.Join(run.failures, "\n"), strings.Join(want, "\n"))
	}
}

// TestStormRows checks the storm table and the verdicts against the
// targets.
func TestStormRows(t *testing.T) {
	res := &stormResult{opts: stormOptions{logins: 4, limit: 2, hold: 50 * time.Millisecond}}
	direct := newStormRun(stormDirect, 4)
	for _, at := range []time.Duration{1, 2, 3, 4} {
		direct.add(stormLogin{at: at * time.Second, code: "53300", msg: "too many"})
	}
	direct.serverMax = 2
	reject := newStormRun(stormReject, 4)
	reject.add(stormLogin{at: 1 * time.Second, admitted: true})
	for _, at := range []time.Duration{2, 3, 5} {
		reject.add(stormLogin{at: at * time.Second, code: "53300", msg: "too many"})
	}
	reject.serverMax, reject.hwmKiB = 2, 100<<10
	reject.health = []time.Duration{10 * time.Millisecond, 30 * time.Millisecond}
	wait := newStormRun(stormWait, 4)
	for _, at := range []time.Duration{1, 2, 3} {
		wait.add(stormLogin{at: at * time.Second, admitted: true})
	}
	wait.add(stormLogin{at: 4 * time.Second, code: "57P01", msg: "evicted"})
	wait.serverMax, wait.hwmKiB = 3, 300<<10
	wait.health = []time.Duration{150 * time.Millisecond}
	res.runs = []*stormRun{direct, reject, wait}

	var b strings.Builder
	mdTable(&b, res.rows())
	want := `| Storm | logins | admitted | evicted later (57P01) | 53300 | failed | every login answered in | median answer | p99 answer | server's max sessions | rolegate VmHWM | /healthz max | /healthz p99 | all answered / direct |
| --- | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: |
| direct, CONNECTION LIMIT (the server's 53300) | 4 | 0 | 0 | 4 | 0 | 4.00 s | 2.50 s | 4.00 s | 2 | – | – | – | – |
| rolegate, reject | 4 | 1 | 0 | 3 | 0 | 5.00 s | 2.50 s | 5.00 s | 2 | 100.0 MiB | 30.00 ms | 30.00 ms | 1.25× |
| rolegate, wait | 4 | 3 | 0 (+1 before ReadyForQuery) | 0 | 0 | 4.00 s | 2.50 s | 4.00 s | 3 | 300.0 MiB | 150.00 ms | 150.00 ms | 1.00× |
`
	if b.String() != want {
		t.Errorf("storm table:\n%s\nwant:\n%s", b.String(), want)
	}

	v := res.verdicts()
	if len(v) != 3 {
		t.Fatalf("verdicts: %q", v)
	}
	for _, c := range []struct {
		line int
		has  []string
	}{
		{0, []string{"rolegate, reject: ", "0 failed, 0 of them hung: met", "at most 2 (limit 2): met", "VmHWM 100.0 MiB (target < 256 MiB): met", "/healthz at most 30.00 ms, p99 30.00 ms, 0 failed (target ≤ 100ms): met"}},
		{1, []string{"rolegate, wait: ", "at most 3 (limit 2): MISSED", "VmHWM 300.0 MiB (target < 256 MiB): MISSED", "(target ≤ 100ms): MISSED"}},
		{2, []string{"under reject in 5.00 s against 4.00 s direct: 1.25× (target ≤ 1.5×): met"}},
	} {
		for _, s := range c.has {
			if !strings.Contains(v[c.line], s) {
				t.Errorf("verdict %d lacks %q: %s", c.line, s, v[c.line])
			}
		}
	}
}

// TestStormWaitTimeout checks the wait policy's wait_timeout: four times the
// storm with every slot busy, at least a minute.
func TestStormWaitTimeout(t *testing.T) {
	for _, c := range []struct {
		so   stormOptions
		want time.Duration
	}{
		{stormOptions{logins: 300, limit: 5, hold: 50 * time.Millisecond}, time.Minute},
		{stormOptions{logins: 5000, limit: 5, hold: 50 * time.Millisecond}, 240 * time.Second},
	} {
		if got := c.so.waitTimeout(); got != c.want {
			t.Errorf("%+v: wait_timeout %v, want %v", c.so, got, c.want)
		}
		if got := c.so.bound(); got != c.want+stormBoundSlack {
			t.Errorf("%+v: bound %v, want %v", c.so, got, c.want+stormBoundSlack)
		}
	}
}
