package admin

import (
	"cmp"
	"slices"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rolegate/rolegate/limiter"
	"github.com/rolegate/rolegate/proxy"
)

// Every metric rolegate exports is defined here, in one place. Gauges and the
// limiter's counters are read from snapshots at scrape time
// (proxy.Server.Sessions, limiter.Snapshot); what no snapshot holds (logins,
// failures, latencies, bytes of finished sessions) is counted by Metrics, the
// proxy's Observer. Nothing is counted twice.
var (
	descSessions = prometheus.NewDesc("rolegate_sessions",
		"Client connections rolegate holds now, by role, database and state: logins in flight (startup, authenticating, "+
			"waiting, connecting; role and database \"unknown\" until the client proved who it is) and sessions (idle, active, ...).",
		[]string{"role", "database", "state"}, nil)
	descSessionBytes = prometheus.NewDesc("rolegate_session_bytes",
		"Bytes relayed so far by the sessions open now, by role and direction (in: client to server, out: server to client). "+
			"It falls when a session ends, whose bytes then move to rolegate_relayed_bytes_total.",
		[]string{"role", "direction"}, nil)
	descWaiting = prometheus.NewDesc("rolegate_waiting_logins",
		"Logins waiting for a slot now, by role.",
		[]string{"role"}, nil)
	descEvicting = prometheus.NewDesc("rolegate_evictions_in_flight",
		"Sessions being terminated for a newer login and not yet gone.",
		nil, nil)
	descAdmitted = prometheus.NewDesc("rolegate_admitted_total",
		"Logins the limiter admitted, by role and the role's policy.",
		[]string{"role", "policy"}, nil)
	descEvictions = prometheus.NewDesc("rolegate_evictions_total",
		"Sessions terminated to make room for a newer login, by the login's role and the policy that evicted.",
		[]string{"role", "policy"}, nil)
	descEvictFailures = prometheus.NewDesc("rolegate_eviction_failures_total",
		"Evictions that failed (the victim could not be terminated), by role and policy.",
		[]string{"role", "policy"}, nil)
	descRejections = prometheus.NewDesc("rolegate_rejections_total",
		"Logins refused with 53300 (too many connections), wait timeouts included, by role and policy.",
		[]string{"role", "policy"}, nil)
	descWaits = prometheus.NewDesc("rolegate_waits_total",
		"Logins that had to wait for a slot (counted once per login), by role and policy.",
		[]string{"role", "policy"}, nil)
	descWaitTimeouts = prometheus.NewDesc("rolegate_wait_timeouts_total",
		"Logins refused because their wait reached wait_timeout, by role and policy.",
		[]string{"role", "policy"}, nil)
	descDryRun = prometheus.NewDesc("rolegate_dry_run_decisions_total",
		"What dry-run rules would have done and did not (decision: eviction, rejection, wait), by role and policy.",
		[]string{"role", "policy", "decision"}, nil)
	descBudgetFallbacks = prometheus.NewDesc("rolegate_eviction_budget_fallbacks_total",
		"Logins whose limit's eviction budget (max_evictions) was spent, so that its fallback decided, by role and policy.",
		[]string{"role", "policy"}, nil)
	descThrashing = prometheus.NewDesc("rolegate_limit_thrashing",
		"1 for each role or database limit whose eviction budget is spent now (it thrashes: see the warning naming the clients).",
		[]string{"scope", "name"}, nil)
)

