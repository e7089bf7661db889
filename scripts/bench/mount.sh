#!/usr/bin/env bash
# Benchmark the mybox mount against native ext4, sshfs and rclone mount.
#
#   scripts/bench/mount.sh [MYBOX_BINARY]
#
# - sequential read of a 1 GiB file (dd bs=1M), warm page cache (the file is "hydrated")
# - `find` and `ls -lR` over the rust std docs tree (~2,600 entries)
# - copying that tree into the mount vs into a native folder, and into a do-nothing FUSE mirror
#   (examples/fuse_floor.rs, same mount options as mybox): what FUSE itself costs on this machine
# - on-demand: the first read of the 1 GiB file through `mybox mount --on-demand` of a fresh box
#   paired with a daemon serving it on 127.0.0.1 (content fetched from the peer when read)
# Each measurement: one warm-up run, then RUNS timed runs; the median is reported.
# Needs root (mybox mounts with mount(2); sshfs goes through a private sshd on 127.0.0.1).
# Env: RUNS (default 3), BIG_MB (default 1024), SSH_PORT (default 2232), KEEP=1 keeps $WORK,
#      BENCH_DIR (default /tmp): where the stores, mounts and native copies live.
set -euo pipefail

here="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${1:-}"
if [[ -z "$bin" ]]; then
    (cd "$here" && cargo build --quiet --release --bin mybox)
    bin="$here/target/release/mybox"
fi
bin="$(realpath "$bin")"
(cd "$here" && cargo build --quiet --release --example fuse_floor)
floor_bin="$here/target/release/examples/fuse_floor"
RUNS="${RUNS:-3}"
BIG_MB="${BIG_MB:-1024}"
SSH_PORT="${SSH_PORT:-2232}"
TREE_SRC="$(rustc --print sysroot)/share/doc/rust/html/std"

for t in sshfs rclone fusermount3; do
    command -v "$t" >/dev/null || apt-get install -y sshfs rclone fuse3 >/dev/null
done

WORK="$(mktemp -d "${BENCH_DIR:-/tmp}/mybox-bench.XXXXXX")"
STORE="$WORK/store"
SSH_DIR="$WORK/ssh"
declare -A MNT=([mybox]="$WORK/mnt-mybox" [sshfs]="$WORK/mnt-sshfs" [rclone]="$WORK/mnt-rclone")
OD_MNT="$WORK/mnt-ondemand"
FLOOR_MNT="$WORK/mnt-floor"
FLOOR_BACK="$WORK/floor-back"
OD_PEER="$WORK/od-peer"

cleanup() {
    cd /
    for k in mybox sshfs rclone; do
        m="${MNT[$k]}"
        if mountpoint -q "$m" 2>/dev/null; then
            if [[ $k == mybox ]]; then "$bin" umount "$m" || umount -l "$m"; else fusermount3 -u "$m" || fusermount3 -uz "$m"; fi
        fi
    done
    if mountpoint -q "$OD_MNT" 2>/dev/null; then "$bin" umount "$OD_MNT" || umount -l "$OD_MNT"; fi
    if mountpoint -q "$FLOOR_MNT" 2>/dev/null; then umount "$FLOOR_MNT" || umount -l "$FLOOR_MNT"; fi
    sleep 0.5
    # Only the processes this script started (matched by their unique mount points and boxes).
    for p in $(pgrep -f "mount ${MNT[mybox]}\$"; pgrep -f "mount $STORE ${MNT[rclone]}"; pgrep -f "box $OD_PEER daemon"; pgrep -f "mount $OD_MNT --"); do
        kill "$p" 2>/dev/null || true
    done
    [[ -f "$SSH_DIR/sshd.pid" ]] && kill "$(cat "$SSH_DIR/sshd.pid")" 2>/dev/null || true
    [[ -n "${KEEP:-}" ]] || rm -rf "$WORK"
}
trap cleanup EXIT

log() { echo "[bench] $*" >&2; }

# ----- data -----------------------------------------------------------------------------------
"$bin" init "$STORE" >/dev/null 2>&1
log "writing ${BIG_MB} MiB file and copying the std docs tree"
head -c "$((BIG_MB << 20))" /dev/urandom >"$STORE/big.bin"
cp -r "$TREE_SRC" "$STORE/tree"
NATIVE_COPY="$WORK/native-copy"
mkdir -p "$NATIVE_COPY" "${MNT[@]}"

