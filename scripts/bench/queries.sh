#!/usr/bin/env bash
# Benchmark (not a test) of the query commands, same data, same pass:
#   hash checkall on the ~2,600-file std docs tree: first run (empty hash cache) and repeated,
#     against serial md5sum over the same files;
#   download tcp of a 1 GiB file against cp and rsync over ssh to 127.0.0.1, cold page cache,
#     each ending durable (mybox fsyncs; cp and rsync are followed by sync).
# Usage: scripts/bench/queries.sh   (RUNS=N to change the run count)
source "$(dirname "$0")/common.sh"
need hyperfine hyperfine; need rsync rsync
build_mybox
W="$BENCH_WORK/queries"; mkdir -p "$W"
# A holds only the tree (what checkall and md5sum both hash); C holds only the 1 GiB file.
A="$W/a"; B="$W/b"; C="$W/c"; OUT="$W/out"
if [[ ! -d $A/.mybox || ! -d $C/.mybox ]]; then
  rm -rf "$A" "$B" "$C"; mkdir -p "$A" "$C"
  make_tree "$A/tree"
  "$MYBOX" init "$A" > "$W/a.id" 2>/dev/null
  "$MYBOX" init "$B" > "$W/b.id" 2>/dev/null
  "$MYBOX" init "$C" > "$W/c.id" 2>/dev/null
  "$MYBOX" --box "$A" peer add "$(cat "$W/b.id")" 127.0.0.1:9 2>/dev/null
  "$MYBOX" --box "$C" peer add "$(cat "$W/b.id")" 127.0.0.1:9 2>/dev/null
fi
make_big "$C/big.bin"
mkdir -p "$OUT"
sshd_start
trap 'mybox_stop "$A"; mybox_stop "$C"; sshd_stop' EXIT
C_ADDR=$(mybox_serve "$C")
"$MYBOX" --box "$B" peer add "$(cat "$W/c.id")" "$C_ADDR" 2>/dev/null
PA="--peer $(cat "$W/a.id")"; PC="--peer $(cat "$W/c.id")"

restart_a() {
  mybox_stop "$A"
  local addr; addr=$(mybox_serve "$A")
  "$MYBOX" --box "$B" peer add "$(cat "$W/a.id")" "$addr" 2>/dev/null
}
restart_a
FILES=$(find "$A/tree" -type f | wc -l)
MB=$(du -sm "$A/tree" | cut -f1)
log "tree: $FILES files, $MB MB"

# Warm the page cache for the hashing comparison (both sides then read from memory).
cat $(find "$A/tree" -type f) > /dev/null
hf md5sum "cd '$A/tree' && find . -type f -print0 | xargs -0 md5sum > /dev/null"
# "First" means an empty hash cache on the serving box: restart its server on a fresh index
# (a running server would keep its open, cached index), then re-pair B with the new port.
cat > "$W/fresh-a.sh" <<SH
#!/usr/bin/env bash
set -e
[[ -f '$A.serve.pid' ]] && kill \$(cat '$A.serve.pid') 2>/dev/null || true
sleep 0.1
rm -f '$A/.mybox/index.db'*
'$MYBOX' --box '$A' serve --listen 127.0.0.1:0 > '$A.serve.out' 2> '$A.serve.log' &
echo \$! > '$A.serve.pid'
for _ in \$(seq 200); do grep -q serving '$A.serve.out' 2>/dev/null && break; sleep 0.02; done
'$MYBOX' --box '$B' peer add '$(cat "$W/a.id")' \$(awk '{print \$NF}' '$A.serve.out') 2>/dev/null
SH
chmod +x "$W/fresh-a.sh"
hf checkall-first --prepare "'$W/fresh-a.sh'" "'$MYBOX' --box '$B' $PA hash checkall > /dev/null"
"$MYBOX" --box "$B" $PA hash checkall > /dev/null
hf checkall-repeat --warmup 2 "'$MYBOX' --box '$B' $PA hash checkall > /dev/null"
"$MYBOX" --box "$B" $PA hash checkall --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)), "files hashed by mybox")' >&2

# 1 GiB transfer, cold cache, durable at the end.
"$MYBOX" --box "$B" $PC hash verify big.bin > /dev/null   # sender's hashes cached, as after any scan
hf cp --prepare "rm -f '$OUT/big.bin'; sync; echo 3 > /proc/sys/vm/drop_caches" "cp '$C/big.bin' '$OUT/big.bin' && sync"
hf rsync-ssh --prepare "rm -f '$OUT/big.bin'; sync; echo 3 > /proc/sys/vm/drop_caches" \
  "rsync -a -e 'ssh $SSH_OPTS' '$C/big.bin' root@127.0.0.1:'$OUT/big.bin' && sync"
hf download-tcp --prepare "rm -f '$OUT/big.bin'; sync; echo 3 > /proc/sys/vm/drop_caches" \
  "'$MYBOX' --box '$B' $PC download tcp big.bin -o '$OUT/big.bin' > /dev/null"
cmp "$C/big.bin" "$OUT/big.bin" && log "download byte-identical"

m() { median "$1"; }
python3 - "$FILES" "$MB" "$(m md5sum)" "$(m checkall-first)" "$(m checkall-repeat)" "$(m cp)" "$(m rsync-ssh)" "$(m download-tcp)" <<'PY'
import sys
files, mb, md5, first, rep, cp, rs, dl = sys.argv[1], float(sys.argv[2]), *map(float, sys.argv[3:])
gib = 1073.741824
print(f"\n## hash checkall, {files} files, {mb:.0f} MB (median of runs, seconds)\n")
print("| command | seconds | vs md5sum |")
print("|---|---|---|")
print(f"| md5sum (serial, MD5 only) | {md5:.3f} | 1.00 |")
print(f"| mybox hash checkall, first (MD5+SHA-256+blocks) | {first:.3f} | {md5/first:.2f}x speed |")
print(f"| mybox hash checkall, repeated (cached) | {rep:.3f} | {md5/rep:.1f}x speed |")
print(f"\n## 1 GiB transfer over loopback, cold cache, durable (median seconds, MB/s)\n")
print("| command | seconds | MB/s | mybox speed relative |")
print("|---|---|---|---|")
print(f"| cp && sync | {cp:.3f} | {gib/cp:.0f} | mybox = {cp/dl:.2f}x cp |")
print(f"| rsync over ssh && sync | {rs:.3f} | {gib/rs:.0f} | mybox = {rs/dl:.2f}x rsync |")
print(f"| mybox download tcp (verifies MD5+SHA-256, fsync) | {dl:.3f} | {gib/dl:.0f} | |")
PY
