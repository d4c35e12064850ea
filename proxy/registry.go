package proxy

import (
	"crypto/rand"
	"encoding/binary"
	"net/netip"
	"slices"
	"sync"
)

// cancelKey is the BackendKeyData rolegate issues to a client: the server's
// real process id, so that pg_backend_pid(), pg_stat_activity and the pid a
// driver reports agree, and a secret of rolegate's own (4 bytes, protocol 3.0),
// so that the server's secret never reaches clients and a key dies with its
// session. The pid is public; only the secret protects a cancel.
type cancelKey struct {
	pid    uint32
	secret uint32
}

func (k cancelKey) secretBytes() []byte {
	return binary.BigEndian.AppendUint32(nil, k.secret)
}

// registry holds every client connection from accept to close, by id (logins
// in flight included, whatever their state), and the sessions that have a
// server backend by cancel key and by server pid: only those get a key.
type registry struct {
	mu       sync.Mutex
	sessions map[uint64]*session
	byKey    map[cancelKey]*session
	// byPID is the newest session registered for each server pid: a pid is
	// one live backend's, but the session of a backend that has just exited
	// may still be registered when the server gives its pid to a new one.
	byPID map[uint32]*session
	// tag, when tagged, is the first byte of every secret (newRegistry).
	tag    byte
	tagged bool
}

// newRegistry is an empty registry; with cluster, the secrets of the keys it
// issues carry cluster.Tag in their first byte (Cluster).
func newRegistry(cluster *Cluster) *registry {
	r := &registry{sessions: make(map[uint64]*session), byKey: make(map[cancelKey]*session),
		byPID: make(map[uint32]*session)}
	if cluster != nil {
		r.tag, r.tagged = cluster.Tag, true
	}
	return r
}

// secret is the secret of a new cancel key: newSecret's, with the
// instance's tag in its first byte when there is a cluster (24 random bits
// are left: a guess still needs millions of cancel requests).
func (r *registry) secret() uint32 {
	s := newSecret()
	if r.tagged {
		s = uint32(r.tag)<<24 | s&0xffffff
	}
	return s
}

// newSecret is the secret of a cancel key rolegate issues: unpredictable, so
// that knowing a session's pid (which is public) is not enough to cancel its
// queries. Every secret rolegate issues comes from here.
func newSecret() uint32 {
	var b [4]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails on Linux
	return binary.BigEndian.Uint32(b[:])
}

// consoleCancelKey is the BackendKeyData of an admin console session, which
// has no server backend: a random positive pid, as clients expect one, with a
// secret that matches nothing (the key is never registered, so a
// CancelRequest with it is ignored).
func consoleCancelKey() cancelKey {
	var b [4]byte
	_, _ = rand.Read(b[:])
	pid := binary.BigEndian.Uint32(b[:]) & 0x7fffffff
	if pid == 0 {
		pid = 1
	}
	return cancelKey{pid: pid, secret: newSecret()}
}

// register lists s from the moment its connection is accepted, before the
// client has sent anything: it has no server pid and no cancel key yet.
func (r *registry) register(s *session) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.sessions[s.id] = s
}

// add registers s's server backend, when the server's BackendKeyData arrived
// (or, without one, when the login completes); s need not have been
// registered before. A session whose server sent a BackendKeyData (backendKey
// set) gets a cancel key of the server's pid and a fresh secret, which add
// stores in s.cancelKey; one without gets none. A session still registered
// under the same server pid is of a backend that has exited (the server
// reuses only a free pid): its key is forgotten at once, so that it can never
// reach the new backend, and the new secret differs from it.
func (r *registry) add(s *session) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.dropKey(s) // a session that logs in again (a retried server login) keeps one key
	var stale uint32
	var hadStale bool
	if old := r.byPID[s.backendPID]; old != nil && old != s && s.backendPID != 0 {
		stale, hadStale = old.cancelKey.secret, old.hasKey
		r.dropKey(old)
	}
	r.sessions[s.id] = s
	if s.backendPID != 0 {
		r.byPID[s.backendPID] = s
	}
	if s.backendKey == nil {
		return
	}
	for {
		k := cancelKey{pid: s.backendPID, secret: r.secret()}
		if _, taken := r.byKey[k]; taken || (hadStale && k.secret == stale) {
			continue
		}
		s.cancelKey, s.hasKey = k, true
		r.byKey[k] = s
		return
	}
}

// dropKey forgets s's cancel key if it is registered to s; r.mu is held.
func (r *registry) dropKey(s *session) {
	if s.hasKey && r.byKey[s.cancelKey] == s {
		delete(r.byKey, s.cancelKey)
	}
}

// remove forgets s and its cancel key; removing twice is harmless.
func (r *registry) remove(s *session) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.sessions[s.id] == s {
		delete(r.sessions, s.id)
		r.dropKey(s)
		if r.byPID[s.backendPID] == s {
			delete(r.byPID, s.backendPID)
		}
	}
}

// lookup finds the session a CancelRequest names. The key must be exactly
// one rolegate issued to a live session: the server's pid and rolegate's
// 4-byte secret, all of it.
func (r *registry) lookup(pid uint32, secret []byte) *session {
	if len(secret) != 4 {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.byKey[cancelKey{pid: pid, secret: binary.BigEndian.Uint32(secret)}]
}

// snapshot copies every session. Each session is copied under its own lock,
// not the registry's: accepting and ending connections never waits for a
// snapshot of thousands of sessions.
func (r *registry) snapshot() []SessionInfo {
	r.mu.Lock()
	all := make([]*session, 0, len(r.sessions))
	for _, s := range r.sessions {
		all = append(all, s)
	}
	r.mu.Unlock()
	out := make([]SessionInfo, 0, len(all))
	for _, s := range all {
		out = append(out, s.info())
	}
	slices.SortFunc(out, func(a, b SessionInfo) int { return a.Start.Compare(b.Start) })
	return out
}

func (r *registry) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.sessions)
}

// byBackendPID finds the session rolegate holds for a server backend: the
// newest registered under that pid, as an older one's backend has exited.
func (r *registry) byBackendPID(pid uint32) *session {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.byPID[pid]
}

// backendPIDs returns the server pids of the sessions rolegate holds: only
// those with a backend (a login in flight has none yet, and must not match
// pid 0).
func (r *registry) backendPIDs() map[uint32]bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	pids := make(map[uint32]bool, len(r.byPID))
	for pid := range r.byPID {
		pids[pid] = true
	}
	return pids
}

// origins maps the backend pids of the sessions rolegate relays to their
// clients' addresses (invalid for a Unix socket client).
func (r *registry) origins() map[uint32]netip.Addr {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[uint32]netip.Addr, len(r.byPID))
	for pid, s := range r.byPID {
		out[pid] = s.clientIP
	}
	return out
}

// addrOf is the address of a client address string (host:port), invalid
// for anything else (a Unix socket's path, "").
func addrOf(hostport string) netip.Addr {
	ap, err := netip.ParseAddrPort(hostport)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}
