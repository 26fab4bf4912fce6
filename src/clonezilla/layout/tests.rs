//! Tests of the Clonezilla image reader: pure parsing tests, and tests on
//! images `ocs-sr savedisk` makes of loop devices (root only). Each of the
//! latter builds one disk, saves it once and runs all its checks, so the
//! slow save happens once per disk layout.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

use super::files::{codec_of, parse_image_name, piece_suffix};
use super::sfdisk::parse_attrs;
use super::*;
use crate::clonezilla::{Codec, ImageKind};
use crate::device::Disk;
use crate::table::DiskLayout;
use crate::testutil::{Rng, TempDir, TempFile, have_root, run, sh, try_sh};

const MIB: u64 = 1 << 20;

#[test]
fn piece_suffixes_follow_gnu_split() {
    let s: Vec<String> = [0, 1, 25, 26, 649, 650, 651, 650 + 25 * 26 * 26 - 1, 650 + 25 * 26 * 26]
        .iter()
        .map(|&i| piece_suffix(i))
        .collect();
    assert_eq!(s, ["aa", "ab", "az", "ba", "yz", "zaaa", "zaab", "zyzz", "zzaaaa"]);
}

#[test]
fn partition_numbers_from_names() {
    assert_eq!(part_number("sda", "sda5"), Some(5));
    assert_eq!(part_number("nvme0n1", "nvme0n1p2"), Some(2));
    assert_eq!(part_number("loop0", "loop0p1"), Some(1));
    assert_eq!(part_number("mmcblk0", "mmcblk0p12"), Some(12));
    assert_eq!(part_number("sda", "sdb1"), None);
    assert_eq!(part_number("sda", "sda"), None);
    assert_eq!(part_number("nvme0n1", "nvme0n11"), None);
    assert_eq!(part_number("sda", "sda05"), None);
}

#[test]
fn image_names() {
    let p = parse_image_name("ext4-ptcl-img.zst").unwrap();
    assert_eq!((p.0.as_str(), p.1, p.2.as_deref(), p.3.as_deref()), ("ext4", ImageKind::Partclone, Some("zst"), None));
    let p = parse_image_name("dd-ptcl-img.gz.ac").unwrap();
    assert_eq!((p.0.as_str(), p.2.as_deref(), p.3.as_deref()), ("dd", Some("gz"), Some("ac")));
    let p = parse_image_name("ntfs-img.gz.aa").unwrap();
    assert_eq!((p.1, p.2.as_deref(), p.3.as_deref()), (ImageKind::Ntfsclone, Some("gz"), Some("aa")));
    let p = parse_image_name("dd-img.uncomp").unwrap();
    assert_eq!((p.1, p.2.as_deref()), (ImageKind::Raw, Some("uncomp")));
    let p = parse_image_name("ntfs-img.aa").unwrap();
    assert_eq!((p.2.as_deref(), p.3.as_deref()), (None, Some("aa")));
    assert!(parse_image_name("info").is_none());
    assert!(codec_of("lzo", "sda1.ext4-ptcl-img.lzo").unwrap_err().to_string().contains("lzop"));
}

#[test]
fn sfdisk_dump_lines() {
    let text = "label: gpt\nlabel-id: EB6E7D07-BA19-4340-BCC2-92B1B136F3FA\ndevice: /dev/sda\nunit: sectors\n\
                first-lba: 34\nlast-lba: 2047966\nsector-size: 512\n\n\
                /dev/sda1 : start=2048, size=4096, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, \
                uuid=438B82CE-9B65-A345-B013-8085F0F2B6F8, name=\"a, \\\"b\\\"\", attrs=\"RequiredPartition GUID:60,63\"\n";
    let d = parse_sf(text, "sda-pt.sf").unwrap();
    assert_eq!(d.label, "gpt");
    assert_eq!((d.first_lba, d.last_lba, d.sector_size), (Some(34), Some(2047966), Some(512)));
    assert_eq!(d.parts.len(), 1);
    assert_eq!(d.parts[0].name.as_deref(), Some("a, \"b\""));
    assert_eq!(parse_attrs(d.parts[0].attrs.as_deref().unwrap()), Some(1 | 1 << 60 | 1 << 63));
    let e = parse_sf("label: dos\nunit: sectors\n/dev/sda1 : start= x, size=3, type=83\n", "sda-pt.sf").unwrap_err();
    assert!(matches!(e, Error::Corrupt(_)) && e.to_string().contains("sda-pt.sf line 3"), "{e}");
    let e = parse_sf("label: dos\n/dev/sda1 : start=1, size=3, type=83\n", "sda-pt.sf").unwrap_err();
    assert!(e.to_string().contains("unit"), "{e}");
}

