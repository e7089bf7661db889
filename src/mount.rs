//! `mybox mount` / `mybox umount`: mounting a box's namespace with FUSE in the foreground,
//! unmounting on SIGINT/SIGTERM, and clearing a mount left behind by a process that died.
//!
//! As root, fuser mounts with the `mount(2)` system call directly (no libfuse, no fusermount).
//! A non-root user needs `fusermount3` (package fuse3) on PATH, and `user_allow_other` in
//! `/etc/fuse.conf` for other users to see the mount; see docs/fuse.md.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use fuser::{MountOption, SessionACL};

use crate::config::BoxDir;
use crate::fuse::{FuseFs, KernelInvalidator};
use crate::vfs::hooks::{ChangeSink, ContentSource, RemoteView};
use crate::vfs::{Vfs, VfsOptions};

/// Worker threads serving kernel requests (a blocked read must not stall a `stat`).
pub const THREADS: usize = 4;

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Is `path` the mount point of a mounted file system (from /proc/self/mountinfo)?
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    mount_device(&text, path).is_some()
}

/// The `major:minor` device of the file system mounted at `path` (the last mount there), from
/// mountinfo text; `None` when nothing is mounted there.
fn mount_device<'a>(mountinfo: &'a str, path: &Path) -> Option<&'a str> {
    let want = path.as_os_str().as_bytes();
    mountinfo.lines().rev().find_map(|l| {
        let mut f = l.split(' ');
        let dev = f.nth(2)?;
        let point = f.nth(1)?;
        (unescape_mountinfo(point).as_slice() == want).then_some(dev)
    })
}

/// Kernel read-ahead asked of a mount, in KiB. The kernel's default for a FUSE mount is 128 KiB,
/// so a sequential reader of a file served by mybox (a placeholder being fetched, or any read
/// without passthrough) costs one READ request per 128 KiB; at 1 MiB (the largest request
/// FUSE makes) it is one per MiB. Measured on a 1 GiB on-demand read: 8,192 requests become
/// 1,024, about 6 % faster.
const READ_AHEAD_KB: u32 = 1024;

/// Raise the read-ahead of the FUSE mount at `mp` through its backing device's sysfs entry
/// (root only; the mount works without it). Reads mountinfo, never the mount itself: this runs
/// before the session serves requests, and a `stat` of the mount point would wait for itself.
fn raise_read_ahead(mp: &Path) {
    let dev = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|t| mount_device(&t, mp).map(str::to_owned));
    let Some(dev) = dev else {
        tracing::debug!("read-ahead: {} not found in mountinfo", mp.display());
        return;
    };
    let knob = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    match std::fs::write(&knob, READ_AHEAD_KB.to_string()) {
        Ok(()) => tracing::debug!("read-ahead of {} set to {READ_AHEAD_KB} KiB", mp.display()),
        Err(e) => tracing::debug!("read-ahead left at the kernel's default ({knob}: {e})"),
    }
}

/// Mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && b.len() >= i + 4 {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn umount2(path: &Path, flags: libc::c_int) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: c is a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Unmount with fusermount (what a non-root user has).
fn fusermount_u(path: &Path, lazy: bool) -> anyhow::Result<()> {
    for bin in ["fusermount3", "fusermount"] {
        let mut cmd = std::process::Command::new(bin);
        cmd.arg(if lazy { "-uz" } else { "-u" }).arg(path);
        match cmd.status() {
            Ok(s) if s.success() => return Ok(()),
            Ok(s) => bail!("{bin} -u {} failed ({s})", path.display()),
            Err(_) => continue,
        }
    }
    bail!(
        "cannot unmount {} (not root and no fusermount3)",
        path.display()
    )
}

/// Does `mountpoint` hold a FUSE mount whose process died? Such a mount answers with ENOTCONN
/// ("Transport endpoint is not connected"). `statfs` is asked because it always reaches the
/// file system; a `stat` of the root may be answered from the kernel's attribute cache.
pub fn is_stale(mountpoint: &Path) -> bool {
    let Ok(c) = CString::new(mountpoint.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct; c is a valid C string.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statfs(c.as_ptr(), &mut s) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOTCONN)
}

