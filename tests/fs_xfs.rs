//! XFS round trips through klon: a GPT disk whose XFS partition was full of
//! random bytes before mkfs (so its free space holds stale data) is backed
//! up by its used blocks, restored onto a larger disk full of garbage, and
//! then checked by xfs_repair and by comparing every file. A filesystem
//! with a dirty log is refused unless --raw-unclean.

mod common;

use std::path::{Path, PathBuf};

use common::disks::*;
use common::loop_device::LoopDevice;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs a tool with the environment mkfs.xfs needs for small filesystems
/// (it refuses under 300 MB unless it believes it runs for fstests).
fn xfs_tool(cmd: &str, args: &[&str]) -> String {
    run_env(cmd, args, &[("TEST_DIR", "/tmp"), ("TEST_DEV", "/dev/null"), ("QA_CHECK_FS", "1")])
}

const PART_START: u64 = 2048 * 512;

/// A GPT disk of `size` bytes with a small first partition and the XFS
/// partition (number 2) of `part` bytes, every partition full of random
/// bytes. Returns the XFS partition's (offset, length).
fn make_disk(path: &Path, size: u64, part: u64) -> (u64, u64) {
    blank_file(path, size);
    let p2 = format!("2:0:+{}K", part / 1024);
    run("sgdisk", &["-n", "1:2048:+4M", "-t", "1:8300", "-n", &p2, "-t", "2:8300", s(path)]);
    let (parts, sector) = sfdisk_parts(path);
    for (i, p) in parts.iter().enumerate() {
        let (start, len) = (p.start * sector, p.size * sector);
        let mut off = 0;
        while off < len {
            let n = MIB.min(len - off);
            write_at(path, start + off, &random_bytes(1000 * i as u64 + off / MIB, n as usize));
            off += n;
        }
    }
    assert_eq!(parts[0].start * sector, PART_START);
    (parts[1].start * sector, parts[1].size * sector)
}

/// Writes the test's files into `dir` (a directory tree, sizes from 0 to
/// several MiB, a symlink, then every other small file deleted).
fn populate(dir: &Path, small: usize) {
    std::fs::create_dir_all(dir.join("a/b/c")).unwrap();
    for (i, size) in [0usize, 1, 4095, 4097, 65536, 1_000_000, 5 << 20].into_iter().enumerate() {
        std::fs::write(dir.join(format!("a/file{i}")), random_bytes(i as u64 + 7, size)).unwrap();
    }
    std::fs::write(dir.join("a/b/text"), text_bytes(3, 300_000)).unwrap();
    std::os::unix::fs::symlink("a/file1", dir.join("link")).unwrap();
    for i in 0..small {
        std::fs::write(dir.join(format!("a/b/c/s{i}")), random_bytes(100 + i as u64, 100 + (i * 131) % 9000)).unwrap();
    }
    run("sync", &["-f", s(dir)]);
    for i in (0..small).step_by(2) {
        std::fs::remove_file(dir.join(format!("a/b/c/s{i}"))).unwrap();
    }
}

/// Every file, directory and symlink under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().to_path_buf());
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Asserts two trees hold the same names, types and contents.
fn assert_same_tree(a: &Path, b: &Path) {
    let (ta, tb) = (tree(a), tree(b));
    assert_eq!(ta, tb, "the restored filesystem holds other names");
    for rel in &ta {
        let (pa, pb) = (a.join(rel), b.join(rel));
        let (ma, mb) = (std::fs::symlink_metadata(&pa).unwrap(), std::fs::symlink_metadata(&pb).unwrap());
        assert_eq!(ma.file_type(), mb.file_type(), "{}", rel.display());
        if ma.file_type().is_symlink() {
            assert_eq!(std::fs::read_link(&pa).unwrap(), std::fs::read_link(&pb).unwrap(), "{}", rel.display());
        } else if ma.is_file() {
            assert!(std::fs::read(&pa).unwrap() == std::fs::read(&pb).unwrap(), "{} differs", rel.display());
        }
    }
}

/// Used bytes by XFS's own count: (data blocks - free blocks) x block size.
fn xfs_used_bytes(dev: &Path) -> u64 {
    let out = xfs_tool("xfs_db", &["-r", "-c", "sb 0", "-c", "p dblocks blocksize", "-c", "freesp -s", s(dev)]);
    let num = |prefix: &str| -> u64 {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in\n{out}"))
            .trim()
            .parse()
            .unwrap()
    };
    (num("dblocks = ") - num("total free blocks ")) * num("blocksize = ")
}

