//! A network share as an image drive, mounted with the kernel's own client
//! where a USB drive would be, so that every job works on it as on a drive:
//! - `smb://[USER@]HOST[:PORT]/SHARE[/DIR]` (a NAS, a Windows or Samba
//!   server; SMB 2 or 3, the kernel's cifs): images go into DIR, or into
//!   `klon-images/` when the location names only the share. The password
//!   is given apart from the location (klon.conf's `drive_password`),
//!   handed to the kernel in the mount's options and nowhere else: not in a
//!   file, not on a command line, not in messages. No user: a guest login.
//! - `nfs://HOST[:PORT]/PATH` (NFS 4.1 or later, `sec=sys`): the folder
//!   PATH of the server's NFSv4 namespace is mounted and holds the images.
//!   NFS has no password: the server trusts the client's address.
//! - `sftp://[USER@]HOST[:PORT]/PATH` (an SSH server): the folder PATH is
//!   mounted with sshfs and holds the images; ssh's own keys and known
//!   hosts, nothing typed (the live system takes them from the stick's
//!   `ssh/` folder).

use std::net::{IpAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use crate::device::mounts::Mounted;
use crate::error::{Error, Result};

/// SMB's port.
const SMB_PORT: u16 = 445;
/// NFS's port.
const NFS_PORT: u16 = 2049;
/// SSH's port.
const SSH_PORT: u16 = 22;

/// The protocol of a share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// SMB 2 or 3 (the kernel's cifs).
    Smb,
    /// NFS 4.1 or later.
    Nfs,
    /// SFTP, with sshfs.
    Sftp,
}

impl Protocol {
    fn scheme(self) -> &'static str {
        match self {
            Protocol::Smb => "smb",
            Protocol::Nfs => "nfs",
            Protocol::Sftp => "sftp",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Protocol::Smb => SMB_PORT,
            Protocol::Nfs => NFS_PORT,
            Protocol::Sftp => SSH_PORT,
        }
    }
}

/// A share, parsed from its location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// SMB, NFS or SFTP.
    pub protocol: Protocol,
    /// The user to log in as; `None`: guest (SMB), ssh's default (SFTP);
    /// NFS has none.
    pub user: Option<String>,
    /// The server's name or address.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// The share's name (SMB), or the whole path (NFS, SFTP).
    pub share: String,
    /// The folder in the share that holds the images; `None`: the
    /// share's `klon-images/` (SMB), the path itself (NFS, SFTP).
    pub dir: Option<String>,
}

/// The protocol of a share location, `None` for anything else.
fn protocol_of(spec: &str) -> Option<Protocol> {
    let lower = spec.trim().to_ascii_lowercase();
    [Protocol::Smb, Protocol::Nfs, Protocol::Sftp]
        .into_iter()
        .find(|p| lower.starts_with(&format!("{}://", p.scheme())))
}

/// Whether `spec` names a network share rather than a drive.
pub fn is_share(spec: &str) -> bool {
    protocol_of(spec).is_some()
}

/// Parses `smb://[USER@]HOST[:PORT]/SHARE[/DIR]`, `nfs://HOST[:PORT]/PATH`
/// or `sftp://[USER@]HOST[:PORT]/PATH`.
pub fn parse(spec: &str) -> Result<Share> {
    let spec = spec.trim();
    let bad = |why: &str| {
        Error::Usage(format!(
            "{spec}: {why} (write smb://[USER@]HOST[:PORT]/SHARE[/FOLDER], nfs://HOST[:PORT]/PATH or \
             sftp://[USER@]HOST[:PORT]/PATH)"
        ))
    };
    let protocol = protocol_of(spec).ok_or_else(|| bad("not an smb://, nfs:// or sftp:// location"))?;
    let rest = &spec[protocol.scheme().len() + 3..];
    let (authority, path) = rest.split_once('/').ok_or_else(|| bad("no share"))?;
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) if !u.is_empty() && !u.contains([',', ':']) => (Some(u.to_string()), h),
        Some(_) => return Err(bad("the user name is empty or holds a comma or colon")),
        None => (None, authority),
    };
    let (host, port) = match hostport.rsplit_once(':').filter(|(h, _)| !h.contains(':')) {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad("the port is not a number"))?),
        None => (hostport, protocol.default_port()),
    };
    if protocol == Protocol::Nfs && user.is_some() {
        return Err(bad("NFS has no user name (the server trusts the client's address): remove USER@"));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty()
        || host.starts_with('-')
        || !host.chars().all(|c| c.is_ascii_alphanumeric() || ".-_:".contains(c))
    {
        return Err(bad("no host, or a host name with odd characters"));
    }
    let mut parts = path.split('/').filter(|p| !p.is_empty());
    let share = parts.next().ok_or_else(|| bad("no share"))?.to_string();
    let dir: Vec<&str> = parts.collect();
    if dir.iter().chain(std::iter::once(&share.as_str())).any(|p| *p == "." || *p == ".." || p.contains(',')) {
        return Err(bad("`.`, `..` or a comma in the share or folder"));
    }
    let (share, dir) = match protocol {
        Protocol::Smb => (share, (!dir.is_empty()).then(|| dir.join("/"))),
        Protocol::Nfs | Protocol::Sftp => {
            (std::iter::once(share.as_str()).chain(dir).collect::<Vec<_>>().join("/"), None)
        }
    };
    Ok(Share { protocol, user, host: host.to_string(), port, share, dir })
}

