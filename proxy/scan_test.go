package proxy

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"
)

// encodeAll encodes protocol messages back to back, as they travel.
func encodeAll(t testing.TB, msgs ...pgproto3.Message) []byte {
	t.Helper()
	var b []byte
	for _, m := range msgs {
		var err error
		if b, err = m.Encode(b); err != nil {
			t.Fatalf("encode %T: %v", m, err)
		}
	}
	return b
}

// rawMsg builds a message with any length word, valid or not.
func rawMsg(typ byte, length uint32, body []byte) []byte {
	b := []byte{typ, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(b[1:], length)
	return append(b, body...)
}

// scanChunks feeds stream to a fresh scanner in chunks of the given sizes (the
// rest in one piece) and returns all events and the first error. It stops at the
// first error, as the relay does.
func scanChunks(want *[256]bool, stream []byte, sizes []int) ([]event, error) {
	sc := &scanner{want: want}
	var all []event
	for len(stream) > 0 {
		n := len(stream)
		if len(sizes) > 0 {
			n = min(max(sizes[0], 1), len(stream))
			sizes = sizes[1:]
		}
		evs, err := sc.scan(stream[:n], nil)
		all = append(all, withoutOffsets(evs)...)
		if err != nil {
			return all, err
		}
		stream = stream[n:]
	}
	return all, nil
}

// withoutOffsets drops where messages start, which depends on the chunking,
// so that events from different chunkings compare equal.
func withoutOffsets(evs []event) []event {
	for i := range evs {
		evs[i].off = 0
	}
	return evs
}

// scanEach is scanChunks with every chunk n bytes long.
func scanEach(want *[256]bool, stream []byte, n int) ([]event, error) {
	sizes := make([]int, len(stream)/n+1)
	for i := range sizes {
		sizes[i] = n
	}
	return scanChunks(want, stream, sizes)
}

// refScan is the obvious whole-stream reading of the protocol framing, against
// which the incremental scanner is checked. Like the scanner, it reports a
// wanted message once its first body byte (if it has a body) is in the stream.
func refScan(want *[256]bool, stream []byte) ([]event, error) {
	var evs []event
	for len(stream) >= 5 {
		typ := stream[0]
		length := binary.BigEndian.Uint32(stream[1:5])
		if length < 4 || length > 0x3fffffff {
			return evs, fmt.Errorf("invalid message length %d for message type %q", length, typ)
		}
		if want[typ] {
			switch {
			case length == 4:
				evs = append(evs, event{typ: typ})
			case len(stream) > 5:
				evs = append(evs, event{typ: typ, first: stream[5]})
			}
		}
		if uint64(len(stream)) < 1+uint64(length) {
			break
		}
		stream = stream[1+length:]
	}
	return evs, nil
}

func errString(err error) string {
	if err == nil {
		return "<nil>"
	}
	return err.Error()
}

// serverSession is a realistic server stream: login, a query in a transaction,
// an error that aborts it, a rollback and a row of big bytes (big: its length).
func serverSession(t testing.TB, big int) []byte {
	return encodeAll(t,
		&pgproto3.AuthenticationOk{},
		&pgproto3.ParameterStatus{Name: "server_version", Value: "15.18"},
		&pgproto3.BackendKeyData{ProcessID: 4242, SecretKey: []byte{1, 2, 3, 4}},
		&pgproto3.ReadyForQuery{TxStatus: 'I'},
		&pgproto3.CommandComplete{CommandTag: []byte("BEGIN")},
		&pgproto3.ReadyForQuery{TxStatus: 'T'},
		&pgproto3.RowDescription{Fields: []pgproto3.FieldDescription{{Name: []byte("z"), DataTypeOID: 25, DataTypeSize: -1}}},
		// A row whose value is a ReadyForQuery lookalike: only headers count.
		&pgproto3.DataRow{Values: [][]byte{[]byte("Z\x00\x00\x00\x05I")}},
		&pgproto3.CommandComplete{CommandTag: []byte("SELECT 1")},
		&pgproto3.ReadyForQuery{TxStatus: 'T'},
		&pgproto3.ErrorResponse{Severity: "ERROR", Code: "22012", Message: "division by zero"},
		&pgproto3.ReadyForQuery{TxStatus: 'E'},
		&pgproto3.NotificationResponse{PID: 7, Channel: "c", Payload: "p"},
		&pgproto3.CommandComplete{CommandTag: []byte("ROLLBACK")},
		&pgproto3.ReadyForQuery{TxStatus: 'I'},
		&pgproto3.DataRow{Values: [][]byte{[]byte(strings.Repeat("x", big))}},
		&pgproto3.ReadyForQuery{TxStatus: 'I'},
	)
}

var serverSessionEvents = []event{{typ: 'Z', first: 'I'}, {typ: 'Z', first: 'T'}, {typ: 'Z', first: 'T'}, {typ: 'E', first: 'S'}, {typ: 'Z', first: 'E'}, {typ: 'Z', first: 'I'}, {typ: 'Z', first: 'I'}}

// clientSession is a realistic client stream: simple query, an extended-protocol
// round with its zero-length Sync, big lines of COPY data, a function call and
// Terminate.
func clientSession(t testing.TB, big int) []byte {
	return encodeAll(t,
		&pgproto3.Query{String: "select 1"},
		&pgproto3.Parse{Name: "s1", Query: "select $1::int"},
		&pgproto3.Bind{PreparedStatement: "s1", Parameters: [][]byte{[]byte("7")}},
		&pgproto3.Describe{ObjectType: 'P'},
		&pgproto3.Execute{},
		&pgproto3.Sync{},
		&pgproto3.Query{String: "copy t from stdin"},
		&pgproto3.CopyData{Data: []byte(strings.Repeat("1\tQ\n", big))},
		&pgproto3.CopyDone{},
		&pgproto3.FunctionCall{Function: 1598, ArgFormatCodes: []uint16{}, Arguments: [][]byte{}},
		&pgproto3.Flush{},
		&pgproto3.Sync{},
		&pgproto3.Terminate{},
	)
}

var clientSessionEvents = []event{{typ: 'Q', first: 's'}, {typ: 'S', first: 0}, {typ: 'Q', first: 'c'}, {typ: 'F', first: 0}, {typ: 'S', first: 0}, {typ: 'X', first: 0}}

func TestScannerEvents(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		want   *[256]bool
		stream []byte
		events []event
		err    string // substring of the error; "" for none
	}{
		{name: "server session", want: serverEvents, stream: serverSession(t, 70000), events: serverSessionEvents},
		{name: "client session", want: clientEvents, stream: clientSession(t, 20000), events: clientSessionEvents},
		{name: "empty", want: serverEvents, stream: nil},
		{name: "ReadyForQuery idle", want: serverEvents, stream: encodeAll(t, &pgproto3.ReadyForQuery{TxStatus: 'I'}), events: []event{{typ: 'Z', first: 'I'}}},
		{name: "ReadyForQuery in transaction", want: serverEvents, stream: encodeAll(t, &pgproto3.ReadyForQuery{TxStatus: 'T'}), events: []event{{typ: 'Z', first: 'T'}}},
		{name: "ReadyForQuery failed transaction", want: serverEvents, stream: encodeAll(t, &pgproto3.ReadyForQuery{TxStatus: 'E'}), events: []event{{typ: 'Z', first: 'E'}}},
		{name: "zero-length Sync", want: clientEvents, stream: []byte{'S', 0, 0, 0, 4}, events: []event{{typ: 'S', first: 0}}},
		{name: "zero-length Terminate", want: clientEvents, stream: []byte{'X', 0, 0, 0, 4}, events: []event{{typ: 'X', first: 0}}},
		{name: "several Syncs", want: clientEvents, stream: slices.Repeat([]byte{'S', 0, 0, 0, 4}, 5), events: slices.Repeat([]event{{typ: 'S', first: 0}}, 5)},
		{name: "unwanted zero-length messages", want: clientEvents, stream: encodeAll(t, &pgproto3.Flush{}, &pgproto3.CopyDone{}, &pgproto3.Sync{}), events: []event{{typ: 'S', first: 0}}},
		{name: "empty-bodied ReadyForQuery is reported with status 0", want: serverEvents, stream: []byte{'Z', 0, 0, 0, 4}, events: []event{{typ: 'Z', first: 0}}},
		{name: "unfinished header reports nothing", want: serverEvents, stream: []byte{'Z', 0, 0, 0}},
		{name: "header without its body byte reports nothing", want: serverEvents, stream: []byte{'Z', 0, 0, 0, 5}},
		{name: "status byte alone is enough", want: serverEvents, stream: []byte{'Z', 0, 0, 0, 9, 'T'}, events: []event{{typ: 'Z', first: 'T'}}},
		{name: "length 0", want: clientEvents, stream: rawMsg('Q', 0, nil), err: "invalid message length 0"},
		{name: "length 3", want: serverEvents, stream: rawMsg('D', 3, nil), err: "invalid message length 3"},
		{name: "length over 1 GB", want: serverEvents, stream: rawMsg('D', 0x40000000, nil), err: "invalid message length 1073741824"},
		{name: "largest length is accepted", want: serverEvents, stream: rawMsg('D', 0x3fffffff, []byte("abc"))},
		{
			name:   "broken length after good messages keeps their events",
			want:   serverEvents,
			stream: append(encodeAll(t, &pgproto3.ReadyForQuery{TxStatus: 'I'}, &pgproto3.ReadyForQuery{TxStatus: 'T'}), rawMsg('Z', 2, []byte{'I'})...),
			events: []event{{typ: 'Z', first: 'I'}, {typ: 'Z', first: 'T'}},
			err:    `invalid message length 2 for message type 'Z'`,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			check := func(how string, evs []event, err error) {
				t.Helper()
				if !slices.Equal(evs, tc.events) {
					t.Errorf("%s: events %v, want %v", how, evs, tc.events)
				}
				switch {
				case tc.err == "" && err != nil:
					t.Errorf("%s: error %v", how, err)
				case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
					t.Errorf("%s: error %v, want one containing %q", how, err, tc.err)
				}
			}
			evs, err := scanChunks(tc.want, tc.stream, nil)
			check("whole", evs, err)
			evs, err = scanEach(tc.want, tc.stream, 1)
			check("one byte at a time", evs, err)
			ref, rerr := refScan(tc.want, tc.stream)
			check("reference reader", ref, rerr)
			// Every split into two pieces.
			for i := 1; i < len(tc.stream) && i < 300; i++ {
				evs, err := scanChunks(tc.want, tc.stream, []int{i})
				check(fmt.Sprintf("split at %d", i), evs, err)
			}
			// Every split near the end, where the large messages finish.
			for i := max(300, len(tc.stream)-300); i < len(tc.stream); i++ {
				evs, err := scanChunks(tc.want, tc.stream, []int{i})
				check(fmt.Sprintf("split at %d", i), evs, err)
			}
			rng := rand.New(rand.NewPCG(uint64(len(tc.stream)), 1))
			for round := range 50 {
				sizes := make([]int, 0, 64)
				for total := 0; total < len(tc.stream); {
					n := 1 + rng.IntN(12)
					if rng.IntN(4) == 0 {
						n = 1 + rng.IntN(40000)
					}
					sizes = append(sizes, n)
					total += n
				}
				evs, err := scanChunks(tc.want, tc.stream, sizes)
				check(fmt.Sprintf("random chunks round %d %v", round, sizes), evs, err)
			}
		})
	}
}

