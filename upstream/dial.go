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

// DialError is a failure to reach or negotiate with the server. Clients receive it
// as SQLSTATE 08006, naming the server and the cause.
type DialError struct {
	Address string
	Err     error
}

func (e *DialError) Error() string {
	return fmt.Sprintf("could not connect to server %s: %v", e.Address, e.Err)
}

func (e *DialError) Unwrap() error { return e.Err }

// Dial connects to the server and negotiates TLS as sslmode says. The returned
// connection is ready for a StartupMessage; useTLS reports whether it is encrypted.
func (d *Dialer) Dial(ctx context.Context) (conn net.Conn, useTLS bool, err error) {
	conn, err = d.dial(ctx, d.mode != config.SSLDisable)
	if err != nil {
		return nil, false, &DialError{Address: d.address, Err: err}
	}
	_, useTLS = conn.(*tls.Conn)
	return conn, useTLS, nil
}

func (d *Dialer) dial(ctx context.Context, tryTLS bool) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, d.timeout)
	defer cancel()
	var nd net.Dialer
	conn, err := nd.DialContext(ctx, "tcp", d.address)
	if err != nil {
		return nil, err
	}
	if !tryTLS || d.tls == nil {
		return conn, nil
	}
	// Blocked reads ignore contexts; close the socket when ctx ends instead.
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	tconn, err := d.negotiateTLS(ctx, conn)
	if !stop() {
		if err == nil {
			tconn.Close()
		}
		return nil, fmt.Errorf("negotiate TLS: %w", context.Cause(ctx))
	}
	if err != nil {
		conn.Close()
		return nil, err
	}
	return tconn, nil
}

// negotiateTLS sends an SSLRequest and, on 'S', performs the handshake. On 'N' it
// returns the plain connection where sslmode allows it.
func (d *Dialer) negotiateTLS(ctx context.Context, conn net.Conn) (net.Conn, error) {
	req := make([]byte, 8)
	binary.BigEndian.PutUint32(req, 8)
	binary.BigEndian.PutUint32(req[4:], 80877103)
	if _, err := conn.Write(req); err != nil {
		return nil, fmt.Errorf("send SSLRequest: %w", err)
	}
	var answer [1]byte
	if _, err := io.ReadFull(conn, answer[:]); err != nil {
		return nil, fmt.Errorf("read SSLRequest answer: %w", err)
	}
	switch answer[0] {
	case 'S':
		tconn := tls.Client(conn, d.tls)
		if err := tconn.HandshakeContext(ctx); err != nil {
			return nil, fmt.Errorf("TLS handshake: %w", err)
		}
		return tconn, nil
	case 'N':
		if d.mode != config.SSLPrefer {
			return nil, fmt.Errorf("server does not support SSL, but sslmode is %s", d.mode)
		}
		return conn, nil
	default:
		return nil, fmt.Errorf("unexpected answer %q to SSLRequest", answer[0])
	}
}

// Cancel forwards a cancel request for the server backend pid with its secret key,
// on a fresh connection, encrypted when the session's own connection was.
func (d *Dialer) Cancel(ctx context.Context, pid uint32, key []byte, useTLS bool) error {
	conn, err := d.dial(ctx, useTLS)
	if err != nil {
		return &DialError{Address: d.address, Err: err}
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
