//! Images and repositories on another machine by SFTP
//! (`sftp://[USER@]HOST[:PORT]/PATH`): a local OpenSSH server on 127.0.0.1
//! with throwaway host and user keys (key login only, the host key known
//! to the client), klon told of the ssh configuration by KLON_SSH_CONFIG.
//! A backup, a verify and a restore through it, the restored disk equal to
//! the source byte for byte; a repository's snapshots likewise; an unknown
//! host key refused with a message, nothing left mounted. Needs root (the
//! server), openssh-server and sshfs (scripts/test installs them).

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::disks::*;

const PORT: u16 = 2299;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// sshd on 127.0.0.1:PORT serving `dir`'s keys; ended when dropped.
struct Server {
    child: Child,
    made_privsep: bool,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.made_privsep {
            let _ = std::fs::remove_dir("/run/sshd");
        }
    }
}

fn start_server(t: &TempDir) -> Server {
    for tool in ["/usr/sbin/sshd", "/usr/bin/sshfs", "/usr/bin/ssh-keygen"] {
        assert!(Path::new(tool).exists(), "{tool} is missing (scripts/test installs openssh-server and sshfs)");
    }
    for key in ["hostkey", "userkey"] {
        run("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-f", s(&t.join(key))]);
    }
    std::fs::copy(t.join("userkey.pub"), t.join("authorized_keys")).unwrap();
    let conf = t.join("sshd_config");
    std::fs::write(
        &conf,
        format!(
            "Port {PORT}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nPidFile {}\nStrictModes no\n\
             UsePAM no\nSubsystem sftp internal-sftp\n",
            s(&t.join("hostkey")),
            s(&t.join("authorized_keys")),
            s(&t.join("sshd.pid"))
        ),
    )
    .unwrap();
    let made_privsep = !Path::new("/run/sshd").exists();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f", s(&conf)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(t.join("sshd.log")).unwrap())
        .spawn()
        .expect("start sshd");
    let server = Server { child, made_privsep };
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(("127.0.0.1", PORT)).is_err() {
        assert!(
            Instant::now() < deadline,
            "sshd did not listen: {}",
            std::fs::read_to_string(t.join("sshd.log")).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The client: this user key, and the server's host key known.
    let host_pub = std::fs::read_to_string(t.join("hostkey.pub")).unwrap();
    std::fs::write(t.join("known_hosts"), format!("[127.0.0.1]:{PORT} {host_pub}")).unwrap();
    client_config(t, "ssh_config", &t.join("known_hosts"));
    server
}

fn client_config(t: &TempDir, name: &str, known: &Path) -> PathBuf {
    let p = t.join(name);
    std::fs::write(
        &p,
        format!(
            "Host 127.0.0.1\n  User root\n  IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile {}\n  \
             StrictHostKeyChecking yes\n",
            s(&t.join("userkey")),
            s(known)
        ),
    )
    .unwrap();
    p
}

fn klon_ssh(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_klon"))
        .args(args)
        .env("KLON_SSH_CONFIG", config)
        .stdin(Stdio::null())
        .output()
        .expect("run klon")
}

/// No sshfs mount of klon's is left, nor its directory.
fn nothing_mounted() {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains("klon-sftp-"), "an sshfs mount was left:\n{mounts}");
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("klon-sftp-"))
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "mount directories left: {left:?}");
}

#[test]
fn backup_verify_restore_and_a_repository_over_sftp() {
    require_root!();
    let t = TempDir::new("sftp");
    let _server = start_server(&t);
    let config = t.join("ssh_config");
    let remote = t.join("remote");
    std::fs::create_dir_all(&remote).unwrap();
    let disk = t.join("disk.img");
    make_gpt_disk(&disk, 32 * MIB);
    let url = |name: &str| format!("sftp://127.0.0.1:{PORT}{}/{name}", s(&remote));

    // A standalone image: made there, verified and restored from there.
    ok(&klon_ssh(&config, &["backup", "--quiet", s(&disk), &url("pc")]));
    assert!(remote.join("pc").join("klon.json").is_file(), "the image is not on the server");
    ok(&klon_ssh(&config, &["verify", &url("pc")]));
    let target = t.join("target.img");
    ok(&klon_ssh(&config, &["restore", "--yes", &url("pc"), s(&target)]));
    assert!(std::fs::read(&target).unwrap() == std::fs::read(&disk).unwrap(), "restored over SFTP: differs");
    nothing_mounted();

    // A repository: two snapshots, the second adds nothing; one restored.
    ok(&klon_ssh(&config, &["backup", "--quiet", "--repo", s(&disk), &url("repo")]));
    write_at(&disk, 2 * MIB, b"changed between the two backups");
    ok(&klon_ssh(&config, &["backup", "--quiet", s(&disk), &url("repo")]));
    let o = klon_ssh(&config, &["--json", "snapshots", &url("repo")]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["snapshots"].as_array().map(|a| a.len()), Some(2), "{v}");
    let target2 = t.join("target2.img");
    ok(&klon_ssh(&config, &["restore", "--yes", &format!("{}:latest", url("repo")), s(&target2)]));
    assert!(std::fs::read(&target2).unwrap() == std::fs::read(&disk).unwrap(), "latest snapshot over SFTP: differs");
    ok(&klon_ssh(&config, &["check", "--read-data", &url("repo")]));
    nothing_mounted();

    // A host whose key the client does not know: refused, saying why.
    let stranger = client_config(&t, "ssh_config_unknown", &t.join("no_known_hosts"));
    let o = klon_ssh(&stranger, &["verify", &url("pc")]);
    assert!(!o.status.success(), "an unknown host key was accepted");
    let e = stderr(&o);
    assert!(e.contains(&format!("cannot reach {}", url("pc"))) && e.contains("know the host's key"), "{e}");
    // A directory that is not there.
    let o = klon_ssh(&config, &["verify", &format!("sftp://127.0.0.1:{PORT}/no/such/dir/pc")]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/no/such/dir exists there"), "{}", stderr(&o));
    nothing_mounted();
}
