// Command queue-experiment measures what happens to connections waiting in
// the accept queue of a listener that closes while another one takes over
// the address, the question behind rolegate's restart without refusing a
// login (README, "Restarting without refusing a login"):
//
//   - reuseport: two sockets with SO_REUSEPORT on one address; the kernel
//     spreads a burst of connects between them; the first never accepts
//     and closes mid-burst.
//   - handoff: one socket with two descriptors (what SCM_RIGHTS gives the
//     new process); the first descriptor closes mid-burst.
//
// Each client writes a byte and waits for its echo from the second
// listener; it prints how many got it and how many were reset. Run it in a
// network namespace of its own to try both values of tcp_migrate_req
// without touching the host's:
//
//	unshare -n sh -c 'ip link set lo up; for v in 0 1; do
//	    sysctl -w net.ipv4.tcp_migrate_req=$v; go run ./scripts/queue-experiment; done'
package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

func main() {
	for _, mode := range []string{"reuseport", "handoff"} {
		res, err := burst(mode, 400)
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", mode, err)
			os.Exit(1)
		}
		fmt.Printf("%-9s %v\n", mode, res)
	}
}

func listen(addr string) (net.Listener, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		}); err != nil {
			return err
		}
		return serr
	}}
	return lc.Listen(context.Background(), "tcp4", addr)
}

// burst connects n clients while the first listener closes, and counts the
// outcomes.
func burst(mode string, n int) (map[string]int, error) {
	first, err := listen("127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	addr := first.Addr().String()
	var second net.Listener
	if mode == "reuseport" {
		second, err = listen(addr)
	} else {
		f, ferr := first.(*net.TCPListener).File()
		if ferr != nil {
			return nil, ferr
		}
		second, err = net.FileListener(f)
		f.Close()
	}
	if err != nil {
		return nil, err
	}
	defer second.Close()
	go func() { // the successor echoes; the first listener never accepts
		for {
			c, err := second.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				b := make([]byte, 1)
				if _, err := c.Read(b); err == nil {
					_, _ = c.Write(b)
				}
			}()
		}
	}()
	var (
		wg  sync.WaitGroup
		mu  sync.Mutex
		res = map[string]int{}
	)
	start := make(chan struct{})
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			out := client(addr)
			mu.Lock()
			res[out]++
			mu.Unlock()
		}()
	}
	close(start)
	time.Sleep(50 * time.Millisecond) // let part of the burst queue up at the first listener
	first.Close()
	wg.Wait()
	return res, nil
}

func client(addr string) string {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return "dial failed"
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte{'x'}); err != nil {
		return "write failed"
	}
	if _, err := c.Read(make([]byte, 1)); err != nil {
		if errors.Is(err, syscall.ECONNRESET) {
			return "reset"
		}
		return "read failed"
	}
	return "echoed"
}
