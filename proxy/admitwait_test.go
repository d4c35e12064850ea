package proxy

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rolegate/rolegate/limiter"
)

// passthroughLimits is a passthrough proxy (the server authenticates) with
// limits from the rules for roles and the server's own.
func passthroughLimits(t *testing.T, roles map[string]limiter.Rule, o proxyOpts) *testProxy {
	t.Helper()
	ctl := superControl(t, shared)
	lim := &Limits{Limiter: limiter.New(time.Now), Server: ctl}
	lim.SetRules(mapRules{roles: roles}, true, 0)
	o.limits = lim
	return startProxy(t, o)
}

type asyncLogin struct {
	conn *pgx.Conn
	err  error
}

// loginAsync logs in in the background; the caller closes a conn it gets.
func loginAsync(dsn string) <-chan asyncLogin {
	ch := make(chan asyncLogin, 1)
	go func() {
		c, err := tryConnect(dsn, 2*time.Minute, nil)
		ch <- asyncLogin{c, err}
	}()
	return ch
}

// In passthrough the server gives a waiting login its backend before
// admission: waiters must not count each other's backends, or two waiters
// block each other after the holder leaves.
func TestLimitPassthroughWaiters(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	const role = "lim_pt_waiters"
	pw := newRole(t, role, -1) // no server limit: the server lets every backend in
	p := passthroughLimits(t, map[string]limiter.Rule{role: {MaxSessions: 1, Policy: limiter.PolicyWait,
		Fallback: limiter.PolicyReject, WaitTimeout: 10 * time.Minute}}, proxyOpts{})
	dsn := p.DSN(role, pw, "app")
	holder, err := tryConnect(dsn, time.Minute, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close(ctx)

	a, b := loginAsync(dsn), loginAsync(dsn)
	waitWaiting(t, p, role, 2)
	holder.Close(ctx)

	// One waiter gets in; the other goes on waiting behind it.
	var first asyncLogin
	var other <-chan asyncLogin
	select {
	case first = <-a:
		other = b
	case first = <-b:
		other = a
	case <-time.After(2 * time.Minute):
		t.Fatal("no waiter was admitted after the holder left")
	}
	if first.err != nil {
		t.Fatalf("the first waiter: %v", first.err)
	}
	defer first.conn.Close(ctx)
	wantAlive(t, first.conn, "the first waiter")
	waitWaiting(t, p, role, 1)
	select {
	case r := <-other:
		t.Fatalf("the second waiter was answered with the slot held: %v", r.err)
	default:
	}

	first.conn.Close(ctx)
	var second asyncLogin
	select {
	case second = <-other:
	case <-time.After(2 * time.Minute):
		t.Fatal("the second waiter was not admitted after the first left")
	}
	if second.err != nil {
		t.Fatalf("the second waiter: %v", second.err)
	}
	defer second.conn.Close(ctx)
	wantAlive(t, second.conn, "the second waiter")
	if l := logLines(p, "msg=rejected"); len(l) != 0 {
		t.Errorf("rejections: %q", l)
	}
}

// Under newest-wins, passthrough logins still in admission are never chosen
// as victims: each login evicts the one session admitted before it.
func TestLimitPassthroughNewestWinsPending(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	const role = "lim_pt_newest"
	const logins = 4
	pw := newRole(t, role, -1)
	p := passthroughLimits(t, map[string]limiter.Rule{role: {MaxSessions: 1, Policy: limiter.PolicyNewestWins,
		Fallback: limiter.PolicyReject}}, proxyOpts{})
	dsn := p.DSN(role, pw, "app")
	holder, err := tryConnect(dsn, time.Minute, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close(ctx)
	pids := map[uint32]bool{holder.PgConn().PID(): true}

	var results []<-chan asyncLogin
	for range logins {
		results = append(results, loginAsync(dsn))
	}
	for _, ch := range results {
		r := <-ch
		if r.err != nil {
			t.Fatalf("a login under newest-wins: %v", r.err)
		}
		defer r.conn.Close(ctx)
		pids[r.conn.PgConn().PID()] = true
	}
	// Every login evicted the one session admitted before it: the holder and
	// all logins but the last admitted.
	waitUntil(t, 30*time.Second, "one session of the role left", func() bool { return sessionsOf(t, role) == 1 })
	victims := map[uint32]bool{}
	for _, ev := range p.Events() {
		if ev.Kind == "eviction" && ev.Role == role {
			if victims[ev.VictimPID] || !pids[ev.VictimPID] {
				t.Errorf("eviction of pid %d: evicted twice, or not a login of the test (%v)", ev.VictimPID, pids)
			}
			victims[ev.VictimPID] = true
		}
	}
	if len(victims) != logins {
		t.Errorf("%d sessions evicted, want %d (one per login)", len(victims), logins)
	}
	// A victim was logged in before it was evicted: rolegate logs "login"
	// before the session's relay starts, and "evicted" only once that relay
	// has seen the victim's server close.
	loginPID := regexp.MustCompile(`(?:^| )pid=(\d+)(?: |$)`)
	victimPID := regexp.MustCompile(` victim_pid=(\d+)(?: |$)`)
	seen := map[string]bool{}
	for line := range strings.SplitSeq(p.logs.String(), "\n") {
		if strings.Contains(line, "msg=login ") {
			if m := loginPID.FindStringSubmatch(line); m != nil {
				seen[m[1]] = true
			}
		}
		if strings.Contains(line, "msg=evicted ") {
			m := victimPID.FindStringSubmatch(line)
			if m == nil || !seen[m[1]] {
				t.Errorf("evicted a session that had not logged in: %s", line)
			}
		}
	}
	for _, what := range []string{"eviction failed", "did not end in time", "msg=rejected"} {
		if l := logLines(p, what); len(l) != 0 {
			t.Errorf("%s: %q", what, l)
		}
	}
}

// A login whose wait outlasts its startup_timeout still hears its 53300: the
// startup deadline does not bound what rolegate writes after admission.
func TestLimitWaitPastStartupTimeout(t *testing.T) {
	t.Parallel()
	rule := limiter.Rule{MaxSessions: 1, Policy: limiter.PolicyWait, Fallback: limiter.PolicyReject, WaitTimeout: 6 * time.Second}
	for _, mode := range []string{"proxy", "passthrough"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			role := "lim_waitpast_" + mode
			pw := newRole(t, role, -1)
			// wait_timeout beyond startup_timeout: the rejection comes after
			// the login's startup deadline, whenever the login started.
			o := proxyOpts{startupTimeout: 4 * time.Second}
			var p *testProxy
			if mode == "proxy" {
				p = rulesProxyWith(t, mapRules{roles: map[string]limiter.Rule{role: rule}}, o)
			} else {
				p = passthroughLimits(t, map[string]limiter.Rule{role: rule}, o)
			}
			connect(t, shared.DSN(role, pw, "app")) // the slot, held directly on the server
			var addr string
			c, err := tryConnect(p.DSN(role, pw, "app"), time.Minute, &addr)
			if err == nil {
				c.Close(context.Background())
				t.Fatal("admitted with the slot held")
			}
			wantTooMany(t, err, "role", role)
			lines := logged(t, p, 1, "client="+addr+" ", "msg=rejected")
			if !strings.Contains(lines[0], "wait_timeout reached") {
				t.Errorf("not the wait's own rejection: %s", lines[0])
			}
		})
	}
}

