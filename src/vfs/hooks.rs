//! The seams between the vfs and the rest of a running box. A standalone `mybox mount` uses the
//! no-op implementations; the daemon plugs in its sync engine:
//!
//! - [`ChangeSink`]: told right after a change made through the mount is committed to the index,
//!   so the engine pushes it at once instead of waiting for a rescan.
//! - [`RemoteView`]: records known only from a peer's index, shown in the mount as placeholders
//!   (right kind, size, mode, mtime) before their content is here.
//! - [`ContentSource`]: fetches the blocks of a placeholder (or of a partially present file)
//!   into the store when a read needs them, ahead of background sync.
//! - [`Invalidator`]: how the vfs tells the kernel to drop cached attributes, entries and
//!   pages; the fuser adapter implements it over `fuser::Notifier`. The daemon never calls it
//!   directly: it calls [`super::Vfs::invalidate`] with a path.

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use crate::model::Record;
use crate::paths::RelPath;

use super::error::VfsResult;

/// Receives the paths whose new versions were just committed to the index.
pub trait ChangeSink: Send + Sync {
    fn changed(&self, paths: &[RelPath]);
}

/// A sink that ignores everything (standalone mount).
pub struct NoSink;

impl ChangeSink for NoSink {
    fn changed(&self, _paths: &[RelPath]) {}
}

/// The peer-side namespace: what exists remotely but is not (yet) in the local store.
pub trait RemoteView: Send + Sync {
    /// The winning record for `path` if it is live remotely and absent locally.
    fn placeholder(&self, path: &RelPath) -> Option<Record>;
    /// Placeholder records directly inside `dir`.
    fn placeholders_in(&self, dir: &RelPath) -> Vec<Record>;
}

/// No peer: nothing but the local store is shown.
pub struct NoRemote;

impl RemoteView for NoRemote {
    fn placeholder(&self, _path: &RelPath) -> Option<Record> {
        None
    }
    fn placeholders_in(&self, _dir: &RelPath) -> Vec<Record> {
        Vec::new()
    }
}

/// Fetches missing content into the store.
pub trait ContentSource: Send + Sync {
    /// Make bytes `[offset, offset + len)` of `record` readable from the store (fetching at
    /// least the blocks that cover them; fetching the whole file is allowed), waiting at most
    /// `timeout`. After `Ok`, the store file at `record.path` holds those bytes of that version.
    /// A peer that stays unreachable gives `EIO` (the caller logs it).
    fn fetch(&self, record: &Record, offset: u64, len: u64, timeout: Duration) -> VfsResult<()>;

    /// Start streaming `record` (a placeholder being opened for reading) into a temp file, or
    /// join the stream already under way, and return it at once: reads are then served from it
    /// block by block ([`Hydration::wait`]) while the rest arrives in the background, and the
    /// complete file is installed in the store. `None`: this source only fetches whole files,
    /// so the caller uses [`fetch`](Self::fetch) before opening.
    fn hydrate(&self, _record: &Record) -> Option<VfsResult<Arc<dyn Hydration>>> {
        None
    }
}

/// A placeholder's content arriving while it is read (see [`ContentSource::hydrate`]).
pub trait Hydration: Send + Sync {
    /// The temp file being filled; bytes reported present by [`wait`](Self::wait) are final
    /// (verified against their block hashes) and stay so, also after the file is installed.
    fn file(&self) -> Arc<File>;
    /// Wait until bytes `[offset, offset + len)` are in [`file`](Self::file), asking for their
    /// blocks ahead of the background stream; at most `timeout`. `EIO` when the fetch failed
    /// (peer gone, content changed there) or took too long.
    fn wait(&self, offset: u64, len: u64, timeout: Duration) -> VfsResult<()>;
}

/// No peer to fetch from: every fetch fails with EIO.
pub struct NoSource;

impl ContentSource for NoSource {
    fn fetch(&self, record: &Record, _offset: u64, _len: u64, _t: Duration) -> VfsResult<()> {
        Err(super::error::VfsError::new(
            libc::EIO,
            format!(
                "{}: content not here and no peer to fetch it from",
                record.path
            ),
        ))
    }
}

/// Kernel cache invalidation (implemented by the fuser adapter over its `Notifier`).
pub trait Invalidator: Send + Sync {
    /// Drop cached attributes and pages of `ino`.
    fn inode(&self, ino: u64);
    /// Drop the cached dentry `name` in directory `parent`.
    fn entry(&self, parent: u64, name: &str);
}
