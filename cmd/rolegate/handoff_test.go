package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"golang.org/x/sys/unix"

	"github.com/rolegate/rolegate/config"
	"github.com/rolegate/rolegate/internal/pgtest"
)

// socketDir is a directory for unix sockets: t.TempDir's paths can outgrow
// the 107 bytes a socket path may have.
func socketDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "rg")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// shortLogin is one short session: connect, select 1, close.
func shortLogin(ctx context.Context, dsn string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return err
	}
	defer c.Close(context.Background())
	var n int
	if err := c.QueryRow(ctx, "select 1").Scan(&n); err != nil {
		return err
	}
	if n != 1 {
		return fmt.Errorf("select 1 returned %d", n)
	}
	return nil
}

// loginLoop runs logins from a few clients at once until stopped or max
// logins are done. Each login records whether before it started the process
// old had exited (so that it went through its successor).
type loginLoop struct {
	logins, afterExit atomic.Int64
	mu                sync.Mutex
	errs              []error
	stop              chan struct{}
	stopOnce          sync.Once
	wg                sync.WaitGroup
}

func startLogins(ctx context.Context, old *proc, clients int, max int64) *loginLoop {
	l := &loginLoop{stop: make(chan struct{})}
	for range clients {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for {
				select {
				case <-l.stop:
					return
				default:
				}
				if l.logins.Load() >= max {
					return
				}
				gone := old.done()
				err := shortLogin(ctx, old.dsn())
				l.logins.Add(1)
				if err != nil {
					l.mu.Lock()
					l.errs = append(l.errs, err)
					l.mu.Unlock()
				} else if gone {
					l.afterExit.Add(1)
				}
			}
		}()
	}
	return l
}

// end stops the loop and waits for its clients; safe to call twice.
func (l *loginLoop) end() {
	l.stopOnce.Do(func() { close(l.stop) })
	l.wg.Wait()
}

func (l *loginLoop) failures() []error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]error(nil), l.errs...)
}

// fakeSuccessor connects to the hand-off socket as a successor would, takes
// the offer and closes the fds and the connection without answering.
func fakeSuccessor(t *testing.T, path string) handoffOffer {
	t.Helper()
	c, err := net.DialTimeout("unixpacket", path, 10*time.Second)
	if err != nil {
		t.Fatalf("connect to the hand-off socket: %v", err)
	}
	defer c.Close()
	uc := c.(*net.UnixConn)
	if err := uc.SetDeadline(time.Now().Add(30 * time.Second)); err != nil {
		t.Fatal(err)
	}
	buf, oob := make([]byte, 4096), make([]byte, unix.CmsgSpace(2*4))
	n, oobn, _, _, err := uc.ReadMsgUnix(buf, oob)
	if err != nil {
		t.Fatalf("read the offer: %v", err)
	}
	fds, err := parseRights(oob[:oobn])
	if err != nil {
		t.Fatal(err)
	}
	for _, fd := range fds {
		unix.Close(fd)
	}
	var offer handoffOffer
	if err := json.Unmarshal(buf[:n], &offer); err != nil {
		t.Fatalf("offer %q: %v", buf[:n], err)
	}
	if want := 1; len(fds) != want+map[bool]int{true: 1}[offer.Admin] {
		t.Errorf("offer %+v carried %d fds", offer, len(fds))
	}
	return offer
}

func TestRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary against PostgreSQL")
	}
	t.Parallel()
	bin := buildBinary(t)
	c := pgtest.Start(t, pgtest.Options{HBA: []string{"host all trust_user 127.0.0.1/32 trust"}})
	if err := c.Exec(t.Context(), "create role trust_user login"); err != nil {
		t.Fatal(err)
	}

	// The acceptance test: logins run on while one rolegate is
	// replaced by another through the hand-off, and every one succeeds.
	t.Run("a hand-off refuses no login", func(t *testing.T) {
		t.Parallel()
		sock := filepath.Join(socketDir(t), "handoff.sock")
		adminAddr := freeAddr(t)
		extra := fmt.Sprintf("handoff_socket = %q\nshutdown_timeout = \"60s\"\n[admin]\nhttp = %q\n", sock, adminAddr)
		old := startBinary(t, bin, c, extra)

		loop := startLogins(t.Context(), old, 8, 3000)
		defer loop.end()
		waitFor(t, 60*time.Second, "logins through the first rolegate", func() bool { return loop.logins.Load() >= 100 })
		next := launch(t, bin, c, old.addr, extra)
		waitFor(t, 30*time.Second, "the new rolegate to take over", func() bool {
			if next.done() {
				t.Fatalf("the new rolegate exited: %v", next.cmd.ProcessState)
			}
			return strings.Contains(next.stderr.String(), "took the listeners over from the running rolegate")
		})
		old.wantExit(t, 60*time.Second) // drained: its sessions are short
		if log := old.stderr.String(); !strings.Contains(log, "handed the listeners over to a new rolegate; draining sessions") {
			t.Errorf("the old rolegate's log lacks the hand-off:\n%s", log)
		}
		waitFor(t, 60*time.Second, "logins through the new rolegate", func() bool {
			return loop.afterExit.Load() >= 100 || loop.logins.Load() >= 3000
		})
		loop.end()
		n, errs := loop.logins.Load(), loop.failures()
		t.Logf("%d logins, %d after the first rolegate exited", n, loop.afterExit.Load())
		if len(errs) > 0 {
			t.Errorf("%d of %d logins failed; the first: %v", len(errs), n, errs[0])
		}
		if loop.afterExit.Load() < 100 {
			t.Errorf("only %d logins after the first rolegate exited", loop.afterExit.Load())
		}

		// The successor has the admin HTTP address too, and offers both
		// listeners on the hand-off socket for the next restart.
		resp, err := (&http.Client{Timeout: 20 * time.Second}).Get("http://" + adminAddr + "/api/sessions")
		if err != nil {
			t.Fatalf("admin HTTP after the hand-off: %v", err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("admin HTTP after the hand-off: %d", resp.StatusCode)
		}
		if offer := fakeSuccessor(t, sock); offer.PID != next.cmd.Process.Pid || !offer.Admin || offer.Listen != old.addr {
			t.Errorf("the new rolegate offers %+v, want its pid %d, the admin listener and %s", offer, next.cmd.Process.Pid, old.addr)
		}
		next.signal(t, syscall.SIGTERM)
		next.wantExit(t, 60*time.Second)
		if _, err := os.Stat(sock); !os.IsNotExist(err) {
			t.Errorf("the hand-off socket outlives the last rolegate: %v", err)
		}
	})

	// A successor that refuses the offer, or goes away half-way, leaves the
	// running rolegate serving, and the hand-off socket offered.
	t.Run("failed hand-offs leave the running rolegate serving", func(t *testing.T) {
		t.Parallel()
		sock := filepath.Join(socketDir(t), "handoff.sock")
		// A socket file that a killed rolegate left behind is replaced.
		stale, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: sock, Net: "unixpacket"})
		if err != nil {
			t.Fatal(err)
		}
		stale.SetUnlinkOnClose(false)
		stale.Close()
		extra := fmt.Sprintf("handoff_socket = %q\n", sock)
		old := startBinary(t, bin, c, extra)
		if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("hand-off socket: %v, %v; want mode 0600", fi, err)
		}

		other := launch(t, bin, c, freeAddr(t), extra)
		select {
		case <-other.exited:
		case <-time.After(60 * time.Second):
			t.Fatal("a successor with another listen address still runs")
		}
		want := fmt.Sprintf("the running rolegate (pid %d) listens on %s, this configuration on %s", old.cmd.Process.Pid, old.addr, other.addr)
		if code := other.cmd.ProcessState.ExitCode(); code != 1 || !strings.Contains(other.stderr.String(), want) {
			t.Errorf("successor with another address: exit %d, stderr:\n%s\nwant 1 and %q", code, other.stderr.String(), want)
		}
		waitFor(t, 30*time.Second, "the refusal in the log", func() bool {
			return strings.Contains(old.stderr.String(), "hand-off failed; serving on") &&
				strings.Contains(old.stderr.String(), "the successor refused: "+want)
		})

		if offer := fakeSuccessor(t, sock); offer.PID != old.cmd.Process.Pid || offer.Admin || offer.Version != handoffVersion {
			t.Errorf("offer %+v", offer)
		}
		waitFor(t, 30*time.Second, "the vanished successor in the log", func() bool {
			return strings.Contains(old.stderr.String(), "the successor did not confirm")
		})
		if err := shortLogin(t.Context(), old.dsn()); err != nil {
			t.Fatalf("login after the failed hand-offs: %v", err)
		}
		if old.done() {
			t.Fatal("the running rolegate exited")
		}
		// Still offered: a real successor takes over.
		next := launch(t, bin, c, old.addr, extra)
		old.wantExit(t, 60*time.Second)
		waitFor(t, 30*time.Second, "the new rolegate to take over", func() bool {
			return strings.Contains(next.stderr.String(), "took the listeners over from the running rolegate")
		})
		if err := shortLogin(t.Context(), old.dsn()); err != nil {
			t.Fatalf("login through the successor: %v", err)
		}
		next.signal(t, syscall.SIGINT)
		next.wantExit(t, 30*time.Second)
	})

	// A draining rolegate, once SIGTERMed after a hand-off, drains on; the
	// second SIGTERM closes at once.
	t.Run("after a hand-off the first SIGTERM lets the drain go on", func(t *testing.T) {
		t.Parallel()
		sock := filepath.Join(socketDir(t), "handoff.sock")
		extra := fmt.Sprintf("handoff_socket = %q\nshutdown_timeout = \"60s\"\n", sock)
		old := startBinary(t, bin, c, extra)
		held := hold(t, old)
		next := launch(t, bin, c, old.addr, extra)
		waitFor(t, 30*time.Second, "the hand-off", func() bool {
			return strings.Contains(old.stderr.String(), "handed the listeners over to a new rolegate")
		})
		old.signal(t, syscall.SIGTERM)
		waitFor(t, 30*time.Second, "the SIGTERM log line", func() bool {
			return strings.Contains(old.stderr.String(), "SIGTERM received; draining already")
		})
		var n int
		if err := held.QueryRow(t.Context(), "select 7").Scan(&n); err != nil || n != 7 {
			t.Fatalf("held session after the first SIGTERM: %d, %v", n, err)
		}
		old.signal(t, syscall.SIGTERM)
		old.wantExit(t, 30*time.Second)
		if err := held.Ping(t.Context()); err == nil {
			t.Error("held session still works after the second SIGTERM")
		}
		next.signal(t, syscall.SIGINT)
		next.wantExit(t, 30*time.Second)
	})

	// reuse_port lets independent instances share the listen address; the
	// kernel spreads connections between them.
	t.Run("reuse_port", func(t *testing.T) {
		t.Parallel()
		first := startBinary(t, bin, c, "reuse_port = true")
		second := launch(t, bin, c, first.addr, "reuse_port = true")
		waitFor(t, 30*time.Second, "the second rolegate to start", func() bool {
			if second.done() {
				t.Fatalf("the second rolegate exited: %v", second.cmd.ProcessState)
			}
			return strings.Contains(second.stderr.String(), "rolegate started")
		})
		if !strings.Contains(second.stderr.String(), "reuse_port=true") {
			t.Errorf("start line lacks reuse_port:\n%s", second.stderr.String())
		}
		// The first one goes; logins after it exited go to the second.
		first.signal(t, syscall.SIGTERM)
		first.wantExit(t, 60*time.Second)
		for range 5 {
			if err := shortLogin(t.Context(), second.dsn()); err != nil {
				t.Fatalf("login after the first rolegate exited: %v", err)
			}
		}
		second.signal(t, syscall.SIGINT)
		second.wantExit(t, 30*time.Second)
		if got := strings.Count(second.stderr.String(), "role=trust_user"); got < 5 {
			t.Errorf("the second rolegate logged %d logins, want at least 5", got)
		}
	})
}