// The scanner must split exactly where messages end: a message's body is never
// read as a header, at any chunk boundary, for every short body length.
func TestScannerEveryBodyLength(t *testing.T) {
	t.Parallel()
	for n := 0; n <= 40; n++ {
		body := make([]byte, n)
		for i := range body {
			body[i] = 'Z' // would read as ReadyForQuery headers if misframed
		}
		var stream []byte
		var want []event
		for i := range 3 {
			stream = append(stream, rawMsg('D', uint32(4+n), body)...)
			status := []byte("ITE")[i]
			stream = append(stream, rawMsg('Z', 5, []byte{status})...)
			want = append(want, event{typ: 'Z', first: status})
		}
		for size := 1; size <= len(stream); size++ {
			got, err := scanEach(serverEvents, stream, size)
			if err != nil || !slices.Equal(got, want) {
				t.Fatalf("body %d, chunks of %d: events %v, %v; want %v", n, size, got, err, want)
			}
		}
	}
}

// The relay hands scan its own event slice each time; scan appends to it.
func TestScannerAppendsToEvents(t *testing.T) {
	t.Parallel()
	sc := &scanner{want: serverEvents}
	prev := []event{{typ: 'Q', first: 'x'}}
	got, err := sc.scan(encodeAll(t, &pgproto3.ReadyForQuery{TxStatus: 'T'}), prev)
	if err != nil || !slices.Equal(got, []event{{typ: 'Q', first: 'x'}, {typ: 'Z', first: 'T'}}) {
		t.Fatalf("got %v, %v", got, err)
	}
}

