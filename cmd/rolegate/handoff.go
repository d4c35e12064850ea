package main

// The hand-off passes the listening sockets of a running rolegate to the one
// that replaces it, over a unix socket (SCM_RIGHTS), as PgBouncer's online
// restart does. Both processes then hold the same sockets: one accept queue,
// which stays open throughout, so no connection waiting in it is reset (as
// it is when a listener of its own closes: see README, "Restarting without
// refusing a login").
//
// The exchange, on a SOCK_SEQPACKET socket (one read, one message):
//
//	old → new  offer: JSON handoffOffer, with the proxy listener's fd (and the
//	           admin HTTP listener's, when Admin) attached
//	new → old  "ok" once it serves on them, or "refused: why"
//	old → new  "released" once it has stopped offering (the path is free)
//
// Who closes what: the old process closes its own fds when it stops
// accepting (it drains as on SIGTERM); the new one owns the fds it received.
// The sockets close only with the last of them. Until "ok" the old process
// goes on serving, so a successor that dies half-way loses nothing.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rolegate/rolegate/config"
)

// handoffVersion changes when the exchange does; the two sides must agree.
const handoffVersion = 1

// handoffTimeout bounds each side's part of the exchange.
const handoffTimeout = 30 * time.Second

// handoffOffer is the old process's first message.
type handoffOffer struct {
	Version   int    `json:"version"`
	PID       int    `json:"pid"`
	Listen    string `json:"listen"`     // its configuration's listen
	AdminHTTP string `json:"admin_http"` // its configuration's [admin] http
	Admin     bool   `json:"admin"`      // the admin HTTP listener's fd follows the proxy listener's
}

const (
	handoffOK       = "ok"
	handoffRefused  = "refused: "
	handoffReleased = "released"
)

// takeover is a hand-off in progress on the new process's side: it holds the
// listeners it received and the connection to the old process.
type takeover struct {
	conn  *net.UnixConn
	from  int          // the old process's pid
	proxy net.Listener // the listen address's socket
	admin net.Listener // the admin HTTP socket; nil: listen on [admin] http here, if set
}

// takeOver asks the rolegate serving the hand-off socket at path for its
// listeners. It returns nil and no error when no rolegate serves there (no
// socket file, or one a stopped process left behind). On an error, anything
// received is closed and the old process goes on serving.
func takeOver(path string, cfg *config.Config) (*takeover, error) {
	c, err := net.DialTimeout("unixpacket", path, handoffTimeout)
	if err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			return nil, nil
		}
		return nil, fmt.Errorf("hand-off: connect to %s: %w", path, err)
	}
	conn := c.(*net.UnixConn)
	if err := conn.SetDeadline(time.Now().Add(handoffTimeout)); err != nil {
		conn.Close()
		return nil, fmt.Errorf("hand-off: %w", err)
	}
	t := &takeover{conn: conn}
	if err := t.receive(cfg); err != nil {
		t.abort(err)
		return nil, fmt.Errorf("hand-off from %s: %w", path, err)
	}
	return t, nil
}

// receive reads the offer and makes listeners of its fds.
func (t *takeover) receive(cfg *config.Config) error {
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(2*4))
	n, oobn, flags, _, err := t.conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return fmt.Errorf("read the offer: %w", err)
	}
	fds, err := parseRights(oob[:oobn])
	var files []*os.File // closed on return: the listeners hold dups
	for _, fd := range fds {
		files = append(files, os.NewFile(uintptr(fd), "handoff"))
	}
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	switch {
	case err != nil:
		return err
	case flags&unix.MSG_CTRUNC != 0:
		return errors.New("the offer carried more file descriptors than expected")
	case n == 0:
		return errors.New("empty offer")
	}
	var offer handoffOffer
	if err := json.Unmarshal(buf[:n], &offer); err != nil {
		return fmt.Errorf("decode the offer: %w", err)
	}
	t.from = offer.PID
	want := 1
	if offer.Admin {
		want = 2
	}
	switch {
	case offer.Version != handoffVersion:
		return fmt.Errorf("the running rolegate (pid %d) speaks hand-off version %d, this one %d", offer.PID, offer.Version, handoffVersion)
	case offer.Listen != cfg.Listen:
		return fmt.Errorf("the running rolegate (pid %d) listens on %s, this configuration on %s", offer.PID, offer.Listen, cfg.Listen)
	case len(files) != want:
		return fmt.Errorf("the offer carried %d file descriptors, want %d", len(files), want)
	}
	if t.proxy, err = net.FileListener(files[0]); err != nil {
		return fmt.Errorf("the listener offered: %w", err)
	}
	if _, ok := t.proxy.(*net.TCPListener); !ok {
		return fmt.Errorf("the listener offered is a %T, not TCP", t.proxy)
	}
	if offer.Admin && offer.AdminHTTP == cfg.Admin.HTTP {
		if t.admin, err = net.FileListener(files[1]); err != nil {
			return fmt.Errorf("the admin HTTP listener offered: %w", err)
		}
	}
	return nil
}

