#!/usr/bin/env bash
# Load on two real daemons (release build) on loopback, printed as one table:
#   - N small files (default 100,000) generated on box a; initial sync to box b (time);
#   - `index longlist` and cached `hash checkall` asked of the peer and of the box itself (time,
#     best and worst of 3); targets: longlist < 1 s, cached checkall < 2 s;
#   - peak (VmHWM) and steady (VmRSS when idle) memory of both daemons; target < 100 MB;
#   - 50 query clients at once while a sync runs: all answered, none refused (the documented
#     limits are 128 connections, 64 per device, 32 pending handshakes: src/server.rs);
#   - 200 idle and 20 slow (1 byte/s) connections held against box a while its real peer is
#     served: a change still crosses, a query still gets an answer.
# Usage: scripts/load.sh [FILES]. Needs python3 (file generation, the connection flood).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
cargo build --release --quiet
BIN=$PWD/target/release/mybox
work=$(mktemp -d /tmp/mybox-load.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }
mb() { awk '/^'"$2"':/ {printf "%.0f", $2/1024}' "/proc/$1/status"; }

ida=$("$BIN" init "$work/a" 2>/dev/null)
idb=$("$BIN" init "$work/b" 2>/dev/null)
pa=$(port); pb=$(port)
"$BIN" --box "$work/a" peer add "$idb" "127.0.0.1:$pb" >/dev/null 2>&1
"$BIN" --box "$work/b" peer add "$ida" "127.0.0.1:$pa" >/dev/null 2>&1

echo "generating $N files..." >&2
python3 - "$work/a" "$N" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, f"d{i // 1000:03d}")
    if i % 1000 == 0:
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:06d}.txt"), "wb") as f:
        f.write((f"file {i} " * (1 + i % 97)).encode())
PY

start_daemon() { # box port -> pid
  "$BIN" --box "$1" daemon --listen "127.0.0.1:$2" --rescan-interval 60 >"$1.out" 2>"$1.err" &
  local pid=$!
  for _ in $(seq 600); do grep -q ' serving ' "$1.out" 2>/dev/null && break; sleep 0.1; done
  echo "$pid"
}
count_b() { find "$work/b" -path "$work/b/.mybox" -prune -o -type f -print | wc -l; }
wait_files() { # want timeout
  local end=$(( $(date +%s) + $2 ))
  while [[ $(count_b) -lt $1 ]]; do
    [[ $(date +%s) -gt $end ]] && { echo "timeout waiting for $1 files on b" >&2; return 1; }
    sleep 0.5
  done
}

t0=$(now)
A=$(start_daemon "$work/a" "$pa"); pids+=("$A")
ta=$(now)
B=$(start_daemon "$work/b" "$pb"); pids+=("$B")
wait_files "$N" 1800
t1=$(now)
scan_a=$(secs "$t0" "$ta"); sync_b=$(secs "$ta" "$t1")

timed3() { # label cmd... -> "best worst" seconds; fails loudly if the command fails
  local best=999 worst=0 t s e
  for _ in 1 2 3; do
    s=$(now); "$@" >/dev/null || { echo "FAILED: $*" >&2; return 1; }; e=$(now)
    t=$(secs "$s" "$e")
    best=$(python3 -c "print(min($best,$t))"); worst=$(python3 -c "print(max($worst,$t))")
  done
  echo "$best / $worst"
}
sleep 3 # let b finish indexing what it received
# Memory after the initial sync, before any query: the sync engine's share.
rss_sync_a="$(mb "$A" VmHWM) / $(mb "$A" VmRSS)"; rss_sync_b="$(mb "$B" VmHWM) / $(mb "$B" VmRSS)"
ll_peer=$(timed3 "$BIN" --box "$work/b" index longlist)
ll_local=$(timed3 "$BIN" --box "$work/a" index longlist --local)
ca_peer=$(timed3 "$BIN" --box "$work/b" hash checkall)
ca_local=$(timed3 "$BIN" --box "$work/a" hash checkall --local)
q1_a="$(mb "$A" VmHWM) / $(mb "$A" VmRSS)"
n_ll=$("$BIN" --box "$work/b" index longlist --json | python3 -c 'import json,sys; print(sum(1 for e in json.load(sys.stdin) if e["kind"]=="file"))')

# 50 clients at once while a sync runs (a new batch of 5,000 files and a 256 MiB file).
python3 - "$work/a" <<'PY'
import os, sys
root = sys.argv[1]
os.makedirs(os.path.join(root, "batch2"), exist_ok=True)
for i in range(5000):
    with open(os.path.join(root, "batch2", f"g{i}.txt"), "w") as f:
        f.write(f"batch2 {i}\n")
with open(os.path.join(root, "batch2", "big.bin"), "wb") as f:
    for _ in range(256):
        f.write(os.urandom(1 << 20))
