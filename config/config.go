// Package config reads and validates rolegate's proxy.toml.
//
// Parsing is strict: a key rolegate does not know, or a value it cannot use, is an
// error that names the key and, where the TOML parser knows it, the line. A
// typo in a limits file must never be silently ignored.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/pelletier/go-toml/v2"
	"github.com/pelletier/go-toml/v2/unstable"

	"github.com/rolegate/rolegate/internal/pgname"
	"github.com/rolegate/rolegate/limiter"
)

// Config is the whole of proxy.toml. The zero value is not useful; use Default or Load.
type Config struct {
	// Listen is the client-facing address, host:port.
	Listen string `toml:"listen"`
	// StartupTimeout bounds how long a client may take to finish startup and authentication.
	StartupTimeout Duration `toml:"startup_timeout"`
	// ShutdownTimeout bounds how long sessions may run on after SIGTERM.
	ShutdownTimeout Duration `toml:"shutdown_timeout"`
	// MaxProcs caps the CPUs rolegate's Go runtime runs on at once
	// (GOMAXPROCS); 0 keeps the runtime's default. On a small machine that
	// rolegate shares with PostgreSQL, 1 costs the least CPU per transaction.
	MaxProcs int `toml:"max_procs"`
	// Relay is how sessions are relayed once logged in: "loop" (an epoll
	// event loop for plain TCP sessions, goroutines for TLS ones) or
	// "goroutines" (two per session, as before the loop).
	Relay string `toml:"relay"`
	// ReusePort sets SO_REUSEPORT on the listen socket, so that another
	// rolegate (or another instance of the same unit) can listen on the same
	// address while this one runs: the kernel spreads new connections
	// between them. Connections waiting in the queue of a listener that
	// closes are reset unless the host sets net.ipv4.tcp_migrate_req = 1;
	// HandoffSocket restarts without that.
	ReusePort bool `toml:"reuse_port"`
	// HandoffSocket is the path of a unix socket through which a starting
	// rolegate takes the listening sockets over from the running one (which
	// then drains as on SIGTERM), so that a restart refuses no login and
	// resets no queued connection. "" turns the hand-off off.
	HandoffSocket string `toml:"handoff_socket"`
	// Instance names this rolegate in the eviction history that instances
	// share on the server; "" gives it a random 8-hex-digit tag at each
	// start (logged).
	Instance string `toml:"instance"`

	TLS     TLS     `toml:"tls"`
	Server  Server  `toml:"server"`
	Control Control `toml:"control"`
	Auth    Auth    `toml:"auth"`
	Log     Log     `toml:"log"`
	Admin   Admin   `toml:"admin"`
	Cluster Cluster `toml:"cluster"`
	History History `toml:"history"`

	// Limits holds the defaults of the connection limits; Roles and Databases
	// the limits of single roles and databases, by name, cut to 63 bytes as
	// CREATE ROLE and CREATE DATABASE cut them. The maps are nil when the file
	// sets none; use RoleRule and DatabaseRule to read them.
	Limits    Limits               `toml:"limits"`
	Roles     map[string]LimitRule `toml:"roles"`
	Databases map[string]LimitRule `toml:"databases"`
}

// Cluster is how this instance works with other rolegate instances in front
// of the same server.
type Cluster struct {
	// Advertise is the host:port the other instances reach this one at, to
	// pass it the CancelRequests its clients send them. Empty: the listen
	// address as bound (enough when every instance runs on one host).
	Advertise string `toml:"advertise"`
}

// MaxAdvertise is the longest cluster.advertise: an instance registers in
// the application_name of a connection (63 bytes), after "rolegate <tag> ".
const MaxAdvertise = 51

// TLS is the client-facing TLS configuration. Both files empty means no TLS:
// SSLRequest is answered with 'N' and direct TLS connections are refused.
type TLS struct {
	Cert string `toml:"cert"`
	Key  string `toml:"key"`
}

// Enabled reports whether client-side TLS is configured.
func (t TLS) Enabled() bool { return t.Cert != "" }

// Server describes the PostgreSQL server rolegate fronts.
type Server struct {
	Address        string   `toml:"address"`
	SSLMode        SSLMode  `toml:"sslmode"`
	SSLRootCert    string   `toml:"sslrootcert"`
	ConnectTimeout Duration `toml:"connect_timeout"`
}

