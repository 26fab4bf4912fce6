//! Pack files and their indexes: where a repository keeps its chunks.
//!
//! A pack is a file of blob records, one per chunk: a 64-byte header and
//! the stored payload (a delta blob's payload starts with its base's id;
//! see `delta`). Its name is random. Its index (same name, `.idx`) lists
//! each blob's id (the blake3 of its content), where it is, its checksums
//! and the base of each delta blob, and ends in the blake3 of everything
//! before. docs/REPOSITORY.md describes the bytes; keep the two in step.

use std::borrow::Cow;
use std::fs::File;
use std::sync::Arc;

use super::crypto::{Keys, Sealed};
use super::store::{ObjectWriter, Store};
use crate::error::{Error, Result};
use crate::image::format::hex;

/// Magic at the start of every blob record.
pub const BLOB_MAGIC: &[u8; 8] = b"KLONBLB1";
/// Magic at the start of every pack index.
pub const PACK_INDEX_MAGIC: &[u8; 8] = b"KLONPIX1";
/// A blob record's header.
pub const BLOB_HEADER_LEN: usize = 64;
/// A pack index's header.
pub const PACK_INDEX_HEADER_LEN: usize = 64;
/// One pack index entry.
pub const PACK_ENTRY_LEN: usize = 56;
/// A pack is closed once it holds this many bytes.
pub const PACK_TARGET: u64 = 64 << 20;
/// Blobs one pack index may list at most (bounds what a reader allocates).
pub const MAX_PACK_ENTRIES: u64 = 1 << 20;

/// A chunk's id: the blake3 of its content.
pub type ChunkId = [u8; 32];

/// Blob flag: the payload is its base chunk's id, then a patch (zstd, as
/// FLAG_ZSTD says) that makes the content from the base's (`delta`).
pub const FLAG_DELTA: u32 = 2;

/// Blob flag: the stored payload is sealed (an encrypted repository's
/// blobs all are): a nonce, then the payload encrypted, then its tag.
pub const FLAG_SEALED: u32 = 4;

/// Where a blob is and what it holds, as its pack's index says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobEntry {
    /// The chunk's id.
    pub id: ChunkId,
    /// Offset of the record in its pack.
    pub offset: u64,
    /// Stored payload length.
    pub stored_len: u32,
    /// Content length.
    pub raw_len: u32,
    /// crc32 of the stored payload.
    pub payload_crc: u32,
    /// FLAG_* bits (bit 0: the payload is a zstd frame; bit 1: a delta).
    pub flags: u32,
    /// A delta blob's base: the chunk its patch applies to (whole, or a
    /// delta itself from format 3 on).
    pub base: Option<ChunkId>,
}

impl BlobEntry {
    /// What sealing adds to the payload: none unless FLAG_SEALED.
    pub fn sealing(&self) -> usize {
        if self.flags & FLAG_SEALED != 0 { super::crypto::SEAL_OVERHEAD } else { 0 }
    }

    /// Length of the whole record.
    pub fn record_len(&self) -> u64 {
        BLOB_HEADER_LEN as u64 + u64::from(self.stored_len)
    }

