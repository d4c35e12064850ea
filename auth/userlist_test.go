package auth

import (
	"errors"
	"strings"
	"testing"
)

func TestParseUserlist(t *testing.T) {
	verifier := rfcVerifier(t).String()
	md5 := MD5Hash("bob", "pw")
	file := "\uFEFF; PgBouncer auth_file\n" +
		"# another comment\n" +
		"\n" +
		"   \t\n" +
		`"alice" "` + verifier + `"` + "\n" +
		`"bob"  "` + md5 + `" "ignored" fields` + "\r\n" +
		`  "carol"` + "\t" + `"say ""cheese"""` + "\n" +
		`"da""ve" ""` + "\n" +
		`"eve" "p;#w"`
	users, err := ParseUserlist(strings.NewReader(file))
	if err != nil {
		t.Fatal(err)
	}
	if len(users) != 5 {
		t.Fatalf("got %d users: %v", len(users), users)
	}
	if s := users["alice"]; s.Kind != SCRAM || s.SCRAM.String() != verifier {
		t.Errorf("alice: %v", s)
	}
	if s := users["bob"]; s.Kind != MD5 || s.MD5 != md5 {
		t.Errorf("bob: %v", s)
	}
	if s := users["carol"]; s.Kind != Plain || s.Plain != `say "cheese"` {
		t.Errorf("carol: %q", s.Plain)
	}
	if s, ok := users[`da"ve`]; !ok || s.Kind != Plain || s.Plain != "" {
		t.Errorf(`da"ve: %v %q`, ok, s.Plain)
	}
	if s := users["eve"]; s.Plain != "p;#w" {
		t.Errorf("eve: %q", s.Plain)
	}
}

func TestParseUserlistErrors(t *testing.T) {
	const secret = "TOPSECRET"
	for _, tc := range []struct {
		file, want string
	}{
		{`"a" "` + secret + `"` + "\n" + `b "` + secret + `"`, "line 2: user name: not double-quoted"},
		{"\n\n" + `"a" ` + secret + `"`, "line 3: secret of user \"a\": not double-quoted"},
		{`"a" "` + secret, "line 1: secret of user \"a\": closing double quote missing"},
		{`"a`, "line 1: user name: closing double quote missing"},
		{`"a"`, "line 1: secret of user \"a\": missing"},
		{`"a""` + secret + `"`, "line 1: secret of user \"a\\\"" + secret + "\": missing"}, // "" is an escaped quote
		{`"a"x"` + secret + `"`, "line 1: expected white space after the user name"},
		{`"" "` + secret + `"`, "line 1: empty user name"},
		{`"a" "` + secret + `"` + "\n;\n" + `"a" "` + secret + `"`, `line 3: user "a" is already listed on line 1`},
		{`"a" "SCRAM-SHA-256$4096:` + secret + `"`, "line 1: secret of user \"a\": invalid SCRAM secret"},
		{strings.Repeat("x", maxUserlistLine+1), "longer than"},
	} {
		_, err := ParseUserlist(strings.NewReader(tc.file))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseUserlist(%.40q) = %v, want an error with %q", tc.file, err, tc.want)
			continue
		}
		if strings.Contains(err.Error(), secret) && !strings.Contains(tc.want, secret) {
			t.Errorf("error %q contains the secret", err)
		}
	}
	// A SCRAM secret's error is still an *Error underneath.
	_, err := ParseUserlist(strings.NewReader(`"a" "SCRAM-SHA-256$x"`))
	if !errors.Is(err, ErrInvalidSecret) {
		t.Errorf("bad verifier: %v, want ErrInvalidSecret", err)
	}
}
