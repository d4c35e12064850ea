package proxy

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/rolegate/rolegate/internal/pgname"
	"github.com/rolegate/rolegate/limiter"
)

// What a rejected or evicted client is told beyond PostgreSQL's first line:
// the 53300's DETAIL (the limit, where it comes from, who holds its slots)
// and HINT (how to free one), and the 57P01 message of an evicted session
// (who evicted it, under which policy). Application names and client
// addresses are no secrets (any role may read them in pg_stat_activity);
// nothing here names the control role, a connection string or a password.

// Bounds on the holders a DETAIL lists: the groups by application_name,
// and the addresses inside each; the rest are counted.
const (
	detailApps  = 5
	detailAddrs = 3
)

// quoteAppName is an application_name as a message shows it: cut to the 63
// bytes the server keeps, in double quotes, with quotes, backslashes,
// control characters and invalid UTF-8 escaped (Go's strconv.Quote), so a
// client's name cannot end the quote, break a line of the message or a log,
// or make the text invalid UTF-8 (a peer instance refuses such a notice).
func quoteAppName(name string) string {
	return strconv.Quote(pgname.Identifier(name))
}

// appNameWords is "application_name "x"", or "no application_name".
func appNameWords(name string) string {
	if name == "" {
		return "no application_name"
	}
	return "application_name " + quoteAppName(name)
}

// sessionsWord is "1 session" or "n sessions".
func sessionsWord(n int) string {
	if n == 1 {
		return "1 session"
	}
	return fmt.Sprintf("%d sessions", n)
}

// limitSentence says how many sessions the limit that decided allows and
// where that number comes from (Limits.Effective's sources).
func limitSentence(scope limiter.Scope, name string, limit int, source string) string {
	what := fmt.Sprintf(`The limit of %s for role "%s"`, sessionsWord(limit), name)
	server := "the role's CONNECTION LIMIT on the server (rolconnlimit)"
	if scope == limiter.ScopeDatabase {
		what = fmt.Sprintf(`The limit of %s for database "%s"`, sessionsWord(limit), name)
		server = "the database's CONNECTION LIMIT on the server (datconnlimit)"
	}
	switch source {
	case SourceConfig:
		return what + " comes from proxy.toml."
	case SourceServer:
		return what + " comes from " + server + "."
	case SourceOverride:
		return what + " comes from an operator's override (SET LIMIT in the admin console)."
	}
	return what + "."
}

// appGroup is the sessions of one application_name that hold a limit's
// slots, counted by client address.
type appGroup struct {
	name  string
	n     int
	addrs []addrCount
}

type addrCount struct {
	addr string
	n    int
}

// holdersSentence says who holds the limit's slots: count sessions holding
// them (the decision's count, which includes logins in flight and victims
// still leaving), grouped by application_name and client address, at most
// detailApps groups of at most detailAddrs addresses. "" when the login
// has no census to tell of.
func holdersSentence(count int, rows []limiter.Holder, addr func(limiter.Holder) string) string {
	if count == 0 && len(rows) == 0 {
		return ""
	}
	byApp := map[string]*appGroup{}
	inFlight := 0
	for _, h := range rows {
		if h.Reserved && h.PID == 0 {
			inFlight++ // another instance's login, not a session yet
			continue
		}
		g := byApp[h.ApplicationName]
		if g == nil {
			g = &appGroup{name: h.ApplicationName}
			byApp[h.ApplicationName] = g
		}
		g.n++
		a := addr(h)
		if i := slices.IndexFunc(g.addrs, func(c addrCount) bool { return c.addr == a }); i >= 0 {
			g.addrs[i].n++
		} else {
			g.addrs = append(g.addrs, addrCount{addr: a, n: 1})
		}
	}
	groups := make([]*appGroup, 0, len(byApp))
	for _, g := range byApp {
		slices.SortFunc(g.addrs, func(x, y addrCount) int { return cmp.Or(cmp.Compare(y.n, x.n), cmp.Compare(x.addr, y.addr)) })
		groups = append(groups, g)
	}
	slices.SortFunc(groups, func(x, y *appGroup) int { return cmp.Or(cmp.Compare(y.n, x.n), cmp.Compare(x.name, y.name)) })
	// The count may exceed the rows (logins in flight, victims that have
	// left the census but not the server yet), never the other way but
	// for a census read after the decision's.
	listed := len(rows) - inFlight
	inFlight += max(count-len(rows), 0)
	parts := make([]string, 0, detailApps+2)
	for _, g := range groups[:min(len(groups), detailApps)] {
		parts = append(parts, fmt.Sprintf("%d with %s %s", g.n, appNameWords(g.name), addrWords(g.n, g.addrs)))
	}
	if rest := groups[min(len(groups), detailApps):]; len(rest) > 0 {
		n := 0
		for _, g := range rest {
			n += g.n
		}
		parts = append(parts, fmt.Sprintf("%d more with %d other application_names", n, len(rest)))
	}
	if inFlight > 0 {
		parts = append(parts, fmt.Sprintf("%d logging in or leaving", inFlight))
	}
	verb := "hold"
	if listed+inFlight == 1 {
		verb = "holds"
	}
	return fmt.Sprintf("%s %s it: %s.", sessionsWord(listed+inFlight), verb, joinWords(parts))
}

