//! Unattended jobs: what the kernel command line (`klon.KEY=VALUE`) and the
//! stick's `klon.conf` (`KEY = VALUE` lines) ask for.
//!
//! Keys (the same in both places; the command line wins over the file):
//!
//! | key | value |
//! | --- | --- |
//! | `job` | `backup`, `restore`, `verify`, `receive` (a deployment `klon deploy` sends by multicast), or `none` (ignore a job in klon.conf) |
//! | `source` | backup: the disk, `/dev/sda` or `serial=SERIAL` |
//! | `target` | restore, receive: the disk, `/dev/nvme0n1` or `serial=SERIAL` |
//! | `image` | backup, restore, verify: the image's name in the folder `klon-images/` of the image drive |
//! | `drive` | the image drive: `LABEL=…`, `UUID=…` or `/dev/sdc1` |
//! | `after` | `poweroff`, `reboot`, `shell` or `wizard` (default) |
//! | `grow_last` | restore: `yes` extends the last partition to the end of a larger disk |
//! | `grow_all` | restore: `yes` grows every partition klon can grow in proportion on a larger disk |
//! | `level` | backup: zstd level (default 3) |
//! | `repo` | backup: `yes` makes `image` a repository if it is not one yet (an existing repository always gets a new snapshot) |
//! | `keep` | backup into a repository: the retention policy to save and apply after the backup, e.g. `daily=7,weekly=4` |
//! | `copy_drive` | backup into a repository: then copy the new snapshot into the repository of the same name on this second drive (`LABEL=…`, `UUID=…` or `/dev/sdd1`; made with the same keys when missing), read back |
//! | `rescue` | backup: `yes` reads around unreadable sectors (`klon backup --rescue`) |
//! | `encrypt` | backup: `yes` makes a new repository encrypted (with `passphrase`) |
//! | `passphrase` | the passphrase of an encrypted repository: only in klon.conf, never on the kernel command line |
//! | `net` | `dhcp`: bring up the wired network by DHCP at boot (implied by `job=receive`); `none` (default) |
//! | `interface` | the network interface for `net` and `receive`: a name (`eth0`) or a MAC address (default: the first wired one that gets a lease) |
//! | `port` | receive: udpcast's port base, the sender's (default 9000) |
//! | `wait` | seconds to wait for the disks, the drive and the network interface to appear (default 30) |
//! | `shell` | without a job: start with a rescue shell on every console |
//! | `live` | the live stick's FAT partition, `LABEL=…` or `UUID=…` (set by the build); `none` when booted from the network (klon serve --pxe) |

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// What an unattended job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// `klon backup SOURCE IMAGE`.
    Backup,
    /// `klon restore --yes IMAGE TARGET`.
    Restore,
    /// `klon verify IMAGE`.
    Verify,
    /// `klon receive --multicast --yes TARGET`.
    Receive,
}

impl JobKind {
    /// The command's name.
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Backup => "backup",
            JobKind::Restore => "restore",
            JobKind::Verify => "verify",
            JobKind::Receive => "receive",
        }
    }
}

/// What the live system does when a job has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Power the machine off.
    Poweroff,
    /// Reboot.
    Reboot,
    /// A rescue shell on every console.
    Shell,
    /// The wizard on every console.
    Wizard,
}

impl After {
    fn parse(s: &str) -> Result<After> {
        match s.to_ascii_lowercase().as_str() {
            "poweroff" | "halt" | "off" => Ok(After::Poweroff),
            "reboot" => Ok(After::Reboot),
            "shell" => Ok(After::Shell),
            "wizard" | "" => Ok(After::Wizard),
            other => Err(Error::Usage(format!("after={other}: use poweroff, reboot, shell or wizard"))),
        }
    }
}

