//! Building disk image files for tests and running the klon binary.

#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const MIB: u64 = 1 << 20;

#[allow(unused_imports)]
pub use super::shared::{Mounted, TempDir};

impl TempDir {
    /// A directory for a fixture a test binary keeps in a `static`, which is
    /// never dropped (so one in /tmp would stay behind after every run):
    /// Cargo's scratch directory for tests (target/tmp), under a fixed name
    /// each run replaces, so at most the last run's copy is there.
    pub fn for_static(tag: &str) -> TempDir {
        let p = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("klon-test-{tag}"));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

/// Runs klon with `args`; stdin is not a terminal.
pub fn klon(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_klon")).args(args).stdin(Stdio::null()).output().expect("run klon")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts klon succeeded, printing its output otherwise.
pub fn ok(o: &Output) {
    assert!(o.status.success(), "klon failed ({:?}):\nstdout: {}\nstderr: {}", o.status.code(), stdout(o), stderr(o));
}

/// Asserts klon failed with exit `code` and stderr containing every string of `needles`.
pub fn fails_with(o: &Output, code: i32, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(code),
        "expected exit {code}, got {:?}\nstderr: {err}\nstdout: {}",
        o.status.code(),
        stdout(o)
    );
    for n in needles {
        assert!(err.contains(n), "stderr does not mention {n:?}:\n{err}");
    }
}

/// Runs a shell tool, panicking with its output when it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    run_env(cmd, args, &[])
}

