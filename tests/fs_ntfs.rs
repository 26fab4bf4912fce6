//! NTFS and Linux swap round trips through klon: a GPT disk whose NTFS
//! and swap partitions were first filled with random bytes (so free space
//! holds stale data), backed up with the filesystems' used-block maps,
//! restored onto a larger disk full of garbage, then checked with the
//! filesystems' own tools (ntfsfix, ntfs-3g, blkid, swaplabel).
//!
//! The filesystems are made in a file holding the partition's random bytes
//! (mkntfs -Q and mkswap do not clear free space), populated through an
//! ntfs-3g FUSE mount of that file, and written into the disk image at the
//! partition's offset: no loop device is needed. Needs root for FUSE.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::disks::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An ntfs-3g FUSE mount of a file; unmounted (the daemon waited for, so
/// everything is on disk) by `unmount` or on drop.
struct Mount {
    dir: PathBuf,
    child: Child,
    mounted: bool,
}

impl Mount {
    fn new(file: &Path, dir: &Path, read_only: bool) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        let opts = if read_only { "ro,no_detach" } else { "no_detach" };
        let child = Command::new("ntfs-3g")
            .args(["-o", opts, s(file), s(dir)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("running ntfs-3g (is ntfs-3g installed?)");
        let mut m = Mount { dir: dir.to_path_buf(), child, mounted: false };
        let want = format!(" {} ", dir.display());
        for _ in 0..100 {
            let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            if mi.lines().any(|l| l.contains(&want) && l.contains(" fuse")) {
                m.mounted = true;
                return m;
            }
            if let Ok(Some(st)) = m.child.try_wait() {
                panic!("ntfs-3g could not mount {}: {st}", file.display());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("ntfs-3g did not mount {}", file.display());
    }

    fn unmount(mut self) {
        self.mounted = false;
        let st = Command::new("umount").arg(&self.dir).status().unwrap();
        assert!(st.success(), "umount {}", self.dir.display());
        let _ = self.child.wait();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.dir).status();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Files written into the filesystem: relative path and content.
type Files = Vec<(String, Vec<u8>)>;

/// Writes a tree of files of varied sizes (tiny resident ones, large
/// ones), deletes some so free space is fragmented; returns what is left.
fn populate(fs_file: &Path, mnt: &Path, fill: u64, seed: u64) -> Files {
    let m = Mount::new(fs_file, mnt, false);
    std::fs::create_dir_all(mnt.join("Documents/deep/er")).unwrap();
    let mut files: Files = Vec::new();
    let mut total = 0u64;
    let mut i = 0u64;
    while total < fill {
        let len = match i % 5 {
            0 => (i * 37 % 700) as usize,
            1 => 3000 + (i * 911 % 20000) as usize,
            _ => 50_000 + (i * 7919 % 400_000) as usize,
        };
        let dir = ["", "Documents/", "Documents/deep/er/"][(i % 3) as usize];
        let name = format!("{dir}file {i}.bin");
        let data =
            if i.is_multiple_of(2) { random_bytes(seed * 1000 + i, len) } else { text_bytes(seed * 1000 + i, len) };
        std::fs::write(mnt.join(&name), &data).unwrap();
        total += len as u64;
        files.push((name, data));
        i += 1;
    }
    let mut kept = Vec::new();
    for (j, f) in files.into_iter().enumerate() {
        if j % 4 == 1 {
            std::fs::remove_file(mnt.join(&f.0)).unwrap();
        } else {
            kept.push(f);
        }
    }
    m.unmount();
    kept
}

/// Every regular file under `root`, relative paths, sorted.
fn walk(root: &Path) -> Vec<String> {
    fn go(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                go(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_str().unwrap().to_string());
            }
        }
    }
    let mut out = Vec::new();
    go(root, root, &mut out);
    out.sort();
    out
}

/// Makes an NTFS filesystem in `fs_file` (which already holds the
/// partition's random bytes).
fn mkntfs(fs_file: &Path, cluster: u32) {
    run("mkntfs", &["-F", "-Q", "-q", "-c", &cluster.to_string(), "-L", "KlonNTFS", s(fs_file)]);
}

/// Bytes NTFS uses by ntfs-3g's own count (user data + metadata).
fn ntfs_used_bytes(fs_file: &Path) -> u64 {
    let out = run("ntfscluster", &["-i", s(fs_file)]);
    let field = |name: &str| -> u64 {
        let line =
            out.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("ntfscluster: no {name}:\n{out}"));
        line.split(':').nth(1).unwrap().trim().parse().unwrap()
    };
    field("bytes of user data") + field("bytes of metadata")
}

/// A GPT disk: p1 NTFS (48 MiB), p2 swap (8 MiB), both first filled with
/// random bytes. Returns (start, len) of both partitions.
fn make_disk(disk: &Path) -> [(u64, u64); 2] {
    blank_file(disk, 64 * MIB);
    run("sgdisk", &["-n", "1:2048:+48M", "-t", "1:0700", "-n", "2:0:+8M", "-t", "2:8200", s(disk)]);
    let (parts, sector) = sfdisk_parts(disk);
    let p: Vec<(u64, u64)> = parts.iter().map(|p| (p.start * sector, p.size * sector)).collect();
    for (i, &(start, len)) in p.iter().enumerate() {
        write_at(disk, start, &random_bytes(77 + i as u64, len as usize));
    }
    [p[0], p[1]]
}

/// Copies bytes `start..+len` of `disk` into a new file `out`.
fn extract(disk: &Path, start: u64, len: u64, out: &Path) {
    std::fs::write(out, read_at(disk, start, len)).unwrap();
}

fn info_json(img: &Path) -> serde_json::Value {
    let o = klon(&["info", "--json", s(img)]);
    ok(&o);
    serde_json::from_str(&stdout(&o)).unwrap()
}

fn stream(info: &serde_json::Value, partition: u64) -> serde_json::Value {
    info["manifest"]["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["partition"] == partition)
        .unwrap_or_else(|| panic!("no stream for partition {partition}: {info}"))
        .clone()
}

/// blkid's view of a swap area: (TYPE, UUID, LABEL).
fn blkid(file: &Path) -> (String, String, String) {
    let out = run("blkid", &["-p", "-o", "export", s(file)]);
    let get = |k: &str| out.lines().find_map(|l| l.strip_prefix(&format!("{k}="))).unwrap_or("").to_string();
    (get("TYPE"), get("UUID"), get("LABEL"))
}

#[test]
fn ntfs_and_swap_round_trip() {
    require_root!();
    for (n, cluster) in [4096u32, 512, 65536].into_iter().enumerate() {
        let t = TempDir::new(&format!("ntfs-rt-{cluster}"));
        let (disk, dst, img, mnt) = (t.join("disk.img"), t.join("dst.img"), t.join("image"), t.join("mnt"));
        let [(p1, l1), (p2, l2)] = make_disk(&disk);

        // NTFS in partition 1.
        let fs_file = t.join("ntfs.img");
        extract(&disk, p1, l1, &fs_file);
        mkntfs(&fs_file, cluster);
        let files = populate(&fs_file, &mnt, 24 * MIB, n as u64 + 1);
        let used = ntfs_used_bytes(&fs_file);
        write_at(&disk, p1, &std::fs::read(&fs_file).unwrap());

        // Swap in partition 2, with a label and a chosen UUID.
        let swap_file = t.join("swap.img");
        extract(&disk, p2, l2, &swap_file);
        run("mkswap", &["-L", "klonswap", "-U", "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", s(&swap_file)]);
        let swap_id = blkid(&swap_file);
        assert_eq!(swap_id.0, "swap");
        write_at(&disk, p2, &std::fs::read(&swap_file).unwrap());

        ok(&klon(&["backup", s(&disk), s(&img)]));
        let info = info_json(&img);
        let st1 = stream(&info, 1);
        assert_eq!(st1["method"], "ntfs", "{st1}");
        let stored1 = st1["stored_bytes"].as_u64().unwrap();
        // What NTFS uses, plus the backup boot sector after the volume.
        assert!(stored1 <= used + 512, "cluster {cluster}: stored {stored1} > used {used} + 512");
        assert!(stored1 >= used, "cluster {cluster}: stored {stored1} < used {used}");
        let st2 = stream(&info, 2);
        assert_eq!(st2["method"], "swap", "{st2}");
        assert_eq!(st2["stored_bytes"], 4096, "swap: header page only");
        eprintln!(
            "cluster {cluster}: NTFS uses {used} bytes (ntfscluster), stored {stored1}; swap stored 4096 of {l2}"
        );

        garbage_file(&dst, 96 * MIB);
        ok(&klon(&["restore", "--yes", s(&img), s(&dst)]));

        // NTFS: clean to its checker (which also checks the backup boot
        // sector), and every file identical.
        let back = t.join("ntfs-back.img");
        extract(&dst, p1, l1, &back);
        let fix = run("ntfsfix", &["-n", s(&back)]);
        assert!(
            fix.contains("alternate boot sector... OK") && fix.contains("processed successfully"),
            "ntfsfix -n:\n{fix}"
        );
        assert!(!fix.contains("BAD"), "ntfsfix -n:\n{fix}");
        let m = Mount::new(&back, &mnt, true);
        let mut want: Vec<String> = files.iter().map(|f| f.0.clone()).collect();
        want.sort();
        assert_eq!(walk(&mnt), want, "cluster {cluster}: the restored file list differs");
        for (name, data) in &files {
            let got = std::fs::read(mnt.join(name)).unwrap();
            assert!(got == *data, "cluster {cluster}: {name} differs after restore");
        }
        m.unmount();

        // Swap: same UUID and label, readable by swaplabel.
        let swap_back = t.join("swap-back.img");
        extract(&dst, p2, l2, &swap_back);
        assert_eq!(blkid(&swap_back), swap_id);
        let sl = run("swaplabel", &[s(&swap_back)]);
        assert!(
            sl.contains("LABEL: klonswap") && sl.contains("UUID:  0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),
            "swaplabel:\n{sl}"
        );
    }
}

/// Offsets in an NTFS image file of $Volume's flags, in $MFT and $MFTMirr
/// (both must agree or ntfs-3g calls the volume inconsistent).
fn volume_flag_offsets(fs: &[u8]) -> [usize; 2] {
    let le16 = |o: usize| u16::from_le_bytes([fs[o], fs[o + 1]]) as usize;
    let le32 = |o: usize| u32::from_le_bytes(fs[o..o + 4].try_into().unwrap()) as usize;
    let le64 = |o: usize| u64::from_le_bytes(fs[o..o + 8].try_into().unwrap()) as usize;
    let cluster = le16(0x0B) * fs[0x0D] as usize;
    let rec_size = 1usize << (-(fs[0x40] as i8) as u32);
    let rec = le64(0x30) * cluster + 3 * rec_size;
    let mut p = rec + le16(rec + 0x14);
    while le32(p) != 0x70 {
        assert_ne!(le32(p), 0xFFFF_FFFF, "no $VOLUME_INFORMATION");
        p += le32(p + 4);
    }
    let flags = p + le16(p + 0x14) + 0x0A;
    assert!((flags - rec) % 512 < 510, "flags on a fixup slot");
    [flags, le64(0x38) * cluster + (flags - le64(0x30) * cluster)]
}

#[test]
fn unclean_ntfs_is_refused_unless_raw() {
    require_root!();
    for case in ["dirty", "hibernated"] {
        let t = TempDir::new(&format!("ntfs-{case}"));
        let (disk, img, img2, mnt) = (t.join("disk.img"), t.join("image"), t.join("image2"), t.join("mnt"));
        let [(p1, l1), _] = make_disk(&disk);
        let fs_file = t.join("ntfs.img");
        extract(&disk, p1, l1, &fs_file);
        mkntfs(&fs_file, 4096);
        populate(&fs_file, &mnt, 2 * MIB, 9);
        if case == "dirty" {
            let mut fs = std::fs::read(&fs_file).unwrap();
            for o in volume_flag_offsets(&fs) {
                fs[o] |= 1;
            }
            std::fs::write(&fs_file, &fs).unwrap();
            // ntfs-3g sees it too.
            let o = Command::new("ntfsinfo").args(["-m", s(&fs_file)]).output().unwrap();
            assert!(String::from_utf8_lossy(&o.stderr).contains("scheduled for check"));
        } else {
            let m = Mount::new(&fs_file, &mnt, false);
            let mut h = b"HIBR".to_vec();
            h.resize(256 << 10, 0);
            std::fs::write(mnt.join("hiberfil.sys"), &h).unwrap();
            m.unmount();
        }
        write_at(&disk, p1, &std::fs::read(&fs_file).unwrap());

        let o = klon(&["backup", s(&disk), s(&img)]);
        let why = if case == "dirty" { "chkdsk" } else { "Fast Startup" };
        fails_with(&o, 5, &["--raw-unclean", why]);
        ok(&klon(&["backup", "--raw-unclean", s(&disk), s(&img2)]));
        let st = stream(&info_json(&img2), 1);
        assert_eq!(st["method"], "raw", "{case}: {st}");
    }
}
