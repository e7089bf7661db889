#!/usr/bin/env bash
# Run pjdfstest (the Rust rewrite, `cargo install pjdfstest`) against a mybox mount of a fresh
# temporary box, print the pass/fail counts, and always unmount.
#
# Needs root (pjdfstest switches users; mybox mounts with mount(2) as root) and /dev/fuse.
# Usage: scripts/pjdfstest.sh [MYBOX_BINARY] [-- PJDFSTEST_ARGS...]
# Env:   PJDFSTEST_LOG=path  keep the full pjdfstest output there (default: a temp file)
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-}"
if [[ -z "$bin" || "$bin" == "--" ]]; then
    (cd "$here" && cargo build --quiet --bin mybox)
    bin="$here/target/debug/mybox"
else
    shift
fi
bin="$(realpath "$bin")"
[[ "${1:-}" == "--" ]] && shift

if [[ $(id -u) -ne 0 ]]; then
    echo "pjdfstest.sh: must run as root" >&2
    exit 2
fi
if ! command -v pjdfstest >/dev/null; then
    echo "pjdfstest.sh: installing pjdfstest" >&2
    cargo install --quiet pjdfstest
fi
PJDFSTEST="$(command -v pjdfstest || echo "$HOME/.cargo/bin/pjdfstest")"

# pjdfstest switches to these users (nobody and tests, each with a group of the same name).
nobody_group="$(id -gn nobody)"
getent group tests >/dev/null || groupadd tests
id tests >/dev/null 2>&1 || useradd -M -N -g tests -d / -s /usr/sbin/nologin tests

work="$(mktemp -d /tmp/mybox-pjdfstest.XXXXXX)"
log="${PJDFSTEST_LOG:-$work/pjdfstest.log}"
mnt="$work/mnt"
mkdir -p "$mnt"
chmod 755 "$work"
"$bin" init "$work/store" >/dev/null 2>&1
"$bin" --box "$work/store" mount "$mnt" >"$work/mount.log" 2>&1 &
mpid=$!

cleanup() {
    cd /
    "$bin" umount "$mnt" >/dev/null 2>&1 || umount -l "$mnt" 2>/dev/null || true
    # Wait for the mount process to finish unmounting, then make sure it is gone.
    for _ in $(seq 50); do kill -0 "$mpid" 2>/dev/null || break; sleep 0.1; done
    kill "$mpid" 2>/dev/null || true
    if [[ -z "${KEEP:-}" ]]; then rm -rf "$work/store" "$mnt"; fi
    if [[ -n "${secondary:-}" ]]; then rm -rf "$secondary"; fi
}
trap cleanup EXIT

for _ in $(seq 100); do
    grep -q " $mnt fuse" /proc/mounts && break
    kill -0 "$mpid" 2>/dev/null || { cat "$work/mount.log" >&2; exit 1; }
    sleep 0.1
done
grep -q " $mnt fuse" /proc/mounts || { echo "mount did not come up" >&2; cat "$work/mount.log" >&2; exit 1; }

cat >"$work/pjdfstest.toml" <<TOML
[features]
utime_now = {}
utimensat = {}
rename_ctime = {}
posix_fallocate = {}

[settings]
naptime = 0.001
allow_remount = ${ALLOW_REMOUNT:-false}

[dummy_auth]
entries = [
  ["nobody", "$nobody_group"],
  ["tests", "tests"],
]
TOML

# pjdfstest runs its cases in the directory it is given, which must be writable by the dummy
# users for the permission tests.
chmod 777 "$mnt"
# A directory on another file system (tmpfs) for the EXDEV cases.
secondary="$(mktemp -d /dev/shm/mybox-pjdfstest.XXXXXX)"
chmod 777 "$secondary"
set +e
(cd "$mnt" && timeout 900 "$PJDFSTEST" -c "$work/pjdfstest.toml" -p "$mnt" -s "$secondary" "$@") >"$log" 2>&1
rc=$?
set -e

# The mount must still be alive and answering after the run.
if ! stat "$mnt" >/dev/null 2>&1; then
    echo "pjdfstest.sh: mount is wedged or gone after the run" >&2
    rc=3
fi
summary="$(grep -E '^Summary:' "$log" | tail -n 1)"
echo "pjdfstest: ${summary:-no summary (run aborted?)} (pjdfstest exit $rc; log: $log)"
grep -E '^[a-z_:]+ +FAILED$' "$log" | awk '{print "  FAILED " $1}' || true
[[ -n "$summary" ]] || rc=5
grep -qi 'panick' "$work/mount.log" && { echo "mount process panicked" >&2; rc=4; }
exit $rc
