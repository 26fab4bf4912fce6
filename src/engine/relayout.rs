//! Restore to a disk smaller than the source: partitions after one that
//! shrinks move down, and the filesystems that must shrink are shrunk by
//! their own tools (ext2/3/4: resize2fs, NTFS: ntfsresize).
//!
//! Planning reads nothing but the image: each filesystem that may give room
//! is shown to its tool as a file through FUSE ([`PartFs`], the partition
//! as the image holds it, read through the chunk index as `klon mount`
//! does), and the tool says how small it can get (`resize2fs -P`,
//! `ntfsresize --info`). Partitions are shrunk from the last one back, each
//! by whole MiB and never below its minimum plus some room to breathe, so
//! the fewest move. When that is not enough, klon says by how much and
//! refuses before writing anything.
//!
//! Writing: the target's table areas are wiped; the boot code before the
//! first partition is restored; each partition is restored at its new
//! place, up to its new size, and read back; the table is rebuilt for the
//! new places. Then each filesystem that must shrink is shown to its tool
//! as a file of its old size again: its first part is the target (what was
//! just restored), the rest the image, and what the tool writes past the
//! new size is kept aside in memory. Once the tool has moved everything
//! into the first part, that part on the target is the shrunk filesystem,
//! and its checker (`e2fsck -fn`, `ntfsresize --check`) must find it clean
//! there. A failure anywhere wipes the table areas again.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner, MountOption, OpenFlags,
    ReplyAttr, ReplyData, ReplyEntry, ReplyOpen, ReplyWrite, Request, Session, WriteFlags,
};

use super::grow::Growth;
use super::mount::DiskView;
use super::restore::{RestoreOptions, RestoreReport, restore_range};
use super::source::ImageSource;
use crate::device::{Disk, loopdev};
use crate::engine::feedback::Feedback;
use crate::error::{Error, Result};
use crate::image::StreamKind;
use crate::table::{self, DiskLayout, Partition, TableKind};
use crate::units::human_bytes;

const MIB: u64 = 1 << 20;
/// The GPT type of a BIOS boot partition (GRUB's core image).
const BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
/// What a shrunk filesystem keeps beyond its tool's minimum: 2 %, at least
/// 16 MiB (a filesystem filled to its last block is no use).
const SPARE_MIN: u64 = 16 * MIB;
/// Most bytes a tool may write past the new end while it shrinks (kept in
/// memory); more is an error (ENOSPC) for the tool.
const OVERLAY_MAX: u64 = 512 * MIB;

/// One partition of a restore to a smaller disk: where it was, where it
/// goes, and how large it is there.
#[derive(Debug, Clone)]
struct Move {
    number: u32,
    /// Its streams in the image: one for a partition that shrinks; a
    /// partition that holds LVM volumes may have several, each moved with
    /// it.
    streams: Vec<usize>,
    /// Where it starts on the source, and its size there.
    from: u64,
    size: u64,
    /// Where it starts on the target, and its size there.
    to: u64,
    room: u64,
    /// Its filesystem, as the backup found it.
    fs: Option<String>,
}

impl Move {
    fn shrinks(&self) -> bool {
        self.room < self.size
    }
}

/// A restore onto a disk smaller than the image's, planned: it fits.
#[derive(Debug, Clone)]
pub struct Relayout {
    /// The image, read at random (planning, and the filesystems' tools
    /// while they shrink them); its chunk store is what the restore reads.
    view: Arc<DiskView>,
    /// The image's disk's size.
    source_size: u64,
    /// Its logical sector size.
    source_sector_size: u32,
    /// Where the source's table (header and entries) ended: what lies
    /// between it and the first partition is zeroed when the sector size
    /// changes (the old table would be read as the new one's neighbour).
    source_table_end: u64,
    moved: DiskLayout,
    parts: Vec<Move>,
    /// The image's boot stream (what lies outside partitions), and how much
    /// of it (from the disk's start) is restored: up to the first partition.
    boot: Option<(usize, u64)>,
}

/// How far a filesystem can shrink, or why it cannot.
type Minimum = std::result::Result<u64, String>;

/// How the partitions are laid out anew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// Onto a smaller disk: shrink what must, from the last partition back.
    Shrink,
    /// Onto a larger disk: every partition whose filesystem klon grows
    /// takes a share of the new room in proportion to its size
    /// (`--grow-all`, Clonezilla's `-k1`).
    GrowAll,
    /// Every partition keeps its place and size: only the sector size
    /// differs (a 512-byte-sector image onto a 4Kn disk, or back).
    Keep,
}

