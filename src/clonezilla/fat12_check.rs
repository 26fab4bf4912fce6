//! A check of partclone's FAT12 images against the FAT they hold.
//!
//! partclone.fat up to at least 0.3.36 (Debian 12's 0.3.23 and Debian 13's
//! 0.3.36 among them) reads a FAT12 table two bytes per entry and shifts
//! out four bits, where FAT12 packs two 12-bit entries into three bytes
//! (partclone's issue #268, fixed by its pull request #269 in April 2025).
//! Its bitmap then marks the wrong clusters: most clusters of files and
//! directories are not in the image, and every restore of it (partclone's,
//! Clonezilla's, klon's) gives a filesystem whose files hold zeros.
//!
//! The image always holds the FAT itself (partclone marks the reserved
//! sectors, the FATs and the root directory used), and it comes first in
//! the stream: [`Fat12Check`] collects those bytes as they pass, reads the
//! FAT with klon's own reader ([`crate::fs::fat`]) and names the clusters
//! in use that partclone's bitmap leaves out, before any data cluster is
//! handed on.

use crate::fs::fat;

/// Most metadata bytes (reserved sectors and FATs) collected: FAT12 FATs
/// are at most 6 KiB each; more means an odd volume, left unchecked.
const MAX_META: u64 = 4 << 20;

/// What the check found.
#[derive(Debug, PartialEq, Eq)]
pub struct Missing {
    /// Clusters the FAT marks in use.
    pub in_use: u64,
    /// Those of them with a sector partclone's bitmap does not mark.
    pub left_out: Vec<u64>,
    /// Cluster size in bytes.
    pub cluster: u64,
}

/// Collects the start of a FAT12 partclone stream until the FATs are
/// whole, then compares.
#[derive(Debug, Default)]
pub struct Fat12Check {
    /// The volume's bytes from its start, as they passed.
    meta: Vec<u8>,
    /// The FAT's geometry, once the boot sector has passed.
    geometry: Option<fat::Geometry>,
}

/// What to do after a run has been fed.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The FATs are not whole yet.
    More,
    /// Nothing to check or nothing missing: stop feeding.
    Done,
    /// Clusters in use are missing from the image.
    Incomplete(Missing),
}

impl Fat12Check {
    /// Feeds a run of stored bytes at byte `offset` of the volume;
    /// `sector` is partclone's block size and `is_used(block)` its bitmap.
    pub fn feed(
        &mut self,
        offset: u64,
        data: &[u8],
        sector: u64,
        device_size: u64,
        is_used: impl Fn(u64) -> bool,
    ) -> Step {
        if offset != self.meta.len() as u64 {
            // partclone left a gap before the FATs end: not its FAT12
            // layout; nothing to compare with.
            return Step::Done;
        }
        let want = self.geometry.as_ref().map_or(512, |g| g.fat_start + g.nfats * g.fat_bytes);
        let take = (want - self.meta.len() as u64).min(data.len() as u64) as usize;
        self.meta.extend_from_slice(&data[..take]);
        if self.geometry.is_none() && self.meta.len() >= 512 {
            match fat::parse_bpb(&self.meta[..512], device_size) {
                Ok(g)
                    if g.kind == fat::Kind::Fat12
                        && g.fat_start + g.nfats * g.fat_bytes <= MAX_META
                        && g.cluster.is_multiple_of(sector)
                        && g.data_start.is_multiple_of(sector) =>
                {
                    self.geometry = Some(g);
                    // The rest of this run may complete the FATs.
                    return self.feed(offset + take as u64, &data[take..], sector, device_size, is_used);
                }
                // Not a FAT12 klon reads: partclone's restore is all there is.
                _ => return Step::Done,
            }
        }
        let Some(g) = &self.geometry else { return Step::More };
        let Some(used) = fat::used_clusters(g, &self.meta) else { return Step::More };
        let per = g.cluster / sector;
        let first = g.data_start / sector;
        let left_out: Vec<u64> =
            used.iter().copied().filter(|c| (0..per).any(|i| !is_used(first + (c - 2) * per + i))).collect();
        if left_out.is_empty() {
            Step::Done
        } else {
            Step::Incomplete(Missing { in_use: used.len() as u64, left_out, cluster: g.cluster })
        }
    }
}

