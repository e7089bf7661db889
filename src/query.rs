//! The query commands answered from a box's own index and store: what `index ...` and
//! `hash ...` return, whether asked locally (`--local`) or by a peer over the network.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use regex::RegexBuilder;

use crate::config::BoxDir;
use crate::index::Index;
use crate::model::{EntryInfo, Kind};
use crate::paths::RelPath;
use crate::protocol::{ErrorCode, ListFilter};
use crate::scan::{self, HashWanted};

/// Longest regex pattern accepted, and the compiled-size bound (the regex crate matches in
/// linear time, so size is the only knob a hostile pattern could turn).
pub const MAX_REGEX_LEN: usize = 1024;
pub const REGEX_SIZE_LIMIT: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct QueryError {
    pub code: ErrorCode,
    pub message: String,
}

impl QueryError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        QueryError {
            code,
            message: message.into(),
        }
    }
}

impl From<anyhow::Error> for QueryError {
    fn from(e: anyhow::Error) -> Self {
        QueryError::new(ErrorCode::Io, format!("{e:#}"))
    }
}

pub fn compile_regex(p: &str) -> Result<regex::Regex, QueryError> {
    if p.len() > MAX_REGEX_LEN {
        return Err(QueryError::new(
            ErrorCode::BadRequest,
            format!(
                "regex is {} bytes long; the limit is {MAX_REGEX_LEN}",
                p.len()
            ),
        ));
    }
    RegexBuilder::new(p)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .nest_limit(64)
        .build()
        .map_err(|e| {
            let msg = e.to_string();
            let first = msg
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or(&msg)
                .trim()
                .to_string();
            QueryError::new(ErrorCode::BadRequest, format!("bad regex {p:?}: {first}"))
        })
}

/// A filter ready to apply.
enum Compiled {
    All,
    Range(i64, i64),
    Regex(regex::Regex),
    Path(RelPath),
}

fn compile(f: &ListFilter) -> Result<Compiled, QueryError> {
    Ok(match f {
        ListFilter::All => Compiled::All,
        ListFilter::MtimeRange { start_ns, end_ns } => {
            if start_ns > end_ns {
                return Err(QueryError::new(ErrorCode::BadRequest, "START is after END"));
            }
            Compiled::Range(*start_ns, *end_ns)
        }
        ListFilter::Regex(p) => Compiled::Regex(compile_regex(p)?),
        ListFilter::Path(p) => {
            if p.is_root() {
                return Err(QueryError::new(ErrorCode::BadPath, "empty path"));
            }
            Compiled::Path(p.clone())
        }
    })
}

/// Everything a box needs to answer queries about itself.
pub struct LocalBox {
    pub dir: BoxDir,
    pub index: Mutex<Index>,
    pub device: u64,
    /// Whole-tree query scans started so far: stat-only (`list`) and hashing every file (`hash`).
    /// Queries that queue on the index lock while such a scan runs share the next one.
    scans: [AtomicU64; 2],
}

const LIST_SCANS: usize = 0;
const HASH_SCANS: usize = 1;

impl LocalBox {
    pub fn open(dir: BoxDir) -> anyhow::Result<LocalBox> {
        let index = Index::open(&dir)?;
        let device = dir.identity()?.id.short();
        Ok(LocalBox {
            dir,
            index: Mutex::new(index),
            device,
            scans: Default::default(),
        })
    }

