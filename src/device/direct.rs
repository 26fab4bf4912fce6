//! Reads and writes that bypass the page cache (O_DIRECT).
//!
//! A backup reads every used byte of the source once: through the page cache
//! each of those bytes costs the kernel a page allocated, filled, copied out
//! and later reclaimed (here 2 GiB took 1.3 s of system time that way, 0.1 s
//! read straight into our memory), and on a machine whose cores are busy
//! compressing, that CPU is the backup's time. O_DIRECT has the drive put
//! the data in our buffer. The image's data files are written the same way
//! ([`DirectWriter`]): through the page cache, copying 3.4 GiB of image
//! into it cost 4.4 s of CPU in a 6 GiB backup (perf: the kernel's copy into
//! fresh page-cache pages ran at under 1 GB/s). So is a restore's or a
//! clone's target, where that copy was about 8 s of CPU for 5.6 GiB.
//!
//! A backup reads into buffers of a [`BufPool`]: aligned, so the drive
//! fills them without a bounce through another buffer, and reused, so no
//! chunk's buffer is allocated and zeroed anew (together about 4 % of a
//! backup's CPU). A restore or verify reads image records and decompresses
//! their content into such buffers too (a raw restore's system time fell
//! by half).
//!
//! O_DIRECT wants the file offset, the length and the memory address aligned
//! to the logical block size; [`ALIGN`] (4096) covers every sector size klon
//! accepts. Reads and writes that are not aligned, and filesystems that
//! refuse O_DIRECT, go through the page cache as before: this is a way of
//! reading and writing, never a reason for either to fail.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use crossbeam_channel::{Receiver, Sender, bounded};

/// Alignment of offsets, lengths and buffers for direct reads.
pub const ALIGN: usize = 4096;

/// Reads, and runs of writes, shorter than this go through the page cache:
/// for them the saving is small, and the readahead of the page cache (or
/// its writeback, which lets the kernel merge small writes) is worth more.
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
        let bounce = b.get_or_insert_with(|| IoBuf::aligned(BOUNCE));
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(BOUNCE);
            read_in_halves(file, &mut bounce[..n], offset + done as u64)?;
            buf[done..done + n].copy_from_slice(&bounce[..n]);
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
    static BOUNCE_BUF: std::cell::RefCell<Option<IoBuf>> = const { std::cell::RefCell::new(None) };
}

/// Bytes held in a Vec from some start: aligned for direct I/O when made by
/// [`IoBuf::aligned`] or taken from a [`BufPool`], from the Vec's first byte
/// when made from a Vec.
/// Dropped, a pooled buffer goes back to its pool, so the next one taken
/// is neither allocated nor zeroed again.
pub struct IoBuf {
    vec: Vec<u8>,
    start: usize,
    len: usize,
    pool: Option<Sender<Vec<u8>>>,
}

impl IoBuf {
    /// `len` zero bytes starting at a multiple of [`ALIGN`], in a Vec
    /// over-allocated by one alignment (never resized while aligned use
    /// lasts, so the address holds); no pool.
    pub fn aligned(len: usize) -> IoBuf {
        let vec = vec![0u8; len + ALIGN];
        let start = vec.as_ptr().align_offset(ALIGN);
        IoBuf { vec, start, len, pool: None }
    }

    /// Shortens the bytes to `len` (no-op if they are not longer).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Drops the first `n` bytes (all of them if there are fewer), without
    /// moving the rest.
    pub fn skip_front(&mut self, n: usize) {
        let n = n.min(self.len);
        self.start += n;
        self.len -= n;
    }

    /// Appends `bytes`. The bytes may move (and lose their alignment).
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.vec.truncate(self.start + self.len);
        self.vec.extend_from_slice(bytes);
        self.len += bytes.len();
    }
}

impl From<Vec<u8>> for IoBuf {
    fn from(vec: Vec<u8>) -> IoBuf {
        IoBuf { len: vec.len(), vec, start: 0, pool: None }
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.vec[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.vec[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len)
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            // A full pool (or one no longer used) lets the buffer go.
            let _ = pool.try_send(std::mem::take(&mut self.vec));
        }
    }
}

