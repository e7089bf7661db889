//! `mybox mount --listen`: the daemon and the mount in one process. Two boxes paired on
//! loopback; changes made through one mount reach the other box (store and mount), changes
//! pulled by the engine are seen through the mount (kernel caches invalidated), and the
//! daemon's commands work from inside the mount. Real processes and kernel mounts: root only;
//! every mount is torn down by a guard.

mod common;

mod mount_support;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{pair, wait_for, TestBox, BIN};

fn can_mount() -> bool {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new("/dev/fuse").exists() {
        eprintln!("skipping: kernel mount tests need root and /dev/fuse");
        return false;
    }
    true
}

/// A `mybox mount MP --listen 127.0.0.1:PORT` process for a test box; dropping it unmounts.
struct SyncMount {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
    store: PathBuf,
    child: Option<Child>,
}

impl SyncMount {
    fn start(b: &TestBox) -> SyncMount {
        SyncMount::start_with(b, &[])
    }

    fn start_with(b: &TestBox, extra: &[&str]) -> SyncMount {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let mnt = mnt.canonicalize().unwrap();
        let log = File::create(dir.path().join("mount.log")).unwrap();
        let child = Command::new(BIN)
            .arg("--box")
            .arg(&b.root)
            .arg("mount")
            .arg(&mnt)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", b.port))
            .args(["--rescan-interval", "3"])
            .args(extra)
            .env("MYBOX_LOG", "info,mybox=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut m = SyncMount {
            _dir: dir,
            mnt: mnt.clone(),
            store: b.root.clone(),
            child: Some(child),
        };
        let end = Instant::now() + Duration::from_secs(15);
        while !mybox::mount::is_mountpoint(&mnt) || mybox::mount::is_stale(&mnt) {
            if let Some(Ok(Some(st))) = m.child.as_mut().map(|c| c.try_wait()) {
                panic!("mount exited early ({st}):\n{}", m.log());
            }
            assert!(Instant::now() < end, "mount did not come up:\n{}", m.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    fn log(&self) -> String {
        fs::read_to_string(self._dir.path().join("mount.log")).unwrap_or_default()
    }
}

impl Drop for SyncMount {
    fn drop(&mut self) {
        let log = self.log();
        mount_support::teardown(
            BIN,
            &self.mnt,
            self.child.take(),
            Duration::from_secs(8),
            &log,
            &self.store.display().to_string(),
        );
    }
}

fn boxes() -> (TestBox, TestBox) {
    let a = TestBox::new("a");
    let b = TestBox::new("b");
    pair(&a, &b);
    (a, b)
}

/// Paired boxes, B's daemon running, A mounted `--on-demand` (None where mounts are impossible).
fn on_demand_pair() -> Option<(TestBox, TestBox, SyncMount)> {
    if !can_mount() {
        return None;
    }
    let (a, mut b) = boxes();
    b.start();
    let ma = SyncMount::start_with(&a, &["--on-demand"]);
    Some((a, b, ma))
}

#[test]
fn mount_write_reaches_the_peer_store_and_mount() {
    if !can_mount() {
        return;
    }
    let (a, b) = boxes();
    let ma = SyncMount::start(&a);
    let mb = SyncMount::start(&b);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::create_dir(ma.p("docs")).unwrap();
    fs::write(ma.p("docs/report.bin"), &data).unwrap();
    wait_for("the file in B's store", Duration::from_secs(10), || {
        b.read("docs/report.bin").as_deref() == Some(&data[..])
    });
    wait_for("the file in B's mount", Duration::from_secs(5), || {
        fs::read(mb.p("docs/report.bin")).ok().as_deref() == Some(&data[..])
    });
    // And back: a change made in B's mount reaches A's mount.
    fs::write(mb.p("docs/reply.txt"), b"got it").unwrap();
    wait_for("the reply in A's mount", Duration::from_secs(10), || {
        fs::read(ma.p("docs/reply.txt")).ok().as_deref() == Some(&b"got it"[..])
    });
}

#[test]
fn mount_sees_changes_pulled_from_the_peer() {
    if !can_mount() {
        return;
    }
    let (a, mut b) = boxes();
    b.start();
    let ma = SyncMount::start(&a);
    b.write("notes.txt", b"version one\n");
    wait_for("v1 through A's mount", Duration::from_secs(10), || {
        fs::read(ma.p("notes.txt")).ok().as_deref() == Some(&b"version one\n"[..])
    });
    // Stat and read again so the kernel caches the entry, attributes and pages...
    assert_eq!(fs::metadata(ma.p("notes.txt")).unwrap().len(), 12);
    assert_eq!(fs::read(ma.p("notes.txt")).unwrap(), b"version one\n");
    // ...then change it on B. The kernel keeps entries and attributes for 10 s: seeing the new
    // size and bytes much sooner than that means the engine's apply invalidated them.
    let v2 = b"version two, somewhat longer\n";
    b.write("notes.txt", v2);
    wait_for("v2 in A's store", Duration::from_secs(10), || {
        a.read("notes.txt").as_deref() == Some(&v2[..])
    });
    // (Only stat here: an open makes the kernel refresh the attributes by itself.)
    wait_for(
        "v2's size through A's mount",
        Duration::from_secs(2),
        || fs::metadata(ma.p("notes.txt")).map(|m| m.len()).ok() == Some(v2.len() as u64),
    );
    assert_eq!(fs::read(ma.p("notes.txt")).unwrap(), v2);
    assert_eq!(
        fs::metadata(ma.p("notes.txt")).unwrap().len(),
        v2.len() as u64
    );
    // A deletion on B disappears from the mount as well.
    fs::remove_file(b.path("notes.txt")).unwrap();
    wait_for("the deletion in A's store", Duration::from_secs(10), || {
        a.read("notes.txt").is_none()
    });
    wait_for(
        "the deletion through A's mount",
        Duration::from_secs(2),
        || !ma.p("notes.txt").exists(),
    );
}

#[test]
fn mount_daemon_commands_work_from_inside() {
    if !can_mount() {
        return;
    }
    let (a, mut b) = boxes();
    b.start();
    let ma = SyncMount::start(&a);
    fs::create_dir(ma.p("sub")).unwrap();
    fs::write(ma.p("sub/hello.txt"), b"hello").unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .current_dir(ma.p("sub"))
            .env_remove("MYBOX_BOX")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let mut status = String::new();
    wait_for(
        "status to show B connected",
        Duration::from_secs(10),
        || {
            status = run(&["status"]);
            status.contains("connected") && !status.contains("not connected")
        },
    );
    assert!(status.contains("daemon running for"), "{status}");
    let sums = run(&["--local", "--json", "hash", "checkall"]);
    assert!(sums.contains("sub/hello.txt"), "{sums}");
    assert!(
        sums.contains("5d41402abc4b2a76b9719d911017c592"),
        "md5 of hello: {sums}"
    );
}

#[test]
fn mount_on_demand_placeholders_fetch_when_read() {
    let Some((a, mut b, ma)) = on_demand_pair() else {
        return;
    };
    let one: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let two: Vec<u8> = (0..50_000u32).map(|i| (i % 241) as u8).collect();
    fs::create_dir(b.path("data")).unwrap();
    b.write("data/one.bin", &one);
    b.write("data/two.bin", &two);
    // Listed through the mount with the right size, before any content is here.
    wait_for(
        "the placeholders in A's mount",
        Duration::from_secs(10),
        || {
            let names: Vec<String> = fs::read_dir(ma.p("data"))
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().to_string())
                        .collect()
                })
                .unwrap_or_default();
            names.contains(&"one.bin".to_string()) && names.contains(&"two.bin".to_string())
        },
    );
    assert_eq!(fs::metadata(ma.p("data/one.bin")).unwrap().len(), 200_000);
    assert_eq!(fs::metadata(ma.p("data/two.bin")).unwrap().len(), 50_000);
    // The directory was applied in the background, the files' content was not.
    assert!(a.path("data").is_dir());
    std::thread::sleep(Duration::from_millis(500));
    assert!(a.read("data/one.bin").is_none(), "pulled in the background");
    assert!(a.read("data/two.bin").is_none(), "pulled in the background");
    // Reading a placeholder fetches it; once complete it is installed in the store.
    assert_eq!(fs::read(ma.p("data/one.bin")).unwrap(), one);
    wait_for(
        "one.bin installed in A's store",
        Duration::from_secs(10),
        || a.read("data/one.bin").as_deref() == Some(&one[..]),
    );
    // With B gone, reading the other one fails with EIO, well within the fetch bound.
    b.stop();
    let t = Instant::now();
    let err = fs::read(ma.p("data/two.bin")).expect_err("read without a peer");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // What was fetched stays readable.
    assert_eq!(fs::read(ma.p("data/one.bin")).unwrap(), one);
}

