package proxy

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"slices"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

// packet builds a startup packet: a length word, the code and the body.
func packet(code uint32, body ...[]byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, 0)
	b = binary.BigEndian.AppendUint32(b, code)
	for _, part := range body {
		b = append(b, part...)
	}
	binary.BigEndian.PutUint32(b, uint32(len(b)))
	return b
}

// params encodes name/value pairs with the final terminator.
func params(kv ...string) []byte {
	var b []byte
	for _, s := range kv {
		b = append(append(b, s...), 0)
	}
	return append(b, 0)
}

func version(major, minor uint16) uint32 { return uint32(major)<<16 | uint32(minor) }

var sentinel = []byte("SENTINEL: not part of the packet")

// wantStartupError checks err is a startupError with the given code and message.
func wantStartupError(t *testing.T, err error, code, msg string) {
	t.Helper()
	var se *startupError
	if !errors.As(err, &se) {
		t.Fatalf("error %v (%T), want startupError %s %q", err, err, code, msg)
	}
	if se.code != code || se.msg != msg {
		t.Errorf("startupError %s %q, want %s %q", se.code, se.msg, code, msg)
	}
}

func TestParseStartupPacket(t *testing.T) {
	t.Parallel()
	long70 := strings.Repeat("n", 70)
	longE := strings.Repeat("é", 40) // byte 63 is inside a character: the server cuts there all the same
	key32 := bytes.Repeat([]byte{0xab}, 32)
	key256 := bytes.Repeat([]byte{0xcd}, 256)
	const (
		badLength = "invalid length of startup packet"
		badLayout = "invalid startup packet layout: expected terminator as last byte"
		noUser    = "no PostgreSQL user name specified in startup packet"
	)
	tests := []struct {
		name    string
		pkt     []byte
		want    *startupPacket
		code    string // an error is expected when set
		message string
	}{
		{name: "SSLRequest", pkt: packet(codeSSL), want: &startupPacket{kind: kindSSL}},
		{name: "GSSENCRequest", pkt: packet(codeGSSENC), want: &startupPacket{kind: kindGSSENC}},
		{name: "SSLRequest with a body", pkt: packet(codeSSL, []byte{0, 0, 0, 0}), code: "08P01", message: badLength},
		{name: "GSSENCRequest with a body", pkt: packet(codeGSSENC, []byte{1}), code: "08P01", message: badLength},
		{
			name: "cancel with a 4-byte key",
			pkt:  packet(codeCancel, []byte{0, 0, 0x30, 0x39}, []byte{1, 2, 3, 4}),
			want: &startupPacket{kind: kindCancel, cancelPID: 12345, cancelKey: []byte{1, 2, 3, 4}},
		},
		{
			name: "cancel with a 32-byte key (protocol 3.2)",
			pkt:  packet(codeCancel, []byte{0, 0, 0, 7}, key32),
			want: &startupPacket{kind: kindCancel, cancelPID: 7, cancelKey: key32},
		},
		{
			name: "cancel with a 256-byte key",
			pkt:  packet(codeCancel, []byte{0x7f, 0xff, 0xff, 0xff}, key256),
			want: &startupPacket{kind: kindCancel, cancelPID: 0x7fffffff, cancelKey: key256},
		},
		{name: "cancel with a 257-byte key", pkt: packet(codeCancel, []byte{0, 0, 0, 7}, key256, []byte{0}), code: "08P01", message: "invalid length of cancel request"},
		{name: "cancel with a 3-byte key", pkt: packet(codeCancel, []byte{0, 0, 0, 7}, []byte{1, 2, 3}), code: "08P01", message: "invalid length of cancel request"},
		{name: "cancel without a key", pkt: packet(codeCancel, []byte{0, 0, 0, 7}), code: "08P01", message: "invalid length of cancel request"},
		{
			name: "3.0 with parameters",
			pkt:  packet(version(3, 0), params("user", "alice", "database", "app", "application_name", "my app", "options", "-c work_mem=4MB")),
			want: &startupPacket{kind: kindStartup, major: 3, minor: 0, params: map[string]string{
				"user": "alice", "database": "app", "application_name": "my app", "options": "-c work_mem=4MB"}},
		},
		{
			name: "3.0 without database defaults to the user",
			pkt:  packet(version(3, 0), params("user", "alice")),
			want: &startupPacket{kind: kindStartup, major: 3, params: map[string]string{"user": "alice", "database": "alice"}},
		},
		{
			name: "3.0 with an empty database defaults to the user",
			pkt:  packet(version(3, 0), params("database", "", "user", "alice")),
			want: &startupPacket{kind: kindStartup, major: 3, params: map[string]string{"user": "alice", "database": "alice"}},
		},
		{
			name: "long names are cut to 63 bytes, as the server cuts them",
			pkt:  packet(version(3, 0), params("user", long70, "database", longE, "application_name", long70)),
			want: &startupPacket{kind: kindStartup, major: 3, params: map[string]string{
				"user": long70[:63], "database": longE[:63], "application_name": long70}},
		},
		{
			name: "a long user is cut after it names the database",
			pkt:  packet(version(3, 0), params("user", longE)),
			want: &startupPacket{kind: kindStartup, major: 3, params: map[string]string{"user": longE[:63], "database": longE[:63]}},
		},
		{
			name: "3.0 with a _pq_ option",
			pkt:  packet(version(3, 0), params("user", "alice", "_pq_.compression", "on")),
			want: &startupPacket{kind: kindStartup, major: 3, params: map[string]string{"user": "alice", "database": "alice"},
				unrecognized: []string{"_pq_.compression"}},
		},
		{
			name: "3.1 with _pq_ options",
			pkt:  packet(version(3, 1), params("_pq_.a", "1", "user", "bob", "_pq_.b", "", "database", "db")),
			want: &startupPacket{kind: kindStartup, major: 3, minor: 1, params: map[string]string{"user": "bob", "database": "db"},
				unrecognized: []string{"_pq_.a", "_pq_.b"}},
		},
		{
			name: "3.2",
			pkt:  packet(version(3, 2), params("user", "bob")),
			want: &startupPacket{kind: kindStartup, major: 3, minor: 2, params: map[string]string{"user": "bob", "database": "bob"}},
		},
		{
			name: "protocol 2.0", pkt: packet(version(2, 0), make([]byte, 288)),
			code: "0A000", message: "unsupported frontend protocol 2.0: server supports 3.0 to 3.0",
		},
		{
			name: "protocol 4.0", pkt: packet(version(4, 0), params("user", "bob")),
			code: "0A000", message: "unsupported frontend protocol 4.0: server supports 3.0 to 3.0",
		},
		{
			name: "an unknown request code", pkt: packet(version(1234, 5681)),
			code: "0A000", message: "unsupported frontend protocol 1234.5681: server supports 3.0 to 3.0",
		},
		{name: "missing user", pkt: packet(version(3, 0), params("database", "app")), code: "28000", message: noUser},
		{name: "empty user", pkt: packet(version(3, 0), params("user", "", "database", "app")), code: "28000", message: noUser},
		{name: "no parameters", pkt: packet(version(3, 0), []byte{0}), code: "28000", message: noUser},
		{name: "no terminator at all", pkt: packet(version(3, 0)), code: "08P01", message: badLayout},
		{name: "last byte not a terminator", pkt: packet(version(3, 0), []byte("user\x00bob\x00x")), code: "08P01", message: badLayout},
		{name: "a name without a value", pkt: packet(version(3, 0), []byte("user\x00bob\x00database\x00")), code: "08P01", message: badLayout},
		{name: "a name with a value and no terminator", pkt: packet(version(3, 0), []byte("user\x00bob\x00")), code: "08P01", message: badLayout},
		// PostgreSQL stops at the first empty name; anything after it is a layout error.
		{name: "bytes after an early terminator", pkt: packet(version(3, 0), []byte("user\x00bob\x00\x00x\x00\x00")), code: "08P01", message: badLayout},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			// Read the packet one byte at a time: the reader must take exactly the
			// packet and leave what follows for the next reader.
			src := bytes.NewReader(slices.Concat(tt.pkt, sentinel))
			body, err := readStartupPacket(iotest.OneByteReader(src))
			if err != nil {
				t.Fatalf("readStartupPacket: %v", err)
			}
			if rest, _ := io.ReadAll(src); !bytes.Equal(rest, sentinel) {
				t.Fatalf("bytes left after the packet: %q, want %q", rest, sentinel)
			}
			if !bytes.Equal(body, tt.pkt[4:]) {
				t.Fatalf("body %x, want %x", body, tt.pkt[4:])
			}
			got, err := parseStartupPacket(body)
			if tt.code != "" {
				wantStartupError(t, err, tt.code, tt.message)
				if got != nil {
					t.Errorf("got a packet %+v with the error", got)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseStartupPacket: %v", err)
			}
			if got.kind != tt.want.kind || got.major != tt.want.major || got.minor != tt.want.minor ||
				got.cancelPID != tt.want.cancelPID || !bytes.Equal(got.cancelKey, tt.want.cancelKey) ||
				!equalParams(got.params, tt.want.params) || !slices.Equal(got.unrecognized, tt.want.unrecognized) {
				t.Errorf("got %+v\nwant %+v", got, tt.want)
			}
		})
	}
}

