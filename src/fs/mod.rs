//! Filesystems: probing what a partition holds (type, label, UUID) and,
//! per filesystem, which blocks it uses.
//!
//! A filesystem with a used-block reader is one module here exposing a
//! `DRIVER`, listed in `DRIVERS`. The engine asks `used_map` for a
//! partition; a driver's error decides what happens:
//! - `FsError::Corrupt`: the metadata failed a check; the partition is
//!   copied raw and the user is warned.
//! - `FsError::Unclean`: the filesystem was not cleanly unmounted (journal
//!   to replay, dirty flag, hibernation); its bitmaps may lie, so the backup
//!   is refused unless the user asks for a raw copy.
//! - `FsError::Io`: reading failed; the backup fails.

pub mod btrfs;
pub mod crc32c;
pub mod exfat;
pub mod ext;
pub mod fat;
pub mod fat_files;
pub mod luks;
pub mod lvm;
pub mod ntfs;
pub mod probe;
pub mod swap;
pub mod thin;
pub mod xfs;

pub use probe::{FsInfo, probe};

use crate::device::Disk;

/// A byte range of a disk or volume: (offset, length). The used-block maps
/// are lists of them; the image format stores them as they are.
pub type Extent = (u64, u64);

/// Why a used-block map could not be made.
#[derive(Debug)]
pub enum FsError {
    /// Metadata that fails a check (bad magic, counts or pointers outside
    /// the filesystem, checksum mismatch). Falls back to raw.
    Corrupt(String),
    /// The filesystem is not clean; its allocation state may be wrong.
    Unclean(String),
    /// Reading the partition failed.
    Io(crate::Error),
}

impl std::fmt::Display for FsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FsError::Corrupt(m) | FsError::Unclean(m) => f.write_str(m),
            FsError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// What a volume's bytes are read from: a disk (a block device or an
/// image file), or an image's disk as a mount serves it.
pub trait ReadAt: std::fmt::Debug {
    /// Reads `buf.len()` bytes at `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> crate::Result<()>;
    /// Its size in bytes.
    fn size(&self) -> u64;
}

impl ReadAt for Disk {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> crate::Result<()> {
        Disk::read_exact_at(self, buf, offset)
    }

    fn size(&self) -> u64 {
        self.size
    }
}

/// Largest single metadata read a driver may ask for (bounds allocations
/// sized by values read from the disk).
pub const MAX_METADATA_READ: u64 = 256 << 20;

/// Read access to one partition, with offsets relative to its start and
/// every read checked against its end. A volume may be made of pieces
/// (an LVM2 logical volume of several segments, a thin volume's mapped
/// blocks): then its bytes are where the pieces put them, and bytes no
/// piece covers read as zeros (a thin volume's unmapped blocks).
#[derive(Debug, Clone, Copy)]
pub struct Volume<'a> {
    /// The disk holding the partition.
    pub disk: &'a dyn ReadAt,
    /// Byte offset of the partition on the disk (of the area holding the
    /// pieces, when there are some).
    pub start: u64,
    /// Length of the partition in bytes (the pieces' sum, when there are
    /// some).
    pub len: u64,
    /// The pieces, by their place in the volume (not overlapping); none:
    /// the volume is `len` bytes at `start`.
    pub pieces: &'a [Piece],
}

/// A run of a volume's bytes: `len` bytes at `at` in the volume lie at
/// `disk` (an offset from the volume's `start`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Where the run begins in the volume.
    pub at: u64,
    /// Where it lies, from the volume's `start`.
    pub disk: u64,
    /// Its length in bytes.
    pub len: u64,
}

impl Piece {
    /// The pieces of a volume whose bytes are `ranges` (each an offset
    /// from `start` and a length) one after another.
    pub fn chain(ranges: &[Extent]) -> Vec<Piece> {
        let mut at = 0u64;
        ranges
            .iter()
            .map(|&(disk, len)| {
                let p = Piece { at, disk, len };
                at = at.saturating_add(len);
                p
            })
            .collect()
    }
}

