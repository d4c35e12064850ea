package auth

import (
	"bytes"
	"errors"
	"reflect"
	"strings"
	"testing"
)

// fuzzVerifier is cheap to derive: fuzzing needs speed, not iterations.
var fuzzVerifier = NewSCRAMVerifier("pw", []byte("0123456789abcdef"), 1)

// checkError holds every error to the package's promise: an *Error with a
// SQLSTATE and a sentinel, and text made of printable ASCII only, so that
// no client bytes reach a log or the client unsanitized.
func checkError(t *testing.T, err error) {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) || len(e.Code) != 5 || e.Err == nil {
		t.Fatalf("error %v is not a complete *Error", err)
	}
	for _, c := range []byte(err.Error()) {
		if c < 0x20 || c > 0x7e {
			t.Fatalf("error text %q has a byte outside printable ASCII", err)
		}
	}
}

func FuzzSCRAMClientFirst(f *testing.F) {
	for _, seed := range []string{
		"n,,n=,r=abc", "y,,n=user,r=abc,x=1", "p=tls-server-end-point,,n=,r=abc",
		"n,a=u,n=,r=abc", "n,,m=x,n=,r=abc", "n,,n=,r=", "", "n", "n,,", "n,,n=,r=a\x00",
		rfcClientFirst,
	} {
		f.Add(SCRAMSHA256, []byte(seed))
	}
	f.Add("SCRAM-SHA-256-PLUS", []byte("p=tls-server-end-point,,n=,r=abc"))
	f.Add("SCRAM-SHA-256-PLUS", []byte("p=tls-server-end-point,,n=,r=abcd"))
	f.Add("SCRAM-SHA-256-PLUS", []byte("p=tls-unique,,n=,r=abcd"))
	f.Fuzz(func(t *testing.T, mechanism string, msg []byte) {
		s := NewSCRAMServer("u", fuzzVerifier)
		if len(msg)%2 == 0 {
			// Half the inputs arrive on a TLS connection, where -PLUS is offered.
			s.WithChannelBinding([]byte("end point"))
		}
		out, err := s.Start(mechanism, msg)
		if err != nil {
			checkError(t, err)
			return
		}
		// Accepted: the reply extends the client's nonce with ours.
		if !strings.HasPrefix(string(out), "r="+s.clientNonce+s.serverNonce+",s=") || !isPrintable(s.clientNonce) {
			t.Fatalf("server-first %q for client-first %q", out, msg)
		}
	})
}

func FuzzSCRAMClientFinal(f *testing.F) {
	newServer := func() *SCRAMServer {
		s := NewSCRAMServer("u", fuzzVerifier)
		s.serverNonce = "SRV"
		if _, err := s.Start(SCRAMSHA256, []byte("n,,n=,r=abc")); err != nil {
			f.Fatal(err)
		}
		return s
	}
	for _, seed := range []string{
		"c=biws,r=abcSRV,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
		"c=biws,r=abcSRV,x=y,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
		"c=eSws,r=abcSRV,p=AAAA", "c=biws,r=abc,p=", "c=biws", "", ",,,", "c=biws,r=abcSRV,p=x,p=y",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, msg []byte) {
		s := newServer()
		serverFinal, keys, err := s.Finish(msg)
		if err != nil {
			checkError(t, err)
			return
		}
		// Only a proof made with the password can get here.
		if keys == nil || !bytes.HasPrefix(serverFinal, []byte("v=")) {
			t.Fatalf("success without keys for %q", msg)
		}
	})
}

// FuzzSCRAMServerMessages feeds the client side what a hostile server
// might send.
func FuzzSCRAMServerMessages(f *testing.F) {
	f.Add([]byte("r=abcd,s=eA==,i=1"), []byte("v=AAAA"))
	f.Add([]byte("r=abcd,s=eA==,i=1,x=y"), []byte("e=invalid-proof"))
	f.Add([]byte("m=x,r=abcd"), []byte(""))
	f.Fuzz(func(t *testing.T, serverFirst, serverFinal []byte) {
		c, err := NewSCRAMClient(&Keys{ClientKey: make([]byte, 32), ServerKey: make([]byte, 32)})
		if err != nil {
			t.Fatal(err)
		}
		c.clientNonce = "abc"
		c.ClientFirst()
		if _, err := c.ClientFinal(serverFirst); err != nil {
			checkError(t, err)
			return
		}
		if err := c.Verify(serverFinal); err != nil {
			checkError(t, err)
		}
	})
}

// FuzzUserlist checks that parsing never panics and that whatever parses
// survives writing back out and parsing again.
func FuzzUserlist(f *testing.F) {
	for _, seed := range []string{
		`"a" "b"`, "; c\n# d\n\"a\" \"b\" x\r\n\"c\"\t\"\"\"\"\n", `"a""b" "c"`, `"a" "SCRAM-SHA-256$1:eA==$AAAA:AAAA"`,
		`"a" "md5` + strings.Repeat("0", 32) + `"`, `"a`, `"a" "b`, "\uFEFF\"a\" \"b\"",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		users, err := ParseUserlist(bytes.NewReader(data))
		if err != nil {
			return
		}
		var out strings.Builder
		for user, secret := range users {
			out.WriteString(quote(user) + " " + quote(secretText(secret)) + "\n")
		}
		again, err := ParseUserlist(strings.NewReader(out.String()))
		if err != nil {
			t.Fatalf("re-parsing %q: %v", out.String(), err)
		}
		if !reflect.DeepEqual(users, again) {
			t.Fatalf("round trip changed the userlist: %v vs %v", users, again)
		}
	})
}

func FuzzParseSecret(f *testing.F) {
	f.Add(rfcVerifier(f).String())
	f.Add("SCRAM-SHA-256$1:eA==$" + strings.Repeat("A", 43) + "=:" + strings.Repeat("A", 43) + "=")
	f.Add(MD5Hash("u", "p"))
	f.Fuzz(func(t *testing.T, s string) {
		secret, err := ParseSecret(s)
		if err != nil {
			checkError(t, err)
			return
		}
		again, err := ParseSecret(secretText(secret))
		if err != nil || !reflect.DeepEqual(secret, again) {
			t.Fatalf("round trip of %q: %v, %v", s, again, err)
		}
	})
}

func quote(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }

func secretText(s Secret) string {
	switch s.Kind {
	case SCRAM:
		return s.SCRAM.String()
	case MD5:
		return s.MD5
	}
	return s.Plain
}
