package proxy

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/config"
	"github.com/rolegate/rolegate/internal/pgtest"
	"github.com/rolegate/rolegate/limiter"
)

// longNames are roles and databases whose names clients send longer than the
// 63 bytes the server keeps. The server cuts a startup packet's names at byte
// 63 (not at a character boundary); CREATE ROLE and CREATE DATABASE cut at a
// character boundary. Each name pair differs only after byte 63, so the server
// takes both for one role or database.
type longNames struct {
	role63, roleMB63 string // the roles as the server stored them
	r64, r70         string // ASCII: 64 and 70 bytes
	m79, m65         string // multibyte, byte 63 at a character boundary
	db63, dbMB63     string // the databases as stored
	d64, d70         string
	dm79, dm65       string
	// Names whose byte 63 falls inside a character: the server's startup cut
	// leaves a name that is not UTF-8 and names nothing; CREATE kept 62 bytes.
	splitRole, splitRole62 string
	splitDB, splitDB62     string
}

const longPW = "long_pw"

// newLongNames creates the roles and databases, each under its full name as a
// user would, and checks that the server stored what we expect.
func newLongNames(t *testing.T, withSplit bool) longNames {
	t.Helper()
	base := uniqueName("ln") // 15 bytes
	p63 := base + strings.Repeat("x", 63-len(base))
	mb63 := base + strings.Repeat("é", 24) // 15 + 48 bytes
	split := base + "y" + strings.Repeat("é", 30)
	n := longNames{
		role63: p63, r64: p63 + "a", r70: p63 + "abcdefg",
		roleMB63: mb63, m79: mb63 + strings.Repeat("é", 8), m65: mb63 + "zz",
		db63: p63, d64: p63 + "a", d70: p63 + "abcdefg",
		dbMB63: mb63, dm79: mb63 + strings.Repeat("é", 8), dm65: mb63 + "zz",
		splitRole: split, splitRole62: split[:62], splitDB: split, splitDB62: split[:62],
	}
	ctx := context.Background()
	q := []string{
		fmt.Sprintf(`create role %q login password '%s'`, n.r70, longPW),
		fmt.Sprintf(`create role %q login password '%s'`, n.m79, longPW),
		fmt.Sprintf(`create database %q`, n.d70),
		fmt.Sprintf(`create database %q`, n.dm79),
	}
	if withSplit {
		q = append(q, fmt.Sprintf(`create role %q login password '%s'`, n.splitRole, longPW),
			fmt.Sprintf(`create database %q`, n.splitDB))
	}
	for _, s := range q {
		if err := shared.Exec(ctx, s); err != nil {
			t.Fatalf("%s: %v", s, err)
		}
	}
	su := connect(t, shared.SuperDSN())
	want := []string{n.role63, n.roleMB63}
	if withSplit {
		want = append(want, n.splitRole62)
	}
	for _, name := range want {
		var ok bool
		if err := su.QueryRow(ctx, "select exists (select from pg_roles where rolname = $1)", name).Scan(&ok); err != nil || !ok {
			t.Fatalf("the server stored no role %q: %v", name, err)
		}
	}
	return n
}

// loginResult is what a client learns from a login: who it is, or the error.
type loginResult struct {
	user, database string
	code, message  string
}

func (r loginResult) String() string {
	if r.code != "" {
		return fmt.Sprintf("%s %q", r.code, r.message)
	}
	return fmt.Sprintf("logged in as %q to %q", r.user, r.database)
}

func tryLogin(t *testing.T, dsn string) loginResult {
	t.Helper()
	c, err := tryConnect(dsn, 15*time.Second, nil)
	if err != nil {
		var pe *pgconn.PgError
		if !errors.As(err, &pe) {
			t.Fatalf("login %q: %v", redact(dsn), err)
		}
		return loginResult{code: pe.Code, message: pe.Message}
	}
	defer c.Close(context.Background())
	var r loginResult
	if err := c.QueryRow(context.Background(), "select current_user::text, current_database()::text").Scan(&r.user, &r.database); err != nil {
		t.Fatal(err)
	}
	return r
}