impl Share {
    /// Its location, as a person would write it.
    pub fn describe(&self) -> String {
        let dir = self.dir.as_deref().map(|d| format!("/{d}")).unwrap_or_default();
        format!("{}{dir}", self.share_url())
    }

    /// The share's location, without the folder.
    pub fn share_url(&self) -> String {
        let user = self.user.as_deref().map(|u| format!("{u}@")).unwrap_or_default();
        let port = if self.port == self.protocol.default_port() { String::new() } else { format!(":{}", self.port) };
        format!("{}://{user}{}{port}/{}", self.protocol.scheme(), self.host, self.share)
    }

    /// The folder of the mounted share (at `at`) that holds the images.
    pub fn images_dir(&self, at: &Path) -> PathBuf {
        match (self.protocol, &self.dir) {
            (Protocol::Nfs | Protocol::Sftp, _) => at.to_path_buf(),
            (Protocol::Smb, Some(d)) => at.join(d),
            (Protocol::Smb, None) => at.join(super::image_drive::IMAGES_DIR),
        }
    }

    /// The server's address: the host itself, or what its name resolves to.
    fn address(&self) -> Result<IpAddr> {
        if let Ok(a) = self.host.parse::<IpAddr>() {
            return Ok(a);
        }
        (self.host.as_str(), self.port).to_socket_addrs().ok().and_then(|mut a| a.next()).map(|a| a.ip()).ok_or_else(
            || {
                Error::Usage(format!(
                    "{}: the name {} does not resolve (no DNS server from DHCP?): give the server's address",
                    self.describe(),
                    self.host
                ))
            },
        )
    }

    /// The cifs mount's options: who, the server's address, its port.
    /// Commas in the password are doubled, as the kernel's parser wants.
    fn options(&self, addr: IpAddr, password: Option<&str>) -> String {
        let login = match (&self.user, password) {
            (Some(u), Some(p)) => format!("username={u},password={}", p.replace(',', ",,")),
            (Some(u), None) => format!("username={u},password="),
            (None, _) => "guest".to_string(),
        };
        format!("{login},ip={addr},port={},uid=0,gid=0,file_mode=0600,dir_mode=0700,nounix,noserverino", self.port)
    }

    /// Mounts the SFTP location's folder at `at` with sshfs (ssh's keys and
    /// known hosts, nothing typed), read-only when `read_only`.
    fn mount_sftp(&self, at: &Path, read_only: bool) -> Result<Mounted> {
        std::fs::create_dir_all(at).map_err(|e| Error::io("creating the mount point", at, None, e))?;
        let port = (self.port != SSH_PORT).then_some(self.port);
        let dir = format!("/{}", self.share);
        if let Err(e) =
            crate::image::location::sshfs(self.user.as_deref(), &self.host, port, &dir, at, &self.describe(), read_only)
        {
            let _ = std::fs::remove_dir(at);
            return Err(e);
        }
        Ok(Mounted::adopt(Path::new(&self.describe()), at))
    }

    /// NFS's mount options: version, the server's address and port.
    fn nfs_options(&self, addr: IpAddr) -> String {
        format!("vers=4.1,addr={addr},port={},proto=tcp,sec=sys,hard,timeo=600", self.port)
    }

