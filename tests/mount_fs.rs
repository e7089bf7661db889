//! Real kernel mounts: `mybox mount` in a child process, checked with plain std::fs calls.
//! Every mount is torn down by a guard (umount, then a lazy detach) so a failing test never
//! leaves a wedged mount behind. Skipped when not root or without /dev/fuse.

mod mount_support;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mybox::config::BoxDir;
use mybox::index::Index;
use mybox::paths::RelPath;

const BIN: &str = env!("CARGO_BIN_EXE_mybox");

fn can_mount() -> bool {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new("/dev/fuse").exists() {
        eprintln!("skipping: kernel mount tests need root and /dev/fuse");
        return false;
    }
    true
}

struct Mount {
    dir: tempfile::TempDir,
    store: PathBuf,
    mnt: PathBuf,
    child: Option<Child>,
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for {what}");
}

impl Mount {
    fn new() -> Mount {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        BoxDir::init(&store).unwrap();
        let store = store.canonicalize().unwrap();
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let mnt = mnt.canonicalize().unwrap();
        let mut m = Mount {
            dir,
            store,
            mnt,
            child: None,
        };
        m.start();
        m
    }

    fn start(&mut self) {
        let log = File::create(self.dir.path().join("mount.log")).unwrap();
        let child = Command::new(BIN)
            .arg("--box")
            .arg(&self.store)
            .arg("mount")
            .arg(&self.mnt)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let mnt = self.mnt.clone();
        // A stale mount left by a killed process is listed too: wait until it answers.
        wait_for("the mount", Duration::from_secs(10), || {
            mybox::mount::is_mountpoint(&mnt) && !mybox::mount::is_stale(&mnt)
        });
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    fn record(&self, rel: &str) -> Option<mybox::model::Record> {
        let b = BoxDir::open(&self.store).unwrap();
        let ix = Index::open(&b).unwrap();
        ix.get(&RelPath::parse(rel).unwrap())
            .unwrap()
            .map(|s| s.record)
    }

    fn wait_record(
        &self,
        rel: &str,
        ok: impl Fn(&mybox::model::Record) -> bool,
    ) -> mybox::model::Record {
        let mut last = None;
        wait_for(
            &format!("index record of {rel}"),
            Duration::from_secs(10),
            || {
                last = self.record(rel);
                last.as_ref().is_some_and(&ok)
            },
        );
        last.unwrap()
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("mount.log")).unwrap_or_default()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let log = self.log();
        mount_support::teardown(
            BIN,
            &self.mnt,
            self.child.take(),
            Duration::from_secs(3),
            &log,
            &self.mnt.display().to_string(),
        );
    }
}

#[test]
fn mount_write_read_and_commit_on_close() {
    if !can_mount() {
        return;
    }
    let m = Mount::new();
    fs::write(m.p("a.txt"), b"first version").unwrap();
    assert_eq!(fs::read(m.p("a.txt")).unwrap(), b"first version");
    assert_eq!(fs::read(m.store.join("a.txt")).unwrap(), b"first version");
    let r1 = m.wait_record("a.txt", |r| r.size == 13 && r.sha256.is_some());

    fs::write(m.p("a.txt"), b"second").unwrap();
    let r2 = m.wait_record("a.txt", |r| r.size == 6);
    assert!(r2.sequence > r1.sequence);
    assert_eq!(
        r2.version.compare(&r1.version),
        mybox::model::VvOrder::Greater
    );
    // Nothing private left in .mybox/tmp, and .mybox is not listed.
    assert_eq!(fs::read_dir(m.store.join(".mybox/tmp")).unwrap().count(), 0);
    let names: Vec<_> = fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["a.txt".to_string()]);
}

