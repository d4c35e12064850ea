package auth

//go:generate python3 gen_saslprep_tables.py

import (
	"unicode"
	"unicode/utf8"

	"golang.org/x/text/unicode/norm"
)

// saslprep prepares a password for SCRAM as PostgreSQL's pg_saslprep does
// (src/common/saslprep.c), so that rolegate derives the same keys as the
// server and as libpq. ok is false when PostgreSQL would give up on the
// password (not UTF-8, empty after mapping, prohibited or unassigned
// characters, broken bidirectional text); PostgreSQL then hashes the raw
// bytes, and so must the caller.
//
// It follows PostgreSQL where PostgreSQL departs from RFC 4013, because
// agreeing with the server matters more than agreeing with the RFC:
//   - pure ASCII is returned unchanged, control characters included;
//   - the prohibition and bidi checks look at the mapped string before
//     normalization, not at the normalized output.
func saslprep(password string) (prepped string, ok bool) {
	if isASCII(password) {
		return password, true
	}
	if !utf8.ValidString(password) {
		return "", false
	}

	// RFC 3454 step 1: map.
	mapped := make([]rune, 0, len(password))
	for _, r := range password {
		switch {
		case unicode.Is(nonASCIISpace, r):
			mapped = append(mapped, ' ')
		case unicode.Is(mappedToNothing, r):
		default:
			mapped = append(mapped, r)
		}
	}
	if len(mapped) == 0 {
		return "", false // PostgreSQL refuses an empty password here
	}

	// Step 3: prohibit (on the mapped runes, as PostgreSQL does).
	hasRandAL := false
	for _, r := range mapped {
		if unicode.Is(prohibited, r) || unicode.Is(unassigned, r) {
			return "", false
		}
		hasRandAL = hasRandAL || unicode.Is(randALCat, r)
	}

	// Step 4: bidi. Right-to-left text must not mix in left-to-right
	// characters and must start and end with a right-to-left one.
	if hasRandAL {
		if !unicode.Is(randALCat, mapped[0]) || !unicode.Is(randALCat, mapped[len(mapped)-1]) {
			return "", false
		}
		for _, r := range mapped {
			if unicode.Is(lCat, r) {
				return "", false
			}
		}
	}

	// Step 2: normalize. Every rune left is assigned in Unicode 3.2, and
	// Unicode's stability policy keeps their NFKC forms fixed, so the newer
	// tables in x/text give the same result as PostgreSQL's.
	return norm.NFKC.String(string(mapped)), true
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= utf8.RuneSelf {
			return false
		}
	}
	return true
}
