//! The applier: the file system side of a plan. Every change is built aside and committed under
//! the path's exclusive lock and the index lock, after checking that the disk still holds exactly
//! what the plan was made from (so an edit the scanner has not seen yet is never overwritten: the
//! path is rescanned and planned again). Files are built in `.mybox/tmp/sync/` from local blocks
//! (verified) and fetched ones, fsynced, given their mode and mtime, then renamed into place; the
//! index record is written with the stat key of the result so the scanner sees no change.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::hashing::StatKey;
use crate::index::Stored;
use crate::locks::{LockManager, Mode};
use crate::model::{Kind, Record, BLOCK_SIZE};
use crate::paths::{open_beneath, resolve_no_follow, RelPath};
use crate::query::LocalBox;
use crate::sync::store::{BlockTable, SyncDb};

/// How long the applier waits for a local writer before trying the path again later.
const LOCK_WAIT: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}: changed locally since it was scanned; rescanning")]
    LocalChange(RelPath),
    #[error("{0}: busy (being written)")]
    Busy(RelPath),
    #[error("{0}: directory not empty")]
    NotEmpty(RelPath),
    #[error("{0}: no connection to the peer that has it")]
    Unavailable(RelPath),
    #[error("disk full: {0}")]
    NoSpace(String),
    /// A block from the peer did not match its hash.
    #[error("{0}")]
    Mismatch(String),
    #[error("{0}")]
    Other(String),
}

impl From<io::Error> for ApplyError {
    fn from(e: io::Error) -> Self {
        if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
            ApplyError::NoSpace(e.to_string())
        } else {
            ApplyError::Other(e.to_string())
        }
    }
}

impl From<anyhow::Error> for ApplyError {
    fn from(e: anyhow::Error) -> Self {
        for cause in e.chain() {
            if let Some(io) = cause.downcast_ref::<io::Error>() {
                if io.raw_os_error() == Some(libc::ENOSPC) {
                    return ApplyError::NoSpace(format!("{e:#}"));
                }
            }
        }
        ApplyError::Other(format!("{e:#}"))
    }
}

fn ctx_err(what: impl std::fmt::Display, e: io::Error) -> ApplyError {
    match ApplyError::from(e) {
        ApplyError::NoSpace(m) => ApplyError::NoSpace(format!("{what}: {m}")),
        ApplyError::Other(m) => ApplyError::Other(format!("{what}: {m}")),
        other => other,
    }
}

pub struct Applier {
    pub root: PathBuf,
    pub tmp: PathBuf,
    pub local: Arc<LocalBox>,
    pub locks: Arc<LockManager>,
    pub db: Arc<Mutex<SyncDb>>,
    /// Where each block of a local file lives (written behind, in order).
    pub blocks: Arc<BlockTable>,
    /// Where links into the store are announced to the watcher (its echo is dropped there).
    pub own_creates: Arc<crate::sync::watch::OwnCreates>,
    /// Copies of large files made while a peer hashes their new version.
    pub precopies: Precopies,
}

/// Previous versions at least this large are copied ahead when a peer says it is hashing a new
/// version ([`Applier::precopy`]).
pub const PRECOPY_MIN: u64 = 64 * 1024 * 1024;
/// A copy made ahead that no build claimed within this long is dropped with its temp file.
pub const PRECOPY_TTL: Duration = Duration::from_secs(60);
/// Copies made ahead at once.
const PRECOPY_MAX: usize = 2;

/// Copies of large local files made ahead, while the peer that changed them is still hashing
/// its new version: a byte changed in a 1 GiB file took the sender 0.6 s to hash and this box
/// 0.9-2.4 s to copy the previous version afterwards; copied meanwhile, the build starts
/// from the copy and only patches the changed blocks in.
#[derive(Default)]
pub struct Precopies {
    slots: Mutex<HashMap<RelPath, PrecopySlot>>,
    changed: Condvar,
}

/// Ends a reservation left running (see [`Applier::precopy_reserved`]) and wakes the builds
/// waiting for it.
struct Unreserve<'a>(&'a Precopies, &'a RelPath);

impl Drop for Unreserve<'_> {
    fn drop(&mut self) {
        {
            let mut slots = self.0.slots();
            if let Some(PrecopySlot::Running) = slots.get(self.1) {
                slots.remove(self.1);
            }
        }
        self.0.changed.notify_all();
    }
}

enum PrecopySlot {
    Running,
    Ready { copy: Precopy, made: Instant },
}

/// A temp file holding a whole local version of a file, and the stat key that version had
/// before and after it was copied.
struct Precopy {
    file: File,
    guard: TempGuard,
    source: StatKey,
    copied: u64,
}

impl Precopies {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<RelPath, PrecopySlot>> {
        // The slots stay consistent whatever a panicking holder was doing.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drop the copies nobody claimed in time (their temp files go with them).
    pub fn expire(&self) {
        self.expire_older_than(PRECOPY_TTL);
    }

    fn expire_older_than(&self, ttl: Duration) {
        self.slots().retain(|_, s| match s {
            PrecopySlot::Running => true,
            PrecopySlot::Ready { made, .. } => made.elapsed() < ttl,
        });
    }

    /// Is a copy being made (reading and writing the disk)?
    pub fn running(&self) -> bool {
        self.slots()
            .values()
            .any(|s| matches!(s, PrecopySlot::Running))
    }

    /// Copies made and not claimed yet.
    pub fn ready(&self) -> usize {
        self.slots()
            .values()
            .filter(|s| matches!(s, PrecopySlot::Ready { .. }))
            .count()
    }

    /// Claim the slot of `path` for a copy about to be made (none there yet, and fewer than
    /// [`PRECOPY_MAX`] being made); expired copies are dropped first.
    pub fn reserve(&self, path: &RelPath) -> bool {
        self.expire();
        let mut slots = self.slots();
        let running = slots
            .values()
            .filter(|s| matches!(s, PrecopySlot::Running))
            .count();
        if slots.contains_key(path) || running >= PRECOPY_MAX {
            return false;
        }
        slots.insert(path.clone(), PrecopySlot::Running);
        true
    }

    /// Take the copy of `path`, waiting for one that is still being made.
    fn claim(&self, path: &RelPath) -> Option<Precopy> {
        let mut slots = self.slots();
        while let Some(PrecopySlot::Running) = slots.get(path) {
            slots = self.changed.wait(slots).unwrap_or_else(|e| e.into_inner());
        }
        match slots.remove(path) {
            Some(PrecopySlot::Ready { copy, .. }) => Some(copy),
            _ => None,
        }
    }
}

/// A temp file that is removed unless it was renamed into place.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A file being built in the temp folder.
pub struct Building {
    pub rec: Record,
    pub file: File,
    guard: TempGuard,
    /// Block indices still to fetch from the peer.
    pub missing: Vec<u64>,
    /// An unnamed temp file (`O_TMPFILE` in the temp folder): linked to its path when finished,
    /// gone by itself if the daemon dies first.
    anonymous: bool,
    /// Bytes taken from local files instead of the network.
    pub reused: u64,
    /// The part of `reused` that a copy made ahead already held ([`Precopies`]).
    pub copied_ahead: u64,
    /// Size, mode and mtime set and content checked ([`Applier::seal`]) ahead of the finisher.
    sealed: bool,
    /// The temp file's inode, read when it is sealed (the watcher is told it before the link).
    ino: Option<u64>,
    /// One bit per block: written here after its SHA-256 was checked against the record. When
    /// every bit is set the file is exactly the record's blocks and sealing need not read it
    /// back; blocks cloned from the previous version (trusted from the index) leave theirs clear.
    checked: Vec<AtomicU64>,
    /// The large previous version this was copied from, kept open so that replacing it does
    /// not free its blocks inside the rename (ext4 frees 1 GiB in about 0.2 s); closed in the
    /// background once the new version is in place.
    previous: Option<File>,
    /// A second descriptor of the temp file with `O_DIRECT`, for a large file's whole blocks
    /// (see [`Building::write_directly`]).
    direct: Option<File>,
}

impl Building {
    pub fn block_len(&self, i: u64) -> u64 {
        BLOCK_SIZE.min(self.rec.size.saturating_sub(i * BLOCK_SIZE))
    }

    /// Start writing what is already here to disk without waiting, so the fsync before the
    /// rename has little left to do (for big files it otherwise dominated the finish).
    pub fn start_writeback(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is open for the call; offset 0 and length 0 mean the whole file.
        unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }

    /// Write this large file's whole blocks with direct I/O from now on (see [`copy_direct`] for
    /// why): for the sync, where nobody reads the file soon after. Files read as they arrive (a
    /// placeholder being read through the mount) keep the page cache. No effect on small files
    /// or where direct I/O is refused.
    pub fn write_directly(&mut self) {
        if self.rec.size >= DIRECT_MIN && self.direct.is_none() {
            self.direct = reopen_direct(&self.file);
        }
    }

    /// Write a fetched block after checking it is what the record says.
    pub fn write_block(&self, i: u64, data: &[u8]) -> Result<(), ApplyError> {
        self.write_hashed_block(i, data, Sha256::digest(data).into())
    }

    /// [`Self::write_block`] for a caller that has hashed `data` already (`digest` is its
    /// SHA-256; received blocks are hashed two at a time, see `hashing::pair`).
    pub fn write_hashed_block(
        &self,
        i: u64,
        data: &[u8],
        digest: [u8; 32],
    ) -> Result<(), ApplyError> {
        let want = self.rec.blocks.get(i as usize).ok_or_else(|| {
            ApplyError::Other(format!("{}: block {i} out of range", self.rec.path))
        })?;
        if data.len() as u64 != self.block_len(i) || digest != *want {
            return Err(ApplyError::Mismatch(format!(
                "{}: block {i} from the peer does not match its hash",
                self.rec.path
            )));
        }
        let at = i * BLOCK_SIZE;
        let direct = match &self.direct {
            Some(d) if data.len() % DIRECT_ALIGN == 0 => write_direct(d, data, at),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        };
        match direct {
            Ok(()) => {}
            // Not aligned, or refused: an ordinary write.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self
                .file
                .write_all_at(data, at)
                .map_err(|e| ctx_err(&self.rec.path, e))?,
            Err(e) => return Err(ctx_err(&self.rec.path, e)),
        }
        self.mark_checked(i);
        Ok(())
    }

    fn mark_checked(&self, i: u64) {
        if let Some(w) = self.checked.get((i / 64) as usize) {
            w.fetch_or(1 << (i % 64), Ordering::Relaxed);
        }
    }