func equalParams(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// readStartupPacket never returns a body this short; parse refuses it anyway.
func TestParseStartupPacketShortBody(t *testing.T) {
	t.Parallel()
	for _, body := range [][]byte{nil, {0}, {0, 3, 0}} {
		p, err := parseStartupPacket(body)
		wantStartupError(t, err, "08P01", "invalid length of startup packet")
		if p != nil {
			t.Errorf("packet %+v from %x", p, body)
		}
	}
}

// The cancel key is a copy: the reader may reuse its buffer.
func TestParseStartupPacketCopiesCancelKey(t *testing.T) {
	t.Parallel()
	body := packet(codeCancel, []byte{0, 0, 0, 1}, []byte{9, 9, 9, 9})[4:]
	p, err := parseStartupPacket(body)
	if err != nil {
		t.Fatal(err)
	}
	clear(body)
	if !bytes.Equal(p.cancelKey, []byte{9, 9, 9, 9}) {
		t.Errorf("cancel key changed with the input buffer: %x", p.cancelKey)
	}
}

func TestReadStartupPacket(t *testing.T) {
	t.Parallel()
	const badLength = "invalid length of startup packet"
	withLength := func(n uint32, rest ...byte) []byte {
		return append(binary.BigEndian.AppendUint32(nil, n), rest...)
	}
	tests := []struct {
		name     string
		in       []byte
		wantBody []byte
		wantErr  error  // errors.Is
		code     string // a startupError with this code and badLength
		consumed int    // bytes taken from the input
	}{
		{name: "nothing", in: nil, wantErr: io.EOF},
		{name: "two bytes of the length", in: []byte{0, 0}, wantErr: errIncomplete, consumed: 2},
		{name: "length only", in: withLength(8), wantErr: errIncomplete, consumed: 4},
		{name: "half a body", in: withLength(16, 0, 3, 0, 0, 'u'), wantErr: errIncomplete, consumed: 9},
		{name: "smallest packet", in: withLength(8, 1, 2, 3, 4), wantBody: []byte{1, 2, 3, 4}, consumed: 8},
		{name: "largest packet", in: withLength(maxStartupPacket, make([]byte, maxStartupPacket-4)...),
			wantBody: make([]byte, maxStartupPacket-4), consumed: maxStartupPacket},
		{name: "length 0", in: withLength(0, 1, 2, 3, 4), code: "08P01", consumed: 4},
		{name: "length 4", in: withLength(4, 1, 2, 3, 4), code: "08P01", consumed: 4},
		{name: "length 7", in: withLength(7, 1, 2, 3, 4), code: "08P01", consumed: 4},
		{name: "length 10001", in: withLength(maxStartupPacket+1, make([]byte, maxStartupPacket)...), code: "08P01", consumed: 4},
		{name: "length 20000", in: withLength(20000, 1, 2, 3, 4), code: "08P01", consumed: 4},
		{name: "negative length", in: withLength(0xffffffff, 1, 2, 3, 4), code: "08P01", consumed: 4},
		{name: "an HTTP request", in: []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), code: "08P01", consumed: 4},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			src := bytes.NewReader(tt.in)
			body, err := readStartupPacket(iotest.OneByteReader(src))
			if consumed := len(tt.in) - src.Len(); consumed != tt.consumed {
				t.Errorf("consumed %d bytes, want %d", consumed, tt.consumed)
			}
			switch {
			case tt.code != "":
				wantStartupError(t, err, tt.code, badLength)
			case tt.wantErr != nil:
				if !errors.Is(err, tt.wantErr) {
					t.Errorf("error %v, want %v", err, tt.wantErr)
				}
			case err != nil:
				t.Errorf("error %v", err)
			case !bytes.Equal(body, tt.wantBody):
				t.Errorf("body %x, want %x", body, tt.wantBody)
			}
			if err != nil && body != nil {
				t.Errorf("body %x returned with error %v", body, err)
			}
		})
	}
}