    /// Mounts the share at `at` (created if missing), read-write unless
    /// `read_only`; `password` for an SMB user. An error says what the
    /// server or the kernel said, in words, and never the password.
    pub fn mount(&self, password: Option<&str>, at: &Path, read_only: bool) -> Result<Mounted> {
        if self.protocol == Protocol::Sftp {
            return self.mount_sftp(at, read_only);
        }
        let addr = self.address()?;
        let (source, fstype, options, client, what) = if self.protocol == Protocol::Smb {
            let unc = format!("//{}/{}", self.host, self.share);
            (unc, "cifs", self.options(addr, password), "SMB client (the cifs module)", "share")
        } else {
            (format!("{}:/{}", self.host, self.share), "nfs4", self.nfs_options(addr), "NFS client", "path")
        };
        Mounted::mount_share(Path::new(&source), fstype, at, read_only, &options).map_err(|errno| {
            let denied = matches!(errno, nix::Error::EACCES | nix::Error::EPERM | nix::Error::EKEYREJECTED);
            let why = match errno {
                _ if denied && self.protocol == Protocol::Nfs => {
                    "the server does not let this machine in (its export's client list, root squashing)".to_string()
                }
                _ if denied => "the server refused the user name or password (drive_password in klon.conf)".to_string(),
                nix::Error::ENOENT | nix::Error::ENXIO => format!("the server has no {what} {}", self.share),
                nix::Error::EHOSTUNREACH | nix::Error::ENETUNREACH | nix::Error::ETIMEDOUT => {
                    format!("cannot reach {addr} (is the network up, the address right?)")
                }
                nix::Error::ECONNREFUSED => {
                    format!("{addr} does not answer {} on port {}", self.protocol.scheme().to_uppercase(), self.port)
                }
                nix::Error::ENODEV => format!("this kernel has no {client}"),
                e => format!("{} ({e})", e.desc()),
            };
            Error::Usage(format!("mounting the network share {}: {why}", self.describe()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_with_their_parts_or_are_refused() {
        let s = parse("smb://backup@nas.local/images").unwrap();
        assert_eq!(
            s,
            Share {
                protocol: Protocol::Smb,
                user: Some("backup".into()),
                host: "nas.local".into(),
                port: 445,
                share: "images".into(),
                dir: None
            }
        );
        assert_eq!(s.images_dir(Path::new("/run/klon/drive")), Path::new("/run/klon/drive/klon-images"));
        let s = parse("SMB://10.0.0.2:4445/data/klon/pcs/").unwrap();
        assert_eq!((s.user.as_deref(), s.port, s.dir.as_deref()), (None, 4445, Some("klon/pcs")));
        assert_eq!(s.describe(), "smb://10.0.0.2:4445/data/klon/pcs");
        assert_eq!(s.images_dir(Path::new("/m")), Path::new("/m/klon/pcs"));
        assert!(is_share(" smb://h/s") && is_share("NFS://h/x") && !is_share("LABEL=smb") && !is_share("/dev/sdb1"));
        let n = parse("nfs://10.0.0.2/volume1/klon/").unwrap();
        assert_eq!(
            (n.protocol, n.port, n.share.as_str(), n.dir.as_deref()),
            (Protocol::Nfs, 2049, "volume1/klon", None)
        );
        assert_eq!(n.describe(), "nfs://10.0.0.2/volume1/klon");
        assert_eq!(n.images_dir(Path::new("/m")), Path::new("/m"), "the path itself holds the images");
        assert!(n.nfs_options("10.0.0.2".parse().unwrap()).starts_with("vers=4.1,addr=10.0.0.2,port=2049,"));
        let f = parse("sftp://backup@nas:2222/srv/images").unwrap();
        assert_eq!(
            (f.protocol, f.port, f.share.as_str(), f.user.as_deref()),
            (Protocol::Sftp, 2222, "srv/images", Some("backup"))
        );
        assert_eq!(f.describe(), "sftp://backup@nas:2222/srv/images");
        assert_eq!(f.images_dir(Path::new("/m")), Path::new("/m"));
        for (bad, why) in [
            ("smb://host", "no share"),
            ("smb://host/", "no share"),
            ("smb://@host/s", "user name"),
            ("smb://a,b@host/s", "user name"),
            ("smb://host:x/s", "port"),
            ("smb://-o/s", "host"),
            ("smb://h;rm/s", "host"),
            ("smb://h/s/../x", "`..`"),
            ("smb://h/s,x", "comma"),
            ("LABEL=x", "not an smb://"),
            ("nfs://u@h/x", "no user name"),
            ("sftp://h", "no share"),
            ("nfs://h", "no share"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn the_password_goes_into_the_options_escaped_and_a_guest_has_none() {
        let s = parse("smb://u@10.0.0.2/images").unwrap();
        let o = s.options("10.0.0.2".parse().unwrap(), Some("a,b c"));
        assert!(o.starts_with("username=u,password=a,,b c,ip=10.0.0.2,port=445,"), "{o}");
        let g = parse("smb://10.0.0.2/images").unwrap();
        assert!(g.options("10.0.0.2".parse().unwrap(), Some("ignored")).starts_with("guest,ip=10.0.0.2"));
    }
}
