//! Real faults, not mocks: disks that fail reads or writes at chosen byte
//! ranges, or go away in the middle of a job, served by nbdkit and exposed
//! as a regular file by nbdfuse (root: FUSE, loop devices, mounts).
//!
//! Each test checks what a user relies on after a fault: the job stops with
//! exit 3 (I/O) and names the place that failed, and nothing half-written
//! is left looking complete (no image directory, a target without a
//! partition table).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::disks::*;
use common::loop_device::LoopDevice;

/// nbdkit's sh plugin: a disk backed by the file DISK that fails like a
/// real one, as the files in DIR say (read at every request):
/// - `bad-reads`, `bad-writes`: lines `START END` (bytes); a read, or a
///   write, zero or trim, touching one fails with EIO;
/// - `write-budget`: bytes the drive still writes; a write beyond them
///   makes the drive go away;
/// - `gone`: while it exists every request fails with EIO (unplugged).
const FAULTY_DISK_SCRIPT: &str = r#"#!/bin/bash
disk=@DISK@
dir=@DIR@
fail() { echo "EIO $1" >&2; exit 1; }
hits() { # FILE COUNT OFFSET: whether [OFFSET, OFFSET+COUNT) touches a range of FILE
    [ -f "$1" ] || return 1
    while read -r s e; do
        [ -n "$s" ] && [ "$3" -lt "$e" ] && [ $(($3 + $2)) -gt "$s" ] && return 0
    done <"$1"
    return 1
}
spend() { # COUNT: take a write's bytes from the budget; the drive goes away when it runs out
    [ -f "$dir/write-budget" ] || return 0
    left=$(cat "$dir/write-budget")
    if [ "$left" -lt "$1" ]; then
        touch "$dir/gone"
        fail "the drive went away"
    fi
    echo $((left - $1)) >"$dir/write-budget"
}
live() { [ -e "$dir/gone" ] && fail "the drive is gone"; return 0; }
zero() { # COUNT OFFSET
    dd if=/dev/zero of="$disk" bs=64K seek="$2" count="$1" oflag=seek_bytes iflag=count_bytes conv=notrunc status=none
}
case "$1" in
    get_size) stat -L -c %s "$disk" ;;
    can_write | can_flush | can_zero | can_trim) exit 0 ;;
    pread)
        live
        hits "$dir/bad-reads" "$3" "$4" && fail "unreadable sector"
        dd if="$disk" bs=64K skip="$4" count="$3" iflag=skip_bytes,count_bytes status=none ;;
    pwrite)
        live
        hits "$dir/bad-writes" "$3" "$4" && fail "unwritable sector"
        spend "$3"
        dd of="$disk" bs=64K seek="$4" oflag=seek_bytes conv=notrunc status=none ;;
    zero | trim)
        live
        hits "$dir/bad-writes" "$3" "$4" && fail "unwritable sector"
        spend "$3"
        zero "$3" "$4" ;;
    flush) live ;;
    *) exit 2 ;;
esac
"#;

/// A disk file (`file`) that fails as its state files say (see
/// [`FAULTY_DISK_SCRIPT`]): nbdfuse running nbdkit over `backing`. Drop
/// unmounts it and reaps nbdfuse (which ends nbdkit).
struct FaultyDisk {
    mnt: PathBuf,
    /// The faulty disk as a regular file.
    file: PathBuf,
    /// Where the state files live.
    state: PathBuf,
    child: Child,
}

