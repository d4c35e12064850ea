package config

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rolegate/rolegate/limiter"
)

// resolvedDefaults is what Parse makes of a file that sets nothing: the
// defaults, with the auth mode resolved (no verifier source: passthrough).
func resolvedDefaults() *Config {
	c := Default()
	c.Auth.Mode = AuthPassthrough
	return c
}

func TestDefaults(t *testing.T) {
	t.Parallel()
	for _, doc := range []string{"", "# only a comment\n", "[tls]\n[server]\n[control]\n[auth]\n[log]\n[limits]\n"} {
		cfg, err := Parse("empty.toml", []byte(doc))
		if err != nil {
			t.Fatalf("Parse(%q): %v", doc, err)
		}
		if !reflect.DeepEqual(cfg, resolvedDefaults()) {
			t.Errorf("Parse(%q) = %+v, want the defaults %+v", doc, cfg, resolvedDefaults())
		}
	}
	d := Default()
	want := &Config{
		Listen:          "127.0.0.1:6432",
		StartupTimeout:  "60s",
		ShutdownTimeout: "30s",
		Relay:           "loop",
		Server:          Server{Address: "127.0.0.1:5432", SSLMode: SSLPrefer, ConnectTimeout: "10s"},
		Control:         Control{MaxConns: 4},
		// Mode "" until Parse resolves it from the verifier sources.
		Auth:    Auth{Mode: "", Method: "scram-sha-256", AuthQuery: DefaultAuthQuery, CacheSize: 1000, CacheTTL: "60s"},
		Log:     Log{Level: "info", Format: "text"},
		Admin:   Admin{HTTP: "127.0.0.1:9631", AllowedHosts: []string{}, Users: []string{}, Database: "rolegate"},
		History: History{Keep: "7d"},
		Limits: Limits{Policy: "reject", Fallback: "reject", ServerLimits: true,
			WaitTimeout: "10s", MinSessionAge: "0s", LimitsCacheTTL: "60s", Protect: []string{},
			EvictScope: "any", MaxEvictions: "60/min"},
	}
	if !reflect.DeepEqual(d, want) {
		t.Errorf("Default() = %+v, want %+v", d, want)
	}
	if d.TLS.Enabled() {
		t.Error("TLS enabled by default")
	}
	if d.StartupTimeout.Value() != time.Minute || d.ShutdownTimeout.Value() != 30*time.Second ||
		d.Server.ConnectTimeout.Value() != 10*time.Second || d.Auth.CacheTTL.Value() != time.Minute {
		t.Errorf("default durations %v %v %v %v", d.StartupTimeout.Value(), d.ShutdownTimeout.Value(),
			d.Server.ConnectTimeout.Value(), d.Auth.CacheTTL.Value())
	}
	if !strings.Contains(DefaultAuthQuery, "$1") {
		t.Errorf("DefaultAuthQuery %q does not take the role as $1", DefaultAuthQuery)
	}
	// Default returns a fresh value each time.
	d.Listen = "changed:1"
	d.Auth.Method = "md5"
	if Default().Listen == "changed:1" || Default().Auth.Method == "md5" {
		t.Error("Default shares state between calls")
	}
}

// The proxy.toml at the repository root documents every key with its default.
func TestRepositoryProxyTOML(t *testing.T) {
	t.Parallel()
	cfg, err := Load(filepath.Join("..", "proxy.toml"))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(cfg, resolvedDefaults()) {
		t.Errorf("proxy.toml = %+v, want the defaults %+v", cfg, resolvedDefaults())
	}
}

