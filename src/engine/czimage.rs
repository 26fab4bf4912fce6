//! Clonezilla images as klon takes them: verify, restore and convert.
//!
//! A Clonezilla image is turned into the same streams a klon image has: the
//! area outside partitions (the MBR, the hidden data after it, the GPT
//! copies, the EBRs), one stream per partition image, and one per swap
//! partition (a fresh swap header with the recorded UUID and label, as
//! Clonezilla's restore makes with mkswap). Every stream is read in order
//! and packed into jobs of up to one chunk; restore writes them with the
//! same [`TargetWriter`] and safety steps as a klon image, convert encodes
//! them into klon's format, and verify reads them all, each reader checking
//! partclone's (or ntfsclone's) own checksums as the bytes pass.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::backup::{ImageDirSink, JobFiller, ReadJob};
use super::feedback::Feedback;
use super::pipeline;
use super::read_back::{self, Expected, Piece};
use super::restore::{RestoreOptions, RestoreReport};
use super::sink::{Finished, ImageSink};
use super::streams::describe;
use super::target::{Shift, TargetWriter, WriteArea, intersects, minus, write_disk, write_order, write_part};
use super::verify::VerifyReport;
use crate::clonezilla::{BlockSource, CzImage, CzPartition, ImageKind, open_stream};
use crate::device::Disk;
use crate::error::{Error, Result};
use crate::fs::FsInfo;
use crate::image::format::{CHUNK_SIZE, Extent};
use crate::image::manifest::{Fill, Manifest, SourceInfo, StreamInfo, StreamKind};
use crate::table::TableKind;

mod luks;
mod lvm;

/// Where a stream's bytes come from.
enum Origin {
    /// Byte areas held in memory (boot areas, a swap header).
    Bytes(Vec<(u64, Vec<u8>)>),
    /// A partition image, opened (header and bitmap read).
    Image { part: CzPartition, source: Box<dyn BlockSource> },
    /// An LVM2 physical volume: its metadata, its volumes' images.
    Pv(lvm::PvOrigin),
    /// A LUKS volume: its header, its filesystem's image encrypted.
    Luks(Box<luks::LuksOrigin>),
}

/// One stream of a Clonezilla image.
struct CzStream {
    info: StreamInfo,
    origin: Origin,
    /// Bytes the stream yields.
    stored: u64,
    /// Whether long zero runs may be left out when converting (every byte
    /// of the partition is in the image, and the gaps restore as zeros).
    skip_zero: bool,
}

/// A Clonezilla image opened as klon streams.
pub struct CzSource {
    /// The image's description.
    pub image: CzImage,
    streams: Vec<CzStream>,
}

/// A stream whose unstored bytes are left alone on restore.
fn stream_info(name: String, kind: StreamKind, partition: Option<u32>, start: u64, length: u64) -> StreamInfo {
    let mut info = super::streams::stream_info(name, kind, partition, start, length, None);
    info.fill = Fill::Free;
    info
}

/// The first page of a Linux swap area (version 1) of `size` bytes, with
/// `uuid` and `label`: what `mkswap -U uuid -L label` writes there.
pub fn swap_header(size: u64, uuid: Option<&str>, label: Option<&str>) -> Vec<u8> {
    const PAGE: usize = 4096;
    let mut page = vec![0u8; PAGE];
    let last_page = (size / PAGE as u64).saturating_sub(1).min(u32::MAX as u64) as u32;
    page[1024..1028].copy_from_slice(&1u32.to_le_bytes());
    page[1028..1032].copy_from_slice(&last_page.to_le_bytes());
    if let Some(u) = uuid.and_then(parse_uuid) {
        page[1036..1052].copy_from_slice(&u);
    }
    if let Some(l) = label {
        let b = l.as_bytes();
        let n = b.len().min(15);
        page[1052..1052 + n].copy_from_slice(&b[..n]);
    }
    page[PAGE - 10..].copy_from_slice(b"SWAPSPACE2");
    page
}

fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The fs name klon's own probe would use for Clonezilla's name.
fn fstype_of(cz_fs: &str) -> String {
    match cz_fs {
        "fat12" | "fat16" | "fat32" | "fat" | "vfat" => "vfat".into(),
        other => other.to_string(),
    }
}

