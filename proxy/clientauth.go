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
}

// authFailure is a client login rolegate refused itself; the client has been told.
type authFailure struct {
	code, msg string
	class     string // for the log: wrong password, unknown role, ...
	// roleExists: the role was found (a wrong password), so metrics may name it.
	roleExists bool
}

func (e *authFailure) Error() string { return e.msg }

// clientAuth runs one authentication exchange with a client. It owns no
// connection: handle passes the client's socket and reader.
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
}

// authenticate verifies the client and returns the keys that log it in to the
// server. A failure has been sent to the client when it returns an *authFailure.
func (a *clientAuth) authenticate(ctx context.Context) (*auth.Keys, error) {
	user := a.sess.user
	secret, found, err := a.cfg.Store.Lookup(ctx, user)
	if err != nil {
		a.quiet.log(a.log, slog.LevelError, "", "verifier lookup failed", "err", err)
		return nil, a.fail(&auth.Error{Code: "08006", Message: "rolegate could not look up the role's password on the server"}, "lookup failed")
	}
	method := a.method(secret)
	var keys *auth.Keys
	switch method {
	case "password":
		if !a.sess.clientTLS && !a.cfg.CleartextWithoutTLS {
			return nil, a.fail(&auth.Error{Code: "28000",
				Message: "rolegate accepts cleartext passwords only over TLS (see [auth] cleartext_without_tls)"}, "cleartext without TLS")
		}
		keys, err = a.password(ctx, secret, found)
	case "md5":
		keys, err = a.md5(ctx, secret, found)
	default:
		keys, err = a.scram(ctx, secret, found)
	}
	if err != nil {
		var ae *auth.Error
		if errors.As(err, &ae) {
			f := a.fail(ae, failureClass(ae, secret, found))
			f.roleExists = found
			return nil, f
		}
		return nil, err
	}
	return keys, nil
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

func (a *clientAuth) scram(ctx context.Context, secret auth.Secret, found bool) (*auth.Keys, error) {
	if !found {
		secret = auth.Secret{} // a mock exchange: no hint the role is unknown
	}
	// On TLS, SCRAM-SHA-256-PLUS is offered too, bound to rolegate's own
	// certificate: the client proves it talks to rolegate, which then binds
	// its own server login to the server's certificate.
	srv := auth.NewSCRAMServerForSecret(a.sess.user, secret, a.cfg.Store.Iterations()).WithChannelBinding(a.cbind)
	initial, err := a.ask(&pgproto3.AuthenticationSASL{AuthMechanisms: srv.Mechanisms()})
	if err != nil {
		return nil, err
	}
	mechanism, clientFirst, err := decodeSASLInitialResponse(initial)
	if err != nil {
		return nil, err
	}
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
		if errors.Is(err, auth.ErrPasswordMismatch) && found {
			// The proof was made with this verifier's salt, so a changed
			// verifier cannot check it; refreshing lets the next login use it.
			a.refreshed(ctx, secret)
		}
		return nil, err
	}
	if _, err := a.client.Write(wire.Encode(nil, &pgproto3.AuthenticationSASLFinal{Data: serverFinal})); err != nil {
		return nil, errClientClosed
	}
	return keys, nil
}

func (a *clientAuth) md5(ctx context.Context, secret auth.Secret, found bool) (*auth.Keys, error) {
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
	return a.verifyAgain(ctx, secret, found, func(s auth.Secret) (*auth.Keys, error) {
		return auth.VerifyMD5(s, a.sess.user, salt, response)
	})
}

func (a *clientAuth) password(ctx context.Context, secret auth.Secret, found bool) (*auth.Keys, error) {
	body, err := a.ask(&pgproto3.AuthenticationCleartextPassword{})
	if err != nil {
		return nil, err
	}
	password, err := decodePassword(body)
	if err != nil {
		return nil, err
	}
	return a.verifyAgain(ctx, secret, found, func(s auth.Secret) (*auth.Keys, error) {
		return auth.VerifyPassword(s, a.sess.user, password)
	})
}

// verifyAgain checks a response that does not depend on the stored secret's
// salt, and after a mismatch checks it once more against a freshly fetched
// secret, so that a password changed on the server works at once.
func (a *clientAuth) verifyAgain(ctx context.Context, secret auth.Secret, found bool, verify func(auth.Secret) (*auth.Keys, error)) (*auth.Keys, error) {
	if !found {
		secret = auth.Secret{}
	}
	keys, err := verify(secret)
	if err == nil || !errors.Is(err, auth.ErrPasswordMismatch) {
		return keys, err
	}
	fresh, ok := a.refreshed(ctx, secret)
	if !ok {
		return nil, err
	}
	return verify(fresh)
}

// refreshed fetches the role's secret again after a failed login and reports
// whether it differs from the one that failed.
func (a *clientAuth) refreshed(ctx context.Context, old auth.Secret) (auth.Secret, bool) {
	fresh, found, err := a.cfg.Store.Refresh(ctx, a.sess.user)
	if err != nil {
		a.quiet.log(a.log, slog.LevelWarn, "", "verifier refresh failed", "err", err)
		return auth.Secret{}, false
	}
	if !found || auth.Same(fresh, old) {
		return auth.Secret{}, false
	}
	a.log.Info("the role's password changed on the server; using the new one from now on")
	return fresh, true
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
		return nil, &authFailure{code: "57014", msg: "canceling authentication due to timeout", class: "authentication timeout"}
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

// fail sends PostgreSQL's error for a refused login and returns it as an authFailure.
func (a *clientAuth) fail(e *auth.Error, class string) *authFailure {
	msg := e.Message
	if e.Detail != "" {
		msg += ": " + e.Detail
	}
	resp := wire.Error("FATAL", e.Code, e.Message)
	resp.Detail = e.Detail
	_, _ = a.client.Write(wire.Encode(nil, resp))
	return &authFailure{code: e.Code, msg: msg, class: class}
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
