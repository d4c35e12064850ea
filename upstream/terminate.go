package upstream

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/jackc/pgx/v5"
)

// Target is the backend Terminate may signal, as a census saw it. The
// guards are checked by the server in the statement that signals, so that
// the session the census chose is the one that ends, not whatever runs under
// its pid by the time the signal is sent.
type Target struct {
	PID uint32
	// BackendStart, when not zero, must still be the pid's backend_start:
	// a pid the server has given to a newer backend since is left alone.
	// Pass the census's value unchanged (not shifted to another clock): the
	// server compares it with its own, exactly.
	BackendStart time.Time
	// IdleSince, when not zero, must still be the backend's state_change,
	// with state 'idle': a session that ran a query or opened a transaction
	// since the census is left alone (evict-idle chose it for being idle).
	IdleSince time.Time
}

// Termination is what Terminate did.
type Termination int

// The outcomes of Terminate. Only Terminated means the backend was signalled.
const (
	// Terminated: the backend was signalled; with a timeout, it has also
	// exited.
	Terminated Termination = iota + 1
	// NoBackend: no backend has the pid (any more).
	NoBackend
	// Replaced: the pid belongs to another backend than the census saw
	// (its backend_start differs); it was not signalled.
	Replaced
	// NotIdle: the backend is no longer idle since the census (its state
	// or state_change differs); it was not signalled.
	NotIdle
	// NotGone: with a timeout, the backend was signalled but was still
	// there when the timeout passed (the server warns).
	NotGone
)

var terminationText = [...]string{
	Terminated: "terminated",
	NoBackend:  "it had already ended",
	Replaced:   "its pid belongs to a newer session than the one chosen",
	NotIdle:    "it is no longer idle since it was chosen",
	NotGone:    "it did not exit in time",
}

// String says what happened in words, for a log line or a client's DETAIL.
func (t Termination) String() string {
	if t > 0 && int(t) < len(terminationText) {
		return terminationText[t]
	}
	return fmt.Sprintf("Termination(%d)", int(t))
}

// The guards and the signal are one statement: CASE evaluates its branches
// in order and only as needed, so pg_terminate_backend runs only for a
// backend that passed both guards. pg_stat_get_activity(pid) is the row of
// pg_stat_activity for one pid, read fresh for the statement; no row means
// no such backend. A NULL guard is not checked. The numbers are
// Termination's values (TestTerminationValues holds them together).
const (
	terminateGuards = `SELECT CASE
	WHEN $2::timestamptz IS NOT NULL AND a.backend_start IS DISTINCT FROM $2::timestamptz THEN 3
	WHEN $3::timestamptz IS NOT NULL
		AND (a.state IS DISTINCT FROM 'idle' OR a.state_change IS DISTINCT FROM $3::timestamptz) THEN 4
	WHEN `
	// The one-argument form also works on servers before 14; false means
	// the pid was no backend when the signal was sent (NoBackend).
	terminateNow = terminateGuards + `pg_catalog.pg_terminate_backend(a.pid) THEN 1 ELSE 2 END
FROM pg_catalog.pg_stat_get_activity($1::int4) a`
	// The timeout form (14 and later); false means still there when the
	// timeout passed (NotGone).
	terminateWait = terminateGuards + `pg_catalog.pg_terminate_backend(a.pid, $4::int8) THEN 1 ELSE 5 END
FROM pg_catalog.pg_stat_get_activity($1::int4) a`
)

// Terminate runs pg_terminate_backend on t.PID, only if the backend still
// passes t's guards (see Target); a guard that fails is Replaced or NotIdle,
// not an error. With timeout 0 (or less) it signals the backend and returns
// at once. With a timeout (rounded up to whole milliseconds) the server
// waits until the process has gone: NotGone (with a server WARNING) means it
// was still there when the timeout passed. An unknown pid is NoBackend, not
// an error; so is 0, which Census never returns. A backend the control role
// may not signal (a superuser's, unless the control role is one; anyone's
// but its own roles' without pg_signal_backend) is an error.
//
// Without pg_read_all_stats the control role does not see the
// backend_start or state of other roles' sessions, so their guards never
// pass; Census then reports zero times, which mean no guard.
func (c *Control) Terminate(ctx context.Context, t Target, timeout time.Duration) (Termination, error) {
	if t.PID == 0 || t.PID > math.MaxInt32 {
		return NoBackend, nil
	}
	args := []any{int32(t.PID), timeArg(t.BackendStart), timeArg(t.IdleSince)}
	q := terminateNow
	if timeout > 0 {
		q = terminateWait
		args = append(args, int64((timeout+time.Millisecond-1)/time.Millisecond))
	}
	var r int32
	err := c.pool.QueryRow(ctx, q, args...).Scan(&r)
	switch {
	case err == nil:
		return Termination(r), nil
	case errors.Is(err, pgx.ErrNoRows):
		return NoBackend, nil
	}
	return 0, fmt.Errorf("terminate backend %d: %w", t.PID, err)
}

// presentQuery counts the target's row in pg_stat_activity: its pid, and
// its backend_start when the target has one (without pg_read_all_stats
// another role's backend_start reads NULL, and the census's zero time then
// means no guard, as in Terminate).
const presentQuery = `SELECT count(*) FROM pg_catalog.pg_stat_get_activity($1::int4) a
WHERE $2::timestamptz IS NULL OR a.backend_start IS NOT DISTINCT FROM $2::timestamptz`

// Present reports whether the backend t names is still in pg_stat_activity:
// false once it has left (a signalled backend leaves it just before the
// server frees its slot) or its pid belongs to a newer backend. It is the
// cheap check that admission repeats after signalling a victim without
// waiting, instead of pg_terminate_backend's timeout form, which looks only
// every 100 ms.
func (c *Control) Present(ctx context.Context, t Target) (bool, error) {
	if t.PID == 0 || t.PID > math.MaxInt32 {
		return false, nil
	}
	var n int64
	if err := c.pool.QueryRow(ctx, presentQuery, int32(t.PID), timeArg(t.BackendStart)).Scan(&n); err != nil {
		return false, fmt.Errorf("look for backend %d: %w", t.PID, err)
	}
	return n > 0, nil
}

// timeArg is a guard's parameter: NULL for the zero time (no guard).
func timeArg(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t
}
