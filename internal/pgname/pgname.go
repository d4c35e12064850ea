// Package pgname cuts role and database names to PostgreSQL's length, the
// two ways the server does: a login's names from the startup packet, and the
// names SQL (CREATE ROLE, CREATE DATABASE) stores.
package pgname

import "unicode/utf8"

// MaxLen is the longest name PostgreSQL keeps, in bytes: NAMEDATALEN - 1.
const MaxLen = 63

// Startup is a user or database name from a startup packet as the server
// looks it up: cut to MaxLen bytes, at a byte, not at a character boundary.
// That is what ProcessStartupPacket does (PostgreSQL 15 to 18: "if
// (strlen(name) >= NAMEDATALEN) name[NAMEDATALEN - 1] = '\0'"), so a
// multibyte name cut inside a character names no role or database the
// server has, and the login fails as it would directly.
func Startup(name string) string {
	if len(name) > MaxLen {
		return name[:MaxLen]
	}
	return name
}

// Identifier is a name as CREATE ROLE or CREATE DATABASE stores it: cut to
// at most MaxLen bytes at a character boundary (truncate_identifier with
// pg_mbcliplen), for a UTF-8 name. A rule in proxy.toml written with the
// name given to CREATE ROLE names the role the server stored.
func Identifier(name string) string {
	if len(name) <= MaxLen {
		return name
	}
	n := MaxLen
	for n > 0 && !utf8.RuneStart(name[n]) {
		n--
	}
	return name[:n]
}
