//! Backup: disk -> image.
//!
//! The producer reads the source in large pieces, workers drop long runs of
//! zeros (where the stream allows it), compress and hash, and the consumer
//! appends chunk records to the image. The image becomes final only when
//! everything is written. Reading the source into jobs is [`jobs`]'s;
//! encoding a job into a chunk record is [`encode`]'s.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::sink::{ChunkEncoder, Finished, ImageSink};
use super::streams;
use crate::device::Disk;
use crate::engine::feedback::Feedback;
use crate::error::{Error, Result};
use crate::image::format::CHUNK_SIZE;
use crate::image::manifest::{FileInfo, Manifest, SourceInfo};
use crate::image::writer::{StreamFiles, StreamWriter};
use crate::image::{ImageWriter, StreamInfo};
use crate::table;

mod encode;
mod jobs;

pub(crate) use encode::{Encoded, encode, kept_content, stored_payload};
pub(crate) use jobs::{JobFiller, ReadJob, Rescue, lanes_suit, read_jobs};
pub use jobs::{RESCUE_PIECE, RESCUE_UNIT, is_unreadable_source, pieces};

/// Options of a backup.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// zstd level.
    pub level: i32,
    /// Largest data file, in bytes.
    pub split_size: u64,
    /// Allow partitions of the source to be mounted read-write.
    pub allow_mounted: bool,
    /// Where progress, warnings and notes go.
    pub feedback: Feedback,
    /// Worker threads.
    pub workers: usize,
    /// How partitions are read (raw or by their filesystem's used blocks).
    pub plan: streams::PlanOptions,
    /// Read around unreadable sectors instead of stopping (see [`Rescue`]).
    pub rescue: bool,
}

/// zstd level of a backup unless told otherwise.
pub const DEFAULT_LEVEL: i32 = 3;

impl Default for BackupOptions {
    /// What `klon backup` does without options (one worker per core), said
    /// to no one: a caller that shows progress hands in its feedback.
    fn default() -> BackupOptions {
        BackupOptions {
            level: DEFAULT_LEVEL,
            split_size: DEFAULT_SPLIT,
            allow_mounted: false,
            feedback: Feedback::silent(),
            workers: super::pipeline::default_workers(),
            plan: streams::PlanOptions::default(),
            rescue: false,
        }
    }
}

/// Smallest allowed --split: room for any chunk record.
pub const MIN_SPLIT: u64 = 2 * CHUNK_SIZE as u64 + (1 << 20);
/// Default --split: under 4 GiB so a FAT32 drive holds every file.
pub const DEFAULT_SPLIT: u64 = 4000 * (1 << 20);

/// What a finished backup reports.
#[derive(Debug)]
pub struct BackupReport {
    /// The final image directory.
    pub image: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Bytes read from the source.
    pub read_bytes: u64,
    /// Bytes of the image's files.
    pub image_bytes: u64,
    /// Warnings (partitions copied raw because their metadata failed a check).
    pub warnings: Vec<String>,
}

/// A source disk opened for a backup: checked, its table read, and what to
/// read of it planned.
pub(crate) struct SourceDisk {
    /// The disk, read-only.
    pub disk: Disk,
    /// Its partition table.
    pub layout: table::DiskLayout,
    /// What is read of each stream; warnings (printed when opened).
    pub plan: streams::Plan,
}

impl SourceDisk {
    /// Opens `path` for a backup into `dest`, refusing a source partition
    /// mounted read-write (unless `allow_mounted`) and a destination on the
    /// source itself; says the plan's warnings.
    pub fn open(path: &Path, dest: &Path, opts: &BackupOptions) -> Result<SourceDisk> {
        let disk = Disk::open_source(path)?;
        crate::device::safety::check_source(&disk, opts.allow_mounted)?;
        crate::device::safety::check_image_dir_not_on(&disk, dest)?;
        let layout = table::read_layout(&disk)?;
        let plan = streams::plan(&disk, &layout, opts.plan)?;
        for w in &plan.warnings {
            opts.feedback.warn(w);
        }
        for p in &plan.streams {
            opts.feedback.detail(1, || {
                let read: u64 = p.reads.iter().map(|r| r.1).sum();
                let ranges = match p.reads.len() {
                    1 => "1 range".to_string(),
                    n => format!("{n} ranges"),
                };
                format!(
                    "{}: {} ({}): {} to read of {} in {ranges}",
                    p.describe(),
                    p.info.method,
                    p.info.method_reason,
                    crate::units::human_bytes(read),
                    crate::units::human_bytes(p.info.length),
                )
            });
        }
        Ok(SourceDisk { disk, layout, plan })
    }