impl<'a> Volume<'a> {
    /// The `len` bytes at `start` of `disk`.
    pub fn new(disk: &'a dyn ReadAt, start: u64, len: u64) -> Volume<'a> {
        Volume { disk, start, len, pieces: &[] }
    }

    /// Reads `buf.len()` bytes at `offset` within the partition. A read past
    /// the end is `FsError::Corrupt` (the metadata pointed outside).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), FsError> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(FsError::Corrupt(format!(
                "metadata points at bytes {offset}..+{} beyond the partition's end ({})",
                buf.len(),
                self.len
            )));
        }
        if self.pieces.is_empty() {
            return self.disk.read_exact_at(buf, self.start + offset).map_err(FsError::Io);
        }
        buf.fill(0);
        for (p, from, to) in self.overlapping(offset, buf.len() as u64) {
            let into = &mut buf[(from - offset) as usize..(to - offset) as usize];
            self.disk.read_exact_at(into, self.start + p.disk + (from - p.at)).map_err(FsError::Io)?;
        }
        Ok(())
    }

    /// The pieces that hold some of the `len` bytes at `offset`, each with
    /// the part of the volume it holds of them (from, to).
    fn overlapping(&self, offset: u64, len: u64) -> impl Iterator<Item = (&Piece, u64, u64)> {
        let end = offset.saturating_add(len);
        let first = self.pieces.partition_point(|p| p.at.saturating_add(p.len) <= offset);
        self.pieces[first..].iter().take_while(move |p| p.at < end).filter_map(move |p| {
            let (from, to) = (offset.max(p.at), end.min(p.at.saturating_add(p.len)));
            (from < to).then_some((p, from, to))
        })
    }

    /// Where the `len` bytes at `offset` of the volume are, as ranges from
    /// `start` in the volume's order (one range when there are no pieces;
    /// what the pieces do not cover is left out).
    pub fn on_disk(&self, offset: u64, len: u64) -> Vec<Extent> {
        if self.pieces.is_empty() {
            return vec![(offset, len)];
        }
        self.overlapping(offset, len).map(|(p, from, to)| (p.disk + (from - p.at), to - from)).collect()
    }

    /// Reads `len` bytes at `offset` into a new buffer; `len` is bounded by
    /// MAX_METADATA_READ so a corrupt count cannot size a huge allocation.
    pub fn read_vec(&self, offset: u64, len: u64) -> Result<Vec<u8>, FsError> {
        if len > MAX_METADATA_READ {
            return Err(FsError::Corrupt(format!("metadata read of {len} bytes is implausibly large")));
        }
        let mut buf = vec![0u8; len as usize];
        self.read_at(&mut buf, offset)?;
        Ok(buf)
    }
}

/// The pieces of the `len` bytes at `offset` of a volume made of
/// `pieces`, as a volume of their own (from 0).
pub fn sub_pieces(pieces: &[Piece], offset: u64, len: u64) -> Vec<Piece> {
    let end = offset.saturating_add(len);
    pieces
        .iter()
        .filter_map(|p| {
            let (from, to) = (offset.max(p.at), end.min(p.at.saturating_add(p.len)));
            (from < to).then(|| Piece { at: from - offset, disk: p.disk + (from - p.at), len: to - from })
        })
        .collect()
}

/// The blocks a filesystem uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsedMap {
    /// Allocation unit in bytes (block or cluster size).
    pub block_size: u32,
    /// Size of the filesystem in bytes (may be less than the partition).
    pub total_bytes: u64,
    /// Bytes in use (sum of `extents`).
    pub used_bytes: u64,
    /// Byte ranges relative to the partition start that must be copied:
    /// sorted, non-overlapping, adjacent ranges merged, all within the
    /// partition. Includes every piece of metadata the filesystem needs
    /// (superblocks and their backups, tables, journals, boot sectors).
    pub extents: Vec<Extent>,
}

/// A filesystem that can tell which blocks it uses.
#[derive(Debug)]
pub struct Driver {
    /// The `FsInfo::fstype` names it handles (as the probe reports them).
    pub fstypes: &'static [&'static str],
    /// Reads the allocation state.
    pub used_map: fn(&Volume) -> Result<UsedMap, FsError>,
}

/// Every filesystem with a used-block reader.
pub const DRIVERS: &[&Driver] =
    &[&btrfs::DRIVER, &exfat::DRIVER, &ext::DRIVER, &fat::DRIVER, &ntfs::DRIVER, &swap::DRIVER, &xfs::DRIVER];

