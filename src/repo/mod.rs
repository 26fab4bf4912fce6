//! A repository: deduplicated snapshots of whole disks in one directory.
//!
//! Chunks are the used bytes of fixed windows of the disk, aligned to disk
//! offsets, named by their blake3 and kept once, packed into pack files.
//! A snapshot lists, per stream, which chunk holds which disk ranges; it is
//! a complete image on its own (no chain of increments). docs/REPOSITORY.md
//! describes every file byte for byte.

pub mod check;
pub mod copy;
pub mod crypto;
pub mod delta;
pub mod index;
pub mod lock;
pub mod pack;
pub mod policy;
pub mod prune;
pub mod read;
pub mod snapshot;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use index::{BlobIndex, BlobIndexBuilder};
use pack::PackIndex;
use snapshot::SnapshotFile;

/// File name of a repository's configuration.
pub const CONFIG_NAME: &str = "klon-repository.json";
/// Value of the configuration's `format` field.
pub const FORMAT_NAME: &str = "klon-repository";
/// The repository format version klon writes: 2 may hold delta blobs, 3
/// deltas whose base is a delta (chains of at most [`MAX_DELTA_DEPTH`]).
pub const FORMAT_VERSION: u32 = 3;
/// The version of an encrypted repository (an older klon must refuse it
/// rather than misread it): 3 and encryption.
pub const FORMAT_VERSION_ENCRYPTED: u32 = 4;
/// The oldest version klon reads (and backs up into, without deltas).
pub const FORMAT_VERSION_MIN: u32 = 1;
/// The newest version klon reads.
pub const FORMAT_VERSION_MAX: u32 = FORMAT_VERSION_ENCRYPTED;
/// The most deltas between a chunk and the whole chunk its chain of bases
/// ends in: what one read of it costs at worst.
pub const MAX_DELTA_DEPTH: usize = 8;
/// File of a repository holding its retention policy, when one was saved
/// (`klon forget --save`, the wizard's "Keep" setting): applied after
/// each backup. Not covered by a checksum; a damaged one is refused.
pub const KEEP_NAME: &str = "keep.json";

/// A saved retention policy: how many snapshots each rule keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keep {
    /// The newest N.
    pub last: u32,
    /// The newest of each of the N latest hours that have one.
    pub hourly: u32,
    /// Days.
    pub daily: u32,
    /// ISO weeks.
    pub weekly: u32,
    /// Months.
    pub monthly: u32,
    /// Years.
    pub yearly: u32,
}

impl Keep {
    /// The policy as `forget` applies it.
    pub fn policy(&self) -> policy::Policy {
        policy::Policy {
            last: self.last,
            hourly: self.hourly,
            daily: self.daily,
            weekly: self.weekly,
            monthly: self.monthly,
            yearly: self.yearly,
        }
    }

    /// Whether no rule keeps anything (no policy).
    pub fn is_empty(&self) -> bool {
        *self == Keep::default()
    }

    /// Parses `last=3,daily=7,weekly=4` (the live job's `keep` key).
    pub fn parse(s: &str) -> std::result::Result<Keep, String> {
        let mut k = Keep::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, n) = part.split_once('=').ok_or_else(|| format!("{part:?}: write RULE=N, e.g. daily=7"))?;
            let n: u32 = n.trim().parse().map_err(|_| format!("{part:?}: N must be a whole number"))?;
            let slot = match name.trim() {
                "last" => &mut k.last,
                "hourly" => &mut k.hourly,
                "daily" => &mut k.daily,
                "weekly" => &mut k.weekly,
                "monthly" => &mut k.monthly,
                "yearly" => &mut k.yearly,
                other => {
                    return Err(format!("{other:?} is not a rule: use last, hourly, daily, weekly, monthly or yearly"));
                }
            };
            *slot = n;
        }
        if k.is_empty() {
            return Err("the policy keeps nothing: give at least one rule, e.g. daily=7".into());
        }
        Ok(k)
    }
}

/// Default window: chunks hold the used bytes of 4 MiB of the disk.
pub const DEFAULT_WINDOW: u32 = 4 << 20;

