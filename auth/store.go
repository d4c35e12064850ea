package auth

import (
	"context"
	"fmt"
	"os"
	"sync/atomic"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
)

// Source yields a role's stored secret. found is false for a role the source
// does not know; err is for a source that could not answer.
type Source interface {
	Secret(ctx context.Context, role string) (s Secret, found bool, err error)
}

// SourceFunc adapts a function to a Source (the control connection's auth query
// is one; cmd/rolegate wires it).
type SourceFunc func(ctx context.Context, role string) (Secret, bool, error)

// Secret calls f.
func (f SourceFunc) Secret(ctx context.Context, role string) (Secret, bool, error) {
	return f(ctx, role)
}

// Userlist is a Source read from a PgBouncer-style auth_file.
type Userlist map[string]Secret

// LoadUserlist reads an auth_file; errors name the file and line, never a secret.
func LoadUserlist(path string) (Userlist, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("userlist: %w", err)
	}
	defer f.Close()
	m, err := ParseUserlist(f)
	if err != nil {
		return nil, fmt.Errorf("userlist %s: %w", path, err)
	}
	return Userlist(m), nil
}

// Secret looks role up in the file.
func (u Userlist) Secret(_ context.Context, role string) (Secret, bool, error) {
	s, ok := u[role]
	return s, ok, nil
}

// entry is a cached answer: unknown roles are cached too, so a client guessing
// role names costs one query per name and TTL, not one per attempt.
type entry struct {
	secret    Secret
	found     bool
	refreshed bool // fetched by Refresh, after a failed login
	fetched   time.Time
	expires   time.Time
}

// minRefresh spaces out the refreshes of one role that follow each other:
// failed logins trigger them, and a client guessing passwords must not turn
// every guess into a query. The first failure after a lookup always refreshes,
// so a password changed on the server still takes effect at once.
const minRefresh = time.Second

// Store answers "what is this role's secret" from its sources, in order, with
// an LRU cache in front whose entries expire after a TTL. A password changed on
// the server reaches the cache through Refresh, which the proxy calls after a
// failed login. (golang-lru's expirable cache is not used: it starts a
// goroutine that nothing can stop.)
type Store struct {
	sources []Source
	ttl     time.Duration
	now     func() time.Time
	cache   *lru.Cache[string, entry]
	// iterations is the count of the last SCRAM verifier a source returned.
	iterations atomic.Int64
}

// NewStore returns a Store that asks sources in order (the first that knows a
// role wins) and caches up to size answers for ttl. ttl 0 disables caching.
func NewStore(size int, ttl time.Duration, sources ...Source) *Store {
	s := &Store{sources: sources, ttl: ttl, now: time.Now}
	if ttl > 0 {
		var err error
		if s.cache, err = lru.New[string, entry](max(size, 1)); err != nil {
			panic(err) // only for a size under 1
		}
	}
	return s
}

// Lookup returns role's secret, from the cache when it holds one.
func (s *Store) Lookup(ctx context.Context, role string) (Secret, bool, error) {
	if s.cache != nil {
		if e, ok := s.cache.Get(role); ok && s.now().Before(e.expires) {
			return e.secret, e.found, nil
		}
	}
	return s.fetch(ctx, role)
}

// Refresh asks the sources again, bypassing and then updating the cache, but
// returns the cached answer when a refresh fetched it less than a second ago.
func (s *Store) Refresh(ctx context.Context, role string) (Secret, bool, error) {
	if s.cache != nil {
		if e, ok := s.cache.Peek(role); ok && e.refreshed && s.now().Sub(e.fetched) < minRefresh {
			return e.secret, e.found, nil
		}
	}
	sec, found, err := s.fetch(ctx, role)
	if err == nil && s.cache != nil {
		if e, ok := s.cache.Peek(role); ok {
			e.refreshed = true
			s.cache.Add(role, e)
		}
	}
	return sec, found, err
}

func (s *Store) fetch(ctx context.Context, role string) (Secret, bool, error) {
	for _, src := range s.sources {
		sec, found, err := src.Secret(ctx, role)
		if err != nil {
			return Secret{}, false, err
		}
		if found {
			if sec.Kind == SCRAM && sec.SCRAM != nil {
				s.iterations.Store(int64(sec.SCRAM.Iterations))
			}
			s.put(role, entry{secret: sec, found: true})
			return sec, true, nil
		}
	}
	s.put(role, entry{})
	return Secret{}, false, nil
}

// Iterations is the SCRAM iteration count of the last verifier the sources
// returned, 0 before any: the count the server gives its roles (its
// scram_iterations), which a mock exchange for an unknown role must offer too.
func (s *Store) Iterations() int {
	return int(s.iterations.Load())
}

// Forget drops role from the cache, so that the next login asks the sources.
func (s *Store) Forget(role string) {
	if s.cache != nil {
		s.cache.Remove(role)
	}
}

func (s *Store) put(role string, e entry) {
	if s.cache != nil {
		e.fetched = s.now()
		e.expires = e.fetched.Add(s.ttl)
		s.cache.Add(role, e)
	}
}

// Same reports whether two secrets are the same stored value, to tell whether a
// Refresh found a changed password.
func Same(a, b Secret) bool {
	if a.Kind != b.Kind {
		return false
	}
	switch a.Kind {
	case SCRAM:
		return a.SCRAM.String() == b.SCRAM.String()
	case MD5:
		return a.MD5 == b.MD5
	case Plain:
		return a.Plain == b.Plain
	}
	return true
}
