//! The one place where a path that came from outside (the network, a CLI argument naming a peer
//! file) becomes a path we may touch. Every peer-supplied path goes through [`RelPath::parse`];
//! every file system access under the store goes through [`resolve_no_follow`], which refuses to
//! cross a symlink, so a link planted in the store cannot lead a request outside it.

use std::fmt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Name of the metadata folder inside every box; never listed, served or synced.
pub const META_DIR: &str = ".mybox";
/// Longest path we accept (bytes), as Linux PATH_MAX.
pub const MAX_PATH_LEN: usize = 4096;
/// Longest single component, as Linux NAME_MAX.
pub const MAX_NAME_LEN: usize = 255;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("path is absolute: {0:?}")]
    Absolute(String),
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path contains '..': {0:?}")]
    ParentDir(String),
    #[error("path contains a backslash or control character: {0:?}")]
    BadChar(String),
    #[error("path is inside the metadata folder .mybox: {0:?}")]
    Meta(String),
    #[error("path too long ({0} bytes)")]
    TooLong(usize),
    #[error("path component too long ({0} bytes)")]
    NameTooLong(usize),
    #[error("path {0:?} goes through a symlink")]
    ThroughSymlink(String),
}

/// A validated, normalised relative path inside a box: `/`-separated, no empty, `.` or `..`
/// components, no NUL, never under `.mybox/`. The root of the box is the empty string.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(try_from = "String", into = "String")]
pub struct RelPath(String);

impl RelPath {
    /// The root of the box.
    pub fn root() -> Self {
        RelPath(String::new())
    }

    /// Validate a path given by a peer or a user. Leading `./` and repeated or trailing slashes
    /// are normalised away; anything that could name a place outside the store is refused.
    pub fn parse(raw: &str) -> Result<Self, PathError> {
        if raw.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong(raw.len()));
        }
        if raw.contains('\0') {
            return Err(PathError::Nul);
        }
        if raw.starts_with('/') {
            return Err(PathError::Absolute(raw.to_string()));
        }
        // Backslashes and control characters are legal on Linux but are the usual disguise of a
        // traversal (`..\..`) or a terminal escape; a sync tool has no need for them.
        if raw.chars().any(|c| c == '\\' || c.is_control()) {
            return Err(PathError::BadChar(raw.escape_debug().to_string()));
        }
        let mut parts: Vec<&str> = Vec::new();
        for part in raw.split('/') {
            match part {
                "" | "." => continue,
                ".." => return Err(PathError::ParentDir(raw.to_string())),
                p => {
                    if p.len() > MAX_NAME_LEN {
                        return Err(PathError::NameTooLong(p.len()));
                    }
                    parts.push(p)
                }
            }
        }
        if parts.is_empty() {
            return Err(PathError::Empty);
        }
        if parts[0] == META_DIR {
            return Err(PathError::Meta(raw.to_string()));
        }
        Ok(RelPath(parts.join("/")))
    }

    /// Like [`parse`](Self::parse) but the empty path (the root) is allowed.
    pub fn parse_or_root(raw: &str) -> Result<Self, PathError> {
        // Only "", "." and "./" spellings are the root: ".." and "..." are not (the first must be
        // refused, the second is an ordinary name).
        if !raw.starts_with('/') && raw.split('/').all(|c| c.is_empty() || c == ".") {
            return Ok(Self::root());
        }
        Self::parse(raw)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The last component (empty for the root).
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or("")
    }

    /// The parent directory; `None` for the root.
    pub fn parent(&self) -> Option<RelPath> {
        if self.0.is_empty() {
            return None;
        }
        Some(match self.0.rfind('/') {
            Some(i) => RelPath(self.0[..i].to_string()),
            None => RelPath::root(),
        })
    }

    /// `self/name`, validating `name` as one component.
    pub fn join(&self, name: &str) -> Result<RelPath, PathError> {
        if name.contains('/') {
            return Err(PathError::BadChar(name.to_string()));
        }
        if self.0.is_empty() {
            RelPath::parse(name)
        } else {
            RelPath::parse(&format!("{}/{}", self.0, name))
        }
    }

    /// Is `self` equal to `dir` or below it?
    pub fn starts_with(&self, dir: &RelPath) -> bool {
        dir.0.is_empty()
            || self.0 == dir.0
            || (self.0.starts_with(&dir.0) && self.0.as_bytes().get(dir.0.len()) == Some(&b'/'))
    }

    /// Components, root-first.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|s| !s.is_empty())
    }

    /// Build from a path relative to the store root as found on disk by a scan.
    pub fn from_fs(rel: &Path) -> Result<RelPath, PathError> {
        let mut s = String::new();
        for c in rel.components() {
            match c {
                Component::Normal(os) => {
                    let part = os
                        .to_str()
                        .ok_or_else(|| PathError::BadChar(os.to_string_lossy().into_owned()))?;
                    if !s.is_empty() {
                        s.push('/');
                    }
                    s.push_str(part);
                }
                Component::CurDir => {}
                _ => return Err(PathError::ParentDir(rel.display().to_string())),
            }
        }
        RelPath::parse(&s)
    }

    /// Where this path lives under `root`, without any symlink check (use
    /// [`resolve_no_follow`] for anything that opens the file).
    pub fn to_fs(&self, root: &Path) -> PathBuf {
        let mut p = root.to_path_buf();
        for c in self.components() {
            p.push(c);
        }
        p
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl TryFrom<String> for RelPath {
    type Error = PathError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        RelPath::parse_or_root(&s)
    }
}