/// Names in a directory of a mount, through a fresh `readdir` (which the kernel answers from its
/// cached listing when it holds one).
fn names_in(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn mount_on_demand_new_placeholder_shows_in_a_cached_listing() {
    let Some((a, b, ma)) = on_demand_pair() else {
        return;
    };
    fs::create_dir(b.path("inbox")).unwrap();
    b.write("inbox/first.txt", b"first");
    wait_for("the first placeholder", Duration::from_secs(10), || {
        names_in(&ma.p("inbox")).contains(&"first.txt".to_string())
    });
    // The kernel now caches this listing (the mount lets it keep directory listings); an open
    // directory handle keeps it in use as well.
    let held = fs::read_dir(ma.p("inbox")).unwrap();
    assert_eq!(names_in(&ma.p("inbox")), vec!["first.txt".to_string()]);
    // A new file on B becomes a placeholder here: no store entry and no directory change
    // here, so only an invalidation from the engine can make a cached listing show it.
    b.write("inbox/second.txt", b"second, longer");
    wait_for(
        "the new placeholder in a listing",
        Duration::from_secs(10),
        || names_in(&ma.p("inbox")).contains(&"second.txt".to_string()),
    );
    assert!(
        a.read("inbox/second.txt").is_none(),
        "pulled in the background"
    );
    assert_eq!(fs::metadata(ma.p("inbox/second.txt")).unwrap().len(), 14);
    drop(held);
    // And the status reports both as online-only, not as work to pull.
    let out = Command::new(BIN)
        .args(["--json", "status"])
        .current_dir(&ma.mnt)
        .env_remove("MYBOX_BOX")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["online_only_files"], 2, "{v}");
    assert_eq!(v["online_only_bytes"], 5 + 14, "{v}");
    assert_eq!(v["to_pull_files"], 0, "{v}");
    let text = Command::new(BIN)
        .arg("status")
        .current_dir(&ma.mnt)
        .env_remove("MYBOX_BOX")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("online-only: 2 files"), "{text}");
}

