package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
)

// recordingConn records the size of every buffer read into, so that a test
// sees which buffer a pipe offered, including for the Read it is blocked in,
// and the length of every write.
type recordingConn struct {
	net.Conn
	mu       sync.Mutex
	sizes    []int
	returned int // Reads that have returned
	writes   []int
}

func (c *recordingConn) Read(b []byte) (int, error) {
	c.mu.Lock()
	c.sizes = append(c.sizes, len(b))
	c.mu.Unlock()
	n, err := c.Conn.Read(b)
	c.mu.Lock()
	c.returned++
	c.mu.Unlock()
	return n, err
}

// waiting returns the size of the buffer of the Read under way, if any.
func (c *recordingConn) waiting() (int, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.sizes) == c.returned {
		return 0, false
	}
	return c.sizes[len(c.sizes)-1], true
}

func (c *recordingConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	c.writes = append(c.writes, len(b))
	c.mu.Unlock()
	return c.Conn.Write(b)
}

func (c *recordingConn) reads() []int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.sizes)
}

// pipeRun is what one pipe relayed.
type pipeRun struct {
	out    []byte  // what reached the destination
	evs    []event // every event noted, without offsets
	noted  int     // bytes noted
	sizes  []int   // buffer size of each Read, the last one the Read that saw EOF
	writes []int   // length of each Write to the destination
	err    error   // pipe's result
}

// runPipe relays pending and then writes through pipe. The source is a
// net.Pipe, so a Read returns at most what is left of one Write: with a write
// longer than the buffer offered, the read fills it, as a socket read does when
// more is waiting.
func runPipe(t testing.TB, want *[256]bool, pending []byte, writes [][]byte) pipeRun {
	t.Helper()
	srcW, srcR := net.Pipe()
	dstW, dstR := net.Pipe()
	defer srcR.Close()
	defer dstR.Close()
	src := &recordingConn{Conn: srcR}
	dst := &recordingConn{Conn: dstW}
	outc := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(dstR)
		outc <- b
	}()
	var run pipeRun
	errc := make(chan error, 1)
	go func() {
		note := func(evs []event, n int) {
			run.evs = append(run.evs, withoutOffsets(slices.Clone(evs))...)
			run.noted += n
		}
		errc <- pipe(dst, src, pending, &scanner{want: want}, note, nil, io.EOF, "source", "destination")
		dstW.Close()
	}()
	for _, w := range writes {
		if _, err := srcW.Write(w); err != nil {
			t.Fatalf("write to the pipe's source: %v", err)
		}
	}
	srcW.Close()
	run.err = <-errc
	run.out = <-outc
	run.sizes = src.reads()
	run.writes = dst.writes
	return run
}

// wantReadSizes is the buffer each Read should get when pending and then
// writes, together stream, arrive one write at a time through a net.Pipe: the
// small buffer; the rest of the large one after a full small buffer that ends
// inside a message; the large one after a read that filled its buffer, or one
// into the large buffer that stopped inside a message; the small one again
// after any other read.
func wantReadSizes(stream []byte, pending int, writes [][]byte) []int {
	ends := messageEnds(stream)
	var sizes []int
	w, rest := -1, 0
	read := func(size int) (int, bool) { // what a Read of size returns; false: EOF
		sizes = append(sizes, size)
		for rest == 0 {
			if w++; w == len(writes) {
				return 0, false
			}
			rest = len(writes[w])
		}
		n := min(size, rest)
		rest -= n
		return n, true
	}
	pos, size := pending, smallBufSize
	for {
		n, ok := read(size)
		if !ok {
			return sizes
		}
		pos += n
		filled, large := n == size, size == largeBufSize
		if size == smallBufSize && filled && !ends[pos] {
			m, ok := read(largeBufSize - smallBufSize)
			if !ok {
				return sizes
			}
			pos += m
			filled, large = n+m == largeBufSize, true
		}
		size = smallBufSize
		if filled || large && !ends[pos] {
			size = largeBufSize
		}
	}
}

// messageEnds marks the offsets in stream where no message is under way: its
// start and the end of every message.
func messageEnds(stream []byte) map[int]bool {
	ends := map[int]bool{0: true}
	for pos := 0; pos+5 <= len(stream); {
		pos += 1 + int(binary.BigEndian.Uint32(stream[pos+1:]))
		ends[pos] = true
	}
	return ends
}

