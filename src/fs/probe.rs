//! Probing what a partition holds: filesystem type, label and UUID, read
//! from superblocks only, named the way blkid names them.
//!
//! Every read is bounds-checked against the partition and the disk; a
//! damaged or unknown superblock yields `None`, never a panic.

use serde::{Deserialize, Serialize};

use crate::device::Disk;
use crate::le::{get_be16 as be16, get_be32 as be32, get_le16 as le16, get_le32 as le32, get_le64 as le64};

/// What a partition holds, as blkid would report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsInfo {
    /// Type name as blkid uses it: ext2, ext3, ext4, vfat, exfat, ntfs, xfs,
    /// btrfs, swap, crypto_LUKS, LVM2_member.
    pub fstype: String,
    /// Volume label, if the filesystem has one.
    pub label: Option<String>,
    /// UUID (or serial number) formatted like blkid.
    pub uuid: Option<String>,
}

/// Probes the partition at byte offset `start`, `len` bytes long, on
/// `disk`. Reads only superblocks (and, for FAT/exFAT/NTFS labels, the few
/// directory or MFT blocks that hold the label). Returns `None` when
/// nothing known is found or the structures are inconsistent.
pub fn probe(disk: &Disk, start: u64, len: u64) -> Option<FsInfo> {
    probe_volume(&super::Volume::new(disk, start, len))
}

/// Probes `volume` (a partition, or a volume made of pieces) as [`probe`]
/// does.
pub fn probe_volume(volume: &super::Volume) -> Option<FsInfo> {
    let on_disk = volume.on_disk(0, volume.len);
    let inside = |&(at, len): &(u64, u64)| {
        volume.start.checked_add(at).and_then(|s| s.checked_add(len)).is_some_and(|e| e <= volume.disk.size())
    };
    if !on_disk.iter().all(inside) {
        return None;
    }
    let r = Region { volume };
    // An md RAID member first: a v1.0 or 0.90 member holds a filesystem
    // from its first byte, and imaging that filesystem alone would lose
    // the array's superblock at the member's end.
    probe_md(&r)
        .or_else(|| probe_luks(&r))
        .or_else(|| probe_lvm2(&r))
        .or_else(|| probe_xfs(&r))
        .or_else(|| probe_btrfs(&r))
        .or_else(|| probe_ext(&r))
        .or_else(|| probe_exfat(&r))
        .or_else(|| probe_ntfs(&r))
        .or_else(|| probe_vfat(&r))
        .or_else(|| probe_swap(&r))
}

/// A bounds-checked window onto a disk.
struct Region<'a> {
    volume: &'a super::Volume<'a>,
}

impl Region<'_> {
    /// Reads `n` bytes at `off` within the region, or `None` when out of
    /// bounds or unreadable.
    fn read(&self, off: u64, n: usize) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; n];
        self.volume.read_at(&mut buf, off).ok()?;
        Some(buf)
    }
}

fn u8_at(b: &[u8], off: usize) -> Option<u8> {
    b.get(off).copied()
}
fn slice(b: &[u8], off: usize, n: usize) -> Option<&[u8]> {
    b.get(off..off.checked_add(n)?)
}

/// A NUL-terminated (or full-length) byte string as a label; empty → None.
fn c_label(raw: &[u8]) -> Option<String> {
    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    let s = String::from_utf8_lossy(&raw[..end]).into_owned();
    if s.is_empty() { None } else { Some(s) }
}

/// UTF-16LE code units as a label; stops at NUL; empty → None.
fn utf16_label(raw: &[u8]) -> Option<String> {
    let units: Vec<u16> =
        raw.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|&u| u != 0).collect();
    let s = String::from_utf16_lossy(&units);
    if s.is_empty() { None } else { Some(s) }
}

/// 16 bytes as a hyphenated lowercase UUID; all zeros → None.
fn uuid_string(u: &[u8]) -> Option<String> {
    if u.len() != 16 || u.iter().all(|&b| b == 0) {
        return None;
    }
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    Some(format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32]))
}

/// A FAT/exFAT volume serial as blkid prints it: "XXXX-XXXX".
fn serial_string(serial: u32) -> String {
    format!("{:04X}-{:04X}", serial >> 16, serial & 0xffff)
}

fn info(fstype: &str, label: Option<String>, uuid: Option<String>) -> Option<FsInfo> {
    Some(FsInfo { fstype: fstype.to_string(), label, uuid })
}

// ---------------------------------------------------------------- LUKS

