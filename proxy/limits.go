package proxy

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rolegate/rolegate/internal/pgname"
	"github.com/rolegate/rolegate/limiter"
)

// Rules gives the limits proxy.toml sets for a role and a database
// (config.Config implements it); a reload swaps in a new one.
type Rules interface {
	RoleRule(role string) limiter.Rule
	DatabaseRule(database string) limiter.Rule
}

// Limits turns on connection limits. In proxy authentication mode they apply
// once rolegate has verified the client, before any server connection; in
// passthrough mode once the server has authenticated it (the client must have
// proved who it is before rolegate counts, waits or evicts for it).
type Limits struct {
	Limiter *limiter.Limiter
	Server  ServerView

	rules atomic.Pointer[rulesBox]

	mu        sync.Mutex
	overrides map[string]Override // by role; cleared by SetRules (a reload)
}

// Override is an operator's runtime change to one role's rule (the console's
// SET LIMIT and SET POLICY); it lasts until the next reload.
type Override struct {
	MaxSessions *int
	Policy      *limiter.Policy
	// DryRun, when set, turns the role rule's dry run on or off (SET
	// POLICY ... DRY RUN, or a plain SET POLICY, which goes live).
	DryRun *bool
}

// Override sets or changes role's override; nil leaves a field as it is. A
// role name over 63 bytes names the role CREATE ROLE stored for it, as in
// proxy.toml.
func (l *Limits) Override(role string, maxSessions *int, policy *limiter.Policy) {
	l.edit(role, func(o *Override) {
		if maxSessions != nil {
			n := *maxSessions
			o.MaxSessions = &n
		}
		if policy != nil {
			p := *policy
			o.Policy = &p
		}
	})
}

// OverrideDryRun turns dry run on or off for role's rule until the next
// reload; like Override, it keeps what else is overridden.
func (l *Limits) OverrideDryRun(role string, on bool) {
	l.edit(role, func(o *Override) { o.DryRun = &on })
}

// edit changes role's override in place.
func (l *Limits) edit(role string, change func(*Override)) {
	role = pgname.Identifier(role)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.overrides == nil {
		l.overrides = make(map[string]Override)
	}
	o := l.overrides[role]
	change(&o)
	l.overrides[role] = o
}

// Overrides returns a copy of the overrides in force.
func (l *Limits) Overrides() map[string]Override {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make(map[string]Override, len(l.overrides))
	for role, o := range l.overrides {
		out[role] = o
	}
	return out
}

func (l *Limits) override(role string) (Override, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	o, ok := l.overrides[role]
	return o, ok
}

// rulesBox is one configuration of the limits, swapped whole on reload.
type rulesBox struct {
	Rules
	serverLimits bool          // honour rolconnlimit and datconnlimit too; the smaller wins
	ttl          time.Duration // how long the server's limits are cached
}

// SetRules installs what new logins use: the rules from proxy.toml, whether
// the server's own limits count too, and how long those are cached. Sessions
// already in are not touched.
func (l *Limits) SetRules(r Rules, serverLimits bool, ttl time.Duration) {
	l.mu.Lock()
	l.overrides = nil // a reload ends the operators' runtime changes
	l.mu.Unlock()
	l.rules.Store(&rulesBox{Rules: r, serverLimits: serverLimits, ttl: ttl})
}

// Limit sources, as Effective reports them.
const (
	SourceNone     = "none"
	SourceConfig   = "proxy.toml"
	SourceServer   = "server"
	SourceOverride = "override"
)

// Effective returns the rules admission applies to a login of role to
// database now: proxy.toml's, a runtime override's, and the server's own
// limits (rolconnlimit, datconnlimit) when server_limits is on, the smaller
// limit winning. Each source says where the limit comes from: "proxy.toml",
// "override", "server" or "none" (no limit). Without limits configured at all
// both rules are limiter.NoLimit().
func (l *Limits) Effective(ctx context.Context, role, database string) (roleRule, dbRule limiter.Rule, roleSource, dbSource string, err error) {
	roleRule, dbRule, roleSource, dbSource, _, err = l.effective(ctx, role, database)
	return roleRule, dbRule, roleSource, dbSource, err
}

// effective is Effective and whether role is a superuser (known only when
// some limit made it ask the server).
func (l *Limits) effective(ctx context.Context, role, database string) (roleRule, dbRule limiter.Rule, roleSource, dbSource string, super bool, err error) {
	box := l.rules.Load()
	if box == nil {
		return limiter.NoLimit(), limiter.NoLimit(), SourceNone, SourceNone, false, nil
	}
	roleRule, dbRule = box.RoleRule(role), box.DatabaseRule(database)
	roleSource, dbSource = sourceOf(roleRule, SourceConfig), sourceOf(dbRule, SourceConfig)
	if o, ok := l.override(role); ok {
		if o.MaxSessions != nil {
			roleRule.MaxSessions = *o.MaxSessions
			roleSource = sourceOf(roleRule, SourceOverride)
		}
		if o.Policy != nil {
			roleRule.Policy = *o.Policy
		}
		if o.DryRun != nil {
			roleRule.DryRun = *o.DryRun
		}
	}
	if !box.serverLimits && !roleRule.Limited() && !dbRule.Limited() {
		return roleRule, dbRule, roleSource, dbSource, false, nil
	}
	cctx, cancel := context.WithTimeout(ctx, controlTimeout)
	defer cancel()
	roleLimit, super, dbLimit, err := l.Server.ServerLimits(cctx, role, database, box.ttl)
	if err != nil {
		return roleRule, dbRule, roleSource, dbSource, false, fmt.Errorf("read limits of role %q: %w", role, err)
	}
	if box.serverLimits {
		if e := limiter.Effective(roleRule.MaxSessions, roleLimit); e != roleRule.MaxSessions {
			roleRule.MaxSessions, roleSource = e, SourceServer
		}
		if e := limiter.Effective(dbRule.MaxSessions, dbLimit); e != dbRule.MaxSessions {
			dbRule.MaxSessions, dbSource = e, SourceServer
		}
	}
	return roleRule, dbRule, roleSource, dbSource, super, nil
}

// sourceOf is source for a rule with a limit, "none" for one without.
func sourceOf(r limiter.Rule, source string) string {
	if r.Limited() {
		return source
	}
	return SourceNone
}