impl FaultyDisk {
    fn new(dir: &TempDir, tag: &str, backing: &Path) -> FaultyDisk {
        let state = dir.join(&format!("{tag}-state"));
        let mnt = dir.join(&format!("{tag}-mnt"));
        std::fs::create_dir_all(&state).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let script = dir.join(&format!("{tag}.sh"));
        let text = FAULTY_DISK_SCRIPT.replace("@DISK@", &shell_quote(backing)).replace("@DIR@", &shell_quote(&state));
        std::fs::write(&script, text).unwrap();
        run("chmod", &["+x", script.to_str().unwrap()]);
        let file = mnt.join("disk");
        let log = dir.join(&format!("{tag}-nbdfuse.log"));
        let child = Command::new("nbdfuse")
            .arg(&file)
            .args(["--command", "nbdkit", "-s", "sh"])
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run nbdfuse: {e} (scripts/test installs libnbd-bin and nbdkit)"));
        let disk = FaultyDisk { mnt, file, state, child };
        let size = std::fs::metadata(backing).unwrap().len();
        for _ in 0..100 {
            if std::fs::metadata(&disk.file).is_ok_and(|m| m.len() == size) {
                return disk;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        panic!("nbdfuse did not expose {} at {}: {said}", backing.display(), disk.file.display());
    }

    /// Reads of `[start, end)` fail from now on.
    fn bad_reads(&self, ranges: &[(u64, u64)]) {
        std::fs::write(self.state.join("bad-reads"), ranges_text(ranges)).unwrap();
    }

    /// Writes to `[start, end)` fail from now on.
    fn bad_writes(&self, ranges: &[(u64, u64)]) {
        std::fs::write(self.state.join("bad-writes"), ranges_text(ranges)).unwrap();
    }

    /// The drive goes away after `bytes` more bytes are written.
    fn write_budget(&self, bytes: u64) {
        std::fs::write(self.state.join("write-budget"), format!("{bytes}\n")).unwrap();
    }

    fn is_gone(&self) -> bool {
        self.state.join("gone").exists()
    }

    /// The drive is back and works again (no budget, no bad ranges).
    fn come_back(&self) {
        for f in ["gone", "write-budget", "bad-reads", "bad-writes"] {
            let _ = std::fs::remove_file(self.state.join(f));
        }
    }
}

impl Drop for FaultyDisk {
    fn drop(&mut self) {
        for _ in 0..20 {
            let unmounted = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if unmounted {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ranges_text(ranges: &[(u64, u64)]) -> String {
    ranges.iter().map(|(s, e)| format!("{s} {e}\n")).collect()
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.to_str().unwrap().replace('\'', r"'\''"))
}

const PART_START: u64 = MIB;
const PART_MIB: u64 = 12;
const BLOCK: u64 = 4096;

/// A 16 MiB GPT disk image with one ext4 partition (4 KiB blocks) at
/// 1 MiB made by `mkfs.ext4 -d` from `files`: a 2 MiB random file
/// `big.bin` and some text.
struct Ext4Source {
    disk: PathBuf,
    files: PathBuf,
    /// The partition alone, as mkfs wrote it (for debugfs).
    part: PathBuf,
}

fn ext4_source(dir: &TempDir) -> Ext4Source {
    let files = dir.join("files");
    std::fs::create_dir_all(files.join("sub")).unwrap();
    std::fs::write(files.join("big.bin"), random_bytes(7, 2 << 20)).unwrap();
    std::fs::write(files.join("sub/notes.txt"), text_bytes(3, 300_000)).unwrap();
    let part = dir.join("part.img");
    blank_file(&part, PART_MIB * MIB);
    run("mkfs.ext4", &["-q", "-F", "-b", "4096", "-d", files.to_str().unwrap(), part.to_str().unwrap()]);
    let disk = dir.join("source.img");
    blank_file(&disk, 16 * MIB);
    run("sgdisk", &["-n", &format!("1:2048:+{PART_MIB}M"), "-t", "1:8300", disk.to_str().unwrap()]);
    write_at(&disk, PART_START, &std::fs::read(&part).unwrap());
    Ext4Source { disk, files, part }
}

/// The filesystem block holding block `n` of file `path` in the ext4 image `part`.
fn physical_block(part: &Path, path: &str, n: u64) -> u64 {
    let out = run("debugfs", &["-R", &format!("bmap {path} {n}"), part.to_str().unwrap()]);
    out.trim().parse().unwrap_or_else(|_| panic!("debugfs bmap said {out:?}"))
}

/// `count` free blocks in the ext4 image `part`, from block `goal` on.
fn free_blocks(part: &Path, count: u64, goal: u64) -> Vec<u64> {
    let out = run("debugfs", &["-R", &format!("ffb {count} {goal}"), part.to_str().unwrap()]);
    let blocks: Vec<u64> =
        out.split(':').nth(1).unwrap_or("").split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert_eq!(blocks.len() as u64, count, "debugfs ffb said {out:?}");
    blocks
}

fn assert_zeros(path: &Path, off: u64, len: u64, what: &str) {
    let bytes = read_at(path, off, len);
    if let Some(i) = bytes.iter().position(|&b| b != 0) {
        panic!("{what}: {} has byte {} at {} where zeros were expected", path.display(), bytes[i], off + i as u64);
    }
}

/// 1. A bad sector inside a file's data: the backup stops with exit 3,
///    names the source and the byte that could not be read, and leaves no
///    image (nor an unfinished one) behind.
#[test]
fn source_read_error_in_used_block_fails_the_backup_and_leaves_no_image() {
    require_root!();
    let dir = TempDir::new("fault-src");
    let src = ext4_source(&dir);
    let block = physical_block(&src.part, "/big.bin", 100);
    let bad = PART_START + block * BLOCK + 1024;
    let faulty = FaultyDisk::new(&dir, "src", &src.disk);
    faulty.bad_reads(&[(bad, bad + 512)]);

    let image = dir.join("image");
    let out = klon(&["backup", "--quiet", faulty.file.to_str().unwrap(), image.to_str().unwrap()]);
    // The read that fails is the 4 KiB page holding the bad sector.
    let page = bad / BLOCK * BLOCK;
    fails_with(
        &out,
        3,
        &["reading", faulty.file.to_str().unwrap(), &format!("at byte offset {page}"), "Input/output error"],
    );
    assert!(stderr(&out).contains("no image was written"), "{}", stderr(&out));
    assert!(!image.exists(), "a failed backup left {}", image.display());
    let partial = PathBuf::from(format!("{}.klon-partial", image.display()));
    assert!(!partial.exists(), "a failed backup left {}", partial.display());
    fails_with(&klon(&["verify", image.to_str().unwrap()]), 2, &["no image at"]);
}

/// 2. Bad sectors in free blocks: they are never read, the backup succeeds
///    and the restore gives back every used byte (the free range, which
///    holds old data on the source, is zeros on a fresh target).
#[test]
fn bad_sectors_in_free_blocks_are_not_read() {
    require_root!();
    let dir = TempDir::new("fault-free");
    let src = ext4_source(&dir);
    let free = free_blocks(&src.part, 16, 2000);
    let (first, last) = (free[0], free[15]);
    assert_eq!(last - first, 15, "free blocks not contiguous: {free:?}");
    let bad = (PART_START + first * BLOCK, PART_START + (last + 1) * BLOCK);
    // Old data in the free blocks: must not be read, nor restored.
    write_at(&src.disk, bad.0, &random_bytes(99, (bad.1 - bad.0) as usize));
    let faulty = FaultyDisk::new(&dir, "src", &src.disk);
    faulty.bad_reads(&[bad]);

    let image = dir.join("image");
    ok(&klon(&["backup", "--quiet", faulty.file.to_str().unwrap(), image.to_str().unwrap()]));
    drop(faulty);
    let target = dir.join("target.img");
    ok(&klon(&["restore", "--quiet", "--yes", image.to_str().unwrap(), target.to_str().unwrap()]));

    let size = 16 * MIB;
    assert_same(&src.disk, &target, 0, bad.0, "before the bad free blocks");
    assert_same(&src.disk, &target, bad.1, size - bad.1, "after the bad free blocks");
    assert_zeros(&target, bad.0, bad.1 - bad.0, "the bad free blocks");
    let restored = dir.join("restored-part.img");
    std::fs::write(&restored, read_at(&target, PART_START, PART_MIB * MIB)).unwrap();
    run("e2fsck", &["-f", "-n", restored.to_str().unwrap()]);
    let dumped = dir.join("dumped");
    std::fs::create_dir_all(&dumped).unwrap();
    run("debugfs", &["-R", &format!("rdump / {}", dumped.display()), restored.to_str().unwrap()]);
    for f in ["big.bin", "sub/notes.txt"] {
        assert_eq!(std::fs::read(dumped.join(f)).unwrap(), std::fs::read(src.files.join(f)).unwrap(), "{f}");
    }
}

/// A target disk file that holds a GPT and garbage, as a used disk does.
fn used_target(path: &Path, size: u64) {
    garbage_file(path, size);
    write_at(path, 0, &vec![0u8; MIB as usize]);
    write_at(path, size - MIB, &vec![0u8; MIB as usize]);
    run("sgdisk", &["-n", "1:2048:0", "-t", "1:8300", path.to_str().unwrap()]);
}

/// No partition table and no signature at either end of `disk`.
fn assert_table_wiped(disk: &Path, size: u64) {
    assert_zeros(disk, 0, MIB, "the target's first MiB");
    assert_zeros(disk, size - MIB, MIB, "the target's last MiB");
    let out = Command::new("blkid").args(["-p", disk.to_str().unwrap()]).output().unwrap();
    assert!(out.stdout.is_empty(), "blkid still finds {}", String::from_utf8_lossy(&out.stdout));
}

/// 3. A sector of the target that cannot be written: the restore stops
///    with exit 3 naming the target and the offset, and the target's
///    partition table is wiped.
#[test]
fn target_write_error_fails_the_restore_and_wipes_the_table() {
    require_root!();
    let dir = TempDir::new("fault-tgt");
    let src = ext4_source(&dir);
    let image = dir.join("image");
    ok(&klon(&["backup", "--quiet", src.disk.to_str().unwrap(), image.to_str().unwrap()]));

    let size = 16 * MIB;
    let backing = dir.join("target.img");
    used_target(&backing, size);
    let block = physical_block(&src.part, "/big.bin", 300);
    let bad = PART_START + block * BLOCK + 2048;
    let faulty = FaultyDisk::new(&dir, "tgt", &backing);
    faulty.bad_writes(&[(bad, bad + 512)]);
    let out = klon(&["restore", "--quiet", "--yes", image.to_str().unwrap(), faulty.file.to_str().unwrap()]);
    fails_with(&out, 3, &["writing", faulty.file.to_str().unwrap(), "Input/output error", "partition table was wiped"]);
    let err = stderr(&out);
    let named: u64 = err
        .split("at byte offset ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no offset named: {err}"));
    assert_eq!(named, bad / BLOCK * BLOCK, "the offset named is not the bad sector's page: {err}");
    drop(faulty);
    assert_table_wiped(&backing, size);
}

/// 3b. The target goes away in the middle of the restore: exit 3, and the
///     message says that wiping its table failed too.
#[test]
fn target_gone_mid_restore_says_the_table_could_not_be_wiped() {
    require_root!();
    let dir = TempDir::new("fault-tgt-gone");
    let src = ext4_source(&dir);
    let image = dir.join("image");
    ok(&klon(&["backup", "--quiet", src.disk.to_str().unwrap(), image.to_str().unwrap()]));
    let size = 16 * MIB;
    let backing = dir.join("target.img");
    used_target(&backing, size);
    let faulty = FaultyDisk::new(&dir, "tgt", &backing);
    // The initial wipe of both ends (2 MiB) and about 1 MiB of data.
    faulty.write_budget(3 * MIB);
    let out = klon(&["restore", "--quiet", "--yes", image.to_str().unwrap(), faulty.file.to_str().unwrap()]);
    assert!(faulty.is_gone(), "the restore did not write enough to use up the budget: {}", stderr(&out));
    fails_with(
        &out,
        3,
        &[faulty.file.to_str().unwrap(), "Input/output error", "wiping the target's partition table also failed"],
    );
}

/// An image drive: an ext4 filesystem on a faulty disk, loop-attached and
/// mounted (fields in drop order: unmount, detach, then stop nbdfuse).
struct ImageDrive {
    mounted: Option<Mounted>,
    lo: Option<LoopDevice>,
    faulty: FaultyDisk,
    mnt: PathBuf,
}

impl ImageDrive {
    fn new(dir: &TempDir, mib: u64) -> ImageDrive {
        let backing = dir.join("drive.img");
        blank_file(&backing, mib * MIB);
        run("mkfs.ext4", &["-q", "-F", "-b", "4096", backing.to_str().unwrap()]);
        let faulty = FaultyDisk::new(dir, "drive", &backing);
        let mnt = dir.join("drive");
        let mut drive = ImageDrive { mounted: None, lo: None, faulty, mnt };
        drive.plug();
        drive
    }

    fn plug(&mut self) {
        let lo = LoopDevice::attach_direct(&self.faulty.file);
        self.mounted = Some(Mounted::new(&lo.path, &self.mnt, "rw"));
        self.lo = Some(lo);
    }

    fn unplug(&mut self) {
        self.mounted = None;
        self.lo = None;
    }

    /// Where the blocks of `file` (on the mounted drive) are, as byte ranges of the drive.
    fn extents_of(&self, file: &Path) -> Vec<(u64, u64)> {
        let out = run("filefrag", &["-e", "-b4096", file.to_str().unwrap()]);
        out.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                if f.len() < 4 {
                    return None;
                }
                let phys = f[2].trim().split("..").collect::<Vec<_>>();
                let (a, b) = (phys[0].trim().parse::<u64>().ok()?, phys.get(1)?.trim().parse::<u64>().ok()?);
                Some((a * BLOCK, (b + 1) * BLOCK))
            })
            .collect()
    }
}

/// A 16 MiB source disk image whose one partition holds 8 MiB of random
/// bytes (copied raw: an image of about as much).
fn random_source(dir: &TempDir) -> PathBuf {
    let disk = dir.join("source.img");
    blank_file(&disk, 16 * MIB);
    run("sgdisk", &["-n", "1:2048:+12M", "-t", "1:8300", disk.to_str().unwrap()]);
    write_at(&disk, PART_START, &random_bytes(5, 8 << 20));
    disk
}

/// 4. The image drive goes away in the middle of a backup: exit 3, the
///    file being written is named, and once the drive is back nothing on
///    it is taken for an image.
#[test]
fn image_drive_gone_mid_backup_leaves_nothing_that_looks_complete() {
    require_root!();
    let dir = TempDir::new("fault-drive");
    let source = random_source(&dir);
    let mut drive = ImageDrive::new(&dir, 32);
    let image = drive.mnt.join("image");
    drive.faulty.write_budget(3 * MIB);
    let out = klon(&["backup", "--quiet", source.to_str().unwrap(), image.to_str().unwrap()]);
    assert!(drive.faulty.is_gone(), "the backup did not write enough to use up the budget: {}", stderr(&out));
    let partial = format!("{}.klon-partial", image.display());
    // Writing a data file, or flushing one the drive took into its cache;
    // or, when ext4 failed to write its journal first and switched to
    // read-only, the error says so.
    fails_with(&out, 3, &[&partial]);
    let err = stderr(&out);
    assert!(
        err.contains("Input/output error") || err.contains("switched to read-only by the kernel after an error"),
        "klon does not say the drive failed: {err}"
    );

    // Plugged in again: no image, and what is left is refused.
    drive.unplug();
    drive.faulty.come_back();
    drive.plug();
    assert!(!image.exists(), "a failed backup left {}", image.display());
    let v = klon(&["verify", image.to_str().unwrap()]);
    if Path::new(&partial).exists() {
        // klon could not have removed it: it must not say it did.
        let err = stderr(&out);
        assert!(!err.contains("was removed"), "klon says the unfinished image was removed, but it is there: {err}");
        assert!(err.contains(&format!("{partial}: delete it")), "klon does not say to delete {partial}: {err}");
        fails_with(&v, 4, &["did not finish"]);
        fails_with(&klon(&["verify", &partial]), 4, &["unfinished backup"]);
    } else {
        fails_with(&v, 2, &["no image at"]);
    }
}

/// 5. A bad sector in an image's data file: verify exits 3 naming the file
///    and the offset; a restore from it fails with exit 3 and leaves the
///    target without a partition table.
#[test]
fn image_drive_read_error_fails_verify_and_restore() {
    require_root!();
    let dir = TempDir::new("fault-drive-read");
    let source = random_source(&dir);
    let mut drive = ImageDrive::new(&dir, 32);
    let image = drive.mnt.join("image");
    ok(&klon(&["backup", "--quiet", source.to_str().unwrap(), image.to_str().unwrap()]));
    let data = std::fs::read_dir(&image)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e.len() == 3 && e.to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        })
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap_or_else(|| panic!("no data file in {}", image.display()));
    let extents = drive.extents_of(&data);
    assert!(!extents.is_empty(), "filefrag found no blocks of {}", data.display());
    // A sector 3 MiB into the data file.
    let mut rel = 3 * MIB;
    let mut bad = None;
    for &(a, b) in &extents {
        if rel < b - a {
            bad = Some(a + rel);
            break;
        }
        rel -= b - a;
    }
    let bad = bad.expect("data file shorter than 3 MiB");
    // Read from the drive again, not from the page cache.
    drive.unplug();
    drive.faulty.bad_reads(&[(bad, bad + 512)]);
    drive.plug();

