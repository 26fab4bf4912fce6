//! klon's own image directory as an [`ImageSource`].

use std::path::Path;
use std::sync::Arc;

use super::{ImageSource, Summary};
use crate::device::Disk;
use crate::engine::backup::image_size;
use crate::engine::feedback::Feedback;
use crate::engine::restore::{self, RestoreOptions, RestoreReport};
use crate::engine::verify::{self, VerifyReport};
use crate::error::{Error, Result};
use crate::image::format::{ChunkHeader, IndexEntry};
use crate::image::manifest::StreamInfo;
use crate::image::reader::describe_stream;
use crate::image::writer::PARTIAL_SUFFIX;
use crate::image::{ChunkStore, ImageReader, Manifest, StoredChunk};
use crate::table::DiskLayout;
use crate::units::human_bytes;

/// A klon image, opened: its checked manifest and every index, checked.
/// Clones share the indexes.
#[derive(Debug, Clone)]
pub struct KlonImage {
    reader: Arc<ImageReader>,
    indexes: Arc<Vec<Vec<IndexEntry>>>,
}

impl KlonImage {
    /// Opens the image at `dir` and checks everything that needs no data:
    /// the manifest (see `Manifest::validate`), every file's size and every
    /// index ([`ImageReader::indexes`]).
    pub fn open(dir: &Path) -> Result<KlonImage> {
        let reader = ImageReader::open(dir)?;
        verify::stored_total(dir, &reader.manifest.streams)?;
        let indexes = reader.indexes()?;
        Ok(KlonImage { reader: Arc::new(reader), indexes: Arc::new(indexes) })
    }

    /// Its manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.reader.manifest
    }
}

impl ChunkStore for KlonImage {
    fn location(&self) -> &Path {
        &self.reader.dir
    }

    fn manifest(&self) -> &Manifest {
        &self.reader.manifest
    }

    fn chunk_count(&self, stream: usize) -> usize {
        self.indexes[stream].len()
    }

    fn for_each_chunk(&self, stream: usize, each: &mut dyn FnMut(StoredChunk) -> Result<bool>) -> Result<()> {
        self.reader.for_each_chunk(stream, &self.indexes[stream], each)
    }

    fn read_chunk(&self, stream: usize, seq: u64) -> Result<StoredChunk> {
        self.reader.read_chunk(stream, seq, &self.indexes[stream][seq as usize])
    }

    fn read_header(&self, stream: usize, seq: u64) -> Result<ChunkHeader> {
        self.reader.read_header(stream, seq, &self.indexes[stream][seq as usize])
    }
}

impl ImageSource for KlonImage {
    fn location(&self) -> &Path {
        &self.reader.dir
    }

    fn layout(&self) -> &DiskLayout {
        &self.reader.manifest.layout
    }

    fn describe(&self) -> String {
        let m = &self.reader.manifest;
        format!(
            "the image of {} ({}, {} partitions, made {})",
            m.source.model.as_deref().unwrap_or(&m.source.path),
            human_bytes(m.source.size),
            m.layout.partitions.len(),
            m.created
        )
    }

    fn verify(&mut self, workers: usize, feedback: &Feedback) -> Result<VerifyReport> {
        let result = verify::verify_image(self, workers, feedback);
        if !matches!(&result, Err(Error::Cancelled(_))) {
            verify::record_result(&self.reader.dir, &result);
        }
        result
    }

    fn restore(&mut self, target: &Disk, opts: &RestoreOptions) -> Result<RestoreReport> {
        restore::restore(self, target, opts)
    }

    fn restore_partition(
        &mut self,
        number: u32,
        target: &Disk,
        to: u64,
        opts: &RestoreOptions,
    ) -> Result<RestoreReport> {
        restore::restore_partition(self, number, target, to, opts)
    }

    fn random_access(&self) -> Option<Box<dyn ChunkStore + Send>> {
        Some(Box::new(self.clone()))
    }

