//! Partition tables: reading GPT, MBR (with extended/logical partitions) or
//! no table at all into one `DiskLayout`, and fixing a restored table up for
//! a larger target disk.

use serde::{Deserialize, Serialize};

use crate::device::Disk;
use crate::error::Result;

/// Which partition table a disk carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    /// GUID Partition Table (with protective MBR).
    Gpt,
    /// DOS/MBR table, possibly with an extended partition and logical ones.
    Mbr,
    /// No table: a filesystem (or nothing) on the whole disk.
    None,
}

/// One data partition (never an MBR extended container).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// Number as the kernel names it (sda1); MBR logical partitions start at 5.
    pub number: u32,
    /// Byte offset from the start of the disk.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// GPT type GUID (upper-case, hyphenated) or MBR type byte as "0x83".
    pub type_id: String,
    /// GPT partition name; empty on MBR.
    pub name: String,
    /// GPT unique partition GUID; None on MBR.
    pub uuid: Option<String>,
    /// GPT attribute bits; on MBR 0x80 when the boot flag is set.
    pub attributes: u64,
    /// True for an MBR logical partition (inside the extended partition).
    pub logical: bool,
}

/// Geometry of a GPT, in logical blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GptGeometry {
    /// First LBA usable by partitions.
    pub first_usable_lba: u64,
    /// Last LBA usable by partitions.
    pub last_usable_lba: u64,
    /// LBA of the primary partition entry array.
    pub primary_entries_lba: u64,
    /// LBA of the backup header (normally the disk's last LBA).
    pub backup_header_lba: u64,
    /// LBA of the backup partition entry array.
    pub backup_entries_lba: u64,
    /// Number of entries in the array.
    pub num_entries: u32,
    /// Size of one entry in bytes.
    pub entry_size: u32,
}

/// A disk's partition layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLayout {
    /// Table kind.
    pub kind: TableKind,
    /// Logical sector size the table was read with.
    pub sector_size: u32,
    /// Size of the disk the layout was read from, in bytes.
    pub disk_size: u64,
    /// GPT disk GUID, or MBR disk signature as "0x1234abcd".
    pub disk_id: Option<String>,
    /// Data partitions, ordered by start offset.
    pub partitions: Vec<Partition>,
    /// MBR extended partition (start, size) in bytes, when present.
    pub extended: Option<(u64, u64)>,
    /// GPT geometry, for GPT disks.
    pub gpt: Option<GptGeometry>,
}

// TEMPORARY stubs until the table module lands.
/// Reads the layout.
pub fn read_layout(disk: &Disk) -> Result<DiskLayout> {
    Ok(DiskLayout { kind: TableKind::None, sector_size: disk.logical_sector_size, disk_size: disk.size, disk_id: None, partitions: vec![], extended: None, gpt: None })
}
/// Stale ranges.
pub fn stale_ranges(_layout: &DiskLayout, _target_size: u64) -> Vec<(u64, u64)> {
    vec![]
}
/// Fix up.
pub fn fix_up_for_target(_target: &Disk, _layout: &DiskLayout, _grow_last: bool) -> Result<Vec<(u64, u64)>> {
    Ok(vec![])
}
/// Expected layout.
pub fn layout_for_target(layout: &DiskLayout, target_size: u64, _grow_last: bool) -> DiskLayout {
    let mut l = layout.clone();
    l.disk_size = target_size;
    l
}
