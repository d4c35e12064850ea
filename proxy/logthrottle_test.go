package proxy

import (
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/internal/testutil"
)

// newFakeClock is a clock a test moves by hand; the proxy's goroutines may read it.
func newFakeClock() *testutil.Clock {
	return testutil.NewClock(time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC))
}

// throttleStep is n calls of allow for one key, after the clock moved by
// after, each with the same outcome.
type throttleStep struct {
	after          time.Duration
	event, subject string
	n              int  // calls; 0 means 1
	ok             bool // let through
	suppressed     int  // reported by the first call let through
	keys           int  // keys tracked one by one after the step; 0: not checked
}

// Steps of a throttle with a burst of 3, one line a second and room for 4 keys.
func TestLogThrottle(t *testing.T) {
	const sec = time.Second
	tests := []struct {
		name  string
		steps []throttleStep
	}{
		{"burst, then skip", []throttleStep{
			{event: "e", subject: "a", n: 3, ok: true},
			{event: "e", subject: "a", n: 2},
		}},
		{"one line per interval carries the count of the skipped", []throttleStep{
			{event: "e", subject: "a", n: 3, ok: true},
			{event: "e", subject: "a", n: 5},
			{after: sec, event: "e", subject: "a", ok: true, suppressed: 5},
			{event: "e", subject: "a"},
			{after: sec, event: "e", subject: "a", ok: true, suppressed: 1},
			{after: sec, event: "e", subject: "a", ok: true}, // the count was reported once
		}},
		{"half an interval refills nothing", []throttleStep{
			{event: "e", subject: "a", n: 3, ok: true},
			{after: sec / 2, event: "e", subject: "a"},
			{after: sec / 2, event: "e", subject: "a", ok: true, suppressed: 1},
		}},
		{"a quiet key gets its whole burst back, and no more", []throttleStep{
			{event: "e", subject: "a", n: 3, ok: true},
			{event: "e", subject: "a"},
			{after: time.Hour, event: "e", subject: "a", ok: true, suppressed: 1},
			{event: "e", subject: "a", n: 2, ok: true},
			{event: "e", subject: "a"},
		}},
		{"keys are independent", []throttleStep{
			{event: "e", subject: "a", n: 3, ok: true},
			{event: "e", subject: "a"},
			{event: "e", subject: "b", n: 3, ok: true}, // another role
			{event: "e", subject: "b"},
			{event: "f", subject: "a", n: 3, ok: true}, // another event
			{event: "e", subject: "a"},
			{after: sec, event: "e", subject: "a", ok: true, suppressed: 2},
			{event: "e", subject: "b", ok: true, suppressed: 1},
			{event: "f", subject: "a", ok: true},
		}},
		{"keys beyond the bound share their event's bucket", []throttleStep{
			{event: "e", subject: "k1", ok: true, keys: 1},
			{event: "e", subject: "k2", ok: true, keys: 2},
			{event: "e", subject: "k3", ok: true, keys: 3},
			{event: "e", subject: "k4", ok: true, keys: 4},
			{event: "e", subject: "k5", ok: true, keys: 4},
			{event: "e", subject: "k6", ok: true, keys: 4},
			{event: "e", subject: "k7", ok: true, keys: 4},
			{event: "e", subject: "k8", keys: 4}, // the overflow bucket's burst is spent
			{event: "e", subject: "k9", keys: 4},
			{event: "f", subject: "k9", ok: true, keys: 4}, // another event's overflow
			{event: "e", subject: "k1", n: 2, ok: true, keys: 4},
			{event: "e", subject: "k1", keys: 4}, // a tracked key keeps its own bucket
		}},
		{"refilled keys are forgotten when room is needed", []throttleStep{
			{event: "e", subject: "k1", n: 3, ok: true},
			{event: "e", subject: "k1"}, // k1 has a count to carry
			{event: "e", subject: "k2", ok: true},
			{event: "e", subject: "k3", ok: true},
			{event: "e", subject: "k4", n: 3, ok: true, keys: 4},
			{after: sec, event: "e", subject: "k5", ok: true, keys: 3}, // k2, k3 were full again
			{event: "e", subject: "k6", ok: true, keys: 4},
			{event: "e", subject: "k1", ok: true, suppressed: 1, keys: 4}, // not full: kept with its count
		}},
		{"sweeps at most once a refill of the burst", []throttleStep{
			{event: "e", subject: "k1", ok: true},
			{event: "e", subject: "k2", ok: true},
			{event: "e", subject: "k3", ok: true},
			{event: "e", subject: "k4", ok: true},
			{after: sec, event: "e", subject: "k5", ok: true, keys: 1}, // a sweep
			{event: "e", subject: "k6", ok: true, keys: 2},
			{event: "e", subject: "k7", ok: true, keys: 3},
			{event: "e", subject: "k8", ok: true, keys: 4},
			{after: 5 * sec / 2, event: "e", subject: "k9", ok: true, keys: 4}, // too soon: overflow
			{after: sec / 2, event: "e", subject: "k10", ok: true, keys: 1},    // burst×every later
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			th := newLogThrottle(throttleOptions{burst: 3, every: time.Second, maxKeys: 4, now: clock.Now})
			for i, st := range tt.steps {
				clock.Advance(st.after)
				for call := range max(st.n, 1) {
					ok, suppressed := th.allow(st.event, st.subject)
					want := 0
					if call == 0 {
						want = st.suppressed
					}
					if ok != st.ok || suppressed != want {
						t.Fatalf("step %d (%s/%s), call %d: allow = %v, suppressed %d; want %v, %d",
							i+1, st.event, st.subject, call+1, ok, suppressed, st.ok, want)
					}
				}
				if st.keys != 0 && len(th.keys) != st.keys {
					t.Fatalf("step %d: %d keys tracked, want %d", i+1, len(th.keys), st.keys)
				}
			}
		})
	}
}

