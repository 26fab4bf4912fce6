//! One interface for a source of an image: what `klon info`, `verify`,
//! `restore` and the wizard's lists read, whatever kind of image it is.
//!
//! [`open`] is the one place that tells the kinds apart; each kind is one
//! implementation of [`ImageSource`] in a file of its own: klon's own image
//! directory ([`klon::KlonImage`]) and a Clonezilla image directory
//! ([`clonezilla`]). A new kind (a repository's snapshot, a remote store)
//! is a new file here and a line in [`open`] and [`summarize`], not a branch
//! in every command.
//!
//! Opening a source makes every check that needs none of its data (for a
//! klon image: the manifest against its layout, every index), so a restore
//! refuses a bad image before it opens the target.

pub mod clonezilla;
pub mod gocryptfs;
pub mod klon;
pub mod snapshot;

use std::path::{Path, PathBuf};

use super::restore::{RestoreOptions, RestoreReport};
use super::target::check_fits;
use super::verify::VerifyReport;
use crate::device::{Disk, DiskKind};
use crate::engine::feedback::Feedback;
use crate::error::{Error, Result};
use crate::table::DiskLayout;
use crate::units::human_bytes;

/// A source of an image, opened and checked as far as it can be without
/// reading its data.
pub trait ImageSource: Send {
    /// Where the image is, as it was named.
    fn location(&self) -> &Path;

    /// The layout of the disk the image holds.
    fn layout(&self) -> &DiskLayout;

    /// The image in a few words, for confirmations: "the image of Samsung
    /// SSD (500 GB, 3 partitions, made …)".
    fn describe(&self) -> String;

    /// Reads every byte and checks every checksum, touching no disk.
    fn verify(&mut self, workers: usize, feedback: &Feedback) -> Result<VerifyReport>;

    /// Writes the image onto `target`, which passed every refusal
    /// ([`prepare_restore`]) and the person's confirmation.
    fn restore(&mut self, target: &Disk, opts: &RestoreOptions) -> Result<RestoreReport>;

    /// What `klon info` prints: the text, and the JSON for `--json`.
    fn info(&self) -> (String, serde_json::Value);

    /// What a person must know before restoring it (source bytes that were
    /// unreadable, parts of the image klon reads with a caveat).
    fn warnings(&self) -> Vec<String>;

    /// Gets what writing the partitions `only` (all when None) needs and
    /// reading does not, before the person confirms: a Clonezilla image's
    /// LUKS volumes need the passphrase that unlocks their key.
    fn unlock(&mut self, _only: Option<&[u32]>) -> Result<()> {
        Ok(())
    }

    /// For an image of some partitions rather than a disk (Clonezilla's
    /// saveparts): their numbers. Such an image is restored into the same
    /// partitions of a disk whose table is kept.
    fn saved_partitions(&self) -> Option<Vec<u32>> {
        None
    }

    /// Writes partition `number` of the image onto `target` at byte `to`,
    /// and nothing else (the refusals are made before: see
    /// [`prepare_partition_restore`]).
    fn restore_partition(
        &mut self,
        number: u32,
        target: &Disk,
        to: u64,
        opts: &RestoreOptions,
    ) -> Result<RestoreReport>;

    /// The image as a store of chunks read at random (a restore that lays
    /// the partitions out anew reads its filesystems that way), sharing
    /// what this one holds open: its indexes, and a snapshot's lock. None
    /// for an image whose chunks klon cannot find at random (Clonezilla's
    /// partclone files have no index).
    fn random_access(&self) -> Option<Box<dyn crate::image::ChunkStore + Send>> {
        None
    }
}

