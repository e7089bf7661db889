//! The query commands answered from a box's own index and store: what `index ...` and
//! `hash ...` return, whether asked locally (`--local`) or by a peer over the network.

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
}

impl LocalBox {
    pub fn open(dir: BoxDir) -> anyhow::Result<LocalBox> {
        let index = Index::open(&dir)?;
        let device = dir.identity()?.id.short();
        Ok(LocalBox {
            dir,
            index: Mutex::new(index),
            device,
        })
    }

    fn index(&self) -> Result<std::sync::MutexGuard<'_, Index>, QueryError> {
        self.index
            .lock()
            .map_err(|_| QueryError::new(ErrorCode::Internal, "index lock poisoned"))
    }

    /// `index longlist|shortlist|regex`: every matching path (files, dirs, symlinks) with size,
    /// mtime, mode and mime type. The store is rescanned first (stat only, no hashing).
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<EntryInfo>, QueryError> {
        let f = compile(filter)?;
        let mut ix = self.index()?;
        let under = match &f {
            Compiled::Path(p) => p.clone(),
            _ => RelPath::root(),
        };
        scan::scan(&self.dir, &mut ix, self.device, &under, HashWanted::None)?;
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
        let mut ix = self.index()?;
        let under = match &f {
            Compiled::Path(p) => p.clone(),
            _ => RelPath::root(),
        };
        let want = |p: &RelPath| match &f {
            Compiled::All | Compiled::Range(..) => true,
            Compiled::Regex(re) => re.is_match(p.as_str()),
            Compiled::Path(x) => x == p,
        };
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
