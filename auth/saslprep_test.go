package auth

import "testing"

func TestSASLprep(t *testing.T) {
	for _, tc := range []struct {
		name, in, want string
		ok             bool
	}{
		{"ASCII unchanged", "pencil", "pencil", true},
		// PostgreSQL returns pure ASCII as it is; RFC 4013 would refuse the
		// control characters.
		{"ASCII control kept", "pass\tword\x07", "pass\tword\x07", true},
		{"not UTF-8", "caf\xe9", "", false},
		// RFC 4013 section 3's examples.
		{"soft hyphen mapped to nothing", "I\u00ADX", "IX", true},
		{"NFKC of feminine ordinal", "\u00AA", "a", true},
		{"NFKC of roman numeral nine", "\u2168", "IX", true},
		{"bidi: RandAL not last", "\u0627\u0031", "", false},
		// More of the profile.
		{"non-ASCII space mapped to space", "a\u00A0b\u3000c", "a b c", true},
		{"fullwidth to ASCII", "\uFF50\uFF41\uFF53\uFF53", "pass", true},
		{"empty after mapping", "\u00AD\u034F", "", false},
		// U+200B is in both C.1.2 and B.1; PostgreSQL checks C.1.2 first.
		{"zero width space mapped to space", "\u00AD\u200B", " ", true},
		{"private use prohibited", "x\uE000", "", false},
		{"unassigned in Unicode 3.2", "x\u0221", "", false},
		{"tagging character prohibited", "x\U000E0041", "", false},
		{"right-to-left only", "\u05D0\u05D1", "\u05D0\u05D1", true},
		{"right-to-left mixed with left-to-right", "\u05D0a\u05D1", "", false},
		{"combining accent composed", "e\u0301", "\u00E9", true},
	} {
		got, ok := saslprep(tc.in)
		if ok != tc.ok || got != tc.want {
			t.Errorf("%s: saslprep(%+q) = %+q, %t; want %+q, %t", tc.name, tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

func TestSCRAMVerifierUsesRawPasswordWhenPrepFails(t *testing.T) {
	salt := []byte("0123456789abcdef")
	// A password that SASLprep refuses must be hashed as its raw bytes, so
	// its NFKC twin must not match.
	raw := NewSCRAMVerifier("\uFF50\u05D0", salt, 1)
	if _, err := VerifyPassword(Secret{Kind: SCRAM, SCRAM: raw}, "u", "p\u05D0"); err == nil {
		t.Fatal("a password SASLprep refused was normalized anyway")
	}
	// One it accepts is normalized, so both spellings match.
	prepped := NewSCRAMVerifier("\uFF50\uFF57", salt, 1)
	if _, err := VerifyPassword(Secret{Kind: SCRAM, SCRAM: prepped}, "u", "pw"); err != nil {
		t.Fatalf("NFKC twin of a prepped password: %v", err)
	}
}
