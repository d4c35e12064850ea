package proxy

import (
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/rolegate/rolegate/limiter"
)

// tell reports what a decision carries besides its kind: what dry-run
// rules would have done (logged, counted and kept with the events, marked
// dry run), and a limit whose eviction budget is spent (a warning naming
// the role and the clients evicting).
func (a *admission) tell(d limiter.Decision) {
	for _, w := range d.Would {
		a.dryRun = true
		a.would(w)
	}
	if d.Thrashing {
		a.s.quiet.log(a.log, slog.LevelWarn, a.sess.user, "eviction budget spent: the limit is thrashing",
			"scope", d.Scope.String(), "limit", d.Limit, "policy", d.Policy.String(),
			"evictors", strings.Join(d.Evictors, ", "), "reason", d.Reason)
	}
}

// would logs and records one decision a dry-run rule took and did not
// carry out.
func (a *admission) would(w limiter.Decision) {
	now := time.Now()
	ev := Event{Time: now, DryRun: true, Role: a.sess.user, Database: a.sess.database, Client: a.sess.clientAddr,
		Policy: w.Policy.String(), Scope: w.Scope.String(), Reason: w.Reason}
	attrs := []any{"dry_run", true, "scope", w.Scope.String(), "limit", w.Limit, "sessions", w.Count,
		"policy", w.Policy.String(), "reason", w.Reason}
	switch w.Kind {
	case limiter.Evict:
		ev.Kind = "eviction"
		for _, v := range w.Victims {
			e := ev
			e.VictimPID, e.VictimRole, e.VictimApplicationName = v.PID, v.Role, v.ApplicationName
			e.ViaRolegate = v.ViaRolegate
			e.VictimIdle = idleFor(v.State, v.StateChange, now)
			if !v.BackendStart.IsZero() {
				e.VictimAge = now.Sub(v.BackendStart)
			}
			if held := a.s.registry.byBackendPID(v.PID); held != nil {
				e.VictimClient = held.clientAddr
			} else if v.Client.IsValid() {
				e.VictimClient = v.Client.String()
			}
			a.s.record(e)
			a.log.Info(fmt.Sprintf("dry run: would evict pid %d (%s) for a newer login", v.PID, victimSummary(v, now)),
				append(attrs, "victim_pid", v.PID, "victim_application_name", v.ApplicationName)...)
		}
		return
	case limiter.Wait:
		ev.Kind = "wait"
		a.log.Info("dry run: would wait", attrs...)
	default:
		ev.Kind = "rejection"
		a.log.Info("dry run: would reject", attrs...)
	}
	a.s.record(ev)
}

// victimSummary is `idle 3h, application psql` (or `age 5m` for a session
// that is not idle).
func victimSummary(v limiter.Holder, now time.Time) string {
	var s string
	if idle := idleFor(v.State, v.StateChange, now); idle > 0 {
		s = "idle " + roundHuman(idle)
	} else if !v.BackendStart.IsZero() {
		s = "age " + roundHuman(now.Sub(v.BackendStart))
	} else {
		s = "age unknown"
	}
	if v.ApplicationName != "" {
		s += ", application " + v.ApplicationName
	}
	return s
}

// roundHuman rounds a duration for a log line: seconds above a second.
func roundHuman(d time.Duration) string {
	if d >= time.Second {
		return d.Round(time.Second).String()
	}
	return d.Round(time.Millisecond).String()
}
