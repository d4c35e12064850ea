// Package upstream connects rolegate to the PostgreSQL server it fronts: it dials
// the server as a client would (TCP, then TLS as sslmode says) and forwards
// cancel requests.
package upstream

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/config"
)

// Dialer opens connections to the server. It is safe for concurrent use.
type Dialer struct {
	address string
	mode    config.SSLMode
	tls     *tls.Config // nil for sslmode=disable
	timeout time.Duration
}

// NewDialer builds a Dialer from the [server] section; it reads sslrootcert now so
// that a missing file is a start-up error, not a failure on the first login.
func NewDialer(cfg config.Server) (*Dialer, error) {
	d := &Dialer{address: cfg.Address, mode: cfg.SSLMode, timeout: cfg.ConnectTimeout.Value()}
	if d.mode == config.SSLDisable {
		return d, nil
	}
	host, _, err := net.SplitHostPort(cfg.Address)
	if err != nil {
		return nil, fmt.Errorf("server address %q: %w", cfg.Address, err)
	}
	var roots *x509.CertPool
	if cfg.SSLRootCert != "" {
		pem, err := os.ReadFile(cfg.SSLRootCert)
		if err != nil {
			return nil, fmt.Errorf("read server sslrootcert: %w", err)
		}
		roots = x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("server sslrootcert %s: no PEM certificates found", cfg.SSLRootCert)
		}
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: host}
	switch {
	case d.mode == config.SSLVerifyFull:
		tc.RootCAs = roots
	case d.mode == config.SSLVerifyCA || roots != nil:
		// libpq: verify-ca, and require with a root certificate, check the chain
		// but not the host name.
		tc.InsecureSkipVerify = true
		tc.VerifyPeerCertificate = verifyChain(roots)
	default:
		// prefer and require without a root certificate: encryption only, as libpq.
		tc.InsecureSkipVerify = true
	}
	d.tls = tc
	return d, nil
}

// Address is the server's host:port, for messages and logs.
func (d *Dialer) Address() string { return d.address }

// Step is one step of a login toward the server. Each is bounded by
// connect_timeout on its own (the server's turns only: in passthrough the
// client's answers are bounded by startup_timeout), and a failure names it.
type Step int

// The steps of a login toward the server, in order.
const (
	StepConnect      Step = iota // the TCP connect
	StepSSLAnswer                // the server's 'S' or 'N' to rolegate's SSLRequest
	StepTLSHandshake             // the TLS handshake
	StepStartup                  // the server's first answer to the StartupMessage
	StepAuth                     // the server's answer to an authentication response
	StepReady                    // after AuthenticationOk, up to ReadyForQuery
)

// String names the step as the end of a sentence: "... timeout expired after 10s
// while waiting for the server's answer to the startup message".
func (s Step) String() string {
	switch s {
	case StepConnect:
		return "while opening the TCP connection"
	case StepSSLAnswer:
		return "while waiting for the server's answer to the SSL request"
	case StepTLSHandshake:
		return "during the TLS handshake"
	case StepStartup:
		return "while waiting for the server's answer to the startup message"
	case StepAuth:
		return "while waiting for the server's answer to the authentication response"
	case StepReady:
		return "while waiting for the server to become ready after authentication"
	}
	return fmt.Sprintf("in login step %d", int(s))
}

// DialError is a login toward the server that failed at one step, from the TCP
// connect to ReadyForQuery: the server could not be reached, did not answer in
// time, closed the connection, or broke the protocol. Clients receive Message
// as FATAL 08006; Error keeps the detail (a socket's own error text) for the log.
type DialError struct {
	Address string
	Step    Step
	// Timeout is connect_timeout when that is what ended the step; 0 when the
	// step failed otherwise (or the login's own deadline ended it).
	Timeout time.Duration
	Err     error
}

