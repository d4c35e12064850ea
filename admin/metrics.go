package admin

import (
	"cmp"
	"slices"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rolegate/rolegate/limiter"
)

// Every metric rolegate exports is defined here, in one place. Values are read
// from snapshots at scrape time (proxy.Server.Sessions, limiter.Snapshot):
// nothing is counted twice, and nothing keeps state of its own.
var (
	descSessions = prometheus.NewDesc("rolegate_sessions",
		"Client sessions rolegate holds now, by role, database and state (startup, authenticating, idle, active, ...).",
		[]string{"role", "database", "state"}, nil)
	descSessionBytes = prometheus.NewDesc("rolegate_session_bytes",
		"Bytes relayed so far by the sessions open now, by role and direction (in: client to server, out: server to client). "+
			"It falls when a session ends.",
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
)

// collector is a prometheus.Collector over the proxy's and the limiter's
// snapshots. Describe lists every descriptor, so the registry checks them.
type collector struct {
	proxy   Proxy
	limiter func() limiter.Snapshot // nil without limits
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descSessions, descSessionBytes, descWaiting, descEvicting,
		descAdmitted, descEvictions, descEvictFailures, descRejections, descWaits, descWaitTimeouts} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	type sessionKey struct{ role, database, state string }
	type bytesKey struct{ role, direction string }
	sessions := map[sessionKey]int{}
	bytes := map[bytesKey]int64{}
	for _, s := range c.proxy.Sessions() {
		sessions[sessionKey{s.User, s.Database, s.State.String()}]++
		bytes[bytesKey{s.User, "in"}] += s.BytesIn
		bytes[bytesKey{s.User, "out"}] += s.BytesOut
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
		} {
			ch <- prometheus.MustNewConstMetric(m.d, prometheus.CounterValue, float64(m.v), role, policy)
		}
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
