package auth

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"errors"
	"math/big"
	"slices"
	"strings"
	"testing"
	"time"
)

// selfSigned makes a certificate signed with alg by key.
func selfSigned(t *testing.T, key crypto.Signer, alg x509.SignatureAlgorithm) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber:       big.NewInt(1),
		Subject:            pkix.Name{CommonName: "cbind test"},
		NotBefore:          time.Now().Add(-time.Hour),
		NotAfter:           time.Now().Add(time.Hour),
		SignatureAlgorithm: alg,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatalf("create %v certificate: %v", alg, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	if cert.SignatureAlgorithm != alg {
		t.Fatalf("certificate signed with %v, want %v", cert.SignatureAlgorithm, alg)
	}
	return cert
}

// TestTLSServerEndPoint checks RFC 5929's choice of hash: the signature's
// own, except SHA-256 in place of MD5 and SHA-1.
func TestTLSServerEndPoint(t *testing.T) {
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	sha384 := func(b []byte) []byte { h := sha512.Sum384(b); return h[:] }
	sha512sum := func(b []byte) []byte { h := sha512.Sum512(b); return h[:] }
	sha256sum := func(b []byte) []byte { h := sha256.Sum256(b); return h[:] }
	tests := []struct {
		name string
		key  crypto.Signer
		alg  x509.SignatureAlgorithm
		hash func([]byte) []byte
	}{
		{"RSA with SHA-1 uses SHA-256", rsaKey, x509.SHA1WithRSA, sha256sum},
		{"ECDSA with SHA-1 uses SHA-256", p256, x509.ECDSAWithSHA1, sha256sum},
		{"RSA with SHA-256", rsaKey, x509.SHA256WithRSA, sha256sum},
		{"ECDSA with SHA-256", p256, x509.ECDSAWithSHA256, sha256sum},
		{"ECDSA with SHA-384", p384, x509.ECDSAWithSHA384, sha384},
		{"RSA-PSS with SHA-384", rsaKey, x509.SHA384WithRSAPSS, sha384},
		{"RSA with SHA-512", rsaKey, x509.SHA512WithRSA, sha512sum},
		{"ECDSA with SHA-512", p384, x509.ECDSAWithSHA512, sha512sum},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cert := selfSigned(t, tt.key, tt.alg)
			got, err := TLSServerEndPoint(cert)
			if err != nil {
				t.Fatal(err)
			}
			if want := tt.hash(cert.Raw); !bytes.Equal(got, want) {
				t.Errorf("end point %x (%d bytes), want %x (%d bytes)", got, len(got), want, len(want))
			}
		})
	}
	t.Run("Ed25519 has no end point", func(t *testing.T) {
		_, key, _ := ed25519.GenerateKey(rand.Reader)
		if got, err := TLSServerEndPoint(selfSigned(t, key, x509.PureEd25519)); err == nil {
			t.Errorf("end point %x, want an error", got)
		}
	})
	if _, err := TLSServerEndPoint(nil); err == nil {
		t.Error("nil certificate: no error")
	}
}