func parseRights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("parse the offer's control message: %w", err)
	}
	var fds []int
	for _, m := range msgs {
		rights, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue // not SCM_RIGHTS
		}
		fds = append(fds, rights...)
	}
	return fds, nil
}

// abort refuses the offer, so that the old process goes on serving, and
// closes what was received.
func (t *takeover) abort(why error) {
	_, _ = t.conn.Write([]byte(handoffRefused + why.Error()))
	t.conn.Close()
	for _, ln := range []net.Listener{t.proxy, t.admin} {
		if ln != nil {
			ln.Close() // our fd only: the old process's keeps the socket open
		}
	}
}

// commit tells the old process that this one serves on the listeners now
// and waits until it has stopped offering them. released reports whether it
// said so, so that the hand-off socket's path is this process's to bind.
func (t *takeover) commit() (released bool, err error) {
	defer t.conn.Close()
	if _, err := t.conn.Write([]byte(handoffOK)); err != nil {
		return false, fmt.Errorf("hand-off: confirm: %w", err)
	}
	buf := make([]byte, 64)
	n, err := t.conn.Read(buf)
	if err != nil {
		return false, fmt.Errorf("hand-off: wait for the old process to release the socket: %w", err)
	}
	return string(buf[:n]) == handoffReleased, nil
}

// handoffServer offers this process's listeners to a successor on a unix
// socket. Its goroutine ends after one successful hand-off or at stop.
type handoffServer struct {
	ln    *net.UnixListener
	proxy net.Listener
	admin net.Listener // nil without an admin HTTP server
	offer handoffOffer
	log   *slog.Logger

	// taken receives the successor's pid once it serves on the listeners;
	// this process must then stop accepting and drain.
	taken    chan int
	done     chan struct{}
	stopOnce sync.Once
}

// listenHandoff binds the hand-off socket at path, readable and writable by
// this user only (whoever connects can take the listeners). A socket file
// nobody serves on any more (its process was killed) is replaced.
func listenHandoff(path string) (*net.UnixListener, error) {
	ln, err := listenPrivate(path)
	if errors.Is(err, syscall.EADDRINUSE) {
		c, derr := net.DialTimeout("unixpacket", path, handoffTimeout)
		if derr == nil {
			c.Close()
			return nil, fmt.Errorf("hand-off socket %s: another rolegate serves on it", path)
		}
		if !errors.Is(derr, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("hand-off socket %s: %w", path, err)
		}
		if fi, serr := os.Lstat(path); serr != nil || fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("hand-off socket %s: the path is taken by something that is not a socket", path)
		}
		if rerr := os.Remove(path); rerr != nil {
			return nil, fmt.Errorf("hand-off socket %s: remove the stale socket: %w", path, rerr)
		}
		ln, err = listenPrivate(path)
	}
	if err != nil {
		return nil, fmt.Errorf("hand-off socket %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("hand-off socket %s: %w", path, err)
	}
	return ln, nil
}

// listenPrivate binds a unixpacket socket at path that is created 0600,
// never more open even for a moment. Linux gives the socket file the mode
// of the socket's own inode, less the umask, so the socket is made 0600
// before the bind (fchmod): unlike setting the umask, which is the
// process's, this touches no file another goroutine creates meanwhile.
func listenPrivate(path string) (*net.UnixListener, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var ferr error
		if err := c.Control(func(fd uintptr) { ferr = syscall.Fchmod(int(fd), 0o600) }); err != nil {
			return err
		}
		return ferr
	}}
	ln, err := lc.Listen(context.Background(), "unixpacket", path)
	if err != nil {
		return nil, err
	}
	return ln.(*net.UnixListener), nil
}

