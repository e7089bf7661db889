//! The mounted namespace as a plain Rust API, testable without a kernel mount.
//!
//! [`Vfs`] answers file system operations (lookup, getattr, readdir, open, read, write, flush,
//! release, rename, ...) over the box's store and index with plain structs and a [`VfsError`]
//! carrying an errno. The fuser adapter ([`crate::fuse`]) only translates.
//!
//! How the pieces fit:
//! - Inode numbers: [`inodes::InodeTable`], one stable number per path while the kernel
//!   remembers it; attributes come from `lstat` of the store (or of a writer's shadow).
//! - Reads: a read-only open opens the store file; with kernel passthrough the kernel then reads
//!   it directly (native speed), otherwise [`Vfs::read`] does `pread`. A placeholder (content
//!   still on the peer) opens at once on a temp file its content streams into
//!   ([`hooks::ContentSource::hydrate`]); each read first waits for the blocks it covers.
//! - Writes (close-to-open): the first write to a file makes a private shadow copy in
//!   `.mybox/tmp/` (a fresh empty file on O_TRUNC); writes go there; flush/fsync/close renames it
//!   over the store file in one step. A reader that opened before keeps the old inode, a reader
//!   opening after the rename sees the new one: old or new, never a mixture. While any writer has
//!   the file open, the [`LockManager`] exclusive lock for its path is held, so the sync applier
//!   never replaces the file under the writer and senders never ship it mid-write.
//! - Commit: each publish queues the path on the background [`commit::Committer`], which bumps
//!   the version in the index and then tells the [`hooks::ChangeSink`] (the daemon's engine).
//! - `.mybox` is never exposed. Instead a virtual, read-only `.mybox/` directory answers lookup
//!   (it is not listed) with one file, [`MOUNT_MARKER`], holding the store's path; that is how
//!   `BoxDir::discover` finds the box from inside a mount.

pub mod commit;
pub mod error;
pub mod hooks;
pub mod inodes;
pub mod name;

use std::collections::{BTreeSet, HashMap};
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::BoxDir;
use crate::locks::{Guard, LockManager, Mode};
use crate::model::{Kind, Record, BLOCK_SIZE};
use crate::paths::{RelPath, META_DIR};
use crate::scan::PART_SUFFIX;

use commit::{Committer, Dirty};
pub use error::{VfsError, VfsResult};
use hooks::{
    ChangeSink, ContentSource, Hydration, Invalidator, NoRemote, NoSink, NoSource, RemoteView,
};
use inodes::{InodeTable, MARKER_INO, META_INO, ROOT_INO};
use name::ValidName;

/// Name of the marker file inside the virtual `.mybox/` of a mount; it holds the store path.
pub const MOUNT_MARKER: &str = "mount";
/// How long an open for writing waits for the file lock (held by the sync applier).
pub const WRITE_LOCK_WAIT: Duration = Duration::from_secs(5);
/// Files at least this big are read through kernel passthrough when possible.
pub const PASSTHROUGH_MIN: u64 = 1 << 20;
/// How long a read of a placeholder waits for its content.
pub const FETCH_WAIT: Duration = Duration::from_secs(30);
/// The kernel's `__FMODE_EXEC` open flag: FUSE passes it on in the flags of the open made by
/// `execve`.
pub const FMODE_EXEC: i32 = 0x20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl FileKind {
    fn from_mode(mode: u32) -> FileKind {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => FileKind::Dir,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDev,
            libc::S_IFBLK => FileKind::BlockDev,
            _ => FileKind::File,
        }
    }

    fn from_std(ft: std::fs::FileType) -> FileKind {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_dir() {
            FileKind::Dir
        } else if ft.is_symlink() {
            FileKind::Symlink
        } else if ft.is_fifo() {
            FileKind::Fifo
        } else if ft.is_socket() {
            FileKind::Socket
        } else if ft.is_char_device() {
            FileKind::CharDev
        } else if ft.is_block_device() {
            FileKind::BlockDev
        } else {
            FileKind::File
        }
    }
}

/// What `stat` shows for one inode of the mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub kind: FileKind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

fn time_of(secs: i64, nsec: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsec.clamp(0, 999_999_999) as u32)
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))
            .and_then(|t| t.checked_add(Duration::from_nanos(nsec.max(0) as u64)))
            .unwrap_or(UNIX_EPOCH)
    }
}

impl Attr {
    fn from_meta(ino: u64, md: &std::fs::Metadata) -> Attr {
        Attr {
            ino,
            size: md.size(),
            blocks: md.blocks(),
            atime: time_of(md.atime(), md.atime_nsec()),
            mtime: time_of(md.mtime(), md.mtime_nsec()),
            ctime: time_of(md.ctime(), md.ctime_nsec()),
            kind: FileKind::from_mode(md.mode()),
            perm: (md.mode() & 0o7777) as u16,
            nlink: md.nlink().min(u32::MAX as u64) as u32,
            uid: md.uid(),
            gid: md.gid(),
            rdev: md.rdev() as u32,
            blksize: md.blksize() as u32,
        }
    }

    fn from_stat(ino: u64, s: &libc::stat) -> Attr {
        Attr {
            ino,
            size: s.st_size.max(0) as u64,
            blocks: s.st_blocks.max(0) as u64,
            atime: time_of(s.st_atime, s.st_atime_nsec),
            mtime: time_of(s.st_mtime, s.st_mtime_nsec),
            ctime: time_of(s.st_ctime, s.st_ctime_nsec),
            kind: FileKind::from_mode(s.st_mode),
            perm: (s.st_mode & 0o7777) as u16,
            nlink: s.st_nlink.min(u32::MAX as libc::nlink_t) as u32,
            uid: s.st_uid,
            gid: s.st_gid,
            rdev: s.st_rdev as u32,
            blksize: s.st_blksize as u32,
        }
    }

    /// A placeholder: a record known from the peer whose content is not here yet.
    fn from_record(ino: u64, r: &Record, uid: u32, gid: u32) -> Attr {
        let t = time_of(
            r.mtime_ns.div_euclid(1_000_000_000),
            r.mtime_ns.rem_euclid(1_000_000_000),
        );
        Attr {
            ino,
            size: if r.kind == Kind::File { r.size } else { 0 },
            blocks: 0,
            atime: t,
            mtime: t,
            ctime: t,
            kind: match r.kind {
                Kind::File => FileKind::File,
                Kind::Dir => FileKind::Dir,
                Kind::Symlink => FileKind::Symlink,
            },
            perm: (r.mode & 0o7777) as u16,
            nlink: 1,
            uid,
            gid,
            rdev: 0,
            blksize: 4096,
        }
    }

    fn virtual_node(ino: u64, kind: FileKind, perm: u16, size: u64, uid: u32, gid: u32) -> Attr {
        Attr {
            ino,
            size,
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            kind,
            perm,
            nlink: if kind == FileKind::Dir { 2 } else { 1 },
            uid,
            gid,
            rdev: 0,
            blksize: 4096,
        }
    }
}

/// Who asks (from the FUSE request header); owner of what they create.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSet {
    Now,
    At(SystemTime),
}

/// The fields of a `setattr` call; `None` leaves a field alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
}

/// How the kernel should do I/O on an open file.
#[derive(Debug, Clone)]
pub enum IoMode {
    /// Register `file` as the backing file and let the kernel read it directly. `key` (device,
    /// inode of the store file) tells the adapter when backing registrations can be shared: the
    /// kernel insists that all passthrough opens of one inode use the same backing file.
    /// `writable`: the file is open read-write, so a writer may later share it (see
    /// [`Vfs::set_in_place`]).
    Passthrough {
        file: Arc<File>,
        key: (u64, u64),
        writable: bool,
    },
    /// Every read and write comes to us, bypassing the page cache. Used next to passthrough
    /// (a cached open would conflict with a passthrough one on the same inode).
    Direct,
    /// Normal page-cached I/O through us (no passthrough on this mount).
    Cached,
}

#[derive(Debug, Clone)]
pub struct Opened {
    pub fh: u64,
    pub io: IoMode,
    /// For an open for writing: (device, inode) of the store file it would replace.
    pub writer_key: Option<(u64, u64)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: FileKind,
    pub name: String,
    /// The position after this entry (the kernel's next `offset`): 1 and 2 for `.` and `..`,
    /// else derived from the name alone (see [`Vfs::readdir`]).
    pub off: u64,
}

/// Entries of a directory from some position on: a window on a listing shared between calls.
#[derive(Clone, Debug)]
pub struct DirPage {
    list: Arc<Vec<DirEntry>>,
    start: usize,
}

impl std::ops::Deref for DirPage {
    type Target = [DirEntry];
    fn deref(&self) -> &[DirEntry] {
        &self.list[self.start..]
    }
}

/// Listings kept between the READDIR calls of one walk. Past this many directories the table
/// is emptied (a walk that loses its listing just rebuilds it: positions are names' hashes).
const MAX_LISTINGS: usize = 1024;

