//! Faults injected into real daemons and mounts (issue 6): SIGKILL of either daemon during a large
//! sync, the network cut mid-transfer (iptables inside the daemons' own network namespaces) and
//! the peer restarted mid-transfer, a full disk on the receiver, a block silently corrupted on
//! disk (below the file system, so no stat field changes), the FUSE process killed with files
//! open, and 50 query clients at once while a sync runs.
//!
//! Every scenario ends by checking that the boxes converge (content, mode, mtime) and that no edit
//! was lost (each path's last content is at its path or in a `.sync-conflict-` copy), then prints
//! one line `fault-scenario<TAB>name<TAB>runs<TAB>faults<TAB>survived<TAB>lost` (read by
//! scripts/faults.sh). `MYBOX_FAULTS_FULL=1` runs the long versions (20 kills, ...);
//! `MYBOX_FAULT_SEED` replays a seed. Scenarios that need namespaces, loop devices, tmpfs or FUSE
//! print why they skip when not root.

mod common;
mod mount_support;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MIB: usize = 1024 * 1024;

fn full() -> bool {
    std::env::var("MYBOX_FAULTS_FULL").is_ok_and(|v| v == "1")
}

fn runs(quick: usize, long: usize) -> usize {
    if full() {
        long
    } else {
        quick
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn report(name: &str, runs: usize, faults: usize, survived: usize, lost: usize) {
    println!("fault-scenario\t{name}\t{runs}\t{faults}\t{survived}\t{lost}");
}

/// xorshift64*: reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn from_env(label: &str) -> Rng {
        let seed = std::env::var("MYBOX_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
                    | 1
            });
        eprintln!("{label}: MYBOX_FAULT_SEED={seed}");
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Content that differs for every (seed, len): compressible by nothing, cheap to make.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The last content written to every path, whichever box wrote it. Scenarios give each box its
/// own paths, so "last write" is never ambiguous.
#[derive(Default)]
struct Ledger(BTreeMap<String, Vec<u8>>);

impl Ledger {
    fn write(&mut self, b: &TestBox, rel: &str, data: Vec<u8>) {
        b.write(rel, &data);
        self.0.insert(rel.to_string(), data);
    }

    /// Paths whose last content is neither at the path nor in one of its conflict copies.
    fn lost(&self, t: &Tree) -> Vec<String> {
        self.0
            .iter()
            .filter(|(path, data)| {
                let at_path =
                    matches!(t.get(*path), Some(Entry::File { data: d, .. }) if d == *data);
                let (dir, name) = match path.rfind('/') {
                    Some(i) => (&path[..=i], &path[i + 1..]),
                    None => ("", path.as_str()),
                };
                let stem = name.split('.').next().unwrap_or(name);
                let prefix = format!("{dir}{stem}.sync-conflict-");
                let in_copy = t.iter().any(|(k, e)| {
                    k.starts_with(&prefix) && matches!(e, Entry::File { data: d, .. } if d == *data)
                });
                !at_path && !in_copy
            })
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Regular files in the tree that nobody wrote (a temp file at a real path, say).
    fn strays(&self, t: &Tree) -> Vec<String> {
        t.iter()
            .filter(|(k, e)| {
                matches!(e, Entry::File { .. })
                    && !self.0.contains_key(*k)
                    && !k.contains(".sync-conflict-")
            })
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// Like `wait_converged`, but an error instead of a panic so the scenario can still report.
fn try_converge(boxes: &[&TestBox], timeout: Duration) -> Result<Tree, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let first = boxes[0].snapshot();
        let mut why = None;
        for b in &boxes[1..] {
            let t = b.snapshot();
            if t != first {
                why = Some(format!(
                    "{} vs {}:\n{}",
                    boxes[0].name,
                    b.name,
                    diff(&first, &t)
                ));
                break;
            }
        }
        if why.is_none() {
            std::thread::sleep(Duration::from_millis(150));
            if boxes.iter().all(|b| b.snapshot() == first) {
                return Ok(first);
            }
        }
        if Instant::now() > deadline {
            let tails: Vec<String> = boxes
                .iter()
                .map(|b| {
                    let e = b.stderr();
                    let tail: Vec<&str> = e.lines().rev().take(25).collect();
                    format!(
                        "--- {} ---\n{}",
                        b.name,
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    )
                })
                .collect();
            return Err(format!(
                "no convergence within {timeout:?}: {}\n{}",
                why.unwrap_or_default(),
                tails.join("\n")
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Converged, nothing lost, nothing stray: returns the number of lost edits (0 on success) or
/// the reason it did not converge.
fn check_outcome(boxes: &[&TestBox], ledger: &Ledger, timeout: Duration) -> Result<usize, String> {
    let t = try_converge(boxes, timeout)?;
    let lost = ledger.lost(&t);
    let strays = ledger.strays(&t);
    if !strays.is_empty() {
        return Err(format!("files nobody wrote at real paths: {strays:?}"));
    }
    if !lost.is_empty() {
        eprintln!("lost edits: {lost:?}");
    }
    Ok(lost.len())
}

fn sync_tmp_busy(b: &TestBox) -> bool {
    fs::read_dir(b.root.join(".mybox/tmp/sync"))
        .map(|rd| rd.count() > 0)
        .unwrap_or(false)
}

#[test]
fn sigkill_either_daemon_during_large_sync() {
    let runs = runs(3, 20);
    let mut rng = Rng::from_env("sigkill");
    let (mut a, mut b) = two_boxes();
    let mut ledger = Ledger::default();
    let (mut faults, mut survived, mut lost, mut failure) = (0, 0, 0, None);
    for run in 0..runs {
        // Both boxes change: a large file on one side (rewritten across runs, so deltas and
        // reused temp files are exercised too) and small files on both.
        let big_on_a = rng.below(2) == 0;
        let src = if big_on_a { &a } else { &b };
        let big = format!("{}/big{}.bin", src.name, run % 3);
        // Odd runs go past 32 MiB, where the receiver writes with O_DIRECT.
        let size = (if run % 2 == 0 { 16 } else { 33 } + rng.below(16) as usize) * MIB;
        ledger.write(src, &big, pattern(rng.next(), size));
        for i in 0..10 {
            for side in [&a, &b] {
                let rel = format!("{}/r{run}/s{i}.txt", side.name);
                let data = format!("{} run {run} file {i} {}", side.name, rng.next());
                ledger.write(side, &rel, data.into_bytes());
            }
        }
        // Kill at a random moment: during the scan, the index exchange or the block transfer.
        std::thread::sleep(Duration::from_millis(rng.below(900)));
        let victim = if rng.below(2) == 0 { &mut a } else { &mut b };
        victim.kill9();
        faults += 1;
        // An edit made while the victim is down must survive too.
        let rel = format!("{}/down{run}.txt", victim.name);
        let data = format!("written while {} was dead, run {run}", victim.name).into_bytes();
        ledger.write(victim, &rel, data);
        victim.start();
        match check_outcome(&[&a, &b], &ledger, Duration::from_secs(90)) {
            Ok(n) => {
                lost += n;
                if n == 0 {
                    survived += 1;
                }
            }
            Err(e) => {
                failure = Some(format!("run {run}: {e}"));
                break;
            }
        }
    }
    report("sigkill-daemon", runs, faults, survived, lost);
    assert!(failure.is_none(), "{}", failure.unwrap_or_default());
    assert_eq!(lost, 0, "edits lost");
    for bx in [&a, &b] {
        let left = fs::read_dir(bx.root.join(".mybox/tmp/sync"))
            .map(|rd| rd.count())
            .unwrap_or(0);
        assert_eq!(left, 0, "{}: temp files left behind", bx.name);
    }
}

/// Two network namespaces joined by a veth pair; removed (with the veth) on drop.
struct NetPair {
    ns: [String; 2],
    addr: [String; 2],
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl NetPair {
    fn new() -> Option<NetPair> {
        let tag = std::process::id() % 100_000;
        let ns = [format!("mbf{tag}a"), format!("mbf{tag}b")];
        let octet = 1 + (tag % 250);
        let addr = [format!("10.199.{octet}.1"), format!("10.199.{octet}.2")];
        let veth = [format!("mbf{tag}x"), format!("mbf{tag}y")];
        let np = NetPair { ns, addr };
        let ok = ip(&["netns", "add", &np.ns[0]])
            && ip(&["netns", "add", &np.ns[1]])
            && ip(&[
                "link", "add", &veth[0], "netns", &np.ns[0], "type", "veth", "peer", "name",
                &veth[1], "netns", &np.ns[1],
            ])
            && (0..2).all(|i| {
                ip(&["-n", &np.ns[i], "link", "set", "lo", "up"])
                    && ip(&[
                        "-n",
                        &np.ns[i],
                        "addr",
                        "add",
                        &format!("{}/24", np.addr[i]),
                        "dev",
                        &veth[i],
                    ])
                    && ip(&["-n", &np.ns[i], "link", "set", &veth[i], "up"])
            });
        if !ok {
            eprintln!("skipping: could not build two network namespaces with a veth pair");
            return None;
        }
        Some(np)
    }

    /// Drop everything in and out of namespace `i` (`-I`), or stop doing so (`-D`).
    fn iptables(&self, i: usize, op: &str) {
        for chain in ["INPUT", "OUTPUT"] {
            let ok = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.ns[i],
                    "iptables",
                    op,
                    chain,
                    "-j",
                    "DROP",
                ])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "iptables {op} {chain} in {}", self.ns[i]);
        }
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for n in &self.ns {
            ip(&["netns", "del", n]);
        }
    }
}

#[test]
fn network_cut_and_peer_restart_mid_transfer() {
    if !is_root() {
        eprintln!("skipping: network namespaces and iptables need root");
        return;
    }
    let Some(net) = NetPair::new() else {
        return;
    };
    let cuts = runs(1, 5);
    let mut rng = Rng::from_env("netcut");
    let mut a = TestBox::new("a");
    let mut b = TestBox::new("b");
    for (i, bx) in [&mut a, &mut b].into_iter().enumerate() {
        bx.ns = Some(net.ns[i].clone());
        bx.host = net.addr[i].clone();
    }
    pair(&a, &b);
    a.start();
    b.start();
    let mut ledger = Ledger::default();
    let (mut faults, mut survived, mut lost, mut failure) = (0, 0, 0, None);
    for run in 0..cuts {
        ledger.write(
            &a,
            &format!("a/big{run}.bin"),
            pattern(rng.next(), 48 * MIB),
        );
        wait_for("the transfer to start", Duration::from_secs(60), || {
            sync_tmp_busy(&b)
        });
        // Cut b off (every packet in and out dropped), change both sides meanwhile, restore.
        net.iptables(1, "-I");
        faults += 1;
        let (have, size) = (
            fs::metadata(b.path(&format!("a/big{run}.bin"))).is_ok(),
            48 * MIB,
        );
        eprintln!("cut {run}: b had the {size}-byte file already: {have}");
        for side in [&a, &b] {
            let rel = format!("{}/cut{run}.txt", side.name);
            ledger.write(side, &rel, format!("during cut {run}").into_bytes());
        }
        let secs = if full() { 2 + rng.below(25) } else { 3 };
        std::thread::sleep(Duration::from_secs(secs));
        net.iptables(1, "-D");
        match check_outcome(&[&a, &b], &ledger, Duration::from_secs(120)) {
            Ok(n) => {
                lost += n;
                survived += usize::from(n == 0);
            }
            Err(e) => {
                failure = Some(format!("cut {run} ({secs} s): {e}"));
                break;
            }
        }
    }
    report("network-cut", cuts, faults, survived, lost);
    assert!(failure.is_none(), "{}", failure.unwrap_or_default());

    // The sending peer restarted (clean stop, then start) in the middle of a transfer.
    let (mut faults, mut survived) = (0, 0);
    let restarts = runs(1, 3);
    for run in 0..restarts {
        ledger.write(
            &a,
            &format!("a/restart{run}.bin"),
            pattern(rng.next(), 48 * MIB),
        );
        wait_for("the transfer to start", Duration::from_secs(60), || {
            sync_tmp_busy(&b)
        });
        a.stop();
        faults += 1;
        ledger.write(
            &b,
            &format!("b/restart{run}.txt"),
            b"while a restarted".to_vec(),
        );
        a.start();
        match check_outcome(&[&a, &b], &ledger, Duration::from_secs(120)) {
            Ok(n) => {
                lost += n;
                survived += usize::from(n == 0);
            }
            Err(e) => {
                failure = Some(format!("restart {run}: {e}"));
                break;
            }
        }
    }
    report("peer-restart", restarts, faults, survived, lost);
    assert!(failure.is_none(), "{}", failure.unwrap_or_default());
    assert_eq!(lost, 0, "edits lost");
}

/// A file system mounted for one test (tmpfs or a loop-mounted image); lazily unmounted on drop.
struct Mounted(PathBuf);

impl Mounted {
    fn tmpfs(at: &Path, size: &str) -> Option<Mounted> {
        fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Mounted(at.to_path_buf()))
    }

    fn ext4_image(img: &Path, at: &Path) -> Option<Mounted> {
        fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args(["-o", "loop"])
            .arg(img)
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Mounted(at.to_path_buf()))
    }

    /// Unmount cleanly and, for a loop mount of `img`, wait until the loop device is released
    /// (its last writes land in the image after umount returns).
    fn unmount(self, img: &Path) {
        let _ = Command::new("sync").arg("-f").arg(&self.0).status();
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "umount {}", self.0.display());
        std::mem::forget(self);
        wait_for(
            "the loop device to be released",
            Duration::from_secs(10),
            || {
                Command::new("losetup")
                    .arg("-j")
                    .arg(img)
                    .output()
                    .is_ok_and(|o| o.status.success() && o.stdout.is_empty())
            },
        );
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A TestBox whose store lives at `root` (on a special file system).
fn box_at(root: &Path, name: &str) -> TestBox {
    let out = Command::new(BIN).arg("init").arg(root).output().unwrap();
    assert!(out.status.success(), "init: {out:?}");
    let mut b = TestBox::new(&format!("{name}-unused"));
    b.root = root.canonicalize().unwrap();
    b.id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    b.name = name.into();
    b
}

#[test]
fn disk_full_on_receiver_reports_and_resumes() {
    if !is_root() {
        eprintln!("skipping: mounting a small tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(m) = Mounted::tmpfs(&dir.path().join("small"), "24m") else {
        eprintln!("skipping: cannot mount a tmpfs here");
        return;
    };
    let cycles = runs(1, 3);
    let mut rng = Rng::from_env("diskfull");
    let mut a = TestBox::new("a");
    let mut b = box_at(&m.0.join("b"), "b");
    pair(&a, &b);
    a.start();
    b.start();
    let mut ledger = Ledger::default();
    ledger.write(&a, "a/kept.txt", b"synced before the disk filled".to_vec());
    check_outcome(&[&a, &b], &ledger, CONVERGE).unwrap();
    let (mut faults, mut survived, mut lost) = (0, 0, 0);
    for run in 0..cycles {
        // Fill b's file system with something that does not sync, then send more than fits.
        fs::write(b.root.join(".mybox/filler"), vec![0u8; 14 * MIB]).unwrap();
        let big = format!("a/too-big{run}.bin");
        ledger.write(&a, &big, pattern(rng.next(), 12 * MIB));
        faults += 1;
        wait_for("a disk-full error in b's status", CONVERGE, || {
            b.status_json()["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("disk full"))
        });
        let log = fs::read_to_string(b.log_path()).unwrap_or_default();
        assert!(log.contains("disk full"), "not in b's daemon.log");
        assert!(!b.path(&big).exists(), "partial file at its real path");
        assert_eq!(
            b.read("a/kept.txt").unwrap(),
            b"synced before the disk filled",
            "an existing file was damaged"
        );
        fs::remove_file(b.root.join(".mybox/filler")).unwrap();
        let n = check_outcome(&[&a, &b], &ledger, CONVERGE).unwrap();
        lost += n;
        survived += usize::from(n == 0);
        // Make room for the next cycle.
        fs::remove_file(a.path(&big)).unwrap();
        ledger.0.remove(&big);
        check_outcome(&[&a, &b], &ledger, CONVERGE).unwrap();
    }
    report("disk-full", cycles, faults, survived, lost);
    assert_eq!(lost, 0);
    a.kill9();
    b.kill9();
}

/// An ext4 image holding box `b` with one file whose on-disk bytes are then flipped underneath
/// the file system (size, mtime, ctime and inode unchanged: what bit rot looks like). Returns
/// the mount, b, the original and the corrupted content. None when this machine cannot do it.
/// `precious.bin` has `size` bytes (more than 300,000).
fn silently_corrupted_box(dir: &Path, size: usize) -> Option<(Mounted, TestBox, Vec<u8>, Vec<u8>)> {
    let img = dir.join("disk.img");
    File::create(&img).ok()?.set_len(64 * MIB as u64).ok()?;
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&img)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipping: mkfs.ext4 failed");
        return None;
    }
    let mnt = dir.join("disk");
    let m = Mounted::ext4_image(&img, &mnt)?;
    let b = box_at(&m.0.join("b"), "b");
    let marker = b"<<mybox-fault-scenario-block-to-corrupt>>";
    let mut good = pattern(77, size);
    let at = 300_000; // inside the third 128 KiB block
    good[at..at + marker.len()].copy_from_slice(marker);
    b.write("precious.bin", &good);
    b.write("healthy.txt", b"fine");
    // Record the good hashes in b's index (a scan at the current stat key).
    let out = mybox(&b.root, &["hash", "checkall", "--local"]);
    assert!(out.status.success(), "{out:?}");
    let before = fs::metadata(b.path("precious.bin")).unwrap();
    let root = b.root.clone();
    m.unmount(&img);
    // Flip the marker's bytes in the image, in place.
    let bytes = fs::read(&img).unwrap();
    let hits: Vec<usize> = bytes
        .windows(marker.len())
        .enumerate()
        .filter(|(_, w)| *w == marker)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "marker found {} times in the image",
        hits.len()
    );
    let flipped: Vec<u8> = marker.iter().map(|x| x ^ 0x5a).collect();
    drop(bytes);
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&flipped, hits[0] as u64).unwrap();
        f.sync_all().unwrap();
    }
    let m = Mounted::ext4_image(&img, &mnt)?;
    let after = fs::metadata(root.join("precious.bin")).unwrap();
    assert_eq!(
        (
            before.ino(),
            before.size(),
            before.mtime_nsec(),
            before.ctime_nsec()
        ),
        (
            after.ino(),
            after.size(),
            after.mtime_nsec(),
            after.ctime_nsec()
        ),
        "the corruption changed the stat key"
    );
    let bad = fs::read(root.join("precious.bin")).unwrap();
    assert_ne!(bad, good, "the corruption did not reach the file");
    Some((m, b, good, bad))
}

/// Daemons a and b running and paired, b holding a silently corrupted `precious.bin` of `size`
/// bytes and a healthy file that has already reached a. None when this machine cannot set it
/// up (not root, no mkfs.ext4). Fields drop in order: daemons, then the image, then its folder.
struct CorruptedPair {
    a: TestBox,
    b: TestBox,
    good: Vec<u8>,
    bad: Vec<u8>,
    _image: Mounted,
    dir: tempfile::TempDir,
}

fn corrupted_pair(size: usize) -> Option<CorruptedPair> {
    if !is_root() {
        eprintln!("skipping: loop-mounting an ext4 image needs root");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let (image, mut b, good, bad) = silently_corrupted_box(dir.path(), size)?;
    let mut a = TestBox::new("a");
    pair(&a, &b);
    b.start();
    a.start();
    wait_for("the healthy file to sync", CONVERGE, || {
        a.read("healthy.txt").is_some()
    });
    Some(CorruptedPair {
        a,
        b,
        good,
        bad,
        _image: image,
        dir,
    })
}

#[test]
fn corrupted_block_is_never_served() {
    // Not destructured: the fields must drop in their order (daemons, image, folder).
    let Some(mut p) = corrupted_pair(2 * MIB) else {
        return;
    };
    let (a, b, good, bad) = (&mut p.a, &mut p.b, &p.good, &p.bad);
    // Give the engine time to try the corrupted file (and retry it).
    std::thread::sleep(Duration::from_secs(4));
    let got = a.read("precious.bin");
    assert!(
        got.is_none() || got.as_deref() == Some(&good[..]),
        "the peer stored content that is not the recorded version"
    );
    assert_ne!(got.as_deref(), Some(&bad[..]));
    // download tcp from the corrupted box: refused, nothing written.
    let out_path = p.dir.path().join("downloaded.bin");
    let out = mybox(
        &a.root,
        &[
            "download",
            "tcp",
            "precious.bin",
            "-o",
            out_path.to_str().unwrap(),
        ],
    );
    assert!(
        !out.status.success(),
        "download of a corrupted file succeeded: {out:?}"
    );
    assert!(!out_path.exists(), "corrupted download left a file");
    // download udp: the sender checks every block while the data goes out and never confirms.
    let out = mybox(
        &a.root,
        &[
            "download",
            "udp",
            "precious.bin",
            "-o",
            out_path.to_str().unwrap(),
        ],
    );
    assert!(
        !out.status.success(),
        "udp download of a corrupted file succeeded: {out:?}"
    );
    assert!(!out_path.exists(), "corrupted udp download left a file");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not match its recorded hash"),
        "udp download failed for another reason: {out:?}"
    );
    // The serving box says so in its log.
    let log = fs::read_to_string(b.log_path()).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains("precious.bin") && l.contains("does not match")),
        "b did not log the corruption:\n{}",
        b.stderr()
    );
    report("corrupted-block", 1, 1, 1, 0);
    a.kill9();
    b.kill9();
}