/// Runs a shell tool with extra environment variables, panicking with its
/// output when it fails.
pub fn run_env(cmd: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let o =
        Command::new(cmd).args(args).envs(env.iter().copied()).output().unwrap_or_else(|e| {
            panic!("cannot run {cmd}: {e} (is it installed? scripts/test installs the test tools)")
        });
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a shell tool with `input` on stdin.
pub fn run_with_input(cmd: &str, args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Deterministic incompressible bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Compressible text.
pub fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 100);
    let mut i = seed;
    while out.len() < len {
        out.extend_from_slice(format!("{i:08} the quick brown fox jumps over the lazy dog\n").as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// Creates a file of `size` bytes (sparse: reads as zeros).
pub fn blank_file(path: &Path, size: u64) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// Creates a file of `size` bytes full of non-zero garbage, standing for a
/// used disk that a restore overwrites.
pub fn garbage_file(path: &Path, size: u64) {
    let f = File::create(path).unwrap();
    let chunk = random_bytes(0xbad, MIB as usize);
    let mut off = 0;
    while off < size {
        let n = MIB.min(size - off) as usize;
        f.write_all_at(&chunk[..n], off).unwrap();
        off += n as u64;
    }
}

pub fn write_at(path: &Path, off: u64, data: &[u8]) {
    OpenOptions::new().write(true).open(path).unwrap().write_all_at(data, off).unwrap();
}

pub fn read_at(path: &Path, off: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    File::open(path).unwrap().read_exact_at(&mut buf, off).unwrap();
    buf
}

/// Asserts two files (or devices) hold the same bytes in `[off, off+len)`.
pub fn assert_same(a: &Path, b: &Path, off: u64, len: u64, what: &str) {
    let mut pos = off;
    while pos < off + len {
        let n = MIB.min(off + len - pos);
        let x = read_at(a, pos, n);
        let y = read_at(b, pos, n);
        if x != y {
            let i = x.iter().zip(&y).position(|(p, q)| p != q).unwrap();
            panic!("{what}: {} and {} differ at byte {}", a.display(), b.display(), pos + i as u64);
        }
        pos += n;
    }
}

/// A partition as sfdisk --json reports it: (start sector, size in sectors, type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SfPart {
    pub node: String,
    pub start: u64,
    pub size: u64,
    pub ptype: String,
}

/// Partitions of a disk image according to `sfdisk --json`.
pub fn sfdisk_parts(path: &Path) -> (Vec<SfPart>, u64) {
    let out = run("sfdisk", &["--json", path.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let table = &v["partitiontable"];
    let sector = table["sectorsize"].as_u64().unwrap_or(512);
    let parts = table["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| SfPart {
            node: p["node"].as_str().unwrap().to_string(),
            start: p["start"].as_u64().unwrap(),
            size: p["size"].as_u64().unwrap(),
            ptype: p["type"].as_str().unwrap().to_string(),
        })
        .collect();
    (parts, sector)
}

/// Fills each partition with a mix: text, random, zeros, so the image
/// exercises compression, incompressible data and zero skipping.
pub fn fill_partitions(path: &Path, parts: &[SfPart], sector: u64) {
    for (i, p) in parts.iter().enumerate() {
        if p.ptype == "5" || p.ptype == "f" || p.ptype == "85" {
            continue; // extended container
        }
        let start = p.start * sector;
        let len = p.size * sector;
        let seed = i as u64 + 1;
        // First quarter text, a random stretch, a gap of zeros, random tail.
        let q = len / 4;
        write_at(path, start, &text_bytes(seed, q as usize));
        write_at(path, start + q, &random_bytes(seed, (q / 2) as usize));
        write_at(path, start + len - 8192, &random_bytes(seed + 100, 8192));
    }
}

/// A GPT disk image made by sgdisk with three partitions, filled with data,
/// with boot code in the MBR and data in the gap after the GPT.
pub fn make_gpt_disk(path: &Path, size: u64) -> Vec<SfPart> {
    blank_file(path, size);
    let p = path.to_str().unwrap();
    run(
        "sgdisk",
        &[
            "-n",
            "1:2048:+4M",
            "-t",
            "1:ef00",
            "-c",
            "1:EFI system",
            "-n",
            "2:0:+12M",
            "-t",
            "2:8300",
            "-c",
            "2:root",
            "-n",
            "3:0:0",
            "-t",
            "3:8300",
            "-c",
            "3:home",
            p,
        ],
    );
    let (parts, sector) = sfdisk_parts(path);
    fill_partitions(path, &parts, sector);
    write_at(path, 0, &random_bytes(440, 440)); // boot code
    write_at(path, 40 * 512, &text_bytes(9, 4000)); // data in the GPT gap (e.g. a bootloader's)
    parts
}

/// An MBR disk image with two primary partitions, an extended one and two
/// logical partitions, filled with data; boot code in the MBR and data in
/// the gap after it (where GRUB puts core.img).
pub fn make_mbr_disk(path: &Path, size: u64) -> Vec<SfPart> {
    blank_file(path, size);
    let script = "label: dos\nlabel-id: 0x1234abcd\n\
                  start=2048, size=8192, type=83, bootable\n\
                  start=10240, size=8192, type=7\n\
                  start=18432, type=5\n\
                  start=20480, size=8192, type=83\n\
                  start=30720, type=82\n";
    run_with_input("sfdisk", &["--quiet", path.to_str().unwrap()], script);
    let (parts, sector) = sfdisk_parts(path);
    fill_partitions(path, &parts, sector);
    write_at(path, 0, &random_bytes(440, 440));
    write_at(path, 512, &text_bytes(3, 20000)); // "core.img" after the MBR
    parts
}

/// The data files of an image (names ending in digits).
pub fn data_files(img: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(img)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e.to_str().unwrap().chars().all(|c| c.is_ascii_digit())))
        .collect();
    v.sort();
    v
}

/// An image of a 4 MiB disk with some text on it.
pub fn small_image(t: &TempDir) -> (PathBuf, PathBuf) {
    let (src, img) = (t.join("src.img"), t.join("image"));
    blank_file(&src, 4 * MIB);
    write_at(&src, 0, &text_bytes(7, MIB as usize));
    ok(&klon(&["backup", "--no-verify", src.to_str().unwrap(), img.to_str().unwrap()]));
    (src, img)
}

/// The sum of `name` in the `SHA256SUMS` file of the fixture directory `dir`.
pub fn committed_sum(dir: &Path, name: &str) -> String {
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
    sums.lines()
        .find_map(|l| l.strip_suffix(name).map(|h| h.trim().to_string()))
        .unwrap_or_else(|| panic!("{name} is not in {}", dir.join("SHA256SUMS").display()))
}

/// The sha256 of a file, as sha256sum prints it.
pub fn sha256(path: &Path) -> String {
    run("sha256sum", &[path.to_str().unwrap()]).split_whitespace().next().unwrap().to_string()
}

/// The number in `text` after `key` (the first word that parses), as the
/// filesystems' tools print their sizes.
pub fn number_after(text: &str, key: &str) -> u64 {
    let at = text.find(key).unwrap_or_else(|| panic!("no {key:?} in {text}"));
    text[at + key.len()..].split(|c: char| !c.is_ascii_digit()).find(|w| !w.is_empty()).unwrap().parse().unwrap()
}

/// Runs `f` while `file` is mounted on `dir` by ntfs-3g (FUSE, in the
/// foreground), then unmounts it and waits for the daemon (so everything
/// is on disk).
pub fn ntfs_mounted<T>(file: &Path, dir: &Path, read_only: bool, f: impl FnOnce() -> T) -> T {
    std::fs::create_dir_all(dir).unwrap();
    let opts = if read_only { "ro,no_detach" } else { "no_detach" };
    let mut child = Command::new("ntfs-3g")
        .args(["-o", opts, file.to_str().unwrap(), dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("running ntfs-3g (is ntfs-3g installed?)");
    let want = format!(" {} ", dir.display());
    let mounted = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| l.contains(&want) && l.contains(" fuse"))
    });
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert!(mounted, "ntfs-3g did not mount {}", file.display());
        f()
    }));
    let _ = Command::new("umount").arg(dir).status();
    let _ = child.wait();
    match result {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e),
    }
}
