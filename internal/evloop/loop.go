//go:build linux

// Package evloop relays established TCP connection pairs with an epoll
// event loop: one goroutine per loop, no goroutine per session or
// direction, and no buffer per session except while a peer is slow to take
// what was read for it. A loop reads a socket when it is readable, hands
// the bytes to the session's Handler (which follows the protocol and may
// rewrite them) and writes them to the peer at once; only what the peer
// does not take goes to a backlog, and the side that sent it is not read
// again until the backlog is written. It is level-triggered: a socket with
// more to read is reported again on the next round.
//
// Loop uses golang.org/x/sys/unix, whose system calls go through the Go
// runtime's entry points: a blocking EpollWait hands its P to other
// goroutines, and a stop-the-world pause does not wait for it.
package evloop

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Dir is a relay direction.
type Dir int

// The directions.
const (
	FromClient Dir = iota // read from the client, written to the server
	FromServer            // read from the server, written to the client
)

func (d Dir) String() string {
	if d == FromClient {
		return "client"
	}
	return "server"
}

// Errors a session ends with when nothing else ended it.
var (
	// ErrClientClosed: the client closed its connection.
	ErrClientClosed = errors.New("client closed the connection")
	// ErrServerClosed: the server closed its connection.
	ErrServerClosed = errors.New("server closed the connection")
	// ErrLoopClosed: the loop was closed with the session still on it.
	ErrLoopClosed = errors.New("event loop closed")
	// ErrTimeout: a draining or closing session ran out of time.
	ErrTimeout = errors.New("timed out")
)

// Stop is what a Handler returns to end relaying after the bytes it
// returns are written.
type Stop struct {
	// Why is the reason the session ends with.
	Why error
	// Drain, for data from the server: read the server on, discarding,
	// until it closes (bounded by Config.DrainTimeout), and end only then.
	// The server closes once the backend has exited, the moment its slot is
	// free: the owner learns it from Closed.
	Drain bool
}

// Handler follows one session. Its methods run on the loop's goroutine, one
// at a time, and must not block.
type Handler interface {
	// Data is called with the bytes read from one side, before they are
	// written to the other. It returns what to write (buf itself, or a
	// rewrite; it may alias buf) and, non-nil, a Stop.
	Data(d Dir, buf []byte) (out []byte, stop *Stop)
	// Farewell gives the last bytes for the client of a session stopped
	// from outside (Session.Stop, Loop.StopAll) for reason why; nil for
	// none.
	Farewell(why error) []byte
	// Closed is called once, after both sockets are closed, with why the
	// session ended.
	Closed(why error)
}

// Config tunes a loop; zero values take the defaults.
type Config struct {
	// ReadSize is the loop's read buffer (shared by its sessions); default
	// 64 KiB.
	ReadSize int
	// DrainTimeout bounds a Stop with Drain; default 5 s.
	DrainTimeout time.Duration
	// FarewellTimeout bounds writing a session's last bytes to a client
	// that does not read, after Session.Stop; default 1 s.
	FarewellTimeout time.Duration
}

// Loop is one epoll set and the goroutine that serves it.
type Loop struct {
	cfg    Config
	epfd   int
	wakefd int // eventfd: work was queued

	mu      sync.Mutex
	queue   []func()
	closing bool
	done    chan struct{}
	once    sync.Once

	// The loop goroutine's own.
	sides    map[int]*side
	sessions map[*Session]struct{}
	timed    map[*Session]struct{} // sessions with a deadline
	buf      []byte
	events   []unix.EpollEvent
}

