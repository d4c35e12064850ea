package admin

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/limiter"
	"github.com/rolegate/rolegate/proxy"
)

// consolePSQL runs one console command with psql (unaligned, tuples only)
// and returns its standard output and error apart: notices go to stderr.
func consolePSQL(t *testing.T, r *rig, sql string) (stdout, stderr string) {
	t.Helper()
	psql, err := exec.LookPath("psql")
	if err != nil {
		t.Fatalf("psql is needed for this test: %v", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, psql, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql, r.consoleDSN("opsadmin", "ops_pw"))
	cmd.Env = append(os.Environ(), "PGCONNECT_TIMEOUT=10")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("psql %q: %v, %s", sql, err, errb.String())
	}
	return out.String(), errb.String()
}

// sessionLine is the SHOW SESSIONS line (psql -A -t) whose state is state, or "".
func sessionLine(out, state string) string {
	for line := range strings.Lines(out) {
		if f := strings.Split(strings.TrimRight(line, "\n"), "|"); len(f) == 13 && f[5] == state {
			return strings.TrimRight(line, "\n")
		}
	}
	return ""
}

// Logins in flight through the real proxy, in every admin view: a login
// waiting for a slot (SHOW SESSIONS through psql, /api/sessions, the live
// page's waiting count), a client stuck in authentication (listed without
// the name it claims, counted under role "unknown" in rolegate_sessions,
// gone once it leaves), and the waiter, once admitted, idle with its pid.
func TestInFlightLoginsInViews(t *testing.T) {
	r := startConsoleRigWith(t, rules{"lim_user": {MaxSessions: 1, Policy: limiter.PolicyWait,
		Fallback: limiter.PolicyReject, WaitTimeout: 5 * time.Minute}}, func(c *proxy.Config) {
		c.StartupTimeout = 5 * time.Minute // rolegate never ends the stuck login itself
	})
	base := startHTTP(t, Options{Proxy: r.srv, Limiter: r.limits.Limiter.Snapshot, Effective: r.limits.Effective,
		ServerSessions: r.control.Sessions, Logger: r.logger})
	held := r.connect(t, "lim_user", "lim_pw")
	heldPID := backendPID(t, held)

	type result struct {
		c   *pgx.Conn
		err error
	}
	admitted := make(chan result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		c, err := pgx.Connect(ctx, r.dsn("lim_user", "lim_pw")+" application_name=the_waiter")
		admitted <- result{c, err}
	}()
	const wantWait = `waiting for a slot of role "lim_user" (limit 1, 1st in line)`
	var waiter session
	waitFor(t, "the waiting login in /api/sessions", func() bool {
		for _, s := range getJSON[[]session](t, base+"/api/sessions") {
			if s.State == "waiting" && s.Wait == wantWait {
				waiter = s
				return true
			}
		}
		return false
	})
	if waiter.PID != 0 || waiter.Role != "lim_user" || waiter.ApplicationName != "the_waiter" || !waiter.ViaRolegate {
		t.Errorf("waiting login in /api/sessions: %+v", waiter)
	}
	p := getJSON[page](t, base+"/api/page")
	var lim *pageRole
	for i := range p.Roles {
		if p.Roles[i].Role == "lim_user" {
			lim = &p.Roles[i]
		}
	}
	if lim == nil || lim.Waiting != 1 || lim.Sessions != 1 {
		t.Errorf("/api/page role lim_user = %+v, want 1 session and 1 waiting", lim)
	}
	out, _ := consolePSQL(t, r, "show sessions")
	line := sessionLine(out, "waiting")
	if !strings.HasPrefix(line, "|lim_user|postgres|the_waiter|") || !strings.HasSuffix(line, "|true|0|0|"+wantWait+"|") {
		t.Errorf("SHOW SESSIONS: waiting login %q (want NULL pid and its wait) in\n%s", line, out)
	}
	if line := sessionLine(out, "authenticating"); line != "" {
		t.Errorf("SHOW SESSIONS lists the console's own connection: %q", line)
	}
	if !strings.HasPrefix(sessionLine(out, "idle"), fmt.Sprint(heldPID)+"|lim_user|") {
		t.Errorf("SHOW SESSIONS: the held session is not idle with pid %d in\n%s", heldPID, out)
	}

	// A raw client that claims to be the console's own user and never
	// answers the password request.
	stuck := stuckInAuthentication(t, r.addr, "opsadmin")
	var authenticating session
	waitFor(t, "the stuck login in /api/sessions", func() bool {
		for _, s := range getJSON[[]session](t, base+"/api/sessions") {
			if s.State == "authenticating" && s.ClientAddr == stuck.LocalAddr().String() {
				authenticating = s
				return true
			}
		}
		return false
	})
	if authenticating.PID != 0 || authenticating.Role != "" || authenticating.Database != "" ||
		authenticating.ApplicationName != "" || authenticating.Wait != "" {
		t.Errorf("unauthenticated login in /api/sessions: %+v; want no pid and no claimed names", authenticating)
	}
	out, _ = consolePSQL(t, r, "show sessions")
	if line := sessionLine(out, "authenticating"); !strings.HasPrefix(line, "||||"+stuck.LocalAddr().String()+"|") {
		t.Errorf("SHOW SESSIONS: unauthenticated login %q in\n%s", line, out)
	}
	if strings.Contains(out, "claimed") {
		t.Errorf("SHOW SESSIONS shows what an unauthenticated client claims:\n%s", out)
	}
	if n := metric(t, base, "rolegate_sessions", "role", proxy.RoleUnknown, "database", proxy.RoleUnknown, "state", "authenticating"); n != 1 {
		t.Errorf("rolegate_sessions{role=unknown,state=authenticating} = %v, want 1", n)
	}
	if n := metric(t, base, "rolegate_sessions", "role", "lim_user", "state", "waiting"); n != 1 {
		t.Errorf("rolegate_sessions{role=lim_user,state=waiting} = %v, want 1", n)
	}
	stuck.Close()
	waitFor(t, "the stuck login to be gone", func() bool {
		for _, s := range getJSON[[]session](t, base+"/api/sessions") {
			if s.State == "authenticating" {
				return false
			}
		}
		return true
	})

	held.Close(t.Context())
	res := <-admitted
	if res.err != nil {
		t.Fatalf("the waiter: %v", res.err)
	}
	defer res.c.Close(context.Background())
	pid := backendPID(t, res.c)
	waitFor(t, "the admitted waiter idle with its pid in /api/sessions", func() bool {
		for _, s := range getJSON[[]session](t, base+"/api/sessions") {
			if s.ApplicationName == "the_waiter" {
				return s.State == "idle" && s.PID == pid && s.Wait == ""
			}
		}
		return false
	})
}

