//! Helpers for unit tests: scratch files and directories, mounts, running
//! tools, deterministic data, root checks. Each cleans up after itself on
//! drop, so a failing test leaves nothing behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Whether the tests run as root. Without root: false (the caller skips),
/// unless KLON_REQUIRE_ROOT_TESTS=1 says root tests must run: then it
/// panics, so a CI run without root fails instead of skipping them.
pub fn have_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("KLON_REQUIRE_ROOT_TESTS").is_ok_and(|v| v == "1") {
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
/// `klon-unit-{tag}-{pid}-{n}{suffix}`, whatever was there removed.
fn unique_temp(tag: &str, suffix: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let p = std::env::temp_dir().join(format!("klon-unit-{tag}-{}-{n}{suffix}", std::process::id()));
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

/// A mount made by a test, unmounted on drop (see [`unmount`]); a loop
/// mount's loop device goes with it. `Mounted(dir)` takes over a mount
/// made some other way.
pub struct Mounted(pub PathBuf);

impl Mounted {
    /// Loop-mounts the image file `img` on `dir` (created if need be).
    pub fn new(img: &Path, dir: &Path) -> Mounted {
        Mounted::with(img, dir, "loop")
    }

    /// Mounts `img` on `dir` (created if need be) with options `opts`.
    pub fn with(img: &Path, dir: &Path, opts: &str) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        sh("mount", &["-o", opts, img.to_str().unwrap(), dir.to_str().unwrap()]);
        Mounted(dir.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        unmount(&self.0);
    }
}

/// Runs `cmd` to completion and returns what it did; panics if it cannot
/// start (the tool is not installed).
pub fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {:?}: {e} (is it installed?)", cmd.get_program()))
}

/// Runs `cmd`; panics, showing its stdout and stderr, unless it succeeds.
/// Returns its stdout.
pub fn run(cmd: &mut Command) -> String {
    let o = output(cmd);
    assert!(
        o.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// [`run`] for a program and its arguments.
pub fn sh(prog: &str, args: &[&str]) -> String {
    run(Command::new(prog).args(args))
}

/// Runs `cmd`, which may fail: whether it succeeded, and its stdout
/// followed by its stderr.
pub fn try_run(cmd: &mut Command) -> (bool, String) {
    let o = output(cmd);
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

/// [`try_run`] for a program and its arguments.
pub fn try_sh(prog: &str, args: &[&str]) -> (bool, String) {
    try_run(Command::new(prog).args(args))
}

/// Deterministic pseudo-random numbers (xorshift64): the same state gives
/// the same sequence on every run. The state must not be 0.
pub struct Rng(pub u64);

impl Rng {
    /// A generator whose state is spread from `seed` (so seeds 0, 1, 2…
    /// give unrelated sequences).
    pub fn seeded(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next number (the new state).
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (below 1 for 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// `len` bytes, eight from each number (little-endian).
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }

    /// `len` bytes, one from each number (its low byte).
    pub fn low_bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// A loop device attached over a file, detached on drop: first the
/// grub-mount processes os-prober leaves holding its partitions are ended
/// (ocs-sr runs os-prober when GRUB's tools are installed; they would keep
/// the device attached after it is detached).
pub struct LoopDev(pub String);

impl LoopDev {
    /// Attaches `file` (no partition scan).
    pub fn attach(file: &Path) -> LoopDev {
        LoopDev(sh("losetup", &["-f", "--show", file.to_str().unwrap()]).trim().to_string())
    }

    /// Attaches `file` and has the kernel scan its partitions.
    pub fn attach_partitioned(file: &Path) -> LoopDev {
        LoopDev(sh("losetup", &["-f", "--show", "-P", file.to_str().unwrap()]).trim().to_string())
    }

    /// Attaches `file` with logical sectors of `sector` bytes.
    pub fn attach_sector_size(file: &Path, sector: &str) -> LoopDev {
        LoopDev(sh("losetup", &["-f", "--show", "--sector-size", sector, file.to_str().unwrap()]).trim().to_string())
    }

    /// `loopN`.
    pub fn name(&self) -> &str {
        self.0.trim_start_matches("/dev/")
    }

    fn end_grub_mounts(&self) {
        let Ok(procs) = std::fs::read_dir("/proc") else { return };
        for p in procs.flatten() {
            let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else { continue };
            let args: Vec<String> =
                cmdline.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            let is_grub_mount = args.first().is_some_and(|a| a.ends_with("grub-mount"));
            if is_grub_mount && args.iter().any(|a| a == &self.0 || a.starts_with(&format!("{}p", self.0))) {
                let _ = try_sh("kill", &[p.file_name().to_str().unwrap_or_default()]);
            }
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        self.end_grub_mounts();
        for _ in 0..20 {
            if try_sh("losetup", &["-d", &self.0]).0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        eprintln!("warning: could not detach {}", self.0);
    }
}
