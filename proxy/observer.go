package proxy

import "time"

// Observer receives the events that metrics count (package admin implements it
// with Prometheus); nil observes nothing. Calls are made on the session's
// goroutine, never per relayed buffer, and must not block.
type Observer interface {
	// LoginDone: a session logged in; d runs from accept to the ReadyForQuery
	// the client was sent.
	LoginDone(role, database string, d time.Duration)
	// LoginFailed: a login did not get in. reason is the failure class (see
	// the Reason constants and authentication's classes); role is RoleUnknown
	// unless the role is known to exist or the client proved who it is, so
	// that unauthenticated clients cannot invent label values.
	LoginFailed(role, reason string)
	// ServerDialed: one attempt to open a server connection (TCP and TLS).
	ServerDialed(d time.Duration, err error)
	// Waited: a login that waited for a slot, admitted or not, after d.
	Waited(role string, d time.Duration, admitted bool)
	// SessionEnded: the totals of a session that had logged in (in: client
	// to server, out: server to client).
	SessionEnded(role, database string, bytesIn, bytesOut int64)
}

// RoleUnknown is the role an Observer is given for a failed login whose role
// is not known to exist.
const RoleUnknown = "unknown"

// Failure classes of LoginFailed besides authentication's own (wrong
// password, unknown role, role has no password, authentication timeout, ...).
const (
	ReasonTooMany         = "too many connections"
	ReasonRefusedByServer = "refused by server"
	ReasonServerError     = "server error" // unreachable, lost during login, admission could not query it
	ReasonClientLeft      = "client left"
	ReasonShutdown        = "shutting down"
	// The startup phase, before any role is known: a packet rolegate refused
	// (malformed, oversized, protocol 2, ...), a client that sent nothing
	// within startup_timeout, and a failure such as a client TLS handshake
	// that went wrong. A client that connects and hangs up without a word (a
	// TCP health check) is not counted.
	ReasonBadStartup     = "bad startup packet"
	ReasonStartupTimeout = "startup timeout"
	ReasonStartupFailed  = "startup failed"
)

type nopObserver struct{}

func (nopObserver) LoginDone(string, string, time.Duration)   {}
func (nopObserver) LoginFailed(string, string)                {}
func (nopObserver) ServerDialed(time.Duration, error)         {}
func (nopObserver) Waited(string, time.Duration, bool)        {}
func (nopObserver) SessionEnded(string, string, int64, int64) {}
