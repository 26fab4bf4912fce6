//! Repositories in S3-compatible object storage, on a real Garage server
//! (tests/common/garage.rs): backups and restores byte for byte, forget
//! and prune, check naming a deleted and a corrupted object, copies local
//! → S3 → local, and an upload cut off by the server.

mod common;

use std::collections::HashMap;
use std::process::{Command, Output, Stdio};

use common::disks::*;
use common::garage::Garage;
use common::repo_disk::*;
use common::stall::Stall;
use klon::repo::s3::S3Store;
use klon::repo::store::Store;

/// Runs klon with `args`, reaching Garage through the environment.
fn klon_s3(g: &Garage, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_klon"))
        .args(args)
        .envs(g.env())
        .env("KLON_S3_RETRY_SECONDS", "5")
        // A request Garage leaves hanging (seen once in CI, on a part
        // after a restart) is given up and sent again within the test.
        .env("KLON_S3_TIMEOUT_SECONDS", "30")
        .stdin(Stdio::null())
        .output()
        .expect("run klon")
}

fn ids(g: &Garage, repo: &str) -> Vec<String> {
    let o = klon_s3(g, &["--json", "snapshots", repo]);
    ok(&o);
    json(&o)["snapshots"].as_array().unwrap().iter().map(|x| x["id"].as_str().unwrap().to_string()).collect()
}

