package main

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/rolegate/rolegate/internal/pgtest"
)

// TestPgBouncerTLSSettings checks PgBouncer's TLS lines: the plain
// PgBouncers keep the two lines they always had, and the TLS one requires
// TLS of clients with its certificate and speaks TLS to the server.
func TestPgBouncerTLSSettings(t *testing.T) {
	if got, want := pgbouncerTLSSettings("", ""), "client_tls_sslmode = disable\nserver_tls_sslmode = disable\n"; got != want {
		t.Errorf("without a certificate:\n%s\nwant:\n%s", got, want)
	}
	got := pgbouncerTLSSettings("/tmp/b/client-tls.crt", "/tmp/b/client-tls.key")
	want := `client_tls_sslmode = require
client_tls_cert_file = /tmp/b/client-tls.crt
client_tls_key_file = /tmp/b/client-tls.key
server_tls_sslmode = require
`
	if got != want {
		t.Errorf("with a certificate:\n%s\nwant:\n%s", got, want)
	}
}

// TestRolegateTLSTable checks rolegate's [tls] table: none for the plain
// instances, cert and key for the TLS one.
func TestRolegateTLSTable(t *testing.T) {
	if got := rolegateTLSTable("", ""); got != "" {
		t.Errorf("without a certificate: %q, want nothing", got)
	}
	if got, want := rolegateTLSTable("/w/rolegate-tls.crt", "/w/rolegate-tls.key"), "[tls]\ncert = \"/w/rolegate-tls.crt\"\nkey = \"/w/rolegate-tls.key\"\n\n"; got != want {
		t.Errorf("with a certificate: %q, want %q", got, want)
	}
}

// TestTLSClientEnv checks that a TLS target's clients ask for TLS in place
// of clientEnv's sslmode disable, and leaves the run's environment alone.
func TestTLSClientEnv(t *testing.T) {
	env := clientEnv("secret")
	before := slices.Clone(env)
	tlsEnv := tlsClientEnv(env, "/c/ca.crt")
	if !slices.Equal(env, before) {
		t.Errorf("the run's environment changed: %q", env)
	}
	var ssl []string
	for _, kv := range tlsEnv {
		if strings.HasPrefix(kv, "PGSSL") {
			ssl = append(ssl, kv)
		}
	}
	if want := []string{"PGSSLMODE=require", "PGSSLROOTCERT=/c/ca.crt"}; !slices.Equal(ssl, want) {
		t.Errorf("PGSSL* variables %q, want %q", ssl, want)
	}
	if !slices.Contains(tlsEnv, "PGPASSWORD=secret") {
		t.Errorf("the password is missing: %q", tlsEnv)
	}

	plain, withTLS := &target{name: "direct"}, &target{name: directTLS, tls: true, env: tlsEnv}
	if got := envFor(env, plain); !slices.Equal(got, env) {
		t.Errorf("plain target: %q", got)
	}
	if got := envFor(env, withTLS); !slices.Equal(got, tlsEnv) {
		t.Errorf("TLS target: %q", got)
	}
}

