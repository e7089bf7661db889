#!/usr/bin/env bash
# The project's test command (the README's second line): unit, property and integration tests
# against real components (TLS sockets on loopback, SQLite, kernel FUSE mounts, namespaces).
# Ends with one summary line "tests: N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Integration tests spawn real servers; 4 test threads keep 2 shared cores busy, not drowned.
cargo test --locked --lib --bins --tests -- --test-threads=4 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '^test result: .* ([0-9]+) failed' "$log" | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
echo
echo "tests: $passed passed, $failed failed"
exit "$status"