// longNameRules is proxy.toml with limits of one session for the long names,
// written under the names the clients use (70 and 79 bytes): the file cuts
// them as CREATE ROLE does.
func longNameRules(t *testing.T, n longNames) *config.Config {
	t.Helper()
	doc := fmt.Sprintf("[limits]\npolicy = \"reject\"\n"+
		"[roles.%q]\nmax_sessions = 1\n[roles.%q]\nmax_sessions = 1\n"+
		"[databases.%q]\nmax_sessions = 1\n[databases.%q]\nmax_sessions = 1\n", n.r70, n.m79, n.d70, n.dm79)
	cfg, err := config.Parse("proxy.toml", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// longNameProxy starts rolegate with limits from rules (server limits read on
// every login) in passthrough or proxy-auth mode.
func longNameProxy(t *testing.T, proxyMode bool, rules Rules) *testProxy {
	t.Helper()
	ctl := superControl(t, shared)
	lim := &Limits{Limiter: limiter.New(time.Now), Server: ctl}
	lim.SetRules(rules, true, 0)
	o := proxyOpts{limits: lim}
	if proxyMode {
		o.auth = proxyAuth(time.Minute, auth.SourceFunc(ctl.Secret))
	}
	return startProxy(t, o)
}

// A login with a long name gets through rolegate what it gets from the server
// directly: the role and database the server's cut names, or the server's
// own error for a name cut inside a character.
func TestLongNamesLogin(t *testing.T) {
	t.Parallel()
	n := newLongNames(t, true)
	for _, proxyMode := range []bool{false, true} {
		t.Run(map[bool]string{false: "passthrough", true: "proxy auth"}[proxyMode], func(t *testing.T) {
			t.Parallel()
			p := longNameProxy(t, proxyMode, mapRules{})
			for _, tt := range []struct {
				user, db string
				want     loginResult
			}{
				{n.r64, "app", loginResult{user: n.role63, database: "app"}},
				{n.r70, n.d70, loginResult{user: n.role63, database: n.db63}},
				{n.role63, n.d64, loginResult{user: n.role63, database: n.db63}},
				{n.m79, n.dm65, loginResult{user: n.roleMB63, database: n.dbMB63}},
				{n.m65, n.dm79, loginResult{user: n.roleMB63, database: n.dbMB63}},
				{n.splitRole62, n.splitDB62, loginResult{user: n.splitRole62, database: n.splitDB62}},
				// Cut inside a character: no such role (28P01, as for any
				// unknown role), no such database (3D000); the messages carry
				// the cut bytes raw (%q would escape them).
				{n.splitRole, "app", loginResult{code: "28P01",
					message: `password authentication failed for user "` + n.splitRole[:63] + `"`}},
				{n.splitRole62, n.splitDB, loginResult{code: "3D000",
					message: `database "` + n.splitDB[:63] + `" does not exist`}},
			} {
				direct := tryLogin(t, shared.DSN(tt.user, longPW, tt.db))
				via := tryLogin(t, p.DSN(tt.user, longPW, tt.db))
				if direct != tt.want {
					t.Errorf("user %d bytes, database %d bytes: directly %v, want %v", len(tt.user), len(tt.db), direct, tt.want)
				}
				if via != direct {
					t.Errorf("user %d bytes, database %d bytes: through rolegate %v, directly %v", len(tt.user), len(tt.db), via, direct)
				}
			}
			// psql (libpq) sees the same.
			out, errOut, err := psql(t, p.DSN(n.m79, longPW, n.d70), "", "-Atc", "select current_user || '|' || current_database()")
			if err != nil || strings.TrimSpace(out) != n.roleMB63+"|"+n.db63 {
				t.Errorf("psql: %v, %q %q", err, out, errOut)
			}
			// rolegate's session list and log name the role as the server does.
			c := connect(t, p.DSN(n.r70, longPW, n.d70, "application_name=longnames"))
			s := liveSession(p, "longnames")
			if s == nil || s.User != n.role63 || s.Database != n.db63 {
				t.Errorf("session list: %+v, want role %q database %q", s, n.role63, n.db63)
			}
			c.Close(context.Background())
			if strings.Contains(p.logs.String(), n.r64) {
				t.Errorf("the log names a role by its uncut name %q", n.r64)
			}
		})
	}
}

// Names that differ only after byte 63 are one role or database to the
// server, and so to rolegate's limits: a second session under another long
// name of the same role or database is refused, in both modes, for ASCII and
// multibyte names, with rules written under the long names.
func TestLongNamesLimits(t *testing.T) {
	t.Parallel()
	for _, proxyMode := range []bool{false, true} {
		t.Run(map[bool]string{false: "passthrough", true: "proxy auth"}[proxyMode], func(t *testing.T) {
			t.Parallel()
			n := newLongNames(t, false) // names of its own: the modes run at once
			p := longNameProxy(t, proxyMode, longNameRules(t, n))
			for _, tt := range []struct {
				what             string
				first, second    [2]string // user, database
				scope, limitedAs string
			}{
				{"ASCII role", [2]string{n.r64, "app"}, [2]string{n.r70, "app"}, "role", n.role63},
				{"multibyte role", [2]string{n.m79, "app"}, [2]string{n.m65, "app"}, "role", n.roleMB63},
				{"ASCII database", [2]string{"scram_user", n.d64}, [2]string{"scram_user", n.d70}, "database", n.db63},
				{"multibyte database", [2]string{"scram_user", n.dm65}, [2]string{"scram_user", n.dm79}, "database", n.dbMB63},
			} {
				pw := func(user string) string {
					if user == "scram_user" {
						return scramPW
					}
					return longPW
				}
				held := connect(t, p.DSN(tt.first[0], pw(tt.first[0]), tt.first[1]))
				_, err := tryConnect(p.DSN(tt.second[0], pw(tt.second[0]), tt.second[1]), 15*time.Second, nil)
				var pe *pgconn.PgError
				want := fmt.Sprintf("too many connections for %s \"%s\"", tt.scope, tt.limitedAs)
				if !errors.As(err, &pe) || pe.Code != "53300" || pe.Message != want {
					t.Fatalf("%s: second session: %v, want 53300 %s", tt.what, err, want)
				}
				wantAlive(t, held, tt.what+": the held session")
				held.Close(context.Background())
				// The slot frees when the server has let the session go.
				waitUntil(t, 10*time.Second, tt.what+": the held session to end", func() bool { return len(p.Sessions()) == 0 })
			}
			if l := logLines(p, "msg=rejected"); len(l) != 4 {
				t.Errorf("rejections logged: %q", l)
			}

			// An operator's override (SET LIMIT) under a long name reaches
			// the role the server stored.
			two := 2
			p.cfg.Limits.Override(n.m65, &two, nil)
			connect(t, p.DSN(n.m79, longPW, "app"))
			connect(t, p.DSN(n.m65, longPW, "app"))
			_, err := tryConnect(p.DSN(n.roleMB63, longPW, "app"), 15*time.Second, nil)
			wantTooMany(t, err, "role", n.roleMB63)

			// So do an operator's DISABLE and ENABLE, by either long name.
			p.Disable(limiter.ScopeRole, n.m79, "test")
			if _, err := tryConnect(p.DSN(n.roleMB63, longPW, "app"), 15*time.Second, nil); sqlstate(err) != "55000" {
				t.Errorf("a login of a role disabled under a long name: %v", err)
			}
			if !p.Enable(limiter.ScopeRole, n.m65, "test") || len(p.Gates()) != 0 {
				t.Errorf("ENABLE under the other long name did not lift the hold: %+v", p.Gates())
			}
		})
	}
}

// md5 hashes the password with the role's name: the server uses the name it
// cut (the stored hash was made with the stored name), while a client hashes
// the name it was given. So a login with a name over 63 bytes fails under md5
// directly, and the same through rolegate, in both modes; with the name as
// stored it works.
func TestLongNamesMD5(t *testing.T) {
	t.Parallel()
	c := pgtest.Start(t, pgtest.Options{HBA: []string{"host all all 127.0.0.1/32 md5"}})
	r64 := uniqueName("md5") + strings.Repeat("m", 49) // 64 bytes
	ctx := context.Background()
	if err := c.Exec(ctx, "set password_encryption = 'md5'; create role "+r64+" login password 'md5_long_pw'"); err != nil {
		t.Fatal(err)
	}
	ctl := superControl(t, c)
	md5Auth := &ClientAuth{Store: auth.NewStore(100, time.Minute, auth.SourceFunc(ctl.Secret)), Method: "md5"}
	for _, o := range []proxyOpts{{server: c}, {server: c, auth: md5Auth}} {
		p := startProxy(t, o)
		for _, tt := range []struct {
			user string
			want loginResult
		}{
			{r64, loginResult{code: "28P01", message: `password authentication failed for user "` + r64[:63] + `"`}},
			{r64[:63], loginResult{user: r64[:63], database: "postgres"}},
		} {
			direct := tryLogin(t, c.DSN(tt.user, "md5_long_pw", "postgres"))
			via := tryLogin(t, p.DSN(tt.user, "md5_long_pw", "postgres"))
			if direct != tt.want || via != direct {
				t.Errorf("proxy auth %v, user %d bytes: directly %v, through rolegate %v, want %v", o.auth != nil, len(tt.user), direct, via, tt.want)
			}
		}
	}
}