/// Content that differs in every block (so no block can be reused from another).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A 128 MiB file of B's as a placeholder in A's on-demand mount.
const BIG: usize = 128 << 20;

fn big_placeholder(a: &TestBox, b: &TestBox, ma: &SyncMount) -> Vec<u8> {
    let data = pattern(BIG, 0x5eed);
    b.write("big.bin", &data);
    wait_for("the big placeholder", Duration::from_secs(30), || {
        fs::metadata(ma.p("big.bin")).map(|m| m.len()).ok() == Some(BIG as u64)
    });
    assert!(!a.path("big.bin").exists(), "pulled in the background");
    data
}

#[test]
fn mount_on_demand_read_at_an_offset_is_served_before_the_whole_file() {
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    let Some((a, b, ma)) = on_demand_pair() else {
        return;
    };
    let data = big_placeholder(&a, &b, &ma);
    // A read near the end, across a block boundary, right after the open: the stream starts at
    // the beginning, so only a fetch of these blocks ahead of it can answer before the whole
    // file (128 MiB, then an fsync) is installed.
    let mut f = File::open(ma.p("big.bin")).unwrap();
    let off = BIG - 3 * 131_072 - 1000;
    let mut buf = vec![0u8; 200_000];
    f.read_exact_at(&mut buf, off as u64).unwrap();
    let installed_before = a.path("big.bin").exists();
    assert!(buf == data[off..off + buf.len()], "wrong bytes at {off}");
    assert!(
        !installed_before,
        "the file was complete before a read at its end returned"
    );
    let log = ma.log();
    assert!(
        log.lines()
            .any(|l| l.contains("big.bin: read at block") && l.contains("ahead of the stream")),
        "the read did not ask for its blocks first:\n{log}"
    );
    // The whole file through the same descriptor, then installed in the store.
    let mut all = Vec::new();
    f.read_to_end(&mut all).unwrap();
    assert!(all == data, "content read through the mount differs");
    drop(f);
    wait_for(
        "big.bin installed in A's store",
        Duration::from_secs(30),
        || fs::metadata(a.path("big.bin")).map(|m| m.len()).ok() == Some(BIG as u64),
    );
    assert!(
        a.read("big.bin").unwrap() == data,
        "installed content differs"
    );
    // Every block travelled once, and a later open reads the store file.
    let st = a.status_json();
    assert_eq!(st["stats"]["bytes_fetched"], BIG as u64, "{st}");
    assert!(fs::read(ma.p("big.bin")).unwrap() == data);
}

