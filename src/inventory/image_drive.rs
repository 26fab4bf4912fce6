//! Image drives: the filesystems klon can keep images on (a partition, or
//! a whole disk without a table), found among the disks by label, UUID or
//! device — the one finder of the live system's jobs and the wizard. A
//! drive is mounted at [`DRIVE_MNT`] (a second one, for a copy, at
//! [`COPY_MNT`]) with the images in its folder `klon-images/`, and
//! unmounted cleanly (also when a job fails: [`ImageDrive`] unmounts on
//! drop). The live stick (its FAT filesystem labelled [`LIVE_LABEL`]) is
//! found here too, so that it is never offered.

use std::path::{Path, PathBuf};

use crate::device::mounts::{Mounted, kernel_types};
use crate::error::{Error, Result};
use crate::fs::FsInfo;
use crate::inventory::DiskInfo;
use crate::inventory::share::{Protocol, Share};
use crate::units::human_bytes;

/// The folder on the image drive that holds the images.
pub const IMAGES_DIR: &str = "klon-images";

/// The FAT label of the live stick's partition (image-build/build sets it).
pub const LIVE_LABEL: &str = "KLONLIVE";

/// Where the image drive is mounted (by the live system's jobs and by the
/// wizard).
pub const DRIVE_MNT: &str = "/run/klon/drive";

/// Where a second drive that snapshots are copied to is mounted (a job's
/// `copy_drive`, the wizard's "copy to another drive").
pub const COPY_MNT: &str = "/run/klon/copy-drive";

/// Where the wizard mounts a drive read-only for a moment, to count the
/// images it holds.
pub const PEEK_MNT: &str = "/run/klon/peek";

/// Every place klon mounts a drive: what a shutdown unmounts.
pub const DRIVE_MOUNTS: &[&str] = &[DRIVE_MNT, COPY_MNT, PEEK_MNT];

/// A filesystem that can hold images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The partition (or whole disk) holding the filesystem.
    pub device: PathBuf,
    /// Its device number.
    pub devno: u64,
    /// The whole disk it is on.
    pub disk: PathBuf,
    /// The whole disk's device number.
    pub disk_devno: u64,
    /// Size of the partition in bytes.
    pub size: u64,
    /// What the probe found.
    pub fs: FsInfo,
    /// Where it is already mounted, if anywhere.
    pub mountpoints: Vec<PathBuf>,
    /// Held by something else (swap, LVM, dm, md), or mounted.
    pub in_use: bool,
    /// The disk is read-only (images can be read, not written).
    pub read_only: bool,
    /// The disk's model (its kernel name when it reports none), size and
    /// transport: "SanDisk Ultra, 28.7 GiB usb".
    pub on_disk: String,
}

impl Candidate {
    /// "sdc1 vfat "IMAGES" 32.0 GB".
    pub fn describe(&self) -> String {
        format!(
            "{} {}{} {}",
            self.device.display(),
            self.fs.fstype,
            self.fs.label.as_deref().map(|l| format!(" \"{l}\"")).unwrap_or_default(),
            human_bytes(self.size)
        )
    }

    /// Whether `spec` names this filesystem: `LABEL=…`, `UUID=…`, a device
    /// path, or a bare label.
    pub fn matches(&self, spec: &str) -> bool {
        let spec = spec.trim();
        if let Some(l) = spec.strip_prefix("LABEL=").or_else(|| spec.strip_prefix("label=")) {
            return self.fs.label.as_deref().is_some_and(|x| x.eq_ignore_ascii_case(l));
        }
        if let Some(u) = spec.strip_prefix("UUID=").or_else(|| spec.strip_prefix("uuid=")) {
            return self.fs.uuid.as_deref().is_some_and(|x| x.eq_ignore_ascii_case(u));
        }
        if spec.starts_with('/') {
            return self.device == Path::new(spec);
        }
        self.fs.label.as_deref().is_some_and(|x| x.eq_ignore_ascii_case(spec))
    }
}