/// An unattended job, checked for completeness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Backup, restore or verify.
    pub kind: JobKind,
    /// The disk to back up (backup only).
    pub source: Option<String>,
    /// The disk to overwrite (restore only).
    pub target: Option<String>,
    /// The image's name inside `klon-images/` on the image drive (empty
    /// for receive: the image comes from the network).
    pub image: String,
    /// How to find the image drive; `None`: the only candidate.
    pub drive: Option<String>,
    /// What to do afterwards.
    pub after: After,
    /// Restore: extend the last partition.
    pub grow_last: bool,
    /// Restore: grow every partition klon can in proportion (`--grow-all`).
    pub grow_all: bool,
    /// Backup: zstd level.
    pub level: i32,
    /// Backup: make the image a repository if it is not one.
    pub repo: bool,
    /// Backup into a repository: the retention policy (`daily=7,weekly=4`).
    pub keep: Option<String>,
    /// Backup into a repository: the second drive the new snapshot is
    /// copied to (a drive spec as for `drive`).
    pub copy_drive: Option<String>,
    /// Backup: read around unreadable sectors, storing them as zeros
    /// (`klon backup --rescue`).
    pub rescue: bool,
    /// Seconds to wait for devices to appear.
    pub wait_secs: u64,
    /// Backup: make a new repository encrypted.
    pub encrypt: bool,
    /// The passphrase of an encrypted repository (from klon.conf only).
    pub passphrase: Option<Secret>,
    /// Receive: udpcast's port base.
    pub port: u16,
    /// The network, when the job or the settings ask for it.
    pub net: Option<Net>,
}

/// The wired network, brought up by DHCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Net {
    /// The interface (a name or a MAC address); `None`: the first wired
    /// one that gets a lease.
    pub interface: Option<String>,
}

/// The network the merged settings ask for (`net=dhcp`, or a receive job),
/// whether or not there is a job.
pub fn net(config: &BTreeMap<String, String>, cmdline: &BTreeMap<String, String>) -> Result<Option<Net>> {
    let mut s = config.clone();
    s.extend(cmdline.iter().map(|(k, v)| (k.clone(), v.clone())));
    let get = |k: &str| s.get(k).map(|v| v.trim().to_ascii_lowercase()).filter(|v| !v.is_empty());
    let receive = get("job").as_deref() == Some("receive");
    let dhcp = match get("net").as_deref() {
        Some("dhcp") => true,
        Some("none" | "no" | "off") if receive => {
            return Err(Error::Usage("job=receive needs the network: remove net=none".into()));
        }
        Some("none" | "no" | "off") | None => receive,
        Some(other) => return Err(Error::Usage(format!("net={other}: use dhcp or none"))),
    };
    Ok(dhcp.then(|| Net { interface: s.get("interface").map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) }))
}

/// A passphrase: compared and cloned, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// Splits a kernel command line into words, keeping double-quoted parts
/// together (`klon.drive="LABEL=My Drive"`), the way the kernel does.
pub fn split_cmdline(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(cur);
    }
    words
}

/// The `klon.*` settings of a kernel command line, prefix removed, `-`
/// written as `_`. A bare `klon.KEY` means `KEY=yes`.
pub fn from_cmdline(cmdline: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for w in split_cmdline(cmdline) {
        let Some(rest) = w.strip_prefix("klon.") else { continue };
        let (k, v) = rest.split_once('=').unwrap_or((rest, "yes"));
        out.insert(normalise_key(k), v.to_string());
    }
    out
}

/// Parses klon.conf: `KEY = VALUE` per line (a `klon.` prefix on keys is
/// accepted), `#` starts a comment, values may be double-quoted.
pub fn from_config(text: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_start_matches('\u{feff}').trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(Error::Usage(format!("klon.conf line {}: expected KEY = VALUE, got {line:?}", n + 1)));
        };
        let k = k.trim();
        let k = k.strip_prefix("klon.").unwrap_or(k);
        let v = v.trim();
        let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
        out.insert(normalise_key(k), v.to_string());
    }
    Ok(out)
}

fn normalise_key(k: &str) -> String {
    k.trim().to_ascii_lowercase().replace('-', "_")
}

/// Seconds to wait for disks, drives and the network when `wait` is not set.
pub const DEFAULT_WAIT: u64 = 30;

const KEYS: &[&str] = &[
    "job",
    "source",
    "target",
    "image",
    "drive",
    "after",
    "grow_last",
    "grow_all",
    "level",
    "rescue",
    "repo",
    "keep",
    "copy_drive",
    "encrypt",
    "passphrase",
    "wait",
    "net",
    "interface",
    "port",
    "live",
    "shell",
];

fn yes(key: &str, v: &str) -> Result<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "yes" | "y" | "true" | "on" => Ok(true),
        "0" | "no" | "n" | "false" | "off" | "" => Ok(false),
        other => Err(Error::Usage(format!("{key}={other}: use yes or no"))),
    }
}

