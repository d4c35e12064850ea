package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/internal/pgtest"
	"github.com/rolegate/rolegate/internal/testutil"
)

// outcome is what a client got from a login: in, over TLS or not, or the
// error it reported, without the host and port that differ between the
// server and rolegate.
type outcome struct {
	ok  bool
	tls bool   // the client's own connection used TLS
	err string // normalized error text
}

func (o outcome) String() string {
	if o.ok {
		return fmt.Sprintf("logged in (TLS %v)", o.tls)
	}
	return fmt.Sprintf("refused: %q", o.err)
}

var (
	psqlPrefixRE = regexp.MustCompile(`(?m)^psql: error: |connection to server at "[^"]*", port \d+ failed: `)
	pgxAddrRE    = regexp.MustCompile(`127\.0\.0\.1:\d+`)
)

// clientSetting is one row of the matrix: libpq's sslmode and channel_binding.
type clientSetting struct{ sslmode, channelBinding string }

func (c clientSetting) String() string {
	return "sslmode=" + c.sslmode + " channel_binding=" + c.channelBinding
}

// loginFunc logs in with one client and reports the outcome.
type loginFunc func(t *testing.T, dsn string) outcome

func loginPsql(t *testing.T, dsn string) outcome {
	t.Helper()
	out, errOut, err := psql(t, dsn, "", "-At", "-c", "select current_user", "-c", `\conninfo`)
	if err != nil {
		return outcome{err: strings.TrimSpace(psqlPrefixRE.ReplaceAllString(errOut, ""))}
	}
	if !strings.HasPrefix(out, "scram_user\n") {
		t.Fatalf("psql output %q", out)
	}
	return outcome{ok: true, tls: strings.Contains(out, "SSL connection")}
}

func loginPgx(t *testing.T, dsn string) outcome {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) {
			return outcome{err: pgErr.Severity + " " + pgErr.Code + " " + pgErr.Message}
		}
		return outcome{err: pgxAddrRE.ReplaceAllString(err.Error(), "ADDR")}
	}
	defer c.Close(context.WithoutCancel(ctx))
	var user string
	if err := c.QueryRow(ctx, "select current_user").Scan(&user); err != nil || user != "scram_user" {
		t.Fatalf("pgx: current_user %q, %v", user, err)
	}
	_, isTLS := c.PgConn().Conn().(*tls.Conn)
	return outcome{ok: true, tls: isTLS}
}

// tlsScramServer starts a server with TLS on and scram_user (scramPW).
func tlsScramServer(t *testing.T) *pgtest.Cluster {
	t.Helper()
	c := pgtest.Start(t, pgtest.Options{SSL: true})
	if err := c.Exec(t.Context(), fmt.Sprintf("create role scram_user login password '%s'", scramPW)); err != nil {
		t.Fatal(err)
	}
	return c
}

