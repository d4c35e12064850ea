package proxy

import (
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/config"
	"github.com/rolegate/rolegate/limiter"
)

// gate forwards connections to the real server. The server's bytes on the
// first connection are held back until open is called, so the login that
// makes it stays in its server login (admitted, reserved, waiting for the
// server's authentication request) for as long as the test wants.
type gate struct {
	ln     net.Listener
	target string
	once   sync.Once
	opened chan struct{}
	mu     sync.Mutex
	n      int
	conns  []net.Conn
	wg     sync.WaitGroup
}

func newGate(t *testing.T, target string) *gate {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := &gate{ln: ln, target: target, opened: make(chan struct{})}
	g.wg.Go(g.serve)
	t.Cleanup(g.close)
	return g
}

func (g *gate) addr() string { return g.ln.Addr().String() }

// open lets the first connection's server bytes through; safe to call twice.
func (g *gate) open() { g.once.Do(func() { close(g.opened) }) }

func (g *gate) serve() {
	for {
		c, err := g.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", g.target)
		if err != nil {
			c.Close()
			continue
		}
		g.mu.Lock()
		g.n++
		held := g.n == 1
		g.conns = append(g.conns, c, s)
		g.mu.Unlock()
		g.wg.Go(func() {
			_, _ = io.Copy(s, c)
			_ = s.(*net.TCPConn).CloseWrite()
		})
		g.wg.Go(func() {
			if held {
				<-g.opened
			}
			_, _ = io.Copy(c, s)
			_ = c.(*net.TCPConn).CloseWrite()
		})
	}
}

func (g *gate) close() {
	g.open()
	g.ln.Close()
	g.mu.Lock()
	for _, c := range g.conns {
		c.Close()
	}
	g.mu.Unlock()
	g.wg.Wait()
}

// gatedProxy is a proxy-mode proxy with rule for role whose server
// connections go through a gate, whose first connection it holds.
func gatedProxy(t *testing.T, role string, rule limiter.Rule) (p *testProxy, g *gate, pw string) {
	t.Helper()
	pw = newRole(t, role, -1)
	ctl := superControl(t, shared)
	g = newGate(t, shared.Addr())
	lim := &Limits{Limiter: limiter.New(time.Now), Server: ctl}
	lim.SetRules(mapRules{roles: map[string]limiter.Rule{role: rule}}, true, 0)
	p = startProxy(t, proxyOpts{auth: proxyAuth(time.Minute, auth.SourceFunc(ctl.Secret)), limits: lim, serverAddr: g.addr(),
		sslmode: config.SSLDisable, startupTimeout: time.Minute})
	return p, g, pw
}

// bgLogin is a login started in the background; done says when it has ended.
type bgLogin struct {
	done chan error
	conn *pgx.Conn // once done
}

func startLogin(dsn string) *bgLogin {
	l := &bgLogin{done: make(chan error, 1)}
	go func() {
		var err error
		l.conn, err = tryConnect(dsn, 2*time.Minute, nil)
		l.done <- err
	}()
	return l
}

// wait returns the login's connection once it has logged in, closed with the test.
func (l *bgLogin) wait(t *testing.T, what string) *pgx.Conn {
	t.Helper()
	if err := <-l.done; err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	t.Cleanup(func() { l.conn.Close(context.Background()) })
	return l.conn
}

// Under newest-wins the admission locks are held only while deciding: a
// login of the role is admitted, and logs in, while another login of the
// role is still in its server login (here held there by the gate), instead
// of waiting for that login's lock.
func TestNewestWinsDoesNotWaitForLoginInFlight(t *testing.T) {
	t.Parallel()
	const role = "inflight_two"
	p, g, pw := gatedProxy(t, role, limiter.Rule{MaxSessions: 2, Policy: limiter.PolicyNewestWins})
	first := startLogin(p.DSN(role, pw, "app"))
	waitUntil(t, time.Minute, "the first login in its server login", func() bool {
		return sessionIn(p, role, StateConnecting)
	})
	second := startLogin(p.DSN(role, pw, "app")).wait(t, "second login while the first is in flight")
	select {
	case err := <-first.done:
		t.Fatalf("the first login ended before the gate opened: %v", err)
	default:
	}
	g.open()
	wantAlive(t, first.wait(t, "first login"), "the first login")
	wantAlive(t, second, "the second login")
}

// Under newest-wins with limit 1, a login that finds the role's slot held
// by a login still logging in waits for it to become a session, then
// evicts it: the login in flight is told why, as any evicted session is,
// and the newer one stays. wait_timeout is 0: this wait is part of evicting.
func TestNewestWinsEvictsLoginInFlight(t *testing.T) {
	t.Parallel()
	const role = "inflight_one"
	p, g, pw := gatedProxy(t, role, limiter.Rule{MaxSessions: 1, Policy: limiter.PolicyNewestWins, Fallback: limiter.PolicyReject})
	first := startLogin(p.DSN(role, pw, "app"))
	waitUntil(t, time.Minute, "the first login in its server login", func() bool {
		return sessionIn(p, role, StateConnecting)
	})
	second := startLogin(p.DSN(role, pw, "app"))
	waitUntil(t, time.Minute, "the second login waiting for the login in flight", func() bool {
		return strings.Contains(waitOf(p, role), "held by logins in flight")
	})
	g.open()
	firstConn := first.wait(t, "first login")
	secondConn := second.wait(t, "second login")
	wantEvicted(t, firstConn, "role", role, limiter.PolicyNewestWins)
	wantAlive(t, secondConn, "the newer login")
	if l := admissionWarnings(p); len(l) != 0 {
		t.Errorf("warnings: %q", l)
	}
}

// sessionIn reports whether a session of role is in state.
func sessionIn(p *testProxy, role string, state State) bool {
	for _, s := range p.Sessions() {
		if s.User == role && s.State == state {
			return true
		}
	}
	return false
}

// A passthrough login refused after the server logged it in leaves a
// backend that the server counts until it exits. It stays a pending login
// (left out of every census) until then: once it has left the pending set,
// its backend is gone from pg_stat_activity.
func TestPassthroughRefusedBackendPendingUntilGone(t *testing.T) {
	t.Parallel()
	const role = "pt_gone"
	pw := newRole(t, role, -1)
	ctl := superControl(t, shared)
	lim := &Limits{Limiter: limiter.New(time.Now), Server: ctl}
	lim.SetRules(mapRules{roles: map[string]limiter.Rule{role: {MaxSessions: 1, Policy: limiter.PolicyReject}}}, true, 0)
	p := startProxy(t, proxyOpts{limits: lim}) // passthrough
	holder := connect(t, p.DSN(role, pw, "app"))
	defer holder.Close(context.Background())
	su := connect(t, shared.SuperDSN())
	for i := range 5 {
		app := fmt.Sprintf("pt_gone_%d", i)
		_, err := tryConnect(p.DSN(role, pw, "app")+" application_name="+app, time.Minute, nil)
		wantTooMany(t, err, "role", role)
		waitUntil(t, time.Minute, "the refused login out of the pending set", func() bool {
			p.pending.mu.Lock()
			defer p.pending.mu.Unlock()
			return len(p.pending.logins) == 0
		})
		var n int
		if err := su.QueryRow(context.Background(), "select count(*) from pg_stat_activity where application_name = $1", app).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n != 0 {
			t.Fatalf("refused login %d: its backend is in pg_stat_activity after it left the pending set", i)
		}
	}
	wantAlive(t, holder, "the session holding the slot")
}
