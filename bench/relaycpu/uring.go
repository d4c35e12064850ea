//go:build linux

package main

// The uring relays: the same plain byte relay as the others, driven by one
// goroutine around an io_uring ring instead of an epoll set. Each socket
// has one request outstanding at a time: a recv into its own buffer, then,
// when it completes, a send of those bytes to the peer (resubmitted for the
// rest after a short send), and only when the send has completed a recv
// again, which gives the same backpressure as the epoll loop's backlog. All
// the requests that the completions of one batch call for are submitted,
// and the next completions waited for, in one io_uring_enter.
//
// Raw system calls through golang.org/x/sys/unix, not a library: no Go
// io_uring package is among the module versions known to work here, the
// relay needs four operations (recv, send, read of an eventfd, and the
// enter), and unix.Syscall6 is the Go runtime's ordinary system call entry,
// so a goroutine blocked in io_uring_enter has handed off its P and never
// holds up a stop-the-world (as the epoll loop blocked in epoll_wait).
//
// Variants (the -modes names):
//
//	uring        recv and send requests as described, ring flags 0
//	uring-link   the send and the recv after it submitted together, linked
//	             (IOSQE_IO_LINK): the recv starts when the send completes,
//	             without waiting for the loop to see the send's completion;
//	             the send is MSG_WAITALL, so io_uring itself sends the rest
//	             after a short send; a send that fails after a part breaks
//	             the link (the recv completes with -ECANCELED) and the loop
//	             resubmits the rest, which then fails too
//	uring-locked uring-link with the goroutine locked to its thread: io_uring
//	             queues a request's completion work (task work) to the
//	             thread that submitted it, so a goroutine that has moved to
//	             another thread since has the old one woken to run it
//	uring-defer  uring-link on a ring with IORING_SETUP_SINGLE_ISSUER and
//	             IORING_SETUP_DEFER_TASKRUN: completions are run only
//	             when the loop asks for them in io_uring_enter, not by
//	             interrupting it (the goroutine is locked to its thread, as
//	             the ring then requires)
//	uring-multi  one multishot recv per socket (IORING_RECV_MULTISHOT) into
//	             buffers from a ring of provided buffers shared by all
//	             sessions (IORING_REGISTER_PBUF_RING), sent in order to the
//	             peer and handed back when sent, on a DEFER_TASKRUN ring: a
//	             socket stays armed across reads, where a single-shot recv
//	             that finds nothing arms a poll anew every time. It has no
//	             backpressure per session (a socket is read on while its
//	             peer's sends wait; it ends when the shared buffers run out,
//	             and is armed again when one comes back): enough to measure,
//	             not for a proxy
//	uring-sqpoll uring-link on a ring with IORING_SETUP_SQPOLL: a kernel
//	             thread of the process takes the SQEs off the ring (and
//	             spins for 2 ms after the last before it sleeps)

import (
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// From linux/io_uring.h.
const (
	iorOpRead = 22
	iorOpSend = 26
	iorOpRecv = 27

	iosqeIOLink       = 1 << 2
	iosqeBufferSelect = 1 << 5

	iorRecvMultishot = 1 << 1 // in the SQE's ioprio

	iorCQEFBuffer     = 1 << 0
	iorCQEFMore       = 1 << 1
	iorCQEBufferShift = 16

	iorRegisterPbufRing = 22

	iorSetupSQPoll       = 1 << 1
	iorSetupSingleIssuer = 1 << 12
	iorSetupDeferTaskrun = 1 << 13

	iorFeatSingleMmap = 1 << 0

	iorEnterGetevents = 1 << 0
	iorEnterSQWakeup  = 1 << 1

	iorSQNeedWakeup = 1 << 0

	iorOffSQRing = 0
	iorOffSQEs   = 0x10000000
)

// uringParams is struct io_uring_params.
type uringParams struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFD uint32
	resv                                                                   [3]uint32
	sqOff                                                                  struct {
		head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
		userAddr                                                        uint64
	}
	cqOff struct {
		head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
		userAddr                                                        uint64
	}
}

// uringSQE is struct io_uring_sqe (64 bytes), the fields the relay uses.
type uringSQE struct {
	opcode   uint8
	flags    uint8
	ioprio   uint16
	fd       int32
	off      uint64
	addr     uint64
	len      uint32
	opFlags  uint32
	userData uint64
	bufGroup uint16 // buf_index / buf_group
	_        [22]byte
}

