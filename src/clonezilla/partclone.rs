//! partclone's image formats 0001 and 0002, and raw (`dd-img`) streams.
//!
//! A partclone image is a header, a bitmap of the filesystem's blocks (used
//! or not), then the used blocks in increasing order with a checksum after
//! every `blocks_per_checksum` of them (and after the last, partial group).
//! All integers are little-endian.
//!
//! Format 0002 (partclone 0.3.0 and later), 110-byte header:
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0 | 16 | `"partclone-image\0"` |
//! | 16 | 14 | partclone version, text (`"0.3.23"`) |
//! | 30 | 4 | image version, text `"0002"` |
//! | 34 | 2 | endianness mark 0xC0DE (bytes `DE C0`) |
//! | 36 | 16 | filesystem, text (`"EXTFS"`, `"FAT16"`, ...) |
//! | 52 | 8 | device size in bytes |
//! | 60 | 8 | total blocks |
//! | 68 | 8 | used blocks (superblock's count) |
//! | 76 | 8 | used blocks (bitmap's count) |
//! | 84 | 4 | block size |
//! | 88 | 4 | feature size (18) |
//! | 92 | 2 | image version, binary (2) |
//! | 94 | 2 | CPU bits of the writer (32/64) |
//! | 96 | 2 | checksum mode: 0x00 none, 0x20 CRC32, 0x30 XXH64, 0x31 XXH128 |
//! | 98 | 2 | checksum size (0, 4, 8, 16) |
//! | 100 | 4 | blocks per checksum |
//! | 104 | 1 | reseed checksum after each one (1) or not (0) |
//! | 105 | 1 | bitmap mode: 0 none, 1 bits, 8 bytes |
//! | 106 | 4 | partclone-CRC32 of bytes 0..106 |
//!
//! The bitmap (mode 1) is ceil(total/8) bytes, block `i` at bit `i % 8` of
//! byte `i / 8`, followed by its partclone-CRC32. Bitmap mode 0 has no
//! bitmap (every block stored); mode 8 (bytes, as in 0001) is followed by
//! the partclone-CRC32 of the packed bit bitmap when partclone 0.3 writes it.
//!
//! Blocks: the used blocks in order; after every `blocks per checksum` of
//! them, and after the last (partial) group, the checksum of the group's
//! bytes: partclone-CRC32 (4 bytes LE, `-a1`), XXH64 with seed 0 (8 bytes,
//! the u64 LE, `-a2`) or XXH3-128 with seed 0 and the default secret (16
//! bytes: the low 64 bits LE, then the high 64 bits LE, partclone's
//! in-memory `XXH128_hash_t`; not xxhash's big-endian canonical form,
//! `-a3`). With reseed = 1 (the default) each group starts afresh (CRC
//! register 0xFFFFFFFF, new XXH state); with 0 (`-K`) the state runs on
//! across groups and each checksum is the digest of everything so far. The
//! default group is the copy buffer (`-z`, 1 MiB) / block size; ocs-sr
//! passes `-z 10485760`. Mode none: no checksums, blocks back to back. The
//! stream ends right after the last checksum. Clonezilla 5.15.18 and later
//! save with `-a3`; partclone writes XXH64 since 0.3.39 and XXH128 since
//! 0.3.46, when built with libxxhash (Debian's 0.3.23 has neither).
//!
//! Format 0001 (partclone before 0.3.0), 4160-byte header: magic (15),
//! filesystem (15), `"0001"` (4), padding (2), block size u32 at 36, device
//! size u64 at 40, total blocks u64 at 48, used blocks u64 at 56, 4096
//! unused bytes. Then one byte per block (1 = used) and `"BiTmAgIc"`, then
//! each used block followed by a 4-byte checksum (8 bytes in images of some
//! old 64-bit builds: the checksum then 4 more bytes).
//!
//! "partclone-CRC32" is the reflected CRC-32 (polynomial 0xEDB88320, seed
//! 0xFFFFFFFF) *without* the final inversion: the bitwise NOT of the usual
//! CRC-32. Format 0001's checksum is broken the historical way: each block
//! feeds its *first byte* `block_size` times into the register, and the
//! register runs on from block to block, never reseeded.
//!
//! partclone.dd (0.3) writes no header at all: a `dd-ptcl-img` is usually
//! the raw partition ([`open_stream`](super::open_stream) checks).

