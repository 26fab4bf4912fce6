//! Disk discovery and safety checks on real (loop) block devices. Needs
//! root; skipped without it unless KLON_REQUIRE_ROOT_TESTS=1.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use common::loop_device::LoopDevice;
use klon::Error;
use klon::device::Disk;
use klon::device::safety::{check_image_dir_not_on, check_source, check_target};
use klon::device::sysfs::{identity, whole_disk_of};
use klon::inventory::{DiskInfo, list_disks};
use klon::ui::disks::render;

/// Loop devices are scarce and shared: run the root tests one at a time.
static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

const MIB: u64 = 1 << 20;

use common::disks::TempDir;

/// A mount made by a test; unmounted (and its directory removed) on drop,
/// also when the test fails.
struct Mounted {
    dir: PathBuf,
}

impl Mounted {
    fn new(dev: &Path, dir: &Path, opts: &str) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        sh("mount", &["-o", opts, dev.to_str().unwrap(), dir.to_str().unwrap()]);
        Mounted { dir: dir.to_path_buf() }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let d = self.dir.to_str().unwrap();
        let ok = Command::new("umount").arg(d).status().map(|s| s.success()).unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").args(["-l", d]).status();
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sparse_file(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// A 64 MiB GPT image: partition 1 at 1 MiB, 24 MiB (Linux), partition 2
/// right after it, 16 MiB (ESP).
fn gpt_image(path: &Path) {
    sparse_file(path, 64 * MIB);
    sh("sgdisk", &["-n", "1:2048:+24M", "-t", "1:8300", "-n", "2:0:+16M", "-t", "2:ef00", path.to_str().unwrap()]);
}

/// Attaches a GPT image with ext4 (label "kroot") on p1 and vfat ("KEFI")
/// on p2.
fn gpt_loop_with_fs(img: &Path) -> LoopDevice {
    gpt_image(img);
    let lo = LoopDevice::attach(img, None);
    let p1 = lo.partition(1);
    let p2 = lo.partition(2);
    sh("mkfs.ext4", &["-q", "-F", "-L", "kroot", p1.to_str().unwrap()]);
    sh("mkfs.vfat", &["-n", "KEFI", p2.to_str().unwrap()]);
    lo
}

fn rdev(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().rdev()
}

fn find(disks: &[DiskInfo], devno: u64) -> DiskInfo {
    disks.iter().find(|d| d.devno == devno).cloned().expect("loop device not listed")
}

fn refusal(r: klon::Result<()>) -> String {
    match r {
        Err(Error::Refused(m)) => m,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn lists_loop_disk_with_partitions_and_filesystems() {
    require_root!();
    let _g = lock();
    let t = TempDir::new("list");
    let img = t.0.join("gpt.img");
    let lo = gpt_loop_with_fs(&img);

    let disks = list_disks().unwrap();
    let d = find(&disks, rdev(&lo.path));
    assert_eq!(d.path, lo.path);
    assert_eq!(d.transport, "loop");
    assert_eq!(d.size, 64 * MIB);
    assert_eq!(d.logical_sector_size, 512);
    assert_eq!(d.loop_backing_file.as_deref(), Some(std::fs::canonicalize(&img).unwrap().as_path()));
    assert_eq!(d.partitions.len(), 2, "{d:?}");

    let p1 = &d.partitions[0];
    assert_eq!(p1.number, 1);
    assert_eq!(p1.path, lo.partition(1));
    assert_eq!(p1.devno, rdev(&lo.partition(1)));
    assert_eq!(p1.start, MIB);
    assert_eq!(p1.size, 24 * MIB);
    let fs1 = p1.fs.as_ref().expect("ext4 probed");
    assert_eq!(fs1.fstype, "ext4");
    // Types as sgdisk set them: 8300 (Linux filesystem) and ef00 (EFI system).
    assert_eq!(p1.type_id.as_deref(), Some("0FC63DAF-8483-4772-8E79-3D69D8477DE4"));
    assert_eq!(fs1.label.as_deref(), Some("kroot"));
    let blkid_uuid = sh("blkid", &["-p", "-s", "UUID", "-o", "value", p1.path.to_str().unwrap()]);
    assert_eq!(fs1.uuid.as_deref(), Some(blkid_uuid.trim()));
    assert!(p1.mountpoints.is_empty());
    assert!(!p1.in_use);

    let p2 = &d.partitions[1];
    assert_eq!(p2.number, 2);
    assert_eq!(p2.start, 25 * MIB);
    assert_eq!(p2.size, 16 * MIB);
    let fs2 = p2.fs.as_ref().expect("vfat probed");
    assert_eq!(fs2.fstype, "vfat");
    assert_eq!(p2.type_id.as_deref(), Some("C12A7328-F81F-11D2-BA4B-00A0C93EC93B"));
    assert_eq!(fs2.label.as_deref(), Some("KEFI"));

    assert_eq!(whole_disk_of(p1.devno), Some(d.devno));
    assert_eq!(whole_disk_of(d.devno), Some(d.devno));

    // The identity of the open device (what an image records of its
    // source) is the listed disk's, and a partition's is its disk's.
    let disk = Disk::open_read_only(&lo.path).unwrap();
    let id = identity(&disk).expect("identity of a block device");
    assert_eq!((&id.model, &id.serial, id.transport.as_str()), (&d.model, &d.serial, "loop"));
    let part = Disk::open_read_only(&lo.partition(1)).unwrap();
    assert_eq!(identity(&part), Some(id));
    // Files have no identity.
    assert!(identity(&Disk::open_read_only(&img).unwrap()).is_none());

    let table = render(std::slice::from_ref(&d), true);
    eprintln!("{table}");
    assert!(table.contains(lo.path.to_str().unwrap()));
    assert!(table.contains("kroot") && table.contains("KEFI"));
    assert!(table.lines().all(|l| l.chars().count() <= 80));

    // klon disks --json has lsblk's shape: the same devices, names and
    // numbers as lsblk --json --bytes says of them.
    let ours = klon::ui::disks::to_json(&[d]);
    let cols = "NAME,PATH,MAJ:MIN,SIZE,TYPE,RO,START";
    let theirs: serde_json::Value =
        serde_json::from_str(&sh("lsblk", &["--json", "--bytes", "-o", cols, lo.path.to_str().unwrap()])).unwrap();
    let (ours, theirs) = (&ours["blockdevices"][0], &theirs["blockdevices"][0]);
    let (kids, their_kids) = (ours["children"].as_array().unwrap(), theirs["children"].as_array().unwrap());
    assert_eq!(kids.len(), their_kids.len(), "{ours}\n{theirs}");
    for (a, b) in std::iter::once((ours, theirs)).chain(kids.iter().zip(their_kids)) {
        for key in ["name", "path", "maj:min", "size", "type", "ro", "start"] {
            if b.get(key).is_some_and(|v| !v.is_null()) || a.get(key).is_some() {
                assert_eq!(a[key], b[key], "{key}: klon {a}\nlsblk {b}");
            }
        }
    }
}

#[test]
fn native_4k_loop_reports_4096_byte_sectors() {
    require_root!();
    let _g = lock();
    let t = TempDir::new("4k");
    let img = t.0.join("4k.img");
    sparse_file(&img, 16 * MIB);
    let lo = LoopDevice::attach(&img, Some(4096));
    let d = find(&list_disks().unwrap(), rdev(&lo.path));
    assert_eq!(d.logical_sector_size, 4096);
    assert!(d.physical_sector_size >= 4096);
    assert_eq!(d.size, 16 * MIB);
    let disk = Disk::open_read_only(&lo.path).unwrap();
    assert_eq!(disk.logical_sector_size, 4096);
}

#[test]
fn mounted_partition_blocks_source_target_and_image_dir() {
    require_root!();
    let _g = lock();
    let t = TempDir::new("mounted");
    let img = t.0.join("gpt.img");
    let lo = gpt_loop_with_fs(&img);
    let disk = Disk::open_read_only(&lo.path).unwrap();
    let file_source = Disk::open_read_only(&img).unwrap();
    let mnt = t.0.join("mnt");
    let outside = t.0.join("images");

    {
        let _m = Mounted::new(&lo.partition(1), &mnt, "rw");

        let msg = refusal(check_source(&disk, false));
        assert!(msg.contains(lo.partition(1).to_str().unwrap()), "{msg}");
        assert!(msg.contains(mnt.to_str().unwrap()), "{msg}");
        assert!(msg.contains("--allow-mounted"), "{msg}");
        check_source(&disk, true).unwrap();

        let msg = refusal(check_target(&disk, None, None));
        assert!(msg.contains(lo.partition(1).to_str().unwrap()) && msg.contains("mounted"), "{msg}");
        // The partition itself as a target is refused too; its sibling is not.
        refusal(check_target(&Disk::open_read_only(&lo.partition(1)).unwrap(), None, None));
        check_target(&Disk::open_read_only(&lo.partition(2)).unwrap(), None, None).unwrap();

        // An image directory (existing or not yet) on the source disk.
        let msg = refusal(check_image_dir_not_on(&disk, &mnt.join("images/new")));
        assert!(msg.contains("image directory"), "{msg}");
        refusal(check_image_dir_not_on(&disk, &mnt));
        refusal(check_image_dir_not_on(&Disk::open_read_only(&lo.partition(1)).unwrap(), &mnt));
        check_image_dir_not_on(&Disk::open_read_only(&lo.partition(2)).unwrap(), &mnt).unwrap();
        // ...or inside a filesystem of the source image file.
        refusal(check_image_dir_not_on(&file_source, &mnt.join("x")));
        // The image file as a target while the image dir is inside it.
        let msg = refusal(check_target(&file_source, None, Some(&mnt.join("x"))));
        assert!(msg.contains("loop device over the target file"), "{msg}");
        check_image_dir_not_on(&disk, &outside).unwrap();

        // The image directory on the target disk is named as such; on a
        // sibling partition it is no obstacle.
        let msg = refusal(check_target(&disk, None, Some(&mnt.join("img"))));
        assert!(msg.contains("image directory"), "{msg}");
        let p2 = Disk::open_read_only(&lo.partition(2)).unwrap();
        check_target(&p2, None, Some(&mnt.join("img"))).unwrap();
    }

    // Unmounted: everything passes.
    check_source(&disk, false).unwrap();
    check_target(&disk, None, None).unwrap();
    check_target(&disk, None, Some(&outside)).unwrap();
    check_image_dir_not_on(&disk, &mnt.join("images")).unwrap();

    // Mounted read-only: fine as a source, still refused as a target.
    {
        let _m = Mounted::new(&lo.partition(1), &mnt, "ro");
        check_source(&disk, false).unwrap();
        refusal(check_target(&disk, None, None));
    }
    check_target(&disk, None, None).unwrap();
}

#[test]
fn target_that_is_the_source_is_refused() {
    require_root!();
    let _g = lock();
    let t = TempDir::new("same");
    let img = t.0.join("a.img");
    gpt_image(&img);
    let lo = LoopDevice::attach(&img, None);
    let dev = Disk::open_read_only(&lo.path).unwrap();
    let dev2 = Disk::open_read_only(&lo.path).unwrap();
    let p1 = Disk::open_read_only(&lo.partition(1)).unwrap();
    let p2 = Disk::open_read_only(&lo.partition(2)).unwrap();
    let file = Disk::open_read_only(&img).unwrap();

    let msg = refusal(check_target(&dev2, Some(&dev), None));
    assert!(msg.contains("source"), "{msg}");
    // A partition of the source, or the whole disk of a source partition.
    refusal(check_target(&p1, Some(&dev), None));
    refusal(check_target(&dev, Some(&p1), None));
    check_target(&p2, Some(&p1), None).unwrap();
    // The loop device over the source file, and the file behind a source
    // loop device.
    refusal(check_target(&dev, Some(&file), None));
    refusal(check_target(&p1, Some(&file), None));
    refusal(check_target(&file, Some(&dev), None));
    refusal(check_target(&file, Some(&file), None));

    // A second loop device over the same file is the same disk.
    let lo2 = LoopDevice::attach(&img, None);
    let other = Disk::open_read_only(&lo2.path).unwrap();
    refusal(check_target(&other, Some(&dev), None));

    // An unrelated file is fine.
    let b = t.0.join("b.img");
    sparse_file(&b, MIB);
    check_target(&Disk::open_read_only(&b).unwrap(), Some(&dev), None).unwrap();
    check_target(&dev, Some(&Disk::open_read_only(&b).unwrap()), None).unwrap();
}

/// A second loop device over a range of the same file (`losetup --offset
/// --sizelimit`, as a partition is attached on its own) shares sectors with
/// the first: while either one's filesystem there is mounted, the other is
/// refused as a target where the ranges overlap, naming the mounted device
/// and where it is mounted; where they do not overlap it is accepted.
#[test]
fn a_mounted_loop_device_over_the_same_file_blocks_the_overlapping_target() {
    require_root!();
    let _g = lock();
    let t = TempDir::new("loop-range");
    let img = t.0.join("gpt.img");
    let lo = gpt_loop_with_fs(&img);
    // Partition 1's range: 1 MiB on, 24 MiB long.
    let part = LoopDevice::attach_range(&img, MIB, 24 * MIB);
    let mnt = t.0.join("mnt");
    let whole = Disk::open_read_only(&lo.path).unwrap();
    let p1 = Disk::open_read_only(&lo.partition(1)).unwrap();
    let p2 = Disk::open_read_only(&lo.partition(2)).unwrap();
    let range = Disk::open_read_only(&part.path).unwrap();
    {
        let _m = Mounted::new(&part.path, &mnt, "rw");
        for target in [&whole, &p1] {
            let msg = refusal(check_target(target, None, None));
            eprintln!("{msg}");
            assert!(msg.contains(part.path.to_str().unwrap()), "{msg}");
            assert!(msg.contains(mnt.to_str().unwrap()), "{msg}");
            assert!(msg.contains(&format!("{}", target.path.display())), "{msg}");
        }
        check_target(&p2, None, None).unwrap();

        // The command line refuses it before writing anything (exit 5).
        let src = t.0.join("src.img");
        sparse_file(&src, 64 * MIB);
        let image = t.0.join("image");
        let o = Command::new(env!("CARGO_BIN_EXE_klon"))
            .args(["backup", "--no-verify", src.to_str().unwrap(), image.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let before = std::fs::read(&img).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_klon"))
            .args(["restore", "--yes", image.to_str().unwrap(), lo.path.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(5), "{err}");
        assert!(err.contains(part.path.to_str().unwrap()) && err.contains(mnt.to_str().unwrap()), "{err}");
        assert!(std::fs::read(&img).unwrap() == before, "a refused restore changed the disk");
    }
    // The other way round: partition 1 of the whole-file loop device is
    // mounted, the range device is the target.
    {
        let _m = Mounted::new(&lo.partition(1), &mnt, "rw");
        let msg = refusal(check_target(&range, None, None));
        assert!(msg.contains(lo.partition(1).to_str().unwrap()), "{msg}");
        assert!(msg.contains(mnt.to_str().unwrap()), "{msg}");
    }
    // Unmounted: no obstacle.
    check_target(&whole, None, None).unwrap();
    check_target(&range, None, None).unwrap();
}

/// A read-only target (`losetup -r`, or `blockdev --setro`) is refused
/// before anything is written (exit 5), saying it is read-only; klon opened
/// it and failed at the first write (exit 3).
#[test]
fn a_read_only_target_is_refused_up_front() {
    require_root!();
    let _g = lock();
    let t = TempDir::new("read-only");
    let (src, image, disk) = (t.0.join("src.img"), t.0.join("image"), t.0.join("disk.img"));
    sparse_file(&src, 4 * MIB);
    common::disks::write_at(&src, 0, &vec![0x5a; MIB as usize]);
    let klon = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_klon")).args(args).output().unwrap();
    let o = klon(&["backup", "--no-verify", src.to_str().unwrap(), image.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    sparse_file(&disk, 8 * MIB);

    let check = |dev: &Path, how: &str| {
        for args in [
            vec!["restore", "--yes", image.to_str().unwrap(), dev.to_str().unwrap()],
            vec!["clone", "--yes", src.to_str().unwrap(), dev.to_str().unwrap()],
        ] {
            let o = klon(&args);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(5), "{how}: {err}");
            assert!(err.contains(dev.to_str().unwrap()) && err.contains("read-only"), "{how}: {err}");
        }
    };
    {
        let out = sh("losetup", &["-f", "--show", "-r", disk.to_str().unwrap()]);
        let lo = LoopDevice { path: PathBuf::from(out.trim()) };
        check(&lo.path, "losetup -r");
    }
    {
        let lo = LoopDevice::attach(&disk, None);
        sh("blockdev", &["--setro", lo.path.to_str().unwrap()]);
        check(&lo.path, "blockdev --setro");
        sh("blockdev", &["--setrw", lo.path.to_str().unwrap()]);
    }
    assert!(std::fs::read(&disk).unwrap().iter().all(|&b| b == 0), "a refused restore wrote to the disk");
}
