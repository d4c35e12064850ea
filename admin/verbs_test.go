package admin

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/proxy"
)

// stopLog records Shutdown calls.
type stopLog struct {
	mu    sync.Mutex
	calls []string
}

func (s *stopLog) shutdown(wait bool, by string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	w := "now"
	if wait {
		w = "wait"
	}
	s.calls = append(s.calls, w+" by "+by)
}

func (s *stopLog) list() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.calls)
}

// loginAsync logs in through the rig in the background.
func loginAsync(r *rig, user, password string) <-chan error {
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		c, err := pgx.Connect(ctx, r.dsn(user, password))
		if err == nil {
			err = c.Ping(ctx)
			c.Close(context.Background())
		}
		done <- err
	}()
	return done
}

func wantDisabled(t *testing.T, r *rig, user, password, msg string) {
	t.Helper()
	_, err := pgx.Connect(t.Context(), r.dsn(user, password))
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "55000" || pe.Message != msg || pe.Hint == "" {
		t.Fatalf("login while disabled: %#v", err)
	}
}

// end sends Terminate and waits for the console to close the connection,
// so that it ends before the test's context does.
func (cc *consoleClient) end(t *testing.T) {
	t.Helper()
	cc.send(t, &pgproto3.Terminate{})
	_ = cc.conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := cc.fe.Receive(); err == nil {
		t.Fatal("console answered after Terminate")
	}
}

// rowOf is the row whose first column is name.
func rowOf(t *testing.T, res result, name string) int {
	t.Helper()
	for i, row := range res.rows {
		if row[0] != nil && *row[0] == name {
			return i
		}
	}
	t.Fatalf("no row %q in %+v", name, res)
	return -1
}