// A read error that is not an end of input is returned as it is, so that a
// deadline is told apart from a client that left.
func TestReadStartupPacketPassesReadErrors(t *testing.T) {
	t.Parallel()
	for _, in := range [][]byte{nil, {0, 0}, {0, 0, 0, 9, 1}} {
		r := io.MultiReader(bytes.NewReader(in), iotest.ErrReader(os.ErrDeadlineExceeded))
		_, err := readStartupPacket(iotest.OneByteReader(r))
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("after %d bytes: error %v, want os.ErrDeadlineExceeded", len(in), err)
		}
	}
}

// pgAcceptsLayout is PostgreSQL's walk over a 3.x startup packet's parameters
// (ProcessStartupPacket), written independently of parseStartupPacket: a name,
// then a value, until an empty name, which must be the last byte.
func pgAcceptsLayout(rest []byte) bool {
	offset := 0
	for offset < len(rest) {
		i := bytes.IndexByte(rest[offset:], 0)
		if i < 0 {
			return false
		}
		if i == 0 {
			break
		}
		offset += i + 1
		if offset >= len(rest) {
			break
		}
		j := bytes.IndexByte(rest[offset:], 0)
		if j < 0 {
			return false
		}
		offset += j + 1
	}
	return offset == len(rest)-1
}