// FuzzScanner checks that any chunking of a stream yields the same events and
// error as reading it whole and as the reference reader, and that scanning never
// panics. The second input picks the chunk sizes.
func FuzzScanner(f *testing.F) {
	f.Add(serverSession(f, 3), []byte{1, 2, 3})
	f.Add(clientSession(f, 2), []byte{5, 1, 200, 7})
	f.Add([]byte{'Z', 0, 0, 0, 5, 'I', 'Z', 0, 0, 0, 5, 'T', 'Z', 0, 0, 0, 5, 'E'}, []byte{1})
	f.Add([]byte{'S', 0, 0, 0, 4, 'S', 0, 0, 0, 4, 'X', 0, 0, 0, 4}, []byte{2, 3})
	f.Add([]byte{'Q', 0, 0, 0, 3, 'x'}, []byte{1, 1, 1})
	f.Add([]byte{'Q', 0, 0, 0, 0}, []byte{})
	f.Add([]byte{'D', 0xff, 0xff, 0xff, 0xff}, []byte{4})
	f.Add([]byte{'D', 0x3f, 0xff, 0xff, 0xff, 'Z', 0, 0, 0, 5, 'I'}, []byte{6})
	f.Add([]byte{'Z', 0, 0, 0, 4, 'Z', 0, 0, 0}, []byte{9, 1})
	f.Add([]byte{'D', 0, 0, 0, 9, 'Z', 0, 0, 0, 5, 'Z', 0, 0, 0, 5, 'I'}, []byte{3, 3, 3})
	f.Add([]byte{}, []byte{0})
	f.Fuzz(func(t *testing.T, stream, chunking []byte) {
		for _, want := range []*[256]bool{serverEvents, clientEvents} {
			wholeEvs, wholeErr := scanChunks(want, stream, nil)
			refEvs, refErr := refScan(want, stream)
			if !slices.Equal(wholeEvs, refEvs) || errString(wholeErr) != errString(refErr) {
				t.Fatalf("whole: %v, %v; reference: %v, %v", wholeEvs, wholeErr, refEvs, refErr)
			}
			sizes := make([]int, len(chunking))
			for i, c := range chunking {
				sizes[i] = int(c)
			}
			byChunks, chunksErr := scanChunks(want, stream, sizes)
			if !slices.Equal(byChunks, wholeEvs) || errString(chunksErr) != errString(wholeErr) {
				t.Fatalf("chunks %v: %v, %v; whole: %v, %v", sizes, byChunks, chunksErr, wholeEvs, wholeErr)
			}
			byByte, byteErr := scanEach(want, stream, 1)
			if !slices.Equal(byByte, wholeEvs) || errString(byteErr) != errString(wholeErr) {
				t.Fatalf("one byte at a time: %v, %v; whole: %v, %v", byByte, byteErr, wholeEvs, wholeErr)
			}
		}
	})
}

