//! Reading the source into jobs: bytes read at disk offsets packed into
//! jobs of at most one chunk of one stream (in two lanes where that pays,
//! cut at a repository's windows), and a failing disk's rescue pass.

use crate::device::Disk;
use crate::device::direct::{BufPool, IoBuf};
use crate::engine::{cancel, streams};
use crate::error::{Error, Result};
use crate::image::Lane;
use crate::image::format::{CHUNK_SIZE, Extent, MAX_EXTENTS};

/// Bytes read from the source for one chunk.
pub(crate) struct ReadJob {
    /// Index of the stream.
    pub stream: usize,
    /// Disk ranges the bytes of `buf` came from, in order.
    pub extents: Vec<Extent>,
    /// The bytes.
    pub buf: IoBuf,
    /// Whether long zero runs may be left out.
    pub skip_zero: bool,
    /// Which lane of its stream the chunk goes to (see [`read_jobs`]).
    pub lane: Lane,
}

/// Packs bytes read at disk offsets into jobs of at most one chunk (and
/// [`MAX_EXTENTS`] extents) of one stream each, adjacent bytes merged into
/// one extent, handing each full job to the pipeline: for sources read
/// piece by piece (a Clonezilla image's streams, a rescue's sectors).
/// With a window (a repository's), no job crosses a multiple of it.
#[derive(Default)]
pub(crate) struct JobFiller {
    job: Option<ReadJob>,
    window: Option<u64>,
}

impl JobFiller {
    /// A filler whose jobs do not cross multiples of `window`.
    pub fn new(window: Option<u64>) -> JobFiller {
        JobFiller { job: None, window }
    }

    /// Adds `bytes` (at most a chunk), read at disk `offset`, to the job of
    /// `stream`; sends the job before when it is of another stream or
    /// window, or full. False when the pipeline stopped.
    pub fn push(
        &mut self,
        stream: usize,
        skip_zero: bool,
        offset: u64,
        bytes: &[u8],
        send: &mut dyn FnMut(ReadJob) -> bool,
    ) -> bool {
        let Some(w) = self.window else { return self.push_piece(stream, skip_zero, offset, bytes, send) };
        let mut at = 0;
        while at < bytes.len() {
            let here = offset + at as u64;
            let n = ((w - here % w) as usize).min(bytes.len() - at);
            if !self.push_piece(stream, skip_zero, here, &bytes[at..at + n], send) {
                return false;
            }
            at += n;
        }
        true
    }

    fn push_piece(
        &mut self,
        stream: usize,
        skip_zero: bool,
        offset: u64,
        bytes: &[u8],
        send: &mut dyn FnMut(ReadJob) -> bool,
    ) -> bool {
        let window = self.window;
        let full = self.job.as_ref().is_some_and(|j| {
            j.stream != stream
                || j.buf.len() + bytes.len() > CHUNK_SIZE as usize
                || j.extents.len() >= MAX_EXTENTS as usize
                || window.is_some_and(|w| j.extents[0].0 / w != offset / w)
        });
        if full && !send(self.job.take().expect("job present")) {
            return false;
        }
        let j = self.job.get_or_insert_with(|| ReadJob {
            stream,
            extents: Vec::new(),
            buf: Vec::with_capacity(window.map_or(CHUNK_SIZE as usize, |w| w as usize)).into(),
            skip_zero,
            lane: Lane::First,
        });
        j.buf.extend_from_slice(bytes);
        match j.extents.last_mut() {
            Some(last) if last.0 + last.1 == offset => last.1 += bytes.len() as u64,
            _ => j.extents.push((offset, bytes.len() as u64)),
        }
        true
    }

    /// Sends the last job, if any.
    pub fn finish(self, send: &mut dyn FnMut(ReadJob) -> bool) {
        if let Some(j) = self.job {
            send(j);
        }
    }
}

/// Each lane of a stream read in two lanes holds at least this many jobs:
/// a stream of fewer than twice as many is read in one.
const MIN_LANE_JOBS: usize = 2;

/// Whether reading `source` in two lanes at once is likely to pay: not on
/// a disk that says it spins, where alternating between two places costs
/// a seek each time. Files (disk images) are read in lanes whatever holds
/// them.
pub(crate) fn lanes_suit(source: &Disk) -> bool {
    !crate::device::sysfs::is_rotational(source)
}

