package auth

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

// fakeSource knows the roles in secrets (a plaintext secret each) and counts
// the queries it answers. With hold set, a query waits until hold is closed
// or its context ends; err makes every query fail.
type fakeSource struct {
	mu         sync.Mutex
	secrets    map[string]string
	calls      map[string]int
	running    int // queries in progress
	maxRunning int
	hold       chan struct{}
	err        error
	entered    chan string // each query's role, as it starts
}

func newFakeSource(secrets map[string]string) *fakeSource {
	return &fakeSource{secrets: secrets, calls: map[string]int{}, entered: make(chan string, 1000)}
}

func (f *fakeSource) Secret(ctx context.Context, role string) (Secret, bool, error) {
	f.mu.Lock()
	f.calls[role]++
	f.running++
	f.maxRunning = max(f.maxRunning, f.running)
	hold, failWith := f.hold, f.err
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		f.running--
		f.mu.Unlock()
	}()
	f.entered <- role
	if hold != nil {
		select {
		case <-hold:
		case <-ctx.Done():
			return Secret{}, false, ctx.Err()
		}
	}
	if failWith != nil {
		return Secret{}, false, failWith
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	pw, ok := f.secrets[role]
	if !ok {
		return Secret{}, false, nil
	}
	return Secret{Kind: Plain, Plain: pw}, true, nil
}

func (f *fakeSource) set(role, pw string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.secrets[role] = pw
}

func (f *fakeSource) count(role string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[role]
}

func (f *fakeSource) total() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, c := range f.calls {
		n += c
	}
	return n
}

// block makes the next queries wait; the returned func lets them go.
func (f *fakeSource) block() (release func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	h := make(chan struct{})
	f.hold = h
	return func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		if f.hold == h {
			f.hold = nil
		}
		close(h)
	}
}

// waitEntered waits until a query for role has started.
func (f *fakeSource) waitEntered(t *testing.T, role string) {
	t.Helper()
	timeout := time.After(20 * time.Second)
	for {
		select {
		case r := <-f.entered:
			if r == role {
				return
			}
		case <-timeout:
			t.Fatalf("no query for %q started", role)
		}
	}
}

// waitFor polls cond until it holds, for states the test cannot be told of.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// waiters is the number of lookups of role in progress.
func (s *Store) waiters(role string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if f := s.flights[role]; f != nil {
		return f.waiters
	}
	return 0
}

func lookupPlain(t *testing.T, s *Store, role string) (string, bool) {
	t.Helper()
	a, err := s.Lookup(t.Context(), role)
	if err != nil {
		t.Fatalf("Lookup(%q): %v", role, err)
	}
	if a.StandIn {
		t.Fatalf("Lookup(%q) answered with a stand-in (%v), want a fresh answer", role, a.Err)
	}
	return a.Secret.Plain, a.Found
}

// A password changed at the source is what the next lookup returns, however
// long the TTL: a known role is asked for at every lookup.
func TestStoreAsksAtEveryLookup(t *testing.T) {
	src := newFakeSource(map[string]string{"r": "one"})
	s := NewStore(10, time.Hour, src)
	for i, want := range []string{"one", "one", "two", "three"} {
		if i == 2 {
			src.set("r", "two")
		}
		if i == 3 {
			src.set("r", "three")
		}
		if got, found := lookupPlain(t, s, "r"); !found || got != want {
			t.Fatalf("lookup %d = %q, %v; want %q", i+1, got, found, want)
		}
		if n := src.count("r"); n != i+1 {
			t.Fatalf("after lookup %d: %d queries, want one per lookup", i+1, n)
		}
	}
	if last, ok := s.Last("r"); !ok || last.Plain != "three" {
		t.Errorf("Last = %v, %v; want the last answer", last.Plain, ok)
	}
	s.Forget("r")
	if _, ok := s.Last("r"); ok {
		t.Error("Last after Forget still answers")
	}
}

