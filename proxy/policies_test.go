package proxy

import (
	"context"
	"errors"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rolegate/rolegate/limiter"
)

// A dry-run newest-wins rule evicts nobody: it logs and counts the
// eviction it would have done, records it as a dry-run event, and lets the
// login go to the server, whose own limit still answers with its 53300.
// SET POLICY ... DRY RUN and a plain SET POLICY switch it at run time.
func TestLimitDryRun(t *testing.T) {
	t.Parallel()
	const role = "lim_dry"
	pw := newRole(t, role, 3) // the server's own limit: 3
	p := limitedProxy(t, map[string]limiter.Rule{role: {MaxSessions: 1, Policy: limiter.PolicyNewestWins,
		Fallback: limiter.PolicyReject, DryRun: true}})
	old := connect(t, p.DSN(role, pw, "app", "application_name=old_psql"))
	oldPID := backendPID(t, old)
	newer := connect(t, p.DSN(role, pw, "app"))
	wantAlive(t, old, "the session a dry run would have evicted")
	wantAlive(t, newer, "the newer login")

	var ev Event
	waitUntil(t, 30*time.Second, "the dry-run eviction event", func() bool {
		for _, e := range p.Events() {
			if e.DryRun && e.Kind == "eviction" {
				ev = e
				return true
			}
		}
		return false
	})
	if ev.VictimPID != oldPID || ev.Role != role || ev.Policy != "newest-wins" || ev.VictimApplicationName != "old_psql" {
		t.Errorf("dry-run event %+v; want victim pid %d (old_psql) under newest-wins", ev, oldPID)
	}
	for _, e := range p.Events() {
		if !e.DryRun {
			t.Errorf("a dry run recorded a real %s: %+v", e.Kind, e)
		}
	}
	wantLog := "dry run: would evict pid " + strconv.FormatUint(uint64(oldPID), 10) + " ("
	if !strings.Contains(p.logs.String(), wantLog) || !strings.Contains(p.logs.String(), "application old_psql) for a newer login") {
		t.Errorf("no would-evict line naming pid %d and its application:\n%s", oldPID, p.logs.String())
	}
	lim := p.cfg.Limits
	if c := lim.Limiter.Snapshot().Counters[limiter.CounterKey{Role: role, Policy: limiter.PolicyNewestWins}]; c.DryRunEvictions < 1 || c.Evictions != 0 {
		t.Errorf("counters %+v; want dry-run evictions and no real one", c)
	}

	// The server's own limit (3) still refuses: its 53300 reaches the client.
	third := connect(t, p.DSN(role, pw, "app"))
	_, err := tryConnect(p.DSN(role, pw, "app"), 30*time.Second, nil)
	wantTooMany(t, err, "role", role)
	wantAlive(t, old, "the oldest session")
	third.Close(context.Background())
	newer.Close(context.Background())
	waitUntil(t, 30*time.Second, "one session of the role left", func() bool { return sessionsOf(t, role) == 1 })

	// Live at run time: the next login evicts.
	newest := limiter.PolicyNewestWins
	lim.Override(role, nil, &newest)
	lim.OverrideDryRun(role, false)
	live := connect(t, p.DSN(role, pw, "app"))
	wantEvicted(t, old, "role", role, limiter.PolicyNewestWins)
	// And back to a dry run: nobody is evicted.
	lim.OverrideDryRun(role, true)
	again := connect(t, p.DSN(role, pw, "app"))
	wantAlive(t, live, "the session under a dry run again")
	again.Close(context.Background())
}

// evict_scope same-application: a login evicts only sessions with its own
// application_name, never another application's older session; with none
// of its own, the fallback rejects.
func TestLimitEvictScopeApplication(t *testing.T) {
	t.Parallel()
	const role = "lim_scope_app"
	pw := newRole(t, role, -1)
	p := limitedProxy(t, map[string]limiter.Rule{role: {MaxSessions: 2, Policy: limiter.PolicyNewestWins,
		Fallback: limiter.PolicyReject, EvictScope: limiter.EvictSameApplication}})
	billing := connect(t, p.DSN(role, pw, "app", "application_name=billing"))
	mine := connect(t, p.DSN(role, pw, "app", "application_name=pool"))
	newer := connect(t, p.DSN(role, pw, "app", "application_name=pool"))
	wantEvicted(t, mine, "role", role, limiter.PolicyNewestWins)
	wantAlive(t, billing, "the other application's older session")
	_, err := tryConnect(p.DSN(role, pw, "app", "application_name=reports"), 30*time.Second, nil)
	wantTooMany(t, err, "role", role)
	wantAlive(t, billing, "the other application's older session")
	wantAlive(t, newer, "the pool's session")
	if !strings.Contains(p.logs.String(), "outside evict_scope same-application") {
		t.Errorf("the rejection does not say why:\n%s", p.logs.String())
	}
}

