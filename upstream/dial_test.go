package upstream

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/rolegate/rolegate/config"
	"github.com/rolegate/rolegate/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeServer is a listener that answers SSLRequest with answer ('S' with a TLS
// handshake using cert, or another byte) and then hands the connection to after.
type fakeServer struct {
	addr string
	got  chan []byte // what after read, when it reads
}

func startFake(t *testing.T, answer byte, cert *tls.Certificate, after func(net.Conn, *fakeServer)) *fakeServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fs := &fakeServer{addr: ln.Addr().String(), got: make(chan []byte, 16)}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Go(func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				var req [8]byte
				if _, err := io.ReadFull(c, req[:]); err != nil {
					return
				}
				if binary.BigEndian.Uint32(req[:4]) != 8 || binary.BigEndian.Uint32(req[4:]) != 80877103 {
					// Not an SSLRequest (sslmode=disable): after reads it all.
					after(&prefixed{Conn: c, r: io.MultiReader(bytes.NewReader(req[:]), c)}, fs)
					return
				}
				if answer == 0 { // never answer; say the request is in
					fs.got <- req[:]
					_, _ = c.Read(make([]byte, 1))
					return
				}
				if _, err := c.Write([]byte{answer}); err != nil {
					return
				}
				var conn net.Conn = c
				if answer == 'S' {
					tc := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{*cert}})
					if err := tc.Handshake(); err != nil {
						return
					}
					conn = tc
				}
				if after != nil {
					after(conn, fs)
				}
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return fs
}

// prefixed is a connection whose first bytes were read already.
type prefixed struct {
	net.Conn
	r io.Reader
}

func (p *prefixed) Read(b []byte) (int, error) { return p.r.Read(b) }

// readAll records everything the client sends until it closes.
func readAll(c net.Conn, fs *fakeServer) {
	b, _ := io.ReadAll(c)
	fs.got <- b
}

func dialer(t *testing.T, addr string, mode config.SSLMode, rootCert string) *Dialer {
	t.Helper()
	d, err := NewDialer(config.Server{Address: addr, SSLMode: mode, SSLRootCert: rootCert, ConnectTimeout: "2s"})
	if err != nil {
		t.Fatalf("NewDialer: %v", err)
	}
	return d
}

func TestNewDialerErrors(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "not.pem")
	if err := os.WriteFile(notPEM, []byte("hello"), 0o644); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.pem")
	tests := []struct {
		name string
		cfg  config.Server
		want string
		is   error
	}{
		{"missing sslrootcert", config.Server{Address: "127.0.0.1:5432", SSLMode: config.SSLVerifyFull, SSLRootCert: missing},
			"read server sslrootcert", os.ErrNotExist},
		{"missing sslrootcert with require", config.Server{Address: "127.0.0.1:5432", SSLMode: config.SSLRequire, SSLRootCert: missing},
			"read server sslrootcert", os.ErrNotExist},
		{"sslrootcert without PEM", config.Server{Address: "127.0.0.1:5432", SSLMode: config.SSLVerifyCA, SSLRootCert: notPEM},
			"server sslrootcert " + notPEM + ": no PEM certificates found", nil},
		{"address without a port", config.Server{Address: "db.internal", SSLMode: config.SSLPrefer},
			`server address "db.internal"`, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			d, err := NewDialer(tt.cfg)
			if err == nil || !strings.Contains(err.Error(), tt.want) || (tt.is != nil && !errors.Is(err, tt.is)) {
				t.Errorf("NewDialer: %v, %v; want an error containing %q", d, err, tt.want)
			}
		})
	}
	// sslmode=disable reads no files.
	d, err := NewDialer(config.Server{Address: "127.0.0.1:5432", SSLMode: config.SSLDisable, SSLRootCert: missing, ConnectTimeout: "1s"})
	if err != nil || d.Address() != "127.0.0.1:5432" {
		t.Errorf("NewDialer with sslmode=disable: %v, %v", d, err)
	}
}

func TestDialRefused(t *testing.T) {
	t.Parallel()
	addr := testutil.ClosedAddr(t)
	for _, mode := range []config.SSLMode{config.SSLDisable, config.SSLPrefer} {
		_, _, err := dialer(t, addr, mode, "").Dial(t.Context())
		var de *DialError
		if !errors.As(err, &de) || de.Address != addr || !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("sslmode=%s: %v (%T), want a DialError for %s wrapping ECONNREFUSED", mode, err, err, addr)
		}
		if !strings.HasPrefix(err.Error(), "could not connect to server "+addr+": ") {
			t.Errorf("message %q", err)
		}
	}
}