/// The driver for a probed filesystem type, if klon has one.
pub fn driver_for(fstype: &str) -> Option<&'static Driver> {
    DRIVERS.iter().copied().find(|d| d.fstypes.contains(&fstype))
}

/// Bytes the filesystem `fstype` at `start` (`len` bytes) of `disk`
/// uses, when klon reads its allocation and it reads.
pub fn used_bytes(disk: &dyn ReadAt, fstype: &str, start: u64, len: u64) -> Option<u64> {
    let driver = driver_for(fstype)?;
    (driver.used_map)(&Volume::new(disk, start, len)).ok().map(|m| m.used_bytes)
}

/// Sorts, merges and bounds-checks extents: a helper for drivers.
/// Returns `Corrupt` if any extent reaches past `limit`.
pub fn normalize(mut extents: Vec<Extent>, limit: u64) -> Result<(Vec<Extent>, u64), FsError> {
    extents.retain(|e| e.1 > 0);
    extents.sort_unstable();
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for (s, l) in extents {
        let end = s.checked_add(l).filter(|&e| e <= limit).ok_or_else(|| {
            FsError::Corrupt(format!("used range {s}..+{l} reaches past the end of the filesystem ({limit})"))
        })?;
        match out.last_mut() {
            Some(last) if s <= last.0 + last.1 => {
                let last_end = (last.0 + last.1).max(end);
                last.1 = last_end - last.0;
            }
            _ => out.push((s, l)),
        }
    }
    let used = out.iter().map(|e| e.1).sum();
    Ok((out, used))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_volume_of_pieces_reads_each_piece_in_turn() {
        let t = crate::testutil::TempDir::new("pieces");
        let path = t.join("disk");
        let bytes: Vec<u8> = (0..100u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let disk = Disk::open_read_only(&path).unwrap();
        // Bytes 60..70, then 10..30, then 80..85 of the disk, from 5 on.
        let pieces = Piece::chain(&[(55, 10), (5, 20), (75, 5)]);
        let v = Volume { disk: &disk, start: 5, len: 35, pieces: &pieces };
        let mut buf = [0u8; 35];
        v.read_at(&mut buf, 0).unwrap();
        let want: Vec<u8> = (60..70).chain(10..30).chain(80..85).collect();
        assert_eq!(buf.to_vec(), want);
        let mut mid = [0u8; 12];
        v.read_at(&mut mid, 8).unwrap();
        assert_eq!(mid.to_vec(), want[8..20].to_vec());
        assert_eq!(v.on_disk(8, 24), vec![(63, 2), (5, 20), (75, 2)]);
        assert!(matches!(v.read_at(&mut [0u8; 2], 34), Err(FsError::Corrupt(_))));
        // Without pieces: the bytes at start.
        assert_eq!(Volume::new(&disk, 5, 10).on_disk(2, 3), vec![(2, 3)]);
        // With gaps (a thin volume's unmapped blocks): zeros there, and
        // no place on the disk.
        let sparse = [Piece { at: 4, disk: 10, len: 3 }, Piece { at: 10, disk: 50, len: 2 }];
        let v = Volume { disk: &disk, start: 0, len: 16, pieces: &sparse };
        let mut all = [0xffu8; 16];
        v.read_at(&mut all, 0).unwrap();
        assert_eq!(all, [0, 0, 0, 0, 10, 11, 12, 0, 0, 0, 50, 51, 0, 0, 0, 0]);
        assert_eq!(v.on_disk(5, 7), vec![(11, 2), (50, 2)]);
        assert_eq!(v.on_disk(0, 4), vec![]);
    }

    #[test]
    fn normalize_merges_and_checks() {
        let (v, used) = normalize(vec![(10, 5), (0, 10), (12, 10), (40, 0), (30, 5)], 100).unwrap();
        assert_eq!(v, vec![(0, 22), (30, 5)]);
        assert_eq!(used, 27);
        assert!(normalize(vec![(90, 20)], 100).is_err());
        assert!(normalize(vec![(u64::MAX, 2)], u64::MAX).is_err());
    }
}
