//! Reads that bypass the page cache (O_DIRECT).
//!
//! A backup reads every used byte of the source once: through the page cache
//! each of those bytes costs the kernel a page allocated, filled, copied out
//! and later reclaimed (here 2 GiB took 1.3 s of system time that way, 0.1 s
//! read straight into our memory), and on a machine whose cores are busy
//! compressing, that CPU is the backup's time. O_DIRECT has the drive put
//! the data in our buffer.
//!
//! O_DIRECT wants the file offset, the length and the memory address aligned
//! to the logical block size; [`ALIGN`] (4096) covers every sector size klon
//! accepts. Reads that are not aligned, and filesystems that refuse O_DIRECT,
//! go through the page cache as before: this is a way of reading, never a
//! reason for a read to fail.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Alignment of offsets, lengths and buffers for direct reads.
pub const ALIGN: usize = 4096;

/// Reads shorter than this go through the page cache: for them the saving
/// is small and the readahead of the page cache is worth more.
pub const MIN_DIRECT: usize = 64 << 10;

/// Size of the bounce buffer used when the caller's buffer is not aligned.
const BOUNCE: usize = 8 << 20;

/// Opens `path` a second time for direct reads; `None` where the filesystem
/// or device refuses O_DIRECT.
pub fn open(path: &Path) -> Option<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).ok()
}

/// Whether a read of `len` bytes at `offset` can be made direct.
pub fn suits(offset: u64, len: usize) -> bool {
    len >= MIN_DIRECT && offset.is_multiple_of(ALIGN as u64) && len.is_multiple_of(ALIGN)
}

/// Fills `buf` from `file` (opened with O_DIRECT) at `offset`, which with
/// `buf.len()` must be aligned (see [`suits`]). A buffer at an unaligned
/// address is filled through a bounce buffer of this thread. Any error,
/// including a short read at the end of the file, is returned for the
/// caller to read the same bytes the ordinary way.
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    debug_assert!(suits(offset, buf.len()));
    if (buf.as_ptr() as usize).is_multiple_of(ALIGN) {
        return read_in_halves(file, buf, offset);
    }
    BOUNCE_BUF.with(|b| {
        let mut b = b.borrow_mut();
        let bounce = b.get_or_insert_with(|| AlignedBuf::new(BOUNCE));
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(BOUNCE);
            read_in_halves(file, &mut bounce.as_mut_slice()[..n], offset + done as u64)?;
            buf[done..done + n].copy_from_slice(&bounce.as_mut_slice()[..n]);
            done += n;
        }
        Ok(())
    })
}

/// Reads of at least this size are split in two, read at the same time.
const SPLIT_MIN: usize = 1 << 20;

/// One direct read, or for a large one two at once (the second half on a
/// thread of its own): a direct read has no readahead behind it, and two
/// requests in flight keep a drive busy that one alone leaves waiting while
/// the other work on the disk (writing the image) goes on.
fn read_in_halves(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    if buf.len() < SPLIT_MIN {
        return file.read_exact_at(buf, offset);
    }
    let mid = (buf.len() / 2).next_multiple_of(ALIGN);
    let (a, b) = buf.split_at_mut(mid);
    std::thread::scope(|s| {
        let second = s.spawn(|| file.read_exact_at(b, offset + mid as u64));
        let first = file.read_exact_at(a, offset);
        let second = second.join().unwrap_or_else(|_| Err(std::io::Error::other("reading thread failed")));
        first.and(second)
    })
}

thread_local! {
    static BOUNCE_BUF: std::cell::RefCell<Option<AlignedBuf>> = const { std::cell::RefCell::new(None) };
}

/// A zeroed heap buffer whose usable part starts at a multiple of
/// [`ALIGN`]: a Vec over-allocated by one alignment, used from its first
/// aligned byte (the Vec is never resized, so the address holds).
pub struct AlignedBuf {
    vec: Vec<u8>,
    start: usize,
    len: usize,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

impl AlignedBuf {
    /// A buffer of `len` bytes, all zero.
    pub fn new(len: usize) -> AlignedBuf {
        let vec = vec![0u8; len + ALIGN];
        let start = vec.as_ptr().align_offset(ALIGN);
        AlignedBuf { vec, start, len }
    }

    /// The buffer's bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.vec[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_reads_equal_buffered_reads_at_any_buffer_address() {
        let dir = std::env::temp_dir().join(format!("klon-direct-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("data");
        let data: Vec<u8> = (0..(3 << 20) + 512).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        // The file is not synced: a direct read must still see what was written.
        let Some(f) = open(&path) else {
            // tmpfs before Linux 6.6 refuses O_DIRECT: nothing to compare then.
            std::fs::remove_dir_all(&dir).unwrap();
            return;
        };
        let mut owned = vec![0u8; (2 << 20) + 1];
        for (offset, len, at) in [(0usize, 1 << 20, 0usize), (4096, 2 << 20, 1), (1 << 20, 64 << 10, 7)] {
            assert!(suits(offset as u64, len));
            let buf = &mut owned[at..at + len];
            read_exact_at(&f, buf, offset as u64).unwrap();
            assert_eq!(buf, &data[offset..offset + len], "offset {offset} len {len} at {at}");
        }
        let mut aligned = AlignedBuf::new(1 << 20);
        read_exact_at(&f, aligned.as_mut_slice(), 2 << 20).unwrap();
        assert_eq!(aligned.as_mut_slice(), &data[2 << 20..3 << 20]);
        // Past the end the read comes up short: an error, for the caller to retry buffered.
        let mut tail = vec![0u8; 64 << 10];
        assert!(read_exact_at(&f, &mut tail, 3 << 20).is_err());
        assert!(!suits(512, 64 << 10) && !suits(0, 4096) && !suits(0, (64 << 10) + 512));
        // A disk reads the same bytes whichever way each read goes: direct,
        // or buffered for small or unaligned reads; past the end is an error
        // either way (the direct read fails, the buffered retry reports it).
        let disk = crate::device::Disk::open_source(&path).unwrap();
        assert!(disk.direct.is_some());
        let last = (data.len() - (64 << 10) - 512) as u64;
        for (offset, len) in [(0u64, 1usize << 20), (4096, 4096), (512, 128 << 10), (3 << 20, 512), (last, 64 << 10)] {
            let mut buf = vec![0u8; len];
            disk.read_bulk_at(&mut buf, offset).unwrap();
            assert_eq!(buf, &data[offset as usize..offset as usize + len], "offset {offset} len {len}");
        }
        let mut past = vec![0u8; 128 << 10];
        assert!(disk.read_bulk_at(&mut past, 3 << 20).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
