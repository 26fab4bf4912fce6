//! Where a repository's files are kept: one interface, [`Store`], over a
//! directory ([`LocalStore`]) and any other place that holds named
//! objects.
//!
//! A repository names its files by paths relative to its root, with `/`
//! between parts: `klon-repository.json`, `packs/ab/ab….pack`,
//! `snapshots/….json`, `locks/….lock`. A store makes each write whole or
//! not at all: a file is visible only once all of it is written and
//! durable, which is what lets a snapshot exist only when everything it
//! needs does (docs/REPOSITORY.md).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::device::direct::DirectWriter;
use crate::error::{Error, Result};

/// The directory of unfinished files in a local repository.
pub const TMP_DIR: &str = "tmp";

/// A file of a store, open for reading at any offset.
pub trait Object: Send + Sync {
    /// Reads `buf.len()` bytes at `offset`; fewer is an error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Says that the ranges (offset, length) will be read soon, so that a
    /// store that can fetch them ahead does (a local file asks the kernel
    /// to read them into the page cache meanwhile). Only a hint: nothing
    /// is checked and nothing fails.
    fn prefetch(&self, _ranges: &[(u64, u64)]) {}
}

/// A file being written in order, visible under its name only once
/// [`ObjectWriter::finish`] returns.
pub trait ObjectWriter: Send {
    /// Appends `bytes`.
    fn write_all(&mut self, bytes: &[u8]) -> Result<()>;
    /// Makes the file durable and visible under its name.
    fn finish(self: Box<Self>) -> Result<()>;
    /// Drops what was written; nothing becomes visible.
    fn abort(self: Box<Self>);
}

