//! A snapshot's two files: `snapshots/ID.json`, whose name is the blake3
//! of its bytes, and its table `snapshots/TABLE.table` (the blake3 of the
//! table's bytes, recorded in the JSON): which chunk holds which disk
//! ranges of each stream.

use serde::{Deserialize, Serialize};

use super::Repository;
use super::crypto::Sealed;
use super::pack::ChunkId;
use crate::error::{Error, Result};
use crate::image::Manifest;
use crate::image::format::{Extent, MAX_EXTENTS, hex};
use crate::image::manifest::FileInfo;

/// Value of a snapshot file's `format` field.
pub const FORMAT_NAME: &str = "klon-snapshot";
/// The snapshot format version klon writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Magic at the start of a snapshot's table.
pub const TABLE_MAGIC: &[u8; 8] = b"KLONSNT1";
/// Largest snapshot file klon reads.
const SNAPSHOT_MAX: u64 = 64 << 20;

/// What one backup added to the repository.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Added {
    /// Chunks that were new.
    pub chunks: u64,
    /// Their content bytes.
    pub content_bytes: u64,
    /// Bytes of pack files written (blob records).
    pub stored_bytes: u64,
    /// How many of the new chunks are stored as changes to an earlier
    /// snapshot's chunk of the same window (delta blobs).
    #[serde(default)]
    pub deltas: u64,
}

/// A snapshot file (`snapshots/ID.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotFile {
    /// "klon-snapshot".
    pub format: String,
    /// 1.
    pub format_version: u32,
    /// The id of the repository it belongs to.
    pub repository: String,
    /// When the backup started, seconds since 1970-01-01 UTC.
    pub time: i64,
    /// Its place in the order snapshots were made: one more than the
    /// greatest of the repository's snapshots when it was committed (under
    /// the lock), so the one made last is the newest even when two start in
    /// the same second or the clock went back. 0 when absent.
    #[serde(default)]
    pub sequence: u64,
    /// The same instant, RFC 3339 UTC.
    pub created: String,
    /// The UTC offset of the machine that made it, in seconds.
    pub utc_offset: i32,
    /// Its host name.
    pub hostname: String,
    /// A label the person gave, if any.
    #[serde(default)]
    pub label: Option<String>,
    /// Tags the person gave.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The table: its file name, size and blake3.
    pub table: FileInfo,
    /// What this backup added to the repository.
    pub added: Added,
    /// For a copy (`klon copy`): the id of the snapshot it copies, as
    /// first made (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<String>,
    /// The image: source, layout and streams as in a klon image's manifest,
    /// with no files (`index` empty, `data_files` none; `compressed_bytes`
    /// is the stored bytes of the chunks it references).
    pub image: Manifest,
}

/// One chunk of a stream, as a snapshot's table lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableEntry {
    /// The chunk.
    pub id: ChunkId,
    /// Its content length.
    pub raw_len: u32,
    /// Where its content goes on the disk, in order.
    pub extents: Extents,
}

/// A chunk's disk ranges, in order: one (most chunks) held inline, more
/// on the heap (a table of a 2 TiB disk holds half a million).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extents {
    /// One range.
    One(Extent),
    /// Several (or none).
    Many(Box<[Extent]>),
}

impl std::ops::Deref for Extents {
    type Target = [Extent];

    fn deref(&self) -> &[Extent] {
        match self {
            Extents::One(e) => std::slice::from_ref(e),
            Extents::Many(v) => v,
        }
    }
}

impl From<Vec<Extent>> for Extents {
    fn from(v: Vec<Extent>) -> Extents {
        match v[..] {
            [one] => Extents::One(one),
            _ => Extents::Many(v.into_boxed_slice()),
        }
    }
}

/// A snapshot's table: per stream, its chunks in disk order.
pub type Table = Vec<Vec<TableEntry>>;

