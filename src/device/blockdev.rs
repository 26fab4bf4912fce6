//! The one place klon talks to the kernel about block devices: ioctls.
//!
//! Everything here takes an open file and returns a plain `io::Result`; the
//! callers add what and where.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

mod sys {
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    nix::ioctl_read_bad!(blksszget, nix::request_code_none!(0x12, 104), libc::c_int);
    nix::ioctl_read_bad!(blkpbszget, nix::request_code_none!(0x12, 123), libc::c_uint);
    nix::ioctl_none!(blkrrpart, 0x12, 95);
    nix::ioctl_none!(blkflsbuf, 0x12, 97);
    nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
    nix::ioctl_read_bad!(blkroget, nix::request_code_none!(0x12, 94), libc::c_int);
}

fn errno(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Size of the block device in bytes (BLKGETSIZE64).
pub fn size_bytes(f: &File) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: the fd is open and `v` is a valid u64 for the kernel to fill.
    unsafe { sys::blkgetsize64(f.as_raw_fd(), &mut v) }.map_err(errno)?;
    Ok(v)
}

/// Logical sector size (BLKSSZGET).
pub fn logical_sector_size(f: &File) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: as above, `v` is a valid int.
    unsafe { sys::blksszget(f.as_raw_fd(), &mut v) }.map_err(errno)?;
    Ok(v as u32)
}

/// Physical sector size (BLKPBSZGET).
pub fn physical_sector_size(f: &File) -> io::Result<u32> {
    let mut v: libc::c_uint = 0;
    // SAFETY: as above, `v` is a valid unsigned int.
    unsafe { sys::blkpbszget(f.as_raw_fd(), &mut v) }.map_err(errno)?;
    Ok(v)
}

/// Whether the kernel marks the device read-only (BLKROGET).
pub fn is_read_only(f: &File) -> io::Result<bool> {
    let mut v: libc::c_int = 0;
    // SAFETY: as above, `v` is a valid int.
    unsafe { sys::blkroget(f.as_raw_fd(), &mut v) }.map_err(errno)?;
    Ok(v != 0)
}

/// Drops the device's buffer cache (BLKFLSBUF), so read-back sees the disk.
pub fn flush_buffers(f: &File) -> io::Result<()> {
    // SAFETY: no argument.
    unsafe { sys::blkflsbuf(f.as_raw_fd()) }.map_err(errno)?;
    Ok(())
}

/// Writes zeros over `[offset, offset+len)` (BLKZEROOUT).
pub fn zero_out(f: &File, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    // SAFETY: `range` is a valid [u64; 2] that outlives the call.
    unsafe { sys::blkzeroout(f.as_raw_fd(), &range) }.map_err(errno)?;
    Ok(())
}

/// Asks the kernel to re-read the partition table (BLKRRPART), retrying
/// while the device is busy (udev or a prober may hold it briefly).
pub fn reread_partition_table(f: &File) -> io::Result<()> {
    let mut last = None;
    for attempt in 0..10 {
        // SAFETY: no argument.
        match unsafe { sys::blkrrpart(f.as_raw_fd()) } {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EBUSY) => {
                last = Some(errno(nix::errno::Errno::EBUSY));
                std::thread::sleep(Duration::from_millis(100 * (attempt + 1)));
            }
            Err(e) => return Err(errno(e)),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("BLKRRPART failed")))
}
