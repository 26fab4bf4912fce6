//! FAT12/16/32 and exFAT round trips through klon: a GPT disk whose
//! partition first held random bytes (stale data in free clusters) gets a
//! populated filesystem; klon backs up only the used clusters, restores to a
//! larger disk full of garbage, and the filesystem's own checker passes and
//! every file reads back the same. Also: a dirty exFAT is refused.

mod common;

use common::disks::*;
use common::loop_device::LoopDevice;
use std::path::{Path, PathBuf};
use std::process::Command;

static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs a tool with mtools' geometry check off; returns (success, output).
fn try_tool(cmd: &str, args: &[&str]) -> (bool, String) {
    let o = Command::new(cmd)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

fn tool(cmd: &str, args: &[&str]) -> String {
    let (ok, out) = try_tool(cmd, args);
    assert!(ok, "{cmd} {args:?} failed:\n{out}");
    out
}

/// A FUSE mount made by a test, unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn exfat(dev: &Path, dir: &Path, ro: bool) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        let mut args = vec![s(dev), s(dir)];
        if ro {
            args.extend(["-o", "ro"]);
        }
        tool("mount.exfat-fuse", &args);
        Mount(dir.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        for _ in 0..20 {
            if try_tool("umount", &[s(&self.0)]).0 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        eprintln!("warning: could not unmount {}", self.0.display());
    }
}

/// Copies `len` bytes from `src` at `from` to `dst` at `to`.
fn copy_range(src: &Path, from: u64, dst: &Path, to: u64, len: u64) {
    let mut pos = 0;
    while pos < len {
        let n = MIB.min(len - pos);
        write_at(dst, to + pos, &read_at(src, from + pos, n));
        pos += n;
    }
}

/// A file of `len` random bytes (the stale contents of a used disk).
fn random_file(path: &Path, len: u64, seed: u64) {
    blank_file(path, len);
    let mut pos = 0;
    while pos < len {
        let n = MIB.min(len - pos);
        write_at(path, pos, &random_bytes(seed + pos, n as usize));
        pos += n;
    }
}

/// Source files: sizes around cluster multiples, in nested directories.
fn make_tree(dir: &Path, cluster: usize, seed: u64) {
    let sizes = [0, 1, cluster - 1, cluster, cluster + 1, 3 * cluster + 7, 70_000, 250_000];
    let mut k = 0;
    for sub in ["", "d0", "d0/sub", "d1"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        for &n in &sizes {
            std::fs::write(dir.join(sub).join(format!("f{k}.bin")), random_bytes(seed + k, n)).unwrap();
            k += 1;
        }
    }
    std::fs::write(dir.join("d1/text.txt"), text_bytes(seed, 100_000)).unwrap();
}

/// Copies a host tree into a mounted filesystem.
fn copy_tree(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&dst).unwrap();
            copy_tree(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}

/// Asserts every file under `a` is under `b` with the same bytes, and the
/// directories list the same number of entries. Returns the file count.
fn same_tree(a: &Path, b: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(a).unwrap() {
        let e = e.unwrap();
        let other = b.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            n += same_tree(&e.path(), &other);
        } else {
            let (x, y) = (
                std::fs::read(e.path()).unwrap(),
                std::fs::read(&other).unwrap_or_else(|err| panic!("{}: {err}", other.display())),
            );
            assert!(x == y, "{} differs after the round trip", other.display());
            n += 1;
        }
    }
    assert_eq!(
        std::fs::read_dir(a).unwrap().count(),
        std::fs::read_dir(b).unwrap().count(),
        "entries of {}",
        b.display()
    );
    n
}

const PART_START: u64 = 2048 * 512;

/// A GPT disk of `disk_len` bytes with one partition of `part_len` bytes at
/// 1 MiB holding the filesystem image `fs`.
fn disk_with(fs: &Path, disk: &Path, disk_len: u64, part_len: u64) {
    blank_file(disk, disk_len);
    tool("sgdisk", &["-n", &format!("1:2048:+{}K", part_len / 1024), "-t", "1:0700", s(disk)]);
    copy_range(fs, 0, disk, PART_START, part_len);
}

