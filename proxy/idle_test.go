package proxy

import (
	"bufio"
	"flag"
	"net"
	"os"
	"runtime"
	"runtime/pprof"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/internal/wire"
)

var idleProfile = flag.String("idleprofile", "", "TestIdleSessionMemory: write a heap profile of the idle sessions to this file")

// idleClient logs in as trust_user on addr, runs one query so that both relay
// directions have carried a buffer, and returns the socket, idle. The client
// keeps nothing but the socket, so that what the test measures is rolegate's.
func idleClient(t testing.TB, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	startup := wire.Encode(nil, &pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30,
		Parameters: map[string]string{"user": "trust_user", "database": "postgres"}})
	r := bufio.NewReaderSize(c, 16)
	untilReady := func() {
		for {
			m, err := wire.ReadMessage(r, 1<<20)
			if err != nil {
				t.Fatalf("idle client: %v", err)
			}
			if m.Type == 'E' {
				t.Fatalf("idle client: server error %q", m.Body)
			}
			if m.Type == 'Z' {
				return
			}
		}
	}
	if _, err := c.Write(startup); err != nil {
		t.Fatal(err)
	}
	untilReady()
	if _, err := c.Write(wire.Encode(nil, &pgproto3.Query{String: "select 1"})); err != nil {
		t.Fatal(err)
	}
	untilReady()
	if r.Buffered() > 0 {
		t.Fatalf("idle client: %d bytes after ReadyForQuery", r.Buffered())
	}
	_ = c.SetDeadline(time.Time{})
	return c
}

// idleCost is what n idle sessions hold, per session.
type idleCost struct {
	heap, stack float64 // bytes
	goroutines  float64
	allocated   float64 // bytes allocated, garbage included
}

// measureIdle opens n idle sessions on addr and returns what they hold per
// session, measured after a GC: live heap, goroutine stacks, goroutines.
func measureIdle(t *testing.T, addr string, n int, profile string) idleCost {
	t.Helper()
	var before, after runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&before)
	g0 := runtime.NumGoroutine()
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range n {
		conns = append(conns, idleClient(t, addr))
	}
	time.Sleep(200 * time.Millisecond) // the relays are back in Read
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&after)
	g1 := runtime.NumGoroutine()
	if profile != "" {
		f, err := os.Create(profile)
		if err != nil {
			t.Fatal(err)
		}
		if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	return idleCost{
		heap:       float64(int64(after.HeapAlloc)-int64(before.HeapAlloc)) / float64(n),
		stack:      float64(int64(after.StackInuse)-int64(before.StackInuse)) / float64(n),
		goroutines: float64(g1-g0) / float64(n),
		allocated:  float64(after.TotalAlloc-before.TotalAlloc) / float64(n),
	}
}

// TestIdleSessionMemory measures what an idle session holds in rolegate: live
// heap, goroutine stacks and goroutines, net of what the test's own client
// sockets hold (measured against the server directly), relayed by the event
// loop (no goroutine at all) and by goroutines (one per direction). Idle
// sessions are rolegate's main case; a relay direction that kept a large
// buffer while blocked in Read would hold 32 KiB. Run with -args
// -idleprofile FILE for a heap profile of the idle sessions (loop).
func TestIdleSessionMemory(t *testing.T) {
	if *idleProfile != "" {
		runtime.MemProfileRate = 1
		defer func() { runtime.MemProfileRate = 512 * 1024 }()
	}
	const n = 120
	for _, tt := range []struct {
		relay      string
		maxHeap    float64
		goroutines float64
	}{
		// The session's own state, the loop's and the connection's.
		{RelayLoop, 4 << 10, 0},
		// Two 2 KiB read buffers and the session's own state come to about 7.5 KiB.
		{RelayGoroutines, 16 << 10, 2},
	} {
		t.Run(tt.relay, func(t *testing.T) {
			p := startProxyWith(t, proxyOpts{sslmode: "disable"}, func(c *Config) { c.Relay = tt.relay })
			if got := p.RelayMode(); got != tt.relay {
				t.Fatalf("relay mode %s, want %s", got, tt.relay)
			}
			direct := measureIdle(t, shared.Addr(), n, "")
			profile := ""
			if tt.relay == RelayLoop {
				profile = *idleProfile
			}
			proxied := measureIdle(t, p.Addr(), n, profile)
			heap, goroutines := proxied.heap-direct.heap, proxied.goroutines-direct.goroutines
			t.Logf("per idle session: heap %.0f B, stacks %.0f B, goroutines %.2f, allocated %.0f B (clients alone: heap %.0f B, stacks %.0f B, goroutines %.2f, allocated %.0f B)",
				heap, proxied.stack-direct.stack, goroutines, proxied.allocated-direct.allocated,
				direct.heap, direct.stack, direct.goroutines, direct.allocated)
			if heap > tt.maxHeap {
				t.Errorf("an idle session holds %.0f bytes of heap, want at most %.0f", heap, tt.maxHeap)
			}
			if goroutines < tt.goroutines-0.1 || goroutines > tt.goroutines+0.1 {
				t.Errorf("an idle session has %.2f goroutines, want %.0f", goroutines, tt.goroutines)
			}
		})
	}
}