    /// Was every block written here after a hash check?
    fn all_checked(&self) -> bool {
        let n = self.rec.blocks.len() as u64;
        self.checked.iter().enumerate().all(|(w, bits)| {
            let first = w as u64 * 64;
            let want = if n - first >= 64 {
                u64::MAX
            } else {
                (1u64 << (n - first)) - 1
            };
            bits.load(Ordering::Relaxed) & want == want
        })
    }
}

fn lstat(p: &Path) -> io::Result<Option<std::fs::Metadata>> {
    match std::fs::symlink_metadata(p) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn same_version(a: Option<&Record>, b: Option<&Record>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.version == b.version && a.deleted == b.deleted,
        _ => false,
    }
}

/// What finishing a batch did, per file in input order: the paths to scan, or why not.
pub type Finished = Vec<(RelPath, Result<Vec<RelPath>, ApplyError>)>;

/// One file of a batch being finished.
struct FinishItem {
    rec: Record,
    guard: TempGuard,
    /// The open unnamed temp file, to be linked into place.
    unnamed: Option<File>,
    /// Its inode, if known from sealing.
    ino: Option<u64>,
    expected: Option<Record>,
    to_scan: Vec<RelPath>,
    stat: Option<StatKey>,
    result: Result<(), ApplyError>,
}

/// A file of a batch being placed: its index in the batch, where it goes (or why it cannot),
/// and the index's record of that path.
struct Placing {
    i: usize,
    full: Result<PathBuf, ApplyError>,
    cur: Option<Stored>,
}

/// At most this many threads link a batch's new files into place.
const LINK_THREADS: usize = 4;
/// Fewer new files than this are linked by the finisher alone (threads cost more).
const LINK_PARALLEL_MIN: usize = 64;

/// A batch of sealed files whose data may not be durable yet ([`Applier::seal_files`]).
#[derive(Default)]
pub struct SealedBatch {
    items: Vec<FinishItem>,
    /// Any file of the batch: `syncfs` needs a descriptor on the file system.
    sync_fd: Option<File>,
}

impl SealedBatch {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// A sealed batch whose data a `syncfs` has made durable, ready to be put in place
/// ([`Applier::place_files`]); only that function makes one.
#[derive(Default)]
pub struct DurableBatch(SealedBatch);

impl DurableBatch {
    pub fn batch(&self) -> &SealedBatch {
        &self.0
    }
}

/// An `io::Error` like `e` (its OS error code kept, so a full disk is still reported as one).
fn same_io_error(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

/// Every file of a batch still going fails with `e`.
fn fail_all(items: &mut [FinishItem], e: &ApplyError) {
    for it in items.iter_mut().filter(|it| it.result.is_ok()) {
        it.result = Err(match e {
            ApplyError::NoSpace(m) => ApplyError::NoSpace(format!("{}: {m}", it.rec.path)),
            other => ApplyError::Other(format!("{}: {other}", it.rec.path)),
        });
    }
}

impl Applier {
    fn full(&self, path: &RelPath) -> Result<PathBuf, ApplyError> {
        resolve_no_follow(&self.root, path).map_err(|e| ApplyError::Other(e.to_string()))
    }

    /// [`full`](Self::full) for the many files of a batch: a parent already resolved (checked
    /// to have no link on the way) in this batch is not walked again.
    fn full_cached(
        &self,
        path: &RelPath,
        parents: &mut HashMap<RelPath, PathBuf>,
    ) -> Result<PathBuf, ApplyError> {
        let Some(parent) = path.parent() else {
            return self.full(path);
        };
        if let Some(p) = parents.get(&parent) {
            return Ok(p.join(path.file_name()));
        }
        let full = self.full(path)?;
        if let Some(p) = full.parent() {
            parents.insert(parent, p.to_path_buf());
        }
        Ok(full)
    }

    pub fn stored(&self, path: &RelPath) -> Result<Option<Stored>, ApplyError> {
        let ix = self
            .local
            .index
            .lock()
            .map_err(|_| ApplyError::Other("index lock poisoned".into()))?;
        Ok(ix.get(path)?)
    }

    /// Does the disk hold exactly what the index says about `path`?
    fn disk_matches(&self, path: &RelPath, st: Option<&Stored>) -> Result<bool, ApplyError> {
        let full = self.full(path)?;
        let md = lstat(&full).map_err(|e| ctx_err(path, e))?;
        Ok(self.md_matches(&full, md.as_ref(), st))
    }

    /// [`disk_matches`](Self::disk_matches) given what `lstat` said about the path.
    fn md_matches(&self, full: &Path, md: Option<&std::fs::Metadata>, st: Option<&Stored>) -> bool {
        let live = st.filter(|s| !s.record.deleted);
        match (live, md) {
            (None, None) => true,
            (None, Some(_)) | (Some(_), None) => false,
            (Some(s), Some(md)) => match s.record.kind {
                Kind::File => md.is_file() && s.stat == Some(StatKey::of(md)),
                Kind::Dir => md.is_dir(),
                Kind::Symlink => {
                    md.file_type().is_symlink()
                        && std::fs::read_link(full)
                            .ok()
                            .map(|t| t.to_string_lossy().into_owned())
                            == s.record.target
                }
            },
        }
    }

    /// Check, change the disk with `op`, store `rec`: all under the path's exclusive lock and the
    /// index lock, so neither a local writer nor the scanner can slip in between.
    fn commit(
        &self,
        rec: Record,
        expected: Option<&Record>,
        op: impl FnOnce(&Path, Option<&Stored>) -> Result<Option<StatKey>, ApplyError>,
    ) -> Result<(), ApplyError> {
        let path = rec.path.clone();
        let _g = self
            .locks
            .lock(&path, Mode::Exclusive, LOCK_WAIT)
            .ok_or_else(|| ApplyError::Busy(path.clone()))?;
        let mut ix = self
            .local
            .index
            .lock()
            .map_err(|_| ApplyError::Other("index lock poisoned".into()))?;
        let cur = ix.get(&path)?;
        if !same_version(cur.as_ref().map(|s| &s.record), expected)
            || !self.disk_matches(&path, cur.as_ref())?
        {
            return Err(ApplyError::LocalChange(path));
        }
        let full = self.full(&path)?;
        let stat = op(&full, cur.as_ref())?;
        let mut rec = rec;
        // One transaction for the sequence and the record (one WAL commit, not three).
        ix.transaction(|ix| {
            let mut seq = ix.seq_alloc()?;
            rec.sequence = seq.take();
            ix.put(&rec, stat)?;
            seq.commit(ix)
        })?;
        let blocks = if rec.kind == Kind::File && !rec.deleted {
            rec.blocks
        } else {
            Vec::new()
        };
        self.blocks.record(vec![(path, blocks)]);
        drop(ix);
        Ok(())
    }

    /// Create missing parent directories of `path`; returns the ones created (to be scanned).
    fn make_parents(&self, path: &RelPath) -> Result<Vec<RelPath>, ApplyError> {
        let mut created = Vec::new();
        let mut missing = Vec::new();
        let mut p = path.parent();
        while let Some(dir) = p {
            if dir.is_root() {
                break;
            }
            let full = self.full(&dir)?;
            match lstat(&full).map_err(|e| ctx_err(&dir, e))? {
                Some(md) if md.is_dir() => break,
                Some(_) => {
                    return Err(ApplyError::Other(format!(
                        "{path}: parent {dir} exists and is not a directory"
                    )))
                }
                None => missing.push(dir.clone()),
            }
            p = dir.parent();
        }
        for dir in missing.into_iter().rev() {
            let full = self.full(&dir)?;
            match std::fs::create_dir(&full) {
                Ok(()) => created.push(dir),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(ctx_err(&dir, e)),
            }
        }
        Ok(created)
    }

    /// Move the local version of a path aside to `loser` (never over an existing path).
    fn move_aside(&self, full: &Path, loser: &RelPath) -> Result<RelPath, ApplyError> {
        let mut target = loser.clone();
        for i in 1..100 {
            let lf = self.full(&target)?;
            if lstat(&lf).map_err(|e| ctx_err(&target, e))?.is_none() {
                std::fs::rename(full, &lf).map_err(|e| ctx_err(&target, e))?;
                return Ok(target);
            }
            let name = format!("{}~{i}", loser.file_name());
            target = loser
                .parent()
                .unwrap_or_else(RelPath::root)
                .join(&name)
                .map_err(|e| ApplyError::Other(e.to_string()))?;
        }
        Err(ApplyError::Other(format!("{loser}: no free conflict name")))
    }

    /// Remove whatever is at `full` so a different kind can take its place.
    fn clear(&self, path: &RelPath, full: &Path) -> Result<(), ApplyError> {
        match lstat(full).map_err(|e| ctx_err(path, e))? {
            None => Ok(()),
            Some(md) if md.is_dir() => match std::fs::remove_dir(full) {
                Ok(()) => Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                    Err(ApplyError::NotEmpty(path.clone()))
                }
                Err(e) => Err(ctx_err(path, e)),
            },
            Some(_) => std::fs::remove_file(full).map_err(|e| ctx_err(path, e)),
        }
    }

    /// Start building a file: a temp file holding every block available locally.
    pub fn prepare_file(&self, rec: &Record) -> Result<Building, ApplyError> {
        std::fs::create_dir_all(&self.tmp).map_err(|e| ctx_err("temp folder", e))?;
        self.prepare_in_tmp(rec, true, false)
    }

    /// [`prepare_file`](Self::prepare_file) for many files (the temp folder made once). With
    /// `previous` false for a file, its previous version is not looked for: the caller planned
    /// it from no live local file, and if one appeared since, the finish sees the change anyway.
    pub fn prepare_files(&self, recs: &[(&Record, bool)]) -> Vec<Result<Building, ApplyError>> {
        if let Err(e) = std::fs::create_dir_all(&self.tmp) {
            let e = ctx_err("temp folder", e);
            return recs
                .iter()
                .map(|(r, _)| Err(ApplyError::Other(format!("{}: {e}", r.path))))
                .collect();
        }
        // New files go through unnamed temp files: no entry made in (and no rename out of) the
        // temp folder, whose directory lock every file of a batch otherwise contended for.
        recs.iter()
            .map(|(r, previous)| self.prepare_in_tmp(r, *previous, !*previous))
            .collect()
    }

    /// A new named temp file in the temp folder, removed when its guard goes unless renamed.
    fn named_temp(&self) -> Result<(File, TempGuard), ApplyError> {
        let tmp_path = self
            .tmp
            .join(format!("{:016x}.part", rand::random::<u64>()));
        let guard = TempGuard(Some(tmp_path.clone()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp_path)
            .map_err(|e| ctx_err("creating temp file", e))?;
        Ok((f, guard))
    }

    /// A peer is hashing a new version of `path`: copy the local version (a large file, as
    /// indexed) into a temp file now, for the build of the new version to start from (see
    /// [`Precopies`]). Blocking; returns whether a copy was made.
    pub fn precopy(&self, path: &RelPath) -> bool {
        self.precopies.reserve(path) && self.precopy_reserved(path)
    }

    /// [`Applier::precopy`] for a path whose slot [`Precopies::reserve`] took: a build of
    /// `path` that starts meanwhile waits for this to finish.
    pub fn precopy_reserved(&self, path: &RelPath) -> bool {
        // Whatever way this ends (a panic included), the slot does not stay "running": a build
        // of the path would wait for it forever.
        let _release = Unreserve(&self.precopies, path);
        let copy = match self.stored(path) {
            Ok(Some(old)) => {
                let r = &old.record;
                let large = r.kind == Kind::File && !r.deleted && r.is_hashed();
                if large && r.size >= PRECOPY_MIN {
                    old.stat.and_then(|want| self.copy_ahead(path, want))
                } else {
                    None
                }
            }
            _ => None,
        };
        let Some(copy) = copy else {
            return false;
        };
        let made = Instant::now();
        self.precopies
            .slots()
            .insert(path.clone(), PrecopySlot::Ready { copy, made });
        true
    }

    /// The copy of [`Applier::precopy`]: the file on disk, if it has the stat key `want`
    /// before and after being copied whole.
    fn copy_ahead(&self, path: &RelPath, want: StatKey) -> Option<Precopy> {
        let mut src = open_beneath(&self.root, path).ok()?;
        let before = src.metadata().ok().map(|m| StatKey::of(&m))?;
        if before != want {
            return None;
        }
        let (mut file, guard) = self.named_temp().ok()?;
        let copied = match copy_previous(&mut src, &mut file) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("{path}: copying ahead: {e}");
                return None;
            }
        };
        let after = src.metadata().ok().map(|m| StatKey::of(&m))?;
        (after == before && copied == before.size).then_some(Precopy {
            file,
            guard,
            source: before,
            copied,
        })
    }