#[test]
fn mount_concurrent_reader_sees_old_or_new() {
    if !can_mount() {
        return;
    }
    let m = Mount::new();
    let n = 256 * 1024;
    fs::write(m.p("f"), vec![b'a'; n]).unwrap();
    let mut early = File::open(m.p("f")).unwrap();
    let mut w = OpenOptions::new().write(true).open(m.p("f")).unwrap();
    w.write_all(&vec![b'b'; n / 2]).unwrap();
    let read_all = |f: &mut File| {
        let mut v = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    };
    let mut during = File::open(m.p("f")).unwrap();
    assert_eq!(read_all(&mut early), vec![b'a'; n], "reader during a write");
    assert_eq!(
        read_all(&mut during),
        vec![b'a'; n],
        "reader opened mid-write"
    );
    w.write_all(&vec![b'b'; n / 2]).unwrap();
    drop(w); // close: publish
    let mut after = File::open(m.p("f")).unwrap();
    assert_eq!(
        read_all(&mut after),
        vec![b'b'; n],
        "reader opened after close"
    );
    let old = read_all(&mut early);
    assert!(
        old == vec![b'a'; n] || old == vec![b'b'; n],
        "an earlier reader sees one version, never a mixture"
    );
}

#[test]
fn mount_namespace_operations() {
    if !can_mount() {
        return;
    }
    let m = Mount::new();
    fs::create_dir_all(m.p("d/e")).unwrap();
    fs::write(m.p("d/e/x"), b"x").unwrap();
    fs::write(m.p("y"), b"yy").unwrap();
    // rename over an existing file, and of a directory
    fs::rename(m.p("d/e/x"), m.p("y")).unwrap();
    assert_eq!(fs::read(m.p("y")).unwrap(), b"x");
    fs::rename(m.p("d"), m.p("dd")).unwrap();
    assert!(m.p("dd/e").is_dir());
    assert!(!m.p("d").exists());
    // symlink / readlink
    std::os::unix::fs::symlink("y", m.p("dd/link")).unwrap();
    assert_eq!(fs::read_link(m.p("dd/link")).unwrap(), Path::new("y"));
    assert!(fs::symlink_metadata(m.p("dd/link"))
        .unwrap()
        .file_type()
        .is_symlink());
    // chmod
    fs::set_permissions(m.p("y"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(m.p("y")).unwrap().mode() & 0o7777, 0o640);
    // utimens
    let t = filetime::FileTime::from_unix_time(1_600_000_000, 123_000_000);
    filetime::set_file_times(m.p("y"), t, t).unwrap();
    let md = fs::metadata(m.p("y")).unwrap();
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_600_000_000, 123_000_000));
    // truncate (by path and through an open file)
    fs::write(m.p("t"), b"0123456789").unwrap();
    OpenOptions::new()
        .write(true)
        .open(m.p("t"))
        .unwrap()
        .set_len(3)
        .unwrap();
    assert_eq!(fs::read(m.p("t")).unwrap(), b"012");
    // unlink, rmdir
    fs::remove_file(m.p("dd/link")).unwrap();
    fs::remove_dir(m.p("dd/e")).unwrap();
    fs::remove_dir(m.p("dd")).unwrap();
    // hard links work within the mount
    fs::hard_link(m.p("y"), m.p("y2")).unwrap();
    assert_eq!(fs::metadata(m.p("y")).unwrap().nlink(), 2);
    assert_eq!(
        fs::metadata(m.p("y")).unwrap().ino(),
        fs::metadata(m.p("y2")).unwrap().ino()
    );
    fs::remove_file(m.p("y2")).unwrap();
    // the metadata folder can be neither listed, read nor created
    assert!(fs::read(m.p(".mybox/cert.pem")).is_err());
    assert!(fs::create_dir(m.p(".mybox")).is_err());
    assert!(fs::write(m.p(".mybox/x"), b"x").is_err());
    // statfs answers
    let c = std::ffi::CString::new(m.mnt.to_str().unwrap()).unwrap();
    // SAFETY: zeroed statvfs is filled by the call; c is valid.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    assert!(s.f_blocks > 0);
    // the index follows: mode and mtime of y committed, dd gone
    m.wait_record("y", |r| {
        r.mode == 0o640 && r.mtime_ns == 1_600_000_000_123_000_000
    });
    // dd is gone for the index: a tombstone, or never recorded if its whole life fell inside
    // one commit batch.
    wait_for("dd gone from the index", Duration::from_secs(10), || {
        m.record("dd").is_none_or(|r| r.deleted)
    });
}

