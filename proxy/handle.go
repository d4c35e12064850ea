package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/internal/wire"
	"github.com/rolegate/rolegate/upstream"
)

// Why sessions end. A client or server that closes its connection is the normal
// end of a session, not a failure.
var (
	errClientClosed = errors.New("client closed the connection")
	errServerClosed = errors.New("server closed the connection")
)

// conns holds a session's sockets so that cancelling the session's context can
// close them from any goroutine: blocked reads ignore contexts.
type conns struct {
	mu             sync.Mutex
	closed         bool
	relaying       bool // a logged-in session: a shutdown closes the server side first
	client, server net.Conn
}

// set records c for closing; if the session is already over it closes c and
// reports false.
func (p *conns) set(slot *net.Conn, c net.Conn) bool {
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
func (p *conns) drop(slot *net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if *slot != nil {
		(*slot).Close()
		*slot = nil
	}
}

// startRelay marks the session logged in and relaying.
func (p *conns) startRelay() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.relaying = true
}

// cancelled is the session context's end: everything closes, but for a
// relaying session that rolegate's shutdown ends, where only the server side
// closes and the relay tells the client why before closing its side.
func (p *conns) cancelled(ctx context.Context) {
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

func (p *conns) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	for _, c := range []net.Conn{p.client, p.server} {
		if c != nil {
			c.Close()
		}
	}
}

// handle serves one client connection from accept to close: startup, login,
// relay, and the end of the session. It owns raw.
func (s *Server) handle(raw net.Conn) {
	ctx, cancel := context.WithCancelCause(s.ctx)
	defer cancel(nil)
	sess := &session{id: s.nextID.Add(1), clientAddr: raw.RemoteAddr().String(), start: time.Now(),
		serverGone: make(chan struct{})}
	sess.touch(sess.start)
	log := s.log.With("client", sess.clientAddr)
	// Listed from accept on, in state startup: the admin views show logins
	// in flight (see SessionInfo for what they show of an unverified client).
	s.registry.register(sess)

	var sockets conns
	sockets.set(&sockets.client, raw)
	stop := context.AfterFunc(ctx, func() { sockets.cancelled(ctx) })
	defer func() {
		stop()
		sockets.close()
		sess.markServerGone()
		if s.cfg.Limits != nil && sess.loggedIn {
			// Only a session that held a slot frees one: a failed login must
			// not wake waiters (and make rolegate query the server) for nothing.
			s.cfg.Limits.Limiter.Released(sess.user, sess.database)
		}
	}()
	defer func() {
		if v := recover(); v != nil {
			log.Error("session panicked; closing it", "panic", v, "stack", string(debug.Stack()))
		}
	}()
	defer s.registry.remove(sess)

	deadline := sess.start.Add(s.cfg.StartupTimeout)
	_ = raw.SetDeadline(deadline)
	client, pkt, err := s.negotiate(raw, sess)
	if client != raw && client != nil {
		sockets.set(&sockets.client, client)
	}
	if err != nil {
		s.startupFailed(client, err, log)
		return
	}
	if pkt.kind == kindCancel {
		s.forwardCancel(ctx, pkt, log)
		return
	}

	sess.set(func() {
		sess.user = pkt.params["user"]
		sess.database = pkt.params["database"]
		sess.appName = pkt.params["application_name"]
		sess.replication = isReplication(pkt.params["replication"])
	})
	log = log.With("role", sess.user, "database", sess.database)
	sess.setState(StateAuthenticating)

	cr := bufio.NewReader(client)
	lg, err := s.login(ctx, sess, client, cr, pkt, deadline, &sockets, log)
	if err != nil {
		s.loginFailed(sess, err, log)
		return
	}
	sess.loggedIn = true
	s.obs.LoginDone(sess.user, sess.database, time.Since(sess.start))
	log = log.With("pid", sess.backendPID)
	_ = client.SetDeadline(time.Time{})
	_ = lg.server.SetDeadline(time.Time{})

	log.Info("login", "application_name", sess.appName, "client_tls", sess.clientTLS,
		"server_tls", sess.serverTLS, "server_auth", sess.serverAuth, "replication", sess.replication)

	sockets.startRelay()
	why := s.relay(ctx, cancel, sess, client, cr, lg.server, lg.reader)
	sess.setState(StateClosing)
	s.obs.SessionEnded(sess.user, sess.database, sess.bytesIn.Load(), sess.bytesOut.Load())
	log.Info("session ended", "reason", why.Error(), "duration", time.Since(sess.start).Round(time.Millisecond),
		"bytes_in", sess.bytesIn.Load(), "bytes_out", sess.bytesOut.Load())
}

