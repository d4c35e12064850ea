package limiter

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Policy says what happens to a login that finds its role (or database) at its
// limit. The values are proxy.toml's spelling, so a Policy prints the way an
// operator wrote it.
type Policy string

// The policies. PolicyReject is what PostgreSQL itself does; the others are why
// rolegate exists.
const (
	// PolicyReject refuses the login with PostgreSQL's own 53300 error.
	PolicyReject Policy = "reject"
	// PolicyWait queues the login (FIFO) until a slot frees or the rule's
	// WaitTimeout passes, then rejects it.
	PolicyWait Policy = "wait"
	// PolicyNewestWins terminates the oldest session (by backend_start).
	PolicyNewestWins Policy = "newest-wins"
	// PolicyEvictIdle terminates the session idle the longest (state 'idle',
	// by state_change); a session in a transaction or running a query is never
	// chosen.
	PolicyEvictIdle Policy = "evict-idle"
)

// ParsePolicy reads a policy as proxy.toml spells it. It is strict (no case
// folding, no trimming) because a misspelt policy must fail the config load,
// not quietly become another policy.
func ParsePolicy(s string) (Policy, error) {
	switch p := Policy(s); p {
	case PolicyReject, PolicyWait, PolicyNewestWins, PolicyEvictIdle:
		return p, nil
	}
	return "", fmt.Errorf("unknown policy %q (want reject, wait, newest-wins or evict-idle)", s)
}

// Evicts reports whether the policy makes room by terminating sessions.
func (p Policy) Evicts() bool { return p == PolicyNewestWins || p == PolicyEvictIdle }

// String returns the policy as proxy.toml spells it.
func (p Policy) String() string { return string(p) }

// Rule is the limit and policy for one role or one database, as the caller
// resolved it from proxy.toml, [limits] defaults and the server's own limit.
//
// The zero Rule is a limit of 0 (nobody but superusers may log in), because 0
// is a meaningful PostgreSQL connection limit; use NoLimit for "no limit".
type Rule struct {
	// MaxSessions is the effective limit (see Effective); < 0 means no limit.
	MaxSessions int
	// Policy applies when the limit is reached. An empty or unknown policy is
	// treated as PolicyReject, the server's own behaviour, so a bad rule can
	// never evict anyone.
	Policy Policy
	// Fallback is what an evicting policy does when no session may be evicted
	// (none idle, all too young, all protected): PolicyReject (the default,
	// also for empty or anything else) or PolicyWait.
	Fallback Policy
	// MinSessionAge protects sessions younger than this (by backend_start)
	// from eviction, so two clients fighting over one slot cannot evict each
	// other in a loop.
	MinSessionAge time.Duration
	// WaitTimeout bounds a wait (PolicyWait or a Fallback of PolicyWait),
	// counted from the moment the login starts waiting. <= 0 means the login
	// does not wait at all and is rejected at once: a wait without end would
	// hold a client (and a file descriptor) forever.
	WaitTimeout time.Duration
	// Protect lists the sessions an evicting policy never chooses: they
	// count against the limit, and when only they remain the fallback
	// decides (see Protect).
	Protect []Protect
	// DryRun makes the rule decide as it would and carry nothing out: an
	// Evict, Wait or Reject it reaches is reported in Decision.Would and
	// the counters' DryRun fields, and the login is admitted (the server's
	// own limit still applies to it). Operators turn it on to see what a
	// policy would do before it does it.
	DryRun bool
	// EvictScope narrows the sessions an evicting policy may choose to
	// those of the login's own application or client (see EvictScope).
	EvictScope EvictScope
	// Budget bounds the evictions of this limit over time; past it the
	// fallback decides and the limit is reported as thrashing (see
	// Budget). The zero Budget sets no bound.
	Budget Budget
}

// EvictScope says which sessions a login may evict. The values are
// proxy.toml's spelling.
type EvictScope string

// The scopes of eviction.
const (
	// EvictAny: any session of the limit (the default).
	EvictAny EvictScope = "any"
	// EvictSameApplication: only sessions with the login's application_name,
	// so a storm of one application never evicts another's sessions.
	EvictSameApplication EvictScope = "same-application"
	// EvictSameClient: only sessions from the login's client address, so a
	// leaked pool on one host evicts its own stale sessions and never a
	// colleague's psql.
	EvictSameClient EvictScope = "same-client"
)

