#!/usr/bin/env bash
# Benchmark: download one big file with `mybox download tcp`, `mybox download udp`, rsync over
# ssh and scp — on loopback and through mybox-linkemu WAN profiles — and print MB/s.
#
#   scripts/bench/transfer.sh            # 1 GiB, all profiles
#   SIZE_MB=256 PROFILES="loopback" scripts/bench/transfer.sh
#
# Environment:
#   SIZE_MB      file size in MiB (default 1024)
#   PROFILES     any of: loopback rtt50-loss1 rtt100-loss3-1g (default: all three)
#   TOOLS        any of: mybox-tcp mybox-udp rsync scp (default: all)
#   TIME_CAP     seconds one transfer may take (default 900); a transfer still running then is
#                stopped and reported as a lower bound from the bytes it had written
#   BENCH_ROOT   scratch directory (default /tmp/mybox-bench.$$, removed afterwards)
#   SSH_PORT     port of the private sshd (default 2299)
#
# Needs root (network namespaces and TUN for the emulated links), python3, and for the
# comparison tools rsync, ssh, scp and sshd:  apt-get install -y rsync openssh-server openssh-client
# Every transfer is checked byte for byte against the source (cmp).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SIZE_MB="${SIZE_MB:-1024}"
PROFILES="${PROFILES:-loopback rtt50-loss1 rtt100-loss3-1g}"
TOOLS="${TOOLS:-mybox-tcp mybox-udp rsync scp}"
TIME_CAP="${TIME_CAP:-900}"
ROOT="${BENCH_ROOT:-/tmp/mybox-bench.$$}"
SSH_PORT="${SSH_PORT:-2299}"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
  echo "needs root (network namespaces, TUN)" >&2; exit 1
fi
have_ssh=1
for t in rsync ssh scp ssh-keygen /usr/sbin/sshd; do
  if ! command -v "$t" >/dev/null 2>&1; then
    have_ssh=0
    log "missing $t: install with: apt-get install -y rsync openssh-server openssh-client"
  fi
done
if [[ $have_ssh -eq 0 ]]; then
  TOOLS="$(echo "$TOOLS" | tr ' ' '\n' | grep -v -e rsync -e scp | tr '\n' ' ')"
  log "running without rsync/scp: TOOLS=$TOOLS"
fi

log "building mybox (release)"
(cd "$REPO" && cargo build --release --bins >&2)
MYBOX="$REPO/target/release/mybox"
EMU="$REPO/target/release/mybox-linkemu"

mkdir -p "$ROOT"
PIDS=()
EMU_PID=""
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [[ -n "$EMU_PID" ]] && kill "$EMU_PID" 2>/dev/null && wait "$EMU_PID" 2>/dev/null || true
  for f in "$ROOT"/ssh/sshd-*.pid; do [[ -f "$f" ]] && kill "$(cat "$f")" 2>/dev/null || true; done
  [[ -z "${BENCH_ROOT:-}" ]] && rm -rf "$ROOT"
  true
}
trap cleanup EXIT

# ------------------------------------------------------------------ data and boxes
A="$ROOT/a"; B="$ROOT/b"; DEST="$ROOT/dest"
mkdir -p "$DEST"
A_ID=$("$MYBOX" init "$A" 2>/dev/null)
B_ID=$("$MYBOX" init "$B" 2>/dev/null)
"$MYBOX" --box "$B" peer add "$A_ID" 127.0.0.1:1 2>/dev/null
SRC="$B/big.bin"
log "generating $SIZE_MB MiB of seeded random data"
python3 - "$SRC" "$SIZE_MB" <<'PY'
import random, sys
r = random.Random(20261124)
with open(sys.argv[1], "wb") as f:
    for _ in range(int(sys.argv[2])):
        f.write(r.randbytes(1 << 20))
PY
SIZE_BYTES=$(stat -c %s "$SRC")

