//! `klon mount` and `klon umount`: an image or a repository's snapshot as
//! read-only files through FUSE. `disk.img` holds exactly what `klon
//! restore` writes onto a new file, each `pN.img` that partition's bytes;
//! a damaged chunk is EIO for the reader (and named on stderr) while the
//! rest still reads; refusals have the README's exit codes; `klon umount`
//! leaves no mount behind.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::disks::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Whether anything is mounted on `dir` (by /proc/self/mounts).
fn is_mounted(dir: &Path) -> bool {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(s(&dir)))
}

/// A mount made by a test: unmounted on drop whatever happened, with
/// `klon umount`, else the system's umount.
struct MountGuard(PathBuf);

impl MountGuard {
    /// Runs `klon mount IMAGE DIR` (stderr into `log`, as a terminal would
    /// show it) and checks it returned with the mount ready.
    fn new(image: &str, dir: &Path, log: &Path) -> MountGuard {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new(env!("CARGO_BIN_EXE_klon"))
            .args(["mount", image, s(dir)])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .status()
            .unwrap();
        let guard = MountGuard(dir.to_path_buf());
        assert!(status.success(), "klon mount failed ({status}): {}", std::fs::read_to_string(log).unwrap());
        assert!(is_mounted(dir), "klon mount returned, but nothing is mounted on {}", dir.display());
        guard
    }

    /// Runs `klon mount IMAGE DIR` with stderr a pipe (as a script that
    /// captures its output has it), read to its end once klon returns.
    fn piped(image: &str, dir: &Path) -> (MountGuard, String) {
        std::fs::create_dir_all(dir).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_klon"))
            .args(["mount", image, s(dir)])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let guard = MountGuard(dir.to_path_buf());
        assert!(o.status.success(), "klon mount failed ({}): {}", o.status, stderr(&o));
        assert!(is_mounted(dir), "klon mount returned, but nothing is mounted on {}", dir.display());
        (guard, stderr(&o))
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = klon(&["umount", s(&self.0)]);
        }
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// An MBR disk: partition 1 raw random data (20 MiB: three chunks),
/// partition 2 ext4 with files (24 MiB), boot code and text after the MBR.
fn source_disk(t: &TempDir, name: &str, seed: u64) -> (PathBuf, Vec<SfPart>) {
    let (disk, fs, files) = (t.join(name), t.join("fs.img"), t.join(&format!("{name}.files")));
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("a.bin"), random_bytes(seed, 3 << 20)).unwrap();
    std::fs::write(files.join("b.txt"), text_bytes(seed + 1, 500_000)).unwrap();
    blank_file(&disk, 48 * MIB);
    run_with_input(
        "sfdisk",
        &["-q", s(&disk)],
        "label: dos\nstart=2048, size=40960, type=83\nstart=43008, size=49152, type=83\n",
    );
    let (parts, sector) = sfdisk_parts(&disk);
    assert_eq!(sector, 512);
    write_at(&disk, parts[0].start * 512, &random_bytes(seed + 2, (20 * MIB) as usize));
    blank_file(&fs, parts[1].size * 512);
    run("mkfs.ext4", &["-q", "-F", "-d", s(&files), s(&fs)]);
    write_at(&disk, parts[1].start * 512, &std::fs::read(&fs).unwrap());
    std::fs::remove_file(&fs).unwrap();
    write_at(&disk, 0, &random_bytes(seed + 3, 440));
    write_at(&disk, 512, &text_bytes(seed + 4, 20000));
    (disk, parts)
}

