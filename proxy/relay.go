package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rolegate/rolegate/internal/wire"
)

// Read buffer sizes of a relay direction. Most sessions sit idle most of the
// time, blocked in Read, and what a blocked Read holds is the buffer it was
// given: so a direction reads into a small buffer of its own, and borrows a large
// one from the pool only while bulk data (COPY, big results) flows, where larger
// reads and writes mean fewer system calls. The small size holds an ordinary
// exchange (a query, a few rows, ReadyForQuery) in one read; anything longer
// costs one more read, not one more write (see pipe).
const (
	smallBufSize = 2 << 10
	largeBufSize = 32 << 10
)

var largeBufs = sync.Pool{New: func() any { b := make([]byte, largeBufSize); return &b }}

// readBuf is one relay direction's read buffer: its own small buffer, and the
// pooled large one while bulk data flows.
type readBuf struct {
	small []byte
	large *[]byte // borrowed from largeBufs; nil when not in use
}

// next is the buffer for the next read.
func (b *readBuf) next() []byte {
	if b.large != nil {
		return *b.large
	}
	return b.small
}

// borrow returns the large buffer, borrowing it from the pool if need be.
func (b *readBuf) borrow() []byte {
	if b.large == nil {
		b.large = largeBufs.Get().(*[]byte)
	}
	return *b.large
}

// used picks the buffer for the next read after a read of n bytes into next(),
// once those bytes are written (the large buffer may go back to the pool).
// The large buffer serves the next read while more is sure or likely to come
// at once: the read filled its buffer (more is probably waiting), or it stopped
// inside a message (inside), whose sender owes the rest. Otherwise the read
// took all there was and the stream is between messages, where a peer may wait
// for an answer for a long time: the large buffer goes back first. (Data that
// ends exactly at a buffer's end looks like more to come, and a peer may stall
// inside a message: the large buffer then stays out until the next read
// returns or the session ends.)
func (b *readBuf) used(n int, inside bool) {
	if n == len(b.next()) || inside && b.large != nil {
		b.borrow()
		return
	}
	b.release()
}

// release returns the large buffer, if borrowed, to the pool.
func (b *readBuf) release() {
	if b.large != nil {
		largeBufs.Put(b.large)
		b.large = nil
	}
}

// Message types the relay follows. From the client: Query, Sync and FunctionCall
// each end in one ReadyForQuery; Terminate ends the session. From the server:
// ReadyForQuery, whose first body byte is the transaction status.
var (
	clientEvents = wantTypes('Q', 'S', 'F', 'X')
	serverEvents = wantTypes('Z', 'E')
)

func wantTypes(types ...byte) *[256]bool {
	var w [256]bool
	for _, t := range types {
		w[t] = true
	}
	return &w
}

// relay moves bytes both ways until either side ends, and returns why the session
// ended. The client-to-server goroutine is the only writer to server, this
// goroutine the only writer to client. Both are done when relay returns.
func (s *Server) relay(ctx context.Context, cancel context.CancelCauseFunc, sess *session,
	client net.Conn, cr *bufio.Reader, server net.Conn, sr *bufio.Reader) error {
	// The server closes its end as soon as it reads Terminate, often before the
	// client's own close is read here: that end is still the client's doing.
	var terminated atomic.Bool
	fromClient := func(evs []event, n int) {
		sess.fromClient(evs, n)
		for _, e := range evs {
			if e.typ == 'X' {
				terminated.Store(true)
			}
		}
	}
	done := make(chan struct{})
	// What the login phase read ahead goes to each pipe as an argument, which
	// nothing refers to once it is relayed: the login's bufio.Readers are then
	// garbage, not held for the whole session.
	go func(pending []byte) {
		defer close(done)
		defer recoverInto(cancel, s.log)
		err := pipe(server, client, pending, &scanner{want: clientEvents}, fromClient, nil, errClientClosed, "client", "server")
		if sess.evictMsg.Load() != nil {
			// An evicted client hangs up on its FATAL; closing the server
			// socket now would hide the server's own close, the moment the
			// slot is free, from the eviction waiting for it.
			select {
			case <-sess.serverGone:
			case <-time.After(victimGoneTimeout):
			}
		}
		cancel(err)
	}(readAhead(cr))
	func(pending []byte) {
		defer recoverInto(cancel, s.log)
		defer sess.markServerGone()
		sc := &scanner{want: serverEvents}
		err := pipe(client, server, pending, sc, sess.fromServer, sess.replaceEvicted, errServerClosed, "server", "client")
		if errors.Is(context.Cause(ctx), errShutdown) {
			sayShuttingDown(client, sc, sess)
			return
		}
		if errors.Is(err, errServerClosed) && terminated.Load() {
			err = errClientClosed
		}
		if sess.evictMsg.Load() != nil {
			// The server sends its FATAL before the backend exits and closes
			// the socket once it has left: wait for that, so that serverGone
			// means the slot is free.
			_ = server.SetReadDeadline(time.Now().Add(victimGoneTimeout))
			_, _ = io.Copy(io.Discard, server)
		}
		cancel(err)
	}(readAhead(sr))
	<-done
	return context.Cause(ctx)
}