/// Merges the config file's settings with the command line's (the command
/// line wins) and checks the job. `Ok(None)`: no job asked for.
pub fn parse(config: &BTreeMap<String, String>, cmdline: &BTreeMap<String, String>) -> Result<Option<Job>> {
    if cmdline.contains_key("passphrase") {
        return Err(Error::Usage(
            "klon.passphrase on the kernel command line would be readable by anyone who sees it: put \
             passphrase = \"…\" in klon.conf on the stick"
                .into(),
        ));
    }
    let mut s = config.clone();
    s.extend(cmdline.iter().map(|(k, v)| (k.clone(), v.clone())));
    if let Some(k) = s.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(Error::Usage(format!("unknown setting {k:?} (known: {})", KEYS.join(", "))));
    }
    let get = |k: &str| s.get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    let kind = match get("job").as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("none") | Some("wizard") => return Ok(None),
        Some("backup") => JobKind::Backup,
        Some("restore") => JobKind::Restore,
        Some("verify") => JobKind::Verify,
        Some("receive") => JobKind::Receive,
        Some(other) => return Err(Error::Usage(format!("job={other}: use backup, restore, verify, receive or none"))),
    };
    let need = |k: &str| get(k).ok_or_else(|| Error::Usage(format!("job={} needs {k}=…", kind.name())));
    let image = if kind == JobKind::Receive {
        if let Some(i) = get("image") {
            return Err(Error::Usage(format!(
                "image={i} is for backup, restore and verify: job=receive takes the image klon deploy sends; remove it"
            )));
        }
        if let Some(d) = get("drive") {
            return Err(Error::Usage(format!(
                "drive={d}: job=receive writes what arrives from the network and needs no image drive; remove it"
            )));
        }
        String::new()
    } else {
        need("image")?
    };
    if kind != JobKind::Receive && (image.starts_with('/') || image.split('/').any(|c| c == ".." || c.is_empty())) {
        return Err(Error::Usage(format!(
            "image={image}: give the image's name (or a relative path) inside klon-images/ on the image drive"
        )));
    }
    let source = if kind == JobKind::Backup { Some(need("source")?) } else { None };
    let target = if matches!(kind, JobKind::Restore | JobKind::Receive) { Some(need("target")?) } else { None };
    let port = match get("port") {
        None => crate::engine::deploy::DEFAULT_PORT,
        Some(p) => p.parse().map_err(|_| Error::Usage(format!("port={p}: a port number (udpcast's port base)")))?,
    };
    let level = match get("level") {
        None => crate::engine::backup::DEFAULT_LEVEL,
        Some(l) => l.parse().map_err(|_| Error::Usage(format!("level={l}: a number from 1 to 22")))?,
    };
    let keep = get("keep");
    if let Some(k) = &keep {
        crate::repo::Keep::parse(k).map_err(|why| Error::Usage(format!("keep={k}: {why}")))?;
    }
    let rescue = yes("rescue", get("rescue").as_deref().unwrap_or(""))?;
    if rescue && kind != JobKind::Backup {
        return Err(Error::Usage(format!("rescue=yes is for job=backup, not job={}: remove it", kind.name())));
    }
    let copy_drive = get("copy_drive");
    if let Some(c) = &copy_drive {
        if kind != JobKind::Backup {
            return Err(Error::Usage(format!("copy_drive={c} is for job=backup, not job={}: remove it", kind.name())));
        }
        if get("drive").is_some_and(|d| d.eq_ignore_ascii_case(c)) {
            return Err(Error::Usage(format!(
                "copy_drive={c} names the image drive itself: the copy must go to a second drive"
            )));
        }
    }
    let wait_secs = match get("wait") {
        None => DEFAULT_WAIT,
        Some(w) => w.parse().map_err(|_| Error::Usage(format!("wait={w}: a number of seconds")))?,
    };
    Ok(Some(Job {
        kind,
        source,
        target,
        image,
        drive: get("drive"),
        after: After::parse(get("after").as_deref().unwrap_or(""))?,
        grow_last: yes("grow_last", get("grow_last").as_deref().unwrap_or(""))?,
        grow_all: yes("grow_all", get("grow_all").as_deref().unwrap_or(""))?,
        level,
        repo: yes("repo", get("repo").as_deref().unwrap_or(""))?,
        keep,
        copy_drive,
        rescue,
        wait_secs,
        encrypt: yes("encrypt", get("encrypt").as_deref().unwrap_or(""))?,
        passphrase: s.get("passphrase").filter(|p| !p.is_empty()).map(|p| Secret(p.clone())),
        port,
        net: net(config, cmdline)?,
    }))
}

