// Package pgtest runs throwaway PostgreSQL clusters for tests, `make demo` and
// benchmarks: initdb into a temp dir, a free port on 127.0.0.1,
// scram-sha-256 for TCP logins and, on request, TLS with a generated CA.
//
// Integration tests talk to a real server rather than a mock because what
// rolegate has to get right (authentication, pg_stat_activity counts,
// pg_terminate_backend) is the server's behaviour, not ours.
//
// When the test process runs as root, as CI does, initdb and postgres run as
// the postgres user (or nobody), because PostgreSQL refuses to run as root.
// The cluster lives under os.TempDir(), which that user must be able to
// reach, so a TMPDIR inside /root does not work.
package pgtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

const (
	// readyTimeout bounds how long a fresh postmaster may take to accept
	// logins; a healthy one needs well under a second.
	readyTimeout = 30 * time.Second
	// readyPoll is how often startup progress is checked. postmaster.pid is
	// a local file, so polling it often costs nothing and shaves startup.
	readyPoll = 20 * time.Millisecond
	// readyGrace is how long logins may fail once the server says it is
	// ready, for the odd transient failure.
	readyGrace = 2 * time.Second
	// stopTimeout is how long a fast shutdown may take before SIGKILL: its
	// shutdown checkpoint waited over 5 s for a CPU on a loaded machine.
	stopTimeout = 60 * time.Second
	// portAttempts bounds retries when the free port we picked was taken
	// by someone else before the postmaster could bind it.
	portAttempts = 3
)

// errPortInUse marks a start that failed only because the port was taken.
var errPortInUse = errors.New("port already in use")

// Options configures a throwaway cluster. The zero value is a plain-TCP
// cluster that requires scram-sha-256 for every TCP login.
type Options struct {
	// HBA lines are placed before the default host lines in pg_hba.conf,
	// so they win for the users and addresses they match, e.g.
	// "host all trust_user 127.0.0.1/32 trust".
	HBA []string
	// SSL turns on server-side TLS with a CA and server certificate that
	// the harness generates, so clients can use sslmode=verify-full.
	SSL bool
	// HostSSLOnly makes the default host lines hostssl, so that a login
	// without TLS is refused (only meaningful with SSL).
	HostSSLOnly bool
	// Settings are extra postgresql.conf parameters, written after the
	// harness's own so they override them.
	Settings map[string]string
	// Logf, when set, receives a few progress lines (start, stop); tests
	// pass t.Logf so a slow or failing start is visible.
	Logf func(format string, args ...any)
}

// Cluster is a running throwaway PostgreSQL server. Its exported fields are
// set by New and must not be changed.
type Cluster struct {
	// Host is the address the server listens on, always "127.0.0.1".
	Host string
	// Port is the TCP port the server listens on.
	Port int
	// Dir is the cluster's temp dir; the data dir, the server log, the
	// Unix socket and the TLS files are inside. Close removes it.
	Dir string
	// SuperUser is the bootstrap superuser, "postgres".
	SuperUser string
	// SuperPassword is SuperUser's password, random per cluster.
	SuperPassword string
	// CACertFile, when SSL is on, is the PEM certificate of the CA that
	// signed the server's certificate; clients verify against it. It is
	// readable by any user. The server also trusts it for client
	// certificates, so tests can use the cert auth method.
	CACertFile string
	// CAKeyFile, when SSL is on, is the CA's PEM private key, so tests can
	// issue more certificates (for clients or for rolegate itself).
	CAKeyFile string
	// LogFile is the server's log (its stderr), for tests that check what
	// the server saw. Close removes it with Dir.
	LogFile string

	opts    Options
	logf    func(format string, args ...any)
	binDir  string
	dataDir string
	cred    *syscall.Credential
	pm      *postmaster

	closeOnce sync.Once
	closeErr  error
}

// postmaster is one started server process.
type postmaster struct {
	cmd    *exec.Cmd
	exited chan struct{} // closed once the process has been reaped
	err    error         // cmd.Wait's result; read only after exited is closed
}

// New creates a cluster with initdb, starts it and returns once it accepts
// TCP logins from the superuser. ctx bounds the start only, not the life of
// the cluster; call Close to stop it and remove its files.
func New(ctx context.Context, opts Options) (*Cluster, error) {
	return newCluster(ctx, opts, FreePort)
}