/// Mounts `image` on `dir` and compares `disk.img` with `restored` (what
/// `klon restore` wrote), each `pN.img` with its partition there, and runs
/// e2fsck on the ext4 partition file as it is mounted; unmounts.
fn check_mount(image: &str, restored: &Path, parts: &[SfPart], dir: &Path, log: &Path) {
    let guard = MountGuard::new(image, dir, log);
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["disk.img", "p1.img", "p2.img"]);
    let want = std::fs::read(restored).unwrap();
    assert!(std::fs::read(dir.join("disk.img")).unwrap() == want, "disk.img differs from the restored disk ({image})");
    for (i, p) in parts.iter().enumerate() {
        let n = i + 1;
        let (start, len) = ((p.start * 512) as usize, (p.size * 512) as usize);
        let file = dir.join(format!("p{n}.img"));
        assert_eq!(std::fs::metadata(&file).unwrap().len(), len as u64);
        assert!(std::fs::read(&file).unwrap() == want[start..start + len], "p{n}.img differs ({image})");
    }
    // The filesystem checker reads the partition file in place.
    run("e2fsck", &["-fn", s(&dir.join("p2.img"))]);
    // A snapshot is held while mounted: one lock, of the process that
    // serves the mount (not of the one that started it, which is gone).
    let repo = Path::new(image.rsplit_once(':').map_or(image, |(r, _)| r));
    let locks = || -> Vec<PathBuf> {
        let files = std::fs::read_dir(repo.join("locks")).unwrap().map(|e| e.unwrap().path());
        files.filter(|p| p.extension().is_some_and(|e| e == "lock")).collect()
    };
    if repo.join("locks").is_dir() {
        let held = locks();
        assert_eq!(held.len(), 1, "{held:?}");
        let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&held[0]).unwrap()).unwrap();
        let pid = info["pid"].as_u64().unwrap();
        assert!(Path::new(&format!("/proc/{pid}")).exists(), "the lock names process {pid}, which is gone: {info}");
        let o = klon(&["forget", "--keep-last", "1", "--prune", s(repo)]);
        fails_with(&o, 5, &["is in use", "mount"]);
        assert!(!stderr(&o).contains("stale"), "{}", stderr(&o));
    }
    let o = klon(&["umount", s(dir)]);
    ok(&o);
    if repo.join("locks").is_dir() {
        // The serving process removes its lock as it ends, just after the
        // unmount.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !locks().is_empty() && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(locks(), Vec::<PathBuf>::new(), "locks left after the unmount");
    }
    assert!(!is_mounted(dir), "still mounted after klon umount");
    assert_eq!(std::fs::read_dir(dir).unwrap().count(), 0, "the mount point is not empty after klon umount");
    drop(guard);
}

#[test]
fn an_image_and_a_snapshot_read_as_restore_writes_them() {
    require_root!();
    let t = TempDir::new("mount");
    let (src, parts) = source_disk(&t, "src.img", 10);
    let (img, restored, dir, log) = (t.join("image"), t.join("restored.img"), t.join("mnt"), t.join("mount.log"));
    ok(&klon(&["backup", "--quiet", s(&src), s(&img)]));
    ok(&klon(&["restore", "--quiet", "--yes", s(&img), s(&restored)]));
    // Partition 1 is copied raw, the bytes outside partitions too: the
    // same as the source there (ext4's free blocks read as zeros).
    let source = std::fs::read(&src).unwrap();
    let p1 = &parts[0];
    let r = ((p1.start * 512) as usize, ((p1.start + p1.size) * 512) as usize);
    assert!(std::fs::read(&restored).unwrap()[..r.1] == source[..r.1]);
    check_mount(s(&img), &restored, &parts, &dir, &log);

    // A repository with two snapshots: the first one by its id still
    // reads as the first disk was.
    let repo = t.join("repo");
    ok(&klon(&["backup", "--quiet", "--repo", s(&src), s(&repo)]));
    let first = stdout(&klon(&["snapshots", "--json", s(&repo)]));
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    let id = first["snapshots"][0]["short_id"].as_str().unwrap().to_string();
    write_at(&src, p1.start * 512 + 5 * MIB, &random_bytes(99, MIB as usize));
    ok(&klon(&["backup", "--quiet", s(&src), s(&repo)]));
    let snap = format!("{}:{id}", s(&repo));
    check_mount(&snap, &restored, &parts, &dir, &log);
    // The latest one holds the change.
    let restored2 = t.join("restored2.img");
    ok(&klon(&["restore", "--quiet", "--yes", s(&repo), s(&restored2)]));
    assert!(std::fs::read(&restored2).unwrap() != std::fs::read(&restored).unwrap());
    check_mount(s(&repo), &restored2, &parts, &dir, &log);
}