// The relay replaces an evicted session's ErrorResponse at its boundary, so the
// scanner must say where a wanted message starts, or -1 when its header began in
// an earlier buffer.
func TestScannerOffsets(t *testing.T) {
	want := wantTypes('E', 'Z')
	stream := encodeAll(t,
		&pgproto3.DataRow{Values: [][]byte{[]byte("abc")}},
		&pgproto3.ErrorResponse{Severity: "FATAL", Code: "57P01", Message: "terminating connection due to administrator command"},
		&pgproto3.ReadyForQuery{TxStatus: 'I'})
	rowLen := len(encodeAll(t, &pgproto3.DataRow{Values: [][]byte{[]byte("abc")}}))
	errLen := len(stream) - rowLen - 6

	sc := &scanner{want: want}
	evs, err := sc.scan(stream, nil)
	if err != nil || len(evs) != 2 || evs[0].typ != 'E' || evs[0].off != rowLen || evs[1].typ != 'Z' || evs[1].off != rowLen+errLen {
		t.Fatalf("whole buffer: %+v, %v", evs, err)
	}
	for split := 1; split < len(stream); split++ {
		sc := &scanner{want: want}
		first, _ := sc.scan(stream[:split], nil)
		second, _ := sc.scan(stream[split:], nil)
		var got []event
		inFirst := len(first) > 0 && first[0].typ == 'E'
		if inFirst {
			got = first
		} else {
			got = second
		}
		var wantOff int
		switch {
		case split <= rowLen: // the error's header is all in the second buffer
			wantOff = rowLen - split
		case split >= rowLen+6: // header and first body byte in the first buffer
			wantOff = rowLen
		default: // the header began in the first buffer and ended in the second
			wantOff = -1
		}
		if len(got) == 0 || got[0].typ != 'E' || got[0].off != wantOff || inFirst != (split >= rowLen+6) {
			t.Errorf("split %d: events %+v then %+v, want E at %d", split, first, second, wantOff)
		}
	}
}