/// The merged settings as klon.conf text (PID 1 hands them to the job).
pub fn to_config(settings: &BTreeMap<String, String>) -> String {
    settings.iter().map(|(k, v)| format!("{k} = \"{v}\"\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_words_and_quotes() {
        let w = split_cmdline("BOOT_IMAGE=/vmlinuz quiet  klon.drive=\"LABEL=My Drive\" klon.job=backup\n");
        assert_eq!(w, vec!["BOOT_IMAGE=/vmlinuz", "quiet", "klon.drive=LABEL=My Drive", "klon.job=backup"]);
        let m = from_cmdline("console=ttyS0 klon.job=restore klon.grow-last klon.target=serial=T1");
        assert_eq!(m.get("job").unwrap(), "restore");
        assert_eq!(m.get("grow_last").unwrap(), "yes");
        assert_eq!(m.get("target").unwrap(), "serial=T1");
        assert!(!m.contains_key("console"));
    }

    #[test]
    fn a_passphrase_comes_from_klon_conf_only_and_is_never_printed() {
        let conf =
            from_config("job = backup\nsource = /dev/sda\nimage = r\nencrypt = yes\npassphrase = \"two words\"\n")
                .unwrap();
        let job = parse(&conf, &BTreeMap::new()).unwrap().unwrap();
        assert!(job.encrypt);
        assert_eq!(job.passphrase, Some(Secret("two words".into())));
        assert!(!format!("{job:?}").contains("two words"));
        let e = parse(&conf, &from_cmdline("klon.passphrase=x")).unwrap_err().to_string();
        assert!(e.contains("kernel command line"), "{e}");
    }

    #[test]
    fn config_file() {
        let m = from_config("# comment\n\u{feff}job = backup\r\nsource=/dev/sda\nklon.image = \"pc 1\"\n\n").unwrap();
        assert_eq!(m.get("job").unwrap(), "backup");
        assert_eq!(m.get("image").unwrap(), "pc 1");
        assert!(from_config("nonsense\n").is_err());
    }

    #[test]
    fn merged_and_checked() {
        let file = from_config("job=backup\nsource=/dev/sda\nimage=pc\ndrive=LABEL=IMAGES\nafter=poweroff\n").unwrap();
        let job = parse(&file, &BTreeMap::new()).unwrap().unwrap();
        assert_eq!(job.kind, JobKind::Backup);
        assert_eq!(job.source.as_deref(), Some("/dev/sda"));
        assert_eq!(job.after, After::Poweroff);
        assert_eq!(job.level, 3);
        assert!(!job.rescue);
        let rescue = parse(&file, &from_cmdline("klon.rescue")).unwrap().unwrap();
        assert!(rescue.rescue, "a bare klon.rescue means yes");
        // The command line wins, and job=none switches a file's job off.
        assert_eq!(parse(&file, &from_cmdline("klon.job=none")).unwrap(), None);
        let r =
            parse(&file, &from_cmdline("klon.job=restore klon.target=/dev/nvme0n1 klon.grow_last=1 klon.after=reboot"))
                .unwrap()
                .unwrap();
        assert_eq!(r.kind, JobKind::Restore);
        assert_eq!(r.target.as_deref(), Some("/dev/nvme0n1"));
        assert!(r.grow_last);
        assert_eq!(r.after, After::Reboot);
        assert_eq!(parse(&BTreeMap::new(), &BTreeMap::new()).unwrap(), None);
    }

    #[test]
    fn refusals() {
        let c = |s: &str| parse(&BTreeMap::new(), &from_cmdline(s));
        assert!(c("klon.job=backup klon.image=x").is_err(), "backup without source");
        assert!(c("klon.job=restore klon.image=x").is_err(), "restore without target");
        assert!(c("klon.job=verify").is_err(), "no image");
        assert!(c("klon.job=verify klon.image=../x").is_err());
        assert!(c("klon.job=verify klon.image=/abs").is_err());
        assert!(c("klon.job=format klon.image=x").is_err());
        assert!(c("klon.job=verify klon.image=x klon.after=dance").is_err());
        assert!(c("klon.job=verify klon.image=x klon.colour=red").is_err());
        assert!(c("klon.job=verify klon.image=x").unwrap().is_some());
        let e = c("klon.job=backup klon.source=/dev/sda klon.image=x klon.keep=daily").unwrap_err().to_string();
        assert!(e.contains("keep=daily") && e.contains("RULE=N"), "{e}");
        let e = c("klon.job=backup klon.source=/dev/sda klon.image=x klon.keep=often=3").unwrap_err().to_string();
        assert!(e.contains("not a rule"), "{e}");
        assert!(c("klon.job=verify klon.image=x klon.rescue=yes").is_err(), "rescue is for backups");
        assert!(c("klon.job=backup klon.source=/dev/sda klon.image=x klon.rescue=maybe").is_err());
    }

    #[test]
    fn a_receive_job_brings_up_the_network() {
        let c = |s: &str| parse(&BTreeMap::new(), &from_cmdline(s));
        let j = c("klon.job=receive klon.target=serial=T1 klon.after=poweroff").unwrap().unwrap();
        assert_eq!(j.kind, JobKind::Receive);
        assert_eq!((j.target.as_deref(), j.image.as_str(), j.port), (Some("serial=T1"), "", 9000));
        assert_eq!(j.net, Some(Net { interface: None }));
        let j = c("klon.job=receive klon.target=/dev/vda klon.port=9100 klon.interface=52:54:00:00:00:01")
            .unwrap()
            .unwrap();
        assert_eq!(j.port, 9100);
        assert_eq!(j.net, Some(Net { interface: Some("52:54:00:00:00:01".into()) }));
        assert!(c("klon.job=receive").unwrap_err().to_string().contains("needs target"));
        assert!(c("klon.job=receive klon.target=/dev/vda klon.image=x").unwrap_err().to_string().contains("remove it"));
        assert!(c("klon.job=receive klon.target=/dev/vda klon.drive=LABEL=X").is_err());
        assert!(c("klon.job=receive klon.target=/dev/vda klon.port=high").is_err());
        assert!(c("klon.job=receive klon.target=/dev/vda klon.net=none").is_err());
        // Without a job: the network only when asked for.
        let n = |s: &str| net(&BTreeMap::new(), &from_cmdline(s));
        assert_eq!(n("quiet").unwrap(), None);
        assert_eq!(n("klon.net=dhcp klon.interface=eth1").unwrap(), Some(Net { interface: Some("eth1".into()) }));
        assert!(n("klon.net=static").is_err());
        // A restore from the image drive does not need it.
        let j = c("klon.job=restore klon.target=/dev/sda klon.image=pc").unwrap().unwrap();
        assert_eq!(j.net, None);
    }

    #[test]
    fn a_backup_into_a_repository_with_a_policy() {
        let c = |s: &str| parse(&BTreeMap::new(), &from_cmdline(s));
        let j = c("klon.job=backup klon.source=/dev/sda klon.image=laptop klon.repo=yes klon.keep=daily=7,weekly=4")
            .unwrap()
            .unwrap();
        assert!(j.repo);
        assert_eq!(j.keep.as_deref(), Some("daily=7,weekly=4"));
        let k = crate::repo::Keep::parse(j.keep.as_deref().unwrap()).unwrap();
        assert_eq!((k.daily, k.weekly, k.last), (7, 4, 0));
    }

    #[test]
    fn a_copy_to_a_second_drive_is_for_backups_to_another_drive() {
        let c = |s: &str| parse(&BTreeMap::new(), &from_cmdline(s));
        let j = c("klon.job=backup klon.source=/dev/sda klon.image=pc klon.repo=yes klon.drive=LABEL=A \
                   klon.copy-drive=LABEL=B")
        .unwrap()
        .unwrap();
        assert_eq!(j.copy_drive.as_deref(), Some("LABEL=B"));
        let e = c("klon.job=restore klon.target=/dev/sda klon.image=pc klon.copy_drive=LABEL=B").unwrap_err();
        assert!(e.to_string().contains("is for job=backup"), "{e}");
        let e = c("klon.job=backup klon.source=/dev/sda klon.image=pc klon.drive=LABEL=A klon.copy_drive=label=a")
            .unwrap_err();
        assert!(e.to_string().contains("second drive"), "{e}");
    }

    #[test]
    fn round_trip_through_config() {
        let m = from_cmdline("klon.job=verify klon.image=\"a b\" klon.drive=UUID=1234-ABCD");
        assert_eq!(from_config(&to_config(&m)).unwrap(), m);
    }
}