use std::io::Read;
use std::path::{Path, PathBuf};

use super::BlockSource;
use super::decompress::read_full;
use super::fat12_check::{self, Fat12Check, Step};
use super::pieces::PiecePos;
use crate::error::{Error, Result};
use crate::le::{le16, le32, le64};

/// The partclone image magic.
pub const MAGIC: &[u8; 15] = b"partclone-image";
const V1_HEADER: usize = 4160;
const V2_HEADER: usize = 110;
const BITMAP_MAGIC: &[u8; 8] = b"BiTmAgIc";
/// Largest block size accepted from a header.
const MAX_BLOCK_SIZE: u32 = 64 << 20;
/// Largest block count accepted (a 1 GiB bitmap: 32 TiB at 4 KiB blocks).
const MAX_BLOCKS: u64 = 1 << 33;
/// Chunk in which bitmaps are read (the bitmap grows only as data arrives,
/// so a lying header cannot make us allocate more than the file holds).
const BITMAP_CHUNK: usize = 1 << 20;

const CSM_NONE: u16 = 0x00;
const CSM_CRC32: u16 = 0x20;
const CSM_XXH64: u16 = 0x30;
const CSM_XXH128: u16 = 0x31;
/// The longest checksum (XXH128).
const MAX_SUM: usize = 16;

/// partclone's CRC32 register update: the reflected CRC-32 without final
/// inversion (`register` is the raw register, seeded with 0xFFFFFFFF).
pub fn partclone_crc32(register: u32, data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(!register);
    h.update(data);
    !h.finalize()
}

/// Which checksum follows each group of blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algo {
    None,
    Crc32,
    Xxh64,
    Xxh128,
    /// Format 0001's broken CRC32.
    Crc32V1,
}

impl Algo {
    fn name(self) -> &'static str {
        match self {
            Algo::None => "none",
            Algo::Crc32 => "CRC32",
            Algo::Xxh64 => "XXH64",
            Algo::Xxh128 => "XXH128",
            Algo::Crc32V1 => "CRC32 (format 0001)",
        }
    }
}

/// Running checksum state.
enum Sum {
    None,
    Crc(u32),
    Xxh(Box<xxhash_rust::xxh64::Xxh64>),
    Xxh128(Box<xxhash_rust::xxh3::Xxh3Default>),
}

impl Sum {
    fn new(algo: Algo) -> Sum {
        match algo {
            Algo::None => Sum::None,
            Algo::Crc32 | Algo::Crc32V1 => Sum::Crc(0xFFFF_FFFF),
            Algo::Xxh64 => Sum::Xxh(Box::new(xxhash_rust::xxh64::Xxh64::new(0))),
            Algo::Xxh128 => Sum::Xxh128(Box::new(xxhash_rust::xxh3::Xxh3Default::new())),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Sum::None => {}
            Sum::Crc(c) => *c = partclone_crc32(*c, data),
            Sum::Xxh(x) => x.update(data),
            Sum::Xxh128(x) => x.update(data),
        }
    }

    /// The checksum as partclone stores it: the bytes and how many count.
    /// The digests leave the state as it is (partclone's without reseed
    /// run on from it).
    fn value(&self) -> ([u8; MAX_SUM], usize) {
        let mut b = [0u8; MAX_SUM];
        match self {
            Sum::None => (b, 0),
            Sum::Crc(c) => {
                b[..4].copy_from_slice(&c.to_le_bytes());
                (b, 4)
            }
            Sum::Xxh(x) => {
                b[..8].copy_from_slice(&x.digest().to_le_bytes());
                (b, 8)
            }
            // u128 LE = the low half LE, then the high half LE.
            Sum::Xxh128(x) => (x.digest128().to_le_bytes(), 16),
        }
    }
}

/// The parsed header.
#[derive(Debug, Clone)]
struct Header {
    version: u16,
    ptc_version: String,
    fs: String,
    device_size: u64,
    total_blocks: u64,
    used_blocks: u64,
    block_size: u32,
    algo: Algo,
    sum_size: usize,
    blocks_per_sum: u64,
    reseed: bool,
    bitmap_mode: u8,
}

