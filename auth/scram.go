package auth

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"strings"
	"sync"
)

// SCRAMSHA256 is the SASL mechanism name of SCRAM-SHA-256 (RFC 7677).
const SCRAMSHA256 = "SCRAM-SHA-256"

const (
	// nonceBytes is PostgreSQL's SCRAM_RAW_NONCE_LEN: 18 random bytes are
	// 24 base64 characters, with no padding.
	nonceBytes = 18
	// mockIterations and mockSaltBytes are PostgreSQL's defaults, so that a
	// mock exchange looks like one for a role created with default settings.
	mockIterations = 4096
	mockSaltBytes  = 16
)

// newNonce returns a fresh nonce: random bytes in base64, which never
// contains the ',' that separates SCRAM attributes.
func newNonce() string {
	b := make([]byte, nonceBytes)
	_, _ = rand.Read(b) // never fails; crashes the program if the OS has no randomness
	return base64.StdEncoding.EncodeToString(b)
}

// mockSecret is the per-process secret behind mock salts. A package variable
// because it is process state, like PostgreSQL's mock_auth_nonce in
// pg_control; it is not a dependency anyone needs to replace.
var mockSecret = sync.OnceValue(func() []byte {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return b
})

// mockSalt is the salt of a mock exchange, as PostgreSQL's scram_mock_salt
// makes it: stable for a user during the life of the process, so that
// repeated attempts see the same salt as they would for a real role, and
// unpredictable without the process secret.
func mockSalt(user string) []byte {
	h := sha256.New()
	h.Write([]byte(user))
	h.Write(mockSecret())
	return h.Sum(nil)[:mockSaltBytes]
}

// syntaxError is a SCRAM parse failure; its text is a detail in
// PostgreSQL's wording, safe to send because it never quotes the message
// beyond one sanitized character. Callers wrap it in malformed (client
// messages) or serverMessage (server messages).
type syntaxError string

func (e syntaxError) Error() string { return string(e) }

// attr reads one "x=value" attribute whose name must be want.
func attr(part string, want byte) (string, error) {
	if part == "" || part[0] != want {
		return "", syntaxError(fmt.Sprintf("Expected attribute %q but found %s.", want, charAt(part, 0)))
	}
	if len(part) < 2 || part[1] != '=' {
		return "", syntaxError(fmt.Sprintf("Expected character \"=\" for attribute %q.", want))
	}
	return part[2:], nil
}

// anyAttr reads one attribute of any name (RFC 5802's attr-val: ALPHA "="
// value), for extensions, which are skipped.
func anyAttr(part string) (byte, string, error) {
	if part == "" {
		return 0, "", syntaxError("Attribute expected, but found end of string.")
	}
	name := part[0]
	if !('a' <= name && name <= 'z' || 'A' <= name && name <= 'Z') {
		return 0, "", syntaxError(fmt.Sprintf("Attribute expected, but found invalid character %s.", charAt(part, 0)))
	}
	if len(part) < 2 || part[1] != '=' {
		return 0, "", syntaxError(fmt.Sprintf("Expected character \"=\" for attribute %q.", name))
	}
	return name, part[2:], nil
}

// charAt describes s[i] for an error message as PostgreSQL's sanitize_char
// does: printable ASCII quoted, anything else in hex, so that a client
// cannot put arbitrary bytes into rolegate's messages and logs.
func charAt(s string, i int) string {
	if i >= len(s) {
		return "end of string"
	}
	if c := s[i]; 0x21 <= c && c <= 0x7e {
		return fmt.Sprintf("%q", c)
	}
	return fmt.Sprintf("0x%02x", s[i])
}

// sanitizeStr describes a client's string for an error message as
// PostgreSQL's sanitize_str does: printable ASCII kept, anything else '?',
// at most 30 characters.
func sanitizeStr(s string) string {
	b := []byte(s[:min(len(s), 30)])
	for i, c := range b {
		if c < 0x21 || c > 0x7e {
			b[i] = '?'
		}
	}
	return string(b)
}

// isPrintable reports whether s is RFC 5802's printable: ASCII 0x21-0x7e
// except ','. Nonces must be.
func isPrintable(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x21 || c > 0x7e || c == ',' {
			return false
		}
	}
	return true
}

// checkMessage applies PostgreSQL's two checks on any SCRAM input: not
// empty, and no NUL (the server reads it as a C string, so a NUL would cut
// the message short: "length mismatch").
func checkMessage(msg string) error {
	if msg == "" {
		return syntaxError("The message is empty.")
	}
	if strings.IndexByte(msg, 0) >= 0 {
		return syntaxError("Message length does not match input length.")
	}
	return nil
}

// decodeSASLName undoes RFC 5802's saslname escaping ("=2C" for ',',
// "=3D" for '='); ok is false for any other use of '='.
func decodeSASLName(s string) (string, bool) {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '=' {
			b.WriteByte(s[i])
			continue
		}
		switch {
		case strings.HasPrefix(s[i:], "=2C"):
			b.WriteByte(',')
		case strings.HasPrefix(s[i:], "=3D"):
			b.WriteByte('=')
		default:
			return "", false
		}
		i += 2
	}
	return b.String(), true
}
