package proxy

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/rolegate/rolegate/upstream"
)

// Event is one eviction or rejection, kept for operators (the admin console's
// SHOW EVICTIONS): a copied value, safe to keep.
type Event struct {
	Time     time.Time
	Instance string // the rolegate instance that decided (Config.Instance)
	Kind     string // "eviction", "rejection", "wait" (dry run only) or "kill"
	// DryRun marks a decision a dry-run rule took and did not carry out:
	// nobody was evicted, rejected or held, and the login went on.
	DryRun   bool
	Role     string // the login's role
	Database string
	Client   string // the login's client address
	Policy   string
	Scope    string // "role" or "database": which limit
	// The victim, for evictions.
	VictimPID    uint32
	VictimRole   string
	VictimClient string // its client's address: to rolegate if it relays it, else as the server saw it
	// VictimApplicationName is known for a victim rolegate relays.
	VictimApplicationName string
	VictimAge             time.Duration // since its backend_start; 0 when unknown
	VictimIdle            time.Duration // idle for; 0 when it was not idle
	ViaRolegate           bool
	Reason                string
}

// History is the eviction history on the server, shared by every rolegate
// instance (upstream.History implements it). Write must never wait.
type History interface {
	Write(upstream.HistoryEvent)
	Recent(ctx context.Context, limit int) ([]upstream.HistoryEvent, error)
}

// dryRunKind prefixes the kind of a dry-run decision in the history table:
// "dry-run eviction".
const dryRunKind = "dry-run "

// newInstanceTag is a random name for an instance that has none: 8 hex digits.
func newInstanceTag() string {
	var b [4]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read does not fail
	return hex.EncodeToString(b[:])
}

// record keeps e in memory and, with a history configured, queues it for
// the table; neither waits.
func (s *Server) record(e Event) {
	e.Instance = s.cfg.Instance
	s.events.add(e)
	if s.cfg.History != nil {
		kind := e.Kind
		if e.DryRun {
			kind = dryRunKind + kind // the table's kind column says it all
		}
		s.cfg.History.Write(upstream.HistoryEvent{At: e.Time, Instance: e.Instance, Kind: kind, Policy: e.Policy,
			Scope: e.Scope, Role: e.Role, Database: e.Database, Client: e.Client, VictimPID: e.VictimPID,
			VictimRole: e.VictimRole, VictimApplicationName: e.VictimApplicationName, VictimClient: e.VictimClient,
			VictimAge: e.VictimAge, VictimIdle: e.VictimIdle, ViaRolegate: e.ViaRolegate, Reason: e.Reason})
	}
}

// Instance is this instance's name in the history (Config.Instance, or the
// random tag New gave it).
func (s *Server) Instance() string { return s.cfg.Instance }

// History returns up to limit events, newest first: every instance's from
// the history table when one is configured, else (or when the table cannot
// be read, which is logged) this instance's from memory.
func (s *Server) History(ctx context.Context, limit int) []Event {
	h := s.cfg.History
	if h == nil {
		return s.memoryEvents(limit)
	}
	rows, err := h.Recent(ctx, limit)
	if err != nil {
		if ctx.Err() == nil {
			s.quiet.log(s.log, slog.LevelWarn, "", "eviction history: reading rolegate.events failed; showing this instance's events from memory",
				"err", err)
		}
		return s.memoryEvents(limit)
	}
	out := make([]Event, 0, len(rows))
	for _, r := range rows {
		kind, dry := strings.CutPrefix(r.Kind, dryRunKind)
		out = append(out, Event{Time: r.At, Instance: r.Instance, Kind: kind, DryRun: dry, Policy: r.Policy, Scope: r.Scope,
			Role: r.Role, Database: r.Database, Client: r.Client, VictimPID: r.VictimPID, VictimRole: r.VictimRole,
			VictimApplicationName: r.VictimApplicationName, VictimClient: r.VictimClient, VictimAge: r.VictimAge,
			VictimIdle: r.VictimIdle, ViaRolegate: r.ViaRolegate, Reason: r.Reason})
	}
	return out
}

func (s *Server) memoryEvents(limit int) []Event {
	ev := s.events.recent()
	if limit >= 0 && len(ev) > limit {
		ev = ev[:limit]
	}
	return ev
}

// idleFor is how long a session in state has been idle since stateChange at
// now, 0 when it is not idle (or its state is hidden).
func idleFor(state string, stateChange, now time.Time) time.Duration {
	if !strings.HasPrefix(state, "idle") || stateChange.IsZero() {
		return 0
	}
	return now.Sub(stateChange)
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