// Control is rolegate's own connection to the server, for the auth query (and,
// later, pg_stat_activity and pg_terminate_backend).
type Control struct {
	// DSN is a libpq/pgx connection string. A password in it works but is better
	// kept in the environment (ROLEGATE_CONTROL_PASSWORD) or PasswordFile.
	DSN          string `toml:"dsn"`
	PasswordFile string `toml:"password_file"`
	MaxConns     int    `toml:"max_conns"`
}

// Auth selects how clients are authenticated.
type Auth struct {
	// Mode is "proxy" (rolegate verifies clients with the server's verifiers) or
	// "passthrough" (the exchange is relayed). Empty: proxy when a verifier source
	// (control.dsn or userlist) is configured, else passthrough.
	Mode AuthMode `toml:"mode"`
	// Method is what rolegate asks clients for in proxy mode.
	Method string `toml:"method"`
	// CleartextWithoutTLS allows method "password" on unencrypted connections.
	CleartextWithoutTLS bool `toml:"cleartext_without_tls"`
	// Userlist is a PgBouncer-style auth_file; it is consulted before the auth query.
	Userlist string `toml:"userlist"`
	// AuthQuery returns a role's secret; $1 is the role name.
	AuthQuery string   `toml:"auth_query"`
	CacheSize int      `toml:"cache_size"`
	CacheTTL  Duration `toml:"cache_ttl"`
}

// Admin is the operator surface: the HTTP JSON API and /metrics.
type Admin struct {
	// HTTP is the address of the admin HTTP server, host:port; "" turns it off.
	HTTP string `toml:"http"`
	// AllowedHosts are the names, besides IP addresses, localhost and the
	// host of HTTP, that the admin HTTP server answers for in the Host
	// header (DNS-rebinding protection): "name" on any port, "name:port"
	// on that port only.
	AllowedHosts []string `toml:"allowed_hosts"`
	// Token is the bearer token the mutating HTTP endpoints require;
	// ROLEGATE_ADMIN_TOKEN wins over it (see AdminToken). Empty: mutating
	// endpoints are refused.
	Token string `toml:"token"`
	// Users may open the psql admin console (database Database on rolegate's
	// own listener), authenticated like any login (proxy mode).
	Users []string `toml:"users"`
	// Database is the database name that opens the console.
	Database string `toml:"database"`
}

// AdminToken is the admin bearer token: ROLEGATE_ADMIN_TOKEN when set and
// not empty, else [admin] token.
func (c *Config) AdminToken() string {
	if t := os.Getenv("ROLEGATE_ADMIN_TOKEN"); t != "" {
		return t
	}
	return c.Admin.Token
}

// History is the eviction history on the server (table rolegate.events,
// which sql/setup.sql creates).
type History struct {
	// Keep is how long rows stay in rolegate.events before rolegate deletes
	// them: a Go duration or days ("7d", "1d12h"). "off" (or 0) keeps the
	// history in memory only: the table is neither written nor read.
	Keep Retention `toml:"keep"`
}

// Retention is a Go duration string that may start with a number of days
// ("7d", "1d12h", "36h"), or "off".
type Retention string

// Value is the retention; 0 means off ("off", or any zero duration).
func (r Retention) Value() time.Duration {
	v, _ := r.parse()
	return v
}

func (r Retention) parse() (time.Duration, error) {
	s := string(r)
	if s == "off" || s == "0" {
		return 0, nil
	}
	var days time.Duration
	if i := strings.IndexByte(s, 'd'); i > 0 {
		n, err := strconv.ParseUint(s[:i], 10, 16)
		if err != nil {
			return 0, fmt.Errorf("invalid retention %q (write it like \"7d\", \"36h\" or \"off\")", s)
		}
		days, s = time.Duration(n)*24*time.Hour, s[i+1:]
		if s == "" {
			return days, nil
		}
	}
	v, err := time.ParseDuration(s)
	switch {
	case err != nil || v < 0:
		return 0, fmt.Errorf("invalid retention %q (write it like \"7d\", \"36h\" or \"off\")", string(r))
	}
	return days + v, nil
}

// Log configures rolegate's own log output.
type Log struct {
	Level  string `toml:"level"`  // debug | info | warn | error
	Format string `toml:"format"` // text | json
}