/// Opens the image at `path`, whatever its kind, for `job` ("restore",
/// "verify", …: a repository's snapshot is held under a lock of that name
/// while open; warnings go to `feedback`), with every check that needs no
/// data made.
pub fn open(path: &Path, job: &str, feedback: &Feedback) -> Result<Box<dyn ImageSource>> {
    if let Some((repo, spec)) = crate::repo::split_spec(path) {
        Ok(Box::new(snapshot::SnapshotImage::open(&repo, spec.as_deref(), job, feedback)?))
    } else if gocryptfs::is_encrypted(path) {
        Ok(Box::new(gocryptfs::open(path)?))
    } else if crate::clonezilla::is_clonezilla_image(path) {
        Ok(Box::new(crate::engine::czimage::CzSource::open(path)?))
    } else {
        Ok(Box::new(klon::KlonImage::open(path)?))
    }
}

/// Whether `path` looks like an image directory of any kind klon reads
/// (complete or not), for listing a drive's images.
pub fn looks_like_image(path: &Path) -> bool {
    path.is_dir()
        && (klon::looks_like_klon_image(path)
            || crate::clonezilla::is_clonezilla_image(path)
            || gocryptfs::is_encrypted(path)
            || crate::repo::is_repository(path))
}

/// An image as a list shows it, read cheaply (no data, no index).
#[derive(Debug, Clone)]
pub struct Summary {
    /// "Clonezilla" for other kinds than klon's own, else None.
    pub kind: Option<&'static str>,
    /// The source disk: model, or the path it was read from.
    pub source: String,
    /// Source disk size.
    pub disk_size: u64,
    /// Source disk's logical sector size.
    pub sector_size: u32,
    /// When it was made (UTC, "YYYY-MM-DD HH:MM"), when known.
    pub created: Option<String>,
    /// Bytes the image takes.
    pub image_bytes: u64,
    /// Its state: "complete, verified OK …", "3 partition images, checked
    /// as they are read".
    pub state: String,
}

/// Reads what a list shows of the image at `path`, cheaply.
pub fn summarize(path: &Path) -> Result<Summary> {
    if let Some((repo, spec)) = crate::repo::split_spec(path) {
        snapshot::summarize(&repo, spec.as_deref())
    } else if gocryptfs::is_encrypted(path) {
        gocryptfs::summarize(path)
    } else if crate::clonezilla::is_clonezilla_image(path) {
        clonezilla::summarize(path)
    } else {
        klon::summarize(path)
    }
}

/// Verifies the image at `path`, whatever its kind. A klon image keeps the
/// outcome (for the wizard's list), also when it cannot be opened.
pub fn verify(path: &Path, workers: usize, feedback: &Feedback) -> Result<VerifyReport> {
    let result = open(path, "verify", feedback).and_then(|mut s| s.verify(workers, feedback));
    if let Err(e) = &result
        && !matches!(e, Error::Cancelled(_))
        && !gocryptfs::is_encrypted(path)
    {
        // Nothing is recorded outside a klon image's own directory.
        klon::record_failure_to_open(path, &result);
    }
    result
}

/// The directory that holds the data of the image at `image` (a path or
/// `REPO[:SNAPSHOT]`): a snapshot's repository, or the image's own
/// directory. A restore's target inside it is refused.
pub(crate) fn data_dir(image: &Path) -> PathBuf {
    crate::repo::split_spec(image).map_or_else(|| image.to_path_buf(), |(repo, _)| repo)
}

/// A restore that passed every check and is ready to write.
pub struct RestorePlan {
    /// The image, opened and checked.
    pub source: Box<dyn ImageSource>,
    /// The opened target (exclusively, for block devices).
    pub target: Disk,
    /// For a restore of partitions rather than of the whole disk: each one's
    /// number in the image, and where it goes on the target (bytes from the
    /// target's start). Empty for a whole disk.
    pub partitions: Vec<(u32, u64)>,
    /// For a whole disk whose partitions are laid out anew (onto a smaller
    /// disk, or `--grow-all`): where each goes.
    pub relayout: Option<super::relayout::Relayout>,
}

impl std::fmt::Debug for RestorePlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestorePlan")
            .field("source", &self.source.location())
            .field("target", &self.target.path)
            .finish()
    }
}

