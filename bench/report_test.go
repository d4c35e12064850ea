package main

import (
	"strings"
	"testing"
)

// TestMedianRows checks the medians tables, the pinned rows' included: the
// median per target, and per proxy the ratio to direct.
func TestMedianRows(t *testing.T) {
	direct := &target{name: "direct"}
	rg := &target{name: "rolegate", pid: 1}
	gmp1 := &target{name: gmp1Target, pid: 2, extra: true}
	r := &report{
		targets: []*target{direct, rg, gmp1},
		copy:    newCopySpec(500),
		runs:    make(map[testKind]map[string][]sample),
	}
	set := func(k testKind, name string, values ...float64) {
		if r.runs[k] == nil {
			r.runs[k] = make(map[string][]sample)
		}
		for _, v := range values {
			r.runs[k][name] = append(r.runs[k][name], sample{value: v})
		}
	}
	set(copyOut, "direct", 1.0, 0.8, 0.9)
	set(copyOut, "rolegate", 1.0, 1.1, 0.9)
	set(pinnedSimple, "direct", 19000, 19200, 19100)
	set(pinnedSimple, "rolegate", 13900, 14000, 13000)
	set(pinnedSimple, gmp1Target, 14325)

	var b strings.Builder
	mdTable(&b, r.medianRows([]testKind{copyOut, pinnedSimple}, true))
	want := `| Median of the rounds | direct | rolegate | rolegate-gmp1 | rolegate / direct | rolegate-gmp1 / direct |
| --- | --: | --: | --: | --: | --: |
| COPY 500 MB out, seconds (ratio: time) | 0.90 | 1.00 | – | 1.11× | – |
| select-only TPS, -M simple, pinned | 19100 | 13900 | 14325 | 0.73× | 0.75× |
`
	if b.String() != want {
		t.Errorf("Markdown medians:\n%s\nwant:\n%s", b.String(), want)
	}

	b.Reset()
	printTable(&b, r.medianRows(nil, false)) // the header alone
	if got := strings.Fields(b.String()); strings.Join(got, " ") != "direct rolegate rolegate-gmp1 rolegate/direct rolegate-gmp1/direct" {
		t.Errorf("text header: %q", b.String())
	}
}
