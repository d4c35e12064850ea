package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rolegate/rolegate/internal/pgtest"
)

// target is one way of reaching the server: directly or through a proxy.
type target struct {
	name string
	host string
	port int
	// pid is the proxy's process, whose CPU time each run records; 0 for
	// the direct connection.
	pid int
	// logFile is the proxy's log, quoted when a warm-up through it fails.
	logFile string
	// extra marks a target that runs only the select-only and
	// connect-rate rows (rolegate-gmp1, rolegate-goroutines,
	// pgbouncer-fresh).
	extra bool
	// tls marks a target with TLS on both legs, which runs only the TLS
	// rows (direct-tls, rolegate-tls, pgbouncer-tls).
	tls bool
	// env, when set, is the client tools' environment for this target in
	// place of the run's (tlsClientEnv for the TLS targets).
	env []string
}

// gmp1Target is the name of the rolegate started with GOMAXPROCS=1.
const gmp1Target = "rolegate-gmp1"

// pgbouncerFresh is the name of the PgBouncer whose server connections live
// as long as their client's session (server_lifetime = 0).
const pgbouncerFresh = "pgbouncer-fresh"

// daemon is a proxy process the benchmark started.
type daemon struct {
	*target
	cmd     *exec.Cmd
	exited  chan struct{}
	logFile string
}

// startDaemon starts cmd, which logs to logFile, and returns once it
// accepts TCP connections on t's address.
func startDaemon(ctx context.Context, t *target, cmd *exec.Cmd, logFile string) (*daemon, error) {
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: credentialOf(cmd),
		// The terminal's Ctrl-C reaches only the benchmark, which stops
		// the proxies before the server.
		Setpgid: true,
		// A benchmark killed hard must not leave the proxy running.
		Pdeathsig: syscall.SIGKILL,
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", t.name, err)
	}
	d := &daemon{target: t, cmd: cmd, exited: make(chan struct{}), logFile: logFile}
	t.pid = cmd.Process.Pid
	t.logFile = logFile
	go func() {
		_ = cmd.Wait() // the result is in cmd.ProcessState
		close(d.exited)
	}()
	if err := d.waitListening(ctx); err != nil {
		d.stop(syscall.SIGKILL)
		return nil, fmt.Errorf("%w; log:\n%s", err, tail(readFile(logFile), 20))
	}
	return d, nil
}

// credentialOf returns the credential already set on cmd, if any, so
// startDaemon can set the other process attributes around it.
func credentialOf(cmd *exec.Cmd) *syscall.Credential {
	if cmd.SysProcAttr == nil {
		return nil
	}
	return cmd.SysProcAttr.Credential
}

func (d *daemon) waitListening(ctx context.Context) error {
	addr := net.JoinHostPort(d.host, strconv.Itoa(d.port))
	err := pgtest.WaitListening(ctx, addr, d.exited, listenTimeout)
	if errors.Is(err, pgtest.ErrExited) {
		return fmt.Errorf("%s %w (%v)", d.name, err, d.cmd.ProcessState) // ProcessState is set once exited is closed
	}
	if err != nil {
		return fmt.Errorf("%s: %w", d.name, err)
	}
	return nil
}

// stop sends sig and kills the process if it has not exited after
// stopTimeout.
func (d *daemon) stop(sig syscall.Signal) {
	_ = d.cmd.Process.Signal(sig) // fails only if it already exited
	timer := time.NewTimer(stopTimeout)
	defer timer.Stop()
	select {
	case <-d.exited:
	case <-timer.C:
		logf("%s still running %v after %v; killing it", d.name, stopTimeout, sig)
		_ = d.cmd.Process.Kill()
		<-d.exited
	}
}

func readFile(path string) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	return string(data)
}

// controlSetup is how rolegate reaches the server for the auth query: the
// control role, its password and the query.
type controlSetup struct {
	// dsn names the control role and database, without the password,
	// which goes in ROLEGATE_CONTROL_PASSWORD.
	dsn       string
	password  string
	authQuery string
	// describe says in the report what was set up.
	describe string
}