/// Plans the restore of `source`, opened, onto `target` as `fit` says,
/// reading it through its [`ImageSource::random_access`] view (which the
/// restore then reads: the same image, held as the source holds it);
/// refuses, before anything is written, when it cannot fit (saying by how
/// much and what each partition could give) or the image is not one klon
/// can read at random.
pub fn plan(source: &dyn ImageSource, target: &Disk, fit: Fit) -> Result<Relayout> {
    let source_size = source.layout().disk_size;
    let too_small = |why: String| {
        Error::Refused(format!(
            "target too small: {} has {} ({} bytes), the image's disk had {} ({source_size} bytes); {why}",
            target.path.display(),
            human_bytes(target.size),
            target.size,
            human_bytes(source_size),
        ))
    };
    let new_ss = target.logical_sector_size;
    let refuse = |why: String| match fit {
        Fit::Shrink => too_small(why),
        Fit::GrowAll => Error::Refused(format!("--grow-all: {why}")),
        Fit::Keep => Error::Refused(format!(
            "{} has {new_ss}-byte logical sectors, the image's disk had {}-byte sectors; {why}",
            target.path.display(),
            if new_ss == 512 { 4096 } else { 512 },
        )),
    };
    let Some(store) = source.random_access() else {
        return Err(refuse(format!(
            "klon moves partitions only when it restores klon images and repository snapshots (it reads the \
             filesystems at random): run `klon convert {} NEW-IMAGE` and restore that",
            source.location().display()
        )));
    };
    let view = Arc::new(DiskView::new(store)?);
    let m = view.manifest();
    let layout = &m.layout;
    if layout.kind == TableKind::None {
        return Err(refuse("the image's disk has no partition table, so there is nothing klon can move".into()));
    }
    if m.streams.iter().any(|s| s.kind == StreamKind::Rescued) {
        return Err(refuse(
            "the image holds sectors a rescue read late (klon backup --rescue), which klon does not move".into(),
        ));
    }
    let end = table::usable_end(layout, target.size, new_ss)
        .ok_or_else(|| refuse("the image's partition table does not fit on it".into()))?;
    let mut parts: Vec<&Partition> = layout.partitions.iter().collect();
    parts.sort_by_key(|p| p.start);
    if new_ss != layout.sector_size {
        sectors_convert(&view, layout, &parts, new_ss).map_err(refuse)?;
    }
    let last_end = parts.iter().map(|p| p.start + p.size).max().unwrap_or(0);
    // GRUB's boot code in the MBR records where its core image starts in a
    // BIOS boot partition: no partition before one may change size (it
    // would move).
    let pinned_before =
        parts.iter().filter(|p| p.type_id.eq_ignore_ascii_case(BIOS_BOOT)).map(|p| p.start).max().unwrap_or(0);
    let mut deltas: HashMap<u32, i64> = HashMap::new();
    if fit == Fit::Keep {
        // Nothing moves: only the table is written anew.
    } else if fit == Fit::GrowAll {
        let extra = end.saturating_sub(last_end) / MIB * MIB;
        let single = |p: &Partition| m.streams.iter().filter(|s| s.partition == Some(p.number)).count() == 1;
        let fs_of = |p: &Partition| {
            m.streams
                .iter()
                .find(|s| s.partition == Some(p.number))
                .and_then(|s| s.fs.as_ref())
                .map(|f| f.fstype.as_str())
        };
        let growable: Vec<&&Partition> = parts
            .iter()
            .filter(|p| p.start >= pinned_before && single(p) && fs_of(p).is_some_and(super::grow::grows))
            .collect();
        if growable.is_empty() {
            return Err(refuse(
                "no partition holds a filesystem klon grows (ext2/3/4, NTFS, XFS, btrfs, an LVM2 PV) where it may move; \
                 --grow-last extends the last partition"
                    .into(),
            ));
        }
        let total: u128 = growable.iter().map(|p| u128::from(p.size)).sum();
        for p in growable {
            let add = (u128::from(extra) * u128::from(p.size) / total) as u64 / MIB * MIB;
            deltas.insert(p.number, add as i64);
        }
    } else {
        let mut need = last_end.saturating_sub(end).div_ceil(MIB) * MIB;
        // What each partition gives, from the last back, and why the others give nothing.
        let mut said: Vec<String> = Vec::new();
        for p in parts.iter().rev() {
            if need == 0 {
                break;
            }
            if p.start < pinned_before {
                said.push(format!(
                    "partition {} lies before the BIOS boot partition, which must not move (GRUB's boot code records \
                     its place), so it keeps its size",
                    p.number
                ));
                continue;
            }
            let stream = m.streams.iter().find(|s| s.partition == Some(p.number));
            let fs = stream.and_then(|s| s.fs.as_ref()).map(|f| f.fstype.clone());
            let used = stream.and_then(|s| s.fs_used_bytes);
            let name = format!(
                "partition {} ({}, {}{})",
                p.number,
                fs.as_deref().unwrap_or("no filesystem klon knows"),
                human_bytes(p.size),
                used.map(|u| format!(", {} used", human_bytes(u))).unwrap_or_default()
            );
            let min = match stream {
                Some(s) if m.streams.iter().filter(|t| t.partition == Some(p.number)).count() == 1 => {
                    minimum(&view, p, fs.as_deref(), s.fs_block_size)
                }
                _ => Err("klon cannot shrink what it holds".into()),
            };
            match min {
                Ok(min) => {
                    let keep = (min + (min / 50).max(SPARE_MIN)).div_ceil(MIB) * MIB;
                    let give = p.size.saturating_sub(keep) / MIB * MIB;
                    let cut = give.min(need);
                    said.push(format!(
                        "{name}: can shrink to {}, giving up to {}",
                        human_bytes(keep),
                        human_bytes(give)
                    ));
                    if cut > 0 {
                        deltas.insert(p.number, -(cut as i64));
                        need -= cut;
                    }
                }
                Err(why) => said.push(format!("{name}: {why}")),
            }
        }
        if need > 0 {
            return Err(too_small(format!(
                "the partitions do not fit even shrunk: {} short. {}. Use a disk at least {} larger",
                human_bytes(need),
                said.join("; "),
                human_bytes(need)
            )));
        }
    }
    // New places: each partition moves by what those before it gave or took.
    let shift_before = |x: u64| -> i64 {
        parts.iter().filter(|p| p.start < x).map(|p| deltas.get(&p.number).copied().unwrap_or(0)).sum()
    };
    let at = |x: u64, d: i64| x.checked_add_signed(d).expect("a partition moves within the disk");
    let mut moved_parts = Vec::new();
    let mut moves = Vec::new();
    for p in &parts {
        let delta = deltas.get(&p.number).copied().unwrap_or(0);
        let (to, room) = (at(p.start, shift_before(p.start)), at(p.size, delta));
        let streams: Vec<usize> = (0..m.streams.len()).filter(|&i| m.streams[i].partition == Some(p.number)).collect();
        moved_parts.push(Partition { start: to, size: room, ..(*p).clone() });
        moves.push(Move {
            number: p.number,
            fs: streams.first().and_then(|&si| m.streams[si].fs.as_ref()).map(|f| f.fstype.clone()),
            streams,
            from: p.start,
            size: p.size,
            to,
            room,
        });
    }
    let extended = layout.extended.map(|(start, size)| {
        let new_start = at(start, shift_before(start));
        let logical_end = moved_parts.iter().filter(|p| p.logical).map(|p| p.start + p.size).max();
        let new_end = logical_end.unwrap_or(at(start + size, shift_before(start + size)));
        (new_start, new_end - new_start)
    });
    let moved = table::moved_layout(layout, target.size, new_ss, moved_parts, extended)
        .ok_or_else(|| refuse("the image's partition table does not fit on it".into()))?;
    if let Some(p) = moved.partitions.iter().find(|p| p.start + p.size > end) {
        return Err(refuse(format!("partition {} would still end past its room", p.number)));
    }
    table::build::mbr_ebr_chain(&moved).map_err(|e| refuse(format!("the logical partitions cannot be moved: {e}")))?;
    let first = moved_first(layout);
    let boot = m.streams.iter().position(|s| s.kind == StreamKind::Boot).map(|b| (b, first));
    let source_table_end = layout.gpt.as_ref().map_or(512, |g| g.first_usable_lba * u64::from(layout.sector_size));
    Ok(Relayout {
        view: view.clone(),
        source_size,
        source_sector_size: layout.sector_size,
        source_table_end,
        moved,
        parts: moves,
        boot,
    })
}