// readAhead returns, without copying, the bytes r read ahead of what the login
// phase consumed (pipelined queries, the server's first notices); r is not read
// again.
func readAhead(r *bufio.Reader) []byte {
	b, _ := r.Peek(r.Buffered())
	return b
}

// shutdownNoticeTimeout bounds the write of the shutdown FATAL to a client
// that does not read: rolegate's shutdown must not wait on it.
const shutdownNoticeTimeout = time.Second

// sayShuttingDown ends a relayed session that rolegate's shutdown cut off
// from its server (sockets.cancelled closed the server side): the client gets
// the FATAL 57P01 that PostgreSQL's own fast shutdown sends, with rolegate's
// reason, when what it was sent so far ends at a message boundary, and then
// the connection closes, which also ends the other relay direction. Mid-
// message there is nothing to do but close: an error there would corrupt the
// stream. The relay is the client's only writer, so this goroutine writes it.
func sayShuttingDown(client net.Conn, sc *scanner, sess *session) {
	if !sc.inside() && sess.evictMsg.Load() == nil {
		_ = client.SetWriteDeadline(time.Now().Add(shutdownNoticeTimeout))
		_, _ = client.Write(wire.Encode(nil, wire.Error("FATAL", "57P01", "terminating connection because rolegate is shutting down")))
	}
	client.Close()
}

// recoverInto turns a panic in a relay goroutine into the end of its session.
func recoverInto(cancel context.CancelCauseFunc, log *slog.Logger) {
	if v := recover(); v != nil {
		log.Error("relay panicked; closing the session", "panic", v, "stack", string(debug.Stack()))
		cancel(fmt.Errorf("internal error: %v", v))
	}
}

// rewriter may replace part of a buffer at a message boundary; a non-nil error
// ends the pipe after the returned bytes are written.
type rewriter func(buf []byte, evs []event) ([]byte, error)

