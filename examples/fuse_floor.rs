//! The least a FUSE mirror file system can do, for `scripts/bench/mount.sh`: how much of the
//! cost of copying a tree into a mount is FUSE itself on this machine, and how much is mybox.
//!
//!   fuse_floor BACKING MOUNTPOINT [--flush-enosys] [--no-default-permissions] [--threads N]
//!
//! Same mount options as `mybox mount` (`default_permissions`, `allow_other`, 4 threads with
//! cloned descriptors, 1 s TTLs). `lookup` is one `fstatat` (a negative entry when absent),
//! `create` one `open(O_CREAT)` answered with passthrough, `flush` and `release` do nothing
//! but close. No shadows, no index, no hashing: a copy makes the same five requests per new
//! file as into mybox (LOOKUP, GETATTR of the parent, CREATE, FLUSH, RELEASE). Runs in the
//! foreground until unmounted. Not part of mybox; a measuring instrument.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BackingId, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyCreate,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, Request, SessionACL,
};

const TTL: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Inodes {
    by_ino: HashMap<u64, PathBuf>,
    by_path: HashMap<PathBuf, u64>,
    next: u64,
}

impl Inodes {
    fn get_or_insert(&mut self, p: &Path) -> u64 {
        if let Some(&i) = self.by_path.get(p) {
            return i;
        }
        let i = self.next;
        self.next += 1;
        self.by_ino.insert(i, p.to_path_buf());
        self.by_path.insert(p.to_path_buf(), i);
        i
    }
}

struct FloorFs {
    inodes: Mutex<Inodes>,
    handles: Mutex<HashMap<u64, (File, BackingId)>>,
    next_fh: AtomicU64,
    flush_enosys: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn last_errno() -> Errno {
    Errno::from_i32(
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO),
    )
}

fn cpath(p: &Path) -> Result<CString, Errno> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)
}

fn time_of(sec: i64, nsec: i64) -> SystemTime {
    u64::try_from(sec)
        .map(|s| UNIX_EPOCH + Duration::new(s, nsec as u32))
        .unwrap_or(UNIX_EPOCH)
}