/// Filesystems on `disks` that can hold images, leaving out the disks in
/// `exclude` (the live stick, the job's source and target). Read-only
/// disks are listed (marked so): images can be read from them.
pub fn candidates(disks: &[DiskInfo], exclude: &[u64]) -> Vec<Candidate> {
    let mut out = Vec::new();
    for d in disks.iter().filter(|d| !exclude.contains(&d.devno)) {
        let on_disk = format!("{}, {} {}", d.model.as_deref().unwrap_or(&d.name), human_bytes(d.size), d.transport);
        let whole = d.fs.as_ref().map(|fs| (d.path.clone(), d.devno, d.size, fs, &d.mountpoints, d.in_use));
        let parts = d
            .partitions
            .iter()
            .filter_map(|p| p.fs.as_ref().map(|fs| (p.path.clone(), p.devno, p.size, fs, &p.mountpoints, p.in_use)));
        for (device, devno, size, fs, mountpoints, in_use) in whole.into_iter().chain(parts) {
            if !kernel_types(&fs.fstype).is_empty() {
                out.push(Candidate {
                    device,
                    devno,
                    disk: d.path.clone(),
                    disk_devno: d.devno,
                    size,
                    fs: fs.clone(),
                    mountpoints: mountpoints.clone(),
                    in_use: in_use || !mountpoints.is_empty(),
                    read_only: d.read_only,
                    on_disk: on_disk.clone(),
                });
            }
        }
    }
    out
}

/// Device numbers of the disks holding a live stick: the FAT filesystem
/// `spec` names (`LABEL=KLONLIVE` unless the kernel command line says
/// otherwise).
pub fn live_sticks(disks: &[DiskInfo], spec: &str) -> Vec<u64> {
    candidates(disks, &[])
        .into_iter()
        .filter(|c| c.fs.fstype == "vfat" && c.matches(spec))
        .map(|c| c.disk_devno)
        .collect()
}

/// Picks the image drive: the one `spec` names, or without a spec the only
/// candidate.
pub fn choose<'a>(cands: &'a [Candidate], spec: Option<&str>) -> Result<&'a Candidate> {
    let list = || {
        if cands.is_empty() {
            "none found".to_string()
        } else {
            cands.iter().map(Candidate::describe).collect::<Vec<_>>().join("; ")
        }
    };
    match spec {
        Some(spec) => {
            let hits: Vec<&Candidate> = cands.iter().filter(|c| c.matches(spec)).collect();
            match hits.as_slice() {
                [one] => Ok(one),
                [] => Err(Error::Usage(format!("no image drive matches {spec:?} (image drives: {})", list()))),
                _ => Err(Error::Usage(format!("{spec:?} matches more than one drive: {}", list()))),
            }
        }
        None => match cands {
            [one] => Ok(one),
            [] => Err(Error::Usage(
                "no image drive found: attach a drive with a FAT, exFAT, NTFS, ext4, XFS or btrfs filesystem".into(),
            )),
            _ => Err(Error::Usage(format!(
                "more than one possible image drive, name one with drive=LABEL=…: {}",
                list()
            ))),
        },
    }
}

/// A mounted image drive; unmounted by [`ImageDrive::unmount`] or on drop.
#[derive(Debug)]
pub struct ImageDrive {
    /// The device mounted.
    pub device: PathBuf,
    /// The device number of the disk it is on.
    pub disk_devno: u64,
    /// Where.
    pub mountpoint: PathBuf,
    /// Its filesystem, as the probe names it.
    pub fstype: String,
    /// The network share it is, when it is one.
    pub share: Option<Share>,
    /// The folder that holds the images.
    images: PathBuf,
    read_only: bool,
    mounted: Mounted,
}

impl ImageDrive {
    /// Mounts `c` at `at` (created if missing), read-write unless
    /// `read_only`.
    pub fn mount(c: &Candidate, at: &Path, read_only: bool) -> Result<ImageDrive> {
        let mounted = Mounted::mount(&c.device, &c.fs.fstype, at, read_only)?;
        Ok(ImageDrive {
            device: c.device.clone(),
            disk_devno: c.disk_devno,
            mountpoint: at.to_path_buf(),
            fstype: c.fs.fstype.clone(),
            images: at.join(IMAGES_DIR),
            share: None,
            read_only,
            mounted,
        })
    }

