package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"runtime/debug"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/internal/wire"
	"github.com/rolegate/rolegate/upstream"
)

// clientConn is one client connection from accept to close: its session, its
// sockets and readers, its logger and its deadline, and what each step of the
// login hands to the next. Its methods run in order on the connection's own
// goroutine (serve): negotiate, authenticate, admit, connect, hand off,
// relay. Only the sockets and the session are shared with other goroutines.
type clientConn struct {
	s       *Server
	sess    *session
	ctx     context.Context // the session's; cancelling it closes the sockets
	cancel  context.CancelCauseFunc
	log     *slog.Logger // gains the role, database and pid as they are known
	sockets sockets      // what a cancelled ctx closes; stop ends that link
	stop    func() bool

	// The client side. client is the accepted connection, then the TLS one
	// once negotiated; cr reads it from authentication on.
	client   net.Conn
	cr       *bufio.Reader
	startup  *startupPacket // nil until a startup packet was accepted
	deadline time.Time      // the login's: startup_timeout from accept, moved on after a wait for a slot

	// Authentication and admission.
	lookup  *lookup    // proxy mode: the role's secret, fetched while the client is asked for its password
	keys    *auth.Keys // proxy mode: the client's recovered keys, which log in to the server
	lease   *lease     // proxy mode: the admitted login's reserved slot, until its backend is counted
	counted bool       // a limit applied to the login: its session's end is signalled to other instances
	dryRun  bool       // a dry-run rule would not have admitted it: the server's 53300 is passed on
	// detached: the session was handed to the event loop, which ends it; the
	// goroutine that handled the login has returned.
	detached bool
	authOut  []byte // passthrough: the server's messages up to AuthenticationOk, which a rejection still sends
	// pendingUntilGone: a passthrough login refused after the server logged
	// it in; it stays a pending login until its backend has exited (close).
	pendingUntilGone bool

	// The server side, from connect on; the relay owns server and sr after
	// the hand-off.
	server net.Conn
	lc     *upstream.LoginConn // server during the login: each server turn bounded, errors name their step
	sr     *bufio.Reader
	out    []byte       // the server's messages for the client, not sent yet
	ready  wire.Message // the server's first ReadyForQuery, held until the hand-off
}

// handle serves one client connection from accept to close. It owns raw. A
// session it hands to the event loop (relayOnLoop) is detached: handle
// returns true at once, and the session's end runs finish then.
func (s *Server) handle(raw net.Conn) (detached bool) {
	c := s.newConn(raw)
	defer func() {
		if !c.detached {
			c.finish()
		}
	}()
	defer func() {
		if v := recover(); v != nil {
			detached = c.detached
			c.log.Error("session panicked; closing it", "panic", v, "stack", string(debug.Stack()))
		}
	}()
	c.serve()
	return c.detached
}

// finish is the end of every connection: it leaves the session list, closes
// both sockets and frees the session's slot (close), and ends its context.
func (c *clientConn) finish() {
	c.s.registry.remove(c.sess)
	c.close()
	c.cancel(nil)
}

// newConn sets up the connection's value and registers its session: listed
// from accept on, in state startup, the admin views show logins in flight
// (see SessionInfo for what they show of an unverified client).
func (s *Server) newConn(raw net.Conn) *clientConn {
	ctx, cancel := context.WithCancelCause(s.ctx)
	sess := &session{id: s.nextID.Add(1), clientAddr: raw.RemoteAddr().String(), start: time.Now(),
		serverGone: make(chan struct{})}
	sess.clientIP = addrOf(sess.clientAddr)
	sess.touch(sess.start)
	c := &clientConn{s: s, sess: sess, ctx: ctx, cancel: cancel, client: raw,
		log: s.log.With("client", sess.clientAddr), deadline: sess.start.Add(s.cfg.StartupTimeout)}
	s.registry.register(sess)
	c.sockets.set(&c.sockets.client, raw)
	c.stop = context.AfterFunc(ctx, func() { c.sockets.cancelled(ctx) })
	return c
}

