package proxy

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// Defaults of the repeated-failure log limit. A burst of 10 lets an ordinary
// incident (a mistyped password or three, a deploy that retries a few times)
// be logged complete, line by line; after that one line a second per key
// still shows a sample of who keeps failing, with a count of the rest, while
// a brute-forcer or a leaked pool at its limit failing thousands of times a
// second costs a line a second instead of thousands. 256 keys is more than
// the kinds × roles that fail at the same time in practice, and a few tens
// of kilobytes; beyond it, failures share one bucket per kind, which is the
// right limit for a failure that hits every role alike (a server down).
const (
	defaultLogBurst   = 10
	defaultLogEvery   = time.Second
	defaultLogMaxKeys = 256
)

// throttleOptions sets a logThrottle; a zero field takes its default. Only
// tests set them (Config.throttle): the limits are not a proxy.toml key.
type throttleOptions struct {
	burst   int              // lines a quiet key may log at once
	every   time.Duration    // then one line per every
	maxKeys int              // keys tracked one by one; more share a bucket per event
	now     func() time.Time // the clock; nil: time.Now
}

// logThrottle rate-limits the log lines of repeated failures, per key: a
// token bucket of burst lines that refills one line per every. A line let
// through after skipped ones learns how many were skipped, so a log reader
// still sees the size of a flood. It is pure: no goroutine, no I/O; the
// count of skipped lines is carried by the next line logged for the key.
//
// Memory is bounded: at most maxKeys keys are tracked, plus one overflow
// bucket per event. A subject may come from a client (even though the call
// sites avoid names a client has not proved), so a flood of distinct
// subjects must not grow the table: when it is full, keys whose bucket has
// refilled are forgotten, at most once per burst×every (the time a spent
// bucket takes to refill), and what does not fit shares its event's overflow
// bucket. Such a flood gets at most maxKeys first lines per burst×every
// through, plus the overflow bucket's rate.
type logThrottle struct {
	burst   int
	every   time.Duration
	maxKeys int
	now     func() time.Time

	mu        sync.Mutex
	keys      map[throttleKey]*bucket
	overflow  map[string]*bucket // by event, for keys the full table has no room for
	nextSweep time.Time          // the earliest next sweep: one walks the whole table
}

type throttleKey struct{ event, subject string }

// bucket is one key's state, kept as the time it is full again (the
// "theoretical arrival time" of the generic cell rate algorithm) rather than
// a token count, so refilling needs no arithmetic on fractions.
type bucket struct {
	full       time.Time // when the bucket holds its whole burst again
	suppressed int       // lines skipped since the last one let through
}

func newLogThrottle(o throttleOptions) *logThrottle {
	t := &logThrottle{burst: o.burst, every: o.every, maxKeys: o.maxKeys, now: o.now,
		keys: make(map[throttleKey]*bucket), overflow: make(map[string]*bucket)}
	if t.burst <= 0 {
		t.burst = defaultLogBurst
	}
	if t.every <= 0 {
		t.every = defaultLogEvery
	}
	if t.maxKeys <= 0 {
		t.maxKeys = defaultLogMaxKeys
	}
	if t.now == nil {
		t.now = time.Now
	}
	return t
}

// allow reports whether a line of event about subject may be logged now and,
// when it may, how many lines of its key were skipped since the last one
// logged. event must be a constant of the code (it names overflow buckets,
// which are not bounded otherwise); subject may be anything, "" included.
func (t *logThrottle) allow(event, subject string) (ok bool, suppressed int) {
	now := t.now()
	t.mu.Lock()
	defer t.mu.Unlock()
	b := t.bucket(throttleKey{event, subject}, now)
	if b.full.After(now.Add(time.Duration(t.burst-1) * t.every)) {
		b.suppressed++
		return false, 0
	}
	b.full = later(b.full, now).Add(t.every)
	suppressed, b.suppressed = b.suppressed, 0
	return true, suppressed
}

// bucket finds or makes k's bucket; the caller holds mu.
func (t *logThrottle) bucket(k throttleKey, now time.Time) *bucket {
	if b, ok := t.keys[k]; ok {
		return b
	}
	if len(t.keys) >= t.maxKeys && !now.Before(t.nextSweep) {
		t.sweep(now)
	}
	if len(t.keys) < t.maxKeys {
		b := &bucket{}
		t.keys[k] = b
		return b
	}
	b, ok := t.overflow[k.event]
	if !ok {
		b = &bucket{}
		t.overflow[k.event] = b
	}
	return b
}

// sweep forgets the keys whose bucket has refilled: a new bucket would be the
// same but for a count of skipped lines, and a key can only be full with such
// a count once it has been quiet for (burst-1)×every, so the count lost is an
// old one. The caller holds mu.
func (t *logThrottle) sweep(now time.Time) {
	for k, b := range t.keys {
		if !b.full.After(now) {
			delete(t.keys, k)
		}
	}
	t.nextSweep = now.Add(time.Duration(t.burst) * t.every)
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// log writes a repeated-failure line through l unless its key (msg, subject)
// is over its rate; a line let through after skipped ones carries
// suppressed=N. msg is the event: a constant. subject separates keys within
// it (a role, a failure class) so that one noisy role cannot hide another's
// failures.
func (t *logThrottle) log(l *slog.Logger, level slog.Level, subject, msg string, args ...any) {
	ctx := context.Background()
	if !l.Enabled(ctx, level) {
		return // a line nobody reads is neither counted nor skipped
	}
	ok, suppressed := t.allow(msg, subject)
	if !ok {
		return
	}
	if suppressed > 0 {
		args = append(args[:len(args):len(args)], "suppressed", suppressed) // not into the caller's array
	}
	l.Log(ctx, level, msg, args...)
}