    fn prepare_in_tmp(
        &self,
        rec: &Record,
        previous: bool,
        anonymous: bool,
    ) -> Result<Building, ApplyError> {
        // A copy of the previous version made while the peer hashed this one becomes the temp
        // file (checked against the previous version's stat key below). Claimed whatever this
        // version's size: a copy left unclaimed would hold its disk space until it expires.
        let mut ahead = if previous {
            self.precopies.claim(&rec.path)
        } else {
            None
        };
        let anonymous = anonymous && ahead.is_none();
        let unnamed = if anonymous {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_TMPFILE)
                // Made with the file's own permissions where they include the owner's read and
                // write (most files), so sealing need not change them: unnamed, the file is
                // reachable only through this descriptor until it is linked, with these bits.
                .mode((rec.mode & 0o777) | 0o600)
                .open(&self.tmp)
                .ok()
        } else {
            None
        };
        let anonymous = unnamed.is_some();
        let mut copied_ahead = None;
        let mut used_ahead = false;
        let (mut file, guard) = match (unnamed, ahead.take()) {
            (Some(f), _) => (f, TempGuard(None)),
            (None, Some(pre)) => {
                copied_ahead = Some((pre.source, pre.copied));
                (pre.file, pre.guard)
            }
            // Not asked for, or the file system has no O_TMPFILE: a named temp file.
            (None, None) => self.named_temp()?,
        };
        let nblocks = rec.blocks.len() as u64;
        let mut have = vec![false; nblocks as usize];
        let mut reused = 0u64;
        let mut copied_ahead_bytes = 0u64;
        let mut previous_file = None;

        // The previous version of the same file: most blocks of an edited file are unchanged, so
        // copy it whole (see `copy_previous`) and patch the rest.
        let old = if previous {
            self.stored(&rec.path)?
        } else {
            None
        };
        let old = old
            .filter(|s| s.record.kind == Kind::File && !s.record.deleted && s.record.is_hashed());
        if let Some(old) = old {
            let same: usize = rec
                .blocks
                .iter()
                .zip(old.record.blocks.iter())
                .filter(|(a, b)| a == b)
                .count();
            if same > 0 && same * 2 >= rec.blocks.len() {
                if let Ok(mut src) = open_beneath(&self.root, &rec.path) {
                    let before = src.metadata().map(|m| StatKey::of(&m)).ok();
                    if before.is_some() && before == old.stat {
                        let copied = match copied_ahead.take() {
                            Some((source, copied)) if Some(source) == before => {
                                used_ahead = true;
                                copied
                            }
                            stale => {
                                if stale.is_some() {
                                    file.set_len(0).map_err(|e| ctx_err(&rec.path, e))?;
                                }
                                copy_previous(&mut src, &mut file)
                                    .map_err(|e| ctx_err("copying the previous version", e))?
                            }
                        };
                        let after = src.metadata().map(|m| StatKey::of(&m)).ok();
                        if copied >= KEEP_PREVIOUS_OPEN {
                            previous_file = Some(src);
                        }
                        if after == before && copied == old.record.size {
                            for (i, (a, b)) in
                                rec.blocks.iter().zip(old.record.blocks.iter()).enumerate()
                            {
                                if a == b {
                                    have[i] = true;
                                    reused += BLOCK_SIZE.min(rec.size - i as u64 * BLOCK_SIZE);
                                }
                            }
                            if used_ahead {
                                copied_ahead_bytes = reused;
                            }
                        }
                    }
                }
            }
        }

        // A copy made ahead but not used (the previous version changed meanwhile, or is not
        // worth starting from) holds stale bytes: the build starts from an empty file.
        if copied_ahead.is_some() {
            file.set_len(0).map_err(|e| ctx_err(&rec.path, e))?;
        }

        // Any other local file holding a block with the same hash (renames, copies, moves).
        // The buffer is made on the first candidate: most new files have none, and 128 KiB
        // zeroed for each of 10,000 small files showed in the receiver's profile.
        let mut buf: Vec<u8> = Vec::new();
        let mut missing = Vec::new();
        let checked: Vec<AtomicU64> = (0..nblocks.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        for i in 0..nblocks {
            if have[i as usize] {
                continue;
            }
            let want = rec.blocks[i as usize];
            let len = BLOCK_SIZE.min(rec.size - i * BLOCK_SIZE) as usize;
            let candidates = self.blocks.find(&want).unwrap_or_default();
            let mut found = false;
            for (p, idx) in candidates {
                let Ok(src) = open_beneath(&self.root, &p) else {
                    continue;
                };
                if buf.len() < len {
                    buf.resize(BLOCK_SIZE as usize, 0);
                }
                let chunk = &mut buf[..len];
                if src.read_exact_at(chunk, idx * BLOCK_SIZE).is_err() {
                    continue;
                }
                if <[u8; 32]>::from(Sha256::digest(&*chunk)) != want {
                    continue;
                }
                file.write_all_at(chunk, i * BLOCK_SIZE)
                    .map_err(|e| ctx_err(&rec.path, e))?;
                checked[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::Relaxed);
                reused += len as u64;
                found = true;
                break;
            }
            if !found {
                missing.push(i);
            }
        }
        Ok(Building {
            rec: rec.clone(),
            file,
            guard,
            missing,
            anonymous,
            reused,
            copied_ahead: copied_ahead_bytes,
            sealed: false,
            ino: None,
            checked,
            previous: previous_file,
            direct: None,
        })
    }

    /// Give a built file its final size, mode and mtime and check it against the record (the
    /// whole content when small; large files were verified block by block as they arrived).
    pub fn seal(&self, b: &mut Building) -> Result<(), ApplyError> {
        if b.sealed {
            return Ok(());
        }
        // A file whose every block was checked against the record's block hashes as it was
        // written holds exactly those blocks, at the record's size: reading it back to hash it
        // whole adds nothing (the record's file hash is the peer's, computed in the same pass as
        // its block hashes). A file that cloned blocks of its previous version trusts the index
        // for them, so it is read back.
        let checked = b.all_checked();
        let rec = &b.rec;
        let path = &rec.path;
        let file = &mut b.file;
        if !checked {
            file.set_len(rec.size).map_err(|e| ctx_err(path, e))?;
        }
        // One fstat tells whether the mode is already right (an unnamed temp file made with it,
        // the umask permitting; writes clear set-id bits) and gives the inode for the link.
        let md = file.metadata().map_err(|e| ctx_err(path, e))?;
        if md.mode() & 0o7777 != rec.mode & 0o7777 {
            file.set_permissions(std::fs::Permissions::from_mode(rec.mode & 0o7777))
                .map_err(|e| ctx_err(path, e))?;
        }
        b.ino = Some(md.ino());
        let mtime = filetime::FileTime::from_unix_time(
            rec.mtime_ns.div_euclid(1_000_000_000),
            rec.mtime_ns.rem_euclid(1_000_000_000) as u32,
        );
        filetime::set_file_handle_times(file, None, Some(mtime)).map_err(|e| ctx_err(path, e))?;
        if rec.size <= 4 * 1024 * 1024 && !checked {
            file.seek(SeekFrom::Start(0))
                .map_err(|e| ctx_err(path, e))?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = file.read(&mut buf).map_err(|e| ctx_err(path, e))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            if Some(<[u8; 32]>::from(h.finalize())) != rec.sha256 {
                return Err(ApplyError::Other(format!(
                    "{path}: assembled file does not match its hash"
                )));
            }
        }
        b.sealed = true;
        Ok(())
    }

    /// Rename a sealed temp file to its path (moving the local version to `loser` first when this
    /// resolves a conflict; a directory in the way is removed if empty). Returns the stat key of
    /// the result; the caller holds the path lock and the index lock and has checked the disk.
    fn place(
        &self,
        guard: &mut TempGuard,
        unnamed: Option<&File>,
        path: &RelPath,
        full: &Path,
        loser: Option<&RelPath>,
        to_scan: &mut Vec<RelPath>,
    ) -> Result<Option<StatKey>, ApplyError> {
        if let Some(l) = loser {
            if lstat(full).map_err(|e| ctx_err(path, e))?.is_some() {
                to_scan.push(self.move_aside(full, l)?);
            }
        } else if lstat(full)
            .map_err(|e| ctx_err(path, e))?
            .is_some_and(|m| m.is_dir())
        {
            self.clear(path, full)?;
        }
        self.put_in_place(guard, unnamed, path, full)?;
        let md = std::fs::symlink_metadata(full).map_err(|e| ctx_err(path, e))?;
        Ok(Some(StatKey::of(&md)))
    }