// Limits is the [limits] table: the defaults of every role's and database's
// limit, and where limits come from.
type Limits struct {
	// Policy applies to roles and databases that do not set their own: one
	// of limiter.ParsePolicy's spellings.
	Policy string `toml:"policy"`
	// Fallback is what an evicting policy does when it finds no victim:
	// "reject" or "wait".
	Fallback string `toml:"fallback"`
	// ServerLimits honours the server's rolconnlimit and datconnlimit too;
	// where both set a limit, the smaller wins.
	ServerLimits  bool     `toml:"server_limits"`
	WaitTimeout   Duration `toml:"wait_timeout"`
	MinSessionAge Duration `toml:"min_session_age"`
	// LimitsCacheTTL is how long the server's answers (rolconnlimit,
	// datconnlimit, rolsuper) are cached; 0 asks at every login.
	LimitsCacheTTL Duration `toml:"limits_cache_ttl"`
	// Protect is the protect list of the rules that set none (LimitRule).
	Protect []string `toml:"protect"`
	// DryRun makes every rule decide and log without acting (limiter
	// Rule.DryRun), unless the rule sets dry_run itself.
	DryRun bool `toml:"dry_run"`
	// EvictScope is "any", "same-application" or "same-client"
	// (limiter.EvictScope).
	EvictScope string `toml:"evict_scope"`
	// MaxEvictions is the eviction budget of each limit: "30/min", "5/s",
	// "off" (limiter.ParseBudget).
	MaxEvictions string `toml:"max_evictions"`
}

// LimitRule is one [roles.NAME] or [databases.NAME] table. A key left out is
// nil (or "" for the strings) and takes its value from [limits]; MaxSessions
// left out means no limit from proxy.toml.
type LimitRule struct {
	MaxSessions   *int      `toml:"max_sessions"`
	Policy        string    `toml:"policy"`
	Fallback      string    `toml:"fallback"`
	WaitTimeout   *Duration `toml:"wait_timeout"`
	MinSessionAge *Duration `toml:"min_session_age"`
	// Protect lists sessions never evicted for this limit (limiter.Protect):
	// "application_name:<glob>", "role:<glob>", "client:<address or CIDR>".
	// Left out: [limits] protect.
	Protect      []string `toml:"protect"`
	DryRun       *bool    `toml:"dry_run"`
	EvictScope   string   `toml:"evict_scope"`
	MaxEvictions string   `toml:"max_evictions"`
}

// DefaultMaxEvictions is the eviction budget of a limit that sets none:
// generous enough for any real turnover (a login a second, sustained), and
// it still stops a pool larger than its limit from evicting itself in a
// loop forever.
const DefaultMaxEvictions = "60/min"

// RoleRule is role's rule from proxy.toml alone, with everything the role's
// table leaves out taken from [limits]; MaxSessions is -1 when the file sets
// no limit for the role. The server's rolconnlimit is the caller's to combine
// (limiter.Effective). Role names match exactly, as PostgreSQL's do; a
// login's name is the startup packet's, cut as the server cuts it.
func (c *Config) RoleRule(role string) limiter.Rule { return c.Limits.resolve(c.Roles[role]) }

// DatabaseRule is RoleRule for a database.
func (c *Config) DatabaseRule(db string) limiter.Rule { return c.Limits.resolve(c.Databases[db]) }

// LimitsConfigured reports whether any login may meet a limit: proxy.toml
// gives a role or a database max_sessions, or server_limits is on and there
// is a control connection to read the server's own limits through (without
// one, server_limits has nothing to read and is moot).
func (c *Config) LimitsConfigured() bool {
	for _, m := range []map[string]LimitRule{c.Roles, c.Databases} {
		for _, r := range m {
			if r.MaxSessions != nil {
				return true
			}
		}
	}
	return c.Limits.ServerLimits && c.Control.DSN != ""
}

func (l Limits) resolve(r LimitRule) limiter.Rule {
	rule := limiter.Rule{
		MaxSessions:   -1,
		Policy:        limiter.Policy(l.Policy),
		Fallback:      limiter.Policy(l.Fallback),
		WaitTimeout:   l.WaitTimeout.Value(),
		MinSessionAge: l.MinSessionAge.Value(),
		DryRun:        l.DryRun,
		EvictScope:    limiter.EvictScope(l.EvictScope),
	}
	budget := l.MaxEvictions
	if r.MaxEvictions != "" {
		budget = r.MaxEvictions
	}
	rule.Budget, _ = limiter.ParseBudget(budget) // validated at load
	if r.DryRun != nil {
		rule.DryRun = *r.DryRun
	}
	if r.EvictScope != "" {
		rule.EvictScope = limiter.EvictScope(r.EvictScope)
	}
	if r.MaxSessions != nil {
		rule.MaxSessions = *r.MaxSessions
	}
	if r.Policy != "" {
		rule.Policy = limiter.Policy(r.Policy)
	}
	if r.Fallback != "" {
		rule.Fallback = limiter.Policy(r.Fallback)
	}
	if r.WaitTimeout != nil {
		rule.WaitTimeout = r.WaitTimeout.Value()
	}
	if r.MinSessionAge != nil {
		rule.MinSessionAge = r.MinSessionAge.Value()
	}
	protect := l.Protect
	if r.Protect != nil {
		protect = r.Protect
	}
	for _, s := range protect {
		if p, err := limiter.ParseProtect(s); err == nil { // validated at load
			rule.Protect = append(rule.Protect, p)
		}
	}
	return rule
}

