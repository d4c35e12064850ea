package auth

import (
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
)

// Kind says what a Secret holds.
type Kind int

const (
	// NoSecret is the zero Kind: the role has no password rolegate can use.
	// Every login against it fails as a wrong password would.
	NoSecret Kind = iota
	// Plain is a cleartext password, as PgBouncer auth_files may hold.
	Plain
	// MD5 is PostgreSQL's "md5" + hex(md5(password + user)).
	MD5
	// SCRAM is a SCRAM-SHA-256 verifier.
	SCRAM
)

// String names the kind as PostgreSQL's password_encryption does.
func (k Kind) String() string {
	switch k {
	case NoSecret:
		return "none"
	case Plain:
		return "plain"
	case MD5:
		return "md5"
	case SCRAM:
		return SCRAMSHA256
	}
	return "Kind(" + strconv.Itoa(int(k)) + ")"
}

// Secret is a role's stored secret, as in pg_authid.rolpassword or a PgBouncer
// auth_file. Printing it (fmt, slog) shows only its Kind.
type Secret struct {
	Kind  Kind           // SCRAM, MD5, Plain, or NoSecret
	SCRAM *SCRAMVerifier // when Kind == SCRAM
	MD5   string         // "md5" + 32 hex, when Kind == MD5
	Plain string         // when Kind == Plain (userlist files may hold plaintext)
}

// scramPrefix starts every SCRAM-SHA-256 secret PostgreSQL stores.
const scramPrefix = SCRAMSHA256 + "$"

// ParseSecret classifies a stored secret as PostgreSQL's get_password_type
// does: "SCRAM-SHA-256$iter:salt$StoredKey:ServerKey" is a verifier, "md5"
// followed by exactly 32 lowercase hex digits is an md5 hash, and anything
// else is a cleartext password. Unlike PostgreSQL, which quietly takes a
// broken verifier for a cleartext password, a string that starts like a
// verifier but does not parse is an error: it is far more likely a damaged
// verifier than someone's password. Errors never include the secret.
func ParseSecret(s string) (Secret, error) {
	switch {
	case strings.HasPrefix(s, scramPrefix):
		v, err := ParseSCRAMVerifier(s)
		if err != nil {
			return Secret{}, err
		}
		return Secret{Kind: SCRAM, SCRAM: v}, nil
	case isMD5Hash(s):
		return Secret{Kind: MD5, MD5: s}, nil
	}
	return Secret{Kind: Plain, Plain: s}, nil
}

