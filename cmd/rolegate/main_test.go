package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/goleak"

	"github.com/rolegate/rolegate/internal/pgtest"
	"github.com/rolegate/rolegate/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func runMain(args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = run(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestRunVersion(t *testing.T) {
	t.Parallel()
	code, out, errOut := runMain("-version")
	if code != 0 || !strings.HasPrefix(out, "rolegate ") || len(strings.TrimSpace(out)) <= len("rolegate") || errOut != "" {
		t.Errorf("-version: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	// -version needs no configuration file.
	code, out, _ = runMain("-version", "-config", "/nonexistent/proxy.toml")
	if code != 0 || !strings.HasPrefix(out, "rolegate ") {
		t.Errorf("-version with a missing config: exit %d, stdout %q", code, out)
	}
}

func TestRunCheck(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	good := writeFile(t, "good.toml", `
listen = "127.0.0.1:7777"
shutdown_timeout = "5s"
[server]
address = "127.0.0.1:5432"
sslmode = "disable"
[log]
format = "json"
`)
	code, out, errOut := runMain("-check", "-config", good)
	if code != 0 || out != good+": configuration is valid\n" || errOut != "" {
		t.Errorf("-check good: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	// The repository's own proxy.toml passes.
	if code, _, errOut := runMain("-check", "-config", filepath.Join("..", "..", "proxy.toml")); code != 0 {
		t.Errorf("-check proxy.toml: exit %d, stderr %q", code, errOut)
	}

	// Proxy mode: -check reads the userlist, builds the control pool and
	// needs no server (nothing listens on port 1).
	userlist := writeFile(t, "userlist.txt", "\"alice\" \"md5"+strings.Repeat("0", 32)+"\"\n")
	for _, doc := range []string{
		"[control]\ndsn = \"postgres://rolegate@127.0.0.1:1/postgres\"\n[auth]\nauth_query = \"SELECT rolegate.get_secret($1)\"\n",
		"[auth]\nmode = \"proxy\"\nmethod = \"md5\"\nuserlist = \"" + userlist + "\"\n",
		"[control]\ndsn = \"postgres://rolegate@127.0.0.1:1/postgres\"\n[auth]\nmode = \"proxy\"\nuserlist = \"" + userlist + "\"\n",
	} {
		path := writeFile(t, "proxy-mode.toml", doc)
		if code, out, errOut := runMain("-check", "-config", path); code != 0 || out != path+": configuration is valid\n" {
			t.Errorf("-check %q: exit %d, stdout %q, stderr %q", doc, code, out, errOut)
		}
	}
	brokenUserlist := writeFile(t, "broken-userlist.txt", "\"alice\" \"md5"+strings.Repeat("0", 32)+"\"\n\"bob\" \"s3cret\n")

	tests := []struct {
		name, doc, want string
	}{
		{"bad value", "listen = \"127.0.0.1:1\"\n\n[log]\nlevel = \"chatty\"\n", ":4: log.level: invalid level \"chatty\""},
		{"unknown key", "[server]\naddress = \"h:1\"\nsslmdoe = \"require\"\n", ":3: server.sslmdoe: unknown key"},
		{"missing tls files", "[tls]\ncert = \"" + filepath.Join(dir, "no.crt") + "\"\nkey = \"" + filepath.Join(dir, "no.key") + "\"\n",
			"tls: load certificate"},
		{"missing sslrootcert", "[server]\nsslmode = \"verify-full\"\nsslrootcert = \"" + filepath.Join(dir, "no-ca.pem") + "\"\n",
			"read server sslrootcert"},
		{"proxy mode without a verifier source", "[auth]\nmode = \"proxy\"\n", ":2: auth.mode: mode \"proxy\" needs a verifier source"},
		{"missing userlist", "[auth]\nuserlist = \"" + filepath.Join(dir, "no-userlist.txt") + "\"\n",
			"userlist: open " + filepath.Join(dir, "no-userlist.txt") + ": no such file or directory"},
		{"broken userlist", "[auth]\nuserlist = \"" + brokenUserlist + "\"\n",
			"userlist " + brokenUserlist + ": userlist line 2: secret of user \"bob\": closing double quote missing"},
		{"bad control dsn", "[control]\ndsn = \"postgres://rolegate:hunter2@127.0.0.1:port/postgres\"\n", "control dsn: "},
	}
	if os.Getenv("ROLEGATE_CONTROL_PASSWORD") == "" { // the environment's password wins over the file
		tests = append(tests, struct{ name, doc, want string }{"missing control password_file",
			"[control]\ndsn = \"postgres://rolegate@127.0.0.1:5432/postgres\"\npassword_file = \"" + filepath.Join(dir, "no-pw") + "\"\n",
			"control password_file: open " + filepath.Join(dir, "no-pw")})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			path := writeFile(t, "bad.toml", tt.doc)
			code, out, errOut := runMain("-check", "-config", path)
			if code != 2 || out != "" || !strings.Contains(errOut, path) || !strings.Contains(errOut, tt.want) {
				t.Errorf("exit %d, stdout %q, stderr %q; want 2 and stderr naming %s and %q", code, out, errOut, path, tt.want)
			}
			for _, secret := range []string{"hunter2", "s3cret"} {
				if strings.Contains(errOut, secret) {
					t.Errorf("stderr %q quotes a secret", errOut)
				}
			}
		})
	}
	t.Run("missing file", func(t *testing.T) {
		t.Parallel()
		code, _, errOut := runMain("-check", "-config", filepath.Join(dir, "absent.toml"))
		if code != 2 || !strings.Contains(errOut, "no such file or directory") {
			t.Errorf("exit %d, stderr %q", code, errOut)
		}
	})
}

func TestRunUsageErrors(t *testing.T) {
	t.Parallel()
	code, _, errOut := runMain("-bogus")
	if code != 2 || !strings.Contains(errOut, "flag provided but not defined: -bogus") || !strings.Contains(errOut, "-config") {
		t.Errorf("unknown flag: exit %d, stderr %q; want 2 and the usage", code, errOut)
	}
	code, _, errOut = runMain("-check", "extra")
	if code != 2 || !strings.Contains(errOut, "unexpected arguments: [extra]") {
		t.Errorf("extra argument: exit %d, stderr %q", code, errOut)
	}
}

// A listen address that is taken is a failure while running: exit 1.
func TestRunListenFails(t *testing.T) {
	t.Parallel()
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	path := writeFile(t, "proxy.toml", fmt.Sprintf("listen = %q\n", taken.Addr().String()))
	code, _, errOut := runMain("-config", path)
	if code != 1 || !strings.Contains(errOut, "listen on "+taken.Addr().String()) {
		t.Errorf("exit %d, stderr %q; want 1 naming the address", code, errOut)
	}
}

// proc is a running rolegate binary.
type proc struct {
	cmd    *exec.Cmd
	addr   string
	server string // the cluster's address
	path   string // the configuration file; configure rewrites it
	stderr *testutil.SyncBuffer
	exited chan struct{} // closed once the process has been reaped
}

// waitFor polls cond until it holds, failing the test after limit.
func waitFor(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	testutil.WaitFor(t, limit, what, cond)
}

// freeAddr picks a loopback port nobody listens on.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// startBinary runs bin with a configuration in front of cluster c, and waits
// until it accepts connections.
func startBinary(t *testing.T, bin string, c *pgtest.Cluster, extraTOML string) *proc {
	t.Helper()
	p := launch(t, bin, c, freeAddr(t), extraTOML)
	waitFor(t, 15*time.Second, "rolegate to accept connections", func() bool {
		if p.done() {
			t.Fatalf("rolegate exited early: %v\n%s", p.cmd.ProcessState, p.stderr.String())
		}
		conn, err := net.DialTimeout("tcp", p.addr, time.Second)
		if err != nil {
			return false
		}
		conn.Close()
		return true
	})
	return p
}

// launch runs bin listening on addr with a configuration in front of
// cluster c, and returns without waiting for anything.
func launch(t *testing.T, bin string, c *pgtest.Cluster, addr, extraTOML string) *proc {
	t.Helper()
	p := &proc{addr: addr, server: c.Addr(), stderr: &testutil.SyncBuffer{}, exited: make(chan struct{})}
	p.path = writeFile(t, "proxy.toml", p.config(extraTOML))
	p.cmd = exec.Command(bin, "-config", p.path)
	p.cmd.Stderr = p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		_ = p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		if !p.done() {
			_ = p.cmd.Process.Kill()
		}
		<-p.exited
		if t.Failed() {
			t.Logf("rolegate (pid %d) stderr:\n%s", p.cmd.Process.Pid, p.stderr.String())
		}
	})
	return p
}

