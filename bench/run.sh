#!/usr/bin/env bash
# Runs the benchmark (see bench/README.md): builds rolegate into a temp dir and
# runs bench/main.go against it. Arguments go to the benchmark, e.g.
#   bench/run.sh -rounds 5 -duration 20s
# `make bench` calls this. It takes about fifteen minutes and is never run in CI;
#   bench/run.sh -only limits
# runs only the newest-wins test (issue 4), in 1–2 minutes;
#   bench/run.sh -only storm [-storm-logins 5000] [-storm-limit 5]
# runs only the login storm (issue 11);
#   bench/run.sh -only cluster-storm [-cluster-instances 3] [-cluster-logins 3000] [-cluster-limit 5]
# runs only the storm through several instances (issue 12).
#
# ROLEGATE_REF=HEAD (or any commit) builds rolegate from a clean export of that
# commit (git archive) instead of the working tree, so that uncommitted changes
# in the tree are not measured; the benchmark itself is always built from the
# working tree. The control role's sql/setup.sql comes from the same commit.
set -euo pipefail

cd "$(dirname "$0")/.."
GO=${GO:-go}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/rolegate-bench-bin-XXXXXX")
trap 'rm -rf "$tmp"' EXIT

if [[ -n "${ROLEGATE_REF:-}" ]]; then
	# The version stamp says in the report what was measured, as `make build` does.
	version=$(git rev-parse --short "$ROLEGATE_REF")
	mkdir "$tmp/src"
	git archive "$ROLEGATE_REF" | tar -x -C "$tmp/src"
	(cd "$tmp/src" && "$GO" build -ldflags "-X main.version=$version" -o "$tmp/rolegate" ./cmd/rolegate)
	# The control role's set-up script of the same commit, when it has one.
	if [[ -f "$tmp/src/sql/setup.sql" ]]; then
		set -- -setup-sql "$tmp/src/sql/setup.sql" "$@"
	fi
else
	version=$(git describe --tags --always --dirty 2>/dev/null || echo dev)
	"$GO" build -ldflags "-X main.version=$version" -o "$tmp/rolegate" ./cmd/rolegate
fi
"$GO" build -o "$tmp/bench" ./bench
# Not exec: the trap must still remove the temp dir. A Ctrl-C reaches the
# benchmark too, which stops what it started before it exits.
"$tmp/bench" -rolegate "$tmp/rolegate" "$@"