impl SnapshotFile {
    /// Reads snapshot `id` of `repo` and checks it: its blake3 is its name,
    /// its format, that it belongs to this repository, and its image
    /// (layout and streams, as for an image's manifest).
    pub fn load(repo: &Repository, id: &str) -> Result<SnapshotFile> {
        let name = format!("snapshots/{id}.json");
        let path = std::path::PathBuf::from(repo.store.locate(&name));
        let bytes = read_limited(repo, &name, SNAPSHOT_MAX)?;
        if blake3::hash(&bytes).to_hex().as_str() != id {
            return Err(Error::Corrupt(format!(
                "{}: the snapshot's checksum (blake3, its name) does not match its bytes: it is damaged",
                path.display()
            )));
        }
        let json = repo.keys.open_file(Sealed::Snapshot, &bytes, &path.display().to_string())?;
        let s: SnapshotFile = serde_json::from_slice(&json)
            .map_err(|e| Error::Corrupt(format!("{}: not a readable snapshot: {e}", path.display())))?;
        if s.format != FORMAT_NAME {
            return Err(Error::Corrupt(format!("{}: not a klon snapshot", path.display())));
        }
        if s.format_version != FORMAT_VERSION {
            return Err(Error::Unsupported(format!(
                "{}: snapshot format version {}; this klon reads version {FORMAT_VERSION}: use a newer klon",
                path.display(),
                s.format_version
            )));
        }
        if s.repository != repo.config.id {
            return Err(Error::Corrupt(format!(
                "{}: the snapshot belongs to another repository ({}), not this one ({})",
                path.display(),
                s.repository,
                repo.config.id
            )));
        }
        if !s.table.name.ends_with(".table")
            || s.table.blake3.as_deref().is_none_or(|b| format!("{b}.table") != s.table.name)
        {
            return Err(Error::Corrupt(format!("{}: the table's name is not its blake3", path.display())));
        }
        if s.image.chunk_size > repo.config.window {
            return Err(Error::Corrupt(format!("{}: chunks larger than the repository's window", path.display())));
        }
        s.image.validate_without_files(&path)?;
        Ok(s)
    }

    /// Reads and checks the snapshot's table: its blake3 and size, and
    /// that it agrees with the streams (chunk counts, each chunk's extents
    /// inside its stream and in order, the bytes they hold).
    pub fn load_table(&self, repo: &Repository) -> Result<Table> {
        let name = format!("snapshots/{}", self.table.name);
        let path = repo.store.locate(&name);
        let bytes = read_limited(repo, &name, self.table.size.max(1))?;
        if bytes.len() as u64 != self.table.size
            || Some(blake3::hash(&bytes).to_hex().as_str()) != self.table.blake3.as_deref()
        {
            return Err(Error::Corrupt(format!(
                "{path}: the table's checksum (blake3) or size does not match the snapshot"
            )));
        }
        let where_ = path;
        decode_table(&repo.keys.open_file(Sealed::Table, &bytes, &where_)?, &self.image, &where_)
    }
}

/// File `name` of `repo`, refused when larger than `max`; a missing one
/// is damage.
fn read_limited(repo: &Repository, name: &str, max: u64) -> Result<Vec<u8>> {
    match repo.store.read(name, max)? {
        Some(b) => Ok(b),
        None => Err(Error::Corrupt(format!("{}: the file is missing", repo.store.locate(name)))),
    }
}

/// A table's bytes.
pub fn encode_table(table: &Table) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(TABLE_MAGIC);
    b.extend_from_slice(&(table.len() as u32).to_le_bytes());
    b.extend_from_slice(&[0u8; 4]);
    for stream in table {
        b.extend_from_slice(&(stream.len() as u64).to_le_bytes());
        for e in stream {
            b.extend_from_slice(&e.id);
            b.extend_from_slice(&e.raw_len.to_le_bytes());
            b.extend_from_slice(&(e.extents.len() as u32).to_le_bytes());
            for &(a, l) in e.extents.iter() {
                b.extend_from_slice(&a.to_le_bytes());
                b.extend_from_slice(&l.to_le_bytes());
            }
        }
    }
    b
}

