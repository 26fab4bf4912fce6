//! Which streams an image of a disk holds and which bytes each one reads:
//! the area outside partitions, and per partition either the blocks its
//! filesystem uses or, for anything else, every block that is not zero.

use crate::device::Disk;
use crate::error::{Error, Result};
use crate::fs::{self, FsError, FsInfo, Volume};
use crate::image::format::Extent;
use crate::image::manifest::{FileInfo, Fill, StreamInfo, StreamKind};
use crate::table::{DiskLayout, TableKind};

pub use crate::image::reader::describe_stream as describe;

/// One stream to back up.
#[derive(Debug, Clone)]
pub struct StreamPlan {
    /// What the manifest will say (files and totals filled in later).
    pub info: StreamInfo,
    /// Byte ranges of the source to read, in order.
    pub reads: Vec<Extent>,
    /// Whether runs of zeros are left out (and restored as zeros or left
    /// alone, as `info.fill` says).
    pub skip_zero: bool,
}

impl StreamPlan {
    /// "partition 2", "area outside partitions", "whole disk": for messages.
    pub fn describe(&self) -> String {
        describe(&self.info)
    }
}

/// How partitions are read.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanOptions {
    /// Copy every partition raw, whatever it holds.
    pub raw_all: bool,
    /// Copy filesystems that are not clean raw instead of refusing.
    pub raw_unclean: bool,
}

/// A plan and the warnings met while making it (filesystems whose
/// metadata failed a check and are copied raw instead).
#[derive(Debug, Clone)]
pub struct Plan {
    /// The streams.
    pub streams: Vec<StreamPlan>,
    /// Warnings for the user.
    pub warnings: Vec<String>,
}

fn empty_file() -> FileInfo {
    FileInfo { name: String::new(), size: 0, blake3: None }
}

/// A stream's manifest entry before anything is written: raw, zero-filled.
pub(crate) fn stream_info(
    name: String,
    kind: StreamKind,
    partition: Option<u32>,
    start: u64,
    length: u64,
    fs: Option<FsInfo>,
) -> StreamInfo {
    StreamInfo {
        name,
        kind,
        partition,
        start,
        length,
        method: "raw".to_string(),
        method_reason: String::new(),
        fill: Fill::Zero,
        fs,
        fs_block_size: None,
        fs_total_bytes: None,
        fs_used_bytes: None,
        chunks: 0,
        stored_bytes: 0,
        compressed_bytes: 0,
        index: empty_file(),
        data_files: Vec::new(),
        unreadable: Vec::new(),
        lvm: None,
    }
}

/// Plans the streams for `layout` of `source`: the area outside partitions
/// first (tables, boot code, gaps), then one stream per partition; a disk
/// without a table is one stream holding its filesystem (if any).
///
/// A source of 0 bytes is refused: there is nothing to copy, and it is most
/// likely the wrong file or a reader without a card. One that is not a
/// whole number of 512-byte sectors is copied as it is, with a warning.
pub fn plan(source: &Disk, layout: &DiskLayout, opts: PlanOptions) -> Result<Plan> {
    // What reading the table found and repaired (a damaged GPT copy, a GPT
    // without protective MBR) is the person's to know, not only the manifest's.
    let mut warnings: Vec<String> = layout.warnings.iter().map(|w| format!("partition table: {w}")).collect();
    if source.size == 0 {
        return Err(Error::Usage(format!(
            "source {} holds 0 bytes: there is nothing to copy (the wrong file, or a card reader without a card?)",
            source.path.display()
        )));
    }
    if !source.size.is_multiple_of(512) {
        warnings.push(format!(
            "source {} is {} bytes, {}; it is copied as it is",
            source.path.display(),
            source.size,
            if source.size < 512 {
                "smaller than one 512-byte sector: no disk is that small and no partition table fits in it (the wrong file?)"
            } else {
                "not a whole number of 512-byte sectors, as a disk always is (is it a disk image?)"
            }
        ));
    }
    if layout.kind == TableKind::None {
        let fs = fs::probe(source, 0, layout.disk_size);
        let info = stream_info("disk".into(), StreamKind::Disk, None, 0, layout.disk_size, fs);
        let plan = volume_plan(source, info, opts, &mut warnings)?;
        return Ok(Plan { streams: vec![plan], warnings });
    }
    let mut streams = Vec::new();
    let mut boot = stream_info("boot".into(), StreamKind::Boot, None, 0, layout.disk_size, None);
    boot.fill = Fill::Free;
    boot.method_reason = "partition table, boot code and gaps between partitions: every block that is not zero".into();
    streams.push(StreamPlan { reads: outside(layout), skip_zero: true, info: boot });
    for p in &layout.partitions {
        let fs = fs::probe(source, p.start, p.size);
        let info = stream_info(format!("p{}", p.number), StreamKind::Partition, Some(p.number), p.start, p.size, fs);
        streams.push(volume_plan(source, info, opts, &mut warnings)?);
    }
    Ok(Plan { streams, warnings })
}