/// The index entry of chunk `seq` of the stream whose index file is `index`:
/// (data file number, record offset, extent count).
fn index_entry(index: &Path, seq: u64) -> (u32, u64, u32) {
    let b = read_at(index, 32 + seq * 64, 64);
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    (u32_at(0), u64::from_le_bytes(b[8..16].try_into().unwrap()), u32_at(4))
}

#[test]
fn a_damaged_chunk_is_an_io_error_and_the_rest_still_reads() {
    require_root!();
    let t = TempDir::new("mount-damaged");
    let (src, parts) = source_disk(&t, "src.img", 20);
    let (img, dir, log) = (t.join("image"), t.join("mnt"), t.join("mount.log"));
    ok(&klon(&["backup", "--quiet", s(&src), s(&img)]));
    // Partition 1 (raw, 20 MiB of random data) is stored in several
    // chunks: damage one byte of the second one's payload.
    let (file, offset, extents) = index_entry(&img.join("p1.idx"), 1);
    let data = img.join(format!("p1.{file:03}"));
    assert!(data.exists(), "{} is not the data file's name", data.display());
    let at = offset + 80 + 16 * extents as u64 + 1000;
    let old = read_at(&data, at, 1)[0];
    write_at(&data, at, &[!old]);

    // Where chunk 1's bytes are on the disk: its header's extent table.
    let ext = read_at(&data, offset + 80, 16 * extents as u64);
    let u64_at = |o: usize| u64::from_le_bytes(ext[o..o + 8].try_into().unwrap());
    let (first, last) = (u64_at(0), u64_at(16 * (extents as usize - 1)) + u64_at(16 * (extents as usize - 1) + 8));
    let start = parts[0].start * 512;
    let (bad_from, bad_to) = (first - start, last - start);
    assert!(bad_from > 0 && bad_to < parts[0].size * 512 && bad_to - bad_from >= MIB, "{bad_from}..{bad_to}");

    let _guard = MountGuard::new(s(&img), &dir, &log);
    let p1 = std::fs::File::open(dir.join("p1.img")).unwrap();
    let source = std::fs::read(&src).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    // Inside chunk 1: EIO, at its start, its middle and its end.
    for off in [bad_from, ((bad_from + bad_to) / 2) & !4095, bad_to - 4096] {
        let e = p1.read_exact_at(&mut buf[..4096], off).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "reading p1.img at {off}: {e}");
    }
    // The chunks before and after it read, right up to it, and hold the
    // source's bytes.
    for off in [0, bad_from - MIB, bad_to, parts[0].size * 512 - MIB] {
        p1.read_exact_at(&mut buf, off).unwrap_or_else(|e| panic!("reading p1.img at {off}: {e}"));
        let at = (start + off) as usize;
        assert!(buf[..] == source[at..at + MIB as usize], "p1.img at {off}");
    }
    // The second partition too.
    let p2 = std::fs::read(dir.join("p2.img")).unwrap();
    assert_eq!(p2.len() as u64, parts[1].size * 512);
    run("e2fsck", &["-fn", s(&dir.join("p2.img"))]);
    // The message names the chunk and where it is.
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("I/O error (EIO)") && said.contains(s(&data)) && said.contains("chunk 1"), "{said}");
    assert!(said.contains("checksum"), "{said}");
    // Not while a file in it is open.
    fails_with(&klon(&["umount", s(&dir)]), 5, &["is in use", "still open"]);
    assert!(is_mounted(&dir));
    drop(p1);
    ok(&klon(&["umount", s(&dir)]));
    assert!(!is_mounted(&dir));

    // Mounted from a script that reads klon's stderr through a pipe (which
    // klon does not hold open once mounted, so the script is not kept
    // waiting): the message goes to the kernel log.
    let (guard, _) = MountGuard::piped(s(&img), &dir);
    let p1 = std::fs::File::open(dir.join("p1.img")).unwrap();
    let e = p1.read_exact_at(&mut buf[..4096], bad_from).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    drop(p1);
    let log = Command::new("dmesg").output().unwrap();
    let log = String::from_utf8_lossy(&log.stdout);
    let said = log.lines().filter(|l| l.contains("klon mount") && l.contains(s(&data))).collect::<Vec<_>>();
    assert!(said.iter().any(|l| l.contains("I/O error (EIO)") && l.contains("chunk 1")), "the kernel log has {said:?}");
    drop(guard);
    assert!(!is_mounted(&dir));
}