// negotiate reads startup packets until one opens a session or asks for a cancel,
// answering SSLRequest and GSSENCRequest on the way. It returns the connection to
// go on with, which is a TLS connection once TLS is negotiated.
func (s *Server) negotiate(c net.Conn, sess *session) (net.Conn, *startupPacket, error) {
	var first [1]byte
	if _, err := io.ReadFull(c, first[:]); err != nil {
		return c, nil, err
	}
	var r io.Reader = io.MultiReader(bytes.NewReader(first[:]), c)
	if first[0] == 0x16 { // a TLS record: direct TLS (PostgreSQL 17 clients)
		if s.cfg.TLS == nil {
			return c, nil, errors.New("direct TLS connection, but TLS is not configured")
		}
		tc, err := s.handshake(&prefixConn{Conn: c, prefix: first[:]})
		if err != nil {
			return c, nil, err
		}
		if tc.ConnectionState().NegotiatedProtocol != "postgresql" {
			return tc, nil, errors.New(`direct TLS connection without ALPN "postgresql"`)
		}
		c, r = tc, tc
		sess.set(func() { sess.clientTLS = true })
	}
	// A client may ask for GSS encryption, then TLS, then start: a few rounds at most.
	for range 4 {
		body, err := readStartupPacket(r)
		if err != nil {
			return c, nil, err
		}
		p, err := parseStartupPacket(body)
		if err != nil {
			return c, nil, err
		}
		switch p.kind {
		case kindSSL:
			if sess.clientTLS {
				return c, nil, protocolViolation("SSLRequest on a connection that already uses TLS")
			}
			if s.cfg.TLS == nil {
				if _, err := c.Write([]byte{'N'}); err != nil {
					return c, nil, err
				}
				break
			}
			if _, err := c.Write([]byte{'S'}); err != nil {
				return c, nil, err
			}
			tc, err := s.handshake(c)
			if err != nil {
				return c, nil, err
			}
			c, r = tc, tc
			sess.set(func() { sess.clientTLS = true })
		case kindGSSENC:
			if _, err := c.Write([]byte{'N'}); err != nil {
				return c, nil, err
			}
		default:
			return c, p, nil
		}
		r = c
	}
	return c, nil, protocolViolation("too many startup negotiation requests")
}

func (s *Server) handshake(c net.Conn) (*tls.Conn, error) {
	tc := tls.Server(c, s.cfg.TLS)
	if err := tc.Handshake(); err != nil {
		return nil, fmt.Errorf("client TLS handshake: %w", err)
	}
	return tc, nil
}

// startupFailed answers a refused startup packet with PostgreSQL's error, and
// drops silently a client that left or timed out, as the server does.
func (s *Server) startupFailed(c net.Conn, err error, log *slog.Logger) {
	var se *startupError
	switch {
	case errors.As(err, &se):
		s.obs.LoginFailed(RoleUnknown, ReasonBadStartup)
		s.quiet.log(log, slog.LevelInfo, se.code, "startup refused", "sqlstate", se.code, "reason", se.msg)
		sendFatal(c, se.code, se.msg)
	case errors.Is(err, errIncomplete):
		s.obs.LoginFailed(RoleUnknown, ReasonBadStartup)
		s.quiet.log(log, slog.LevelInfo, "08P01", "startup refused", "sqlstate", "08P01", "reason", err.Error())
		sendFatal(c, "08P01", err.Error())
	case errors.Is(err, io.EOF):
		log.Debug("client closed the connection before startup")
	case errors.Is(err, os.ErrDeadlineExceeded):
		s.obs.LoginFailed(RoleUnknown, ReasonStartupTimeout)
		s.quiet.log(log, slog.LevelInfo, "", "startup timed out")
	default:
		s.obs.LoginFailed(RoleUnknown, ReasonStartupFailed)
		s.quiet.log(log, slog.LevelInfo, "", "startup failed", "err", err)
	}
}