/// A new file is written by the kernel straight into its private copy (passthrough, when the
/// kernel offers it): it must still be published on fsync and on close, keep committing what
/// is written after an fsync, and not leak into an older version's readers afterwards.
#[test]
fn mount_new_file_publishes_on_fsync_and_close() {
    if !can_mount() {
        return;
    }
    use sha2::{Digest, Sha256};
    let m = Mount::new();
    let a: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let b: Vec<u8> = (0..100_000u32).map(|i| (i % 241) as u8).collect();
    let mut f = File::create(m.p("n.bin")).unwrap();
    f.write_all(&a).unwrap();
    // Not in the store (so not synced) until published; the mount shows its size.
    assert!(!m.store.join("n.bin").exists());
    assert_eq!(fs::metadata(m.p("n.bin")).unwrap().len(), a.len() as u64);
    f.sync_all().unwrap();
    assert_eq!(fs::read(m.store.join("n.bin")).unwrap(), a);
    m.wait_record("n.bin", |r| r.size == a.len() as u64);
    // Written after the fsync: lands in the published file, committed on close.
    f.write_all(&b).unwrap();
    drop(f);
    let whole = [a.clone(), b.clone()].concat();
    assert_eq!(fs::read(m.p("n.bin")).unwrap(), whole);
    assert_eq!(fs::read(m.store.join("n.bin")).unwrap(), whole);
    let want: [u8; 32] = Sha256::digest(&whole).into();
    m.wait_record("n.bin", |r| r.sha256 == Some(want));
    // Right after the close: a reader keeps the version it opened while a new writer
    // rewrites the file (close-to-open holds for files created through the mount too).
    let mut early = File::open(m.p("n.bin")).unwrap();
    let mut w = OpenOptions::new().write(true).open(m.p("n.bin")).unwrap();
    w.write_all(&vec![b'x'; 4096]).unwrap();
    let mut seen = Vec::new();
    early.read_to_end(&mut seen).unwrap();
    assert_eq!(seen, whole, "an earlier reader sees the old version");
    drop(w);
    assert_eq!(&fs::read(m.p("n.bin")).unwrap()[..4096], &[b'x'; 4096][..]);
}

/// Names looked up while missing are remembered by the kernel as missing (negative entries);
/// every way of creating a name through the mount must still make it appear at once.
#[test]
fn mount_missing_names_appear_when_created() {
    if !can_mount() {
        return;
    }
    let m = Mount::new();
    fs::write(m.p("src"), b"x").unwrap();
    let names = ["file", "dir", "link", "hard", "moved"];
    for n in names {
        assert!(
            fs::symlink_metadata(m.p(n)).is_err(),
            "{n} exists too early"
        );
    }
    fs::write(m.p("file"), b"new").unwrap();
    fs::create_dir(m.p("dir")).unwrap();
    std::os::unix::fs::symlink("file", m.p("link")).unwrap();
    fs::hard_link(m.p("src"), m.p("hard")).unwrap();
    fs::rename(m.p("src"), m.p("moved")).unwrap();
    assert_eq!(fs::read(m.p("file")).unwrap(), b"new");
    assert!(fs::metadata(m.p("dir")).unwrap().is_dir());
    assert_eq!(fs::read(m.p("link")).unwrap(), b"new");
    assert_eq!(fs::read(m.p("hard")).unwrap(), b"x");
    assert_eq!(fs::read(m.p("moved")).unwrap(), b"x");
    // And gone again once removed.
    fs::remove_file(m.p("moved")).unwrap();
    assert!(fs::symlink_metadata(m.p("moved")).is_err());
    assert!(fs::symlink_metadata(m.p("src")).is_err());
}

#[test]
fn mount_reads_ahead_a_mebibyte() {
    if !can_mount() {
        return;
    }
    let m = Mount::new();
    // Sequential reads served by mybox (placeholders, no passthrough) come as 1 MiB requests,
    // not the kernel's default 128 KiB: the mount raises its own read-ahead.
    let dev = fs::metadata(&m.mnt).unwrap().dev();
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    assert_eq!(fs::read_to_string(&knob).unwrap().trim(), "1024", "{knob}");
}

