//! FAT12, FAT16 and FAT32: which clusters a FAT volume uses.
//!
//! Read from the boot sector (BPB) and the file allocation tables only:
//! - the reserved region (boot sector, FSInfo, FAT32's backup boot sector),
//!   every FAT copy and, on FAT12/16, the fixed root directory region are
//!   always copied;
//! - a data cluster is used when its entry in any FAT copy is non-zero and
//!   not the bad-cluster mark (directories, including FAT32's root
//!   directory, are cluster chains in the FAT like files).
//!
//! Every BPB field is validated before it sizes a read or a loop; the FATs
//! are streamed in bounded chunks. FAT has no journal: the "dirty" bit some
//! systems set while mounted is ignored (the FAT itself is the allocation
//! state), so there is no Unclean case.
//!
//! No counter is cross-checked: FAT12/16 keep none, and FAT32's FSInfo
//! free-cluster count and next-free hint are, by Microsoft's FAT
//! specification, hints that "may be incorrect" (0xFFFFFFFF: unknown);
//! systems leave them stale, so a disagreement says nothing about the FAT.

use super::Extent;
use super::{Driver, FsError, UsedMap, Volume, normalize};
use crate::le::{le16, le32};

/// The FAT12/16/32 driver (blkid's "vfat").
pub const DRIVER: Driver = Driver { fstypes: &["vfat"], used_map };

fn corrupt(m: impl Into<String>) -> FsError {
    FsError::Corrupt(format!("FAT: {}", m.into()))
}

/// The FAT variant, by cluster count (and FAT32's BPB layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 12-bit entries, fewer than 4085 clusters.
    Fat12,
    /// 16-bit entries, 4085..65524 clusters.
    Fat16,
    /// 28-bit entries in 32 bits.
    Fat32,
}

impl Kind {
    fn bits(self) -> u64 {
        match self {
            Kind::Fat12 => 12,
            Kind::Fat16 => 16,
            Kind::Fat32 => 32,
        }
    }
    fn bad(self) -> u32 {
        match self {
            Kind::Fat12 => 0xFF7,
            Kind::Fat16 => 0xFFF7,
            Kind::Fat32 => 0x0FFF_FFF7,
        }
    }
}

/// The layout of a FAT volume, validated, in bytes from the partition start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    /// FAT12, FAT16 or FAT32.
    pub kind: Kind,
    /// Cluster size in bytes.
    pub cluster: u64,
    /// First FAT's offset.
    pub fat_start: u64,
    /// Size of one FAT.
    pub fat_bytes: u64,
    /// Number of FAT copies.
    pub nfats: u64,
    /// Offset of the data region (cluster 2).
    pub data_start: u64,
    /// Number of data clusters.
    pub clusters: u64,
    /// Size of the filesystem.
    pub total: u64,
    /// FAT32's root directory cluster (0 on FAT12/16).
    pub root_cluster: u32,
}

