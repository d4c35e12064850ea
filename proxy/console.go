package proxy

import (
	"bufio"
	"context"
	"errors"
	"log/slog"
	"net"
	"slices"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/internal/wire"
)

// errConsoleDone ends a console session: not a login failure.
var errConsoleDone = errors.New("admin console session ended")

// consoleServerVersion is what psql sees as the console's server_version: a
// release whose features it knows, so that it asks nothing the console lacks.
const consoleServerVersion = "15.0 (rolegate console)"

// serveConsole greets an authenticated client of the console database like a
// server would and hands the connection to the console. Only the roles in
// ConsoleUsers get in; the refusal is PostgreSQL's shape for a login that
// authenticated but may not connect (28000).
func (s *Server) serveConsole(ctx context.Context, sess *session, client net.Conn, cr *bufio.Reader, log *slog.Logger) error {
	box := s.console.Load()
	if box == nil || !slices.Contains(s.cfg.ConsoleUsers, sess.user) {
		msg := `role "` + sess.user + `" is not allowed to use the rolegate console`
		if box == nil {
			msg = "the rolegate console is not enabled"
		}
		s.quiet.log(log, slog.LevelInfo, sess.user, "console refused", "reason", msg)
		return fatal("28000", msg, "console refused")
	}
	out := wire.Encode(nil, &pgproto3.AuthenticationOk{})
	for _, p := range [][2]string{
		{"server_version", consoleServerVersion},
		{"server_encoding", "UTF8"},
		{"client_encoding", "UTF8"},
		{"DateStyle", "ISO, MDY"},
		{"integer_datetimes", "on"},
		{"standard_conforming_strings", "on"},
		{"application_name", sess.appName},
	} {
		out = wire.Encode(out, &pgproto3.ParameterStatus{Name: p[0], Value: p[1]})
	}
	// The console has no server backend and nothing to cancel; a random key
	// keeps clients happy.
	key := consoleCancelKey()
	out = wire.Encode(out, &pgproto3.BackendKeyData{ProcessID: key.pid, SecretKey: key.secretBytes()})
	out = wire.Encode(out, &pgproto3.ReadyForQuery{TxStatus: 'I'})
	if _, err := client.Write(out); err != nil {
		return errClientClosed
	}
	_ = client.SetDeadline(time.Time{})
	log.Info("console session started")
	err := box.ServeConsole(ctx, client, cr, sess.user)
	log.Info("console session ended", "err", err)
	return errConsoleDone
}