// Message is what a client is told: the server, the cause in words and the
// step, never a socket's or a library's error text.
func (e *DialError) Message() string {
	cause, transport := e.cause()
	msg := "rolegate could not connect to server " + e.Address + ": " + cause
	if transport {
		// A protocol error says what went wrong in its own words; a timeout
		// or a close says nothing without the step.
		msg += " " + e.Step.String()
	}
	return msg
}

func (e *DialError) Error() string {
	cause, transport := e.cause()
	msg := "could not connect to server " + e.Address + ": " + cause
	if transport {
		msg += " " + e.Step.String()
	}
	if detail := e.Err.Error(); detail != cause {
		msg += ": " + detail
	}
	return msg
}

func (e *DialError) Unwrap() error { return e.Err }

// cause words e.Err for a client, as libpq words the same failures, and reports
// whether it is a failure of the connection (which needs the step named)
// rather than of what the server said.
func (e *DialError) cause() (text string, transport bool) {
	err := e.Err
	var errno syscall.Errno
	var dnsErr *net.DNSError
	var unknownCA x509.UnknownAuthorityError
	var invalid x509.CertificateInvalidError
	var hostname x509.HostnameError
	var netErr net.Error
	switch {
	case isTimeout(err) && e.Timeout > 0:
		return fmt.Sprintf("timeout expired after %s", e.Timeout), true
	case isTimeout(err):
		return "timeout expired", true
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return "server closed the connection unexpectedly", true
	case errors.Is(err, net.ErrClosed), errors.Is(err, context.Canceled):
		return "the login was cancelled", true
	case errors.As(err, &dnsErr):
		return fmt.Sprintf("could not translate host name %q to address (%s)", dnsErr.Name, dnsErr.Err), false
	case errors.As(err, &errno):
		return errno.Error(), true // "connection refused", "no route to host": strerror, as libpq
	case errors.As(err, &unknownCA):
		return "server certificate verification failed: " + unknownCA.Error(), false
	case errors.As(err, &invalid):
		return "server certificate verification failed: " + invalid.Error(), false
	case errors.As(err, &hostname):
		return "server certificate verification failed: " + hostname.Error(), false
	case e.Step == StepTLSHandshake:
		return "TLS handshake failed", false
	case errors.As(err, &netErr):
		return "the connection failed", true
	}
	// What is left is rolegate's own description of a server that broke
	// the protocol or the login's rules.
	return err.Error(), false
}

// isTimeout reports whether err is a deadline that ran out: a context's or a
// socket's.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) ||
		(errors.As(err, &ne) && ne.Timeout())
}

// Dial connects to the server and negotiates TLS as sslmode says. The returned
// connection is ready for a StartupMessage; useTLS reports whether it is encrypted.
// Each step (TCP connect, the SSLRequest's answer, the TLS handshake) is bounded
// by connect_timeout on its own, and by ctx; a failure is a *DialError.
func (d *Dialer) Dial(ctx context.Context) (conn net.Conn, useTLS bool, err error) {
	conn, err = d.dial(ctx, d.mode != config.SSLDisable)
	if err != nil {
		return nil, false, err
	}
	_, useTLS = conn.(*tls.Conn)
	return conn, useTLS, nil
}

func (d *Dialer) dial(ctx context.Context, tryTLS bool) (net.Conn, error) {
	var conn net.Conn
	err := d.step(ctx, StepConnect, nil, func(ctx context.Context) (err error) {
		var nd net.Dialer
		conn, err = nd.DialContext(ctx, "tcp", d.address)
		return err
	})
	if err != nil {
		return nil, err
	}
	if !tryTLS || d.tls == nil {
		return conn, nil
	}
	tconn, err := d.negotiateTLS(ctx, conn)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return tconn, nil
}

