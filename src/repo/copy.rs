//! `klon copy SRC DST [SNAPSHOT...]`: snapshots of one repository into
//! another (a second drive), sending only the chunks the destination lacks.
//!
//! Each chunk sent is read from the source and checked (its content's
//! blake3, a delta made from its chain of bases) before its record is
//! written into a new pack of the destination as it was stored; a delta's
//! bases go with it unless the destination has them. Into a destination of
//! format 1 or 2, which take no chains of deltas, every delta is sent as
//! its content, stored whole. A copied snapshot is written only once every
//! pack holding its chunks is durable, so a copy cut short leaves no
//! snapshot, and the next one sends only what did not arrive: the packs
//! that did are complete, with their indexes.
//!
//! A copy is a new snapshot of the destination (its file names the
//! repository it belongs to, so its id differs) that records the id it was
//! first made under (`original`): a snapshot the destination already holds
//! (or a copy of) is skipped.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::crypto::{Keys, Sealed};
use super::pack::{self, BLOB_HEADER_LEN, ChunkId, NewBlob, PackWriter};
use super::read::ContentReader;
use super::snapshot::{SnapshotFile, short};
use super::{BlobIndex, MAX_DELTA_DEPTH, Repository, SnapshotEntry};
use crate::error::{Error, Result};

/// What a copy did.
#[derive(Debug, Default, Serialize)]
pub struct CopyReport {
    /// The new snapshots' ids in the destination, with the source's.
    pub copied: Vec<(String, String)>,
    /// Source snapshots the destination already held.
    pub skipped: Vec<String>,
    /// Chunks sent.
    pub chunks: u64,
    /// Bytes of the records written.
    pub stored_bytes: u64,
    /// Packs written (for the read-back).
    #[serde(skip)]
    pub packs_written: Vec<String>,
}

/// Copies the snapshots `which` (ids or unique prefixes; all when empty)
/// of `src` into `dst`, oldest first. Both are locked (shared) by the
/// caller.
pub fn copy(src: &Repository, dst: &Repository, which: &[String], level: i32) -> Result<CopyReport> {
    if src.config.id == dst.config.id {
        return Err(Error::Usage(format!(
            "{} and {} are the same repository: copy into another one",
            src.dir.display(),
            dst.dir.display()
        )));
    }
    if dst.config.window < src.config.window {
        return Err(Error::Usage(format!(
            "{}: its window ({} bytes) is smaller than that of {} ({} bytes), whose chunks it cannot hold: copy \
             into a new repository (klon copy creates one with the same window)",
            dst.dir.display(),
            dst.config.window,
            src.dir.display(),
            src.config.window
        )));
    }
    let mut chosen: Vec<SnapshotEntry> = if which.is_empty() {
        src.snapshots()?
    } else {
        which.iter().map(|w| src.resolve(Some(w))).collect::<Result<_>>()?
    };
    // Oldest first, each once.
    chosen.sort_by(|a, b| a.order().cmp(&b.order()));
    chosen.dedup_by(|a, b| a.id == b.id);

    let held: HashSet<String> = dst.snapshots()?.iter().map(|s| original_of(s).to_string()).collect();
    if !src.keys.same_as(&dst.keys) {
        return copy_rekeyed(src, dst, chosen, &held, level);
    }
    let src_index = src.load_index()?;
    let dst_index = dst.load_index()?;
    let chains = dst.config.format_version >= 3;
    let mut reader = ContentReader::new(src.store.clone(), &src_index, &src.keys)?;
    let mut decomp = zstd::bulk::Decompressor::new().map_err(|e| Error::Unsupported(format!("zstd: {e}")))?;
    let mut writer = PackWriter::new(dst.store.clone(), &dst.keys);
    // The chunks sent, and how many deltas lead from each to a whole
    // chunk in the destination.
    let mut sent: HashMap<ChunkId, usize> = HashMap::new();
    let mut report = CopyReport::default();
    let mut ready = Vec::new();
    let result = (|| {
        for s in chosen {
            if held.contains(original_of(&s)) {
                report.skipped.push(s.id.clone());
                continue;
            }
            let table = s.file.load_table(src)?;
            for e in table.iter().flatten() {
                // Its chain of bases from the whole chunk up, so that each
                // base is there (sent or held) before its deltas.
                let wanted = if chains { src_index.chain(&e.id) } else { vec![e.id] };
                for id in wanted.into_iter().rev() {
                    if sent.contains_key(&id) || dst_index.usable(&id) {
                        continue;
                    }
                    crate::engine::cancel::check("copy")?;
                    // A delta goes as it is onto a base the destination
                    // reads within the chain limit; else as its content.
                    let depth = src_index.get(&id).and_then(|(_, b)| b.base).and_then(|b| {
                        let below = sent.get(&b).copied().or_else(|| dst_index.depth(&b))?;
                        (chains && below < MAX_DELTA_DEPTH).then_some(below + 1)
                    });
                    report.stored_bytes += send(
                        &mut reader,
                        &mut decomp,
                        &*src.store,
                        &src_index,
                        &id,
                        depth.is_none(),
                        level,
                        &src.keys,
                        &mut writer,
                    )
                    .map_err(|err| {
                        err.with_note(&format!(
                            "(a chunk of snapshot {} at disk offset {})",
                            s.short_id(),
                            e.extents[0].0
                        ))
                    })?;
                    report.chunks += 1;
                    sent.insert(id, depth.unwrap_or(0));
                }
            }
            ready.push((s, table));
        }
        writer.commit()
    })();
    finish(dst, writer, result, ready, report)
}

