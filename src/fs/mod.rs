//! Filesystems: probing what a partition holds (type, label, UUID) and,
//! per filesystem, which blocks it uses.

use serde::{Deserialize, Serialize};

/// TEMPORARY until the probe lands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsInfo {
    /// Type.
    pub fstype: String,
    /// Label.
    pub label: Option<String>,
    /// UUID.
    pub uuid: Option<String>,
}

/// TEMPORARY until the probe lands.
pub fn probe(_disk: &crate::device::Disk, _start: u64, _len: u64) -> Option<FsInfo> {
    None
}