// close ends the connection: both sockets close, and a session that held a
// slot frees it, once the server socket is gone.
func (c *clientConn) close() {
	c.stop()
	if c.pendingUntilGone {
		c.endBackend()
		c.s.pending.remove(c.sess)
	}
	c.sockets.close()
	c.sess.markServerGone()
	if c.s.cfg.Limits != nil && c.sess.loggedIn {
		// Only a session that held a slot frees one: a failed login must
		// not wake waiters (and make rolegate query the server) for nothing.
		c.s.cfg.Limits.Limiter.Released(c.sess.user, c.sess.database)
		if c.counted {
			c.s.signalSlot(upstream.SlotFreed, c.sess.user, c.sess.database)
		}
	}
}

// endBackend ends the backend of a login that failed after the server
// logged it in, and returns once the backend has exited (the server closes
// the socket after the backend left pg_stat_activity), or after
// victimGoneTimeout: until then other logins' census must not count it.
func (c *clientConn) endBackend() {
	_ = c.server.SetDeadline(time.Now().Add(victimGoneTimeout))
	if _, err := c.server.Write(wire.Encode(nil, &pgproto3.Terminate{})); err == nil {
		_, _ = io.Copy(io.Discard, c.server)
	}
}

// serve runs the connection's steps in order; any that fails ends it with
// fail, which tells the client, logs and counts.
func (c *clientConn) serve() {
	_ = c.client.SetDeadline(c.deadline)
	if err := c.negotiate(); err != nil {
		c.fail(err)
		return
	}
	switch c.startup.kind {
	case kindCancel, kindPeerCancel:
		c.forwardCancel()
		return
	case kindPeerStatus:
		c.answerStatus()
		return
	case kindPeerNotice:
		c.takeNotice()
		return
	}
	c.identify()
	if err := c.login(); err != nil {
		c.fail(err)
		return
	}
	c.relay()
}

// identify records who the client says it is; it proves it next.
func (c *clientConn) identify() {
	p, sess := c.startup, c.sess
	sess.set(func() {
		sess.user = p.params["user"]
		sess.database = p.params["database"]
		sess.appName = p.params["application_name"]
		sess.replication = isReplication(p.params["replication"])
	})
	c.log = c.log.With("role", sess.user, "database", sess.database)
	sess.setState(StateAuthenticating)
	c.cr = bufio.NewReader(c.client)
}

// login takes the client from its startup packet to its first ReadyForQuery,
// in the order of the authentication mode: in proxy mode authenticate, admit,
// connect, hand off (admitting and connecting again when the server is at
// its limit after all); in passthrough connect, authenticate through the
// server, admit, hand off.
func (c *clientConn) login() error {
	if c.s.cfg.Auth != nil {
		// The role's secret is fetched while the client is asked for its password.
		c.lookup = c.s.cfg.Auth.startLookup(c.ctx, c.sess.user, c.deadline)
		defer c.lookup.stop()
	}
	if p := c.startup; p.minor > 0 || len(p.unrecognized) > 0 {
		// Speak 3.0: PostgreSQL's answer to a newer minor or unknown _pq_ options.
		msg := wire.Encode(nil, &pgproto3.NegotiateProtocolVersion{NewestMinorProtocol: 0, UnrecognizedOptions: p.unrecognized})
		if _, err := c.client.Write(msg); err != nil {
			return errClientClosed
		}
	}
	console := c.sess.database == c.s.cfg.ConsoleDatabase
	if c.s.cfg.Auth == nil {
		if console {
			return fatal("28000", "the rolegate console needs proxy authentication ([auth] mode = \"proxy\")", "console refused")
		}
		return c.loginPassthrough()
	}
	// The client proves who it is before rolegate counts, waits or evicts for it.
	if err := c.authenticate(); err != nil {
		return err
	}
	if console {
		// A console session is not a server session: it leaves the list.
		c.s.registry.remove(c.sess)
		return c.s.serveConsole(c.ctx, c.sess, c.client, c.cr, c.log)
	}
	return c.admitAndLogIn()
}