    /// The record's header.
    pub fn header(&self) -> [u8; BLOB_HEADER_LEN] {
        let mut h = [0u8; BLOB_HEADER_LEN];
        h[0..8].copy_from_slice(BLOB_MAGIC);
        h[8..12].copy_from_slice(&self.flags.to_le_bytes());
        h[12..16].copy_from_slice(&self.raw_len.to_le_bytes());
        h[16..20].copy_from_slice(&self.stored_len.to_le_bytes());
        h[20..24].copy_from_slice(&self.payload_crc.to_le_bytes());
        h[24..56].copy_from_slice(&self.id);
        let crc = crc32fast::hash(&h[..56]);
        h[56..60].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Checks that a record's header read from a pack is the one this entry
    /// describes; `where_` names it in the error.
    pub fn check_header(&self, h: &[u8], where_: &str) -> Result<()> {
        if h.len() < BLOB_HEADER_LEN || h[..BLOB_HEADER_LEN] != self.header() {
            let why = if h.len() < BLOB_HEADER_LEN || &h[0..8] != BLOB_MAGIC {
                "no blob record starts there"
            } else if crc32fast::hash(&h[..56]).to_le_bytes() != h[56..60] {
                "the blob header's checksum (crc32) does not match"
            } else {
                "the blob header does not match the pack's index"
            };
            return Err(Error::Corrupt(format!("{where_}: {why}")));
        }
        Ok(())
    }

    fn encode(&self) -> [u8; PACK_ENTRY_LEN] {
        let mut b = [0u8; PACK_ENTRY_LEN];
        b[0..32].copy_from_slice(&self.id);
        b[32..40].copy_from_slice(&self.offset.to_le_bytes());
        b[40..44].copy_from_slice(&self.stored_len.to_le_bytes());
        b[44..48].copy_from_slice(&self.raw_len.to_le_bytes());
        b[48..52].copy_from_slice(&self.payload_crc.to_le_bytes());
        b[52..56].copy_from_slice(&self.flags.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> BlobEntry {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        BlobEntry {
            id: b[0..32].try_into().expect("32 bytes"),
            offset: u64::from_le_bytes(b[32..40].try_into().expect("8 bytes")),
            stored_len: u32_at(40),
            raw_len: u32_at(44),
            payload_crc: u32_at(48),
            flags: u32_at(52),
            base: None,
        }
    }
}

/// The file of pack `name` in its repository: under `packs/` and the
/// first two hex digits of its name, so no directory holds too many files
/// for FAT32.
pub fn pack_file(name: &str) -> String {
    format!("packs/{}/{name}.pack", &name[..2])
}

/// The file of the index of pack `name`.
pub fn index_file(name: &str) -> String {
    format!("packs/{}/{name}.idx", &name[..2])
}

/// Pack indexes are at most this large (entries, bases and the header).
pub const INDEX_MAX: u64 = PACK_INDEX_HEADER_LEN as u64 + (PACK_ENTRY_LEN as u64 + 32) * MAX_PACK_ENTRIES + 4096;

/// A pack index, read and checked.
#[derive(Debug, Clone)]
pub struct PackIndex {
    /// The pack's name: 64 hex digits, random.
    pub name: String,
    /// The pack file's size.
    pub pack_size: u64,
    /// Its blobs, in the order of the pack.
    pub entries: Vec<BlobEntry>,
}

impl PackIndex {
    /// The index's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let bases: Vec<&ChunkId> = self.entries.iter().filter_map(|e| e.base.as_ref()).collect();
        let mut b =
            Vec::with_capacity(PACK_INDEX_HEADER_LEN + PACK_ENTRY_LEN * self.entries.len() + 32 * bases.len() + 32);
        b.extend_from_slice(PACK_INDEX_MAGIC);
        b.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        b.extend_from_slice(&self.pack_size.to_le_bytes());
        b.extend_from_slice(&(bases.len() as u64).to_le_bytes());
        let name = decode_hex32(&self.name).expect("a pack's name is 64 hex digits");
        b.extend_from_slice(&name);
        for e in &self.entries {
            b.extend_from_slice(&e.encode());
        }
        for base in bases {
            b.extend_from_slice(base);
        }
        let sum = *blake3::hash(&b).as_bytes();
        b.extend_from_slice(&sum);
        b
    }

    /// Reads and checks the index of the pack named `name` in `store`:
    /// its own blake3, that it names that pack, and that its records
    /// follow each other with no gap and fill the pack's recorded size.
    /// In an encrypted repository, the file is sealed and opened with `keys`.
    pub fn load(store: &dyn Store, name: &str, keys: &Keys) -> Result<PackIndex> {
        let file = index_file(name);
        let Some(bytes) = store.read(&file, INDEX_MAX)? else {
            return Err(Error::Corrupt(format!("{}: the pack's index is missing", store.locate(&file))));
        };
        PackIndex::decode(&bytes, name, keys, &store.locate(&file))
    }

    /// The index file's bytes: [`PackIndex::encode`], sealed when `keys` are.
    pub fn file_bytes(&self, keys: &Keys) -> Vec<u8> {
        let name = decode_hex32(&self.name).expect("a pack's name is 64 hex digits");
        keys.seal_file(Sealed::Index(&name), &self.encode())
    }

    /// Decodes and checks an index file's bytes (see [`PackIndex::load`]).
    pub fn decode(bytes: &[u8], name: &str, keys: &Keys, where_: &str) -> Result<PackIndex> {
        let Some(name_bytes) = decode_hex32(name) else {
            return Err(Error::Corrupt(format!("{where_}: {name} is not a pack's name")));
        };
        let bytes = keys.open_file(Sealed::Index(&name_bytes), bytes, where_)?;
        let bytes = &bytes[..];
        let bad = |why: &str| Err(Error::Corrupt(format!("{where_}: {why}")));
        if bytes.len() < PACK_INDEX_HEADER_LEN + 32 || &bytes[0..8] != PACK_INDEX_MAGIC {
            return bad("not a klon pack index");
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return bad("the pack index's checksum (blake3) does not match");
        }
        let count = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
        let pack_size = u64::from_le_bytes(body[16..24].try_into().expect("8 bytes"));
        let deltas = u64::from_le_bytes(body[24..32].try_into().expect("8 bytes"));
        if decode_hex32(name).as_ref().map(|n| &n[..]) != Some(&body[32..64]) {
            return bad("the index belongs to another pack");
        }
        if count > MAX_PACK_ENTRIES
            || deltas > count
            || (body.len() - PACK_INDEX_HEADER_LEN) as u64 != count * PACK_ENTRY_LEN as u64 + deltas * 32
        {
            return bad("the index's length does not match its entry count");
        }
        let entries_end = PACK_INDEX_HEADER_LEN + count as usize * PACK_ENTRY_LEN;
        let mut entries: Vec<BlobEntry> =
            body[PACK_INDEX_HEADER_LEN..entries_end].chunks_exact(PACK_ENTRY_LEN).map(BlobEntry::decode).collect();
        let mut bases = body[entries_end..].chunks_exact(32);
        let mut at = 0u64;
        for (i, e) in entries.iter_mut().enumerate() {
            if e.offset != at
                || e.raw_len == 0
                || e.raw_len > crate::image::format::CHUNK_SIZE
                || e.flags & !(crate::image::format::FLAG_ZSTD | FLAG_DELTA | FLAG_SEALED) != 0
                || (e.flags & FLAG_SEALED != 0) != keys.encrypted()
                || (e.flags & FLAG_DELTA != 0 && (e.stored_len as usize) < 32 + e.sealing())
            {
                return bad(&format!("entry {i} does not follow the previous blob or is out of range"));
            }
            if e.flags & FLAG_DELTA != 0 {
                let Some(base) = bases.next() else {
                    return bad("the index lists fewer bases than delta blobs");
                };
                e.base = Some(base.try_into().expect("32 bytes"));
            }
            at += e.record_len();
        }
        if bases.next().is_some() {
            return bad("the index lists more bases than delta blobs");
        }
        if at != pack_size {
            return bad("the blobs do not fill the pack's recorded size");
        }
        Ok(PackIndex { name: name.to_string(), pack_size, entries })
    }
}

/// Lower-case hex of 32 bytes back to bytes.
pub fn decode_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// One blob to add to a pack: the chunk's id, lengths and stored payload.
pub struct NewBlob<'a> {
    /// The chunk's id.
    pub id: ChunkId,
    /// Content length.
    pub raw_len: u32,
    /// FLAG_* bits.
    pub flags: u32,
    /// crc32 of `payload`.
    pub payload_crc: u32,
    /// The stored payload (a delta's starts with `base`).
    pub payload: &'a [u8],
    /// A delta blob's base.
    pub base: Option<ChunkId>,
}

/// Writes blobs into packs of a store: a pack gets a random name, is
/// written in order, each byte once, and made durable and visible whole
/// when it is closed; its index is written after it. A pack without its
/// index is not part of the repository (prune removes it). Closing, which
/// waits for the flush (or the upload), runs on a thread of its own;
/// [`PackWriter::commit`] waits for every one.
pub struct PackWriter {
    store: Arc<dyn Store>,
    keys: Keys,
    open: Option<OpenPack>,
    /// Packs closed so far.
    pub written: Vec<PackIndex>,
    /// Packs being closed, each on its thread.
    closing: Vec<std::thread::JoinHandle<Result<PackIndex>>>,
}

struct OpenPack {
    name: String,
    file: Box<dyn ObjectWriter>,
    size: u64,
    entries: Vec<BlobEntry>,
}

impl PackWriter {
    /// A writer of packs into `store`; the indexes are sealed when `keys`
    /// are (the blobs come sealed).
    pub fn new(store: Arc<dyn Store>, keys: &Keys) -> PackWriter {
        PackWriter { store, keys: keys.clone(), open: None, written: Vec::new(), closing: Vec::new() }
    }

