//! Restoring one partition of an image (`klon restore --partition N`):
//! onto a file or device of its own, or with `--to M` into partition M of a
//! disk whose table is kept. Only the partition's bytes change: everything
//! else on the target is compared byte for byte with what it was.

mod common;

use std::path::Path;

use common::disks::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An MBR disk: partition 1 raw data (8 MiB), partition 2 ext4 with files
/// (24 MiB); returns the disk, its partitions and the ext4's files.
fn source_disk(t: &TempDir) -> (std::path::PathBuf, Vec<SfPart>) {
    let (disk, fs, files) = (t.join("src.img"), t.join("fs.img"), t.join("files"));
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("a.bin"), random_bytes(41, 3 << 20)).unwrap();
    std::fs::write(files.join("b.txt"), text_bytes(42, 500_000)).unwrap();
    blank_file(&disk, 40 * MIB);
    run_with_input(
        "sfdisk",
        &["-q", s(&disk)],
        "label: dos\nstart=2048, size=16384, type=83\nstart=18432, size=49152, type=83\n",
    );
    let (parts, sector) = sfdisk_parts(&disk);
    assert_eq!(sector, 512);
    write_at(&disk, parts[0].start * 512, &random_bytes(43, (6 * MIB) as usize));
    blank_file(&fs, parts[1].size * 512);
    run("mkfs.ext4", &["-q", "-F", "-d", s(&files), s(&fs)]);
    write_at(&disk, parts[1].start * 512, &std::fs::read(&fs).unwrap());
    (disk, parts)
}

fn range(p: &SfPart) -> (u64, u64) {
    (p.start * 512, p.size * 512)
}

#[test]
fn one_partition_onto_a_file_and_into_another_disks_partition() {
    let t = TempDir::new("part-restore");
    let (src, parts) = source_disk(&t);
    let img = t.join("image");
    ok(&klon(&["backup", "--quiet", s(&src), s(&img)]));
    let (p2_start, p2_len) = range(&parts[1]);
    let source = std::fs::read(&src).unwrap();
    let p2 = &source[p2_start as usize..(p2_start + p2_len) as usize];

    // Onto a file of its own (created with the partition's size).
    let file = t.join("p2.img");
    let o = klon(&["restore", "--yes", "--partition", "2", s(&img), s(&file)]);
    ok(&o);
    assert!(stdout(&o).contains("read back and compared"), "{}", stdout(&o));
    assert!(std::fs::read(&file).unwrap() == p2, "the restored partition differs from the source's");
    run("e2fsck", &["-fn", s(&file)]);

    // Into partition 3 of another disk, larger than it: the table and every
    // byte outside the partition's new place stay as they were.
    let dst = t.join("dst.img");
    let pattern: Vec<u8> = (0..64 * MIB).map(|i| (i % 253) as u8).collect();
    std::fs::write(&dst, &pattern).unwrap();
    run_with_input(
        "sfdisk",
        &["-q", "--wipe", "never", s(&dst)],
        "label: dos\nstart=2048, size=8192, type=83\nstart=10240, size=8192, type=83\nstart=20480, size=81920, type=83\n",
    );
    let before = std::fs::read(&dst).unwrap();
    let (dparts, _) = sfdisk_parts(&dst);
    let (p3_start, _) = range(&dparts[2]);
    let o = klon(&["restore", "--yes", "--partition", "2", "--to", "3", s(&img), s(&dst)]);
    ok(&o);
    let after = std::fs::read(&dst).unwrap();
    let (a, b) = (p3_start as usize, (p3_start + p2_len) as usize);
    assert!(after[..a] == before[..a], "bytes before the partition's new place changed");
    assert!(after[b..] == before[b..], "bytes after the partition's new place changed");
    let (again, _) = sfdisk_parts(&dst);
    assert_eq!(again.len(), 3, "the target's partition table changed");
    // Free blocks are not written (the old pattern stays there): the
    // filesystem is checked by its own tools and its files compared.
    let p3 = t.join("p3.img");
    std::fs::write(&p3, &after[a..b]).unwrap();
    run("e2fsck", &["-fn", s(&p3)]);
    for (name, want) in [("a.bin", random_bytes(41, 3 << 20)), ("b.txt", text_bytes(42, 500_000))] {
        let out = std::process::Command::new("debugfs").args(["-R", &format!("cat /{name}"), s(&p3)]).output().unwrap();
        assert!(out.stdout == want, "{name} differs after the restore into partition 3");
    }

    // Partition 1 of the image (8 MiB) into partition 1 of this disk (4 MiB):
    // refused, nothing written.
    let before = std::fs::read(&dst).unwrap();
    let o = klon(&["restore", "--yes", "--partition", "1", "--to", "1", s(&img), s(&dst)]);
    fails_with(&o, 5, &["partition 1 of the image needs", "nothing was written"]);
    assert!(std::fs::read(&dst).unwrap() == before, "a refused restore changed the target");
}

#[test]
fn wrong_partition_numbers_and_options_are_refused_before_writing() {
    let t = TempDir::new("part-refuse");
    let (src, _) = source_disk(&t);
    let img = t.join("image");
    ok(&klon(&["backup", "--quiet", s(&src), s(&img)]));
    let dst = t.join("dst.img");
    garbage_file(&dst, 16 * MIB);
    let before = std::fs::read(&dst).unwrap();

    fails_with(&klon(&["restore", "--yes", "--partition", "9", s(&img), s(&dst)]), 2, &["no partition 9", "1, 2"]);
    fails_with(&klon(&["restore", "--yes", "--partition", "2", s(&img), s(&dst)]), 5, &["needs", "16777216 bytes"]);
    fails_with(&klon(&["restore", "--yes", "--partition", "1", "--to", "4", s(&img), s(&dst)]), 5, &["no partition 4"]);
    fails_with(&klon(&["restore", "--yes", "--grow-last", "--partition", "1", s(&img), s(&dst)]), 2, &["--grow-last"]);
    fails_with(&klon(&["restore", "--yes", "--to", "1", s(&img), s(&dst)]), 2, &["--partition"]);
    assert!(std::fs::read(&dst).unwrap() == before, "a refused restore changed the target");
    let missing = t.join("none.img");
    fails_with(&klon(&["restore", "--yes", "--partition", "9", s(&img), s(&missing)]), 2, &["no partition 9"]);
    assert!(!missing.exists(), "a refused restore created its target");
}
