//! Clonezilla images: the directory Clonezilla's `ocs-sr savedisk` writes,
//! read so that `klon info`, `verify`, `restore` and `convert` take it as
//! they take klon's own images.
//!
//! - [`layout`]: the directory (`disk`, `parts`, `<disk>-pt.sf`, `-mbr`,
//!   `-hidden-data-after-mbr`, `-gpt-1st`/`-gpt-2nd`, partition image files
//!   and their split pieces) into a [`CzImage`].
//! - [`checksums`]: MD5SUMS / SHA1SUMS / B2SUMS / B3SUMS files.
//! - [`pieces`]: split pieces (`.aa`, `.ab`, ...) read as one stream.
//! - [`decompress`]: zstd, gzip, xz, lz4, bzip2 or none, by magic.
//! - [`partclone`]: partclone's image formats 0001 and 0002.
//! - [`fat12_check`]: a partclone FAT12 image's bitmap against its FAT
//!   (partclone before its 2025 fix leaves out clusters in use).
//! - [`ntfsclone`]: ntfsclone's "special image" (`*.ntfs-img`).
//!
//! Every partition image becomes a [`BlockSource`]: the partition's stored
//! bytes in increasing offset order, every checksum checked as it passes.

pub mod checksums;
pub mod decompress;
pub mod fat12_check;
pub mod layout;
pub mod ntfsclone;
pub mod partclone;
pub mod pieces;

use std::io::Read;
use std::path::PathBuf;

use crate::error::Result;
use crate::table::DiskLayout;

pub use layout::is_clonezilla_image;

/// How a partition's image file holds its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// partclone's format (`*-ptcl-img.*`, including `dd-ptcl-img`).
    Partclone,
    /// ntfsclone's special image (`*.ntfs-img.*`, old Clonezilla).
    Ntfsclone,
    /// Every byte of the partition, in order (`*.dd-img.*`, old Clonezilla).
    Raw,
}

/// How a partition's image file is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// zstd (`.zst`), one or several frames.
    Zstd,
    /// gzip (`.gz`), one or several members (pigz).
    Gzip,
    /// xz (`.xz`).
    Xz,
    /// lz4 frame format (`.lz4`).
    Lz4,
    /// bzip2 (`.bz2`), one or several streams (pbzip2).
    Bzip2,
    /// Not compressed (`.uncomp`).
    None,
}

/// The stored bytes of one partition, in increasing offset order.
pub trait BlockSource: Send {
    /// The next run of stored bytes: its byte offset within the partition
    /// and at most `max_len` bytes (a multiple of the block size when
    /// `max_len` is). `None` once the stream has ended where its header
    /// says it ends; a stream that ends early, goes on past that point, or
    /// fails a checksum is `Error::Corrupt` naming the file and offset.
    fn next_run(&mut self, max_len: usize) -> Result<Option<(u64, Vec<u8>)>>;
    /// Bytes the stream yields in all (used blocks × block size), for
    /// progress and reports.
    fn stored_bytes(&self) -> u64;
    /// Size of the filesystem (or partition) the image was taken of.
    fn device_size(&self) -> u64;
    /// Filesystem block size (1 for raw streams).
    fn block_size(&self) -> u32;
    /// One line about the stream for `klon info` ("partclone 0002, ext4,
    /// 4096-byte blocks, CRC32 every 256 blocks").
    fn describe(&self) -> String;
}

/// One partition's image in a Clonezilla image.
#[derive(Debug, Clone)]
pub struct CzPartition {
    /// Partition number (sda5 -> 5).
    pub number: u32,
    /// Device name Clonezilla used ("sda5", "nvme0n1p2").
    pub device: String,
    /// Filesystem named in the file name ("ext4", "vfat", "ntfs", "dd").
    pub fs: String,
    /// Format of the data.
    pub kind: ImageKind,
    /// Compression.
    pub codec: Codec,
    /// The file, or its split pieces in order.
    pub pieces: Vec<PathBuf>,
    /// Size of the partition in the table, in bytes.
    pub size: u64,
}

/// A partition Clonezilla recorded as swap (restored as a fresh swap area
/// with the same UUID and label).
#[derive(Debug, Clone)]
pub struct CzSwap {
    /// Partition number.
    pub number: u32,
    /// UUID of the swap area, when recorded.
    pub uuid: Option<String>,
    /// Label, when recorded.
    pub label: Option<String>,
}

/// A logical volume Clonezilla saved: an image of its contents, or the
/// record of a swap area.
#[derive(Debug, Clone)]
pub enum CzVolumeContent {
    /// Its partclone (or dd) image; `number` is the PV's partition.
    Image(CzPartition),
    /// A swap volume: restored as a fresh swap header (UUID, label).
    Swap(CzSwap),
}

/// A logical volume of a [`CzVolumeGroup`].
#[derive(Debug, Clone)]
pub struct CzVolume {
    /// Its name in the group.
    pub name: String,
    /// Bytes it holds (its extents × the extent size).
    pub size: u64,
    /// Where its bytes lie, as (offset from the PV's start, length), in the
    /// volume's order.
    pub ranges: Vec<crate::fs::Extent>,
    /// What Clonezilla saved of it.
    pub content: CzVolumeContent,
}

