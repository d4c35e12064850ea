package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"go.uber.org/goleak"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/config"
	"github.com/rolegate/rolegate/internal/pgtest"
	"github.com/rolegate/rolegate/internal/testutil"
	"github.com/rolegate/rolegate/limiter"
	"github.com/rolegate/rolegate/proxy"
	"github.com/rolegate/rolegate/upstream"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const testToken = "t0ken-that-must-never-be-logged"

// rules gives the roles in the map their rule, and everyone else no limit.
type rules map[string]limiter.Rule

func (r rules) RoleRule(role string) limiter.Rule {
	if rule, ok := r[role]; ok {
		return rule
	}
	return limiter.NoLimit()
}

func (rules) DatabaseRule(string) limiter.Rule { return limiter.NoLimit() }

// rig is a real proxy in proxy-auth mode with limits in front of a throwaway
// cluster, with the control connection it uses.
type rig struct {
	cluster *pgtest.Cluster
	control *upstream.Control
	limits  *proxy.Limits
	srv     *proxy.Server
	addr    string
	logs    *testutil.SyncBuffer
	logger  *slog.Logger
}

func startRig(t *testing.T, roleRules rules) *rig {
	t.Helper()
	return startRigWith(t, roleRules, nil)
}

// startRigWith is startRig with a last word on the proxy's Config.
func startRigWith(t *testing.T, roleRules rules, adjust func(*proxy.Config)) *rig {
	t.Helper()
	c := pgtest.Start(t, pgtest.Options{})
	ctl, err := upstream.NewControl(t.Context(), config.Control{DSN: c.SuperDSN(), MaxConns: 2}, config.DefaultAuthQuery)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ctl.Close)
	d, err := upstream.NewDialer(config.Server{Address: c.Addr(), SSLMode: config.SSLDisable, ConnectTimeout: "5s"})
	if err != nil {
		t.Fatal(err)
	}
	lim := &proxy.Limits{Limiter: limiter.New(time.Now), Server: ctl}
	lim.SetRules(roleRules, true, 0)
	logs := &testutil.SyncBuffer{}
	logger := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cfg := proxy.Config{
		Upstream:       d,
		Auth:           &proxy.ClientAuth{Store: auth.NewStore(100, time.Minute, auth.SourceFunc(ctl.Secret)), Method: "scram-sha-256"},
		Limits:         lim,
		StartupTimeout: 10 * time.Second,
		Logger:         logger,
	}
	if adjust != nil {
		adjust(&cfg)
	}
	srv := proxy.New(cfg)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-done; !errors.Is(err, proxy.ErrServerClosed) {
			t.Errorf("proxy Serve returned %v", err)
		}
		if t.Failed() {
			t.Logf("log:\n%s", logs.String())
		}
	})
	return &rig{cluster: c, control: ctl, limits: lim, srv: srv, addr: ln.Addr().String(), logs: logs, logger: logger}
}

// dsn is a connection string through the proxy.
func (r *rig) dsn(user, password string) string {
	host, port, _ := net.SplitHostPort(r.addr)
	return fmt.Sprintf("host=%s port=%s user=%s password=%s dbname=postgres sslmode=disable", host, port, user, password)
}

func (r *rig) connect(t *testing.T, user, password string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, r.dsn(user, password))
	if err != nil {
		t.Fatalf("connect as %s through rolegate: %v", user, err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// startHTTP serves opts on a loopback port and returns its base URL; the
// test's cleanup stops it and checks that Serve returned.
func startHTTP(t *testing.T, opts Options) string {
	t.Helper()
	h := New(opts)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- h.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := h.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := h.Close(); err != nil {
			t.Errorf("Close after Shutdown: %v", err)
		}
		if err := h.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
		if err := <-done; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("Serve returned %v, want http.ErrServerClosed", err)
		}
	})
	return "http://" + ln.Addr().String()
}

// client keeps no idle connections, so no goroutine outlives a test.
var client = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 20 * time.Second}

// call makes one request; token "" sends no Authorization header.
func call(t *testing.T, method, url, token string) (int, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(body)
}

func want(t *testing.T, method, url, token string, status int, bodyPart string) string {
	t.Helper()
	got, body := call(t, method, url, token)
	if got != status || !strings.Contains(body, bodyPart) {
		t.Fatalf("%s %s: %d %q, want %d with %q", method, url, got, body, status, bodyPart)
	}
	return body
}

func getJSON[T any](t *testing.T, url string) T {
	t.Helper()
	body := want(t, http.MethodGet, url, "", http.StatusOK, "")
	var v T
	if err := json.Unmarshal([]byte(body), &v); err != nil {
		t.Fatalf("GET %s: %v in %q", url, err, body)
	}
	return v
}

