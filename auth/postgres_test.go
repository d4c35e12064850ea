package auth

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/internal/pgtest"
)

// TestPostgres checks the package against a real server and real clients:
// verifiers and md5 hashes PostgreSQL made, SASLprep as PostgreSQL and libpq
// do it, pgx and psql logging in to a SCRAMServer, and the recovered keys
// logging in to PostgreSQL.
func TestPostgres(t *testing.T) {
	cluster := pgtest.Start(t, pgtest.Options{HBA: []string{
		"host all md5_user 127.0.0.1/32 md5",
		"host all plain_user 127.0.0.1/32 password",
	}})
	ctx := t.Context()
	conn, err := pgx.Connect(ctx, cluster.SuperDSN())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.WithoutCancel(ctx))

	// createRole makes a login role and returns its pg_authid.rolpassword.
	createRole := func(t *testing.T, role, password, encryption string) string {
		t.Helper()
		if encryption == "" {
			encryption = "scram-sha-256"
		}
		for _, sql := range []string{
			"set password_encryption = '" + encryption + "'",
			fmt.Sprintf("create role %s login password %s", pgx.Identifier{role}.Sanitize(), quoteLiteral(password)),
		} {
			if _, err := conn.Exec(ctx, sql); err != nil {
				t.Fatalf("%s: %v", sql, err)
			}
		}
		var secret string
		if err := conn.QueryRow(ctx, "select rolpassword from pg_authid where rolname = $1", role).Scan(&secret); err != nil {
			t.Fatal(err)
		}
		return secret
	}

	t.Run("verifier from PostgreSQL", func(t *testing.T) {
		text := createRole(t, "x", "y", "")
		secret, err := ParseSecret(text)
		if err != nil || secret.Kind != SCRAM {
			t.Fatalf("ParseSecret(rolpassword) = %v, %v", secret, err)
		}
		if secret.SCRAM.String() != text {
			t.Fatalf("text form differs from PostgreSQL's:\n%s\n%s", secret.SCRAM, text)
		}
		if _, err := VerifyPassword(secret, "x", "y"); err != nil {
			t.Fatalf("right password: %v", err)
		}
		if _, err := VerifyPassword(secret, "x", "z"); !errors.Is(err, ErrPasswordMismatch) {
			t.Fatalf("wrong password: %v", err)
		}
		// Our own derivation with PostgreSQL's salt gives PostgreSQL's verifier.
		if got := NewSCRAMVerifier("y", secret.SCRAM.Salt, secret.SCRAM.Iterations).String(); got != text {
			t.Fatalf("NewSCRAMVerifier:\n%s\nPostgreSQL:\n%s", got, text)
		}
	})

	t.Run("md5 from PostgreSQL", func(t *testing.T) {
		text := createRole(t, "md5_user", "md5 secret", "md5")
		if text != "md5506f157135f7be153e624181cbbb4e6b" || text != MD5Hash("md5_user", "md5 secret") {
			t.Fatalf("PostgreSQL stored %s, MD5Hash says %s", text, MD5Hash("md5_user", "md5 secret"))
		}
		secret, _ := ParseSecret(text)
		keys, err := VerifyPassword(secret, "md5_user", "md5 secret")
		if err != nil {
			t.Fatal(err)
		}
		// The stored hash alone logs in (pg_hba says md5 for this role).
		if err := loginUpstream(cluster.Addr(), "md5_user", &Keys{MD5: keys.MD5}); err != nil {
			t.Fatalf("md5 login with the hash: %v", err)
		}
	})

	t.Run("cleartext login upstream", func(t *testing.T) {
		createRole(t, "plain_user", "plain secret", "")
		if err := loginUpstream(cluster.Addr(), "plain_user", &Keys{Password: "plain secret"}); err != nil {
			t.Fatalf("password login: %v", err)
		}
	})

	t.Run("SASLprep agrees with PostgreSQL", func(t *testing.T) {
		for i, tc := range []struct {
			password string
			twin     string // another spelling; "" when there is none
			same     bool   // whether PostgreSQL takes the twin for the password
		}{
			{"\uFF50\uFF41\uFF53\uFF53", "pass", true}, // NFKC
			{"pa\u00ADss\u200Dword", "password", true}, // mapped to nothing
			{"pass\u00A0word", "pass word", true},      // non-ASCII space
			{"e\u0301t\u00E9", "\u00E9t\u00E9", true},  // composition
			{"\u05D0\u05D1\u05D2", "", true},           // right-to-left
			{"\uFF50\u05D0", "p\u05D0", false},         // broken bidi: raw bytes
			{"\uFF50\u0221", "p\u0221", false},         // unassigned in 3.2: raw bytes
			{"\uFF50\u200E", "p\u200E", false},         // prohibited: raw bytes
			{"\uFF50\U0001F600", "p\U0001F600", false}, // emoji, unassigned in 3.2
			{"tab\tand\u007fdel", "", true},            // ASCII is left alone
		} {
			role := "prep" + strconv.Itoa(i)
			secret, err := ParseSecret(createRole(t, role, tc.password, ""))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := VerifyPassword(secret, role, tc.password); err != nil {
				t.Errorf("%+q: PostgreSQL's verifier refuses the password itself", tc.password)
			}
			if tc.twin == "" {
				continue
			}
			_, err = VerifyPassword(secret, role, tc.twin)
			if (err == nil) != tc.same {
				t.Errorf("%+q vs %+q: match %t, PostgreSQL's SASLprep says %t", tc.password, tc.twin, err == nil, tc.same)
			}
		}
	})

	t.Run("pass-through", func(t *testing.T) {
		secret, err := ParseSecret(createRole(t, "alice", "alice's password", ""))
		if err != nil {
			t.Fatal(err)
		}
		fake := startFakeServer(t, func(user string) *SCRAMServer {
			if user == "alice" {
				return NewSCRAMServer(user, secret.SCRAM)
			}
			return NewSCRAMServer(user, nil)
		})

		// pgx, as a client of rolegate, proves the password.
		pc, err := pgconn.Connect(ctx, fake.dsn("alice", "alice's password"))
		if err != nil {
			t.Fatalf("pgx login to the SCRAMServer: %v", err)
		}
		pc.Close(ctx)
		res := <-fake.results
		if res.err != nil {
			t.Fatal(res.err)
		}
		// The recovered keys log in to PostgreSQL, again and again, without
		// the client.
		for i := range 3 {
			if err := loginUpstream(cluster.Addr(), "alice", res.keys); err != nil {
				t.Fatalf("login %d to PostgreSQL with recovered keys: %v", i, err)
			}
		}

		// Wrong password and unknown role: pgx hears PostgreSQL's own answer.
		for _, user := range []string{"alice", "ghost"} {
			_, err := pgconn.Connect(ctx, fake.dsn(user, "wrong"))
			var pgErr *pgconn.PgError
			if !errors.As(err, &pgErr) || pgErr.Code != "28P01" ||
				pgErr.Message != `password authentication failed for user "`+user+`"` {
				t.Fatalf("%s with a wrong password: %v", user, err)
			}
			if res := <-fake.results; !errors.Is(res.err, ErrPasswordMismatch) {
				t.Fatalf("%s: server side %v", user, res.err)
			}
			// PostgreSQL says the same for the same mistakes.
			_, direct := pgconn.Connect(ctx, cluster.DSN(user, "wrong", "postgres"))
			if !errors.As(direct, &pgErr) || pgErr.Message != `password authentication failed for user "`+user+`"` {
				t.Fatalf("PostgreSQL itself, %s: %v", user, direct)
			}
		}
	})

	t.Run("psql", func(t *testing.T) {
		psql, err := exec.LookPath("psql")
		if err != nil {
			t.Fatalf("psql (libpq) not found: %v", err)
		}
		// A non-ASCII password, so libpq's SASLprep meets PostgreSQL's
		// verifier through our exchange.
		const password = "\uFF42\uFF4F\uFF42-pa\u00ADss"
		secret, err := ParseSecret(createRole(t, "bob", password, ""))
		if err != nil {
			t.Fatal(err)
		}
		fake := startFakeServer(t, func(user string) *SCRAMServer { return NewSCRAMServer(user, secret.SCRAM) })
		cmd := exec.CommandContext(ctx, psql, "-X", "-w", "-c", `\q`,
			fmt.Sprintf("host=127.0.0.1 port=%d user=bob dbname=postgres sslmode=disable gssencmode=disable connect_timeout=10", fake.port()))
		cmd.Env = append(pgtest.CleanEnv(), "PGPASSWORD="+password)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("psql: %v\n%s", err, out)
		}
		res := <-fake.results
		if res.err != nil {
			t.Fatal(res.err)
		}
		if err := loginUpstream(cluster.Addr(), "bob", res.keys); err != nil {
			t.Fatalf("login to PostgreSQL with keys recovered from psql: %v", err)
		}
	})
}