/// A small file (fetched in a `GetBatch` with other files, which the sender serves without
/// hashing while the file is as indexed) whose block is corrupted: the asker's own check catches
/// it, asks again with the sender checking, and the sender refuses and reports it. The peer
/// never stores the corrupted bytes and the healthy files of the batch still arrive.
#[test]
fn corrupted_small_file_in_a_batch_is_never_stored() {
    let Some(mut p) = corrupted_pair(400_000) else {
        return;
    };
    let (a, b, good, bad) = (&mut p.a, &mut p.b, &p.good, &p.bad);
    wait_for("b to report the corrupted file", CONVERGE, || {
        b.status_json()["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("precious.bin") && e.contains("does not match"))
    });
    let got = a.read("precious.bin");
    assert!(
        got.is_none() || got.as_deref() == Some(&good[..]),
        "the peer stored content that is not the recorded version"
    );
    assert_ne!(got.as_deref(), Some(&bad[..]));
    let log = fs::read_to_string(a.log_path()).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains("precious.bin") && l.contains("sender checking every block")),
        "a did not ask again with the sender checking:\n{log}"
    );
    a.kill9();
    b.kill9();
}

/// The box whose block is corrupted refuses the peer's GetBlocks and says so itself: an error
/// in its log and in its `mybox status` (it once answered "changed since it was announced" and
/// stayed silent while the peer retried forever).
#[test]
fn corrupted_block_is_reported_in_status() {
    let Some(mut p) = corrupted_pair(2 * MIB) else {
        return;
    };
    let (a, b) = (&mut p.a, &mut p.b);
    wait_for(
        "b to report the corrupted file in its status",
        CONVERGE,
        || {
            b.status_json()["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("precious.bin"))
        },
    );
    a.kill9();
    b.kill9();
}

/// `mybox mount MP` of a box (no daemon); killed with SIGKILL by the test.
fn start_mount(b: &TestBox, mnt: &Path, log: &Path) -> Child {
    let child = Command::new(BIN)
        .arg("--box")
        .arg(&b.root)
        .arg("mount")
        .arg(mnt)
        .env("MYBOX_LOG", "info,mybox=debug")
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(15);
    while !mybox::mount::is_mountpoint(mnt) || mybox::mount::is_stale(mnt) {
        assert!(
            Instant::now() < end,
            "mount did not come up:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn fuse_killed_with_open_files_recovers() {
    if !is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!("skipping: kernel mounts need root and /dev/fuse");
        return;
    }
    let kills = runs(1, 5);
    let b = TestBox::new("b");
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mnt = mnt.canonicalize().unwrap();
    let log = dir.path().join("mount.log");
    let mut committed: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let (mut survived, mut lost) = (0, 0);
    let mut child = Some(start_mount(&b, &mnt, &log));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for run in 0..kills {
            // Committed: written and closed through the mount.
            for i in 0..3 {
                let rel = format!("done{run}-{i}.bin");
                let data = pattern((run * 10 + i) as u64, 300_000 + i * 1000);
                fs::write(mnt.join(&rel), &data).unwrap();
                committed.insert(rel, data);
            }
            // Open at the moment of the kill: one new file and one rewrite being written,
            // one file open for reading.
            let mut w1 = File::create(mnt.join(format!("open{run}.bin"))).unwrap();
            w1.write_all(&pattern(99, 200_000)).unwrap();
            let first = format!("done{run}-0.bin");
            let mut w2 = fs::OpenOptions::new()
                .write(true)
                .open(mnt.join(&first))
                .unwrap();
            w2.write_all(b"half-written rewrite").unwrap();
            let r = File::open(mnt.join(format!("done{run}-1.bin"))).unwrap();
            if let Some(mut c) = child.take() {
                c.kill().unwrap();
                c.wait().unwrap();
            }
            drop((w1, w2, r));
            assert!(mybox::mount::is_stale(&mnt) || !mybox::mount::is_mountpoint(&mnt));
            // The next start recovers the mount point.
            child = Some(start_mount(&b, &mnt, &log));
            let mut ok = true;
            for (rel, data) in &committed {
                let through_mount = fs::read(mnt.join(rel)).ok();
                let in_store = b.read(rel);
                if through_mount.as_ref() != Some(data) || in_store.as_ref() != Some(data) {
                    eprintln!("committed {rel} lost or changed");
                    lost += 1;
                    ok = false;
                }
            }
            // An uncommitted new file is absent or whole-or-empty, never torn.
            if let Some(d) = b.read(&format!("open{run}.bin")) {
                assert!(
                    d.is_empty() || d == pattern(99, 200_000),
                    "torn uncommitted file"
                );
            }
            // The mount still works.
            let rel = format!("after{run}.txt");
            fs::write(mnt.join(&rel), b"after restart").unwrap();
            committed.insert(rel, b"after restart".to_vec());
            survived += usize::from(ok);
        }
    }));
    mount_support::teardown(
        BIN,
        &mnt,
        child.take(),
        Duration::from_secs(8),
        &fs::read_to_string(&log).unwrap_or_default(),
        "b",
    );
    report("fuse-kill", kills, kills, survived, lost);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
    assert_eq!(lost, 0, "committed data lost");
    assert_eq!(survived, kills);
}

