package proxy

import (
	"encoding/binary"
	"testing"
)

// A server pid is one live backend's, but the server gives a free pid to a
// new backend, possibly before rolegate has noticed the old one's end. The
// key of the older session dies when the new one registers, and never
// reaches it; removing the older session later leaves the newer alone.
func TestRegistryPIDReuse(t *testing.T) {
	t.Parallel()
	r := newRegistry(nil)
	secret := func(s *session) []byte { return binary.BigEndian.AppendUint32(nil, s.cancelKey.secret) }

	old := &session{id: 1, backendPID: 4242, backendKey: []byte{1, 2, 3, 4}}
	r.add(old)
	if old.cancelKey.pid != 4242 || !old.hasKey {
		t.Fatalf("issued key %+v, want the server's pid 4242", old.cancelKey)
	}
	if r.lookup(4242, secret(old)) != old {
		t.Fatal("the issued key finds nothing")
	}
	if r.lookup(4242, []byte{1, 2, 3, 4}) != nil && old.cancelKey.secret != 0x01020304 {
		t.Fatal("the server's own secret finds the session")
	}
	oldSecret := secret(old)

	// The old backend exited; the server reuses its pid before old is removed.
	reused := &session{id: 2, backendPID: 4242, backendKey: []byte{5, 6, 7, 8}}
	r.add(reused)
	if reused.cancelKey.secret == old.cancelKey.secret {
		t.Fatal("the new session got the old session's secret")
	}
	if got := r.lookup(4242, oldSecret); got != nil {
		t.Fatalf("the old key finds session %d", got.id)
	}
	if r.lookup(4242, secret(reused)) != reused || r.byBackendPID(4242) != reused {
		t.Fatal("the new session is not found by its key and pid")
	}
	r.remove(old)
	if r.lookup(4242, secret(reused)) != reused || r.byBackendPID(4242) != reused || r.len() != 1 {
		t.Fatal("removing the old session forgot the new one")
	}
	r.remove(reused)
	r.remove(reused)
	if r.lookup(4242, secret(reused)) != nil || r.byBackendPID(4242) != nil || r.len() != 0 {
		t.Fatal("a removed session is still found")
	}

	// A server that sent no BackendKeyData: the session is listed, with no key.
	keyless := &session{id: 3}
	r.add(keyless)
	if keyless.hasKey || r.len() != 1 || len(r.byKey) != 0 {
		t.Fatalf("a session without a server key got a key: %+v", keyless.cancelKey)
	}
	r.remove(keyless)
}

// Keys must match exactly: a secret of another length, or another pid with
// the same secret, finds nothing.
func TestRegistryLookupExact(t *testing.T) {
	t.Parallel()
	r := newRegistry(nil)
	s := &session{id: 1, backendPID: 77, backendKey: []byte{0, 0, 0, 1}}
	r.add(s)
	k := s.cancelKey.secretBytes()
	for _, tt := range []struct {
		pid    uint32
		secret []byte
	}{
		{78, k},
		{77, k[:3]},
		{77, append(k[:4:4], 0)},
		{77, nil},
	} {
		if r.lookup(tt.pid, tt.secret) != nil {
			t.Errorf("lookup(%d, %x) found the session with key %d/%x", tt.pid, tt.secret, s.cancelKey.pid, k)
		}
	}
	if r.lookup(77, k) != s {
		t.Error("the issued key finds nothing")
	}
}

// A connection is listed from accept, before it has a server backend: it has
// no cancel key, and no lookup by pid finds it (pid 0 is no backend's).
func TestRegistryLoginInFlight(t *testing.T) {
	t.Parallel()
	r := newRegistry(nil)
	s := &session{id: 1}
	r.register(s)
	if got := r.snapshot(); len(got) != 1 || got[0].State != StateStartup || got[0].BackendPID != 0 {
		t.Fatalf("snapshot %+v, want one session in startup", got)
	}
	if r.byBackendPID(0) != nil || len(r.backendPIDs()) != 0 || len(r.byKey) != 0 || r.lookup(0, []byte{0, 0, 0, 0}) != nil {
		t.Fatalf("a login without a backend is found by pid or key: pids %v", r.backendPIDs())
	}
	// The server's BackendKeyData: the same session gets its pid and key.
	s.backendPID, s.backendKey = 99, []byte{1, 2, 3, 4}
	r.add(s)
	if r.len() != 1 || r.byBackendPID(99) != s || !r.backendPIDs()[99] || r.lookup(99, s.cancelKey.secretBytes()) != s {
		t.Fatal("the session that got its backend is not found by pid and key")
	}
	r.remove(s)
	if r.len() != 0 || r.byBackendPID(99) != nil || len(r.byKey) != 0 {
		t.Fatal("a removed session is still found")
	}
}

func TestOrdinal(t *testing.T) {
	t.Parallel()
	for n, want := range map[int]string{1: "1st", 2: "2nd", 3: "3rd", 4: "4th", 11: "11th", 12: "12th", 13: "13th",
		21: "21st", 22: "22nd", 101: "101st", 111: "111th", 112: "112th"} {
		if got := ordinal(n); got != want {
			t.Errorf("ordinal(%d) = %q, want %q", n, got, want)
		}
	}
	if got := (waitingFor{what: "waiting for x"}).String(); got != "waiting for x" {
		t.Errorf("a wait without a ticket reads %q", got)
	}
}
