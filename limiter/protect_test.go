package limiter

import (
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestParseProtect(t *testing.T) {
	t.Parallel()
	for _, c := range []struct{ in, want, err string }{
		{"application_name:pg_dump*", "application_name:pg_dump*", ""},
		{"role:replicator", "role:replicator", ""},
		{"client:10.1.2.3/16", "client:10.1.0.0/16", ""},
		{"client:10.1.2.3", "client:10.1.2.3/32", ""},
		{"client:::1", "client:::1/128", ""},
		{"application_name:", "", "want application_name:<glob>"},
		{"pg_dump", "", "want application_name:<glob>"},
		{"pid:42", "", `unknown kind "pid"`},
		{"role:[a", "", "bad glob"},
		{"client:host.example", "", "want an address or a CIDR prefix"},
	} {
		p, err := ParseProtect(c.in)
		switch {
		case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)):
			t.Errorf("ParseProtect(%q) = %v, want an error with %q", c.in, err, c.err)
		case c.err == "" && (err != nil || p.String() != c.want):
			t.Errorf("ParseProtect(%q) = %v, %v; want %s", c.in, p, err, c.want)
		}
	}
}

func TestProtectMatches(t *testing.T) {
	t.Parallel()
	h := Holder{Role: "app_rw", ApplicationName: "pg_dump", Client: netip.MustParseAddrPort("10.1.7.9:5555")}
	for _, c := range []struct {
		entry string
		want  bool
	}{
		{"application_name:pg_dump*", true},
		{"application_name:psql", false},
		{"role:app_*", true},
		{"role:replicator", false},
		{"client:10.1.0.0/16", true},
		{"client:10.2.0.0/16", false},
		{"client:10.1.7.9", true},
	} {
		p, err := ParseProtect(c.entry)
		if err != nil {
			t.Fatal(err)
		}
		if got := p.Matches(h); got != c.want {
			t.Errorf("%s matches %+v: %v, want %v", c.entry, h, got, c.want)
		}
	}
	// No client address seen (Unix socket, no pg_read_all_stats): no client entry matches.
	p, _ := ParseProtect("client:0.0.0.0/0")
	if p.Matches(Holder{}) {
		t.Error("client:0.0.0.0/0 matches a session without a client address")
	}
	// An IPv4 client seen as IPv4-mapped IPv6 still matches.
	if !p.Matches(Holder{Client: netip.MustParseAddrPort("[::ffff:10.0.0.1]:1")}) {
		t.Error("client:0.0.0.0/0 does not match ::ffff:10.0.0.1")
	}
}

// A protected session counts but is never a victim: newest-wins passes over
// the oldest session when it is protected, and when only protected sessions
// are left the fallback rejects, saying so.
func TestDecideProtected(t *testing.T) {
	t.Parallel()
	clk := newClock()
	l := New(clk.Now)
	dump := idle(10, "app", "d", 3*time.Hour)
	dump.ApplicationName = "pg_dump"
	psql := idle(11, "app", "d", time.Hour)
	nw := rule(2, PolicyNewestWins)
	var err error
	if nw.Protect, err = parseAll("application_name:pg_dump*"); err != nil {
		t.Fatal(err)
	}
	d := l.Decide(login(1), nw, NoLimit(), []Holder{dump, psql})
	if d.Kind != Evict || len(d.Victims) != 1 || d.Victims[0].PID != 11 {
		t.Fatalf("with one unprotected session: %v %v (%s)", d.Kind, pids(d.Victims), d.Reason)
	}
	l.Evicted(11)
	d.Ticket.Leave()

	other := idle(12, "app", "d", time.Hour)
	other.ApplicationName = "pg_dump_all"
	d = l.Decide(login(2), nw, NoLimit(), []Holder{dump, other})
	if d.Kind != Reject || d.Count != 2 || !strings.Contains(d.Reason, "protected") {
		t.Fatalf("with only protected sessions: %v count %d (%s)", d.Kind, d.Count, d.Reason)
	}
}

func parseAll(entries ...string) ([]Protect, error) {
	var out []Protect
	for _, e := range entries {
		p, err := ParseProtect(e)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}
