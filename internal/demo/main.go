// Command demo is `make demo`: it starts a throwaway PostgreSQL, creates a
// role with a connection limit of 1, runs rolegate in front of it in proxy
// mode and prints the psql commands to try. Ctrl-C stops rolegate and removes
// the cluster.
//
// rolegate authenticates clients itself: sql/setup.sql creates its
// least-privilege control role, whose random password reaches rolegate in
// ROLEGATE_CONTROL_PASSWORD, and the auth query calls the set-up's function.
//
//	go run ./internal/demo -rolegate ./bin/rolegate
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/rolegate/rolegate/internal/pgtest"
	"github.com/rolegate/rolegate/upstream"
)

const (
	// listenTimeout is how long rolegate may take to open its port.
	listenTimeout = 10 * time.Second
	// stopTimeout is how long rolegate may drain after SIGTERM; the demo
	// has nothing worth waiting longer for.
	stopTimeout = 5 * time.Second
	// checkTimeout bounds the demo's own login through rolegate.
	checkTimeout = 10 * time.Second

	// The demo's role, which the instructions use.
	demoUser, demoPassword, demoDB = "some_user", "some_password", "some_db"
	// authQuery calls sql/setup.sql's function.
	authQuery = "SELECT rolegate.get_secret($1)"
)

func main() {
	binary := flag.String("rolegate", "./bin/rolegate", "path to the rolegate binary")
	listen := flag.String("listen", "127.0.0.1:6432", "address rolegate listens on")
	setup := flag.String("setup", "sql/setup.sql", "the least-privilege set-up script for rolegate's control role")
	flag.Parse()
	os.Exit(run(*binary, *listen, *setup))
}

// run returns the exit status, so that the deferred cleanups run before the
// process exits.
func run(binary, listen, setupFile string) int {
	logf := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "demo: "+format+"\n", args...)
	}
	fail := func(format string, args ...any) int {
		logf(format, args...)
		return 1
	}

	// Fail before starting anything: these are the usual mistakes.
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return fail("-listen %q: %v", listen, err)
	}
	if _, err := os.Stat(binary); err != nil {
		return fail("rolegate binary: %v (build it first: make build)", err)
	}
	setupSQL, err := os.ReadFile(setupFile)
	if err != nil {
		return fail("set-up script: %v (run the demo from the repository root, or pass -setup)", err)
	}
	if conn, err := net.DialTimeout("tcp", listen, time.Second); err == nil {
		conn.Close()
		return fail("%s is already in use; stop what listens there or pass -listen", listen)
	}

	// Signals are caught from here on, so that a Ctrl-C during the cluster
	// start still removes the cluster. Once one has arrived the default
	// handling comes back, so a second Ctrl-C ends the demo at once (the
	// children die with it; only the temp dir stays behind).
	ctx, stopSignals := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stopSignals()
	context.AfterFunc(ctx, stopSignals)

	cluster, err := pgtest.New(ctx, pgtest.Options{Logf: logf})
	if err != nil {
		return fail("starting PostgreSQL: %v", err)
	}
	defer func() {
		if err := cluster.Close(); err != nil {
			logf("stopping PostgreSQL: %v", err)
		}
	}()
	controlPassword, err := setUp(ctx, cluster, string(setupSQL))
	if err != nil {
		return fail("%v", err)
	}

	configFile := filepath.Join(cluster.Dir, "rolegate.toml")
	if err := os.WriteFile(configFile, []byte(config(listen, cluster)), 0o644); err != nil {
		return fail("rolegate config: %v", err)
	}

	cmd := exec.Command(binary, "-config", configFile)
	// The control role's password goes in the environment, not the file.
	cmd.Env = append(os.Environ(), upstream.PasswordEnv+"="+controlPassword)
	cmd.Stdout = os.Stdout
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// The terminal's Ctrl-C reaches only the demo, which stops
		// rolegate before the server, so rolegate's shutdown is what shows.
		Setpgid: true,
		// A demo killed hard must not leave rolegate running.
		Pdeathsig: syscall.SIGKILL,
	}
	if err := cmd.Start(); err != nil {
		return fail("starting rolegate: %v", err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait() // the result is in cmd.ProcessState
		close(exited)
	}()

	if err := pgtest.WaitListening(ctx, listen, exited, listenTimeout); err != nil {
		stop(cmd, exited, logf)
		return fail("rolegate %v (%v)", err, cmd.ProcessState)
	}
	if err := checkLogin(ctx, host, port, cluster); err != nil {
		stop(cmd, exited, logf)
		return fail("%v", err)
	}
	printInstructions(listen, host, port, cluster)

	select {
	case <-ctx.Done():
		logf("stopping rolegate and PostgreSQL")
		stop(cmd, exited, logf)
		return 0
	case <-exited:
		code := cmd.ProcessState.ExitCode()
		logf("rolegate exited on its own (%v); removing PostgreSQL", cmd.ProcessState)
		if code < 0 { // killed by a signal
			code = 1
		}
		return code
	}
}

