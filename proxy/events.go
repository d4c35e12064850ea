package proxy

import (
	"sync"
	"time"
)

// Event is one eviction or rejection, kept for operators (the admin console's
// SHOW EVICTIONS): a copied value, safe to keep.
type Event struct {
	Time     time.Time
	Kind     string // "eviction", "rejection" or "kill"
	Role     string // the login's role
	Database string
	Client   string // the login's client address
	Policy   string
	Scope    string // "role" or "database": which limit
	// The victim, for evictions.
	VictimPID    uint32
	VictimRole   string
	VictimClient string // empty for a session opened elsewhere
	ViaRolegate  bool
	Reason       string
}

// eventLog keeps the most recent events in a ring.
type eventLog struct {
	mu     sync.Mutex
	events []Event
	next   int
	full   bool
}

const eventLogSize = 256

func (l *eventLog) add(e Event) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.events == nil {
		l.events = make([]Event, eventLogSize)
	}
	l.events[l.next] = e
	l.next = (l.next + 1) % len(l.events)
	l.full = l.full || l.next == 0
}

// recent returns the events, newest first.
func (l *eventLog) recent() []Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := l.next
	if l.full {
		n = len(l.events)
	}
	out := make([]Event, 0, n)
	for i := 1; i <= n; i++ {
		out = append(out, l.events[(l.next-i+len(l.events))%len(l.events)])
	}
	return out
}
