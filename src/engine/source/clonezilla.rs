//! A Clonezilla image directory as an [`ImageSource`]: the streams
//! `engine::czimage` makes of it.

use std::path::Path;

use super::{ImageSource, Summary};
use crate::clonezilla::{CzImage, CzVolumeContent};
use crate::device::Disk;
use crate::engine::czimage::{self, CzSource};
use crate::engine::feedback::Feedback;
use crate::engine::restore::{RestoreOptions, RestoreReport};
use crate::engine::verify::VerifyReport;
use crate::error::Result;
use crate::image::reader::describe_stream;
use crate::table::DiskLayout;
use crate::units::human_bytes;

impl ImageSource for CzSource {
    fn location(&self) -> &Path {
        &self.image.dir
    }

    fn layout(&self) -> &DiskLayout {
        &self.image.layout
    }

    fn describe(&self) -> String {
        let im = &self.image;
        format!(
            "the Clonezilla image of {} ({}, {} partitions) in {}",
            im.disk,
            human_bytes(im.layout.disk_size),
            im.layout.partitions.len(),
            im.dir.display()
        )
    }

    fn verify(&mut self, _workers: usize, feedback: &Feedback) -> Result<VerifyReport> {
        czimage::verify(self, feedback)
    }

    fn restore(&mut self, target: &Disk, opts: &RestoreOptions) -> Result<RestoreReport> {
        czimage::restore(self, target, opts)
    }

    fn warnings(&self) -> Vec<String> {
        self.image.warnings.clone()
    }

    fn unlock(&mut self, only: Option<&[u32]>) -> Result<()> {
        CzSource::unlock(self, only)
    }

    fn saved_partitions(&self) -> Option<Vec<u32>> {
        let im = &self.image;
        im.saveparts.then(|| {
            let mut n: Vec<u32> = im.partitions.iter().map(|p| p.number).collect();
            n.extend(im.luks.iter().map(|v| v.number).chain(im.lvm.iter().map(|g| g.partition)));
            n.sort_unstable();
            n
        })
    }

    fn restore_partition(
        &mut self,
        number: u32,
        target: &Disk,
        to: u64,
        opts: &RestoreOptions,
    ) -> Result<RestoreReport> {
        czimage::restore_partition(self, number, target, to, opts)
    }

    fn info(&self) -> (String, serde_json::Value) {
        let im = &self.image;
        let json = serde_json::json!({
            "image": im.dir,
            "format": "clonezilla",
            "saveparts": im.saveparts,
            "disk": im.disk,
            "layout": im.layout,
            "streams": self.stream_infos(),
            "partition_images": image_files(im).map(|p| serde_json::json!({
                "partition": p.number, "device": p.device, "fs": p.fs,
                "kind": format!("{:?}", p.kind).to_lowercase(), "codec": format!("{:?}", p.codec).to_lowercase(),
                "pieces": p.pieces, "bytes": pieces_bytes(&p.pieces),
            })).collect::<Vec<_>>(),
            "checksum_files": im.checksum_files,
            "warnings": im.warnings,
        });
        (render_cz_info(self), json)
    }
}

fn pieces_bytes(pieces: &[std::path::PathBuf]) -> u64 {
    pieces.iter().map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0)).sum()
}

/// What a list shows of a Clonezilla image: its description files only
/// (reading every partition image's header would slow the list down).
pub fn summarize(dir: &Path) -> Result<Summary> {
    let im = CzImage::open(dir)?;
    let bytes: u64 = image_files(&im).map(|p| pieces_bytes(&p.pieces)).sum();
    Ok(Summary {
        kind: Some("Clonezilla"),
        source: im.disk.clone(),
        disk_size: im.layout.disk_size,
        sector_size: im.layout.sector_size,
        created: None,
        image_bytes: bytes,
        state: format!("{} partition images, checked as they are read", image_files(&im).count()),
    })
}

/// Every partition image file set of a Clonezilla image, logical volumes'
/// included.
fn image_files(im: &CzImage) -> impl Iterator<Item = &crate::clonezilla::CzPartition> {
    let volumes = im.lvm.iter().flat_map(|g| g.volumes.iter()).filter_map(|v| match &v.content {
        CzVolumeContent::Image(p) => Some(p),
        CzVolumeContent::Swap(_) => None,
    });
    im.partitions.iter().chain(volumes).chain(im.luks.iter().map(|v| &v.inner))
}

/// The text `klon info` prints for a Clonezilla image.
fn render_cz_info(src: &CzSource) -> String {
    use std::fmt::Write as _;
    let im = &src.image;
    let mut o = String::new();
    let what = if im.saveparts { "Clonezilla, saveparts: partitions, not a disk" } else { "Clonezilla" };
    let _ = writeln!(o, "Image:        {} ({what})", im.dir.display());
    let _ = writeln!(
        o,
        "Source:       {} — {}, {} bytes, {}-byte sectors",
        im.disk,
        human_bytes(im.layout.disk_size),
        im.layout.disk_size,
        im.layout.sector_size
    );
    let _ = writeln!(
        o,
        "Table:        {}{}",
        im.layout.kind,
        im.layout.disk_id.as_deref().map(|x| format!(", disk id {x}")).unwrap_or_default()
    );
    let _ = writeln!(o, "Streams:");
    for st in src.stream_infos() {
        let _ = writeln!(
            o,
            "  {:<24} start {:>14}  size {:>10}  {}",
            describe_stream(&st),
            st.start,
            human_bytes(st.length),
            st.fs.as_ref().map(|f| f.fstype.as_str()).unwrap_or("-")
        );
        let _ = writeln!(o, "  {:<24} {}; {} stored", "", st.method_reason, human_bytes(st.stored_bytes));
        if let Some(vg) = &st.lvm {
            super::klon::render_lvm(&mut o, vg);
        }
        let volumes = im.lvm.iter().filter(|g| Some(g.partition) == st.partition).flat_map(|g| g.volumes.iter());
        let luks = im.luks.iter().filter(|v| Some(v.number) == st.partition).map(|v| &v.inner);
        let images = im
            .partitions
            .iter()
            .filter(|p| Some(p.number) == st.partition)
            .chain(volumes.filter_map(|v| match &v.content {
                CzVolumeContent::Image(p) => Some(p),
                CzVolumeContent::Swap(_) => None,
            }))
            .chain(luks);
        for p in images {
            let bytes = pieces_bytes(&p.pieces);
            let names: Vec<String> =
                p.pieces.iter().map(|f| f.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
            let shown = if names.len() > 3 {
                format!("{} … {} ({} pieces)", names[0], names[names.len() - 1], names.len())
            } else {
                names.join(", ")
            };
            let _ = writeln!(o, "  {:<24} {:?}-compressed, {}: {shown}", "", p.codec, human_bytes(bytes));
        }
    }
    if im.checksum_files.is_empty() {
        let _ = writeln!(o, "Checksums:    partclone's own (no checksum files)");
    } else {
        let names: Vec<String> = im
            .checksum_files
            .iter()
            .map(|f| f.file_name().unwrap_or_default().to_string_lossy().into_owned())
            .collect();
        let _ = writeln!(o, "Checksums:    partclone's own, and {}", names.join(", "));
    }
    for w in &im.warnings {
        let _ = writeln!(o, "Note:         {w}");
    }
    let _ = writeln!(o, "Verified:     run klon verify (reads every byte; nothing is written to the image)");
    o
}