// Unknown names cost one query each per TTL: N distinct names N queries,
// the same name repeated one; after the TTL one more each.
func TestStoreUnknownNameFlood(t *testing.T) {
	src := newFakeSource(map[string]string{"r": "pw"})
	now := time.Unix(1000, 0)
	var mu sync.Mutex
	s := NewStore(100, time.Minute, src)
	s.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }

	const n = 50
	for round := range 3 {
		for i := range n {
			if _, found := lookupPlain(t, s, fmt.Sprintf("ghost%d", i)); found {
				t.Fatal("an unknown name found")
			}
		}
		if got := src.total(); got != n {
			t.Fatalf("round %d: %d queries for %d distinct unknown names, want %d", round+1, got, n, n)
		}
	}
	for range 10 {
		lookupPlain(t, s, "ghost0")
	}
	if got := src.count("ghost0"); got != 1 {
		t.Fatalf("the same unknown name 11 times: %d queries, want 1", got)
	}
	mu.Lock()
	now = now.Add(time.Minute)
	mu.Unlock()
	lookupPlain(t, s, "ghost0")
	if got := src.count("ghost0"); got != 2 {
		t.Fatalf("after the TTL: %d queries for ghost0, want 2", got)
	}
	// A role created at the source after its name was remembered as unknown
	// is found once the TTL has passed.
	src.set("ghost1", "new")
	mu.Lock()
	now = now.Add(time.Minute)
	mu.Unlock()
	if pw, found := lookupPlain(t, s, "ghost1"); !found || pw != "new" {
		t.Fatalf("ghost1 after the TTL = %q, %v", pw, found)
	}
	// With TTL 0 nothing is remembered.
	src0 := newFakeSource(nil)
	s0 := NewStore(100, 0, src0)
	for range 3 {
		lookupPlain(t, s0, "ghost")
	}
	if got := src0.count("ghost"); got != 3 {
		t.Fatalf("TTL 0: %d queries for 3 lookups, want 3", got)
	}
}

// Concurrent lookups of one unknown name cost one query: those that arrive
// while it runs find the name remembered as unknown when it ends.
func TestStoreConcurrentUnknownName(t *testing.T) {
	src := newFakeSource(nil)
	s := NewStore(100, time.Minute, src)
	release := src.block()
	const n = 20
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			a, err := s.Lookup(t.Context(), "ghost")
			if err == nil && a.Found {
				err = errors.New("found")
			}
			errs <- err
		})
	}
	src.waitEntered(t, "ghost")
	waitFor(t, "all lookups waiting", func() bool { return s.waiters("ghost") == n })
	release()
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if got := src.count("ghost"); got != 1 {
		t.Errorf("%d concurrent lookups of one unknown name: %d queries, want 1", n, got)
	}
}

// Lookups of a role that arrive while a query for it runs never take that
// query's answer (it may predate them): they share the next query.
func TestStoreConcurrentLookupsShareTheNextQuery(t *testing.T) {
	src := newFakeSource(map[string]string{"r": "old"})
	s := NewStore(100, time.Minute, src)
	release := src.block()
	first := make(chan string, 1)
	go func() {
		a, _ := s.Lookup(t.Context(), "r")
		first <- a.Secret.Plain
	}()
	src.waitEntered(t, "r")
	// The password changes while the first query runs; lookups that start
	// now must see the new one.
	src.set("r", "new")
	const n = 10
	got := make(chan string, n)
	for range n {
		go func() {
			a, err := s.Lookup(t.Context(), "r")
			if err != nil || a.StandIn {
				got <- fmt.Sprintf("error %v, stand-in %v", err, a.StandIn)
				return
			}
			got <- a.Secret.Plain
		}()
	}
	waitFor(t, "the later lookups waiting", func() bool { return s.waiters("r") == n+1 })
	release()
	if pw := <-first; pw != "old" && pw != "new" {
		t.Errorf("first lookup: %q", pw)
	}
	for range n {
		if pw := <-got; pw != "new" {
			t.Errorf("a lookup that started after the change got %q, want new", pw)
		}
	}
	if c := src.count("r"); c != 2 {
		t.Errorf("%d queries, want 2: the first, and one shared by the %d that came during it", c, n)
	}
	if src.maxRunning != 1 {
		t.Errorf("%d queries of one role ran at once, want 1", src.maxRunning)
	}
}