// ParseEvictScope reads an evict_scope as proxy.toml spells it; "" is
// EvictAny.
func ParseEvictScope(s string) (EvictScope, error) {
	switch e := EvictScope(s); e {
	case "", EvictAny:
		return EvictAny, nil
	case EvictSameApplication, EvictSameClient:
		return e, nil
	}
	return "", fmt.Errorf("unknown evict_scope %q (want any, same-application or same-client)", s)
}

// Budget is an eviction budget: at most Evictions victims per Per, over a
// sliding window. A pool larger than its role's limit under newest-wins
// would otherwise evict its own connections in a loop.
type Budget struct {
	Evictions int
	Per       time.Duration
}

// Set reports whether the budget bounds anything.
func (b Budget) Set() bool { return b.Per > 0 }

// String is the budget as ParseBudget reads it: "30/min", or "off".
func (b Budget) String() string {
	if !b.Set() {
		return "off"
	}
	for _, u := range budgetUnits {
		if b.Per == u.d {
			return fmt.Sprintf("%d/%s", b.Evictions, u.name)
		}
	}
	return fmt.Sprintf("%d/%s", b.Evictions, b.Per)
}

var budgetUnits = []struct {
	name string
	d    time.Duration
}{{"s", time.Second}, {"sec", time.Second}, {"min", time.Minute}, {"hour", time.Hour}, {"h", time.Hour}}

// ParseBudget reads a max_evictions value: "30/min", "5/s", "100/hour",
// "10/30s" (any Go duration after the slash), or "off" for no bound.
func ParseBudget(s string) (Budget, error) {
	if s == "off" {
		return Budget{}, nil
	}
	n, per, ok := strings.Cut(s, "/")
	bad := fmt.Errorf("invalid max_evictions %q (write it like \"30/min\", \"5/s\", \"100/hour\" or \"off\")", s)
	if !ok {
		return Budget{}, bad
	}
	count, err := strconv.Atoi(n)
	if err != nil || count < 0 {
		return Budget{}, bad
	}
	b := Budget{Evictions: count}
	for _, u := range budgetUnits {
		if per == u.name {
			b.Per = u.d
		}
	}
	if b.Per == 0 {
		d, err := time.ParseDuration(per)
		if err != nil || d <= 0 {
			return Budget{}, bad
		}
		b.Per = d
	}
	return b, nil
}

// NoLimit returns a Rule that never limits anyone. It is a function, not a
// package variable, so no caller can change it for the others.
func NoLimit() Rule { return Rule{MaxSessions: -1, Policy: PolicyReject, Fallback: PolicyReject} }

// Limited reports whether the rule has a limit at all.
func (r Rule) Limited() bool { return r.MaxSessions >= 0 }

// Validate reports the first thing wrong with a rule, for config loading. The
// limiter itself never fails on a bad rule; it treats one as strictly as it
// can (see Policy and Fallback).
func (r Rule) Validate() error {
	if _, err := ParsePolicy(string(r.Policy)); err != nil {
		return fmt.Errorf("policy: %w", err)
	}
	if r.Fallback != "" && r.Fallback != PolicyReject && r.Fallback != PolicyWait {
		return fmt.Errorf("fallback: %q is not reject or wait", string(r.Fallback))
	}
	if r.MinSessionAge < 0 {
		return fmt.Errorf("min_session_age: %s is negative", r.MinSessionAge)
	}
	if r.WaitTimeout < 0 {
		return fmt.Errorf("wait_timeout: %s is negative", r.WaitTimeout)
	}
	if _, err := ParseEvictScope(string(r.EvictScope)); err != nil {
		return fmt.Errorf("evict_scope: %w", err)
	}
	if r.Budget.Evictions < 0 || r.Budget.Per < 0 {
		return fmt.Errorf("max_evictions: %s is negative", r.Budget)
	}
	return nil
}

// policy is the policy Decide applies: unknown or empty means reject.
func (r Rule) policy() Policy {
	switch r.Policy {
	case PolicyWait, PolicyNewestWins, PolicyEvictIdle:
		return r.Policy
	}
	return PolicyReject
}

// fallback is the policy Decide applies when an evicting policy finds no
// victim: wait only when asked for explicitly.
func (r Rule) fallback() Policy {
	if r.Fallback == PolicyWait {
		return PolicyWait
	}
	return PolicyReject
}

// Effective combines proxy.toml's limit with the server's (rolconnlimit or
// datconnlimit): the smaller wins, and a negative value on either side means
// that side sets no limit. The caller passes -1 for the server side when
// server_limits is off.
func Effective(config, server int) int {
	switch {
	case config < 0:
		return max(server, -1)
	case server < 0:
		return config
	}
	return min(config, server)
}
