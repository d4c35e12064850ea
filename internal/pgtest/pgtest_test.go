package pgtest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/goleak"
)

// TestMain fails the package if a cluster leaves a goroutine behind (the
// process reaper, a pgx connection), since every package that uses pgtest
// runs the same check.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestPlain(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	c := Start(t, Options{
		HBA:      []string{"host all trust_user 127.0.0.1/32 trust"},
		Settings: map[string]string{"work_mem": "7MB", "application_name": `it's a \ test`},
	})

	conn := connect(t, c.SuperDSN())
	var workMem, ssl string
	var encryption string
	if err := conn.QueryRow(ctx, "select current_setting('work_mem'), current_setting('ssl'), current_setting('password_encryption')").Scan(&workMem, &ssl, &encryption); err != nil {
		t.Fatal(err)
	}
	if workMem != "7MB" || ssl != "off" || encryption != "scram-sha-256" {
		t.Errorf("work_mem=%s ssl=%s password_encryption=%s, want 7MB off scram-sha-256", workMem, ssl, encryption)
	}
	conn.Close(ctx)

	// SCRAM is enforced on TCP: a wrong password is refused as the server
	// refuses it, with 28P01.
	_, err := pgx.Connect(ctx, c.DSN(c.SuperUser, "wrong", "postgres"))
	wantSQLState(t, err, "28P01")
	_, err = pgx.Connect(ctx, c.DSN(c.SuperUser, "", "postgres"))
	if err == nil {
		t.Error("login without a password succeeded")
	}

	// Options.HBA lines come before the scram-sha-256 default.
	if err := c.Exec(ctx, "create role trust_user login; create role other_user login password 'pw'"); err != nil {
		t.Fatal(err)
	}
	connect(t, c.DSN("trust_user", "", "postgres")).Close(ctx)
	_, err = pgx.Connect(ctx, c.DSN("other_user", "", "postgres"))
	if err == nil {
		t.Error("other_user logged in without a password")
	}
	connect(t, c.DSN("other_user", "pw", "postgres")).Close(ctx)

	// Exec passes arguments and reports the server's error.
	if err := c.Exec(ctx, "select $1::int", 42); err != nil {
		t.Error(err)
	}
	wantSQLState(t, c.Exec(ctx, "select * from no_such_table"), "42P01")

	checkClose(t, c)
}

func TestSSL(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	c := Start(t, Options{SSL: true, HostSSLOnly: true})

	for _, path := range []string{c.CACertFile, c.CAKeyFile} {
		if _, err := os.Stat(path); err != nil {
			t.Fatal(err)
		}
	}
	fi, err := os.Stat(c.CACertFile)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm()&0o004 == 0 {
		t.Errorf("CA certificate mode %v, want readable by anyone", fi.Mode())
	}

	// The DSN of a hostssl-only cluster verifies the server fully.
	dsn := c.SuperDSN()
	if !strings.Contains(dsn, "sslmode=verify-full") {
		t.Errorf("SuperDSN %q does not ask for verify-full", dsn)
	}
	conn := connect(t, dsn)
	var usesSSL bool
	if err := conn.QueryRow(ctx, "select ssl from pg_stat_ssl where pid = pg_backend_pid()").Scan(&usesSSL); err != nil {
		t.Fatal(err)
	}
	if !usesSSL {
		t.Error("connection does not use TLS")
	}
	conn.Close(ctx)

	// The certificate is valid for localhost too.
	u, err := url.Parse(dsn)
	if err != nil {
		t.Fatal(err)
	}
	u.Host = strings.Replace(u.Host, "127.0.0.1", "localhost", 1)
	connect(t, u.String()).Close(ctx)

	// A client that does not trust the CA is refused by its own check.
	u.RawQuery = url.Values{"sslmode": {"verify-full"}, "sslrootcert": {writeOtherCA(t)}}.Encode()
	if _, err := pgx.Connect(ctx, u.String()); err == nil {
		t.Error("verify-full succeeded against an unrelated CA")
	}

	// Without TLS there is no pg_hba.conf line to match: 28000.
	plain := strings.Replace(c.DSN(c.SuperUser, c.SuperPassword, "postgres"), "sslmode=verify-full", "sslmode=disable", 1)
	_, err = pgx.Connect(ctx, plain)
	wantSQLState(t, err, "28000")

	// Exec works over TLS as well.
	if err := c.Exec(ctx, "select 1"); err != nil {
		t.Error(err)
	}

	checkClose(t, c)
}