# ----- mounts ---------------------------------------------------------------------------------
# Each mount is (re)started by a small script, so a "fresh mount" run can remount first: the
# FUSE side then starts with empty attribute, entry and directory caches (the page cache of the
# store is left alone: dropping it would disturb everyone else on this machine).
cat >"$WORK/up-mybox.sh" <<UP
#!/bin/bash
if mountpoint -q "${MNT[mybox]}"; then
    "$bin" umount "${MNT[mybox]}"
    for _ in \$(seq 100); do pgrep -f "mount ${MNT[mybox]}\$" >/dev/null || break; sleep 0.05; done
fi
setsid "$bin" --box "$STORE" mount "${MNT[mybox]}" >>"$WORK/mybox.log" 2>&1 < /dev/null &
for _ in \$(seq 200); do mountpoint -q "${MNT[mybox]}" && exit 0; sleep 0.05; done; exit 1
UP
cat >"$WORK/up-sshfs.sh" <<UP
#!/bin/bash
mountpoint -q "${MNT[sshfs]}" && fusermount3 -u "${MNT[sshfs]}"
sshfs "root@127.0.0.1:$STORE" "${MNT[sshfs]}" -p "$SSH_PORT" \\
    -o IdentityFile="$SSH_DIR/key",StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,LogLevel=ERROR
UP
cat >"$WORK/up-rclone.sh" <<UP
#!/bin/bash
if mountpoint -q "${MNT[rclone]}"; then
    fusermount3 -u "${MNT[rclone]}"
    for _ in \$(seq 100); do pgrep -f "rclone.*${MNT[rclone]}" >/dev/null || break; sleep 0.05; done
fi
setsid rclone --config "$WORK/rclone.conf" mount "$STORE" "${MNT[rclone]}" --vfs-cache-mode off >>"$WORK/rclone.log" 2>&1 < /dev/null &
for _ in \$(seq 200); do mountpoint -q "${MNT[rclone]}" && exit 0; sleep 0.05; done; exit 1
UP
chmod +x "$WORK"/up-*.sh
"$WORK/up-mybox.sh"

mkdir -p "$SSH_DIR" /run/sshd && chmod 700 "$SSH_DIR"
ssh-keygen -q -t ed25519 -N '' -f "$SSH_DIR/host" && ssh-keygen -q -t ed25519 -N '' -f "$SSH_DIR/key"
cp "$SSH_DIR/key.pub" "$SSH_DIR/authorized_keys" && chmod 600 "$SSH_DIR/authorized_keys"
cat >"$SSH_DIR/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $SSH_DIR/host
PidFile $SSH_DIR/sshd.pid
AuthorizedKeysFile $SSH_DIR/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
LogLevel ERROR
EOF
/usr/sbin/sshd -f "$SSH_DIR/sshd_config" -E "$SSH_DIR/sshd.log"
for _ in $(seq 50); do [[ -f "$SSH_DIR/sshd.pid" ]] && break; sleep 0.1; done
"$WORK/up-sshfs.sh"
: >"$WORK/rclone.conf"
"$WORK/up-rclone.sh"

for k in mybox sshfs rclone; do
    for _ in $(seq 100); do mountpoint -q "${MNT[$k]}" && break; sleep 0.1; done
    mountpoint -q "${MNT[$k]}" || { log "$k did not mount"; exit 1; }
done
log "mounted: ${MNT[*]}"

# ----- measuring ------------------------------------------------------------------------------
# median of RUNS timed runs after one warm-up; $2 is run before each run, untimed.
measure() {
    local cmd="$1" prep="${2:-true}" times=() t0 t1
    bash -c "$prep" && bash -c "$cmd" >/dev/null 2>&1
    for _ in $(seq "$RUNS"); do
        bash -c "$prep"
        t0=$(date +%s.%N)
        bash -c "$cmd" >/dev/null 2>&1
        t1=$(date +%s.%N)
        times+=("$(echo "$t1 - $t0" | bc -l)")
    done
    printf '%s\n' "${times[@]}" | sort -g | awk '{a[NR]=$1} END {printf "%.3f", a[int((NR+1)/2)]}'
}

