//! `klon serve --pxe`: boots klon's live system on the machines of a
//! network, with dnsmasq (DHCP and TFTP) and klon's own small HTTP server
//! for the kernel and initramfs.
//!
//! What a machine gets, by what its firmware says it is:
//! - iPXE (QEMU's and many NICs' firmware, or the iPXE loaded next):
//!   `boot.ipxe` over HTTP, which loads `vmlinuz` and `initrd.img` over HTTP;
//! - BIOS PXE: `undionly.kpxe` (iPXE) over TFTP, then as above;
//! - UEFI PXE: Debian's signed shim (`bootx64.efi`), which loads Debian's
//!   signed network GRUB (`grubx64.efi`), which reads `grub.cfg` and loads
//!   the kernel and initramfs over TFTP: Secure Boot stays on.
//!
//! The files come from the live stick or its image (`image-build/build`
//! puts `pxe/undionly.kpxe` and `pxe/grubnetx64.efi` on it), read from its
//! FAT partition without mounting it, or from a directory holding the
//! stick's files. Every machine's kernel command line carries
//! `klon.net=dhcp klon.live=none` and what `--append` adds (an unattended
//! job, e.g. `klon.job=receive klon.target=/dev/sda klon.after=poweroff`).
//!
//! DHCP is either full (`--dhcp-range`: dnsmasq hands out addresses; the
//! network must have no other DHCP server) or proxy (the default: the
//! network's own DHCP server gives addresses, dnsmasq only the boot files).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::device::Disk;
use crate::error::{Error, Result};
use crate::fs::fat_files::FatVolume;

/// The kernel command line every machine gets before `--append`.
pub const BASE_CMDLINE: &str = "console=tty0 console=ttyS0,115200n8 quiet klon.live=none klon.net=dhcp";

/// The files a network boot serves, by their name on the server.
#[derive(Debug, Default)]
pub struct BootFiles {
    /// `vmlinuz`, `initrd.img` and the loaders found.
    pub files: BTreeMap<&'static str, Vec<u8>>,
}

/// Where each served file is on the stick (first hit wins), and whether a
/// boot needs it.
const ON_STICK: &[(&str, &[&str], bool)] = &[
    ("vmlinuz", &["live/vmlinuz"], true),
    ("initrd.img", &["live/initrd.img"], true),
    ("undionly.kpxe", &["pxe/undionly.kpxe"], false),
    ("bootx64.efi", &["EFI/BOOT/BOOTX64.EFI"], false),
    ("grubx64.efi", &["pxe/grubnetx64.efi"], false),
];

/// A host's iPXE (Debian's `ipxe` package) when the stick has none.
const HOST_UNDIONLY: &str = "/usr/lib/ipxe/undionly.kpxe";

/// Reads the boot files from `live`: a directory holding the stick's files,
/// or the stick or its image (its FAT partition holding `live/vmlinuz`).
pub fn boot_files(live: &Path) -> Result<BootFiles> {
    let mut out = BootFiles::default();
    if live.is_dir() {
        for (name, places, _) in ON_STICK {
            if let Some(b) = places.iter().find_map(|p| std::fs::read(live.join(p)).ok()) {
                out.files.insert(name, b);
            }
        }
    } else {
        let disk = Disk::open_source(live)?;
        let layout = crate::table::read_layout(&disk)?;
        let mut places: Vec<(u64, u64)> = layout.partitions.iter().map(|p| (p.start, p.size)).collect();
        places.push((0, disk.size)); // a FAT filesystem on the whole device
        let file = std::fs::File::open(live).map_err(|e| Error::io("opening", live, None, e))?;
        // The volume that holds the kernel (read once, kept).
        let found = places.iter().find_map(|&(start, len)| {
            let v = FatVolume::open(&file, live, start, len).ok()?;
            let kernel = v.read_file("live/vmlinuz").ok()?;
            Some((v, kernel))
        });
        let Some((vol, kernel)) = found else {
            return Err(Error::Usage(format!(
                "{} holds no FAT filesystem with live/vmlinuz: give klon's live stick, its image \
                 (target/klon-live.img from image-build/build) or a directory with its files",
                live.display()
            )));
        };
        out.files.insert("vmlinuz", kernel);
        for (name, places, _) in ON_STICK.iter().filter(|(n, _, _)| *n != "vmlinuz") {
            if let Some(b) = places.iter().find_map(|p| vol.read_file(p).ok()) {
                out.files.insert(name, b);
            }
        }
    }
    for (name, places, needed) in ON_STICK {
        if *needed && !out.files.contains_key(name) {
            return Err(Error::Usage(format!(
                "{} has no {}: it is not klon's live system",
                live.display(),
                places.join(" or ")
            )));
        }
    }
    if !out.files.contains_key("undionly.kpxe")
        && let Ok(b) = std::fs::read(HOST_UNDIONLY)
    {
        out.files.insert("undionly.kpxe", b);
    }
    Ok(out)
}

