//go:build linux

package evloop

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// recorder is a Handler that counts what passes, may rewrite or stop on a
// marker, and reports how the session ended.
type recorder struct {
	bytes    [2]atomic.Int64
	onData   func(d Dir, buf []byte) ([]byte, *Stop) // nil: pass through
	farewell []byte
	ended    chan error
}

func (r *recorder) Farewell(error) []byte { return r.farewell }

func newRecorder() *recorder { return &recorder{ended: make(chan error, 1)} }

func (r *recorder) Data(d Dir, buf []byte) ([]byte, *Stop) {
	r.bytes[d].Add(int64(len(buf)))
	if r.onData != nil {
		return r.onData(d, buf)
	}
	return buf, nil
}

func (r *recorder) Closed(why error) { r.ended <- why }

func (r *recorder) wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-r.ended:
		return err
	case <-time.After(time.Minute):
		t.Fatal("the session did not end within a minute")
	}
	return nil
}

// pair is a relayed session: the test holds client (what a PostgreSQL
// client would hold) and server (the server's end).
type pair struct {
	client, server net.Conn
	s              *Session
	rec            *recorder
}

// relay connects a client and a server through l.
func relay(t *testing.T, l *Loop, rec *recorder, toServer, toClient []byte) *pair {
	t.Helper()
	front, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer front.Close()
	back, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer back.Close()
	client, err := net.Dial("tcp", front.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	proxyClient, err := front.Accept()
	if err != nil {
		t.Fatal(err)
	}
	proxyServer, err := net.Dial("tcp", back.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server, err := back.Accept()
	if err != nil {
		t.Fatal(err)
	}
	s, err := l.Add(proxyClient.(*net.TCPConn), proxyServer.(*net.TCPConn), toServer, toClient, rec)
	if err != nil {
		t.Fatal(err)
	}
	p := &pair{client: client, server: server, s: s, rec: rec}
	t.Cleanup(func() { client.Close(); server.Close() })
	return p
}

func newLoop(t *testing.T) *Loop {
	t.Helper()
	l, err := New(Config{ReadSize: 16 << 10})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// readN reads exactly n bytes from c, with a generous deadline.
func readN(t *testing.T, c net.Conn, n int) []byte {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(time.Minute))
	b := make([]byte, n)
	if _, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

// Bytes read ahead before the hand-over go first; then split and coalesced
// writes arrive whole and in order, both ways.
func TestRelayBothWays(t *testing.T) {
	l := newLoop(t)
	p := relay(t, l, newRecorder(), []byte("ahead-to-server;"), []byte("ahead-to-client;"))
	if got := readN(t, p.server, 16); string(got) != "ahead-to-server;" {
		t.Fatalf("server got %q first", got)
	}
	if got := readN(t, p.client, 16); string(got) != "ahead-to-client;" {
		t.Fatalf("client got %q first", got)
	}
	msg := bytes.Repeat([]byte("0123456789"), 1000)
	for _, chunk := range [][]byte{msg[:1], msg[1:7], msg[7:5000], msg[5000:]} {
		if _, err := p.client.Write(chunk); err != nil {
			t.Fatal(err)
		}
	}
	if got := readN(t, p.server, len(msg)); !bytes.Equal(got, msg) {
		t.Fatal("server got the client's bytes changed")
	}
	if _, err := p.server.Write(msg); err != nil {
		t.Fatal(err)
	}
	if got := readN(t, p.client, len(msg)); !bytes.Equal(got, msg) {
		t.Fatal("client got the server's bytes changed")
	}
	if in, out := p.rec.bytes[FromClient].Load(), p.rec.bytes[FromServer].Load(); in != int64(16+len(msg)) || out != int64(16+len(msg)) {
		t.Fatalf("handler saw %d bytes from the client and %d from the server", in, out)
	}
	p.client.Close()
	if err := p.rec.wait(t); !errors.Is(err, ErrClientClosed) {
		t.Fatalf("ended with %v, want ErrClientClosed", err)
	}
	_ = p.server.SetReadDeadline(time.Now().Add(time.Minute))
	if n, err := p.server.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("server end after the client left: %d, %v; want EOF", n, err)
	}
}

// 50 MB each way at once, checked by hash, through a small read buffer: the
// loop keeps each direction's bytes in order while the other flows.
func TestRelayBulk(t *testing.T) {
	l := newLoop(t)
	p := relay(t, l, newRecorder(), nil, nil)
	const size = 50 << 20
	var wg sync.WaitGroup
	sums := make(chan [2][32]byte, 2)
	pump := func(from, to net.Conn, seed uint64) {
		src := rand.New(rand.NewPCG(seed, 1))
		want, got := sha256.New(), sha256.New()
		wg.Go(func() {
			buf := make([]byte, 256<<10)
			for left := size; left > 0; {
				n := min(left, 1+src.IntN(len(buf)))
				for i := range buf[:n] {
					buf[i] = byte(src.Uint32())
				}
				want.Write(buf[:n])
				if _, err := from.Write(buf[:n]); err != nil {
					t.Errorf("write: %v", err)
					return
				}
				left -= n
			}
		})
		wg.Go(func() {
			_ = to.SetReadDeadline(time.Now().Add(5 * time.Minute))
			if _, err := io.CopyN(got, to, size); err != nil {
				t.Errorf("read: %v", err)
			}
		})
		go func() {
			wg.Wait()
			sums <- [2][32]byte{[32]byte(want.Sum(nil)), [32]byte(got.Sum(nil))}
		}()
	}
	pump(p.client, p.server, 1)
	pump(p.server, p.client, 2)
	for range 2 {
		s := <-sums
		if s[0] != s[1] {
			t.Fatal("the bytes relayed differ from the bytes sent")
		}
	}
}

// A client that stops reading: what the server sends waits in the loop's
// backlog (and the server side is not read meanwhile); once the client
// reads again everything arrives, in order.
func TestRelaySlowReader(t *testing.T) {
	l := newLoop(t)
	p := relay(t, l, newRecorder(), nil, nil)
	const size = 32 << 20
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(i * 7)
	}
	var sent atomic.Int64
	done := make(chan error, 1)
	go func() {
		for off := 0; off < size; off += 64 << 10 {
			n, err := p.server.Write(data[off : off+64<<10])
			sent.Add(int64(n))
			if err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	// The client reads nothing until the server has written more than the
	// loopback buffers on both legs hold, or all of it.
	deadline := time.Now().Add(time.Minute)
	for sent.Load() < 8<<20 && time.Now().Before(deadline) {
		select {
		case err := <-done:
			done <- err
			deadline = time.Now()
		default:
			time.Sleep(time.Millisecond)
		}
	}
	got := readN(t, p.client, size)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("a slow reader got the bytes changed or out of order")
	}
}

// The server's close ends the session once the client has everything the
// server sent before it.
func TestServerCloses(t *testing.T) {
	l := newLoop(t)
	p := relay(t, l, newRecorder(), nil, nil)
	last := bytes.Repeat([]byte("x"), 3<<20)
	go func() {
		_, _ = p.server.Write(last)
		p.server.Close()
	}()
	if got := readN(t, p.client, len(last)); !bytes.Equal(got, last) {
		t.Fatal("client did not get the server's last bytes")
	}
	if err := p.rec.wait(t); !errors.Is(err, ErrServerClosed) {
		t.Fatalf("ended with %v, want ErrServerClosed", err)
	}
	_ = p.client.SetReadDeadline(time.Now().Add(time.Minute))
	if n, err := p.client.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("client end after the server left: %d, %v; want EOF", n, err)
	}
}

// A Handler's Stop with Drain on the server's data: the rewritten bytes
// reach the client, and the session ends only once the server has closed
// (the moment its slot is free), with the Stop's reason.
func TestStopDrain(t *testing.T) {
	l := newLoop(t)
	rec := newRecorder()
	why := errors.New("evicted")
	rec.onData = func(d Dir, buf []byte) ([]byte, *Stop) {
		if d == FromServer && bytes.Contains(buf, []byte("FATAL")) {
			return []byte("rewritten FATAL"), &Stop{Why: why, Drain: true}
		}
		return buf, nil
	}
	p := relay(t, l, rec, nil, nil)
	if _, err := p.server.Write([]byte("FATAL from the server")); err != nil {
		t.Fatal(err)
	}
	if got := readN(t, p.client, len("rewritten FATAL")); string(got) != "rewritten FATAL" {
		t.Fatalf("client got %q", got)
	}
	// The client hangs up on its FATAL; the session lasts until the server closes.
	p.client.Close()
	var serverClosed atomic.Bool
	go func() {
		_, _ = p.server.Write([]byte("after the FATAL: discarded"))
		// Wait for the loop to see the client gone, as the test cannot
		// observe it otherwise: the server end's write then still succeeds.
		serverClosed.Store(true)
		p.server.Close()
	}()
	if err := rec.wait(t); !errors.Is(err, why) {
		t.Fatalf("ended with %v, want the Stop's reason", err)
	}
	if !serverClosed.Load() {
		t.Fatal("the session ended before the server closed")
	}
}

// Stop from outside (a shutdown): the server side closes at once, and the
// farewell reaches the client after everything relayed before it.
func TestStopFarewell(t *testing.T) {
	l := newLoop(t)
	rec := newRecorder()
	p := relay(t, l, rec, nil, nil)
	if _, err := p.server.Write([]byte("before;")); err != nil {
		t.Fatal(err)
	}
	if got := readN(t, p.client, 7); string(got) != "before;" {
		t.Fatalf("client got %q", got)
	}
	why := errors.New("shutting down")
	rec.farewell = []byte("farewell")
	p.s.Stop(why)
	_ = p.client.SetReadDeadline(time.Now().Add(time.Minute))
	got, err := io.ReadAll(p.client)
	if err != nil || string(got) != "farewell" {
		t.Fatalf("client got %q, %v; want the farewell, then EOF", got, err)
	}
	if err := rec.wait(t); !errors.Is(err, why) {
		t.Fatalf("ended with %v", err)
	}
	_ = p.server.SetReadDeadline(time.Now().Add(time.Minute))
	if n, err := p.server.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("server end after Stop: %d, %v; want EOF", n, err)
	}
	p.s.Stop(why) // a second Stop does nothing
}