func FuzzStartupPacket(f *testing.F) {
	seeds := [][]byte{
		packet(codeSSL),
		packet(codeGSSENC),
		packet(codeCancel, []byte{0, 0, 0, 1}, []byte{1, 2, 3, 4}),
		packet(codeCancel, []byte{0, 0, 0, 1}, bytes.Repeat([]byte{7}, 32)),
		packet(version(3, 0), params("user", "u", "database", "d")),
		packet(version(3, 1), params("user", "u", "_pq_.x", "y")),
		packet(version(2, 0), make([]byte, 288)),
		packet(version(3, 0), []byte("user\x00u\x00\x00x\x00\x00")),
		{0, 0, 0, 8},
		{0, 0, 0x4e, 0x20, 1, 2, 3},
		[]byte("GET / HTTP/1.1\r\n"),
		{0x16, 3, 1, 0, 0x80},
	}
	for _, s := range seeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		stream := slices.Concat(data, sentinel)
		src := bytes.NewReader(stream)
		body, err := readStartupPacket(iotest.OneByteReader(src))
		consumed := len(stream) - src.Len()

		declared := int(binary.BigEndian.Uint32(stream))
		validLength := declared >= 8 && declared <= maxStartupPacket
		switch {
		case err == nil:
			if !validLength || len(body) != declared-4 || consumed != declared {
				t.Fatalf("read a %d-byte body, consumed %d, declared length %d", len(body), consumed, declared)
			}
		case !validLength:
			if consumed != 4 {
				t.Fatalf("consumed %d bytes of a packet with invalid length %d", consumed, declared)
			}
		}
		if consumed > max(4, declared) {
			t.Fatalf("consumed %d bytes, past the declared length %d", consumed, declared)
		}
		if validLength && len(data) >= declared {
			if err != nil {
				t.Fatalf("complete packet refused: %v", err)
			}
			if rest, _ := io.ReadAll(src); !bytes.HasSuffix(rest, sentinel) || len(rest) != len(data)-declared+len(sentinel) {
				t.Fatalf("bytes after the packet not left unread: %q", rest)
			}
		}
		if err != nil {
			return
		}

		p, err := parseStartupPacket(body)
		if err != nil {
			var se *startupError
			if !errors.As(err, &se) || len(se.code) != 5 || se.msg == "" {
				t.Fatalf("error %v (%T) carries no SQLSTATE", err, err)
			}
			if strings.HasPrefix(se.msg, "invalid startup packet layout") && pgAcceptsLayout(body[4:]) {
				t.Fatalf("refused a parameter layout PostgreSQL accepts: %q", body[4:])
			}
			return
		}
		switch p.kind {
		case kindSSL, kindGSSENC:
			if len(body) != 4 {
				t.Fatalf("%d-byte body accepted as SSL/GSSENC request", len(body))
			}
		case kindCancel, kindPeerCancel:
			if len(p.cancelKey) < 4 || len(p.cancelKey) > 256 {
				t.Fatalf("cancel key of %d bytes accepted", len(p.cancelKey))
			}
			if code := binary.BigEndian.Uint32(body); (p.kind == kindPeerCancel) != (code == codePeerCancel) {
				t.Fatalf("code %d parsed as kind %d", code, p.kind)
			}
		case kindPeerStatus:
			if binary.BigEndian.Uint32(body) != codePeerStatus {
				t.Fatalf("%q parsed as a peer's status request", body)
			}
		case kindPeerNotice:
			if binary.BigEndian.Uint32(body) != codePeerNotice || len(body) < 8 || p.notice != string(body[8:]) {
				t.Fatalf("%q parsed as a peer's notice %+v", body, p)
			}
		case kindStartup:
			if p.major != 3 || p.params["user"] == "" || p.params["database"] == "" {
				t.Fatalf("accepted %+v", p)
			}
			if !pgAcceptsLayout(body[4:]) {
				t.Fatalf("accepted a parameter layout PostgreSQL refuses: %q", body[4:])
			}
			for name := range p.params {
				if name == "" || strings.HasPrefix(name, "_pq_.") {
					t.Fatalf("parameter name %q passed on", name)
				}
			}
			// What rolegate sends on to the server encodes and decodes to the same.
			msg, err := (&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersion30, Parameters: p.params}).Encode(nil)
			if err != nil {
				t.Fatalf("encode the accepted parameters: %v", err)
			}
			var back pgproto3.StartupMessage
			if err := back.Decode(msg[4:]); err != nil || !equalParams(back.Parameters, p.params) {
				t.Fatalf("parameters %q do not survive encoding: %v %q", p.params, err, back.Parameters)
			}
		default:
			t.Fatalf("unknown kind %d", p.kind)
		}
	})
}

