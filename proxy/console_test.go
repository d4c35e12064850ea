package proxy

import (
	"bufio"
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/internal/wire"
)

// oneRowConsole answers every query with one row naming the console user: the
// routing is what is under test here; package admin tests the real console.
type oneRowConsole struct{}

func (oneRowConsole) ServeConsole(ctx context.Context, conn net.Conn, r *bufio.Reader, user string) error {
	for {
		m, err := wire.ReadMessage(r, 1<<20)
		if err != nil || m.Type == 'X' {
			return err
		}
		var out []byte
		out = wire.Encode(out, &pgproto3.RowDescription{Fields: []pgproto3.FieldDescription{{Name: []byte("user"), DataTypeOID: 25, DataTypeSize: -1, TypeModifier: -1}}})
		out = wire.Encode(out, &pgproto3.DataRow{Values: [][]byte{[]byte(user)}})
		out = wire.Encode(out, &pgproto3.CommandComplete{CommandTag: []byte("SHOW")})
		out = wire.Encode(out, &pgproto3.ReadyForQuery{TxStatus: 'I'})
		if _, err := conn.Write(out); err != nil {
			return err
		}
	}
}

func TestConsoleRouting(t *testing.T) {
	ctl := superControl(t, shared)
	p := startProxyWith(t, proxyOpts{auth: proxyAuth(time.Minute, auth.SourceFunc(ctl.Secret))}, func(c *Config) {
		c.ConsoleUsers = []string{"scram_user"}
	})
	p.SetConsole(oneRowConsole{})
	ctx := context.Background()

	cfg, err := pgx.ParseConfig(p.DSN("scram_user", scramPW, "rolegate"))
	if err != nil {
		t.Fatal(err)
	}
	cfg.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
	c, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatalf("console login: %v", err)
	}
	var who string
	if err := c.QueryRow(ctx, "SHOW ANYTHING").Scan(&who); err != nil || who != "scram_user" {
		t.Fatalf("console query: %q, %v", who, err)
	}
	c.Close(ctx)
	out, errOut, err := psql(t, p.DSN("scram_user", scramPW, "rolegate"), "", "-Atc", "show sessions")
	if err != nil || strings.TrimSpace(out) != "scram_user" {
		t.Fatalf("psql console: %v, %q %q", err, out, errOut)
	}
	// A role not in the console's users is refused after it authenticated.
	_, err = pgx.Connect(ctx, p.DSN("md5_user", md5PW, "rolegate"))
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "28000" || !strings.Contains(pe.Message, "not allowed to use the rolegate console") {
		t.Fatalf("non-console user: %v", err)
	}
	// A wrong password never reaches the console.
	_, err = pgx.Connect(ctx, p.DSN("scram_user", "wrong", "rolegate"))
	if !errors.As(err, &pe) || pe.Code != "28P01" {
		t.Fatalf("wrong password: %v", err)
	}
	// Console sessions are not server sessions: once the failed logins'
	// connections have closed, nothing is listed.
	waitUntil(t, 30*time.Second, "no sessions listed", func() bool { return len(p.Sessions()) == 0 })
}

func TestConsoleNeedsProxyAuth(t *testing.T) {
	p := startProxy(t, proxyOpts{})
	p.SetConsole(oneRowConsole{})
	_, err := pgx.Connect(context.Background(), p.DSN("trust_user", "", "rolegate"))
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "28000" || !strings.Contains(pe.Message, "needs proxy authentication") {
		t.Fatalf("passthrough console: %v", err)
	}
}
