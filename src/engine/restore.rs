//! Restore: image -> disk, to the same or a larger disk.
//!
//! Order of work: refuse what cannot work before touching the target; wipe
//! the target's table areas; write every partition; write the area outside
//! partitions (tables, boot code) last; fix the table up for a larger disk;
//! sync, re-read the table, and read everything back. If anything fails
//! after the first write, the table areas are wiped again so a half-restored
//! disk cannot be mistaken for a good one.

use std::path::Path;
use std::time::Instant;

use super::feedback::Feedback;
use super::pipeline;
use super::read_back::{self, Expected, Piece};
use super::streams::describe;
use super::target::{Shift, TargetWriter, WriteArea, intersects, write_disk, write_order, write_part};
use crate::device::Disk;
use crate::device::direct::IoBuf;
use crate::error::{Error, Result};
use crate::image::format::{CHUNK_SIZE, Extent};
use crate::image::{ChunkStore, Fill, StoredChunk, StreamKind};

/// Options of a restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Extend the last partition's entry to the end of a larger disk.
    pub grow_last: bool,
    /// Read everything back after writing and compare.
    pub verify_after: bool,
    /// Where progress, warnings and notes go.
    pub feedback: Feedback,
    /// Worker threads.
    pub workers: usize,
}

/// What a finished restore reports.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// Content bytes written.
    pub bytes_written: u64,
    /// Whether a read-back compared everything.
    pub verified: bool,
    /// Whether the kernel re-read the target's partition table:
    /// `Some(false)` for a block device that cannot hold partitions (a loop
    /// device without partition scanning, a logical volume, md, nbd), `None`
    /// for a file.
    pub table_reread: Option<bool>,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// With `grow_last`, what became of the grown partition's filesystem.
    pub growth: Option<super::grow::Growth>,
    /// With partitions laid out anew (a smaller disk, `--grow-all`): what
    /// became of each filesystem that shrank or grew.
    pub resized: Vec<super::grow::Growth>,
}

/// Writes the image whose chunks `reader` reads onto the
/// target, which passed every refusal (see
/// [`super::source::prepare_restore`]). The caller has confirmed.
pub fn restore(reader: &dyn ChunkStore, target: &Disk, opts: &RestoreOptions) -> Result<RestoreReport> {
    let started = Instant::now();
    let layout = reader.manifest().layout.clone();
    let written = write_disk(
        "restore",
        target,
        &layout,
        opts.grow_last,
        opts.verify_after,
        |area| write_all(reader, target, area, opts),
        |skip| read_back(reader, target, skip, Shift::default(), None, None, opts),
    )?;
    let mut report = RestoreReport::new(written, opts.verify_after, started);
    if opts.grow_last {
        report.growth = super::grow::grow_last(target, &layout);
        report.seconds = started.elapsed().as_secs_f64();
    }
    Ok(report)
}

/// Writes partition `number` of the image onto the target at byte `to`,
/// and nothing else; the target passed every refusal (see
/// [`super::source::prepare_partition_restore`]). The caller has confirmed.
pub fn restore_partition(
    reader: &dyn ChunkStore,
    number: u32,
    target: &Disk,
    to: u64,
    opts: &RestoreOptions,
) -> Result<RestoreReport> {
    let started = Instant::now();
    let streams = &reader.manifest().streams;
    if streams.iter().any(|s| s.kind == StreamKind::Rescued) {
        return Err(Error::Unsupported(
            "this image holds sectors a rescue read late (klon backup --rescue); restoring one partition of \
             it is not there yet: restore the whole disk"
                .into(),
        ));
    }
    let si = streams
        .iter()
        .position(|s| s.partition == Some(number))
        .ok_or_else(|| Error::Usage(format!("the image holds no stream for partition {number}")))?;
    let (start, length) = (streams[si].start, streams[si].length);
    let written = restore_range(reader, si, (start, length), length, target, to, opts)?;
    Ok(RestoreReport::new(written, opts.verify_after, started))
}

