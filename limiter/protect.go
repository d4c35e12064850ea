package limiter

import (
	"fmt"
	"net/netip"
	"path"
	"strings"
)

// Protect is one entry of a rule's protect list: sessions it matches count
// against the limit but are never victims (when only such sessions remain,
// the rule's fallback decides). It matches by the session's
// application_name or login role (a glob, path.Match's syntax) or by its
// client address (an address or a CIDR prefix).
type Protect struct {
	what    string // "application_name", "role" or "client"
	glob    string
	network netip.Prefix
}

// ParseProtect reads one entry: "application_name:pg_dump*",
// "role:replicator", "client:10.1.0.0/16" or "client:10.1.2.3".
func ParseProtect(s string) (Protect, error) {
	what, arg, ok := strings.Cut(s, ":")
	if !ok || arg == "" {
		return Protect{}, fmt.Errorf("%q: want application_name:<glob>, role:<glob> or client:<address or CIDR>", s)
	}
	p := Protect{what: what}
	switch what {
	case "application_name", "role":
		if _, err := path.Match(arg, ""); err != nil {
			return Protect{}, fmt.Errorf("%q: bad glob: %w", s, err)
		}
		p.glob = arg
	case "client":
		pfx, err := netip.ParsePrefix(arg)
		if err != nil {
			addr, aerr := netip.ParseAddr(arg)
			if aerr != nil {
				return Protect{}, fmt.Errorf("%q: want an address or a CIDR prefix after client:", s)
			}
			pfx = netip.PrefixFrom(addr, addr.BitLen())
		}
		p.network = pfx.Masked()
	default:
		return Protect{}, fmt.Errorf("%q: unknown kind %q (want application_name, role or client)", s, what)
	}
	return p, nil
}

// String is the entry as ParseProtect reads it.
func (p Protect) String() string {
	if p.what == "client" {
		return "client:" + p.network.String()
	}
	return p.what + ":" + p.glob
}

// Matches reports whether the entry protects h. A client entry matches the
// session's origin (Holder.Origin: for a session rolegate relays, its
// client's address, not rolegate's). A session whose client
// address the census could not see (a Unix socket, or no pg_read_all_stats)
// matches no client entry.
func (p Protect) Matches(h Holder) bool {
	switch p.what {
	case "application_name":
		ok, _ := path.Match(p.glob, h.ApplicationName)
		return ok
	case "role":
		ok, _ := path.Match(p.glob, h.Role)
		return ok
	case "client":
		o := h.origin()
		return o.IsValid() && p.network.Contains(o)
	}
	return false
}

// protects reports whether the rule's protect list matches h.
func (r Rule) protects(h Holder) bool {
	for _, p := range r.Protect {
		if p.Matches(h) {
			return true
		}
	}
	return false
}