// A login that waits for its role's admission lock past its startup deadline
// still hears the answer: rejected by the policy once the lock is free, or,
// when its admission time runs out in the lock, 53300 too (never 08006).
func TestLimitLockWaitPastStartupTimeout(t *testing.T) {
	t.Parallel()
	ctx := context.Background()

	t.Run("released after the startup deadline", func(t *testing.T) {
		t.Parallel()
		const role = "lim_lockpast_rel"
		pw := newRole(t, role, -1)
		const st = 2 * time.Second
		// A wait_timeout that keeps the admission's own time from running out.
		p := passthroughLimits(t, map[string]limiter.Rule{role: {MaxSessions: 1, Policy: limiter.PolicyReject,
			Fallback: limiter.PolicyReject, WaitTimeout: 5 * time.Minute}}, proxyOpts{startupTimeout: st})
		connect(t, shared.DSN(role, pw, "app"))
		unlock := holdRoleLock(t, p, role)
		res := loginAsync(p.DSN(role, pw, "app"))
		// The passthrough login is registered once the server has logged it
		// in; its Start is when rolegate accepted it, on rolegate's clock.
		var start time.Time
		waitUntil(t, time.Minute, "the login to reach admission", func() bool {
			for _, s := range p.Sessions() {
				if s.User == role {
					start = s.Start
					return true
				}
			}
			return false
		})
		waitUntil(t, time.Minute, "the login's startup deadline to pass", func() bool { return time.Since(start) > st })
		unlock()
		r := <-res
		if r.err == nil {
			r.conn.Close(ctx)
			t.Fatal("admitted with the slot held")
		}
		wantTooMany(t, r.err, "role", role)
	})

	t.Run("admission time runs out in the lock", func(t *testing.T) {
		t.Parallel()
		const role = "lim_lockpast_out"
		pw := newRole(t, role, -1)
		p := rulesProxyWith(t, mapRules{roles: map[string]limiter.Rule{role: {MaxSessions: 1, Policy: limiter.PolicyWait,
			Fallback: limiter.PolicyReject, WaitTimeout: time.Second}}}, proxyOpts{startupTimeout: 2 * time.Second})
		defer holdRoleLock(t, p, role)()
		// The lock stays held: the login's admission time runs out in it.
		var addr string
		c, err := tryConnect(p.DSN(role, pw, "app"), time.Minute, &addr)
		if err == nil {
			c.Close(ctx)
			t.Fatal("admitted with the admission lock held")
		}
		wantTooMany(t, err, "role", role)
		// No census was taken: the DETAIL still names the limit and its
		// source, and says the time ran out.
		var pe *pgconn.PgError
		if errors.As(err, &pe) && (!strings.HasPrefix(pe.Detail, `The limit of 1 session for role "`+role+`" comes from proxy.toml. `+
			"The login's admission time (startup_timeout and wait_timeout) ran out after ") ||
			!strings.HasPrefix(pe.Hint, "Try again later, ")) {
			t.Errorf("DETAIL %q, HINT %q", pe.Detail, pe.Hint)
		}
		lines := logged(t, p, 1, "client="+addr+" ", "msg=rejected")
		if !strings.Contains(lines[0], "waited for the admission lock") {
			t.Errorf("rejection line: %s", lines[0])
		}
		if l := logLines(p, "admission failed"); len(l) != 0 {
			t.Errorf("admission failed: %q", l)
		}
	})
}

