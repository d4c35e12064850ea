package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/internal/wire"
)

// ClientAuth makes the Server authenticate clients itself (proxy mode) with the
// server's own verifiers, and log in to the server with the recovered keys.
type ClientAuth struct {
	// Store answers a role's secret (userlist, auth query), cached.
	Store *auth.Store
	// Method is what clients are asked for: "scram-sha-256" (md5 for roles whose
	// secret is an md5 hash), "md5" (SCRAM for roles with a SCRAM verifier, as
	// PostgreSQL does), or "password" (cleartext).
	Method string
	// CleartextWithoutTLS allows "password" on unencrypted client connections.
	CleartextWithoutTLS bool
	// LookupTimeout bounds the lookup of a role's secret ([server]
	// connect_timeout); 0: only the startup timeout does.
	LookupTimeout time.Duration
}

// lookup is the role's secret being fetched for one login. It starts when the
// startup packet arrives and runs while the client is asked for its password;
// the login owns it and stops it when the login ends.
type lookup struct {
	done    chan struct{}
	answer  auth.Answer
	err     error
	expired bool  // err came with the lookup's deadline
	ended   error // the session's end (shutdown) that cut the lookup short, or nil
	cancel  context.CancelFunc
	bounded bool          // the deadline is LookupTimeout's, not the startup timeout's
	timeout time.Duration // LookupTimeout, for the client's message
}

// startLookup fetches user's secret in the background, bounded by
// LookupTimeout and by the login's deadline.
func (c *ClientAuth) startLookup(ctx context.Context, user string, deadline time.Time) *lookup {
	l := &lookup{done: make(chan struct{}), timeout: c.LookupTimeout}
	if c.LookupTimeout > 0 && time.Now().Add(c.LookupTimeout).Before(deadline) {
		deadline, l.bounded = time.Now().Add(c.LookupTimeout), true
	}
	ctx, l.cancel = context.WithDeadline(ctx, deadline)
	go func() {
		defer close(l.done)
		l.answer, l.err = c.Store.Lookup(ctx, user)
		if l.err != nil && ctx.Err() != nil {
			// Recorded here, from the lookup's own context: the login's
			// context, a sibling, may not show the session's end yet when
			// resolve wakes up (a cancel reaches children one by one).
			l.expired = errors.Is(ctx.Err(), context.DeadlineExceeded)
			if !l.expired {
				l.ended = context.Cause(ctx)
			}
		}
	}()
	return l
}

// stop cancels the lookup and waits for it to end.
func (l *lookup) stop() {
	l.cancel()
	<-l.done
}

// errAuthTimeout is the startup timeout running out during authentication:
// as PostgreSQL does at authentication_timeout, the client is told nothing.
func errAuthTimeout() *clientError {
	return &clientError{code: "57014", msg: "canceling authentication due to timeout", class: "authentication timeout", silent: true}
}

// authenticate verifies the client (proxy mode) and keeps its recovered keys.
func (c *clientConn) authenticate() error {
	a := &clientAuth{cfg: c.s.cfg.Auth, sess: c.sess, client: c.client, cr: c.cr, log: c.log, quiet: c.s.quiet,
		cbind: c.s.clientBinding(c.sess), lk: c.lookup}
	actx, cancel := context.WithDeadline(c.ctx, c.deadline)
	defer cancel()
	keys, err := a.authenticate(actx)
	if err != nil {
		return err
	}
	c.keys = keys
	c.sess.set(func() { c.sess.verified = true })
	return nil
}

// clientAuth runs one authentication exchange with a client. It owns no
// connection: clientConn.authenticate passes the client's socket and reader.
type clientAuth struct {
	cfg    *ClientAuth
	sess   *session
	client net.Conn
	cr     *bufio.Reader
	log    *slog.Logger
	quiet  *logThrottle // for failures that repeat at every login
	// cbind is the channel binding data of the client's connection (the
	// tls-server-end-point of rolegate's certificate); nil without TLS.
	cbind []byte
	lk    *lookup // the role's secret, being fetched

	// The lookup's answer, once resolve has waited for it.
	resolved    bool
	secret      auth.Secret
	found       bool
	kindChanged bool // a SCRAM exchange began, but the fresh secret wants another
}