// loginUpstream logs in to a PostgreSQL server as user with keys, the way
// rolegate's upstream dialer will: SCRAM with the recovered keys, md5 with
// the hash, or the cleartext password, whichever the server asks for.
func loginUpstream(addr, user string, keys *Keys) error {
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
	fe := pgproto3.NewFrontend(conn, conn)
	fe.Send(&pgproto3.StartupMessage{
		ProtocolVersion: pgproto3.ProtocolVersionNumber,
		Parameters:      map[string]string{"user": user, "database": "postgres"},
	})
	var sc *SCRAMClient
	verified := false
	for {
		if err := fe.Flush(); err != nil {
			return err
		}
		msg, err := fe.Receive()
		if err != nil {
			return err
		}
		switch m := msg.(type) {
		case *pgproto3.AuthenticationSASL:
			if sc, err = NewSCRAMClient(keys); err != nil {
				return err
			}
			fe.Send(&pgproto3.SASLInitialResponse{AuthMechanism: SCRAMSHA256, Data: sc.ClientFirst()})
		case *pgproto3.AuthenticationSASLContinue:
			final, err := sc.ClientFinal(m.Data)
			if err != nil {
				return err
			}
			fe.Send(&pgproto3.SASLResponse{Data: final})
		case *pgproto3.AuthenticationSASLFinal:
			if err := sc.Verify(m.Data); err != nil {
				return err
			}
			verified = true
		case *pgproto3.AuthenticationMD5Password:
			fe.Send(&pgproto3.PasswordMessage{Password: MD5Response(keys.MD5, m.Salt)})
		case *pgproto3.AuthenticationCleartextPassword:
			fe.Send(&pgproto3.PasswordMessage{Password: keys.Password})
		case *pgproto3.AuthenticationOk:
			if sc != nil && !verified {
				return errors.New("AuthenticationOk before the server proved itself")
			}
		case *pgproto3.ErrorResponse:
			return pgconn.ErrorResponseToPgError(m)
		case *pgproto3.ReadyForQuery:
			fe.Send(&pgproto3.Terminate{})
			return fe.Flush()
		}
	}
}

