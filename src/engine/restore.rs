//! Restore: image -> disk, to the same or a larger disk.
//!
//! Order of work: refuse what cannot work before touching the target; wipe
//! the target's table areas; write every partition; write the area outside
//! partitions (tables, boot code) last; fix the table up for a larger disk;
//! sync, re-read the table, and read everything back. If anything fails
//! after the first write, the table areas are wiped again so a half-restored
//! disk cannot be mistaken for a good one.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::pipeline;
use super::streams::describe;
use crate::device::Disk;
use crate::error::{Error, Result};
use crate::image::format::{Extent, IndexEntry, CHUNK_SIZE};
use crate::image::{Fill, ImageReader, StoredChunk, StreamKind};
use crate::table::{self, TableKind};
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

/// Size of the areas at the start and end of the target that hold tables
/// and signatures, wiped before writing and after a failure.
const WIPE_LEN: u64 = 1 << 20;

/// Opens the image and the target and refuses, before anything is written,
/// a target that is too small, has another sector size, is in use, or holds
/// the image. A missing target path becomes a file of the source's size.
pub fn prepare(image_dir: &Path, target_path: &Path) -> Result<RestorePlan> {
    let reader = ImageReader::open(image_dir)?;
    let m = &reader.manifest;
    let mut target = Disk::open_target(target_path, Some(m.source.size))?;
    if target.kind == crate::device::DiskKind::File {
        // A file has no sector size of its own: it takes the image's.
        target.logical_sector_size = m.layout.sector_size;
    } else if target.logical_sector_size != m.layout.sector_size {
        return Err(Error::Refused(format!(
            "{} has {}-byte logical sectors but the image was made from a disk with {}-byte sectors; \
             its partition table would not fit: restore to a disk with {}-byte sectors",
            target.path.display(),
            target.logical_sector_size,
            m.layout.sector_size,
            m.layout.sector_size
        )));
    }
    if target.size < m.source.size {
        return Err(Error::Refused(format!(
            "target too small: needs {} ({} bytes), {} has {} ({} bytes)",
            human_bytes(m.source.size),
            m.source.size,
            target.path.display(),
            human_bytes(target.size),
            target.size
        )));
    }
    crate::device::safety::check_target(&target, None, Some(image_dir))?;
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

/// The streams in the order a restore writes them: partitions first, the
/// area outside partitions (with the table) last.
fn write_order(reader: &ImageReader) -> Vec<usize> {
    let streams = &reader.manifest.streams;
    let mut order: Vec<usize> = (0..streams.len()).filter(|&i| streams[i].kind != StreamKind::Boot).collect();
    order.extend((0..streams.len()).filter(|&i| streams[i].kind == StreamKind::Boot));
    order
}

/// Zeros the table and signature areas at both ends of the target.
fn wipe_table_areas(target: &Disk) -> Result<()> {
    let head = WIPE_LEN.min(target.size);
    target.zero_range(0, head)?;
    let tail_start = target.size.saturating_sub(WIPE_LEN).max(head);
    target.zero_range(tail_start, target.size - tail_start)?;
    target.sync()
}

/// Writes the image onto the target. The caller has confirmed.
pub fn restore(plan: RestorePlan, opts: &RestoreOptions) -> Result<RestoreReport> {
    let started = Instant::now();
    let RestorePlan { reader, target } = plan;
    let layout = reader.manifest.layout.clone();
    let stale = table::stale_ranges(&layout, target.size);

    wipe_table_areas(&target)?;
    let written = write_all(&reader, &target, &stale, opts).and_then(|bytes| {
        target.sync()?;
        let rewritten = table::fix_up_for_target(&target, &layout, opts.grow_last)?;
        target.sync()?;
        target.after_write()?;
        Ok((bytes, rewritten))
    });
    let (bytes_written, rewritten) = match written {
        Ok(v) => v,
        Err(e) => return Err(fail(&target, e)),
    };
    if opts.verify_after {
        let mut skip = stale.clone();
        skip.extend(rewritten);
        if let Err(e) = read_back(&reader, &target, &skip, opts) {
            return Err(fail(&target, e));
        }
        if let Err(e) = check_table(&target, &layout, opts.grow_last) {
            return Err(fail(&target, e));
        }
    }
    Ok(RestoreReport { bytes_written, verified: opts.verify_after, seconds: started.elapsed().as_secs_f64() })
}

fn fail(target: &Disk, e: Error) -> Error {
    if target.fresh {
        let note = match std::fs::remove_file(&target.path) {
            Ok(()) => format!("the restore did not complete; {} (created by this restore) was removed", target.path.display()),
            Err(r) => format!("the restore did not complete; removing {} also failed ({r}): delete it", target.path.display()),
        };
        return e.with_note(&note);
    }
    let note = match wipe_table_areas(target) {
        Ok(()) => "the restore did not complete and the target's partition table was wiped, \
                   so the half-restored disk cannot be mistaken for a good one"
            .to_string(),
        Err(w) => format!("the restore did not complete, and wiping the target's partition table also failed ({w})"),
    };
    e.with_note(&note)
}

/// Parts of `(start, len)` that are not inside any of `skip`.
fn minus(start: u64, len: u64, skip: &[Extent]) -> Vec<Extent> {
    let mut out = vec![(start, len)];
    for &(s0, l0) in skip {
        let s1 = s0 + l0;
        out = out
            .into_iter()
            .flat_map(|(a, l)| {
                let b = a + l;
                let mut v = Vec::new();
                if s1 <= a || s0 >= b {
                    v.push((a, l));
                } else {
                    if s0 > a {
                        v.push((a, s0 - a));
                    }
                    if s1 < b {
                        v.push((s1, b - s1));
                    }
                }
                v
            })
            .collect();
    }
    out
}

fn write_all(reader: &ImageReader, target: &Disk, stale: &[Extent], opts: &RestoreOptions) -> Result<u64> {
    let streams = &reader.manifest.streams;
    let order = write_order(reader);
    let total: u64 = streams.iter().map(|s| s.stored_bytes).sum();
    let mut progress = Progress::new("restore", total, opts.quiet);
    // Where each stream's writing has got to: gaps behind it that the
    // stream says were zeros are zeroed on the way.
    let mut cursor: Vec<u64> = streams.iter().map(|s| s.start).collect();
    let mut written = 0u64;
    pipeline::run(
        opts.workers,
        opts.workers * 2 + 2,
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
            let content = c.decode()?;
            Ok((c, content))
        },
        |(c, content): (StoredChunk, Vec<u8>)| {
            let si = c.stream;
            let s = &streams[si];
            let place = describe(s);
            let mut pos = 0usize;
            for &(start, len) in &c.header.extents {
                if s.fill == Fill::Zero && start > cursor[si] {
                    target.zero_range(cursor[si], start - cursor[si]).map_err(|e| e.with_note(&place))?;
                }
                let data = &content[pos..pos + len as usize];
                pos += len as usize;
                if s.kind == StreamKind::Boot && !stale.is_empty() {
                    for (a, l) in minus(start, len, stale) {
                        let rel = (a - start) as usize;
                        target.write_all_at(&data[rel..rel + l as usize], a).map_err(|e| e.with_note(&place))?;
                    }
                } else {
                    target.write_all_at(data, start).map_err(|e| e.with_note(&place))?;
                }
                cursor[si] = start + len;
            }
            written += content.len() as u64;
            progress.add(content.len() as u64);
            Ok(())
        },
    )?;
    for (si, s) in streams.iter().enumerate() {
        if s.fill == Fill::Zero && cursor[si] < s.start + s.length {
            target
                .zero_range(cursor[si], s.start + s.length - cursor[si])
                .map_err(|e| e.with_note(&describe(s)))?;
        }
    }
    progress.finish();
    Ok(written)
}

