package auth

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

func TestParseSecret(t *testing.T) {
	verifier := rfcVerifier(t).String()
	md5 := MD5Hash("u", "pw")
	for _, tc := range []struct {
		in   string
		kind Kind
	}{
		{verifier, SCRAM},
		{md5, MD5},
		{strings.ToUpper(md5[:3]) + md5[3:], Plain},                // PostgreSQL's prefix is lowercase
		{"md5" + strings.ToUpper(md5[3:]), Plain},                  // and so are its hex digits
		{md5 + "0", Plain},                                         // 33 digits
		{md5[:34], Plain},                                          // 31 digits
		{"md5" + strings.Repeat("g", 32), Plain},                   // not hex
		{"scram-sha-256" + verifier[len("SCRAM-SHA-256"):], Plain}, // PostgreSQL compares case-sensitively
		{"", Plain},
		{"just a password", Plain},
	} {
		got, err := ParseSecret(tc.in)
		if err != nil {
			t.Errorf("ParseSecret(%q): %v", tc.in, err)
			continue
		}
		if got.Kind != tc.kind {
			t.Errorf("ParseSecret(%q).Kind = %v, want %v", tc.in, got.Kind, tc.kind)
		}
		switch got.Kind {
		case Plain:
			if got.Plain != tc.in {
				t.Errorf("ParseSecret(%q).Plain = %q", tc.in, got.Plain)
			}
		case MD5:
			if got.MD5 != tc.in {
				t.Errorf("ParseSecret(%q).MD5 = %q", tc.in, got.MD5)
			}
		case SCRAM:
			if got.SCRAM.String() != tc.in {
				t.Errorf("ParseSecret(%q).SCRAM = %s", tc.in, got.SCRAM)
			}
		}
	}
}

func TestParseSCRAMVerifierErrors(t *testing.T) {
	good := rfcVerifier(t).String() // SCRAM-SHA-256$4096:salt$stored:server
	_, rest, _ := strings.Cut(good, "$")
	iterSalt, keys, _ := strings.Cut(rest, "$")
	_, salt, _ := strings.Cut(iterSalt, ":")
	stored, server, _ := strings.Cut(keys, ":")
	for _, bad := range []string{
		"SCRAM-SHA-256$",
		"SCRAM-SHA-256$4096:" + salt,
		"SCRAM-SHA-256$4096" + salt + "$" + keys,
		"SCRAM-SHA-256$4096:" + salt + "$" + stored + server,
		"SCRAM-SHA-256$0:" + salt + "$" + keys,
		"SCRAM-SHA-256$-1:" + salt + "$" + keys,
		"SCRAM-SHA-256$x:" + salt + "$" + keys,
		"SCRAM-SHA-256$4096:$" + keys,
		"SCRAM-SHA-256$4096:!!$" + keys,
		"SCRAM-SHA-256$4096:" + salt + "$" + stored[:len(stored)-4] + ":" + server,
		"SCRAM-SHA-256$4096:" + salt + "$" + stored + ":" + server + "AAAA",
		"SCRAM-SHA-256$4096:" + salt + "$" + stored + ":" + server[1:],
	} {
		_, err := ParseSecret(bad)
		if !errors.Is(err, ErrInvalidSecret) {
			t.Errorf("ParseSecret(%q) = %v, want ErrInvalidSecret", bad, err)
			continue
		}
		for _, part := range []string{salt, stored, server} {
			if strings.Contains(err.Error(), part) {
				t.Errorf("error %q quotes the secret", err)
			}
		}
	}
	if _, err := ParseSCRAMVerifier("md5" + strings.Repeat("0", 32)); !errors.Is(err, ErrInvalidSecret) {
		t.Errorf("ParseSCRAMVerifier of an md5 hash: %v", err)
	}
}

func TestSCRAMVerifierRoundTrip(t *testing.T) {
	v := rfcVerifier(t)
	parsed, err := ParseSCRAMVerifier(v.String())
	if err != nil {
		t.Fatal(err)
	}
	if parsed.Iterations != v.Iterations || !bytes.Equal(parsed.Salt, v.Salt) ||
		parsed.StoredKey != v.StoredKey || parsed.ServerKey != v.ServerKey {
		t.Fatalf("round trip changed the verifier: %s vs %s", parsed, v)
	}
	if !strings.HasPrefix(v.String(), "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$") {
		t.Fatalf("text form %s", v)
	}
}

func TestVerifyPassword(t *testing.T) {
	scram := Secret{Kind: SCRAM, SCRAM: rfcVerifier(t)}
	md5 := Secret{Kind: MD5, MD5: MD5Hash("user", "pencil")}
	plain := Secret{Kind: Plain, Plain: "pencil"}
	for _, secret := range []Secret{scram, md5, plain} {
		keys, err := VerifyPassword(secret, "user", "pencil")
		if err != nil {
			t.Errorf("%v, right password: %v", secret, err)
			continue
		}
		if keys.User != "user" || keys.Password != "pencil" || keys.MD5 != MD5Hash("user", "pencil") {
			t.Errorf("%v: keys = user %q, password set %t, md5 set %t", secret, keys.User, keys.Password != "", keys.MD5 != "")
		}
		if secret.Kind == SCRAM && !bytes.Equal(keys.ClientKey, rfcClientKey(t)) {
			t.Errorf("%v: ClientKey not derived", secret)
		}
		for _, wrong := range []string{"Pencil", "pencil ", ""} {
			if _, err := VerifyPassword(secret, "user", wrong); !errors.Is(err, ErrPasswordMismatch) {
				t.Errorf("%v, password %q: %v, want ErrPasswordMismatch", secret, wrong, err)
			}
		}
	}
	// md5 hashes are salted with the user name.
	if _, err := VerifyPassword(md5, "other", "pencil"); !errors.Is(err, ErrPasswordMismatch) {
		t.Errorf("md5 secret of another user: %v", err)
	}
	for _, none := range []Secret{{}, {Kind: Plain}, {Kind: SCRAM}} {
		if _, err := VerifyPassword(none, "user", "pencil"); !errors.Is(err, ErrPasswordMismatch) {
			t.Errorf("%v: %v, want ErrPasswordMismatch", none, err)
		}
	}

	// Keys from a cleartext password log in with SCRAM like recovered ones.
	keys, _ := VerifyPassword(scram, "user", "pencil")
	c, err := NewSCRAMClient(&Keys{ClientKey: keys.ClientKey, ServerKey: keys.ServerKey})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := exchange(t, c, NewSCRAMServer("user", scram.SCRAM)); err != nil {
		t.Fatalf("SCRAM login with keys from VerifyPassword: %v", err)
	}
}