// step runs one step of a dial under its own connect_timeout and ctx. Blocked
// reads ignore contexts, so conn (once there is one) is closed when the time
// runs out; the step has then failed, whatever f returned.
func (d *Dialer) step(ctx context.Context, step Step, conn net.Conn, f func(context.Context) error) error {
	sctx, cancel := context.WithTimeout(ctx, d.timeout)
	defer cancel()
	stop := func() bool { return true }
	if conn != nil {
		stop = context.AfterFunc(sctx, func() { conn.Close() })
	}
	err := f(sctx)
	if !stop() || (err != nil && sctx.Err() != nil) {
		err = context.Cause(sctx) // the time ran out, or the caller gave up
	}
	if err == nil {
		return nil
	}
	de := &DialError{Address: d.address, Step: step, Err: err}
	if ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
		de.Timeout = d.timeout // connect_timeout ended the step, not the caller
	}
	return de
}

// negotiateTLS sends an SSLRequest and, on 'S', performs the handshake. On 'N' it
// returns the plain connection where sslmode allows it.
func (d *Dialer) negotiateTLS(ctx context.Context, conn net.Conn) (net.Conn, error) {
	var answer [1]byte
	err := d.step(ctx, StepSSLAnswer, conn, func(context.Context) error {
		req := make([]byte, 8)
		binary.BigEndian.PutUint32(req, 8)
		binary.BigEndian.PutUint32(req[4:], 80877103)
		if _, err := conn.Write(req); err != nil {
			return fmt.Errorf("send SSLRequest: %w", err)
		}
		if _, err := io.ReadFull(conn, answer[:]); err != nil {
			return fmt.Errorf("read SSLRequest answer: %w", err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	switch answer[0] {
	case 'S':
		tconn := tls.Client(conn, d.tls)
		err := d.step(ctx, StepTLSHandshake, conn, func(ctx context.Context) error {
			return tconn.HandshakeContext(ctx)
		})
		if err != nil {
			return nil, err
		}
		return tconn, nil
	case 'N':
		if d.mode != config.SSLPrefer {
			return nil, &DialError{Address: d.address, Step: StepSSLAnswer,
				Err: fmt.Errorf("server does not support SSL, but sslmode is %s", d.mode)}
		}
		return conn, nil
	default:
		return nil, &DialError{Address: d.address, Step: StepSSLAnswer,
			Err: fmt.Errorf("received invalid response to SSL negotiation: %q", answer[0])}
	}
}

// Cancel forwards a cancel request for the server backend pid with its secret key,
// on a fresh connection, encrypted when the session's own connection was.
func (d *Dialer) Cancel(ctx context.Context, pid uint32, key []byte, useTLS bool) error {
	conn, err := d.dial(ctx, useTLS)
	if err != nil {
		return err
	}
	defer conn.Close()
	msg, err := (&pgproto3.CancelRequest{ProcessID: pid, SecretKey: key}).Encode(nil)
	if err != nil {
		return fmt.Errorf("encode cancel request: %w", err)
	}
	if _, err := conn.Write(msg); err != nil {
		return fmt.Errorf("send cancel request to %s: %w", d.address, err)
	}
	// The server answers nothing and closes once it has signalled the backend;
	// waiting for that close keeps a cancel ordered before what the client does next.
	_ = conn.SetReadDeadline(time.Now().Add(d.timeout))
	_, _ = io.Copy(io.Discard, conn)
	return nil
}

// verifyChain checks the server's chain against roots without checking the host
// name: libpq's verify-ca.
func verifyChain(roots *x509.CertPool) func([][]byte, [][]*x509.Certificate) error {
	return func(raw [][]byte, _ [][]*x509.Certificate) error {
		if len(raw) == 0 {
			return errors.New("server sent no certificate")
		}
		certs := make([]*x509.Certificate, len(raw))
		for i, der := range raw {
			c, err := x509.ParseCertificate(der)
			if err != nil {
				return fmt.Errorf("parse server certificate: %w", err)
			}
			certs[i] = c
		}
		inter := x509.NewCertPool()
		for _, c := range certs[1:] {
			inter.AddCert(c)
		}
		_, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter})
		return err
	}
}
