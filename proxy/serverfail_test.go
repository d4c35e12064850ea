package proxy

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/config"
	"github.com/rolegate/rolegate/internal/wire"
)

// Fake servers that fail a login at each step toward the server. Each reads
// what rolegate sends; "hang" then reads until the connection closes (rolegate
// gives up, or the test's cleanup closes it), "close" hangs up.

// readPacket reads one length-prefixed startup packet (SSLRequest, StartupMessage).
func readPacket(c net.Conn) ([]byte, error) {
	var n [4]byte
	if _, err := io.ReadFull(c, n[:]); err != nil {
		return nil, err
	}
	body := make([]byte, binary.BigEndian.Uint32(n[:])-4)
	_, err := io.ReadFull(c, body)
	return body, err
}

func hang(c net.Conn) { _, _ = io.Copy(io.Discard, c) }

// afterStartup reads the StartupMessage, sends msgs, and then ends as end does.
func afterStartup(end func(net.Conn), msgs ...pgproto3.BackendMessage) func(net.Conn) {
	return func(c net.Conn) {
		if _, err := readPacket(c); err != nil {
			return
		}
		var out []byte
		for _, m := range msgs {
			out = wire.Encode(out, m)
		}
		if _, err := c.Write(out); err != nil {
			return
		}
		end(c)
	}
}

// afterSASL asks for SCRAM-SHA-256, reads the client's first message (a
// SASLInitialResponse) and ends as end does.
func afterSASL(end func(net.Conn)) func(net.Conn) {
	return afterStartup(func(c net.Conn) {
		var hdr [5]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil || hdr[0] != 'p' {
			return
		}
		if _, err := io.CopyN(io.Discard, c, int64(binary.BigEndian.Uint32(hdr[1:])-4)); err != nil {
			return
		}
		end(c)
	}, &pgproto3.AuthenticationSASL{AuthMechanisms: []string{auth.SCRAMSHA256}})
}

// afterSSLRequest reads the SSLRequest, answers 'S', and ends as end does: the
// TLS handshake that rolegate starts then stalls or breaks.
func afterSSLRequest(end func(net.Conn)) func(net.Conn) {
	return func(c net.Conn) {
		if _, err := readPacket(c); err != nil {
			return
		}
		if _, err := c.Write([]byte{'S'}); err != nil {
			return
		}
		end(c)
	}
}

