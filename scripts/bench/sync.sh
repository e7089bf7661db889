#!/bin/sh
# Sync benchmark (not a test): mybox daemons on loopback against rsync -a, unison and Syncthing
# on the same data, printed as one table.
#
#   scripts/bench/sync.sh [--quick] [--skip-100k] [--skip-1g] [--only-1g]
#
# Needs a release build (cargo build --release) and, for the comparison columns, the Debian
# packages rsync, unison and syncthing (apt-get install -y rsync unison syncthing); a tool that is
# missing shows "n/a". Everything lives under $BENCH_DIR (default /tmp/mybox-bench) and every
# process started is stopped by its PID. Initial syncs and the one-byte change run ROUNDS times
# (default 3), the tools alternating; the table shows medians, the lines under it each round's
# ratio. --only-1g times the one-byte change alone. The one-byte change is timed twice a round:
# with both sides idle (the receiver's previous version in the page cache, as rsync's just-written
# copy is) and with the page cache dropped first (root only; every tool then reads from disk).
# mybox makes what it receives durable before it is renamed into place (one syncfs a round of
# files); rsync -a does not flush at all. So each round also times `rsync -a --fsync` (durable
# like mybox) and, where libeatmydata is installed (apt-get install -y eatmydata), mybox with its
# flushes turned into no-ops: the first ratio compares durable work, the second the rest.
set -eu
cd "$(dirname "$0")/../.."
MYBOX="${MYBOX:-$PWD/target/release/mybox}"
[ -x "$MYBOX" ] || { echo "build first: cargo build --release" >&2; exit 1; }
export MYBOX
exec python3 - "$@" <<'PY'
import json, os, random, shutil, signal, socket, statistics, subprocess, sys, time
import urllib.request

