//! The vfs core without a kernel: the same calls the fuser adapter makes, checked directly.

use std::ffi::OsStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mybox::config::BoxDir;
use mybox::index::Index;
use mybox::model::{Kind, Record, VersionVector, BLOCK_SIZE};
use mybox::paths::RelPath;
use mybox::scan::{self, HashWanted};
use mybox::vfs::hooks::{ChangeSink, ContentSource, Invalidator, RemoteView};
use mybox::vfs::inodes::ROOT_INO;
use mybox::vfs::{Caller, FileKind, SetAttr, Vfs, VfsError, VfsOptions, VfsResult};

const ME: Caller = Caller { uid: 0, gid: 0 };

struct Fixture {
    _dir: tempfile::TempDir,
    b: BoxDir,
    vfs: Vfs,
    device: u64,
}

fn fixture_with(opts: VfsOptions) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (b, ident) = BoxDir::init(&dir.path().join("store")).unwrap();
    let device = ident.id.short();
    let vfs = Vfs::new(b.clone(), device, opts).unwrap();
    Fixture {
        _dir: dir,
        b,
        vfs,
        device,
    }
}

fn fixture() -> Fixture {
    fixture_with(VfsOptions::default())
}

fn p(s: &str) -> RelPath {
    RelPath::parse(s).unwrap()
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// Create `name` in the root with `data`, through create/write/flush/release.
fn put(vfs: &Vfs, name: &str, data: &[u8]) -> u64 {
    let (a, o) = vfs
        .create(ME, ROOT_INO, os(name), 0o644, 0o022, libc::O_WRONLY)
        .unwrap();
    vfs.write(o.fh, 0, data).unwrap();
    vfs.flush(o.fh).unwrap();
    vfs.release(o.fh).unwrap();
    a.ino
}

fn read_all(vfs: &Vfs, fh: u64) -> Vec<u8> {
    vfs.read(fh, 0, 64 << 20).unwrap()
}

fn record(b: &BoxDir, path: &str) -> Option<Record> {
    Index::open(b)
        .unwrap()
        .get(&p(path))
        .unwrap()
        .map(|s| s.record)
}

#[test]
fn write_then_read_and_commit_bumps_version() {
    let f = fixture();
    let ino = put(&f.vfs, "a.txt", b"one");
    assert!(f.vfs.wait_committed(Duration::from_secs(10)));
    let r1 = record(&f.b, "a.txt").expect("committed");
    assert_eq!(r1.size, 3);
    assert!(r1.sha256.is_some());

    let o = f.vfs.open(ino, libc::O_WRONLY | libc::O_TRUNC).unwrap();
    f.vfs.write(o.fh, 0, b"two!").unwrap();
    f.vfs.release(o.fh).unwrap();
    assert!(f.vfs.wait_committed(Duration::from_secs(10)));
    let r2 = record(&f.b, "a.txt").unwrap();
    assert_eq!(r2.size, 4);
    assert!(r2.sequence > r1.sequence);
    assert_eq!(
        r2.version.compare(&r1.version),
        mybox::model::VvOrder::Greater
    );
    assert_eq!(r2.version.get(f.device), r1.version.get(f.device) + 1);
    assert_eq!(std::fs::read(f.b.root.join("a.txt")).unwrap(), b"two!");
    // No shadow left behind.
    assert_eq!(std::fs::read_dir(f.b.tmp_dir()).unwrap().count(), 0);
    let mut names: Vec<String> = std::fs::read_dir(&f.b.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec![".mybox", "a.txt"]);
}

#[test]
fn readers_see_old_or_new_never_a_mixture() {
    let f = fixture();
    let ino = put(&f.vfs, "f", &[b'a'; 10_000]);
    let early = f.vfs.open(ino, libc::O_RDONLY).unwrap();
    let w = f.vfs.open(ino, libc::O_RDWR).unwrap();
    f.vfs.write(w.fh, 0, &[b'b'; 5_000]).unwrap();
    // The writer sees its own writes; a reader opening now still sees the old version.
    assert_eq!(&read_all(&f.vfs, w.fh)[..5_000], &[b'b'; 5_000][..]);
    let during = f.vfs.open(ino, libc::O_RDONLY).unwrap();
    assert_eq!(read_all(&f.vfs, during.fh), vec![b'a'; 10_000]);
    assert!(f.vfs.locks().is_write_locked(&p("f")));
    f.vfs.write(w.fh, 5_000, &[b'b'; 5_000]).unwrap();
    f.vfs.flush(w.fh).unwrap();
    f.vfs.release(w.fh).unwrap();
    assert!(!f.vfs.locks().is_write_locked(&p("f")));
    // Opened before the close: old version, whole. Opened after: new version, whole.
    assert_eq!(read_all(&f.vfs, early.fh), vec![b'a'; 10_000]);
    assert_eq!(read_all(&f.vfs, during.fh), vec![b'a'; 10_000]);
    let after = f.vfs.open(ino, libc::O_RDONLY).unwrap();
    assert_eq!(read_all(&f.vfs, after.fh), vec![b'b'; 10_000]);
    for h in [early.fh, during.fh, after.fh] {
        f.vfs.release(h).unwrap();
    }
    assert!(f.vfs.locks().is_empty());
}

#[test]
fn small_edit_of_large_file_rehashes_only_changed_blocks() {
    let f = fixture();
    let size = 16 << 20;
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let ino = put(&f.vfs, "big.bin", &data);
    assert!(f.vfs.wait_committed(Duration::from_secs(30)));
    let before = record(&f.b, "big.bin").unwrap();
    assert_eq!(before.blocks.len() as u64, size / BLOCK_SIZE);

    let w = f.vfs.open(ino, libc::O_WRONLY).unwrap();
    let off = 5 * BLOCK_SIZE + 17;
    f.vfs.write(w.fh, off, b"edited").unwrap();
    f.vfs.release(w.fh).unwrap();
    assert!(f.vfs.wait_committed(Duration::from_secs(30)));
    let after = record(&f.b, "big.bin").unwrap();
    let changed: Vec<usize> = (0..after.blocks.len())
        .filter(|&i| after.blocks[i] != before.blocks[i])
        .collect();
    assert_eq!(changed, vec![5]);
    assert!(
        after.sha256.is_none(),
        "whole-file digests are left to the next scan"
    );
    assert!(after.sequence > before.sequence);

    // The next hashing scan fills the digests in, and agrees with the incremental blocks.
    let mut ix = Index::open(&f.b).unwrap();
    scan::scan(&f.b, &mut ix, f.device, &RelPath::root(), HashWanted::All).unwrap();
    let filled = ix.get(&p("big.bin")).unwrap().unwrap().record;
    assert!(filled.sha256.is_some());
    assert_eq!(filled.blocks, after.blocks);
    assert_eq!(
        filled.version, after.version,
        "filling hashes is not a new version"
    );
}

#[test]
fn truncate_and_setattr() {
    let f = fixture();
    let ino = put(&f.vfs, "t", b"0123456789");
    let a = f
        .vfs
        .setattr(
            ME,
            ino,
            None,
            &SetAttr {
                size: Some(4),
                mode: Some(0o600),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(a.size, 4);
    assert_eq!(a.perm, 0o600);
    assert_eq!(std::fs::read(f.b.root.join("t")).unwrap(), b"0123");
    let a = f
        .vfs
        .setattr(
            ME,
            ino,
            None,
            &SetAttr {
                size: Some(0),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(a.size, 0);
    assert!(f.vfs.locks().is_empty());
}

#[test]
fn namespace_operations() {
    let f = fixture();
    let d = f.vfs.mkdir(ME, ROOT_INO, os("d"), 0o755, 0).unwrap();
    assert_eq!(d.kind, FileKind::Dir);
    let s = f
        .vfs
        .symlink(ME, d.ino, os("l"), std::path::Path::new("../x"))
        .unwrap();
    assert_eq!(f.vfs.readlink(s.ino).unwrap(), b"../x");
    let x = put(&f.vfs, "x", b"x");
    f.vfs
        .rename(ROOT_INO, os("x"), d.ino, os("y"), 0)
        .expect("rename into dir");
    assert_eq!(
        f.vfs.getattr(x, None).unwrap().size,
        1,
        "inode follows rename"
    );
    f.vfs
        .rename(ROOT_INO, os("d"), ROOT_INO, os("e"), 0)
        .unwrap();
    assert!(f.b.root.join("e/y").exists());
    assert_eq!(f.vfs.lookup(d.ino, os("y")).unwrap().ino, x);
    assert_eq!(
        f.vfs.rmdir(ROOT_INO, os("e")).unwrap_err().errno(),
        libc::ENOTEMPTY
    );
    f.vfs.unlink(d.ino, os("y")).unwrap();
    f.vfs.unlink(d.ino, os("l")).unwrap();
    f.vfs.rmdir(ROOT_INO, os("e")).unwrap();
    assert_eq!(
        f.vfs.lookup(ROOT_INO, os("e")).unwrap_err().errno(),
        libc::ENOENT
    );
    assert!(f.vfs.wait_committed(Duration::from_secs(10)));
    let ix = Index::open(&f.b).unwrap();
    // Gone from the index's view (a tombstone, or never recorded if the whole life of the
    // path fell inside one commit batch).
    for gone in ["d", "e", "e/y", "x"] {
        let r = ix.get(&p(gone)).unwrap();
        assert!(
            r.map(|s| s.record.deleted).unwrap_or(true),
            "{gone} still live"
        );
    }
}

#[test]
fn hard_links_share_content_and_inode() {
    let f = fixture();
    let a = put(&f.vfs, "a", b"shared");
    let l = f.vfs.link(a, ROOT_INO, os("b")).unwrap();
    assert_eq!(l.ino, a);
    assert_eq!(l.nlink, 2);
    // A write through one name is seen through the other (written in place).
    let w = f.vfs.open(a, libc::O_WRONLY).unwrap();
    f.vfs.write(w.fh, 0, b"SHARED").unwrap();
    f.vfs.release(w.fh).unwrap();
    assert_eq!(std::fs::read(f.b.root.join("b")).unwrap(), b"SHARED");
    f.vfs.unlink(ROOT_INO, os("a")).unwrap();
    assert_eq!(f.vfs.getattr(a, None).unwrap().nlink, 1);
    assert_eq!(f.vfs.lookup(ROOT_INO, os("b")).unwrap().ino, a);
}

#[test]
fn names_are_validated_and_metadata_hidden() {
    let f = fixture();
    let long = "n".repeat(256);
    let err = |r: VfsResult<_>| -> i32 { r.map(|_: mybox::vfs::Attr| ()).unwrap_err().errno() };
    assert_eq!(
        err(f.vfs.mkdir(ME, ROOT_INO, OsStr::new(&long), 0o755, 0)),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        err(f.vfs.mkdir(ME, ROOT_INO, os("a\\b"), 0o755, 0)),
        libc::EINVAL
    );
    assert_eq!(
        err(f.vfs.mkdir(ME, ROOT_INO, os(".mybox"), 0o755, 0)),
        libc::EPERM
    );
    // `.mybox` is a virtual, unlisted directory holding only the mount marker.
    let meta = f.vfs.lookup(ROOT_INO, os(".mybox")).unwrap();
    assert_eq!(meta.kind, FileKind::Dir);
    assert_eq!(
        f.vfs.lookup(meta.ino, os("cert.pem")).unwrap_err().errno(),
        libc::ENOENT
    );
    let m = f.vfs.lookup(meta.ino, os("mount")).unwrap();
    let o = f.vfs.open(m.ino, libc::O_RDONLY).unwrap();
    let text = String::from_utf8(read_all(&f.vfs, o.fh)).unwrap();
    assert_eq!(text.trim_end(), f.b.root.to_str().unwrap());
    assert!(f.vfs.open(m.ino, libc::O_WRONLY).is_err());
    let names: Vec<String> = f
        .vfs
        .readdir(ROOT_INO, 0)
        .unwrap()
        .iter()
        .map(|e| e.name.clone())
        .collect();
    assert_eq!(names, vec![".", ".."]);
}

#[test]
fn unlink_while_writing_does_not_resurrect() {
    let f = fixture();
    let ino = put(&f.vfs, "gone", b"x");
    let w = f.vfs.open(ino, libc::O_WRONLY).unwrap();
    f.vfs.write(w.fh, 0, b"yy").unwrap();
    f.vfs.unlink(ROOT_INO, os("gone")).unwrap();
    // Still usable through the open handle.
    assert_eq!(f.vfs.getattr(ino, Some(w.fh)).unwrap().size, 2);
    f.vfs.flush(w.fh).unwrap();
    f.vfs.release(w.fh).unwrap();
    assert!(!f.b.root.join("gone").exists());
    assert_eq!(std::fs::read_dir(f.b.tmp_dir()).unwrap().count(), 0);
}

#[test]
fn forget_shrinks_the_inode_table() {
    let f = fixture();
    let before = f.vfs.inode_count();
    let a = put(&f.vfs, "a", b"a");
    let again = f.vfs.lookup(ROOT_INO, os("a")).unwrap();
    assert_eq!(again.ino, a, "stable while remembered");
    f.vfs.forget(a, 2);
    assert_eq!(f.vfs.inode_count(), before);
}

// ----- hooks: placeholders, on-demand fetch, change sink, invalidation -----------------------

struct FakePeer {
    store: std::path::PathBuf,
    files: Vec<(Record, Vec<u8>)>,
    fetched: Mutex<Vec<RelPath>>,
    reachable: bool,
}

impl RemoteView for FakePeer {
    fn placeholder(&self, path: &RelPath) -> Option<Record> {
        self.files
            .iter()
            .find(|(r, _)| &r.path == path && !path.to_fs(&self.store).exists())
            .map(|(r, _)| r.clone())
    }
    fn placeholders_in(&self, dir: &RelPath) -> Vec<Record> {
        self.files
            .iter()
            .filter(|(r, _)| r.path.parent().as_ref() == Some(dir))
            .filter(|(r, _)| !r.path.to_fs(&self.store).exists())
            .map(|(r, _)| r.clone())
            .collect()
    }
}

struct Src(Arc<FakePeer>);

impl ContentSource for Src {
    fn fetch(&self, record: &Record, _off: u64, _len: u64, _t: Duration) -> VfsResult<()> {
        let peer = &self.0;
        if !peer.reachable {
            return Err(VfsError::new(libc::EIO, "peer unreachable"));
        }
        let (_, data) = peer
            .files
            .iter()
            .find(|(r, _)| r.path == record.path)
            .ok_or_else(|| VfsError::new(libc::EIO, "unknown"))?;
        std::fs::write(record.path.to_fs(&peer.store), data)?;
        peer.fetched.lock().unwrap().push(record.path.clone());
        Ok(())
    }
}

struct PeerView(Arc<FakePeer>);

impl RemoteView for PeerView {
    fn placeholder(&self, path: &RelPath) -> Option<Record> {
        self.0.placeholder(path)
    }
    fn placeholders_in(&self, dir: &RelPath) -> Vec<Record> {
        self.0.placeholders_in(dir)
    }
}

fn remote_record(path: &str, size: u64) -> Record {
    Record {
        path: p(path),
        kind: Kind::File,
        size,
        mtime_ns: 1_700_000_000_000_000_000,
        mode: 0o640,
        target: None,
        md5: None,
        sha256: None,
        blocks: Vec::new(),
        version: VersionVector(vec![(77, 1)]),
        deleted: false,
        sequence: 1,
        modified_by: 77,
    }
}

fn peer_fixture(reachable: bool) -> (Fixture, Arc<FakePeer>) {
    let dir = tempfile::tempdir().unwrap();
    let (b, ident) = BoxDir::init(&dir.path().join("store")).unwrap();
    let peer = Arc::new(FakePeer {
        store: b.root.clone(),
        files: vec![(remote_record("remote.txt", 5), b"hello".to_vec())],
        fetched: Mutex::new(Vec::new()),
        reachable,
    });
    let opts = VfsOptions {
        remote: Arc::new(PeerView(peer.clone())),
        source: Arc::new(Src(peer.clone())),
        ..Default::default()
    };
    let vfs = Vfs::new(b.clone(), ident.id.short(), opts).unwrap();
    (
        Fixture {
            _dir: dir,
            b,
            vfs,
            device: ident.id.short(),
        },
        peer,
    )
}

#[test]
fn placeholder_is_listed_and_fetched_on_read() {
    let (f, peer) = peer_fixture(true);
    let names: Vec<String> = f
        .vfs
        .readdir(ROOT_INO, 2)
        .unwrap()
        .iter()
        .map(|e| e.name.clone())
        .collect();
    assert_eq!(names, vec!["remote.txt"]);
    let a = f.vfs.lookup(ROOT_INO, os("remote.txt")).unwrap();
    assert_eq!((a.size, a.perm, a.kind), (5, 0o640, FileKind::File));
    assert!(
        peer.fetched.lock().unwrap().is_empty(),
        "listing fetches nothing"
    );
    let o = f.vfs.open(a.ino, libc::O_RDONLY).unwrap();
    assert_eq!(read_all(&f.vfs, o.fh), b"hello");
    assert_eq!(peer.fetched.lock().unwrap().len(), 1);
}

#[test]
fn placeholder_read_fails_with_eio_when_peer_unreachable() {
    let (f, _peer) = peer_fixture(false);
    let a = f.vfs.lookup(ROOT_INO, os("remote.txt")).unwrap();
    assert_eq!(
        f.vfs.open(a.ino, libc::O_RDONLY).unwrap_err().errno(),
        libc::EIO
    );
    // Local files stay usable.
    let ino = put(&f.vfs, "local", b"ok");
    let o = f.vfs.open(ino, libc::O_RDONLY).unwrap();
    assert_eq!(read_all(&f.vfs, o.fh), b"ok");
}

struct Sink(Mutex<Vec<RelPath>>);
struct SinkRef(Arc<Sink>);
impl ChangeSink for SinkRef {
    fn changed(&self, paths: &[RelPath]) {
        self.0 .0.lock().unwrap().extend_from_slice(paths);
    }
}

#[test]
fn change_sink_hears_committed_paths() {
    let sink = Arc::new(Sink(Mutex::new(Vec::new())));
    let f = fixture_with(VfsOptions {
        sink: Arc::new(SinkRef(sink.clone())),
        ..Default::default()
    });
    put(&f.vfs, "pushed", b"data");
    assert!(f.vfs.wait_committed(Duration::from_secs(10)));
    assert!(sink.0.lock().unwrap().contains(&p("pushed")));
}

struct Inv(Mutex<Vec<String>>);
struct InvRef(Arc<Inv>);
impl Invalidator for InvRef {
    fn inode(&self, ino: u64) {
        self.0 .0.lock().unwrap().push(format!("inode {ino}"));
    }
    fn entry(&self, parent: u64, name: &str) {
        self.0
             .0
            .lock()
            .unwrap()
            .push(format!("entry {parent} {name}"));
    }
}

#[test]
fn invalidate_reaches_the_kernel_notifier() {
    let f = fixture();
    let inv = Arc::new(Inv(Mutex::new(Vec::new())));
    f.vfs.set_invalidator(Arc::new(InvRef(inv.clone())));
    let ino = put(&f.vfs, "synced", b"v1");
    // The sync engine replaced the file in the store.
    std::fs::write(f.b.root.join("synced"), b"version 2").unwrap();
    f.vfs.invalidate(&p("synced"));
    let calls = inv.0.lock().unwrap().clone();
    assert!(calls.contains(&format!("inode {ino}")));
    assert!(calls.contains(&format!("entry {ROOT_INO} synced")));
    // The next lookup sees the new version under a fresh inode number.
    let a = f.vfs.lookup(ROOT_INO, os("synced")).unwrap();
    assert_ne!(a.ino, ino);
    assert_eq!(a.size, 9);
}

#[test]
fn writer_waits_for_the_sync_lock() {
    let f = fixture();
    let ino = put(&f.vfs, "locked", b"v1");
    // The sync applier holds the file for a moment.
    let g = f
        .vfs
        .locks()
        .try_lock(&p("locked"), mybox::locks::Mode::Exclusive)
        .unwrap();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        drop(g);
    });
    let start = std::time::Instant::now();
    let w = f.vfs.open(ino, libc::O_WRONLY).unwrap();
    assert!(start.elapsed() >= Duration::from_millis(150));
    // Meanwhile the rest of the mount answered (the wait holds no vfs-wide lock).
    f.vfs.release(w.fh).unwrap();
    t.join().unwrap();
}

#[test]
fn a_new_file_reaches_the_store_at_its_first_close() {
    let f = fixture();
    let (a, o) = f
        .vfs
        .create(ME, ROOT_INO, os("new"), 0o640, 0, libc::O_WRONLY)
        .unwrap();
    f.vfs.write(o.fh, 0, b"partial").unwrap();
    // Not in the store (sync cannot see it half-written), yet visible in the mount.
    assert!(!f.b.root.join("new").exists());
    assert_eq!(f.vfs.lookup(ROOT_INO, os("new")).unwrap().ino, a.ino);
    assert_eq!(f.vfs.getattr(a.ino, None).unwrap().size, 7);
    assert!(f
        .vfs
        .readdir(ROOT_INO, 0)
        .unwrap()
        .iter()
        .any(|e| e.name == "new"));
    // Another reader sees the published version: still empty.
    let r = f.vfs.open(a.ino, libc::O_RDONLY).unwrap();
    assert!(read_all(&f.vfs, r.fh).is_empty());
    f.vfs.flush(o.fh).unwrap();
    f.vfs.release(o.fh).unwrap();
    assert_eq!(std::fs::read(f.b.root.join("new")).unwrap(), b"partial");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(f.b.root.join("new"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o640);
    // Unlinking a file still being created leaves nothing behind.
    let (_, o2) = f
        .vfs
        .create(ME, ROOT_INO, os("tmp"), 0o644, 0, libc::O_WRONLY)
        .unwrap();
    f.vfs.write(o2.fh, 0, b"x").unwrap();
    f.vfs.unlink(ROOT_INO, os("tmp")).unwrap();
    f.vfs.release(o2.fh).unwrap();
    assert!(!f.b.root.join("tmp").exists());
    assert_eq!(std::fs::read_dir(f.b.tmp_dir()).unwrap().count(), 0);
}

#[test]
fn a_running_program_cannot_be_opened_for_writing() {
    let f = fixture();
    let ino = put(&f.vfs, "prog", b"#!/bin/sh\nsleep 1\n");
    // The open execve makes (the kernel passes __FMODE_EXEC on to the file system).
    let exec = f
        .vfs
        .open(ino, libc::O_RDONLY | mybox::vfs::FMODE_EXEC)
        .unwrap();
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
        let Err(e) = f.vfs.open(ino, flags) else {
            panic!("flags {flags:#x}: opened while running");
        };
        assert_eq!(e.errno(), libc::ETXTBSY, "flags {flags:#x}: {e}");
    }
    let trunc = SetAttr {
        size: Some(0),
        ..SetAttr::default()
    };
    let Err(e) = f.vfs.setattr(ME, ino, None, &trunc) else {
        panic!("truncated while running");
    };
    assert_eq!(e.errno(), libc::ETXTBSY);
    // Plain readers are not affected.
    let r = f.vfs.open(ino, libc::O_RDONLY).unwrap();
    assert_eq!(read_all(&f.vfs, r.fh), b"#!/bin/sh\nsleep 1\n");
    f.vfs.release(r.fh).unwrap();
    // Once the program is gone, writing works again.
    f.vfs.release(exec.fh).unwrap();
    let w = f.vfs.open(ino, libc::O_WRONLY | libc::O_TRUNC).unwrap();
    f.vfs.write(w.fh, 0, b"new").unwrap();
    f.vfs.flush(w.fh).unwrap();
    f.vfs.release(w.fh).unwrap();
    assert_eq!(fs_read(&f, "prog"), b"new");
}

fn fs_read(f: &Fixture, rel: &str) -> Vec<u8> {
    std::fs::read(p(rel).to_fs(&f.b.root)).unwrap()
}

/// Reads directory `ino` the way the kernel does: `per_call` entries per call, each call
/// resuming after the last position handed out; `between(call)` runs before each call.
fn walk(
    vfs: &Vfs,
    ino: u64,
    per_call: usize,
    mut between: impl FnMut(usize),
) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    let mut offset = 0;
    for call in 0.. {
        between(call);
        let page = vfs.readdir(ino, offset).unwrap();
        if page.is_empty() {
            return out;
        }
        for e in page.iter().take(per_call) {
            assert!(
                e.off > offset,
                "positions increase: {} after {offset}",
                e.off
            );
            offset = e.off;
            out.push((e.name.clone(), e.off));
        }
    }
    unreachable!()
}

#[test]
fn readdir_changes_between_calls_return_unchanged_entries_once() {
    let f = fixture();
    let d = f.b.root.join("d");
    std::fs::create_dir(&d).unwrap();
    let names: Vec<String> = (0..300).map(|i| format!("f{i:03}")).collect();
    for n in &names {
        std::fs::write(d.join(n), b"x").unwrap();
    }
    let dino = f.vfs.lookup(ROOT_INO, os("d")).unwrap().ino;
    // After the first call: a third of the names go (through unlink and rename), 40 arrive
    // (create, mkdir, symlink, the rename's target); after the third call, 20 more go.
    let removed: Vec<String> = names.iter().step_by(3).cloned().collect();
    let later: Vec<String> = names.iter().skip(1).step_by(7).take(20).cloned().collect();
    let mut added = Vec::new();
    let mut gone = std::collections::HashSet::new();
    let seen = walk(&f.vfs, dino, 50, |call| {
        if call == 1 {
            for (i, n) in removed.iter().enumerate() {
                if i == 0 {
                    f.vfs.rename(dino, os(n), dino, os("renamed"), 0).unwrap();
                    added.push("renamed".to_string());
                } else {
                    f.vfs.unlink(dino, os(n)).unwrap();
                }
                gone.insert(n.clone());
            }
            for i in 0..37 {
                let n = format!("new{i}");
                let (_, o) = f
                    .vfs
                    .create(ME, dino, os(&n), 0o644, 0o022, libc::O_WRONLY)
                    .unwrap();
                f.vfs.release(o.fh).unwrap();
                added.push(n);
            }
            f.vfs.mkdir(ME, dino, os("newdir"), 0o755, 0o022).unwrap();
            f.vfs
                .symlink(ME, dino, os("newlink"), std::path::Path::new("f001"))
                .unwrap();
            added.extend(["newdir".to_string(), "newlink".to_string()]);
        }
        if call == 3 {
            let still: Vec<String> = later
                .iter()
                .filter(|n| !gone.contains(*n))
                .cloned()
                .collect();
            for n in still {
                f.vfs.unlink(dino, os(&n)).unwrap();
                gone.insert(n);
            }
        }
    });
    let mut count = std::collections::HashMap::new();
    for (n, _) in &seen {
        *count.entry(n.as_str()).or_insert(0) += 1;
    }
    assert!(count.values().all(|&c| c == 1), "no entry twice");
    for n in names.iter().filter(|n| !gone.contains(*n)) {
        assert_eq!(count.get(n.as_str()), Some(&1), "{n} listed once");
    }
    assert_eq!((count.get("."), count.get("..")), (Some(&1), Some(&1)));
    // Names added during the walk may or may not show (POSIX); nothing else may.
    for n in count.keys() {
        assert!(
            *n == "." || *n == ".." || names.iter().any(|x| x == n) || added.iter().any(|x| x == n),
            "{n} came from nowhere"
        );
    }
    // A fresh walk sees exactly the directory as it is now.
    let now: std::collections::BTreeSet<String> = walk(&f.vfs, dino, 50, |_| {})
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut want: std::collections::BTreeSet<String> = names
        .iter()
        .filter(|n| !gone.contains(*n))
        .cloned()
        .collect();
    want.extend(added.iter().cloned());
    want.extend([".".to_string(), "..".to_string()]);
    assert_eq!(now, want);
}

#[test]
fn readdir_big_directory_lists_every_entry_once_with_interleaved_walks() {
    let f = fixture();
    let d = f.b.root.join("big");
    std::fs::create_dir(&d).unwrap();
    let n = 20_000;
    for i in 0..n {
        std::fs::File::create(d.join(format!("entry-{i:05}"))).unwrap();
    }
    let dino = f.vfs.lookup(ROOT_INO, os("big")).unwrap().ino;
    // A second walk runs alongside the first, starting (and so re-listing) midway.
    let mut other: Vec<(String, u64)> = Vec::new();
    let mut other_off = None;
    let seen = walk(&f.vfs, dino, 97, |call| {
        if call >= 100 {
            let page = f.vfs.readdir(dino, other_off.unwrap_or(0)).unwrap();
            if let Some(e) = page.iter().next() {
                other_off = Some(e.off);
                other.push((e.name.clone(), e.off));
            }
        }
    });
    let names: std::collections::BTreeSet<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(seen.len(), n + 2, "each entry exactly once");
    assert_eq!(names.len(), n + 2);
    assert!(names.contains("entry-00000") && names.contains("entry-19999"));
    // The other walk's entries are the first ones of the same order.
    assert!(!other.is_empty());
    assert_eq!(other[..], seen[..other.len()]);
}

#[test]
fn readdir_plus_attributes_match_lookup_and_follow_renames() {
    let f = fixture();
    std::fs::write(f.b.root.join("plain"), b"12345").unwrap();
    std::fs::write(f.b.root.join("edited"), b"old").unwrap();
    // A file being created (only a shadow so far) and a file with a writer's shadow.
    let (_, newf) = f
        .vfs
        .create(ME, ROOT_INO, os("new"), 0o644, 0o022, libc::O_WRONLY)
        .unwrap();
    f.vfs.write(newf.fh, 0, b"abcdefg").unwrap();
    let e = f.vfs.lookup(ROOT_INO, os("edited")).unwrap();
    let w = f.vfs.open(e.ino, libc::O_WRONLY).unwrap();
    f.vfs.write(w.fh, 0, b"longer content").unwrap();
    // Listed first, then a name moves before the READDIRPLUS reply is built.
    let first = f.vfs.readdir(ROOT_INO, 0).unwrap();
    assert!(first.iter().any(|e| e.name == "plain"));
    f.vfs
        .rename(ROOT_INO, os("plain"), ROOT_INO, os("moved"), 0)
        .unwrap();
    let mut got = std::collections::BTreeMap::new();
    f.vfs
        .readdir_plus(ROOT_INO, 2, |e, a| {
            let a = a.unwrap();
            got.insert(e.name.clone(), (a.ino, a.size));
            true
        })
        .unwrap();
    let want = |n: &str| {
        let a = f.vfs.lookup(ROOT_INO, os(n)).unwrap();
        (a.ino, a.size)
    };
    assert_eq!(
        got.keys().cloned().collect::<Vec<_>>(),
        ["edited", "moved", "new"]
    );
    assert_eq!(got["moved"], want("moved"));
    assert_eq!(got["moved"].1, 5);
    assert_eq!(got["new"], want("new"));
    assert_eq!(got["new"].1, 7, "a new file's size is its shadow's");
    assert_eq!(got["edited"], want("edited"));
    assert_eq!(got["edited"].1, 14, "a writer's shadow shows");
    f.vfs.release(w.fh).unwrap();
    f.vfs.release(newf.fh).unwrap();
}
