package proxy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/config"
	"github.com/rolegate/rolegate/internal/pgtest"
	"github.com/rolegate/rolegate/internal/testutil"
)

// TestClientCertificateAuth pins down what README's "Differences from
// connecting directly" says about client certificates: rolegate terminates
// the client's TLS, so a certificate the client holds never reaches the
// server, and a pg_hba.conf "cert" line for the role refuses every login
// that comes through rolegate, in both authentication modes, with the
// server's own error. The same client logs in directly.
func TestClientCertificateAuth(t *testing.T) {
	t.Parallel()
	c := pgtest.Start(t, pgtest.Options{SSL: true, HBA: []string{"hostssl all cert_user 127.0.0.1/32 cert"}})
	const certPW = "cert-user-pw"
	if err := c.Exec(t.Context(), "create role cert_user login password '"+certPW+"'"); err != nil {
		t.Fatal(err)
	}
	certFile, keyFile := clientCertificate(t, c, "cert_user")
	withCert := []string{"sslmode=require", "sslcert=" + certFile, "sslkey=" + keyFile}

	direct := strings.Join(append([]string{"host=" + c.Host, "port=" + strconv.Itoa(c.Port), "user=cert_user", "dbname=postgres"}, withCert...), " ")
	out, errOut, err := psql(t, direct, "", "-At", "-c", "select current_user")
	if err != nil || strings.TrimSpace(out) != "cert_user" {
		t.Fatalf("direct login with a client certificate: %v, output %q, stderr %q", err, out, errOut)
	}

	ca := testutil.NewCA(t)
	clientTLS := &tls.Config{Certificates: []tls.Certificate{ca.Issue(t, "localhost", "127.0.0.1")}}
	modes := []struct {
		name string
		auth func() *ClientAuth
		pw   string
		want string // in psql's stderr
	}{
		// The server asks rolegate's connection for a certificate it does not have.
		{"passthrough", func() *ClientAuth { return nil }, "", "connection requires a valid client certificate"},
		// rolegate verifies the password, then the server refuses rolegate's login.
		{"proxy", func() *ClientAuth { return proxyAuth(time.Minute, auth.SourceFunc(superControl(t, c).Secret)) }, certPW,
			"connection requires a valid client certificate"},
		// Without a password, rolegate's own request for one cannot be answered.
		{"proxy without password", func() *ClientAuth { return proxyAuth(time.Minute, auth.SourceFunc(superControl(t, c).Secret)) }, "",
			"no password supplied"},
	}
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			p := startProxy(t, proxyOpts{server: c, sslmode: config.SSLRequire, clientTLS: clientTLS, auth: m.auth()})
			_, errOut, err := psql(t, p.DSN("cert_user", m.pw, "postgres", withCert...), "", "-c", "select 1")
			if err == nil || !strings.Contains(errOut, m.want) {
				t.Errorf("through rolegate (%s): %v, stderr %q, want %q", m.name, err, errOut, m.want)
			}
		})
	}
}

// clientCertificate issues a client certificate for user (its CN) from the
// cluster's CA, which the server trusts for the cert method, and writes it
// and its key where libpq accepts them (the key readable by its owner only).
func clientCertificate(t *testing.T, c *pgtest.Cluster, user string) (certFile, keyFile string) {
	t.Helper()
	caPair, err := tls.LoadX509KeyPair(c.CACertFile, c.CAKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	caCert, err := x509.ParseCertificate(caPair.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: user},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caPair.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "client.crt"), filepath.Join(dir, "client.key")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}