// collector is a prometheus.Collector over the proxy's and the limiter's
// snapshots. Describe lists every descriptor, so the registry checks them.
type collector struct {
	proxy   Proxy
	limiter func() limiter.Snapshot // nil without limits
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descSessions, descSessionBytes, descWaiting, descEvicting,
		descAdmitted, descEvictions, descEvictFailures, descRejections, descWaits, descWaitTimeouts,
		descDryRun, descBudgetFallbacks, descThrashing} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	type sessionKey struct{ role, database, state string }
	type bytesKey struct{ role, direction string }
	sessions := map[sessionKey]int{}
	bytes := map[bytesKey]int64{}
	for _, s := range c.proxy.Sessions() {
		if !s.Verified { // what a client claims must not become a label value
			sessions[sessionKey{proxy.RoleUnknown, proxy.RoleUnknown, s.State.String()}]++
			continue
		}
		sessions[sessionKey{s.User, s.Database, s.State.String()}]++
		if !s.State.LoggingIn() { // a login in flight has relayed nothing
			bytes[bytesKey{s.User, "in"}] += s.BytesIn
			bytes[bytesKey{s.User, "out"}] += s.BytesOut
		}
	}
	for k, n := range sessions {
		ch <- prometheus.MustNewConstMetric(descSessions, prometheus.GaugeValue, float64(n), k.role, k.database, k.state)
	}
	for k, n := range bytes {
		ch <- prometheus.MustNewConstMetric(descSessionBytes, prometheus.GaugeValue, float64(n), k.role, k.direction)
	}
	if c.limiter == nil {
		return
	}
	snap := c.limiter()
	for role, n := range snap.WaitingByRole {
		ch <- prometheus.MustNewConstMetric(descWaiting, prometheus.GaugeValue, float64(n), role)
	}
	ch <- prometheus.MustNewConstMetric(descEvicting, prometheus.GaugeValue, float64(len(snap.Evicting)))
	for k, v := range snap.Counters {
		role, policy := k.Role, string(k.Policy)
		for _, m := range []struct {
			d *prometheus.Desc
			v uint64
		}{
			{descAdmitted, v.Admitted},
			{descEvictions, v.Evictions},
			{descEvictFailures, v.EvictFailures},
			{descRejections, v.Rejections},
			{descWaits, v.Waits},
			{descWaitTimeouts, v.WaitTimeouts},
			{descBudgetFallbacks, v.BudgetFallbacks},
		} {
			ch <- prometheus.MustNewConstMetric(m.d, prometheus.CounterValue, float64(m.v), role, policy)
		}
		for decision, n := range map[string]uint64{"eviction": v.DryRunEvictions, "rejection": v.DryRunRejections, "wait": v.DryRunWaits} {
			ch <- prometheus.MustNewConstMetric(descDryRun, prometheus.CounterValue, float64(n), role, policy, decision)
		}
	}
	for _, t := range snap.Thrashing {
		ch <- prometheus.MustNewConstMetric(descThrashing, prometheus.GaugeValue, 1, t.Scope.String(), t.Name)
	}
}

// counterKeys returns the snapshot's counter keys in a stable order.
func counterKeys(s limiter.Snapshot) []limiter.CounterKey {
	keys := make([]limiter.CounterKey, 0, len(s.Counters))
	for k := range s.Counters {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b limiter.CounterKey) int {
		return cmp.Or(cmp.Compare(a.Role, b.Role), cmp.Compare(a.Policy, b.Policy))
	})
	return keys
}

// Metrics counts what the proxy reports through proxy.Observer. Pass it as
// proxy.Config.Observer and as Options.Metrics, so that /metrics serves it.
// Histograms carry no role label, and failures name a role only once it is
// known to exist: label values stay few whatever clients send.
type Metrics struct {
	logins        *prometheus.CounterVec
	loginFailures *prometheus.CounterVec
	loginDuration prometheus.Histogram
	dialDuration  prometheus.Histogram
	dialFailures  prometheus.Counter
	waitDuration  *prometheus.HistogramVec
	relayedBytes  *prometheus.CounterVec

	// Totals for the console's SHOW STATS, which reads them without a scrape.
	nLogins, nFailures, nBytesIn, nBytesOut atomic.Int64
}

// Totals are the Metrics' counts since start, for SHOW STATS.
type Totals struct {
	Logins, LoginFailures int64
	// BytesIn and BytesOut are of sessions that have ended.
	BytesIn, BytesOut int64
}

// Totals returns the counts since start.
func (m *Metrics) Totals() Totals {
	return Totals{Logins: m.nLogins.Load(), LoginFailures: m.nFailures.Load(),
		BytesIn: m.nBytesIn.Load(), BytesOut: m.nBytesOut.Load()}
}

