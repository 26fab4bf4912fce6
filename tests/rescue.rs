//! Backing up a disk with bad sectors: real read errors (EIO) from nbdkit's
//! ddrescue filter, exposed as a file by nbdfuse. Without `--rescue` a read
//! error stops the backup, naming where, and suggests `--rescue`; with it
//! klon reads around the bad sectors, stores them as zeros, records them in
//! the image, and `klon info` and the restore say so (tests/faults.rs
//! shows that bad sectors in a filesystem's free blocks are never read).
//! Needs root (FUSE).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::disks::*;
use common::failing::{FailingDisk, ext4_disk};
use common::loop_device::LoopDevice;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A read error inside used blocks stops a plain backup with an I/O error
/// that names the offset and suggests --rescue; no image is left. With
/// --rescue the backup completes with a warning, the image records the
/// unreadable range, `klon info` lists it, and a restore gives back the
/// partition with zeros there and every other byte equal.
#[test]
fn bad_sectors_in_used_blocks_stop_a_backup_or_are_rescued() {
    require_root!();
    let t = TempDir::new("rescue");
    let (disk, (pstart, plen), (fa, fl)) = ext4_disk(&t);
    // Three bad sectors in the file's data: two 8 KiB apart in one 64 KiB
    // piece (readable data between them, which only reading sector by
    // sector gets back), one in a piece of its own 256 KiB further.
    let bad1 = (fa + fl / 4) / (64 * 1024) * (64 * 1024) + 4096 + 512;
    let bad = [(bad1, 512), (bad1 + 8192, 512), (bad1 + 256 * 1024, 512)];
    assert!(bad1 > fa && bad[2].0 + 512 < fa + fl);
    let failing = FailingDisk::new(&t.0, &disk, &bad);
    let img = t.join("image");

    let o = klon(&["backup", "--quiet", s(&failing.path()), s(&img)]);
    fails_with(&o, 3, &["Input/output error", "--rescue"]);
    assert!(!img.exists(), "a failed backup left an image");

    let o = klon(&["backup", "--rescue", s(&failing.path()), s(&img)]);
    ok(&o);
    let err = stderr(&o);
    assert!(err.contains("could not be read") && err.contains("stored as zeros"), "{err}");
    let info = stdout(&klon(&["info", s(&img)]));
    assert!(info.contains("Unreadable:"), "{info}");
    let v: serde_json::Value = serde_json::from_str(&stdout(&klon(&["info", "--json", s(&img)]))).unwrap();
    assert_eq!(v["manifest"]["format_version"], 2, "a rescued image is format version 2");
    let p1 = v["manifest"]["streams"].as_array().unwrap().iter().find(|s| s["name"] == "p1").unwrap();
    let unreadable: Vec<(u64, u64)> =
        p1["unreadable"].as_array().unwrap().iter().map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap())).collect();
    // Each bad sector is found, with at most the reading unit around it
    // (the page cache reads this file 4 KiB at a time), and nothing else.
    assert_eq!(unreadable.len(), 3, "{unreadable:?}");
    for (&(a, l), &(b, bl)) in unreadable.iter().zip(&bad) {
        assert!(a <= b && b + bl <= a + l && l <= 4096, "unreadable {a}+{l} does not fit bad sector {b}+{bl}");
    }
    // What the second pass read sector by sector is a stream of its own.
    // Each range is named by its partition and its filesystem blocks, and
    // the hint's debugfs command, run as printed, leads to the file.
    for &(a, l) in &unreadable {
        let (first, last) = ((a - pstart) / 4096, (a + l - 1 - pstart) / 4096);
        let blocks = if first == last { format!("block {first}") } else { format!("blocks {first}-{last}") };
        let want = format!("{l} bytes at disk offset {a}: partition 1, ext4 {blocks} (4096-byte blocks)");
        assert!(info.contains(&want), "klon info does not say {want:?}:\n{info}");
    }
    let icheck = info.lines().find(|l| l.contains("icheck")).unwrap_or_else(|| panic!("no icheck hint:\n{info}"));
    let request = icheck.split('"').nth(1).unwrap();
    assert!(request.starts_with("icheck "), "{icheck}");
    assert!(icheck.contains("ncheck"), "{icheck}");
    let part = t.join("part.img");
    let said = run("debugfs", &["-R", request, s(&part)]);
    let inodes: Vec<&str> = said.lines().skip(1).filter_map(|l| l.split_whitespace().nth(1)).collect();
    assert_eq!(inodes.len(), 3, "debugfs {request}: {said}");
    let names = run("debugfs", &["-R", &format!("ncheck {}", inodes.join(" ")), s(&part)]);
    assert!(names.lines().skip(1).all(|l| l.ends_with("/data.bin")) && names.contains("/data.bin"), "{names}");
    let kinds: Vec<&str> =
        v["manifest"]["streams"].as_array().unwrap().iter().map(|s| s["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.last(), Some(&"rescued"), "{kinds:?}");
    ok(&klon(&["verify", s(&img)]));

    let dst = t.join("dst.img");
    let o = klon(&["restore", "--yes", s(&img), s(&dst)]);
    ok(&o);
    assert!(stderr(&o).contains("unreadable"), "the restore does not say the image has unreadable ranges");
    let src = std::fs::read(&disk).unwrap();
    let got = std::fs::read(&dst).unwrap();
    for (i, (x, y)) in src[pstart as usize..(pstart + plen) as usize]
        .iter()
        .zip(&got[pstart as usize..(pstart + plen) as usize])
        .enumerate()
    {
        let at = pstart + i as u64;
        let in_bad = unreadable.iter().any(|&(a, l)| a <= at && at < a + l);
        if in_bad {
            assert_eq!(*y, 0, "unreadable byte {at} not restored as zero");
        } else {
            assert_eq!(x, y, "byte {at} differs");
        }
    }
}

/// Removes a directory this test made under /run (the job's mount point)
/// if it was not there before.
struct RemoveIfNew(Vec<PathBuf>);

impl RemoveIfNew {
    fn new(dirs: &[&str]) -> RemoveIfNew {
        RemoveIfNew(dirs.iter().map(PathBuf::from).filter(|d| !d.exists()).collect())
    }
}

impl Drop for RemoveIfNew {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// The names in directory `dir` of the ext4 image `fs`.
fn ls(fs: &Path, dir: &str) -> Vec<String> {
    let out = run("debugfs", &["-R", &format!("ls -p {dir}"), s(fs)]);
    // -p: "/inode/mode/uid/gid/name/size/" per entry.
    out.lines()
        .filter_map(|l| l.split('/').nth(5))
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .map(String::from)
        .collect()
}

/// An unattended backup job (the live system's klon.conf) of a disk with a
/// bad sector in a file: without `rescue` it fails with an I/O error that
/// names the setting and leaves no image on the drive; with `rescue = yes`
/// it copies everything else, and its result line says how many bytes could
/// not be read, where, and that the image is not a perfect copy.
#[test]
fn unattended_backup_of_a_failing_disk_needs_the_rescue_setting() {
    require_root!();
    let t = TempDir::new("rescue-job");
    let (disk, _, (fa, fl)) = ext4_disk(&t);
    let bad = (fa + fl / 2) / 4096 * 4096 + 1024;
    let failing = FailingDisk::new(&t.0, &disk, &[(bad, 512)]);
    let src = LoopDevice::attach_direct(&failing.path());
    let drive_file = t.join("drive.img");
    run("mke2fs", &["-q", "-F", "-t", "ext4", "-L", "KLONJOBTEST", s(&drive_file), "64M"]);
    let drive = LoopDevice::attach_without_partitions(&drive_file);
    let _run_dirs = RemoveIfNew::new(&["/run/klon", "/run/klon/drive"]);
    let conf = format!(
        "job = backup\nsource = {}\nimage = pc\ndrive = {}\nwait = 5\nafter = poweroff\n",
        src.path.display(),
        drive.path.display()
    );
    let job = |extra: &str| {
        let settings = klon::job::from_config(&format!("{conf}{extra}"), "klon.conf").unwrap();
        klon::live::job::parse(&settings, &BTreeMap::new()).unwrap().expect("a job")
    };

    let e = klon::live::run_job(&job("")).expect_err("a backup of a failing disk without rescue succeeded");
    let msg = e.to_string();
    assert_eq!(e.exit_code(), 3, "{msg}");
    assert!(msg.contains("Input/output error") && msg.contains(&src.path.display().to_string()), "{msg}");
    assert!(msg.contains("rescue = yes") && msg.contains("klon.rescue=yes"), "the setting is not named: {msg}");
    assert!(ls(&drive_file, "/klon-images").is_empty(), "a failed job left {:?}", ls(&drive_file, "/klon-images"));

    let summary = klon::live::run_job(&job("rescue = yes\n")).expect("the rescue job");
    assert!(summary.contains("backup of") && summary.contains("NOT a perfect copy"), "{summary}");
    assert!(summary.contains("could not be read") && summary.contains("partition 1"), "{summary}");
    assert_eq!(ls(&drive_file, "/klon-images"), ["pc"]);
    // The image on the drive records the range and checks out.
    let out = t.join("out");
    std::fs::create_dir(&out).unwrap();
    run("debugfs", &["-R", &format!("rdump /klon-images/pc {}", out.display()), s(&drive_file)]);
    let img = out.join("pc");
    ok(&klon(&["verify", s(&img)]));
    let v: serde_json::Value = serde_json::from_str(&stdout(&klon(&["info", "--json", s(&img)]))).unwrap();
    let p1 = v["manifest"]["streams"].as_array().unwrap().iter().find(|s| s["name"] == "p1").unwrap();
    let ranges = p1["unreadable"].as_array().unwrap();
    assert_eq!(ranges.len(), 1, "{ranges:?}");
    let (a, l) = (ranges[0][0].as_u64().unwrap(), ranges[0][1].as_u64().unwrap());
    assert!(a <= bad && bad + 512 <= a + l && l <= 4096, "unreadable {a}+{l} does not fit the bad sector {bad}");
    assert!(summary.contains(&format!("{l} bytes")), "{summary}");
    drop(src);
}