// pipe copies src to dst in whole buffers, starting with pending (what the login
// phase read ahead), and hands each buffer's events to note. It returns eof when
// src ends cleanly and a wrapped error otherwise.
func pipe(dst, src net.Conn, pending []byte, sc *scanner, note func([]event, int), rewrite rewriter, eof error, from, to string) error {
	rb := readBuf{small: make([]byte, smallBufSize)}
	defer rb.release()
	evs := make([]event, 0, 4) // grows to the most events one buffer has had
	forward := func(buf []byte) error {
		var serr error
		evs, serr = sc.scan(buf, evs[:0])
		note(evs, len(buf))
		if serr != nil {
			return fmt.Errorf("protocol error from %s: %w", from, serr)
		}
		out, stop := buf, error(nil)
		if rewrite != nil {
			out, stop = rewrite(out, evs)
		}
		if _, err := dst.Write(out); err != nil {
			return fmt.Errorf("write to %s: %w", to, err)
		}
		return stop
	}
	if len(pending) > 0 {
		if err := forward(pending); err != nil {
			return err
		}
	}
	for {
		buf := rb.next()
		n, rerr := src.Read(buf)
		if rerr == nil && n == smallBufSize && rb.large == nil && sc.endsInside(buf, evs[:0]) {
			// The small buffer is full and ends inside a message, whose sender
			// has the rest to send (no peer acts on part of a message): read on
			// into the large buffer and write both reads at once, so that a
			// result a little over the small size, or bulk data after a pause,
			// costs the destination no extra write and wake-up.
			large := rb.borrow()
			copy(large, buf)
			var m int
			m, rerr = src.Read(large[n:])
			buf, n = large, n+m
		}
		if n > 0 {
			if err := forward(buf[:n]); err != nil {
				return err
			}
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				return eof
			}
			return fmt.Errorf("read from %s: %w", from, rerr)
		}
		rb.used(n, sc.inside())
	}
}

// fromClient records a buffer read from the client.
func (s *session) fromClient(evs []event, n int) {
	now := time.Now()
	s.touch(now)
	s.bytesIn.Add(int64(n))
	for _, e := range evs {
		if e.typ == 'X' {
			s.setState(StateClosing)
			continue
		}
		s.pending.Add(1)
		s.setState(StateActive)
	}
}

// fromServer records a buffer read from the server.
func (s *session) fromServer(evs []event, n int) {
	s.bytesOut.Add(int64(n))
	for _, e := range evs {
		if e.typ != 'Z' {
			continue
		}
		// A ReadyForQuery the client did not ask for (none is unasked-for today)
		// must not drive the count negative.
		if s.pending.Add(-1) < 0 {
			s.pending.Store(0)
		}
		if s.pending.Load() == 0 {
			s.setState(txState(e.first))
			s.touch(time.Now())
		}
	}
}

// replaceEvicted swaps the server's FATAL 57P01 for rolegate's own message that
// says why, once the session is being evicted: the same SQLSTATE, so clients
// that look for it behave the same, and a text an operator can act on. The
// message is replaced whole at its boundary; nothing after it is forwarded (the
// server closes the connection right after it).
func (s *session) replaceEvicted(buf []byte, evs []event) ([]byte, error) {
	why := s.evictMsg.Load()
	if why == nil {
		return buf, nil
	}
	for _, e := range evs {
		if e.typ == 'E' && e.off >= 0 && isTermination(buf[e.off:]) {
			resp := wire.Error("FATAL", "57P01", *why)
			resp.Hint = terminationHint(*why)
			out := wire.Encode(buf[:e.off:e.off], resp)
			// The session ends for the reason its client is told: an
			// eviction or an operator's KILL.
			return out, errors.New(strings.TrimPrefix(*why, "terminating connection: "))
		}
	}
	return buf, nil
}

// terminationHint is the HINT of rolegate's 57P01: what the client can do.
// It follows from the message, which is all a peer instance's notice
// carries.
func terminationHint(msg string) string {
	if strings.Contains(msg, "rolegate evicted this session") {
		return "Connect again if you still need a session: the limit's policy ended the oldest (or longest-idle) " +
			"session to let a newer login in. SHOW EVICTIONS in rolegate's admin console lists the evictions; " +
			"an operator can protect sessions (protect) or change the policy."
	}
	return "Connect again if you still need a session, or ask the operator who ended it why."
}

// isTermination reports whether the ErrorResponse at the start of b is the
// server's 57P01, so that an ordinary error that arrives while an eviction is
// under way is passed on untouched. A message cut off by the buffer's end is
// taken to be the termination: nothing else is expected once the signal is sent.
func isTermination(b []byte) bool {
	if len(b) < 5 {
		return true
	}
	end := 1 + int(binary.BigEndian.Uint32(b[1:5]))
	if end > len(b) {
		return true
	}
	return bytes.Contains(b[5:end], []byte("C57P01\x00"))
}
