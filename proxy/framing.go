package proxy

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/jackc/pgx/v5/pgproto3"
)

// Limits for messages rolegate reads whole during login. PostgreSQL caps
// authentication tokens at 65535 bytes (PG_MAX_AUTH_TOKEN_LENGTH); server
// messages before ReadyForQuery are small (parameter status, notices, errors).
const (
	maxClientAuthMessage = 65535 + 5
	maxServerLoginMsg    = 1 << 20
)

// message is one whole protocol message: its type byte and body.
type message struct {
	typ  byte
	body []byte
}

// raw returns the message as it travels on the wire.
func (m message) raw() []byte {
	b := make([]byte, 5+len(m.body))
	b[0] = m.typ
	binary.BigEndian.PutUint32(b[1:], uint32(4+len(m.body)))
	copy(b[5:], m.body)
	return b
}

// readMessage reads one message from r, refusing lengths PostgreSQL would call
// invalid and bodies over max. The body is freshly allocated and safe to keep.
func readMessage(r *bufio.Reader, max int) (message, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return message{}, err
	}
	n := int(binary.BigEndian.Uint32(hdr[1:]))
	if n < 4 {
		return message{}, fmt.Errorf("invalid message length %d for message type %q", n, hdr[0])
	}
	if n-4 > max {
		return message{}, fmt.Errorf("message type %q too long (%d bytes, at most %d)", hdr[0], n-4, max)
	}
	body := make([]byte, n-4)
	if _, err := io.ReadFull(r, body); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return message{}, err
	}
	return message{typ: hdr[0], body: body}, nil
}

// encode appends the wire form of a pgproto3 message to dst. Encoding only fails
// for values rolegate never builds (NUL bytes in names), so a failure is a bug.
func encode(dst []byte, m pgproto3.Message) []byte {
	out, err := m.Encode(dst)
	if err != nil {
		panic(fmt.Sprintf("rolegate: encode %T: %v", m, err))
	}
	return out
}

// errorResponse builds a PostgreSQL ErrorResponse. Messages are the server's own
// wording wherever the server has one, so clients and scripts see what they know.
func errorResponse(severity, code, msg string) *pgproto3.ErrorResponse {
	return &pgproto3.ErrorResponse{
		Severity:            severity,
		SeverityUnlocalized: severity,
		Code:                code,
		Message:             msg,
	}
}
