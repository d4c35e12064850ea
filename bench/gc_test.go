package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The gctrace lines of a log give the stop-the-world phases: the first and
// the last clock time of each collection.
func TestReadGCPauses(t *testing.T) {
	log := filepath.Join(t.TempDir(), "rolegate.log")
	text := "time=x level=WARN msg=hello\n" +
		"gc 1 @0.012s 3%: 0.021+1.2+0.034 ms clock, 0.04+0.1/0.5/0+0.06 ms cpu, 4->4->0 MB, 4 MB goal, 0 MB stacks, 0 MB globals, 2 P\n" +
		"gc 2 @1.5s 1%: 0.5+2+0.25 ms clock, 1+0/1/0+0.5 ms cpu, 4->4->0 MB, 4 MB goal, 0 MB stacks, 0 MB globals, 2 P\n"
	if err := os.WriteFile(log, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	g, err := readGCPauses("rolegate", log)
	if err != nil {
		t.Fatal(err)
	}
	if g.cycles != 2 || len(g.pauses) != 4 {
		t.Fatalf("got %d cycles and pauses %v", g.cycles, g.pauses)
	}
	if d := g.describe(); !strings.Contains(d, "2 collections") || !strings.Contains(d, "max 0.500 ms") {
		t.Fatalf("describe: %s", d)
	}
}