// ---------------------------------------------------------------------
// Images made by ocs-sr on loop devices.

/// ocs-sr runs one at a time (it probes all disks and uses fixed paths).
static OCS: Mutex<()> = Mutex::new(());

/// A loop device over a file, with its partitions; detached on drop.
type Loop = crate::testutil::LoopDevice;

/// What the tests here do with a partitioned loop device.
trait LoopParts {
    /// The node of partition `n`, once the kernel and devtmpfs have it.
    fn part(&self, n: u32) -> String;
    /// Writes `data` at byte `off` of the whole device.
    fn write_at(&self, data: &[u8], off: u64);
}

impl LoopParts for Loop {
    fn part(&self, n: u32) -> String {
        self.partition(n).display().to_string()
    }

    fn write_at(&self, data: &[u8], off: u64) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&self.path).unwrap();
        f.write_all_at(data, off).unwrap();
        f.sync_all().unwrap();
    }
}

/// An image directory in /home/partimag, removed on drop.
struct OcsImage(PathBuf);

impl Drop for OcsImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A source disk saved by ocs-sr: the backing file (read for the expected
/// bytes), the layout klon reads from the loop device, the image.
struct Saved {
    file: TempFile,
    layout: DiskLayout,
    image: OcsImage,
    dev: String,
}

impl Saved {
    fn source_bytes(&self, off: u64, len: usize) -> Vec<u8> {
        let d = Disk::open_source(&self.file.0).unwrap();
        let mut b = vec![0u8; len];
        d.read_exact_at(&mut b, off).unwrap();
        b
    }
}

/// Partitions a `size`-byte disk with the sfdisk `script`, lets `fill`
/// put filesystems and data on it, and saves it with `ocs-sr <opts>
/// savedisk`.
fn save_disk(tag: &str, size: u64, script: &str, opts: &[&str], fill: impl FnOnce(&Loop)) -> Saved {
    let file = TempFile::new(tag, size);
    let lp = Loop::attach(&file.0, None);
    let mut child = Command::new("sfdisk")
        .args(["-q", lp.dev()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "sfdisk: {}", String::from_utf8_lossy(&out.stderr));
    let _ = try_sh("partx", &["-a", lp.dev()]);
    fill(&lp);
    let layout = crate::table::read_layout(&Disk::open_source(&lp.path).unwrap()).unwrap();
    let name = format!("klon-cz-test-{tag}-{}", std::process::id());
    let image = OcsImage(Path::new("/home/partimag").join(&name));
    let _ = std::fs::remove_dir_all(&image.0);
    std::fs::create_dir_all("/home/partimag").unwrap();
    {
        let _one = OCS.lock().unwrap_or_else(|e| e.into_inner());
        let mut cmd = Command::new("ocs-sr");
        cmd.args(["-q2", "-b", "-sfsck", "-scs", "-senc", "-p", "true"]).args(opts);
        cmd.args(["savedisk", &name, lp.name()]).env("TERM", "dumb");
        let started = Instant::now();
        let (ok, text) = crate::testutil::try_run(&mut cmd);
        eprintln!("ocs-sr {opts:?} savedisk took {:?}", started.elapsed());
        assert!(ok && image.0.join("disk").is_file(), "ocs-sr failed:\n{}", &text[text.len().saturating_sub(3000)..]);
    }
    let dev = lp.name().to_string();
    drop(lp);
    Saved { file, layout, image, dev }
}

fn mkfs(prog: &str, args: &[&str], dev: &str) {
    let mut a: Vec<&str> = args.to_vec();
    a.push(dev);
    run(Command::new(prog).args(&a));
}

/// A copy of the image directory to damage.
fn copy_of(img: &Path) -> TempDir {
    let t = TempDir::new("cz-damaged");
    sh("cp", &["-a", &format!("{}/.", img.display()), t.0.to_str().unwrap()]);
    t
}

fn corrupt_naming(r: Result<impl std::fmt::Debug>, needle: &str) {
    match r {
        Err(e @ Error::Corrupt(_)) => assert!(e.to_string().contains(needle), "{e} does not name {needle}"),
        other => panic!("expected Corrupt naming {needle}, got {other:?}"),
    }
}

/// Checks what every image must satisfy: the layout equals klon's reading
/// of the source device, the boot bytes are the source's bytes, every
/// checksum file passes.
fn check_common(s: &Saved, img: &CzImage) {
    assert_eq!(img.disk, s.dev);
    assert_eq!(img.layout, s.layout, "layout from the Clonezilla image differs from the source device's");
    let mut end = 0;
    for (off, bytes) in &img.boot {
        assert!(*off >= end, "boot areas overlap or are unsorted");
        end = off + bytes.len() as u64;
        assert!(bytes == &s.source_bytes(*off, bytes.len()), "boot bytes at {off} differ from the source disk");
    }
    assert!(!img.checksum_files.is_empty());
    for f in &img.checksum_files {
        let n = check_file(&img.dir, f).unwrap();
        assert!(n >= 5, "{} checked only {n} files", f.display());
    }
    for p in &img.partitions {
        let lp = img.layout.partitions.iter().find(|q| q.number == p.number).unwrap();
        assert_eq!(p.size, lp.size);
        assert!(p.pieces.iter().all(|f| f.is_file()));
    }
}

use super::checksums::check_file;

#[test]
fn mbr_with_logical_partitions_zstd() {
    if !have_root() {
        eprintln!("skipping: needs root for loop devices and ocs-sr");
        return;
    }
    let script = "label: dos\n,32M,83,*\n,16M,82\n,,5\n,24M,c\n,24M,7\n,8M,83\n";
    let opts = ["-j2", "-z9p", "-i", "0", "-gm", "-gs", "-gb"];
    let mut rng = Rng::seeded(7);
    let s = save_disk("mbr", 128 * MIB, script, &opts, |lp| {
        mkfs("mkfs.ext4", &["-q", "-F"], &lp.part(1));
        mkfs("mkswap", &["-L", "swp", "-U", "0b51ce79-7bc0-4111-8a40-839461a9b12f"], &lp.part(2));
        mkfs("mkfs.vfat", &[], &lp.part(5));
        mkfs("mkntfs", &["-Q", "-q", "-F"], &lp.part(6));
        let p7 = lp.part(7);
        let f = std::fs::OpenOptions::new().write(true).open(&p7).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &rng.bytes(2 * MIB as usize), 0).unwrap();
        // Boot code and hidden data, as a boot loader leaves them.
        lp.write_at(&rng.bytes(440), 0);
        lp.write_at(&rng.bytes(2047 * 512), 512);
    });
    let img = CzImage::open(&s.image.0).unwrap();
    check_common(&s, &img);
    assert!(is_clonezilla_image(&s.image.0));
    // The MBR, the hidden data and the three EBRs sfdisk wrote.
    let offsets: Vec<u64> = img.boot.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, [0, 512, 100352 * 512, 151552 * 512, 202752 * 512]);
    let parts: Vec<(u32, &str, Codec, usize)> =
        img.partitions.iter().map(|p| (p.number, p.fs.as_str(), p.codec, p.pieces.len())).collect();
    assert_eq!(
        parts,
        [
            (1, "ext4", Codec::Zstd, 1),
            (5, "vfat", Codec::Zstd, 1),
            (6, "ntfs", Codec::Zstd, 1),
            (7, "dd", Codec::Zstd, 1)
        ]
    );
    assert!(img.partitions.iter().all(|p| p.kind == ImageKind::Partclone));
    assert_eq!(img.swap.len(), 1);
    assert_eq!(img.swap[0].number, 2);
    assert_eq!(img.swap[0].label.as_deref(), Some("swp"));
    assert_eq!(img.swap[0].uuid.as_deref(), Some("0B51CE79-7BC0-4111-8A40-839461A9B12F"));
    assert_eq!(img.checksum_files.len(), 3);
    assert!(img.warnings.is_empty(), "{:?}", img.warnings);

    let d = s.dev.clone();
    // A flipped byte in a partition image: every checksum file names it.
    let t = copy_of(&s.image.0);
    let victim = t.join(&format!("{d}p7.dd-ptcl-img.zst"));
    let mut b = std::fs::read(&victim).unwrap();
    b[1000] ^= 0x40;
    std::fs::write(&victim, b).unwrap();
    for sums in ["MD5SUMS", "SHA1SUMS", "B2SUMS"] {
        corrupt_naming(check_file(&t.0, Path::new(sums)), &format!("{d}p7.dd-ptcl-img.zst"));
    }
    // A missing partition image.
    std::fs::remove_file(t.join(&format!("{d}p5.vfat-ptcl-img.zst"))).unwrap();
    corrupt_naming(CzImage::open(&t.0), &format!("image file for {d}p5 is missing"));
    corrupt_naming(check_file(&t.0, Path::new("MD5SUMS")), &format!("{d}p5.vfat-ptcl-img.zst"));

    // A damaged dump.
    let t = copy_of(&s.image.0);
    let sf = t.join(&format!("{d}-pt.sf"));
    let text = std::fs::read_to_string(&sf).unwrap().replace("start=       67584", "start=       6x584");
    std::fs::write(&sf, text).unwrap();
    corrupt_naming(CzImage::open(&t.0), &format!("{d}-pt.sf line 8"));
    // Overlapping partitions in the dump.
    let text = std::fs::read_to_string(s.image.0.join(format!("{d}-pt.sf")))
        .unwrap()
        .replace("start=       67584", "start=       67000");
    std::fs::write(&sf, text).unwrap();
    corrupt_naming(CzImage::open(&t.0), &format!("{d}-pt.sf"));

    // Hidden data not saved: a warning. The MBR's entries damaged: rebuilt
    // from the dump, byte for byte what sfdisk wrote. No saved EBR: the
    // built one (sfdisk leaves its code area zero, like the source's).
    let t = copy_of(&s.image.0);
    std::fs::remove_file(t.join(&format!("{d}-hidden-data-after-mbr"))).unwrap();
    std::fs::remove_file(t.join(&format!("{d}p3-ebr"))).unwrap();
    let mbr = t.join(&format!("{d}-mbr"));
    let mut b = std::fs::read(&mbr).unwrap();
    b[446 + 16 + 8] ^= 0x10; // start of partition 2
    std::fs::write(&mbr, b).unwrap();
    let img2 = CzImage::open(&t.0).unwrap();
    assert_eq!(img2.layout, s.layout);
    assert_eq!(img2.boot.len(), 4);
    for (off, bytes) in &img2.boot {
        assert!(bytes == &s.source_bytes(*off, bytes.len()), "boot bytes at {off} differ from the source disk");
    }
    assert!(img2.warnings.iter().any(|w| w.contains("without -j2")), "{:?}", img2.warnings);
    assert!(img2.warnings.iter().any(|w| w.contains("entries are rebuilt")), "{:?}", img2.warnings);

    // Without parted's record the disk size is unknown: refused.
    let t = copy_of(&s.image.0);
    std::fs::write(t.join(&format!("{d}-pt.parted")), "").unwrap();
    let e = CzImage::open(&t.0).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)) && e.to_string().contains("size of the source disk"), "{e}");

    // Several disks; a saveparts image.
    let t = copy_of(&s.image.0);
    std::fs::write(t.join("disk"), format!("{d} sdb\n")).unwrap();
    let e = CzImage::open(&t.0).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)) && e.to_string().contains(&format!("{d}, sdb")), "{e}");
    // Without `disk` it is a saveparts image: its disk is the one whose
    // table dump is there; without that dump it is refused.
    std::fs::remove_file(t.join("disk")).unwrap();
    let parts = CzImage::open(&t.0).unwrap();
    assert!(parts.saveparts && parts.disk == d, "{:?}", parts.disk);
    std::fs::remove_file(t.join(&format!("{d}-pt.sf"))).unwrap();
    let e = CzImage::open(&t.0).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)) && e.to_string().contains("saveparts"), "{e}");
}

