//! Where the images are: a directory typed in, or a drive with a supported
//! filesystem mounted for the time it is used (waiting for a USB drive to
//! be plugged in if needed); and the images found there. Drives that hold
//! images (klon's or Clonezilla's) come first, with how many: each offered
//! drive is mounted read-only for a moment to look (nothing written, no
//! journal replayed).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::device::uevent::{self, UeventSocket, Woken};
use crate::error::Result;
use crate::inventory::image_drive::{self, Candidate, IMAGES_DIR};
use crate::inventory::share::{self, Protocol};
use crate::ui::human_bytes;
use crate::ui::wizard::BringUpNetwork;

use super::disks;
use super::screen::{Item, Nav, Screen};
use crate::device::mounts::Mounted;

/// Where it mounts a second drive, for a copy of a repository.
pub use crate::inventory::image_drive::COPY_MNT as COPY_MOUNT;
/// Where the wizard mounts the image drive (where the live system's jobs
/// mount theirs).
pub use crate::inventory::image_drive::DRIVE_MNT as LIVE_MOUNT;

/// The chosen place for images.
#[derive(Debug)]
pub struct ImageDir {
    /// The directory: a drive's `klon-images/` folder when it has one (as
    /// the live system's jobs keep them), else its top.
    pub path: PathBuf,
    /// Set when the wizard mounted a drive for it.
    pub mounted: Option<Mounted>,
}

/// A filesystem that could hold images, with how many it holds.
#[derive(Debug, Clone)]
struct DrivePart {
    drive: Candidate,
    /// Images found when it was looked into; None when it could not be.
    images: Option<usize>,
}

/// The images directory on a drive mounted at `root`.
fn images_dir(root: &Path) -> PathBuf {
    let folder = root.join(IMAGES_DIR);
    if folder.is_dir() { folder } else { root.to_path_buf() }
}

/// How many images (klon's images and repositories, Clonezilla's images)
/// the drive holds, mounted read-only at `at` for the time it takes to
/// look; None when it cannot be mounted.
fn count_images(c: &Candidate, at: &Path) -> Option<usize> {
    let m = Mounted::peek(&c.device, &c.fs.fstype, at).ok()?;
    let n = std::fs::read_dir(images_dir(at))
        .map(|rd| rd.flatten().filter(|e| crate::engine::source::looks_like_image(&e.path())).count())
        .unwrap_or(0);
    let _ = m.unmount();
    Some(n)
}

/// The drives offered: every filesystem that can hold images on a disk
/// neither excluded nor `not_on`, not mounted or in use; with `look`, each
/// looked into and those holding images first.
fn drive_parts(exclude: &[PathBuf], not_on: Option<u64>, look: bool) -> Result<Vec<DrivePart>> {
    let disks = crate::inventory::list_disks()?;
    let skip: Vec<u64> =
        disks.iter().filter(|d| Some(d.devno) == not_on || disks::is_excluded(d, exclude)).map(|d| d.devno).collect();
    let mut out: Vec<DrivePart> = image_drive::candidates(&disks, &skip)
        .into_iter()
        .filter(|c| !c.in_use)
        .map(|drive| DrivePart {
            images: if look { count_images(&drive, Path::new(image_drive::PEEK_MNT)) } else { Some(0) },
            drive,
        })
        .collect();
    // Stable: disk order within each group.
    out.sort_by_key(|d| d.images.unwrap_or(0) == 0);
    Ok(out)
}

impl DrivePart {
    fn describe(&self) -> String {
        let c = &self.drive;
        let holds = match self.images {
            Some(0) => String::new(),
            Some(1) => " — 1 image".to_string(),
            Some(n) => format!(" — {n} images"),
            None => " — cannot look inside".to_string(),
        };
        format!(
            "Drive {}: {} {}{} on {}{holds}",
            c.device.display(),
            human_bytes(c.size),
            c.fs.fstype,
            c.fs.label.as_deref().map(|l| format!(" \"{l}\"")).unwrap_or_default(),
            c.on_disk
        )
    }
}

/// Asks where the images are (or go): a typed directory, or a drive. With
/// `not_on` the disk being backed up is not offered.
#[allow(clippy::too_many_arguments)]
pub fn choose_dir(
    scr: &Screen,
    title: &str,
    live: bool,
    exclude: &[PathBuf],
    not_on: Option<u64>,
    last: &mut String,
    network: Option<BringUpNetwork>,
) -> Result<Nav<ImageDir>> {
    choose_dir_at(scr, title, live, exclude, not_on, last, Path::new(LIVE_MOUNT), network)
}

