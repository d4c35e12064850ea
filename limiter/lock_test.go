package limiter

import (
	"context"
	"errors"
	"runtime"
	"testing"
)

// refs is how many holders and waiters the lock for key has (0: no entry).
func (l *Limiter) refs(key string) int { return l.locks.Refs(key) }

// untilRefs yields until key has n holders and waiters: a waiter counts
// itself before it blocks, so this is how a test knows it is blocked.
func untilRefs(l *Limiter, key string, n int) {
	for l.refs(key) != n {
		runtime.Gosched()
	}
}

func TestLockSerializes(t *testing.T) {
	l := New(newClock().Now)
	ctx := context.Background()
	unlock, err := l.Lock(ctx, "app")
	if err != nil {
		t.Fatal(err)
	}
	// Another role and the database of the same name are independent.
	u2, err := l.Lock(ctx, "other")
	if err != nil {
		t.Fatal(err)
	}
	u3, err := l.LockDatabase(ctx, "app")
	if err != nil {
		t.Fatal(err)
	}
	u2()
	u3()

	acquired := make(chan func())
	go func() {
		u, err := l.Lock(ctx, "app")
		if err != nil {
			panic(err)
		}
		acquired <- u
	}()
	untilRefs(l, "role\x00app", 2)
	select {
	case <-acquired:
		t.Fatal("second Lock did not wait")
	default:
	}
	unlock()
	unlock() // twice is harmless and must not release the next holder
	second := <-acquired
	if n := l.refs("role\x00app"); n != 1 {
		t.Fatalf("refs %d after hand-over, want 1", n)
	}
	second()
	if l.locks.Len() != 0 {
		t.Fatalf("lock entries left: %d", l.locks.Len())
	}
}

func TestLockContext(t *testing.T) {
	l := New(newClock().Now)
	unlock, err := l.Lock(context.Background(), "app")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancelCause(context.Background())
	why := errors.New("client went away")
	errc := make(chan error)
	go func() {
		u, err := l.Lock(ctx, "app")
		u() // a no-op on failure, so deferring it is safe
		errc <- err
	}()
	untilRefs(l, "role\x00app", 2)
	cancel(why)
	if err := <-errc; !errors.Is(err, why) {
		t.Fatalf("Lock returned %v, want the context's cause", err)
	}
	if n := l.refs("role\x00app"); n != 1 {
		t.Fatalf("refs %d after a cancelled waiter, want 1", n)
	}
	unlock()

	// A context that is already done fails even when the lock is free.
	if _, err := l.Lock(ctx, "app"); !errors.Is(err, why) {
		t.Fatalf("Lock with a done context: %v", err)
	}
	if l.locks.Len() != 0 {
		t.Fatalf("lock entries left: %d", l.locks.Len())
	}
}

// TestLockMany: many goroutines over few keys, with the race detector; the
// protected counter shows mutual exclusion.
func TestLockMany(t *testing.T) {
	l := New(newClock().Now)
	keys := []string{"a", "b", "c"}
	counts := make([]int, len(keys))
	done := make(chan struct{})
	const workers, rounds = 8, 50
	for w := range workers {
		go func() {
			defer func() { done <- struct{}{} }()
			for r := range rounds {
				i := (w + r) % len(keys)
				unlock, err := l.Lock(context.Background(), keys[i])
				if err != nil {
					panic(err)
				}
				counts[i]++ // data race unless Lock excludes
				unlock()
			}
		}()
	}
	for range workers {
		<-done
	}
	if counts[0]+counts[1]+counts[2] != workers*rounds || l.locks.Len() != 0 {
		t.Fatalf("counts %v, entries %d", counts, l.locks.Len())
	}
}