/// A place holding a repository's files.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Where the store is, as people name it: a directory's path, or a URL.
    fn location(&self) -> String;

    /// How messages name file `name` of the store.
    fn locate(&self, name: &str) -> String {
        format!("{}/{name}", self.location().trim_end_matches('/'))
    }

    /// The whole of file `name`, or None when there is none. A file
    /// larger than `max` bytes is refused as damage (nothing klon writes
    /// is that large).
    fn read(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>>;

    /// File `name`, open for reading; an error when there is none.
    fn open(&self, name: &str) -> Result<Box<dyn Object>>;

    /// Writes file `name` whole: durable and visible all at once,
    /// replacing any file of that name.
    fn write(&self, name: &str, bytes: &[u8]) -> Result<()>;

    /// Starts file `name`, written in order (a pack).
    fn create(&self, name: &str) -> Result<Box<dyn ObjectWriter>>;

    /// Every file under directory `dir` (at any depth) with its size,
    /// named from the store's root; none when there is no such directory.
    fn list(&self, dir: &str) -> Result<Vec<(String, u64)>>;

    /// The names right under directory `dir`, files and directories
    /// alike, each once, named from the store's root (`dir/NAME`, or
    /// `NAME` for the root); none when there is no such directory. A
    /// store that can list one level (S3's delimiter) does so instead of
    /// listing everything below.
    fn children(&self, dir: &str) -> Result<Vec<String>> {
        let base = if dir.is_empty() { String::new() } else { format!("{dir}/") };
        let mut out: Vec<String> = self
            .list(dir)?
            .into_iter()
            .filter_map(|(name, _)| {
                let rest = name.strip_prefix(&base)?;
                Some(format!("{base}{}", rest.split('/').next()?))
            })
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// The size of file `name`, or None when there is none.
    fn size(&self, name: &str) -> Result<Option<u64>>;

    /// Removes file `name` (none there is no error).
    fn remove(&self, name: &str) -> Result<()>;

    /// Makes the removals made so far in directory `dir` durable.
    fn sync(&self, dir: &str) -> Result<()>;

    /// Whether the store holds nothing a repository would not be created
    /// over: nothing at all, or what a creation cut short left (its
    /// empty directories, the configuration being written).
    fn is_empty_for_creation(&self) -> Result<bool>;

    /// Prepares an empty store to hold a repository.
    fn prepare(&self) -> Result<()>;

    /// Removes every file of the store (a repository this job made, and
    /// nothing else is in it).
    fn destroy(&self) -> Result<()>;

    /// The local directory, when the store is one.
    fn local_dir(&self) -> Option<&Path> {
        None
    }
}

/// Whether `location` names a repository in an object store
/// (`s3://BUCKET/PREFIX`) rather than a directory.
pub fn is_remote(location: &Path) -> bool {
    location.to_str().is_some_and(|s| s.starts_with("s3://"))
}

/// Opens the store a repository location names: `s3://BUCKET/PREFIX`, or
/// a directory.
pub fn open(location: &Path) -> Result<Arc<dyn Store>> {
    if is_remote(location) {
        let url = location.to_str().expect("checked by is_remote");
        return Ok(Arc::new(super::s3::S3Store::open(url)?));
    }
    Ok(Arc::new(LocalStore::new(location)))
}

/// A repository in a directory: files are written in its `tmp/`, flushed
/// to stable storage and renamed into place, and the directory that
/// names them flushed too.
#[derive(Debug, Clone)]
pub struct LocalStore {
    dir: PathBuf,
}

impl LocalStore {
    /// The store of directory `dir`.
    pub fn new(dir: &Path) -> LocalStore {
        LocalStore { dir: dir.to_path_buf() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A new unfinished file's path in `tmp/`.
    fn tmp_path(&self, name: &str) -> PathBuf {
        let base = name.rsplit('/').next().unwrap_or(name);
        self.dir.join(TMP_DIR).join(format!("{base}.{}-{}.tmp", std::process::id(), super::pack::random_hex(4)))
    }

    /// Renames `tmp` to `name`, creating its directory as needed, and
    /// flushes the directory.
    fn put_in_place(&self, tmp: &Path, name: &str) -> Result<()> {
        let dest = self.path(name);
        let parent = dest.parent().expect("a file of the store has a directory").to_path_buf();
        if parent != self.dir {
            create_dir_synced(&parent)?;
        }
        std::fs::rename(tmp, &dest).map_err(|e| Error::io("renaming into place", &dest, None, e))?;
        sync_dir(&parent)
    }
}

impl Store for LocalStore {
    fn location(&self) -> String {
        self.dir.display().to_string()
    }

    fn locate(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    fn read(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let path = self.path(name);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("opening", &path, None, e)),
        };
        let len = f.metadata().map_err(|e| Error::io("reading", &path, None, e))?.len();
        if len > max {
            return Err(Error::Corrupt(format!("{}: larger than any klon writes", path.display())));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        std::io::Read::read_to_end(&mut std::io::Read::take(f, max + 1), &mut bytes)
            .map_err(|e| Error::io("reading", &path, None, e))?;
        Ok(Some(bytes))
    }

    fn open(&self, name: &str) -> Result<Box<dyn Object>> {
        let path = self.path(name);
        let file = File::open(&path).map_err(|e| Error::io("opening", &path, None, e))?;
        Ok(Box::new(LocalObject { file, path }))
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let tmp = self.tmp_path(name);
        crate::image::manifest::write_synced(&tmp, bytes)?;
        self.put_in_place(&tmp, name).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }

    fn create(&self, name: &str) -> Result<Box<dyn ObjectWriter>> {
        let tmp = self.tmp_path(name);
        let f = File::create(&tmp).map_err(|e| Error::io("creating", &tmp, None, e))?;
        // Direct writes where the filesystem takes them (as image files
        // are written): the pack's bytes go to the drive without being
        // copied into the page cache, which a backup's kernel time was
        // mostly spent on (6 GiB disk: 11 s of system time against the
        // image's 2 s). Not on FUSE filesystems: fusefat took direct
        // writes of a repository's packs and read other bytes back.
        let fuse =
            nix::sys::statfs::fstatfs(&f).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::FUSE_SUPER_MAGIC);
        let direct = if fuse { None } else { crate::device::direct::open_for_writing(&tmp) };
        let file = DirectWriter::new(f, direct, WRITE_BUF).map_err(|e| Error::io("opening", &tmp, None, e))?;
        Ok(Box::new(LocalWriter { store: self.clone(), name: name.to_string(), file, tmp }))
    }

    fn list(&self, dir: &str) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        list_into(&self.path(dir), dir, &mut out)?;
        Ok(out)
    }

    fn size(&self, name: &str) -> Result<Option<u64>> {
        let path = self.path(name);
        match std::fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("reading", &path, None, e)),
        }
    }

    fn remove(&self, name: &str) -> Result<()> {
        let path = self.path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("removing", &path, None, e)),
        }
        // An emptied directory of packs goes too (FAT32 keeps directories
        // small that way); one that is not empty stays.
        if let Some((parent, _)) = name.rsplit_once('/')
            && parent.starts_with("packs/")
        {
            let _ = std::fs::remove_dir(self.path(parent));
        }
        Ok(())
    }

    fn sync(&self, dir: &str) -> Result<()> {
        let path = self.path(dir);
        if path.is_dir() { sync_dir(&path) } else { Ok(()) }
    }

    fn is_empty_for_creation(&self) -> Result<bool> {
        match std::fs::read_dir(&self.dir) {
            Ok(mut entries) => Ok(entries.next().is_none() || is_unfinished_creation(&self.dir)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(Error::io("opening", &self.dir, None, e)),
        }
    }

    fn prepare(&self) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io("creating the repository", &self.dir, None, e))?;
        for d in ["packs", "snapshots", TMP_DIR, "locks"] {
            create_dir_synced(&self.dir.join(d))?;
        }
        Ok(())
    }

    fn destroy(&self) -> Result<()> {
        std::fs::remove_dir_all(&self.dir).map_err(|e| Error::io("removing", &self.dir, None, e))
    }

    fn local_dir(&self) -> Option<&Path> {
        Some(&self.dir)
    }
}

