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
//!   the kernel and initramfs over TFTP: Secure Boot stays on;
//! - UEFI HTTP boot (full DHCP only: the firmware asks as `HTTPClient` and
//!   gets a URL): the stick's disk itself (its GPT and FAT partition,
//!   `klon-live.img`, typed `application/vnd.efi-img`), which the firmware
//!   downloads into a RAM disk and boots as it would the stick: Debian's
//!   signed shim and GRUB, Secure Boot on. The stick's menu takes the
//!   kernel command line from `live/net.cfg`, a fixed-size file klon serve
//!   fills in (in place) in the copy it serves. (Debian's signed network
//!   GRUB 2.06, loaded by HTTP boot, does not find its menu: it knows only
//!   PXE's TFTP.) With `--uefi-http` UEFI machines are offered HTTP boot
//!   only.
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
    /// The stick's disk (its table and FAT partition) for UEFI HTTP boot,
    /// which the firmware boots as a RAM disk, and where in it
    /// `live/net.cfg` lies.
    pub disk: Option<StickDisk>,
}

/// The live stick's disk, as UEFI HTTP boot serves it (read only when
/// served: proxy DHCP offers no HTTP boot).
#[derive(Debug)]
pub struct StickDisk {
    /// The stick or its image.
    pub path: PathBuf,
    /// Bytes served: from the disk's start to 1 MiB after its FAT
    /// partition (where the live image has its backup GPT).
    pub len: u64,
    /// `live/net.cfg`'s bytes: (offset, length) of each cluster.
    pub net_cfg: Vec<(u64, u64)>,
}

/// Where the stick's GRUB menu looks for a network boot's command line.
const NET_CFG: &str = "live/net.cfg";

impl StickDisk {
    /// The disk with `live/net.cfg` saying `cmdline` (in place: the file
    /// keeps its size, padded with a comment).
    pub fn with_cmdline(&self, cmdline: &str) -> Result<Vec<u8>> {
        let f = std::fs::File::open(&self.path).map_err(|e| Error::io("opening", &self.path, None, e))?;
        let mut bytes = vec![0u8; self.len as usize];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut bytes, 0)
            .map_err(|e| Error::io("reading", &self.path, Some(0), e))?;
        put_cmdline(&mut bytes, &self.net_cfg, cmdline)?;
        Ok(bytes)
    }
}

