//! btrfs round trips: a GPT disk whose partition first held random data
//! (so free space is stale), a populated btrfs in it, `klon backup` with
//! the btrfs reader, restore onto a larger disk full of garbage, then
//! `btrfs check --readonly`, a read-only scrub (every checksum, both DUP
//! copies) and a file-by-file comparison on a read-only mount.

mod common;

use std::path::Path;
use std::process::Command;

use common::disks::*;
use common::loop_device::LoopDevice;

const PART_START: u64 = 2048 * 512;

/// The files to put on the filesystem: sizes from empty and inline to
/// several MiB, random and text, in nested directories.
fn make_tree(dir: &Path, seed: u64) {
    for (i, sub) in ["", "a", "a/b", "c"].iter().enumerate() {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        for j in 0..12u64 {
            let n = i as u64 * 100 + j;
            let len = [0usize, 1, 700, 3000, 4096, 9000, 65_536, 250_000, 1 << 20][(n % 9) as usize];
            let data = if n.is_multiple_of(2) { random_bytes(seed + n, len) } else { text_bytes(seed + n, len) };
            std::fs::write(dir.join(sub).join(format!("file{n}")), data).unwrap();
        }
    }
    std::fs::write(dir.join("large"), random_bytes(seed ^ 0x1a, 6 << 20)).unwrap();
}

/// Every regular file under `orig` has the same bytes under `copy`, and
/// `copy` holds no other names.
fn compare_trees(orig: &Path, copy: &Path) -> usize {
    let mut n = 0;
    let mut names_o: Vec<_> = std::fs::read_dir(orig).unwrap().map(|e| e.unwrap().file_name()).collect();
    let mut names_c: Vec<_> = std::fs::read_dir(copy).unwrap().map(|e| e.unwrap().file_name()).collect();
    names_o.sort();
    names_c.sort();
    assert_eq!(names_o, names_c, "directory {} differs", copy.display());
    for name in names_o {
        let (o, c) = (orig.join(&name), copy.join(&name));
        if o.is_dir() {
            n += compare_trees(&o, &c);
        } else {
            assert!(std::fs::read(&o).unwrap() == std::fs::read(&c).unwrap(), "{} differs", c.display());
            n += 1;
        }
    }
    n
}

/// A GPT disk image of `size` with one partition from 1 MiB to the end,
/// filled with random bytes, then a btrfs made with `mkfs_args` (no
/// discard: the stale bytes stay in its free space) holding a copy of
/// `tree`, plus files written and deleted again. Returns the partition's
/// length.
fn make_btrfs_disk(t: &TempDir, disk: &Path, size: u64, mkfs_args: &[&str], tree: &Path) -> u64 {
    blank_file(disk, size);
    run("sgdisk", &["-n", "1:2048:0", "-t", "1:8300", disk.to_str().unwrap()]);
    let (parts, sector) = sfdisk_parts(disk);
    let part_len = parts[0].size * sector;
    assert_eq!(parts[0].start * sector, PART_START);
    let mut off = 0;
    while off < part_len {
        let n = (4 * MIB).min(part_len - off);
        write_at(disk, PART_START + off, &random_bytes(off + 77, n as usize));
        off += n;
    }
    let lo = LoopDevice::attach(disk, None);
    let p1 = lo.partition(1);
    let mut args = vec!["-q", "-f", "-K"];
    args.extend_from_slice(mkfs_args);
    args.push(p1.to_str().unwrap());
    run("mkfs.btrfs", &args);
    let mnt = t.join("src-mnt");
    let m = Mounted::new(&p1, &mnt, "rw");
    run("cp", &["-a", &format!("{}/.", tree.display()), mnt.to_str().unwrap()]);
    // Files that come and go: their extents are freed but keep their bytes.
    for i in 0..20u64 {
        std::fs::write(mnt.join(format!("gone{i}")), random_bytes(900 + i, 300_000)).unwrap();
    }
    run("sync", &[]);
    for i in 0..20u64 {
        std::fs::remove_file(mnt.join(format!("gone{i}"))).unwrap();
    }
    drop(m);
    drop(lo);
    part_len
}

/// Physical bytes btrfs counts as used: per block group type, the used
/// bytes times the copies its profile keeps (`btrfs filesystem df -b`).
fn btrfs_used_physical(mnt: &Path) -> u64 {
    let df = run("btrfs", &["filesystem", "df", "-b", mnt.to_str().unwrap()]);
    let mut total = 0;
    for l in df.lines() {
        let Some((kind, rest)) = l.split_once(':') else { continue };
        if kind.starts_with("GlobalReserve") {
            continue;
        }
        let copies = if kind.contains("DUP") || kind.contains("RAID1") { 2 } else { 1 };
        let used: u64 = rest.split("used=").nth(1).unwrap().trim().parse().unwrap();
        total += used * copies;
    }
    total
}

