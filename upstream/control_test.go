package upstream

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/config"
	"github.com/rolegate/rolegate/internal/pgtest"
	"github.com/rolegate/rolegate/internal/testutil"
)

// controlPW is the password the tests give the rolegate control role.
const controlPW = "control pass"

// setupSQL is sql/setup.sql, the least-privilege set-up for the control role.
func setupSQL(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "sql", "setup.sql"))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// controlCluster is a server with sql/setup.sql applied (twice: it must be
// idempotent), the rolegate role's password set, and roles of every kind of
// secret: scram_r, md5_r, nopw_r (no password) and nologin_r (NOLOGIN).
func controlCluster(t *testing.T) *pgtest.Cluster {
	t.Helper()
	c := pgtest.Start(t, pgtest.Options{})
	setup := setupSQL(t)
	for _, q := range []string{
		setup,
		setup,
		fmt.Sprintf("alter role rolegate password '%s'", controlPW),
		fmt.Sprintf("create role scram_r login password '%s'", scramPW),
		fmt.Sprintf("set password_encryption = 'md5'; create role md5_r login password '%s'", md5PW),
		"create role nopw_r login",
		fmt.Sprintf("create role nologin_r nologin password '%s'", nologinPW),
	} {
		if err := c.Exec(t.Context(), q); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// dsnWithout is c's DSN for user with no password in it.
func dsnWithout(c *pgtest.Cluster, user string) string { return c.DSN(user, "", "postgres") }

func newControl(t *testing.T, cfg config.Control, query string) *Control {
	t.Helper()
	if cfg.MaxConns == 0 {
		cfg.MaxConns = 2
	}
	ctl, err := NewControl(t.Context(), cfg, query)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ctl.Close)
	return ctl
}

// wantSecrets checks what a control connection's auth query says of each role.
func wantSecrets(t *testing.T, c *pgtest.Cluster, ctl *Control) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	for _, tt := range []struct {
		role  string
		kind  auth.Kind
		found bool
	}{
		{"scram_r", auth.SCRAM, true},
		{"md5_r", auth.MD5, true},
		{"nopw_r", auth.NoSecret, true},
		{"nologin_r", auth.SCRAM, true}, // the server refuses it after authentication
		{"no_such_role", auth.NoSecret, false},
		{"", auth.NoSecret, false},
	} {
		s, found, err := ctl.Secret(ctx, tt.role)
		if err != nil {
			t.Fatalf("Secret(%q): %v", tt.role, err)
		}
		if found != tt.found || s.Kind != tt.kind {
			t.Errorf("Secret(%q) = %v, found %v; want kind %v, found %v", tt.role, s, found, tt.kind, tt.found)
		}
	}
	// The secret is the server's own, byte for byte.
	s, _, err := ctl.Secret(ctx, "scram_r")
	if err != nil {
		t.Fatal(err)
	}
	conn, err := pgx.Connect(ctx, c.SuperDSN())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var stored string
	if err := conn.QueryRow(ctx, "select rolpassword from pg_authid where rolname = 'scram_r'").Scan(&stored); err != nil {
		t.Fatal(err)
	}
	if s.SCRAM.String() != stored {
		t.Error("the verifier read through the control connection differs from pg_authid's")
	}
}

func wantSQLState(t *testing.T, err error, code string) {
	t.Helper()
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || pgErr.Code != code {
		t.Errorf("error %v, want SQLSTATE %s", err, code)
	}
}

