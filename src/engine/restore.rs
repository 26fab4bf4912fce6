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

use super::pipeline;
use super::read_back::{self, Expected, Piece};
use super::streams::describe;
use super::target::{TargetWriter, check_fits, intersects, write_disk, write_order};
use crate::device::Disk;
use crate::device::direct::IoBuf;
use crate::error::Result;
use crate::image::format::{CHUNK_SIZE, Extent, IndexEntry};
use crate::image::{Fill, ImageReader, StoredChunk};
use crate::ui::human_bytes;
use crate::ui::progress::Progress;

/// Options of a restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Extend the last partition's entry to the end of a larger disk.
    pub grow_last: bool,
    /// Read everything back after writing and compare.
    pub verify_after: bool,
    /// No progress output.
    pub quiet: bool,
    /// Worker threads.
    pub workers: usize,
}

/// A restore that passed every check and is ready to write.
#[derive(Debug)]
pub struct RestorePlan {
    /// The image.
    pub reader: ImageReader,
    /// The opened target (exclusively, for block devices).
    pub target: Disk,
}

/// What a finished restore reports.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// Content bytes written.
    pub bytes_written: u64,
    /// Whether a read-back compared everything.
    pub verified: bool,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Opens the image and the target and refuses, before anything is written,
/// a target that is too small, has another sector size, is in use, or holds
/// the image. A missing target path becomes a file of the source's size.
pub fn prepare(image_dir: &Path, target_path: &Path) -> Result<RestorePlan> {
    let reader = ImageReader::open(image_dir)?;
    let m = &reader.manifest;
    super::verify::stored_total(image_dir, &m.streams)?;
    let mut target = Disk::open_target(target_path, Some(m.source.size))?;
    check_fits(&mut target, m.source.size, m.layout.sector_size)?;
    crate::device::safety::check_target(&target, None, Some(image_dir))?;
    target.enable_direct_reads();
    Ok(RestorePlan { reader, target })
}

impl RestorePlan {
    /// One paragraph saying what will be overwritten, for confirmations.
    pub fn describe(&self) -> String {
        let m = &self.reader.manifest;
        let what = match self.target.kind {
            crate::device::DiskKind::BlockDevice => "disk",
            crate::device::DiskKind::File => "file",
        };
        format!(
            "Everything on {what} {} ({}) will be overwritten with the image of {} ({}, {} partitions, made {}).",
            self.target.path.display(),
            human_bytes(self.target.size),
            m.source.model.as_deref().unwrap_or(&m.source.path),
            human_bytes(m.source.size),
            m.layout.partitions.len(),
            m.created
        )
    }
}

/// Writes the image onto the target. The caller has confirmed.
pub fn restore(plan: RestorePlan, opts: &RestoreOptions) -> Result<RestoreReport> {
    let started = Instant::now();
    let RestorePlan { reader, target } = plan;
    let layout = reader.manifest.layout.clone();
    let bytes_written = write_disk(
        &target,
        &layout,
        opts.grow_last,
        opts.verify_after,
        |stale| write_all(&reader, &target, stale, opts),
        |skip| read_back(&reader, &target, skip, opts),
    )?;
    Ok(RestoreReport { bytes_written, verified: opts.verify_after, seconds: started.elapsed().as_secs_f64() })
}