declare -A R
for k in native mybox sshfs rclone; do
    base="$STORE"
    [[ $k == native ]] || base="${MNT[$k]}"
    cmp "$STORE/big.bin" "$base/big.bin"
    log "$k: dd"
    R[$k,dd]=$(measure "dd if='$base/big.bin' of=/dev/null bs=1M")
    log "$k: find"
    R[$k,find]=$(measure "find '$base/tree' | wc -l")
    log "$k: ls -lR"
    R[$k,ls]=$(measure "ls -lR '$base/tree'")
    if [[ $k != native ]]; then
        log "$k: find, ls -lR on a fresh mount"
        R[$k,findc]=$(measure "find '$base/tree' | wc -l" "'$WORK/up-$k.sh'")
        R[$k,lsc]=$(measure "ls -lR '$base/tree'" "'$WORK/up-$k.sh'")
    fi
done
# The copies alternate native / do-nothing FUSE mirror / mybox run by run, so a burst of load
# from elsewhere on the machine hits every side of the ratios alike (one warm-up each, then
# RUNS timed runs each).
mkdir -p "$FLOOR_MNT" "$FLOOR_BACK"
setsid "$floor_bin" "$FLOOR_BACK" "$FLOOR_MNT" >>"$WORK/floor.log" 2>&1 </dev/null &
for _ in $(seq 200); do mountpoint -q "$FLOOR_MNT" && break; sleep 0.05; done
mountpoint -q "$FLOOR_MNT" || { log "fuse_floor did not mount: $(cat "$WORK/floor.log")"; exit 1; }
log "native, floor, mybox: cp -r tree (alternating)"
declare -A CP_T
for i in $(seq 0 "$RUNS"); do
    for k in native floor mybox; do
        case $k in
            native) dest="$NATIVE_COPY/copy" ;;
            floor) dest="$FLOOR_MNT/copy" ;;
            mybox) dest="${MNT[mybox]}/copy" ;;
        esac
        rm -rf "$dest"
        t0=$(date +%s.%N)
        cp -r "$TREE_SRC" "$dest"
        t1=$(date +%s.%N)
        [[ $i -eq 0 ]] || CP_T[$k]+=" $(echo "$t1 - $t0" | bc -l)"
    done
done
umount "$FLOOR_MNT"
for k in native floor mybox; do
    R[$k,cp]=$(printf '%s\n' ${CP_T[$k]} | sort -g | awk '{a[NR]=$1} END {printf "%.3f", a[int((NR+1)/2)]}')
done
[[ $(find "${MNT[mybox]}/copy" | wc -l) -eq $(find "$TREE_SRC" | wc -l) ]] || { log "copy into mybox incomplete"; exit 1; }

# ----- on-demand first read -------------------------------------------------------------------
# A peer box holding only the big file (a hard link: no extra space) served by a daemon, and for
# each run a fresh box mounted with --on-demand: its first read of the file fetches it over
# TLS on loopback, block by block as dd reads. Timed from the open to the last byte (dd), after
# the placeholder is listed.
mkdir -p "$OD_MNT" "$OD_PEER"
"$bin" init "$OD_PEER" >/dev/null 2>&1
ln "$STORE/big.bin" "$OD_PEER/big.bin"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
od_times=()
for i in $(seq "$RUNS"); do
    a="$WORK/od-a$i"
    "$bin" init "$a" >/dev/null 2>&1
    pa=$(free_port) pb=$(free_port)
    "$bin" --box "$a" peer add "$("$bin" --box "$OD_PEER" id)" "127.0.0.1:$pb" >/dev/null 2>&1
    "$bin" --box "$OD_PEER" peer add "$("$bin" --box "$a" id)" "127.0.0.1:$pa" >/dev/null 2>&1
    setsid "$bin" --box "$OD_PEER" daemon --listen "127.0.0.1:$pb" >>"$WORK/od-peer.log" 2>&1 </dev/null &
    setsid "$bin" --box "$a" mount "$OD_MNT" --listen "127.0.0.1:$pa" --on-demand >>"$WORK/od-mount.log" 2>&1 </dev/null &
    log "on-demand run $i: waiting for the placeholder"
    for _ in $(seq 1200); do
        [[ $(stat -c %s "$OD_MNT/big.bin" 2>/dev/null) == "$((BIG_MB << 20))" ]] && break
        sleep 0.1
    done
    [[ ! -e "$a/big.bin" ]] || { log "on-demand: the file was pulled in the background"; exit 1; }
    t0=$(date +%s.%N)
    dd if="$OD_MNT/big.bin" of=/dev/null bs=1M 2>/dev/null || { log "on-demand read failed"; exit 1; }
    t1=$(date +%s.%N)
    od_times+=("$(echo "$t1 - $t0" | bc -l)")
    log "on-demand run $i: ${od_times[-1]} s"
    # The file is installed in the store right after its last block arrived (in the background).
    for _ in $(seq 600); do [[ -f "$a/big.bin" ]] && break; sleep 0.05; done
    cmp "$STORE/big.bin" "$a/big.bin"
    "$bin" umount "$OD_MNT"
    for p in $(pgrep -f "box $OD_PEER daemon"); do kill "$p"; done
    for _ in $(seq 100); do pgrep -f "mount $OD_MNT --|box $OD_PEER daemon" >/dev/null || break; sleep 0.1; done
    "$bin" --box "$OD_PEER" peer remove "$("$bin" --box "$a" id)" >/dev/null 2>&1 || true
    rm -rf "$a"