    fn warnings(&self) -> Vec<String> {
        let m = &self.reader.manifest;
        m.streams
            .iter()
            .filter(|s| !s.unreadable.is_empty())
            .map(|s| {
                format!(
                    "{}: {} bytes in {} places were unreadable on the source when the image was made \
                     (klon backup --rescue); they are restored as zeros (klon info lists them)",
                    describe_stream(s),
                    s.unreadable_bytes(),
                    s.unreadable.len()
                )
            })
            .collect()
    }

    fn info(&self) -> (String, serde_json::Value) {
        let (dir, m) = (&self.reader.dir, &self.reader.manifest);
        let last_verify = verify::last_result(dir);
        let json = serde_json::json!({
            "image": dir,
            "complete": true,
            "last_verify": last_verify,
            "image_bytes": image_size(m),
            "manifest": m,
        });
        let mut text = render_info(dir, m);
        text += &match last_verify {
            Some(v) if v.ok => format!("Verified:     OK on {} (klon {})\n", v.time, v.klon_version),
            Some(v) => {
                format!("Verified:     FAILED on {}: {}\n", v.time, v.problem.as_deref().unwrap_or("unknown problem"))
            }
            None => "Verified:     never (run klon verify)\n".to_string(),
        };
        (text, json)
    }
}

/// Whether `path` looks like a klon image directory, finished or not.
pub fn looks_like_klon_image(path: &Path) -> bool {
    path.join(crate::image::manifest::MANIFEST_NAME).exists() || path.to_string_lossy().ends_with(PARTIAL_SUFFIX)
}

/// What a list shows of the klon image at `dir`: its manifest only.
pub fn summarize(dir: &Path) -> Result<Summary> {
    let r = ImageReader::open(dir)?;
    let m = &r.manifest;
    let short = |t: &str| t.replace('T', " ").trim_end_matches('Z').chars().take(16).collect::<String>();
    let state = match verify::last_result(dir) {
        None => "complete, never verified".to_string(),
        Some(v) if v.ok => format!("complete, verified OK {}", short(&v.time)),
        Some(v) => format!("complete, verification FAILED {}", short(&v.time)),
    };
    Ok(Summary {
        kind: None,
        source: m.source.model.clone().unwrap_or_else(|| m.source.path.clone()),
        disk_size: m.source.size,
        sector_size: m.layout.sector_size,
        created: Some(short(&m.created)),
        image_bytes: image_size(m),
        state,
    })
}

/// Records a verification that failed before the image could be opened
/// (a damaged manifest, a missing file), where `path` is a klon image.
pub(super) fn record_failure_to_open(path: &Path, result: &Result<VerifyReport>) {
    verify::record_result(path, result);
}

/// How many unreadable ranges of a stream `klon info` names one by one.
const UNREADABLE_SHOWN: usize = 8;

