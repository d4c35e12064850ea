package main

import (
	"errors"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestClusterPlan checks where the cluster storm's logins go: the direct
// share spread evenly, the rest round-robin over the instances.
func TestClusterPlan(t *testing.T) {
	if got, want := clusterPlan(10, 3, 2), []int{0, 1, 2, 0, -1, 1, 2, 0, 1, -1}; !slices.Equal(got, want) {
		t.Errorf("plan of 10 logins, 3 instances, 2 direct: %v, want %v", got, want)
	}
	if got, want := clusterPlan(4, 2, 0), []int{0, 1, 0, 1}; !slices.Equal(got, want) {
		t.Errorf("plan without direct logins: %v, want %v", got, want)
	}
	co := clusterOptions{instances: 3, logins: 3000, limit: 5, directPct: 10}
	plan := clusterPlan(co.logins, co.instances, co.directs())
	count := map[int]int{}
	gap := 0 // the longest run of logins through rolegate between two direct ones
	run := 0
	for _, to := range plan {
		count[to]++
		if to < 0 {
			run = 0
			continue
		}
		run++
		gap = max(gap, run)
	}
	if count[-1] != 300 || count[0] != 900 || count[1] != 900 || count[2] != 900 {
		t.Errorf("3,000 logins at 10%% direct over 3 instances: %v, want 300 direct and 900 each", count)
	}
	if gap != 9 {
		t.Errorf("direct logins not spread evenly: %d logins through rolegate in a row, want 9", gap)
	}
}

// TestClusterOptions checks the -cluster-* flags: checked with -only
// cluster-storm only, the direct share a percentage below 100, and the
// server's max_connections with room for every direct login.
func TestClusterOptions(t *testing.T) {
	base := options{rounds: 1, duration: 10e9, copyMB: 1, clients: 2, jobs: 2, connectClients: 2, scale: 1, stormLimit: 1, limitLogins: 1, stormLogins: 1,
		clusterInstances: 3, clusterLogins: 3000, clusterLimit: 5, clusterDirect: 10}
	for _, c := range []struct {
		name   string
		change func(*options)
		ok     bool
	}{
		{"defaults", func(*options) {}, true},
		{"no instance", func(o *options) { o.clusterInstances = 0 }, false},
		{"no login", func(o *options) { o.clusterLogins = 0 }, false},
		{"no limit", func(o *options) { o.clusterLimit = 0 }, false},
		{"all direct", func(o *options) { o.clusterDirect = 100 }, false},
		{"negative direct", func(o *options) { o.clusterDirect = -1 }, false},
		{"none direct", func(o *options) { o.clusterDirect = 0 }, true},
	} {
		o := base
		o.only = onlyCluster
		c.change(&o)
		if err := o.validate(); (err == nil) != c.ok {
			t.Errorf("%s: %v, want ok=%v", c.name, err, c.ok)
		}
		// Without -only cluster-storm the flags are not used, nor checked.
		o.only = ""
		if err := o.validate(); err != nil {
			t.Errorf("%s without -only cluster-storm: %v", c.name, err)
		}
	}
	if !(options{only: onlyCluster}).alone() {
		t.Error("-only cluster-storm is not a test of its own")
	}
	o := base
	if s := o.serverSettings(); s != nil {
		t.Errorf("server settings of a full run: %v, want pgtest's", s)
	}
	o.only = onlyCluster
	if got := o.serverSettings()["max_connections"]; got != "393" {
		t.Errorf("max_connections for 300 direct logins: %s, want 393 (300 + 5 + 3 × 8 + 64)", got)
	}
	o.clusterLogins = 300
	if got := o.serverSettings()["max_connections"]; got != "300" {
		t.Errorf("max_connections for 30 direct logins: %s, want pgtest's 300", got)
	}
}

// TestClusterConfig checks the instances' role table: the storm's, with the
// wait policy's wait_timeout under every policy.
func TestClusterConfig(t *testing.T) {
	co := clusterOptions{instances: 3, logins: 3000, limit: 5, directPct: 10, hold: 50 * time.Millisecond}
	for _, policy := range clusterPolicies {
		got := clusterConfig(co, policy)
		for _, want := range []string{"[roles.storm_bench]\n", "max_sessions = 5\n", "policy = \"" + policy + "\"\n", `wait_timeout = "2m24s"`} {
			if !strings.Contains(got, want) {
				t.Errorf("%s: config lacks %q:\n%s", policy, want, got)
			}
		}
		if n := strings.Count(got, "wait_timeout"); n != 1 {
			t.Errorf("%s: wait_timeout %d times:\n%s", policy, n, got)
		}
	}
}

// TestClusterRows checks the cluster storm's table, the split of the logins
// between rolegate and the server, and the verdicts.
func TestClusterRows(t *testing.T) {
	res := &clusterResult{opts: clusterOptions{instances: 2, logins: 6, limit: 2, directPct: 34}}
	reject := newClusterRun("reject", 4, 2)
	reject.via.add(stormLogin{at: 1 * time.Second, admitted: true})
	reject.via.add(stormLogin{at: 2 * time.Second, code: "53300", msg: "too many"})
	reject.via.add(stormLogin{at: 3 * time.Second, code: "53300", msg: "too many"})
	reject.via.add(stormLogin{at: 4 * time.Second, code: "53300", msg: "too many"})
	reject.direct.add(stormLogin{at: 5 * time.Second, admitted: true})
	reject.direct.add(stormLogin{at: 6 * time.Second, code: "53300", msg: "too many"})
	reject.serverMax, reject.samples = 2, 10
	reject.hwmKiB = []int64{20 << 10, 21 << 10}
	newest := newClusterRun("newest-wins", 4, 2)
	newest.via.add(stormLogin{at: 1 * time.Second, admitted: true, during: true, code: "57P01", msg: "terminating"})
	newest.via.add(stormLogin{at: 2 * time.Second, admitted: true})
	newest.via.add(stormLogin{at: 3 * time.Second, code: "53300", msg: "too many"})
	newest.via.add(stormLogin{at: 9 * time.Second, err: errors.New("context deadline exceeded"), hung: true})
	newest.direct.add(stormLogin{at: 2 * time.Second, admitted: true, during: true, code: "57P01", msg: "terminating"})
	newest.direct.add(stormLogin{at: 4 * time.Second, err: errors.New("unexpected EOF")})
	newest.serverMax, newest.samples = 3, 10
	newest.hwmKiB = []int64{-1, 22 << 10}
	res.runs = []*clusterRun{reject, newest}

	var b strings.Builder
	mdTable(&b, res.rows())
	want := `| Policy | logins via rolegate / direct | admitted | 53300 via rolegate | 53300 direct | evicted 57P01 (of them direct) | other errors | server's max sessions | median login via rolegate | p99 login via rolegate | every login answered in | VmHWM per instance |
| --- | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: |
| reject | 4 / 2 | 2 | 3 | 1 | 0 (0) | 0 | 2 | 2.50 s | 4.00 s | 6.00 s | 20.0 MiB / 21.0 MiB |
| newest-wins | 4 / 2 | 3 | 1 | 0 | 2 (1) | 2 (1 hung) | 3 | 2.00 s | 3.00 s | 4.00 s | ? / 22.0 MiB |
`
	if b.String() != want {
		t.Errorf("cluster table:\n%s\nwant:\n%s", b.String(), want)
	}

	v := res.verdicts()
	if len(v) != 2 {
		t.Fatalf("verdicts: %q", v)
	}
	for _, c := range []struct {
		line int
		has  []string
		not  string
	}{
		{0, []string{"reject: ", "at most 2 (limit 2): met", "0 other errors, 0 of them hung: met"}, "53300 through rolegate"},
		{1, []string{"newest-wins: ", "at most 3 (limit 2): MISSED", "2 other errors, 1 of them hung: MISSED", "53300 through rolegate: 1 (target 0): MISSED"}, ""},
	} {
		for _, s := range c.has {
			if !strings.Contains(v[c.line], s) {
				t.Errorf("verdict %d lacks %q: %s", c.line, s, v[c.line])
			}
		}
		if c.not != "" && strings.Contains(v[c.line], c.not) {
			t.Errorf("verdict %d has %q: %s", c.line, c.not, v[c.line])
		}
	}

	notes := res.notes()
	if len(notes) != 2 {
		t.Fatalf("notes: %q", notes)
	}
	for _, s := range []string{`53300 through rolegate: 3 × "too many"`, `53300 direct: 1 × "too many"`, "10 samples of pg_stat_activity"} {
		if !strings.Contains(notes[0], s) {
			t.Errorf("reject's note lacks %q: %s", s, notes[0])
		}
	}
	for _, s := range []string{
		"failures: newest-wins, through rolegate, at the login after 9.00 s: no answer within the bound",
		"newest-wins, direct, at the login after 4.00 s: unexpected EOF",
	} {
		if !strings.Contains(notes[1], s) {
			t.Errorf("newest-wins' note lacks %q: %s", s, notes[1])
		}
	}
}
