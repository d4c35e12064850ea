package config

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestDefaults(t *testing.T) {
	t.Parallel()
	for _, doc := range []string{"", "# only a comment\n", "[tls]\n[server]\n[auth]\n[log]\n"} {
		cfg, err := Parse("empty.toml", []byte(doc))
		if err != nil {
			t.Fatalf("Parse(%q): %v", doc, err)
		}
		if !reflect.DeepEqual(cfg, Default()) {
			t.Errorf("Parse(%q) = %+v, want the defaults %+v", doc, cfg, Default())
		}
	}
	d := Default()
	want := &Config{
		Listen:          "127.0.0.1:6432",
		StartupTimeout:  "60s",
		ShutdownTimeout: "30s",
		Server:          Server{Address: "127.0.0.1:5432", SSLMode: SSLPrefer, ConnectTimeout: "10s"},
		Auth:            Auth{Mode: AuthPassthrough},
		Log:             Log{Level: "info", Format: "text"},
	}
	if !reflect.DeepEqual(d, want) {
		t.Errorf("Default() = %+v, want %+v", d, want)
	}
	if d.TLS.Enabled() {
		t.Error("TLS enabled by default")
	}
	if d.StartupTimeout.Value() != time.Minute || d.ShutdownTimeout.Value() != 30*time.Second || d.Server.ConnectTimeout.Value() != 10*time.Second {
		t.Errorf("default durations %v %v %v", d.StartupTimeout.Value(), d.ShutdownTimeout.Value(), d.Server.ConnectTimeout.Value())
	}
	// Default returns a fresh value each time.
	d.Listen = "changed:1"
	if Default().Listen == "changed:1" {
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
	if !reflect.DeepEqual(cfg, Default()) {
		t.Errorf("proxy.toml = %+v, want the defaults %+v", cfg, Default())
	}
}

func TestEveryKey(t *testing.T) {
	t.Parallel()
	doc := `
listen = "0.0.0.0:7432"
startup_timeout = "5s"
shutdown_timeout = "1m30s"

[tls]
cert = "/etc/rolegate/server.crt"
key = "/etc/rolegate/server.key"

[server]
address = "db.internal:5433"
sslmode = "verify-full"
sslrootcert = "/etc/rolegate/root.crt"
connect_timeout = "250ms"

[auth]
mode = "passthrough"

[log]
level = "debug"
format = "json"
`
	cfg, err := Parse("full.toml", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	want := &Config{
		Listen:          "0.0.0.0:7432",
		StartupTimeout:  "5s",
		ShutdownTimeout: "1m30s",
		TLS:             TLS{Cert: "/etc/rolegate/server.crt", Key: "/etc/rolegate/server.key"},
		Server: Server{Address: "db.internal:5433", SSLMode: SSLVerifyFull,
			SSLRootCert: "/etc/rolegate/root.crt", ConnectTimeout: "250ms"},
		Auth: Auth{Mode: AuthPassthrough},
		Log:  Log{Level: "debug", Format: "json"},
	}
	if !reflect.DeepEqual(cfg, want) {
		t.Errorf("got  %+v\nwant %+v", cfg, want)
	}
	if !cfg.TLS.Enabled() {
		t.Error("TLS not enabled with cert and key")
	}
	if cfg.StartupTimeout.Value() != 5*time.Second || cfg.ShutdownTimeout.Value() != 90*time.Second ||
		cfg.Server.ConnectTimeout.Value() != 250*time.Millisecond {
		t.Errorf("durations %v %v %v", cfg.StartupTimeout.Value(), cfg.ShutdownTimeout.Value(), cfg.Server.ConnectTimeout.Value())
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
		{"bad connect_timeout", "[server]\n\nconnect_timeout = \"soon\"\n", "server.connect_timeout", 3, `invalid duration "soon"`},
		{"zero connect_timeout", "[server]\nconnect_timeout = \"0ms\"\n", "server.connect_timeout", 2, "must be greater than zero"},
		{"auth mode proxy", "[auth]\nmode = \"proxy\"\n", "auth.mode", 2, "not available in this version"},
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