// rolegateInstance is one rolegate process to start: the plain one, or the
// same binary with GOMAXPROCS=1.
type rolegateInstance struct {
	name       string
	gomaxprocs int // 0: the Go runtime's default (one P per CPU)
	// logLevel and logFormat are [log] level and format; empty: warn and
	// text.
	logLevel, logFormat string
	// extraConfig is appended to the configuration file ([limits],
	// [roles.NAME] tables).
	extraConfig string
	// relay is the top-level relay key; empty: rolegate's default (loop).
	relay string
	// adminHTTP is [admin] http, host:port; empty turns the admin HTTP
	// server off.
	adminHTTP string
	// tlsCert and tlsKey are [tls] cert and key, PEM files; empty: no
	// client-side TLS. With them the target is a TLS one.
	tlsCert, tlsKey string
	// serverSSLMode is [server] sslmode; empty: "disable".
	serverSSLMode string
}

// goroutinesTarget is the name of the rolegate started with relay =
// "goroutines": the relay before the event loop, for comparison.
const goroutinesTarget = "rolegate-goroutines"

// rolegateCacheTTL is [auth] cache_ttl, written out although it is the
// default, so the config file says what was measured.
const rolegateCacheTTL = "60s"

// startRolegate runs rolegate in proxy mode in front of server: it checks
// clients' SCRAM proofs itself with the verifier from the auth query on its
// control connection, and logs in to the server with the recovered
// ClientKey. TLS is off on both sides and the log level is warn unless inst
// says otherwise (rolegateTLSTable).
func startRolegate(ctx context.Context, bin, work, server string, ctl controlSetup, inst rolegateInstance) (*daemon, error) {
	port, err := pgtest.FreePort()
	if err != nil {
		return nil, err
	}
	t := &target{name: inst.name, host: "127.0.0.1", port: port, tls: inst.tlsCert != ""}
	level, format := inst.logLevel, inst.logFormat
	if level == "" {
		level = "warn"
	}
	if format == "" {
		format = "text"
	}
	relay := inst.relay
	if relay == "" {
		relay = "loop"
	}
	sslmode := inst.serverSSLMode
	if sslmode == "" {
		sslmode = "disable"
	}
	config := fmt.Sprintf(`# written by the rolegate benchmark
listen = %q
relay = %q

%s[server]
address = %q
sslmode = %q

[control]
dsn = %q   # password: ROLEGATE_CONTROL_PASSWORD
max_conns = 4   # the default; limits need at least 2

[auth]
mode = "proxy"
method = "scram-sha-256"
auth_query = %q
cache_ttl = %q

[log]
level = %q
format = %q

[admin]
http = %q   # "" (off) unless the test polls /healthz: several instances run at once
`, net.JoinHostPort(t.host, strconv.Itoa(port)), relay, rolegateTLSTable(inst.tlsCert, inst.tlsKey), server, sslmode, ctl.dsn, ctl.authQuery, rolegateCacheTTL, level, format, inst.adminHTTP)
	config += inst.extraConfig
	configFile := filepath.Join(work, inst.name+".toml")
	if err := os.WriteFile(configFile, []byte(config), 0o644); err != nil {
		return nil, fmt.Errorf("%s config: %w", inst.name, err)
	}
	logFile := filepath.Join(work, inst.name+".log")
	log, err := os.Create(logFile)
	if err != nil {
		return nil, fmt.Errorf("%s log: %w", inst.name, err)
	}
	defer log.Close() // the child has its own descriptor
	cmd := exec.Command(bin, "-config", configFile)
	cmd.Env = rolegateEnv(ctl.password, inst.gomaxprocs)
	cmd.Stdout = log
	cmd.Stderr = log
	how := ""
	if inst.gomaxprocs > 0 {
		how = fmt.Sprintf(" with GOMAXPROCS=%d", inst.gomaxprocs)
	}
	logf("starting %s on %s%s", inst.name, net.JoinHostPort(t.host, strconv.Itoa(port)), how)
	return startDaemon(ctx, t, cmd, logFile)
}

