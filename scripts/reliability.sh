#!/usr/bin/env bash
# The reliability table (issue 6): fault scenarios (scripts/faults.sh), attack tests
# (tests/attacks.rs, each prints "bad inputs tried: N"), fuzzing totals (fuzz/runs.tsv, written by
# scripts/fuzz.sh), in one table. Data lost must be 0.
#   scripts/reliability.sh           quick faults (3 SIGKILLs, one of each other fault)
#   scripts/reliability.sh --full    the long faults (20 SIGKILLs, 5 cuts, ...)
# Exits non-zero if a fault scenario or an attack test failed, or data was lost.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=--quick
[[ "${1:-}" == "--full" ]] && mode=
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rc=0

scripts/faults.sh $mode >"$tmp/faults" 2>&1 || rc=1
cat "$tmp/faults" >&2
read -r scen runs faults survived lost < <(sed -n 's/^faults: scenarios \([0-9]*\), runs \([0-9]*\), faults injected \([0-9]*\), survived \([0-9]*\), data lost \([0-9]*\)$/\1 \2 \3 \4 \5/p' "$tmp/faults")
scen=${scen:-0} runs=${runs:-0} faults=${faults:-0} survived=${survived:-0} lost=${lost:-0}

if [[ -f tests/attacks.rs ]]; then
  cargo test --release --test attacks -- --nocapture --test-threads=2 >"$tmp/attacks" 2>&1 || rc=1
  bad=$(grep -Eo 'bad inputs tried: [0-9]+' "$tmp/attacks" | awk '{s += $4} END {print s + 0}')
  att_pass=$(grep -Eo '^test result: .* ([0-9]+) passed' "$tmp/attacks" | grep -Eo '[0-9]+ passed' | awk '{s += $1} END {print s + 0}')
  att_fail=$(grep -Eo '^test result: .* ([0-9]+) failed' "$tmp/attacks" | grep -Eo '[0-9]+ failed' | awk '{s += $1} END {print s + 0}')
  attacks="$att_pass passed, $att_fail failed"
  [[ $att_fail == 0 ]] || grep -E '^test .* FAILED' "$tmp/attacks" >&2
else
  bad="n/a" attacks="not present (tests/attacks.rs missing)"
fi

if [[ -f fuzz/runs.tsv ]]; then
  read -r fsecs fexecs fcrash ftargets < <(awk -F'\t' 'NR > 1 { s += $3; e += $4; c += $5; t[$2] = 1 }
    END { n = 0; for (k in t) n++; print s + 0, e + 0, c + 0, n }' fuzz/runs.tsv)
  fuzz="$(awk -v s="$fsecs" 'BEGIN { printf "%.2f h", s / 3600 }') ($fsecs s, $ftargets targets, $fexecs execs)"
else
  fuzz="n/a (no fuzz/runs.tsv: run scripts/fuzz.sh)" fcrash="n/a"
fi

[[ "$lost" == 0 ]] || rc=1
row() { printf '%-22s %s\n' "$1" "$2"; }
echo
row "reliability" "(faults ${mode:-full}; $(date -u +%Y-%m-%dT%H:%M:%SZ))"
row "scenarios run" "$scen fault scenarios ($runs runs)"
row "faults survived" "$survived of $faults injected"
row "attack tests" "$attacks"
row "bad inputs tried" "$bad"
row "fuzz time" "$fuzz"
row "fuzz crashes" "$fcrash"
row "data lost" "$lost"
exit $rc