/// `klon serve --pxe` settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The network interface to serve on (it must have an IPv4 address).
    pub interface: String,
    /// The live stick, its image, or a directory of its files.
    pub live: PathBuf,
    /// Full DHCP with these addresses; `None`: proxy DHCP.
    pub dhcp_range: Option<(Ipv4Addr, Ipv4Addr)>,
    /// Added to every machine's kernel command line.
    pub append: String,
    /// The HTTP server's port.
    pub http_port: u16,
}

/// The interface's first IPv4 address and prefix length.
pub fn ipv4_of(iface: &str) -> Result<(Ipv4Addr, u8)> {
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|e| Error::io("listing network addresses", Path::new("/proc/net"), None, e.into()))?;
    let mut known = false;
    for a in addrs {
        if a.interface_name != iface {
            continue;
        }
        known = true;
        let (Some(addr), Some(mask)) = (a.address, a.netmask) else { continue };
        let (Some(addr), Some(mask)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) else { continue };
        return Ok((addr.ip(), u32::from(mask.ip()).count_ones() as u8));
    }
    Err(Error::Usage(if known {
        format!("{iface} has no IPv4 address: give it one first (ip addr add 192.168.50.1/24 dev {iface})")
    } else {
        format!("no network interface {iface} (ip link lists them)")
    }))
}

/// Checks `--append`: the `klon.*` settings must make a valid job (or none).
pub fn check_append(append: &str) -> Result<()> {
    let settings = crate::job::from_cmdline(append);
    super::job::parse(&BTreeMap::new(), &settings)
        .map(|_| ())
        .map_err(|e| e.with_note("in --append (the settings every machine's live system gets)"))
}

/// The iPXE script: kernel and initramfs over HTTP.
pub fn ipxe_script(server: Ipv4Addr, port: u16, cmdline: &str) -> String {
    format!(
        "#!ipxe\necho klon live system from {server}\nkernel http://{server}:{port}/vmlinuz initrd=initrd.img {cmdline}\n\
         initrd http://{server}:{port}/initrd.img\nboot\n"
    )
}

/// GRUB's menu for UEFI machines (over TFTP from the server).
pub fn grub_cfg(cmdline: &str) -> String {
    format!(
        "set timeout=1\nmenuentry \"klon live system (network)\" {{\n    linux /vmlinuz {cmdline}\n    initrd /initrd.img\n}}\n"
    )
}

/// dnsmasq's configuration: DHCP (full or proxy) with the boot files per
/// client kind, TFTP from `tftp_root`, no DNS.
pub fn dnsmasq_conf(opts: &ServeOptions, server: Ipv4Addr, prefix: u8, tftp_root: &Path, leases: &Path) -> String {
    let boot_url = format!("http://{server}:{}/boot.ipxe", opts.http_port);
    let mut c = format!(
        "port=0\ninterface={}\nbind-interfaces\ndhcp-leasefile={}\nenable-tftp\ntftp-root={}\n\
         dhcp-userclass=set:ipxe,iPXE\ndhcp-match=set:efi64,option:client-arch,7\n\
         dhcp-match=set:efi64,option:client-arch,9\n",
        opts.interface,
        leases.display(),
        tftp_root.display()
    );
    match opts.dhcp_range {
        Some((a, b)) => {
            let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0));
            c.push_str(&format!(
                "dhcp-range={a},{b},{mask},12h\ndhcp-boot=tag:ipxe,{boot_url}\n\
                 dhcp-boot=tag:!ipxe,tag:efi64,bootx64.efi\ndhcp-boot=tag:!ipxe,tag:!efi64,undionly.kpxe\n"
            ));
        }
        None => {
            let net = Ipv4Addr::from(u32::from(server) & u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0));
            c.push_str(&format!(
                "dhcp-range={net},proxy\npxe-prompt=\"klon\",0\n\
                 pxe-service=tag:ipxe,x86PC,\"klon live system\",{boot_url}\n\
                 pxe-service=tag:!ipxe,x86PC,\"klon live system\",undionly.kpxe\n\
                 pxe-service=tag:!ipxe,X86-64_EFI,\"klon live system\",bootx64.efi\n"
            ));
        }
    }
    c
}