// addrWords is where a group's n sessions come from: "from 10.0.0.5" when
// from one address, else "(2 from 10.0.0.5, 1 from 10.0.0.6, and 3 more)".
func addrWords(n int, addrs []addrCount) string {
	if len(addrs) == 1 {
		return "from " + addrs[0].addr
	}
	parts := make([]string, 0, detailAddrs+1)
	shown := 0
	for _, a := range addrs[:min(len(addrs), detailAddrs)] {
		parts = append(parts, fmt.Sprintf("%d from %s", a.n, a.addr))
		shown += a.n
	}
	switch rest := len(addrs) - detailAddrs; {
	case rest == 1:
		parts = append(parts, fmt.Sprintf("%d from one other address", n-shown))
	case rest > 1:
		parts = append(parts, fmt.Sprintf("%d from %d other addresses", n-shown, rest))
	}
	return "(" + strings.Join(parts, ", ") + ")"
}

// joinWords joins "a", "a and b", "a, b and c".
func joinWords(parts []string) string {
	if len(parts) <= 1 {
		return strings.Join(parts, "")
	}
	return strings.Join(parts[:len(parts)-1], ", ") + " and " + parts[len(parts)-1]
}

// hostOf is the address of a client address string ("10.0.0.5:5432" →
// "10.0.0.5"), "local" for none; one that is no ip:port is shown as it is.
func hostOf(clientAddr string) string {
	if clientAddr == "" {
		return "local"
	}
	if ap, err := netip.ParseAddrPort(clientAddr); err == nil {
		return ap.Addr().Unmap().String()
	}
	return clientAddr
}

// holderAddr is the client address of a census row as the DETAIL shows it:
// its origin (for a session rolegate relays, its client's; markOwn sets
// it), else the server's client_addr; "local" for a Unix socket (or an
// address the control role may not see).
func holderAddr(h limiter.Holder) string {
	if h.Origin.IsValid() {
		return h.Origin.Unmap().String()
	}
	if !h.Client.IsValid() {
		return "local"
	}
	return h.Client.Addr().Unmap().String()
}

// rejectDetail is the DETAIL of a 53300: the limit and its source, who
// holds its slots, and why an evicting policy or a wait did not help.
func (a *admission) rejectDetail(d limiter.Decision) string {
	name, source := a.sess.user, a.roleSource
	if d.Scope == limiter.ScopeDatabase {
		name, source = a.sess.database, a.dbSource
	}
	parts := []string{limitSentence(d.Scope, name, d.Limit, source)}
	var rows []limiter.Holder
	for _, h := range a.seen {
		if countsAgainst(d.Scope, name, h) {
			rows = append(rows, h)
		}
	}
	if s := holdersSentence(d.Count, rows, holderAddr); s != "" {
		parts = append(parts, s)
	}
	if f := a.failureDetail(); f != "" {
		parts = append(parts, f+".")
	} else if d.Thrashing {
		parts = append(parts, fmt.Sprintf("Policy %s has used up its eviction budget (max_evictions %s): "+
			"the sessions of this limit are evicting each other, so its fallback decided.", d.Policy, a.budget(d.Scope)))
	} else if d.Policy.Evicts() {
		parts = append(parts, fmt.Sprintf("Policy %s evicted no session for this login.", d.Policy))
	}
	switch wait := a.role.WaitTimeout; {
	case a.waited > 0:
		parts = append(parts, fmt.Sprintf("The login's admission time (startup_timeout and wait_timeout) ran out after %s.",
			a.waited.Round(time.Millisecond)))
	case a.inLine:
		if d.Scope == limiter.ScopeDatabase {
			wait = a.db.WaitTimeout
		}
		parts = append(parts, fmt.Sprintf("The login waited for a slot until its wait_timeout (%s) ran out.", wait))
	}
	return strings.Join(parts, " ")
}

// budget is the eviction budget of the limit of scope, as proxy.toml spells it.
func (a *admission) budget(scope limiter.Scope) string {
	if scope == limiter.ScopeDatabase {
		return a.db.Budget.String()
	}
	return a.role.Budget.String()
}

// countsAgainst reports whether census row h holds a slot of the limit of
// scope for name, as the limiter counts it: a role's limit counts its
// sessions but superusers', a database's every session in it; replication
// connections count against neither.
func countsAgainst(scope limiter.Scope, name string, h limiter.Holder) bool {
	switch {
	case h.Replication:
		return false
	case scope == limiter.ScopeDatabase:
		return h.Database == name
	}
	return h.Role == name && !h.Superuser
}

// rejectHint is the HINT of a 53300: how to get a slot.
func rejectHint(d limiter.Decision) string {
	const free = "end a session you no longer need, or ask an operator to free a slot (SHOW SESSIONS in rolegate's admin console lists them)."
	if d.Policy == limiter.PolicyWait || d.Fallback {
		return "Try again later, " + free
	}
	return strings.ToUpper(free[:1]) + free[1:]
}

// evictMessage is the 57P01 message an evicted session's client gets: it
// names the newer login it made room for (its role, application_name and
// client address) and the policy. It starts "terminating connection: ", as
// the server's does, which the peers' notice check requires; its length is
// bounded (names of at most 63 bytes, escaped), far within a notice's.
func evictMessage(scope limiter.Scope, policy limiter.Policy, role, database, appName, clientAddr string) string {
	client := clientAddr
	if client == "" {
		client = "local"
	}
	who := appNameWords(appName) + ", client " + client + ", policy " + policy.String()
	if scope == limiter.ScopeDatabase {
		return `terminating connection: rolegate evicted this session for a newer login to database "` + database +
			`" (role "` + role + `", ` + who + ")"
	}
	return `terminating connection: rolegate evicted this session for a newer login of role "` + role + `" (` + who + ")"
}
