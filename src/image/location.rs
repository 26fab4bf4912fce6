//! Where images and repositories are: a local path, or a directory on
//! another machine reached by SFTP, `sftp://[USER@]HOST[:PORT]/PATH`.
//!
//! A remote location is mounted with sshfs (FUSE) for the command's
//! length, on a directory of klon's own, and unmounted afterwards; every
//! command then works on it as on a local directory (a repository's
//! `:SNAPSHOT` suffix included). ssh's own keys and configuration are used
//! (`KLON_SSH_CONFIG` names another configuration file); nothing is typed
//! (BatchMode): a password or an unknown host key is an error that says so.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::engine::feedback::Feedback;
use crate::error::{Error, Result};

/// An SFTP location, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sftp {
    /// The user to log in as (ssh's default when none).
    pub user: Option<String>,
    /// Host name or address.
    pub host: String,
    /// The SSH port (ssh's default when none).
    pub port: Option<u16>,
    /// The directory holding the image or repository, absolute.
    pub dir: String,
    /// The image's or repository's name in it (with any `:SNAPSHOT`).
    pub name: String,
}

/// Whether `p` names a location on another machine.
pub fn is_remote(p: &Path) -> bool {
    p.to_str().is_some_and(|s| s.starts_with("sftp://"))
}

/// Parses `sftp://[USER@]HOST[:PORT]/PATH`.
pub fn parse(url: &str) -> Result<Sftp> {
    let bad = |why: &str| Error::Usage(format!("{url}: {why} (write sftp://[USER@]HOST[:PORT]/DIRECTORY/NAME)"));
    let rest = url.strip_prefix("sftp://").ok_or_else(|| bad("not an sftp:// location"))?;
    let (authority, path) = rest.split_once('/').ok_or_else(|| bad("no path"))?;
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) if !u.is_empty() => (Some(u.to_string()), h),
        Some(_) => return Err(bad("an empty user name")),
        None => (None, authority),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h, Some(p.parse::<u16>().map_err(|_| bad("the port is not a number"))?)),
        None => (hostport, None),
    };
    if host.is_empty() || host.starts_with('-') {
        return Err(bad("no host"));
    }
    let path = format!("/{path}");
    let trimmed = path.trim_end_matches('/');
    let (dir, name) = trimmed.rsplit_once('/').ok_or_else(|| bad("no name"))?;
    if name.is_empty() || name == "." || name == ".." {
        return Err(bad("no image or repository name at the end"));
    }
    Ok(Sftp {
        user,
        host: host.to_string(),
        port,
        dir: if dir.is_empty() { "/".to_string() } else { dir.to_string() },
        name: name.to_string(),
    })
}

/// A remote directory mounted for the command's length; unmounted when
/// dropped (a failure to then is said through its feedback).
pub struct RemoteMount {
    at: PathBuf,
    url: String,
    feedback: Feedback,
}

impl RemoteMount {
    /// Unmounts now, saying whether it worked.
    pub fn unmount(mut self) -> Result<()> {
        let r = self.unmount_inner();
        self.at = PathBuf::new();
        r
    }

    fn unmount_inner(&self) -> Result<()> {
        if self.at.as_os_str().is_empty() {
            return Ok(());
        }
        let mut last = String::new();
        for _ in 0..20 {
            let out = Command::new("fusermount3").arg("-u").arg(&self.at).output();
            match out {
                Ok(o) if o.status.success() => {
                    let _ = std::fs::remove_dir(&self.at);
                    return Ok(());
                }
                Ok(o) => last = String::from_utf8_lossy(&o.stderr).trim().to_string(),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        Err(Error::Unsupported(format!("cannot unmount {} ({}): {last}", self.at.display(), self.url)))
    }
}

impl Drop for RemoteMount {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            self.feedback.warn(&e.to_string());
        }
    }
}

/// The local path standing for `p`: `p` itself, or, for an sftp://
/// location, the same name in its directory mounted with sshfs (a failure
/// to unmount it when dropped is said through `feedback`).
pub fn localize(p: &Path, feedback: &Feedback) -> Result<(PathBuf, Option<RemoteMount>)> {
    if !is_remote(p) {
        return Ok((p.to_path_buf(), None));
    }
    let url = p.to_str().expect("checked").to_string();
    let loc = parse(&url)?;
    static N: AtomicU32 = AtomicU32::new(0);
    let at =
        std::env::temp_dir().join(format!("klon-sftp-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
    std::fs::create_dir_all(&at).map_err(|e| Error::io("creating", &at, None, e))?;
    if let Err(e) = sshfs(loc.user.as_deref(), &loc.host, loc.port, &loc.dir, &at, &url, false) {
        let _ = std::fs::remove_dir(&at);
        return Err(e);
    }
    let local = at.join(&loc.name);
    Ok((local, Some(RemoteMount { at, url, feedback: feedback.clone() })))
}

/// Mounts directory `dir` of `host` at `at` with sshfs: ssh's own keys and
/// configuration (`KLON_SSH_CONFIG` names another), nothing typed; `url`
/// names the place in an error.
pub fn sshfs(
    user: Option<&str>,
    host: &str,
    port: Option<u16>,
    dir: &str,
    at: &Path,
    url: &str,
    read_only: bool,
) -> Result<()> {
    let mut cmd = Command::new("sshfs");
    let target = match user {
        Some(u) => format!("{u}@{host}:{dir}"),
        None => format!("{host}:{dir}"),
    };
    cmd.arg(&target).arg(at);
    cmd.args(["-o", "BatchMode=yes,reconnect,ServerAliveInterval=15,ServerAliveCountMax=4"]);
    if read_only {
        cmd.args(["-o", "ro"]);
    }
    if let Some(port) = port {
        cmd.args(["-p", &port.to_string()]);
    }
    if let Some(cfg) = std::env::var_os("KLON_SSH_CONFIG") {
        cmd.arg("-F").arg(cfg);
    }
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::Unsupported(format!("cannot run sshfs ({e}) for {url}: install sshfs")))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr);
        return Err(Error::Unsupported(format!(
            "cannot reach {url}: {} (klon logs in with ssh's keys and configuration, nothing typed: use a key, \
             know the host's key, and make sure {dir} exists there; KLON_SSH_CONFIG names another ssh configuration)",
            said.trim().lines().last().unwrap_or("sshfs failed"),
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sftp_locations() {
        let l = parse("sftp://backup@nas.local:2222/srv/images/laptop").unwrap();
        assert_eq!(
            l,
            Sftp {
                user: Some("backup".into()),
                host: "nas.local".into(),
                port: Some(2222),
                dir: "/srv/images".into(),
                name: "laptop".into()
            }
        );
        let l = parse("sftp://nas/repo:3f2a/").unwrap();
        assert_eq!((l.user, l.port, l.dir.as_str(), l.name.as_str()), (None, None, "/", "repo:3f2a"));
        for bad in ["sftp://nas", "sftp://nas/", "sftp://@nas/x", "sftp://nas:port/x", "sftp:///x", "sftp://-oProxy/x"]
        {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(is_remote(Path::new("sftp://h/x")) && !is_remote(Path::new("/mnt/sftp://x")));
    }
}
