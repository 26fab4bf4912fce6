//! Backup -> verify -> restore round trips on disk image files, compared
//! byte for byte, and the checks that stop a restore onto a wrong target.

mod common;

use common::disks::*;

fn backup(src: &std::path::Path, img: &std::path::Path, extra: &[&str]) {
    let mut args = vec!["backup", src.to_str().unwrap(), img.to_str().unwrap()];
    args.extend_from_slice(extra);
    ok(&klon(&args));
}

fn restore(img: &std::path::Path, dst: &std::path::Path, extra: &[&str]) {
    let mut args = vec!["restore", "--yes", img.to_str().unwrap(), dst.to_str().unwrap()];
    args.extend_from_slice(extra);
    ok(&klon(&args));
}

#[test]
fn gpt_round_trip_same_size_is_byte_identical() {
    let t = TempDir::new("gpt-same");
    let (src, img, dst) = (t.join("src.img"), t.join("image"), t.join("dst.img"));
    make_gpt_disk(&src, 48 * MIB);
    backup(&src, &img, &[]);
    ok(&klon(&["verify", img.to_str().unwrap()]));
    let info = stdout(&klon(&["info", img.to_str().unwrap()]));
    assert!(info.contains("Verified:     OK"), "{info}");
    assert!(info.contains("Complete:     yes"), "{info}");
    restore(&img, &dst, &[]); // missing target: created with the source's size
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), 48 * MIB);
    assert_same(&src, &dst, 0, 48 * MIB, "whole disk");
    let v = run("sgdisk", &["-v", dst.to_str().unwrap()]);
    assert!(v.contains("No problems found"), "{v}");
}

#[test]
fn gpt_restore_to_larger_used_disk_moves_backup_header_and_grows_last() {
    let t = TempDir::new("gpt-larger");
    let (src, img) = (t.join("src.img"), t.join("image"));
    let parts = make_gpt_disk(&src, 48 * MIB);
    backup(&src, &img, &[]);
    for grow in [false, true] {
        let dst = t.join(if grow { "grown.img" } else { "larger.img" });
        garbage_file(&dst, 80 * MIB); // a used disk: stale data everywhere
        restore(&img, &dst, if grow { &["--grow-last"] } else { &[] });
        for p in &parts {
            assert_same(&src, &dst, p.start * 512, p.size * 512, &format!("partition {}", p.node));
        }
        assert_same(&src, &dst, 0, 440, "MBR boot code");
        assert_same(&src, &dst, 34 * 512, (2048 - 34) * 512, "gap after the GPT");
        let v = run("sgdisk", &["-v", dst.to_str().unwrap()]);
        assert!(v.contains("No problems found"), "sgdisk -v on the restored disk:\n{v}");
        let (after, _) = sfdisk_parts(&dst);
        assert_eq!(after.len(), parts.len());
        for (a, b) in after.iter().zip(&parts).take(parts.len() - 1) {
            assert_eq!((a.start, a.size), (b.start, b.size));
        }
        let last = after.last().unwrap();
        let src_last = parts.last().unwrap();
        assert_eq!(last.start, src_last.start);
        if grow {
            // Last usable LBA of an 80 MiB disk with a 128-entry array: total - 34.
            assert_eq!(last.start + last.size - 1, 80 * MIB / 512 - 34, "last partition not grown to the end");
        } else {
            assert_eq!(last.size, src_last.size);
        }
    }
}

