package proxy

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/rolegate/rolegate/internal/testutil"
)

// A panic inside one session must be logged with its stack, end only that
// session, and leave the server accepting. A Server without an upstream dialer
// panics on the first login, which is a real panic path without test hooks.
func TestPanicInSessionIsContained(t *testing.T) {
	logs := &testutil.SyncBuffer{}
	srv := New(Config{StartupTimeout: 5 * time.Second,
		Logger: slog.New(slog.NewTextHandler(logs, nil))})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	dsn := "host=127.0.0.1 port=" + portOf(ln) + " user=trust_user dbname=app sslmode=disable connect_timeout=5"

	for i := range 2 { // the second login proves the server still accepts
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := pgx.Connect(ctx, dsn)
		cancel()
		if err == nil {
			t.Fatalf("login %d succeeded without an upstream", i)
		}
	}
	out := logs.String()
	if got := strings.Count(out, "session panicked"); got != 2 {
		t.Errorf("want 2 panic log lines, got %d:\n%s", got, out)
	}
	if !strings.Contains(out, "goroutine ") || !strings.Contains(out, "proxy.(*clientConn).login") {
		t.Errorf("panic log lacks the stack:\n%s", out)
	}
	srv.Close()
	if err := <-served; !errors.Is(err, ErrServerClosed) {
		t.Errorf("Serve: %v", err)
	}
}

func portOf(ln net.Listener) string {
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	return port
}