// SSLMode is the libpq-style TLS mode for the connection to the server.
type SSLMode string

// The sslmode values libpq users know, with libpq's meanings.
const (
	SSLDisable    SSLMode = "disable"
	SSLPrefer     SSLMode = "prefer"
	SSLRequire    SSLMode = "require"
	SSLVerifyCA   SSLMode = "verify-ca"
	SSLVerifyFull SSLMode = "verify-full"
)

// AuthMode says who verifies a client's password.
type AuthMode string

// Authentication modes.
const (
	// AuthProxy: rolegate authenticates clients itself and logs in to the server
	// as them with the recovered key.
	AuthProxy AuthMode = "proxy"
	// AuthPassthrough relays the authentication exchange between client and server.
	AuthPassthrough AuthMode = "passthrough"
)

// DefaultAuthQuery reads a role's verifier; it needs a superuser control role
// (sql/setup.sql shows a least-privilege alternative). NOLOGIN roles are
// returned too, so that the server, not rolegate, refuses them with its own error.
const DefaultAuthQuery = "SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname = $1"

// Duration is a Go duration string ("10s", "1m30s"). It is a string kind so that
// the TOML decoder reports a value of the wrong type with its key and line; Parse
// checks the text, so Value never fails on a parsed Config.
type Duration string

// Value returns the duration; 0 for text that does not parse (Parse refuses such text).
func (d Duration) Value() time.Duration {
	v, _ := time.ParseDuration(string(d))
	return v
}

func (d Duration) check(positive bool) error {
	v, err := time.ParseDuration(string(d))
	switch {
	case err != nil:
		return fmt.Errorf("invalid duration %q (write it like \"10s\" or \"1m30s\")", string(d))
	case v < 0:
		return fmt.Errorf("duration %q must not be negative", string(d))
	case positive && v == 0:
		return errors.New("must be greater than zero")
	}
	return nil
}

// Default returns the configuration used for keys a file leaves out. proxy.toml at
// the repository root documents the same values.
func Default() *Config {
	return &Config{
		Listen:          "127.0.0.1:6432",
		StartupTimeout:  "60s",
		ShutdownTimeout: "30s",
		Relay:           "loop",
		Server: Server{
			Address:        "127.0.0.1:5432",
			SSLMode:        SSLPrefer,
			ConnectTimeout: "10s",
		},
		Control: Control{MaxConns: 4},
		Auth: Auth{
			Method:    "scram-sha-256",
			AuthQuery: DefaultAuthQuery,
			CacheSize: 1000,
			CacheTTL:  "60s",
		},
		Log:     Log{Level: "info", Format: "text"},
		History: History{Keep: "7d"},
		Admin:   Admin{HTTP: "127.0.0.1:9631", AllowedHosts: []string{}, Users: []string{}, Database: "rolegate"},
		Limits: Limits{
			Policy:         string(limiter.PolicyReject),
			Fallback:       string(limiter.PolicyReject),
			ServerLimits:   true,
			WaitTimeout:    "10s",
			MinSessionAge:  "0s",
			LimitsCacheTTL: "60s",
			Protect:        []string{},
			EvictScope:     string(limiter.EvictAny),
			MaxEvictions:   DefaultMaxEvictions,
		},
	}
}

// Error is a configuration error, naming the file, key and line where known.
type Error struct {
	File string
	Line int    // 0 when unknown
	Key  string // dotted key, "" when the error is not about one key
	Msg  string
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d", e.Line)
	}
	b.WriteString(": ")
	if e.Key != "" {
		fmt.Fprintf(&b, "%s: ", e.Key)
	}
	b.WriteString(e.Msg)
	return b.String()
}

// Load reads and validates the file at path.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return Parse(path, data)
}

// Parse decodes and validates data; name is used in error messages.
func Parse(name string, data []byte) (*Config, error) {
	cfg := Default()
	dec := toml.NewDecoder(bytes.NewReader(data)).DisallowUnknownFields()
	if err := dec.Decode(cfg); err != nil {
		return nil, tomlError(name, err)
	}
	if err := cfg.validate(); err != nil {
		var ce *Error
		if errors.As(err, &ce) {
			ce.File = name
			if ce.Line == 0 && ce.Key != "" {
				ce.Line = keyLine(data, ce.Key)
			}
		}
		return nil, err
	}
	return cfg, nil
}

