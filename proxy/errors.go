package proxy

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"time"

	"github.com/rolegate/rolegate/internal/wire"
	"github.com/rolegate/rolegate/upstream"
)

// Why sessions end. A client or server that closes its connection is the normal
// end of a session, not a failure.
var (
	errClientClosed = errors.New("client closed the connection")
	errServerClosed = errors.New("server closed the connection")
)

// clientError is a login that failed with something to tell the client: the
// SQLSTATE and message of its FATAL ErrorResponse, what the client is owed
// ahead of it, and why, for the log line and the metrics. The steps of a
// connection return it; fail, alone, sends it (once), logs and counts it.
// A failure without a clientError in its chain (a client that left, a
// shutdown) is told nothing.
type clientError struct {
	code, msg, detail string
	// hint is the ErrorResponse's HINT: what the client can do about it.
	hint string
	// before is what the client is owed ahead of the error: the server's
	// messages of a login that got that far (AuthenticationOk in
	// passthrough, the ParameterStatus of a handoff), or rolegate's own
	// AuthenticationOk ahead of a 53300.
	before []byte
	// raw, when set, is the server's own ErrorResponse, sent as it came
	// instead of code, msg and detail.
	raw []byte
	// silent: the client is told nothing, as PostgreSQL closes without a
	// word at authentication_timeout.
	silent bool
	// class is why, for the log and LoginFailed: an authentication failure
	// class ("wrong password", ...) or one of the Reason constants.
	class string
	// roleExists: the role was found (a wrong password), so metrics may name it.
	roleExists bool
	// err is the cause, for the log; nil when msg says it all.
	err error
}

func (e *clientError) Error() string {
	if e.err != nil {
		return e.err.Error()
	}
	return e.msg
}

func (e *clientError) Unwrap() error { return e.err }

// logDetail is the message as the log shows it, with its DETAIL.
func (e *clientError) logDetail() string {
	if e.detail != "" {
		return e.msg + ": " + e.detail
	}
	return e.msg
}

// encode is what the client is sent: what it is owed, then the error.
func (e *clientError) encode() []byte {
	out := e.before
	if e.raw != nil {
		return append(out[:len(out):len(out)], e.raw...)
	}
	resp := wire.Error("FATAL", e.code, e.msg)
	resp.Detail, resp.Hint = e.detail, e.hint
	return wire.Encode(out[:len(out):len(out)], resp)
}

// fatal is a failure rolegate tells the client in a FATAL of its own.
func fatal(code, msg, class string) *clientError {
	return &clientError{code: code, msg: msg, class: class}
}

// refusedBy is the server's ErrorResponse m during a login: passed on to the
// client as it came, after before.
func refusedBy(m wire.Message, before []byte) *clientError {
	ce := &clientError{before: before, raw: m.Raw(), class: ReasonRefusedByServer}
	var err error
	if ce.code, ce.msg, err = wire.DecodeError(m); err != nil {
		ce.class, ce.err = ReasonServerError, err
	}
	return ce
}

// serverLost is a login toward the server that failed: the client gets,
// after before, FATAL 08006 with a message that names the step and the cause
// in words (upstream.DialError.Message); the error keeps the detail for the
// log. Errors from Dial and the LoginConn name their step; anything else is
// the server breaking the protocol after authentication (handoff).
func (s *Server) serverLost(before []byte, err error) *clientError {
	var de *upstream.DialError
	if !errors.As(err, &de) {
		de = &upstream.DialError{Address: s.cfg.Upstream.Address(), Step: upstream.StepReady, Err: err}
	}
	return &clientError{code: "08006", msg: de.Message(), before: before, class: ReasonServerError, err: de}
}

// clientWriteTimeout bounds one write to a client during its login. A login
// may have waited for a slot past its startup deadline, so what rolegate
// sends from admission on (the rejection, an error, the handoff) cannot rely
// on that deadline; and a client that stops reading must not hold the
// session open.
const clientWriteTimeout = 10 * time.Second

// writeClient writes b to a client within clientWriteTimeout, whatever
// deadline c had, and leaves c without a write deadline.
func writeClient(c net.Conn, b []byte) error {
	_ = c.SetWriteDeadline(time.Now().Add(clientWriteTimeout))
	_, err := c.Write(b)
	_ = c.SetWriteDeadline(time.Time{})
	return err
}

// fail ends a connection that did not get to its relay: it writes the one
// log line of the failure, tells the Observer, and then tells the client,
// if the failure has something to tell it. It is the only place a login's
// error reaches the client, so none is told twice or not at all.
func (c *clientConn) fail(err error) {
	if c.startup == nil {
		c.startupFailed(err)
	} else {
		c.loginFailed(err)
	}
	var ce *clientError
	if !errors.As(err, &ce) || ce.silent {
		return
	}
	if err := writeClient(c.client, ce.encode()); err != nil && ce.class == ReasonTooMany {
		c.log.Debug("could not send the rejection", "err", err)
	}
}