/// Buffers of up to `buf_len` bytes, aligned for direct reads, kept for
/// reuse: at most `keep` wait in the pool, more may be out at a time.
/// Clones share the pool.
#[derive(Debug, Clone)]
pub struct BufPool {
    free: Receiver<Vec<u8>>,
    give_back: Sender<Vec<u8>>,
    buf_len: usize,
}

impl BufPool {
    /// An empty pool.
    pub fn new(keep: usize, buf_len: usize) -> BufPool {
        let (give_back, free) = bounded(keep.max(1));
        BufPool { free, give_back, buf_len }
    }

    /// Whether a buffer of `len` bytes can come from this pool.
    pub fn fits(&self, len: usize) -> bool {
        len <= self.buf_len
    }

    /// A buffer of `len` bytes (at most the pool's buffer size) starting at
    /// an aligned address. Its bytes are what the buffer held before (zeros
    /// when new): the caller overwrites all of them.
    pub fn take(&self, len: usize) -> IoBuf {
        assert!(len <= self.buf_len, "a buffer of {len} bytes from a pool of {}", self.buf_len);
        let vec = self.free.try_recv().unwrap_or_else(|_| vec![0u8; self.buf_len + ALIGN]);
        let start = vec.as_ptr().align_offset(ALIGN);
        IoBuf { vec, start, len, pool: Some(self.give_back.clone()) }
    }
}

/// A write of a [`DirectWriter`] that failed: where, and why.
#[derive(Debug)]
pub struct WriteError {
    /// File offset of the write; None for the final flush to stable storage.
    pub offset: Option<u64>,
    /// What the system said.
    pub error: std::io::Error,
}

/// Writes a file or a device, each byte at most once, past the page cache
/// where it can. Each *run* of contiguous writes gathers in an aligned
/// buffer; each full buffer is written by a thread of its own while the
/// other buffer fills, so the caller waits for the drive only when it is a
/// whole buffer ahead. A write that does not continue the run ends it: the
/// run's whole blocks go the same way, its last partial block through the
/// page cache. The bytes before a run's first aligned offset, and runs
/// shorter than [`MIN_DIRECT`], go through the page cache too.
///
/// Where the file cannot be opened for O_DIRECT, or a direct write fails
/// for any reason, that buffer and all later ones are written through the
/// page cache instead (and their writeback started at once, see
/// [`super::write_behind`]); a write that fails that way too is the error.
/// Writes made the two ways never share a block, so the order in which
/// they reach the drive does not matter. The buffers (2 × the size given)
/// are allocated by the first write and freed by `finish`; dropping the
/// writer unfinished still waits for the buffer being written.
pub struct DirectWriter {
    /// The file, opened the ordinary way: page-cache writes and the fsync.
    file: File,
    /// Where full buffers go while no thread writes them.
    sink: Option<Sink>,
    /// Size of each buffer.
    buf_len: usize,
    /// The buffer being filled, and how much of it is.
    fill: Option<IoBuf>,
    used: usize,
    /// File offset of the first byte of `fill`: aligned once `used` > 0.
    pos: u64,
    /// The writing thread, once started.
    writer: Option<WriteThread>,
}

/// Writes whole buffers: direct while that works, then through the page cache.
struct Sink {
    direct: Option<File>,
    buffered: File,
    /// Large direct writes as two at once (see [`DirectWriter::in_halves`]).
    halves: bool,
}

impl Sink {
    fn write(&mut self, bytes: &[u8], offset: u64) -> Result<(), WriteError> {
        if let Some(d) = &self.direct {
            let written = if self.halves { write_in_halves(d, bytes, offset) } else { d.write_all_at(bytes, offset) };
            match written {
                Ok(()) => return Ok(()),
                // The drive failed, rather than refused a direct write:
                // through the page cache the write would seem to work and
                // fail only at the flush, naming no place. Find the block.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                    return locate_failure(offset, bytes.len(), |at, r| d.write_all_at(&bytes[r], at))
                        .map_err(|(offset, error)| WriteError { offset: Some(offset), error });
                }
                Err(_) => self.direct = None,
            }
        }
        write_buffered(&self.buffered, bytes, offset)
    }
}

