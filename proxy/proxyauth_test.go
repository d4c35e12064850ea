package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/config"
	"github.com/rolegate/rolegate/internal/pgtest"
	"github.com/rolegate/rolegate/internal/testutil"
	"github.com/rolegate/rolegate/upstream"
)

// Passwords of the roles authServer creates, besides the shared cluster's.
const (
	plainPW   = "plain secret"
	nologinPW = "nologin secret"
	controlPW = "control secret"
	wrongPW   = "wrong secret"
)

// setupQuery is the auth query for sql/setup.sql's function.
const setupQuery = "SELECT rolegate.get_secret($1)"

// authServer is a TLS-capable cluster set up for proxy-side authentication:
//
//	scram_user    scram-sha-256, SCRAM verifier (scramPW)
//	md5_user      md5, md5 verifier (md5PW)
//	clear_user    password, SCRAM verifier (passwordPW)
//	plain_user    scram-sha-256, SCRAM verifier (plainPW); plaintext in the userlist
//	nologin_user  NOLOGIN, SCRAM verifier (nologinPW)
//	nopw_user     no password at all; the server trusts it
//	rolegate      sql/setup.sql's control role (controlPW)
//
// Members of md5_group log in with md5 and of clear_group with password, so
// tests can add roles of their own.
type authServer struct {
	c        *pgtest.Cluster
	super    auth.Source // the default auth query, as the superuser
	function auth.Source // setup.sql's function, as the rolegate role
	userlist auth.Source // a userlist with scram_user, md5_user, plain_user, nologin_user
}

func newAuthServer(t *testing.T) *authServer {
	t.Helper()
	c := pgtest.Start(t, pgtest.Options{SSL: true, HBA: []string{
		"host all nopw_user 127.0.0.1/32 trust",
		"host all +md5_group 127.0.0.1/32 md5",
		"host all +clear_group 127.0.0.1/32 password",
	}})
	ctx := t.Context()
	for _, q := range []string{
		"create role md5_group nologin",
		"create role clear_group nologin",
		fmt.Sprintf("create role scram_user login password '%s'", scramPW),
		fmt.Sprintf("set password_encryption = 'md5'; create role md5_user login password '%s' in role md5_group", md5PW),
		fmt.Sprintf("create role clear_user login password '%s' in role clear_group", strings.ReplaceAll(passwordPW, "'", "''")),
		fmt.Sprintf("create role plain_user login password '%s'", plainPW),
		fmt.Sprintf("create role nologin_user nologin password '%s'", nologinPW),
		"create role nopw_user login",
	} {
		if err := c.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	// The least-privilege set-up, as an operator runs it; twice, as it must
	// be safe to run again.
	setup, err := filepath.Abs(filepath.Join("..", "sql", "setup.sql"))
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if _, errOut, err := psql(t, c.SuperDSN(), "", "-q", "-f", setup); err != nil {
			t.Fatalf("psql -f sql/setup.sql: %v\n%s", err, errOut)
		}
	}
	if err := c.Exec(ctx, fmt.Sprintf("alter role rolegate password '%s'", controlPW)); err != nil {
		t.Fatal(err)
	}

	s := &authServer{c: c, super: auth.SourceFunc(superControl(t, c).Secret)}
	fn, err := upstream.NewControl(ctx, config.Control{DSN: c.DSN("rolegate", controlPW, "postgres"), MaxConns: 2}, setupQuery)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fn.Close)
	s.function = auth.SourceFunc(fn.Secret)

	// A userlist as an operator writes it: a verifier and an md5 hash
	// copied from pg_authid, and a plaintext password.
	lines := []string{"; rolegate test userlist", `"plain_user" "` + plainPW + `"`}
	for _, role := range []string{"scram_user", "md5_user", "nologin_user"} {
		lines = append(lines, fmt.Sprintf("%q %q", role, s.stored(t, role)))
	}
	path := filepath.Join(t.TempDir(), "userlist.txt")
	if err := os.WriteFile(path, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ul, err := auth.LoadUserlist(path)
	if err != nil {
		t.Fatal(err)
	}
	s.userlist = ul
	return s
}