// startupFailed logs and counts a connection that ended before its startup
// packet was accepted: a refused packet gets PostgreSQL's error, a client
// that left or timed out is dropped silently, as the server does.
func (c *clientConn) startupFailed(err error) {
	s, log := c.s, c.log
	var se *startupError
	switch {
	case errors.As(err, &se):
		s.obs.LoginFailed(RoleUnknown, ReasonBadStartup)
		s.quiet.log(log, slog.LevelInfo, se.code, "startup refused", "sqlstate", se.code, "reason", se.msg)
	case errors.Is(err, errIncomplete):
		s.obs.LoginFailed(RoleUnknown, ReasonBadStartup)
		s.quiet.log(log, slog.LevelInfo, "08P01", "startup refused", "sqlstate", "08P01", "reason", err.Error())
	case errors.Is(err, io.EOF):
		log.Debug("client closed the connection before startup")
	case errors.Is(err, os.ErrDeadlineExceeded):
		s.obs.LoginFailed(RoleUnknown, ReasonStartupTimeout)
		s.quiet.log(log, slog.LevelInfo, "", "startup timed out")
	default:
		s.obs.LoginFailed(RoleUnknown, ReasonStartupFailed)
		s.quiet.log(log, slog.LevelInfo, "", "startup failed", "err", err)
	}
}

// startupRefused is a startup packet PostgreSQL would refuse, with its error.
func startupRefused(err error) error {
	var se *startupError
	switch {
	case errors.As(err, &se):
		return &clientError{code: se.code, msg: se.msg, class: ReasonBadStartup, err: err}
	case errors.Is(err, errIncomplete):
		return &clientError{code: "08P01", msg: err.Error(), class: ReasonBadStartup, err: err}
	}
	return err
}

// loginFailed writes the one log line of a failed login and tells the Observer.
func (c *clientConn) loginFailed(err error) {
	s, sess, log := c.s, c.sess, c.log
	var ce *clientError
	errors.As(err, &ce)
	// Label a failure with its role only once the role is known to exist:
	// a client that has not proved who it is may send any name.
	role := RoleUnknown
	if sess.verified {
		role = sess.user
	}
	switch {
	case ce != nil && ce.class == ReasonTooMany:
		// Admission logged the rejection, once, with its reason, and told
		// the Observer, before the client heard of it.
	case ce != nil && ce.class != ReasonRefusedByServer && ce.class != ReasonServerError:
		// rolegate refused the login itself (authentication, the console).
		if ce.roleExists {
			role = sess.user
		}
		// Throttled per role and class, never per unproven name: a
		// brute-forcer of one role cannot hide another role's failures.
		s.quiet.log(log, slog.LevelInfo, role+"/"+ce.class, "login failed",
			"sqlstate", ce.code, "reason", ce.class, "detail", ce.logDetail())
		s.obs.LoginFailed(role, ce.class)
	case ce != nil && ce.class == ReasonRefusedByServer:
		s.quiet.log(log, slog.LevelInfo, role+"/"+ReasonRefusedByServer, "login failed",
			"sqlstate", ce.code, "reason", ReasonRefusedByServer, "detail", ce.msg)
		s.obs.LoginFailed(role, ReasonRefusedByServer)
		if s.cfg.Auth == nil && ce.msg == "SCRAM channel binding negotiation error" {
			// Passthrough removed SCRAM-SHA-256-PLUS from the server's offer;
			// a TLS client that could bind says so ("y"), and a TLS server
			// takes that for a downgrade attack. The client's proof covers it.
			s.quiet.log(log, slog.LevelWarn, "", "a TLS client that supports channel binding cannot log in through "+
				"passthrough to a TLS server with another certificate; proxy mode ([auth] mode = \"proxy\") binds both legs, "+
				"or [tls] can serve the server's own certificate")
		}
	case errors.Is(err, errConsoleDone):
	case errors.Is(err, errClientClosed):
		log.Debug("client left during login")
		s.obs.LoginFailed(role, ReasonClientLeft)
	case errors.Is(err, errShutdown):
		log.Debug("login ended by shutdown")
		s.obs.LoginFailed(role, ReasonShutdown)
	default:
		if ce != nil && ce.err != nil {
			err = ce.err // the cause, as the log has always shown it
		}
		s.quiet.log(log, slog.LevelWarn, role+"/"+ReasonServerError, "login failed", "err", err)
		s.obs.LoginFailed(role, ReasonServerError)
	}
}
