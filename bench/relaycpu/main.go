//go:build linux

// Command relaycpu measures what relaying costs, in CPU time per round trip,
// for relays of plain TCP: two goroutines per session copying each way (the
// shape of rolegate's goroutine relay, goroutines.go), internal/evloop's
// epoll loop (rolegate's default relay, evloop.go), and two event-loop
// libraries that can adopt an established connection: lesismal/nbio
// (nbio.go) and panjf2000/gnet v2 (gnet.go). Each is a plain byte relay of
// an accepted client to a dialled upstream, one loop or poller. N
// clients each send a request and wait for the response through the relay,
// over and over, to an echo server that answers every request; the relay
// runs in a child process of its own, whose getrusage is the figure. The
// clients and the echo server run in this process, on the same CPUs, as
// pgbench and PostgreSQL would. Rounds interleave the relays (the order
// alternates) so that a change in the machine's load hits both alike.
//
//	cd bench/relaycpu # a module of its own: nbio and gnet stay out of rolegate's go.mod
//	go run . -clients 16 -rounds 4 -duration 5s
//	go run . -pgbench -clients 16 -rounds 4 -duration 5s
//
// It also forces a number of garbage collections in the relay under load
// (-gcs) and reports the longest stop-the-world pause among them, since a
// loop that blocks in epoll_wait must not hold up the collector.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"runtime/metrics"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rolegate/rolegate/internal/pgtest"
)

