// Package auth authenticates PostgreSQL clients with the roles' own stored
// secrets and keeps what they proved, so that rolegate can log in to the
// server as them later, without them.
//
// For SCRAM-SHA-256, SCRAMServer verifies a client against the role's
// verifier and recovers its ClientKey from the proof
// (ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage), accepted iff
// H(ClientKey) == StoredKey); SCRAMClient then logs in to the server with
// that key, on as many connections as needed. md5 and cleartext passwords
// work the same way through VerifyMD5 and VerifyPassword. Secrets come from
// pg_authid.rolpassword (ParseSecret) or a PgBouncer auth_file
// (ParseUserlist).
//
// The package is pure logic: messages in, messages out, no network I/O and
// no logging; the proxy carries the messages over its own connections.
// Failures are *Error values carrying the SQLSTATE and text PostgreSQL
// would send; none of them, and no fmt or slog rendering of Keys or
// Secret, ever contains a password, hash, proof or key.
package auth