    /// The temp file becomes `full` in one step: renamed when named; linked when unnamed, or,
    /// when something is at `full` already, linked under a temp name first and renamed over it.
    fn put_in_place(
        &self,
        guard: &mut TempGuard,
        unnamed: Option<&File>,
        path: &RelPath,
        full: &Path,
    ) -> Result<(), ApplyError> {
        if let Some(tmp_path) = guard.0.clone() {
            std::fs::rename(&tmp_path, full).map_err(|e| ctx_err(path, e))?;
            guard.0 = None;
            return Ok(());
        }
        let f = unnamed.ok_or_else(|| ApplyError::Other(format!("{path}: temp file vanished")))?;
        match self.link_announced(f, None, path, full) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let t = self
                    .tmp
                    .join(format!("{:016x}.part", rand::random::<u64>()));
                link_unnamed(f, &t).map_err(|e| ctx_err(path, e))?;
                guard.0 = Some(t.clone());
                std::fs::rename(&t, full).map_err(|e| ctx_err(path, e))?;
                guard.0 = None;
                Ok(())
            }
            Err(e) => Err(ctx_err(path, e)),
        }
    }

    /// Link the unnamed temp file `f` at `full`, where nothing may be: something there already
    /// is a local change.
    fn link_new(
        &self,
        f: &File,
        ino: Option<u64>,
        path: &RelPath,
        full: &Path,
    ) -> Result<(), ApplyError> {
        self.link_announced(f, ino, path, full)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => ApplyError::LocalChange(path.clone()),
                _ => ctx_err(path, e),
            })
    }

    /// Link `f` at `full`, announced to the watcher first (which then drops the link's event).
    fn link_announced(
        &self,
        f: &File,
        ino: Option<u64>,
        path: &RelPath,
        full: &Path,
    ) -> io::Result<()> {
        if let Some(ino) = ino.or_else(|| f.metadata().ok().map(|md| md.ino())) {
            self.own_creates.expect(path, ino);
        }
        let linked = link_unnamed(f, full);
        if linked.is_err() {
            self.own_creates.forget(path);
        }
        linked
    }

    /// Finish a built file and put it in place (moving the local version to `loser` first when
    /// this resolves a conflict). Returns paths to scan (created parents, the conflict copy).
    pub fn finish_file(
        &self,
        mut b: Building,
        expected: Option<&Record>,
        loser: Option<&RelPath>,
    ) -> Result<Vec<RelPath>, ApplyError> {
        self.seal(&mut b)?;
        b.file.sync_all().map_err(|e| ctx_err(&b.rec.path, e))?;
        let Building {
            rec,
            file,
            mut guard,
            previous,
            anonymous,
            ..
        } = b;
        let unnamed = anonymous.then_some(file);
        let path = rec.path.clone();
        let mut to_scan = self.make_parents(&path)?;
        let mut placed = Vec::new();
        let done = self.commit(rec, expected, |full, _cur| {
            let stat = self.place(
                &mut guard,
                unnamed.as_ref(),
                &path,
                full,
                loser,
                &mut placed,
            )?;
            if let Some(parent) = full.parent() {
                // The rename is durable only once its directory is (and before the index says so).
                sync_dir(parent).map_err(|e| ctx_err(&path, e))?;
            }
            Ok(stat)
        });
        if let Some(f) = previous {
            // The last close of a replaced large file frees its blocks: not on this path.
            let _ = std::thread::Builder::new()
                .name("close-previous".into())
                .spawn(move || drop(f));
        }
        done?;
        to_scan.extend(placed);
        Ok(to_scan)
    }

    /// Finish many built files at once, each as [`finish_file`](Self::finish_file) would (no
    /// conflicts here): [`seal_files`](Self::seal_files), then two rounds of
    /// [`place_files`](Self::place_files) (the first makes the data durable, the second puts
    /// the files in place). Results come back in input order.
    pub fn finish_files(&self, batch: Vec<(Building, Option<Record>)>) -> Finished {
        let (_, durable) = self.place_files(DurableBatch::default(), self.seal_files(batch));
        self.place_files(durable, SealedBatch::default()).0
    }

    /// First step of finishing a batch: seal every file (size, mode, mtime, checked against its
    /// hash) and make sure its parent directories exist. Their data is not durable yet: the next
    /// [`place_files`](Self::place_files) makes it so. Needs no lock.
    pub fn seal_files(&self, batch: Vec<(Building, Option<Record>)>) -> SealedBatch {
        let mut sync_fd: Option<File> = None;
        let mut items: Vec<FinishItem> = batch
            .into_iter()
            .map(|(mut b, expected)| {
                let result = self.seal(&mut b);
                if result.is_ok() && sync_fd.is_none() {
                    sync_fd = b.file.try_clone().ok();
                }
                FinishItem {
                    rec: b.rec,
                    guard: b.guard,
                    unnamed: b.anonymous.then_some(b.file),
                    ino: b.ino,
                    expected,
                    to_scan: Vec::new(),
                    stat: None,
                    result,
                }
            })
            .collect();
        // Many files of a batch share their parents: each directory is checked (or made) once.
        let mut dirs_ok: std::collections::HashSet<RelPath> = std::collections::HashSet::new();
        for it in items.iter_mut().filter(|it| it.result.is_ok()) {
            let parent = it.rec.path.parent();
            if parent
                .as_ref()
                .is_some_and(|p| p.is_root() || dirs_ok.contains(p))
            {
                continue;
            }
            match self.make_parents(&it.rec.path) {
                Ok(created) => {
                    it.to_scan = created;
                    if let Some(p) = parent {
                        dirs_ok.insert(p);
                    }
                }
                Err(e) => it.result = Err(e),
            }
        }
        SealedBatch { items, sync_fd }
    }

    /// Put one sealed file at `full`, where the index said `cur`; returns the placed file's
    /// stat key.
    fn put_one_in_place(
        &self,
        it: &mut FinishItem,
        full: &Path,
        cur: Option<&Stored>,
    ) -> Result<Option<StatKey>, ApplyError> {
        let path = &it.rec.path;
        match (cur.filter(|s| !s.record.deleted), it.unnamed.as_ref()) {
            // Nothing may be at the path (anything there is a local creation not scanned yet):
            // the link checks that itself, atomically.
            (None, Some(f)) => self.link_new(f, it.ino, path, full)?,
            _ => {
                let md = lstat(full).map_err(|e| ctx_err(path, e))?;
                if !self.md_matches(full, md.as_ref(), cur) {
                    return Err(ApplyError::LocalChange(path.clone()));
                }
                if md.is_some_and(|m| m.is_dir()) {
                    self.clear(path, full)?;
                }
                self.put_in_place(&mut it.guard, it.unnamed.as_ref(), path, full)?;
            }
        }
        // The linked inode's own metadata is the placed file's (the link changed its ctime, so
        // it is read after): no path walk.
        let md = match it.unnamed.take() {
            Some(f) => f.metadata(),
            None => std::fs::symlink_metadata(full),
        }
        .map_err(|e| ctx_err(path, e))?;
        Ok(Some(StatKey::of(&md)))
    }

    /// [`put_one_in_place`](Self::put_one_in_place) for each of `todo` (indices into `items`),
    /// results in the order of `todo`. Files replacing something go first, one by one; new
    /// files are linked by a few threads, each taking whole directories (links into one
    /// directory wait for each other in the kernel). Linking is the larger part of the
    /// finisher's work, and the finisher is what a pull of many small files waits for.
    fn put_all_in_place(
        &self,
        items: &mut [FinishItem],
        todo: Vec<Placing>,
    ) -> Vec<(usize, Result<Option<StatKey>, ApplyError>)> {
        let mut out = Vec::with_capacity(todo.len());
        let mut by_dir: HashMap<PathBuf, Vec<(usize, &mut FinishItem, PathBuf)>> = HashMap::new();
        let mut slots: Vec<Option<&mut FinishItem>> = items.iter_mut().map(Some).collect();
        for Placing { i, full, cur } in todo {
            let Some(it) = slots.get_mut(i).and_then(Option::take) else {
                continue;
            };
            let full = match full {
                Ok(f) => f,
                Err(e) => {
                    out.push((i, Err(e)));
                    continue;
                }
            };
            let new_link = it.unnamed.is_some() && cur.as_ref().is_none_or(|s| s.record.deleted);
            if new_link {
                let dir = full.parent().map(Path::to_path_buf).unwrap_or_default();
                by_dir.entry(dir).or_default().push((i, it, full));
            } else {
                out.push((i, self.put_one_in_place(it, &full, cur.as_ref())));
            }
        }
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(LINK_THREADS)
            .min(by_dir.len());
        let total: usize = by_dir.values().map(Vec::len).sum();
        let link = |jobs: Vec<(usize, &mut FinishItem, PathBuf)>| {
            jobs.into_iter()
                .map(|(i, it, full)| (i, self.put_one_in_place(it, &full, None)))
                .collect::<Vec<_>>()
        };
        if workers < 2 || total < LINK_PARALLEL_MIN {
            for jobs in by_dir.into_values() {
                out.extend(link(jobs));
            }
        } else {
            // Largest directories first, each to the least loaded worker.
            let mut dirs: Vec<_> = by_dir.into_values().collect();
            dirs.sort_by_key(|d| std::cmp::Reverse(d.len()));
            let mut shares: Vec<Vec<(usize, &mut FinishItem, PathBuf)>> =
                (0..workers).map(|_| Vec::new()).collect();
            for d in dirs {
                if let Some(least) = shares.iter_mut().min_by_key(|s| s.len()) {
                    least.extend(d);
                }
            }
            std::thread::scope(|sc| {
                let mut shares = shares.into_iter();
                let mine = shares.next().unwrap_or_default();
                let handles: Vec<_> = shares.map(|share| sc.spawn(|| link(share))).collect();
                out.extend(link(mine));
                for h in handles {
                    match h.join() {
                        Ok(r) => out.extend(r),
                        Err(p) => std::panic::resume_unwind(p),
                    }
                }
            });
        }
        out.sort_by_key(|(i, _)| *i);
        out
    }

    /// Put a batch whose data is durable in place and make the next batch's data durable, with
    /// one `syncfs` for both: under the index lock every path of `durable` is checked and
    /// linked or renamed, one `syncfs` makes those links durable and the data of `sealed` too,
    /// then one transaction records `durable`. Per file that replaces two fsyncs and four
    /// SQLite commits; per batch, the flush that made its data durable is the one that made the
    /// previous batch's names durable. Returns the results of `durable` and `sealed`, now
    /// durable (its failures are kept for the next call to report).
    pub fn place_files(
        &self,
        durable: DurableBatch,
        sealed: SealedBatch,
    ) -> (Finished, DurableBatch) {
        let SealedBatch {
            items: mut next,
            sync_fd: next_fd,
        } = sealed;
        let next_waits = next.iter().any(|it| it.result.is_ok());
        let SealedBatch { mut items, sync_fd } = durable.0;
        let sync_fd = sync_fd.or(next_fd);
        if items.is_empty() {
            // Nothing to put in place: only the next batch's data to flush, without the lock.
            if next_waits {
                if let Some(f) = &sync_fd {
                    if let Err(e) = syncfs(f) {
                        fail_all(&mut next, &ApplyError::from(e));
                    }
                }
            }
            return (
                Vec::new(),
                DurableBatch(SealedBatch {
                    items: next,
                    sync_fd,
                }),
            );
        }
        // Path locks before the index lock, as everywhere; a path being written is retried later.
        let mut guards = Vec::new();
        for it in items.iter_mut().filter(|it| it.result.is_ok()) {
            match self.locks.try_lock(&it.rec.path, Mode::Exclusive) {
                Some(g) => guards.push(g),
                None => it.result = Err(ApplyError::Busy(it.rec.path.clone())),
            }
        }
        let mut flushed = false;
        let committed = match self.local.index.lock() {
            Err(_) => Err(anyhow::anyhow!("index lock poisoned")),
            Ok(mut ix) => {
                let done = ix.transaction(|ix| {
                    let mut seq = ix.seq_alloc()?;
                    let mut renamed = false;
                    // Each parent is checked for links once per batch, not once per file.
                    let mut parents: HashMap<RelPath, PathBuf> = HashMap::new();
                    // The index is read in order, then the files go in place (links into
                    // different directories at once), then they are recorded in order: disk
                    // and index change only under the lock, as one file at a time did.
                    let mut todo: Vec<Placing> = Vec::new();
                    for (i, it) in items.iter().enumerate() {
                        if it.result.is_err() {
                            continue;
                        }
                        let path = &it.rec.path;
                        let cur = ix.get(path)?;
                        let full = if same_version(
                            cur.as_ref().map(|s| &s.record),
                            it.expected.as_ref(),
                        ) {
                            // What `disk_matches` and `place` do, resolving the path and
                            // looking at it once instead of three times.
                            self.full_cached(path, &mut parents)
                        } else {
                            Err(ApplyError::LocalChange(path.clone()))
                        };
                        todo.push(Placing { i, full, cur });
                    }
                    for (i, step) in self.put_all_in_place(&mut items, todo) {
                        let it = &mut items[i];
                        match step {
                            Ok(stat) => {
                                renamed = true;
                                it.stat = stat;
                                it.rec.sequence = seq.take();
                                ix.put(&it.rec, it.stat)?;
                            }
                            Err(e) => it.result = Err(e),
                        }
                    }
                    if renamed || next_waits {
                        if let Some(f) = &sync_fd {
                            flushed = true;
                            if let Err(e) = syncfs(f) {
                                // Neither the names nor the next batch's data are known durable.
                                fail_all(&mut next, &ApplyError::from(same_io_error(&e)));
                                return Err(e.into());
                            }
                        }
                    }
                    seq.commit(ix)
                });
                if done.is_ok() {
                    // Queued before the index lock goes: in order with the scanner's.
                    self.blocks.record(
                        items
                            .iter()
                            .filter(|it| it.result.is_ok())
                            .map(|it| (it.rec.path.clone(), it.rec.blocks.clone()))
                            .collect(),
                    );
                }
                done
            }
        };
        drop(guards);
        if next_waits && !flushed {
            // The transaction failed before its flush: the next batch's data still needs one.
            match &sync_fd {
                Some(f) => {
                    if let Err(e) = syncfs(f) {
                        fail_all(&mut next, &ApplyError::from(e));
                    }
                }
                None => fail_all(&mut next, &ApplyError::Other("no file to flush".into())),
            }
        }
        if let Err(e) = committed {
            // The renames happened but are not recorded: the scanner finds those files and,
            // their content being the peer's, they converge without a conflict.
            fail_all(&mut items, &ApplyError::from(e));
        }
        let finished = items
            .into_iter()
            .map(|it| (it.rec.path, it.result.map(|()| it.to_scan)))
            .collect();
        (
            finished,
            DurableBatch(SealedBatch {
                items: next,
                sync_fd,
            }),
        )
    }

    /// The local file already has the record's content: only mode and mtime change.
    pub fn set_meta(&self, rec: Record, expected: Option<&Record>) -> Result<(), ApplyError> {
        let path = rec.path.clone();
        let (mode, mtime_ns, kind) = (rec.mode, rec.mtime_ns, rec.kind);
        self.commit(rec, expected, |full, cur| {
            if kind != Kind::Symlink {
                std::fs::set_permissions(full, std::fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(|e| ctx_err(&path, e))?;
            }
            if kind == Kind::File {
                let t = filetime::FileTime::from_unix_time(
                    mtime_ns.div_euclid(1_000_000_000),
                    mtime_ns.rem_euclid(1_000_000_000) as u32,
                );
                filetime::set_file_mtime(full, t).map_err(|e| ctx_err(&path, e))?;
            }
            let md = std::fs::symlink_metadata(full).map_err(|e| ctx_err(&path, e))?;
            let _ = cur;
            Ok(Some(StatKey::of(&md)))
        })
    }

    /// Make a directory or symlink (moving the local version aside first on a conflict).
    pub fn install_other(
        &self,
        rec: Record,
        expected: Option<&Record>,
        loser: Option<&RelPath>,
    ) -> Result<Vec<RelPath>, ApplyError> {
        let path = rec.path.clone();
        let mut to_scan = self.make_parents(&path)?;
        let kind = rec.kind;
        let mode = rec.mode;
        let target = rec.target.clone().unwrap_or_default();
        let mtime_ns = rec.mtime_ns;
        let tmp = self.tmp.clone();
        self.commit(rec, expected, |full, _cur| {
            let existing = lstat(full).map_err(|e| ctx_err(&path, e))?;
            if let (Some(l), Some(_)) = (loser, &existing) {
                to_scan.push(self.move_aside(full, l)?);
            }
            match kind {
                Kind::Dir => {
                    if let Some(md) = lstat(full).map_err(|e| ctx_err(&path, e))? {
                        if !md.is_dir() {
                            self.clear(&path, full)?;
                        }
                    }
                    match std::fs::create_dir(full) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(ctx_err(&path, e)),
                    }
                    std::fs::set_permissions(full, std::fs::Permissions::from_mode(mode & 0o7777))
                        .map_err(|e| ctx_err(&path, e))?;
                }
                Kind::Symlink => {
                    if lstat(full)
                        .map_err(|e| ctx_err(&path, e))?
                        .is_some_and(|m| m.is_dir())
                    {
                        self.clear(&path, full)?;
                    }
                    std::fs::create_dir_all(&tmp).map_err(|e| ctx_err("temp folder", e))?;
                    let t = tmp.join(format!("{:016x}.link", rand::random::<u64>()));
                    let guard = TempGuard(Some(t.clone()));
                    std::os::unix::fs::symlink(&target, &t).map_err(|e| ctx_err(&path, e))?;
                    let ft = filetime::FileTime::from_unix_time(
                        mtime_ns.div_euclid(1_000_000_000),
                        mtime_ns.rem_euclid(1_000_000_000) as u32,
                    );
                    filetime::set_symlink_file_times(&t, ft, ft).map_err(|e| ctx_err(&path, e))?;
                    std::fs::rename(&t, full).map_err(|e| ctx_err(&path, e))?;
                    let mut guard = guard;
                    guard.0 = None;
                }
                Kind::File => return Err(ApplyError::Other("files go through finish_file".into())),
            }
            let md = std::fs::symlink_metadata(full).map_err(|e| ctx_err(&path, e))?;
            Ok(Some(StatKey::of(&md)))
        })?;
        Ok(to_scan)
    }

    /// Make many new directories at once (parents first, as planned), each as
    /// [`install_other`](Self::install_other) would with no conflict, but under one index lock and
    /// one transaction: a tree of a few hundred directories cost a transaction pair each, which
    /// showed as a stall between the planning and the fetching of an initial sync. Results come
    /// back in input order.
    pub fn install_dirs(
        &self,
        dirs: Vec<(Record, Option<Record>)>,
    ) -> Vec<(RelPath, Result<Vec<RelPath>, ApplyError>)> {
        let mut out: Vec<(RelPath, Result<Vec<RelPath>, ApplyError>)> = Vec::new();
        let mut todo = Vec::new();
        for (rec, expected) in dirs {
            if rec.kind != Kind::Dir {
                let p = rec.path.clone();
                out.push((
                    p.clone(),
                    Err(ApplyError::Other(format!("{p}: not a directory"))),
                ));
                continue;
            }
            match self.locks.try_lock(&rec.path, Mode::Exclusive) {
                Some(g) => {
                    out.push((rec.path.clone(), Ok(Vec::new())));
                    todo.push((out.len() - 1, rec, expected, g));
                }
                None => out.push((rec.path.clone(), Err(ApplyError::Busy(rec.path.clone())))),
            }
        }
        if todo.is_empty() {
            return out;
        }
        let mut recorded: Vec<usize> = Vec::new();
        let committed = match self.local.index.lock() {
            Err(_) => Err(anyhow::anyhow!("index lock poisoned")),
            Ok(mut ix) => ix.transaction(|ix| {
                let mut seq = ix.seq_alloc()?;
                for (slot, rec, expected, _guard) in todo.iter() {
                    let path = &rec.path;
                    let cur = ix.get(path)?;
                    let step = (|| {
                        if !same_version(cur.as_ref().map(|s| &s.record), expected.as_ref()) {
                            return Err(ApplyError::LocalChange(path.clone()));
                        }
                        let created = self.make_parents(path)?;
                        let full = self.full(path)?;
                        let md = lstat(&full).map_err(|e| ctx_err(path, e))?;
                        if !self.md_matches(&full, md.as_ref(), cur.as_ref()) {
                            return Err(ApplyError::LocalChange(path.clone()));
                        }
                        if md.as_ref().is_some_and(|m| !m.is_dir()) {
                            self.clear(path, &full)?;
                        }
                        match std::fs::create_dir(&full) {
                            Ok(()) => {}
                            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                            Err(e) => return Err(ctx_err(path, e)),
                        }
                        std::fs::set_permissions(
                            &full,
                            std::fs::Permissions::from_mode(rec.mode & 0o7777),
                        )
                        .map_err(|e| ctx_err(path, e))?;
                        let md = std::fs::symlink_metadata(&full).map_err(|e| ctx_err(path, e))?;
                        Ok((created, StatKey::of(&md)))
                    })();
                    match step {
                        Ok((created, stat)) => {
                            let mut rec = rec.clone();
                            rec.sequence = seq.take();
                            ix.put(&rec, Some(stat))?;
                            out[*slot].1 = Ok(created);
                            recorded.push(*slot);
                        }
                        Err(e) => out[*slot].1 = Err(e),
                    }
                }
                seq.commit(ix)
            }),
        };
        drop(todo);
        if let Err(e) = committed {
            // Directories made but not recorded: the scanner finds them, and an empty directory
            // of the same name converges without a conflict.
            let e = ApplyError::from(e);
            for slot in recorded.drain(..) {
                let p = out[slot].0.clone();
                out[slot].1 = Err(ApplyError::Other(format!("{p}: {e}")));
            }
        }
        if !recorded.is_empty() {
            // A directory replacing a file: that file's blocks are no longer here.
            self.blocks.record(
                recorded
                    .iter()
                    .map(|&s| (out[s].0.clone(), Vec::new()))
                    .collect(),
            );
        }
        out
    }

    /// Remove the local path (it must be what the index says) and store the tombstone.
    pub fn delete(&self, rec: Record, expected: Option<&Record>) -> Result<(), ApplyError> {
        let path = rec.path.clone();
        self.commit(rec, expected, |full, _| {
            self.clear(&path, full)?;
            Ok(None)
        })
    }

    /// Store a record whose state the disk already has.
    pub fn record_only(&self, rec: Record, expected: Option<&Record>) -> Result<(), ApplyError> {
        self.commit(rec, expected, |_, cur| Ok(cur.and_then(|s| s.stat)))
    }
}