// rolegateEnv is rolegate's environment: ours without PG* variables (pgx
// would read them for the control connection) and without Go runtime
// tuning, plus the control password, GODEBUG=gctrace=1 and, when set,
// GOMAXPROCS.
func rolegateEnv(password string, gomaxprocs int) []string {
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(name, "PG") || name == "GOMAXPROCS" || name == "GOGC" || name == "GOMEMLIMIT" || name == "GODEBUG" {
			continue
		}
		env = append(env, kv)
	}
	// One line per collection in its log, for the pauses (gc.go).
	env = append(env, "ROLEGATE_CONTROL_PASSWORD="+password, "GODEBUG=gctrace=1")
	if gomaxprocs > 0 {
		env = append(env, "GOMAXPROCS="+strconv.Itoa(gomaxprocs))
	}
	return env
}

// ensurePgBouncer returns the pgbouncer binary. When it is missing it is
// installed with apt-get as root; otherwise bin is empty and note says what
// to install. A failed installation also leaves PgBouncer out, with the
// reason in note.
func ensurePgBouncer(ctx context.Context) (bin, note string, err error) {
	if bin := findPgBouncer(); bin != "" {
		return bin, "", nil
	}
	const howTo = "Debian/Ubuntu: sudo apt-get install pgbouncer; Fedora/RHEL: sudo dnf install pgbouncer; macOS: brew install pgbouncer"
	if os.Geteuid() != 0 {
		return "", "PgBouncer is not installed and we are not root, so the PgBouncer column is left out. Install it (" + howTo + ") and run again.", nil
	}
	if _, err := exec.LookPath("apt-get"); err != nil {
		return "", "PgBouncer is not installed and there is no apt-get, so the PgBouncer column is left out. Install it (" + howTo + ") and run again.", nil
	}
	logf("pgbouncer not found: apt-get update && apt-get install -y pgbouncer")
	env := append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	for _, args := range [][]string{{"update", "-q"}, {"install", "-y", "-q", "pgbouncer"}} {
		cmd := exec.CommandContext(ctx, "apt-get", args...)
		cmd.Env = env
		cmd.Stdout = os.Stderr
		cmd.Stderr = os.Stderr
		if err := cmd.Run(); err != nil {
			if ctx.Err() != nil {
				return "", "", fmt.Errorf("apt-get %s: %w", strings.Join(args, " "), err)
			}
			return "", fmt.Sprintf("apt-get %s failed (%v), so the PgBouncer column is left out. Install it (%s) and run again.", strings.Join(args, " "), err, howTo), nil
		}
	}
	// The package may start the distribution's own pgbouncer; ours listens
	// on a port of its own, but an idle second pooler is not wanted either.
	if _, err := exec.LookPath("service"); err == nil {
		_ = exec.CommandContext(ctx, "service", "pgbouncer", "stop").Run()
	}
	if bin := findPgBouncer(); bin != "" {
		return bin, "", nil
	}
	return "", "apt-get install pgbouncer did not provide a pgbouncer binary, so the PgBouncer column is left out.", nil
}

// findPgBouncer looks on PATH and in /usr/sbin, where Debian installs it and
// which a normal user's PATH may lack.
func findPgBouncer() string {
	if bin, err := exec.LookPath("pgbouncer"); err == nil {
		return bin
	}
	if fi, err := os.Stat("/usr/sbin/pgbouncer"); err == nil && fi.Mode().Perm()&0o111 != 0 {
		return "/usr/sbin/pgbouncer"
	}
	return ""
}

// pgbouncerAuth is how PgBouncer finds bench's verifier: with auth_query, run
// as auth_user, whose own entry is in the auth_file.
type pgbouncerAuth struct {
	user string
	// fileSecret is auth_user's entry in the auth_file.
	fileSecret string
	// describe says in the report what was set up.
	describe string
}

// pgbouncerAuthQuery is PgBouncer's documented auth_query; pg_shadow needs a
// superuser auth_user.
const pgbouncerAuthQuery = "SELECT usename, passwd FROM pg_shadow WHERE usename=$1"