func tomlError(name string, err error) error {
	var strict *toml.StrictMissingError
	if errors.As(err, &strict) && len(strict.Errors) > 0 {
		errs := make([]error, 0, len(strict.Errors))
		for i := range strict.Errors {
			de := &strict.Errors[i]
			line, _ := de.Position()
			errs = append(errs, &Error{File: name, Line: line, Key: formatKey(de.Key()), Msg: "unknown key"})
		}
		return errors.Join(errs...)
	}
	var de *toml.DecodeError
	if errors.As(err, &de) {
		line, _ := de.Position()
		msg := strings.TrimPrefix(de.Error(), "toml: ")
		return &Error{File: name, Line: line, Key: formatKey(de.Key()), Msg: msg}
	}
	return &Error{File: name, Msg: err.Error()}
}

// validate checks values the decoder cannot; Parse fills in file and line.
func (c *Config) validate() error {
	bad := func(key, format string, args ...any) error {
		return &Error{Key: key, Msg: fmt.Sprintf(format, args...)}
	}
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		return bad("listen", "want host:port: %v", err)
	}
	if c.Admin.Database == "" {
		return bad("admin.database", "must not be empty (the console's database name)")
	}
	// Logins name roles and databases as the server cuts them (the
	// console database, as a startup packet's name is cut; console users, as
	// CREATE ROLE stored them): see pgname.
	c.Admin.Database = pgname.Startup(c.Admin.Database)
	for i, u := range c.Admin.Users {
		c.Admin.Users[i] = pgname.Identifier(u)
	}
	if c.Admin.HTTP != "" {
		if _, _, err := net.SplitHostPort(c.Admin.HTTP); err != nil {
			return bad("admin.http", "want host:port, or \"\" to turn the admin HTTP server off: %v", err)
		}
	}
	for _, h := range c.Admin.AllowedHosts {
		if err := checkAllowedHost(h); err != nil {
			return bad("admin.allowed_hosts", "%q: %v", h, err)
		}
	}
	if c.MaxProcs < 0 {
		return bad("max_procs", "must be 0 (the Go runtime's default) or a number of CPUs, not %d", c.MaxProcs)
	}
	if c.HandoffSocket != "" {
		switch {
		case !strings.HasPrefix(c.HandoffSocket, "/"):
			return bad("handoff_socket", "want an absolute path, not %q", c.HandoffSocket)
		case len(c.HandoffSocket) > maxUnixPath:
			return bad("handoff_socket", "path is %d bytes long; a unix socket path may have at most %d", len(c.HandoffSocket), maxUnixPath)
		}
	}
	switch c.Relay {
	case "", "loop", "goroutines":
	default:
		return bad("relay", "want \"loop\" or \"goroutines\", not %q", c.Relay)
	}
	if _, _, err := net.SplitHostPort(c.Server.Address); err != nil {
		return bad("server.address", "want host:port: %v", err)
	}
	if a := c.Cluster.Advertise; a != "" {
		if _, _, err := net.SplitHostPort(a); err != nil {
			return bad("cluster.advertise", "want host:port: %v", err)
		}
		if len(a) > MaxAdvertise {
			return bad("cluster.advertise", "%q is longer than %d bytes (it is registered in an application_name); use an IP address or a shorter name", a, MaxAdvertise)
		}
	}
	for _, d := range []struct {
		key      string
		v        Duration
		positive bool
	}{
		{"startup_timeout", c.StartupTimeout, true},
		{"shutdown_timeout", c.ShutdownTimeout, false},
		{"server.connect_timeout", c.Server.ConnectTimeout, true},
		{"auth.cache_ttl", c.Auth.CacheTTL, false},
		{"limits.wait_timeout", c.Limits.WaitTimeout, false},
		{"limits.min_session_age", c.Limits.MinSessionAge, false},
		{"limits.limits_cache_ttl", c.Limits.LimitsCacheTTL, false},
	} {
		if err := d.v.check(d.positive); err != nil {
			return &Error{Key: d.key, Msg: err.Error()}
		}
	}
	if _, err := c.History.Keep.parse(); err != nil {
		return bad("history.keep", "%v", err)
	}
	if len(c.Instance) > 63 || strings.ContainsFunc(c.Instance, func(r rune) bool { return r < ' ' || r == 0x7f || r == utf8.RuneError }) {
		return bad("instance", "want at most 63 bytes of printable UTF-8, not %q", c.Instance)
	}
	if (c.TLS.Cert == "") != (c.TLS.Key == "") {
		return bad("tls", "cert and key must be set together")
	}
	switch c.Server.SSLMode {
	case SSLDisable, SSLPrefer, SSLRequire, SSLVerifyCA, SSLVerifyFull:
	default:
		return bad("server.sslmode", "invalid sslmode %q (want disable, prefer, require, verify-ca or verify-full)", c.Server.SSLMode)
	}
	hasSource := c.Control.DSN != "" || c.Auth.Userlist != ""
	switch c.Auth.Mode {
	case "":
		c.Auth.Mode = AuthPassthrough
		if hasSource {
			c.Auth.Mode = AuthProxy
		}
	case AuthProxy:
		if !hasSource {
			return bad("auth.mode", `mode "proxy" needs a verifier source: control.dsn or auth.userlist`)
		}
	case AuthPassthrough:
	default:
		return bad("auth.mode", "invalid mode %q (want \"proxy\" or \"passthrough\")", c.Auth.Mode)
	}
	switch c.Auth.Method {
	case "scram-sha-256", "md5", "password":
	default:
		return bad("auth.method", "invalid method %q (want scram-sha-256, md5 or password)", c.Auth.Method)
	}
	if c.Auth.CacheSize < 1 {
		return bad("auth.cache_size", "must be at least 1")
	}
	if c.Control.MaxConns < 1 {
		return bad("control.max_conns", "must be at least 1")
	}
	if c.Control.DSN != "" && !strings.Contains(c.Auth.AuthQuery, "$1") {
		return bad("auth.auth_query", "must take the role name as $1")
	}
	if (c.Server.SSLMode == SSLVerifyCA || c.Server.SSLMode == SSLVerifyFull) && c.Server.SSLRootCert == "" {
		return bad("server.sslrootcert", "required with sslmode %q", c.Server.SSLMode)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		return bad("log.level", "invalid level %q (want debug, info, warn or error)", c.Log.Level)
	}
	switch c.Log.Format {
	case "text", "json":
	default:
		return bad("log.format", "invalid format %q (want text or json)", c.Log.Format)
	}
	return c.validateLimits()
}