// stuckInAuthentication connects to the proxy at addr as a raw client that
// sends a startup packet for user (database claimed_db, application_name
// claimed_app), reads the password request (SCRAM) and never answers it.
// The caller closes it (cleanup closes it too).
func stuckInAuthentication(t *testing.T, addr, user string) net.Conn {
	t.Helper()
	stuck, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stuck.Close() })
	_ = stuck.SetDeadline(time.Now().Add(2 * time.Minute))
	startup := &pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30,
		Parameters: map[string]string{"user": user, "database": "claimed_db", "application_name": "claimed_app"}}
	raw, err := startup.Encode(nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stuck.Write(raw); err != nil {
		t.Fatal(err)
	}
	var head [9]byte // 'R', length, code: AuthenticationSASL (10)
	if _, err := io.ReadFull(stuck, head[:]); err != nil || head[0] != 'R' || binary.BigEndian.Uint32(head[5:]) != 10 {
		t.Fatalf("password request: %q, %v", head, err)
	}
	return stuck
}

// listProxy serves a fixed list of sessions.
type listProxy struct{ sessions []proxy.SessionInfo }

func (p *listProxy) Sessions() []proxy.SessionInfo                    { return p.sessions }
func (*listProxy) Events() []proxy.Event                              { return nil }
func (*listProxy) History(context.Context, int) []proxy.Event         { return nil }
func (*listProxy) Kill(context.Context, uint32, string) (bool, error) { return false, nil }

