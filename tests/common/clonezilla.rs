//! Clonezilla images for tests: a source disk built from an sfdisk script
//! and filesystem images, saved by Debian's `ocs-sr` in batch mode from a
//! loop device (root only).

use std::path::{Path, PathBuf};

use super::disks::*;
use super::loop_device::LoopDevice;

/// A source disk and the Clonezilla image ocs-sr made of it.
pub struct Fixture {
    /// Keeps the files.
    pub _dir: TempDir,
    /// The source disk image file.
    pub disk: PathBuf,
    /// The Clonezilla image directory.
    pub image: PathBuf,
    /// Files put on the filesystems: (partition number, name, content).
    pub files: Vec<(u32, String, Vec<u8>)>,
}

/// What goes on a filesystem: text, random (incompressible, so split pieces
/// happen) and a few small files.
fn tree(seed: u64) -> Vec<(String, Vec<u8>)> {
    vec![
        ("readme.txt".into(), text_bytes(seed, 300_000)),
        ("random.bin".into(), random_bytes(seed, 3 << 20)),
        ("small.txt".into(), b"hello from klon\n".to_vec()),
        ("notes.txt".into(), text_bytes(seed + 7, 12_345)),
    ]
}

fn write_tree(dir: &Path, files: &[(String, Vec<u8>)]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, data) in files {
        std::fs::write(dir.join(name), data).unwrap();
    }
}

/// Makes a filesystem image of `size` bytes holding `files`.
fn make_fs(kind: &str, path: &Path, size: u64, files: &[(String, Vec<u8>)], scratch: &Path) {
    blank_file(path, size);
    let p = path.to_str().unwrap();
    match kind {
        "ext4" => {
            let src = scratch.join(format!("tree-{}", path.file_name().unwrap().to_string_lossy()));
            write_tree(&src, files);
            run("mke2fs", &["-q", "-F", "-t", "ext4", "-L", "klonroot", "-d", src.to_str().unwrap(), p]);
        }
        "vfat" => {
            run("mkfs.vfat", &["-n", "KLONFAT", p]);
            let src = scratch.join(format!("tree-{}", path.file_name().unwrap().to_string_lossy()));
            write_tree(&src, files);
            for (name, _) in files {
                let from = src.join(name);
                run_env(
                    "mcopy",
                    &["-i", p, from.to_str().unwrap(), &format!("::/{name}")],
                    &[("MTOOLS_SKIP_CHECK", "1")],
                );
            }
        }
        "ntfs" => {
            run("mkntfs", &["-F", "-Q", "-q", "-L", "klonntfs", p]);
            let src = scratch.join(format!("tree-{}", path.file_name().unwrap().to_string_lossy()));
            write_tree(&src, files);
            for (name, _) in files {
                run("ntfscp", &["-f", p, src.join(name).to_str().unwrap(), name]);
            }
        }
        "swap" => {
            run("mkswap", &["-L", "klonswap", "-U", "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", p]);
        }
        "raw" => {
            // No filesystem: data Clonezilla saves with partclone.dd.
            write_at(path, 0, &random_bytes(77, 1 << 20));
            write_at(path, size / 2, &text_bytes(78, 100_000));
        }
        other => panic!("unknown fs {other}"),
    }
}

/// One ocs-sr at a time: it shares files under /tmp and /var/log.
fn ocs_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Builds a disk from an sfdisk script and filesystems in `dir`, saves it
/// with ocs-sr (`options` choose compression, split and checksums) and
/// moves the image into `dir`.
pub fn build(dir: TempDir, script: &str, fss: &[(u32, &str)], options: &[&str]) -> Fixture {
    build_with(dir, script, fss, options, None)
}

/// As [`build`], but saved with `ocs-sr saveparts` of the partitions
/// `parts` (a partition image: no `disk` file).
pub fn build_parts(dir: TempDir, script: &str, fss: &[(u32, &str)], options: &[&str], parts: &[u32]) -> Fixture {
    build_with(dir, script, fss, options, Some(parts))
}

