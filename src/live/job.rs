//! Unattended jobs: what the kernel command line (`klon.KEY=VALUE`) and the
//! stick's `klon.conf` (`KEY = VALUE` lines) ask for.
//!
//! A job is one of klon's commands with its settings ([`crate::job`]):
//! `job` names it, and every option of that command is a setting by its
//! long name with the command line's default (`level = 9`, `grow_last =
//! yes` for `--grow-last`, `no_verify = yes`, `keep = daily=7,weekly=4`,
//! `repo = yes`, `encrypt = yes`, `rescue = yes`, `port = 9100`, …; `klon
//! help backup` lists them). The live system adds the keys below (the same
//! in both places; the command line wins over the file):
//!
//! | key | value |
//! | --- | --- |
//! | `job` | `backup`, `restore`, `verify`, `clone` (one disk onto another, no image drive), `receive` (a deployment `klon deploy` sends by multicast), or `none` (ignore a job in klon.conf) |
//! | `source` | backup, clone: the disk, `/dev/sda` or `serial=SERIAL` |
//! | `target` | restore, clone, receive: the disk, `/dev/nvme0n1` or `serial=SERIAL` |
//! | `image` | backup, restore, verify: the image's name in the folder `klon-images/` of the image drive |
//! | `drive` | the image drive: `LABEL=…`, `UUID=…` or `/dev/sdc1`; or a network share, `smb://[USER@]HOST[:PORT]/SHARE[/FOLDER]` (images in FOLDER, or in `klon-images/`) or `nfs://HOST[:PORT]/PATH` (NFS 4.1; images in PATH) or `sftp://[USER@]HOST[:PORT]/PATH` (sshfs; images in PATH; keys and known_hosts from the stick's `ssh/` folder); brings up the network by DHCP |
//! | `drive_password` | the password of an SMB share's user: only in klon.conf, never on the kernel command line |
//! | `s3_endpoint`, `s3_region`, `s3_access_key`, `s3_secret_key` | with `drive = s3://BUCKET/PREFIX` (repositories in an S3-compatible store; `image` is the repository's name under PREFIX; brings up the network by DHCP): the store's URL, region, and key; the secret key only in klon.conf |
//! | `after` | `poweroff`, `reboot`, `shell` or `wizard` (default) |
//! | `copy_drive` | backup into a repository: then copy the new snapshot into the repository of the same name on this second drive (`LABEL=…`, `UUID=…` or `/dev/sdd1`; made with the same keys when missing), read back |
//! | `passphrase` | the passphrase of an encrypted repository, of a Clonezilla image's LUKS volumes or of an encrypted Clonezilla image (gocryptfs): only in klon.conf, never on the kernel command line |
//! | `net` | `dhcp`: bring up the wired network by DHCP at boot (implied by `job=receive`); `none` (default) |
//! | `interface` | the network interface for `net` and `receive`: a name (`eth0`) or a MAC address (default: the first wired one that gets a lease) |
//! | `wait` | seconds to wait for the disks, the drive and the network interface to appear (default 30) |
//! | `shell` | without a job: start with a rescue shell on every console |
//! | `live` | the live stick's FAT partition, `LABEL=…` or `UUID=…` (set by the build); `none` when booted from the network (klon serve --pxe) |
//!
//! Restore, clone and receive jobs run with `--yes`: the job is the
//! consent.

use std::collections::BTreeMap;
use std::path::Path;

use crate::cli::Cli;
use crate::error::{Error, Result};
use crate::inventory::share;
pub use crate::job::Secret;
use crate::job::yes;

/// What an unattended job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// `klon backup SOURCE IMAGE`.
    Backup,
    /// `klon restore --yes IMAGE TARGET`.
    Restore,
    /// `klon verify IMAGE`.
    Verify,
    /// `klon clone --yes SOURCE TARGET`.
    Clone,
    /// `klon receive --multicast --yes TARGET`.
    Receive,
}

