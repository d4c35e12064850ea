package admin

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rolegate/rolegate/internal/testutil"
	"github.com/rolegate/rolegate/limiter"
	"github.com/rolegate/rolegate/proxy"
	"github.com/rolegate/rolegate/upstream"
)

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func at(i int) time.Time { return t0.Add(time.Duration(i) * 10 * time.Second) }

// The ring keeps the last points samples, oldest first, and the marks of
// the samples it still holds.
func TestHistoryRing(t *testing.T) {
	h := newHistory(3, 10)
	for i := range 5 {
		var ev []proxy.Event
		if i == 1 || i == 3 {
			ev = []proxy.Event{{Time: at(i).Add(-time.Second), Kind: "eviction", Role: "app"}}
		}
		h.add(at(i), map[string]counts{"app": {Via: int32(i + 1), Limit: 2}}, ev)
	}
	v := h.view("")
	if len(v) != 1 || v[0].Role != "app" {
		t.Fatalf("view = %+v", v)
	}
	var got []string
	for _, p := range v[0].Points {
		got = append(got, fmt.Sprintf("%s=%d/%d", p.T.Format("04:05"), p.ViaRolegate, *p.Limit))
	}
	if want := "04:25=3/2 04:35=4/2 04:45=5/2"; strings.Join(got, " ") != want {
		t.Errorf("points %s, want %s", strings.Join(got, " "), want)
	}
	// The mark of sample 1 left with it; sample 3's stays.
	if len(v[0].Events) != 1 || !v[0].Events[0].T.Equal(at(3).Add(-time.Second)) || v[0].Events[0].Count != 1 {
		t.Errorf("events %+v, want only sample 3's eviction", v[0].Events)
	}
}

// A role starts a history only once it has something to show, keeps it
// while the ring holds anything, and loses it after a ringful of nothing. A
// role no longer sampled counts as empty; null limit stays null.
func TestHistoryPrune(t *testing.T) {
	h := newHistory(3, 10)
	h.add(at(0), map[string]counts{"idle": {Limit: 5}, "busy": {Waiting: 1, Limit: -1}}, nil)
	if v := h.view(""); len(v) != 1 || v[0].Role != "busy" || v[0].Points[0].Limit != nil || v[0].Points[0].Waiting != 1 {
		t.Fatalf("after one sample: %+v, want busy alone, limit null", v)
	}
	for i := 1; i <= 2; i++ {
		h.add(at(i), nil, nil) // busy is no longer known
		if v := h.view("busy"); len(v) != 1 || len(v[0].Points) != i+1 {
			t.Fatalf("after %d quiet samples: %+v", i, v)
		}
	}
	h.add(at(3), nil, nil) // the third quiet sample: the ring holds nothing busy
	if v := h.view(""); len(v) != 0 {
		t.Errorf("after a ringful of nothing: %+v, want no roles", v)
	}
	// An event alone starts a history too.
	h.add(at(4), map[string]counts{"idle": {Limit: 5}}, []proxy.Event{{Time: at(4), Kind: "rejection", Role: "idle"}})
	if v := h.view("idle"); len(v) != 1 || len(v[0].Events) != 1 || v[0].Events[0].Kind != "rejection" {
		t.Errorf("after a rejection: %+v", v)
	}
}

// Beyond maxRoles the least recently active roles go; among equally recent
// ones, the last by name.
func TestHistoryCap(t *testing.T) {
	h := newHistory(10, 2)
	h.add(at(0), map[string]counts{"a": {Via: 1}, "b": {Via: 1}}, nil)
	h.add(at(1), map[string]counts{"b": {Via: 1}, "c": {Via: 1}}, nil) // a is quiet now
	if got := roleNames(h.view("")); got != "b c" {
		t.Errorf("roles %q, want b c (a was least recently active)", got)
	}
	h.add(at(2), map[string]counts{"d": {Via: 1}, "e": {Via: 1}, "b": {Via: 1}}, nil)
	if got := roleNames(h.view("")); got != "b d" {
		t.Errorf("roles %q, want b d (all active now: the first by name)", got)
	}
}

func roleNames(v []roleHistoryView) string {
	var names []string
	for _, r := range v {
		names = append(names, r.Role)
	}
	return strings.Join(names, " ")
}

