package upstream

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/internal/wire"
)

// ServerError is an ErrorResponse the server sent during login. Raw is the
// message as sent, for the proxy to pass to the client unchanged.
type ServerError struct {
	Code    string
	Message string
	Raw     []byte
}

func (e *ServerError) Error() string {
	return fmt.Sprintf("server refused login: %s (SQLSTATE %s)", e.Message, e.Code)
}

// CannotAnswerError is a server request rolegate cannot answer for the client
// with what it holds (a method it has no secret for), as opposed to a broken
// connection or a server that misbehaves.
type CannotAnswerError struct{ Msg string }

func (e *CannotAnswerError) Error() string { return e.Msg }

// Authenticate answers the server's authentication requests on a connection
// whose StartupMessage has been sent, as the client whose keys rolegate
// recovered, and returns when the server sends AuthenticationOk. This is what
// lets rolegate open a server connection for a client at any time, without the
// client: SCRAM needs only the ClientKey, md5 the stored hash.
//
// binding is the channel binding data of the connection (ChannelBinding):
// on a TLS connection to a server that offers SCRAM-SHA-256-PLUS, the login
// is bound to the server's certificate, so that the server knows the
// exchange reached it and not someone in between. It returns the method the
// server asked for and got: SCRAM-SHA-256-PLUS, SCRAM-SHA-256, md5,
// password, or trust when it asked for none.
func Authenticate(r *bufio.Reader, w io.Writer, keys *auth.Keys, binding []byte) (method string, err error) {
	method = "trust"
	var scram *auth.SCRAMClient
	for {
		m, err := wire.ReadMessage(r, wire.MaxServerLoginMsg)
		if err != nil {
			return "", fmt.Errorf("read login reply: %w", err)
		}
		switch m.Type {
		case 'E':
			return "", serverError(m)
		case 'N':
			continue // a notice before login completes has nobody to go to
		case 'R':
		default:
			return "", fmt.Errorf("unexpected message type %q during authentication", m.Type)
		}
		if len(m.Body) < 4 {
			return "", errors.New("short authentication request")
		}
		var reply pgproto3.FrontendMessage
		switch code := binary.BigEndian.Uint32(m.Body); code {
		case 0: // AuthenticationOk
			if scram != nil {
				return "", errors.New("server skipped the SCRAM signature")
			}
			return method, nil
		case 3: // cleartext password
			if keys.Password == "" {
				return "", &CannotAnswerError{"server asks for a cleartext password, but the client did not send one to rolegate"}
			}
			reply = &pgproto3.PasswordMessage{Password: keys.Password}
			method = "password"
		case 5: // md5
			var req pgproto3.AuthenticationMD5Password
			if err := req.Decode(m.Body); err != nil {
				return "", fmt.Errorf("decode md5 request: %w", err)
			}
			hash := keys.MD5
			if hash == "" && keys.Password != "" {
				hash = auth.MD5Hash(keys.User, keys.Password)
			}
			if hash == "" {
				return "", &CannotAnswerError{"server asks for md5, but rolegate holds only a SCRAM key for this role " +
					"(the server's pg_hba.conf should use scram-sha-256 for it)"}
			}
			reply = &pgproto3.PasswordMessage{Password: auth.MD5Response(hash, req.Salt)}
			method = "md5"
		case 10: // SASL
			var req pgproto3.AuthenticationSASL
			if err := req.Decode(m.Body); err != nil {
				return "", fmt.Errorf("decode SASL request: %w", err)
			}
			plus := len(binding) > 0 && slices.Contains(req.AuthMechanisms, auth.SCRAMSHA256Plus)
			if !plus && !slices.Contains(req.AuthMechanisms, auth.SCRAMSHA256) {
				return "", &CannotAnswerError{fmt.Sprintf("server offers SASL mechanisms %v, not %s", req.AuthMechanisms, auth.SCRAMSHA256)}
			}
			if scram, err = auth.NewSCRAMClient(keys); err != nil {
				return "", &CannotAnswerError{"server asks for SCRAM: " + err.Error()}
			}
			if plus {
				scram.WithChannelBinding(binding)
			}
			method = scram.Mechanism()
			reply = &pgproto3.SASLInitialResponse{AuthMechanism: method, Data: scram.ClientFirst()}
		case 11: // SASL continue
			var req pgproto3.AuthenticationSASLContinue
			if err := req.Decode(m.Body); err != nil || scram == nil {
				return "", fmt.Errorf("unexpected SASL continue: %v", err)
			}
			final, err := scram.ClientFinal(req.Data)
			if err != nil {
				return "", fmt.Errorf("SCRAM: %w", err)
			}
			reply = &pgproto3.SASLResponse{Data: final}
		case 12: // SASL final
			var req pgproto3.AuthenticationSASLFinal
			if err := req.Decode(m.Body); err != nil || scram == nil {
				return "", fmt.Errorf("unexpected SASL final: %v", err)
			}
			if err := scram.Verify(req.Data); err != nil {
				return "", fmt.Errorf("SCRAM: %w", err)
			}
			scram = nil
			continue
		default:
			return "", &CannotAnswerError{fmt.Sprintf("server asks for authentication method %d, which rolegate cannot answer for a client", code)}
		}
		if _, err := w.Write(wire.Encode(nil, reply)); err != nil {
			return "", fmt.Errorf("send authentication reply: %w", err)
		}
	}
}

// ChannelBinding returns the SCRAM channel binding data of a server
// connection: the tls-server-end-point of the certificate the server
// presented, or nil when conn is not TLS or the binding is undefined for the
// certificate's signature algorithm (the login then goes without binding).
func ChannelBinding(conn net.Conn) []byte {
	if lc, ok := conn.(*LoginConn); ok {
		conn = lc.Conn
	}
	tc, ok := conn.(*tls.Conn)
	if !ok {
		return nil
	}
	certs := tc.ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return nil
	}
	data, err := auth.TLSServerEndPoint(certs[0])
	if err != nil {
		return nil
	}
	return data
}

func serverError(m wire.Message) error {
	code, msg, err := wire.DecodeError(m)
	if err != nil {
		return err
	}
	return &ServerError{Code: code, Message: msg, Raw: m.Raw()}
}