/// An LVM2 volume group Clonezilla saved (`lvm_vg_dev.list`,
/// `lvm_<vg>.conf`, `lvm_logv.list`): one physical volume, a partition of
/// the disk, and an image per logical volume.
#[derive(Debug, Clone)]
pub struct CzVolumeGroup {
    /// The group, as `lvm_<vg>.conf` (vgcfgbackup's text) describes it.
    pub vg: crate::fs::lvm::VolumeGroup,
    /// That text, which a restore writes into the PV's metadata area.
    pub conf: String,
    /// The partition that is the group's PV.
    pub partition: u32,
    /// The PV's size as the metadata records it (bytes).
    pub pv_size: u64,
    /// Its logical volumes, in the metadata's order.
    pub volumes: Vec<CzVolume>,
}

/// A LUKS volume Clonezilla opened while saving (`-luks yes`): the
/// partition's LUKS header, saved by `cryptsetup luksHeaderBackup`, and the
/// image of the filesystem the opened volume held, saved decrypted.
#[derive(Debug, Clone)]
pub struct CzLuks {
    /// The partition that holds the volume.
    pub number: u32,
    /// Its device name as Clonezilla saw it ("sda2").
    pub device: String,
    /// The device-mapper name it was opened as ("ocs_luks_vQX"), which
    /// names its filesystem's image.
    pub mapper: String,
    /// `<device>-luksHeader.bin`.
    pub header_file: PathBuf,
    /// That file's bytes: what a restore writes at the partition's start.
    pub header_bytes: Vec<u8>,
    /// The header, read and checked.
    pub header: crate::fs::luks::Header,
    /// The filesystem's image (its `size` is the volume's data size).
    pub inner: CzPartition,
}

/// A Clonezilla disk image, read and checked for structure (not data).
#[derive(Debug, Clone)]
pub struct CzImage {
    /// The image directory.
    pub dir: PathBuf,
    /// The disk's name as Clonezilla saw it ("sda").
    pub disk: String,
    /// The partition table from `<disk>-pt.sf` (disk size and sector size
    /// from `<disk>-pt.parted` where the dump lacks them).
    pub layout: DiskLayout,
    /// Bytes outside the partitions that a restore writes, by disk offset:
    /// the MBR sector, the hidden data after it, the GPT copies, EBRs.
    /// Sorted, not overlapping.
    pub boot: Vec<(u64, Vec<u8>)>,
    /// Partitions with a data image, in table order.
    pub partitions: Vec<CzPartition>,
    /// Swap partitions.
    pub swap: Vec<CzSwap>,
    /// Checksum files present (MD5SUMS, SHA1SUMS, B2SUMS, B3SUMS).
    pub checksum_files: Vec<PathBuf>,
    /// Things a user should know that do not stop a restore.
    pub warnings: Vec<String>,
    /// Saved with `saveparts` (some partitions, no `disk` file): the table
    /// files describe the disk they came from, but the image is not a disk.
    pub saveparts: bool,
    /// LVM2 volume groups whose PV is a partition of the disk.
    pub lvm: Vec<CzVolumeGroup>,
    /// LUKS volumes saved opened.
    pub luks: Vec<CzLuks>,
}

/// Opens the stored-bytes stream of `part`.
///
/// A `dd-ptcl-img` (partclone.dd) holds the partition's raw bytes when
/// partclone 0.3 wrote it (its dd mode writes no header), so such a stream
/// is read as partclone only when it starts with partclone's magic.
pub fn open_stream(part: &CzPartition) -> Result<Box<dyn BlockSource>> {
    let reader = pieces::PieceReader::open(&part.pieces)?;
    let pos = if part.codec == Codec::None { reader.position().uncompressed() } else { reader.position() };
    let mut decoded = decompress::decoder(part.codec, reader)?;
    let kind = if part.kind == ImageKind::Partclone && part.fs == "dd" {
        // Look at the first bytes, then put them back in front.
        let mut head = Vec::with_capacity(partclone::MAGIC.len());
        (&mut decoded)
            .take(partclone::MAGIC.len() as u64)
            .read_to_end(&mut head)
            .map_err(|e| decompress::read_error(e, &pos, "the start of the image"))?;
        let is_partclone = head == partclone::MAGIC;
        decoded = Box::new(std::io::Cursor::new(head).chain(decoded));
        if is_partclone { ImageKind::Partclone } else { ImageKind::Raw }
    } else {
        part.kind
    };
    match kind {
        ImageKind::Partclone => Ok(Box::new(partclone::PartcloneReader::new(decoded, pos)?)),
        ImageKind::Ntfsclone => Ok(Box::new(ntfsclone::NtfscloneReader::new(decoded, pos)?)),
        ImageKind::Raw => Ok(Box::new(partclone::RawReader::new(decoded, pos, part.size))),
    }
}
