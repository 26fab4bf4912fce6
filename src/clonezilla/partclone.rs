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
pub(crate) mod tests {
    use super::super::decompress::tests::{ALL, compress};
    use super::super::decompress::{codec_name, decoder};
    use super::super::pieces::PieceReader;
    use super::super::{Codec, CzPartition, ImageKind, open_stream};
    use super::*;
    use std::process::Command;

    /// A fresh directory for one test.
    pub(crate) fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("klon-cz-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Runs a tool; the test fails when it is missing or fails.
    pub(crate) fn run(cmd: &str, args: &[&str]) {
        let out = Command::new(cmd)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{cmd} is needed by this test (scripts/test installs it): {e}"));
        assert!(
            out.status.success(),
            "{cmd} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Deterministic pseudo-random bytes.
    pub(crate) fn noise(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    /// A small filesystem image with files in it (made without root).
    fn make_fs(dir: &Path, fs: &str) -> PathBuf {
        let img = dir.join(format!("{fs}.img"));
        let content = dir.join("content");
        std::fs::create_dir_all(content.join("sub")).unwrap();
        for i in 0..12u32 {
            std::fs::write(content.join(format!("f{i}")), noise(3000 + i as usize * 17_000, i + 1)).unwrap();
        }
        std::fs::write(content.join("sub/big"), noise(900_000, 99)).unwrap();
        match fs {
            "ext4" => {
                run("truncate", &["-s", "12M", img.to_str().unwrap()]);
                run("mkfs.ext4", &["-q", "-F", "-b", "1024", "-d", content.to_str().unwrap(), img.to_str().unwrap()]);
            }
            "vfat" => {
                run("truncate", &["-s", "20M", img.to_str().unwrap()]);
                run("mkfs.vfat", &["-F", "16", img.to_str().unwrap()]);
                let mut args = vec!["-i", img.to_str().unwrap(), "-s"];
                let c = content.to_str().unwrap().to_string() + "/";
                let files: Vec<String> = (0..12).map(|i| format!("{c}f{i}")).chain([format!("{c}sub")]).collect();
                args.extend(files.iter().map(|s| s.as_str()));
                args.push("::/");
                run("mcopy", &args);
            }
            _ => unreachable!(),
        }
        img
    }

    /// `partclone.<fs> -c` of `img` with `args`; returns the image file.
    fn clone_fs(dir: &Path, img: &Path, fs: &str, args: &[&str], name: &str) -> PathBuf {
        let out = dir.join(name);
        let _ = std::fs::remove_file(&out);
        let log = dir.join("partclone.log");
        let mut a = vec!["-q", "-c", "-s", img.to_str().unwrap(), "-o", out.to_str().unwrap()];
        a.extend(["-L", log.to_str().unwrap()]);
        a.extend(args);
        run(&format!("partclone.{fs}"), &a);
        out
    }

    /// partclone.restore of `image` into a regular file: the oracle.
    fn restore_oracle(dir: &Path, image: &Path) -> Vec<u8> {
        let out = dir.join("restored.raw");
        let _ = std::fs::remove_file(&out);
        let log = dir.join("restore.log");
        run(
            "partclone.restore",
            &[
                "-q",
                "-C",
                "-W",
                "-s",
                image.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "-L",
                log.to_str().unwrap(),
            ],
        );
        std::fs::read(&out).unwrap()
    }

    /// Decodes the pieces as open_stream does, placing every run into a
    /// zeroed buffer of the device's size; checks the runs' shape.
    pub(crate) fn decode_all(src: &mut dyn BlockSource, max_len: usize) -> Result<Vec<u8>> {
        let mut disk = vec![0u8; src.device_size() as usize];
        let bs = src.block_size() as u64;
        let mut last_end = 0u64;
        let mut total = 0u64;
        while let Some((off, data)) = src.next_run(max_len)? {
            assert!(off >= last_end, "runs out of order");
            assert!(!data.is_empty());
            assert!(data.len() <= max_len.max(bs as usize), "run longer than asked");
            assert_eq!(off % bs, 0);
            let end = off + data.len() as u64;
            assert!(end <= disk.len() as u64, "run past the device");
            disk[off as usize..end as usize].copy_from_slice(&data);
            last_end = end;
            total += data.len() as u64;
        }
        assert_eq!(total, src.stored_bytes());
        assert!(src.next_run(max_len)?.is_none());
        Ok(disk)
    }

    fn partition(pieces: Vec<PathBuf>, codec: Codec, fs: &str, kind: ImageKind, size: u64) -> CzPartition {
        CzPartition { number: 1, device: "sda1".into(), fs: fs.into(), kind, codec, pieces, size }
    }

    /// Writes `image` compressed by `codec`, split into `piece` bytes when
    /// given, and decodes it through open_stream.
    fn through_stream(dir: &Path, image: &[u8], codec: Codec, piece: Option<usize>) -> Result<Vec<u8>> {
        let packed = compress(codec, image);
        let base = dir.join(format!("sda1.ext4-ptcl-img.{}", codec_name(codec)));
        let pieces = match piece {
            None => {
                std::fs::write(&base, &packed).unwrap();
                vec![base]
            }
            Some(size) => split(&base, &packed, size),
        };
        let part = partition(pieces, codec, "ext4", ImageKind::Partclone, 0);
        let mut s = open_stream(&part)?;
        decode_all(s.as_mut(), 1 << 20)
    }

    /// Writes `data` as `split -b size` pieces of `base` (with the real tool).
    pub(crate) fn split(base: &Path, data: &[u8], size: usize) -> Vec<PathBuf> {
        let whole = base.with_extension("whole");
        std::fs::write(&whole, data).unwrap();
        let prefix = format!("{}.", base.display());
        run("split", &["-b", &size.to_string(), whole.to_str().unwrap(), &prefix]);
        std::fs::remove_file(&whole).unwrap();
        let mut v: Vec<PathBuf> = std::fs::read_dir(base.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_str().unwrap().starts_with(&prefix))
            .collect();
        v.sort();
        assert!(v.len() >= 3, "want several pieces");
        v
    }

    fn open_file(path: &Path) -> Result<PartcloneReader> {
        let r = PieceReader::open(&[path.to_path_buf()])?;
        let pos = r.position().uncompressed();
        PartcloneReader::new(decoder(Codec::None, r)?, pos)
    }

    fn decode_file(path: &Path) -> Result<Vec<u8>> {
        decode_all(&mut open_file(path)?, 1 << 20)
    }

    /// Ours equals partclone.restore's output over the whole device, and
    /// the original filesystem over every stored run.
    fn check_against_oracles(dir: &Path, fs_img: &Path, image: &Path, restore: bool) {
        let mut r = open_file(image).unwrap();
        let original = std::fs::read(fs_img).unwrap();
        let mut disk = vec![0u8; r.device_size() as usize];
        // Small runs too: checksum groups straddle them.
        while let Some((off, data)) = r.next_run(3 * 4096 + 1).unwrap() {
            let (a, b) = (off as usize, off as usize + data.len());
            assert!(original[a..b] == data[..], "run at {off} differs from the filesystem");
            disk[a..b].copy_from_slice(&data);
        }
        if restore {
            let mut oracle = restore_oracle(dir, image);
            oracle.resize(disk.len(), 0);
            assert!(oracle == disk, "{}: differs from partclone.restore", image.display());
        }
    }

    #[test]
    fn ext4_every_checksum_layout_matches_partclone_restore() {
        // partclone refuses to run without root.
        if !crate::testutil::have_root() {
            return;
        }
        let dir = tmpdir("pc-ext4");
        let fs_img = make_fs(&dir, "ext4");
        for (name, args) in [
            ("default", &[][..]),
            ("none", &["-a0"][..]),
            ("crc-k1", &["-a1", "-k1"][..]),
            ("crc-k7-noreseed", &["-a1", "-k7", "-K"][..]),
            ("crc-k5000", &["-a1", "-k5000"][..]),
        ] {
            let image = clone_fs(&dir, &fs_img, "ext4", args, name);
            check_against_oracles(&dir, &fs_img, &image, true);
            let r = open_file(&image).unwrap();
            assert!(
                r.describe().starts_with("partclone 0002 (partclone 0.3.23), EXTFS, 1024-byte blocks"),
                "{}",
                r.describe()
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn vfat_matches_partclone_restore() {
        // partclone refuses to run without root.
        if !crate::testutil::have_root() {
            return;
        }
        let dir = tmpdir("pc-vfat");
        let fs_img = make_fs(&dir, "vfat");
        // (partclone.restore 0.3.23 itself crashes, "double free", on a
        // FAT image made with -k3: groups not dividing its 2048-block
        // buffer; so -k4 here, and -k3 checked against the filesystem.)
        for (name, args) in [("default", &[][..]), ("crc-k4", &["-a1", "-k4"][..])] {
            let image = clone_fs(&dir, &fs_img, "vfat", args, name);
            check_against_oracles(&dir, &fs_img, &image, true);
        }
        let image = clone_fs(&dir, &fs_img, "vfat", &["-a1", "-k3"], "crc-k3");
        check_against_oracles(&dir, &fs_img, &image, false);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_codec_and_split_pieces() {
        // partclone refuses to run without root.
        if !crate::testutil::have_root() {
            return;
        }
        let dir = tmpdir("pc-codecs");
        let fs_img = make_fs(&dir, "ext4");
        let image = clone_fs(&dir, &fs_img, "ext4", &["-a1", "-k64"], "img");
        let expected = decode_file(&image).unwrap();
        let bytes = std::fs::read(&image).unwrap();
        for codec in ALL {
            let sub = dir.join(codec_name(codec));
            std::fs::create_dir_all(&sub).unwrap();
            assert!(through_stream(&sub, &bytes, codec, None).unwrap() == expected, "{codec:?}");
            let piece = compress(codec, &bytes).len() / 4 + 1;
            let sub = dir.join(format!("{}-split", codec_name(codec)));
            std::fs::create_dir_all(&sub).unwrap();
            assert!(through_stream(&sub, &bytes, codec, Some(piece)).unwrap() == expected, "{codec:?} split");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn expect_corrupt(r: Result<Vec<u8>>, name: &str, words: &str) {
        match r {
            Err(e @ Error::Corrupt(_)) => {
                let m = e.to_string();
                assert!(m.contains(name), "error does not name {name}: {m}");
                assert!(m.contains(words), "error does not say {words:?}: {m}");
                assert!(m.contains(" at byte ") || m.contains("at image offset "), "error has no position: {m}");
            }
            Err(e) => panic!("expected Corrupt, got {e}"),
            Ok(_) => panic!("damage not detected ({words})"),
        }
    }

    #[test]
    fn damage_is_an_error_naming_the_file() {
        // partclone refuses to run without root.
        if !crate::testutil::have_root() {
            return;
        }
        let dir = tmpdir("pc-damage");
        let fs_img = make_fs(&dir, "ext4");
        let image = clone_fs(&dir, &fs_img, "ext4", &["-a1", "-k16"], "sda1.ext4-ptcl-img.uncomp");
        let good = std::fs::read(&image).unwrap();
        let name = "sda1.ext4-ptcl-img.uncomp";
        let total = le64(&good, 60);
        let data_start = V2_HEADER + total.div_ceil(8) as usize + 4;
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "header",
                {
                    let mut v = good.clone();
                    v[60] ^= 1;
                    v
                },
                "header is damaged",
            ),
            (
                "bitmap",
                {
                    let mut v = good.clone();
                    v[V2_HEADER + 3] ^= 0x10;
                    v
                },
                "bitmap is damaged",
            ),
            (
                "data",
                {
                    let mut v = good.clone();
                    v[data_start + 5000] ^= 0x01;
                    v
                },
                "CRC32 checksum mismatch",
            ),
            (
                "checksum",
                {
                    let mut v = good.clone();
                    v[data_start + 16 * 1024] ^= 0x80;
                    v
                },
                "CRC32 checksum mismatch",
            ),
            ("truncated", good[..good.len() - 100].to_vec(), "ends early"),
            ("truncated-sum", good[..good.len() - 2].to_vec(), "ends early"),
            (
                "garbage",
                {
                    let mut v = good.clone();
                    v.extend_from_slice(b"junk");
                    v
                },
                "after the last block",
            ),
            ("empty", Vec::new(), "not a partclone image"),
        ];
        for (case, bytes, words) in cases {
            std::fs::write(&image, &bytes).unwrap();
            expect_corrupt(decode_file(&image), name, words);
            let _ = case;
        }
        // The same through zstd: the error names the compressed file.
        std::fs::write(&image, &good).unwrap();
        let mut bad = good.clone();
        bad[data_start + 70_000] ^= 0x04;
        let sub = dir.join("zst");
        std::fs::create_dir_all(&sub).unwrap();
        expect_corrupt(through_stream(&sub, &bad, Codec::Zstd, None), "ptcl-img.zstd", "checksum mismatch");
        // A middle piece removed: the error names it.
        let sub = dir.join("split");
        std::fs::create_dir_all(&sub).unwrap();
        let pieces = split(&sub.join("sda1.ext4-ptcl-img.gz"), &compress(Codec::Gzip, &good), 200_000);
        std::fs::remove_file(&pieces[1]).unwrap();
        let part = partition(pieces.clone(), Codec::Gzip, "ext4", ImageKind::Partclone, 0);
        let e = open_stream(&part).err().expect("missing piece not noticed");
        assert!(e.to_string().contains("sda1.ext4-ptcl-img.gz.ab"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn uncompressed_split_damage_names_the_exact_piece_and_byte() {
        // partclone refuses to run without root.
        if !crate::testutil::have_root() {
            return;
        }
        let dir = tmpdir("pc-exact");
        let fs_img = make_fs(&dir, "ext4");
        let image = clone_fs(&dir, &fs_img, "ext4", &["-a1", "-k1"], "img");
        let mut bytes = std::fs::read(&image).unwrap();
        let data_start = V2_HEADER + le64(&bytes, 60).div_ceil(8) as usize + 4;
        // Block 1500's checksum lies in the third piece of 600 000 bytes.
        let block = data_start + 1500 * (1024 + 4);
        bytes[block + 10] ^= 0x40;
        let stored_at = block + 1024;
        let pieces = split(&dir.join("sda1.ext4-ptcl-img.uncomp"), &bytes, 600_000);
        let part = partition(pieces, Codec::None, "ext4", ImageKind::Partclone, 0);
        let mut s = open_stream(&part).unwrap();
        let e = decode_all(s.as_mut(), 1 << 20).unwrap_err();
        let want = format!(
            "sda1.ext4-ptcl-img.uncomp.a{} at byte {}:",
            (b'a' + (stored_at / 600_000) as u8) as char,
            stored_at % 600_000
        );
        assert!(e.to_string().contains(&want), "{e} (want {want})");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Throughput of the whole read path (pieces, zstd, partclone checks)
    /// on a 256 MiB ext4 with ~200 MiB of data. Run in release:
    /// `cargo test --release --lib bench_ -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_partclone_zstd_throughput() {
        // partclone refuses to run without root.
        if !crate::testutil::have_root() {
            return;
        }
        let dir = tmpdir("pc-bench");
        let content = dir.join("content");
        std::fs::create_dir_all(&content).unwrap();
        for i in 0..4 {
            let f = content.join(format!("f{i}"));
            let sh = format!("head -c 50M /dev/urandom > {}", f.display());
            run("sh", &["-c", &sh]);
        }
        let img = dir.join("fs.img");
        run("truncate", &["-s", "256M", img.to_str().unwrap()]);
        run("mkfs.ext4", &["-q", "-F", "-d", content.to_str().unwrap(), img.to_str().unwrap()]);
        let image = clone_fs(&dir, &img, "ext4", &[], "sda1.ext4-ptcl-img");
        let zst = dir.join("sda1.ext4-ptcl-img.zst");
        run("zstd", &["-q", "-T2", "-3", image.to_str().unwrap(), "-o", zst.to_str().unwrap()]);
        let part = partition(vec![zst], Codec::Zstd, "ext4", ImageKind::Partclone, 0);
        let t = std::time::Instant::now();
        let mut s = open_stream(&part).unwrap();
        let mut n = 0u64;
        while let Some((_, d)) = s.next_run(4 << 20).unwrap() {
            n += d.len() as u64;
        }
        let secs = t.elapsed().as_secs_f64();
        eprintln!("{} MiB in {secs:.2} s: {:.0} MiB/s ({})", n >> 20, (n >> 20) as f64 / secs, s.describe());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_lying_header_allocates_nothing_big() {
        // Valid CRC, 2^33 blocks of 4 KiB: the bitmap would be 1 GiB; the
        // file ends after the header, so reading stops at the first chunk.
        let mut h = vec![0u8; V2_HEADER];
        h[..16].copy_from_slice(b"partclone-image\0");
        h[30..34].copy_from_slice(b"0002");
        h[34..36].copy_from_slice(&0xC0DEu16.to_le_bytes());
        h[52..60].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        h[60..68].copy_from_slice(&(1u64 << 33).to_le_bytes());
        h[84..88].copy_from_slice(&4096u32.to_le_bytes());
        h[88..92].copy_from_slice(&18u32.to_le_bytes());
        h[92..94].copy_from_slice(&2u16.to_le_bytes());
        h[104] = 1;
        h[105] = 1;
        let crc = partclone_crc32(0xFFFF_FFFF, &h[..106]);
        h[106..110].copy_from_slice(&crc.to_le_bytes());
        let dir = tmpdir("pc-lying");
        let p = dir.join("lying.img");
        std::fs::write(&p, &h).unwrap();
        expect_corrupt(decode_file(&p), "lying.img", "ends early");
        // One more block than the limit: refused from the header alone.
        h[60..68].copy_from_slice(&((1u64 << 33) + 1).to_le_bytes());
        let crc = partclone_crc32(0xFFFF_FFFF, &h[..106]);
        h[106..110].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&p, &h).unwrap();
        expect_corrupt(decode_file(&p), "lying.img", "implausible block count");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Parsed pieces of a real 0002 image: header, bitmap bits, used blocks.
    fn parse_v2(bytes: &[u8]) -> (Vec<u8>, Vec<u8>, Vec<Vec<u8>>) {
        let total = le64(bytes, 60);
        let bs = le32(bytes, 84) as usize;
        let bpc = le32(bytes, 100) as usize;
        let csize = le16(bytes, 98) as usize;
        let blen = total.div_ceil(8) as usize;
        let bitmap = bytes[V2_HEADER..V2_HEADER + blen].to_vec();
        let used: usize = bitmap.iter().map(|b| b.count_ones() as usize).sum();
        let mut p = V2_HEADER + blen + 4;
        let mut blocks = Vec::new();
        for i in 0..used {
            blocks.push(bytes[p..p + bs].to_vec());
            p += bs;
            if bpc > 0 && ((i + 1) % bpc == 0 || i + 1 == used) {
                p += csize;
            }
        }
        assert_eq!(p, bytes.len());
        (bytes[..V2_HEADER].to_vec(), bitmap, blocks)
    }

    /// A format 0001 image of the same filesystem, built from the layout
    /// documented above (partclone 0.3 only writes 0002), with `stride`-byte
    /// checksums (8 = the old 64-bit bug).
    fn build_v1(v2: &[u8], stride: usize) -> Vec<u8> {
        let (h, bitmap, blocks) = parse_v2(v2);
        let total = le64(&h, 60);
        let mut v = vec![0u8; V1_HEADER];
        v[..15].copy_from_slice(MAGIC);
        v[15..20].copy_from_slice(b"EXTFS");
        v[30..34].copy_from_slice(b"0001");
        v[36..40].copy_from_slice(&h[84..88]);
        v[40..48].copy_from_slice(&h[52..60]);
        v[48..56].copy_from_slice(&h[60..68]);
        v[56..64].copy_from_slice(&h[76..84]);
        for b in 0..total {
            v.push(bitmap[(b / 8) as usize] >> (b % 8) & 1);
        }
        v.extend_from_slice(BITMAP_MAGIC);
        let mut reg = 0xFFFF_FFFFu32;
        for block in &blocks {
            v.extend_from_slice(block);
            reg = partclone_crc32(reg, &vec![block[0]; block.len()]);
            v.extend_from_slice(&reg.to_le_bytes());
            v.extend_from_slice(&[0u8; 4][..stride - 4]);
        }
        v
    }

    /// The same image with XXH64 checksums every `bpc` blocks (partclone
    /// 0.3.23's command line offers only none and CRC32).
    fn build_xxh64(v2: &[u8], bpc: usize, reseed: bool) -> Vec<u8> {
        let (mut h, bitmap, blocks) = parse_v2(v2);
        h[96..98].copy_from_slice(&CSM_XXH64.to_le_bytes());
        h[98..100].copy_from_slice(&8u16.to_le_bytes());
        h[100..104].copy_from_slice(&(bpc as u32).to_le_bytes());
        h[104] = u8::from(reseed);
        let crc = partclone_crc32(0xFFFF_FFFF, &h[..106]);
        h[106..110].copy_from_slice(&crc.to_le_bytes());
        let mut v = h;
        v.extend_from_slice(&bitmap);
        v.extend_from_slice(&partclone_crc32(0xFFFF_FFFF, &bitmap).to_le_bytes());
        let mut x = xxhash_rust::xxh64::Xxh64::new(0);
        for (i, block) in blocks.iter().enumerate() {
            v.extend_from_slice(block);
            x.update(block);
            if (i + 1) % bpc == 0 || i + 1 == blocks.len() {
                v.extend_from_slice(&x.digest().to_le_bytes());
                if reseed {
                    x = xxhash_rust::xxh64::Xxh64::new(0);
                }
            }
        }
        v
    }

    #[test]
    fn xxh_digests_are_stored_as_partclone_keeps_them_in_memory() {
        // xxhash's test vectors for empty input: XXH64 0xef46db3751d8e999;
        // XXH3-128 high 0x99aa06d3014798d8, low 0x6001c324468d497f.
        // partclone copies the u64 and the {low, high} struct as they lie
        // in (little-endian) memory.
        let (b, n) = Sum::new(Algo::Xxh64).value();
        assert_eq!(hex(&b[..n]), "99e9d85137db46ef");
        let (b, n) = Sum::new(Algo::Xxh128).value();
        assert_eq!(hex(&b[..n]), "7f498d4624c30160d8984701d306aa99");
        // Without reseed the digest leaves the state running.
        let mut s = Sum::new(Algo::Xxh128);
        s.update(b"abc");
        let first = s.value();
        s.update(b"def");
        let mut whole = Sum::new(Algo::Xxh128);
        whole.update(b"abcdef");
        assert_eq!(s.value(), whole.value());
        assert_ne!(first, whole.value());
    }

    #[test]
    fn format_0001_and_xxh64_images() {
        // partclone refuses to run without root.
        if !crate::testutil::have_root() {
            return;
        }
        let dir = tmpdir("pc-v1");
        let fs_img = make_fs(&dir, "ext4");
        let v2 = std::fs::read(clone_fs(&dir, &fs_img, "ext4", &["-a0"], "v2")).unwrap();
        let expected = decode_file(&dir.join("v2")).unwrap();
        for (name, bytes, sum_len) in [
            ("v1-stride4", build_v1(&v2, 4), 4),
            ("v1-stride8", build_v1(&v2, 8), 8),
            ("xxh64-k10", build_xxh64(&v2, 10, true), 8),
            ("xxh64-k3-noreseed", build_xxh64(&v2, 3, false), 8),
        ] {
            let p = dir.join(name);
            std::fs::write(&p, &bytes).unwrap();
            assert!(decode_file(&p).unwrap() == expected, "{name}");
            // partclone itself reads what we built the same way. (Not for
            // XXH64: Debian's partclone 0.3.23 says "Unknown checksum mode
            // [48]"; nor for 8-byte 0001 checksums: 0.3.23's own recovery
            // from them fails at block 1.)
            if name == "v1-stride4" {
                let mut oracle = restore_oracle(&dir, &p);
                oracle.resize(expected.len(), 0);
                assert!(oracle == expected, "{name}: partclone.restore disagrees");
            }
            // A flipped first byte of a block (the only byte 0001's checksum
            // sees) is caught.
            let mut bad = bytes.clone();
            let at = bad.len() - sum_len - 1024;
            bad[at] ^= 0x20;
            std::fs::write(&p, &bad).unwrap();
            assert!(decode_file(&p).is_err(), "{name}: damage not detected");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A 0002 image of `fs` (whole, as blocks of `bs`) with no bitmap or a
    /// byte bitmap, CRC32 every 256 blocks.
    fn build_v2_mode(fs: &[u8], bs: usize, bitmap_mode: u8) -> Vec<u8> {
        let total = (fs.len() / bs) as u64;
        let mut h = vec![0u8; V2_HEADER];
        h[..16].copy_from_slice(b"partclone-image\0");
        h[16..22].copy_from_slice(b"0.3.23");
        h[30..34].copy_from_slice(b"0002");
        h[34..36].copy_from_slice(&0xC0DEu16.to_le_bytes());
        h[36..41].copy_from_slice(b"EXTFS");
        h[52..60].copy_from_slice(&(fs.len() as u64).to_le_bytes());
        h[60..68].copy_from_slice(&total.to_le_bytes());
        h[68..76].copy_from_slice(&total.to_le_bytes());
        h[76..84].copy_from_slice(&total.to_le_bytes());
        h[84..88].copy_from_slice(&(bs as u32).to_le_bytes());
        h[88..92].copy_from_slice(&18u32.to_le_bytes());
        h[92..94].copy_from_slice(&2u16.to_le_bytes());
        h[94..96].copy_from_slice(&64u16.to_le_bytes());
        h[96..98].copy_from_slice(&CSM_CRC32.to_le_bytes());
        h[98..100].copy_from_slice(&4u16.to_le_bytes());
        h[100..104].copy_from_slice(&256u32.to_le_bytes());
        h[104] = 1;
        h[105] = bitmap_mode;
        let crc = partclone_crc32(0xFFFF_FFFF, &h[..106]);
        h[106..110].copy_from_slice(&crc.to_le_bytes());
        let mut v = h;
        if bitmap_mode == 8 {
            v.extend(std::iter::repeat_n(1u8, total as usize));
            let bits = vec![0xFFu8; total.div_ceil(8) as usize];
            v.extend_from_slice(&partclone_crc32(0xFFFF_FFFF, &bits).to_le_bytes());
        }
        for group in fs.chunks(256 * bs) {
            v.extend_from_slice(group);
            v.extend_from_slice(&partclone_crc32(0xFFFF_FFFF, group).to_le_bytes());
        }
        v
    }

    /// Text fields of a header are shown escaped: a damaged or hostile
    /// header's bytes must not reach the terminal as they are (an escape
    /// sequence, or bytes that are not text).
    #[test]
    fn header_bytes_are_shown_escaped() {
        let dir = tmpdir("pc-escaped");
        let fs = noise(8192, 3);
        let mut img = build_v2_mode(&fs, 4096, 0);
        img[30..34].copy_from_slice(b"\x1b[2J");
        let p = dir.join("bad-version");
        std::fs::write(&p, &img).unwrap();
        let e = open_file(&p).err().expect("unknown version taken");
        let msg = e.to_string();
        assert!(msg.contains(r"\x1b[2J"), "{msg}");
        img[30..34].copy_from_slice(&[0xff, 0xfe, 0x00, 0x07]);
        std::fs::write(&p, &img).unwrap();
        let msg = open_file(&p).err().expect("unknown version taken").to_string();
        assert!(msg.contains(r"\xff\xfe\x00\x07"), "{msg}");
        assert!(!msg.contains('\u{fffd}') && !msg.chars().any(|c| c.is_control()), "{msg:?}");

        // The partclone version and filesystem name in a description.
        let mut img = build_v2_mode(&fs, 4096, 0);
        img[16..22].copy_from_slice(b"\x1b]0;x\x07");
        img[36..41].copy_from_slice(b"EX\xffF\x1b");
        let crc = partclone_crc32(0xFFFF_FFFF, &img[..106]);
        img[106..110].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&p, &img).unwrap();
        let text = open_file(&p).unwrap().describe();
        assert!(text.contains(r"\x1b]0;x\x07") && text.contains(r"EX\xffF\x1b"), "{text}");
        assert!(!text.chars().any(|c| c.is_control() || c == '\u{fffd}'), "{text:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unknown_checksum_mode_is_refused_naming_the_file_and_mode() {
        let fs = noise(64 << 10, 3);
        let mut v = build_v2_mode(&fs, 4096, 1);
        // A mode after XXH128 (0x31), with a valid header CRC.
        v[96..98].copy_from_slice(&0x32u16.to_le_bytes());
        let crc = partclone_crc32(0xFFFF_FFFF, &v[..106]);
        v[106..110].copy_from_slice(&crc.to_le_bytes());
        let dir = tmpdir("pc-mode");
        let p = dir.join("sda1.ext4-ptcl-img.uncomp");
        std::fs::write(&p, &v).unwrap();
        match open_file(&p) {
            Err(e @ Error::Unsupported(_)) => {
                let m = e.to_string();
                assert!(
                    m.contains("sda1.ext4-ptcl-img.uncomp") && m.contains("checksum mode 0x32 is not known"),
                    "{m}"
                );
                assert!(m.contains("0x31 XXH128"), "{m}");
            }
            Err(e) => panic!("expected Unsupported, got {e}"),
            Ok(_) => panic!("mode 0x32 accepted"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_bitmap_and_byte_bitmap_and_v1_bitmap_damage() {
        // partclone refuses to run without root.
        if !crate::testutil::have_root() {
            return;
        }
        let dir = tmpdir("pc-modes");
        let fs = noise(3 << 20, 5);
        for mode in [0u8, 8] {
            let p = dir.join(format!("mode{mode}"));
            std::fs::write(&p, build_v2_mode(&fs, 4096, mode)).unwrap();
            assert!(decode_file(&p).unwrap() == fs, "bitmap mode {mode}");
        }
        // No bitmap and 2^33 blocks claimed: nothing is allocated for it,
        // and the missing data is reported.
        let mut lying = build_v2_mode(&fs[..8192], 4096, 0);
        for at in [60, 68, 76] {
            lying[at..at + 8].copy_from_slice(&(1u64 << 33).to_le_bytes());
        }
        lying[52..60].copy_from_slice(&(1u64 << 50).to_le_bytes());
        let crc = partclone_crc32(0xFFFF_FFFF, &lying[..106]);
        lying[106..110].copy_from_slice(&crc.to_le_bytes());
        let p = dir.join("lying0");
        std::fs::write(&p, &lying).unwrap();
        let mut r = open_file(&p).unwrap();
        let e = r.next_run(1 << 20).expect_err("missing data not noticed");
        assert!(e.to_string().contains("ends early"), "{e}");

        // Format 0001 has no bitmap CRC: a flipped bitmap byte shows as a
        // count that disagrees with the header.
        let fs_img = make_fs(&dir, "ext4");
        let v2 = std::fs::read(clone_fs(&dir, &fs_img, "ext4", &["-a0"], "v2")).unwrap();
        let mut v1 = build_v1(&v2, 4);
        let zero = V1_HEADER + v1[V1_HEADER..].iter().position(|&b| b == 0).unwrap();
        v1[zero] = 1;
        let p = dir.join("v1-bad-bitmap");
        std::fs::write(&p, &v1).unwrap();
        expect_corrupt(decode_file(&p), "v1-bad-bitmap", "bitmap marks");
        let mut v1 = build_v1(&v2, 4);
        v1[V1_HEADER + le64(&v2, 60) as usize + 2] ^= 1;
        std::fs::write(&p, &v1).unwrap();
        expect_corrupt(decode_file(&p), "v1-bad-bitmap", "BiTmAgIc");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dd_ptcl_img_is_raw_and_raw_length_is_checked() {
        // partclone refuses to run without root.
        if !crate::testutil::have_root() {
            return;
        }
        let dir = tmpdir("pc-dd");
        let src = dir.join("part.raw");
        let data = noise(3 << 20, 7);
        std::fs::write(&src, &data).unwrap();
        let out = dir.join("sda2.dd-ptcl-img.uncomp");
        let log = dir.join("dd.log");
        run(
            "partclone.dd",
            &["-q", "-s", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "-L", log.to_str().unwrap()],
        );
        let part = partition(vec![out.clone()], Codec::None, "dd", ImageKind::Partclone, data.len() as u64);
        let mut s = open_stream(&part).unwrap();
        assert_eq!(s.describe(), format!("raw image of {} bytes", data.len()));
        assert!(decode_all(s.as_mut(), 1 << 20).unwrap() == data);
        // Shorter or longer than the partition: Corrupt, naming the file.
        for (bytes, words) in
            [(&data[..data.len() - 1], "ends early"), (&[&data[..], b"x"].concat()[..], "after the last block")]
        {
            std::fs::write(&out, bytes).unwrap();
            let part = partition(vec![out.clone()], Codec::None, "dd", ImageKind::Raw, data.len() as u64);
            let mut s = open_stream(&part).unwrap();
            let mut buf = vec![0u8; data.len()];
            let r = (|| {
                while let Some((off, d)) = s.next_run(1 << 20)? {
                    buf[off as usize..off as usize + d.len()].copy_from_slice(&d);
                }
                Ok(buf.clone())
            })();
            expect_corrupt(r, "sda2.dd-ptcl-img.uncomp", words);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
