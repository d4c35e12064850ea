package proxy

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rolegate/rolegate/limiter"
)

// localDSN is a connection to the shared server over its Unix socket, which
// pg_stat_activity shows without a client address.
func localDSN(user, database string, extra ...string) string {
	return strings.Join(append([]string{"host=" + quoteDSN(shared.Dir), fmt.Sprintf("port=%d", shared.Port),
		"user=" + quoteDSN(user), "dbname=" + quoteDSN(database), "sslmode=disable"}, extra...), " ")
}

// pgError is the PostgreSQL error in err's chain, or a failure.
func pgError(t *testing.T, err error, what string) *pgconn.PgError {
	t.Helper()
	var pe *pgconn.PgError
	if !errors.As(err, &pe) {
		t.Fatalf("%s: got %v, want a PostgreSQL error", what, err)
	}
	return pe
}

// hasControl reports whether s has a control character (a newline, ...).
func hasControl(s string) bool {
	return strings.ContainsFunc(s, func(r rune) bool { return r < 0x20 || r == 0x7f })
}

// The 53300 rolegate sends keeps PostgreSQL's first line and adds a DETAIL
// (the limit, its source, who holds it) and a HINT: for a proxy.toml limit,
// the server's rolconnlimit and its datconnlimit.
func TestRejectionExplains(t *testing.T) {
	const hint = "End a session you no longer need, or ask an operator to free a slot (SHOW SESSIONS in rolegate's admin console lists them)."

	t.Run("proxy.toml", func(t *testing.T) {
		pw := newRole(t, "hint_cfg", -1)
		p := limitedProxy(t, map[string]limiter.Rule{"hint_cfg": {MaxSessions: 2, Policy: limiter.PolicyReject, Fallback: limiter.PolicyReject}})
		connect(t, p.DSN("hint_cfg", pw, "app", "application_name=app-one"))
		// Opened straight over the server's Unix socket, with a name that
		// tries to break out of its quotes and its line (the server turns
		// the newline into "?", the quote it keeps).
		connect(t, localDSN("hint_cfg", "app", "application_name="+quoteDSN("we\"ird\nname")))
		_, err := tryConnect(p.DSN("hint_cfg", pw, "app", "application_name=third"), 30*time.Second, nil)
		wantTooMany(t, err, "role", "hint_cfg")
		pe := pgError(t, err, "third login")
		want := `The limit of 2 sessions for role "hint_cfg" comes from proxy.toml. 2 sessions hold it: ` +
			`1 with application_name "app-one" from 127.0.0.1 and 1 with application_name "we\"ird?name" from local.`
		if pe.Detail != want || pe.Hint != hint {
			t.Errorf("DETAIL %q\nwant   %q\nHINT %q\nwant %q", pe.Detail, want, pe.Hint, hint)
		}
		// psql shows both, each on its own line.
		_, errOut, err := psql(t, p.DSN("hint_cfg", pw, "app"), "", "-c", "select 1")
		if err == nil || !strings.Contains(errOut, `FATAL:  too many connections for role "hint_cfg"`) ||
			!strings.Contains(errOut, "\nDETAIL:  "+want+"\n") || !strings.Contains(errOut, "\nHINT:  "+hint+"\n") {
			t.Errorf("psql: %v\n%s", err, errOut)
		}
	})

	t.Run("rolconnlimit", func(t *testing.T) {
		pw := newRole(t, "hint_srv", 2)
		p := rulesProxy(t, mapRules{}) // no rule: the server's limit alone
		connect(t, p.DSN("hint_srv", pw, "app", "application_name=pool"))
		connect(t, p.DSN("hint_srv", pw, "app", "application_name=pool"))
		// The server's own words for the same login, straight to it.
		_, direct := tryConnect(shared.DSN("hint_srv", pw, "app"), 30*time.Second, nil)
		server := pgError(t, direct, "direct login past the limit")
		_, err := tryConnect(p.DSN("hint_srv", pw, "app"), 30*time.Second, nil)
		pe := pgError(t, err, "login through rolegate")
		if pe.Code != server.Code || pe.Message != server.Message || pe.Severity != server.Severity {
			t.Fatalf("rolegate: %s %s %q; server: %s %s %q", pe.Severity, pe.Code, pe.Message, server.Severity, server.Code, server.Message)
		}
		want := `The limit of 2 sessions for role "hint_srv" comes from the role's CONNECTION LIMIT on the server (rolconnlimit). ` +
			`2 sessions hold it: 2 with application_name "pool" from 127.0.0.1.`
		if pe.Detail != want || pe.Hint != hint {
			t.Errorf("DETAIL %q\nwant   %q\nHINT %q", pe.Detail, want, pe.Hint)
		}
	})

	t.Run("datconnlimit", func(t *testing.T) {
		newDatabase(t, "hint_db", 2)
		pw := newRole(t, "hint_dbu", -1)
		p := rulesProxy(t, mapRules{})
		connect(t, p.DSN("hint_dbu", pw, "hint_db", "application_name=web"))
		connect(t, localDSN("hint_dbu", "hint_db"))
		_, direct := tryConnect(shared.DSN("hint_dbu", pw, "hint_db"), 30*time.Second, nil)
		server := pgError(t, direct, "direct login past the limit")
		_, err := tryConnect(p.DSN("hint_dbu", pw, "hint_db"), 30*time.Second, nil)
		pe := pgError(t, err, "login through rolegate")
		if pe.Code != server.Code || pe.Message != server.Message || pe.Message != `too many connections for database "hint_db"` {
			t.Fatalf("rolegate: %s %q; server: %s %q", pe.Code, pe.Message, server.Code, server.Message)
		}
		want := `The limit of 2 sessions for database "hint_db" comes from the database's CONNECTION LIMIT on the server (datconnlimit). ` +
			`2 sessions hold it: 1 with no application_name from local and 1 with application_name "web" from 127.0.0.1.`
		if pe.Detail != want || pe.Hint != hint {
			t.Errorf("DETAIL %q\nwant   %q\nHINT %q", pe.Detail, want, pe.Hint)
		}
	})

	t.Run("newest-wins with nothing to evict", func(t *testing.T) {
		pw := newRole(t, "hint_nw", -1)
		p := limitedProxy(t, map[string]limiter.Rule{"hint_nw": {MaxSessions: 1, Policy: limiter.PolicyNewestWins,
			Fallback: limiter.PolicyReject, MinSessionAge: time.Hour}})
		connect(t, p.DSN("hint_nw", pw, "app", "application_name=young"))
		_, err := tryConnect(p.DSN("hint_nw", pw, "app"), 30*time.Second, nil)
		wantTooMany(t, err, "role", "hint_nw")
		pe := pgError(t, err, "login past the limit")
		want := `The limit of 1 session for role "hint_nw" comes from proxy.toml. ` +
			`1 session holds it: 1 with application_name "young" from 127.0.0.1. Policy newest-wins evicted no session for this login.`
		if pe.Detail != want || !strings.HasPrefix(pe.Hint, "Try again later, ") {
			t.Errorf("DETAIL %q\nwant   %q\nHINT %q", pe.Detail, want, pe.Hint)
		}
	})

	t.Run("override, wait", func(t *testing.T) {
		pw := newRole(t, "hint_ovr", -1)
		p := limitedProxy(t, map[string]limiter.Rule{"hint_ovr": {MaxSessions: 5, Policy: limiter.PolicyWait,
			Fallback: limiter.PolicyReject, WaitTimeout: time.Millisecond}})
		one := 1
		p.cfg.Limits.Override("hint_ovr", &one, nil)
		connect(t, p.DSN("hint_ovr", pw, "app", "application_name=holder"))
		_, err := tryConnect(p.DSN("hint_ovr", pw, "app"), 30*time.Second, nil)
		wantTooMany(t, err, "role", "hint_ovr")
		pe := pgError(t, err, "login past the override")
		want := `The limit of 1 session for role "hint_ovr" comes from an operator's override (SET LIMIT in the admin console). ` +
			`1 session holds it: 1 with application_name "holder" from 127.0.0.1.`
		if !strings.HasPrefix(pe.Detail, want) || !strings.HasPrefix(pe.Hint, "Try again later, ") {
			t.Errorf("DETAIL %q\nwant   %q...\nHINT %q", pe.Detail, want, pe.Hint)
		}
		if !strings.HasSuffix(pe.Detail, " The login waited for a slot until its wait_timeout (1ms) ran out.") {
			t.Errorf("DETAIL %q does not say the login waited", pe.Detail)
		}
	})
}