fn probe_luks(r: &Region) -> Option<FsInfo> {
    let b = r.read(0, 512)?;
    if slice(&b, 0, 6)? != b"LUKS\xba\xbe" {
        return None;
    }
    let version = be16(&b, 6)?;
    let uuid = c_label(slice(&b, 168, 40)?);
    let label = match version {
        1 => None,
        2 => c_label(slice(&b, 24, 48)?),
        _ => return None,
    };
    info("crypto_LUKS", label, uuid)
}

// ---------------------------------------------------------------- md RAID

/// The md superblock's magic, little-endian in v1 and in a 0.90 member
/// written on a little-endian machine.
const MD_MAGIC: u32 = 0xa92b_4efc;

/// A Linux md RAID member (blkid's linux_raid_member): a version-1
/// superblock at the member's start (1.1), at 4 KiB (1.2) or 8 KiB before
/// its end (1.0, on a 4 KiB boundary), its checksum checked; or a 0.90
/// superblock in the last 64 KiB-aligned 64 KiB. Label: the array's name
/// (v1); UUID: the array's.
fn probe_md(r: &Region) -> Option<FsInfo> {
    let len = r.volume.len;
    let v1_places = [Some(0), Some(4096), len.checked_sub(8192).map(|o| o & !4095)];
    for at in v1_places.into_iter().flatten() {
        let Some(b) = r.read(at, 1024) else { continue };
        if le32(&b, 0)? != MD_MAGIC || le32(&b, 4)? != 1 || le64(&b, 144)? != at / 512 {
            continue;
        }
        let max_dev = le32(&b, 220)? as usize;
        let size = 256 + max_dev.checked_mul(2)?;
        let sb = if size <= b.len() { b } else { r.read(at, size.min(1 << 20))? };
        if md1_checksum(slice(&sb, 0, size)?) != le32(&sb, 216)? {
            continue;
        }
        return info("linux_raid_member", c_label(slice(&sb, 32, 32)?), uuid_string(slice(&sb, 16, 16)?));
    }
    let at = (len & !65535).checked_sub(65536)?;
    let b = r.read(at, 64)?;
    if le32(&b, 0)? == MD_MAGIC && le32(&b, 4)? == 0 && le32(&b, 8)? == 90 {
        // The array's UUID: the words set_uuid0, then set_uuid1 to 3, each
        // written most significant byte first (as blkid shows it).
        let mut u = Vec::with_capacity(16);
        for at in [20, 52, 56, 60] {
            u.extend_from_slice(&le32(&b, at)?.to_be_bytes());
        }
        return info("linux_raid_member", None, uuid_string(&u));
    }
    None
}

/// The checksum of a version-1 md superblock `sb` (256 bytes and two per
/// device role): the sum of its little-endian 32-bit words with the
/// checksum field taken as 0, the carry folded in once.
fn md1_checksum(sb: &[u8]) -> u32 {
    let mut sum = 0u64;
    for (i, w) in sb.chunks(4).enumerate() {
        let word = match w {
            [a, b, c, d] if i * 4 != 216 => u32::from_le_bytes([*a, *b, *c, *d]),
            [a, b] => u32::from(u16::from_le_bytes([*a, *b])),
            _ => 0,
        };
        sum += u64::from(word);
    }
    ((sum & 0xffff_ffff) + (sum >> 32)) as u32
}

// ---------------------------------------------------------------- LVM2

fn probe_lvm2(r: &Region) -> Option<FsInfo> {
    // The label sits in one of the first four 512-byte sectors.
    for sector in 0u64..4 {
        let Some(b) = r.read(sector * 512, 512) else { continue };
        if slice(&b, 0, 8)? != b"LABELONE" || slice(&b, 24, 8)? != b"LVM2 001" {
            continue;
        }
        if le64(&b, 8)? != sector || le32(&b, 16)? != lvm_crc(slice(&b, 20, 512 - 20)?) {
            continue;
        }
        let off = le32(&b, 20)? as usize;
        let uuid = super::lvm::uuid_of(slice(&b, off, 32)?).ok()?;
        return info("LVM2_member", None, Some(uuid));
    }
    None
}