impl From<RelPath> for String {
    fn from(p: RelPath) -> String {
        p.0
    }
}

/// Map `rel` under `root`, refusing if any *parent* component is a symlink (the last component
/// may be one: callers that open it use `O_NOFOLLOW` or `symlink_metadata`). Missing components
/// are fine: the caller may be about to create them.
pub fn resolve_no_follow(root: &Path, rel: &RelPath) -> Result<PathBuf, PathError> {
    let mut p = root.to_path_buf();
    let comps: Vec<&str> = rel.components().collect();
    for (i, c) in comps.iter().enumerate() {
        p.push(c);
        if i + 1 < comps.len() {
            if let Ok(md) = std::fs::symlink_metadata(&p) {
                if md.file_type().is_symlink() {
                    return Err(PathError::ThroughSymlink(rel.to_string()));
                }
            }
        }
    }
    Ok(p)
}

/// Did [`open_beneath`] refuse because the path goes through a symlink?
pub fn is_through_symlink(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<PathError>())
        .is_some_and(|p| matches!(p, PathError::ThroughSymlink(_)))
}

/// Open `rel` under `root` for reading so that *no* component may be a symlink and the result
/// cannot lie outside `root`, checked by the kernel at open time (`openat2` with
/// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), so a directory swapped for a link between a check and
/// the open cannot redirect the read. Falls back to check-then-open on kernels without openat2.
pub fn open_beneath(root: &Path, rel: &RelPath) -> std::io::Result<std::fs::File> {
    RootDir::open(root)?.open_file(rel)
}

/// A store root opened once (`O_PATH`), to open many files beneath it as [`open_beneath`] does
/// without walking the root's own path and closing it again for each.
pub struct RootDir {
    fd: std::os::fd::OwnedFd,
    root: PathBuf,
}

impl std::os::fd::AsRawFd for RootDir {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl RootDir {
    pub fn open(root: &Path) -> std::io::Result<RootDir> {
        use std::ffi::CString;
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        let root_c = CString::new(root.as_os_str().as_bytes()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in store path")
        })?;
        // SAFETY: a NUL-terminated path; the descriptor is owned exactly once.
        let fd = unsafe {
            libc::open(
                root_c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RootDir {
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
            root: root.to_path_buf(),
        })
    }