PY
sleep 0.5
mkdir -p "$work/q"
s=$(now)
for i in $(seq 50); do
  case $((i % 3)) in
    0) args=(index longlist) ;;
    1) args=(hash checkall) ;;
    *) args=(index regex '^d00[0-4]/') ;;
  esac
  ( rc=0; "$BIN" --box "$work/b" "${args[@]}" >"$work/q/$i.out" 2>"$work/q/$i.err" || rc=$?; echo $rc >"$work/q/$i.rc" ) &
done
wait_q() { while [[ $(ls "$work/q" | grep -c '\.rc$') -lt 50 ]]; do sleep 0.1; done; }
wait_q
e=$(now)
q_time=$(secs "$s" "$e")
q_ok=$(grep -lx 0 "$work"/q/*.rc | wc -l)
# A client refused by the server's limit of 32 pending handshakes (src/server.rs: the oldest
# pending one is dropped) sees the connection closed during the handshake.
q_hs=$(cat "$work"/q/*.err | grep -c 'closed the connection during the handshake' || true)
q_other=$(( 50 - q_ok - q_hs ))
wait_files $((N + 5001)) 900
peak_a=$(mb "$A" VmHWM); peak_b=$(mb "$B" VmHWM)
sleep 10
steady_a=$(mb "$A" VmRSS); steady_b=$(mb "$B" VmRSS)

# Idle and slow connections held against a, while b (its real peer) keeps being served.
cat >"$work/flood.py" <<'PY'
import socket, sys, time, threading
port, idle, slow, hold = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
socks, closed = [], [0]
for _ in range(idle):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5); socks.append(s)
    except OSError:
        closed[0] += 1
def dribble():
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        end = time.time() + hold
        while time.time() < end:
            s.send(b"\x16"); time.sleep(1)
    except OSError:
        closed[0] += 1
ts = [threading.Thread(target=dribble) for _ in range(slow)]
for t in ts: t.start()
print("flood up", flush=True)
time.sleep(hold)
for s in socks:
    s.setblocking(False)
    try:
        if s.recv(1) == b"": closed[0] += 1
    except BlockingIOError:
        pass
    except OSError:
        closed[0] += 1
for t in ts: t.join()
print(f"closed by server {closed[0]} of {idle + slow}", flush=True)
PY
python3 "$work/flood.py" "$pa" 200 20 25 >"$work/flood.out" 2>&1 &
fl=$!; pids+=("$fl")
while ! grep -q 'flood up' "$work/flood.out"; do sleep 0.1; done
sleep 1
echo "during flood" >"$work/a/during-flood.txt"
s=$(now)
while [[ ! -e "$work/b/during-flood.txt" ]]; do
  [[ $(secs "$s" "$(now)" | cut -d. -f1) -gt 60 ]] && break; sleep 0.05
done
prop=$(secs "$s" "$(now)")
[[ -e "$work/b/during-flood.txt" ]] || prop="not propagated"
s=$(now)
if "$BIN" --box "$work/b" index regex '^during' >/dev/null 2>"$work/flood-q.err"; then fq="answered in $(secs "$s" "$(now)") s"; else fq="FAILED: $(head -1 "$work/flood-q.err")"; fi
wait "$fl" || true
flood=$(tail -1 "$work/flood.out")

row() { printf '%-44s %-28s %s\n' "$1" "$2" "$3"; }
row "measure" "value" "target"
row "files" "$N" ""
row "a: daemon start until serving (s)" "$scan_a" ""
row "initial sync a -> b (s)" "$sync_b" ""
row "index longlist, of peer (s, best / worst of 3)" "$ll_peer" "< 1"
row "index longlist --local (s)" "$ll_local" "< 1"
row "hash checkall cached, of peer (s)" "$ca_peer" "< 2"
row "hash checkall --local cached (s)" "$ca_local" "< 2"
row "longlist file entries" "$n_ll" "$N"
row "a RSS peak / now after initial sync (MB)" "$rss_sync_a" "< 100"
row "b RSS peak / now after initial sync (MB)" "$rss_sync_b" "< 100"
row "a RSS peak / now after 6 single queries" "$q1_a" "< 100"
row "a RSS peak / steady at the end (MB)" "$peak_a / $steady_a" "< 100"
row "b RSS peak / steady at the end (MB)" "$peak_b / $steady_b" "< 100"
row "50 clients during a sync: answered" "$q_ok / 50 in $q_time s" "50"
row "50 clients: dropped at the handshake cap (32)" "$q_hs" ""
row "50 clients: failed otherwise" "$q_other" "0"
row "200 idle + 20 slow conns: change crossed (s)" "$prop" ""
row "200 idle + 20 slow conns: query" "$fq" ""
row "idle/slow conns closed by server" "${flood#closed by server }" ""
