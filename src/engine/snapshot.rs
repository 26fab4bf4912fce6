//! Backup into a repository: disk -> snapshot.
//!
//! The disk is read as for an image, but each chunk holds the used bytes of
//! one window of the disk (aligned to disk offsets), so a chunk's content
//! changes only when something in its window does. Workers hash each
//! chunk; one the repository has is not compressed again and costs only a
//! line of the snapshot's table. New chunks are packed into pack files; the
//! snapshot is written after every pack is synced, so it exists only when
//! all its data does.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::backup::{
    BackupOptions, ReadJob, SourceDisk, kept_content, lanes_suit, read_jobs, source_info, stored_payload,
};
use super::feedback::Feedback;
use super::sink::{ChunkEncoder, Finished, ImageSink};
use crate::device::direct::IoBuf;
use crate::error::{Error, Result};
use crate::image::format::Extent;
use crate::image::manifest::{FileInfo, SourceInfo};
use crate::image::{Manifest, StreamInfo};
use crate::repo::crypto::{Keys, Sealed};
use crate::repo::pack::{self, ChunkId, NewBlob, PackWriter};
use crate::repo::read::ContentReader;
use crate::repo::snapshot::{self, Added, SnapshotFile, TableEntry};
use crate::repo::store::Store;
use crate::repo::{BlobIndex, MAX_DELTA_DEPTH, Repository, delta};

/// What a snapshot records besides the disk.
#[derive(Debug, Clone, Default)]
pub struct SnapshotOptions {
    /// A label for the snapshot.
    pub label: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// The window of a repository created by this backup.
    pub window: u32,
    /// Encrypt a repository created by this backup (its passphrase from
    /// `repo::crypto::passphrase`); an existing one must then be encrypted.
    pub encrypt: bool,
}

/// What a backup into a repository reports.
#[derive(Debug)]
pub struct SnapshotReport {
    /// The repository.
    pub repository: PathBuf,
    /// Whether this backup created it.
    pub created_repository: bool,
    /// The recovery key of an encrypted repository this backup created:
    /// to show once.
    pub recovery_key: Option<String>,
    /// The new snapshot's id.
    pub id: String,
    /// The snapshot.
    pub snapshot: SnapshotFile,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Bytes read from the source.
    pub read_bytes: u64,
    /// Chunks the repository had already.
    pub reused_chunks: u64,
    /// Warnings (partitions copied raw because their metadata failed a check).
    pub warnings: Vec<String>,
    /// The packs it wrote.
    pub packs_written: Vec<String>,
}

/// A chunk after a worker: where it goes, its id, and its stored payload
/// (flags and bytes) when the repository did not have it.
pub(crate) struct Hashed {
    stream: usize,
    read_len: u64,
    chunk: Option<HashedChunk>,
}

struct HashedChunk {
    extents: Vec<Extent>,
    raw_len: u32,
    id: ChunkId,
    payload: Option<(u32, IoBuf)>,
    /// The base a delta payload applies to (the payload starts with it).
    base: Option<ChunkId>,
    /// Why a delta could not be made (the base did not read back).
    warning: Option<String>,
}

