# shellcheck shell=bash
# Shared helpers for the benchmark scripts (source it). Benchmarks print tables; they never
# pass or fail on a timing. Every comparison runs in the same pass on the same data, because
# these shared machines drift by up to 2x between passes.
set -euo pipefail
ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BENCH_WORK="${BENCH_WORK:-/tmp/mybox-bench}"
RUNS="${RUNS:-5}"
SSH_PORT="${SSH_PORT:-2299}"
SSH_DIR="$BENCH_WORK/ssh"
SSH_KEY="$SSH_DIR/client_key"
SSH_OPTS="-p $SSH_PORT -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -i $SSH_KEY"
mkdir -p "$BENCH_WORK"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# need CMD PACKAGE: install the Debian package if the command is missing (root only).
need() {
  command -v "$1" >/dev/null 2>&1 && return 0
  if [[ $(id -u) -eq 0 ]]; then
    log "installing $2"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null 2>&1 ||
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }
  fi
  command -v "$1" >/dev/null 2>&1 || { log "missing $1 (apt-get install $2)"; exit 1; }
}

build_mybox() {
  (cd "$ROOT_DIR" && cargo build --release --quiet)
  MYBOX="$ROOT_DIR/target/release/mybox"
}

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

# A 1 GiB (or $2 bytes) seeded pseudo-random file, made once.
make_big() {
  local f="$1" size="${2:-1073741824}"
  [[ -f $f && $(stat -c %s "$f") -eq $size ]] && return 0
  log "generating $f ($size bytes)"
  python3 - "$f" "$size" <<'PY'
import hashlib, sys
path, size = sys.argv[1], int(sys.argv[2])
block = b"".join(hashlib.sha256(b"mybox-bench-%d" % i).digest() for i in range(32768))  # 1 MiB
with open(path, "wb") as f:
    written, i = 0, 0
    while written < size:
        # vary each MiB so no two blocks are equal (no accidental dedup)
        chunk = hashlib.sha256(b"%d" % i).digest() + block[32:]
        n = min(len(chunk), size - written)
        f.write(chunk[:n]); written += n; i += 1
PY
}

# The rust std HTML docs: the ~2,600-file realistic tree.
make_tree() {
  local dst="$1"
  [[ -d $dst ]] && return 0
  cp -a "$(rustc --print sysroot)/share/doc/rust/html/std" "$dst"
}

sshd_start() {
  need sshd openssh-server; need ssh openssh-client
  mkdir -p "$SSH_DIR" /run/sshd; chmod 700 "$SSH_DIR"
  [[ -f $SSH_DIR/host_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -f "$SSH_DIR/host_ed25519"
  [[ -f $SSH_KEY ]] || ssh-keygen -q -t ed25519 -N '' -f "$SSH_KEY"
  cp "$SSH_KEY.pub" "$SSH_DIR/authorized_keys"; chmod 600 "$SSH_DIR/authorized_keys"
  cat > "$SSH_DIR/sshd_config" <<CFG
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $SSH_DIR/host_ed25519
PidFile $SSH_DIR/sshd.pid
AuthorizedKeysFile $SSH_DIR/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
LogLevel ERROR
CFG
  if [[ -f $SSH_DIR/sshd.pid ]] && kill -0 "$(cat "$SSH_DIR/sshd.pid")" 2>/dev/null; then return 0; fi
  /usr/sbin/sshd -f "$SSH_DIR/sshd_config" -E "$SSH_DIR/sshd.log"
  for _ in $(seq 50); do ssh $SSH_OPTS root@127.0.0.1 true 2>/dev/null && return 0; sleep 0.1; done
  log "sshd did not come up"; return 1
}

sshd_stop() {
  [[ -f $SSH_DIR/sshd.pid ]] && kill "$(cat "$SSH_DIR/sshd.pid")" 2>/dev/null || true
  rm -f "$SSH_DIR/sshd.pid"
}

# mybox_serve BOX -> prints the listen address; the pid goes to $BOX.serve.pid
mybox_serve() {
  local box="$1" out="$1.serve.out"
  "$MYBOX" --box "$box" serve --listen 127.0.0.1:0 > "$out" 2> "$1.serve.log" &
  echo $! > "$box.serve.pid"
  for _ in $(seq 200); do grep -q serving "$out" 2>/dev/null && break; sleep 0.05; done
  awk '{print $NF}' "$out"
}

mybox_stop() { [[ -f $1.serve.pid ]] && kill "$(cat "$1.serve.pid")" 2>/dev/null || true; rm -f "$1.serve.pid"; sleep 0.1; }

# hf NAME ARGS... : hyperfine with N runs, JSON into $BENCH_WORK/NAME.json
hf() {
  local name="$1"; shift
  hyperfine --runs "$RUNS" --style none --export-json "$BENCH_WORK/$name.json" "$@" >/dev/null
}

# median seconds of a hyperfine JSON
median() {
  python3 -c 'import json,statistics,sys; print("%.3f" % statistics.median(json.load(open(sys.argv[1]))["results"][0]["times"]))' "$BENCH_WORK/$1.json"
}
