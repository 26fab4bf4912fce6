//! The manifest: the human-readable description of an image (klon.json),
//! protected by its blake3 in klon.json.b3 (b3sum's format).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::format::{Extent, FORMAT_VERSION, FORMAT_VERSION_RESCUED, hex};
use crate::error::{Error, Result};
use crate::fs::FsInfo;
use crate::table::{DiskLayout, TableKind};

/// File name of the manifest inside an image directory.
pub const MANIFEST_NAME: &str = "klon.json";
/// File name of the manifest's checksum.
pub const MANIFEST_SUM_NAME: &str = "klon.json.b3";
/// Value of the manifest's `format` field.
pub const FORMAT_NAME: &str = "klon-image";
/// Largest manifest klon reads.
const MANIFEST_MAX: u64 = 64 << 20;

/// The whole manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Always "klon-image".
    pub format: String,
    /// Format version; readers refuse versions they do not know.
    pub format_version: u32,
    /// klon version that wrote the image.
    pub klon_version: String,
    /// When the backup finished (UTC, RFC 3339).
    pub created: String,
    /// The disk that was backed up.
    pub source: SourceInfo,
    /// Its partition layout.
    pub layout: DiskLayout,
    /// Content bytes per chunk at most.
    pub chunk_size: u32,
    /// Compression used for chunk payloads.
    pub compression: Compression,
    /// The data streams, in the order their numbers refer to.
    pub streams: Vec<StreamInfo>,
}

/// Identity of the source disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceInfo {
    /// Path it was read from.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Logical sector size.
    pub logical_sector_size: u32,
    /// Physical sector size.
    pub physical_sector_size: u32,
    /// Model, when known.
    pub model: Option<String>,
    /// Serial number, when known.
    pub serial: Option<String>,
    /// Transport (usb, nvme, sata, loop, file, ...).
    pub transport: Option<String>,
}

/// Compression settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Compression {
    /// Always "zstd".
    pub algorithm: String,
    /// zstd level.
    pub level: i32,
}

/// What part of the disk a stream covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamKind {
    /// Everything outside the data partitions: tables, boot code, gaps.
    Boot,
    /// One data partition.
    Partition,
    /// The whole disk (no partition table).
    Disk,
    /// Sectors read back from a failing source after everything else
    /// (`--rescue`, format version 2): its chunks lie over parts of the
    /// other streams, which hold zeros there, and a restore writes it last.
    Rescued,
}

/// What the bytes of a stream's range that no chunk stores hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fill {
    /// They were zeros on the source: a restore makes them zero.
    Zero,
    /// They are not used (free space, unallocated gaps): a restore leaves
    /// them alone.
    Free,
}

/// One file of the image with its size (and, for index files, its blake3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// File name inside the image directory.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// blake3 of the whole file, lower-case hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
}

/// One data stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamInfo {
    /// Stream name, also the stem of its files: boot, p1, p2, ..., disk.
    pub name: String,
    /// What it covers.
    pub kind: StreamKind,
    /// Partition number for partition streams.
    pub partition: Option<u32>,
    /// First byte of the disk range covered.
    pub start: u64,
    /// Length of the disk range covered.
    pub length: u64,
    /// How blocks were chosen: "raw" (every non-zero block), or the
    /// filesystem whose allocation map was used.
    pub method: String,
    /// Why this method (e.g. "no filesystem-aware reader yet").
    pub method_reason: String,
    /// What unstored bytes in the range hold.
    pub fill: Fill,
    /// Filesystem found in the partition, if any.
    pub fs: Option<FsInfo>,
    /// The filesystem's allocation unit, when its used blocks were read.
    #[serde(default)]
    pub fs_block_size: Option<u32>,
    /// The filesystem's size in bytes, when its used blocks were read.
    #[serde(default)]
    pub fs_total_bytes: Option<u64>,
    /// Bytes the filesystem uses (what is copied), when read.
    #[serde(default)]
    pub fs_used_bytes: Option<u64>,
    /// Number of chunks.
    pub chunks: u64,
    /// Content bytes stored (before compression).
    pub stored_bytes: u64,
    /// Bytes of the data files.
    pub compressed_bytes: u64,
    /// The index file (its blake3 is the stream's blake3).
    pub index: FileInfo,
    /// Data files in order.
    pub data_files: Vec<FileInfo>,
    /// Disk ranges of the stream that could not be read from the source
    /// (`--rescue`): stored as zeros. Sorted, not overlapping; only in
    /// format version 2.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreadable: Vec<Extent>,
    /// For an LVM2 physical volume: its volume group, as its newest
    /// metadata describes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lvm: Option<crate::fs::lvm::VolumeGroup>,
}