#[test]
fn fifty_query_clients_while_syncing() {
    let (a, b) = two_boxes();
    let mut stable = BTreeMap::new();
    for i in 0..200 {
        let rel = format!("stable/f{i}.txt");
        let data = format!("stable file {i}");
        a.write(&rel, data.as_bytes());
        stable.insert(rel, data.len() as u64);
    }
    wait_converged(&[&a, &b], CONVERGE);
    // A sync in flight while the queries run: a large file and many small ones.
    a.write("moving/big.bin", &pattern(5, 32 * MIB));
    for i in 0..300 {
        a.write(&format!("moving/m{i}.txt"), format!("m{i}").as_bytes());
    }
    // 50 clients on b asking a (the peer), all at once.
    let kids: Vec<_> = (0..50)
        .map(|i| {
            let args: &[&str] = match i % 3 {
                0 => &["index", "longlist", "--json"],
                1 => &["hash", "checkall", "--json"],
                _ => &["index", "regex", "^stable/", "--json"],
            };
            Command::new(BIN)
                .arg("--box")
                .arg(&b.root)
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut answered = 0;
    for k in kids {
        let out = k.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "a query failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let got: BTreeMap<String, u64> = v
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| Some((e["path"].as_str()?.to_string(), e["size"].as_u64()?)))
            .filter(|(p, _)| p.starts_with("stable/"))
            .collect();
        assert_eq!(got, stable, "a query answered wrongly");
        answered += 1;
    }
    assert_eq!(answered, 50);
    wait_converged(&[&a, &b], Duration::from_secs(90));
}
