package main

import (
	"bufio"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strconv"
)

// Garbage-collector pauses of each rolegate, from the gctrace lines it
// writes to its log (rolegate runs with GODEBUG=gctrace=1): the loop relay
// keeps a goroutine in epoll_wait, and a stop-the-world pause must reach
// every goroutine, so the pauses under load are part of the relay's cost.

// gctraceLine matches `gc 12 @3.456s 2%: 0.021+1.2+0.034 ms clock, ...`: the
// first and the last of the three clock times are the stop-the-world
// phases (sweep termination, mark termination).
var gctraceLine = regexp.MustCompile(`^gc \d+ @[\d.]+s \d+%: ([\d.]+)\+[\d.]+\+([\d.]+) ms clock`)

// gcPauses is what one rolegate's log says of its collections.
type gcPauses struct {
	target string
	cycles int
	pauses []float64 // ms, each stop-the-world phase
}

// readGCPauses reads the gctrace lines of a rolegate's log.
func readGCPauses(target, logFile string) (gcPauses, error) {
	g := gcPauses{target: target}
	f, err := os.Open(logFile)
	if err != nil {
		return g, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		m := gctraceLine.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		g.cycles++
		for _, s := range m[1:] {
			if v, err := strconv.ParseFloat(s, 64); err == nil {
				g.pauses = append(g.pauses, v)
			}
		}
	}
	return g, sc.Err()
}

// describe is one line: cycles, and the pauses' median, p99 and maximum.
func (g gcPauses) describe() string {
	if g.cycles == 0 {
		return fmt.Sprintf("%s: no collection logged", g.target)
	}
	p := slices.Clone(g.pauses)
	slices.Sort(p)
	at := func(q float64) float64 { return p[min(len(p)-1, int(q*float64(len(p))))] }
	return fmt.Sprintf("%s: %d collections, stop-the-world pauses median %.3f ms, p99 %.3f ms, max %.3f ms",
		g.target, g.cycles, at(0.5), at(0.99), p[len(p)-1])
}