/// Whether the image's disk (`layout`, its partitions `parts`) can be laid
/// onto a disk with `new_ss`-byte logical sectors: a GPT (rebuilt for
/// them), every partition aligned to them, and every filesystem's own unit
/// (block or sector size, as the filesystem's driver needs it) at least
/// that large. Why not, otherwise.
fn sectors_convert(
    view: &DiskView,
    layout: &DiskLayout,
    parts: &[&Partition],
    new_ss: u32,
) -> std::result::Result<(), String> {
    if layout.kind != TableKind::Gpt {
        return Err(format!(
            "klon rewrites only a GPT for another sector size (this disk has {}): restore it to a disk with {}-byte \
             sectors",
            layout.kind, layout.sector_size
        ));
    }
    let ss = u64::from(new_ss);
    let m = view.manifest();
    for p in parts {
        if !p.start.is_multiple_of(ss) || !p.size.is_multiple_of(ss) {
            return Err(format!("partition {} is not aligned to {new_ss}-byte sectors", p.number));
        }
        let streams: Vec<_> = m.streams.iter().filter(|s| s.partition == Some(p.number)).collect();
        let [stream] = streams[..] else {
            return Err(format!(
                "klon cannot tell whether what partition {} holds works on {new_ss}-byte sectors",
                p.number
            ));
        };
        let fs = stream.fs.as_ref().map(|f| f.fstype.as_str()).unwrap_or("");
        let unit = fs_unit(view, p.start, fs, stream.fs_block_size).ok_or_else(|| {
            format!(
                "klon cannot tell whether partition {} ({}) works on {new_ss}-byte sectors",
                p.number,
                if fs.is_empty() { "no filesystem klon knows" } else { fs }
            )
        })?;
        if unit < new_ss {
            return Err(format!(
                "the {fs} in partition {} was made for {unit}-byte units, which a {new_ss}-byte-sector disk cannot \
                 hold: restore it to a disk with {}-byte sectors",
                p.number, layout.sector_size
            ));
        }
    }
    Ok(())
}

