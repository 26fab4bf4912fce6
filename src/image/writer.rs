//! Writing an image: a directory built under a temporary name and made
//! final (fsync, rename) only when complete.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{self, ChunkHeader, Extent, INDEX_ENTRY_LEN, INDEX_HEADER_LEN, IndexEntry};
use super::manifest::{FileInfo, Manifest};
use crate::device::direct::{self, DirectWriter, IoBuf, WriteError};
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
        let idx = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&idx_path)
            .map_err(|e| Error::io("creating", &idx_path, None, e))?;
        idx.write_all_at(&format::encode_index_header(stream, 0), 0)
            .map_err(|e| Error::io("writing", &idx_path, Some(0), e))?;
        Ok(StreamWriter {
            dir: self.partial_dir.clone(),
            name: name.to_string(),
            stream,
            split_size: self.split_size,
            idx,
            idx_path,
            first: LaneFiles::new(0),
            second: None,
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

    /// Removes the unfinished image (after a failure or cancellation), and
    /// flushes its parent directory: until then the removal may exist only
    /// in memory, and a drive that failed would show the unfinished image
    /// again when plugged in anew.
    pub fn abandon(self) -> Result<()> {
        std::fs::remove_dir_all(&self.partial_dir)
            .map_err(|e| Error::io("removing the unfinished image", &self.partial_dir, None, e))?;
        let parent = self.partial_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        sync_dir(parent)
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

/// Which run of a stream's chunks a chunk belongs to.
///
/// A backup may read a stream's second half at the same time as its first
/// (see `engine::backup`). The image still holds one sequence of chunks in
/// disk order: the second lane's chunks are numbered from `first_seq`, the
/// number of chunks in the first lane, and its data files are numbered
/// after the first lane's when the stream is finished. So the image is laid
/// out exactly as if the stream had been written in one go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// From the stream's start.
    First,
    /// From chunk number `first_seq` to the stream's end.
    Second {
        /// Number of the lane's first chunk: how many chunks the first lane
        /// holds.
        first_seq: u64,
    },
}

/// One stream being written: chunk records into split data files, their
/// index entries into the index file.
#[derive(Debug)]
pub struct StreamWriter {
    dir: PathBuf,
    name: String,
    stream: u32,
    split_size: u64,
    idx: File,
    idx_path: PathBuf,
    first: LaneFiles,
    second: Option<LaneFiles>,
    stored_bytes: u64,
}

/// The data files of one lane of a stream.
#[derive(Debug)]
struct LaneFiles {
    /// Number of the lane's next chunk.
    next_seq: u64,
    /// Number of the lane's first chunk.
    first_seq: u64,
    /// The data file being written (past the page cache where the drive's
    /// filesystem allows: see [`DirectWriter`]) and its path.
    file: Option<(DirectWriter, PathBuf)>,
    file_off: u64,
    files: Vec<FileInfo>,
}

impl LaneFiles {
    fn new(first_seq: u64) -> LaneFiles {
        LaneFiles { next_seq: first_seq, first_seq, file: None, file_off: 0, files: Vec::new() }
    }

    /// Finishes the data file being written, if any.
    fn end_file(&mut self) -> Result<()> {
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
}

/// Name a data file of a stream's second lane has until the stream is
/// finished and its final number is known.
fn second_lane_file_name(stream: &str, n: u32) -> String {
    format!("{}.second-lane", format::data_file_name(stream, n))
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
    pub payload: IoBuf,
    /// crc32 of payload.
    pub payload_crc: u32,
    /// blake3 of content.
    pub content_hash: [u8; 32],
}

impl StreamWriter {
    /// Appends one chunk record to lane `lane` of the stream.
    pub fn write_chunk_in(&mut self, lane: Lane, chunk: &EncodedChunk) -> Result<()> {
        let lane_files = match lane {
            Lane::First => &mut self.first,
            Lane::Second { first_seq } => {
                let l = self.second.get_or_insert_with(|| LaneFiles::new(first_seq));
                if l.first_seq != first_seq {
                    return Err(Error::Corrupt(format!(
                        "the image being written is inconsistent (a bug in klon): stream {} got a second lane starting at chunk {first_seq} after one starting at {}",
                        self.name, l.first_seq
                    )));
                }
                l
            }
        };
        let seq = lane_files.next_seq;
        let header = ChunkHeader {
            stream: self.stream,
            flags: chunk.flags,
            seq,
            extents: chunk.extents.clone(),
            raw_len: chunk.raw_len,
            stored_len: chunk.payload.len() as u32,
            payload_crc: chunk.payload_crc,
            content_hash: chunk.content_hash,
        };
        let (head, header_crc) = header.encode();
        let record_len = (head.len() + chunk.payload.len()) as u64;
        if lane_files.file.is_some() && lane_files.file_off + record_len > self.split_size {
            lane_files.end_file()?;
        }
        if lane_files.file.is_none() {
            // Files are numbered in the order they are made (the second
            // lane's get their numbers when the stream is finished).
            let n = lane_files.files.len() as u32;
            let name = match lane {
                Lane::First => format::data_file_name(&self.name, n),
                Lane::Second { .. } => second_lane_file_name(&self.name, n),
            };
            let path = self.dir.join(name);
            let f = File::create(&path).map_err(|e| Error::io("creating", &path, None, e))?;
            let appender = DirectWriter::new(f, direct::open_for_writing(&path), DATA_WRITE_BUF)
                .map_err(|e| Error::io("opening", &path, None, e))?;
            lane_files.file = Some((appender, path));
            lane_files.file_off = 0;
        }
        let (w, path) = lane_files.file.as_mut().expect("file open");
        let at = lane_files.file_off;
        w.append(&head).and_then(|()| w.append(&chunk.payload)).map_err(|e| append_error(path, e))?;
        // The second lane's file numbers are made final in `finish`.
        let entry = IndexEntry {
            file: lane_files.files.len() as u32,
            extent_count: chunk.extents.len() as u32,
            offset: at,
            raw_len: chunk.raw_len,
            stored_len: chunk.payload.len() as u32,
            header_crc,
            payload_crc: chunk.payload_crc,
            content_hash: chunk.content_hash,
        };
        let entry_at = (INDEX_HEADER_LEN + INDEX_ENTRY_LEN * seq as usize) as u64;
        self.idx
            .write_all_at(&entry.encode(), entry_at)
            .map_err(|e| Error::io("writing", &self.idx_path, Some(entry_at), e))?;
        lane_files.file_off += record_len;
        lane_files.next_seq += 1;
        self.stored_bytes += chunk.raw_len as u64;
        Ok(())
    }

    /// Finishes the data files being written, if any (written, flushed to
    /// stable storage): a later chunk starts the next one. The engine ends
    /// a stream's files when the next stream begins, so that only one
    /// stream's buffers are held at a time.
    pub fn end_file(&mut self) -> Result<()> {
        self.first.end_file()?;
        if let Some(second) = &mut self.second {
            second.end_file()?;
        }
        Ok(())
    }

    /// Closes the stream's files and returns what the manifest records.
    /// A second lane's files are renamed to follow the first lane's, and
    /// its index entries point at them by those numbers.
    pub fn finish(mut self) -> Result<StreamFiles> {
        self.end_file()?;
        let mut files = std::mem::take(&mut self.first.files);
        let mut chunks = self.first.next_seq;
        let first_files = files.len() as u32;
        let mut renumber = None;
        if let Some(second) = self.second.take() {
            if second.first_seq != chunks {
                return Err(Error::Corrupt(format!(
                    "the image being written is inconsistent (a bug in klon): the first lane of stream {} holds {chunks} chunks, but the second starts at chunk {}",
                    self.name, second.first_seq
                )));
            }
            for (i, mut f) in second.files.into_iter().enumerate() {
                let from = self.dir.join(&f.name);
                let name = format::data_file_name(&self.name, first_files + i as u32);
                let to = self.dir.join(&name);
                std::fs::rename(&from, &to).map_err(|e| Error::io("renaming data file to", &to, None, e))?;
                f.name = name;
                files.push(f);
            }
            renumber = Some(second.first_seq..second.next_seq);
            chunks = second.next_seq;
        }
        let len = INDEX_HEADER_LEN + INDEX_ENTRY_LEN * chunks as usize;
        let mut bytes = vec![0u8; len];
        self.idx.read_exact_at(&mut bytes, 0).map_err(|e| Error::io("reading back", &self.idx_path, None, e))?;
        bytes[..INDEX_HEADER_LEN].copy_from_slice(&format::encode_index_header(self.stream, chunks));
        for seq in renumber.into_iter().flatten() {
            let at = INDEX_HEADER_LEN + INDEX_ENTRY_LEN * seq as usize;
            let file = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) + first_files;
            bytes[at..at + 4].copy_from_slice(&file.to_le_bytes());
        }
        self.idx.write_all_at(&bytes, 0).map_err(|e| Error::io("writing", &self.idx_path, Some(0), e))?;
        self.idx.set_len(len as u64).map_err(|e| Error::io("writing", &self.idx_path, None, e))?;
        self.idx.sync_all().map_err(|e| Error::io("flushing", &self.idx_path, None, e))?;
        let index = FileInfo {
            name: format::index_file_name(&self.name),
            size: bytes.len() as u64,
            blake3: Some(blake3::hash(&bytes).to_hex().to_string()),
        };
        let compressed_bytes = files.iter().map(|f| f.size).sum();
        Ok(StreamFiles { index, data_files: files, chunks, stored_bytes: self.stored_bytes, compressed_bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;
    use format::{CHUNK_HEADER_LEN, EXTENT_LEN};

    /// Chunk number `i`: 1000 bytes at disk offset i MiB, stored as is.
    fn chunk(i: u64) -> EncodedChunk {
        let payload: Vec<u8> = (0..1000u64).map(|b| (b * 7 + i * 13) as u8).collect();
        EncodedChunk {
            extents: vec![(i << 20, 1000)],
            raw_len: 1000,
            flags: 0,
            payload_crc: crc32fast::hash(&payload),
            content_hash: *blake3::hash(&payload).as_bytes(),
            payload: payload.into(),
        }
    }

    const RECORD: u64 = (CHUNK_HEADER_LEN + EXTENT_LEN + 1000) as u64;

    #[test]
    fn two_lanes_make_one_stream_in_disk_order() {
        let t = TempDir::new("lanes");
        // Two records a file: each lane is split into several files.
        let w = ImageWriter::create(&t.join("img"), 2 * RECORD + 10).unwrap();
        let mut s = w.stream(1, "p1").unwrap();
        let second = Lane::Second { first_seq: 5 };
        for i in 0..5 {
            s.write_chunk_in(Lane::First, &chunk(i)).unwrap();
            if i < 4 {
                s.write_chunk_in(second, &chunk(5 + i)).unwrap();
            }
        }
        let files = s.finish().unwrap();
        assert_eq!(files.chunks, 9);
        // Files numbered one after another: the first lane's three, then
        // the second lane's two; no lane names left behind.
        let names: Vec<&str> = files.data_files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["p1.000", "p1.001", "p1.002", "p1.003", "p1.004"]);
        let dir = w.partial_dir();
        let mut on_disk: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        on_disk.sort();
        assert_eq!(on_disk, ["p1.000", "p1.001", "p1.002", "p1.003", "p1.004", "p1.idx"]);
        // The index lists chunks 0..9 in disk order; each entry points at a
        // record with that sequence number and those extents, and the
        // records of each file follow each other from 0 to its end.
        let idx = std::fs::read(dir.join("p1.idx")).unwrap();
        assert_eq!(idx.len(), INDEX_HEADER_LEN + 9 * INDEX_ENTRY_LEN);
        assert_eq!(files.index.blake3.as_deref(), Some(blake3::hash(&idx).to_hex().as_str()));
        assert_eq!(format::decode_index_header(&idx, "test").unwrap(), (1, 9));
        let mut ends = vec![0u64; names.len()];
        for seq in 0..9u64 {
            let at = INDEX_HEADER_LEN + INDEX_ENTRY_LEN * seq as usize;
            let e = IndexEntry::decode(&idx[at..at + INDEX_ENTRY_LEN]);
            assert_eq!(e.offset, ends[e.file as usize], "chunk {seq}: records of a file must follow each other");
            let data = std::fs::read(dir.join(names[e.file as usize])).unwrap();
            let rec = &data[e.offset as usize..(e.offset + e.record_len()) as usize];
            let head_len = CHUNK_HEADER_LEN + EXTENT_LEN;
            let (h, crc) = ChunkHeader::decode(&rec[..head_len], "test").unwrap();
            assert_eq!((h.seq, h.extents.clone(), crc), (seq, chunk(seq).extents, e.header_crc));
            assert_eq!(&rec[head_len..], &chunk(seq).payload[..]);
            ends[e.file as usize] += e.record_len();
        }
        for (f, end) in files.data_files.iter().zip(&ends) {
            assert_eq!(f.size, *end, "{} holds more than its records", f.name);
            assert_eq!(std::fs::metadata(dir.join(&f.name)).unwrap().len(), *end);
        }
        w.abandon().unwrap();
    }

    #[test]
    fn lanes_that_do_not_meet_are_refused() {
        let t = TempDir::new("lanes-gap");
        let w = ImageWriter::create(&t.join("img"), 1 << 30).unwrap();
        // The first lane ends at chunk 2, the second starts at 3.
        let mut s = w.stream(0, "p1").unwrap();
        s.write_chunk_in(Lane::First, &chunk(0)).unwrap();
        s.write_chunk_in(Lane::Second { first_seq: 3 }, &chunk(3)).unwrap();
        s.write_chunk_in(Lane::First, &chunk(1)).unwrap();
        let e = s.finish().unwrap_err().to_string();
        assert!(e.contains("holds 2 chunks, but the second starts at chunk 3"), "{e}");
        // A second lane cannot move.
        let mut s = w.stream(1, "p2").unwrap();
        s.write_chunk_in(Lane::Second { first_seq: 1 }, &chunk(1)).unwrap();
        let e = s.write_chunk_in(Lane::Second { first_seq: 2 }, &chunk(2)).unwrap_err().to_string();
        assert!(e.contains("second lane starting at chunk 2 after one starting at 1"), "{e}");
        w.abandon().unwrap();
    }
}