// pgbouncerMaxClients is max_client_conn: 200, or the idle-session test's
// sessions and 10 more (the console's session, and room) when that is more.
func pgbouncerMaxClients(idleSessions int) int { return max(200, idleSessions+10) }

// pgbouncerInstance is one PgBouncer to start: the pooled one, the fresh
// one or the TLS one.
type pgbouncerInstance struct {
	name string
	// idleSessions is the pool size of the idle-session test's alias (at
	// least 1).
	idleSessions int
	// fresh closes each server connection once its client has gone.
	fresh bool
	// tls turns TLS on on both legs, with a certificate from the cluster's
	// CA for the clients.
	tls bool
}

// startPgBouncer runs PgBouncer in session mode in front of the cluster.
// With auth_type scram-sha-256 and auth_query it fetches bench's SCRAM
// verifier from pg_shadow as pa.user, checks the client with it, and then
// logs in to the server with the client's SCRAM keys. The alias
// pgbouncerIdleDB has a pool of idleSessions server connections for the
// idle-session test, and pa.user may use the console to empty it.
//
// With fresh (target pgbouncerFresh) it closes each server connection once
// its client has gone (server_lifetime = 0), as a 1:1 proxy does: every run
// gets new backends, which have to fault in the shared buffers they touch,
// where the warm pool reuses backends that already did. With tls (target
// pgbouncerTLS) it requires TLS of its clients and speaks TLS to the server
// (pgbouncerTLSSettings).
func startPgBouncer(ctx context.Context, bin, work string, c *pgtest.Cluster, pa pgbouncerAuth, inst pgbouncerInstance) (*daemon, error) {
	cred, err := pgtest.ServerCredential() // PgBouncer refuses root too
	if err != nil {
		return nil, err
	}
	name, idleSessions, lifetime := inst.name, inst.idleSessions, ""
	if inst.fresh {
		lifetime = "server_lifetime = 0\n"
	}
	dir := filepath.Join(work, name)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return nil, fmt.Errorf("pgbouncer dir: %w", err)
	}
	port, err := pgtest.FreePort()
	if err != nil {
		return nil, err
	}
	t := &target{name: name, host: "127.0.0.1", port: port, extra: inst.fresh, tls: inst.tls}
	var certFile, keyFile string
	if inst.tls {
		if certFile, keyFile, err = c.IssueServerCert(dir, "client-tls"); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
	}
	authFile := filepath.Join(dir, "userlist.txt")
	logFile := filepath.Join(dir, "pgbouncer.log")
	ini := fmt.Sprintf(`; written by the rolegate benchmark
[databases]
%[1]s = host=%[2]s port=%[3]d dbname=%[1]s
%[12]s = host=%[2]s port=%[3]d dbname=%[1]s pool_size=%[13]d

[pgbouncer]
listen_addr = %[4]s
listen_port = %[5]d
unix_socket_dir = %[6]s
auth_type = scram-sha-256
auth_file = %[7]s
auth_user = %[10]s
auth_query = %[11]s
admin_users = %[10]s
pool_mode = session
max_client_conn = %[14]d
default_pool_size = 40
ignore_startup_parameters = extra_float_digits,options
%[16]slogfile = %[8]s
pidfile = %[9]s
log_connections = 0
log_disconnections = 0
%[15]s`, benchRole, c.Host, c.Port, t.host, port, dir, authFile, logFile, filepath.Join(dir, "pgbouncer.pid"), pa.user, pgbouncerAuthQuery,
		pgbouncerIdleDB, max(idleSessions, 1), pgbouncerMaxClients(idleSessions), lifetime, pgbouncerTLSSettings(certFile, keyFile))
	iniFile := filepath.Join(dir, "pgbouncer.ini")
	files := map[string]string{
		iniFile:  ini,
		authFile: fmt.Sprintf("%q %q\n", pa.user, pa.fileSecret),
	}
	for path, content := range files {
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			return nil, fmt.Errorf("pgbouncer files: %w", err)
		}
	}
	// PgBouncer writes its log and pidfile here as its own user.
	if cred != nil {
		paths := []string{dir, iniFile, authFile}
		if keyFile != "" {
			paths = append(paths, keyFile) // 0600, for PgBouncer's user to read
		}
		for _, path := range paths {
			if err := os.Chown(path, int(cred.Uid), int(cred.Gid)); err != nil {
				return nil, fmt.Errorf("chown %s to PgBouncer's user: %w", path, err)
			}
		}
	}
	// In the foreground PgBouncer logs to stderr as well as to logfile;
	// stderr also catches what it says before it opens the logfile.
	stderrFile := filepath.Join(work, name+".stderr")
	stderr, err := os.Create(stderrFile)
	if err != nil {
		return nil, fmt.Errorf("pgbouncer stderr: %w", err)
	}
	defer stderr.Close()
	cmd := exec.Command(bin, iniFile)
	cmd.Dir = dir
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C"}
	cmd.Stdout = stderr
	cmd.Stderr = stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	logf("starting %s on %s", name, net.JoinHostPort(t.host, strconv.Itoa(port)))
	return startDaemon(ctx, t, cmd, stderrFile)
}

