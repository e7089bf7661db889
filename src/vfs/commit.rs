//! Committing changes made through the mount to the index, on a background thread.
//!
//! A write is published (shadow renamed over the store file) on flush/fsync/close; the path is
//! then queued here. The thread drains the queue in batches, so a burst of small files (a tree
//! copy) costs one wake-up per batch, never a full rescan per file. A regular file gets a direct
//! index update (version bump, new sequence number); when only some blocks of a large file were
//! written, only those blocks are rehashed and the whole-file digests are left for the next scan
//! to fill in (the hash cache's "not hashed yet" state). Anything else (directories, symlinks,
//! deletions, renames) goes through `scan::scan` of that path, which already knows how to turn
//! a vanished subtree into tombstones.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::config::BoxDir;
use crate::hashing::{hash_file_stable_without_md5, StatKey};
use crate::index::Index;
use crate::model::{Kind, Record, BLOCK_SIZE};
use crate::paths::RelPath;
use crate::scan::{self, disk_entry, HashWanted, IgnoreRules};

use super::hooks::ChangeSink;

/// How long the committer waits for more work after a job while the queue keeps filling, and
/// at most in all: a burst of closes becomes one index transaction and one push, and a single
/// close still reaches the index (and the peers) within [`COALESCE_MAX`].
pub const COALESCE_QUIET: Duration = Duration::from_millis(5);
pub const COALESCE_MAX: Duration = Duration::from_millis(50);
/// At most this many jobs in one batch.
const COALESCE_JOBS: usize = 4096;

/// Files at least this big that were only partly rewritten get incremental block hashing.
pub const INCREMENTAL_MIN: u64 = 8 * 1024 * 1024;

/// Which blocks of a file a writer touched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dirty {
    /// Rewritten from scratch (new file, O_TRUNC): hash everything.
    All,
    /// Block indexes written (plus the size may have changed).
    Blocks(BTreeSet<u64>),
}

impl Dirty {
    fn merge(&mut self, other: Dirty) {
        match (&mut *self, other) {
            (Dirty::All, _) => {}
            (_, Dirty::All) => *self = Dirty::All,
            (Dirty::Blocks(a), Dirty::Blocks(b)) => a.extend(b),
        }
    }
}

enum Job {
    File(RelPath, Dirty),
    Entry(RelPath),
    Gone(RelPath),
    Path(RelPath),
    Flush(mpsc::Sender<()>),
}