    let out = klon(&["verify", "--quiet", image.to_str().unwrap()]);
    fails_with(&out, 3, &["reading", data.to_str().unwrap(), "at byte offset", "Input/output error"]);

    let size = 16 * MIB;
    let target = dir.join("target.img");
    used_target(&target, size);
    let out = klon(&["restore", "--quiet", "--yes", image.to_str().unwrap(), target.to_str().unwrap()]);
    fails_with(&out, 3, &["reading", data.to_str().unwrap(), "Input/output error", "partition table was wiped"]);
    assert_table_wiped(&target, size);
}

/// 1b. The same bad source sector in a clone: exit 3 naming the source's
///     block, and the target, half written, has its table wiped.
#[test]
fn source_read_error_fails_a_clone_and_wipes_the_target_table() {
    require_root!();
    let dir = TempDir::new("fault-clone");
    let src = ext4_source(&dir);
    let block = physical_block(&src.part, "/big.bin", 400);
    let bad = PART_START + block * BLOCK;
    let faulty = FaultyDisk::new(&dir, "src", &src.disk);
    faulty.bad_reads(&[(bad, bad + 512)]);
    let size = 16 * MIB;
    let target = dir.join("target.img");
    used_target(&target, size);
    let out = klon(&["clone", "--quiet", "--yes", faulty.file.to_str().unwrap(), target.to_str().unwrap()]);
    fails_with(
        &out,
        3,
        &[
            "reading",
            faulty.file.to_str().unwrap(),
            &format!("at byte offset {bad}"),
            "Input/output error",
            "partition table was wiped",
        ],
    );
    assert_table_wiped(&target, size);
}
