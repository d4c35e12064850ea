package auth

import "errors"

// SQLSTATE codes this package reports, named as in PostgreSQL's errcodes.txt.
const (
	CodeProtocolViolation        = "08P01" // protocol_violation
	CodeInvalidAuthorizationSpec = "28000" // invalid_authorization_specification
	CodeInvalidPassword          = "28P01" // invalid_password
	CodeFeatureNotSupported      = "0A000" // feature_not_supported
	CodeInternalError            = "XX000" // internal_error
)

// Sentinels for errors.Is. Every error the exchanges, the Verify functions
// and ParseSecret return is an *Error that wraps one of them, so callers can
// branch on the kind of failure and still send the client the SQLSTATE and
// text that travel with it. (ParseUserlist's errors name a file line; they
// wrap an *Error only when a secret on that line is bad.)
var (
	// ErrPasswordMismatch: the client did not prove it knows the password,
	// or the role has no usable secret (the two look the same on purpose).
	ErrPasswordMismatch = errors.New("password mismatch")
	// ErrMalformed: a client's SCRAM message does not follow RFC 5802.
	ErrMalformed = errors.New("malformed SCRAM message")
	// ErrChannelBinding: the client's channel binding does not fit the
	// connection: SCRAM-SHA-256-PLUS without TLS, a gs2 flag that does not
	// match the mechanism, "y" where -PLUS was offered (a downgrade), or
	// binding data of another certificate than rolegate's.
	ErrChannelBinding = errors.New("channel binding failed")
	// ErrUnsupported: a valid SCRAM feature rolegate does not implement, such
	// as a mandatory extension or another role as authorization identity.
	ErrUnsupported = errors.New("unsupported SCRAM feature")
	// ErrServerMessage: the server's side of an exchange rolegate runs as a
	// client is malformed or reports an error.
	ErrServerMessage = errors.New("invalid SCRAM message from server")
	// ErrServerSignature: the server could not prove it knows the role's
	// ServerKey: it is not the server the keys came from, or the role's
	// password changed since the client proved it.
	ErrServerSignature = errors.New("invalid SCRAM server signature")
	// ErrInvalidSecret: a stored secret could not be parsed, or keys are
	// missing for what was asked of them.
	ErrInvalidSecret = errors.New("invalid secret")
	// ErrState: an exchange's methods were called out of order or after it
	// had failed; a bug in the caller, not in the client.
	ErrState = errors.New("SCRAM exchange out of order")
)

// Error is a failure with the SQLSTATE and text PostgreSQL would send for it.
// Message and Detail never contain a password, hash, proof, key or verifier,
// nor unsanitized bytes from the client, so the proxy can send and log them
// as they are.
type Error struct {
	Code    string // SQLSTATE
	Message string // primary message, PostgreSQL's wording where one exists
	Detail  string // optional; PostgreSQL's errdetail
	Err     error  // one of the sentinels above
}

// Error returns the message with its detail, for logs.
func (e *Error) Error() string {
	if e.Detail == "" {
		return e.Message
	}
	return e.Message + ": " + e.Detail
}

// Unwrap returns the sentinel, for errors.Is.
func (e *Error) Unwrap() error { return e.Err }

// SQLState returns Code; the same method pgconn.PgError has, so callers can
// read a SQLSTATE from either without caring which it is.
func (e *Error) SQLState() string { return e.Code }

// PasswordFailed is PostgreSQL's answer to every failed password, md5 or
// SCRAM login, also for roles that do not exist: `password authentication
// failed for user "x"` (28P01). The proxy can use it for failures it finds
// itself (no secret for the role) so they look the same to the client.
func PasswordFailed(user string) *Error {
	return &Error{
		Code:    CodeInvalidPassword,
		Message: `password authentication failed for user "` + user + `"`,
		Err:     ErrPasswordMismatch,
	}
}

// malformed is PostgreSQL's error for a client SCRAM message that breaks the
// syntax; detail says where, without echoing the client's bytes.
func malformed(detail string) *Error {
	return &Error{Code: CodeProtocolViolation, Message: "malformed SCRAM message", Detail: detail, Err: ErrMalformed}
}

// protocolViolation is a 08P01 error with PostgreSQL's wording for the few
// SCRAM violations it does not call "malformed".
func protocolViolation(message, detail string) *Error {
	return &Error{Code: CodeProtocolViolation, Message: message, Detail: detail, Err: ErrMalformed}
}

// cbindMalformed is PostgreSQL's "malformed SCRAM message" for a gs2 flag
// that does not match the mechanism the client selected.
func cbindMalformed(detail string) *Error {
	e := malformed(detail)
	e.Err = ErrChannelBinding
	return e
}

func unsupported(message string) *Error {
	return &Error{Code: CodeFeatureNotSupported, Message: message, Err: ErrUnsupported}
}

func serverMessage(detail string) *Error {
	return &Error{Code: CodeProtocolViolation, Message: "invalid SCRAM message from server", Detail: detail, Err: ErrServerMessage}
}

func invalidSecret(message string) *Error {
	return &Error{Code: CodeInternalError, Message: message, Err: ErrInvalidSecret}
}

// deriveFailed reports crypto/pbkdf2 refusing a salt, which happens only in
// GODEBUG=fips140=only mode; its text quotes no input.
func deriveFailed(err error) *Error {
	return invalidSecret("could not derive SCRAM keys: " + err.Error())
}

func outOfOrder(message string) *Error {
	return &Error{Code: CodeInternalError, Message: message, Err: ErrState}
}
