// Package admin is rolegate's operator surface: the psql admin console (SHOW,
// KILL, SET LIMIT/POLICY, RELOAD on database "rolegate", which the proxy routes
// here after authentication), and over HTTP liveness and readiness probes,
// Prometheus metrics, and a small JSON API to list sessions, roles and
// evictions, terminate a session and reload the configuration.
//
// admin reads copied snapshots (proxy.Server.Sessions and Events,
// limiter.Limiter.Snapshot), never live structures, and asks the proxy for
// kills; it takes what it needs as small interfaces and functions, so that
// cmd/rolegate wires it and tests can hand it anything.
package admin