/// Whether a partition image holds every byte of its partition.
fn holds_every_byte(part: &CzPartition) -> bool {
    part.kind == ImageKind::Raw || part.fs == "dd"
}

impl CzSource {
    /// Opens the Clonezilla image at `dir`: its description files (the
    /// layout they give checked as a klon manifest's is), and the header and
    /// bitmap of every partition image (so sizes are known and a damaged
    /// header is refused before anything is written).
    pub fn open(dir: &Path) -> Result<CzSource> {
        let image = CzImage::open(dir)?;
        let layout = &image.layout;
        layout.check().map_err(|why| {
            Error::Corrupt(format!("{}: the partition layout its files give is not possible: {why}", dir.display()))
        })?;
        let mut streams = Vec::new();
        if layout.kind != TableKind::None {
            let mut boot = stream_info("boot".into(), StreamKind::Boot, None, 0, layout.disk_size);
            boot.method_reason = "partition table, boot code and hidden data, from Clonezilla's files".into();
            let stored = image.boot.iter().map(|(_, b)| b.len() as u64).sum();
            streams.push(CzStream { info: boot, origin: Origin::Bytes(image.boot.clone()), stored, skip_zero: true });
        }
        for part in &image.partitions {
            let p = layout.partitions.iter().find(|p| p.number == part.number).ok_or_else(|| {
                Error::Corrupt(format!(
                    "{}: {} has an image but no entry in the partition table",
                    dir.display(),
                    part.device
                ))
            })?;
            let source = open_stream(part)?;
            let file = part.pieces[0].display().to_string();
            if source.device_size() > p.size {
                return Err(Error::Corrupt(format!(
                    "{file}: the image is of a {}-byte filesystem but partition {} holds only {} bytes",
                    source.device_size(),
                    part.number,
                    p.size
                )));
            }
            let (kind, name) = match layout.kind {
                TableKind::None => (StreamKind::Disk, "disk".to_string()),
                _ => (StreamKind::Partition, format!("p{}", part.number)),
            };
            let mut info =
                stream_info(name, kind, Some(part.number).filter(|_| kind == StreamKind::Partition), p.start, p.size);
            let every = holds_every_byte(part);
            info.method = if every { "raw".into() } else { fstype_of(&part.fs) };
            info.method_reason = format!("from Clonezilla's {}", source.describe());
            info.fill = if every { Fill::Zero } else { Fill::Free };
            if part.fs != "dd" {
                info.fs = Some(FsInfo { fstype: fstype_of(&part.fs), label: None, uuid: None });
            }
            if !every {
                info.fs_block_size = Some(source.block_size());
                info.fs_total_bytes = Some(source.device_size());
                info.fs_used_bytes = Some(source.stored_bytes());
            }
            let stored = source.stored_bytes() + ntfs_backup_len(part);
            streams.push(CzStream {
                info,
                origin: Origin::Image { part: part.clone(), source },
                stored,
                skip_zero: every,
            });
        }
        for sw in &image.swap {
            let Some(p) = layout.partitions.iter().find(|p| p.number == sw.number) else { continue };
            let mut info =
                stream_info(format!("p{}", sw.number), StreamKind::Partition, Some(sw.number), p.start, p.size);
            info.method = "swap".into();
            info.method_reason = "a fresh swap header with the UUID and label Clonezilla recorded".into();
            info.fs = Some(FsInfo { fstype: "swap".into(), label: sw.label.clone(), uuid: sw.uuid.clone() });
            let header = swap_header(p.size, sw.uuid.as_deref(), sw.label.as_deref());
            let stored = header.len() as u64;
            streams.push(CzStream { info, origin: Origin::Bytes(vec![(p.start, header)]), stored, skip_zero: false });
        }
        for g in &image.lvm {
            let p = layout.partitions.iter().find(|p| p.number == g.partition).ok_or_else(|| {
                Error::Corrupt(format!(
                    "{}: volume group {} is on partition {}, which the table does not hold",
                    dir.display(),
                    g.vg.name,
                    g.partition
                ))
            })?;
            let (info, origin, stored) = lvm::stream(g, p)?;
            streams.push(CzStream { info, origin, stored, skip_zero: false });
        }
        for v in &image.luks {
            let p = layout.partitions.iter().find(|p| p.number == v.number).ok_or_else(|| {
                Error::Corrupt(format!("{}: LUKS volume {} is not in the partition table", dir.display(), v.device))
            })?;
            let (info, origin, stored) = luks::stream(v, p)?;
            streams.push(CzStream { info, origin, stored, skip_zero: false });
        }
        // Streams in disk order, as klon's own images have them.
        streams.sort_by_key(|s| (s.info.kind != StreamKind::Boot, s.info.start));
        Ok(CzSource { image, streams })
    }

