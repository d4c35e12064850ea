// Package keylock is a mutex per key: a caller locks a name (a role, a
// database) and waits only for holders of the same name. Entries exist
// while the key is held or waited for, so the map does not grow with every
// key ever seen. The limiter's in-process admission locks and the in-process
// half of upstream's advisory locks are both one of these.
package keylock

import (
	"context"
	"sync"
)

// Map is a set of per-key locks. Its zero value is ready to use; it must not
// be copied after first use.
type Map[K comparable] struct {
	mu      sync.Mutex
	entries map[K]*entry
}

// entry is one key's lock: a token in ch while held. refs counts holders and
// waiters, so that the entry is deleted when nobody uses it.
type entry struct {
	ch   chan struct{}
	refs int
}

// Lock waits until key is free or ctx ends. It returns an unlock that is
// safe to call more than once; when ctx ends first (or had ended), it
// returns ctx's cause and a no-op unlock, so a deferred unlock is harmless
// either way. Waiters acquire roughly in arrival order: they queue on one
// channel, and Go wakes a channel's blocked senders first come, first served.
func (m *Map[K]) Lock(ctx context.Context, key K) (unlock func(), err error) {
	if ctx.Err() != nil {
		return func() {}, context.Cause(ctx)
	}
	m.mu.Lock()
	if m.entries == nil {
		m.entries = make(map[K]*entry)
	}
	e := m.entries[key]
	if e == nil {
		e = &entry{ch: make(chan struct{}, 1)}
		m.entries[key] = e
	}
	e.refs++
	m.mu.Unlock()

	select {
	case e.ch <- struct{}{}:
		var once sync.Once
		return func() {
			once.Do(func() {
				<-e.ch
				m.unref(key, e)
			})
		}, nil
	case <-ctx.Done():
		m.unref(key, e)
		return func() {}, context.Cause(ctx)
	}
}

func (m *Map[K]) unref(key K, e *entry) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if e.refs--; e.refs == 0 {
		delete(m.entries, key)
	}
}

// Refs is how many holders and waiters key has (0: no entry). A waiter
// counts itself before it blocks, so a test that sees Refs rise knows a
// waiter is queued.
func (m *Map[K]) Refs(key K) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	if e := m.entries[key]; e != nil {
		return e.refs
	}
	return 0
}

// Len is how many keys are held or waited for.
func (m *Map[K]) Len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.entries)
}
