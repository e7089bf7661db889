//! Walk the store and bring the index up to date: new, changed and vanished paths get a new
//! version and sequence number; content is hashed only when its stat key changed (the hash cache)
//! and only for the paths the caller needs hashed now.

use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;

use crate::config::BoxDir;
use crate::hashing::{
    hash_file_stable, hash_file_stable_for_sync, ContentHashes, HashError, StatKey,
};
use crate::index::{Index, SeqAlloc};
use crate::model::{Kind, Record};
use crate::paths::{RelPath, META_DIR};

/// Suffix of partial files a download writes next to its target; never listed or synced.
pub const PART_SUFFIX: &str = ".mybox-part";
pub const IGNORE_FILE: &str = ".myboxignore";

/// `.myboxignore` rules (gitignore syntax) of a box.
pub struct IgnoreRules {
    matcher: Option<ignore::gitignore::Gitignore>,
}

impl IgnoreRules {
    pub fn none() -> Self {
        IgnoreRules { matcher: None }
    }

    /// Parse `text` as the ignore file of a store rooted at `root`. Bad lines are reported, the
    /// rest still apply.
    pub fn parse(root: &Path, text: &str) -> (Self, Vec<String>) {
        let mut b = ignore::gitignore::GitignoreBuilder::new(root);
        let mut errors = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if let Err(e) = b.add_line(None, line) {
                errors.push(format!("{IGNORE_FILE} line {}: {e}", i + 1));
            }
        }
        match b.build() {
            Ok(m) => (IgnoreRules { matcher: Some(m) }, errors),
            Err(e) => {
                errors.push(format!("{IGNORE_FILE}: {e}"));
                (IgnoreRules::none(), errors)
            }
        }
    }

    pub fn load(b: &BoxDir) -> Self {
        match std::fs::read_to_string(b.root.join(IGNORE_FILE)) {
            Ok(text) => {
                let (rules, errors) = Self::parse(&b.root, &text);
                for e in errors {
                    tracing::warn!("{e}");
                }
                rules
            }
            Err(_) => IgnoreRules::none(),
        }
    }

    /// Is `path` (or a directory above it) ignored?
    pub fn is_ignored(&self, path: &RelPath, is_dir: bool) -> bool {
        if path.file_name().ends_with(PART_SUFFIX) {
            return true;
        }
        match &self.matcher {
            Some(m) => m
                .matched_path_or_any_parents(path.as_str(), is_dir)
                .is_ignore(),
            None => false,
        }
    }
}

/// What one entry on disk looks like.
#[derive(Clone, Debug)]
pub struct DiskEntry {
    pub path: RelPath,
    pub kind: Kind,
    pub mode: u32,
    pub mtime_ns: i64,
    pub stat: StatKey,
    pub target: Option<String>,
}

fn mtime_ns(md: &std::fs::Metadata) -> i64 {
    md.mtime() * 1_000_000_000 + md.mtime_nsec()
}

/// lstat one path of the store into a [`DiskEntry`] (None for sockets, fifos, devices).
pub fn disk_entry(root: &Path, path: &RelPath) -> std::io::Result<Option<DiskEntry>> {
    // Never look through a symlinked parent: a link planted in the store must not make a path
    // outside it appear inside.
    let full = crate::paths::resolve_no_follow(root, path)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string()))?;
    entry_at(&full, path)
}

/// lstat `path` with one call, without checking its parents for symlinks: only for asking
/// whether a path is still exactly as the index recorded it. A stat key names one inode, so
/// a match through a parent swapped for a link is still the recorded file; and the swap is an
/// event of its own, scanned with the checks.
pub fn disk_entry_as_recorded(root: &Path, path: &RelPath) -> std::io::Result<Option<DiskEntry>> {
    entry_at(&path.to_fs(root), path)
}