/// Backs up `source_path` as a new snapshot of the repository at `dir`
/// (created when `dir` does not exist or is empty).
pub fn backup_to_repository(
    source_path: &Path,
    dir: &Path,
    opts: &BackupOptions,
    sopts: &SnapshotOptions,
) -> Result<SnapshotReport> {
    let started = Instant::now();
    if !(1..=22).contains(&opts.level) {
        return Err(Error::Usage(format!("compression level {} is out of range: use 1 to 22", opts.level)));
    }
    if opts.rescue {
        return Err(Error::Unsupported(
            "--rescue writes a standalone image, not a snapshot of a repository: back up the failing disk \
             into a new directory (klon backup --rescue SOURCE NEW-DIR), restore that to a good disk, and \
             back the good disk up into the repository"
                .into(),
        ));
    }
    let src = SourceDisk::open(source_path, dir, opts)?;
    let src_info = source_info(source_path, &src.disk, &src.layout);
    let mut sink = SnapshotSink::open(dir, sopts, &src_info, opts.level, &opts.feedback)?;
    let parts = src.parts();
    let read_bytes = parts.iter().map(|p| p.1).sum();
    let plans = &src.plan.streams;
    let order: Vec<usize> = (0..plans.len()).collect();
    let window = sink.window();
    let filled = super::sink::fill(&mut sink, "backup", parts, opts.workers, &opts.feedback, |send| {
        read_jobs(&src.disk, plans, &order, lanes_suit(&src.disk), window, None, send)
    });
    if let Err(e) = filled {
        return Err(sink.abandon(e));
    }
    let streams = plans.iter().map(|p| p.info.clone()).collect();
    let done = Finished { source: src_info, layout: src.layout.clone(), streams, level: opts.level };
    let mut report = sink.commit(done)?;
    report.read_bytes = read_bytes;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// A new snapshot in a repository (docs/REPOSITORY.md): each chunk hashed
/// on the workers; one the repository has costs a line of the table, a new
/// one is stored (as a delta of the previous snapshot's chunk of its
/// window when that pays) in new packs. The snapshot is written when
/// committed, after every pack is durable.
pub(crate) struct SnapshotSink {
    dir: PathBuf,
    repo: Repository,
    created_repository: bool,
    _lock: crate::repo::lock::Lock,
    encoder: SnapshotEncoder,
    opts: SnapshotOptions,
    time: i64,
    utc_offset: i32,
    table: Vec<Vec<TableEntry>>,
    stored: Vec<u64>,
    writer: PackWriter,
    written: HashSet<ChunkId>,
    added: Added,
    reused_chunks: u64,
    warnings: Vec<String>,
    feedback: Feedback,
}

/// A repository's chunks: hashed, looked up, and new ones stored as
/// deltas or compressed.
#[derive(Clone)]
pub(crate) struct SnapshotEncoder {
    index: Arc<BlobIndex>,
    keys: Keys,
    bases: Arc<WindowBases>,
    store: Arc<dyn Store>,
    window: u64,
    level: i32,
}

impl SnapshotSink {
    /// Opens the repository at `dir` for a new snapshot of `source`
    /// (creating it when `dir` does not exist or is empty), under a shared
    /// lock, with its index and the chunks of the disk's previous snapshot.
    /// Warnings go to `feedback` as they come.
    pub fn open(
        dir: &Path,
        opts: &SnapshotOptions,
        source: &SourceInfo,
        level: i32,
        feedback: &Feedback,
    ) -> Result<SnapshotSink> {
        let (time, utc_offset) = snapshot::now_and_offset();
        let created_repository = !crate::repo::exists(dir)?;
        let repo = if created_repository {
            Repository::create_with(dir, opts.window, opts.encrypt)?
        } else {
            Repository::open(dir)?
        };
        if opts.encrypt && !repo.keys.encrypted() {
            return Err(Error::Usage(format!(
                "{} is a repository that is not encrypted: --encrypt makes a new one encrypted (back up into a \
                 new directory, then klon copy what this one holds there if you want it too)",
                dir.display()
            )));
        }
        let lock = repo.lock("backup", false, feedback)?;
        let index = repo.load_index()?;
        let window = u64::from(repo.config.window);
        let bases = if repo.config.format_version >= 2 {
            parent_bases(&repo, &index, source, window, repo.config.format_version >= 3)
        } else {
            Default::default()
        };
        let encoder = SnapshotEncoder {
            index: Arc::new(index),
            keys: repo.keys.clone(),
            bases: Arc::new(bases),
            store: repo.store.clone(),
            window,
            level,
        };
        Ok(SnapshotSink {
            dir: dir.to_path_buf(),
            created_repository,
            _lock: lock,
            encoder,
            opts: opts.clone(),
            time,
            utc_offset,
            table: Vec::new(),
            stored: Vec::new(),
            writer: PackWriter::new(repo.store.clone(), &repo.keys),
            written: HashSet::new(),
            added: Added::default(),
            reused_chunks: 0,
            warnings: Vec::new(),
            feedback: feedback.clone(),
            repo,
        })
    }
}

impl ChunkEncoder for SnapshotEncoder {
    type Chunk = Hashed;

    fn encode(&self, job: ReadJob) -> Result<Hashed> {
        let (stream, read_len) = (job.stream, job.buf.len() as u64);
        let (extents, content) = kept_content(job);
        if content.is_empty() {
            return Ok(Hashed { stream, read_len, chunk: None });
        }
        let id = self.keys.chunk_id(&content);
        let raw_len = content.len() as u32;
        let (mut payload, mut base, mut warning) = (None, None, None);
        if !self.index.usable(&id) {
            if let Some(b) = self.bases.get(extents[0].0 / self.window).map(|p| self.index.id_at(p)) {
                match delta_payload(&self.store, &self.index, &self.keys, b, &content, self.level) {
                    Ok(Some(p)) => (payload, base) = (Some(p), Some(*b)),
                    Ok(None) => {}
                    // The repository cannot be read (a drive's I/O error,
                    // a server gone): nothing more can be written either.
                    Err(e) if !matches!(e, Error::Corrupt(_)) => return Err(e),
                    Err(e) => {
                        warning = Some(format!(
                            "the chunk an earlier snapshot has at disk offset {} did not read back ({e}): \
                             this one is stored whole; run klon check --read-data",
                            extents[0].0
                        ))
                    }
                }
            }
            if payload.is_none() {
                payload = Some(stored_payload(content, self.level)?);
            }
            // Sealed here, on the workers.
            if self.keys.encrypted()
                && let Some((flags, plain)) = payload.take()
            {
                let flags = flags | pack::FLAG_SEALED;
                let sealed = self.keys.seal(Sealed::Blob { id: &id, flags, raw_len }, &plain);
                payload = Some((flags, IoBuf::from(sealed)));
            }
        }
        Ok(Hashed { stream, read_len, chunk: Some(HashedChunk { extents, raw_len, id, payload, base, warning }) })
    }
}

impl ImageSink for SnapshotSink {
    type Encoder = SnapshotEncoder;
    type Report = SnapshotReport;

    fn window(&self) -> Option<u64> {
        Some(self.encoder.window)
    }

    fn encoder(&self) -> SnapshotEncoder {
        self.encoder.clone()
    }

    fn store(&mut self, h: Hashed) -> Result<(usize, u64)> {
        let (stream, read) = (h.stream, h.read_len);
        let Some(HashedChunk { extents, raw_len, id, payload, base, warning }) = h.chunk else {
            return Ok((stream, read));
        };
        if self.table.len() <= stream {
            self.table.resize(stream + 1, Vec::new());
            self.stored.resize(stream + 1, 0);
        }
        if let Some(w) = warning {
            self.feedback.warn(&w);
            self.warnings.push(w);
        }
        match payload {
            Some((flags, payload)) if self.written.insert(id) => {
                self.writer.add(&NewBlob {
                    id,
                    raw_len,
                    flags,
                    payload_crc: crc32fast::hash(&payload),
                    payload: &payload,
                    base,
                })?;
                if base.is_some() {
                    self.added.deltas += 1;
                }
                self.added.chunks += 1;
                self.added.content_bytes += u64::from(raw_len);
                self.added.stored_bytes += (pack::BLOB_HEADER_LEN + payload.len()) as u64;
                self.stored[stream] += payload.len() as u64;
            }
            Some((_, payload)) => self.stored[stream] += payload.len() as u64,
            None => {
                self.reused_chunks += 1;
                self.stored[stream] += self.encoder.index.get(&id).map_or(0, |(_, b)| u64::from(b.stored_len));
            }
        }
        self.table[stream].push(TableEntry { id, raw_len, extents: extents.into() });
        Ok((stream, read))
    }

    fn commit(mut self, done: Finished) -> Result<SnapshotReport> {
        if let Err(e) = self.writer.commit() {
            return Err(self.abandon(e));
        }
        let repo = &self.repo;
        let mut table = std::mem::take(&mut self.table);
        table.resize(done.streams.len(), Vec::new());
        self.stored.resize(done.streams.len(), 0);
        // Two lanes interleave a stream's chunks: the table lists them in
        // disk order.
        for entries in &mut table {
            entries.sort_by_key(|e| e.extents[0].0);
        }
        let infos: Vec<StreamInfo> = done
            .streams
            .iter()
            .zip(&table)
            .zip(&self.stored)
            .map(|((info, entries), &stored)| {
                let mut info = info.clone();
                info.chunks = entries.len() as u64;
                info.stored_bytes = entries.iter().map(|e| u64::from(e.raw_len)).sum();
                info.compressed_bytes = stored;
                info.index = FileInfo { name: String::new(), size: 0, blake3: None };
                info.data_files = Vec::new();
                info
            })
            .collect();
        let mut image = Manifest::new(done.source, done.layout, done.level, infos);
        image.chunk_size = repo.config.window;
        image.created = crate::image::manifest::rfc3339(self.time);
        let file = SnapshotFile {
            format: snapshot::FORMAT_NAME.into(),
            format_version: snapshot::FORMAT_VERSION,
            repository: repo.config.id.clone(),
            time: self.time,
            sequence: repo.snapshots()?.iter().map(|s| s.file.sequence).max().unwrap_or(0) + 1,
            created: crate::image::manifest::rfc3339(self.time),
            utc_offset: self.utc_offset,
            hostname: crate::repo::lock::hostname(),
            label: self.opts.label.clone(),
            tags: self.opts.tags.clone(),
            table: FileInfo { name: String::new(), size: 0, blake3: None },
            added: self.added,
            original: None,
            image,
        };
        let id = snapshot::write(repo, file, &table)?;
        let snapshot = SnapshotFile::load(repo, &id)?;
        Ok(SnapshotReport {
            repository: self.dir.clone(),
            created_repository: self.created_repository,
            recovery_key: self.repo.recovery_key.clone(),
            id,
            snapshot,
            seconds: 0.0,
            read_bytes: 0,
            reused_chunks: self.reused_chunks,
            warnings: self.warnings,
            packs_written: self.writer.written.iter().map(|p| p.name.clone()).collect(),
        })
    }

    fn abandon(mut self, e: Error) -> Error {
        self.writer.abandon();
        drop(self._lock);
        if self.created_repository {
            // Nothing else is in a repository this backup made.
            match crate::repo::store::open(&self.dir).and_then(|s| s.destroy()) {
                Ok(()) => e.with_note("no snapshot was made, and the new repository was removed"),
                Err(r) => e.with_note(&format!(
                    "no snapshot was made; removing the new repository {} failed too ({r}): delete it",
                    self.dir.display()
                )),
            }
        } else {
            e.with_note("no snapshot was made (what was written of it is removed by klon prune)")
        }
    }
}

/// Copies snapshot `id` of the repository `from` into the repository `to`
/// (made with `from`'s window and keys when it does not exist), under a
/// shared lock of each, then reads back what the copy wrote: the
/// wizard's "copy to another drive" and the unattended job's `copy_drive`.
pub fn copy_snapshot_into(
    from: &Path,
    to: &Path,
    id: &str,
    feedback: &Feedback,
) -> Result<crate::repo::copy::CopyReport> {
    let src = Repository::open(from)?;
    let _src_lock = src.lock("copy", false, feedback)?;
    let dst = if crate::repo::exists(to)? { Repository::open(to)? } else { Repository::create_like(to, &src)? };
    let _dst_lock = dst.lock("copy", false, feedback)?;
    let report = crate::repo::copy::copy(&src, &dst, &[id.to_string()], 3)?;
    verify_added(to, &report.packs_written, feedback)?;
    Ok(report)
}

/// Reads back every pack a backup wrote (`packs`) and checks each chunk in
/// it: header, crc32, zstd, blake3 (the blobs tile the pack: every byte). The chunks it reused were checked when they were written; `klon
/// verify REPO:ID` reads every chunk of a snapshot.
pub fn verify_added(dir: &Path, packs: &[String], feedback: &Feedback) -> Result<u64> {
    let repo = Repository::open(dir)?;
    let mut indexes = Vec::new();
    for name in packs {
        indexes.push(repo.pack_index(name)?);
    }
    let all = repo.load_index()?;
    let mut bases = ContentReader::new(repo.store.clone(), &all, &repo.keys)?;
    let mut progress = feedback.meter("verify", indexes.iter().map(|i| i.pack_size).sum(), Vec::new());
    let mut bytes = 0u64;
    for idx in &indexes {
        pack::check_blobs(&*repo.store, idx, &repo.keys, &mut |b| bases.base(b), |_, record, checked| {
            checked?;
            bytes += record.len() as u64;
            progress.add(record.len() as u64);
            Ok(())
        })?;
    }
    progress.finish();
    Ok(bytes)
}

/// The chunk each window of the disk had in the newest snapshot of the
/// same disk (same size, and the same serial number or, without one, the
/// same path; else the newest of the same size): what a changed window's
/// chunk is stored as changes to. That chunk itself, when it is whole or
/// fewer than [`MAX_DELTA_DEPTH`] deltas lead to it and the repository
/// (format 3 on) takes chains of deltas; else the whole chunk its chain
/// ends in. Keyed by window number. Empty when there is no such snapshot
/// or its table does not read (then every new chunk is stored whole;
/// check names the damage).
fn parent_bases(
    repo: &Repository,
    index: &BlobIndex,
    source: &crate::image::manifest::SourceInfo,
    window: u64,
    chains: bool,
) -> WindowBases {
    let Ok(all) = repo.snapshots() else { return WindowBases::default() };
    let same_size: Vec<_> = all.iter().filter(|s| s.file.image.source.size == source.size).collect();
    let same_disk = |s: &&&crate::repo::SnapshotEntry| {
        let other = &s.file.image.source;
        match (&other.serial, &source.serial) {
            (Some(a), Some(b)) => a == b,
            _ => other.path == source.path,
        }
    };
    let Some(parent) = same_size.iter().find(same_disk).or(same_size.first()) else { return WindowBases::default() };
    let Ok(table) = parent.file.load_table(repo) else { return WindowBases::default() };
    let mut bases = Vec::with_capacity(table.iter().map(Vec::len).sum());
    for e in table.iter().flatten() {
        let Some(at) = index.position(&e.id) else { continue };
        let base = match index.depth_at(at) {
            None => continue,
            Some(d) if chains && d < MAX_DELTA_DEPTH => at,
            Some(_) => index.bases_at(at).last().unwrap_or(at),
        };
        bases.push((e.extents[0].0 / window, base as u32));
    }
    // The first chunk of each window (a stable sort keeps table order).
    bases.sort_by_key(|(w, _)| *w);
    bases.dedup_by_key(|(w, _)| *w);
    WindowBases(bases)
}

/// The chunk each window of the disk had in its previous snapshot (see
/// [`parent_bases`]), by its place in the repository's [`BlobIndex`],
/// sorted by window: 16 bytes a window.
#[derive(Debug, Default)]
struct WindowBases(Vec<(u64, u32)>);

impl WindowBases {
    fn get(&self, window: u64) -> Option<usize> {
        self.0.binary_search_by_key(&window, |(w, _)| *w).ok().map(|i| self.0[i].1 as usize)
    }
}

/// `content` stored as changes to chunk `base`: the payload (the base's
/// id, then the patch, compressed when that is smaller) and its flags, or
/// None when too much of it is new for that to pay.
fn delta_payload(
    store: &Arc<dyn Store>,
    index: &BlobIndex,
    keys: &Keys,
    base: &ChunkId,
    content: &[u8],
    level: i32,
) -> Result<Option<(u32, IoBuf)>> {
    let base_content = ContentReader::uncached(store.clone(), index, keys)?.content(base)?;
    let Some(patch) = delta::encode(&base_content, content) else { return Ok(None) };
    let (flags, stored) = stored_payload(IoBuf::from(patch), level)?;
    let mut payload = Vec::with_capacity(32 + stored.len());
    payload.extend_from_slice(base);
    payload.extend_from_slice(&stored);
    Ok(Some((flags | pack::FLAG_DELTA, IoBuf::from(payload))))
}