#[test]
fn mount_on_demand_read_fails_with_eio_when_the_peer_dies_mid_stream() {
    use std::os::unix::fs::FileExt;
    let Some((a, mut b, ma)) = on_demand_pair() else {
        return;
    };
    let data = big_placeholder(&a, &b, &ma);
    let f = File::open(ma.p("big.bin")).unwrap();
    let mut head = vec![0u8; 4096];
    f.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, data[..4096]);
    // Freeze B: the stream stops far from the end, and nothing answers the next read...
    let pid = b.child.as_ref().unwrap().id() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let reader = std::thread::spawn(move || {
        let mut tail = vec![0u8; 4096];
        let t = Instant::now();
        (f.read_exact_at(&mut tail, (BIG - 4096) as u64), t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    // ...until B dies: the waiting read fails with EIO, well within the read's bound.
    b.kill9();
    let (res, waited) = reader.join().unwrap();
    let err = res.expect_err("read of a block nobody can send");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(waited < Duration::from_secs(20), "{waited:?}");
    let log = ma.log();
    assert!(
        log.lines()
            .any(|l| l.contains("big.bin: streaming for a read failed")),
        "{log}"
    );
    // Nothing half-fetched reached the store, and the placeholder stays one.
    assert!(!a.path("big.bin").exists());
    assert_eq!(
        fs::metadata(ma.p("big.bin")).unwrap().len(),
        BIG as u64,
        "placeholder gone"
    );
}

#[test]
fn mount_on_demand_placeholder_opened_for_writing_is_fetched_first() {
    use std::io::Write;
    let Some((_a, b, ma)) = on_demand_pair() else {
        return;
    };
    b.write("log.txt", b"first line\n");
    wait_for("the placeholder", Duration::from_secs(10), || {
        ma.p("log.txt").exists()
    });
    // Appending needs the content: it is fetched (and installed) before the writer locks the
    // path, so the install does not wait for the writer's lock.
    let t = Instant::now();
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(ma.p("log.txt"))
        .unwrap();
    f.write_all(b"second line\n").unwrap();
    drop(f);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(
        fs::read(ma.p("log.txt")).unwrap(),
        b"first line\nsecond line\n"
    );
    wait_for("the append on B", Duration::from_secs(10), || {
        b.read("log.txt").as_deref() == Some(&b"first line\nsecond line\n"[..])
    });
}