/// A repository's configuration (`klon-repository.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    /// "klon-repository".
    pub format: String,
    /// 1.
    pub format_version: u32,
    /// 32 hex digits, random: snapshots name the repository they belong to.
    pub id: String,
    /// When it was made (RFC 3339 UTC).
    pub created: String,
    /// Bytes of the disk each chunk covers at most (a power of two, 1 to 8 MiB).
    pub window: u32,
    /// How it is encrypted, when it is (format version 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<crypto::Encryption>,
}

/// A repository, opened.
#[derive(Debug, Clone)]
pub struct Repository {
    /// Its directory.
    pub dir: PathBuf,
    /// Its checked configuration.
    pub config: Config,
    /// Its keys, unlocked (none when it is not encrypted).
    pub keys: crypto::Keys,
    /// The recovery key of an encrypted repository just made: shown once.
    pub recovery_key: Option<String>,
}

/// Whether `dir` holds only what [`Repository::create`] makes before the
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
            "tmp" => inside.iter().all(|i| *i == format!("{CONFIG_NAME}.tmp")),
            _ => false,
        }
    })
}

/// A snapshot in a repository: its id (the blake3 of its file) and what
/// the file says.
#[derive(Debug, Clone)]
pub struct SnapshotEntry {
    /// 64 hex digits.
    pub id: String,
    /// The snapshot file, read and checked (not its table).
    pub file: SnapshotFile,
}

impl SnapshotEntry {
    /// What "newer" means: made later (`sequence`), then started later,
    /// then the greater id.
    pub fn order(&self) -> (u64, i64, &str) {
        (self.file.sequence, self.file.time, &self.id)
    }

    /// The short id people type: the first 8 hex digits.
    pub fn short_id(&self) -> &str {
        &self.id[..8]
    }
}

/// Whether `path` is a repository's directory.
pub fn is_repository(path: &Path) -> bool {
    path.join(CONFIG_NAME).is_file()
}

/// Splits `REPO:SNAPSHOT`: the repository and the snapshot asked for, when
/// `path` names a repository (a path that exists as given is never split).
pub fn split_spec(path: &Path) -> Option<(PathBuf, Option<String>)> {
    if is_repository(path) {
        return Some((path.to_path_buf(), None));
    }
    let s = path.to_str()?;
    let (repo, snap) = s.rsplit_once(':')?;
    (!snap.contains('/') && is_repository(Path::new(repo))).then(|| (PathBuf::from(repo), Some(snap.to_string())))
}

impl Repository {
    /// The directory of packs.
    pub fn packs_dir(&self) -> PathBuf {
        self.dir.join("packs")
    }

