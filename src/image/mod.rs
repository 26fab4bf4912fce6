//! The image format: a directory holding a manifest (klon.json and its
//! blake3), and per stream an index file and split data files of chunk
//! records. See docs/FORMAT.md.

pub mod chunks;
pub mod format;
pub mod location;
pub mod manifest;
pub mod reader;
pub mod writer;

pub use chunks::ChunkStore;
pub use manifest::{Fill, Manifest, StreamInfo, StreamKind};
pub use reader::{ImageReader, StoredChunk};
pub use writer::{EncodedChunk, ImageWriter, Lane, StreamWriter};
