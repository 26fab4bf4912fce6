//! An image directory encrypted with gocryptfs, as an image source.
//!
//! Clonezilla's `-enc` saves into such a directory since it moved from
//! eCryptfs to gocryptfs (ocs-functions' `task_gocryptfs_mount_point`):
//! `gocryptfs -init -plaintextnames` makes `gocryptfs.conf` (the master key,
//! wrapped by the passphrase with scrypt), ocs-sr saves through the
//! mounted directory, so the image's files keep their names and have their
//! contents encrypted, and a clear `gocryptfs.info` is put next to them
//! (`disk_of_img`, `parts_of_img`, `time_of_img`, `disks_size_all_of_img`).
//!
//! klon opens one as Clonezilla's restore does: mounted read-only with the
//! `gocryptfs` program (FUSE) and the passphrase, the image inside opened as
//! any other, unmounted again when the source is dropped.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{ImageSource, Summary};
use crate::device::Disk;
use crate::engine::feedback::Feedback;
use crate::engine::restore::{RestoreOptions, RestoreReport};
use crate::engine::verify::VerifyReport;
use crate::error::{Error, Result};
use crate::table::DiskLayout;

/// gocryptfs's exit code for a wrong password.
const WRONG_PASSWORD: i32 = 12;

/// Whether `dir` is a directory gocryptfs encrypted.
pub fn is_encrypted(dir: &Path) -> bool {
    dir.join("gocryptfs.conf").is_file()
}

/// The directory, decrypted: a read-only gocryptfs mount, unmounted when
/// dropped.
pub struct Decrypted {
    at: PathBuf,
}

impl Decrypted {
    /// Where the decrypted files are.
    pub fn path(&self) -> &Path {
        &self.at
    }
}

impl Drop for Decrypted {
    fn drop(&mut self) {
        let done = Command::new("fusermount3").arg("-u").arg(&self.at).output().is_ok_and(|o| o.status.success())
            || Command::new("umount").arg(&self.at).output().is_ok_and(|o| o.status.success());
        if done {
            let _ = std::fs::remove_dir(&self.at);
        } else {
            eprintln!("klon: warning: could not unmount the decrypted image at {}", self.at.display());
        }
    }
}

/// Mounts the encrypted directory `dir` read-only with the passphrase
/// (`--passphrase-file`, `KLON_PASSPHRASE`, or typed when asked).
pub fn decrypt(dir: &Path) -> Result<Decrypted> {
    let what = format!("the image {} (encrypted with gocryptfs)", dir.display());
    let passphrase = crate::repo::crypto::passphrase(&what, false)?;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let at = std::env::temp_dir().join(format!("klon-gocryptfs-{}-{n}", std::process::id()));
    std::fs::create_dir(&at).map_err(|e| Error::io("making a mount point", &at, None, e))?;
    // What gocryptfs says goes to a file: the process that stays to serve
    // the mount keeps what it was given open.
    let said_path = std::env::temp_dir().join(format!("klon-gocryptfs-{}-{n}.log", std::process::id()));
    let said_file = std::fs::File::create(&said_path).map_err(|e| Error::io("making", &said_path, None, e))?;
    let _ = std::fs::remove_file(&said_path);
    let mut said_read = said_file.try_clone().map_err(|e| Error::io("making", &said_path, None, e))?;
    let spawned = Command::new("gocryptfs")
        .args(["-ro", "-q", "-nosyslog", "--"])
        .arg(dir)
        .arg(&at)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(said_file)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir(&at);
            return Err(Error::Unsupported(format!(
                "{what} needs the gocryptfs program to be opened ({e}): install it (Debian package gocryptfs), or \
                 mount it yourself (gocryptfs -ro {} DIR) and give klon DIR",
                dir.display()
            )));
        }
    };
    // gocryptfs reads the password from its standard input when that is
    // not a terminal; once mounted its first process exits.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(format!("{passphrase}\n").as_bytes());
    }
    let status = child.wait().map_err(|e| Error::io("running gocryptfs for", dir, None, e))?;
    if status.success() {
        return Ok(Decrypted { at });
    }
    let _ = std::fs::remove_dir(&at);
    let mut said = String::new();
    let _ = std::io::Seek::seek(&mut said_read, std::io::SeekFrom::Start(0));
    let _ = std::io::Read::read_to_string(&mut std::io::Read::take(&mut said_read, 4096), &mut said);
    let said = said.trim();
    match status.code() {
        Some(WRONG_PASSWORD) => Err(Error::Key(format!(
            "the passphrase does not unlock {what}: give the one it was saved with (KLON_PASSPHRASE, \
             --passphrase-file, or typed when asked)"
        ))),
        _ => Err(Error::Unsupported(format!("gocryptfs could not open {what} ({status}): {said}"))),
    }
}