// metric sums the samples of name whose labels include the given ones
// (label, value, label, value ...); 0 when there is none.
func metric(t *testing.T, base, name string, labels ...string) float64 {
	t.Helper()
	body := want(t, http.MethodGet, base+"/metrics", "", http.StatusOK, "")
	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("/metrics does not parse: %v\n%s", err, body)
	}
	f := families[name]
	if f == nil {
		return 0
	}
	if f.GetHelp() == "" {
		t.Errorf("%s has no HELP", name)
	}
	var sum float64
next:
	for _, m := range f.GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		for i := 0; i+1 < len(labels); i += 2 {
			if have[labels[i]] != labels[i+1] {
				continue next
			}
		}
		switch {
		case m.Gauge != nil:
			sum += m.GetGauge().GetValue()
		case m.Counter != nil:
			sum += m.GetCounter().GetValue()
		}
	}
	return sum
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func wantTerminated(t *testing.T, c *pgx.Conn, what string) {
	t.Helper()
	_, err := c.Exec(t.Context(), "select 1")
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "57P01" {
		t.Fatalf("%s: got %v, want 57P01", what, err)
	}
}

func backendPID(t *testing.T, c *pgx.Conn) uint32 {
	t.Helper()
	var pid uint32
	if err := c.QueryRow(t.Context(), "select pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	return pid
}

// The whole surface against a real proxy, real clients and a real server:
// probes, metrics moving with sessions and an eviction, the JSON API, kills
// and reloads with and without the token, wrong methods.
func TestHTTP(t *testing.T) {
	r := startRig(t, rules{"lim_user": {MaxSessions: 1, Policy: limiter.PolicyNewestWins, Fallback: limiter.PolicyReject}})
	if err := r.cluster.Exec(t.Context(), "create role lim_user login password 'lim_pw'"); err != nil {
		t.Fatal(err)
	}
	var reloadErr atomic.Pointer[error]
	var reloadedBy atomic.Value
	base := startHTTP(t, Options{
		Proxy:   r.srv,
		Limiter: r.limits.Limiter.Snapshot,
		Ready:   PingReady(r.control),
		Reload: func(by string) error {
			reloadedBy.Store(by)
			if p := reloadErr.Load(); p != nil {
				return *p
			}
			return nil
		},
		Token:  testToken,
		Logger: r.logger,
	})

	t.Run("probes", func(t *testing.T) {
		want(t, http.MethodGet, base+"/healthz", "", http.StatusOK, "ok")
		want(t, http.MethodGet, base+"/readyz", "", http.StatusOK, "ready")
	})

	t.Run("wrong method", func(t *testing.T) {
		for _, c := range []struct{ method, path string }{
			{http.MethodPost, "/healthz"},
			{http.MethodPost, "/metrics"},
			{http.MethodDelete, "/api/sessions"},
			{http.MethodGet, "/api/reload"},
			{http.MethodGet, "/api/sessions/1/terminate"},
		} {
			if got, body := call(t, c.method, base+c.path, testToken); got != http.StatusMethodNotAllowed {
				t.Errorf("%s %s: %d %q, want 405", c.method, c.path, got, body)
			}
		}
		want(t, http.MethodGet, base+"/nothing-here", "", http.StatusNotFound, "")
	})

	if n := metric(t, base, "rolegate_sessions", "role", "lim_user"); n != 0 {
		t.Fatalf("rolegate_sessions{role=lim_user} = %v before any login", n)
	}

	first := r.connect(t, "lim_user", "lim_pw")
	firstPID := backendPID(t, first)
	t.Run("a session", func(t *testing.T) {
		waitFor(t, "the session in rolegate_sessions", func() bool {
			return metric(t, base, "rolegate_sessions", "role", "lim_user", "database", "postgres", "state", "idle") == 1
		})
		if n := metric(t, base, "rolegate_admitted_total", "role", "lim_user", "policy", "newest-wins"); n != 1 {
			t.Errorf("rolegate_admitted_total = %v, want 1", n)
		}
		if n := metric(t, base, "rolegate_session_bytes", "role", "lim_user", "direction", "out"); n <= 0 {
			t.Errorf("rolegate_session_bytes{direction=out} = %v, want > 0", n)
		}
		sessions := getJSON[[]session](t, base+"/api/sessions")
		if len(sessions) != 1 || sessions[0].PID != firstPID || sessions[0].Role != "lim_user" ||
			sessions[0].Database != "postgres" || sessions[0].State != "idle" || sessions[0].ClientAddr == "" {
			t.Errorf("/api/sessions = %+v, want lim_user's session with pid %d", sessions, firstPID)
		}
	})

	second := r.connect(t, "lim_user", "lim_pw") // newest wins: first is evicted
	secondPID := backendPID(t, second)
	t.Run("an eviction", func(t *testing.T) {
		wantTerminated(t, first, "the evicted session")
		waitFor(t, "one lim_user session left", func() bool {
			return metric(t, base, "rolegate_sessions", "role", "lim_user") == 1
		})
		if n := metric(t, base, "rolegate_evictions_total", "role", "lim_user", "policy", "newest-wins"); n != 1 {
			t.Errorf("rolegate_evictions_total = %v, want 1", n)
		}
		events := getJSON[[]event](t, base+"/api/evictions")
		if len(events) == 0 || events[0].Kind != "eviction" || events[0].VictimPID != firstPID ||
			events[0].Policy != "newest-wins" || !events[0].ViaRolegate {
			t.Errorf("/api/evictions = %+v, want the eviction of pid %d first", events, firstPID)
		}
		roles := getJSON[[]role](t, base+"/api/roles")
		if len(roles) != 1 || roles[0].Role != "lim_user" || roles[0].Sessions != 1 || len(roles[0].Policies) != 1 ||
			roles[0].Policies[0].Evictions != 1 || roles[0].Policies[0].Admitted != 2 {
			t.Errorf("/api/roles = %+v", roles)
		}
	})

	t.Run("terminate", func(t *testing.T) {
		url := fmt.Sprintf("%s/api/sessions/%d/terminate", base, secondPID)
		want(t, http.MethodPost, url, "", http.StatusUnauthorized, "bearer token")
		want(t, http.MethodPost, url, "wrong", http.StatusUnauthorized, "bearer token")
		if err := second.Ping(t.Context()); err != nil {
			t.Fatalf("a refused terminate touched the session: %v", err)
		}
		want(t, http.MethodPost, base+"/api/sessions/abc/terminate", testToken, http.StatusBadRequest, "invalid pid")
		body := want(t, http.MethodPost, url, testToken, http.StatusOK, `"terminated": true`)
		t.Logf("terminate: %s", body)
		wantTerminated(t, second, "the terminated session")
		waitFor(t, "no lim_user session", func() bool {
			return metric(t, base, "rolegate_sessions", "role", "lim_user") == 0
		})
		want(t, http.MethodPost, url, testToken, http.StatusNotFound, "no server backend")
		events := getJSON[[]event](t, base+"/api/evictions")
		if len(events) == 0 || events[0].Kind != "kill" || events[0].VictimPID != secondPID ||
			!strings.Contains(events[0].Reason, "http api from 127.0.0.1:") {
			t.Errorf("/api/evictions = %+v, want the kill of pid %d first", events, secondPID)
		}
		if !strings.Contains(r.logs.String(), `by="http api from 127.0.0.1:`) {
			t.Errorf("no kill log line naming the caller:\n%s", r.logs.String())
		}
	})

	t.Run("reload", func(t *testing.T) {
		want(t, http.MethodPost, base+"/api/reload", "", http.StatusUnauthorized, "")
		want(t, http.MethodPost, base+"/api/reload", testToken, http.StatusOK, `"reloaded": true`)
		if by, _ := reloadedBy.Load().(string); !strings.HasPrefix(by, "http api from 127.0.0.1:") {
			t.Errorf("reload was asked by %q", by)
		}
		broken := errors.New("proxy.toml:3: limits.policy: invalid policy")
		reloadErr.Store(&broken)
		want(t, http.MethodPost, base+"/api/reload", testToken, http.StatusUnprocessableEntity, broken.Error())
	})

	t.Run("no token configured", func(t *testing.T) {
		open := startHTTP(t, Options{Proxy: r.srv, Reload: func(string) error { return nil }, Logger: r.logger})
		want(t, http.MethodPost, open+"/api/reload", testToken, http.StatusForbidden, "no admin token configured")
		want(t, http.MethodPost, open+"/api/sessions/1/terminate", "", http.StatusForbidden, "no admin token configured")
		want(t, http.MethodGet, open+"/api/roles", "", http.StatusOK, "[]") // no limiter: no counters
	})

	t.Run("readiness by dialing", func(t *testing.T) {
		live, err := upstream.NewDialer(config.Server{Address: r.cluster.Addr(), SSLMode: config.SSLDisable, ConnectTimeout: "5s"})
		if err != nil {
			t.Fatal(err)
		}
		up := startHTTP(t, Options{Proxy: r.srv, Ready: DialReady(live)})
		want(t, http.MethodGet, up+"/readyz", "", http.StatusOK, "ready")

		dead, err := upstream.NewDialer(config.Server{Address: testutil.ClosedAddr(t), SSLMode: config.SSLDisable, ConnectTimeout: "5s"})
		if err != nil {
			t.Fatal(err)
		}
		down := startHTTP(t, Options{Proxy: r.srv, Ready: DialReady(dead)})
		want(t, http.MethodGet, down+"/readyz", "", http.StatusServiceUnavailable, "not ready")
	})

	t.Run("not ready once the server is gone", func(t *testing.T) {
		if err := r.cluster.Close(); err != nil {
			t.Fatal(err)
		}
		want(t, http.MethodGet, base+"/readyz", "", http.StatusServiceUnavailable, "not ready: control connection")
		want(t, http.MethodGet, base+"/healthz", "", http.StatusOK, "ok")
	})

	if strings.Contains(r.logs.String(), testToken) {
		t.Errorf("the admin token reached the log:\n%s", r.logs.String())
	}
}

// Terminating needs the control connection: a proxy without limits answers
// 503 with proxy.ErrNoControl's message.
func TestTerminateWithoutControl(t *testing.T) {
	d, err := upstream.NewDialer(config.Server{Address: testutil.ClosedAddr(t), SSLMode: config.SSLDisable, ConnectTimeout: "1s"})
	if err != nil {
		t.Fatal(err)
	}
	srv := proxy.New(proxy.Config{Upstream: d, StartupTimeout: time.Second})
	defer srv.Close()
	base := startHTTP(t, Options{Proxy: srv, Token: testToken})
	want(t, http.MethodPost, base+"/api/sessions/42/terminate", testToken, http.StatusServiceUnavailable, "control connection")
	want(t, http.MethodGet, base+"/readyz", "", http.StatusOK, "ready") // no Ready func: ready
	if n := metric(t, base, "rolegate_sessions"); n != 0 {
		t.Errorf("rolegate_sessions = %v with no sessions", n)
	}
}

// Close before Serve, and twice, is safe; Serve then returns at once.
func TestCloseBeforeServe(t *testing.T) {
	h := New(Options{Proxy: proxy.New(proxy.Config{})})
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if err := h.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		t.Fatalf("Serve after Close: %v", err)
	}
}