// A slow source: a role with an answer younger than the TTL gets it as a
// stand-in after the patience; without one, the lookup waits until its
// context ends and fails.
func TestStoreSlowSource(t *testing.T) {
	src := newFakeSource(map[string]string{"r": "pw", "cold": "pw"})
	now := time.Unix(1000, 0)
	var mu sync.Mutex
	s := NewStoreWith(StoreOptions{Size: 10, TTL: time.Minute, Patience: 20 * time.Millisecond}, src)
	s.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	lookupPlain(t, s, "r")
	fetched := now

	release := src.block()
	defer release()
	a, err := s.Lookup(t.Context(), "r")
	if err != nil || !a.StandIn || !a.Found || a.Secret.Plain != "pw" || !a.Fetched.Equal(fetched) ||
		!errors.Is(a.Err, context.DeadlineExceeded) {
		t.Fatalf("slow source, recent answer: %+v, %v; want the stand-in, fetched %v, with a deadline error", a, err, fetched)
	}
	// The query was cut short with the lookup: nothing keeps running.
	waitFor(t, "the slow query cancelled", func() bool { src.mu.Lock(); defer src.mu.Unlock(); return src.running == 0 })

	// No stand-in: the lookup's own context bounds it.
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	if a, err := s.Lookup(ctx, "cold"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("slow source, no answer before: %+v, %v; want a deadline error", a, err)
	}
	// An answer older than the TTL does not stand in.
	mu.Lock()
	now = now.Add(time.Minute)
	mu.Unlock()
	ctx, cancel = context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	if a, err := s.Lookup(ctx, "r"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("slow source, answer older than the TTL: %+v, %v; want a deadline error", a, err)
	}
}

// A failing source: the stand-in, with the error, when there is one.
func TestStoreFailingSource(t *testing.T) {
	src := newFakeSource(map[string]string{"r": "pw"})
	s := NewStore(10, time.Minute, src)
	lookupPlain(t, s, "r")
	boom := errors.New("control connection down")
	src.mu.Lock()
	src.err = boom
	src.mu.Unlock()
	a, err := s.Lookup(t.Context(), "r")
	if err != nil || !a.StandIn || a.Secret.Plain != "pw" || !errors.Is(a.Err, boom) {
		t.Fatalf("failing source: %+v, %v; want the stand-in with the error", a, err)
	}
	if _, err := s.Lookup(t.Context(), "other"); !errors.Is(err, boom) {
		t.Fatalf("failing source, no answer before: %v; want its error", err)
	}
	// TTL 0: nothing stands in.
	s0 := NewStore(10, 0, src)
	if _, err := s0.Lookup(t.Context(), "r"); !errors.Is(err, boom) {
		t.Fatalf("TTL 0: %v; want the source's error", err)
	}
}

// A lookup whose client leaves while it runs the query does not fail the
// others waiting: one of them asks again.
func TestStoreLeaderLeaves(t *testing.T) {
	src := newFakeSource(map[string]string{"r": "pw"})
	s := NewStore(10, time.Minute, src)
	release := src.block()
	ctx, cancel := context.WithCancel(t.Context())
	leader := make(chan error, 1)
	go func() {
		_, err := s.Lookup(ctx, "r")
		leader <- err
	}()
	src.waitEntered(t, "r")
	other := make(chan Answer, 1)
	go func() {
		a, err := s.Lookup(t.Context(), "r")
		if err != nil {
			t.Errorf("the other lookup: %v", err)
		}
		other <- a
	}()
	waitFor(t, "the second lookup waiting", func() bool { return s.waiters("r") == 2 })
	cancel()
	if err := <-leader; !errors.Is(err, context.Canceled) {
		t.Fatalf("the leaving lookup: %v", err)
	}
	src.waitEntered(t, "r") // the other one asks again
	release()
	if a := <-other; !a.Found || a.Secret.Plain != "pw" || a.StandIn {
		t.Fatalf("the other lookup: %+v", a)
	}
}

