package auth

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"strings"
)

// maxUserlistLine bounds one line of a userlist; PgBouncer's own limits on
// names and passwords are far lower.
const maxUserlistLine = 64 << 10

// ParseUserlist reads a PgBouncer auth_file:
//
//	"user" "secret" [anything else on the line is ignored]
//
// Both fields are double-quoted; a double quote inside one is written
// twice (""). Blank lines and lines starting with ';' or '#' are skipped.
// Each secret is read with ParseSecret. Unlike PgBouncer, which stops
// reading at the first broken line and lets the last of duplicate entries
// win, a broken line or a user listed twice is an error: a half-loaded
// userlist would lock roles out without saying why. Errors name the line
// and never contain a secret.
func ParseUserlist(r io.Reader) (map[string]Secret, error) {
	users := make(map[string]Secret)
	firstLine := make(map[string]int)
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), maxUserlistLine)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if n == 1 {
			line = strings.TrimPrefix(line, "\uFEFF") // a byte order mark some editors write
		}
		line = strings.TrimLeft(line, " \t")
		line = strings.TrimRight(line, "\r")
		if line == "" || line[0] == ';' || line[0] == '#' {
			continue
		}
		user, rest, err := quoted(line)
		if err != nil {
			return nil, fmt.Errorf("userlist line %d: user name: %w", n, err)
		}
		if user == "" {
			return nil, fmt.Errorf("userlist line %d: empty user name", n)
		}
		trimmed := strings.TrimLeft(rest, " \t")
		if trimmed == rest && rest != "" {
			return nil, fmt.Errorf("userlist line %d: expected white space after the user name", n)
		}
		secret, _, err := quoted(trimmed)
		if err != nil {
			return nil, fmt.Errorf("userlist line %d: secret of user %q: %w", n, user, err)
		}
		parsed, err := ParseSecret(secret)
		if err != nil {
			return nil, fmt.Errorf("userlist line %d: secret of user %q: %w", n, user, err)
		}
		if first, dup := firstLine[user]; dup {
			return nil, fmt.Errorf("userlist line %d: user %q is already listed on line %d", n, user, first)
		}
		users[user], firstLine[user] = parsed, n
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return nil, fmt.Errorf("userlist: a line is longer than %d bytes", maxUserlistLine)
		}
		return nil, fmt.Errorf("userlist: %w", err)
	}
	return users, nil
}

// quoted reads one double-quoted field at the start of s, undoing the ""
// escape, and returns the rest of s after the closing quote. Its errors
// never quote the field, which may be a password.
func quoted(s string) (value, rest string, err error) {
	if s == "" {
		return "", "", errors.New("missing (expected a double-quoted field)")
	}
	if s[0] != '"' {
		return "", "", errors.New("not double-quoted")
	}
	var b strings.Builder
	for i := 1; i < len(s); i++ {
		if s[i] != '"' {
			b.WriteByte(s[i])
			continue
		}
		if i+1 < len(s) && s[i+1] == '"' {
			b.WriteByte('"')
			i++
			continue
		}
		return b.String(), s[i+1:], nil
	}
	return "", "", errors.New("closing double quote missing")
}
