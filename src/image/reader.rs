//! Reading an image: the manifest, each stream's index and its chunk
//! records, with every structural check made before data is trusted.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{self, ChunkHeader, FLAG_ZSTD, INDEX_ENTRY_LEN, INDEX_HEADER_LEN, IndexEntry, MAX_RECORD_LEN};
use super::manifest::{MANIFEST_NAME, Manifest, StreamInfo};
use super::writer::{PARTIAL_SUFFIX, partial_dir_for};
use crate::device::direct::{BufPool, IoBuf};
use crate::error::{Error, Result};

/// An image opened for reading.
#[derive(Debug)]
pub struct ImageReader {
    /// The image directory.
    pub dir: PathBuf,
    /// Its checked manifest.
    pub manifest: Manifest,
    /// Buffers for records and their content, reused.
    bufs: BufPool,
}

/// Record and content buffers an [`ImageReader`] keeps for reuse: enough for
/// every chunk in flight with 8 workers.
const BUFS_KEPT: usize = 24;

/// A chunk record read from a data file, not yet checked beyond its header.
#[derive(Debug)]
pub struct StoredChunk {
    /// Index of its stream in the manifest.
    pub stream: usize,
    /// Its decoded header.
    pub header: ChunkHeader,
    /// The whole record as read; the payload is `record[payload_at..]`.
    record: IoBuf,
    payload_at: usize,
    /// Where the content's buffer comes from.
    bufs: BufPool,
    /// Where it was read from, for messages.
    pub location: String,
    /// For a chunk its store makes when decoded (a repository's delta,
    /// from its chain of bases): how, on the worker that decodes it.
    make: Option<Make>,
}

/// Makes a chunk's content, checked against its blake3, into the buffer
/// it is handed (of exactly the chunk's length: a pooled one, so that no
/// chunk lands in memory fresh from the system).
pub type MakeContent = Box<dyn FnOnce(&mut [u8]) -> Result<()> + Send>;

struct Make(MakeContent);

impl std::fmt::Debug for Make {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("(made when decoded)")
    }
}

impl StoredChunk {
    /// A chunk read by a store other than an image's data files: `header`
    /// says what it holds, `record[payload_at..]` is its stored payload,
    /// whose buffer came from `bufs`.
    pub fn new(
        stream: usize,
        header: ChunkHeader,
        record: IoBuf,
        payload_at: usize,
        bufs: BufPool,
        location: String,
    ) -> StoredChunk {
        StoredChunk { stream, header, record, payload_at, bufs, location, make: None }
    }

    /// A chunk whose content `make` makes, checked against its blake3,
    /// when it is decoded (on a worker): `header` says what it holds.
    pub fn made(stream: usize, header: ChunkHeader, make: MakeContent, bufs: BufPool, location: String) -> StoredChunk {
        StoredChunk {
            stream,
            header,
            record: IoBuf::from(Vec::new()),
            payload_at: 0,
            bufs,
            location,
            make: Some(Make(make)),
        }
    }

    /// The stored payload.
    pub fn payload(&self) -> &[u8] {
        &self.record[self.payload_at..]
    }

    /// The whole record as stored (header and payload): what an image's
    /// data file holds for it.
    pub fn record(&self) -> &[u8] {
        &self.record
    }

    /// Checks the payload crc32, decompresses, checks the content blake3,
    /// and returns the content.
    pub fn decode(mut self) -> Result<IoBuf> {
        if let Some(make) = self.make.take() {
            // The header said raw_len <= CHUNK_SIZE: the pool's buffers
            // hold it.
            let mut out = self.bufs.take(self.header.raw_len as usize);
            (make.0)(&mut out)?;
            return Ok(out);
        }
        let h = &self.header;
        if crc32fast::hash(self.payload()) != h.payload_crc {
            return Err(Error::Corrupt(format!("{}: stored data checksum (crc32) does not match", self.location)));
        }
        let content = if h.flags & FLAG_ZSTD != 0 {
            // The header said raw_len <= CHUNK_SIZE: the pool's buffers hold it.
            let mut out = self.bufs.take(h.raw_len as usize);
            let n = DECOMPRESSOR
                .with(|d| {
                    let mut d = d.borrow_mut();
                    if d.is_none() {
                        *d = Some(zstd::bulk::Decompressor::new()?);
                    }
                    d.as_mut().expect("created above").decompress_to_buffer(self.payload(), &mut out[..])
                })
                .map_err(|e| Error::Corrupt(format!("{}: data does not decompress: {e}", self.location)))?;
            if n != out.len() {
                return Err(Error::Corrupt(format!("{}: data decompresses to the wrong length", self.location)));
            }
            out
        } else {
            let mut record = self.record;
            record.skip_front(self.payload_at);
            record
        };
        if content.len() != h.raw_len as usize {
            return Err(Error::Corrupt(format!("{}: data decompresses to the wrong length", self.location)));
        }
        if blake3::hash(&content).as_bytes() != &h.content_hash {
            return Err(Error::Corrupt(format!("{}: content checksum (blake3) does not match", self.location)));
        }
        Ok(content)
    }
}

