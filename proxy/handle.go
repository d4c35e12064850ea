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
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
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
	sess := &session{id: s.nextID.Add(1), clientAddr: raw.RemoteAddr().String(), start: time.Now()}
	sess.touch(sess.start)
	log := s.log.With("client", sess.clientAddr)

	var sockets conns
	sockets.set(&sockets.client, raw)
	stop := context.AfterFunc(ctx, sockets.close)
	defer func() {
		stop()
		sockets.close()
	}()
	defer func() {
		if v := recover(); v != nil {
			log.Error("session panicked; closing it", "panic", v, "stack", string(debug.Stack()))
		}
	}()

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

	sess.user = pkt.params["user"]
	sess.database = pkt.params["database"]
	sess.appName = pkt.params["application_name"]
	_, sess.replication = pkt.params["replication"]
	log = log.With("role", sess.user, "database", sess.database)
	sess.setState(StateAuthenticating)

	cr := bufio.NewReader(client)
	defer s.registry.remove(sess)
	lg, err := s.login(ctx, sess, client, cr, pkt, deadline, &sockets)
	if err != nil {
		var fail *loginError
		switch {
		case errors.As(err, &fail):
			log.Info("login failed", "sqlstate", fail.code, "reason", fail.msg)
			if sess.clientTLS && sess.serverTLS && strings.Contains(fail.msg, "channel binding") {
				// A passthrough SCRAM exchange is bound to rolegate's certificate
				// by the client but checked against the server's by the server.
				log.Warn("SCRAM channel binding cannot pass through rolegate when both sides use TLS; " +
					"clients should set channel_binding=disable, or rolegate should serve the server's certificate")
			}
		case errors.Is(err, errClientClosed):
			log.Debug("client left during login")
		default:
			log.Warn("login failed", "err", err)
		}
		return
	}
	log = log.With("pid", sess.backendPID)
	_ = client.SetDeadline(time.Time{})
	_ = lg.server.SetDeadline(time.Time{})

	if sess.backendKey == nil { // a server that sent no BackendKeyData
		s.registry.add(sess)
	}
	log.Info("login", "application_name", sess.appName, "client_tls", sess.clientTLS,
		"server_tls", sess.serverTLS, "replication", sess.replication)

	why := s.relay(ctx, cancel, sess, client, cr, lg.server, lg.reader)
	sess.setState(StateClosing)
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
		sess.clientTLS = true
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
			sess.clientTLS = true
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
		log.Info("startup refused", "sqlstate", se.code, "reason", se.msg)
		sendFatal(c, se.code, se.msg)
	case errors.Is(err, errIncomplete):
		log.Info("startup refused", "sqlstate", "08P01", "reason", err.Error())
		sendFatal(c, "08P01", err.Error())
	case errors.Is(err, io.EOF):
		log.Debug("client closed the connection before startup")
	case errors.Is(err, os.ErrDeadlineExceeded):
		log.Info("startup timed out")
	default:
		log.Info("startup failed", "err", err)
	}
}

// sendFatal writes a FATAL ErrorResponse; the caller closes the connection.
func sendFatal(c net.Conn, code, msg string) {
	_, _ = c.Write(encode(nil, errorResponse("FATAL", code, msg)))
}