// checkRun checks that a run relayed stream intact, saw the events the
// reference framing finds in it, and ended cleanly.
func checkRun(t testing.TB, want *[256]bool, stream []byte, run pipeRun) {
	t.Helper()
	if !errors.Is(run.err, io.EOF) {
		t.Errorf("pipe returned %v, want the eof error", run.err)
	}
	if !bytes.Equal(run.out, stream) {
		i := 0
		for i < min(len(run.out), len(stream)) && run.out[i] == stream[i] {
			i++
		}
		t.Fatalf("relayed %d bytes, want %d; first difference at byte %d", len(run.out), len(stream), i)
	}
	if run.noted != len(stream) {
		t.Errorf("noted %d bytes, want %d", run.noted, len(stream))
	}
	wantEvs, err := refScan(want, stream)
	if err != nil {
		t.Fatalf("reference scan: %v", err)
	}
	if !slices.Equal(run.evs, wantEvs) {
		t.Errorf("events %v, want %v", summarize(run.evs), summarize(wantEvs))
	}
}

// summarize shortens a long event list for a failure message.
func summarize(evs []event) string {
	var b strings.Builder
	for i, e := range evs {
		if i == 40 {
			b.WriteString("...")
			break
		}
		b.WriteByte(e.typ)
		if e.first >= ' ' && e.first < 0x7f {
			b.WriteByte(e.first)
		}
		b.WriteByte(' ')
	}
	return b.String()
}

func split(b []byte, sizes ...int) [][]byte {
	var out [][]byte
	for _, n := range sizes {
		out = append(out, b[:n])
		b = b[n:]
	}
	if len(b) > 0 {
		out = append(out, b)
	}
	return out
}

// Small messages, a multi-megabyte one, small ones again: everything arrives in
// order and intact, every event is seen, the large buffer is used for the big
// message only, and between messages the pipe waits on its small buffer.
func TestPipeSmallBulkSmall(t *testing.T) {
	t.Parallel()
	var small [][]byte
	for i := range 50 {
		status := "ITE"[i%3]
		small = append(small, encodeAll(t, &pgproto3.DataRow{Values: [][]byte{[]byte("row")}},
			&pgproto3.CommandComplete{CommandTag: []byte("SELECT 1")}, &pgproto3.ReadyForQuery{TxStatus: status}))
	}
	big := encodeAll(t, &pgproto3.DataRow{Values: [][]byte{bytes.Repeat([]byte("0123456789"), 600_000)}},
		&pgproto3.ReadyForQuery{TxStatus: 'T'})
	var writes [][]byte
	writes = append(writes, small...)
	writes = append(writes, big)
	writes = append(writes, split(big, 100_000, 2_500_000)...) // the same again, in three writes
	writes = append(writes, small...)
	stream := bytes.Join(writes, nil)

	run := runPipe(t, serverEvents, nil, writes)
	checkRun(t, serverEvents, stream, run)
	if len(run.evs) != 102 {
		t.Errorf("%d ReadyForQuery events, want 102", len(run.evs))
	}
	if want := wantReadSizes(stream, 0, writes); !slices.Equal(run.sizes, want) {
		t.Errorf("read %d times into buffers %s, want %d times into %s", len(run.sizes), fmtSizes(run.sizes), len(want), fmtSizes(want))
	}
	if n := strings.Count(fmtSizes(run.sizes), "L"); n < 2*6_000_000/largeBufSize-2 {
		t.Errorf("only %d reads into the large buffer for 12 MB", n)
	}
	// The small messages around the big one never borrow the large buffer:
	// ordinary traffic (the select-only path) never touches it.
	head, tail := run.sizes[:len(small)+1], run.sizes[len(run.sizes)-len(small)-1:]
	for _, part := range [][]int{head, tail} {
		if strings.ContainsAny(fmtSizes(part), "LC") {
			t.Errorf("small messages read into %v, want the small buffer only", part)
		}
	}
}

// fmtSizes writes a read-size sequence as S (small), L (large) and C (the rest
// of the large buffer, after a full small one).
func fmtSizes(sizes []int) string {
	var b strings.Builder
	for _, s := range sizes {
		switch s {
		case smallBufSize:
			b.WriteByte('S')
		case largeBufSize:
			b.WriteByte('L')
		case largeBufSize - smallBufSize:
			b.WriteByte('C')
		default:
			b.WriteByte('?')
		}
	}
	return b.String()
}

