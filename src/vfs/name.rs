//! The one check of a name the kernel hands us (one path component), before it becomes part of
//! a [`RelPath`].

use std::ffi::OsStr;

use crate::paths::{RelPath, MAX_NAME_LEN, META_DIR};
use crate::scan::PART_SUFFIX;

use super::error::{VfsError, VfsResult};

/// A single path component that may name something in the mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidName<'a>(&'a str);

impl<'a> ValidName<'a> {
    /// Refuse empty, `.`, `..`, anything with `/` or NUL (EINVAL), over 255 bytes
    /// (ENAMETOOLONG), and names that are not UTF-8 (EINVAL: the index and the wire protocol
    /// carry paths as strings).
    pub fn parse(raw: &'a OsStr) -> VfsResult<Self> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = raw.as_bytes();
        if bytes.len() > MAX_NAME_LEN {
            return Err(VfsError::new(
                libc::ENAMETOOLONG,
                format!("name is {} bytes long", bytes.len()),
            ));
        }
        let s = raw
            .to_str()
            .ok_or_else(|| VfsError::new(libc::EINVAL, format!("name {raw:?} is not UTF-8")))?;
        if s.is_empty() || s == "." || s == ".." || s.contains('/') || s.contains('\0') {
            return Err(VfsError::new(libc::EINVAL, format!("bad name {s:?}")));
        }
        Ok(ValidName(s))
    }

    pub fn as_str(&self) -> &'a str {
        self.0
    }

    /// Names the mount never shows: partial downloads staged by the sync engine.
    pub fn is_hidden(&self) -> bool {
        self.0.ends_with(PART_SUFFIX)
    }

    /// `dir/name` as a store path; `.mybox` at the root is refused with EPERM.
    pub fn join(&self, dir: &RelPath) -> VfsResult<RelPath> {
        if dir.is_root() && self.0 == META_DIR {
            return Err(VfsError::new(
                libc::EPERM,
                "the .mybox metadata folder is not part of the mount",
            ));
        }
        Ok(dir.join(self.0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let ok = |s: &str| ValidName::parse(OsStr::new(s)).is_ok();
        assert!(ok("a.txt"));
        assert!(!ok(""));
        assert!(!ok("."));
        assert!(!ok(".."));
        assert!(!ok("a/b"));
        let long = "x".repeat(256);
        assert_eq!(
            ValidName::parse(OsStr::new(&long)).unwrap_err().errno(),
            libc::ENAMETOOLONG
        );
        let meta = ValidName::parse(OsStr::new(".mybox")).unwrap();
        assert_eq!(
            meta.join(&RelPath::root()).unwrap_err().errno(),
            libc::EPERM
        );
        assert!(meta.join(&RelPath::parse("sub").unwrap()).is_ok());
    }
}