/// Ends a copy whose packs `writer` wrote (`sent`: how that went): on
/// failure, nothing more; else, every pack being durable, the snapshots
/// `ready` with their tables, in the source's order.
fn finish(
    dst: &Repository,
    mut writer: PackWriter,
    sent: Result<()>,
    ready: Vec<(SnapshotEntry, super::snapshot::Table)>,
    mut report: CopyReport,
) -> Result<CopyReport> {
    if let Err(e) = sent {
        writer.abandon();
        return Err(e.with_note(
            "no snapshot was copied; the chunks that arrived stay in the destination and are not sent again \
             (klon prune removes them if no copy comes to use them)",
        ));
    }
    report.packs_written = writer.written.iter().map(|p| p.name.clone()).collect();
    for (s, table) in ready {
        let mut file: SnapshotFile = s.file.clone();
        file.original = Some(original_of(&s).to_string());
        file.repository = dst.config.id.clone();
        file.sequence = dst.snapshots()?.iter().map(|d| d.file.sequence).max().unwrap_or(0) + 1;
        let id = super::snapshot::write(dst, file, &table)?;
        report.copied.push((id, s.id.clone()));
    }
    Ok(report)
}

/// Stores `content` (chunk `id` in the destination) whole into `writer`:
/// compressed at `level` as a backup would, sealed with `keys` when they
/// are. Returns the bytes written.
fn store_whole(writer: &mut PackWriter, keys: &Keys, id: &ChunkId, content: Vec<u8>, level: i32) -> Result<u64> {
    let raw_len = content.len() as u32;
    let (flags, plain) = crate::engine::backup::stored_payload(content.into(), level)?;
    let flags = if keys.encrypted() { flags | pack::FLAG_SEALED } else { flags };
    let payload = keys.seal(Sealed::Blob { id, flags, raw_len }, &plain);
    writer.add(&NewBlob {
        id: *id,
        raw_len,
        flags,
        payload_crc: crc32fast::hash(&payload),
        payload: &payload,
        base: None,
    })?;
    Ok((BLOB_HEADER_LEN + payload.len()) as u64)
}

/// Copies `chosen` into `dst` whose keys are not `src`'s (one encrypted
/// and the other not, or each with its own): every chunk is read and
/// checked with the source's keys, named with the destination's (its
/// keyed id there), and one the destination lacks is stored whole and
/// sealed with the destination's keys; each snapshot's table is written
/// with the destination's ids. Deltas do not cross: a base's id differs.
fn copy_rekeyed(
    src: &Repository,
    dst: &Repository,
    chosen: Vec<SnapshotEntry>,
    held: &HashSet<String>,
    level: i32,
) -> Result<CopyReport> {
    let src_index = src.load_index()?;
    let dst_index = dst.load_index()?;
    let mut reader = ContentReader::new(src.store.clone(), &src_index, &src.keys)?;
    let mut writer = PackWriter::new(dst.store.clone(), &dst.keys);
    // Each source chunk met, by its id in the destination.
    let mut renamed: HashMap<ChunkId, ChunkId> = HashMap::new();
    let mut sent: HashSet<ChunkId> = HashSet::new();
    let mut report = CopyReport::default();
    let mut ready = Vec::new();
    let result = (|| {
        for s in chosen {
            if held.contains(original_of(&s)) {
                report.skipped.push(s.id.clone());
                continue;
            }
            let mut table = s.file.load_table(src)?;
            for e in table.iter_mut().flatten() {
                if let Some(id) = renamed.get(&e.id) {
                    e.id = *id;
                    continue;
                }
                crate::engine::cancel::check("copy")?;
                let note = || format!("(a chunk of snapshot {} at disk offset {})", s.short_id(), e.extents[0].0);
                let content = reader.content(&e.id).map_err(|err| err.with_note(&note()))?;
                let id = dst.keys.chunk_id(&content);
                if !dst_index.usable(&id) && sent.insert(id) {
                    report.stored_bytes += store_whole(&mut writer, &dst.keys, &id, content, level)?;
                    report.chunks += 1;
                }
                renamed.insert(e.id, id);
                e.id = id;
            }
            ready.push((s, table));
        }
        writer.commit()
    })();
    finish(dst, writer, result, ready, report)
}

/// The id a snapshot was first made under.
fn original_of(s: &SnapshotEntry) -> &str {
    s.file.original.as_deref().unwrap_or(&s.id)
}

/// Reads chunk `id` from the source's packs (in `store`), checked, and
/// writes it into `writer`: its record as stored, or (a delta, when
/// `whole`) its content stored whole. Returns the bytes written.
#[allow(clippy::too_many_arguments)]
fn send(
    reader: &mut ContentReader,
    decomp: &mut zstd::bulk::Decompressor,
    store: &dyn super::store::Store,
    index: &BlobIndex,
    id: &ChunkId,
    whole: bool,
    level: i32,
    keys: &Keys,
    writer: &mut PackWriter,
) -> Result<u64> {
    let Some((pack_name, e)) = index.get(id) else {
        return Err(Error::Corrupt(format!("chunk {} is in no pack of the source (run klon check)", short(id))));
    };
    let e = &e;
    if e.base.is_some() && whole {
        // The content, checked: its id (made from its bases).
        return store_whole(writer, keys, id, reader.content(id)?, level);
    }
    let file = pack::pack_file(pack_name);
    let mut record = vec![0; e.record_len() as usize];
    store.open(&file)?.read_exact_at(&mut record, e.offset)?;
    let where_ = format!("chunk {} in {} at offset {}", short(id), store.locate(&file), e.offset);
    // Read once: the record checked whole (its content's blake3, a delta
    // made from its bases), then written as it is.
    pack::check_record(e, &record, keys, decomp, &mut |b| reader.base(b), &where_)?;
    writer.add_record(e, &record)?;
    Ok(record.len() as u64)
}