/// Reads the streams `order` of `plans` from `source` and hands the bytes to
/// `send` in jobs of at most CHUNK_SIZE bytes: one large read for raw
/// streams, many small extents packed together for a filesystem's used
/// blocks. Returns early (Ok) when `send` says the pipeline stopped.
///
/// With `lanes`, a filesystem's used blocks are read in two lanes (see
/// [`StreamJobs`]); with `window`, no job crosses a multiple of it (a
/// repository's chunks: see [`JobPacker`]).
pub(crate) fn read_jobs(
    source: &Disk,
    plans: &[streams::StreamPlan],
    order: &[usize],
    lanes: bool,
    window: Option<u64>,
    rescue: Option<&Rescue>,
    send: &mut dyn FnMut(ReadJob) -> bool,
) -> Result<()> {
    // A job holds at most one window (or chunk): buffers of that size, so
    // the more jobs in flight of smaller windows hold no more memory.
    let pool = BufPool::new(READ_BUFS_KEPT, window.map_or(CHUNK_SIZE as usize, |w| w as usize));
    for &si in order {
        let plan = &plans[si];
        // Zero runs may be left out of raw streams, so their jobs do not
        // map one to one to chunks: they are read in one lane.
        for (extents, lane) in StreamJobs::new(&plan.reads, lanes && !plan.skip_zero, window) {
            if !send(read_job(source, &pool, plan, si, extents, lane, rescue)?) {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The jobs of one stream, in the order they are read: in disk order, or
/// in two lanes, where jobs from the first and the second half of the
/// stream alternate.
///
/// Where data differs along the disk (text that keeps the compressor busy
/// in one place, already compressed files that keep the drive busy in
/// another) two lanes keep both the cores and the drive at work, where one
/// sequence would use them in turns. Each job must make exactly one chunk:
/// the second lane's chunks are numbered from the first lane's job count,
/// and the image writer checks that the first lane ends there (see
/// [`Lane`]).
struct StreamJobs<'a> {
    first: JobPacker<'a>,
    /// Jobs the first lane has still to give.
    first_left: usize,
    second: Option<(JobPacker<'a>, Lane)>,
    /// Flips before each job: the first job is the first lane's.
    first_turn: bool,
}

impl<'a> StreamJobs<'a> {
    fn new(reads: &'a [Extent], lanes: bool, window: Option<u64>) -> StreamJobs<'a> {
        let first = JobPacker::new(reads, window);
        let mut jobs = StreamJobs { first: first.clone(), first_left: usize::MAX, second: None, first_turn: false };
        if lanes {
            let count = first.clone().count_jobs();
            if count >= 2 * MIN_LANE_JOBS {
                let first_jobs = count.div_ceil(2);
                let mut rest = first;
                for _ in 0..first_jobs {
                    rest.next_job();
                }
                jobs.second = Some((rest, Lane::Second { first_seq: first_jobs as u64 }));
                jobs.first_left = first_jobs;
            }
        }
        jobs
    }

    fn next_first(&mut self) -> Option<(Vec<Extent>, Lane)> {
        if self.first_left == 0 {
            return None;
        }
        let extents = self.first.next_job()?;
        self.first_left -= 1;
        Some((extents, Lane::First))
    }

    fn next_second(&mut self) -> Option<(Vec<Extent>, Lane)> {
        let (packer, lane) = self.second.as_mut()?;
        Some((packer.next_job()?, *lane))
    }
}

impl Iterator for StreamJobs<'_> {
    type Item = (Vec<Extent>, Lane);

    fn next(&mut self) -> Option<Self::Item> {
        self.first_turn = !self.first_turn;
        if self.first_turn {
            self.next_first().or_else(|| self.next_second())
        } else {
            self.next_second().or_else(|| self.next_first())
        }
    }
}

/// Read buffers kept for reuse once their chunk is written: enough for
/// every job in flight with 8 workers.
const READ_BUFS_KEPT: usize = 24;

/// Reads the bytes of one job into a buffer of `pool` (aligned: the drive
/// reads straight into it; reused: not allocated or zeroed again).
fn read_job(
    source: &Disk,
    pool: &BufPool,
    plan: &streams::StreamPlan,
    stream: usize,
    extents: Vec<Extent>,
    lane: Lane,
    rescue: Option<&Rescue>,
) -> Result<ReadJob> {
    cancel::check("reading the source")?;
    let len: u64 = extents.iter().map(|e| e.1).sum();
    let mut buf = pool.take(len as usize);
    // Rescuing, a failed read is not tried again block by block to name the
    // block: the rescue reads around it, and every read of a bad sector costs.
    let read = match rescue {
        Some(_) => {
            extents_at(&extents).try_for_each(|(e, at)| source.read_once_at(&mut buf[at..at + e.1 as usize], e.0))
        }
        None => source.read_extents(&extents, &mut buf),
    };
    match read {
        Ok(()) => {}
        Err(e) if is_media_error(&e) => match rescue {
            Some(r) => r.read_around(source, stream, &extents, &mut buf)?,
            None => {
                return Err(e.with_note(&format!(
                    "{}; {UNREADABLE_SOURCE}: to copy everything else, \
                     back it up with --rescue (the unreadable sectors are then stored as zeros and listed)",
                    plan.describe()
                )));
            }
        },
        Err(e) => return Err(e.with_note(&plan.describe())),
    }
    Ok(ReadJob { stream, extents, buf, skip_zero: plan.skip_zero, lane })
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Each of `extents` with where its bytes start in a buffer that holds them
/// one after another.
fn extents_at(extents: &[Extent]) -> impl Iterator<Item = (Extent, usize)> + '_ {
    extents.iter().scan(0usize, |at, &e| {
        let here = *at;
        *at += e.1 as usize;
        Some((e, here))
    })
}

/// Said by a backup that stopped at a sector of the source it could not read.
const UNREADABLE_SOURCE: &str = "the source has sectors that cannot be read";

/// Whether `e` is a backup stopped by a sector of the source that could not
/// be read, which `rescue` can get past (the wizard and unattended jobs
/// offer or name it).
pub fn is_unreadable_source(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.to_string().contains(UNREADABLE_SOURCE))
}

/// Whether `e` is a read error of the medium (EIO), which reading around
/// can get past; anything else (the disk gone, a bad request) is not.
fn is_media_error(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.raw_os_error() == Some(libc::EIO))
}

/// Reading a source with unreadable sectors (`klon backup --rescue`), in
/// two passes, as ddrescue does.
///
/// First everything readable is copied: a chunk's read that fails is read
/// again in pieces of [`RESCUE_PIECE`] bytes on aligned disk offsets, and a
/// piece that fails is stored as zeros in its chunk and kept for later;
/// the backup goes on. When every stream is written, each kept piece is
/// read [`RESCUE_UNIT`] bytes (or a sector, if larger) at a time, once
/// each: from its start until a read fails, from its end backwards until
/// one fails (trimming), then the units between (scraping). The sectors read go into one more stream (kind
/// `rescued`), which a restore writes over the zeros; those that fail are
/// recorded as unreadable. So no place is read more than three times
/// (chunk, piece, sector), and the readable rest is in the image before the
/// drive is asked for its bad places again.
pub(crate) struct Rescue {
    sector: u64,
    /// (stream, piece) that failed in the first pass.
    pending: std::sync::Mutex<Vec<(usize, Extent)>>,
    /// (stream, sectors) that failed in the second.
    found: std::sync::Mutex<Vec<(usize, Extent)>>,
}

/// Pieces a failed read is read again in.
pub const RESCUE_PIECE: u64 = 64 << 10;
/// What the second pass of a rescue reads at a time, at least.
pub const RESCUE_UNIT: u64 = 4096;

impl Rescue {
    pub(super) fn new(source: &Disk) -> Rescue {
        // No readahead: reads that go through the page cache (pieces and
        // sectors that cannot be read past it) read only what they ask for,
        // not the bad places after them again.
        let _ = nix::fcntl::posix_fadvise(&source.file, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_RANDOM);
        // The second pass reads 4 KiB at a time (or a larger sector): reads
        // that go through the page cache fetch whole 4 KiB pages, so reading
        // 512-byte sectors one by one would ask the drive for a bad page
        // eight times over.
        Rescue {
            sector: u64::from(source.logical_sector_size).max(RESCUE_UNIT),
            pending: Default::default(),
            found: Default::default(),
        }
    }

    /// First pass: reads `extents` into `buf` piece by piece, zeroing and
    /// keeping the pieces that fail.
    fn read_around(&self, source: &Disk, stream: usize, extents: &[Extent], buf: &mut [u8]) -> Result<()> {
        let mut at = 0usize;
        for &(offset, len) in extents {
            let mut pos = offset;
            while pos < offset + len {
                cancel::check("reading the source")?;
                let end = ((pos / RESCUE_PIECE + 1) * RESCUE_PIECE).min(offset + len);
                let piece = &mut buf[at + (pos - offset) as usize..at + (end - offset) as usize];
                match source.read_once_at(piece, pos) {
                    Ok(()) => {}
                    Err(e) if is_media_error(&e) => {
                        piece.fill(0);
                        lock(&self.pending).push((stream, (pos, end - pos)));
                    }
                    Err(e) => return Err(e),
                }
                pos = end;
            }
            at += len as usize;
        }
        Ok(())
    }

    /// Second pass: reads the kept pieces sector by sector and sends what
    /// was read as jobs of stream `rescued`, in disk order.
    pub(super) fn scrape(&self, source: &Disk, rescued: usize, send: &mut dyn FnMut(ReadJob) -> bool) -> Result<()> {
        let mut pending = std::mem::take(&mut *lock(&self.pending));
        pending.sort_by_key(|p| p.1);
        let mut jobs = JobFiller::default();
        for (stream, (pos, len)) in pending {
            let mut piece = vec![0u8; len as usize];
            let sectors = len.div_ceil(self.sector);
            let span = |i: u64| (i * self.sector, self.sector.min(len - i * self.sector));
            let mut good = vec![false; sectors as usize];
            let mut read = |i: u64, piece: &mut [u8]| -> Result<bool> {
                cancel::check("reading the source")?;
                let (rel, n) = span(i);
                let ok = match source.read_once_at(&mut piece[rel as usize..(rel + n) as usize], pos + rel) {
                    Ok(()) => true,
                    Err(e) if is_media_error(&e) => false,
                    Err(e) => return Err(e),
                };
                good[i as usize] = ok;
                Ok(ok)
            };
            // Trim from the start, then from the end, then scrape between.
            let mut first = 0;
            while first < sectors && read(first, &mut piece)? {
                first += 1;
            }
            let mut last = sectors;
            while last > first + 1 && read(last - 1, &mut piece)? {
                last -= 1;
            }
            for i in first + 1..last.saturating_sub(1) {
                read(i, &mut piece)?;
            }
            for i in 0..sectors {
                let (rel, n) = span(i);
                if good[i as usize] {
                    if !jobs.push(rescued, false, pos + rel, &piece[rel as usize..(rel + n) as usize], send) {
                        return Ok(());
                    }
                } else {
                    lock(&self.found).push((stream, (pos + rel, n)));
                }
            }
        }
        jobs.finish(send);
        Ok(())
    }

    /// The unreadable ranges found, per stream (indexed by stream number),
    /// sorted and merged.
    pub(super) fn into_ranges(self) -> Vec<Vec<Extent>> {
        let found = self.found.into_inner().unwrap_or_else(|p| p.into_inner());
        let streams = found.iter().map(|f| f.0 + 1).max().unwrap_or(0);
        let mut out = vec![Vec::new(); streams];
        for (si, r) in found {
            out[si].push(r);
        }
        for ranges in &mut out {
            ranges.sort();
            let mut merged: Vec<Extent> = Vec::new();
            for (a, l) in ranges.drain(..) {
                match merged.last_mut() {
                    Some(m) if m.0 + m.1 >= a => m.1 = m.1.max(a + l - m.0),
                    _ => merged.push((a, l)),
                }
            }
            *ranges = merged;
        }
        out
    }
}

/// Packs a stream's reads into jobs: pieces that end on multiples of
/// CHUNK_SIZE, as many as fit in CHUNK_SIZE bytes and MAX_EXTENTS extents,
/// adjacent pieces merged into one extent.
#[derive(Clone)]
struct JobPacker<'a> {
    reads: &'a [(u64, u64)],
    /// The read being packed and how much of it is packed already.
    read: usize,
    done: u64,
    /// With a window: every job lies inside one window of that many bytes
    /// aligned to disk offsets (a repository's chunks); without, a job
    /// holds up to a chunk's worth wherever the bytes lie.
    window: Option<u64>,
}

impl<'a> JobPacker<'a> {
    fn new(reads: &'a [(u64, u64)], window: Option<u64>) -> JobPacker<'a> {
        JobPacker { reads, read: 0, done: 0, window }
    }

    /// The next piece, without taking it.
    fn peek(&mut self) -> Option<(u64, u64)> {
        while let Some(&(start, len)) = self.reads.get(self.read) {
            if self.done < len {
                let pos = start + self.done;
                let step = self.window.unwrap_or(CHUNK_SIZE as u64);
                let boundary = (pos / step + 1) * step;
                return Some((pos, boundary.min(start + len) - pos));
            }
            self.read += 1;
            self.done = 0;
        }
        None
    }

    /// The extents of the next job.
    fn next_job(&mut self) -> Option<Vec<Extent>> {
        let mut extents: Vec<Extent> = Vec::new();
        let mut len = 0u64;
        while let Some((offset, piece)) = self.peek() {
            let other_window = self.window.is_some_and(|w| extents.first().is_some_and(|f| f.0 / w != offset / w));
            if !extents.is_empty()
                && (other_window || len + piece > CHUNK_SIZE as u64 || extents.len() >= MAX_EXTENTS as usize)
            {
                break;
            }
            self.done += piece;
            len += piece;
            match extents.last_mut() {
                Some(last) if last.0 + last.1 == offset => last.1 += piece,
                _ => extents.push((offset, piece)),
            }
        }
        (!extents.is_empty()).then_some(extents)
    }

    fn count_jobs(mut self) -> usize {
        std::iter::from_fn(|| self.next_job()).count()
    }
}

/// Splits `[start, start+len)` into pieces that end on multiples of `step`.
pub fn pieces(start: u64, len: u64, step: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = start + len;
    let mut pos = start;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let next = ((pos / step) + 1) * step;
        let piece_end = next.min(end);
        let piece = (pos, piece_end - pos);
        pos = piece_end;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The jobs of `reads` as the packing rules make them, written out
    /// piece by piece.
    fn jobs_by_pieces(reads: &[Extent]) -> Vec<Vec<Extent>> {
        let mut jobs: Vec<Vec<Extent>> = Vec::new();
        let mut cur: Vec<Extent> = Vec::new();
        let mut len = 0;
        for &(start, n) in reads {
            for (offset, piece) in pieces(start, n, CHUNK_SIZE as u64) {
                if !cur.is_empty() && (len + piece > CHUNK_SIZE as u64 || cur.len() >= MAX_EXTENTS as usize) {
                    jobs.push(std::mem::take(&mut cur));
                    len = 0;
                }
                match cur.last_mut() {
                    Some(last) if last.0 + last.1 == offset => last.1 += piece,
                    _ => cur.push((offset, piece)),
                }
                len += piece;
            }
        }
        if !cur.is_empty() {
            jobs.push(cur);
        }
        jobs
    }

    const C: u64 = CHUNK_SIZE as u64;

    /// Reads like a filesystem's: adjacent ranges, ranges across chunk
    /// boundaries, thousands of small scattered blocks, one huge range.
    fn fs_like_reads() -> Vec<Extent> {
        let mut reads = vec![(4096, 3 << 20), ((3 << 20) + 4096, C), (3 * C - 4096, 8192)];
        reads.extend((0..10_000u64).map(|i| (4 * C + i * 1024, 512)));
        reads.push((20 * C + 512, 5 * C + 100));
        reads
    }

    #[test]
    fn jobs_are_packed_by_chunk_boundaries_size_and_extent_count() {
        let reads = fs_like_reads();
        let jobs: Vec<Vec<Extent>> = StreamJobs::new(&reads, false, None)
            .map(|(e, lane)| {
                assert_eq!(lane, Lane::First);
                e
            })
            .collect();
        assert_eq!(jobs, jobs_by_pieces(&reads));
        // The scattered blocks fill one job up to the extent limit.
        assert!(jobs.iter().any(|j| j.len() == MAX_EXTENTS as usize), "no job reached the extent limit");
        assert!(jobs.iter().all(|j| j.iter().map(|e| e.1).sum::<u64>() <= C));
        // Nothing read twice or left out.
        let total: u64 = jobs.iter().flatten().map(|e| e.1).sum();
        assert_eq!(total, reads.iter().map(|r| r.1).sum::<u64>());
    }

    #[test]
    fn a_job_filler_with_a_window_cuts_pieces_at_its_multiples() {
        let mut jobs = Vec::new();
        let mut filler = JobFiller::new(Some(1 << 20));
        let mut send = |j: ReadJob| {
            jobs.push(j);
            true
        };
        // 1.5 MiB from 0.75 MiB, then 0.25 MiB right after (merged into the
        // job of its window), then another stream.
        let a: Vec<u8> = (0..3 << 19).map(|i| i as u8).collect();
        assert!(filler.push(0, false, 3 << 18, &a, &mut send));
        assert!(filler.push(0, false, 9 << 18, &[7; 1 << 18], &mut send));
        assert!(filler.push(1, false, 10 << 18, &[9; 100], &mut send));
        filler.finish(&mut send);
        let got: Vec<(usize, Vec<Extent>)> = jobs.iter().map(|j| (j.stream, j.extents.clone())).collect();
        assert_eq!(
            got,
            vec![
                (0, vec![(3 << 18, 1 << 18)]),
                (0, vec![(1 << 20, 1 << 20)]),
                (0, vec![(2 << 20, 2 << 18)]),
                (1, vec![(10 << 18, 100)]),
            ]
        );
        assert_eq!(&jobs[1].buf[..4], &a[1 << 18..(1 << 18) + 4], "bytes follow their offsets");
    }

    #[test]
    fn with_a_window_every_job_is_the_reads_of_one_window() {
        let reads = fs_like_reads();
        const W: u64 = 1 << 20;
        for lanes in [false, true] {
            let jobs: Vec<Vec<Extent>> = StreamJobs::new(&reads, lanes, Some(W)).map(|(e, _)| e).collect();
            let mut windows = std::collections::HashSet::new();
            for j in &jobs {
                let w = j[0].0 / W;
                assert!(j.iter().all(|e| e.0 / W == w && (e.0 + e.1 - 1) / W == w), "a job crosses a window: {j:?}");
                // One job per window (none here reaches the extent limit in 1 MiB).
                assert!(windows.insert(w), "window {w} split into two jobs");
            }
            // Every window that has reads has its job, and nothing is lost.
            let want: std::collections::HashSet<u64> =
                reads.iter().flat_map(|&(a, l)| (a / W)..=((a + l - 1) / W)).collect();
            assert_eq!(windows, want);
            let total: u64 = jobs.iter().flatten().map(|e| e.1).sum();
            assert_eq!(total, reads.iter().map(|r| r.1).sum::<u64>());
        }
    }

    #[test]
    fn two_lanes_alternate_and_split_the_jobs_in_disk_order() {
        let reads = fs_like_reads();
        let single = jobs_by_pieces(&reads);
        assert!(single.len() >= 7, "{} jobs", single.len());
        let first_jobs = single.len().div_ceil(2);
        let laned: Vec<(Vec<Extent>, Lane)> = StreamJobs::new(&reads, true, None).collect();
        // First lane, second lane, first lane, ...: the first lane has one
        // more job when the count is odd, so it gives the last one.
        assert_eq!(laned.len(), single.len());
        for (i, (_, lane)) in laned.iter().enumerate() {
            let expected = if i % 2 == 0 { Lane::First } else { Lane::Second { first_seq: first_jobs as u64 } };
            assert_eq!(*lane, expected, "job {i}");
        }
        // Each lane in disk order; the first lane, then the second, are the
        // jobs of one lane exactly.
        let firsts = laned.iter().filter(|(_, l)| *l == Lane::First).map(|(e, _)| e.clone());
        let seconds = laned.iter().filter(|(_, l)| *l != Lane::First).map(|(e, _)| e.clone());
        assert_eq!(firsts.clone().count(), first_jobs);
        assert_eq!(firsts.chain(seconds).collect::<Vec<_>>(), single);
        // Too few jobs for two lanes of at least MIN_LANE_JOBS: one lane.
        let short = [(0, (2 * MIN_LANE_JOBS as u64 - 1) * C)];
        assert!(StreamJobs::new(&short, true, None).all(|(_, l)| l == Lane::First));
        let enough = [(0, 2 * MIN_LANE_JOBS as u64 * C)];
        assert!(StreamJobs::new(&enough, true, None).any(|(_, l)| l != Lane::First));
    }

    #[test]
    fn pieces_align_to_step() {
        let v: Vec<_> = pieces(1000, 10_000, 4096).collect();
        assert_eq!(v, vec![(1000, 3096), (4096, 4096), (8192, 2808)]);
        assert_eq!(v.iter().map(|p| p.1).sum::<u64>(), 10_000);
    }
}