// TestChannelBindingMatrix logs in through rolegate with psql and pgx in
// every combination of client TLS, server TLS and authentication mode, with
// each sslmode and channel_binding a client can set, and compares each
// outcome with what the same client gets from PostgreSQL directly, from a
// server with TLS on or off as rolegate offers it to the client.
//
// Proxy mode gives exactly the server's outcome everywhere: rolegate runs
// the SCRAM exchange itself, with SCRAM-SHA-256-PLUS bound to its own
// certificate for TLS clients, and binds its server login to the server's
// certificate (checked in the login log line). Passthrough cannot offer
// -PLUS across two certificates, which costs channel_binding=require
// clients on TLS their login (libpq's and pgx's own refusal), and, when the
// server uses TLS too, TLS clients that support binding ("y" looks like a
// downgrade to the server, and it is inside the client's proof).
func TestChannelBindingMatrix(t *testing.T) {
	t.Parallel()
	servers := map[bool]*pgtest.Cluster{false: shared, true: tlsScramServer(t)}
	var settings []clientSetting
	for _, sslmode := range []string{"disable", "prefer", "require"} {
		for _, cb := range []string{"prefer", "require", "disable"} {
			settings = append(settings, clientSetting{sslmode, cb})
		}
	}
	clients := []struct {
		name  string
		login loginFunc
	}{{"psql", loginPsql}, {"pgx", loginPgx}}

	// What PostgreSQL answers, for the server with TLS on and off.
	type directKey struct {
		ssl     bool
		client  string
		setting clientSetting
	}
	var mu sync.Mutex
	direct := map[directKey]outcome{}
	t.Run("direct", func(t *testing.T) {
		for _, ssl := range []bool{false, true} {
			for _, cl := range clients {
				for _, s := range settings {
					t.Run(fmt.Sprintf("ssl %v/%s/%s", ssl, cl.name, s), func(t *testing.T) {
						t.Parallel()
						c := servers[ssl]
						_, port, _ := net.SplitHostPort(c.Addr())
						got := cl.login(t, fmt.Sprintf("host=127.0.0.1 port=%s user=scram_user dbname=postgres password=%s sslmode=%s channel_binding=%s",
							port, quoteDSN(scramPW), s.sslmode, s.channelBinding))
						mu.Lock()
						direct[directKey{ssl, cl.name, s}] = got
						mu.Unlock()
					})
				}
			}
		}
	})
	if t.Failed() {
		return
	}

	var app atomic.Int64
	for _, serverTLS := range []bool{false, true} {
		for _, clientTLS := range []bool{false, true} {
			for _, mode := range []string{"proxy", "passthrough"} {
				name := fmt.Sprintf("server TLS %v/client TLS %v/%s", serverTLS, clientTLS, mode)
				t.Run(name, func(t *testing.T) {
					t.Parallel()
					o := proxyOpts{server: servers[serverTLS]}
					if mode == "proxy" {
						o.auth = proxyAuth(time.Minute, auth.SourceFunc(superControl(t, servers[serverTLS]).Secret))
					}
					if clientTLS {
						ca := testutil.NewCA(t)
						o.clientTLS = &tls.Config{Certificates: []tls.Certificate{ca.Issue(t, "127.0.0.1")}}
					}
					p := startProxy(t, o)
					for _, cl := range clients {
						for _, s := range settings {
							t.Run(cl.name+"/"+s.String(), func(t *testing.T) {
								t.Parallel()
								want := direct[directKey{clientTLS, cl.name, s}]
								// contains: want.err is part of the client's message, not all of it.
								contains := false
								if mode == "passthrough" && clientTLS && s.sslmode != "disable" {
									switch {
									case s.channelBinding == "require":
										// The client refuses: -PLUS is not on offer.
										want = outcome{err: map[string]string{
											"psql": "channel binding is required, but server did not offer an authentication method that supports channel binding",
											"pgx":  "channel binding required but server does not support SCRAM-SHA-256-PLUS",
										}[cl.name]}
										contains = true
									case s.channelBinding == "prefer" && serverTLS && s.sslmode == "require":
										// "y" over TLS: the server's downgrade check.
										want = outcome{err: map[string]string{
											"psql": "FATAL:  SCRAM channel binding negotiation error\nDETAIL:  The client supports SCRAM channel binding but thinks the server does not.  However, this server does support channel binding.",
											"pgx":  "FATAL 28000 SCRAM channel binding negotiation error",
										}[cl.name]}
									case s.channelBinding == "prefer" && serverTLS:
										// sslmode=prefer: the client tries again without TLS, and gets in.
										want = outcome{ok: true}
									}
								}
								appName := fmt.Sprintf("cbind-%d", app.Add(1))
								got := cl.login(t, p.DSN("scram_user", scramPW, "postgres",
									"sslmode="+s.sslmode, "channel_binding="+s.channelBinding, "application_name="+appName))
								if got.ok != want.ok || got.tls != want.tls ||
									(contains && !strings.Contains(got.err, want.err)) || (!contains && got.err != want.err) {
									t.Fatalf("%s\n got: %v\nwant: %v", s, got, want)
								}
								if !got.ok {
									return
								}
								// How rolegate logged in to the server: bound to the
								// server's certificate whenever the server uses TLS.
								serverAuth := "relayed"
								if mode == "proxy" {
									serverAuth = map[bool]string{false: "SCRAM-SHA-256", true: "SCRAM-SHA-256-PLUS"}[serverTLS]
								}
								line := fmt.Sprintf("application_name=%s client_tls=%v server_tls=%v server_auth=%s ", appName, got.tls, serverTLS, serverAuth)
								waitUntil(t, 30*time.Second, "the login line "+line, func() bool { return strings.Contains(p.logs.String(), line) })
							})
						}
					}
				})
			}
		}
	}
}

