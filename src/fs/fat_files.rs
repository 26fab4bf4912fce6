//! Reading one file out of a FAT12/16/32 volume by its path, without
//! mounting it: `klon serve --pxe` takes the kernel and initramfs from the
//! live stick or its image (a FAT partition) on machines whose kernel may
//! not mount FAT.
//!
//! Names are matched without regard to case, against the long name (VFAT)
//! when an entry has one and its 8.3 short name. Every cluster number is
//! checked against the volume, chains are bounded by the cluster count
//! (a loop ends in an error, not forever), and a file must fit its chain.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::fat::{Geometry, Kind, entry, parse_bpb};
use crate::error::{Error, Result};
use crate::le::{le16, le32};

/// The largest file read (the live system's initramfs is tens of MiB).
const MAX_FILE: u64 = 1 << 30;

fn corrupt(m: impl Into<String>) -> Error {
    Error::Corrupt(format!("FAT: {}", m.into()))
}

/// A FAT volume at `base` bytes into `dev`, `len` bytes long.
pub struct FatVolume<'a, F: FileExt> {
    dev: &'a F,
    /// The file or device holding it, for messages.
    path: PathBuf,
    base: u64,
    g: Geometry,
    fat: Vec<u8>,
}

/// One directory entry: its names, attributes, first cluster and size.
#[derive(Debug, Clone)]
struct DirEntry {
    long: Option<String>,
    short: String,
    dir: bool,
    cluster: u32,
    size: u32,
}

impl<'a, F: FileExt> FatVolume<'a, F> {
    /// Opens the volume in `dev` (the file or device `path`): its boot
    /// sector and first FAT.
    pub fn open(dev: &'a F, path: &Path, base: u64, len: u64) -> Result<Self> {
        let mut boot = vec![0u8; 512];
        dev.read_exact_at(&mut boot, base).map_err(|e| Error::io("reading", path, Some(base), e))?;
        let g = parse_bpb(&boot, len).map_err(|e| Error::Corrupt(format!("{} at byte {base}: {e}", path.display())))?;
        let mut fat = vec![0u8; g.fat_bytes as usize];
        let at = base + g.fat_start;
        dev.read_exact_at(&mut fat, at).map_err(|e| Error::io("reading", path, Some(at), e))?;
        Ok(FatVolume { dev, path: path.to_path_buf(), base, g, fat })
    }

    fn read_at(&self, buf: &mut [u8], at: u64) -> Result<()> {
        self.dev.read_exact_at(buf, at).map_err(|e| Error::io("reading", &self.path, Some(at), e))
    }

    /// The clusters of the chain starting at `first`.
    fn chain(&self, first: u32) -> Result<Vec<u32>> {
        let end_mark = match self.g.kind {
            Kind::Fat12 => 0xFF8,
            Kind::Fat16 => 0xFFF8,
            Kind::Fat32 => 0x0FFF_FFF8,
        };
        let mut out = Vec::new();
        let mut c = first;
        loop {
            if c < 2 || u64::from(c) >= self.g.clusters + 2 {
                return Err(corrupt(format!("cluster {c} in a chain from {first} is outside the volume")));
            }
            if out.len() as u64 > self.g.clusters {
                return Err(corrupt(format!("the cluster chain from {first} loops")));
            }
            out.push(c);
            let next = entry(self.g.kind, &self.fat, c as usize);
            if next >= end_mark {
                return Ok(out);
            }
            c = next;
        }
    }

