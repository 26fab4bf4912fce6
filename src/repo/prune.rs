//! `klon prune`: free the room of chunks no snapshot references.
//!
//! Runs under the repository's exclusive lock (no backup at the same
//! time). Every snapshot and every pack index is read first; if any of
//! them cannot be read, nothing is deleted (a damaged snapshot may need
//! chunks that would look unreferenced). Then: packs none of whose chunks
//! are referenced are deleted (index first, then pack); packs with more
//! than a fifth of their bytes unreferenced are rewritten with only the
//! referenced chunks (each record checked on the way: its header and the
//! crc32 of its stored bytes, which are copied as they are), and an old pack
//! is deleted once the new packs holding its records are synced (while the
//! next ones are copied); files a cut-short job left (a pack
//! without an index, unfinished files in `tmp/`, a table no snapshot names)
//! are deleted. Killed at any point, no chunk a snapshot references is
//! lost: at worst a chunk is in two packs, or an unreferenced file stays.

use std::collections::HashSet;

use serde::Serialize;

use super::index::{Base, Bits};
use super::pack::{self, ChunkId, PackWriter};
use super::store::Object;
use super::{BlobIndex, Repository};
use crate::error::{Error, Result};

/// A pack is rewritten when more than this share of its bytes is unused.
const REPACK_UNUSED_PERCENT: u64 = 20;

/// Packs whose kept records are asked for ahead while one is copied.
const PACKS_AHEAD: usize = 2;

/// Packs removed at once.
const REMOVERS: usize = 4;

/// What a prune did (or, dry, would do).
#[derive(Debug, Default, Serialize)]
pub struct PruneReport {
    /// Whether anything was deleted.
    pub dry_run: bool,
    /// Packs deleted whole.
    pub packs_deleted: usize,
    /// Packs rewritten with only their referenced chunks.
    pub packs_rewritten: usize,
    /// Chunks no snapshot references, dropped.
    pub chunks_dropped: usize,
    /// Chunks kept.
    pub chunks_kept: usize,
    /// Other files deleted (left by jobs that were cut short).
    pub leftovers: usize,
    /// Bytes freed on the drive.
    pub bytes_freed: u64,
    /// Bytes the repository's packs take after it.
    pub bytes_after: u64,
}

/// Applies `policy` to the repository's snapshots (the caller holds the
/// exclusive lock): the snapshot files of those it does not keep are
/// deleted (unless `dry_run`). Their tables and chunks stay until a prune.
/// Returns every decision, newest first, with the snapshots.
pub fn forget(
    repo: &Repository,
    policy: &super::policy::Policy,
    dry_run: bool,
) -> Result<(Vec<super::policy::Decision>, Vec<super::SnapshotEntry>)> {
    let all = repo.snapshots()?;
    let items: Vec<super::policy::Item> = all
        .iter()
        .map(|s| super::policy::Item {
            id: &s.id,
            sequence: s.file.sequence,
            time: s.file.time,
            utc_offset: s.file.utc_offset,
        })
        .collect();
    let decisions = super::policy::apply(policy, &items)?;
    if !dry_run {
        for d in decisions.iter().filter(|d| !d.keep) {
            // Its table may be another snapshot's too (the same disk
            // content twice): prune removes tables no snapshot names.
            repo.store.remove(&format!("snapshots/{}.json", d.id))?;
        }
        repo.store.sync("snapshots")?;
    }
    Ok((decisions, all))
}

