//! The live system's wired network: brought up by DHCP when the kernel
//! command line or klon.conf asks (`net=dhcp`) or a job needs it
//! (`job=receive`), with busybox's `udhcpc` and the event script the
//! initramfs carries (initramfs/udhcpc.script), which applies the lease and
//! notes it in `/run/klon/net.IFACE`.
//!
//! The lease is taken once and not renewed: a live session is short, and
//! dnsmasq (klon serve --pxe) leases for 12 hours by default.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Where the event script notes each lease: `net.IFACE` holds
/// `ADDRESS/PREFIX ROUTER SERVER`.
const STATE_DIR: &str = "/run/klon";
/// busybox udhcpc's event script in the initramfs.
const SCRIPT: &str = "/etc/udhcpc.script";
/// How long an interface may take to see a link once it is up.
const CARRIER_WAIT: Duration = Duration::from_secs(10);

/// One interface's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The interface, e.g. `eth0`.
    pub iface: String,
    /// Its MAC address.
    pub mac: String,
    /// Address and prefix length, e.g. `10.0.0.5/24`.
    pub address: String,
    /// The default route's gateway, when the server named one.
    pub router: Option<String>,
    /// The DHCP server that gave the lease.
    pub server: Option<String>,
}

impl Lease {
    /// One line for the console: `eth0 (52:54:…) 10.0.0.5/24 from DHCP server 10.0.0.1`.
    pub fn describe(&self) -> String {
        let mut s = format!("{} ({}) {}", self.iface, self.mac, self.address);
        if let Some(r) = &self.router {
            s.push_str(&format!(", gateway {r}"));
        }
        if let Some(d) = &self.server {
            s.push_str(&format!(", from DHCP server {d}"));
        }
        s
    }
}

/// The wired interfaces under `sys_net` (normally /sys/class/net): those
/// backed by a device (not lo, bridges or tunnels) and not wireless, by name.
pub fn wired_interfaces(sys_net: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(sys_net)
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    let p = e.path();
                    p.join("device").exists() && !p.join("wireless").exists() && !p.join("phy80211").exists()
                })
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Whether `want` (an interface name or a MAC address) names interface
/// `iface` with MAC `mac`.
pub fn names(want: &str, iface: &str, mac: &str) -> bool {
    want == iface || want.eq_ignore_ascii_case(mac)
}

fn sys_net() -> PathBuf {
    PathBuf::from("/sys/class/net")
}

fn read_sys(iface: &str, what: &str) -> Option<String> {
    std::fs::read_to_string(sys_net().join(iface).join(what)).ok().map(|s| s.trim().to_string())
}

/// The lease the event script noted for `iface`, if any.
pub fn lease_of(iface: &str) -> Option<Lease> {
    let text = std::fs::read_to_string(Path::new(STATE_DIR).join(format!("net.{iface}"))).ok()?;
    parse_state(iface, &read_sys(iface, "address").unwrap_or_default(), &text)
}

/// Parses a `net.IFACE` note: `ADDRESS/PREFIX [ROUTER [SERVER]]`.
pub fn parse_state(iface: &str, mac: &str, text: &str) -> Option<Lease> {
    let mut w = text.split_whitespace();
    let address = w.next()?.to_string();
    let router = w.next().filter(|s| !s.is_empty()).map(String::from);
    let server = w.next().filter(|s| !s.is_empty()).map(String::from);
    Some(Lease { iface: iface.to_string(), mac: mac.to_string(), address, router, server })
}

