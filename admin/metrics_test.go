package admin

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/rolegate/rolegate/limiter"
	"github.com/rolegate/rolegate/proxy"
)

// observedRig is startRig with Metrics as the proxy's Observer, served on /metrics.
func observedRig(t *testing.T, roleRules rules) (r *rig, base string) {
	t.Helper()
	m := NewMetrics()
	r = startRigWith(t, roleRules, func(c *proxy.Config) { c.Observer = m })
	base = startHTTP(t, Options{Proxy: r.srv, Limiter: r.limits.Limiter.Snapshot, Logger: r.logger, Metrics: m})
	return r, base
}

// histogramCount is the number of observations of a histogram (summed over
// the series whose labels include the given ones); 0 when there is none.
func histogramCount(t *testing.T, base, name string, labels ...string) uint64 {
	t.Helper()
	body := want(t, http.MethodGet, base+"/metrics", "", http.StatusOK, "")
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	var n uint64
next:
	for _, m := range families[name].GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		for i := 0; i+1 < len(labels); i += 2 {
			if have[labels[i]] != labels[i+1] {
				continue next
			}
		}
		n += m.GetHistogram().GetSampleCount()
	}
	return n
}

// The Observer's series move on /metrics as logins succeed, fail, wait and
// end: logins, failures by reason, latencies, waits, bytes of ended sessions.
func TestObserverMetrics(t *testing.T) {
	r, base := observedRig(t, rules{
		"obs_wait": {MaxSessions: 1, Policy: limiter.PolicyWait, Fallback: limiter.PolicyReject, WaitTimeout: 20 * time.Second},
	})
	for _, q := range []string{"create role obs_user login password 'obs_pw'", "create role obs_wait login password 'wait_pw'"} {
		if err := r.cluster.Exec(t.Context(), q); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"rolegate_logins_total", "rolegate_login_failures_total", "rolegate_relayed_bytes_total"} {
		if n := metric(t, base, name); n != 0 {
			t.Errorf("%s = %v before any login", name, n)
		}
	}

	c := r.connect(t, "obs_user", "obs_pw")
	if _, err := c.Exec(t.Context(), "select repeat('x', 5000)"); err != nil {
		t.Fatal(err)
	}
	if n := metric(t, base, "rolegate_logins_total", "role", "obs_user"); n != 1 {
		t.Errorf("rolegate_logins_total{role=obs_user} = %v, want 1", n)
	}
	if n := histogramCount(t, base, "rolegate_login_duration_seconds"); n != 1 {
		t.Errorf("rolegate_login_duration_seconds count = %v, want 1", n)
	}
	if n := histogramCount(t, base, "rolegate_server_dial_duration_seconds"); n != 1 {
		t.Errorf("rolegate_server_dial_duration_seconds count = %v, want 1", n)
	}
	if n := metric(t, base, "rolegate_server_dial_failures_total"); n != 0 {
		t.Errorf("rolegate_server_dial_failures_total = %v, want 0", n)
	}
	c.Close(t.Context())
	waitFor(t, "the ended session's bytes in rolegate_relayed_bytes_total", func() bool {
		return metric(t, base, "rolegate_relayed_bytes_total", "direction", "out") >= 5000 &&
			metric(t, base, "rolegate_relayed_bytes_total", "direction", "in") > 0
	})

	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	for _, login := range [][2]string{{"obs_user", "wrong"}, {"obs_nobody", "wrong"}} {
		if c, err := pgx.Connect(ctx, r.dsn(login[0], login[1])); err == nil {
			c.Close(ctx)
			t.Fatalf("%s got in with a wrong password", login[0])
		}
	}
	// A failure is counted once the client has been told.
	waitFor(t, "two login failures counted", func() bool { return metric(t, base, "rolegate_login_failures_total") >= 2 })
	if n := metric(t, base, "rolegate_login_failures_total", "role", "obs_user", "reason", "wrong password"); n != 1 {
		t.Errorf(`rolegate_login_failures_total{role="obs_user",reason="wrong password"} = %v, want 1`, n)
	}
	if n := metric(t, base, "rolegate_login_failures_total", "role", proxy.RoleUnknown, "reason", "unknown role"); n != 1 {
		t.Errorf(`rolegate_login_failures_total{role="unknown",reason="unknown role"} = %v, want 1`, n)
	}
	if n := metric(t, base, "rolegate_login_failures_total", "role", "obs_nobody"); n != 0 {
		t.Errorf("a role that does not exist became a label value")
	}
	if n := metric(t, base, "rolegate_logins_total"); n != 1 {
		t.Errorf("rolegate_logins_total = %v after failed logins, want 1", n)
	}

	// A wait, admitted when the holder leaves.
	holder := r.connect(t, "obs_wait", "wait_pw")
	waited := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, r.dsn("obs_wait", "wait_pw"))
		if err == nil {
			c.Close(ctx)
		}
		waited <- err
	}()
	waitFor(t, "a waiting login", func() bool { return metric(t, base, "rolegate_waiting_logins", "role", "obs_wait") == 1 })
	holder.Close(t.Context())
	if err := <-waited; err != nil {
		t.Fatalf("the waiting login: %v", err)
	}
	if n := histogramCount(t, base, "rolegate_wait_duration_seconds", "outcome", "admitted"); n != 1 {
		t.Errorf(`rolegate_wait_duration_seconds{outcome="admitted"} count = %v, want 1`, n)
	}
	// A login is counted after its client has ReadyForQuery: wait for it.
	waitFor(t, "the waiting login counted", func() bool { return metric(t, base, "rolegate_logins_total", "role", "obs_wait") >= 2 })
	if n := metric(t, base, "rolegate_logins_total", "role", "obs_wait"); n != 2 {
		t.Errorf("rolegate_logins_total{role=obs_wait} = %v, want 2", n)
	}
}

