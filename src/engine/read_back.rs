//! The read-back after a restore or clone: pieces of the target read again,
//! past the page cache where the target allows it, and compared with what
//! was written, on the pipeline's workers ([`run`]). klon images and
//! Clonezilla images are restored by different readers but read back the
//! same way: each says what a piece must hold ([`Expected`]) and
//! [`Piece::check`] compares. A clone compares the target with the source,
//! both read by a [`DiskReader`].

use super::feedback::Feedback;
use super::pipeline;
use super::target::minus;
use crate::device::Disk;
use crate::device::direct::{BufPool, IoBuf};
use crate::error::{Error, Result};
use crate::image::format::{CHUNK_SIZE, Extent};

/// Reads back `total` bytes of `target` on the pipeline, with a progress
/// bar: `produce` reads pieces with the [`DiskReader`] it is given and sends
/// them, `check` compares each on a worker and returns its length.
pub fn run<I: Send>(
    target: &Disk,
    total: u64,
    workers: usize,
    feedback: &Feedback,
    produce: impl FnOnce(&DiskReader, &mut dyn FnMut(I) -> bool) -> Result<()> + Send,
    check: impl Fn(I) -> Result<u64> + Sync,
) -> Result<()> {
    let mut progress = feedback.meter("read-back", total, Vec::new());
    let reader = DiskReader::new(target);
    pipeline::run(
        workers,
        pipeline::depth(workers),
        |send| produce(&reader, send),
        check,
        |n| {
            progress.add(n);
            Ok(())
        },
    )?;
    progress.finish();
    Ok(())
}

/// Buffers kept for reuse: enough for every piece in flight with 8 workers.
const BUFS_KEPT: usize = 24;

/// Reads pieces of a disk into reused buffers: in place, straight from the
/// drive where the disk was opened for direct reads (see
/// [`Disk::enable_direct_reads`]), so what a target is compared by is what
/// its drive holds, not what the page cache kept of the writes.
pub struct DiskReader<'a> {
    disk: &'a Disk,
    bufs: BufPool,
}