// The verbs on the console against a real proxy: SHOW HELP, PAUSE / RESUME
// and DISABLE / ENABLE of a role and a database with their state in SHOW
// ROLES, SHOW DATABASES and SHOW SESSIONS, KILL ROLE, SHUTDOWN [WAIT], and
// the errors of bad input.
func TestConsoleVerbs(t *testing.T) {
	r := startRig(t, rules{})
	if err := r.cluster.Exec(t.Context(), "create role verb_user login password 'verb_pw'"); err != nil {
		t.Fatal(err)
	}
	stops := &stopLog{}
	cc := startConsole(t, Options{Proxy: r.srv, ServerSessions: r.control.Sessions, Shutdown: stops.shutdown,
		Logger: r.logger}, "opsadmin")

	help := cc.ok(t, "show help", "SHOW")
	if !slices.Equal(help.columns, []string{"command", "description"}) {
		t.Fatalf("show help columns %v", help.columns)
	}
	for _, verb := range []string{"SHOW HELP", "SHOW SESSIONS", "KILL <pid>", "KILL ROLE <role>", "PAUSE ROLE", "RESUME ROLE",
		"DISABLE ROLE", "ENABLE ROLE", "SET LIMIT", "SET POLICY", "EXPLAIN LOGIN", "RELOAD", "SHUTDOWN", "SHUTDOWN WAIT"} {
		if !slices.ContainsFunc(help.rows, func(row []*string) bool { return strings.HasPrefix(*row[0], verb) }) {
			t.Errorf("show help lacks %q", verb)
		}
	}

	held := r.connect(t, "verb_user", "verb_pw")

	// PAUSE ROLE: a new login waits, shown as such; RESUME lets it in.
	cc.ok(t, "pause role verb_user", "PAUSE")
	if res := cc.ok(t, "pause role verb_user", "PAUSE"); !slices.Contains(res.notices, `role "verb_user" is already paused`) {
		t.Errorf("second pause: notices %q", res.notices)
	}
	roles := cc.ok(t, "show roles", "SHOW")
	if i := rowOf(t, roles, "verb_user"); roles.cell(t, i, "paused") != "true" || roles.cell(t, i, "disabled") != "false" {
		t.Errorf("show roles while paused: %+v", roles)
	}
	waiting := loginAsync(r, "verb_user", "verb_pw")
	waitFor(t, "the paused login in show sessions", func() bool {
		res := cc.ok(t, "show sessions", "SHOW")
		for i := range res.rows {
			if res.cell(t, i, "state") == "waiting" &&
				strings.HasPrefix(res.cell(t, i, "wait"), `paused by an operator: PAUSE ROLE "verb_user" (console user opsadmin)`) {
				return true
			}
		}
		return false
	})
	if _, err := held.Exec(t.Context(), "select 1"); err != nil {
		t.Fatalf("the session opened before the pause: %v", err)
	}
	cc.ok(t, "resume role verb_user", "RESUME")
	if err := <-waiting; err != nil {
		t.Fatalf("the paused login after resume: %v", err)
	}
	if res := cc.ok(t, "RESUME ROLE verb_user", "RESUME"); !slices.Contains(res.notices, `role "verb_user" is not paused`) {
		t.Errorf("resume of a role not paused: notices %q", res.notices)
	}

	// PAUSE DATABASE shows in SHOW DATABASES, and is resumed.
	cc.ok(t, "pause database postgres", "PAUSE")
	dbs := cc.ok(t, "show databases", "SHOW")
	if i := rowOf(t, dbs, "postgres"); dbs.cell(t, i, "paused") != "true" {
		t.Errorf("show databases while paused: %+v", dbs)
	}
	waiting = loginAsync(r, "verb_user", "verb_pw")
	waitFor(t, "the login paused by its database", func() bool {
		for _, s := range r.srv.Sessions() {
			if strings.Contains(s.Wait, `PAUSE DATABASE "postgres"`) {
				return true
			}
		}
		return false
	})
	cc.ok(t, "resume database postgres", "RESUME")
	if err := <-waiting; err != nil {
		t.Fatalf("the paused login after resume: %v", err)
	}

	// DISABLE ROLE refuses; ENABLE lets in. A role that does not exist (yet)
	// may be disabled too.
	cc.ok(t, "disable role verb_user", "DISABLE")
	wantDisabled(t, r, "verb_user", "verb_pw", `logins of role "verb_user" are disabled by an operator of rolegate`)
	roles = cc.ok(t, "show roles", "SHOW")
	if i := rowOf(t, roles, "verb_user"); roles.cell(t, i, "disabled") != "true" {
		t.Errorf("show roles while disabled: %+v", roles)
	}
	if _, err := held.Exec(t.Context(), "select 1"); err != nil {
		t.Fatalf("the session opened before the disable: %v", err)
	}
	cc.ok(t, "enable role verb_user", "ENABLE")
	if res := cc.ok(t, "enable role verb_user", "ENABLE"); !slices.Contains(res.notices, `role "verb_user" is not disabled`) {
		t.Errorf("enable of a role not disabled: notices %q", res.notices)
	}
	cc.ok(t, `disable role "no such role"`, "DISABLE")
	cc.ok(t, `enable role "no such role"`, "ENABLE")
	if err := <-loginAsync(r, "verb_user", "verb_pw"); err != nil {
		t.Fatalf("login after enable: %v", err)
	}

	// KILL ROLE: both sessions end, each told why.
	second := r.connect(t, "verb_user", "verb_pw")
	// The login after ENABLE has closed; its backend may still be leaving
	// pg_stat_activity, and a KILL ROLE meanwhile would count it too.
	waitFor(t, "two sessions of verb_user on the server", func() bool {
		b, err := r.control.Sessions(t.Context(), []string{"verb_user"})
		return err == nil && len(b) == 2
	})
	kill := cc.ok(t, "kill role verb_user", "KILL")
	if len(kill.rows) != 2 {
		t.Fatalf("kill role: %+v", kill)
	}
	for _, c := range []*pgx.Conn{held, second} {
		_, err := c.Exec(t.Context(), "select 1")
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || pe.Code != "57P01" || !strings.Contains(pe.Message, "(KILL ROLE verb_user, console user opsadmin)") {
			t.Fatalf("killed session: %#v", err)
		}
	}
	if res := cc.ok(t, "kill role verb_user", "KILL"); len(res.rows) != 0 {
		t.Errorf("kill role with nothing left: %+v", res)
	}

	// Bad input: PostgreSQL's syntax error, with the list of commands.
	for _, q := range []string{"pause", "pause verb_user", "pause table verb_user", "resume role", "kill role",
		"kill role a b", "shutdown now", "disable role a b"} {
		if e := cc.fails(t, q, "42601", "syntax error"); !strings.Contains(e.Hint, "PAUSE | RESUME | DISABLE | ENABLE") {
			t.Errorf("%q: hint %q", q, e.Hint)
		}
	}

	// SHUTDOWN answers, then asks; WAIT drains.
	cc.ok(t, "shutdown wait", "SHUTDOWN")
	cc.ok(t, "SHUTDOWN", "SHUTDOWN")
	waitFor(t, "both shutdowns asked for", func() bool { return len(stops.list()) == 2 })
	if got := stops.list(); !slices.Equal(got, []string{"wait by console user opsadmin", "now by console user opsadmin"}) {
		t.Errorf("shutdown calls %q", got)
	}
	if !strings.Contains(r.logs.String(), `msg="paused new logins" scope=role name=verb_user by="console user opsadmin"`) ||
		!strings.Contains(r.logs.String(), `msg="killed the sessions of a role" role=verb_user by="console user opsadmin" killed=2`) {
		t.Errorf("log lacks the verbs:\n%s", r.logs.String())
	}
	cc.end(t)
}