// A limit whose eviction budget is spent shows on /metrics and /api/roles
// as thrashing, with its budget fallbacks counted; the limiter decides on a
// census of its own here (what decides is limiter's, tested there and
// through the proxy).
func TestThrashingShown(t *testing.T) {
	srv := proxy.New(proxy.Config{StartupTimeout: time.Second})
	defer srv.Close()
	l := limiter.New(time.Now)
	r := limiter.Rule{MaxSessions: 1, Policy: limiter.PolicyNewestWins, Fallback: limiter.PolicyReject,
		Budget: limiter.Budget{Evictions: 0, Per: time.Hour}}
	census := []limiter.Holder{{PID: 7, Role: "pool_user", Database: "db", BackendStart: time.Now().Add(-time.Hour), State: "idle"}}
	d := l.Decide(limiter.Login{ID: 1, Role: "pool_user", Database: "db", ApplicationName: "pool"}, r, limiter.NoLimit(), census)
	if d.Kind != limiter.Reject || !d.Thrashing {
		t.Fatalf("decision %v thrashing %v", d.Kind, d.Thrashing)
	}
	base := startHTTP(t, Options{Proxy: srv, Limiter: l.Snapshot})
	metrics := want(t, http.MethodGet, base+"/metrics", "", http.StatusOK, "")
	for _, line := range []string{`rolegate_limit_thrashing{name="pool_user",scope="role"} 1`,
		`rolegate_eviction_budget_fallbacks_total{policy="newest-wins",role="pool_user"} 1`} {
		if !strings.Contains(metrics, line) {
			t.Errorf("/metrics lacks %s", line)
		}
	}
	roles := getJSON[[]role](t, base+"/api/roles")
	if len(roles) != 1 || !roles[0].Thrashing || len(roles[0].Evictors) != 0 {
		t.Errorf("/api/roles: %+v; want pool_user thrashing (no evictions yet, so no evictors)", roles)
	}
}