/// Serves until Ctrl-C (or SIGTERM): writes the files, starts the HTTP
/// server and dnsmasq, and relays what dnsmasq logs about machines.
pub fn serve(opts: &ServeOptions) -> Result<()> {
    check_append(&opts.append)?;
    let (server, prefix) = ipv4_of(&opts.interface)?;
    if let Some((a, b)) = opts.dhcp_range {
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        for x in [a, b] {
            if u32::from(x) & mask != u32::from(server) & mask || x == server {
                return Err(Error::Usage(format!(
                    "--dhcp-range {a},{b}: {x} is not a free address of {}'s network {server}/{prefix}",
                    opts.interface
                )));
            }
        }
        if u32::from(a) > u32::from(b) {
            return Err(Error::Usage(format!("--dhcp-range {a},{b}: the first address is after the last")));
        }
    }
    let files = boot_files(&opts.live)?;
    let cmdline = format!("{BASE_CMDLINE} {}", opts.append).trim().to_string();
    let dir = std::env::temp_dir().join(format!("klon-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tftp = dir.join("tftp");
    let write = |rel: &str, bytes: &[u8]| -> Result<()> {
        let p = tftp.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io("creating", parent, None, e))?;
        }
        std::fs::write(&p, bytes).map_err(|e| Error::io("writing", &p, None, e))
    };
    let result = (|| -> Result<()> {
        for (name, bytes) in &files.files {
            write(name, bytes)?;
        }
        write("boot.ipxe", ipxe_script(server, opts.http_port, &cmdline).as_bytes())?;
        // Debian's network GRUB reads its menu from grub/ on the server.
        write("grub/grub.cfg", grub_cfg(&cmdline).as_bytes())?;
        let mut http_files: BTreeMap<String, PathBuf> = BTreeMap::new();
        for name in ["vmlinuz", "initrd.img", "boot.ipxe"] {
            http_files.insert(format!("/{name}"), tftp.join(name));
        }
        let listener = TcpListener::bind((server, opts.http_port)).map_err(|e| {
            Error::io(format!("listening on HTTP port {} of", opts.http_port), Path::new(&opts.interface), None, e)
        })?;
        let http_files = Arc::new(http_files);
        std::thread::spawn(move || http_serve(listener, http_files));
        let conf = dir.join("dnsmasq.conf");
        let text = dnsmasq_conf(opts, server, prefix, &tftp, &dir.join("leases"));
        std::fs::write(&conf, text).map_err(|e| Error::io("writing", &conf, None, e))?;
        run_dnsmasq(&conf, opts, server, &files, &cmdline)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_dnsmasq(conf: &Path, opts: &ServeOptions, server: Ipv4Addr, files: &BootFiles, cmdline: &str) -> Result<()> {
    let mut child = Command::new("dnsmasq")
        .arg("--keep-in-foreground")
        .arg(format!("--conf-file={}", conf.display()))
        .arg("--log-facility=-")
        .arg("--pid-file=")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Unsupported(format!("cannot run dnsmasq ({e}): install dnsmasq-base")))?;
    let stderr = child.stderr.take().expect("piped");
    let said = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let relay = {
        let said = said.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                // Machines asking and getting: DHCPACK and (proxy) PXE lines, files sent.
                // (UEFI firmware asks for a loader's size, then aborts: not a problem.)
                let noise = line.contains("User aborted the transfer");
                if !noise
                    && (line.contains("DHCPACK")
                        || line.contains("PXE(")
                        || line.contains(" sent ")
                        || line.contains("error")
                        || line.contains("failed"))
                {
                    eprintln!("klon serve: {}", line.split_once(": ").map_or(line.as_str(), |(_, r)| r));
                }
                said.lock().expect("said lock").push(line);
            }
        })
    };
    let loaders: Vec<&str> =
        ["undionly.kpxe", "bootx64.efi", "grubx64.efi"].into_iter().filter(|n| files.files.contains_key(n)).collect();
    eprintln!(
        "klon serve: the live system on {} ({server}): {}, TFTP, HTTP port {}; loaders: {}; kernel command line: {cmdline}",
        opts.interface,
        match opts.dhcp_range {
            Some((a, b)) => format!("DHCP {a}-{b}"),
            None => "proxy DHCP (the network's own server gives addresses)".into(),
        },
        opts.http_port,
        if loaders.is_empty() { "none (iPXE clients only)".into() } else { loaders.join(", ") }
    );
    eprintln!("klon serve: Ctrl-C stops");
    let status = loop {
        if crate::engine::cancel::requested() {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => return Err(Error::io("waiting for dnsmasq", Path::new("dnsmasq"), None, e)),
        }
    };
    let _ = relay.join();
    match status {
        None => {
            eprintln!("klon serve: stopped");
            Ok(())
        }
        Some(s) => {
            let said = said.lock().expect("said lock");
            Err(Error::Unsupported(format!(
                "dnsmasq ended ({s}): {}",
                said.iter().rev().take(3).rev().cloned().collect::<Vec<_>>().join(" / ")
            )))
        }
    }
}

