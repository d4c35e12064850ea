//go:build linux

package main

import (
	"net"
	"os"

	"github.com/lesismal/nbio"
	"github.com/lesismal/nbio/logging"
)

// nbioRelay is lesismal/nbio: one poller (as evloop has one loop), each
// side of a session an nbio.Conn whose Session is its peer. nbio offers no
// way to stop reading a socket: what a peer does not take, Conn.Write
// keeps in memory without bound (Config.MaxWriteBufferSize would close the
// connection instead).
type nbioRelay struct{ e *nbio.Engine }

func newNbioRelay() (*nbioRelay, error) {
	logging.Output = os.Stderr // its default is standard output, the driver's channel
	logging.SetLevel(logging.LevelWarn)
	e := nbio.NewEngine(nbio.Config{Name: "relaycpu", NPoller: 1})
	// OnData runs on the poller's goroutine; data is the poller's read
	// buffer, valid until it returns. Write writes what the socket takes
	// and copies the rest.
	e.OnData(func(c *nbio.Conn, data []byte) {
		if peer, ok := c.Session().(*nbio.Conn); ok {
			_, _ = peer.Write(data)
		}
	})
	e.OnClose(func(c *nbio.Conn, _ error) {
		if peer, ok := c.Session().(*nbio.Conn); ok {
			_ = peer.Close()
		}
	})
	if err := e.Start(); err != nil {
		return nil, err
	}
	return &nbioRelay{e}, nil
}

// add pairs the two before either is on the poller, so that OnData never
// sees a side without its peer. NBConn dups the descriptor and closes the
// net.Conn.
func (r *nbioRelay) add(client, server *net.TCPConn) error {
	c, err := nbio.NBConn(client)
	if err != nil {
		return err
	}
	s, err := nbio.NBConn(server)
	if err != nil {
		c.Close()
		return err
	}
	c.SetSession(s)
	s.SetSession(c)
	if _, err := r.e.AddConn(s); err != nil {
		c.Close()
		return err
	}
	if _, err := r.e.AddConn(c); err != nil {
		s.Close()
		return err
	}
	return nil
}

func (r *nbioRelay) close() { r.e.Stop() }