/// LVM2's label checksum: CRC-32 (reflected, 0xedb88320) from the initial
/// value 0xf597a6cf, without a final inversion.
pub(crate) fn lvm_crc(data: &[u8]) -> u32 {
    const TAB: [u32; 16] = [
        0x00000000, 0x1db71064, 0x3b6e20c8, 0x26d930ac, 0x76dc4190, 0x6b6b51f4, 0x4db26158, 0x5005713c, 0xedb88320,
        0xf00f9344, 0xd6d6a3e8, 0xcb61b38c, 0x9b64c2b0, 0x86d3d2d4, 0xa00ae278, 0xbdbdf21c,
    ];
    let mut crc: u32 = 0xf597a6cf;
    for &b in data {
        crc ^= b as u32;
        crc = (crc >> 4) ^ TAB[(crc & 0xf) as usize];
        crc = (crc >> 4) ^ TAB[(crc & 0xf) as usize];
    }
    crc
}

// ---------------------------------------------------------------- XFS

fn probe_xfs(r: &Region) -> Option<FsInfo> {
    let b = r.read(0, 512)?;
    if slice(&b, 0, 4)? != b"XFSB" {
        return None;
    }
    let blocksize = be32(&b, 4)?;
    let sectsize = be16(&b, 102)?;
    if !(512..=65536).contains(&blocksize) || !blocksize.is_power_of_two() {
        return None;
    }
    if !(512..=32768).contains(&sectsize) || !sectsize.is_power_of_two() {
        return None;
    }
    let uuid = uuid_string(slice(&b, 32, 16)?);
    let label = c_label(slice(&b, 108, 12)?);
    info("xfs", label, uuid)
}

// ---------------------------------------------------------------- btrfs

fn probe_btrfs(r: &Region) -> Option<FsInfo> {
    let b = r.read(0x10000, 4096)?;
    if slice(&b, 64, 8)? != b"_BHRfS_M" {
        return None;
    }
    // The superblock records its own position.
    if le64(&b, 48)? != 0x10000 {
        return None;
    }
    let sectorsize = le32(&b, 144)?;
    if !(512..=65536).contains(&sectorsize) || !sectorsize.is_power_of_two() {
        return None;
    }
    let uuid = uuid_string(slice(&b, 32, 16)?);
    let label = c_label(slice(&b, 299, 256)?);
    info("btrfs", label, uuid)
}

// ---------------------------------------------------------------- ext2/3/4

const EXT_COMPAT_HAS_JOURNAL: u32 = 0x0004;
const EXT_INCOMPAT_FILETYPE: u32 = 0x0002;
const EXT_INCOMPAT_RECOVER: u32 = 0x0004;
const EXT_INCOMPAT_JOURNAL_DEV: u32 = 0x0008;
const EXT_INCOMPAT_META_BG: u32 = 0x0010;
const EXT_RO_COMPAT_SUPP: u32 = 0x0001 | 0x0002 | 0x0004; // sparse_super, large_file, btree_dir
const EXT2_INCOMPAT_SUPP: u32 = EXT_INCOMPAT_FILETYPE | EXT_INCOMPAT_META_BG;
const EXT3_INCOMPAT_SUPP: u32 = EXT_INCOMPAT_FILETYPE | EXT_INCOMPAT_RECOVER | EXT_INCOMPAT_META_BG;

fn probe_ext(r: &Region) -> Option<FsInfo> {
    let b = r.read(1024, 1024)?;
    if le16(&b, 0x38)? != 0xEF53 {
        return None;
    }
    let log_block = le32(&b, 0x18)?;
    if log_block > 6 {
        return None; // block size above 64 KiB: not a sane superblock
    }
    let compat = le32(&b, 0x5C)?;
    let incompat = le32(&b, 0x60)?;
    let ro_compat = le32(&b, 0x64)?;
    if incompat & EXT_INCOMPAT_JOURNAL_DEV != 0 {
        return None; // an external journal, not a filesystem
    }
    let uuid = uuid_string(slice(&b, 0x68, 16)?);
    let label = c_label(slice(&b, 0x78, 16)?);
    // blkid's rule: anything ext3 does not support makes it ext4; else a
    // journal makes it ext3; else ext2.
    let fstype = if ro_compat & !EXT_RO_COMPAT_SUPP != 0 || incompat & !EXT3_INCOMPAT_SUPP != 0 {
        "ext4"
    } else if compat & EXT_COMPAT_HAS_JOURNAL != 0 {
        "ext3"
    } else if incompat & !EXT2_INCOMPAT_SUPP != 0 {
        "ext4"
    } else {
        "ext2"
    };
    info(fstype, label, uuid)
}

// ---------------------------------------------------------------- exFAT

