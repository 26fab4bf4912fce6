//! ext2/3/4 round trips through klon: a GPT disk whose partition held
//! random data before the filesystem was made (so free space is stale
//! bytes), backed up with the ext used-block map, restored onto a larger
//! disk full of garbage; then e2fsck -fn must be clean and every file read
//! back through a read-only mount must match the originals.

mod common;

use common::disks::*;
use common::loop_device::LoopDevice;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Loop devices are shared with other work: take them one test at a time.
static LOOP: Mutex<()> = Mutex::new(());

const PART_START: u64 = MIB;

/// A tree of files: text, random, empty, nested, a symlink, a hard link.
fn populate(dir: &Path, seed: u64, files: usize) {
    std::fs::create_dir_all(dir.join("a/b/c")).unwrap();
    for i in 0..files {
        let sub = ["", "a", "a/b", "a/b/c"][i % 4];
        let len = [0, 100, 4095, 4097, 70_000, 1_500_000][i % 6] + i * 13;
        let data = if i % 3 == 0 { text_bytes(seed + i as u64, len) } else { random_bytes(seed + i as u64, len) };
        std::fs::write(dir.join(sub).join(format!("file{i}.bin")), data).unwrap();
    }
    std::os::unix::fs::symlink("a/b/c/file3.bin", dir.join("link")).unwrap();
    std::fs::hard_link(dir.join("file0.bin"), dir.join("hard0")).unwrap();
}

enum Populate {
    /// mke2fs -d on a file holding the partition's stale bytes, written in.
    MkfsD,
    /// mke2fs on the loop partition, mounted, files copied by the kernel.
    Mount,
}

struct Source {
    t: TempDir,
    disk: PathBuf,
    files: PathBuf,
    part_len: u64,
}

fn make_source(tag: &str, part_mib: u64, mkfs: &[&str], how: Populate) -> Source {
    let t = TempDir::new(tag);
    let disk = t.join("src.img");
    let files = t.join("files");
    populate(&files, tag.len() as u64, 24);
    let part_len = part_mib * MIB;
    blank_file(&disk, part_len + 2 * MIB);
    run("sgdisk", &["-n", &format!("1:2048:+{part_mib}M"), "-t", "1:8300", disk.to_str().unwrap()]);
    let stale = random_bytes(0x5eed ^ part_mib, part_len as usize);
    write_at(&disk, PART_START, &stale);
    let mut args = vec!["-q", "-F"];
    args.extend_from_slice(mkfs);
    match how {
        Populate::MkfsD => {
            let part = t.join("part.img");
            std::fs::write(&part, &stale).unwrap();
            args.extend(["-d", files.to_str().unwrap(), part.to_str().unwrap()]);
            run("mke2fs", &args);
            write_at(&disk, PART_START, &std::fs::read(&part).unwrap());
            std::fs::remove_file(&part).unwrap();
        }
        Populate::Mount => {
            let dev = LoopDevice::attach(&disk, None);
            let p = dev.partition(1);
            args.push(p.to_str().unwrap());
            run("mke2fs", &args);
            let m = Mounted::new(&p, &t.join("mnt-src"), "rw");
            run("cp", &["-a", &format!("{}/.", files.display()), m.0.to_str().unwrap()]);
            run("sync", &[]);
            drop(m);
        }
    }
    Source { t, disk, files, part_len }
}

/// Used bytes by the filesystem's own count (dumpe2fs superblock header).
fn fs_used_bytes(part: &Path) -> u64 {
    let text = run("dumpe2fs", &["-h", part.to_str().unwrap()]);
    let field = |name: &str| -> u64 {
        text.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_else(|| panic!("no {name}")).trim().parse().unwrap()
    };
    (field("Block count:") - field("Free blocks:")) * field("Block size:")
}

