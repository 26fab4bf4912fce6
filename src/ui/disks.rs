//! `klon disks`: the disks as a table for people, and as JSON in the
//! shape of `lsblk --json --bytes` for scripts.

use serde_json::{Value, json};

use crate::fs::probe::FsInfo;
use crate::inventory::{DiskInfo, PartInfo};

fn cut(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_string()
    } else if width == 0 {
        String::new()
    } else {
        let mut t: String = s.chars().take(width - 1).collect();
        t.push('~');
        t
    }
}

/// Renders disks as a table for `klon disks`: one line per disk, then an
/// indented line per partition; on a terminal (`fit`) at most 80
/// columns wide, long values cut with `~`; otherwise (a pipe, a file)
/// every value whole.
pub fn render(disks: &[DiskInfo], fit: bool) -> String {
    let cut = |s: &str, width: usize| if fit { cut(s, width) } else { s.to_string() };
    let mut out = String::new();
    out.push_str(&format!(
        "{:<14} {:>9} {:<9} {:<9} {:<20} {}\n",
        "DISK", "SIZE", "SECTORS", "TRANSPORT", "MODEL", "SERIAL"
    ));
    for d in disks {
        let model = match (&d.model, &d.loop_backing_file) {
            (Some(m), _) => m.clone(),
            (None, Some(f)) => f.display().to_string(),
            (None, None) => "-".to_string(),
        };
        let mut flags = Vec::new();
        if d.removable {
            flags.push("removable");
        }
        if d.read_only {
            flags.push("read-only");
        }
        let line = format!(
            "{:<14} {:>9} {:<9} {:<9} {:<20} {}",
            cut(&d.path.display().to_string(), 14),
            crate::units::human_bytes(d.size),
            format!("{}/{}", d.logical_sector_size, d.physical_sector_size),
            cut(&d.transport, 9),
            cut(&model, 20),
            d.serial.as_deref().unwrap_or("-"),
        );
        out.push_str(cut(line.trim_end(), 80).as_str());
        out.push('\n');
        if !flags.is_empty() || d.fs.is_some() || !d.mountpoints.is_empty() {
            let mut extra = flags.join(", ");
            if let Some(fs) = &d.fs {
                if !extra.is_empty() {
                    extra.push_str(", ");
                }
                extra.push_str(&format!("whole-disk {}", fs.fstype));
                if let Some(l) = &fs.label {
                    extra.push_str(&format!(" \"{l}\""));
                }
            }
            for m in &d.mountpoints {
                extra.push_str(&format!(", mounted at {}", m.display()));
            }
            out.push_str(&cut(&format!("    ({})", extra.trim_start_matches(", ")), 80));
            out.push('\n');
        }
        for p in &d.partitions {
            let (fstype, label) = match &p.fs {
                Some(f) => (f.fstype.as_str(), f.label.as_deref().unwrap_or("")),
                None => ("-", ""),
            };
            let mounted = if p.mountpoints.is_empty() {
                if p.in_use { "(in use)".to_string() } else { String::new() }
            } else {
                p.mountpoints.iter().map(|m| m.display().to_string()).collect::<Vec<_>>().join(",")
            };
            let line = format!(
                "  {:>3} {:>10} {:>10}  {:<11} {:<16} {}",
                p.number,
                crate::units::human_bytes(p.start),
                crate::units::human_bytes(p.size),
                cut(fstype, 11),
                cut(label, 16),
                mounted
            );
            out.push_str(&cut(line.trim_end(), 80));
            out.push('\n');
            if let Some(vg) = &p.lvm {
                out.push_str(&cut(&format!("        {vg}"), 80));
                out.push('\n');
            }
        }
    }
    out
}

/// The disks as `lsblk --json --bytes` shows them: `{"blockdevices":
/// [disk, …]}`, a disk's partitions as its `children`, lsblk's column
/// names (`maj:min`, `rm`, `ro`, `tran`, `log-sec`, `phy-sec`, `partn`,
/// `parttype`, `parttypename`, `start` in 512-byte sectors as lsblk counts
/// it), sizes in bytes, and klon's own: `start-bytes`, `in-use`, `lvm` (a
/// physical volume's group and volumes), `backing-file` (a loop device's).
/// README, "klon disks --json", has the schema.
pub fn to_json(disks: &[DiskInfo]) -> Value {
    json!({ "blockdevices": disks.iter().map(disk_json).collect::<Vec<_>>() })
}

fn maj_min(devno: u64) -> String {
    format!("{}:{}", nix::sys::stat::major(devno), nix::sys::stat::minor(devno))
}

fn fs_json(v: &mut Value, fs: Option<&FsInfo>) {
    v["fstype"] = json!(fs.map(|f| &f.fstype));
    v["label"] = json!(fs.and_then(|f| f.label.as_ref()));
    v["uuid"] = json!(fs.and_then(|f| f.uuid.as_ref()));
}

