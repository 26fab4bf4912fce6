//! LVM's own tools, run on a test's loop devices without udev and
//! without touching the host's LVM backups and archives.

use super::disks::run_env;

/// The configuration every call gets.
pub const CONFIG: &str = "backup { backup = 0 archive = 0 } activation { udev_sync = 0 udev_rules = 0 }";

/// Runs LVM's `cmd` with `args` on `device` alone (`--devices`); its
/// stdout (a failure panics).
///
/// Without `--devices` LVM scans every block device, and tests beside
/// this one attach and detach loop devices all the time: a detach is
/// deferred while a scan holds the device open, so the same PV can show
/// on two devices, and LVM's device hints can send a scan past the one
/// holding the group ("Volume group not found", as a CI run saw).
pub fn lvm(cmd: &str, device: &str, args: &[&str]) -> String {
    let mut all = vec!["--config", CONFIG, "--devices", device];
    all.extend(args);
    run_env(cmd, &all, &[("LVM_SUPPRESS_FD_WARNINGS", "1")])
}