#[test]
fn mbr_with_logical_partitions_round_trip() {
    let t = TempDir::new("mbr");
    let (src, img, dst) = (t.join("src.img"), t.join("image"), t.join("dst.img"));
    let parts = make_mbr_disk(&src, 40 * MIB);
    backup(&src, &img, &[]);
    let info = stdout(&klon(&["info", "--json", img.to_str().unwrap()]));
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let numbers: Vec<u64> = v["manifest"]["layout"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, vec![1, 2, 5, 6]);
    // An independent parser (mbrman) finds the same partitions klon recorded.
    let ours: Vec<(u64, u64)> = v["manifest"]["layout"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["start"].as_u64().unwrap() / 512, p["size"].as_u64().unwrap() / 512))
        .collect();
    let mbr = mbrman::MBR::read_from(&mut std::fs::File::open(&src).unwrap(), 512).unwrap();
    let mut theirs: Vec<(u64, u64)> = mbr
        .iter()
        .filter(|(_, p)| p.is_used() && ![0x05, 0x0f, 0x85].contains(&p.sys))
        .map(|(_, p)| (p.starting_lba as u64, p.sectors as u64))
        .collect();
    theirs.sort();
    assert_eq!(ours, theirs);
    garbage_file(&dst, 64 * MIB);
    restore(&img, &dst, &[]);
    for p in &parts {
        if p.ptype == "5" {
            continue;
        }
        assert_same(&src, &dst, p.start * 512, p.size * 512, &format!("partition {}", p.node));
    }
    // Boot code, table, the gap after the MBR, and both EBRs.
    assert_same(&src, &dst, 0, 2048 * 512, "MBR and the gap after it");
    assert_same(&src, &dst, 18432 * 512, 512, "first EBR");
    assert_same(&src, &dst, 28672 * 512, 512, "second EBR");
    let (after, _) = sfdisk_parts(&dst);
    let strip = |v: &[SfPart]| v.iter().map(|p| (p.start, p.size, p.ptype.clone())).collect::<Vec<_>>();
    assert_eq!(strip(&after), strip(&parts));

    // --grow-last on MBR: the last logical partition and the extended container grow.
    let grown = t.join("grown.img");
    garbage_file(&grown, 64 * MIB);
    restore(&img, &grown, &["--grow-last"]);
    let (after, _) = sfdisk_parts(&grown);
    let ext = after.iter().find(|p| p.ptype == "5").unwrap();
    let last = after.last().unwrap();
    assert_eq!(ext.start + ext.size, 64 * MIB / 512, "extended partition not grown");
    assert_eq!(last.start + last.size, 64 * MIB / 512, "last logical partition not grown");
    assert_same(&src, &grown, last.start * 512, parts.last().unwrap().size * 512, "last partition data");
}

#[test]
fn whole_disk_filesystem_without_table_round_trip_and_fsck() {
    let t = TempDir::new("notable");
    let (src, img, dst) = (t.join("src.img"), t.join("image"), t.join("dst.img"));
    let files = t.join("files");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("hello.txt"), text_bytes(1, 300_000)).unwrap();
    std::fs::write(files.join("random.bin"), random_bytes(2, 2_000_000)).unwrap();
    blank_file(&src, 32 * MIB);
    run("mke2fs", &["-q", "-F", "-t", "ext4", "-d", files.to_str().unwrap(), src.to_str().unwrap()]);
    // Only the blocks ext4 uses are copied: the restored filesystem is clean.
    backup(&src, &img, &[]);
    let info: serde_json::Value =
        serde_json::from_str(&stdout(&klon(&["info", "--json", img.to_str().unwrap()]))).unwrap();
    assert_eq!(info["manifest"]["layout"]["kind"], "none");
    assert_eq!(info["manifest"]["streams"][0]["method"], "ext4");
    garbage_file(&dst, 40 * MIB);
    restore(&img, &dst, &[]);
    run("e2fsck", &["-fn", dst.to_str().unwrap()]);
    // With --raw every non-zero block is copied: byte for byte the same.
    let (raw_img, raw_dst) = (t.join("raw-image"), t.join("raw-dst.img"));
    backup(&src, &raw_img, &["--raw"]);
    garbage_file(&raw_dst, 40 * MIB);
    restore(&raw_img, &raw_dst, &[]);
    assert_same(&src, &raw_dst, 0, 32 * MIB, "whole-disk filesystem copied raw");
}