/// Remove leftovers of an interrupted run from the temp folder.
pub fn clear_tmp(tmp: &Path) {
    if let Ok(rd) = std::fs::read_dir(tmp) {
        for e in rd.flatten() {
            let p = e.path();
            let r = if p.is_dir() && !p.is_symlink() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            if let Err(err) = r {
                tracing::warn!("cannot remove leftover {}: {err}", p.display());
            }
        }
    }
}

/// Read one block of a local file for a peer, refusing if it does not hash to `want`.
pub fn read_block(f: &File, i: u64, size: u64, want: &[u8; 32]) -> io::Result<Option<Vec<u8>>> {
    // `i` may come from a peer: an index whose offset overflows is refused, not wrapped.
    let start = i.checked_mul(BLOCK_SIZE).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("block {i} is out of range"),
        )
    })?;
    let len = BLOCK_SIZE.min(size.saturating_sub(start)) as usize;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, start)?;
    if <[u8; 32]>::from(Sha256::digest(&buf)) != *want {
        return Ok(None);
    }
    Ok(Some(buf))
}

/// Flush every dirty page and inode of the file system holding `f` (one call for a whole batch).
/// Give an unnamed (`O_TMPFILE`) file the name `to`; fails with `AlreadyExists` if taken.
fn link_unnamed(f: &File, to: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let to_c = CString::new(to.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    // AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; without it, the /proc link of the descriptor
    // followed does the same. Once it is seen refused (ENOENT where the /proc link works), it is
    // not tried again: a daemon not run as root would otherwise make two calls per file.
    static EMPTY_PATH_REFUSED: AtomicBool = AtomicBool::new(false);
    let mut refused_now = false;
    // SAFETY: valid descriptor and NUL-terminated strings for the duration of the calls.
    unsafe {
        if !EMPTY_PATH_REFUSED.load(Ordering::Relaxed) {
            if libc::linkat(
                f.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_FDCWD,
                to_c.as_ptr(),
                libc::AT_EMPTY_PATH,
            ) == 0
            {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(e);
            }
            refused_now = true;
        }
        let proc_c = CString::new(format!("/proc/self/fd/{}", f.as_raw_fd()))
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        if libc::linkat(
            libc::AT_FDCWD,
            proc_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        ) == 0
        {
            // (An ENOENT for a missing parent fails here too, and proves nothing.)
            if refused_now {
                EMPTY_PATH_REFUSED.store(true, Ordering::Relaxed);
            }
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

fn syncfs(f: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: syncfs only reads the descriptor, which `f` keeps open for the call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Previous versions at least this large stay open until their replacement is in place.
const KEEP_PREVIOUS_OPEN: u64 = 64 * 1024 * 1024;

/// Files at least this large are written with direct I/O: their previous version copied in,
/// and blocks received whole.
const DIRECT_MIN: u64 = 32 * 1024 * 1024;

/// Copy the previous version `src` into the new file `dst`, returning the bytes copied. A large
/// one goes straight to the disk ([`copy_direct`]); otherwise, or where direct I/O is refused,
/// [`copy_with_writeback`].
fn copy_previous(src: &mut File, dst: &mut File) -> io::Result<u64> {
    let size = src.metadata()?.len();
    let done = if size >= DIRECT_MIN {
        copy_direct(src, dst, size)?
    } else {
        0
    };
    if done == size && size > 0 {
        return Ok(done);
    }
    src.seek(SeekFrom::Start(done))?;
    dst.seek(SeekFrom::Start(done))?;
    Ok(done + copy_with_writeback(src, dst)?)
}

/// Direct I/O's alignment of offsets, lengths and memory (the usual logical block size or a
/// multiple of it).
const DIRECT_ALIGN: usize = 4096;

/// Copy `src` to `dst`, written with `O_DIRECT`: a buffered copy of 1 GiB puts 262,144 new pages
/// into the page cache and then writes them back; on this kind of VM that took 1.8-6 s
/// (`dd conv=fsync`) where the same write with `O_DIRECT` took 0.7-0.95 s. A thread of its own
/// reads ahead into a few reused buffers while this one writes: the previous version is often
/// not cached (it was written with `O_DIRECT` itself), and reading it in turn with the writes
/// made a 1 GiB copy 1.34-2.01 s where overlapping the two took 1.04-1.36 s. Returns how far it
/// got: the whole size, or less where direct I/O is refused (a file system without it) or a
/// short tail is left, the rest then left to the caller. `dst` is left without `O_DIRECT`, so
/// later writes through it (a short last block, local blocks) are ordinary ones.
fn copy_direct(src: &File, dst: &File, size: u64) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let fd = dst.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL only read and set the status flags of a descriptor `dst` keeps open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_DIRECT) } < 0 {
        return Ok(0);
    }
    let result = copy_pipelined(src, dst, size);
    // SAFETY: as above.
    unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) };
    result
}