// Written one byte at a time, a session is read one byte at a time into the
// small buffer, and the scanner still sees every message.
func TestPipeOneByteWrites(t *testing.T) {
	t.Parallel()
	for _, c := range bothSessions(t, 3000) {
		var writes [][]byte
		for i := range c.stream {
			writes = append(writes, c.stream[i:i+1])
		}
		run := runPipe(t, c.want, nil, writes)
		checkRun(t, c.want, c.stream, run)
		if s := fmtSizes(run.sizes); strings.ContainsAny(s, "LC") || len(s) != len(c.stream)+1 {
			t.Errorf("one-byte writes read as %d reads (%q...), want %d reads into the small buffer", len(s), s[:min(len(s), 20)], len(c.stream)+1)
		}
	}
}

// A full small buffer that ends inside a message is read on into the large
// buffer and written with it, even when it ends inside a header; one that ends
// between messages is written alone, since the next message may not be on its
// way. The large buffer goes back only between messages.
func TestPipeBufferSwitchAtMessageEdges(t *testing.T) {
	t.Parallel()
	row := func(total int) []byte { // a DataRow of exactly total bytes
		return encodeAll(t, &pgproto3.DataRow{Values: [][]byte{bytes.Repeat([]byte{'r'}, total-11)}})
	}
	ready := func(s byte) []byte { return encodeAll(t, &pgproto3.ReadyForQuery{TxStatus: s}) }
	for cut := 0; cut <= 6; cut++ {
		// The small buffer ends cut bytes into ReadyForQuery.
		stream := slices.Concat(row(smallBufSize-cut), ready('T'), row(50_000), ready('E'))
		writes := [][]byte{stream}
		run := runPipe(t, serverEvents, nil, writes)
		checkRun(t, serverEvents, stream, run)
		want := "SC" // the small buffer and the rest of the large one
		if cut == 0 || cut == 6 {
			want = "SL" // between messages: the small buffer alone, then the large one
		}
		if s := fmtSizes(run.sizes); !strings.HasPrefix(s, want) || s != fmtSizes(wantReadSizes(stream, 0, writes)) {
			t.Errorf("cut %d: reads %s, want %s...", cut, s, want)
		}
		// A full small buffer ends inside a message, and the rest comes in
		// later writes: the pipe waits for the next one before writing.
		stream = slices.Concat(row(3000-cut), ready('I'))
		writes = split(stream, smallBufSize, 500)
		run = runPipe(t, serverEvents, nil, writes)
		checkRun(t, serverEvents, stream, run)
		if s, want := fmtSizes(run.sizes), "SCLS"; s != want {
			t.Errorf("cut %d: reads %s, want %s", cut, s, want)
		}
		if want := []int{smallBufSize + 500, len(stream) - smallBufSize - 500}; !slices.Equal(run.writes, want) {
			t.Errorf("cut %d: wrote %v, want %v", cut, run.writes, want)
		}
		// A write ends cut bytes into ReadyForQuery: the large buffer's last
		// read of it is short, but the large buffer goes back to the pool
		// only between messages, where the peer may go quiet.
		stream = slices.Concat(row(40_000), ready('I'), row(100), ready('T'))
		writes = split(stream, 40_000+cut)
		run = runPipe(t, serverEvents, nil, writes)
		checkRun(t, serverEvents, stream, run)
		want = "SCLLS" // the rest of ReadyForQuery, and what follows, into the large buffer
		if cut == 0 || cut == 6 {
			want = "SCLSS"
		}
		if s := fmtSizes(run.sizes); s != want {
			t.Errorf("cut %d: reads %s, want %s", cut, s, want)
		}
	}
}

// A result a little over the small buffer takes two reads but one write: the
// destination is woken once, as with one large buffer.
func TestPipeMediumResultOneWrite(t *testing.T) {
	t.Parallel()
	result := encodeAll(t,
		&pgproto3.RowDescription{Fields: []pgproto3.FieldDescription{{Name: []byte("repeat"), DataTypeOID: 25, DataTypeSize: -1}}},
		&pgproto3.DataRow{Values: [][]byte{bytes.Repeat([]byte("x"), 3000)}},
		&pgproto3.CommandComplete{CommandTag: []byte("SELECT 1")},
		&pgproto3.ReadyForQuery{TxStatus: 'I'})
	writes := [][]byte{result, result, result}
	run := runPipe(t, serverEvents, nil, writes)
	checkRun(t, serverEvents, bytes.Join(writes, nil), run)
	if !slices.Equal(run.writes, []int{len(result), len(result), len(result)}) {
		t.Errorf("wrote %v, want each result in one write of %d", run.writes, len(result))
	}
	if s := fmtSizes(run.sizes); s != "SCSCSCS" {
		t.Errorf("reads %s, want SCSCSCS", s)
	}
}