impl StreamInfo {
    /// Bytes of the stream that could not be read from the source.
    pub fn unreadable_bytes(&self) -> u64 {
        self.unreadable.iter().map(|r| r.1).sum()
    }
}

impl Manifest {
    /// Bytes of the source a rescue could not read (stored as zeros).
    pub fn unreadable_bytes(&self) -> u64 {
        self.streams.iter().map(StreamInfo::unreadable_bytes).fold(0, u64::saturating_add)
    }

    /// Where the source could not be read, per stream: "partition 1: 1536
    /// bytes in 3 places", or `None` when everything was read.
    pub fn unreadable_places(&self) -> Option<String> {
        let places: Vec<String> = self
            .streams
            .iter()
            .filter(|s| !s.unreadable.is_empty())
            .map(|s| {
                let n = s.unreadable.len();
                format!(
                    "{}: {} bytes in {n} place{}",
                    crate::image::reader::describe_stream(s),
                    s.unreadable_bytes(),
                    if n == 1 { "" } else { "s" }
                )
            })
            .collect();
        (!places.is_empty()).then(|| places.join(", "))
    }
}

impl Manifest {
    /// The manifest of an image written now by this klon: `source` with
    /// `layout`, chunks compressed with zstd at `level`, and `streams`.
    pub fn new(source: SourceInfo, layout: DiskLayout, level: i32, streams: Vec<StreamInfo>) -> Manifest {
        Manifest {
            format: FORMAT_NAME.to_string(),
            format_version: if streams.iter().any(|s| !s.unreadable.is_empty() || s.kind == StreamKind::Rescued) {
                FORMAT_VERSION_RESCUED
            } else {
                FORMAT_VERSION
            },
            klon_version: env!("CARGO_PKG_VERSION").to_string(),
            created: now_rfc3339(),
            source,
            layout,
            chunk_size: crate::image::format::CHUNK_SIZE,
            compression: Compression { algorithm: "zstd".to_string(), level },
            streams,
        }
    }