/// Validates the BPB in the first 512 bytes against a partition of `part_len` bytes.
pub fn parse_bpb(b: &[u8], part_len: u64) -> Result<Geometry, FsError> {
    if b.len() < 512 {
        return Err(corrupt("boot sector shorter than 512 bytes"));
    }
    if !matches!(b[0], 0xEB | 0xE9) {
        return Err(corrupt(format!("boot sector has no jump instruction (byte 0 is {:#04x})", b[0])));
    }
    if b[510..512] != [0x55, 0xAA] {
        return Err(corrupt("boot sector lacks the 0x55AA signature"));
    }
    let bps = le16(b, 11) as u64;
    let spc = b[13] as u64;
    let reserved = le16(b, 14) as u64;
    let nfats = b[16] as u64;
    let root_entries = le16(b, 17) as u64;
    let total16 = le16(b, 19) as u64;
    let media = b[21];
    let fat16_size = le16(b, 22) as u64;
    let total32 = le32(b, 32) as u64;
    if !(512..=4096).contains(&bps) || !bps.is_power_of_two() {
        return Err(corrupt(format!("bytes per sector {bps} is not a power of two in 512..4096")));
    }
    if spc == 0 || !spc.is_power_of_two() {
        return Err(corrupt(format!("sectors per cluster {spc} is not a power of two")));
    }
    if reserved == 0 {
        return Err(corrupt("no reserved sectors (the boot sector is one)"));
    }
    if !(1..=4).contains(&nfats) {
        return Err(corrupt(format!("FAT count {nfats} is not in 1..=4")));
    }
    if media != 0xF0 && media < 0xF8 {
        return Err(corrupt(format!("media byte {media:#04x} is invalid")));
    }
    let total_sectors = if total16 != 0 { total16 } else { total32 };
    if total_sectors == 0 {
        return Err(corrupt("total sector count is 0"));
    }
    let fat32_layout = fat16_size == 0;
    let fat_sectors = if fat32_layout { le32(b, 36) as u64 } else { fat16_size };
    if fat_sectors == 0 {
        return Err(corrupt("FAT size is 0"));
    }
    let mut root_cluster = 0;
    if fat32_layout {
        if root_entries != 0 || total16 != 0 {
            return Err(corrupt("FAT32 boot sector with a fixed root directory or a 16-bit sector count"));
        }
        if le16(b, 42) != 0 {
            return Err(corrupt(format!("unknown FAT32 version {:#06x}", le16(b, 42))));
        }
        root_cluster = le32(b, 44);
        for (what, off) in [("FSInfo", 48), ("backup boot", 50)] {
            let s = le16(b, off) as u64;
            if s != 0 && s != 0xFFFF && s >= reserved {
                return Err(corrupt(format!("{what} sector {s} is outside the {reserved} reserved sectors")));
            }
        }
    } else if root_entries == 0 {
        return Err(corrupt("FAT12/16 boot sector with no root directory entries"));
    }
    let total = total_sectors * bps;
    if total > part_len {
        return Err(corrupt(format!("filesystem size {total} exceeds the partition ({part_len} bytes)")));
    }
    let root_sectors = (root_entries * 32).div_ceil(bps);
    // All factors are at most 32 bits wide: no overflow in u64.
    let meta_sectors = reserved + nfats * fat_sectors + root_sectors;
    if meta_sectors >= total_sectors {
        return Err(corrupt(format!(
            "reserved, FAT and root directory sectors ({meta_sectors}) leave no data region in {total_sectors} sectors"
        )));
    }
    let clusters = (total_sectors - meta_sectors) / spc;
    if clusters == 0 {
        return Err(corrupt("the data region holds no cluster"));
    }
    let kind = if fat32_layout {
        if clusters > 0x0FFF_FFF4 {
            return Err(corrupt(format!("{clusters} clusters are too many for FAT32")));
        }
        Kind::Fat32
    } else if clusters < 4085 {
        Kind::Fat12
    } else if clusters < 65525 {
        Kind::Fat16
    } else {
        return Err(corrupt(format!("{clusters} clusters are too many for FAT16 (and the BPB is not FAT32's)")));
    };
    let fat_bytes = fat_sectors * bps;
    if fat_bytes * 8 < (clusters + 2) * kind.bits() {
        return Err(corrupt(format!("a FAT of {fat_bytes} bytes cannot hold {clusters} clusters")));
    }
    if kind == Kind::Fat32 && !(2..clusters + 2).contains(&(root_cluster as u64)) {
        return Err(corrupt(format!("root directory cluster {root_cluster} is outside 2..{}", clusters + 2)));
    }
    Ok(Geometry {
        kind,
        cluster: bps * spc,
        fat_start: reserved * bps,
        fat_bytes,
        nfats,
        data_start: meta_sectors * bps,
        clusters,
        total,
        root_cluster,
    })
}

/// The smallest size in bytes the volume can be cut to without moving a
/// cluster: just past its last used cluster (`last_used`, None when none
/// is), and with as many clusters as its kind needs (FAT16 at least 4085,
/// FAT32 at least 65525: fewer would make it read as another kind).
pub fn shrink_floor(g: &Geometry, last_used: Option<u64>) -> u64 {
    let kind_min = match g.kind {
        Kind::Fat12 => 1,
        Kind::Fat16 => 4085,
        Kind::Fat32 => 65525,
    };
    let clusters = last_used.map_or(0, |c| c - 1).max(kind_min);
    g.data_start + clusters * g.cluster
}