/// Chooses how to read one partition (or a whole disk without a table).
fn volume_plan(
    source: &Disk,
    mut info: StreamInfo,
    opts: PlanOptions,
    warnings: &mut Vec<String>,
) -> Result<StreamPlan> {
    let raw = |mut info: StreamInfo, reason: String| {
        info.method = "raw".into();
        info.method_reason = reason;
        info.fill = Fill::Zero;
        StreamPlan { reads: vec![(info.start, info.length)], skip_zero: true, info }
    };
    let place = describe(&info);
    let Some(fs_info) = info.fs.clone() else {
        return Ok(raw(info, "no filesystem klon reads: every block that is not zero".into()));
    };
    if fs_info.fstype == "LVM2_member" {
        let volume = Volume::new(source, info.start, info.length);
        return Ok(match fs::lvm::read(&volume) {
            Ok(vg) if opts.raw_all => {
                info.lvm = Some(vg);
                raw(info, "--raw: every block that is not zero".into())
            }
            Ok(vg) if vg.pvs.len() != 1 || vg.pvs[0].uuid != vg.pv_uuid => {
                warnings.push(format!(
                    "{place} is one of {} LVM2 physical volumes of volume group {}: its logical volumes may lie on \
                     disks klon is not imaging, so this one is copied raw (every block that is not zero); image \
                     every disk of the group to keep the group whole",
                    vg.pvs.len(),
                    vg.name
                ));
                let reason = format!("LVM2 physical volume of volume group {}, which spans several PVs", vg.name);
                info.lvm = Some(vg);
                raw(info, reason)
            }
            Ok(vg) => lvm_plan(source, info, vg, opts, warnings)?,
            Err(e) => {
                warnings.push(format!(
                    "{place} (LVM2 physical volume): its metadata failed a check ({e}); copying it raw, every block \
                     that is not zero"
                ));
                raw(info, format!("LVM2 metadata failed a check: {e}"))
            }
        });
    }
    match fs_info.fstype.as_str() {
        "linux_raid_member" => {
            warnings.push(format!(
                "{place} is a member of Linux md RAID array {}: it is copied raw (every block that is not zero, \
                 its md superblock included), and the array's other members are not imaged by this backup; image \
                 every member disk too, or back up the assembled array (/dev/mdN) from a system that runs it",
                fs_info.label.as_deref().or(fs_info.uuid.as_deref()).unwrap_or("(no name)")
            ));
            return Ok(raw(info, "Linux md RAID member: every block that is not zero, its superblock included".into()));
        }
        "crypto_LUKS" => {
            return Ok(raw(
                info,
                "LUKS-encrypted: what it holds cannot be read without its key, so every block that is not zero \
                 (its header and key slots included)"
                    .into(),
            ));
        }
        _ => {}
    }
    let Some(driver) = fs::driver_for(&fs_info.fstype) else {
        let reason = format!("{}: klon does not read its allocation; every block that is not zero", fs_info.fstype);
        return Ok(raw(info, reason));
    };
    if opts.raw_all {
        return Ok(raw(info, "--raw: every block that is not zero".into()));
    }
    let volume = Volume::new(source, info.start, info.length);
    match (driver.used_map)(&volume) {
        Ok(map) => {
            info.method = fs_info.fstype.clone();
            info.method_reason = format!("the blocks {} marks as used", fs_info.fstype);
            info.fill = Fill::Free;
            info.fs_block_size = Some(map.block_size);
            info.fs_total_bytes = Some(map.total_bytes);
            info.fs_used_bytes = Some(map.used_bytes);
            let reads = map.extents.iter().map(|&(s, l)| (info.start + s, l)).collect();
            Ok(StreamPlan { reads, skip_zero: false, info })
        }
        Err(FsError::Corrupt(why)) => {
            warnings.push(format!(
                "{place} ({}): its metadata failed a check ({why}); copying it raw instead, every block that is not zero",
                fs_info.fstype
            ));
            Ok(raw(info, format!("{} metadata failed a check: {why}", fs_info.fstype)))
        }
        Err(FsError::Unclean(why)) if opts.raw_unclean => {
            Ok(raw(info, format!("{} is not clean ({why}); --raw-unclean", fs_info.fstype)))
        }
        Err(FsError::Unclean(why)) => Err(Error::Refused(format!(
            "{place} ({}) is not clean: {why}. Its allocation maps may not tell the truth; \
             repair it first, or back it up raw (every non-zero block) with --raw-unclean",
            fs_info.fstype
        ))),
        Err(FsError::Io(e)) => Err(e.with_note(&format!("reading the {} metadata of {place}", fs_info.fstype))),
    }
}

