//! Test helpers shared by the unit tests (`crate::testutil`) and the
//! integration tests (`tests/common`, which include this file): the root
//! gate, scratch directories and files, mounts and loop devices, each
//! cleaned up on drop so that a failing test leaves nothing behind. Only
//! std and nix, so both kinds of test build it the same.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Whether root-only tests must run (`KLON_REQUIRE_ROOT_TESTS=1`, as
/// `.ci/run` sets): then a missing root is a failure, not a skip.
pub fn root_tests_required() -> bool {
    std::env::var("KLON_REQUIRE_ROOT_TESTS").is_ok_and(|v| v == "1")
}

/// Whether the tests run as root (no more than that).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The root gate: whether a test that needs root may go on. Without root:
/// false (the caller skips), unless root tests are required: then it
/// panics, so a CI run without root fails instead of skipping them.
pub fn have_root() -> bool {
    if is_root() {
        return true;
    }
    if root_tests_required() {
        panic!("this test needs root and KLON_REQUIRE_ROOT_TESTS=1 is set: run the tests as root");
    }
    false
}

/// [`have_root`], saying "skipping: needs root {why}" when it is false:
/// `if !root_for("to mount") { return; }`.
pub fn root_for(why: &str) -> bool {
    let r = have_root();
    if !r {
        eprintln!("skipping: needs root {why}");
    }
    r
}