/// The smallest unit a filesystem of type `fs` at byte `start` of the
/// image's disk reads and writes (what a disk's logical sector must not
/// exceed), from its superblock; None for what klon cannot tell.
fn fs_unit(view: &DiskView, start: u64, fs: &str, block_size: Option<u32>) -> Option<u32> {
    let mut b = [0u8; 512];
    let le16 = |b: &[u8], at: usize| u32::from(u16::from_le_bytes([b[at], b[at + 1]]));
    match fs {
        "ext2" | "ext3" | "ext4" => block_size,
        "swap" => Some(4096),
        "btrfs" => {
            view.read(start + 0x10000, &mut b).ok()?;
            Some(u32::from_le_bytes(b[0x90..0x94].try_into().ok()?))
        }
        "xfs" => {
            view.read(start, &mut b).ok()?;
            Some(u32::from(u16::from_be_bytes([b[102], b[103]])))
        }
        "vfat" | "fat12" | "fat16" | "fat32" | "ntfs" => {
            view.read(start, &mut b).ok()?;
            Some(le16(&b, 11))
        }
        "exfat" => {
            view.read(start, &mut b).ok()?;
            1u32.checked_shl(u32::from(b[108]))
        }
        _ => None,
    }
}

/// Where the first partition (or MBR extended container) starts.
fn moved_first(layout: &DiskLayout) -> u64 {
    let first = layout.partitions.iter().map(|p| p.start).min().unwrap_or(layout.disk_size);
    layout.extended.map_or(first, |(s, _)| first.min(s))
}

/// How small the filesystem `fs` in partition `p` of the image can get,
/// as its own tool says; or why it cannot shrink.
fn minimum(view: &Arc<DiskView>, p: &Partition, fs: Option<&str>, block_size: Option<u32>) -> Minimum {
    let fs = fs.unwrap_or("");
    match fs {
        "ext2" | "ext3" | "ext4" | "ntfs" => {}
        "vfat" => return fat_minimum(view, p),
        "xfs" => return Err("XFS cannot shrink".into()),
        "" => return Err("it holds no filesystem klon knows, so it keeps its size".into()),
        other => return Err(format!("klon does not shrink {other}, so it keeps its size")),
    }
    let shown = PartFs::new(view.clone(), p.start, p.size, None, Feedback::silent());
    let found = shown.with_file(|file| {
        let file = file.to_string_lossy();
        if fs == "ntfs" {
            let out = run("ntfsresize", &["--info", "--force", "--no-progress-bar", &file])?;
            let bytes = out
                .lines()
                .find_map(|l| l.strip_prefix("You might resize at ")?.split(' ').next()?.parse::<u64>().ok())
                .ok_or_else(|| format!("ntfsresize --info did not say how small it can get: {}", tail(&out)))?;
            Ok(bytes)
        } else {
            run("e2fsck", &["-fn", &file]).map_err(|why| format!("e2fsck -fn finds it is not clean ({why})"))?;
            let out = run("resize2fs", &["-P", &file])?;
            let blocks = out
                .lines()
                .find_map(|l| l.strip_prefix("Estimated minimum size of the filesystem: ")?.trim().parse::<u64>().ok())
                .ok_or_else(|| format!("resize2fs -P did not say how small it can get: {}", tail(&out)))?;
            let bs = block_size.ok_or("the image does not record its block size")?;
            Ok(blocks * u64::from(bs))
        }
    });
    found.map_err(|why| format!("cannot shrink: {why}"))
}

/// How small the FAT in partition `p` of the image can get without moving
/// a cluster (klon's own code: see [`crate::fs::fat::shrink_floor`]).
fn fat_minimum(view: &DiskView, p: &Partition) -> Minimum {
    use crate::fs::fat;
    let mut boot = vec![0u8; 512];
    view.read(p.start, &mut boot).map_err(|e| e.to_string())?;
    let g = fat::parse_bpb(&boot, p.size).map_err(|e| e.to_string())?;
    let mut meta = vec![0u8; (g.fat_start + g.nfats * g.fat_bytes) as usize];
    view.read(p.start, &mut meta).map_err(|e| e.to_string())?;
    let used = fat::used_clusters(&g, &meta).ok_or("its FATs could not be read")?;
    Ok(fat::shrink_floor(&g, used.last().copied()))
}

