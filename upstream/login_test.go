package upstream

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/config"
	"github.com/rolegate/rolegate/internal/pgtest"
	"github.com/rolegate/rolegate/internal/wire"
)

// Passwords of the roles loginCluster creates.
const (
	scramPW   = "scram pass"
	md5PW     = "md5 pass"
	clearPW   = "clear pass"
	nologinPW = "nologin pass"
)

// loginCluster is a TLS-capable server with one role per way rolegate logs in:
// scram_r (scram-sha-256), md5_r (md5 with an md5 verifier), clear_r (the
// password method, SCRAM verifier) and nologin_r (NOLOGIN, SCRAM verifier).
func loginCluster(t *testing.T) *pgtest.Cluster {
	t.Helper()
	c := pgtest.Start(t, pgtest.Options{SSL: true, HBA: []string{
		"host all md5_r 127.0.0.1/32 md5",
		"host all clear_r 127.0.0.1/32 password",
	}})
	for _, q := range []string{
		fmt.Sprintf("create role scram_r login password '%s'", scramPW),
		fmt.Sprintf("set password_encryption = 'md5'; create role md5_r login password '%s'", md5PW),
		fmt.Sprintf("create role clear_r login password '%s'", clearPW),
		fmt.Sprintf("create role nologin_r nologin password '%s'", nologinPW),
	} {
		if err := c.Exec(t.Context(), q); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// storedSecret reads a role's secret from pg_authid as the superuser.
func storedSecret(t *testing.T, c *pgtest.Cluster, role string) auth.Secret {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), c.SuperDSN())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var text string
	if err := conn.QueryRow(t.Context(), "select rolpassword from pg_authid where rolname = $1", role).Scan(&text); err != nil {
		t.Fatalf("secret of %s: %v", role, err)
	}
	s, err := auth.ParseSecret(text)
	if err != nil {
		t.Fatalf("secret of %s: %v", role, err)
	}
	return s
}

// clientProof runs a whole SCRAM exchange in-process: a client that knows the
// password against rolegate's server side holding the role's verifier, as a
// real client's login through rolegate does. It returns the keys rolegate
// recovers from the proof.
func clientProof(t *testing.T, user, password string, v *auth.SCRAMVerifier) *auth.Keys {
	t.Helper()
	client, err := auth.NewSCRAMClient(&auth.Keys{User: user, Password: password})
	if err != nil {
		t.Fatal(err)
	}
	srv := auth.NewSCRAMServer(user, v)
	serverFirst, err := srv.Start(auth.SCRAMSHA256, client.ClientFirst())
	if err != nil {
		t.Fatal(err)
	}
	clientFinal, err := client.ClientFinal(serverFirst)
	if err != nil {
		t.Fatal(err)
	}
	serverFinal, keys, err := srv.Finish(clientFinal)
	if err != nil {
		t.Fatalf("rolegate refused the client's proof: %v", err)
	}
	if err := client.Verify(serverFinal); err != nil {
		t.Fatalf("the client refused rolegate's signature: %v", err)
	}
	return keys
}

// serverLogin dials the server, sends a StartupMessage for user and runs
// Authenticate with keys and the connection's channel binding data. On
// success the connection is closed at cleanup.
func serverLogin(t *testing.T, d *Dialer, user string, keys *auth.Keys) (net.Conn, *bufio.Reader, error) {
	t.Helper()
	conn, r, _, err := serverLoginWith(t, d, user, keys, ChannelBinding)
	return conn, r, err
}

// serverLoginWith is serverLogin with the binding data binding returns for the
// connection, and the method Authenticate reports.
func serverLoginWith(t *testing.T, d *Dialer, user string, keys *auth.Keys, binding func(net.Conn) []byte) (net.Conn, *bufio.Reader, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	conn, _, err := d.Dial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	_ = conn.SetDeadline(time.Now().Add(15 * time.Second))
	startup := wire.Encode(nil, &pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30,
		Parameters: map[string]string{"user": user, "database": "postgres", "application_name": "login_test"}})
	if _, err := conn.Write(startup); err != nil {
		conn.Close()
		t.Fatal(err)
	}
	r := bufio.NewReader(conn)
	method, err := Authenticate(r, conn, keys, binding(conn))
	if err != nil {
		conn.Close()
		return nil, nil, "", err
	}
	t.Cleanup(func() { conn.Close() })
	return conn, r, method, nil
}

