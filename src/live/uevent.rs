//! Hot-plugging without udevd: the kernel's uevents on a netlink socket
//! (NETLINK_KOBJECT_UEVENT, multicast group 1). devtmpfs creates the device
//! nodes by itself; these events only tell klon when to look again.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket};

use crate::error::{Error, Result};

/// One kernel uevent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    /// add, remove, change, bind, unbind, move, online, offline.
    pub action: String,
    /// The device's path under /sys.
    pub devpath: String,
    /// All KEY=VALUE pairs (SUBSYSTEM, DEVNAME, DEVTYPE, SEQNUM, …).
    pub vars: BTreeMap<String, String>,
}

impl Uevent {
    /// SUBSYSTEM, e.g. "block", "usb".
    pub fn subsystem(&self) -> Option<&str> {
        self.vars.get("SUBSYSTEM").map(String::as_str)
    }

    /// DEVNAME, e.g. "sdb1".
    pub fn devname(&self) -> Option<&str> {
        self.vars.get("DEVNAME").map(String::as_str)
    }

    /// Whether a block device (disk or partition) came or went.
    pub fn is_block(&self) -> bool {
        self.subsystem() == Some("block")
    }
}

/// Parses a kernel uevent message: "ACTION@DEVPATH\0KEY=VALUE\0…".
/// Messages from udevd ("libudev" header) are ignored.
pub fn parse(buf: &[u8]) -> Option<Uevent> {
    let mut parts = buf.split(|b| *b == 0).filter(|p| !p.is_empty());
    let head = std::str::from_utf8(parts.next()?).ok()?;
    let (action, devpath) = head.split_once('@')?;
    let mut vars = BTreeMap::new();
    for p in parts {
        let Ok(s) = std::str::from_utf8(p) else { continue };
        if let Some((k, v)) = s.split_once('=') {
            vars.insert(k.to_string(), v.to_string());
        }
    }
    Some(Uevent { action: action.to_string(), devpath: devpath.to_string(), vars })
}

/// A socket receiving the kernel's uevents.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
}

impl Listener {
    /// Opens the socket and joins the kernel's uevent group (any user may).
    pub fn open() -> Result<Listener> {
        let err = |e: nix::Error| Error::io("opening the uevent socket", "netlink", None, e.into());
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkKObjectUEvent,
        )
        .map_err(err)?;
        bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &NetlinkAddr::new(0, 1)).map_err(err)?;
        Ok(Listener { fd })
    }

    /// The next uevent, or `None` when `timeout` passed without one.
    pub fn recv(&self, timeout: Duration) -> Result<Option<Uevent>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, ms) {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(Error::io("waiting for uevents", "netlink", None, e.into())),
            }
            let mut buf = vec![0u8; 16 * 1024];
            match recv(std::os::fd::AsRawFd::as_raw_fd(&self.fd), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => {
                    if let Some(ev) = parse(&buf[..n]) {
                        return Ok(Some(ev));
                    }
                }
                Err(nix::Error::EAGAIN) | Err(nix::Error::EINTR) => {}
                // ENOBUFS: events were dropped; the caller looks again anyway.
                Err(nix::Error::ENOBUFS) => return Ok(None),
                Err(e) => return Err(Error::io("reading uevents", "netlink", None, e.into())),
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }
}

/// Calls `check` now and after every block-device uevent (at least once a
/// second) until it returns `Some` or `timeout` has passed.
pub fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let listener = Listener::open().ok();
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let step = left.min(Duration::from_secs(1));
        match &listener {
            Some(l) => {
                // Drain a burst of events (a new disk brings several), then look.
                if let Ok(Some(_)) = l.recv(step) {
                    while let Ok(Some(_)) = l.recv(Duration::from_millis(200)) {}
                }
            }
            None => std::thread::sleep(step),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_message() {
        let msg = b"add@/devices/pci0000:00/0000:00:04.0/usb2/2-1/2-1:1.0/host2/target2:0:0/2:0:0:0/block/sdb\0\
ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:04.0/usb2/2-1/2-1:1.0/host2/target2:0:0/2:0:0:0/block/sdb\0\
SUBSYSTEM=block\0MAJOR=8\0MINOR=16\0DEVNAME=sdb\0DEVTYPE=disk\0DISKSEQ=9\0SEQNUM=2563\0";
        let ev = parse(msg).unwrap();
        assert_eq!(ev.action, "add");
        assert!(ev.devpath.ends_with("/block/sdb"));
        assert!(ev.is_block());
        assert_eq!(ev.devname(), Some("sdb"));
        assert_eq!(ev.vars.get("DEVTYPE").map(String::as_str), Some("disk"));
        assert_eq!(ev.vars.get("SEQNUM").map(String::as_str), Some("2563"));
    }

    #[test]
    fn ignores_garbage_and_udev_messages() {
        assert_eq!(parse(b""), None);
        assert_eq!(parse(b"libudev\0\xfe\xed\xca\xfe"), None);
    }

    #[test]
    fn listener_opens_and_times_out() {
        // Any user may bind to the kernel's uevent group.
        let l = Listener::open().unwrap();
        let _ = l.recv(Duration::from_millis(10)).unwrap();
        assert_eq!(wait_for(Duration::from_millis(50), || None::<()>), None);
        assert_eq!(wait_for(Duration::from_millis(50), || Some(7)), Some(7));
    }
}
