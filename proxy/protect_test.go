package proxy

import (
	"context"
	"testing"
	"time"

	"github.com/rolegate/rolegate/limiter"
)

// A protected session (here by application_name, as a pg_dump would be)
// survives newest-wins although it is the oldest: the newer login evicts
// the oldest unprotected one. When only protected sessions hold the slots,
// the fallback rejects with PostgreSQL's 53300.
func TestLimitProtect(t *testing.T) {
	t.Parallel()
	const role = "lim_protect"
	pw := newRole(t, role, -1)
	dumpRule, err := limiter.ParseProtect("application_name:pg_dump*")
	if err != nil {
		t.Fatal(err)
	}
	p := limitedProxy(t, map[string]limiter.Rule{role: {MaxSessions: 2, Policy: limiter.PolicyNewestWins,
		Fallback: limiter.PolicyReject, Protect: []limiter.Protect{dumpRule}}})
	dump := connect(t, p.DSN(role, pw, "app", "application_name=pg_dump"))
	psql := connect(t, p.DSN(role, pw, "app", "application_name=psql"))
	newer := connect(t, p.DSN(role, pw, "app", "application_name=psql"))
	wantEvicted(t, psql, "role", role, limiter.PolicyNewestWins)
	wantAlive(t, dump, "the protected pg_dump session")
	wantAlive(t, newer, "the newer session")

	// newer is evicted for another pg_dump; then only protected sessions
	// are left, and the next login is rejected.
	dump2 := connect(t, p.DSN(role, pw, "app", "application_name=pg_dump_all"))
	wantEvicted(t, newer, "role", role, limiter.PolicyNewestWins)
	_, err = tryConnect(p.DSN(role, pw, "app"), 30*time.Second, nil)
	wantTooMany(t, err, "role", role)
	wantAlive(t, dump, "the protected pg_dump session")
	wantAlive(t, dump2, "the second protected session")
	dump2.Close(context.Background())
}