    /// Appends the record of blob `e` as another pack stored it (checked
    /// by the caller): the same bytes, in a new pack.
    pub fn add_record(&mut self, e: &BlobEntry, record: &[u8]) -> Result<()> {
        self.add(&NewBlob {
            id: e.id,
            raw_len: e.raw_len,
            flags: e.flags,
            payload_crc: e.payload_crc,
            payload: &record[BLOB_HEADER_LEN..],
            base: e.base,
        })
    }

    /// Appends a blob; closes the pack when it is full.
    pub fn add(&mut self, blob: &NewBlob) -> Result<()> {
        if self.open.is_none() {
            let name = random_hex(32);
            let file = self.store.create(&pack_file(&name))?;
            self.open = Some(OpenPack { name, file, size: 0, entries: Vec::new() });
        }
        let p = self.open.as_mut().expect("opened above");
        let e = BlobEntry {
            id: blob.id,
            offset: p.size,
            stored_len: blob.payload.len() as u32,
            raw_len: blob.raw_len,
            payload_crc: blob.payload_crc,
            flags: blob.flags,
            base: blob.base,
        };
        p.file.write_all(&e.header())?;
        p.file.write_all(blob.payload)?;
        p.size += e.record_len();
        p.entries.push(e);
        if p.size >= PACK_TARGET {
            self.close()?;
        }
        Ok(())
    }