/// Sets the sector count in boot sector `b` (a copy of the BPB) for a
/// volume of `total` bytes, where the count was kept (16-bit field when it
/// fits and was used, 32-bit otherwise); nothing else changes. The FATs
/// keep their size: a FAT may hold more entries than there are clusters.
pub fn set_total(b: &mut [u8], total: u64) -> Result<(), FsError> {
    let bps = le16(b, 11) as u64;
    let sectors = total / bps;
    if le16(b, 19) != 0 && sectors < 0x1_0000 {
        b[19..21].copy_from_slice(&(sectors as u16).to_le_bytes());
    } else {
        let s32 = u32::try_from(sectors).map_err(|_| corrupt(format!("{sectors} sectors do not fit a BPB")))?;
        b[19..21].copy_from_slice(&[0, 0]);
        b[32..36].copy_from_slice(&s32.to_le_bytes());
    }
    Ok(())
}

/// FAT32's FSInfo free-cluster count at its place in an FSInfo sector
/// (set to "unknown", 0xFFFFFFFF, after the cluster count changed); false
/// when `sector` is not an FSInfo sector.
pub fn forget_free_count(sector: &mut [u8]) -> bool {
    if sector.len() < 512 || le32(sector, 0) != 0x4161_5252 || le32(sector, 484) != 0x6141_7272 {
        return false;
    }
    sector[488..492].copy_from_slice(&u32::MAX.to_le_bytes());
    true
}

/// Entries decoded per chunk (even, so a FAT12 chunk starts on a byte).
const CHUNK_ENTRIES: u64 = 1 << 16;

/// Entry `i` of a chunk of raw FAT bytes starting at an even entry.
pub(crate) fn entry(kind: Kind, raw: &[u8], i: usize) -> u32 {
    match kind {
        Kind::Fat12 => {
            let o = i * 3 / 2;
            let v = u16::from_le_bytes([raw[o], raw[o + 1]]);
            (if i.is_multiple_of(2) { v & 0xFFF } else { v >> 4 }) as u32
        }
        Kind::Fat16 => le16(raw, i * 2) as u32,
        Kind::Fat32 => le32(raw, i * 4) & 0x0FFF_FFFF,
    }
}

/// The data clusters (numbered from 2) the FAT copies in `meta` mark used,
/// by the same rule as [`DRIVER`]: non-zero and not the bad-cluster mark in
/// any copy. `meta` holds the volume's bytes from its start; `None` when
/// it ends before the last FAT copy does.
pub fn used_clusters(g: &Geometry, meta: &[u8]) -> Option<Vec<u64>> {
    let fats_end = g.fat_start + g.nfats * g.fat_bytes;
    if (meta.len() as u64) < fats_end {
        return None;
    }
    let copies: Vec<&[u8]> =
        (0..g.nfats).map(|k| &meta[(g.fat_start + k * g.fat_bytes) as usize..][..g.fat_bytes as usize]).collect();
    let used = (2..g.clusters + 2).filter(|&c| {
        copies.iter().any(|raw| {
            let v = entry(g.kind, raw, c as usize);
            v != 0 && v != g.kind.bad()
        })
    });
    Some(used.collect())
}

fn used_map(vol: &Volume) -> Result<UsedMap, FsError> {
    let boot = vol.read_vec(0, 512)?;
    let g = parse_bpb(&boot, vol.len)?;
    let mut extents: Vec<Extent> = vec![(0, g.data_start)];

    // Stream every FAT copy chunk by chunk; a cluster is used when any copy
    // says so (copies should agree; the union is the safe side).
    let end_entry = g.clusters + 2;
    let mut run: Option<u64> = None; // first cluster of the current used run
    let mut root_marked = g.kind != Kind::Fat32;
    let mut first = 0u64;
    while first < end_entry {
        let n = CHUNK_ENTRIES.min(end_entry - first);
        let off = first * g.kind.bits() / 8;
        let len = (n * g.kind.bits()).div_ceil(8);
        let mut copies = Vec::with_capacity(g.nfats as usize);
        for k in 0..g.nfats {
            copies.push(vol.read_vec(g.fat_start + k * g.fat_bytes + off, len)?);
        }
        for i in 0..n as usize {
            let c = first + i as u64;
            if c < 2 {
                continue;
            }
            let used = copies.iter().any(|raw| {
                let v = entry(g.kind, raw, i);
                v != 0 && v != g.kind.bad()
            });
            if c == g.root_cluster as u64 && used {
                root_marked = true;
            }
            match (used, run) {
                (true, None) => run = Some(c),
                (false, Some(s)) => {
                    extents.push((g.data_start + (s - 2) * g.cluster, (c - s) * g.cluster));
                    run = None;
                }
                _ => {}
            }
        }
        first += n;
    }
    if let Some(s) = run {
        extents.push((g.data_start + (s - 2) * g.cluster, (end_entry - s) * g.cluster));
    }
    if !root_marked {
        return Err(corrupt(format!("the FAT32 root directory cluster {} is marked free", g.root_cluster)));
    }
    let (extents, used_bytes) = normalize(extents, g.total)?;
    Ok(UsedMap { block_size: g.cluster as u32, total_bytes: g.total, used_bytes, extents })
}