/// Bytes read or written at a time by [`copy_pipelined`], and buffers in flight between its two
/// threads (16 MiB in all, for the length of one copy).
const PIPE_SLICE: usize = 4 * 1024 * 1024;
const PIPE_BUFFERS: usize = 4;

/// A heap buffer whose usable part starts at a [`DIRECT_ALIGN`] boundary.
struct AlignedBuf {
    storage: Vec<u8>,
    skip: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let storage = vec![0u8; len + DIRECT_ALIGN];
        let skip = storage.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf { storage, skip, len }
    }

    fn bytes(&mut self) -> &mut [u8] {
        &mut self.storage[self.skip..self.skip + self.len]
    }
}

/// The copy of [`copy_direct`]: a reader thread fills buffers in file order, this thread writes
/// each whole aligned piece through `dst` and hands the buffer back. Stops at the first short
/// read or unaligned length (the caller copies the rest) or when a direct write is refused
/// (`EINVAL`); returns the bytes written.
fn copy_pipelined(src: &File, dst: &File, size: u64) -> io::Result<u64> {
    use std::sync::mpsc;
    std::thread::scope(|scope| {
        let (full_tx, full_rx) = mpsc::sync_channel::<(AlignedBuf, usize, u64)>(PIPE_BUFFERS);
        let (empty_tx, empty_rx) = mpsc::channel::<AlignedBuf>();
        for _ in 0..PIPE_BUFFERS {
            // The receiver is alive until the reader starts: this cannot fail.
            let _ = empty_tx.send(AlignedBuf::new(PIPE_SLICE));
        }
        let reader = scope.spawn(move || -> io::Result<()> {
            let mut at = 0u64;
            while at < size {
                // Either channel closed: the writer has stopped, and so does this.
                let Ok(mut buf) = empty_rx.recv() else {
                    return Ok(());
                };
                let want = PIPE_SLICE.min((size - at) as usize);
                let n = read_full_at(src, &mut buf.bytes()[..want], at)?;
                if full_tx.send((buf, n, at)).is_err() || n < want {
                    return Ok(());
                }
                at += n as u64;
            }
            Ok(())
        });
        let written = (|| -> io::Result<u64> {
            let mut done = 0u64;
            for (mut buf, n, at) in full_rx.iter() {
                // Only whole aligned pieces go direct; a short tail is left to the caller.
                let aligned = n - n % DIRECT_ALIGN;
                if aligned == 0 {
                    break;
                }
                match dst.write_all_at(&buf.bytes()[..aligned], at) {
                    Ok(()) => done += aligned as u64,
                    // Direct I/O refused here (EINVAL): the caller copies the rest.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
                    Err(e) => return Err(e),
                }
                if aligned < n {
                    break;
                }
                let _ = empty_tx.send(buf);
            }
            Ok(done)
        })();
        // Unblocks a reader waiting for a buffer or for room to hand one over.
        drop(empty_tx);
        drop(full_rx);
        let read = reader
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("copy reader panicked")));
        let done = written?;
        read?;
        Ok(done)
    })
}

/// The temp file `f` opened again with `O_DIRECT` (through `/proc/self/fd`, which also reaches
/// an unnamed temp file); None where that or direct I/O is not available.
fn reopen_direct(f: &File) -> Option<File> {
    use std::os::fd::AsRawFd;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .ok()
}