    /// The streams as a klon manifest describes them (sizes from headers).
    pub fn stream_infos(&self) -> Vec<StreamInfo> {
        self.streams
            .iter()
            .map(|s| {
                let mut i = s.info.clone();
                i.stored_bytes = s.stored;
                i
            })
            .collect()
    }

    /// Unlocks the key of every LUKS volume (of those on the partitions
    /// `only`, if given) with the passphrase (`--passphrase-file`, `KLON_PASSPHRASE`, or typed
    /// when asked), which what writes them (restore, convert) needs. A
    /// passphrase that opens none of a volume's keyslots is an
    /// [`Error::Key`].
    pub fn unlock(&mut self, only: Option<&[u32]>) -> Result<()> {
        let dir = self.image.dir.clone();
        let wanted = |s: &CzStream| only.is_none_or(|o| s.info.partition.is_some_and(|n| o.contains(&n)));
        // A passphrase that opened one volume is tried on the next before
        // asking again (volumes of one machine mostly share one).
        let mut opened: Vec<String> = Vec::new();
        for s in self.streams.iter_mut().filter(|s| wanted(s)) {
            let Origin::Luks(volume) = &mut s.origin else { continue };
            if volume.unlocked() {
                continue;
            }
            let mut known = false;
            for p in &opened {
                if volume.unlock(p)? {
                    known = true;
                    break;
                }
            }
            if known {
                continue;
            }
            let what = format!("{} of the Clonezilla image {}", volume.name(), dir.display());
            let passphrase = crate::repo::crypto::passphrase(&what, false)?;
            if !volume.unlock(&passphrase)? {
                return Err(Error::Key(format!(
                    "the passphrase does not unlock {what}: give the one the volume was made with \
                     (KLON_PASSPHRASE, --passphrase-file, or typed when asked); nothing was written"
                )));
            }
            opened.push(passphrase);
        }
        Ok(())
    }

    /// Bytes all streams yield.
    pub fn stored_bytes(&self) -> u64 {
        self.streams.iter().map(|s| s.stored).sum()
    }

    /// Reads every stream in `order` and hands its bytes to `send` in jobs
    /// of at most one chunk (and MAX_EXTENTS extents) of one stream. Stops
    /// early (Ok) when `send` says the pipeline stopped.
    fn read_jobs(&mut self, order: &[usize], send: &mut dyn FnMut(ReadJob) -> bool) -> Result<()> {
        self.read_jobs_in(order, None, send)
    }

    /// [`Self::read_jobs`], with no job crossing a multiple of `window`.
    fn read_jobs_in(
        &mut self,
        order: &[usize],
        window: Option<u64>,
        send: &mut dyn FnMut(ReadJob) -> bool,
    ) -> Result<()> {
        let mut jobs = JobFiller::new(window);
        for &si in order {
            let s = &mut self.streams[si];
            let skip_zero = s.skip_zero;
            let place = describe(&s.info);
            let (start, length) = (s.info.start, s.info.length);
            let mut push = |offset: u64, bytes: &[u8]| jobs.push(si, skip_zero, offset, bytes, send);
            match &mut s.origin {
                Origin::Bytes(areas) => {
                    for (offset, bytes) in areas.iter() {
                        for (i, piece) in bytes.chunks(CHUNK_SIZE as usize).enumerate() {
                            if !push(offset + (i * CHUNK_SIZE as usize) as u64, piece) {
                                return Ok(());
                            }
                        }
                    }
                }
                Origin::Pv(pv) => {
                    if !pv.read(start, &mut push)? {
                        return Ok(());
                    }
                }
                Origin::Luks(volume) => {
                    if !volume.read(&mut |at, bytes| push(start + at, bytes))? {
                        return Ok(());
                    }
                }
                Origin::Image { part, source } => {
                    let mut end = 0u64;
                    let mut boot_sector: Option<Vec<u8>> = None;
                    while let Some((offset, bytes)) = source.next_run(CHUNK_SIZE as usize)? {
                        super::cancel::check("reading the Clonezilla image")?;
                        if offset < end || offset + bytes.len() as u64 > length {
                            return Err(Error::Corrupt(format!(
                                "{}: data at partition offset {offset} ({} bytes) lies outside {place} or out of order",
                                part.pieces[0].display(),
                                bytes.len()
                            )));
                        }
                        if offset == 0 && part.fs == "ntfs" && bytes.len() >= 512 {
                            boot_sector = Some(bytes[..512].to_vec());
                        }
                        end = offset + bytes.len() as u64;
                        if !push(start + offset, &bytes) {
                            return Ok(());
                        }
                    }
                    // partclone leaves NTFS's backup boot sector out; the
                    // filesystem's checker wants it: a copy of the boot
                    // sector at the sector after the volume's last.
                    if let Some(boot) = boot_sector
                        && let Some(at) = ntfs_backup_offset(&boot, length)
                        && at >= end
                        && !push(start + at, &boot)
                    {
                        return Ok(());
                    }
                }
            }
        }
        jobs.finish(send);
        Ok(())
    }
}

/// Bytes of the NTFS backup boot sector added to a partition's stream.
fn ntfs_backup_len(part: &CzPartition) -> u64 {
    if part.fs == "ntfs" && part.kind == ImageKind::Partclone { 512 } else { 0 }
}

/// Where NTFS keeps its backup boot sector, from the boot sector: the
/// sector after the volume's last (the volume is one sector shorter than
/// its partition), when that is inside a partition of `part_len` bytes.
fn ntfs_backup_offset(boot: &[u8], part_len: u64) -> Option<u64> {
    if boot.len() < 512 || &boot[3..11] != b"NTFS    " {
        return None;
    }
    let bps = u16::from_le_bytes([boot[11], boot[12]]) as u64;
    let sectors = u64::from_le_bytes(boot[0x28..0x30].try_into().ok()?);
    if !(256..=4096).contains(&bps) || bps != 512 {
        // The copy is one sector of the volume's sector size; klon writes
        // the 512-byte boot sector only where that is the whole sector.
        return None;
    }
    let at = sectors.checked_mul(bps)?;
    (at + bps <= part_len).then_some(at)
}

/// Reads every byte of a Clonezilla image, checking partclone's checksums,
/// the bitmaps and the checksum files (MD5SUMS, ...) when present.
pub fn verify(src: &mut CzSource, feedback: &Feedback) -> Result<VerifyReport> {
    let started = Instant::now();
    let dir = src.image.dir.clone();
    for f in &src.image.checksum_files {
        let n = crate::clonezilla::checksums::check_file(&dir, f)?;
        feedback.note(&format!("{}: {n} files match", f.display()));
    }
    let infos = src.stream_infos();
    let parts = infos.iter().map(|s| (describe(s), s.stored_bytes)).collect();
    let mut progress = feedback.meter("verify", src.stored_bytes(), parts);
    let order: Vec<usize> = (0..infos.len()).collect();
    let (mut chunks, mut bytes) = (0u64, 0u64);
    src.read_jobs(&order, &mut |job| {
        chunks += 1;
        bytes += job.buf.len() as u64;
        progress.add_part(job.stream, job.buf.len() as u64);
        true
    })?;
    progress.finish();
    Ok(VerifyReport { streams: infos.len(), chunks, bytes, seconds: started.elapsed().as_secs_f64() })
}

/// What the read-back compares for one job.
enum Written {
    /// blake3 of the bytes of `extents`.
    Hash { stream: usize, extents: Vec<Extent>, hash: [u8; 32] },
    /// The bytes themselves (areas outside partitions, where parts may be
    /// rewritten by the table fix-up and must be left out of the compare).
    Bytes { stream: usize, extents: Vec<Extent>, bytes: Vec<u8> },
}