fn write_all(reader: &ImageReader, target: &Disk, stale: &[Extent], opts: &RestoreOptions) -> Result<u64> {
    let streams = &reader.manifest.streams;
    let order = write_order(streams);
    let total = super::verify::stored_total(&reader.dir, streams)?;
    // A progress bar per stream (partition).
    let parts = streams.iter().map(|s| (describe(s), s.stored_bytes)).collect();
    let mut progress = Progress::with_parts("restore", total, parts, opts.quiet);
    let mut out = TargetWriter::new(target, streams, stale)?;
    pipeline::run(
        opts.workers,
        pipeline::depth(opts.workers),
        |send| {
            for &si in &order {
                let entries = reader.index(si)?;
                reader.for_each_chunk(si, &entries, |c| {
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
}

/// Reads back everything the restore wrote and compares it with the image.
fn read_back(reader: &ImageReader, target: &Disk, skip: &[Extent], opts: &RestoreOptions) -> Result<()> {
    let streams = &reader.manifest.streams;
    let order = write_order(streams);
    let total: u64 = order
        .iter()
        .map(|&i| if streams[i].fill == Fill::Zero { streams[i].length } else { streams[i].stored_bytes })
        .sum();
    read_back::run(
        target,
        total,
        opts.workers,
        opts.quiet,
        |target, send| {
            for &si in &order {
                let s = &streams[si];
                let entries: Vec<IndexEntry> = reader.index(si)?;
                let mut cursor = s.start;
                let zeros_upto = |send: &mut dyn FnMut(Check) -> bool, from: u64, to: u64| -> Result<bool> {
                    if s.fill != Fill::Zero {
                        return Ok(true);
                    }
                    for (off, len) in super::backup::pieces(from, to.saturating_sub(from), CHUNK_SIZE as u64) {
                        let piece = target.piece(vec![(off, len)], Expected::Zeros)?;
                        if !send(Check { stream: si, piece, image: None }) {
                            return Ok(false);
                        }
                    }
                    Ok(true)
                };
                for (seq, e) in entries.iter().enumerate() {
                    super::cancel::check("read-back")?;
                    let header = reader.read_header(si, seq as u64, e)?;
                    let first = header.extents[0].0;
                    if !zeros_upto(send, cursor, first)? {
                        return Ok(());
                    }
                    let image = if header.extents.iter().any(|&(a, l)| intersects(a, l, skip)) {
                        Some(Box::new(reader.read_chunk(si, seq as u64, e)?))
                    } else {
                        None
                    };
                    let last = *header.extents.last().expect("a chunk has extents");
                    cursor = last.0 + last.1;
                    let piece = target.piece(header.extents, Expected::Hash(header.content_hash))?;
                    if !send(Check { stream: si, piece, image }) {
                        return Ok(());
                    }
                }
                if !zeros_upto(send, cursor, s.start + s.length)? {
                    return Ok(());
                }
            }
            Ok(())
        },
        |Check { stream, mut piece, image }: Check| {
            if let Some(chunk) = image {
                piece.expected = Expected::Bytes((*chunk).decode()?);
            }
            piece.check(&describe(&streams[stream]), "the image", skip)
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::backup::{BackupOptions, DEFAULT_SPLIT, backup};
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
        let backup_opts = BackupOptions {
            level: 1,
            split_size: DEFAULT_SPLIT,
            allow_mounted: false,
            quiet: true,
            workers: 2,
            plan: Default::default(),
        };
        backup(&src, &img, &backup_opts).unwrap();
        let opts = RestoreOptions { grow_last: false, verify_after: true, quiet: true, workers: 2 };
        restore(prepare(&img, &dst).unwrap(), &opts).unwrap();
        assert!(std::fs::read(&dst).unwrap() == disk, "restored disk differs from the source");

        let RestorePlan { reader, target } = prepare(&img, &dst).unwrap();
        read_back(&reader, &target, &[], &opts).unwrap();
        // A changed byte in stored content: named by its place.
        let old = poke(&dst, 5 * MIB + 3, !disk[(5 * MIB + 3) as usize]);
        let e = read_back(&reader, &target, &[], &opts).unwrap_err().to_string();
        assert!(e.contains("verification after restore failed") && e.contains("differs from the image"), "{e}");
        poke(&dst, 5 * MIB + 3, old);
        read_back(&reader, &target, &[], &opts).unwrap();
        // A non-zero byte where the source had zeros the image left out.
        poke(&dst, 12 * MIB + 9, 1);
        let e = read_back(&reader, &target, &[], &opts).unwrap_err().to_string();
        assert!(e.contains(&format!("byte at disk offset {} should be zero", 12 * MIB + 9)), "{e}");
    }
}