// newCluster is New with the port picker as a parameter, so a test can
// hand out a taken port and see the retry.
func newCluster(ctx context.Context, opts Options, pickPort func() (int, error)) (_ *Cluster, err error) {
	start := time.Now()
	binDir, err := ServerBinDir()
	if err != nil {
		return nil, err
	}
	cred, err := ServerCredential()
	if err != nil {
		return nil, err
	}
	if err := validate(opts); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "pgtest-")
	if err != nil {
		return nil, fmt.Errorf("cluster dir: %w", err)
	}
	c := &Cluster{
		Host:          "127.0.0.1",
		Dir:           dir,
		SuperUser:     "postgres",
		SuperPassword: RandomHex(16),
		LogFile:       filepath.Join(dir, "postgres.log"),
		opts:          opts,
		logf:          opts.Logf,
		binDir:        binDir,
		dataDir:       filepath.Join(dir, "data"),
		cred:          cred,
	}
	if c.logf == nil {
		c.logf = func(string, ...any) {}
	}
	defer func() {
		if err != nil {
			// Nothing runs at this point (start reaps what it began), so
			// this only removes the files.
			_ = os.RemoveAll(dir)
		}
	}()
	// MkdirTemp makes the dir 0700 and ours; the server user must own it
	// (initdb creates data/ inside, the server its socket), and other users
	// must be able to reach the CA certificate.
	if err := os.Chmod(dir, 0o755); err != nil {
		return nil, fmt.Errorf("cluster dir: %w", err)
	}
	if err := chown(cred, dir); err != nil {
		return nil, err
	}
	if err := c.initdb(ctx); err != nil {
		return nil, err
	}
	initdbTook := time.Since(start)
	if opts.SSL {
		if err := c.writeTLS(); err != nil {
			return nil, fmt.Errorf("TLS files: %w", err)
		}
	}
	if err := c.writeHBA(); err != nil {
		return nil, err
	}
	baseConf, err := os.ReadFile(filepath.Join(c.dataDir, "postgresql.conf"))
	if err != nil {
		return nil, fmt.Errorf("postgresql.conf: %w", err)
	}
	for attempt := 1; ; attempt++ {
		c.Port, err = pickPort()
		if err != nil {
			return nil, err
		}
		if err := c.writeConf(baseConf); err != nil {
			return nil, err
		}
		err = c.start(ctx)
		if errors.Is(err, errPortInUse) && attempt < portAttempts {
			c.logf("pgtest: port %d was taken before PostgreSQL could bind it; retrying with another", c.Port)
			continue
		}
		if err != nil {
			return nil, err
		}
		break
	}
	c.logf("pgtest: PostgreSQL on %s ready in %v (initdb %v), dir %s",
		c.Addr(), time.Since(start).Round(time.Millisecond), initdbTook.Round(time.Millisecond), c.Dir)
	return c, nil
}

// Start is New for tests and benchmarks: the cluster is closed by
// t.Cleanup, and a failure to start is fatal, never a skip, so a machine
// without PostgreSQL cannot pass silently. Call it from the test's own
// goroutine. Logf defaults to t.Logf. When the test fails, the tail of the
// server log is logged before the cluster goes away.
func Start(t testing.TB, opts Options) *Cluster {
	t.Helper()
	if opts.Logf == nil {
		opts.Logf = t.Logf
	}
	c, err := New(t.Context(), opts)
	if err != nil {
		t.Fatalf("pgtest: starting PostgreSQL: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("pgtest: tail of %s:\n%s", c.LogFile, c.logSince(0))
		}
		if err := c.Close(); err != nil {
			t.Errorf("pgtest: %v", err)
		}
	})
	return c
}

// Addr is the server's TCP address, "127.0.0.1:PORT".
func (c *Cluster) Addr() string {
	return net.JoinHostPort(c.Host, strconv.Itoa(c.Port))
}

// DSN is a URL connection string for user to database over TCP, accepted by
// pgx and libpq alike; password may be empty. It disables TLS, except on a
// HostSSLOnly cluster where a plain login cannot work: there it asks for
// sslmode=verify-full against CACertFile.
func (c *Cluster) DSN(user, password, database string) string {
	u := url.URL{
		Scheme: "postgres",
		User:   url.User(user),
		Host:   c.Addr(),
		Path:   "/" + database,
	}
	if password != "" {
		u.User = url.UserPassword(user, password)
	}
	q := url.Values{"sslmode": {"disable"}}
	if c.opts.SSL && c.opts.HostSSLOnly {
		q = url.Values{"sslmode": {"verify-full"}, "sslrootcert": {c.CACertFile}}
	}
	u.RawQuery = q.Encode()
	return u.String()
}

// SuperDSN is DSN for the superuser to database postgres.
func (c *Cluster) SuperDSN() string {
	return c.DSN(c.SuperUser, c.SuperPassword, "postgres")
}