func TestDialTLSModes(t *testing.T) {
	t.Parallel()
	serverCA := testutil.NewCA(t)
	otherCA := testutil.NewCA(t)
	// The certificate names db.example, not 127.0.0.1: verify-full must fail on
	// the host name, verify-ca must pass.
	cert := serverCA.Issue(t, "db.example")
	// Each case gets its own server, which answers the SSLRequest with this byte.
	const tlsServer, plainServer, oddServer = 'S', 'N', 'E'

	tests := []struct {
		name    string
		answer  byte
		mode    config.SSLMode
		root    string
		wantTLS bool
		wantErr string
	}{
		{"prefer, TLS offered", tlsServer, config.SSLPrefer, "", true, ""},
		{"require without root", tlsServer, config.SSLRequire, "", true, ""},
		{"require with the right root", tlsServer, config.SSLRequire, serverCA.PEMFile, true, ""},
		{"require with another root", tlsServer, config.SSLRequire, otherCA.PEMFile, false, "certificate signed by unknown authority"},
		{"verify-ca", tlsServer, config.SSLVerifyCA, serverCA.PEMFile, true, ""},
		{"verify-ca with another root", tlsServer, config.SSLVerifyCA, otherCA.PEMFile, false, "certificate signed by unknown authority"},
		{"verify-full, host name mismatch", tlsServer, config.SSLVerifyFull, serverCA.PEMFile, false, "cannot validate certificate for 127.0.0.1 because it doesn't contain any IP SANs"},
		{"prefer, TLS refused", plainServer, config.SSLPrefer, "", false, ""},
		{"require, TLS refused", plainServer, config.SSLRequire, "", false, "server does not support SSL, but sslmode is require"},
		{"verify-full, TLS refused", plainServer, config.SSLVerifyFull, serverCA.PEMFile, false, "server does not support SSL, but sslmode is verify-full"},
		{"an odd answer", oddServer, config.SSLPrefer, "", false, `received invalid response to SSL negotiation: 'E'`},
		{"disable", plainServer, config.SSLDisable, "", false, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			server := startFake(t, tt.answer, &cert, readAll)
			conn, useTLS, err := dialer(t, server.addr, tt.mode, tt.root).Dial(t.Context())
			if tt.wantErr != "" {
				var de *DialError
				if !errors.As(err, &de) || de.Address != server.addr || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Dial: %v, want a DialError containing %q", err, tt.wantErr)
				}
				if conn != nil {
					t.Error("connection returned with an error")
				}
				return
			}
			if err != nil {
				t.Fatalf("Dial: %v", err)
			}
			defer conn.Close()
			_, isTLS := conn.(*tls.Conn)
			if useTLS != tt.wantTLS || isTLS != tt.wantTLS {
				t.Errorf("useTLS %v, *tls.Conn %v; want %v", useTLS, isTLS, tt.wantTLS)
			}
			// The connection is ready for a StartupMessage: what we write arrives intact.
			want := []byte("a startup message")
			if _, err := conn.Write(want); err != nil {
				t.Fatal(err)
			}
			conn.Close()
			select {
			case got := <-server.got:
				if !bytes.Equal(got, want) {
					t.Errorf("server got %q, want %q", got, want)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("server got nothing")
			}
		})
	}
}

