package limiter

import (
	"context"
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
// roughly in arrival order (internal/keylock).
func (l *Limiter) Lock(ctx context.Context, role string) (unlock func(), err error) {
	return l.locks.Lock(ctx, "role\x00"+role)
}

// LockDatabase does for a database what Lock does for a role. Logins of
// different roles into one database are not serialized by Lock, so a caller
// that wants the database limit exact takes LockDatabase too, for databases
// that have a limit, always after Lock (one order, so no deadlock).
func (l *Limiter) LockDatabase(ctx context.Context, database string) (unlock func(), err error) {
	return l.locks.Lock(ctx, "database\x00"+database)
}