/// Prunes the repository (whose exclusive lock the caller holds), as if
/// the snapshots `forgotten` were gone (a dry run of forget --prune).
pub fn prune(repo: &Repository, dry_run: bool, forgotten: &[String]) -> Result<PruneReport> {
    let mut report = PruneReport { dry_run, ..Default::default() };

    // Everything a snapshot references (a bit for each chunk of the
    // index); refuse on any damage.
    let all = repo.load_index().map_err(refuse)?;
    let mut referenced = Bits::new(all.len());
    let mut tables: HashSet<String> = HashSet::new();
    for s in repo.snapshots().map_err(refuse)?.into_iter().filter(|s| !forgotten.contains(&s.id)) {
        tables.insert(s.file.table.name.clone());
        for e in s.file.load_table(repo).map_err(refuse)?.iter().flatten() {
            match all.position(&e.id) {
                Some(p) => referenced.set(p),
                None => return Err(refuse(in_no_pack(&e.id, &format!("snapshot {}", s.short_id())))),
            }
        }
    }
    // A delta needs its chain of bases: a base is referenced as long as
    // one of its deltas is.
    for p in 0..all.len() {
        if !referenced.get(p) {
            continue;
        }
        let mut at = p;
        loop {
            match all.base_at(at) {
                Base::Whole => break,
                Base::At(b) if !referenced.get(b) => {
                    referenced.set(b);
                    at = b;
                }
                // Marked, and its chain with it (or being marked now).
                Base::At(_) => break,
                Base::Absent(b) => return Err(refuse(in_no_pack(b, "a delta's chain of bases"))),
            }
        }
    }

    // What each pack keeps: the referenced chunks reads take from it.
    let mut kept = vec![(0u64, 0u32); all.packs.len()];
    for p in (0..all.len()).filter(|p| referenced.get(*p)) {
        let k = &mut kept[all.pack_at(p) as usize];
        k.0 += all.entry_at(p).record_len();
        k.1 += 1;
    }
    let mut old_to_delete = Vec::new();
    let mut to_rewrite = Vec::new();
    for (pi, (info, (used_bytes, used))) in all.packs.iter().zip(kept).enumerate() {
        report.chunks_dropped += (info.chunks - used) as usize;
        report.chunks_kept += used as usize;
        let unused = info.size - used_bytes;
        if used == 0 {
            report.packs_deleted += 1;
            report.bytes_freed += info.size;
            old_to_delete.push(info.name.clone());
        } else if unused * 100 > info.size * REPACK_UNUSED_PERCENT {
            report.packs_rewritten += 1;
            report.bytes_freed += unused;
            report.bytes_after += used_bytes;
            to_rewrite.push(pi);
            old_to_delete.push(info.name.clone());
        } else {
            report.bytes_after += info.size;
        }
    }
    if !dry_run {
        // Packs nothing references go at once; a rewritten one as soon as
        // the new packs holding its records are durable, while the next
        // ones are copied.
        let remover = Remover::start(repo.store.clone());
        for name in old_to_delete.iter().filter(|n| !to_rewrite.iter().any(|&pi| all.packs[pi].name == **n)) {
            remover.remove(name);
        }
        let mut writer = PackWriter::new(repo.store.clone(), &repo.keys);
        let copied = copy_kept(repo, &all, &referenced, &to_rewrite, &mut writer, &remover).and_then(|rest| {
            writer.commit()?;
            Ok(rest)
        });
        match copied {
            Ok(rest) => {
                // The rewritten packs are durable: the rest of the old ones go.
                report.bytes_after += writer.written.iter().map(|p| p.pack_size).sum::<u64>();
                for name in &rest {
                    remover.remove(name);
                }
                remover.finish()?;
            }
            Err(e) => {
                writer.abandon();
                let removed = match remover.finish() {
                    Ok(0) => "nothing was deleted".to_string(),
                    Ok(n) => format!("{n} old packs were deleted, each unused or copied whole into complete new packs"),
                    Err(_) => "some old packs were deleted, each unused or copied whole into complete new packs".into(),
                };
                return Err(e.with_note(&format!(
                    "{removed}; every other pack stays, and the chunks copied so far are in new packs too: the next \
                     prune removes the spare copies"
                )));
            }
        }
    }

    // What cut-short jobs left: packs without an index, unfinished files,
    // tables no snapshot names.
    let with_index: HashSet<String> = repo.pack_names(".idx")?.into_iter().map(|(n, _)| n).collect();
    let mut leftovers = Vec::new();
    for (name, size) in repo.pack_names(".pack")? {
        if !with_index.contains(&name) {
            leftovers.push((pack::pack_file(&name), size));
        }
    }
    leftovers.extend(repo.store.list(super::store::TMP_DIR)?);
    for (f, size) in repo.store.list("snapshots")? {
        if f.ends_with(".table") && !f.strip_prefix("snapshots/").is_some_and(|t| tables.contains(t)) {
            leftovers.push((f, size));
        }
    }
    for (file, size) in leftovers {
        report.leftovers += 1;
        report.bytes_freed += size;
        if !dry_run {
            repo.store.remove(&file)?;
        }
    }
    if !dry_run {
        let _ = repo.store.sync("snapshots");
    }
    Ok(report)
}