/// A small HTTP/1.0 server: GET and HEAD of the named files only.
fn http_serve(listener: TcpListener, files: Arc<BTreeMap<String, PathBuf>>) {
    for stream in listener.incoming().flatten() {
        let files = files.clone();
        std::thread::spawn(move || {
            let _ = http_one(stream, &files);
        });
    }
}

fn http_one(mut stream: TcpStream, files: &BTreeMap<String, PathBuf>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let peer = stream.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 || head.len() > 16 << 10 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let mut words = text.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let found = files.get(path).filter(|_| method == "GET" || method == "HEAD");
    let Some(file) = found else {
        let body = "not found\n";
        return stream.write_all(
            format!("HTTP/1.0 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                .as_bytes(),
        );
    };
    let mut f = std::fs::File::open(file)?;
    let len = f.metadata()?.len();
    stream.write_all(
        format!("HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )?;
    if method == "GET" {
        std::io::copy(&mut f, &mut stream)?;
        eprintln!("klon serve: HTTP sent {} ({len} bytes) to {peer}", path.trim_start_matches('/'));
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dnsmasq_configuration_per_mode() {
        let mut o = ServeOptions {
            interface: "br0".into(),
            live: PathBuf::from("/x"),
            dhcp_range: Some(("10.78.0.100".parse().unwrap(), "10.78.0.150".parse().unwrap())),
            append: String::new(),
            http_port: 8069,
        };
        let server: Ipv4Addr = "10.78.0.1".parse().unwrap();
        let c = dnsmasq_conf(&o, server, 24, Path::new("/t"), Path::new("/l"));
        assert!(c.contains("dhcp-range=10.78.0.100,10.78.0.150,255.255.255.0,12h\n"), "{c}");
        assert!(c.contains("dhcp-boot=tag:ipxe,http://10.78.0.1:8069/boot.ipxe\n"), "{c}");
        assert!(c.contains("dhcp-boot=tag:!ipxe,tag:!efi64,undionly.kpxe\n"), "{c}");
        assert!(c.contains("port=0\n") && c.contains("interface=br0\n") && c.contains("tftp-root=/t\n"));
        o.dhcp_range = None;
        let c = dnsmasq_conf(&o, "192.168.7.20".parse().unwrap(), 16, Path::new("/t"), Path::new("/l"));
        assert!(c.contains("dhcp-range=192.168.0.0,proxy\n"), "{c}");
        assert!(
            c.contains("pxe-service=tag:ipxe,x86PC,\"klon live system\",http://192.168.7.20:8069/boot.ipxe\n"),
            "{c}"
        );
        assert!(!c.contains("dhcp-boot"), "{c}");
    }

    #[test]
    fn scripts_carry_the_command_line() {
        let s = ipxe_script("10.0.0.1".parse().unwrap(), 8069, "quiet klon.job=receive");
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains("kernel http://10.0.0.1:8069/vmlinuz initrd=initrd.img quiet klon.job=receive\n"), "{s}");
        assert!(s.contains("initrd http://10.0.0.1:8069/initrd.img\nboot\n"), "{s}");
        let g = grub_cfg("quiet klon.job=receive");
        assert!(g.contains("linux /vmlinuz quiet klon.job=receive\n") && g.contains("initrd /initrd.img\n"), "{g}");
    }

    #[test]
    fn a_bad_job_is_refused_before_serving() {
        assert!(check_append("klon.job=receive klon.target=/dev/sda klon.after=poweroff").is_ok());
        assert!(check_append("").is_ok());
        let e = check_append("klon.job=receive").unwrap_err().to_string();
        assert!(e.contains("needs target") && e.contains("--append"), "{e}");
        assert!(check_append("klon.job=restore klon.target=/dev/sda klon.colour=red").is_err());
    }
}
