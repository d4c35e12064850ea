package keylock

import (
	"context"
	"errors"
	"runtime"
	"testing"
)

// untilRefs yields until key has n holders and waiters.
func untilRefs(m *Map[string], key string, n int) {
	for m.Refs(key) != n {
		runtime.Gosched()
	}
}

func TestLockHandsOver(t *testing.T) {
	var m Map[string]
	ctx := context.Background()
	unlock, err := m.Lock(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	other, err := m.Lock(ctx, "b") // another key does not wait
	if err != nil {
		t.Fatal(err)
	}
	other()
	got := make(chan func())
	go func() {
		u, err := m.Lock(ctx, "a")
		if err != nil {
			panic(err)
		}
		got <- u
	}()
	untilRefs(&m, "a", 2)
	unlock()
	unlock() // twice must not release the next holder
	second := <-got
	if n := m.Refs("a"); n != 1 {
		t.Fatalf("refs %d after hand-over, want 1", n)
	}
	second()
	if n := m.Len(); n != 0 {
		t.Fatalf("%d entries left", n)
	}
}

func TestLockCancelled(t *testing.T) {
	var m Map[int]
	unlock, err := m.Lock(context.Background(), 1)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancelCause(context.Background())
	why := errors.New("login ended")
	errc := make(chan error)
	go func() {
		u, err := m.Lock(ctx, 1)
		u() // a no-op on failure
		errc <- err
	}()
	for m.Refs(1) != 2 {
		runtime.Gosched()
	}
	cancel(why)
	if err := <-errc; !errors.Is(err, why) {
		t.Fatalf("Lock returned %v, want the context's cause", err)
	}
	unlock()
	if _, err := m.Lock(ctx, 1); !errors.Is(err, why) {
		t.Fatalf("Lock with a done context: %v", err)
	}
	if n := m.Len(); n != 0 {
		t.Fatalf("%d entries left", n)
	}
}
