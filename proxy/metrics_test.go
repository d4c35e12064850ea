package proxy

import (
	"context"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/internal/testutil"
	"github.com/rolegate/rolegate/limiter"
)

// recorder is an Observer that keeps what it is told.
type recorder struct {
	mu sync.Mutex
	recorded
}

// recorded is what a recorder was told.
type recorded struct {
	logins   []string // role/database
	failures []string // role/reason
	dials    []error
	waits    []string // role/admitted
	ended    []ended
}

type ended struct {
	role, database    string
	bytesIn, bytesOut int64
}

func (r *recorder) LoginDone(role, database string, d time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if d <= 0 {
		role += " (no duration)"
	}
	r.logins = append(r.logins, role+"/"+database)
}

func (r *recorder) LoginFailed(role, reason string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.failures = append(r.failures, role+"/"+reason)
}

func (r *recorder) ServerDialed(d time.Duration, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.dials = append(r.dials, err)
}

func (r *recorder) Waited(role string, d time.Duration, admitted bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.waits = append(r.waits, fmt.Sprintf("%s/%v", role, admitted))
}

func (r *recorder) SessionEnded(role, database string, bytesIn, bytesOut int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ended = append(r.ended, ended{role, database, bytesIn, bytesOut})
}

// snapshot returns a copy of what was recorded.
func (r *recorder) snapshot() recorded {
	r.mu.Lock()
	defer r.mu.Unlock()
	return recorded{logins: slices.Clone(r.logins), failures: slices.Clone(r.failures), dials: slices.Clone(r.dials),
		waits: slices.Clone(r.waits), ended: slices.Clone(r.ended)}
}

