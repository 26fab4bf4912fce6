//! The wizard's "Browse an image": an image or a repository's snapshot
//! mounted read-only (what `klon mount --mount-filesystems` does, served by
//! this process), then files copied from it to the image drive, or a shell
//! opened in it; unmounted again on the way out.

use std::path::{Component, Path, PathBuf};
use std::sync::mpsc;

use super::images::ImageDir;
use super::screen::{Item, Nav, Screen};
use crate::engine::mount::{self, MountOptions};
use crate::error::{Error, Result};
use crate::ui::human_bytes;
use crate::ui::progress::Console;

/// Where the wizard mounts an image: under /run in the live system, in the
/// temporary directory elsewhere.
fn mount_point(live: bool) -> PathBuf {
    if live {
        PathBuf::from("/run/klon-browse")
    } else {
        std::env::temp_dir().join(format!("klon-browse-{}", std::process::id()))
    }
}

/// Mounts `image` and offers what can be done with its files, until the
/// person unmounts it. Copies go to `drive` (the directory the image was
/// chosen in), under `klon-files/IMAGE-NAME/`.
pub fn browse(scr: &Screen, title: &str, image: &Path, drive: &ImageDir, live: bool) -> Result<()> {
    let at = mount_point(live);
    std::fs::create_dir_all(&at).map_err(|e| Error::io("creating", &at, None, e))?;
    scr.page(title, &format!("Mounting {} on {} ...", image.display(), at.display()))?;
    let (tx, rx) = mpsc::channel();
    let serving = {
        let (image, at) = (image.to_path_buf(), at.clone());
        std::thread::spawn(move || {
            let opts = MountOptions { foreground: true, mount_filesystems: true, feedback: Console::feedback(false) };
            let ready = tx.clone();
            let served = mount::mount(&image, &at, &opts, move |m| {
                let _ = ready.send(Ok(m.clone()));
            });
            if let Err(e) = &served {
                let _ = tx.send(Err(e.to_string()));
            }
            served
        })
    };
    let mounted = match rx.recv() {
        Ok(Ok(m)) => m,
        Ok(Err(_)) | Err(_) => {
            let e = serving.join().unwrap_or_else(|_| Err(Error::Unsupported("the mount thread failed".into())));
            let _ = std::fs::remove_dir(&at);
            return e.map(|_| ());
        }
    };
    let copies = drive.path.join("klon-files").join(image_name(image));
    let items = [
        Item::new("Show the files in a folder"),
        Item::new("Copy a file or folder to the image drive"),
        Item::new("Open a shell in it (exit returns here)"),
        Item::new("Unmount it and go back"),
    ];
    let mut said = String::new();
    loop {
        let mut body = format!("{} is mounted read-only on {}.\n", image.display(), at.display());
        for f in &mounted.filesystems {
            body += &format!("  {f}\n");
        }
        body +=
            &format!("Each partition's bytes are the files p1.img, p2.img … there. Copies go to {}.", copies.display());
        if !said.is_empty() {
            body += &format!("\n\n{said}");
        }
        let choice = match scr.select(title, &body, "What now?", &items, 0)? {
            Nav::Back => 3,
            Nav::Go(i) => i,
        };
        said.clear();
        match choice {
            0 => {
                let Nav::Go(rel) = scr.input(
                    title,
                    &format!("A folder inside {} (p1 is the first partition's files).", at.display()),
                    "Folder",
                    "p1",
                )?
                else {
                    continue;
                };
                said = match list(&at, &rel) {
                    Ok(text) => text,
                    Err(e) => format!("Nothing shown: {e}"),
                };
            }
            1 => {
                let Nav::Go(rel) = scr.input(
                    title,
                    &format!("A path inside {} (p1/… is the first partition's files).", at.display()),
                    "Path to copy",
                    "",
                )?
                else {
                    continue;
                };
                said = match copy_out(&at, &rel, &copies) {
                    Ok((files, bytes, to)) => {
                        format!("Copied {files} files ({}) to {}.", human_bytes(bytes), to.display())
                    }
                    Err(e) => format!("Nothing copied: {e}"),
                };
            }
            2 => {
                scr.page(title, &format!("A shell in {}; type exit to come back.", at.display()))?;
                let shell = std::env::var("SHELL").unwrap_or_else(|_| "/bin/sh".into());
                if let Err(e) = std::process::Command::new(&shell).current_dir(&at).status() {
                    said = format!("Could not start {shell}: {e}");
                }
            }
            _ => match mount::umount(&at) {
                Ok(()) => {
                    let served = serving.join().unwrap_or(Ok(()));
                    let _ = std::fs::remove_dir(&at);
                    return served;
                }
                Err(e) => said = format!("Not unmounted: {e}"),
            },
        }
    }
}