// Without a proxy that can pause, or a Shutdown, the verbs say so.
func TestConsoleVerbsUnavailable(t *testing.T) {
	cc := startConsole(t, Options{Proxy: fakeProxy{}}, "opsadmin")
	for _, q := range []string{"pause role x", "resume database x", "disable role x", "enable role x", "kill role x", "shutdown"} {
		cc.fails(t, q, "55000", "not available")
	}
	cc.ok(t, "show help", "SHOW")
	cc.end(t)
}

// The verbs over HTTP: each needs the token, and does what the console does.
func TestHTTPVerbs(t *testing.T) {
	r := startRig(t, rules{})
	if err := r.cluster.Exec(t.Context(), "create role verb_user login password 'verb_pw'"); err != nil {
		t.Fatal(err)
	}
	stops := &stopLog{}
	base := startHTTP(t, Options{Proxy: r.srv, Token: testToken, Shutdown: stops.shutdown, Logger: r.logger})
	noToken := startHTTP(t, Options{Proxy: r.srv, Shutdown: stops.shutdown, Logger: r.logger})
	paths := []string{"/api/roles/verb_user/pause", "/api/roles/verb_user/resume", "/api/roles/verb_user/disable",
		"/api/roles/verb_user/enable", "/api/roles/verb_user/kill", "/api/databases/postgres/pause",
		"/api/databases/postgres/resume", "/api/databases/postgres/disable", "/api/databases/postgres/enable", "/api/shutdown"}
	for _, p := range paths {
		want(t, http.MethodPost, base+p, "", http.StatusUnauthorized, "bearer token")
		want(t, http.MethodPost, base+p, "wrong", http.StatusUnauthorized, "bearer token")
		want(t, http.MethodPost, noToken+p, testToken, http.StatusForbidden, "no admin token")
		if got, _ := call(t, http.MethodGet, base+p, testToken); got != http.StatusMethodNotAllowed {
			t.Errorf("GET %s: %d, want 405", p, got)
		}
	}
	if len(r.srv.Gates()) != 0 || len(stops.list()) != 0 {
		t.Fatalf("a refused request acted: %+v %q", r.srv.Gates(), stops.list())
	}

	roleState := func() role {
		for _, ro := range getJSON[[]role](t, base+"/api/roles") {
			if ro.Role == "verb_user" {
				return ro
			}
		}
		return role{}
	}
	held := r.connect(t, "verb_user", "verb_pw")
	body := want(t, http.MethodPost, base+"/api/roles/verb_user/pause", testToken, http.StatusOK, `"paused": true`)
	var ans map[string]any
	if err := json.Unmarshal([]byte(body), &ans); err != nil || ans["role"] != "verb_user" || ans["changed"] != true {
		t.Fatalf("pause answer %s: %v", body, err)
	}
	if !roleState().Paused {
		t.Errorf("/api/roles does not show the pause")
	}
	waiting := loginAsync(r, "verb_user", "verb_pw")
	waitFor(t, "the paused login", func() bool {
		for _, s := range r.srv.Sessions() {
			if s.State == proxy.StateWaiting && strings.Contains(s.Wait, "paused by an operator") {
				return true
			}
		}
		return false
	})
	want(t, http.MethodPost, base+"/api/roles/verb_user/resume", testToken, http.StatusOK, `"changed": true`)
	if err := <-waiting; err != nil {
		t.Fatalf("the paused login after resume: %v", err)
	}
	want(t, http.MethodPost, base+"/api/roles/verb_user/resume", testToken, http.StatusOK, `"changed": false`)

	want(t, http.MethodPost, base+"/api/roles/verb_user/disable", testToken, http.StatusOK, `"disabled": true`)
	wantDisabled(t, r, "verb_user", "verb_pw", `logins of role "verb_user" are disabled by an operator of rolegate`)
	if !roleState().Disabled {
		t.Errorf("/api/roles does not show the disable")
	}
	want(t, http.MethodPost, base+"/api/roles/verb_user/enable", testToken, http.StatusOK, `"disabled": false`)

	want(t, http.MethodPost, base+"/api/databases/postgres/disable", testToken, http.StatusOK, `"database": "postgres"`)
	wantDisabled(t, r, "verb_user", "verb_pw", `logins to database "postgres" are disabled by an operator of rolegate`)
	want(t, http.MethodPost, base+"/api/databases/postgres/enable", testToken, http.StatusOK, `"disabled": false`)
	want(t, http.MethodPost, base+"/api/databases/postgres/pause", testToken, http.StatusOK, `"paused": true`)
	want(t, http.MethodPost, base+"/api/databases/postgres/resume", testToken, http.StatusOK, `"paused": false`)
	if len(r.srv.Gates()) != 0 {
		t.Fatalf("holds left: %+v", r.srv.Gates())
	}

	pid := backendPID(t, held)
	body = want(t, http.MethodPost, base+"/api/roles/verb_user/kill", testToken, http.StatusOK, `"terminated"`)
	var killed struct {
		Terminated []uint32 `json:"terminated"`
	}
	if err := json.Unmarshal([]byte(body), &killed); err != nil || !slices.Equal(killed.Terminated, []uint32{pid}) {
		t.Fatalf("kill answer %s (want pid %d): %v", body, pid, err)
	}
	wantTerminated(t, held, "the session of the killed role")

	want(t, http.MethodPost, base+"/api/shutdown?wait=maybe", testToken, http.StatusBadRequest, "invalid wait")
	want(t, http.MethodPost, base+"/api/shutdown?wait=1", testToken, http.StatusAccepted, `"wait": true`)
	want(t, http.MethodPost, base+"/api/shutdown", testToken, http.StatusAccepted, `"wait": false`)
	if got := stops.list(); len(got) != 2 || !strings.HasPrefix(got[0], "wait by http api from ") ||
		!strings.HasPrefix(got[1], "now by http api from ") {
		t.Errorf("shutdown calls %q", got)
	}
	// Without the proxy's holds or a Shutdown: 501.
	bare := startHTTP(t, Options{Proxy: fakeProxy{}, Token: testToken})
	for _, p := range []string{"/api/roles/x/pause", "/api/roles/x/kill", "/api/databases/x/enable", "/api/shutdown"} {
		want(t, http.MethodPost, bare+p, testToken, http.StatusNotImplemented, "not available")
	}
	if strings.Contains(r.logs.String(), testToken) {
		t.Error("the token reached the log")
	}
}