/// Where a read or a write of `len` bytes at `offset` that failed as a
/// whole fails: `op(at, range)` does the part `range` of the bytes, at
/// file offset `at`, and is tried again on each block of [`ALIGN`] bytes
/// of the file in order (pieces of the first and last where the range
/// starts or ends inside one). Returns the first failure with the offset
/// of its block; Ok when every block worked (the failure passed, and the
/// bytes are read or written). A drive that fails a request of megabytes
/// names no sector; someone rescuing or replacing it needs one.
pub fn locate_failure(
    offset: u64,
    len: usize,
    mut op: impl FnMut(u64, std::ops::Range<usize>) -> std::io::Result<()>,
) -> Result<(), (u64, std::io::Error)> {
    let mut done = 0usize;
    while done < len {
        let at = offset + done as u64;
        let n = (ALIGN - (at % ALIGN as u64) as usize).min(len - done);
        op(at, done..done + n).map_err(|e| (at, e))?;
        done += n;
    }
    Ok(())
}

/// One direct write, or for a large one two at once (the second half on a
/// thread of its own, or after the first if no thread can be had), for the
/// same reason as [`read_in_halves`].
fn write_in_halves(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    if bytes.len() < SPLIT_MIN {
        return file.write_all_at(bytes, offset);
    }
    let mid = (bytes.len() / 2).next_multiple_of(ALIGN);
    let (a, b) = bytes.split_at(mid);
    std::thread::scope(|s| {
        let second = std::thread::Builder::new().spawn_scoped(s, || file.write_all_at(b, offset + mid as u64));
        let first = file.write_all_at(a, offset);
        let second = match second {
            Ok(h) => h.join().unwrap_or_else(|_| Err(std::io::Error::other("writing thread failed"))),
            Err(_) => file.write_all_at(b, offset + mid as u64),
        };
        first.and(second)
    })
}

/// Writes a whole buffer through the page cache and starts its writeback
/// at once (the pieces of a run too small for a direct write are left to
/// the kernel's writeback and the final fsync: starting the writeback of
/// each would send the drive writes of a few kilobytes).
fn write_buffered(file: &File, bytes: &[u8], offset: u64) -> Result<(), WriteError> {
    write_small(file, bytes, offset)?;
    super::write_behind(file, offset, bytes.len() as u64);
    Ok(())
}

/// Writes through the page cache.
fn write_small(file: &File, bytes: &[u8], offset: u64) -> Result<(), WriteError> {
    file.write_all_at(bytes, offset).map_err(|error| WriteError { offset: Some(offset), error })
}

/// A buffer for the thread to write: its first `len` bytes at `offset`.
struct WriteJob {
    buf: IoBuf,
    offset: u64,
    len: usize,
}

struct WriteThread {
    jobs: Option<Sender<WriteJob>>,
    done: Receiver<(IoBuf, Result<(), WriteError>)>,
    handle: Option<std::thread::JoinHandle<Sink>>,
    in_flight: bool,
}

impl WriteThread {
    /// Ends the thread (after the buffer it is writing) and takes its sink back.
    fn stop(&mut self) -> Option<Sink> {
        self.jobs = None;
        self.handle.take().and_then(|h| h.join().ok())
    }
}

impl Drop for WriteThread {
    fn drop(&mut self) {
        // A writer dropped unfinished (a failed job) stops its thread.
        self.stop();
    }
}

impl std::fmt::Debug for DirectWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DirectWriter(at {})", self.end())
    }
}

impl DirectWriter {
    /// Writes to `file`; `direct` is the same file opened with O_DIRECT
    /// (see [`open_for_writing`]), or None to go through the page cache.
    /// `buf_len`, a multiple of [`ALIGN`], is the size of each of the two
    /// buffers: the size of the direct writes. Fails only if `file` cannot
    /// be duplicated.
    pub fn new(file: File, direct: Option<File>, buf_len: usize) -> std::io::Result<DirectWriter> {
        assert!(buf_len >= MIN_DIRECT && buf_len.is_multiple_of(ALIGN), "buffer of {buf_len} bytes");
        let sink = Sink { direct, buffered: file.try_clone()?, halves: false };
        Ok(DirectWriter { file, sink: Some(sink), buf_len, fill: None, used: 0, pos: 0, writer: None })
    }