// A server that never answers the SSLRequest does not hold a login past
// connect_timeout, nor past the caller's context.
func TestDialTimeout(t *testing.T) {
	t.Parallel()
	silent := startFake(t, 0, nil, nil)
	d, err := NewDialer(config.Server{Address: silent.addr, SSLMode: config.SSLPrefer, ConnectTimeout: "200ms"})
	if err != nil {
		t.Fatal(err)
	}
	// The caller's own bound is far away: the deadline error is connect_timeout's.
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	_, _, err = d.Dial(ctx)
	if err == nil || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Dial: %v, want a deadline error", err)
	}
	if ctx.Err() != nil {
		t.Errorf("Dial returned at the caller's deadline, not at connect_timeout 200ms")
	}
	var de *DialError
	if !errors.As(err, &de) || de.Step != StepSSLAnswer || de.Timeout != 200*time.Millisecond {
		t.Errorf("Dial: %#v, want a DialError at the SSL answer ended by connect_timeout", err)
	} else if want := "rolegate could not connect to server " + silent.addr +
		": timeout expired after 200ms while waiting for the server's answer to the SSL request"; de.Message() != want {
		t.Errorf("message %q, want %q", de.Message(), want)
	}

	<-silent.got // the first Dial's request

	// connect_timeout 2 minutes; the caller's context ends first.
	d, err = NewDialer(config.Server{Address: silent.addr, SSLMode: config.SSLPrefer, ConnectTimeout: "2m"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel = context.WithCancel(t.Context())
	go func() {
		<-silent.got // cancel while Dial waits for the answer
		cancel()
	}()
	_, _, err = d.Dial(ctx)
	cancel()
	if !errors.Is(err, context.Canceled) {
		t.Errorf("Dial with a cancelled context: %v, want context.Canceled", err)
	}
}

func TestCancel(t *testing.T) {
	t.Parallel()
	serverCA := testutil.NewCA(t)
	cert := serverCA.Issue(t, "db.example")
	readCancel := func(c net.Conn, fs *fakeServer) {
		b := make([]byte, 16)
		n, _ := io.ReadFull(c, b)
		fs.got <- b[:n]
	}
	tlsServer := startFake(t, 'S', &cert, readCancel)
	key := []byte{0xde, 0xad, 0xbe, 0xef}
	want := []byte{0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0x30, 0x39, 0xde, 0xad, 0xbe, 0xef}

	t.Run("over TLS", func(t *testing.T) {
		d := dialer(t, tlsServer.addr, config.SSLRequire, "")
		if err := d.Cancel(t.Context(), 12345, key, true); err != nil {
			t.Fatal(err)
		}
		// Cancel waited for the server to close, so the request is there already.
		select {
		case got := <-tlsServer.got:
			if !bytes.Equal(got, want) {
				t.Errorf("server got %x, want %x", got, want)
			}
		default:
			t.Error("Cancel returned before the server had the request")
		}
	})
	t.Run("plain, as the session was", func(t *testing.T) {
		d := dialer(t, tlsServer.addr, config.SSLRequire, "")
		if err := d.Cancel(t.Context(), 12345, key, false); err != nil {
			t.Fatal(err)
		}
		select {
		case got := <-tlsServer.got:
			if !bytes.Equal(got, want) {
				t.Errorf("server got %x, want %x", got, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("server got nothing")
		}
	})
	t.Run("server unreachable", func(t *testing.T) {
		addr := testutil.ClosedAddr(t)
		err := dialer(t, addr, config.SSLDisable, "").Cancel(t.Context(), 1, key, false)
		var de *DialError
		if !errors.As(err, &de) || de.Address != addr {
			t.Errorf("Cancel: %v, want a DialError", err)
		}
	})
}

// verify-full checks the host name of the address: localhost matches a
// certificate for localhost.
func TestDialVerifyFullByName(t *testing.T) {
	t.Parallel()
	serverCA := testutil.NewCA(t)
	cert := serverCA.Issue(t, "localhost")
	server := startFake(t, 'S', &cert, readAll)
	_, port, _ := net.SplitHostPort(server.addr)
	conn, useTLS, err := dialer(t, net.JoinHostPort("localhost", port), config.SSLVerifyFull, serverCA.PEMFile).Dial(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
	if !useTLS {
		t.Error("not TLS")
	}
}

// A server that answers the SSLRequest and then stalls or hangs up in the TLS
// handshake fails the dial at that step.
func TestDialTLSHandshakeFails(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name, want string
		timeout    time.Duration
		end        func(net.Conn)
	}{
		{"stalls", "timeout expired after 200ms during the TLS handshake", 200 * time.Millisecond,
			func(c net.Conn) { _, _ = io.Copy(io.Discard, c) }},
		{"hangs up", "server closed the connection unexpectedly during the TLS handshake", 0,
			func(c net.Conn) { c.Close() }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			done := make(chan struct{})
			go func() {
				defer close(done)
				c, err := ln.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				if _, err := io.ReadFull(c, make([]byte, 8)); err != nil {
					return
				}
				if _, err := c.Write([]byte{'S'}); err != nil {
					return
				}
				tt.end(c)
			}()
			d, err := NewDialer(config.Server{Address: ln.Addr().String(), SSLMode: config.SSLRequire, ConnectTimeout: "200ms"})
			if err != nil {
				t.Fatal(err)
			}
			_, _, err = d.Dial(t.Context())
			var de *DialError
			if !errors.As(err, &de) || de.Step != StepTLSHandshake || de.Timeout != tt.timeout {
				t.Fatalf("Dial: %#v, want a DialError in the TLS handshake", err)
			}
			if want := "rolegate could not connect to server " + ln.Addr().String() + ": " + tt.want; de.Message() != want {
				t.Errorf("message %q, want %q", de.Message(), want)
			}
			<-done
		})
	}
}

// A LoginConn gives the server connect_timeout per turn, never past the
// login's deadline, and names the step in its errors.
func TestLoginConn(t *testing.T) {
	t.Parallel()
	d, err := NewDialer(config.Server{Address: "db:5432", SSLMode: config.SSLDisable, ConnectTimeout: "50ms"})
	if err != nil {
		t.Fatal(err)
	}
	wantFail := func(t *testing.T, err error, step Step, timeout time.Duration, cause string) {
		t.Helper()
		var de *DialError
		if !errors.As(err, &de) || de.Step != step || de.Timeout != timeout {
			t.Fatalf("error %#v, want a DialError at %v after %v", err, step, timeout)
		}
		if want := "rolegate could not connect to server db:5432: " + cause + " " + step.String(); de.Message() != want {
			t.Errorf("message %q, want %q", de.Message(), want)
		}
	}
	t.Run("the startup message goes unanswered", func(t *testing.T) {
		t.Parallel()
		c, s := net.Pipe()
		defer s.Close()
		lc := d.LoginConn(c, time.Now().Add(time.Hour))
		lc.Begin(StepStartup)
		_, err := lc.Read(make([]byte, 1))
		wantFail(t, err, StepStartup, 50*time.Millisecond, "timeout expired after 50ms")
	})
	t.Run("a write starts the server's turn to answer it", func(t *testing.T) {
		t.Parallel()
		c, s := net.Pipe()
		defer s.Close()
		lc := d.LoginConn(c, time.Time{})
		lc.Begin(StepStartup)
		// The client's turn takes longer than connect_timeout: not the server's time.
		go func() { _, _ = s.Read(make([]byte, 3)) }()
		time.Sleep(100 * time.Millisecond)
		if _, err := lc.Write([]byte("abc")); err != nil {
			t.Fatalf("Write after the client's turn: %v", err)
		}
		_, err := lc.Read(make([]byte, 1))
		wantFail(t, err, StepAuth, 50*time.Millisecond, "timeout expired after 50ms")
	})
	t.Run("the login's deadline comes first", func(t *testing.T) {
		t.Parallel()
		c, s := net.Pipe()
		defer s.Close()
		lc := d.LoginConn(c, time.Now().Add(-time.Second))
		lc.Begin(StepReady)
		_, err := lc.Read(make([]byte, 1))
		wantFail(t, err, StepReady, 0, "timeout expired")
	})
	t.Run("the server hangs up", func(t *testing.T) {
		t.Parallel()
		c, s := net.Pipe()
		lc := d.LoginConn(c, time.Time{})
		lc.Begin(StepReady)
		s.Close()
		_, err := lc.Read(make([]byte, 1))
		wantFail(t, err, StepReady, 0, "server closed the connection unexpectedly")
	})
}

// What a client is told never carries a socket's error text; the log's
// Error keeps it.
func TestDialErrorMessage(t *testing.T) {
	t.Parallel()
	opErr := func(err error) error {
		return &net.OpError{Op: "read", Net: "tcp", Source: &net.TCPAddr{Port: 1234}, Addr: &net.TCPAddr{Port: 5432}, Err: err}
	}
	tests := []struct {
		err  error
		step Step
		want string
	}{
		{opErr(os.ErrDeadlineExceeded), StepStartup, "timeout expired while waiting for the server's answer to the startup message"},
		{opErr(syscall.ECONNRESET), StepAuth, "server closed the connection unexpectedly while waiting for the server's answer to the authentication response"},
		{&net.OpError{Op: "dial", Net: "tcp", Err: &os.SyscallError{Syscall: "connect", Err: syscall.ECONNREFUSED}}, StepConnect,
			"connection refused while opening the TCP connection"},
		{&net.OpError{Op: "dial", Net: "tcp", Err: &net.DNSError{Err: "no such host", Name: "db.invalid"}}, StepConnect,
			`could not translate host name "db.invalid" to address (no such host)`},
		{opErr(errors.New("something else")), StepReady, "the connection failed while waiting for the server to become ready after authentication"},
		{errors.New(`unexpected message type 'X' during login`), StepReady, `unexpected message type 'X' during login`},
	}
	for _, tt := range tests {
		de := &DialError{Address: "db:5432", Step: tt.step, Err: tt.err}
		if got, want := de.Message(), "rolegate could not connect to server db:5432: "+tt.want; got != want {
			t.Errorf("%v: message %q, want %q", tt.err, got, want)
		}
		if !strings.Contains(de.Error(), tt.err.Error()) {
			t.Errorf("Error() %q lost the detail %q", de.Error(), tt.err)
		}
	}
}