// newHandoffServer offers proxy (and admin, when not nil) on ln.
func newHandoffServer(ln *net.UnixListener, cfg *config.Config, proxy, admin net.Listener, log *slog.Logger) *handoffServer {
	h := &handoffServer{ln: ln, proxy: proxy, admin: admin, log: log,
		offer: handoffOffer{Version: handoffVersion, PID: os.Getpid(), Listen: cfg.Listen, AdminHTTP: cfg.Admin.HTTP, Admin: admin != nil},
		taken: make(chan int, 1), done: make(chan struct{})}
	go h.run()
	return h
}

func (h *handoffServer) run() {
	defer close(h.done)
	for {
		c, err := h.ln.AcceptUnix()
		if err != nil {
			return // stop closed the socket, or a hand-off did
		}
		pid, err := h.exchange(c)
		c.Close()
		if err != nil {
			h.log.Warn("hand-off failed; serving on", "pid", pid, "err", err)
			continue
		}
		h.taken <- pid
		return
	}
}

// exchange offers the listeners on c. Only after the successor's "ok" does
// this process stop offering: it closes the hand-off socket (which removes
// the file) before it says "released", so the successor can bind the path.
func (h *handoffServer) exchange(c *net.UnixConn) (pid int, err error) {
	if cred, err := peerCred(c); err == nil {
		pid = int(cred.Pid)
	}
	if err := c.SetDeadline(time.Now().Add(handoffTimeout)); err != nil {
		return pid, err
	}
	msg, err := json.Marshal(h.offer)
	if err != nil {
		return pid, err
	}
	if err := h.send(c, msg); err != nil {
		return pid, fmt.Errorf("send the listeners: %w", err)
	}
	buf := make([]byte, 4096)
	n, err := c.Read(buf)
	if err != nil {
		return pid, fmt.Errorf("the successor did not confirm: %w", err)
	}
	if answer := string(buf[:n]); answer != handoffOK {
		return pid, fmt.Errorf("the successor %s", strings.TrimSuffix(answer, "\n"))
	}
	h.ln.Close()
	if _, err := c.Write([]byte(handoffReleased)); err != nil {
		// The successor serves; it just will not offer the socket itself.
		h.log.Warn("hand-off: could not tell the successor the socket is free", "pid", pid, "err", err)
	}
	return pid, nil
}

// send writes msg with the listeners' fds attached. The fds are used inside
// Control, so they cannot be closed while they are sent.
func (h *handoffServer) send(c *net.UnixConn, msg []byte) error {
	write := func(fds ...int) error {
		_, _, err := c.WriteMsgUnix(msg, unix.UnixRights(fds...), nil)
		return err
	}
	var werr error
	err := withFD(h.proxy, func(pfd int) {
		if h.admin == nil {
			werr = write(pfd)
			return
		}
		if err := withFD(h.admin, func(afd int) { werr = write(pfd, afd) }); err != nil {
			werr = err
		}
	})
	if err != nil {
		return err
	}
	return werr
}

// withFD runs f with ln's file descriptor.
func withFD(ln net.Listener, f func(fd int)) error {
	sc, ok := ln.(syscall.Conn)
	if !ok {
		return fmt.Errorf("a %T has no file descriptor to hand over", ln)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	return rc.Control(func(fd uintptr) { f(int(fd)) })
}

func peerCred(c *net.UnixConn) (*unix.Ucred, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	return cred, cerr
}

// stop closes the hand-off socket (removing its file) and waits for an
// exchange in progress, which its deadline bounds.
func (h *handoffServer) stop() {
	h.stopOnce.Do(func() { h.ln.Close() })
	<-h.done
}

// listenTCP listens on addr, with SO_REUSEPORT when reusePort.
func listenTCP(addr string, reusePort bool) (net.Listener, error) {
	lc := net.ListenConfig{}
	if reusePort {
		lc.Control = func(_, _ string, c syscall.RawConn) error {
			var serr error
			if err := c.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
			}); err != nil {
				return err
			}
			if serr != nil {
				return fmt.Errorf("set SO_REUSEPORT: %w", serr)
			}
			return nil
		}
	}
	return lc.Listen(context.Background(), "tcp", addr)
}