func main() {
	child := flag.String("child", "", "run as the relay child: goroutines | evloop | nbio | gnet | uring | uring-link | uring-locked | uring-defer | uring-multi | uring-sqpoll (uring.go)")
	upstream := flag.String("upstream", "", "child: the echo server's address")
	clients := flag.Int("clients", 16, "concurrent clients")
	reqSize := flag.Int("req", 100, "request size, bytes")
	respSize := flag.Int("resp", 200, "response size, bytes")
	duration := flag.Duration("duration", 5*time.Second, "measured time per relay per round")
	warmup := flag.Duration("warmup", time.Second, "unmeasured time before each measurement")
	rounds := flag.Int("rounds", 3, "rounds")
	gcs := flag.Int("gcs", 50, "forced GCs in the relay under load, after each measurement")
	modesFlag := flag.String("modes", "goroutines,evloop,nbio,gnet", "relays to compare")
	protos := flag.String("protocols", "simple,extended", "-pgbench: pgbench -M values")
	pgbench := flag.Bool("pgbench", false, "relay pgbench -S -c clients to a throwaway PostgreSQL instead of the echo clients (-M simple and extended)")
	stall := flag.Int("stall", 0, "instead: an upstream writes this many MiB at a client that does not read; report each relay's memory growth")
	straceDir := flag.String("strace", "", "run each relay child under strace -f -c, writing counts to this directory (CPU figures are then meaningless; -gcs is ignored)")
	flag.Parse()
	if *child != "" {
		if err := runChild(*child, *upstream); err != nil {
			fmt.Fprintln(os.Stderr, "relaycpu child:", err)
			os.Exit(1)
		}
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if *stall > 0 {
		if err := driveStall(ctx, strings.Split(*modesFlag, ","), *stall); err != nil {
			fmt.Fprintln(os.Stderr, "relaycpu:", err)
			os.Exit(1)
		}
		return
	}
	if *pgbench {
		if err := drivePgbench(ctx, strings.Split(*modesFlag, ","), strings.Split(*protos, ","), *clients, *duration, *rounds); err != nil {
			fmt.Fprintln(os.Stderr, "relaycpu:", err)
			os.Exit(1)
		}
		return
	}
	if err := drive(ctx, driveOpts{clients: *clients, req: *reqSize, resp: *respSize,
		duration: *duration, warmup: *warmup, rounds: *rounds, gcs: *gcs, straceDir: *straceDir, modes: strings.Split(*modesFlag, ",")}); err != nil {
		fmt.Fprintln(os.Stderr, "relaycpu:", err)
		os.Exit(1)
	}
}

type driveOpts struct {
	clients, req, resp, rounds, gcs int
	duration, warmup                time.Duration
	straceDir                       string
	modes                           []string
}

// result is one measurement of one relay.
type result struct {
	trips      int64
	cpu        time.Duration // the relay process's user+system time
	user, sys  time.Duration
	csw        int64         // its context switches, voluntary and not
	driver     time.Duration // this process's CPU time (clients and echo server)
	other      time.Duration // the machine's busy time minus both: other work
	maxGCPause time.Duration // longest stop-the-world of the forced GCs
}

func (r result) perTrip() time.Duration { return r.cpu / time.Duration(max(r.trips, 1)) }

func drive(ctx context.Context, o driveOpts) error {
	echo, err := startEcho(o.req, o.resp)
	if err != nil {
		return err
	}
	defer echo.Close()
	modes := o.modes
	all := map[string][]result{}
	fmt.Printf("%d clients, %d-byte requests, %d-byte responses, %v per measurement, GOMAXPROCS of the relay %d\n",
		o.clients, o.req, o.resp, o.duration, runtime.GOMAXPROCS(0))
	for round := range o.rounds {
		order := slices.Clone(modes)
		if round%2 == 1 {
			slices.Reverse(order)
		}
		for _, mode := range order {
			r, err := measure(ctx, mode, round, echo.Addr().String(), o)
			if err != nil {
				return fmt.Errorf("round %d, %s: %w", round+1, mode, err)
			}
			all[mode] = append(all[mode], r)
			fmt.Printf("round %d %-12s %6.2f µs CPU/trip (user %5.2f, sys %5.2f)  %5.2f switches/trip  %7.0f trips/s  driver %5.2f µs/trip  other work %4.2f cores  GC pause max %v\n",
				round+1, mode, us(r.perTrip()), us(r.user/time.Duration(r.trips)), us(r.sys/time.Duration(r.trips)),
				float64(r.csw)/float64(r.trips), float64(r.trips)/o.duration.Seconds(), us(r.driver/time.Duration(r.trips)),
				r.other.Seconds()/o.duration.Seconds(), r.maxGCPause)
		}
	}
	fmt.Println("median CPU per round trip:")
	for _, mode := range modes {
		var per []float64
		for _, r := range all[mode] {
			per = append(per, us(r.perTrip()))
		}
		slices.Sort(per)
		fmt.Printf("  %-12s %6.2f µs (runs %v)\n", mode, per[len(per)/2], per)
	}
	return nil
}

// selfCPU is this process's user and system time.
func selfCPU() time.Duration {
	var ru unix.Rusage
	_ = unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// machineBusy is the time all CPUs spent on anything but idle and I/O wait,
// from /proc/stat (in USER_HZ ticks, 100 per second).
func machineBusy() time.Duration {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(data), "\n")
	var total time.Duration
	for i, f := range strings.Fields(line)[1:] {
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		n, _ := strconv.ParseInt(f, 10, 64)
		total += time.Duration(n) * 10 * time.Millisecond
	}
	return total
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// echo is the server: each request of req bytes gets resp bytes back.
type echo struct{ net.Listener }

func startEcho(req, resp int) (*echo, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				in, out := make([]byte, req), make([]byte, resp)
				for {
					if _, err := io.ReadFull(c, in); err != nil {
						return
					}
					if _, err := c.Write(out); err != nil {
						return
					}
				}
			}()
		}
	}()
	return &echo{ln}, nil
}