/// An image inside an encrypted directory, opened.
pub struct Encrypted {
    dir: PathBuf,
    /// The image in the mount; dropped before it (fields drop in order).
    inner: Box<dyn ImageSource>,
    _mount: Decrypted,
}

/// Opens the image in the encrypted directory `dir`.
pub fn open(dir: &Path) -> Result<Encrypted> {
    let mount = decrypt(dir)?;
    if is_encrypted(mount.path()) {
        return Err(Error::Unsupported(format!("{} is encrypted twice with gocryptfs", dir.display())));
    }
    // A Clonezilla image (or a klon image) inside: no repository to lock,
    // nothing to say.
    let inner = super::open(mount.path(), "read", &Feedback::silent())?;
    Ok(Encrypted { dir: dir.to_path_buf(), inner, _mount: mount })
}

impl ImageSource for Encrypted {
    fn location(&self) -> &Path {
        &self.dir
    }

    fn layout(&self) -> &DiskLayout {
        self.inner.layout()
    }

    fn describe(&self) -> String {
        format!("{} (encrypted with gocryptfs in {})", self.inner.describe(), self.dir.display())
    }

    fn verify(&mut self, workers: usize, feedback: &Feedback) -> Result<VerifyReport> {
        self.inner.verify(workers, feedback)
    }

    fn restore(&mut self, target: &Disk, opts: &RestoreOptions) -> Result<RestoreReport> {
        self.inner.restore(target, opts)
    }

    fn info(&self) -> (String, serde_json::Value) {
        let (text, mut json) = self.inner.info();
        if let Some(o) = json.as_object_mut() {
            o.insert("encrypted".into(), serde_json::json!({ "with": "gocryptfs", "directory": self.dir }));
        }
        // The inner image names the mount; the person named the directory.
        let text = text.replace(&self._mount.path().display().to_string(), &self.dir.display().to_string());
        (format!("Encrypted:    with gocryptfs (opened read-only with the passphrase)\n{text}"), json)
    }

    fn warnings(&self) -> Vec<String> {
        self.inner.warnings()
    }

    fn unlock(&mut self, only: Option<&[u32]>) -> Result<()> {
        self.inner.unlock(only)
    }

    fn saved_partitions(&self) -> Option<Vec<u32>> {
        self.inner.saved_partitions()
    }

    fn restore_partition(
        &mut self,
        number: u32,
        target: &Disk,
        to: u64,
        opts: &RestoreOptions,
    ) -> Result<RestoreReport> {
        self.inner.restore_partition(number, target, to, opts)
    }
}

/// What a list shows of an encrypted directory, from Clonezilla's clear
/// `gocryptfs.info` (nothing is decrypted).
pub fn summarize(dir: &Path) -> Result<Summary> {
    let info = std::fs::read_to_string(dir.join("gocryptfs.info")).unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
            .map(|v| v.trim().trim_matches('"').to_string())
            .filter(|v| !v.is_empty())
    };
    let image_bytes = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
        .unwrap_or(0);
    let (kind, source) = match field("disk_of_img").or_else(|| field("parts_of_img")) {
        Some(d) => (Some("Clonezilla"), d),
        None => (None, dir.display().to_string()),
    };
    Ok(Summary {
        kind,
        source,
        disk_size: 0,
        sector_size: 512,
        created: field("time_of_img"),
        image_bytes,
        state: "encrypted with gocryptfs: opened with its passphrase".into(),
    })
}