// Exec runs sql as the superuser over TCP on a connection of its own, so it
// is safe to call from many goroutines. Without args, sql may hold several
// statements (simple protocol), but statements that refuse a transaction
// block, such as CREATE DATABASE, must be sent alone.
func (c *Cluster) Exec(ctx context.Context, sql string, args ...any) error {
	conn, err := c.connect(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, sql, args...); err != nil {
		return fmt.Errorf("exec %q: %w", abbreviate(sql), err)
	}
	return nil
}

// Close stops the server with a fast shutdown (SIGKILL if that takes more
// than stopTimeout) and removes Dir. It is safe to call more than once and
// concurrently; every call returns the first call's result. It reports an
// error if the server had died before Close, since a test relying on it
// would otherwise go on without noticing.
func (c *Cluster) Close() error {
	c.closeOnce.Do(func() {
		start := time.Now()
		var errs []error
		if c.pm != nil {
			errs = append(errs, c.stop())
		}
		if err := os.RemoveAll(c.Dir); err != nil {
			errs = append(errs, fmt.Errorf("remove cluster dir: %w", err))
		}
		c.closeErr = errors.Join(errs...)
		c.logf("pgtest: PostgreSQL on %s stopped and removed in %v", c.Addr(), time.Since(start).Round(time.Millisecond))
	})
	return c.closeErr
}

func (c *Cluster) stop() error {
	pm := c.pm
	select {
	case <-pm.exited:
		return fmt.Errorf("PostgreSQL on %s had exited before Close (%v); log:\n%s", c.Addr(), pm.err, c.logSince(0))
	default:
	}
	// SIGINT is PostgreSQL's fast shutdown: sessions are terminated and the
	// postmaster exits once they are gone, without waiting for clients.
	// An error means it exited in the meantime, which exited reports.
	_ = pm.cmd.Process.Signal(os.Interrupt)
	timer := time.NewTimer(stopTimeout)
	defer timer.Stop()
	select {
	case <-pm.exited:
		if pm.err != nil {
			return fmt.Errorf("PostgreSQL fast shutdown: %w", pm.err)
		}
		return nil
	case <-timer.C:
		pm.kill()
		return fmt.Errorf("PostgreSQL did not stop within %v of SIGINT; killed it; log:\n%s", stopTimeout, c.logSince(0))
	}
}

// kill ends the postmaster and its backends (they share its process group)
// and waits until it has been reaped.
func (pm *postmaster) kill() {
	_ = syscall.Kill(-pm.cmd.Process.Pid, syscall.SIGKILL)
	<-pm.exited
}

func (c *Cluster) initdb(ctx context.Context) error {
	pwfile := filepath.Join(c.Dir, "superuser.pw")
	if err := os.WriteFile(pwfile, []byte(c.SuperPassword+"\n"), 0o600); err != nil {
		return fmt.Errorf("initdb: password file: %w", err)
	}
	defer os.Remove(pwfile)
	if err := chown(c.cred, pwfile); err != nil {
		return fmt.Errorf("initdb: %w", err)
	}
	cmd := exec.CommandContext(ctx, filepath.Join(c.binDir, "initdb"),
		"-D", c.dataDir,
		"-U", c.SuperUser,
		"--pwfile", pwfile,
		"--auth-local=trust",
		"--auth-host=scram-sha-256",
		"-E", "UTF8",
		// The C locale exists everywhere, unlike C.UTF-8, and is compatible
		// with every encoding.
		"--no-locale",
		// A throwaway cluster never needs to survive a power cut.
		"--no-sync",
	)
	cmd.Dir = c.Dir
	cmd.Env = CleanEnv() // no PG* meant for our clients; English log messages
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: c.cred, Pdeathsig: syscall.SIGKILL}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("initdb: %w\n%s", err, bytes.TrimSpace(out))
	}
	return nil
}

func (c *Cluster) writeTLS() error {
	tlsDir := filepath.Join(c.Dir, "tls")
	if err := os.Mkdir(tlsDir, 0o755); err != nil {
		return err
	}
	if err := os.Chmod(tlsDir, 0o755); err != nil {
		return err
	}
	files, err := writeTLSFiles(tlsDir)
	if err != nil {
		return err
	}
	// PostgreSQL accepts a key file only if it owns it and nobody else can
	// read it (or root owns it and the group is the server's).
	if err := chown(c.cred, files.serverKey); err != nil {
		return err
	}
	c.CACertFile, c.CAKeyFile = files.caCert, files.caKey
	return nil
}