// sendFatal writes a FATAL ErrorResponse; the caller closes the connection.
func sendFatal(c net.Conn, code, msg string) {
	_ = writeClient(c, wire.Encode(nil, wire.Error("FATAL", code, msg)))
}

// clientWriteTimeout bounds one write to a client during its login. A login
// may have waited for a slot past its startup deadline, so what rolegate
// sends from admission on (the rejection, an error, the handoff) cannot rely
// on that deadline; and a client that stops reading must not hold the
// session open.
const clientWriteTimeout = 10 * time.Second

// writeClient writes b to a client within clientWriteTimeout, whatever
// deadline c had, and leaves c without a write deadline.
func writeClient(c net.Conn, b []byte) error {
	_ = c.SetWriteDeadline(time.Now().Add(clientWriteTimeout))
	_, err := c.Write(b)
	_ = c.SetWriteDeadline(time.Time{})
	return err
}

// forwardCancel passes a CancelRequest that carries a key rolegate issued to the
// server with the server's own key. Unknown keys are ignored, as the server does.
func (s *Server) forwardCancel(ctx context.Context, p *startupPacket, log *slog.Logger) {
	target := s.registry.lookup(p.cancelPID, p.cancelKey)
	if target == nil {
		s.quiet.log(log, slog.LevelInfo, "", "cancel request with an unknown key ignored")
		return
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.StartupTimeout)
	defer cancel()
	pid, key, useTLS := target.serverSide()
	log = log.With("role", target.user, "database", target.database, "pid", pid)
	if err := s.cfg.Upstream.Cancel(ctx, pid, key, useTLS); err != nil {
		s.quiet.log(log, slog.LevelWarn, "", "cancel request failed", "err", err)
		return
	}
	log.Info("cancel request forwarded")
}

// loginError is a login the server refused; its ErrorResponse was passed to the client.
type loginError struct {
	code, msg string
}

func (e *loginError) Error() string {
	return fmt.Sprintf("server refused login: %s (%s)", e.msg, e.code)
}

// loginFailed writes the one log line of a failed login and tells the Observer.
func (s *Server) loginFailed(sess *session, err error, log *slog.Logger) {
	var refused *loginError
	var failed *authFailure
	var tooMany *tooManyError
	// Label a failure with its role only once the role is known to exist:
	// a client that has not proved who it is may send any name.
	role := RoleUnknown
	if sess.verified {
		role = sess.user
	}
	switch {
	case errors.As(err, &tooMany):
		// Admission logged the rejection, once, with its reason, and told
		// the Observer, before the client heard of it.
	case errors.As(err, &failed):
		if failed.roleExists {
			role = sess.user
		}
		// Throttled per role and class, never per unproven name: a
		// brute-forcer of one role cannot hide another role's failures.
		s.quiet.log(log, slog.LevelInfo, role+"/"+failed.class, "login failed",
			"sqlstate", failed.code, "reason", failed.class, "detail", failed.msg)
		s.obs.LoginFailed(role, failed.class)
	case errors.As(err, &refused):
		s.quiet.log(log, slog.LevelInfo, role+"/"+ReasonRefusedByServer, "login failed",
			"sqlstate", refused.code, "reason", ReasonRefusedByServer, "detail", refused.msg)
		s.obs.LoginFailed(role, ReasonRefusedByServer)
		if s.cfg.Auth == nil && refused.msg == "SCRAM channel binding negotiation error" {
			// Passthrough removed SCRAM-SHA-256-PLUS from the server's offer;
			// a TLS client that could bind says so ("y"), and a TLS server
			// takes that for a downgrade attack. The client's proof covers it.
			s.quiet.log(log, slog.LevelWarn, "", "a TLS client that supports channel binding cannot log in through "+
				"passthrough to a TLS server with another certificate; proxy mode ([auth] mode = \"proxy\") binds both legs, "+
				"or [tls] can serve the server's own certificate")
		}
	case errors.Is(err, errConsoleDone):
	case errors.Is(err, errClientClosed):
		log.Debug("client left during login")
		s.obs.LoginFailed(role, ReasonClientLeft)
	case errors.Is(err, errShutdown):
		log.Debug("login ended by shutdown")
		s.obs.LoginFailed(role, ReasonShutdown)
	default:
		s.quiet.log(log, slog.LevelWarn, role+"/"+ReasonServerError, "login failed", "err", err)
		s.obs.LoginFailed(role, ReasonServerError)
	}
}

