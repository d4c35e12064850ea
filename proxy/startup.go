package proxy

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/rolegate/rolegate/internal/pgname"
)

// Startup packet codes, as PostgreSQL defines them in pqcomm.h.
const (
	codeCancel    = 80877102
	codeSSL       = 80877103
	codeGSSENC    = 80877104
	protocolMajor = 3

	// maxStartupPacket is PostgreSQL's MAX_STARTUP_PACKET_LENGTH.
	maxStartupPacket = 10000
)

// startupKind says what the first packet of a connection asks for.
type startupKind int

const (
	kindStartup startupKind = iota
	kindSSL
	kindGSSENC
	kindCancel
	kindPeerCancel // a CancelRequest another instance forwarded (cluster.go)
	kindPeerStatus // another instance asks for this one's status
	kindPeerNotice // another instance is about to terminate a backend this one may relay
)

// startupPacket is a decoded packet that may open a connection.
type startupPacket struct {
	kind startupKind
	// For kindStartup.
	major, minor uint16
	params       map[string]string
	unrecognized []string // "_pq_." protocol options, answered with NegotiateProtocolVersion
	// For kindCancel and kindPeerCancel; cancelPID also for kindPeerNotice.
	cancelPID uint32
	cancelKey []byte
	// For kindPeerNotice: the reason the victim's client is to be told.
	notice string
}

// startupError is a packet PostgreSQL would refuse, with the SQLSTATE it would send.
type startupError struct {
	code string
	msg  string
}

func (e *startupError) Error() string { return e.msg }

func protocolViolation(format string, args ...any) error {
	return &startupError{code: "08P01", msg: fmt.Sprintf(format, args...)}
}

// errIncomplete marks a connection that closed inside its startup packet; like
// PostgreSQL we answer it with "incomplete startup packet".
var errIncomplete = errors.New("incomplete startup packet")

// readStartupPacket reads one length-prefixed startup packet with exact reads, so
// that nothing past the packet is consumed: after an SSLRequest the next bytes
// belong to the TLS handshake.
func readStartupPacket(r io.Reader) ([]byte, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, errIncomplete
		}
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n < 8 || n > maxStartupPacket {
		return nil, protocolViolation("invalid length of startup packet")
	}
	body := make([]byte, n-4)
	if _, err := io.ReadFull(r, body); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, errIncomplete
		}
		return nil, err
	}
	return body, nil
}

// parseStartupPacket decodes a startup packet body (without its length word). Its
// messages and SQLSTATEs follow PostgreSQL's ProcessStartupPacket, and so does
// the cut of user and database to 63 bytes.
func parseStartupPacket(body []byte) (*startupPacket, error) {
	if len(body) < 4 {
		return nil, protocolViolation("invalid length of startup packet")
	}
	code := binary.BigEndian.Uint32(body)
	switch code {
	case codeSSL, codeGSSENC:
		if len(body) != 4 {
			return nil, protocolViolation("invalid length of startup packet")
		}
		if code == codeSSL {
			return &startupPacket{kind: kindSSL}, nil
		}
		return &startupPacket{kind: kindGSSENC}, nil
	case codePeerStatus:
		return &startupPacket{kind: kindPeerStatus}, nil
	case codePeerNotice:
		if len(body) < 8 {
			return nil, protocolViolation("invalid length of startup packet")
		}
		return &startupPacket{kind: kindPeerNotice, cancelPID: binary.BigEndian.Uint32(body[4:]), notice: string(body[8:])}, nil
	case codeCancel, codePeerCancel:
		// 3.0 keys are 4 bytes; 3.2 allows up to 256.
		if len(body) < 12 || len(body) > 8+256 {
			return nil, protocolViolation("invalid length of cancel request")
		}
		kind := kindCancel
		if code == codePeerCancel {
			kind = kindPeerCancel
		}
		return &startupPacket{
			kind:      kind,
			cancelPID: binary.BigEndian.Uint32(body[4:]),
			cancelKey: bytes.Clone(body[8:]),
		}, nil
	}
	p := &startupPacket{kind: kindStartup, major: uint16(code >> 16), minor: uint16(code)}
	if p.major != protocolMajor {
		return nil, &startupError{code: "0A000", msg: fmt.Sprintf(
			"unsupported frontend protocol %d.%d: server supports 3.0 to 3.0", p.major, p.minor)}
	}
	rest := body[4:]
	if len(rest) == 0 || rest[len(rest)-1] != 0 {
		return nil, protocolViolation("invalid startup packet layout: expected terminator as last byte")
	}
	rest = rest[:len(rest)-1]
	p.params = make(map[string]string)
	for len(rest) > 0 {
		name, value, ok := cutPair(rest)
		// An empty name is PostgreSQL's end of the list, so it must be the last byte.
		if !ok || name == "" {
			return nil, protocolViolation("invalid startup packet layout: expected terminator as last byte")
		}
		rest = rest[len(name)+len(value)+2:]
		if strings.HasPrefix(name, "_pq_.") {
			p.unrecognized = append(p.unrecognized, name)
			continue
		}
		p.params[name] = value
	}
	if p.params["user"] == "" {
		return nil, &startupError{code: "28000", msg: "no PostgreSQL user name specified in startup packet"}
	}
	if _, ok := p.params["database"]; !ok || p.params["database"] == "" {
		// PostgreSQL's default: the database named like the user.
		p.params["database"] = p.params["user"]
	}
	// The server cuts both names to 63 bytes before it looks anything up; cut
	// here, once, so that rules, counts, logs, the console and the password
	// lookup name the role and database the server will, and the server gets
	// the names it would have used anyway.
	p.params["user"] = pgname.Startup(p.params["user"])
	p.params["database"] = pgname.Startup(p.params["database"])
	return p, nil
}

// cutPair splits "name\0value\0..." and reports whether both terminators were there.
func cutPair(b []byte) (name, value string, ok bool) {
	i := bytes.IndexByte(b, 0)
	if i < 0 {
		return "", "", false
	}
	j := bytes.IndexByte(b[i+1:], 0)
	if j < 0 {
		return "", "", false
	}
	return string(b[:i]), string(b[i+1 : i+1+j]), true
}