func (c *Cluster) writeHBA() error {
	host := "host"
	if c.opts.HostSSLOnly {
		host = "hostssl"
	}
	var b strings.Builder
	b.WriteString("# written by pgtest\nlocal all all trust\n")
	for _, line := range c.opts.HBA {
		b.WriteString(line + "\n")
	}
	fmt.Fprintf(&b, "%s all all 127.0.0.1/32 scram-sha-256\n", host)
	fmt.Fprintf(&b, "%s all all ::1/128 scram-sha-256\n", host)
	// Rewriting the file initdb made keeps its owner and mode.
	if err := os.WriteFile(filepath.Join(c.dataDir, "pg_hba.conf"), []byte(b.String()), 0o600); err != nil {
		return fmt.Errorf("pg_hba.conf: %w", err)
	}
	return nil
}

// writeConf appends our settings to initdb's postgresql.conf; later lines
// win, so Options.Settings come last.
func (c *Cluster) writeConf(base []byte) error {
	settings := map[string]string{
		"listen_addresses":        c.Host,
		"port":                    strconv.Itoa(c.Port),
		"unix_socket_directories": c.Dir, // no clash with a system server's /var/run/postgresql
		"fsync":                   "off",
		"synchronous_commit":      "off",
		"full_page_writes":        "off",
		"max_connections":         "300", // tests run 200 concurrent sessions
		"shared_buffers":          "128MB",
		"logging_collector":       "off", // stderr goes to LogFile
		"password_encryption":     "scram-sha-256",
	}
	if c.opts.SSL {
		settings["ssl"] = "on"
		settings["ssl_cert_file"] = filepath.Join(c.Dir, "tls", "server.crt")
		settings["ssl_key_file"] = filepath.Join(c.Dir, "tls", "server.key")
		settings["ssl_ca_file"] = c.CACertFile
	}
	var b bytes.Buffer
	b.Write(base)
	b.WriteString("\n# written by pgtest\n")
	for _, name := range slices.Sorted(maps.Keys(settings)) {
		fmt.Fprintf(&b, "%s = %s\n", name, confQuote(settings[name]))
	}
	if len(c.opts.Settings) > 0 {
		b.WriteString("# Options.Settings\n")
		for _, name := range slices.Sorted(maps.Keys(c.opts.Settings)) {
			fmt.Fprintf(&b, "%s = %s\n", name, confQuote(c.opts.Settings[name]))
		}
	}
	if err := os.WriteFile(filepath.Join(c.dataDir, "postgresql.conf"), b.Bytes(), 0o600); err != nil {
		return fmt.Errorf("postgresql.conf: %w", err)
	}
	return nil
}

// start runs the postmaster and waits until it accepts a superuser login.
// On failure nothing is left running.
func (c *Cluster) start(ctx context.Context) error {
	logFile, err := os.OpenFile(c.LogFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("server log: %w", err)
	}
	fi, err := logFile.Stat()
	if err != nil {
		logFile.Close()
		return fmt.Errorf("server log: %w", err)
	}
	logStart := fi.Size() // a retry appends; only this attempt's lines matter
	_ = os.Remove(filepath.Join(c.dataDir, "postmaster.pid"))

	cmd := exec.Command(filepath.Join(c.binDir, "postgres"), "-D", c.dataDir)
	cmd.Dir = c.Dir
	cmd.Env = CleanEnv() // no PG* meant for our clients; English log messages
	// An *os.File is handed to the child as is: no copying goroutine.
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: c.cred,
		// The server must not outlive a test binary that crashes or is
		// killed. (Linux sends this when the thread that started the child
		// exits, which Go does only for goroutines locked to a thread.)
		Pdeathsig: syscall.SIGKILL,
		// Its own process group: a Ctrl-C in the terminal goes to the test
		// or demo, which shuts the server down in order, and Close can kill
		// the backends together with the postmaster.
		Setpgid: true,
	}
	err = cmd.Start()
	logFile.Close() // the child has its own descriptor
	if err != nil {
		return fmt.Errorf("start postgres: %w", err)
	}
	pm := &postmaster{cmd: cmd, exited: make(chan struct{})}
	go func() {
		pm.err = cmd.Wait()
		close(pm.exited)
	}()

	if err := c.waitReady(ctx, pm, logStart); err != nil {
		select {
		case <-pm.exited:
		default:
			pm.kill()
		}
		return err
	}
	c.pm = pm
	return nil
}

