//! One interface for where a backup's image goes: a new image directory
//! ([`super::backup::ImageDirSink`], docs/FORMAT.md) or a new snapshot in a
//! repository ([`super::snapshot::SnapshotSink`], docs/REPOSITORY.md).
//!
//! A job reads a disk (or converts an image) into [`ReadJob`]s; the
//! pipeline's workers make each into a chunk with the sink's
//! [`ChunkEncoder`] (compress, or look up and make a delta), and the last
//! stage hands them, in reading order, to [`ImageSink::store`]. When every
//! byte is read, [`ImageSink::commit`] makes the image final — it exists
//! only once all its data is durable — or [`ImageSink::abandon`] removes
//! what a failed job wrote. A new destination (a remote repository) is one
//! more implementation of these, not a branch in every job.

use super::backup::ReadJob;
use super::feedback::Feedback;
use super::pipeline;
use crate::error::{Error, Result};
use crate::image::StreamInfo;
use crate::image::format::CHUNK_SIZE;
use crate::image::manifest::SourceInfo;
use crate::table::DiskLayout;

/// The workers' half of a sink, shared by every worker thread.
pub(crate) trait ChunkEncoder: Sync {
    /// What a worker makes of a job, for [`ImageSink::store`].
    type Chunk: Send;
    /// Makes a job into a chunk to store.
    fn encode(&self, job: ReadJob) -> Result<Self::Chunk>;
}

/// What a finished job knows of the image: the disk and its streams.
pub(crate) struct Finished {
    /// The disk the image is of.
    pub source: SourceInfo,
    /// Its partition table.
    pub layout: DiskLayout,
    /// The streams as planned (the sink fills in what it stored of each).
    pub streams: Vec<StreamInfo>,
    /// zstd level the chunks were compressed at.
    pub level: i32,
}

/// Where an image goes.
pub(crate) trait ImageSink {
    /// The workers' half.
    type Encoder: ChunkEncoder;
    /// What the sink reports once its image is final.
    type Report;

    /// No job may cross a multiple of this many bytes of the disk (a
    /// repository's window); None: jobs of up to a chunk, read in lanes.
    fn window(&self) -> Option<u64>;

    /// The encoder the workers share.
    fn encoder(&self) -> Self::Encoder;

    /// Keeps one chunk (in reading order). Returns its stream and the
    /// bytes of the source it stands for.
    fn store(&mut self, chunk: <Self::Encoder as ChunkEncoder>::Chunk) -> Result<(usize, u64)>;

    /// Makes the image final with what `done` says of it.
    fn commit(self, done: Finished) -> Result<Self::Report>;

    /// Removes what the failed job wrote, and says so in `e`.
    fn abandon(self, e: Error) -> Error;
}

/// Runs the jobs `produce` reads through `sink` on the pipeline, with a
/// progress bar per stream (`parts`: each stream's name and the bytes its
/// jobs hold). Does not commit or abandon: the caller does either.
pub(crate) fn fill<S: ImageSink>(
    sink: &mut S,
    label: &str,
    parts: Vec<(String, u64)>,
    workers: usize,
    feedback: &Feedback,
    produce: impl FnOnce(&mut dyn FnMut(ReadJob) -> bool) -> Result<()> + Send,
) -> Result<()> {
    let encoder = sink.encoder();
    // Jobs of a window smaller than a chunk: as many more in flight keep
    // the same bytes read ahead.
    let depth = pipeline::depth(workers) * sink.window().map_or(1, |w| (u64::from(CHUNK_SIZE) / w).max(1) as usize);
    feedback.detail(1, || format!("{label}: {workers} workers, {depth} jobs in flight"));
    let mut progress = feedback.meter(label, parts.iter().map(|p| p.1).sum(), parts);
    pipeline::run(
        workers,
        depth,
        produce,
        |job| encoder.encode(job),
        |chunk| {
            let (stream, read) = sink.store(chunk)?;
            progress.add_part(stream, read);
            Ok(())
        },
    )?;
    progress.finish();
    Ok(())
}