// TestControl is not parallel: the password-source subtests set the
// environment.
func TestControl(t *testing.T) {
	c := controlCluster(t)
	const setupQuery = "SELECT rolegate.get_secret($1)"

	// Where the control role's password comes from: ROLEGATE_CONTROL_PASSWORD,
	// then password_file, then the DSN.
	t.Run("password from the environment before the file", func(t *testing.T) {
		t.Setenv(PasswordEnv, controlPW)
		file := filepath.Join(t.TempDir(), "pw")
		if err := os.WriteFile(file, []byte("wrong file password\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		ctl := newControl(t, config.Control{DSN: dsnWithout(c, "rolegate"), PasswordFile: file}, setupQuery)
		if err := ctl.Ping(t.Context()); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("password from the file before the DSN", func(t *testing.T) {
		t.Setenv(PasswordEnv, "")
		file := filepath.Join(t.TempDir(), "pw")
		if err := os.WriteFile(file, []byte(controlPW+"\r\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		ctl := newControl(t, config.Control{DSN: c.DSN("rolegate", "wrong dsn password", "postgres"), PasswordFile: file}, setupQuery)
		if err := ctl.Ping(t.Context()); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("a wrong password: an error without it", func(t *testing.T) {
		t.Setenv(PasswordEnv, "wrong env password")
		ctl := newControl(t, config.Control{DSN: dsnWithout(c, "rolegate")}, setupQuery)
		_, _, err := ctl.Secret(t.Context(), "scram_r")
		if err == nil || !strings.HasPrefix(err.Error(), "auth query: ") {
			t.Fatalf("Secret with a wrong control password: %v", err)
		}
		wantSQLState(t, err, "28P01")
		if strings.Contains(err.Error(), "wrong env password") {
			t.Errorf("error %q contains the password", err)
		}
	})
	t.Setenv(PasswordEnv, "") // the parallel subtests below do not set it

	t.Run("parallel", func(t *testing.T) {
		t.Run("default auth query as superuser", func(t *testing.T) {
			t.Parallel()
			ctl := newControl(t, config.Control{DSN: c.SuperDSN()}, config.DefaultAuthQuery)
			wantSecrets(t, c, ctl)
		})
		t.Run("setup.sql function as the rolegate role", func(t *testing.T) {
			t.Parallel()
			ctl := newControl(t, config.Control{DSN: c.DSN("rolegate", controlPW, "postgres")}, setupQuery)
			wantSecrets(t, c, ctl)
			// The pool names itself in pg_stat_activity.
			conn, err := pgx.Connect(t.Context(), c.SuperDSN())
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(context.Background())
			var n int
			err = conn.QueryRow(t.Context(),
				"select count(*) from pg_stat_activity where usename = 'rolegate' and application_name = 'rolegate'").Scan(&n)
			if err != nil || n == 0 {
				t.Errorf("control sessions named rolegate: %d, %v", n, err)
			}
		})
		t.Run("a PgBouncer-style query: name and secret", func(t *testing.T) {
			t.Parallel()
			ctl := newControl(t, config.Control{DSN: c.SuperDSN()},
				"SELECT rolname::text, rolpassword FROM pg_catalog.pg_authid WHERE rolname = $1")
			wantSecrets(t, c, ctl)
		})
		t.Run("the setup.sql role has only the privileges it needs", func(t *testing.T) {
			t.Parallel()
			conn, err := pgx.Connect(t.Context(), c.DSN("rolegate", controlPW, "postgres"))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(context.Background())
			var super, signal, stats bool
			err = conn.QueryRow(t.Context(), `select rolsuper,
				pg_has_role(current_user, 'pg_signal_backend', 'member'),
				pg_has_role(current_user, 'pg_read_all_stats', 'member')
				from pg_roles where rolname = current_user`).Scan(&super, &signal, &stats)
			if err != nil {
				t.Fatal(err)
			}
			if super || !signal || !stats {
				t.Errorf("rolegate: superuser %v, pg_signal_backend %v, pg_read_all_stats %v; want false, true, true", super, signal, stats)
			}
			_, err = conn.Exec(t.Context(), "select rolpassword from pg_authid")
			wantSQLState(t, err, "42501")
			// The function's owner is a superuser and runs it with a fixed search_path.
			var owner string
			var secdef bool
			var cfg []string
			err = conn.QueryRow(t.Context(), `select r.rolname, p.prosecdef, p.proconfig
				from pg_proc p join pg_roles r on r.oid = p.proowner
				where p.oid = 'rolegate.get_secret(text)'::regprocedure`).Scan(&owner, &secdef, &cfg)
			if err != nil {
				t.Fatal(err)
			}
			if owner != c.SuperUser || !secdef || len(cfg) != 1 || cfg[0] != "search_path=pg_catalog, pg_temp" {
				t.Errorf("get_secret: owner %s, security definer %v, config %q", owner, secdef, cfg)
			}
			// rolegate cannot change what the function reads: the schema is not its own.
			_, err = conn.Exec(t.Context(), "create table rolegate.t (x int)")
			wantSQLState(t, err, "42501")
		})
		t.Run("other roles cannot call the function", func(t *testing.T) {
			t.Parallel()
			if err := c.Exec(t.Context(), "create role other_r login password 'other pass'"); err != nil {
				t.Fatal(err)
			}
			conn, err := pgx.Connect(t.Context(), c.DSN("other_r", "other pass", "postgres"))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(context.Background())
			_, err = conn.Exec(t.Context(), "select rolegate.get_secret('scram_r')")
			wantSQLState(t, err, "42501")
			_, err = conn.Exec(t.Context(), "select * from pg_catalog.pg_authid")
			wantSQLState(t, err, "42501")
		})
		t.Run("setup.sql refuses to run as a non-superuser", func(t *testing.T) {
			t.Parallel()
			conn, err := pgx.Connect(t.Context(), c.DSN("rolegate", controlPW, "postgres"))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close(context.Background())
			_, err = conn.Exec(t.Context(), setupSQL(t))
			if err == nil || !strings.Contains(err.Error(), "must be run by a superuser, not by rolegate") {
				t.Errorf("setup.sql as rolegate: %v", err)
			}
		})
		t.Run("auth query errors", func(t *testing.T) {
			t.Parallel()
			for _, tt := range []struct{ query, want string }{
				{"SELECT 42 WHERE $1::text IS NOT NULL", "the secret column is int32, want text"},
				{"SELECT FROM pg_roles WHERE rolname = $1", "no columns"},
				{"SELECT no_such_column FROM pg_roles WHERE rolname = $1", "auth query: ERROR: column"},
				// A verifier that does not parse: the error names the part, not the value.
				{"SELECT 'SCRAM-SHA-256$4096:c2FsdHNhbHQ=$c3RvcmVk:c2VydmVy'::text WHERE $1::text IS NOT NULL",
					`auth query: role "scram_r": invalid SCRAM secret: StoredKey is not 32 bytes of base64`},
			} {
				ctl := newControl(t, config.Control{DSN: c.SuperDSN(), MaxConns: 1}, tt.query)
				_, _, err := ctl.Secret(t.Context(), "scram_r")
				if err == nil || !strings.Contains(err.Error(), tt.want) {
					t.Errorf("query %q: error %v, want %q", tt.query, err, tt.want)
					continue
				}
				for _, part := range []string{"c2FsdHNhbHQ=", "c3RvcmVk", "c2VydmVy"} {
					if strings.Contains(err.Error(), part) {
						t.Errorf("error %q contains part of the secret", err)
					}
				}
			}
		})
	})
}

// NewControl connects lazily: rolegate starts, and -check passes, while the
// server is down; the auth query then reports the failure.
func TestControlLazy(t *testing.T) {
	t.Parallel()
	addr := testutil.ClosedAddr(t)
	ctl, err := NewControl(t.Context(), config.Control{DSN: "postgres://rolegate@" + addr + "/postgres?sslmode=disable&connect_timeout=5",
		MaxConns: 1}, config.DefaultAuthQuery)
	if err != nil {
		t.Fatalf("NewControl with the server down: %v", err)
	}
	_, _, err = ctl.Secret(t.Context(), "anyone")
	if err == nil || !strings.HasPrefix(err.Error(), "auth query: ") {
		t.Errorf("Secret with the server down: %v", err)
	}
	ctl.Close()
	ctl.Close() // twice is fine
}

func TestNewControlErrors(t *testing.T) {
	t.Parallel()
	_, err := NewControl(t.Context(), config.Control{DSN: "postgres://rolegate:hunter2@127.0.0.1:notaport/postgres", MaxConns: 1}, config.DefaultAuthQuery)
	if err == nil || !strings.HasPrefix(err.Error(), "control dsn: ") || strings.Contains(err.Error(), "hunter2") {
		t.Errorf("bad DSN: %v; want a control dsn error without the password", err)
	}
	missing := filepath.Join(t.TempDir(), "missing")
	_, err = NewControl(t.Context(), config.Control{DSN: "postgres://rolegate@127.0.0.1:5432/postgres", PasswordFile: missing, MaxConns: 1},
		config.DefaultAuthQuery)
	if os.Getenv(PasswordEnv) == "" && (err == nil || !strings.HasPrefix(err.Error(), "control password_file: ") || !errors.Is(err, os.ErrNotExist)) {
		t.Errorf("missing password_file: %v", err)
	}
}
