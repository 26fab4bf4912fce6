//! Clone: disk -> disk with no image in between, to the same or a larger
//! disk, under the same refusals as a restore. The reading side is the
//! backup's (same streams, same used-block maps); the writing side is the
//! restore's (same order, same table fix-up, same clean-up on failure).

use std::path::Path;
use std::time::Instant;

use super::backup::{ReadJob, kept_content, pieces, read_jobs};
use super::read_back::{self, DiskReader};
use super::streams::{self, PlanOptions, StreamPlan, describe};
use super::target::{TargetWriter, WriteArea, check_fits, minus, write_disk, write_order};
use super::{cancel, pipeline};
use crate::device::Disk;
use crate::device::direct::IoBuf;
use crate::error::{Error, Result};
use crate::image::format::{CHUNK_SIZE, Extent};
use crate::image::{Fill, StreamInfo};
use crate::table::{self, DiskLayout};
use crate::units::human_bytes;

/// Options of a clone: those of a restore (grow the last partition, read
/// back, feedback, workers).
pub type CloneOptions = super::restore::RestoreOptions;

/// A clone that passed every check and is ready to write.
#[derive(Debug)]
pub struct ClonePlan {
    /// The source, read-only.
    pub source: Disk,
    /// The target, opened exclusively when it is a block device.
    pub target: Disk,
    /// The source's partition table.
    pub layout: DiskLayout,
    /// What is read from the source.
    pub streams: Vec<StreamPlan>,
    /// Warnings from planning (filesystems copied raw).
    pub warnings: Vec<String>,
}

/// What a finished clone reports: what a restore reports.
pub type CloneReport = super::restore::RestoreReport;

/// Opens both disks and refuses, before anything is written, what a
/// restore would refuse: a smaller target, another sector size, a target in
/// use, the target being the source (or a loop device over it), and a
/// source partition mounted read-write unless `allow_mounted`.
pub fn prepare(source_path: &Path, target_path: &Path, plan: PlanOptions, allow_mounted: bool) -> Result<ClonePlan> {
    let source = Disk::open_source(source_path)?;
    crate::device::safety::check_source(&source, allow_mounted)?;
    let layout = table::read_layout(&source)?;
    let mut target = Disk::open_target(target_path, Some(source.size))?;
    crate::device::safety::check_target(&target, Some(&source), None)?;
    check_fits(&mut target, source.size, layout.sector_size)?;
    target.enable_direct_reads();
    let planned = streams::plan(&source, &layout, plan)?;
    Ok(ClonePlan { source, target, layout, streams: planned.streams, warnings: planned.warnings })
}

impl ClonePlan {
    /// One paragraph saying what will be overwritten, for confirmations.
    pub fn describe(&self) -> String {
        let mut text = format!(
            "Everything on {} ({}) will be overwritten with a copy of {} ({}, {} partitions).",
            self.target.path.display(),
            human_bytes(self.target.size),
            self.source.path.display(),
            human_bytes(self.source.size),
            self.layout.partitions.len()
        );
        let held = super::target::holdings(&self.target);
        if !held.is_empty() {
            text += &format!("\n{held}");
        }
        for w in &self.warnings {
            text += &format!("\nNote: {w}.");
        }
        text
    }
}

/// Copies the source onto the target. The caller has confirmed.
pub fn clone(plan: ClonePlan, opts: &CloneOptions) -> Result<CloneReport> {
    let started = Instant::now();
    let ClonePlan { source, target, layout, streams, warnings: _ } = plan;
    let infos: Vec<StreamInfo> = streams.iter().map(|p| p.info.clone()).collect();
    let order = write_order(&infos);
    let written = write_disk(
        "clone",
        &target,
        &layout,
        opts.grow_last,
        opts.verify_after,
        |area| copy_all(&source, &target, &streams, &infos, &order, area, opts),
        |skip| compare(&source, &target, &streams, &order, skip, opts),
    )?;
    let mut report = CloneReport::new(written, opts.verify_after, started);
    if opts.grow_last {
        report.growth = super::grow::grow_last(&target, &layout);
        report.seconds = started.elapsed().as_secs_f64();
    }
    Ok(report)
}