// machine describes where the run happened.
type machine struct {
	cpus          int
	cpuModel      string
	memory        string
	kernel        string
	postgres      string
	pgbench       string
	pgbouncer     string
	pgbouncerNote string
	goVersion     string
	rolegate      string
	// control and pgbouncerAuth say how rolegate and PgBouncer find the
	// verifiers.
	control       string
	pgbouncerAuth string
}

func machineInfo(ctx context.Context, rolegateBin, bouncerBin, serverVersion string) machine {
	m := machine{
		cpus:      runtime.NumCPU(),
		cpuModel:  "unknown",
		memory:    "unknown",
		kernel:    strings.TrimSpace(readFile("/proc/sys/kernel/osrelease")),
		postgres:  serverVersion,
		goVersion: runtime.Version(),
	}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if name, value, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(name) == "model name" {
				m.cpuModel = strings.TrimSpace(value)
				break
			}
		}
		f.Close()
	}
	if f, err := os.Open("/proc/meminfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) >= 2 && fields[0] == "MemTotal:" {
				if kb, err := strconv.ParseFloat(fields[1], 64); err == nil {
					m.memory = fmt.Sprintf("%.0f GiB", kb/(1<<20))
				}
				break
			}
		}
		f.Close()
	}
	firstLine := func(name string, args ...string) string {
		out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
		if err != nil {
			return fmt.Sprintf("unknown (%s: %v)", name, err)
		}
		line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
		return line
	}
	m.pgbench = firstLine("pgbench", "--version")
	m.rolegate = firstLine(rolegateBin, "-version")
	if bouncerBin != "" {
		m.pgbouncer = firstLine(bouncerBin, "--version")
	}
	return m
}

// logSummary counts the lines each proxy logged during the run: with
// rolegate at level warn and PgBouncer without connection logging, a quiet
// run logs little, so many lines are worth a look.
func logSummary(daemons []*daemon) []string {
	var out []string
	for _, d := range daemons {
		text := strings.TrimSpace(readFile(d.logFile))
		if text == "" {
			out = append(out, fmt.Sprintf("%s logged nothing", d.name))
			continue
		}
		lines := slices.DeleteFunc(strings.Split(text, "\n"), gctraceLine.MatchString) // counted in gc.go
		var notable []string
		for _, l := range lines {
			if d.name == "rolegate" || strings.Contains(l, "WARNING") || strings.Contains(l, "ERROR") || strings.Contains(l, "FATAL") {
				notable = append(notable, l)
			}
		}
		s := fmt.Sprintf("%s logged %d lines, %d of them warnings or errors", d.name, len(lines), len(notable))
		if len(notable) > 0 {
			s += ":\n" + tail(strings.Join(notable, "\n"), 10)
		}
		out = append(out, s)
	}
	return out
}
