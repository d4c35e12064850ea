package auth

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
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

// Defaults of StoreOptions.
const (
	// DefaultMaxFetches leaves room in a control pool of the default size (4)
	// for the census and the admission locks.
	DefaultMaxFetches = 2
	// DefaultPatience is long enough for a control query that has to open a
	// new connection on a busy server, and short enough that a login whose
	// role has a recent answer does not hang on a control connection in
	// trouble.
	DefaultPatience = time.Second
)

// StoreOptions configures a Store.
type StoreOptions struct {
	// Size bounds the roles whose last secret is remembered, and separately
	// the unknown names remembered (at least 1 each).
	Size int
	// TTL is how long a fetched secret may stand in for a fresh one when the
	// sources cannot answer in time, and how long a name no source knows is
	// answered as unknown without asking again. 0: neither; every lookup asks
	// and a failed one fails.
	TTL time.Duration
	// MaxFetches bounds the lookups that ask a source other than a userlist
	// at the same time, over all roles; more wait for a turn (0: DefaultMaxFetches).
	MaxFetches int
	// Patience is how long a lookup for a role with a stand-in waits for the
	// sources before it takes the stand-in (0: DefaultPatience).
	Patience time.Duration
}

// Store answers "what is this role's secret" from its sources, in order (the
// first that knows a role wins), and asks them at every lookup: a password
// changed on the server takes effect at the next login, as it does on the
// server. What it remembers only protects the sources from floods:
//
//   - A name no source knows is answered as unknown for TTL without asking
//     again (a client can invent any number of names; each costs one query
//     per TTL, and the same name repeated costs one). The answer comes after
//     about as long as a query takes (a moving average), so that it does
//     not tell a prober which names exist.
//   - A role's last answer stands in for a fresh one, for TTL after it was
//     fetched, when the sources fail or take longer than Patience.
//   - One query per role runs at a time, and a lookup only takes the answer
//     of a query that started after it did (so a concurrent login can never
//     hand it a secret older than its own start); lookups of one role that
//     arrive while a query runs share the next one.
//   - At most MaxFetches queries run at once over all roles.
//
// A userlist is a file in memory: it is asked like any source, but takes no
// turn among MaxFetches. (golang-lru's expirable cache is not used: it starts
// a goroutine that nothing can stop.)
type Store struct {
	sources  []Source
	ttl      time.Duration
	patience time.Duration
	slots    chan struct{} // one per query running over all roles
	now      func() time.Time

	mu      sync.Mutex
	known   *simplelru.LRU[string, known]     // last secret of each role
	unknown *simplelru.LRU[string, time.Time] // names no source knew, until when
	flights map[string]*flight                // roles being looked up
	// iterations is the count of the last SCRAM verifier a source returned.
	iterations atomic.Int64
	// typical is a moving average of the queries' durations (ns).
	typical atomic.Int64
	sleep   func(ctx context.Context, d time.Duration)
}

// known is a role's last secret and when the sources returned it.
type known struct {
	secret  Secret
	fetched time.Time
}

// flight is the state of the lookups of one role in progress. busy is held by
// the one lookup that runs a query; the others wait for done, which is closed
// and replaced when a query ends.
type flight struct {
	waiters int
	busy    chan struct{} // capacity 1
	done    chan struct{}
	started uint64 // queries started for the role
	gen     uint64 // the number of the query whose answer is kept below (0: none)
	answer  Answer
	err     error
}

// Answer is the result of a Lookup.
type Answer struct {
	Secret Secret
	Found  bool // false: no source knows the role
	// StandIn reports that the sources did not answer in time, or failed,
	// and Secret is their last answer, fetched at Fetched; Err says why.
	StandIn bool
	Fetched time.Time
	Err     error
}

// NewStore returns a Store with the default limits that remembers up to
// size roles for ttl (see StoreOptions).
func NewStore(size int, ttl time.Duration, sources ...Source) *Store {
	return NewStoreWith(StoreOptions{Size: size, TTL: ttl}, sources...)
}

// NewStoreWith returns a Store that asks sources in order.
func NewStoreWith(o StoreOptions, sources ...Source) *Store {
	if o.MaxFetches <= 0 {
		o.MaxFetches = DefaultMaxFetches
	}
	if o.Patience <= 0 {
		o.Patience = DefaultPatience
	}
	s := &Store{sources: sources, ttl: o.TTL, patience: o.Patience, now: time.Now, sleep: sleep,
		slots: make(chan struct{}, o.MaxFetches), flights: make(map[string]*flight)}
	var err error
	if s.known, err = simplelru.NewLRU[string, known](max(o.Size, 1), nil); err != nil {
		panic(err) // only for a size under 1
	}
	if s.unknown, err = simplelru.NewLRU[string, time.Time](max(o.Size, 1), nil); err != nil {
		panic(err)
	}
	return s
}

// Lookup returns role's secret as the sources say it now, or, when they
// cannot answer within Patience (or fail) and an answer younger than TTL
// exists, that answer marked StandIn. An unknown name remembered within TTL
// is answered at once. The error is the sources' (or ctx's) when nothing can
// stand in.
func (s *Store) Lookup(ctx context.Context, role string) (Answer, error) {
	s.mu.Lock()
	if s.isUnknown(role) {
		s.mu.Unlock()
		// Answer as late as a query would: a known role's login waits for
		// its query, and an unknown one must not stand out by its speed.
		s.sleep(ctx, time.Duration(s.typical.Load()))
		return Answer{}, nil
	}
	last, hasLast := s.known.Peek(role)
	standIn := hasLast && s.ttl > 0 && s.now().Sub(last.fetched) < s.ttl
	f := s.flights[role]
	if f == nil {
		f = &flight{busy: make(chan struct{}, 1), done: make(chan struct{})}
		s.flights[role] = f
	}
	f.waiters++
	after := f.started // only a query numbered above this started after this lookup
	s.mu.Unlock()
	defer s.leave(role, f)

	wctx := ctx
	if standIn {
		var cancel context.CancelFunc
		wctx, cancel = context.WithTimeout(ctx, s.patience)
		defer cancel()
	}
	a, err := s.fresh(wctx, role, f, after)
	if err != nil && standIn {
		return Answer{Secret: last.secret, Found: true, StandIn: true, Fetched: last.fetched, Err: err}, nil
	}
	return a, err
}