    /// Closes the open pack, if any: on a thread of its own (so that the
    /// backup goes on meanwhile), it is made durable and visible, and its
    /// index is written after it. [`PackWriter::commit`] waits for every one.
    pub fn close(&mut self) -> Result<()> {
        let Some(p) = self.open.take() else { return Ok(()) };
        let (store, keys) = (self.store.clone(), self.keys.clone());
        let closing = std::thread::Builder::new()
            .name("klon-pack-close".into())
            .spawn(move || finish_pack(p, &*store, &keys))
            .map_err(|e| Error::Unsupported(format!("starting a thread to close a pack: {e}")))?;
        self.closing.push(closing);
        // At most a few packs are being closed at once: each holds buffers.
        if self.closing.len() > 4 {
            let oldest = self.closing.remove(0);
            self.take_closed(oldest)?;
        }
        Ok(())
    }

    fn take_closed(&mut self, h: std::thread::JoinHandle<Result<PackIndex>>) -> Result<()> {
        let index =
            h.join().unwrap_or_else(|_| Err(Error::Unsupported("closing a pack stopped unexpectedly".into())))?;
        self.written.push(index);
        Ok(())
    }

    /// How many packs this writer has begun: the first `n` of them are
    /// durable, with their indexes, once `written` holds `n`.
    pub fn packs_begun(&self) -> usize {
        self.written.len() + self.closing.len() + usize::from(self.open.is_some())
    }