// uringCQE is struct io_uring_cqe.
type uringCQE struct {
	userData uint64
	res      int32
	flags    uint32
}

// wakeID is the user_data of the eventfd read that wakes the loop for new
// sessions; the others are side slots.
const wakeID = ^uint64(0)

// uringRelay is one ring and the goroutine that serves it.
type uringRelay struct {
	link, multi bool

	// uring-multi: the provided buffers (mapped, off the Go heap) and the
	// ring they are handed to the kernel through.
	pbufMem, pbufRing []byte
	pbufTail          uint16
	pbufMask          uint16
	starved           []*uringSide // multishot recvs ended for want of a buffer

	ringFD         int
	ringMem, sqMem []byte
	sqHead, sqTail *uint32
	sqFlags        *uint32 // with SQPOLL: whether its thread sleeps
	sqMask         uint32
	sqes           []uringSQE
	cqHead, cqTail *uint32
	cqMask         uint32
	cqe            []uringCQE
	toSubmit       uint32 // SQEs queued since the last enter
	mode           string
	enters, cqes   int64 // counted for the report at Close

	wakeFD  int
	wakeBuf [8]byte // the eventfd read's target, kept alive here

	mu      sync.Mutex
	queue   [][2]int // dup'd (client, server) descriptors to start
	closing bool
	done    chan struct{}

	// The loop goroutine's own.
	sides []*uringSide // by slot, the user_data of its requests
	free  []int
	live  int // sessions not yet released
}

// uringSide is one socket of a session.
type uringSide struct {
	id       uint64
	fd       int
	peer     *uringSide
	sess     *uringSession
	buf      []byte // what recv fills and the peer's send takes from
	off, n   int    // the part of buf still to send to the peer
	sending  bool   // the request outstanding on this socket's buffer is the peer's send
	inflight int    // requests outstanding that use this side's buffer

	// uring-multi: the provided buffers read from this side and not yet
	// sent to the peer, in order (the first is being sent from off).
	pending []uringPbuf
}

// uringPbuf is a provided buffer holding n bytes read.
type uringPbuf struct {
	bid uint16
	n   int
}

// uringSession is one relayed connection pair on a ring.
type uringSession struct {
	client, server uringSide
	dead           bool
	bytes          int64 // what the Handler-less relay still does: count
}

// newUringRelay starts a ring and its goroutine for mode (see the variants
// above).
func newUringRelay(mode string) (*uringRelay, error) {
	var flags uint32
	lock := false
	r := &uringRelay{done: make(chan struct{}), mode: mode}
	switch mode {
	case "uring":
	case "uring-link":
		r.link = true
	case "uring-locked":
		r.link = true
		lock = true
	case "uring-defer":
		r.link = true
		flags = iorSetupSingleIssuer | iorSetupDeferTaskrun
	case "uring-multi":
		r.multi = true
		flags = iorSetupSingleIssuer | iorSetupDeferTaskrun
	case "uring-sqpoll":
		r.link = true
		flags = iorSetupSQPoll
	default:
		return nil, fmt.Errorf("unknown relay %q", mode)
	}
	started := make(chan error, 1)
	go func() {
		defer close(r.done)
		if lock || flags&iorSetupSingleIssuer != 0 {
			// SINGLE_ISSUER: the ring takes requests from the thread that
			// made it only. Without DEFER_TASKRUN, a request's completion
			// work is queued to the thread that submitted it, which a
			// goroutine that moves between threads may have left idle.
			runtime.LockOSThread()
		}
		if err := r.setup(1024, flags); err != nil {
			started <- err
			return
		}
		started <- nil
		r.run()
	}()
	if err := <-started; err != nil {
		return nil, err
	}
	return r, nil
}