// waitReady waits for postmaster.pid to say "ready" (PostgreSQL 10 and
// later write the status there, as pg_ctl relies on), which also proves that
// the postmaster bound our port, so the login that follows cannot reach
// some other server that took the port. Then a superuser login over TCP
// proves that what tests need works.
func (c *Cluster) waitReady(ctx context.Context, pm *postmaster, logStart int64) error {
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	ticker := time.NewTicker(readyPoll)
	defer ticker.Stop()
	pid := strconv.Itoa(pm.cmd.Process.Pid)
	var lastErr error
	var readySince time.Time
	for {
		if c.pidFileReady(pid) {
			conn, err := c.connect(ctx)
			if err == nil {
				conn.Close(ctx)
				return nil
			}
			lastErr = err
			if readySince.IsZero() {
				readySince = time.Now()
			}
			// A server that says it is ready and still fails logins (a
			// refusal, a certificate it cannot present) will not recover;
			// say so now rather than after readyTimeout.
			var pgErr *pgconn.PgError
			refused := errors.As(err, &pgErr) && pgErr.Code != "57P03" // 57P03: not accepting connections yet
			if refused || time.Since(readySince) > readyGrace {
				return fmt.Errorf("PostgreSQL on %s is up but the superuser cannot log in: %w; log:\n%s", c.Addr(), err, c.logSince(logStart))
			}
		}
		select {
		case <-pm.exited:
			log := c.logSince(logStart)
			if strings.Contains(log, "Address already in use") {
				return fmt.Errorf("PostgreSQL on %s: %w", c.Addr(), errPortInUse)
			}
			return fmt.Errorf("postgres exited during startup (%v); log:\n%s", pm.err, log)
		case <-ctx.Done():
			if lastErr == nil {
				lastErr = errors.New("postmaster.pid never said ready")
			}
			return fmt.Errorf("PostgreSQL on %s not ready: %w (last attempt: %v); log:\n%s",
				c.Addr(), context.Cause(ctx), lastErr, c.logSince(logStart))
		case <-ticker.C:
		}
	}
}

// pidFileReady reports whether postmaster.pid belongs to pid and its status
// line (the 8th) says the server accepts connections.
func (c *Cluster) pidFileReady(pid string) bool {
	data, err := os.ReadFile(filepath.Join(c.dataDir, "postmaster.pid"))
	if err != nil {
		return false
	}
	lines := strings.Split(string(data), "\n")
	return len(lines) >= 8 && lines[0] == pid && strings.TrimSpace(lines[7]) == "ready"
}

func (c *Cluster) connect(ctx context.Context) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(c.SuperDSN())
	if err != nil {
		return nil, fmt.Errorf("superuser DSN: %w", err)
	}
	// A SCRAM login can take seconds on a loaded machine; ctx bounds the rest.
	cfg.ConnectTimeout = 30 * time.Second
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect as %s to %s: %w", c.SuperUser, c.Addr(), err)
	}
	return conn, nil
}

// logTailLines is how much of the server log goes into an error: enough for
// the FATAL line and its context, short enough to read in a test failure.
const logTailLines = 30

// logSince returns the tail of the server log written from offset on.
func (c *Cluster) logSince(offset int64) string {
	f, err := os.Open(c.LogFile)
	if err != nil {
		return fmt.Sprintf("(no server log: %v)", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.NewSectionReader(f, offset, 1<<40))
	if err != nil {
		return fmt.Sprintf("(reading server log: %v)", err)
	}
	return tailLines(string(data), logTailLines)
}

func tailLines(s string, n int) string {
	s = strings.TrimRight(s, "\n")
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "\t" + strings.Join(lines, "\n\t")
}

// settingName is what PostgreSQL accepts as a parameter name, including
// custom ones such as "auto_explain.log_min_duration".
var settingName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_.]*$`)

// validate rejects options that would corrupt the config files instead of
// letting the server fail with a less direct message.
func validate(opts Options) error {
	for _, line := range opts.HBA {
		if strings.ContainsAny(line, "\r\n") {
			return fmt.Errorf("Options.HBA: line %q spans several lines", line)
		}
	}
	for name, value := range opts.Settings {
		if !settingName.MatchString(name) {
			return fmt.Errorf("Options.Settings: bad parameter name %q", name)
		}
		if strings.ContainsAny(value, "\r\n") {
			return fmt.Errorf("Options.Settings: value of %s spans several lines", name)
		}
	}
	if opts.HostSSLOnly && !opts.SSL {
		return errors.New("Options.HostSSLOnly needs Options.SSL")
	}
	return nil
}

// confQuote quotes a postgresql.conf value; backslashes are escapes there.
func confQuote(v string) string {
	v = strings.ReplaceAll(v, `\`, `\\`)
	return "'" + strings.ReplaceAll(v, "'", "''") + "'"
}

func abbreviate(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 80 {
		return s[:77] + "..."
	}
	return s
}
