package main

import (
	"strings"
	"testing"
)

func TestKibField(t *testing.T) {
	status := "Name:\trolegate\nVmPeak:\t 1262124 kB\nVmRSS:\t   17424 kB\nRssAnon:\t    6144 kB\nThreads:\t7\n"
	rollup := "55d0c5a3e000-7ffd1a5f6000 ---p 00000000 00:00 0                          [rollup]\nRss:               17424 kB\nPss:               16210 kB\nPss_Dirty:          6500 kB\nPrivate_Dirty:      6400 kB\n"
	for _, tc := range []struct {
		text, name string
		want       int64
	}{
		{status, "VmRSS", 17424},
		{status, "VmPeak", 1262124},
		{status, "Threads", -1}, // no unit
		{status, "Rss", -1},     // a prefix of RssAnon, not a field here
		{rollup, "Pss", 16210},
		{rollup, "Private_Dirty", 6400},
		{rollup, "VmRSS", -1},
		{"", "VmRSS", -1},
		{"VmRSS:\tmany kB\n", "VmRSS", -1},
	} {
		if got := kibField(tc.text, tc.name); got != tc.want {
			t.Errorf("kibField(%q, %q) = %d, want %d", tc.text, tc.name, got, tc.want)
		}
	}
}

func TestIdleMemoryPerSession(t *testing.T) {
	m := idleMemory{
		target:   "rolegate",
		sessions: 200,
		before:   procMemory{rss: 10240, pss: 9000, privateDirty: -1},
		after:    procMemory{rss: 30720, pss: 29000, privateDirty: 8000},
	}
	if got, ok := m.perSession(func(p procMemory) int64 { return p.rss }); !ok || got != 102.4 {
		t.Errorf("VmRSS per session = %v, %v; want 102.4, true", got, ok)
	}
	if got, ok := m.perSession(func(p procMemory) int64 { return p.pss }); !ok || got != 100 {
		t.Errorf("Pss per session = %v, %v; want 100, true", got, ok)
	}
	if _, ok := m.perSession(func(p procMemory) int64 { return p.privateDirty }); ok {
		t.Error("Private_Dirty per session is known although the reading before was not")
	}

	r := &report{opts: options{idleSessions: 200}, idleMem: []idleMemory{m}}
	var b strings.Builder
	r.printIdle(&b, true)
	for _, want := range []string{
		"| Idle sessions | sessions | VmRSS before | VmRSS with them | VmRSS per session | Pss per session | Private_Dirty per session |",
		"| --- | --: | --: | --: | --: | --: | --: |",
		"| rolegate | 200 | 10.0 MiB | 30.0 MiB | 102.4 KiB | 100.0 KiB | ? |",
	} {
		if !strings.Contains(b.String(), want+"\n") {
			t.Errorf("the Markdown table lacks the line\n%s\nin:\n%s", want, b.String())
		}
	}
}