fn probe_exfat(r: &Region) -> Option<FsInfo> {
    let b = r.read(0, 512)?;
    if slice(&b, 3, 8)? != b"EXFAT   " {
        return None;
    }
    let bps_shift = u8_at(&b, 108)? as u32;
    let spc_shift = u8_at(&b, 109)? as u32;
    if !(9..=12).contains(&bps_shift) || bps_shift + spc_shift > 25 {
        return None;
    }
    let bps = 1u64 << bps_shift;
    let cluster = bps << spc_shift;
    let fat_offset = le32(&b, 80)? as u64 * bps;
    let heap = le32(&b, 88)? as u64 * bps;
    let cluster_count = le32(&b, 92)?;
    let root = le32(&b, 96)?;
    let serial = le32(&b, 100)?;
    let uuid = Some(serial_string(serial));

    // The label is a directory entry (type 0x83) in the root directory:
    // follow its FAT chain a bounded number of clusters.
    let mut label = None;
    let mut c = root;
    'chain: for _ in 0..64 {
        if c < 2 || c - 2 >= cluster_count {
            break;
        }
        let Some(dir) = r.read(heap + (c as u64 - 2) * cluster, cluster as usize) else { break };
        for e in dir.chunks_exact(32) {
            match e[0] {
                0x00 => break 'chain,
                0x83 => {
                    let n = (e[1] as usize).min(11);
                    label = utf16_label(&e[2..2 + 2 * n]);
                    break 'chain;
                }
                _ => {}
            }
        }
        let Some(next) = r.read(fat_offset + 4 * c as u64, 4).and_then(|v| le32(&v, 0)) else { break };
        c = next;
    }
    info("exfat", label, uuid)
}

// ---------------------------------------------------------------- NTFS

fn probe_ntfs(r: &Region) -> Option<FsInfo> {
    let b = r.read(0, 512)?;
    if slice(&b, 3, 8)? != b"NTFS    " {
        return None;
    }
    let bps = le16(&b, 11)? as u64;
    if !(256..=4096).contains(&bps) || !bps.is_power_of_two() {
        return None;
    }
    let spc_raw = u8_at(&b, 13)?;
    let spc: u64 = if spc_raw > 0x80 {
        let shift = 256 - spc_raw as u32;
        if shift > 20 {
            return None;
        }
        1 << shift
    } else if spc_raw.is_power_of_two() {
        spc_raw as u64
    } else {
        return None;
    };
    let cluster = bps * spc;
    let serial = le64(&b, 0x48)?;
    let uuid = Some(format!("{serial:016X}"));
    let label = ntfs_label(r, &b, cluster);
    info("ntfs", label, uuid)
}

fn ntfs_label(r: &Region, boot: &[u8], cluster: u64) -> Option<String> {
    let mft_lcn = le64(boot, 0x30)?;
    let cpr = u8_at(boot, 0x40)? as i8;
    let rec_size: u64 = if cpr < 0 {
        let shift = -(cpr as i32) as u32;
        if !(9..=16).contains(&shift) {
            return None;
        }
        1 << shift
    } else {
        (cpr as u64).checked_mul(cluster)?
    };
    if !(512..=65536).contains(&rec_size) {
        return None;
    }
    // $Volume is MFT record 3.
    let off = mft_lcn.checked_mul(cluster)?.checked_add(3 * rec_size)?;
    let mut rec = r.read(off, rec_size as usize)?;
    if slice(&rec, 0, 4)? != b"FILE" {
        return None;
    }
    // Undo the update sequence (fixups) at the end of every 512 bytes.
    let usa_ofs = le16(&rec, 4)? as usize;
    let usa_count = le16(&rec, 6)? as usize;
    let usn = crate::le::get::<2>(&rec, usa_ofs)?;
    for i in 1..usa_count {
        let pos = i * 512 - 2;
        let fix = crate::le::get::<2>(&rec, usa_ofs + 2 * i)?;
        let cur = rec.get_mut(pos..pos + 2)?;
        if cur != usn {
            return None;
        }
        cur.copy_from_slice(&fix);
    }
    let mut a = le16(&rec, 0x14)? as usize;
    for _ in 0..64 {
        let ty = le32(&rec, a)?;
        if ty == 0xFFFF_FFFF {
            break;
        }
        let alen = le32(&rec, a + 4)? as usize;
        if alen < 16 {
            return None;
        }
        if ty == 0x60 && u8_at(&rec, a + 8)? == 0 {
            let vlen = le32(&rec, a + 0x10)? as usize;
            let voff = le16(&rec, a + 0x14)? as usize;
            return utf16_label(slice(&rec, a.checked_add(voff)?, vlen)?);
        }
        a = a.checked_add(alen)?;
    }
    None
}

