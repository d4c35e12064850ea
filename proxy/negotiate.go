package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
)

// negotiate reads startup packets until one opens a session or asks for a
// cancel, answering SSLRequest and GSSENCRequest on the way. The connection
// goes on as a TLS connection once TLS is negotiated (c.client); the packet
// that opens the session is c.startup. A packet PostgreSQL would refuse is a
// *clientError with its SQLSTATE.
func (c *clientConn) negotiate() error {
	p, err := c.readStartup()
	if err != nil {
		return startupRefused(err)
	}
	c.startup = p
	return nil
}

// readStartup is negotiate's exchange, up to the packet that opens the
// session or asks for a cancel.
func (c *clientConn) readStartup() (*startupPacket, error) {
	s, sess := c.s, c.sess
	var first [1]byte
	if _, err := io.ReadFull(c.client, first[:]); err != nil {
		return nil, err
	}
	var r io.Reader = io.MultiReader(bytes.NewReader(first[:]), c.client)
	if first[0] == 0x16 { // a TLS record: direct TLS (PostgreSQL 17 clients)
		if s.cfg.TLS == nil {
			return nil, errors.New("direct TLS connection, but TLS is not configured")
		}
		tc, err := s.handshake(&prefixConn{Conn: c.client, prefix: first[:]})
		if err != nil {
			return nil, err
		}
		c.useTLS(tc)
		if tc.ConnectionState().NegotiatedProtocol != "postgresql" {
			return nil, errors.New(`direct TLS connection without ALPN "postgresql"`)
		}
		sess.set(func() { sess.clientTLS = true })
		r = tc
	}
	// A client may ask for GSS encryption, then TLS, then start: a few rounds at most.
	for range 4 {
		body, err := readStartupPacket(r)
		if err != nil {
			return nil, err
		}
		p, err := parseStartupPacket(body)
		if err != nil {
			return nil, err
		}
		switch p.kind {
		case kindSSL:
			if sess.clientTLS {
				return nil, protocolViolation("SSLRequest on a connection that already uses TLS")
			}
			if s.cfg.TLS == nil {
				if _, err := c.client.Write([]byte{'N'}); err != nil {
					return nil, err
				}
				break
			}
			if _, err := c.client.Write([]byte{'S'}); err != nil {
				return nil, err
			}
			tc, err := s.handshake(c.client)
			if err != nil {
				return nil, err
			}
			c.useTLS(tc)
			sess.set(func() { sess.clientTLS = true })
		case kindGSSENC:
			if _, err := c.client.Write([]byte{'N'}); err != nil {
				return nil, err
			}
		default:
			return p, nil
		}
		r = c.client
	}
	return nil, protocolViolation("too many startup negotiation requests")
}

// useTLS goes on with the client over tc, which the sockets close from now.
func (c *clientConn) useTLS(tc *tls.Conn) {
	c.client = tc
	c.sockets.set(&c.sockets.client, tc)
}

func (s *Server) handshake(c net.Conn) (*tls.Conn, error) {
	tc := tls.Server(c, s.cfg.TLS)
	if err := tc.Handshake(); err != nil {
		return nil, fmt.Errorf("client TLS handshake: %w", err)
	}
	return tc, nil
}

// forwardCancel passes a CancelRequest that carries a key rolegate issued to the
// server with the server's own key. A key another instance issued goes to
// that instance (once: one forwarded here is not forwarded again). Unknown
// keys are ignored, as the server does.
func (c *clientConn) forwardCancel() {
	s, p, log := c.s, c.startup, c.log
	ctx, cancel := context.WithTimeout(c.ctx, s.cfg.StartupTimeout)
	defer cancel()
	target := s.registry.lookup(p.cancelPID, p.cancelKey)
	if target == nil {
		if p.kind == kindPeerCancel || !s.forwardToPeer(ctx, p.cancelPID, p.cancelKey, log) {
			s.quiet.log(log, slog.LevelInfo, "", "cancel request with an unknown key ignored")
		}
		return
	}
	pid, key, useTLS := target.serverSide()
	log = log.With("role", target.user, "database", target.database, "pid", pid)
	if err := s.cfg.Upstream.Cancel(ctx, pid, key, useTLS); err != nil {
		s.quiet.log(log, slog.LevelWarn, "", "cancel request failed", "err", err)
		return
	}
	log.Info("cancel request forwarded")
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