// authenticate verifies the client and returns the keys that log it in to the
// server. A login it refuses is a *clientError, for the client.
//
// The role's secret is being fetched (a.lk) while the client is asked for its
// password: only the exchange's next step waits for it (SCRAM's
// server-first-message, the check of an md5 or cleartext response). Which
// request to send first depends on the kind of secret, so it is chosen from
// the role's last known secret when that calls for SCRAM (the kind rarely
// changes; if the fresh one no longer fits, this login fails as a wrong
// password would and the next one is asked the right way), and otherwise
// after the lookup.
func (a *clientAuth) authenticate(ctx context.Context) (*auth.Keys, error) {
	method := a.cfg.Method
	if method != "password" {
		last, ok := a.cfg.Store.Last(a.sess.user)
		if !ok || a.method(last) != "scram-sha-256" {
			if err := a.resolve(ctx); err != nil {
				return nil, err
			}
			last = a.secret
		}
		method = a.method(last)
	}
	var keys *auth.Keys
	var err error
	switch method {
	case "password":
		if !a.sess.clientTLS && !a.cfg.CleartextWithoutTLS {
			return nil, a.fail(&auth.Error{Code: "28000",
				Message: "rolegate accepts cleartext passwords only over TLS (see [auth] cleartext_without_tls)"}, "cleartext without TLS")
		}
		keys, err = a.password(ctx)
	case "md5":
		keys, err = a.md5(ctx)
	default:
		keys, err = a.scram(ctx)
	}
	if err != nil {
		var ae *auth.Error
		if errors.As(err, &ae) {
			class := failureClass(ae, a.secret, a.found)
			if a.kindChanged && errors.Is(ae, auth.ErrPasswordMismatch) {
				class = "password type changed"
				a.log.Info("the role's password is no longer a SCRAM verifier on the server; its next login is asked for the method that fits",
					"method", a.method(a.secret))
			}
			f := a.fail(ae, class)
			f.roleExists = a.found
			return nil, f
		}
		return nil, err
	}
	return keys, nil
}

// resolve waits for the lookup and records the role's secret in a. A lookup
// that failed is told to the client (FATAL 08006 naming the step, never the
// driver's text; the cause goes to the log) and returned as a *clientError.
func (a *clientAuth) resolve(ctx context.Context) error {
	if a.resolved {
		return nil
	}
	<-a.lk.done // bounded by its deadline, and ended with the session
	ans, err := a.lk.answer, a.lk.err
	switch {
	case err == nil:
	case a.lk.ended != nil:
		return a.lk.ended // the session ends (shutdown)
	case !a.lk.expired && ctx.Err() != nil:
		return context.Cause(ctx) // the session ends (shutdown)
	case a.lk.expired && !a.lk.bounded:
		// The startup timeout covers authentication: close without a word,
		// as PostgreSQL does at authentication_timeout.
		return errAuthTimeout()
	case a.lk.expired:
		a.quiet.log(a.log, slog.LevelError, "", "password lookup timed out", "timeout", a.lk.timeout)
		return a.fail(&auth.Error{Code: "08006",
			Message: fmt.Sprintf("rolegate could not look up the role's password: timeout after %v", a.lk.timeout)}, "lookup failed")
	default:
		a.quiet.log(a.log, slog.LevelError, "", "password lookup failed", "err", err)
		return a.fail(&auth.Error{Code: "08006",
			Message: "rolegate could not look up the role's password: the auth query failed"}, "lookup failed")
	}
	if ans.StandIn {
		a.quiet.log(a.log, slog.LevelWarn, "", "password lookup failed; using the role's password as fetched earlier",
			"fetched_ago", time.Since(ans.Fetched).Round(time.Millisecond), "err", ans.Err)
	}
	a.secret, a.found, a.resolved = ans.Secret, ans.Found, true
	return nil
}

// method picks the exchange for a role, following PostgreSQL's rules for a
// method that does not fit the stored secret.
func (a *clientAuth) method(secret auth.Secret) string {
	switch {
	case a.cfg.Method == "password":
		return "password"
	case secret.Kind == auth.SCRAM:
		return "scram-sha-256"
	case secret.Kind == auth.MD5:
		return "md5"
	case secret.Kind == auth.Plain && a.cfg.Method == "md5":
		return "md5"
	}
	return "scram-sha-256"
}