// What the views make of logins in flight: the wait field in JSON (absent
// when there is nothing to wait for), logins in flight counted apart from
// sessions, and a flood of unauthenticated connections listed only up to
// maxUnverifiedListed in SHOW SESSIONS and the page (the API lists all).
func TestInFlightViews(t *testing.T) {
	start := time.Now().Add(-time.Hour)
	const flood = maxUnverifiedListed + 10
	var infos []proxy.SessionInfo
	for i := range flood {
		infos = append(infos, proxy.SessionInfo{ID: uint64(i + 1), ClientAddr: fmt.Sprintf("10.0.0.%d:5000", i),
			State: proxy.StateAuthenticating, Start: start.Add(time.Duration(i) * time.Second)})
	}
	wait := `waiting for a slot of role "app" (limit 2, 3rd in line)`
	infos = append(infos,
		proxy.SessionInfo{ID: 100, Verified: true, User: "app", Database: "db", State: proxy.StateWaiting, Wait: wait, Start: start},
		proxy.SessionInfo{ID: 101, Verified: true, User: "app", Database: "db", BackendPID: 4242, State: proxy.StateIdle, Start: start},
		proxy.SessionInfo{ID: 102, Verified: true, User: "app", Database: "db", BackendPID: 4243, State: proxy.StateConnecting, Start: start})
	opts := Options{Proxy: &listProxy{infos}}
	base := startHTTP(t, opts)

	_, body := call(t, "GET", base+"/api/sessions", "")
	var raw []map[string]any
	if err := json.Unmarshal([]byte(body), &raw); err != nil {
		t.Fatal(err)
	}
	if len(raw) != len(infos) {
		t.Errorf("/api/sessions lists %d sessions, want all %d", len(raw), len(infos))
	}
	for _, s := range raw {
		w, has := s["wait"]
		if s["state"] == "waiting" && w != wait || s["state"] != "waiting" && has {
			t.Errorf("/api/sessions: %v", s)
		}
	}

	p := getJSON[page](t, base+"/api/page")
	if len(p.Sessions) != maxUnverifiedListed+3 || p.Unlisted != 10 {
		t.Errorf("/api/page lists %d sessions and %d unlisted, want %d and 10", len(p.Sessions), p.Unlisted, maxUnverifiedListed+3)
	}
	if len(p.Roles) != 1 || p.Roles[0].Role != "app" || p.Roles[0].Sessions != 1 || p.Roles[0].Waiting != 1 {
		t.Errorf("/api/page roles %+v, want app with 1 session (not the connecting login) and 1 waiting", p.Roles)
	}

	cc := startConsole(t, opts, "admin")
	res := cc.ok(t, "SHOW SESSIONS", "SHOW")
	if len(res.rows) != maxUnverifiedListed+3 || len(res.notices) != 1 ||
		res.notices[0] != fmt.Sprintf("10 more connections that have not authenticated yet are not listed (the %d oldest are)", maxUnverifiedListed) {
		t.Errorf("SHOW SESSIONS: %d rows, notices %q", len(res.rows), res.notices)
	}
	for i := range res.rows {
		if res.cell(t, i, "state") == "waiting" && res.cell(t, i, "wait") != wait ||
			res.cell(t, i, "state") == "authenticating" && (res.cell(t, i, "role") != "NULL" || res.cell(t, i, "pid") != "NULL") {
			t.Errorf("SHOW SESSIONS row %d: %v", i, res.rows[i])
		}
	}
	res = cc.ok(t, "SHOW STATS", "SHOW")
	if res.cell(t, 0, "sessions") != "1" || res.cell(t, 0, "waiting") != "1" {
		t.Errorf("SHOW STATS: sessions %s waiting %s, want 1 and 1", res.cell(t, 0, "sessions"), res.cell(t, 0, "waiting"))
	}
	res = cc.ok(t, "SHOW DATABASES", "SHOW")
	if len(res.rows) != 1 || res.cell(t, 0, "database") != "db" || res.cell(t, 0, "sessions_via_rolegate") != "1" || res.cell(t, 0, "waiting") != "1" {
		t.Errorf("SHOW DATABASES: %+v", res.rows)
	}
	cc.send(t, &pgproto3.Terminate{})
	_ = cc.conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := cc.fe.Receive(); err == nil {
		t.Fatal("console answered after Terminate")
	}
}
