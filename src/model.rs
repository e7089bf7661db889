//! Plain data shared by every layer: what a path is (kind, size, mtime, mode, hashes), version
//! vectors, and the records the index keeps.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::paths::RelPath;

/// Files are cut into blocks of this many bytes for delta transfer (Syncthing's smallest size).
pub const BLOCK_SIZE: u64 = 128 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

impl Kind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
        }
    }
    pub fn to_i64(self) -> i64 {
        match self {
            Kind::File => 0,
            Kind::Dir => 1,
            Kind::Symlink => 2,
        }
    }
    pub fn from_i64(v: i64) -> Option<Kind> {
        match v {
            0 => Some(Kind::File),
            1 => Some(Kind::Dir),
            2 => Some(Kind::Symlink),
            _ => None,
        }
    }
}

/// How two version vectors relate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VvOrder {
    Equal,
    /// `self` has seen everything `other` has, and more.
    Greater,
    Lesser,
    Concurrent,
}

/// A version vector: for each device (by its short id), how many changes of this path it made.
/// Kept sorted by device so equality is structural.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionVector(pub Vec<(u64, u64)>);

impl VersionVector {
    pub fn new() -> Self {
        Self(Vec::new())
    }

    pub fn get(&self, dev: u64) -> u64 {
        self.0
            .iter()
            .find(|(d, _)| *d == dev)
            .map(|(_, c)| *c)
            .unwrap_or(0)
    }

    /// Record one more change by `dev`, ordered after everything this vector has seen.
    pub fn bump(&mut self, dev: u64) {
        let next = self.0.iter().map(|(_, c)| *c).max().unwrap_or(0) + 1;
        match self.0.binary_search_by_key(&dev, |(d, _)| *d) {
            Ok(i) => self.0[i].1 = next,
            Err(i) => self.0.insert(i, (dev, next)),
        }
    }

    /// Element-wise maximum.
    pub fn merge(&self, other: &VersionVector) -> VersionVector {
        let mut out = self.0.clone();
        for &(d, c) in &other.0 {
            match out.binary_search_by_key(&d, |(x, _)| *x) {
                Ok(i) => out[i].1 = out[i].1.max(c),
                Err(i) => out.insert(i, (d, c)),
            }
        }
        VersionVector(out)
    }

