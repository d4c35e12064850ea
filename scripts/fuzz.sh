#!/bin/sh
# Runs each fuzz target given as pkg:Func for $FUZZTIME (go test -fuzz takes
# one target at a time). A failing input lands in the package's testdata/fuzz
# and from then on runs in every `go test`.
#
# Go's fuzz coordinator can fail a target on a busy machine with a bare
# "context deadline exceeded" and no failing input (its workers did not answer
# in time): that run alone is tried once more. A failure with an input is
# never retried.
set -e
GO=${GO:-go}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for t in "$@"; do
	pkg=${t%%:*}
	fn=${t#*:}
	for try in 1 2; do
		echo "fuzz $fn ($FUZZTIME)"
		if $GO test -run '^$' -fuzz "^$fn\$" -fuzztime "$FUZZTIME" "./$pkg" >"$out" 2>&1; then
			cat "$out"
			break
		fi
		cat "$out"
		if [ "$try" = 1 ] && grep -q 'context deadline exceeded' "$out" && ! grep -q 'Failing input written to' "$out"; then
			echo "fuzz $fn: the fuzz coordinator timed out without a failing input; trying once more"
			continue
		fi
		exit 1
	done
done