// rawConn dials the proxy over TCP; the connection is closed at cleanup.
func rawConn(t *testing.T, p *testProxy) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", p.Addr(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(15 * time.Second))
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// wantFatal reads one ErrorResponse from r and then the end of the connection.
func wantFatal(t *testing.T, r io.Reader, code, msgPart string) *pgproto3.ErrorResponse {
	t.Helper()
	fe := pgproto3.NewFrontend(r, io.Discard)
	m, err := fe.Receive()
	if err != nil {
		t.Fatalf("want ErrorResponse %s, got error %v", code, err)
	}
	e, ok := m.(*pgproto3.ErrorResponse)
	if !ok {
		t.Fatalf("want ErrorResponse %s, got %T %+v", code, m, m)
	}
	if e.Severity != "FATAL" || e.SeverityUnlocalized != "FATAL" || e.Code != code || !strings.Contains(e.Message, msgPart) {
		t.Errorf("got %s %s %q, want FATAL %s containing %q", e.Severity, e.Code, e.Message, code, msgPart)
	}
	if m, err := fe.Receive(); err == nil {
		t.Errorf("after the error: %T %+v, want the end of the connection", m, m)
	}
	return e
}

// wantLogin checks the proxy still logs a pgx client in.
func wantLogin(t *testing.T, p *testProxy) {
	t.Helper()
	c := connect(t, p.DSN("trust_user", "", "app"))
	var one int
	if err := c.QueryRow(t.Context(), "select 1").Scan(&one); err != nil || one != 1 {
		t.Fatalf("select 1 after the bad client: %d, %v", one, err)
	}
}

func TestMalformedStartupOverTCP(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})
	tests := []struct {
		name      string
		send      []byte
		closeSend bool
		answers   int // 'N' answers to read before the error
		code, msg string
	}{
		{name: "truncated packet", send: packet(version(3, 0), params("user", "trust_user"))[:12], closeSend: true,
			code: "08P01", msg: "incomplete startup packet"},
		{name: "truncated length word", send: []byte{0, 0}, closeSend: true, code: "08P01", msg: "incomplete startup packet"},
		{name: "oversized length", send: binary.BigEndian.AppendUint32(nil, 20000), code: "08P01", msg: "invalid length of startup packet"},
		{name: "length too small", send: []byte{0, 0, 0, 4, 0, 3, 0, 0}, code: "08P01", msg: "invalid length of startup packet"},
		{name: "garbage", send: []byte("GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"), code: "08P01", msg: "invalid length of startup packet"},
		{name: "protocol 2.0", send: packet(version(2, 0), make([]byte, 288)), code: "0A000",
			msg: "unsupported frontend protocol 2.0: server supports 3.0 to 3.0"},
		{name: "no user", send: packet(version(3, 0), params("database", "app")), code: "28000",
			msg: "no PostgreSQL user name specified in startup packet"},
		{name: "bad terminator", send: packet(version(3, 0), []byte("user\x00trust_user\x00x")), code: "08P01",
			msg: "invalid startup packet layout: expected terminator as last byte"},
		{name: "SSLRequest with a body", send: packet(codeSSL, []byte{1, 2, 3, 4}), code: "08P01", msg: "invalid length of startup packet"},
		{name: "GSSENCRequest then garbage", send: slices.Concat(packet(codeGSSENC), []byte{0xff, 0xff, 0xff, 0xff}),
			answers: 1, code: "08P01", msg: "invalid length of startup packet"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c := rawConn(t, p)
			if _, err := c.Write(tt.send); err != nil {
				t.Fatal(err)
			}
			if tt.closeSend {
				if err := c.CloseWrite(); err != nil {
					t.Fatal(err)
				}
			}
			if tt.answers > 0 {
				b := make([]byte, tt.answers)
				if _, err := io.ReadFull(c, b); err != nil || strings.Trim(string(b), "N") != "" {
					t.Fatalf("answers %q, %v; want 'N'", b, err)
				}
			}
			wantFatal(t, c, tt.code, tt.msg)
			wantLogin(t, p)
		})
	}
}