/// Writes the first `keep` bytes of stream `si` (the source range `part`)
/// onto the target at byte `to`, and nothing else, then reads them back
/// (see [`write_part`]). Less than the whole range is kept for a partition
/// that shrinks on a smaller disk, or for the area before the first
/// partition (boot code) of a disk whose table is rebuilt.
pub(super) fn restore_range(
    reader: &dyn ChunkStore,
    si: usize,
    part: Extent,
    keep: u64,
    target: &Disk,
    to: u64,
    opts: &RestoreOptions,
) -> Result<super::target::DiskWritten> {
    let cut = (keep < part.1).then_some(part.0 + keep);
    write_part(
        "restore",
        target,
        si,
        part,
        keep,
        to,
        opts.verify_after,
        |area| write_all(reader, target, area, opts),
        |skip, shift| read_back(reader, target, skip, shift, Some(si), cut, opts),
    )
}

impl RestoreReport {
    /// What to tell the person when the kernel could not re-read the table
    /// written on `target` (a device that cannot hold partitions).
    pub fn table_note(&self, target: &Path) -> Option<String> {
        (self.table_reread == Some(false)).then(|| {
            format!(
                "{} cannot hold partitions (a loop device without partition scanning, a logical volume, \
                 an md array or an nbd device), so the kernel did not re-read the table written on it; \
                 its partitions appear where the disk is used whole (in a virtual machine, or with `losetup -P`)",
                target.display()
            )
        })
    }

    /// What `--grow-last` did to the grown partition's filesystem (a
    /// warning when it keeps its size).
    pub fn growth_note(&self) -> Option<String> {
        self.growth.as_ref().map(|g| if g.grown { g.note.clone() } else { format!("Warning: {}", g.note) })
    }

    /// The report of a job that wrote a whole disk, started at `started`.
    pub fn new(written: super::target::DiskWritten, verified: bool, started: Instant) -> RestoreReport {
        RestoreReport {
            bytes_written: written.bytes,
            verified,
            table_reread: written.table_reread,
            seconds: started.elapsed().as_secs_f64(),
            growth: None,
            resized: Vec::new(),
        }
    }
}

fn write_all(reader: &dyn ChunkStore, target: &Disk, area: &WriteArea, opts: &RestoreOptions) -> Result<u64> {
    let streams = &reader.manifest().streams;
    let order: Vec<usize> = write_order(streams).into_iter().filter(|&si| area.only.is_none_or(|o| o == si)).collect();
    let total = match area.only {
        Some(si) => streams[si].stored_bytes,
        None => super::verify::stored_total(reader.location(), streams)?,
    };
    opts.feedback.detail(1, || {
        let order: Vec<String> = order.iter().map(|&si| describe(&streams[si])).collect();
        format!("restore: {} workers; streams written in this order: {}", opts.workers, order.join(", "))
    });
    // A progress bar per stream (partition).
    let parts = streams.iter().map(|s| (describe(s), s.stored_bytes)).collect();
    let mut progress = opts.feedback.meter("restore", total, parts);
    let mut out = TargetWriter::new(target, streams, area)?;
    pipeline::run(
        opts.workers,
        pipeline::depth(opts.workers),
        |send| {
            for &si in &order {
                reader.for_each_chunk(si, &mut |c| {
                    super::cancel::check("restore")?;
                    Ok(send(c))
                })?;
            }
            Ok(())
        },
        |c: StoredChunk| {
            let (stream, extents) = (c.stream, c.header.extents.clone());
            Ok((stream, extents, c.decode()?))
        },
        |(stream, extents, content): (usize, Vec<Extent>, IoBuf)| {
            out.write(stream, &extents, &content)?;
            progress.add_part(stream, content.len() as u64);
            Ok(())
        },
    )?;
    let written = out.finish()?;
    progress.finish();
    Ok(written)
}

/// A piece of the target to compare, and the image chunk when some of it
/// must be compared byte by byte (parts were rewritten after the restore):
/// then decoded on a worker.
struct Check {
    stream: usize,
    piece: Piece,
    image: Option<Box<StoredChunk>>,
    /// For a chunk a cut goes through: how many of its bytes were written.
    prefix: Option<usize>,
}