// holdRoleLock takes the admission lock of role that p's logins take (the
// server's advisory lock when the server view has one, else the limiter's),
// as a login of the role deciding would hold it, and returns its release.
func holdRoleLock(t *testing.T, p *testProxy, role string) (unlock func()) {
	t.Helper()
	lock := p.cfg.Limits.Limiter.Lock
	if remote, ok := p.cfg.Limits.Server.(serverLocker); ok {
		lock = remote.LockRole
	}
	unlock, err := lock(context.Background(), role)
	if err != nil {
		t.Fatal(err)
	}
	return unlock
}

// stallConn is a client that stops reading when rolegate sends it a 53300: a
// write of it blocks until the write deadline (or the close), as a write to a
// socket whose buffers are full would. A real TCP client cannot show this:
// the 53300 is a hundred bytes, which any socket buffer takes.
type stallConn struct {
	net.Conn
	mu       sync.Mutex
	deadline time.Time
	closed   chan struct{}
	once     sync.Once
}

func (c *stallConn) SetDeadline(t time.Time) error {
	c.mu.Lock()
	c.deadline = t
	c.mu.Unlock()
	return c.Conn.SetDeadline(t)
}

func (c *stallConn) SetWriteDeadline(t time.Time) error {
	c.mu.Lock()
	c.deadline = t
	c.mu.Unlock()
	return c.Conn.SetWriteDeadline(t)
}