// New starts a loop; Close ends it.
func New(cfg Config) (*Loop, error) {
	if cfg.ReadSize <= 0 {
		cfg.ReadSize = 64 << 10
	}
	if cfg.DrainTimeout <= 0 {
		cfg.DrainTimeout = 5 * time.Second
	}
	if cfg.FarewellTimeout <= 0 {
		cfg.FarewellTimeout = time.Second
	}
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	wakefd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wakefd, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(wakefd)}); err != nil {
		unix.Close(wakefd)
		unix.Close(epfd)
		return nil, fmt.Errorf("epoll_ctl eventfd: %w", err)
	}
	l := &Loop{cfg: cfg, epfd: epfd, wakefd: wakefd, done: make(chan struct{}),
		sides: map[int]*side{}, sessions: map[*Session]struct{}{}, timed: map[*Session]struct{}{},
		buf: make([]byte, cfg.ReadSize), events: make([]unix.EpollEvent, 128)}
	go l.run()
	return l, nil
}

// Close ends every session still on the loop (ErrLoopClosed) and the loop's
// goroutine, and waits for it. It is safe to call more than once.
func (l *Loop) Close() error {
	l.once.Do(func() {
		l.mu.Lock()
		l.closing = true
		l.mu.Unlock()
		l.wake()
	})
	<-l.done
	return nil
}

// do runs f on the loop's goroutine; false if the loop is closing.
func (l *Loop) do(f func()) bool {
	l.mu.Lock()
	if l.closing {
		l.mu.Unlock()
		return false
	}
	l.queue = append(l.queue, f)
	l.mu.Unlock()
	l.wake()
	return true
}

func (l *Loop) wake() {
	one := [8]byte{1}
	_, _ = unix.Write(l.wakefd, one[:]) // EAGAIN: a wake-up is pending already
}

// Session is one relayed connection pair.
type Session struct {
	l              *Loop
	h              Handler
	client, server side
	// The loop goroutine's own.
	draining bool      // reading the server only to see it close
	closing  bool      // ending once the client's backlog is written
	why      error     // the reason it ends with
	deadline time.Time // for draining and closing
	ended    bool
}

// side is one socket of a session.
type side struct {
	fd      int
	s       *Session
	dir     Dir // what reading this side is
	peer    *side
	backlog []byte // read for this side and not yet written to it
	mask    uint32 // the epoll events asked for
	gone    bool   // closed (or not to be read or written again)
}

// Add moves a connected pair onto the loop: it takes their descriptors (the
// net.Conns are closed; the sockets stay open on the loop's copies) and
// relays between them, first writing toServer and toClient, bytes that were
// read ahead before the hand-over (through h.Data, like any read). On an
// error the pair is left as it was, with the caller.
func (l *Loop) Add(client, server *net.TCPConn, toServer, toClient []byte, h Handler) (*Session, error) {
	l.mu.Lock()
	closing := l.closing
	l.mu.Unlock()
	if closing {
		return nil, ErrLoopClosed
	}
	cfd, err := dupFD(client)
	if err != nil {
		return nil, fmt.Errorf("take client socket: %w", err)
	}
	sfd, err := dupFD(server)
	if err != nil {
		unix.Close(cfd)
		return nil, fmt.Errorf("take server socket: %w", err)
	}
	s := &Session{l: l, h: h}
	s.client = side{fd: cfd, s: s, dir: FromClient, peer: &s.server}
	s.server = side{fd: sfd, s: s, dir: FromServer, peer: &s.client}
	toServer, toClient = clone(toServer), clone(toClient)
	if !l.do(func() { l.start(s, toServer, toClient) }) {
		unix.Close(cfd)
		unix.Close(sfd)
		return nil, ErrLoopClosed
	}
	// The loop has its own descriptors now; closing these takes the
	// originals out of Go's poller, and leaves the sockets open.
	client.Close()
	server.Close()
	return s, nil
}

func clone(b []byte) []byte {
	if len(b) == 0 {
		return nil
	}
	return append([]byte(nil), b...)
}

