//! exFAT: which clusters an exFAT volume uses.
//!
//! Read from the boot region, the FAT chains of the system structures and
//! the allocation bitmap:
//! - the main and backup boot regions (sectors 0..24), each checked with
//!   its boot checksum (sector 11), and every FAT are always copied;
//! - the root directory (its FAT chain), the allocation bitmap and the
//!   up-case table (found in the root directory; the up-case table's
//!   checksum is checked) are copied explicitly;
//! - every cluster the allocation bitmap marks used is copied (files with
//!   NoFatChain have no FAT entries but are marked in the bitmap); the
//!   bitmap must at least mark the root directory, the up-case table and
//!   itself, or it fails the check.
//!
//! A volume whose VolumeDirty flag is set (mounted, or not cleanly
//! unmounted) is `Unclean`: its bitmap may not match its directories.
//!
//! No counter is cross-checked: the only one, the boot sector's
//! PercentInUse, is a rounded percentage that the specification lets an
//! implementation set to 0xFF (unknown) instead of keeping it current;
//! exfat-fuse rewrites it only at unmount and only unless it is 0xFF, and
//! the boot checksum leaves it out. The allocation bitmap is the authority.

use super::Extent;
use super::{Driver, FsError, UsedMap, Volume, normalize};
use crate::le::{le16, le32, le64};

/// The exFAT driver.
pub const DRIVER: Driver = Driver { fstypes: &["exfat"], used_map };

fn corrupt(m: impl Into<String>) -> FsError {
    FsError::Corrupt(format!("exFAT: {}", m.into()))
}

/// The exFAT boot checksum of a boot region's first 11 sectors (VolumeFlags
/// and PercentInUse excluded).
pub fn boot_checksum(sectors: &[u8]) -> u32 {
    let mut sum = 0u32;
    for (i, &b) in sectors.iter().enumerate() {
        if i == 106 || i == 107 || i == 112 {
            continue;
        }
        sum = sum.rotate_right(1).wrapping_add(b as u32);
    }
    sum
}

/// The up-case table checksum (same rotation, over every byte).
fn table_checksum(sum: u32, data: &[u8]) -> u32 {
    data.iter().fold(sum, |s, &b| s.rotate_right(1).wrapping_add(b as u32))
}

/// VolumeFlags bit: the volume is dirty.
const VOLUME_DIRTY: u16 = 1 << 1;

/// The validated layout, in sectors/clusters as on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Geometry {
    bps: u64,
    cluster: u64,
    total: u64,
    fat_offset: u64,
    fat_length: u64,
    nfats: u64,
    active_fat: u64,
    heap: u64,
    clusters: u64,
    root: u32,
}

impl Geometry {
    fn cluster_offset(&self, c: u32) -> u64 {
        self.heap + (c as u64 - 2) * self.cluster
    }
}

/// Checks a boot region of 12 sectors: signature and checksum sector.
fn check_region(r: &[u8], bps: usize, which: &str) -> Result<(), FsError> {
    let b = &r[..bps];
    if &b[3..11] != b"EXFAT   " || b[0..3] != [0xEB, 0x76, 0x90] {
        return Err(corrupt(format!("{which} boot sector has no exFAT signature")));
    }
    if b[510..512] != [0x55, 0xAA] {
        return Err(corrupt(format!("{which} boot sector lacks the 0x55AA signature")));
    }
    let sum = boot_checksum(&r[..11 * bps]);
    let cs = &r[11 * bps..12 * bps];
    if cs.chunks_exact(4).any(|c| le32(c, 0) != sum) {
        return Err(corrupt(format!("{which} boot region checksum mismatch (computed {sum:#010x})")));
    }
    Ok(())
}