// setup makes the ring, maps it and arms the wake-up read.
func (r *uringRelay) setup(entries, flags uint32) error {
	var p uringParams
	p.flags = flags
	p.sqThreadIdle = 2 // ms of an empty queue before the SQPOLL thread sleeps
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		return fmt.Errorf("io_uring_setup: %w", errno)
	}
	r.ringFD = int(fd)
	if p.features&iorFeatSingleMmap == 0 {
		unix.Close(r.ringFD)
		return errors.New("io_uring: kernel without IORING_FEAT_SINGLE_MMAP")
	}
	size := max(p.sqOff.array+p.sqEntries*4, p.cqOff.cqes+p.cqEntries*uint32(unsafe.Sizeof(uringCQE{})))
	var err error
	if r.ringMem, err = unix.Mmap(r.ringFD, iorOffSQRing, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		unix.Close(r.ringFD)
		return fmt.Errorf("mmap io_uring rings: %w", err)
	}
	if r.sqMem, err = unix.Mmap(r.ringFD, iorOffSQEs, int(p.sqEntries)*int(unsafe.Sizeof(uringSQE{})), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		unix.Munmap(r.ringMem)
		unix.Close(r.ringFD)
		return fmt.Errorf("mmap io_uring SQEs: %w", err)
	}
	at := func(off uint32) unsafe.Pointer { return unsafe.Pointer(&r.ringMem[off]) }
	r.sqHead, r.sqTail = (*uint32)(at(p.sqOff.head)), (*uint32)(at(p.sqOff.tail))
	r.sqMask = *(*uint32)(at(p.sqOff.ringMask))
	if flags&iorSetupSQPoll != 0 {
		r.sqFlags = (*uint32)(at(p.sqOff.flags))
	}
	// The SQ index array maps ring slot i to SQE i, once and for all.
	array := unsafe.Slice((*uint32)(at(p.sqOff.array)), p.sqEntries)
	for i := range array {
		array[i] = uint32(i)
	}
	r.sqes = unsafe.Slice((*uringSQE)(unsafe.Pointer(&r.sqMem[0])), p.sqEntries)
	r.cqHead, r.cqTail = (*uint32)(at(p.cqOff.head)), (*uint32)(at(p.cqOff.tail))
	r.cqMask = *(*uint32)(at(p.cqOff.ringMask))
	r.cqe = unsafe.Slice((*uringCQE)(at(p.cqOff.cqes)), p.cqEntries)

	// A blocking eventfd: io_uring waits for it to be readable by itself
	// (an O_NONBLOCK one would complete the read with -EAGAIN).
	if r.wakeFD, err = unix.Eventfd(0, unix.EFD_CLOEXEC); err != nil {
		r.release()
		return fmt.Errorf("eventfd: %w", err)
	}
	if r.multi {
		if err := r.setupPbufs(); err != nil {
			unix.Close(r.wakeFD)
			r.release()
			return err
		}
	}
	r.armWake()
	return nil
}

func (r *uringRelay) release() {
	unix.Munmap(r.sqMem)
	unix.Munmap(r.ringMem)
	unix.Close(r.ringFD)
}

// Add moves a connected pair onto the ring (the net.Conns are closed; the
// ring has its own descriptors of the sockets).
func (r *uringRelay) Add(client, server *net.TCPConn) error {
	cfd, err := dupBlocking(client)
	if err != nil {
		return fmt.Errorf("take client socket: %w", err)
	}
	sfd, err := dupBlocking(server)
	if err != nil {
		unix.Close(cfd)
		return fmt.Errorf("take server socket: %w", err)
	}
	r.mu.Lock()
	if r.closing {
		r.mu.Unlock()
		unix.Close(cfd)
		unix.Close(sfd)
		return errors.New("ring closed")
	}
	r.queue = append(r.queue, [2]int{cfd, sfd})
	r.mu.Unlock()
	client.Close()
	server.Close()
	r.wake()
	return nil
}

// Close ends every session and the ring's goroutine, and waits for it.
func (r *uringRelay) Close() error {
	r.mu.Lock()
	r.closing = true
	r.mu.Unlock()
	r.wake()
	<-r.done
	return nil
}

func (r *uringRelay) wake() {
	one := [8]byte{1}
	_, _ = unix.Write(r.wakeFD, one[:])
}

// dupBlocking returns a blocking, close-on-exec copy of c's descriptor:
// io_uring tries a socket without waiting and, when it would block, waits
// for it to be ready by itself; on an O_NONBLOCK descriptor some requests
// complete with -EAGAIN instead.
func dupBlocking(c *net.TCPConn) (int, error) {
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
	if err := unix.SetNonblock(nfd, false); err != nil {
		unix.Close(nfd)
		return -1, err
	}
	return nfd, nil
}

// sqe returns the next free SQE, zeroed, submitting what is queued first
// if the ring is full.
func (r *uringRelay) sqe() *uringSQE {
	for {
		tail := *r.sqTail // only this goroutine writes it
		if tail-atomic.LoadUint32(r.sqHead) <= r.sqMask {
			e := &r.sqes[tail&r.sqMask]
			*e = uringSQE{}
			return e
		}
		r.enter(0)
	}
}

// push makes the SQE written at the tail visible to the kernel.
func (r *uringRelay) push() {
	atomic.StoreUint32(r.sqTail, *r.sqTail+1)
	r.toSubmit++
}