#[test]
fn mount_large_file_reads_match() {
    if !can_mount() {
        return;
    }
    let m = Mount::new();
    let data: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 253) as u8).collect();
    fs::write(m.store.join("big"), &data).unwrap();
    assert_eq!(fs::read(m.p("big")).unwrap(), data);
    // A read at an offset.
    let mut f = File::open(m.p("big")).unwrap();
    f.seek(SeekFrom::Start(5_000_000)).unwrap();
    let mut buf = vec![0; 1000];
    f.read_exact(&mut buf).unwrap();
    assert_eq!(&buf[..], &data[5_000_000..5_001_000]);
    // A writer while it is open for reading still works.
    let mut w = OpenOptions::new().append(true).open(m.p("big")).unwrap();
    w.write_all(b"tail").unwrap();
    drop(w);
    drop(f);
    assert_eq!(
        fs::metadata(m.p("big")).unwrap().len(),
        data.len() as u64 + 4
    );
}

#[test]
fn mount_queries_find_the_box_from_inside() {
    if !can_mount() {
        return;
    }
    let m = Mount::new();
    fs::create_dir(m.p("sub")).unwrap();
    fs::write(m.p("sub/hello.txt"), b"hello").unwrap();
    let out = Command::new(BIN)
        .args(["--local", "--json", "hash", "checkall"])
        .current_dir(m.p("sub"))
        .env_remove("MYBOX_BOX")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("sub/hello.txt"), "{text}");
    assert!(
        text.contains("5d41402abc4b2a76b9719d911017c592"),
        "md5 of hello: {text}"
    );
}

#[test]
fn mount_stale_after_sigkill_is_cleared_by_umount_and_mount() {
    if !can_mount() {
        return;
    }
    let mut m = Mount::new();
    fs::write(m.p("kept"), b"kept").unwrap();
    let mut c = m.child.take().unwrap();
    c.kill().unwrap(); // SIGKILL: no chance to unmount
    c.wait().unwrap();
    assert!(mybox::mount::is_stale(&m.mnt));
    let e = fs::read_dir(&m.mnt).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    // `mybox umount` clears it...
    let st = Command::new(BIN)
        .arg("umount")
        .arg(&m.mnt)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(fs::metadata(&m.mnt).is_ok());
    assert!(!mybox::mount::is_mountpoint(&m.mnt));
    // ...and so does the next `mybox mount`.
    m.start();
    let mut c = m.child.take().unwrap();
    c.kill().unwrap();
    c.wait().unwrap();
    m.start();
    let got = fs::read(m.p("kept"));
    assert_eq!(
        got.as_deref().ok(),
        Some(&b"kept"[..]),
        "{got:?} store: {:?} log: {}",
        fs::read_dir(&m.store)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect::<Vec<_>>(),
        m.log()
    );
}

#[test]
fn mount_sigterm_unmounts_cleanly() {
    if !can_mount() {
        return;
    }
    let mut m = Mount::new();
    let mut c = m.child.take().unwrap();
    // SAFETY: plain kill(2) of our child.
    unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
    let end = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = c.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < end,
            "mount process did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}\n{}", m.log());
    assert!(!mybox::mount::is_mountpoint(&m.mnt));
}

