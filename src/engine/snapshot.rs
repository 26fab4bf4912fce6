//! Backup into a repository: disk -> snapshot.
//!
//! The disk is read as for an image, but each chunk holds the used bytes of
//! one window of the disk (aligned to disk offsets), so a chunk's content
//! changes only when something in its window does. Workers hash each
//! chunk; one the repository has is not compressed again and costs only a
//! line of the snapshot's table. New chunks are packed into pack files; the
//! snapshot is written after every pack is synced, so it exists only when
//! all its data does.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::backup::{BackupOptions, kept_content, lanes_suit, read_jobs, source_info, stored_payload};
use super::{pipeline, streams};
use crate::device::Disk;
use crate::device::direct::IoBuf;
use crate::error::{Error, Result};
use crate::image::format::Extent;
use crate::image::manifest::FileInfo;
use crate::image::{Manifest, StreamInfo};
use crate::repo::pack::{self, ChunkId, NewBlob, PackWriter};
use crate::repo::read::ContentReader;
use crate::repo::snapshot::{self, Added, SnapshotFile, TableEntry};
use crate::repo::{BlobIndex, MAX_DELTA_DEPTH, Repository, delta, is_repository};
use crate::table;
use crate::ui::progress::Progress;

/// What a snapshot records besides the disk.
#[derive(Debug, Clone, Default)]
pub struct SnapshotOptions {
    /// A label for the snapshot.
    pub label: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// The window of a repository created by this backup.
    pub window: u32,
}

/// What a backup into a repository reports.
#[derive(Debug)]
pub struct SnapshotReport {
    /// The repository.
    pub repository: PathBuf,
    /// Whether this backup created it.
    pub created_repository: bool,
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
struct Hashed {
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
    let (time, utc_offset) = snapshot::now_and_offset();
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
    let source = Disk::open_source(source_path)?;
    crate::device::safety::check_source(&source, opts.allow_mounted)?;
    crate::device::safety::check_image_dir_not_on(&source, dir)?;
    let layout = table::read_layout(&source)?;
    let plan = streams::plan(&source, &layout, opts.plan)?;
    for w in &plan.warnings {
        eprintln!("klon: warning: {w}");
    }
    let created_repository = !is_repository(dir);
    let repo = if created_repository { Repository::create(dir, sopts.window)? } else { Repository::open(dir)? };
    let _lock = crate::repo::lock::take(&repo.locks_dir(), "backup", false)?;
    let index = repo.load_index()?;
    let window = u64::from(repo.config.window);
    let src_info = source_info(source_path, &source, &layout);
    let bases = if repo.config.format_version >= 2 {
        parent_bases(&repo, &index, &src_info, window, repo.config.format_version >= 3)
    } else {
        Default::default()
    };
    let packs_dir = repo.packs_dir();
    let mut warnings = plan.warnings.clone();

