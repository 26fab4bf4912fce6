//! Backup and restore on real block devices (loop devices, 512-byte and
//! 4096-byte logical sectors), and the refusals that protect them. Needs
//! root: skipped without it, failing instead when KLON_REQUIRE_ROOT_TESTS=1.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use common::disks::*;
use common::loop_device::LoopDevice;

/// Loop devices are few and shared: one test at a time in this binary.
static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Makes a GPT with three partitions on `dev` (a block device, any sector
/// size) and fills them; returns (start, size) in bytes of each.
fn make_gpt_on_device(dev: &LoopDevice, sector: u64) -> Vec<(u64, u64)> {
    let p = s(&dev.path);
    run("sgdisk", &["-n", "1:0:+3M", "-t", "1:ef00", "-n", "2:0:+6M", "-n", "3:0:0", p]);
    dev.rescan();
    let (parts, sec) = sfdisk_parts(&dev.path);
    assert_eq!(sec, sector);
    let mut out = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let (start, len) = (part.start * sec, part.size * sec);
        write_at(&dev.path, start, &text_bytes(i as u64, (len / 3) as usize));
        write_at(&dev.path, start + len / 2, &random_bytes(i as u64, (len / 4) as usize));
        out.push((start, len));
    }
    write_at(&dev.path, 0, &random_bytes(1, 440));
    out
}

/// A mount that is undone on drop.
struct Mounted(PathBuf);