func TestEveryKey(t *testing.T) {
	t.Parallel()
	doc := `
listen = "0.0.0.0:7432"
startup_timeout = "5s"
shutdown_timeout = "1m30s"
max_procs = 2
relay = "goroutines"
reuse_port = true
handoff_socket = "/run/rolegate/handoff.sock"
instance = "eu-west-1a"

[tls]
cert = "/etc/rolegate/server.crt"
key = "/etc/rolegate/server.key"

[server]
address = "db.internal:5433"
sslmode = "verify-full"
sslrootcert = "/etc/rolegate/root.crt"
connect_timeout = "250ms"

[control]
dsn = "postgres://rolegate@db.internal:5433/postgres?sslmode=verify-full"
password_file = "/etc/rolegate/control.pw"
max_conns = 2

[auth]
mode = "proxy"
method = "password"
cleartext_without_tls = true
userlist = "/etc/rolegate/userlist.txt"
auth_query = "SELECT rolegate.get_secret($1)"
cache_size = 50
cache_ttl = "5m"

[log]
level = "debug"
format = "json"

[admin]
http = "0.0.0.0:9700"
allowed_hosts = ["rolegate.internal", "Ops-Proxy.example.com.:8443", "[::1]:9700", "10.0.0.5"]
token = "s3cret"
users = ["admin", "ops"]
database = "pgadmin"

[cluster]
advertise = "10.0.0.7:7432"
[history]
keep = "36h"

[limits]
policy = "evict-idle"
fallback = "wait"
server_limits = false
wait_timeout = "3s"
min_session_age = "2s"
limits_cache_ttl = "0s"
protect = ["application_name:pg_dump*", "client:10.1.0.0/16"]
dry_run = true
evict_scope = "same-application"
max_evictions = "10/s"

[roles.some_user]
max_sessions = 1
policy = "newest-wins"
dry_run = false
evict_scope = "same-client"
max_evictions = "off"
fallback = "reject"
wait_timeout = "5s"
min_session_age = "10s"
protect = ["role:replicator"]

[databases.app]
max_sessions = 50
policy = "wait"
fallback = "wait"
wait_timeout = "1m"
min_session_age = "1s"
`
	cfg, err := Parse("full.toml", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	hosts := []string{"rolegate.internal", "Ops-Proxy.example.com.:8443", "[::1]:9700", "10.0.0.5"}
	want := &Config{
		Listen:          "0.0.0.0:7432",
		StartupTimeout:  "5s",
		ShutdownTimeout: "1m30s",
		MaxProcs:        2,
		Relay:           "goroutines",
		ReusePort:       true,
		HandoffSocket:   "/run/rolegate/handoff.sock",
		Instance:        "eu-west-1a",
		History:         History{Keep: "36h"},
		TLS:             TLS{Cert: "/etc/rolegate/server.crt", Key: "/etc/rolegate/server.key"},
		Server: Server{Address: "db.internal:5433", SSLMode: SSLVerifyFull,
			SSLRootCert: "/etc/rolegate/root.crt", ConnectTimeout: "250ms"},
		Control: Control{DSN: "postgres://rolegate@db.internal:5433/postgres?sslmode=verify-full",
			PasswordFile: "/etc/rolegate/control.pw", MaxConns: 2},
		Auth: Auth{Mode: AuthProxy, Method: "password", CleartextWithoutTLS: true, Userlist: "/etc/rolegate/userlist.txt",
			AuthQuery: "SELECT rolegate.get_secret($1)", CacheSize: 50, CacheTTL: "5m"},
		Log:     Log{Level: "debug", Format: "json"},
		Admin:   Admin{HTTP: "0.0.0.0:9700", AllowedHosts: hosts, Token: "s3cret", Users: []string{"admin", "ops"}, Database: "pgadmin"},
		Cluster: Cluster{Advertise: "10.0.0.7:7432"},
		Limits: Limits{Policy: "evict-idle", Fallback: "wait", ServerLimits: false,
			WaitTimeout: "3s", MinSessionAge: "2s", LimitsCacheTTL: "0s",
			Protect: []string{"application_name:pg_dump*", "client:10.1.0.0/16"},
			DryRun:  true, EvictScope: "same-application", MaxEvictions: "10/s"},
		Roles: map[string]LimitRule{"some_user": {MaxSessions: ptr(1), Policy: "newest-wins", Fallback: "reject",
			WaitTimeout: ptr(Duration("5s")), MinSessionAge: ptr(Duration("10s")), Protect: []string{"role:replicator"},
			DryRun: ptr(false), EvictScope: "same-client", MaxEvictions: "off"}},
		Databases: map[string]LimitRule{"app": {MaxSessions: ptr(50), Policy: "wait", Fallback: "wait",
			WaitTimeout: ptr(Duration("1m")), MinSessionAge: ptr(Duration("1s"))}},
	}
	if !reflect.DeepEqual(cfg, want) {
		t.Errorf("got  %+v\nwant %+v", cfg, want)
	}
	if !cfg.TLS.Enabled() {
		t.Error("TLS not enabled with cert and key")
	}
	if cfg.StartupTimeout.Value() != 5*time.Second || cfg.ShutdownTimeout.Value() != 90*time.Second ||
		cfg.Server.ConnectTimeout.Value() != 250*time.Millisecond || cfg.Auth.CacheTTL.Value() != 5*time.Minute {
		t.Errorf("durations %v %v %v %v", cfg.StartupTimeout.Value(), cfg.ShutdownTimeout.Value(),
			cfg.Server.ConnectTimeout.Value(), cfg.Auth.CacheTTL.Value())
	}
}

// Every accepted value of the enumerated keys, and the TOML spellings of keys.
func TestAcceptedValues(t *testing.T) {
	t.Parallel()
	for _, mode := range []SSLMode{SSLDisable, SSLPrefer, SSLRequire, SSLVerifyCA, SSLVerifyFull} {
		doc := "[server]\nsslmode = \"" + string(mode) + "\"\nsslrootcert = \"ca.pem\"\n"
		cfg, err := Parse("f.toml", []byte(doc))
		if err != nil || cfg.Server.SSLMode != mode {
			t.Errorf("sslmode %s: %+v, %v", mode, cfg, err)
		}
	}
	for _, method := range []string{"scram-sha-256", "md5", "password"} {
		if cfg, err := Parse("f.toml", []byte("[auth]\nmethod = \""+method+"\"\n")); err != nil || cfg.Auth.Method != method {
			t.Errorf("auth method %s: %v", method, err)
		}
	}
	for _, level := range []string{"debug", "info", "warn", "error"} {
		if cfg, err := Parse("f.toml", []byte("[log]\nlevel = \""+level+"\"\n")); err != nil || cfg.Log.Level != level {
			t.Errorf("log level %s: %v", level, err)
		}
	}
	for _, doc := range []string{
		"shutdown_timeout = \"0s\"\n",          // close at once on SIGTERM
		"server.sslmode = \"require\"\n",       // a dotted key
		"server = { sslmode = \"require\" }\n", // an inline table
		"listen = \"[::1]:6432\"\n",
		"listen = \":6432\"\n",
		// Host header forms: names, name:port, IP literals with and without brackets.
		"[admin]\nallowed_hosts = [\"localhost.\", \"under_score-1.example\", \"h:65535\", \"::1\", \"[::1]\", \"[fe80::1]:1\", \"10.0.0.5:9631\"]\n",
		"[admin]\nallowed_hosts = []\n",
		"[auth]\ncache_ttl = \"0s\"\n", // no cache: ask the server at every login
		"[auth]\ncache_size = 1\n",
		// The auth query is only checked when there is a control connection to run it.
		"[auth]\nauth_query = \"\"\n",
		"[auth]\nuserlist = \"u.txt\"\nauth_query = \"select 1\"\n",
		"handoff_socket = \"/" + strings.Repeat("x", 106) + "\"\n", // the longest path a unix socket takes
		"handoff_socket = \"\"\nreuse_port = false\n",
	} {
		if _, err := Parse("f.toml", []byte(doc)); err != nil {
			t.Errorf("Parse(%q): %v", doc, err)
		}
	}
}

func TestErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		doc  string
		key  string
		line int
		msg  string // part of the message
	}{
		{"unknown top-level key", "listen = \"127.0.0.1:1\"\nlisten_port = 5\n", "listen_port", 2, "unknown key"},
		{"unknown key in a table", "[server]\naddress = \"h:1\"\nsslmod = \"require\"\n", "server.sslmod", 3, "unknown key"},
		{"unknown table", "\n\n[limitz]\nx = 1\n", "limitz", 3, "unknown key"},
		{"unknown key in tls", "[tls]\ncert = \"a\"\nkey = \"b\"\npassphrase = \"c\"\n", "tls.passphrase", 4, "unknown key"},
		{"bad sslmode", "# comment\n[server]\nsslmode = \"allow\"\n", "server.sslmode", 3, `invalid sslmode "allow"`},
		{"sslmode of the wrong type", "[server]\nsslmode = true\n", "server.sslmode", 2, "cannot decode TOML boolean"},
		{"bad startup_timeout", "startup_timeout = \"10\"\n", "startup_timeout", 1, `invalid duration "10"`},
		{"zero startup_timeout", "\nstartup_timeout = \"0s\"\n", "startup_timeout", 2, "must be greater than zero"},
		{"negative shutdown_timeout", "listen = \"h:1\"\nshutdown_timeout = \"-1s\"\n", "shutdown_timeout", 2, "must not be negative"},
		{"duration as a number", "shutdown_timeout = 30\n", "shutdown_timeout", 1, "cannot decode TOML integer"},
		{"negative max_procs", "\nmax_procs = -1\n", "max_procs", 2, "must be 0"},
		{"max_procs as a string", "max_procs = \"all\"\n", "max_procs", 1, "cannot decode TOML string"},
		{"bad relay", "\nrelay = \"epoll\"\n", "relay", 2, `want "loop" or "goroutines", not "epoll"`},
		{"bad limits.protect", "[limits]\nprotect = [\"pid:42\"]\n", "limits.protect", 2, `unknown kind "pid"`},
		{"bad role protect glob", "[roles.app]\nprotect = [\"application_name:[x\"]\n", "roles.app.protect", 2, "bad glob"},
		{"bad protect client", "[databases.d]\nprotect = [\"client:10.1.0.0/33\"]\n", "databases.d.protect", 2, "want an address or a CIDR prefix"},
		{"bad cluster.advertise", "[cluster]\nadvertise = \"10.0.0.7\"\n", "cluster.advertise", 2, "want host:port"},
		{"long cluster.advertise", "[cluster]\nadvertise = \"" + strings.Repeat("h", 50) + ":6432\"\n", "cluster.advertise", 2, "longer than 51 bytes"},
		{"reuse_port as a string", "\nreuse_port = \"yes\"\n", "reuse_port", 2, "cannot decode TOML string"},
		{"relative handoff_socket", "listen = \"h:1\"\nhandoff_socket = \"run/handoff.sock\"\n", "handoff_socket", 2,
			`want an absolute path, not "run/handoff.sock"`},
		{"handoff_socket too long", "handoff_socket = \"/" + strings.Repeat("x", 107) + "\"\n", "handoff_socket", 1,
			"path is 108 bytes long; a unix socket path may have at most 107"},
		{"handoff_socket of the wrong type", "handoff_socket = true\n", "handoff_socket", 1, "cannot decode TOML boolean"},
		{"bad connect_timeout", "[server]\n\nconnect_timeout = \"soon\"\n", "server.connect_timeout", 3, `invalid duration "soon"`},
		{"zero connect_timeout", "[server]\nconnect_timeout = \"0ms\"\n", "server.connect_timeout", 2, "must be greater than zero"},
		{"auth mode proxy without a source", "[auth]\nmode = \"proxy\"\n", "auth.mode", 2,
			`mode "proxy" needs a verifier source: control.dsn or auth.userlist`},
		{"auth mode proxy, source empty", "[control]\ndsn = \"\"\n[auth]\nuserlist = \"\"\nmode = \"proxy\"\n", "auth.mode", 5,
			"needs a verifier source"},
		{"bad admin http", "[admin]\nhttp = \"9631\"\n", "admin.http", 2, "want host:port"},
		{"unknown key in admin", "[admin]\nuser = [\"x\"]\n", "admin.user", 2, "unknown key"},
		{"allowed_hosts as a string", "[admin]\nallowed_hosts = \"rolegate.internal\"\n", "admin.allowed_hosts", 2, "cannot decode TOML string"},
		{"allowed_hosts with a URL", "[admin]\n\nallowed_hosts = [\"ok.internal\", \"http://rolegate.internal:9631\"]\n", "admin.allowed_hosts", 3,
			`"http://rolegate.internal:9631": want a host name or host:port`},
		{"allowed_hosts with a path", "[admin]\nallowed_hosts = [\"rolegate.internal/\"]\n", "admin.allowed_hosts", 2, "no scheme, path or wildcard"},
		{"allowed_hosts with a wildcard", "[admin]\nallowed_hosts = [\"*.internal\"]\n", "admin.allowed_hosts", 2, `"*.internal": want a host name`},
		{"allowed_hosts empty entry", "[admin]\nallowed_hosts = [\"\"]\n", "admin.allowed_hosts", 2, `"": want a host name`},
		{"allowed_hosts bad port", "[admin]\nallowed_hosts = [\"rolegate.internal:http\"]\n", "admin.allowed_hosts", 2,
			`port "http" is not a number from 1 to 65535`},
		{"allowed_hosts empty port", "[admin]\nallowed_hosts = [\"rolegate.internal:\"]\n", "admin.allowed_hosts", 2, `port "" is not a number`},
		{"allowed_hosts port 0", "[admin]\nallowed_hosts = [\"rolegate.internal:0\"]\n", "admin.allowed_hosts", 2, `port "0" is not a number`},
		{"allowed_hosts name in brackets", "[admin]\nallowed_hosts = [\"[rolegate.internal]:9631\"]\n", "admin.allowed_hosts", 2,
			"brackets hold an IPv6 address"},
		{"allowed_hosts double dot", "[admin]\nallowed_hosts = [\"rolegate..internal\"]\n", "admin.allowed_hosts", 2, "want a host name"},
		{"empty console database", "[admin]\ndatabase = \"\"\n", "admin.database", 2, "must not be empty"},
		{"bad auth method", "[auth]\nmethod = \"scram\"\n", "auth.method", 2, `invalid method "scram"`},
		{"auth method of the wrong case", "[auth]\n\nmethod = \"MD5\"\n", "auth.method", 3, `invalid method "MD5"`},
		{"cleartext_without_tls as a string", "[auth]\ncleartext_without_tls = \"yes\"\n", "auth.cleartext_without_tls", 2,
			"cannot decode TOML string"},
		{"zero cache_size", "[auth]\ncache_size = 0\n", "auth.cache_size", 2, "must be at least 1"},
		{"bad cache_ttl", "[auth]\ncache_ttl = \"1 minute\"\n", "auth.cache_ttl", 2, `invalid duration "1 minute"`},
		{"negative cache_ttl", "[auth]\ncache_ttl = \"-5s\"\n", "auth.cache_ttl", 2, "must not be negative"},
		{"auth_query without $1", "[control]\ndsn = \"postgres://rolegate@db/postgres\"\n[auth]\nauth_query = \"SELECT rolpassword FROM pg_authid\"\n",
			"auth.auth_query", 4, "must take the role name as $1"},
		{"zero max_conns", "[control]\ndsn = \"postgres://rolegate@db/postgres\"\nmax_conns = 0\n", "control.max_conns", 3, "must be at least 1"},
		{"unknown key in control", "[control]\npassword = \"secret\"\n", "control.password", 2, "unknown key"},
		{"bad auth mode", "[auth]\n\nmode = \"ldap\"\n", "auth.mode", 3, `invalid mode "ldap"`},
		{"bad log level", "[log]\nlevel = \"verbose\"\n", "log.level", 2, `invalid level "verbose"`},
		{"bad log format", "[log]\nlevel = \"info\"\nformat = \"xml\"\n", "log.format", 3, `invalid format "xml"`},
		{"listen without a port", "listen = \"localhost\"\n", "listen", 1, "want host:port"},
		{"listen of the wrong type", "listen = 6432\n", "listen", 1, "cannot decode TOML integer"},
		{"server address without a port", "[server]\naddress = \"db\"\n", "server.address", 2, "want host:port"},
		{"tls cert without key", "\n[tls]\ncert = \"server.crt\"\n", "tls", 2, "cert and key must be set together"},
		{"tls key without cert", "[tls]\nkey = \"server.key\"\n", "tls", 1, "cert and key must be set together"},
		{"verify-full without sslrootcert", "[server]\nsslmode = \"verify-full\"\n", "server.sslrootcert", 0, `required with sslmode "verify-full"`},
		{"verify-ca without sslrootcert", "[server]\nsslmode = \"verify-ca\"\nsslrootcert = \"\"\n", "server.sslrootcert", 3, `required with sslmode "verify-ca"`},
		{"a bad value in a dotted key", "log.format = \"yaml\"\n", "log.format", 1, `invalid format "yaml"`},
		{"a bad value in an inline table", "\nserver = { address = \"h:1\", sslmode = \"bad\" }\n", "server.sslmode", 2, `invalid sslmode "bad"`},

		// [limits]
		{"bad limits policy", "[limits]\npolicy = \"oldest-wins\"\n", "limits.policy", 2, `unknown policy "oldest-wins"`},
		{"limits policy of the wrong case", "[limits]\n\npolicy = \"Reject\"\n", "limits.policy", 3, `unknown policy "Reject"`},
		{"empty limits policy", "[limits]\npolicy = \"\"\n", "limits.policy", 2, `unknown policy ""`},
		{"evicting limits fallback", "[limits]\nfallback = \"newest-wins\"\n", "limits.fallback", 2,
			`invalid fallback "newest-wins" (want reject or wait)`},
		{"empty limits fallback", "[limits]\nfallback = \"\"\n", "limits.fallback", 2, `invalid fallback ""`},
		{"server_limits as a string", "[limits]\nserver_limits = \"on\"\n", "limits.server_limits", 2, "cannot decode TOML string"},
		{"bad wait_timeout", "[limits]\nwait_timeout = \"10\"\n", "limits.wait_timeout", 2, `invalid duration "10"`},
		{"negative min_session_age", "[limits]\nmin_session_age = \"-1s\"\n", "limits.min_session_age", 2, "must not be negative"},
		{"bad limits_cache_ttl", "[limits]\nlimits_cache_ttl = 60\n", "limits.limits_cache_ttl", 2, "cannot decode TOML integer"},
		{"negative limits_cache_ttl", "[limits]\nlimits_cache_ttl = \"-1m\"\n", "limits.limits_cache_ttl", 2, "must not be negative"},
		{"unknown key in limits", "[limits]\nmax_sessions = 3\n", "limits.max_sessions", 2, "unknown key"},
		{"limits with one control connection", "[control]\ndsn = \"postgres://rolegate@db/postgres\"\nmax_conns = 1\n",
			"control.max_conns", 3, "must be at least 2 when limits are enforced"},
		{"a role limit with one control connection",
			"[control]\ndsn = \"postgres://rolegate@db/postgres\"\nmax_conns = 1\n[limits]\nserver_limits = false\n[roles.r]\nmax_sessions = 1\n",
			"control.max_conns", 3, "must be at least 2"},

		// [roles.NAME] and [databases.NAME]
		{"negative max_sessions", "[roles.some_user]\nmax_sessions = -1\n", "roles.some_user.max_sessions", 2,
			"-1 is negative (leave max_sessions out for no limit)"},
		{"max_sessions as a string", "[roles.some_user]\nmax_sessions = \"1\"\n", "roles.some_user.max_sessions", 2, "cannot decode TOML string"},
		{"max_sessions as a float", "[databases.app]\nmax_sessions = 1.5\n", "databases.app.max_sessions", 2, "cannot decode TOML float"},
		{"bad role policy", "[roles.some_user]\nmax_sessions = 1\npolicy = \"newest_wins\"\n", "roles.some_user.policy", 3,
			`unknown policy "newest_wins"`},
		{"bad role fallback", "[roles.some_user]\nfallback = \"evict-idle\"\n", "roles.some_user.fallback", 2, `invalid fallback "evict-idle"`},
		{"bad role wait_timeout", "[roles.some_user]\nwait_timeout = \"5\"\n", "roles.some_user.wait_timeout", 2, `invalid duration "5"`},
		{"negative role min_session_age", "[roles.some_user]\n\nmin_session_age = \"-10s\"\n", "roles.some_user.min_session_age", 3,
			"must not be negative"},
		{"unknown key in a role", "[roles.some_user]\nmax_session = 1\n", "roles.some_user.max_session", 2, "unknown key"},
		{"a role that is not a table", "roles.some_user = 1\n", "roles.some_user", 1, "cannot decode TOML integer"},
		{"bad database policy", "[databases.app]\nmax_sessions = 5\npolicy = \"kill\"\n", "databases.app.policy", 3, `unknown policy "kill"`},
		{"negative database max_sessions", "\n[databases.app]\nmax_sessions = -5\n", "databases.app.max_sessions", 3, "is negative"},
		{"unknown key in a database", "[databases.app]\nroles = 1\n", "databases.app.roles", 2, "unknown key"},
		{"an empty role name", "[roles.\"\"]\nmax_sessions = 1\n", `roles.""`, 1, "role name must not be empty"},
		{"an empty database name", "[databases]\n\"\" = { max_sessions = 1 }\n", `databases.""`, 2, "database name must not be empty"},
		// Of several bad tables, the first by name is reported.
		{"two bad roles", "[roles.b]\npolicy = \"x\"\n[roles.a]\npolicy = \"y\"\n", "roles.a.policy", 4, `unknown policy "y"`},

		// Names with dots and other characters are quoted keys; errors
		// quote them the same way and find their line.
		{"quoted role name", "[roles.\"my.user\"]\nmax_sessions = 1\npolicy = \"x\"\n", `roles."my.user".policy`, 3, `unknown policy "x"`},
		{"literal-quoted role name", "[roles.'my.user']\n\nmax_sessions = -2\n", `roles."my.user".max_sessions`, 3, "is negative"},
		{"quoted name in a dotted key", "[roles]\nplain.max_sessions = 1\n\"my.user\".fallback = \"x\"\n",
			`roles."my.user".fallback`, 3, `invalid fallback "x"`},
		{"quoted name in an inline table", "\ndatabases = { \"my db\" = { max_sessions = 1, wait_timeout = \"x\" } }\n",
			`databases."my db".wait_timeout`, 2, `invalid duration "x"`},
		{"quoted name at the top level", "roles.\"a.b\".policy = \"y\"\n", `roles."a.b".policy`, 1, `unknown policy "y"`},
		{"a name with a quote and a backslash", "[roles.'we\"ird\\name']\npolicy = \"y\"\n", `roles."we\"ird\\name".policy`, 2, `unknown policy "y"`},
		{"a quoted name that looks like another table", "[roles.a]\npolicy = \"reject\"\n[roles.\"a.policy\"]\npolicy = \"z\"\n",
			`roles."a.policy".policy`, 4, `unknown policy "z"`},
		{"unknown key in a quoted role", "[roles.\"my.user\"]\nmax_sessions = 1\nmaxsessions = 2\n", `roles."my.user".maxsessions`, 3, "unknown key"},
		{"wrong type in a quoted role", "[roles.\"my.user\"]\nmax_sessions = true\n", `roles."my.user".max_sessions`, 2, "cannot decode TOML boolean"},
		// Names PostgreSQL would cut to the same 63 bytes name one role.
		{"two long names of one role", "[roles.\"" + strings.Repeat("r", 63) + "\"]\nmax_sessions = 1\n[roles.\"" + strings.Repeat("r", 70) + "\"]\nmax_sessions = 2\n",
			`roles.` + strings.Repeat("r", 70), 3, `names the same role as roles.` + strings.Repeat("r", 63) + `: PostgreSQL keeps only the first 63 bytes`},
		{"two long names of one database", "[databases]\n\"" + strings.Repeat("é", 31) + "xyz\" = { max_sessions = 1 }\n\"" + strings.Repeat("é", 31) + "x\" = { max_sessions = 2 }\n",
			`databases."` + strings.Repeat("é", 31) + `xyz"`, 2, `names the same database as databases."` + strings.Repeat("é", 31) + `x"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg, err := Parse("proxy.toml", []byte(tt.doc))
			if err == nil {
				t.Fatalf("Parse succeeded: %+v", cfg)
			}
			var ce *Error
			if !errors.As(err, &ce) {
				t.Fatalf("error %v (%T), want *Error", err, err)
			}
			if ce.File != "proxy.toml" || ce.Key != tt.key || ce.Line != tt.line || !strings.Contains(ce.Msg, tt.msg) {
				t.Errorf("got file %q key %q line %d msg %q\nwant key %q line %d msg containing %q",
					ce.File, ce.Key, ce.Line, ce.Msg, tt.key, tt.line, tt.msg)
			}
			// The text says it all on one line: file:line: key: message.
			prefix := "proxy.toml: " + tt.key + ": "
			if tt.line > 0 {
				prefix = "proxy.toml:" + strconv.Itoa(tt.line) + ": " + tt.key + ": "
			}
			if !strings.HasPrefix(err.Error(), prefix) {
				t.Errorf("error text %q, want it to start with %q", err.Error(), prefix)
			}
		})
	}
}

// Every unknown key is reported, not just the first.
func TestSeveralUnknownKeys(t *testing.T) {
	t.Parallel()
	_, err := Parse("p.toml", []byte("a = 1\n[server]\nb = 2\n[log]\nc = 3\n"))
	if err == nil {
		t.Fatal("no error")
	}
	for _, want := range []string{"p.toml:1: a: unknown key", "p.toml:3: server.b: unknown key", "p.toml:5: log.c: unknown key"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not contain %q", err, want)
		}
	}
}

func TestSyntaxError(t *testing.T) {
	t.Parallel()
	_, err := Parse("p.toml", []byte("listen = \"127.0.0.1:1\"\nstartup_timeout = \n"))
	var ce *Error
	if !errors.As(err, &ce) || ce.Line != 2 || !strings.HasPrefix(err.Error(), "p.toml:2: ") {
		t.Errorf("error %v, want one on line 2", err)
	}
}

func TestLoad(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	good := filepath.Join(dir, "good.toml")
	if err := os.WriteFile(good, []byte("listen = \"127.0.0.1:7000\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := Load(good)
	if err != nil || cfg.Listen != "127.0.0.1:7000" {
		t.Errorf("Load: %+v, %v", cfg, err)
	}

	bad := filepath.Join(dir, "bad.toml")
	if err := os.WriteFile(bad, []byte("\n[log]\nlevel = \"loud\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = Load(bad)
	if err == nil || !strings.HasPrefix(err.Error(), bad+":3: log.level: ") {
		t.Errorf("Load(bad): %v, want it to name the file, line 3 and log.level", err)
	}

	_, err = Load(filepath.Join(dir, "missing.toml"))
	if !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Load(missing): %v, want os.ErrNotExist", err)
	}
}

func TestDurationValue(t *testing.T) {
	t.Parallel()
	for d, want := range map[Duration]time.Duration{"1s": time.Second, "1m30s": 90 * time.Second, "0s": 0, "nonsense": 0, "": 0} {
		if got := d.Value(); got != want {
			t.Errorf("Duration(%q).Value() = %v, want %v", d, got, want)
		}
	}
}

func TestRetentionValue(t *testing.T) {
	t.Parallel()
	for r, want := range map[Retention]time.Duration{"7d": 7 * 24 * time.Hour, "1d12h": 36 * time.Hour, "36h": 36 * time.Hour,
		"90m": 90 * time.Minute, "0d": 0, "off": 0, "0": 0, "0s": 0, "nonsense": 0} {
		if got := r.Value(); got != want {
			t.Errorf("Retention(%q).Value() = %v, want %v", r, got, want)
		}
	}
	for _, doc := range []string{"[history]\nkeep = \"off\"\n", "[history]\nkeep = \"0\"\n", "[history]\nkeep = \"30d\"\n",
		"instance = \"a b-c.ü\"\n"} {
		if _, err := Parse("f.toml", []byte(doc)); err != nil {
			t.Errorf("Parse(%q): %v", doc, err)
		}
	}
	for _, tt := range []struct {
		doc, key string
		line     int
		msg      string
	}{
		{"\n[history]\nkeep = \"7 days\"\n", "history.keep", 3, `invalid retention "7 days"`},
		{"\n[history]\nkeep = \"d\"\n", "history.keep", 3, `invalid retention "d"`},
		{"\n[history]\nkeep = \"-1h\"\n", "history.keep", 3, `invalid retention "-1h"`},
		{"\n[history]\nkeep = \"7dd\"\n", "history.keep", 3, `invalid retention "7dd"`},
		{"\ninstance = \"a\\nb\"\n", "instance", 2, "printable"},
		{"\ninstance = \"" + strings.Repeat("x", 64) + "\"\n", "instance", 2, "at most 63 bytes"},
	} {
		_, err := Parse("f.toml", []byte(tt.doc))
		var ce *Error
		if !errors.As(err, &ce) || ce.Key != tt.key || ce.Line != tt.line || !strings.Contains(ce.Msg, tt.msg) {
			t.Errorf("Parse(%q): %v; want %s on line %d, naming %q", tt.doc, err, tt.key, tt.line, tt.msg)
		}
	}
}

// An auth mode left out is resolved from the verifier sources; one that is set
// is kept.
func TestAuthModeResolution(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, doc string
		want      AuthMode
	}{
		{"nothing set", "", AuthPassthrough},
		{"empty mode", "[auth]\nmode = \"\"\n", AuthPassthrough},
		{"a control dsn", "[control]\ndsn = \"postgres://rolegate@db/postgres\"\n", AuthProxy},
		{"a userlist", "[auth]\nuserlist = \"/etc/rolegate/userlist.txt\"\n", AuthProxy},
		{"both", "[control]\ndsn = \"postgres://rolegate@db/postgres\"\n[auth]\nuserlist = \"u.txt\"\n", AuthProxy},
		{"proxy with a userlist", "[auth]\nmode = \"proxy\"\nuserlist = \"u.txt\"\n", AuthProxy},
		{"proxy with a control dsn", "[control]\ndsn = \"postgres://rolegate@db/postgres\"\n[auth]\nmode = \"proxy\"\n", AuthProxy},
		// The control connection also serves limits; passthrough stays passthrough.
		{"passthrough with a control dsn", "[control]\ndsn = \"postgres://rolegate@db/postgres\"\n[auth]\nmode = \"passthrough\"\n",
			AuthPassthrough},
	}
	for _, tt := range tests {
		cfg, err := Parse("f.toml", []byte(tt.doc))
		if err != nil {
			t.Errorf("%s: %v", tt.name, err)
			continue
		}
		if cfg.Auth.Mode != tt.want {
			t.Errorf("%s: mode %q, want %q", tt.name, cfg.Auth.Mode, tt.want)
		}
	}
}

// Configuration errors never quote a control password written into the DSN.
func TestErrorsKeepDSNPasswordOut(t *testing.T) {
	t.Parallel()
	doc := "[control]\ndsn = \"postgres://rolegate:hunter2@db/postgres\"\nmax_conns = -1\n[auth]\nauth_query = \"select 1\"\n"
	_, err := Parse("f.toml", []byte(doc))
	if err == nil || strings.Contains(err.Error(), "hunter2") {
		t.Errorf("error %v: want one without the password", err)
	}
}

func ptr[T any](v T) *T { return &v }

// The [roles.NAME] and [databases.NAME] examples in proxy.toml are commented
// out (the file must parse to the defaults); uncommented, they are valid and
// use every key of a rule.
func TestRepositoryProxyTOMLExamples(t *testing.T) {
	t.Parallel()
	data, err := os.ReadFile(filepath.Join("..", "proxy.toml"))
	if err != nil {
		t.Fatal(err)
	}
	var example strings.Builder
	in := false
	for line := range strings.Lines(string(data)) {
		switch {
		case strings.HasPrefix(line, "# [roles.") || strings.HasPrefix(line, "# [databases."):
			in = true
		case !strings.HasPrefix(line, "# ") || strings.HasPrefix(line, "#  "):
			in = false
		}
		if in {
			example.WriteString(strings.TrimPrefix(line, "# "))
		}
	}
	cfg, err := Parse("examples", []byte(example.String()))
	if err != nil {
		t.Fatalf("the examples in proxy.toml:\n%s\n%v", example.String(), err)
	}
	if len(cfg.Roles) != 1 || len(cfg.Databases) != 1 {
		t.Fatalf("examples: roles %v, databases %v; want one of each", cfg.Roles, cfg.Databases)
	}
	for _, r := range cfg.Roles {
		if r.MaxSessions == nil || r.Policy == "" || r.Fallback == "" || r.WaitTimeout == nil || r.MinSessionAge == nil {
			t.Errorf("the role example does not show every key: %+v", r)
		}
	}
	// Every key of [limits] and of a rule is documented.
	for _, typ := range []reflect.Type{reflect.TypeFor[Limits](), reflect.TypeFor[LimitRule]()} {
		for f := range typ.Fields() {
			if key := f.Tag.Get("toml"); !strings.Contains(string(data), "\n"+key+" = ") && !strings.Contains(string(data), "\n# "+key+" = ") {
				t.Errorf("proxy.toml does not document %s.%s", typ.Name(), key)
			}
		}
	}
}

func TestRoleAndDatabaseRules(t *testing.T) {
	t.Parallel()
	doc := `
[limits]
policy = "wait"
fallback = "wait"
wait_timeout = "7s"
min_session_age = "3s"

[roles.full]
max_sessions = 1
policy = "newest-wins"
fallback = "reject"
wait_timeout = "5s"
min_session_age = "10s"
dry_run = true
evict_scope = "same-application"
max_evictions = "3/30s"

[roles.only_limit]
max_sessions = 2

[roles.zero]
max_sessions = 0

[roles."my.user"]
max_sessions = 3
policy = "evict-idle"
wait_timeout = "0s"

[roles.empty_policy]
policy = ""

[roles.no_limit]
policy = "newest-wins"

[databases.app]
max_sessions = 50

[databases."App"]
policy = "reject"
min_session_age = "1m"
`
	cfg, err := Parse("rules.toml", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	budget := limiter.Budget{Evictions: 60, Per: time.Minute}
	defaults := limiter.Rule{MaxSessions: -1, Policy: limiter.PolicyWait, Fallback: limiter.PolicyWait,
		WaitTimeout: 7 * time.Second, MinSessionAge: 3 * time.Second, EvictScope: limiter.EvictAny, Budget: budget}
	with := func(f func(*limiter.Rule)) limiter.Rule { r := defaults; f(&r); return r }
	for _, tt := range []struct {
		name string
		got  limiter.Rule
		want limiter.Rule
	}{
		{"role with every key", cfg.RoleRule("full"), limiter.Rule{MaxSessions: 1, Policy: limiter.PolicyNewestWins,
			Fallback: limiter.PolicyReject, WaitTimeout: 5 * time.Second, MinSessionAge: 10 * time.Second,
			DryRun: true, EvictScope: limiter.EvictSameApplication, Budget: limiter.Budget{Evictions: 3, Per: 30 * time.Second}}},
		{"role with only a limit", cfg.RoleRule("only_limit"), with(func(r *limiter.Rule) { r.MaxSessions = 2 })},
		{"role with limit 0", cfg.RoleRule("zero"), with(func(r *limiter.Rule) { r.MaxSessions = 0 })},
		{"quoted role", cfg.RoleRule("my.user"), with(func(r *limiter.Rule) {
			r.MaxSessions, r.Policy, r.WaitTimeout = 3, limiter.PolicyEvictIdle, 0
		})},
		{"empty policy is left out", cfg.RoleRule("empty_policy"), defaults},
		{"policy without a limit", cfg.RoleRule("no_limit"), with(func(r *limiter.Rule) { r.Policy = limiter.PolicyNewestWins })},
		{"unknown role", cfg.RoleRule("nobody"), defaults},
		{"empty role", cfg.RoleRule(""), defaults},
		// Names match exactly: "my" is not "my.user", and case counts.
		{"a prefix of a quoted name", cfg.RoleRule("my"), defaults},
		{"role names are case-sensitive", cfg.RoleRule("FULL"), defaults},
		// Roles and databases are separate name spaces.
		{"a role's name as a database", cfg.DatabaseRule("full"), defaults},
		{"database with a limit", cfg.DatabaseRule("app"), with(func(r *limiter.Rule) { r.MaxSessions = 50 })},
		{"database names are case-sensitive", cfg.DatabaseRule("App"), with(func(r *limiter.Rule) {
			r.Policy, r.MinSessionAge = limiter.PolicyReject, time.Minute
		})},
		{"unknown database", cfg.DatabaseRule("other"), defaults},
	} {
		if !reflect.DeepEqual(tt.got, tt.want) {
			t.Errorf("%s: %+v, want %+v", tt.name, tt.got, tt.want)
		}
		if err := tt.got.Validate(); err != nil {
			t.Errorf("%s: the resolved rule does not validate: %v", tt.name, err)
		}
	}

	// Without any configuration: no limit, PostgreSQL's own behaviour.
	d, err := Parse("empty.toml", nil)
	if err != nil {
		t.Fatal(err)
	}
	want := limiter.Rule{MaxSessions: -1, Policy: limiter.PolicyReject, Fallback: limiter.PolicyReject, WaitTimeout: 10 * time.Second,
		EvictScope: limiter.EvictAny, Budget: budget}
	if got := d.RoleRule("some_user"); !reflect.DeepEqual(got, want) || got.Limited() {
		t.Errorf("default RoleRule = %+v, want %+v", got, want)
	}
	if got := d.DatabaseRule("app"); !reflect.DeepEqual(got, want) {
		t.Errorf("default DatabaseRule = %+v, want %+v", got, want)
	}
}

// Every accepted value of the limit keys.
func TestLimitsAcceptedValues(t *testing.T) {
	t.Parallel()
	for _, p := range []limiter.Policy{limiter.PolicyReject, limiter.PolicyWait, limiter.PolicyNewestWins, limiter.PolicyEvictIdle} {
		doc := "[limits]\npolicy = \"" + string(p) + "\"\n[roles.r]\npolicy = \"" + string(p) + "\"\n[databases.d]\npolicy = \"" + string(p) + "\"\n"
		cfg, err := Parse("f.toml", []byte(doc))
		if err != nil {
			t.Errorf("policy %s: %v", p, err)
			continue
		}
		if cfg.Limits.Policy != string(p) || cfg.RoleRule("r").Policy != p || cfg.DatabaseRule("d").Policy != p {
			t.Errorf("policy %s: %+v", p, cfg.Limits)
		}
	}
	for _, f := range []limiter.Policy{limiter.PolicyReject, limiter.PolicyWait} {
		doc := "[limits]\nfallback = \"" + string(f) + "\"\n[roles.r]\nfallback = \"" + string(f) + "\"\n"
		if cfg, err := Parse("f.toml", []byte(doc)); err != nil || cfg.RoleRule("r").Fallback != f {
			t.Errorf("fallback %s: %v", f, err)
		}
	}
	for _, doc := range []string{
		"[limits]\nwait_timeout = \"0s\"\nmin_session_age = \"1h\"\nlimits_cache_ttl = \"0s\"\n",
		"[roles.r]\nmax_sessions = 0\n",              // only superusers
		"[roles.r]\nmax_sessions = 2147483647\n",     // as large as PostgreSQL's own
		"[roles.r]\n[databases.d]\n",                 // empty tables: no limit
		"[roles]\n[databases]\n",                     // no tables at all
		"roles = {}\n",                               // the same, inline
		"roles.r.max_sessions = 1\n",                 // a dotted key
		"[roles]\nr = { max_sessions = 1 }\n",        // an inline table
		"[roles.\"Mixed Case\"]\nmax_sessions = 1\n", // a quoted name
		"[roles.\"ünïcødé\"]\nmax_sessions = 1\n",
		// The control connection is only sized when limits are enforced.
		"[control]\ndsn = \"postgres://rolegate@db/postgres\"\nmax_conns = 1\n[limits]\nserver_limits = false\n",
		"[control]\nmax_conns = 1\n[roles.r]\nmax_sessions = 1\n",
	} {
		if _, err := Parse("f.toml", []byte(doc)); err != nil {
			t.Errorf("Parse(%q): %v", doc, err)
		}
	}
}

func TestLimitsConfigured(t *testing.T) {
	t.Parallel()
	const dsn = "[control]\ndsn = \"postgres://rolegate@db/postgres\"\n"
	for _, tt := range []struct {
		name, doc string
		want      bool
	}{
		{"nothing set, no control connection", "", false},
		{"server limits need a control connection", "[limits]\nserver_limits = true\n", false},
		{"server limits with a control connection", dsn, true},
		{"server limits off", dsn + "[limits]\nserver_limits = false\n", false},
		{"a role limit", "[limits]\nserver_limits = false\n[roles.r]\nmax_sessions = 1\n", true},
		{"a role limit of 0", "[roles.r]\nmax_sessions = 0\n", true},
		{"a database limit", "[databases.d]\nmax_sessions = 5\n", true},
		{"a role policy without a limit", dsn + "[limits]\nserver_limits = false\n[roles.r]\npolicy = \"newest-wins\"\n", false},
		{"empty tables", dsn + "[limits]\nserver_limits = false\n[roles.r]\n[databases.d]\n", false},
	} {
		cfg, err := Parse("f.toml", []byte(tt.doc))
		if err != nil {
			t.Errorf("%s: %v", tt.name, err)
			continue
		}
		if got := cfg.LimitsConfigured(); got != tt.want {
			t.Errorf("%s: LimitsConfigured() = %v, want %v", tt.name, got, tt.want)
		}
	}
}

func TestFormatKey(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		parts []string
		want  string
	}{
		{[]string{"listen"}, "listen"},
		{[]string{"roles", "some_user", "max_sessions"}, "roles.some_user.max_sessions"},
		{[]string{"roles", "my-user2"}, "roles.my-user2"},
		{[]string{"roles", "my.user", "policy"}, `roles."my.user".policy`},
		{[]string{"roles", ""}, `roles.""`},
		{[]string{"roles", "a b"}, `roles."a b"`},
		{[]string{"roles", `q"b\`}, `roles."q\"b\\"`},
		{[]string{"roles", "tab\there"}, `roles."tab\u0009here"`},
		{[]string{"roles", "ünï"}, `roles."ünï"`},
	} {
		if got := formatKey(tt.parts); got != tt.want {
			t.Errorf("formatKey(%q) = %s, want %s", tt.parts, got, tt.want)
		}
	}
}

// keyLine finds quoted keys however the document spells them.
func TestKeyLineQuoted(t *testing.T) {
	t.Parallel()
	doc := `[roles]
plain = { max_sessions = 1 }
"dotted.name".policy = "wait"

[roles."my.user"]
max_sessions = 1

[roles.'single.quoted']
fallback = "wait"

[databases."a b"]
max_sessions = 2
`
	for key, want := range map[string]int{
		"roles":                          1,
		"roles.plain":                    2,
		"roles.plain.max_sessions":       2,
		`roles."dotted.name".policy`:     3,
		`roles."my.user"`:                5,
		`roles."my.user".max_sessions`:   6,
		"roles.my.user.max_sessions":     0, // three parts, not the quoted name
		`roles."single.quoted".fallback`: 9,
		`databases."a b".max_sessions`:   12,
		"databases.a b.max_sessions":     0,
		`roles."my.user".policy`:         0, // not in the document
	} {
		if got := keyLine([]byte(doc), key); got != want {
			t.Errorf("keyLine(%s) = %d, want %d", key, got, want)
		}
	}
}

// Rule names longer than PostgreSQL keeps name what CREATE ROLE and CREATE
// DATABASE stored: the first 63 bytes, cut at a character boundary; so do
// console users. The console database is cut like a startup packet's name.
func TestLongNames(t *testing.T) {
	t.Parallel()
	r70, e40 := strings.Repeat("r", 70), strings.Repeat("é", 40)
	doc := fmt.Sprintf("[admin]\nusers = [%q, \"short\"]\ndatabase = %q\n[roles.%q]\nmax_sessions = 1\n[roles.%q]\nmax_sessions = 2\n[databases.%q]\nmax_sessions = 3\n",
		e40, r70, r70, e40, e40)
	cfg, err := Parse("long.toml", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.RoleRule(r70[:63]).MaxSessions; got != 1 {
		t.Errorf("role %q cut to 63 bytes: max_sessions %d, want 1", r70, got)
	}
	if got := cfg.RoleRule(e40[:62]).MaxSessions; got != 2 {
		t.Errorf("role %q cut to 62 bytes: max_sessions %d, want 2", e40, got)
	}
	if got := cfg.DatabaseRule(e40[:62]).MaxSessions; got != 3 {
		t.Errorf("database %q cut to 62 bytes: max_sessions %d, want 3", e40, got)
	}
	if _, ok := cfg.Roles[r70]; ok || len(cfg.Roles) != 2 || len(cfg.Databases) != 1 {
		t.Errorf("rules under their uncut names: %v %v", cfg.Roles, cfg.Databases)
	}
	if want := []string{e40[:62], "short"}; !slices.Equal(cfg.Admin.Users, want) {
		t.Errorf("admin users %q, want %q", cfg.Admin.Users, want)
	}
	if cfg.Admin.Database != r70[:63] {
		t.Errorf("console database %q, want %q", cfg.Admin.Database, r70[:63])
	}
}

func TestAdmin(t *testing.T) {
	cfg, err := Parse("admin.toml", []byte("[admin]\nhttp = \"\"\ntoken = \"from-file\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Admin.HTTP != "" {
		t.Errorf("http = %q, want \"\" (off)", cfg.Admin.HTTP)
	}
	t.Setenv("ROLEGATE_ADMIN_TOKEN", "")
	if got := cfg.AdminToken(); got != "from-file" {
		t.Errorf("AdminToken() = %q without the environment, want the file's", got)
	}
	t.Setenv("ROLEGATE_ADMIN_TOKEN", "from-env")
	if got := cfg.AdminToken(); got != "from-env" {
		t.Errorf("AdminToken() = %q, want the environment's", got)
	}
}

func TestRedacted(t *testing.T) {
	for _, dsn := range []string{
		"postgres://rolegate:hunter2@db:5432/postgres?sslmode=verify-full",
		"postgres://rolegate@db/postgres?password=hunter2",
		"host=db user=rolegate password=hunter2 dbname=postgres",
		"host=db user=rolegate password='hunter2 x' dbname=postgres",
		"host=db user=rolegate sslpassword=hunter2",
		"postgres://rolegate@db/postgres?sslmode=verify-full&sslpassword=hunter2",
		"postgresql://rolegate:hunter2@db/postgres?Password=hunter2&application_name=x",
		"postgres://rolegate:p%zzhunter2@db/postgres", // does not parse as a URL
		"postgres://rolegate:p#hunter2@db/postgres",   // parses with no user at all
		"postgres://rolegate:hun@ter2@db/postgres",
	} {
		cfg := Default()
		cfg.Control.DSN = dsn
		cfg.Admin.Token = "hunter2"
		out := cfg.Redacted()
		if strings.Contains(out, "hunter2") || !strings.Contains(out, "[redacted]") || !strings.Contains(out, "rolegate") {
			t.Errorf("Redacted with dsn %q:\n%s", dsn, out)
		}
		if !strings.Contains(out, "Always protected from eviction") {
			t.Errorf("SHOW CONFIG does not say what is always protected:\n%s", out)
		}
	}
}

// A rule's protect list is its own, or [limits] protect when it sets none;
// protect = [] in a rule protects nothing more.
func TestProtectResolves(t *testing.T) {
	t.Parallel()
	doc := `
[limits]
protect = ["application_name:pg_dump*", "client:10.1.0.0/16"]
[roles.own]
protect = ["role:replicator"]
[roles.none]
protect = []
[roles.inherits]
max_sessions = 1
`
	cfg, err := Parse("protect.toml", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	str := func(r limiter.Rule) []string {
		var out []string
		for _, p := range r.Protect {
			out = append(out, p.String())
		}
		return out
	}
	for role, want := range map[string][]string{
		"own":      {"role:replicator"},
		"none":     nil,
		"inherits": {"application_name:pg_dump*", "client:10.1.0.0/16"},
	} {
		if got := str(cfg.RoleRule(role)); !reflect.DeepEqual(got, want) {
			t.Errorf("%s: protect %q, want %q", role, got, want)
		}
	}
}

// Bad values of the issue 13 keys name the key and say what is wanted.
func TestPolicyKeysRejected(t *testing.T) {
	t.Parallel()
	for _, c := range []struct{ doc, key, msg string }{
		{"[limits]\nevict_scope = \"same-host\"\n", "limits.evict_scope", "want any, same-application or same-client"},
		{"[limits]\nmax_evictions = \"30\"\n", "limits.max_evictions", `like "30/min"`},
		{"[roles.app]\nevict_scope = \"everyone\"\n", "roles.app.evict_scope", "unknown evict_scope"},
		{"[databases.d]\nmax_evictions = \"-3/min\"\n", "databases.d.max_evictions", "invalid max_evictions"},
		{"[roles.app]\ndry_run = \"yes\"\n", "roles.app.dry_run", ""},
	} {
		_, err := Parse("bad.toml", []byte(c.doc))
		if err == nil || !strings.Contains(err.Error(), c.key) || !strings.Contains(err.Error(), c.msg) {
			t.Errorf("%q: %v; want an error naming %s and saying %q", c.doc, err, c.key, c.msg)
		}
	}
}
