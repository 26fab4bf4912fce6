//! Reads and writes that bypass the page cache (O_DIRECT).
//!
//! A backup reads every used byte of the source once: through the page cache
//! each of those bytes costs the kernel a page allocated, filled, copied out
//! and later reclaimed (here 2 GiB took 1.3 s of system time that way, 0.1 s
//! read straight into our memory), and on a machine whose cores are busy
//! compressing, that CPU is the backup's time. O_DIRECT has the drive put
//! the data in our buffer. A restore writes every byte once, and the same
//! holds the other way round: [`WriteQueue`] hands the drive our buffers.
//!
//! O_DIRECT wants the file offset, the length and the memory address aligned
//! to the logical block size; [`ALIGN`] (4096) covers every sector size klon
//! accepts. Reads and writes that are not aligned, and filesystems that
//! refuse O_DIRECT, go through the page cache as before: this is a way of
//! reading and writing, never a reason for one to fail.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender};

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

/// Opens the file or device behind `file` (open for writing) a second time,
/// for direct writes: through /proc/self/fd, so it is the same one whatever
/// happened to its path since. `None` where that cannot be done.
pub fn reopen_for_writing(file: &File) -> Option<File> {
    OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()
}

/// Whether a read or write of `len` bytes at `offset` can be made direct.
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

/// Writes in flight at once. Each write of a chunk (8 MiB) is already
/// several requests to the drive; on this project's virtual disk 1, 2, 4
/// and 8 writers restored the same image in the same time (within the
/// disk's noise), so two, for the least memory.
pub const WRITERS: usize = 2;

/// Buffers a [`WriteQueue`] fills while its writers drain the others.
const BUFFERS: usize = WRITERS + 2;

/// Direct writes made by a few threads at once, from aligned buffers the
/// caller fills ([`WriteQueue::batch`], [`Batch::push`]) and hands over
/// ([`WriteQueue::submit`]); the caller goes on while they are written.
///
/// The writes of the queue are in flight until [`WriteQueue::finish`] (or
/// the drop) has waited for them, so a caller must not write the same
/// ranges another way meanwhile; ranges of their own may be written by
/// any means, since each direct write covers whole pages. A direct write
/// that fails is made again through the page cache (on a duplicate of the
/// ordinary descriptor); if that fails too, the error is the queue's: the
/// writers drop every later batch, and the next call returns it.
#[derive(Debug)]
pub struct WriteQueue {
    jobs: Option<Sender<Batch>>,
    free: Receiver<AlignedBuf>,
    /// Buffers made so far (at most [`BUFFERS`], made when first needed).
    made: usize,
    buf_len: usize,
    failed: Arc<Mutex<Option<(u64, std::io::Error)>>>,
    writers: Vec<std::thread::JoinHandle<()>>,
}

/// A buffer of data for the [`WriteQueue`] and where each piece of it goes.
#[derive(Debug)]
pub struct Batch {
    buf: AlignedBuf,
    used: usize,
    /// (offset in `buf`, length, offset on the disk)
    writes: Vec<(usize, usize, u64)>,
}

impl Batch {
    /// Adds `data`, to be written at `offset` (both aligned: see [`suits`]);
    /// false, and nothing added, when it does not fit.
    pub fn push(&mut self, data: &[u8], offset: u64) -> bool {
        debug_assert!(suits(offset, data.len()));
        if data.len() > self.buf.len - self.used {
            return false;
        }
        self.buf.as_mut_slice()[self.used..self.used + data.len()].copy_from_slice(data);
        self.writes.push((self.used, data.len(), offset));
        self.used += data.len();
        true
    }
}

impl WriteQueue {
    /// A queue writing through `direct` (see [`reopen_for_writing`]), with
    /// `buffered` (the ordinary descriptor of the same file) for retries,
    /// in buffers of `buf_len` bytes; `None` if its threads cannot start.
    pub fn new(direct: File, buffered: &File, buf_len: usize) -> Option<WriteQueue> {
        let direct = Arc::new(direct);
        let buffered = Arc::new(buffered.try_clone().ok()?);
        let (jobs, jobs_rx) = crossbeam_channel::unbounded::<Batch>();
        let (free_tx, free) = crossbeam_channel::unbounded::<AlignedBuf>();
        let failed = Arc::new(Mutex::new(None));
        let mut writers = Vec::new();
        for _ in 0..WRITERS {
            let (rx, free_tx, failed) = (jobs_rx.clone(), free_tx.clone(), failed.clone());
            let (direct, buffered) = (direct.clone(), buffered.clone());
            let spawned = std::thread::Builder::new()
                .name("klon-write".into())
                .spawn(move || writer(&direct, &buffered, &rx, &free_tx, &failed));
            match spawned {
                Ok(h) => writers.push(h),
                Err(_) => break,
            }
        }
        if writers.is_empty() {
            return None;
        }
        Some(WriteQueue { jobs: Some(jobs), free, made: 0, buf_len, failed, writers })
    }

    /// An empty batch, once a buffer is free; the error of an earlier write
    /// (with the disk offset it was at), if one failed.
    pub fn batch(&mut self) -> Result<Batch, (u64, std::io::Error)> {
        self.check()?;
        let buf = match self.free.try_recv() {
            Ok(b) => b,
            Err(_) if self.made < BUFFERS => {
                self.made += 1;
                AlignedBuf::new(self.buf_len)
            }
            Err(_) => self.free.recv().map_err(|_| (0, std::io::Error::other("the writing threads stopped")))?,
        };
        self.check()?;
        Ok(Batch { buf, used: 0, writes: Vec::new() })
    }