fn attr_of(ino: u64, st: &libc::stat) -> FileAttr {
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    };
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time_of(st.st_atime, st.st_atime_nsec),
        mtime: time_of(st.st_mtime, st.st_mtime_nsec),
        ctime: time_of(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind,
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn lstat(p: &Path) -> Result<libc::stat, Errno> {
    let c = cpath(p)?;
    // SAFETY: an all-zero stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a valid out-pointer for the call.
    let r = unsafe {
        libc::fstatat(
            libc::AT_FDCWD,
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        Ok(st)
    } else {
        Err(last_errno())
    }
}

impl FloorFs {
    fn path(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        lock(&self.inodes)
            .by_ino
            .get(&ino.0)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    fn entry(&self, p: &Path) -> Result<FileAttr, Errno> {
        let st = lstat(p)?;
        Ok(attr_of(lock(&self.inodes).get_or_insert(p), &st))
    }

    /// Remove `name` from `parent` with `how` (unlink or rmdir) and forget its inode.
    fn remove(
        &self,
        parent: INodeNo,
        name: &OsStr,
        how: unsafe extern "C" fn(*const libc::c_char) -> libc::c_int,
    ) -> Result<(), Errno> {
        let p = self.path(parent)?.join(name);
        let c = cpath(&p)?;
        // SAFETY: `c` is a valid C string.
        if unsafe { how(c.as_ptr()) } != 0 {
            return Err(last_errno());
        }
        let mut t = lock(&self.inodes);
        if let Some(i) = t.by_path.remove(&p) {
            t.by_ino.remove(&i);
        }
        Ok(())
    }

    fn passthrough(&self, fd: libc::c_int) -> Result<(u64, File), Errno> {
        if fd < 0 {
            return Err(last_errno());
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok((self.next_fh.fetch_add(1, Ordering::Relaxed), file))
    }
}

impl Filesystem for FloorFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if config
            .add_capabilities(InitFlags::FUSE_PASSTHROUGH)
            .is_err()
            || config.set_max_stack_depth(1).is_err()
        {
            return Err(std::io::Error::other(
                "the kernel offers no FUSE passthrough",
            ));
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let p = match self.path(parent) {
            Ok(d) => d.join(name),
            Err(e) => return reply.error(e),
        };
        match self.entry(&p) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            // A negative entry (node 0), cached for the TTL.
            Err(e) if e == Errno::ENOENT => {
                // SAFETY: an all-zero stat is a valid value.
                let st: libc::stat = unsafe { std::mem::zeroed() };
                reply.entry(&TTL, &attr_of(0, &st), Generation(0))
            }
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.path(ino).and_then(|p| lstat(&p)) {
            Ok(st) => reply.attr(&TTL, &attr_of(ino.0, &st)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let made = self.path(parent).and_then(|d| {
            let p = d.join(name);
            let c = cpath(&p)?;
            // SAFETY: `c` is a valid C string.
            if unsafe { libc::mkdir(c.as_ptr(), mode as libc::mode_t) } != 0 {
                return Err(last_errno());
            }
            self.entry(&p)
        });
        match made {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove(parent, name, libc::unlink) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove(parent, name, libc::rmdir) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let opened = self.path(parent).and_then(|d| {
            let p = d.join(name);
            let c = cpath(&p)?;
            let how = (flags & !libc::O_NOCTTY) | libc::O_CREAT | libc::O_CLOEXEC;
            // SAFETY: `c` is a valid C string.
            let (fh, file) = self.passthrough(unsafe { libc::open(c.as_ptr(), how, mode) })?;
            Ok((fh, file, self.entry(&p)?))
        });
        let (fh, file, attr) = match opened {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        match reply.open_backing(&file) {
            Ok(id) => {
                reply.created_passthrough(
                    &TTL,
                    &attr,
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                    &id,
                );
                lock(&self.handles).insert(fh, (file, id));
            }
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let opened = self.path(ino).and_then(|p| {
            let c = cpath(&p)?;
            let how = (flags.0 & !(libc::O_NOCTTY | libc::O_CREAT)) | libc::O_CLOEXEC;
            // SAFETY: `c` is a valid C string.
            self.passthrough(unsafe { libc::open(c.as_ptr(), how) })
        });
        let (fh, file) = match opened {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        match reply.open_backing(&file) {
            Ok(id) => {
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
                lock(&self.handles).insert(fh, (file, id));
            }
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        if self.flush_enosys {
            reply.error(Errno::ENOSYS)
        } else {
            reply.ok()
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Dropping closes the backing id and the descriptor.
        drop(lock(&self.handles).remove(&fh.0));
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listed = self.path(ino).and_then(|p| {
            std::fs::read_dir(&p)
                .map_err(|e| Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO)))
        });
        let rd = match listed {
            Ok(rd) => rd,
            Err(e) => return reply.error(e),
        };
        let mut entries = vec![
            (ino.0, FileType::Directory, ".".into()),
            (ino.0, FileType::Directory, "..".into()),
        ];
        {
            let mut t = lock(&self.inodes);
            for e in rd.flatten() {
                let kind = e
                    .file_type()
                    .ok()
                    .and_then(FileType::from_std)
                    .unwrap_or(FileType::RegularFile);
                entries.push((t.get_or_insert(&e.path()), kind, e.file_name()));
            }
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: fuse_floor BACKING MOUNTPOINT [--flush-enosys] \
                 [--no-default-permissions] [--threads N]";
    let (Some(backing), Some(mountpoint)) = (args.first(), args.get(1)) else {
        anyhow::bail!("{usage}");
    };
    let backing = std::fs::canonicalize(backing)?;
    let (mut flush_enosys, mut default_permissions, mut threads) = (false, true, 4usize);
    let mut rest = args[2..].iter();
    while let Some(a) = rest.next() {
        match a.as_str() {
            "--flush-enosys" => flush_enosys = true,
            "--no-default-permissions" => default_permissions = false,
            "--threads" => {
                threads = rest
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(|| anyhow::anyhow!("--threads needs a positive number"))?
            }
            other => anyhow::bail!("unknown argument {other}\n{usage}"),
        }
    }
    let mut inodes = Inodes {
        next: 2,
        ..Inodes::default()
    };
    inodes.by_ino.insert(1, backing.clone());
    inodes.by_path.insert(backing, 1);
    let fs = FloorFs {
        inodes: Mutex::new(inodes),
        handles: Mutex::new(HashMap::new()),
        next_fh: AtomicU64::new(1),
        flush_enosys,
    };
    let mut cfg = Config::default();
    cfg.mount_options = vec![MountOption::FSName("fuse_floor".into())];
    if default_permissions {
        cfg.mount_options.push(MountOption::DefaultPermissions);
    }
    cfg.acl = SessionACL::All;
    cfg.n_threads = Some(threads);
    cfg.clone_fd = true;
    fuser::mount(fs, mountpoint, &cfg)?;
    Ok(())
}