/// How a backup copied one logical volume: its method, the filesystem
/// found, the bytes copied, the bytes mapped (thin), and the byte ranges
/// (from the PV's start) to copy.
struct LvCopy {
    method: String,
    fs: Option<FsInfo>,
    used: u64,
    mapped: Option<u64>,
    reads: Vec<Extent>,
}

/// An LVM2 physical volume holding the whole of its volume group: its
/// label and metadata (everything before the first extent) whole; each
/// linear logical volume (of one segment or several, anywhere on the PV)
/// probed like a partition (a filesystem klon reads gives its used
/// blocks, swap its header); each thin pool whose metadata reads by what
/// its thin volumes map, and of that what their filesystems use; any
/// other (striped, mirror, …) copied whole; free extents not at all (a
/// restore leaves them alone).
fn lvm_plan(
    source: &Disk,
    mut info: StreamInfo,
    mut vg: fs::lvm::VolumeGroup,
    opts: PlanOptions,
    warnings: &mut Vec<String>,
) -> Result<StreamPlan> {
    let place = describe(&info);
    let pe_start = vg.pvs[0].pe_start;
    let mut reads: Vec<Extent> = vec![(0, pe_start.min(info.length))];
    let mut copies: Vec<(String, LvCopy)> = Vec::new();
    for pool in vg.lvs.iter().filter(|l| l.segments.iter().any(|s| s.kind == "thin-pool")) {
        if let Some(done) = thin_pool_plan(source, &info, &vg, pool, opts, warnings)? {
            copies.extend(done);
        }
    }
    for lv in &vg.lvs {
        if copies.iter().any(|(name, _)| *name == lv.name) {
            continue;
        }
        let kinds: Vec<&str> = lv.segments.iter().map(|s| s.kind.as_str()).collect();
        if lv.segments.iter().any(|s| s.kind == "thin-pool" || s.kind == "thin") {
            // A pool whose metadata did not read (said above): its data
            // volume is copied whole, and with it this volume's blocks.
            let method = format!("raw ({}; in its pool's data volume, copied whole)", kinds.join(", "));
            copies.push((lv.name.clone(), LvCopy { method, fs: None, used: 0, mapped: None, reads: Vec::new() }));
            continue;
        }
        let Some(ranges) = vg.linear_ranges(lv, info.length) else {
            warnings.push(format!(
                "{place}: LVM2 logical volume {}/{} ({}) is copied whole: klon maps linear volumes (of segments \
                 that follow each other) and thin pools only",
                vg.name,
                lv.name,
                kinds.join(", ")
            ));
            let mut whole = Vec::new();
            for s in &lv.segments {
                for (pv, first) in &s.stripes {
                    if let Some(p) = vg.pvs.iter().find(|p| p.name == *pv) {
                        let at = p.pe_start.saturating_add(first.saturating_mul(vg.extent_size));
                        // A stripe's share of the segment's extents.
                        let len = s.extent_count.div_ceil(s.stripes.len() as u64).saturating_mul(vg.extent_size);
                        whole.push((at.min(info.length), len.min(info.length.saturating_sub(at))));
                    }
                }
            }
            let used = whole.iter().map(|e| e.1).sum::<u64>();
            let method = format!("raw ({})", kinds.join(", "));
            copies.push((lv.name.clone(), LvCopy { method, fs: None, used, mapped: None, reads: whole }));
            continue;
        };
        // The volume's bytes, wherever its segments put them on the PV.
        let len: u64 = ranges.iter().map(|r| r.1).sum();
        let pieces = fs::Piece::chain(&ranges);
        let volume = Volume { disk: source, start: info.start, len, pieces: &pieces };
        let copy = probe_lv(
            &volume,
            ranges.clone(),
            &format!("{place}: LVM2 logical volume {}/{}", vg.name, lv.name),
            opts,
            false,
            warnings,
        )?;
        copies.push((lv.name.clone(), copy));
    }
    for (_, c) in &mut copies {
        reads.append(&mut c.reads);
    }
    let (reads, stored) = fs::normalize(reads, info.length).map_err(|e| {
        Error::Corrupt(format!("{place}: the LVM2 metadata places a volume outside the partition: {e}"))
    })?;
    for (lv, c) in copies {
        if let Some(l) = vg.lvs.iter_mut().find(|l| l.name == lv) {
            l.method = Some(c.method);
            l.fs = c.fs;
            l.used_bytes = Some(c.used);
            l.mapped_bytes = c.mapped;
        }
    }
    info.method = "lvm".into();
    info.method_reason = format!(
        "LVM2 physical volume of volume group {}: its label and metadata whole, each linear logical volume by the \
         blocks its filesystem uses (or whole), each thin pool by the blocks its thin volumes map and their \
         filesystems use, free extents not at all",
        vg.name
    );
    info.fill = Fill::Free;
    info.fs_used_bytes = Some(stored);
    info.fs_total_bytes = Some(info.length);
    info.lvm = Some(vg);
    let reads = reads.into_iter().map(|(s, l)| (info.start + s, l)).collect();
    Ok(StreamPlan { reads, skip_zero: false, info })
}