#[test]
fn gpt_split_gzip() {
    if !have_root() {
        eprintln!("skipping: needs root for loop devices and ocs-sr");
        return;
    }
    let script = "label: gpt\nsize=24M, type=L, name=\"root\"\nsize=8M, type=S\n\
                  size=16M, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name=\"data, more\"\n\
                  size=4M, type=L, name=\"raw\"\nsize=32M, type=U, attrs=\"LegacyBIOSBootable\"\n";
    let opts = ["-j2", "-z1p", "-i", "1", "-gm", "-gb"];
    let mut rng = Rng::seeded(11);
    let s = save_disk("gpt", 160 * MIB, script, &opts, |lp| {
        mkfs("mkfs.ext4", &["-q", "-F"], &lp.part(1));
        mkfs("mkswap", &[], &lp.part(2));
        mkfs("mkntfs", &["-Q", "-q", "-F"], &lp.part(3));
        mkfs("mkfs.vfat", &[], &lp.part(5));
        let p4 = lp.part(4);
        let f = std::fs::OpenOptions::new().write(true).open(&p4).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &rng.bytes(4 * MIB as usize), 0).unwrap();
        lp.write_at(&rng.bytes(440), 0);
    });
    let img = CzImage::open(&s.image.0).unwrap();
    check_common(&s, &img);
    let g = img.layout.gpt.as_ref().unwrap();
    assert!(g.primary_valid && g.backup_valid);
    // Primary table (sectors 0..34), backup entry array and header.
    let total = 160 * MIB / 512;
    let offsets: Vec<(u64, usize)> = img.boot.iter().map(|(o, b)| (*o, b.len())).collect();
    assert_eq!(offsets, [(0, 34 * 512), ((total - 33) * 512, 32 * 512), ((total - 1) * 512, 512)]);
    let d = s.dev.clone();
    let p4 = img.partitions.iter().find(|p| p.number == 4).unwrap();
    let names: Vec<String> = p4.pieces.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    let want: Vec<String> =
        ["aa", "ab", "ac", "ad", "ae"].iter().map(|x| format!("{d}p4.dd-ptcl-img.gz.{x}")).collect();
    assert_eq!(names, want);
    assert!(img.partitions.iter().all(|p| p.codec == Codec::Gzip));
    let nums: Vec<u32> = img.partitions.iter().map(|p| p.number).collect();
    assert_eq!(nums, [1, 3, 4, 5]);
    assert_eq!(img.swap.iter().map(|s| s.number).collect::<Vec<_>>(), [2]);
    assert_eq!(img.checksum_files.len(), 2);

    // A missing piece.
    let t = copy_of(&s.image.0);
    std::fs::remove_file(t.join(&format!("{d}p4.dd-ptcl-img.gz.ac"))).unwrap();
    corrupt_naming(CzImage::open(&t.0), "piece .ac");
    corrupt_naming(check_file(&t.0, Path::new("B2SUMS")), &format!("{d}p4.dd-ptcl-img.gz.ac"));
    // A dump that disagrees with the saved GPT.
    let t = copy_of(&s.image.0);
    let sf = t.join(&format!("{d}-pt.sf"));
    let text = std::fs::read_to_string(&sf).unwrap().replace("size=        8192", "size=        8000");
    std::fs::write(&sf, text).unwrap();
    corrupt_naming(CzImage::open(&t.0), &format!("{d}-gpt-1st and {d}-pt.sf"));
    // A damaged backup copy: refused as a source of bytes, the restore rebuilds it.
    let t = copy_of(&s.image.0);
    let f = t.join(&format!("{d}-gpt-2nd"));
    let mut b = std::fs::read(&f).unwrap();
    let n = b.len();
    b[n - 512 + 60] ^= 1; // in the disk GUID: the header CRC fails
    std::fs::write(&f, b).unwrap();
    let img2 = CzImage::open(&t.0).unwrap();
    assert!(!img2.layout.gpt.as_ref().unwrap().backup_valid);
    assert_eq!(img2.boot.len(), 1);
    assert!(img2.warnings.iter().any(|w| w.contains(&format!("{d}-gpt-2nd"))), "{:?}", img2.warnings);
    // Without parted's record a GPT disk's size still shows in its header.
    let t = copy_of(&s.image.0);
    std::fs::write(t.join(&format!("{d}-pt.parted")), "").unwrap();
    let img3 = CzImage::open(&t.0).unwrap();
    assert_eq!(img3.layout, s.layout);
    assert!(img3.warnings.iter().any(|w| w.contains("primary GPT header")), "{:?}", img3.warnings);
    // A codec suffix that lies about the data.
    let t = copy_of(&s.image.0);
    let from = t.join(&format!("{d}p5.vfat-ptcl-img.gz.aa"));
    std::fs::rename(&from, t.join(&format!("{d}p5.vfat-ptcl-img.zst.aa"))).unwrap();
    corrupt_naming(CzImage::open(&t.0), &format!("{d}p5.vfat-ptcl-img.zst"));
}