    /// Makes each direct write of a buffer two writes of half its size at
    /// once, keeping two requests in flight. Restoring 5.6 GiB from a RAM
    /// disk, alternated rounds: 8 MiB buffers written in halves took
    /// 10.8-16.6 s (median 12.8) where buffered writes took 12.6-14.9 s
    /// (13.5), and onto a loop device 14.5-16.8 s against 14.8-19.6 s
    /// buffered and 14.0-17.9 s written whole. Backups writing their image
    /// files in halves were slower in each of four rounds (the image is
    /// written while the source is read, so the drive has work queued).
    pub fn in_halves(mut self) -> DirectWriter {
        if let Some(sink) = &mut self.sink {
            sink.halves = true;
        }
        self
    }

    /// The offset just past the last byte written: the length of a file
    /// written from its start by [`DirectWriter::append`] alone.
    pub fn end(&self) -> u64 {
        self.pos + self.used as u64
    }

    /// Writes `data` just after the last byte written.
    pub fn append(&mut self, data: &[u8]) -> Result<(), WriteError> {
        self.write_at(data, self.end())
    }

    /// Writes `data` at `offset`. A caller may not write a byte twice
    /// before `finish`.
    pub fn write_at(&mut self, mut data: &[u8], offset: u64) -> Result<(), WriteError> {
        if offset != self.end() {
            self.end_run()?;
            self.pos = offset;
        }
        // Direct writes start on an aligned offset: the bytes before the
        // first one of a run go through the page cache.
        if self.used == 0 && !self.pos.is_multiple_of(ALIGN as u64) && !data.is_empty() {
            let head = (ALIGN - (self.pos % ALIGN as u64) as usize).min(data.len());
            write_small(&self.file, &data[..head], self.pos)?;
            self.pos += head as u64;
            data = &data[head..];
        }
        while !data.is_empty() {
            let buf = self.fill.get_or_insert_with(|| IoBuf::aligned(self.buf_len));
            let n = data.len().min(self.buf_len - self.used);
            buf[self.used..self.used + n].copy_from_slice(&data[..n]);
            self.used += n;
            data = &data[n..];
            if self.used == self.buf_len {
                self.hand_over(self.buf_len)?;
            }
        }
        Ok(())
    }

    /// Writes the run gathered in the buffer: its whole blocks the way full
    /// buffers go (when there are enough of them), the rest through the
    /// page cache.
    fn end_run(&mut self) -> Result<(), WriteError> {
        if self.used == 0 {
            return Ok(());
        }
        let end = self.end();
        let whole = if self.used >= MIN_DIRECT { self.used / ALIGN * ALIGN } else { 0 };
        let buf = self.fill.as_mut().expect("a run has a buffer");
        write_small(&self.file, &buf[whole..self.used], self.pos + whole as u64)?;
        if whole > 0 {
            self.hand_over(whole)?;
        }
        self.pos = end;
        self.used = 0;
        Ok(())
    }

    /// Has the first `len` bytes of the buffer written (by the thread,
    /// started by the first call, or here if no thread can be had) and goes
    /// on with the other buffer: new the first time, then the one the
    /// thread is writing, once it is written.
    fn hand_over(&mut self, len: usize) -> Result<(), WriteError> {
        let full = self.fill.take().expect("a buffer to write");
        let offset = self.pos;
        self.pos += len as u64;
        self.used = 0;
        if self.writer.is_none()
            && let Some(sink) = self.sink.take()
        {
            self.writer = start_write_thread(sink).map_err(|sink| self.sink = Some(sink)).ok();
        }
        let next = match &mut self.writer {
            Some(w) => {
                let next = match Self::wait(w)? {
                    Some(b) => b,
                    None => IoBuf::aligned(self.buf_len),
                };
                let jobs = w.jobs.as_ref().expect("jobs end only when the thread stops");
                jobs.send(WriteJob { buf: full, offset, len }).expect("the writing thread runs until its jobs end");
                w.in_flight = true;
                next
            }
            None => {
                let sink = self.sink.as_mut().expect("no thread: the sink is here");
                sink.write(&full[..len], offset)?;
                full
            }
        };
        self.fill = Some(next);
        Ok(())
    }

