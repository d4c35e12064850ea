// Package wire holds the few PostgreSQL framing helpers that both sides of
// rolegate need during login, when messages are read whole (the relay after
// login moves raw buffers instead).
package wire

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"

	"github.com/jackc/pgx/v5/pgproto3"
)

// Limits for messages read whole during login. PostgreSQL caps authentication
// tokens at 65535 bytes (PG_MAX_AUTH_TOKEN_LENGTH); server messages before
// ReadyForQuery are small (parameter status, notices, errors).
const (
	MaxClientAuthMessage = 65535 + 5
	MaxServerLoginMsg    = 1 << 20
)

// Message is one whole protocol message: its type byte and body.
type Message struct {
	Type byte
	Body []byte
}

// Raw returns the message as it travels on the wire.
func (m Message) Raw() []byte {
	b := make([]byte, 5+len(m.Body))
	b[0] = m.Type
	binary.BigEndian.PutUint32(b[1:], uint32(4+len(m.Body)))
	copy(b[5:], m.Body)
	return b
}

// ReadMessage reads one message from r, refusing lengths PostgreSQL would call
// invalid and bodies over max. The body is freshly allocated and safe to keep.
func ReadMessage(r *bufio.Reader, max int) (Message, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return Message{}, err
	}
	n := int(binary.BigEndian.Uint32(hdr[1:]))
	if n < 4 {
		return Message{}, fmt.Errorf("invalid message length %d for message type %q", n, hdr[0])
	}
	if n-4 > max {
		return Message{}, fmt.Errorf("message type %q too long (%d bytes, at most %d)", hdr[0], n-4, max)
	}
	body := make([]byte, n-4)
	if _, err := io.ReadFull(r, body); err != nil {
		if err == io.EOF { // a bare EOF only: a wrapped one carries context the caller wants
			err = io.ErrUnexpectedEOF
		}
		return Message{}, err
	}
	return Message{Type: hdr[0], Body: body}, nil
}

// Encode appends the wire form of a pgproto3 message to dst. Encoding only fails
// for values rolegate never builds (NUL bytes in names), so a failure is a bug.
func Encode(dst []byte, m pgproto3.Message) []byte {
	out, err := m.Encode(dst)
	if err != nil {
		panic(fmt.Sprintf("rolegate: encode %T: %v", m, err))
	}
	return out
}

// DecodeError reads the SQLSTATE and message of an ErrorResponse m, for a
// login the server refused.
func DecodeError(m Message) (code, msg string, err error) {
	var e pgproto3.ErrorResponse
	if err := e.Decode(m.Body); err != nil {
		return "", "", fmt.Errorf("decode server error: %w", err)
	}
	return e.Code, e.Message, nil
}

// Error builds a PostgreSQL ErrorResponse. Messages are the server's own wording
// wherever the server has one, so clients and scripts see what they know.
func Error(severity, code, msg string) *pgproto3.ErrorResponse {
	return &pgproto3.ErrorResponse{
		Severity:            severity,
		SeverityUnlocalized: severity,
		Code:                code,
		Message:             msg,
	}
}