// Closing the loop ends every session on it, and leaves no descriptor open.
func TestCloseEndsSessions(t *testing.T) {
	before := openFDs(t)
	l, err := New(Config{})
	if err != nil {
		t.Fatal(err)
	}
	var pairs []*pair
	for range 20 {
		pairs = append(pairs, relay(t, l, newRecorder(), nil, nil))
	}
	for _, p := range pairs[:10] {
		if _, err := p.client.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		readN(t, p.server, 1)
	}
	l.Close()
	l.Close()
	for _, p := range pairs {
		if err := p.rec.wait(t); !errors.Is(err, ErrLoopClosed) {
			t.Fatalf("ended with %v, want ErrLoopClosed", err)
		}
		p.client.Close()
		p.server.Close()
	}
	if _, err := l.Add(nil, nil, nil, nil, newRecorder()); err == nil {
		t.Fatal("Add on a closed loop worked")
	}
	if after := openFDs(t); after != before {
		t.Fatalf("%d descriptors open before, %d after", before, after)
	}
}

// Sessions closed from either side at random points, many at once: every one
// ends exactly once, and no descriptor is left.
func TestChurn(t *testing.T) {
	before := openFDs(t)
	l, err := New(Config{ReadSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := range 100 {
		p := relay(t, l, newRecorder(), nil, nil)
		wg.Go(func() {
			payload := bytes.Repeat([]byte{byte(i)}, 1+i*997%20000)
			go func() { _, _ = p.server.Write(payload) }()
			_, _ = p.client.Write(payload)
			if i%2 == 0 {
				p.client.Close()
			} else {
				p.server.Close()
			}
			if err := p.rec.wait(t); err == nil {
				t.Error("ended without a reason")
			}
			p.client.Close()
			p.server.Close()
		})
	}
	wg.Wait()
	l.Close()
	if after := openFDs(t); after != before {
		t.Fatalf("%d descriptors open before, %d after", before, after)
	}
}

func openFDs(t *testing.T) int {
	t.Helper()
	es, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(es)
}

// A Handler that panics ends its own session with an internal error; the
// loop and its other sessions go on.
func TestHandlerPanic(t *testing.T) {
	l := newLoop(t)
	bad := newRecorder()
	bad.onData = func(Dir, []byte) ([]byte, *Stop) { panic("scanner bug") }
	p := relay(t, l, bad, nil, nil)
	good := relay(t, l, newRecorder(), nil, nil)
	if _, err := p.client.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := bad.wait(t); err == nil || !strings.Contains(err.Error(), "internal error: scanner bug") {
		t.Fatalf("ended with %v", err)
	}
	if _, err := good.client.Write([]byte("still here")); err != nil {
		t.Fatal(err)
	}
	if got := readN(t, good.server, 10); string(got) != "still here" {
		t.Fatalf("the other session got %q", got)
	}
}

// StopAll stops every session, each with its Handler's farewell.
func TestStopAll(t *testing.T) {
	l := newLoop(t)
	why := errors.New("shutting down")
	var pairs []*pair
	for i := range 5 {
		rec := newRecorder()
		rec.farewell = []byte{byte('a' + i)}
		pairs = append(pairs, relay(t, l, rec, nil, nil))
	}
	l.StopAll(why)
	for i, p := range pairs {
		_ = p.client.SetReadDeadline(time.Now().Add(time.Minute))
		got, err := io.ReadAll(p.client)
		if err != nil || string(got) != string(rune('a'+i)) {
			t.Fatalf("session %d: client got %q, %v", i, got, err)
		}
		if err := p.rec.wait(t); !errors.Is(err, why) {
			t.Fatalf("session %d ended with %v", i, err)
		}
	}
}
