//! A snapshot in a repository as an [`ImageSource`], and the store of its
//! chunks (the repository's packs) as a [`ChunkStore`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{ImageSource, Summary};
use crate::device::Disk;
use crate::device::direct::BufPool;
use crate::engine::feedback::Feedback;
use crate::engine::restore::{self, RestoreOptions, RestoreReport};
use crate::engine::verify::{self, VerifyReport};
use crate::error::{Error, Result};
use crate::image::format::{CHUNK_SIZE, ChunkHeader};
use crate::image::{ChunkStore, Manifest, StoredChunk};
use crate::repo::pack::{self, BLOB_HEADER_LEN};
use crate::repo::read::ContentReader;
use crate::repo::snapshot::{Table, short};
use crate::repo::store::Object;
use crate::repo::{BlobIndex, Repository, SnapshotEntry};
use crate::table::DiskLayout;
use crate::units::human_bytes;

/// A snapshot, opened: its file, its table, and where each of its chunks
/// is, all checked; the repository held (a shared lock) from before it was
/// read until this is dropped, so no prune takes away what it was checked
/// to have (not even while a person reads a restore's confirmation).
/// Clones share the lock, the table and the index.
#[derive(Debug, Clone)]
pub struct SnapshotImage {
    repo: Repository,
    _lock: Arc<crate::repo::lock::Lock>,
    snapshot: SnapshotEntry,
    table: Arc<Table>,
    index: Arc<BlobIndex>,
    /// `REPO:ID`, as messages name it.
    location: PathBuf,
    bufs: BufPool,
}

impl SnapshotImage {
    /// Opens snapshot `spec` (an id, a prefix, `latest`, or none for the
    /// latest) of the repository at `dir` for `job` (named in the lock it
    /// takes, see [`crate::repo::lock`]; a stale lock it removes is said
    /// through `feedback`), and checks everything that needs no data: the
    /// snapshot's file and table, that every chunk it names is in a pack's
    /// index with the same length, and that those packs are there with
    /// their recorded sizes.
    pub fn open(dir: &Path, spec: Option<&str>, job: &str, feedback: &Feedback) -> Result<SnapshotImage> {
        let repo = Repository::open(dir)?;
        let lock = repo.lock(job, false, feedback)?;
        let snapshot = repo.resolve(spec)?;
        let table = snapshot.file.load_table(&repo)?;
        let index = repo.load_index()?;
        let location = PathBuf::from(format!("{}:{}", dir.display(), snapshot.short_id()));
        let m = &snapshot.file.image;
        let mut packs_used = std::collections::BTreeSet::new();
        for (si, entries) in table.iter().enumerate() {
            for (seq, e) in entries.iter().enumerate() {
                match index.position(&e.id).map(|p| (index.pack_at(p), index.entry_at(p))) {
                    Some((p, b)) if b.raw_len == e.raw_len => {
                        packs_used.insert(p);
                        if b.base.is_some() {
                            let chain = index.chain(&e.id);
                            if index.depth(&e.id).is_none() {
                                let last = chain.last().expect("never empty");
                                return Err(Error::Corrupt(format!(
                                    "{}: chunk {} ({}, disk offset {}) is stored as changes to chunk {}, {} (run \
                                     klon check {})",
                                    location.display(),
                                    short(&e.id),
                                    crate::image::reader::describe_stream(&m.streams[si]),
                                    e.extents[0].0,
                                    short(&chain[1]),
                                    if index.contains(last) {
                                        format!(
                                            "whose chain of bases is longer than {} deltas or loops: the pack indexes are damaged",
                                            crate::repo::MAX_DELTA_DEPTH
                                        )
                                    } else if chain.len() == 2 {
                                        format!("which the repository {} does not hold", dir.display())
                                    } else {
                                        format!(
                                            "whose chain of bases needs chunk {}, which the repository {} does not \
                                             hold",
                                            short(last),
                                            dir.display()
                                        )
                                    },
                                    dir.display()
                                )));
                            }
                            packs_used
                                .extend(chain.iter().skip(1).map(|c| index.pack_of(c).expect("a chain that reads")));
                        }
                    }
                    Some(_) => {
                        return Err(Error::Corrupt(format!(
                            "{}: chunk {} ({}, chunk {seq}) has another length in the repository than the snapshot says",
                            location.display(),
                            short(&e.id),
                            crate::image::reader::describe_stream(&m.streams[si])
                        )));
                    }
                    None => {
                        return Err(Error::Corrupt(format!(
                            "{}: chunk {} ({}, disk offset {}) is missing from the repository: no pack holds it \
                             (run klon check {})",
                            location.display(),
                            short(&e.id),
                            crate::image::reader::describe_stream(&m.streams[si]),
                            e.extents[0].0,
                            dir.display()
                        )));
                    }
                }
            }
        }
        let stored: std::collections::HashMap<String, u64> = repo.pack_names(".pack")?.into_iter().collect();
        for p in packs_used {
            let crate::repo::index::PackInfo { name, size, .. } = &index.packs[p as usize];
            let path = repo.store.locate(&pack::pack_file(name));
            match stored.get(name) {
                Some(len) if len == size => {}
                Some(len) => {
                    return Err(Error::Corrupt(format!(
                        "{path}: {len} bytes, its index says {size}: the pack is damaged"
                    )));
                }
                None => {
                    return Err(Error::Corrupt(format!(
                        "{path}: the pack is missing, and snapshot {} needs it",
                        snapshot.short_id()
                    )));
                }
            }
        }
        Ok(SnapshotImage {
            repo,
            _lock: Arc::new(lock),
            snapshot,
            table: Arc::new(table),
            index: Arc::new(index),
            location,
            bufs: BufPool::new(24, BLOB_HEADER_LEN + CHUNK_SIZE as usize),
        })
    }

