//! Containers klon does not look inside: an md RAID member and a LUKS
//! container are named (as blkid names them), copied raw with the reason
//! said, and restored byte for byte — an md 1.0 member holding ext4 from
//! its first byte keeps its RAID superblock at its end (imaged as ext4,
//! the superblock would be left out and the member would no longer
//! assemble).

mod common;

use common::disks::*;

const PART: u64 = 16 * MIB;

/// The checksum of a version-1 md superblock (its 32-bit words summed,
/// the checksum field as 0, the carry folded in once).
fn md1_checksum(sb: &[u8]) -> u32 {
    let mut sum = 0u64;
    for (i, w) in sb.chunks(4).enumerate() {
        if i * 4 != 216 {
            sum += u64::from(u32::from_le_bytes(w.try_into().unwrap()));
        }
    }
    ((sum & 0xffff_ffff) + (sum >> 32)) as u32
}

/// A version-1.0 md superblock for a member of PART bytes (at its end, on
/// a 4 KiB boundary 8 KiB before it), of a two-device RAID1 "nas:0".
fn md10_superblock() -> (u64, Vec<u8>) {
    let at = (PART - 8192) & !4095;
    let mut b = vec![0u8; 260];
    b[0..4].copy_from_slice(&0xa92b_4efcu32.to_le_bytes());
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    b[16..32].copy_from_slice(&[7; 16]);
    b[32..37].copy_from_slice(b"nas:0");
    b[72..76].copy_from_slice(&1u32.to_le_bytes());
    b[92..96].copy_from_slice(&2u32.to_le_bytes());
    b[136..144].copy_from_slice(&((at & !65535) / 512).to_le_bytes()); // data_size
    b[144..152].copy_from_slice(&(at / 512).to_le_bytes());
    b[220..224].copy_from_slice(&2u32.to_le_bytes());
    b[256..260].copy_from_slice(&[0, 0, 1, 0]);
    let sum = md1_checksum(&b);
    b[216..220].copy_from_slice(&sum.to_le_bytes());
    (at, b)
}

#[test]
fn an_md_member_and_a_luks_container_are_copied_raw_with_the_reason_and_restore_byte_for_byte() {
    let t = TempDir::new("containers");
    let disk = t.join("disk.img");
    blank_file(&disk, 2 * PART + 2 * MIB);
    run("sgdisk", &["-n", "1:2048:+16M", "-t", "1:FD00", "-n", "2:0:+16M", "-t", "2:8309", disk.to_str().unwrap()]);
    let (parts, sector) = sfdisk_parts(&disk);
    let (p1, p2) = (parts[0].start * sector, parts[1].start * sector);
    // Partition 1: ext4 from its first byte over stale data, the md
    // superblock at its end (as mdadm --metadata=1.0 lays a member out).
    let member = t.join("member.img");
    std::fs::write(&member, random_bytes(1, PART as usize)).unwrap();
    let files = t.join("files");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("a.bin"), random_bytes(2, 3 << 20)).unwrap();
    let (sb_at, sb) = md10_superblock();
    let fs_len = format!("{}k", (sb_at & !65535) / 1024);
    let m = member.to_str().unwrap();
    run("mke2fs", &["-q", "-F", "-t", "ext4", "-E", "nodiscard", "-d", files.to_str().unwrap(), m, &fs_len]);
    write_at(&member, sb_at, &sb);
    assert_eq!(run("blkid", &["-p", "-o", "value", "-s", "TYPE", m]).trim(), "linux_raid_member");
    write_at(&disk, p1, &std::fs::read(&member).unwrap());
    // Partition 2: a LUKS2 header, then key material and data (random).
    let mut luks = random_bytes(3, PART as usize);
    luks[..4096].fill(0);
    luks[0..6].copy_from_slice(b"LUKS\xba\xbe");
    luks[6..8].copy_from_slice(&2u16.to_be_bytes());
    luks[8..16].copy_from_slice(&16384u64.to_be_bytes());
    luks[72..78].copy_from_slice(b"sha256");
    luks[168..204].copy_from_slice(b"3f1e9a2c-5b7d-4e8f-9a0b-1c2d3e4f5a6b");
    write_at(&disk, p2, &luks);

    let img = t.join("image");
    let o = klon(&["--json", "backup", disk.to_str().unwrap(), img.to_str().unwrap()]);
    ok(&o);
    let warnings = stdout(&o);
    assert!(
        warnings.contains("member of Linux md RAID array nas:0") && warnings.contains("other members are not imaged"),
        "{warnings}"
    );
    let o = klon(&["--json", "info", img.to_str().unwrap()]);
    ok(&o);
    let info: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let streams = info["manifest"]["streams"].as_array().unwrap();
    let of = |n: u64| streams.iter().find(|s| s["partition"] == n).unwrap().clone();
    let (s1, s2) = (of(1), of(2));
    assert_eq!((s1["method"].as_str(), s2["method"].as_str()), (Some("raw"), Some("raw")), "{s1} {s2}");
    assert!(s1["method_reason"].as_str().unwrap().contains("md RAID member"), "{s1}");
    assert!(s2["method_reason"].as_str().unwrap().contains("LUKS-encrypted"), "{s2}");

    let out = t.join("restored.img");
    garbage_file(&out, std::fs::metadata(&disk).unwrap().len());
    ok(&klon(&["restore", "--yes", "--quiet", img.to_str().unwrap(), out.to_str().unwrap()]));
    assert_same(&disk, &out, p1, PART, "the md member, its superblock included");
    assert_same(&disk, &out, p2, PART, "the LUKS container");
    let back = t.join("member-back.img");
    std::fs::write(&back, read_at(&out, p1, PART)).unwrap();
    assert_eq!(run("blkid", &["-p", "-o", "value", "-s", "TYPE", back.to_str().unwrap()]).trim(), "linux_raid_member");
}