// fakeServer is a stand-in for rolegate's listener: it answers each login
// as PostgreSQL would, up to ReadyForQuery, authenticating the client with a
// SCRAMServer, and reports each outcome on results.
type fakeServer struct {
	ln      net.Listener
	results chan loginResult
}

type loginResult struct {
	keys *Keys
	err  error
}

func startFakeServer(t *testing.T, newServer func(user string) *SCRAMServer) *fakeServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeServer{ln: ln, results: make(chan loginResult, 16)}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				keys, err := serveLogin(conn, newServer)
				f.results <- loginResult{keys, err}
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return f
}

func (f *fakeServer) port() int { return f.ln.Addr().(*net.TCPAddr).Port }

func (f *fakeServer) dsn(user, password string) string {
	u := url.URL{Scheme: "postgres", User: url.UserPassword(user, password),
		Host: f.ln.Addr().String(), Path: "/postgres", RawQuery: "sslmode=disable&connect_timeout=10"}
	return u.String()
}

func serveLogin(conn net.Conn, newServer func(user string) *SCRAMServer) (*Keys, error) {
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
	be := pgproto3.NewBackend(conn, conn)
	be.SetMaxBodyLen(10_000)
	msg, err := be.ReceiveStartupMessage()
	for err == nil {
		if _, ok := msg.(*pgproto3.StartupMessage); ok {
			break
		}
		if _, err = conn.Write([]byte("N")); err == nil { // SSLRequest, GSSEncRequest
			msg, err = be.ReceiveStartupMessage()
		}
	}
	if err != nil {
		return nil, err
	}
	s := newServer(msg.(*pgproto3.StartupMessage).Parameters["user"])
	fail := func(err error) (*Keys, error) {
		var e *Error
		if errors.As(err, &e) {
			be.Send(&pgproto3.ErrorResponse{Severity: "FATAL", SeverityUnlocalized: "FATAL",
				Code: e.Code, Message: e.Message, Detail: e.Detail})
			_ = be.Flush()
		}
		return nil, err
	}
	receive := func(authType uint32) (pgproto3.FrontendMessage, error) {
		if err := be.Flush(); err != nil {
			return nil, err
		}
		if err := be.SetAuthType(authType); err != nil {
			return nil, err
		}
		return be.Receive()
	}

	be.Send(&pgproto3.AuthenticationSASL{AuthMechanisms: s.Mechanisms()})
	msg, err = receive(pgproto3.AuthTypeSASL)
	if err != nil {
		return nil, err
	}
	initial, ok := msg.(*pgproto3.SASLInitialResponse)
	if !ok {
		return nil, fmt.Errorf("expected SASLInitialResponse, got %T", msg)
	}
	serverFirst, err := s.Start(initial.AuthMechanism, initial.Data)
	if err != nil {
		return fail(err)
	}
	be.Send(&pgproto3.AuthenticationSASLContinue{Data: serverFirst})
	msg, err = receive(pgproto3.AuthTypeSASLContinue)
	if err != nil {
		return nil, err
	}
	response, ok := msg.(*pgproto3.SASLResponse)
	if !ok {
		return nil, fmt.Errorf("expected SASLResponse, got %T", msg)
	}
	serverFinal, keys, err := s.Finish(response.Data)
	if err != nil {
		return fail(err)
	}
	be.Send(&pgproto3.AuthenticationSASLFinal{Data: serverFinal})
	be.Send(&pgproto3.AuthenticationOk{})
	for _, p := range [][2]string{{"server_version", "15.0"}, {"client_encoding", "UTF8"},
		{"standard_conforming_strings", "on"}, {"DateStyle", "ISO, MDY"}, {"integer_datetimes", "on"}} {
		be.Send(&pgproto3.ParameterStatus{Name: p[0], Value: p[1]})
	}
	be.Send(&pgproto3.BackendKeyData{ProcessID: 1, SecretKey: []byte{1, 2, 3, 4}})
	be.Send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
	if err := be.Flush(); err != nil {
		return nil, err
	}
	// Let the client leave on its own, as it would from a real server.
	for {
		msg, err := be.Receive()
		if err != nil {
			return keys, nil
		}
		switch msg.(type) {
		case *pgproto3.Terminate:
			return keys, nil
		case *pgproto3.Query:
			be.Send(&pgproto3.EmptyQueryResponse{})
			be.Send(&pgproto3.ReadyForQuery{TxStatus: 'I'})
			if err := be.Flush(); err != nil {
				return keys, nil
			}
		}
	}
}

// quoteLiteral quotes s as an SQL string literal (standard_conforming_strings on).
func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }
