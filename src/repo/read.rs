//! Reading chunks' contents by id from a repository's packs: a full
//! chunk's stored payload, or a delta's base (made the same way, down its
//! chain of bases) and patch, checked against the chunk's blake3 either
//! way.

use std::sync::Arc;

use super::crypto::Keys;
use super::pack::{self, ChunkId};
use super::snapshot::short;
use super::store::{Object, Store};
use super::{BlobIndex, MAX_DELTA_DEPTH};
use crate::error::{Error, Result};

/// Bases kept in memory, read last: deltas of one window in many
/// snapshots share their base, and a prune or check meets them in turn.
const BASES_KEPT: usize = 8;

/// Reads chunks' contents through one index; keeps the last pack open
/// and the last bases read.
pub struct ContentReader<'a> {
    store: Arc<dyn Store>,
    index: &'a BlobIndex,
    keys: Keys,
    decomp: zstd::bulk::Decompressor<'static>,
    open: Option<(u32, Box<dyn Object>)>,
    buf: Vec<u8>,
    bases: std::collections::VecDeque<(ChunkId, std::rc::Rc<Vec<u8>>)>,
    /// How many bases are kept.
    keep: usize,
    /// Whether every link of a chain is checked against its blake3, or
    /// only the chunk asked for (each link's stored bytes are checked by
    /// their crc32 either way).
    check_links: bool,
}