// stored is a role's pg_authid.rolpassword.
func (s *authServer) stored(t *testing.T, role string) string {
	t.Helper()
	conn := connect(t, s.c.SuperDSN())
	defer conn.Close(context.Background())
	var secret string
	if err := conn.QueryRow(t.Context(), "select rolpassword from pg_authid where rolname = $1", role).Scan(&secret); err != nil {
		t.Fatalf("secret of %s: %v", role, err)
	}
	return secret
}

// setPassword changes a role's password on the server, keeping md5 for md5 roles.
func (s *authServer) setPassword(t *testing.T, role, password string, md5 bool) {
	t.Helper()
	q := fmt.Sprintf("alter role %s password '%s'", role, password)
	if md5 {
		q = "set password_encryption = 'md5'; " + q
	}
	if err := s.c.Exec(t.Context(), q); err != nil {
		t.Fatal(err)
	}
}

// tlsOpts makes a proxy use TLS on both sides: clients verify rolegate's
// certificate, rolegate verifies the server's. It returns the client's
// connection string options.
func (s *authServer) tlsOpts(t *testing.T, o *proxyOpts) []string {
	t.Helper()
	ca := testutil.NewCA(t)
	o.clientTLS = &tls.Config{Certificates: []tls.Certificate{ca.Issue(t, "localhost", "127.0.0.1")}}
	o.sslmode, o.sslrootcert = config.SSLVerifyFull, s.c.CACertFile
	return []string{"sslmode=verify-full", "sslrootcert=" + ca.PEMFile}
}

// wantLoginWorks logs in with pgx and psql and runs a query on each, checking
// the role and whether the server connection uses TLS.
func wantLoginWorks(t *testing.T, p *testProxy, user, password string, serverTLS bool, extra ...string) {
	t.Helper()
	dsn := p.DSN(user, password, "postgres", extra...)
	c := connect(t, dsn)
	var got string
	var ssl bool
	if err := c.QueryRow(t.Context(), "select current_user, coalesce((select ssl from pg_stat_ssl where pid = pg_backend_pid()), false)").
		Scan(&got, &ssl); err != nil {
		t.Fatal(err)
	}
	if got != user || ssl != serverTLS {
		t.Errorf("pgx: current_user %q, server TLS %v; want %q, %v", got, ssl, user, serverTLS)
	}
	c.Close(t.Context())
	out, errOut, err := psql(t, dsn, "", "-At", "-c", "select current_user")
	if err != nil || strings.TrimSpace(out) != user {
		t.Errorf("psql: %v, output %q, stderr %q", err, out, errOut)
	}
}

// wantRefused checks that pgx and psql both get PostgreSQL's FATAL code and
// message, and that neither error quotes the password.
func wantRefused(t *testing.T, p *testProxy, user, password, code, msg string, extra ...string) {
	t.Helper()
	dsn := p.DSN(user, password, "postgres", extra...)
	_, err := pgx.Connect(t.Context(), dsn)
	if pgErr := wantPgError(t, err, "FATAL", code, msg); pgErr != nil && pgErr.Message != msg {
		t.Errorf("pgx: message %q, want exactly %q", pgErr.Message, msg)
	}
	_, errOut, err := psql(t, dsn, "", "-c", "select 1")
	if err == nil || !strings.Contains(errOut, "FATAL:  "+msg+"\n") {
		t.Errorf("psql: %v, stderr %q; want FATAL %q", err, errOut, msg)
	}
	for _, text := range []string{fmt.Sprint(err), errOut} {
		if strings.Contains(text, password) {
			t.Errorf("the error %q quotes the password", text)
		}
	}
}

func passwordFailed(user string) string {
	return fmt.Sprintf("password authentication failed for user %q", user)
}

// loginFailures are the proxy's "login failed" log lines.
func loginFailures(p *testProxy) []string {
	var lines []string
	for _, line := range strings.Split(p.logs.String(), "\n") {
		if strings.Contains(line, `msg="login failed"`) {
			lines = append(lines, line)
		}
	}
	return lines
}