#[cfg(test)]
pub(crate) mod tests {
    //! Checked against dosfstools and mtools: `fsck.fat -n -v` (data area,
    //! cluster count, used cluster count), `mshowfat` (the clusters of
    //! every file and directory `mdir -/ -b` lists).
    use super::*;
    use crate::device::Disk;
    use crate::testutil::{Rng, TempDir, run, sh, try_run};
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// An mtools command: MTOOLS_SKIP_CHECK=1 lets mtools read images whose
    /// geometry it would question.
    pub(crate) fn mtools(prog: &str, args: &[&str]) -> Command {
        let mut c = Command::new(prog);
        c.args(args).env("MTOOLS_SKIP_CHECK", "1");
        c
    }

    pub(crate) fn map_with(f: fn(&Volume) -> Result<UsedMap, FsError>, img: &Path) -> Result<UsedMap, FsError> {
        let d = Disk::open_source(img).unwrap();
        let len = d.size;
        f(&Volume::new(&d, 0, len))
    }

    /// Copies only `map`'s extents of `src` into a new file `dst` of the
    /// same size that otherwise holds garbage: what a restore leaves.
    pub(crate) fn restore_map_only(src: &Path, dst: &Path, map: &UsedMap) {
        use std::os::unix::fs::FileExt;
        let size = std::fs::metadata(src).unwrap().len();
        let out = std::fs::File::create(dst).unwrap();
        let mut rng = Rng(0xdead_beef);
        let junk = rng.bytes(1 << 20);
        let mut off = 0;
        while off < size {
            let n = (1u64 << 20).min(size - off);
            out.write_all_at(&junk[..n as usize], off).unwrap();
            off += n;
        }
        let inp = std::fs::File::open(src).unwrap();
        for &(s, l) in &map.extents {
            let mut buf = vec![0u8; l as usize];
            inp.read_exact_at(&mut buf, s).unwrap();
            out.write_all_at(&buf, s).unwrap();
        }
    }