// config is the whole configuration file for extraTOML, which comes right
// after listen (so it may hold top-level keys and tables of its own).
func (p *proc) config(extraTOML string) string {
	admin := "[admin]\nhttp = \"\"\n" // several binaries run at once; the default port would clash
	if strings.Contains(extraTOML, "[admin]") {
		admin = ""
	}
	return fmt.Sprintf("listen = %q\n%s\n[server]\naddress = %q\nsslmode = \"disable\"\n[log]\nlevel = \"debug\"\n%s",
		p.addr, extraTOML, p.server, admin)
}

// configure rewrites the configuration file with extraTOML (see config) and
// returns the file's new content; the process reads it on SIGHUP.
func (p *proc) configure(t *testing.T, extraTOML string) string {
	t.Helper()
	doc := p.config(extraTOML)
	if err := os.WriteFile(p.path, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	return doc
}

func (p *proc) done() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

func (p *proc) dsn() string {
	host, port, _ := net.SplitHostPort(p.addr)
	return fmt.Sprintf("host=%s port=%s user=trust_user dbname=postgres sslmode=disable", host, port)
}

// signal sends sig and returns the time just before it did: the process
// cannot have acted on the signal earlier, however slow the machine.
func (p *proc) signal(t *testing.T, sig os.Signal) time.Time {
	t.Helper()
	sent := time.Now()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	return sent
}

// wantExit waits up to limit for the process to exit with status 0.
func (p *proc) wantExit(t *testing.T, limit time.Duration) {
	t.Helper()
	select {
	case <-p.exited:
	case <-time.After(limit):
		t.Fatalf("rolegate still running %v after the signal", limit)
	}
	if code := p.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("exit status %d, want 0", code)
	}
}