    fn index(&self) -> Result<std::sync::MutexGuard<'_, Index>, QueryError> {
        self.index
            .lock()
            .map_err(|_| QueryError::new(ErrorCode::Internal, "index lock poisoned"))
    }

    /// `index longlist|shortlist|regex`: every matching path (files, dirs, symlinks) with size,
    /// mtime, mode and mime type. The store is rescanned first (stat only, no hashing).
    /// Take the index lock for a query that needs a scan of the whole tree of kind `kind`
    /// (`LIST_SCANS` is also satisfied by a `HASH_SCANS` scan). Returns the guard and whether a
    /// scan is still needed: not when one started after this query arrived, because it ran under
    /// the lock we now hold and so finished, and saw every change made before we arrived. This
    /// keeps 50 clients asking at once from running 50 scans of 100,000 files in a row.
    fn lock_for_scan(
        &self,
        kind: usize,
    ) -> Result<(std::sync::MutexGuard<'_, Index>, bool), QueryError> {
        let seen = |s: &Self| -> u64 {
            if kind == LIST_SCANS {
                s.scans[LIST_SCANS].load(Ordering::SeqCst)
                    + s.scans[HASH_SCANS].load(Ordering::SeqCst)
            } else {
                s.scans[HASH_SCANS].load(Ordering::SeqCst)
            }
        };
        let arrived = seen(self);
        let ix = self.index()?;
        if seen(self) != arrived {
            return Ok((ix, false));
        }
        self.scans[kind].fetch_add(1, Ordering::SeqCst);
        Ok((ix, true))
    }

    pub fn list(&self, filter: &ListFilter) -> Result<Vec<EntryInfo>, QueryError> {
        let f = compile(filter)?;
        let under = match &f {
            Compiled::Path(p) => p.clone(),
            _ => RelPath::root(),
        };
        let (mut ix, needed) = if under.is_root() {
            self.lock_for_scan(LIST_SCANS)?
        } else {
            (self.index()?, true)
        };
        if needed {
            scan::scan(&self.dir, &mut ix, self.device, &under, HashWanted::None)?;
        }
        let out = select(&ix, &f, false)?;
        if let Compiled::Path(p) = &f {
            if out.is_empty() {
                return Err(QueryError::new(
                    ErrorCode::NotFound,
                    format!("{p}: no such file"),
                ));
            }
        }
        Ok(out)
    }

    /// `hash verify|checkall`: MD5 and SHA-256 of every matching regular file. Files whose stat
    /// key is unchanged since they were last hashed are not read again.
    pub fn hash(&self, filter: &ListFilter) -> Result<Vec<EntryInfo>, QueryError> {
        let f = compile(filter)?;
        let under = match &f {
            Compiled::Path(p) => p.clone(),
            _ => RelPath::root(),
        };
        // Only a scan that hashes every file can stand in for another.
        let (mut ix, needed) = if matches!(f, Compiled::All | Compiled::Range(..)) {
            self.lock_for_scan(HASH_SCANS)?
        } else {
            (self.index()?, true)
        };
        let want = |p: &RelPath| match &f {
            Compiled::All | Compiled::Range(..) => true,
            Compiled::Regex(re) => re.is_match(p.as_str()),
            Compiled::Path(x) => x == p,
        };
        if needed {
            let summary = scan::scan(
                &self.dir,
                &mut ix,
                self.device,
                &under,
                HashWanted::Only(&want),
            )?;
            for e in &summary.errors {
                tracing::warn!("hashing: {e}");
            }
        }
        if let Compiled::Path(p) = &f {
            match ix.get(p)?.map(|s| s.record).filter(|r| !r.deleted) {
                None => {
                    return Err(QueryError::new(
                        ErrorCode::NotFound,
                        format!("{p}: no such file"),
                    ))
                }
                Some(r) if r.kind != Kind::File => {
                    return Err(QueryError::new(
                        ErrorCode::NotAFile,
                        format!("{p}: is a {}, not a regular file", r.kind.as_str()),
                    ))
                }
                Some(r) if !r.is_hashed() => {
                    return Err(QueryError::new(
                        ErrorCode::Busy,
                        format!("{p}: could not be hashed (changing?)"),
                    ))
                }
                Some(r) => return Ok(vec![EntryInfo::from_record(&r, true)]),
            }
        }
        select(&ix, &f, true)
    }
}

/// The index's live entries that pass `f`.
fn select(ix: &Index, f: &Compiled, hashes: bool) -> Result<Vec<EntryInfo>, QueryError> {
    match f {
        Compiled::Path(p) => Ok(ix
            .get(p)?
            .map(|s| s.record)
            .filter(|r| !r.deleted)
            .map(|r| EntryInfo::from_record(&r, hashes))
            .into_iter()
            .collect()),
        Compiled::Range(a, b) => Ok(ix.entries(Some((*a, *b)), hashes)?),
        Compiled::All => Ok(ix.entries(None, hashes)?),
        Compiled::Regex(re) => {
            let mut all = ix.entries(None, hashes)?;
            all.retain(|e| re.is_match(e.path.as_str()));
            Ok(all)
        }
    }
}