#[test]
fn filesystem_read_in_two_lanes_round_trips_byte_for_byte() {
    // An image file is read in two lanes: the used blocks of the first and
    // second half of a filesystem are read, compressed and written side by
    // side, each lane into its own data files.
    let t = TempDir::new("lanes");
    let (src, dst, split_dst) = (t.join("src.img"), t.join("dst.img"), t.join("split-dst.img"));
    let files = t.join("files");
    std::fs::create_dir(&files).unwrap();
    for i in 0..8u64 {
        let len = 7 * MIB as usize + i as usize * 4099;
        let data = if i % 4 == 0 { text_bytes(i, len) } else { random_bytes(i, len) };
        std::fs::write(files.join(format!("f{i}")), data).unwrap();
    }
    blank_file(&src, 96 * MIB);
    run("mke2fs", &["-q", "-F", "-t", "ext4", "-d", files.to_str().unwrap(), src.to_str().unwrap()]);
    let data_files = |img: &std::path::Path| -> Vec<String> {
        let info: serde_json::Value =
            serde_json::from_str(&stdout(&klon(&["info", "--json", img.to_str().unwrap()]))).unwrap();
        let stream = &info["manifest"]["streams"][0];
        assert_eq!(stream["method"], "ext4");
        stream["data_files"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap().to_string()).collect()
    };
    // One data file per lane under the default --split.
    let img = t.join("image");
    backup(&src, &img, &[]);
    assert_eq!(data_files(&img), ["disk.000", "disk.001"], "the filesystem was not read in two lanes");
    ok(&klon(&["verify", img.to_str().unwrap()]));
    restore(&img, &dst, &[]);
    assert_same(&src, &dst, 0, 96 * MIB, "whole disk");
    run("e2fsck", &["-fn", dst.to_str().unwrap()]);
    // Split small, each lane makes several files, numbered in disk order.
    let split_img = t.join("split-image");
    backup(&src, &split_img, &["--split", "17M"]);
    let names = data_files(&split_img);
    assert!(names.len() >= 4, "{names:?}");
    let expected: Vec<String> = (0..names.len()).map(|i| format!("disk.{i:03}")).collect();
    assert_eq!(names, expected);
    restore(&split_img, &split_dst, &[]);
    assert_same(&src, &split_dst, 0, 96 * MIB, "whole disk, split image");
}

#[test]
fn split_files_and_level_are_honoured() {
    let t = TempDir::new("split");
    let (src, img, dst) = (t.join("src.img"), t.join("image"), t.join("dst.img"));
    blank_file(&src, 64 * MIB);
    write_at(&src, 0, &random_bytes(5, 50 * MIB as usize));
    backup(&src, &img, &["--split", "17M", "--level", "1"]);
    let names: Vec<String> =
        std::fs::read_dir(&img).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    let data_files = names.iter().filter(|n| n.starts_with("disk.0")).count();
    assert!(data_files >= 3, "expected at least 3 split files, got {names:?}");
    for n in &names {
        assert!(std::fs::metadata(img.join(n)).unwrap().len() <= 17 * MIB, "{n} is larger than --split");
    }
    restore(&img, &dst, &[]);
    assert_same(&src, &dst, 0, 64 * MIB, "whole disk");
}

#[test]
fn refuses_smaller_target_with_both_sizes_and_leaves_it_alone() {
    let t = TempDir::new("small");
    let (src, img, dst) = (t.join("src.img"), t.join("image"), t.join("dst.img"));
    make_gpt_disk(&src, 48 * MIB);
    backup(&src, &img, &[]);
    garbage_file(&dst, 40 * MIB);
    let before = std::fs::read(&dst).unwrap();
    let o = klon(&["restore", "--yes", img.to_str().unwrap(), dst.to_str().unwrap()]);
    fails_with(&o, 5, &["too small", "50331648", "41943040"]);
    assert!(std::fs::read(&dst).unwrap() == before, "refused restore changed the target");
}