impl Written {
    fn stream(&self) -> usize {
        match self {
            Written::Hash { stream, .. } | Written::Bytes { stream, .. } => *stream,
        }
    }

    fn extents(&self) -> &[Extent] {
        match self {
            Written::Hash { extents, .. } | Written::Bytes { extents, .. } => extents,
        }
    }
}

/// Restores a Clonezilla image onto the target, which passed every refusal
/// (see [`super::source::prepare_restore`]). The caller has confirmed.
pub fn restore(source: &mut CzSource, target: &Disk, opts: &RestoreOptions) -> Result<RestoreReport> {
    let started = Instant::now();
    source.unlock(None)?;
    let layout = source.image.layout.clone();
    let infos = source.stream_infos();
    // Filled while writing, read by the read-back.
    let log: std::cell::RefCell<Vec<Written>> = std::cell::RefCell::new(Vec::new());
    let written = write_disk(
        "restore",
        target,
        &layout,
        opts.grow_last,
        opts.verify_after,
        |area| write_streams(source, &infos, target, area, &log, opts),
        |skip| read_back(target, &infos, log.take(), skip, Shift::default(), None, opts),
    )?;
    let mut report = RestoreReport::new(written, opts.verify_after, started);
    if opts.grow_last {
        report.growth = super::grow::grow_last(target, &layout);
        report.seconds = started.elapsed().as_secs_f64();
    }
    Ok(report)
}

/// Writes partition `number` of a Clonezilla image (a disk's or a
/// saveparts image) onto the target at byte `to`, and nothing else; the
/// target passed every refusal. The caller has confirmed.
pub fn restore_partition(
    source: &mut CzSource,
    number: u32,
    target: &Disk,
    to: u64,
    opts: &RestoreOptions,
) -> Result<RestoreReport> {
    let started = Instant::now();
    let infos = source.stream_infos();
    let si = infos.iter().position(|s| s.partition == Some(number)).ok_or_else(|| {
        Error::Usage(format!(
            "the Clonezilla image at {} holds no image of partition {number}",
            source.image.dir.display()
        ))
    })?;
    source.unlock(Some(&[number]))?;
    let log: std::cell::RefCell<Vec<Written>> = std::cell::RefCell::new(Vec::new());
    let written = write_part(
        "restore",
        target,
        si,
        (infos[si].start, infos[si].length),
        infos[si].length,
        to,
        opts.verify_after,
        |area| write_streams(source, &infos, target, area, &log, opts),
        |skip, shift| read_back(target, &infos, log.take(), skip, shift, Some(si), opts),
    )?;
    Ok(RestoreReport::new(written, opts.verify_after, started))
}

/// Writes the streams `area` selects onto the target, logging for the
/// read-back what each job wrote.
fn write_streams(
    source: &mut CzSource,
    infos: &[StreamInfo],
    target: &Disk,
    area: &WriteArea,
    log: &std::cell::RefCell<Vec<Written>>,
    opts: &RestoreOptions,
) -> Result<u64> {
    let order: Vec<usize> = write_order(infos).into_iter().filter(|&si| area.only.is_none_or(|o| o == si)).collect();
    let parts = infos.iter().map(|s| (describe(s), s.stored_bytes)).collect();
    let total = order.iter().map(|&si| infos[si].stored_bytes).sum();
    let mut progress = opts.feedback.meter("restore", total, parts);
    let mut out = TargetWriter::new(target, infos, area)?;
    let keep_hashes = opts.verify_after;
    pipeline::run(
        opts.workers,
        pipeline::depth(opts.workers),
        |send| source.read_jobs(&order, send),
        |job: ReadJob| {
            let hash = if keep_hashes { *blake3::hash(&job.buf).as_bytes() } else { [0; 32] };
            Ok((job, hash))
        },
        |(job, hash): (ReadJob, [u8; 32])| {
            out.write(job.stream, &job.extents, &job.buf)?;
            progress.add_part(job.stream, job.buf.len() as u64);
            if keep_hashes {
                // Bytes written into the held table areas are compared byte by
                // byte, as the read-back before they are written leaves them out.
                let keep_bytes = infos[job.stream].kind == StreamKind::Boot || area.holds_any(&job.extents);
                log.borrow_mut().push(if keep_bytes {
                    Written::Bytes { stream: job.stream, extents: job.extents, bytes: job.buf.to_vec() }
                } else {
                    Written::Hash { stream: job.stream, extents: job.extents, hash }
                });
            }
            Ok(())
        },
    )?;
    let n = out.finish()?;
    progress.finish();
    Ok(n)
}

