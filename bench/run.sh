#!/usr/bin/env bash
# Runs the benchmark (see bench/README.md): builds rolegate into a temp dir and
# runs bench/main.go against it. Arguments go to the benchmark, e.g.
#   bench/run.sh -rounds 5 -duration 20s
# `make bench` calls this. It takes a few minutes and is never run in CI.
set -euo pipefail

cd "$(dirname "$0")/.."
GO=${GO:-go}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/rolegate-bench-bin-XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# The version stamp says in the report what was measured, as `make build` does.
version=$(git describe --tags --always --dirty 2>/dev/null || echo dev)
"$GO" build -ldflags "-X main.version=$version" -o "$tmp/rolegate" ./cmd/rolegate
"$GO" build -o "$tmp/bench" ./bench
# Not exec: the trap must still remove the temp dir. A Ctrl-C reaches the
# benchmark too, which stops what it started before it exits.
"$tmp/bench" -rolegate "$tmp/rolegate" "$@"