// loggedIn is the server side of a session that has logged in.
type loggedIn struct {
	server net.Conn
	reader *bufio.Reader
}

// login authenticates the client (proxy mode) or relays its authentication
// (passthrough), opens the server connection, and hands the session over: the
// server's parameters and ReadyForQuery go to the client with a BackendKeyData
// of the server's pid and a secret rolegate issues in place of the server's.
func (s *Server) login(ctx context.Context, sess *session, client net.Conn, cr *bufio.Reader,
	p *startupPacket, deadline time.Time, sockets *conns, log *slog.Logger) (*loggedIn, error) {
	var lk *lookup
	if s.cfg.Auth != nil {
		// The role's secret is fetched while the client is asked for its password.
		lk = s.cfg.Auth.startLookup(ctx, sess.user, deadline)
		defer lk.stop()
	}
	if p.minor > 0 || len(p.unrecognized) > 0 {
		// Speak 3.0: PostgreSQL's answer to a newer minor or unknown _pq_ options.
		msg := wire.Encode(nil, &pgproto3.NegotiateProtocolVersion{NewestMinorProtocol: 0, UnrecognizedOptions: p.unrecognized})
		if _, err := client.Write(msg); err != nil {
			return nil, errClientClosed
		}
	}
	console := sess.database == s.cfg.ConsoleDatabase
	if s.cfg.Auth == nil {
		if console {
			msg := "the rolegate console needs proxy authentication ([auth] mode = \"proxy\")"
			sendFatal(client, "28000", msg)
			return nil, &authFailure{code: "28000", msg: msg, class: "console refused"}
		}
		return s.connect(ctx, sess, client, cr, p, deadline, sockets, nil, false, log)
	}
	// The client proves who it is before rolegate counts, waits or evicts for it.
	a := &clientAuth{cfg: s.cfg.Auth, sess: sess, client: client, cr: cr, log: log, quiet: s.quiet,
		cbind: s.clientBinding(sess), lk: lk}
	actx, cancel := context.WithDeadline(ctx, deadline)
	keys, err := a.authenticate(actx)
	cancel()
	if err != nil {
		return nil, err
	}
	sess.set(func() { sess.verified = true })
	if console {
		// A console session is not a server session: it leaves the list.
		s.registry.remove(sess)
		return nil, s.serveConsole(ctx, sess, client, cr, log)
	}
	var lease *lease
	admitted := false
	for attempt := 1; ; attempt++ {
		if !admitted {
			if lease, err = s.admit(ctx, sess, client, cr, log, admitFor{}); err != nil {
				return nil, err
			}
			admitted = true
			if time.Until(deadline) < s.cfg.StartupTimeout/2 {
				// Time spent waiting for a slot does not count against the login.
				deadline = time.Now().Add(s.cfg.StartupTimeout / 2)
				_ = client.SetDeadline(deadline)
			}
		}
		lg, err := func() (lg *loggedIn, err error) {
			defer func() {
				if !errors.Is(err, errServerFull) || !lease.reserved() {
					// The reserved slot passes to the backend, which is in
					// pg_stat_activity once the server sent ReadyForQuery,
					// or is freed when the login failed; also on a panic.
					lease.release(lg != nil)
				}
			}()
			return s.connect(ctx, sess, client, cr, p, deadline, sockets, keys, attempt < serverRetries && s.cfg.Limits != nil, log)
		}()
		if !errors.Is(err, errServerFull) {
			return lg, err
		}
		sockets.drop(&sockets.server)
		if lease.reserved() {
			// The census showed the slot free, and it is still reserved for
			// this login: the server counts a backend on its way out (its
			// pg_stat_activity row goes before its slot does), or a session
			// from elsewhere took it. Try again shortly, keeping the slot.
			log.Info("server at its limit after admission; trying again", "attempt", attempt)
			t := time.NewTimer(time.Duration(attempt) * serverFullBackoff)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				lease.release(false)
				return nil, context.Cause(ctx)
			}
			continue
		}
		// A session from elsewhere took the slot between census and login.
		log.Info("server at its limit after admission; admitting again", "attempt", attempt)
		admitted = false
	}
}