/// Reads back what the restore wrote (and the zeros it wrote into the
/// gaps of raw partitions) and compares.
fn read_back(
    target: &Disk,
    infos: &[StreamInfo],
    log: Vec<Written>,
    skip: &[Extent],
    shift: Shift,
    only: Option<usize>,
    opts: &RestoreOptions,
) -> Result<()> {
    // Pieces are read and compared where they landed on the target.
    let skip = &shift.extents(skip)[..];
    // Raw partitions: the gaps between stored runs must read back as zeros.
    let mut gaps: Vec<(usize, Extent)> = Vec::new();
    for (si, s) in infos.iter().enumerate().filter(|&(si, s)| s.fill == Fill::Zero && only.is_none_or(|o| o == si)) {
        let mut covered: Vec<Extent> =
            log.iter().filter(|w| w.stream() == si).flat_map(|w| w.extents().iter().copied()).collect();
        covered.sort();
        for (a, l) in minus(s.start, s.length, &covered) {
            gaps.extend(super::backup::pieces(a, l, CHUNK_SIZE as u64).map(|piece| (si, piece)));
        }
    }
    let total: u64 = log.iter().flat_map(|w| w.extents()).chain(gaps.iter().map(|(_, g)| g)).map(|e| e.1).sum();
    read_back::run(
        target,
        total,
        opts.workers,
        &opts.feedback,
        |target, send| {
            for w in log {
                super::cancel::check("read-back")?;
                let (stream, extents, expected) = match w {
                    Written::Hash { stream, extents, hash } => {
                        let extents = shift.extents(&extents);
                        if extents.iter().any(|&(a, l)| intersects(a, l, skip)) {
                            return Err(Error::VerifyAfter(format!(
                                "{}: partition data overlaps the partition table areas; cannot compare it",
                                describe(&infos[stream])
                            )));
                        }
                        (stream, extents, Expected::Hash(hash))
                    }
                    Written::Bytes { stream, extents, bytes } => {
                        (stream, shift.extents(&extents), Expected::Bytes(bytes.into()))
                    }
                };
                if !send((stream, target.piece(extents, expected)?)) {
                    return Ok(());
                }
            }
            for (stream, gap) in gaps {
                if !send((stream, target.piece(shift.extents(&[gap]), Expected::Zeros)?)) {
                    return Ok(());
                }
            }
            Ok(())
        },
        |(stream, piece): (usize, Piece)| piece.check(&describe(&infos[stream]), "the Clonezilla image", skip),
    )
}

/// Options of a conversion.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// zstd level.
    pub level: i32,
    /// Largest data file.
    pub split_size: u64,
    /// Where progress, warnings and notes go.
    pub feedback: Feedback,
    /// Worker threads.
    pub workers: usize,
}

