//! Scratch directories named `klon-KIND-PID` (under the temporary directory
//! or a directory given): each process makes its own and removes it when
//! done; one a killed klon left (SIGKILL, power cut of a server) is removed
//! by the next process that makes one of the same kind, once no process of
//! that PID runs.

use std::path::{Path, PathBuf};

/// This process's scratch directory of `kind` under `base` (not made).
pub fn path_in(base: &Path, kind: &str) -> PathBuf {
    base.join(format!("klon-{kind}-{}", std::process::id()))
}

/// This process's scratch directory of `kind` in the temporary directory,
/// after removing those of the same kind whose process is gone.
pub fn dir(kind: &str) -> PathBuf {
    let base = std::env::temp_dir();
    remove_stale(&base, kind);
    path_in(&base, kind)
}

/// Removes the `klon-KIND-PID` directories (and `klon-KIND-PID-N`) in
/// `base` whose process no longer runs; what it removed.
pub fn remove_stale(base: &Path, kind: &str) -> Vec<PathBuf> {
    let prefix = format!("klon-{kind}-");
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(base) else { return removed };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else { continue };
        let pid = rest.split('-').next().unwrap_or("");
        let Ok(pid) = pid.parse::<i32>() else { continue };
        if pid <= 0 || alive(pid) || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        // Only what is still a plain directory tree (a mount left by the
        // process is not removed through).
        if std::fs::remove_dir_all(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}

/// Whether a process `pid` runs (EPERM: it runs, as another user).
fn alive(pid: i32) -> bool {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(e) => e != nix::errno::Errno::ESRCH,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_directories_of_gone_processes_are_removed() {
        let base = crate::testutil::TempDir::new("scratch");
        // Above any pid_max: no such process.
        let dead = base.join("klon-serve-2147483000");
        let dead_n = base.join("klon-serve-2147483001-3");
        let mine = path_in(&base.0, "serve");
        let other_kind = base.join("klon-receive-2147483000");
        let unrelated = base.join("klon-serve-notapid");
        for d in [&dead, &dead_n, &mine, &other_kind, &unrelated] {
            std::fs::create_dir_all(d.join("sub")).unwrap();
            std::fs::write(d.join("sub/f"), b"x").unwrap();
        }
        let mut removed = remove_stale(&base.0, "serve");
        removed.sort();
        assert_eq!(removed, vec![dead.clone(), dead_n.clone()]);
        assert!(!dead.exists() && !dead_n.exists());
        assert!(mine.exists() && other_kind.exists() && unrelated.exists());
    }
}
