//! Writing an image: a directory built under a temporary name and made
//! final (fsync, rename) only when complete.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{self, ChunkHeader, Extent, IndexEntry};
use super::manifest::{FileInfo, Manifest};
use crate::device::direct::{self, DirectWriter, WriteError};
use crate::error::{Error, Result};

/// Suffix of the directory an unfinished backup writes into.
pub const PARTIAL_SUFFIX: &str = ".klon-partial";

/// The directory a backup into `dir` writes to until it is complete.
pub fn partial_dir_for(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(PARTIAL_SUFFIX);
    dir.with_file_name(name)
}

/// An image being written.
#[derive(Debug)]
pub struct ImageWriter {
    final_dir: PathBuf,
    partial_dir: PathBuf,
    split_size: u64,
}

impl ImageWriter {
    /// Starts a new image at `dir`, which must not exist yet; its parent
    /// must. Data files are cut at `split_size` bytes.
    pub fn create(dir: &Path, split_size: u64) -> Result<ImageWriter> {
        if dir.file_name().is_none() {
            return Err(Error::Usage(format!("{} is not a usable image directory name", dir.display())));
        }
        if dir.exists() {
            return Err(Error::Refused(format!(
                "{} already exists; klon never overwrites an image: choose a new name or delete the old image first",
                dir.display()
            )));
        }
        let partial_dir = partial_dir_for(dir);
        if partial_dir.exists() {
            return Err(Error::Refused(format!(
                "{} exists: an earlier backup to this name did not finish; delete it or choose another name",
                partial_dir.display()
            )));
        }
        std::fs::create_dir(&partial_dir).map_err(|e| Error::io("creating image directory", &partial_dir, None, e))?;
        Ok(ImageWriter { final_dir: dir.to_path_buf(), partial_dir, split_size })
    }

    /// Where files are being written now.
    pub fn partial_dir(&self) -> &Path {
        &self.partial_dir
    }

    /// Starts writing stream number `stream` named `name`.
    pub fn stream(&self, stream: u32, name: &str) -> Result<StreamWriter> {
        let idx_path = self.partial_dir.join(format::index_file_name(name));
        let idx_file = File::create(&idx_path).map_err(|e| Error::io("creating", &idx_path, None, e))?;
        let mut idx = BufWriter::with_capacity(1 << 16, idx_file);
        idx.write_all(&format::encode_index_header(stream, 0))
            .map_err(|e| Error::io("writing", &idx_path, Some(0), e))?;
        Ok(StreamWriter {
            dir: self.partial_dir.clone(),
            name: name.to_string(),
            stream,
            split_size: self.split_size,
            file: None,
            file_off: 0,
            files: Vec::new(),
            idx,
            idx_path,
            seq: 0,
            stored_bytes: 0,
        })
    }

    /// Writes the manifest and makes the image final: fsync everything,
    /// rename the directory to its final name, fsync the parent.
    pub fn commit(self, manifest: &Manifest) -> Result<PathBuf> {
        manifest.write(&self.partial_dir)?;
        sync_dir(&self.partial_dir)?;
        std::fs::rename(&self.partial_dir, &self.final_dir)
            .map_err(|e| Error::io("renaming the finished image to", &self.final_dir, None, e))?;
        if let Some(parent) = self.final_dir.parent() {
            let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
            sync_dir(parent)?;
        }
        Ok(self.final_dir)
    }

    /// Removes the unfinished image (after a failure or cancellation).
    pub fn abandon(self) -> Result<()> {
        std::fs::remove_dir_all(&self.partial_dir)
            .map_err(|e| Error::io("removing the unfinished image", &self.partial_dir, None, e))
    }
}

/// Size of each of the two buffers a data file is written through: the
/// size of its direct writes.
const DATA_WRITE_BUF: usize = 4 << 20;

/// A data file's write failure as klon's error for `path`.
fn append_error(path: &Path, e: WriteError) -> Error {
    match e.offset {
        Some(offset) => Error::io("writing", path, Some(offset), e.error),
        None => Error::io("flushing", path, None, e.error),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("flushing directory", dir, None, e))
}

/// A finished stream's files and totals.
#[derive(Debug, Clone)]
pub struct StreamFiles {
    /// The index file.
    pub index: FileInfo,
    /// The data files.
    pub data_files: Vec<FileInfo>,
    /// Chunk count.
    pub chunks: u64,
    /// Content bytes.
    pub stored_bytes: u64,
    /// Bytes in data files.
    pub compressed_bytes: u64,
}

/// One stream being written: chunk records into split data files, their
/// index entries into the index file.
#[derive(Debug)]
pub struct StreamWriter {
    dir: PathBuf,
    name: String,
    stream: u32,
    split_size: u64,
    /// The data file being written (past the page cache where the drive's
    /// filesystem allows: see [`DirectWriter`]) and its path.
    file: Option<(DirectWriter, PathBuf)>,
    file_off: u64,
    files: Vec<FileInfo>,
    idx: BufWriter<File>,
    idx_path: PathBuf,
    seq: u64,
    stored_bytes: u64,
}