/// The bucket's objects under `url`, as the test's own S3 client sees them.
fn bucket(g: &Garage, url: &str) -> S3Store {
    let settings: HashMap<String, String> = [
        ("aws_access_key_id", g.key_id.clone()),
        ("aws_secret_access_key", g.secret.clone()),
        ("endpoint_url", g.endpoint.clone()),
        ("region", "garage".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    S3Store::open_with(url, &settings).unwrap()
}

fn names(store: &S3Store, dir: &str, ext: &str) -> Vec<(String, u64)> {
    store.list(dir).unwrap().into_iter().filter(|(n, _)| n.ends_with(ext)).collect()
}

#[test]
fn backups_into_a_bucket_restore_byte_for_byte_and_forget_prune_and_check_work() {
    let t = TempDir::new("s3-backup");
    let g = require_garage!(&t);
    let d = make_disk(&t, "a.img", 1);
    let repo = "s3://klon/host-a";
    let o = klon_s3(&g, &["backup", "--quiet", "--repo", s(&d.path), repo]);
    ok(&o);
    let state0 = t.join("state0.img");
    std::fs::copy(&d.path, &state0).unwrap();
    put_file(&d, &t, "new", &random_bytes(11, 3_000_000));
    write_at(&d.path, d.p2.0 + 4 * MIB, &random_bytes(12, (2 * MIB) as usize));
    let state1 = t.join("state1.img");
    std::fs::copy(&d.path, &state1).unwrap();
    ok(&klon_s3(&g, &["backup", "--quiet", s(&d.path), repo]));

    // The second stored only what changed: its packs are a small part of
    // what the first stored.
    let o = klon_s3(&g, &["--json", "snapshots", repo]);
    ok(&o);
    let list = json(&o)["snapshots"].as_array().unwrap().clone();
    assert_eq!(list.len(), 2);
    let added = |i: usize| list[i]["added"]["stored_bytes"].as_u64().unwrap();
    assert!(added(0) * 5 < added(1), "the second snapshot added {} of the first's {}", added(0), added(1));
    let store = bucket(&g, repo);
    assert!(!names(&store, "packs", ".pack").is_empty(), "no pack objects under the prefix");
    assert_eq!(names(&store, "snapshots", ".json").len(), 2);

    // Each snapshot restores alone, straight from the bucket.
    let newest = ids(&g, repo);
    for (id, state, tag) in [(&newest[1], &state0, "first"), (&newest[0], &state1, "second")] {
        let out = t.join(&format!("{tag}.img"));
        ok(&klon_s3(&g, &["restore", "--yes", "--quiet", &format!("{repo}:{id}"), s(&out)]));
        assert_restored(&t, state, &out, &d, tag);
    }
    ok(&klon_s3(&g, &["check", "--quiet", "--read-data", repo]));
    ok(&klon_s3(&g, &["verify", "--quiet", &format!("{repo}:{}", &newest[1][..8])]));
    // Mounted from the bucket (in the foreground, FUSE: root), the
    // snapshot's disk reads as its restore wrote it; random reads too.
    if !common::loop_device::have_root() {
        assert!(
            !common::loop_device::root_tests_required(),
            "mounting needs root and KLON_REQUIRE_ROOT_TESTS=1 is set"
        );
        eprintln!("skipping the mount from the bucket: needs root");
    } else {
        let dir = t.join("mnt");
        std::fs::create_dir(&dir).unwrap();
        let mut mount = Command::new(env!("CARGO_BIN_EXE_klon"))
            .args(["mount", "--foreground", &format!("{repo}:{}", newest[0]), s(&dir)])
            .envs(g.env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let disk_img = dir.join("disk.img");
        let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !disk_img.exists() {
            assert!(std::time::Instant::now() < until, "the bucket's snapshot was not mounted");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let restored = t.join("second.img");
        let len = std::fs::metadata(&restored).unwrap().len();
        let read = std::panic::catch_unwind(|| {
            assert_eq!(sha256(&disk_img), sha256(&restored), "the mounted disk differs from the restored one");
            for off in [len / 3, 7 * MIB + 12345, len - 4096] {
                assert_eq!(read_at(&disk_img, off, 4096), read_at(&restored, off, 4096), "at {off}");
            }
        });
        ok(&klon(&["umount", s(&dir)]));
        assert!(mount.wait().unwrap().success(), "klon mount --foreground did not end cleanly");
        if let Err(e) = read {
            std::panic::resume_unwind(e);
        }
    }

    // A snapshot of another disk, then forget all but it and prune: the
    // first disk's chunks go, the other still restores.
    let other = make_disk(&t, "b.img", 9);
    ok(&klon_s3(&g, &["backup", "--quiet", s(&other.path), repo]));
    let before: u64 = names(&store, "packs", ".pack").iter().map(|(_, n)| n).sum();
    ok(&klon_s3(&g, &["forget", "--quiet", "--keep-last", "1", "--prune", repo]));
    assert_eq!(ids(&g, repo).len(), 1);
    assert_eq!(names(&store, "snapshots", ".json").len(), 1);
    let after: u64 = names(&store, "packs", ".pack").iter().map(|(_, n)| n).sum();
    assert!(after * 3 < before * 2, "prune freed too little in the bucket ({before} bytes of packs, then {after})");
    ok(&klon_s3(&g, &["check", "--quiet", "--read-data", repo]));
    let out = t.join("after-prune.img");
    ok(&klon_s3(&g, &["restore", "--yes", "--quiet", repo, s(&out)]));
    assert_restored(&t, &other.path, &out, &other, "after-prune");
    // Nothing is left of the jobs: no locks.
    assert!(store.list("locks").unwrap().is_empty(), "locks left: {:?}", store.list("locks").unwrap());

    // One level at a time (S3's delimiter listing), as everything listed
    // below says: the bucket's root holds the repository, the repository
    // its configuration, packs and snapshots.
    let one_level = |store: &S3Store, dir: &str| {
        let base = if dir.is_empty() { String::new() } else { format!("{dir}/") };
        let mut all: Vec<String> = store
            .list(dir)
            .unwrap()
            .into_iter()
            .map(|(n, _)| format!("{base}{}", n.strip_prefix(&base).unwrap().split('/').next().unwrap()))
            .collect();
        all.sort();
        all.dedup();
        all
    };
    let root = bucket(&g, "s3://klon");
    assert_eq!(root.children("").unwrap(), ["host-a"]);
    let top = store.children("").unwrap();
    for part in ["klon-repository.json", "packs", "snapshots"] {
        assert!(top.iter().any(|n| n == part), "{part} is not among {top:?}");
    }
    for dir in ["", "packs", "snapshots"] {
        assert_eq!(store.children(dir).unwrap(), one_level(&store, dir), "under {dir:?}");
    }
    assert!(store.children("no-such-dir").unwrap().is_empty());
}

#[test]
fn check_names_a_deleted_and_a_corrupted_object_and_restore_refuses_before_writing() {
    let t = TempDir::new("s3-damage");
    let g = require_garage!(&t);
    let d = make_disk(&t, "a.img", 2);
    let repo = "s3://klon/damaged";
    ok(&klon_s3(&g, &["backup", "--quiet", "--repo", s(&d.path), repo]));
    let store = bucket(&g, repo);
    let id = ids(&g, repo)[0].clone();

    // A byte in the middle of a pack flipped (read, changed, put back).
    let (pack, size) = names(&store, "packs", ".pack").into_iter().max_by_key(|(_, n)| *n).unwrap();
    let mut bytes = store.read(&pack, u64::MAX).unwrap().unwrap();
    bytes[size as usize / 2] ^= 0x40;
    store.write(&pack, &bytes).unwrap();
    let o = klon_s3(&g, &["check", "--read-data", repo]);
    let pack_name = pack.rsplit('/').next().unwrap();
    fails_with(&o, 4, &[pack_name, &id[..8], "offset"]);

    // A target the restore must not touch.
    let target = t.join("target.img");
    std::fs::write(&target, random_bytes(99, std::fs::metadata(&d.path).unwrap().len() as usize)).unwrap();
    let before = sha256(&target);

    // The snapshot's table deleted: named by check, and a restore is
    // refused before anything is written.
    let (table, _) = names(&store, "snapshots", ".table").pop().unwrap();
    store.remove(&table).unwrap();
    let o = klon_s3(&g, &["check", repo]);
    fails_with(&o, 4, &[table.rsplit('/').next().unwrap(), "missing"]);
    let o = klon_s3(&g, &["restore", "--yes", repo, s(&target)]);
    assert!(!o.status.success(), "a restore without its table succeeded");
    assert!(stderr(&o).contains("s3://klon/damaged"), "the error does not say where: {}", stderr(&o));
    assert_eq!(sha256(&target), before, "the target was written");
}

#[test]
fn copies_go_from_a_directory_to_a_bucket_and_back_and_restore_byte_for_byte() {
    let t = TempDir::new("s3-copy");
    let g = require_garage!(&t);
    let d = make_disk(&t, "a.img", 3);
    let local = t.join("local");
    // Encrypted: the copies keep its keys (the passphrase opens all three).
    let pass = [("KLON_PASSPHRASE", "correct horse battery")];
    let klon_pw = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_klon"))
            .args(args)
            .envs(g.env())
            .envs(pass)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    ok(&klon_pw(&["backup", "--quiet", "--encrypt", s(&d.path), s(&local)]));
    put_file(&d, &t, "more", &random_bytes(21, 2_000_000));
    let state1 = t.join("state1.img");
    std::fs::copy(&d.path, &state1).unwrap();
    ok(&klon_pw(&["backup", "--quiet", s(&d.path), s(&local)]));

    let remote = "s3://klon/offsite";
    ok(&klon_pw(&["copy", "--quiet", s(&local), remote]));
    ok(&klon_pw(&["check", "--quiet", "--read-data", remote]));
    // A second copy sends nothing: everything is there.
    let o = klon_pw(&["--json", "copy", s(&local), remote]);
    ok(&o);
    assert_eq!(json(&o)["chunks"].as_u64(), Some(0), "{}", stdout(&o));
    // No chunk's content is in the clear in the bucket: a file's bytes
    // are not in any object.
    let store = bucket(&g, remote);
    let needle = &random_bytes(21, 2_000_000)[100_000..100_064];
    for (name, _) in store.list("packs").unwrap() {
        let b = store.read(&name, u64::MAX).unwrap().unwrap();
        assert!(!b.windows(needle.len()).any(|w| w == needle), "{name} holds a file's bytes in the clear");
    }

    let back = t.join("back");
    ok(&klon_pw(&["copy", "--quiet", remote, s(&back)]));
    ok(&klon_pw(&["check", "--quiet", "--read-data", s(&back)]));
    let out = t.join("out.img");
    ok(&klon_pw(&["restore", "--yes", "--quiet", s(&back), s(&out)]));
    assert_restored(&t, &state1, &out, &d, "back");
    let out = t.join("out-remote.img");
    ok(&klon_pw(&["restore", "--yes", "--quiet", remote, s(&out)]));
    assert_restored(&t, &state1, &out, &d, "remote");
}

#[test]
fn an_upload_cut_off_by_the_server_leaves_no_snapshot_and_the_next_backup_succeeds() {
    let t = TempDir::new("s3-cut");
    let mut g = require_garage!(&t);
    let repo = "s3://klon/cut";
    // A small first snapshot, then a large disk (random: several packs).
    let d = make_disk(&t, "a.img", 4);
    ok(&klon_s3(&g, &["backup", "--quiet", "--repo", s(&d.path), repo]));
    let big = t.join("big.img");
    std::fs::write(&big, random_bytes(5, (320 * MIB) as usize)).unwrap();
    let store = bucket(&g, repo);
    let packs_before = names(&store, "packs", ".pack").len();

    let mut child = Command::new(env!("CARGO_BIN_EXE_klon"))
        .args(["backup", "--quiet", s(&big), repo])
        .envs(g.env())
        .env("KLON_S3_RETRY_SECONDS", "3")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Cut once the backup has put at least one new pack in the bucket.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while names(&store, "packs", ".pack").len() <= packs_before {
        assert!(std::time::Instant::now() < until, "no pack reached the bucket in 2 minutes");
        assert!(child.try_wait().unwrap().is_none(), "the backup ended before the server was stopped");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    g.stop();
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success(), "the backup succeeded with the server stopped");
    let err = stderr(&o);
    // Exit 3 with what failed and where; before klon kept SIGPIPE from
    // its client's threads, the server going away killed it silently.
    assert_eq!(o.status.code(), Some(3), "{:?}: {err}", o.status);
    assert!(err.contains("s3://klon/cut") && err.contains("no snapshot was made"), "{err}");

    g.restart();
    assert_eq!(ids(&g, repo).len(), 1, "a snapshot appeared from the cut backup");
    // What the cut backup left is noted, not a problem; prune removes it
    // all: the bucket holds the packs it held before.
    ok(&klon_s3(&g, &["check", "--quiet", repo]));
    assert!(names(&store, "packs", ".pack").len() > packs_before, "the cut backup left no pack to clean up");
    let o = klon_s3(&g, &["--json", "prune", repo]);
    ok(&o);
    let freed = json(&o)["bytes_freed"].as_u64().unwrap();
    assert!(freed > 0, "prune freed nothing after a cut backup: {}", stdout(&o));
    assert_eq!(names(&store, "packs", ".pack").len(), packs_before, "prune left packs of the cut backup");
    let o = klon_s3(&g, &["--json", "check", repo]);
    ok(&o);
    let notes = json(&o)["report"]["notes"].as_array().unwrap().clone();
    assert!(notes.is_empty(), "check still notes leftovers after prune: {notes:?}");

    // The next backup succeeds and restores byte for byte.
    ok(&klon_s3(&g, &["backup", "--quiet", s(&big), repo]));
    let all = ids(&g, repo);
    assert_eq!(all.len(), 2);
    let out = t.join("out.img");
    ok(&klon_s3(&g, &["restore", "--yes", "--quiet", &format!("{repo}:{}", all[0]), s(&out)]));
    assert_eq!(sha256(&out), sha256(&big), "the big disk restored differs");
    ok(&klon_s3(&g, &["check", "--quiet", "--read-data", repo]));
}

#[test]
fn a_part_upload_that_stalls_is_sent_again_and_without_time_to_retry_the_backup_fails_cleanly() {
    let t = TempDir::new("s3-stall");
    let g = require_garage!(&t);
    // Between klon and the server: the first request carrying a part of
    // a pack gets no answer, and its body is not read.
    let proxy = Stall::start(&g.endpoint, "partNumber=", 1);
    let repo = "s3://klon/stall";
    let backup = |disk: &std::path::Path, retry: &str| {
        Command::new(env!("CARGO_BIN_EXE_klon"))
            .args(["backup", "--quiet", s(disk), repo])
            .envs(g.env())
            .env("AWS_ENDPOINT_URL", &proxy.endpoint)
            .env("KLON_S3_TIMEOUT_SECONDS", "3")
            .env("KLON_S3_RETRY_SECONDS", retry)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let big = t.join("big.img");
    std::fs::write(&big, random_bytes(8, (40 * MIB) as usize)).unwrap();
    ok(&backup(&big, "30"));
    assert_eq!(proxy.stalled.lock().unwrap().len(), 1, "no part was stalled: the test proves nothing");
    let all = ids(&g, repo);
    assert_eq!(all.len(), 1);
    ok(&klon_s3(&g, &["check", "--quiet", "--read-data", repo]));
    let out = t.join("out.img");
    ok(&klon_s3(&g, &["restore", "--yes", "--quiet", repo, s(&out)]));
    assert_eq!(sha256(&out), sha256(&big), "the disk restored differs");

    // With no time to try again, the stalled part fails the backup: exit
    // 3, the pack named, and no snapshot.
    proxy.arm(1);
    let other = t.join("other.img");
    std::fs::write(&other, random_bytes(9, (40 * MIB) as usize)).unwrap();
    let o = backup(&other, "0");
    assert_eq!(o.status.code(), Some(3), "{:?}: {}", o.status, stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("s3://klon/stall/packs/") && err.contains("no snapshot was made"), "{err}");
    assert_eq!(proxy.stalled.lock().unwrap().len(), 2);
    assert_eq!(ids(&g, repo), all, "the failed backup left a snapshot");
}
