package proxy

import (
	"context"
	"slices"
	"sync"
	"time"

	"github.com/rolegate/rolegate/limiter"
	"github.com/rolegate/rolegate/upstream"
)

// fakeView is a ServerView for admission tests that need no control
// connection: the census is made of sessions the test controls, and
// Terminate, the census and the server's limits can be made to fail, stall,
// or let a victim live on. It drives the real admission code (startProxy
// with limits: &Limits{Limiter: ..., Server: fake}); logins it admits still
// log in to a real server, so tests either use a role of that server or
// only take paths that end before the server login (rejections).
//
// It does not implement serverLocker: admissions are serialized by the
// limiter's in-process locks only, as with any ServerView without advisory
// locks.
//
// The zero value is not ready; use newFakeView.
type fakeView struct {
	mu       sync.Mutex
	holders  []limiter.Holder // the census, in the order Census returns it
	super    map[string]bool  // roles that are superusers
	limits   map[string]int   // rolconnlimit by role; absent: -1 (none)
	stall    chan struct{}    // not nil: Census blocks until it is closed or ctx ends
	census   func(role, database string, holders []limiter.Holder) ([]limiter.Holder, error)
	term     func(t upstream.Target, timeout time.Duration) (upstream.Termination, error)
	present  func(t upstream.Target, calls int) error // runs before each Present, with its count so far
	targets  []upstream.Target                        // every Terminate call, in order
	timeouts []time.Duration                          // the timeout of each
	calls    struct{ census, terminate, limits, present int }
}

func newFakeView() *fakeView {
	return &fakeView{super: map[string]bool{}, limits: map[string]int{}}
}

// add puts sessions into the census.
func (f *fakeView) add(hs ...limiter.Holder) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.holders = append(f.holders, hs...)
}

// remove takes pid out of the census (the session ended).
func (f *fakeView) remove(pid uint32) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.holders = slices.DeleteFunc(f.holders, func(h limiter.Holder) bool { return h.PID == pid })
}

// onTerminate sets what Terminate does; nil restores the default, the
// server's: the guards are checked against the census and, if they pass,
// the victim ends (it leaves the census) and Terminate reports Terminated
// (see end, which a hook may call too).
func (f *fakeView) onTerminate(fn func(t upstream.Target, timeout time.Duration) (upstream.Termination, error)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.term = fn
}

// onCensus sets a hook that computes each census from the sessions the test
// put in (for example a new session every call, or an error); nil: the
// sessions as they are. It runs without the fake's lock held, so it may
// call the fake's other methods.
func (f *fakeView) onCensus(fn func(role, database string, holders []limiter.Holder) ([]limiter.Holder, error)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.census = fn
}

// stallCensus makes every Census block until the returned release is called
// (or its context ends); release is safe to call more than once.
func (f *fakeView) stallCensus() (release func()) {
	ch := make(chan struct{})
	f.mu.Lock()
	f.stall = ch
	f.mu.Unlock()
	return sync.OnceFunc(func() {
		f.mu.Lock()
		if f.stall == ch {
			f.stall = nil
		}
		f.mu.Unlock()
		close(ch)
	})
}

// terminated returns a copy of the targets Terminate was called with.
func (f *fakeView) terminated() []upstream.Target {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.targets)
}

// terminateTimeouts returns a copy of the timeouts Terminate was called
// with, in order.
func (f *fakeView) terminateTimeouts() []time.Duration {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.timeouts)
}

// presentCalls returns how often Present was called.
func (f *fakeView) presentCalls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls.present
}

// counts returns how often Census, Terminate and ServerLimits were called.
func (f *fakeView) counts() (census, terminate, limits int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls.census, f.calls.terminate, f.calls.limits
}

// Census returns the sessions of role or database, as upstream.Control
// does (the caller marks which are rolegate's).
func (f *fakeView) Census(ctx context.Context, role, database string) ([]limiter.Holder, error) {
	f.mu.Lock()
	f.calls.census++
	stall := f.stall
	f.mu.Unlock()
	if stall != nil {
		select {
		case <-stall:
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		}
	}
	f.mu.Lock()
	var out []limiter.Holder
	for _, h := range f.holders {
		if h.Role == role || h.Database == database {
			h.ViaRolegate = false
			out = append(out, h)
		}
	}
	hook := f.census
	f.mu.Unlock()
	if hook != nil {
		return hook(role, database, out)
	}
	return out, nil
}

// ServerLimits reports the limits the test set (none by default).
func (f *fakeView) ServerLimits(ctx context.Context, role, database string, ttl time.Duration) (int, bool, int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls.limits++
	limit, ok := f.limits[role]
	if !ok {
		limit = -1
	}
	return limit, f.super[role], -1, nil
}

// Terminate records the call and does what onTerminate says.
func (f *fakeView) Terminate(ctx context.Context, t upstream.Target, timeout time.Duration) (upstream.Termination, error) {
	f.mu.Lock()
	f.calls.terminate++
	f.targets = append(f.targets, t)
	f.timeouts = append(f.timeouts, timeout)
	term := f.term
	f.mu.Unlock()
	if term != nil {
		return term(t, timeout)
	}
	return f.end(t), nil
}

// onPresent sets a hook that runs before each Present with the number of
// calls so far (for example to end a signalled victim after a few looks);
// an error it returns is Present's. It runs without the fake's lock held.
func (f *fakeView) onPresent(fn func(t upstream.Target, calls int) error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.present = fn
}

// Present reports whether t's backend is in the census (its pid, and its
// backend_start when t has one).
func (f *fakeView) Present(ctx context.Context, t upstream.Target) (bool, error) {
	f.mu.Lock()
	f.calls.present++
	hook, calls := f.present, f.calls.present
	f.mu.Unlock()
	if hook != nil {
		if err := hook(t, calls); err != nil {
			return false, err
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.ContainsFunc(f.holders, func(h limiter.Holder) bool {
		return h.PID == t.PID && (t.BackendStart.IsZero() || t.BackendStart.Equal(h.BackendStart))
	}), nil
}

// end is what the server does with a target: it checks the guards against
// the census and, if they pass, the session ends (leaves the census).
func (f *fakeView) end(t upstream.Target) upstream.Termination {
	f.mu.Lock()
	defer f.mu.Unlock()
	i := slices.IndexFunc(f.holders, func(h limiter.Holder) bool { return h.PID == t.PID })
	if i < 0 {
		return upstream.NoBackend
	}
	h := f.holders[i]
	switch {
	case !t.BackendStart.IsZero() && !t.BackendStart.Equal(h.BackendStart):
		return upstream.Replaced
	case !t.IdleSince.IsZero() && (h.State != "idle" || !t.IdleSince.Equal(h.StateChange)):
		return upstream.NotIdle
	}
	f.holders = slices.Delete(f.holders, i, i+1)
	return upstream.Terminated
}