    /// The snapshot.
    pub fn snapshot(&self) -> &SnapshotEntry {
        &self.snapshot
    }

    /// Chunk `seq`'s header. A delta's payload, as [`Self::read`] hands it
    /// on, is its content, so its flags and crc32 are those of the content
    /// (the crc32 known only once it is made).
    fn header(&self, stream: usize, seq: u64) -> ChunkHeader {
        let e = &self.table[stream][seq as usize];
        let (_, b) = self.index.get(&e.id).expect("checked when opened");
        let made = b.base.is_some() || self.repo.keys.encrypted();
        let (flags, stored_len, payload_crc) =
            if made { (0, b.raw_len, 0) } else { (b.flags, b.stored_len, b.payload_crc) };
        ChunkHeader {
            stream: stream as u32,
            flags,
            seq,
            extents: e.extents.to_vec(),
            raw_len: b.raw_len,
            stored_len,
            payload_crc,
            content_hash: e.id,
        }
    }

    /// Tells the store which records chunk `id`'s chain of bases is made
    /// from (a hint: see [`Object::prefetch`]).
    fn prefetch_chain(&self, id: &crate::repo::pack::ChunkId) {
        for link in self.index.chain(id) {
            let Some(at) = self.index.position(&link) else { continue };
            let (p, b) = (self.index.pack_at(at), self.index.entry_at(at));
            if let Ok(pack) = self.repo.store.open(&pack::pack_file(&self.index.packs[p as usize].name)) {
                pack.prefetch(&[(b.offset, b.record_len())]);
            }
        }
    }