// enter submits the queued SQEs and waits for minComplete completions.
func (r *uringRelay) enter(minComplete uint32) {
	flags := uintptr(0)
	if minComplete > 0 {
		flags = iorEnterGetevents
	}
	if r.sqFlags != nil {
		// The kernel's thread takes the SQEs; enter only wakes it, if it
		// sleeps, and waits.
		r.toSubmit = 0
		if atomic.LoadUint32(r.sqFlags)&iorSQNeedWakeup != 0 {
			flags |= iorEnterSQWakeup
		} else if minComplete == 0 {
			return
		}
	}
	for {
		r.enters++
		n, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.ringFD), uintptr(r.toSubmit), uintptr(minComplete), flags, 0, 0)
		switch errno {
		case 0:
			r.toSubmit -= uint32(n)
			return
		case unix.EINTR, unix.EAGAIN, unix.EBUSY:
			if r.toSubmit == 0 || minComplete == 0 {
				return
			}
			continue
		}
		panic(fmt.Sprintf("io_uring_enter: %v", errno)) // a bad ring: a bug
	}
}

func (r *uringRelay) armWake() {
	e := r.sqe()
	e.opcode, e.fd = iorOpRead, int32(r.wakeFD)
	e.addr, e.len = uint64(uintptr(unsafe.Pointer(&r.wakeBuf[0]))), uint32(len(r.wakeBuf))
	e.userData = wakeID
	r.push()
}

// recv asks for the next bytes from sd into its buffer.
func (r *uringRelay) recv(sd *uringSide) {
	e := r.sqe()
	r.fillRecv(e, sd)
	r.push()
}

func (r *uringRelay) fillRecv(e *uringSQE, sd *uringSide) {
	e.opcode, e.fd = iorOpRecv, int32(sd.fd)
	e.addr, e.len = uint64(uintptr(unsafe.Pointer(&sd.buf[0]))), uint32(len(sd.buf))
	e.userData = sd.id
	sd.sending = false
	sd.inflight++
}

// send asks for what sd read (the rest of it) to be written to its peer,
// and, linked, for sd's next recv once it is.
func (r *uringRelay) send(sd *uringSide) {
	e := r.sqe()
	e.opcode, e.fd = iorOpSend, int32(sd.peer.fd)
	e.addr, e.len = uint64(uintptr(unsafe.Pointer(&sd.buf[sd.off]))), uint32(sd.n-sd.off)
	e.opFlags = unix.MSG_NOSIGNAL
	e.userData = sd.id
	sd.sending = true
	sd.inflight++
	if r.link {
		// A short send completes a request and lets the linked recv run,
		// over bytes not yet sent, unless it is MSG_WAITALL: then io_uring
		// sends the rest itself, and breaks the link only on an error.
		e.opFlags |= unix.MSG_WAITALL
		e.flags = iosqeIOLink
		r.push()
		e := r.sqe()
		r.fillRecv(e, sd)
		sd.sending = true // the send's completion comes first
	}
	r.push()
}

func (r *uringRelay) run() {
	defer r.shutdown()
	for closing := false; !closing; {
		r.enter(1)
		head, tail := *r.cqHead, atomic.LoadUint32(r.cqTail)
		for ; head != tail; head++ {
			c := r.cqe[head&r.cqMask]
			r.cqes++
			if c.userData == wakeID {
				closing = r.drainQueue()
				continue
			}
			r.dispatch(c)
		}
		atomic.StoreUint32(r.cqHead, head)
	}
}

func (r *uringRelay) dispatch(c uringCQE) {
	if r.multi {
		r.completeMulti(r.sides[c.userData>>1], c.userData&1 == 1, c)
		return
	}
	r.complete(r.sides[c.userData], c.res)
}

// complete handles the completion of sd's outstanding request.
func (r *uringRelay) complete(sd *uringSide, res int32) {
	s := sd.sess
	sd.inflight--
	sending := sd.sending
	if r.link && sending && sd.inflight > 0 {
		sd.sending = false // the linked recv is next
	}
	if s.dead {
		r.maybeRelease(s)
		return
	}
	switch {
	case sending && res >= 0:
		sd.off += int(res)
		if sd.off < sd.n { // a short send: the rest, then the recv
			if r.link {
				return // the linked recv completes with -ECANCELED; resend then
			}
			r.send(sd)
			return
		}
		if !r.link {
			r.recv(sd)
		}
	case !sending && res > 0:
		sd.off, sd.n = 0, int(res)
		s.bytes += int64(res)
		r.send(sd)
	case !sending && (res == -int32(unix.EINTR) || res == -int32(unix.EAGAIN)):
		r.recv(sd)
	case !sending && res == -int32(unix.ECANCELED) && r.link && sd.off < sd.n:
		r.send(sd) // after a short linked send
	default: // EOF or an error, either way
		r.kill(s)
	}
}