/// Probes one volume (a logical volume, a thin volume) like a partition:
/// a filesystem klon reads gives the ranges of its used blocks, anything
/// else is copied as `whole` (ranges from the PV's start). `place` names
/// it in warnings and errors. A filesystem that is not clean is refused
/// (as a partition's is) unless --raw-unclean, or `unclean_whole`: a thin
/// volume's (a snapshot of a running guest cannot be repaired, and its
/// mapped blocks are all `whole` holds) is then copied whole with a
/// warning.
fn probe_lv(
    volume: &Volume,
    whole: Vec<Extent>,
    place: &str,
    opts: PlanOptions,
    unclean_whole: bool,
    warnings: &mut Vec<String>,
) -> Result<LvCopy> {
    let whole_used = whole.iter().map(|e| e.1).sum::<u64>();
    let raw = |method: String, fs| LvCopy { method, fs, used: whole_used, mapped: None, reads: whole.clone() };
    let fs_info = fs::probe::probe_volume(volume);
    let Some((f, d)) = fs_info.as_ref().and_then(|f| fs::driver_for(&f.fstype).map(|d| (f.clone(), d))) else {
        return Ok(raw("raw".into(), fs_info));
    };
    if opts.raw_all {
        return Ok(raw("raw (--raw)".into(), Some(f)));
    }
    match (d.used_map)(volume) {
        Ok(map) => {
            let reads: Vec<Extent> = map.extents.iter().flat_map(|&(s, l)| volume.on_disk(s, l)).collect();
            let used = reads.iter().map(|e| e.1).sum();
            Ok(LvCopy { method: f.fstype.clone(), fs: Some(f), used, mapped: None, reads })
        }
        Err(FsError::Corrupt(why)) => {
            warnings.push(format!("{place} ({}): its metadata failed a check ({why}); copied whole", f.fstype));
            Ok(raw("raw".into(), Some(f)))
        }
        Err(FsError::Unclean(why)) if opts.raw_unclean => {
            Ok(raw(format!("raw (not clean: {why}; --raw-unclean)"), Some(f)))
        }
        Err(FsError::Unclean(why)) if unclean_whole => {
            warnings.push(format!("{place} ({}) is not clean ({why}): its mapped blocks are copied whole", f.fstype));
            Ok(raw(format!("raw (not clean: {why})"), Some(f)))
        }
        Err(FsError::Unclean(why)) => Err(Error::Refused(format!(
            "{place} ({}) is not clean: {why}. Its allocation maps may not tell the truth; repair it first, or \
             back it up raw with --raw-unclean",
            f.fstype
        ))),
        Err(FsError::Io(e)) => Err(e.with_note(&format!("reading {place}"))),
    }
}