// serverFullBackoff is the first pause before a login that holds a reserved
// slot tries the server again after its 53300; each retry waits longer.
const serverFullBackoff = 20 * time.Millisecond

// connect opens the server connection and logs in: relaying the client's
// exchange (keys nil) or with the client's recovered keys. With holdFull, the
// server's own 53300 is returned as errServerFull instead of being passed on.
func (s *Server) connect(ctx context.Context, sess *session, client net.Conn, cr *bufio.Reader,
	p *startupPacket, deadline time.Time, sockets *conns, keys *auth.Keys, holdFull bool, log *slog.Logger) (*loggedIn, error) {
	var out []byte // to the client, flushed before rolegate waits for it
	if keys != nil {
		// Logging in to the server; passthrough authenticates through it first.
		sess.setState(StateConnecting)
	}
	dctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	dialStart := time.Now()
	server, useTLS, err := s.cfg.Upstream.Dial(dctx)
	s.obs.ServerDialed(time.Since(dialStart), err)
	if err != nil {
		if ctx.Err() != nil { // shutdown: the client's socket is closing
			return nil, context.Cause(ctx)
		}
		return nil, s.serverLost(client, &out, err)
	}
	if !sockets.set(&sockets.server, server) {
		return nil, context.Cause(ctx)
	}
	sess.set(func() { sess.serverTLS = useTLS })
	if keys == nil && s.cfg.Limits != nil {
		// Passthrough: the backend the server gives this login counts
		// against no one until admission has decided on it (see pendingLogins).
		s.pending.add(sess, server)
		defer s.pending.remove(sess)
	}

	// Each of the server's turns from here to ReadyForQuery is bounded by
	// connect_timeout, and fails with an error that names its step.
	lc := s.cfg.Upstream.LoginConn(server, deadline)
	lc.Begin(upstream.StepStartup)
	startup := wire.Encode(nil, &pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30, Parameters: p.params})
	if _, err := server.Write(startup); err != nil {
		return nil, s.serverLost(client, &out, lc.Fail(err))
	}
	sr := bufio.NewReader(lc)
	var beforeReady func() error
	if keys == nil {
		sess.serverAuth = "relayed"
		if out, err = relayAuth(client, cr, lc, sr, s.clientBinding(sess)); err != nil {
			var lost *serverLostError
			if errors.As(err, &lost) {
				return nil, s.serverLost(client, &out, lc.Fail(lost.err))
			}
			return nil, err
		}
		sess.set(func() { sess.verified = true })
		sess.setState(StateConnecting)
		// Passthrough: the server has authenticated the client and holds a
		// backend for it; limits from proxy.toml apply from here, before the
		// client hears AuthenticationOk, with the new backend left out of the count.
		authOut := slices.Clone(out) // the server's last auth messages, up to AuthenticationOk
		beforeReady = func() error {
			s.pending.setPID(sess, sess.backendPID)
			lease, err := s.admit(ctx, sess, client, cr, log, admitFor{self: sess.backendPID, authOut: authOut})
			if err != nil {
				return err
			}
			// Admitted: the backend counts from here on, for the next login
			// of the role too, which releasing the lease lets decide.
			s.pending.remove(sess)
			lease.release(true) // nothing reserved: the backend is counted already
			// Time spent waiting for a slot does not count against the login.
			_ = client.SetDeadline(time.Now().Add(s.cfg.StartupTimeout / 2))
			return nil
		}
	} else if sess.serverAuth, err = upstream.Authenticate(sr, lc, keys, upstream.ChannelBinding(server)); err != nil {
		return nil, s.upstreamAuthFailed(sess, client, lc.Fail(err))
	} else {
		out = wire.Encode(out, &pgproto3.AuthenticationOk{})
	}
	lc.Begin(upstream.StepReady)
	return s.handoff(sess, client, server, sr, out, holdFull, beforeReady)
}