fn disk_json(d: &DiskInfo) -> Value {
    let mut v = json!({
        "name": d.name,
        "path": d.path,
        "maj:min": maj_min(d.devno),
        "type": if d.transport == "loop" { "loop" } else { "disk" },
        "size": d.size,
        "rm": d.removable,
        "ro": d.read_only,
        "model": d.model,
        "serial": d.serial,
        "tran": d.transport,
        "log-sec": d.logical_sector_size,
        "phy-sec": d.physical_sector_size,
        "mountpoints": d.mountpoints,
        "in-use": d.in_use,
    });
    fs_json(&mut v, d.fs.as_ref());
    if let Some(f) = &d.loop_backing_file {
        v["backing-file"] = json!(f);
    }
    if !d.partitions.is_empty() {
        v["children"] = json!(d.partitions.iter().map(|p| part_json(d, p)).collect::<Vec<_>>());
    }
    v
}

fn part_json(d: &DiskInfo, p: &PartInfo) -> Value {
    let name = p.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut v = json!({
        "name": name,
        "path": p.path,
        "maj:min": maj_min(p.devno),
        "type": "part",
        "size": p.size,
        "ro": d.read_only,
        "partn": p.number,
        "start": p.start / 512,
        "start-bytes": p.start,
        "parttype": p.type_id.as_ref().map(|t| t.to_ascii_lowercase()),
        "parttypename": p.type_id.as_deref().and_then(crate::table::type_name),
        "mountpoints": p.mountpoints,
        "in-use": p.in_use,
    });
    fs_json(&mut v, p.fs.as_ref());
    if let Some(lvm) = &p.lvm {
        v["lvm"] = json!(lvm);
    }
    v
}

#[cfg(test)]
mod tests {
    use nix::sys::stat::makedev;

    use super::*;

    fn sample() -> DiskInfo {
        DiskInfo {
            path: "/dev/nvme0n1".into(),
            name: "nvme0n1".into(),
            devno: makedev(259, 0),
            size: 500_107_862_016,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            model: Some("Samsung SSD 970 EVO Plus 500GB with a very long model name".into()),
            serial: Some("S4EVNX0N123456789012345678901234".into()),
            transport: "nvme".into(),
            removable: false,
            read_only: false,
            loop_backing_file: None,
            partitions: vec![PartInfo {
                number: 1,
                path: "/dev/nvme0n1p1".into(),
                devno: makedev(259, 1),
                start: 1 << 20,
                size: 536_870_912,
                type_id: None,
                fs: Some(FsInfo { fstype: "vfat".into(), label: Some("EFI".into()), uuid: Some("ABCD-1234".into()) }),
                mountpoints: vec!["/boot/efi/with/a/really/long/path/that/goes/on/and/on/forever".into()],
                in_use: true,
                lvm: None,
            }],
            fs: None,
            mountpoints: vec![],
            in_use: false,
        }
    }

    #[test]
    fn table_fits_80_columns_on_a_terminal_and_keeps_every_value_otherwise() {
        let mut long = sample();
        long.model = Some("A disk model whose name is far longer than twenty characters".into());
        let whole = render(&[long.clone()], false);
        assert!(whole.contains("A disk model whose name is far longer than twenty characters"), "{whole}");
        let text = render(&[long], true);
        assert!(!text.contains("far longer"), "{text}");
        for line in text.lines() {
            assert!(line.chars().count() <= 80, "too wide: {line:?}");
        }
        assert!(text.contains("/dev/nvme0n1"));
        assert!(text.contains("465.8 GiB"));
        assert!(text.contains("512/4096"));
        assert!(text.contains("vfat"));
        assert!(text.contains("EFI"));
    }

    #[test]
    fn json_has_lsblks_shape_with_exact_bytes() {
        let mut d = sample();
        d.partitions[0].type_id = Some("C12A7328-F81F-11D2-BA4B-00A0C93EC93B".into());
        let v = to_json(&[d]);
        let disk = &v["blockdevices"][0];
        assert_eq!(
            (disk["name"].as_str(), disk["maj:min"].as_str(), disk["type"].as_str()),
            (Some("nvme0n1"), Some("259:0"), Some("disk"))
        );
        assert_eq!(disk["size"], 500_107_862_016u64);
        assert_eq!(
            (disk["log-sec"].as_u64(), disk["phy-sec"].as_u64(), disk["tran"].as_str()),
            (Some(512), Some(4096), Some("nvme"))
        );
        let p = &disk["children"][0];
        assert_eq!(
            (p["name"].as_str(), p["maj:min"].as_str(), p["type"].as_str()),
            (Some("nvme0n1p1"), Some("259:1"), Some("part"))
        );
        assert_eq!(
            (p["partn"].as_u64(), p["start"].as_u64(), p["start-bytes"].as_u64()),
            (Some(1), Some(2048), Some(1 << 20))
        );
        assert_eq!(p["parttype"], "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
        assert_eq!(p["parttypename"], "EFI System");
        assert_eq!(
            (p["fstype"].as_str(), p["label"].as_str(), p["uuid"].as_str()),
            (Some("vfat"), Some("EFI"), Some("ABCD-1234"))
        );
        assert_eq!(p["in-use"], true);
        assert!(p.get("lvm").is_none(), "only a physical volume has lvm");
    }
}
