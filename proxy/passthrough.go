package proxy

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/internal/wire"
	"github.com/rolegate/rolegate/upstream"
)

// loginPassthrough logs the client in through the server (passthrough mode):
// connect, relay the authentication exchange, read the server's messages up
// to ReadyForQuery, and only then admit: limits from proxy.toml apply once
// the server has authenticated the client and holds a backend for it, before
// the client hears AuthenticationOk, with the new backend left out of the count.
func (c *clientConn) loginPassthrough() (err error) {
	defer func() {
		// connect added it, with limits. A login that fails once the server
		// has authenticated it leaves a backend that counts as the role's
		// until it has exited: close takes it out of the set then.
		if err != nil && c.authOut != nil && c.server != nil {
			c.pendingUntilGone = true
			return
		}
		c.s.pending.remove(c.sess)
	}()
	if err := c.connect(); err != nil {
		return err
	}
	c.sess.serverAuth = "relayed"
	if err := c.relayAuth(); err != nil {
		return err
	}
	c.sess.set(func() { c.sess.verified = true })
	c.sess.setState(StateConnecting)
	c.authOut = slices.Clone(c.out) // the server's last auth messages, up to AuthenticationOk
	c.lc.Begin(upstream.StepReady)
	if err := c.awaitReady(false); err != nil {
		return err
	}
	if err := c.admitPassthrough(); err != nil {
		return err
	}
	return c.handOff()
}

// relayAuth passes the authentication exchange between client and server
// and keeps, unsent in c.out, the server's messages up to and including
// AuthenticationOk. Messages pass unchanged, except that
// SCRAM-SHA-256-PLUS is removed from the server's offer (see withoutPlus).
func (c *clientConn) relayAuth() error {
	clientBinding := c.s.clientBinding(c.sess)
	lost := func(err error) error { return c.s.serverLost(c.out, c.lc.Fail(err)) }
	for {
		m, err := wire.ReadMessage(c.sr, wire.MaxServerLoginMsg)
		if err != nil {
			return lost(err)
		}
		switch m.Type {
		case 'R':
		case 'E':
			return refusedBy(m, c.out)
		case 'N', 'v':
			c.out = append(c.out, m.Raw()...)
			continue
		default:
			return lost(fmt.Errorf("unexpected message type %q during authentication", m.Type))
		}
		if len(m.Body) < 4 {
			return lost(errors.New("short authentication request"))
		}
		code := binary.BigEndian.Uint32(m.Body)
		if code == 10 {
			m = withoutPlus(m, clientBinding, upstream.ChannelBinding(c.server))
		}
		c.out = append(c.out, m.Raw()...)
		if code == 0 {
			return nil
		}
		if !needsResponse(code) {
			continue
		}
		if _, err := c.client.Write(c.out); err != nil {
			return errClientClosed
		}
		c.out = c.out[:0]
		reply, err := wire.ReadMessage(c.cr, wire.MaxClientAuthMessage)
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return errClientClosed
			}
			return fmt.Errorf("read authentication response: %w", err)
		}
		if reply.Type == 'X' {
			return errClientClosed // psql hangs up to prompt for a password
		}
		if reply.Type != 'p' {
			return fatal("08P01", fmt.Sprintf("expected password response, got message type %q", reply.Type), ReasonRefusedByServer)
		}
		if _, err := c.lc.Write(reply.Raw()); err != nil {
			return lost(err)
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

// needsResponse reports whether an authentication request expects the client
// to answer: cleartext (3), md5 (5), GSS (7, 8), SSPI (9), SASL (10, 11).
func needsResponse(code uint32) bool {
	switch code {
	case 3, 5, 7, 8, 9, 10, 11:
		return true
	}
	return false
}
