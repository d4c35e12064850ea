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

// Under newest-wins the admission locks are held only while deciding: a
// login of the role is admitted, and logs in, while another login of the
// role is still in its server login (here held there by the gate), instead
// of waiting for that login's lock.
func TestNewestWinsDoesNotWaitForLoginInFlight(t *testing.T) {
	t.Parallel()
	const role = "inflight_two"
	pw := newRole(t, role, -1)
	ctl := superControl(t, shared)
	g := newGate(t, shared.Addr())
	lim := &Limits{Limiter: limiter.New(time.Now), Server: ctl}
	lim.SetRules(mapRules{roles: map[string]limiter.Rule{role: {MaxSessions: 2, Policy: limiter.PolicyNewestWins}}}, true, 0)
	p := startProxy(t, proxyOpts{auth: proxyAuth(time.Minute, auth.SourceFunc(ctl.Secret)), limits: lim, serverAddr: g.addr(),
		sslmode: config.SSLDisable, startupTimeout: time.Minute})

	first := make(chan error, 1)
	var firstConn *pgx.Conn
	go func() {
		c, err := tryConnect(p.DSN(role, pw, "app"), 2*time.Minute, nil)
		firstConn = c
		first <- err
	}()
	waitUntil(t, time.Minute, "the first login in its server login", func() bool {
		return sessionIn(p, role, StateConnecting)
	})
	second, err := tryConnect(p.DSN(role, pw, "app"), 2*time.Minute, nil)
	if err != nil {
		t.Fatalf("second login while the first is in flight: %v", err)
	}
	defer second.Close(context.Background())
	select {
	case err := <-first:
		t.Fatalf("the first login ended before the gate opened: %v", err)
	default:
	}
	g.open()
	if err := <-first; err != nil {
		t.Fatalf("first login: %v", err)
	}
	defer firstConn.Close(context.Background())
	wantAlive(t, firstConn, "the first login")
	wantAlive(t, second, "the second login")
}

// Under newest-wins with limit 1, a login that finds the role's slot held
// by a login still logging in waits for it to become a session, then
// evicts it: the login in flight is told why, as any evicted session is,
// and the newer one stays. wait_timeout is 0: this wait is part of evicting.
func TestNewestWinsEvictsLoginInFlight(t *testing.T) {
	t.Parallel()
	const role = "inflight_one"
	pw := newRole(t, role, -1)
	ctl := superControl(t, shared)
	g := newGate(t, shared.Addr())
	lim := &Limits{Limiter: limiter.New(time.Now), Server: ctl}
	lim.SetRules(mapRules{roles: map[string]limiter.Rule{role: {MaxSessions: 1, Policy: limiter.PolicyNewestWins,
		Fallback: limiter.PolicyReject}}}, true, 0)
	p := startProxy(t, proxyOpts{auth: proxyAuth(time.Minute, auth.SourceFunc(ctl.Secret)), limits: lim, serverAddr: g.addr(),
		sslmode: config.SSLDisable, startupTimeout: time.Minute})

	first := make(chan error, 1)
	var firstConn *pgx.Conn
	go func() {
		c, err := tryConnect(p.DSN(role, pw, "app"), 2*time.Minute, nil)
		firstConn = c
		first <- err
	}()
	waitUntil(t, time.Minute, "the first login in its server login", func() bool {
		return sessionIn(p, role, StateConnecting)
	})
	second := make(chan error, 1)
	var secondConn *pgx.Conn
	go func() {
		c, err := tryConnect(p.DSN(role, pw, "app"), 2*time.Minute, nil)
		secondConn = c
		second <- err
	}()
	waitUntil(t, time.Minute, "the second login waiting for the login in flight", func() bool {
		for _, s := range p.Sessions() {
			if s.User == role && s.State == StateWaiting && strings.Contains(s.Wait, "held by logins in flight") {
				return true
			}
		}
		return false
	})
	g.open()
	if err := <-first; err != nil {
		t.Fatalf("first login: %v", err)
	}
	defer firstConn.Close(context.Background())
	if err := <-second; err != nil {
		t.Fatalf("second login: %v", err)
	}
	defer secondConn.Close(context.Background())
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