    fn read(&self, stream: usize, seq: u64, open: &mut Option<(String, Box<dyn Object>)>) -> Result<StoredChunk> {
        let e = &self.table[stream][seq as usize];
        let (name, b) = self.index.get(&e.id).expect("checked when opened");
        let file = pack::pack_file(name);
        let location = format!(
            "{} at offset {} (chunk {}, {} of snapshot {}, chunk {seq})",
            self.repo.store.locate(&file),
            b.offset,
            short(&e.id),
            crate::image::reader::describe_stream(&self.snapshot.file.image.streams[stream]),
            self.snapshot.short_id()
        );
        if b.base.is_some() {
            // Made from its chain of bases and checked when decoded: on
            // a worker, as decompressing a whole chunk is. Its links lie
            // all over the packs: they are asked for now, so that they
            // are read while the workers make the chunks before it.
            self.prefetch_chain(&e.id);
            let (store, index, id, keys) = (self.repo.store.clone(), self.index.clone(), e.id, self.repo.keys.clone());
            let note = format!("(for {location})");
            let make = move |out: &mut [u8]| {
                ContentReader::uncached(store, &index, &keys)?
                    .content_into(&id, out)
                    .map_err(|err| err.with_note(&note))
            };
            return Ok(StoredChunk::made(
                stream,
                self.header(stream, seq),
                Box::new(make),
                self.bufs.clone(),
                location,
            ));
        }
        if open.as_ref().is_none_or(|o| o.0 != name) {
            *open = Some((name.to_string(), self.repo.store.open(&file)?));
        }
        let (_, f) = open.as_ref().expect("opened above");
        let mut buf = self.bufs.take(b.record_len() as usize);
        f.read_exact_at(&mut buf, b.offset)?;
        b.check_header(&buf[..BLOB_HEADER_LEN], &location)?;
        if self.repo.keys.encrypted() {
            // Opened (authenticated), decompressed and checked against its
            // keyed id on a worker.
            let (keys, id, loc) = (self.repo.keys.clone(), e.id, location.clone());
            let make = move |out: &mut [u8]| -> Result<()> {
                let content = DECOMPRESSOR.with(|d| -> Result<Vec<u8>> {
                    let mut d = d.borrow_mut();
                    if d.is_none() {
                        *d = Some(
                            zstd::bulk::Decompressor::new().map_err(|e| Error::Unsupported(format!("zstd: {e}")))?,
                        );
                    }
                    pack::unpack_record(&b, &buf, &keys, d.as_mut().expect("made above"), &loc)
                })?;
                if content.len() != out.len() || keys.chunk_id(&content) != id {
                    return Err(Error::Corrupt(format!("{loc}: content checksum (keyed blake3) does not match")));
                }
                out.copy_from_slice(&content);
                Ok(())
            };
            return Ok(StoredChunk::made(
                stream,
                self.header(stream, seq),
                Box::new(make),
                self.bufs.clone(),
                location,
            ));
        }
        Ok(StoredChunk::new(stream, self.header(stream, seq), buf, BLOB_HEADER_LEN, self.bufs.clone(), location))
    }
}

impl ChunkStore for SnapshotImage {
    fn location(&self) -> &Path {
        &self.location
    }

    fn manifest(&self) -> &Manifest {
        &self.snapshot.file.image
    }

    fn chunk_count(&self, stream: usize) -> usize {
        self.table[stream].len()
    }

    fn for_each_chunk(&self, stream: usize, each: &mut dyn FnMut(StoredChunk) -> Result<bool>) -> Result<()> {
        let mut open = None;
        for seq in 0..self.table[stream].len() as u64 {
            if !each(self.read(stream, seq, &mut open)?)? {
                break;
            }
        }
        Ok(())
    }

    fn read_chunk(&self, stream: usize, seq: u64) -> Result<StoredChunk> {
        self.read(stream, seq, &mut None)
    }

    fn read_header(&self, stream: usize, seq: u64) -> Result<ChunkHeader> {
        Ok(self.header(stream, seq))
    }

    fn hash_key(&self) -> Option<[u8; 32]> {
        self.repo.keys.id_key()
    }
}

impl ImageSource for SnapshotImage {
    fn location(&self) -> &Path {
        &self.location
    }

    fn layout(&self) -> &DiskLayout {
        &self.snapshot.file.image.layout
    }

    fn describe(&self) -> String {
        let f = &self.snapshot.file;
        let m = &f.image;
        format!(
            "snapshot {} of {} ({}, {} partitions, made {} on {})",
            self.snapshot.short_id(),
            m.source.model.as_deref().unwrap_or(&m.source.path),
            human_bytes(m.source.size),
            m.layout.partitions.len(),
            f.created,
            f.hostname
        )
    }