fn parse(vol: &Volume) -> Result<(Geometry, u16), FsError> {
    let b = vol.read_vec(0, 512)?;
    if &b[3..11] != b"EXFAT   " {
        return Err(corrupt("no exFAT signature"));
    }
    if b[11..64].iter().any(|&x| x != 0) {
        return Err(corrupt("the boot sector's must-be-zero field is not zero"));
    }
    let bps_shift = b[108] as u32;
    let spc_shift = b[109] as u32;
    if !(9..=12).contains(&bps_shift) || bps_shift + spc_shift > 25 {
        return Err(corrupt(format!("sector shift {bps_shift} / cluster shift {spc_shift} out of range")));
    }
    let bps = 1u64 << bps_shift;
    for (start, which) in [(0, "main"), (12 * bps, "backup")] {
        let r = vol.read_vec(start, 12 * bps)?;
        check_region(&r, bps as usize, which)?;
    }
    if b[105] != 1 {
        return Err(corrupt(format!("unsupported file system revision {}.{}", b[105], b[104])));
    }
    let volume_length = le64(&b, 72);
    let fat_offset = le32(&b, 80) as u64;
    let fat_length = le32(&b, 84) as u64;
    let heap_offset = le32(&b, 88) as u64;
    let clusters = le32(&b, 92) as u64;
    let root = le32(&b, 96);
    let flags = le16(&b, 106);
    let nfats = b[110] as u64;
    let total = volume_length.checked_mul(bps).filter(|&t| t <= vol.len).ok_or_else(|| {
        corrupt(format!("volume length {volume_length} sectors exceeds the partition ({} bytes)", vol.len))
    })?;
    if !(1..=2).contains(&nfats) {
        return Err(corrupt(format!("FAT count {nfats} is not 1 or 2")));
    }
    let active_fat = (flags & 1) as u64;
    if active_fat >= nfats {
        return Err(corrupt("the active FAT is the second but there is only one"));
    }
    if fat_offset < 24 || fat_length == 0 || fat_offset + nfats * fat_length > heap_offset {
        return Err(corrupt(format!(
            "FAT region {fat_offset}+{nfats}x{fat_length} sectors is outside 24..{heap_offset}"
        )));
    }
    if clusters == 0 || clusters > 0xFFFF_FFF5 {
        return Err(corrupt(format!("cluster count {clusters} is invalid")));
    }
    // heap_offset < 2^32, clusters < 2^32, shift <= 16: fits u64.
    if heap_offset + (clusters << spc_shift) > volume_length {
        return Err(corrupt("the cluster heap reaches past the end of the volume"));
    }
    if fat_length * bps < (clusters + 2) * 4 {
        return Err(corrupt(format!("a FAT of {fat_length} sectors cannot hold {clusters} clusters")));
    }
    if !(2..clusters + 2).contains(&(root as u64)) {
        return Err(corrupt(format!("root directory cluster {root} is outside 2..{}", clusters + 2)));
    }
    let g = Geometry {
        bps,
        cluster: bps << spc_shift,
        total,
        fat_offset: fat_offset * bps,
        fat_length: fat_length * bps,
        nfats,
        active_fat,
        heap: heap_offset * bps,
        clusters,
        root,
    };
    Ok((g, flags))
}

/// Reads FAT entries through a one-page cache.
struct Fat<'a, 'v> {
    vol: &'a Volume<'v>,
    g: &'a Geometry,
    page: u64,
    buf: Vec<u8>,
}

const FAT_PAGE: u64 = 4096;

impl Fat<'_, '_> {
    fn next(&mut self, c: u32) -> Result<u32, FsError> {
        let off = c as u64 * 4;
        let page = off / FAT_PAGE;
        if self.buf.is_empty() || page != self.page {
            let start = page * FAT_PAGE;
            let len = FAT_PAGE.min(self.g.fat_length - start);
            self.buf = self.vol.read_vec(self.g.fat_offset + self.g.active_fat * self.g.fat_length + start, len)?;
            self.page = page;
        }
        Ok(le32(&self.buf, (off - page * FAT_PAGE) as usize))
    }

    /// The clusters of the chain starting at `first` as (first, count)
    /// runs; `want` clusters when given (the chain may go on), else up to
    /// the end-of-chain mark.
    fn chain(&mut self, first: u32, want: Option<u64>, what: &str) -> Result<Vec<(u32, u64)>, FsError> {
        let valid = |c: u32| (2..self.g.clusters + 2).contains(&(c as u64));
        if !valid(first) {
            return Err(corrupt(format!("{what} starts at invalid cluster {first}")));
        }
        let mut runs: Vec<(u32, u64)> = Vec::new();
        let mut c = first;
        let mut n = 0u64;
        loop {
            match runs.last_mut() {
                Some((s, len)) if *s as u64 + *len == c as u64 => *len += 1,
                _ => runs.push((c, 1)),
            }
            n += 1;
            if want == Some(n) {
                return Ok(runs);
            }
            if n > self.g.clusters {
                return Err(corrupt(format!("{what}'s cluster chain loops")));
            }
            let next = self.next(c)?;
            if next == 0xFFFF_FFFF {
                if want.is_some() {
                    return Err(corrupt(format!("{what}'s cluster chain ends after {n} clusters, short of its size")));
                }
                return Ok(runs);
            }
            if !valid(next) {
                return Err(corrupt(format!("{what}'s cluster chain has invalid entry {next:#x} after cluster {c}")));
            }
            c = next;
        }
    }
}