var _ proxy.Observer = (*Metrics)(nil)

// NewMetrics returns Metrics at zero.
func NewMetrics() *Metrics {
	return &Metrics{
		logins: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rolegate_logins_total",
			Help: "Logins that reached ReadyForQuery, by role.",
		}, []string{"role"}),
		loginFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rolegate_login_failures_total",
			Help: "Logins that did not get in, by role and reason (wrong password, unknown role, role has no password, " +
				"refused by server, too many connections, server error, client left, authentication timeout, " +
				"bad startup packet, startup timeout, startup failed, ...). " +
				`role is "unknown" until the role is known to exist (found by rolegate's authentication, or the client ` +
				"authenticated), so that unauthenticated clients cannot invent label values.",
		}, []string{"role", "reason"}),
		loginDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "rolegate_login_duration_seconds",
			Help:    "Time from accepting a client to its first ReadyForQuery, waits for a slot included, of logins that got in.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2.5, 12), // 1 ms .. ~60 s
		}),
		dialDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "rolegate_server_dial_duration_seconds",
			Help:    "Time to open a server connection (TCP, and TLS per sslmode), failed attempts included.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2.5, 10), // 0.5 ms .. ~2 s
		}),
		dialFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "rolegate_server_dial_failures_total",
			Help: "Server connections that could not be opened.",
		}),
		waitDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "rolegate_wait_duration_seconds",
			Help: "Time logins spent waiting for a slot, by outcome (admitted, or not: rejected at wait_timeout, " +
				"client left, error). Logins that did not wait are not observed.",
			Buckets: prometheus.ExponentialBuckets(0.01, 2.5, 10), // 10 ms .. ~38 s
		}, []string{"outcome"}),
		relayedBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "rolegate_relayed_bytes_total",
			Help: "Bytes relayed by sessions that have ended, by direction (in: client to server, out: server to client). " +
				"Sessions still open are in rolegate_session_bytes; the sum of both is everything relayed.",
		}, []string{"direction"}),
	}
}

func (m *Metrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.logins, m.loginFailures, m.loginDuration, m.dialDuration, m.dialFailures,
		m.waitDuration, m.relayedBytes}
}

// Describe implements prometheus.Collector.
func (m *Metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, c := range m.collectors() {
		c.Describe(ch)
	}
}

// Collect implements prometheus.Collector.
func (m *Metrics) Collect(ch chan<- prometheus.Metric) {
	for _, c := range m.collectors() {
		c.Collect(ch)
	}
}

// LoginDone implements proxy.Observer.
func (m *Metrics) LoginDone(role, _ string, d time.Duration) {
	m.nLogins.Add(1)
	m.logins.WithLabelValues(role).Inc()
	m.loginDuration.Observe(d.Seconds())
}

// LoginFailed implements proxy.Observer.
func (m *Metrics) LoginFailed(role, reason string) {
	m.nFailures.Add(1)
	m.loginFailures.WithLabelValues(role, reason).Inc()
}

// ServerDialed implements proxy.Observer.
func (m *Metrics) ServerDialed(d time.Duration, err error) {
	m.dialDuration.Observe(d.Seconds())
	if err != nil {
		m.dialFailures.Inc()
	}
}

// Waited implements proxy.Observer.
func (m *Metrics) Waited(_ string, d time.Duration, admitted bool) {
	outcome := "admitted"
	if !admitted {
		outcome = "not admitted"
	}
	m.waitDuration.WithLabelValues(outcome).Observe(d.Seconds())
}

// SessionEnded implements proxy.Observer.
func (m *Metrics) SessionEnded(_, _ string, bytesIn, bytesOut int64) {
	m.nBytesIn.Add(bytesIn)
	m.nBytesOut.Add(bytesOut)
	m.relayedBytes.WithLabelValues("in").Add(float64(bytesIn))
	m.relayedBytes.WithLabelValues("out").Add(float64(bytesOut))
}
