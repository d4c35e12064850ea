package auth

import (
	"bytes"
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// RFC 7677 section 3: the SCRAM-SHA-256 exchange for user "user" with
// password "pencil".
const (
	rfcUser        = "user"
	rfcPassword    = "pencil"
	rfcSalt        = "W22ZaJ0SNY7soEsUEjb6gQ=="
	rfcClientNonce = "rOprNGfwEbeRWgbNEkqO"
	rfcServerNonce = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
	rfcClientFirst = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
	rfcServerFirst = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
	rfcClientFinal = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
	rfcServerFinal = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
)

func rfcVerifier(t testing.TB) *SCRAMVerifier {
	t.Helper()
	salt, err := base64.StdEncoding.DecodeString(rfcSalt)
	if err != nil {
		t.Fatal(err)
	}
	return NewSCRAMVerifier(rfcPassword, salt, 4096)
}

// rfcClientKey computes RFC 5802's ClientKey for the RFC 7677 exchange
// straight from the definitions, independently of the package.
func rfcClientKey(t testing.TB) []byte {
	t.Helper()
	salt, _ := base64.StdEncoding.DecodeString(rfcSalt)
	salted, err := pbkdf2.Key(sha256.New, rfcPassword, salt, 4096, 32)
	if err != nil {
		t.Fatal(err)
	}
	mac := hmac.New(sha256.New, salted)
	mac.Write([]byte("Client Key"))
	return mac.Sum(nil)
}

func TestSCRAMServerRFC7677(t *testing.T) {
	s := NewSCRAMServer(rfcUser, rfcVerifier(t))
	s.serverNonce = rfcServerNonce
	serverFirst, err := s.Start(SCRAMSHA256, []byte(rfcClientFirst))
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	if string(serverFirst) != rfcServerFirst {
		t.Fatalf("server-first:\n got %s\nwant %s", serverFirst, rfcServerFirst)
	}
	serverFinal, keys, err := s.Finish([]byte(rfcClientFinal))
	if err != nil {
		t.Fatalf("Finish: %v", err)
	}
	if string(serverFinal) != rfcServerFinal {
		t.Fatalf("server-final:\n got %s\nwant %s", serverFinal, rfcServerFinal)
	}
	if !bytes.Equal(keys.ClientKey, rfcClientKey(t)) {
		t.Fatal("recovered ClientKey differs from HMAC(SaltedPassword, \"Client Key\")")
	}
	if keys.User != rfcUser || keys.Password != "" || keys.MD5 != "" {
		t.Fatalf("keys = %v, want only the user and SCRAM keys", keys)
	}
}

func TestSCRAMClientRFC7677(t *testing.T) {
	fromExchange := func(t *testing.T) *Keys {
		s := NewSCRAMServer(rfcUser, rfcVerifier(t))
		s.serverNonce = rfcServerNonce
		if _, err := s.Start(SCRAMSHA256, []byte(rfcClientFirst)); err != nil {
			t.Fatal(err)
		}
		_, keys, err := s.Finish([]byte(rfcClientFinal))
		if err != nil {
			t.Fatal(err)
		}
		return keys
	}
	for name, keys := range map[string]func(t *testing.T) *Keys{
		"recovered keys": fromExchange,
		"password only":  func(*testing.T) *Keys { return &Keys{User: rfcUser, Password: rfcPassword} },
	} {
		t.Run(name, func(t *testing.T) {
			c, err := NewSCRAMClient(keys(t))
			if err != nil {
				t.Fatal(err)
			}
			c.user, c.clientNonce = rfcUser, rfcClientNonce
			if got := string(c.ClientFirst()); got != rfcClientFirst {
				t.Fatalf("client-first = %s, want %s", got, rfcClientFirst)
			}
			final, err := c.ClientFinal([]byte(rfcServerFirst))
			if err != nil {
				t.Fatalf("ClientFinal: %v", err)
			}
			if string(final) != rfcClientFinal {
				t.Fatalf("client-final:\n got %s\nwant %s", final, rfcClientFinal)
			}
			if err := c.Verify([]byte(rfcServerFinal)); err != nil {
				t.Fatalf("Verify: %v", err)
			}
		})
	}
}

// exchange runs client and server against each other and returns the keys
// the server recovered.
func exchange(t testing.TB, c *SCRAMClient, s *SCRAMServer) (*Keys, error) {
	t.Helper()
	serverFirst, err := s.Start(c.Mechanism(), c.ClientFirst())
	if err != nil {
		return nil, err
	}
	clientFinal, err := c.ClientFinal(serverFirst)
	if err != nil {
		t.Fatalf("ClientFinal: %v", err)
	}
	serverFinal, keys, err := s.Finish(clientFinal)
	if err != nil {
		return nil, err
	}
	if err := c.Verify(serverFinal); err != nil {
		t.Fatalf("Verify: %v", err)
	}
	return keys, nil
}

func passwordClient(t testing.TB, password string) *SCRAMClient {
	t.Helper()
	c, err := NewSCRAMClient(&Keys{Password: password})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestSCRAMKeyPassThrough is the property rolegate is built on: the keys
// recovered from one client's exchange log in again, on a new exchange with
// new nonces, without the client.
func TestSCRAMKeyPassThrough(t *testing.T) {
	v := NewSCRAMVerifier("correct horse", []byte("0123456789abcdef"), 4096)
	keys, err := exchange(t, passwordClient(t, "correct horse"), NewSCRAMServer("alice", v))
	if err != nil {
		t.Fatalf("first exchange: %v", err)
	}
	for i := range 3 {
		c, err := NewSCRAMClient(keys)
		if err != nil {
			t.Fatal(err)
		}
		again, err := exchange(t, c, NewSCRAMServer("alice", v))
		if err != nil {
			t.Fatalf("login %d with recovered keys: %v", i, err)
		}
		if !bytes.Equal(again.ClientKey, keys.ClientKey) {
			t.Fatal("ClientKey changed between exchanges")
		}
	}

	// The keys prove nothing to a verifier of another password.
	other := NewSCRAMVerifier("other", []byte("0123456789abcdef"), 4096)
	c, _ := NewSCRAMClient(keys)
	if _, err := exchange(t, c, NewSCRAMServer("alice", other)); !errors.Is(err, ErrPasswordMismatch) {
		t.Fatalf("recovered keys against another verifier: %v, want ErrPasswordMismatch", err)
	}
}

func TestSCRAMWrongPassword(t *testing.T) {
	v := NewSCRAMVerifier("right", []byte("0123456789abcdef"), 4096)
	_, err := exchange(t, passwordClient(t, "wrong"), NewSCRAMServer("bob", v))
	var e *Error
	if !errors.Is(err, ErrPasswordMismatch) || !errors.As(err, &e) {
		t.Fatalf("err = %v, want ErrPasswordMismatch", err)
	}
	if e.Code != "28P01" || e.Message != `password authentication failed for user "bob"` {
		t.Fatalf("error = %q %q", e.Code, e.Message)
	}
}

func TestSCRAMServerSignatureChecked(t *testing.T) {
	// A server that knows StoredKey but not ServerKey (or a password change)
	// must not pass Verify.
	v := NewSCRAMVerifier("pw", []byte("0123456789abcdef"), 4096)
	keys, err := exchange(t, passwordClient(t, "pw"), NewSCRAMServer("u", v))
	if err != nil {
		t.Fatal(err)
	}
	forged := *v
	forged.ServerKey[0] ^= 1
	c, _ := NewSCRAMClient(keys)
	s := NewSCRAMServer("u", &forged)
	serverFirst, _ := s.Start(SCRAMSHA256, c.ClientFirst())
	clientFinal, _ := c.ClientFinal(serverFirst)
	serverFinal, _, err := s.Finish(clientFinal)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Verify(serverFinal); !errors.Is(err, ErrServerSignature) {
		t.Fatalf("Verify with a forged signature: %v, want ErrServerSignature", err)
	}
}

func TestSCRAMMockExchange(t *testing.T) {
	existing := NewSCRAMVerifier("pw", []byte("0123456789abcdef"), 4096)
	first := func(s *SCRAMServer) string {
		t.Helper()
		out, err := s.Start(SCRAMSHA256, []byte("n,,n=,r=clientnonce"))
		if err != nil {
			t.Fatal(err)
		}
		return string(out)
	}
	shape := func(msg string) (nonceLen int, salt, iter string) {
		parts := strings.Split(msg, ",")
		if len(parts) != 3 || !strings.HasPrefix(parts[0], "r=clientnonce") {
			t.Fatalf("server-first %q has the wrong shape", msg)
		}
		return len(parts[0]), parts[1], parts[2]
	}
	realLen, realSalt, realIter := shape(first(NewSCRAMServer("exists", existing)))
	mockLen, mockSalt1, mockIter := shape(first(NewSCRAMServer("ghost", nil)))
	_, mockSalt2, _ := shape(first(NewSCRAMServer("ghost", nil)))
	_, otherSalt, _ := shape(first(NewSCRAMServer("ghost2", nil)))
	if realLen != mockLen || realIter != mockIter || len(realSalt) != len(mockSalt1) {
		t.Fatalf("mock server-first differs in shape: %d %s %s vs %d %s %s",
			realLen, realSalt, realIter, mockLen, mockSalt1, mockIter)
	}
	if mockSalt1 != mockSalt2 {
		t.Fatal("mock salt changes between attempts for the same user; a real role's would not")
	}
	if mockSalt1 == otherSalt {
		t.Fatal("mock salt is the same for different users")
	}

	// Even a proof made for the mock salt and iteration count fails.
	c := passwordClient(t, "anything")
	_, err := exchange(t, c, NewSCRAMServer("ghost", nil))
	if !errors.Is(err, ErrPasswordMismatch) {
		t.Fatalf("mock exchange: %v, want ErrPasswordMismatch", err)
	}
	if err.Error() != `password authentication failed for user "ghost"` {
		t.Fatalf("mock error %q differs from a wrong password's", err)
	}
}

func TestSCRAMServerForSecret(t *testing.T) {
	plain, _ := ParseSecret("plain pw")
	keys, err := exchange(t, passwordClient(t, "plain pw"), NewSCRAMServerForSecret("carol", plain, 0))
	if err != nil {
		t.Fatalf("plaintext secret: %v", err)
	}
	if keys.Password != "plain pw" || keys.MD5 != MD5Hash("carol", "plain pw") {
		t.Fatal("keys from a plaintext secret lack the password or its md5 hash")
	}
	// They log in to a server whose verifier has a salt of its own.
	serverSide := NewSCRAMVerifier("plain pw", []byte("the server's salt"), 4096)
	c, err := NewSCRAMClient(keys)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := exchange(t, c, NewSCRAMServer("carol", serverSide)); err != nil {
		t.Fatalf("upstream login with keys from a plaintext secret: %v", err)
	}
	for _, secret := range []Secret{{}, {Kind: MD5, MD5: MD5Hash("carol", "pw")}, {Kind: Plain}} {
		if _, err := exchange(t, passwordClient(t, "pw"), NewSCRAMServerForSecret("carol", secret, 0)); !errors.Is(err, ErrPasswordMismatch) {
			t.Errorf("secret %v: %v, want ErrPasswordMismatch", secret, err)
		}
	}
}

// TestSCRAMYRoundTrip runs a whole exchange with the y flag, which a
// server without channel binding (no TLS) accepts.
func TestSCRAMYRoundTrip(t *testing.T) {
	v := NewSCRAMVerifier("pw", []byte("0123456789abcdef"), 4096)
	s := NewSCRAMServer("u", v)
	clientNonce := "abcdefghijkl"
	serverFirst, err := s.Start(SCRAMSHA256, []byte("y,,n=,r="+clientNonce))
	if err != nil {
		t.Fatal(err)
	}
	keys, err := VerifyPassword(Secret{Kind: SCRAM, SCRAM: v}, "u", "pw")
	if err != nil {
		t.Fatal(err)
	}
	withoutProof := "c=eSws,r=" + strings.TrimPrefix(strings.Split(string(serverFirst), ",")[0], "r=")
	authMessage := "n=,r=" + clientNonce + "," + string(serverFirst) + "," + withoutProof
	storedKey := sha256.Sum256(keys.ClientKey)
	mac := hmac.New(sha256.New, storedKey[:])
	mac.Write([]byte(authMessage))
	proof := mac.Sum(nil)
	for i := range proof {
		proof[i] ^= keys.ClientKey[i]
	}
	if _, _, err := s.Finish([]byte(withoutProof + ",p=" + base64.StdEncoding.EncodeToString(proof))); err != nil {
		t.Fatalf("Finish with y,,: %v", err)
	}
}

func TestSCRAMAuthzid(t *testing.T) {
	v := NewSCRAMVerifier("pw", []byte("0123456789abcdef"), 4096)
	if _, err := NewSCRAMServer("a,b=c", v).Start(SCRAMSHA256, []byte("n,a=a=2Cb=3Dc,n=,r=abc")); err != nil {
		t.Fatalf("authzid naming the startup user: %v", err)
	}
	_, err := NewSCRAMServer("alice", v).Start(SCRAMSHA256, []byte("n,a=postgres,n=,r=abc"))
	if !errors.Is(err, ErrUnsupported) {
		t.Fatalf("authzid naming another role: %v, want ErrUnsupported", err)
	}
}

func TestSCRAMUsernameIgnored(t *testing.T) {
	// PostgreSQL takes the role from the startup packet; "n=" may say anything.
	v := NewSCRAMVerifier("pw", []byte("0123456789abcdef"), 4096)
	c := passwordClient(t, "pw")
	c.user = "someone-else"
	keys, err := exchange(t, c, NewSCRAMServer("alice", v))
	if err != nil {
		t.Fatal(err)
	}
	if keys.User != "alice" {
		t.Fatalf("keys.User = %q, want the startup user", keys.User)
	}
}

func TestSCRAMServerMalformed(t *testing.T) {
	v := NewSCRAMVerifier("pw", []byte("0123456789abcdef"), 4096)
	firsts := []struct {
		mechanism, msg string
		want           error
	}{
		{"SCRAM-SHA-1", "n,,n=,r=abc", ErrMalformed},
		{SCRAMSHA256, "", ErrMalformed},
		{SCRAMSHA256, "n,,n=,r=a\x00bc", ErrMalformed},
		{SCRAMSHA256, "x,,n=,r=abc", ErrMalformed},
		{SCRAMSHA256, "n", ErrMalformed},
		{SCRAMSHA256, "nx,n=,r=abc", ErrMalformed},
		{SCRAMSHA256, "n,", ErrMalformed},
		{SCRAMSHA256, "n,x=y,n=,r=abc", ErrMalformed},
		{SCRAMSHA256, "n,,", ErrMalformed},
		{SCRAMSHA256, "n,,n=", ErrMalformed},
		{SCRAMSHA256, "n,,r=abc", ErrMalformed},
		{SCRAMSHA256, "n,,n=,r=", ErrMalformed},
		{SCRAMSHA256, "n,,n=,r=ab\x7fc", ErrMalformed},
		{SCRAMSHA256, "n,,n=,x=abc", ErrMalformed},
		{SCRAMSHA256, "n,,n=,r=abc,", ErrMalformed},
		{SCRAMSHA256, "n,,n=,r=abc,1=x", ErrMalformed},
		{SCRAMSHA256, "n,,n=,r=abc,x", ErrMalformed},
		{SCRAMSHA256, "n,,m=ext,n=,r=abc", ErrUnsupported},
	}
	for _, tc := range firsts {
		s := NewSCRAMServer("u", v)
		_, err := s.Start(tc.mechanism, []byte(tc.msg))
		if !errors.Is(err, tc.want) {
			t.Errorf("Start(%q, %q) = %v, want %v", tc.mechanism, tc.msg, err, tc.want)
		}
		if _, _, err := s.Finish([]byte("c=biws,r=x,p=x")); !errors.Is(err, ErrState) {
			t.Errorf("Finish after a failed Start: %v, want ErrState", err)
		}
	}
	// Extensions after the nonce are skipped.
	if _, err := NewSCRAMServer("u", v).Start(SCRAMSHA256, []byte("n,,n=,r=abc,x=1,Y=")); err != nil {
		t.Errorf("extensions in client-first: %v", err)
	}

	s := NewSCRAMServer("u", v)
	s.serverNonce = "SRV"
	if _, err := s.Start(SCRAMSHA256, []byte("n,,n=,r=abc")); err != nil {
		t.Fatal(err)
	}
	proof := base64.StdEncoding.EncodeToString(make([]byte, 32))
	finals := []struct {
		msg  string
		want error
	}{
		{"", ErrMalformed},
		{"c=biws,r=abcSRV,p=" + proof + "\x00", ErrMalformed},
		{"r=abcSRV,p=" + proof, ErrMalformed},
		{"c=biws", ErrMalformed},
		{"c=eSws,r=abcSRV,p=" + proof, ErrMalformed},
		{"c=biws,p=" + proof, ErrMalformed},
		{"c=biws,r=abcSRV", ErrMalformed},
		{"c=biws,r=abcSRV,x=1", ErrMalformed},
		{"c=biws,r=abcSRV,p=", ErrMalformed},
		{"c=biws,r=abcSRV,p=!!!!", ErrMalformed},
		{"c=biws,r=abcSRV,p=" + base64.StdEncoding.EncodeToString(make([]byte, 31)), ErrMalformed},
		{"c=biws,r=abcSRV,p=" + proof + ",x=1", ErrMalformed},
		{"c=biws,r=abcSRV,p=" + proof + ",", ErrMalformed},
		{"c=biws,r=abcSRX,p=" + proof, ErrMalformed},
		{"c=biws,r=abc,p=" + proof, ErrMalformed},
		{"c=biws,r=abcSRVX,p=" + proof, ErrMalformed},
		{"c=biws,r=abcSRV,x=1,p=" + proof, ErrPasswordMismatch}, // extension skipped, proof wrong
	}
	for _, tc := range finals {
		s := *s // each case on a copy of the server that has sent server-first
		_, _, err := s.Finish([]byte(tc.msg))
		if !errors.Is(err, tc.want) {
			t.Errorf("Finish(%q) = %v, want %v", tc.msg, err, tc.want)
		}
	}
}

func TestSCRAMOutOfOrder(t *testing.T) {
	v := NewSCRAMVerifier("pw", []byte("0123456789abcdef"), 4096)
	s := NewSCRAMServer("u", v)
	if _, _, err := s.Finish([]byte("c=biws,r=x,p=x")); !errors.Is(err, ErrState) {
		t.Errorf("Finish before Start: %v", err)
	}
	s = NewSCRAMServer("u", v)
	if _, err := s.Start(SCRAMSHA256, []byte("n,,n=,r=abc")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Start(SCRAMSHA256, []byte("n,,n=,r=abc")); !errors.Is(err, ErrState) {
		t.Errorf("Start twice: %v", err)
	}

	c := passwordClient(t, "pw")
	if _, err := c.ClientFinal([]byte("r=x,s=eA==,i=1")); !errors.Is(err, ErrState) {
		t.Errorf("ClientFinal before ClientFirst: %v", err)
	}
	if err := c.Verify([]byte("v=x")); !errors.Is(err, ErrState) {
		t.Errorf("Verify before ClientFinal: %v", err)
	}
	if _, err := NewSCRAMClient(&Keys{MD5: MD5Hash("u", "pw")}); !errors.Is(err, ErrInvalidSecret) {
		t.Errorf("NewSCRAMClient without SCRAM keys or password: %v", err)
	}
	if _, err := NewSCRAMClient(nil); !errors.Is(err, ErrInvalidSecret) {
		t.Errorf("NewSCRAMClient(nil): %v", err)
	}
}

func TestSCRAMClientRejectsServer(t *testing.T) {
	newClient := func() *SCRAMClient {
		c := passwordClient(t, "pw")
		c.clientNonce = "abc"
		c.ClientFirst()
		return c
	}
	for _, msg := range []string{
		"",
		"m=x,r=abcd,s=eA==,i=1",
		"r=abcd,s=eA==",
		"r=xbcd,s=eA==,i=1",  // does not extend our nonce
		"r=abc,s=eA==,i=1",   // adds nothing to it
		"r=abc d,s=eA==,i=1", // not printable
		"s=eA==,r=abcd,i=1",
		"r=abcd,s=!!,i=1",
		"r=abcd,s=,i=1",
		"r=abcd,s=eA==,i=0",
		"r=abcd,s=eA==,i=x",
		"r=abcd,s=eA==,i=99999999999",
		"r=abcd,s=eA==,i=1,,",
	} {
		if _, err := newClient().ClientFinal([]byte(msg)); !errors.Is(err, ErrServerMessage) {
			t.Errorf("ClientFinal(%q) = %v, want ErrServerMessage", msg, err)
		}
	}
	for _, msg := range []string{"", "e=invalid-proof", "e=other-error,x=1", "x=1", "v=!!"} {
		c := newClient()
		if _, err := c.ClientFinal([]byte("r=abcd,s=eA==,i=1")); err != nil {
			t.Fatal(err)
		}
		if err := c.Verify([]byte(msg)); !errors.Is(err, ErrServerMessage) {
			t.Errorf("Verify(%q) = %v, want ErrServerMessage", msg, err)
		}
	}
}

// A server whose roles get another iteration count than PostgreSQL's default
// (scram_iterations, PostgreSQL 16) must see its count in mock exchanges too,
// or the count tells a prober which role names exist.
func TestSCRAMMockIterationsFollowTheServer(t *testing.T) {
	iterations := func(s *SCRAMServer) string {
		t.Helper()
		out, err := s.Start(SCRAMSHA256, []byte("n,,n=,r=clientnonce"))
		if err != nil {
			t.Fatal(err)
		}
		parts := strings.Split(string(out), ",")
		return parts[len(parts)-1]
	}
	real := Secret{Kind: SCRAM, SCRAM: NewSCRAMVerifier("pw", []byte("0123456789abcdef"), 8192)}
	plain, _ := ParseSecret("plain pw")
	for name, srv := range map[string]*SCRAMServer{
		"real":      NewSCRAMServerForSecret("exists", real, 8192),
		"unknown":   NewSCRAMServerForSecret("ghost", Secret{}, 8192),
		"md5":       NewSCRAMServerForSecret("ghost", Secret{Kind: MD5, MD5: MD5Hash("ghost", "pw")}, 8192),
		"plaintext": NewSCRAMServerForSecret("carol", plain, 8192),
	} {
		if got := iterations(srv); got != "i=8192" {
			t.Errorf("%s: server-first offers %s, want i=8192", name, got)
		}
	}
	if got := iterations(NewSCRAMServerForSecret("ghost", Secret{}, 0)); got != "i=4096" {
		t.Errorf("no count known: %s, want PostgreSQL's default i=4096", got)
	}
	// The plaintext secret still logs in with the count it offers.
	if _, err := exchange(t, passwordClient(t, "plain pw"), NewSCRAMServerForSecret("carol", plain, 8192)); err != nil {
		t.Fatalf("plaintext secret at 8192 iterations: %v", err)
	}
}