    /// Waits for the buffer `w` is writing, if any; returns it.
    fn wait(w: &mut WriteThread) -> Result<Option<IoBuf>, WriteError> {
        if !w.in_flight {
            return Ok(None);
        }
        w.in_flight = false;
        let (buf, result) = w.done.recv().expect("the writing thread answers every job");
        result.map(|()| Some(buf))
    }

    /// Writes what is left, flushes the file to stable storage and frees
    /// the buffers. Returns the file and [`DirectWriter::end`].
    pub fn finish(mut self) -> Result<(File, u64), WriteError> {
        let end = self.end();
        self.end_run()?;
        if let Some(mut w) = self.writer.take() {
            let waited = Self::wait(&mut w);
            w.stop();
            waited?;
        }
        self.file.sync_all().map_err(|error| WriteError { offset: None, error })?;
        Ok((self.file, end))
    }
}

/// Opens `path`, a file or a device already open, a second time for
/// direct writes; `None` where its filesystem or driver refuses O_DIRECT.
pub fn open_for_writing(path: &Path) -> Option<File> {
    OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path).ok()
}

/// Starts the thread that writes the buffers it is sent at their offsets
/// through `sink` and sends each back with the result; gives `sink` back
/// if no thread can be started.
fn start_write_thread(sink: Sink) -> std::result::Result<WriteThread, Sink> {
    let (jobs, job_rx) = bounded::<WriteJob>(1);
    let (done_tx, done) = bounded(1);
    // The sink travels by channel so that it can come back if the thread
    // cannot be started (the closure, and whatever it owns, is then gone).
    let (sink_tx, sink_rx) = bounded::<Sink>(1);
    sink_tx.send(sink).expect("room for one");
    let sink_back = sink_rx.clone();
    let spawned = std::thread::Builder::new().name("klon-direct-write".into()).spawn(move || {
        let mut sink = sink_rx.recv().expect("sent before the thread started");
        for WriteJob { buf, offset, len } in job_rx {
            let result = sink.write(&buf[..len], offset);
            if done_tx.send((buf, result)).is_err() {
                break;
            }
        }
        sink
    });
    match spawned {
        Ok(handle) => Ok(WriteThread { jobs: Some(jobs), done, handle: Some(handle), in_flight: false }),
        Err(_) => Err(sink_back.recv().expect("the sink is still in the channel")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_located_to_its_block() {
        let bad = 3 * ALIGN as u64 + 700;
        let mut tried = Vec::new();
        let r = locate_failure(1000, 5 * ALIGN, |at, range| {
            tried.push((at, range.len()));
            if at <= bad && bad < at + range.len() as u64 {
                Err(std::io::Error::from_raw_os_error(libc::EIO))
            } else {
                Ok(())
            }
        });
        let (at, e) = r.unwrap_err();
        assert_eq!((at, e.raw_os_error()), (3 * ALIGN as u64, Some(libc::EIO)));
        // Blocks of the file in order, the first cut where the range starts.
        assert_eq!(tried, [(1000, ALIGN - 1000), (4096, ALIGN), (8192, ALIGN), (12288, ALIGN)]);
        // Nothing fails on the retry: the whole range is done.
        let mut bytes = 0;
        let all = locate_failure(0, 10_000, |_, r| {
            bytes += r.len();
            Ok(())
        });
        assert!(all.is_ok());
        assert_eq!(bytes, 10_000);
    }

    #[test]
    fn pooled_buffers_are_aligned_and_reused() {
        let pool = BufPool::new(2, 1 << 20);
        let mut a = pool.take(1 << 20);
        assert!((a.as_ptr() as usize).is_multiple_of(ALIGN));
        assert_eq!(a.len(), 1 << 20);
        a[..4].copy_from_slice(b"klon");
        let addr = a.as_ptr();
        drop(a);
        // The same memory comes back, bytes as they were left.
        let mut b = pool.take(4096);
        assert_eq!((b.as_ptr(), b.len(), &b[..4]), (addr, 4096, &b"klon"[..]));
        b.truncate(2);
        assert_eq!(&b[..], b"kl");
        b.truncate(100);
        assert_eq!(b.len(), 2);
        b.skip_front(1);
        assert_eq!(&b[..], b"l");
        b.skip_front(5);
        assert!(b.is_empty());
        // A second buffer out at the same time is another one.
        let c = pool.take(4096);
        assert_ne!(c.as_ptr(), b.as_ptr());
        // Bytes from a Vec: as they are, and they grow.
        let mut v = IoBuf::from(b"abc".to_vec());
        v.extend_from_slice(b"de");
        assert_eq!(&v[..], b"abcde");
        v.truncate(1);
        v.extend_from_slice(b"z");
        assert_eq!(&v[..], b"az");
    }

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
        let mut aligned = IoBuf::aligned(1 << 20);
        read_exact_at(&f, &mut aligned, 2 << 20).unwrap();
        assert_eq!(&aligned[..], &data[2 << 20..3 << 20]);
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

    /// tmpfs before Linux 6.6 refuses O_DIRECT; every other filesystem a
    /// test directory is on takes it.
    fn on_tmpfs(dir: &Path) -> bool {
        nix::sys::statfs::statfs(dir).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
    }

    /// Bytes that differ at every offset, so a misplaced block shows.
    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        (0..len as u32).map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) as u8).collect()
    }

    /// Buffer size for the tests: small, so that files of a few buffers
    /// test every case, and large enough to be written in halves.
    const BUF: usize = 2 * SPLIT_MIN;

    /// Appends `data` in pieces of the lengths `pieces` (cycled) to a new
    /// file at `path`, opened for direct writes when `direct` says so, and
    /// returns what `finish` said the length was.
    fn append_all(path: &Path, data: &[u8], pieces: &[usize], direct: Option<File>, halves: bool) -> u64 {
        let f = File::create(path).unwrap();
        let mut a = DirectWriter::new(f, direct, BUF).unwrap();
        if halves {
            a = a.in_halves();
        }
        let mut at = 0;
        for &n in pieces.iter().cycle() {
            if at == data.len() {
                break;
            }
            let n = n.min(data.len() - at);
            a.append(&data[at..at + n]).unwrap();
            at += n;
            assert_eq!(a.end(), at as u64);
        }
        let (_, len) = a.finish().unwrap();
        len
    }

    #[test]
    fn appended_files_hold_exactly_the_bytes_appended_whichever_way_they_were_written() {
        let dir = std::env::temp_dir().join(format!("klon-append-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("data");
        // Lengths around the buffer size and the block size: nothing, less
        // than a block, whole buffers, several buffers and an odd tail.
        let lengths = [0, 1, 4095, 4096, MIN_DIRECT + 1, BUF - 1, BUF, BUF + 1, 3 * BUF + 12_345];
        for (k, &len) in lengths.iter().enumerate() {
            let data = pattern(len, k as u32);
            for pieces in [&[len.max(1)][..], &[1, 4096, 100_000, 7], &[BUF + 3]] {
                // Direct where the filesystem allows it (None where it
                // does not), buffers written whole and in halves.
                for halves in [false, true] {
                    std::fs::remove_file(&path).ok();
                    File::create(&path).unwrap();
                    let direct = open_for_writing(&path);
                    assert!(direct.is_some() || on_tmpfs(&dir), "{} refuses O_DIRECT", dir.display());
                    assert_eq!(append_all(&path, &data, pieces, direct, halves), len as u64);
                    let how = if halves { "in halves" } else { "whole" };
                    assert!(std::fs::read(&path).unwrap() == data, "direct {how}, {len} bytes in pieces {pieces:?}");
                }
                // Through the page cache.
                std::fs::remove_file(&path).unwrap();
                assert_eq!(append_all(&path, &data, pieces, None, false), len as u64);
                assert!(std::fs::read(&path).unwrap() == data, "buffered, {len} bytes in pieces {pieces:?}");
                // A "direct" file every write to fails (opened read-only):
                // each buffer falls back to the page cache, nothing is lost.
                std::fs::remove_file(&path).unwrap();
                File::create(&path).unwrap();
                let refusing = File::open(&path).unwrap();
                assert_eq!(append_all(&path, &data, pieces, Some(refusing), true), len as u64);
                assert!(std::fs::read(&path).unwrap() == data, "fallback, {len} bytes in pieces {pieces:?}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn runs_written_at_offsets_land_exactly_there_and_nowhere_else() {
        let dir = std::env::temp_dir().join(format!("klon-runs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk");
        let size = 4 * BUF + 3 * ALIGN;
        let old = pattern(size, 77);
        // Runs of contiguous writes (start, piece lengths), ascending, with
        // gaps between them: aligned and unaligned starts and ends, runs
        // shorter than a block, than MIN_DIRECT, and longer than a buffer,
        // and gaps smaller than a block.
        let runs: &[(usize, &[usize])] = &[
            (0, &[ALIGN]),
            (ALIGN + 100, &[10]),
            (ALIGN + 200, &[ALIGN - 200, MIN_DIRECT + 5]),
            (3 * ALIGN + MIN_DIRECT + 1000, &[BUF, 1, BUF - 7, 3]),
            (2 * BUF + 8 * ALIGN, &[MIN_DIRECT]),
            (2 * BUF + 8 * ALIGN + MIN_DIRECT + 1, &[BUF + 5000, 1]),
            (4 * BUF, &[3 * ALIGN - 1]),
        ];
        let new = pattern(size, 78);
        let mut expected = old.clone();
        for (k, how) in ["direct", "direct in halves", "buffered", "fallback"].iter().enumerate() {
            std::fs::write(&path, &old).unwrap();
            let direct = match k {
                0 | 1 => open_for_writing(&path),
                2 => None,
                _ => Some(File::open(&path).unwrap()),
            };
            assert!(k > 1 || direct.is_some() || on_tmpfs(&dir), "{} refuses O_DIRECT", dir.display());
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let mut w = DirectWriter::new(f, direct, BUF).unwrap();
            if k == 1 {
                w = w.in_halves();
            }
            for &(start, pieces) in runs {
                let mut at = start;
                for &n in pieces {
                    w.write_at(&new[at..at + n], at as u64).unwrap();
                    expected[at..at + n].copy_from_slice(&new[at..at + n]);
                    at += n;
                    assert_eq!(w.end(), at as u64);
                }
            }
            w.finish().unwrap();
            let got = std::fs::read(&path).unwrap();
            assert_eq!(got.len(), size);
            if let Some(i) = (0..size).find(|&i| got[i] != expected[i]) {
                panic!("{how}: first wrong byte at {i}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_append_that_cannot_be_written_is_an_error_with_its_offset() {
        let dir = std::env::temp_dir().join(format!("klon-append-err-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("data");
        File::create(&path).unwrap();
        // Neither way can write: the file is open read-only both times.
        let mut a = DirectWriter::new(File::open(&path).unwrap(), Some(File::open(&path).unwrap()), BUF).unwrap();
        let data = pattern(3 * BUF, 9);
        // The first full buffer goes to the thread; its failure shows when
        // that buffer is waited for (at the next hand-over) or at finish.
        let err = a.append(&data).and_then(|()| a.finish().map(|_| ())).unwrap_err();
        assert_eq!(err.offset, Some(0));
        assert_eq!(err.error.raw_os_error(), Some(libc::EBADF));
        // Only the tail, written at finish, fails there: its offset is where it goes.
        let mut a = DirectWriter::new(File::open(&path).unwrap(), None, BUF).unwrap();
        a.append(&data[..100]).unwrap();
        let err = a.finish().unwrap_err();
        assert_eq!((err.offset, err.error.raw_os_error()), (Some(0), Some(libc::EBADF)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
