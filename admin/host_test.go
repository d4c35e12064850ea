package admin

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rolegate/rolegate/internal/testutil"
	"github.com/rolegate/rolegate/proxy"
)

// oneSession is a proxy with one session whose kills are counted.
type oneSession struct{ kills atomic.Int32 }

func (*oneSession) Sessions() []proxy.SessionInfo {
	return []proxy.SessionInfo{{ID: 1, User: "host_user", Database: "postgres", BackendPID: 42, Start: time.Now()}}
}
func (*oneSession) Events() []proxy.Event                      { return nil }
func (*oneSession) History(context.Context, int) []proxy.Event { return nil }
func (p *oneSession) Kill(context.Context, uint32, string) (bool, error) {
	p.kills.Add(1)
	return true, nil
}

// callHost is call with the Host header set to host.
func callHost(t *testing.T, method, url, host, token string) (int, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = host
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s with Host %q: %v", method, url, host, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(body)
}

// rawRequest writes request as it is on a new connection to addr and
// returns the answer's status and body: for what Go's client never sends
// (no Host at all, an absolute URI).
func rawRequest(t *testing.T, addr, request string) (int, string) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(20 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(conn, request); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("answer to %q: %v", request, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(body)
}

// DNS rebinding: every endpoint answers only Host values that name this
// server (IP literals, localhost, the configured listen name, allowed_hosts),
// and 421 to any other name, the POST endpoints with a good token included.
func TestHostHeader(t *testing.T) {
	p := &oneSession{}
	var reloads atomic.Int32
	logs := &testutil.SyncBuffer{}
	base := startHTTP(t, Options{
		Proxy:        p,
		Token:        testToken,
		Reload:       func(string) error { reloads.Add(1); return nil },
		Logger:       slog.New(slog.NewTextHandler(logs, nil)),
		Addr:         "rolegate-admin.test:9631", // as in [admin] http; the test listens elsewhere
		AllowedHosts: []string{"rolegate.internal", "ops.example.com:8443", "10.0.0.5:9631"},
	})
	addr := strings.TrimPrefix(base, "http://")
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	paths := []string{"/api/sessions", "/metrics", "/", "/healthz", "/readyz", "/api/page", "/api/roles", "/static/page.js"}

	refused := []string{
		"evil.example.com", // first: the log line below names it
		"evil.example.com:" + port,
		"EVIL.Example.COM.:" + port,
		"localhost.evil.example.com:" + port, // a prefix is not the name
		"127.0.0.1.evil.example.com",
		"rolegate.internal.evil.example.com",
		"evilrolegate.internal",
		"ops.example.com",             // allowed on port 8443 only
		"ops.example.com:" + port,     // likewise
		"rolegate-admin.test.evil",    // the listen name is not a prefix either
		"localhost:abc",               // not a port
		"[rolegate.internal]:" + port, // brackets hold addresses
		":" + port,                    // no name
	}
	for _, host := range refused {
		for _, path := range paths {
			got, body := callHost(t, http.MethodGet, base+path, host, "")
			if got != http.StatusMisdirectedRequest || !strings.Contains(body, "allowed_hosts") || strings.Contains(body, "host_user") {
				t.Errorf("GET %s with Host %q: %d %q, want 421 naming allowed_hosts", path, host, got, body)
			}
		}
		for _, path := range []string{"/api/reload", "/api/sessions/42/terminate"} {
			for _, token := range []string{testToken, "", "wrong"} {
				if got, body := callHost(t, http.MethodPost, base+path, host, token); got != http.StatusMisdirectedRequest {
					t.Errorf("POST %s with Host %q, token %q: %d %q, want 421", path, host, token, got, body)
				}
			}
		}
		// A path or method that does not exist: the Host is refused first.
		if got, _ := callHost(t, http.MethodGet, base+"/nothing-here", host, ""); got != http.StatusMisdirectedRequest {
			t.Errorf("GET /nothing-here with Host %q: %d, want 421", host, got)
		}
		if got, _ := callHost(t, http.MethodDelete, base+"/api/sessions", host, ""); got != http.StatusMisdirectedRequest {
			t.Errorf("DELETE /api/sessions with Host %q: %d, want 421", host, got)
		}
	}
	if n, k := reloads.Load(), p.kills.Load(); n != 0 || k != 0 {
		t.Fatalf("requests with a refused Host reloaded %d times and killed %d times", n, k)
	}

	allowed := []string{
		addr,                                           // the listener's own host:port
		"127.0.0.1", "127.0.0.1:" + port, "127.0.0.1.", // IP literals, any port
		"[::1]:" + port, "[::1]", "[::1]:1",
		"10.1.2.3:" + port, "[2001:db8::7]:" + port, // a pod IP, as load balancers and kubelets send
		"localhost", "localhost:" + port, "LocalHost:" + port, "localhost.", "localhost.:" + port, "localhost:",
		"rolegate-admin.test:" + port, "ROLEGATE-ADMIN.test.", // the host of [admin] http, any port
		"rolegate.internal", "Rolegate.Internal:" + port, "rolegate.internal.:1", // allowed_hosts, a name: any port
		"ops.example.com:8443", "OPS.example.com.:8443", // allowed_hosts, name:port: that port
	}
	for _, host := range allowed {
		for _, path := range paths {
			if got, body := callHost(t, http.MethodGet, base+path, host, ""); got != http.StatusOK {
				t.Errorf("GET %s with Host %q: %d %q, want 200", path, host, got, body)
			}
		}
		if _, body := callHost(t, http.MethodGet, base+"/api/sessions", host, ""); !strings.Contains(body, `"role": "host_user"`) {
			t.Errorf("GET /api/sessions with Host %q: %q, want the session", host, body)
		}
	}

	// The token check is unchanged behind the Host check.
	for _, host := range []string{"localhost:" + port, "rolegate.internal"} {
		if got, body := callHost(t, http.MethodPost, base+"/api/reload", host, "wrong"); got != http.StatusUnauthorized {
			t.Errorf("POST /api/reload with Host %q and a wrong token: %d %q, want 401", host, got, body)
		}
	}
	if got, body := callHost(t, http.MethodPost, base+"/api/reload", "localhost:"+port, testToken); got != http.StatusOK || reloads.Load() != 1 {
		t.Errorf("POST /api/reload with Host localhost and the token: %d %q, %d reloads; want 200 and 1", got, body, reloads.Load())
	}
	if got, body := callHost(t, http.MethodPost, base+"/api/sessions/42/terminate", "rolegate.internal:"+port, testToken); got != http.StatusOK || p.kills.Load() != 1 {
		t.Errorf("POST terminate with an allowed Host and the token: %d %q, %d kills; want 200 and 1", got, body, p.kills.Load())
	}

	// HTTP/1.0 without Host, as old health checkers send: no browser does, so
	// no rebinding page can.
	for _, path := range []string{"/api/sessions", "/metrics", "/"} {
		if got, body := rawRequest(t, addr, "GET "+path+" HTTP/1.0\r\n\r\n"); got != http.StatusOK {
			t.Errorf("HTTP/1.0 GET %s without Host: %d %q, want 200", path, got, body)
		}
	}
	// An absolute URI names the host, whatever Host says (RFC 9112 3.2.2).
	req := fmt.Sprintf("GET http://evil.example.com:%s/api/sessions HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nConnection: close\r\n\r\n", port, port)
	if got, body := rawRequest(t, addr, req); got != http.StatusMisdirectedRequest || strings.Contains(body, "host_user") {
		t.Errorf("absolute URI naming evil.example.com: %d %q, want 421", got, body)
	}

	log := logs.String()
	first := ""
	for l := range strings.Lines(log) {
		if strings.Contains(l, "Host not allowed") {
			first = l
			break
		}
	}
	if !strings.Contains(first, "host=evil.example.com ") || !strings.Contains(first, "path=/api/sessions") ||
		!strings.Contains(first, "remote=127.0.0.1:") || !strings.Contains(first, "skipped_since_last=0") {
		t.Errorf("the first refusal's log line %q, want the host, path and remote address; log:\n%s", first, log)
	}
	if strings.Contains(log, testToken) {
		t.Errorf("the admin token reached the log:\n%s", log)
	}
}

// Refusal log lines: one per refusedLogEvery, then the count of those held back.
func TestRateLog(t *testing.T) {
	var l rateLog
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, step := range []struct {
		at      time.Duration
		ok      bool
		skipped int
	}{
		{0, true, 0},
		{time.Second, false, 0},
		{refusedLogEvery - time.Nanosecond, false, 0},
		{refusedLogEvery, true, 2},
		{refusedLogEvery + time.Millisecond, false, 0},
		{3 * refusedLogEvery, true, 1},
		{5 * refusedLogEvery, true, 0},
	} {
		skipped, ok := l.allow(t0.Add(step.at))
		if ok != step.ok || skipped != step.skipped {
			t.Errorf("allow at %v: %d, %v; want %d, %v", step.at, skipped, ok, step.skipped, step.ok)
		}
	}
}

// Host forms no browser sends, and the configured names.
func TestHostCheckForms(t *testing.T) {
	c := newHostCheck("Admin.Example.COM.:9631", []string{"rolegate.internal", "OPS.example.com:8443", "not a host", "[bad]:1"})
	for host, want := range map[string]bool{
		"":                     true, // HTTP/1.0
		"admin.example.com":    true, // [admin] http's host, normalised
		"admin.example.com:1":  true,
		"::1":                  true, // IPv6 without brackets
		"fe80::1%eth0":         true,
		"[fe80::1%25eth0]:1":   true,
		"ops.example.com:8443": true,
		"ops.example.com:8444": false,
		"[::1":                 false,
		"[::1]x":               false,
		"[::1]:x":              false,
		"[localhost]":          false,
		"localhost:123456":     false,
		".":                    false,
		":1":                   false,
		"a::b::c":              false, // many colons, not an address
		"not a host":           false,
		"a/b":                  false,
		"bad":                  false,
		"localhost..":          false, // one trailing dot only
		"xn--80ak6aa92e.com":   false,
		"0x7f.1":               false, // browsers send 127.0.0.1 for these
		"2130706433":           false,
	} {
		if got := c.allows(host); got != want {
			t.Errorf("allows(%q) = %v, want %v", host, got, want)
		}
	}
	// No listen address and no list: IP literals and localhost only.
	bare := newHostCheck("", nil)
	for host, want := range map[string]bool{"127.0.0.1:1": true, "localhost": true, "rolegate.internal": false} {
		if got := bare.allows(host); got != want {
			t.Errorf("without configuration, allows(%q) = %v, want %v", host, got, want)
		}
	}
}