fn text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    printable(b[..end].trim_ascii())
}

/// `b` as text to show: printable ASCII as it is, every other byte escaped
/// (`\x1b`), so a damaged header cannot put control sequences or bytes
/// that are not text on the terminal.
fn printable(b: &[u8]) -> String {
    b.iter().flat_map(|&c| std::ascii::escape_default(c)).map(char::from).collect()
}

/// The decoded stream with its position, for error messages: the piece and
/// byte of the input, and the offset in the decompressed image.
struct Input {
    r: Box<dyn Read + Send>,
    pos: PiecePos,
    /// Offset in the decompressed stream.
    offset: u64,
    /// Bytes read ahead and given back (format 0001's stride detection).
    pending: Vec<u8>,
}

impl Input {
    fn at(&self) -> String {
        self.pos.at(self.offset)
    }

    fn corrupt(&self, msg: impl std::fmt::Display) -> Error {
        Error::Corrupt(format!("{}: {msg}", self.at()))
    }

    /// Reads as much of `buf` as the stream holds; returns the count.
    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<usize> {
        let mut done = 0;
        if !self.pending.is_empty() {
            let n = self.pending.len().min(buf.len());
            buf[..n].copy_from_slice(&self.pending[..n]);
            self.pending.drain(..n);
            done = n;
        }
        done += read_full(&mut self.r, &mut buf[done..], &self.pos, what)?;
        self.offset += done as u64;
        Ok(done)
    }

    /// Reads exactly `buf`; a short stream is `Corrupt`.
    fn exact(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        let n = self.fill(buf, what)?;
        if n < buf.len() {
            return Err(self.corrupt(format!("the image ends early: {what} needs {} bytes, {n} are left", buf.len())));
        }
        Ok(())
    }

    /// Gives `bytes` back: the next reads return them first.
    fn unread(&mut self, bytes: &[u8]) {
        let mut v = bytes.to_vec();
        v.extend_from_slice(&self.pending);
        self.pending = v;
        self.offset -= bytes.len() as u64;
    }

    /// Fails unless the stream has ended.
    fn expect_end(&mut self) -> Result<()> {
        let mut probe = [0u8; 64];
        let n = self.fill(&mut probe, "the end of the image")?;
        if n > 0 {
            self.offset -= n as u64;
            return Err(self.corrupt(format!(
                "unexpected data after the last block ({}{} bytes)",
                if n == probe.len() { "at least " } else { "" },
                n
            )));
        }
        Ok(())
    }
}

/// Reads a partclone image.
pub struct PartcloneReader {
    input: Input,
    file: PathBuf,
    h: Header,
    /// One bit per block, LSB first; bits past `total_blocks` are zero.
    /// Empty when the image has no bitmap (every block stored).
    bitmap: Vec<u8>,
    all_used: bool,
    /// Next block to look at.
    next_block: u64,
    /// Used blocks read so far.
    blocks_done: u64,
    /// Blocks in the current checksum group.
    in_group: u64,
    /// Offset in the decompressed stream of the current group's first block.
    group_start: u64,
    sum: Sum,
    /// Bytes stored per checksum (format 0001 can have 8 for 4).
    stride: usize,
    /// Format 0001: the checksum stride is not known yet.
    stride_unknown: bool,
    /// Scratch for format 0001's checksum (a block of one repeated byte).
    v1_scratch: Vec<u8>,
    finished: bool,
    /// A FAT12 image's FAT, compared with the bitmap as it passes (see
    /// [`fat12_check`]).
    fat12: Option<Fat12Check>,
}