// measure runs one relay child under load: warm-up, the measured interval,
// then the forced GCs.
func measure(ctx context.Context, mode string, round int, upstream string, o driveOpts) (result, error) {
	exe, err := os.Executable()
	if err != nil {
		return result{}, err
	}
	args := []string{exe, "-child", mode, "-upstream", upstream}
	if o.straceDir != "" {
		o.gcs = 0
		out := fmt.Sprintf("%s/%s-r%d.txt", o.straceDir, mode, round+1)
		args = append([]string{"strace", "-f", "-c", "-o", out}, args...)
		defer func(trips *atomic.Int64) {
			fmt.Printf("  strace counts in %s, over %d round trips\n", out, trips.Load())
		}(&lifetimeTrips)
	}
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return result{}, err
	}
	stdoutPipe, err := cmd.StdoutPipe()
	if err != nil {
		return result{}, err
	}
	if err := cmd.Start(); err != nil {
		return result{}, err
	}
	defer cmd.Wait()
	defer stdin.Close()
	out := bufio.NewScanner(stdoutPipe)
	ask := func(q string) (string, error) {
		if _, err := io.WriteString(stdin, q+"\n"); err != nil {
			return "", err
		}
		if !out.Scan() {
			return "", fmt.Errorf("child gave no answer to %q: %v", q, out.Err())
		}
		return out.Text(), nil
	}
	if !out.Scan() {
		return result{}, errors.New("child did not say where it listens")
	}
	addr := out.Text()

	trips := &lifetimeTrips
	trips.Store(0)
	var stopped atomic.Bool
	var wg sync.WaitGroup
	errs := make(chan error, o.clients)
	for range o.clients {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return result{}, err
		}
		wg.Go(func() {
			defer c.Close()
			req, resp := make([]byte, o.req), make([]byte, o.resp)
			for !stopped.Load() {
				if _, err := c.Write(req); err != nil {
					errs <- err
					return
				}
				if _, err := io.ReadFull(c, resp); err != nil {
					errs <- err
					return
				}
				trips.Add(1)
			}
		})
	}
	defer func() { stopped.Store(true); wg.Wait() }()
	time.Sleep(o.warmup)
	before, err := ask("u")
	if err != nil {
		return result{}, err
	}
	self0, busy0 := selfCPU(), machineBusy()
	t0 := trips.Load()
	select {
	case <-time.After(o.duration):
	case err := <-errs:
		return result{}, fmt.Errorf("client: %w", err)
	case <-ctx.Done():
		return result{}, ctx.Err()
	}
	after, err := ask("u")
	if err != nil {
		return result{}, err
	}
	r := result{trips: trips.Load() - t0, driver: selfCPU() - self0}
	busy := machineBusy() - busy0
	var b, a [3]int64
	fmt.Sscan(before, &b[0], &b[1], &b[2])
	fmt.Sscan(after, &a[0], &a[1], &a[2])
	r.user, r.sys = time.Duration(a[0]-b[0])*time.Microsecond, time.Duration(a[1]-b[1])*time.Microsecond
	r.cpu, r.csw = r.user+r.sys, a[2]-b[2]
	r.other = max(busy-r.cpu-r.driver, 0)
	if o.gcs > 0 {
		gc, err := ask("g " + strconv.Itoa(o.gcs))
		if err != nil {
			return result{}, err
		}
		ns, _ := strconv.ParseInt(gc, 10, 64)
		r.maxGCPause = time.Duration(ns)
	}
	return r, nil
}

// drivePgbench measures the relays' CPU per transaction of pgbench -S
// against a throwaway PostgreSQL (scale 1), -M simple and -M extended, in
// interleaved rounds.
func drivePgbench(ctx context.Context, modes, protos []string, clients int, duration time.Duration, rounds int) error {
	c, err := pgtest.New(ctx, pgtest.Options{Settings: map[string]string{"max_connections": "100"}})
	if err != nil {
		return err
	}
	defer c.Close()
	env := append(os.Environ(), "PGPASSWORD="+c.SuperPassword, "PGUSER="+c.SuperUser, "PGDATABASE=postgres", "PGSSLMODE=disable")
	initCmd := exec.CommandContext(ctx, "pgbench", "-i", "-s", "1", "-q", "-h", c.Host, "-p", strconv.Itoa(c.Port))
	initCmd.Env = env
	if out, err := initCmd.CombinedOutput(); err != nil {
		return fmt.Errorf("pgbench -i: %v: %s", err, out)
	}
	fmt.Printf("pgbench -S -c %d -j 2 -T %v through each relay, GOMAXPROCS %d\n", clients, duration, runtime.GOMAXPROCS(0))
	per := map[string][]float64{}
	for round := range rounds {
		order := slices.Clone(modes)
		if round%2 == 1 {
			slices.Reverse(order)
		}
		for _, proto := range protos {
			for _, mode := range order {
				ch, err := startChild(ctx, mode, c.Addr())
				if err != nil {
					return err
				}
				_, port, _ := net.SplitHostPort(ch.addr)
				before := ch.ask("u")
				busy0 := machineBusy()
				bench := exec.CommandContext(ctx, "pgbench", "-n", "-S", "-M", proto, "-c", strconv.Itoa(clients), "-j", "2",
					"-T", strconv.Itoa(int(duration.Seconds())), "-h", "127.0.0.1", "-p", port)
				bench.Env = env
				res, err := bench.CombinedOutput()
				after := ch.ask("u")
				busy := machineBusy() - busy0
				ch.stop()
				if err != nil {
					return fmt.Errorf("pgbench through %s: %v: %s", mode, err, res)
				}
				var n int64
				for _, line := range strings.Split(string(res), "\n") {
					if v, ok := strings.CutPrefix(line, "number of transactions actually processed: "); ok {
						n, _ = strconv.ParseInt(strings.Fields(v)[0], 10, 64)
					}
				}
				var b, a [3]int64
				fmt.Sscan(before, &b[0], &b[1], &b[2])
				fmt.Sscan(after, &a[0], &a[1], &a[2])
				cpu := time.Duration(a[0]-b[0]+a[1]-b[1]) * time.Microsecond
				pt := us(cpu / time.Duration(max(n, 1)))
				per[mode+" "+proto] = append(per[mode+" "+proto], pt)
				fmt.Printf("round %d %-8s %-13s %6.2f µs relay CPU/tx  %5.2f switches/tx  %7.0f tps  machine busy %4.2f cores\n",
					round+1, proto, mode, pt, float64(a[2]-b[2])/float64(max(n, 1)), float64(n)/duration.Seconds(), busy.Seconds()/duration.Seconds())
			}
		}
	}
	fmt.Println("median relay CPU per transaction:")
	for _, proto := range protos {
		for _, mode := range modes {
			v := per[mode+" "+proto]
			slices.Sort(v)
			fmt.Printf("  %-8s %-13s %6.2f µs (runs %v)\n", proto, mode, v[len(v)/2], v)
		}
	}
	return nil
}