// handoff passes what the server sends after AuthenticationOk to the client, up
// to the first ReadyForQuery, and issues the client's cancel key: the server's
// pid and rolegate's own secret.
func (s *Server) handoff(sess *session, client, server net.Conn, sr *bufio.Reader, out []byte, holdFull bool,
	beforeReady func() error) (*loggedIn, error) {
	for {
		m, err := wire.ReadMessage(sr, wire.MaxServerLoginMsg)
		if err != nil {
			return nil, s.serverLost(client, &out, err)
		}
		switch m.Type {
		case 'K':
			var k pgproto3.BackendKeyData
			if err := k.Decode(m.Body); err != nil {
				return nil, s.serverLost(client, &out, err)
			}
			sess.set(func() { sess.backendPID, sess.backendKey = k.ProcessID, k.SecretKey })
			// Registration issues the client's key: the server's pid with a
			// secret of rolegate's own. It must happen before the client can use it.
			s.registry.add(sess)
			out = wire.Encode(out, &pgproto3.BackendKeyData{ProcessID: sess.cancelKey.pid, SecretKey: sess.cancelKey.secretBytes()})
		case 'Z':
			if beforeReady != nil {
				if err := beforeReady(); err != nil {
					return nil, err
				}
			}
			out = append(out, m.Raw()...)
			if err := writeClient(client, out); err != nil {
				return nil, errClientClosed
			}
			if len(m.Body) == 1 {
				sess.setState(txState(m.Body[0]))
			}
			return &loggedIn{server: server, reader: sr}, nil
		case 'E':
			err := refusedBy(m)
			var refused *loginError
			if holdFull && errors.As(err, &refused) && refused.code == "53300" {
				return nil, errServerFull
			}
			out = append(out, m.Raw()...)
			_ = writeClient(client, out)
			return nil, err
		case 'S', 'N':
			out = append(out, m.Raw()...)
		default:
			return nil, s.serverLost(client, &out, fmt.Errorf("unexpected message type %q during login", m.Type))
		}
	}
}

// serverLostError marks a server connection that broke during relayAuth.
type serverLostError struct{ err error }

func (e *serverLostError) Error() string { return e.err.Error() }

// relayAuth passes the authentication exchange between client and server
// (passthrough mode) and returns, unsent, the server's messages up to and
// including AuthenticationOk. Messages pass unchanged, except that
// SCRAM-SHA-256-PLUS is removed from the server's offer (see withoutPlus);
// clientBinding is the client connection's binding data, nil without TLS.
func relayAuth(client net.Conn, cr *bufio.Reader, server net.Conn, sr *bufio.Reader, clientBinding []byte) ([]byte, error) {
	var out []byte
	for {
		m, err := wire.ReadMessage(sr, wire.MaxServerLoginMsg)
		if err != nil {
			return out, &serverLostError{err}
		}
		switch m.Type {
		case 'R':
		case 'E':
			out = append(out, m.Raw()...)
			_, _ = client.Write(out)
			return nil, refusedBy(m)
		case 'N', 'v':
			out = append(out, m.Raw()...)
			continue
		default:
			return out, &serverLostError{fmt.Errorf("unexpected message type %q during authentication", m.Type)}
		}
		if len(m.Body) < 4 {
			return out, &serverLostError{errors.New("short authentication request")}
		}
		code := binary.BigEndian.Uint32(m.Body)
		if code == 10 {
			m = withoutPlus(m, clientBinding, upstream.ChannelBinding(server))
		}
		out = append(out, m.Raw()...)
		if code == 0 {
			return out, nil
		}
		if !needsResponse(code) {
			continue
		}
		if _, err := client.Write(out); err != nil {
			return nil, errClientClosed
		}
		out = out[:0]
		reply, err := wire.ReadMessage(cr, wire.MaxClientAuthMessage)
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return nil, errClientClosed
			}
			return nil, fmt.Errorf("read authentication response: %w", err)
		}
		if reply.Type == 'X' {
			return nil, errClientClosed // psql hangs up to prompt for a password
		}
		if reply.Type != 'p' {
			msg := fmt.Sprintf("expected password response, got message type %q", reply.Type)
			sendFatal(client, "08P01", msg)
			return nil, &loginError{code: "08P01", msg: msg}
		}
		if _, err := server.Write(reply.Raw()); err != nil {
			return nil, &serverLostError{err}
		}
	}
}