// setUp applies sql/setup.sql (the control role rolegate reads verifiers
// with, and its lookup function), gives the control role a random password,
// which it returns, and creates the role the demo is about: limited to one
// session, so a second login shows what rolegate does at the limit.
func setUp(ctx context.Context, c *pgtest.Cluster, setupSQL string) (controlPassword string, err error) {
	// The script is plain SQL, run as the superuser in database postgres,
	// as [control] dsn names it.
	if err := c.Exec(ctx, setupSQL); err != nil {
		return "", fmt.Errorf("running sql/setup.sql: %w", err)
	}
	controlPassword = pgtest.RandomHex(16)
	// CREATE DATABASE refuses to run in the implicit transaction of a
	// multi-statement query, so the statements go one by one.
	for _, sql := range []string{
		"alter role rolegate password '" + controlPassword + "'",
		fmt.Sprintf("create role %s login password '%s' connection limit 1", demoUser, demoPassword),
		fmt.Sprintf("create database %s owner %s", demoDB, demoUser),
	} {
		if err := c.Exec(ctx, sql); err != nil {
			return "", fmt.Errorf("setting up the demo roles: %w", err)
		}
	}
	return controlPassword, nil
}

// config is rolegate's configuration: proxy mode, with the control role of
// sql/setup.sql (its password comes from the environment).
func config(listen string, c *pgtest.Cluster) string {
	dsn := url.URL{Scheme: "postgres", User: url.User("rolegate"), Host: c.Addr(), Path: "/postgres", RawQuery: "sslmode=disable"}
	return fmt.Sprintf(`# written by the rolegate demo
listen = %s

[server]
address = %s
sslmode = "prefer"

[control]
dsn = %s

[auth]
mode = "proxy"
auth_query = %s

# some_user has connection limit 1 on the server; here the newest login wins.
[roles.some_user]
policy = "newest-wins"

[admin]
users = ["postgres"]   # the superuser may open the console: database "rolegate"
`, tomlString(listen), tomlString(c.Addr()), tomlString(dsn.String()), tomlString(authQuery))
}

// checkLogin logs in through rolegate once, as the instructions will tell
// the user to, and waits until that session has left the server, so that
// the role's one slot is free again.
func checkLogin(ctx context.Context, host, port string, c *pgtest.Cluster) error {
	ctx, cancel := context.WithTimeout(ctx, checkTimeout)
	defer cancel()
	dsn := fmt.Sprintf("host=%s port=%s user=%s password=%s dbname=%s sslmode=disable application_name=rolegate-demo-check",
		host, port, demoUser, demoPassword, demoDB)
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return fmt.Errorf("logging in through rolegate as %s: %w", demoUser, err)
	}
	var who string
	err = conn.QueryRow(ctx, "select current_user").Scan(&who)
	conn.Close(ctx)
	if err != nil || who != demoUser {
		return fmt.Errorf("a session through rolegate: current_user %q, %v", who, err)
	}
	super, err := pgx.Connect(ctx, c.SuperDSN())
	if err != nil {
		return err
	}
	defer super.Close(context.WithoutCancel(ctx))
	for {
		var n int
		err := super.QueryRow(ctx, "select count(*) from pg_stat_activity where application_name = 'rolegate-demo-check'").Scan(&n)
		if err != nil {
			return fmt.Errorf("waiting for the check's session to end: %w", err)
		}
		if n == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return errors.New("the check's session through rolegate did not end")
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// tomlString quotes s as a TOML basic string. strconv.Quote would do for
// plain addresses but writes \x escapes, which TOML lacks.
func tomlString(s string) string {
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(s) + `"`
}

// stop asks rolegate to shut down and kills it if it takes too long.
func stop(cmd *exec.Cmd, exited <-chan struct{}, logf func(string, ...any)) {
	_ = cmd.Process.Signal(syscall.SIGTERM) // fails only if it already exited
	timer := time.NewTimer(stopTimeout)
	defer timer.Stop()
	select {
	case <-exited:
	case <-timer.C:
		logf("rolegate still running %v after SIGTERM; killing it", stopTimeout)
		_ = cmd.Process.Kill()
		<-exited
	}
}

func printInstructions(listen, host, port string, c *pgtest.Cluster) {
	fmt.Printf(`
rolegate is listening on %s in front of PostgreSQL on %s.
It checks passwords itself (proxy mode), with verifiers it reads through
its least-privilege control role (sql/setup.sql).
some_user may hold one session (connection limit 1), and its policy here is
newest-wins. Run this in two terminals, one after the other: the second login
gets in, and the first session is told it was evicted for it.

  psql "host=%[3]s port=%[4]s user=some_user dbname=some_db password=some_password"

The same happens to a session opened straight against the server:

  psql "host=%[5]s port=%[6]d user=some_user dbname=some_db password=some_password"   # directly, not through rolegate
  psql "host=%[5]s port=%[6]d user=%[7]s dbname=postgres password=%[8]s"   # the server directly, as superuser

The operator console (SHOW SESSIONS, SHOW EVICTIONS, KILL <pid>, SET POLICY ...),
and the HTTP API on 127.0.0.1:9631 (/api/sessions, /api/evictions, /metrics):

  psql "host=%[3]s port=%[4]s user=%[7]s dbname=rolegate password=%[8]s" -c "show sessions"
  curl -s http://127.0.0.1:9631/api/evictions

Press Ctrl-C to stop and remove everything.

`, listen, c.Addr(), host, port, c.Host, c.Port, c.SuperUser, c.SuperPassword)
}
