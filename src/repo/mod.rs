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
pub mod s3;
pub mod snapshot;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::engine::feedback::Feedback;
use crate::error::{Error, Result};
pub use index::{BlobIndex, BlobIndexBuilder};
use pack::PackIndex;
use snapshot::SnapshotFile;
use store::Store;

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
    /// Where it is, as given: its directory, or its `s3://` address.
    pub dir: PathBuf,
    /// What holds its files.
    pub store: Arc<dyn Store>,
    /// Its checked configuration.
    pub config: Config,
    /// Its keys, unlocked (none when it is not encrypted).
    pub keys: crypto::Keys,
    /// The recovery key of an encrypted repository just made: shown once.
    pub recovery_key: Option<String>,
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

/// Whether `path` is a repository: a directory holding one, or an
/// `s3://` address (whether one is there is found out when it is opened).
pub fn is_repository(path: &Path) -> bool {
    store::is_remote(path) || path.join(CONFIG_NAME).is_file()
}

/// Splits `REPO:SNAPSHOT`: the repository and the snapshot asked for, when
/// `path` names a repository (a path that exists as given is never split).
pub fn split_spec(path: &Path) -> Option<(PathBuf, Option<String>)> {
    let s = path.to_str();
    if let Some(url) = s.filter(|_| store::is_remote(path)) {
        return Some(match url["s3://".len()..].rsplit_once(':') {
            Some((repo, snap)) if !snap.contains('/') => {
                (PathBuf::from(format!("s3://{repo}")), Some(snap.to_string()))
            }
            _ => (path.to_path_buf(), None),
        });
    }
    if is_repository(path) {
        return Some((path.to_path_buf(), None));
    }
    let (repo, snap) = s?.rsplit_once(':')?;
    (!snap.contains('/') && is_repository(Path::new(repo))).then(|| (PathBuf::from(repo), Some(snap.to_string())))
}

/// Whether a repository is at `path` (its configuration is there): for
/// an `s3://` address, asked of the store.
pub fn exists(path: &Path) -> Result<bool> {
    if !store::is_remote(path) {
        return Ok(is_repository(path));
    }
    Ok(store::open(path)?.size(CONFIG_NAME)?.is_some())
}

/// The largest configuration or retention policy klon reads.
const CONFIG_MAX: u64 = 1 << 20;

impl Repository {
    /// Takes a lock on the repository for `job` (see [`lock`]); exclusive
    /// for jobs that delete. Held until the lock is dropped. A stale lock
    /// it removes (of a process that is gone) is said through `feedback`.
    pub fn lock(&self, job: &str, exclusive: bool, feedback: &Feedback) -> Result<lock::Lock> {
        lock::take(&self.store, job, exclusive, feedback)
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
        let store = store::open(dir)?;
        check_creatable(&*store, window)?;
        let id = pack::random_hex(16);
        let (encryption, keys, recovery_key) = if encrypt {
            let pass = crypto::passphrase(&format!("the new repository {}", dir.display()), true)?;
            let (enc, keys, recovery) = crypto::create(&pass)?;
            (Some(enc), keys, Some(recovery))
        } else {
            (None, crypto::Keys::none(), None)
        };
        Repository::create_keyed(dir, store, window, id, encryption, keys, recovery_key)
    }

    /// Creates a repository with the window and the encryption (key
    /// slots and keys) of `like`: the same chunk ids and seals, so `klon
    /// copy` moves records as they are.
    pub fn create_like(dir: &Path, like: &Repository) -> Result<Repository> {
        Repository::create_keyed(
            dir,
            store::open(dir)?,
            like.config.window,
            pack::random_hex(16),
            like.config.encryption.clone(),
            like.keys.clone(),
            None,
        )
    }

    fn create_keyed(
        dir: &Path,
        store: Arc<dyn Store>,
        window: u32,
        id: String,
        encryption: Option<crypto::Encryption>,
        keys: crypto::Keys,
        recovery_key: Option<String>,
    ) -> Result<Repository> {
        check_creatable(&*store, window)?;
        store.prepare()?;
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
        let repo = Repository { dir: dir.to_path_buf(), store, config, keys, recovery_key };
        repo.write_config()?;
        Ok(repo)
    }

    /// Writes the configuration (atomically: the old one or the new one).
    fn write_config(&self) -> Result<()> {
        let mut json = serde_json::to_vec_pretty(&self.config).expect("config serializes");
        json.push(b'\n');
        self.store.write(CONFIG_NAME, &json)
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
        self.write_config()
    }

    /// Opens the repository in `dir` and checks its configuration.
    pub fn open(dir: &Path) -> Result<Repository> {
        Repository::open_with(dir, None)
    }

