//! The live USB image under QEMU (TCG): booted as a USB stick (qemu-xhci +
//! usb-storage) with OVMF (UEFI, Secure Boot on, Microsoft's keys) and with
//! SeaBIOS (legacy BIOS), next to a source disk (AHCI) with partitions and
//! data, an image drive (virtio, exFAT) and a larger target disk (NVMe).
//! Each firmware: an unattended backup from klon.conf on the stick, then in
//! a second boot an unattended restore to the larger disk; KLON-RESULT is
//! read from the serial console, and the restored disk is checked from the
//! host. A third boot without a job measures power-on to the first screen.
//! A job typed on the kernel command line wins over klon.conf (a failing
//! verify; a clone of one disk onto a larger one, found by serial).
//! And a BIOS disk with GRUB restored to a smaller disk (its ext4 shrunk)
//! boots; unattended restores in the live system grow btrfs and XFS
//! and an LVM2 PV (`grow_all`, pvresize) and shrink an ext4 (those two
//! need root; the first also grub-pc-bin). And machines with no stick boot from `klon serve --pxe`
//! (BIOS with iPXE and proxy DHCP; UEFI with Secure Boot, shim and GRUB)
//! and receive a `klon deploy` unattended (root: namespaces, tap devices;
//! dnsmasq-base, udpcast).
//!
//! Runs when KLON_REQUIRE_LIVE_TESTS=1 (and then fails when anything is
//! missing); otherwise skips. Uses target/klon-live.img when it exists (CI
//! runs image-build/build first), or builds it; KLON_LIVE_IMG names
//! another image. Needs no root.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::disks::{MIB, TempDir, assert_same, blank_file, number_after, random_bytes, run, text_bytes, write_at};

/// One boot at a time: two cores, and TCG is CPU-heavy.
static QEMU: Mutex<()> = Mutex::new(());
const BOOT_TIMEOUT: Duration = Duration::from_secs(360);

fn required() -> bool {
    std::env::var("KLON_REQUIRE_LIVE_TESTS").is_ok_and(|v| v == "1")
}

/// Whether to run; panics (fails) when required but something is missing.
fn ready(test: &str) -> bool {
    if !required() {
        report(&format!("{test}: skipped (set KLON_REQUIRE_LIVE_TESTS=1 to boot the live image in QEMU)"));
        return false;
    }
    for tool in ["qemu-system-x86_64", "sgdisk", "mkfs.ext4", "mkfs.vfat", "mcopy", "mkfs.exfat"] {
        let found = std::env::var_os("PATH").is_some_and(|p| {
            std::env::split_paths(&p)
                .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
                .any(|d| d.join(tool).exists())
        });
        assert!(
            found,
            "{test}: {tool} is missing (image-build/build installs qemu-system-x86 and ovmf as root; scripts/test the rest)"
        );
    }
    for f in [OVMF_CODE_SB, OVMF_VARS_MS] {
        assert!(Path::new(f).exists(), "{test}: {f} is missing (apt-get install ovmf)");
    }
    true
}

const OVMF_CODE_SB: &str = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd";
const OVMF_VARS_MS: &str = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The live image: KLON_LIVE_IMG, target/klon-live.img, or built now.
fn live_image() -> PathBuf {
    static IMG: OnceLock<PathBuf> = OnceLock::new();
    IMG.get_or_init(|| {
        if let Some(p) = std::env::var_os("KLON_LIVE_IMG") {
            return PathBuf::from(p);
        }
        let img = repo().join("target/klon-live.img");
        if !img.exists() {
            // A target directory of its own: this test runs inside cargo's.
            let status = Command::new(repo().join("image-build/build"))
                .env("CARGO_TARGET_DIR", repo().join("target/live-static"))
                .status()
                .expect("run image-build/build");
            assert!(status.success(), "image-build/build failed");
        }
        assert!(img.exists(), "no {}", img.display());
        img
    })
    .clone()
}

/// The source disk: GPT, an ext4 and a FAT partition with files, then a
/// small ext4 (last, for --grow-last to grow), boot code. Returns the
/// partitions as (start, length) in bytes.
fn make_source(dir: &TempDir) -> (PathBuf, Vec<(u64, u64)>) {
    let disk = dir.join("source.img");
    blank_file(&disk, 64 * MIB);
    let d = disk.to_str().unwrap();
    run(
        "sgdisk",
        &[
            "-n",
            "1:2048:+28M",
            "-t",
            "1:8300",
            "-c",
            "1:root",
            "-n",
            "2:0:+16M",
            "-t",
            "2:0700",
            "-c",
            "2:data",
            "-n",
            "3:0:+8M",
            "-t",
            "3:8300",
            "-c",
            "3:home",
            d,
        ],
    );
    let parts = [(MIB, 28 * MIB), (29 * MIB, 16 * MIB), (45 * MIB, 8 * MIB)];
    // ext4 from a folder.
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/hostname"), "klon-live-test\n").unwrap();
    std::fs::write(tree.join("random.bin"), random_bytes(7, 3 * MIB as usize)).unwrap();
    std::fs::write(tree.join("words.txt"), text_bytes(3, 2 * MIB as usize)).unwrap();
    let p1 = dir.join("p1.img");
    run("mkfs.ext4", &["-q", "-F", "-L", "root", "-d", tree.to_str().unwrap(), p1.to_str().unwrap(), "28M"]);
    // FAT with files (mtools, no mount).
    let p2 = dir.join("p2.img");
    run("mkfs.vfat", &["-C", "-n", "DATA", p2.to_str().unwrap(), &(16 * 1024).to_string()]);
    let f = dir.join("notes.txt");
    std::fs::write(&f, text_bytes(11, 300_000)).unwrap();
    let r = dir.join("blob.bin");
    std::fs::write(&r, random_bytes(12, MIB as usize)).unwrap();
    mtools("mcopy", &["-i", p2.to_str().unwrap(), f.to_str().unwrap(), r.to_str().unwrap(), "::/"]);
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("notes.txt"), text_bytes(13, 500_000)).unwrap();
    let p3 = dir.join("p3.img");
    run("mkfs.ext4", &["-q", "-F", "-L", "home", "-d", home.to_str().unwrap(), p3.to_str().unwrap(), "8M"]);
    for (p, (start, _)) in [p1, p2, p3].iter().zip(parts) {
        write_at(&disk, start, &std::fs::read(p).unwrap());
    }
    write_at(&disk, 0, &random_bytes(440, 440)); // boot code
    (disk, parts.to_vec())
}

fn mtools(cmd: &str, args: &[&str]) {
    let o = Command::new(cmd).args(args).env("MTOOLS_SKIP_CHECK", "1").output().expect(cmd);
    assert!(o.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// The image drive: GPT, one exFAT partition labelled KLONIMG.
fn make_image_drive(dir: &TempDir) -> PathBuf {
    let disk = dir.join("images.img");
    blank_file(&disk, 160 * MIB);
    run("sgdisk", &["-n", "1:2048:0", "-t", "1:0700", disk.to_str().unwrap()]);
    let part = dir.join("images-p1.img");
    blank_file(&part, 150 * MIB);
    run("mkfs.exfat", &["-L", "KLONIMG", part.to_str().unwrap()]);
    write_at(&disk, MIB, &std::fs::read(&part).unwrap());
    std::fs::remove_file(part).unwrap();
    disk
}

/// A second drive for copies: GPT, one ext4 partition labelled KLONCOPY
/// (ext4, so that the host reads it back with debugfs).
fn make_copy_drive(dir: &TempDir) -> PathBuf {
    let disk = dir.join("copies.img");
    blank_file(&disk, 160 * MIB);
    run("sgdisk", &["-n", "1:2048:0", "-t", "1:8300", disk.to_str().unwrap()]);
    run("mke2fs", &["-q", "-t", "ext4", "-L", "KLONCOPY", "-E", "offset=1048576", disk.to_str().unwrap(), "150M"]);
    disk
}

/// A copy of the live image with `conf` as klon.conf on its FAT partition.
/// The live stick's kernel and initramfs, copied out of its FAT partition
/// (no mount), to boot with QEMU's -kernel and a command line of one's own.
struct DirectBoot {
    kernel: PathBuf,
    initrd: PathBuf,
}

impl DirectBoot {
    fn from_stick(dir: &TempDir, stick: &Path) -> DirectBoot {
        let img = format!("{}@@1M", stick.display());
        let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initrd.img"));
        mtools("mcopy", &["-o", "-i", &img, "::/live/vmlinuz", kernel.to_str().unwrap()]);
        mtools("mcopy", &["-o", "-i", &img, "::/live/initrd.img", initrd.to_str().unwrap()]);
        DirectBoot { kernel, initrd }
    }

    /// QEMU's arguments that boot it with `append`.
    fn args(&self, append: &str) -> Vec<String> {
        let (k, i) = (self.kernel.display().to_string(), self.initrd.display().to_string());
        ["-kernel", &k, "-initrd", &i, "-append", append].iter().map(|a| a.to_string()).collect()
    }
}

fn stick_with(dir: &TempDir, name: &str, conf: Option<&str>) -> PathBuf {
    let stick = dir.join(name);
    std::fs::copy(live_image(), &stick).unwrap();
    if let Some(conf) = conf {
        let c = dir.join("klon.conf");
        std::fs::write(&c, conf).unwrap();
        mtools("mcopy", &["-o", "-i", &format!("{}@@1M", stick.display()), c.to_str().unwrap(), "::/klon.conf"]);
    }
    stick
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Firmware {
    Uefi,
    Bios,
}

struct Boot {
    /// Serial console lines with the time since power-on.
    lines: Vec<(Duration, String)>,
}

impl Boot {
    fn find(&self, needle: &str) -> Option<&(Duration, String)> {
        self.lines.iter().find(|(_, l)| l.contains(needle))
    }
    fn transcript(&self) -> String {
        self.lines.iter().map(|(t, l)| format!("[{:6.1}] {l}\n", t.as_secs_f64())).collect()
    }
}

/// Boots `stick` with the disks attached until the serial console shows a
/// line containing `until` (then QEMU is stopped) or QEMU exits; fails
/// after BOOT_TIMEOUT.
fn boot(dir: &TempDir, fw: Firmware, stick: &Path, disks: &[(&Path, &str)], until: Option<&str>) -> Boot {
    boot_with(dir, fw, stick, disks, until, &[])
}

/// `boot` with extra QEMU arguments (e.g. -kernel/-initrd/-append).
fn boot_with(
    dir: &TempDir,
    fw: Firmware,
    stick: &Path,
    disks: &[(&Path, &str)],
    until: Option<&str>,
    extra: &[String],
) -> Boot {
    boot_in(dir, fw, Some(stick), disks, until, extra, None, &[])
}

/// `boot_with`, the stick optional, QEMU run in network namespace `netns`
/// when given (`ip netns exec`). `script`: typed on the serial console,
/// each (WHEN, TEXT) the first time a line containing WHEN appears.
#[allow(clippy::too_many_arguments)]
fn boot_in(
    dir: &TempDir,
    fw: Firmware,
    stick: Option<&Path>,
    disks: &[(&Path, &str)],
    until: Option<&str>,
    extra: &[String],
    netns: Option<&str>,
    script: &[(&str, &str)],
) -> Boot {
    let _one = QEMU.lock().unwrap_or_else(|e| e.into_inner());
    let mut args: Vec<String> = vec![
        "-accel",
        "tcg",
        "-m",
        "1024",
        "-smp",
        "2",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    match fw {
        Firmware::Uefi => {
            let vars = dir.join("OVMF_VARS.fd");
            std::fs::copy(OVMF_VARS_MS, &vars).unwrap();
            args.extend([
                "-machine".to_string(),
                "q35,smm=on".into(),
                "-global".into(),
                "driver=cfi.pflash01,property=secure,value=on".into(),
                "-drive".into(),
                format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE_SB}"),
                "-drive".into(),
                format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
            ]);
        }
        Firmware::Bios => args.extend(["-machine".to_string(), "q35".into()]),
    }
    // With -kernel, QEMU boots the kernel itself (and takes boot index 0).
    let bootindex = if extra.iter().any(|a| a == "-kernel") { "" } else { ",bootindex=0" };
    if let Some(stick) = stick {
        args.extend([
            "-device".to_string(),
            "qemu-xhci,id=xhci".into(),
            "-drive".into(),
            format!("if=none,id=stick,format=raw,file={}", stick.display()),
            "-device".into(),
            format!("usb-storage,bus=xhci.0,drive=stick{bootindex}"),
        ]);
    }
    for (i, (path, device)) in disks.iter().enumerate() {
        args.push("-drive".into());
        args.push(format!("if=none,id=d{i},format=raw,file={}", path.display()));
        args.push("-device".into());
        args.push(device.replace("DRIVE", &format!("d{i}")));
    }
    args.extend(extra.iter().cloned());
    let started = Instant::now();
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
            c
        }
        None => Command::new("qemu-system-x86_64"),
    };
    let mut child: Child = cmd
        .args(&args)
        .stdin(if script.is_empty() { Stdio::null() } else { Stdio::piped() })
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start qemu-system-x86_64");
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut buf = Vec::new();
        while r.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let line = String::from_utf8_lossy(&buf).trim_end().to_string();
            if tx.send((started.elapsed(), line)).is_err() {
                break;
            }
            buf.clear();
        }
    });
    let mut b = Boot { lines: Vec::new() };
    let deadline = started + BOOT_TIMEOUT;
    let mut input = child.stdin.take();
    let mut next = 0;
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(l) => {
                if let (Some((when, text)), Some(w)) = (script.get(next), input.as_mut())
                    && l.1.contains(when)
                {
                    use std::io::Write as _;
                    w.write_all(format!("{text}\n").as_bytes()).expect("typing on the serial console");
                    w.flush().unwrap();
                    next += 1;
                }
                let hit = until.is_some_and(|u| l.1.contains(u));
                b.lines.push(l);
                if hit {
                    let _ = child.kill();
                    let _ = child.wait();
                    return b;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = child.wait();
                return b;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{fw:?} boot: no result within {} s; serial console:\n{}", BOOT_TIMEOUT.as_secs(), b.transcript());
        }
    }
}

