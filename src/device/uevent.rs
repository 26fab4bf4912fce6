//! Kernel uevents (NETLINK_KOBJECT_UEVENT): how the wizard notices a USB
//! drive being plugged in without polling /sys in a sleep loop. The live
//! system has no udev, so klon listens to the kernel directly.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket};

use crate::error::{Error, Result};

/// One kernel uevent, e.g. `add@/devices/.../block/sdb/sdb1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    /// ACTION: add, remove, change, move, bind, unbind, ...
    pub action: String,
    /// DEVPATH below /sys.
    pub devpath: String,
    /// SUBSYSTEM, e.g. "block".
    pub subsystem: String,
    /// DEVNAME, e.g. "sdb1", when the event has one.
    pub devname: Option<String>,
    /// Every KEY=value pair of the event.
    pub vars: BTreeMap<String, String>,
}

impl Uevent {
    /// An event that may mean a new or changed block device (a drive or a
    /// partition appeared, a medium was inserted, a table was re-read).
    pub fn is_block_arrival(&self) -> bool {
        self.subsystem == "block" && matches!(self.action.as_str(), "add" | "change")
    }
}

/// Parses one kernel uevent message: "ACTION@DEVPATH\0KEY=VALUE\0...".
/// Messages from udev (which start with "libudev") are not kernel events
/// and give `None`, as does anything without ACTION and DEVPATH.
pub fn parse(buf: &[u8]) -> Option<Uevent> {
    let mut parts = buf.split(|&b| b == 0).filter(|p| !p.is_empty());
    let head = std::str::from_utf8(parts.next()?).ok()?;
    if !head.contains('@') {
        return None;
    }
    let mut vars = BTreeMap::new();
    for p in parts {
        let Ok(s) = std::str::from_utf8(p) else { continue };
        if let Some((k, v)) = s.split_once('=') {
            vars.insert(k.to_string(), v.to_string());
        }
    }
    Some(Uevent {
        action: vars.get("ACTION")?.clone(),
        devpath: vars.get("DEVPATH")?.clone(),
        subsystem: vars.get("SUBSYSTEM").cloned().unwrap_or_default(),
        devname: vars.get("DEVNAME").cloned(),
        vars,
    })
}

/// A socket receiving the kernel's uevents.
#[derive(Debug)]
pub struct UeventSocket {
    fd: OwnedFd,
}

impl UeventSocket {
    /// Opens and binds the socket to the kernel's uevent multicast group.
    pub fn open() -> Result<UeventSocket> {
        let err = |what: &str, e: nix::Error| {
            Error::io(format!("{what} a kernel uevent socket"), "netlink", None, std::io::Error::from(e))
        };
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkKObjectUEvent,
        )
        .map_err(|e| err("opening", e))?;
        // Group 1: events straight from the kernel.
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 1)).map_err(|e| err("binding", e))?;
        Ok(UeventSocket { fd })
    }

    /// Waits at most `timeout` (forever with `None`) for the next kernel
    /// uevent. `Ok(None)` when the time ran out.
    pub fn next(&self, timeout: Option<Duration>) -> Result<Option<Uevent>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let mut buf = vec![0u8; 16 << 10];
            match recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => {
                    if let Some(ev) = parse(&buf[..n]) {
                        return Ok(Some(ev));
                    }
                    continue;
                }
                Err(nix::Error::EAGAIN) | Err(nix::Error::EINTR) => {}
                // The kernel dropped events (buffer full): carry on, the
                // caller rescans anyway.
                Err(nix::Error::ENOBUFS) => continue,
                Err(e) => {
                    return Err(Error::io("reading", "kernel uevent socket", None, std::io::Error::from(e)));
                }
            }
            let wait = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)
                }
            };
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, wait) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => return Err(Error::io("waiting on", "kernel uevent socket", None, std::io::Error::from(e))),
            }
        }
    }

    /// The descriptor, to wait on it together with others (e.g. the
    /// keyboard).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// What woke a [`wait_either`].
#[derive(Debug, PartialEq, Eq)]
pub enum Woken {
    /// A kernel uevent arrived (already read from the socket).
    Event(Uevent),
    /// The other descriptor (e.g. the keyboard) is readable.
    Other,
    /// The time ran out.
    Timeout,
}

/// Waits for a uevent on `sock` or for `other` to become readable, at most
/// `timeout`.
pub fn wait_either(sock: &UeventSocket, other: BorrowedFd<'_>, timeout: Duration) -> Result<Woken> {
    if let Some(ev) = sock.next(Some(Duration::ZERO))? {
        return Ok(Woken::Event(ev));
    }
    let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN), PollFd::new(other, PollFlags::POLLIN)];
    let wait = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    match poll(&mut fds, wait) {
        Ok(0) => return Ok(Woken::Timeout),
        Ok(_) => {}
        Err(nix::Error::EINTR) => return Ok(Woken::Timeout),
        Err(e) => return Err(Error::io("waiting on", "kernel uevent socket", None, std::io::Error::from(e))),
    }
    if fds[1].revents().is_some_and(|r| !r.is_empty()) {
        return Ok(Woken::Other);
    }
    match sock.next(Some(Duration::ZERO))? {
        Some(ev) => Ok(Woken::Event(ev)),
        None => Ok(Woken::Timeout),
    }
}

/// Calls `check` now and after every burst of uevents (at least once a
/// second) until it returns `Some` or `timeout` has passed: waiting for a
/// disk or a drive to appear without a sleep loop. Without a uevent socket
/// it still looks once a second.
pub fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let sock = UeventSocket::open().ok();
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
        match &sock {
            // Drain a burst (a new disk brings several events), then look.
            Some(s) => {
                if let Ok(Some(_)) = s.next(Some(step)) {
                    while let Ok(Some(_)) = s.next(Some(Duration::from_millis(200))) {}
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
    fn parses_kernel_events_and_ignores_udev() {
        let msg = b"add@/devices/pci0000:00/usb1/1-1/host6/target6:0:0/6:0:0:0/block/sdb/sdb1\0\
ACTION=add\0DEVPATH=/devices/pci0000:00/usb1/1-1/host6/target6:0:0/6:0:0:0/block/sdb/sdb1\0\
SUBSYSTEM=block\0DEVNAME=sdb1\0DEVTYPE=partition\0SEQNUM=4711\0";
        let ev = parse(msg).unwrap();
        assert_eq!(ev.action, "add");
        assert_eq!(ev.subsystem, "block");
        assert_eq!(ev.devname.as_deref(), Some("sdb1"));
        assert_eq!(ev.vars.get("DEVTYPE").map(String::as_str), Some("partition"));
        assert!(ev.is_block_arrival());
        assert!(parse(b"libudev\0\xfe\xed\xca\xfe").is_none());
        assert!(parse(b"").is_none());
        let rm = parse(b"remove@/devices/x\0ACTION=remove\0DEVPATH=/devices/x\0SUBSYSTEM=block\0").unwrap();
        assert!(!rm.is_block_arrival());
    }
}
