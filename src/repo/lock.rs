//! Locks of a repository: files in `locks/`.
//!
//! A backup, a check, a copy and every job that reads a snapshot (restore,
//! verify, info, mount, a deployment's export) take a shared lock, held
//! from before the snapshot's file is read until the job ends; forget and
//! prune take an exclusive one. Each first creates its own lock file, then
//! looks at the others: a shared lock gives way if an exclusive one is
//! there, an exclusive lock if any other is. Since both sides create
//! before they look, two jobs that start at the same moment cannot both go
//! on (at worst both give way). A lock left by a process that is gone (same
//! machine and boot, no such process; or an earlier boot of this machine)
//! is stale: it is removed, and said so. A lock of another machine is
//! never removed by itself: `klon unlock` does that, on the person's word.
//!
//! A repository on a read-only filesystem (a write-protected drive, or the
//! live system's image drive, mounted read-only for a restore or a verify)
//! takes no lock file: nothing on this machine can change it meanwhile, so
//! a job that only reads goes on without one, and one that would write
//! fails at its first write anyway.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::store::Store;
use crate::engine::feedback::Feedback;
use crate::error::{Error, Result};

/// What a lock file holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockInfo {
    /// "shared" or "exclusive".
    pub kind: String,
    /// What holds it: "backup", "prune", …
    pub job: String,
    /// The machine's host name.
    pub hostname: String,
    /// The kernel's boot id (/proc/sys/kernel/random/boot_id).
    pub boot_id: String,
    /// The process.
    pub pid: u32,
    /// When it was taken (RFC 3339 UTC).
    pub time: String,
}

/// A lock held; removed when dropped.
#[derive(Debug)]
pub struct Lock {
    store: Arc<dyn Store>,
    /// Its file; none on a read-only filesystem.
    name: Option<String>,
}

impl Drop for Lock {
    fn drop(&mut self) {
        if let Some(name) = &self.name {
            let _ = self.store.remove(name);
        }
    }
}

/// The lock files' directory.
const LOCKS: &str = "locks";

/// A lock file holds a few hundred bytes.
const LOCK_MAX: u64 = 64 << 10;

/// The host name of this machine.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Takes a lock on the repository in `store`, for `job`; `exclusive` for
/// jobs that delete. A stale lock it removes is said through `feedback`.
pub fn take(store: &Arc<dyn Store>, job: &str, exclusive: bool, feedback: &Feedback) -> Result<Lock> {
    let kind = if exclusive { "exclusive" } else { "shared" };
    let me = LockInfo {
        kind: kind.into(),
        job: job.into(),
        hostname: hostname(),
        boot_id: boot_id(),
        pid: std::process::id(),
        time: crate::image::manifest::now_rfc3339(),
    };
    let name = format!("{LOCKS}/{kind}-{}-{}.lock", me.pid, super::pack::random_hex(6));
    let json = serde_json::to_vec_pretty(&me).expect("a lock serializes");
    match store.write(&name, &json) {
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::ReadOnlyFilesystem => {
            return Ok(Lock { store: store.clone(), name: None });
        }
        written => written?,
    }
    let lock = Lock { store: store.clone(), name: Some(name.clone()) };
    for (other, info) in others(&**store, &name)? {
        let info = match info {
            Some(i) => i,
            // A lock file being written this very moment, or damaged:
            // counted as held.
            None => LockInfo {
                kind: "exclusive".into(),
                job: "unknown".into(),
                hostname: "unknown".into(),
                boot_id: String::new(),
                pid: 0,
                time: "unknown".into(),
            },
        };
        if is_stale(&info, &me) {
            feedback.warn(&format!(
                "removed a stale lock of the repository {} ({} by process {} on {}, since {}: that process is gone)",
                store.location(),
                info.job,
                info.pid,
                info.hostname,
                info.time
            ));
            let _ = store.remove(&other);
            continue;
        }
        if exclusive || info.kind != "shared" {
            let repo = store.location();
            return Err(Error::Refused(format!(
                "the repository {} is in use: {} ({} lock) by process {} on {} since {}; wait until it ends. \
                 If that process is gone (a crash, the machine was switched off), run `klon unlock {}`",
                repo, info.job, info.kind, info.pid, info.hostname, info.time, repo
            )));
        }
    }
    Ok(lock)
}