/// Reads back everything the restore wrote and compares it with the image.
/// Reads back what the restore wrote (every stream, or the `only` one) and
/// compares it with the image; `shift` says where it landed on the target,
/// `skip` (source offsets) what is not to be compared, `cut` (a source
/// offset) where the written range ended early: nothing past it is read.
#[allow(clippy::too_many_arguments)]
fn read_back(
    reader: &dyn ChunkStore,
    target: &Disk,
    skip: &[Extent],
    shift: Shift,
    only: Option<usize>,
    cut: Option<u64>,
    opts: &RestoreOptions,
) -> Result<()> {
    let streams = &reader.manifest().streams;
    let order: Vec<usize> = write_order(streams).into_iter().filter(|&si| only.is_none_or(|o| o == si)).collect();
    let total: u64 = order
        .iter()
        .map(|&i| if streams[i].fill == Fill::Zero { streams[i].length } else { streams[i].stored_bytes })
        .sum();
    // Sectors a rescue read late were written over the zeros the other
    // streams hold there: those streams are compared around them.
    let mut overlay: Vec<Extent> = Vec::new();
    for (si, _) in streams.iter().enumerate().filter(|(_, s)| s.kind == StreamKind::Rescued) {
        for seq in 0..reader.chunk_count(si) {
            overlay.extend(reader.read_header(si, seq as u64)?.extents);
        }
    }
    // Pieces are read and compared where they landed on the target.
    let skip_target = shift.extents(skip);
    let mut skip_under: Vec<Extent> = skip.iter().copied().chain(overlay.iter().copied()).collect();
    skip_under.sort();
    let skip_under_target = shift.extents(&skip_under);
    let skip_for = |si: usize| {
        if streams[si].kind == StreamKind::Rescued { &skip_target[..] } else { &skip_under_target[..] }
    };
    read_back::run(
        target,
        total,
        opts.workers,
        &opts.feedback,
        |target, send| {
            for &si in &order {
                let s = &streams[si];
                let mut cursor = s.start;
                let zeros_upto = |send: &mut dyn FnMut(Check) -> bool, from: u64, to: u64| -> Result<bool> {
                    let to = cut.map_or(to, |c| to.min(c));
                    if s.fill != Fill::Zero || from >= to {
                        return Ok(true);
                    }
                    for (off, len) in super::backup::pieces(from, to.saturating_sub(from), CHUNK_SIZE as u64) {
                        for (a, l) in super::target::minus(off, len, &overlay) {
                            let piece = target.piece(vec![(shift.at(a), l)], Expected::Zeros)?;
                            if !send(Check { stream: si, piece, image: None, prefix: None }) {
                                return Ok(false);
                            }
                        }
                    }
                    Ok(true)
                };
                for seq in 0..reader.chunk_count(si) as u64 {
                    super::cancel::check("read-back")?;
                    let header = reader.read_header(si, seq)?;
                    let first = header.extents[0].0;
                    if !zeros_upto(send, cursor, first)? {
                        return Ok(());
                    }
                    let last = *header.extents.last().expect("a chunk has extents");
                    let kept = match cut {
                        Some(c) => super::target::minus_from(&header.extents, c),
                        None => header.extents.clone(),
                    };
                    if kept.is_empty() {
                        break;
                    }
                    // A chunk the cut goes through is compared byte by byte, up to the cut.
                    let prefix = (kept != header.extents).then(|| kept.iter().map(|e| e.1 as usize).sum::<usize>());
                    let landed = shift.extents(&kept);
                    let image = if prefix.is_some() || landed.iter().any(|&(a, l)| intersects(a, l, skip_for(si))) {
                        Some(Box::new(reader.read_chunk(si, seq)?))
                    } else {
                        None
                    };
                    cursor = last.0 + last.1;
                    let expected = match reader.hash_key() {
                        Some(key) => Expected::KeyedHash(key, header.content_hash),
                        None => Expected::Hash(header.content_hash),
                    };
                    let piece = target.piece(landed, expected)?;
                    if !send(Check { stream: si, piece, image, prefix }) {
                        return Ok(());
                    }
                }
                if !zeros_upto(send, cursor, s.start + s.length)? {
                    return Ok(());
                }
            }
            Ok(())
        },
        |Check { stream, mut piece, image, prefix }: Check| {
            if let Some(chunk) = image {
                let content = (*chunk).decode()?;
                piece.expected = Expected::Bytes(match prefix {
                    Some(n) => content[..n.min(content.len())].to_vec().into(),
                    None => content,
                });
            }
            piece.check(&describe(&streams[stream]), "the image", skip_for(stream))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::backup::{BackupOptions, backup};
    use crate::testutil::{Rng, TempDir};
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;

    fn poke(path: &Path, offset: u64, byte: u8) -> u8 {
        let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
        let mut old = [0u8];
        f.read_exact_at(&mut old, offset).unwrap();
        f.write_all_at(&[byte], offset).unwrap();
        f.sync_all().unwrap();
        old[0]
    }

    #[test]
    fn read_back_catches_changed_content_and_non_zero_gaps() {
        let t = TempDir::new("read-back");
        let (src, img, dst) = (t.join("src.img"), t.join("image"), t.join("dst.img"));
        // A disk without a table: one raw stream whose zero runs are left
        // out of the image and must read back as zeros.
        let mut disk = vec![0u8; (24 * MIB) as usize];
        let mut rng = Rng::seeded(7);
        disk[..(8 * MIB) as usize].copy_from_slice(&rng.bytes((8 * MIB) as usize));
        disk[(16 * MIB) as usize..(17 * MIB) as usize].copy_from_slice(&rng.bytes(MIB as usize));
        std::fs::write(&src, &disk).unwrap();
        // Progress goes to the feedback handed in: every meter ends with
        // all its bytes counted.
        let told = crate::engine::feedback::tests::Recorder::default();
        let feedback = Feedback::new(told.clone());
        let backup_opts = BackupOptions { level: 1, feedback: feedback.clone(), workers: 2, ..Default::default() };
        backup(&src, &img, &backup_opts).unwrap();
        let opts = RestoreOptions { grow_last: false, verify_after: true, feedback, workers: 2 };
        crate::engine::source::prepare_restore(&img, &dst, &opts.feedback).unwrap().restore(&opts).unwrap();
        assert!(std::fs::read(&dst).unwrap() == disk, "restored disk differs from the source");
        let lines = told.lines();
        let labels: Vec<&str> = lines.iter().filter_map(|l| l.strip_prefix("meter ")?.split(':').next()).collect();
        assert_eq!(labels, ["backup", "restore", "read-back"], "{lines:?}");
        for l in lines.iter().filter(|l| l.starts_with("meter ")) {
            let (done, total) = l.split_once(": ").unwrap().1.split_once(" of ").unwrap();
            assert!(done == total && done != "0", "a meter that did not count its bytes: {l}");
        }
        // Details (as with -v) come through the same feedback.
        assert!(lines.iter().any(|l| l.starts_with("detail: whole disk: raw")), "{lines:?}");
        assert!(lines.iter().any(|l| l.starts_with("detail: restore: 2 workers")), "{lines:?}");

        let image = crate::engine::source::klon::KlonImage::open(&img).unwrap();
        let mut target = Disk::open_target(&dst, None).unwrap();
        target.enable_direct_reads();
        read_back(&image, &target, &[], Shift::default(), None, None, &opts).unwrap();
        // A changed byte in stored content: named by its place.
        let old = poke(&dst, 5 * MIB + 3, !disk[(5 * MIB + 3) as usize]);
        let e = read_back(&image, &target, &[], Shift::default(), None, None, &opts).unwrap_err().to_string();
        assert!(e.contains("verification after restore failed") && e.contains("differs from the image"), "{e}");
        poke(&dst, 5 * MIB + 3, old);
        read_back(&image, &target, &[], Shift::default(), None, None, &opts).unwrap();
        // A non-zero byte where the source had zeros the image left out.
        poke(&dst, 12 * MIB + 9, 1);
        let e = read_back(&image, &target, &[], Shift::default(), None, None, &opts).unwrap_err().to_string();
        assert!(e.contains(&format!("byte at disk offset {} should be zero", 12 * MIB + 9)), "{e}");
    }
}