// ---------------------------------------------------------------- FAT

fn probe_vfat(r: &Region) -> Option<FsInfo> {
    let b = r.read(0, 512)?;
    let at36 = slice(&b, 0x36, 8)?;
    let at52 = slice(&b, 0x52, 8)?;
    let named = at52 == b"FAT32   "
        || at52.starts_with(b"MSWIN")
        || at36 == b"FAT12   "
        || at36 == b"FAT16   "
        || at36 == b"FAT     "
        || at36.starts_with(b"MSDOS");
    let jump = matches!(b[0], 0xEB | 0xE9);
    let sig = slice(&b, 510, 2)? == [0x55, 0xAA];
    if !(named || (jump && sig)) {
        return None;
    }
    let bps = le16(&b, 11)? as u64;
    let spc = u8_at(&b, 13)? as u64;
    let reserved = le16(&b, 14)? as u64;
    let nfats = u8_at(&b, 16)? as u64;
    let root_entries = le16(&b, 17)? as u64;
    let total16 = le16(&b, 19)? as u64;
    let media = u8_at(&b, 21)?;
    let fat16_size = le16(&b, 22)? as u64;
    let total32 = le32(&b, 32)? as u64;
    if !(512..=4096).contains(&bps) || !bps.is_power_of_two() {
        return None;
    }
    if spc == 0 || !spc.is_power_of_two() || reserved == 0 || nfats == 0 || nfats > 4 {
        return None;
    }
    if media != 0xF0 && media < 0xF8 {
        return None;
    }
    if total16 == 0 && total32 == 0 {
        return None;
    }
    let fat32 = fat16_size == 0;
    let (fat_size, ext) = if fat32 { (le32(&b, 36)? as u64, 64) } else { (fat16_size, 36) };
    if fat_size == 0 {
        return None;
    }
    let boot_sig = u8_at(&b, ext + 2)?;
    let has_ext = boot_sig == 0x29 || boot_sig == 0x28;
    let uuid = if has_ext { Some(serial_string(le32(&b, ext + 3)?)) } else { None };
    let boot_label = if boot_sig == 0x29 { fat_label(slice(&b, ext + 7, 11)?) } else { None };

    // blkid prefers the label entry in the root directory.
    let root_start = (reserved + nfats * fat_size) * bps;
    let mut dir_label = None;
    if fat32 {
        let cluster = bps * spc;
        let heap = root_start;
        let mut c = le32(&b, 44)? & 0x0FFF_FFFF;
        'chain: for _ in 0..64 {
            if !(2..0x0FFF_FFF7).contains(&c) {
                break;
            }
            let Some(dir) = r.read(heap + (c as u64 - 2) * cluster, cluster as usize) else { break };
            match scan_fat_dir(&dir) {
                DirScan::Found(l) => {
                    dir_label = l;
                    break 'chain;
                }
                DirScan::End => break,
                DirScan::More => {}
            }
            let Some(next) = r.read(reserved * bps + 4 * c as u64, 4).and_then(|v| le32(&v, 0)) else { break };
            c = next & 0x0FFF_FFFF;
        }
    } else {
        let n = (root_entries * 32).min(1 << 20) as usize;
        if let Some(dir) = r.read(root_start, n)
            && let DirScan::Found(l) = scan_fat_dir(&dir)
        {
            dir_label = l;
        }
    }
    let label = dir_label.or(boot_label);
    info("vfat", label, uuid)
}

enum DirScan {
    Found(Option<String>),
    End,
    More,
}

fn scan_fat_dir(dir: &[u8]) -> DirScan {
    for e in dir.chunks_exact(32) {
        match e[0] {
            0x00 => return DirScan::End,
            0xE5 => continue,
            _ => {}
        }
        let attr = e[11];
        if attr & 0x0F == 0x0F {
            continue; // long-name entry
        }
        if attr & 0x08 != 0 {
            let mut raw = [0u8; 11];
            raw.copy_from_slice(&e[..11]);
            if raw[0] == 0x05 {
                raw[0] = 0xE5;
            }
            return DirScan::Found(fat_label(&raw));
        }
    }
    DirScan::More
}