    /// Closes the open pack and waits for every pack being closed: every
    /// pack and index written is durable when it returns.
    pub fn commit(&mut self) -> Result<()> {
        let closed = self.close();
        let mut first_error = closed.err();
        for h in std::mem::take(&mut self.closing) {
            if let Err(e) = self.take_closed(h) {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Drops the unfinished pack, if any (after a failure), and waits for
    /// the packs being closed (complete ones stay: prune removes them if no
    /// snapshot comes to use them).
    pub fn abandon(&mut self) {
        if let Some(p) = self.open.take() {
            p.file.abort();
        }
        for h in std::mem::take(&mut self.closing) {
            let _ = h.join();
        }
    }
}

/// Finishes pack `p`: made durable and visible, then its index written.
fn finish_pack(p: OpenPack, store: &dyn Store, keys: &Keys) -> Result<PackIndex> {
    p.file.finish()?;
    let index = PackIndex { name: p.name, pack_size: p.size, entries: p.entries };
    store.write(&index_file(&index.name), &index.file_bytes(keys))?;
    Ok(index)
}

/// Checks a blob record's header and payload crc32 against its index
/// entry `e`, opens a sealed payload with `keys` (authenticating it), and
/// checks that a delta's payload names the base the index does: the record
/// is the one its writer wrote, byte for byte. Returns what follows a
/// delta's base id (the payload otherwise).
pub fn check_stored<'r>(e: &BlobEntry, record: &'r [u8], keys: &Keys, where_: &str) -> Result<Cow<'r, [u8]>> {
    e.check_header(&record[..BLOB_HEADER_LEN.min(record.len())], where_)?;
    let payload = &record[BLOB_HEADER_LEN..];
    if crc32fast::hash(payload) != e.payload_crc {
        return Err(Error::Corrupt(format!("{where_}: stored data checksum (crc32) does not match")));
    }
    if (e.flags & FLAG_SEALED != 0) != keys.encrypted() {
        return Err(Error::Corrupt(format!(
            "{where_}: the blob is {}sealed, in a repository that is {}encrypted",
            if keys.encrypted() { "not " } else { "" },
            if keys.encrypted() { "" } else { "not " }
        )));
    }
    let opened =
        keys.open(Sealed::Blob { id: &e.id, flags: e.flags, raw_len: e.raw_len }, payload).ok_or_else(|| {
            Error::Corrupt(format!(
                "{where_}: the stored data does not authenticate with the repository's key (changed since it was \
             written)"
            ))
        })?;
    if let Some(base) = &e.base {
        if opened.get(..32) != Some(&base[..]) {
            return Err(Error::Corrupt(format!("{where_}: the delta's base is not the one its pack's index names")));
        }
        return Ok(match opened {
            Cow::Borrowed(b) => Cow::Borrowed(&b[32..]),
            Cow::Owned(mut v) => {
                v.drain(..32);
                Cow::Owned(v)
            }
        });
    }
    Ok(opened)
}

/// Checks a blob record as [`check_stored`] does, and returns what its
/// payload stores: the content, or a delta's patch, decompressed.
pub fn unpack_record(
    e: &BlobEntry,
    record: &[u8],
    keys: &Keys,
    decomp: &mut zstd::bulk::Decompressor,
    where_: &str,
) -> Result<Vec<u8>> {
    let payload = check_stored(e, record, keys, where_)?;
    // A patch is a little longer than the content at most (its block list).
    let max = e.raw_len as usize
        + if e.base.is_some() { 8 + 4 * crate::image::format::CHUNK_SIZE as usize / 4096 } else { 0 };
    if e.flags & crate::image::format::FLAG_ZSTD != 0 {
        decomp
            .decompress(&payload, max)
            .map_err(|err| Error::Corrupt(format!("{where_}: data does not decompress: {err}")))
    } else {
        Ok(payload.into_owned())
    }
}

/// Checks a whole blob record read from a pack against its index entry
/// `e`: header, payload crc32, its seal, and the content's id (its blake3,
/// keyed in an encrypted repository). A delta blob's content is made from
/// its base's, which `base` reads (checked).
pub fn check_record(
    e: &BlobEntry,
    record: &[u8],
    keys: &Keys,
    decomp: &mut zstd::bulk::Decompressor,
    base: &mut dyn FnMut(&ChunkId) -> Result<std::rc::Rc<Vec<u8>>>,
    where_: &str,
) -> Result<()> {
    let stored = unpack_record(e, record, keys, decomp, where_)?;
    let content = match &e.base {
        None => stored,
        Some(b) => {
            let base = base(b)?;
            super::delta::apply(&base, &stored, e.raw_len as usize)
                .map_err(|why| Error::Corrupt(format!("{where_}: {why}")))?
        }
    };
    if content.len() != e.raw_len as usize || keys.chunk_id(&content) != e.id {
        return Err(Error::Corrupt(format!("{where_}: content checksum (blake3) does not match")));
    }
    Ok(())
}

/// Reads every blob record of the pack `idx` indexes (under `packs`) in
/// order and checks it with [`check_record`] (delta blobs' bases read by
/// `base`), handing each entry, its record and the check's outcome to
/// `each`. Stops at the first read error (returned), or at the first error
/// `each` returns.
pub fn check_blobs(
    store: &dyn Store,
    idx: &PackIndex,
    keys: &Keys,
    base: &mut dyn FnMut(&ChunkId) -> Result<std::rc::Rc<Vec<u8>>>,
    mut each: impl FnMut(&BlobEntry, &[u8], Result<()>) -> Result<()>,
) -> Result<()> {
    let file = pack_file(&idx.name);
    let f = store.open(&file)?;
    let mut decomp = zstd::bulk::Decompressor::new().map_err(|e| Error::Unsupported(format!("zstd: {e}")))?;
    let mut buf = Vec::new();
    for e in &idx.entries {
        crate::engine::cancel::check("checking packs")?;
        buf.resize(e.record_len() as usize, 0);
        f.read_exact_at(&mut buf, e.offset)?;
        let where_ = format!("chunk {} in {} at offset {}", hex(&e.id[..6]), store.locate(&file), e.offset);
        let checked = check_record(e, &buf, keys, &mut decomp, base, &where_);
        each(e, &buf, checked)?;
    }
    Ok(())
}

/// `n` random bytes in hex, from the kernel.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    let ok = File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b)).is_ok();
    if !ok {
        // Unique enough for temporary names: time and pid.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let seed = t ^ (u128::from(std::process::id()) << 64);
        for (i, x) in b.iter_mut().enumerate() {
            *x = (seed >> ((i % 16) * 8)) as u8;
        }
    }
    hex(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_round_trip_and_damage_is_named() {
        let e = |off, stored| BlobEntry {
            id: [off as u8; 32],
            offset: off,
            stored_len: stored,
            raw_len: 10,
            payload_crc: 1,
            flags: 1,
            base: None,
        };
        let delta = BlobEntry { flags: FLAG_DELTA | 1, base: Some([9; 32]), ..e(158, 40) };
        let idx =
            PackIndex { name: hex(&[7u8; 32]), pack_size: 3 * 64 + 70, entries: vec![e(0, 10), e(74, 20), delta] };
        let none = Keys::none();
        let b = idx.encode();
        let back = PackIndex::decode(&b, &idx.name, &none, "x").unwrap();
        assert_eq!(back.entries, idx.entries);
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 1;
            assert!(PackIndex::decode(&d, &idx.name, &none, "x").is_err(), "flip at {i} not caught");
        }
        let err = PackIndex::decode(&b, &hex(&[8u8; 32]), &none, "x").unwrap_err().to_string();
        assert!(err.contains("belongs to another pack"), "{err}");
        // Entries that leave a gap are refused even with a good checksum.
        let gap = PackIndex { entries: vec![e(0, 10), e(80, 14)], pack_size: 2 * 64 + 24, ..idx.clone() };
        let err = PackIndex::decode(&gap.encode(), &idx.name, &none, "x").unwrap_err().to_string();
        assert!(err.contains("entry 1 does not follow"), "{err}");
    }