impl JobKind {
    fn parse(job: Option<&str>) -> Result<Option<JobKind>> {
        Ok(Some(match job.map(|j| j.trim().to_ascii_lowercase()).as_deref() {
            None | Some("" | "none" | "wizard") => return Ok(None),
            Some("backup") => JobKind::Backup,
            Some("restore") => JobKind::Restore,
            Some("verify") => JobKind::Verify,
            Some("clone") => JobKind::Clone,
            Some("receive") => JobKind::Receive,
            Some(other) => {
                return Err(Error::Usage(format!("job={other}: use backup, restore, verify, clone, receive or none")));
            }
        }))
    }

    /// The command's name.
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Backup => "backup",
            JobKind::Restore => "restore",
            JobKind::Verify => "verify",
            JobKind::Clone => "clone",
            JobKind::Receive => "receive",
        }
    }

    /// Whether the job reads or writes an image on the image drive.
    pub fn uses_image_drive(self) -> bool {
        matches!(self, JobKind::Backup | JobKind::Restore | JobKind::Verify)
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
    /// What it does.
    pub kind: JobKind,
    /// The disk to back up or copy (backup, clone).
    pub source: Option<String>,
    /// The disk to overwrite (restore, clone, receive).
    pub target: Option<String>,
    /// The image's name inside `klon-images/` on the image drive (empty
    /// for clone and receive).
    pub image: String,
    /// How to find the image drive; `None`: the only candidate.
    pub drive: Option<String>,
    /// What to do afterwards.
    pub after: After,
    /// Backup into a repository: the second drive the new snapshot is
    /// copied to (a drive spec as for `drive`).
    pub copy_drive: Option<String>,
    /// Seconds to wait for devices to appear.
    pub wait_secs: u64,
    /// The passphrase of an encrypted repository, of a Clonezilla image's
    /// LUKS volumes, or of an encrypted Clonezilla image (klon.conf only).
    pub passphrase: Option<Secret>,
    /// The password of a network share's user (from klon.conf only).
    pub drive_password: Option<Secret>,
    /// With `drive = s3://…`: the store's settings, by the names of the
    /// AWS files (endpoint_url, region, aws_access_key_id,
    /// aws_secret_access_key).
    pub s3: BTreeMap<String, Secret>,
    /// The network, when the job or the settings ask for it.
    pub net: Option<Net>,
    /// The command's own options (`level`, `grow_last`, `keep`, …), as
    /// given; checked against klon's command line.
    pub options: BTreeMap<String, String>,
}

impl Job {
    /// The command the job runs, with the disks and the image where the
    /// live system found them (`None`: as the settings name them) and, for
    /// receive, the network interface.
    pub fn command(
        &self,
        source: Option<&Path>,
        target: Option<&Path>,
        image: Option<&Path>,
        interface: Option<&str>,
    ) -> Result<Cli> {
        let mut s = self.options.clone();
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                s.insert(k.to_string(), v);
            }
        };
        put("source", source.map(|p| p.display().to_string()).or_else(|| self.source.clone()));
        put("target", target.map(|p| p.display().to_string()).or_else(|| self.target.clone()));
        if self.kind.uses_image_drive() {
            put("image", Some(image.map_or_else(|| self.image.clone(), |p| p.display().to_string())));
        }
        if matches!(self.kind, JobKind::Restore | JobKind::Clone | JobKind::Receive) {
            put("yes", Some("yes".into()));
        }
        if self.kind == JobKind::Receive {
            put("multicast", Some("yes".into()));
            put("interface", interface.map(String::from));
        }
        crate::job::parse_line(&crate::job::command_line(self.kind.name(), &s, "")?)
    }

    /// Whether the flag option `key` is set (`rescue = yes`).
    pub fn flag(&self, key: &str) -> bool {
        self.options.get(key).is_some_and(|v| yes(key, v).unwrap_or(false))
    }
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
    let share = ["drive", "copy_drive"].into_iter().find(|k| s.get(*k).is_some_and(|v| share::is_share(v) || is_s3(v)));
    let dhcp = match get("net").as_deref() {
        Some("dhcp") => true,
        Some("none" | "no" | "off") if receive => {
            return Err(Error::Usage("job=receive needs the network: remove net=none".into()));
        }
        Some("none" | "no" | "off") if share.is_some() => {
            return Err(Error::Usage(format!(
                "{}= names a network share, which needs the network: remove net=none",
                share.unwrap_or_default()
            )));
        }
        Some("none" | "no" | "off") | None => receive || share.is_some(),
        Some(other) => return Err(Error::Usage(format!("net={other}: use dhcp or none"))),
    };
    Ok(dhcp.then(|| Net { interface: s.get("interface").map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) }))
}

