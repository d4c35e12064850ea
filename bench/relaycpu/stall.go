//go:build linux

package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"time"
)

// child is a relay child process and its question channel.
type child struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Scanner
	addr  string // where it listens
}

// startChild starts the relay child for mode, relaying to upstream.
func startChild(ctx context.Context, mode, upstream string) (*child, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, exe, "-child", mode, "-upstream", upstream)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	c := &child{cmd: cmd, stdin: stdin, out: bufio.NewScanner(stdout)}
	if !c.out.Scan() {
		c.stop()
		return nil, errors.New("child did not say where it listens")
	}
	c.addr = c.out.Text()
	return c, nil
}

// ask sends the child a question and returns its one-line answer.
func (c *child) ask(q string) string {
	_, _ = io.WriteString(c.stdin, q+"\n")
	c.out.Scan()
	return c.out.Text()
}

// stop ends the child (it exits when its standard input closes).
func (c *child) stop() {
	c.stdin.Close()
	_ = c.cmd.Wait()
}

// driveStall measures what each relay does when a client stops reading: an
// upstream writes mb MiB at a client that reads nothing, and the relay's
// memory is read once the upstream can write no more (no progress for 2
// s) or has written it all. A relay with backpressure stops reading the
// upstream once the client's socket is full; one without reads on and
// holds the rest in memory.
func driveStall(ctx context.Context, modes []string, mb int) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	written := make(chan int64, 1)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 64<<10)
				var n int64
				for n < int64(mb)<<20 {
					_ = c.SetWriteDeadline(time.Now().Add(2 * time.Second))
					w, err := c.Write(buf)
					n += int64(w)
					if err != nil {
						break
					}
				}
				written <- n
			}()
		}
	}()
	fmt.Printf("an upstream writes up to %d MiB at a client that does not read\n", mb)
	for _, mode := range modes {
		ch, err := startChild(ctx, mode, ln.Addr().String())
		if err != nil {
			return err
		}
		before := ch.ask("m")
		c, err := net.Dial("tcp", ch.addr)
		if err != nil {
			ch.stop()
			return err
		}
		var n int64
		select {
		case n = <-written:
		case <-ctx.Done():
			c.Close()
			ch.stop()
			return ctx.Err()
		}
		after := ch.ask("m")
		c.Close()
		ch.stop()
		var rss0, heap0, rss1, heap1 int64
		fmt.Sscan(before, &rss0, &heap0)
		fmt.Sscan(after, &rss1, &heap1)
		fmt.Printf("  %-12s upstream wrote %7.1f MiB; relay RSS %5.1f → %7.1f MiB, heap in use %5.1f → %7.1f MiB\n",
			mode, mib(n), mib(rss0), mib(rss1), mib(heap0), mib(heap1))
	}
	return nil
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }

// memory is the child's answer to "m": its VmRSS and heap in use, bytes.
func memory() string {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	var rss int64
	if data, err := os.ReadFile("/proc/self/status"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
				fmt.Sscan(v, &rss)
			}
		}
	}
	return fmt.Sprint(rss<<10, " ", ms.HeapInuse)
}