/// Whether `dir` holds only what a creation makes before the
/// configuration: its four directories, empty but for the configuration
/// being written in `tmp/`.
fn is_unfinished_creation(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.into_iter().all(|e| {
        let Ok(e) = e else { return false };
        let name = e.file_name().to_string_lossy().to_string();
        let Ok(inside) = std::fs::read_dir(e.path()) else { return false };
        let inside: Vec<String> =
            inside.filter_map(|i| i.ok()).map(|i| i.file_name().to_string_lossy().to_string()).collect();
        match name.as_str() {
            "packs" | "snapshots" | "locks" => inside.is_empty(),
            TMP_DIR => inside.iter().all(|i| i.starts_with(super::CONFIG_NAME) && i.ends_with(".tmp")),
            _ => false,
        }
    })
}

fn list_into(path: &Path, name: &str, out: &mut Vec<(String, u64)>) -> Result<()> {
    let entries = match std::fs::read_dir(path) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("listing", path, None, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("listing", path, None, e))?;
        let file = entry.file_name().to_string_lossy().into_owned();
        let child = if name.is_empty() { file } else { format!("{name}/{file}") };
        let meta = entry.metadata().map_err(|e| Error::io("reading", entry.path(), None, e))?;
        if meta.is_dir() {
            list_into(&entry.path(), &child, out)?;
        } else {
            out.push((child, meta.len()));
        }
    }
    Ok(())
}

struct LocalObject {
    file: File,
    path: PathBuf,
}

impl Object for LocalObject {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| Error::io("reading", &self.path, Some(offset), e))
    }

    fn prefetch(&self, ranges: &[(u64, u64)]) {
        use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
        for &(offset, len) in ranges {
            let (Ok(o), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else { continue };
            let _ = posix_fadvise(&self.file, o, l, PosixFadviseAdvice::POSIX_FADV_WILLNEED);
        }
    }
}

/// Size of the buffers a file is written through.
const WRITE_BUF: usize = 4 << 20;

/// A file written in order through the page cache (FUSE drivers of FAT
/// mishandle what O_DIRECT writes), in `tmp/` until it is finished.
struct LocalWriter {
    store: LocalStore,
    name: String,
    file: DirectWriter,
    tmp: PathBuf,
}

impl ObjectWriter for LocalWriter {
    fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.append(bytes).map_err(|e| Error::io("writing", &self.tmp, e.offset, e.error))
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let LocalWriter { store, name, file, tmp } = *self;
        // (finish writes what is buffered, then syncs the file.)
        let done = file
            .finish()
            .map_err(|e| Error::io("writing", &tmp, e.offset, e.error))
            .and_then(|_| store.put_in_place(&tmp, &name));
        if done.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        done
    }

    fn abort(self: Box<Self>) {
        let LocalWriter { file, tmp, .. } = *self;
        drop(file);
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Creates `dir` if missing and syncs its parent.
pub fn create_dir_synced(dir: &Path) -> Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => sync_dir(dir.parent().unwrap_or(Path::new("."))),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::io("creating the directory", dir, None, e)),
    }
}

/// Syncs a directory (its entries).
pub fn sync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).map_err(|e| Error::io("opening", dir, None, e))?;
    match f.sync_all() {
        Ok(()) => Ok(()),
        // Some filesystems (FAT through some drivers) refuse fsync on a
        // directory; its entries are then written with the files' syncs.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        Err(e) => Err(Error::io("flushing the directory", dir, None, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    #[test]
    fn children_are_the_names_one_level_down_each_once() {
        let t = TempDir::new("store-children");
        let store = LocalStore::new(&t.join("s"));
        for name in ["a/klon-repository.json", "a/packs/0f/0f1.pack", "a/packs/1e/1e2.pack", "b/x", "top.txt"] {
            std::fs::create_dir_all(t.join("s").join(name).parent().unwrap()).unwrap();
            std::fs::write(t.join("s").join(name), b"x").unwrap();
        }
        assert_eq!(store.children("").unwrap(), ["a", "b", "top.txt"]);
        assert_eq!(store.children("a").unwrap(), ["a/klon-repository.json", "a/packs"]);
        assert_eq!(store.children("a/packs").unwrap(), ["a/packs/0f", "a/packs/1e"]);
        assert!(store.children("none").unwrap().is_empty());
    }
}
