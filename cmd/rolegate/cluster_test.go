package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/rolegate/rolegate/internal/pgtest"
)

// Three rolegate binaries in front of one server act as one for cancels
// and the operator's view: a query on the first, cancelled through each of
// the others, ends with 57014; SHOW INSTANCES and /api/instances on any of
// them list all three, and SHOW SESSIONS names the instance that relays a
// session.
func TestClusterBinary(t *testing.T) {
	t.Parallel()
	bin := buildBinary(t)
	c := pgtest.Start(t, pgtest.Options{})
	if err := c.Exec(t.Context(), "create role cl_user login password 'cl_pw'"); err != nil {
		t.Fatal(err)
	}
	conf := func(adminHTTP string) string {
		return fmt.Sprintf("[control]\ndsn = %q\nmax_conns = 4\n[admin]\nhttp = %q\nusers = [%q]\n[roles.cl_user]\nmax_sessions = 5\n",
			c.SuperDSN(), adminHTTP, c.SuperUser)
	}
	apiAddr := freeAddr(t)
	ps := []*proc{startBinary(t, bin, c, conf("")), startBinary(t, bin, c, conf(apiAddr)), startBinary(t, bin, c, conf(""))}
	tagOf := func(p *proc) string {
		m := regexp.MustCompile(`msg=instance tag=([0-9a-f]{2})`).FindStringSubmatch(p.stderr.String())
		if m == nil {
			t.Fatalf("no instance tag in the log:\n%s", p.stderr.String())
		}
		return m[1]
	}
	console := strings.Replace(ps[2].dsnAs(c.SuperUser, c.SuperPassword), "dbname=postgres", "dbname=rolegate", 1)
	run := func(q string) string {
		t.Helper()
		out, errOut, err := psqlQuery(t, console, q)
		if err != nil {
			t.Fatalf("psql %q: %v, %s", q, err, errOut)
		}
		return out
	}
	waitFor(t, time.Minute, "three instances in SHOW INSTANCES", func() bool {
		return strings.Count(run("show instances"), "\n") == 3
	})
	out := run("show instances")
	for i, p := range ps {
		// tag|address|self|version|started|registered|sessions|error
		if !strings.Contains(out, tagOf(p)+"|"+p.addr+"|"+fmt.Sprint(i == 2)+"|") {
			t.Errorf("instance %d (%s, tag %s) not listed right:\n%s", i, p.addr, tagOf(p), out)
		}
	}
	var api []struct {
		Tag, Address string
		Self         bool
		Error        string
	}
	resp, err := http.Get("http://" + apiAddr + "/api/instances")
	if err != nil {
		t.Fatal(err)
	}
	err = json.NewDecoder(resp.Body).Decode(&api)
	resp.Body.Close()
	if err != nil || len(api) != 3 {
		t.Fatalf("/api/instances: %v, %+v", err, api)
	}
	for _, in := range api {
		if in.Error != "" || in.Self != (in.Address == ps[1].addr) {
			t.Errorf("/api/instances entry %+v", in)
		}
	}

	su := login(t, c.SuperDSN())
	owner := login(t, ps[0].dsnAs("cl_user", "cl_pw"))
	pid, key := owner.PgConn().PID(), owner.PgConn().SecretKey()
	if line := sessionOf(run("show sessions"), pid); !strings.HasSuffix(line, "|"+tagOf(ps[0])) {
		t.Errorf("SHOW SESSIONS on the third instance does not name the first as the relay of pid %d: %q", pid, line)
	}
	for _, p := range ps[1:] {
		done := make(chan error, 1)
		go func() {
			_, err := owner.Exec(context.Background(), "select pg_sleep(30)")
			done <- err
		}()
		waitFor(t, 30*time.Second, "the query running", func() bool {
			var state string
			err := su.QueryRow(t.Context(), "select coalesce(state, '') from pg_stat_activity where pid = $1", int32(pid)).Scan(&state)
			return err == nil && state == "active"
		})
		cancelThrough(t, p.addr, pid, key)
		select {
		case err := <-done:
			if err == nil || !strings.Contains(err.Error(), "57014") {
				t.Fatalf("cancelled through %s: %v, want 57014", p.addr, err)
			}
		case <-time.After(25 * time.Second):
			t.Fatalf("the cancel sent to %s did not reach the session on %s", p.addr, ps[0].addr)
		}
	}
	alive(t, owner, "the cancelled session")
}

// sessionOf is the SHOW SESSIONS line of pid.
func sessionOf(out string, pid uint32) string {
	for line := range strings.Lines(out) {
		if strings.HasPrefix(line, fmt.Sprint(pid)+"|") {
			return strings.TrimRight(line, "\n")
		}
	}
	return ""
}

// cancelThrough sends a CancelRequest to addr, as a client behind a load
// balancer would, and waits until the instance has closed the connection.
func cancelThrough(t *testing.T, addr string, pid uint32, key []byte) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	pkt := binary.BigEndian.AppendUint32(nil, uint32(12+len(key)))
	pkt = binary.BigEndian.AppendUint32(pkt, 80877102)
	pkt = binary.BigEndian.AppendUint32(pkt, pid)
	if _, err := conn.Write(append(pkt, key...)); err != nil {
		t.Fatal(err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	_, _ = conn.Read(make([]byte, 1))
}