thread_local! {
    /// One zstd decompression context per worker thread, reused.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

impl ImageReader {
    /// Opens the image at `dir`: recognises unfinished backups, checks the
    /// manifest's checksum and version, and that every file it lists is
    /// present with its recorded size.
    pub fn open(dir: &Path) -> Result<ImageReader> {
        let is_partial = dir.to_string_lossy().trim_end_matches('/').ends_with(PARTIAL_SUFFIX);
        // Only a name that is not there is missing; any other failure to
        // look (a permission) is an I/O error, not a missing image.
        let dir_meta = match std::fs::metadata(dir) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let partial = partial_dir_for(dir);
                if partial.exists() {
                    return Err(Error::Corrupt(format!(
                        "{} does not exist, but {} does: that backup did not finish and is not a usable image",
                        dir.display(),
                        partial.display()
                    )));
                }
                return Err(Error::Usage(format!("no image at {}: the directory does not exist", dir.display())));
            }
            Err(e) => return Err(Error::io("opening the image directory", dir, None, e)),
        };
        if !dir_meta.is_dir() {
            return Err(Error::Usage(format!("{} is not an image directory", dir.display())));
        }
        if is_partial {
            return Err(Error::Corrupt(format!(
                "{} is an unfinished backup (it was interrupted or failed); it cannot be verified or restored",
                dir.display()
            )));
        }
        match std::fs::metadata(dir.join(MANIFEST_NAME)) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // An encrypted directory (Clonezilla's -enc, or any gocryptfs
                // or eCryptfs store) hides what it holds: say what it is.
                if dir.join("gocryptfs.conf").is_file() {
                    return Err(Error::Unsupported(format!(
                        "{} is a directory encrypted with gocryptfs (it has gocryptfs.conf); klon cannot open it \
                         without its key: mount it with gocryptfs (gocryptfs {} /some/dir) and give klon the \
                         image in the mounted directory",
                        dir.display(),
                        dir.display()
                    )));
                }
                return Err(Error::Corrupt(format!(
                    "{} has no {MANIFEST_NAME}: it is not a klon image ({}), or its manifest was deleted",
                    dir.display(),
                    crate::clonezilla::layout::not_clonezilla_because(dir)
                )));
            }
            Err(e) => return Err(Error::io("opening the image directory", dir, None, e)),
        }
        let manifest = Manifest::load(dir)?;
        let reader = ImageReader { dir: dir.to_path_buf(), manifest, bufs: BufPool::new(BUFS_KEPT, MAX_RECORD_LEN) };
        reader.check_files()?;
        Ok(reader)
    }

    /// Opens the manifest of the image at `dir` whose data files are not
    /// there (an image received as a stream, its chunk records arriving
    /// one after another: see [`ImageReader::record_from`]).
    pub fn open_without_data(dir: &Path) -> Result<ImageReader> {
        let manifest = Manifest::load(dir)?;
        Ok(ImageReader { dir: dir.to_path_buf(), manifest, bufs: BufPool::new(BUFS_KEPT, MAX_RECORD_LEN) })
    }

    /// The chunk record `seq` of stream `stream` (index entry `e`) read by
    /// `read` from somewhere other than its data file (a stream), checked
    /// as [`ImageReader::read_chunk`] checks one: `read` fills the buffer
    /// it is given with the record's bytes.
    pub fn record_from(
        &self,
        stream: usize,
        seq: u64,
        e: &IndexEntry,
        from: &str,
        read: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<StoredChunk> {
        let s = &self.manifest.streams[stream];
        let location = format!("{from} ({}, chunk {seq})", describe_stream(s));
        let len = e.record_len();
        if !self.bufs.fits(len as usize) {
            return Err(Error::Corrupt(format!(
                "{location}: the index gives a chunk record longer than any klon writes"
            )));
        }
        let mut buf = self.bufs.take(len as usize);
        read(&mut buf)?;
        let payload_at = (len - e.stored_len as u64) as usize;
        let (header, header_crc) = ChunkHeader::decode(&buf[..payload_at], &location)?;
        check_header_matches(&header, header_crc, e, stream, seq, s, &location)?;
        Ok(StoredChunk { stream, header, record: buf, payload_at, location, bufs: self.bufs.clone(), make: None })
    }

    fn check_files(&self) -> Result<()> {
        for s in &self.manifest.streams {
            for f in s.data_files.iter().chain(std::iter::once(&s.index)) {
                let path = self.dir.join(&f.name);
                match std::fs::metadata(&path) {
                    Ok(m) if m.len() == f.size => {}
                    Ok(m) => {
                        return Err(Error::Corrupt(format!(
                            "{}: is {} bytes, the manifest says {} (truncated or damaged); stream {}",
                            path.display(),
                            m.len(),
                            f.size,
                            s.name
                        )));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(Error::Corrupt(format!("{}: file is missing (stream {})", path.display(), s.name)));
                    }
                    Err(e) => return Err(Error::io("inspecting", &path, None, e)),
                }
            }
        }
        Ok(())
    }

    /// Reads stream `stream`'s index, checks its blake3 against the
    /// manifest, and checks that its entries tile the data files exactly.
    pub fn index(&self, stream: usize) -> Result<Vec<IndexEntry>> {
        let s = &self.manifest.streams[stream];
        let path = self.dir.join(&s.index.name);
        let bytes = std::fs::read(&path).map_err(|e| Error::io("reading", &path, None, e))?;
        let hash = blake3::hash(&bytes).to_hex().to_string();
        if s.index.blake3.as_deref() != Some(hash.as_str()) {
            return Err(Error::Corrupt(format!(
                "{}: index checksum (blake3) does not match the manifest",
                path.display()
            )));
        }
        let where_ = path.display().to_string();
        let (num, count) = format::decode_index_header(&bytes, &where_)?;
        if num as usize != stream || count != s.chunks {
            return Err(Error::Corrupt(format!("{where_}: index does not belong to stream {}", s.name)));
        }
        if (bytes.len() - INDEX_HEADER_LEN) as u64 != count * INDEX_ENTRY_LEN as u64 {
            return Err(Error::Corrupt(format!("{where_}: index length does not match its entry count")));
        }
        let entries: Vec<IndexEntry> =
            bytes[INDEX_HEADER_LEN..].chunks_exact(INDEX_ENTRY_LEN).map(IndexEntry::decode).collect();
        // The records must follow each other without gaps and fill every data file exactly.
        let mut expect_file = 0u32;
        let mut expect_off = 0u64;
        for (i, e) in entries.iter().enumerate() {
            let current_size = s.data_files.get(expect_file as usize).map(|f| f.size);
            if e.file == expect_file + 1 && current_size == Some(expect_off) {
                expect_file += 1;
                expect_off = 0;
            }
            if e.file != expect_file || e.offset != expect_off || e.file as usize >= s.data_files.len() {
                return Err(Error::Corrupt(format!("{where_}: entry {i} does not follow the previous chunk record")));
            }
            expect_off += e.record_len();
        }
        let files_used = if entries.is_empty() { 0 } else { expect_file as usize + 1 };
        if files_used != s.data_files.len() || (files_used > 0 && expect_off != s.data_files[files_used - 1].size) {
            return Err(Error::Corrupt(format!(
                "{where_}: the data files of stream {} hold more or less than their chunks",
                s.name
            )));
        }
        Ok(entries)
    }

    /// Reads and checks every stream's index (see [`ImageReader::index`]),
    /// and that its entries agree with the manifest: each chunk holds 1 to
    /// `chunk_size` bytes in a record no longer than klon writes, and
    /// together they hold the stream's stored bytes. Restore does this
    /// before it writes anything, verify before it reads any data: every
    /// check that does not need the data comes first.
    pub fn indexes(&self) -> Result<Vec<Vec<IndexEntry>>> {
        let chunk_size = u64::from(self.manifest.chunk_size);
        (0..self.manifest.streams.len())
            .map(|si| {
                let s = &self.manifest.streams[si];
                let entries = self.index(si)?;
                let path = self.dir.join(&s.index.name);
                let mut sum = 0u64;
                for (i, e) in entries.iter().enumerate() {
                    let raw = u64::from(e.raw_len);
                    if e.record_len() > MAX_RECORD_LEN as u64 {
                        return Err(Error::Corrupt(format!(
                            "{}: entry {i} gives a chunk record longer than any klon writes ({} bytes)",
                            path.display(),
                            e.record_len()
                        )));
                    }
                    if raw == 0 || raw > chunk_size {
                        return Err(Error::Corrupt(format!(
                            "{}: entry {i} gives a chunk of {raw} bytes; chunks hold 1 to {chunk_size}",
                            path.display()
                        )));
                    }
                    sum += raw;
                }
                if sum != s.stored_bytes {
                    return Err(Error::Corrupt(format!(
                        "{}: the chunks of stream {} hold {sum} bytes, the manifest says {}",
                        path.display(),
                        s.name,
                        s.stored_bytes
                    )));
                }
                Ok(entries)
            })
            .collect()
    }

    /// Reads every chunk record of stream `stream`, in order, handing each
    /// to `each`. Stops at the first error, or when `each` returns false.
    pub fn for_each_chunk(
        &self,
        stream: usize,
        entries: &[IndexEntry],
        mut each: impl FnMut(StoredChunk) -> Result<bool>,
    ) -> Result<()> {
        let mut open: Option<(u32, File)> = None;
        for (seq, e) in entries.iter().enumerate() {
            if open.as_ref().is_none_or(|o| o.0 != e.file) {
                let f = self.open_data_file(stream, e.file)?;
                let _ = nix::fcntl::posix_fadvise(&f, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL);
                open = Some((e.file, f));
            }
            let (_, f) = open.as_ref().expect("opened above");
            let chunk = self.read_record(stream, seq as u64, e, f, true)?;
            if !each(chunk)? {
                break;
            }
        }
        Ok(())
    }

    /// Reads one whole chunk record (header and payload).
    pub fn read_chunk(&self, stream: usize, seq: u64, e: &IndexEntry) -> Result<StoredChunk> {
        let f = self.open_data_file(stream, e.file)?;
        self.read_record(stream, seq, e, &f, true)
    }

    /// Reads only the header of the chunk `e` points at (for read-back).
    pub fn read_header(&self, stream: usize, seq: u64, e: &IndexEntry) -> Result<ChunkHeader> {
        let f = self.open_data_file(stream, e.file)?;
        Ok(self.read_record(stream, seq, e, &f, false)?.header)
    }

    fn data_path(&self, stream: usize, file: u32) -> PathBuf {
        self.dir.join(&self.manifest.streams[stream].data_files[file as usize].name)
    }

    fn open_data_file(&self, stream: usize, file: u32) -> Result<File> {
        let path = self.data_path(stream, file);
        File::open(&path).map_err(|err| Error::io("opening", &path, None, err))
    }

    fn read_record(
        &self,
        stream: usize,
        seq: u64,
        e: &IndexEntry,
        f: &File,
        with_payload: bool,
    ) -> Result<StoredChunk> {
        let s = &self.manifest.streams[stream];
        let path = self.data_path(stream, e.file);
        let location = format!("{} at offset {} ({}, chunk {seq})", path.display(), e.offset, describe_stream(s));
        let header_len = e.record_len() - e.stored_len as u64;
        let len = if with_payload { e.record_len() } else { header_len };
        if !self.bufs.fits(len as usize) {
            return Err(Error::Corrupt(format!(
                "{location}: the index gives a chunk record longer than any klon writes"
            )));
        }
        let mut buf = self.bufs.take(len as usize);
        f.read_exact_at(&mut buf, e.offset).map_err(|err| Error::io("reading", &path, Some(e.offset), err))?;
        let payload_at = header_len as usize;
        let (header, header_crc) = ChunkHeader::decode(&buf[..payload_at], &location)?;
        check_header_matches(&header, header_crc, e, stream, seq, s, &location)?;
        Ok(StoredChunk { stream, header, record: buf, payload_at, location, bufs: self.bufs.clone(), make: None })
    }
}