/// lstat `full` (whose parents are known to be real directories) as `path`.
fn entry_at(full: &Path, path: &RelPath) -> std::io::Result<Option<DiskEntry>> {
    let md = std::fs::symlink_metadata(full)?;
    let ft = md.file_type();
    let kind = if ft.is_file() {
        Kind::File
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else {
        return Ok(None);
    };
    let target = if kind == Kind::Symlink {
        Some(std::fs::read_link(full)?.to_string_lossy().into_owned())
    } else {
        None
    };
    Ok(Some(DiskEntry {
        path: path.clone(),
        kind,
        mode: md.permissions().mode() & 0o7777,
        mtime_ns: mtime_ns(&md),
        stat: StatKey::of(&md),
        target,
    }))
}

/// Walk the store below `under` (the root for a full scan), never following symlinks and never
/// entering `.mybox/` or ignored paths. Unreadable entries are logged and skipped.
pub fn walk(root: &Path, under: &RelPath, ignore: &IgnoreRules) -> Vec<DiskEntry> {
    let mut out = Vec::new();
    let mut stack = vec![under.clone()];
    if !under.is_root() {
        match disk_entry(root, under) {
            // An event about an ignored path (or one below an ignored directory) is no reason to
            // index it: only walks of its parents used to skip it.
            Ok(Some(e)) if ignore.is_ignored(under, e.kind == Kind::Dir) => return out,
            Ok(Some(e)) => {
                let is_dir = e.kind == Kind::Dir;
                out.push(e);
                if !is_dir {
                    return out;
                }
            }
            _ => return out,
        }
    }
    while let Some(dir) = stack.pop() {
        let full = dir.to_fs(root);
        let rd = match std::fs::read_dir(&full) {
            Ok(rd) => rd,
            Err(e) => {
                tracing::warn!("cannot read directory {}: {e}", full.display());
                continue;
            }
        };
        for ent in rd.flatten() {
            let name = ent.file_name();
            let Some(name) = name.to_str() else {
                tracing::warn!("skipping non-UTF-8 name in {}: {:?}", full.display(), name);
                continue;
            };
            if dir.is_root() && name == META_DIR {
                continue;
            }
            let Ok(path) = dir.join(name) else {
                tracing::warn!("skipping unsupported name {name:?} in {}", full.display());
                continue;
            };
            // The walk only descends real directories, so the parents need no symlink check.
            let entry = match entry_at(&full.join(name), &path) {
                Ok(Some(e)) => e,
                Ok(None) => continue,
                Err(e) => {
                    tracing::debug!("vanished during scan: {path}: {e}");
                    continue;
                }
            };
            if ignore.is_ignored(&path, entry.kind == Kind::Dir) {
                continue;
            }
            if entry.kind == Kind::Dir {
                stack.push(path);
            }
            out.push(entry);
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Which files a scan should hash now (others may be left with hashes pending).
pub enum HashWanted<'a> {
    None,
    /// Every file, with every digest.
    All,
    /// Every file, with what sync needs: large files without their MD5 (filled in later by
    /// whoever calls [`Index::missing_md5`]), so a change reaches peers sooner.
    Sync,
    Only(&'a dyn Fn(&RelPath) -> bool),
}

impl HashWanted<'_> {
    fn wants(&self, p: &RelPath) -> bool {
        match self {
            HashWanted::None => false,
            HashWanted::All | HashWanted::Sync => true,
            HashWanted::Only(f) => f(p),
        }
    }
}

#[derive(Debug, Default)]
pub struct ScanSummary {
    /// Paths that got a new version (created, changed, deleted).
    pub changed: Vec<RelPath>,
    pub hashed_files: usize,
    pub hashed_bytes: u64,
    pub errors: Vec<String>,
}

/// Bring the index in line with the disk below `under`. `device` is this box's short id, used
/// to bump version vectors. Returns what changed.
pub fn scan(
    b: &BoxDir,
    index: &mut Index,
    device: u64,
    under: &RelPath,
    hash: HashWanted<'_>,
) -> anyhow::Result<ScanSummary> {
    let ignore = IgnoreRules::load(b);
    let disk = walk(&b.root, under, &ignore);
    let known = index.scan_view_under(under)?;
    let md5_now = !matches!(hash, HashWanted::Sync);
    let mut summary = ScanSummary::default();

    // Decide per path; hashing happens after, in parallel.
    enum Todo {
        /// New version: metadata differs for sure.
        Changed { entry: DiskEntry, hash: bool },
        /// Same size and mtime but a different ctime/inode: rehash to decide.
        Suspect(DiskEntry),
        /// Unchanged but not hashed yet.
        FillHash(DiskEntry),
    }
    let mut todo = Vec::new();
    let mut seen = HashSet::with_capacity(disk.len());
    for e in disk {
        seen.insert(e.path.clone());
        let want = e.kind == Kind::File && hash.wants(&e.path);
        match known.get(&e.path) {
            None => todo.push(Todo::Changed {
                entry: e,
                hash: want,
            }),
            Some(row) if row.deleted || row.kind != e.kind || row.mode != e.mode => {
                todo.push(Todo::Changed {
                    entry: e,
                    hash: want,
                })
            }
            Some(row) => match e.kind {
                Kind::Dir => {}
                Kind::Symlink => {
                    if row.target != e.target || row.mtime_ns != e.mtime_ns {
                        todo.push(Todo::Changed {
                            entry: e,
                            hash: false,
                        })
                    }
                }
                Kind::File => {
                    if row.size != e.stat.size || row.mtime_ns != e.mtime_ns {
                        todo.push(Todo::Changed {
                            entry: e,
                            hash: want,
                        })
                    } else if row.stat != Some(e.stat) && row.hashed {
                        if want {
                            todo.push(Todo::Suspect(e))
                        }
                    } else if want && (!row.hashed || (md5_now && !row.has_md5)) {
                        todo.push(Todo::FillHash(e))
                    }
                }
            },
        }
    }

    // Hash on every core while this thread writes the index: records that need no hashing go
    // first, hashed ones as their results arrive, so database work overlaps the hashing.
    let (plain, hashing): (Vec<&Todo>, Vec<&Todo>) = todo.iter().partition(|t| {
        !matches!(
            t,
            Todo::Changed { hash: true, .. } | Todo::Suspect(_) | Todo::FillHash(_)
        )
    });
    let to_hash: Vec<&DiskEntry> = hashing
        .iter()
        .map(|t| match t {
            Todo::Changed { entry, .. } | Todo::Suspect(entry) | Todo::FillHash(entry) => entry,
        })
        .collect();

    let apply = |ix: &Index,
                 seq: &mut SeqAlloc,
                 summary: &mut ScanSummary,
                 t: &Todo,
                 hashed: Option<&(ContentHashes, StatKey)>|
     -> anyhow::Result<()> {
        let (entry, is_suspect) = match t {
            Todo::Changed { entry, .. } => (entry, false),
            Todo::Suspect(e) => (e, true),
            Todo::FillHash(e) => (e, false),
        };
        let old = if known.contains_key(&entry.path) {
            ix.get(&entry.path)?
        } else {
            None
        };
        let (fill_only, content_same) = match (t, &old, hashed) {
            (Todo::FillHash(_), Some(_), _) => (true, true),
            (Todo::Suspect(_), Some(o), Some((h, _))) => (true, o.record.sha256 == Some(h.sha256)),
            (Todo::Suspect(_), _, None) => return Ok(()), // could not hash: decide next time
            _ => (false, false),
        };
        let mut rec = match (&old, fill_only && content_same) {
            (Some(o), true) => o.record.clone(),
            _ => new_record(entry, old.as_ref().map(|o| &o.record), device),
        };
        let mut stat = Some(entry.stat);
        if let Some((h, key)) = hashed {
            rec.md5 = h.md5;
            rec.sha256 = Some(h.sha256);
            rec.blocks = h.blocks.clone();
            rec.size = h.size;
            rec.mtime_ns = key.mtime_ns;
            stat = Some(*key);
        } else if entry.kind == Kind::File && !(fill_only && content_same) {
            rec.md5 = None;
            rec.sha256 = None;
            rec.blocks.clear();
            stat = None;
        }
        if is_suspect && content_same {
            if let Some((_, key)) = hashed {
                ix.set_stat(&entry.path, *key)?;
            }
            return Ok(());
        }
        if !(fill_only && content_same) {
            rec.sequence = seq.take();
            summary.changed.push(entry.path.clone());
        } else if matches!(t, Todo::FillHash(_))
            && hashed.is_some()
            && old.as_ref().is_some_and(|o| o.record.sha256.is_none())
        {
            // Hashes that arrive after the record was announced are news to peers (they cannot
            // pull a file without its blocks): a new sequence number, same version. A late MD5
            // is not: peers never use ours.
            rec.sequence = seq.take();
        }
        ix.put(&rec, stat)
    };

    std::thread::scope(|scope| {
        let results = spawn_hashers(scope, &b.root, &to_hash, md5_now);
        index.transaction(|ix| {
            let mut seq = ix.seq_alloc()?;
            for t in &plain {
                apply(ix, &mut seq, &mut summary, t, None)?;
            }
            for (i, r) in results {
                let t = hashing[i];
                match r {
                    Ok(h) => {
                        summary.hashed_files += 1;
                        summary.hashed_bytes += h.0.size;
                        apply(ix, &mut seq, &mut summary, t, Some(&h))?;
                    }
                    Err(e) => {
                        summary.errors.push(format!("{}: {e}", to_hash[i].path));
                        apply(ix, &mut seq, &mut summary, t, None)?;
                    }
                }
            }
            // Vanished paths become tombstones.
            for (path, row) in &known {
                if row.deleted || seen.contains(path) || !path.starts_with(under) {
                    continue;
                }
                if ignore.is_ignored(path, row.kind == Kind::Dir) {
                    // Ignored on this box now: keep the last record, don't announce a delete.
                    continue;
                }
                if let Some(old) = ix.get(path)? {
                    let mut rec = old.record;
                    rec.deleted = true;
                    rec.md5 = None;
                    rec.sha256 = None;
                    rec.blocks.clear();
                    rec.size = 0;
                    rec.version.bump(device);
                    rec.modified_by = device;
                    rec.sequence = seq.take();
                    ix.put(&rec, None)?;
                    summary.changed.push(path.clone());
                }
            }
            seq.commit(ix)
        })
    })?;
    Ok(summary)
}

/// Start one hashing worker per core over `entries`; results arrive as (input index, result).
fn spawn_hashers<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    root: &'env Path,
    entries: &'env [&'env DiskEntry],
    md5_now: bool,
) -> std::sync::mpsc::Receiver<(usize, HashResult)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .min(entries.len());
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..workers {
        let tx = tx.clone();
        let next = next.clone();
        scope.spawn(move || loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(e) = entries.get(i) else { return };
            let r = if md5_now {
                hash_file_stable(root, &e.path).map(|(h, k)| (h.into(), k))
            } else {
                hash_file_stable_for_sync(root, &e.path)
            };
            let r = r.map_err(|err| match err {
                HashError::Io(io) => io.to_string(),
                other => other.to_string(),
            });
            if tx.send((i, r)).is_err() {
                return;
            }
        });
    }
    rx
}

