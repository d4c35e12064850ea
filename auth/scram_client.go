package auth

import (
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"fmt"
	"strconv"
	"strings"
)

// maxClientIterations bounds the PBKDF2 work a server can ask of rolegate
// when it logs in with a cleartext password (with recovered keys there is
// no PBKDF2 at all). PostgreSQL's default is 4096.
const maxClientIterations = 10_000_000

// SCRAMClient logs in to the server as a client that proved itself to
// rolegate (protocol-notes.md, "SCRAM key pass-through"). The proof needs
// only ClientKey and StoredKey = H(ClientKey), neither of which depends on
// the nonces, so recovered keys work for any number of later logins; the
// server's signature is checked with ServerKey. Keys holding only a
// Password work too: the keys are then derived from the server's salt.
//
// The caller sends ClientFirst in a SASLInitialResponse for Mechanism(),
// passes AuthenticationSASLContinue's data to ClientFinal and
// sends the result in a SASLResponse, then passes AuthenticationSASLFinal's
// data to Verify, and only then trusts the AuthenticationOk that follows.
// A SCRAMClient serves one exchange and is not safe for concurrent use.
type SCRAMClient struct {
	clientKey []byte // nil until derived when logging in with a password
	serverKey []byte
	password  string
	// cbindData is the server certificate's tls-server-end-point when the
	// login is bound to the TLS connection (SCRAM-SHA-256-PLUS); nil if not.
	cbindData []byte

	state exchangeState
	// user goes into "n=". PostgreSQL ignores it and libpq sends it empty,
	// so it stays empty; RFC 7677's test vector sets it to "user".
	user            string
	clientNonce     string
	clientFirstBare string
	authMessage     []byte
}

// NewSCRAMClient prepares a login with keys: ClientKey and ServerKey (as
// recovered by SCRAMServer.Finish or VerifyPassword), or else Password.
func NewSCRAMClient(keys *Keys) (*SCRAMClient, error) {
	if keys == nil {
		return nil, invalidSecret("no keys for a SCRAM login")
	}
	c := &SCRAMClient{clientNonce: newNonce()}
	switch {
	case len(keys.ClientKey) == sha256.Size && len(keys.ServerKey) == sha256.Size:
		c.clientKey = append([]byte(nil), keys.ClientKey...)
		c.serverKey = append([]byte(nil), keys.ServerKey...)
	case keys.Password != "":
		c.password = keys.Password
	default:
		return nil, invalidSecret("SCRAM login needs a 32-byte ClientKey and ServerKey, or a password")
	}
	return c, nil
}

// WithChannelBinding binds the login to the TLS connection it runs on:
// data is the tls-server-end-point (TLSServerEndPoint) of the certificate
// the server presented, and the mechanism becomes SCRAM-SHA-256-PLUS. Use it
// only when the server offers that mechanism. Call it before ClientFirst;
// nil or empty data changes nothing. It returns c.
func (c *SCRAMClient) WithChannelBinding(data []byte) *SCRAMClient {
	if len(data) > 0 && c.state == stateStart {
		c.cbindData = append([]byte(nil), data...)
	}
	return c
}

// Mechanism is the SASL mechanism to select in the SASLInitialResponse:
// SCRAM-SHA-256-PLUS with channel binding, else SCRAM-SHA-256.
func (c *SCRAMClient) Mechanism() string {
	if c.cbindData != nil {
		return SCRAMSHA256Plus
	}
	return SCRAMSHA256
}

// gs2Header is "p=tls-server-end-point,," with channel binding, else "n,,":
// rolegate never sends "y" (could bind, but thinks the server cannot),
// since a server on TLS refuses it and a server without TLS gains nothing.
func (c *SCRAMClient) gs2Header() string {
	if c.cbindData != nil {
		return "p=" + cbindType + ",,"
	}
	return "n,,"
}

// ClientFirst returns the client-first-message: "n,,n=,r=<nonce>", or with
// "p=tls-server-end-point,," in front when binding. The username is empty:
// PostgreSQL takes the role from the startup packet, and libpq sends the same.
func (c *SCRAMClient) ClientFirst() []byte {
	c.clientFirstBare = "n=" + c.user + ",r=" + c.clientNonce
	if c.state == stateStart {
		c.state = stateFirstSent
	}
	return []byte(c.gs2Header() + c.clientFirstBare)
}

