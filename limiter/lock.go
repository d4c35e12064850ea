package limiter

import (
	"context"
	"sync"
)

// Lock serializes admissions of one role within this rolegate. The proxy
// holds it across census, Decide and the evictions (and reserves an admitted
// login's slot before it unlocks), so that two logins of the role never
// decide on the same census and the limit is exact here. With a server that
// has advisory locks the proxy takes those instead, which serialize this
// instance's logins and the instances'. unlock is safe to call more than
// once.
//
// Lock waits until the role is free or ctx ends; then it returns ctx's cause
// and a no-op unlock (so a deferred unlock is harmless). Waiters acquire
// roughly in arrival order: they queue on one channel, and Go wakes a
// channel's blocked senders first come, first served.
func (l *Limiter) Lock(ctx context.Context, role string) (unlock func(), err error) {
	return l.lock(ctx, "role\x00"+role)
}

// LockDatabase does for a database what Lock does for a role. Logins of
// different roles into one database are not serialized by Lock, so a caller
// that wants the database limit exact takes LockDatabase too, for databases
// that have a limit, always after Lock (one order, so no deadlock).
func (l *Limiter) LockDatabase(ctx context.Context, database string) (unlock func(), err error) {
	return l.lock(ctx, "database\x00"+database)
}

// keyLock is one role's or database's lock: a token in ch while held. refs
// counts holders and waiters, so the entry is deleted when nobody uses it and
// the map does not grow with every role ever seen.
type keyLock struct {
	ch   chan struct{}
	refs int
}

func (l *Limiter) lock(ctx context.Context, key string) (func(), error) {
	if ctx.Err() != nil {
		return func() {}, context.Cause(ctx)
	}
	l.mu.Lock()
	k := l.locks[key]
	if k == nil {
		k = &keyLock{ch: make(chan struct{}, 1)}
		l.locks[key] = k
	}
	k.refs++
	l.mu.Unlock()

	select {
	case k.ch <- struct{}{}:
		var once sync.Once
		return func() {
			once.Do(func() {
				<-k.ch
				l.unref(key, k)
			})
		}, nil
	case <-ctx.Done():
		l.unref(key, k)
		return func() {}, context.Cause(ctx)
	}
}

func (l *Limiter) unref(key string, k *keyLock) {
	l.mu.Lock()
	defer l.mu.Unlock()
	k.refs--
	if k.refs == 0 {
		delete(l.locks, key)
	}
}
