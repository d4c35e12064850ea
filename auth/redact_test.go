package auth

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"log/slog"
	"strings"
	"testing"
)

// TestNothingSecretIsPrinted renders keys, secrets, exchanges and every
// error of a failed login every way a caller might log them, and looks for
// any form of the secrets in the output.
func TestNothingSecretIsPrinted(t *testing.T) {
	const user, password = "alice", "hunter2-correct-horse"
	v := NewSCRAMVerifier(password, []byte("0123456789abcdef"), 4096)

	c := passwordClient(t, password)
	s := NewSCRAMServer(user, v)
	serverFirst, _ := s.Start(SCRAMSHA256, c.ClientFirst())
	clientFinal, _ := c.ClientFinal(serverFirst)
	_, keys, err := s.Finish(clientFinal)
	if err != nil {
		t.Fatal(err)
	}
	pwKeys, err := VerifyPassword(Secret{Kind: SCRAM, SCRAM: v}, user, password)
	if err != nil {
		t.Fatal(err)
	}
	_, proof, _ := strings.Cut(string(clientFinal), ",p=")

	secrets := []string{
		password,
		v.String(),
		proof,
		MD5Hash(user, password),
		MD5Hash(user, password)[3:],
	}
	for _, key := range [][]byte{keys.ClientKey, keys.ServerKey, v.StoredKey[:], v.ServerKey[:]} {
		secrets = append(secrets, string(key), base64.StdEncoding.EncodeToString(key),
			hex.EncodeToString(key), fmt.Sprint([]byte(key)), fmt.Sprintf("%#v", []byte(key)))
	}

	// Failures that had the secrets in hand.
	var errs []error
	_, err = VerifyPassword(Secret{Kind: SCRAM, SCRAM: v}, user, password+"x")
	errs = append(errs, err)
	_, err = ParseSecret("SCRAM-SHA-256$4096:" + password + "$x:y")
	errs = append(errs, err)
	_, err = ParseUserlist(strings.NewReader(`"alice" "` + password))
	errs = append(errs, err)
	_, err = ParseUserlist(strings.NewReader(`"alice" "SCRAM-SHA-256$4096:` + password + `"`))
	errs = append(errs, err)
	_, err = VerifyMD5(Secret{Kind: Plain, Plain: password}, user, [4]byte{}, MD5Hash(user, password))
	errs = append(errs, err)
	s2 := NewSCRAMServer(user, v)
	serverFirst2, _ := s2.Start(SCRAMSHA256, c.ClientFirst())
	_, _, err = s2.Finish([]byte("c=biws,r=" + strings.Split(string(serverFirst2), ",")[0][2:] + ",p=" + proof + "," + password))
	errs = append(errs, err)

	type holder struct {
		Keys   Keys
		Ptr    *Keys
		Secret Secret
	}
	plainSecret, _ := ParseSecret(password)
	values := []any{
		keys, *keys, pwKeys, plainSecret, Secret{Kind: SCRAM, SCRAM: v},
		holder{Keys: *pwKeys, Ptr: pwKeys, Secret: plainSecret}, s, c,
	}
	var out bytes.Buffer
	for _, x := range values {
		for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%X", "%d"} {
			fmt.Fprintf(&out, verb+"\n", x)
		}
	}
	for _, err := range errs {
		if err == nil {
			t.Fatal("an expected failure succeeded")
		}
		fmt.Fprintf(&out, "%v\n%+v\n%#v\n", err, err, err)
	}
	for _, h := range []slog.Handler{slog.NewTextHandler(&out, nil), slog.NewJSONHandler(&out, nil)} {
		slog.New(h).Info("login", "keys", keys, "pwkeys", pwKeys, "secret", plainSecret,
			"verifier", v, "server", s, "client", c, "err", errs[0])
	}

	text := out.String()
	for _, secret := range secrets {
		if strings.Contains(text, secret) {
			t.Errorf("output contains a secret (%.12q...)", secret)
		}
	}
	if !strings.Contains(text, `auth.Keys{User:"alice" ClientKey:[redacted] ServerKey:[redacted]}`) {
		t.Errorf("keys not rendered as expected:\n%s", text)
	}
	if t.Failed() {
		t.Logf("output:\n%s", text)
	}
}