// lifetimeTrips counts the round trips through the current relay child.
var lifetimeTrips atomic.Int64

// relay is one way of relaying: it takes over an accepted client and the
// connection dialled to upstream for it, and relays bytes both ways until
// either side closes.
type relay interface {
	add(client, server *net.TCPConn) error
	close()
}

// newRelay starts the relay called mode.
func newRelay(mode string) (relay, error) {
	switch mode {
	case "goroutines":
		return goroutineRelay{}, nil
	case "evloop":
		return newEvloopRelay()
	case "nbio":
		return newNbioRelay()
	case "gnet":
		return newGnetRelay()
	}
	if strings.HasPrefix(mode, "uring") {
		r, err := newUringRelay(mode)
		if err != nil {
			return nil, err
		}
		return uringAdapter{r}, nil
	}
	return nil, fmt.Errorf("unknown relay %q", mode)
}

// uringAdapter is uring.go's relay as a relay.
type uringAdapter struct{ r *uringRelay }

func (u uringAdapter) add(client, server *net.TCPConn) error { return u.r.Add(client, server) }
func (u uringAdapter) close()                                { _ = u.r.Close() }

// runChild is the relay process: it listens, relays every connection to
// upstream, and answers the driver's questions on standard input until it
// closes.
func runChild(mode, upstream string) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	r, err := newRelay(mode)
	if err != nil {
		return err
	}
	defer r.close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", upstream)
			if err != nil {
				c.Close()
				continue
			}
			if err := r.add(c.(*net.TCPConn), s.(*net.TCPConn)); err != nil {
				fmt.Fprintln(os.Stderr, "add:", err)
				c.Close()
				s.Close()
			}
		}
	}()
	fmt.Println(ln.Addr())
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		cmd, arg, _ := strings.Cut(in.Text(), " ")
		switch cmd {
		case "u":
			var ru unix.Rusage
			if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
				return err
			}
			fmt.Println(ru.Utime.Nano()/1000, ru.Stime.Nano()/1000, ru.Nvcsw+ru.Nivcsw)
		case "g":
			n, _ := strconv.Atoi(arg)
			fmt.Println(int64(forcedGCPause(n)))
		case "m":
			fmt.Println(memory())
		}
	}
	return nil
}

// forcedGCPause runs n collections, spaced out, and returns the longest
// stop-the-world pause among them (the upper bound of the runtime's
// histogram bucket that holds it).
func forcedGCPause(n int) time.Duration {
	const name = "/sched/pauses/total/gc:seconds"
	read := func() *metrics.Float64Histogram {
		s := []metrics.Sample{{Name: name}}
		metrics.Read(s)
		return s[0].Value.Float64Histogram()
	}
	before := read()
	for range n {
		runtime.GC()
		time.Sleep(5 * time.Millisecond)
	}
	after := read()
	for i := len(after.Counts) - 1; i >= 0; i-- {
		if after.Counts[i] > before.Counts[i] {
			return time.Duration(after.Buckets[i+1] * float64(time.Second))
		}
	}
	return 0
}