fn round_trip(tag: &str, size: u64, mkfs_args: &[&str]) {
    let t = TempDir::new(tag);
    let tree = t.join("tree");
    make_tree(&tree, size ^ 0x5eed);
    let (src, img, dst) = (t.join("src.img"), t.join("image"), t.join("dst.img"));
    let part_len = make_btrfs_disk(&t, &src, size, mkfs_args, &tree);

    ok(&klon(&["backup", src.to_str().unwrap(), img.to_str().unwrap()]));
    let info: serde_json::Value =
        serde_json::from_str(&stdout(&klon(&["info", "--json", img.to_str().unwrap()]))).unwrap();
    let streams = info["manifest"]["streams"].as_array().unwrap();
    let p1 = streams.iter().find(|s| s["partition"] == 1).expect("a stream for partition 1");
    assert_eq!(p1["method"], "btrfs", "{p1}");
    let stored = p1["stored_bytes"].as_u64().unwrap();
    let fs_used = p1["fs_used_bytes"].as_u64().unwrap();

    garbage_file(&dst, size + 64 * MIB);
    ok(&klon(&["restore", "--yes", img.to_str().unwrap(), dst.to_str().unwrap()]));

    let lo = LoopDevice::attach(&dst, None);
    let dev = lo.partition(1);
    let check = Command::new("btrfs").args(["check", "--readonly", dev.to_str().unwrap()]).output().unwrap();
    assert!(
        check.status.success(),
        "btrfs check on the restored partition:\n{}\n{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let mnt = t.join("dst-mnt");
    let m = Mounted::new(&dev, &mnt, "ro");
    let scrub = run("btrfs", &["scrub", "start", "-B", "-r", mnt.to_str().unwrap()]);
    assert!(scrub.contains("no errors found"), "scrub of the restored filesystem:\n{scrub}");
    let n = compare_trees(&tree, &mnt);
    // btrfs's own count, plus what it does not count: the first MiB
    // (left to bootloaders) and the superblock copies.
    let own = btrfs_used_physical(&mnt);
    let extra = MIB + 3 * 4096;
    eprintln!(
        "{tag}: partition {part_len}, btrfs used (physical) {own}, klon map {fs_used}, stored {stored}, {n} files identical"
    );
    assert!(stored <= own + extra, "stored {stored} > btrfs used {own} + {extra}");
    assert!(fs_used <= own + extra, "map {fs_used} > btrfs used {own} + {extra}");
    drop(m);
    drop(lo);
}

#[test]
fn round_trip_default_dup_metadata() {
    require_root!();
    round_trip("btrfs-default", 200 * MIB, &[]);
}

#[test]
fn round_trip_dup_data_small_nodes() {
    require_root!();
    round_trip("btrfs-dupdata", 260 * MIB, &["-m", "dup", "-d", "dup", "-n", "4096"]);
}

#[test]
fn round_trip_single_xxhash() {
    require_root!();
    round_trip("btrfs-xxhash", 130 * MIB, &["-m", "single", "-d", "single", "--csum", "xxhash"]);
}

/// A log tree left by fsync without a commit (the image copied while
/// mounted, as after a crash): backup refuses, --raw-unclean copies raw.
#[test]
fn unclean_log_tree_refused() {
    require_root!();
    let t = TempDir::new("btrfs-unclean");
    let (disk, crashed, img) = (t.join("disk.img"), t.join("crashed.img"), t.join("image"));
    blank_file(&disk, 160 * MIB);
    run("sgdisk", &["-n", "1:2048:0", "-t", "1:8300", disk.to_str().unwrap()]);
    {
        let lo = LoopDevice::attach(&disk, None);
        let p1 = lo.partition(1);
        run("mkfs.btrfs", &["-q", "-f", p1.to_str().unwrap()]);
        let mnt = t.join("mnt");
        let m = Mounted::new(&p1, &mnt, "commit=300");
        // A sync elsewhere (other tests) may commit the transaction between
        // the fsync and the copy, removing the log tree: retry then.
        let log_root = |img: &Path| u64::from_le_bytes(read_at(img, PART_START + 65536 + 0x60, 8).try_into().unwrap());
        for attempt in 0..10 {
            let f = std::fs::File::create(mnt.join(format!("synced{attempt}"))).unwrap();
            std::io::Write::write_all(&mut &f, &random_bytes(5 + attempt, 200_000)).unwrap();
            f.sync_all().unwrap(); // writes the log tree, not a transaction
            drop(f);
            std::fs::copy(&disk, &crashed).unwrap();
            if log_root(&crashed) != 0 {
                break;
            }
        }
        assert_ne!(log_root(&crashed), 0, "could not catch a log tree on disk");
        drop(m);
        drop(lo);
    }
    let out = klon(&["backup", crashed.to_str().unwrap(), img.to_str().unwrap()]);
    fails_with(&out, 5, &["--raw-unclean", "log tree"]);
    let _ = std::fs::remove_dir_all(&img);
    ok(&klon(&["backup", "--raw-unclean", crashed.to_str().unwrap(), img.to_str().unwrap()]));
    let info: serde_json::Value =
        serde_json::from_str(&stdout(&klon(&["info", "--json", img.to_str().unwrap()]))).unwrap();
    let p1 = info["manifest"]["streams"].as_array().unwrap().iter().find(|s| s["partition"] == 1).cloned().unwrap();
    assert_eq!(p1["method"], "raw", "{p1}");
}