// wantFailureLines waits for n "login failed" lines, each naming the role,
// the client's address and why; reasons counts the lines per reason.
func wantFailureLines(t *testing.T, p *testProxy, n int, reasons map[string]int) {
	t.Helper()
	waitUntil(t, 30*time.Second, fmt.Sprintf("%d login failed lines", n), func() bool { return len(loginFailures(p)) >= n })
	lines := loginFailures(p)
	if len(lines) != n {
		t.Errorf("%d login failed lines, want one per failed login, %d:\n%s", len(lines), n, strings.Join(lines, "\n"))
	}
	got := map[string]int{}
	for _, line := range lines {
		if !strings.Contains(line, " role=") || !strings.Contains(line, " client=127.0.0.1:") || !strings.Contains(line, " reason=") {
			t.Errorf("login failed line without role, client or reason: %s", line)
		}
		if m := regexp.MustCompile(`reason=("[^"]*"|\S+)`).FindStringSubmatch(line); m != nil {
			got[strings.Trim(m[1], `"`)]++
		}
	}
	for reason, want := range reasons {
		if got[reason] != want {
			t.Errorf("%d lines with reason %q, want %d (all: %v)", got[reason], reason, want, got)
		}
	}
}

// Secret material as it would look in a log line.
var (
	md5HashRE = regexp.MustCompile(`md5[0-9a-f]{32}`)
	proofRE   = regexp.MustCompile(`p=[A-Za-z0-9+/]{43}=`)
)

// wantNoSecrets checks a proxy's log holds no password, verifier, md5 hash
// or SCRAM proof.
func wantNoSecrets(t *testing.T, p *testProxy, passwords ...string) {
	t.Helper()
	logs := p.logs.String()
	for _, pw := range append(passwords, scramPW, md5PW, passwordPW, plainPW, nologinPW, controlPW, wrongPW) {
		if strings.Contains(logs, pw) {
			t.Errorf("the log contains the password %q", pw)
		}
	}
	if strings.Contains(logs, "SCRAM-SHA-256$") {
		t.Error("the log contains a SCRAM verifier")
	}
	if m := md5HashRE.FindString(logs); m != "" {
		t.Errorf("the log contains an md5 hash %s", m)
	}
	if m := proofRE.FindString(logs); m != "" || strings.Contains(logs, "c=biws") {
		t.Errorf("the log contains a SCRAM message %q", m)
	}
}

// rawLogin opens a raw connection, sends a StartupMessage and returns a
// Frontend on it.
func rawLogin(t *testing.T, p *testProxy, user string) (*net.TCPConn, *pgproto3.Frontend) {
	t.Helper()
	c := rawConn(t, p)
	startupMessage(t, c, 3, 0, "user", user, "database", "postgres")
	return c, pgproto3.NewFrontend(c, c)
}

func receive[M pgproto3.BackendMessage](t *testing.T, fe *pgproto3.Frontend) M {
	t.Helper()
	m, err := fe.Receive()
	if err != nil {
		t.Fatalf("receive: %v", err)
	}
	want, ok := m.(M)
	if !ok {
		t.Fatalf("got %T %+v, want %T", m, m, want)
	}
	return want
}

// wantStep logs in with pgx or psql and checks the outcome: accepted, or
// refused with 28P01 and PostgreSQL's message.
func wantStep(t *testing.T, p *testProxy, role, password string, ok, usePsql bool, what string) {
	t.Helper()
	dsn := p.DSN(role, password, "postgres")
	var err error
	var errOut string
	if usePsql {
		_, errOut, err = psql(t, dsn, "", "-c", "select 1")
	} else {
		var c *pgx.Conn
		if c, err = pgx.Connect(t.Context(), dsn); err == nil {
			c.Close(t.Context())
		}
	}
	switch {
	case ok && err != nil:
		t.Fatalf("%s: %q refused: %v %s", what, password, err, errOut)
	case !ok && err == nil:
		t.Fatalf("%s: %q accepted", what, password)
	case !ok && usePsql && !strings.Contains(errOut, "FATAL:  "+passwordFailed(role)):
		t.Errorf("%s: psql stderr %q", what, errOut)
	case !ok && !usePsql:
		wantPgError(t, err, "FATAL", "28P01", passwordFailed(role))
	}
}