// An evicted session's 57P01 names the newer login (role, application_name,
// client address) and the policy; a hostile application_name is escaped.
func TestEvictionNamesNewerLogin(t *testing.T) {
	pw := newRole(t, "hint_ev", -1)
	p := limitedProxy(t, map[string]limiter.Rule{"hint_ev": {MaxSessions: 1, Policy: limiter.PolicyNewestWins, Fallback: limiter.PolicyReject}})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	old := connect(t, p.DSN("hint_ev", pw, "app", "application_name=older-app"))
	var dialed string
	newer, err := tryConnect(p.DSN("hint_ev", pw, "app", "application_name=newer-app"), 30*time.Second, &dialed)
	if err != nil {
		t.Fatal(err)
	}
	defer newer.Close(context.Background())
	_, err = old.Exec(ctx, "select 1")
	pe := pgError(t, err, "evicted session")
	want := fmt.Sprintf(`terminating connection: rolegate evicted this session for a newer login of role "hint_ev" `+
		`(application_name "newer-app", client %s, policy newest-wins)`, dialed)
	if pe.Code != "57P01" || pe.Severity != "FATAL" || pe.Message != want {
		t.Fatalf("got %s %s %q\nwant 57P01 %q", pe.Severity, pe.Code, pe.Message, want)
	}

	// The next login's name tries to close the quote and start a line of its
	// own: the evicted client reads it escaped, on one line.
	const hostile = "ev\"il\n\x01x"
	var dialed2 string
	newest, err := tryConnect(p.DSN("hint_ev", pw, "app", "application_name="+quoteDSN(hostile)), 30*time.Second, &dialed2)
	if err != nil {
		t.Fatal(err)
	}
	defer newest.Close(context.Background())
	_, err = newer.Exec(ctx, "select 1")
	pe = pgError(t, err, "evicted session")
	want = fmt.Sprintf(`terminating connection: rolegate evicted this session for a newer login of role "hint_ev" `+
		`(application_name "ev\"il\n\x01x", client %s, policy newest-wins)`, dialed2)
	if pe.Code != "57P01" || pe.Message != want || hasControl(pe.Message) {
		t.Fatalf("got %s %q\nwant 57P01 %q", pe.Code, pe.Message, want)
	}
}