// saslStart opens a connection for scram_user to addr, over TLS when asked
// (SSLRequest, certificates not verified), and reads the server's
// AuthenticationSASL.
func saslStart(t *testing.T, addr string, useTLS bool) (net.Conn, *pgproto3.Frontend, []string) {
	t.Helper()
	raw, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() })
	_ = raw.SetDeadline(time.Now().Add(15 * time.Second))
	var c net.Conn = raw
	if useTLS {
		if _, err := raw.Write(packet(codeSSL)); err != nil {
			t.Fatal(err)
		}
		var b [1]byte
		if _, err := io.ReadFull(raw, b[:]); err != nil || b[0] != 'S' {
			t.Fatalf("answer to SSLRequest %q, %v", b[:], err)
		}
		tc := tls.Client(raw, &tls.Config{InsecureSkipVerify: true})
		if err := tc.HandshakeContext(t.Context()); err != nil {
			t.Fatal(err)
		}
		c = tc
	}
	startupMessage(t, c, 3, 0, "user", "scram_user", "database", "postgres")
	fe := pgproto3.NewFrontend(c, c)
	m := receive[*pgproto3.AuthenticationSASL](t, fe)
	return c, fe, m.AuthMechanisms
}

// sendRaw writes bytes as they are.
func sendRaw(t *testing.T, c net.Conn, b []byte) {
	t.Helper()
	if _, err := c.Write(b); err != nil {
		t.Fatal(err)
	}
}

// saslInitial encodes a SASLInitialResponse whose length field says n.
func saslInitial(mechanism string, n int32, data string) []byte {
	body := append([]byte(mechanism), 0)
	body = binary.BigEndian.AppendUint32(body, uint32(n))
	body = append(body, data...)
	return append(binary.BigEndian.AppendUint32([]byte{'p'}, uint32(4+len(body))), body...)
}

func saslResponse(data []byte) []byte {
	return append(binary.BigEndian.AppendUint32([]byte{'p'}, uint32(4+len(data))), data...)
}

// TestSCRAMRefusalsLikeServer sends the same broken or mismatched SCRAM
// messages to PostgreSQL and to rolegate in proxy mode, over TCP and TLS,
// and wants the same ErrorResponse from both.
func TestSCRAMRefusalsLikeServer(t *testing.T) {
	t.Parallel()
	server := tlsScramServer(t)
	ca := testutil.NewCA(t)
	p := startProxy(t, proxyOpts{server: server, auth: proxyAuth(time.Minute, auth.SourceFunc(superControl(t, server).Secret)),
		clientTLS: &tls.Config{Certificates: []tls.Certificate{ca.Issue(t, "127.0.0.1")}}})

	const first = "n=,r=abcdefghijklmnopqrstuvwx"
	tests := []struct {
		name   string
		useTLS bool
		send   func(t *testing.T, c net.Conn, fe *pgproto3.Frontend)
		code   string
		msg    string
	}{
		{"length beyond the message", false, func(t *testing.T, c net.Conn, _ *pgproto3.Frontend) {
			sendRaw(t, c, saslInitial(auth.SCRAMSHA256, 100, "n,,"+first))
		}, "08P01", "insufficient data left in message"},
		{"negative length", false, func(t *testing.T, c net.Conn, _ *pgproto3.Frontend) {
			sendRaw(t, c, saslInitial(auth.SCRAMSHA256, -2, "n,,"+first))
		}, "08P01", "insufficient data left in message"},
		{"no length", false, func(t *testing.T, c net.Conn, _ *pgproto3.Frontend) {
			sendRaw(t, c, saslResponse([]byte(auth.SCRAMSHA256+"\x00\x00\x00")))
		}, "08P01", "insufficient data left in message"},
		{"length short of the message", false, func(t *testing.T, c net.Conn, _ *pgproto3.Frontend) {
			sendRaw(t, c, saslInitial(auth.SCRAMSHA256, 5, "n,,"+first))
		}, "08P01", "invalid message format"},
		{"mechanism without terminator", false, func(t *testing.T, c net.Conn, _ *pgproto3.Frontend) {
			sendRaw(t, c, saslResponse([]byte(auth.SCRAMSHA256)))
		}, "08P01", "invalid string in message"},
		{"-PLUS without TLS", false, func(t *testing.T, c net.Conn, _ *pgproto3.Frontend) {
			data := "p=tls-server-end-point,," + first
			sendRaw(t, c, saslInitial(auth.SCRAMSHA256Plus, int32(len(data)), data))
		}, "08P01", "client selected an invalid SASL authentication mechanism"},
		{"p flag without -PLUS", false, func(t *testing.T, c net.Conn, _ *pgproto3.Frontend) {
			data := "p=tls-server-end-point,," + first
			sendRaw(t, c, saslInitial(auth.SCRAMSHA256, int32(len(data)), data))
		}, "08P01", "malformed SCRAM message"},
		{"y over TLS", true, func(t *testing.T, c net.Conn, _ *pgproto3.Frontend) {
			data := "y,," + first
			sendRaw(t, c, saslInitial(auth.SCRAMSHA256, int32(len(data)), data))
		}, "28000", "SCRAM channel binding negotiation error"},
		{"-PLUS with n", true, func(t *testing.T, c net.Conn, _ *pgproto3.Frontend) {
			data := "n,," + first
			sendRaw(t, c, saslInitial(auth.SCRAMSHA256Plus, int32(len(data)), data))
		}, "08P01", "malformed SCRAM message"},
		{"another binding type", true, func(t *testing.T, c net.Conn, _ *pgproto3.Frontend) {
			data := "p=tls-unique,," + first
			sendRaw(t, c, saslInitial(auth.SCRAMSHA256Plus, int32(len(data)), data))
		}, "08P01", `unsupported SCRAM channel-binding type "tls-unique"`},
		{"binding to another certificate", true, boundToOtherCertificate, "28000", "SCRAM channel binding check failed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var got [2]*pgproto3.ErrorResponse
			for i, addr := range []string{server.Addr(), p.Addr()} {
				c, fe, mechs := saslStart(t, addr, tt.useTLS)
				wantMechs := "[SCRAM-SHA-256]"
				if tt.useTLS {
					wantMechs = "[SCRAM-SHA-256-PLUS SCRAM-SHA-256]"
				}
				if fmt.Sprint(mechs) != wantMechs {
					t.Errorf("%s offers %v, want %s", addr, mechs, wantMechs)
				}
				tt.send(t, c, fe)
				got[i] = wantFatal(t, c, tt.code, tt.msg)
			}
			if got[0].Message != tt.msg || got[1].Message != got[0].Message || got[1].Detail != got[0].Detail {
				t.Errorf("server: %q (%q)\nrolegate: %q (%q)\nwant %q", got[0].Message, got[0].Detail, got[1].Message, got[1].Detail, tt.msg)
			}
		})
	}
}