func TestStartupTimeout(t *testing.T) {
	t.Parallel()
	// Long enough for a login, and for the server's password request, on a
	// busy machine: the clients that stop must be stopped by the timeout, not
	// the ones that go on.
	const timeout = 5 * time.Second
	p := startProxy(t, proxyOpts{startupTimeout: timeout})

	startup := packet(version(3, 0), params("user", "password_user", "database", "app"))
	tests := []struct {
		name            string
		send            []byte
		wantAuthRequest bool // the proxy passes the server's password request on first
	}{
		{name: "sends nothing"},
		{name: "stops inside the startup packet", send: startup[:10]},
		{name: "stops after an SSLRequest", send: packet(codeSSL)},
		// The timeout covers authentication too: the server asks for a password
		// and the client never answers.
		{name: "never answers the password request", send: startup, wantAuthRequest: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			start := time.Now()
			c := rawConn(t, p)
			if _, err := c.Write(tt.send); err != nil {
				t.Fatal(err)
			}
			if tt.send != nil && binary.BigEndian.Uint32(tt.send[4:]) == codeSSL {
				var b [1]byte
				if _, err := io.ReadFull(c, b[:]); err != nil || b[0] != 'N' {
					t.Fatalf("answer to SSLRequest %q, %v", b[:], err)
				}
			}
			fe := pgproto3.NewFrontend(c, io.Discard)
			if tt.wantAuthRequest {
				m, err := fe.Receive()
				if _, ok := m.(*pgproto3.AuthenticationCleartextPassword); !ok {
					t.Fatalf("got %T %v, want AuthenticationCleartextPassword", m, err)
				}
			}
			// The proxy closes the connection; our own deadline (15 s) is far away.
			m, err := fe.Receive()
			if err == nil {
				t.Fatalf("got %T %+v, want the connection closed", m, m)
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("the proxy did not close the connection: %v", err)
			}
			// start precedes the connection, so a close at the timeout is
			// never earlier than this however slow the machine.
			if elapsed := time.Since(start); elapsed < timeout {
				t.Errorf("closed after %v, before the startup timeout %v", elapsed, timeout)
			}
		})
	}
	t.Run("a prompt client is unaffected", func(t *testing.T) {
		t.Parallel()
		start := time.Now() // before the proxy accepts, so before its deadline starts
		c := connect(t, p.DSN("password_user", passwordPW, "app"))
		// The session outlives the startup timeout: the deadline is cleared at
		// login. Pings go on until well after the deadline would have passed.
		for time.Since(start) < timeout+time.Second {
			if err := c.Ping(t.Context()); err != nil {
				t.Fatalf("session ended after %v: %v", time.Since(start), err)
			}
			time.Sleep(20 * time.Millisecond)
		}
		if err := c.Ping(t.Context()); err != nil {
			t.Fatalf("session ended after %v: %v", time.Since(start), err)
		}
	})
}

// startupMessage sends a StartupMessage with any protocol version.
func startupMessage(t *testing.T, w io.Writer, major, minor uint16, kv ...string) {
	t.Helper()
	if _, err := w.Write(packet(version(major, minor), params(kv...))); err != nil {
		t.Fatal(err)
	}
}

