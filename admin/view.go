package admin

import (
	"context"
	"slices"
	"strings"
	"time"

	"github.com/rolegate/rolegate/limiter"
	"github.com/rolegate/rolegate/proxy"
)

// viewTimeout bounds the control-connection queries one view makes, all of
// them together: a console command or an API request, whatever the number of
// roles it resolves limits for.
const viewTimeout = 5 * time.Second

// viewContext is the context of one view.
func viewContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, viewTimeout)
}

// knownRoles are the roles rolegate knows: those with a rule in proxy.toml,
// a runtime override, a session through rolegate, or a limiter counter.
func (o *Options) knownRoles(infos []proxy.SessionInfo) []string {
	set := map[string]bool{}
	if o.ConfiguredRoles != nil {
		for _, r := range o.ConfiguredRoles() {
			set[r] = true
		}
	}
	if o.Overrides != nil {
		for r := range o.Overrides() {
			set[r] = true
		}
	}
	for _, i := range infos {
		if i.User != "" {
			set[i.User] = true
		}
	}
	for r := range o.holds(limiter.ScopeRole) { // paused or disabled
		set[r] = true
	}
	if o.Limiter != nil {
		snap := o.Limiter()
		for r := range snap.WaitingByRole {
			set[r] = true
		}
		for k := range snap.Counters {
			set[k.Role] = true
		}
	}
	delete(set, "")
	out := make([]string, 0, len(set))
	for r := range set {
		out = append(out, r)
	}
	slices.Sort(out)
	return out
}

// instances lists the rolegate instances (Options.Instances), or none.
func (o *Options) instances(ctx context.Context) ([]instance, error) {
	if o.Instances == nil {
		return []instance{}, nil
	}
	list, err := o.Instances(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]instance, 0, len(list))
	for _, in := range list {
		out = append(out, instance{Tag: in.Tag, Name: in.Name, Address: in.Advertise, Self: in.Self, Version: in.Version,
			Started: in.Started, Registered: in.Since, Sessions: in.Sessions, Error: in.Err})
	}
	return out, nil
}

// relayedBy maps the server pids the rolegate instances relay to the
// instance's tag, and gives this instance's own tag ("" without a cluster).
func (o *Options) relayedBy(ctx context.Context) (byPID map[uint32]string, self string) {
	if o.Instances == nil {
		return nil, ""
	}
	list, err := o.Instances(ctx)
	if err != nil {
		o.Logger.Warn("admin: cannot list the rolegate instances", "err", err)
		return nil, ""
	}
	byPID = map[uint32]string{}
	for _, in := range list {
		if in.Self {
			self = in.Tag
		}
		for _, pid := range in.PIDs {
			byPID[pid] = in.Tag
		}
	}
	return byPID, self
}

// allSessions is rolegate's sessions and, with ServerSessions, every other
// client backend of the known roles (ViaRolegate false), merged by pid:
// rolegate's own rows win. Sorted by start. With Instances, each names the
// instance that relays it.
func (o *Options) allSessions(ctx context.Context, infos []proxy.SessionInfo) []session {
	out := make([]session, 0, len(infos))
	own := map[uint32]bool{}
	byPID, self := o.relayedBy(ctx)
	for _, s := range infos {
		out = append(out, session{
			ID: s.ID, PID: s.BackendPID, Role: s.User, Database: s.Database, ApplicationName: s.ApplicationName,
			ClientAddr: s.ClientAddr, ClientTLS: s.ClientTLS, ServerTLS: s.ServerTLS, Replication: s.Replication,
			State: s.State.String(), Wait: s.Wait, Started: s.Start, LastActivity: s.LastActivity,
			BytesIn: s.BytesIn, BytesOut: s.BytesOut, ViaRolegate: true, Instance: self,
			inFlight: s.State.LoggingIn(), unverified: !s.Verified,
		})
		if s.BackendPID != 0 {
			own[s.BackendPID] = true
		}
	}
	if o.ServerSessions != nil {
		backends, err := o.ServerSessions(ctx, o.knownRoles(infos))
		if err != nil {
			o.Logger.Warn("admin: cannot list the server's sessions", "err", err)
		}
		for _, b := range backends {
			if own[b.PID] {
				continue
			}
			out = append(out, session{
				PID: b.PID, Role: b.Role, Database: b.Database, ApplicationName: b.ApplicationName,
				ClientAddr: b.ClientAddr, State: b.State, Started: b.BackendStart, LastActivity: b.StateChange,
				Instance: byPID[b.PID],
			})
		}
	}
	slices.SortStableFunc(out, func(a, b session) int { return a.Started.Compare(b.Started) })
	return out
}

