package proxy

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/rolegate/rolegate/internal/pgname"
	"github.com/rolegate/rolegate/limiter"
)

// LimitExplained is one limit as EXPLAIN LOGIN shows it.
type LimitExplained struct {
	Scope string // "role" or "database"
	Name  string
	// Limit is the effective limit, -1 for none; Source says where it comes
	// from: "proxy.toml", "server" (rolconnlimit or datconnlimit),
	// "override" (SET LIMIT) or "none".
	Limit  int
	Source string
	// The rule's policy and the rest of it; PolicySource is "proxy.toml"
	// or "override" (SET POLICY).
	Policy       string
	PolicySource string
	Fallback     string
	DryRun       bool
	EvictScope   string
	MaxEvictions string
	Protect      []string
	// The sessions that hold its slots now: through this rolegate, and
	// opened elsewhere (directly, or through another instance).
	ViaRolegate int
	Elsewhere   int
}

// Explanation is what a login of a role would get now, and why (EXPLAIN
// LOGIN, /api/explain). It is computed by the same code as a real login's
// decision (limiter.Limiter.Explain), on a fresh census, and changes nothing.
type Explanation struct {
	Role, Database, ApplicationName, Client string
	Superuser                               bool
	Limits                                  []LimitExplained // the role's, then the database's
	// Outcome is "admitted", "evict", "wait" or "rejected", or "disabled"
	// or "paused" when an operator holds the role's or database's logins;
	// Victims the pids an eviction would terminate; Verdict says it in a
	// sentence: `would evict pid 4242 (idle 3h, application psql) for
	// newest-wins`.
	Outcome string
	Victims []uint32
	Verdict string
	Reason  string // the limiter's reason, as a real login's log line has it
	// Would are what dry-run rules would decide, as sentences.
	Would []string
}

// ErrBadClient is Explain's answer to a client that is not an IP address.
var ErrBadClient = errors.New("the client is not an IP address")

// Explain tells what a login of role to database (with application_name
// app, from client, both optional) would get now. It needs limits and a
// control connection (ErrNoControl).
func (s *Server) Explain(ctx context.Context, role, database, app, client string) (Explanation, error) {
	lim := s.cfg.Limits
	if lim == nil {
		return Explanation{}, ErrNoControl
	}
	role, database = pgname.Identifier(role), pgname.Identifier(database)
	e := Explanation{Role: role, Database: database, ApplicationName: app, Client: client}
	var addr netip.Addr
	if client != "" {
		a, err := netip.ParseAddr(client)
		if err != nil {
			return e, fmt.Errorf("%w: %q", ErrBadClient, client)
		}
		addr = a.Unmap()
	}
	rr, dr, rsrc, dsrc, super, err := lim.effective(ctx, role, database)
	if err != nil {
		return e, err
	}
	e.Superuser = super
	o, overridden := lim.override(role)
	rl := explainLimit("role", role, rr, rsrc, overridden && o.Policy != nil)
	dl := explainLimit("database", database, dr, dsrc, false)
	login := limiter.Login{Role: role, Database: database, Superuser: super, ApplicationName: app, Client: addr}
	var holders []limiter.Holder
	if rr.Limited() || dr.Limited() {
		cctx, cancel := context.WithTimeout(ctx, controlTimeout)
		defer cancel()
		login.CensusEpoch = lim.Limiter.Epoch()
		if holders, err = lim.Server.Census(cctx, role, database); err != nil {
			return e, fmt.Errorf("census of role %q: %w", role, err)
		}
		pending := s.pending.matcher()
		holders = slices.DeleteFunc(holders, pending)
		s.markOwn(holders)
	}
	for _, h := range holders {
		if h.Replication {
			continue
		}
		for _, l := range []*LimitExplained{&rl, &dl} {
			if l.Scope == "role" && (h.Role != role || h.Superuser) || l.Scope == "database" && h.Database != database {
				continue
			}
			if h.ViaRolegate {
				l.ViaRolegate++
			} else {
				l.Elsewhere++
			}
		}
	}
	e.Limits = []LimitExplained{rl, dl}
	d := lim.Limiter.Explain(login, rr, dr, holders)
	e.Reason = d.Reason
	e.Outcome, e.Victims, e.Verdict = verdictOf(d)
	if !rr.Limited() && !dr.Limited() && !super {
		e.Verdict = "admitted: no limit applies to this role or database"
	}
	for _, w := range d.Would {
		_, _, v := verdictOf(w)
		e.Would = append(e.Would, "dry run: "+v)
	}
	// An operator's hold comes before any limit, as in a real login.
	disabled, paused, _ := s.gates.check(role, database)
	switch {
	case disabled.Disabled:
		e.Outcome, e.Victims = "disabled", nil
		e.Verdict = fmt.Sprintf("rejected with 55000: logins %s %q are disabled by an operator (DISABLE, %s)",
			map[limiter.Scope]string{limiter.ScopeRole: "of role", limiter.ScopeDatabase: "to database"}[disabled.Scope],
			disabled.Name, disabled.DisabledBy)
	case paused.Paused:
		e.Outcome, e.Victims = "paused", nil
		e.Verdict = fmt.Sprintf("would wait until RESUME: %s %q is paused by an operator (%s); then %s",
			scopeWord(paused.Scope), paused.Name, paused.PausedBy, e.Verdict)
	}
	return e, nil
}

func explainLimit(scope, name string, r limiter.Rule, source string, policyOverridden bool) LimitExplained {
	l := LimitExplained{Scope: scope, Name: name, Limit: r.MaxSessions, Source: source, Policy: string(r.Policy),
		PolicySource: SourceConfig, Fallback: string(r.Fallback), DryRun: r.DryRun, EvictScope: string(r.EvictScope),
		MaxEvictions: r.Budget.String(), Protect: []string{}}
	if l.Policy == "" {
		l.Policy = string(limiter.PolicyReject)
	}
	if l.Fallback == "" {
		l.Fallback = string(limiter.PolicyReject)
	}
	if l.EvictScope == "" {
		l.EvictScope = string(limiter.EvictAny)
	}
	if policyOverridden {
		l.PolicySource = SourceOverride
	}
	if !r.Limited() {
		l.Limit = -1
	}
	for _, p := range r.Protect {
		l.Protect = append(l.Protect, p.String())
	}
	return l
}

// verdictOf says a decision in words a login's operator reads.
func verdictOf(d limiter.Decision) (outcome string, victims []uint32, verdict string) {
	switch d.Kind {
	case limiter.Admit:
		return "admitted", nil, "admitted: " + d.Reason
	case limiter.Evict:
		now := time.Now()
		parts := make([]string, len(d.Victims))
		for i, v := range d.Victims {
			victims = append(victims, v.PID)
			parts[i] = fmt.Sprintf("pid %d (%s)", v.PID, victimSummary(v, now))
		}
		return "evict", victims, fmt.Sprintf("would evict %s for %s: %s", strings.Join(parts, ", "), d.Policy, d.Reason)
	case limiter.Wait:
		return "wait", nil, "would wait for a slot: " + d.Reason
	}
	return "rejected", nil, "rejected with 53300: " + d.Reason
}
