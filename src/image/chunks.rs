//! One interface for where an image's chunks are: what restore, verify and
//! the read-back after a restore read, whatever stores the chunks — a klon
//! image's data files, or a repository's packs for a snapshot.

use std::path::Path;

use super::format::ChunkHeader;
use super::{Manifest, StoredChunk};
use crate::error::Result;

/// The chunks of an image's streams, opened and checked as far as they can
/// be without reading data (the manifest against its layout, every index).
pub trait ChunkStore: Sync {
    /// Where the image is, for messages.
    fn location(&self) -> &Path;

    /// The manifest: source, layout and streams. A store that is not a
    /// klon image directory gives one in the same shape, without files.
    fn manifest(&self) -> &Manifest;

    /// How many chunks stream `stream` has.
    fn chunk_count(&self, stream: usize) -> usize;

    /// Reads every chunk of stream `stream`, in order, handing each to
    /// `each`. Stops at the first error, or when `each` returns false.
    fn for_each_chunk(&self, stream: usize, each: &mut dyn FnMut(StoredChunk) -> Result<bool>) -> Result<()>;

    /// Reads chunk `seq` of stream `stream`, header and payload.
    fn read_chunk(&self, stream: usize, seq: u64) -> Result<StoredChunk>;

    /// Reads only the header of chunk `seq` of stream `stream`: where its
    /// content goes and its blake3.
    fn read_header(&self, stream: usize, seq: u64) -> Result<ChunkHeader>;

    /// The key a header's content hash is keyed with (an encrypted
    /// repository's chunk ids), or None: plain blake3.
    fn hash_key(&self) -> Option<[u8; 32]> {
        None
    }
}
