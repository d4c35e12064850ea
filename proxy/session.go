package proxy

import (
	"sync"
	"sync/atomic"
	"time"
)

// State is where a session is in its life. The names after StateIdle are
// pg_stat_activity's, so operators read them the same way in both places.
type State int32

// Session states.
const (
	StateStartup State = iota // reading the startup packet, TLS
	StateAuthenticating
	StateIdle
	StateActive
	StateIdleInTransaction
	StateIdleInFailedTransaction
	StateClosing
)

var stateNames = [...]string{
	StateStartup:                 "startup",
	StateAuthenticating:          "authenticating",
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

// SessionInfo is a copied snapshot of one session, safe to keep and to hand to
// other packages: nothing in it changes after it is taken.
type SessionInfo struct {
	ID              uint64
	User            string
	Database        string
	ApplicationName string
	ClientAddr      string
	ClientTLS       bool
	ServerTLS       bool
	Replication     bool
	BackendPID      uint32 // the server's pid for this session; 0 before login completes
	Start           time.Time
	State           State
	LastActivity    time.Time
	BytesIn         int64 // from client to server
	BytesOut        int64 // from server to client
}

// session is one client connection. Fields set before the session is registered
// are immutable afterwards; the rest are atomics written by the relay.
type session struct {
	id          uint64
	clientAddr  string
	start       time.Time
	user        string
	database    string
	appName     string
	replication bool
	clientTLS   bool
	serverTLS   bool
	serverAuth  string // how rolegate logged in to the server: a method, or "relayed" (passthrough)

	loggedIn   bool // set by handle once the session holds its server slot
	verified   bool // the client proved who it is (rolegate's or the server's authentication)
	backendPID uint32
	backendKey []byte    // the server's secret: never leaves rolegate but in a forwarded cancel
	cancelKey  cancelKey // the key rolegate gave the client (registry.add sets it)
	hasKey     bool      // cancelKey was issued: the server sent a BackendKeyData

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

func (s *session) touch(now time.Time) { s.lastActivity.Store(now.UnixNano()) }

func (s *session) info() SessionInfo {
	return SessionInfo{
		ID:              s.id,
		User:            s.user,
		Database:        s.database,
		ApplicationName: s.appName,
		ClientAddr:      s.clientAddr,
		ClientTLS:       s.clientTLS,
		ServerTLS:       s.serverTLS,
		Replication:     s.replication,
		BackendPID:      s.backendPID,
		Start:           s.start,
		State:           State(s.state.Load()),
		LastActivity:    time.Unix(0, s.lastActivity.Load()),
		BytesIn:         s.bytesIn.Load(),
		BytesOut:        s.bytesOut.Load(),
	}
}