    fn read_clusters(&self, chain: &[u32], limit: u64) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(limit.min(chain.len() as u64 * self.g.cluster) as usize);
        for &c in chain {
            if out.len() as u64 >= limit {
                break;
            }
            let n = self.g.cluster.min(limit - out.len() as u64) as usize;
            let at = out.len();
            out.resize(at + n, 0);
            let off = self.base + self.g.data_start + u64::from(c - 2) * self.g.cluster;
            self.read_at(&mut out[at..], off)?;
        }
        Ok(out)
    }

    /// The raw entries of the root directory, or of the directory at `cluster`.
    fn dir_bytes(&self, cluster: Option<u32>) -> Result<Vec<u8>> {
        match cluster {
            Some(c) => {
                let chain = self.chain(c)?;
                self.read_clusters(&chain, u64::MAX)
            }
            None if self.g.kind == Kind::Fat32 => self.dir_bytes(Some(self.g.root_cluster)),
            None => {
                let start = self.g.fat_start + self.g.nfats * self.g.fat_bytes;
                let mut b = vec![0u8; (self.g.data_start - start) as usize];
                self.read_at(&mut b, self.base + start)?;
                Ok(b)
            }
        }
    }

    fn entries(&self, cluster: Option<u32>) -> Result<Vec<DirEntry>> {
        let raw = self.dir_bytes(cluster)?;
        let mut out = Vec::new();
        let mut long: Vec<(u8, String)> = Vec::new();
        for e in raw.chunks_exact(32) {
            match e[0] {
                0 => break,
                0xE5 => {
                    long.clear();
                    continue;
                }
                _ => {}
            }
            let attr = e[11];
            if attr & 0x3F == 0x0F {
                // A long-name piece: 13 UTF-16 units at 1, 14 and 28.
                let units: Vec<u16> = (1..11)
                    .step_by(2)
                    .chain((14..26).step_by(2))
                    .chain((28..32).step_by(2))
                    .map(|o| le16(e, o))
                    .take_while(|&u| u != 0 && u != 0xFFFF)
                    .collect();
                long.push((e[0] & 0x1F, String::from_utf16_lossy(&units)));
                continue;
            }
            if attr & 0x08 != 0 {
                long.clear();
                continue; // the volume label
            }
            long.sort_by_key(|(n, _)| *n);
            let long_name = (!long.is_empty()).then(|| long.iter().map(|(_, s)| s.as_str()).collect::<String>());
            long.clear();
            let base = String::from_utf8_lossy(&e[0..8]).trim_end().to_string();
            let ext = String::from_utf8_lossy(&e[8..11]).trim_end().to_string();
            let short = if ext.is_empty() { base } else { format!("{base}.{ext}") };
            let hi = if self.g.kind == Kind::Fat32 { u32::from(le16(e, 20)) << 16 } else { 0 };
            out.push(DirEntry {
                long: long_name,
                short,
                dir: attr & 0x10 != 0,
                cluster: hi | u32::from(le16(e, 26)),
                size: le32(e, 28),
            });
        }
        Ok(out)
    }

    /// Where the bytes of the file at `path` lie in the device: (offset,
    /// length) of each of its clusters in order, the last cut to the
    /// file's size. Writing there changes the file's contents, not its size.
    pub fn file_ranges(&self, path: &str) -> Result<Vec<(u64, u64)>> {
        let e = self.file_entry(path)?;
        let chain = if e.size == 0 { Vec::new() } else { self.chain(e.cluster)? };
        let mut left = u64::from(e.size);
        if (chain.len() as u64) * self.g.cluster < left {
            return Err(corrupt(format!("{path} is {left} bytes but its cluster chain is shorter")));
        }
        let mut out = Vec::new();
        for c in chain {
            if left == 0 {
                break;
            }
            let n = self.g.cluster.min(left);
            out.push((self.base + self.g.data_start + u64::from(c - 2) * self.g.cluster, n));
            left -= n;
        }
        Ok(out)
    }

    /// The directory entry of the file at `path`.
    fn file_entry(&self, path: &str) -> Result<DirEntry> {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let Some((name, dirs)) = parts.split_last() else {
            return Err(Error::Usage(format!("{path:?} names no file")));
        };
        let mut at: Option<u32> = None;
        for d in dirs {
            let e = self.find(at, d)?;
            if !e.dir {
                return Err(Error::Usage(format!("{d} in {path} is a file, not a directory")));
            }
            // A subdirectory's ".." to the root holds cluster 0.
            at = (e.cluster != 0).then_some(e.cluster);
        }
        let e = self.find(at, name)?;
        if e.dir {
            return Err(Error::Usage(format!("{path} is a directory")));
        }
        Ok(e)
    }

    /// The bytes of the file at `path` (`/`-separated, from the root).
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let e = self.file_entry(path)?;
        let size = u64::from(e.size);
        if size == 0 {
            return Ok(Vec::new());
        }
        if size > MAX_FILE {
            return Err(Error::Usage(format!("{path} is {size} bytes: larger than klon reads")));
        }
        let chain = self.chain(e.cluster)?;
        if (chain.len() as u64) * self.g.cluster < size {
            return Err(corrupt(format!(
                "{path} is {size} bytes but its cluster chain holds {}",
                chain.len() as u64 * self.g.cluster
            )));
        }
        self.read_clusters(&chain, size)
    }

    fn find(&self, dir: Option<u32>, name: &str) -> Result<DirEntry> {
        self.entries(dir)?
            .into_iter()
            .find(|e| {
                e.long.as_deref().is_some_and(|l| l.eq_ignore_ascii_case(name)) || e.short.eq_ignore_ascii_case(name)
            })
            .ok_or_else(|| Error::Usage(format!("no {name} on the FAT volume in {}", self.path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::fat::tests::mtools;
    use crate::testutil::{Rng, TempDir, run, sh};

    /// mkfs.vfat + mcopy (mtools) make the volumes; klon reads them back.
    fn volume(dir: &TempDir, fat: &str, mib: u64) -> std::path::PathBuf {
        let img = dir.0.join(format!("fat{fat}.img"));
        std::fs::File::create(&img).unwrap().set_len(mib << 20).unwrap();
        sh("mkfs.vfat", &["-F", fat, "-n", "KLONLIVE", img.to_str().unwrap()]);
        img
    }

    #[test]
    fn files_by_path_on_fat12_16_32() {
        let dir = TempDir::new("fat-files");
        let mut rng = Rng::seeded(7);
        let kernel = rng.bytes(300_000);
        let initrd = rng.bytes(1_234_567);
        std::fs::create_dir_all(dir.0.join("src/live")).unwrap();
        std::fs::write(dir.0.join("src/live/vmlinuz"), &kernel).unwrap();
        std::fs::write(dir.0.join("src/live/initrd.img"), &initrd).unwrap();
        std::fs::write(dir.0.join("src/klon.conf.example"), b"job = none\n").unwrap();
        for (fat, mib) in [("12", 4), ("16", 32), ("32", 64)] {
            let img = volume(&dir, fat, mib);
            let i = img.to_str().unwrap();
            run(&mut mtools("mcopy", &["-s", "-i", i, dir.0.join("src/live").to_str().unwrap(), "::"]));
            run(&mut mtools("mcopy", &["-i", i, dir.0.join("src/klon.conf.example").to_str().unwrap(), "::"]));
            let f = std::fs::File::open(&img).unwrap();
            let v = FatVolume::open(&f, &img, 0, mib << 20).unwrap();
            assert_eq!(v.read_file("live/vmlinuz").unwrap(), kernel, "FAT{fat}");
            assert_eq!(v.read_file("/LIVE/INITRD.IMG").unwrap(), initrd, "FAT{fat}: 8.3 names, any case");
            assert_eq!(v.read_file("klon.conf.example").unwrap(), b"job = none\n", "FAT{fat}: a long name");
            let e = v.read_file("live/missing").unwrap_err().to_string();
            assert!(e.contains("no missing"), "{e}");
            assert!(v.read_file("live").is_err(), "a directory is not a file");
        }
    }

    #[test]
    fn a_looping_or_short_chain_is_refused() {
        let dir = TempDir::new("fat-files-bad");
        let img = volume(&dir, "16", 32);
        let i = img.to_str().unwrap();
        let data = Rng::seeded(3).bytes(100_000);
        std::fs::write(dir.0.join("big.bin"), &data).unwrap();
        run(&mut mtools("mcopy", &["-i", i, dir.0.join("big.bin").to_str().unwrap(), "::"]));
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&img).unwrap();
        let (first, fat_start) = {
            let v = FatVolume::open(&f, &img, 0, 32 << 20).unwrap();
            let e = v.find(None, "big.bin").unwrap();
            (e.cluster, v.g.fat_start)
        };
        // The file's second cluster points back at its first: a loop.
        let second = {
            let v = FatVolume::open(&f, &img, 0, 32 << 20).unwrap();
            entry(Kind::Fat16, &v.fat, first as usize)
        };
        f.write_all_at(&(first as u16).to_le_bytes(), fat_start + u64::from(second) * 2).unwrap();
        let v = FatVolume::open(&f, &img, 0, 32 << 20).unwrap();
        let e = v.read_file("big.bin").unwrap_err().to_string();
        assert!(e.contains("loops"), "{e}");
        // Ended early: shorter than the size says.
        f.write_all_at(&0xFFFFu16.to_le_bytes(), fat_start + u64::from(first) * 2).unwrap();
        let v = FatVolume::open(&f, &img, 0, 32 << 20).unwrap();
        let e = v.read_file("big.bin").unwrap_err().to_string();
        assert!(e.contains("cluster chain holds"), "{e}");
        // Pointing outside the volume.
        f.write_all_at(&0xFFF0u16.to_le_bytes(), fat_start + u64::from(first) * 2).unwrap();
        let v = FatVolume::open(&f, &img, 0, 32 << 20).unwrap();
        let e = v.read_file("big.bin").unwrap_err().to_string();
        assert!(e.contains("outside the volume"), "{e}");
    }
}