/// Backs `disk` up and returns the partition's stream from `info --json`.
fn backup(disk: &Path, img: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["backup", s(disk), s(img)];
    args.extend_from_slice(extra);
    ok(&klon(&args));
    let info: serde_json::Value = serde_json::from_str(&stdout(&klon(&["info", "--json", s(img)]))).unwrap();
    let streams = info["manifest"]["streams"].as_array().unwrap();
    streams
        .iter()
        .find(|st| st["start"] == PART_START)
        .unwrap_or_else(|| panic!("no stream for the partition: {info}"))
        .clone()
}

/// Restores `img` to a larger garbage-filled disk and extracts the partition.
fn restore_partition(t: &TempDir, img: &Path, disk_len: u64, part_len: u64) -> PathBuf {
    let dst = t.join("dst.img");
    garbage_file(&dst, disk_len + 16 * MIB);
    ok(&klon(&["restore", "--yes", s(img), s(&dst)]));
    let part = t.join("restored-part.img");
    blank_file(&part, part_len);
    copy_range(&dst, PART_START, &part, 0, part_len);
    part
}

fn fat_round_trip(bits: u32, part_mib: u64, spc: u32, sector: u32) {
    let t = TempDir::new(&format!("fat{bits}"));
    let part_len = part_mib * MIB;
    let disk_len = part_len + 2 * MIB;
    let fs = t.join("fs.img");
    random_file(&fs, part_len, bits as u64);
    tool("mkfs.vfat", &["-F", &bits.to_string(), "-s", &spc.to_string(), "-S", &sector.to_string(), s(&fs)]);
    let src = t.join("src");
    make_tree(&src, (spc * sector) as usize, 100 + bits as u64);
    tool("mcopy", &["-s", "-i", s(&fs), &format!("{}/d0", src.display()), &format!("{}/d1", src.display()), "::/"]);
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            tool("mcopy", &["-i", s(&fs), s(&p), "::/"]);
        }
    }
    // dosfstools' own count: the data area's start plus the used clusters.
    let fsck = tool("fsck.fat", &["-n", "-v", s(&fs)]);
    let num = |key: &str, word: usize| -> u64 {
        let l = fsck.lines().find(|l| l.contains(key)).unwrap_or_else(|| panic!("no {key}:\n{fsck}"));
        l.split_whitespace().nth(word).unwrap().trim_end_matches(',').parse().unwrap()
    };
    let data_start = num("Data area starts at byte", 5);
    let cluster = num("bytes per cluster", 0);
    let summary = fsck.lines().find(|l| l.contains(" clusters") && l.contains('/')).unwrap();
    let used_clusters: u64 = summary.rsplit(", ").next().unwrap().split('/').next().unwrap().parse().unwrap();
    let fs_used = data_start + used_clusters * cluster;

    let disk = t.join("disk.img");
    disk_with(&fs, &disk, disk_len, part_len);
    let img = t.join("image");
    let st = backup(&disk, &img, &[]);
    assert_eq!(st["method"], "vfat", "{st}");
    let stored = st["stored_bytes"].as_u64().unwrap();
    eprintln!(
        "FAT{bits} {part_mib} MiB, {cluster}-byte clusters: stored {stored} bytes, fsck.fat counts {fs_used} ({used_clusters} clusters + {data_start} of reserved/FAT/root)"
    );
    assert!(stored <= fs_used, "stored {stored} > used {fs_used}");
    assert!(stored < part_len / 2, "stored {stored} of {part_len}");

    let part = restore_partition(&t, &img, disk_len, part_len);
    tool("fsck.fat", &["-n", s(&part)]);
    let out = t.join("out");
    std::fs::create_dir_all(&out).unwrap();
    tool("mcopy", &["-s", "-n", "-i", s(&part), "::/*", s(&out)]);
    assert!(same_tree(&src, &out) > 30);
}

#[test]
fn fat12_round_trip() {
    fat_round_trip(12, 4, 2, 512);
}

#[test]
fn fat16_round_trip() {
    fat_round_trip(16, 24, 4, 512);
}

#[test]
fn fat32_round_trip() {
    fat_round_trip(32, 40, 1, 512);
}