/// What to copy of a thin volume of `size` bytes whose mapped blocks are
/// `pieces` (from `start`): a filesystem klon reads by its used blocks; a
/// disk (a virtual machine's: a partition table inside) by its table and
/// gaps as mapped and each partition probed in turn; anything else as
/// mapped. Unmapped blocks are never read from the disk.
fn thin_volume_copy(
    source: &Disk,
    start: u64,
    size: u64,
    pieces: &[fs::Piece],
    place: &str,
    opts: PlanOptions,
    warnings: &mut Vec<String>,
) -> Result<LvCopy> {
    let as_mapped = |p: &[fs::Piece]| p.iter().map(|p| (p.disk, p.len)).collect::<Vec<Extent>>();
    if pieces.is_empty() {
        // (A volume without pieces would be read as the bytes at start.)
        return Ok(LvCopy { method: "nothing mapped".into(), fs: None, used: 0, mapped: None, reads: Vec::new() });
    }
    let volume = Volume { disk: source, start, len: size, pieces };
    let disk = crate::table::VolumeDisk { volume, name: place.to_string() };
    let layout = match crate::table::read_layout(&disk) {
        Ok(l) if l.kind != TableKind::None && !l.partitions.is_empty() => l,
        Ok(_) => return probe_lv(&volume, as_mapped(pieces), place, opts, true, warnings),
        Err(e @ Error::Io { .. }) => return Err(e.with_note(&format!("reading the partition table of {place}"))),
        Err(e) => {
            warnings.push(format!("{place}: its partition table could not be read ({e}); copied as mapped"));
            return Ok(LvCopy { method: "raw".into(), fs: None, used: 0, mapped: None, reads: as_mapped(pieces) });
        }
    };
    // The table, boot code and gaps as mapped; each partition probed.
    let mut reads: Vec<Extent> = outside(&layout).iter().flat_map(|&(s, l)| volume.on_disk(s, l)).collect();
    let mut methods = Vec::new();
    for p in &layout.partitions {
        let sub = fs::sub_pieces(pieces, p.start, p.size);
        if sub.is_empty() {
            methods.push(format!("p{} nothing mapped", p.number));
            continue;
        }
        let part = Volume { disk: source, start, len: p.size, pieces: &sub };
        let c = probe_lv(&part, as_mapped(&sub), &format!("{place}, partition {}", p.number), opts, true, warnings)?;
        methods.push(format!("p{} {}", p.number, c.method));
        reads.extend(c.reads);
    }
    let method = format!("{} table: {}", layout.kind, methods.join(", "));
    Ok(LvCopy { method, fs: None, used: 0, mapped: None, reads })
}

