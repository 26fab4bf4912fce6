//! partclone's image formats 0001 and 0002, and raw (`dd-img`) streams.

use std::io::Read;
use std::path::PathBuf;

use super::BlockSource;
use crate::error::{Error, Result};

/// Reads a partclone image.
pub struct PartcloneReader;

impl PartcloneReader {
    /// Reads the header and bitmap from `r`; `file` names it in errors.
    pub fn new(r: Box<dyn Read + Send>, file: PathBuf) -> Result<PartcloneReader> {
        let _ = r;
        Err(Error::Unsupported(format!("{}: partclone images are not read yet", file.display())))
    }
}

impl BlockSource for PartcloneReader {
    fn next_run(&mut self, _max_len: usize) -> Result<Option<(u64, Vec<u8>)>> {
        Ok(None)
    }
    fn stored_bytes(&self) -> u64 {
        0
    }
    fn device_size(&self) -> u64 {
        0
    }
    fn block_size(&self) -> u32 {
        1
    }
    fn describe(&self) -> String {
        String::new()
    }
}

/// Reads every byte of a partition, in order.
pub struct RawReader;

impl RawReader {
    /// `size` bytes from `r`; `file` names it in errors.
    pub fn new(r: Box<dyn Read + Send>, file: PathBuf, size: u64) -> RawReader {
        let _ = (r, file, size);
        RawReader
    }
}

impl BlockSource for RawReader {
    fn next_run(&mut self, _max_len: usize) -> Result<Option<(u64, Vec<u8>)>> {
        Ok(None)
    }
    fn stored_bytes(&self) -> u64 {
        0
    }
    fn device_size(&self) -> u64 {
        0
    }
    fn block_size(&self) -> u32 {
        1
    }
    fn describe(&self) -> String {
        String::new()
    }
}