/// The position of `name` in its directory's listing: a hash of the name, so it stays the same
/// however the directory changes between calls and whatever the inode table forgets, and needs
/// no state per open directory (the kernel sends no OPENDIR). 3.. (1 and 2 are `.` and `..`),
/// below `i64::MAX` (the kernel's `loff_t`).
fn name_cookie(name: &str) -> u64 {
    // FNV-1a, then a 64-bit finaliser (splitmix64) to spread similar names: fast, and the same
    // in every run (nothing depends on that across mounts, but tests read it).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    3 + h % (i64::MAX as u64 - 4)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// Construction options.
pub struct VfsOptions {
    pub sink: Arc<dyn ChangeSink>,
    pub remote: Arc<dyn RemoteView>,
    pub source: Arc<dyn ContentSource>,
    /// Shared with the rest of the process (the daemon's applier and senders).
    pub locks: Arc<LockManager>,
}

impl Default for VfsOptions {
    fn default() -> Self {
        VfsOptions {
            sink: Arc::new(NoSink),
            remote: Arc::new(NoRemote),
            source: Arc::new(NoSource),
            locks: LockManager::new(),
        }
    }
}

/// A writer's private copy. It lives next to the file it will replace, under a hidden
/// `.mybox-part` name (never listed, looked up or synced): the rename that publishes it stays
/// inside one directory, and new inodes are allocated near their directory as for any file
/// (one staging directory for everything makes ext4 inode allocation crawl).
struct Shadow {
    path: PathBuf,
    file: Arc<File>,
}

impl Shadow {
    /// Where the shadow is now: its directory may have been renamed since it was created.
    fn current_path(&self) -> PathBuf {
        match std::fs::read_link(format!("/proc/self/fd/{}", self.file.as_raw_fd())) {
            Ok(p) if !p.as_os_str().as_bytes().ends_with(b" (deleted)") => p,
            _ => self.path.clone(),
        }
    }

    fn remove(&self) {
        let _ = std::fs::remove_file(self.current_path());
    }
}

/// Everything the writers of one inode share.
struct WriteState {
    ino: u64,
    /// The version writers read from until they write (the store file as opened).
    base: Option<Arc<File>>,
    /// The private copy being written, if any write happened since the last publish.
    shadow: Option<Shadow>,
    /// What the next publish must commit (None: nothing changed).
    pending: Option<Dirty>,
    writers: usize,
    /// The path was unlinked or replaced while open: never publish.
    orphaned: bool,
    /// Created by this mount and not published yet: the file exists only as its shadow (the
    /// store, and so sync, sees it at the first close).
    created: bool,
    /// Writes go straight to the store file (through kernel passthrough), not to a shadow:
    /// the kernel requires every open of an inode already open through passthrough to share
    /// its backing file, so a writer arriving while passthrough readers are open cannot be
    /// given a private copy. Readers may then see the write in progress.
    in_place: bool,
    /// The kernel writes this inode's backing file itself (a new file opened through
    /// passthrough): writes never reach [`Vfs::write`]. Once published, the backing file is the
    /// store file, so later writes through that open are in place.
    kernel_writes: bool,
    _lock: Option<Guard>,
}

enum Handle {
    Read {
        ino: u64,
        file: Arc<File>,
        /// Opened through the page cache (counted in `cached_opens`).
        cached: bool,
        /// Opened by `execve` (counted in `exec_opens`).
        exec: bool,
        /// A placeholder whose content is still arriving in `file`: each read waits for (and
        /// asks first for) the blocks it covers.
        fill: Option<Arc<dyn Hydration>>,
    },
    Write {
        ino: u64,
        state: Arc<Mutex<WriteState>>,
    },
    Static {
        data: Vec<u8>,
    },
}

pub struct Vfs {
    b: BoxDir,
    root: PathBuf,
    tmp: PathBuf,
    inodes: Mutex<InodeTable>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    /// Directory listings by directory inode, sorted by position, while a walk is reading
    /// them (a 100k-entry directory takes thousands of READDIR calls). Dropped at the end of a
    /// listing and whenever the directory changes.
    listings: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    writers: Mutex<HashMap<u64, Arc<Mutex<WriteState>>>>,
    /// Page-cached read opens per inode: passthrough may not start while any is open.
    cached_opens: Mutex<HashMap<u64, usize>>,
    /// Opens by `execve` per inode: the program is running, so opening it for writing or
    /// truncating it fails with ETXTBSY, as on a local disk.
    exec_opens: Mutex<HashMap<u64, usize>>,
    /// Placeholders fetched for a writer that has not taken its write state yet: the install's
    /// invalidation must not give them a new inode number under the opening writer.
    fetching_for_writer: Mutex<BTreeSet<u64>>,
    next_shadow: AtomicU64,
    locks: Arc<LockManager>,
    committer: Committer,
    remote: Arc<dyn RemoteView>,
    source: Arc<dyn ContentSource>,
    invalidator: RwLock<Option<Arc<dyn Invalidator>>>,
    passthrough: AtomicBool,
    /// Store paths are relative to the current directory (see `use_relative_paths`).
    relative: AtomicBool,
    is_root: bool,
    owner: (u32, u32),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the tables half-updated in a way
    // that matters more than a dead mount, so recover the guard instead of propagating.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn cpath(p: &Path) -> VfsResult<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| VfsError::new(libc::EINVAL, "path contains NUL"))
}

fn errno_result(r: libc::c_int, what: impl std::fmt::Display) -> VfsResult<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(VfsError::io(what, std::io::Error::last_os_error()))
    }
}

fn timespec(t: Option<TimeSet>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeSet::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(TimeSet::At(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            },
            Err(e) => {
                let d = e.duration();
                let mut secs = -(d.as_secs() as i64);
                let mut nsec = d.subsec_nanos() as i64;
                if nsec > 0 {
                    secs -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                libc::timespec {
                    tv_sec: secs as libc::time_t,
                    tv_nsec: nsec as libc::c_long,
                }
            }
        },
    }
}

fn blocks_of(offset: u64, len: u64) -> BTreeSet<u64> {
    if len == 0 {
        return BTreeSet::new();
    }
    (offset / BLOCK_SIZE..=(offset + len - 1) / BLOCK_SIZE).collect()
}

fn merge_pending(p: &mut Option<Dirty>, d: Dirty) {
    match (p.as_mut(), d) {
        (None, d) => *p = Some(d),
        (Some(Dirty::All), _) => {}
        (Some(cur), Dirty::All) => *cur = Dirty::All,
        (Some(Dirty::Blocks(a)), Dirty::Blocks(b)) => a.extend(b),
    }
}

/// Copy all of `src` into `dst` without moving either file offset: a reflink where the file
/// system can share extents, else `copy_file_range`, else plain reads and writes.
fn copy_contents(src: &File, dst: &File) -> std::io::Result<()> {
    // SAFETY: FICLONE takes the source fd as its argument and touches no memory of ours.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE as _, src.as_raw_fd()) };
    if r == 0 {
        return Ok(());
    }
    let len = src.metadata()?.len();
    let mut off_in: libc::loff_t = 0;
    let mut off_out: libc::loff_t = 0;
    let mut done = 0u64;
    while done < len {
        // SAFETY: both fds are open; the offsets are our locals.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                (len - done).min(1 << 30) as usize,
                0,
            )
        };
        if n < 0 {
            break;
        }
        if n == 0 {
            return Ok(()); // the source shrank meanwhile
        }
        done += n as u64;
    }
    if done >= len {
        return Ok(());
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = done;
    loop {
        let n = src.read_at(&mut buf, pos)?;
        if n == 0 {
            return Ok(());
        }
        dst.write_all_at(&buf[..n], pos)?;
        pos += n as u64;
    }
}