fn fat_label(raw: &[u8]) -> Option<String> {
    if raw == b"NO NAME    " {
        return None;
    }
    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    let s = String::from_utf8_lossy(&raw[..end]).trim_end_matches(' ').to_string();
    if s.is_empty() { None } else { Some(s) }
}

// ---------------------------------------------------------------- swap

fn probe_swap(r: &Region) -> Option<FsInfo> {
    for page in [4096u64, 8192, 16384, 32768, 65536] {
        let Some(m) = r.read(page - 10, 10) else { continue };
        if m == b"SWAP-SPACE" {
            return info("swap", None, None);
        }
        if m != b"SWAPSPACE2" {
            continue;
        }
        let b = r.read(1024, 44)?;
        let version = le32(&b, 0)?;
        if version != 1 && version.swap_bytes() != 1 {
            return None;
        }
        let uuid = uuid_string(slice(&b, 12, 16)?);
        let label = c_label(slice(&b, 28, 16)?);
        return info("swap", label, uuid);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{TempFile, run};
    use std::path::Path;
    use std::process::Command;

    fn blkid(file: &Path) -> FsInfo {
        let out = Command::new("blkid").args(["-p", "-o", "export"]).arg(file).output().expect("running blkid");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut info = FsInfo { fstype: String::new(), label: None, uuid: None };
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else { continue };
            // blkid -o export escapes spaces and specials with backslashes.
            let v = v.replace("\\ ", " ");
            match k {
                "TYPE" => info.fstype = v,
                "LABEL" => info.label = Some(v),
                "UUID" => info.uuid = Some(v),
                _ => {}
            }
        }
        info
    }

    fn check(name: &str, size: u64, cmd: &str, args: &[&str]) {
        let img = TempFile::new(name, size);
        run(Command::new(cmd).args(args).arg(&img.0));
        let disk = Disk::open_read_only(&img.0).unwrap();
        let got = probe(&disk, 0, disk.size).unwrap_or_else(|| panic!("{name}: nothing probed"));
        let want = blkid(&img.0);
        assert_eq!(got, want, "{name}");
    }

    const MB: u64 = 1 << 20;

    #[test]
    fn ext2() {
        check("ext2", 16 * MB, "mkfs.ext2", &["-q", "-F", "-L", "klon ext2"]);
    }
    #[test]
    fn ext3() {
        check("ext3", 32 * MB, "mkfs.ext3", &["-q", "-F", "-L", "klon-ext3"]);
    }
    #[test]
    fn ext4() {
        check("ext4", 32 * MB, "mkfs.ext4", &["-q", "-F", "-L", "klon-ext4"]);
    }
    #[test]
    fn ext4_no_label() {
        check("ext4nl", 32 * MB, "mkfs.ext4", &["-q", "-F"]);
    }
    #[test]
    fn vfat16() {
        check("fat16", 64 * MB, "mkfs.vfat", &["-F", "16", "-n", "KLON16"]);
    }
    #[test]
    fn vfat12() {
        check("fat12", 4 * MB, "mkfs.vfat", &["-F", "12", "-n", "KLON12"]);
    }
    #[test]
    fn vfat32() {
        check("fat32", 300 * MB, "mkfs.vfat", &["-F", "32", "-n", "KLON FAT32"]);
    }
    #[test]
    fn vfat_no_label() {
        check("fatnl", 64 * MB, "mkfs.vfat", &[]);
    }
    #[test]
    fn exfat() {
        check("exfat", 64 * MB, "mkfs.exfat", &["-L", "KlonExfat"]);
    }
    #[test]
    fn ntfs() {
        check("ntfs", 64 * MB, "mkfs.ntfs", &["-F", "-Q", "-q", "-L", "Klon NTFS"]);
    }
    #[test]
    fn xfs() {
        check("xfs", 320 * MB, "mkfs.xfs", &["-q", "-f", "-L", "klonxfs"]);
    }
    #[test]
    fn btrfs() {
        check("btrfs", 160 * MB, "mkfs.btrfs", &["-q", "-f", "-L", "klon btrfs"]);
    }
    #[test]
    fn swap() {
        check("swap", 16 * MB, "mkswap", &["-L", "klonswap"]);
    }

    /// Writes `bytes` at `off` into a fresh 1 MiB file and compares probe
    /// with blkid.
    fn check_synthetic(name: &str, parts: &[(u64, &[u8])]) -> FsInfo {
        let img = TempFile::new(name, 8 * MB);
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img.0).unwrap();
        for (off, b) in parts {
            f.write_all_at(b, *off).unwrap();
        }
        drop(f);
        let disk = Disk::open_read_only(&img.0).unwrap();
        let got = probe(&disk, 0, disk.size).unwrap_or_else(|| panic!("{name}: nothing probed"));
        assert_eq!(got, blkid(&img.0), "{name}");
        got
    }

    const LUKS_UUID: &[u8] = b"3f1e9a2c-5b7d-4e8f-9a0b-1c2d3e4f5a6b";

    /// A version-1 md superblock for a member of `len` bytes at byte
    /// `at` (what mdadm writes, with the fields blkid and klon read).
    fn md1(at: u64, name: &str) -> Vec<u8> {
        let mut b = vec![0u8; 1024];
        b[0..4].copy_from_slice(&MD_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[16..32].copy_from_slice(&[0x5a, 0x11, 0x3c, 0x09, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        b[32..32 + name.len()].copy_from_slice(name.as_bytes());
        b[72..76].copy_from_slice(&1u32.to_le_bytes()); // RAID1
        b[92..96].copy_from_slice(&2u32.to_le_bytes()); // two devices
        b[144..152].copy_from_slice(&(at / 512).to_le_bytes());
        b[220..224].copy_from_slice(&2u32.to_le_bytes()); // max_dev
        b[256..260].copy_from_slice(&[0, 0, 1, 0]); // roles 0 and 1
        let sum = md1_checksum(&b[..260]);
        b[216..220].copy_from_slice(&sum.to_le_bytes());
        b
    }

    #[test]
    fn md_raid_members_of_each_superblock_version() {
        // 1.2 at 4 KiB; 1.0 8 KiB before the end (of an 8 MB image), with
        // an ext4 from byte 0 that must not win; 0.90 in the last 64 KiB.
        let got = check_synthetic("md12", &[(4096, &md1(4096, "pve:0"))]);
        assert_eq!((got.fstype.as_str(), got.label.as_deref()), ("linux_raid_member", Some("pve:0")));
        assert_eq!(got.uuid.as_deref(), Some("5a113c09-0102-0304-0506-0708090a0b0c"));
        let end = (8 * MB - 8192) & !4095;
        let mut ext = vec![0u8; 2048];
        ext[1024 + 0x38..1024 + 0x3a].copy_from_slice(&0xef53u16.to_le_bytes());
        let got = check_synthetic("md10", &[(0, &ext), (end, &md1(end, "host:1"))]);
        assert_eq!(got.fstype, "linux_raid_member");
        let mut b = vec![0u8; 4096];
        b[0..4].copy_from_slice(&MD_MAGIC.to_le_bytes());
        b[8..12].copy_from_slice(&90u32.to_le_bytes());
        b[20..24].copy_from_slice(&[1, 2, 3, 4]);
        b[52..64].copy_from_slice(&[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
        let got = check_synthetic("md090", &[(((8 * MB) & !65535) - 65536, &b)]);
        assert_eq!(got.fstype, "linux_raid_member");
        // A flipped byte: the checksum fails, and it is not a member.
        let mut bad = md1(4096, "pve:0");
        bad[40] ^= 1;
        let img = TempFile::new("md-bad", 8 * MB);
        let f = std::fs::OpenOptions::new().write(true).open(&img.0).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &bad, 4096).unwrap();
        let disk = Disk::open_read_only(&img.0).unwrap();
        assert!(probe(&disk, 0, disk.size).is_none());
    }

    #[test]
    fn luks1() {
        let mut h = vec![0u8; 592];
        h[0..6].copy_from_slice(b"LUKS\xba\xbe");
        h[6..8].copy_from_slice(&1u16.to_be_bytes());
        h[8..11].copy_from_slice(b"aes");
        h[40..51].copy_from_slice(b"xts-plain64");
        h[72..78].copy_from_slice(b"sha256");
        h[104..108].copy_from_slice(&4096u32.to_be_bytes());
        h[108..112].copy_from_slice(&64u32.to_be_bytes());
        h[168..168 + LUKS_UUID.len()].copy_from_slice(LUKS_UUID);
        let got = check_synthetic("luks1", &[(0, &h)]);
        assert_eq!(got.fstype, "crypto_LUKS");
        assert_eq!(got.uuid.as_deref(), Some(std::str::from_utf8(LUKS_UUID).unwrap()));
    }

    #[test]
    fn luks2() {
        let mut h = vec![0u8; 4096];
        h[0..6].copy_from_slice(b"LUKS\xba\xbe");
        h[6..8].copy_from_slice(&2u16.to_be_bytes());
        h[8..16].copy_from_slice(&16384u64.to_be_bytes());
        h[16..24].copy_from_slice(&1u64.to_be_bytes());
        h[24..34].copy_from_slice(b"klon-luks2");
        h[72..78].copy_from_slice(b"sha256");
        h[168..168 + LUKS_UUID.len()].copy_from_slice(LUKS_UUID);
        let got = check_synthetic("luks2", &[(0, &h)]);
        assert_eq!(got.label.as_deref(), Some("klon-luks2"));
    }

    #[test]
    fn lvm2_member() {
        let mut l = vec![0u8; 512];
        l[0..8].copy_from_slice(b"LABELONE");
        l[8..16].copy_from_slice(&1u64.to_le_bytes());
        l[20..24].copy_from_slice(&32u32.to_le_bytes());
        l[24..32].copy_from_slice(b"LVM2 001");
        l[32..64].copy_from_slice(b"AbCdEf0123456789GhIjKl0123456789");
        l[64..72].copy_from_slice(&(16 * MB).to_le_bytes());
        let crc = lvm_crc(&l[20..]);
        l[16..20].copy_from_slice(&crc.to_le_bytes());
        let got = check_synthetic("lvm2", &[(512, &l)]);
        assert_eq!(got.uuid.as_deref(), Some("AbCdEf-0123-4567-89Gh-IjKl-0123-456789"));
        // A wrong checksum is not a label.
        l[40] ^= 1;
        let img = TempFile::new("lvm2-bad", MB);
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new().write(true).open(&img.0).unwrap().write_all_at(&l, 512).unwrap();
        let disk = Disk::open_read_only(&img.0).unwrap();
        assert_eq!(probe(&disk, 0, disk.size), None);
    }

    #[test]
    fn partition_offset_and_bounds() {
        let img = TempFile::new("offset", 48 * MB);
        // An ext4 filesystem placed at 8 MiB inside a bigger file.
        let part = TempFile::new("offset-part", 32 * MB);
        run(Command::new("mkfs.ext4").args(["-q", "-F", "-L", "inner"]).arg(&part.0));
        let data = std::fs::read(&part.0).unwrap();
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img.0).unwrap();
        f.write_all_at(&data, 8 * MB).unwrap();
        drop(f);
        let disk = Disk::open_read_only(&img.0).unwrap();
        let got = probe(&disk, 8 * MB, 32 * MB).unwrap();
        assert_eq!(got.fstype, "ext4");
        assert_eq!(got.label.as_deref(), Some("inner"));
        assert_eq!(probe(&disk, 0, 8 * MB), None);
        // Out of range and tiny regions give None, not a panic.
        assert_eq!(probe(&disk, 40 * MB, 32 * MB), None);
        assert_eq!(probe(&disk, 8 * MB, 100), None);
        assert_eq!(probe(&disk, u64::MAX - 10, 100), None);
    }

    #[test]
    fn garbage_never_panics() {
        let img = TempFile::new("garbage", 256 * 1024);
        let disk_file = std::fs::OpenOptions::new().write(true).open(&img.0).unwrap();
        use std::os::unix::fs::FileExt;
        // Deterministic pseudo-random bytes with magics sprinkled in.
        let mut x: u64 = 0x1234_5678_9abc_def0;
        let mut buf = vec![0u8; 256 * 1024];
        for round in 0..40 {
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            match round % 8 {
                0 => buf[3..11].copy_from_slice(b"NTFS    "),
                1 => buf[3..11].copy_from_slice(b"EXFAT   "),
                2 => buf[0x52..0x5A].copy_from_slice(b"FAT32   "),
                3 => buf[1024 + 0x38..1024 + 0x3A].copy_from_slice(&[0x53, 0xEF]),
                4 => buf[0..4].copy_from_slice(b"XFSB"),
                5 => buf[0..6].copy_from_slice(b"LUKS\xba\xbe"),
                6 => {
                    buf[512..520].copy_from_slice(b"LABELONE");
                    buf[536..544].copy_from_slice(b"LVM2 001");
                }
                _ => buf[4086..4096].copy_from_slice(b"SWAPSPACE2"),
            }
            disk_file.write_all_at(&buf, 0).unwrap();
            let disk = Disk::open_read_only(&img.0).unwrap();
            for len in [0, 1, 511, 512, 4096, 70000, 256 * 1024] {
                let _ = probe(&disk, 0, len);
            }
        }
    }
}