// ClientFinal takes the server-first-message and returns the
// client-final-message with the proof. The server's nonce must extend ours;
// the salt and iteration count must be present, and are used only when
// logging in with a password.
func (c *SCRAMClient) ClientFinal(serverFirst []byte) ([]byte, error) {
	if c.state != stateFirstSent {
		return nil, outOfOrder("SCRAM client has not sent client-first-message")
	}
	c.state = stateFailed
	msg := string(serverFirst)
	nonce, salt, iterations, err := c.readServerFirst(msg)
	if err != nil {
		return nil, err
	}
	if c.clientKey == nil {
		if iterations > maxClientIterations {
			return nil, serverMessage("Iteration count " + strconv.Itoa(iterations) + " is too high.")
		}
		c.clientKey, c.serverKey, err = deriveKeys(c.password, salt, iterations)
		if err != nil {
			return nil, deriveFailed(err)
		}
	}

	// c= is the gs2 header and the binding data: "biws" = base64("n,,").
	cbindInput := append([]byte(c.gs2Header()), c.cbindData...)
	withoutProof := "c=" + base64.StdEncoding.EncodeToString(cbindInput) + ",r=" + nonce
	c.authMessage = []byte(c.clientFirstBare + "," + msg + "," + withoutProof)
	storedKey := sha256.Sum256(c.clientKey)
	proof := make([]byte, sha256.Size)
	subtle.XORBytes(proof, c.clientKey, hmacSHA256(storedKey[:], c.authMessage))
	c.state = stateFinalSent
	return []byte(withoutProof + ",p=" + base64.StdEncoding.EncodeToString(proof)), nil
}

// readServerFirst parses
//
//	[ "m=" ... "," ] "r=" nonce "," "s=" base64(salt) "," "i=" iterations [ "," extensions ]
func (c *SCRAMClient) readServerFirst(msg string) (nonce string, salt []byte, iterations int, err error) {
	if err := checkMessage(msg); err != nil {
		return "", nil, 0, serverMessage(err.Error())
	}
	if strings.HasPrefix(msg, "m=") {
		return "", nil, 0, serverMessage("The server requires an unsupported SCRAM extension.")
	}
	parts := strings.Split(msg, ",")
	if len(parts) < 3 {
		return "", nil, 0, serverMessage("The server-first-message lacks a nonce, salt or iteration count.")
	}
	if nonce, err = attr(parts[0], 'r'); err != nil {
		return "", nil, 0, serverMessage(err.Error())
	}
	if !strings.HasPrefix(nonce, c.clientNonce) || len(nonce) == len(c.clientNonce) || !isPrintable(nonce) {
		return "", nil, 0, serverMessage("The server's nonce does not extend the client's.")
	}
	saltText, err := attr(parts[1], 's')
	if err != nil {
		return "", nil, 0, serverMessage(err.Error())
	}
	if salt, err = base64.StdEncoding.DecodeString(saltText); err != nil || len(salt) == 0 {
		return "", nil, 0, serverMessage("The salt is not base64.")
	}
	iterText, err := attr(parts[2], 'i')
	if err != nil {
		return "", nil, 0, serverMessage(err.Error())
	}
	if iterations, err = strconv.Atoi(iterText); err != nil || iterations < 1 {
		return "", nil, 0, serverMessage("The iteration count is not a positive integer.")
	}
	for _, ext := range parts[3:] {
		if _, _, err := anyAttr(ext); err != nil {
			return "", nil, 0, serverMessage(err.Error())
		}
	}
	return nonce, salt, iterations, nil
}

// Verify checks the server-final-message: its "v=" signature must be
// HMAC(ServerKey, AuthMessage), which only a server holding the role's
// verifier can compute. A server error ("e=...") or a wrong signature is an
// error; either way the login must not go on.
func (c *SCRAMClient) Verify(serverFinal []byte) error {
	if c.state != stateFinalSent {
		return outOfOrder("SCRAM client has not sent client-final-message")
	}
	c.state = stateFailed
	msg := string(serverFinal)
	if err := checkMessage(msg); err != nil {
		return serverMessage(err.Error())
	}
	first, _, _ := strings.Cut(msg, ",") // extensions after the signature are ignored
	if value, err := attr(first, 'e'); err == nil {
		detail := "The server reported an error."
		if isPrintable(value) && len(value) <= 64 {
			detail = "The server reported error \"" + value + "\"."
		}
		return serverMessage(detail)
	}
	value, err := attr(first, 'v')
	if err != nil {
		return serverMessage(err.Error())
	}
	signature, err := base64.StdEncoding.DecodeString(value)
	if err != nil {
		return serverMessage("The server signature is not base64.")
	}
	if !hmac.Equal(signature, hmacSHA256(c.serverKey, c.authMessage)) {
		return &Error{Code: CodeInvalidAuthorizationSpec, Message: "invalid SCRAM server signature", Err: ErrServerSignature}
	}
	c.state = stateDone
	return nil
}

// String describes the exchange without its keys.
func (c *SCRAMClient) String() string {
	return fmt.Sprintf("auth.SCRAMClient{WithPassword:%t ChannelBinding:%t}", c.password != "", c.cbindData != nil)
}

// Format makes every fmt verb print String, keeping the keys out.
func (c *SCRAMClient) Format(f fmt.State, verb rune) { _, _ = f.Write([]byte(c.String())) }