/// Detach a stale mount (see [`is_stale`]) lazily so the mount point is usable again. Returns
/// whether one was cleared.
pub fn clear_stale(mountpoint: &Path) -> anyhow::Result<bool> {
    if !is_stale(mountpoint) {
        return Ok(false);
    }
    tracing::warn!("clearing stale mount at {}", mountpoint.display());
    match umount2(mountpoint, libc::MNT_DETACH) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            fusermount_u(mountpoint, true)?;
            Ok(true)
        }
        Err(e) => Err(e).with_context(|| format!("detaching stale mount {}", mountpoint.display())),
    }
}

/// `mybox umount MOUNTPOINT`: unmount a live mount (its `mybox mount` process then exits), or
/// clear a stale one.
pub fn umount(mountpoint: &Path) -> anyhow::Result<()> {
    if clear_stale(mountpoint)? {
        eprintln!("cleared stale mount at {}", mountpoint.display());
        return Ok(());
    }
    let abs = mountpoint
        .canonicalize()
        .with_context(|| format!("resolving {}", mountpoint.display()))?;
    if !is_mountpoint(&abs) {
        bail!("{} is not mounted", abs.display());
    }
    match umount2(&abs, 0) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            // Someone's cwd or open file is inside: detach now, the kernel finishes when they
            // let go (the mount process exits right away either way).
            tracing::warn!("{} is busy; detaching lazily", abs.display());
            umount2(&abs, libc::MNT_DETACH).with_context(|| format!("detaching {}", abs.display()))
        }
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => fusermount_u(&abs, false),
        Err(e) => Err(e).with_context(|| format!("unmounting {}", abs.display())),
    }
}

/// Options of a mount.
#[derive(Clone, Debug)]
pub struct MountConfig {
    /// Let other users in (`allow_other`); default: when running as root.
    pub allow_other: bool,
    /// Ask the kernel for passthrough reads of local files (root only: registering backing
    /// files needs CAP_SYS_ADMIN).
    pub passthrough: bool,
    /// Make the store root the process's current directory and address store files relative
    /// to it (paths up to PATH_MAX below the mount point then always fit a system call). Only
    /// for a process that owns its current directory: `mybox mount`, the daemon.
    pub chdir_to_store: bool,
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            allow_other: is_root(),
            passthrough: is_root(),
            chdir_to_store: false,
        }
    }
}

/// A live mount; dropping it unmounts.
pub struct Mounted {
    pub vfs: Arc<Vfs>,
    pub mountpoint: PathBuf,
    session: Option<fuser::Session<FuseFs>>,
}

