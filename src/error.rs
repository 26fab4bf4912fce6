//! klon's error type: a kind a caller can act on, plus what and where.
//!
//! Every error carries enough context to tell the user what failed and what
//! to do next; `exit_code()` maps the kind to the documented exit status.

use std::path::{Path, PathBuf};

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, grouped by what a user (or the wizard) does about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The command line or an argument is wrong.
    #[error("{0}")]
    Usage(String),

    /// Reading or writing a disk, a file or the image drive failed.
    #[error("{what} {path}{at}: {source}", path = .path.display(), at = fmt_offset(*.offset))]
    Io {
        /// The operation, e.g. "reading source disk".
        what: String,
        /// The file or device involved.
        path: PathBuf,
        /// Byte offset within that file or device, when known.
        offset: Option<u64>,
        /// The underlying OS error.
        #[source]
        source: std::io::Error,
    },

    /// The image is damaged, incomplete or not a klon image: a checksum,
    /// size or structure check failed.
    #[error("image check failed: {0}")]
    Corrupt(String),

    /// Read-back after a restore found different data on the target.
    #[error("verification after restore failed: {0}")]
    VerifyAfter(String),

    /// klon refused to do something that could lose data.
    #[error("refused: {0}")]
    Refused(String),

    /// The user cancelled at a confirmation.
    #[error("cancelled: {0}")]
    Cancelled(String),

    /// A disk structure (partition table, filesystem) klon cannot handle.
    #[error("{0}")]
    Unsupported(String),

    /// An encrypted repository's passphrase or recovery key is wrong or
    /// missing.
    #[error("{0}")]
    Key(String),
}

fn fmt_offset(offset: Option<u64>) -> String {
    match offset {
        Some(o) => format!(" at byte offset {o}"),
        None => String::new(),
    }
}

/// Exit codes documented in the README.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// An unexpected failure or an unsupported layout.
    pub const FAILURE: i32 = 1;
    /// Bad command line or arguments.
    pub const USAGE: i32 = 2;
    /// I/O error on a disk, file or the image drive.
    pub const IO: i32 = 3;
    /// Image verification failed (corrupt, incomplete, read-back mismatch).
    pub const VERIFY: i32 = 4;
    /// Refused for safety, or cancelled at a confirmation.
    pub const REFUSED: i32 = 5;
    /// An encrypted repository's passphrase (or recovery key) is wrong or missing.
    pub const KEY: i32 = 6;
}

impl Error {
    /// Builds an I/O error with its context, and for the errors a user can
    /// do something about (a full or read-only drive) what to do.
    pub fn io(what: impl Into<String>, path: impl AsRef<Path>, offset: Option<u64>, source: std::io::Error) -> Self {
        // A block device says ENOSPC for a write past its end: not a full drive.
        let on_a_filesystem = || {
            use std::os::unix::fs::FileTypeExt;
            std::fs::metadata(path.as_ref()).map_or(true, |m| !m.file_type().is_block_device())
        };
        let advice = match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) if on_a_filesystem() => {
                Some("the drive it is on is full: make room there or use a larger drive")
            }
            Some(libc::EACCES) => {
                Some("klon is not allowed to use it: run klon as root (sudo), or change its permissions")
            }
            // A filesystem the kernel switched to read-only after an I/O
            // error says EROFS too: the drive may be failing.
            Some(libc::EROFS) => Some(
                "the drive is read-only (write-protected, mounted read-only, or switched to read-only by the \
                 kernel after an error on it: see `dmesg`): use one that can be written",
            ),
            _ => None,
        };
        let source = match advice {
            Some(a) => std::io::Error::new(source.kind(), format!("{source}; {a}")),
            None => source,
        };
        Error::Io { what: what.into(), path: path.as_ref().to_path_buf(), offset, source }
    }

    /// Adds a sentence to the message, keeping the kind (and exit code).
    pub fn with_note(self, note: &str) -> Error {
        match self {
            Error::Usage(m) => Error::Usage(format!("{m}; {note}")),
            Error::Io { what, path, offset, source } => Error::Io {
                what,
                path,
                offset,
                source: std::io::Error::new(source.kind(), format!("{source}; {note}")),
            },
            Error::Corrupt(m) => Error::Corrupt(format!("{m}; {note}")),
            Error::VerifyAfter(m) => Error::VerifyAfter(format!("{m}; {note}")),
            Error::Refused(m) => Error::Refused(format!("{m}; {note}")),
            Error::Cancelled(m) => Error::Cancelled(format!("{m}; {note}")),
            Error::Unsupported(m) => Error::Unsupported(format!("{m}; {note}")),
            Error::Key(m) => Error::Key(format!("{m}; {note}")),
        }
    }

    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) => exit::USAGE,
            Error::Io { .. } => exit::IO,
            Error::Corrupt(_) | Error::VerifyAfter(_) => exit::VERIFY,
            Error::Refused(_) | Error::Cancelled(_) => exit::REFUSED,
            Error::Unsupported(_) => exit::FAILURE,
            Error::Key(_) => exit::KEY,
        }
    }
}

/// Shorthand: `io_ctx("reading", path, Some(off))` as a closure for `map_err`.
pub fn io_ctx<'a>(what: &'a str, path: &'a Path, offset: Option<u64>) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |e| Error::io(what, path, offset, e)
}