// forwardCancel passes a CancelRequest that carries a key rolegate issued to the
// server with the server's own key. Unknown keys are ignored, as the server does.
func (s *Server) forwardCancel(ctx context.Context, p *startupPacket, log *slog.Logger) {
	target := s.registry.lookup(p.cancelPID, p.cancelKey)
	if target == nil {
		log.Info("cancel request with an unknown key ignored")
		return
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.StartupTimeout)
	defer cancel()
	log = log.With("role", target.user, "database", target.database, "pid", target.backendPID)
	if err := s.cfg.Upstream.Cancel(ctx, target.backendPID, target.backendKey, target.serverTLS); err != nil {
		log.Warn("cancel request failed", "err", err)
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

// loggedIn is the server side of a session that has logged in.
type loggedIn struct {
	server net.Conn
	reader *bufio.Reader
}

// login opens the server connection for sess and passes the authentication
// exchange through unchanged, up to the server's first ReadyForQuery. The
// server's BackendKeyData is kept and replaced by one rolegate issues.
func (s *Server) login(ctx context.Context, sess *session, client net.Conn, cr *bufio.Reader,
	p *startupPacket, deadline time.Time, sockets *conns) (*loggedIn, error) {
	var out []byte // to the client, flushed before rolegate waits for it
	if p.minor > 0 || len(p.unrecognized) > 0 {
		// Speak 3.0: PostgreSQL's answer to a newer minor or unknown _pq_ options.
		out = encode(out, &pgproto3.NegotiateProtocolVersion{NewestMinorProtocol: 0, UnrecognizedOptions: p.unrecognized})
	}
	flush := func() error {
		if len(out) == 0 {
			return nil
		}
		_, err := client.Write(out)
		out = out[:0]
		return err
	}

	dctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	server, useTLS, err := s.cfg.Upstream.Dial(dctx)
	if err != nil {
		out = encode(out, errorResponse("FATAL", "08006", err.Error()))
		_ = flush()
		return nil, err
	}
	if !sockets.set(&sockets.server, server) {
		return nil, context.Cause(ctx)
	}
	sess.serverTLS = useTLS
	_ = server.SetDeadline(deadline)

	startup := encode(nil, &pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30, Parameters: p.params})
	if _, err := server.Write(startup); err != nil {
		return nil, s.serverLost(client, &out, err)
	}
	sr := bufio.NewReader(server)
	for {
		m, err := readMessage(sr, maxServerLoginMsg)
		if err != nil {
			return nil, s.serverLost(client, &out, err)
		}
		switch m.typ {
		case 'R':
			out = append(out, m.raw()...)
			if len(m.body) < 4 {
				return nil, s.serverLost(client, &out, errors.New("short authentication request"))
			}
			if !needsResponse(binary.BigEndian.Uint32(m.body)) {
				continue
			}
			if err := flush(); err != nil {
				return nil, errClientClosed
			}
			reply, err := readMessage(cr, maxClientAuthMessage)
			if err != nil {
				if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
					return nil, errClientClosed
				}
				return nil, fmt.Errorf("read authentication response: %w", err)
			}
			if reply.typ == 'X' {
				return nil, errClientClosed // psql hangs up to prompt for a password
			}
			if reply.typ != 'p' {
				msg := fmt.Sprintf("expected password response, got message type %q", reply.typ)
				out = encode(out, errorResponse("FATAL", "08P01", msg))
				_ = flush()
				return nil, &loginError{code: "08P01", msg: msg}
			}
			if _, err := server.Write(reply.raw()); err != nil {
				return nil, s.serverLost(client, &out, err)
			}
		case 'K':
			var k pgproto3.BackendKeyData
			if err := k.Decode(m.body); err != nil {
				return nil, s.serverLost(client, &out, err)
			}
			sess.backendPID, sess.backendKey = k.ProcessID, k.SecretKey
			// Registration issues the client's own key; it must happen before the
			// client can use it.
			s.registry.add(sess)
			out = encode(out, &pgproto3.BackendKeyData{ProcessID: sess.cancelKey.pid, SecretKey: sess.cancelKey.secretBytes()})
		case 'Z':
			out = append(out, m.raw()...)
			if err := flush(); err != nil {
				return nil, errClientClosed
			}
			if len(m.body) == 1 {
				sess.setState(txState(m.body[0]))
			}
			return &loggedIn{server: server, reader: sr}, nil
		case 'E':
			out = append(out, m.raw()...)
			_ = flush()
			var e pgproto3.ErrorResponse
			if err := e.Decode(m.body); err != nil {
				return nil, fmt.Errorf("decode server error: %w", err)
			}
			return nil, &loginError{code: e.Code, msg: e.Message}
		case 'S', 'N', 'v':
			out = append(out, m.raw()...)
		default:
			return nil, s.serverLost(client, &out, fmt.Errorf("unexpected message type %q during login", m.typ))
		}
	}
}

// serverLost tells the client the server connection failed during login.
func (s *Server) serverLost(client net.Conn, out *[]byte, err error) error {
	err = fmt.Errorf("server %s: %w", s.cfg.Upstream.Address(), err)
	*out = encode(*out, errorResponse("FATAL", "08006", "rolegate lost the server connection during login: "+err.Error()))
	_, _ = client.Write(*out)
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