fn fuser_config(cfg: &MountConfig) -> fuser::Config {
    let mut c = fuser::Config::default();
    c.mount_options = vec![
        MountOption::FSName("mybox".into()),
        MountOption::Subtype("mybox".into()),
        MountOption::DefaultPermissions,
    ];
    c.acl = if cfg.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    // MYBOX_FUSE_THREADS overrides the worker count (for measuring; at least 1).
    let threads = std::env::var("MYBOX_FUSE_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(THREADS);
    c.n_threads = Some(threads);
    c.clone_fd = true;
    c
}

/// Mount the store of `b` at `mountpoint` standalone (no sync hooks).
pub fn mount(b: &BoxDir, mountpoint: &Path, cfg: &MountConfig) -> anyhow::Result<Mounted> {
    mount_with(b, mountpoint, cfg, VfsOptions::default())
}

/// Mount the store of `b` at `mountpoint` with the daemon's hooks (change sink, remote view,
/// content source, shared lock manager). The kernel handshake is done when this returns; call
/// [`Mounted::run`] (blocking) to serve requests.
pub fn mount_with(
    b: &BoxDir,
    mountpoint: &Path,
    cfg: &MountConfig,
    opts: VfsOptions,
) -> anyhow::Result<Mounted> {
    clear_stale(mountpoint)?;
    let mp = mountpoint
        .canonicalize()
        .with_context(|| format!("mount point {}", mountpoint.display()))?;
    if !mp.is_dir() {
        bail!("mount point {} is not a directory", mp.display());
    }
    if mp.starts_with(&b.root) {
        bail!(
            "mount point {} is inside the box's store {}; pick a folder outside it",
            mp.display(),
            b.root.display()
        );
    }
    if is_mountpoint(&mp) {
        bail!("{} is already a mount point", mp.display());
    }
    let device = crate::scan::device_short(b)?;
    let vfs = Arc::new(Vfs::new(b.clone(), device, opts)?);
    if cfg.chdir_to_store {
        std::env::set_current_dir(&b.root)
            .with_context(|| format!("entering {}", b.root.display()))?;
        vfs.use_relative_paths()?;
    }
    let fs = FuseFs::new(vfs.clone(), cfg.passthrough);
    let session = fuser::Session::new(fs, &mp, &fuser_config(cfg))
        .with_context(|| format!("mounting {}", mp.display()))?;
    vfs.set_invalidator(Arc::new(KernelInvalidator(session.notifier())));
    raise_read_ahead(&mp);
    Ok(Mounted {
        vfs,
        mountpoint: mp,
        session: Some(session),
    })
}

impl Mounted {
    /// Serve kernel requests until the file system is unmounted (by `mybox umount`, `umount`,
    /// or [`unmounter`](Self::unmounter) from a signal handler).
    pub fn run(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.session.take() {
            s.run().context("serving the mount")?;
        }
        self.vfs.shutdown();
        Ok(())
    }

    pub fn unmounter(&mut self) -> Option<fuser::SessionUnmounter> {
        self.session.as_mut().map(|s| s.unmount_callable())
    }
}

/// The sync engine as the mount's [`ChangeSink`]: changes committed through the mount are
/// announced to peers at once.
struct EngineSink(Arc<crate::sync::Engine>);

impl ChangeSink for EngineSink {
    fn changed(&self, paths: &[crate::paths::RelPath]) {
        self.0.local_changed(paths);
    }
}

/// The engine's view of the peers' indexes as the mount's placeholders (on-demand mode).
struct EngineRemote(Arc<crate::sync::Engine>);

impl RemoteView for EngineRemote {
    fn placeholder(&self, path: &crate::paths::RelPath) -> Option<crate::model::Record> {
        self.0.placeholder(path)
    }
    fn placeholders_in(&self, dir: &crate::paths::RelPath) -> Vec<crate::model::Record> {
        self.0.placeholders_in(dir)
    }
}

/// Placeholder content pulled by the engine when read (on-demand mode): streamed block by
/// block, reads served as their blocks arrive (see `sync::engine::Hydration`).
struct EngineSource(Arc<crate::sync::Engine>);

impl ContentSource for EngineSource {
    fn fetch(
        &self,
        record: &crate::model::Record,
        _offset: u64,
        _len: u64,
        timeout: std::time::Duration,
    ) -> crate::vfs::VfsResult<()> {
        self.0
            .fetch_now(record, timeout)
            .map_err(|e| crate::vfs::VfsError::new(libc::EIO, format!("{e:#}")))
    }

    fn hydrate(
        &self,
        record: &crate::model::Record,
    ) -> Option<crate::vfs::VfsResult<Arc<dyn crate::vfs::hooks::Hydration>>> {
        Some(
            self.0
                .hydrate(record)
                .map(|h| h as Arc<dyn crate::vfs::hooks::Hydration>)
                .map_err(|e| crate::vfs::VfsError::new(libc::EIO, format!("{e:#}"))),
        )
    }
}

/// Does `mybox mount` run the daemon too? When asked to listen or fetch on demand, or when the
/// box has peers to sync with; otherwise the store is mounted standalone (nothing to serve).
pub fn wants_daemon(b: &BoxDir, listen: &Option<String>, on_demand: bool) -> bool {
    listen.is_some()
        || on_demand
        || b.load_config()
            .map(|c| !c.peers.is_empty())
            .unwrap_or(false)
}

/// `mybox mount MOUNTPOINT`: mount in the foreground until unmounted or signalled. With
/// `daemon`, the box is also served and synced in this process (what `mybox daemon` does), over
/// one shared server context: the vfs and the sync applier use the same per-file locks, commits
/// through the mount are pushed at once, and files the engine changes are invalidated in the
/// kernel's caches.
pub async fn run_foreground(
    b: BoxDir,
    mountpoint: PathBuf,
    daemon: Option<(Option<String>, u64)>,
    on_demand: bool,
) -> anyhow::Result<()> {
    // Modes asked for by callers are applied exactly (the kernel already applied their umask).
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(0) };
    let cfg = MountConfig {
        chdir_to_store: true,
        ..MountConfig::default()
    };
    // Resolve the mount point before leaving the current directory.
    let mountpoint = std::path::absolute(&mountpoint).unwrap_or(mountpoint);
    let daemon = match daemon {
        Some((listen, rescan)) => {
            Some(crate::daemon::Daemon::start(&b, listen, rescan, on_demand).await?)
        }
        None => None,
    };
    let opts = match &daemon {
        Some(d) if on_demand => VfsOptions {
            sink: Arc::new(EngineSink(d.engine.clone())),
            remote: Arc::new(EngineRemote(d.engine.clone())),
            source: Arc::new(EngineSource(d.engine.clone())),
            locks: d.ctx.locks.clone(),
        },
        Some(d) => VfsOptions {
            sink: Arc::new(EngineSink(d.engine.clone())),
            locks: d.ctx.locks.clone(),
            ..VfsOptions::default()
        },
        None => VfsOptions::default(),
    };
    let mut m = match mount_with(&b, &mountpoint, &cfg, opts) {
        Ok(m) => m,
        Err(e) => {
            if let Some(d) = daemon {
                let _ = d.serve(async {}).await;
            }
            return Err(e);
        }
    };
    let mp = m.mountpoint.clone();
    let mut unmounter = m.unmounter();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let served = daemon.map(|d| {
        let vfs = Arc::downgrade(&m.vfs);
        d.engine
            .set_on_applied(Arc::new(move |p: &crate::paths::RelPath| {
                if let Some(v) = vfs.upgrade() {
                    v.invalidate(p);
                }
            }));
        println!(
            "mybox {} serving {} on {}",
            d.ctx.ident.id,
            b.root.display(),
            d.addr
        );
        tokio::spawn(d.serve(async move {
            let _ = stop_rx.await;
        }))
    });
    println!("mybox: {} mounted at {}", b.root.display(), mp.display());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tracing::info!(
        "mounted {} at {} (passthrough {})",
        b.root.display(),
        mp.display(),
        m.vfs.passthrough()
    );
    let mut serve = tokio::task::spawn_blocking(move || m.run());
    let res = tokio::select! {
        r = &mut serve => r.context("mount thread").and_then(|r| r),
        _ = crate::cli::shutdown_signal() => {
            tracing::info!("signal: unmounting {}", mp.display());
            let done = unmounter.as_mut().map(|u| u.unmount());
            if let Some(Err(e)) = done {
                tracing::warn!("unmount: {e}; detaching lazily");
                let _ = umount2(&mp, libc::MNT_DETACH);
            }
            serve.await.context("mount thread").and_then(|r| r)
        }
    };
    tracing::info!("unmounted {}", mp.display());
    if let Some(task) = served {
        let _ = stop_tx.send(());
        match task.await {
            Ok(Err(e)) => tracing::warn!("daemon: {e:#}"),
            Err(e) => tracing::warn!("daemon task: {e}"),
            Ok(Ok(())) => {}
        }
        crate::daemon::exit_soon();
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_device_is_the_last_mount_at_the_path() {
        let info = "22 1 0:21 / /proc rw - proc proc rw\n\
                    90 29 0:77 / /mnt/a\\040b rw - fuse.mybox mybox rw\n\
                    91 90 0:78 / /mnt/a\\040b rw - fuse.mybox mybox rw\n";
        assert_eq!(mount_device(info, Path::new("/mnt/a b")), Some("0:78"));
        assert_eq!(mount_device(info, Path::new("/proc")), Some("0:21"));
        assert_eq!(mount_device(info, Path::new("/mnt")), None);
        assert_eq!(mount_device("garbage\n\n", Path::new("/mnt")), None);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), b"/a b".to_vec());
        assert_eq!(unescape_mountinfo("/plain"), b"/plain".to_vec());
    }
}