done
R[ondemand,dd]=$(printf '%s\n' "${od_times[@]}" | sort -g | awk '{a[NR]=$1} END {printf "%.3f", a[int((NR+1)/2)]}')

mbps() { echo "$BIG_MB / $1" | bc -l | awk '{printf "%.0f", $1}'; }
pct() { echo "100 * $1 / $2" | bc -l | awk '{printf "%.0f%%", $1}'; }
ratio() { echo "$1 / $2" | bc -l | awk '{printf "%.1fx", $1}'; }

echo
echo "mybox mount benchmark ($(date -u +%Y-%m-%dT%H:%MZ), $(uname -r), $(nproc) cores, median of $RUNS warm runs; passthrough: $(grep -q 'passthrough true' "$WORK/mybox.log" && echo on || echo off))"
echo
echo "| test | native | mybox | sshfs | rclone |"
echo "|---|---|---|---|---|"
echo "| read ${BIG_MB} MiB (s, MB/s) | ${R[native,dd]} ($(mbps "${R[native,dd]}")) | ${R[mybox,dd]} ($(mbps "${R[mybox,dd]}")) | ${R[sshfs,dd]} ($(mbps "${R[sshfs,dd]}")) | ${R[rclone,dd]} ($(mbps "${R[rclone,dd]}")) |"
echo "| first read ${BIG_MB} MiB, on-demand from a peer on loopback (s, MB/s) | | ${R[ondemand,dd]} ($(mbps "${R[ondemand,dd]}")) | | |"
echo "| find tree, warm (s) | ${R[native,find]} | ${R[mybox,find]} | ${R[sshfs,find]} | ${R[rclone,find]} |"
echo "| ls -lR tree, warm (s) | ${R[native,ls]} | ${R[mybox,ls]} | ${R[sshfs,ls]} | ${R[rclone,ls]} |"
echo "| find tree, fresh mount (s) | | ${R[mybox,findc]} | ${R[sshfs,findc]} | ${R[rclone,findc]} |"
echo "| ls -lR tree, fresh mount (s) | | ${R[mybox,lsc]} | ${R[sshfs,lsc]} | ${R[rclone,lsc]} |"
echo "| cp -r tree in (s) | ${R[native,cp]} | ${R[mybox,cp]} | | |"
echo "| cp -r tree into a do-nothing FUSE mirror, same mount options (s) | | ${R[floor,cp]} | | |"
echo
echo "targets: read >= 90% of native: $(pct "${R[native,dd]}" "${R[mybox,dd]}");" \
    "find vs sshfs: warm $(ratio "${R[sshfs,find]}" "${R[mybox,find]}"), fresh $(ratio "${R[sshfs,findc]}" "${R[mybox,findc]}");" \
    "ls -lR vs sshfs: warm $(ratio "${R[sshfs,ls]}" "${R[mybox,ls]}"), fresh $(ratio "${R[sshfs,lsc]}" "${R[mybox,lsc]}");" \
    "copy <= 2x native: $(ratio "${R[mybox,cp]}" "${R[native,cp]}") (do-nothing FUSE mirror: $(ratio "${R[floor,cp]}" "${R[native,cp]}"));" \
    "on-demand first read >= 500 MB/s: $(mbps "${R[ondemand,dd]}") MB/s"
