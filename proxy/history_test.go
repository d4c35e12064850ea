package proxy

import (
	"context"
	"errors"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/limiter"
	"github.com/rolegate/rolegate/upstream"
)

// fakeHistory is a History in memory: what was written, and what Recent
// answers (or fails with).
type fakeHistory struct {
	mu      sync.Mutex
	written []upstream.HistoryEvent
	recent  []upstream.HistoryEvent
	err     error
}

func (h *fakeHistory) Write(e upstream.HistoryEvent) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.written = append(h.written, e)
}

func (h *fakeHistory) Recent(_ context.Context, limit int) ([]upstream.HistoryEvent, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.err != nil {
		return nil, h.err
	}
	return h.recent[:min(limit, len(h.recent))], nil
}

func (h *fakeHistory) writes() []upstream.HistoryEvent {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]upstream.HistoryEvent(nil), h.written...)
}

// historyProxy is limitedProxy with a History and an instance name.
func historyProxy(t *testing.T, roles map[string]limiter.Rule, h History, instance string) *testProxy {
	t.Helper()
	ctl := superControl(t, shared)
	lim := &Limits{Limiter: limiter.New(time.Now), Server: ctl}
	lim.SetRules(mapRules{roles: roles}, true, 0)
	o := proxyOpts{auth: proxyAuth(time.Minute, auth.SourceFunc(ctl.Secret)), limits: lim}
	return startProxyWith(t, o, func(c *Config) { c.History, c.Instance = h, instance })
}

// Every event the Server records goes to its History too, with the
// instance and what is known of the victim; Server.History reads the
// History, and this instance's memory when the History cannot be read.
func TestEventsGoToTheHistory(t *testing.T) {
	ctx := context.Background()
	if err := shared.Exec(ctx, "drop role if exists hist_user; create role hist_user login password 'hist_pw'"); err != nil {
		t.Fatal(err)
	}
	h := &fakeHistory{}
	p := historyProxy(t, map[string]limiter.Rule{"hist_user": {MaxSessions: 1, Policy: limiter.PolicyNewestWins,
		Fallback: limiter.PolicyReject}}, h, "inst-one")
	first := connect(t, p.DSN("hist_user", "hist_pw", "app", "application_name=first_app"))
	pid := first.PgConn().PID()
	connect(t, p.DSN("hist_user", "hist_pw", "app")) // newest-wins: evicts first
	waitUntil(t, 30*time.Second, "the eviction in the history", func() bool { return len(h.writes()) > 0 })
	w := h.writes()
	if len(w) != 1 {
		t.Fatalf("history writes %+v, want one eviction", w)
	}
	e := w[0]
	if e.Instance != "inst-one" || e.Kind != "eviction" || e.Role != "hist_user" || e.Database != "app" ||
		e.Policy != "newest-wins" || e.Scope != "role" || e.VictimPID != pid || e.VictimRole != "hist_user" ||
		e.VictimApplicationName != "first_app" || e.VictimClient == "" || !e.ViaRolegate || e.VictimAge <= 0 ||
		e.VictimIdle <= 0 || e.At.IsZero() || e.Client == "" {
		t.Errorf("history event %+v", e)
	}
	mem := p.Events()
	if len(mem) != 1 || mem[0].Instance != "inst-one" || mem[0].VictimPID != pid {
		t.Errorf("memory events %+v", mem)
	}

	// Server.History is the table's, every instance's.
	other := upstream.HistoryEvent{At: time.Now(), Instance: "inst-two", Kind: "rejection", Role: "x", VictimAge: time.Second}
	h.mu.Lock()
	h.recent = []upstream.HistoryEvent{other, e}
	h.mu.Unlock()
	got := p.History(ctx, 10)
	if len(got) != 2 || got[0].Instance != "inst-two" || got[0].VictimAge != time.Second || got[1].VictimPID != pid ||
		got[1].VictimApplicationName != "first_app" {
		t.Errorf("History from the table: %+v", got)
	}
	if got := p.History(ctx, 1); len(got) != 1 {
		t.Errorf("History limited to 1: %d events", len(got))
	}
	// A table that cannot be read: this instance's events, and a warning.
	h.mu.Lock()
	h.err = errors.New("eviction history: read: the table is gone")
	h.mu.Unlock()
	got = p.History(ctx, 10)
	if len(got) != 1 || got[0].Instance != "inst-one" || got[0].VictimPID != pid {
		t.Errorf("History when the table fails: %+v, want the memory's", got)
	}
	if !strings.Contains(p.logs.String(), "eviction history: reading rolegate.events failed") ||
		!strings.Contains(p.logs.String(), "the table is gone") {
		t.Errorf("no warning for the unreadable table:\n%s", p.logs.String())
	}
}

// An instance without a name gets a random tag of 8 hex digits; events in
// memory carry it, and without a History Server.History is the memory's.
func TestInstanceTag(t *testing.T) {
	a, b := New(Config{}), New(Config{})
	tag := regexp.MustCompile(`^[0-9a-f]{8}$`)
	if !tag.MatchString(a.Instance()) || !tag.MatchString(b.Instance()) || a.Instance() == b.Instance() {
		t.Errorf("tags %q and %q", a.Instance(), b.Instance())
	}
	a.record(Event{Kind: "kill", VictimPID: 7})
	if got := a.History(context.Background(), 10); len(got) != 1 || got[0].Instance != a.Instance() || got[0].VictimPID != 7 {
		t.Errorf("History without a table: %+v", got)
	}
	if New(Config{Instance: "named"}).Instance() != "named" {
		t.Error("a configured instance name was replaced")
	}
	a.Close()
	b.Close()
}

// A dry-run decision goes to the history table with its kind prefixed
// ("dry-run eviction"), and comes back from it marked DryRun.
func TestDryRunInTheHistory(t *testing.T) {
	t.Parallel()
	const role = "hist_dry"
	pw := newRole(t, role, -1)
	h := &fakeHistory{}
	p := historyProxy(t, map[string]limiter.Rule{role: {MaxSessions: 1, Policy: limiter.PolicyNewestWins,
		Fallback: limiter.PolicyReject, DryRun: true}}, h, "inst-dry")
	first := connect(t, p.DSN(role, pw, "app"))
	connect(t, p.DSN(role, pw, "app"))
	waitUntil(t, 30*time.Second, "the dry-run eviction in the history", func() bool { return len(h.writes()) > 0 })
	w := h.writes()
	if len(w) != 1 || w[0].Kind != "dry-run eviction" || w[0].VictimPID != first.PgConn().PID() {
		t.Fatalf("history writes %+v, want one dry-run eviction of pid %d", w, first.PgConn().PID())
	}
	h.mu.Lock()
	h.recent = w
	h.mu.Unlock()
	got := p.History(context.Background(), 10)
	if len(got) != 1 || got[0].Kind != "eviction" || !got[0].DryRun {
		t.Errorf("read back: %+v, want an eviction marked dry run", got)
	}
	wantAlive(t, first, "the session a dry run would have evicted")
}