enum Check {
    /// Target bytes of a chunk's extents, and the image chunk when some of
    /// it must be compared byte by byte (parts were rewritten).
    Chunk { stream: usize, header_hash: [u8; 32], extents: Vec<Extent>, bytes: Vec<u8>, image: Option<StoredChunk> },
    /// Target bytes that must be zero.
    Zero { stream: usize, offset: u64, bytes: Vec<u8> },
}

fn intersects(start: u64, len: u64, skip: &[Extent]) -> bool {
    skip.iter().any(|&(s, l)| s < start + len && start < s + l)
}

/// Reads back everything the restore wrote and compares it with the image.
fn read_back(reader: &ImageReader, target: &Disk, skip: &[Extent], opts: &RestoreOptions) -> Result<()> {
    let streams = &reader.manifest.streams;
    let order = write_order(reader);
    let total: u64 = order
        .iter()
        .map(|&i| if streams[i].fill == Fill::Zero { streams[i].length } else { streams[i].stored_bytes })
        .sum();
    let mut progress = Progress::new("read-back", total, opts.quiet);
    let read_target = |offset: u64, len: u64| -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        target.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    };
    pipeline::run(
        opts.workers,
        opts.workers * 2 + 2,
        |send| {
            for &si in &order {
                let s = &streams[si];
                let entries: Vec<IndexEntry> = reader.index(si)?;
                let mut cursor = s.start;
                let zeros_upto = |send: &mut dyn FnMut(Check) -> bool, from: u64, to: u64| -> Result<bool> {
                    if s.fill != Fill::Zero {
                        return Ok(true);
                    }
                    for (off, len) in super::backup::pieces(from, to.saturating_sub(from), CHUNK_SIZE as u64) {
                        if !send(Check::Zero { stream: si, offset: off, bytes: read_target(off, len)? }) {
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
                    let mut bytes = Vec::with_capacity(header.raw_len as usize);
                    for &(start, len) in &header.extents {
                        bytes.extend_from_slice(&read_target(start, len)?);
                    }
                    let image = if header.extents.iter().any(|&(a, l)| intersects(a, l, skip)) {
                        Some(reader.read_chunk(si, seq as u64, e)?)
                    } else {
                        None
                    };
                    let last = *header.extents.last().expect("a chunk has extents");
                    cursor = last.0 + last.1;
                    let check = Check::Chunk {
                        stream: si,
                        header_hash: header.content_hash,
                        extents: header.extents,
                        bytes,
                        image,
                    };
                    if !send(check) {
                        return Ok(());
                    }
                }
                if !zeros_upto(send, cursor, s.start + s.length)? {
                    return Ok(());
                }
            }
            Ok(())
        },
        |check: Check| -> Result<u64> {
            match check {
                Check::Zero { stream, offset, bytes } => {
                    if let Some(i) = bytes.iter().position(|&b| b != 0) {
                        return Err(Error::VerifyAfter(format!(
                            "{}: byte at disk offset {} should be zero but is not",
                            describe(&streams[stream]),
                            offset + i as u64
                        )));
                    }
                    Ok(bytes.len() as u64)
                }
                Check::Chunk { stream, header_hash, extents, bytes, image } => {
                    let place = describe(&streams[stream]);
                    match image {
                        None => {
                            if blake3::hash(&bytes).as_bytes() != &header_hash {
                                let (a, _) = extents[0];
                                let last = extents.last().expect("extents");
                                return Err(Error::VerifyAfter(format!(
                                    "{place}: data read back from disk bytes {a}..{} differs from the image",
                                    last.0 + last.1
                                )));
                            }
                        }
                        Some(chunk) => {
                            let content = chunk.decode()?;
                            let mut pos = 0u64;
                            for &(start, len) in &extents {
                                for (a, l) in minus(start, len, skip) {
                                    let rel = (pos + a - start) as usize;
                                    if bytes[rel..rel + l as usize] != content[rel..rel + l as usize] {
                                        return Err(Error::VerifyAfter(format!(
                                            "{place}: data read back at disk offset {a} differs from the image"
                                        )));
                                    }
                                }
                                pos += len;
                            }
                        }
                    }
                    Ok(bytes.len() as u64)
                }
            }
        },
        |n| {
            progress.add(n);
            Ok(())
        },
    )?;
    progress.finish();
    Ok(())
}

/// Reads the table back from the target and compares it with the layout
/// the restore meant to write.
fn check_table(target: &Disk, layout: &table::DiskLayout, grow_last: bool) -> Result<()> {
    if layout.kind == TableKind::None {
        return Ok(());
    }
    let expected = table::layout_for_target(layout, target.size, grow_last);
    let found = table::read_layout(target)
        .map_err(|e| Error::VerifyAfter(format!("the partition table written to the target does not read back: {e}")))?;
    if found.kind != expected.kind || found.partitions != expected.partitions {
        return Err(Error::VerifyAfter(format!(
            "the partition table read back from {} is not the one restored ({:?} with {} partitions, expected {:?} with {})",
            target.path.display(),
            found.kind,
            found.partitions.len(),
            expected.kind,
            expected.partitions.len()
        )));
    }
    Ok(())
}

/// Path of a target for messages.
pub fn target_path(plan: &RestorePlan) -> PathBuf {
    plan.target.path.clone()
}

#[cfg(test)]
mod tests {
    use super::minus;

    #[test]
    fn minus_cuts_ranges() {
        assert_eq!(minus(0, 100, &[(10, 10)]), vec![(0, 10), (20, 80)]);
        assert_eq!(minus(0, 100, &[(0, 100)]), vec![]);
        assert_eq!(minus(50, 10, &[(0, 10)]), vec![(50, 10)]);
        assert_eq!(minus(0, 100, &[(90, 50), (0, 5)]), vec![(5, 85)]);
    }
}
