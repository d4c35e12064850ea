package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/config"
	"github.com/rolegate/rolegate/internal/pgtest"
	"github.com/rolegate/rolegate/internal/testutil"
)

// tlsProxy starts a proxy in front of the shared cluster that offers TLS to
// clients, and returns it with the CA file that verifies it.
func tlsProxy(t *testing.T) (*testProxy, string) {
	t.Helper()
	ca := testutil.NewCA(t)
	p := startProxy(t, proxyOpts{clientTLS: &tls.Config{Certificates: []tls.Certificate{ca.Issue(t, "localhost", "127.0.0.1")}}})
	return p, ca.PEMFile
}

func TestClientTLS(t *testing.T) {
	t.Parallel()
	p, caFile := tlsProxy(t)
	otherCA := testutil.NewCA(t)
	tests := []struct {
		name    string
		extra   []string
		wantTLS bool
	}{
		{"require", []string{"sslmode=require"}, true},
		{"prefer", []string{"sslmode=prefer"}, true},
		{"verify-ca", []string{"sslmode=verify-ca", "sslrootcert=" + caFile}, true},
		{"verify-full 127.0.0.1", []string{"sslmode=verify-full", "sslrootcert=" + caFile}, true},
		{"verify-full localhost", []string{"sslmode=verify-full", "sslrootcert=" + caFile, "host=localhost"}, true},
		{"disable", []string{"sslmode=disable"}, false},
	}
	for _, tt := range tests {
		app := "tls " + tt.name
		extra := append(tt.extra, "application_name='"+app+"'")
		t.Run(tt.name+"/pgx", func(t *testing.T) {
			t.Parallel()
			c := connect(t, p.DSN("scram_user", scramPW, "app", extra...))
			if _, isTLS := c.PgConn().Conn().(*tls.Conn); isTLS != tt.wantTLS {
				t.Errorf("pgx connection is TLS: %v, want %v", isTLS, tt.wantTLS)
			}
			var user string
			if err := c.QueryRow(t.Context(), "select current_user").Scan(&user); err != nil || user != "scram_user" {
				t.Fatalf("current_user %q, %v", user, err)
			}
			s := sessionByApp(p, app)
			if s == nil {
				t.Fatalf("no session %q in %+v", app, p.Sessions())
			}
			if s.ClientTLS != tt.wantTLS || s.ServerTLS {
				t.Errorf("session ClientTLS %v ServerTLS %v, want %v false", s.ClientTLS, s.ServerTLS, tt.wantTLS)
			}
		})
		t.Run(tt.name+"/psql", func(t *testing.T) {
			t.Parallel()
			out, errOut, err := psql(t, p.DSN("scram_user", scramPW, "app", append(extra, "application_name='psql "+app+"'")...),
				"select current_user;\n\\conninfo\n", "-At")
			if err != nil {
				t.Fatalf("psql: %v\n%s", err, errOut)
			}
			if !strings.HasPrefix(out, "scram_user\n") {
				t.Errorf("psql output %q, want current_user scram_user", out)
			}
			if got := strings.Contains(out, "SSL connection (protocol: TLSv1.3"); got != tt.wantTLS {
				t.Errorf("psql \\conninfo %q; TLS %v, want %v", out, got, tt.wantTLS)
			}
			// The proxy's own record of the session, written at login.
			waitUntil(t, 30*time.Second, "the login log line", func() bool {
				return strings.Contains(p.logs.String(), `application_name="psql `+app+`" client_tls=`+boolString(tt.wantTLS))
			})
		})
	}
	t.Run("verify-full with another CA", func(t *testing.T) {
		t.Parallel()
		dsn := p.DSN("scram_user", scramPW, "app", "sslmode=verify-full", "sslrootcert="+otherCA.PEMFile)
		if _, err := pgx.Connect(t.Context(), dsn); err == nil || !strings.Contains(err.Error(), "certificate") {
			t.Errorf("pgx: %v, want a certificate error", err)
		}
		_, errOut, err := psql(t, dsn, "", "-c", "select 1")
		if err == nil || !strings.Contains(errOut, "certificate verify failed") {
			t.Errorf("psql: %v, stderr %q", err, errOut)
		}
	})
}