impl PartcloneReader {
    /// Reads the header and bitmap from `r`; `pos` tells where `r` is in
    /// the image file's pieces (for errors).
    pub fn new(r: Box<dyn Read + Send>, pos: PiecePos) -> Result<PartcloneReader> {
        let file = pos.first().to_path_buf();
        let mut input = Input { r, pos, offset: 0, pending: Vec::new() };
        let h = read_header(&mut input)?;
        let bitmap = read_bitmap(&mut input, &h)?;
        let stride = h.sum_size;
        let sum = Sum::new(h.algo);
        let mut reader = PartcloneReader {
            input,
            file,
            all_used: h.bitmap_mode == 0,
            stride_unknown: h.version == 1,
            h,
            bitmap,
            next_block: 0,
            blocks_done: 0,
            in_group: 0,
            group_start: 0,
            sum,
            stride,
            v1_scratch: Vec::new(),
            finished: false,
            fat12: None,
        };
        if reader.h.fs == "FAT12" && !reader.all_used {
            reader.fat12 = Some(Fat12Check::default());
        }
        if reader.h.used_blocks == 0 {
            reader.finish()?;
        }
        Ok(reader)
    }

    /// The image file (first piece).
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Feeds a run to the FAT12 check; fails when the FAT marks clusters
    /// in use that the bitmap leaves out.
    fn check_fat12(&mut self, offset: u64, run: &[u8]) -> Result<()> {
        let Some(mut check) = self.fat12.take() else { return Ok(()) };
        let (bs, size) = (u64::from(self.h.block_size), self.h.device_size);
        match check.feed(offset, run, bs, size, |b| b < self.h.total_blocks && self.is_used(b)) {
            Step::More => self.fat12 = Some(check),
            Step::Done => {}
            Step::Incomplete(m) => {
                let by = if self.h.ptc_version.is_empty() {
                    "partclone".to_string()
                } else {
                    format!("partclone {}", self.h.ptc_version)
                };
                return Err(Error::Corrupt(format!(
                    "{}: this image of a FAT12 filesystem is incomplete: the FAT marks {} clusters in use, \
                     partclone's bitmap leaves out {} of them (clusters {}; {} bytes of files and directories), \
                     so they are not in the image. {by} reads FAT12 tables 16 bits per entry instead of 12 \
                     (partclone issue #268, fixed in 2025; Debian's 0.3.23 and 0.3.36 have it): any restore of \
                     this image, Clonezilla's too, leaves those files holding zeros. Save the filesystem again \
                     with a partclone that has the fix, or with `klon backup`; the image's other partitions \
                     restore one at a time with `klon restore --partition N`",
                    self.file.display(),
                    m.in_use,
                    m.left_out.len(),
                    fat12_check::ranges(&m.left_out, 8),
                    m.left_out.len() as u64 * m.cluster,
                )));
            }
        }
        Ok(())
    }

    fn is_used(&self, block: u64) -> bool {
        self.all_used || self.bitmap[(block / 8) as usize] >> (block % 8) & 1 == 1
    }

    /// The first used block at or after `from`, if any.
    fn next_used(&self, from: u64) -> Option<u64> {
        let total = self.h.total_blocks;
        if self.all_used {
            return (from < total).then_some(from);
        }
        let mut b = from;
        while b < total {
            if b.is_multiple_of(8) {
                // Skip whole zero bytes at once.
                let byte = (b / 8) as usize;
                let zeros = self.bitmap[byte..].iter().take_while(|&&x| x == 0).count();
                if zeros > 0 {
                    b += zeros as u64 * 8;
                    continue;
                }
            }
            if self.is_used(b) {
                return Some(b);
            }
            b += 1;
        }
        None
    }

    /// Reads `blocks` used blocks into `out` (appending), checking each
    /// checksum group as it completes.
    fn read_blocks(&mut self, out: &mut Vec<u8>, blocks: u64, part_offset: u64) -> Result<()> {
        let bs = self.h.block_size as usize;
        let mut left = blocks;
        while left > 0 {
            let group_left = if self.h.blocks_per_sum == 0 { left } else { self.h.blocks_per_sum - self.in_group };
            let n = left.min(group_left);
            if self.in_group == 0 {
                self.group_start = self.input.offset;
            }
            let start = out.len();
            out.resize(start + n as usize * bs, 0);
            let what = format!("{n} data blocks at partition offset {}", part_offset + (blocks - left) * bs as u64);
            self.input.exact(&mut out[start..], &what)?;
            let seg = &out[start..];
            match &mut self.sum {
                Sum::Crc(c) if self.h.algo == Algo::Crc32V1 => {
                    for block in seg.chunks_exact(bs) {
                        self.v1_scratch.clear();
                        self.v1_scratch.resize(bs, block[0]);
                        *c = partclone_crc32(*c, &self.v1_scratch);
                    }
                }
                sum => sum.update(seg),
            }
            self.in_group += n;
            self.blocks_done += n;
            left -= n;
            if self.h.blocks_per_sum > 0 && self.in_group == self.h.blocks_per_sum {
                let end = part_offset + (blocks - left) * bs as u64;
                self.check_sum(end)?;
            }
        }
        Ok(())
    }

