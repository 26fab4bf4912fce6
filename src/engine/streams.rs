//! Which streams an image of a disk holds and which bytes each one reads.

use crate::device::Disk;
use crate::image::format::Extent;
use crate::image::manifest::{FileInfo, Fill, StreamInfo, StreamKind};
use crate::table::{DiskLayout, TableKind};

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
    /// "partition 2", "outside partitions", "whole disk": for messages.
    pub fn describe(&self) -> String {
        describe(&self.info)
    }
}

pub use crate::image::reader::describe_stream as describe;

fn empty_files() -> FileInfo {
    FileInfo { name: String::new(), size: 0, blake3: None }
}

/// Plans the streams for `layout` of `source`: the area outside partitions
/// first (tables, boot code, gaps), then one stream per partition; a disk
/// without a table is one stream.
pub fn plan(source: &Disk, layout: &DiskLayout) -> Vec<StreamPlan> {
    let stream = |name: String, kind, partition, start, length, fill, reason: &str| StreamInfo {
        name,
        kind,
        partition,
        start,
        length,
        method: "raw".to_string(),
        method_reason: reason.to_string(),
        fill,
        fs: crate::fs::probe(source, start, length),
        chunks: 0,
        stored_bytes: 0,
        compressed_bytes: 0,
        index: empty_files(),
        data_files: Vec::new(),
    };
    if layout.kind == TableKind::None {
        let info = stream(
            "disk".into(),
            StreamKind::Disk,
            None,
            0,
            layout.disk_size,
            Fill::Zero,
            "no partition table: the whole disk, every block that is not zero",
        );
        return vec![StreamPlan { reads: vec![(0, layout.disk_size)], skip_zero: true, info }];
    }
    let mut plans = Vec::new();
    let mut boot = stream(
        "boot".into(),
        StreamKind::Boot,
        None,
        0,
        layout.disk_size,
        Fill::Free,
        "partition table, boot code and gaps between partitions",
    );
    boot.fs = None;
    plans.push(StreamPlan { reads: outside(layout), skip_zero: true, info: boot });
    for p in &layout.partitions {
        let info = stream(
            format!("p{}", p.number),
            StreamKind::Partition,
            Some(p.number),
            p.start,
            p.size,
            Fill::Zero,
            "copied raw: every block that is not zero",
        );
        plans.push(StreamPlan { reads: vec![(p.start, p.size)], skip_zero: true, info });
    }
    plans
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