// dupFD returns a non-blocking, close-on-exec copy of c's descriptor.
func dupFD(c *net.TCPConn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	nfd := -1
	var derr error
	if err := rc.Control(func(fd uintptr) {
		nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return -1, err
	}
	if derr != nil {
		return -1, derr
	}
	if err := unix.SetNonblock(nfd, true); err != nil {
		unix.Close(nfd)
		return -1, err
	}
	return nfd, nil
}

// Stop ends the session from outside, for a reason such as a shutdown: the
// server side closes at once, the Handler's Farewell gives the last bytes
// for the client, and the client side closes once they are written, or
// after Config.FarewellTimeout. Stopping a session that has ended does
// nothing.
func (s *Session) Stop(why error) {
	s.l.do(func() { s.l.stopSession(s, why) })
}

// StopAll stops every session on the loop, as Session.Stop does.
func (l *Loop) StopAll(why error) {
	l.do(func() {
		for s := range l.sessions {
			l.stopSession(s, why)
		}
	})
}

func (l *Loop) stopSession(s *Session, why error) {
	if s.ended {
		return
	}
	if s.closing {
		// Already ending, maybe waiting for a client that does not read
		// the server's last bytes: a stop bounds that wait.
		if _, timed := l.timed[s]; !timed {
			s.why = why
			s.deadline = time.Now().Add(l.cfg.FarewellTimeout)
			l.timed[s] = struct{}{}
		}
		return
	}
	s.why = why
	s.draining = false
	l.closeSide(&s.server)
	out := l.farewell(s, why)
	l.setMask(&s.client, s.client.mask&^unix.EPOLLIN) // nothing from the client matters now
	l.closeAfter(s, out, l.cfg.FarewellTimeout)
}

// start registers the session's sockets and writes what was read ahead.
func (l *Loop) start(s *Session, toServer, toClient []byte) {
	l.sessions[s] = struct{}{}
	for _, sd := range []*side{&s.client, &s.server} {
		sd.mask = unix.EPOLLIN // a peer's FIN shows as readable, and read returns 0
		if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, sd.fd, &unix.EpollEvent{Events: sd.mask, Fd: int32(sd.fd)}); err != nil {
			l.end(s, fmt.Errorf("epoll_ctl: %w", err))
			return
		}
		l.sides[sd.fd] = sd
	}
	for _, ahead := range []struct {
		src *side
		b   []byte
	}{{&s.client, toServer}, {&s.server, toClient}} {
		if len(ahead.b) == 0 || s.ended {
			continue
		}
		out, stop := l.data(s, ahead.src.dir, ahead.b)
		l.forward(ahead.src, out)
		if stop != nil && !s.ended {
			l.stop(s, ahead.src, stop)
		}
	}
}

func (l *Loop) run() {
	defer close(l.done)
	defer l.shutdown()
	for {
		n, err := unix.EpollWait(l.epfd, l.events, l.timeout())
		if err != nil && !errors.Is(err, unix.EINTR) {
			panic(fmt.Sprintf("evloop: epoll_wait: %v", err)) // a bad epoll fd: a bug
		}
		for _, ev := range l.events[:max(n, 0)] {
			if int(ev.Fd) == l.wakefd {
				if l.drainQueue() {
					return
				}
				continue
			}
			if sd := l.sides[int(ev.Fd)]; sd != nil {
				l.ready(sd, ev.Events)
			}
		}
		l.expire()
	}
}

// drainQueue runs the work queued for the loop; true when the loop is
// closing.
func (l *Loop) drainQueue() bool {
	var b [8]byte
	_, _ = unix.Read(l.wakefd, b[:])
	l.mu.Lock()
	q, closing := l.queue, l.closing
	l.queue = nil
	l.mu.Unlock()
	for _, f := range q {
		f()
	}
	return closing
}

// shutdown ends every session and releases the loop's descriptors.
func (l *Loop) shutdown() {
	l.mu.Lock()
	q := l.queue
	l.queue = nil
	l.mu.Unlock()
	for _, f := range q { // Adds that came before the close
		f()
	}
	for s := range l.sessions {
		l.end(s, ErrLoopClosed)
	}
	unix.Close(l.wakefd)
	unix.Close(l.epfd)
}