// fresh waits for the answer of a query of role that started after the
// lookup did (query number above after), running it when no other does.
func (s *Store) fresh(ctx context.Context, role string, f *flight, after uint64) (Answer, error) {
	for {
		s.mu.Lock()
		if s.isUnknown(role) { // a query that ran meanwhile found no such role
			s.mu.Unlock()
			return Answer{}, nil
		}
		if f.gen > after {
			a, err := f.answer, f.err
			s.mu.Unlock()
			return a, err
		}
		done := f.done
		s.mu.Unlock()
		select {
		case f.busy <- struct{}{}:
			a, err := s.run(ctx, role, f, after)
			<-f.busy
			if !errors.Is(err, errAnswered) {
				return a, err
			}
		case <-done:
		case <-ctx.Done():
			return Answer{}, context.Cause(ctx)
		}
	}
}

// errAnswered: a query that started after the lookup answered while it
// waited for its turn; the lookup takes that answer.
var errAnswered = errors.New("answered meanwhile")

// run asks the sources for role, holding f.busy, and keeps the answer for
// the lookups waiting on f.
func (s *Store) run(ctx context.Context, role string, f *flight, after uint64) (Answer, error) {
	s.mu.Lock()
	if f.gen > after || s.isUnknown(role) {
		s.mu.Unlock()
		return Answer{}, errAnswered
	}
	f.started++
	gen := f.started
	s.mu.Unlock()

	a, err := s.fetch(ctx, role)

	s.mu.Lock()
	defer s.mu.Unlock()
	// A query cut short by this lookup's own context (its client left, its
	// patience ran out) is no answer for the others: one of them asks again.
	if err == nil || ctx.Err() == nil {
		f.gen, f.answer, f.err = gen, a, err
	}
	close(f.done)
	f.done = make(chan struct{})
	return a, err
}

// leave ends a lookup's interest in role; the last one out forgets the flight.
func (s *Store) leave(role string, f *flight) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if f.waiters--; f.waiters == 0 {
		delete(s.flights, role)
	}
}

// fetch asks the sources in order and records the answer.
func (s *Store) fetch(ctx context.Context, role string) (Answer, error) {
	slot := false
	defer func() {
		if slot {
			<-s.slots
		}
	}()
	for _, src := range s.sources {
		_, local := src.(Userlist)
		if !local && !slot {
			select {
			case s.slots <- struct{}{}:
				slot = true
			case <-ctx.Done():
				return Answer{}, context.Cause(ctx)
			}
		}
		start := s.now()
		sec, found, err := src.Secret(ctx, role)
		if err != nil {
			return Answer{}, err
		}
		if !local {
			s.observe(s.now().Sub(start))
		}
		if found {
			if sec.Kind == SCRAM && sec.SCRAM != nil {
				s.iterations.Store(int64(sec.SCRAM.Iterations))
			}
			now := s.now()
			s.mu.Lock()
			s.known.Add(role, known{secret: sec, fetched: now})
			s.unknown.Remove(role)
			s.mu.Unlock()
			return Answer{Secret: sec, Found: true, Fetched: now}, nil
		}
	}
	s.mu.Lock()
	s.known.Remove(role)
	if s.ttl > 0 {
		s.unknown.Add(role, s.now().Add(s.ttl))
	}
	s.mu.Unlock()
	return Answer{}, nil
}

// observe adds a query's duration to the moving average (weight 1/8, the
// first one whole), capped
// at the patience so that one stuck query cannot slow every unknown name.
func (s *Store) observe(d time.Duration) {
	d = min(max(d, 0), s.patience)
	for {
		old := s.typical.Load()
		next := old + (int64(d)-old)/8
		if old == 0 {
			next = int64(d)
		}
		if s.typical.CompareAndSwap(old, next) {
			return
		}
	}
}

// sleep waits for d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) {
	if d <= 0 {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// isUnknown reports whether role is remembered as unknown; s.mu is held.
func (s *Store) isUnknown(role string) bool {
	until, ok := s.unknown.Peek(role)
	if ok && !s.now().Before(until) {
		s.unknown.Remove(role)
		return false
	}
	return ok
}

// Last returns the role's last secret the sources returned, of any age, or
// false. It is a guess, never a verifier: the proxy uses it to choose which
// authentication request to send the client while Lookup runs.
func (s *Store) Last(role string) (Secret, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k, ok := s.known.Peek(role)
	return k.secret, ok
}

// Iterations is the SCRAM iteration count of the last verifier the sources
// returned, 0 before any: the count the server gives its roles (its
// scram_iterations), which a mock exchange for an unknown role must offer too.
func (s *Store) Iterations() int {
	return int(s.iterations.Load())
}

// Forget drops what the store remembers of role (its last secret, or that
// it is unknown), so that nothing stands in for it.
func (s *Store) Forget(role string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.known.Remove(role)
	s.unknown.Remove(role)
}