// wantReady reads a login through to ReadyForQuery and checks its shape: an
// AuthenticationOk, ParameterStatus messages, a BackendKeyData and ReadyForQuery.
func wantReady(t *testing.T, fe *pgproto3.Frontend) {
	t.Helper()
	var sawOk, sawKey, sawParams bool
	for {
		m, err := fe.Receive()
		if err != nil {
			t.Fatalf("login: %v", err)
		}
		switch m := m.(type) {
		case *pgproto3.AuthenticationOk:
			sawOk = true
		case *pgproto3.ParameterStatus:
			sawParams = true
		case *pgproto3.BackendKeyData:
			sawKey = true
			if m.ProcessID == 0 || len(m.SecretKey) != 4 {
				t.Errorf("BackendKeyData %+v", m)
			}
		case *pgproto3.ReadyForQuery:
			if !sawOk || !sawKey || !sawParams || m.TxStatus != 'I' {
				t.Fatalf("ReadyForQuery %q after AuthenticationOk %v, BackendKeyData %v, ParameterStatus %v", m.TxStatus, sawOk, sawKey, sawParams)
			}
			return
		case *pgproto3.ErrorResponse:
			t.Fatalf("login failed: %s %s", m.Code, m.Message)
		default:
			t.Fatalf("unexpected %T during login", m)
		}
	}
}

// wantCurrentUser runs select current_user on a raw session and ends it.
func wantCurrentUser(t *testing.T, fe *pgproto3.Frontend, user string) {
	t.Helper()
	fe.Send(&pgproto3.Query{String: "select current_user"})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	var got string
	for {
		m, err := fe.Receive()
		if err != nil {
			t.Fatal(err)
		}
		switch m := m.(type) {
		case *pgproto3.DataRow:
			got = string(m.Values[0])
		case *pgproto3.ErrorResponse:
			t.Fatalf("query: %s %s", m.Code, m.Message)
		case *pgproto3.ReadyForQuery:
			if got != user {
				t.Errorf("current_user %q, want %q", got, user)
			}
			fe.Send(&pgproto3.Terminate{})
			if err := fe.Flush(); err != nil {
				t.Fatal(err)
			}
			return
		}
	}
}

func TestProtocol31NegotiatedDown(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})
	c := rawConn(t, p)
	startupMessage(t, c, 3, 1, "user", "trust_user", "database", "app", "_pq_.test_option", "x")
	fe := pgproto3.NewFrontend(c, c)
	m, err := fe.Receive()
	if err != nil {
		t.Fatal(err)
	}
	npv, ok := m.(*pgproto3.NegotiateProtocolVersion)
	if !ok {
		t.Fatalf("got %T %+v, want NegotiateProtocolVersion", m, m)
	}
	if npv.NewestMinorProtocol != 0 || !slices.Equal(npv.UnrecognizedOptions, []string{"_pq_.test_option"}) {
		t.Errorf("NegotiateProtocolVersion %+v, want minor 0 and [_pq_.test_option]", npv)
	}
	wantReady(t, fe)
	wantCurrentUser(t, fe, "trust_user")
}

// pgx asking for protocol 3.2 is told 3.0 and goes on, cancel keys included.
func TestPgxProtocol32(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})
	c := connect(t, p.DSN("scram_user", scramPW, "app", "max_protocol_version=3.2"))
	var user string
	if err := c.QueryRow(t.Context(), "select current_user").Scan(&user); err != nil || user != "scram_user" {
		t.Fatalf("current_user %q, %v", user, err)
	}
	if key := c.PgConn().SecretKey(); len(key) != 4 {
		t.Errorf("secret key of %d bytes, want 4 (protocol 3.0)", len(key))
	}
}

func TestGSSENCThenSSLThenStartup(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})
	c := rawConn(t, p)
	for _, code := range []uint32{codeGSSENC, codeSSL} {
		// Send the request and the next packet's first bytes at once: the answer
		// must come from reading exactly 8 bytes.
		if _, err := c.Write(packet(code)); err != nil {
			t.Fatal(err)
		}
		var b [1]byte
		if _, err := io.ReadFull(c, b[:]); err != nil || b[0] != 'N' {
			t.Fatalf("answer to request %d: %q, %v; want 'N'", code, b[:], err)
		}
	}
	startupMessage(t, c, 3, 0, "user", "trust_user", "database", "app", "application_name", "gss-then-ssl")
	fe := pgproto3.NewFrontend(c, c)
	wantReady(t, fe)
	sessions := p.Sessions()
	if len(sessions) != 1 || sessions[0].ClientTLS || sessions[0].User != "trust_user" || sessions[0].ApplicationName != "gss-then-ssl" {
		t.Errorf("sessions %+v", sessions)
	}
	wantCurrentUser(t, fe, "trust_user")
}