// maxUnixPath is the longest path a unix socket can be bound to on Linux:
// sun_path holds 108 bytes, the last of them the terminating NUL.
const maxUnixPath = 107

// hostName is a DNS name as it appears in a Host header: labels of letters,
// digits, '-' and '_' (seen in real internal names), one trailing dot at most.
var hostName = regexp.MustCompile(`^[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?$`)

// checkAllowedHost checks one [admin] allowed_hosts entry: what a browser
// puts in a Host header, "name", "name:port", an IP address or "[v6]:port".
func checkAllowedHost(h string) error {
	notHost := errors.New(`want a host name or host:port as a Host header carries it (no scheme, path or wildcard), e.g. "rolegate.internal" or "rolegate.internal:9631"`)
	if strings.ContainsAny(h, "/*@ \t") {
		return notHost
	}
	host, port, err := net.SplitHostPort(h)
	if err != nil {
		host = h
		if strings.HasPrefix(h, "[") && strings.HasSuffix(h, "]") {
			host = h[1 : len(h)-1]
		}
	} else if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("port %q is not a number from 1 to 65535", port)
	}
	if _, err := netip.ParseAddr(host); err == nil {
		return nil
	}
	if strings.HasPrefix(h, "[") {
		return errors.New("brackets hold an IPv6 address, not a name")
	}
	if len(host) > 254 || !hostName.MatchString(host) {
		return notHost
	}
	return nil
}