// eventually polls cond for up to 30 s: a session's end is observed after the
// client has gone.
func eventually(t *testing.T, what string, cond func(recorded) bool, rec *recorder) recorded {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		got := rec.snapshot()
		if cond(got) {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; recorded %+v", what, got)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// observedProxy is limitedProxy with a recorder as its Observer.
func observedProxy(t *testing.T, roles map[string]limiter.Rule) (*testProxy, *recorder) {
	t.Helper()
	ctl := superControl(t, shared)
	lim := &Limits{Limiter: limiter.New(time.Now), Server: ctl}
	lim.SetRules(mapRules{roles: roles}, true, 0)
	rec := &recorder{}
	p := startProxyWith(t, proxyOpts{auth: proxyAuth(time.Minute, auth.SourceFunc(ctl.Secret)), limits: lim},
		func(c *Config) { c.Observer = rec })
	return p, rec
}

// Logins, failures, server dials and the bytes of ended sessions reach the
// Observer; failures of roles not known to exist are not labelled with them.
func TestObserver(t *testing.T) {
	p, rec := observedProxy(t, nil)

	c := connect(t, p.DSN("scram_user", scramPW, "app"))
	if _, err := c.Exec(t.Context(), "select repeat('x', 10000)"); err != nil {
		t.Fatal(err)
	}
	got := rec.snapshot()
	if !slices.Equal(got.logins, []string{"scram_user/app"}) {
		t.Errorf("logins = %q, want scram_user/app", got.logins)
	}
	if len(got.dials) != 1 || got.dials[0] != nil {
		t.Errorf("dials = %v, want one that succeeded", got.dials)
	}
	c.Close(context.Background())
	got = eventually(t, "the session's end", func(r recorded) bool { return len(r.ended) == 1 }, rec)
	if e := got.ended[0]; e.role != "scram_user" || e.database != "app" || e.bytesIn <= 0 || e.bytesOut < 10000 {
		t.Errorf("ended = %+v, want scram_user/app with bytes both ways (10000 out at least)", e)
	}

	for _, tc := range []struct{ user, password, want string }{
		{"scram_user", "not " + scramPW, "scram_user/wrong password"},
		{"obs_nobody", "whatever", "unknown/unknown role"},
	} {
		_, errOut, err := psql(t, p.DSN(tc.user, tc.password, "app"), "", "-c", "select 1")
		if err == nil {
			t.Fatalf("%s with a bad password got in", tc.user)
		}
		got = eventually(t, tc.want, func(r recorded) bool { return slices.Contains(r.failures, tc.want) }, rec)
		_ = errOut
	}
	if len(got.logins) != 1 || len(got.dials) != 1 || len(got.failures) != 2 {
		t.Errorf("after two failed logins: %+v, want no more logins or dials, two failures", got)
	}
}

// A login that waited for a slot is observed once, with its role and outcome;
// a rejection counts as a failure of the (verified) role.
func TestObserverWait(t *testing.T) {
	const role = "obs_wait"
	pw := newRole(t, role, -1)
	const rejRole = "obs_reject"
	rejPW := newRole(t, rejRole, -1)
	p, rec := observedProxy(t, map[string]limiter.Rule{
		role:    {MaxSessions: 1, Policy: limiter.PolicyWait, Fallback: limiter.PolicyReject, WaitTimeout: 10 * time.Second},
		rejRole: {MaxSessions: 0, Policy: limiter.PolicyReject, Fallback: limiter.PolicyReject},
	})
	held := connect(t, p.DSN(role, pw, "app"))
	waited := make(chan error, 1)
	go func() {
		c, err := tryConnect(p.DSN(role, pw, "app"), 15*time.Second, nil)
		if err == nil {
			c.Close(context.Background())
		}
		waited <- err
	}()
	eventually(t, "the second login to wait", func(recorded) bool { return len(logLines(p, "waiting for a slot")) == 1 }, rec)
	held.Close(context.Background())
	if err := <-waited; err != nil {
		t.Fatalf("the waiting login: %v", err)
	}
	got := rec.snapshot()
	if !slices.Equal(got.waits, []string{role + "/true"}) {
		t.Errorf("waits = %q, want one admitted wait of %s", got.waits, role)
	}

	if c, err := tryConnect(p.DSN(rejRole, rejPW, "app"), 15*time.Second, nil); err == nil {
		c.Close(context.Background())
		t.Fatal("a login past max_sessions = 0 got in")
	}
	eventually(t, "the rejection", func(r recorded) bool {
		return slices.Contains(r.failures, rejRole+"/"+ReasonTooMany)
	}, rec)
}

// A server nobody listens on: the failed dial is observed, and the login
// fails as a server error of a role nobody verified (passthrough).
func TestObserverDialFailure(t *testing.T) {
	addr := testutil.ClosedAddr(t)
	rec := &recorder{}
	p := startProxyWith(t, proxyOpts{serverAddr: addr}, func(c *Config) { c.Observer = rec })
	if c, err := tryConnect(p.DSN("scram_user", scramPW, "app"), 15*time.Second, nil); err == nil {
		c.Close(context.Background())
		t.Fatal("a login got in without a server")
	}
	got := eventually(t, "the failed login", func(r recorded) bool { return len(r.failures) > 0 }, rec)
	if len(got.dials) == 0 || slices.ContainsFunc(got.dials, func(err error) bool { return err == nil }) {
		t.Errorf("dials = %v, want failed ones only", got.dials)
	}
	if !slices.Equal(got.failures, []string{RoleUnknown + "/" + ReasonServerError}) || len(got.logins) != 0 {
		t.Errorf("failures = %q, logins = %q; want one server error of an unknown role", got.failures, got.logins)
	}
}

// Startup packets rolegate refuses and clients that never send one are failed
// logins of an unknown role; a client that connects and leaves without a word
// (a TCP health check) is not.
func TestObserverStartupFailures(t *testing.T) {
	rec := &recorder{}
	// Long enough that only the silent client can reach it, however slow the machine.
	p := startProxyWith(t, proxyOpts{startupTimeout: 5 * time.Second}, func(c *Config) { c.Observer = rec })
	refused := func(send func(c *net.TCPConn)) {
		t.Helper()
		c := rawConn(t, p)
		send(c)
		_, _ = io.Copy(io.Discard, c) // the FATAL, then rolegate's close
		c.Close()
	}
	refused(func(c *net.TCPConn) { startupMessage(t, c, 2, 0, "user", "u") })                   // protocol 2
	refused(func(c *net.TCPConn) { _, _ = c.Write([]byte{0, 0, 0, 9, 1, 2, 3, 4, 5}) })         // garbage
	refused(func(c *net.TCPConn) { _, _ = c.Write([]byte{0, 0, 0, 50, 0, 3}); c.CloseWrite() }) // truncated
	rawConn(t, p).Close()                                                                       // a health check
	refused(func(*net.TCPConn) {})                                                              // silent until the timeout

	want := []string{
		RoleUnknown + "/" + ReasonBadStartup, RoleUnknown + "/" + ReasonBadStartup,
		RoleUnknown + "/" + ReasonBadStartup, RoleUnknown + "/" + ReasonStartupTimeout,
	}
	// Once no connection is being handled any more, every one has been
	// observed: a fifth, wrongly counted health check would show now.
	eventually(t, "every connection handled", func(recorded) bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.active == 0
	}, rec)
	got := rec.snapshot()
	slices.Sort(got.failures)
	slices.Sort(want)
	if !slices.Equal(got.failures, want) || len(got.logins) != 0 || len(got.dials) != 0 {
		t.Errorf("failures = %q, logins = %q, dials = %v; want %q and nothing else", got.failures, got.logins, got.dials, want)
	}
}