impl<'a> DiskReader<'a> {
    /// A reader of `disk` with an empty pool of chunk-sized buffers.
    pub fn new(disk: &'a Disk) -> DiskReader<'a> {
        DiskReader { disk, bufs: BufPool::new(BUFS_KEPT, CHUNK_SIZE as usize) }
    }

    /// The bytes of `extents`, one after another (at most a chunk's worth).
    pub fn read(&self, extents: &[Extent]) -> Result<IoBuf> {
        let mut buf = self.bufs.take(extents.iter().map(|e| e.1 as usize).sum());
        self.disk.read_extents(extents, &mut buf)?;
        Ok(buf)
    }

    /// The bytes of `extents`, to be compared with `expected`.
    pub fn piece(&self, extents: Vec<Extent>, expected: Expected) -> Result<Piece> {
        Ok(Piece { got: self.read(&extents)?, extents, expected })
    }
}

/// What the bytes of a piece must be.
#[derive(Debug)]
pub enum Expected {
    /// Bytes whose blake3 is this. Compared whole: a piece that may hold
    /// bytes rewritten after the restore (see `skip` in [`Piece::check`])
    /// must be compared byte by byte.
    Hash([u8; 32]),
    /// Bytes whose blake3 keyed with the first is the second (the chunk ids
    /// of an encrypted repository), compared whole like `Hash`.
    KeyedHash([u8; 32], [u8; 32]),
    /// These bytes, except where they fall in `skip`.
    Bytes(IoBuf),
    /// Zeros only: the gaps of a raw partition that the image left out.
    Zeros,
}

/// Bytes read back from the target and what they must be.
#[derive(Debug)]
pub struct Piece {
    /// The extents read, in order.
    pub extents: Vec<Extent>,
    /// Their bytes as the target holds them.
    pub got: IoBuf,
    /// What they must be.
    pub expected: Expected,
}

impl Piece {
    /// Compares, leaving out the bytes in `skip` (areas the restore rewrote
    /// afterwards, such as the partition tables of a larger disk). The
    /// error names `place` (the partition) and `image` (what was restored)
    /// and says where the target differs. Returns the piece's length.
    pub fn check(&self, place: &str, image: &str, skip: &[Extent]) -> Result<u64> {
        let got = &self.got[..];
        let differs =
            |at: u64| Error::VerifyAfter(format!("{place}: data read back at disk offset {at} differs from {image}"));
        match &self.expected {
            Expected::Hash(_) | Expected::KeyedHash(..) => {
                let matches = match &self.expected {
                    Expected::KeyedHash(key, hash) => blake3::keyed_hash(key, got).as_bytes() == hash,
                    Expected::Hash(hash) => blake3::hash(got).as_bytes() == hash,
                    _ => unreachable!("matched above"),
                };
                if !matches {
                    let (a, _) = self.extents[0];
                    let (b, l) = *self.extents.last().expect("a piece has extents");
                    return Err(Error::VerifyAfter(format!(
                        "{place}: data read back from disk bytes {a}..{} differs from {image}",
                        b + l
                    )));
                }
            }
            Expected::Bytes(want) => {
                if want.len() != got.len() {
                    return Err(differs(self.extents[0].0));
                }
                let mut pos = 0u64;
                for &(start, len) in &self.extents {
                    for (a, l) in minus(start, len, skip) {
                        let rel = (pos + a - start) as usize;
                        let (x, y) = (&got[rel..rel + l as usize], &want[rel..rel + l as usize]);
                        if let Some(i) = x.iter().zip(y).position(|(p, q)| p != q) {
                            return Err(differs(a + i as u64));
                        }
                    }
                    pos += len;
                }
            }
            Expected::Zeros => {
                if let Some(i) = got.iter().position(|&b| b != 0) {
                    return Err(Error::VerifyAfter(format!(
                        "{place}: byte at disk offset {} should be zero but is not",
                        nth_offset(&self.extents, i as u64)
                    )));
                }
            }
        }
        Ok(got.len() as u64)
    }
}

/// Disk offset of byte `n` of the bytes of `extents`, one after another.
fn nth_offset(extents: &[Extent], mut n: u64) -> u64 {
    for &(start, len) in extents {
        if n < len {
            return start + n;
        }
        n -= len;
    }
    panic!("byte {n} past the extents");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(extents: &[Extent], got: &[u8], expected: Expected) -> Piece {
        Piece { extents: extents.to_vec(), got: got.to_vec().into(), expected }
    }

    #[test]
    fn a_difference_is_found_and_placed() {
        let extents = [(4096, 8), (100_000, 8)];
        let bytes: Vec<u8> = (1..=16).collect();
        let mut changed = bytes.clone();
        changed[10] = 0;

        let hash = *blake3::hash(&bytes).as_bytes();
        assert_eq!(piece(&extents, &bytes, Expected::Hash(hash)).check("p1", "the image", &[]).unwrap(), 16);
        let e = piece(&extents, &changed, Expected::Hash(hash)).check("p1", "the image", &[]).unwrap_err();
        assert!(
            e.to_string().contains("p1: data read back from disk bytes 4096..100008 differs from the image"),
            "{e}"
        );

        let want = || Expected::Bytes(bytes.clone().into());
        assert_eq!(piece(&extents, &bytes, want()).check("p1", "the image", &[]).unwrap(), 16);
        let e = piece(&extents, &changed, want()).check("p1", "the image", &[]).unwrap_err();
        assert!(e.to_string().contains("at disk offset 100002 differs from the image"), "{e}");
        // A difference inside a skipped area is not one.
        piece(&extents, &changed, want()).check("p1", "the image", &[(100_002, 1)]).unwrap();
        piece(&extents, &changed, want()).check("p1", "the image", &[(100_003, 1)]).unwrap_err();

        let zeros = [0u8; 16];
        piece(&extents, &zeros, Expected::Zeros).check("p1", "the image", &[]).unwrap();
        let mut not_zero = zeros;
        not_zero[9] = 7;
        let e = piece(&extents, &not_zero, Expected::Zeros).check("p1", "the image", &[]).unwrap_err();
        assert!(e.to_string().contains("byte at disk offset 100001 should be zero"), "{e}");
    }
}
