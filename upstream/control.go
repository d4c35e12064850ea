package upstream

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/config"
)

// PasswordEnv names the environment variable that holds the control role's
// password, so that it need not be written in proxy.toml.
const PasswordEnv = "ROLEGATE_CONTROL_PASSWORD"

// Control is rolegate's own connection pool to the server: it runs the auth
// query (and, with limits, reads pg_stat_activity and terminates backends).
type Control struct {
	pool      *pgxpool.Pool
	authQuery string
	appName   string      // the pool's application_name, which Census marks as rolegate's own
	limits    limitCache  // ServerLimits' snapshot (limits.go)
	locks     lockSession // LockRole's and Reserve's state (locks.go)
	signals   signals     // SignalSlot's and ListenSlots' state (signals.go)
}

// NewControl builds the pool; it connects lazily, so a server that is down at
// start-up delays logins rather than rolegate's start. The password comes from
// ROLEGATE_CONTROL_PASSWORD, then password_file, then the DSN (or PGPASSWORD
// and ~/.pgpass, which pgx reads itself).
func NewControl(ctx context.Context, cfg config.Control, authQuery string) (*Control, error) {
	pcfg, err := pgxpool.ParseConfig(cfg.DSN)
	if err != nil {
		// pgx's parse errors leave the password out.
		return nil, fmt.Errorf("control dsn: %w", err)
	}
	switch {
	case os.Getenv(PasswordEnv) != "":
		pcfg.ConnConfig.Password = os.Getenv(PasswordEnv)
	case cfg.PasswordFile != "":
		b, err := os.ReadFile(cfg.PasswordFile)
		if err != nil {
			return nil, fmt.Errorf("control password_file: %w", err)
		}
		pcfg.ConnConfig.Password = strings.TrimRight(string(b), "\r\n")
	}
	pcfg.MaxConns = int32(cfg.MaxConns)
	if pcfg.ConnConfig.RuntimeParams["application_name"] == "" {
		pcfg.ConnConfig.RuntimeParams["application_name"] = "rolegate"
	}
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return nil, fmt.Errorf("control pool: %w", err)
	}
	c := &Control{pool: pool, authQuery: authQuery, appName: pcfg.ConnConfig.RuntimeParams["application_name"]}
	c.limits.now = time.Now
	c.locks.init()
	c.signals.init()
	return c, nil
}

// Close closes the pool; it is safe to call twice. Admission locks still held
// are released (locks.go).
func (c *Control) Close() {
	c.closeLocks()
	c.pool.Close()
}

// Ping checks that the server answers on the control connection.
func (c *Control) Ping(ctx context.Context) error { return c.pool.Ping(ctx) }

// controlText is a role or database name as the control connection can send
// it. The connection speaks UTF-8 and the server refuses a parameter that is
// not (22021 invalid byte sequence); a login's name that is not UTF-8 (a
// multibyte name the server's 63-byte cut split inside a character) names no
// role or database the server has, so it goes as "", which names none either.
func controlText(name string) string {
	if !utf8.ValidString(name) {
		return ""
	}
	return name
}

// Secret runs the auth query for role. No row means an unknown role; a NULL
// secret is a role without a password (auth.NoSecret). The query may return
// the secret alone or, as PgBouncer's auth_query does, the name and the secret:
// the last column is the secret.
//
// A name that is not valid UTF-8 is an unknown role, and is not sent: the
// control connection speaks UTF8, so the server would refuse the parameter
// (with an ERROR in its log) rather than find a role. A query that fails
// because its connection died (the server terminated it, restarted, or the
// network dropped it) is run once more on another connection: the pool has
// dropped the dead one, and the query only reads.
func (c *Control) Secret(ctx context.Context, role string) (auth.Secret, bool, error) {
	if controlText(role) != role {
		return auth.Secret{}, false, nil // an unknown role, as the server would find
	}
	sec, found, err := c.secret(ctx, role)
	var lost *connLostError
	if errors.As(err, &lost) && ctx.Err() == nil {
		sec, found, err = c.secret(ctx, role)
	}
	return sec, found, err
}

// connLostError is a query that failed because its connection died.
type connLostError struct{ err error }

func (e *connLostError) Error() string { return e.err.Error() }
func (e *connLostError) Unwrap() error { return e.err }

func (c *Control) secret(ctx context.Context, role string) (auth.Secret, bool, error) {
	conn, err := c.pool.Acquire(ctx)
	if err != nil {
		return auth.Secret{}, false, fmt.Errorf("auth query: %w", err)
	}
	defer conn.Release() // the pool destroys a closed connection
	sec, found, err := runAuthQuery(ctx, conn.Conn(), c.authQuery, role)
	if err != nil && conn.Conn().IsClosed() {
		// pgx closes a connection on a network error, a FATAL from the
		// server, or a cancelled context (which the caller checks).
		err = &connLostError{err}
	}
	return sec, found, err
}

func runAuthQuery(ctx context.Context, conn *pgx.Conn, query, role string) (auth.Secret, bool, error) {
	rows, err := conn.Query(ctx, query, role)
	if err != nil {
		return auth.Secret{}, false, fmt.Errorf("auth query: %w", err)
	}
	defer rows.Close()
	if !rows.Next() {
		if err := rows.Err(); err != nil {
			return auth.Secret{}, false, fmt.Errorf("auth query: %w", err)
		}
		return auth.Secret{}, false, nil
	}
	vals, err := rows.Values()
	if err != nil {
		return auth.Secret{}, false, fmt.Errorf("auth query: read row: %w", err)
	}
	if len(vals) == 0 {
		return auth.Secret{}, false, errors.New("auth query: read row: no columns")
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return auth.Secret{}, false, fmt.Errorf("auth query: %w", err)
	}
	var text string
	switch v := vals[len(vals)-1].(type) {
	case nil:
		return auth.Secret{}, true, nil
	case string:
		text = v
	default:
		return auth.Secret{}, false, fmt.Errorf("auth query: the secret column is %T, want text", v)
	}
	sec, err := auth.ParseSecret(text)
	if err != nil {
		return auth.Secret{}, false, fmt.Errorf("auth query: role %q: %w", role, err)
	}
	return sec, true, nil
}
