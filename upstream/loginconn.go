package upstream

import (
	"errors"
	"net"
	"time"
)

// LoginConn is a server connection while a login runs on it, after Dial: it
// bounds each of the server's turns by connect_timeout and names the step in
// its errors. A turn starts when rolegate writes to the server (the server owes
// an answer from then) or when Begin says so; the time rolegate spends waiting
// for its own client (passthrough) is not the server's and is not counted.
// Reads and writes fail with a *DialError. Not safe for concurrent use; once the
// login is done, use the connection underneath.
type LoginConn struct {
	net.Conn
	address string
	timeout time.Duration
	limit   time.Time // the login's own deadline, never passed
	step    Step
	bounded bool // the current deadline is connect_timeout's, not limit's
}

// LoginConn wraps conn, freshly dialed, for a login that must be over by limit
// (the client's startup deadline; zero for none).
func (d *Dialer) LoginConn(conn net.Conn, limit time.Time) *LoginConn {
	return &LoginConn{Conn: conn, address: d.address, timeout: d.timeout, limit: limit}
}

// Begin starts a server turn at step: the server has connect_timeout from now
// (or until the login's deadline, if that comes first) to answer.
func (c *LoginConn) Begin(step Step) {
	c.step = step
	deadline := time.Now().Add(c.timeout)
	c.bounded = c.limit.IsZero() || deadline.Before(c.limit)
	if !c.bounded {
		deadline = c.limit
	}
	_ = c.Conn.SetDeadline(deadline)
}

// Write sends an authentication response (the startup message goes through
// Begin(StepStartup) and the connection underneath) and starts the server's
// turn to answer it.
func (c *LoginConn) Write(b []byte) (int, error) {
	c.Begin(StepAuth)
	n, err := c.Conn.Write(b)
	return n, c.Fail(err)
}

// Read reads the server's answer within the current turn.
func (c *LoginConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	return n, c.Fail(err)
}

// Fail returns err as a *DialError of the current step, unless it is one
// already (or nil).
func (c *LoginConn) Fail(err error) error {
	var de *DialError
	if err == nil || errors.As(err, &de) {
		return err
	}
	de = &DialError{Address: c.address, Step: c.step, Err: err}
	if c.bounded && isTimeout(err) {
		de.Timeout = c.timeout
	}
	return de
}