    fn verify(&mut self, workers: usize, feedback: &Feedback) -> Result<VerifyReport> {
        let result = verify::verify_image(self, workers, feedback);
        if !matches!(&result, Err(Error::Cancelled(_))) {
            crate::repo::check::record(
                &self.repo,
                &self.snapshot.id,
                &result.as_ref().map(|_| ()).map_err(|e| e.to_string()),
            );
        }
        result
    }

    fn restore(&mut self, target: &Disk, opts: &RestoreOptions) -> Result<RestoreReport> {
        restore::restore(self, target, opts)
    }

    fn restore_partition(
        &mut self,
        number: u32,
        target: &Disk,
        to: u64,
        opts: &RestoreOptions,
    ) -> Result<RestoreReport> {
        restore::restore_partition(self, number, target, to, opts)
    }

    fn random_access(&self) -> Option<Box<dyn ChunkStore + Send>> {
        Some(Box::new(self.clone()))
    }

    fn info(&self) -> (String, serde_json::Value) {
        let f = &self.snapshot.file;
        let last = crate::repo::check::last(&self.repo, &self.snapshot.id);
        let json = serde_json::json!({
            "repository": self.repo.dir,
            "snapshot": self.snapshot.id,
            "encrypted": self.repo.keys.encrypted(),
            "complete": true,
            "last_verify": last,
            "hostname": f.hostname,
            "label": f.label,
            "tags": f.tags,
            "time": f.time,
            "utc_offset": f.utc_offset,
            "added": f.added,
            "manifest": f.image,
        });
        let mut text = format!(
            "Snapshot:     {} in repository {}\nCreated:      {} on {}{}{} by klon {}\nAdded:        {} new ({} chunks) to the repository\n",
            self.snapshot.id,
            self.repo.dir.display(),
            f.created,
            f.hostname,
            f.label.as_deref().map(|l| format!(", label \"{l}\"")).unwrap_or_default(),
            if f.tags.is_empty() { String::new() } else { format!(", tags {}", f.tags.join(",")) },
            f.image.klon_version,
            human_bytes(f.added.stored_bytes),
            f.added.chunks
        );
        if let Some(slot) = self.repo.keys.slot() {
            text += &format!("Encrypted:    yes (XChaCha20-Poly1305; unlocked with key slot {slot})\n");
        }
        text += &super::klon::render_body(&f.image);
        text += &match last {
            Some(v) if v.ok => format!("Verified:     OK on {}\n", v.time),
            Some(v) => format!("Verified:     FAILED on {}: {}\n", v.time, v.problem.as_deref().unwrap_or("unknown")),
            None => "Verified:     never (run klon verify)\n".to_string(),
        };
        (text, json)
    }

    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }
}

/// What a list shows of the latest snapshot of the repository at `dir`.
pub fn summarize(dir: &Path, spec: Option<&str>) -> Result<Summary> {
    let repo = Repository::open(dir)?;
    let s = repo.resolve(spec)?;
    let m = &s.file.image;
    let short_time = |t: &str| t.replace('T', " ").trim_end_matches('Z').chars().take(16).collect::<String>();
    let state = match crate::repo::check::last(&repo, &s.id) {
        None => format!("snapshot {}, never verified", s.short_id()),
        Some(v) if v.ok => format!("snapshot {}, verified OK {}", s.short_id(), short_time(&v.time)),
        Some(v) => format!("snapshot {}, verification FAILED {}", s.short_id(), short_time(&v.time)),
    };
    Ok(Summary {
        kind: Some("repository"),
        source: m.source.model.clone().unwrap_or_else(|| m.source.path.clone()),
        disk_size: m.source.size,
        sector_size: m.layout.sector_size,
        created: Some(short_time(&s.file.created)),
        image_bytes: m.streams.iter().map(|st| st.compressed_bytes).sum(),
        state,
    })
}

thread_local! {
    /// One zstd decompression context per worker thread, for the chunks of
    /// an encrypted repository (opened before they decompress).
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}
