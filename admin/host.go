package admin

import (
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"
)

// hostCheck decides which Host headers the admin HTTP server answers, so that
// a web page cannot read the API through DNS rebinding.
//
// A rebinding attack serves a page from a name the attacker controls, then
// points that name at this server: the browser treats our answers as the
// page's own origin and lets it read them, but every request it sends carries
// the attacker's name in Host. So what must be refused is a name rolegate
// does not know. Accepted are:
//
//   - IP literals (127.0.0.1, [::1], 10.0.0.5:9631, any address): an origin
//     that is an IP address is served by whatever holds the address, never
//     rebound. Probes that use the pod's or host's IP as Host pass.
//   - localhost (RFC 6761: it names loopback, resolved by the browser's own
//     machine, never by a DNS server an attacker runs), on any listener, so
//     that an SSH tunnel or kubectl port-forward to localhost works.
//   - the host of the configured listen address ([admin] http), when a name.
//   - the configured list ([admin] allowed_hosts): "name" on any port,
//     "name:port" on that port only.
//   - no Host at all: HTTP/1.0 allows it, old health checkers send it, and a
//     browser never does.
//
// Names compare case-insensitively and without one trailing dot
// ("LocalHost." is "localhost"), as DNS does.
type hostCheck struct {
	names     map[string]bool // accepted on any port
	hostPorts map[string]bool // "name:port", accepted on that port only
}

func newHostCheck(addr string, allowed []string) *hostCheck {
	c := &hostCheck{names: map[string]bool{"localhost": true}, hostPorts: map[string]bool{}}
	if host, _, err := net.SplitHostPort(addr); err == nil && host != "" {
		if name, _, ok := splitHost(host); ok {
			c.names[name] = true
		}
	}
	for _, a := range allowed {
		name, port, ok := splitHost(a)
		switch {
		case !ok: // config.Parse refuses these; an entry that cannot parse matches nothing
		case port == "":
			c.names[name] = true
		default:
			c.hostPorts[name+":"+port] = true
		}
	}
	return c
}

// allows reports whether a request with r.Host host may be answered.
func (c *hostCheck) allows(host string) bool {
	if host == "" {
		return true
	}
	name, port, ok := splitHost(host)
	if !ok {
		return false
	}
	if _, err := netip.ParseAddr(name); err == nil {
		return true
	}
	return c.names[name] || (port != "" && c.hostPorts[name+":"+port])
}

// splitHost takes a Host header apart into its lower-case name, without a
// trailing dot or IPv6 brackets, and its port ("" when there is none). ok is
// false for what no browser sends: brackets around a name, bytes no DNS name
// has, a port that is not a number.
func splitHost(h string) (name, port string, ok bool) {
	h = strings.ToLower(h)
	switch {
	case strings.HasPrefix(h, "["):
		end := strings.IndexByte(h, ']')
		if end < 0 {
			return "", "", false
		}
		name, rest := h[1:end], h[end+1:]
		if rest != "" {
			if rest[0] != ':' {
				return "", "", false
			}
			port = rest[1:]
		}
		if _, err := netip.ParseAddr(name); err != nil || !isPort(port) {
			return "", "", false
		}
		return name, port, true
	case strings.Count(h, ":") > 1: // an IPv6 address without brackets
		if _, err := netip.ParseAddr(h); err != nil {
			return "", "", false
		}
		return h, "", true
	}
	name, port, _ = strings.Cut(h, ":")
	name = strings.TrimSuffix(name, ".")
	if name == "" || !isName(name) || !isPort(port) {
		return "", "", false
	}
	return name, port, true
}

// isName: the bytes of a lower-case DNS name (browsers send international
// names as punycode).
func isName(s string) bool {
	for _, c := range []byte(s) {
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' && c != '.' && c != '_' {
			return false
		}
	}
	return true
}

// isPort: "" (no port; RFC 3986 allows "host:" too) or up to five digits.
func isPort(p string) bool {
	if len(p) > 5 {
		return false
	}
	for _, c := range p {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// checkHost answers 421 Misdirected Request to a request whose Host this
// server does not answer for (see hostCheck), before any endpoint, the
// token-protected ones included, sees it.
//
// 421 is RFC 9110's "directed at a server that is unwilling to produce an
// authoritative response for the target URI", which is exactly the case:
// the URI names a host that is not this server. 403 would read as a
// permission to obtain, 400 as a malformed request; neither is true.
func (h *HTTP) checkHost(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !h.hosts.allows(r.Host) {
			h.logRefusedHost(r)
			writeError(w, http.StatusMisdirectedRequest,
				"this server does not answer for host "+strconv.Quote(boundHost(r.Host))+"; add it to [admin] allowed_hosts, or use an IP address or localhost")
			return
		}
		next.ServeHTTP(w, r)
	})
}

// logRefusedHost logs a request refused for its Host, rate-limited.
func (h *HTTP) logRefusedHost(r *http.Request) {
	skipped, ok := h.refusedHost.allow(time.Now())
	if !ok {
		return
	}
	h.log.Warn("admin request refused: Host not allowed (DNS rebinding?)",
		"host", boundHost(r.Host), "method", r.Method, "path", r.URL.Path, "remote", r.RemoteAddr,
		"skipped_since_last", skipped)
}

// boundHost cuts a client's Host short for a log line or an answer: a DNS
// name has at most 253 bytes, and a client may send far more.
func boundHost(h string) string {
	const maxLen = 270 // a name, a port and brackets
	if len(h) > maxLen {
		return h[:maxLen] + "..."
	}
	return h
}

// rateLog lets one log line through per refusedLogEvery and counts the
// ones it holds back, so that a flood of refused requests costs one line
// per interval.
type rateLog struct {
	mu      sync.Mutex
	last    time.Time
	skipped int
}

// allow reports whether a line may be written at now, and how many were
// held back since the last one.
func (l *rateLog) allow(now time.Time) (skipped int, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.last.IsZero() && now.Sub(l.last) < refusedLogEvery {
		l.skipped++
		return 0, false
	}
	skipped = l.skipped
	l.last, l.skipped = now, 0
	return skipped, true
}