/// `klon info`'s lines on a stream's unreadable ranges: each with its
/// partition and filesystem blocks, then how to find the files they hit.
fn render_unreadable(o: &mut String, st: &StreamInfo) {
    use std::fmt::Write as _;
    let pad = "";
    let _ = writeln!(
        o,
        "  {pad:<24} Unreadable: {} bytes in {} places on the source, restored as zeros:",
        st.unreadable_bytes(),
        st.unreadable.len(),
    );
    let place = match st.partition {
        Some(n) => format!("partition {n}"),
        None => "the disk".to_string(),
    };
    let fstype = st.fs.as_ref().map(|f| f.fstype.as_str());
    // Filesystem blocks are counted from the stream's start (the partition's
    // start, or the disk's for a filesystem on the whole disk).
    let blocks: Vec<(u64, u64)> = match st.fs_block_size {
        Some(bs) if bs > 0 => st
            .unreadable
            .iter()
            .map(|&(a, l)| {
                let rel = a.saturating_sub(st.start);
                (rel / bs as u64, (rel + l.max(1) - 1) / bs as u64)
            })
            .collect(),
        _ => Vec::new(),
    };
    for (i, &(a, l)) in st.unreadable.iter().enumerate().take(UNREADABLE_SHOWN) {
        let at = match (blocks.get(i), st.fs_block_size) {
            (Some(&(f, t)), Some(bs)) => {
                let b = if f == t { format!("block {f}") } else { format!("blocks {f}-{t}") };
                format!("{place}, {} {b} ({bs}-byte blocks)", fstype.unwrap_or("filesystem"))
            }
            _ => format!("{place}, byte {} of it (copied raw: no filesystem blocks known)", a.saturating_sub(st.start)),
        };
        let _ = writeln!(o, "  {pad:<24}   {l} bytes at disk offset {a}: {at}");
    }
    if st.unreadable.len() > UNREADABLE_SHOWN {
        let _ = writeln!(
            o,
            "  {pad:<24}   and {} more (klon info --json lists them all)",
            st.unreadable.len() - UNREADABLE_SHOWN
        );
    }
    if blocks.is_empty() {
        return;
    }
    let dev = match st.partition {
        Some(n) => format!("/dev/sdX{n}"),
        None => "/dev/sdX".to_string(),
    };
    // debugfs is given at most HINT_BLOCKS blocks (the first ones).
    const HINT_BLOCKS: usize = 64;
    let list = |sep: &str| {
        let mut all: Vec<u64> = blocks.iter().flat_map(|&(f, t)| f..=t).take(HINT_BLOCKS + 1).collect();
        all.dedup();
        let more = if all.len() > HINT_BLOCKS { " (the first blocks only)" } else { "" };
        all.truncate(HINT_BLOCKS);
        (all.iter().map(u64::to_string).collect::<Vec<_>>().join(sep), more)
    };
    let hint = match fstype {
        Some("ext2" | "ext3" | "ext4") => {
            let (l, more) = list(" ");
            format!(
                "Files hit: restore the image, then on the restored {place} ({dev} here) \
                 debugfs -R \"icheck {l}\" {dev} names the inode using each block{more}, and \
                 debugfs -R \"ncheck INODE...\" {dev} the inodes' paths"
            )
        }
        Some("ntfs") => {
            let ranges: Vec<String> =
                blocks.iter().map(|&(f, t)| if f == t { f.to_string() } else { format!("{f}-{t}") }).collect();
            format!(
                "Files hit: restore the image, then on the restored {place} ({dev} here) \
                 ntfscluster -c RANGE {dev} names the files with data in RANGE, for each RANGE of: {}",
                ranges.join(", ")
            )
        }
        Some(other) => format!(
            "Files hit: restore the image and ask {other}'s own tools on the restored {place} which files \
             use these blocks (block = byte offset in the {place} / block size)"
        ),
        None => return,
    };
    let _ = writeln!(o, "  {pad:<24} {hint}");
}

/// The text `klon info` prints.
pub(crate) fn render_info(dir: &Path, m: &Manifest) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(o, "Image:        {}", dir.display());
    let _ = writeln!(o, "Complete:     yes (size {})", human_bytes(image_size(m)));
    let _ = writeln!(o, "Created:      {} by klon {} (format {})", m.created, m.klon_version, m.format_version);
    o + &render_body(m)
}