// The holders of a DETAIL are grouped and bounded: at most detailApps
// application_names, detailAddrs addresses each, the rest counted; logins
// in flight are counted apart.
func TestHoldersSentence(t *testing.T) {
	row := func(app, addr string) limiter.Holder {
		h := limiter.Holder{PID: 1, ApplicationName: app}
		if addr != "" {
			h.Client = netip.AddrPortFrom(netip.MustParseAddr(addr), 5000)
		}
		return h
	}
	addr := func(h limiter.Holder) string {
		if !h.Client.IsValid() {
			return "local"
		}
		return h.Client.Addr().String()
	}
	many := []limiter.Holder{}
	for i := range 7 {
		many = append(many, row(fmt.Sprintf("app%d", i), "10.0.0.1"))
	}
	tests := []struct {
		name  string
		count int
		rows  []limiter.Holder
		want  string
	}{
		{"no census", 0, nil, ""},
		{"in flight only", 2, nil, "2 sessions hold it: 2 logging in or leaving."},
		{"one", 1, []limiter.Holder{row("", "")}, "1 session holds it: 1 with no application_name from local."},
		{"addresses bounded", 5, []limiter.Holder{row("a", "10.0.0.1"), row("a", "10.0.0.1"), row("a", "10.0.0.2"),
			row("a", "10.0.0.3"), row("a", "10.0.0.4")},
			`5 sessions hold it: 5 with application_name "a" (2 from 10.0.0.1, 1 from 10.0.0.2, 1 from 10.0.0.3, 1 from one other address).`},
		{"names bounded", 8, many,
			`8 sessions hold it: 1 with application_name "app0" from 10.0.0.1, 1 with application_name "app1" from 10.0.0.1, ` +
				`1 with application_name "app2" from 10.0.0.1, 1 with application_name "app3" from 10.0.0.1, ` +
				`1 with application_name "app4" from 10.0.0.1, 2 more with 2 other application_names and 1 logging in or leaving.`},
		{"another instance's reservation", 2, []limiter.Holder{row("x", "10.0.0.9"), {Reserved: true}},
			`2 sessions hold it: 1 with application_name "x" from 10.0.0.9 and 1 logging in or leaving.`},
	}
	for _, tt := range tests {
		if got := holdersSentence(tt.count, tt.rows, addr); got != tt.want {
			t.Errorf("%s:\n got %q\nwant %q", tt.name, got, tt.want)
		}
	}
	if got := quoteAppName(strings.Repeat("é", 40) + "\xff"); len(got) > 2+63 || hasControl(got) {
		t.Errorf("quoteAppName: %q", got)
	}
}