// Events are grouped by role, kind and dry run, with the newest time; a
// kill counts under its victim's role; an event with no role at all is
// left out.
func TestMarksOf(t *testing.T) {
	ev := []proxy.Event{
		{Time: at(1), Kind: "eviction", Role: "app"},
		{Time: at(3), Kind: "eviction", Role: "app"},
		{Time: at(2), Kind: "eviction", Role: "app", DryRun: true},
		{Time: at(2), Kind: "rejection", Role: "app"},
		{Time: at(2), Kind: "kill", VictimRole: "batch"},
		{Time: at(2), Kind: "kill"},
	}
	m := marksOf(at(4), ev)
	if len(m) != 2 || len(m["app"]) != 3 || len(m["batch"]) != 1 {
		t.Fatalf("marks %+v", m)
	}
	want := []mark{
		{At: at(4), T: at(3), Kind: "eviction", Count: 2},
		{At: at(4), T: at(2), Kind: "eviction", DryRun: true, Count: 1},
		{At: at(4), T: at(2), Kind: "rejection", Count: 1},
	}
	for i, w := range want {
		if m["app"][i] != w {
			t.Errorf("app mark %d = %+v, want %+v", i, m["app"][i], w)
		}
	}
	if k := m["batch"][0]; k.Kind != "kill" || k.Count != 1 {
		t.Errorf("batch mark %+v", k)
	}
}

// eventProxy serves a fixed list of sessions and a list of events that a
// test appends to.
type eventProxy struct {
	listProxy
	mu     sync.Mutex
	events []proxy.Event // newest first, as proxy.Server.Events
}

func (p *eventProxy) Events() []proxy.Event {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]proxy.Event(nil), p.events...)
}

func (p *eventProxy) record(e proxy.Event) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.events = append([]proxy.Event{e}, p.events...)
}

// A sample counts as /api/roles does, takes each event once, and is skipped
// when the server's sessions or a limit cannot be read: the first failure
// is logged, the next not (rate-limited), and recovery once.
func TestSamplerFailures(t *testing.T) {
	p := &eventProxy{listProxy: listProxy{sessions: []proxy.SessionInfo{
		{ID: 1, Verified: true, User: "app", Database: "db", BackendPID: 10, State: proxy.StateIdle, Start: t0},
		{ID: 2, Verified: true, User: "app", Database: "db", State: proxy.StateWaiting, Start: t0},
	}}}
	p.record(proxy.Event{Time: time.Now(), Kind: "eviction", Role: "app"})
	var sessionsErr, limitErr error
	calls := 0
	logs := &testutil.SyncBuffer{}
	s := newSampler(Options{
		Proxy: p,
		ServerSessions: func(_ context.Context, roles []string) ([]upstream.Backend, error) {
			calls++
			return []upstream.Backend{{PID: 11, Role: "app", Database: "db", State: "idle"}}, sessionsErr
		},
		Effective: func(context.Context, string, string) (limiter.Rule, limiter.Rule, string, string, error) {
			return limiter.Rule{MaxSessions: 2, Policy: limiter.PolicyNewestWins}, limiter.NoLimit(), "proxy.toml", "none", limitErr
		},
		Logger: slog.New(slog.DiscardHandler), // the sampler's own logger is the one that counts
	}, slog.New(slog.NewTextHandler(logs, nil)))

	s.sample(t.Context())
	s.sample(t.Context()) // the same event is not taken twice
	v := s.hist.view("app")
	if len(v) != 1 || len(v[0].Points) != 2 || len(v[0].Events) != 1 || v[0].Events[0].Count != 1 {
		t.Fatalf("after two samples: %+v", v)
	}
	if pt := v[0].Points[1]; pt.ViaRolegate != 1 || pt.Elsewhere != 1 || pt.Waiting != 1 || pt.Limit == nil || *pt.Limit != 2 {
		t.Errorf("point %+v, want 1 via rolegate, 1 elsewhere, 1 waiting, limit 2", pt)
	}
	if calls != 2 {
		t.Errorf("%d ServerSessions calls for 2 samples, want one each", calls)
	}

	sessionsErr = errors.New("connection refused")
	s.sample(t.Context())
	sessionsErr, limitErr = nil, errors.New("control connection gone")
	s.sample(t.Context())
	if v := s.hist.view("app"); len(v[0].Points) != 2 {
		t.Errorf("failed samples were recorded: %d points", len(v[0].Points))
	}
	if got := logs.String(); strings.Count(got, "sample skipped") != 1 || !strings.Contains(got, "connection refused") {
		t.Errorf("log after two failed samples, want one line naming the first error:\n%s", got)
	}
	limitErr = nil
	p.record(proxy.Event{Time: time.Now(), Kind: "rejection", Role: "app", DryRun: true})
	s.sample(t.Context())
	v = s.hist.view("app")
	if len(v[0].Points) != 3 || len(v[0].Events) != 2 || v[0].Events[1].Kind != "rejection" || !v[0].Events[1].DryRun {
		t.Errorf("after recovery: %+v", v)
	}
	if got := logs.String(); !strings.Contains(got, "sampling works again") || !strings.Contains(got, "skipped_since_last=1") {
		t.Errorf("log after recovery:\n%s", got)
	}

	// A sample cut short by its owner stopping is no failure.
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	before := logs.String()
	s.sample(ctx)
	if logs.String() != before {
		t.Errorf("a cancelled sample logged:\n%s", strings.TrimPrefix(logs.String(), before))
	}
}