// session reads a logged-in connection to its first ReadyForQuery, then runs
// one simple query and returns the first row's values as text.
func session(t *testing.T, conn net.Conn, r *bufio.Reader, query string) []string {
	t.Helper()
	fe := pgproto3.NewFrontend(r, conn)
	var row []string
	for queried := false; ; {
		m, err := fe.Receive()
		if err != nil {
			t.Fatalf("read: %v", err)
		}
		switch m := m.(type) {
		case *pgproto3.ErrorResponse:
			t.Fatalf("server error %s: %s", m.Code, m.Message)
		case *pgproto3.DataRow:
			for _, v := range m.Values {
				row = append(row, string(v))
			}
		case *pgproto3.ReadyForQuery:
			if queried {
				return row
			}
			queried = true
			fe.Send(&pgproto3.Query{String: query})
			if err := fe.Flush(); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// wantServerError checks err is the server's own ErrorResponse.
func wantServerError(t *testing.T, err error, code, msg string) {
	t.Helper()
	var se *ServerError
	if !errors.As(err, &se) {
		t.Fatalf("error %v (%T), want a *ServerError %s", err, err, code)
	}
	if se.Code != code || se.Message != msg {
		t.Errorf("server error %s %q, want %s %q", se.Code, se.Message, code, msg)
	}
	if len(se.Raw) < 5 || se.Raw[0] != 'E' || !bytes.Contains(se.Raw, []byte(msg)) {
		t.Errorf("Raw %q is not the server's ErrorResponse", se.Raw)
	}
}

const whoQuery = "select current_user, pg_backend_pid(), coalesce((select ssl from pg_stat_ssl where pid = pg_backend_pid()), false)"

// rolegate logs in to the server as a client, with only what it recovered
// from that client's login: it can open further server connections for the
// client at any time, over TCP and TLS.
func TestAuthenticate(t *testing.T) {
	t.Parallel()
	c := loginCluster(t)
	plain, err := NewDialer(config.Server{Address: c.Addr(), SSLMode: config.SSLDisable, ConnectTimeout: "5s"})
	if err != nil {
		t.Fatal(err)
	}
	tlsDialer, err := NewDialer(config.Server{Address: c.Addr(), SSLMode: config.SSLVerifyFull,
		SSLRootCert: c.CACertFile, ConnectTimeout: "5s"})
	if err != nil {
		t.Fatal(err)
	}
	scramSecret := storedSecret(t, c, "scram_r")
	if scramSecret.Kind != auth.SCRAM {
		t.Fatalf("scram_r has a %v secret", scramSecret.Kind)
	}

	t.Run("SCRAM: two server connections from one client proof", func(t *testing.T) {
		t.Parallel()
		keys := clientProof(t, "scram_r", scramPW, scramSecret.SCRAM)
		if keys.Password != "" || keys.MD5 != "" || len(keys.ClientKey) != 32 || len(keys.ServerKey) != 32 {
			t.Fatalf("keys %v: want exactly a ClientKey and a ServerKey", keys)
		}
		// Both open at once, one over TCP and one over TLS, each with a
		// fresh nonce: the keys do not depend on the client's exchange.
		conn1, r1, err := serverLogin(t, plain, "scram_r", keys)
		if err != nil {
			t.Fatalf("first login: %v", err)
		}
		conn2, r2, err := serverLogin(t, tlsDialer, "scram_r", keys)
		if err != nil {
			t.Fatalf("second login: %v", err)
		}
		row1 := session(t, conn1, r1, whoQuery)
		row2 := session(t, conn2, r2, whoQuery)
		if len(row1) != 3 || len(row2) != 3 {
			t.Fatalf("rows %q %q", row1, row2)
		}
		if row1[0] != "scram_r" || row2[0] != "scram_r" || row1[1] == row2[1] {
			t.Errorf("sessions %q and %q: want scram_r on two backends", row1, row2)
		}
		if row1[2] != "f" || row2[2] != "t" {
			t.Errorf("TLS as the server sees it: %s and %s, want f and t", row1[2], row2[2])
		}
	})

	t.Run("SCRAM-SHA-256-PLUS over TLS, checked by the server", func(t *testing.T) {
		t.Parallel()
		keys := clientProof(t, "scram_r", scramPW, scramSecret.SCRAM)
		conn, r, method, err := serverLoginWith(t, tlsDialer, "scram_r", keys, ChannelBinding)
		if err != nil || method != auth.SCRAMSHA256Plus {
			t.Fatalf("login over TLS: %q, %v; want %s", method, err, auth.SCRAMSHA256Plus)
		}
		if row := session(t, conn, r, "select current_user"); len(row) != 1 || row[0] != "scram_r" {
			t.Errorf("current_user %q", row)
		}
		// The binding data is the end point of the server's own certificate.
		pemData, err := os.ReadFile(filepath.Join(c.Dir, "tls", "server.crt"))
		if err != nil {
			t.Fatal(err)
		}
		block, _ := pem.Decode(pemData)
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		want, err := auth.TLSServerEndPoint(cert)
		if err != nil || !bytes.Equal(ChannelBinding(conn), want) {
			t.Errorf("ChannelBinding %x, want %x (%v)", ChannelBinding(conn), want, err)
		}
		// The server checks the binding: data of another certificate fails,
		// which shows the login above was bound and checked.
		other := func(net.Conn) []byte { return bytes.Repeat([]byte{1}, 32) }
		_, _, _, err = serverLoginWith(t, tlsDialer, "scram_r", keys, other)
		var se *ServerError
		if !errors.As(err, &se) || se.Code != "28000" || se.Message != "SCRAM channel binding check failed" {
			t.Errorf("login bound to another certificate: %v, want the server's 28000 SCRAM channel binding check failed", err)
		}
		// Without TLS there is nothing to bind to.
		conn, _, method, err = serverLoginWith(t, plain, "scram_r", keys, ChannelBinding)
		if err != nil || method != auth.SCRAMSHA256 || ChannelBinding(conn) != nil {
			t.Errorf("login without TLS: %q, %v, binding %x; want %s and none", method, err, ChannelBinding(conn), auth.SCRAMSHA256)
		}
		// A server that offers only SCRAM-SHA-256 gets no binding even over TLS.
		var sent bytes.Buffer
		sasl := wire.Encode(nil, &pgproto3.AuthenticationSASL{AuthMechanisms: []string{auth.SCRAMSHA256}})
		_, _ = Authenticate(bufio.NewReader(bytes.NewReader(sasl)), &sent, keys, want)
		m, err := wire.ReadMessage(bufio.NewReader(&sent), wire.MaxClientAuthMessage)
		var first pgproto3.SASLInitialResponse
		if err != nil || first.Decode(m.Body) != nil || first.AuthMechanism != auth.SCRAMSHA256 || !bytes.HasPrefix(first.Data, []byte("n,,")) {
			t.Errorf("initial response %q %q (%v), want SCRAM-SHA-256 with n,,", first.AuthMechanism, first.Data, err)
		}
	})

	t.Run("md5: the stored hash logs in, twice", func(t *testing.T) {
		t.Parallel()
		secret := storedSecret(t, c, "md5_r")
		if secret.Kind != auth.MD5 {
			t.Fatalf("md5_r has a %v secret", secret.Kind)
		}
		var salt [4]byte
		_, _ = rand.Read(salt[:])
		keys, err := auth.VerifyMD5(secret, "md5_r", salt, auth.MD5Response(auth.MD5Hash("md5_r", md5PW), salt))
		if err != nil {
			t.Fatal(err)
		}
		if keys.Password != "" || keys.MD5 != secret.MD5 {
			t.Fatalf("keys %v: want the stored hash and no password", keys)
		}
		for _, d := range []*Dialer{plain, tlsDialer} {
			conn, r, err := serverLogin(t, d, "md5_r", keys)
			if err != nil {
				t.Fatal(err)
			}
			if row := session(t, conn, r, "select current_user"); len(row) != 1 || row[0] != "md5_r" {
				t.Errorf("current_user %q", row)
			}
		}
	})

	t.Run("cleartext: the password the client sent", func(t *testing.T) {
		t.Parallel()
		keys, err := auth.VerifyPassword(storedSecret(t, c, "clear_r"), "clear_r", clearPW)
		if err != nil {
			t.Fatal(err)
		}
		conn, r, err := serverLogin(t, plain, "clear_r", keys)
		if err != nil {
			t.Fatal(err)
		}
		if row := session(t, conn, r, "select current_user"); len(row) != 1 || row[0] != "clear_r" {
			t.Errorf("current_user %q", row)
		}
		// The same kind of keys serve a SCRAM login too.
		keys, err = auth.VerifyPassword(scramSecret, "scram_r", scramPW)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := serverLogin(t, tlsDialer, "scram_r", keys); err != nil {
			t.Error(err)
		}
	})

	t.Run("a client key from another password is the server's 28P01", func(t *testing.T) {
		t.Parallel()
		other := auth.NewSCRAMVerifier("not the password", scramSecret.SCRAM.Salt, scramSecret.SCRAM.Iterations)
		keys := clientProof(t, "scram_r", "not the password", other)
		_, _, err := serverLogin(t, plain, "scram_r", keys)
		wantServerError(t, err, "28P01", `password authentication failed for user "scram_r"`)
		for _, secret := range []string{scramPW, "not the password"} {
			if strings.Contains(err.Error(), secret) {
				t.Errorf("error %q contains a password", err)
			}
		}
	})

	t.Run("an unknown role is the server's 28P01", func(t *testing.T) {
		t.Parallel()
		keys := clientProof(t, "no_such_role", scramPW, scramSecret.SCRAM)
		_, _, err := serverLogin(t, plain, "no_such_role", keys)
		wantServerError(t, err, "28P01", `password authentication failed for user "no_such_role"`)
	})

	t.Run("a server without the role's ServerKey is not trusted", func(t *testing.T) {
		t.Parallel()
		keys := clientProof(t, "scram_r", scramPW, scramSecret.SCRAM)
		forged := *keys
		forged.ServerKey = bytes.Repeat([]byte{7}, 32)
		_, _, err := serverLogin(t, plain, "scram_r", &forged)
		if !errors.Is(err, auth.ErrServerSignature) {
			t.Errorf("error %v, want auth.ErrServerSignature", err)
		}
	})

	t.Run("SCRAM keys cannot answer md5 or cleartext requests", func(t *testing.T) {
		t.Parallel()
		keys := &auth.Keys{User: "md5_r", ClientKey: make([]byte, 32), ServerKey: make([]byte, 32)}
		_, _, err := serverLogin(t, plain, "md5_r", keys)
		if err == nil || !strings.Contains(err.Error(), "server asks for md5, but rolegate holds only a SCRAM key") {
			t.Errorf("md5 request: %v", err)
		}
		keys.User = "clear_r"
		_, _, err = serverLogin(t, plain, "clear_r", keys)
		if err == nil || !strings.Contains(err.Error(), "server asks for a cleartext password") {
			t.Errorf("cleartext request: %v", err)
		}
	})

	// The server checks LOGIN after authentication: Authenticate succeeds and
	// the refusal follows, for the proxy to pass on.
	t.Run("NOLOGIN: authenticated, then refused by the server", func(t *testing.T) {
		t.Parallel()
		keys := clientProof(t, "nologin_r", nologinPW, storedSecret(t, c, "nologin_r").SCRAM)
		_, r, err := serverLogin(t, plain, "nologin_r", keys)
		if err != nil {
			t.Fatal(err)
		}
		m, err := wire.ReadMessage(r, wire.MaxServerLoginMsg)
		if err != nil || m.Type != 'E' {
			t.Fatalf("after AuthenticationOk: %q, %v; want an ErrorResponse", m.Type, err)
		}
		var e pgproto3.ErrorResponse
		if err := e.Decode(m.Body); err != nil {
			t.Fatal(err)
		}
		if e.Code != "28000" || e.Message != `role "nologin_r" is not permitted to log in` {
			t.Errorf("got %s %q", e.Code, e.Message)
		}
	})
}

// Authenticate against scripted servers: what it does with each kind of reply.
func TestAuthenticateReplies(t *testing.T) {
	t.Parallel()
	enc := func(msgs ...pgproto3.BackendMessage) []byte {
		var b []byte
		for _, m := range msgs {
			b = wire.Encode(b, m)
		}
		return b
	}
	scramKeys := &auth.Keys{User: "u", ClientKey: make([]byte, 32), ServerKey: make([]byte, 32)}
	tests := []struct {
		name   string
		server []byte
		keys   *auth.Keys
		want   string // part of the error; "" for success
		sent   []byte // first byte of each reply rolegate sends
	}{
		{"trust", enc(&pgproto3.AuthenticationOk{}), scramKeys, "", nil},
		{"a notice first", enc(&pgproto3.NoticeResponse{Severity: "NOTICE", Message: "hi"}, &pgproto3.AuthenticationOk{}),
			scramKeys, "", nil},
		{"an error", enc(&pgproto3.ErrorResponse{Severity: "FATAL", Code: "28000", Message: "no pg_hba.conf entry"}),
			scramKeys, "no pg_hba.conf entry (SQLSTATE 28000)", nil},
		{"cleartext with a password", enc(&pgproto3.AuthenticationCleartextPassword{}, &pgproto3.AuthenticationOk{}),
			&auth.Keys{User: "u", Password: "pw"}, "", []byte{'p'}},
		{"md5 with a password only", enc(&pgproto3.AuthenticationMD5Password{Salt: [4]byte{1, 2, 3, 4}}, &pgproto3.AuthenticationOk{}),
			&auth.Keys{User: "u", Password: "pw"}, "", []byte{'p'}},
		{"SCRAM skipped the server signature", enc(&pgproto3.AuthenticationSASL{AuthMechanisms: []string{auth.SCRAMSHA256}},
			&pgproto3.AuthenticationOk{}), scramKeys, "server skipped the SCRAM signature", []byte{'p'}},
		{"SASL without SCRAM-SHA-256", enc(&pgproto3.AuthenticationSASL{AuthMechanisms: []string{"OAUTHBEARER"}}),
			scramKeys, "not SCRAM-SHA-256", nil},
		{"SASL continue before SASL", enc(&pgproto3.AuthenticationSASLContinue{Data: []byte("r=x,s=c2FsdA==,i=1")}),
			scramKeys, "unexpected SASL continue", nil},
		{"SASL final before SASL", enc(&pgproto3.AuthenticationSASLFinal{Data: []byte("v=x")}),
			scramKeys, "unexpected SASL final", nil},
		{"GSS", enc(&pgproto3.AuthenticationGSS{}), scramKeys, "authentication method 7", nil},
		{"a message out of place", enc(&pgproto3.ReadyForQuery{TxStatus: 'I'}), scramKeys, "unexpected message type 'Z'", nil},
		{"short request", []byte{'R', 0, 0, 0, 6, 0, 0}, scramKeys, "short authentication request", nil},
		{"the server hangs up", nil, scramKeys, "read login reply: EOF", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var sent bytes.Buffer
			_, err := Authenticate(bufio.NewReader(bytes.NewReader(tt.server)), &sent, tt.keys, nil)
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("error %v, want success", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Fatalf("error %v, want one containing %q", err, tt.want)
			}
			var types []byte
			for r := bufio.NewReader(&sent); ; {
				m, err := wire.ReadMessage(r, wire.MaxServerLoginMsg)
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					t.Fatal(err)
				}
				types = append(types, m.Type)
			}
			if !bytes.Equal(types, tt.sent) {
				t.Errorf("sent messages %q, want %q", types, tt.sent)
			}
		})
	}
}
