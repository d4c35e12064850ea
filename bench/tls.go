package main

import (
	"context"
	"fmt"
	"slices"
	"strings"
)

// The targets of the select-only rows with TLS on both legs (issue 11):
// the same server, which has ssl on for these, reached with TLS directly,
// through a rolegate with client-side TLS and sslmode require to the server,
// and through a PgBouncer with the same.
const (
	directTLS    = "direct-tls"
	rolegateTLS  = "rolegate-tls"
	pgbouncerTLS = "pgbouncer-tls"
)

// tlsSetup says in the report how the TLS targets were set up.
const tlsSetup = "the server with ssl = on and a certificate from a CA the benchmark generates (internal/pgtest, ECDSA P-256); " +
	"pgbench with PGSSLMODE=require and PGSSLROOTCERT the CA (libpq then checks the chain, as with verify-ca) through each TLS target; " +
	directTLS + ": straight to the server; " +
	rolegateTLS + `: rolegate as above with [tls] cert and key (a certificate from the same CA) and [server] sslmode = "require", relay = "loop", which relays TLS sessions with two goroutines; ` +
	pgbouncerTLS + ": PgBouncer as above with client_tls_sslmode = require, client_tls_cert_file and client_tls_key_file (a certificate from the same CA) and server_tls_sslmode = require; " +
	"neither proxy checks the server's certificate (sslmode require, as PgBouncer's server_tls_sslmode)"

// tlsClientEnv is env (clientEnv's) for a TLS target: sslmode require, and
// the cluster's CA as the root certificate, so that what ~/.postgresql
// holds cannot change what libpq does.
func tlsClientEnv(env []string, caFile string) []string {
	out := slices.DeleteFunc(slices.Clone(env), func(kv string) bool {
		return strings.HasPrefix(kv, "PGSSLMODE=") || strings.HasPrefix(kv, "PGSSLROOTCERT=")
	})
	return append(out, "PGSSLMODE=require", "PGSSLROOTCERT="+caFile)
}

// envFor is the client tools' environment for t: its own when it has one
// (the TLS targets), env otherwise.
func envFor(env []string, t *target) []string {
	if t.env != nil {
		return t.env
	}
	return env
}

// rolegateTLSTable is rolegate's [tls] table for a certificate and key,
// empty without them (no client-side TLS).
func rolegateTLSTable(certFile, keyFile string) string {
	if certFile == "" {
		return ""
	}
	return fmt.Sprintf("[tls]\ncert = %q\nkey = %q\n\n", certFile, keyFile)
}

// pgbouncerTLSSettings are PgBouncer's TLS lines: off on both sides without
// a certificate, and with one, TLS required of clients (with that
// certificate) and TLS to the server, unverified as with libpq's require.
func pgbouncerTLSSettings(certFile, keyFile string) string {
	if certFile == "" {
		return "client_tls_sslmode = disable\nserver_tls_sslmode = disable\n"
	}
	return fmt.Sprintf("client_tls_sslmode = require\nclient_tls_cert_file = %s\nclient_tls_key_file = %s\nserver_tls_sslmode = require\n",
		certFile, keyFile)
}

// serverLegTLS is what the server says of the session it serves: whether
// its connection, from the client or from the proxy, uses TLS, and the
// protocol version.
const serverLegTLS = "select ssl, coalesce(version, '') from pg_stat_ssl where pid = pg_backend_pid()"

// checkTLS proves, before anything is timed, that t has TLS on both legs:
// psql with t's environment (sslmode require) fails without TLS on the
// client leg, and the server's pg_stat_ssl says whether its leg has TLS. It
// returns the server leg's protocol version.
func checkTLS(ctx context.Context, env []string, t *target) (string, error) {
	out, _, err := runTool(ctx, envFor(env, t), "psql", append([]string{"-t", "-A", "-F", " "}, psqlArgs(t, serverLegTLS)...)...)
	if err != nil {
		return "", fmt.Errorf("TLS check via %s: %w%s", t.name, err, logTail(t))
	}
	ssl, version, _ := strings.Cut(strings.TrimSpace(out), " ")
	if ssl != "t" {
		return "", fmt.Errorf("TLS check via %s: the server's leg has no TLS (pg_stat_ssl: %q)", t.name, strings.TrimSpace(out))
	}
	return version, nil
}