/// Copies the referenced records of the packs `packs` (positions in
/// `all`) into `writer`, pack after pack; the records of the next
/// [`PACKS_AHEAD`] packs are asked for ahead ([`Object::prefetch`]), so
/// that their reads are under way while one pack is copied. An old pack is
/// handed to `remover` once every new pack holding its records is durable
/// with its index; returns the old packs not yet handed over.
fn copy_kept(
    repo: &Repository,
    all: &BlobIndex,
    referenced: &Bits,
    packs: &[usize],
    writer: &mut PackWriter,
    remover: &Remover,
) -> Result<Vec<String>> {
    let open = |pi: usize| -> Result<(usize, Box<dyn Object>, Vec<pack::BlobEntry>)> {
        let name = &all.packs[pi].name;
        let mut used: Vec<pack::BlobEntry> = repo
            .pack_index(name)?
            .entries
            .into_iter()
            .filter(|e| all.reads_from(pi, e) && all.position(&e.id).is_some_and(|p| referenced.get(p)))
            .collect();
        used.sort_by_key(|e| e.offset);
        let f = repo.store.open(&pack::pack_file(name))?;
        f.prefetch(&used.iter().map(|e| (e.offset, e.record_len())).collect::<Vec<_>>());
        Ok((pi, f, used))
    };
    let mut next = packs.iter().copied();
    let mut ahead = std::collections::VecDeque::new();
    for pi in next.by_ref().take(PACKS_AHEAD) {
        ahead.push_back(open(pi)?);
    }
    // Old packs copied, with how many new packs had begun by then.
    let mut copied = std::collections::VecDeque::new();
    while let Some((pi, f, used)) = ahead.pop_front() {
        if let Some(n) = next.next() {
            ahead.push_back(open(n)?);
        }
        copy_blobs(&*repo.store, &all.packs[pi].name, &*f, &used, &repo.keys, writer)?;
        copied.push_back((all.packs[pi].name.clone(), writer.packs_begun()));
        while let Some((name, _)) = copied.front().filter(|(_, begun)| *begun <= writer.written.len()) {
            remover.remove(name);
            copied.pop_front();
        }
    }
    Ok(copied.into_iter().map(|(name, _)| name).collect())
}

/// Removes packs on a few threads of its own (each pack's index first,
/// then the pack: killed in between, a pack without an index is left,
/// which the next prune removes): removing a large file waits on the
/// filesystem's journal, an object store's on a round trip.
struct Remover {
    send: Option<std::sync::mpsc::Sender<String>>,
    threads: Vec<std::thread::JoinHandle<Result<usize>>>,
}

impl Remover {
    fn start(store: std::sync::Arc<dyn super::store::Store>) -> Remover {
        let (send, recv) = std::sync::mpsc::channel::<String>();
        let recv = std::sync::Arc::new(std::sync::Mutex::new(recv));
        let threads = (0..REMOVERS)
            .map(|_| {
                let (store, recv) = (store.clone(), recv.clone());
                std::thread::spawn(move || -> Result<usize> {
                    let mut removed = 0;
                    loop {
                        let next = recv.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok(name) = next else { return Ok(removed) };
                        store.remove(&pack::index_file(&name))?;
                        store.remove(&pack::pack_file(&name))?;
                        removed += 1;
                    }
                })
            })
            .collect();
        Remover { send: Some(send), threads }
    }

    /// Removes pack `name` (soon).
    fn remove(&self, name: &str) {
        if let Some(s) = &self.send {
            // A thread that failed has stopped; finish says why.
            let _ = s.send(name.to_string());
        }
    }

    /// Waits until every pack handed over is removed: how many, or the
    /// first failure.
    fn finish(mut self) -> Result<usize> {
        drop(self.send.take());
        let mut removed = 0;
        let mut failed = None;
        for t in self.threads.drain(..) {
            match t.join().unwrap_or_else(|_| Err(Error::Unsupported("removing packs stopped unexpectedly".into()))) {
                Ok(n) => removed += n,
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        failed.map_or(Ok(removed), Err)
    }
}

/// Copies the records `used` of pack `name` (open as `f`) into `writer`,
/// each checked on the way: a copy, so the record must be the one its
/// backup wrote (and read back), byte for byte — its header and the crc32
/// of its stored bytes.
fn copy_blobs(
    store: &dyn super::store::Store,
    name: &str,
    f: &dyn Object,
    used: &[pack::BlobEntry],
    keys: &super::crypto::Keys,
    writer: &mut PackWriter,
) -> Result<()> {
    let file = pack::pack_file(name);
    let mut buf = Vec::new();
    for e in used {
        crate::engine::cancel::check("prune")?;
        buf.resize(e.record_len() as usize, 0);
        f.read_exact_at(&mut buf, e.offset)?;
        let where_ =
            format!("chunk {} in {} at offset {}", super::snapshot::short(&e.id), store.locate(&file), e.offset);
        pack::check_stored(e, &buf, keys, &where_)
            .map_err(|err| err.with_note("run klon check --read-data to see which snapshots need it"))?;
        writer.add_record(e, &buf)?;
    }
    Ok(())
}

fn in_no_pack(id: &ChunkId, what: &str) -> Error {
    Error::Corrupt(format!("chunk {} that {what} references is in no pack", super::snapshot::short(id)))
}

fn refuse(e: Error) -> Error {
    e.with_note(
        "nothing was deleted: prune deletes only when every snapshot and pack index reads correctly (run klon check)",
    )
}