/// A thin pool of the group: its metadata read from its metadata volume
/// (copied whole, as a linear volume, by the caller), its data volume by
/// the data blocks some thin device maps, and of a thin volume's blocks
/// those its filesystem uses when klon reads it. None (with a warning)
/// when the pool cannot be mapped: its data volume is then copied whole.
fn thin_pool_plan(
    source: &Disk,
    info: &StreamInfo,
    vg: &fs::lvm::VolumeGroup,
    pool_lv: &fs::lvm::LogicalVolume,
    opts: PlanOptions,
    warnings: &mut Vec<String>,
) -> Result<Option<Vec<(String, LvCopy)>>> {
    let place = format!("{}: LVM2 thin pool {}/{}", describe(info), vg.name, pool_lv.name);
    let open = match fs::lvm::OpenPool::open(vg, pool_lv, source, info.start, info.length) {
        Ok(open) => open,
        Err(fs::lvm::PoolError::Io(e)) => return Err(e.with_note(&format!("reading the metadata of {place}"))),
        Err(fs::lvm::PoolError::Unmapped(why)) => {
            warnings.push(format!("{place}: {why}; its data volume is copied whole"));
            return Ok(None);
        }
    };
    let (pool, cb) = (&open.pool, open.pool.data_block_size);
    let data_lv = pool_lv.segments[0].pool.as_ref().map(|p| p.data.clone()).unwrap_or_default();
    let mut out: Vec<(String, LvCopy)> = Vec::new();
    let mut claimed = std::collections::BTreeSet::new();
    let mut pool_reads: Vec<Extent> = Vec::new();
    let mut all_mapped: Vec<Extent> = Vec::new();
    for lv in
        vg.lvs.iter().filter(|l| l.segments.iter().any(|s| s.thin.as_ref().is_some_and(|t| t.pool == pool_lv.name)))
    {
        let [fs::lvm::Segment { thin: Some(t), .. }] = &lv.segments[..] else {
            warnings.push(format!(
                "{place}: thin volume {} has more than one segment; its pool's blocks are copied as mapped",
                lv.name
            ));
            continue;
        };
        let Some(dev) = pool.devices.get(&t.device_id) else {
            warnings.push(format!(
                "{place}: thin volume {} is device {} of the pool, which the pool's metadata does not have: \
                 nothing of it is stored (LVM's and the pool's metadata disagree; run thin_check)",
                lv.name, t.device_id
            ));
            let copy = LvCopy {
                method: "none (no such thin device)".into(),
                fs: None,
                used: 0,
                mapped: Some(0),
                reads: Vec::new(),
            };
            out.push((lv.name.clone(), copy));
            continue;
        };
        claimed.insert(t.device_id);
        let size = lv.extents().saturating_mul(vg.extent_size);
        // The volume's mapped blocks where they lie, and any mapped past
        // its end (kept, as the pool holds them).
        let (pieces, beyond) = open.pieces(dev, size);
        let mapped = open.mapped(dev);
        all_mapped.extend(mapped.iter().copied());
        // An external-origin snapshot's unmapped blocks are its origin's
        // (copied as that volume): its own blocks are read as mapped, not
        // probed (the filesystem lies across both).
        let probe = t.external_origin.is_none();
        let mut copy = match probe {
            true => thin_volume_copy(
                source,
                info.start,
                size,
                &pieces,
                &format!("{place}: thin volume {}", lv.name),
                opts,
                warnings,
            )?,
            false => LvCopy {
                method: "raw (an external origin's snapshot: its own blocks as mapped)".into(),
                fs: None,
                used: 0,
                mapped: None,
                reads: pieces.iter().map(|p| (p.disk, p.len)).collect(),
            },
        };
        copy.reads.extend(beyond);
        copy.used = copy.reads.iter().map(|e| e.1).sum();
        copy.mapped = Some(dev.mapped_blocks.saturating_mul(cb));
        copy.method = format!("{} (thin)", copy.method);
        pool_reads.extend(copy.reads.iter().copied());
        out.push((lv.name.clone(), copy));
    }
    for (id, dev) in pool.devices.iter().filter(|(id, _)| !claimed.contains(id)) {
        warnings.push(format!(
            "{place}: thin device {id} has no logical volume in LVM's metadata; its {} mapped blocks are copied \
             as they are",
            dev.mapped_blocks
        ));
        let mapped = open.mapped(dev);
        all_mapped.extend(mapped.iter().copied());
        pool_reads.extend(mapped);
    }
    let (_, mapped_bytes) =
        fs::normalize(all_mapped, info.length).map_err(|e| Error::Corrupt(format!("{place}: {e}")))?;
    let (pool_reads, stored) =
        fs::normalize(pool_reads, info.length).map_err(|e| Error::Corrupt(format!("{place}: {e}")))?;
    let method = "thin pool: the data blocks its thin volumes map and their filesystems use".to_string();
    out.push((
        pool_lv.name.clone(),
        LvCopy { method: method.clone(), fs: None, used: stored, mapped: Some(mapped_bytes), reads: Vec::new() },
    ));
    out.push((data_lv, LvCopy { method, fs: None, used: stored, mapped: Some(mapped_bytes), reads: pool_reads }));
    Ok(Some(out))
}

/// The byte ranges of the disk outside every data partition.
pub fn outside(layout: &DiskLayout) -> Vec<Extent> {
    let mut parts: Vec<Extent> = layout.partitions.iter().map(|p| (p.start, p.size)).collect();
    parts.sort();
    let mut out = Vec::new();
    let mut pos = 0u64;
    for (start, size) in parts {
        if start > pos {
            out.push((pos, start - pos));
        }
        pos = pos.max(start + size);
    }
    if layout.disk_size > pos {
        out.push((pos, layout.disk_size - pos));
    }
    out
}
