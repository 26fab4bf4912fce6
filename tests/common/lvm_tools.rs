//! LVM's own tools, run on a test's loop devices without udev and
//! without touching the host's LVM backups and archives.

use super::disks::run_env;

/// The configuration every call gets.
pub const CONFIG: &str = "backup { backup = 0 archive = 0 } activation { udev_sync = 0 udev_rules = 0 }";

/// Runs LVM's `cmd` with `args`; its stdout (a failure panics).
pub fn lvm(cmd: &str, args: &[&str]) -> String {
    let mut all = vec!["--config", CONFIG];
    all.extend(args);
    run_env(cmd, &all, &[("LVM_SUPPRESS_FD_WARNINGS", "1")])
}