thread_local! {
    /// Where a received block is copied to be aligned for direct I/O (reused, so no fresh
    /// pages for each block).
    static DIRECT_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Write `data` (a multiple of [`DIRECT_ALIGN`] long) at `at` through the `O_DIRECT`
/// descriptor `f`, copied to an aligned buffer first unless it is aligned already. `EINVAL`
/// means direct I/O was refused and the caller writes it the ordinary way.
fn write_direct(f: &File, data: &[u8], at: u64) -> io::Result<()> {
    if data.as_ptr().align_offset(DIRECT_ALIGN) == 0 {
        return f.write_all_at(data, at);
    }
    DIRECT_BUF.with(|cell| {
        let Ok(mut storage) = cell.try_borrow_mut() else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        if storage.len() < data.len() + DIRECT_ALIGN {
            *storage = vec![0u8; data.len().max(BLOCK_SIZE as usize) + DIRECT_ALIGN];
        }
        let skip = storage.as_ptr().align_offset(DIRECT_ALIGN);
        let buf = &mut storage[skip..skip + data.len()];
        buf.copy_from_slice(data);
        f.write_all_at(buf, at)
    })
}

/// `pread` until `buf` is full or the file ends; returns the bytes read.
fn read_full_at(f: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], at + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Copy `src` into `dst` in the kernel (copy_file_range) a slice at a time, from each file's
/// position, starting each slice's writeback as soon as it is copied: the fsync before the
/// rename then finds little left to write, instead of a whole large file.
fn copy_with_writeback(src: &mut File, dst: &mut File) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    const SLICE: usize = 32 * 1024 * 1024;
    let start = dst.stream_position()?;
    let mut done: u64 = 0;
    loop {
        // SAFETY: both descriptors are open files owned by the caller; null offsets make the
        // kernel use and advance each file's own position.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                std::ptr::null_mut(),
                dst.as_raw_fd(),
                std::ptr::null_mut(),
                SLICE,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // Not supported between these files: an ordinary copy of the rest.
                Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                    return Ok(done + io::copy(src, dst)?)
                }
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Ok(done);
        }
        // SAFETY: as above; this only starts writeback of pages already written.
        unsafe {
            libc::sync_file_range(
                dst.as_raw_fd(),
                (start + done) as i64,
                n as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        done += n as u64;
    }
}