/// Cuts the FAT restored at `mv.to` to `mv.room` bytes (nothing used lies
/// past that: [`fat_minimum`]): the sector count in its boot sector and
/// FAT32's backup, FSInfo's free count forgotten.
fn fat_cut(target: &Disk, mv: &Move) -> Result<()> {
    use crate::fs::fat;
    let bad = |e: crate::fs::FsError| Error::Corrupt(format!("partition {}: {e}", mv.number));
    let mut boot = vec![0u8; 512];
    target.read_exact_at(&mut boot, mv.to)?;
    let g = fat::parse_bpb(&boot, mv.size).map_err(bad)?;
    let bps = u64::from(u16::from_le_bytes([boot[11], boot[12]]));
    let mut places = vec![0u64];
    let mut fsinfo = Vec::new();
    if g.kind == fat::Kind::Fat32 {
        let field = |at: usize| u64::from(u16::from_le_bytes([boot[at], boot[at + 1]]));
        let (info, backup) = (field(48), field(50));
        if backup != 0 && backup != 0xFFFF {
            places.push(backup * bps);
            if info != 0 && info != 0xFFFF {
                fsinfo.push((backup + info) * bps);
            }
        }
        if info != 0 && info != 0xFFFF {
            fsinfo.push(info * bps);
        }
    }
    for at in places {
        let mut b = vec![0u8; 512];
        target.read_exact_at(&mut b, mv.to + at)?;
        if b[11..36] != boot[11..36] {
            continue; // not a copy of the BPB: left alone
        }
        fat::set_total(&mut b, mv.room).map_err(bad)?;
        target.write_all_at(&b, mv.to + at)?;
    }
    for at in fsinfo {
        let mut b = vec![0u8; 512];
        target.read_exact_at(&mut b, mv.to + at)?;
        if fat::forget_free_count(&mut b) {
            target.write_all_at(&b, mv.to + at)?;
        }
    }
    Ok(())
}

impl Relayout {
    /// What the restore does to fit, one line per partition that moves or
    /// shrinks, for confirmations.
    pub fn describe(&self) -> String {
        let mut lines = vec![if self.moved.disk_size < self.source_size {
            "The target is smaller than the image's disk, so:".to_string()
        } else if self.parts.iter().any(|m| m.room != m.size) {
            "The partitions take the larger disk's room in proportion (--grow-all):".to_string()
        } else {
            format!(
                "The target has {}-byte sectors, the image's disk had {}-byte sectors: the GPT is written anew for \
                 them, every partition at the same place.",
                self.moved.sector_size, self.source_sector_size
            )
        }];
        for mv in &self.parts {
            let fs = mv.fs.as_deref().unwrap_or("no filesystem");
            if mv.room > mv.size {
                lines.push(format!(
                    "  partition {} ({fs}) grows from {} to {}{}",
                    mv.number,
                    human_bytes(mv.size),
                    human_bytes(mv.room),
                    if mv.to != mv.from { format!(" and moves to byte {}", mv.to) } else { String::new() }
                ));
            } else if mv.shrinks() {
                lines.push(format!(
                    "  partition {} ({fs}) shrinks from {} to {}{}",
                    mv.number,
                    human_bytes(mv.size),
                    human_bytes(mv.room),
                    if mv.to != mv.from { format!(" and moves to byte {}", mv.to) } else { String::new() }
                ));
            } else if mv.to != mv.from {
                lines.push(format!("  partition {} ({fs}) moves from byte {} to byte {}", mv.number, mv.from, mv.to));
            }
        }
        if lines.len() == 1 && self.moved.disk_size < self.source_size {
            lines.push("  every partition keeps its place and size (they end before the smaller disk does)".into());
        }
        lines.join("\n")
    }