    /// Each stream's name and the bytes read of it, for progress.
    pub fn parts(&self) -> Vec<(String, u64)> {
        self.plan.streams.iter().map(|p| (streams::describe(&p.info), p.reads.iter().map(|r| r.1).sum())).collect()
    }
}

/// Backs up `source_path` into a new image directory `image_dir`.
pub fn backup(source_path: &Path, image_dir: &Path, opts: &BackupOptions) -> Result<BackupReport> {
    let started = Instant::now();
    if !(1..=22).contains(&opts.level) {
        return Err(Error::Usage(format!("compression level {} is out of range: use 1 to 22", opts.level)));
    }
    if opts.split_size < MIN_SPLIT {
        return Err(Error::Usage(format!("--split must be at least {} MiB", MIN_SPLIT >> 20)));
    }
    let src = SourceDisk::open(source_path, image_dir, opts)?;
    let source = &src.disk;
    let plans = &src.plan.streams;
    let mut infos: Vec<StreamInfo> = plans.iter().map(|p| p.info.clone()).collect();
    let mut parts = src.parts();
    let read_bytes = parts.iter().map(|p| p.1).sum();
    // A rescue's second pass: one more stream, the sectors it read.
    let rescue = opts.rescue.then(|| Rescue::new(source));
    if rescue.is_some() {
        infos.push(rescued_stream(source.size));
        parts.push((streams::describe(infos.last().expect("pushed")), 0));
    }
    let mut sink = ImageDirSink::create(image_dir, opts.split_size, &infos, opts.level)?;
    let order: Vec<usize> = (0..plans.len()).collect();
    let filled = super::sink::fill(&mut sink, "backup", parts, opts.workers, &opts.feedback, |send| {
        read_jobs(source, plans, &order, lanes_suit(source), None, rescue.as_ref(), send)?;
        match &rescue {
            Some(r) => r.scrape(source, plans.len(), send),
            None => Ok(()),
        }
    });
    if let Err(e) = filled {
        return Err(sink.abandon(e));
    }

    let mut unreadable = rescue.map(Rescue::into_ranges).unwrap_or_default();
    for (si, info) in infos.iter_mut().enumerate().take(plans.len()) {
        info.unreadable = unreadable.get_mut(si).map(std::mem::take).unwrap_or_default();
    }
    let mut warnings = src.plan.warnings.clone();
    let lost: Vec<&StreamInfo> = infos.iter().filter(|s| !s.unreadable.is_empty()).collect();
    if !lost.is_empty() {
        let bytes: u64 = lost.iter().map(|s| s.unreadable_bytes()).sum();
        let ranges: usize = lost.iter().map(|s| s.unreadable.len()).sum();
        let places: Vec<String> = lost.iter().map(|s| streams::describe(s)).collect();
        let w = format!(
            "{bytes} bytes in {ranges} places of {} could not be read and are stored as zeros (klon info lists them)",
            places.join(", ")
        );
        opts.feedback.warn(&w);
        warnings.push(w);
    }
    let source_info = source_info(source_path, source, &src.layout);
    let done = Finished { source: source_info, layout: src.layout.clone(), streams: infos, level: opts.level };
    let (image, manifest) = sink.commit(done)?;
    let image_bytes = image_size(&manifest);
    let mut report =
        BackupReport { image, manifest, seconds: started.elapsed().as_secs_f64(), read_bytes, image_bytes, warnings };
    if let Some(w) = super::joblog::write_backup_log(&report, source_path, opts) {
        opts.feedback.warn(&w);
        report.warnings.push(w);
    }
    Ok(report)
}

/// A new image directory (docs/FORMAT.md): each chunk compressed on the
/// workers and appended to its stream's files; final when committed.
pub(crate) struct ImageDirSink {
    writer: ImageWriter,
    streams: Vec<StreamWriter>,
    /// The stream chunks last went to: its data file ends when another's
    /// chunks come.
    current: Option<usize>,
    level: i32,
}

impl ImageDirSink {
    /// Starts the image at `dir` (under a partial name) with the streams
    /// `infos`.
    pub fn create(dir: &Path, split_size: u64, infos: &[StreamInfo], level: i32) -> Result<ImageDirSink> {
        let writer = ImageWriter::create(dir, split_size)?;
        let streams = match infos.iter().enumerate().map(|(i, s)| writer.stream(i as u32, &s.name)).collect() {
            Ok(s) => s,
            Err(e) => return Err(abandon(writer, e)),
        };
        Ok(ImageDirSink { writer, streams, current: None, level })
    }
}