/// fsync a directory, so the entries just renamed into it survive a power cut.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// An applier over a fresh box (real SQLite index, real files in a temp folder).
    fn applier() -> (tempfile::TempDir, Applier) {
        let dir = tempfile::tempdir().unwrap();
        let (b, _) = crate::config::BoxDir::init(&dir.path().join("box")).unwrap();
        let local = Arc::new(LocalBox::open(b.clone()).unwrap());
        let db = Arc::new(Mutex::new(SyncDb::open(&b).unwrap()));
        let ap = Applier {
            root: b.root.clone(),
            tmp: b.tmp_dir().join("sync"),
            db,
            blocks: Arc::new(BlockTable::open(&b).unwrap()),
            local,
            locks: LockManager::new(),
            own_creates: Arc::new(crate::sync::watch::OwnCreates::default()),
            precopies: Default::default(),
        };
        (dir, ap)
    }

    /// A peer's record of a new file `path` holding `content`, and the file built from it.
    fn built(ap: &Applier, path: &str, content: &[u8]) -> (Building, Option<Record>) {
        let mut version = crate::model::VersionVector::new();
        version.bump(7);
        let rec = record_of(path, content, version);
        let mut b = ap.prepare_files(&[(&rec, false)]).pop().unwrap().unwrap();
        for (i, block) in content.chunks(BLOCK_SIZE as usize).enumerate() {
            b.write_block(i as u64, block).unwrap();
        }
        ap.seal(&mut b).unwrap();
        (b, None)
    }

    /// A peer's record (device 7) of `path` holding `content`.
    fn record_of(path: &str, content: &[u8], version: crate::model::VersionVector) -> Record {
        let mut h = crate::hashing::StreamHasher::new();
        h.update(content);
        let hashes = h.finish();
        Record {
            path: RelPath::parse(path).unwrap(),
            kind: Kind::File,
            size: content.len() as u64,
            mtime_ns: 1_600_000_000_123_456_789,
            mode: 0o640,
            target: None,
            md5: Some(hashes.md5),
            sha256: Some(hashes.sha256),
            blocks: hashes.blocks,
            version,
            deleted: false,
            sequence: 1,
            modified_by: 7,
        }
    }

    /// A large file received and put in place, its record, and its content.
    fn large_in_place(ap: &Applier) -> (Record, Vec<u8>) {
        let content = pattern(PRECOPY_MIN as usize + 5000);
        let (b, _) = built(ap, "big.bin", &content);
        let rec = b.rec.clone();
        ap.finish_file(b, None, None).unwrap();
        (rec, content)
    }

    /// The peer's next version of `old`: `content` with one byte of block `block` flipped.
    fn next_version(old: &Record, content: &mut [u8], block: usize) -> Record {
        content[block * BLOCK_SIZE as usize + 17] ^= 0xff;
        let mut version = old.version.clone();
        version.bump(7);
        record_of(old.path.as_str(), content, version)
    }

    /// Build `rec` from `b` by writing its missing blocks out of `content`, put it in place and
    /// return what the disk then holds.
    fn finish_from(ap: &Applier, b: Building, content: &[u8], old: &Record) -> Vec<u8> {
        for i in b.missing.clone() {
            let at = (i * BLOCK_SIZE) as usize;
            let end = (at + BLOCK_SIZE as usize).min(content.len());
            b.write_block(i, &content[at..end]).unwrap();
        }
        let path = b.rec.path.clone();
        ap.finish_file(b, Some(old), None).unwrap();
        std::fs::read(ap.root.join(path.as_str())).unwrap()
    }

    fn temp_files(ap: &Applier) -> usize {
        std::fs::read_dir(&ap.tmp).unwrap().count()
    }

    #[test]
    fn a_copy_made_ahead_is_what_the_next_version_is_built_from() {
        let (_dir, ap) = applier();
        let (v1, mut content) = large_in_place(&ap);
        assert!(ap.precopy(&v1.path));
        assert_eq!(ap.precopies.ready(), 1);
        assert!(!ap.precopy(&v1.path), "copied twice");
        let v2 = next_version(&v1, &mut content, 3);
        let b = ap.prepare_file(&v2).unwrap();
        assert_eq!(b.missing, vec![3]);
        assert_eq!(b.copied_ahead, content.len() as u64 - BLOCK_SIZE);
        assert_eq!(b.reused, b.copied_ahead);
        assert_eq!(ap.precopies.ready(), 0, "the copy was not claimed");
        assert!(
            finish_from(&ap, b, &content, &v1) == content,
            "wrong content"
        );
        assert_eq!(temp_files(&ap), 0, "a temp file was left");
        // The next version is small: the copy made ahead is claimed and dropped, not left.
        assert!(ap.precopy(&v1.path));
        let mut version = v2.version.clone();
        version.bump(7);
        let small = record_of(v1.path.as_str(), b"now small", version);
        let b = ap.prepare_file(&small).unwrap();
        assert_eq!(b.copied_ahead, 0);
        assert_eq!(ap.precopies.ready(), 0, "the copy was left unclaimed");
        assert!(finish_from(&ap, b, b"now small", &v2) == b"now small");
        assert_eq!(temp_files(&ap), 0, "a temp file was left");
    }

    #[test]
    fn a_copy_made_ahead_of_a_file_changed_since_is_not_used() {
        let (_dir, ap) = applier();
        let (v1, mut content) = large_in_place(&ap);
        assert!(ap.precopy(&v1.path));
        // Edited here after the copy (not scanned yet: the index still has v1's stat key).
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(ap.root.join("big.bin"))
            .unwrap();
        f.write_all_at(b"local edit", 9 * BLOCK_SIZE).unwrap();
        drop(f);
        let v2 = next_version(&v1, &mut content, 3);
        let b = ap.prepare_file(&v2).unwrap();
        assert_eq!(b.copied_ahead, 0);
        assert_eq!(ap.precopies.ready(), 0);
        // Built without the stale copy: every block is the new version's. (Placing it is the
        // finish's business, which refuses over the unscanned edit.)
        let mut b = b;
        for i in b.missing.clone() {
            let at = (i * BLOCK_SIZE) as usize;
            let end = (at + BLOCK_SIZE as usize).min(content.len());
            b.write_block(i, &content[at..end]).unwrap();
        }
        ap.seal(&mut b).unwrap();
        let mut got = Vec::new();
        b.file.seek(SeekFrom::Start(0)).unwrap();
        b.file.read_to_end(&mut got).unwrap();
        assert!(got == content, "built from stale bytes");
        assert!(matches!(
            ap.finish_file(b, Some(&v1), None),
            Err(ApplyError::LocalChange(_))
        ));
    }

    #[test]
    fn a_copy_made_ahead_of_a_version_replaced_since_is_not_used() {
        let (_dir, ap) = applier();
        let (v1, mut content) = large_in_place(&ap);
        assert!(ap.precopy(&v1.path));
        // Another version arrives and is put in place without the copy (as a small change
        // through another path would be); the copy of v1 is left waiting.
        let v2 = next_version(&v1, &mut content, 1);
        let b = ap.prepare_in_tmp(&v2, false, false).unwrap();
        assert_eq!(finish_from(&ap, b, &content, &v1), content);
        assert_eq!(ap.precopies.ready(), 1);
        let v3 = next_version(&v2, &mut content, 5);
        let b = ap.prepare_file(&v3).unwrap();
        assert_eq!(b.copied_ahead, 0, "built from the copy of an older version");
        assert_eq!(b.missing, vec![5]);
        assert!(
            finish_from(&ap, b, &content, &v2) == content,
            "wrong content"
        );
    }

    #[test]
    fn copies_made_ahead_are_only_of_large_indexed_files_and_expire() {
        let (_dir, ap) = applier();
        let small = built(&ap, "small.txt", b"small").0;
        ap.finish_file(small, None, None).unwrap();
        assert!(!ap.precopy(&RelPath::parse("small.txt").unwrap()));
        // A reservation that makes no copy leaves no slot behind (a build would wait on it).
        assert!(ap.precopies.reserve(&RelPath::parse("small.txt").unwrap()));
        assert!(!ap.precopy_reserved(&RelPath::parse("small.txt").unwrap()));
        assert!(!ap.precopies.running());
        assert!(ap
            .precopies
            .claim(&RelPath::parse("small.txt").unwrap())
            .is_none());
        assert!(!ap.precopy(&RelPath::parse("absent.bin").unwrap()));
        let (v1, _) = large_in_place(&ap);
        assert!(ap.precopy(&v1.path));
        assert_eq!(temp_files(&ap), 1);
        ap.precopies.expire();
        assert_eq!(ap.precopies.ready(), 1, "expired at once");
        ap.precopies.expire_older_than(Duration::ZERO);
        assert_eq!(ap.precopies.ready(), 0);
        assert_eq!(temp_files(&ap), 0, "the expired copy's temp file was left");
    }

    /// Bytes that differ from slice to slice, so a misplaced piece cannot go unnoticed.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    #[test]
    fn a_previous_version_is_copied_exactly_and_the_copy_takes_ordinary_writes_after() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let big = DIRECT_MIN as usize;
        // Direct with a buffered tail, direct only, and a small file (no direct I/O).
        for len in [big + 3 * DIRECT_ALIGN + 1234, big, 5000] {
            let content = pattern(len);
            let src_path = dir.path().join("src");
            std::fs::write(&src_path, &content).unwrap();
            let mut src = File::open(&src_path).unwrap();
            let mut dst = tempfile::tempfile_in(dir.path()).unwrap();
            assert_eq!(copy_previous(&mut src, &mut dst).unwrap(), len as u64);
            // SAFETY: F_GETFL only reads the flags of a descriptor `dst` keeps open.
            let flags = unsafe { libc::fcntl(dst.as_raw_fd(), libc::F_GETFL) };
            assert_eq!(flags & libc::O_DIRECT, 0, "O_DIRECT left set");
            // A patch at an unaligned offset and length, as a fetched short block would be.
            dst.write_all_at(b"patched", 4097).unwrap();
            let mut want = content;
            want[4097..4104].copy_from_slice(b"patched");
            let mut got = Vec::new();
            dst.seek(SeekFrom::Start(0)).unwrap();
            dst.read_to_end(&mut got).unwrap();
            assert!(got == want, "the copy of {len} bytes differs");
        }
    }

    #[test]
    fn a_large_file_received_block_by_block_is_exact() {
        let (_dir, ap) = applier();
        // Whole blocks (direct where the file system allows it) and a short last one.
        let content = pattern(DIRECT_MIN as usize + 5000);
        // A first build only for the record; this one writes directly.
        let rec = built(&ap, "big.bin", &content).0.rec;
        let mut b = ap.prepare_files(&[(&rec, false)]).pop().unwrap().unwrap();
        b.write_directly();
        for (i, block) in content.chunks(BLOCK_SIZE as usize).enumerate() {
            b.write_block(i as u64, block).unwrap();
        }
        ap.seal(&mut b).unwrap();
        let mut got = Vec::new();
        b.file.seek(SeekFrom::Start(0)).unwrap();
        b.file.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), content.len());
        assert!(got == content, "the received file differs");
    }

    #[test]
    fn a_direct_copy_stops_before_a_piece_that_is_not_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let len = DIRECT_ALIGN * 1000 + 77;
        let content = pattern(len);
        let src_path = dir.path().join("src");
        std::fs::write(&src_path, &content).unwrap();
        let src = File::open(&src_path).unwrap();
        let mut dst = tempfile::tempfile_in(dir.path()).unwrap();
        let done = copy_direct(&src, &dst, len as u64).unwrap();
        // None of it where the file system refuses direct I/O.
        assert!(done == 0 || done == (len - 77) as u64, "copied {done}");
        let mut got = Vec::new();
        dst.read_to_end(&mut got).unwrap();
        assert!(got == content[..done as usize], "the direct part differs");
    }

    #[test]
    fn a_batch_is_placed_one_round_after_its_data_is_flushed() {
        let (_dir, ap) = applier();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let first = vec![built(&ap, "a.txt", b"first"), built(&ap, "big.bin", &big)];
        let second = vec![built(&ap, "b.txt", b"second")];
        // Round 1: the first batch's data is flushed; nothing is visible or recorded yet.
        let (done, durable) = ap.place_files(DurableBatch::default(), ap.seal_files(first));
        assert!(done.is_empty());
        assert_eq!(durable.batch().len(), 2);
        assert!(!ap.root.join("a.txt").exists());
        assert!(ap
            .local
            .index
            .lock()
            .unwrap()
            .get(&RelPath::parse("a.txt").unwrap())
            .unwrap()
            .is_none());
        // Round 2: the first batch goes in place (and is recorded), the second is flushed.
        let (done, durable) = ap.place_files(durable, ap.seal_files(second));
        let paths: Vec<&str> = done.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["a.txt", "big.bin"]);
        assert!(done.iter().all(|(_, r)| r.is_ok()), "{done:?}");
        assert_eq!(std::fs::read(ap.root.join("a.txt")).unwrap(), b"first");
        assert_eq!(std::fs::read(ap.root.join("big.bin")).unwrap(), big);
        let md = std::fs::metadata(ap.root.join("a.txt")).unwrap();
        assert_eq!(md.permissions().mode() & 0o7777, 0o640);
        assert_eq!(
            filetime::FileTime::from_last_modification_time(&md).nanoseconds(),
            123_456_789
        );
        let stored = ap
            .local
            .index
            .lock()
            .unwrap()
            .get(&RelPath::parse("big.bin").unwrap())
            .unwrap();
        assert_eq!(stored.map(|s| s.record.size), Some(big.len() as u64));
        assert!(!ap.root.join("b.txt").exists());
        // Round 3, nothing new: the second batch goes in place.
        let (done, durable) = ap.place_files(durable, SealedBatch::default());
        assert_eq!(done.len(), 1);
        assert!(durable.batch().is_empty());
        assert_eq!(std::fs::read(ap.root.join("b.txt")).unwrap(), b"second");
        // Nothing was left in the temp folder.
        let left = std::fs::read_dir(&ap.tmp).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0);
    }

    #[test]
    fn every_mode_arrives_exact_whether_or_not_the_temp_file_was_made_with_it() {
        let (_dir, ap) = applier();
        // Made with its own bits (0o644, 0o600, 0o755); without the owner's write (0o444) or
        // read (0o200), with set-id and sticky bits, and with bits the umask takes away (0o666):
        // changed when sealed.
        let modes = [
            0o644, 0o600, 0o755, 0o444, 0o200, 0o4755, 0o2750, 0o1777, 0o666, 0o000,
        ];
        let batch: Vec<_> = modes
            .iter()
            .map(|m| {
                let mut version = crate::model::VersionVector::new();
                version.bump(7);
                let path = format!("m{m:o}");
                let mut rec = record_of(&path, path.as_bytes(), version);
                rec.mode = *m;
                let mut b = ap.prepare_files(&[(&rec, false)]).pop().unwrap().unwrap();
                b.write_block(0, path.as_bytes()).unwrap();
                ap.seal(&mut b).unwrap();
                (b, None)
            })
            .collect();
        let (_, durable) = ap.place_files(DurableBatch::default(), ap.seal_files(batch));
        let (done, _) = ap.place_files(durable, SealedBatch::default());
        assert!(done.iter().all(|(_, r)| r.is_ok()), "{done:?}");
        for m in modes {
            let md = std::fs::symlink_metadata(ap.root.join(format!("m{m:o}"))).unwrap();
            assert_eq!(md.permissions().mode() & 0o7777, m, "mode {m:o}");
        }
    }

    #[test]
    fn a_large_batch_is_linked_by_several_threads_and_recorded_in_order() {
        let (_dir, ap) = applier();
        // A file already placed and recorded, which the batch replaces (the one-by-one path).
        assert!(ap.finish_files(vec![built(&ap, "d0/old.txt", b"old")])[0]
            .1
            .is_ok());
        let old = ap.stored(&RelPath::parse("d0/old.txt").unwrap()).unwrap();
        let mut batch = Vec::new();
        let mut want = Vec::new();
        for i in 0..300 {
            let path = format!("d{}/f{i:03}", i % 6);
            let content = format!("content of {path}").into_bytes();
            batch.push(built(&ap, &path, &content));
            want.push((path, content));
        }
        let mut replacing = built(&ap, "d0/old.txt", b"new");
        replacing.1 = old.map(|s| s.record);
        batch.insert(100, replacing);
        // A local file at one of the paths, not scanned yet: kept, and that path refused.
        std::fs::create_dir_all(ap.root.join("d3")).unwrap();
        std::fs::write(ap.root.join("d3/f003"), b"mine").unwrap();
        let done = ap.finish_files(batch);
        assert_eq!(done.len(), 301);
        assert_eq!(done[100].0.as_str(), "d0/old.txt");
        assert!(done[100].1.is_ok(), "{:?}", done[100]);
        assert_eq!(std::fs::read(ap.root.join("d0/old.txt")).unwrap(), b"new");
        let ix = ap.local.index.lock().unwrap();
        let mut last_seq = 0;
        for (path, res) in &done {
            if path.as_str() == "d3/f003" {
                assert!(matches!(res, Err(ApplyError::LocalChange(_))), "{res:?}");
                continue;
            }
            assert!(res.is_ok(), "{path}: {res:?}");
            let rec = ix.get(path).unwrap().expect("recorded").record;
            // Sequence numbers follow the batch's order, whichever thread linked the file.
            assert!(rec.sequence > last_seq, "{path} recorded out of order");
            last_seq = rec.sequence;
        }
        drop(ix);
        for (path, content) in &want {
            let got = std::fs::read(ap.root.join(path)).unwrap();
            if path == "d3/f003" {
                assert_eq!(got, b"mine");
            } else {
                assert!(got == *content, "{path} differs");
            }
        }
        let left = std::fs::read_dir(&ap.tmp).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0);
    }

    #[test]
    fn a_file_made_locally_while_its_batch_was_flushed_is_kept() {
        let (_dir, ap) = applier();
        let (_, durable) = ap.place_files(
            DurableBatch::default(),
            ap.seal_files(vec![built(&ap, "x", b"peer")]),
        );
        // Someone writes the path between the flush and the placing: an unscanned local edit.
        std::fs::write(ap.root.join("x"), b"mine").unwrap();
        let (done, _) = ap.place_files(durable, SealedBatch::default());
        assert!(
            matches!(done[0].1, Err(ApplyError::LocalChange(_))),
            "{done:?}"
        );
        assert_eq!(std::fs::read(ap.root.join("x")).unwrap(), b"mine");
        // The same through `finish_files`, for a path nobody touched.
        let done = ap.finish_files(vec![built(&ap, "y", b"peer")]);
        assert!(done[0].1.is_ok(), "{done:?}");
        assert_eq!(std::fs::read(ap.root.join("y")).unwrap(), b"peer");
    }

    #[test]
    fn unnamed_temp_files_link_once_and_never_over_a_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .mode(0o600)
            .open(dir.path())
            .unwrap();
        f.write_all(b"content").unwrap();
        // Nothing is visible before the link.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let to = dir.path().join("placed");
        link_unnamed(&f, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"content");
        // A taken name is refused, not replaced (the caller then renames over it).
        std::fs::write(dir.path().join("taken"), b"old").unwrap();
        let e = link_unnamed(&f, &dir.path().join("taken")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(dir.path().join("taken")).unwrap(), b"old");
    }
}
