//! `klon restore IMAGE TARGET --volume VG/LV`: one logical volume of an
//! image of an LVM2 host (a linear volume, a thin volume or snapshot —
//! a virtual machine's disk) written onto a disk or a file of its own,
//! read from the image through its chunk index as `klon mount` reads it
//! (each chunk's checksums checked; a thin volume's unmapped blocks are
//! zeros), then read back and compared.

use std::path::Path;
use std::time::Instant;

use super::mount::{DiskView, MountFile, files, open_store};
use crate::device::Disk;
use crate::engine::feedback::Feedback;
use crate::error::{Error, Result};
use crate::units::human_bytes;

/// Bytes copied at a time.
const STEP: u64 = 8 << 20;

/// A volume restore, its checks passed, waiting for confirmation.
pub struct VolumePlan {
    view: DiskView,
    file: MountFile,
    /// The target, open for writing.
    pub target: Disk,
    /// The volume as the person named it.
    pub name: String,
}

/// What a volume restore did.
#[derive(Debug)]
pub struct VolumeReport {
    /// Bytes written (the volume's size).
    pub bytes_written: u64,
    /// Whether the read-back compared every byte.
    pub verified: bool,
    /// Seconds it took.
    pub seconds: f64,
}

/// The mount file of volume `name` of `view` ("VG/LV", "LV" when only
/// one group has it, or its file name as `klon mount` shows it).
fn find(view: &DiskView, name: &str) -> Result<MountFile> {
    let all: Vec<MountFile> = files(view).into_iter().filter(|f| f.pieces.is_some()).collect();
    let dm = |s: &str| s.replace('-', "--");
    let wanted = match name.split_once('/') {
        Some((vg, lv)) => vec![format!("{}-{}.img", dm(vg), dm(lv))],
        None => all
            .iter()
            .filter(|f| f.name.ends_with(&format!("-{}.img", dm(name))) || f.name == name)
            .map(|f| f.name.clone())
            .collect(),
    };
    let names: Vec<&str> = all.iter().map(|f| f.name.trim_end_matches(".img")).collect();
    match &wanted[..] {
        [one] => all.iter().find(|f| f.name == *one).cloned().ok_or_else(|| {
            Error::Usage(format!(
                "{} has no logical volume {name} that klon can read back (it has: {})",
                view.location().display(),
                if names.is_empty() { "none".to_string() } else { names.join(", ") }
            ))
        }),
        [] => Err(Error::Usage(format!(
            "{} has no logical volume {name} that klon can read back (it has: {})",
            view.location().display(),
            if names.is_empty() { "none".to_string() } else { names.join(", ") }
        ))),
        _ => Err(Error::Usage(format!("{name} names volumes of several groups ({}): give VG/LV", wanted.join(", ")))),
    }
}

/// Opens the image (a klon image or a repository's snapshot) and the
/// target, and refuses before anything is written what cannot be done: no
/// such volume, a target too small or with other sectors, in use, or
/// holding the image.
/// A repository's snapshot stays held until the plan is dropped (see
/// [`open_store`]); warnings go to `feedback`.
pub fn prepare(image: &Path, target: &Path, name: &str, feedback: &Feedback) -> Result<VolumePlan> {
    let view = DiskView::new(open_store(image, "restore", feedback)?)?;
    let file = find(&view, name)?;
    let mut target = Disk::open_target(target, Some(file.size))?;
    let image_dir = Some(super::source::data_dir(image));
    crate::device::safety::check_target(&target, None, image_dir.as_deref())?;
    super::target::check_fits(&mut target, file.size, view.manifest().layout.sector_size)?;
    Ok(VolumePlan { view, file, target, name: name.to_string() })
}

impl VolumePlan {
    /// What will be overwritten, for the confirmation.
    pub fn describe(&self) -> String {
        let held = super::target::holdings(&self.target);
        format!(
            "{} ({}) will be overwritten with logical volume {} ({}) of {}.{}{held}",
            self.target.path.display(),
            human_bytes(self.target.size),
            self.name,
            human_bytes(self.file.size),
            self.view.location().display(),
            if held.is_empty() { "" } else { "\n" }
        )
    }

    /// Writes the volume, syncs, and (with `verify_after`) reads it back
    /// and compares.
    pub fn restore(self, verify_after: bool, feedback: &Feedback) -> Result<VolumeReport> {
        let started = Instant::now();
        let size = self.file.size;
        let pieces = self.file.pieces.as_deref().unwrap_or_default();
        let volume = crate::fs::Volume { disk: &self.view, start: self.file.start, len: size, pieces };
        let read = |buf: &mut [u8], at: u64| -> Result<()> {
            if pieces.is_empty() {
                // Nothing mapped: zeros (a volume without pieces would be
                // the bytes at its start).
                buf.fill(0);
                return Ok(());
            }
            volume.read_at(buf, at).map_err(|e| match e {
                crate::fs::FsError::Io(e) => e,
                other => Error::Corrupt(format!("logical volume {}: {other}", self.name)),
            })
        };
        let mut buf = vec![0u8; STEP as usize];
        let mut at = 0;
        let mut progress = feedback.meter("restore", size, Vec::new());
        while at < size {
            super::cancel::check("the restore of the volume")?;
            let n = STEP.min(size - at) as usize;
            read(&mut buf[..n], at)?;
            self.target.write_all_at(&buf[..n], at)?;
            at += n as u64;
            progress.add(n as u64);
        }
        progress.finish();
        self.target.sync()?;
        if verify_after {
            self.target.drop_cache()?;
            let mut back = vec![0u8; STEP as usize];
            let mut at = 0;
            while at < size {
                super::cancel::check("the read-back of the volume")?;
                let n = STEP.min(size - at) as usize;
                read(&mut buf[..n], at)?;
                self.target.read_exact_at(&mut back[..n], at)?;
                if let Some(i) = buf[..n].iter().zip(&back[..n]).position(|(a, b)| a != b) {
                    return Err(Error::VerifyAfter(format!(
                        "{}: byte {} of logical volume {} reads back differently from what was written",
                        self.target.path.display(),
                        at + i as u64,
                        self.name
                    )));
                }
                at += n as u64;
            }
        }
        self.target.keep_created();
        Ok(VolumeReport { bytes_written: size, verified: verify_after, seconds: started.elapsed().as_secs_f64() })
    }
}
