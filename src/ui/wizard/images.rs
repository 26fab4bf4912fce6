//! Where the images are: a directory typed in, or a drive with a supported
//! filesystem mounted for the time it is used (waiting for a USB drive to
//! be plugged in if needed); and the images found there.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::device::sysfs::{self, PartInfo};
use crate::device::uevent::{self, UeventSocket, Woken};
use crate::error::Result;
use crate::ui::human_bytes;

use super::disks;
use super::screen::{Item, Nav, Screen};
use crate::device::mounts::{IMAGE_FS, Mounted};

/// Where the live system mounts the image drive.
pub const LIVE_MOUNT: &str = "/run/klon/images-drive";
/// Where it mounts a second drive, for a copy of a repository.
pub const COPY_MOUNT: &str = crate::live::COPY_MNT;

/// The chosen place for images.
#[derive(Debug)]
pub struct ImageDir {
    /// The directory.
    pub path: PathBuf,
    /// Set when the wizard mounted a drive for it.
    pub mounted: Option<Mounted>,
}

/// A partition that could hold images.
#[derive(Debug, Clone)]
struct DrivePart {
    part: PartInfo,
    fstype: String,
    label: String,
    disk: String,
}

fn drive_parts(exclude: &[PathBuf], not_on: Option<u64>) -> Result<Vec<DrivePart>> {
    let mut out = Vec::new();
    for info in sysfs::list_disks()? {
        if Some(info.devno) == not_on || disks::is_excluded(&info, exclude) {
            continue;
        }
        let model = info.model.clone().unwrap_or_else(|| info.name.clone());
        // A filesystem on the whole disk (a "superfloppy" USB stick).
        let whole = (info.partitions.is_empty() && info.fs.is_some()).then(|| PartInfo {
            number: 0,
            path: info.path.clone(),
            devno: info.devno,
            start: 0,
            size: info.size,
            type_id: None,
            fs: info.fs.clone(),
            mountpoints: info.mountpoints.clone(),
            in_use: info.in_use,
            lvm: None,
        });
        for p in info.partitions.iter().chain(whole.as_ref()) {
            let Some(f) = &p.fs else { continue };
            if !IMAGE_FS.contains(&f.fstype.as_str()) || !p.mountpoints.is_empty() || p.in_use {
                continue;
            }
            out.push(DrivePart {
                part: p.clone(),
                fstype: f.fstype.clone(),
                label: f.label.clone().unwrap_or_default(),
                disk: format!("{model}, {} {}", human_bytes(info.size), info.transport),
            });
        }
    }
    Ok(out)
}

/// Asks where the images are (or go): a typed directory, or a drive. With
/// `not_on` the disk being backed up is not offered.
pub fn choose_dir(
    scr: &Screen,
    title: &str,
    live: bool,
    exclude: &[PathBuf],
    not_on: Option<u64>,
    last: &mut String,
) -> Result<Nav<ImageDir>> {
    choose_dir_at(scr, title, live, exclude, not_on, last, Path::new(LIVE_MOUNT))
}

/// [`choose_dir`], a chosen drive mounted at `mount_at`.
pub fn choose_dir_at(
    scr: &Screen,
    title: &str,
    live: bool,
    exclude: &[PathBuf],
    not_on: Option<u64>,
    last: &mut String,
    mount_at: &Path,
) -> Result<Nav<ImageDir>> {
    let mut preselect: Option<PathBuf> = None;
    loop {
        let drives = drive_parts(exclude, not_on)?;
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
            items.push(Item::new(format!(
                "Drive {}: {} {}{} on {}",
                d.part.path.display(),
                human_bytes(d.part.size),
                d.fstype,
                if d.label.is_empty() { String::new() } else { format!(" \"{}\"", d.label) },
                d.disk
            )));
        }
        items.push(Item::new("Insert the USB drive now (klon waits for it)"));
        if live {
            items.push(Item::new("Type a directory"));
        }
        let offset = usize::from(!live);
        let default = preselect
            .take()
            .and_then(|p| drives.iter().position(|d| d.part.path == p))
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
        let wait = i == offset + drives.len();
        let chosen = if wait {
            match wait_for_drive(scr, title, exclude, not_on, &drives)? {
                None => continue,
                Some(mut new) if new.len() == 1 => new.remove(0),
                Some(new) => {
                    preselect = new.first().map(|d| d.part.path.clone());
                    continue;
                }
            }
        } else {
            drives[i - offset].clone()
        };
        let at = mount_at.to_path_buf();
        scr.page(
            title,
            &format!("Mounting {} ({}) at {} ...", chosen.part.path.display(), chosen.fstype, at.display()),
        )?;
        match Mounted::mount(&chosen.part.path, &chosen.fstype, &at, false) {
            Ok(g) => return Ok(Nav::Go(ImageDir { path: at, mounted: Some(g) })),
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
        let found: Vec<DrivePart> = drive_parts(exclude, not_on)?
            .into_iter()
            .filter(|d| !before.iter().any(|b| b.part.devno == d.part.devno))
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

/// The images in `dir` (complete, unfinished, damaged), by name.
pub fn list_images(dir: &Path) -> Vec<Found> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut paths: Vec<PathBuf> =
        rd.flatten().map(|e| e.path()).filter(|p| crate::engine::source::looks_like_image(p)).collect();
    paths.sort();
    paths.into_iter().flat_map(|p| expand_repository(p).into_iter().map(|p| describe_image(&p))).collect()
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