// Requests and the startup packet may arrive in one write.
func TestPipelinedStartupRequests(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})
	c := rawConn(t, p)
	all := slices.Concat(packet(codeGSSENC), packet(codeSSL), packet(version(3, 0), params("user", "trust_user", "database", "app")))
	if _, err := c.Write(all); err != nil {
		t.Fatal(err)
	}
	var b [2]byte
	if _, err := io.ReadFull(c, b[:]); err != nil || string(b[:]) != "NN" {
		t.Fatalf("answers %q, %v; want NN", b[:], err)
	}
	fe := pgproto3.NewFrontend(c, c)
	wantReady(t, fe)
	wantCurrentUser(t, fe, "trust_user")
}

func TestTooManyNegotiationRequests(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})
	c := rawConn(t, p)
	for range 4 {
		if _, err := c.Write(packet(codeGSSENC)); err != nil {
			t.Fatal(err)
		}
		var b [1]byte
		if _, err := io.ReadFull(c, b[:]); err != nil || b[0] != 'N' {
			t.Fatalf("answer %q, %v", b[:], err)
		}
	}
	if _, err := c.Write(packet(codeGSSENC)); err != nil {
		t.Fatal(err)
	}
	wantFatal(t, c, "08P01", "too many startup negotiation requests")
	wantLogin(t, p)
}

// A cancel request with a key rolegate issued reaches the server; pgx sends one
// when a query's context ends.
func TestCancelRequestForwarded(t *testing.T) {
	t.Parallel()
	p := startProxy(t, proxyOpts{})
	c := connect(t, p.DSN("trust_user", "", "app", "application_name=cancel-me"))
	queryDone := make(chan error, 1)
	go func() {
		_, err := c.Exec(context.Background(), "select pg_sleep(30)")
		queryDone <- err
	}()
	// Cancel once the server runs the query: a cancel that arrives before it
	// is discarded by the server.
	waitServerRunning(t, shared.SuperDSN(), p, "cancel-me")
	if err := c.PgConn().CancelRequest(t.Context()); err != nil {
		t.Fatal(err)
	}
	var err error
	select {
	case err = <-queryDone:
	case <-time.After(15 * time.Second):
		t.Fatal("query not cancelled within 15 s")
	}
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != "57014" {
		t.Fatalf("error %v, want 57014 canceling statement due to user request", err)
	}
	// Logged once the server has the request, which may be after the query ended.
	waitUntil(t, 30*time.Second, "the log line for the forwarded cancel request", func() bool {
		return strings.Contains(p.logs.String(), "cancel request forwarded")
	})
	if err := c.Ping(t.Context()); err != nil {
		t.Errorf("session after the cancel: %v", err)
	}

	// A key rolegate did not issue is ignored and the connection closed, as the
	// server does.
	raw := rawConn(t, p)
	if _, err := raw.Write(packet(codeCancel, []byte{0, 0, 0, 1}, []byte{1, 2, 3, 4})); err != nil {
		t.Fatal(err)
	}
	if n, err := raw.Read(make([]byte, 16)); err != io.EOF {
		t.Errorf("after an unknown cancel key: read %d bytes, %v; want EOF", n, err)
	}
	if err := c.Ping(t.Context()); err != nil {
		t.Errorf("session after an unknown cancel key: %v", err)
	}
}

// sessionByApp finds a live session by its application_name.
func sessionByApp(p *testProxy, app string) *SessionInfo {
	for _, s := range p.Sessions() {
		if s.ApplicationName == app {
			return &s
		}
	}
	return nil
}

// waitServerRunning waits until the server executes a query for the proxy's
// session named app; dsn is a superuser connection to that server.
func waitServerRunning(t *testing.T, dsn string, p *testProxy, app string) {
	t.Helper()
	var pid uint32
	waitUntil(t, 30*time.Second, "the session to log in", func() bool {
		s := sessionByApp(p, app)
		if s != nil {
			pid = s.BackendPID
		}
		return s != nil
	})
	c := connect(t, dsn)
	waitUntil(t, 30*time.Second, "the server to run the query", func() bool {
		var active bool
		err := c.QueryRow(t.Context(), "select count(*) = 1 from pg_stat_activity where pid = $1 and state = 'active'", int64(pid)).Scan(&active)
		return err == nil && active
	})
	c.Close(t.Context())
}
