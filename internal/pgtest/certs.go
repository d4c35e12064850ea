package pgtest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// tlsFiles are the PEM files of a cluster's certificate chain.
type tlsFiles struct {
	caCert, caKey, serverCert, serverKey string
}

// writeTLSFiles creates a fresh CA and a server certificate for 127.0.0.1,
// ::1 and localhost in dir, so that clients can use sslmode=verify-full.
// ECDSA P-256 keeps generation well under a millisecond.
func writeTLSFiles(dir string) (tlsFiles, error) {
	files := tlsFiles{
		caCert:     filepath.Join(dir, "ca.crt"),
		caKey:      filepath.Join(dir, "ca.key"),
		serverCert: filepath.Join(dir, "server.crt"),
		serverKey:  filepath.Join(dir, "server.key"),
	}
	// A little slack on both ends so clock skew between the test and the
	// server never matters; a test cluster lives minutes, not days.
	notBefore := time.Now().Add(-time.Hour)
	notAfter := notBefore.Add(7 * 24 * time.Hour)

	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return files, fmt.Errorf("CA key: %w", err)
	}
	caTemplate := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{CommonName: "pgtest CA"},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTemplate, caTemplate, &caKey.PublicKey, caKey)
	if err != nil {
		return files, fmt.Errorf("CA certificate: %w", err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return files, fmt.Errorf("CA certificate: %w", err)
	}

	// Certificates are public: world-readable so that clients running as
	// another user can verify against the CA. Keys stay 0600.
	if err := writePEM(files.caCert, "CERTIFICATE", caDER, 0o644); err != nil {
		return files, err
	}
	if err := writeKey(files.caKey, caKey); err != nil {
		return files, err
	}
	if err := writeServerCert(files.serverCert, files.serverKey, ca, caKey); err != nil {
		return files, err
	}
	return files, nil
}

// IssueServerCert writes a server certificate for 127.0.0.1, ::1 and
// localhost, signed by the cluster's CA, and its key to name.crt and
// name.key in dir, for a process that clients reach over TLS in front of
// the cluster (rolegate, PgBouncer), so that they too can use
// sslmode=verify-full against CACertFile. The key file is 0600 and owned by
// the caller; chown it for a process running as another user. It needs
// Options.SSL.
func (c *Cluster) IssueServerCert(dir, name string) (certFile, keyFile string, err error) {
	if c.CACertFile == "" || c.CAKeyFile == "" {
		return "", "", errors.New("issuing a server certificate: the cluster has no CA (Options.SSL is off)")
	}
	pair, err := tls.LoadX509KeyPair(c.CACertFile, c.CAKeyFile)
	if err != nil {
		return "", "", fmt.Errorf("loading the cluster's CA: %w", err)
	}
	ca, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return "", "", fmt.Errorf("loading the cluster's CA: %w", err)
	}
	caKey, ok := pair.PrivateKey.(crypto.Signer)
	if !ok {
		return "", "", fmt.Errorf("loading the cluster's CA: its key is a %T, not a crypto.Signer", pair.PrivateKey)
	}
	certFile, keyFile = filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
	if err := writeServerCert(certFile, keyFile, ca, caKey); err != nil {
		return "", "", err
	}
	return certFile, keyFile, nil
}

// writeServerCert writes a fresh key and a certificate for 127.0.0.1, ::1
// and localhost signed by ca, valid from an hour ago for a week, as the CA.
func writeServerCert(certPath, keyPath string, ca *x509.Certificate, caKey crypto.Signer) error {
	notBefore := time.Now().Add(-time.Hour)
	notAfter := notBefore.Add(7 * 24 * time.Hour)
	serverKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("server key: %w", err)
	}
	serverTemplate := &x509.Certificate{
		SerialNumber: randomSerial(),
		Subject:      pkix.Name{CommonName: "localhost"},
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	serverDER, err := x509.CreateCertificate(rand.Reader, serverTemplate, ca, &serverKey.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("server certificate: %w", err)
	}
	if err := writePEM(certPath, "CERTIFICATE", serverDER, 0o644); err != nil {
		return err
	}
	return writeKey(keyPath, serverKey)
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("marshal %s: %w", filepath.Base(path), err)
	}
	return writePEM(path, "PRIVATE KEY", der, 0o600)
}

func writePEM(path, blockType string, der []byte, perm os.FileMode) error {
	data := pem.EncodeToMemory(&pem.Block{Type: blockType, Bytes: der})
	if err := os.WriteFile(path, data, perm); err != nil {
		return err
	}
	// WriteFile's mode is filtered by the umask; the modes here matter
	// (PostgreSQL refuses a key others can read), so set them exactly.
	return os.Chmod(path, perm)
}

func randomSerial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		// crypto/rand does not fail on supported platforms.
		panic(err)
	}
	return n
}