// admitAndLogIn admits an authenticated client (proxy mode) and logs it in
// to the server. When the server refuses the login at its own limit all the
// same, it tries again a few times: with the reserved slot kept, after a
// short pause, or, when nothing was reserved, through admission again.
func (c *clientConn) admitAndLogIn() error {
	admitted := false
	var full time.Time // the server's first 53300 to this login
	for attempt := 1; ; attempt++ {
		if !admitted {
			if err := c.admit(); err != nil {
				return err
			}
			admitted = true
			if time.Until(c.deadline) < c.s.cfg.StartupTimeout/2 {
				// Time spent waiting for a slot does not count against the login.
				c.deadline = time.Now().Add(c.s.cfg.StartupTimeout / 2)
				_ = c.client.SetDeadline(c.deadline)
			}
		}
		err := c.loginAs(c.s.cfg.Limits != nil && c.mayRetryFull(attempt, full))
		if !errors.Is(err, errServerFull) {
			return err
		}
		if full.IsZero() {
			full = time.Now()
		}
		c.sockets.drop(&c.sockets.server)
		if c.lease.reserved() {
			// The census showed the slot free, and it is still reserved for
			// this login: the server counts a backend on its way out (its
			// pg_stat_activity row goes before its slot does), or a session
			// from elsewhere took it. Try again shortly, keeping the slot.
			c.log.Info("server at its limit after admission; trying again", "attempt", attempt)
			t := time.NewTimer(min(serverFullBackoff<<min(attempt-1, 10), serverFullMaxBackoff))
			select {
			case <-t.C:
			case <-c.ctx.Done():
				t.Stop()
				c.lease.release(false)
				return context.Cause(c.ctx)
			}
			continue
		}
		// A session from elsewhere took the slot between census and login.
		c.log.Info("server at its limit after admission; admitting again", "attempt", attempt)
		admitted = false
	}
}

// mayRetryFull reports whether the server's 53300 to this login's next
// attempt is to be held back and the login tried again. A login holding a
// reserved slot keeps trying for serverFullPatience from the first 53300: a
// backend on its way out leaves pg_stat_activity a little before it frees
// its slot on the server, longer on a busy server, and the census already
// counted that slot free. A login without a reservation (rolegate had no
// limit to count it against) goes through admission again, serverRetries
// times at most.
func (c *clientConn) mayRetryFull(attempt int, full time.Time) bool {
	if c.dryRun {
		return false // a dry run admitted it over a limit: the server's 53300 is the answer
	}
	if c.lease.reserved() {
		return full.IsZero() || time.Since(full) < serverFullPatience
	}
	return attempt < serverRetries
}

// serverFullPatience bounds how long a reserved login is tried again after
// the server's 53300; serverFullMaxBackoff caps the pause between tries.
const (
	serverFullPatience   = 2 * time.Second
	serverFullMaxBackoff = 200 * time.Millisecond
)

// serverFullBackoff is the first pause before a login that holds a reserved
// slot tries the server again after its 53300; each retry waits twice as
// long. The first is short: the usual cause is a victim that has just left
// pg_stat_activity and frees its slot a moment later.
const serverFullBackoff = time.Millisecond

// loginAs logs in to the server as the client, with its recovered keys, and
// hands the session over. With holdFull, the server's own 53300 is returned
// as errServerFull instead of being passed on, and the lease is kept for the
// next try; otherwise the lease ends here, on every path.
func (c *clientConn) loginAs(holdFull bool) (err error) {
	loggedIn := false
	defer func() {
		if !errors.Is(err, errServerFull) || !c.lease.reserved() {
			// The reserved slot passes to the backend, which is in
			// pg_stat_activity once the server sent ReadyForQuery, or is
			// freed when the login failed; also on a panic.
			c.lease.release(loggedIn)
		}
	}()
	c.sess.setState(StateConnecting)
	if err := c.connect(); err != nil {
		return err
	}
	if c.sess.serverAuth, err = upstream.Authenticate(c.sr, c.lc, c.keys, upstream.ChannelBinding(c.server)); err != nil {
		return c.upstreamAuthFailed(c.lc.Fail(err))
	}
	c.out = wire.Encode(c.out, &pgproto3.AuthenticationOk{})
	c.lc.Begin(upstream.StepReady)
	if err := c.awaitReady(holdFull); err != nil {
		return err
	}
	err = c.handOff()
	loggedIn = err == nil
	return err
}