// A stream that ends inside a message, after a full small buffer, is relayed as
// far as it goes.
func TestPipeEndsInsideMessage(t *testing.T) {
	t.Parallel()
	stream := encodeAll(t, &pgproto3.CopyData{Data: bytes.Repeat([]byte("x"), 10_000)})[:smallBufSize]
	run := runPipe(t, clientEvents, nil, [][]byte{stream})
	if !errors.Is(run.err, io.EOF) || !bytes.Equal(run.out, stream) {
		t.Errorf("relayed %d of %d bytes, %v", len(run.out), len(stream), run.err)
	}
	if s := fmtSizes(run.sizes); s != "SC" {
		t.Errorf("reads %s, want SC", s)
	}
}

// What the login phase read ahead is relayed first, and a header it leaves
// unfinished is finished by the socket.
func TestPipePendingBytes(t *testing.T) {
	t.Parallel()
	stream := clientSession(t, 20_000)
	for _, n := range []int{1, 3, 5, 6, 100, 4096} {
		run := runPipe(t, clientEvents, stream[:n], split(stream[n:], 7, 3000))
		checkRun(t, clientEvents, stream, run)
	}
}

// Random sessions cut into random writes: whatever the buffer switches, the
// bytes and the events are those of the stream.
func TestPipeRandomStreams(t *testing.T) {
	t.Parallel()
	rng := rand.New(rand.NewPCG(1, 2))
	types := []byte("ZEDCTdQSPBX")
	for range 40 {
		var stream []byte
		for range 1 + rng.IntN(200) {
			body := rng.IntN(200)
			switch rng.IntN(20) {
			case 0:
				body = rng.IntN(200_000)
			case 1:
				body = smallBufSize - 5 + rng.IntN(10)
			}
			b := make([]byte, body)
			if body > 0 {
				b[0] = "ITE"[rng.IntN(3)]
			}
			stream = append(stream, rawMsg(types[rng.IntN(len(types))], uint32(4+body), b)...)
		}
		var writes [][]byte
		for rest := stream; len(rest) > 0; {
			var n int
			switch rng.IntN(4) {
			case 0:
				n = 1 + rng.IntN(8)
			case 1:
				n = 1 + rng.IntN(3*smallBufSize)
			default:
				n = 1 + rng.IntN(3*largeBufSize)
			}
			n = min(n, len(rest))
			writes = append(writes, rest[:n])
			rest = rest[n:]
		}
		pending := 0
		if rng.IntN(2) == 0 && len(writes) > 1 {
			pending = len(writes[0])
		}
		for _, want := range []*[256]bool{serverEvents, clientEvents} {
			run := runPipe(t, want, stream[:pending], writes[min(pending, 1):])
			checkRun(t, want, stream, run)
			if want := wantReadSizes(stream, pending, writes[min(pending, 1):]); !slices.Equal(run.sizes, want) {
				t.Errorf("read sizes %s, want %s", fmtSizes(run.sizes), fmtSizes(want))
			}
		}
	}
}

