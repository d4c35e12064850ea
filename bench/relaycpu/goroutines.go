//go:build linux

package main

import "net"

// goroutineRelay is two goroutines per session, each copying one way: the
// shape of rolegate's goroutine relay (TLS sessions keep it).
type goroutineRelay struct{}

func (goroutineRelay) add(client, server *net.TCPConn) error {
	go copyLoop(server, client)
	go copyLoop(client, server)
	return nil
}

func (goroutineRelay) close() {}

// copyLoop is one direction: read, write the whole buffer, until either
// side ends. A peer that does not read blocks the Write, and so the Read:
// backpressure comes with the shape.
func copyLoop(dst, src net.Conn) {
	defer dst.Close()
	defer src.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}