/// A path in the temporary directory no other test of any process uses:
/// `klon-test-{tag}-{pid}-{n}{suffix}`, whatever was there removed.
fn unique_temp(tag: &str, suffix: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let p = std::env::temp_dir().join(format!("klon-test-{tag}-{}-{n}{suffix}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    let _ = std::fs::remove_file(&p);
    p
}

/// A new empty temporary directory, removed with everything in it on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates it; `tag` goes into its name (for a reader of /tmp).
    pub fn new(tag: &str) -> TempDir {
        let p = unique_temp(tag, "");
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    /// A path inside it.
    pub fn join(&self, s: &str) -> PathBuf {
        self.0.join(s)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A temporary file of a given size (a sparse image to format), removed on
/// drop.
pub struct TempFile(pub PathBuf);

impl TempFile {
    /// Creates `size` bytes of zeros; `tag` goes into its name.
    pub fn new(tag: &str, size: u64) -> TempFile {
        let p = unique_temp(tag, ".img");
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        TempFile(p)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs a tool to completion; panics if it cannot start.
fn tool(prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e} (is it installed? scripts/test installs the test tools)"))
}

/// [`tool`], panicking with its output unless it succeeds; its stdout.
fn tool_ok(prog: &str, args: &[&str]) -> String {
    let o = tool(prog, args);
    assert!(
        o.status.success(),
        "{prog} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Unmounts `dir`, trying again for about four seconds while it is busy
/// (a FUSE daemon or the loop device still settling); false, with a
/// warning, if it stays mounted.
pub fn unmount(dir: &Path) -> bool {
    for _ in 0..20 {
        if Command::new("umount").arg(dir).status().is_ok_and(|s| s.success()) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("warning: could not unmount {}", dir.display());
    false
}

/// A mount made by a test, unmounted on drop (see [`unmount`]; declare it
/// after the loop device it mounts, so it goes first); a loop mount's loop
/// device goes with it. `Mounted(dir)` takes over a mount made some other
/// way.
pub struct Mounted(pub PathBuf);

impl Mounted {
    /// Mounts `what` on `dir` (created if need be) with options `opts`
    /// ("loop" for an image file).
    pub fn new(what: &Path, dir: &Path, opts: &str) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        tool_ok("mount", &["-o", opts, what.to_str().unwrap(), dir.to_str().unwrap()]);
        Mounted(dir.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        unmount(&self.0);
    }
}

/// A loop device attached by a test; detached again on drop.
#[derive(Debug)]
pub struct LoopDevice {
    /// The device node, e.g. /dev/loop3.
    pub path: PathBuf,
}

impl LoopDevice {
    /// Attaches `file` to a free loop device with partition scanning, with
    /// a logical sector size when given. Panics on failure.
    pub fn attach(file: &Path, sector_size: Option<u32>) -> LoopDevice {
        let ss = sector_size.map(|s| s.to_string());
        let mut args = vec!["-P"];
        if let Some(s) = &ss {
            args.extend(["--sector-size", s.as_str()]);
        }
        let dev = Self::losetup(&args, file);
        dev.rescan();
        dev
    }

    /// Attaches `file` to a free loop device without partition scanning:
    /// a block device that cannot hold partitions (BLKRRPART answers
    /// EINVAL), as a logical volume, an md array or an nbd device.
    pub fn attach_without_partitions(file: &Path) -> LoopDevice {
        Self::losetup(&[], file)
    }

    /// Attaches `file` to a free loop device with direct I/O and without
    /// partition scanning, so nothing of the file is served from the page
    /// cache: every read of a bad sector of a failing file reaches it.
    pub fn attach_direct(file: &Path) -> LoopDevice {
        Self::losetup(&["--direct-io=on"], file)
    }

    /// Attaches `size` bytes of `file` from `offset` on (`losetup --offset
    /// --sizelimit`, no partition scanning), as a partition's range of a
    /// disk image is attached on its own. Panics on failure.
    pub fn attach_range(file: &Path, offset: u64, size: u64) -> LoopDevice {
        Self::attach_range_with(file, offset, size, 512)
    }

    /// [`LoopDevice::attach_range`] with `sector_size`-byte logical
    /// sectors (a partition of a 4Kn disk).
    pub fn attach_range_with(file: &Path, offset: u64, size: u64, sector_size: u32) -> LoopDevice {
        let (o, s, ss) = (offset.to_string(), size.to_string(), sector_size.to_string());
        Self::losetup(&["--sector-size", &ss, "--offset", &o, "--sizelimit", &s], file)
    }

    /// `losetup -f --show OPTIONS FILE`, owned before anything can panic.
    fn losetup(options: &[&str], file: &Path) -> LoopDevice {
        let mut args = vec!["-f", "--show"];
        args.extend_from_slice(options);
        args.push(file.to_str().expect("utf-8 path"));
        let name = tool_ok("losetup", &args).trim().to_string();
        assert!(name.starts_with("/dev/loop"), "unexpected losetup output {name:?}");
        LoopDevice { path: PathBuf::from(name) }
    }

    /// `/dev/loopN` as text.
    pub fn dev(&self) -> &str {
        self.path.to_str().expect("a /dev/loop path")
    }

    /// `loopN`.
    pub fn name(&self) -> &str {
        self.dev().trim_start_matches("/dev/")
    }

    /// Asks the kernel to (re)read the partitions (`partx -u`).
    pub fn rescan(&self) {
        let _ = tool("partx", &["-u", self.dev()]);
    }

    /// The node of partition `n` (/dev/loopNpM), waiting briefly for it.
    pub fn partition(&self, n: u32) -> PathBuf {
        let p = PathBuf::from(format!("{}p{n}", self.dev()));
        for i in 0..50 {
            if p.exists() {
                return p;
            }
            if i % 10 == 0 {
                self.rescan();
                // `partx -u` can stop short of the last logical partition
                // of a loop device: ask for this one by number too.
                let _ = tool("partx", &["-a", "-n", &n.to_string(), self.dev()]);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("partition node {} did not appear", p.display());
    }

    /// Ends the grub-mount processes os-prober leaves holding the device's
    /// partitions (ocs-sr runs os-prober when GRUB's tools are installed):
    /// they would keep the device attached after it is detached.
    fn end_grub_mounts(&self) {
        let dev = self.dev();
        let Ok(procs) = std::fs::read_dir("/proc") else { return };
        for p in procs.flatten() {
            let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else { continue };
            let args: Vec<String> =
                cmdline.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            let is_grub_mount = args.first().is_some_and(|a| a.ends_with("grub-mount"));
            if is_grub_mount && args.iter().any(|a| a == dev || a.starts_with(&format!("{dev}p"))) {
                let _ = tool("kill", &[p.file_name().to_str().unwrap_or_default()]);
            }
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        self.end_grub_mounts();
        for _ in 0..20 {
            if tool("losetup", &["-d", self.dev()]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        eprintln!("warning: could not detach {}", self.path.display());
    }
}