/// Directories are listed by inode (the mount answers OPENDIR with ENOSYS): a listing read in
/// several getdents calls while names come and go through the mount returns every name that
/// stayed exactly once, and no name twice.
#[test]
fn mount_readdir_changes_between_calls_return_unchanged_entries_once() {
    if !can_mount() {
        return;
    }
    let m = Mount::new();
    let names: Vec<String> = (0..3000).map(|i| format!("file-{i:05}-abcdefgh")).collect();
    fs::create_dir(m.store.join("d")).unwrap();
    for n in &names {
        File::create(m.store.join("d").join(n)).unwrap();
    }
    let d = m.p("d");
    let mut it = fs::read_dir(&d).unwrap();
    let mut seen: Vec<String> = Vec::new();
    for _ in 0..300 {
        seen.push(
            it.next()
                .unwrap()
                .unwrap()
                .file_name()
                .into_string()
                .unwrap(),
        );
    }
    // Through the mount (the kernel drops its cached listing): 600 names go, some already
    // seen, most not; 500 arrive.
    let gone: std::collections::HashSet<&String> = names.iter().step_by(5).collect();
    for n in &gone {
        fs::remove_file(d.join(n)).unwrap();
    }
    let added: Vec<String> = (0..500).map(|i| format!("new-{i:05}")).collect();
    for n in &added {
        File::create(d.join(n)).unwrap();
    }
    for e in it {
        seen.push(e.unwrap().file_name().into_string().unwrap());
    }
    let mut count = std::collections::HashMap::new();
    for n in &seen {
        *count.entry(n.as_str()).or_insert(0) += 1;
    }
    assert!(
        count.iter().all(|(_, &c)| c == 1),
        "a name listed twice: {:?}",
        count.iter().find(|(_, &c)| c > 1)
    );
    for n in names.iter().filter(|n| !gone.contains(n)) {
        assert_eq!(count.get(n.as_str()), Some(&1), "{n} listed once");
    }
    for n in count.keys() {
        assert!(
            names.iter().any(|x| x == n) || added.iter().any(|x| x == n),
            "{n} came from nowhere"
        );
    }
    // And a new walk lists the directory as it is.
    let now: std::collections::BTreeSet<String> = fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let want: std::collections::BTreeSet<String> = names
        .iter()
        .filter(|n| !gone.contains(n))
        .chain(added.iter())
        .cloned()
        .collect();
    assert_eq!(now, want);
}

/// A directory far bigger than one kernel request lists every entry exactly once, and `ls -l`
/// style stats of the entries (READDIRPLUS) match the store.
#[test]
fn mount_big_directory_lists_every_entry_once() {
    if !can_mount() {
        return;
    }
    let m = Mount::new();
    let n = 20_000;
    fs::create_dir(m.store.join("big")).unwrap();
    for i in 0..n {
        fs::write(
            m.store.join("big").join(format!("entry-{i:05}")),
            vec![b'x'; i % 7],
        )
        .unwrap();
    }
    let mut seen: Vec<(String, u64)> = fs::read_dir(m.p("big"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let len = e.metadata().unwrap().len();
            (e.file_name().into_string().unwrap(), len)
        })
        .collect();
    assert_eq!(seen.len(), n);
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), n, "each entry once");
    for (i, (name, len)) in seen.iter().enumerate() {
        assert_eq!(name, &format!("entry-{i:05}"));
        assert_eq!(*len, (i % 7) as u64);
    }
}

/// Close-to-open for new files (no fsync): right after the close, a reader gets the complete
/// file as a version of its own, which a new writer does not change under it, and the store
/// has it. (Publishing at the asynchronous RELEASE instead of FLUSH failed this unless opens
/// waited for the RELEASE, and lost files closed just before a SIGKILL: see docs/fuse.md.)
#[test]
fn mount_new_file_closed_is_published_for_the_next_open() {
    if !can_mount() {
        return;
    }
    let m = Mount::new();
    for i in 0..20u8 {
        let name = format!("f{i}");
        let data = vec![i; 10_000 + usize::from(i)];
        fs::write(m.p(&name), &data).unwrap();
        let mut early = File::open(m.p(&name)).unwrap();
        assert_eq!(fs::read(m.store.join(&name)).unwrap(), data);
        let mut w = OpenOptions::new().write(true).open(m.p(&name)).unwrap();
        w.write_all(b"rewritten").unwrap();
        let mut seen = Vec::new();
        early.read_to_end(&mut seen).unwrap();
        assert_eq!(seen, data, "{name}: a reader keeps the version it opened");
        drop(w);
        assert_eq!(&fs::read(m.p(&name)).unwrap()[..9], b"rewritten");
    }
    m.wait_record("f19", |r| r.size == 10_019);
}