// A login waiting for a slot shows in rolegate_waiting_logins and
// /api/roles, and the wait counters move; a rejection moves its counter.
func TestWaitingMetrics(t *testing.T) {
	r := startRig(t, rules{
		"wait_user": {MaxSessions: 1, Policy: limiter.PolicyWait, Fallback: limiter.PolicyReject, WaitTimeout: 20 * time.Second},
		"rej_user":  {MaxSessions: 0, Policy: limiter.PolicyReject, Fallback: limiter.PolicyReject},
	})
	for _, q := range []string{"create role wait_user login password 'wait_pw'", "create role rej_user login password 'rej_pw'"} {
		if err := r.cluster.Exec(t.Context(), q); err != nil {
			t.Fatal(err)
		}
	}
	base := startHTTP(t, Options{Proxy: r.srv, Limiter: r.limits.Limiter.Snapshot, Logger: r.logger})

	holder := r.connect(t, "wait_user", "wait_pw")
	type result struct {
		c   *pgx.Conn
		err error
	}
	waited := make(chan result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, r.dsn("wait_user", "wait_pw"))
		waited <- result{c, err}
	}()
	waitFor(t, "a waiting login in rolegate_waiting_logins", func() bool {
		return metric(t, base, "rolegate_waiting_logins", "role", "wait_user") == 1
	})
	roles := getJSON[[]role](t, base+"/api/roles")
	if len(roles) != 1 || roles[0].Role != "wait_user" || roles[0].Waiting != 1 {
		t.Errorf("/api/roles while waiting = %+v", roles)
	}
	holder.Close(t.Context())
	res := <-waited
	if res.err != nil {
		t.Fatalf("the waiting login: %v", res.err)
	}
	defer res.c.Close(context.Background())
	if n := metric(t, base, "rolegate_waiting_logins", "role", "wait_user"); n != 0 {
		t.Errorf("rolegate_waiting_logins = %v after the wait", n)
	}
	if n := metric(t, base, "rolegate_waits_total", "role", "wait_user", "policy", "wait"); n != 1 {
		t.Errorf("rolegate_waits_total = %v, want 1", n)
	}

	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	if c, err := pgx.Connect(ctx, r.dsn("rej_user", "rej_pw")); err == nil {
		c.Close(ctx)
		t.Fatal("rej_user got in past max_sessions = 0")
	}
	if n := metric(t, base, "rolegate_rejections_total", "role", "rej_user", "policy", "reject"); n != 1 {
		t.Errorf("rolegate_rejections_total = %v, want 1", n)
	}
	// The event is recorded once the client has been told.
	var events []event
	waitFor(t, "the rejection in /api/evictions", func() bool {
		events = getJSON[[]event](t, base+"/api/evictions")
		return len(events) > 0
	})
	if events[0].Kind != "rejection" || events[0].Role != "rej_user" {
		t.Errorf("/api/evictions = %+v, want rej_user's rejection first", events)
	}
}
