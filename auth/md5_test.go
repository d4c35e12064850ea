package auth

import (
	"crypto/md5"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
)

func TestMD5KnownAnswer(t *testing.T) {
	const user, password = "md5_user", "md5 secret"
	salt := [4]byte{1, 2, 3, 4}

	// By hand, from PostgreSQL's definition.
	inner := md5.Sum([]byte(password + user))
	innerHex := hex.EncodeToString(inner[:])
	outer := md5.Sum(append([]byte(innerHex), salt[:]...))
	wantHash, wantResponse := "md5"+innerHex, "md5"+hex.EncodeToString(outer[:])

	// And as literals (Python's hashlib), so that both are pinned.
	if wantHash != "md5506f157135f7be153e624181cbbb4e6b" || wantResponse != "md585f04db58e12aed4f50c9900a89a84c7" {
		t.Fatalf("test's own md5: %s %s", wantHash, wantResponse)
	}
	if got := MD5Hash(user, password); got != wantHash {
		t.Fatalf("MD5Hash = %s, want %s", got, wantHash)
	}
	if got := MD5Response(wantHash, salt); got != wantResponse {
		t.Fatalf("MD5Response = %s, want %s", got, wantResponse)
	}
}

func TestVerifyMD5(t *testing.T) {
	const user, password = "md5_user", "md5 secret"
	salt := [4]byte{0xde, 0xad, 0xbe, 0xef}
	hash := MD5Hash(user, password)
	response := MD5Response(hash, salt)

	keys, err := VerifyMD5(Secret{Kind: MD5, MD5: hash}, user, salt, response)
	if err != nil {
		t.Fatalf("md5 secret: %v", err)
	}
	if keys.User != user || keys.MD5 != hash || keys.Password != "" {
		t.Fatalf("keys from an md5 secret: %v", keys)
	}
	keys, err = VerifyMD5(Secret{Kind: Plain, Plain: password}, user, salt, response)
	if err != nil {
		t.Fatalf("plain secret: %v", err)
	}
	if keys.MD5 != hash || keys.Password != password {
		t.Fatalf("keys from a plain secret lack the hash or password: %v", keys)
	}

	for name, tc := range map[string]struct {
		secret   Secret
		salt     [4]byte
		response string
	}{
		"other salt":         {Secret{Kind: MD5, MD5: hash}, [4]byte{1, 2, 3, 4}, response},
		"uppercase response": {Secret{Kind: MD5, MD5: hash}, salt, "md5" + strings.ToUpper(response[3:])},
		"hash, not response": {Secret{Kind: MD5, MD5: hash}, salt, hash},
		"empty response":     {Secret{Kind: MD5, MD5: hash}, salt, ""},
		"wrong password":     {Secret{Kind: Plain, Plain: "other"}, salt, response},
		"empty plain":        {Secret{Kind: Plain}, salt, MD5Response(MD5Hash(user, ""), salt)},
		"no secret":          {Secret{}, salt, response},
		"broken md5 secret":  {Secret{Kind: MD5, MD5: "md5"}, salt, MD5Response("md5", salt)},
		"SCRAM secret":       {Secret{Kind: SCRAM, SCRAM: rfcVerifier(t)}, salt, response},
	} {
		if _, err := VerifyMD5(tc.secret, user, tc.salt, tc.response); !errors.Is(err, ErrPasswordMismatch) {
			t.Errorf("%s: %v, want ErrPasswordMismatch", name, err)
		}
	}
}