    /// Compares every file under `a` with the same path under `b`, both ways.
    pub(crate) fn same_tree(a: &Path, b: &Path) -> usize {
        let mut n = 0;
        for e in std::fs::read_dir(a).unwrap() {
            let e = e.unwrap();
            let other = b.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                assert!(other.is_dir(), "{} missing", other.display());
                n += same_tree(&e.path(), &other);
            } else {
                let x = std::fs::read(e.path()).unwrap();
                let y = std::fs::read(&other).unwrap_or_else(|err| panic!("{}: {err}", other.display()));
                assert!(x == y, "{} differs from {}", e.path().display(), other.display());
                n += 1;
            }
        }
        assert_eq!(
            std::fs::read_dir(a).unwrap().count(),
            std::fs::read_dir(b).unwrap().count(),
            "{} vs {}",
            a.display(),
            b.display()
        );
        n
    }

    /// Writes a tree of files into `dir` (sizes around cluster multiples);
    /// `full` keeps adding files until the filesystem is full.
    fn populate(img: &str, dir: &Path, cluster: usize, seed: u64, full: bool) {
        let mut rng = Rng(seed);
        let sizes = [0, 1, cluster - 1, cluster, cluster + 1, 3 * cluster + 7, 70_000, 200_000];
        std::fs::create_dir_all(dir.join("d0/sub")).unwrap();
        std::fs::create_dir_all(dir.join("d1")).unwrap();
        let mut k = 0;
        for (i, &s) in sizes.iter().enumerate() {
            for sub in ["", "d0", "d0/sub", "d1"] {
                let p = dir.join(sub).join(format!("f{i}_{k}.bin"));
                std::fs::write(&p, rng.bytes(s)).unwrap();
                k += 1;
            }
        }
        run(&mut mtools(
            "mcopy",
            &["-s", "-i", img, &format!("{}/d0", dir.display()), &format!("{}/d1", dir.display()), "::/"],
        ));
        let top: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        let mut args = vec!["-i", img];
        args.extend(top.iter().map(|s| s.as_str()));
        args.push("::/");
        run(&mut mtools("mcopy", &args));
        // Holes: delete every third file, then write new files that reuse
        // (and fragment across) the freed clusters.
        let mut holes = Vec::new();
        for e in std::fs::read_dir(dir.join("d1")).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            if name.ends_with("0.bin") || name.ends_with("3.bin") || name.ends_with("6.bin") || name.ends_with("9.bin")
            {
                run(&mut mtools("mdel", &["-i", img, &format!("::/d1/{name}")]));
                std::fs::remove_file(&p).unwrap();
                holes.push(name);
            }
        }
        for i in 0..3 {
            let p = dir.join("d1").join(format!("frag{i}.bin"));
            std::fs::write(&p, rng.bytes(5 * cluster + 100 * i)).unwrap();
            run(&mut mtools("mcopy", &["-i", img, &p.display().to_string(), "::/d1/"]));
        }
        if full {
            // Large files until one does not fit, then single clusters.
            let mut big = true;
            for i in 0..20_000 {
                let p = dir.join(format!("fill{i}.bin"));
                let len = if big { (64 * cluster).min(256 << 10) } else { cluster };
                std::fs::write(&p, rng.bytes(len)).unwrap();
                let (ok, _) = try_run(&mut mtools("mcopy", &["-i", img, &p.display().to_string(), "::/"]));
                if !ok {
                    std::fs::remove_file(&p).unwrap();
                    let _ = try_run(&mut mtools("mdel", &["-i", img, &format!("::/fill{i}.bin")]));
                    if !big {
                        break;
                    }
                    big = false;
                }
            }
        }
    }

    fn field(out: &str, prefix_re: &str, after: &str) -> u64 {
        for line in out.lines() {
            let l = line.trim();
            if l.starts_with(prefix_re) && l.contains(after) {
                let tail = &l[prefix_re.len()..];
                let num: String = tail.trim_start().chars().take_while(|c| c.is_ascii_digit()).collect();
                return num.parse().unwrap();
            }
        }
        panic!("no {prefix_re:?} in fsck.fat output:\n{out}");
    }

    /// The used map according to dosfstools and mtools, and fsck's used
    /// cluster count.
    fn reference(img: &str) -> (Vec<Extent>, u64, u64, u64) {
        let fsck = sh("fsck.fat", &["-n", "-v", img]);
        let data_start = field(&fsck, "Data area starts at byte", "");
        let clusters = fsck
            .lines()
            .find(|l| l.contains("data clusters"))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap();
        let summary = fsck.lines().find(|l| l.contains(" clusters") && l.contains('/')).unwrap();
        let used: u64 = summary.rsplit(", ").next().unwrap().split('/').next().unwrap().parse().unwrap();
        let cluster_bytes = {
            let l = fsck.lines().find(|l| l.contains("bytes per cluster")).unwrap();
            l.split_whitespace().next().unwrap().parse::<u64>().unwrap()
        };
        // mdir fails on an empty root directory.
        let (_, listing) = try_run(&mut mtools("mdir", &["-/", "-b", "-i", img, "::/"]));
        let mut paths: Vec<String> =
            listing.lines().filter(|l| l.starts_with("::/")).map(|l| l.trim_end_matches('/').to_string()).collect();
        paths.push("::/".into());
        let mut ext = vec![(0, data_start)];
        let mut count = 0;
        for chunk in paths.chunks(64) {
            let mut args = vec!["-i", img];
            args.extend(chunk.iter().map(|s| s.as_str()));
            let out = run(&mut mtools("mshowfat", &args));
            for run in out.split('<').skip(1) {
                let run = run.split('>').next().unwrap();
                let (a, b) = match run.split_once('-') {
                    Some((a, b)) => (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap()),
                    None => (run.parse().unwrap(), run.parse().unwrap()),
                };
                ext.push((data_start + (a - 2) * cluster_bytes, (b - a + 1) * cluster_bytes));
                count += b - a + 1;
            }
        }
        // mshowfat says nothing for an empty FAT32 root directory: take its
        // cluster from fsck.fat.
        if let Some(l) = fsck.lines().find(|l| l.contains("Root directory start at cluster")) {
            let root: u64 = l.split_whitespace().nth(5).unwrap().parse().unwrap();
            let off = data_start + (root - 2) * cluster_bytes;
            if !ext.iter().any(|&(s, l)| s <= off && off < s + l) {
                ext.push((off, cluster_bytes));
                count += 1;
            }
        }
        let (ext, _) = normalize(ext, u64::MAX).unwrap();
        assert_eq!(count, used, "mshowfat's clusters vs fsck.fat's used count");
        (ext, used, clusters, cluster_bytes)
    }

    fn check_layout(bits: u32, size: &str, spc: u32, sector: u32, full: bool) {
        let t = TempDir::new("fat");
        let img_p = t.join("fs.img");
        let img = img_p.to_str().unwrap();
        sh("truncate", &["-s", size, img]);
        sh("mkfs.vfat", &["-F", &bits.to_string(), "-s", &spc.to_string(), "-S", &sector.to_string(), img]);
        let empty = map_with(used_map, &img_p).unwrap();
        let (ref_ext, _, _, _) = reference(img);
        assert_eq!(empty.extents, ref_ext, "empty FAT{bits}");
        populate(img, &t.join("src"), (spc * sector) as usize, bits as u64 * 7 + spc as u64, full);
        let map = map_with(used_map, &img_p).unwrap();
        let (ref_ext, used, clusters, cluster) = reference(img);
        assert_eq!(map.extents, ref_ext, "FAT{bits} size {size} spc {spc} sector {sector}");
        assert_eq!(map.block_size as u64, cluster);
        let bytes = std::fs::read(&img_p).unwrap();
        let g = parse_bpb(&bytes[..512], u64::MAX).unwrap();
        assert_eq!(g.clusters, clusters);
        // used_clusters (read from bytes in memory) names the same clusters
        // as mshowfat, and none without the whole FATs.
        let listed = used_clusters(&g, &bytes).unwrap();
        assert_eq!(listed.len() as u64, used);
        let mut ext = vec![(0, g.data_start)];
        ext.extend(listed.iter().map(|c| (g.data_start + (c - 2) * g.cluster, g.cluster)));
        assert_eq!(normalize(ext, u64::MAX).unwrap().0, ref_ext);
        assert_eq!(used_clusters(&g, &bytes[..(g.fat_start + g.nfats * g.fat_bytes - 1) as usize]), None);
        assert_eq!(map.used_bytes, g.data_start + used * cluster);
        if full {
            assert!(used * 100 / clusters >= 95, "only {used}/{clusters} used");
        }
        // Only the map restored over garbage: fsck.fat is clean and every
        // file reads back the same.
        let restored = t.join("restored.img");
        restore_map_only(&img_p, &restored, &map);
        sh("fsck.fat", &["-n", restored.to_str().unwrap()]);
        let out = t.join("out");
        std::fs::create_dir_all(&out).unwrap();
        run(&mut mtools("mcopy", &["-s", "-n", "-i", restored.to_str().unwrap(), "::/*", out.to_str().unwrap()]));
        let n = same_tree(&t.join("src"), &out);
        assert!(n > 20, "{n} files compared");
    }

    #[test]
    fn fat12_layouts() {
        check_layout(12, "2M", 1, 512, false);
        check_layout(12, "8M", 4, 512, true);
        check_layout(12, "8M", 1, 4096, false);
    }

    #[test]
    fn fat16_layouts() {
        check_layout(16, "32M", 4, 512, false);
        // Just above FAT12's limit: 4085+ clusters of 512 bytes.
        check_layout(16, "2200K", 1, 512, true);
        check_layout(16, "64M", 1, 4096, false);
    }

    #[test]
    fn fat32_layouts() {
        check_layout(32, "40M", 1, 512, false);
        check_layout(32, "34M", 1, 512, true);
        check_layout(32, "300M", 1, 4096, false);
        check_layout(32, "300M", 8, 512, false);
    }

    /// A populated image of each FAT type, built once per test.
    fn populated(t: &TempDir, bits: u32, size: &str) -> PathBuf {
        let img_p = t.join(&format!("fat{bits}.img"));
        let img = img_p.to_str().unwrap();
        sh("truncate", &["-s", size, img]);
        sh("mkfs.vfat", &["-F", &bits.to_string(), "-s", "1", img]);
        populate(img, &t.join(&format!("src{bits}")), 512, bits as u64, false);
        img_p
    }

    #[test]
    fn dirty_flag_is_ignored_and_partition_bounds_checked() {
        use std::os::unix::fs::FileExt;
        let t = TempDir::new("fatdirty");
        for (bits, size, flag_off, fat1) in [(16u32, "32M", 37u64, true), (32, "34M", 65, true), (12, "2M", 37, false)]
        {
            let img = populated(&t, bits, size);
            let clean = map_with(used_map, &img).unwrap();
            let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
            f.write_all_at(&[1], flag_off).unwrap();
            if fat1 {
                // FAT entry 1's "clean shutdown" bit cleared, as a mounted volume has it.
                let g = parse_bpb(&std::fs::read(&img).unwrap()[..512], u64::MAX).unwrap();
                let (off, v): (u64, &[u8]) =
                    if bits == 16 { (2, &[0xFF, 0x7F]) } else { (4, &[0xFF, 0xFF, 0xFF, 0x07]) };
                f.write_all_at(v, g.fat_start + off).unwrap();
            }
            assert_eq!(map_with(used_map, &img).unwrap().extents, clean.extents, "FAT{bits}");
            // A partition shorter than the filesystem is refused.
            let d = Disk::open_source(&img).unwrap();
            let r = used_map(&Volume::new(&d, 0, d.size - 512));
            assert!(matches!(r, Err(FsError::Corrupt(_))), "{r:?}");
        }
    }

    #[test]
    fn mutated_metadata_never_panics() {
        use std::os::unix::fs::FileExt;
        let t = TempDir::new("fatmut");
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for (bits, size) in [(12u32, "2M"), (16, "2200K"), (32, "34M")] {
            let img = populated(&t, bits, size);
            let orig = std::fs::read(&img).unwrap();
            let g = parse_bpb(&orig[..512], u64::MAX).unwrap();
            let region = (g.data_start + 16 * g.cluster).min(orig.len() as u64);
            let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
            let (mut oks, mut errs) = (0, 0);
            for _ in 0..400 {
                let mut touched = Vec::new();
                for _ in 0..1 + rng.below(4) {
                    let off = match rng.below(3) {
                        0 => rng.below(64),
                        1 => g.fat_start + rng.below(g.fat_bytes.min(4096)),
                        _ => rng.below(region),
                    };
                    let b = orig[off as usize] ^ (1 + rng.below(255)) as u8;
                    f.write_all_at(&[b], off).unwrap();
                    touched.push(off);
                }
                let r = std::panic::catch_unwind(|| map_with(used_map, &img));
                match r {
                    Ok(Ok(m)) => {
                        assert!(
                            m.extents
                                .iter()
                                .all(|&(s, l)| s + l <= m.total_bytes && m.total_bytes <= orig.len() as u64)
                        );
                        oks += 1
                    }
                    Ok(Err(FsError::Corrupt(_))) => errs += 1,
                    Ok(Err(e)) => panic!("FAT{bits}: unexpected error {e}"),
                    Err(_) => panic!("FAT{bits}: used_map panicked after mutating {touched:?}"),
                }
                for off in touched {
                    f.write_all_at(&orig[off as usize..off as usize + 1], off).unwrap();
                }
            }
            assert!(oks > 0 && errs > 0, "FAT{bits}: {oks} ok, {errs} corrupt");
        }
    }
}