// Over TCP, where reads return what the kernel has: small messages, 8 MB of
// COPY data in one message, small messages again, byte for byte; once the
// session is quiet, the pipe waits on its small buffer.
func TestPipeTCP(t *testing.T) {
	t.Parallel()
	queries := func(sql string) []byte {
		var msgs []pgproto3.Message
		for range 100 {
			msgs = append(msgs, &pgproto3.Query{String: sql})
		}
		return encodeAll(t, msgs...)
	}
	bulk := slices.Concat(queries("select 1"),
		encodeAll(t, &pgproto3.CopyData{Data: bytes.Repeat([]byte("1\tQ\n"), 2_000_000)}, &pgproto3.CopyDone{}, &pgproto3.Sync{}))
	tail := queries("select 2")

	srcW, srcConn := tcpPair(t)
	dstW, dstR := tcpPair(t)
	defer srcConn.Close()
	defer dstR.Close()
	src := &recordingConn{Conn: srcConn}
	var evs []event
	errc := make(chan error, 1)
	go func() {
		errc <- pipe(dstW, src, nil, &scanner{want: clientEvents}, func(e []event, _ int) { evs = append(evs, e...) }, nil, io.EOF, "source", "destination")
		dstW.Close()
	}()
	go func() {
		for rest := bulk; len(rest) > 0; {
			n := min(len(rest), 1+rand.IntN(100_000))
			if _, err := srcW.Write(rest[:n]); err != nil {
				return
			}
			rest = rest[n:]
		}
	}()
	expect := func(want []byte) {
		t.Helper()
		got := make([]byte, len(want))
		_ = dstR.SetReadDeadline(time.Now().Add(20 * time.Second))
		if _, err := io.ReadFull(dstR, got); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("relayed bytes differ from those sent (%v)", err)
		}
	}
	expect(bulk)
	if _, err := srcW.Write(tail); err != nil {
		t.Fatal(err)
	}
	expect(tail)
	// The pipe has written everything and waits for more: on the small buffer.
	var size int
	waitUntil(t, 10*time.Second, "the pipe to wait in Read", func() (ok bool) {
		size, ok = src.waiting()
		return ok
	})
	if size != smallBufSize {
		t.Errorf("quiet after bulk data, the pipe waits on a buffer of %d bytes, want %d", size, smallBufSize)
	}
	srcW.Close()
	if err := <-errc; !errors.Is(err, io.EOF) {
		t.Errorf("pipe returned %v", err)
	}
	if len(evs) != 201 {
		t.Errorf("%d events, want 200 queries and a Sync", len(evs))
	}
	if s := fmtSizes(src.reads()); !strings.Contains(s, "L") {
		t.Errorf("8 MB read without the large buffer: %s", s)
	}
}

// The login's bufio.Readers are garbage once what they read ahead has been
// relayed, while the session goes on.
func TestRelayReleasesLoginReaders(t *testing.T) {
	app, clientEnd := net.Pipe()
	serverEnd, backend := net.Pipe()
	defer app.Close()
	defer backend.Close()
	query := encodeAll(t, &pgproto3.Query{String: "select 1"})
	ready := encodeAll(t, &pgproto3.ReadyForQuery{TxStatus: 'I'})

	// Both readers hold a message read ahead of the login, as they do when a
	// client pipelines its first query or the server sends a notice early.
	freed := make(chan string, 2)
	readAheadOf := func(c net.Conn, peer net.Conn, msg []byte, name string) *bufio.Reader {
		go func() { _, _ = peer.Write(msg) }()
		r := bufio.NewReader(c)
		b, err := r.Peek(len(msg))
		if err != nil {
			t.Fatal(err)
		}
		runtime.AddCleanup(&b[0], func(name string) { freed <- name }, name)
		return r
	}
	cr := readAheadOf(clientEnd, app, query, "client reader")
	sr := readAheadOf(serverEnd, backend, ready, "server reader")

	s := &Server{log: slog.New(slog.DiscardHandler)}
	sess := &session{serverGone: make(chan struct{})}
	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	context.AfterFunc(ctx, func() { clientEnd.Close(); serverEnd.Close() }) // as handle does
	done := make(chan error, 1)
	go func(cr, sr *bufio.Reader) {
		done <- s.relay(ctx, cancel, sess, clientEnd, cr, serverEnd, sr)
	}(cr, sr)

	expect := func(c net.Conn, want []byte) {
		t.Helper()
		got := make([]byte, len(want))
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("read %q, %v; want %q", got, err, want)
		}
	}
	expect(backend, query)
	expect(app, ready)
	// The session is live and idle; both readers must be collectable.
	deadline := time.Now().Add(10 * time.Second)
	for got := 0; got < 2; {
		runtime.GC()
		select {
		case <-freed:
			got++
		case <-time.After(50 * time.Millisecond):
			if time.Now().After(deadline) {
				t.Fatalf("%d of the login's 2 bufio.Readers still referenced by the live session", 2-got)
			}
		}
	}
	// The session still works, and ends when the client leaves.
	go func() { _, _ = app.Write(query) }()
	expect(backend, query)
	app.Close()
	select {
	case err := <-done:
		if !errors.Is(err, errClientClosed) {
			t.Errorf("relay ended with %v, want %v", err, errClientClosed)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("relay did not end after the client left")
	}
	if got := sess.bytesIn.Load(); got != int64(2*len(query)) {
		t.Errorf("bytes in %d, want %d", got, 2*len(query))
	}
}
