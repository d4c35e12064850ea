//go:build linux

package main

import (
	"net"

	"github.com/rolegate/rolegate/internal/evloop"
)

// evloopRelay is internal/evloop, rolegate's default relay: one epoll loop,
// the session's Handler seeing every buffer before it is written.
type evloopRelay struct{ l *evloop.Loop }

func newEvloopRelay() (*evloopRelay, error) {
	l, err := evloop.New(evloop.Config{})
	if err != nil {
		return nil, err
	}
	return &evloopRelay{l}, nil
}

func (r *evloopRelay) add(client, server *net.TCPConn) error {
	_, err := r.l.Add(client, server, nil, nil, &counter{})
	return err
}

func (r *evloopRelay) close() { r.l.Close() }

// counter is the Handler: it counts bytes, the least the proxy's Handler
// does.
type counter struct{ n [2]int64 }

func (c *counter) Data(d evloop.Dir, buf []byte) ([]byte, *evloop.Stop) {
	c.n[d] += int64(len(buf))
	return buf, nil
}

func (c *counter) Farewell(error) []byte { return nil }

func (c *counter) Closed(error) {}