#[test]
fn refusals_have_their_exit_codes() {
    let t = TempDir::new("mount-refusals");
    let (_, img) = small_image(&t);
    let missing = t.join("missing");
    fails_with(&klon(&["mount", s(&img), s(&missing)]), 2, &["does not exist", "mkdir"]);
    let full = t.join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep.txt"), b"mine").unwrap();
    fails_with(&klon(&["mount", s(&img), s(&full)]), 5, &["is not empty", "use an empty directory"]);
    assert_eq!(std::fs::read(full.join("keep.txt")).unwrap(), b"mine");
    let dir = t.join("mnt");
    std::fs::create_dir(&dir).unwrap();
    let not_image = t.join("not-an-image");
    std::fs::create_dir(&not_image).unwrap();
    std::fs::write(not_image.join("notes.txt"), b"hello").unwrap();
    fails_with(&klon(&["mount", s(&not_image), s(&dir)]), 4, &["not a klon image"]);
    fails_with(&klon(&["mount", s(&not_image.join("notes.txt")), s(&dir)]), 2, &["is not an image directory"]);
    fails_with(&klon(&["mount", s(&t.join("nothing")), s(&dir)]), 2, &["does not exist"]);
    let cz = t.join("clonezilla");
    std::fs::create_dir(&cz).unwrap();
    std::fs::write(cz.join("disk"), b"sda\n").unwrap();
    std::fs::write(cz.join("clonezilla-img"), b"").unwrap();
    fails_with(&klon(&["mount", s(&cz), s(&dir)]), 1, &["cannot mount a Clonezilla image", "klon convert"]);
    assert!(!is_mounted(&dir));
    fails_with(&klon(&["umount", s(&dir)]), 2, &["nothing is mounted on"]);
    fails_with(&klon(&["umount", s(&missing)]), 2, &["does not exist"]);
}

#[test]
fn umount_refuses_what_klon_did_not_mount() {
    require_root!();
    let t = TempDir::new("mount-foreign");
    let dir = t.join("tmpfs");
    std::fs::create_dir(&dir).unwrap();
    run("mount", &["-t", "tmpfs", "-o", "size=1M", "tmpfs", s(&dir)]);
    let _m = Mounted(dir.clone());
    fails_with(&klon(&["umount", s(&dir)]), 5, &["is not a klon mount", "tmpfs"]);
    assert!(is_mounted(&dir));
}

/// The back files of the loop devices attached now.
fn loop_back_files() -> String {
    run("losetup", &["-l", "-n", "-O", "BACK-FILE"])
}