    /// Mounts the network share `share` at `at` as the image drive (its
    /// images in the folder it names, or `klon-images/`); `password` for
    /// its user.
    pub fn mount_share(share: &Share, password: Option<&str>, at: &Path, read_only: bool) -> Result<ImageDrive> {
        let mounted = share.mount(password, at, read_only)?;
        Ok(ImageDrive {
            device: PathBuf::from(share.share_url()),
            disk_devno: 0,
            mountpoint: at.to_path_buf(),
            fstype: match share.protocol {
                Protocol::Smb => "cifs".into(),
                Protocol::Nfs => "nfs4".into(),
                Protocol::Sftp => "fuse.sshfs".into(),
            },
            images: share.images_dir(at),
            share: Some(share.clone()),
            read_only,
            mounted,
        })
    }

    /// The images folder; created if missing when mounted read-write.
    pub fn images_dir(&self) -> Result<PathBuf> {
        let dir = self.images.clone();
        if !self.read_only {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, None, e))?;
        }
        Ok(dir)
    }

    /// Flushes and unmounts; an error says the drive may not be safe to
    /// pull out.
    pub fn unmount(self) -> Result<()> {
        self.mounted.unmount()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::PartInfo;

    fn fs(t: &str, label: Option<&str>, uuid: Option<&str>) -> FsInfo {
        FsInfo { fstype: t.into(), label: label.map(Into::into), uuid: uuid.map(Into::into) }
    }

    fn disk(name: &str, devno: u64, parts: Vec<(u32, FsInfo)>) -> DiskInfo {
        DiskInfo {
            path: PathBuf::from(format!("/dev/{name}")),
            name: name.into(),
            devno,
            size: 1 << 30,
            logical_sector_size: 512,
            physical_sector_size: 512,
            model: None,
            serial: None,
            transport: "usb".into(),
            removable: false,
            read_only: false,
            loop_backing_file: None,
            partitions: parts
                .into_iter()
                .map(|(n, f)| PartInfo {
                    number: n,
                    path: PathBuf::from(format!("/dev/{name}{n}")),
                    devno: devno + n as u64,
                    start: 1 << 20,
                    size: 1 << 29,
                    type_id: None,
                    fs: Some(f),
                    mountpoints: vec![],
                    in_use: false,
                    lvm: None,
                })
                .collect(),
            fs: None,
            mountpoints: vec![],
            in_use: false,
        }
    }

    #[test]
    fn finds_by_label_uuid_and_path() {
        let disks = vec![
            disk("sda", 100, vec![(1, fs("vfat", Some("KLONLIVE"), Some("4B4C-0001")))]),
            disk("sdb", 200, vec![(1, fs("swap", None, None)), (2, fs("exfat", Some("Images"), Some("AAAA-BBBB")))]),
            disk("sdc", 300, vec![(1, fs("ntfs", Some("Data"), Some("0123456789ABCDEF")))]),
        ];
        let c = candidates(&disks, &[100]);
        assert_eq!(c.len(), 2, "live stick and swap left out: {c:?}");
        assert_eq!(choose(&c, Some("LABEL=images")).unwrap().device, Path::new("/dev/sdb2"));
        assert_eq!(choose(&c, Some("UUID=0123456789abcdef")).unwrap().device, Path::new("/dev/sdc1"));
        assert_eq!(choose(&c, Some("/dev/sdc1")).unwrap().fs.fstype, "ntfs");
        assert_eq!(choose(&c, Some("Data")).unwrap().device, Path::new("/dev/sdc1"));
        assert!(choose(&c, Some("LABEL=KLONLIVE")).is_err(), "the stick is never an image drive");
        assert!(choose(&c, None).is_err(), "two candidates and no spec");
        let one = candidates(&disks, &[100, 300]);
        assert_eq!(choose(&one, None).unwrap().device, Path::new("/dev/sdb2"));
        assert!(choose(&[], None).is_err());
        assert_eq!(kernel_types("ntfs"), &["ntfs3"]);
        assert_eq!(kernel_types("ext3")[0], "ext4");
        assert!(kernel_types("LUKS").is_empty());
    }
}