impl Mounted {
    fn new(dev: &Path, dir: &Path, opts: &str) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        run("mount", &["-o", opts, s(dev), s(dir)]);
        Mounted(dir.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn round_trip_between_loop_devices_512_and_4096() {
    require_root!();
    let _l = lock();
    for sector in [512u64, 4096] {
        let t = TempDir::new(&format!("loop{sector}"));
        let (src_file, dst_file, img) = (t.join("src.img"), t.join("dst.img"), t.join("image"));
        blank_file(&src_file, 32 * MIB);
        garbage_file(&dst_file, 48 * MIB);
        let src = LoopDevice::attach(&src_file, Some(sector as u32));
        let dst = LoopDevice::attach(&dst_file, Some(sector as u32));
        let parts = make_gpt_on_device(&src, sector);

        ok(&klon(&["backup", s(&src.path), s(&img)]));
        let info: serde_json::Value = serde_json::from_str(&stdout(&klon(&["info", "--json", s(&img)]))).unwrap();
        assert_eq!(info["manifest"]["source"]["logical_sector_size"], sector);
        assert_eq!(info["manifest"]["source"]["transport"], "loop");
        assert_eq!(info["manifest"]["layout"]["partitions"].as_array().unwrap().len(), 3);

        ok(&klon(&["restore", "--yes", "--grow-last", s(&img), s(&dst.path)]));
        for (i, &(start, len)) in parts.iter().enumerate() {
            assert_same(&src.path, &dst.path, start, len, &format!("{sector}-byte sectors, partition {}", i + 1));
        }
        assert_same(&src.path, &dst.path, 0, 440, "boot code");
        let v = run("sgdisk", &["-v", s(&dst.path)]);
        assert!(v.contains("No problems found"), "{v}");
        // The kernel saw the new table: the partitions are there with the grown last one.
        dst.rescan();
        let (after, sec) = sfdisk_parts(&dst.path);
        assert_eq!(sec, sector);
        let last = after.last().unwrap();
        // Backup header and a 16 KiB entry array at the end; the grown partition ends before them.
        let reserved = (16384 / sec + 1) * sec;
        assert_eq!((last.start + last.size) * sec, 48 * MIB - reserved, "last partition not grown to the end");
    }
}

/// A block device that cannot hold partitions (a loop device attached
/// without partition scanning here; a logical volume, an md array or an nbd
/// device in use) answers EINVAL when asked to re-read its table. That is
/// no failure: the restore completes, is read back, says the table was not
/// re-read, and the device holds the disk byte for byte.
#[test]
fn restore_onto_a_device_that_cannot_hold_partitions() {
    require_root!();
    let _l = lock();
    let t = TempDir::new("nopart");
    let (src, dst_file, img) = (t.join("src.img"), t.join("dst.img"), t.join("image"));
    make_gpt_disk(&src, 40 * MIB);
    garbage_file(&dst_file, 40 * MIB);
    ok(&klon(&["backup", "--quiet", s(&src), s(&img)]));
    let dst = LoopDevice::attach_without_partitions(&dst_file);
    let o = klon(&["restore", "--yes", s(&img), s(&dst.path)]);
    ok(&o);
    let out = stdout(&o);
    assert!(out.contains("read back and compared"), "{out}");
    assert!(out.contains("cannot hold partitions"), "the summary does not say the table was not re-read:\n{out}");
    let json = klon(&["restore", "--yes", "--json", s(&img), s(&dst.path)]);
    ok(&json);
    let v: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap();
    assert_eq!(v["table_reread"], false, "{v}");
    assert_eq!(v["verified"], true, "{v}");
    drop(dst);
    assert_same(&src, &dst_file, 0, 40 * MIB, "the whole disk");
}

#[test]
fn sector_size_mismatch_is_refused_before_writing() {
    require_root!();
    let _l = lock();
    let t = TempDir::new("ssmismatch");
    let (src_file, dst_file, img) = (t.join("src.img"), t.join("dst.img"), t.join("image"));
    blank_file(&src_file, 32 * MIB);
    garbage_file(&dst_file, 48 * MIB);
    let src = LoopDevice::attach(&src_file, Some(4096));
    make_gpt_on_device(&src, 4096);
    ok(&klon(&["backup", "--no-verify", s(&src.path), s(&img)]));
    drop(src);
    let dst = LoopDevice::attach(&dst_file, Some(512));
    let before = read_at(&dst_file, 0, 4 * MIB);
    let o = klon(&["restore", "--yes", s(&img), s(&dst.path)]);
    fails_with(&o, 5, &["4096", "512"]);
    assert!(read_at(&dst_file, 0, 4 * MIB) == before, "refused restore wrote to the target");
}

#[test]
fn mounted_target_and_mounted_source_are_refused() {
    require_root!();
    let _l = lock();
    let t = TempDir::new("mounted");
    let (a_file, b_file) = (t.join("a.img"), t.join("b.img"));
    make_gpt_disk(&a_file, 48 * MIB);
    make_gpt_disk(&b_file, 48 * MIB);
    let a = LoopDevice::attach(&a_file, None);
    let b = LoopDevice::attach(&b_file, None);
    run("mkfs.ext4", &["-q", "-F", s(&a.partition(2))]);
    run("mkfs.ext4", &["-q", "-F", s(&b.partition(2))]);
    let img = t.join("image");

    // Source with a partition mounted read-write: refused unless --allow-mounted.
    {
        let _m = Mounted::new(&a.partition(2), &t.join("mnt-a"), "rw");
        fails_with(&klon(&["backup", s(&a.path), s(&img)]), 5, &["--allow-mounted"]);
        assert!(!img.exists() && !t.join("image.klon-partial").exists());
        // A mounted ext4 has a journal to replay: its bitmaps may lie, so
        // even with --allow-mounted it is only copied raw when asked.
        fails_with(&klon(&["backup", "--allow-mounted", s(&a.path), s(&img)]), 5, &["--raw-unclean"]);
        ok(&klon(&["backup", "--no-verify", "--allow-mounted", "--raw-unclean", s(&a.path), s(&img)]));
    }
    // Target with a mounted partition: refused, nothing written.
    {
        let _m = Mounted::new(&b.partition(2), &t.join("mnt-b"), "ro");
        let before = read_at(&b_file, 0, MIB);
        let o = klon(&["restore", "--yes", s(&img), s(&b.path)]);
        assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
        assert!(read_at(&b_file, 0, MIB) == before, "refused restore wrote to the target");
    }
    // The image may not live on the disk it backs up.
    {
        let _m = Mounted::new(&a.partition(2), &t.join("mnt-a2"), "ro");
        let inside = t.join("mnt-a2").join("image");
        fails_with(&klon(&["backup", "--allow-mounted", s(&a.path), s(&inside)]), 5, &[]);
    }
    // The target may not be the source, nor a loop device over the source file.
    let o = klon(&["restore", "--yes", s(&img), s(&a_file)]);
    assert_eq!(o.status.code(), Some(5), "restore onto the file behind a mounted/attached loop: {}", stderr(&o));
}

/// A restore whose writes fail part way (its target's filesystem fills up:
/// a small tmpfs) ends with an I/O error that says so, removes a target
/// file it created, and wipes the table areas of a target that was there,
/// so a half-written disk is not mistaken for a good one.
#[test]
fn restore_that_runs_out_of_room_fails_and_cleans_up() {
    require_root!();
    let t = TempDir::new("enospc");
    let (src, img) = (t.join("src.img"), t.join("image"));
    make_gpt_disk(&src, 48 * MIB);
    ok(&klon(&["backup", "--quiet", s(&src), s(&img)]));
    let dir = t.join("small");
    std::fs::create_dir(&dir).unwrap();
    run("mount", &["-t", "tmpfs", "-o", "size=8m", "tmpfs", s(&dir)]);
    let small = Mounted(dir);

    let fresh = small.0.join("fresh.img");
    let o = klon(&["restore", "--yes", s(&img), s(&fresh)]);
    fails_with(&o, 3, &["No space left", "is full: make room", "did not complete", "was removed"]);
    assert!(!fresh.exists(), "the half-written target file was left behind");

    let old = small.0.join("old.img");
    std::fs::File::create(&old).unwrap().set_len(48 * MIB).unwrap();
    write_at(&old, 0, &random_bytes(3, MIB as usize));
    write_at(&old, 47 * MIB, &random_bytes(4, MIB as usize));
    let o = klon(&["restore", "--yes", s(&img), s(&old)]);
    fails_with(&o, 3, &["No space left", "partition table was wiped"]);
    assert!(read_at(&old, 0, MIB).iter().all(|&b| b == 0), "the head of the target was not wiped");
    assert!(read_at(&old, 47 * MIB, MIB).iter().all(|&b| b == 0), "the tail of the target was not wiped");
}

/// A backup whose image drive fills up (a small tmpfs) ends with an I/O
/// error that says so and leaves nothing behind: no image, no unfinished
/// one.
#[test]
fn backup_onto_a_full_image_drive_fails_and_leaves_nothing() {
    require_root!();
    let t = TempDir::new("full-drive");
    let src = t.join("src.img");
    blank_file(&src, 64 * MIB);
    write_at(&src, 0, &random_bytes(8, 40 * MIB as usize));
    let dir = t.join("drive");
    std::fs::create_dir(&dir).unwrap();
    run("mount", &["-t", "tmpfs", "-o", "size=8m", "tmpfs", s(&dir)]);
    let drive = Mounted(dir);
    let img = drive.0.join("image");
    let o = klon(&["backup", s(&src), s(&img)]);
    fails_with(&o, 3, &["No space left", "is full: make room there or use a larger drive", "no image was written"]);
    let left: Vec<_> = std::fs::read_dir(&drive.0).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "the full drive still holds {left:?}");
}