    pub fn compare(&self, other: &VersionVector) -> VvOrder {
        let mut greater = false;
        let mut lesser = false;
        let mut devs: Vec<u64> = self
            .0
            .iter()
            .chain(other.0.iter())
            .map(|(d, _)| *d)
            .collect();
        devs.sort_unstable();
        devs.dedup();
        for d in devs {
            match self.get(d).cmp(&other.get(d)) {
                Ordering::Greater => greater = true,
                Ordering::Less => lesser = true,
                Ordering::Equal => {}
            }
        }
        match (greater, lesser) {
            (false, false) => VvOrder::Equal,
            (true, false) => VvOrder::Greater,
            (false, true) => VvOrder::Lesser,
            (true, true) => VvOrder::Concurrent,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One path's entry in an index (ours or a peer's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub path: RelPath,
    pub kind: Kind,
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Permission bits (0o7777).
    pub mode: u32,
    /// Target of a symlink.
    pub target: Option<String>,
    pub md5: Option<[u8; 16]>,
    pub sha256: Option<[u8; 32]>,
    /// SHA-256 of each [`BLOCK_SIZE`] block of a file; empty when not hashed yet.
    pub blocks: Vec<[u8; 32]>,
    pub version: VersionVector,
    pub deleted: bool,
    /// Position in the owner's change sequence (for incremental index exchange).
    pub sequence: u64,
    /// Short id of the device that made this version.
    pub modified_by: u64,
}

impl Record {
    /// Hashed enough to sync: the file's SHA-256 (and its blocks). MD5, which only the query
    /// commands report, may follow later for large files.
    pub fn is_hashed(&self) -> bool {
        self.kind != Kind::File || self.sha256.is_some()
    }

    /// A live file synced on its SHA-256 whose MD5 (for the query commands) is still to be
    /// computed: large files are announced after one pass and their MD5 filled in afterwards.
    pub fn md5_pending(&self) -> bool {
        self.kind == Kind::File && !self.deleted && self.sha256.is_some() && self.md5.is_none()
    }

    /// Same content and metadata (what a conflict check calls "identical").
    pub fn same_content(&self, other: &Record) -> bool {
        self.kind == other.kind
            && self.deleted == other.deleted
            && match self.kind {
                Kind::File => {
                    self.size == other.size && self.sha256.is_some() && self.sha256 == other.sha256
                }
                Kind::Symlink => self.target == other.target,
                Kind::Dir => true,
            }
    }
}

/// What a query command answers about one path (the `--json` shape is derived from this).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryInfo {
    pub path: RelPath,
    pub kind: Kind,
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    pub mime: String,
    pub target: Option<String>,
    pub md5: Option<[u8; 16]>,
    pub sha256: Option<[u8; 32]>,
}

impl EntryInfo {
    pub fn from_record(r: &Record, with_hashes: bool) -> EntryInfo {
        EntryInfo {
            path: r.path.clone(),
            kind: r.kind,
            size: r.size,
            mtime_ns: r.mtime_ns,
            mode: r.mode,
            mime: mime_for(&r.path, r.kind),
            target: r.target.clone(),
            md5: if with_hashes { r.md5 } else { None },
            sha256: if with_hashes { r.sha256 } else { None },
        }
    }
}

pub fn mime_for(path: &RelPath, kind: Kind) -> String {
    match kind {
        Kind::Dir => "inode/directory".to_string(),
        Kind::Symlink => "inode/symlink".to_string(),
        Kind::File => mime_guess::from_path(path.as_str())
            .first_raw()
            .unwrap_or("application/octet-stream")
            .to_string(),
    }
}

pub fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn vv_basic() {
        let mut a = VersionVector::new();
        let b = VersionVector::new();
        assert_eq!(a.compare(&b), VvOrder::Equal);
        a.bump(1);
        assert_eq!(a.compare(&b), VvOrder::Greater);
        assert_eq!(b.compare(&a), VvOrder::Lesser);
        let mut c = a.clone();
        c.bump(2);
        a.bump(1);
        assert_eq!(a.compare(&c), VvOrder::Concurrent);
        let m = a.merge(&c);
        assert_eq!(m.compare(&a), VvOrder::Greater);
        assert_eq!(m.compare(&c), VvOrder::Greater);
    }

    fn vv() -> impl Strategy<Value = VersionVector> {
        proptest::collection::btree_map(0u64..4, 1u64..5, 0..4)
            .prop_map(|m| VersionVector(m.into_iter().collect()))
    }

    proptest! {
        #[test]
        fn vv_compare_antisymmetric(a in vv(), b in vv()) {
            let ab = a.compare(&b);
            let ba = b.compare(&a);
            let expect = match ab {
                VvOrder::Equal => VvOrder::Equal,
                VvOrder::Greater => VvOrder::Lesser,
                VvOrder::Lesser => VvOrder::Greater,
                VvOrder::Concurrent => VvOrder::Concurrent,
            };
            prop_assert_eq!(ba, expect);
        }

        #[test]
        fn vv_merge_dominates(a in vv(), b in vv()) {
            let m = a.merge(&b);
            prop_assert!(matches!(m.compare(&a), VvOrder::Greater | VvOrder::Equal));
            prop_assert!(matches!(m.compare(&b), VvOrder::Greater | VvOrder::Equal));
        }

        #[test]
        fn vv_bump_is_newer(a in vv(), d in 0u64..4) {
            let mut n = a.clone();
            n.bump(d);
            prop_assert_eq!(n.compare(&a), VvOrder::Greater);
        }
    }
}
