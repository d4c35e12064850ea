package limiter

import (
	"cmp"
	"net/netip"
	"slices"
	"time"
)

// spending is one eviction booked against a limit's budget: when, and the
// login that evicted, to name the clients of a limit that thrashes.
type spending struct {
	at     time.Time
	client netip.Addr
	app    string
}

// thrash is a limit whose eviction budget was spent: since when (the
// first refusal of this episode), the last refusal, and who spent it.
type thrash struct {
	scope    Scope
	since    time.Time
	last     time.Time
	per      time.Duration
	evictors []string
}

// Thrash is a limit whose eviction budget (Rule.Budget) was spent within
// its window, as Snapshot reports it: the rule's fallback decides for its
// logins, and operators should look at the clients that keep evicting.
type Thrash struct {
	Scope Scope
	Name  string
	Since time.Time // the first login the budget turned away, this episode
	Last  time.Time // the last one
	// Evictors are the clients that spent the budget, as
	// application_name@address, most recent first.
	Evictors []string
}

// budgetKey names one budget's bookings: a limit's, and apart from them
// what its dry run would have evicted, so that going live after a dry run
// starts with the whole budget.
type budgetKey struct {
	queueKey
	dryRun bool
}

func (s *scopeView) budgetKey() budgetKey { return budgetKey{s.key, s.rule.DryRun} }

// spend books one eviction of login against s's budget. l.mu is held.
func (l *Limiter) spend(now time.Time, s *scopeView, login Login) {
	if !s.rule.Budget.Set() {
		return
	}
	if l.spent == nil {
		l.spent = make(map[budgetKey][]spending)
	}
	k := s.budgetKey()
	l.spent[k] = append(l.spent[k], spending{at: now, client: login.Client, app: login.ApplicationName})
}

// budgetLeft prunes s's bookings older than its window and returns those
// left and how many evictions the budget still allows. l.mu is held.
func (l *Limiter) budgetLeft(now time.Time, s *scopeView) ([]spending, int) {
	b := s.rule.Budget
	if !b.Set() {
		return nil, int(^uint(0) >> 1)
	}
	k := s.budgetKey()
	list := l.spent[k]
	i := 0
	for i < len(list) && now.Sub(list[i].at) >= b.Per {
		i++
	}
	switch {
	case i == len(list):
		delete(l.spent, k)
		list = nil
	case i > 0:
		list = slices.Clone(list[i:])
		l.spent[k] = list
	}
	return list, max(b.Evictions-len(list), 0)
}

// evictors names the clients of the bookings, most recent first, each once.
func evictors(spent []spending) []string {
	const most = 5
	var out []string
	for i := len(spent) - 1; i >= 0 && len(out) < most; i-- {
		name := spent[i].app
		if name == "" {
			name = "(no application_name)"
		}
		if spent[i].client.IsValid() {
			name += "@" + spent[i].client.String()
		} else {
			name += "@local"
		}
		if !slices.Contains(out, name) {
			out = append(out, name)
		}
	}
	return out
}

// thrashed records that s's budget turned a login away. l.mu is held.
func (l *Limiter) thrashed(now time.Time, s *scopeView, d Decision) {
	if l.thrashing == nil {
		l.thrashing = make(map[queueKey]*thrash)
	}
	t := l.thrashing[s.key]
	if t == nil || now.Sub(t.last) >= t.per {
		t = &thrash{scope: s.key.scope, since: now}
		l.thrashing[s.key] = t
	}
	t.last, t.per, t.evictors = now, s.rule.Budget.Per, d.Evictors
}

// thrashes lists the limits that thrash at now, forgetting the others.
// l.mu is held.
func (l *Limiter) thrashes(now time.Time) []Thrash {
	var out []Thrash
	for k, t := range l.thrashing {
		if now.Sub(t.last) >= t.per {
			delete(l.thrashing, k)
			continue
		}
		out = append(out, Thrash{Scope: k.scope, Name: k.name, Since: t.since, Last: t.last, Evictors: slices.Clone(t.evictors)})
	}
	slices.SortFunc(out, func(a, b Thrash) int {
		return cmp.Or(cmp.Compare(a.Scope, b.Scope), cmp.Compare(a.Name, b.Name))
	})
	return out
}

// inScope reports whether the login of s may evict h under the rule's
// evict_scope. A session whose application or address is unknown to the
// census is outside any scope narrower than "any".
func (s *scopeView) inScope(h Holder) bool {
	switch s.rule.EvictScope {
	case EvictSameApplication:
		return s.login != nil && h.ApplicationName == s.login.ApplicationName
	case EvictSameClient:
		o := h.origin()
		return s.login != nil && o.IsValid() && o == s.login.Client.Unmap()
	}
	return true
}
