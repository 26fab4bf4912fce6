//! TEMPORARY stub.
use super::Disk;
/// stub
pub struct DiskInfo { /// m
pub model: Option<String>, /// s
pub serial: Option<String>, /// t
pub transport: String }
/// stub
pub fn disk_info(_disk: &Disk) -> Option<DiskInfo> { None }
/// stub
pub fn list_disks() -> crate::Result<Vec<u8>> { Ok(vec![]) }
/// stub
pub fn render_disks(_d: &[u8]) -> String { String::new() }
