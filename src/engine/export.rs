//! An image of another kind written as a klon image directory (format 1):
//! a snapshot of a repository, or a Clonezilla image. `klon deploy` sends a
//! klon image directory's stream (docs/DEPLOY.md), so it writes these as
//! one first. Every checksum of the source is checked on the way; the new
//! image is written under a partial name and renamed when complete.

use std::path::{Path, PathBuf};

use super::backup::{ImageDirSink, ReadJob, image_size};
use super::feedback::Feedback;
use super::sink::{Finished, ImageSink};
use super::source::snapshot::SnapshotImage;
use crate::error::{Error, Result};
use crate::image::{ChunkStore, Lane, StreamInfo};
use crate::units::human_bytes;

/// How the new image is written.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// zstd level of its chunks.
    pub level: i32,
    /// Worker threads.
    pub workers: usize,
    /// Where progress and warnings go.
    pub feedback: Feedback,
}

/// Whether `source` must be written as a klon image before it can be sent:
/// a snapshot (`REPO[:SNAPSHOT]`) or a Clonezilla image.
pub fn needs_export(source: &Path) -> bool {
    crate::repo::split_spec(source).is_some() || crate::clonezilla::is_clonezilla_image(source)
}

/// An image to be written as a klon image, opened once: its size is known
/// before the room for it is checked, and a snapshot stays held (see
/// [`SnapshotImage::open`]) until it is written.
pub enum Exportable {
    /// A snapshot of a repository (`REPO[:SNAPSHOT]`).
    Snapshot(Box<SnapshotImage>),
    /// A Clonezilla image directory.
    Clonezilla(PathBuf),
}

impl Exportable {
    /// Opens `source` (`REPO[:SNAPSHOT]` or a Clonezilla image directory);
    /// anything else is refused. Warnings go to `feedback`.
    pub fn open(source: &Path, feedback: &Feedback) -> Result<Exportable> {
        if let Some((repo, spec)) = crate::repo::split_spec(source) {
            return Ok(Exportable::Snapshot(Box::new(SnapshotImage::open(
                &repo,
                spec.as_deref(),
                "export",
                feedback,
            )?)));
        }
        if crate::clonezilla::is_clonezilla_image(source) {
            return Ok(Exportable::Clonezilla(source.to_path_buf()));
        }
        Err(Error::Usage(format!(
            "{}: not a snapshot of a repository or a Clonezilla image, so nothing to write as a klon image",
            source.display()
        )))
    }

    /// The most bytes its klon image can take: its content, as chunks
    /// stored whole at worst. For a refusal before anything is written.
    pub fn most_bytes(&self) -> Result<u64> {
        match self {
            Exportable::Snapshot(snap) => {
                // Each chunk record's header is far below 1 % of its content.
                let m = snap.manifest();
                Ok(m.streams.iter().map(|s| s.stored_bytes).sum::<u64>() / 100 * 101 + (1 << 20))
            }
            // A Clonezilla image's partitions are compressed too (gzip,
            // zstd): twice their size is room enough.
            Exportable::Clonezilla(dir) => crate::engine::source::summarize(dir).map(|s| s.image_bytes * 2 + (1 << 20)),
        }
    }

    /// Writes it as a new klon image at `dir`, which must not exist.
    /// Returns the new image's directory.
    pub fn write(&self, dir: &Path, opts: &ExportOptions) -> Result<PathBuf> {
        let snap = match self {
            Exportable::Snapshot(snap) => snap,
            Exportable::Clonezilla(source) => {
                let copts = super::czimage::ConvertOptions {
                    level: opts.level,
                    split_size: super::backup::DEFAULT_SPLIT,
                    feedback: opts.feedback.clone(),
                    workers: opts.workers,
                };
                return super::czimage::convert(source, dir, &copts).map(|r| r.image);
            }
        };
        let (image, manifest) = snapshot_to_image(&**snap, dir, opts)?;
        opts.feedback.note(&format!(
            "{} written as the klon image {} ({})",
            snap.location().display(),
            image.display(),
            human_bytes(image_size(&manifest))
        ));
        Ok(image)
    }
}

/// Each chunk of `store` decoded (its content checked against its blake3)
/// and encoded again as a chunk of a klon image at `dir`.
fn snapshot_to_image(
    store: &dyn ChunkStore,
    dir: &Path,
    opts: &ExportOptions,
) -> Result<(PathBuf, crate::image::Manifest)> {
    let m = store.manifest();
    let infos: Vec<StreamInfo> = m.streams.clone();
    let mut sink = ImageDirSink::create(dir, super::backup::DEFAULT_SPLIT, &infos, opts.level)?;
    let parts = infos.iter().map(|s| (crate::image::reader::describe_stream(s), s.stored_bytes)).collect();
    let filled = super::sink::fill(&mut sink, "export", parts, opts.workers, &opts.feedback, |send| {
        for si in 0..infos.len() {
            let mut more = true;
            store.for_each_chunk(si, &mut |c| {
                super::cancel::check("the export")?;
                let extents = c.header.extents.clone();
                let buf = c.decode()?;
                more = send(ReadJob { stream: si, extents, buf, skip_zero: false, lane: Lane::First });
                Ok(more)
            })?;
            if !more {
                break;
            }
        }
        Ok(())
    });
    if let Err(e) = filled {
        return Err(sink.abandon(e));
    }
    let done = Finished { source: m.source.clone(), layout: m.layout.clone(), streams: infos, level: opts.level };
    sink.commit(done)
}
