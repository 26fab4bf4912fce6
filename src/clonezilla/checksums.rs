//! Checksum files Clonezilla may write beside the image: MD5SUMS, SHA1SUMS,
//! B2SUMS, B3SUMS (`<hex>  <file>` lines).

use std::path::Path;

use crate::error::{Error, Result};

/// Checks every line of the checksum file `file` against the files of
/// `dir`; returns the number of files checked. A mismatch or a missing
/// file is `Error::Corrupt` naming the file.
pub fn check_file(dir: &Path, file: &Path) -> Result<usize> {
    Err(Error::Unsupported(format!("{} in {}: checksum files are not read yet", file.display(), dir.display())))
}
