package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/goleak"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/config"
	"github.com/rolegate/rolegate/internal/pgtest"
	"github.com/rolegate/rolegate/internal/testutil"
	"github.com/rolegate/rolegate/upstream"
)

// shared is one cluster for the tests that need no special server set-up.
// Roles: trust_user (trust), password_user (password), md5_user (md5, with an
// md5 verifier), scram_user (scram-sha-256); database app owned by scram_user.
var shared *pgtest.Cluster

// Passwords of the shared cluster's roles.
const (
	passwordPW = "pass word'1"
	md5PW      = "md5 secret"
	scramPW    = "scram-secret"
)

func TestMain(m *testing.M) {
	flag.Parse()
	if fuzzing() {
		// Fuzz targets are pure; every fuzz worker process runs TestMain too, and
		// must not start a cluster of its own.
		os.Exit(m.Run())
	}
	code := func() int {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		c, err := pgtest.New(ctx, pgtest.Options{HBA: []string{
			"host all trust_user 127.0.0.1/32 trust",
			"host all password_user 127.0.0.1/32 password",
			"host all md5_user 127.0.0.1/32 md5",
		}})
		if err != nil {
			fmt.Fprintln(os.Stderr, "start shared cluster:", err)
			return 1
		}
		defer c.Close()
		setup := []string{
			"create role trust_user login",
			fmt.Sprintf("create role password_user login password '%s'", strings.ReplaceAll(passwordPW, "'", "''")),
			"set password_encryption = 'md5'",
			fmt.Sprintf("create role md5_user login password '%s'", md5PW),
			"reset password_encryption",
			fmt.Sprintf("create role scram_user login password '%s'", scramPW),
			"create database app owner scram_user",
			"grant all on schema public to public",
		}
		for _, q := range setup {
			if err := c.Exec(ctx, q); err != nil {
				fmt.Fprintf(os.Stderr, "shared cluster set-up %q: %v\n", q, err)
				return 1
			}
		}
		shared = c
		return m.Run()
	}()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goroutine leak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

func fuzzing() bool {
	for _, name := range []string{"test.fuzz", "test.fuzzworker"} {
		if f := flag.Lookup(name); f != nil && f.Value.String() != "" && f.Value.String() != "false" {
			return true
		}
	}
	return false
}

// proxyOpts adjusts the proxy a test starts.
type proxyOpts struct {
	server         *pgtest.Cluster // default: shared
	serverAddr     string          // overrides server.Addr(), e.g. an address nobody listens on
	sslmode        config.SSLMode  // default: prefer
	sslrootcert    string
	clientTLS      *tls.Config
	startupTimeout time.Duration           // default: 10 s
	connectTimeout time.Duration           // [server] connect_timeout; default: 30 s, beyond a busy machine's slowest server answer
	auth           *ClientAuth             // nil: passthrough
	limits         *Limits                 // nil: no limits
	throttle       throttleOptions         // repeated-failure log lines; zero: the defaults
	wrap           func(net.Conn) net.Conn // wraps each accepted connection; nil: none
}

// wrapListener hands Serve its connections through wrap.
type wrapListener struct {
	net.Listener
	wrap func(net.Conn) net.Conn
}

func (l *wrapListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return l.wrap(c), nil
}

// testProxy is a proxy Server serving on a loopback port.
type testProxy struct {
	*Server
	Host string
	Port int
	logs *testutil.SyncBuffer
	done chan error
}

// startProxy starts a proxy in front of a cluster; the test's cleanup closes it
// and checks that Serve returned ErrServerClosed.
func startProxy(t testing.TB, o proxyOpts) *testProxy {
	t.Helper()
	return startProxyWith(t, o, nil)
}

// startProxyWith is startProxy with a last word on the Config.
func startProxyWith(t testing.TB, o proxyOpts, adjust func(*Config)) *testProxy {
	t.Helper()
	if o.server == nil {
		o.server = shared
	}
	if o.serverAddr == "" {
		o.serverAddr = o.server.Addr()
	}
	if o.sslmode == "" {
		o.sslmode = config.SSLPrefer
	}
	if o.startupTimeout == 0 {
		o.startupTimeout = 10 * time.Second
	}
	if o.connectTimeout == 0 {
		o.connectTimeout = 30 * time.Second
	}
	d, err := upstream.NewDialer(config.Server{Address: o.serverAddr, SSLMode: o.sslmode,
		SSLRootCert: o.sslrootcert, ConnectTimeout: config.Duration(o.connectTimeout.String())})
	if err != nil {
		t.Fatalf("upstream dialer: %v", err)
	}
	logs := &testutil.SyncBuffer{}
	cfg := Config{
		Upstream:       d,
		TLS:            o.clientTLS,
		Auth:           o.auth,
		Limits:         o.limits,
		StartupTimeout: o.startupTimeout,
		// ROLEGATE_TEST_RELAY=goroutines runs the tests with the goroutine
		// relay for every session (the default relays plain TCP on the loop).
		Relay:    os.Getenv("ROLEGATE_TEST_RELAY"),
		Logger:   slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		throttle: o.throttle,
	}
	if adjust != nil {
		adjust(&cfg)
	}
	srv := New(cfg)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &testProxy{Server: srv, Host: "127.0.0.1", Port: ln.Addr().(*net.TCPAddr).Port, logs: logs, done: make(chan error, 1)}
	if o.wrap != nil {
		ln = &wrapListener{Listener: ln, wrap: o.wrap}
	}
	go func() { p.done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-p.done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
		if t.Failed() {
			t.Logf("rolegate log:\n%s", logs.String())
		}
	})
	return p
}