    /// Open `rel` for reading, refusing a symlink anywhere on the way (see [`open_beneath`]).
    pub fn open_file(&self, rel: &RelPath) -> std::io::Result<std::fs::File> {
        use std::ffi::CString;
        use std::os::fd::{AsRawFd, FromRawFd};
        let rel_c = CString::new(if rel.is_root() { "." } else { rel.as_str() })
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))?;
        // `struct open_how` of openat2(2); libc's is non-exhaustive, so spell it out.
        #[repr(C)]
        struct OpenHow {
            flags: u64,
            mode: u64,
            resolve: u64,
        }
        let how = OpenHow {
            flags: (libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64,
            mode: 0,
            resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS,
        };
        // SAFETY: a valid directory descriptor, a NUL-terminated path and an `open_how` of the
        // size passed; the returned descriptor is owned exactly once.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.fd.as_raw_fd(),
                rel_c.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd >= 0 {
            // SAFETY: as above.
            return Ok(unsafe { std::fs::File::from_raw_fd(fd as i32) });
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENOSYS) => {}
            Some(libc::ELOOP) | Some(libc::EXDEV) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    PathError::ThroughSymlink(rel.to_string()),
                ))
            }
            _ => return Err(err),
        }
        let full = resolve_no_follow(&self.root, rel)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::PermissionDenied, e))?;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_normalises() {
        assert_eq!(RelPath::parse("a/b.txt").unwrap().as_str(), "a/b.txt");
        assert_eq!(RelPath::parse("./a//b/").unwrap().as_str(), "a/b");
        assert_eq!(
            RelPath::parse("dir with space/ünï.txt").unwrap().as_str(),
            "dir with space/ünï.txt"
        );
        assert_eq!(
            RelPath::parse(".myboxignore").unwrap().as_str(),
            ".myboxignore"
        );
        assert_eq!(RelPath::parse("x/.mybox/y").unwrap().as_str(), "x/.mybox/y");
    }

    #[test]
    fn refuses_escapes() {
        for bad in [
            "../../etc/passwd",
            "a/../../b",
            "..",
            "/etc/passwd",
            "a\0b",
            "",
            "/",
            ".",
            ".mybox/config.toml",
            "./.mybox",
            "..\\..\\etc",
            "a\nb",
        ] {
            assert!(RelPath::parse(bad).is_err(), "accepted {bad:?}");
        }
        assert!(RelPath::parse(&"a".repeat(300)).is_err());
        assert!(RelPath::parse(&"a/".repeat(3000)).is_err());
    }

    #[test]
    fn parent_join_prefix() {
        let p = RelPath::parse("a/b/c").unwrap();
        assert_eq!(p.parent().unwrap().as_str(), "a/b");
        assert_eq!(p.file_name(), "c");
        assert_eq!(
            RelPath::parse("a").unwrap().parent().unwrap(),
            RelPath::root()
        );
        assert!(p.starts_with(&RelPath::parse("a/b").unwrap()));
        assert!(!RelPath::parse("a/bc")
            .unwrap()
            .starts_with(&RelPath::parse("a/b").unwrap()));
        assert!(RelPath::root().join("x/y").is_err());
        assert!(RelPath::root().join("..").is_err());
    }

    #[test]
    fn root_spellings() {
        for root in ["", ".", "./", "./.", ".//./"] {
            assert!(RelPath::parse_or_root(root).unwrap().is_root(), "{root:?}");
        }
        for bad in ["..", "../", "./..", "/", "/.", "a/../.."] {
            assert!(RelPath::parse_or_root(bad).is_err(), "accepted {bad:?}");
        }
        assert_eq!(RelPath::parse_or_root("...").unwrap().as_str(), "...");
        let dots: Result<RelPath, _> = serde_json::from_str("\"..\"");
        assert!(dots.is_err());
    }

    #[test]
    fn serde_validates() {
        let ok: Result<RelPath, _> = serde_json::from_str("\"a/b\"");
        assert!(ok.is_ok());
        let bad: Result<RelPath, _> = serde_json::from_str("\"../x\"");
        assert!(bad.is_err());
    }

    #[test]
    fn symlink_parent_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("link")).unwrap();
        let through = RelPath::parse("link/passwd").unwrap();
        assert!(resolve_no_follow(dir.path(), &through).is_err());
        let fine = RelPath::parse("real/x").unwrap();
        assert!(resolve_no_follow(dir.path(), &fine).is_ok());
        // The link itself may be named (it is synced as a link, never followed).
        assert!(resolve_no_follow(dir.path(), &RelPath::parse("link").unwrap()).is_ok());
        // The kernel-checked open refuses links anywhere in the path, including the last part.
        std::fs::write(dir.path().join("real/x"), b"x").unwrap();
        std::os::unix::fs::symlink("x", dir.path().join("real/lx")).unwrap();
        assert!(open_beneath(dir.path(), &fine).is_ok());
        assert!(open_beneath(dir.path(), &through).is_err());
        assert!(open_beneath(dir.path(), &RelPath::parse("real/lx").unwrap()).is_err());
    }
}