func boolString(b bool) string {
	if b {
		return "true"
	}
	return "false"
}

func TestClientTLSNotConfigured(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})
	t.Run("psql require", func(t *testing.T) {
		t.Parallel()
		_, errOut, err := psql(t, p.DSN("trust_user", "", "app", "sslmode=require"), "", "-c", "select 1")
		if err == nil || !strings.Contains(errOut, "server does not support SSL, but SSL was required") {
			t.Errorf("psql: %v, stderr %q", err, errOut)
		}
	})
	t.Run("pgx require", func(t *testing.T) {
		t.Parallel()
		_, err := pgx.Connect(t.Context(), p.DSN("trust_user", "", "app", "sslmode=require"))
		if err == nil || !strings.Contains(err.Error(), "server refused TLS connection") {
			t.Errorf("pgx: %v, want server refused TLS connection", err)
		}
	})
	t.Run("psql prefer", func(t *testing.T) {
		t.Parallel()
		out, errOut, err := psql(t, p.DSN("trust_user", "", "app", "sslmode=prefer"), "select current_user;\n\\conninfo\n", "-At")
		if err != nil || !strings.HasPrefix(out, "trust_user\n") || strings.Contains(out, "SSL connection") {
			t.Errorf("psql: %v, output %q, stderr %q", err, out, errOut)
		}
	})
	t.Run("pgx prefer", func(t *testing.T) {
		t.Parallel()
		c := connect(t, p.DSN("trust_user", "", "app", "sslmode=prefer", "application_name=prefer-plain"))
		if s := sessionByApp(p, "prefer-plain"); s == nil || s.ClientTLS {
			t.Errorf("session %+v, want one without TLS", s)
		}
		if err := c.Ping(t.Context()); err != nil {
			t.Error(err)
		}
	})
	t.Run("direct TLS", func(t *testing.T) {
		t.Parallel()
		_, err := pgx.Connect(t.Context(), p.DSN("trust_user", "", "app", "sslmode=require", "sslnegotiation=direct"))
		if err == nil {
			t.Fatal("direct TLS connection succeeded without TLS configured")
		}
		waitUntil(t, 30*time.Second, "the refusal in the log", func() bool {
			return strings.Contains(p.logs.String(), "direct TLS connection, but TLS is not configured")
		})
		wantLogin(t, p)
	})
}

