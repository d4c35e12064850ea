package proxy

import (
	"testing"
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