// evict_scope same-client: a login evicts only sessions from its own client
// address. Clients come from 127.0.0.2 and 127.0.0.3 (the loopback network
// is all local); rolegate relays them all, so this also checks that a
// relayed session is matched by its client's address, not rolegate's.
func TestLimitEvictScopeClient(t *testing.T) {
	t.Parallel()
	const role = "lim_scope_client"
	pw := newRole(t, role, -1)
	p := limitedProxy(t, map[string]limiter.Rule{role: {MaxSessions: 2, Policy: limiter.PolicyNewestWins,
		Fallback: limiter.PolicyReject, EvictScope: limiter.EvictSameClient}})
	from := func(ip string) (*pgx.Conn, error) {
		cfg, err := pgx.ParseConfig(p.DSN(role, pw, "app"))
		if err != nil {
			return nil, err
		}
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
		cfg.DialFunc = d.DialContext
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		return pgx.ConnectConfig(ctx, cfg)
	}
	must := func(c *pgx.Conn, err error) *pgx.Conn {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close(context.Background()) })
		return c
	}
	colleague := must(from("127.0.0.3")) // the oldest, from another host
	leaked := must(from("127.0.0.2"))
	newer := must(from("127.0.0.2"))
	wantEvicted(t, leaked, "role", role, limiter.PolicyNewestWins)
	wantAlive(t, colleague, "the colleague's older session")
	_, err := from("127.0.0.4")
	wantTooMany(t, err, "role", role)
	wantAlive(t, colleague, "the colleague's session")
	wantAlive(t, newer, "the newer session")
}

// A pool larger than its limit under newest-wins evicts its own sessions
// in a loop; past max_evictions the fallback rejects, a warning names the
// role and the clients evicting, and the role is reported as thrashing.
func TestLimitEvictionBudget(t *testing.T) {
	t.Parallel()
	const role = "lim_budget"
	pw := newRole(t, role, -1)
	p := limitedProxy(t, map[string]limiter.Rule{role: {MaxSessions: 1, Policy: limiter.PolicyNewestWins,
		Fallback: limiter.PolicyReject, Budget: limiter.Budget{Evictions: 2, Per: time.Hour}}})
	dsn := p.DSN(role, pw, "app", "application_name=leaky_pool")
	prev := connect(t, dsn)
	for range 2 {
		next := connect(t, dsn)
		wantEvicted(t, prev, "role", role, limiter.PolicyNewestWins)
		prev = next
	}
	_, err := tryConnect(dsn, 30*time.Second, nil)
	wantTooMany(t, err, "role", role)
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || !strings.Contains(pe.Detail, "eviction budget (max_evictions 2/hour)") || !strings.HasPrefix(pe.Hint, "Try again later") {
		t.Errorf("the budget's 53300 does not say why: detail %q hint %q", pe.Detail, pe.Hint)
	}
	wantAlive(t, prev, "the last session")
	snap := p.cfg.Limits.Limiter.Snapshot()
	if len(snap.Thrashing) != 1 || snap.Thrashing[0].Name != role || len(snap.Thrashing[0].Evictors) != 1 ||
		!strings.HasPrefix(snap.Thrashing[0].Evictors[0], "leaky_pool@127.0.0.1") {
		t.Errorf("thrashing %+v; want role %s, evicted by leaky_pool@127.0.0.1", snap.Thrashing, role)
	}
	waitUntil(t, 30*time.Second, "the thrashing warning", func() bool {
		for _, line := range logLines(p, "level=WARN") {
			if strings.Contains(line, "eviction budget spent") && strings.Contains(line, "role="+role) &&
				strings.Contains(line, "leaky_pool@127.0.0.1") {
				return true
			}
		}
		return false
	})
}