/// What a finished conversion reports.
#[derive(Debug)]
pub struct ConvertReport {
    /// The new klon image.
    pub image: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// Content bytes converted.
    pub bytes: u64,
    /// Bytes of the new image's files.
    pub image_bytes: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Turns the Clonezilla image at `cz_dir` into a new klon image at
/// `image_dir`: the same streams a backup of the disk would have (the
/// partition images' used blocks, the areas outside partitions), every
/// checksum of the Clonezilla image checked on the way. Written under a
/// partial name and renamed only when complete.
pub fn convert(cz_dir: &Path, image_dir: &Path, opts: &ConvertOptions) -> Result<ConvertReport> {
    let started = Instant::now();
    if opts.split_size < super::backup::MIN_SPLIT {
        return Err(Error::Usage(format!("--split must be at least {} MiB", super::backup::MIN_SPLIT >> 20)));
    }
    let decrypted = decrypted(cz_dir)?;
    let (mut src, source_info) = open_for_convert(cz_dir, decrypted.as_ref().map(|d| d.path()), opts.level)?;
    let infos = src.stream_infos();
    let mut sink = ImageDirSink::create(image_dir, opts.split_size, &infos, opts.level)?;
    let parts = infos.iter().map(|s| (describe(s), s.stored_bytes)).collect();
    let order: Vec<usize> = (0..infos.len()).collect();
    let filled = super::sink::fill(&mut sink, "convert", parts, opts.workers, &opts.feedback, |send| {
        src.read_jobs(&order, send)
    });
    if let Err(e) = filled {
        return Err(sink.abandon(e));
    }
    let layout = src.image.layout.clone();
    let (image, manifest) = sink.commit(Finished { source: source_info, layout, streams: infos, level: opts.level })?;
    let image_bytes = super::backup::image_size(&manifest);
    let bytes = src.stored_bytes();
    Ok(ConvertReport { image, manifest, bytes, image_bytes, seconds: started.elapsed().as_secs_f64() })
}

/// Turns the Clonezilla image at `cz_dir` into a new snapshot of the
/// repository at `repo` (created when it does not exist or is empty), as
/// a backup of the disk would be: only what the repository lacks is
/// stored. Every checksum of the Clonezilla image is checked on the way.
pub fn convert_to_repository(
    cz_dir: &Path,
    repo: &Path,
    opts: &ConvertOptions,
    sopts: &super::snapshot::SnapshotOptions,
) -> Result<super::snapshot::SnapshotReport> {
    let started = Instant::now();
    let decrypted = decrypted(cz_dir)?;
    let (mut src, source_info) = open_for_convert(cz_dir, decrypted.as_ref().map(|d| d.path()), opts.level)?;
    let infos = src.stream_infos();
    let mut sink = super::snapshot::SnapshotSink::open(repo, sopts, &source_info, opts.level, &opts.feedback)?;
    let parts = infos.iter().map(|s| (describe(s), s.stored_bytes)).collect();
    let order: Vec<usize> = (0..infos.len()).collect();
    let window = sink.window();
    let filled = super::sink::fill(&mut sink, "convert", parts, opts.workers, &opts.feedback, |send| {
        src.read_jobs_in(&order, window, send)
    });
    if let Err(e) = filled {
        return Err(sink.abandon(e));
    }
    let layout = src.image.layout.clone();
    let mut report = sink.commit(Finished { source: source_info, layout, streams: infos, level: opts.level })?;
    report.read_bytes = src.stored_bytes();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The Clonezilla image at `cz_dir` decrypted, when it was saved encrypted
/// (gocryptfs): mounted until the returned value is dropped.
fn decrypted(cz_dir: &Path) -> Result<Option<super::source::gocryptfs::Decrypted>> {
    use super::source::gocryptfs;
    gocryptfs::is_encrypted(cz_dir).then(|| gocryptfs::decrypt(cz_dir)).transpose()
}

/// Opens the Clonezilla image at `cz_dir` (its files in `decrypted` when it
/// is encrypted) for a conversion, its checksum files checked; and what the
/// new image records of its disk.
fn open_for_convert(cz_dir: &Path, decrypted: Option<&Path>, level: i32) -> Result<(CzSource, SourceInfo)> {
    if !(1..=22).contains(&level) {
        return Err(Error::Usage(format!("compression level {level} is out of range: use 1 to 22")));
    }
    let dir = decrypted.unwrap_or(cz_dir);
    let mut src = CzSource::open(dir)?;
    src.unlock(None)?;
    for f in &src.image.checksum_files {
        crate::clonezilla::checksums::check_file(dir, f)?;
    }
    let layout = &src.image.layout;
    let source_info = SourceInfo {
        path: format!("{} (Clonezilla image of {})", cz_dir.display(), src.image.disk),
        size: layout.disk_size,
        logical_sector_size: layout.sector_size,
        physical_sector_size: layout.sector_size,
        model: None,
        serial: None,
        transport: Some("clonezilla".into()),
    };
    Ok((src, source_info))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swap_header_is_what_the_kernel_reads() {
        let page = swap_header(64 << 20, Some("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"), Some("myswap"));
        assert_eq!(&page[4086..], b"SWAPSPACE2");
        assert_eq!(u32::from_le_bytes(page[1024..1028].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(page[1028..1032].try_into().unwrap()), (64 << 20) / 4096 - 1);
        assert_eq!(page[1036], 0x0f);
        assert_eq!(page[1051], 0xf0);
        assert_eq!(&page[1052..1058], b"myswap");
    }

    #[test]
    fn read_back_catches_changed_bytes_and_non_zero_gaps() {
        use crate::testutil::{Rng, TempDir};
        use std::os::unix::fs::FileExt;
        const MIB: u64 = 1 << 20;
        let t = TempDir::new("cz-read-back");
        let path = t.join("target.img");
        // What a restore wrote: a boot area kept byte for byte, and runs of
        // a raw partition (1 MiB .. 9 MiB) kept by hash, its gaps zeros.
        let mut disk = vec![0u8; (10 * MIB) as usize];
        let mut rng = Rng::seeded(11);
        disk[..4096].copy_from_slice(&rng.bytes(4096));
        let runs = [(MIB, 2 * MIB), (5 * MIB, MIB)];
        for &(a, l) in &runs {
            disk[a as usize..(a + l) as usize].copy_from_slice(&rng.bytes(l as usize));
        }
        std::fs::write(&path, &disk).unwrap();
        let mut target = Disk::open_target(&path, None).unwrap();
        target.enable_direct_reads();
        let boot = stream_info("boot".into(), StreamKind::Boot, None, 0, MIB);
        let mut raw = stream_info("p1".into(), StreamKind::Partition, Some(1), MIB, 8 * MIB);
        raw.fill = Fill::Zero;
        let infos = [boot, raw];
        let log = || {
            let mut log = vec![Written::Bytes { stream: 0, extents: vec![(0, 4096)], bytes: disk[..4096].to_vec() }];
            log.extend(runs.iter().map(|&(a, l)| Written::Hash {
                stream: 1,
                extents: vec![(a, l)],
                hash: *blake3::hash(&disk[a as usize..(a + l) as usize]).as_bytes(),
            }));
            log
        };
        let opts = RestoreOptions { grow_last: false, verify_after: true, feedback: Feedback::silent(), workers: 2 };
        let poke = |at: u64, byte: u8| {
            std::fs::OpenOptions::new().write(true).open(&path).unwrap().write_all_at(&[byte], at).unwrap()
        };

        read_back(&target, &infos, log(), &[], Shift::default(), None, &opts).unwrap();
        // A changed byte in the boot area, then one in a run: each is caught.
        for at in [100, 5 * MIB + 77] {
            poke(at, !disk[at as usize]);
            let e = read_back(&target, &infos, log(), &[], Shift::default(), None, &opts).unwrap_err().to_string();
            assert!(e.contains("differs from the Clonezilla image"), "{e}");
            poke(at, disk[at as usize]);
        }
        // A changed byte the table fix-up may rewrite is left out.
        poke(100, !disk[100]);
        read_back(&target, &infos, log(), &[(64, 64)], Shift::default(), None, &opts).unwrap();
        poke(100, disk[100]);
        // A non-zero byte in a gap of the raw partition.
        poke(4 * MIB + 9, 1);
        let e = read_back(&target, &infos, log(), &[], Shift::default(), None, &opts).unwrap_err().to_string();
        assert!(e.contains(&format!("byte at disk offset {} should be zero", 4 * MIB + 9)), "{e}");
    }

    #[test]
    fn ntfs_backup_boot_sector_is_after_the_volume() {
        let mut boot = vec![0u8; 512];
        boot[3..11].copy_from_slice(b"NTFS    ");
        boot[11..13].copy_from_slice(&512u16.to_le_bytes());
        boot[0x28..0x30].copy_from_slice(&2047u64.to_le_bytes());
        assert_eq!(ntfs_backup_offset(&boot, 2048 * 512), Some(2047 * 512));
        assert_eq!(ntfs_backup_offset(&boot, 2047 * 512), None);
        boot[3] = b'X';
        assert_eq!(ntfs_backup_offset(&boot, 2048 * 512), None);
    }
}