// Every step of a login toward the server is bounded by connect_timeout and
// fails with FATAL 08006 naming the step, in words a client can show, in both
// authentication modes and for pgx and psql. startup_timeout is far away, so
// only connect_timeout can end these logins.
func TestServerStepFailures(t *testing.T) {
	t.Parallel()
	hangUp := func(c net.Conn) { c.Close() }
	ok := &pgproto3.AuthenticationOk{}
	param := &pgproto3.ParameterStatus{Name: "server_version", Value: "15.0"}
	tests := []struct {
		name    string
		sslmode config.SSLMode
		serve   func(net.Conn)
		want    string // after "rolegate could not connect to server ADDR: "
	}{
		{"never answers the startup message", config.SSLDisable, hang,
			"timeout expired after 1s while waiting for the server's answer to the startup message"},
		{"never answers the SSLRequest, prefer", config.SSLPrefer, hang,
			"timeout expired after 1s while waiting for the server's answer to the SSL request"},
		{"never answers the SSLRequest, require", config.SSLRequire, hang,
			"timeout expired after 1s while waiting for the server's answer to the SSL request"},
		{"stalls in the TLS handshake", config.SSLRequire, afterSSLRequest(hang),
			"timeout expired after 1s during the TLS handshake"},
		{"never answers the authentication response", config.SSLDisable, afterSASL(hang),
			"timeout expired after 1s while waiting for the server's answer to the authentication response"},
		{"never sends ReadyForQuery", config.SSLDisable, afterStartup(hang, ok, param),
			"timeout expired after 1s while waiting for the server to become ready after authentication"},
		{"closes during the TLS handshake", config.SSLPrefer, afterSSLRequest(hangUp),
			"server closed the connection unexpectedly during the TLS handshake"},
		{"closes after the startup message", config.SSLDisable, afterStartup(hangUp),
			"server closed the connection unexpectedly while waiting for the server's answer to the startup message"},
		{"closes after the authentication response", config.SSLDisable, afterSASL(hangUp),
			"server closed the connection unexpectedly while waiting for the server's answer to the authentication response"},
		{"closes before ReadyForQuery", config.SSLDisable, afterStartup(hangUp, ok, param),
			"server closed the connection unexpectedly while waiting for the server to become ready after authentication"},
	}
	ctl := superControl(t, shared)
	for _, mode := range []string{"passthrough", "proxy"} {
		for _, tt := range tests {
			t.Run(mode+"/"+tt.name, func(t *testing.T) {
				t.Parallel()
				addr := fakeServer(t, tt.serve)
				o := proxyOpts{serverAddr: addr, sslmode: tt.sslmode, startupTimeout: 10 * time.Minute, connectTimeout: time.Second}
				if mode == "proxy" {
					o.auth = proxyAuth(time.Minute, auth.SourceFunc(ctl.Secret))
				}
				p := startProxy(t, o)
				want := "rolegate could not connect to server " + addr + ": " + tt.want
				dsn := p.DSN("scram_user", scramPW, "app")

				ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
				defer cancel()
				_, err := pgx.Connect(ctx, dsn)
				if pgErr := wantPgError(t, err, "FATAL", "08006", want); pgErr.Message != want {
					t.Errorf("pgx: message %q, want %q", pgErr.Message, want)
				}
				_, errOut, err := psql(t, dsn, "", "-c", "select 1")
				if err == nil || !strings.Contains(errOut, "FATAL:  "+want+"\n") {
					t.Errorf("psql: %v, stderr %q; want FATAL %q", err, errOut, want)
				}
				wantNoInternals(t, errOut)
				// The detail stays in rolegate's log, with the client's words.
				waitUntil(t, 30*time.Second, "the failure in the log", func() bool {
					logs := p.logs.String()
					return strings.Contains(logs, "login failed") && strings.Contains(logs, tt.want)
				})
			})
		}
	}
}

// wantNoInternals fails if a client's error text carries a socket's or Go's
// own error text.
func wantNoInternals(t *testing.T, msg string) {
	t.Helper()
	for _, internal := range []string{"i/o timeout", "read tcp", "write tcp", "dial tcp", "EOF", "->", "use of closed", "context deadline"} {
		if strings.Contains(msg, internal) {
			t.Errorf("client error %q contains %q", msg, internal)
		}
	}
}

// connect_timeout bounds the server's turns only: in passthrough, a client
// that takes longer than it to answer the server's password request still
// logs in (its own time is bounded by startup_timeout).
func TestPassthroughClientTurnNotBounded(t *testing.T) {
	t.Parallel()
	// Long enough for a busy server's own turns; the client's turn is longer.
	const connectTimeout = 3 * time.Second
	p := startProxy(t, proxyOpts{sslmode: config.SSLDisable, connectTimeout: connectTimeout})
	c := rawConn(t, p)
	startupMessage(t, c, 3, 0, "user", "password_user", "database", "app")
	fe := pgproto3.NewFrontend(c, c)
	m, err := fe.Receive()
	if _, ok := m.(*pgproto3.AuthenticationCleartextPassword); !ok {
		t.Fatalf("got %T %v, want AuthenticationCleartextPassword", m, err)
	}
	// The client's turn outlasts connect_timeout.
	time.Sleep(connectTimeout + time.Second)
	fe.Send(&pgproto3.PasswordMessage{Password: passwordPW})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	wantReady(t, fe)
	wantCurrentUser(t, fe, "password_user")
}