/// Writes `cmdline` into `live/net.cfg`, whose clusters `net_cfg` says
/// where in `disk` they are, as GRUB script padded with comments.
fn put_cmdline(disk: &mut [u8], net_cfg: &[(u64, u64)], cmdline: &str) -> Result<()> {
    let room: u64 = net_cfg.iter().map(|r| r.1).sum();
    let escaped: String = cmdline
        .chars()
        .flat_map(|c| match c {
            '"' | '\\' | '$' => vec!['\\', c],
            c => vec![c],
        })
        .collect();
    let mut text = format!("set klon_cmdline=\"{escaped}\"\n").into_bytes();
    if text.len() as u64 + 2 > room {
        return Err(Error::Usage(format!(
            "the kernel command line is {} bytes; UEFI HTTP boot carries at most {} (the stick's {NET_CFG})",
            cmdline.len(),
            room.saturating_sub(40)
        )));
    }
    // Comment lines of at most 64 bytes up to the file's size.
    while (text.len() as u64) < room {
        let n = (room as usize - text.len()).min(64);
        text.extend(std::iter::repeat_n(b'#', n - 1));
        text.push(b'\n');
    }
    let mut from = 0usize;
    for &(at, len) in net_cfg {
        disk[at as usize..(at + len) as usize].copy_from_slice(&text[from..from + len as usize]);
        from += len as usize;
    }
    Ok(())
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
        // A stick made with live/net.cfg (and a partition table): its
        // disk for UEFI HTTP boot.
        let part_end = layout.partitions.iter().map(|p| p.start + p.size).max();
        if let (Ok(net_cfg), Some(end)) = (vol.file_ranges(NET_CFG), part_end) {
            let len = (end + (1 << 20)).min(disk.size);
            if net_cfg.iter().all(|&(at, n)| at + n <= len) && len <= 1 << 30 {
                out.disk = Some(StickDisk { path: live.to_path_buf(), len, net_cfg });
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
    /// UEFI machines get HTTP boot only (no PXE/TFTP offer).
    pub uefi_http: bool,
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

/// The stick's disk as UEFI HTTP boot fetches it.
const HTTP_DISK: &str = "klon-live.img";

/// dnsmasq's configuration: DHCP (full or proxy) with the boot files per
/// client kind, TFTP from `tftp_root`, no DNS; with `http_disk`, UEFI HTTP
/// boot clients get the stick's disk's URL (full DHCP only).
pub fn dnsmasq_conf(
    opts: &ServeOptions,
    server: Ipv4Addr,
    prefix: u8,
    tftp_root: &Path,
    leases: &Path,
    http_disk: bool,
) -> String {
    let boot_url = format!("http://{server}:{}/boot.ipxe", opts.http_port);
    let mut c = format!(
        "port=0\ninterface={}\nbind-interfaces\ndhcp-leasefile={}\nenable-tftp\ntftp-root={}\n\
         dhcp-userclass=set:ipxe,iPXE\ndhcp-match=set:efi64,option:client-arch,7\n\
         dhcp-match=set:efi64,option:client-arch,9\ndhcp-vendorclass=set:httpboot,HTTPClient\n",
        opts.interface,
        leases.display(),
        tftp_root.display()
    );
    match opts.dhcp_range {
        Some((a, b)) => {
            let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0));
            c.push_str(&format!("dhcp-range={a},{b},{mask},12h\ndhcp-boot=tag:ipxe,{boot_url}\n"));
            if http_disk {
                // UEFI HTTP boot: the answer names itself HTTPClient and
                // carries the URL of the stick's disk, which the firmware
                // boots as a RAM disk (its signed shim and GRUB).
                let url = format!("http://{server}:{}/{HTTP_DISK}", opts.http_port);
                c.push_str(&format!("dhcp-option-force=tag:httpboot,60,HTTPClient\ndhcp-boot=tag:httpboot,{url}\n"));
            }
            if !opts.uefi_http {
                c.push_str("dhcp-boot=tag:!ipxe,tag:!httpboot,tag:efi64,bootx64.efi\n");
            }
            c.push_str("dhcp-boot=tag:!ipxe,tag:!httpboot,tag:!efi64,undionly.kpxe\n");
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
    if opts.uefi_http && opts.dhcp_range.is_none() {
        return Err(Error::Usage(
            "--uefi-http needs --dhcp-range: UEFI HTTP boot takes its URL from the DHCP answer, which proxy DHCP \
             does not give"
                .into(),
        ));
    }
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
    let mut http_disk = match (&files.disk, opts.dhcp_range) {
        (Some(d), Some(_)) => Some(d.with_cmdline(&cmdline)?),
        _ => None,
    };
    let http_boot = http_disk.is_some();
    if opts.uefi_http && !http_boot {
        return Err(Error::Usage(format!(
            "--uefi-http: {} has no {NET_CFG} in a partitioned FAT (a stick made before UEFI HTTP boot, or a \
             directory): give a live stick or image made by this klon's image-build",
            opts.live.display()
        )));
    }
    let dir = crate::scratch::dir("serve");
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
        // iPXE's files, and UEFI HTTP boot's disk.
        if let Some(d) = http_disk.take() {
            write(HTTP_DISK, &d)?;
        }
        for name in ["vmlinuz", "initrd.img", "boot.ipxe", HTTP_DISK] {
            if tftp.join(name).exists() {
                http_files.insert(format!("/{name}"), tftp.join(name));
            }
        }
        let listener = TcpListener::bind((server, opts.http_port)).map_err(|e| {
            Error::io(format!("listening on HTTP port {} of", opts.http_port), Path::new(&opts.interface), None, e)
        })?;
        let http_files = Arc::new(http_files);
        std::thread::spawn(move || http_serve(listener, http_files));
        let conf = dir.join("dnsmasq.conf");
        let text = dnsmasq_conf(opts, server, prefix, &tftp, &dir.join("leases"), http_boot);
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
    // (shim asks for its second stage as "//grubx64.efi".)
    let path = format!("/{}", path.split('?').next().unwrap_or("").trim_start_matches('/'));
    let path = path.as_str();
    let found = files.get(path).filter(|_| method == "GET" || method == "HEAD");
    let Some(file) = found else {
        eprintln!("klon serve: HTTP has no {path} (asked by {peer})");
        let body = "not found\n";
        return stream.write_all(
            format!("HTTP/1.0 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                .as_bytes(),
        );
    };
    let mut f = std::fs::File::open(file)?;
    let len = f.metadata()?.len();
    // UEFI HTTP boot tells a disk to boot as a RAM disk by its type.
    let kind = if path.ends_with(".img") { "application/vnd.efi-img" } else { "application/octet-stream" };
    stream.write_all(
        format!("HTTP/1.0 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
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

    /// net.cfg is rewritten in place, across its clusters, to the same
    /// size: the command line (quotes, backslashes and dollars escaped for
    /// GRUB), then comment lines; nothing else in the disk changes; a
    /// command line too long for it is refused.
    #[test]
    fn the_served_disk_carries_the_command_line_in_net_cfg() {
        let bytes: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let dir = crate::testutil::TempDir::new("net-cfg");
        let path = dir.0.join("stick.img");
        std::fs::write(&path, &bytes).unwrap();
        let d = StickDisk { path, len: 8192, net_cfg: vec![(4096, 512), (1024, 100)] };
        let out = d.with_cmdline("quiet klon.image=\"a b\" x=$y\\z").unwrap();
        assert_eq!(out.len(), bytes.len());
        let mut text = out[4096..4608].to_vec();
        text.extend_from_slice(&out[1024..1124]);
        let text = String::from_utf8(text).unwrap();
        assert!(text.starts_with("set klon_cmdline=\"quiet klon.image=\\\"a b\\\" x=\\$y\\\\z\"\n#"), "{text}");
        assert!(text.ends_with("#\n") && text.lines().skip(1).all(|l| l.len() <= 63 && l.chars().all(|c| c == '#')));
        for (i, (a, b)) in out.iter().zip(&bytes).enumerate() {
            if !(4096..4608).contains(&i) && !(1024..1124).contains(&i) {
                assert_eq!(a, b, "byte {i} changed");
            }
        }
        assert!(d.with_cmdline(&"x".repeat(700)).unwrap_err().to_string().contains("at most"));
    }

    #[test]
    fn dnsmasq_configuration_per_mode() {
        let mut o = ServeOptions {
            interface: "br0".into(),
            live: PathBuf::from("/x"),
            dhcp_range: Some(("10.78.0.100".parse().unwrap(), "10.78.0.150".parse().unwrap())),
            append: String::new(),
            http_port: 8069,
            uefi_http: false,
        };
        let server: Ipv4Addr = "10.78.0.1".parse().unwrap();
        let c = dnsmasq_conf(&o, server, 24, Path::new("/t"), Path::new("/l"), true);
        assert!(c.contains("dhcp-range=10.78.0.100,10.78.0.150,255.255.255.0,12h\n"), "{c}");
        assert!(c.contains("dhcp-boot=tag:ipxe,http://10.78.0.1:8069/boot.ipxe\n"), "{c}");
        assert!(c.contains("dhcp-boot=tag:!ipxe,tag:!httpboot,tag:!efi64,undionly.kpxe\n"), "{c}");
        assert!(c.contains("dhcp-boot=tag:!ipxe,tag:!httpboot,tag:efi64,bootx64.efi\n"), "{c}");
        assert!(c.contains("dhcp-vendorclass=set:httpboot,HTTPClient\n"), "{c}");
        assert!(c.contains("dhcp-option-force=tag:httpboot,60,HTTPClient\n"), "{c}");
        assert!(c.contains("dhcp-boot=tag:httpboot,http://10.78.0.1:8069/klon-live.img\n"), "{c}");
        o.uefi_http = true;
        let c = dnsmasq_conf(&o, server, 24, Path::new("/t"), Path::new("/l"), true);
        assert!(!c.contains("tag:efi64,bootx64.efi"), "UEFI PXE not offered:\n{c}");
        o.uefi_http = false;
        assert!(c.contains("port=0\n") && c.contains("interface=br0\n") && c.contains("tftp-root=/t\n"));
        o.dhcp_range = None;
        let c = dnsmasq_conf(&o, "192.168.7.20".parse().unwrap(), 16, Path::new("/t"), Path::new("/l"), true);
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