/// Entries shown of a folder at most (a console has 25 lines).
const LISTED: usize = 12;

/// What folder `rel` inside `root` holds: folders first, then files with
/// their sizes; the first [`LISTED`], and how many more.
fn list(root: &Path, rel: &str) -> Result<String> {
    let rel_path = inside(rel, true)?;
    let dir = root.join(&rel_path);
    let mut entries: Vec<(bool, String, u64)> = std::fs::read_dir(&dir)
        .map_err(|e| Error::io("reading", &dir, None, e))?
        .flatten()
        .map(|e| {
            let meta = e.metadata().ok();
            let is_dir = meta.as_ref().is_some_and(|m| m.is_dir());
            (!is_dir, e.file_name().to_string_lossy().into_owned(), meta.map_or(0, |m| m.len()))
        })
        .collect();
    entries.sort();
    let mut text = format!("{} holds {} entries:\n", rel_path.display(), entries.len());
    for (is_file, name, size) in entries.iter().take(LISTED) {
        text += &if *is_file { format!("  {name}  ({})\n", human_bytes(*size)) } else { format!("  {name}/\n") };
    }
    if entries.len() > LISTED {
        text += &format!("  … and {} more (the shell shows them all)\n", entries.len() - LISTED);
    }
    Ok(text)
}

/// `rel` as a path that stays inside the mount (no `..`, no leading `/`);
/// empty only when `empty_ok`.
fn inside(rel: &str, empty_ok: bool) -> Result<PathBuf> {
    let p = Path::new(rel.trim_start_matches('/'));
    if (p.as_os_str().is_empty() && !empty_ok) || p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(Error::Usage(format!("{rel} is not a path inside the mount (no .., no leading /)")));
    }
    Ok(p.to_path_buf())
}

/// The image's name for the directory its copies go to: the image
/// directory's name, or REPO-SNAPSHOT.
fn image_name(image: &Path) -> String {
    let s = image.to_string_lossy();
    let last = s.trim_end_matches('/').rsplit('/').next().unwrap_or("image").to_string();
    last.replace(':', "-")
}

/// Copies `rel` (a file or a directory, inside `root`) to `into`, keeping
/// its name; returns the files and bytes copied and where they went.
/// Paths that leave `root` are refused.
fn copy_out(root: &Path, rel: &str, into: &Path) -> Result<(u64, u64, PathBuf)> {
    let rel = &inside(rel, false)?;
    let from = root.join(rel);
    let name = rel.file_name().expect("a normal last component");
    let to = into.join(name);
    if to.exists() {
        return Err(Error::Refused(format!("{} exists already; nothing was overwritten", to.display())));
    }
    std::fs::create_dir_all(into).map_err(|e| Error::io("creating", into, None, e))?;
    let (mut files, mut bytes) = (0, 0);
    copy_tree(&from, &to, &mut files, &mut bytes)?;
    Ok((files, bytes, to))
}

fn copy_tree(from: &Path, to: &Path, files: &mut u64, bytes: &mut u64) -> Result<()> {
    let meta = std::fs::symlink_metadata(from).map_err(|e| Error::io("reading", from, None, e))?;
    if meta.is_dir() {
        std::fs::create_dir(to).map_err(|e| Error::io("creating", to, None, e))?;
        let mut entries: Vec<_> = std::fs::read_dir(from)
            .map_err(|e| Error::io("reading", from, None, e))?
            .collect::<std::io::Result<_>>()
            .map_err(|e| Error::io("reading", from, None, e))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            copy_tree(&e.path(), &to.join(e.file_name()), files, bytes)?;
        }
    } else if meta.is_file() {
        *bytes += std::fs::copy(from, to).map_err(|e| Error::io("copying", from, None, e))?;
        *files += 1;
    }
    // Links, devices and the like have no place on an image drive (often
    // exFAT): left out.
    Ok(())
}