    #[test]
    fn a_sealed_index_opens_only_with_its_keys_and_as_its_pack() {
        let (_, keys, _) = crate::repo::crypto::create("pw").unwrap();
        let (_, other, _) = crate::repo::crypto::create("pw").unwrap();
        let e = BlobEntry {
            id: [1; 32],
            offset: 0,
            stored_len: 50,
            raw_len: 10,
            payload_crc: 1,
            flags: FLAG_SEALED,
            base: None,
        };
        let idx = PackIndex { name: hex(&[7u8; 32]), pack_size: 64 + 50, entries: vec![e] };
        let b = idx.file_bytes(&keys);
        assert!(!b.windows(32).any(|w| w == [1u8; 32]), "a chunk id is in the clear");
        assert_eq!(PackIndex::decode(&b, &idx.name, &keys, "x").unwrap().entries, idx.entries);
        for k in [&other, &Keys::none()] {
            assert!(PackIndex::decode(&b, &idx.name, k, "x").is_err(), "opened with other keys");
        }
        // Sealed for one pack, it does not open as another's index.
        let moved = PackIndex { name: hex(&[8u8; 32]), ..idx.clone() }.file_bytes(&keys);
        assert!(PackIndex::decode(&moved, &idx.name, &keys, "x").is_err());
        for i in (0..b.len()).step_by(7) {
            let mut d = b.clone();
            d[i] ^= 1;
            assert!(PackIndex::decode(&d, &idx.name, &keys, "x").is_err(), "flip at {i} not caught");
        }
        // An encrypted repository's index lists sealed blobs only.
        let plain = PackIndex { entries: vec![BlobEntry { flags: 0, ..e }], ..idx.clone() };
        let err = PackIndex::decode(&plain.file_bytes(&keys), &idx.name, &keys, "x").unwrap_err().to_string();
        assert!(err.contains("entry 0"), "{err}");
    }