// validateLimits checks [limits], [roles.NAME] and [databases.NAME]. Names are
// checked in sorted order, so that of several mistakes the same one is
// reported every time.
func (c *Config) validateLimits() error {
	if _, err := limiter.ParsePolicy(c.Limits.Policy); err != nil {
		return &Error{Key: "limits.policy", Msg: err.Error()}
	}
	if err := checkProtect(c.Limits.Protect); err != nil {
		return &Error{Key: "limits.protect", Msg: err.Error()}
	}
	if err := checkFallback(c.Limits.Fallback); err != nil {
		return &Error{Key: "limits.fallback", Msg: err.Error()}
	}
	if _, err := limiter.ParseEvictScope(c.Limits.EvictScope); err != nil {
		return &Error{Key: "limits.evict_scope", Msg: err.Error()}
	}
	if _, err := limiter.ParseBudget(c.Limits.MaxEvictions); err != nil {
		return &Error{Key: "limits.max_evictions", Msg: err.Error()}
	}
	for _, t := range []struct {
		table, what string
		rules       *map[string]LimitRule
	}{
		{"roles", "role", &c.Roles},
		{"databases", "database", &c.Databases},
	} {
		names := make([]string, 0, len(*t.rules))
		for name := range *t.rules {
			names = append(names, name)
		}
		slices.Sort(names)
		for _, name := range names {
			if err := (*t.rules)[name].validate(t.table, t.what, name); err != nil {
				return err
			}
		}
		// A name longer than PostgreSQL keeps names what CREATE ROLE or
		// CREATE DATABASE stored for it: its first 63 bytes, cut at a
		// character boundary.
		cut := make(map[string]LimitRule, len(names))
		from := make(map[string]string, len(names))
		for _, name := range names {
			short := pgname.Identifier(name)
			if prev, dup := from[short]; dup {
				return &Error{Key: formatKey([]string{t.table, name}), Msg: fmt.Sprintf(
					"names the same %s as %s: PostgreSQL keeps only the first %d bytes of a name, %q",
					t.what, formatKey([]string{t.table, prev}), pgname.MaxLen, short)}
			}
			from[short] = name
			cut[short] = (*t.rules)[name]
		}
		if *t.rules != nil {
			*t.rules = cut
		}
	}
	// LockRole keeps one control connection for the admission locks while
	// any is held; the census and evictions need another.
	if c.Control.DSN != "" && c.LimitsConfigured() && c.Control.MaxConns < 2 {
		return &Error{Key: "control.max_conns", Msg: "must be at least 2 when limits are enforced " +
			"(one connection holds the admission locks; set limits.server_limits = false and leave out max_sessions to turn limits off)"}
	}
	return nil
}

func (r LimitRule) validate(table, what, name string) error {
	key := func(k ...string) string { return formatKey(append([]string{table, name}, k...)) }
	if name == "" {
		return &Error{Key: key(), Msg: what + " name must not be empty"}
	}
	if r.MaxSessions != nil && *r.MaxSessions < 0 {
		return &Error{Key: key("max_sessions"), Msg: fmt.Sprintf("%d is negative (leave max_sessions out for no limit)", *r.MaxSessions)}
	}
	// "" is the same as leaving the key out: [limits] decides.
	if r.Policy != "" {
		if _, err := limiter.ParsePolicy(r.Policy); err != nil {
			return &Error{Key: key("policy"), Msg: err.Error()}
		}
	}
	if r.Fallback != "" {
		if err := checkFallback(r.Fallback); err != nil {
			return &Error{Key: key("fallback"), Msg: err.Error()}
		}
	}
	if err := checkProtect(r.Protect); err != nil {
		return &Error{Key: key("protect"), Msg: err.Error()}
	}
	if r.EvictScope != "" {
		if _, err := limiter.ParseEvictScope(r.EvictScope); err != nil {
			return &Error{Key: key("evict_scope"), Msg: err.Error()}
		}
	}
	if r.MaxEvictions != "" {
		if _, err := limiter.ParseBudget(r.MaxEvictions); err != nil {
			return &Error{Key: key("max_evictions"), Msg: err.Error()}
		}
	}
	for _, d := range []struct {
		key string
		v   *Duration
	}{{"wait_timeout", r.WaitTimeout}, {"min_session_age", r.MinSessionAge}} {
		if d.v == nil {
			continue
		}
		if err := d.v.check(false); err != nil {
			return &Error{Key: key(d.key), Msg: err.Error()}
		}
	}
	return nil
}

// checkProtect checks a protect list's entries.
func checkProtect(list []string) error {
	for _, s := range list {
		if _, err := limiter.ParseProtect(s); err != nil {
			return err
		}
	}
	return nil
}

func checkFallback(s string) error {
	switch limiter.Policy(s) {
	case limiter.PolicyReject, limiter.PolicyWait:
		return nil
	}
	return fmt.Errorf("invalid fallback %q (want reject or wait)", s)
}

