//! `klon check`: a repository's structure and references, and with
//! `--read-data` every byte; and the record of each snapshot's last check.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::pack::{self, ChunkId, PackIndex};
use super::snapshot::short;
use super::{MAX_DELTA_DEPTH, Repository, read_dir_names};
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
    std::fs::read(repo.dir.join(CHECKS_NAME)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
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
    let known: std::collections::HashSet<String> = read_dir_names(&repo.snapshots_dir())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|n| n.strip_suffix(".json").map(String::from))
        .collect();
    all.retain(|k, _| known.contains(k));
    if let Ok(json) = serde_json::to_vec_pretty(&all) {
        let tmp = repo.tmp_dir().join(format!("{CHECKS_NAME}.{}.tmp", std::process::id()));
        if std::fs::write(&tmp, json).is_ok() {
            let _ = std::fs::rename(&tmp, repo.dir.join(CHECKS_NAME));
        }
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
pub fn check(dir: &Path, read_data: bool, quiet: bool) -> Result<CheckReport> {
    let repo = Repository::open(dir)?;
    let _lock = super::lock::take(&repo.locks_dir(), "check", false)?;
    let mut report = CheckReport::default();
    let packs_dir = repo.packs_dir();

    // Packs and their indexes.
    let mut indexes: Vec<PackIndex> = Vec::new();
    let idx_names = repo.pack_names(".idx")?;
    let pack_names = repo.pack_names(".pack")?;
    for name in &idx_names {
        match PackIndex::load(&pack::index_path(&packs_dir, name), name) {
            Ok(idx) => {
                let path = pack::pack_path(&packs_dir, name);
                match std::fs::metadata(&path) {
                    Ok(m) if m.len() == idx.pack_size => {}
                    Ok(m) => report.problems.push(format!(
                        "{}: {} bytes, its index says {}: the pack is damaged",
                        path.display(),
                        m.len(),
                        idx.pack_size
                    )),
                    Err(_) => {
                        report.problems.push(format!("{}: the pack is missing (its index is there)", path.display()))
                    }
                }
                indexes.push(idx);
            }
            Err(e) => report.problems.push(e.to_string()),
        }
    }
    for name in pack_names.iter().filter(|n| idx_names.binary_search(n).is_err()) {
        report.notes.push(format!(
            "pack {name} has no index (a backup was cut short while writing it): nothing uses it, klon prune removes it"
        ));
    }
    report.packs = indexes.len();
    // Where reads take each chunk from (see BlobIndex::of).
    let all = super::BlobIndex::of(&indexes);
    report.chunks = all.blobs.len();

    // Snapshots: which of them use each chunk, and where.
    let mut users: HashMap<ChunkId, Vec<String>> = HashMap::new();
    let mut snapshot_ids = Vec::new();
    for f in read_dir_names(&repo.snapshots_dir())? {
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
        snapshot_ids.push(id.to_string());
        report.snapshots += 1;
        for (si, entries) in table.iter().enumerate() {
            let stream = crate::image::reader::describe_stream(&snap.image.streams[si]);
            for e in entries {
                let place = format!("snapshot {} {stream} at disk offset {}", &id[..8], e.extents[0].0);
                match all.blobs.get(&e.id) {
                    None => report
                        .problems
                        .push(format!("chunk {} is missing from every pack; it holds {place}", short(&e.id))),
                    Some((_, b)) if b.raw_len != e.raw_len => report
                        .problems
                        .push(format!("chunk {}: its length differs from what {place} needs", short(&e.id))),
                    Some(_) => {}
                }
                let u = users.entry(e.id).or_default();
                if u.len() < 8 {
                    u.push(place);
                }
            }
        }
    }

    // The snapshots a delta holds are held by every chunk down its chain
    // of bases too.
    let mut inherited: Vec<(ChunkId, Vec<String>)> = Vec::new();
    for (pi, idx) in indexes.iter().enumerate() {
        for e in idx.entries.iter().filter(|e| e.base.is_some() && read_from(&all, pi, e)) {
            if let Some(used_by) = users.get(&e.id) {
                inherited.extend(all.chain(&e.id).into_iter().skip(1).map(|b| (b, used_by.clone())));
            }
        }
    }
    for (base, used_by) in inherited {
        let u = users.entry(base).or_default();
        for place in used_by {
            if u.len() < 8 && !u.contains(&place) {
                u.push(place);
            }
        }
    }
    // Each delta's base: there, and its chain of bases ending in a whole
    // chunk within MAX_DELTA_DEPTH deltas.
    for (pi, idx) in indexes.iter().enumerate() {
        for e in idx.entries.iter().filter(|e| e.base.is_some()) {
            let base = e.base.expect("filtered");
            // A copy reads do not take (the chunk is in another pack too)
            // holds no snapshot.
            let used_by = if read_from(&all, pi, e) { users.get(&e.id).cloned().unwrap_or_default() } else { vec![] };
            let holds = || if used_by.is_empty() { "no snapshot".to_string() } else { used_by.join("; ") };
            match all.blobs.get(&base) {
                None if used_by.is_empty() => report.notes.push(format!(
                    "chunk {} is stored as changes to chunk {}, which a prune removed; no snapshot uses it, \
                     klon prune removes it",
                    short(&e.id),
                    short(&base)
                )),
                None => report.problems.push(format!(
                    "chunk {} is stored as changes to chunk {}, which is missing from every pack; it holds {}",
                    short(&e.id),
                    short(&base),
                    holds()
                )),
                Some(_)
                    if all.depth(&e.id).is_none()
                        && all.chain(&e.id).last().is_some_and(|c| all.blobs.contains_key(c)) =>
                {
                    report.problems.push(format!(
                        "chunk {} is stored as changes to chunk {}, whose chain of bases is longer than \
                         {MAX_DELTA_DEPTH} deltas or loops: the pack indexes are damaged; it holds {}",
                        short(&e.id),
                        short(&base),
                        holds()
                    ))
                }
                Some(_) => {}
            }
        }
    }

    if read_data {
        let mut bases = super::read::ContentReader::new(packs_dir.clone(), &all)?;
        let total: u64 = indexes.iter().map(|i| i.pack_size).sum();
        let mut progress = crate::ui::progress::Progress::new("check", total, quiet);
        for (pi, idx) in indexes.iter().enumerate() {
            let read = pack::check_blobs(&packs_dir, idx, &mut |b| bases.base(b), |e, record, checked| {
                report.bytes_read += record.len() as u64;
                progress.add(record.len() as u64);
                // An unused delta whose base a prune removed was noted above.
                let orphan = e.base.is_some_and(|b| !all.blobs.contains_key(&b))
                    && !(read_from(&all, pi, e) && users.contains_key(&e.id));
                let checked = if orphan { Ok(()) } else { checked };
                if let Err(why) = checked {
                    let affected =
                        users.get(&e.id).map(|u| u.join("; ")).unwrap_or_else(|| "no snapshot uses it".into());
                    report.problems.push(format!("{why}; it holds {affected}"));
                }
                Ok(())
            });
            match read {
                Ok(()) => {}
                Err(e @ Error::Cancelled(_)) => return Err(e),
                Err(e) => report.problems.push(e.to_string()),
            }
        }
        progress.finish();
    }

    let result = if report.problems.is_empty() { Ok(()) } else { Err(report.problems.join("; ")) };
    if read_data {
        record_many(&repo, &snapshot_ids, &result);
    }
    Ok(report)
}

/// Whether reads take chunk `e` from pack number `pi` (and not another
/// copy of it).
fn read_from(all: &super::BlobIndex, pi: usize, e: &pack::BlobEntry) -> bool {
    all.blobs.get(&e.id).is_some_and(|(p, c)| *p as usize == pi && c.offset == e.offset)
}
