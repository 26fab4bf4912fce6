//! Decompression of Clonezilla's image files, by codec.

use std::io::Read;

use super::Codec;
use crate::error::{Error, Result};

/// A reader that decompresses `inner` as `codec` says.
pub fn decoder(codec: Codec, inner: impl Read + Send + 'static) -> Result<Box<dyn Read + Send>> {
    let _ = inner;
    Err(Error::Unsupported(format!("{codec:?} is not written yet")))
}