/// Opens and checks the image at `image` (everything that needs no data),
/// then opens the target and refuses, before anything is written, a target
/// that is too small, has another sector size, is in use, or holds the
/// image. A missing target path becomes a file of the source's size.
/// A repository's snapshot stays held (see [`open`]) until the plan is
/// dropped; warnings go to `feedback`.
pub fn prepare_restore(image: &Path, target: &Path, feedback: &Feedback) -> Result<RestorePlan> {
    prepare_restore_fit(image, target, false, feedback)
}

/// [`prepare_restore`]; with `grow_all`, on a larger target every
/// partition whose filesystem klon grows takes a share of the new room
/// (see [`super::relayout::Fit::GrowAll`]).
pub fn prepare_restore_fit(image: &Path, target: &Path, grow_all: bool, feedback: &Feedback) -> Result<RestorePlan> {
    let mut source = open(image, "restore", feedback)?;
    if let Some(saved) = source.saved_partitions() {
        return prepare_partitions(source, image, target, &saved.iter().map(|&n| (n, Some(n))).collect::<Vec<_>>());
    }
    // A relayout is planned on the image opened (through its
    // `random_access`), not on `image` opened again: a repository's
    // `latest` could name a snapshot made since.
    let layout = source.layout();
    let mut target = Disk::open_target(target, Some(layout.disk_size))?;
    use super::relayout::{Fit, plan};
    // A block device of another sector size: its GPT is written anew.
    let converts = target.kind == DiskKind::BlockDevice
        && layout.kind != crate::table::TableKind::None
        && target.logical_sector_size != layout.sector_size;
    let relayout = if converts {
        let fit = if target.size < layout.disk_size {
            Fit::Shrink
        } else if grow_all && target.size > layout.disk_size {
            Fit::GrowAll
        } else {
            Fit::Keep
        };
        Some(plan(source.as_ref(), &target, fit)?)
    } else if target.size < layout.disk_size {
        // The sector sizes must still agree.
        check_fits(&mut target, 0, layout.sector_size)?;
        Some(plan(source.as_ref(), &target, Fit::Shrink)?)
    } else if grow_all && target.size > layout.disk_size {
        check_fits(&mut target, layout.disk_size, layout.sector_size)?;
        Some(plan(source.as_ref(), &target, Fit::GrowAll)?)
    } else {
        check_fits(&mut target, layout.disk_size, layout.sector_size)?;
        None
    };
    crate::device::safety::check_target(&target, None, Some(&data_dir(image)))?;
    source.unlock(None)?;
    target.enable_direct_reads();
    Ok(RestorePlan { source, target, partitions: Vec::new(), relayout })
}

/// Prepares the restore of partition `number` of the image at `image`
/// onto `target`: the target is that partition's new place (a partition,
/// a logical volume, a file), or with `onto` a disk whose table is kept
/// and whose partition `onto` takes it. Refused before anything is
/// written: a partition the image does not have, a place smaller than it,
/// another sector size, a target in use or holding the image. A missing
/// target path (without `onto`) becomes a file of the partition's size.
pub fn prepare_partition_restore(
    image: &Path,
    target: &Path,
    number: u32,
    onto: Option<u32>,
    feedback: &Feedback,
) -> Result<RestorePlan> {
    prepare_partitions(open(image, "restore", feedback)?, image, target, &[(number, onto)])
}

