//! The fuser adapter: each kernel request calls the [`Vfs`] core and replies with its result or
//! its errno. No file system logic lives here; what does is translation (types, flags), the
//! kernel's passthrough bookkeeping (backing ids are fuser objects), and a panic guard, because
//! a panic in a handler would take the whole mount down.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, Notifier, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::vfs::hooks::Invalidator;
use crate::vfs::{Attr, Caller, FileKind, IoMode, Opened, SetAttr, TimeSet, Vfs, VfsError};

/// How long the kernel may cache attributes and entries. Changes made through the mount update
/// the kernel's view directly; changes from sync are pushed with [`Vfs::invalidate`]; only edits
/// made to the store behind the mount's back wait this long to show.
pub const TTL: Duration = Duration::from_secs(10);

/// How long the kernel may remember that a name does not exist. Shorter than [`TTL`]: a name
/// can appear without any invalidation reaching the kernel (a placeholder the engine defers
/// to the mount in on-demand mode, an edit made to the store behind the mount's back).
pub const NEGATIVE_TTL: Duration = Duration::from_secs(1);

/// How long an open waits for the RELEASE of closed passthrough handles of its inode (see
/// [`FuseFs::settle`]). It normally comes within a millisecond; 50 ms was not enough with both
/// cores busy (a CI run beside a test loop: a reader tied to the old backing file then saw a
/// writer's bytes). Only an open whose inode was just closed, or is still open through a
/// duplicated descriptor, can wait this long.
const RELEASE_WAIT: Duration = Duration::from_millis(500);

/// Backing files registered for passthrough, per inode: every passthrough open of one inode
/// must use the same backing file, so registrations are shared while any open holds them.
#[derive(Default)]
struct Backings {
    by_ino: HashMap<u64, Backing>,
    by_fh: HashMap<u64, Arc<BackingId>>,
    /// Passthrough handles that have been closed at least once (FLUSH): their RELEASE, which
    /// the kernel sends asynchronously after the close, is probably on its way.
    flushed: HashSet<u64>,
}

struct Backing {
    /// (device, inode) of the store file registered.
    key: (u64, u64),
    /// Registered open read-write, so a writer can share it.
    writable: bool,
    id: Weak<BackingId>,
}

pub struct FuseFs {
    vfs: Arc<Vfs>,
    want_passthrough: bool,
    /// Answer OPENDIR instead of ENOSYS (`MYBOX_FUSE_OPENDIR=1`, for measuring what the
    /// round trips cost).
    answer_opendir: bool,
    backings: Mutex<Backings>,
    /// Signalled when a passthrough handle is released.
    released: Condvar,
}

impl FuseFs {
    pub fn new(vfs: Arc<Vfs>, want_passthrough: bool) -> Self {
        FuseFs {
            vfs,
            want_passthrough,
            answer_opendir: std::env::var_os("MYBOX_FUSE_OPENDIR").is_some(),
            backings: Mutex::new(Backings::default()),
            released: Condvar::new(),
        }
    }
}

fn kind(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
    }
}

fn attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

/// Attributes carrying nothing but an inode number, kind, permissions and link count: a negative
/// lookup reply (inode 0) and the `.`/`..` entries of a listing, which the kernel does not link.
fn bare_attr(ino: u64, kind: FileType, perm: u16, nlink: u32, blksize: u32) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind,
        perm,
        nlink,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize,
        flags: 0,
    }
}

/// The attributes of a negative lookup reply: only the inode number (0) matters.
fn negative_entry() -> FileAttr {
    bare_attr(0, FileType::RegularFile, 0, 0, 0)
}

fn direct_or_cached(io: &IoMode) -> FopenFlags {
    match io {
        IoMode::Cached => FopenFlags::empty(),
        _ => FopenFlags::FOPEN_DIRECT_IO,
    }
}

fn errno(e: &VfsError) -> Errno {
    if e.is_expected() {
        tracing::debug!("{e}");
    } else {
        tracing::warn!("{e}");
    }
    Errno::from_i32(e.errno())
}