// maxUnverifiedListed is how many connections that have not proved who they
// are (startup, authentication) SHOW SESSIONS and the live page list, the
// oldest first: thousands of half-open connections must not bury the
// sessions an operator is looking for. The rest are counted, not listed.
const maxUnverifiedListed = 50

// listed is sessions (sorted by start) with the unverified logins after the
// first maxUnverifiedListed left out, and how many were left out.
func listed(sessions []session) ([]session, int) {
	out := make([]session, 0, len(sessions))
	seen, unlisted := 0, 0
	for _, s := range sessions {
		if s.unverified {
			if seen++; seen > maxUnverifiedListed {
				unlisted++
				continue
			}
		}
		out = append(out, s)
	}
	return out, unlisted
}

// limitInfo is a role's or database's effective limit, where it comes from,
// and its policy.
type limitInfo struct {
	Limit  *int   // nil: no limit
	Source string // "proxy.toml", "server", "override" or "none"; "" when unknown
	Policy string
}

// roleLimit is role's effective limit (Effective), or a zero limitInfo
// without one or on an error (logged).
func (o *Options) roleLimit(ctx context.Context, role string) limitInfo {
	if o.Effective == nil && o.Overrides != nil { // the overrides are all there is to show
		var li limitInfo
		if ov, ok := o.Overrides()[role]; ok {
			if ov.MaxSessions != nil {
				n := *ov.MaxSessions
				li.Limit, li.Source = &n, "override"
			}
			if ov.Policy != nil {
				li.Policy = ov.Policy.String()
			}
		}
		return li
	}
	r, _, src, _, ok := o.effective(ctx, role, "")
	if !ok {
		return limitInfo{}
	}
	return info(r, src)
}

// databaseLimit is database's effective limit.
func (o *Options) databaseLimit(ctx context.Context, database string) limitInfo {
	_, d, _, src, ok := o.effective(ctx, "", database)
	if !ok {
		return limitInfo{}
	}
	return info(d, src)
}

func (o *Options) effective(ctx context.Context, role, database string) (limiter.Rule, limiter.Rule, string, string, bool) {
	if o.Effective == nil {
		return limiter.Rule{}, limiter.Rule{}, "", "", false
	}
	r, d, rs, ds, err := o.Effective(ctx, role, database)
	if err != nil {
		o.Logger.Warn("admin: cannot resolve limits", "role", role, "database", database, "err", err)
		return limiter.Rule{}, limiter.Rule{}, "", "", false
	}
	return r, d, rs, ds, true
}

func info(r limiter.Rule, src string) limitInfo {
	li := limitInfo{Source: src, Policy: r.Policy.String()}
	if r.Limited() {
		n := r.MaxSessions
		li.Limit = &n
	}
	return li
}

// roleViews is every known role: its sessions through rolegate and elsewhere
// (from sessions, allSessions' answer), this instance's logins in state
// waiting, effective limit and policy, and the limiter's counters by policy.
// Sorted by name.
func (o *Options) roleViews(ctx context.Context, infos []proxy.SessionInfo, sessions []session) []role {
	byName := map[string]*role{}
	get := func(name string) *role {
		r := byName[name]
		if r == nil {
			r = &role{Role: name, Policies: []counter{}}
			byName[name] = r
		}
		return r
	}
	for _, name := range o.knownRoles(infos) {
		get(name)
	}
	for _, s := range sessions {
		switch {
		case s.Role == "": // an unverified login: no role to count it under
		case !s.ViaRolegate:
			get(s.Role).SessionsElsewhere++
		case !s.inFlight:
			get(s.Role).Sessions++
		case s.State == proxy.StateWaiting.String():
			get(s.Role).Waiting++ // this instance's logins in admission
		}
	}
	if o.Limiter != nil {
		snap := o.Limiter()
		for _, k := range counterKeys(snap) {
			c := snap.Counters[k]
			r := get(k.Role)
			r.Policies = append(r.Policies, counterOf(k.Policy, c))
		}
		for _, t := range snap.Thrashing {
			if t.Scope == limiter.ScopeRole {
				r := get(t.Name)
				r.Thrashing, r.Evictors = true, t.Evictors
			}
		}
	}
	holds := o.holds(limiter.ScopeRole)
	out := make([]role, 0, len(byName))
	for _, r := range byName {
		li := o.roleLimit(ctx, r.Role)
		r.Limit, r.LimitSource, r.Policy = li.Limit, li.Source, li.Policy
		r.Paused, r.Disabled = holds[r.Role].Paused, holds[r.Role].Disabled
		out = append(out, *r)
	}
	slices.SortFunc(out, func(a, b role) int { return strings.Compare(a.Role, b.Role) })
	return out
}