func (c *stallConn) Write(b []byte) (int, error) {
	if !bytes.Contains(b, []byte("C53300\x00")) {
		return c.Conn.Write(b)
	}
	c.mu.Lock()
	d := c.deadline
	c.mu.Unlock()
	var expired <-chan time.Time
	if !d.IsZero() {
		timer := time.NewTimer(time.Until(d))
		defer timer.Stop()
		expired = timer.C
	}
	select {
	case <-expired:
		return 0, os.ErrDeadlineExceeded
	case <-c.closed:
		return 0, net.ErrClosed
	}
}

func (c *stallConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

// activeConns is how many connections the proxy is handling.
func activeConns(p *testProxy) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.active
}

// A client that stops reading when it is rejected cannot hold its session:
// the write of the 53300 has its own bound, however long startup_timeout is.
func TestLimitRejectionToClientThatDoesNotRead(t *testing.T) {
	t.Parallel()
	const role = "lim_reject_noread"
	pw := newRole(t, role, -1)
	p := rulesProxyWith(t, mapRules{roles: map[string]limiter.Rule{role: {MaxSessions: 1, Policy: limiter.PolicyReject,
		Fallback: limiter.PolicyReject}}},
		proxyOpts{startupTimeout: 10 * time.Minute, wrap: func(c net.Conn) net.Conn {
			return &stallConn{Conn: c, closed: make(chan struct{})}
		}})
	connect(t, shared.DSN(role, pw, "app"))
	res := loginAsync(p.DSN(role, pw, "app"))
	waitUntil(t, time.Minute, "the rejection to be sent", func() bool { return len(logLines(p, "msg=rejected")) == 1 })
	// The startup deadline is minutes away: only the write's own bound can
	// end the session now.
	waitUntil(t, time.Minute, "the rejected session to end", func() bool { return activeConns(p) == 0 })
	logged(t, p, 1, `msg="could not send the rejection"`, "i/o timeout")
	if r := <-res; r.err == nil {
		r.conn.Close(context.Background())
		t.Fatal("admitted with the slot held")
	}
}

// pendingLogins matches census rows by the server connection's address when
// the census shows one, else by pid.
func TestPendingLoginsMatcher(t *testing.T) {
	var p pendingLogins
	if p.matcher()(limiter.Holder{PID: 1}) {
		t.Error("an empty set matched")
	}
	server, peer := tcpPair(t)
	defer server.Close()
	defer peer.Close()
	local := server.LocalAddr().(*net.TCPAddr)
	client := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(local.Port))
	other := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(local.Port)+1)

	a := &session{}
	p.add(a, server)
	match := p.matcher()
	for _, tt := range []struct {
		h    limiter.Holder
		want bool
	}{
		{limiter.Holder{PID: 7, Client: client}, true},
		{limiter.Holder{PID: 7, Client: other}, false},
		{limiter.Holder{PID: 7}, false}, // pid not known yet
	} {
		if got := match(tt.h); got != tt.want {
			t.Errorf("before the pid: match(%+v) = %v, want %v", tt.h, got, tt.want)
		}
	}
	p.setPID(a, 7)
	match = p.matcher()
	for _, tt := range []struct {
		h    limiter.Holder
		want bool
	}{
		{limiter.Holder{PID: 7, Client: client}, true},
		// A row with an address is judged by it: pid 7 from elsewhere is
		// another backend that took a pid the login's backend left.
		{limiter.Holder{PID: 7, Client: other}, false},
		{limiter.Holder{PID: 7}, true}, // no address visible: by pid
		{limiter.Holder{PID: 8}, false},
		{limiter.Holder{}, false},
	} {
		if got := match(tt.h); got != tt.want {
			t.Errorf("with the pid: match(%+v) = %v, want %v", tt.h, got, tt.want)
		}
	}
	p.remove(a)
	p.remove(a)
	if p.matcher()(limiter.Holder{PID: 7, Client: client}) {
		t.Error("matched after remove")
	}
}
