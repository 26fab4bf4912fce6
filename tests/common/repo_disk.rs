//! The disk the repository tests back up (GPT: an ext4 with files and a
//! raw partition), and how they compare a restored one.

use std::path::{Path, PathBuf};

use super::disks::*;

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A GPT disk: partition 1 ext4 (192 MiB) with 60 MB of files, partition 2
/// raw data (16 MiB, half random).
pub struct Disk {
    pub path: PathBuf,
    pub p1: (u64, u64),
    pub p2: (u64, u64),
}

pub fn make_disk(t: &TempDir, name: &str, seed: u64) -> Disk {
    let (path, files) = (t.join(name), t.join(&format!("{name}.files")));
    std::fs::create_dir(&files).unwrap();
    for i in 0..60u64 {
        std::fs::write(files.join(format!("r{i}")), random_bytes(seed * 100 + i, 700_000)).unwrap();
        std::fs::write(files.join(format!("t{i}")), text_bytes(seed * 100 + 50 + i, 300_000)).unwrap();
    }
    blank_file(&path, 220 * MIB);
    run_with_input(
        "sfdisk",
        &["-q", s(&path)],
        "label: gpt\nstart=2048, size=393216, type=L\nstart=395264, size=32768, type=L\n",
    );
    let (parts, _) = sfdisk_parts(&path);
    let p1 = (parts[0].start * 512, parts[0].size * 512);
    let p2 = (parts[1].start * 512, parts[1].size * 512);
    run("mke2fs", &["-q", "-t", "ext4", "-d", s(&files), "-E", &format!("offset={}", p1.0), s(&path), "192M"]);
    write_at(&path, p2.0, &random_bytes(seed + 7, (8 * MIB) as usize));
    Disk { path, p1, p2 }
}

pub fn fs_spec(disk: &Path, p: (u64, u64)) -> String {
    format!("{}?offset={}", s(disk), p.0)
}

/// Writes a file into the ext4 of partition 1 (no mount: debugfs).
pub fn put_file(d: &Disk, t: &TempDir, name: &str, bytes: &[u8]) {
    let tmp = t.join("put.tmp");
    std::fs::write(&tmp, bytes).unwrap();
    let _ = std::process::Command::new("debugfs")
        .args(["-w", "-R", &format!("rm {name}"), &fs_spec(&d.path, d.p1)])
        .output();
    run("debugfs", &["-w", "-R", &format!("write {} {name}", s(&tmp)), &fs_spec(&d.path, d.p1)]);
}

/// Every file of the ext4 in partition `p` of `disk`, dumped into `out`.
pub fn dump_files(disk: &Path, p: (u64, u64), out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    run("debugfs", &["-R", &format!("rdump / {}", s(out)), &fs_spec(disk, p)]);
}

/// Checks that `restored` holds what `original` held: the area outside
/// partitions and the raw partition byte for byte, the ext4 clean by
/// e2fsck and its files equal.
pub fn assert_restored(t: &TempDir, original: &Path, restored: &Path, d: &Disk, tag: &str) {
    assert_same(original, restored, 0, d.p1.0, &format!("{tag}: area before partition 1"));
    assert_same(original, restored, d.p2.0, d.p2.1, &format!("{tag}: raw partition 2"));
    let len = std::fs::metadata(original).unwrap().len();
    assert_same(original, restored, d.p2.0 + d.p2.1, len - d.p2.0 - d.p2.1, &format!("{tag}: backup GPT"));
    run("e2fsck", &["-fn", &fs_spec(restored, d.p1)]);
    let (a, b) = (t.join(&format!("{tag}.orig")), t.join(&format!("{tag}.rest")));
    dump_files(original, d.p1, &a);
    dump_files(restored, d.p1, &b);
    run("diff", &["-r", "--no-dereference", s(&a), s(&b)]);
}

pub fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_str(&stdout(o)).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

pub fn snapshot_ids(repo: &Path) -> Vec<String> {
    let o = klon(&["--json", "snapshots", s(repo)]);
    ok(&o);
    json(&o)["snapshots"].as_array().unwrap().iter().map(|x| x["id"].as_str().unwrap().to_string()).collect()
}