fn result_line(b: &Boot, fw: Firmware, what: &str) -> String {
    // The live system's part of the console, for the log.
    if let Some(i) = b.lines.iter().position(|(_, l)| l.contains("klon live [")) {
        eprintln!("--- {fw:?} {what}: serial console from klon's start ---");
        for (t, l) in &b.lines[i..] {
            eprintln!("[{:6.1}] {}", t.as_secs_f64(), l.replace('\r', ""));
        }
    }
    let Some((t, line)) = b.find("KLON-RESULT:") else {
        panic!("{fw:?} {what}: no KLON-RESULT line; serial console:\n{}", b.transcript())
    };
    assert!(line.contains("KLON-RESULT: ok"), "{fw:?} {what} failed: {line}\nserial console:\n{}", b.transcript());
    report(&format!("{fw:?} {what}: {line} (at {:.1} s after power-on)", t.as_secs_f64()));
    line.clone()
}

const WIZARD_SCREEN: &str = "klon — main menu";

fn backup_restore(fw: Firmware) {
    let dir = TempDir::new(&format!("live-{fw:?}"));
    let (source, parts) = make_source(&dir);
    let images = make_image_drive(&dir);
    let target = dir.join("target.img");
    blank_file(&target, 96 * MIB);
    let copies = make_copy_drive(&dir);
    let mut disks = vec![
        (source.as_path(), "ide-hd,drive=DRIVE,bus=ide.0,serial=KLONSRC"),
        (images.as_path(), "virtio-blk-pci,drive=DRIVE,serial=KLONIMGD"),
        (target.as_path(), "nvme,drive=DRIVE,serial=KLONTGT"),
    ];
    // Under BIOS the backup goes into a repository, and its snapshot is
    // copied to a second drive; under UEFI it is a standalone image.
    let into_repo = fw == Firmware::Bios;
    if into_repo {
        disks.push((copies.as_path(), "virtio-blk-pci,drive=DRIVE,serial=KLONCPYD"));
    }

    // 1: unattended backup from klon.conf.
    let conf = format!(
        "# test\njob = backup\nsource = serial=KLONSRC\nimage = pc-1\ndrive = LABEL=KLONIMG\nafter = poweroff\n{}",
        if into_repo { "repo = yes\ncopy_drive = LABEL=KLONCOPY\n" } else { "" }
    );
    let stick = stick_with(&dir, "stick-backup.img", Some(&conf));
    let b = boot(&dir, fw, &stick, &disks, None);
    let line = result_line(&b, fw, "backup");
    if into_repo {
        assert!(line.contains("copied to klon-images/pc-1"), "{fw:?}: no copy in the result: {line}");
        check_copy(&dir, &copies, &source, &parts);
    }
    assert!(b.find("powering off").is_some(), "{fw:?}: no power-off after the backup:\n{}", b.transcript());
    if fw == Firmware::Uefi {
        assert!(b.find("Secure Boot on").is_some(), "UEFI boot without Secure Boot:\n{}", b.transcript());
    }

    // 2: unattended restore to the larger disk; the job comes from
    // klon.conf too, with the keys the kernel command line also takes.
    let stick = stick_with(
        &dir,
        "stick-restore.img",
        Some(
            "klon.job = restore\nklon.target = serial=KLONTGT\nklon.image = pc-1\nklon.drive = KLONIMG\nklon.grow-last = yes\nklon.after = poweroff\n",
        ),
    );
    let b = boot(&dir, fw, &stick, &disks, None);
    result_line(&b, fw, "restore");
    check_jobs_log(&dir, &images, fw);

    // From the host: the partitions match byte for byte (but the last,
    // whose ext4 grew), the table is valid on the larger disk and the last
    // partition grew, with its filesystem.
    for (i, (start, len)) in parts.iter().enumerate().take(2) {
        assert_same(&source, &target, *start, *len, &format!("{fw:?}: partition {}", i + 1));
    }
    let v = run("sgdisk", &["-v", target.to_str().unwrap()]);
    assert!(v.contains("No problems found"), "{fw:?}: sgdisk -v on the restored disk:\n{v}");
    let info = run("sgdisk", &["-i", "3", target.to_str().unwrap()]);
    let last: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("Last sector: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("last sector");
    assert!(last * 512 > 90 * MIB, "{fw:?}: the last partition did not grow (ends at sector {last})");
    let p3 = dir.join("restored-p3.img");
    let p3_len = (last + 1) * 512 - 45 * MIB;
    std::fs::write(&p3, common::disks::read_at(&target, 45 * MIB, p3_len)).unwrap();
    run("e2fsck", &["-fn", p3.to_str().unwrap()]);
    let sb = run("dumpe2fs", &["-h", p3.to_str().unwrap()]);
    let field = |key: &str| -> u64 { sb.lines().find_map(|l| l.strip_prefix(key)).unwrap().trim().parse().unwrap() };
    let blocks = field("Block count:");
    assert!(
        blocks * field("Block size:") > p3_len - MIB,
        "{fw:?}: the last partition's ext4 did not grow ({blocks} blocks):\n{}",
        b.transcript()
    );
    let notes = run("debugfs", &["-R", "cat /notes.txt", p3.to_str().unwrap()]);
    assert!(notes.as_bytes() == text_bytes(13, 500_000), "{fw:?}: the grown ext4's file differs");
    assert_eq!(read_first(&target, 440), read_first(&source, 440), "{fw:?}: boot code");
    let p1 = dir.join("restored-p1.img");
    std::fs::write(&p1, common::disks::read_at(&target, MIB, 28 * MIB)).unwrap();
    run("e2fsck", &["-fn", p1.to_str().unwrap()]);
}

/// The repository the job copied to the second drive, read from the host:
/// `klon check --read-data` passes, it holds one snapshot, and that
/// restores the source's partitions byte for byte.
fn check_copy(dir: &TempDir, copies: &Path, source: &Path, parts: &[(u64, u64)]) {
    let out = dir.join("copied");
    std::fs::create_dir_all(&out).unwrap();
    let spec = format!("{}?offset=1048576", copies.display());
    run("debugfs", &["-R", &format!("rdump /klon-images/pc-1 {}", out.display()), &spec]);
    let repo = out.join("pc-1");
    let klon = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_klon")).args(args).output().unwrap();
        assert!(o.status.success(), "klon {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    klon(&["check", "--quiet", "--read-data", repo.to_str().unwrap()]);
    let list: serde_json::Value =
        serde_json::from_str(&klon(&["--json", "snapshots", repo.to_str().unwrap()])).unwrap();
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 1, "the copy holds {list}");
    let restored = dir.join("from-copy.img");
    blank_file(&restored, std::fs::metadata(source).unwrap().len());
    klon(&["restore", "--yes", "--quiet", repo.to_str().unwrap(), restored.to_str().unwrap()]);
    for (i, (start, len)) in parts.iter().enumerate().take(2) {
        assert_same(source, &restored, *start, *len, &format!("the copy's partition {}", i + 1));
    }
}

/// The image drive keeps a line per unattended job: the backup's and the
/// restore's results, in order. Read through exfat-fuse on a loop device
/// (root); without root it is skipped, unless root tests are required.
fn check_jobs_log(dir: &TempDir, images: &Path, fw: Firmware) {
    use common::loop_device::{LoopDevice, have_root, root_tests_required};
    if !have_root() {
        assert!(!root_tests_required(), "{fw:?}: reading the image drive's jobs log needs root");
        report("skipping the image drive's jobs log: needs root (a loop device and a FUSE mount)");
        return;
    }
    let part = dir.join("images-after-p1.img");
    std::fs::write(&part, common::disks::read_at(images, MIB, 150 * MIB)).unwrap();
    let lo = LoopDevice::attach_without_partitions(&part);
    let mnt = dir.join("images-mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    run("mount.exfat-fuse", &["-o", "ro", lo.path.to_str().unwrap(), mnt.to_str().unwrap()]);
    let log = std::fs::read_to_string(mnt.join("klon-images/klon-jobs.log"));
    let _ = Command::new("umount").arg(&mnt).status();
    let log = log.unwrap_or_else(|e| panic!("{fw:?}: no klon-images/klon-jobs.log on the image drive: {e}"));
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 2, "{fw:?}: {log}");
    assert!(lines[0].contains("KLON-RESULT: ok backup of /dev/sda"), "{fw:?}: {log}");
    assert!(lines[1].contains("KLON-RESULT: ok restore of image klon-images/pc-1"), "{fw:?}: {log}");
    assert!(lines.iter().all(|l| l.starts_with("20") && l.as_bytes().get(10) == Some(&b'T')), "{fw:?}: {log}");
}

/// A line for the test log even when the harness captures output.
fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "live: {line}");
}