    /// Opens the repository in `dir` as [`Repository::open`] does; when
    /// it is encrypted, unlocked with `secret` if given (else the
    /// passphrase [`crypto::passphrase`] finds).
    pub fn open_with(dir: &Path, secret: Option<&str>) -> Result<Repository> {
        let store = store::open(dir)?;
        let path = PathBuf::from(store.locate(CONFIG_NAME));
        let Some(bytes) = store.read(CONFIG_NAME, CONFIG_MAX)? else {
            return Err(Error::Usage(format!("{} is not a klon repository (no {CONFIG_NAME})", dir.display())));
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
        Ok(Repository { dir: dir.to_path_buf(), store, config, keys, recovery_key: None })
    }

    /// The saved retention policy, if any.
    pub fn keep(&self) -> Result<Option<Keep>> {
        let Some(b) = self.store.read(KEEP_NAME, CONFIG_MAX)? else { return Ok(None) };
        serde_json::from_slice::<Keep>(&b).map(Some).map_err(|e| {
            Error::Corrupt(format!(
                "{}: not a readable retention policy ({e}): save it again with klon forget --save",
                self.store.locate(KEEP_NAME)
            ))
        })
    }

    /// Saves `keep` as the repository's retention policy.
    pub fn save_keep(&self, keep: &Keep) -> Result<()> {
        let mut json = serde_json::to_vec_pretty(keep).expect("a policy serializes");
        json.push(b'\n');
        self.store.write(KEEP_NAME, &json)
    }

    /// Reads every pack's index. A pack without an index is not part of
    /// the repository yet (a backup was cut short while writing it).
    pub fn load_index(&self) -> Result<BlobIndex> {
        let names = self.pack_names(".idx")?;
        let mut b = self.index_builder(&names);
        for (name, _) in &names {
            b.add(&self.pack_index(name)?)?;
        }
        Ok(b.finish())
    }

    /// The index of pack `name`, read, opened and checked.
    pub fn pack_index(&self, name: &str) -> Result<PackIndex> {
        PackIndex::load(&*self.store, name, &self.keys)
    }

    /// A builder with room for every entry of the pack indexes `names` at
    /// once (an index file is 56 bytes an entry and a little more), so
    /// that its table is never copied to grow. (Bounded: a damaged index
    /// may say any size; loading refuses it.)
    pub fn index_builder(&self, indexes: &[(String, u64)]) -> BlobIndexBuilder {
        let mut chunks = 0u64;
        for (_, len) in indexes {
            chunks += (len / pack::PACK_ENTRY_LEN as u64).min(1 << 20);
        }
        BlobIndexBuilder::with_capacity(chunks.min(1 << 24) as usize)
    }

    /// The names of the packs having a file ending in `ext` (".pack",
    /// ".idx"), sorted, with the sizes of those files.
    pub fn pack_names(&self, ext: &str) -> Result<Vec<(String, u64)>> {
        let mut names = Vec::new();
        for (f, size) in self.store.list("packs")? {
            let Some((sub, file)) = f.strip_prefix("packs/").and_then(|f| f.split_once('/')) else { continue };
            if let Some(name) = file.strip_suffix(ext)
                && sub.len() == 2
                && name.starts_with(sub)
                && pack::decode_hex32(name).is_some()
            {
                names.push((name.to_string(), size));
            }
        }
        names.sort();
        Ok(names)
    }

    /// The names of the files in `snapshots/`.
    pub fn snapshot_files(&self) -> Result<Vec<String>> {
        let files = self.store.list("snapshots")?;
        Ok(files.into_iter().filter_map(|(f, _)| f.strip_prefix("snapshots/").map(str::to_string)).collect())
    }

    /// Every snapshot, newest first, each file checked (not its table).
    pub fn snapshots(&self) -> Result<Vec<SnapshotEntry>> {
        let mut out = Vec::new();
        for f in self.snapshot_files()? {
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

/// Checks that a repository can be made in `store` with `window`: the
/// store is missing, empty, or holds what a creation cut short left.
fn check_creatable(store: &dyn Store, window: u32) -> Result<()> {
    check_window(window).map_err(Error::Usage)?;
    if !store.is_empty_for_creation()? {
        return Err(Error::Refused(format!(
            "{} exists and is not empty, and is not a klon repository: give a new directory \
             (or an existing repository)",
            store.location()
        )));
    }
    Ok(())
}

fn check_window(window: u32) -> std::result::Result<(), String> {
    if window.is_power_of_two() && ((1 << 20)..=crate::image::format::CHUNK_SIZE).contains(&window) {
        Ok(())
    } else {
        Err(format!("window {window} is not a power of two from 1 MiB to 8 MiB"))
    }
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
