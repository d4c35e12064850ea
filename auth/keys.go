package auth

import (
	"fmt"
	"log/slog"
	"strings"
)

// Keys is what a client proved: enough for rolegate to log in to the server
// as that client at any later time, without the client (SCRAMClient for
// SCRAM, MD5Response for md5, or the password itself).
//
// Every field but User is password-equivalent for some login. Printing Keys
// with fmt or slog shows the user and which fields are set, never their
// values. fmt cannot call these methods on a Keys stored by value in an
// unexported struct field, so hold Keys by pointer.
type Keys struct {
	User      string
	ClientKey []byte // SCRAM: recovered from the client's proof
	ServerKey []byte // SCRAM: from the verifier, to check the server's signature
	MD5       string // "md5..." hash, password-equivalent for md5 logins
	Password  string // cleartext, when the client sent one or the secret is plain
}

// String names the user and the kinds of key held, nothing more.
func (k Keys) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "auth.Keys{User:%q", k.User)
	for _, name := range k.held() {
		b.WriteString(" " + name + ":[redacted]")
	}
	b.WriteString("}")
	return b.String()
}

// GoString is String, so %#v cannot print the keys either.
func (k Keys) GoString() string { return k.String() }

// Format makes every fmt verb (%v, %+v, %#v, %s, %x, ...) print String.
func (k Keys) Format(f fmt.State, verb rune) { _, _ = f.Write([]byte(k.String())) }

// LogValue logs the user and the kinds of key held.
func (k Keys) LogValue() slog.Value {
	return slog.GroupValue(slog.String("user", k.User), slog.Any("held", k.held()))
}

func (k Keys) held() []string {
	var held []string
	if len(k.ClientKey) > 0 {
		held = append(held, "ClientKey")
	}
	if len(k.ServerKey) > 0 {
		held = append(held, "ServerKey")
	}
	if k.MD5 != "" {
		held = append(held, "MD5")
	}
	if k.Password != "" {
		held = append(held, "Password")
	}
	return held
}