// withoutPlus removes SCRAM-SHA-256-PLUS from the server's AuthenticationSASL
// unless the client's binding data equals the server's (rolegate serves the
// server's own certificate). A client binds to the certificate it sees, and
// the server checks the binding against its own, so across two different
// certificates -PLUS can only fail: offered to a client without TLS, libpq
// refuses at once; to a TLS client, the server refuses the binding.
func withoutPlus(m wire.Message, clientBinding, serverBinding []byte) wire.Message {
	var req pgproto3.AuthenticationSASL
	if err := req.Decode(m.Body); err != nil || !slices.Contains(req.AuthMechanisms, auth.SCRAMSHA256Plus) {
		return m // the server's business; relayed as sent
	}
	if clientBinding != nil && bytes.Equal(clientBinding, serverBinding) {
		return m
	}
	req.AuthMechanisms = slices.DeleteFunc(req.AuthMechanisms, func(s string) bool { return s == auth.SCRAMSHA256Plus })
	raw := wire.Encode(nil, &req)
	return wire.Message{Type: raw[0], Body: raw[5:]}
}

// refusedBy turns the server's ErrorResponse into a loginError.
func refusedBy(m wire.Message) error {
	code, msg, err := wire.DecodeError(m)
	if err != nil {
		return err
	}
	return &loginError{code: code, msg: msg}
}

// upstreamAuthFailed reports a server that refused the keys of a client
// rolegate had authenticated: the server's own error goes to the client as
// sent. A 28P01 means the verifier rolegate checked was stale (a stand-in, or
// a password changed during the login), so nothing may stand in for it again.
func (s *Server) upstreamAuthFailed(sess *session, client net.Conn, err error) error {
	var se *upstream.ServerError
	if errors.As(err, &se) {
		_ = writeClient(client, se.Raw)
		if se.Code == "28P01" {
			s.cfg.Auth.Store.Forget(sess.user)
		}
		return &loginError{code: se.Code, msg: se.Message}
	}
	// rolegate itself cannot answer the server's request (28000), or the
	// connection failed on the way (08006).
	var cannot *upstream.CannotAnswerError
	if !errors.As(err, &cannot) {
		var out []byte
		return s.serverLost(client, &out, err)
	}
	msg := `rolegate could not log in to the server as "` + sess.user + `": ` + cannot.Error()
	sendFatal(client, "28000", msg)
	return &loginError{code: "28000", msg: msg}
}

// serverLost tells the client, after what out holds, that the login toward the
// server failed, with FATAL 08006 and a message that names the step and the
// cause in words (upstream.DialError.Message); the returned error keeps the
// detail for the log. Errors from Dial and the LoginConn name their step;
// anything else is the server breaking the protocol after authentication
// (handoff).
func (s *Server) serverLost(client net.Conn, out *[]byte, err error) error {
	var de *upstream.DialError
	if !errors.As(err, &de) {
		de = &upstream.DialError{Address: s.cfg.Upstream.Address(), Step: upstream.StepReady, Err: err}
		err = de
	}
	*out = wire.Encode(*out, wire.Error("FATAL", "08006", de.Message()))
	_ = writeClient(client, *out)
	return err
}

// needsResponse reports whether an authentication request expects the client
// to answer: cleartext (3), md5 (5), GSS (7, 8), SSPI (9), SASL (10, 11).
func needsResponse(code uint32) bool {
	switch code {
	case 3, 5, 7, 8, 9, 10, 11:
		return true
	}
	return false
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

// prefixConn returns bytes already read from a connection before reading more.
type prefixConn struct {
	net.Conn
	prefix []byte
}

func (c *prefixConn) Read(b []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(b, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.Conn.Read(b)
}

// isReplication reports whether a startup's replication parameter opens a
// walsender, as PostgreSQL reads it: "database", or a true boolean. "false",
// "off" and the like are ordinary sessions, which count against limits.
func isReplication(v string) bool {
	switch strings.ToLower(v) {
	case "database", "t", "tr", "tru", "true", "y", "ye", "yes", "on", "1":
		return true
	}
	return false
}