// isMD5Hash matches PostgreSQL's test: "md5", then 32 lowercase hex digits.
func isMD5Hash(s string) bool {
	if len(s) != 35 || !strings.HasPrefix(s, "md5") {
		return false
	}
	for _, c := range []byte(s[3:]) {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// String shows the kind only, never the secret.
func (s Secret) String() string { return "auth.Secret{Kind:" + s.Kind.String() + "}" }

// GoString is String, so %#v cannot print the secret either.
func (s Secret) GoString() string { return s.String() }

// Format makes every fmt verb print String: without it, %v of a struct that
// holds a Secret would print the password.
func (s Secret) Format(f fmt.State, verb rune) { _, _ = f.Write([]byte(s.String())) }

// LogValue logs the kind only.
func (s Secret) LogValue() slog.Value {
	return slog.GroupValue(slog.String("kind", s.Kind.String()))
}

// SCRAMVerifier is a role's SCRAM-SHA-256 verifier: what the server stores
// instead of the password (RFC 5802 section 3). StoredKey lets rolegate check
// a client's proof; ServerKey lets it sign the exchange as the server would.
// Both are secret: with them and a recorded exchange, the client key can be
// recovered. Treat a verifier like a password hash.
type SCRAMVerifier struct {
	Iterations int
	Salt       []byte
	StoredKey  [sha256.Size]byte
	ServerKey  [sha256.Size]byte
}

// ParseSCRAMVerifier parses PostgreSQL's text form,
// "SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>", with salt and
// keys in base64. Errors name the part that is wrong, never its value.
func ParseSCRAMVerifier(s string) (*SCRAMVerifier, error) {
	rest, ok := strings.CutPrefix(s, scramPrefix)
	if !ok {
		return nil, invalidSecret("invalid SCRAM secret: it does not start with " + scramPrefix)
	}
	iterSalt, keys, ok := strings.Cut(rest, "$")
	if !ok {
		return nil, invalidSecret("invalid SCRAM secret: missing \"$\" before the keys")
	}
	iterText, saltText, ok := strings.Cut(iterSalt, ":")
	if !ok {
		return nil, invalidSecret("invalid SCRAM secret: missing \":\" between iteration count and salt")
	}
	storedText, serverText, ok := strings.Cut(keys, ":")
	if !ok {
		return nil, invalidSecret("invalid SCRAM secret: missing \":\" between StoredKey and ServerKey")
	}
	// Not wrapping strconv's error: it would quote the input.
	iterations, err := strconv.Atoi(iterText)
	if err != nil || iterations < 1 {
		return nil, invalidSecret("invalid SCRAM secret: iteration count is not a positive integer")
	}
	salt, err := base64.StdEncoding.DecodeString(saltText)
	if err != nil || len(salt) == 0 {
		return nil, invalidSecret("invalid SCRAM secret: salt is not base64")
	}
	v := &SCRAMVerifier{Iterations: iterations, Salt: salt}
	if !decodeKey(v.StoredKey[:], storedText) {
		return nil, invalidSecret("invalid SCRAM secret: StoredKey is not 32 bytes of base64")
	}
	if !decodeKey(v.ServerKey[:], serverText) {
		return nil, invalidSecret("invalid SCRAM secret: ServerKey is not 32 bytes of base64")
	}
	return v, nil
}

// decodeKey decodes base64 text into dst, which it must fill exactly.
func decodeKey(dst []byte, text string) bool {
	b, err := base64.StdEncoding.DecodeString(text)
	if err != nil || len(b) != len(dst) {
		return false
	}
	copy(dst, b)
	return true
}

// NewSCRAMVerifier derives the verifier PostgreSQL would store for password
// with this salt and iteration count. The password is SASLprep'd as
// PostgreSQL does; if that fails (not UTF-8, prohibited characters) the raw
// bytes are used, again as PostgreSQL does.
//
// It panics if iterations < 1 or salt is empty (a caller's bug), and in
// GODEBUG=fips140=only mode when crypto/pbkdf2 refuses a salt shorter than
// 16 bytes; PostgreSQL's salts are 16 bytes.
func NewSCRAMVerifier(password string, salt []byte, iterations int) *SCRAMVerifier {
	if iterations < 1 || len(salt) == 0 {
		panic("auth: NewSCRAMVerifier needs a salt and at least one iteration")
	}
	clientKey, serverKey, err := deriveKeys(password, salt, iterations)
	if err != nil {
		panic("auth: " + err.Error())
	}
	return &SCRAMVerifier{
		Iterations: iterations,
		Salt:       append([]byte(nil), salt...),
		StoredKey:  sha256.Sum256(clientKey),
		ServerKey:  [sha256.Size]byte(serverKey),
	}
}

// deriveKeys computes RFC 5802's ClientKey and ServerKey from a password.
func deriveKeys(password string, salt []byte, iterations int) (clientKey, serverKey []byte, err error) {
	if prepped, ok := saslprep(password); ok {
		password = prepped
	}
	salted, err := pbkdf2.Key(sha256.New, password, salt, iterations, sha256.Size)
	if err != nil {
		return nil, nil, err
	}
	return hmacSHA256(salted, []byte("Client Key")), hmacSHA256(salted, []byte("Server Key")), nil
}

// String returns PostgreSQL's text form, the one ParseSCRAMVerifier reads.
// It is secret material: log the verifier with slog (LogValue), not this.
func (v *SCRAMVerifier) String() string {
	return fmt.Sprintf("%s$%d:%s$%s:%s", SCRAMSHA256, v.Iterations,
		base64.StdEncoding.EncodeToString(v.Salt),
		base64.StdEncoding.EncodeToString(v.StoredKey[:]),
		base64.StdEncoding.EncodeToString(v.ServerKey[:]))
}

// LogValue keeps the keys out of logs; the iteration count is harmless and
// useful when comparing with the server's scram_iterations.
func (v *SCRAMVerifier) LogValue() slog.Value {
	return slog.GroupValue(slog.String("kind", SCRAMSHA256), slog.Int("iterations", v.Iterations))
}

func hmacSHA256(key []byte, msg ...[]byte) []byte {
	mac := hmac.New(sha256.New, key)
	for _, m := range msg {
		mac.Write(m)
	}
	return mac.Sum(nil)
}
