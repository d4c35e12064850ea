package main

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/rolegate/rolegate/internal/pgtest"
)

// SHUTDOWN WAIT on the console drains as SIGTERM does, plain SHUTDOWN closes
// at once as SIGINT does, and POST /api/shutdown (with the token) does the
// same; psql gets the console's answer before its session closes.
func TestShutdownVerbs(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary against PostgreSQL")
	}
	t.Parallel()
	bin := buildBinary(t)
	c := pgtest.Start(t, pgtest.Options{})
	if err := c.Exec(t.Context(), "create role sd_user login password 'sd_pw'"); err != nil {
		t.Fatal(err)
	}
	conf := func(admin string) string {
		return fmt.Sprintf("shutdown_timeout = \"60s\"\n[control]\ndsn = %q\nmax_conns = 4\n[admin]\nusers = [%q]\n%s",
			c.SuperDSN(), c.SuperUser, admin)
	}
	consoleOf := func(p *proc) string {
		return strings.Replace(p.dsnAs(c.SuperUser, c.SuperPassword), "dbname=postgres", "dbname=rolegate", 1)
	}

	t.Run("SHUTDOWN WAIT drains", func(t *testing.T) {
		t.Parallel()
		p := startBinary(t, bin, c, conf("http = \"\"\n"))
		held := login(t, p.dsnAs("sd_user", "sd_pw"))
		if out, errOut, err := psqlQuery(t, consoleOf(p), "shutdown wait"); err != nil || !strings.Contains(errOut, "stops accepting") {
			t.Fatalf("shutdown wait: %v, %q %q", err, out, errOut)
		}
		waitFor(t, 30*time.Second, "the listener to close", func() bool { return refusing(p.addr) })
		waitFor(t, 30*time.Second, "the drain log line", func() bool {
			return strings.Contains(p.stderr.String(), `SHUTDOWN WAIT requested; draining sessions" by="console user `)
		})
		alive(t, held, "the session held during the drain")
		if p.done() {
			t.Fatal("rolegate exited with a session open")
		}
		if err := held.Close(t.Context()); err != nil {
			t.Fatal(err)
		}
		p.wantExit(t, 30*time.Second)
	})

	t.Run("SHUTDOWN closes now", func(t *testing.T) {
		t.Parallel()
		p := startBinary(t, bin, c, conf("http = \"\"\n"))
		held := login(t, p.dsnAs("sd_user", "sd_pw"))
		if out, errOut, err := psqlQuery(t, consoleOf(p), "shutdown"); err != nil {
			t.Fatalf("shutdown: %v, %q %q", err, out, errOut)
		}
		p.wantExit(t, 30*time.Second)
		if !strings.Contains(p.stderr.String(), "SHUTDOWN requested; closing all sessions now") {
			t.Errorf("no SHUTDOWN log line:\n%s", p.stderr.String())
		}
		if err := held.Ping(t.Context()); err == nil {
			t.Error("held session still works after rolegate exited")
		}
	})

	t.Run("POST /api/shutdown", func(t *testing.T) {
		t.Parallel()
		adminAddr := freeAddr(t)
		p := startBinary(t, bin, c, conf(fmt.Sprintf("http = %q\ntoken = \"sd-token\"\n", adminAddr)))
		waitFor(t, 15*time.Second, "the admin HTTP server to accept connections", func() bool { return !refusing(adminAddr) })
		held := login(t, p.dsnAs("sd_user", "sd_pw"))
		post := func(token string) int {
			req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, "http://"+adminAddr+"/api/shutdown?wait=1", nil)
			if err != nil {
				t.Fatal(err)
			}
			if token != "" {
				req.Header.Set("Authorization", "Bearer "+token)
			}
			client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 20 * time.Second}
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			return resp.StatusCode
		}
		if got := post(""); got != http.StatusUnauthorized {
			t.Fatalf("without the token: %d", got)
		}
		if p.done() || refusing(p.addr) {
			t.Fatal("a refused shutdown stopped rolegate")
		}
		if got := post("sd-token"); got != http.StatusAccepted {
			t.Fatalf("with the token: %d", got)
		}
		waitFor(t, 30*time.Second, "the listener to close", func() bool { return refusing(p.addr) })
		alive(t, held, "the session held during the drain")
		if err := held.Close(t.Context()); err != nil {
			t.Fatal(err)
		}
		p.wantExit(t, 30*time.Second)
		if !strings.Contains(p.stderr.String(), `SHUTDOWN WAIT requested; draining sessions" by="http api from 127.0.0.1:`) {
			t.Errorf("no SHUTDOWN WAIT log line:\n%s", p.stderr.String())
		}
	})
}