// At most MaxFetches queries run at once over all roles; a userlist takes
// no turn.
func TestStoreMaxFetches(t *testing.T) {
	src := newFakeSource(map[string]string{"a": "1", "b": "2", "c": "3"})
	ul := Userlist{"local": {Kind: Plain, Plain: "file"}}
	s := NewStoreWith(StoreOptions{Size: 10, TTL: time.Minute, MaxFetches: 2}, ul, src)
	release := src.block()
	var wg sync.WaitGroup
	for _, role := range []string{"a", "b", "c"} {
		wg.Go(func() {
			if a, err := s.Lookup(t.Context(), role); err != nil || !a.Found {
				t.Errorf("Lookup(%q) = %+v, %v", role, a, err)
			}
		})
	}
	waitFor(t, "two queries running and a third lookup waiting", func() bool {
		src.mu.Lock()
		running := src.running
		src.mu.Unlock()
		s.mu.Lock()
		defer s.mu.Unlock()
		return running == 2 && len(s.flights) == 3
	})
	// The control connection's turns are taken; the userlist still answers.
	if pw, found := lookupPlain(t, s, "local"); !found || pw != "file" {
		t.Errorf("userlist role while the source is busy: %q, %v", pw, found)
	}
	release()
	wg.Wait()
	if src.maxRunning != 2 {
		t.Errorf("%d queries ran at once, want at most (and here exactly) 2", src.maxRunning)
	}
	if src.total() != 3 {
		t.Errorf("%d queries, want 3", src.total())
	}
}

// An unknown name remembered is answered after about as long as a query
// takes, so that its speed does not tell it from a known role; a userlist's
// answers, which take no query, do not count.
func TestStoreUnknownNameTakesAQuerysTime(t *testing.T) {
	now := time.Unix(1000, 0)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	took := 8 * time.Millisecond
	src := SourceFunc(func(context.Context, string) (Secret, bool, error) {
		mu.Lock()
		defer mu.Unlock()
		now = now.Add(took) // the query takes this long, by the store's clock
		return Secret{}, false, nil
	})
	s := NewStore(10, time.Minute, Userlist{"local": {Kind: Plain, Plain: "pw"}}, src)
	s.now = clock
	var slept []time.Duration
	s.sleep = func(_ context.Context, d time.Duration) { slept = append(slept, d) }

	lookupPlain(t, s, "local") // no query: no measure
	lookupPlain(t, s, "ghost") // a query of 8 ms
	lookupPlain(t, s, "ghost") // remembered: waits 8 ms
	took = 16 * time.Millisecond
	lookupPlain(t, s, "ghost2") // a query of 16 ms: average 8 + 8/8 = 9 ms
	lookupPlain(t, s, "ghost2")
	want := []time.Duration{8 * time.Millisecond, 9 * time.Millisecond}
	if fmt.Sprint(slept) != fmt.Sprint(want) {
		t.Errorf("remembered unknown names waited %v, want %v", slept, want)
	}
}

func TestStoreIterationsFromVerifiers(t *testing.T) {
	ctx := context.Background()
	v := NewSCRAMVerifier("pw", []byte("0123456789abcdef"), 10000)
	src := SourceFunc(func(_ context.Context, role string) (Secret, bool, error) {
		switch role {
		case "scram":
			return Secret{Kind: SCRAM, SCRAM: v}, true, nil
		case "md5":
			return Secret{Kind: MD5, MD5: MD5Hash("md5", "pw")}, true, nil
		}
		return Secret{}, false, nil
	})
	s := NewStore(10, time.Minute, src)
	if got := s.Iterations(); got != 0 {
		t.Fatalf("Iterations before any verifier = %d, want 0", got)
	}
	for _, role := range []string{"md5", "nobody"} {
		if _, err := s.Lookup(ctx, role); err != nil {
			t.Fatal(err)
		}
	}
	if got := s.Iterations(); got != 0 {
		t.Fatalf("Iterations after md5 and unknown roles = %d, want 0", got)
	}
	if _, err := s.Lookup(ctx, "scram"); err != nil {
		t.Fatal(err)
	}
	if got := s.Iterations(); got != 10000 {
		t.Fatalf("Iterations = %d, want the verifier's 10000", got)
	}
}