/// An image's chunks: compressed at a level.
pub(crate) struct Compress(i32);

impl ChunkEncoder for Compress {
    type Chunk = Encoded;
    fn encode(&self, job: ReadJob) -> Result<Encoded> {
        encode(job, self.0)
    }
}

impl ImageSink for ImageDirSink {
    type Encoder = Compress;
    /// The image's directory and manifest.
    type Report = (PathBuf, Manifest);

    fn window(&self) -> Option<u64> {
        None
    }

    fn encoder(&self) -> Compress {
        Compress(self.level)
    }

    fn store(&mut self, out: Encoded) -> Result<(usize, u64)> {
        if let Some(chunk) = &out.chunk {
            if let Some(prev) = self.current.replace(out.stream)
                && prev != out.stream
            {
                self.streams[prev].end_file()?;
            }
            self.streams[out.stream].write_chunk_in(out.lane, chunk)?;
        }
        Ok((out.stream, out.read_len))
    }

    fn commit(self, done: Finished) -> Result<(PathBuf, Manifest)> {
        let files: Result<Vec<StreamFiles>> = self.streams.into_iter().map(|w| w.finish()).collect();
        let files = match files {
            Ok(f) => f,
            Err(e) => return Err(abandon(self.writer, e)),
        };
        let mut streams = Vec::new();
        for (info, f) in done.streams.iter().zip(files) {
            // A rescue's stream is kept only when its second pass read
            // something.
            if info.kind == crate::image::StreamKind::Rescued && f.chunks == 0 {
                let _ = std::fs::remove_file(self.writer.partial_dir().join(&f.index.name));
                continue;
            }
            streams.push(with_files(info, f));
        }
        let manifest = Manifest::new(done.source, done.layout, done.level, streams);
        let image = self.writer.commit(&manifest)?;
        Ok((image, manifest))
    }

    fn abandon(self, e: Error) -> Error {
        abandon(self.writer, e)
    }
}

/// What a manifest records of the source disk.
pub(crate) fn source_info(path: &Path, source: &Disk, layout: &table::DiskLayout) -> SourceInfo {
    let identity = crate::device::sysfs::identity(source);
    SourceInfo {
        path: path.display().to_string(),
        size: source.size,
        logical_sector_size: layout.sector_size,
        physical_sector_size: source.physical_sector_size,
        model: identity.as_ref().and_then(|i| i.model.clone()),
        serial: identity.as_ref().and_then(|i| i.serial.clone()),
        transport: Some(identity.map(|i| i.transport).unwrap_or_else(|| "file".to_string())),
    }
}

/// Total size of an image's files.
pub fn image_size(m: &Manifest) -> u64 {
    // Saturating: the sizes come from a manifest, which may be damaged
    // (ImageReader::open then finds the files' sizes differ).
    m.streams
        .iter()
        .flat_map(|s| std::iter::once(&s.index).chain(&s.data_files))
        .fold(0u64, |sum, f: &FileInfo| sum.saturating_add(f.size))
}

/// The stream of sectors a rescue read in its second pass.
fn rescued_stream(disk_size: u64) -> StreamInfo {
    let mut info = streams::stream_info("rescued".into(), crate::image::StreamKind::Rescued, None, 0, disk_size, None);
    info.fill = crate::image::Fill::Free;
    info.method_reason = "sectors read one by one after read errors, written over the zeros stored for them".into();
    info
}

/// Removes the unfinished image of a failed job and says so in `e`.
pub(crate) fn abandon(writer: ImageWriter, e: Error) -> Error {
    let partial = writer.partial_dir().to_path_buf();
    let note = match writer.abandon() {
        Ok(()) => "no image was written (the unfinished one was removed)".to_string(),
        Err(r) => format!(
            "removing the unfinished image failed too ({r}); it may be left at {}: delete it",
            partial.display()
        ),
    };
    e.with_note(&note)
}

/// A stream's manifest entry with the files written for it.
pub(crate) fn with_files(info: &StreamInfo, f: StreamFiles) -> StreamInfo {
    let mut info = info.clone();
    info.chunks = f.chunks;
    info.stored_bytes = f.stored_bytes;
    info.compressed_bytes = f.compressed_bytes;
    info.index = f.index;
    info.data_files = f.data_files;
    info
}
