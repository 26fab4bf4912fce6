//! A disk with bad sectors: nbdkit's ddrescue filter over a disk image,
//! exposed as a file by nbdfuse (real EIO on reads of the bad sectors),
//! and an ext4 disk whose file data can be made unreadable.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::disks::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `disk` served by nbdkit with the sectors `bad` (byte ranges) failing
/// every read with EIO, as the file `<dir>/mnt/disk`; unmounted on drop.
pub struct FailingDisk {
    mnt: PathBuf,
    child: Child,
}

impl FailingDisk {
    pub fn new(dir: &Path, disk: &Path, bad: &[(u64, u64)]) -> FailingDisk {
        let size = std::fs::metadata(disk).unwrap().len();
        // A ddrescue mapfile: '+' read fine, '-' bad sector.
        let mut map = String::from("# Mapfile\n0x0 +\n");
        let mut pos = 0u64;
        for &(a, l) in bad {
            if a > pos {
                map += &format!("{pos:#x} {:#x} +\n", a - pos);
            }
            map += &format!("{a:#x} {l:#x} -\n");
            pos = a + l;
        }
        if pos < size {
            map += &format!("{pos:#x} {:#x} +\n", size - pos);
        }
        let mapfile = dir.join("map");
        std::fs::write(&mapfile, map).unwrap();
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let child = Command::new("nbdfuse")
            .arg(mnt.join("disk"))
            .args(["--command", "nbdkit", "-s", "--filter=ddrescue", "file"])
            .arg(disk)
            .arg(format!("ddrescue-mapfile={}", mapfile.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run nbdfuse (package nbdfuse; scripts/test installs it)");
        let d = FailingDisk { mnt, child };
        for _ in 0..100 {
            if d.path().exists() {
                return d;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("nbdfuse did not expose {}", d.path().display());
    }

    pub fn path(&self) -> PathBuf {
        self.mnt.join("disk")
    }
}

impl Drop for FailingDisk {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3").arg("-u").arg(&self.mnt).status();
        for _ in 0..50 {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An MBR disk with one ext4 partition at 1 MiB holding one file of random
/// data; returns the disk, the partition's (start, size), and the disk
/// byte range of the file's data.
pub fn ext4_disk(t: &TempDir) -> (PathBuf, (u64, u64), (u64, u64)) {
    let (disk, part, files) = (t.join("disk.img"), t.join("part.img"), t.join("files"));
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("data.bin"), random_bytes(31, (6 * MIB) as usize)).unwrap();
    blank_file(&part, 31 * MIB);
    run("mkfs.ext4", &["-q", "-F", "-b", "4096", "-d", s(&files), s(&part)]);
    // Where the file's blocks are, from the filesystem's own tool.
    let stat = run("debugfs", &["-R", "stat /data.bin", s(&part)]);
    let extents = stat.lines().skip_while(|l| !l.starts_with("EXTENTS:")).nth(1).unwrap().to_string();
    // "(0-1535):1234-2769" (maybe more after a comma): the first run.
    let run0 = extents.split(',').next().unwrap();
    let phys = run0.split(':').nth(1).unwrap().trim();
    let (a, b) = phys.split_once('-').unwrap();
    let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
    assert!(b - a > 64, "the file's first run is too short: {extents}");
    blank_file(&disk, 33 * MIB);
    run_with_input("sfdisk", &["-q", s(&disk)], "label: dos\nstart=2048, size=63488, type=83\n");
    let start = MIB;
    let bytes = std::fs::read(&part).unwrap();
    write_at(&disk, start, &bytes);
    let file_data = (start + a * 4096, (b - a + 1) * 4096);
    (disk, (start, 31 * MIB), file_data)
}