// drainQueue starts the queued sessions and re-arms the wake-up read; true
// when the ring is closing.
func (r *uringRelay) drainQueue() bool {
	r.mu.Lock()
	q, closing := r.queue, r.closing
	r.queue = nil
	r.mu.Unlock()
	for _, fds := range q {
		s := &uringSession{}
		s.client = uringSide{fd: fds[0], peer: &s.server, sess: s}
		s.server = uringSide{fd: fds[1], peer: &s.client, sess: s}
		for _, sd := range []*uringSide{&s.client, &s.server} {
			if n := len(r.free); n > 0 {
				sd.id = uint64(r.free[n-1])
				r.free = r.free[:n-1]
				r.sides[sd.id] = sd
			} else {
				sd.id = uint64(len(r.sides))
				r.sides = append(r.sides, sd)
			}
			if r.multi {
				r.recvMulti(sd)
				continue
			}
			sd.buf = make([]byte, 64<<10)
			r.recv(sd)
		}
		r.live++
	}
	if closing {
		return true
	}
	r.armWake()
	return false
}

// kill ends a session: shutting its sockets down completes their
// outstanding requests; the descriptors are closed once they have.
func (r *uringRelay) kill(s *uringSession) {
	if s.dead {
		return
	}
	s.dead = true
	_ = unix.Shutdown(s.client.fd, unix.SHUT_RDWR)
	_ = unix.Shutdown(s.server.fd, unix.SHUT_RDWR)
	r.maybeRelease(s)
}

func (r *uringRelay) maybeRelease(s *uringSession) {
	if s.client.inflight > 0 || s.server.inflight > 0 {
		return
	}
	for _, sd := range []*uringSide{&s.client, &s.server} {
		for _, b := range sd.pending {
			r.giveBack(b.bid)
		}
		sd.pending = nil
		unix.Close(sd.fd)
		r.sides[sd.id] = nil
		r.free = append(r.free, int(sd.id))
	}
	r.live--
}

// shutdown ends every session, waits for their requests, and releases the
// ring.
func (r *uringRelay) shutdown() {
	// The system calls the relay made for its sessions, without strace
	// (which slows each call and so makes batches larger).
	fmt.Fprintf(os.Stderr, "relaycpu child %s: %d io_uring_enter, %d completions\n", r.mode, r.enters, r.cqes)
	for _, sd := range r.sides {
		if sd != nil {
			r.kill(sd.sess)
		}
	}
	for r.live > 0 {
		r.enter(1)
		head, tail := *r.cqHead, atomic.LoadUint32(r.cqTail)
		for ; head != tail; head++ {
			c := r.cqe[head&r.cqMask]
			if c.userData != wakeID {
				r.dispatch(c)
			}
		}
		atomic.StoreUint32(r.cqHead, head)
	}
	unix.Close(r.wakeFD)
	r.release()
	if r.pbufMem != nil {
		unix.Munmap(r.pbufMem)
		unix.Munmap(r.pbufRing)
	}
}

// The provided buffers of uring-multi.
const (
	pbufCount = 256      // a power of two
	pbufSize  = 16 << 10 // bytes each
)

// setupPbufs maps the provided buffers and registers the ring that hands
// them to the kernel (buffer group 0), full.
func (r *uringRelay) setupPbufs() error {
	var err error
	if r.pbufMem, err = unix.Mmap(-1, 0, pbufCount*pbufSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE); err != nil {
		return fmt.Errorf("mmap provided buffers: %w", err)
	}
	if r.pbufRing, err = unix.Mmap(-1, 0, pbufCount*16, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE); err != nil {
		unix.Munmap(r.pbufMem)
		return fmt.Errorf("mmap provided-buffer ring: %w", err)
	}
	reg := struct {
		ringAddr    uint64
		ringEntries uint32
		bgid, pad   uint16
		resv        [3]uint64
	}{ringAddr: uint64(uintptr(unsafe.Pointer(&r.pbufRing[0]))), ringEntries: pbufCount}
	if _, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.ringFD), iorRegisterPbufRing, uintptr(unsafe.Pointer(&reg)), 1, 0, 0); errno != 0 {
		unix.Munmap(r.pbufMem)
		unix.Munmap(r.pbufRing)
		return fmt.Errorf("io_uring_register PBUF_RING: %w", errno)
	}
	r.pbufMask = pbufCount - 1
	for bid := range uint16(pbufCount) {
		r.giveBack(bid)
	}
	return nil
}