/// Run a core call; a panic becomes EIO instead of killing the mount.
fn guard<T>(what: &str, f: impl FnOnce() -> Result<T, VfsError>) -> Result<T, VfsError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => Err(VfsError::new(libc::EIO, format!("{what}: internal error"))),
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn time_set(t: Option<TimeOrNow>) -> Option<TimeSet> {
    t.map(|t| match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(s) => TimeSet::At(s),
    })
}

impl FuseFs {
    /// Reply to an open: passthrough when the core offers it and the kernel accepts the backing
    /// file, else direct I/O (so this open cannot conflict with passthrough opens of the inode).
    /// The kernel fails (EIO) any open of an inode that is open through passthrough unless it
    /// uses the same backing file; a writer arriving then is switched to in-place writing.
    fn reply_open(&self, ino: u64, o: Opened, reply: ReplyOpen) {
        let fh = o.fh;
        let mut b = self.backings.lock().unwrap_or_else(|p| p.into_inner());
        let live = b
            .by_ino
            .get(&ino)
            .and_then(|e| e.id.upgrade().map(|id| (e.key, e.writable, id)));
        // While an inode is open through passthrough, the kernel accepts only passthrough opens
        // with the same backing file (anything else fails with EIO).
        if let Some((key, writable, id)) = live {
            if let Some(wkey) = o.writer_key {
                let shared = if key == wkey && writable {
                    self.vfs.set_in_place(fh)
                } else {
                    Err(VfsError::new(
                        libc::EBUSY,
                        "an older version of this file is still open for reading",
                    ))
                };
                if let Err(e) = shared {
                    drop(b);
                    let _ = self.vfs.release(fh);
                    return reply.error(errno(&e));
                }
            }
            b.by_fh.insert(fh, id.clone());
            return reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
        }
        let IoMode::Passthrough {
            file,
            key,
            writable,
        } = &o.io
        else {
            drop(b);
            return reply.opened(FileHandle(fh), direct_or_cached(&o.io));
        };
        match reply.open_backing(file.as_ref()) {
            Ok(id) => {
                let id = Arc::new(id);
                b.by_ino.insert(
                    ino,
                    Backing {
                        key: *key,
                        writable: *writable,
                        id: Arc::downgrade(&id),
                    },
                );
                b.by_fh.insert(fh, id.clone());
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
            }
            Err(e) => {
                // Direct I/O leaves the inode free for a later passthrough open.
                tracing::debug!("passthrough refused for inode {ino}: {e}");
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO)
            }
        }
    }

    /// Reply to a create: a new file the core offers for passthrough gets its shadow as the
    /// backing file, so the kernel writes it without a WRITE request per chunk. Refused (or the
    /// inode number still registered for an older file): writes go through the core.
    fn reply_created(&self, a: Attr, o: Opened, reply: ReplyCreate) {
        let fh = o.fh;
        let fa = attr(&a);
        let IoMode::Passthrough {
            file,
            key,
            writable,
        } = &o.io
        else {
            return reply.created(
                &TTL,
                &fa,
                Generation(0),
                FileHandle(fh),
                direct_or_cached(&o.io),
            );
        };
        let mut b = self.backings.lock().unwrap_or_else(|p| p.into_inner());
        let live = b
            .by_ino
            .get(&a.ino)
            .is_some_and(|e| e.id.strong_count() > 0);
        let id = if live {
            None
        } else {
            match reply.open_backing(file.as_ref()) {
                Ok(id) => Some(Arc::new(id)),
                Err(e) => {
                    tracing::debug!("passthrough refused for new inode {}: {e}", a.ino);
                    None
                }
            }
        };
        let Some(id) = id else {
            drop(b);
            self.vfs.no_kernel_writes(fh);
            return reply.created(
                &TTL,
                &fa,
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO,
            );
        };
        b.by_ino.insert(
            a.ino,
            Backing {
                key: *key,
                writable: *writable,
                id: Arc::downgrade(&id),
            },
        );
        b.by_fh.insert(fh, id.clone());
        reply.created_passthrough(
            &TTL,
            &fa,
            Generation(0),
            FileHandle(fh),
            FopenFlags::empty(),
            &id,
        );
    }

    /// The backings table, once the passthrough handles of `ino` that were closed have been
    /// released (or [`RELEASE_WAIT`] passed). The kernel drops an inode's backing file at the
    /// last close but tells us with an asynchronous RELEASE, so an open right after a close
    /// (`echo x > f; cat f`) can arrive first; it would then be tied to the old backing file
    /// (and a later writer forced to write in place) although the kernel no longer has one.
    /// A handle still open through another descriptor (dup, fork) just costs this wait.
    fn settle(&self, ino: u64) -> MutexGuard<'_, Backings> {
        let mut b = self.backings.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = std::time::Instant::now() + RELEASE_WAIT;
        loop {
            let Some(id) = b.by_ino.get(&ino).and_then(|e| e.id.upgrade()) else {
                return b;
            };
            let all_closed = b
                .by_fh
                .iter()
                .filter(|(_, v)| Arc::ptr_eq(v, &id))
                .all(|(fh, _)| b.flushed.contains(fh));
            drop(id);
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if !all_closed || left.is_zero() {
                return b;
            }
            b = match self.released.wait_timeout(b, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    fn flushed(&self, fh: u64) {
        let mut b = self.backings.lock().unwrap_or_else(|p| p.into_inner());
        if b.by_fh.contains_key(&fh) {
            b.flushed.insert(fh);
        }
    }

    fn drop_backing(&self, fh: u64) {
        let mut b = self.backings.lock().unwrap_or_else(|p| p.into_inner());
        b.flushed.remove(&fh);
        if b.by_fh.remove(&fh).is_some() {
            b.by_ino.retain(|_, e| e.id.strong_count() > 0);
            drop(b);
            self.released.notify_all();
        }
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // O_TRUNC arrives with open instead of as a separate truncate, so a truncating writer
        // never publishes an empty file in between.
        let _ = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC);
        // Listings carry attributes (READDIRPLUS): `ls -lR` on a fresh mount needs no LOOKUP
        // per entry (measured 1.7x faster on the std docs tree; `find`, which needs no
        // attributes, ~20 % slower, and the kernel falls back to plain READDIR for
        // directories nobody stats). MYBOX_NO_READDIRPLUS=1 turns it off.
        if std::env::var_os("MYBOX_NO_READDIRPLUS").is_none() {
            let _ = config.add_capabilities(
                InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO,
            );
        }
        if self.want_passthrough {
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            self.vfs.set_passthrough(ok);
            if ok {
                tracing::info!("kernel passthrough enabled for reads of local files");
            } else {
                tracing::info!("kernel passthrough not available; reads go through mybox");
            }
        }
        Ok(())
    }

    fn destroy(&mut self) {
        self.vfs.shutdown();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match guard("lookup", || self.vfs.lookup(parent.0, name)) {
            Ok(a) => reply.entry(&TTL, &attr(&a), Generation(0)),
            // Inode 0 is "no such entry, and you may remember that" (a negative dentry), so a
            // shell or `cp` asking again for a missing name costs no request. Creations through
            // the mount replace it; sync's go through `Vfs::invalidate`, which drops the entry.
            Err(e) if e.errno() == libc::ENOENT => {
                reply.entry(&NEGATIVE_TTL, &negative_entry(), Generation(0))
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let _ = guard("forget", || {
            self.vfs.forget(ino.0, nlookup);
            Ok(())
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match guard("getattr", || self.vfs.getattr(ino.0, fh.map(|f| f.0))) {
            Ok(a) => reply.attr(&TTL, &attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: time_set(atime),
            mtime: time_set(mtime),
        };
        match guard("setattr", || {
            self.vfs.setattr(caller(req), ino.0, fh.map(|f| f.0), &set)
        }) {
            Ok(a) => reply.attr(&TTL, &attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match guard("readlink", || self.vfs.readlink(ino.0)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        match guard("mknod", || {
            self.vfs
                .mknod(caller(req), parent.0, name, mode, umask, rdev)
        }) {
            Ok(a) => reply.entry(&TTL, &attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        match guard("mkdir", || {
            self.vfs.mkdir(caller(req), parent.0, name, mode, umask)
        }) {
            Ok(a) => reply.entry(&TTL, &attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match guard("unlink", || self.vfs.unlink(parent.0, name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match guard("rmdir", || self.vfs.rmdir(parent.0, name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        match guard("symlink", || {
            self.vfs.symlink(caller(req), parent.0, link_name, target)
        }) {
            Ok(a) => reply.entry(&TTL, &attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match guard("rename", || {
            self.vfs
                .rename(parent.0, name, newparent.0, newname, flags.bits())
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        match guard("link", || self.vfs.link(ino.0, newparent.0, newname)) {
            Ok(a) => reply.entry(&TTL, &attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // Before the core looks at the inode's writers: a closed writer's release must come first.
        drop(self.settle(ino.0));
        match guard("open", || self.vfs.open(ino.0, flags.0)) {
            Ok(o) => self.reply_open(ino.0, o, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match guard("read", || self.vfs.read(fh.0, offset, size)) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match guard("write", || self.vfs.write(fh.0, offset, data)) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.flushed(fh.0);
        match guard("flush", || self.vfs.flush(fh.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.drop_backing(fh.0);
        match guard("release", || self.vfs.release(fh.0)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match guard("fsync", || self.vfs.fsync(fh.0, datasync)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.answer_opendir {
            // Measuring only (MYBOX_FUSE_OPENDIR=1): the listing cache flags the kernel
            // otherwise applies by itself.
            return reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            );
        }
        // ENOSYS once, and the kernel (>= 5.1) never sends OPENDIR or RELEASEDIR again: two
        // round trips fewer per directory walked (`find` on a fresh mount was ~4.5 requests per
        // directory). Listings are then asked for by inode (`Vfs::readdir` needs no handle),
        // and the kernel opens every directory with FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR, so it
        // still caches listings until they change.
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match guard("readdir", || self.vfs.readdir(ino.0, offset)) {
            Ok(entries) => {
                for e in entries.iter() {
                    if reply.add(INodeNo(e.ino), e.off, kind(e.kind), &e.name) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let r = guard("readdirplus", || {
            self.vfs.readdir_plus(ino.0, offset, |e, a| {
                // The kernel does not link `.` and `..`; any attributes do.
                let fa = match a {
                    Some(a) => attr(a),
                    None => bare_attr(e.ino, FileType::Directory, 0o755, 2, 4096),
                };
                !reply.add(fa.ino, e.off, &e.name, &TTL, &fa, Generation(0))
            })
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    // Extended attributes are not synced, so the mount keeps none. ENOSYS makes the kernel stop
    // asking (callers get EOPNOTSUPP) instead of paying a round trip per `ls -l` entry.
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match guard("fallocate", || {
            self.vfs.fallocate(fh.0, offset, length, mode)
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match guard("statfs", || self.vfs.statfs()) {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match guard("create", || {
            self.vfs
                .create(caller(req), parent.0, name, mode, umask, flags)
        }) {
            Ok((a, o)) => self.reply_created(a, o, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// [`Invalidator`] over fuser's notifier (used from the daemon's threads, never from a handler).
pub struct KernelInvalidator(pub Notifier);

impl Invalidator for KernelInvalidator {
    fn inode(&self, ino: u64) {
        if let Err(e) = self.0.inval_inode(INodeNo(ino), 0, 0) {
            tracing::debug!("invalidating inode {ino}: {e}");
        }
    }

    fn entry(&self, parent: u64, name: &str) {
        if let Err(e) = self.0.inval_entry(INodeNo(parent), OsStr::new(name)) {
            tracing::debug!("invalidating entry {name:?} in {parent}: {e}");
        }
    }
}