func (a *clientAuth) scram(ctx context.Context) (*auth.Keys, error) {
	// On TLS, SCRAM-SHA-256-PLUS is offered too, bound to rolegate's own
	// certificate: the client proves it talks to rolegate, which then binds
	// its own server login to the server's certificate.
	initial, err := a.ask(&pgproto3.AuthenticationSASL{AuthMechanisms: auth.SASLMechanisms(a.cbind != nil)})
	if err != nil {
		return nil, err
	}
	mechanism, clientFirst, err := decodeSASLInitialResponse(initial)
	if err != nil {
		return nil, err
	}
	// The server-first-message carries the verifier's salt: the lookup must be done.
	if err := a.resolve(ctx); err != nil {
		return nil, err
	}
	secret := a.secret
	if !a.found {
		secret = auth.Secret{} // a mock exchange: no hint the role is unknown
	} else if a.method(secret) != "scram-sha-256" {
		secret, a.kindChanged = auth.Secret{}, true
	}
	srv := auth.NewSCRAMServerForSecret(a.sess.user, secret, a.cfg.Store.Iterations()).WithChannelBinding(a.cbind)
	serverFirst, err := srv.Start(mechanism, clientFirst)
	if err != nil {
		return nil, err
	}
	final, err := a.ask(&pgproto3.AuthenticationSASLContinue{Data: serverFirst})
	if err != nil {
		return nil, err
	}
	var resp pgproto3.SASLResponse
	if err := resp.Decode(final); err != nil {
		return nil, &auth.Error{Code: "08P01", Message: "malformed SASLResponse message", Err: auth.ErrMalformed}
	}
	serverFinal, keys, err := srv.Finish(resp.Data)
	if err != nil {
		return nil, err
	}
	if _, err := a.client.Write(wire.Encode(nil, &pgproto3.AuthenticationSASLFinal{Data: serverFinal})); err != nil {
		return nil, errClientClosed
	}
	return keys, nil
}

func (a *clientAuth) md5(ctx context.Context) (*auth.Keys, error) {
	var salt [4]byte
	_, _ = rand.Read(salt[:])
	body, err := a.ask(&pgproto3.AuthenticationMD5Password{Salt: salt})
	if err != nil {
		return nil, err
	}
	response, err := decodePassword(body)
	if err != nil {
		return nil, err
	}
	if err := a.resolve(ctx); err != nil {
		return nil, err
	}
	return auth.VerifyMD5(a.usable(), a.sess.user, salt, response)
}

func (a *clientAuth) password(ctx context.Context) (*auth.Keys, error) {
	body, err := a.ask(&pgproto3.AuthenticationCleartextPassword{})
	if err != nil {
		return nil, err
	}
	password, err := decodePassword(body)
	if err != nil {
		return nil, err
	}
	if err := a.resolve(ctx); err != nil {
		return nil, err
	}
	return auth.VerifyPassword(a.usable(), a.sess.user, password)
}

// usable is the secret to check a response against: none for an unknown role.
func (a *clientAuth) usable() auth.Secret {
	if !a.found {
		return auth.Secret{}
	}
	return a.secret
}

// ask sends an authentication request and returns the body of the client's
// password-type ('p') reply.
func (a *clientAuth) ask(req pgproto3.BackendMessage) ([]byte, error) {
	if _, err := a.client.Write(wire.Encode(nil, req)); err != nil {
		return nil, errClientClosed
	}
	m, err := wire.ReadMessage(a.cr, wire.MaxClientAuthMessage)
	switch {
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
		return nil, errClientClosed
	case errors.Is(err, os.ErrDeadlineExceeded):
		// The startup timeout covers authentication. As PostgreSQL does at
		// authentication_timeout, close without telling the client.
		return nil, errAuthTimeout()
	case err != nil:
		return nil, &auth.Error{Code: "08P01", Message: "invalid authentication response: " + err.Error(), Err: auth.ErrMalformed}
	case m.Type == 'X':
		return nil, errClientClosed // psql hangs up to prompt for a password
	case m.Type != 'p':
		return nil, &auth.Error{Code: "08P01", Err: auth.ErrMalformed,
			Message: fmt.Sprintf("expected password response, got message type %d", m.Type)}
	}
	return m.Body, nil
}

