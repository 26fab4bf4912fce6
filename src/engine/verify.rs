//! Verify: read a whole image and check every checksum, touching no disk.

use std::path::Path;
use std::time::Instant;

use super::feedback::Feedback;
use super::pipeline;
use super::streams::describe;
use crate::error::{Error, Result};
use crate::image::ChunkStore;
use crate::image::format::Extent;

/// What a verify reports.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// Streams checked.
    pub streams: usize,
    /// Chunks checked.
    pub chunks: u64,
    /// Content bytes checked.
    pub bytes: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Checks every file, index, chunk header, payload crc32 and content
/// blake3 of the image at `dir`.
pub fn verify(dir: &Path, workers: usize, feedback: &Feedback) -> Result<VerifyReport> {
    // The checks a restore makes before writing, before any data is read.
    let image = super::source::klon::KlonImage::open(dir)?;
    verify_image(&image, workers, feedback)
}

/// Checks every chunk of the image whose chunks `reader` reads (its
/// manifest and indexes were checked when it was opened).
pub fn verify_image(reader: &dyn ChunkStore, workers: usize, feedback: &Feedback) -> Result<VerifyReport> {
    let started = Instant::now();
    let dir = reader.location();
    let streams = &reader.manifest().streams;
    let total = stored_total(dir, streams)?;
    // A progress bar per stream (partition).
    let parts = streams.iter().map(|s| (describe(s), s.stored_bytes)).collect();
    let mut progress = feedback.meter("verify", total, parts);
    // Per stream: where the previous chunk ended, to check order.
    let mut last_end: Vec<u64> = streams.iter().map(|s| s.start).collect();
    let mut chunks = 0u64;
    let mut bytes = 0u64;
    let reader_ref = reader;
    pipeline::run(
        workers,
        pipeline::depth(workers),
        |send| {
            for si in 0..streams.len() {
                reader_ref.for_each_chunk(si, &mut |c| {
                    super::cancel::check("verify")?;
                    Ok(send(c))
                })?;
            }
            Ok(())
        },
        |c| {
            let (stream, extents, raw_len) = (c.stream, c.header.extents.clone(), c.header.raw_len);
            let location = c.location.clone();
            c.decode()?;
            Ok((stream, extents, raw_len, location))
        },
        |(si, extents, raw_len, location): (usize, Vec<Extent>, u32, String)| {
            let first = extents.first().map(|e| e.0).unwrap_or(0);
            if first < last_end[si] {
                return Err(Error::Corrupt(format!(
                    "{location}: chunk overlaps the previous one in {}",
                    describe(&streams[si])
                )));
            }
            last_end[si] = extents.last().map(|e| e.0 + e.1).unwrap_or(first);
            chunks += 1;
            bytes += raw_len as u64;
            progress.add_part(si, raw_len as u64);
            Ok(())
        },
    )?;
    progress.finish();
    let stored = total;
    if bytes != stored {
        return Err(Error::Corrupt(format!(
            "{}: the chunks hold {bytes} bytes, the manifest says {stored}",
            dir.display()
        )));
    }
    Ok(VerifyReport { streams: streams.len(), chunks, bytes, seconds: started.elapsed().as_secs_f64() })
}

/// The content bytes the manifest of the image at `dir` says its streams
/// store, in all; counts that add up past 2^64 (the manifest is untrusted)
/// are damage, not an overflow.
pub fn stored_total(dir: &Path, streams: &[crate::image::StreamInfo]) -> Result<u64> {
    streams.iter().try_fold(0u64, |sum, s| sum.checked_add(s.stored_bytes)).ok_or_else(|| {
        Error::Corrupt(format!(
            "{}: the stored bytes of the streams in {} add up to more than 2^64: the manifest is damaged",
            dir.display(),
            crate::image::manifest::MANIFEST_NAME
        ))
    })
}

/// File in an image directory recording the last verification's outcome.
/// Informational (not covered by checksums): the wizard shows it.
pub const LAST_VERIFY_NAME: &str = "last-verify.json";

/// The recorded outcome of the last verification of an image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LastVerify {
    /// When it finished (UTC, RFC 3339).
    pub time: String,
    /// Whether every check held.
    pub ok: bool,
    /// The klon that verified.
    pub klon_version: String,
    /// What failed, when it failed.
    pub problem: Option<String>,
}

/// Records the outcome of a verification of the image at `dir`. Failing to
/// write it (a read-only drive) is not an error: the outcome was reported.
pub fn record_result(dir: &Path, result: &Result<VerifyReport>) {
    if !dir.join(crate::image::manifest::MANIFEST_NAME).exists() {
        return; // not an image (or an unfinished one): nothing to annotate
    }
    let record = LastVerify {
        time: crate::image::manifest::now_rfc3339(),
        ok: result.is_ok(),
        klon_version: env!("CARGO_PKG_VERSION").to_string(),
        problem: result.as_ref().err().map(|e| e.to_string()),
    };
    if let Ok(mut json) = serde_json::to_vec_pretty(&record) {
        json.push(b'\n');
        let _ = crate::image::manifest::write_synced(&dir.join(LAST_VERIFY_NAME), &json);
    }
}

/// The largest `last-verify.json` that is read: klon writes a few hundred
/// bytes (a problem's message included).
const LAST_VERIFY_MAX: u64 = 64 << 10;

/// The recorded outcome of the last verification of the image at `dir`.
/// Informational: anything but a regular file of at most
/// [`LAST_VERIFY_MAX`] bytes holding klon's record is ignored (a FIFO is
/// not even opened, and no more than that is read).
pub fn last_result(dir: &Path) -> Option<LastVerify> {
    use std::io::Read;
    let path = dir.join(LAST_VERIFY_NAME);
    let meta = std::fs::metadata(&path).ok()?;
    if !meta.is_file() || meta.len() > LAST_VERIFY_MAX {
        return None;
    }
    let mut text = Vec::new();
    std::fs::File::open(&path).ok()?.take(LAST_VERIFY_MAX + 1).read_to_end(&mut text).ok()?;
    if text.len() as u64 > LAST_VERIFY_MAX {
        return None;
    }
    serde_json::from_slice(&text).ok()
}
