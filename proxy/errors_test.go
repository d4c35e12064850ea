package proxy

import (
	"bufio"
	"bytes"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/internal/testutil"
	"github.com/rolegate/rolegate/internal/wire"
)

// TestFailSendsOnce drives the one place a failed login reaches its client:
// what the client reads is the error's wire form (what it was owed first,
// then the FATAL or the server's own ErrorResponse), once, or nothing at all
// for a failure with nothing to tell.
func TestFailSendsOnce(t *testing.T) {
	authOK := wire.Encode(nil, &pgproto3.AuthenticationOk{})
	serverErr := wire.Encode(nil, &pgproto3.ErrorResponse{Severity: "FATAL", SeverityUnlocalized: "FATAL",
		Code: "28P01", Message: `password authentication failed for user "u"`})
	tooMany := &clientError{code: "53300", msg: `too many connections for role "u"`, before: authOK,
		detail: "rolegate could not evict pid 7: permission denied.", hint: "Try again later.", class: ReasonTooMany}
	tests := []struct {
		name    string
		err     error
		startup bool // the startup packet was accepted: a login failure
		want    []byte
		log     string // a part of the log line
	}{
		{"auth failure", fatal("28000", "no way in", "console refused"), true,
			wire.Encode(nil, wire.Error("FATAL", "28000", "no way in")), `msg="login failed"`},
		{"rejection after AuthenticationOk", tooMany, true,
			wire.Encode(authOK, &pgproto3.ErrorResponse{Severity: "FATAL", SeverityUnlocalized: "FATAL", Code: "53300",
				Message: tooMany.msg, Detail: tooMany.detail, Hint: tooMany.hint}), ""},
		{"server's own error, as sent", refusedBy(wire.Message{Type: serverErr[0], Body: serverErr[5:]}, authOK), true,
			append(bytes.Clone(authOK), serverErr...), `reason="refused by server"`},
		{"silent timeout", errAuthTimeout(), true, nil, `sqlstate=57014`},
		{"client left", errClientClosed, true, nil, `msg="client left during login"`},
		{"refused startup packet", startupRefused(protocolViolation("invalid length of startup packet")), false,
			wire.Encode(nil, wire.Error("FATAL", "08P01", "invalid length of startup packet")), `msg="startup refused"`},
		{"incomplete startup packet", startupRefused(errIncomplete), false,
			wire.Encode(nil, wire.Error("FATAL", "08P01", "incomplete startup packet")), `msg="startup refused"`},
		{"startup timeout", startupRefused(os.ErrDeadlineExceeded), false, nil, `msg="startup timed out"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			logs := &testutil.SyncBuffer{}
			s := New(Config{Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
			defer s.Close()
			ours, theirs := net.Pipe()
			c := &clientConn{s: s, sess: &session{user: "u"}, client: ours, log: s.log}
			if tt.startup {
				c.startup = &startupPacket{}
			}
			go func() {
				c.fail(tt.err)
				ours.Close()
			}()
			got, err := io.ReadAll(bufio.NewReader(theirs))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, tt.want) {
				t.Errorf("the client read\n%q\nwant\n%q", got, tt.want)
			}
			if !strings.Contains(logs.String(), tt.log) {
				t.Errorf("log lacks %q:\n%s", tt.log, logs.String())
			}
		})
	}
}