/// The background committer. Dropping it finishes the queue and stops the thread.
pub struct Committer {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Committer {
    pub fn start(b: BoxDir, device: u64, sink: Arc<dyn ChangeSink>) -> anyhow::Result<Self> {
        let mut index = Index::open(&b)?;
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("mybox-vfs-commit".into())
            .spawn(move || run(b, &mut index, device, sink, rx))?;
        Ok(Committer {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    fn send(&self, job: Job) {
        if let Ok(tx) = self.tx.lock() {
            if let Some(tx) = tx.as_ref() {
                let _ = tx.send(job);
            }
        }
    }

    /// A regular file was published with new content.
    pub fn file(&self, path: RelPath, dirty: Dirty) {
        self.send(Job::File(path, dirty));
    }

    /// A directory, symlink or special file was just created at `path`.
    pub fn entry(&self, path: RelPath) {
        self.send(Job::Entry(path));
    }

    /// A file or symlink at `path` was unlinked.
    pub fn gone(&self, path: RelPath) {
        self.send(Job::Gone(path));
    }

    /// Something else changed at `path` (removed, renamed, metadata).
    pub fn path(&self, path: RelPath) {
        self.send(Job::Path(path));
    }

    /// Wait until everything queued so far is committed (tests, fsync, unmount).
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let (tx, rx) = mpsc::channel();
        self.send(Job::Flush(tx));
        rx.recv_timeout(timeout).is_ok()
    }

    pub fn shutdown(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(
    b: BoxDir,
    index: &mut Index,
    device: u64,
    sink: Arc<dyn ChangeSink>,
    rx: mpsc::Receiver<Job>,
) {
    // Hashing and index writes are background work: let the threads answering the kernel go
    // first when the cores are busy.
    // SAFETY: gettid/setpriority on the calling thread only; failure just keeps the priority.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
    }
    let ignore = IgnoreRules::load(&b);
    while let Ok(first) = rx.recv() {
        // Drain what else is queued: one batch, each path once.
        let mut files: BTreeMap<RelPath, Dirty> = BTreeMap::new();
        let mut paths: BTreeSet<RelPath> = BTreeSet::new();
        let mut entries: BTreeSet<RelPath> = BTreeSet::new();
        let mut gone: BTreeSet<RelPath> = BTreeSet::new();
        let mut acks = Vec::new();
        let mut next = Some(first);
        let mut queued = 0usize;
        let deadline = Instant::now() + COALESCE_MAX;
        while let Some(job) = next {
            queued += 1;
            match job {
                Job::File(p, d) => match files.get_mut(&p) {
                    Some(old) => old.merge(d),
                    None => {
                        files.insert(p, d);
                    }
                },
                Job::Path(p) => {
                    paths.insert(p);
                }
                Job::Entry(p) => {
                    entries.insert(p);
                }
                Job::Gone(p) => {
                    gone.insert(p);
                }
                Job::Flush(ack) => acks.push(ack),
            }
            // A burst (a tree copy) arrives one close at a time: wait for the queue to go quiet
            // so a whole burst is one transaction and one `ChangeSink` call, not one per file.
            // Sleeping (rather than blocking on the channel) lets the senders queue without
            // waking this thread once per job. A waiter (tests, unmount) or a full batch ends
            // the wait at once.
            next = match rx.try_recv() {
                Ok(j) => Some(j),
                Err(_) if !acks.is_empty() || queued >= COALESCE_JOBS => None,
                Err(_) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        None
                    } else {
                        std::thread::sleep(left.min(COALESCE_QUIET));
                        rx.try_recv().ok()
                    }
                }
            };
        }
        let mut changed = Vec::new();
        for p in gone {
            if paths.contains(&p) || files.contains_key(&p) || entries.contains(&p) {
                paths.insert(p); // recreated meanwhile: let the scan decide
                continue;
            }
            match tombstone(&b, index, device, &p) {
                Ok(true) => changed.push(p),
                Ok(false) => {}
                Err(e) => tracing::warn!("committing {p} to the index: {e:#}"),
            }
        }
        // Hash every published file first, then write all their records in one transaction
        // (a tree copy commits thousands of small files).
        let mut puts = Vec::new();
        for (p, d) in files {
            if paths.contains(&p) {
                continue; // the path job below rescans it anyway
            }
            match prepare_file(&b, index, device, &ignore, &p, &d) {
                Ok(Prepared::Nothing) => {}
                Ok(Prepared::Rescan) => {
                    paths.insert(p);
                }
                Ok(prep) => puts.push((p, prep)),
                Err(e) => tracing::warn!("committing {p} to the index: {e:#}"),
            }
        }
        if !puts.is_empty() {
            let written = index.transaction(|ix| {
                let mut new = Vec::new();
                for (p, prep) in &puts {
                    match prep {
                        Prepared::Put(rec, stat) => {
                            let mut rec = rec.clone();
                            rec.sequence = ix.next_sequence()?;
                            ix.put(&rec, Some(*stat))?;
                            new.push(p.clone());
                        }
                        Prepared::SetStat(stat) => ix.set_stat(p, *stat)?,
                        Prepared::Nothing | Prepared::Rescan => {}
                    }
                }
                Ok(new)
            });
            match written {
                Ok(new) => changed.extend(new),
                Err(e) => tracing::warn!("committing {} files to the index: {e:#}", puts.len()),
            }
        }
        for p in entries {
            if paths.contains(&p) {
                continue;
            }
            match commit_entry(&b, index, device, &ignore, &p) {
                Ok(true) => changed.push(p),
                Ok(false) => {}
                Err(e) => tracing::warn!("committing {p} to the index: {e:#}"),
            }
        }
        for p in paths {
            match scan::scan(&b, index, device, &p, HashWanted::All) {
                Ok(s) => {
                    for e in &s.errors {
                        tracing::warn!("committing {p}: {e}");
                    }
                    changed.extend(s.changed);
                }
                Err(e) => tracing::warn!("committing {p} to the index: {e:#}"),
            }
        }
        if !changed.is_empty() {
            tracing::debug!("committed {} changed path(s)", changed.len());
            sink.changed(&changed);
        }
        for a in acks {
            let _ = a.send(());
        }
    }
}

/// Mark an unlinked file or symlink deleted without a rescan (a directory, or a path that is
/// back on disk, goes through the scan).
pub fn tombstone(
    b: &BoxDir,
    index: &mut Index,
    device: u64,
    path: &RelPath,
) -> anyhow::Result<bool> {
    let Some(old) = index.get(path)? else {
        return Ok(false);
    };
    let on_disk = std::fs::symlink_metadata(path.to_fs(&b.root)).is_ok();
    if old.record.kind == Kind::Dir || on_disk {
        let s = scan::scan(b, index, device, path, HashWanted::All)?;
        return Ok(!s.changed.is_empty());
    }
    if old.record.deleted {
        return Ok(false);
    }
    let mut rec = old.record;
    rec.deleted = true;
    rec.md5 = None;
    rec.sha256 = None;
    rec.blocks.clear();
    rec.size = 0;
    rec.version.bump(device);
    rec.modified_by = device;
    index.transaction(|ix| {
        rec.sequence = ix.next_sequence()?;
        ix.put(&rec, None)
    })?;
    Ok(true)
}

/// Record one new directory, symlink or special file without a rescan; `Ok(true)` if it got
/// a new version. Anything else (it vanished, or turned out to be a regular file) goes through
/// the generic scan of that path.
pub fn commit_entry(
    b: &BoxDir,
    index: &mut Index,
    device: u64,
    ignore: &IgnoreRules,
    path: &RelPath,
) -> anyhow::Result<bool> {
    let entry = match disk_entry(&b.root, path) {
        Ok(Some(e)) if e.kind != Kind::File => e,
        Ok(None) => return Ok(false), // special files are not synced
        _ => {
            let s = scan::scan(b, index, device, path, HashWanted::All)?;
            return Ok(!s.changed.is_empty());
        }
    };
    if ignore.is_ignored(path, entry.kind == Kind::Dir) {
        return Ok(false);
    }
    let old = index.get(path)?;
    if let Some(o) = &old {
        let r = &o.record;
        if !r.deleted && r.kind == entry.kind && r.mode == entry.mode && r.target == entry.target {
            return Ok(false);
        }
    }
    let mut version = old
        .as_ref()
        .map(|o| o.record.version.clone())
        .unwrap_or_default();
    version.bump(device);
    let rec = Record {
        path: path.clone(),
        kind: entry.kind,
        size: 0,
        mtime_ns: entry.mtime_ns,
        mode: entry.mode,
        target: entry.target.clone(),
        md5: None,
        sha256: None,
        blocks: Vec::new(),
        version,
        deleted: false,
        sequence: 0,
        modified_by: device,
    };
    index.transaction(|ix| {
        let mut rec = rec;
        rec.sequence = ix.next_sequence()?;
        ix.put(&rec, Some(entry.stat))
    })?;
    Ok(true)
}

/// Update the index for one regular file just published; `Ok(true)` if it got a new version.
pub fn commit_file(
    b: &BoxDir,
    index: &mut Index,
    device: u64,
    ignore: &IgnoreRules,
    path: &RelPath,
    dirty: &Dirty,
) -> anyhow::Result<bool> {
    match prepare_file(b, index, device, ignore, path, dirty)? {
        Prepared::Put(rec, stat) => {
            index.transaction(|ix| {
                let mut rec = rec;
                rec.sequence = ix.next_sequence()?;
                ix.put(&rec, Some(stat))
            })?;
            Ok(true)
        }
        Prepared::SetStat(stat) => {
            index.set_stat(path, stat)?;
            Ok(false)
        }
        Prepared::Nothing => Ok(false),
        Prepared::Rescan => {
            let s = scan::scan(b, index, device, path, HashWanted::All)?;
            Ok(!s.changed.is_empty())
        }
    }
}

/// What committing one published file amounts to, decided (and hashed) before any index write.
pub enum Prepared {
    /// A new version (its sequence number is assigned when written).
    Put(Record, StatKey),
    /// Same content and metadata: only the hash-cache key moves.
    SetStat(StatKey),
    Nothing,
    /// Not a regular file any more: let the generic scan decide.
    Rescan,
}

/// Hash a published file and build its new record, reading the index but not writing it, so a
/// batch of files can be written in one transaction.
pub fn prepare_file(
    b: &BoxDir,
    index: &Index,
    device: u64,
    ignore: &IgnoreRules,
    path: &RelPath,
    dirty: &Dirty,
) -> anyhow::Result<Prepared> {
    let entry = match disk_entry(&b.root, path) {
        Ok(Some(e)) if e.kind == Kind::File => e,
        // Gone, replaced by something else, or special: let the generic scan decide.
        _ => return Ok(Prepared::Rescan),
    };
    if ignore.is_ignored(path, false) {
        return Ok(Prepared::Nothing);
    }
    let old = index.get(path)?;
    let full = path.to_fs(&b.root);
    let incremental = match (dirty, &old) {
        (Dirty::Blocks(set), Some(o))
            if !o.record.deleted
                && o.record.kind == Kind::File
                && !o.record.blocks.is_empty()
                && entry.stat.size >= INCREMENTAL_MIN =>
        {
            Some((set, &o.record))
        }
        _ => None,
    };
    let (md5, sha256, blocks, stat) = match incremental {
        Some((set, o)) => {
            let (blocks, stat) = rehash_blocks(&full, &o.blocks, o.size, set)?;
            (None, None, blocks, stat)
        }
        None => {
            // No MD5 here: only the query commands report it, and the engine's MD5 filler adds
            // it in the background (at low priority), off the writer's way.
            let (h, key) = hash_file_stable_without_md5(&b.root, path)?;
            (h.md5, Some(h.sha256), h.blocks, key)
        }
    };
    if let Some(o) = &old {
        let r = &o.record;
        let same = !r.deleted
            && r.kind == Kind::File
            && r.size == stat.size
            && r.mode == entry.mode
            && r.mtime_ns == stat.mtime_ns
            && r.blocks == blocks
            && (sha256.is_none() || r.sha256 == sha256);
        if same {
            return Ok(Prepared::SetStat(stat));
        }
    }
    let mut version = old
        .as_ref()
        .map(|o| o.record.version.clone())
        .unwrap_or_default();
    version.bump(device);
    let rec = Record {
        path: path.clone(),
        kind: Kind::File,
        size: stat.size,
        mtime_ns: stat.mtime_ns,
        mode: entry.mode,
        target: None,
        md5,
        sha256,
        blocks,
        version,
        deleted: false,
        sequence: 0,
        modified_by: device,
    };
    Ok(Prepared::Put(rec, stat))
}

/// Recompute the block hashes of the blocks in `dirty` (and those a size change touched),
/// keeping the others from `old`.
fn rehash_blocks(
    full: &std::path::Path,
    old: &[[u8; 32]],
    old_size: u64,
    dirty: &BTreeSet<u64>,
) -> anyhow::Result<(Vec<[u8; 32]>, StatKey)> {
    let f = crate::hashing::open_nofollow(full)?;
    let md = f.metadata()?;
    let key = StatKey::of(&md);
    let n = key.size.div_ceil(BLOCK_SIZE);
    let mut todo: BTreeSet<u64> = dirty.iter().copied().filter(|&i| i < n).collect();
    let old_n = (old.len() as u64).min(old_size.div_ceil(BLOCK_SIZE));
    if key.size != old_size {
        // The old last block and every block past it changed (grown or cut).
        for i in old_n.saturating_sub(1)..n {
            todo.insert(i);
        }
        if n > 0 {
            todo.insert(n - 1);
        }
    }
    let mut blocks: Vec<[u8; 32]> = old.iter().take(n as usize).copied().collect();
    blocks.resize(n as usize, [0; 32]);
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for i in todo {
        let off = i * BLOCK_SIZE;
        let want = (key.size - off).min(BLOCK_SIZE) as usize;
        let mut got = 0;
        while got < want {
            let r = f.read_at(&mut buf[got..want], off + got as u64)?;
            if r == 0 {
                break;
            }
            got += r;
        }
        let h: [u8; 32] = Sha256::digest(&buf[..got]).into();
        if let Some(slot) = blocks.get_mut(i as usize) {
            *slot = h;
        }
    }
    Ok((blocks, key))
}
