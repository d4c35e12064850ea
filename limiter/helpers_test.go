package limiter

import (
	"slices"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/rolegate/rolegate/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// t0 is the fake clock's start.
var t0 = time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)

// fakeClock is the limiter's clock in tests: time moves only when told.
type fakeClock = testutil.Clock

func newClock() *fakeClock { return testutil.NewClock(t0) }

// sess is a session of role in db that started age ago and has been in
// state for stateAge (relative to t0).
func sess(pid uint32, role, db string, age time.Duration, state string, stateAge time.Duration) Holder {
	return Holder{PID: pid, Role: role, Database: db, BackendStart: t0.Add(-age),
		State: state, StateChange: t0.Add(-stateAge)}
}

// idle is an idle session that went idle right after it started.
func idle(pid uint32, role, db string, age time.Duration) Holder {
	return sess(pid, role, db, age, "idle", age)
}

func rule(limit int, p Policy) Rule {
	return Rule{MaxSessions: limit, Policy: p, WaitTimeout: 10 * time.Second}
}

func pids(hs []Holder) []uint32 {
	out := make([]uint32, len(hs))
	for i, h := range hs {
		out[i] = h.PID
	}
	return out
}

func without(hs []Holder, pid uint32) []Holder {
	return slices.DeleteFunc(slices.Clone(hs), func(h Holder) bool { return h.PID == pid })
}

func ready(t *Ticket) bool {
	select {
	case <-t.Ready():
		return true
	default:
		return false
	}
}

// isReady reports whether t has a pending wake-up, without consuming it.
func isReady(t *Ticket) bool { return len(t.ready) > 0 }