/// "partition 2", "area outside partitions", "whole disk": for messages.
pub fn describe_stream(s: &StreamInfo) -> String {
    use super::manifest::StreamKind;
    match (s.kind, s.partition) {
        (StreamKind::Partition, Some(n)) => format!("partition {n}"),
        (StreamKind::Boot, _) => "area outside partitions".to_string(),
        (StreamKind::Rescued, _) => "sectors recovered after read errors".to_string(),
        _ => "whole disk".to_string(),
    }
}

fn check_header_matches(
    h: &ChunkHeader,
    header_crc: u32,
    e: &IndexEntry,
    stream: usize,
    seq: u64,
    s: &StreamInfo,
    location: &str,
) -> Result<()> {
    let agrees = header_crc == e.header_crc
        && h.stream as usize == stream
        && h.seq == seq
        && h.raw_len == e.raw_len
        && h.stored_len == e.stored_len
        && h.payload_crc == e.payload_crc
        && h.content_hash == e.content_hash
        && h.extents.len() as u32 == e.extent_count;
    if !agrees {
        return Err(Error::Corrupt(format!("{location}: chunk header does not match the index")));
    }
    let end = s.start + s.length;
    let first = h.extents.first().map(|x| x.0).unwrap_or(0);
    let last_end = h.extents.last().map(|x| x.0 + x.1).unwrap_or(0);
    if first < s.start || last_end > end {
        return Err(Error::Corrupt(format!("{location}: chunk points outside its stream's part of the disk")));
    }
    Ok(())
}