#[test]
fn mount_filesystems_mounts_each_read_only_and_umount_undoes_all() {
    require_root!();
    let t = TempDir::new("mount-fs");
    let (disk, files, dir, log) = (t.join("src.img"), t.join("files"), t.join("mnt"), t.join("mount.log"));
    std::fs::create_dir(&files).unwrap();
    let (a, b) = (random_bytes(31, 2 << 20), text_bytes(32, 300_000));
    std::fs::write(files.join("a.bin"), &a).unwrap();
    std::fs::write(files.join("b.txt"), &b).unwrap();
    // GPT: ext4 with files (24 MiB), FAT with a file (16 MiB), XFS
    // (64 MiB), raw data.
    blank_file(&disk, 112 * MIB);
    run_with_input(
        "sfdisk",
        &["-q", s(&disk)],
        "label: gpt\nstart=2048, size=49152, type=L\nsize=32768, type=U\nsize=131072, type=L\nsize=8192, type=L\n",
    );
    let (parts, _) = sfdisk_parts(&disk);
    let (p1, p2) = (parts[0].start * 512, parts[1].start * 512);
    run("mke2fs", &["-q", "-t", "ext4", "-d", s(&files), "-E", &format!("offset={p1}"), s(&disk), "24M"]);
    // A journal to replay (as after a crash): a read-only mount that would
    // replay it fails on a read-only device; klon mounts it without.
    let fs = format!("{}?offset={p1}", s(&disk));
    run("debugfs", &["-w", "-R", "feature needs_recovery", &fs]);
    let fat = t.join("fat.img");
    blank_file(&fat, parts[1].size * 512);
    run("mkfs.vfat", &["-n", "KLONFAT", s(&fat)]);
    run("mcopy", &["-i", s(&fat), s(&files.join("b.txt")), "::/B.TXT"]);
    write_at(&disk, p2, &std::fs::read(&fat).unwrap());
    let xfs = t.join("xfs.img");
    blank_file(&xfs, parts[2].size * 512);
    let xfs_env = [("TEST_DIR", "/tmp"), ("TEST_DEV", "/dev/null"), ("QA_CHECK_FS", "1")];
    run_env("mkfs.xfs", &["-q", "-L", "KLONXFS", s(&xfs)], &xfs_env);
    write_at(&disk, parts[2].start * 512, &std::fs::read(&xfs).unwrap());
    write_at(&disk, parts[3].start * 512, &random_bytes(33, (4 * MIB) as usize));
    let img = t.join("image");
    ok(&klon(&["backup", "--quiet", "--raw-unclean", s(&disk), s(&img)]));

    std::fs::create_dir(&dir).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_klon"))
        .args(["mount", "--mount-filesystems", s(&img), s(&dir)])
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .output()
        .unwrap();
    let _guard = MountGuard(dir.clone());
    ok(&o);
    let said = stdout(&o);
    assert!(said.contains("p1 (ext4): mounted on") && said.contains("(ro,noload)"), "{said}");
    assert!(said.contains("p3 (xfs): mounted on") && said.contains("(ro,norecovery)"), "{said}");
    assert!(!said.contains("p4 ("), "{said}");
    assert_eq!(std::fs::read(dir.join("p1/a.bin")).unwrap(), a);
    assert_eq!(std::fs::read(dir.join("p1/b.txt")).unwrap(), b);
    assert_eq!(std::fs::read_dir(dir.join("p3")).unwrap().count(), 0);
    assert!(!dir.join("p4").exists());
    // A kernel without a FAT driver (this host's has none): said so, and
    // the rest mounted all the same.
    let have_vfat = std::fs::read_to_string("/proc/filesystems").unwrap().lines().any(|l| l.ends_with("\tvfat"));
    let mut mounted = vec![(1, "ext4"), (3, "xfs")];
    if have_vfat {
        assert!(said.contains("p2 (vfat): mounted on"), "{said}");
        assert_eq!(std::fs::read(dir.join("p2/B.TXT")).unwrap(), b);
        mounted.push((2, "vfat"));
    } else {
        assert!(said.contains("p2 (vfat): not mounted: the kernel has no vfat driver"), "{said}");
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    for (n, fstype) in mounted {
        let at = format!("{}/p{n}", s(&dir));
        let line = mounts.lines().find(|l| l.split(' ').nth(1) == Some(&at)).unwrap_or_else(|| panic!("{mounts}"));
        assert!(line.split(' ').nth(2) == Some(fstype) && line.split(' ').nth(3).unwrap().starts_with("ro,"), "{line}");
    }
    assert!(loop_back_files().contains(s(&dir)), "{}", loop_back_files());
    // Not while a file in a filesystem is open: that one is named.
    let open = std::fs::File::open(dir.join("p1/a.bin")).unwrap();
    fails_with(&klon(&["umount", s(&dir)]), 5, &["is in use", &format!("{}/p1", s(&dir))]);
    drop(open);
    ok(&klon(&["umount", s(&dir)]));
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(s(&dir)), "{mounts}");
    assert!(!loop_back_files().contains(s(&dir)), "a loop device is left: {}", loop_back_files());
}