    let plans = &plan.streams;
    let sizes: Vec<u64> = plans.iter().map(|p| p.reads.iter().map(|r| r.1).sum()).collect();
    let read_bytes: u64 = sizes.iter().sum();
    let parts = plans.iter().zip(&sizes).map(|(p, &n)| (streams::describe(&p.info), n)).collect();
    let mut progress = Progress::with_parts("backup", read_bytes, parts, opts.quiet);
    let mut table: Vec<Vec<TableEntry>> = vec![Vec::new(); plans.len()];
    let mut stored: Vec<u64> = vec![0; plans.len()];
    let mut writer = PackWriter::new(&repo.packs_dir(), &repo.tmp_dir());
    let mut written: HashSet<ChunkId> = HashSet::new();
    let mut added = Added::default();
    let mut reused_chunks = 0u64;
    let order: Vec<usize> = (0..plans.len()).collect();
    let level = opts.level;
    // Chunks are a window, not CHUNK_SIZE: as many more in flight keep the
    // same bytes read ahead as a standalone image's backup.
    let depth = pipeline::depth(opts.workers) * (crate::image::format::CHUNK_SIZE as usize / window as usize).max(1);
    let run = pipeline::run(
        opts.workers,
        depth,
        |send| read_jobs(&source, plans, &order, lanes_suit(&source), Some(window), None, send),
        |job| {
            let (stream, read_len) = (job.stream, job.buf.len() as u64);
            let (extents, content) = kept_content(job);
            if content.is_empty() {
                return Ok(Hashed { stream, read_len, chunk: None });
            }
            let id = *blake3::hash(&content).as_bytes();
            let raw_len = content.len() as u32;
            let (mut payload, mut base, mut warning) = (None, None, None);
            if !index.usable(&id) {
                if let Some(b) = bases.get(&(extents[0].0 / window)) {
                    match delta_payload(&packs_dir, &index, b, &content, level) {
                        Ok(Some(p)) => (payload, base) = (Some(p), Some(*b)),
                        Ok(None) => {}
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
                    payload = Some(stored_payload(content, level)?);
                }
            }
            Ok(Hashed { stream, read_len, chunk: Some(HashedChunk { extents, raw_len, id, payload, base, warning }) })
        },
        |h: Hashed| {
            progress.add_part(h.stream, h.read_len);
            let Some(HashedChunk { extents, raw_len, id, payload, base, warning }) = h.chunk else { return Ok(()) };
            if let Some(w) = warning {
                eprintln!("klon: warning: {w}");
                warnings.push(w);
            }
            match payload {
                Some((flags, payload)) if written.insert(id) => {
                    writer.add(&NewBlob {
                        id,
                        raw_len,
                        flags,
                        payload_crc: crc32fast::hash(&payload),
                        payload: &payload,
                        base,
                    })?;
                    if base.is_some() {
                        added.deltas += 1;
                    }
                    added.chunks += 1;
                    added.content_bytes += u64::from(raw_len);
                    added.stored_bytes += (pack::BLOB_HEADER_LEN + payload.len()) as u64;
                    stored[h.stream] += payload.len() as u64;
                }
                Some((_, payload)) => stored[h.stream] += payload.len() as u64,
                None => {
                    reused_chunks += 1;
                    stored[h.stream] += index.blobs.get(&id).map_or(0, |(_, b)| u64::from(b.stored_len));
                }
            }
            table[h.stream].push(TableEntry { id, raw_len, extents });
            Ok(())
        },
    );
    if let Err(e) = run.and_then(|()| writer.commit()) {
        writer.abandon();
        drop(_lock);
        return Err(if created_repository {
            // Nothing else is in a repository this backup made.
            match std::fs::remove_dir_all(dir) {
                Ok(()) => e.with_note("no snapshot was made, and the new repository was removed"),
                Err(r) => e.with_note(&format!(
                    "no snapshot was made; removing the new repository {} failed too ({r}): delete it",
                    dir.display()
                )),
            }
        } else {
            e.with_note("no snapshot was made (what was written of it is removed by klon prune)")
        });
    }
    progress.finish();

    // Two lanes interleave a stream's chunks: the table lists them in disk order.
    for entries in &mut table {
        entries.sort_by_key(|e| e.extents[0].0);
    }
    let infos: Vec<StreamInfo> = plans
        .iter()
        .zip(&table)
        .zip(&stored)
        .map(|((p, entries), &stored)| {
            let mut info = p.info.clone();
            info.chunks = entries.len() as u64;
            info.stored_bytes = entries.iter().map(|e| u64::from(e.raw_len)).sum();
            info.compressed_bytes = stored;
            info.index = FileInfo { name: String::new(), size: 0, blake3: None };
            info.data_files = Vec::new();
            info
        })
        .collect();
    let mut image = Manifest::new(src_info, layout, opts.level, infos);
    image.chunk_size = repo.config.window;
    image.created = crate::image::manifest::rfc3339(time);
    let file = SnapshotFile {
        format: snapshot::FORMAT_NAME.into(),
        format_version: snapshot::FORMAT_VERSION,
        repository: repo.config.id.clone(),
        time,
        sequence: repo.snapshots()?.iter().map(|s| s.file.sequence).max().unwrap_or(0) + 1,
        created: crate::image::manifest::rfc3339(time),
        utc_offset,
        hostname: crate::repo::lock::hostname(),
        label: sopts.label.clone(),
        tags: sopts.tags.clone(),
        table: FileInfo { name: String::new(), size: 0, blake3: None },
        added,
        image,
    };
    let id = snapshot::write(&repo, file, &table)?;
    let snapshot = SnapshotFile::load(&repo, &id)?;
    Ok(SnapshotReport {
        repository: dir.to_path_buf(),
        created_repository,
        id,
        snapshot,
        seconds: started.elapsed().as_secs_f64(),
        read_bytes,
        reused_chunks,
        warnings,
        packs_written: writer.written.iter().map(|p| p.name.clone()).collect(),
    })
}

/// Reads back every pack a backup wrote (`packs`) and checks each chunk in
/// it: header, crc32, zstd, blake3 (the blobs tile the pack: every byte). The chunks it reused were checked when they were written; `klon
/// verify REPO:ID` reads every chunk of a snapshot.
pub fn verify_added(dir: &Path, packs: &[String], quiet: bool) -> Result<u64> {
    let repo = Repository::open(dir)?;
    let packs_dir = repo.packs_dir();
    let mut indexes = Vec::new();
    for name in packs {
        indexes.push(pack::PackIndex::load(&pack::index_path(&packs_dir, name), name)?);
    }
    let all = repo.load_index()?;
    let mut bases = ContentReader::new(packs_dir.clone(), &all)?;
    let mut progress = Progress::new("verify", indexes.iter().map(|i| i.pack_size).sum(), quiet);
    let mut bytes = 0u64;
    for idx in &indexes {
        pack::check_blobs(&packs_dir, idx, &mut |b| bases.base(b), |_, record, checked| {
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
) -> HashMap<u64, ChunkId> {
    let Ok(all) = repo.snapshots() else { return HashMap::new() };
    let same_size: Vec<_> = all.iter().filter(|s| s.file.image.source.size == source.size).collect();
    let same_disk = |s: &&&crate::repo::SnapshotEntry| {
        let other = &s.file.image.source;
        match (&other.serial, &source.serial) {
            (Some(a), Some(b)) => a == b,
            _ => other.path == source.path,
        }
    };
    let Some(parent) = same_size.iter().find(same_disk).or(same_size.first()) else { return HashMap::new() };
    let Ok(table) = parent.file.load_table(repo) else { return HashMap::new() };
    let mut bases = HashMap::new();
    for e in table.iter().flatten() {
        let base = match index.depth(&e.id) {
            None => continue,
            Some(d) if chains && d < MAX_DELTA_DEPTH => e.id,
            Some(_) => *index.chain(&e.id).last().expect("never empty"),
        };
        bases.entry(e.extents[0].0 / window).or_insert(base);
    }
    bases
}

/// `content` stored as changes to chunk `base`: the payload (the base's
/// id, then the patch, compressed when that is smaller) and its flags, or
/// None when too much of it is new for that to pay.
fn delta_payload(
    packs: &Path,
    index: &BlobIndex,
    base: &ChunkId,
    content: &[u8],
    level: i32,
) -> Result<Option<(u32, IoBuf)>> {
    let base_content = ContentReader::new(packs.to_path_buf(), index)?.content(base)?;
    let Some(patch) = delta::encode(&base_content, content) else { return Ok(None) };
    let (flags, stored) = stored_payload(IoBuf::from(patch), level)?;
    let mut payload = Vec::with_capacity(32 + stored.len());
    payload.extend_from_slice(base);
    payload.extend_from_slice(&stored);
    Ok(Some((flags | pack::FLAG_DELTA, IoBuf::from(payload))))
}
