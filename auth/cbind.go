package auth

import (
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"fmt"
	"hash"
)

// SCRAMSHA256Plus is the channel-binding variant of SCRAM-SHA-256: the
// exchange is bound to the TLS connection it runs on by the
// tls-server-end-point of the server's certificate (RFC 5929), the only
// binding type PostgreSQL supports.
const SCRAMSHA256Plus = "SCRAM-SHA-256-PLUS"

// cbindType is the channel binding type in a "p=" gs2 header.
const cbindType = "tls-server-end-point"

// TLSServerEndPoint returns the tls-server-end-point channel binding data of
// a server certificate (RFC 5929, section 4.1): the hash of its DER encoding,
// with the hash function of the certificate's signature algorithm, except
// that MD5 and SHA-1 are replaced by SHA-256. It fails for signature
// algorithms without a hash of their own (Ed25519), for which the binding is
// undefined; PostgreSQL does not offer SCRAM-SHA-256-PLUS with such a
// certificate either, and neither should a caller.
func TLSServerEndPoint(cert *x509.Certificate) ([]byte, error) {
	if cert == nil {
		return nil, fmt.Errorf("tls-server-end-point: no certificate")
	}
	var h hash.Hash
	switch cert.SignatureAlgorithm {
	case x509.MD5WithRSA, x509.SHA1WithRSA, x509.DSAWithSHA1, x509.ECDSAWithSHA1,
		x509.SHA256WithRSA, x509.SHA256WithRSAPSS, x509.ECDSAWithSHA256, x509.DSAWithSHA256:
		h = sha256.New()
	case x509.SHA384WithRSA, x509.SHA384WithRSAPSS, x509.ECDSAWithSHA384:
		h = sha512.New384()
	case x509.SHA512WithRSA, x509.SHA512WithRSAPSS, x509.ECDSAWithSHA512:
		h = sha512.New()
	default:
		return nil, fmt.Errorf("tls-server-end-point is undefined for certificate signature algorithm %v", cert.SignatureAlgorithm)
	}
	h.Write(cert.Raw)
	return h.Sum(nil), nil
}