impl Vfs {
    /// A vfs over the store of `b`. Starts the background committer (which opens its own index
    /// connection).
    pub fn new(b: BoxDir, device: u64, opts: VfsOptions) -> anyhow::Result<Vfs> {
        std::fs::create_dir_all(b.tmp_dir())?;
        let committer = Committer::start(b.clone(), device, opts.sink)?;
        // SAFETY: geteuid/getegid cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Ok(Vfs {
            root: b.root.clone(),
            tmp: b.tmp_dir(),
            b,
            inodes: Mutex::new(InodeTable::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            listings: Mutex::new(HashMap::new()),
            writers: Mutex::new(HashMap::new()),
            cached_opens: Mutex::new(HashMap::new()),
            exec_opens: Mutex::new(HashMap::new()),
            fetching_for_writer: Mutex::new(BTreeSet::new()),
            next_shadow: AtomicU64::new(1),
            locks: opts.locks,
            committer,
            remote: opts.remote,
            source: opts.source,
            invalidator: RwLock::new(None),
            passthrough: AtomicBool::new(false),
            relative: AtomicBool::new(false),
            is_root: uid == 0,
            owner: (uid, gid),
        })
    }

    pub fn box_dir(&self) -> &BoxDir {
        &self.b
    }

    pub fn locks(&self) -> &Arc<LockManager> {
        &self.locks
    }

    /// Whether read-only opens ask for kernel passthrough (set by the adapter once the kernel
    /// accepted the capability).
    pub fn set_passthrough(&self, on: bool) {
        self.passthrough.store(on, Ordering::Relaxed);
    }

    pub fn passthrough(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    pub fn set_invalidator(&self, inv: Arc<dyn Invalidator>) {
        if let Ok(mut g) = self.invalidator.write() {
            *g = Some(inv);
        }
    }

    /// Wait until every change made so far is committed to the index.
    pub fn wait_committed(&self, timeout: Duration) -> bool {
        self.committer.wait_idle(timeout)
    }

    /// Stop the committer after draining it (unmount).
    pub fn shutdown(&self) {
        self.committer.shutdown();
    }

    /// Number of inodes the table holds (tests: forget must shrink it).
    pub fn inode_count(&self) -> usize {
        lock(&self.inodes).len()
    }

    // ----- paths and attributes -------------------------------------------------------------

    fn path_of(&self, ino: u64) -> VfsResult<RelPath> {
        if ino == META_INO || ino == MARKER_INO {
            return Err(VfsError::new(libc::EPERM, "the mount marker is read-only"));
        }
        lock(&self.inodes)
            .path(ino)
            .ok_or_else(|| VfsError::enoent(format!("inode {ino}")))
    }

    fn full(&self, p: &RelPath) -> PathBuf {
        // Paths come from the inode table, built from lookups the kernel made one component at a
        // time over real directories, so no component is a symlink to follow.
        if self.relative.load(Ordering::Relaxed) {
            if p.is_root() {
                PathBuf::from(".")
            } else {
                PathBuf::from(p.as_str())
            }
        } else {
            p.to_fs(&self.root)
        }
    }

    /// Address store files relative to the current directory, which the caller has made the
    /// store root (`mybox mount` does). A path the kernel may hand us is up to PATH_MAX long
    /// below the mount point; prefixed with a longer store path it would no longer fit in one
    /// system call, relative to the store root it always does.
    ///
    /// # Errors
    /// Refused unless the current directory is the store root.
    pub fn use_relative_paths(&self) -> VfsResult<()> {
        let cwd = std::env::current_dir()?;
        let same = |a: &Path, b: &Path| match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
            _ => false,
        };
        if !same(&cwd, &self.root) {
            return Err(VfsError::new(
                libc::EINVAL,
                "the current directory is not the store root",
            ));
        }
        self.relative.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn child(&self, parent: u64, name: &OsStr) -> VfsResult<(RelPath, RelPath)> {
        if parent == META_INO || parent == MARKER_INO {
            return Err(VfsError::new(libc::EPERM, "the mount marker is read-only"));
        }
        let dir = self.path_of(parent)?;
        let n = ValidName::parse(name)?;
        if n.is_hidden() {
            return Err(VfsError::new(
                libc::EPERM,
                format!("{PART_SUFFIX} names are reserved for partial downloads"),
            ));
        }
        let child = n.join(&dir)?;
        Ok((dir, child))
    }

    fn marker(&self) -> Vec<u8> {
        let mut s = self.root.as_os_str().as_bytes().to_vec();
        s.push(b'\n');
        s
    }

    fn virtual_attr(&self, ino: u64) -> Attr {
        let (uid, gid) = self.owner;
        if ino == META_INO {
            Attr::virtual_node(META_INO, FileKind::Dir, 0o555, 0, uid, gid)
        } else {
            let len = self.marker().len() as u64;
            Attr::virtual_node(MARKER_INO, FileKind::File, 0o444, len, uid, gid)
        }
    }

    /// ETXTBSY while a program runs from `ino`. The kernel refuses such opens itself as long
    /// as they reach the inode the program was started from; this also covers the rest
    /// (pjdfstest's open::etxtbsy failed about 1 run in 8 without it).
    fn refuse_if_running(&self, ino: u64, rel: &RelPath) -> VfsResult<()> {
        if lock(&self.exec_opens).contains_key(&ino) {
            return Err(VfsError::new(
                libc::ETXTBSY,
                format!("{rel} is a running program"),
            ));
        }
        Ok(())
    }

    fn writer_state(&self, ino: u64) -> Option<Arc<Mutex<WriteState>>> {
        lock(&self.writers).get(&ino).cloned()
    }

    /// Attributes of `rel` (inode `ino`): a writer's shadow if one is being written, else the
    /// store entry, else a placeholder from the peer's index.
    fn attr_of(&self, ino: u64, rel: &RelPath) -> VfsResult<Attr> {
        if let Some(st) = self.writer_state(ino) {
            let st = lock(&st);
            if let Some(sh) = &st.shadow {
                return Ok(Attr::from_meta(ino, &sh.file.metadata()?));
            }
        }
        match std::fs::symlink_metadata(self.full(rel)) {
            Ok(md) => Ok(Attr::from_meta(ino, &md)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match self.remote.placeholder(rel) {
                    Some(r) => Ok(Attr::from_record(ino, &r, self.owner.0, self.owner.1)),
                    None => Err(VfsError::enoent(rel)),
                }
            }
            Err(e) => Err(VfsError::io(rel, e)),
        }
    }

    /// `lookup`: find `name` in `parent`; the kernel now holds one more reference to it.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> VfsResult<Attr> {
        if parent == ROOT_INO && name.as_bytes() == META_DIR.as_bytes() {
            return Ok(self.virtual_attr(META_INO));
        }
        if parent == META_INO {
            return if name.as_bytes() == MOUNT_MARKER.as_bytes() {
                Ok(self.virtual_attr(MARKER_INO))
            } else {
                Err(VfsError::enoent(format!("{META_DIR}/{name:?}")))
            };
        }
        let (_, child) = match self.child(parent, name) {
            // Reserved names simply do not exist.
            Err(e) if e.errno() == libc::EPERM => return Err(VfsError::enoent(e.message())),
            r => r?,
        };
        let md = std::fs::symlink_metadata(self.full(&child));
        match md {
            Ok(md) => {
                let ino = lock(&self.inodes).get_or_insert(&child, true);
                // A writer may have a shadow with a newer size.
                if self.writer_state(ino).is_some() {
                    return self.attr_of(ino, &child);
                }
                Ok(Attr::from_meta(ino, &md))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pending = lock(&self.inodes).ino_of(&child);
                if let Some(ino) = pending.filter(|&i| self.is_pending(i)) {
                    let a = self.attr_of(ino, &child)?;
                    lock(&self.inodes).get_or_insert(&child, true);
                    return Ok(a);
                }
                match self.remote.placeholder(&child) {
                    Some(r) => {
                        let ino = lock(&self.inodes).get_or_insert(&child, true);
                        Ok(Attr::from_record(ino, &r, self.owner.0, self.owner.1))
                    }
                    None => Err(VfsError::enoent(&child)),
                }
            }
            Err(e) => Err(VfsError::io(&child, e)),
        }
    }

    pub fn forget(&self, ino: u64, n: u64) {
        let gone = {
            let mut t = lock(&self.inodes);
            t.forget(ino, n);
            !t.exists(ino)
        };
        if gone {
            // A directory the kernel forgot has no walk in progress (an open directory pins
            // its inode): drop a listing a walk left unfinished.
            self.dir_changed(ino);
        }
    }

    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> VfsResult<Attr> {
        if ino == META_INO || ino == MARKER_INO {
            return Ok(self.virtual_attr(ino));
        }
        let path = lock(&self.inodes).path(ino);
        match path {
            Some(p) => self.attr_of(ino, &p),
            None => {
                // An orphan (unlinked while open): answer from an open handle.
                let h = match fh {
                    Some(fh) => self.handle(fh).ok(),
                    None => self.any_handle_of(ino),
                };
                match h.as_deref() {
                    Some(Handle::Read { file, .. }) => Ok(Attr::from_meta(ino, &file.metadata()?)),
                    Some(Handle::Write { state, .. }) => {
                        let st = lock(state);
                        let f = st
                            .shadow
                            .as_ref()
                            .map(|s| s.file.clone())
                            .or_else(|| st.base.clone())
                            .ok_or_else(|| VfsError::enoent(format!("inode {ino}")))?;
                        let mut a = Attr::from_meta(ino, &f.metadata()?);
                        a.nlink = 0;
                        Ok(a)
                    }
                    _ => Err(VfsError::enoent(format!("inode {ino}"))),
                }
            }
        }
    }

    fn any_handle_of(&self, ino: u64) -> Option<Arc<Handle>> {
        lock(&self.handles)
            .values()
            .find(|h| match h.as_ref() {
                Handle::Read { ino: i, .. } | Handle::Write { ino: i, .. } => *i == ino,
                _ => false,
            })
            .cloned()
    }

    fn handle(&self, fh: u64) -> VfsResult<Arc<Handle>> {
        lock(&self.handles)
            .get(&fh)
            .cloned()
            .ok_or_else(|| VfsError::new(libc::EBADF, format!("no open file {fh}")))
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, Arc::new(h));
        fh
    }

    pub fn setattr(
        &self,
        caller: Caller,
        ino: u64,
        fh: Option<u64>,
        set: &SetAttr,
    ) -> VfsResult<Attr> {
        let _ = caller;
        let rel = self.path_of(ino)?;
        if let Some(size) = set.size {
            if fh.is_none() {
                self.refuse_if_running(ino, &rel)?;
            }
            self.truncate(ino, &rel, size, fh.is_none())?;
        }
        // Metadata goes to the writer's shadow when one exists (it replaces the store file on
        // publish), else to the store entry.
        let shadow = self
            .writer_state(ino)
            .and_then(|s| lock(&s).shadow.as_ref().map(|sh| sh.file.clone()));
        // The shadow is changed through its descriptor (its directory may have moved), the
        // store entry by path without following a symlink.
        let c = cpath(&self.full(&rel))?;
        let fd = shadow.as_ref().map(|f| f.as_raw_fd());
        if set.uid.is_some() || set.gid.is_some() {
            let uid = set.uid.map(|u| u as libc::uid_t).unwrap_or(u32::MAX);
            let gid = set.gid.map(|g| g as libc::gid_t).unwrap_or(u32::MAX);
            // SAFETY: c is a valid C string, fd an open descriptor; -1 leaves an id unchanged.
            let r = match fd {
                Some(fd) => unsafe { libc::fchown(fd, uid, gid) },
                None => unsafe { libc::lchown(c.as_ptr(), uid, gid) },
            };
            errno_result(r, &rel)?;
        }
        if let Some(mode) = set.mode {
            // SAFETY: as above.
            let r = match fd {
                Some(fd) => unsafe { libc::fchmod(fd, mode & 0o7777) },
                None => unsafe { libc::fchmodat(libc::AT_FDCWD, c.as_ptr(), mode & 0o7777, 0) },
            };
            errno_result(r, &rel)?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let ts = [timespec(set.atime), timespec(set.mtime)];
            // SAFETY: c/fd are valid and ts has the two entries utimensat reads.
            let r = match fd {
                Some(fd) => unsafe { libc::futimens(fd, ts.as_ptr()) },
                None => unsafe {
                    libc::utimensat(
                        libc::AT_FDCWD,
                        c.as_ptr(),
                        ts.as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                },
            };
            errno_result(r, &rel)?;
        }
        let meta_changed = set.mode.is_some()
            || set.uid.is_some()
            || set.gid.is_some()
            || set.atime.is_some()
            || set.mtime.is_some();
        if meta_changed && shadow.is_none() {
            self.committer.path(rel.clone());
        }
        self.attr_of(ino, &rel)
    }

    fn truncate(&self, ino: u64, rel: &RelPath, size: u64, publish: bool) -> VfsResult<()> {
        let existing = self.writer_state(ino);
        let temporary = existing.is_none();
        let state = match existing {
            Some(s) => s,
            None => self.acquire_writer(ino, rel)?,
        };
        let res = (|| {
            let mut st = lock(&state);
            if st.in_place {
                self.store_rw(rel)?.set_len(size)?;
                st.pending = Some(Dirty::All);
            } else if size == 0 {
                self.fresh_shadow(&mut st)?;
            } else {
                self.ensure_shadow(&mut st)?;
                if let Some(sh) = &st.shadow {
                    sh.file.set_len(size)?;
                }
                let old_last = size / BLOCK_SIZE;
                merge_pending(&mut st.pending, Dirty::Blocks([old_last].into()));
            }
            if publish {
                self.publish(&mut st)?;
            }
            Ok(())
        })();
        if temporary {
            self.release_writer(ino, &state);
        }
        res
    }

    pub fn readlink(&self, ino: u64) -> VfsResult<Vec<u8>> {
        let rel = self.path_of(ino)?;
        match std::fs::read_link(self.full(&rel)) {
            Ok(t) => Ok(t.as_os_str().as_bytes().to_vec()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match self.remote.placeholder(&rel).and_then(|r| r.target) {
                    Some(t) => Ok(t.into_bytes()),
                    None => Err(VfsError::enoent(&rel)),
                }
            }
            Err(e) => Err(VfsError::io(&rel, e)),
        }
    }

    /// Give a new store entry to the caller (we may be root, they may not be), inheriting the
    /// group of a set-group-ID directory as the kernel would.
    fn set_owner(&self, caller: Caller, dir: &RelPath, full: &Path, mode: u32) -> VfsResult<()> {
        if !self.is_root {
            return Ok(());
        }
        let gid = match std::fs::metadata(self.full(dir)) {
            Ok(md) if md.mode() & libc::S_ISGID != 0 => md.gid(),
            _ => caller.gid,
        };
        if (caller.uid, gid) == self.owner {
            return Ok(());
        }
        let c = cpath(full)?;
        // SAFETY: c is a valid C string.
        errno_result(
            unsafe { libc::lchown(c.as_ptr(), caller.uid, gid) },
            full.display(),
        )?;
        // chown clears set-user/group-ID bits of regular files; put back what was asked for.
        if mode & (libc::S_ISUID | libc::S_ISGID) != 0 && mode & libc::S_IFMT != libc::S_IFLNK {
            // SAFETY: c is a valid C string.
            let r = unsafe { libc::fchmodat(libc::AT_FDCWD, c.as_ptr(), mode & 0o7777, 0) };
            errno_result(r, full.display())?;
        }
        Ok(())
    }

    /// After creating `child`: its inode (one kernel reference) and attributes.
    /// After creating `child`: its inode (one kernel reference) and attributes. `commit`: queue
    /// the new entry for the index (a new regular file is committed on publish instead).
    fn created(&self, child: &RelPath, commit: bool) -> VfsResult<Attr> {
        let md = std::fs::symlink_metadata(self.full(child))?;
        let ino = lock(&self.inodes).get_or_insert(child, true);
        if commit {
            self.committer.entry(child.clone());
        }
        Ok(Attr::from_meta(ino, &md))
    }

    pub fn mknod(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> VfsResult<Attr> {
        let (dir, child) = self.child(parent, name)?;
        let full = self.full(&child);
        let perm = mode & 0o7777 & !umask;
        let c = cpath(&full)?;
        // SAFETY: c is a valid C string.
        let r = unsafe {
            libc::mknod(
                c.as_ptr(),
                (mode & libc::S_IFMT) | perm,
                rdev as libc::dev_t,
            )
        };
        errno_result(r, &child)?;
        // SAFETY: c is a valid C string. The process umask may have cut bits: set them exactly.
        errno_result(unsafe { libc::chmod(c.as_ptr(), perm) }, &child)?;
        self.set_owner(caller, &dir, &full, perm)?;
        self.dir_changed(parent);
        self.created(&child, true)
    }

    pub fn mkdir(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> VfsResult<Attr> {
        let (dir, child) = self.child(parent, name)?;
        let full = self.full(&child);
        let perm = mode & 0o7777 & !umask;
        let c = cpath(&full)?;
        // SAFETY: c is a valid C string.
        errno_result(unsafe { libc::mkdir(c.as_ptr(), perm) }, &child)?;
        // Keep the set-group-ID bit a set-group-ID parent passed down.
        let inherited = std::fs::symlink_metadata(&full)
            .map(|m| m.mode() & libc::S_ISGID)
            .unwrap_or(0);
        // SAFETY: as above.
        errno_result(unsafe { libc::chmod(c.as_ptr(), perm | inherited) }, &child)?;
        self.set_owner(caller, &dir, &full, perm | inherited)?;
        self.dir_changed(parent);
        self.created(&child, true)
    }

    pub fn symlink(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        target: &Path,
    ) -> VfsResult<Attr> {
        let (dir, child) = self.child(parent, name)?;
        let full = self.full(&child);
        std::os::unix::fs::symlink(target, &full).map_err(|e| VfsError::io(&child, e))?;
        self.set_owner(caller, &dir, &full, libc::S_IFLNK)?;
        self.dir_changed(parent);
        self.created(&child, true)
    }

    /// A hard link. It works in the mount and the store; sync knows paths, not inodes, so the
    /// peer gets two independent files. Writers of a multiply-linked file write in place (a
    /// private copy renamed over one name would split the link).
    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> VfsResult<Attr> {
        let src = self.path_of(ino)?;
        let (_, new) = self.child(newparent, newname)?;
        self.publish_pending(ino)?;
        std::fs::hard_link(self.full(&src), self.full(&new))
            .map_err(|e| VfsError::io(format!("link {src} -> {new}"), e))?;
        lock(&self.inodes).add_link(ino, &new);
        self.dir_changed(newparent);
        self.committer.file(new.clone(), Dirty::All);
        self.attr_of(ino, &new)
    }

    /// The node at `child` is gone: orphan its inode and stop any writer from publishing.
    fn forget_path(&self, child: &RelPath) {
        let ino = lock(&self.inodes).unlink(child);
        if let Some(ino) = ino {
            self.orphan(ino);
        }
    }

    /// `ino` lost a name; if it has none left, its writers must never publish.
    fn orphan(&self, ino: u64) {
        if !lock(&self.inodes).is_orphan(ino) {
            return;
        }
        if let Some(st) = self.writer_state(ino) {
            lock(&st).orphaned = true;
        }
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> VfsResult<()> {
        let (_, child) = self.child(parent, name)?;
        let ino = lock(&self.inodes).ino_of(&child);
        if let Some(ino) = ino.filter(|&i| self.is_pending(i)) {
            if !self.full(&child).exists() {
                lock(&self.inodes).unlink(&child);
                self.orphan(ino);
                self.dir_changed(parent);
                return Ok(());
            }
        }
        std::fs::remove_file(self.full(&child)).map_err(|e| VfsError::io(&child, e))?;
        self.dir_changed(parent);
        self.forget_path(&child);
        self.committer.gone(child);
        Ok(())
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> VfsResult<()> {
        let (_, child) = self.child(parent, name)?;
        std::fs::remove_dir(self.full(&child)).map_err(|e| VfsError::io(&child, e))?;
        self.dir_changed(parent);
        self.forget_path(&child);
        self.committer.path(child);
        Ok(())
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> VfsResult<()> {
        let (_, from) = self.child(parent, name)?;
        let (_, to) = self.child(newparent, newname)?;
        for p in [&from, &to] {
            let ino = lock(&self.inodes).ino_of(p);
            if let Some(ino) = ino {
                self.publish_pending(ino)?;
            }
        }
        let known = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;
        if flags & !known != 0 {
            return Err(VfsError::new(libc::EINVAL, "unsupported rename flags"));
        }
        let cf = cpath(&self.full(&from))?;
        let ct = cpath(&self.full(&to))?;
        // SAFETY: both are valid C strings; flags were checked above.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                cf.as_ptr(),
                libc::AT_FDCWD,
                ct.as_ptr(),
                flags as libc::c_uint,
            )
        };
        errno_result(r, format!("rename {from} -> {to}"))?;
        self.dir_changed(parent);
        self.dir_changed(newparent);
        if flags & libc::RENAME_EXCHANGE != 0 {
            lock(&self.inodes).exchange(&from, &to);
        } else {
            let replaced = lock(&self.inodes).rename(&from, &to);
            if let Some(ino) = replaced {
                self.orphan(ino);
            }
        }
        self.committer.path(from);
        self.committer.path(to);
        Ok(())
    }

    // ----- files -----------------------------------------------------------------------------

    fn open_store(&self, rel: &RelPath) -> VfsResult<File> {
        let full = self.full(rel);
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&full)
        };
        match open() {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // A placeholder: fetch its content first (bounded wait), then serve locally.
                let Some(r) = self.remote.placeholder(rel) else {
                    return Err(VfsError::enoent(rel));
                };
                if let Err(e) = self.source.fetch(&r, 0, r.size, FETCH_WAIT) {
                    tracing::warn!("fetching {rel} for a read: {e}");
                    return Err(VfsError::new(libc::EIO, e.message()));
                }
                open().map_err(|e| VfsError::io(rel, e))
            }
            Err(e) => Err(VfsError::io(rel, e)),
        }
    }

    /// A placeholder opened for reading: its content streamed into a temp file that reads are
    /// served from as blocks arrive. `None` when `rel` is in the store (or is no file
    /// placeholder, or the source only fetches whole files: `open_store` then does).
    fn hydrate(&self, rel: &RelPath) -> VfsResult<Option<Arc<dyn Hydration>>> {
        match std::fs::symlink_metadata(self.full(rel)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            _ => return Ok(None),
        }
        let Some(r) = self
            .remote
            .placeholder(rel)
            .filter(|r| r.kind == Kind::File)
        else {
            return Ok(None);
        };
        match self.source.hydrate(&r) {
            None => Ok(None),
            Some(Ok(h)) => Ok(Some(h)),
            Some(Err(e)) => {
                tracing::warn!("fetching {rel} for a read: {e}");
                Err(VfsError::new(libc::EIO, e.message()))
            }
        }
    }

    /// If `rel` is a placeholder, fetch its whole content into the store (bounded wait).
    fn fetch_placeholder(&self, rel: &RelPath) -> VfsResult<()> {
        match std::fs::symlink_metadata(self.full(rel)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            _ => return Ok(()),
        }
        let Some(r) = self
            .remote
            .placeholder(rel)
            .filter(|r| r.kind == Kind::File)
        else {
            return Ok(());
        };
        self.source.fetch(&r, 0, r.size, FETCH_WAIT).map_err(|e| {
            tracing::warn!("fetching {rel} for a writer: {e}");
            VfsError::new(libc::EIO, e.message())
        })
    }

    fn acquire_writer(&self, ino: u64, rel: &RelPath) -> VfsResult<Arc<Mutex<WriteState>>> {
        let mut w = lock(&self.writers);
        if let Some(s) = w.get(&ino) {
            lock(s).writers += 1;
            return Ok(s.clone());
        }
        let guard = match self.locks.try_lock(rel, Mode::Exclusive) {
            Some(g) => g,
            None => {
                // Held by the sync applier (or a sender): wait without blocking the rest of the
                // mount, then look again (another opener may have won meanwhile).
                drop(w);
                let g = self
                    .locks
                    .lock(rel, Mode::Exclusive, WRITE_LOCK_WAIT)
                    .ok_or_else(|| {
                        VfsError::new(libc::EBUSY, format!("{rel} is busy (sync); try again"))
                    })?;
                w = lock(&self.writers);
                if let Some(s) = w.get(&ino) {
                    lock(s).writers += 1;
                    return Ok(s.clone());
                }
                g
            }
        };
        // A multiply-linked file is written in place (see `link`).
        let in_place = std::fs::symlink_metadata(self.full(rel))
            .map(|m| m.nlink() > 1)
            .unwrap_or(false);
        let base = match self.open_store(rel) {
            Ok(f) => Some(Arc::new(f)),
            // Write-only files cannot be opened for reading by a non-root mount; O_TRUNC writers
            // do not need the old content.
            Err(e) if e.errno() == libc::EACCES => None,
            Err(e) => return Err(e),
        };
        let st = Arc::new(Mutex::new(WriteState {
            ino,
            base,
            shadow: None,
            pending: None,
            writers: 1,
            orphaned: false,
            created: false,
            in_place,
            kernel_writes: false,
            _lock: Some(guard),
        }));
        w.insert(ino, st.clone());
        Ok(st)
    }

    /// One writer is done with `state`; the last one publishes what is left and unlocks.
    fn release_writer(&self, ino: u64, state: &Arc<Mutex<WriteState>>) {
        let mut w = lock(&self.writers);
        let mut st = lock(state);
        st.writers = st.writers.saturating_sub(1);
        if st.writers > 0 {
            return;
        }
        if let Err(e) = self.publish(&mut st) {
            tracing::warn!("publishing inode {ino} on close: {e}");
        }
        if let Some(sh) = st.shadow.take() {
            sh.remove();
        }
        st._lock = None;
        drop(st);
        if w.get(&ino).is_some_and(|s| Arc::ptr_eq(s, state)) {
            w.remove(&ino);
        }
    }

    /// A new shadow for inode `ino` (next to its file; in `.mybox/tmp` for an orphan).
    fn new_shadow_file(&self, like: Option<&File>, ino: u64) -> VfsResult<Shadow> {
        let n = self.next_shadow.fetch_add(1, Ordering::Relaxed);
        let name = format!(".fuse-{}-{n}{PART_SUFFIX}", std::process::id());
        let dir = lock(&self.inodes).path(ino).and_then(|p| p.parent());
        let path = match dir {
            Some(d) => self.full(&d).join(name),
            None => self.tmp.join(name),
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| VfsError::io("creating a shadow file", e))?;
        // A new inode is stamped from the coarse clock and could look older than the version
        // it replaces (whose times may be fine-grained). Stamp it with the precise time; the
        // fstat first makes the kernel take the ctime of that change from the fine clock too.
        let _ = file.metadata();
        let now = timespec(Some(TimeSet::At(SystemTime::now())));
        // SAFETY: file is open; the array holds the two timestamps futimens reads.
        unsafe { libc::futimens(file.as_raw_fd(), [now, now].as_ptr()) };
        if let Some(like) = like {
            let md = like.metadata()?;
            if self.is_root && (md.uid(), md.gid()) != self.owner {
                std::os::unix::fs::fchown(&file, Some(md.uid()), Some(md.gid()))?;
            }
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(md.mode() & 0o7777))?;
        }
        Ok(Shadow {
            path,
            file: Arc::new(file),
        })
    }

    /// Start the shadow as a copy of the current version (first write since the last publish).
    fn ensure_shadow(&self, st: &mut WriteState) -> VfsResult<()> {
        if st.shadow.is_some() {
            return Ok(());
        }
        let sh = self.new_shadow_file(st.base.as_deref(), st.ino)?;
        let empty = st
            .base
            .as_ref()
            .is_none_or(|b| b.metadata().map(|m| m.len() == 0).unwrap_or(false));
        if let (Some(base), false) = (&st.base, empty) {
            if let Err(e) = copy_contents(base, &sh.file) {
                sh.remove();
                return Err(VfsError::io("copying into a shadow file", e));
            }
        }
        st.shadow = Some(sh);
        Ok(())
    }

    /// Start the shadow empty (O_TRUNC, truncate to 0).
    fn fresh_shadow(&self, st: &mut WriteState) -> VfsResult<()> {
        if let Some(sh) = &st.shadow {
            sh.file.set_len(0)?;
        } else {
            st.shadow = Some(self.new_shadow_file(st.base.as_deref(), st.ino)?);
        }
        st.pending = Some(Dirty::All);
        Ok(())
    }

    /// Make the writers' version the store's: rename the shadow over the store file (one atomic
    /// step for readers) and queue the commit.
    fn publish(&self, st: &mut WriteState) -> VfsResult<()> {
        if st.orphaned {
            return Ok(());
        }
        let Some(rel) = lock(&self.inodes).path(st.ino) else {
            return Ok(());
        };
        if let Some(sh) = st.shadow.take() {
            // The shadow is almost always where it was made (its name is unique to this
            // process); only if its directory was renamed meanwhile ask where it is now.
            let to = self.full(&rel);
            let moved = match std::fs::rename(&sh.path, &to) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::rename(sh.current_path(), &to)
                }
                r => r,
            };
            if let Err(e) = moved {
                let err = VfsError::io(format!("publishing {rel}"), e);
                st.shadow = Some(sh);
                return Err(err);
            }
            st.base = Some(sh.file);
            st.created = false;
            // The kernel keeps writing the same (now published) file through passthrough.
            st.in_place |= st.kernel_writes;
        }
        if let Some(d) = st.pending.take() {
            self.committer.file(rel, d);
        }
        Ok(())
    }

    pub fn open(&self, ino: u64, flags: i32) -> VfsResult<Opened> {
        let acc = flags & libc::O_ACCMODE;
        if ino == MARKER_INO {
            if acc != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
                return Err(VfsError::new(libc::EACCES, "the mount marker is read-only"));
            }
            let fh = self.add_handle(Handle::Static {
                data: self.marker(),
            });
            return Ok(Opened {
                fh,
                io: IoMode::Direct,
                writer_key: None,
            });
        }
        let rel = self.path_of(ino)?;
        let passthrough = self.passthrough();
        if acc == libc::O_RDONLY && flags & libc::O_TRUNC == 0 && self.is_pending(ino) {
            // Being created by another descriptor: its published version is still empty.
            let fh = self.add_handle(Handle::Static { data: Vec::new() });
            return Ok(Opened {
                fh,
                io: IoMode::Direct,
                writer_key: None,
            });
        }
        if acc == libc::O_RDONLY && flags & libc::O_TRUNC == 0 {
            if let Some(fill) = self.hydrate(&rel)? {
                // Through the page cache (mmap and exec work; the kernel's readahead asks for
                // the next blocks early); the partial file cannot be a passthrough backing, since
                // the kernel would read holes before their blocks arrive.
                *lock(&self.cached_opens).entry(ino).or_default() += 1;
                let exec = flags & FMODE_EXEC != 0;
                if exec {
                    *lock(&self.exec_opens).entry(ino).or_default() += 1;
                }
                let fh = self.add_handle(Handle::Read {
                    ino,
                    file: fill.file(),
                    cached: true,
                    exec,
                    fill: Some(fill),
                });
                return Ok(Opened {
                    fh,
                    io: IoMode::Cached,
                    writer_key: None,
                });
            }
            // Passthrough only for large files nobody is writing and nobody has open through the
            // page cache (the kernel refuses to mix the two I/O modes on one inode). Small files
            // use the page cache: mmap works and the cost of going through us is tiny.
            let pt = passthrough
                && self.writer_state(ino).is_none()
                && lock(&self.cached_opens).get(&ino).copied().unwrap_or(0) == 0
                && std::fs::symlink_metadata(self.full(&rel))
                    .map(|m| m.len() >= PASSTHROUGH_MIN)
                    .unwrap_or(false);
            // A passthrough backing file is opened read-write when we may (root), so that a
            // writer arriving while it is in use can share it (see `set_in_place`).
            let rw = if pt && self.is_root {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(self.full(&rel))
                    .ok()
                    .filter(|f| f.metadata().map(|m| m.is_file()).unwrap_or(false))
            } else {
                None
            };
            let writable = rw.is_some();
            let file = Arc::new(match rw {
                Some(f) => f,
                None => self.open_store(&rel)?,
            });
            let io = if pt {
                let md = file.metadata()?;
                IoMode::Passthrough {
                    file: file.clone(),
                    key: (md.dev(), md.ino()),
                    writable,
                }
            } else {
                *lock(&self.cached_opens).entry(ino).or_default() += 1;
                IoMode::Cached
            };
            let cached = matches!(io, IoMode::Cached);
            let exec = flags & FMODE_EXEC != 0;
            if exec {
                *lock(&self.exec_opens).entry(ino).or_default() += 1;
            }
            let fh = self.add_handle(Handle::Read {
                ino,
                file,
                cached,
                exec,
                fill: None,
            });
            return Ok(Opened {
                fh,
                io,
                writer_key: None,
            });
        }
        self.refuse_if_running(ino, &rel)?;
        if passthrough {
            // A program executed from the mount maps the store file (the passthrough backing):
            // writing it must fail with ETXTBSY as on a local disk, not with the kernel's EIO.
            let probe = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(self.full(&rel));
            if let Err(e) = probe {
                if e.raw_os_error() == Some(libc::ETXTBSY) {
                    return Err(VfsError::io(&rel, e));
                }
            }
        }
        // A placeholder's content comes first: installing it takes the path's lock, which the
        // writer is about to hold.
        lock(&self.fetching_for_writer).insert(ino);
        let state = self
            .fetch_placeholder(&rel)
            .and_then(|()| self.acquire_writer(ino, &rel));
        lock(&self.fetching_for_writer).remove(&ino);
        let state = state?;
        if flags & libc::O_TRUNC != 0 {
            let r = {
                let mut st = lock(&state);
                if st.in_place {
                    st.pending = Some(Dirty::All);
                    self.store_rw(&rel).and_then(|f| Ok(f.set_len(0)?))
                } else {
                    self.fresh_shadow(&mut st)
                }
            };
            if let Err(e) = r {
                self.release_writer(ino, &state);
                return Err(e);
            }
        }
        let writer_key = std::fs::symlink_metadata(self.full(&rel))
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let fh = self.add_handle(Handle::Write { ino, state });
        // Writers always use direct I/O: their writes must not land in the page cache that
        // readers of the old version share.
        Ok(Opened {
            fh,
            io: IoMode::Direct,
            writer_key,
        })
    }

    /// The adapter found the inode of writer `fh` open through passthrough and must give this
    /// open the same backing file: switch its write state to in-place writing. Refused (EBUSY)
    /// if a private copy already holds unpublished writes.
    pub fn set_in_place(&self, fh: u64) -> VfsResult<()> {
        let h = self.handle(fh)?;
        let Handle::Write { state, .. } = h.as_ref() else {
            return Err(VfsError::new(libc::EBADF, "not a writer"));
        };
        let mut st = lock(state);
        if st.in_place {
            return Ok(());
        }
        if let Some(sh) = &st.shadow {
            // Only an O_TRUNC that has not been written to can move in place.
            let empty = sh.file.metadata().map(|m| m.len() == 0).unwrap_or(false);
            if !(empty && st.pending == Some(Dirty::All)) {
                return Err(VfsError::new(
                    libc::EBUSY,
                    "file is being written through a private copy",
                ));
            }
            let rel = self.path_of(st.ino)?;
            self.store_rw(&rel)?.set_len(0)?;
            if let Some(sh) = st.shadow.take() {
                sh.remove();
            }
        }
        st.in_place = true;
        st.pending = Some(Dirty::All);
        Ok(())
    }

    fn store_rw(&self, rel: &RelPath) -> VfsResult<File> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(self.full(rel))
            .map_err(|e| VfsError::io(rel, e))
    }

    pub fn create(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> VfsResult<(Attr, Opened)> {
        let (dir, child) = self.child(parent, name)?;
        let full = self.full(&child);
        let perm = mode & 0o7777 & !umask;
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            match std::fs::symlink_metadata(&full) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let r = self.create_pending(caller, &dir, &child, perm);
                    self.dir_changed(parent);
                    return r;
                }
                Ok(_) if flags & libc::O_EXCL != 0 => {
                    return Err(VfsError::new(libc::EEXIST, format!("{child} exists")));
                }
                _ => {}
            }
        }
        let mut oo = std::fs::OpenOptions::new();
        oo.write(true)
            .mode(perm)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
        if flags & libc::O_EXCL != 0 {
            oo.create_new(true);
        } else {
            oo.create(true);
        }
        let f = oo.open(&full).map_err(|e| VfsError::io(&child, e))?;
        self.dir_changed(parent);
        use std::os::unix::fs::PermissionsExt;
        if f.metadata()?.mode() & 0o7777 != perm {
            f.set_permissions(std::fs::Permissions::from_mode(perm))?;
        }
        drop(f);
        self.set_owner(caller, &dir, &full, perm)?;
        let attr = self.created(&child, false)?;
        let opened = self.open(attr.ino, flags & !(libc::O_CREAT | libc::O_EXCL))?;
        // The new file is committed once, when its writer publishes (or now, if it was
        // created read-only): never one commit for the empty file and another for its content.
        match self.handle(opened.fh)?.as_ref() {
            Handle::Write { state, .. } => merge_pending(&mut lock(state).pending, Dirty::All),
            _ => self.committer.file(child, Dirty::All),
        }
        Ok((attr, opened))
    }

    /// A new file written through the mount exists only as its shadow until its first close:
    /// one file created per new file (not an empty store file plus a copy), and sync never sees
    /// it half-written. Lookup, getattr and readdir show it meanwhile.
    fn create_pending(
        &self,
        caller: Caller,
        dir: &RelPath,
        child: &RelPath,
        perm: u32,
    ) -> VfsResult<(Attr, Opened)> {
        let ino = lock(&self.inodes).get_or_insert(child, true);
        let setup = (|| -> VfsResult<Shadow> {
            let sh = self.new_shadow_file(None, ino)?;
            use std::os::unix::fs::PermissionsExt;
            let owned = sh
                .file
                .set_permissions(std::fs::Permissions::from_mode(perm))
                .map_err(VfsError::from)
                .and_then(|_| self.set_owner(caller, dir, &sh.path, perm));
            match owned {
                Ok(()) => Ok(sh),
                Err(e) => {
                    sh.remove();
                    Err(e)
                }
            }
        })();
        let sh = match setup {
            Ok(sh) => sh,
            Err(e) => {
                lock(&self.inodes).forget(ino, 1);
                return Err(e);
            }
        };
        let guard = self.locks.try_lock(child, Mode::Exclusive);
        let md = sh.file.metadata()?;
        let attr = Attr::from_meta(ino, &md);
        // With passthrough the kernel writes the shadow itself: no WRITE request per chunk (a
        // tree copy is mostly small new files). Nobody else has this inode open yet, so the
        // shadow can be its backing file.
        let pt = self.passthrough();
        let io = if pt {
            IoMode::Passthrough {
                file: sh.file.clone(),
                key: (md.dev(), md.ino()),
                writable: true,
            }
        } else {
            IoMode::Direct
        };
        let state = Arc::new(Mutex::new(WriteState {
            ino,
            base: None,
            shadow: Some(sh),
            pending: Some(Dirty::All),
            writers: 1,
            orphaned: false,
            created: true,
            in_place: false,
            kernel_writes: pt,
            _lock: guard,
        }));
        lock(&self.writers).insert(ino, state.clone());
        let fh = self.add_handle(Handle::Write { ino, state });
        Ok((
            attr,
            Opened {
                fh,
                io,
                writer_key: None,
            },
        ))
    }

    /// The kernel refused the backing file offered for new file `fh`: its writes come through
    /// [`Vfs::write`] after all.
    pub fn no_kernel_writes(&self, fh: u64) {
        if let Ok(h) = self.handle(fh) {
            if let Handle::Write { state, .. } = h.as_ref() {
                lock(state).kernel_writes = false;
            }
        }
    }

    /// Is `ino` a file created through the mount and not yet published?
    fn is_pending(&self, ino: u64) -> bool {
        self.writer_state(ino).is_some_and(|s| lock(&s).created)
    }

    /// Publish a pending new file now (before an operation that needs it in the store).
    fn publish_pending(&self, ino: u64) -> VfsResult<()> {
        if let Some(s) = self.writer_state(ino) {
            let mut st = lock(&s);
            if st.created {
                self.publish(&mut st)?;
            }
        }
        Ok(())
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> VfsResult<Vec<u8>> {
        let h = self.handle(fh)?;
        let file = match h.as_ref() {
            Handle::Read {
                file,
                fill: Some(fill),
                ..
            } => {
                if let Err(e) = fill.wait(offset, u64::from(size), FETCH_WAIT) {
                    tracing::warn!("read at {offset}: {e}");
                    return Err(VfsError::new(libc::EIO, e.message()));
                }
                file.clone()
            }
            Handle::Read { file, .. } => file.clone(),
            Handle::Write { state, .. } => {
                let st = lock(state);
                match (&st.shadow, &st.base) {
                    (Some(sh), _) => sh.file.clone(),
                    (None, Some(b)) => b.clone(),
                    (None, None) => return Ok(Vec::new()),
                }
            }
            Handle::Static { data } => {
                let start = (offset as usize).min(data.len());
                let end = start.saturating_add(size as usize).min(data.len());
                return Ok(data[start..end].to_vec());
            }
        };
        let mut buf = vec![0u8; size as usize];
        let mut got = 0usize;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(VfsError::io("read", e)),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> VfsResult<u32> {
        let h = self.handle(fh)?;
        let Handle::Write { state, .. } = h.as_ref() else {
            return Err(VfsError::new(libc::EBADF, "file not open for writing"));
        };
        let mut st = lock(state);
        if st.in_place {
            let rel = self.path_of(st.ino)?;
            self.store_rw(&rel)?
                .write_all_at(data, offset)
                .map_err(|e| VfsError::io("write", e))?;
            st.pending = Some(Dirty::All);
            return Ok(data.len() as u32);
        }
        self.ensure_shadow(&mut st)?;
        let Some(sh) = &st.shadow else {
            return Err(VfsError::new(libc::EIO, "no shadow file"));
        };
        sh.file
            .write_all_at(data, offset)
            .map_err(|e| VfsError::io("write", e))?;
        merge_pending(
            &mut st.pending,
            Dirty::Blocks(blocks_of(offset, data.len() as u64)),
        );
        Ok(data.len() as u32)
    }

    /// `posix_fallocate` / `fallocate` on a file open for writing: applied to the writer's
    /// version like a write.
    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> VfsResult<()> {
        let h = self.handle(fh)?;
        let Handle::Write { state, .. } = h.as_ref() else {
            return Err(VfsError::new(libc::EBADF, "file not open for writing"));
        };
        let mut st = lock(state);
        let fallocate = |f: &File| -> VfsResult<()> {
            // SAFETY: f is an open file; the kernel checks the arguments.
            let r = unsafe {
                libc::fallocate(
                    f.as_raw_fd(),
                    mode,
                    offset as libc::off_t,
                    length as libc::off_t,
                )
            };
            errno_result(r, "fallocate")
        };
        if st.in_place {
            let rel = self.path_of(st.ino)?;
            fallocate(&self.store_rw(&rel)?)?;
            st.pending = Some(Dirty::All);
            return Ok(());
        }
        self.ensure_shadow(&mut st)?;
        if let Some(sh) = &st.shadow {
            fallocate(&sh.file)?;
        }
        merge_pending(&mut st.pending, Dirty::Blocks(blocks_of(offset, length)));
        Ok(())
    }

    /// `close` of one descriptor: writers publish, so an `open` after this `close` sees the new
    /// version (close-to-open).
    pub fn flush(&self, fh: u64) -> VfsResult<()> {
        let h = self.handle(fh)?;
        if let Handle::Write { state, .. } = h.as_ref() {
            let mut st = lock(state);
            if st.in_place {
                // The kernel wrote without telling us: commit whatever is there now.
                st.pending = Some(Dirty::All);
            }
            self.publish(&mut st)?;
        }
        Ok(())
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> VfsResult<()> {
        let h = self.handle(fh)?;
        match h.as_ref() {
            Handle::Read { file, .. } => {
                if datasync {
                    file.sync_data()?
                } else {
                    file.sync_all()?
                }
            }
            Handle::Write { state, .. } => {
                let mut st = lock(state);
                if let Some(sh) = &st.shadow {
                    sh.file.sync_all()?;
                }
                self.publish(&mut st)?;
                if let Some(b) = &st.base {
                    b.sync_all()?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    pub fn release(&self, fh: u64) -> VfsResult<()> {
        let h = lock(&self.handles).remove(&fh);
        if let Some(h) = h {
            match h.as_ref() {
                Handle::Write { ino, state } => self.release_writer(*ino, state),
                Handle::Read {
                    ino, cached, exec, ..
                } => {
                    let counts = [(*cached, &self.cached_opens), (*exec, &self.exec_opens)];
                    for (counted, map) in counts {
                        if !counted {
                            continue;
                        }
                        let mut c = lock(map);
                        if let Some(n) = c.get_mut(ino) {
                            *n = n.saturating_sub(1);
                            if *n == 0 {
                                c.remove(ino);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    // ----- directories -----------------------------------------------------------------------

    /// Everything `ino` lists now, sorted by position.
    fn list_dir(&self, ino: u64) -> VfsResult<Vec<DirEntry>> {
        if ino == META_INO {
            let entries = vec![
                DirEntry {
                    ino: META_INO,
                    kind: FileKind::Dir,
                    name: ".".into(),
                    off: 1,
                },
                DirEntry {
                    ino: ROOT_INO,
                    kind: FileKind::Dir,
                    name: "..".into(),
                    off: 2,
                },
                DirEntry {
                    ino: MARKER_INO,
                    kind: FileKind::File,
                    name: MOUNT_MARKER.into(),
                    off: name_cookie(MOUNT_MARKER),
                },
            ];
            return Ok(entries);
        }
        let rel = self.path_of(ino)?;
        let full = self.full(&rel);
        let rd = match std::fs::read_dir(&full) {
            Ok(rd) => Some(rd),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(VfsError::io(&rel, e)),
        };
        let mut names: Vec<(String, FileKind)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        if let Some(rd) = rd {
            for ent in rd {
                let ent = ent.map_err(|e| VfsError::io(&rel, e))?;
                let name = ent.file_name();
                let Some(name) = name.to_str() else {
                    tracing::warn!("not showing non-UTF-8 name {name:?} in {}", full.display());
                    continue;
                };
                if (rel.is_root() && name == META_DIR) || name.ends_with(PART_SUFFIX) {
                    continue;
                }
                let kind = ent
                    .file_type()
                    .map(FileKind::from_std)
                    .unwrap_or(FileKind::File);
                seen.insert(name.to_string());
                names.push((name.to_string(), kind));
            }
        } else if self.remote.placeholder(&rel).is_none() {
            return Err(VfsError::enoent(&rel));
        }
        // Files being created through the mount, not in the store until their first close.
        let pending: Vec<u64> = lock(&self.writers)
            .iter()
            .filter(|(_, st)| {
                let st = lock(st);
                st.created && !st.orphaned
            })
            .map(|(ino, _)| *ino)
            .collect();
        if !pending.is_empty() {
            let t = lock(&self.inodes);
            for ino in pending {
                if let Some(p) = t.path(ino) {
                    if p.parent().as_ref() == Some(&rel) && seen.insert(p.file_name().to_string()) {
                        names.push((p.file_name().to_string(), FileKind::File));
                    }
                }
            }
        }
        for r in self.remote.placeholders_in(&rel) {
            let n = r.path.file_name().to_string();
            if !seen.contains(&n) {
                let kind = match r.kind {
                    Kind::File => FileKind::File,
                    Kind::Dir => FileKind::Dir,
                    Kind::Symlink => FileKind::Symlink,
                };
                names.push((n, kind));
            }
        }
        let parent_ino = {
            let t = lock(&self.inodes);
            rel.parent().and_then(|p| t.ino_of(&p)).unwrap_or(ROOT_INO)
        };
        let mut entries = Vec::with_capacity(names.len() + 2);
        entries.push(DirEntry {
            ino,
            kind: FileKind::Dir,
            name: ".".into(),
            off: 1,
        });
        entries.push(DirEntry {
            ino: parent_ino,
            kind: FileKind::Dir,
            name: "..".into(),
            off: 2,
        });
        {
            let mut t = lock(&self.inodes);
            for (n, kind) in names {
                let Ok(p) = rel.join(&n) else { continue };
                let ino = t.get_or_insert(&p, false);
                let off = name_cookie(&n);
                entries.push(DirEntry {
                    ino,
                    kind,
                    name: n,
                    off,
                });
            }
        }
        entries[2..].sort_unstable_by(|a, b| a.off.cmp(&b.off).then_with(|| a.name.cmp(&b.name)));
        // Two names with one hash (about 1 in 10^9 for 100k names): move the later one up, so
        // every position stays unique (stable as long as neither name comes or goes).
        for i in 3..entries.len() {
            if entries[i].off <= entries[i - 1].off {
                entries[i].off = entries[i - 1].off + 1;
            }
        }
        Ok(entries)
    }

    /// `readdir` of directory `ino` after position `offset` (0: from the start). Directories
    /// need no open handle: the mount answers OPENDIR with ENOSYS, so the kernel stops sending
    /// OPENDIR and RELEASEDIR (two round trips per directory) and asks by inode. Positions are
    /// hashes of the names, in increasing order, so an entry neither added nor removed during
    /// a walk is returned exactly once however the directory changes between calls (what
    /// ext4 does too). A walk's first call lists the directory afresh; later calls read that
    /// listing until the directory changes (then it is listed again).
    pub fn readdir(&self, ino: u64, offset: u64) -> VfsResult<DirPage> {
        let kept = if offset == 0 {
            None
        } else {
            lock(&self.listings).get(&ino).cloned()
        };
        let list = match kept {
            Some(l) => l,
            None => {
                let l = Arc::new(self.list_dir(ino)?);
                let mut m = lock(&self.listings);
                if m.len() >= MAX_LISTINGS {
                    m.clear();
                }
                m.insert(ino, l.clone());
                l
            }
        };
        let start = list.partition_point(|e| e.off <= offset);
        if start == list.len() {
            // The end of a walk: free the listing (the next walk lists afresh anyway).
            let mut m = lock(&self.listings);
            if m.get(&ino).is_some_and(|l| Arc::ptr_eq(l, &list)) {
                m.remove(&ino);
            }
        }
        Ok(DirPage { list, start })
    }

    /// READDIRPLUS: the entries of directory `ino` after `offset`, each with its attributes
    /// (`None` for `.` and `..`, which the kernel does not link), handed to `add` until it
    /// returns false (the reply is full). Every entry handed over counts as a lookup.
    pub fn readdir_plus(
        &self,
        ino: u64,
        offset: u64,
        mut add: impl FnMut(&DirEntry, Option<&Attr>) -> bool,
    ) -> VfsResult<()> {
        let page = self.readdir(ino, offset)?;
        // One descriptor for the directory: each entry is then one fstatat of its name, not a
        // walk of its whole path from the store root plus the inode table's path work.
        let dir = self.path_of(ino).ok().and_then(|rel| {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(self.full(&rel))
                .ok()
                .map(|f| (rel, f))
        });
        for e in page.iter() {
            if e.name == "." || e.name == ".." {
                if !add(e, None) {
                    break;
                }
                continue;
            }
            let a = match dir
                .as_ref()
                .and_then(|(rel, d)| self.listed_attr(rel, d, e))
            {
                Some(a) => a,
                None => match self.lookup(ino, OsStr::new(&e.name)) {
                    Ok(a) => a,
                    // Vanished since the listing was taken.
                    Err(_) => continue,
                },
            };
            if !add(e, Some(&a)) {
                // Did not fit: not handed over, so not a lookup.
                self.forget(a.ino, 1);
                break;
            }
        }
        Ok(())
    }

    /// The attributes of a listed store entry, counted as a lookup of the inode the listing
    /// gave it; `None` when [`Vfs::lookup`] must decide (not in the store: a file being
    /// created, a placeholder; a writer's shadow; an inode forgotten or renamed since).
    fn listed_attr(&self, rel: &RelPath, dir: &File, e: &DirEntry) -> Option<Attr> {
        let name = CString::new(e.name.as_bytes()).ok()?;
        // SAFETY: a zeroed stat is a valid out-buffer; dir is an open descriptor and name a
        // valid C string.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                name.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r != 0 || self.writer_state(e.ino).is_some() {
            return None;
        }
        // Still the node the listing named (a rename between the listing and now is caught).
        if !lock(&self.inodes).add_lookup(e.ino, rel, &e.name) {
            return None;
        }
        Some(Attr::from_stat(e.ino, &st))
    }

    /// The names in directory `ino` changed: a walk in progress must list it again.
    fn dir_changed(&self, ino: u64) {
        lock(&self.listings).remove(&ino);
    }

    pub fn statfs(&self) -> VfsResult<StatFs> {
        let c = cpath(&self.root)?;
        // SAFETY: statvfs fills the zeroed struct we pass; c is a valid C string.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        errno_result(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, "statfs")?;
        Ok(StatFs {
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            bsize: s.f_bsize as u32,
            namelen: s.f_namemax.min(255) as u32,
            frsize: s.f_frsize as u32,
        })
    }

    // ----- hooks for the daemon ----------------------------------------------------------------

    /// The sync engine changed `path` in the store (or learned of a remote change): drop what
    /// the kernel caches about it and its directory entry, so the mount shows it at once.
    pub fn invalidate(&self, path: &RelPath) {
        let inv = match self.invalidator.read() {
            Ok(g) => g.clone(),
            Err(_) => None,
        };
        let (ino, parent) = {
            let t = lock(&self.inodes);
            (t.ino_of(path), path.parent().and_then(|p| t.ino_of(&p)))
        };
        if let Some(parent) = parent {
            self.dir_changed(parent);
        }
        let Some(inv) = inv else { return };
        if let Some(ino) = ino {
            inv.inode(ino);
            // The sync engine replaces a file by renaming a new one over it: give the path a
            // fresh inode number on the next lookup, so opens of the new version never have to
            // share kernel I/O state (page cache, passthrough backing) with the old one.
            let is_dir = std::fs::symlink_metadata(self.full(path))
                .map(|m| m.is_dir())
                .unwrap_or(false);
            if !is_dir
                && !path.is_root()
                && self.writer_state(ino).is_none()
                && !lock(&self.fetching_for_writer).contains(&ino)
            {
                lock(&self.inodes).unlink(path);
            }
        }
        if let Some(parent) = parent {
            inv.entry(parent, path.file_name());
            // The directory's listing changed too.
            inv.inode(parent);
        }
    }
}

impl Drop for Vfs {
    fn drop(&mut self) {
        // Leftover shadows (a writer still open at unmount) are private copies; remove them.
        let states: Vec<_> = lock(&self.writers).drain().map(|(_, s)| s).collect();
        for s in states {
            let mut st = lock(&s);
            if let Some(sh) = st.shadow.take() {
                sh.remove();
            }
        }
        self.committer.shutdown();
    }
}
