package proxy

import (
	"crypto/rand"
	"encoding/binary"
	"slices"
	"sync"
)

// cancelKey is the BackendKeyData rolegate issues to a client: a random process
// id and a random 4-byte secret (protocol 3.0), so the server's pids and keys never
// reach clients and a key dies with its session.
type cancelKey struct {
	pid    uint32
	secret uint32
}

func (k cancelKey) secretBytes() []byte {
	return binary.BigEndian.AppendUint32(nil, k.secret)
}

// registry holds the sessions that have logged in, by id and by cancel key.
type registry struct {
	mu       sync.Mutex
	sessions map[uint64]*session
	byKey    map[cancelKey]*session
}

func newRegistry() *registry {
	return &registry{sessions: make(map[uint64]*session), byKey: make(map[cancelKey]*session)}
}

// newCancelKey is a random BackendKeyData: a positive process ID, as the
// server's are, and a secret.
func newCancelKey() cancelKey {
	var b [8]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails on Linux
	return cancelKey{pid: binary.BigEndian.Uint32(b[:4]) & 0x7fffffff, secret: binary.BigEndian.Uint32(b[4:])}
}

// add registers s under a fresh random cancel key, which it stores in s.
func (r *registry) add(s *session) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		k := newCancelKey()
		if _, taken := r.byKey[k]; taken || k.pid == 0 {
			continue
		}
		s.cancelKey = k
		r.byKey[k] = s
		r.sessions[s.id] = s
		return
	}
}

// remove forgets s and its cancel key; removing twice is harmless.
func (r *registry) remove(s *session) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.sessions[s.id] == s {
		delete(r.sessions, s.id)
		delete(r.byKey, s.cancelKey)
	}
}

// lookup finds the session a CancelRequest names; the key must match exactly.
func (r *registry) lookup(pid uint32, secret []byte) *session {
	if len(secret) != 4 {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.byKey[cancelKey{pid: pid, secret: binary.BigEndian.Uint32(secret)}]
}

func (r *registry) snapshot() []SessionInfo {
	r.mu.Lock()
	out := make([]SessionInfo, 0, len(r.sessions))
	for _, s := range r.sessions {
		out = append(out, s.info())
	}
	r.mu.Unlock()
	slices.SortFunc(out, func(a, b SessionInfo) int { return a.Start.Compare(b.Start) })
	return out
}

func (r *registry) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.sessions)
}

// byBackendPID finds the session rolegate holds for a server backend.
func (r *registry) byBackendPID(pid uint32) *session {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, s := range r.sessions {
		if s.backendPID == pid {
			return s
		}
	}
	return nil
}

// backendPIDs returns the server pids of the sessions rolegate holds.
func (r *registry) backendPIDs() map[uint32]bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	pids := make(map[uint32]bool, len(r.sessions))
	for _, s := range r.sessions {
		pids[s.backendPID] = true
	}
	return pids
}
