//! Loop devices for tests that need real block devices (root only), and
//! the `require_root!()` guard for such tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Whether root-only tests must run (env `KLON_REQUIRE_ROOT_TESTS=1`):
/// then a missing root is a failure, not a skip.
pub fn root_tests_required() -> bool {
    std::env::var("KLON_REQUIRE_ROOT_TESTS").is_ok_and(|v| v == "1")
}

/// Whether the tests run as root.
pub fn have_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// At the top of a test that needs root: without root, panic when root
/// tests are required, else print "skipping: needs root" and return.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::common::loop_device::have_root() {
            if $crate::common::loop_device::root_tests_required() {
                panic!("this test needs root and KLON_REQUIRE_ROOT_TESTS=1 is set: run the tests as root");
            }
            eprintln!("skipping: needs root");
            return;
        }
    };
}

/// A loop device attached by a test; detached again on drop.
#[derive(Debug)]
pub struct LoopDevice {
    /// The device node, e.g. /dev/loop3.
    pub path: PathBuf,
}

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("running {cmd}: {e}"))
}

impl LoopDevice {
    /// Attaches `file` to a free loop device with partition scanning, with
    /// a logical sector size when given. Panics on failure.
    pub fn attach(file: &Path, sector_size: Option<u32>) -> LoopDevice {
        Self::attach_with(file, sector_size, true)
    }

    /// Attaches `file` to a free loop device without partition scanning:
    /// a block device that cannot hold partitions (BLKRRPART answers
    /// EINVAL), as a logical volume, an md array or an nbd device.
    pub fn attach_without_partitions(file: &Path) -> LoopDevice {
        Self::attach_with(file, None, false)
    }

    /// Attaches `file` to a free loop device with direct I/O and without
    /// partition scanning, so nothing of the file is served from the page
    /// cache: every read of a bad sector of a failing file reaches it.
    pub fn attach_direct(file: &Path) -> LoopDevice {
        let args = ["-f", "--show", "--direct-io=on", file.to_str().expect("utf-8 path")];
        let out = run("losetup", &args);
        assert!(out.status.success(), "losetup {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let dev = LoopDevice { path: PathBuf::from(&name) };
        assert!(name.starts_with("/dev/loop"), "unexpected losetup output {name:?}");
        dev
    }

    fn attach_with(file: &Path, sector_size: Option<u32>, partitions: bool) -> LoopDevice {
        let ss = sector_size.map(|s| s.to_string());
        let mut args = vec!["-f", "--show"];
        if partitions {
            args.push("-P");
        }
        if let Some(s) = &ss {
            args.extend(["--sector-size", s.as_str()]);
        }
        let file_s = file.to_str().expect("utf-8 path");
        args.push(file_s);
        let out = run("losetup", &args);
        assert!(out.status.success(), "losetup {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // Own the device before anything can panic, so it gets detached.
        let dev = LoopDevice { path: PathBuf::from(&name) };
        assert!(name.starts_with("/dev/loop"), "unexpected losetup output {name:?}");
        if partitions {
            dev.rescan();
        }
        dev
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
        let args = [
            "-f",
            "--show",
            "--sector-size",
            ss.as_str(),
            "--offset",
            o.as_str(),
            "--sizelimit",
            s.as_str(),
            file.to_str().expect("utf-8 path"),
        ];
        let out = run("losetup", &args);
        assert!(out.status.success(), "losetup {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let dev = LoopDevice { path: PathBuf::from(&name) };
        assert!(name.starts_with("/dev/loop"), "unexpected losetup output {name:?}");
        dev
    }

    /// Asks the kernel to (re)read the partitions (`partx -u`).
    pub fn rescan(&self) {
        let _ = run("partx", &["-u", self.path.to_str().unwrap()]);
    }

    /// The node of partition `n` (/dev/loopNpM), waiting briefly for it.
    pub fn partition(&self, n: u32) -> PathBuf {
        let p = PathBuf::from(format!("{}p{n}", self.path.display()));
        for i in 0..50 {
            if p.exists() {
                return p;
            }
            if i % 10 == 0 {
                self.rescan();
                // `partx -u` can stop short of the last logical partition
                // of a loop device: ask for this one by number too.
                let _ = run("partx", &["-a", "-n", &n.to_string(), self.path.to_str().unwrap()]);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("partition node {} did not appear", p.display());
    }
}

impl LoopDevice {
    /// Ends the grub-mount processes os-prober leaves holding the device's
    /// partitions (ocs-sr runs os-prober when GRUB's tools are installed):
    /// they would keep the device attached after it is detached.
    fn end_grub_mounts(&self) {
        let dev = self.path.to_str().unwrap().to_string();
        let Ok(procs) = std::fs::read_dir("/proc") else { return };
        for p in procs.flatten() {
            let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else { continue };
            let args: Vec<String> =
                cmdline.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            let is_grub_mount = args.first().is_some_and(|a| a.ends_with("grub-mount"));
            if is_grub_mount && args.iter().any(|a| a == &dev || a.starts_with(&format!("{dev}p"))) {
                let _ = run("kill", &[p.file_name().to_str().unwrap()]);
            }
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        self.end_grub_mounts();
        for _ in 0..10 {
            let out = run("losetup", &["-d", self.path.to_str().unwrap()]);
            if out.status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("warning: could not detach {}", self.path.display());
    }
}