# ------------------------------------------------------------------ sshd
SSH_DIR="$ROOT/ssh"; SSH_KEY="$SSH_DIR/client_key"
if [[ $have_ssh -eq 1 ]]; then
  mkdir -p "$SSH_DIR" /run/sshd; chmod 700 "$SSH_DIR"
  ssh-keygen -q -t ed25519 -N '' -f "$SSH_DIR/host_ed25519"
  ssh-keygen -q -t ed25519 -N '' -f "$SSH_KEY"
  cp "$SSH_KEY.pub" "$SSH_DIR/authorized_keys"; chmod 600 "$SSH_DIR/authorized_keys"
fi
# ssh takes the port as -p, scp as -P (its -p preserves times).
SSH_COMMON="-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes -i $SSH_KEY"
SSH_OPTS="-p $SSH_PORT $SSH_COMMON"
SCP_OPTS="-P $SSH_PORT $SSH_COMMON"
# sshd_start NAME LISTEN_ADDR [NETNS]
sshd_start() {
  local name="$1" addr="$2" ns="${3:-}"
  cat > "$SSH_DIR/sshd-$name.conf" <<CONF
Port $SSH_PORT
ListenAddress $addr
HostKey $SSH_DIR/host_ed25519
PidFile $SSH_DIR/sshd-$name.pid
AuthorizedKeysFile $SSH_DIR/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
LogLevel ERROR
CONF
  if [[ -n "$ns" ]]; then
    ip netns exec "$ns" /usr/sbin/sshd -f "$SSH_DIR/sshd-$name.conf" -E "$SSH_DIR/sshd-$name.log"
  else
    /usr/sbin/sshd -f "$SSH_DIR/sshd-$name.conf" -E "$SSH_DIR/sshd-$name.log"
  fi
}
sshd_stop() {
  local f="$SSH_DIR/sshd-$1.pid"
  [[ -f "$f" ]] && kill "$(cat "$f")" 2>/dev/null || true
  rm -f "$f"
}

# ------------------------------------------------------------------ measuring
RESULTS="$ROOT/results.tsv"
: > "$RESULTS"
# run_one PROFILE TOOL NS_A CMD...   (CMD writes $DEST/big.bin)
run_one() {
  local profile="$1" tool="$2" ns="$3"; shift 3
  rm -rf "$DEST"; mkdir -p "$DEST"
  sync
  local pre=()
  [[ -n "$ns" ]] && pre=(ip netns exec "$ns")
  log "$profile / $tool"
  local t0 t1 rc=0
  t0=$(date +%s.%N)
  timeout -s TERM "$TIME_CAP" "${pre[@]}" "$@" > "$ROOT/last.out" 2> "$ROOT/last.err" || rc=$?
  t1=$(date +%s.%N)
  local secs; secs=$(python3 -c "print(f'{$t1-$t0:.2f}')")
  local status mbs
  if [[ $rc -eq 0 ]] && cmp -s "$SRC" "$DEST/big.bin"; then
    status="ok"
    mbs=$(python3 -c "print(f'{$SIZE_BYTES/($t1-$t0)/1e6:.1f}')")
  elif [[ $rc -eq 124 ]]; then
    # Stopped at the cap: bytes written so far (any partial file in DEST) over the time.
    local got; got=$(find "$DEST" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')
    status="timeout after ${TIME_CAP}s, $((got / 1048576)) MiB done"
    mbs=$(python3 -c "print(f'>={$got/($t1-$t0)/1e6:.1f}')")
  else
    status="FAILED rc=$rc: $(tail -c 300 "$ROOT/last.err" | tr '\n' ' ')"
    mbs="-"
  fi
  log "  -> $mbs MB/s in ${secs}s ($status)"
  printf '%s\t%s\t%s\t%s\t%s\n' "$profile" "$tool" "$mbs" "$secs" "$status" >> "$RESULTS"
}

run_tools() {
  local profile="$1" host="$2" ns="$3"
  for tool in $TOOLS; do
    case "$tool" in
      mybox-tcp) run_one "$profile" "$tool" "$ns" "$MYBOX" --box "$A" download tcp big.bin -o "$DEST/big.bin" ;;
      mybox-udp) run_one "$profile" "$tool" "$ns" "$MYBOX" --box "$A" download udp big.bin -o "$DEST/big.bin" ;;
      rsync) run_one "$profile" "$tool" "$ns" rsync -e "ssh $SSH_OPTS" "root@$host:$SRC" "$DEST/big.bin" ;;
      scp) run_one "$profile" "$tool" "$ns" scp -q $SCP_OPTS "root@$host:$SRC" "$DEST/big.bin" ;;
    esac
  done
}