    /// Writes the image onto `target` as planned. The caller has confirmed.
    pub fn restore(&self, target: &Disk, opts: &RestoreOptions) -> Result<RestoreReport> {
        let started = Instant::now();
        let store = self.view.store();
        super::target::wipe_table_areas(target)?;
        let mut report =
            RestoreReport::new(super::target::DiskWritten { bytes: 0, table_reread: None }, opts.verify_after, started);
        let done = (|| -> Result<()> {
            if let Some((bi, first)) = self.boot {
                let s = &store.manifest().streams[bi];
                let w =
                    restore_range(&*store, bi, (s.start, s.length), first.saturating_sub(s.start), target, 0, opts)?;
                report.bytes_written += w.bytes;
            }
            for mv in &self.parts {
                for &si in &mv.streams {
                    let st = &store.manifest().streams[si];
                    let (from, len) = (st.start, st.length);
                    let keep = len.min((mv.from + mv.room).saturating_sub(from));
                    let w = restore_range(&*store, si, (from, len), keep, target, from - mv.from + mv.to, opts)?;
                    report.bytes_written += w.bytes;
                }
                let (old_ss, new_ss) = (u64::from(self.source_sector_size), u64::from(self.moved.sector_size));
                if mv.to != mv.from || old_ss != new_ss {
                    fix_hidden_sectors(target, mv, old_ss, new_ss)?;
                }
            }
            if self.moved.sector_size != self.source_sector_size {
                let ss = u64::from(self.moved.sector_size);
                let new_end = self.moved.gpt.as_ref().map_or(512, |g| g.first_usable_lba * ss);
                let first = moved_first(&self.moved);
                let end = self.source_table_end.max(new_end).min(first);
                if end > 512 {
                    target.zero_range(512, end - 512)?;
                }
            }
            target.sync()?;
            table::write_moved(target, &self.moved)?;
            target.sync()?;
            for mv in self.parts.iter().filter(|m| m.shrinks()) {
                report.resized.push(self.shrink(target, mv, &opts.feedback)?);
            }
            target.sync()?;
            report.table_reread = target.reread_table()?;
            target.drop_cache()?;
            let found = table::read_layout(target).map_err(|e| {
                Error::VerifyAfter(format!("the partition table written to the target does not read back: {e}"))
            })?;
            if found.partitions != self.moved.partitions || found.extended != self.moved.extended {
                return Err(Error::VerifyAfter(format!(
                    "the partition table read back from {} is not the one written for the partitions' new places",
                    target.path.display()
                )));
            }
            Ok(())
        })();
        done.map_err(|e| super::target::fail("restore", target, e))?;
        target.keep_created();
        // Grown partitions: their filesystems grow now, on the table that
        // was read back; one that cannot keeps its size, with a warning.
        for mv in self.parts.iter().filter(|m| m.room > m.size) {
            report.resized.push(super::grow::grow_partition(target, mv.number, mv.to, mv.size, mv.room));
        }
        if target.kind == crate::device::DiskKind::BlockDevice && self.parts.iter().any(|m| m.room > m.size) {
            // What the kernel cached of the partitions predates the growth.
            let _ = target.reread_table();
        }
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Shrinks the filesystem of `mv`, restored at its new place up to its
    /// new size, with its own tool; then its checker must find it clean on
    /// the target. Says what was done.
    fn shrink(&self, target: &Disk, mv: &Move, feedback: &Feedback) -> Result<Growth> {
        let fs = mv.fs.as_deref().unwrap_or("");
        let failed = |why: String| {
            Error::Unsupported(format!(
                "shrinking the {fs} of partition {} to {} failed: {why}",
                mv.number,
                human_bytes(mv.room)
            ))
        };
        if fs == "vfat" {
            fat_cut(target, mv)?;
            target.sync()?;
            target.drop_cache()?;
            let dev = loopdev::attach(&target.path, mv.to, mv.room, true)?;
            let checked = run("fsck.fat", &["-n", &dev.path.to_string_lossy()]);
            drop(dev);
            checked.map_err(|why| {
                Error::VerifyAfter(format!(
                    "after klon cut the FAT of partition {}, fsck.fat finds it damaged: {why}",
                    mv.number
                ))
            })?;
            let note = format!(
                "partition {} shrank from {} to {}; klon cut its FAT after its last used cluster (fsck.fat -n clean \
                 afterwards)",
                mv.number,
                human_bytes(mv.size),
                human_bytes(mv.room)
            );
            return Ok(Growth {
                partition: mv.number,
                fstype: mv.fs.clone(),
                from: mv.size,
                to: mv.room,
                grown: true,
                note,
            });
        }
        let lower = target.file.try_clone().map_err(|e| Error::io("opening", &target.path, None, e))?;
        let shown = PartFs::new(
            self.view.clone(),
            mv.from,
            mv.size,
            Some(Lower { file: lower, to: mv.to, room: mv.room }),
            feedback.clone(),
        );
        let tool = shown
            .with_file(|file| {
                let file = file.to_string_lossy();
                if fs == "ntfs" {
                    run("ntfsresize", &["--force", "--no-progress-bar", "-s", &mv.room.to_string(), &file])
                        .map(|_| "ntfsresize")
                } else {
                    run("resize2fs", &["-f", &file, &format!("{}K", mv.room / 1024)]).map(|_| "resize2fs")
                }
            })
            .map_err(failed)?;
        target.sync()?;
        target.drop_cache()?;
        let dev = loopdev::attach(&target.path, mv.to, mv.room, fs == "ntfs")?;
        let node = dev.path.to_string_lossy().into_owned();
        let checked = if fs == "ntfs" {
            run("ntfsresize", &["--check", "--no-progress-bar", &node]).map(|_| "ntfsresize --check")
        } else {
            run("e2fsck", &["-fn", &node]).map(|_| "e2fsck -fn")
        };
        drop(dev);
        let checker = checked.map_err(|why| {
            Error::VerifyAfter(format!(
                "after {tool} shrank the {fs} of partition {}, its checker finds it damaged: {why}",
                mv.number
            ))
        })?;
        let note = format!(
            "partition {} shrank from {} to {}; {tool} shrank its {fs} with it ({checker} clean afterwards)",
            mv.number,
            human_bytes(mv.size),
            human_bytes(mv.room)
        );
        Ok(Growth { partition: mv.number, fstype: mv.fs.clone(), from: mv.size, to: mv.room, grown: true, note })
    }
}

/// A FAT or NTFS boot sector records where its partition starts ("hidden
/// sectors", a 32-bit count at byte 0x1C), and Windows' and DOS's boot
/// code reads the rest of the loader from there: for a partition that
/// moved, the field (in the boot sector and its backup copy) is set to the
/// new start when it held the old one.
fn fix_hidden_sectors(target: &Disk, mv: &Move, old_ss: u64, new_ss: u64) -> Result<()> {
    let mut boot = [0u8; 512];
    target.read_exact_at(&mut boot, mv.to)?;
    let fat32 = &boot[0x52..0x5A] == b"FAT32   ";
    let backup = if &boot[3..11] == b"NTFS    " {
        // The backup boot sector follows the volume (its sector count at 0x28).
        let sectors = u64::from_le_bytes(boot[0x28..0x30].try_into().expect("8 bytes"));
        let bps = u64::from(u16::from_le_bytes([boot[0x0B], boot[0x0C]]));
        sectors.checked_mul(bps).filter(|&at| at + 512 <= mv.room)
    } else if fat32 || &boot[0x36..0x3B] == b"FAT12" || &boot[0x36..0x3B] == b"FAT16" {
        let bps = u64::from(u16::from_le_bytes([boot[0x0B], boot[0x0C]]));
        let at = u64::from(u16::from_le_bytes([boot[0x32], boot[0x33]])) * bps;
        (fat32 && at > 0 && at + 512 <= mv.room).then_some(at)
    } else {
        return Ok(());
    };
    let (old, new) = (mv.from / old_ss, mv.to / new_ss);
    let (Ok(old), Ok(new)) = (u32::try_from(old), u32::try_from(new)) else { return Ok(()) };
    for at in std::iter::once(0).chain(backup) {
        let mut sector = [0u8; 512];
        target.read_exact_at(&mut sector, mv.to + at)?;
        if sector[0x1C..0x20] == old.to_le_bytes() {
            sector[0x1C..0x20].copy_from_slice(&new.to_le_bytes());
            target.write_all_at(&sector, mv.to + at)?;
        }
    }
    Ok(())
}

/// The target under a partition being shrunk: its first `room` bytes are
/// at byte `to` of `file`.
struct Lower {
    file: std::fs::File,
    to: u64,
    room: u64,
}

/// One file, `part.img`: a partition of the image, `size` bytes from
/// `start` of its disk. With a [`Lower`], its first `room` bytes are the
/// target's (read and written there) and what is written past them is kept
/// in memory; without, it is read-only.
struct PartFs {
    view: Arc<DiskView>,
    start: u64,
    size: u64,
    lower: Option<Lower>,
    /// Written blocks past `room`, by block number.
    overlay: Mutex<HashMap<u64, Vec<u8>>>,
    overlay_bytes: AtomicU64,
    time: SystemTime,
    /// Where a failed read or write of the shrinking tool is said.
    feedback: Feedback,
}

const BLOCK: u64 = 4096;
const FILE_INO: u64 = 2;
const TTL: Duration = Duration::from_secs(1);

/// Counts the shrink mounts of this process, for their directory names.
static MOUNTS: AtomicU64 = AtomicU64::new(0);

impl PartFs {
    fn new(view: Arc<DiskView>, start: u64, size: u64, lower: Option<Lower>, feedback: Feedback) -> PartFs {
        PartFs {
            view,
            start,
            size,
            lower,
            overlay: Mutex::new(HashMap::new()),
            overlay_bytes: AtomicU64::new(0),
            time: SystemTime::now(),
            feedback,
        }
    }

