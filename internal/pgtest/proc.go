package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"time"
)

// What the clusters, the demo and the benchmark each need to start servers of
// their own next to PostgreSQL: a port, a password, and the moment a process
// listens.

// FreePort asks the kernel for a port nobody uses right now. Someone may take
// it before the process that is given it binds it; Start detects that and
// retries.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// RandomHex is n random bytes in hex, for throwaway passwords.
func RandomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // never fails, per crypto/rand
	return hex.EncodeToString(b)
}

// ErrExited is WaitListening's error for a process that ended first.
var ErrExited = errors.New("exited")

// WaitListening returns once addr accepts TCP connections, or an error when
// exited is closed first (ErrExited), ctx ends, or timeout passes. The errors
// name addr; the caller names the process.
func WaitListening(ctx context.Context, addr string, exited <-chan struct{}, timeout time.Duration) error {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		if conn, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			conn.Close()
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("%w before listening on %s", ErrExited, addr)
		case <-ctx.Done():
			return fmt.Errorf("interrupted while waiting for it to listen on %s: %w", addr, context.Cause(ctx))
		case <-deadline.C:
			return fmt.Errorf("did not listen on %s within %v", addr, timeout)
		case <-tick.C:
		}
	}
}