impl<'a> ContentReader<'a> {
    /// A reader of the chunks `index` lists, in the packs of `store`
    /// (sealed and named with `keys` in an encrypted repository).
    pub fn new(store: Arc<dyn Store>, index: &'a BlobIndex, keys: &Keys) -> Result<ContentReader<'a>> {
        let decomp = zstd::bulk::Decompressor::new().map_err(|e| Error::Unsupported(format!("zstd: {e}")))?;
        Ok(ContentReader {
            store,
            index,
            keys: keys.clone(),
            decomp,
            open: None,
            buf: Vec::new(),
            bases: Default::default(),
            keep: BASES_KEPT,
            check_links: true,
        })
    }

    /// A reader that keeps no base: for one chunk, made with at most its
    /// content and its base's in memory. Only the chunk's own blake3 is
    /// checked (it covers every link of its chain), unless it fails: then
    /// every link's, to name the one at fault.
    pub fn uncached(store: Arc<dyn Store>, index: &'a BlobIndex, keys: &Keys) -> Result<ContentReader<'a>> {
        Ok(ContentReader { keep: 0, check_links: false, ..ContentReader::new(store, index, keys)? })
    }

    /// The content of chunk `id`, checked (a delta made from its base),
    /// into `out`, which must be as long as the chunk.
    pub fn content_into(&mut self, id: &ChunkId, out: &mut [u8]) -> Result<()> {
        if self.keep == 0 && !self.check_links {
            match self.made_in_one_pass(id, out) {
                Err(Error::Corrupt(why)) => {
                    // Again link by link, to name the one at fault.
                    self.check_links = true;
                    let again = self.made(id, 0);
                    self.check_links = false;
                    return again.and(Err(Error::Corrupt(why)));
                }
                made => return made,
            }
        }
        let content = self.content(id)?;
        if content.len() != out.len() {
            return Err(Error::Corrupt(format!("chunk {}: the chunk made has the wrong length", short(id))));
        }
        out.copy_from_slice(&content);
        Ok(())
    }

    /// The content of chunk `id`, checked (a delta made from its base).
    pub fn content(&mut self, id: &ChunkId) -> Result<Vec<u8>> {
        let made = if self.keep == 0 && !self.check_links {
            let len = self.index.position(id).map_or(0, |p| self.index.entry_at(p).raw_len as usize);
            let mut out = vec![0; len];
            self.made_in_one_pass(id, &mut out).map(|()| out)
        } else {
            self.made(id, 0)
        };
        match made {
            Err(Error::Corrupt(why)) if !self.check_links => {
                self.check_links = true;
                let again = self.made(id, 0);
                self.check_links = false;
                again.and(Err(Error::Corrupt(why)))
            }
            made => made,
        }
    }

    /// Base `id`'s content, checked: from memory when read lately.
    pub fn base(&mut self, id: &ChunkId) -> Result<std::rc::Rc<Vec<u8>>> {
        self.base_at(id, 1)
    }

    /// Chunk `id`'s content made from its whole chain at once (see
    /// [`super::delta::apply_chain`]): every link read and its stored bytes
    /// checked, no link's content made on the way; only the chunk's own
    /// blake3 is checked (it covers the chain).
    fn made_in_one_pass(&mut self, id: &ChunkId, out: &mut [u8]) -> Result<()> {
        let (mut stored, mut base, mut len, where_) = self.stored(id)?;
        let raw_len = len;
        if out.len() != raw_len {
            return Err(Error::Corrupt(format!(
                "{where_}: the chunk is {raw_len} bytes, not the {} expected",
                out.len()
            )));
        }
        // (patch, the length it makes), from the chunk asked for down.
        let mut links = Vec::new();
        while let Some(b) = base {
            if links.len() == MAX_DELTA_DEPTH {
                return Err(Error::Corrupt(format!(
                    "{where_}: more than {MAX_DELTA_DEPTH} deltas lead to this chunk (or its bases loop): the \
                     repository's indexes are damaged"
                )));
            }
            let (below, next, below_len, _) =
                self.stored(&b).map_err(|e| e.with_note(&format!("(the base of {where_})")))?;
            links.push((std::mem::replace(&mut stored, below), len));
            (base, len) = (next, below_len);
        }
        // `stored` is now the whole chunk at the chain's foot.
        let chain: Vec<(&[u8], usize)> = links.iter().rev().map(|(p, len)| (p.as_slice(), *len)).collect();
        super::delta::apply_chain_into(&stored, &chain, out)
            .map_err(|why| Error::Corrupt(format!("{where_}: {why}")))?;
        check_content(&self.keys, out, id, raw_len, &where_)
    }

    /// Chunk `id`'s content, `depth` deltas down a chain of bases.
    fn made(&mut self, id: &ChunkId, depth: usize) -> Result<Vec<u8>> {
        let (stored, base, raw_len, where_) = self.stored(id)?;
        let content = match base {
            None => stored,
            Some(_) if depth >= MAX_DELTA_DEPTH => {
                return Err(Error::Corrupt(format!(
                    "{where_}: more than {MAX_DELTA_DEPTH} deltas lead to this chunk (or its bases loop): the \
                     repository's indexes are damaged"
                )));
            }
            Some(b) => {
                let base = self.base_at(&b, depth + 1).map_err(|e| e.with_note(&format!("(the base of {where_})")))?;
                super::delta::apply(&base, &stored, raw_len)
                    .map_err(|why| Error::Corrupt(format!("{where_}: {why}")))?
            }
        };
        if depth == 0 || self.check_links {
            check_content(&self.keys, &content, id, raw_len, &where_)?;
        }
        Ok(content)
    }

    fn base_at(&mut self, id: &ChunkId, depth: usize) -> Result<std::rc::Rc<Vec<u8>>> {
        if let Some((_, c)) = self.bases.iter().find(|(b, _)| b == id) {
            return Ok(c.clone());
        }
        let c = std::rc::Rc::new(self.made(id, depth)?);
        if self.keep == 0 {
            return Ok(c);
        }
        if self.bases.len() == self.keep {
            self.bases.pop_front();
        }
        self.bases.push_back((*id, c.clone()));
        Ok(c)
    }

    /// Chunk `id`'s record, checked as far as it goes without its base:
    /// its stored bytes decompressed, its base, its length and its place.
    fn stored(&mut self, id: &ChunkId) -> Result<(Vec<u8>, Option<ChunkId>, usize, String)> {
        let Some((p, e)) = self.index.position(id).map(|at| (self.index.pack_at(at), self.index.entry_at(at))) else {
            return Err(Error::Corrupt(format!(
                "chunk {} is in no pack of the repository (run klon check)",
                short(id)
            )));
        };
        let name = &self.index.packs[p as usize].name;
        let file = pack::pack_file(name);
        if self.open.as_ref().is_none_or(|o| o.0 != p) {
            self.open = Some((p, self.store.open(&file)?));
        }
        let f = &self.open.as_ref().expect("opened above").1;
        self.buf.resize(e.record_len() as usize, 0);
        f.read_exact_at(&mut self.buf, e.offset)?;
        let where_ = format!("chunk {} in {} at offset {}", short(id), self.store.locate(&file), e.offset);
        let stored = pack::unpack_record(&e, &self.buf, &self.keys, &mut self.decomp, &where_)?;
        Ok((stored, e.base, e.raw_len as usize, where_))
    }
}

fn check_content(keys: &Keys, content: &[u8], id: &ChunkId, raw_len: usize, where_: &str) -> Result<()> {
    if content.len() != raw_len || keys.chunk_id(content) != *id {
        return Err(Error::Corrupt(format!("{where_}: content checksum (blake3) does not match")));
    }
    Ok(())
}