fn read_first(p: &Path, n: u64) -> Vec<u8> {
    common::disks::read_at(p, 0, n)
}

/// Power-on to the first screen, without a job.
fn first_screen(fw: Firmware) -> Duration {
    let dir = TempDir::new(&format!("live-screen-{fw:?}"));
    let disk = dir.join("disk.img");
    blank_file(&disk, 32 * MIB);
    let stick = stick_with(&dir, "stick.img", None);
    let b = boot(&dir, fw, &stick, &[(disk.as_path(), "virtio-blk-pci,drive=DRIVE,serial=EMPTY")], Some("  Power off"));
    let Some((t, _)) = b.find(WIZARD_SCREEN) else { panic!("{fw:?}: no first screen:\n{}", b.transcript()) };
    // The live entries of the wizard's main menu are there.
    assert!(
        b.find("  Shell").is_some() && b.find("  Power off").is_some(),
        "{fw:?}: not the live menu:\n{}",
        b.transcript()
    );
    report(&format!("{fw:?}: power-on to the first screen in {:.1} s (QEMU TCG)", t.as_secs_f64()));
    *t
}

#[test]
fn uefi_secure_boot_backup_then_restore() {
    if !ready("uefi_secure_boot_backup_then_restore") {
        return;
    }
    live_image();
    first_screen(Firmware::Uefi);
    backup_restore(Firmware::Uefi);
}

#[test]
fn bios_backup_then_restore() {
    if !ready("bios_backup_then_restore") {
        return;
    }
    live_image();
    first_screen(Firmware::Bios);
    backup_restore(Firmware::Bios);
}

/// The kernel command line names the job and wins over klon.conf; a job
/// that fails says so in KLON-RESULT and still does what `after` says.
/// (Direct kernel boot: the boot menus are covered above.)
#[test]
fn cmdline_job_wins_and_failure_is_reported() {
    if !ready("cmdline_job_wins_and_failure_is_reported") {
        return;
    }
    let dir = TempDir::new("live-cmdline");
    let images = make_image_drive(&dir);
    let stick = stick_with(&dir, "stick.img", Some("job = backup\nsource = /dev/sda\nimage = x\nafter = wizard\n"));
    let direct = DirectBoot::from_stick(&dir, &stick);
    let append = "console=ttyS0,115200n8 quiet klon.job=verify klon.image=\"no such image\" klon.drive=LABEL=KLONIMG klon.after=poweroff klon.wait=5";
    let extra = direct.args(append);
    let b = boot_with(
        &dir,
        Firmware::Bios,
        &stick,
        &[(images.as_path(), "virtio-blk-pci,drive=DRIVE,serial=KLONIMGD")],
        None,
        &extra,
    );
    let Some((_, line)) = b.find("KLON-RESULT:") else { panic!("no KLON-RESULT line:\n{}", b.transcript()) };
    assert!(line.contains("KLON-RESULT: failed"), "{line}\n{}", b.transcript());
    assert!(
        line.contains("verify") && line.contains("no such image"),
        "the command line's job did not win over klon.conf: {line}"
    );
    assert!(b.find("powering off").is_some(), "no power-off after the failed job:\n{}", b.transcript());
    report(&format!("command-line job: {line}"));

    // A clone job typed at boot over the file's backup: the file's image
    // is not the clone's (it is left out), the disks are found by serial,
    // no image drive is needed, and the target's last partition grows.
    let (source, parts) = make_source(&dir);
    let target = dir.join("clone-target.img");
    blank_file(&target, 96 * MIB);
    let append = "console=ttyS0,115200n8 quiet klon.job=clone klon.source=serial=KLONSRC klon.target=serial=KLONTGT \
                  klon.grow-last klon.after=poweroff klon.wait=10";
    let extra = direct.args(append);
    let b = boot_with(
        &dir,
        Firmware::Bios,
        &stick,
        &[
            (source.as_path(), "ide-hd,drive=DRIVE,bus=ide.0,serial=KLONSRC"),
            (target.as_path(), "nvme,drive=DRIVE,serial=KLONTGT"),
        ],
        None,
        &extra,
    );
    let line = result_line(&b, Firmware::Bios, "clone");
    assert!(line.contains("clone of /dev/") && line.contains(" to /dev/nvme0n1"), "{line}");
    for (i, (start, len)) in parts.iter().enumerate().take(2) {
        assert_same(&source, &target, *start, *len, &format!("cloned partition {}", i + 1));
    }
    let v = run("sgdisk", &["-v", target.to_str().unwrap()]);
    assert!(v.contains("No problems found"), "sgdisk -v on the cloned disk:\n{v}");
    let info = run("sgdisk", &["-i", "3", target.to_str().unwrap()]);
    let last = number_after(&info, "Last sector:");
    assert_eq!(last, 96 * MIB / 512 - 34, "grow-last: the last partition ends at the disk's end:\n{info}");
    report(&format!("command-line clone job: {line}"));
}

/// A BIOS disk as an installed Linux has it — MBR, GRUB's boot code in the
/// MBR and its core image in the gap after it, an ext4 root (bootable)
/// holding the kernel and initramfs near its end, swap in a logical
/// partition after it — restored to a disk 40 % smaller than the source
/// still boots: GRUB reads the kernel and initramfs from the ext4 that
/// resize2fs shrank (moving them), and the kernel starts klon's live init
/// from them. (The kernel and initramfs are the live image's; booted from
/// the restored disk alone.)
#[test]
fn bios_disk_restored_to_a_smaller_disk_still_boots() {
    if !ready("bios_disk_restored_to_a_smaller_disk_still_boots") {
        return;
    }
    assert!(
        common::loop_device::have_root(),
        "bios_disk_restored_to_a_smaller_disk_still_boots: needs root (a smaller-disk restore mounts FUSE and loop devices)"
    );
    for f in ["/usr/lib/grub/i386-pc/boot.img", "/usr/bin/grub-mkimage"] {
        assert!(Path::new(f).exists(), "{f} is missing (scripts/test installs grub-pc-bin)");
    }
    let dir = TempDir::new("live-smaller");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let DirectBoot { kernel, initrd } = DirectBoot::from_stick(&dir, &live_image());

    // The source: 512 MiB, MBR; p1 ext4 400 MiB (bootable), p5 swap.
    let disk = dir.join("source.img");
    blank_file(&disk, 512 * MIB);
    let table = "label: dos\nstart=2048, size=400M, type=83, bootable\ntype=5\ntype=82\n";
    common::disks::run_with_input("sfdisk", &["-q", &s(&disk)], table);
    // The root: /boot written after a filler that then goes, so the
    // kernel and initramfs lie past where the shrunk filesystem ends.
    let cfg = dir.join("grub.cfg");
    std::fs::write(
        &cfg,
        "serial --unit=0 --speed=115200\nterminal_input serial\nterminal_output serial\nset timeout=0\n\
         menuentry klon {\n  linux /boot/vmlinuz console=ttyS0,115200n8 klon.job=none\n  initrd /boot/initrd.img\n}\n",
    )
    .unwrap();
    let root = ext4_files_last(
        &dir,
        "root",
        400,
        300,
        &format!(
            "mkdir boot\nmkdir boot/grub\ncd boot\nwrite {} vmlinuz\nwrite {} initrd.img\ncd grub\nwrite {} grub.cfg\ncd /\n",
            s(&kernel),
            s(&initrd),
            s(&cfg)
        ),
    );
    write_at(&disk, MIB, &std::fs::read(&root).unwrap());
    // Swap in p5, wherever sfdisk put it.
    let dump = run("sfdisk", &["-d", &s(&disk)]);
    let p5 = dump.lines().find(|l| l.contains("source.img5 ")).unwrap();
    let field = |key: &str| -> u64 {
        p5.split(',')
            .find_map(|f| f.trim().split_once(&format!("{key}=")).map(|(_, v)| v.trim().parse().unwrap()))
            .unwrap()
    };
    let swap = dir.join("swap.img");
    blank_file(&swap, field("size") * 512);
    run("mkswap", &["-q", &s(&swap)]);
    write_at(&disk, field("start") * 512, &std::fs::read(&swap).unwrap());
    // GRUB: boot.img's code in the MBR (the table and disk id stay), the
    // core image (biosdisk, msdos, ext2, normal, linux) from sector 1.
    let core = dir.join("core.img");
    run(
        "grub-mkimage",
        &[
            "-O",
            "i386-pc",
            "-o",
            &s(&core),
            "-p",
            "(hd0,msdos1)/boot/grub",
            "biosdisk",
            "part_msdos",
            "ext2",
            "normal",
            "linux",
            "serial",
            "terminal",
            "configfile",
        ],
    );
    let boot_img = std::fs::read("/usr/lib/grub/i386-pc/boot.img").unwrap();
    write_at(&disk, 0, &boot_img[..440]);
    let core_bytes = std::fs::read(&core).unwrap();
    assert!((core_bytes.len() as u64) < MIB - 512, "core.img does not fit the gap");
    write_at(&disk, 512, &core_bytes);

    // Backed up, restored to a disk 40 % smaller.
    let image = dir.join("image");
    let o = common::disks::klon(&["backup", "--quiet", &s(&disk), &s(&image)]);
    assert!(o.status.success(), "backup: {}", String::from_utf8_lossy(&o.stderr));
    let small = dir.join("small.img");
    blank_file(&small, 512 * MIB * 6 / 10);
    let o = common::disks::klon(&["--json", "restore", "--yes", &s(&image), &s(&small)]);
    assert!(o.status.success(), "restore to the smaller disk: {}", String::from_utf8_lossy(&o.stderr));
    let said: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let resized = said["resized"].as_array().unwrap();
    assert!(resized.len() == 1 && resized[0]["note"].as_str().unwrap().contains("resize2fs shrank its ext4"), "{said}");

    // It boots, from the restored disk alone, to klon's live init.
    let b = boot(&dir, Firmware::Bios, &small, &[], Some("klon live ["));
    assert!(
        b.find("Booting `klon'").is_some() && b.find("klon live [").is_some(),
        "the restored smaller disk did not boot through GRUB to the kernel's init:\n{}",
        b.transcript()
    );
    report(&format!(
        "BIOS: the disk restored 40 % smaller booted (GRUB, shrunk ext4) in {:.1} s",
        b.lines.last().unwrap().0.as_secs_f64()
    ));
}