/// A system structure found in the root directory.
struct Entry {
    first: u32,
    len: u64,
    flags: u8,
    checksum: u32,
}

fn used_map(vol: &Volume) -> Result<UsedMap, FsError> {
    let (g, flags) = parse(vol)?;
    if flags & VOLUME_DIRTY != 0 {
        return Err(FsError::Unclean(
            "the exFAT volume is marked dirty (mounted, or not cleanly unmounted): its allocation bitmap may be incomplete; run fsck.exfat"
                .into(),
        ));
    }
    let mut extents: Vec<Extent> = vec![(0, 24 * g.bps), (g.fat_offset, g.nfats * g.fat_length)];
    let mut fat = Fat { vol, g: &g, page: 0, buf: Vec::new() };
    let add_runs = |extents: &mut Vec<Extent>, runs: &[(u32, u64)]| {
        for &(s, n) in runs {
            extents.push((g.cluster_offset(s), n * g.cluster));
        }
    };

    // Root directory: its whole chain is copied; its entries are scanned up
    // to the end-of-directory mark for the bitmap and up-case table.
    let root = fat.chain(g.root, None, "the root directory")?;
    add_runs(&mut extents, &root);
    // Clusters the allocation bitmap must mark used (checked below).
    let mut must: Vec<(u32, u64, &str)> = root.iter().map(|&(c, n)| (c, n, "the root directory")).collect();
    let mut bitmaps: Vec<Entry> = Vec::new();
    let mut upcase: Option<Entry> = None;
    'scan: for &(s, n) in &root {
        for k in 0..n {
            let dir = vol.read_vec(g.cluster_offset(s) + k * g.cluster, g.cluster)?;
            for e in dir.chunks_exact(32) {
                let found = Entry { first: le32(e, 20), len: le64(e, 24), flags: e[1], checksum: le32(e, 4) };
                match e[0] {
                    0x00 => break 'scan,
                    0x81 if bitmaps.len() < 2 => bitmaps.push(found),
                    0x81 => return Err(corrupt("more than two allocation bitmap entries")),
                    0x82 if upcase.is_none() => upcase = Some(found),
                    0x82 => return Err(corrupt("more than one up-case table entry")),
                    _ => {}
                }
            }
        }
    }

    // Up-case table: copied, and its checksum checked.
    let up = upcase.ok_or_else(|| corrupt("the root directory has no up-case table"))?;
    if up.len == 0 || up.len > 1 << 20 {
        return Err(corrupt(format!("up-case table size {} is implausible", up.len)));
    }
    let runs = fat.chain(up.first, Some(up.len.div_ceil(g.cluster)), "the up-case table")?;
    add_runs(&mut extents, &runs);
    must.extend(runs.iter().map(|&(c, n)| (c, n, "the up-case table")));
    let mut sum = 0u32;
    let mut left = up.len;
    for &(s, n) in &runs {
        let take = left.min(n * g.cluster);
        sum = table_checksum(sum, &vol.read_vec(g.cluster_offset(s), take)?);
        left -= take;
    }
    if sum != up.checksum {
        return Err(corrupt(format!("up-case table checksum {sum:#010x} does not match {:#010x}", up.checksum)));
    }

    // Allocation bitmap(s): all are copied; the active one says which
    // clusters are used.
    if bitmaps.is_empty() || bitmaps.len() as u64 != g.nfats {
        return Err(corrupt(format!("{} allocation bitmap entries for {} FATs", bitmaps.len(), g.nfats)));
    }
    let need = g.clusters.div_ceil(8);
    let mut active = None;
    for bm in &bitmaps {
        if bm.len < need || bm.len > need + g.cluster {
            return Err(corrupt(format!("allocation bitmap size {} does not fit {} clusters", bm.len, g.clusters)));
        }
        let runs = fat.chain(bm.first, Some(bm.len.div_ceil(g.cluster)), "the allocation bitmap")?;
        add_runs(&mut extents, &runs);
        if (bm.flags & 1) as u64 == g.active_fat {
            must.extend(runs.iter().map(|&(c, n)| (c, n, "the allocation bitmap")));
            active = Some(runs);
        }
    }
    let active = active.ok_or_else(|| corrupt("no allocation bitmap for the active FAT"))?;

    // Stream the active bitmap; bit i is cluster i + 2.
    const CHUNK: u64 = 1 << 20;
    let mut bit = 0u64; // index of the next bitmap bit
    let mut run: Option<u64> = None;
    let mut used_bits: Vec<(u64, u64)> = Vec::new();
    'bm: for &(s, n) in &active {
        let mut off = g.cluster_offset(s);
        let mut left = n * g.cluster;
        while left > 0 {
            let take = left.min(CHUNK);
            let buf = vol.read_vec(off, take)?;
            for &byte in &buf {
                for j in 0..8 {
                    if bit >= g.clusters {
                        break 'bm;
                    }
                    let used = byte >> j & 1 == 1;
                    match (used, run) {
                        (true, None) => run = Some(bit),
                        (false, Some(r)) => {
                            extents.push((g.heap + r * g.cluster, (bit - r) * g.cluster));
                            used_bits.push((r, bit - r));
                            run = None;
                        }
                        _ => {}
                    }
                    bit += 1;
                }
            }
            off += take;
            left -= take;
        }
    }
    if let Some(r) = run {
        extents.push((g.heap + r * g.cluster, (bit - r) * g.cluster));
        used_bits.push((r, bit - r));
    }
    // The bitmap must at least mark the structures found without it: one
    // that does not (zeroed or stale) would leave files out unnoticed.
    for (c, n, what) in must {
        let first = c as u64 - 2;
        let i = used_bits.partition_point(|r| r.0 + r.1 <= first);
        if !used_bits.get(i).is_some_and(|r| r.0 <= first && first + n <= r.0 + r.1) {
            return Err(corrupt(format!("the allocation bitmap marks clusters {c}..+{n} of {what} free")));
        }
    }
    let (extents, used_bytes) = normalize(extents, g.total)?;
    Ok(UsedMap { block_size: g.cluster as u32, total_bytes: g.total, used_bytes, extents })
}