// TestSCRAMChannelBinding runs SCRAM-SHA-256-PLUS between rolegate's two
// sides, and every way a client's binding can disagree with the connection,
// with PostgreSQL's errors.
func TestSCRAMChannelBinding(t *testing.T) {
	v := NewSCRAMVerifier("pw", []byte("0123456789abcdef"), 4096)
	endPoint := bytes.Repeat([]byte{0xab}, 32)
	bound := func() *SCRAMServer { return NewSCRAMServer("u", v).WithChannelBinding(endPoint) }

	if got := NewSCRAMServer("u", v).Mechanisms(); !slices.Equal(got, []string{SCRAMSHA256}) {
		t.Errorf("mechanisms without TLS %q", got)
	}
	if got := bound().Mechanisms(); !slices.Equal(got, []string{SCRAMSHA256Plus, SCRAMSHA256}) {
		t.Errorf("mechanisms with TLS %q, want -PLUS first as PostgreSQL", got)
	}

	t.Run("bound exchange recovers the keys", func(t *testing.T) {
		c := passwordClient(t, "pw").WithChannelBinding(endPoint)
		if c.Mechanism() != SCRAMSHA256Plus {
			t.Fatalf("client mechanism %s", c.Mechanism())
		}
		if first := string(c.ClientFirst()); !strings.HasPrefix(first, "p=tls-server-end-point,,n=,r=") {
			t.Fatalf("client-first %q", first)
		}
		s := bound()
		keys, err := exchange(t, c, s)
		if err != nil {
			t.Fatal(err)
		}
		want, _ := VerifyPassword(Secret{Kind: SCRAM, SCRAM: v}, "u", "pw")
		if !bytes.Equal(keys.ClientKey, want.ClientKey) {
			t.Error("the bound exchange recovered another ClientKey")
		}
		// The recovered keys log in again, bound to another connection.
		if _, err := exchange(t, mustClient(t, keys).WithChannelBinding([]byte("other")),
			NewSCRAMServer("u", v).WithChannelBinding([]byte("other"))); err != nil {
			t.Fatalf("second bound login with the recovered keys: %v", err)
		}
	})
	t.Run("a client bound to another certificate", func(t *testing.T) {
		c := passwordClient(t, "pw").WithChannelBinding(bytes.Repeat([]byte{0xcd}, 32))
		_, err := exchange(t, c, bound())
		wantError(t, err, ErrChannelBinding, "28000", "SCRAM channel binding check failed", "")
	})
	t.Run("the binding data replaced in c=", func(t *testing.T) {
		c := passwordClient(t, "pw").WithChannelBinding(endPoint)
		s := bound()
		serverFirst, err := s.Start(SCRAMSHA256Plus, c.ClientFirst())
		if err != nil {
			t.Fatal(err)
		}
		final, _ := c.ClientFinal(serverFirst)
		noData := "c=" + base64.StdEncoding.EncodeToString([]byte("p=tls-server-end-point,,"))
		_, _, err = s.Finish([]byte(noData + string(final[strings.IndexByte(string(final), ','):])))
		wantError(t, err, ErrChannelBinding, "28000", "SCRAM channel binding check failed", "")
	})

	const header = "n=,r=abcdefghijkl"
	starts := []struct {
		name, mechanism, first string
		plain                  bool // the connection has no TLS
		code, message, detail  string
	}{
		{"y where -PLUS was offered", SCRAMSHA256, "y,," + header, false, "28000",
			"SCRAM channel binding negotiation error",
			"The client supports SCRAM channel binding but thinks the server does not.  However, this server does support channel binding."},
		{"-PLUS without binding data (n)", SCRAMSHA256Plus, "n,," + header, false, "08P01", "malformed SCRAM message",
			"The client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not include channel binding data."},
		{"-PLUS without binding data (y)", SCRAMSHA256Plus, "y,," + header, false, "08P01", "malformed SCRAM message",
			"The client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not include channel binding data."},
		{"p with SCRAM-SHA-256", SCRAMSHA256, "p=tls-server-end-point,," + header, false, "08P01", "malformed SCRAM message",
			"The client selected SCRAM-SHA-256 without channel binding, but the SCRAM message includes channel binding data."},
		{"another binding type", SCRAMSHA256Plus, "p=tls-unique,," + header, false, "08P01",
			`unsupported SCRAM channel-binding type "tls-unique"`, ""},
		{"a binding type that is not printable", SCRAMSHA256Plus, "p=tls\x01\"x,," + header, false, "08P01",
			`unsupported SCRAM channel-binding type "tls?"x"`, ""},
		{"-PLUS without TLS", SCRAMSHA256Plus, "p=tls-server-end-point,," + header, true, "08P01",
			"client selected an invalid SASL authentication mechanism", ""},
		{"p without TLS", SCRAMSHA256, "p=tls-server-end-point,," + header, true, "08P01", "malformed SCRAM message",
			"The client selected SCRAM-SHA-256 without channel binding, but the SCRAM message includes channel binding data."},
	}
	for _, tt := range starts {
		t.Run(tt.name, func(t *testing.T) {
			s := bound()
			if tt.plain {
				s = NewSCRAMServer("u", v)
			}
			_, err := s.Start(tt.mechanism, []byte(tt.first))
			wantError(t, err, ErrChannelBinding, tt.code, tt.message, tt.detail)
		})
	}

	// Over TLS, a client that does not support binding ("n") still logs in,
	// as with PostgreSQL.
	if _, err := exchange(t, passwordClient(t, "pw"), bound()); err != nil {
		t.Errorf("n,, over TLS: %v", err)
	}
}

func mustClient(t *testing.T, keys *Keys) *SCRAMClient {
	t.Helper()
	c, err := NewSCRAMClient(keys)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// wantError checks an *Error's sentinel, SQLSTATE, message and detail.
func wantError(t *testing.T, err error, sentinel error, code, message, detail string) {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v, want an *Error", err)
	}
	if !errors.Is(err, sentinel) || e.Code != code || e.Message != message || e.Detail != detail {
		t.Errorf("error %s %q (detail %q, %v), want %s %q (detail %q, %v)", e.Code, e.Message, e.Detail, e.Err, code, message, detail, sentinel)
	}
}
