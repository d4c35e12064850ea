package pgname

import (
	"strings"
	"testing"
)

func TestCut(t *testing.T) {
	e := strings.Repeat("é", 40) // 2 bytes each: byte 63 is inside the 32nd
	for _, tt := range []struct {
		in, startup, identifier string
	}{
		{"", "", ""},
		{"app", "app", "app"},
		{strings.Repeat("a", 63), strings.Repeat("a", 63), strings.Repeat("a", 63)},
		{strings.Repeat("a", 64), strings.Repeat("a", 63), strings.Repeat("a", 63)},
		{strings.Repeat("a", 70), strings.Repeat("a", 63), strings.Repeat("a", 63)},
		{e, e[:63], e[:62]},
		{"a" + e, ("a" + e)[:63], ("a" + e)[:63]}, // byte 63 starts a character
		{strings.Repeat("€", 30), strings.Repeat("€", 30)[:63], strings.Repeat("€", 21)}, // 3-byte characters: 63 is a boundary
		{"ab" + strings.Repeat("€", 30), ("ab" + strings.Repeat("€", 30))[:63], "ab" + strings.Repeat("€", 20)},
	} {
		if got := Startup(tt.in); got != tt.startup {
			t.Errorf("Startup(%q) = %q, want %q", tt.in, got, tt.startup)
		}
		if got := Identifier(tt.in); got != tt.identifier {
			t.Errorf("Identifier(%q) = %q, want %q", tt.in, got, tt.identifier)
		}
		if len(Startup(tt.in)) > MaxLen || len(Identifier(tt.in)) > MaxLen {
			t.Errorf("%q: cut to more than %d bytes", tt.in, MaxLen)
		}
	}
}
