package auth

import (
	"crypto/sha256"
	"crypto/subtle"
)

// VerifyPassword checks a cleartext password (a client's PasswordMessage
// after AuthenticationCleartextPassword) against the role's secret, as
// PostgreSQL's plain_crypt_verify does: against a SCRAM verifier by deriving
// the keys with the verifier's salt and iteration count, against an md5
// hash by hashing, against a plaintext secret directly. An empty password
// never matches, as PostgreSQL refuses it.
//
// The Keys returned hold the password, its md5 hash and, for a SCRAM
// verifier, ClientKey and ServerKey; so the proxy can log in to the server
// with whatever method the server asks for.
func VerifyPassword(stored Secret, user, password string) (*Keys, error) {
	if password == "" {
		return nil, PasswordFailed(user)
	}
	keys := &Keys{User: user, Password: password, MD5: MD5Hash(user, password)}
	switch {
	case stored.Kind == SCRAM && stored.SCRAM != nil:
		v := stored.SCRAM
		clientKey, serverKey, err := deriveKeys(password, v.Salt, v.Iterations)
		if err != nil {
			return nil, deriveFailed(err)
		}
		storedKey := sha256.Sum256(clientKey)
		if subtle.ConstantTimeCompare(storedKey[:], v.StoredKey[:]) != 1 {
			return nil, PasswordFailed(user)
		}
		keys.ClientKey, keys.ServerKey = clientKey, serverKey
		return keys, nil
	case stored.Kind == MD5:
		if subtle.ConstantTimeCompare([]byte(keys.MD5), []byte(stored.MD5)) != 1 {
			return nil, PasswordFailed(user)
		}
		return keys, nil
	case stored.Kind == Plain && stored.Plain != "":
		// Compare digests, so that the time taken does not depend on
		// where the strings differ or on how long the stored one is.
		got, want := sha256.Sum256([]byte(password)), sha256.Sum256([]byte(stored.Plain))
		if subtle.ConstantTimeCompare(got[:], want[:]) != 1 {
			return nil, PasswordFailed(user)
		}
		return keys, nil
	}
	return nil, PasswordFailed(user)
}