/// Decodes a table and checks it against the snapshot's image `m`.
pub fn decode_table(b: &[u8], m: &Manifest, where_: &str) -> Result<Table> {
    let bad = |why: String| Err(Error::Corrupt(format!("{where_}: {why}")));
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = b.get(at..at.checked_add(n)?)?;
        at += n;
        Some(s)
    };
    let u32_of = |s: &[u8]| u32::from_le_bytes(s.try_into().expect("4 bytes"));
    let u64_of = |s: &[u8]| u64::from_le_bytes(s.try_into().expect("8 bytes"));
    if take(8) != Some(&TABLE_MAGIC[..]) {
        return bad("not a klon snapshot table".into());
    }
    let count = take(4).map(u32_of);
    if count != Some(m.streams.len() as u32) || take(4) != Some(&[0u8; 4][..]) {
        return bad("the table does not list the snapshot's streams".into());
    }
    let mut table = Vec::with_capacity(m.streams.len());
    for s in &m.streams {
        let Some(n) = take(8).map(u64_of) else { return bad("the table ends early".into()) };
        if n != s.chunks || n > b.len() as u64 {
            return bad(format!("stream {} lists {n} chunks, the snapshot says {}", s.name, s.chunks));
        }
        let mut entries = Vec::with_capacity(n as usize);
        let mut reach = s.start;
        let mut sum = 0u64;
        for i in 0..n {
            let (Some(id), Some(raw), Some(k)) = (take(32), take(4).map(u32_of), take(4).map(u32_of)) else {
                return bad("the table ends early".into());
            };
            if k == 0 || k > MAX_EXTENTS || raw == 0 || raw > m.chunk_size {
                return bad(format!("stream {} chunk {i}: {k} extents, {raw} bytes: out of range", s.name));
            }
            let mut extents = Vec::with_capacity(k as usize);
            let mut len = 0u64;
            for _ in 0..k {
                let Some(e) = take(16) else { return bad("the table ends early".into()) };
                let (a, l) = (u64_of(&e[..8]), u64_of(&e[8..]));
                let end = a.checked_add(l);
                if l == 0 || a < reach || end.is_none_or(|e| e > s.start + s.length) {
                    return bad(format!(
                        "stream {} chunk {i}: its disk ranges overlap, are out of order or outside the stream",
                        s.name
                    ));
                }
                reach = a + l;
                len += l;
                extents.push((a, l));
            }
            if len != u64::from(raw) {
                return bad(format!("stream {} chunk {i}: its disk ranges do not hold its length", s.name));
            }
            sum += len;
            entries.push(TableEntry { id: id.try_into().expect("32 bytes"), raw_len: raw, extents: extents.into() });
        }
        if sum != s.stored_bytes {
            return bad(format!(
                "stream {}: its chunks hold {sum} bytes, the snapshot says {}",
                s.name, s.stored_bytes
            ));
        }
        table.push(entries);
    }
    if at != b.len() {
        return bad("bytes after the last stream".into());
    }
    Ok(table)
}

/// Writes a snapshot of `repo`: its table, then its file, each synced
/// before it is renamed into place, so the snapshot exists only when all
/// of it does. Returns the snapshot's id.
pub fn write(repo: &Repository, mut file: SnapshotFile, table: &Table) -> Result<String> {
    let bytes = repo.keys.seal_file(Sealed::Table, &encode_table(table));
    let hash = blake3::hash(&bytes).to_hex().to_string();
    file.table = FileInfo { name: format!("{hash}.table"), size: bytes.len() as u64, blake3: Some(hash) };
    repo.store.write(&format!("snapshots/{}", file.table.name), &bytes)?;
    let mut json = serde_json::to_vec_pretty(&file).map_err(|e| Error::Corrupt(format!("encoding snapshot: {e}")))?;
    json.push(b'\n');
    let json = repo.keys.seal_file(Sealed::Snapshot, &json);
    let id = blake3::hash(&json).to_hex().to_string();
    // Written last: the snapshot exists once this file does.
    repo.store.write(&format!("snapshots/{id}.json"), &json)?;
    Ok(id)
}

/// The current time (seconds since 1970 UTC) and this machine's UTC offset.
pub fn now_and_offset() -> (i64, i32) {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let t: libc::time_t = now as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`, which we own; `t` lives
    // through the call.
    #[allow(unsafe_code)]
    let offset = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() { 0 } else { tm.tm_gmtoff as i32 }
    };
    (now, offset)
}

/// Short text of a chunk id, for messages.
pub fn short(id: &ChunkId) -> String {
    hex(&id[..6])
}
