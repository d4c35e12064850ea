//go:build linux

package main

import (
	"fmt"
	"net"
	"os"

	"github.com/panjf2000/gnet/v2"
)

// gnetRelay is panjf2000/gnet v2: a gnet.Client with one event loop (as
// evloop has one loop), which adopts established connections with
// Client.EnrollContext (it dups the descriptor and closes the net.Conn).
// gnet offers no way to stop reading a socket: it reads whatever is
// readable into the connection's inbound buffer and keeps what a peer does
// not take in the outbound one, both without bound.
type gnetRelay struct {
	gnet.BuiltinEventEngine
	cli *gnet.Client
}

// gnetPair is one session; gnetSide is one connection's context.
type gnetPair struct{ c [2]gnet.Conn } // client, server

type gnetSide struct {
	p   *gnetPair
	dir int // 0 client, 1 server
}

func newGnetRelay() (*gnetRelay, error) {
	r := &gnetRelay{}
	// Its default logger writes to standard output, the driver's channel.
	cli, err := gnet.NewClient(r, gnet.WithNumEventLoop(1), gnet.WithLogger(stderrLogger{}))
	if err != nil {
		return nil, err
	}
	if err := cli.Start(); err != nil {
		return nil, err
	}
	r.cli = cli
	return r, nil
}

// add enrolls the server first: upstream says nothing until the client
// has spoken. EnrollContext returns once OnOpen has run on the loop.
func (r *gnetRelay) add(client, server *net.TCPConn) error {
	p := &gnetPair{}
	s, err := r.cli.EnrollContext(server, &gnetSide{p, 1})
	if err != nil {
		return err
	}
	if _, err := r.cli.EnrollContext(client, &gnetSide{p, 0}); err != nil {
		s.Close()
		return err
	}
	return nil
}

func (r *gnetRelay) close() { _ = r.cli.Stop() }

// OnOpen runs on the loop: it completes the pair, and forwards what one
// side sent before its peer was there.
func (r *gnetRelay) OnOpen(c gnet.Conn) ([]byte, gnet.Action) {
	sd := c.Context().(*gnetSide)
	sd.p.c[sd.dir] = c
	if peer := sd.p.c[1-sd.dir]; peer != nil && peer.InboundBuffered() > 0 {
		r.OnTraffic(peer)
	}
	return nil, gnet.None
}

// OnTraffic runs on the loop when c has bytes: Next(-1) is the loop's read
// buffer (and whatever was left from before), valid until it returns; the
// peer's Write writes what the socket takes and copies the rest.
func (r *gnetRelay) OnTraffic(c gnet.Conn) gnet.Action {
	sd := c.Context().(*gnetSide)
	peer := sd.p.c[1-sd.dir]
	if peer == nil {
		return gnet.None // keep it in c's inbound buffer until the peer opens
	}
	b, _ := c.Next(-1)
	if _, err := peer.Write(b); err != nil {
		return gnet.Close
	}
	return gnet.None
}

// OnClose closes the peer.
func (r *gnetRelay) OnClose(c gnet.Conn, _ error) gnet.Action {
	sd := c.Context().(*gnetSide)
	sd.p.c[sd.dir] = nil
	if peer := sd.p.c[1-sd.dir]; peer != nil {
		_ = peer.Close()
	}
	return gnet.None
}

// stderrLogger is gnet's logger: warnings and errors to standard error.
type stderrLogger struct{}

func (stderrLogger) Debugf(string, ...any) {}
func (stderrLogger) Infof(string, ...any)  {}
func (stderrLogger) Warnf(f string, a ...any) {
	fmt.Fprintf(os.Stderr, "gnet: "+f+"\n", a...)
}
func (stderrLogger) Errorf(f string, a ...any) {
	fmt.Fprintf(os.Stderr, "gnet: "+f+"\n", a...)
}
func (stderrLogger) Fatalf(f string, a ...any) {
	fmt.Fprintf(os.Stderr, "gnet: "+f+"\n", a...)
	os.Exit(1)
}