/// The stream of the image whose method or filesystem is XFS.
fn xfs_stream(img: &Path) -> serde_json::Value {
    let o = klon(&["info", "--json", s(img)]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    v["manifest"]["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|st| st["fs"]["fstype"] == "xfs")
        .unwrap_or_else(|| panic!("no xfs stream in {v}"))
        .clone()
}

/// Builds the source disk: mkfs on the loop partition (no discard, so the
/// random bytes stay in the free space), files copied in from `files`.
/// With `dirty`, the filesystem is shut down before the unmount so its
/// log needs recovery. Returns (partition offset, length, used bytes).
fn build_source(t: &TempDir, disk: &Path, files: &Path, mkfs_opts: &[&str], dirty: bool) -> (u64, u64, u64) {
    let (off, len) = make_disk(disk, 300 * MIB, 200 * MIB);
    let dev = LoopDevice::attach(disk, None);
    let part = dev.partition(2);
    let mut args = vec!["-f", "-q", "-K"];
    args.extend_from_slice(mkfs_opts);
    args.push(s(&part));
    xfs_tool("mkfs.xfs", &args);
    {
        let m = Mounted::new(&part, &t.join("src-mnt"), "rw");
        run("cp", &["-a", &format!("{}/.", s(files)), s(&m.0)]);
        if dirty {
            run("sync", &["-f", s(&m.0)]);
            std::fs::write(m.0.join("late"), b"written after the sync").unwrap();
            run("xfs_io", &["-x", "-c", "shutdown -f", s(&m.0)]);
        }
    }
    let used = if dirty { 0 } else { xfs_used_bytes(&part) };
    (off, len, used)
}

/// Copies `len` bytes at `off` of `disk` into the file `out`.
fn extract(disk: &Path, off: u64, len: u64, out: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(out).unwrap();
    let mut pos = 0;
    while pos < len {
        let n = MIB.min(len - pos);
        f.write_all(&read_at(disk, off + pos, n)).unwrap();
        pos += n;
    }
}

fn round_trip(tag: &str, mkfs_opts: &[&str], small: usize) {
    let t = TempDir::new(tag);
    let (src, img, dst) = (t.join("src.img"), t.join("image"), t.join("dst.img"));
    let files = t.join("files");
    populate(&files, small);
    let (off, len, used) = build_source(&t, &src, &files, mkfs_opts, false);

    ok(&klon(&["backup", s(&src), s(&img)]));
    let st = xfs_stream(&img);
    assert_eq!(st["method"], "xfs", "{st}");
    let stored = st["stored_bytes"].as_u64().unwrap();
    assert_eq!(st["fs_used_bytes"].as_u64().unwrap(), used, "klon's used bytes vs xfs_db's");
    assert!(stored <= used, "stored {stored} bytes, XFS uses {used}");
    eprintln!("{tag}: partition {len} bytes, XFS uses {used}, klon stored {stored}");

    garbage_file(&dst, 400 * MIB);
    ok(&klon(&["restore", "--yes", s(&img), s(&dst)]));

    // The checker on the restored partition, extracted to a file.
    let (parts, sector) = sfdisk_parts(&dst);
    assert_eq!(parts[1].start * sector, off, "the partition moved");
    let part = t.join("restored-part.img");
    extract(&dst, off, len, &part);
    xfs_tool("xfs_repair", &["-n", "-f", s(&part)]);
    let m = Mounted::new(&part, &t.join("dst-mnt"), "loop,ro,nouuid");
    assert_same_tree(&files, &m.0);
}

#[test]
fn xfs_v5_4k_round_trip() {
    require_root!();
    round_trip("xfs-4k", &["-b", "size=4096", "-d", "agcount=4", "-m", "crc=1"], 400);
}

#[test]
fn xfs_v5_1k_many_extents_round_trip() {
    require_root!();
    round_trip("xfs-1k", &["-b", "size=1024", "-d", "agcount=3", "-m", "crc=1,rmapbt=1,reflink=1"], 3000);
}

#[test]
fn xfs_dirty_log_is_refused_unless_raw_unclean() {
    require_root!();
    let t = TempDir::new("xfs-dirty");
    let (src, img) = (t.join("src.img"), t.join("image"));
    let files = t.join("files");
    populate(&files, 50);
    build_source(&t, &src, &files, &["-m", "crc=1"], true);
    let o = klon(&["backup", s(&src), s(&img)]);
    fails_with(&o, 5, &["--raw-unclean", "log is dirty"]);
    ok(&klon(&["backup", "--raw-unclean", s(&src), s(&img)]));
    assert_eq!(xfs_stream(&img)["method"], "raw");
}

/// A prototype file for mkfs.xfs -p copying the tree under `src`.
fn proto_for(src: &Path, proto: &Path) {
    fn walk(dir: &Path, out: &mut String) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for p in entries {
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                out.push_str(&format!("{name} d--755 0 0\n"));
                walk(&p, out);
                out.push_str("$\n");
            } else if meta.file_type().is_symlink() {
                out.push_str(&format!("{name} l--777 0 0 {}\n", std::fs::read_link(&p).unwrap().display()));
            } else {
                out.push_str(&format!("{name} ---644 0 0 {}\n", p.display()));
            }
        }
    }
    let mut text = String::from("/dev/null\n0 0\nd--755 0 0\n");
    walk(src, &mut text);
    text.push_str("$\n");
    std::fs::write(proto, text).unwrap();
}