// giveBack hands provided buffer bid to the kernel again, and re-arms a
// recv that ended for want of one.
func (r *uringRelay) giveBack(bid uint16) {
	// struct io_uring_buf {addr u64; len u32; bid u16; resv u16} at the
	// tail's slot; the ring's tail is the resv of slot 0 (offset 14), so the
	// fields are written one by one, never the whole slot.
	e := unsafe.Pointer(&r.pbufRing[int(r.pbufTail&r.pbufMask)*16])
	*(*uint64)(e) = uint64(uintptr(unsafe.Pointer(&r.pbufMem[int(bid)*pbufSize])))
	*(*uint32)(unsafe.Add(e, 8)) = pbufSize
	*(*uint16)(unsafe.Add(e, 12)) = bid
	r.pbufTail++
	// Publish the tail with a release store: the 32-bit word at offset 12
	// holds slot 0's bid (this goroutine's to write) and the tail.
	w := (*uint32)(unsafe.Pointer(&r.pbufRing[12]))
	atomic.StoreUint32(w, *w&0xffff|uint32(r.pbufTail)<<16)
	if n := len(r.starved); n > 0 {
		sd := r.starved[n-1]
		r.starved = r.starved[:n-1]
		if !sd.sess.dead {
			r.recvMulti(sd)
		}
	}
}

// recvMulti arms sd's multishot recv (user_data: id<<1).
func (r *uringRelay) recvMulti(sd *uringSide) {
	e := r.sqe()
	e.opcode, e.fd = iorOpRecv, int32(sd.fd)
	e.ioprio = iorRecvMultishot
	e.flags = iosqeBufferSelect
	e.bufGroup = 0
	e.userData = sd.id << 1
	sd.inflight++
	r.push()
}

// sendMulti sends the rest of sd's first pending buffer to its peer
// (user_data: id<<1 | 1).
func (r *uringRelay) sendMulti(sd *uringSide) {
	b := sd.pending[0]
	e := r.sqe()
	e.opcode, e.fd = iorOpSend, int32(sd.peer.fd)
	e.addr = uint64(uintptr(unsafe.Pointer(&r.pbufMem[int(b.bid)*pbufSize+sd.off])))
	e.len = uint32(b.n - sd.off)
	e.opFlags = unix.MSG_NOSIGNAL
	e.userData = sd.id<<1 | 1
	sd.sending = true
	sd.inflight++
	r.push()
}

// completeMulti handles a completion for sd in uring-multi.
func (r *uringRelay) completeMulti(sd *uringSide, send bool, c uringCQE) {
	s := sd.sess
	if send {
		sd.inflight--
		sd.sending = false
		if s.dead {
			r.maybeRelease(s)
			return
		}
		if c.res < 0 {
			r.kill(s)
			return
		}
		sd.off += int(c.res)
		if sd.off < sd.pending[0].n {
			r.sendMulti(sd) // the rest of a short send
			return
		}
		r.giveBack(sd.pending[0].bid)
		sd.pending = sd.pending[1:]
		sd.off = 0
		if len(sd.pending) > 0 {
			r.sendMulti(sd)
		}
		return
	}
	more := c.flags&iorCQEFMore != 0
	if !more {
		sd.inflight--
	}
	if c.flags&iorCQEFBuffer != 0 {
		bid := uint16(c.flags >> iorCQEBufferShift)
		if s.dead || c.res <= 0 {
			r.giveBack(bid)
		} else {
			s.bytes += int64(c.res)
			sd.pending = append(sd.pending, uringPbuf{bid: bid, n: int(c.res)})
			if !sd.sending {
				r.sendMulti(sd)
			}
		}
	}
	switch {
	case s.dead:
		r.maybeRelease(s)
	case more:
	case c.res == -int32(unix.ENOBUFS):
		r.starved = append(r.starved, sd)
	case c.res > 0 || c.res == -int32(unix.EINTR) || c.res == -int32(unix.EAGAIN):
		r.recvMulti(sd) // the kernel ended the multishot; arm it again
	default: // EOF or an error
		r.kill(s)
	}
}