/// "2, 5..9, 12": cluster numbers as ranges, at most `max` of them.
pub fn ranges(list: &[u64], max: usize) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < list.len() {
        let mut j = i;
        while j + 1 < list.len() && list[j + 1] == list[j] + 1 {
            j += 1;
        }
        if out.len() == max {
            out.push("…".into());
            break;
        }
        out.push(if i == j { list[i].to_string() } else { format!("{}..{}", list[i], list[j]) });
        i = j + 1;
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{Rng, TempDir, sh};
    use std::process::Command;

    /// An 8 MiB FAT12 (4-sector clusters) holding files of several
    /// clusters and a directory; the used sectors by klon's FAT reader.
    fn fat12() -> (Vec<u8>, Vec<bool>) {
        let t = TempDir::new("fat12check");
        let img = t.join("fat.img");
        let p = img.to_str().unwrap();
        sh("truncate", &["-s", "8M", p]);
        sh("mkfs.vfat", &["-s", "4", p]);
        std::fs::create_dir_all(t.join("sub")).unwrap();
        std::fs::write(t.join("a.bin"), Rng(7).bytes(20_000)).unwrap();
        std::fs::write(t.join("sub/b.bin"), Rng(8).bytes(9_000)).unwrap();
        let out = Command::new("mcopy")
            .args(["-s", "-i", p, t.join("a.bin").to_str().unwrap(), t.join("sub").to_str().unwrap(), "::/"])
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "mcopy: {}", String::from_utf8_lossy(&out.stderr));
        let bytes = std::fs::read(&img).unwrap();
        let g = fat::parse_bpb(&bytes[..512], bytes.len() as u64).unwrap();
        assert_eq!(g.kind, fat::Kind::Fat12);
        let mut used = vec![false; bytes.len() / 512];
        used[..(g.data_start / 512) as usize].fill(true);
        for c in fat::used_clusters(&g, &bytes).unwrap() {
            let s = ((g.data_start + (c - 2) * g.cluster) / 512) as usize;
            used[s..s + 4].fill(true);
        }
        (bytes, used)
    }

    /// Feeds the used sectors in runs of at most `run` sectors, as
    /// PartcloneReader hands them on.
    fn feed_all(bytes: &[u8], used: &[bool], run: usize) -> Step {
        let mut c = Fat12Check::default();
        let mut s = 0;
        while s < used.len() {
            if !used[s] {
                s += 1;
                continue;
            }
            let mut e = s;
            while e < used.len() && used[e] && e - s < run {
                e += 1;
            }
            match c.feed(s as u64 * 512, &bytes[s * 512..e * 512], 512, bytes.len() as u64, |b| used[b as usize]) {
                Step::More => {}
                other => return other,
            }
            s = e;
        }
        Step::More
    }

    #[test]
    fn a_bitmap_that_holds_every_cluster_in_use_passes() {
        let (bytes, used) = fat12();
        for run in [1, 3, 4096] {
            assert_eq!(feed_all(&bytes, &used, run), Step::Done, "runs of {run} sectors");
        }
    }

    #[test]
    fn clusters_in_use_left_out_are_named() {
        let (bytes, mut used) = fat12();
        let g = fat::parse_bpb(&bytes[..512], bytes.len() as u64).unwrap();
        let in_use = fat::used_clusters(&g, &bytes).unwrap();
        assert!(in_use.len() > 10, "{in_use:?}");
        // One sector of cluster 5, and all of clusters 8 and 9.
        let sector = |c: u64| ((g.data_start + (c - 2) * g.cluster) / 512) as usize;
        used[sector(5) + 2] = false;
        used[sector(8)..sector(10)].fill(false);
        for run in [1, 4096] {
            assert_eq!(
                feed_all(&bytes, &used, run),
                Step::Incomplete(Missing { in_use: in_use.len() as u64, left_out: vec![5, 8, 9], cluster: 2048 })
            );
        }
    }

    #[test]
    fn not_fat12_is_not_checked() {
        let t = TempDir::new("fat16check");
        let img = t.join("fat.img");
        sh("truncate", &["-s", "20M", img.to_str().unwrap()]);
        sh("mkfs.vfat", &["-F", "16", img.to_str().unwrap()]);
        let bytes = std::fs::read(&img).unwrap();
        let mut c = Fat12Check::default();
        assert_eq!(c.feed(0, &bytes[..4096], 512, bytes.len() as u64, |_| false), Step::Done);
        // A run that does not start at the volume's start: no check.
        let mut c = Fat12Check::default();
        assert_eq!(c.feed(512, &bytes[512..4096], 512, bytes.len() as u64, |_| true), Step::Done);
    }

    #[test]
    fn ranges_fold_runs() {
        assert_eq!(ranges(&[2, 3, 4, 7, 9, 10], 8), "2..4, 7, 9..10");
        assert_eq!(ranges(&[1, 3, 5, 7], 2), "1, 3, …");
        assert_eq!(ranges(&[], 2), "");
    }
}