# start_server HOST NS -> sets SERVER_PID and pairs A with it
start_server() {
  local host="$1" ns="$2"
  local pre=()
  [[ -n "$ns" ]] && pre=(ip netns exec "$ns")
  "${pre[@]}" "$MYBOX" --box "$B" serve --listen "$host:0" > "$ROOT/serve.out" 2> "$ROOT/serve.err" &
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
  for _ in $(seq 100); do grep -q serving "$ROOT/serve.out" 2>/dev/null && break; sleep 0.05; done
  local addr; addr=$(awk '/serving/ {print $NF}' "$ROOT/serve.out")
  "$MYBOX" --box "$A" peer add "$B_ID" "$addr" 2>/dev/null
}

for profile in $PROFILES; do
  case "$profile" in
    loopback) emu_args=() ;;
    rtt50-loss1) emu_args=(--delay-ms 25 --loss 1) ;;
    rtt100-loss3-1g) emu_args=(--delay-ms 50 --loss 3 --rate-mbit 1000) ;;
    *) log "unknown profile $profile"; continue ;;
  esac
  if [[ "$profile" == loopback ]]; then
    host=127.0.0.1; ns_a=""; ns_b=""
  else
    "$EMU" "${emu_args[@]}" > "$ROOT/emu.out" 2> "$ROOT/emu.err" &
    EMU_PID=$!
    for _ in $(seq 100); do grep -q READY "$ROOT/emu.out" 2>/dev/null && break; sleep 0.05; done
    grep -q READY "$ROOT/emu.out" || { cat "$ROOT/emu.err" >&2; exit 1; }
    line=$(grep READY "$ROOT/emu.out")
    ns_a=$(sed 's/.*ns_a=\([^ ]*\).*/\1/' <<<"$line")
    ns_b=$(sed 's/.*ns_b=\([^ ]*\).*/\1/' <<<"$line")
    host=$(sed 's/.*addr_b=\([^ ]*\).*/\1/' <<<"$line")
  fi
  start_server "$host" "$ns_b"
  [[ $have_ssh -eq 1 ]] && sshd_start "$profile" "$host" "$ns_b"
  sleep 0.3
  run_tools "$profile" "$host" "$ns_a"
  kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true
  [[ $have_ssh -eq 1 ]] && sshd_stop "$profile"
  if [[ -n "$EMU_PID" ]]; then
    kill "$EMU_PID" 2>/dev/null || true; wait "$EMU_PID" 2>/dev/null || true; EMU_PID=""
    log "$(tr '\n' ' ' < "$ROOT/emu.err")"
  fi
done

# ------------------------------------------------------------------ report
python3 - "$RESULTS" "$SIZE_MB" <<'PY'
import sys, collections
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
by = collections.OrderedDict()
for p, t, mbs, secs, st in rows:
    by.setdefault(p, {})[t] = (mbs, secs, st)
def num(s):
    try: return float(s.lstrip(">="))
    except ValueError: return None
print(f"\n{sys.argv[2]} MiB file, MB/s (10^6 bytes/s); '>=' = stopped at the time cap, lower bound\n")
print("| profile | tool | MB/s | seconds | status |")
print("|---|---|---|---|---|")
for p, tools in by.items():
    for t, (mbs, secs, st) in tools.items():
        print(f"| {p} | {t} | {mbs} | {secs} | {st} |")
print("\n| profile | udp / tcp | udp / rsync | udp / scp |")
print("|---|---|---|---|")
for p, tools in by.items():
    u = num(tools.get("mybox-udp", ("",))[0])
    def ratio(k):
        o = num(tools.get(k, ("",))[0])
        if u is None or not o: return "-"
        bound = tools[k][0].startswith(">=")
        return f"{'<=' if bound else ''}{u/o:.2f}x"
    print(f"| {p} | {ratio('mybox-tcp')} | {ratio('rsync')} | {ratio('scp')} |")
PY