// offerer plays the old process for takeOver: it answers one connection on a
// hand-off socket with msg and fds, and returns the successor's answer.
func offerer(t *testing.T, path string, msg []byte, fds ...int) <-chan string {
	t.Helper()
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	answer := make(chan string, 1)
	go func() {
		defer ln.Close()
		c, err := ln.AcceptUnix()
		if err != nil {
			answer <- "accept: " + err.Error()
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		var oob []byte
		if len(fds) > 0 {
			oob = unix.UnixRights(fds...)
		}
		if _, _, err := c.WriteMsgUnix(msg, oob, nil); err != nil {
			answer <- "write: " + err.Error()
			return
		}
		buf := make([]byte, 4096)
		n, err := c.Read(buf)
		if err != nil {
			answer <- "read: " + err.Error()
			return
		}
		answer <- string(buf[:n])
	}()
	return answer
}

// takeOver refuses offers it cannot use, says why to the old process, and
// closes what it received.
func TestTakeOverRefuses(t *testing.T) {
	t.Parallel()
	cfg := config.Default()
	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tcp.Close()
	cfg.Listen = tcp.Addr().String()
	offer := func(o handoffOffer) []byte {
		b, err := json.Marshal(o)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	good := handoffOffer{Version: handoffVersion, PID: 42, Listen: cfg.Listen}
	var tcpFD int
	if err := withFD(tcp, func(fd int) { tcpFD, err = unix.Dup(fd) }); err != nil || tcpFD == 0 {
		t.Fatal(err)
	}
	defer unix.Close(tcpFD)
	unixLn, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(socketDir(t), "u.sock"), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer unixLn.Close()
	var unixFD int
	if err := withFD(unixLn, func(fd int) { unixFD, err = unix.Dup(fd) }); err != nil || unixFD == 0 {
		t.Fatal(err)
	}
	defer unix.Close(unixFD)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()

	tests := []struct {
		name string
		msg  []byte
		fds  []int
		want string
	}{
		{"another version", offer(handoffOffer{Version: 99, PID: 42, Listen: cfg.Listen}), []int{tcpFD},
			"the running rolegate (pid 42) speaks hand-off version 99, this one 1"},
		{"another listen address", offer(handoffOffer{Version: handoffVersion, PID: 42, Listen: "127.0.0.1:1"}), []int{tcpFD},
			"the running rolegate (pid 42) listens on 127.0.0.1:1, this configuration on " + cfg.Listen},
		{"no fd", offer(good), nil, "the offer carried 0 file descriptors, want 1"},
		{"no admin fd", offer(handoffOffer{Version: handoffVersion, PID: 42, Listen: cfg.Listen, Admin: true}), []int{tcpFD},
			"the offer carried 1 file descriptors, want 2"},
		{"not a socket", offer(good), []int{int(r.Fd())}, "the listener offered: "},
		{"not TCP", offer(good), []int{unixFD}, "the listener offered is a *net.UnixListener, not TCP"},
		{"not JSON", []byte("hello"), []int{tcpFD}, "decode the offer: "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(socketDir(t), "h.sock")
			answer := offerer(t, path, tt.msg, tt.fds...)
			tk, err := takeOver(path, cfg)
			if err == nil || !strings.Contains(err.Error(), tt.want) || tk != nil {
				t.Fatalf("takeOver: %v, %v; want an error with %q", tk, err, tt.want)
			}
			if got := <-answer; !strings.HasPrefix(got, handoffRefused) || !strings.Contains(got, tt.want) {
				t.Errorf("the old process heard %q, want a refusal with %q", got, tt.want)
			}
		})
	}
	// The offered socket is still the old process's: it accepts.
	c, err := net.DialTimeout("tcp", cfg.Listen, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	a, err := tcp.Accept()
	if err != nil {
		t.Fatalf("the old listener after the refusals: %v", err)
	}
	a.Close()

	// Nobody at the path, or a socket file nobody serves on: listen afresh.
	dir := socketDir(t)
	if tk, err := takeOver(filepath.Join(dir, "none.sock"), cfg); tk != nil || err != nil {
		t.Errorf("no socket file: %v, %v", tk, err)
	}
	stale, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: filepath.Join(dir, "stale.sock"), Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()
	if tk, err := takeOver(filepath.Join(dir, "stale.sock"), cfg); tk != nil || err != nil {
		t.Errorf("stale socket file: %v, %v", tk, err)
	}

	// listenHandoff replaces a stale socket file, never anything else.
	if ln, err := listenHandoff(filepath.Join(dir, "stale.sock")); err != nil {
		t.Errorf("listenHandoff over a stale socket file: %v", err)
	} else {
		ln.Close()
	}
	live, err := listenHandoff(filepath.Join(dir, "live.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	if ln, err := listenHandoff(filepath.Join(dir, "live.sock")); err == nil || !strings.Contains(err.Error(), "another rolegate serves on it") {
		t.Errorf("listenHandoff over a served socket: %v, %v", ln, err)
	}
	notSocket := filepath.Join(dir, "file")
	if err := os.WriteFile(notSocket, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	if ln, err := listenHandoff(notSocket); err == nil || !strings.Contains(err.Error(), "taken by something that is not a socket") {
		t.Errorf("listenHandoff over a regular file: %v, %v", ln, err)
	}
	if b, err := os.ReadFile(notSocket); err != nil || string(b) != "keep" {
		t.Errorf("the regular file after listenHandoff: %q, %v", b, err)
	}

	// An old process that goes away after the successor's "ok" (before
	// "released") leaves commit without the path.
	path := filepath.Join(dir, "h.sock")
	answer := offerer(t, path, offer(good), tcpFD)
	tk, err := takeOver(path, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer tk.proxy.Close()
	released, err := tk.commit()
	if released || err == nil {
		t.Errorf("commit with an old process gone: released %v, err %v", released, err)
	}
	if got := <-answer; got != handoffOK {
		t.Errorf("the old process heard %q", got)
	}
}

// Connections waiting in the accept queue when the old process stops
// accepting are the successor's: the queue is the shared socket's, and it
// never closes. (With two SO_REUSEPORT sockets, closing the old one resets
// them unless net.ipv4.tcp_migrate_req = 1.)
func TestHandoffKeepsQueuedConnections(t *testing.T) {
	t.Parallel()
	old, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := config.Default()
	cfg.Listen = old.Addr().String()
	path := filepath.Join(socketDir(t), "h.sock")
	hln, err := listenHandoff(path)
	if err != nil {
		t.Fatal(err)
	}
	hs := newHandoffServer(hln, cfg, old, nil, slog.New(slog.DiscardHandler))
	defer hs.stop()

	// Nobody accepts: the kernel completes the handshakes and queues them.
	const n = 50
	clients := make([]net.Conn, n)
	for i := range clients {
		if clients[i], err = net.DialTimeout("tcp", cfg.Listen, 10*time.Second); err != nil {
			t.Fatal(err)
		}
		defer clients[i].Close()
		if _, err := clients[i].Write([]byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	tk, err := takeOver(path, cfg)
	if err != nil || tk == nil {
		t.Fatalf("takeOver: %v, %v", tk, err)
	}
	defer tk.proxy.Close()
	if released, err := tk.commit(); !released || err != nil {
		t.Fatalf("commit: released %v, %v", released, err)
	}
	if pid := <-hs.taken; pid != os.Getpid() {
		t.Errorf("taken by pid %d, want %d", pid, os.Getpid())
	}
	old.Close() // the old process stops accepting, as its drain does

	seen := make(map[byte]bool)
	for range n {
		c, err := tk.proxy.Accept()
		if err != nil {
			t.Fatalf("accept on the handed-over listener: %v", err)
		}
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		b := make([]byte, 1)
		if _, err := c.Read(b); err != nil {
			t.Fatalf("read from a queued connection: %v", err)
		}
		seen[b[0]] = true
		if _, err := c.Write(b); err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	for i, c := range clients {
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		b := make([]byte, 1)
		if _, err := c.Read(b); err != nil || b[0] != byte(i) || !seen[byte(i)] {
			t.Errorf("client %d: echo %v, %v (seen %v)", i, b, err, seen[byte(i)])
		}
	}
	// The path is the successor's to bind now.
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("the old process left the hand-off socket file: %v", err)
	}
}