/// Takes a lock as [`take`] does for a process forked from process `from`
/// (of this machine) that holds the repository and is about to end: once
/// this one's lock is taken, `from`'s lock files are removed (they would
/// be stale when it ends, and said so by whoever took them for that).
pub fn take_over(store: &Arc<dyn Store>, job: &str, from: u32, feedback: &Feedback) -> Result<Lock> {
    let lock = take(store, job, false, feedback)?;
    let me = (hostname(), boot_id());
    for (name, info) in others(&**store, lock.name.as_deref().unwrap_or_default())? {
        if info.is_some_and(|i| i.pid == from && (i.hostname.as_str(), i.boot_id.as_str()) == (&me.0, &me.1)) {
            let _ = store.remove(&name);
        }
    }
    Ok(lock)
}

/// Every lock file but `mine`, with what it holds (None when it cannot be
/// read as a lock).
fn others(store: &dyn Store, mine: &str) -> Result<Vec<(String, Option<LockInfo>)>> {
    let mut out = Vec::new();
    for (name, _) in store.list(LOCKS)? {
        if name == mine || !name.ends_with(".lock") {
            continue;
        }
        let info = store.read(&name, LOCK_MAX).ok().flatten().and_then(|b| serde_json::from_slice(&b).ok());
        out.push((name, info));
    }
    Ok(out)
}

fn is_stale(info: &LockInfo, me: &LockInfo) -> bool {
    if info.hostname != me.hostname || info.boot_id.is_empty() {
        return false;
    }
    if info.boot_id != me.boot_id {
        // Taken before this machine last started: nothing holds it now.
        return true;
    }
    !Path::new(&format!("/proc/{}", info.pid)).exists()
}

/// Removes every lock of the repository in `store` (`klon unlock`);
/// returns what they were.
pub fn remove_all(store: &dyn Store) -> Result<Vec<LockInfo>> {
    let mut removed = Vec::new();
    for (name, info) in others(store, "")? {
        store.remove(&name)?;
        removed.extend(info);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    #[test]
    fn shared_locks_coexist_exclusive_excludes_and_stale_locks_go() {
        let t = TempDir::new("locks");
        let locks = t.join("r/locks");
        let local = crate::repo::store::LocalStore::new(&t.join("r"));
        local.prepare().unwrap();
        let store: Arc<dyn Store> = Arc::new(local);
        let quiet = Feedback::silent();
        let a = take(&store, "backup", false, &quiet).unwrap();
        let b = take(&store, "check", false, &quiet).unwrap();
        let e = take(&store, "prune", true, &quiet).unwrap_err().to_string();
        assert!(e.contains("is in use") && e.contains("klon unlock"), "{e}");
        drop(a);
        drop(b);
        let x = take(&store, "prune", true, &quiet).unwrap();
        let e = take(&store, "backup", false, &quiet).unwrap_err().to_string();
        assert!(e.contains("prune (exclusive lock)"), "{e}");
        drop(x);
        // A lock of a process that is gone, on this machine and boot.
        let mut dead = LockInfo {
            kind: "exclusive".into(),
            job: "prune".into(),
            hostname: hostname(),
            boot_id: boot_id(),
            pid: u32::MAX - 1,
            time: "then".into(),
        };
        std::fs::write(locks.join("exclusive-dead.lock"), serde_json::to_vec(&dead).unwrap()).unwrap();
        let told = crate::engine::feedback::tests::Recorder::default();
        let l = take(&store, "backup", false, &Feedback::new(told.clone())).unwrap();
        assert!(!locks.join("exclusive-dead.lock").exists());
        let said = told.lines();
        assert!(
            said.len() == 1
                && said[0].starts_with("warn: removed a stale lock")
                && said[0].contains("prune by process"),
            "{said:?}"
        );
        drop(l);
        // Another machine's lock stays until klon unlock.
        dead.hostname = "elsewhere".into();
        std::fs::write(locks.join("exclusive-other.lock"), serde_json::to_vec(&dead).unwrap()).unwrap();
        assert!(take(&store, "backup", false, &quiet).is_err());
        assert_eq!(remove_all(&*store).unwrap().len(), 1);
        take(&store, "backup", false, &quiet).unwrap();
    }
}