/// Unattended restores inside the live system that need its filesystem
/// tools: `grow_all` onto a larger disk grows a btrfs and an XFS
/// (btrfs and xfs_growfs in the initramfs), and a restore onto a smaller
/// disk shrinks an ext4 (resize2fs on klon's FUSE file: the fuse and loop
/// modules). Each is checked from the host by the filesystem's own tools.
#[test]
fn unattended_restores_grow_and_shrink_in_the_live_system() {
    if !ready("unattended_restores_grow_and_shrink_in_the_live_system") {
        return;
    }
    assert!(common::loop_device::have_root(), "needs root (loop devices to check the restored filesystems)");
    let dir = TempDir::new("live-resize");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let files = dir.join("files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(files.join("a.bin"), random_bytes(21, 2 << 20)).unwrap();
    std::fs::write(files.join("b.txt"), text_bytes(22, 300_000)).unwrap();
    let sfdisk = |disk: &Path, table: &str| common::disks::run_with_input("sfdisk", &["-q", &s(disk)], table);
    // Source 1: GPT, btrfs 128 MiB, XFS 300 MiB, an LVM2 PV 32 MiB (its
    // volume group made without activation).
    let grow_src = dir.join("grow-src.img");
    blank_file(&grow_src, 464 * MIB);
    sfdisk(&grow_src, "label: gpt\nstart=2048, size=128M\nsize=300M\nsize=32M\n");
    let vg = format!("klonlive{}", std::process::id());
    let pv = dir.join("pv.img");
    blank_file(&pv, 32 * MIB);
    {
        let lo = common::loop_device::LoopDevice::attach_without_partitions(&pv);
        common::lvm_tools::lvm("pvcreate", &s(&lo.path), &["-q", &s(&lo.path)]);
        common::lvm_tools::lvm("vgcreate", &s(&lo.path), &["-q", &vg, &s(&lo.path)]);
    }
    write_at(&grow_src, 429 * MIB, &std::fs::read(&pv).unwrap());
    let btrfs = dir.join("btrfs.img");
    blank_file(&btrfs, 128 * MIB);
    run("mkfs.btrfs", &["-q", "--rootdir", &s(&files), &s(&btrfs)]);
    write_at(&grow_src, MIB, &std::fs::read(&btrfs).unwrap());
    let xfs = dir.join("xfs.img");
    blank_file(&xfs, 300 * MIB);
    run("mkfs.xfs", &["-q", "-f", &s(&xfs)]);
    {
        let lo = common::loop_device::LoopDevice::attach_without_partitions(&xfs);
        let _m = common::disks::Mounted::new(&lo.path, &dir.join("xfs-mnt"), "rw");
        run("cp", &["-a", &format!("{}/.", s(&files)), &s(&dir.join("xfs-mnt"))]);
    }
    write_at(&grow_src, 129 * MIB, &std::fs::read(&xfs).unwrap());
    // Source 2: GPT, ext4 200 MiB (its files written after a filler that
    // was then deleted, so resize2fs must move them), then ext4 16 MiB.
    let shrink_src = dir.join("shrink-src.img");
    blank_file(&shrink_src, 240 * MIB);
    sfdisk(&shrink_src, "label: gpt\nstart=2048, size=200M\nsize=16M\n");
    let root = ext4_files_last(
        &dir,
        "root",
        200,
        150,
        &format!("write {} a.bin\nwrite {} b.txt\n", s(&files.join("a.bin")), s(&files.join("b.txt"))),
    );
    write_at(&shrink_src, MIB, &std::fs::read(&root).unwrap());
    let small_fs = dir.join("second.img");
    run("mke2fs", &["-q", "-t", "ext4", "-d", &s(&files), &s(&small_fs), "16M"]);
    write_at(&shrink_src, 201 * MIB, &std::fs::read(&small_fs).unwrap());

    // The image drive: ext4 labelled KLONIMG holding both images.
    let content = dir.join("content");
    std::fs::create_dir_all(content.join("klon-images")).unwrap();
    for (src, name) in [(&grow_src, "grow"), (&shrink_src, "shrink")] {
        let o = common::disks::klon(&["backup", "--quiet", &s(src), &s(&content.join("klon-images").join(name))]);
        assert!(o.status.success(), "backup of {name}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let drive = dir.join("drive.img");
    run("mke2fs", &["-q", "-t", "ext4", "-L", "KLONIMG", "-d", &s(&content), &s(&drive), "64M"]);

    let stick = stick_with(&dir, "stick.img", None);
    let direct = DirectBoot::from_stick(&dir, &stick);
    let job = |image: &str, target: &Path, grow_all: bool| {
        let append = format!(
            "console=ttyS0,115200n8 quiet klon.job=restore klon.image={image} klon.target=/dev/nvme0n1 {}\
             klon.drive=LABEL=KLONIMG klon.after=poweroff klon.wait=10",
            if grow_all { "klon.grow_all=yes " } else { "" }
        );
        let extra = direct.args(&append);
        let b = boot_with(
            &dir,
            Firmware::Bios,
            &stick,
            &[
                (drive.as_path(), "virtio-blk-pci,drive=DRIVE,serial=KLONIMGD"),
                (target, "nvme,drive=DRIVE,serial=TARGET1"),
            ],
            None,
            &extra,
        );
        let Some((_, line)) = b.find("KLON-RESULT:") else {
            panic!("{image}: no KLON-RESULT line:\n{}", b.transcript())
        };
        assert!(line.contains("KLON-RESULT: ok"), "{image}: {line}\n{}", b.transcript());
        report(&format!("{image}: {line}"));
    };
    let check = |disk: &Path, i: usize, kind: &str| -> (u64, u64) {
        let (parts, sector) = common::disks::sfdisk_parts(disk);
        let (start, len) = (parts[i].start * sector, parts[i].size * sector);
        let lo = common::loop_device::LoopDevice::attach_range(disk, start, len);
        let node = s(&lo.path);
        let bytes = match kind {
            "btrfs" => {
                run("btrfs", &["check", "--readonly", &node]);
                let sb = run("btrfs", &["inspect-internal", "dump-super", &node]);
                number_after(&sb, "dev_item.total_bytes")
            }
            "xfs" => {
                run("xfs_repair", &["-n", &node]);
                let sb = run("xfs_db", &["-r", "-c", "sb 0", "-c", "print dblocks blocksize", &node]);
                number_after(&sb, "dblocks =") * number_after(&sb, "blocksize =")
            }
            _ => {
                run("e2fsck", &["-fn", &node]);
                let sb = run("dumpe2fs", &["-h", &node]);
                number_after(&sb, "Block count:") * number_after(&sb, "Block size:")
            }
        };
        let mnt = dir.join(&format!("check-{kind}-{i}"));
        let _m = common::disks::Mounted::new(&lo.path, &mnt, if kind == "xfs" { "ro,norecovery" } else { "ro" });
        run("diff", &["-r", "-x", "lost+found", "-x", "filler", &s(&files), &s(&mnt)]);
        (bytes, len)
    };

    // grow_all onto a disk twice the size: all three grow and fill their
    // partitions (the PV by pvresize in the live system).
    let big = dir.join("big.img");
    blank_file(&big, 928 * MIB);
    job("grow", &big, true);
    for (i, kind) in [(0, "btrfs"), (1, "xfs")] {
        let (bytes, len) = check(&big, i, kind);
        assert!(len > 250 * MIB * (i as u64 + 1) && bytes > len - 4 * MIB, "{kind}: {bytes} bytes in {len}");
    }
    {
        let (parts, sector) = common::disks::sfdisk_parts(&big);
        let (start, len) = (parts[2].start * sector, parts[2].size * sector);
        assert!(len > 60 * MIB, "the PV's partition did not grow: {len}");
        let lo = common::loop_device::LoopDevice::attach_range(&big, start, len);
        let node = s(&lo.path);
        let b = |x: String| x.trim().trim_end_matches('B').parse::<u64>().unwrap();
        let lvm = common::lvm_tools::lvm;
        let pv_size = b(lvm("pvs", &node, &["--noheadings", "--units", "b", "-o", "pv_size", &node]));
        let vg_free = b(lvm("vgs", &node, &["--noheadings", "--units", "b", "-o", "vg_free", &vg]));
        assert!(pv_size > len - 8 * MIB && pv_size <= len, "PV {pv_size} bytes in a {len}-byte partition");
        assert_eq!(vg_free, pv_size, "the volume group has no logical volumes: all of the PV is free");
    }
    // Onto a disk 40 % smaller: the first ext4 shrinks, the second moves.
    let small = dir.join("small.img");
    blank_file(&small, 144 * MIB);
    job("shrink", &small, false);
    let (bytes, len) = check(&small, 0, "ext4");
    assert!(len < 200 * MIB && bytes <= len && bytes > len - MIB, "ext4: {bytes} bytes in {len}");
    check(&small, 1, "ext4");
}

/// An ext4 image of `mib` MiB, `name`.img in `dir`, whose files (put in by
/// the debugfs commands `cmds`) were written after a filler of `filler_mib`
/// MiB that was then deleted: they lie near its end, so shrinking it must
/// move them. e2fsck finds it clean.
fn ext4_files_last(dir: &TempDir, name: &str, mib: u64, filler_mib: u64, cmds: &str) -> PathBuf {
    let image = dir.join(&format!("{name}.img"));
    let fill = dir.join(&format!("{name}-fill"));
    std::fs::create_dir_all(&fill).unwrap();
    std::fs::write(fill.join("filler"), vec![0xA5u8; (filler_mib * MIB) as usize]).unwrap();
    let (fill_s, image_s) = (fill.to_str().unwrap(), image.to_str().unwrap());
    run("mke2fs", &["-q", "-t", "ext4", "-d", fill_s, image_s, &format!("{mib}M")]);
    let script = dir.join(&format!("{name}.debugfs"));
    std::fs::write(&script, format!("{cmds}rm filler\n")).unwrap();
    run("debugfs", &["-w", "-f", script.to_str().unwrap(), image_s]);
    run("e2fsck", &["-fn", image_s]);
    image
}

/// A network namespace with bridge br0 at 10.79.0.1/24 and a tap device
/// `tap0` on it for QEMU, and with `router`, a second namespace on the
/// bridge at 10.79.0.254 whose dnsmasq hands out 10.79.0.50-60 (the
/// network's own DHCP server, for proxy DHCP); everything in them is
/// killed and they are removed when dropped. Nothing leaves the machine.
struct PxeNet {
    ns: String,
    router: Option<String>,
    /// The router's dnsmasq.
    dhcp: Option<Child>,
}

impl PxeNet {
    fn new(tag: &str, router: bool) -> PxeNet {
        let ns = format!("kpxe{tag}-{}", std::process::id());
        let ip = |args: &[&str]| run("ip", args);
        ip(&["netns", "add", &ns]);
        let mut net = PxeNet { ns: ns.clone(), router: None, dhcp: None };
        ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &ns, "addr", "add", "10.79.0.1/24", "brd", "+", "dev", "br0"]);
        ip(&["-n", &ns, "tuntap", "add", "dev", "tap0", "mode", "tap"]);
        ip(&["-n", &ns, "link", "set", "tap0", "master", "br0", "up"]);
        ip(&["-n", &ns, "link", "set", "br0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", "br0"]);
        if router {
            let rt = format!("kpxer{tag}-{}", std::process::id());
            ip(&["netns", "add", &rt]);
            net.router = Some(rt.clone());
            ip(&["-n", &ns, "link", "add", "rp", "type", "veth", "peer", "name", "e0", "netns", &rt]);
            ip(&["-n", &ns, "link", "set", "rp", "master", "br0", "up"]);
            ip(&["-n", &rt, "addr", "add", "10.79.0.254/24", "brd", "+", "dev", "e0"]);
            ip(&["-n", &rt, "link", "set", "e0", "up"]);
            ip(&["-n", &rt, "link", "set", "lo", "up"]);
            let leases = std::env::temp_dir().join(format!("{rt}.leases"));
            let dhcp = Command::new("ip")
                .args(["netns", "exec", &rt, "dnsmasq", "--keep-in-foreground", "--port=0", "--interface=e0"])
                .args(["--bind-interfaces", "--dhcp-range=10.79.0.50,10.79.0.60,255.255.255.0,1h", "--pid-file="])
                .arg(format!("--dhcp-leasefile={}", leases.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start the router's dnsmasq");
            net.dhcp = Some(dhcp);
        }
        net
    }

    fn klon(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, env!("CARGO_BIN_EXE_klon")]).args(args);
        c
    }
}

impl Drop for PxeNet {
    fn drop(&mut self) {
        if let Some(mut d) = self.dhcp.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        for ns in std::iter::once(&self.ns).chain(self.router.as_ref()) {
            let out = Command::new("ip").args(["netns", "pids", ns]).output().unwrap();
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        if let Some(rt) = &self.router {
            let _ = std::fs::remove_file(std::env::temp_dir().join(format!("{rt}.leases")));
        }
    }
}

/// A machine with no stick and an empty disk boots klon's live system from
/// `klon serve --pxe` (dnsmasq's DHCP and TFTP, klon's HTTP; a tap device
/// in a network namespace the test makes), whose kernel command line asks
/// for an unattended receive; the live system brings up its network by
/// DHCP, receives the image `klon deploy` sends by multicast, restores it
/// with its checks and reports to the sender, then powers off. The host
/// compares the machine's disk with the source byte for byte. BIOS: QEMU's
/// iPXE firmware, kernel and initramfs over HTTP, proxy DHCP beside the
/// network's own DHCP server; UEFI with Secure Boot on: OVMF's own PXE (no
/// iPXE ROM), Debian's signed shim and network GRUB, everything over TFTP,
/// klon serve's full DHCP. Needs root (namespaces, tap).
fn network_boot_receives_a_deployment(fw: Firmware, http: bool) {
    assert!(common::loop_device::have_root(), "needs root (network namespaces and a tap device)");
    for tool in ["dnsmasq", "udp-sender"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().unwrap().status.success();
        assert!(found, "{tool} is missing (scripts/test installs dnsmasq-base and udpcast)");
    }
    let dir = TempDir::new(&format!("live-pxe-{fw:?}{}", if http { "-http" } else { "" }));
    let source = dir.join("source.img");
    common::disks::make_gpt_disk(&source, 40 * MIB);
    let image = dir.join("image");
    let o = common::disks::klon(&["backup", "--quiet", source.to_str().unwrap(), image.to_str().unwrap()]);
    common::disks::ok(&o);
    let target = dir.join("target.img");
    blank_file(&target, 40 * MIB);

    // BIOS: proxy DHCP (the router gives addresses); UEFI: klon serve's own.
    let proxy = fw == Firmware::Bios;
    let net = PxeNet::new(&format!("{fw:?}{}", if http { "h" } else { "" }).to_lowercase(), proxy);
    let range: &[&str] = match (proxy, http) {
        (true, _) => &[],
        (false, false) => &["--dhcp-range", "10.79.0.100,10.79.0.120"],
        (false, true) => &["--dhcp-range", "10.79.0.100,10.79.0.120", "--uefi-http", "--http-port", "80"],
    };
    let (lease, dhcp_server) = if proxy { ("10.79.0.5", "10.79.0.254") } else { ("10.79.0.1", "10.79.0.1") };
    let serve_log = dir.join("serve.log");
    let mut serve = net
        .klon(&[
            "serve",
            "--pxe",
            "--interface",
            "br0",
            "--live",
            live_image().to_str().unwrap(),
            "--append",
            "klon.job=receive klon.target=serial=PXETARGET klon.port=9300 klon.after=poweroff",
        ])
        .args(range)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&serve_log).unwrap())
        .spawn()
        .expect("start klon serve");
    std::thread::sleep(Duration::from_secs(1));
    if let Some(st) = serve.try_wait().unwrap() {
        panic!("klon serve ended at once ({st}):\n{}", std::fs::read_to_string(&serve_log).unwrap());
    }
    let deploy = net
        .klon(&["--json", "deploy", image.to_str().unwrap(), "--multicast", "--interface", "br0"])
        .args(["--clients", "1", "--port", "9300", "--report-wait", "120"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start klon deploy");
    // UEFI: no iPXE option ROM, so the firmware's own PXE runs (and Secure
    // Boot checks what it loads).
    let rom = if fw == Firmware::Uefi { ",romfile=" } else { "" };
    let mut nic = vec![
        "-netdev".to_string(),
        "tap,id=n0,ifname=tap0,script=no,downscript=no".into(),
        "-device".into(),
        format!("virtio-net-pci,netdev=n0,mac=52:54:00:79:00:05,bootindex=0{rom}"),
    ];
    if http {
        // OVMF's PXE off (its fw_cfg switches), so that the firmware goes
        // to HTTP boot at once rather than after PXE's time-outs.
        for v in ["IPv4PXESupport", "IPv6PXESupport"] {
            nic.extend(["-fw_cfg".to_string(), format!("name=opt/org.tianocore/{v},string=n")]);
        }
    }
    let b = boot_in(
        &dir,
        fw,
        None,
        &[(target.as_path(), "virtio-blk-pci,drive=DRIVE,serial=PXETARGET")],
        None,
        &nic,
        Some(&net.ns),
        &[],
    );
    let deployed = deploy.wait_with_output().unwrap();
    let _ = Command::new("kill").args(["-INT", &serve.id().to_string()]).status();
    let served = serve.wait().unwrap();
    let log = std::fs::read_to_string(&serve_log).unwrap();
    let line = result_line(&b, fw, "network boot and receive");
    assert!(line.contains(&format!("receive of klon deploy's image on eth0 ({lease}")), "{line}");
    let network = b.find("klon live: network eth0 (52:54:00:79:00:05) ").map(|(_, l)| l.clone()).unwrap_or_default();
    assert!(
        network.contains(&format!(") {lease}")) && network.contains(&format!("from DHCP server {dhcp_server}")),
        "{fw:?}: {network:?}\n{}",
        b.transcript()
    );
    if fw == Firmware::Uefi {
        assert!(b.find("firmware: UEFI, Secure Boot on").is_some(), "{}", b.transcript());
    }

    // The sender's summary names the machine, and it is OK.
    assert!(deployed.status.success(), "klon deploy: {}", String::from_utf8_lossy(&deployed.stderr));
    let v: serde_json::Value = serde_json::from_slice(&deployed.stdout).unwrap();
    let rs = v["receivers"].as_array().unwrap();
    assert_eq!(rs.len(), 1, "{v}");
    assert_eq!(rs[0]["ok"], true, "{v}");
    assert_eq!(rs[0]["report"]["mac"], "52:54:00:79:00:05", "{v}");
    assert!(rs[0]["report"]["disk"].as_str().unwrap().contains("serial PXETARGET"), "{v}");

    // What the machine's disk holds now: the source, byte for byte.
    assert!(
        std::fs::read(&target).unwrap() == std::fs::read(&source).unwrap(),
        "the disk the network-booted machine restored differs from the source"
    );

    // The server saw the machine and sent it the live system the way its
    // firmware boots; Ctrl-C ends it cleanly, and it leaves nothing behind.
    assert!(served.success(), "klon serve after Ctrl-C: {served}\n{log}");
    let sent: &[&str] = match fw {
        Firmware::Bios => &["HTTP sent boot.ipxe", "HTTP sent vmlinuz", "HTTP sent initrd.img"],
        Firmware::Uefi if http => &["HTTP sent klon-live.img"],
        Firmware::Uefi => &[
            "tftp/bootx64.efi to",
            "tftp/grubx64.efi to",
            "tftp/grub/grub.cfg to",
            "tftp/vmlinuz to",
            "tftp/initrd.img to",
        ],
    };
    let answered = if proxy { "PXE(br0)" } else { "DHCPACK(br0) 10.79.0.1" };
    for needle in [answered, "52:54:00:79:00:05", "klon serve: stopped"].iter().chain(sent) {
        assert!(log.contains(needle), "{fw:?}: klon serve's log lacks {needle:?}:\n{log}");
    }
    if http {
        assert!(!log.contains("tftp/"), "UEFI HTTP boot: something went over TFTP:\n{log}");
    }
    assert!(!Path::new(&format!("/tmp/klon-serve-{}", serve.id())).exists(), "klon serve left its files behind");
    report(&format!(
        "{fw:?} network boot: KLON-RESULT at {:.1} s after power-on; {line}",
        b.find("KLON-RESULT").unwrap().0.as_secs_f64()
    ));
}

#[test]
fn bios_machine_boots_from_the_network_and_receives_a_deployment() {
    if ready("bios_machine_boots_from_the_network_and_receives_a_deployment") {
        network_boot_receives_a_deployment(Firmware::Bios, false);
    }
}

#[test]
fn uefi_secure_boot_machine_boots_from_the_network_and_receives_a_deployment() {
    if ready("uefi_secure_boot_machine_boots_from_the_network_and_receives_a_deployment") {
        network_boot_receives_a_deployment(Firmware::Uefi, false);
    }
}

/// The UEFI machine again, by UEFI HTTP boot (`klon serve --uefi-http`):
/// no TFTP offered (OVMF's PXE switched off), OVMF's HTTP boot fetches the
/// stick's disk by the URL in klon serve's DHCP answer and boots it as a
/// RAM disk: the signed shim and GRUB on it, Secure Boot on, GRUB's menu
/// with the command line klon serve wrote into the disk's live/net.cfg
/// (the deployment job).
#[test]
fn uefi_secure_boot_machine_boots_over_http_and_receives_a_deployment() {
    if ready("uefi_secure_boot_machine_boots_over_http_and_receives_a_deployment") {
        network_boot_receives_a_deployment(Firmware::Uefi, true);
    }
}

/// A Proxmox-shaped disk (tests/common/thin_fixture.rs: an LVM2 thin pool
/// with a VM disk, a container volume and a thin snapshot, made without
/// device-mapper) backed up on the host and restored by the live system
/// onto a larger disk is a volume group a real kernel activates: in the
/// live system's rescue shell `lvm vgchange -ay` activates it, thin pool
/// included, and the VM disk's, the container's and the snapshot's
/// filesystems mount with their files (sums compared with the host's).
/// While the group is active klon refuses to back the disk up, and once
/// it is deactivated the backup goes. Needs root (the fixture's loop devices and LVM tools).
#[test]
fn a_restored_thin_pool_activates_and_its_volumes_mount_in_the_live_system() {
    use common::loop_device::{have_root, root_tests_required};
    if !ready("a_restored_thin_pool_activates_and_its_volumes_mount_in_the_live_system") {
        return;
    }
    if !have_root() {
        assert!(!root_tests_required(), "the thin pool fixture needs root");
        report("thin pool activation: skipped (needs root)");
        return;
    }
    let s = |p: &Path| p.display().to_string();
    let dir = TempDir::new("live-thin");
    let vg = format!("pveguest{}", std::process::id());
    let f = common::thin_fixture::fixture(&dir, &vg);
    let content = dir.join("content");
    std::fs::create_dir_all(content.join("klon-images")).unwrap();
    let o = common::disks::klon(&["backup", "--quiet", &s(&f.disk), &s(&content.join("klon-images").join("pve"))]);
    assert!(o.status.success(), "backup: {}", String::from_utf8_lossy(&o.stderr));
    let drive = dir.join("drive.img");
    run("mke2fs", &["-q", "-t", "ext4", "-L", "KLONIMG", "-d", &s(&content), &s(&drive), "128M"]);
    let target = dir.join("target.img");
    blank_file(&target, 256 * MIB);

    let stick = stick_with(&dir, "stick.img", None);
    let direct = DirectBoot::from_stick(&dir, &stick);
    let append = "console=ttyS0,115200n8 quiet klon.job=restore klon.image=pve klon.target=serial=KLONTGT \
                  klon.drive=LABEL=KLONIMG klon.after=shell klon.wait=10";
    let extra = direct.args(append);
    // No udev in the live system: LVM makes the device nodes itself.
    let conf = "activation{udev_sync=0 udev_rules=0 verify_udev_operations=1} \
                devices{obtain_device_list_from_udev=0} global{thin_check_executable=\"\"}";
    let mapper = |lv: &str| format!("/dev/mapper/{vg}-{}", lv.replace('-', "--"));
    let activate = format!(
        "mkdir -p /run/lock; lvm vgchange -ay --noudevsync --config '{conf}' {vg}; echo KLON-VG\"\"=$?; \
         lvm lvs --noheadings -o lv_name,lv_attr --config '{conf}' {vg}"
    );
    let mount = format!(
        "mkdir -p /m/ct /m/snap /m/vm; mount -o ro {} /m/ct && mount -o ro {} /m/snap && \
         losetup -r -o 1048576 /dev/loop7 {} && mount -o ro /dev/loop7 /m/vm; echo KLON-MOUNT\"\"=$?",
        mapper("vm-101-disk-0"),
        mapper("snap_vm-101-disk-0_before"),
        mapper("vm-100-disk-0"),
    );
    let files = [
        ("vm-101-disk-0", "/m/ct", "data/a.bin"),
        ("vm-101-disk-0", "/m/ct", "data/new.bin"),
        ("snap", "/m/snap", "data/gone.txt"),
        ("snap", "/m/snap", "data/a.bin"),
        ("vm-100-disk-0", "/m/vm", "srv/db.bin"),
        ("vm-100-disk-0", "/m/vm", "srv/log.txt"),
    ];
    let sums = format!(
        "sha256sum {} | sed 's/^/KLON-SUM /'; test -e /m/snap/data/new.bin || echo KLON-SNAPSHOT\"\"-OLD; \
         echo KLON-SUMS\"\"=done",
        files.iter().map(|(_, at, file)| format!("{at}/{file}")).collect::<Vec<_>>().join(" ")
    );
    // While the group is active klon refuses to back the disk up; once it
    // is deactivated, the backup goes.
    let busy = "klon backup /dev/nvme0n1 /tmp/busy; echo KLON-BUSY\"\"=$?".to_string();
    let free = format!(
        "umount /m/vm /m/ct /m/snap; losetup -d /dev/loop7; lvm vgchange -an --noudevsync --config '{conf}' {vg}; \
         klon backup --no-verify /dev/nvme0n1 /tmp/free > /dev/null 2>&1; echo KLON-FREE\"\"=$?; echo KLON-GUEST\"\"-DONE"
    );
    let b = boot_in(
        &dir,
        Firmware::Bios,
        Some(&stick),
        &[
            (drive.as_path(), "virtio-blk-pci,drive=DRIVE,serial=KLONIMGD"),
            (target.as_path(), "nvme,drive=DRIVE,serial=KLONTGT"),
        ],
        Some("KLON-GUEST-DONE"),
        &extra,
        None,
        &[
            ("Rescue shell:", &activate),
            ("KLON-VG=", &mount),
            ("KLON-MOUNT=", &sums),
            ("KLON-SUMS=", &busy),
            ("KLON-BUSY=", &free),
        ],
    );
    let line = result_line(&b, Firmware::Bios, "restore of a Proxmox-shaped disk");
    assert!(line.contains("restore of"), "{line}");
    let said = |key: &str| {
        b.lines.iter().rev().find_map(|(_, l)| l.split(key).nth(1).map(str::trim).map(String::from)).unwrap_or_default()
    };
    assert_eq!(said("KLON-VG="), "0", "vgchange -ay failed in the guest:\n{}", b.transcript());
    assert_eq!(said("KLON-MOUNT="), "0", "a thin volume did not mount:\n{}", b.transcript());
    // lvs in the guest: every volume active, the pool as a thin pool.
    for lv in ["root", "swap", "data", "vm-100-disk-0", "vm-101-disk-0", "snap_vm-101-disk-0_before"] {
        let attr = b.lines.iter().find_map(|(_, l)| {
            let mut w = l.split_whitespace();
            (w.next() == Some(lv)).then(|| w.next().unwrap_or_default().to_string())
        });
        let attr = attr.unwrap_or_else(|| panic!("{lv} not in lvs:\n{}", b.transcript()));
        assert_eq!(attr.chars().nth(4), Some('a'), "{lv} is not active ({attr}):\n{}", b.transcript());
        assert!(lv != "data" || attr.starts_with("twi"), "data is not a thin pool ({attr})");
    }
    for (volume, at, file) in files {
        let want = common::disks::sha256(&f.trees[volume].join(file));
        let got = b
            .lines
            .iter()
            .find_map(|(_, l)| l.split_once("KLON-SUM ").map(|x| x.1).filter(|l| l.ends_with(&format!("{at}/{file}"))))
            .and_then(|l| l.split_whitespace().next().map(String::from));
        assert_eq!(got.as_deref(), Some(want.as_str()), "{volume}: {file}:\n{}", b.transcript());
    }
    assert!(b.find("KLON-SNAPSHOT-OLD").is_some(), "the snapshot shows the origin's later file:\n{}", b.transcript());
    assert_eq!(said("KLON-BUSY="), "5", "a backup of the active group was not refused:\n{}", b.transcript());
    let refusal = b.find("is held by device-mapper device").map(|(_, l)| l.clone()).unwrap_or_default();
    assert!(refusal.contains("vgchange -an") && refusal.contains("/dev/nvme0n1p3"), "{}", b.transcript());
    assert_eq!(said("KLON-FREE="), "0", "the deactivated group's backup failed:\n{}", b.transcript());
    report("thin pool activation: vgchange -ay in the live system; the VM disk, container and snapshot mount whole");
}

/// Waits until `server` listens on 10.79.0.1:`port` in network namespace
/// `ns` (as `ss` there tells; an IPv6 socket shows the address
/// IPv4-mapped, `[::ffff:10.79.0.1]:PORT`).
fn wait_listening(ns: &str, port: u16, server: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new("ip").args(["netns", "exec", ns, "ss", "-ltn"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let listening = text.lines().any(|l| {
            l.split_whitespace().nth(3).is_some_and(|local| {
                local.trim_end_matches(&format!(":{port}")) != local && local.contains("10.79.0.1")
            })
        });
        if listening {
            return;
        }
        assert!(Instant::now() < deadline, "{server} did not listen on 10.79.0.1:{port}:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A Samba server on the network namespace's bridge (10.79.0.1), in the
/// namespace, with share `images` (a folder of `dir`) for user root and
/// `password`; killed when dropped.
struct Samba {
    server: Child,
    share: PathBuf,
}

impl Samba {
    fn start(dir: &TempDir, ns: &str, password: &str) -> Samba {
        let base = dir.join("samba");
        for sub in ["run", "lock", "state", "cache", "private", "ncalrpc", "log", "share"] {
            std::fs::create_dir_all(base.join(sub)).unwrap();
        }
        let b = base.display();
        let conf = base.join("smb.conf");
        std::fs::write(
            &conf,
            format!(
                "[global]\nserver role = standalone server\nmap to guest = never\ninterfaces = 10.79.0.1/24\n\
                 bind interfaces only = yes\npid directory = {b}/run\nlock directory = {b}/lock\n\
                 state directory = {b}/state\ncache directory = {b}/cache\nprivate dir = {b}/private\n\
                 ncalrpc dir = {b}/ncalrpc\nlog file = {b}/log/log.%m\npassdb backend = tdbsam:{b}/private/passdb.tdb\n\
                 load printers = no\nprinting = bsd\nprintcap name = /dev/null\ndisable spoolss = yes\n\
                 server min protocol = SMB3\n[images]\npath = {b}/share\nread only = no\nvalid users = root\n"
            ),
        )
        .unwrap();
        let conf_s = conf.to_str().unwrap();
        common::disks::run_with_input(
            "smbpasswd",
            &["-c", conf_s, "-s", "-a", "root"],
            &format!("{password}\n{password}\n"),
        );
        let server = Command::new("ip")
            .args(["netns", "exec", ns, "smbd", "-F", "--no-process-group", "-s", conf_s, "--debug-stdout", "-d", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start smbd (apt-get install samba)");
        wait_listening(ns, 445, "smbd");
        Samba { server, share: base.join("share") }
    }
}

impl Drop for Samba {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// A network share as the image drive: Samba in a network namespace the
/// test makes (a bridge with a tap device for QEMU, the network's own
/// DHCP server on it), and klon.conf naming `smb://root@10.79.0.1/images/lab`
/// and the password (with a comma and a space). The live system brings up
/// its network by DHCP, mounts the share with the kernel's SMB client and
/// backs the source disk up into the folder `lab`; from the host the image
/// verifies, restores byte for byte and the jobs log is there. A second
/// boot with a wrong password is refused with what to fix, writing
/// nothing; a third restores the image from the share onto a blank disk,
/// which matches the source. Needs root (namespaces, tap) and samba.
#[test]
fn a_network_share_is_the_image_drive_for_backup_and_restore() {
    if !ready("a_network_share_is_the_image_drive_for_backup_and_restore") {
        return;
    }
    assert!(common::loop_device::have_root(), "needs root (network namespaces and a tap device)");
    let dir = TempDir::new("live-smb");
    let (source, parts) = make_source(&dir);
    let net = PxeNet::new("smb", true);
    let password = "share pw,1";
    let samba = Samba::start(&dir, &net.ns, password);
    let nic = [
        "-netdev".to_string(),
        "tap,id=n0,ifname=tap0,script=no,downscript=no".into(),
        "-device".into(),
        "virtio-net-pci,netdev=n0".into(),
    ];
    let conf = |job: &str, pw: &str| {
        format!(
            "{job}image = pc1\ndrive = smb://root@10.79.0.1/images/lab\ndrive_password = \"{pw}\"\nafter = poweroff\n"
        )
    };
    let boot_job = |name: &str, conf: &str, disks: &[(&Path, &str)]| {
        let stick = stick_with(&dir, name, Some(conf));
        let b = boot_in(&dir, Firmware::Bios, Some(&stick), disks, None, &nic, Some(&net.ns), &[]);
        std::fs::remove_file(&stick).unwrap();
        b
    };

    // 1: the backup, into the share's folder `lab`.
    let src = [(source.as_path(), "ide-hd,drive=DRIVE,bus=ide.0,serial=KLONSRC")];
    let b = boot_job("stick-smb-backup.img", &conf("job = backup\nsource = serial=KLONSRC\n", password), &src);
    let line = result_line(&b, Firmware::Bios, "backup to a network share");
    assert!(line.contains("image lab/pc1 on smb://root@10.79.0.1/images in"), "{line}");
    assert!(!b.transcript().contains(password), "the password was shown:\n{}", b.transcript());
    let image = samba.share.join("lab/pc1");
    common::disks::ok(&common::disks::klon(&["verify", image.to_str().unwrap()]));
    let back = dir.join("host-restore.img");
    blank_file(&back, 64 * MIB);
    common::disks::ok(&common::disks::klon(&["restore", "--yes", image.to_str().unwrap(), back.to_str().unwrap()]));
    for (i, (start, len)) in parts.iter().enumerate() {
        assert_same(&source, &back, *start, *len, &format!("share backup: partition {}", i + 1));
    }
    std::fs::remove_file(&back).unwrap();
    let log = std::fs::read_to_string(samba.share.join("lab/klon-jobs.log")).unwrap();
    assert!(log.contains("KLON-RESULT: ok backup"), "{log}");

    // 2: a wrong password: refused, saying what to fix; the target is
    // not touched.
    let target = dir.join("target.img");
    blank_file(&target, 64 * MIB);
    let tgt = [(target.as_path(), "virtio-blk-pci,drive=DRIVE,serial=KLONTGT")];
    let restore = "job = restore\ntarget = serial=KLONTGT\n";
    let b = boot_job("stick-smb-wrong.img", &conf(restore, "not it"), &tgt);
    let (_, line) = b.find("KLON-RESULT:").unwrap_or_else(|| panic!("no result:\n{}", b.transcript()));
    assert!(
        line.contains("KLON-RESULT: failed") && line.contains("refused the user name or password"),
        "{line}\n{}",
        b.transcript()
    );
    assert!(std::fs::read(&target).unwrap().iter().all(|&b| b == 0), "the target was written");

    // 3: the restore from the share.
    let b = boot_job("stick-smb-restore.img", &conf(restore, password), &tgt);
    result_line(&b, Firmware::Bios, "restore from a network share");
    for (i, (start, len)) in parts.iter().enumerate() {
        assert_same(&source, &target, *start, *len, &format!("share restore: partition {}", i + 1));
    }
    drop(samba);
}

/// An NFS server (nfs-ganesha, in user space: this machine's kernel has no
/// NFS server) on the network namespace's bridge (10.79.0.1), in the
/// namespace: NFS 4.1, the folder `export` of `dir` at `/images` of its
/// namespace, read-write for root; killed when dropped.
struct Ganesha {
    server: Child,
    export: PathBuf,
}

impl Ganesha {
    fn start(dir: &TempDir, ns: &str) -> Ganesha {
        let base = dir.join("ganesha");
        for sub in ["export/lab", "recovery"] {
            std::fs::create_dir_all(base.join(sub)).unwrap();
        }
        let b = base.display();
        let conf = base.join("ganesha.conf");
        std::fs::write(
            &conf,
            format!(
                "NFS_CORE_PARAM {{ Protocols = 4; Enable_NLM = false; Enable_RQUOTA = false; Bind_addr = 10.79.0.1; }}\n\
                 NFSV4 {{ Graceless = true; RecoveryBackend = fs; RecoveryRoot = {b}/recovery; Minor_Versions = 1, 2; }}\n\
                 EXPORT {{ Export_Id = 1; Path = {b}/export; Pseudo = /images; Access_Type = RW; \
                 Squash = No_Root_Squash; SecType = sys; Protocols = 4; Transports = TCP; FSAL {{ Name = VFS; }} }}\n\
                 LOG {{ Default_Log_Level = WARN; }}\n"
            ),
        )
        .unwrap();
        let server = Command::new("ip")
            .args(["netns", "exec", ns, "ganesha.nfsd", "-F", "-f", conf.to_str().unwrap()])
            .arg("-L")
            .arg(base.join("log"))
            .arg("-p")
            .arg(base.join("pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ganesha.nfsd (apt-get install nfs-ganesha nfs-ganesha-vfs)");
        wait_listening(ns, 2049, "ganesha.nfsd");
        Ganesha { server, export: base.join("export") }
    }
}

impl Drop for Ganesha {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// An NFS export as the image drive: nfs-ganesha in a network namespace
/// the test makes, klon.conf naming `nfs://10.79.0.1/images/lab`. The live
/// system brings up its network by DHCP, mounts the folder with the
/// kernel's NFS 4.1 client and backs the source up into it (the host
/// verifies the image and restores it byte for byte); a second boot
/// restores it from the export onto a blank disk, which matches the
/// source. Needs root (namespaces, tap) and nfs-ganesha.
#[test]
fn an_nfs_export_is_the_image_drive_for_backup_and_restore() {
    if !ready("an_nfs_export_is_the_image_drive_for_backup_and_restore") {
        return;
    }
    assert!(common::loop_device::have_root(), "needs root (network namespaces and a tap device)");
    let dir = TempDir::new("live-nfs");
    let (source, parts) = make_source(&dir);
    let net = PxeNet::new("nfs", true);
    let nfs = Ganesha::start(&dir, &net.ns);
    let nic = [
        "-netdev".to_string(),
        "tap,id=n0,ifname=tap0,script=no,downscript=no".into(),
        "-device".into(),
        "virtio-net-pci,netdev=n0".into(),
    ];
    let conf = |job: &str| format!("{job}image = pc1\ndrive = nfs://10.79.0.1/images/lab\nafter = poweroff\n");
    let boot_job = |name: &str, conf: &str, disks: &[(&Path, &str)]| {
        let stick = stick_with(&dir, name, Some(conf));
        let b = boot_in(&dir, Firmware::Bios, Some(&stick), disks, None, &nic, Some(&net.ns), &[]);
        std::fs::remove_file(&stick).unwrap();
        b
    };

    let src = [(source.as_path(), "ide-hd,drive=DRIVE,bus=ide.0,serial=KLONSRC")];
    let b = boot_job("stick-nfs-backup.img", &conf("job = backup\nsource = serial=KLONSRC\n"), &src);
    let line = result_line(&b, Firmware::Bios, "backup to an NFS export");
    assert!(line.contains("image pc1 on nfs://10.79.0.1/images/lab in"), "{line}");
    let image = nfs.export.join("lab/pc1");
    common::disks::ok(&common::disks::klon(&["verify", image.to_str().unwrap()]));
    let back = dir.join("host-restore.img");
    blank_file(&back, 64 * MIB);
    common::disks::ok(&common::disks::klon(&["restore", "--yes", image.to_str().unwrap(), back.to_str().unwrap()]));
    for (i, (start, len)) in parts.iter().enumerate() {
        assert_same(&source, &back, *start, *len, &format!("NFS backup: partition {}", i + 1));
    }
    std::fs::remove_file(&back).unwrap();
    let log = std::fs::read_to_string(nfs.export.join("lab/klon-jobs.log")).unwrap();
    assert!(log.contains("KLON-RESULT: ok backup"), "{log}");

    let target = dir.join("target.img");
    blank_file(&target, 64 * MIB);
    let tgt = [(target.as_path(), "virtio-blk-pci,drive=DRIVE,serial=KLONTGT")];
    let b = boot_job("stick-nfs-restore.img", &conf("job = restore\ntarget = serial=KLONTGT\n"), &tgt);
    result_line(&b, Firmware::Bios, "restore from an NFS export");
    for (i, (start, len)) in parts.iter().enumerate() {
        assert_same(&source, &target, *start, *len, &format!("NFS restore: partition {}", i + 1));
    }
    drop(nfs);
}

/// An SSH server (OpenSSH's sshd) on the network namespace's bridge
/// (10.79.0.1:22), in the namespace, with throwaway host and user keys
/// (key login only); the folder `srv/images` of `dir` to hold images.
/// Killed when dropped.
struct Sshd {
    server: Child,
    base: PathBuf,
    made_privsep: bool,
}

impl Sshd {
    fn start(dir: &TempDir, ns: &str) -> Sshd {
        let base = dir.join("sshd");
        std::fs::create_dir_all(base.join("srv/images")).unwrap();
        let p = |n: &str| base.join(n).display().to_string();
        for key in ["hostkey", "userkey"] {
            run("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-f", &p(key)]);
        }
        std::fs::copy(base.join("userkey.pub"), base.join("authorized_keys")).unwrap();
        std::fs::write(
            base.join("sshd_config"),
            format!(
                "ListenAddress 10.79.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nPidFile {}\nStrictModes no\n\
                 UsePAM no\nSubsystem sftp internal-sftp\n",
                p("hostkey"),
                p("authorized_keys"),
                p("sshd.pid")
            ),
        )
        .unwrap();
        let made_privsep = !Path::new("/run/sshd").exists();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let server = Command::new("ip")
            .args(["netns", "exec", ns, "/usr/sbin/sshd", "-D", "-e", "-f", &p("sshd_config")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(base.join("sshd.log")).unwrap())
            .spawn()
            .expect("start sshd (apt-get install openssh-server)");
        wait_listening(ns, 22, "sshd");
        Sshd { server, base, made_privsep }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        if self.made_privsep {
            let _ = std::fs::remove_dir("/run/sshd");
        }
    }
}

/// An SFTP location as the image drive: sshd in a network namespace the
/// test makes; the stick carries klon.conf naming
/// `sftp://root@10.79.0.1/<dir>/srv/images` and, in its `ssh/` folder, the
/// user's key and the server's host key as known_hosts. The live system
/// takes the keys, brings up its network, mounts the folder with sshfs and
/// backs the source up into it (the host verifies and restores it byte for
/// byte); a second boot whose known_hosts names another key is refused
/// (ssh does not log in to an unknown host) and writes nothing; a third
/// restores the image onto a blank disk, which matches the source. Needs
/// root (namespaces, tap) and openssh-server.
#[test]
fn an_sftp_location_is_the_image_drive_for_backup_and_restore() {
    if !ready("an_sftp_location_is_the_image_drive_for_backup_and_restore") {
        return;
    }
    assert!(common::loop_device::have_root(), "needs root (network namespaces and a tap device)");
    let dir = TempDir::new("live-sftp");
    let (source, parts) = make_source(&dir);
    let net = PxeNet::new("sftp", true);
    let sshd = Sshd::start(&dir, &net.ns);
    let images = sshd.base.join("srv/images");
    let nic = [
        "-netdev".to_string(),
        "tap,id=n0,ifname=tap0,script=no,downscript=no".into(),
        "-device".into(),
        "virtio-net-pci,netdev=n0".into(),
    ];
    let url = format!("sftp://root@10.79.0.1{}", images.display());
    let conf = |job: &str| format!("{job}image = pc1\ndrive = {url}\nafter = poweroff\n");
    // A stick with klon.conf and the ssh/ folder: the user's key, and
    // `host_key` as the known key of 10.79.0.1.
    let boot_job = |name: &str, conf: &str, host_key: &Path, disks: &[(&Path, &str)]| {
        let stick = stick_with(&dir, name, Some(conf));
        let ssh = dir.join("stick-ssh");
        let _ = std::fs::remove_dir_all(&ssh);
        std::fs::create_dir_all(&ssh).unwrap();
        std::fs::copy(sshd.base.join("userkey"), ssh.join("id_ed25519")).unwrap();
        let host = std::fs::read_to_string(host_key).unwrap();
        std::fs::write(ssh.join("known_hosts"), format!("10.79.0.1 {host}")).unwrap();
        let img = format!("{}@@1M", stick.display());
        mtools("mcopy", &["-s", "-o", "-i", &img, ssh.to_str().unwrap(), "::/ssh"]);
        let b = boot_in(&dir, Firmware::Bios, Some(&stick), disks, None, &nic, Some(&net.ns), &[]);
        std::fs::remove_file(&stick).unwrap();
        b
    };
    let host_key = sshd.base.join("hostkey.pub");

    let src = [(source.as_path(), "ide-hd,drive=DRIVE,bus=ide.0,serial=KLONSRC")];
    let b = boot_job("stick-sftp-backup.img", &conf("job = backup\nsource = serial=KLONSRC\n"), &host_key, &src);
    let line = result_line(&b, Firmware::Bios, "backup to an SFTP location");
    assert!(line.contains(&format!("image pc1 on {url} in")), "{line}");
    assert!(b.find("took 2 ssh files").is_some(), "the keys were not taken:\n{}", b.transcript());
    let image = images.join("pc1");
    common::disks::ok(&common::disks::klon(&["verify", image.to_str().unwrap()]));
    let back = dir.join("host-restore.img");
    blank_file(&back, 64 * MIB);
    common::disks::ok(&common::disks::klon(&["restore", "--yes", image.to_str().unwrap(), back.to_str().unwrap()]));
    for (i, (start, len)) in parts.iter().enumerate() {
        assert_same(&source, &back, *start, *len, &format!("SFTP backup: partition {}", i + 1));
    }
    std::fs::remove_file(&back).unwrap();
    assert!(std::fs::read_to_string(images.join("klon-jobs.log")).unwrap().contains("KLON-RESULT: ok backup"));

    // Another host key known: ssh does not log in; nothing is written.
    let target = dir.join("target.img");
    blank_file(&target, 64 * MIB);
    let tgt = [(target.as_path(), "virtio-blk-pci,drive=DRIVE,serial=KLONTGT")];
    let restore = conf("job = restore\ntarget = serial=KLONTGT\n");
    let b = boot_job("stick-sftp-unknown.img", &restore, &sshd.base.join("userkey.pub"), &tgt);
    let (_, line) = b.find("KLON-RESULT:").unwrap_or_else(|| panic!("no result:\n{}", b.transcript()));
    assert!(line.contains("KLON-RESULT: failed") && line.contains("cannot reach"), "{line}\n{}", b.transcript());
    assert!(std::fs::read(&target).unwrap().iter().all(|&b| b == 0), "the target was written");

    let b = boot_job("stick-sftp-restore.img", &restore, &host_key, &tgt);
    result_line(&b, Firmware::Bios, "restore from an SFTP location");
    for (i, (start, len)) in parts.iter().enumerate() {
        assert_same(&source, &target, *start, *len, &format!("SFTP restore: partition {}", i + 1));
    }
    drop(sshd);
}

/// Repositories in an S3 store from the live system: Garage in a network
/// namespace the test makes (its S3 API on the bridge, 10.79.0.1), and
/// klon.conf naming `drive = s3://klon/live` with the store's endpoint,
/// region and key. The live system brings up its network and backs the
/// source up as a snapshot of the repository `live/pc1` in the bucket; from
/// the namespace klon checks the repository (`check --read-data`) and
/// restores the snapshot byte for byte; a second boot restores it onto a
/// blank disk, which matches the source. Needs root (namespaces, tap) and
/// Garage (KLON_GARAGE or on the PATH; CI installs it).
#[test]
fn an_s3_store_holds_the_repositories_of_unattended_jobs() {
    if !ready("an_s3_store_holds_the_repositories_of_unattended_jobs") {
        return;
    }
    assert!(common::loop_device::have_root(), "needs root (network namespaces and a tap device)");
    let bin = common::garage::garage_binary()
        .expect("needs Garage: cargo install --locked garage (CI does), or KLON_GARAGE=PATH");
    let dir = TempDir::new("live-s3");
    let (source, parts) = make_source(&dir);
    let net = PxeNet::new("s3", true);
    let garage = common::garage::Garage::start_in(bin, &dir, Some(&net.ns), "10.79.0.1");
    let nic = [
        "-netdev".to_string(),
        "tap,id=n0,ifname=tap0,script=no,downscript=no".into(),
        "-device".into(),
        "virtio-net-pci,netdev=n0".into(),
    ];
    let conf = |job: &str| {
        format!(
            "{job}image = pc1\ndrive = s3://klon/live\ns3_endpoint = {}\ns3_region = garage\ns3_access_key = {}\n\
             s3_secret_key = \"{}\"\nafter = poweroff\n",
            garage.endpoint, garage.key_id, garage.secret
        )
    };
    let boot_job = |name: &str, conf: &str, disks: &[(&Path, &str)]| {
        let stick = stick_with(&dir, name, Some(conf));
        let b = boot_in(&dir, Firmware::Bios, Some(&stick), disks, None, &nic, Some(&net.ns), &[]);
        std::fs::remove_file(&stick).unwrap();
        b
    };

    let src = [(source.as_path(), "ide-hd,drive=DRIVE,bus=ide.0,serial=KLONSRC")];
    let b = boot_job("stick-s3-backup.img", &conf("job = backup\nsource = serial=KLONSRC\n"), &src);
    let line = result_line(&b, Firmware::Bios, "backup into an S3 store");
    assert!(line.contains("to s3://klon/live/pc1 in"), "{line}");
    assert!(!b.transcript().contains(&garage.secret), "the secret key was shown:\n{}", b.transcript());
    // From the namespace, with the store's key: the repository checks, and
    // its snapshot restores the source.
    let host_klon = |args: &[&str]| {
        let mut c = net.klon(args);
        c.envs(garage.env());
        let o = c.output().unwrap();
        assert!(o.status.success(), "klon {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    host_klon(&["check", "--read-data", "s3://klon/live/pc1"]);
    let back = dir.join("host-restore.img");
    blank_file(&back, 64 * MIB);
    host_klon(&["restore", "--yes", "s3://klon/live/pc1", back.to_str().unwrap()]);
    for (i, (start, len)) in parts.iter().enumerate() {
        assert_same(&source, &back, *start, *len, &format!("S3 backup: partition {}", i + 1));
    }
    std::fs::remove_file(&back).unwrap();

    let target = dir.join("target.img");
    blank_file(&target, 64 * MIB);
    let tgt = [(target.as_path(), "virtio-blk-pci,drive=DRIVE,serial=KLONTGT")];
    let b = boot_job("stick-s3-restore.img", &conf("job = restore\ntarget = serial=KLONTGT\n"), &tgt);
    result_line(&b, Firmware::Bios, "restore from an S3 store");
    for (i, (start, len)) in parts.iter().enumerate() {
        assert_same(&source, &target, *start, *len, &format!("S3 restore: partition {}", i + 1));
    }
    drop(garage);
}

/// Clonezilla images that need a passphrase, restored by unattended jobs
/// with the passphrase from klon.conf: one with LUKS volumes (the committed
/// fixture; its LUKS partitions come out as Clonezilla's own restore wrote
/// them through dm-crypt), and one saved encrypted as `ocs-sr -enc` does
/// (gocryptfs; mounted by the initramfs's gocryptfs over FUSE), which
/// restores as its plain original.
#[test]
fn clonezilla_images_that_need_a_passphrase_restore_in_the_live_system() {
    use common::disks::{committed_sum, sha256};
    use common::loop_device::{have_root, root_tests_required};
    if !ready("clonezilla_images_that_need_a_passphrase_restore_in_the_live_system") {
        return;
    }
    if !have_root() {
        assert!(!root_tests_required(), "making the gocryptfs image needs FUSE (root)");
        report("Clonezilla images with passphrases: skipped (needs root)");
        return;
    }
    let s = |p: &Path| p.display().to_string();
    let dir = TempDir::new("live-czpass");
    let fixtures = repo().join("tests/fixtures");
    let images = dir.join("content").join("klon-images");
    std::fs::create_dir_all(&images).unwrap();
    run("cp", &["-a", &s(&fixtures.join("clonezilla-luks/luks-zst")), &s(&images.join("luks"))]);
    let plain = fixtures.join("clonezilla-trixie/gpt-zst");
    common::clonezilla::gocryptfs_image(&dir, &plain, &images.join("enc"), "klon luks fixture");
    let drive = dir.join("drive.img");
    run("mke2fs", &["-q", "-t", "ext4", "-L", "KLONIMG", "-d", &s(&dir.join("content")), &s(&drive), "64M"]);
    let stick = stick_with(&dir, "stick.img", Some("passphrase = klon luks fixture\n"));
    let direct = DirectBoot::from_stick(&dir, &stick);
    let restore = |image: &str, size: u64| -> PathBuf {
        let target = dir.join(&format!("{image}-target.img"));
        blank_file(&target, size);
        let append = format!(
            "console=ttyS0,115200n8 quiet klon.job=restore klon.image={image} klon.target=/dev/nvme0n1 \
             klon.drive=LABEL=KLONIMG klon.after=poweroff klon.wait=10"
        );
        let b = boot_with(
            &dir,
            Firmware::Bios,
            &stick,
            &[
                (drive.as_path(), "virtio-blk-pci,drive=DRIVE,serial=KLONIMGD"),
                (target.as_path(), "nvme,drive=DRIVE,serial=TARGET1"),
            ],
            None,
            &direct.args(&append),
        );
        result_line(&b, Firmware::Bios, &format!("restore of the Clonezilla image {image}"));
        target
    };

    let luks = restore("luks", 48 * MIB);
    let luks_fixture = fixtures.join("clonezilla-luks");
    for (start, len, name) in
        [(18432, 40960, "cz-restored-p2"), (59392, 32768, "cz-restored-p3"), (2048, 16384, "boot.ext4")]
    {
        let part = dir.join(name);
        std::fs::write(&part, common::disks::read_at(&luks, start * 512, len * 512)).unwrap();
        assert_eq!(sha256(&part), committed_sum(&luks_fixture, name), "{name}: the live restore differs");
    }

    let enc = restore("enc", 40 * MIB);
    let expected = dir.join("plain-restored.img");
    let o = common::disks::klon(&["restore", "--yes", "--quiet", &s(&plain), &s(&expected)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(sha256(&enc), sha256(&expected), "the encrypted image restored in the live system differs");
}
