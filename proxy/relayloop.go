package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"

	"github.com/rolegate/rolegate/internal/evloop"
	"github.com/rolegate/rolegate/internal/wire"
)

// Relay modes (proxy.toml's relay).
const (
	// RelayLoop relays plain TCP sessions on an epoll event loop (the
	// default); TLS sessions use goroutines.
	RelayLoop = "loop"
	// RelayGoroutines relays every session with two goroutines.
	RelayGoroutines = "goroutines"
)

// loopRelay follows one session relayed by the event loop: the same header
// scan, counters and eviction rewrite as the goroutine relay (pipe), run on
// the loop's goroutine. The session holds no goroutine while it lasts: its
// end (Closed) starts one that finishes the connection.
type loopRelay struct {
	c          *clientConn
	fromClient scanner
	fromServer scanner
	evs        []event
	terminated bool          // the client sent Terminate
	started    chan struct{} // closed once relayOnLoop is done with the connection
}

// relayOnLoop hands a logged-in plain TCP session to the Server's event
// loop, with what the login read ahead on either side. It reports false
// when the loop did not take it (TLS on a side, no loop, or the loop is
// closing): the caller relays it with goroutines, and still owns both
// sockets and readers. On true the connection is detached (see handle).
func (c *clientConn) relayOnLoop() bool {
	ct, cok := c.client.(*net.TCPConn)
	st, sok := c.server.(*net.TCPConn)
	loop := c.s.loop.Load()
	if loop == nil || !cok || !sok {
		return false
	}
	r := &loopRelay{c: c, fromClient: scanner{want: clientEvents}, fromServer: scanner{want: serverEvents},
		evs: make([]event, 0, 4), started: make(chan struct{})}
	defer close(r.started)
	// Detached before Add: Closed may run on the loop before Add returns.
	c.detached = true
	ls, err := loop.Add(ct, st, readAhead(c.cr), readAhead(c.sr), r)
	if err != nil {
		c.detached = false
		return false
	}
	c.cr, c.sr = nil, nil // Add copied what they had read ahead
	if c.ctx.Err() != nil {
		// A shutdown that began before the loop had the session: its
		// StopAll may have run before Add (Close cancels first, then stops).
		ls.Stop(context.Cause(c.ctx))
	}
	// The loop owns the sockets now (Add closed these net.Conns), and a
	// shutdown reaches the session through it (Server.Close, StopAll), not
	// through the connection's context: nothing of the sockets, the
	// context or the login stays with an idle session.
	c.stop()
	c.cancel(nil)
	c.client, c.server = nil, nil
	c.sockets.handedOff()
	c.startup = nil
	return true
}

// Farewell is what a client hears when rolegate's shutdown stops its
// session: PostgreSQL's fast-shutdown FATAL with rolegate's reason, when what
// it was sent so far ends at a message boundary (as sayShuttingDown); mid-
// message, or while an eviction is under way, nothing.
func (r *loopRelay) Farewell(why error) []byte {
	if !errors.Is(why, errShutdown) || r.fromServer.inside() || r.c.sess.evictMsg.Load() != nil {
		return nil
	}
	return wire.Encode(nil, wire.Error("FATAL", "57P01", "terminating connection because rolegate is shutting down"))
}

// Data scans what one side sent, as pipe does, and passes it on: the
// server's 57P01 of an eviction is replaced by rolegate's reason, after which
// the server is read only to see it close (its slot is then free).
func (r *loopRelay) Data(d evloop.Dir, buf []byte) ([]byte, *evloop.Stop) {
	sess := r.c.sess
	var err error
	if d == evloop.FromClient {
		r.evs, err = r.fromClient.scan(buf, r.evs[:0])
		sess.fromClient(r.evs, len(buf))
		if err != nil {
			return buf, &evloop.Stop{Why: fmt.Errorf("protocol error from client: %w", err)}
		}
		for _, e := range r.evs {
			if e.typ == 'X' {
				r.terminated = true
			}
		}
		return buf, nil
	}
	r.evs, err = r.fromServer.scan(buf, r.evs[:0])
	sess.fromServer(r.evs, len(buf))
	if err != nil {
		return buf, &evloop.Stop{Why: fmt.Errorf("protocol error from server: %w", err)}
	}
	out, stop := sess.replaceEvicted(buf, r.evs)
	if stop != nil {
		return out, &evloop.Stop{Why: stop, Drain: true}
	}
	return out, nil
}

// Closed is the end of the session: both sockets are closed, so the server's
// slot is free. It runs on the loop, which must not wait: a goroutine of
// the Server's (still counted in its handlers) finishes the connection.
func (r *loopRelay) Closed(why error) {
	switch {
	case errors.Is(why, evloop.ErrClientClosed):
		why = errClientClosed
	case errors.Is(why, evloop.ErrServerClosed) && r.terminated:
		why = errClientClosed // the server closes as soon as it reads Terminate
	case errors.Is(why, evloop.ErrServerClosed):
		why = errServerClosed
	}
	c := r.c
	c.sess.markServerGone()
	go func() {
		defer c.s.track(-1)
		<-r.started
		c.relayEnded(why)
		c.finish()
	}()
}