// timeout is EpollWait's timeout in ms: until the nearest deadline, or none.
func (l *Loop) timeout() int {
	if len(l.timed) == 0 {
		return -1
	}
	var next time.Time
	for s := range l.timed {
		if next.IsZero() || s.deadline.Before(next) {
			next = s.deadline
		}
	}
	d := time.Until(next)
	if d <= 0 {
		return 0
	}
	return int(d/time.Millisecond) + 1
}

// expire ends the sessions whose deadline passed.
func (l *Loop) expire() {
	if len(l.timed) == 0 {
		return
	}
	now := time.Now()
	for s := range l.timed {
		if !now.Before(s.deadline) {
			why := s.why
			if why == nil {
				why = ErrTimeout
			}
			l.end(s, why)
		}
	}
}

// ready handles epoll's report on one socket.
func (l *Loop) ready(sd *side, events uint32) {
	s := sd.s
	if events&unix.EPOLLOUT != 0 && sd.mask&unix.EPOLLOUT != 0 && !sd.gone {
		l.flush(sd)
	}
	if s.ended || sd.gone {
		return
	}
	// epoll reports a hang-up or an error whatever was asked for: the socket
	// is read then too, or a side not being read would be reported forever.
	readable := events&unix.EPOLLIN != 0 && sd.mask&unix.EPOLLIN != 0
	if !readable && events&(unix.EPOLLHUP|unix.EPOLLERR) == 0 {
		return
	}
	n, err := unix.Read(sd.fd, l.buf)
	if n > 0 {
		if s.draining && sd.dir == FromServer {
			return // only its close matters now
		}
		out, stop := l.data(s, sd.dir, l.buf[:n])
		l.forward(sd, out)
		if stop != nil && !s.ended {
			l.stop(s, sd, stop)
		}
		return
	}
	if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
		return
	}
	l.closed(sd, err)
}

// forward writes out, read from src, to src's peer; what the peer does not
// take waits in its backlog, and src is not read until it is written.
func (l *Loop) forward(src *side, out []byte) {
	dst := src.peer
	if dst.gone || len(out) == 0 {
		return
	}
	if len(dst.backlog) > 0 {
		dst.backlog = append(dst.backlog, out...)
		return
	}
	n, err := write(dst.fd, out)
	if err != nil {
		l.writeFailed(dst, err)
		return
	}
	if n == len(out) {
		return
	}
	dst.backlog = append([]byte(nil), out[n:]...)
	l.setMask(dst, dst.mask|unix.EPOLLOUT)
	if !src.gone {
		l.setMask(src, src.mask&^unix.EPOLLIN)
	}
}

// flush writes dst's backlog; once it is empty, its peer is read again.
func (l *Loop) flush(dst *side) {
	s := dst.s
	if len(dst.backlog) > 0 {
		n, err := write(dst.fd, dst.backlog)
		if err != nil {
			l.writeFailed(dst, err)
			return
		}
		if n < len(dst.backlog) {
			dst.backlog = dst.backlog[n:]
			return
		}
	}
	dst.backlog = nil
	l.setMask(dst, dst.mask&^unix.EPOLLOUT)
	if s.closing && dst == &s.client {
		l.end(s, s.why)
		return
	}
	if src := dst.peer; !src.gone && !s.closing {
		l.setMask(src, src.mask|unix.EPOLLIN)
	}
}

// write writes b to fd once, as much as the socket takes; EAGAIN is 0 bytes.
func write(fd int, b []byte) (int, error) {
	for {
		n, err := unix.Write(fd, b)
		switch {
		case err == nil:
			return n, nil
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.EAGAIN):
			return 0, nil
		}
		return 0, err
	}
}

// writeFailed ends the session whose write to dst failed.
func (l *Loop) writeFailed(dst *side, err error) {
	s := dst.s
	if s.draining && dst == &s.server {
		return // the server is on its way out; its close ends the session
	}
	why := s.why
	if why == nil {
		why = fmt.Errorf("write to %s: %w", dst.dir, err)
	}
	l.end(s, why)
}