// FuzzSASLInitialResponse holds decodeSASLInitialResponse to PostgreSQL's
// reading: a body is accepted exactly when it is a mechanism name, its
// terminator, a length and that many bytes (or -1 and none); anything else
// is a 08P01 error.
func FuzzSASLInitialResponse(f *testing.F) {
	f.Add(saslInitial(auth.SCRAMSHA256, 3, "n,,")[5:])
	f.Add(saslInitial(auth.SCRAMSHA256, 100, "n,,")[5:])
	f.Add(saslInitial(auth.SCRAMSHA256, -1, "")[5:])
	f.Add(saslInitial(auth.SCRAMSHA256, -2, "")[5:])
	f.Add([]byte(auth.SCRAMSHA256 + "\x00\x00"))
	f.Add([]byte(auth.SCRAMSHA256))
	f.Fuzz(func(t *testing.T, body []byte) {
		mechanism, data, err := decodeSASLInitialResponse(body)
		if err != nil {
			var e *auth.Error
			if !errors.As(err, &e) || e.Code != "08P01" {
				t.Fatalf("error %v, want a 08P01 *auth.Error", err)
			}
			return
		}
		again := saslInitial(mechanism, int32(len(data)), string(data))[5:]
		noResponse := saslInitial(mechanism, -1, "")[5:]
		if !bytes.Equal(again, body) && !(len(data) == 0 && bytes.Equal(noResponse, body)) {
			t.Fatalf("accepted %q as %q, %q", body, mechanism, data)
		}
	})
}

// boundToOtherCertificate runs a SCRAM-SHA-256-PLUS exchange with
// scram_user's password whose binding data is not that of the connection's
// certificate, as a client behind a relay would send it.
func boundToOtherCertificate(t *testing.T, c net.Conn, fe *pgproto3.Frontend) {
	t.Helper()
	sc, err := auth.NewSCRAMClient(&auth.Keys{Password: scramPW})
	if err != nil {
		t.Fatal(err)
	}
	sc.WithChannelBinding(make([]byte, 32))
	sendRaw(t, c, saslInitial(auth.SCRAMSHA256Plus, int32(len(sc.ClientFirst())), string(sc.ClientFirst())))
	cont := receive[*pgproto3.AuthenticationSASLContinue](t, fe)
	final, err := sc.ClientFinal(cont.Data)
	if err != nil {
		t.Fatal(err)
	}
	sendRaw(t, c, saslResponse(final))
}