#[test]
fn restore_needs_yes_without_a_terminal() {
    let t = TempDir::new("yes");
    let (src, img, dst) = (t.join("src.img"), t.join("image"), t.join("dst.img"));
    make_gpt_disk(&src, 48 * MIB);
    backup(&src, &img, &["--no-verify"]);
    garbage_file(&dst, 48 * MIB);
    let before = std::fs::read(&dst).unwrap();
    let o = klon(&["restore", img.to_str().unwrap(), dst.to_str().unwrap()]);
    fails_with(&o, 5, &["--yes"]);
    assert!(std::fs::read(&dst).unwrap() == before, "unconfirmed restore changed the target");
}

#[test]
fn backup_refuses_existing_image_dir_and_bad_options() {
    let t = TempDir::new("exists");
    let (src, img) = (t.join("src.img"), t.join("image"));
    blank_file(&src, 8 * MIB);
    std::fs::create_dir(&img).unwrap();
    fails_with(&klon(&["backup", src.to_str().unwrap(), img.to_str().unwrap()]), 5, &["already exists"]);
    let img2 = t.join("image2");
    fails_with(&klon(&["backup", "--level", "40", src.to_str().unwrap(), img2.to_str().unwrap()]), 2, &["level"]);
    fails_with(&klon(&["backup", "--split", "1M", src.to_str().unwrap(), img2.to_str().unwrap()]), 2, &["--split"]);
    fails_with(&klon(&["backup", "/nonexistent/disk", img2.to_str().unwrap()]), 3, &["/nonexistent/disk"]);
    assert!(!img2.exists());
    fails_with(&klon(&["backup", "--bogus"]), 2, &[]);
}