/// Used byte ranges of an XFS by xfs_db: all blocks but `freesp -d`'s.
fn xfs_used_ranges(dev: &Path) -> Vec<(u64, u64)> {
    let sbp = xfs_tool("xfs_db", &["-r", "-c", "sb 0", "-c", "p dblocks agblocks blocksize", s(dev)]);
    let get = |k: &str| -> u64 {
        sbp.lines().find_map(|l| l.strip_prefix(&format!("{k} = "))).unwrap().trim().parse().unwrap()
    };
    let (dblocks, agblocks, bs) = (get("dblocks"), get("agblocks"), get("blocksize"));
    let out = xfs_tool("xfs_db", &["-r", "-c", "freesp -d", s(dev)]);
    let mut free: Vec<(u64, u64)> = out
        .lines()
        .filter_map(|l| {
            let w: Vec<u64> = l.split_whitespace().map_while(|x| x.parse().ok()).collect();
            (l.split_whitespace().count() == 3 && w.len() == 3).then(|| (w[0] * agblocks + w[1], w[2]))
        })
        .collect();
    free.sort_unstable();
    let mut used = Vec::new();
    let mut pos = 0;
    for (st, l) in free.into_iter().chain([(dblocks, 0)]) {
        if st > pos {
            used.push((pos * bs, (st - pos) * bs));
        }
        pos = st + l;
    }
    used
}

/// v4 (no CRCs): the kernel here cannot mount it, so it is populated by
/// mkfs.xfs -p and checked by xfs_repair and by comparing every used block
/// (by xfs_db's count) of the restored partition with the source's.
#[test]
fn xfs_v4_round_trip_used_blocks_identical() {
    require_root!();
    let t = TempDir::new("xfs-v4");
    let (src, img, dst) = (t.join("src.img"), t.join("image"), t.join("dst.img"));
    let files = t.join("files");
    populate(&files, 500);
    proto_for(&files, &t.join("proto"));
    let (off, len) = make_disk(&src, 300 * MIB, 200 * MIB);
    let (used_ranges, used) = {
        let dev = LoopDevice::attach(&src, None);
        let part = dev.partition(2);
        let proto = t.join("proto");
        xfs_tool(
            "mkfs.xfs",
            &["-f", "-q", "-K", "-m", "crc=0", "-b", "size=1024", "-d", "agcount=5", "-p", s(&proto), s(&part)],
        );
        (xfs_used_ranges(&part), xfs_used_bytes(&part))
    };
    assert_eq!(used_ranges.iter().map(|r| r.1).sum::<u64>(), used);

    ok(&klon(&["backup", s(&src), s(&img)]));
    let st = xfs_stream(&img);
    assert_eq!(st["method"], "xfs", "{st}");
    let stored = st["stored_bytes"].as_u64().unwrap();
    assert!(stored <= used, "stored {stored} bytes, XFS uses {used}");
    eprintln!("xfs-v4: partition {len} bytes, XFS uses {used}, klon stored {stored}");

    garbage_file(&dst, 400 * MIB);
    ok(&klon(&["restore", "--yes", s(&img), s(&dst)]));
    for &(o, l) in &used_ranges {
        assert_same(&src, &dst, off + o, l, "a used range of the XFS partition");
    }
    let part = t.join("restored-part.img");
    extract(&dst, off, len, &part);
    xfs_tool("xfs_repair", &["-n", "-f", s(&part)]);
}