/// Whether `spec` names an S3 store (`s3://BUCKET/PREFIX`), whose
/// repositories the job reads and writes instead of a drive's.
pub fn is_s3(spec: &str) -> bool {
    spec.trim().get(..5).is_some_and(|p| p.eq_ignore_ascii_case("s3://"))
}

/// Seconds to wait for disks, drives and the network when `wait` is not set.
pub const DEFAULT_WAIT: u64 = 30;

/// The keys of what the job works on, which the live system reads itself
/// (with [`SHARED_KEYS`]); every other key is an option of the job's
/// command.
const JOB_KEYS: &[&str] = &["job", "source", "target", "image", "drive", "copy_drive"];

/// The live system's keys that apply to any job.
const SHARED_KEYS: &[&str] = &[
    "after",
    "passphrase",
    "drive_password",
    "s3_endpoint",
    "s3_region",
    "s3_access_key",
    "s3_secret_key",
    "wait",
    "net",
    "interface",
    "live",
    "shell",
];

/// The config file's settings and the command line's, merged: the command
/// line wins, and a job on it that is not the file's takes from the file
/// only what it can use (the drive, what to do after, its own options), so
/// the file's backup source does not spoil a verify typed at boot.
pub fn merge(
    config: &BTreeMap<String, String>,
    cmdline: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>> {
    for key in ["passphrase", "drive_password", "s3_secret_key"] {
        if cmdline.contains_key(key) {
            return Err(Error::Usage(format!(
                "klon.{key} on the kernel command line would be readable by anyone who sees it: put {key} = \"…\" \
                 in klon.conf on the stick"
            )));
        }
    }
    let mut s = config.clone();
    let (theirs, ours) = (config.get("job"), cmdline.get("job"));
    if let (Some(f), Some(c)) = (theirs, ours)
        && !f.trim().eq_ignore_ascii_case(c.trim())
        && let Some(kind) = JobKind::parse(Some(c))?
    {
        let takes = crate::job::settings_of(kind.name())?;
        s.retain(|k, _| {
            SHARED_KEYS.contains(&k.as_str())
                || takes.contains(k)
                || (k == "drive" && kind.uses_image_drive())
                || (k == "copy_drive" && kind == JobKind::Backup)
        });
    }
    s.extend(cmdline.iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok(s)
}

/// Merges the config file's settings with the command line's ([`merge`])
/// and checks the job. `Ok(None)`: no job asked for.
pub fn parse(config: &BTreeMap<String, String>, cmdline: &BTreeMap<String, String>) -> Result<Option<Job>> {
    let s = merge(config, cmdline)?;
    let Some(kind) = JobKind::parse(s.get("job").map(String::as_str))? else { return Ok(None) };
    let get = |k: &str| s.get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    let image = if kind.uses_image_drive() {
        get("image").ok_or_else(|| Error::Usage(format!("job={} needs image=…", kind.name())))?
    } else {
        let does = match kind {
            JobKind::Clone => "job=clone copies source onto target directly",
            _ => "job=receive takes the image klon deploy sends",
        };
        if let Some(i) = get("image") {
            return Err(Error::Usage(format!("image={i} is for backup, restore and verify: {does}; remove it")));
        }
        if let Some(d) = get("drive") {
            return Err(Error::Usage(format!("drive={d}: {does} and needs no image drive; remove it")));
        }
        String::new()
    };
    if kind.uses_image_drive() && (image.starts_with('/') || image.split('/').any(|c| c == ".." || c.is_empty())) {
        return Err(Error::Usage(format!(
            "image={image}: give the image's name (or a relative path) inside klon-images/ on the image drive"
        )));
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
    if let Some(c) = copy_drive.as_deref().filter(|c| is_s3(c)) {
        return Err(Error::Usage(format!(
            "copy_drive={c}: a copy into an S3 store is not a job of the live system: copy from a machine with \
             klon copy REPO {c}/NAME"
        )));
    }
    if let Some(d) = get("drive").filter(|d| is_s3(d)) {
        crate::repo::s3::parse_url(&d).map_err(|e| Error::Usage(format!("drive={d}: {e}")))?;
        if get("s3_access_key").is_none() || s.get("s3_secret_key").is_none_or(|v| v.is_empty()) {
            return Err(Error::Usage(format!(
                "drive={d} needs the store's key: s3_access_key and s3_secret_key in klon.conf (and s3_endpoint for \
                 a store that is not AWS)"
            )));
        }
    }
    let wait_secs = match get("wait") {
        None => DEFAULT_WAIT,
        Some(w) => w.parse().map_err(|_| Error::Usage(format!("wait={w}: a number of seconds")))?,
    };
    let live_key = |k: &str| JOB_KEYS.contains(&k) || SHARED_KEYS.contains(&k);
    let options = s.iter().filter(|(k, _)| !live_key(k)).map(|(k, v)| (k.clone(), v.clone()));
    let job = Job {
        kind,
        source: get("source"),
        target: get("target"),
        image,
        drive: get("drive"),
        after: After::parse(get("after").as_deref().unwrap_or(""))?,
        copy_drive,
        wait_secs,
        passphrase: s.get("passphrase").filter(|p| !p.is_empty()).map(|p| Secret(p.clone())),
        drive_password: s.get("drive_password").filter(|p| !p.is_empty()).map(|p| Secret(p.clone())),
        s3: [
            ("s3_endpoint", "endpoint_url"),
            ("s3_region", "region"),
            ("s3_access_key", "aws_access_key_id"),
            ("s3_secret_key", "aws_secret_access_key"),
        ]
        .into_iter()
        .filter_map(|(k, name)| get(k).map(|v| (name.to_string(), Secret(v))))
        .collect(),
        net: net(config, cmdline)?,
        options: options.collect(),
    };
    // Every setting checked now, before waiting for any device.
    job.command(None, None, None, None)?;
    Ok(Some(job))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Command;
    use crate::job::{from_cmdline, from_config};

    #[test]
    fn a_passphrase_comes_from_klon_conf_only_and_is_never_printed() {
        let conf = from_config(
            "job = backup\nsource = /dev/sda\nimage = r\nencrypt = yes\npassphrase = \"two words\"\n",
            "klon.conf",
        )
        .unwrap();
        let job = parse(&conf, &BTreeMap::new()).unwrap().unwrap();
        assert!(job.flag("encrypt"));
        assert_eq!(job.passphrase, Some(Secret("two words".into())));
        assert!(!format!("{job:?}").contains("two words"));
        assert!(!job.options.contains_key("passphrase"), "not an option of the command");
        let e = parse(&conf, &from_cmdline("klon.passphrase=x")).unwrap_err().to_string();
        assert!(e.contains("kernel command line"), "{e}");
    }

    #[test]
    fn a_network_share_brings_up_the_network_and_its_password_stays_in_klon_conf() {
        let conf = from_config(
            "job = restore\ntarget = /dev/sda\nimage = pc\ndrive = smb://backup@10.0.0.2/images\n\
             drive_password = \"p,w d\"\n",
            "klon.conf",
        )
        .unwrap();
        let job = parse(&conf, &BTreeMap::new()).unwrap().unwrap();
        assert_eq!(job.drive_password, Some(Secret("p,w d".into())));
        assert_eq!(job.net, Some(Net { interface: None }), "the share implies net=dhcp");
        assert!(!format!("{job:?}").contains("p,w d"));
        assert!(!job.options.contains_key("drive_password"), "not an option of the command");
        let e = parse(&conf, &from_cmdline("klon.drive_password=x")).unwrap_err().to_string();
        assert!(e.contains("kernel command line") && e.contains("drive_password"), "{e}");
        let e = parse(&conf, &from_cmdline("klon.net=none")).unwrap_err().to_string();
        assert!(e.contains("network share") && e.contains("net=none"), "{e}");
    }

    #[test]
    fn an_s3_store_needs_its_key_from_klon_conf_and_brings_up_the_network() {
        let conf = from_config(
            "job = backup\nsource = /dev/sda\nimage = pc\ndrive = s3://klon/live\ns3_endpoint = http://10.0.0.2:3900\n\
             s3_region = garage\ns3_access_key = GK1\ns3_secret_key = \"s e,c\"\n",
            "klon.conf",
        )
        .unwrap();
        let job = parse(&conf, &BTreeMap::new()).unwrap().unwrap();
        assert_eq!(job.net, Some(Net { interface: None }));
        assert_eq!(job.s3.get("aws_secret_access_key"), Some(&Secret("s e,c".into())));
        assert_eq!(job.s3.get("endpoint_url"), Some(&Secret("http://10.0.0.2:3900".into())));
        assert!(!format!("{job:?}").contains("s e,c"));
        assert!(!job.options.keys().any(|k| k.starts_with("s3_")), "not options of the command");
        let e = parse(&conf, &from_cmdline("klon.s3_secret_key=x")).unwrap_err().to_string();
        assert!(e.contains("kernel command line"), "{e}");
        let no_key = from_config("job = verify\nimage = pc\ndrive = s3://klon/live\n", "klon.conf").unwrap();
        let e = parse(&no_key, &BTreeMap::new()).unwrap_err().to_string();
        assert!(e.contains("s3_access_key and s3_secret_key"), "{e}");
        let copy = from_config(
            "job = backup\nsource = /dev/sda\nimage = pc\nrepo = yes\ncopy_drive = s3://klon/off\n",
            "klon.conf",
        )
        .unwrap();
        let e = parse(&copy, &BTreeMap::new()).unwrap_err().to_string();
        assert!(e.contains("klon copy"), "{e}");
    }

    #[test]
    fn merged_and_checked() {
        let file =
            from_config("job=backup\nsource=/dev/sda\nimage=pc\ndrive=LABEL=IMAGES\nafter=poweroff\n", "klon.conf")
                .unwrap();
        let job = parse(&file, &BTreeMap::new()).unwrap().unwrap();
        assert_eq!(job.kind, JobKind::Backup);
        assert_eq!(job.source.as_deref(), Some("/dev/sda"));
        assert_eq!(job.after, After::Poweroff);
        assert!(!job.flag("rescue"));
        let Command::Backup(b) =
            job.command(None, None, Some(Path::new("/run/d/klon-images/pc")), None).unwrap().command
        else {
            panic!()
        };
        assert_eq!(b.level, crate::engine::backup::DEFAULT_LEVEL, "the command line's default");
        assert_eq!((b.source.to_str(), b.image.to_str()), (Some("/dev/sda"), Some("/run/d/klon-images/pc")));
        let rescue = parse(&file, &from_cmdline("klon.rescue klon.level=12 klon.no-verify")).unwrap().unwrap();
        assert!(rescue.flag("rescue"), "a bare klon.rescue means yes");
        let Command::Backup(b) = rescue.command(Some(Path::new("/dev/vdb")), None, None, None).unwrap().command else {
            panic!()
        };
        assert_eq!((b.source.to_str(), b.image.to_str()), (Some("/dev/vdb"), Some("pc")));
        assert!(b.rescue && b.no_verify && b.level == 12, "any option of the command, by its name");
        // The command line wins, and job=none switches a file's job off.
        assert_eq!(parse(&file, &from_cmdline("klon.job=none")).unwrap(), None);
        // A job of another kind on the command line takes from the file
        // what it can use: the image and drive, not the backup's source.
        let file = from_config(
            "job=backup\nsource=/dev/sda\nimage=pc\ndrive=LABEL=IMAGES\nlevel=9\nafter=poweroff\n",
            "klon.conf",
        )
        .unwrap();
        let r =
            parse(&file, &from_cmdline("klon.job=restore klon.target=/dev/nvme0n1 klon.grow_last=1 klon.after=reboot"))
                .unwrap()
                .unwrap();
        assert_eq!(r.kind, JobKind::Restore);
        assert_eq!(r.target.as_deref(), Some("/dev/nvme0n1"));
        assert_eq!(r.after, After::Reboot);
        assert_eq!((r.image.as_str(), r.drive.as_deref(), r.source.as_deref()), ("pc", Some("LABEL=IMAGES"), None));
        // Of the same kind, the file's settings all count: a wrong one is said.
        let e = parse(&file, &from_cmdline("klon.job=backup klon.grow_last")).unwrap_err().to_string();
        assert!(e.contains("grow_last is not a setting of job=backup"), "{e}");
        let Command::Restore(a) = r.command(None, Some(Path::new("/dev/vda")), None, None).unwrap().command else {
            panic!()
        };
        assert!(a.write.grow_last && a.write.yes, "a restore job is the consent: --yes");
        assert_eq!(a.target.to_str(), Some("/dev/vda"));
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
        let e = c("klon.job=verify klon.image=x klon.colour=red").unwrap_err().to_string();
        assert!(e.contains("colour is not a setting of job=verify (its settings: image, threads)"), "{e}");
        assert!(c("klon.job=verify klon.image=x").unwrap().is_some());
        let e = c("klon.job=backup klon.source=/dev/sda klon.image=x klon.keep=daily").unwrap_err().to_string();
        assert!(e.contains("keep=daily") && e.contains("RULE=N"), "{e}");
        let e = c("klon.job=backup klon.source=/dev/sda klon.image=x klon.keep=often=3").unwrap_err().to_string();
        assert!(e.contains("not a rule"), "{e}");
        let e = c("klon.job=backup klon.source=/dev/sda klon.image=x klon.level=max").unwrap_err().to_string();
        assert!(e.starts_with("level=max: "), "checked at boot, before any device is waited for: {e}");
        assert!(c("klon.job=verify klon.image=x klon.rescue=yes").is_err(), "rescue is for backups");
        assert!(c("klon.job=backup klon.source=/dev/sda klon.image=x klon.rescue=maybe").is_err());
    }

    #[test]
    fn a_clone_job_needs_two_disks_and_no_image_drive() {
        let c = |s: &str| parse(&BTreeMap::new(), &from_cmdline(s));
        let j = c("klon.job=clone klon.source=serial=OLD klon.target=serial=NEW klon.grow-last").unwrap().unwrap();
        assert!(!j.kind.uses_image_drive());
        let Command::Clone(a) =
            j.command(Some(Path::new("/dev/sda")), Some(Path::new("/dev/sdb")), None, None).unwrap().command
        else {
            panic!()
        };
        assert_eq!((a.source.to_str(), a.target.to_str()), (Some("/dev/sda"), Some("/dev/sdb")));
        assert!(a.write.yes && a.write.grow_last);
        assert!(c("klon.job=clone klon.source=/dev/sda").unwrap_err().to_string().contains("needs target"));
        let e = c("klon.job=clone klon.source=/dev/sda klon.target=/dev/sdb klon.image=x").unwrap_err();
        assert!(e.to_string().contains("remove it"), "{e}");
        assert!(c("klon.job=clone klon.source=/dev/sda klon.target=/dev/sdb klon.drive=LABEL=X").is_err());
    }

    #[test]
    fn a_receive_job_brings_up_the_network() {
        let c = |s: &str| parse(&BTreeMap::new(), &from_cmdline(s));
        let j = c("klon.job=receive klon.target=serial=T1 klon.after=poweroff").unwrap().unwrap();
        assert_eq!(j.kind, JobKind::Receive);
        assert_eq!((j.target.as_deref(), j.image.as_str()), (Some("serial=T1"), ""));
        assert_eq!(j.net, Some(Net { interface: None }));
        let Command::Receive(r) = j.command(None, Some(Path::new("/dev/vda")), None, Some("eth0")).unwrap().command
        else {
            panic!()
        };
        assert_eq!((r.port, r.interface.as_deref(), r.multicast, r.write.yes), (9000, Some("eth0"), true, true));
        let j = c("klon.job=receive klon.target=/dev/vda klon.port=9100 klon.interface=52:54:00:00:00:01")
            .unwrap()
            .unwrap();
        let Command::Receive(r) = j.command(None, None, None, Some("eth1")).unwrap().command else { panic!() };
        assert_eq!((r.port, r.interface.as_deref()), (9100, Some("eth1")));
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
        let Command::Backup(b) = j.command(None, None, None, None).unwrap().command else { panic!() };
        assert!(b.repo);
        assert_eq!(b.keep.as_deref(), Some("daily=7,weekly=4"));
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
}