// The defaults: 10 lines at once, then one a second.
func TestLogThrottleDefaults(t *testing.T) {
	clock := newFakeClock()
	th := newLogThrottle(throttleOptions{now: clock.Now})
	let := 0
	for range 100 {
		if ok, _ := th.allow("e", "a"); ok {
			let++
		}
	}
	if let != 10 {
		t.Errorf("%d of 100 lines at once let through, want 10", let)
	}
	for range 60 {
		clock.Advance(100 * time.Millisecond)
		if ok, _ := th.allow("e", "a"); ok {
			let++
		}
	}
	if let != 16 {
		t.Errorf("%d lines let through after 6 more seconds, want 16", let)
	}
}

// A flood of distinct subjects, as random role names from unauthenticated
// clients would be, neither grows the table past its bound nor gets many
// lines through.
func TestLogThrottleFloodOfKeys(t *testing.T) {
	clock := newFakeClock()
	th := newLogThrottle(throttleOptions{burst: 10, every: time.Second, maxKeys: 100, now: clock.Now})
	let := 0
	for i := range 200_000 { // 10,000 lines a second for 20 s
		if i%1000 == 0 {
			clock.Advance(100 * time.Millisecond)
		}
		if ok, _ := th.allow("login failed", fmt.Sprintf("role-%d", i)); ok {
			let++
		}
		if len(th.keys) > 100 || len(th.overflow) > 1 {
			t.Fatalf("after %d keys: %d tracked, %d overflow buckets", i+1, len(th.keys), len(th.overflow))
		}
	}
	// New keys get a line each while there is room, 100 at first and 100
	// after the one sweep 10 s (burst×every) later; the rest get the overflow
	// bucket's burst and then one a second.
	if want := 2*100 + 10 + 20; let > want {
		t.Errorf("%d lines of a 20 s flood let through, want %d at most", let, want)
	}
}