/// [`choose_dir`], a chosen drive mounted at `mount_at`; `network` brings
/// up the network before a share is mounted (`None`: the machine's own).
#[allow(clippy::too_many_arguments)]
pub fn choose_dir_at(
    scr: &Screen,
    title: &str,
    live: bool,
    exclude: &[PathBuf],
    not_on: Option<u64>,
    last: &mut String,
    mount_at: &Path,
    network: Option<BringUpNetwork>,
) -> Result<Nav<ImageDir>> {
    let mut preselect: Option<PathBuf> = None;
    loop {
        let drives = drive_parts(exclude, not_on, true)?;
        let mut items = Vec::new();
        let typed_default = if last.is_empty() {
            std::env::current_dir().map(|p| p.display().to_string()).unwrap_or_else(|_| "/".into())
        } else {
            last.clone()
        };
        if !live {
            items.push(Item::new(format!("Type a directory (now: {typed_default})")));
        }
        for d in &drives {
            items.push(Item::new(d.describe()));
        }
        items.push(Item::new("Insert the USB drive now (klon waits for it)"));
        items.push(Item::new("A network share: smb://…, nfs://…, sftp://… or s3://… (a NAS, a server, S3)"));
        if live {
            items.push(Item::new("Type a directory"));
        }
        let offset = usize::from(!live);
        let default = preselect
            .take()
            .and_then(|p| drives.iter().position(|d| d.drive.device == p))
            .map(|i| i + offset)
            .unwrap_or(0);
        let body =
            "Images are kept in a directory: on a drive with an ext2/3/4, FAT, exFAT, NTFS, XFS or btrfs filesystem.";
        let Nav::Go(i) = scr.select(title, body, "Where are the images?", &items, default)? else {
            return Ok(Nav::Back);
        };
        let typed = (!live && i == 0) || (live && i == items.len() - 1);
        if typed {
            let Nav::Go(text) = scr.input(
                title,
                "Type the directory that holds the images (or will hold them).",
                "Directory",
                &typed_default,
            )?
            else {
                continue;
            };
            let path = PathBuf::from(&text);
            if !path.is_dir() {
                scr.message(
                    title,
                    &format!("{text} is not a directory. Type an existing directory, for example /mnt/usb."),
                )?;
                continue;
            }
            *last = text;
            return Ok(Nav::Go(ImageDir { path, mounted: None }));
        }
        if i == offset + drives.len() + 1 {
            match mount_share(scr, title, mount_at, network)? {
                Some(dir) => return Ok(Nav::Go(dir)),
                None => continue,
            }
        }
        let wait = i == offset + drives.len();
        let chosen = if wait {
            match wait_for_drive(scr, title, exclude, not_on, &drives)? {
                None => continue,
                Some(mut new) if new.len() == 1 => new.remove(0),
                Some(new) => {
                    preselect = new.first().map(|d| d.drive.device.clone());
                    continue;
                }
            }
        } else {
            drives[i - offset].clone()
        };
        let at = mount_at.to_path_buf();
        scr.page(
            title,
            &format!("Mounting {} ({}) at {} ...", chosen.drive.device.display(), chosen.drive.fs.fstype, at.display()),
        )?;
        match Mounted::mount(&chosen.drive.device, &chosen.drive.fs.fstype, &at, chosen.drive.read_only) {
            Ok(g) => return Ok(Nav::Go(ImageDir { path: images_dir(&at), mounted: Some(g) })),
            Err(e) => scr.message(title, &format!("{e}"))?,
        }
    }
}

/// Brings up the network when the live system asks for it (`network`),
/// saying so and then `next`; false (said on screen) when there is none.
fn network_up(scr: &Screen, title: &str, network: Option<BringUpNetwork>, next: &str) -> Result<bool> {
    let Some(up) = network else {
        scr.page(title, next)?;
        return Ok(true);
    };
    scr.page(title, "Bringing up the network by DHCP ...")?;
    match up() {
        Ok((_, line)) => {
            scr.page(title, &format!("{line}\n\n{next}"))?;
            Ok(true)
        }
        Err(e) => {
            scr.message(title, &format!("No network: {e}\n\nConnect a network cable and try again."))?;
            Ok(false)
        }
    }
}

