package proxy

import (
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rolegate/rolegate/limiter"
)

// State is where a session is in its life. A session is registered when its
// connection is accepted: the states up to StateConnecting are a login in
// flight (LoggingIn). The names from StateIdle on are pg_stat_activity's, so
// operators read them the same way in both places.
type State int32

// Session states.
const (
	StateStartup        State = iota // reading the startup packet, TLS
	StateAuthenticating              // the client proves who it is (to rolegate, or to the server in passthrough)
	StateWaiting                     // admission: waiting for a slot, the admission lock, an evicted session (SessionInfo.Wait says which)
	StateConnecting                  // admitted (or no limit): logging in to the server
	StateIdle
	StateActive
	StateIdleInTransaction
	StateIdleInFailedTransaction
	StateClosing
)

var stateNames = [...]string{
	StateStartup:                 "startup",
	StateAuthenticating:          "authenticating",
	StateWaiting:                 "waiting",
	StateConnecting:              "connecting",
	StateIdle:                    "idle",
	StateActive:                  "active",
	StateIdleInTransaction:       "idle in transaction",
	StateIdleInFailedTransaction: "idle in transaction (aborted)",
	StateClosing:                 "closing",
}

func (s State) String() string {
	if s >= 0 && int(s) < len(stateNames) {
		return stateNames[s]
	}
	return "unknown"
}

// LoggingIn reports whether a session in state s is a login in flight: it
// holds no slot yet and has not been handed to the client. A login in flight
// may already have a server backend (passthrough authenticates through it).
func (s State) LoggingIn() bool { return s <= StateConnecting }

// SessionInfo is a copied snapshot of one session, safe to keep and to hand to
// other packages: nothing in it changes after it is taken.
//
// User, Database and ApplicationName are empty until the client has proved
// who it is (Verified): before that they are only what the client claims, and
// an operator's view must not show names anyone can send (nor grow a metric
// label per name).
type SessionInfo struct {
	ID              uint64
	Verified        bool // the client proved who it is (rolegate's or the server's authentication)
	User            string
	Database        string
	ApplicationName string
	ClientAddr      string
	ClientTLS       bool
	ServerTLS       bool
	Replication     bool
	BackendPID      uint32 // the server's pid for this session; 0 before the server sent it (BackendKeyData)
	Start           time.Time
	State           State
	// Wait says what a session in StateWaiting waits for, e.g. `waiting for
	// a slot of role "app" (limit 3, 2nd in line)`; "" in other states.
	Wait         string
	LastActivity time.Time
	BytesIn      int64 // from client to server
	BytesOut     int64 // from server to client
}

// session is one client connection, registered from accept to close. id,
// clientAddr and start never change. The fields under mu are written only by
// the session's own goroutine, under mu (set), which reads them without the
// lock; other goroutines (snapshots, cancel requests) read them under mu, or
// after finding the session by pid or key in the registry, which happens
// after the fields they read were written. The rest are the session
// goroutine's own, or atomics written by the relay.
type session struct {
	id         uint64
	clientAddr string
	clientIP   netip.Addr // clientAddr's address; invalid for a Unix socket
	start      time.Time
	serverAuth string // how rolegate logged in to the server: a method, or "relayed" (passthrough)
	loggedIn   bool   // set by handle once the session holds its server slot

	mu          sync.Mutex
	user        string // as the client claims it until verified
	database    string
	appName     string
	replication bool
	clientTLS   bool
	serverTLS   bool
	verified    bool // the client proved who it is (rolegate's or the server's authentication)
	wait        waitingFor
	backendPID  uint32
	backendKey  []byte // the server's secret: never leaves rolegate but in a forwarded cancel

	cancelKey cancelKey // the key rolegate gave the client (registry.add sets it)
	hasKey    bool      // cancelKey was issued: the server sent a BackendKeyData

	// evictMsg, once set, replaces the server's 57P01 message to the client:
	// the session is being evicted and the client is told why.
	evictMsg atomic.Pointer[string]
	// serverGone is closed when the relay has stopped reading from the server,
	// which for an evicted session means its backend has left and its slot is free.
	serverGone     chan struct{}
	serverGoneOnce sync.Once

	state        atomic.Int32
	pending      atomic.Int64 // queries and syncs sent that await ReadyForQuery
	lastActivity atomic.Int64 // unix nanoseconds
	bytesIn      atomic.Int64
	bytesOut     atomic.Int64
}

// markServerGone closes serverGone once.
func (s *session) markServerGone() { s.serverGoneOnce.Do(func() { close(s.serverGone) }) }

func (s *session) setState(st State) { s.state.Store(int32(st)) }

// set runs f, which writes fields under mu, with mu held.
func (s *session) set(f func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f()
}

// waitingFor is what a login in StateWaiting waits for: what, and for a slot
// its limit and its place in line (ticket), read when a snapshot is taken
// because the line moves without the login doing anything.
type waitingFor struct {
	what   string
	limit  int
	ticket *limiter.Ticket
}

func (w waitingFor) String() string {
	if w.ticket == nil {
		return w.what
	}
	if n := w.ticket.Position(); n > 0 {
		return fmt.Sprintf("%s (limit %d, %s in line)", w.what, w.limit, ordinal(n))
	}
	return fmt.Sprintf("%s (limit %d)", w.what, w.limit)
}

// ordinal is 1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, 21st, ...
func ordinal(n int) string {
	suffix := "th"
	switch {
	case n%100 >= 11 && n%100 <= 13:
	case n%10 == 1:
		suffix = "st"
	case n%10 == 2:
		suffix = "nd"
	case n%10 == 3:
		suffix = "rd"
	}
	return fmt.Sprintf("%d%s", n, suffix)
}

// setWaiting puts the session in StateWaiting, waiting for w.
func (s *session) setWaiting(w waitingFor) {
	s.set(func() { s.wait = w })
	s.setState(StateWaiting)
}

func (s *session) touch(now time.Time) { s.lastActivity.Store(now.UnixNano()) }

func (s *session) info() SessionInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	i := SessionInfo{
		ID:           s.id,
		Verified:     s.verified,
		ClientAddr:   s.clientAddr,
		ClientTLS:    s.clientTLS,
		ServerTLS:    s.serverTLS,
		Replication:  s.replication,
		BackendPID:   s.backendPID,
		Start:        s.start,
		State:        State(s.state.Load()),
		LastActivity: time.Unix(0, s.lastActivity.Load()),
		BytesIn:      s.bytesIn.Load(),
		BytesOut:     s.bytesOut.Load(),
	}
	if s.verified {
		i.User, i.Database, i.ApplicationName = s.user, s.database, s.appName
	}
	if i.State == StateWaiting {
		i.Wait = s.wait.String()
	}
	return i
}

// serverSide is what a forwarded cancel request needs, read under mu: a
// retried server login replaces it while the session is registered.
func (s *session) serverSide() (pid uint32, key []byte, useTLS bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.backendPID, s.backendKey, s.serverTLS
}