// log writes what allow lets through, with the count of the skipped lines,
// and lines below the logger's level neither count nor use the burst.
func TestLogThrottleLog(t *testing.T) {
	clock := newFakeClock()
	th := newLogThrottle(throttleOptions{burst: 2, every: time.Second, now: clock.Now})
	var out testutil.SyncBuffer
	l := slog.New(slog.NewTextHandler(&out, &slog.HandlerOptions{Level: slog.LevelInfo}))
	for range 5 {
		th.log(l, slog.LevelDebug, "r", "below the level")
	}
	for range 5 {
		th.log(l, slog.LevelInfo, "r", "failed", "k", "v")
	}
	clock.Advance(time.Second)
	attrs := []any{"k", "v", "caller's", "own"}
	th.log(l, slog.LevelWarn, "r", "failed", attrs[:2]...) // room for the count in the caller's array
	if attrs[2] != "caller's" || attrs[3] != "own" {
		t.Errorf("log wrote into the caller's array: %q", attrs)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 3 || strings.Contains(out.String(), "below the level") {
		t.Fatalf("lines:\n%s\nwant 3 lines of failed", out.String())
	}
	if strings.Contains(lines[1], "suppressed") || !strings.Contains(lines[2], "level=WARN msg=failed k=v suppressed=3") {
		t.Errorf("lines:\n%s\nwant suppressed=3 on the third only", out.String())
	}
}

// Forty wrong passwords in a row: every client gets PostgreSQL's 28P01 and
// the Observer counts every failure, but the log has only the burst of "login
// failed" lines; the next line after a refill says how many were skipped, and
// another role's failure has a bucket of its own.
func TestLoginFailuresRateLimited(t *testing.T) {
	t.Parallel()
	clock := newFakeClock()
	ctl := superControl(t, shared)
	rec := &recorder{}
	p := startProxyWith(t, proxyOpts{auth: proxyAuth(time.Minute, auth.SourceFunc(ctl.Secret)),
		throttle: throttleOptions{now: clock.Now}}, // the defaults, with a clock that stands still
		func(c *Config) { c.Observer = rec })
	lines := func(parts ...string) []string { return logLines(p, append(parts, `msg="login failed"`)...) }

	const n = 40
	for i := range n {
		_, err := pgx.Connect(t.Context(), p.DSN("scram_user", "not "+scramPW, "app"))
		if err == nil {
			t.Fatalf("login %d with a wrong password got in", i+1)
		}
		wantPgError(t, err, "FATAL", "28P01", passwordFailed("scram_user"))
	}
	// The Observer hears of a failure after its log line is written or skipped.
	eventually(t, "every failure observed", func(r recorded) bool { return len(r.failures) == n }, rec)
	if got := lines("role=scram_user", `reason="wrong password"`); len(got) != defaultLogBurst {
		t.Errorf("%d login failed lines for %d failures, want the burst, %d:\n%s", len(got), n, defaultLogBurst, strings.Join(got, "\n"))
	}
	if got := logLines(p, "suppressed="); len(got) != 0 {
		t.Errorf("a line within the burst carries a count: %q", got)
	}

	// Another role is not hidden by the flood: an unknown one has its own key.
	_, err := pgx.Connect(t.Context(), p.DSN("no_such_role", "whatever", "app"))
	wantPgError(t, err, "FATAL", "28P01", passwordFailed("no_such_role"))
	clock.Advance(defaultLogEvery)
	_, err = pgx.Connect(t.Context(), p.DSN("scram_user", "not "+scramPW, "app"))
	wantPgError(t, err, "FATAL", "28P01", passwordFailed("scram_user"))
	got := eventually(t, "the last two failures observed", func(r recorded) bool { return len(r.failures) == n+2 }, rec)

	if l := lines("role=no_such_role", `reason="unknown role"`); len(l) != 1 {
		t.Errorf("unknown role: %d lines, want 1", len(l))
	}
	want := fmt.Sprintf("suppressed=%d", n-defaultLogBurst)
	if l := lines("role=scram_user", want); len(l) != 1 {
		t.Errorf("no line with %s after the refill:\n%s", want, p.logs.String())
	}
	wrong := 0
	for _, f := range got.failures {
		if f == "scram_user/wrong password" {
			wrong++
		}
	}
	if wrong != n+1 || !slices.Contains(got.failures, RoleUnknown+"/unknown role") {
		t.Errorf("observed failures %q, want %d of scram_user/wrong password and one unknown role", got.failures, n+1)
	}
}