MYBOX = os.environ["MYBOX"]
BASE = os.environ.get("BENCH_DIR", "/tmp/mybox-bench")
ARGS = set(sys.argv[1:])
QUICK = "--quick" in ARGS
ONLY_1G = "--only-1g" in ARGS
PROCS = []


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def run(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill(); p.wait()


def stop_all():
    for p in PROCS:
        stop(p)
    PROCS.clear()


class Box:
    def __init__(self, root):
        self.root = root
        self.port = free_port()
        run(MYBOX, "init", root)
        self.id = run(MYBOX, "--box", root, "id").stdout.strip()
        self.proc = None

    def start(self, env=None):
        err = open(os.path.join(self.root, ".mybox", "bench-stderr.log"), "a")
        self.proc = subprocess.Popen(
            [MYBOX, "--box", self.root, "daemon", "--listen", f"127.0.0.1:{self.port}",
             "--rescan-interval", "60"],
            stdout=subprocess.PIPE, stderr=err, text=True,
            env={"MYBOX_LOG": "warn", **os.environ, **(env or {})})
        PROCS.append(self.proc)
        line = self.proc.stdout.readline()
        if " serving " not in line:
            raise SystemExit(f"daemon for {self.root} did not start: {line!r}")

    def status(self):
        out = subprocess.run([MYBOX, "--box", self.root, "status", "--json"],
                             capture_output=True, text=True)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def rss_peak_kb(self):
        try:
            for l in open(f"/proc/{self.proc.pid}/status"):
                if l.startswith("VmHWM:"):
                    return int(l.split()[1])
        except OSError:
            pass
        return 0

    def stop(self):
        if self.proc:
            stop(self.proc)
            self.proc = None


def pair(a, b):
    run(MYBOX, "--box", a.root, "peer", "add", b.id, f"127.0.0.1:{b.port}")
    run(MYBOX, "--box", b.root, "peer", "add", a.id, f"127.0.0.1:{a.port}")


def count_entries(root):
    n = 0
    for d, dirs, files in os.walk(root):
        if d == root and ".mybox" in dirs:
            dirs.remove(".mybox")
        n += len(dirs) + len(files)
    return n


def wait_synced(b, expect_entries, timeout=3600):
    """Until b is connected, has nothing left to pull and holds as many entries as the source.
    `mybox status --wait` answers the moment the daemon is in sync (event-driven, no polling:
    each `status` is a pass over both indexes, which at 20 ms intervals took a quarter of a core
    from the sync being timed); polling stays as the fallback."""
    out = subprocess.run([MYBOX, "--box", b.root, "status", "--json", "--wait", str(timeout)],
                         capture_output=True, text=True)
    try:
        st = json.loads(out.stdout)
        if st.get("synced") and st["files"] >= expect_entries:
            return
    except (ValueError, KeyError):
        pass
    t_end = time.time() + timeout
    pause = float(os.environ.get("POLL", "0.02"))
    while time.time() < t_end:
        t0 = time.time()
        st = b.status()
        took = time.time() - t0
        if st and st["peers"] and st["peers"][0]["connected"] and st["to_pull_files"] == 0 \
                and st["files"] >= expect_entries:
            return
        time.sleep(max(pause, 2 * took))
    raise SystemExit("mybox did not finish in time")


RUN_DIR = os.path.join(BASE, f"run-{os.getpid()}")
CLEAN_BEFORE = 0.0


ROUNDS = int(os.environ.get("ROUNDS", "3"))


def median(xs):
    if None in xs:
        return None
    return sorted(xs)[len(xs) // 2]


def fresh(name):
    """A new, empty folder for one measurement. Nothing is deleted until the whole run is over:
    ext4 skips inodes freed in the last 1-6 minutes when it allocates, so a tree deleted just
    before a timing makes every file creation of the tool timed next scan past them."""
    n = 0
    while os.path.exists(d := os.path.join(RUN_DIR, f"{name}-{n}")):
        n += 1
    os.makedirs(d)
    return d


def clean_old_runs():
    """Trees left by earlier runs go first, then a pause past ext4's recently-freed window.
    Without a journal (this machine's ext4), allocating an inode skips every free one deleted in
    the last 60 s, or 360 s while its inode-table block is dirty, checking each: a tool that
    creates thousands of files right after a big deletion spends most of its time there (half
    of rsync's samples in one profile, and rsync -a on the 10,000 files took 0.29 s on a clean
    file system and 0.85-1.41 s two minutes after a deletion). The pause covers the longer
    window, so every column is timed on a settled file system."""
    global CLEAN_BEFORE
    old = [os.path.join(BASE, e) for e in os.listdir(BASE)
           if e.startswith("run-") or e.endswith(("-init", "-latency", "-1g", "-100k"))]
    for d in old:
        shutil.rmtree(d, ignore_errors=True)
    if old:
        wait = float(os.environ.get("SETTLE", "370"))
        log(f"removed {len(old)} old trees; waiting {wait:.0f} s so their inodes are not 'recent'")
        time.sleep(wait)


def settle_writes():
    """Flush the setup's own writes (copies of the data set) before a timing. Every tool that
    fsyncs or syncfs-es what it receives (mybox does, before each rename) would otherwise also
    wait for this script's dirty pages on the same file system; rsync and unison never flush."""
    os.sync()
    time.sleep(0.5)


def same_tree(x, y):
    r = subprocess.run(["diff", "-r", "-q", "-x", ".mybox", "-x", ".unison*", x, y],
                       capture_output=True, text=True)
    return r.returncode == 0


# ---------------------------------------------------------------- datasets

def dataset_std():
    sysroot = run("rustc", "--print", "sysroot").stdout.strip()
    return os.path.join(sysroot, "share/doc/rust/html/std")


def dataset_small(n=10000):
    d = os.path.join(BASE, f"data-{n}x4k")
    if not os.path.exists(d):
        os.makedirs(d)
        rnd = random.Random(1)
        for i in range(n):
            sub = os.path.join(d, f"d{i // 500:03}")
            os.makedirs(sub, exist_ok=True)
            with open(os.path.join(sub, f"f{i:05}"), "wb") as f:
                f.write(rnd.randbytes(4096))
    return d


# ---------------------------------------------------------------- tools

EATMYDATA = next((p for p in ("/usr/lib/x86_64-linux-gnu/libeatmydata.so",
                              "/usr/lib/aarch64-linux-gnu/libeatmydata.so",
                              "/usr/lib/libeatmydata.so") if os.path.exists(p)), None)


def initial_mybox(src, no_flush=False):
    """mybox's initial sync; with no_flush, the receiver runs under libeatmydata (fsync and
    syncfs return at once), which shows what durability costs on this disk."""
    w = fresh("mybox-init")
    a, b = Box(os.path.join(w, "A")), Box(os.path.join(w, "B"))
    pair(a, b)
    shutil.copytree(src, os.path.join(a.root, "data"), symlinks=True)
    expect = count_entries(a.root)
    a.start()                      # returns once A has scanned (and hashed) its store
    settle_writes()
    t0 = time.time()
    b.start({"LD_PRELOAD": EATMYDATA} if no_flush else None)
    wait_synced(b, expect)
    t = time.time() - t0
    ok = same_tree(os.path.join(a.root, "data"), os.path.join(b.root, "data"))
    rss = max(a.rss_peak_kb(), b.rss_peak_kb())
    a.stop(); b.stop()
    return t, ok, rss


def initial_rsync(src, *extra):
    if not shutil.which("rsync"):
        return None
    w = fresh("rsync-init")
    dst = os.path.join(w, "B")
    settle_writes()
    t0 = time.time()
    run("rsync", "-a", *extra, src + "/", dst + "/")
    return time.time() - t0


def initial_unison(src):
    if not shutil.which("unison"):
        return None
    w = fresh("unison-init")
    a, b = os.path.join(w, "A"), os.path.join(w, "B")
    shutil.copytree(src, a, symlinks=True)
    os.makedirs(b)
    env = {**os.environ, "UNISON": os.path.join(w, ".unison")}
    settle_writes()
    t0 = time.time()
    subprocess.run(["unison", a, b, "-batch", "-auto", "-times", "-silent", "-confirmbigdel=false"],
                   check=True, capture_output=True, env=env)
    return time.time() - t0


class Syncthing:
    """Two Syncthing instances on loopback, driven through their REST API."""
    KEY = "mybox-bench-key"

    def __init__(self, w):
        self.w = w
        self.nodes = {}
        for n in ("A", "B"):
            home = os.path.join(w, f"st-{n}")
            run("syncthing", "generate", f"--home={home}", "--no-default-folder")
            cert_id = run("syncthing", "--home", home, "--device-id").stdout.strip()
            self.nodes[n] = {"home": home, "id": cert_id, "gui": free_port(), "listen": free_port(),
                             "folder": os.path.join(w, n)}
            os.makedirs(self.nodes[n]["folder"], exist_ok=True)

    def configure(self, paused_b):
        import xml.etree.ElementTree as ET
        for n, me in self.nodes.items():
            other = self.nodes["B" if n == "A" else "A"]
            cfg = os.path.join(me["home"], "config.xml")
            tree = ET.parse(cfg); root = tree.getroot()
            for f in root.findall("folder"):
                root.remove(f)
            for d in root.findall("device"):
                if d.get("id") != me["id"]:
                    root.remove(d)
            dev = ET.SubElement(root, "device", id=other["id"], name=f"peer", compression="never",
                                introducer="false", skipIntroductionRemovals="false", introducedBy="")
            ET.SubElement(dev, "address").text = f"tcp://127.0.0.1:{other['listen']}"
            folder = ET.SubElement(root, "folder", id="bench", label="bench", path=me["folder"],
                                   type="sendreceive", rescanIntervalS="3600", fsWatcherEnabled="true",
                                   fsWatcherDelayS="1", ignorePerms="false", autoNormalize="true")
            ET.SubElement(folder, "device", id=me["id"])
            ET.SubElement(folder, "device", id=other["id"])
            ET.SubElement(folder, "paused").text = "true" if (paused_b and n == "B") else "false"
            gui = root.find("gui"); gui.set("enabled", "true"); gui.set("tls", "false")
            gui.find("address").text = f"127.0.0.1:{me['gui']}"
            k = gui.find("apikey")
            if k is None:
                k = ET.SubElement(gui, "apikey")
            k.text = self.KEY
            opts = root.find("options")
            for tag, val in (("listenAddress", f"tcp://127.0.0.1:{me['listen']}"),
                             ("globalAnnounceEnabled", "false"), ("localAnnounceEnabled", "false"),
                             ("relaysEnabled", "false"), ("natEnabled", "false"),
                             ("urAccepted", "-1"), ("startBrowser", "false"), ("crashReportingEnabled", "false")):
                e = opts.find(tag)
                if e is None:
                    e = ET.SubElement(opts, tag)
                e.text = val
            tree.write(cfg)

    def start(self):
        for n, me in self.nodes.items():
            p = subprocess.Popen(["syncthing", "serve", "--home", me["home"], "--no-browser",
                                  "--no-restart", "--no-upgrade"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env={**os.environ, "STNOUPGRADE": "1"})
            PROCS.append(p)
            me["proc"] = p
        for n in self.nodes:
            self.wait(lambda: self.api(n, "/rest/system/ping"), 60)

    def api(self, n, path, method="GET", body=None):
        url = f"http://127.0.0.1:{self.nodes[n]['gui']}{path}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"X-API-Key": self.KEY, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                raw = r.read()
            return json.loads(raw) if raw else {}
        except Exception:
            return None

    @staticmethod
    def wait(cond, timeout):
        t_end = time.time() + timeout
        while time.time() < t_end:
            try:
                if cond():
                    return True
            except Exception:
                pass
            time.sleep(0.02)
        raise SystemExit("syncthing: timed out")

    def idle(self, n, expect_files):
        st = self.api(n, "/rest/db/status?folder=bench")
        return st and st.get("state") == "idle" and st.get("needFiles") == 0 \
            and st.get("localFiles", 0) + st.get("localDirectories", 0) >= expect_files

    def stop(self):
        for me in self.nodes.values():
            if "proc" in me:
                stop(me["proc"])


def initial_syncthing(src):
    if not shutil.which("syncthing"):
        return None
    w = fresh("syncthing-init")
    st = Syncthing(w)
    shutil.rmtree(st.nodes["A"]["folder"])
    shutil.copytree(src, st.nodes["A"]["folder"], symlinks=True)
    expect = count_entries(st.nodes["A"]["folder"])
    st.configure(paused_b=True)
    try:
        st.start()
        st.wait(lambda: st.idle("A", expect), 600)
        st.wait(lambda: st.api("A", "/rest/system/connections")["connections"][st.nodes["B"]["id"]]["connected"], 60)
        settle_writes()
        t0 = time.time()
        st.api("B", "/rest/db/scan?folder=bench", "POST")
        cfg = st.api("B", "/rest/config/folders/bench")
        cfg["paused"] = False
        st.api("B", "/rest/config/folders/bench", "PUT", cfg)
        st.wait(lambda: st.idle("B", expect), 1800)
        return time.time() - t0
    finally:
        st.stop()


# ---------------------------------------------------------------- latency and delta

def wait_content(target, data, t0, timeout, pause, what):
    """Until `target` holds exactly `data` (polled every `pause` s; gives up `timeout` s after t0)."""
    while True:
        try:
            with open(target, "rb") as f:
                if f.read() == data:
                    return
        except OSError:
            pass
        time.sleep(pause)
        if time.time() - t0 > timeout:
            raise SystemExit(f"{what} timed out")


def propagation_mybox(n=20):
    w = fresh("mybox-latency")
    a, b = Box(os.path.join(w, "A")), Box(os.path.join(w, "B"))
    pair(a, b)
    a.start(); b.start()
    wait_synced(b, 0)
    times = []
    for i in range(n):
        data = os.urandom(1024)
        name = f"lat-{i}.bin"
        t0 = time.time()
        with open(os.path.join(a.root, name), "wb") as f:
            f.write(data)
        wait_content(os.path.join(b.root, name), data, t0, 30, 0.001, "propagation")
        times.append(time.time() - t0)
        time.sleep(0.1)
    a.stop(); b.stop()
    return pct(times)


def propagation_syncthing(n=20):
    if not shutil.which("syncthing"):
        return None
    w = fresh("syncthing-latency")
    st = Syncthing(w)
    st.configure(paused_b=False)
    try:
        st.start()
        st.wait(lambda: st.api("A", "/rest/system/connections")["connections"][st.nodes["B"]["id"]]["connected"], 60)
        st.wait(lambda: st.idle("B", 0), 60)
        times = []
        for i in range(n):
            data = os.urandom(1024)
            t0 = time.time()
            with open(os.path.join(st.nodes["A"]["folder"], f"lat-{i}.bin"), "wb") as f:
                f.write(data)
            wait_content(os.path.join(st.nodes["B"]["folder"], f"lat-{i}.bin"), data, t0, 60, 0.002,
                         "syncthing propagation")
            times.append(time.time() - t0)
        return pct(times)
    finally:
        st.stop()


def pct(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2], xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def tcp_bytes(pid):
    """Bytes sent plus received by the TCP sockets of process `pid` (tcp_info counters). Loopback
    shows both ends of every connection, so only the sender's own sockets are counted."""
    out = subprocess.run(["ss", "-tinpH", "state", "established"], capture_output=True, text=True).stdout
    total = 0
    sock = ""
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            sock = line
            continue
        if f"pid={pid}," not in sock:
            continue
        for tok in line.split():
            for key in ("bytes_acked:", "bytes_received:"):
                if tok.startswith(key):
                    total += int(tok[len(key):])
    return total


def write_big(path, size):
    with open(path, "wb") as f:
        chunk = os.urandom(1 << 20)
        for i in range(size >> 20):
            f.write(chunk[i % 7:] + chunk[:i % 7])


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        new = bytes([old[0] ^ 0xFF])
        f.write(new)
    return new


# Two states of the receiver's previous version, each timed: "warm", the edit comes once both
# sides are idle (a while after the last sync: the receiver has read its new version back for
# the MD5 the query commands show, so it is in the page cache, as rsync's just-written copy is);
# "cold", the page cache dropped first (the edit comes long after; every tool reads from disk).
def drop_caches():
    """Empty the page cache (root only); False when this machine does not allow it."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def one_byte_rsync(size):
    """The same change handed to `rsync -a --no-whole-file` (its delta algorithm; local copies
    skip it by default): what rewriting the file costs this machine at this moment, since any
    tool that never shows a half-written file builds a whole new 1 GiB copy. Not continuous, so
    no detection time; rsync does not fsync what it writes. Returns the warm and cold times
    (cold None when the page cache cannot be dropped) and the bytes its sender sent its
    receiver the first time."""
    if not shutil.which("rsync"):
        return None, None, None
    w = fresh("rsync-1g")
    src, dst = os.path.join(w, "A"), os.path.join(w, "B")
    os.makedirs(src)
    write_big(os.path.join(src, "big.bin"), size)
    run("rsync", "-a", src + "/", dst + "/")
    times, sent = [], None
    for offset, cold in ((size // 2 + 12345, False), (size // 3 + 777, True)):
        os.sync()
        time.sleep(1)
        flip_byte(os.path.join(src, "big.bin"), offset)
        if cold and not drop_caches():
            times.append(None)
            break
        t0 = time.time()
        out = run("rsync", "-a", "--no-whole-file", "--stats", src + "/", dst + "/").stdout
        times.append(time.time() - t0)
        for line in out.splitlines():
            if sent is None and line.startswith("Total bytes sent:"):
                sent = int(line.split(":")[1].strip().replace(",", ""))
    return times[0], times[1], sent


def wait_idle(boxes, timeout=300):
    """Until every box is in sync and has filled in the MD5 of what it received."""
    t_end = time.time() + timeout
    while time.time() < t_end:
        sts = [x.status() for x in boxes]
        if all(st and st["to_pull_files"] == 0 and st.get("md5_pending_files", 0) == 0
               for st in sts):
            return
        time.sleep(0.2)
    raise SystemExit("mybox did not go idle in time")


def one_byte_mybox(size):
    """Warm and cold times (cold None when the page cache cannot be dropped) of a one-byte
    change crossing, and the bytes the sender's sockets moved for the first."""
    w = fresh("mybox-1g")
    a, b = Box(os.path.join(w, "A")), Box(os.path.join(w, "B"))
    pair(a, b)
    path = os.path.join(a.root, "big.bin")
    target = os.path.join(b.root, "big.bin")
    write_big(path, size)
    a.start(); b.start()
    wait_synced(b, 1)
    times, moved = [], None
    for offset, cold in ((size // 2 + 12345, False), (size // 3 + 777, True)):
        wait_idle([a, b])
        # The setup's own writes (this script's 1 GiB, not fsynced) must not be what the timed
        # fsync of the receiver waits for: flush them first.
        os.sync()
        if cold and not drop_caches():
            times.append(None)
            break
        time.sleep(1)
        before = tcp_bytes(a.proc.pid)
        t0 = time.time()
        new = flip_byte(path, offset)
        # The new version is installed by one rename: the changed byte showing at B's path is
        # the end (reading one byte every 5 ms costs B nothing, unlike a status pass).
        while True:
            with open(target, "rb") as f:
                f.seek(offset)
                if f.read(1) == new:
                    break
            time.sleep(0.005)
            if time.time() - t0 > 600:
                raise SystemExit("one-byte change never arrived")
        times.append(time.time() - t0)
        time.sleep(0.5)
        if moved is None:
            moved = tcp_bytes(a.proc.pid) - before
    a.stop(); b.stop()
    return times[0], times[1], moved


def memory_100k(n=100000):
    d = os.path.join(BASE, f"data-{n}x1")
    if not os.path.exists(d):
        os.makedirs(d)
        for i in range(n):
            sub = os.path.join(d, f"d{i // 1000:03}")
            os.makedirs(sub, exist_ok=True)
            with open(os.path.join(sub, f"f{i:06}"), "wb") as f:
                f.write(b"%d" % i)
    w = fresh("mybox-100k")
    a, b = Box(os.path.join(w, "A")), Box(os.path.join(w, "B"))
    pair(a, b)
    shutil.copytree(d, os.path.join(a.root, "data"))
    expect = count_entries(a.root)
    t0 = time.time()
    a.start()
    scan = time.time() - t0
    settle_writes()
    t0 = time.time()
    b.start()
    wait_synced(b, expect, timeout=3600)
    t = time.time() - t0
    rss = (a.rss_peak_kb(), b.rss_peak_kb())
    a.stop(); b.stop()
    return scan, t, rss


def fmt_t(x):
    return "n/a" if x is None else f"{x:.2f} s"


class Rows(list):
    """Rows of the table, each also logged as soon as it is measured."""
    def append(self, r):
        log("result:", " | ".join(str(c) for c in r))
        super().append(r)


def main():
    os.makedirs(BASE, exist_ok=True)
    clean_old_runs()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    rows = Rows()
    notes = []
    try:
        std = None if ONLY_1G else dataset_std()
        small = None if ONLY_1G else dataset_small(2000 if QUICK else 10000)
        initial = () if ONLY_1G else (
            (f"initial sync: rust std docs ({count_entries(std)} entries)", std),
            (f"initial sync: {'2,000' if QUICK else '10,000'} x 4 KiB files", small))
        for label, src in initial:
            log(label)
            # Alternating rounds (the machine's speed drifts within minutes); medians are shown
            # and each round's mybox / rsync ratio is printed under the table.
            mine, rs, un, all_ok, rss = [], [], [], True, 0
            rs_fsync, mine_no_flush = [], []
            for _ in range(ROUNDS):
                t, ok, r = initial_mybox(src)
                mine.append(t)
                all_ok &= ok
                rss = max(rss, r)
                rs.append(initial_rsync(src))
                un.append(initial_unison(src))
                rs_fsync.append(initial_rsync(src, "--fsync"))
                if EATMYDATA:
                    t, ok, _ = initial_mybox(src, no_flush=True)
                    mine_no_flush.append(t)
                    all_ok &= ok
            rows.append((label, f"{median(mine):.2f} s{'' if all_ok else ' (TREES DIFFER)'}, "
                                f"peak RSS {rss // 1024} MB",
                         fmt_t(median(rs)), fmt_t(median(un)), fmt_t(initial_syncthing(src))))
            if None not in rs:
                notes.append(f"{label}: mybox / rsync -a per round "
                             + " ".join(f"{m / r:.2f}" for m, r in zip(mine, rs))
                             + f" (mybox {' '.join(f'{m:.2f}' for m in mine)} s,"
                             + f" rsync {' '.join(f'{r:.2f}' for r in rs)} s)")
            if None not in rs_fsync:
                notes.append(f"  durable: mybox / rsync -a --fsync per round "
                             + " ".join(f"{m / r:.2f}" for m, r in zip(mine, rs_fsync))
                             + f" (rsync --fsync {' '.join(f'{r:.2f}' for r in rs_fsync)} s)")
            if mine_no_flush and None not in rs:
                notes.append(f"  flushes off: mybox under libeatmydata / rsync -a per round "
                             + " ".join(f"{m / r:.2f}" for m, r in zip(mine_no_flush, rs))
                             + f" (mybox {' '.join(f'{m:.2f}' for m in mine_no_flush)} s)")
        if not ONLY_1G:
            log("propagation")
            p50, p95 = propagation_mybox()
            stp = propagation_syncthing()
            rows.append(("new 1 KiB file: propagation p50 / p95 (20 runs)",
                         f"{p50 * 1000:.0f} / {p95 * 1000:.0f} ms", "n/a (not continuous)",
                         "n/a (not continuous)",
                         "n/a" if stp is None else f"{stp[0] * 1000:.0f} / {stp[1] * 1000:.0f} ms"))
        if "--skip-1g" not in ARGS:
            size = (256 if QUICK else 1024) << 20
            log(f"one-byte change in a {size >> 20} MiB file")
            # Alternating rounds, like the initial syncs: the disk's speed swings 2x within
            # minutes, and both tools write a whole new copy.
            ts, rts, cts, rcts, moved, rsent = [], [], [], [], 0, None
            for _ in range(ROUNDS):
                t, ct, moved = one_byte_mybox(size)
                ts.append(t)
                cts.append(ct)
                rt, rct, rsent = one_byte_rsync(size)
                rts.append(rt)
                rcts.append(rct)
            for state, mine, theirs in (("idle, old version cached", ts, rts),
                                        ("page cache dropped first", cts, rcts)):
                if None in mine:
                    notes.append(f"one byte in {size >> 20} MiB, {state}: not timed "
                                 "(the page cache cannot be dropped here)")
                    continue
                rt = None if None in theirs else median(theirs)
                rows.append((f"one byte changed in a {size >> 20} MiB file ({state}): time"
                             + (", bytes on the wire" if mine is ts else ""),
                             f"{median(mine):.2f} s" + (f", {moved / 1024:.0f} KiB" if mine is ts else ""),
                             "n/a" if rt is None else f"{rt:.2f} s" + (
                                 f", {'?' if rsent is None else f'{rsent / 1024:.0f}'} KiB"
                                 " (--no-whole-file)" if mine is ts else ""), "", ""))
                if rt is not None:
                    notes.append(f"one byte in {size >> 20} MiB, {state}: mybox / rsync per round "
                                 + " ".join(f"{m / r:.2f}" for m, r in zip(mine, theirs))
                                 + f" (mybox {' '.join(f'{m:.2f}' for m in mine)} s,"
                                 + f" rsync {' '.join(f'{r:.2f}' for r in theirs)} s)")
        if "--skip-100k" not in ARGS and not ONLY_1G:
            n = 20000 if QUICK else 100000
            log(f"{n} files: memory")
            scan, t, (ra, rb) = memory_100k(n)
            rows.append((f"{n} files: first scan, initial sync, peak RSS sender / receiver",
                         f"{scan:.1f} s, {t:.1f} s, {ra // 1024} / {rb // 1024} MB", "", "", ""))
    finally:
        stop_all()
        shutil.rmtree(RUN_DIR, ignore_errors=True)
    head = ("measure", "mybox", "rsync -a", "unison", "syncthing")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(5)]
    line = "+".join("-" * (w + 2) for w in widths)
    print(line)
    print("|".join(f" {h:<{w}} " for h, w in zip(head, widths)))
    print(line)
    for r in rows:
        print("|".join(f" {str(c):<{w}} " for c, w in zip(r, widths)))
    print(line)
    for n in notes:
        print(n)


main()
PY