    /// Reads the stored checksum of the current group and compares it;
    /// `end` is the partition offset just after the group (for messages).
    fn check_sum(&mut self, end: u64) -> Result<()> {
        let (want, len) = self.sum.value();
        let want = &want[..len];
        let mut got = [0u8; MAX_SUM];
        let got = &mut got[..self.stride];
        let stored_at = self.input.offset;
        self.input.exact(got, "a block checksum")?;
        if self.stride_unknown {
            self.detect_v1_stride(got)?;
        }
        if got[..len] != *want {
            // The position named first is the checksum's; the group's
            // blocks (one of which, or the checksum, is damaged) lie
            // between the second and it.
            return Err(Error::Corrupt(format!(
                "{}: {} checksum mismatch over the {} blocks stored from {} (partition data up to \
                 offset {end}; stored {}, computed {})",
                self.input.pos.at(stored_at),
                self.h.algo.name(),
                self.in_group,
                self.input.pos.offset_only(self.group_start),
                hex(&got[..len]),
                hex(want)
            )));
        }
        self.in_group = 0;
        if self.h.reseed {
            self.sum = Sum::new(self.h.algo);
        }
        Ok(())
    }

    /// Format 0001 images from some old 64-bit builds store each checksum
    /// in 8 bytes (the 4-byte value, then 4 more). Decided at the first
    /// checksum: with 4-byte checksums the next block follows at once; with
    /// 8 it follows 4 bytes later. The first layout whose next checksum
    /// verifies wins (or, with one used block, the one the stream's length
    /// fits).
    fn detect_v1_stride(&mut self, first: &[u8]) -> Result<()> {
        self.stride_unknown = false;
        let bs = self.h.block_size as usize;
        if self.blocks_done >= self.h.used_blocks {
            // One used block: 4 more bytes and then the end mean stride 8.
            let mut tail = [0u8; 5];
            let n = self.input.fill(&mut tail, "the end of the image")?;
            if n == 4 {
                self.stride = 8;
            } else {
                self.input.unread(&tail[..n]);
            }
            return Ok(());
        }
        // Look at the next block and checksum both ways.
        let mut ahead = vec![0u8; bs + 8];
        let n = self.input.fill(&mut ahead, "format 0001 block data")?;
        ahead.truncate(n);
        // The register runs on from the first block's checksum.
        let reg = match self.sum {
            Sum::Crc(c) => c,
            _ => u32::from_le_bytes(first[..4].try_into().unwrap_or_default()),
        };
        let fits = |skip: usize| -> bool {
            if ahead.len() < skip + bs + 4 {
                return false;
            }
            let first_byte = ahead[skip];
            let scratch = vec![first_byte; bs];
            let c = partclone_crc32(reg, &scratch);
            ahead[skip + bs..skip + bs + 4] == c.to_le_bytes()
        };
        if !fits(0) && fits(4) {
            self.stride = 8;
            self.input.unread(&ahead[4..]);
        } else {
            self.input.unread(&ahead);
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        if self.in_group > 0 && self.h.algo != Algo::None {
            let end = self.h.total_blocks * self.h.block_size as u64;
            self.check_sum(end)?;
        }
        self.input.expect_end()?;
        self.finished = true;
        Ok(())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn read_header(input: &mut Input) -> Result<Header> {
    let mut head = vec![0u8; 36];
    let n = input.fill(&mut head, "the partclone header")?;
    if n < head.len() || &head[..15] != MAGIC {
        return Err(input.corrupt("not a partclone image (no \"partclone-image\" magic at the start)"));
    }
    let h = match &head[30..34] {
        b"0001" => {
            head.resize(V1_HEADER, 0);
            input.exact(&mut head[36..], "the partclone 0001 header")?;
            let block_size = le32(&head, 36);
            let total_blocks = le64(&head, 48);
            Header {
                version: 1,
                ptc_version: String::new(),
                fs: text(&head[15..30]),
                // partclone itself takes total × block size as the size.
                device_size: total_blocks.saturating_mul(block_size as u64),
                total_blocks,
                used_blocks: le64(&head, 56),
                block_size,
                algo: Algo::Crc32V1,
                sum_size: 4,
                blocks_per_sum: 1,
                reseed: false,
                bitmap_mode: 8,
            }
        }
        b"0002" => {
            head.resize(V2_HEADER, 0);
            input.exact(&mut head[36..], "the partclone 0002 header")?;
            let stored = le32(&head, 106);
            let crc = partclone_crc32(0xFFFF_FFFF, &head[..106]);
            if stored != crc {
                return Err(input.corrupt(format!(
                    "the partclone header is damaged (header CRC32 {stored:08x}, computed {crc:08x})"
                )));
            }
            if le16(&head, 34) != 0xC0DE {
                return Err(Error::Unsupported(format!(
                    "{}: partclone image written on a big-endian machine",
                    input.pos.first().display()
                )));
            }
            let (feature_size, image_version) = (le32(&head, 88), le16(&head, 92));
            if feature_size != 18 || image_version != 2 {
                return Err(input.corrupt(format!(
                    "unknown partclone 0002 options (feature size {feature_size}, version {image_version})"
                )));
            }
            let mode = le16(&head, 96);
            let algo = match mode {
                CSM_NONE => Algo::None,
                CSM_CRC32 => Algo::Crc32,
                CSM_XXH64 => Algo::Xxh64,
                CSM_XXH128 => Algo::Xxh128,
                m => {
                    return Err(Error::Unsupported(format!(
                        "{}: partclone checksum mode {m:#x} is not known (0x00 none, 0x20 CRC32, 0x30 XXH64, \
                         0x31 XXH128 are): the image may come from a newer partclone; klon cannot check or \
                         restore it",
                        input.pos.first().display()
                    )));
                }
            };
            let sum_size = le16(&head, 98) as usize;
            let blocks_per_sum = le32(&head, 100) as u64;
            let expected_size = match algo {
                Algo::None => 0,
                Algo::Crc32 | Algo::Crc32V1 => 4,
                Algo::Xxh64 => 8,
                Algo::Xxh128 => 16,
            };
            if sum_size != expected_size || (algo != Algo::None && blocks_per_sum == 0) || head[104] > 1 {
                return Err(input.corrupt(format!(
                    "inconsistent partclone checksum options ({} with {sum_size}-byte checksums every \
                     {blocks_per_sum} blocks, reseed {})",
                    algo.name(),
                    head[104]
                )));
            }
            let used_sb = le64(&head, 68);
            let used_bitmap = le64(&head, 76);
            Header {
                version: 2,
                ptc_version: text(&head[16..30]),
                fs: text(&head[36..52]),
                device_size: le64(&head, 52),
                total_blocks: le64(&head, 60),
                // The bitmap's count (what the data follows) is checked
                // against the bitmap; the superblock's count may differ
                // (partclone.restore ignores it), and stands in only when
                // the bitmap's count is 0 (not written).
                used_blocks: if used_bitmap != 0 { used_bitmap } else { used_sb },
                block_size: le32(&head, 84),
                algo,
                sum_size,
                blocks_per_sum: if algo == Algo::None { 0 } else { blocks_per_sum },
                reseed: head[104] == 1,
                bitmap_mode: head[105],
            }
        }
        v => {
            return Err(Error::Unsupported(format!(
                "{}: partclone image version \"{}\" is not known (0001 and 0002 are)",
                input.pos.first().display(),
                printable(v)
            )));
        }
    };
    // Geometry, before anything is sized by it.
    if h.block_size == 0 || h.block_size > MAX_BLOCK_SIZE {
        return Err(input.corrupt(format!("implausible block size {} in the partclone header", h.block_size)));
    }
    if h.total_blocks == 0 || h.total_blocks > MAX_BLOCKS {
        return Err(input.corrupt(format!("implausible block count {} in the partclone header", h.total_blocks)));
    }
    if h.used_blocks > h.total_blocks {
        return Err(
            input.corrupt(format!("the partclone header says {} of {} blocks are used", h.used_blocks, h.total_blocks))
        );
    }
    let fs_bytes = h.total_blocks * h.block_size as u64; // both bounded: no overflow
    if h.version == 2 && fs_bytes > h.device_size {
        return Err(input.corrupt(format!(
            "the partclone header's {} blocks of {} bytes exceed its device size {}",
            h.total_blocks, h.block_size, h.device_size
        )));
    }
    if !matches!(h.bitmap_mode, 0 | 1 | 8) {
        return Err(input.corrupt(format!("unknown partclone bitmap mode {}", h.bitmap_mode)));
    }
    Ok(h)
}

/// Reads the bitmap (any mode) into one bit per block and checks it.
fn read_bitmap(input: &mut Input, h: &Header) -> Result<Vec<u8>> {
    let total = h.total_blocks;
    let bits_len = total.div_ceil(8) as usize; // total ≤ 2^33: fits
    let mut bitmap: Vec<u8> = Vec::new();
    match h.bitmap_mode {
        0 => {
            // No bitmap: every block is stored (nothing to allocate).
            if h.used_blocks != total {
                return Err(input.corrupt(format!(
                    "a partclone image without bitmap must store all {total} blocks, its header says {}",
                    h.used_blocks
                )));
            }
            return Ok(Vec::new());
        }
        1 => {
            let mut crc = 0xFFFF_FFFFu32;
            while bitmap.len() < bits_len {
                let n = (bits_len - bitmap.len()).min(BITMAP_CHUNK);
                let start = bitmap.len();
                bitmap.resize(start + n, 0);
                input.exact(&mut bitmap[start..], "the partclone bitmap")?;
                crc = partclone_crc32(crc, &bitmap[start..]);
            }
            let mut stored = [0u8; 4];
            input.exact(&mut stored, "the partclone bitmap's CRC32")?;
            if u32::from_le_bytes(stored) != crc {
                return Err(input.corrupt(format!(
                    "the partclone bitmap is damaged (bitmap CRC32 {:08x}, computed {crc:08x})",
                    u32::from_le_bytes(stored)
                )));
            }
        }
        _ => {
            // One byte per block (format 0001, or 0002 in byte mode): 1 is
            // used, anything else is not (as partclone reads it).
            bitmap.reserve(bits_len.min(BITMAP_CHUNK));
            let mut chunk = vec![0u8; (total.min(BITMAP_CHUNK as u64 * 8)) as usize];
            let mut done = 0u64;
            while done < total {
                let n = ((total - done) as usize).min(chunk.len());
                input.exact(&mut chunk[..n], "the partclone byte bitmap")?;
                // `done` is a multiple of 8 until the last chunk.
                for eight in chunk[..n].chunks(8) {
                    let mut byte = 0u8;
                    for (i, &v) in eight.iter().enumerate() {
                        byte |= u8::from(v == 1) << i;
                    }
                    bitmap.push(byte);
                }
                done += n as u64;
            }
            if h.version == 1 {
                let mut magic = [0u8; 8];
                input.exact(&mut magic, "the bitmap magic")?;
                if &magic != BITMAP_MAGIC {
                    return Err(input.corrupt("the partclone bitmap is damaged (no \"BiTmAgIc\" after it)"));
                }
            } else {
                // partclone 0.3 writes the CRC32 of the bit bitmap here.
                let mut stored = [0u8; 4];
                input.exact(&mut stored, "the partclone bitmap's CRC32")?;
                let crc = partclone_crc32(0xFFFF_FFFF, &bitmap);
                if u32::from_le_bytes(stored) != crc {
                    return Err(input.corrupt("the partclone bitmap is damaged (bitmap CRC32 mismatch)"));
                }
            }
        }
    }
    // Bits past the last block mean nothing: clear them.
    if let Some(last) = bitmap.last_mut().filter(|_| !total.is_multiple_of(8)) {
        *last &= (1u8 << (total % 8)) - 1;
    }
    let used: u64 = bitmap.iter().map(|b| b.count_ones() as u64).sum();
    if used != h.used_blocks {
        return Err(
            input.corrupt(format!("the partclone bitmap marks {used} blocks used, its header says {}", h.used_blocks))
        );
    }
    Ok(bitmap)
}

impl BlockSource for PartcloneReader {
    /// Yields at least one whole block even when `max_len` is smaller.
    fn next_run(&mut self, max_len: usize) -> Result<Option<(u64, Vec<u8>)>> {
        if self.finished {
            return Ok(None);
        }
        let bs = self.h.block_size as u64;
        let Some(first) = self.next_used(self.next_block) else {
            // The bitmap is exhausted: the header's count matched it, so
            // every used block has been read.
            self.finish()?;
            return Ok(None);
        };
        let max_blocks = (max_len as u64 / bs).max(1);
        let mut n = 1;
        if self.all_used {
            n = max_blocks.min(self.h.total_blocks - first);
        }
        while n < max_blocks && first + n < self.h.total_blocks && self.is_used(first + n) {
            let b = first + n;
            if b.is_multiple_of(8)
                && n + 8 <= max_blocks
                && b + 8 <= self.h.total_blocks
                && self.bitmap[(b / 8) as usize] == 0xFF
            {
                n += 8;
            } else {
                n += 1;
            }
        }
        let mut out = Vec::with_capacity((n * bs) as usize);
        self.read_blocks(&mut out, n, first * bs)?;
        self.check_fat12(first * bs, &out)?;
        self.next_block = first + n;
        if self.blocks_done == self.h.used_blocks {
            self.finish()?;
        }
        Ok(Some((first * bs, out)))
    }

    fn stored_bytes(&self) -> u64 {
        self.h.used_blocks * self.h.block_size as u64
    }

    fn device_size(&self) -> u64 {
        self.h.device_size
    }

    fn block_size(&self) -> u32 {
        self.h.block_size
    }

    fn describe(&self) -> String {
        let by = if self.h.version == 2 && !self.h.ptc_version.is_empty() {
            format!(" (partclone {})", self.h.ptc_version)
        } else {
            String::new()
        };
        let sums = match self.h.algo {
            Algo::None => "no checksums".to_string(),
            a => format!("{} every {} blocks", a.name(), self.h.blocks_per_sum),
        };
        format!(
            "partclone {:04}{by}, {}, {}-byte blocks, {} of {} used, {sums}",
            self.h.version, self.h.fs, self.h.block_size, self.h.used_blocks, self.h.total_blocks
        )
    }
}

/// Reads every byte of a partition, in order.
pub struct RawReader {
    input: Input,
    size: u64,
    done: u64,
    finished: bool,
}

impl RawReader {
    /// `size` bytes from `r`; `pos` tells where `r` is (for errors).
    pub fn new(r: Box<dyn Read + Send>, pos: PiecePos, size: u64) -> RawReader {
        RawReader { input: Input { r, pos, offset: 0, pending: Vec::new() }, size, done: 0, finished: false }
    }
}

impl BlockSource for RawReader {
    fn next_run(&mut self, max_len: usize) -> Result<Option<(u64, Vec<u8>)>> {
        if self.finished {
            return Ok(None);
        }
        let n = (self.size - self.done).min(max_len.max(1) as u64) as usize;
        if n == 0 {
            self.input.expect_end()?;
            self.finished = true;
            return Ok(None);
        }
        let mut out = vec![0u8; n];
        let got = self.input.fill(&mut out, "raw partition data")?;
        if got < n {
            return Err(self.input.corrupt(format!(
                "the raw image ends early: {} of the partition's {} bytes are there",
                self.done + got as u64,
                self.size
            )));
        }
        let at = self.done;
        self.done += n as u64;
        Ok(Some((at, out)))
    }

    fn stored_bytes(&self) -> u64 {
        self.size
    }

    fn device_size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        1
    }

    fn describe(&self) -> String {
        format!("raw image of {} bytes", self.size)
    }
}

#[cfg(test)]
pub(crate) mod tests;