/// A compressed chunk ready to be written.
#[derive(Debug)]
pub struct EncodedChunk {
    /// Where the content belongs on the disk.
    pub extents: Vec<Extent>,
    /// Content length.
    pub raw_len: u32,
    /// FLAG_* bits.
    pub flags: u32,
    /// Stored bytes.
    pub payload: Vec<u8>,
    /// crc32 of payload.
    pub payload_crc: u32,
    /// blake3 of content.
    pub content_hash: [u8; 32],
}

impl StreamWriter {
    /// Appends one chunk record.
    pub fn write_chunk(&mut self, chunk: &EncodedChunk) -> Result<()> {
        let header = ChunkHeader {
            stream: self.stream,
            flags: chunk.flags,
            seq: self.seq,
            extents: chunk.extents.clone(),
            raw_len: chunk.raw_len,
            stored_len: chunk.payload.len() as u32,
            payload_crc: chunk.payload_crc,
            content_hash: chunk.content_hash,
        };
        let (head, header_crc) = header.encode();
        let record_len = (head.len() + chunk.payload.len()) as u64;
        if self.file.is_some() && self.file_off + record_len > self.split_size {
            self.end_file()?;
        }
        if self.file.is_none() {
            // Files are numbered in the order they are made.
            let path = self.dir.join(format::data_file_name(&self.name, self.files.len() as u32));
            let f = File::create(&path).map_err(|e| Error::io("creating", &path, None, e))?;
            let appender = DirectWriter::new(f, direct::open_for_writing(&path), DATA_WRITE_BUF)
                .map_err(|e| Error::io("opening", &path, None, e))?;
            self.file = Some((appender, path));
            self.file_off = 0;
        }
        let (w, path) = self.file.as_mut().expect("file open");
        let at = self.file_off;
        w.append(&head).and_then(|()| w.append(&chunk.payload)).map_err(|e| append_error(path, e))?;
        let entry = IndexEntry {
            file: self.files.len() as u32,
            extent_count: chunk.extents.len() as u32,
            offset: at,
            raw_len: chunk.raw_len,
            stored_len: chunk.payload.len() as u32,
            header_crc,
            payload_crc: chunk.payload_crc,
            content_hash: chunk.content_hash,
        };
        self.idx.write_all(&entry.encode()).map_err(|e| Error::io("writing", &self.idx_path, None, e))?;
        self.file_off += record_len;
        self.seq += 1;
        self.stored_bytes += chunk.raw_len as u64;
        Ok(())
    }

    /// Finishes the data file being written, if any (written, flushed to
    /// stable storage): a later chunk starts the next one. The engine ends
    /// a stream's file when the next stream begins, so that only one
    /// stream's buffers are held at a time.
    pub fn end_file(&mut self) -> Result<()> {
        if let Some((w, path)) = self.file.take() {
            let (f, len) = w.finish().map_err(|e| append_error(&path, e))?;
            debug_assert_eq!(len, self.file_off);
            // Written data need not stay in the page cache (the tail, or all
            // of it where O_DIRECT was refused); a verify then reads the drive.
            let _ = nix::fcntl::posix_fadvise(&f, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            self.files.push(FileInfo { name, size: self.file_off, blake3: None });
        }
        Ok(())
    }

    /// Closes the stream's files and returns what the manifest records.
    pub fn finish(mut self) -> Result<StreamFiles> {
        self.end_file()?;
        let mut idx = self.idx.into_inner().map_err(|e| Error::io("writing", &self.idx_path, None, e.into_error()))?;
        idx.seek(SeekFrom::Start(0)).map_err(|e| Error::io("writing", &self.idx_path, None, e))?;
        idx.write_all_at(&format::encode_index_header(self.stream, self.seq), 0)
            .map_err(|e| Error::io("writing", &self.idx_path, Some(0), e))?;
        idx.sync_all().map_err(|e| Error::io("flushing", &self.idx_path, None, e))?;
        drop(idx);
        let bytes = std::fs::read(&self.idx_path).map_err(|e| Error::io("reading back", &self.idx_path, None, e))?;
        let index = FileInfo {
            name: format::index_file_name(&self.name),
            size: bytes.len() as u64,
            blake3: Some(blake3::hash(&bytes).to_hex().to_string()),
        };
        let compressed_bytes = self.files.iter().map(|f| f.size).sum();
        Ok(StreamFiles {
            index,
            data_files: self.files,
            chunks: self.seq,
            stored_bytes: self.stored_bytes,
            compressed_bytes,
        })
    }
}