#[test]
fn fat32_4k_sectors_round_trip() {
    fat_round_trip(32, 300, 1, 4096);
}

/// Makes an exFAT of `part_len` over random bytes and fills it from `src`
/// through exfat-fuse; with `snapshot`, copies the image while it is still
/// mounted (a crash: dirty flag set) to that path.
fn make_exfat(t: &TempDir, part_len: u64, cluster: &str, src: &Path, snapshot: Option<&Path>) -> PathBuf {
    let fs = t.join("fs.img");
    random_file(&fs, part_len, 77);
    tool("mkfs.exfat", &["-c", cluster, s(&fs)]);
    let dev = LoopDevice::attach(&fs, None);
    let m = Mount::exfat(&dev.path, &t.join("mnt"), false);
    copy_tree(src, &m.0);
    if let Some(snap) = snapshot {
        tool("sync", &[]);
        std::fs::copy(&fs, snap).unwrap();
    }
    drop(m);
    drop(dev);
    fs
}

#[test]
fn exfat_round_trip() {
    require_root!();
    let _l = lock();
    for (part_mib, cluster) in [(64u64, "4K"), (48, "32K")] {
        let t = TempDir::new("exfat");
        let part_len = part_mib * MIB;
        let disk_len = part_len + 2 * MIB;
        let src = t.join("src");
        make_tree(&src, 4096, part_mib);
        let fs = make_exfat(&t, part_len, cluster, &src, None);
        tool("fsck.exfat", &["-n", s(&fs)]);
        // exfatprogs' own count: used heap clusters (dump.exfat reads the
        // bitmap), plus the boot regions and the FAT(s).
        let dump = tool("dump.exfat", &[s(&fs)]);
        let num = |key: &str| -> u64 {
            let l = dump.lines().find(|l| l.contains(key)).unwrap_or_else(|| panic!("no {key}:\n{dump}"));
            l.rsplit(':').next().unwrap().trim().parse().unwrap()
        };
        let bps = 1u64 << num("Sector Size Bits");
        let cluster_bytes = bps << num("Sector per Cluster bits");
        let used_clusters = num("Total Clusters") - num("Free Clusters");
        let boot = read_at(&fs, 0, 512);
        let nfats = boot[110] as u64;
        let meta = 24 * bps + nfats * num("FAT Length") * bps;
        let fs_used = used_clusters * cluster_bytes + meta;

        let disk = t.join("disk.img");
        disk_with(&fs, &disk, disk_len, part_len);
        let img = t.join("image");
        let st = backup(&disk, &img, &[]);
        assert_eq!(st["method"], "exfat", "{st}");
        let stored = st["stored_bytes"].as_u64().unwrap();
        eprintln!(
            "exFAT {part_mib} MiB, {cluster_bytes}-byte clusters: stored {stored} bytes, dump.exfat counts {fs_used} ({used_clusters} clusters + {meta} of boot regions and FAT)"
        );
        assert!(stored <= fs_used, "stored {stored} > used {fs_used}");

        let part = restore_partition(&t, &img, disk_len, part_len);
        tool("fsck.exfat", &["-n", s(&part)]);
        let dev = LoopDevice::attach(&part, None);
        let m = Mount::exfat(&dev.path, &t.join("rmnt"), true);
        assert!(same_tree(&src, &m.0) > 30);
        drop(m);
        drop(dev);
    }
}

#[test]
fn dirty_exfat_is_refused_unless_raw_unclean() {
    require_root!();
    let _l = lock();
    let t = TempDir::new("exfat-dirty");
    let part_len = 32 * MIB;
    let src = t.join("src");
    make_tree(&src, 4096, 9);
    let snap = t.join("snap.img");
    make_exfat(&t, part_len, "4K", &src, Some(&snap));
    let disk = t.join("disk.img");
    disk_with(&snap, &disk, part_len + 2 * MIB, part_len);
    let img = t.join("image");
    let o = klon(&["backup", s(&disk), s(&img)]);
    fails_with(&o, 5, &["--raw-unclean", "dirty"]);
    let st = backup(&disk, &t.join("image2"), &["--raw-unclean"]);
    assert_eq!(st["method"], "raw", "{st}");
}