/// The leases taken so far (by [`bring_up`], in this boot), by interface name.
pub fn leases() -> Vec<Lease> {
    let mut out: Vec<Lease> = std::fs::read_dir(STATE_DIR)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("net.")).map(String::from))
                .filter_map(|iface| lease_of(&iface))
                .collect()
        })
        .unwrap_or_default();
    out.sort_by(|a, b| a.iface.cmp(&b.iface));
    out
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().map_err(|e| Error::io("running ip", Path::new("ip"), None, e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Unsupported(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Brings the wired network up by DHCP: on the interface `want` names (a
/// name or a MAC address), or on each wired interface in turn until one
/// gets a lease. Waits up to `wait` for interfaces to appear.
pub fn bring_up(want: Option<&str>, wait: Duration) -> Result<Lease> {
    if let Some(l) = leases().into_iter().find(|l| want.is_none_or(|w| names(w, &l.iface, &l.mac))) {
        return Ok(l);
    }
    let _ = ip(&["link", "set", "lo", "up"]);
    let pick = || {
        let all = wired_interfaces(&sys_net());
        let picked: Vec<String> = match want {
            None => all,
            Some(w) => all.into_iter().filter(|i| names(w, i, &read_sys(i, "address").unwrap_or_default())).collect(),
        };
        (!picked.is_empty()).then_some(picked)
    };
    let Some(ifaces) = crate::device::uevent::wait_for(wait, pick) else {
        let seen = wired_interfaces(&sys_net());
        return Err(Error::Usage(match want {
            Some(w) => format!(
                "no network interface {w} after {} s (wired interfaces: {})",
                wait.as_secs(),
                if seen.is_empty() { "none".to_string() } else { seen.join(", ") }
            ),
            None => format!(
                "no wired network interface after {} s: the live system has no driver for this machine's \
                 network card, or it has none",
                wait.as_secs()
            ),
        }));
    };
    let mut tried = Vec::new();
    for iface in &ifaces {
        match dhcp(iface) {
            Ok(l) => return Ok(l),
            Err(e) => tried.push(format!("{iface}: {e}")),
        }
    }
    Err(Error::Unsupported(format!("no DHCP lease ({})", tried.join("; "))))
}

/// Sets `iface` up, waits for its link, and asks for a lease.
fn dhcp(iface: &str) -> Result<Lease> {
    ip(&["link", "set", iface, "up"])?;
    let start = Instant::now();
    while read_sys(iface, "carrier").as_deref() != Some("1") {
        if start.elapsed() > CARRIER_WAIT {
            return Err(Error::Unsupported(format!("no link (cable?) after {} s", CARRIER_WAIT.as_secs())));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // -f: in the foreground; -q: quit once bound; -n: quit when no lease;
    // 5 discovers 3 s apart.
    let out = Command::new("udhcpc")
        .args(["-f", "-q", "-n", "-t", "5", "-T", "3", "-i", iface, "-s", SCRIPT])
        .output()
        .map_err(|e| Error::io("running udhcpc", Path::new("udhcpc"), None, e))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr);
        return Err(Error::Unsupported(format!(
            "no answer from a DHCP server ({})",
            said.lines().last().unwrap_or("udhcpc failed").trim()
        )));
    }
    lease_of(iface).ok_or_else(|| Error::Unsupported(format!("udhcpc took a lease but {SCRIPT} did not note it")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_notes() {
        let l = parse_state("eth0", "52:54:00:12:34:56", "10.78.0.101/24 10.78.0.1 10.78.0.1\n").unwrap();
        assert_eq!(l.address, "10.78.0.101/24");
        assert_eq!(l.router.as_deref(), Some("10.78.0.1"));
        assert_eq!(
            l.describe(),
            "eth0 (52:54:00:12:34:56) 10.78.0.101/24, gateway 10.78.0.1, from DHCP server 10.78.0.1"
        );
        let bare = parse_state("eth1", "", "192.168.1.9/16\n").unwrap();
        assert_eq!((bare.router, bare.server), (None, None));
        assert_eq!(parse_state("eth0", "", "  \n"), None);
        assert!(names("eth0", "eth0", "aa:bb:cc:dd:ee:ff"));
        assert!(names("AA:BB:CC:DD:EE:FF", "eth0", "aa:bb:cc:dd:ee:ff"));
        assert!(!names("eth1", "eth0", "aa:bb:cc:dd:ee:ff"));
    }

    #[test]
    fn wired_interfaces_have_a_device_and_no_radio() {
        let dir = std::env::temp_dir().join(format!("klon-net-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (name, dev, wireless) in [
            ("lo", false, false),
            ("eth1", true, false),
            ("eth0", true, false),
            ("wlan0", true, true),
            ("br0", false, false),
        ] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            if dev {
                std::fs::create_dir_all(dir.join(name).join("device")).unwrap();
            }
            if wireless {
                std::fs::create_dir_all(dir.join(name).join("wireless")).unwrap();
            }
        }
        assert_eq!(wired_interfaces(&dir), vec!["eth0".to_string(), "eth1".to_string()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
