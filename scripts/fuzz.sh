#!/usr/bin/env bash
# Run the cargo-fuzz targets one after another, SECONDS each (default 60):
#   scripts/fuzz.sh [SECONDS] [TARGET...]        (no TARGET: every target in fuzz/Cargo.toml)
# Appends one line per target run to fuzz/runs.tsv (date, target, seconds fuzzed, execs,
# crashes) for scripts/reliability.sh to sum; full logs in fuzz/logs/, crash inputs in
# fuzz/artifacts/<target>/ (minimize with `cargo fuzz tmin TARGET FILE`, then keep the input as a
# regression test in the main crate). cargo-fuzz needs nightly flags: RUSTC_BOOTSTRAP=1 lets the
# default (stable) toolchain accept them.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECS="${1:-60}"
shift || true
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
FUZZ=(cargo fuzz)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <("${FUZZ[@]}" list)
[ -f runs.tsv ] || printf 'date\ttarget\tseconds\texecs\tcrashes\n' > runs.tsv
mkdir -p logs
# Any single allocation over 64 MiB counts as a crash: inputs are a few KiB, and nothing may
# allocate what a length field claims before checking it.
FLAGS=(-max_total_time="$SECS" -rss_limit_mb=2048 -malloc_limit_mb=64 -timeout=10)
total=0 crashes_total=0
for t in "${targets[@]}"; do
  echo "== $t (${SECS}s)"
  "${FUZZ[@]}" build "$t" >/dev/null
  mkdir -p "artifacts/$t"
  before=$(find "artifacts/$t" -type f | wc -l)
  log="logs/$t.log"
  start=$(date +%s)
  # A crash stops libFuzzer with a non-zero status; record it and go on with the next target.
  "${FUZZ[@]}" run "$t" -- "${FLAGS[@]}" >"$log" 2>&1 || true
  secs=$(( $(date +%s) - start ))
  # libFuzzer's own figures when it ran to the end ("Done N runs in S second(s)"): they leave out
  # a rebuild `cargo fuzz run` may do first; after a crash, the wall time and the last status line.
  execs=$(sed -n 's/^Done \([0-9]*\) runs in [0-9]* second.*/\1/p' "$log" | tail -n 1)
  done_secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)
  [ -z "$done_secs" ] || secs=$done_secs
  [ -n "$execs" ] || execs=$(grep -o '^#[0-9]*' "$log" | tail -n 1 | tr -d '#')
  [ -n "$execs" ] || execs=0
  crashes=$(( $(find "artifacts/$t" -type f | wc -l) - before ))
  printf '%s\t%s\t%s\t%s\t%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$t" "$secs" "$execs" "$crashes" >> runs.tsv
  echo "   ${secs}s, ${execs} execs, ${crashes} crashes  (log: fuzz/$log)"
  [ "$crashes" -eq 0 ] || grep -m 3 -E 'panicked|ERROR|SUMMARY' "$log" || true
  total=$((total + secs)); crashes_total=$((crashes_total + crashes))
done
echo "fuzzed ${#targets[@]} targets for ${total}s in total; crashes: ${crashes_total}"
