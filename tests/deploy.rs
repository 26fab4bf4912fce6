//! `klon deploy --multicast` and `klon receive --multicast` on udpcast, in
//! network namespaces the test makes (a bridge in the sender's namespace,
//! a veth pair to each receiver's; addresses 10.77.x.y exist only there):
//! one image restored on three receivers at once, each target compared
//! byte for byte with the source disk; a receiver that dies half-way is
//! named in the sender's summary, and the others still finish whole; one
//! that comes after the start, and one the sender drops half-way, get the
//! image by unicast (`--late`).
//! Needs root, and udpcast (scripts/test installs it).

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::disks::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Network namespaces: the sender's (`ks…`, with bridge br0 at
/// 10.77.N.1) and `count` receivers' (`kr…`, interface e0 at 10.77.N.2,
/// .3, …). Removed, with whatever runs in them, when dropped.
struct Net {
    sender: String,
    receivers: Vec<String>,
}

fn ip(args: &[&str]) {
    run("ip", args);
}

impl Net {
    fn new(tag: u8, count: usize) -> Net {
        let pid = std::process::id();
        let net = Net {
            sender: format!("ks{tag}-{pid}"),
            receivers: (1..=count).map(|i| format!("kr{tag}{i}-{pid}")).collect(),
        };
        let subnet = format!("10.77.{tag}");
        let ks = net.sender.as_str();
        ip(&["netns", "add", ks]);
        ip(&["-n", ks, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", ks, "addr", "add", &format!("{subnet}.1/24"), "brd", "+", "dev", "br0"]);
        ip(&["-n", ks, "link", "set", "br0", "up"]);
        ip(&["-n", ks, "link", "set", "lo", "up"]);
        ip(&["-n", ks, "route", "add", "224.0.0.0/4", "dev", "br0"]);
        for (i, r) in net.receivers.iter().enumerate() {
            let port = format!("p{i}");
            ip(&["netns", "add", r]);
            ip(&["-n", ks, "link", "add", &port, "type", "veth", "peer", "name", "e0", "netns", r]);
            ip(&["-n", ks, "link", "set", &port, "master", "br0", "up"]);
            ip(&["-n", r, "addr", "add", &format!("{subnet}.{}/24", i + 2), "brd", "+", "dev", "e0"]);
            ip(&["-n", r, "link", "set", "e0", "up"]);
            ip(&["-n", r, "link", "set", "lo", "up"]);
            ip(&["-n", r, "route", "add", "224.0.0.0/4", "dev", "e0"]);
        }
        net
    }

    /// Starts `klon receive` in receiver `i`'s namespace, onto `target`.
    fn receive(&self, i: usize, target: &Path, port: u16) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.receivers[i], env!("CARGO_BIN_EXE_klon"), "--json", "receive", "--multicast"])
            .args(["--interface", "e0", "--port", &port.to_string(), "--yes", s(target)])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start klon receive")
    }

    /// Runs `klon deploy` in the sender's namespace with `args` after the image.
    fn deploy(&self, image: &Path, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.sender, env!("CARGO_BIN_EXE_klon"), "--json", "deploy", s(image)])
            .args(["--multicast", "--interface", "br0"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run klon deploy")
    }

    /// Kills everything running in namespace `ns`.
    fn kill_all(ns: &str) {
        let out = Command::new("ip").args(["netns", "pids", ns]).output().unwrap();
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.receivers.iter().chain(std::iter::once(&self.sender)) {
            Net::kill_all(ns);
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ready() {
    require_tools();
}

fn require_tools() {
    for tool in ["udp-sender", "udp-receiver"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().unwrap().status.success();
        assert!(found, "{tool} is missing (scripts/test installs udpcast)");
    }
}

/// A source disk (GPT, partitions filled with data klon copies whole)
/// and its image.
fn source(t: &TempDir, size: u64) -> (PathBuf, PathBuf) {
    let (disk, img) = (t.join("disk.img"), t.join("image"));
    make_gpt_disk(&disk, size);
    ok(&klon(&["backup", "--quiet", s(&disk), s(&img)]));
    (disk, img)
}

/// Waits until `target` holds the stream's first chunk, so the multicast
/// is under way: on a loaded machine it may begin seconds after the sender
/// starts, so no test waits a fixed time for it.
fn stream_has_begun(target: &Path) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::metadata(target).map_or(0, |m| m.blocks() * 512) < 512 << 10 {
        assert!(std::time::Instant::now() < end, "nothing reached {} in a minute", target.display());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Every target equals the source disk byte for byte.
fn all_equal(targets: &[PathBuf], disk: &Path) {
    let want = std::fs::read(disk).unwrap();
    for tg in targets {
        assert!(std::fs::read(tg).unwrap() == want, "{} differs from the source", tg.display());
    }
}

/// Whether the sender's summary `v` has machine `ip` OK, and by unicast.
fn ok_unicast(v: &serde_json::Value, ip: &str) -> (bool, bool) {
    let r = v["receivers"].as_array().unwrap().iter().find(|r| r["ip"] == ip).unwrap_or_else(|| panic!("no {ip}: {v}"));
    (r["ok"] == true, r["unicast"] == true)
}

#[test]
fn one_image_restored_on_three_machines_at_once() {
    require_root!();
    ready();
    let t = TempDir::new("deploy-3");
    let (disk, img) = source(&t, 48 * MIB);
    let net = Net::new(1, 3);
    let targets: Vec<PathBuf> = (0..3).map(|i| t.join(&format!("target{i}.img"))).collect();
    let receivers: Vec<Child> = targets.iter().enumerate().map(|(i, tg)| net.receive(i, tg, 9100)).collect();
    let o = net.deploy(&img, &["--clients", "3", "--port", "9100", "--report-wait", "60"]);
    let outs: Vec<_> = receivers.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for (i, r) in outs.iter().enumerate() {
        assert!(r.status.success(), "receiver {i}: {}", String::from_utf8_lossy(&r.stderr));
        let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
        assert_eq!(v["verified"], true, "receiver {i}: {v}");
    }
    ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let rs = v["receivers"].as_array().unwrap();
    assert_eq!(rs.len(), 3, "{v}");
    let mut ips: Vec<&str> = rs.iter().map(|r| r["ip"].as_str().unwrap()).collect();
    ips.sort();
    assert_eq!(ips, ["10.77.1.2", "10.77.1.3", "10.77.1.4"], "{v}");
    assert!(rs.iter().all(|r| r["ok"] == true && r["report"]["mac"].as_str().is_some_and(|m| m.len() == 17)), "{v}");
    all_equal(&targets, &disk);
}

#[test]
fn a_receiver_that_dies_is_named_and_the_others_finish_whole() {
    require_root!();
    ready();
    let t = TempDir::new("deploy-kill");
    let (disk, img) = source(&t, 32 * MIB);
    let net = Net::new(2, 3);
    let targets: Vec<PathBuf> = (0..3).map(|i| t.join(&format!("target{i}.img"))).collect();
    let mut receivers: Vec<Child> = targets.iter().enumerate().map(|(i, tg)| net.receive(i, tg, 9200)).collect();
    // Slowly (4 Mbit/s: the 4 MB stream takes about 8 s), so the second
    // machine dies half-way, once the stream has begun.
    let o = std::thread::scope(|scope| {
        let sender = scope.spawn(|| {
            net.deploy(&img, &["--clients", "3", "--port", "9200", "--max-bitrate", "4m", "--report-wait", "15"])
        });
        stream_has_begun(&targets[1]);
        Net::kill_all(&net.receivers[1]);
        sender.join().unwrap()
    });
    let dead = receivers.remove(1);
    // `ip netns exec` runs klon in its own place: the pid is klon's, and
    // killed, it left its copy of the stream's head behind.
    let head = std::env::temp_dir().join(format!("klon-receive-{}", dead.id()));
    let dead = dead.wait_with_output().unwrap();
    assert!(!dead.status.success());
    let _ = std::fs::remove_dir_all(&head);
    for (i, r) in receivers.into_iter().enumerate() {
        let r = r.wait_with_output().unwrap();
        assert!(r.status.success(), "receiver {i}: {}", String::from_utf8_lossy(&r.stderr));
    }
    assert_eq!(o.status.code(), Some(1), "{}\n{}", stdout(&o), stderr(&o));
    assert!(stderr(&o).contains("10.77.2.3 failed"), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(ok_unicast(&v, "10.77.2.3"), (false, false), "{v}");
    for ip in ["10.77.2.2", "10.77.2.4"] {
        assert_eq!(ok_unicast(&v, ip), (true, false), "{v}");
    }
    all_equal(&[targets[0].clone(), targets[2].clone()], &disk);
}

/// A machine that comes when the multicast has started gets the image by
/// unicast from the same sender (`--late`): it asks the sender where the
/// deployment is, is told it is sending (or done) and where the unicast
/// stream is, restores it with the same checks and reports; the summary
/// marks it "unicast". Both targets equal the source byte for byte.
#[test]
fn a_machine_that_joins_late_gets_the_image_by_unicast() {
    require_root!();
    ready();
    let t = TempDir::new("deploy-late");
    let (disk, img) = source(&t, 32 * MIB);
    let net = Net::new(3, 2);
    let targets: Vec<PathBuf> = (0..2).map(|i| t.join(&format!("target{i}.img"))).collect();
    let first = net.receive(0, &targets[0], 9300);
    // The second machine comes as soon as the stream has begun, before
    // udp-sender's first progress line: the sender must already say it is
    // sending, or the machine waits for a multicast that has left it behind.
    let (o, late) = std::thread::scope(|scope| {
        let sender = scope
            .spawn(|| net.deploy(&img, &["--clients", "1", "--port", "9300", "--max-bitrate", "16m", "--late", "10"]));
        stream_has_begun(&targets[0]);
        let late = net.receive(1, &targets[1], 9300);
        (sender.join().unwrap(), late)
    });
    for (i, r) in [first, late].into_iter().enumerate() {
        let r = r.wait_with_output().unwrap();
        assert!(r.status.success(), "receiver {i}: {}", String::from_utf8_lossy(&r.stderr));
        if i == 1 {
            let said = String::from_utf8_lossy(&r.stderr);
            assert!(said.contains("under way: the image comes by unicast"), "{said}");
        }
    }
    ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let rs = v["receivers"].as_array().unwrap();
    assert_eq!(rs.len(), 2, "{v}");
    assert_eq!(ok_unicast(&v, "10.77.3.2"), (true, false), "{v}");
    assert_eq!(ok_unicast(&v, "10.77.3.3"), (true, true), "{v}");
    assert!(stderr(&o).contains("10.77.3.3 joined late"), "{}", stderr(&o));
    all_equal(&targets, &disk);
}

/// A machine that stops answering half-way (its udp-receiver frozen) is
/// dropped by udp-sender while the others go on; its klon notices that
/// nothing arrives, learns from the sender that it was dropped, and gets
/// the whole image again by unicast (`--late`): its target equals the
/// source too, and the summary marks it "unicast".
#[test]
fn a_machine_the_sender_drops_gets_the_image_again_by_unicast() {
    require_root!();
    ready();
    let t = TempDir::new("deploy-drop");
    let (disk, img) = source(&t, 32 * MIB);
    let net = Net::new(4, 2);
    let targets: Vec<PathBuf> = (0..2).map(|i| t.join(&format!("target{i}.img"))).collect();
    let receivers: Vec<Child> = targets.iter().enumerate().map(|(i, tg)| net.receive(i, tg, 9400)).collect();
    let o = std::thread::scope(|scope| {
        let sender = scope
            .spawn(|| net.deploy(&img, &["--clients", "2", "--port", "9400", "--max-bitrate", "2m", "--late", "15"]));
        // Half-way (2 Mbit/s: the 4 MB stream takes about 17 s), the second
        // machine's udp-receiver freezes.
        stream_has_begun(&targets[1]);
        let out = Command::new("ip").args(["netns", "pids", &net.receivers[1]]).output().unwrap();
        let mut frozen = 0;
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "udp-receiver") {
                run("kill", &["-STOP", pid]);
                frozen += 1;
            }
        }
        assert_eq!(frozen, 1, "no udp-receiver to freeze in {}", net.receivers[1]);
        sender.join().unwrap()
    });
    for (i, r) in receivers.into_iter().enumerate() {
        let r = r.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&r.stderr);
        assert!(r.status.success(), "receiver {i}: {said}");
        if i == 1 {
            assert!(said.contains("udp-sender dropped this machine half-way"), "{said}");
            assert!(said.contains("the image comes again from 10.77.4.1 by unicast"), "{said}");
        }
    }
    ok(&o);
    assert!(stderr(&o).contains("udp-sender dropped 10.77.4.3"), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let rs = v["receivers"].as_array().unwrap();
    assert_eq!(rs.len(), 2, "{v}");
    assert_eq!(ok_unicast(&v, "10.77.4.2"), (true, false), "{v}");
    assert_eq!(ok_unicast(&v, "10.77.4.3"), (true, true), "{v}");
    all_equal(&targets, &disk);
}

/// A snapshot of a repository (not its newest) is deployed: the sender
/// writes it as a klon image under --export-dir, sends that, and removes
/// it; every machine gets the disk as it was at that snapshot.
#[test]
fn an_older_snapshot_of_a_repository_is_deployed() {
    require_root!();
    ready();
    let t = TempDir::new("deploy-snap");
    let (disk, repo) = (t.join("disk.img"), t.join("repo"));
    make_gpt_disk(&disk, 32 * MIB);
    ok(&klon(&["backup", "--quiet", "--repo", s(&disk), s(&repo)]));
    let then = t.join("then.img");
    std::fs::copy(&disk, &then).unwrap();
    write_at(&disk, 3 * MIB, &random_bytes(5, MIB as usize));
    ok(&klon(&["backup", "--quiet", s(&disk), s(&repo)]));
    let v: serde_json::Value = serde_json::from_str(&stdout(&klon(&["--json", "snapshots", s(&repo)]))).unwrap();
    let list = v["snapshots"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{v}");
    // Newest first: the older one is the second.
    let older = list[1]["short_id"].as_str().unwrap().to_string();
    let spec = PathBuf::from(format!("{}:{older}", repo.display()));

    let exports = t.join("exports");
    std::fs::create_dir_all(&exports).unwrap();
    let net = Net::new(5, 2);
    let targets: Vec<PathBuf> = (0..2).map(|i| t.join(&format!("target{i}.img"))).collect();
    let receivers: Vec<Child> = targets.iter().enumerate().map(|(i, tg)| net.receive(i, tg, 9500)).collect();
    let o =
        net.deploy(&spec, &["--clients", "2", "--port", "9500", "--report-wait", "60", "--export-dir", s(&exports)]);
    for (i, r) in receivers.into_iter().enumerate() {
        let r = r.wait_with_output().unwrap();
        assert!(r.status.success(), "receiver {i}: {}", String::from_utf8_lossy(&r.stderr));
    }
    ok(&o);
    assert!(stderr(&o).contains("written as the klon image"), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    for ip in ["10.77.5.2", "10.77.5.3"] {
        assert_eq!(ok_unicast(&v, ip), (true, false), "{v}");
    }
    all_equal(&targets, &then);
    assert_eq!(std::fs::read_dir(&exports).unwrap().count(), 0, "the exported image was left behind");

    // No room for the export: refused before anything is sent or written.
    let tiny = t.join("tiny.img");
    blank_file(&tiny, 8 * MIB);
    run("mkfs.ext4", &["-q", "-F", s(&tiny)]);
    let mnt = t.join("tiny");
    let _m = Mounted::new(&tiny, &mnt, "loop");
    let o = klon(&["deploy", s(&spec), "--multicast", "--clients", "1", "--export-dir", s(&mnt)]);
    fails_with(&o, 5, &["--export-dir", "free there"]);
    assert_eq!(std::fs::read_dir(&mnt).unwrap().filter(|e| e.as_ref().unwrap().file_name() != "lost+found").count(), 0);
}
