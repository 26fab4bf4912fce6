//! Split pieces (`X.aa`, `X.ab`, ...) of one image file, read as one stream.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// The pieces of one file, read one after another.
pub struct PieceReader {
    pieces: Vec<PathBuf>,
}

impl PieceReader {
    /// Opens `pieces` (at least one), in order.
    pub fn open(pieces: &[PathBuf]) -> Result<PieceReader> {
        Err(Error::Unsupported(format!("reading {} pieces is not written yet", pieces.len())))
    }
}

impl std::io::Read for PieceReader {
    fn read(&mut self, _buf: &mut [u8]) -> std::io::Result<usize> {
        let _ = &self.pieces;
        Ok(0)
    }
}