// sampleStream is a realistic stream and the message types the relay follows
// in it.
type sampleStream struct {
	want   *[256]bool
	stream []byte
}

// bothSessions are serverSession and clientSession, with big-byte rows.
func bothSessions(t testing.TB, big int) []sampleStream {
	return []sampleStream{{serverEvents, serverSession(t, big)}, {clientEvents, clientSession(t, big)}}
}

// endsInside tells, without moving the scanner, whether a buffer leaves the
// stream inside a message, from any state and for any buffer.
func TestScannerEndsInside(t *testing.T) {
	t.Parallel()
	for _, c := range bothSessions(t, 20) {
		ends := messageEnds(c.stream)
		for i := 0; i <= len(c.stream); i++ {
			sc := &scanner{want: c.want}
			if _, err := sc.scan(c.stream[:i], nil); err != nil {
				t.Fatal(err)
			}
			before := *sc
			for j := i; j <= len(c.stream); j++ {
				if got := sc.endsInside(c.stream[i:j], nil); got == ends[j] {
					t.Fatalf("bytes %d to %d after %d scanned: endsInside %v, but a message ends there: %v", i, j, i, got, ends[j])
				}
				if *sc != before {
					t.Fatalf("endsInside moved the scanner from %+v to %+v", before, *sc)
				}
			}
		}
	}
	if (&scanner{want: serverEvents}).endsInside(rawMsg('D', 3, nil), nil) {
		t.Error("a broken length word counts as inside a message")
	}
}
