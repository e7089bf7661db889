#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 60): scripts/fuzz.sh [SECONDS]
# Uses cargo-fuzz (installed if missing). cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP lets
# the stable toolchain accept them. Crashes land in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECS="${1:-60}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
total=0
for t in $(cargo fuzz list); do
  echo "== $t (${SECS}s)"
  cargo fuzz run "$t" -- -max_total_time="$SECS" -rss_limit_mb=2048 2>&1 | tail -n 3
  total=$((total + SECS))
done
echo "fuzzed $(cargo fuzz list | wc -l) targets for ${total}s in total; crashes: $(find artifacts -type f 2>/dev/null | wc -l)"
