package proxy

import (
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"
)

func TestEventLogKeepsTheNewest(t *testing.T) {
	var l eventLog
	if got := l.recent(); len(got) != 0 {
		t.Fatalf("empty log: %v", got)
	}
	for i := range eventLogSize + 10 {
		l.add(Event{VictimPID: uint32(i)})
	}
	got := l.recent()
	if len(got) != eventLogSize {
		t.Fatalf("%d events, want %d", len(got), eventLogSize)
	}
	for i, e := range got {
		if want := uint32(eventLogSize + 9 - i); e.VictimPID != want {
			t.Fatalf("event %d is pid %d, want %d (newest first)", i, e.VictimPID, want)
		}
	}
}

func TestReplaceEvictedOnlyTheTermination(t *testing.T) {
	other := encodeAll(t, &pgproto3.ErrorResponse{Severity: "ERROR", Code: "22012", Message: "division by zero"})
	term := encodeAll(t, &pgproto3.ErrorResponse{Severity: "FATAL", Code: "57P01", Message: "terminating connection due to administrator command"})
	s := &session{}
	why := "terminating connection: rolegate evicted this session"
	s.evictMsg.Store(&why)
	evs := []event{{typ: 'E', off: 0}}
	if out, err := s.replaceEvicted(other, evs); err != nil || string(out) != string(other) {
		t.Fatalf("an ordinary error was replaced: %q, %v", out, err)
	}
	out, err := s.replaceEvicted(term, evs)
	if err == nil || !strings.Contains(string(out), why) || !strings.Contains(string(out), "57P01") {
		t.Fatalf("the termination was not replaced: %q, %v", out, err)
	}
}