/// Asks for an S3 store's endpoint, region and access key (the secret
/// read as stars), brings up the network and checks that the store
/// answers; the settings stay in this process's memory. The repositories
/// are under `url` (`s3://BUCKET/PREFIX`). `None` when the person went
/// back or the store did not answer (said on screen).
fn open_s3(scr: &Screen, title: &str, url: &str, network: Option<BringUpNetwork>) -> Result<Option<ImageDir>> {
    if let Err(e) = crate::repo::s3::parse_url(url) {
        scr.message(title, &e)?;
        return Ok(None);
    }
    let ask = |body: &str, label: &str, default: &str| scr.input(title, body, label, default);
    let Nav::Go(endpoint) = ask(
        "The address of the S3 server, for example http://192.168.1.10:3900 (MinIO, Garage, a NAS). Leave it \
         empty for Amazon S3.",
        "Endpoint",
        "",
    )?
    else {
        return Ok(None);
    };
    let Nav::Go(region) = ask("The store's region (garage for Garage).", "Region", "us-east-1")? else {
        return Ok(None);
    };
    let Nav::Go(key) = ask("The access key's ID.", "Access key", "")? else { return Ok(None) };
    scr.page(title, &format!("The secret of access key {key}.\n\nIt is kept in memory for this run only."))?;
    let Nav::Go(secret) = scr.read_secret("Secret key")? else { return Ok(None) };
    if !network_up(scr, title, network, &format!("Asking {url} ..."))? {
        return Ok(None);
    }
    let mut settings = std::collections::HashMap::from([
        ("aws_access_key_id".to_string(), key.trim().to_string()),
        ("aws_secret_access_key".to_string(), secret),
        ("region".to_string(), region.trim().to_string()),
    ]);
    if !endpoint.trim().is_empty() {
        settings.insert("endpoint_url".into(), endpoint.trim().to_string());
    }
    crate::repo::s3::set_settings(settings);
    // A listing of a name that is not there: the bucket and the key are
    // checked, nothing is read.
    let probe = crate::repo::store::open(Path::new(url)).and_then(|st| st.list("klon-wizard-probe").map(|_| ()));
    match probe {
        Ok(()) => Ok(Some(ImageDir { path: PathBuf::from(url), mounted: None })),
        Err(e) => {
            scr.message(title, &format!("{url} does not answer as it should: {e}"))?;
            Ok(None)
        }
    }
}

/// Asks for a network share's location (and an SMB user's password, or an
/// S3 store's settings), brings up the network and mounts the share at
/// `at`; `None` when the person went back.
fn mount_share(scr: &Screen, title: &str, at: &Path, network: Option<BringUpNetwork>) -> Result<Option<ImageDir>> {
    let mut typed = "smb://".to_string();
    loop {
        let Nav::Go(text) = scr.input(
            title,
            "Type the share's location:\n\n  smb://[USER@]HOST[:PORT]/SHARE[/FOLDER]   SMB 2 or 3: a NAS, a Windows or \
             Samba server; the images are in FOLDER, or in klon-images/ of the share\n  nfs://HOST[:PORT]/PATH   NFS \
             4.1; the images are in PATH\n  sftp://[USER@]HOST[:PORT]/PATH   an SSH server, with ssh's keys and \
             known hosts; the images are in PATH\n  s3://BUCKET[/PREFIX]   S3-compatible storage: repositories \
             under PREFIX\n\nFor example smb://backup@192.168.1.10/images.",
            "Location",
            &typed,
        )?
        else {
            return Ok(None);
        };
        typed = text.clone();
        if text.starts_with("s3://") {
            match open_s3(scr, title, &text, network)? {
                Some(dir) => return Ok(Some(dir)),
                None => continue,
            }
        }
        let found = match share::parse(&text) {
            Ok(s) => s,
            Err(e) => {
                scr.message(title, &format!("{e}"))?;
                continue;
            }
        };
        let password = match (&found.protocol, &found.user) {
            (Protocol::Smb, Some(user)) => {
                scr.page(
                    title,
                    &format!(
                        "The password of {user} on {}.\n\nIt goes to the kernel's mount of the share and is kept \
                         nowhere.",
                        found.host
                    ),
                )?;
                match scr.read_secret("Password")? {
                    Nav::Go(p) => Some(p),
                    Nav::Back => continue,
                }
            }
            _ => None,
        };
        if !network_up(scr, title, network, &format!("Mounting {} at {} ...", found.describe(), at.display()))? {
            continue;
        }
        match found.mount(password.as_deref(), at, false) {
            Ok(m) => {
                let dir = found.images_dir(at);
                if let Err(e) = std::fs::create_dir_all(&dir) {
                    drop(m);
                    scr.message(title, &format!("Cannot make the folder {} on the share: {e}", dir.display()))?;
                    continue;
                }
                return Ok(Some(ImageDir { path: dir, mounted: Some(m) }));
            }
            Err(e) => scr.message(title, &format!("{e}"))?,
        }
    }
}