#[cfg(test)]
mod tests {
    //! Checked against exfatprogs and exfat-fuse: `mkfs.exfat` layouts,
    //! populated through `mount.exfat-fuse` on a loop device; `dump.exfat`'s
    //! free cluster count (from the bitmap, by exfatprogs' own reader) must
    //! match the clusters mapped in the heap; only the map copied over
    //! garbage must pass `fsck.exfat -n` and read back every file the same.
    use super::*;
    use crate::fs::fat::tests::{map_with, restore_map_only, same_tree};
    use crate::testutil::{Mounted, Rng, TempDir, root_for, sh};
    use std::path::Path;

    use crate::testutil::LoopDevice as Loop;

    /// Mounts `dev` on `dir` with exfat-fuse; unmounted on drop (so before
    /// its loop device, declared first).
    fn mount(dev: &Loop, dir: &Path, ro: bool) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        let mut args = vec![dev.dev(), dir.to_str().unwrap()];
        if ro {
            args.extend(["-o", "ro"]);
        }
        sh("mount.exfat-fuse", &args);
        Mounted(dir.to_path_buf())
    }

    /// Writes files into the mounted volume (and the same into `src`);
    /// deletes some to leave holes; `full` fills it up.
    fn populate(mnt: &Path, src: &Path, cluster: usize, seed: u64, full: bool) {
        let mut rng = Rng(seed);
        let sizes = [0, 1, cluster - 1, cluster, cluster + 1, 3 * cluster + 7, 70_000, 300_000];
        let mut k = 0;
        for sub in ["", "d0", "d0/sub", "d1"] {
            std::fs::create_dir_all(mnt.join(sub)).unwrap();
            std::fs::create_dir_all(src.join(sub)).unwrap();
            for &s in &sizes {
                let data = rng.bytes(s);
                let name = format!("f{k}.bin");
                std::fs::write(mnt.join(sub).join(&name), &data).unwrap();
                std::fs::write(src.join(sub).join(&name), &data).unwrap();
                k += 1;
            }
        }
        for i in (0..k).step_by(3) {
            for sub in ["d1", ""] {
                let p = Path::new(sub).join(format!("f{i}.bin"));
                if src.join(&p).exists() {
                    std::fs::remove_file(src.join(&p)).unwrap();
                    std::fs::remove_file(mnt.join(&p)).unwrap();
                }
            }
        }
        let mut i = 0;
        loop {
            let len = if full { 64 * cluster } else { 5 * cluster + 77 };
            let data = rng.bytes(len.min(1 << 20));
            let name = format!("fill{i}.bin");
            if std::fs::write(mnt.join(&name), &data).is_err() {
                let _ = std::fs::remove_file(mnt.join(&name));
                break;
            }
            std::fs::write(src.join(&name), &data).unwrap();
            i += 1;
            if !full && i == 3 {
                break;
            }
        }
    }

    fn dump_counts(img: &str) -> (u64, u64) {
        let out = sh("dump.exfat", &[img]);
        let num = |key: &str| -> u64 {
            let l = out.lines().find(|l| l.contains(key)).unwrap_or_else(|| panic!("no {key} in:\n{out}"));
            l.split(':').nth(1).unwrap().trim().parse().unwrap()
        };
        (num("Total Clusters"), num("Free Clusters"))
    }

    fn heap_clusters(img: &Path, map: &UsedMap) -> u64 {
        let b = std::fs::read(img).unwrap();
        let heap = le32(&b, 88) as u64 * (1u64 << b[108]);
        map.extents.iter().filter(|e| e.0 >= heap).map(|e| e.1).sum::<u64>() / map.block_size as u64
    }

    fn check_layout(size: &str, cluster: &str, sector: &str, full: bool) {
        let t = TempDir::new("exfat");
        let img_p = t.join("fs.img");
        let img = img_p.to_str().unwrap();
        sh("truncate", &["-s", size, img]);
        if sector == "512" {
            sh("mkfs.exfat", &["-c", cluster, img]);
        } else {
            // mkfs.exfat takes the sector size from the device.
            let dev = Loop::attach(Path::new(img), Some(sector.parse().unwrap()));
            sh("mkfs.exfat", &["-c", cluster, dev.dev()]);
        }
        assert_eq!(1u64 << std::fs::read(&img_p).unwrap()[108], sector.parse::<u64>().unwrap());
        let empty = map_with(used_map, &img_p).unwrap();
        let (total, free) = dump_counts(img);
        assert_eq!(heap_clusters(&img_p, &empty), total - free, "empty {size} {cluster} {sector}");
        let src = t.join("src");
        {
            let dev = Loop::attach_without_partitions(&img_p);
            let m = mount(&dev, &t.join("mnt"), false);
            populate(&m.0, &src, empty.block_size as usize, size.len() as u64 * 31 + empty.block_size as u64, full);
        }
        sh("fsck.exfat", &["-n", img]);
        let map = map_with(used_map, &img_p).unwrap();
        let (total, free) = dump_counts(img);
        let used = heap_clusters(&img_p, &map);
        assert_eq!(used, total - free, "{size} {cluster} {sector}: mapped heap clusters vs dump.exfat");
        if full {
            assert!(free * 100 / total < 5, "{free} of {total} free");
        }
        let restored = t.join("restored.img");
        restore_map_only(&img_p, &restored, &map);
        sh("fsck.exfat", &["-n", restored.to_str().unwrap()]);
        let dev = Loop::attach_without_partitions(&restored);
        let m = mount(&dev, &t.join("rmnt"), true);
        let n = same_tree(&src, &m.0);
        assert!(n > 20, "{n} files compared");
    }

    #[test]
    fn layouts() {
        if !root_for("for loop devices and FUSE") {
            return;
        }
        check_layout("64M", "4K", "512", false);
        check_layout("16M", "512", "512", true);
        check_layout("40M", "32K", "4096", false);
        check_layout("48M", "128K", "512", true);
    }

    /// A zeroed allocation bitmap (as a lost write leaves it) would leave
    /// every file out; it must fail the check instead. (fsck.exfat -n of
    /// exfatprogs 1.2.0 calls such a volume clean, so it is not asked.)
    #[test]
    fn bitmap_that_misses_system_structures_is_corrupt() {
        use std::os::unix::fs::FileExt;
        let t = TempDir::new("exfatbitmap");
        let img_p = t.join("fs.img");
        let img = img_p.to_str().unwrap();
        sh("truncate", &["-s", "16M", img]);
        sh("mkfs.exfat", &["-c", "4K", img]);
        map_with(used_map, &img_p).unwrap();
        let b = std::fs::read(&img_p).unwrap();
        let bps = 1u64 << b[108];
        let cluster = bps << b[109];
        let heap = le32(&b, 88) as u64 * bps;
        let root = heap + (le32(&b, 96) as u64 - 2) * cluster;
        let dir = &b[root as usize..(root + cluster) as usize];
        let e = dir.chunks_exact(32).find(|e| e[0] == 0x81).expect("an allocation bitmap entry");
        let (first, len) = (le32(e, 20) as u64, le64(e, 24));
        let f = std::fs::OpenOptions::new().write(true).open(&img_p).unwrap();
        f.write_all_at(&vec![0u8; len as usize], heap + (first - 2) * cluster).unwrap();
        match map_with(used_map, &img_p) {
            Err(FsError::Corrupt(m)) => assert!(m.contains("allocation bitmap marks clusters"), "{m}"),
            other => panic!("a zeroed allocation bitmap must fail a check, got {other:?}"),
        }
    }

    #[test]
    fn dirty_volume_is_unclean() {
        if !root_for("for loop devices and FUSE") {
            return;
        }
        let t = TempDir::new("exfatdirty");
        let img_p = t.join("fs.img");
        sh("truncate", &["-s", "32M", img_p.to_str().unwrap()]);
        sh("mkfs.exfat", &[img_p.to_str().unwrap()]);
        let snap = t.join("snap.img");
        {
            let dev = Loop::attach_without_partitions(&img_p);
            let m = mount(&dev, &t.join("mnt"), false);
            std::fs::write(m.0.join("a"), vec![7u8; 100_000]).unwrap();
            sh("sync", &[]);
            // What a crash while mounted leaves: the dirty flag set.
            std::fs::copy(&img_p, &snap).unwrap();
        }
        let r = map_with(used_map, &snap);
        assert!(matches!(&r, Err(FsError::Unclean(m)) if m.contains("dirty")), "{r:?}");
        assert!(map_with(used_map, &img_p).is_ok());
    }

    #[test]
    fn mutated_metadata_never_panics() {
        use std::os::unix::fs::FileExt;
        if !root_for("for loop devices and FUSE") {
            return;
        }
        let t = TempDir::new("exfatmut");
        let img_p = t.join("fs.img");
        sh("truncate", &["-s", "8M", img_p.to_str().unwrap()]);
        sh("mkfs.exfat", &["-c", "4K", img_p.to_str().unwrap()]);
        {
            let dev = Loop::attach_without_partitions(&img_p);
            let m = mount(&dev, &t.join("mnt"), false);
            populate(&m.0, &t.join("src"), 4096, 5, false);
        }
        let orig = std::fs::read(&img_p).unwrap();
        let bps = 1u64 << orig[108];
        let fat = le32(&orig, 80) as u64 * bps;
        let heap = le32(&orig, 88) as u64 * bps;
        let f = std::fs::OpenOptions::new().write(true).open(&img_p).unwrap();
        let mut rng = Rng(0xfeed_f00d_1234_5679);
        let (mut oks, mut errs) = (0, 0);
        for i in 0..600 {
            let mut touched = Vec::new();
            for _ in 0..1 + rng.below(3) {
                let off = match rng.below(4) {
                    0 => 64 + rng.below(48),
                    1 => fat + rng.below(256),
                    _ => heap + rng.below(8 * 4096),
                };
                f.write_all_at(&[orig[off as usize] ^ (1 + rng.below(255)) as u8], off).unwrap();
                touched.push(off);
            }
            // Half the time, make the boot checksums agree again so the
            // mutation reaches the deeper checks.
            if i % 2 == 0 {
                let mut region = vec![0u8; 12 * bps as usize];
                std::fs::File::open(&img_p).unwrap().read_exact_at(&mut region, 0).unwrap();
                let sum = boot_checksum(&region[..11 * bps as usize]).to_le_bytes();
                let sector: Vec<u8> = sum.iter().copied().cycle().take(bps as usize).collect();
                for r in [0, 12] {
                    f.write_all_at(&region[..11 * bps as usize], r * bps).unwrap();
                    f.write_all_at(&sector, (r + 11) * bps).unwrap();
                    touched.extend(r * bps..(r + 12) * bps);
                }
            }
            match std::panic::catch_unwind(|| map_with(used_map, &img_p)) {
                Ok(Ok(m)) => {
                    assert!(m.extents.iter().all(|&(s, l)| s + l <= orig.len() as u64));
                    oks += 1;
                }
                Ok(Err(FsError::Corrupt(_) | FsError::Unclean(_))) => errs += 1,
                Ok(Err(e)) => panic!("unexpected error {e}"),
                Err(_) => panic!("used_map panicked after mutating {touched:?}"),
            }
            touched.sort_unstable();
            touched.dedup();
            for off in touched {
                f.write_all_at(&orig[off as usize..off as usize + 1], off).unwrap();
            }
        }
        assert!(oks > 0 && errs > 0, "{oks} ok, {errs} errors");
    }
}