func TestCloseConcurrently(t *testing.T) {
	t.Parallel()
	c := Start(t, Options{})
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Go(func() { errs[i] = c.Close() })
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

func TestStartFailureReportsLog(t *testing.T) {
	t.Parallel()
	_, err := New(t.Context(), Options{Settings: map[string]string{"no_such_setting": "1"}})
	if err == nil {
		t.Fatal("New succeeded with an unknown setting")
	}
	// The server's own complaint must reach the test output.
	if !strings.Contains(err.Error(), `unrecognized configuration parameter "no_such_setting"`) {
		t.Errorf("error does not quote the server log: %v", err)
	}
}

func TestStartCancelled(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := New(ctx, Options{}); err == nil {
		t.Fatal("New succeeded with a cancelled context")
	}
}

func TestBadOptions(t *testing.T) {
	for name, opts := range map[string]Options{
		"HostSSLOnly without SSL": {HostSSLOnly: true},
		"setting name":            {Settings: map[string]string{"a = 1\nb": "2"}},
		"HBA newline":             {HBA: []string{"host all a 127.0.0.1/32 trust\nhost all b 127.0.0.1/32 trust"}},
	} {
		if _, err := New(t.Context(), opts); err == nil {
			t.Errorf("%s: New succeeded", name)
		}
	}
}

func TestServerBinDir(t *testing.T) {
	dir, err := ServerBinDir()
	if err != nil {
		t.Fatal(err)
	}
	if !hasServerBinaries(dir) {
		t.Errorf("%s lacks initdb or postgres", dir)
	}
	t.Setenv("PG_BINDIR", t.TempDir())
	if _, err := ServerBinDir(); err == nil {
		t.Error("an empty PG_BINDIR was accepted")
	}
}

// checkClose closes c twice and checks the server and its files are gone.
func checkClose(t *testing.T, c *Cluster) {
	t.Helper()
	if err := c.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := os.Stat(c.Dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("cluster dir still there after Close: %v", err)
	}
	if _, err := pgx.Connect(t.Context(), c.SuperDSN()); err == nil {
		t.Error("server still accepts logins after Close")
	}
}

func connect(t *testing.T, dsn string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), dsn)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	return conn
}

func wantSQLState(t *testing.T, err error, code string) {
	t.Helper()
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != code {
		t.Errorf("got %v, want SQLSTATE %s", err, code)
	}
}

// writeOtherCA writes a CA certificate that did not sign the server's.
func writeOtherCA(t *testing.T) string {
	t.Helper()
	files, err := writeTLSFiles(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return files.caCert
}

func TestPortTakenRetries(t *testing.T) {
	t.Parallel()
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	takenPort := taken.Addr().(*net.TCPAddr).Port
	picks := 0
	pick := func() (int, error) {
		picks++
		if picks == 1 {
			return takenPort, nil
		}
		return FreePort()
	}
	c, err := newCluster(t.Context(), Options{Logf: t.Logf}, pick)
	if err != nil {
		t.Fatal(err)
	}
	defer checkClose(t, c)
	if picks != 2 || c.Port == takenPort {
		t.Errorf("picked %d ports, listening on %d (taken: %d); want a retry on another port", picks, c.Port, takenPort)
	}
	if err := c.Exec(t.Context(), "select 1"); err != nil {
		t.Error(err)
	}
}

// TestIssueServerCert checks that a certificate issued for a process in
// front of the cluster verifies against the cluster's CA for the names
// clients dial, with a key only its owner can read, and that a cluster
// without TLS says it has no CA.
func TestIssueServerCert(t *testing.T) {
	t.Parallel()
	files, err := writeTLSFiles(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	c := &Cluster{CACertFile: files.caCert, CAKeyFile: files.caKey}
	dir := t.TempDir()
	certFile, keyFile, err := c.IssueServerCert(dir, "proxy")
	if err != nil {
		t.Fatal(err)
	}
	if certFile != filepath.Join(dir, "proxy.crt") || keyFile != filepath.Join(dir, "proxy.key") {
		t.Errorf("files %s and %s, want proxy.crt and proxy.key in %s", certFile, keyFile, dir)
	}
	if fi, err := os.Stat(keyFile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("key file: %v, %v; want mode 0600", fi, err)
	}
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(files.caCert)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		t.Fatal("no CA certificate in " + files.caCert)
	}
	for _, name := range []string{"127.0.0.1", "::1", "localhost"} {
		if _, err := leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: roots}); err != nil {
			t.Errorf("verify for %s: %v", name, err)
		}
	}

	if _, _, err := (&Cluster{}).IssueServerCert(dir, "plain"); err == nil || !strings.Contains(err.Error(), "no CA") {
		t.Errorf("a cluster without TLS: %v, want an error saying it has no CA", err)
	}
}