// Addr is the proxy's host:port.
func (p *testProxy) Addr() string { return fmt.Sprintf("%s:%d", p.Host, p.Port) }

// DSN is a libpq keyword/value connection string for the proxy; extra is
// appended as more keyword=value pairs (later ones win in libpq and pgx).
func (p *testProxy) DSN(user, password, database string, extra ...string) string {
	parts := []string{
		"host=" + p.Host,
		fmt.Sprintf("port=%d", p.Port),
		"user=" + quoteDSN(user),
		"dbname=" + quoteDSN(database),
		"sslmode=disable",
	}
	if password != "" {
		parts = append(parts, "password="+quoteDSN(password))
	}
	return strings.Join(append(parts, extra...), " ")
}

func quoteDSN(v string) string {
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(v) + "'"
}

// connect opens a pgx connection and closes it at cleanup.
func connect(t testing.TB, dsn string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("connect %q: %v", redact(dsn), err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// psql runs psql with a connection string and arguments and returns its
// standard output and error. PGCONNECT_TIMEOUT keeps a broken test from hanging.
func psql(t testing.TB, dsn string, stdin string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "psql", append([]string{"-X", "-v", "ON_ERROR_STOP=1", "-d", dsn}, args...)...)
	cmd.Env = append(os.Environ(), "PGCONNECT_TIMEOUT=10", "PGPASSWORD=", "PGSERVICEFILE=/nonexistent")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	err = cmd.Run()
	return out.String(), errb.String(), err
}

func redact(dsn string) string {
	if i := strings.Index(dsn, "password="); i >= 0 {
		return dsn[:i] + "password=***"
	}
	return dsn
}

// superControl is a control pool on c as its superuser, with the default auth
// query; it is closed at cleanup.
func superControl(t testing.TB, c *pgtest.Cluster) *upstream.Control {
	t.Helper()
	ctl, err := upstream.NewControl(context.Background(), config.Control{DSN: c.SuperDSN(), MaxConns: 2}, config.DefaultAuthQuery)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ctl.Close)
	return ctl
}

// proxyAuth is proxy-mode authentication from the given sources, cached for ttl.
func proxyAuth(ttl time.Duration, sources ...auth.Source) *ClientAuth {
	return &ClientAuth{Store: auth.NewStore(100, ttl, sources...), Method: "scram-sha-256"}
}

// waitUntil checks cond every few milliseconds until it holds, and fails the
// test if it does not within limit: tests wait for the state they expect,
// never for a duration.
func waitUntil(t testing.TB, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	testutil.WaitFor(t, limit, what, cond)
}

// tcpPair is both ends of a loopback TCP connection: a dialed, b accepted.
func tcpPair(t testing.TB) (a, b net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	a, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	b = <-accepted
	if b == nil {
		a.Close()
		t.Fatal("accept failed")
	}
	return a, b
}
