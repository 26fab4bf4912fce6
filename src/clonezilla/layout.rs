//! The Clonezilla image directory: which files it holds and what they say.

use std::path::Path;

use super::CzImage;
use crate::error::{Error, Result};

/// Whether `dir` looks like a Clonezilla image (it has `disk` or `parts`
/// and a `clonezilla-img` or `*-pt.sf` file), as opposed to a klon image.
pub fn is_clonezilla_image(dir: &Path) -> bool {
    dir.join("clonezilla-img").is_file() || (dir.join("parts").is_file() && !dir.join("klon.json").exists())
}

impl CzImage {
    /// Reads the directory's description files and finds every partition's
    /// image file (and pieces). Checks structure only, not data.
    pub fn open(dir: &Path) -> Result<CzImage> {
        Err(Error::Unsupported(format!("{}: Clonezilla images are not read yet", dir.display())))
    }
}
