//! The one error type of the vfs: an errno for the kernel plus a message for the log. Every
//! failure inside the core becomes a [`VfsError`] here, so the fuser adapter only ever calls
//! `reply.error(e.errno())`.

use std::fmt;

use crate::paths::PathError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfsError {
    errno: i32,
    message: String,
}

pub type VfsResult<T> = Result<T, VfsError>;

impl VfsError {
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        VfsError {
            errno,
            message: message.into(),
        }
    }

    pub fn errno(&self) -> i32 {
        self.errno
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// An I/O error with the context of what we were doing; the errno is kept as is.
    pub fn io(context: impl fmt::Display, e: std::io::Error) -> Self {
        VfsError::new(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!("{context}: {e}"),
        )
    }

    pub fn enoent(what: impl fmt::Display) -> Self {
        VfsError::new(libc::ENOENT, format!("{what}: no such file or directory"))
    }

    /// Errors that are part of normal operation (ENOENT on lookup, EEXIST, ...) log at debug;
    /// anything else is worth a warning.
    pub fn is_expected(&self) -> bool {
        matches!(
            self.errno,
            libc::ENOENT
                | libc::EEXIST
                | libc::ENOTEMPTY
                | libc::EACCES
                | libc::EPERM
                | libc::ENOTDIR
                | libc::EISDIR
                | libc::ENAMETOOLONG
                | libc::EINVAL
                | libc::ENODATA
                | libc::ENOTSUP
                | libc::EXDEV
                | libc::ELOOP
        )
    }
}

impl fmt::Display for VfsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (errno {})", self.message, self.errno)
    }
}

impl std::error::Error for VfsError {}

impl From<std::io::Error> for VfsError {
    fn from(e: std::io::Error) -> Self {
        VfsError::new(e.raw_os_error().unwrap_or(libc::EIO), e.to_string())
    }
}

impl From<PathError> for VfsError {
    fn from(e: PathError) -> Self {
        let errno = match e {
            PathError::TooLong(_) | PathError::NameTooLong(_) => libc::ENAMETOOLONG,
            PathError::Meta(_) => libc::EPERM,
            PathError::ThroughSymlink(_) => libc::ELOOP,
            _ => libc::EINVAL,
        };
        VfsError::new(errno, e.to_string())
    }
}

impl From<anyhow::Error> for VfsError {
    fn from(e: anyhow::Error) -> Self {
        VfsError::new(libc::EIO, format!("{e:#}"))
    }
}