fn build_with(dir: TempDir, script: &str, fss: &[(u32, &str)], options: &[&str], saved: Option<&[u32]>) -> Fixture {
    let disk = dir.join("source.img");
    blank_file(&disk, 200 * MIB);
    run_with_input("sfdisk", &["--quiet", disk.to_str().unwrap()], script);
    // Boot code in the MBR and data in the gap after it, where a boot
    // loader keeps its core: Clonezilla saves both.
    write_at(&disk, 0, &random_bytes(440, 440));
    write_at(&disk, 40 * 512, &text_bytes(3, 8000));
    let (parts, sector) = sfdisk_parts(&disk);
    let mut files = Vec::new();
    for &(n, kind) in fss {
        let p = parts.iter().find(|p| p.node.ends_with(&n.to_string())).expect("partition in script");
        let fs_img = dir.join(&format!("p{n}.fs"));
        let content = tree(n as u64 * 11);
        make_fs(kind, &fs_img, p.size * sector, &content, &dir.0);
        let data = std::fs::read(&fs_img).unwrap();
        write_at(&disk, p.start * sector, &data);
        std::fs::remove_file(&fs_img).unwrap();
        if matches!(kind, "ext4" | "vfat" | "ntfs") {
            files.extend(content.into_iter().map(|(name, d)| (n, name, d)));
        }
    }
    // A name of this run's own in ocs-sr's /home/partimag.
    let name = format!("{}-{}", dir.0.file_name().unwrap().to_str().unwrap(), std::process::id());
    let image = dir.join("cz");
    {
        let _guard = ocs_lock();
        let dev = LoopDevice::attach(&disk, None);
        for &(n, _) in fss {
            dev.partition(n);
        }
        let devname = dev.path.file_name().unwrap().to_str().unwrap().to_string();
        // ocs-sr saves under /home/partimag and stops when it is missing
        // (the clonezilla package does not make it).
        std::fs::create_dir_all("/home/partimag").expect("creating /home/partimag for ocs-sr");
        let mut args = vec!["-q2", "-b", "-j2", "-sfsck", "-scs", "-senc", "-p", "true"];
        args.extend_from_slice(options);
        let part_names: Vec<String> = saved.unwrap_or(&[]).iter().map(|n| format!("{devname}p{n}")).collect();
        match saved {
            None => args.extend_from_slice(&["savedisk", &name, &devname]),
            Some(_) => {
                args.extend_from_slice(&["saveparts", &name]);
                args.extend(part_names.iter().map(String::as_str));
            }
        }
        let out = std::process::Command::new("ocs-sr").args(&args).output().expect("run ocs-sr (package clonezilla)");
        let saved = PathBuf::from("/home/partimag").join(&name);
        assert!(
            out.status.success() && saved.join("parts").is_file(),
            "ocs-sr {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        run("mv", &[saved.to_str().unwrap(), image.to_str().unwrap()]);
    }
    Fixture { _dir: dir, disk, image, files }
}

/// Saves the Clonezilla image `plain` again as `ocs-sr -enc` does, into
/// `dir`: made by `gocryptfs -init -plaintextnames` with `passphrase`, the
/// files copied in through its mount (a scratch directory in `t`), and a
/// clear `gocryptfs.info`. Needs gocryptfs and FUSE.
pub fn gocryptfs_image(t: &TempDir, plain: &Path, dir: &Path, passphrase: &str) {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let mnt = t.join("gocryptfs-mnt");
    std::fs::create_dir(dir).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let pass = t.join("gocryptfs-pass");
    std::fs::write(&pass, passphrase).unwrap();
    run("gocryptfs", &["-init", "-plaintextnames", "-q", "-passfile", &s(&pass), &s(dir)]);
    run("gocryptfs", &["-q", "-passfile", &s(&pass), &s(dir), &s(&mnt)]);
    let copied = std::process::Command::new("cp").args(["-a", &format!("{}/.", s(plain)), &s(&mnt)]).status();
    run("fusermount3", &["-u", &s(&mnt)]);
    assert!(copied.unwrap().success(), "copying {} into the gocryptfs mount", plain.display());
    std::fs::remove_file(&pass).unwrap();
    std::fs::write(
        dir.join("gocryptfs.info"),
        "# This image was saved with gocryptfs\ndisk_of_img=\"loop0\"\nparts_of_img=\"loop0p1 loop0p2\"\n\
         time_of_img=\"2026-1206-0900\"\ndisks_size_all_of_img=\"_41.9MB\"\n",
    )
    .unwrap();
    // The contents are encrypted, the names are not.
    assert!(dir.join("disk").is_file());
    assert_ne!(std::fs::read(dir.join("disk")).unwrap(), std::fs::read(plain.join("disk")).unwrap());
}
