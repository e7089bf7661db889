#!/usr/bin/env bash
# Fault scenarios against real daemons and mounts (tests/faults.rs): SIGKILL of either daemon
# during a large sync, the network cut mid-transfer (iptables in the daemons' own network
# namespaces) and the peer restarted mid-transfer, a full disk on the receiver, a block silently
# corrupted on disk, the FUSE process killed with open files. Each scenario ends by checking that
# the boxes converged and no edit was lost. Prints one line per scenario and a total.
#
#   scripts/faults.sh            the long version (20 SIGKILLs, 5 network cuts, 3 disk-full cycles, ...)
#   scripts/faults.sh --quick    the CI version (3 SIGKILLs, 1 of each other fault)
# MYBOX_FAULT_SEED=N replays a run (each scenario prints the seed it used on stderr).
# Namespaces, loop devices, tmpfs and FUSE need root; as non-root those scenarios skip.
set -uo pipefail
cd "$(dirname "$0")/.."
full=1
[[ "${1:-}" == "--quick" ]] && full=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT
threads=1
[[ $full == 0 ]] && threads=3
MYBOX_FAULTS_FULL=$full cargo test --test faults -- --nocapture --test-threads=$threads >"$log" 2>&1
status=$?
printf '%-18s %6s %8s %9s %10s\n' scenario runs faults survived "data lost"
awk -F'\t' '{ sub(/^.*fault-scenario/, "fault-scenario") } $1 == "fault-scenario" {
    printf "%-18s %6d %8d %9d %10d\n", $2, $3, $4, $5, $6
    n++; r += $3; f += $4; s += $5; l += $6
  }
  END { printf "faults: scenarios %d, runs %d, faults injected %d, survived %d, data lost %d\n", n, r, f, s, l }' "$log"
if [[ $status != 0 ]]; then
  echo "faults: FAILED (cargo test exit $status); failing tests:"
  grep -E '^test .* FAILED|panicked at' "$log" | sed 's/^/  /'
  grep -A30 -- '---- ' "$log" | head -80
fi
grep -E '^skipping' "$log" | sort -u | sed 's/^/note: /'
exit $status