/// What `klon info` prints of an image after its first lines: the source's
/// table, the compression, and every stream.
pub(crate) fn render_body(m: &Manifest) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let s = &m.source;
    let _ = writeln!(
        o,
        "Source:       {} — {}, {} bytes, {}/{}-byte sectors, {}{}{}",
        s.path,
        human_bytes(s.size),
        s.size,
        s.logical_sector_size,
        s.physical_sector_size,
        s.transport.as_deref().unwrap_or("unknown"),
        s.model.as_deref().map(|x| format!(", model {x}")).unwrap_or_default(),
        s.serial.as_deref().map(|x| format!(", serial {x}")).unwrap_or_default(),
    );
    let _ = writeln!(
        o,
        "Table:        {}{}",
        m.layout.kind,
        m.layout.disk_id.as_deref().map(|x| format!(", disk id {x}")).unwrap_or_default()
    );
    let _ = writeln!(
        o,
        "Compression:  {} level {}, {} KiB chunks",
        m.compression.algorithm,
        m.compression.level,
        m.chunk_size >> 10
    );
    let _ = writeln!(o, "Streams:");
    for st in &m.streams {
        let part = m.layout.partitions.iter().find(|p| Some(p.number) == st.partition);
        let fs = st
            .fs
            .as_ref()
            .map(|f| format!("{}{}", f.fstype, f.label.as_deref().map(|l| format!(" \"{l}\"")).unwrap_or_default()))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            o,
            "  {:<24} start {:>14}  size {:>10}  {}",
            describe_stream(st),
            st.start,
            human_bytes(st.length),
            part.map(|p| format!(
                "type {}{}",
                match crate::table::type_name(&p.type_id) {
                    Some(name) => format!("{name} ({})", p.type_id),
                    None => p.type_id.clone(),
                },
                if p.name.is_empty() { String::new() } else { format!(" \"{}\"", p.name) }
            ))
            .unwrap_or_default()
        );
        let uuid = st.fs.as_ref().and_then(|f| f.uuid.as_deref()).map(|u| format!(", UUID {u}")).unwrap_or_default();
        let used = match (st.fs_used_bytes, st.fs_total_bytes, st.fs_block_size) {
            (Some(u), Some(t), Some(b)) => format!(", {} used of {} ({b}-byte blocks)", human_bytes(u), human_bytes(t)),
            _ => String::new(),
        };
        let _ = writeln!(o, "  {:<24} filesystem {fs}{uuid}{used}", "");
        if let Some(vg) = &st.lvm {
            render_lvm(&mut o, vg);
        }
        let _ = writeln!(
            o,
            "  {:<24} method {}: {}; stored {} -> {} in {} chunks",
            "",
            st.method,
            st.method_reason,
            human_bytes(st.stored_bytes),
            human_bytes(st.compressed_bytes),
            st.chunks
        );
        if !st.unreadable.is_empty() {
            render_unreadable(&mut o, st);
        }
    }
    o
}

/// A volume group under its PV's stream: the group, then each logical
/// volume with its size and where its segments lie.
pub(super) fn render_lvm(o: &mut String, vg: &crate::fs::lvm::VolumeGroup) {
    use std::fmt::Write as _;
    let _ = writeln!(
        o,
        "  {:<24} volume group {} (UUID {}, {} extents, metadata seqno {}), {} logical volumes:",
        "",
        vg.name,
        vg.uuid,
        human_bytes(vg.extent_size),
        vg.seqno,
        vg.lvs.len()
    );
    // A tree: each volume, a thin pool's thin volumes under it, LVM's own
    // (hidden) volumes last.
    let thin_of =
        |l: &crate::fs::lvm::LogicalVolume| l.segments.iter().find_map(|s| s.thin.as_ref().map(|t| t.pool.clone()));
    let is_pool = |name: &str| vg.lvs.iter().any(|l| l.name == name && l.segments.iter().any(|s| s.pool.is_some()));
    for lv in vg.lvs.iter().filter(|l| !l.hidden && thin_of(l).is_none_or(|p| !is_pool(&p))) {
        render_lv(o, vg, lv, 3);
        for t in vg.lvs.iter().filter(|l| thin_of(l).as_deref() == Some(lv.name.as_str())) {
            render_lv(o, vg, t, 5);
        }
    }
    for lv in vg.lvs.iter().filter(|l| l.hidden) {
        render_lv(o, vg, lv, 3);
    }
}

