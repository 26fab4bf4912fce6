#![allow(dead_code)]
//! Shared by the targets: untrusted bytes as a file klon can open.

use std::path::PathBuf;

/// A per-process scratch directory in tmpfs (removed by nobody: the runner
/// script deletes /dev/shm/klon-fuzz-* after a run).
pub fn scratch() -> PathBuf {
    let dir = PathBuf::from(format!("/dev/shm/klon-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `data` to `name` in the scratch directory and returns its path.
pub fn file_of(name: &str, data: &[u8]) -> PathBuf {
    let p = scratch().join(name);
    std::fs::write(&p, data).unwrap();
    p
}