// GET /api/history serves what the sampler took while Serve runs, with the
// interval, one role with ?role=, none for an unknown role; other methods
// are refused.
func TestHistoryAPI(t *testing.T) {
	p := &eventProxy{listProxy: listProxy{sessions: []proxy.SessionInfo{
		{ID: 1, Verified: true, User: "app", Database: "db", BackendPID: 10, State: proxy.StateIdle, Start: t0},
		{ID: 2, Verified: true, User: "batch", Database: "db", BackendPID: 11, State: proxy.StateActive, Start: t0},
	}}}
	base := startHTTP(t, Options{Proxy: p, HistoryInterval: 20 * time.Millisecond})
	p.record(proxy.Event{Time: time.Now(), Kind: "eviction", Role: "app"})
	var v historyView
	waitFor(t, "a history of app with 2 points and its eviction", func() bool {
		v = getJSON[historyView](t, base+"/api/history?role=app")
		return len(v.Roles) == 1 && len(v.Roles[0].Points) >= 2 && len(v.Roles[0].Events) == 1
	})
	if v.IntervalSeconds != 0.02 || v.Points != HistoryPoints || v.Roles[0].Role != "app" || v.Roles[0].Events[0].Kind != "eviction" ||
		v.Roles[0].Points[0].ViaRolegate != 1 || v.Roles[0].Points[0].Limit != nil {
		t.Errorf("/api/history?role=app = %+v", v)
	}
	if got := roleNames(getJSON[historyView](t, base+"/api/history").Roles); got != "app batch" {
		t.Errorf("/api/history roles %q, want app batch", got)
	}
	if v := getJSON[historyView](t, base+"/api/history?role=nobody"); v.Roles == nil || len(v.Roles) != 0 {
		t.Errorf("/api/history?role=nobody = %+v, want an empty list", v)
	}
	if got, _ := call(t, http.MethodPost, base+"/api/history", ""); got != http.StatusMethodNotAllowed {
		t.Errorf("POST /api/history: %d, want 405", got)
	}
}

// A sample whose control-connection calls outlast its timeout, even one
// that swallows the error, is skipped and logged.
func TestSamplerTimeout(t *testing.T) {
	logs := &testutil.SyncBuffer{}
	p := &listProxy{sessions: []proxy.SessionInfo{{ID: 1, Verified: true, User: "app", BackendPID: 10, State: proxy.StateIdle}}}
	s := newSampler(Options{Proxy: p, ServerSessions: func(ctx context.Context, _ []string) ([]upstream.Backend, error) {
		<-ctx.Done()
		return nil, nil // a slow call that does not say why it gave up
	}}, slog.New(slog.NewTextHandler(logs, nil)))
	s.timeout = 50 * time.Millisecond
	s.sample(t.Context())
	if v := s.hist.view(""); len(v) != 0 {
		t.Errorf("a timed-out sample was recorded: %+v", v)
	}
	if got := logs.String(); !strings.Contains(got, "sample skipped") || !strings.Contains(got, "deadline exceeded") {
		t.Errorf("log: %s", got)
	}
}

// One sampler runs per server: a second run (a second Serve) returns at
// once instead of sampling twice.
func TestSamplerRunsOnce(t *testing.T) {
	s := newSampler(Options{Proxy: &listProxy{}}, slog.New(slog.DiscardHandler))
	s.running.Lock() // as a first run does
	defer s.running.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	defer func() { cancel(); <-done }()
	go func() {
		defer close(done)
		s.run(ctx) // a sampling run would last until cancel
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("a second run did not return")
	}
}
