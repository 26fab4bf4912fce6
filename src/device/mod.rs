//! Disks: opening sources and targets safely, their size and sector size,
//! positioned reads and writes with context, and (in submodules) what
//! sysfs says of block devices, mounts and in-use checks. The inventory of
//! disks with their tables and filesystems is [`crate::inventory`], a layer
//! above.
//!
//! A `Disk` is either a block device or a regular file holding a disk image;
//! the engine treats both the same way.

pub mod blockdev;
pub mod direct;
pub mod loopdev;
pub mod mounts;
pub mod safety;
pub mod sysfs;
pub mod uevent;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

/// What kind of thing a `Disk` is backed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    /// A block device node (/dev/sda, /dev/loop0, ...).
    BlockDevice,
    /// A regular file holding a disk image.
    File,
}

/// An open disk (block device or image file).
#[derive(Debug)]
pub struct Disk {
    /// The path it was opened by.
    pub path: PathBuf,
    /// The open file.
    pub file: File,
    /// Block device or regular file.
    pub kind: DiskKind,
    /// Size in bytes.
    pub size: u64,
    /// Logical sector size in bytes (512 for files unless told otherwise).
    pub logical_sector_size: u32,
    /// Physical sector size in bytes.
    pub physical_sector_size: u32,
    /// For block devices the device number (st_rdev); for files st_dev.
    pub dev: u64,
    /// For files the inode number; 0 for block devices.
    pub ino: u64,
    /// True when the target file was created by klon (so it reads as zeros).
    pub fresh: bool,
    /// The target file klon created, removed again when this disk is
    /// dropped before [`Disk::keep_created`] (a refusal, a cancel).
    pub(crate) created: Option<CreatedFile>,
    /// The same disk opened for direct reads ([`Disk::read_bulk_at`]), where
    /// it could be.
    pub(crate) direct: Option<File>,
}

impl Disk {
    /// Opens a source read-only. klon never opens a source for writing.
    pub fn open_source(path: &Path) -> Result<Disk> {
        let file = OpenOptions::new().read(true).open(path).map_err(|e| Error::io("opening source", path, None, e))?;
        let mut disk = Self::from_file(path, file)?;
        disk.direct = direct::open(path);
        Ok(disk)
    }

    /// Opens a disk read-only for inspection (info, read-back).
    pub fn open_read_only(path: &Path) -> Result<Disk> {
        Self::open_source(path)
    }