fn new_record(e: &DiskEntry, old: Option<&Record>, device: u64) -> Record {
    let mut version = old.map(|o| o.version.clone()).unwrap_or_default();
    version.bump(device);
    Record {
        path: e.path.clone(),
        kind: e.kind,
        size: if e.kind == Kind::File { e.stat.size } else { 0 },
        mtime_ns: e.mtime_ns,
        mode: e.mode,
        target: e.target.clone(),
        md5: None,
        sha256: None,
        blocks: Vec::new(),
        version,
        deleted: false,
        sequence: 0,
        modified_by: device,
    }
}

/// Outcome of hashing one file.
pub type HashResult = Result<(ContentHashes, StatKey), String>;

/// Hash files on every core; results in input order.
pub fn hash_many(root: &Path, entries: &[&DiskEntry]) -> Vec<(RelPath, HashResult)> {
    let mut out: Vec<Option<HashResult>> = (0..entries.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        for (i, r) in spawn_hashers(scope, root, entries, true) {
            out[i] = Some(r);
        }
    });
    entries
        .iter()
        .zip(out)
        .map(|(e, r)| {
            (
                e.path.clone(),
                r.unwrap_or_else(|| Err("not hashed".into())),
            )
        })
        .collect()
}

/// This box's short device id, cached in the index.
pub fn device_short(b: &BoxDir) -> anyhow::Result<u64> {
    Ok(b.identity().context("loading identity")?.id.short())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, BoxDir, Index) {
        let tmp = tempfile::tempdir().unwrap();
        let (b, _) = BoxDir::init(&tmp.path().join("box")).unwrap();
        let ix = Index::open(&b).unwrap();
        (tmp, b, ix)
    }

    fn rec(ix: &Index, p: &str) -> Record {
        ix.get(&RelPath::parse(p).unwrap()).unwrap().unwrap().record
    }

    #[test]
    fn versions_sequences_and_tombstones() {
        let (_t, b, mut ix) = setup();
        std::fs::write(b.root.join("f"), b"one").unwrap();
        std::fs::create_dir(b.root.join("d")).unwrap();
        std::os::unix::fs::symlink("f", b.root.join("l")).unwrap();
        let s = scan(&b, &mut ix, 7, &RelPath::root(), HashWanted::All).unwrap();
        assert_eq!(s.changed.len(), 3);
        let f1 = rec(&ix, "f");
        assert_eq!(f1.version.get(7), 1);
        assert!(f1.is_hashed());
        assert_eq!(rec(&ix, "l").target.as_deref(), Some("f"));
        // Nothing changed: no new versions, nothing rehashed.
        let s = scan(&b, &mut ix, 7, &RelPath::root(), HashWanted::All).unwrap();
        assert!(s.changed.is_empty() && s.hashed_files == 0);
        // A chmod (ctime changes, content equal) is a new version of the metadata only.
        std::fs::set_permissions(
            b.root.join("f"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let s = scan(&b, &mut ix, 7, &RelPath::root(), HashWanted::All).unwrap();
        assert_eq!(s.changed.len(), 1);
        let f2 = rec(&ix, "f");
        assert!(f2.sequence > f1.sequence && f2.version.get(7) > f1.version.get(7));
        assert_eq!(f2.sha256, f1.sha256);
        // Delete: a tombstone with a newer version.
        std::fs::remove_file(b.root.join("f")).unwrap();
        scan(&b, &mut ix, 7, &RelPath::root(), HashWanted::None).unwrap();
        let f3 = rec(&ix, "f");
        assert!(f3.deleted && f3.version.compare(&f2.version) == crate::model::VvOrder::Greater);
        // Ignored paths are not indexed; .mybox never is.
        std::fs::write(b.root.join(IGNORE_FILE), "*.tmp\nbuild/\n").unwrap();
        std::fs::write(b.root.join("x.tmp"), b"t").unwrap();
        std::fs::create_dir(b.root.join("build")).unwrap();
        std::fs::write(b.root.join("build/out"), b"o").unwrap();
        // A scan of the ignored paths themselves (what an inotify event asks for) skips them
        // too, as does the walk from the root.
        for p in ["x.tmp", "build/out", "build"] {
            scan(
                &b,
                &mut ix,
                7,
                &RelPath::parse(p).unwrap(),
                HashWanted::None,
            )
            .unwrap();
            assert!(
                ix.get(&RelPath::parse(p).unwrap()).unwrap().is_none(),
                "{p}"
            );
        }
        scan(&b, &mut ix, 7, &RelPath::root(), HashWanted::None).unwrap();
        assert!(ix.get(&RelPath::parse("x.tmp").unwrap()).unwrap().is_none());
        assert!(ix
            .get(&RelPath::parse("build/out").unwrap())
            .unwrap()
            .is_none());
        assert!(ix
            .get(&RelPath::parse(".myboxignore").unwrap())
            .unwrap()
            .is_some());
        assert!(ix
            .all()
            .unwrap()
            .iter()
            .all(|s| !s.record.path.as_str().starts_with(".mybox/")));
    }

    #[test]
    fn touched_file_with_same_content_keeps_hashes_and_rehash_on_change() {
        let (_t, b, mut ix) = setup();
        let f = b.root.join("f");
        std::fs::write(&f, b"aaaa").unwrap();
        scan(&b, &mut ix, 1, &RelPath::root(), HashWanted::All).unwrap();
        let before = rec(&ix, "f");
        // Same size, different content, mtime forced back: ctime still betrays the write.
        let mtime =
            filetime::FileTime::from_last_modification_time(&std::fs::metadata(&f).unwrap());
        std::fs::write(&f, b"bbbb").unwrap();
        filetime::set_file_mtime(&f, mtime).unwrap();
        let s = scan(&b, &mut ix, 1, &RelPath::root(), HashWanted::All).unwrap();
        assert_eq!(s.hashed_files, 1);
        let after = rec(&ix, "f");
        assert_ne!(after.sha256, before.sha256);
        assert!(after.version.compare(&before.version) == crate::model::VvOrder::Greater);
    }
}