/// One logical volume of `vg`, `indent` columns in: its size, segments
/// and how it was copied.
fn render_lv(o: &mut String, vg: &crate::fs::lvm::VolumeGroup, lv: &crate::fs::lvm::LogicalVolume, indent: usize) {
    use std::fmt::Write as _;
    let segs: Vec<String> = lv
        .segments
        .iter()
        .map(|s| {
            let on: Vec<String> = s.stripes.iter().map(|(pv, e)| format!("{pv}:{e}")).collect();
            let what = match (&s.pool, &s.thin) {
                (Some(p), _) => {
                    format!(", data in {}, metadata in {}, {} blocks", p.data, p.metadata, human_bytes(p.chunk_size))
                }
                (_, Some(t)) => format!(
                    ", device {} of pool {}{}",
                    t.device_id,
                    t.pool,
                    t.origin.as_ref().map(|o| format!(", a snapshot of {o}")).unwrap_or_default()
                ),
                _ => String::new(),
            };
            format!(
                "{} {} extents{}{what}",
                s.kind,
                s.extent_count,
                if on.is_empty() { String::new() } else { format!(" at {}", on.join(",")) }
            )
        })
        .collect();
    let size = human_bytes(lv.extents().saturating_mul(vg.extent_size));
    let hidden = if lv.hidden { " (LVM's own)" } else { "" };
    let pad = " ".repeat(indent);
    let _ = writeln!(o, "  {:<24}{pad}LV {}{hidden} {size}: {}", "", lv.name, segs.join("; "));
    if let Some(m) = &lv.method {
        let fs = lv.fs.as_ref().map(|f| format!("filesystem {}, ", f.fstype)).unwrap_or_default();
        let mapped = lv.mapped_bytes.map(|u| format!(", {} mapped", human_bytes(u))).unwrap_or_default();
        let used = lv.used_bytes.map(|u| format!("{mapped}, {} copied", human_bytes(u))).unwrap_or_default();
        let _ = writeln!(o, "  {:<24}{pad}  {fs}method {m}{used}", "");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::streams::stream_info;
    use crate::fs::FsInfo;
    use crate::image::StreamKind;

    /// Partition 2 at 1 MiB holding `fstype` with `block`-byte blocks (or
    /// copied raw), with the unreadable disk ranges `bad`.
    fn part(fstype: &str, block: Option<u32>, bad: Vec<(u64, u64)>) -> String {
        let fs = FsInfo { fstype: fstype.into(), label: None, uuid: None };
        let mut st = stream_info("p2".into(), StreamKind::Partition, Some(2), 1 << 20, 64 << 20, Some(fs));
        st.fs_block_size = block;
        st.unreadable = bad;
        let mut o = String::new();
        render_unreadable(&mut o, &st);
        o.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn unreadable_ranges_are_named_by_partition_and_filesystem_block() {
        let o = part("ntfs", Some(4096), vec![((1 << 20) + 8192 + 512, 512), ((1 << 20) + 40960 - 512, 1024)]);
        assert!(o.contains("Unreadable: 1536 bytes in 2 places"), "{o}");
        assert!(
            o.contains(&format!(
                "512 bytes at disk offset {}: partition 2, ntfs block 2 (4096-byte blocks)",
                (1 << 20) + 8192 + 512
            )),
            "{o}"
        );
        // A range across a block boundary names both blocks.
        assert!(o.contains("partition 2, ntfs blocks 9-10 (4096-byte blocks)"), "{o}");
        assert!(o.contains("ntfscluster -c RANGE /dev/sdX2") && o.contains("for each RANGE of: 2, 9-10"), "{o}");

        let o = part("xfs", Some(4096), vec![((1 << 20) + 4096, 4096)]);
        assert!(o.contains("partition 2, xfs block 1 (4096-byte blocks)"), "{o}");
        assert!(o.contains("ask xfs's own tools on the restored partition 2"), "{o}");
        assert!(!o.contains("debugfs") && !o.contains("ntfscluster"), "{o}");
    }

    #[test]
    fn unreadable_ranges_of_a_raw_copy_give_the_offset_in_the_partition() {
        let o = part("crypto_LUKS", None, vec![((1 << 20) + 5000, 512)]);
        assert!(o.contains("partition 2, byte 5000 of it (copied raw: no filesystem blocks known)"), "{o}");
        assert!(!o.contains("Files hit"), "no block numbers, no hint: {o}");
    }

    #[test]
    fn many_unreadable_ranges_are_cut_short() {
        // Twelve ranges of 64 KiB (16 blocks each): 8 shown, the ext hint
        // names the first 64 blocks only.
        let bad: Vec<(u64, u64)> = (0..12).map(|i| ((1 << 20) + i * (1 << 20), 65536)).collect();
        let o = part("ext4", Some(4096), bad);
        assert!(o.contains("and 4 more (klon info --json lists them all)"), "{o}");
        let icheck = o.split('"').nth(1).unwrap();
        assert_eq!(icheck.split(' ').count(), 1 + 64, "{icheck}");
        assert!(icheck.starts_with("icheck 0 1 ") && icheck.ends_with(" 782 783"), "{icheck}");
        assert!(o.contains("(the first blocks only)"), "{o}");
    }
}
