//! Attaching a file to a loop device: read-only, for mounting the
//! filesystem it holds (`klon mount --mount-filesystems`), or a partition
//! of a restored disk, for growing its filesystem. The device is
//! set to clear itself: the kernel detaches it once its last user (the
//! mount) lets go, so an unmount leaves no loop device behind.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// The kernel's `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// A loop device attached to a file; detached by the kernel when the last
/// holder closes it (this handle, and whatever mounted it meanwhile).
#[derive(Debug)]
pub struct LoopDevice {
    /// The device node, /dev/loopN.
    pub path: PathBuf,
    _device: File,
}

/// Attaches `file` read-only to a free loop device.
pub fn attach_read_only(file: &Path) -> Result<LoopDevice> {
    attach(file, 0, 0, true)
}

/// Attaches `len` bytes of `file` (a file or a block device) from byte
/// `offset` to a free loop device, writable unless `read_only` (`len` 0:
/// to the end).
pub fn attach(file: &Path, offset: u64, len: u64, read_only: bool) -> Result<LoopDevice> {
    let backing = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(file)
        .map_err(|e| Error::io("opening", file, None, e))?;
    let ctl_path = Path::new("/dev/loop-control");
    let ctl = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(ctl_path)
        .map_err(|e| Error::io("opening (is the loop module loaded?)", ctl_path, None, e))?;
    // Another program may take the free device between asking and
    // attaching: then ask again.
    let mut last = std::io::Error::from_raw_os_error(libc::EBUSY);
    for _ in 0..20 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            return Err(Error::io("finding a free loop device with", ctl_path, None, std::io::Error::last_os_error()));
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        // The kernel makes the device read-only unless it is opened for
        // writing.
        let device = match std::fs::OpenOptions::new().read(true).write(!read_only).open(&path) {
            Ok(d) => d,
            Err(e) => {
                last = e;
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        // SAFETY: LOOP_SET_FD takes the backing file's descriptor, open for
        // the duration of the call.
        if unsafe { libc::ioctl(device.as_raw_fd(), LOOP_SET_FD as _, backing.as_raw_fd()) } < 0 {
            last = std::io::Error::last_os_error();
            if last.raw_os_error() == Some(libc::EBUSY) {
                continue;
            }
            return Err(Error::io(format!("attaching {} to", file.display()), &path, None, last));
        }
        let mut info = LoopInfo64 {
            device: 0,
            inode: 0,
            rdevice: 0,
            offset,
            sizelimit: len,
            number: 0,
            encrypt_type: 0,
            encrypt_key_size: 0,
            flags: LO_FLAGS_AUTOCLEAR | if read_only { LO_FLAGS_READ_ONLY } else { 0 },
            file_name: [0; 64],
            crypt_name: [0; 64],
            encrypt_key: [0; 32],
            init: [0; 2],
        };
        let name = file.as_os_str().as_encoded_bytes();
        let keep = name.len().min(63);
        info.file_name[..keep].copy_from_slice(&name[..keep]);
        // SAFETY: LOOP_SET_STATUS64 reads one loop_info64, which `info` is.
        if unsafe { libc::ioctl(device.as_raw_fd(), LOOP_SET_STATUS64 as _, &info as *const LoopInfo64) } < 0 {
            let e = std::io::Error::last_os_error();
            // Not set to clear itself: detach it here.
            // SAFETY: LOOP_CLR_FD takes no argument.
            unsafe { libc::ioctl(device.as_raw_fd(), 0x4C01 as _) };
            return Err(Error::io(format!("setting up {} on", file.display()), &path, None, e));
        }
        return Ok(LoopDevice { path, _device: device });
    }
    Err(Error::io("finding a free loop device with", ctl_path, None, last))
}