// connect opens the server connection and sends the client's startup
// parameters; each of the server's turns from here to ReadyForQuery is
// bounded by connect_timeout, and fails with an error that names its step.
func (c *clientConn) connect() error {
	s, sess := c.s, c.sess
	c.out = nil
	dctx, cancel := context.WithDeadline(c.ctx, c.deadline)
	defer cancel()
	dialStart := time.Now()
	server, useTLS, err := s.cfg.Upstream.Dial(dctx)
	s.obs.ServerDialed(time.Since(dialStart), err)
	if err != nil {
		if c.ctx.Err() != nil { // shutdown: the client's socket is closing
			return context.Cause(c.ctx)
		}
		return s.serverLost(nil, err)
	}
	if !c.sockets.set(&c.sockets.server, server) {
		return context.Cause(c.ctx)
	}
	c.server = server
	c.lease.identify(backendClient(server), 0)
	sess.set(func() { sess.serverTLS = useTLS })
	if s.cfg.Auth == nil && s.cfg.Limits != nil {
		// Passthrough: the backend the server gives this login counts
		// against no one until admission has decided on it (see
		// pendingLogins); loginPassthrough ends that.
		s.pending.add(sess, server)
	}
	c.lc = s.cfg.Upstream.LoginConn(server, c.deadline)
	c.lc.Begin(upstream.StepStartup)
	startup := wire.Encode(nil, &pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30, Parameters: c.startup.params})
	if _, err := server.Write(startup); err != nil {
		return s.serverLost(nil, c.lc.Fail(err))
	}
	c.sr = bufio.NewReader(c.lc)
	return nil
}

// upstreamAuthFailed reports a server that refused the keys of a client
// rolegate had authenticated: the server's own error goes to the client as
// sent. A 28P01 means the verifier rolegate checked was stale (a stand-in, or
// a password changed during the login), so nothing may stand in for it again.
func (c *clientConn) upstreamAuthFailed(err error) error {
	var se *upstream.ServerError
	if errors.As(err, &se) {
		if se.Code == "28P01" {
			c.s.cfg.Auth.Store.Forget(c.sess.user)
		}
		return &clientError{code: se.Code, msg: se.Message, raw: se.Raw, class: ReasonRefusedByServer}
	}
	// rolegate itself cannot answer the server's request (28000), or the
	// connection failed on the way (08006).
	var cannot *upstream.CannotAnswerError
	if !errors.As(err, &cannot) {
		return c.s.serverLost(nil, err)
	}
	return fatal("28000", `rolegate could not log in to the server as "`+c.sess.user+`": `+cannot.Error(), ReasonRefusedByServer)
}

// awaitReady reads what the server sends after AuthenticationOk up to its
// first ReadyForQuery, which it keeps for the hand-off, and issues the
// client's cancel key: the server's pid and rolegate's own secret. With
// holdFull, the server's 53300 is errServerFull.
func (c *clientConn) awaitReady(holdFull bool) error {
	sess := c.sess
	for {
		m, err := wire.ReadMessage(c.sr, wire.MaxServerLoginMsg)
		if err != nil {
			return c.s.serverLost(c.out, err)
		}
		switch m.Type {
		case 'K':
			var k pgproto3.BackendKeyData
			if err := k.Decode(m.Body); err != nil {
				return c.s.serverLost(c.out, err)
			}
			sess.set(func() { sess.backendPID, sess.backendKey = k.ProcessID, k.SecretKey })
			c.lease.identify(netip.AddrPort{}, k.ProcessID)
			// Registration issues the client's key: the server's pid with a
			// secret of rolegate's own. It must happen before the client can use it.
			c.s.registry.add(sess)
			c.out = wire.Encode(c.out, &pgproto3.BackendKeyData{ProcessID: sess.cancelKey.pid, SecretKey: sess.cancelKey.secretBytes()})
		case 'Z':
			c.ready = m
			return nil
		case 'E':
			refused := refusedBy(m, c.out)
			if holdFull && refused.class == ReasonRefusedByServer && refused.code == "53300" {
				return errServerFull
			}
			return refused
		case 'S', 'N':
			c.out = append(c.out, m.Raw()...)
		default:
			return c.s.serverLost(c.out, fmt.Errorf("unexpected message type %q during login", m.Type))
		}
	}
}