/// Prepares the restore of the partitions `wanted` (number in the image,
/// and the number of the partition of the target that receives it, or None
/// for the target itself) of `source`, with the refusals of
/// [`prepare_partition_restore`] for each.
fn prepare_partitions(
    mut source: Box<dyn ImageSource>,
    image: &Path,
    target: &Path,
    wanted: &[(u32, Option<u32>)],
) -> Result<RestorePlan> {
    let layout = source.layout().clone();
    let mut parts = Vec::new();
    for &(number, _) in wanted {
        let Some(part) = layout.partitions.iter().find(|p| p.number == number).cloned() else {
            let have: Vec<String> = layout.partitions.iter().map(|p| p.number.to_string()).collect();
            return Err(Error::Usage(format!(
                "the image at {} has no partition {number} (it has {})",
                image.display(),
                if have.is_empty() { "none".to_string() } else { have.join(", ") }
            )));
        };
        parts.push(part);
    }
    let create = match wanted {
        [(_, None)] => Some(parts[0].size),
        _ => None,
    };
    let mut target = Disk::open_target(target, create)?;
    let target_layout =
        if wanted.iter().any(|w| w.1.is_some()) { Some(crate::table::read_layout(&target)?) } else { None };
    let mut placed = Vec::new();
    for (&(number, onto), part) in wanted.iter().zip(&parts) {
        let (to, room, place) = match (onto, &target_layout) {
            (Some(m), Some(tl)) => {
                let Some(tp) = tl.partitions.iter().find(|p| p.number == m) else {
                    return Err(Error::Refused(format!(
                        "{} has no partition {m} in its partition table; nothing was written",
                        target.path.display()
                    )));
                };
                (tp.start, tp.size, format!("partition {m} of {}", target.path.display()))
            }
            _ => (0, target.size, target.path.display().to_string()),
        };
        if room < part.size {
            return Err(Error::Refused(format!(
                "partition {number} of the image needs {} ({} bytes), {place} has {} ({room} bytes); nothing was written",
                human_bytes(part.size),
                part.size,
                human_bytes(room)
            )));
        }
        placed.push((number, to));
    }
    if target.kind == DiskKind::BlockDevice && target.logical_sector_size != layout.sector_size {
        return Err(Error::Refused(format!(
            "{} has {}-byte sectors, the image's disk had {}-byte sectors: a filesystem made for one \
             may not mount on the other; nothing was written",
            target.path.display(),
            target.logical_sector_size,
            layout.sector_size
        )));
    }
    crate::device::safety::check_target(&target, None, Some(&data_dir(image)))?;
    source.unlock(Some(&wanted.iter().map(|w| w.0).collect::<Vec<_>>()))?;
    target.enable_direct_reads();
    Ok(RestorePlan { source, target, partitions: placed, relayout: None })
}

impl RestorePlan {
    /// One paragraph saying what will be overwritten, for confirmations.
    pub fn describe(&self) -> String {
        let what = match self.target.kind {
            DiskKind::BlockDevice => "disk",
            DiskKind::File => "file",
        };
        let mut text = if self.partitions.is_empty() {
            format!(
                "Everything on {what} {} ({}) will be overwritten with {}.",
                self.target.path.display(),
                human_bytes(self.target.size),
                self.source.describe()
            )
        } else {
            let places: Vec<String> =
                self.partitions.iter().map(|(n, to)| format!("partition {n} at byte {to}")).collect();
            format!(
                "Parts of {what} {} ({}) will be overwritten with {} of {}; the rest of it is left as it is.",
                self.target.path.display(),
                human_bytes(self.target.size),
                places.join(", "),
                self.source.describe()
            )
        };
        if let Some(r) = &self.relayout {
            text += &format!("\n{}", r.describe());
        }
        let held = super::target::holdings(&self.target);
        if !held.is_empty() {
            text += &format!("\n{held}");
        }
        for w in self.source.warnings() {
            text += &format!("\nNote: {w}.");
        }
        text
    }

    /// Writes the image onto the target. The caller has confirmed.
    pub fn restore(self, opts: &RestoreOptions) -> Result<RestoreReport> {
        let RestorePlan { mut source, target, partitions, relayout } = self;
        if let Some(r) = relayout {
            return r.restore(&target, opts);
        }
        if partitions.is_empty() {
            return source.restore(&target, opts);
        }
        let started = std::time::Instant::now();
        let mut total: Option<RestoreReport> = None;
        for (n, to) in partitions {
            let r = source.restore_partition(n, &target, to, opts)?;
            total = Some(match total {
                None => r,
                Some(t) => RestoreReport { bytes_written: t.bytes_written + r.bytes_written, ..t },
            });
        }
        let mut report = total.expect("at least one partition");
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }
}