fn partition_stream(img: &Path) -> serde_json::Value {
    let info = stdout(&klon(&["info", "--json", img.to_str().unwrap()]));
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    v["manifest"]["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["partition"] == 1)
        .expect("a stream for partition 1")
        .clone()
}

fn round_trip(tag: &str, part_mib: u64, mkfs: &[&str], fstype: &str, how: Populate) {
    let _guard = LOOP.lock().unwrap_or_else(|e| e.into_inner());
    let src = make_source(tag, part_mib, mkfs, how);
    let t = &src.t;

    // The filesystem's own count, on a copy of the partition.
    let part = t.join("part-copy.img");
    std::fs::write(&part, read_at(&src.disk, PART_START, src.part_len)).unwrap();
    let used = fs_used_bytes(&part);
    std::fs::remove_file(&part).unwrap();

    let img = t.join("image");
    ok(&klon(&["backup", src.disk.to_str().unwrap(), img.to_str().unwrap()]));
    let s = partition_stream(&img);
    assert_eq!(s["method"], fstype, "{tag}: {s}");
    let stored = s["stored_bytes"].as_u64().unwrap();
    eprintln!("{tag}: stored {stored} bytes; the filesystem counts {used} used of {}", src.part_len);
    assert!(stored <= used, "{tag}: stored {stored} bytes, more than the {used} the filesystem uses");
    assert!(stored > 0);

    let dst = t.join("dst.img");
    garbage_file(&dst, src.part_len + 10 * MIB);
    ok(&klon(&["restore", "--yes", img.to_str().unwrap(), dst.to_str().unwrap()]));

    let dev = LoopDevice::attach(&dst, None);
    let p = dev.partition(1);
    check_clean(tag, &p, "after the restore");
    {
        let m = Mounted::new(&p, &t.join("mnt-dst"), "ro");
        let d = Command::new("diff")
            .args(["-r", "--no-dereference", "-x", "lost+found", src.files.to_str().unwrap(), m.0.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(d.status.success(), "{tag}: files differ after restore:\n{}", String::from_utf8_lossy(&d.stdout));
        // Hard links survive as links.
        use std::os::unix::fs::MetadataExt;
        let a = std::fs::metadata(m.0.join("file0.bin")).unwrap();
        let b = std::fs::metadata(m.0.join("hard0")).unwrap();
        assert_eq!(a.ino(), b.ino(), "{tag}: hard link lost");
    }
    // The restored filesystem stays healthy in use: new directories and
    // files take inodes from the inode-table tails klon did not store
    // (they hold garbage here) and blocks from the stale free space.
    {
        let m = Mounted::new(&p, &t.join("mnt-rw"), "rw");
        for d in 0..40 {
            let dir = m.0.join(format!("new{d}"));
            std::fs::create_dir(&dir).unwrap();
            for f in 0..25 {
                std::fs::write(dir.join(format!("n{f}")), text_bytes(d * 100 + f, 1000 + f as usize * 300)).unwrap();
            }
        }
        run("sync", &[]);
    }
    check_clean(tag, &p, "after writing to it");
    drop(dev);
}

fn check_clean(tag: &str, p: &Path, when: &str) {
    let o = Command::new("e2fsck").args(["-fn", p.to_str().unwrap()]).output().unwrap();
    assert!(
        o.status.success(),
        "{tag}: e2fsck -fn on the restored partition is not clean {when}:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn ext4_4k_round_trip() {
    require_root!();
    round_trip("ext4-4k", 64, &["-t", "ext4", "-b", "4096"], "ext4", Populate::MkfsD);
}

#[test]
fn ext4_1k_kernel_written_round_trip() {
    require_root!();
    round_trip("ext4-1k-kernel", 48, &["-t", "ext4", "-b", "1024"], "ext4", Populate::Mount);
}

#[test]
fn ext4_4k_kernel_written_lazy_itable_round_trip() {
    require_root!();
    round_trip(
        "ext4-lazy-kernel",
        64,
        &["-t", "ext4", "-b", "4096", "-E", "lazy_itable_init=1", "-N", "20000"],
        "ext4",
        Populate::Mount,
    );
}

#[test]
fn ext4_bigalloc_round_trip() {
    require_root!();
    round_trip(
        "ext4-bigalloc",
        64,
        &["-t", "ext4", "-b", "4096", "-O", "bigalloc", "-C", "16384"],
        "ext4",
        Populate::MkfsD,
    );
}

#[test]
fn ext4_meta_bg_no_flex_round_trip() {
    require_root!();
    round_trip(
        "ext4-metabg",
        48,
        &["-t", "ext4", "-b", "1024", "-g", "1024", "-O", "meta_bg,^resize_inode,^flex_bg"],
        "ext4",
        Populate::MkfsD,
    );
}

#[test]
fn ext3_round_trip() {
    require_root!();
    round_trip("ext3", 48, &["-t", "ext3", "-b", "2048"], "ext3", Populate::Mount);
}

#[test]
fn ext2_round_trip() {
    require_root!();
    round_trip("ext2", 48, &["-t", "ext2", "-b", "1024"], "ext2", Populate::MkfsD);
}

fn refuses_unclean(tag: &str, debugfs: &str) {
    let t = TempDir::new(tag);
    let disk = t.join("src.img");
    blank_file(&disk, 34 * MIB);
    run("sgdisk", &["-n", "1:2048:+32M", "-t", "1:8300", disk.to_str().unwrap()]);
    let part = t.join("part.img");
    std::fs::write(&part, random_bytes(7, 32 * MIB as usize)).unwrap();
    run("mke2fs", &["-q", "-F", "-t", "ext4", part.to_str().unwrap()]);
    run("debugfs", &["-w", "-R", debugfs, part.to_str().unwrap()]);
    write_at(&disk, PART_START, &std::fs::read(&part).unwrap());

    let img = t.join("image");
    fails_with(&klon(&["backup", disk.to_str().unwrap(), img.to_str().unwrap()]), 5, &["--raw-unclean", "not clean"]);
    let img2 = t.join("image-raw");
    ok(&klon(&["backup", "--raw-unclean", disk.to_str().unwrap(), img2.to_str().unwrap()]));
    assert_eq!(partition_stream(&img2)["method"], "raw", "{tag}");
}

#[test]
fn needs_recovery_is_refused() {
    refuses_unclean("ext4-recover", "feature needs_recovery");
}

#[test]
fn not_valid_state_is_refused() {
    refuses_unclean("ext4-state0", "ssv state 0");
}

/// The group (not 0) that holds the most data and has a block bitmap, and
/// its descriptor flags, per dumpe2fs ("Group 2: (Blocks ...) [FLAGS]"
/// followed by "  N free blocks, ...").
fn group_with_data(part: &Path) -> (u64, u32) {
    let text = run("dumpe2fs", &[part.to_str().unwrap()]);
    let mut best: Option<(u64, u64, u32)> = None; // (free, group, flags)
    let mut group: Option<(u64, u32)> = None;
    for l in text.lines() {
        let head = l.strip_prefix("Group ").and_then(|r| r.split_once(": (Blocks "));
        if let Some((g, _)) = head {
            let flags = [("INODE_UNINIT", 1), ("BLOCK_UNINIT", 2), ("ITABLE_ZEROED", 4)]
                .iter()
                .filter(|(n, _)| l.contains(n))
                .map(|(_, v)| v)
                .sum();
            group = Some((g.parse().unwrap(), flags));
            continue;
        }
        let Some(free) = l.trim().split_once(" free blocks,").and_then(|(n, _)| n.parse::<u64>().ok()) else {
            continue;
        };
        if let Some((g, flags)) = group.take()
            && g > 0
            && flags & 2 == 0
            && best.is_none_or(|b| free < b.0)
        {
            best = Some((free, g, flags));
        }
    }
    let (free, g, flags) = best.expect("a group with data");
    assert!(free < 4096, "group {g} has {free} free blocks: not enough data in it for the test");
    (g, flags)
}

/// An ext4 whose group descriptor claims BLOCK_UNINIT for a group holding
/// file data, with a valid checksum (debugfs recomputes it): e2fsck -fn
/// reports it. klon used to skip the group's blocks, and the restore gave
/// back wrong files with every command exiting 0; now the metadata fails a
/// check, the partition is copied raw with a warning, and the restore
/// gives back every byte of the partition.
#[test]
fn block_uninit_group_with_data_is_copied_raw() {
    let t = TempDir::new("ext4-uninit-lie");
    let files = t.join("files");
    populate(&files, 40, 40);
    std::fs::write(files.join("big.bin"), random_bytes(99, 20 * MIB as usize)).unwrap();
    let part = t.join("part.img");
    let part_len = 64 * MIB;
    std::fs::write(&part, random_bytes(0xbad, part_len as usize)).unwrap();
    run("mke2fs", &["-q", "-F", "-t", "ext4", "-b", "1024", "-d", files.to_str().unwrap(), part.to_str().unwrap()]);
    let (g, flags) = group_with_data(&part);
    // In one debugfs session: a second one would not rewrite the checksum.
    let cmds = t.join("debugfs.cmds");
    std::fs::write(&cmds, format!("set_bg {g} flags {}\nset_bg {g} checksum calc\n", flags | 2)).unwrap();
    run("debugfs", &["-w", "-f", cmds.to_str().unwrap(), part.to_str().unwrap()]);
    let o = Command::new("e2fsck").args(["-fn", part.to_str().unwrap()]).output().unwrap();
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        !o.status.success() && said.contains("in use but group is marked BLOCK_UNINIT"),
        "e2fsck -fn: {said:.2000}"
    );
    assert!(!said.contains("checksum"), "the forged descriptor's checksum is not valid: {said:.2000}");

    let disk = t.join("src.img");
    blank_file(&disk, part_len + 2 * MIB);
    run("sgdisk", &["-n", "1:2048:+64M", "-t", "1:8300", disk.to_str().unwrap()]);
    write_at(&disk, PART_START, &std::fs::read(&part).unwrap());
    std::fs::remove_file(&part).unwrap();

    let img = t.join("image");
    let o = klon(&["backup", disk.to_str().unwrap(), img.to_str().unwrap()]);
    ok(&o);
    let err = stderr(&o);
    let want = format!("group {g} is flagged BLOCK_UNINIT");
    assert!(
        err.contains("klon: warning:") && err.contains("metadata failed a check") && err.contains(&want),
        "no warning naming the lying group:\n{err}"
    );
    let s = partition_stream(&img);
    assert_eq!(s["method"], "raw", "{s}");
    assert!(s["method_reason"].as_str().unwrap().contains(&want), "{s}");

    let dst = t.join("dst.img");
    garbage_file(&dst, part_len + 2 * MIB);
    ok(&klon(&["restore", "--yes", img.to_str().unwrap(), dst.to_str().unwrap()]));
    assert_same(&disk, &dst, PART_START, part_len, "the partition after a backup and restore");
}