fn copy_all(
    source: &Disk,
    target: &Disk,
    streams: &[StreamPlan],
    infos: &[StreamInfo],
    order: &[usize],
    area: &WriteArea,
    opts: &CloneOptions,
) -> Result<u64> {
    let total: u64 = streams.iter().flat_map(|p| p.reads.iter()).map(|r| r.1).sum();
    // A progress bar per stream (partition).
    let parts = streams.iter().map(|p| (p.describe(), p.reads.iter().map(|r| r.1).sum())).collect();
    let mut progress = opts.feedback.meter("clone", total, parts);
    let mut out = TargetWriter::new(target, infos, area)?;
    pipeline::run(
        opts.workers,
        pipeline::depth(opts.workers),
        // One lane: the target is written in disk order.
        |send| read_jobs(source, streams, order, false, None, None, send),
        |job: ReadJob| {
            let (stream, read_len) = (job.stream, job.buf.len() as u64);
            let (extents, content) = kept_content(job);
            Ok((stream, read_len, extents, content))
        },
        |(stream, read_len, extents, content): (usize, u64, Vec<Extent>, IoBuf)| {
            if !content.is_empty() {
                out.write(stream, &extents, &content)?;
            }
            progress.add_part(stream, read_len);
            Ok(())
        },
    )?;
    let written = out.finish()?;
    progress.finish();
    Ok(written)
}

/// Reads what was copied from both disks and compares it. Where a stream
/// leaves zero runs alone on the target (unallocated space), blocks that
/// are zero on the source are not compared; `skip` ranges (tables the
/// clone rewrote) are not compared either.
fn compare(
    source: &Disk,
    target: &Disk,
    streams: &[StreamPlan],
    order: &[usize],
    skip: &[Extent],
    opts: &CloneOptions,
) -> Result<()> {
    let total: u64 = streams.iter().flat_map(|p| p.reads.iter()).map(|r| r.1).sum();
    read_back::run(
        target,
        total,
        opts.workers,
        &opts.feedback,
        |target, send| {
            let source = DiskReader::new(source);
            for &si in order {
                for &(start, len) in &streams[si].reads {
                    for (offset, piece) in pieces(start, len, CHUNK_SIZE as u64) {
                        cancel::check("read-back")?;
                        let (a, b) = (source.read(&[(offset, piece)])?, target.read(&[(offset, piece)])?);
                        if !send((si, offset, a, b)) {
                            return Ok(());
                        }
                    }
                }
            }
            Ok(())
        },
        |(si, offset, a, b): (usize, u64, IoBuf, IoBuf)| {
            let s = &streams[si];
            let zeros_left_alone = s.skip_zero && s.info.fill == Fill::Free;
            for (start, len) in minus(offset, a.len() as u64, skip) {
                let rel = (start - offset) as usize;
                let (x, y) = (&a[rel..rel + len as usize], &b[rel..rel + len as usize]);
                if x == y {
                    continue;
                }
                for (i, (bx, by)) in x.chunks(4096).zip(y.chunks(4096)).enumerate() {
                    if bx != by && !(zeros_left_alone && bx.iter().all(|&v| v == 0)) {
                        return Err(Error::VerifyAfter(format!(
                            "{}: the target differs from the source near disk offset {}",
                            describe(&s.info),
                            start + i as u64 * 4096
                        )));
                    }
                }
            }
            Ok(a.len() as u64)
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::restore::RestoreOptions;
    use crate::testutil::{Rng, TempDir};
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;

    #[test]
    fn read_back_catches_a_changed_byte() {
        let t = TempDir::new("clone-read-back");
        let (src, dst) = (t.join("src.img"), t.join("dst.img"));
        // A disk without a table: one raw stream, every non-zero block.
        let mut disk = vec![0u8; (20 * MIB) as usize];
        let mut rng = Rng::seeded(5);
        disk[..(9 * MIB) as usize].copy_from_slice(&rng.bytes((9 * MIB) as usize));
        std::fs::write(&src, &disk).unwrap();
        let opts = RestoreOptions {
            grow_last: false,
            verify_after: true,
            feedback: crate::engine::feedback::Feedback::silent(),
            workers: 2,
        };
        clone(prepare(&src, &dst, PlanOptions::default(), false).unwrap(), &opts).unwrap();
        assert!(std::fs::read(&dst).unwrap() == disk, "the clone differs from the source");

        let ClonePlan { source, target, streams, .. } = prepare(&src, &dst, PlanOptions::default(), false).unwrap();
        let order: Vec<usize> = (0..streams.len()).collect();
        compare(&source, &target, &streams, &order, &[], &opts).unwrap();
        let at = 8 * MIB + 4096 * 3 + 5;
        std::fs::OpenOptions::new().write(true).open(&dst).unwrap().write_all_at(&[!disk[at as usize]], at).unwrap();
        let e = compare(&source, &target, &streams, &order, &[], &opts).unwrap_err().to_string();
        assert!(
            e.contains(&format!("the target differs from the source near disk offset {}", at / 4096 * 4096)),
            "{e}"
        );
    }
}