    /// Mounts itself on a directory of its own for as long as `work` runs,
    /// handing it the file's path.
    fn with_file<T>(
        self,
        work: impl FnOnce(&Path) -> std::result::Result<T, String>,
    ) -> std::result::Result<T, String> {
        let n = MOUNTS.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("klon-shrink-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::NoSuid,
            MountOption::NoDev,
            MountOption::FSName("klon-shrink".into()),
            MountOption::CUSTOM("subtype=klon".into()),
        ];
        if self.lower.is_none() {
            config.mount_options.push(MountOption::RO);
        }
        let session = match Session::new(self, &dir, &config) {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                return Err(format!("mounting a FUSE file on {} (is the fuse module loaded?): {e}", dir.display()));
            }
        };
        let background = match session.spawn() {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                return Err(format!("serving the FUSE file on {}: {e}", dir.display()));
            }
        };
        let result = work(&dir.join("part.img"));
        let ended = background.umount_and_join();
        let _ = std::fs::remove_dir(&dir);
        let value = result?;
        ended.map_err(|e| format!("unmounting {}: {e}", dir.display()))?;
        Ok(value)
    }

    fn attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo(FILE_INO),
            size: self.size,
            blocks: self.size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind: FileType::RegularFile,
            perm: if self.lower.is_some() { 0o600 } else { 0o400 },
            nlink: 1,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            rdev: 0,
            blksize: 128 << 10,
            flags: 0,
        }
    }

    fn root_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo(1),
            size: 0,
            blocks: 0,
            kind: FileType::Directory,
            perm: 0o500,
            nlink: 2,
            ..self.attr()
        }
    }

    /// The file's bytes from `offset` into `buf`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let room = self.lower.as_ref().map_or(0, |l| l.room);
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            if at < room {
                let l = self.lower.as_ref().expect("room comes from the lower");
                let n = ((room - at) as usize).min(buf.len() - done);
                l.file.read_exact_at(&mut buf[done..done + n], l.to + at)?;
                done += n;
                continue;
            }
            let block = at / BLOCK;
            let within = (at % BLOCK) as usize;
            let n = (BLOCK as usize - within).min(buf.len() - done);
            let held = self.overlay.lock().expect("overlay lock").get(&block).map(|b| b[within..within + n].to_vec());
            match held {
                Some(bytes) => buf[done..done + n].copy_from_slice(&bytes),
                None => self
                    .view
                    .read(self.start + at, &mut buf[done..done + n])
                    .map_err(|e| std::io::Error::other(e.to_string()))?,
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `offset`: onto the target below `room`, into the
    /// overlay past it.
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let l = self.lower.as_ref().ok_or_else(|| std::io::Error::from_raw_os_error(libc::EROFS))?;
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            if at < l.room {
                let n = ((l.room - at) as usize).min(data.len() - done);
                l.file.write_all_at(&data[done..done + n], l.to + at)?;
                done += n;
                continue;
            }
            let block = at / BLOCK;
            let within = (at % BLOCK) as usize;
            let n = (BLOCK as usize - within).min(data.len() - done);
            let mut overlay = self.overlay.lock().expect("overlay lock");
            let held = match overlay.entry(block) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    if self.overlay_bytes.fetch_add(BLOCK, Ordering::Relaxed) + BLOCK > OVERLAY_MAX {
                        return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
                    }
                    let mut base = vec![0u8; BLOCK as usize];
                    self.view
                        .read(self.start + block * BLOCK, &mut base)
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    e.insert(base)
                }
            };
            held[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        Ok(())
    }
}