// TestTLSRows checks the TLS rows in the report: they run against the TLS
// targets only, their table has those as columns with ratios to direct-tls,
// and the verdict compares rolegate-tls with pgbouncer-tls; the plain rows
// and their table are as before.
func TestTLSRows(t *testing.T) {
	direct := &target{name: "direct"}
	rg := &target{name: "rolegate", pid: 1}
	dTLS := &target{name: directTLS, tls: true}
	rgTLS := &target{name: rolegateTLS, pid: 2, tls: true}
	pbTLS := &target{name: pgbouncerTLS, pid: 3, tls: true}
	r := &report{
		targets: []*target{direct, rg, dTLS, rgTLS, pbTLS},
		copy:    newCopySpec(500),
		runs:    make(map[testKind]map[string][]sample),
		plan:    &cpuPlan{},
	}
	set := func(k testKind, name string, values ...float64) {
		if r.runs[k] == nil {
			r.runs[k] = make(map[string][]sample)
		}
		for _, v := range values {
			r.runs[k][name] = append(r.runs[k][name], sample{value: v})
		}
	}
	set(simple, "direct", 20000)
	set(simple, "rolegate", 19000)
	set(tlsSimple, directTLS, 16000, 15000, 17000)
	set(tlsSimple, rolegateTLS, 12000, 12800, 12400)
	set(tlsSimple, pgbouncerTLS, 12500, 12600, 12700)
	set(tlsPinnedExtended, directTLS, 10000)
	set(tlsPinnedExtended, rolegateTLS, 9000)
	set(tlsPinnedExtended, pgbouncerTLS, 8000)

	for _, c := range []struct {
		k    testKind
		t    *target
		want bool
	}{
		{simple, direct, true}, {simple, dTLS, false}, {copyOut, rgTLS, false},
		{tlsSimple, dTLS, true}, {tlsPinnedExtended, pbTLS, true}, {tlsExtended, rg, false},
	} {
		if got := c.k.includes(c.t); got != c.want {
			t.Errorf("%s includes %s: %v, want %v", c.k.label(), c.t.name, got, c.want)
		}
	}

	var b strings.Builder
	mdTable(&b, r.medianRows([]testKind{tlsSimple, tlsPinnedExtended}, true))
	want := `| Median of the rounds | direct-tls | rolegate-tls | pgbouncer-tls | rolegate-tls / direct-tls | pgbouncer-tls / direct-tls |
| --- | --: | --: | --: | --: | --: |
| select-only TPS, -M simple, TLS on both legs | 16000 | 12400 | 12600 | 0.78× | 0.79× |
| select-only TPS, -M extended, TLS on both legs, pinned | 10000 | 9000 | 8000 | 0.90× | 0.80× |
`
	if b.String() != want {
		t.Errorf("Markdown TLS medians:\n%s\nwant:\n%s", b.String(), want)
	}
	b.Reset()
	mdTable(&b, r.medianRows([]testKind{simple}, true))
	want = `| Median of the rounds | direct | rolegate | rolegate / direct |
| --- | --: | --: | --: |
| select-only TPS, -M simple | 20000 | 19000 | 0.95× |
`
	if b.String() != want {
		t.Errorf("Markdown plain medians:\n%s\nwant:\n%s", b.String(), want)
	}

	// -only tls: the TLS rows alone, pinned ones last.
	r.opts = options{only: onlyTLS}
	if got, want := r.rows(), []testKind{tlsSimple, tlsExtended, tlsPinnedSimple, tlsPinnedExtended}; !slices.Equal(got, want) {
		t.Errorf("-only tls rows %v, want %v", got, want)
	}
	r.runs[tlsExtended] = map[string][]sample{directTLS: {{value: 1}}, rolegateTLS: {{value: 1}}, pgbouncerTLS: {{value: 1}}}
	r.runs[tlsPinnedSimple] = r.runs[tlsExtended]
	got := r.tlsVerdicts()
	if len(got) != 4 ||
		got[0] != "select-only -M simple, TLS, rolegate-tls: 0.78× direct-tls throughput; BEHIND pgbouncer-tls (0.79×)" ||
		got[1] != "select-only -M extended, TLS, rolegate-tls: 1.00× direct-tls throughput; at least level with pgbouncer-tls (1.00×)" ||
		got[3] != "select-only -M extended, TLS, pinned, rolegate-tls: 0.90× direct-tls throughput; at least level with pgbouncer-tls (0.80×)" {
		t.Errorf("TLS verdicts:\n%s", strings.Join(got, "\n"))
	}

	// A full run: the plain rows first; -no-tls: the plain rows alone.
	r.opts = options{}
	if got, want := r.rows(), []testKind{simple, extended, copyOut, connect, tlsSimple, tlsExtended, pinnedSimple, pinnedExtended, tlsPinnedSimple, tlsPinnedExtended}; !slices.Equal(got, want) {
		t.Errorf("full run rows %v, want %v", got, want)
	}
	r.opts = options{noTLS: true}
	r.plan = nil
	if got, want := r.rows(), tests; !slices.Equal(got, want) {
		t.Errorf("-no-tls rows without pinning %v, want %v", got, want)
	}
}

// TestValidateOnly checks the -only values, tls among them.
func TestValidateOnly(t *testing.T) {
	o := options{rounds: 1, duration: 10e9, copyMB: 1, clients: 2, jobs: 2, connectClients: 2, scale: 1, stormLimit: 1, limitLogins: 1, stormLogins: 1}
	for _, c := range []struct {
		only  string
		noTLS bool
		ok    bool
	}{
		{"", false, true}, {onlyTLS, false, true}, {onlyTLS, true, false}, {"tlss", false, false}, {onlyLimits, true, true},
	} {
		o.only, o.noTLS = c.only, c.noTLS
		if err := o.validate(); (err == nil) != c.ok {
			t.Errorf("-only %q -no-tls=%v: %v, want ok=%v", c.only, c.noTLS, err, c.ok)
		}
	}
}

// TestCheckTLS drives the warm-up's TLS check against a real server with
// ssl on: a session with sslmode require passes and names its protocol, and
// one without TLS (clientEnv's sslmode disable, as a proxy that spoke plain
// TCP to the server would leave it) fails the check.
func TestCheckTLS(t *testing.T) {
	c := pgtest.Start(t, pgtest.Options{SSL: true, Logf: t.Logf})
	ctx := t.Context()
	password := pgtest.RandomHex(12)
	if err := c.Exec(ctx, fmt.Sprintf("create role %s login password '%s'", benchRole, password)); err != nil {
		t.Fatal(err)
	}
	if err := c.Exec(ctx, fmt.Sprintf("create database %s owner %s", benchRole, benchRole)); err != nil {
		t.Fatal(err)
	}
	env := clientEnv(password)
	withTLS := &target{name: directTLS, host: c.Host, port: c.Port, tls: true, env: tlsClientEnv(env, c.CACertFile)}
	version, err := checkTLS(ctx, env, withTLS)
	if err != nil || !strings.HasPrefix(version, "TLSv1.") {
		t.Errorf("with TLS: %q, %v; want a TLS version", version, err)
	}
	plain := &target{name: "plain", host: c.Host, port: c.Port, tls: true}
	if _, err := checkTLS(ctx, env, plain); err == nil || !strings.Contains(err.Error(), "has no TLS") {
		t.Errorf("without TLS: %v; want the check to fail", err)
	}
}