/// Waits for a new drive with a supported filesystem (kernel uevents);
/// Esc goes back. Returns the new partitions, `None` on Esc.
fn wait_for_drive(
    scr: &Screen,
    title: &str,
    exclude: &[PathBuf],
    not_on: Option<u64>,
    before: &[DrivePart],
) -> Result<Option<Vec<DrivePart>>> {
    let sock = UeventSocket::open()?;
    scr.page(
        title,
        "Insert the USB drive now.\n\nklon goes on by itself as soon as the drive appears. Esc goes back.",
    )?;
    let stdin = std::io::stdin();
    loop {
        let found: Vec<DrivePart> = drive_parts(exclude, not_on, false)?
            .into_iter()
            .filter(|d| !before.iter().any(|b| b.drive.devno == d.drive.devno))
            .collect();
        if !found.is_empty() {
            return Ok(Some(found));
        }
        // Wake on a uevent (then rescan) or a key. The timeout only bounds
        // a rescan in case an event was missed; it is not what notices.
        use std::os::fd::AsFd;
        match uevent::wait_either(&sock, stdin.as_fd(), Duration::from_secs(5))? {
            Woken::Event(ev) if !ev.is_block_arrival() => continue,
            Woken::Event(_) => {
                // A partition's uevent can come before its filesystem is
                // readable; drain the burst of events that follows.
                while sock.next(Some(Duration::from_millis(300)))?.is_some() {}
            }
            Woken::Other => {
                if let Ok(console::Key::Escape) = scr.term.read_key() {
                    return Ok(None);
                }
            }
            Woken::Timeout => {}
        }
    }
}

/// An image found in a directory.
#[derive(Debug)]
pub struct Found {
    /// Its directory.
    pub path: PathBuf,
    /// The menu entry.
    pub item: Item,
    /// Source disk size and sector size, for matching targets.
    pub need: Option<disks::Need>,
}

/// The images in `dir` (complete, unfinished, damaged), by name; in an S3
/// store (`s3://BUCKET/PREFIX`), the repositories under the prefix.
pub fn list_images(dir: &Path) -> Vec<Found> {
    let mut paths: Vec<PathBuf> = if crate::repo::store::is_remote(dir) {
        remote_repositories(dir)
    } else {
        let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
        rd.flatten().map(|e| e.path()).filter(|p| crate::engine::source::looks_like_image(p)).collect()
    };
    paths.sort();
    paths.into_iter().flat_map(|p| expand_repository(p).into_iter().map(|p| describe_image(&p))).collect()
}

/// The repositories right under the S3 location `dir`: the names with a
/// repository's configuration object in them. One level is listed, not
/// every pack below it.
fn remote_repositories(dir: &Path) -> Vec<PathBuf> {
    let Ok(store) = crate::repo::store::open(dir) else { return Vec::new() };
    let Ok(names) = store.children("") else { return Vec::new() };
    names
        .into_iter()
        .filter(|n| store.size(&format!("{n}/{}", crate::repo::CONFIG_NAME)).is_ok_and(|s| s.is_some()))
        .map(|n| dir.join(n))
        .collect()
}

/// A repository stands for its snapshots, newest first (`REPO:ID`); any
/// other image for itself. A repository that cannot be read is listed
/// once, as damaged.
fn expand_repository(p: PathBuf) -> Vec<PathBuf> {
    if !crate::repo::is_repository(&p) {
        return vec![p];
    }
    match crate::repo::Repository::open(&p).and_then(|r| r.snapshots()) {
        Ok(list) if !list.is_empty() => {
            list.iter().map(|s| PathBuf::from(format!("{}:{}", p.display(), s.short_id()))).collect()
        }
        _ => vec![p],
    }
}

fn describe_image(p: &Path) -> Found {
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let kind = |k: Option<&str>| k.map(|k| format!("  ({k})")).unwrap_or_default();
    match crate::engine::source::summarize(p) {
        Ok(s) => {
            let text = format!(
                "{name}{}{}\n      from {}  {}  image {}\n      {}",
                kind(s.kind),
                s.created.as_deref().map(|d| format!("  {d}")).unwrap_or_default(),
                cut(&s.source, 30),
                human_bytes(s.disk_size),
                human_bytes(s.image_bytes),
                s.state
            );
            let need = Some(disks::Need { size: s.disk_size, sector_size: s.sector_size });
            Found { path: p.to_path_buf(), item: Item::new(text), need }
        }
        Err(e) => {
            let (k, what) = if crate::clonezilla::is_clonezilla_image(p) {
                (Some("Clonezilla"), "cannot be read")
            } else {
                (None, "not complete")
            };
            Found {
                path: p.to_path_buf(),
                item: Item::blocked(format!("{name}{}\n      {what}", kind(k)), format!("{e}")),
                need: None,
            }
        }
    }
}

fn cut(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_string()
    } else {
        s.chars().take(width.saturating_sub(1)).collect::<String>() + "~"
    }
}
