#!/bin/sh
# Long soak of the seeded randomized convergence test: many rounds of random operations on two
# real daemons (some while apart, some ending in kill -9), checked for identical trees and no lost
# write after every round.
#
#   scripts/soak.sh [OPS] [RUNS]      (defaults: 3000 operations, 5 runs, fresh seed each)
#   MYBOX_SEED=N scripts/soak.sh      replays one seed
set -eu
cd "$(dirname "$0")/.."
OPS="${1:-3000}"
RUNS="${2:-5}"
cargo build --tests --quiet
i=1
while [ "$i" -le "$RUNS" ]; do
    echo "soak run $i/$RUNS: $OPS operations"
    out="$(mktemp)"
    if ! MYBOX_SOAK_OPS="$OPS" cargo test --quiet --test sync_random -- --nocapture >"$out" 2>&1; then
        cat "$out" >&2
        rm -f "$out"
        echo "soak run $i failed (the seed is printed above; replay with MYBOX_SEED)" >&2
        exit 1
    fi
    grep -E "MYBOX_SEED|converged" "$out" || true
    rm -f "$out"
    i=$((i + 1))
done
