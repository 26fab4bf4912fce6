//! `klon check`: a repository's structure and references, and with
//! `--read-data` every byte; and the record of each snapshot's last check.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::index::{Base, Bits};
use super::pack::{self, ChunkId};
use super::snapshot::short;
use super::{BlobIndex, MAX_DELTA_DEPTH, Repository};
use crate::engine::feedback::Feedback;
use crate::error::{Error, Result};

/// File of a repository that records each snapshot's last verification.
/// Informational, not covered by any checksum.
pub const CHECKS_NAME: &str = "checks.json";

/// The outcome of a snapshot's last verification.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastCheck {
    /// When (RFC 3339 UTC).
    pub time: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was wrong.
    pub problem: Option<String>,
}

fn load_checks(repo: &Repository) -> BTreeMap<String, LastCheck> {
    repo.store
        .read(CHECKS_NAME, 64 << 20)
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Records the outcome of verifying snapshot `id` (best effort: the
/// record is informational).
pub fn record(repo: &Repository, id: &str, result: &std::result::Result<(), String>) {
    record_many(repo, &[id.to_string()], result);
}

fn record_many(repo: &Repository, ids: &[String], result: &std::result::Result<(), String>) {
    let mut all = load_checks(repo);
    for id in ids {
        all.insert(
            id.clone(),
            LastCheck {
                time: crate::image::manifest::now_rfc3339(),
                ok: result.is_ok(),
                problem: result.as_ref().err().map(|p| p.chars().take(1000).collect()),
            },
        );
    }
    let known: std::collections::HashSet<String> = repo
        .snapshot_files()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|n| n.strip_suffix(".json").map(String::from))
        .collect();
    all.retain(|k, _| known.contains(k));
    if let Ok(json) = serde_json::to_vec_pretty(&all) {
        let _ = repo.store.write(CHECKS_NAME, &json);
    }
}

/// The last recorded verification of snapshot `id`.
pub fn last(repo: &Repository, id: &str) -> Option<LastCheck> {
    load_checks(repo).remove(id)
}

/// What `klon check` found.
#[derive(Debug, Default, Serialize)]
pub struct CheckReport {
    /// Snapshots checked.
    pub snapshots: usize,
    /// Packs checked.
    pub packs: usize,
    /// Chunks the packs hold.
    pub chunks: usize,
    /// Bytes of pack files read (with --read-data).
    pub bytes_read: u64,
    /// Every problem found, each naming what it affects.
    pub problems: Vec<String>,
    /// Notes that are not problems (unreferenced packs a prune frees).
    pub notes: Vec<String>,
}

/// Checks the repository at `dir`: the configuration; every pack's index
/// (its checksum, that its records tile the pack) and that the pack is
/// there with that size; every snapshot (its checksum, its table, that
/// every chunk it names is in a pack). With `read_data`, every blob of
/// every pack is read and checked (header, crc32, zstd, blake3): since the
/// blobs tile each pack, every byte of it. Each problem names the chunk, the pack
/// and offset, and the snapshots, partitions and disk offsets it affects.
pub fn check(dir: &Path, read_data: bool, feedback: &Feedback) -> Result<CheckReport> {
    let repo = Repository::open(dir)?;
    let _lock = repo.lock("check", false, feedback)?;
    let mut report = CheckReport::default();

    // Packs and their indexes, into one table of every chunk (see
    // BlobIndex), one pack index held at a time.
    let idx_files = repo.pack_names(".idx")?;
    let pack_files = repo.pack_names(".pack")?;
    let mut builder = repo.index_builder(&idx_files);
    let idx_names: Vec<&String> = idx_files.iter().map(|(n, _)| n).collect();
    for name in idx_names.iter().copied() {
        let loaded = repo.pack_index(name).and_then(|idx| {
            builder.add(&idx)?;
            Ok(idx.pack_size)
        });
        match loaded {
            Ok(size) => {
                let file = pack::pack_file(name);
                let path = repo.store.locate(&file);
                match pack_files.binary_search_by(|(n, _)| n.cmp(name)).map(|at| pack_files[at].1) {
                    Ok(len) if len == size => {}
                    Ok(len) => {
                        report.problems.push(format!("{path}: {len} bytes, its index says {size}: the pack is damaged"))
                    }
                    Err(_) => report.problems.push(format!("{path}: the pack is missing (its index is there)")),
                }
            }
            Err(e) => report.problems.push(e.to_string()),
        }
    }
    for (name, _) in pack_files.iter().filter(|(n, _)| idx_names.binary_search(&n).is_err()) {
        report.notes.push(format!(
            "pack {name} has no index (a backup was cut short while writing it): nothing uses it, klon prune removes it"
        ));
    }
    let all = builder.finish();
    report.packs = all.packs.len();
    report.chunks = all.len();

    // Snapshots: which chunks they use (a bit a chunk; who uses a chunk
    // is looked up again only for a problem that names them).
    let mut used = Bits::new(all.len());
    let mut snapshots = Vec::new();
    for f in repo.snapshot_files()? {
        let Some(id) = f.strip_suffix(".json") else { continue };
        let snap = match super::snapshot::SnapshotFile::load(&repo, id) {
            Ok(s) => s,
            Err(e) => {
                report.problems.push(format!("snapshot {}: {e}", &id[..id.len().min(8)]));
                continue;
            }
        };
        let table = match snap.load_table(&repo) {
            Ok(t) => t,
            Err(e) => {
                report.problems.push(format!("snapshot {}: {e}", &id[..8]));
                continue;
            }
        };
        report.snapshots += 1;
        for (si, entries) in table.iter().enumerate() {
            for e in entries {
                let place = || place(id, &snap, si, e);
                match all.position(&e.id) {
                    None => report.problems.push(format!(
                        "chunk {} is missing from every pack; it holds {}",
                        short(&e.id),
                        place()
                    )),
                    Some(p) if all.entry_at(p).raw_len != e.raw_len => report.problems.push(format!(
                        "chunk {}: its length differs from what {} needs",
                        short(&e.id),
                        place()
                    )),
                    Some(p) => used.set(p),
                }
            }
        }
        snapshots.push((id.to_string(), snap));
    }
    // The snapshots a delta holds are held by every chunk down its chain
    // of bases too.
    for p in 0..all.len() {
        if used.get(p) && all.base_at(p) != Base::Whole {
            for b in all.bases_at(p) {
                used.set(b);
            }
        }
    }

    // Problems that name the snapshots holding a chunk: (problem, chunk).
    let mut holders: Vec<(usize, ChunkId)> = Vec::new();
    // Each delta's base: there, and its chain of bases ending in a whole
    // chunk within MAX_DELTA_DEPTH deltas. A copy reads do not take (the
    // chunk is in another pack too) holds no snapshot.
    let read = (0..all.len()).filter(|p| all.base_at(*p) != Base::Whole).map(|p| (all.entry_at(p), used.get(p)));
    let spare = all.spares().filter(|(_, e)| e.base.is_some()).map(|(_, e)| (e, false));
    for (e, holds) in read.chain(spare) {
        let base = e.base.expect("filtered");
        if !all.contains(&base) {
            if holds {
                holders.push((report.problems.len(), e.id));
                report.problems.push(format!(
                    "chunk {} is stored as changes to chunk {}, which is missing from every pack",
                    short(&e.id),
                    short(&base),
                ));
            } else {
                report.notes.push(format!(
                    "chunk {} is stored as changes to chunk {}, which a prune removed; no snapshot uses it, klon \
                     prune removes it",
                    short(&e.id),
                    short(&base)
                ));
            }
        } else if all.depth(&e.id).is_none() && all.chain(&e.id).last().is_some_and(|c| all.contains(c)) {
            let problem = format!(
                "chunk {} is stored as changes to chunk {}, whose chain of bases is longer than {MAX_DELTA_DEPTH} \
                 deltas or loops: the pack indexes are damaged",
                short(&e.id),
                short(&base),
            );
            if holds {
                holders.push((report.problems.len(), e.id));
                report.problems.push(problem);
            } else {
                report.problems.push(format!("{problem}; it holds no snapshot"));
            }
        }
    }

    if read_data {
        let mut bases = super::read::ContentReader::new(repo.store.clone(), &all, &repo.keys)?;
        let total: u64 = all.packs.iter().map(|p| p.size).sum();
        let mut progress = feedback.meter("check", total, Vec::new());
        for (pi, info) in all.packs.iter().enumerate() {
            let read = repo.pack_index(&info.name).and_then(|idx| {
                pack::check_blobs(&*repo.store, &idx, &repo.keys, &mut |b| bases.base(b), |e, record, checked| {
                    report.bytes_read += record.len() as u64;
                    progress.add(record.len() as u64);
                    // An unused delta whose chain of bases a prune broke (its
                    // base removed, or one further down: noted above) cannot
                    // be made, and need not be.
                    let broken = e.base.is_some_and(|b| !all.contains(&b))
                        || all.chain(&e.id).last().is_some_and(|c| !all.contains(c));
                    let orphan = broken && !(all.reads_from(pi, e) && all.position(&e.id).is_some_and(|p| used.get(p)));
                    if let (false, Err(why)) = (orphan, checked) {
                        holders.push((report.problems.len(), e.id));
                        report.problems.push(why.to_string());
                    }
                    Ok(())
                })
            });
            match read {
                Ok(()) => {}
                Err(e @ Error::Cancelled(_)) => return Err(e),
                Err(e) => report.problems.push(e.to_string()),
            }
        }
        progress.finish();
    }

    name_holders(&repo, &all, &snapshots, &holders, &mut report.problems);
    let result = if report.problems.is_empty() { Ok(()) } else { Err(report.problems.join("; ")) };
    if read_data {
        let ids: Vec<String> = snapshots.into_iter().map(|(id, _)| id).collect();
        record_many(&repo, &ids, &result);
    }
    Ok(report)
}

/// Where the chunk `e` of stream `si` of snapshot `id` goes, as problems
/// name it.
fn place(id: &str, snap: &super::snapshot::SnapshotFile, si: usize, e: &super::snapshot::TableEntry) -> String {
    let stream = crate::image::reader::describe_stream(&snap.image.streams[si]);
    format!("snapshot {} {stream} at disk offset {}", &id[..8], e.extents[0].0)
}

/// Ends each problem of `holders` with the snapshots that hold its chunk
/// (at most 8 places: snapshot, partition and disk offset), through a
/// delta's chain of bases too: the tables are read again, only when some
/// problem needs them.
fn name_holders(
    repo: &Repository,
    all: &BlobIndex,
    snapshots: &[(String, super::snapshot::SnapshotFile)],
    holders: &[(usize, ChunkId)],
    problems: &mut [String],
) {
    const MOST: usize = 8;
    if holders.is_empty() {
        return;
    }
    // The chunks named, and every chunk whose chain of bases reaches one.
    let mut named: BTreeMap<usize, Vec<String>> =
        holders.iter().filter_map(|(_, id)| all.position(id)).map(|p| (p, Vec::new())).collect();
    let mut reaches = Bits::new(all.len());
    for p in 0..all.len() {
        if named.contains_key(&p) || all.bases_at(p).any(|b| named.contains_key(&b)) {
            reaches.set(p);
        }
    }
    for (id, snap) in snapshots {
        let Ok(table) = snap.load_table(repo) else { continue };
        for (si, entries) in table.iter().enumerate() {
            for e in entries {
                let Some(p) = all.position(&e.id).filter(|p| reaches.get(*p)) else { continue };
                for link in std::iter::once(p).chain(all.bases_at(p)) {
                    if let Some(places) = named.get_mut(&link).filter(|v| v.len() < MOST) {
                        let here = place(id, snap, si, e);
                        if !places.contains(&here) {
                            places.push(here);
                        }
                    }
                }
            }
        }
    }
    for (i, id) in holders {
        let places = all.position(id).and_then(|p| named.get(&p)).filter(|v| !v.is_empty());
        let holds = places.map(|v| v.join("; ")).unwrap_or_else(|| "no snapshot".to_string());
        problems[*i] = format!("{}; it holds {holds}", problems[*i]);
    }
}
