package proxy

import (
	"encoding/binary"
	"fmt"
)

// scanner follows message boundaries in a byte stream that the relay forwards
// whole buffers of. It never copies or decodes a message: it reads the 5-byte
// headers (which may straddle buffers) and, for the message types the caller asks
// about, the first body byte (ReadyForQuery's transaction status).
type scanner struct {
	// want marks message types to report. Types whose body the caller needs the
	// first byte of are reported once that byte has arrived.
	want *[256]bool

	skip   int     // body bytes of the current message still to pass over
	hdr    [5]byte // header bytes collected so far
	hdrN   int
	waitB1 bool // a wanted message's first body byte is next
	typ    byte
	off    int // start of the pending wanted message in the current buffer, or -1
}

// event is one wanted message: its type, the first byte of its body (0 when
// empty), and where its header starts in the buffer scanned (-1 when the header
// began in an earlier buffer), so a message can be replaced at its boundary.
type event struct {
	typ   byte
	first byte
	off   int
}

// scan consumes b and appends events for wanted message types to evs. A length
// word under 4 is a broken stream: the caller ends the session.
func (s *scanner) scan(b []byte, evs []event) ([]event, error) {
	size := len(b)
	if s.waitB1 {
		s.off = -1 // the pending message's header was in an earlier buffer
	}
	for len(b) > 0 {
		if s.waitB1 {
			evs = append(evs, event{typ: s.typ, first: b[0], off: s.off})
			s.waitB1 = false
			b = b[1:]
			continue
		}
		if s.skip > 0 {
			if len(b) <= s.skip {
				s.skip -= len(b)
				return evs, nil
			}
			b = b[s.skip:]
			s.skip = 0
		}
		// Fast path: a whole header in b.
		if s.hdrN == 0 && len(b) >= 5 {
			var err error
			if evs, err = s.header(b[0], binary.BigEndian.Uint32(b[1:5]), evs, size-len(b)); err != nil {
				return evs, err
			}
			b = b[5:]
			continue
		}
		start := size - len(b) - s.hdrN // negative when the header began earlier
		n := copy(s.hdr[s.hdrN:], b)
		s.hdrN += n
		b = b[n:]
		if s.hdrN < 5 {
			return evs, nil
		}
		s.hdrN = 0
		var err error
		if evs, err = s.header(s.hdr[0], binary.BigEndian.Uint32(s.hdr[1:5]), evs, max(start, -1)); err != nil {
			return evs, err
		}
	}
	return evs, nil
}

// inside reports whether the stream scanned so far stops inside a message: its
// sender has more of it to send.
func (s *scanner) inside() bool { return s.skip > 0 || s.hdrN > 0 || s.waitB1 }

// endsInside reports whether the stream would stop inside a message once b is
// scanned. The scanner does not move; evs is scratch space for the events found
// on the way.
func (s *scanner) endsInside(b []byte, evs []event) bool {
	c := *s
	if _, err := c.scan(b, evs); err != nil {
		return false // the caller's own scan reports it
	}
	return c.inside()
}

func (s *scanner) header(typ byte, length uint32, evs []event, off int) ([]event, error) {
	if length < 4 || length > 0x3fffffff {
		return evs, fmt.Errorf("invalid message length %d for message type %q", length, typ)
	}
	s.skip = int(length) - 4
	if s.want[typ] {
		if s.skip == 0 {
			return append(evs, event{typ: typ, off: off}), nil
		}
		// The waitB1 branch consumes the first body byte; skip covers the rest.
		s.waitB1, s.typ, s.off = true, typ, off
		s.skip--
	}
	return evs, nil
}