func TestDirectTLS(t *testing.T) {
	t.Parallel()
	p, caFile := tlsProxy(t)
	roots := x509.NewCertPool()
	pemData, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	roots.AppendCertsFromPEM(pemData)

	t.Run("pgx sslnegotiation=direct", func(t *testing.T) {
		t.Parallel()
		c := connect(t, p.DSN("scram_user", scramPW, "app", "sslmode=verify-full", "sslrootcert="+caFile,
			"sslnegotiation=direct", "application_name=direct"))
		tc, ok := c.PgConn().Conn().(*tls.Conn)
		if !ok {
			t.Fatalf("pgx connection %T, want TLS", c.PgConn().Conn())
		}
		if proto := tc.ConnectionState().NegotiatedProtocol; proto != "postgresql" {
			t.Errorf("ALPN %q, want postgresql", proto)
		}
		if s := sessionByApp(p, "direct"); s == nil || !s.ClientTLS {
			t.Errorf("session %+v, want ClientTLS", s)
		}
		var user string
		if err := c.QueryRow(t.Context(), "select current_user").Scan(&user); err != nil || user != "scram_user" {
			t.Errorf("current_user %q, %v", user, err)
		}
	})

	// dialTLS makes a direct TLS connection with the ALPN protocols given.
	dialTLS := func(t *testing.T, alpn []string) (*tls.Conn, error) {
		raw := rawConn(t, p)
		tc := tls.Client(raw, &tls.Config{RootCAs: roots, ServerName: "127.0.0.1", NextProtos: alpn})
		return tc, tc.HandshakeContext(t.Context())
	}
	t.Run("raw with ALPN postgresql", func(t *testing.T) {
		t.Parallel()
		tc, err := dialTLS(t, []string{"postgresql"})
		if err != nil {
			t.Fatal(err)
		}
		startupMessage(t, tc, 3, 0, "user", "trust_user", "database", "app")
		fe := pgproto3.NewFrontend(tc, tc)
		wantReady(t, fe)
		wantCurrentUser(t, fe, "trust_user")
	})
	t.Run("raw without ALPN", func(t *testing.T) {
		t.Parallel()
		tc, err := dialTLS(t, nil)
		if err == nil {
			// TLS 1.3 lets the client finish its handshake before the server has
			// looked at ALPN; the refusal is the connection closing unanswered.
			startupMessage(t, tc, 3, 0, "user", "trust_user", "database", "app")
			var m pgproto3.BackendMessage
			m, err = pgproto3.NewFrontend(tc, io.Discard).Receive()
			if err == nil {
				t.Fatalf("got %T %+v, want the connection closed", m, m)
			}
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("the proxy did not close the connection: %v", err)
		}
		waitUntil(t, 30*time.Second, "the refusal in the log", func() bool {
			return strings.Contains(p.logs.String(), `direct TLS connection without ALPN \"postgresql\"`)
		})
	})
	t.Run("raw with ALPN h2 only", func(t *testing.T) {
		t.Parallel()
		if _, err := dialTLS(t, []string{"h2"}); err == nil || !strings.Contains(err.Error(), "no application protocol") {
			t.Errorf("handshake: %v, want no application protocol", err)
		}
	})
	t.Run("SSLRequest inside direct TLS", func(t *testing.T) {
		t.Parallel()
		tc, err := dialTLS(t, []string{"postgresql"})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tc.Write(packet(codeSSL)); err != nil {
			t.Fatal(err)
		}
		wantFatal(t, tc, "08P01", "SSLRequest on a connection that already uses TLS")
	})
	t.Run("psql still negotiates", func(t *testing.T) {
		t.Parallel()
		out, errOut, err := psql(t, p.DSN("trust_user", "", "app", "sslmode=verify-full", "sslrootcert="+caFile), "", "-At", "-c", "select current_user")
		if err != nil || strings.TrimSpace(out) != "trust_user" {
			t.Errorf("psql: %v, output %q, stderr %q", err, out, errOut)
		}
	})
}

// A client TLS handshake that fails leaves the proxy serving.
func TestClientTLSHandshakeFailure(t *testing.T) {
	t.Parallel()
	p, _ := tlsProxy(t)
	c := rawConn(t, p)
	if _, err := c.Write(packet(codeSSL)); err != nil {
		t.Fatal(err)
	}
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil || b[0] != 'S' {
		t.Fatalf("answer to SSLRequest %q, %v; want 'S'", b[:], err)
	}
	// Not a ClientHello.
	if _, err := c.Write(packet(version(3, 0), params("user", "trust_user"))); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(c); err != nil {
		t.Fatalf("the proxy did not close the connection: %v", err)
	}
	waitUntil(t, 30*time.Second, "the failure in the log", func() bool { return strings.Contains(p.logs.String(), "client TLS handshake") })
	wantLogin(t, p)
}