    /// Opens a restore target for writing. Block devices are opened with
    /// O_EXCL, which the kernel refuses while the device or any of its
    /// partitions is mounted or held by another user. A missing path is
    /// created as a regular file of `create_size` bytes when given; that
    /// file is removed again when the disk is dropped unless
    /// [`Disk::keep_created`] was called. Under /dev only block devices are
    /// taken: a missing name there is a mistyped disk, not a file to create.
    pub fn open_target(path: &Path, create_size: Option<u64>) -> Result<Disk> {
        let meta = std::fs::metadata(path);
        if in_dev(path) && !meta.as_ref().is_ok_and(|m| m.file_type().is_block_device()) {
            let what = match &meta {
                Ok(m) if m.file_type().is_char_device() => "a character device, not a block device",
                Ok(m) if m.is_dir() => "a directory",
                Ok(_) => "not a block device",
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => "there is no device by that name",
                Err(_) => "it cannot be looked at",
            };
            return Err(Error::Refused(format!(
                "target {} is not a disk ({what}); `klon disks` lists the disks",
                path.display()
            )));
        }
        match meta {
            Ok(meta) if meta.file_type().is_block_device() => {
                let file =
                    OpenOptions::new().read(true).write(true).custom_flags(libc::O_EXCL).open(path).map_err(|e| {
                        if e.raw_os_error() == Some(libc::EBUSY) {
                            Error::Refused(format!(
                                "target {} is in use (mounted, or held by another program or device mapper); \
                                 unmount it and stop what uses it, then try again",
                                path.display()
                            ))
                        } else {
                            Error::io("opening target", path, None, e)
                        }
                    })?;
                // The kernel opens a read-only device for writing and fails
                // the first write: refuse it before anything is written.
                let read_only =
                    blockdev::is_read_only(&file).map_err(|e| Error::io("querying block device", path, None, e))?;
                if read_only {
                    return Err(Error::Refused(format!(
                        "target {} is read-only (write-protected, attached with `losetup -r`, or set with \
                         `blockdev --setro`); make it writable (blockdev --setrw {}) or choose another disk",
                        path.display(),
                        path.display()
                    )));
                }
                Self::from_file(path, file)
            }
            Ok(meta) if meta.file_type().is_file() => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(|e| Error::io("opening target", path, None, e))?;
                Self::from_file(path, file)
            }
            Ok(_) => {
                Err(Error::Usage(format!("target {} is neither a block device nor a regular file", path.display())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let Some(size) = create_size else {
                    return Err(Error::io("opening target", path, None, e));
                };
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(|e| Error::io("creating target file", path, None, e))?;
                let created = CreatedFile { path: path.to_path_buf(), keep: AtomicBool::new(false) };
                file.set_len(size).map_err(|e| Error::io("sizing target file", path, None, e))?;
                let mut disk = Self::from_file(path, file)?;
                disk.fresh = true;
                disk.created = Some(created);
                Ok(disk)
            }
            Err(e) => Err(Error::io("opening target", path, None, e)),
        }
    }

    fn from_file(path: &Path, file: File) -> Result<Disk> {
        let meta = file.metadata().map_err(|e| Error::io("inspecting", path, None, e))?;
        if meta.file_type().is_block_device() {
            let ctx = |e| Error::io("querying block device", path, None, e);
            let size = blockdev::size_bytes(&file).map_err(ctx)?;
            let logical = blockdev::logical_sector_size(&file).map_err(ctx)?;
            let physical = blockdev::physical_sector_size(&file).map_err(ctx)?;
            Ok(Disk {
                path: path.to_path_buf(),
                file,
                kind: DiskKind::BlockDevice,
                size,
                logical_sector_size: logical,
                physical_sector_size: physical,
                dev: meta.rdev(),
                ino: 0,
                fresh: false,
                created: None,
                direct: None,
            })
        } else if meta.file_type().is_file() {
            Ok(Disk {
                path: path.to_path_buf(),
                file,
                kind: DiskKind::File,
                size: meta.len(),
                logical_sector_size: 512,
                physical_sector_size: 512,
                dev: meta.dev(),
                ino: meta.ino(),
                fresh: false,
                created: None,
                direct: None,
            })
        } else {
            Err(Error::Usage(format!(
                "{} is neither a block device nor a regular file holding a disk image",
                path.display()
            )))
        }
    }

    /// Keeps the target file klon created when the disk is dropped: the
    /// job that wrote it completed (a failed one removes it itself).
    pub fn keep_created(&self) {
        if let Some(c) = &self.created {
            c.keep.store(true, Ordering::Relaxed);
        }
    }

    /// Whether two open disks are the same device or file.
    pub fn same_as(&self, other: &Disk) -> bool {
        self.kind == other.kind && self.dev == other.dev && self.ino == other.ino
    }

    /// Reads exactly `buf.len()` bytes at `offset`. When that fails, the
    /// bytes are read again block by block, and the error names the first
    /// block that cannot be read (see [`direct::locate_failure`]).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.file.read_exact_at(buf, offset).is_ok() {
            return Ok(());
        }
        direct::locate_failure(offset, buf.len(), |at, range| self.file.read_exact_at(&mut buf[range], at))
            .map_err(|(at, e)| Error::io("reading", &self.path, Some(at), e))
    }

    /// One attempt to read exactly `buf.len()` bytes at `offset`: straight
    /// from the drive where the disk allows it (as [`Disk::read_bulk_at`]),
    /// else through the page cache, and no second attempt and no search for
    /// the failing block when the drive says EIO. For reading a failing
    /// disk (`--rescue`), where every read of a bad sector costs.
    pub fn read_once_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if let Some(direct) = &self.direct
            && direct::suits(offset, buf.len())
        {
            match direct::read_exact_at(direct, buf, offset) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                    return Err(Error::io("reading", &self.path, Some(offset), e));
                }
                Err(_) => {}
            }
        }
        self.file.read_exact_at(buf, offset).map_err(|e| Error::io("reading", &self.path, Some(offset), e))
    }

    /// Reads exactly `buf.len()` bytes at `offset`, for the bulk reads of a
    /// job (every used block of a source): straight from the drive into
    /// `buf`, past the page cache, where the disk was opened for it and the
    /// read is aligned (see [`direct`]); otherwise, or if the direct read
    /// fails for any reason, as [`Disk::read_exact_at`] does.
    pub fn read_bulk_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if let Some(direct) = &self.direct
            && direct::suits(offset, buf.len())
            && direct::read_exact_at(direct, buf, offset).is_ok()
        {
            return Ok(());
        }
        self.read_exact_at(buf, offset)
    }

    /// Fills `buf` with the bytes of `extents` (offset, length), one after
    /// another, by [`Disk::read_bulk_at`]; `buf` must be their total length.
    pub fn read_extents(&self, extents: &[(u64, u64)], buf: &mut [u8]) -> Result<()> {
        let mut at = 0usize;
        for &(offset, len) in extents {
            self.read_bulk_at(&mut buf[at..at + len as usize], offset)?;
            at += len as usize;
        }
        debug_assert_eq!(at, buf.len());
        Ok(())
    }

    /// This disk opened a second time for direct writes (see
    /// [`direct::DirectWriter`]); None where that is refused. The path is
    /// opened again, so the result is used only if it is still the same
    /// device or file.
    pub fn open_for_direct_writes(&self) -> Option<File> {
        direct::open_for_writing(&self.path).filter(|f| self.is_opened_by(f))
    }

    /// Opens this disk a second time for direct reads, as a source is (see
    /// [`Disk::read_bulk_at`]): a restore's read-back then reads what the
    /// drive holds, past the page cache. Kept only if the path still leads
    /// to the same device or file.
    pub fn enable_direct_reads(&mut self) {
        self.direct = direct::open(&self.path).filter(|f| self.is_opened_by(f));
    }

    /// Whether `file` is this disk: the same block device (rdev), or the
    /// same file (device and inode).
    fn is_opened_by(&self, file: &File) -> bool {
        let Ok(meta) = file.metadata() else { return false };
        match self.kind {
            DiskKind::BlockDevice => meta.file_type().is_block_device() && meta.rdev() == self.dev,
            DiskKind::File => meta.file_type().is_file() && meta.dev() == self.dev && meta.ino() == self.ino,
        }
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(buf, offset).map_err(|e| Error::io("writing", &self.path, Some(offset), e))
    }

    /// Makes `[offset, offset+len)` read as zeros: BLKZEROOUT on block
    /// devices, a punched hole in files (cheap where it is one already),
    /// with a plain write of zeros as the fallback.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let done = match self.kind {
            DiskKind::BlockDevice => blockdev::zero_out(&self.file, offset, len).is_ok(),
            DiskKind::File => nix::fcntl::fallocate(
                &self.file,
                nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            )
            .is_ok(),
        };
        if done {
            return Ok(());
        }
        const STEP: u64 = 1 << 20;
        let zeros = vec![0u8; STEP as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = STEP.min(offset + len - pos) as usize;
            self.write_all_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Flushes everything written to stable storage.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_all().map_err(|e| Error::io("flushing", &self.path, None, e))
    }

    /// After writing the partition table: asks the kernel to re-read it.
    /// Returns `Some(false)`, without error, when the device cannot hold
    /// partitions (a loop device attached without partition scanning, a
    /// logical volume, an md array, an nbd device: BLKRRPART answers EINVAL
    /// there), so the kernel shows no partition nodes for what was written;
    /// `None` for a file, which has no table to re-read.
    pub fn reread_table(&self) -> Result<Option<bool>> {
        if self.kind != DiskKind::BlockDevice {
            return Ok(None);
        }
        match blockdev::reread_partition_table(&self.file) {
            Ok(()) => Ok(Some(true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Some(false)),
            Err(e) => Err(Error::io("re-reading the partition table of", &self.path, None, e)),
        }
    }

    /// Before reading back what was written: drops the cached pages, so a
    /// read-back sees the drive (for a restore's 64 GiB target file that
    /// took 80 ms, of a job of 4 s: only done when something is read).
    pub fn drop_cache(&self) -> Result<()> {
        if self.kind == DiskKind::BlockDevice {
            blockdev::flush_buffers(&self.file).map_err(|e| Error::io("flushing buffers of", &self.path, None, e))?;
        } else {
            let _ = nix::fcntl::posix_fadvise(&self.file, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
        }
        Ok(())
    }
}

/// A target file klon created; removed on drop unless kept.
#[derive(Debug)]
pub(crate) struct CreatedFile {
    path: PathBuf,
    keep: AtomicBool,
}

impl Drop for CreatedFile {
    fn drop(&mut self) {
        if !self.keep.load(Ordering::Relaxed) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether `path` (made absolute, `.` and `..` resolved by name) is in
/// /dev, where disks are; /dev/shm, a place for files, is not.
fn in_dev(path: &Path) -> bool {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        match std::env::current_dir() {
            Ok(d) => d.join(path),
            Err(_) => return false,
        }
    };
    let mut norm = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                norm.pop();
            }
            Component::CurDir => {}
            other => norm.push(other),
        }
    }
    norm.starts_with("/dev") && !norm.starts_with("/dev/shm")
}

/// Starts the writeback of the dirty pages of `[offset, offset+len)` of
/// `file` without waiting for it, and drops the pages of the range that
/// are already clean: POSIX_FADV_DONTNEED does both (a `WB_SYNC_NONE`
/// writeback of the range, then an invalidation that leaves dirty pages and
/// pages under writeback alone). Called behind a sequential writer, it keeps
/// the drive writing while the CPU works, where the kernel alone would hold
/// gigabytes of dirty pages until its background threshold and leave them
/// to the final fsync. Advice only: errors are ignored, data is never lost.
pub fn write_behind(file: &File, offset: u64, len: u64) {
    if len == 0 {
        return;
    }
    let _ =
        nix::fcntl::posix_fadvise(file, offset as i64, len as i64, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
}