// TestProxyAuth runs every proxy-mode login against one server: the matrix
// of verifier source × the server's method × TLS, and the special cases.
func TestProxyAuth(t *testing.T) {
	t.Parallel()
	s := newAuthServer(t)

	t.Run("matrix", func(t *testing.T) {
		t.Parallel()
		sources := []struct {
			name  string
			src   auth.Source
			roles []string // roles the source has, each with the server method its name says
		}{
			{"superuser auth query", s.super, []string{"scram_user", "md5_user"}},
			{"setup.sql function", s.function, []string{"scram_user", "md5_user"}},
			{"userlist", s.userlist, []string{"scram_user", "md5_user", "plain_user"}},
		}
		passwords := map[string]string{"scram_user": scramPW, "md5_user": md5PW, "plain_user": plainPW}
		for _, src := range sources {
			for _, useTLS := range []bool{false, true} {
				name := src.name + "/TLS off"
				if useTLS {
					name = src.name + "/TLS on"
				}
				t.Run(name, func(t *testing.T) {
					t.Parallel()
					o := proxyOpts{server: s.c, sslmode: config.SSLDisable, auth: proxyAuth(time.Minute, src.src)}
					var extra []string
					if useTLS {
						// Clients keep libpq's and pgx's default
						// channel_binding=prefer: SCRAM roles bind to
						// rolegate's certificate, and rolegate to the server's.
						extra = s.tlsOpts(t, &o)
					}
					p := startProxy(t, o)
					t.Run("logins", func(t *testing.T) {
						for _, role := range src.roles {
							t.Run(role, func(t *testing.T) {
								t.Parallel()
								wantLoginWorks(t, p, role, passwords[role], useTLS, extra...)
							})
							t.Run(role+" wrong password", func(t *testing.T) {
								t.Parallel()
								wantRefused(t, p, role, wrongPW, "28P01", passwordFailed(role), extra...)
							})
						}
						// psql hangs up to ask for a password: not a failed login.
						t.Run("psql without a password", func(t *testing.T) {
							t.Parallel()
							_, errOut, err := psql(t, p.DSN("scram_user", "", "postgres", extra...), "", "-w", "-c", "select 1")
							if err == nil || !strings.Contains(errOut, "no password supplied") {
								t.Errorf("psql -w without a password: %v, stderr %q", err, errOut)
							}
						})
						t.Run("unknown role", func(t *testing.T) {
							t.Parallel()
							wantRefused(t, p, "no_such_role", wrongPW, "28P01", passwordFailed("no_such_role"), extra...)
						})
						// rolegate accepts the password; the server refuses the role.
						t.Run("NOLOGIN", func(t *testing.T) {
							t.Parallel()
							wantRefused(t, p, "nologin_user", nologinPW, "28000", `role "nologin_user" is not permitted to log in`, extra...)
						})
					})
					// pgx and psql for each: two wrong passwords per role,
					// two unknown roles, two NOLOGIN.
					wantFailureLines(t, p, 2*len(src.roles)+4, map[string]int{
						"wrong password":    2 * len(src.roles),
						"unknown role":      2,
						"refused by server": 2,
					})
					wantNoSecrets(t, p)
				})
			}
		}
	})

	// A server whose verifiers use another iteration count than PostgreSQL's
	// default (scram_iterations, PostgreSQL 16) gets that count in the mock
	// exchange of an unknown role too, once rolegate has seen one of its
	// verifiers: otherwise "i=4096" would tell a prober the role does not exist.
	t.Run("mock exchange offers the server's iteration count", func(t *testing.T) {
		t.Parallel()
		v := auth.NewSCRAMVerifier("iter pw", []byte("iteration count!"), 8192)
		if err := s.c.Exec(t.Context(), fmt.Sprintf("create role iter_user login password '%s'", v)); err != nil {
			t.Fatal(err)
		}
		p := startProxy(t, proxyOpts{server: s.c, sslmode: config.SSLDisable, auth: proxyAuth(time.Minute, s.super)})
		offered := func(user string) string {
			t.Helper()
			_, fe := rawLogin(t, p, user)
			receive[*pgproto3.AuthenticationSASL](t, fe)
			fe.Send(&pgproto3.SASLInitialResponse{AuthMechanism: auth.SCRAMSHA256, Data: []byte("n,,n=,r=abcdefghijklmnop")})
			if err := fe.Flush(); err != nil {
				t.Fatal(err)
			}
			parts := strings.Split(string(receive[*pgproto3.AuthenticationSASLContinue](t, fe).Data), ",")
			return parts[len(parts)-1]
		}
		if got := offered("iter_ghost_1"); got != "i=4096" {
			t.Errorf("before any verifier: unknown role offered %s, want PostgreSQL's default i=4096", got)
		}
		wantLoginWorks(t, p, "iter_user", "iter pw", false)
		if got, want := offered("iter_ghost_2"), offered("iter_user"); got != want || want != "i=8192" {
			t.Errorf("unknown role offered %s, a real one %s; want both i=8192", got, want)
		}
	})

	// The rotation scenario on a warm cache: a role logs in once through
	// rolegate, its password changes on the server, and from the next login
	// on the old password is refused and the new one accepted at the first
	// try, in either order, however long cache_ttl is: rolegate fetches the
	// secret at every login. The refusals are rolegate's own (a stale
	// verifier would have let the old password through to the server, which
	// would have refused it).
	t.Run("password changed on the server", func(t *testing.T) {
		t.Parallel()
		type step struct {
			password string // "old" or "new"
			psql     bool   // psql instead of pgx
		}
		orders := map[string][]step{
			"old then new": {{"old", false}, {"new", false}, {"old", true}, {"new", true}},
			"new then old": {{"new", false}, {"old", false}, {"new", true}, {"old", true}},
		}
		i := 0
		for _, method := range []string{"scram-sha-256", "md5", "password"} {
			for _, ttl := range []time.Duration{time.Hour, 0} {
				for _, order := range []string{"old then new", "new then old"} {
					role := fmt.Sprintf("chg_%d", i)
					i++
					t.Run(fmt.Sprintf("%s, cache_ttl %v, %s", method, ttl, order), func(t *testing.T) {
						t.Parallel()
						group := map[string]string{"md5": " in role md5_group", "password": " in role clear_group"}[method]
						q := fmt.Sprintf("create role %s login password 'old pw'%s", role, group)
						if method == "md5" {
							q = "set password_encryption = 'md5'; " + q
						}
						if err := s.c.Exec(t.Context(), q); err != nil {
							t.Fatal(err)
						}
						a := proxyAuth(ttl, s.super)
						if method == "password" {
							a.Method, a.CleartextWithoutTLS = "password", true
						}
						p := startProxy(t, proxyOpts{server: s.c, sslmode: config.SSLDisable, auth: a})
						connect(t, p.DSN(role, "old pw", "postgres")).Close(t.Context()) // warms the cache

						s.setPassword(t, role, "new pw", method == "md5")
						for i, st := range orders[order] {
							wantStep(t, p, role, st.password+" pw", st.password == "new", st.psql, fmt.Sprintf("step %d", i+1))
						}
						wantFailureLines(t, p, 2, map[string]int{"wrong password": 2})
						wantNoSecrets(t, p, "old pw", "new pw")
					})
				}
			}
		}
	})

	// A change of the secret's kind on a warm cache. md5 to SCRAM (moving
	// a server to scram-sha-256) works at the next login: an md5 role's
	// login waits for its fresh secret before asking the client. SCRAM to
	// md5 costs one refused login: a SCRAM role is asked for SCRAM before
	// its fresh secret arrives, and an md5 hash cannot check a SCRAM proof.
	t.Run("password type changed on the server", func(t *testing.T) {
		t.Parallel()
		for _, tt := range []struct {
			role, from, to string
			firstOK        bool
		}{
			{"kind_up", "md5", "scram-sha-256", true},
			{"kind_down", "scram-sha-256", "md5", false},
		} {
			t.Run(tt.from+" to "+tt.to, func(t *testing.T) {
				t.Parallel()
				// md5_group logs in with md5 on the server, which accepts either kind.
				q := fmt.Sprintf("set password_encryption = '%s'; create role %s login password 'old pw' in role md5_group", tt.from, tt.role)
				if err := s.c.Exec(t.Context(), q); err != nil {
					t.Fatal(err)
				}
				p := startProxy(t, proxyOpts{server: s.c, sslmode: config.SSLDisable, auth: proxyAuth(time.Hour, s.super)})
				connect(t, p.DSN(tt.role, "old pw", "postgres")).Close(t.Context())
				s.setPassword(t, tt.role, "new pw", tt.to == "md5")
				if got := s.stored(t, tt.role); !strings.HasPrefix(strings.ToLower(got), strings.ToLower(strings.TrimSuffix(tt.to, "-sha-256"))) {
					t.Fatalf("stored secret is not %s", tt.to)
				}
				if !tt.firstOK {
					wantStep(t, p, tt.role, "new pw", false, false, "first login after the change")
					// Logged once the client has been told.
					waitUntil(t, 30*time.Second, `reason="password type changed" in the log`, func() bool {
						return strings.Contains(p.logs.String(), `reason="password type changed"`)
					})
				}
				wantStep(t, p, tt.role, "new pw", true, false, "login after the change")
				wantStep(t, p, tt.role, "old pw", false, true, "old password")
			})
		}
	})

	t.Run("8 concurrent logins of one role, cold cache", func(t *testing.T) {
		t.Parallel()
		p := startProxy(t, proxyOpts{server: s.c, sslmode: config.SSLDisable, auth: proxyAuth(time.Minute, s.function)})
		var wg sync.WaitGroup
		start := make(chan struct{})
		errs := make(chan error, 8)
		for range 8 {
			wg.Go(func() {
				<-start
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				c, err := pgx.Connect(ctx, p.DSN("scram_user", scramPW, "postgres"))
				if err != nil {
					errs <- err
					return
				}
				defer c.Close(ctx)
				var user string
				if err := c.QueryRow(ctx, "select current_user").Scan(&user); err != nil || user != "scram_user" {
					errs <- fmt.Errorf("current_user %q, %v", user, err)
				}
			})
		}
		close(start)
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		if n := strings.Count(p.logs.String(), `msg=login `); n != 8 {
			t.Errorf("%d login lines, want 8", n)
		}
	})

	// A role without a password gets the wrong-password error, even where the
	// server itself would let it in (nopw_user is trusted): rolegate has
	// nothing to check the client against, and never lets an unchecked
	// client through to the server.
	t.Run("a role without a password is refused", func(t *testing.T) {
		t.Parallel()
		direct := connect(t, s.c.DSN("nopw_user", "", "postgres"))
		direct.Close(t.Context())
		for _, src := range []struct {
			name   string
			src    auth.Source
			reason string
		}{
			{"superuser auth query", s.super, "role has no password"},
			{"setup.sql function", s.function, "role has no password"},
			{"userlist", s.userlist, "unknown role"},
		} {
			t.Run(src.name, func(t *testing.T) {
				t.Parallel()
				p := startProxy(t, proxyOpts{server: s.c, sslmode: config.SSLDisable, auth: proxyAuth(time.Minute, src.src)})
				wantRefused(t, p, "nopw_user", "anything", "28P01", passwordFailed("nopw_user"))
				wantFailureLines(t, p, 2, map[string]int{src.reason: 2})
			})
		}
	})

	t.Run("authentication timeout", func(t *testing.T) {
		t.Parallel()
		// Long enough for the exchange up to where each client stops (the
		// verifier comes from the server) on a busy machine.
		const timeout = 5 * time.Second
		p := startProxy(t, proxyOpts{server: s.c, sslmode: config.SSLDisable, startupTimeout: timeout,
			auth: proxyAuth(time.Minute, s.super)})
		t.Run("clients", func(t *testing.T) {
			for _, tt := range []struct {
				name, user string
				answer     func(*testing.T, *pgproto3.Frontend) // how far the client gets
			}{
				{"never answers AuthenticationSASL", "scram_user", func(t *testing.T, fe *pgproto3.Frontend) {
					receive[*pgproto3.AuthenticationSASL](t, fe)
				}},
				{"never sends its SCRAM proof", "scram_user", func(t *testing.T, fe *pgproto3.Frontend) {
					receive[*pgproto3.AuthenticationSASL](t, fe)
					fe.Send(&pgproto3.SASLInitialResponse{AuthMechanism: auth.SCRAMSHA256, Data: []byte("n,,n=,r=abcdefghijklmnop")})
					if err := fe.Flush(); err != nil {
						t.Fatal(err)
					}
					receive[*pgproto3.AuthenticationSASLContinue](t, fe)
				}},
				{"never answers AuthenticationMD5Password", "md5_user", func(t *testing.T, fe *pgproto3.Frontend) {
					receive[*pgproto3.AuthenticationMD5Password](t, fe)
				}},
			} {
				t.Run(tt.name, func(t *testing.T) {
					t.Parallel()
					start := time.Now()
					_, fe := rawLogin(t, p, tt.user)
					tt.answer(t, fe)
					m, err := fe.Receive()
					if err == nil {
						t.Fatalf("got %T %+v, want the connection closed", m, m)
					}
					var ne net.Error
					if errors.As(err, &ne) && ne.Timeout() {
						t.Fatalf("rolegate did not close the connection: %v", err)
					}
					// start precedes the connection: never early, however slow the machine.
					if elapsed := time.Since(start); elapsed < timeout {
						t.Errorf("closed after %v, before the timeout %v", elapsed, timeout)
					}
				})
			}
		})
		wantFailureLines(t, p, 3, map[string]int{"authentication timeout": 3})
	})

	// channel_binding=require works on both legs (TestChannelBindingMatrix
	// has every client setting; TestSCRAMRefusalsLikeServer the refusals).
	t.Run("channel binding", func(t *testing.T) {
		t.Parallel()
		o := proxyOpts{server: s.c, sslmode: config.SSLDisable, auth: proxyAuth(time.Minute, s.super)}
		extra := s.tlsOpts(t, &o)
		p := startProxy(t, o)
		wantLoginWorks(t, p, "scram_user", scramPW, true, append(extra, "channel_binding=require", "application_name=bound")...)
		waitUntil(t, 30*time.Second, "two bound logins in the log", func() bool {
			return strings.Count(p.logs.String(), "application_name=bound client_tls=true server_tls=true server_auth=SCRAM-SHA-256-PLUS ") == 2
		})
		// A client bound to another certificate proves nothing about this
		// connection (a relay in between): refused as PostgreSQL refuses it.
		c, fe, _ := saslStart(t, p.Addr(), true)
		boundToOtherCertificate(t, c, fe)
		wantFatal(t, c, "28000", "SCRAM channel binding check failed")
		wantFailureLines(t, p, 1, map[string]int{"channel binding failed": 1})
		wantNoSecrets(t, p)
	})

	// The server's password method needs the cleartext password, which only
	// [auth] method = "password" asks clients for.
	t.Run("cleartext", func(t *testing.T) {
		t.Parallel()
		t.Run("method password over TLS", func(t *testing.T) {
			t.Parallel()
			a := proxyAuth(time.Minute, s.super)
			a.Method = "password"
			o := proxyOpts{server: s.c, sslmode: config.SSLDisable, auth: a}
			extra := s.tlsOpts(t, &o)
			p := startProxy(t, o)
			// Every server method can be served from the cleartext.
			wantLoginWorks(t, p, "clear_user", passwordPW, true, extra...)
			wantLoginWorks(t, p, "scram_user", scramPW, true, extra...)
			wantLoginWorks(t, p, "md5_user", md5PW, true, extra...)
			wantRefused(t, p, "clear_user", wrongPW, "28P01", passwordFailed("clear_user"), extra...)
			// Without TLS the client is refused before it is asked for a password.
			c, _ := rawLogin(t, p, "clear_user")
			wantFatal(t, c, "28000", "rolegate accepts cleartext passwords only over TLS (see [auth] cleartext_without_tls)")
			wantFailureLines(t, p, 3, map[string]int{"wrong password": 2, "cleartext without TLS": 1})
			wantNoSecrets(t, p)
		})
		t.Run("method password without TLS, allowed", func(t *testing.T) {
			t.Parallel()
			a := proxyAuth(time.Minute, s.super)
			a.Method, a.CleartextWithoutTLS = "password", true
			p := startProxy(t, proxyOpts{server: s.c, sslmode: config.SSLDisable, auth: a})
			wantLoginWorks(t, p, "clear_user", passwordPW, false)
			wantNoSecrets(t, p)
		})
		t.Run("method md5", func(t *testing.T) {
			t.Parallel()
			a := proxyAuth(time.Minute, s.userlist, s.super)
			a.Method = "md5"
			p := startProxy(t, proxyOpts{server: s.c, sslmode: config.SSLDisable, auth: a})
			// md5 for md5 hashes and plaintext; SCRAM for SCRAM verifiers, as PostgreSQL does.
			for _, tt := range []struct {
				user, password string
				asked          func(*testing.T, *pgproto3.Frontend)
			}{
				{"md5_user", md5PW, func(t *testing.T, fe *pgproto3.Frontend) { receive[*pgproto3.AuthenticationMD5Password](t, fe) }},
				{"plain_user", plainPW, func(t *testing.T, fe *pgproto3.Frontend) { receive[*pgproto3.AuthenticationMD5Password](t, fe) }},
				{"scram_user", scramPW, func(t *testing.T, fe *pgproto3.Frontend) { receive[*pgproto3.AuthenticationSASL](t, fe) }},
			} {
				wantLoginWorks(t, p, tt.user, tt.password, false)
				_, fe := rawLogin(t, p, tt.user)
				tt.asked(t, fe)
			}
			wantNoSecrets(t, p)
		})
		t.Run("method scram-sha-256 cannot serve the password method", func(t *testing.T) {
			t.Parallel()
			p := startProxy(t, proxyOpts{server: s.c, sslmode: config.SSLDisable, auth: proxyAuth(time.Minute, s.super)})
			_, err := pgx.Connect(t.Context(), p.DSN("clear_user", passwordPW, "postgres"))
			wantPgError(t, err, "FATAL", "28000",
				`rolegate could not log in to the server as "clear_user": server asks for a cleartext password, but the client did not send one to rolegate`)
			wantNoSecrets(t, p)
		})
	})
}

// The control role of sql/setup.sql cannot read verifiers other than through
// the function; a proxy whose control role lacks it fails closed.
func TestProxyAuthLookupFails(t *testing.T) {
	t.Parallel()
	ctl, err := upstream.NewControl(t.Context(), config.Control{DSN: shared.DSN("scram_user", scramPW, "postgres"), MaxConns: 1},
		config.DefaultAuthQuery)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ctl.Close)
	p := startProxy(t, proxyOpts{auth: proxyAuth(time.Minute, auth.SourceFunc(ctl.Secret))})
	_, err = pgx.Connect(t.Context(), p.DSN("scram_user", scramPW, "app"))
	wantPgError(t, err, "FATAL", "08006", "rolegate could not look up the role's password: the auth query failed")
	waitUntil(t, 30*time.Second, "the lookup failure in the log", func() bool {
		return strings.Contains(p.logs.String(), "permission denied for table pg_authid")
	})
	wantNoSecrets(t, p)
}