    /// Hands `batch` to the writers.
    pub fn submit(&mut self, batch: Batch) -> Result<(), (u64, std::io::Error)> {
        self.check()?;
        if let Some(jobs) = &self.jobs {
            jobs.send(batch).map_err(|_| (0, std::io::Error::other("the writing threads stopped")))?;
        }
        Ok(())
    }

    /// Waits for every write handed over; the first error of any.
    pub fn finish(mut self) -> Result<(), (u64, std::io::Error)> {
        self.join();
        self.check()
    }

    fn check(&self) -> Result<(), (u64, std::io::Error)> {
        match &*self.failed.lock().unwrap_or_else(|p| p.into_inner()) {
            // A copy: the queue stays failed for later calls.
            Some((at, e)) => Err((*at, std::io::Error::new(e.kind(), e.to_string()))),
            None => Ok(()),
        }
    }

    fn join(&mut self) {
        self.jobs = None;
        for w in self.writers.drain(..) {
            if w.join().is_err() {
                let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
                failed.get_or_insert((0, std::io::Error::other("a writing thread failed")));
            }
        }
    }
}

impl Drop for WriteQueue {
    /// Waits for the writes in flight: nothing may be written behind the
    /// back of whoever cleans up after a failure.
    fn drop(&mut self) {
        self.join();
    }
}

/// The body of a [`WriteQueue`] thread.
fn writer(
    direct: &File,
    buffered: &File,
    jobs: &Receiver<Batch>,
    free: &Sender<AlignedBuf>,
    failed: &Mutex<Option<(u64, std::io::Error)>>,
) {
    for mut batch in jobs {
        let data = batch.buf.as_mut_slice();
        for &(at, len, offset) in &batch.writes {
            if failed.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
                break;
            }
            let piece = &data[at..at + len];
            if direct.write_all_at(piece, offset).is_err()
                && let Err(e) = buffered.write_all_at(piece, offset)
            {
                failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert((offset, e));
            }
        }
        let _ = free.send(batch.buf);
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

    /// Data where every 4 KiB block says where it belongs.
    fn pattern(offset: u64, len: usize) -> Vec<u8> {
        (0..len).map(|i| ((offset + i as u64) / 4096 % 251) as u8 ^ (i % 7) as u8).collect()
    }

    #[test]
    fn write_queue_writes_every_batch_and_reuses_its_buffers() {
        let dir = std::env::temp_dir().join(format!("klon-direct-w-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("target");
        let size = 4u64 << 20;
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        f.set_len(size).unwrap();
        let mut expected = vec![0u8; size as usize];
        // Three ways of writing: direct; direct failing (a descriptor that
        // cannot write) so every write is retried through the page cache;
        // and, where O_DIRECT is refused, the retries alone.
        let read_only = File::open(&path).unwrap();
        let direct = reopen_for_writing(&f);
        for (round, d) in [direct, Some(read_only)].into_iter().enumerate() {
            let Some(d) = d else { continue };
            let mut q = WriteQueue::new(d, &f, 256 << 10).unwrap();
            // More batches than buffers: the buffers must come back, empty
            // batches too.
            for i in 0..(3 * BUFFERS as u64) {
                let mut b = q.batch().unwrap();
                if i % 3 != 2 {
                    // Ranges of their own: writes in flight may run in any order.
                    let a = i * (128 << 10);
                    let data = pattern(a + round as u64, 64 << 10);
                    assert!(b.push(&data, a));
                    expected[a as usize..a as usize + data.len()].copy_from_slice(&data);
                    let c = (2 << 20) + i * (128 << 10);
                    let data = pattern(c + 7 + round as u64, 128 << 10);
                    assert!(b.push(&data, c));
                    expected[c as usize..c as usize + data.len()].copy_from_slice(&data);
                    assert!(!b.push(&pattern(0, 128 << 10), 0), "a buffer takes no more than its size");
                }
                q.submit(b).unwrap();
            }
            q.finish().unwrap();
            assert!(std::fs::read(&path).unwrap() == expected, "round {round}: the file is not what was written");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_queue_reports_a_failed_write_with_its_offset() {
        let dir = std::env::temp_dir().join(format!("klon-direct-e-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("target");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        // Neither descriptor can write: the direct write and its retry fail.
        let (d, f) = (File::open(&path).unwrap(), File::open(&path).unwrap());
        let mut q = WriteQueue::new(d, &f, 128 << 10).unwrap();
        let mut b = q.batch().unwrap();
        assert!(b.push(&pattern(0, 64 << 10), 192 << 10));
        q.submit(b).unwrap();
        // Later calls fail once the writers have seen it; finish always does.
        let mut failed_early = false;
        for _ in 0..1000 {
            match q.batch() {
                Ok(b) => q.submit(b).unwrap(),
                Err((at, _)) => {
                    assert_eq!(at, 192 << 10);
                    failed_early = true;
                    break;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(failed_early, "the queue never reported its failed write");
        let (at, e) = q.finish().unwrap_err();
        assert_eq!(at, 192 << 10);
        assert!(e.to_string().contains("os error 9"), "not the retry's EBADF: {e}");
        assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