#[test]
fn restore_refuses_target_that_is_inside_the_image_or_is_the_image() {
    let t = TempDir::new("self");
    let (src, img) = (t.join("src.img"), t.join("image"));
    make_gpt_disk(&src, 48 * MIB);
    backup(&src, &img, &["--no-verify"]);
    // A target file inside the image directory would overwrite the image.
    let inside = img.join("target.img");
    let o = klon(&["restore", "--yes", img.to_str().unwrap(), inside.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    ok(&klon(&["verify", img.to_str().unwrap()]));
}

#[test]
fn clone_copies_disk_to_larger_disk_and_refuses_itself() {
    let t = TempDir::new("clone");
    let (src, dst) = (t.join("src.img"), t.join("dst.img"));
    let parts = make_gpt_disk(&src, 48 * MIB);
    garbage_file(&dst, 64 * MIB);
    ok(&klon(&["clone", "--yes", "--grow-last", src.to_str().unwrap(), dst.to_str().unwrap()]));
    for p in &parts {
        assert_same(&src, &dst, p.start * 512, p.size * 512, &format!("partition {}", p.node));
    }
    assert_same(&src, &dst, 0, 440, "MBR boot code");
    assert_same(&src, &dst, 34 * 512, (2048 - 34) * 512, "gap after the GPT");
    let v = run("sgdisk", &["-v", dst.to_str().unwrap()]);
    assert!(v.contains("No problems found"), "{v}");

    // Onto itself, onto a smaller disk, or without --yes: refused, nothing written.
    fails_with(&klon(&["clone", "--yes", src.to_str().unwrap(), src.to_str().unwrap()]), 5, &[]);
    let small = t.join("small.img");
    garbage_file(&small, 40 * MIB);
    let before = std::fs::read(&small).unwrap();
    fails_with(&klon(&["clone", "--yes", src.to_str().unwrap(), small.to_str().unwrap()]), 5, &["too small"]);
    fails_with(&klon(&["clone", src.to_str().unwrap(), dst.to_str().unwrap()]), 5, &["--yes"]);
    assert!(std::fs::read(&small).unwrap() == before);
}

#[test]
fn clone_of_a_filesystem_copies_only_used_blocks_and_stays_clean() {
    let t = TempDir::new("clone-fs");
    let (src, dst) = (t.join("src.img"), t.join("dst.img"));
    let files = t.join("files");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("a.txt"), text_bytes(7, 500_000)).unwrap();
    std::fs::write(files.join("b.bin"), random_bytes(8, 3_000_000)).unwrap();
    blank_file(&src, 32 * MIB);
    run("mke2fs", &["-q", "-F", "-t", "ext4", "-d", files.to_str().unwrap(), src.to_str().unwrap()]);
    garbage_file(&dst, 32 * MIB);
    let o = klon(&["clone", "--yes", "--json", src.to_str().unwrap(), dst.to_str().unwrap()]);
    ok(&o);
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(r["bytes_written"].as_u64().unwrap() < 16 * MIB, "clone wrote more than the used blocks: {r}");
    run("e2fsck", &["-fn", dst.to_str().unwrap()]);
}

/// What reading the partition table found and repaired reaches the person:
/// a damaged backup GPT is a warning of the backup (and of a clone, in its
/// confirmation), not only a line in the manifest.
#[test]
fn partition_table_warnings_are_printed() {
    let t = TempDir::new("table-warning");
    let (src, img) = (t.join("src.img"), t.join("image"));
    make_gpt_disk(&src, 40 * MIB);
    // The backup GPT header, in the last sector, damaged.
    write_at(&src, 40 * MIB - 512, &[0xAAu8; 512]);
    let o = klon(&["backup", "--quiet", "--no-verify", src.to_str().unwrap(), img.to_str().unwrap()]);
    ok(&o);
    let err = stderr(&o);
    assert!(err.contains("klon: warning: partition table:") && err.contains("backup GPT"), "{err}");
}

#[test]
fn an_image_holds_a_log_whose_repeat_command_makes_the_same_backup() {
    let t = TempDir::new("joblog");
    let src = t.join("src.img");
    make_gpt_disk(&src, 64 * MIB);
    let img = t.join("img");
    backup(&src, &img, &["--quiet", "--level", "7", "--split", "20M"]);
    let log = std::fs::read_to_string(img.join("klon.log")).unwrap();
    let info: serde_json::Value =
        serde_json::from_str(&stdout(&klon(&["--json", "info", img.to_str().unwrap()]))).unwrap();
    let streams = info["manifest"]["streams"].as_array().unwrap();
    assert!(log.contains(&format!("backup {} {}", src.display(), img.display())), "{log}");
    assert!(log.contains("table: GPT, 3 partitions") && log.contains("warnings: none"), "{log}");
    for st in streams {
        let name = st["name"].as_str().unwrap();
        let method = st["method"].as_str().unwrap();
        assert!(log.lines().any(|l| l.trim_start().starts_with(name) && l.contains(method)), "{name} {method}: {log}");
    }
    // The command it gives makes the same image: every stream read the
    // same way and stored the same bytes, at the same level and split.
    let again = log.lines().find_map(|l| l.strip_prefix("the same backup again: ")).expect("a repeat command");
    let img2 = t.join("img2");
    let words: Vec<String> =
        again.replace("NEW-IMAGE", img2.to_str().unwrap()).split(' ').map(|w| w.to_string()).collect();
    assert_eq!(words[..2], ["klon", "backup"], "{again}");
    let args: Vec<&str> = words[1..].iter().map(|w| w.as_str()).collect();
    ok(&klon(&args));
    let info2: serde_json::Value =
        serde_json::from_str(&stdout(&klon(&["--json", "info", img2.to_str().unwrap()]))).unwrap();
    let m = &info["manifest"];
    let m2 = &info2["manifest"];
    assert_eq!(m["compression"], m2["compression"]);
    for (a, b) in streams.iter().zip(m2["streams"].as_array().unwrap()) {
        for k in ["name", "method", "stored_bytes", "data_files"] {
            let (x, y) = (&a[k], &b[k]);
            if k == "data_files" {
                assert_eq!(x.as_array().unwrap().len(), y.as_array().unwrap().len(), "{k} of {}", a["name"]);
            } else {
                assert_eq!(x, y, "{k} of {}", a["name"]);
            }
        }
    }
    ok(&klon(&["verify", "--quiet", img.to_str().unwrap()]));
}

/// `klon --config FILE` runs the job a file describes with the command
/// line's names and defaults: a backup with options, a restore onto a
/// larger disk that grows the last partition, a clone; a file with a
/// setting the job does not take is refused before anything is written.
#[test]
fn a_job_file_is_the_command_line_under_the_same_names() {
    let t = TempDir::new("job-file");
    let (src, img, dst, copy) = (t.join("src.img"), t.join("image"), t.join("dst.img"), t.join("copy.img"));
    let parts = make_gpt_disk(&src, 48 * MIB);
    let job = |name: &str, text: String| {
        let f = t.join(name);
        std::fs::write(&f, text).unwrap();
        f
    };
    let backup = job(
        "backup.conf",
        format!(
            "# weekly\njob = backup\nsource = {}\nimage = {}\nlevel = 9\nsplit = 17M\n",
            src.display(),
            img.display()
        ),
    );
    let out = klon(&["--json", "--config", backup.to_str().unwrap()]);
    ok(&out);
    assert!(stdout(&out).contains("\"verified\""), "the backup's JSON report: {}", stdout(&out));
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(img.join("klon.json")).unwrap()).unwrap();
    assert_eq!(manifest["compression"]["level"], 9, "level = 9 is --level 9");
    let files = data_files(&img);
    assert!(files.len() > 1 && files.iter().all(|f| std::fs::metadata(f).unwrap().len() <= 17 * MIB), "split = 17M");

    let restore = job(
        "restore.conf",
        format!("job = restore\nimage = {}\ntarget = {}\ngrow-last = yes\nyes = yes\n", img.display(), dst.display()),
    );
    garbage_file(&dst, 64 * MIB);
    ok(&klon(&["--config", restore.to_str().unwrap()]));
    for p in &parts[..parts.len() - 1] {
        assert_same(&src, &dst, p.start * 512, p.size * 512, &format!("partition {}", p.node));
    }
    let (after, _) = sfdisk_parts(&dst);
    let last = after.last().unwrap();
    assert_eq!(last.start + last.size - 1, 64 * MIB / 512 - 34, "grow-last = yes grew the last partition");

    let clone =
        job("clone.conf", format!("job = clone\nsource = {}\ntarget = {}\nyes = yes\n", src.display(), copy.display()));
    ok(&klon(&["--config", clone.to_str().unwrap()]));
    assert_same(&src, &copy, 0, 48 * MIB, "the clone");

    // Refusals name the file and the setting, and write nothing.
    let other = t.join("other");
    let bad = job(
        "bad.conf",
        format!("job = backup\nsource = {}\nimage = {}\ngrow_last = yes\n", src.display(), other.display()),
    );
    fails_with(
        &klon(&["--config", bad.to_str().unwrap()]),
        2,
        &["grow_last is not a setting of job=backup", "bad.conf"],
    );
    let bad = job(
        "level.conf",
        format!("job = backup\nsource = {}\nimage = {}\nlevel = fast\n", src.display(), other.display()),
    );
    fails_with(&klon(&["--config", bad.to_str().unwrap()]), 2, &["level=fast", "level.conf"]);
    let live =
        job("live.conf", format!("job = backup\nsource = {}\nimage = pc\ndrive = LABEL=IMAGES\n", src.display()));
    fails_with(&klon(&["--config", live.to_str().unwrap()]), 2, &["live stick's klon.conf"]);
    fails_with(&klon(&["--config", backup.to_str().unwrap(), "--level", "3"]), 2, &["come from FILE"]);
    fails_with(&klon(&["--config", t.join("missing.conf").to_str().unwrap()]), 3, &["missing.conf"]);
    assert!(!other.exists(), "a refused job wrote nothing");
}