    #[test]
    fn packs_written_read_back_and_every_damage_is_caught() {
        let (_, sealed, _) = crate::repo::crypto::create("pw").unwrap();
        for keys in [Keys::none(), sealed] {
            let t = crate::testutil::TempDir::new("packs");
            let store = crate::repo::store::LocalStore::new(&t.join("r"));
            store.prepare().unwrap();
            let mut w = PackWriter::new(Arc::new(store.clone()), &keys);
            let mut rng = crate::testutil::Rng::seeded(5);
            let contents: Vec<Vec<u8>> = (0..40).map(|i| rng.bytes(1000 + i * 997)).collect();
            let flags = if keys.encrypted() { FLAG_SEALED } else { 0 };
            for c in &contents {
                let id = keys.chunk_id(c);
                let payload = keys.seal(Sealed::Blob { id: &id, flags, raw_len: c.len() as u32 }, c);
                w.add(&NewBlob {
                    id,
                    raw_len: c.len() as u32,
                    flags,
                    payload_crc: crc32fast::hash(&payload),
                    payload: &payload,
                    base: None,
                })
                .unwrap();
            }
            w.commit().unwrap();
            assert_eq!(w.written.len(), 1);
            assert!(std::fs::read_dir(t.join("r/tmp")).unwrap().next().is_none(), "unfinished files left in tmp/");
            let name = &w.written[0].name;
            let pack = std::fs::read(t.join("r").join(pack_file(name))).unwrap();
            assert_eq!(pack.len() as u64, w.written[0].pack_size);
            let idx = PackIndex::load(&store, name, &keys).unwrap();
            let mut d = zstd::bulk::Decompressor::new().unwrap();
            let mut no_base = |_: &ChunkId| -> Result<std::rc::Rc<Vec<u8>>> { unreachable!("no delta blobs here") };
            for (e, c) in idx.entries.iter().zip(&contents) {
                let rec = &pack[e.offset as usize..(e.offset + e.record_len()) as usize];
                check_record(e, rec, &keys, &mut d, &mut no_base, "t").unwrap();
                assert_eq!(rec[BLOB_HEADER_LEN..] == c[..], !keys.encrypted());
                // Any flipped byte of the record is caught.
                for at in [0, 9, 30, 57, BLOB_HEADER_LEN, BLOB_HEADER_LEN + 30, rec.len() - 1] {
                    let mut bad = rec.to_vec();
                    bad[at] ^= 0x10;
                    let e2 = check_record(e, &bad, &keys, &mut d, &mut no_base, "t");
                    assert!(e2.is_err(), "flip at {at} not caught");
                }
                if keys.encrypted() {
                    // Changed and given a matching crc32, a sealed payload
                    // still does not authenticate.
                    let mut bad = rec.to_vec();
                    bad[BLOB_HEADER_LEN + 40] ^= 1;
                    let forged = BlobEntry { payload_crc: crc32fast::hash(&bad[BLOB_HEADER_LEN..]), ..*e };
                    bad[..BLOB_HEADER_LEN].copy_from_slice(&forged.header());
                    let err = check_record(&forged, &bad, &keys, &mut d, &mut no_base, "t").unwrap_err();
                    assert!(err.to_string().contains("does not authenticate"), "{err}");
                }
            }
        }
    }

    #[test]
    fn blob_header_checks() {
        let e = BlobEntry { id: [3; 32], offset: 0, stored_len: 5, raw_len: 9, payload_crc: 77, flags: 0, base: None };
        let h = e.header();
        e.check_header(&h, "p").unwrap();
        let mut d = h;
        d[30] ^= 1;
        assert!(e.check_header(&d, "p").unwrap_err().to_string().contains("crc32"));
        let other = BlobEntry { raw_len: 8, ..e };
        assert!(other.check_header(&h, "p").unwrap_err().to_string().contains("does not match the pack's index"));
    }
}