func TestServerTLS(t *testing.T) {
	t.Parallel()
	c := pgtest.Start(t, pgtest.Options{SSL: true, HostSSLOnly: true})
	otherCA := testutil.NewCA(t)
	user, pw := c.SuperUser, c.SuperPassword

	ok := []struct {
		name        string
		addr        string
		sslmode     config.SSLMode
		sslrootcert string
	}{
		{"verify-full", "", config.SSLVerifyFull, c.CACertFile},
		{"verify-full localhost", "localhost:" + c.Addr()[strings.LastIndex(c.Addr(), ":")+1:], config.SSLVerifyFull, c.CACertFile},
		{"verify-ca", "", config.SSLVerifyCA, c.CACertFile},
		{"require", "", config.SSLRequire, ""},
		{"prefer", "", config.SSLPrefer, ""},
	}
	for _, tt := range ok {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			p := startProxy(t, proxyOpts{server: c, serverAddr: tt.addr, sslmode: tt.sslmode, sslrootcert: tt.sslrootcert})
			conn := connect(t, p.DSN(user, pw, "postgres", "application_name=server-tls"))
			var serverSaysSSL bool
			if err := conn.QueryRow(t.Context(), "select ssl from pg_stat_ssl where pid = pg_backend_pid()").Scan(&serverSaysSSL); err != nil {
				t.Fatal(err)
			}
			if !serverSaysSSL {
				t.Error("the server sees a connection without TLS")
			}
			s := sessionByApp(p, "server-tls")
			if s == nil || !s.ServerTLS || s.ClientTLS {
				t.Errorf("session %+v, want ServerTLS and no ClientTLS", s)
			}
		})
	}
	t.Run("disable", func(t *testing.T) {
		t.Parallel()
		p := startProxy(t, proxyOpts{server: c, sslmode: config.SSLDisable})
		_, err := pgx.Connect(t.Context(), p.DSN(user, pw, "postgres"))
		wantPgError(t, err, "FATAL", "28000", `no pg_hba.conf entry for host "127.0.0.1", user "postgres", database "postgres", no encryption`)
		_, errOut, err := psql(t, p.DSN(user, pw, "postgres"), "", "-c", "select 1")
		if err == nil || !strings.Contains(errOut, "no pg_hba.conf entry") {
			t.Errorf("psql: %v, stderr %q", err, errOut)
		}
	})
	t.Run("verify-full with another CA", func(t *testing.T) {
		t.Parallel()
		p := startProxy(t, proxyOpts{server: c, sslmode: config.SSLVerifyFull, sslrootcert: otherCA.PEMFile})
		_, err := pgx.Connect(t.Context(), p.DSN(user, pw, "postgres"))
		wantPgError(t, err, "FATAL", "08006", "could not connect to server "+c.Addr())
		wantPgError(t, err, "FATAL", "08006", "certificate signed by unknown authority")
	})
	t.Run("verify-ca with another CA", func(t *testing.T) {
		t.Parallel()
		p := startProxy(t, proxyOpts{server: c, sslmode: config.SSLVerifyCA, sslrootcert: otherCA.PEMFile})
		_, err := pgx.Connect(t.Context(), p.DSN(user, pw, "postgres"))
		wantPgError(t, err, "FATAL", "08006", "certificate")
	})
	t.Run("require against a server without TLS", func(t *testing.T) {
		t.Parallel()
		p := startProxy(t, proxyOpts{sslmode: config.SSLRequire})
		_, err := pgx.Connect(t.Context(), p.DSN("trust_user", "", "app"))
		wantPgError(t, err, "FATAL", "08006", "server does not support SSL, but sslmode is require")
	})
	t.Run("prefer against a server without TLS", func(t *testing.T) {
		t.Parallel()
		p := startProxy(t, proxyOpts{sslmode: config.SSLPrefer})
		connect(t, p.DSN("trust_user", "", "app", "application_name=prefer-no-tls"))
		if s := sessionByApp(p, "prefer-no-tls"); s == nil || s.ServerTLS {
			t.Errorf("session %+v, want no ServerTLS", s)
		}
	})
	// With TLS on both legs the server offers SCRAM-SHA-256-PLUS, and a client
	// binds to the certificate it sees: rolegate's. The server checks the binding
	// against its own certificate, so passthrough offers -PLUS only when both are
	// the same certificate. Otherwise a TLS client that supports binding says so
	// ("y"), which the server refuses as a downgrade, unless the client turns
	// channel binding off.
	bothSides := func(t *testing.T, clientCert tls.Certificate, clientCA string, extra ...string) (*testProxy, *pgx.Conn, error) {
		p := startProxy(t, proxyOpts{server: c, sslmode: config.SSLVerifyFull, sslrootcert: c.CACertFile,
			clientTLS: &tls.Config{Certificates: []tls.Certificate{clientCert}}})
		dsn := p.DSN(user, pw, "postgres", append([]string{"sslmode=verify-full", "sslrootcert=" + clientCA, "application_name=both"}, extra...)...)
		conn, err := pgx.Connect(t.Context(), dsn)
		if err == nil {
			t.Cleanup(func() { conn.Close(t.Context()) })
		}
		return p, conn, err
	}
	t.Run("TLS on both sides, channel_binding=disable, with a cancel", func(t *testing.T) {
		t.Parallel()
		ca := testutil.NewCA(t)
		p, conn, err := bothSides(t, ca.Issue(t, "localhost", "127.0.0.1"), ca.PEMFile, "channel_binding=disable")
		if err != nil {
			t.Fatal(err)
		}
		s := sessionByApp(p, "both")
		if s == nil || !s.ServerTLS || !s.ClientTLS {
			t.Fatalf("session %+v, want TLS on both sides", s)
		}
		// The cancel request goes to the server over TLS as well.
		queryDone := make(chan error, 1)
		go func() {
			_, err := conn.Exec(context.Background(), "select pg_sleep(30)")
			queryDone <- err
		}()
		waitServerRunning(t, c.SuperDSN(), p, "both")
		if err := conn.PgConn().CancelRequest(t.Context()); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-queryDone:
			wantPgError(t, err, "ERROR", "57014", "canceling statement due to user request")
		case <-time.After(15 * time.Second):
			t.Fatal("query not cancelled within 15 s")
		}
	})
	t.Run("TLS on both sides, channel binding with the server's own certificate", func(t *testing.T) {
		t.Parallel()
		cert, err := tls.LoadX509KeyPair(filepath.Join(c.Dir, "tls", "server.crt"), filepath.Join(c.Dir, "tls", "server.key"))
		if err != nil {
			t.Fatal(err)
		}
		// The same certificate on both legs: passthrough keeps -PLUS on offer,
		// and the binding the client makes is the one the server checks.
		p, conn, err := bothSides(t, cert, c.CACertFile, "channel_binding=require")
		if err != nil {
			t.Fatal(err)
		}
		if err := conn.Ping(t.Context()); err != nil {
			t.Error(err)
		}
		out, errOut, err := psql(t, p.DSN(user, pw, "postgres", "sslmode=verify-full", "sslrootcert="+c.CACertFile, "channel_binding=require"),
			"", "-At", "-c", "select current_user")
		if err != nil || strings.TrimSpace(out) != user {
			t.Errorf("psql with channel_binding=require: %v, output %q, stderr %q", err, out, errOut)
		}
	})
	// Known limitation of passthrough (see the comment above): the client gets the
	// server's own refusal, cleanly, and the operator a hint in the log.
	t.Run("TLS on both sides, channel binding across different certificates", func(t *testing.T) {
		t.Parallel()
		ca := testutil.NewCA(t)
		p, _, err := bothSides(t, ca.Issue(t, "localhost", "127.0.0.1"), ca.PEMFile)
		wantPgError(t, err, "FATAL", "28000", "SCRAM channel binding negotiation error")
		// libpq's default, channel_binding=prefer, sends "y" too.
		_, errOut, err := psql(t, p.DSN(user, pw, "postgres", "sslmode=verify-full", "sslrootcert="+ca.PEMFile), "", "-c", "select 1")
		if err == nil || !strings.Contains(errOut, "SCRAM channel binding negotiation error") {
			t.Errorf("psql: %v, stderr %q", err, errOut)
		}
		out, errOut, err := psql(t, p.DSN(user, pw, "postgres", "sslmode=verify-full", "sslrootcert="+ca.PEMFile, "channel_binding=disable"),
			"", "-At", "-c", "select current_user")
		if err != nil || strings.TrimSpace(out) != user {
			t.Errorf("psql with channel_binding=disable: %v, output %q, stderr %q", err, out, errOut)
		}
		// Logged once the client has been told of the failure.
		waitUntil(t, 30*time.Second, "the channel binding hint in the log", func() bool {
			return strings.Contains(p.logs.String(), "a TLS client that supports channel binding cannot log in through passthrough")
		})
	})
}