// refusing reports whether nothing accepts connections at addr any more.
func refusing(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return true
	}
	c.Close()
	return false
}

// hold opens a pgx session through the proxy; it is closed at cleanup.
func hold(t *testing.T, p *proc) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, p.dsn())
	if err != nil {
		t.Fatalf("connect through rolegate: %v", err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// buildBinary builds rolegate into a temp dir and returns its path.
func buildBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "rolegate")
	build := exec.Command("go", "build", "-o", bin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

func TestBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary against PostgreSQL")
	}
	t.Parallel()
	bin := buildBinary(t)
	c := pgtest.Start(t, pgtest.Options{HBA: []string{"host all trust_user 127.0.0.1/32 trust"}})
	if err := c.Exec(t.Context(), "create role trust_user login"); err != nil {
		t.Fatal(err)
	}

	t.Run("psql through it, SIGHUP, then SIGINT", func(t *testing.T) {
		t.Parallel()
		p := startBinary(t, bin, c, "max_procs = 1")
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, "psql", "-X", "-At", "-d", p.dsn(), "-c", "select current_user, 6 * 7")
		out, err := cmd.CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != "trust_user|42" {
			t.Fatalf("psql: %v, output %q", err, out)
		}
		p.signal(t, syscall.SIGHUP)
		waitFor(t, 30*time.Second, "the SIGHUP log line", func() bool {
			return strings.Contains(p.stderr.String(), "reloaded")
		})
		if p.done() || refusing(p.addr) {
			t.Fatal("rolegate stopped serving on SIGHUP")
		}
		p.signal(t, syscall.SIGINT)
		p.wantExit(t, 30*time.Second)
		if !strings.Contains(p.stderr.String(), "msg=\"rolegate started\"") || !strings.Contains(p.stderr.String(), "role=trust_user") ||
			!strings.Contains(p.stderr.String(), "max_procs=1") {
			t.Errorf("log lacks the start and the login:\n%s", p.stderr.String())
		}
	})

	t.Run("admin HTTP answers for its own names only", func(t *testing.T) {
		t.Parallel()
		adminAddr := freeAddr(t)
		_, port, err := net.SplitHostPort(adminAddr)
		if err != nil {
			t.Fatal(err)
		}
		p := startBinary(t, bin, c, fmt.Sprintf("[admin]\nhttp = %q\nallowed_hosts = [\"rolegate.internal\"]\n", adminAddr))
		waitFor(t, 15*time.Second, "the admin HTTP server to accept connections", func() bool { return !refusing(adminAddr) })
		client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 20 * time.Second}
		for host, want := range map[string]int{
			adminAddr:                  http.StatusOK,
			"localhost:" + port:        http.StatusOK,
			"rolegate.internal":        http.StatusOK, // [admin] allowed_hosts
			"evil.example.com:" + port: http.StatusMisdirectedRequest,
		} {
			req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, "http://"+adminAddr+"/api/sessions", nil)
			if err != nil {
				t.Fatal(err)
			}
			req.Host = host
			resp, err := client.Do(req)
			if err != nil {
				t.Fatalf("GET /api/sessions with Host %q: %v", host, err)
			}
			resp.Body.Close()
			if resp.StatusCode != want {
				t.Errorf("GET /api/sessions with Host %q: %d, want %d", host, resp.StatusCode, want)
			}
		}
		p.signal(t, syscall.SIGINT)
		p.wantExit(t, 10*time.Second)
		log := p.stderr.String()
		if !strings.Contains(log, "allowed_hosts=[rolegate.internal]") || !strings.Contains(log, "Host not allowed") {
			t.Errorf("log lacks the admin server's allowed_hosts or the refusal:\n%s", log)
		}
	})

	t.Run("SIGTERM drains", func(t *testing.T) {
		t.Parallel()
		p := startBinary(t, bin, c, `shutdown_timeout = "60s"`)
		held := hold(t, p)
		p.signal(t, syscall.SIGTERM)
		waitFor(t, 30*time.Second, "the listener to close", func() bool { return refusing(p.addr) })
		// stderr reaches us through a pipe: the line may trail the listener's close.
		waitFor(t, 30*time.Second, "the drain log line", func() bool {
			return strings.Contains(p.stderr.String(), "SIGTERM received; draining sessions")
		})
		// Still running, and the held session still works.
		var n int
		if err := held.QueryRow(t.Context(), "select 7").Scan(&n); err != nil || n != 7 {
			t.Fatalf("held session during the drain: %d, %v", n, err)
		}
		if p.done() {
			t.Fatal("rolegate exited with a session open")
		}
		if err := held.Close(t.Context()); err != nil {
			t.Fatal(err)
		}
		p.wantExit(t, 30*time.Second)
	})

	t.Run("SIGTERM with shutdown_timeout", func(t *testing.T) {
		t.Parallel()
		p := startBinary(t, bin, c, `shutdown_timeout = "500ms"`)
		held := hold(t, p)
		sent := p.signal(t, syscall.SIGTERM)
		p.wantExit(t, 30*time.Second)
		took := time.Since(sent)
		t.Logf("exited %v after SIGTERM", took)
		if took < 500*time.Millisecond {
			t.Errorf("exited after %v, before shutdown_timeout", took)
		}
		if !strings.Contains(p.stderr.String(), "shutdown timeout reached") {
			t.Errorf("no timeout log line:\n%s", p.stderr.String())
		}
		if err := held.Ping(t.Context()); err == nil {
			t.Error("held session still works after rolegate exited")
		}
	})

	t.Run("a second SIGTERM closes at once", func(t *testing.T) {
		t.Parallel()
		p := startBinary(t, bin, c, `shutdown_timeout = "60s"`)
		held := hold(t, p)
		p.signal(t, syscall.SIGTERM)
		waitFor(t, 30*time.Second, "the listener to close", func() bool { return refusing(p.addr) })
		p.signal(t, syscall.SIGTERM)
		p.wantExit(t, 30*time.Second)
		if err := held.Ping(t.Context()); err == nil {
			t.Error("held session still works after rolegate exited")
		}
	})

	t.Run("SIGINT with a session open", func(t *testing.T) {
		t.Parallel()
		p := startBinary(t, bin, c, `shutdown_timeout = "60s"`)
		held := hold(t, p)
		sent := p.signal(t, syscall.SIGINT)
		p.wantExit(t, 30*time.Second)
		t.Logf("exited %v after SIGINT", time.Since(sent))
		if !strings.Contains(p.stderr.String(), "SIGINT received; closing all sessions now") {
			t.Errorf("no SIGINT log line:\n%s", p.stderr.String())
		}
		if err := held.Ping(t.Context()); err == nil {
			t.Error("held session still works after rolegate exited")
		}
	})
}