// closed handles a side that reached EOF or failed: the session ends, once
// what was read for the other side has been written to it.
func (l *Loop) closed(sd *side, err error) {
	s := sd.s
	why := s.why
	if why == nil {
		switch {
		case err != nil && sd.dir == FromClient:
			why = fmt.Errorf("read from client: %w", err)
		case err != nil:
			why = fmt.Errorf("read from server: %w", err)
		case sd.dir == FromClient:
			why = ErrClientClosed
		default:
			why = ErrServerClosed
		}
	}
	s.why = why
	l.closeSide(sd)
	if s.draining && sd.dir == FromClient {
		return // the session ends with the server's close, the moment it matters
	}
	peer := sd.peer
	if peer.gone || len(peer.backlog) == 0 {
		l.end(s, why)
		return
	}
	if sd.dir == FromServer {
		// The server's last words (an error, a notice) reach the client
		// first, however long it takes it to read them, as a write would.
		s.closing = true
		l.setMask(peer, peer.mask&^unix.EPOLLIN)
		return
	}
	l.end(s, why) // the server need not hear what the gone client said
}

// stop carries out a Handler's Stop on data read from src.
func (l *Loop) stop(s *Session, src *side, st *Stop) {
	s.why = st.Why
	if st.Drain && src.dir == FromServer {
		s.draining = true
		s.deadline = time.Now().Add(l.cfg.DrainTimeout)
		l.timed[s] = struct{}{}
		return
	}
	l.closeAfter(s, nil, l.cfg.FarewellTimeout)
}

// closeAfter ends s once out, and its client backlog, are written, or at
// the deadline; neither side is read meanwhile.
func (l *Loop) closeAfter(s *Session, out []byte, timeout time.Duration) {
	if s.ended {
		return
	}
	s.closing = true
	if len(out) > 0 {
		l.forward(&s.server, out)
		if s.ended {
			return
		}
	}
	if s.client.gone || len(s.client.backlog) == 0 {
		l.end(s, s.why)
		return
	}
	l.setMask(&s.client, (s.client.mask|unix.EPOLLOUT)&^unix.EPOLLIN)
	l.setMask(&s.server, s.server.mask&^unix.EPOLLIN)
	s.deadline = time.Now().Add(timeout)
	l.timed[s] = struct{}{}
}

// setMask asks epoll for events on sd.
func (l *Loop) setMask(sd *side, mask uint32) {
	if sd.gone || mask == sd.mask {
		return
	}
	sd.mask = mask
	if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_MOD, sd.fd, &unix.EpollEvent{Events: mask, Fd: int32(sd.fd)}); err != nil {
		l.end(sd.s, fmt.Errorf("epoll_ctl: %w", err))
	}
}

// closeSide closes one socket of a session.
func (l *Loop) closeSide(sd *side) {
	if sd.gone {
		return
	}
	sd.gone = true
	sd.backlog = nil
	if l.sides[sd.fd] == sd {
		delete(l.sides, sd.fd)
		_ = unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, sd.fd, nil)
	}
	unix.Close(sd.fd)
}

// end closes what is left of s and tells its Handler, once.
func (l *Loop) end(s *Session, why error) {
	if s.ended {
		return
	}
	s.ended = true
	l.closeSide(&s.client)
	l.closeSide(&s.server)
	delete(l.sessions, s)
	delete(l.timed, s)
	if why == nil {
		why = ErrLoopClosed
	}
	defer func() { _ = recover() }() // a Handler's panic must not end the loop
	s.h.Closed(why)
}

// data calls the Handler's Data; a panic there ends the session, not the
// loop and every other session on it.
func (l *Loop) data(s *Session, d Dir, b []byte) (out []byte, stop *Stop) {
	defer func() {
		if v := recover(); v != nil {
			out, stop = nil, &Stop{Why: fmt.Errorf("internal error: %v", v)}
		}
	}()
	return s.h.Data(d, b)
}

// farewell calls the Handler's Farewell; a panic there says nothing.
func (l *Loop) farewell(s *Session, why error) (out []byte) {
	defer func() {
		if v := recover(); v != nil {
			out = nil
		}
	}()
	return s.h.Farewell(why)
}