    /// The directory of snapshots.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.dir.join("snapshots")
    }

    /// Where unfinished files are written.
    pub fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    /// The directory of locks.
    pub fn locks_dir(&self) -> PathBuf {
        self.dir.join("locks")
    }

    /// Creates a repository in `dir`, which must not exist or be empty
    /// (or hold what a creation cut short left: its empty directories).
    pub fn create(dir: &Path, window: u32) -> Result<Repository> {
        Repository::create_with(dir, window, false)
    }

    /// Creates a repository as [`Repository::create`] does, encrypted when
    /// `encrypt` (its passphrase from [`crypto::passphrase`]; the recovery
    /// key in `recovery_key`, to show once).
    pub fn create_with(dir: &Path, window: u32, encrypt: bool) -> Result<Repository> {
        // Refused before a passphrase is asked for.
        check_creatable(dir, window)?;
        let id = pack::random_hex(16);
        let (encryption, keys, recovery_key) = if encrypt {
            let pass = crypto::passphrase(&format!("the new repository {}", dir.display()), true)?;
            let (enc, keys, recovery) = crypto::create(&pass)?;
            (Some(enc), keys, Some(recovery))
        } else {
            (None, crypto::Keys::none(), None)
        };
        Repository::create_keyed(dir, window, id, encryption, keys, recovery_key)
    }

    /// Creates a repository with the window and the encryption (key
    /// slots and keys) of `like`: the same chunk ids and seals, so `klon
    /// copy` moves records as they are.
    pub fn create_like(dir: &Path, like: &Repository) -> Result<Repository> {
        Repository::create_keyed(
            dir,
            like.config.window,
            pack::random_hex(16),
            like.config.encryption.clone(),
            like.keys.clone(),
            None,
        )
    }

    fn create_keyed(
        dir: &Path,
        window: u32,
        id: String,
        encryption: Option<crypto::Encryption>,
        keys: crypto::Keys,
        recovery_key: Option<String>,
    ) -> Result<Repository> {
        if check_creatable(dir, window)? {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("creating the repository", dir, None, e))?;
        }
        let config = Config {
            format: FORMAT_NAME.into(),
            format_version: if encryption.is_some() { FORMAT_VERSION_ENCRYPTED } else { FORMAT_VERSION },
            id,
            created: crate::image::manifest::now_rfc3339(),
            window,
            encryption,
        };
        if keys.encrypted() {
            crypto::remember(&config.id, &keys);
        }
        let repo = Repository { dir: dir.to_path_buf(), config, keys, recovery_key };
        for d in [repo.packs_dir(), repo.snapshots_dir(), repo.tmp_dir(), repo.locks_dir()] {
            pack::create_dir_synced(&d)?;
        }
        repo.write_config(&format!("{CONFIG_NAME}.tmp"))?;
        Ok(repo)
    }

    /// Writes the configuration through `tmp/NAME`, renamed into place.
    fn write_config(&self, tmp_name: &str) -> Result<()> {
        let mut json = serde_json::to_vec_pretty(&self.config).expect("config serializes");
        json.push(b'\n');
        let tmp = self.tmp_dir().join(tmp_name);
        crate::image::manifest::write_synced(&tmp, &json)?;
        let path = self.dir.join(CONFIG_NAME);
        std::fs::rename(&tmp, &path).map_err(|e| Error::io("renaming into place", &path, None, e))?;
        pack::sync_dir(&self.dir)
    }

    /// Replaces the key slots of an encrypted repository (`klon key`):
    /// under the exclusive lock, the configuration rewritten atomically.
    pub fn set_key_slots(&mut self, slots: Vec<crypto::KeySlot>) -> Result<()> {
        let Some(enc) = self.config.encryption.as_mut() else {
            return Err(Error::Usage(format!("{} is not encrypted", self.dir.display())));
        };
        if slots.is_empty() {
            return Err(Error::Refused("that would leave no key to unlock the repository".into()));
        }
        enc.keys = slots;
        self.write_config(&format!("{CONFIG_NAME}.{}.tmp", std::process::id()))
    }

    /// Opens the repository in `dir` and checks its configuration.
    pub fn open(dir: &Path) -> Result<Repository> {
        Repository::open_with(dir, None)
    }

    /// Opens the repository in `dir` as [`Repository::open`] does; when
    /// it is encrypted, unlocked with `secret` if given (else the
    /// passphrase [`crypto::passphrase`] finds).
    pub fn open_with(dir: &Path, secret: Option<&str>) -> Result<Repository> {
        let path = dir.join(CONFIG_NAME);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::Usage(format!("{} is not a klon repository (no {CONFIG_NAME})", dir.display())));
            }
            Err(e) => return Err(Error::io("reading", &path, None, e)),
        };
        let config: Config = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Corrupt(format!("{}: not a readable repository configuration: {e}", path.display())))?;
        if config.format != FORMAT_NAME {
            return Err(Error::Corrupt(format!("{}: not a klon repository configuration", path.display())));
        }
        if !(FORMAT_VERSION_MIN..=FORMAT_VERSION_MAX).contains(&config.format_version) {
            return Err(Error::Unsupported(format!(
                "{}: repository format version {}; this klon reads versions {FORMAT_VERSION_MIN} to \
                 {FORMAT_VERSION_MAX}: use a newer klon",
                path.display(),
                config.format_version
            )));
        }
        if let Err(why) = check_window(config.window) {
            return Err(Error::Corrupt(format!("{}: {why}", path.display())));
        }
        if pack::decode_hex32(&format!("{:0<64}", config.id)).is_none() || config.id.len() != 32 {
            return Err(Error::Corrupt(format!("{}: the repository id is not 32 hex digits", path.display())));
        }
        let keys = match &config.encryption {
            None if config.format_version >= FORMAT_VERSION_ENCRYPTED => {
                return Err(Error::Corrupt(format!(
                    "{}: format version {} says encrypted, but there is no encryption in it",
                    path.display(),
                    config.format_version
                )));
            }
            None => crypto::Keys::none(),
            Some(_) if config.format_version < FORMAT_VERSION_ENCRYPTED => {
                return Err(Error::Corrupt(format!(
                    "{}: encrypted, but its format version {} is older than encryption (4)",
                    path.display(),
                    config.format_version
                )));
            }
            Some(enc) => match secret {
                Some(s) => {
                    crypto::check_config(enc)
                        .map_err(|why| Error::Unsupported(format!("{}: {why}", path.display())))?;
                    let keys = crypto::unlock(enc, s, &dir.display().to_string())?;
                    // Later opens in this process (the read-back) use them.
                    crypto::remember(&config.id, &keys);
                    keys
                }
                None => crypto::keys_for(&config.id, enc, &dir.display().to_string())?,
            },
        };
        Ok(Repository { dir: dir.to_path_buf(), config, keys, recovery_key: None })
    }

    /// The saved retention policy, if any.
    pub fn keep(&self) -> Result<Option<Keep>> {
        let path = self.dir.join(KEEP_NAME);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice::<Keep>(&b).map(Some).map_err(|e| {
                Error::Corrupt(format!(
                    "{}: not a readable retention policy ({e}): save it again with klon forget --save",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("reading", &path, None, e)),
        }
    }

    /// Saves `keep` as the repository's retention policy.
    pub fn save_keep(&self, keep: &Keep) -> Result<()> {
        let mut json = serde_json::to_vec_pretty(keep).expect("a policy serializes");
        json.push(b'\n');
        let tmp = self.tmp_dir().join(format!("{KEEP_NAME}.{}.tmp", std::process::id()));
        crate::image::manifest::write_synced(&tmp, &json)?;
        let path = self.dir.join(KEEP_NAME);
        std::fs::rename(&tmp, &path).map_err(|e| Error::io("renaming into place", &path, None, e))?;
        pack::sync_dir(&self.dir)
    }

    /// Reads every pack's index. A pack without an index is not part of
    /// the repository yet (a backup was cut short while writing it).
    pub fn load_index(&self) -> Result<BlobIndex> {
        let names = self.pack_names(".idx")?;
        let mut b = self.index_builder(&names);
        for name in &names {
            b.add(&self.pack_index(name)?)?;
        }
        Ok(b.finish())
    }

    /// The index of pack `name`, read, opened and checked.
    pub fn pack_index(&self, name: &str) -> Result<PackIndex> {
        PackIndex::load(&pack::index_path(&self.packs_dir(), name), name, &self.keys)
    }

    /// A builder with room for every entry of the pack indexes `names` at
    /// once (an index file is 56 bytes an entry and a little more), so
    /// that its table is never copied to grow. (Bounded: a damaged index
    /// may say any size; loading refuses it.)
    pub fn index_builder(&self, names: &[String]) -> BlobIndexBuilder {
        let mut chunks = 0u64;
        for name in names {
            let path = pack::index_path(&self.packs_dir(), name);
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            chunks += (len / pack::PACK_ENTRY_LEN as u64).min(1 << 20);
        }
        BlobIndexBuilder::with_capacity(chunks.min(1 << 24) as usize)
    }

    /// The names of the packs having a file ending in `ext` (".pack",
    /// ".idx"), sorted.
    pub fn pack_names(&self, ext: &str) -> Result<Vec<String>> {
        let packs = self.packs_dir();
        let mut names = Vec::new();
        for sub in read_dir_names(&packs)? {
            if sub.len() != 2 {
                continue;
            }
            for f in read_dir_names(&packs.join(&sub))? {
                if let Some(name) = f.strip_suffix(ext)
                    && name.starts_with(&sub)
                    && pack::decode_hex32(name).is_some()
                {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    /// Every snapshot, newest first, each file checked (not its table).
    pub fn snapshots(&self) -> Result<Vec<SnapshotEntry>> {
        let mut out = Vec::new();
        for f in read_dir_names(&self.snapshots_dir())? {
            let Some(id) = f.strip_suffix(".json") else { continue };
            if pack::decode_hex32(id).is_none() {
                continue;
            }
            let file = SnapshotFile::load(self, id)?;
            out.push(SnapshotEntry { id: id.to_string(), file });
        }
        out.sort_by(|a, b| b.order().cmp(&a.order()));
        Ok(out)
    }

    /// The snapshot `spec` names: an id, a unique prefix of one, `latest`,
    /// or none (the latest).
    pub fn resolve(&self, spec: Option<&str>) -> Result<SnapshotEntry> {
        let all = self.snapshots()?;
        let spec = spec.filter(|s| !s.is_empty() && *s != "latest");
        let found: Vec<&SnapshotEntry> = match spec {
            None => all.iter().take(1).collect(),
            Some(p) => all.iter().filter(|s| s.id.starts_with(&p.to_ascii_lowercase())).collect(),
        };
        match (found.as_slice(), spec) {
            ([one], _) => Ok((*one).clone()),
            ([], None) => Err(Error::Usage(format!(
                "the repository {} holds no snapshot yet: back up into it first",
                self.dir.display()
            ))),
            ([], Some(p)) => Err(Error::Usage(format!(
                "no snapshot {p} in {}: `klon snapshots {}` lists them",
                self.dir.display(),
                self.dir.display()
            ))),
            (many, Some(p)) => Err(Error::Usage(format!(
                "{} snapshots start with {p}: give more of the id ({})",
                many.len(),
                many.iter().map(|s| &s.id[..12]).collect::<Vec<_>>().join(", ")
            ))),
            (_, None) => unreachable!("take(1) gives at most one"),
        }
    }
}

/// Checks that a repository can be made in `dir` with `window`: `dir` is
/// missing (returns true), empty, or what a creation cut short left.
fn check_creatable(dir: &Path, window: u32) -> Result<bool> {
    check_window(window).map_err(Error::Usage)?;
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() && !is_unfinished_creation(dir) {
                return Err(Error::Refused(format!(
                    "{} exists and is not empty, and is not a klon repository: give a new directory \
                     (or an existing repository)",
                    dir.display()
                )));
            }
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(Error::io("opening", dir, None, e)),
    }
}

fn check_window(window: u32) -> std::result::Result<(), String> {
    if window.is_power_of_two() && ((1 << 20)..=crate::image::format::CHUNK_SIZE).contains(&window) {
        Ok(())
    } else {
        Err(format!("window {window} is not a power of two from 1 MiB to 8 MiB"))
    }
}

/// The names in a directory, or none when it does not exist.
pub fn read_dir_names(dir: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("listing", dir, None, e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("listing", dir, None, e))?;
        names.push(entry.file_name().to_string_lossy().to_string());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_creation_cut_short_is_created_over_and_anything_else_is_refused() {
        let t = crate::testutil::TempDir::new("repo-create");
        let dir = t.join("r");
        for d in ["packs", "snapshots", "locks", "tmp"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::write(dir.join("tmp").join(format!("{CONFIG_NAME}.tmp")), b"{").unwrap();
        Repository::create(&dir, 4 << 20).unwrap();
        Repository::open(&dir).unwrap();
        let other = t.join("o");
        std::fs::create_dir_all(other.join("packs")).unwrap();
        std::fs::write(other.join("packs").join("a-file"), b"x").unwrap();
        let e = Repository::create(&other, 4 << 20).unwrap_err().to_string();
        assert!(e.contains("is not empty"), "{e}");
        // An encrypted one is refused there too, before any passphrase is
        // asked for (none is given here: asking would fail with Key).
        let e = Repository::create_with(&other, 4 << 20, true).unwrap_err();
        assert!(matches!(e, Error::Refused(_)), "{e}");
    }
}
