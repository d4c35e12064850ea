package auth

import (
	"crypto/md5"
	"crypto/subtle"
	"encoding/hex"
)

// MD5Hash is what PostgreSQL stores for an md5 password:
// "md5" + hex(md5(password + user)). It is password-equivalent for md5
// logins, which is why rolegate can log in with it.
func MD5Hash(user, password string) string {
	sum := md5.Sum([]byte(password + user))
	return "md5" + hex.EncodeToString(sum[:])
}

// MD5Response is what a client sends in its PasswordMessage for md5
// authentication with this salt: "md5" + hex(md5(hex-part-of-hash + salt)).
// md5hash is MD5Hash's output.
func MD5Response(md5hash string, salt [4]byte) string {
	hexPart := md5hash
	if len(hexPart) >= 3 && hexPart[:3] == "md5" {
		hexPart = hexPart[3:]
	}
	sum := md5.Sum(append([]byte(hexPart), salt[:]...))
	return "md5" + hex.EncodeToString(sum[:])
}

// VerifyMD5 checks a client's md5 response against the role's secret: an md5
// hash, or a plaintext password (hashed first). Any other secret cannot
// serve md5 and fails like a wrong password, as in PostgreSQL (which
// switches to SCRAM for roles with a SCRAM secret; so should the proxy).
// The comparison is constant-time and runs even when it is bound to fail,
// so that timing does not tell whether the role exists.
func VerifyMD5(stored Secret, user string, salt [4]byte, response string) (*Keys, error) {
	var hash, password string
	switch {
	case stored.Kind == MD5 && isMD5Hash(stored.MD5):
		hash = stored.MD5
	case stored.Kind == Plain && stored.Plain != "":
		hash, password = MD5Hash(user, stored.Plain), stored.Plain
	}
	expected := MD5Response(hash, salt)
	if subtle.ConstantTimeCompare([]byte(expected), []byte(response)) != 1 || hash == "" {
		return nil, PasswordFailed(user)
	}
	return &Keys{User: user, MD5: hash, Password: password}, nil
}