// handOff sends the client what the server said after authentication, with
// its ReadyForQuery: the session is logged in.
func (c *clientConn) handOff() error {
	if err := writeClient(c.client, append(c.out, c.ready.Raw()...)); err != nil {
		return errClientClosed
	}
	if len(c.ready.Body) == 1 {
		c.sess.setState(txState(c.ready.Body[0]))
	}
	return nil
}

// relay moves the logged-in session's bytes until either side ends it. The
// relay owns the server connection and its reader from here.
func (c *clientConn) relay() {
	s, sess := c.s, c.sess
	sess.loggedIn = true
	s.obs.LoginDone(sess.user, sess.database, time.Since(sess.start))
	c.log = c.log.With("pid", sess.backendPID)
	_ = c.client.SetDeadline(time.Time{})
	_ = c.server.SetDeadline(time.Time{})

	c.log.Info("login", "application_name", sess.appName, "client_tls", sess.clientTLS,
		"server_tls", sess.serverTLS, "server_auth", sess.serverAuth, "replication", sess.replication)

	c.sockets.startRelay()
	// The relay owns the readers from here, and lets their buffers go once
	// it has taken what they read ahead; an idle session keeps nothing of
	// its login.
	c.lc, c.out, c.ready, c.authOut, c.keys, c.lookup, c.lease = nil, nil, wire.Message{}, nil, nil, nil, nil
	if c.relayOnLoop() {
		return // the loop ends the session (loopRelay.Closed)
	}
	cr, sr := c.cr, c.sr
	c.cr, c.sr = nil, nil
	c.relayEnded(s.relay(c.ctx, c.cancel, sess, c.client, cr, c.server, sr))
}

// relayEnded records the end of a relayed session.
func (c *clientConn) relayEnded(why error) {
	s, sess := c.s, c.sess
	sess.setState(StateClosing)
	s.obs.SessionEnded(sess.user, sess.database, sess.bytesIn.Load(), sess.bytesOut.Load())
	c.log.Info("session ended", "reason", why.Error(), "duration", time.Since(sess.start).Round(time.Millisecond),
		"bytes_in", sess.bytesIn.Load(), "bytes_out", sess.bytesOut.Load())
}

// txState maps ReadyForQuery's transaction status to a session state.
func txState(status byte) State {
	switch status {
	case 'T':
		return StateIdleInTransaction
	case 'E':
		return StateIdleInFailedTransaction
	}
	return StateIdle
}

// sockets holds a session's sockets so that cancelling the session's context
// can close them from any goroutine: blocked reads ignore contexts.
type sockets struct {
	mu             sync.Mutex
	closed         bool
	relaying       bool // a logged-in session: a shutdown closes the server side first
	client, server net.Conn
}

// set records c for closing; if the session is already over it closes c and
// reports false.
func (p *sockets) set(slot *net.Conn, c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		c.Close()
		return false
	}
	*slot = c
	return true
}

// drop closes and forgets one socket, for a server connection that is replaced.
func (p *sockets) drop(slot *net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if *slot != nil {
		(*slot).Close()
		*slot = nil
	}
}

// handedOff forgets both sockets: the event loop owns them now.
func (p *sockets) handedOff() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.client, p.server = nil, nil
}

// startRelay marks the session logged in and relaying.
func (p *sockets) startRelay() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.relaying = true
}

// cancelled is the session context's end: everything closes, but for a
// relaying session that rolegate's shutdown ends, where only the server side
// closes and the relay tells the client why before closing its side.
func (p *sockets) cancelled(ctx context.Context) {
	if errors.Is(context.Cause(ctx), errShutdown) {
		p.mu.Lock()
		relaying, client, server := p.relaying, p.client, p.server
		p.mu.Unlock()
		if relaying && server != nil {
			// A relay blocked writing to a client that does not read would
			// never see the server's close: the deadline bounds it.
			_ = client.SetWriteDeadline(time.Now().Add(shutdownNoticeTimeout))
			server.Close()
			return
		}
	}
	p.close()
}

func (p *sockets) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	for _, c := range []net.Conn{p.client, p.server} {
		if c != nil {
			c.Close()
		}
	}
}
