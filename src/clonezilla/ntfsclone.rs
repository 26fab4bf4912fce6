//! ntfsclone's "special image" format (old Clonezilla's `*.ntfs-img`).

use std::io::Read;
use std::path::PathBuf;

use super::BlockSource;
use crate::error::{Error, Result};

/// Reads an ntfsclone special image.
pub struct NtfscloneReader;

impl NtfscloneReader {
    /// Reads the header from `r`; `file` names it in errors.
    pub fn new(r: Box<dyn Read + Send>, file: PathBuf) -> Result<NtfscloneReader> {
        let _ = r;
        Err(Error::Unsupported(format!("{}: ntfsclone images are not read yet", file.display())))
    }
}

impl BlockSource for NtfscloneReader {
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