// decodeSASLInitialResponse reads a SASLInitialResponse body (mechanism name,
// int32 length, data) as PostgreSQL does, with its errors: pgproto3's
// decoder ignores the length, so a length that promises more than the
// message carries would go unnoticed.
func decodeSASLInitialResponse(body []byte) (mechanism string, data []byte, err error) {
	name, rest, ok := bytes.Cut(body, []byte{0})
	if !ok {
		// pq_getmsgrawstring: no terminator.
		return "", nil, &auth.Error{Code: "08P01", Message: "invalid string in message", Err: auth.ErrMalformed}
	}
	if len(rest) < 4 {
		return "", nil, &auth.Error{Code: "08P01", Message: "insufficient data left in message", Err: auth.ErrMalformed}
	}
	n := int32(binary.BigEndian.Uint32(rest))
	rest = rest[4:]
	if n == -1 {
		// No initial response; PostgreSQL would ask for it with an empty
		// challenge. libpq and pgx always send one, so rolegate does not,
		// and the SCRAM exchange refuses the empty message.
		n = 0
	}
	switch {
	case n < 0 || int(n) > len(rest):
		return "", nil, &auth.Error{Code: "08P01", Message: "insufficient data left in message", Err: auth.ErrMalformed}
	case int(n) < len(rest):
		return "", nil, &auth.Error{Code: "08P01", Message: "invalid message format", Err: auth.ErrMalformed}
	}
	return string(name), rest, nil
}

// tlsEndPoint is the tls-server-end-point of the certificate rolegate
// presents to TLS clients, for SCRAM-SHA-256-PLUS. It is known only for a
// configuration with one certificate (what cmd/rolegate builds from [tls]):
// with several, or a GetCertificate callback, the certificate a client gets
// is chosen per handshake, and rolegate offers no channel binding.
func tlsEndPoint(cfg *tls.Config) []byte {
	if cfg == nil || cfg.GetCertificate != nil || cfg.GetConfigForClient != nil ||
		len(cfg.Certificates) != 1 || len(cfg.Certificates[0].Certificate) == 0 {
		return nil
	}
	leaf, err := x509.ParseCertificate(cfg.Certificates[0].Certificate[0])
	if err != nil {
		return nil
	}
	data, err := auth.TLSServerEndPoint(leaf)
	if err != nil {
		return nil
	}
	return data
}

// clientBinding is the channel binding data of a session's client
// connection: rolegate's tls-server-end-point on TLS, nil without.
func (s *Server) clientBinding(sess *session) []byte {
	if !sess.clientTLS {
		return nil
	}
	return s.endPoint
}

func decodePassword(body []byte) (string, error) {
	var pm pgproto3.PasswordMessage
	if err := pm.Decode(body); err != nil {
		return "", &auth.Error{Code: "08P01", Message: "invalid password packet size", Err: auth.ErrMalformed}
	}
	return pm.Password, nil
}

// fail is PostgreSQL's error for a refused login, for the client.
func (a *clientAuth) fail(e *auth.Error, class string) *clientError {
	return &clientError{code: e.Code, msg: e.Message, detail: e.Detail, class: class}
}

// failureClass names why a login failed, for the log line an operator reads
// when one address keeps failing; the client always sees the same message.
func failureClass(e *auth.Error, secret auth.Secret, found bool) string {
	switch {
	case errors.Is(e, auth.ErrPasswordMismatch) && !found:
		return "unknown role"
	case errors.Is(e, auth.ErrPasswordMismatch) && secret.Kind == auth.NoSecret:
		return "role has no password"
	case errors.Is(e, auth.ErrPasswordMismatch):
		return "wrong password"
	case errors.Is(e, auth.ErrChannelBinding):
		return "channel binding failed"
	case errors.Is(e, auth.ErrMalformed):
		return "malformed authentication message"
	}
	return "authentication error"
}