impl Filesystem for PartFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if u64::from(parent) == 1 && name == "part.img" {
            reply.entry(&TTL, &self.attr(), fuser::Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match u64::from(ino) {
            1 => reply.attr(&TTL, &self.root_attr()),
            FILE_INO => reply.attr(&TTL, &self.attr()),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if u64::from(ino) == FILE_INO {
            // Every read and write reaches this file system: nothing is
            // cached by the kernel between the tool and the target.
            reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let len = (u64::from(size)).min(self.size.saturating_sub(offset)) as usize;
        let mut buf = vec![0u8; len];
        match self.read_at(&mut buf, offset) {
            Ok(()) => reply.data(&buf),
            Err(e) => {
                self.feedback.warn(&format!("reading byte {offset} of the partition being shrunk failed: {e}"));
                reply.error(Errno::EIO);
            }
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if offset.saturating_add(data.len() as u64) > self.size {
            return reply.error(Errno::EFBIG);
        }
        match self.write_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                self.feedback.warn(&format!(
                    "the shrinking tool wrote more than {} past the filesystem's new end",
                    human_bytes(OVERLAY_MAX)
                ));
                reply.error(Errno::ENOSPC)
            }
            Err(e) => {
                self.feedback.warn(&format!("writing byte {offset} of the partition being shrunk failed: {e}"));
                reply.error(Errno::EIO);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The file keeps its size: a tool that truncates it changes nothing.
        match u64::from(ino) {
            FILE_INO => reply.attr(&TTL, &self.attr()),
            _ => reply.attr(&TTL, &self.root_attr()),
        }
    }
}

/// Runs `program` with `args`; its output (stdout), or why it failed.
fn run(program: &str, args: &[&str]) -> std::result::Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e} (is it installed?)"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout + &String::from_utf8_lossy(&out.stderr));
    }
    let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let said = if said.is_empty() { stdout } else { said };
    Err(format!("{program} {} failed ({}): {}", args.join(" "), out.status, tail(&said)))
}

/// The last three lines of a tool's output, on one line.
fn tail(said: &str) -> String {
    let lines: Vec<&str> = said.trim().lines().rev().take(3).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" / ")
}

impl std::fmt::Debug for PartFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartFs").field("start", &self.start).field("size", &self.size).finish()
    }
}