// formatKey writes a key's parts the way TOML does, dotted, quoting the parts
// that are not bare keys: roles."my.user".policy. Error keys and keyLine use
// it, so a name with a dot in it is one part, not two.
func formatKey(parts []string) string {
	var b strings.Builder
	for i, p := range parts {
		if i > 0 {
			b.WriteByte('.')
		}
		if isBareKey(p) {
			b.WriteString(p)
			continue
		}
		b.WriteByte('"')
		for _, r := range p {
			switch {
			case r == '"' || r == '\\':
				b.WriteByte('\\')
				b.WriteRune(r)
			case r < 0x20 || r == 0x7f:
				fmt.Fprintf(&b, "\\u%04X", r)
			default:
				b.WriteRune(r)
			}
		}
		b.WriteByte('"')
	}
	return b.String()
}

func isBareKey(s string) bool {
	if s == "" {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-') {
			return false
		}
	}
	return true
}

// keyLine finds the line of a dotted key in a TOML document, 0 when it is absent
// (a default value). It exists because validation runs after decoding, when the
// decoder's positions are gone.
func keyLine(data []byte, key string) int {
	var p unstable.Parser
	p.Reset(data)
	var table []string
	for p.NextExpression() {
		e := p.Expression()
		switch e.Kind {
		case unstable.Table, unstable.ArrayTable:
			table = keyParts(e)
			if formatKey(table) == key {
				return firstKeyLine(&p, e)
			}
		case unstable.KeyValue:
			full := append(append([]string(nil), table...), keyParts(e)...)
			if line := keyValueLine(&p, e, full, key); line > 0 {
				return line
			}
		}
	}
	return 0
}

// keyValueLine finds key in the key/value node n named full, looking into inline
// tables (server = { sslmode = "..." }).
func keyValueLine(p *unstable.Parser, n *unstable.Node, full []string, key string) int {
	name := formatKey(full)
	if name == key {
		return firstKeyLine(p, n)
	}
	v := n.Value()
	if v.Kind != unstable.InlineTable || !strings.HasPrefix(key, name+".") {
		return 0
	}
	it := v.Children()
	for it.Next() {
		kv := it.Node()
		if line := keyValueLine(p, kv, append(append([]string(nil), full...), keyParts(kv)...), key); line > 0 {
			return line
		}
	}
	return 0
}

func keyParts(n *unstable.Node) []string {
	var parts []string
	it := n.Key()
	for it.Next() {
		parts = append(parts, string(it.Node().Data))
	}
	return parts
}

func firstKeyLine(p *unstable.Parser, n *unstable.Node) int {
	it := n.Key()
	if !it.Next() {
		return 0
	}
	return p.Shape(it.Node().Raw).Start.Line
}

// Redacted returns the configuration in force as TOML, for operators (the
// console's SHOW CONFIG), with the admin token and any password in the
// control DSN replaced: secrets never leave the process.
func (c *Config) Redacted() string {
	cp := *c
	if cp.Admin.Token != "" {
		cp.Admin.Token = "[redacted]"
	}
	cp.Control.DSN = redactDSN(cp.Control.DSN)
	b, err := toml.Marshal(&cp)
	if err != nil {
		return "# configuration could not be shown: " + err.Error()
	}
	return string(b) + alwaysProtected
}

// alwaysProtected ends SHOW CONFIG: what no protect list needs to name.
const alwaysProtected = "# Always protected from eviction, whatever protect says: superusers' sessions,\n" +
	"# replication connections and rolegate's own control connections.\n"

var (
	// dsnPassword is a keyword/value password, sslpassword included.
	dsnPassword = regexp.MustCompile(`(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)`)
	// dsnURL splits a URL connection string at its scheme; its query
	// password parameters (password, sslpassword) are found by urlPassword.
	dsnURL      = regexp.MustCompile(`(?i)^postgres(?:ql)?://`)
	urlPassword = regexp.MustCompile(`(?i)([?&][^=&#]*password=)[^&#]*`)
)

// redactDSN removes every password from a URL or keyword/value connection
// string. A URL is taken apart as text, not with url.Parse: a DSN that does
// not parse (a stray % or #, which SHOW CONFIG may still show after a
// reload) must lose its password all the same. The user information ends at
// the last @ before the path, so a password with an unescaped @ or # is
// covered whole.
func redactDSN(dsn string) string {
	loc := dsnURL.FindStringIndex(dsn)
	if loc == nil {
		return dsnPassword.ReplaceAllString(dsn, "${1}[redacted]")
	}
	rest := dsn[loc[1]:]
	if at := strings.LastIndex(rest, "@"); at >= 0 {
		if colon := strings.Index(rest[:at], ":"); colon >= 0 {
			rest = rest[:colon+1] + "[redacted]" + rest[at:]
		}
	}
	return dsn[:loc[1]] + urlPassword.ReplaceAllString(rest, "${1}[redacted]")
}