    /// Writes klon.json and klon.json.b3 into `dir` and syncs them.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let mut json =
            serde_json::to_vec_pretty(self).map_err(|e| Error::Corrupt(format!("encoding manifest: {e}")))?;
        json.push(b'\n');
        let sum = format!("{}  {}\n", blake3::hash(&json).to_hex(), MANIFEST_NAME);
        write_synced(&dir.join(MANIFEST_NAME), &json)?;
        write_synced(&dir.join(MANIFEST_SUM_NAME), sum.as_bytes())?;
        Ok(())
    }

    /// Reads and checks the manifest of the image in `dir`.
    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_NAME);
        let sum_path = dir.join(MANIFEST_SUM_NAME);
        let meta = std::fs::metadata(&path).map_err(|e| missing_or_io(e, &path, "manifest"))?;
        if meta.len() > MANIFEST_MAX {
            return Err(Error::Corrupt(format!(
                "{}: manifest is implausibly large ({} bytes)",
                path.display(),
                meta.len()
            )));
        }
        let json = std::fs::read(&path).map_err(|e| Error::io("reading", &path, None, e))?;
        let sum_bytes = std::fs::read(&sum_path).map_err(|e| missing_or_io(e, &sum_path, "manifest checksum"))?;
        let sum_text = std::str::from_utf8(&sum_bytes).map_err(|_| {
            Error::Corrupt(format!(
                "{}: the manifest checksum file is not text (it holds a blake3 sum in hex): it is damaged",
                sum_path.display()
            ))
        })?;
        let expected = sum_text.split_whitespace().next().unwrap_or("");
        let actual = hex(blake3::hash(&json).as_bytes());
        if expected != actual {
            return Err(Error::Corrupt(format!(
                "{}: manifest blake3 does not match {} (the manifest is damaged)",
                path.display(),
                sum_path.display()
            )));
        }
        let value: serde_json::Value = serde_json::from_slice(&json)
            .map_err(|e| Error::Corrupt(format!("{}: manifest is not valid JSON: {e}", path.display())))?;
        if value.get("format").and_then(|v| v.as_str()) != Some(FORMAT_NAME) {
            return Err(Error::Corrupt(format!("{}: not a klon image manifest", path.display())));
        }
        let version = value.get("format_version").and_then(|v| v.as_u64()).unwrap_or(0);
        if version != FORMAT_VERSION as u64 && version != FORMAT_VERSION_RESCUED as u64 {
            return Err(Error::Unsupported(format!(
                "{}: image format version {version}; this klon reads versions {FORMAT_VERSION} and {FORMAT_VERSION_RESCUED} — use a klon that matches the image",
                path.display()
            )));
        }
        let m: Manifest = serde_json::from_value(value).map_err(|e| {
            Error::Corrupt(format!("{}: manifest does not have the expected fields: {e}", path.display()))
        })?;
        m.validate(&path)?;
        Ok(m)
    }

    /// Structural checks on values a restore relies on, all made before
    /// anything is written: the layout is one klon could have read (see
    /// [`DiskLayout::check`]), agrees with the source disk, and the streams
    /// cover it as a backup lays them out (the area outside partitions and
    /// one stream per partition at the partition's place, or one stream for
    /// a disk without a table), with files named once and sized for the
    /// chunks they hold.
    /// Checks the manifest of a repository's snapshot, which has no files
    /// of its own (its chunks are listed in the snapshot's table): the same
    /// checks as for an image but those of files and their sizes.
    pub fn validate_without_files(&self, path: &Path) -> Result<()> {
        self.validate_as(path, false)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        self.validate_as(path, true)
    }

    fn validate_as(&self, path: &Path, files: bool) -> Result<()> {
        let bad = |what: String| Err(Error::Corrupt(format!("{}: {what}", path.display())));
        if self.chunk_size == 0 || self.chunk_size > super::format::CHUNK_SIZE {
            return bad(format!("chunk size {} out of range", self.chunk_size));
        }
        if self.layout.disk_size != self.source.size {
            return bad("layout and source disagree on the disk size".into());
        }
        if let Err(why) = self.layout.check() {
            return bad(format!("the partition layout is not possible: {why}"));
        }
        if self.source.logical_sector_size != self.layout.sector_size {
            return bad(format!(
                "the source disk has {}-byte sectors but its partition table was read with sector size {}",
                self.source.logical_sector_size, self.layout.sector_size
            ));
        }
        let mut names = std::collections::HashSet::new();
        let mut partitions_seen = std::collections::HashSet::new();
        for s in &self.streams {
            let end = s.start.checked_add(s.length);
            if end.is_none_or(|e| e > self.source.size) {
                return bad(format!("stream {} reaches past the end of the disk", s.name));
            }
            if s.name.is_empty() || !s.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return bad(format!("stream name {:?} is not allowed", s.name));
            }
            for f in s.data_files.iter().chain(std::iter::once(&s.index)).filter(|_| files) {
                if f.name.contains('/') || f.name.starts_with('.') {
                    return bad(format!("file name {:?} is not allowed", f.name));
                }
                if !names.insert(f.name.as_str()) {
                    return bad(format!("file {} is listed twice", f.name));
                }
            }
            let whole = s.start == 0 && s.length == self.layout.disk_size;
            let placed = match (s.kind, self.layout.kind) {
                (StreamKind::Disk, TableKind::None) => {
                    whole && self.streams.iter().filter(|o| o.kind != StreamKind::Rescued).count() == 1
                }
                (StreamKind::Rescued, _) => {
                    whole
                        && self.format_version == FORMAT_VERSION_RESCUED
                        && self.streams.iter().filter(|o| o.kind == StreamKind::Rescued).count() == 1
                }
                (StreamKind::Boot, TableKind::Gpt | TableKind::Mbr) => whole,
                (StreamKind::Partition, TableKind::Gpt | TableKind::Mbr) => {
                    let part = s.partition.and_then(|n| self.layout.partitions.iter().find(|p| p.number == n));
                    part.is_some_and(|p| p.start == s.start && p.size == s.length)
                        && partitions_seen.insert(s.partition)
                }
                _ => false,
            };
            if !placed {
                return bad(format!(
                    "stream {} ({:?}, bytes {}..{}) does not cover its part of the disk as the layout says",
                    s.name,
                    s.kind,
                    s.start,
                    s.start.saturating_add(s.length)
                ));
            }
            let mut reach = s.start;
            for &(a, l) in &s.unreadable {
                let end = a.checked_add(l);
                if self.format_version != FORMAT_VERSION_RESCUED
                    || l == 0
                    || a < reach
                    || end.is_none_or(|e| e > s.start + s.length)
                {
                    return bad(format!("stream {}: its unreadable ranges are out of order or outside it", s.name));
                }
                reach = a + l;
            }
            let index_len = (s.chunks.checked_mul(super::format::INDEX_ENTRY_LEN as u64))
                .and_then(|n| n.checked_add(super::format::INDEX_HEADER_LEN as u64));
            let data_len = s.data_files.iter().try_fold(0u64, |sum, f| sum.checked_add(f.size));
            let chunks_hold = s.chunks.checked_mul(u64::from(self.chunk_size));
            if s.stored_bytes > s.length
                || s.chunks > s.stored_bytes
                || chunks_hold.is_some_and(|n| n < s.stored_bytes)
                || (files
                    && (index_len != Some(s.index.size)
                        || data_len != Some(s.compressed_bytes)
                        || s.data_files.len() as u64 > s.chunks))
                || (!files && (!s.data_files.is_empty() || s.index.size != 0))
            {
                return bad(format!(
                    "stream {}: its sizes do not agree, the manifest is damaged ({} chunks, {} stored bytes of a \
                     {}-byte range, index of {} bytes, {} data files of {} bytes)",
                    s.name,
                    s.chunks,
                    s.stored_bytes,
                    s.length,
                    s.index.size,
                    s.data_files.len(),
                    s.compressed_bytes
                ));
            }
        }
        let boot = self.streams.iter().filter(|s| s.kind == StreamKind::Boot).count();
        if self.layout.kind != TableKind::None && boot != 1 {
            return bad(format!("{boot} streams for the area outside partitions; an image has one"));
        }
        Ok(())
    }
}

fn missing_or_io(e: std::io::Error, path: &Path, what: &str) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::Corrupt(format!("{}: {what} is missing", path.display()))
    } else {
        Error::io("reading", path, None, e)
    }
}

/// Writes a small file and fsyncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| Error::io("creating", path, None, e))?;
    f.write_all(bytes).map_err(|e| Error::io("writing", path, None, e))?;
    f.sync_all().map_err(|e| Error::io("flushing", path, None, e))
}

/// Current time as RFC 3339 UTC ("2026-11-23T06:00:00Z").
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    rfc3339(secs as i64)
}

/// `secs` since 1970-01-01 UTC as RFC 3339 UTC.
pub fn rfc3339(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_609_459_199), "2020-12-31T23:59:59Z");
        assert_eq!(super::rfc3339(1_709_164_800), "2024-02-29T00:00:00Z");
    }

    #[test]
    fn rfc3339_shape() {
        let s = super::now_rfc3339();
        assert_eq!(s.len(), 20, "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z'), "{s}");
    }
}
