//! `klon mount` and `klon umount`: an image, or a repository's snapshot, as
//! read-only files through FUSE. `disk.img` is the whole disk as the image
//! holds it, `pN.img` partition N.
//!
//! Reads go through the chunk index ([`DiskView`]): the chunks covering the
//! bytes asked for are read, their checksums checked and decompressed (the
//! same [`StoredChunk::decode`] restore and verify use), and a few
//! decompressed chunks are kept for the reads that follow. Bytes the image
//! did not store (free blocks, zero runs) read as zeros: the files hold what
//! `klon restore` writes onto a new file. A chunk that fails its check is an
//! I/O error (EIO) for the reader, and a message naming it on stderr.
//!
//! Clonezilla images are refused: partclone's files have no index to find a
//! block in without reading all that comes before it.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig, LockOwner,
    MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, Request, Session,
};

use super::feedback::Feedback;
use super::source::klon::KlonImage;
use super::source::snapshot::SnapshotImage;
use super::target::write_order;
use crate::device::direct::IoBuf;
use crate::error::{Error, Result};
use crate::image::ChunkStore;
use crate::image::reader::StoredChunk;
use crate::units::human_bytes;

/// Decompressed chunks kept for the reads that follow (8 MiB each at most).
const CACHED_CHUNKS: usize = 4;

/// The filesystem type a klon mount has in /proc/self/mounts.
pub const FSTYPE: &str = "fuse.klon";

/// `len` bytes of the disk at offset `at` that the image stores, found at
/// byte `from` of the content of chunk `seq` of stream `stream`.
#[derive(Debug, Clone, Copy)]
struct Piece {
    at: u64,
    len: u64,
    stream: usize,
    seq: u64,
    from: u64,
}

/// A chunk: its stream and its place in it.
type ChunkKey = (usize, u64);

/// The disk an image holds, read at any offset through its chunk index.
pub struct DiskView {
    store: Box<dyn ChunkStore + Send>,
    size: u64,
    /// Per stream, in the order a restore writes them (a later stream's
    /// bytes lie over an earlier one's), its pieces by disk offset.
    layers: Vec<Vec<Piece>>,
    /// Decompressed chunks, the most recently used last.
    cache: Mutex<Vec<(ChunkKey, Arc<IoBuf>)>>,
    /// Chunks that failed their check, with the error: not read again.
    bad: Mutex<Vec<(ChunkKey, String)>>,
}

impl std::fmt::Debug for DiskView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskView").field("image", &self.store.location()).field("size", &self.size).finish()
    }
}

/// Opens the chunk store of the image at `path`: a klon image, or a
/// repository's snapshot (`REPO`, `REPO:SNAPSHOT`: held under a lock for
/// `job` while the store lives, see [`SnapshotImage::open`]). Clonezilla
/// images are refused with what to do instead.
pub fn open_store(path: &Path, job: &str, feedback: &Feedback) -> Result<Box<dyn ChunkStore + Send>> {
    if let Some((repo, spec)) = crate::repo::split_spec(path) {
        Ok(Box::new(SnapshotImage::open(&repo, spec.as_deref(), job, feedback)?))
    } else if crate::clonezilla::is_clonezilla_image(path) {
        Err(Error::Unsupported(format!(
            "klon cannot mount a Clonezilla image ({}): its partclone files have no index for random access; \
             run `klon convert {} NEW-IMAGE` first and mount the klon image it makes",
            path.display(),
            path.display()
        )))
    } else {
        Ok(Box::new(KlonImage::open(path)?))
    }
}

impl DiskView {
    /// Reads every chunk's header (where its bytes go on the disk) of
    /// `store`; no chunk's data is read.
    pub fn new(store: Box<dyn ChunkStore + Send>) -> Result<DiskView> {
        let m = store.manifest();
        let size = m.layout.disk_size;
        let mut layers = Vec::new();
        for si in write_order(&m.streams) {
            let mut layer = Vec::new();
            for seq in 0..store.chunk_count(si) as u64 {
                let header = store.read_header(si, seq)?;
                let mut from = 0;
                for &(at, len) in &header.extents {
                    layer.push(Piece { at, len, stream: si, seq, from });
                    from += len;
                }
            }
            layer.sort_by_key(|p| p.at);
            if let Some(w) = layer.windows(2).find(|w| w[0].at + w[0].len > w[1].at) {
                return Err(Error::Corrupt(format!(
                    "{}: chunks {} and {} of {} overlap at disk offset {}",
                    store.location().display(),
                    w[0].seq,
                    w[1].seq,
                    super::streams::describe(&m.streams[si]),
                    w[1].at
                )));
            }
            layers.push(layer);
        }
        Ok(DiskView { store, size, layers, cache: Mutex::new(Vec::new()), bad: Mutex::new(Vec::new()) })
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The image's manifest.
    pub fn manifest(&self) -> &crate::image::Manifest {
        self.store.manifest()
    }

    /// The chunk store it reads (what a restore reads too).
    pub fn store(&self) -> &dyn ChunkStore {
        &*self.store
    }

    /// Where the image is, for messages.
    pub fn location(&self) -> &Path {
        self.store.location()
    }

    /// Fills `buf` with the disk's bytes from `offset` (zeros past its end).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        let end = offset.saturating_add(buf.len() as u64).min(self.size);
        if offset >= end {
            return Ok(());
        }
        for layer in &self.layers {
            let first = layer.partition_point(|p| p.at + p.len <= offset);
            for p in layer[first..].iter().take_while(|p| p.at < end) {
                let (a, b) = (p.at.max(offset), (p.at + p.len).min(end));
                let chunk = self.chunk(p.stream, p.seq)?;
                let src = (p.from + a - p.at) as usize;
                let Some(bytes) = chunk.get(src..src + (b - a) as usize) else {
                    return Err(Error::Corrupt(format!(
                        "{}: chunk {} of {} holds fewer bytes than its extents say",
                        self.location().display(),
                        p.seq,
                        super::streams::describe(&self.manifest().streams[p.stream])
                    )));
                };
                buf[(a - offset) as usize..(b - offset) as usize].copy_from_slice(bytes);
            }
        }
        Ok(())
    }

    /// Chunk `seq` of stream `stream`, checked and decompressed: from the
    /// cache, or read and then kept.
    fn chunk(&self, stream: usize, seq: u64) -> Result<Arc<IoBuf>> {
        let key = (stream, seq);
        {
            let mut cache = self.cache.lock().expect("cache lock");
            if let Some(i) = cache.iter().position(|(k, _)| *k == key) {
                let entry = cache.remove(i);
                let content = entry.1.clone();
                cache.push(entry);
                return Ok(content);
            }
        }
        if let Some((_, why)) = self.bad.lock().expect("bad lock").iter().find(|(k, _)| *k == key) {
            return Err(Error::Corrupt(why.clone()));
        }
        let decoded = self.store.read_chunk(stream, seq).and_then(StoredChunk::decode);
        let content = match decoded {
            Ok(c) => Arc::new(c),
            Err(Error::Corrupt(why)) => {
                // A damaged chunk stays damaged: said once, not read again.
                self.bad.lock().expect("bad lock").push((key, why.clone()));
                return Err(Error::Corrupt(why));
            }
            Err(e) => return Err(e),
        };
        let mut cache = self.cache.lock().expect("cache lock");
        if cache.len() >= CACHED_CHUNKS {
            cache.remove(0);
        }
        cache.push((key, content.clone()));
        Ok(content)
    }
}

impl crate::fs::ReadAt for DiskView {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read(offset, buf)
    }

    fn size(&self) -> u64 {
        self.size
    }
}

/// One file of a mount: its name, and which bytes of the disk it shows.
#[derive(Debug, Clone)]
pub struct MountFile {
    /// `disk.img`, `p1.img`, `pve-vm--100--disk--0.img` …
    pub name: String,
    /// Its first byte on the disk.
    pub start: u64,
    /// Its size.
    pub size: u64,
    /// The filesystem it holds, as the backup found it (`ext4`, `vfat`, …).
    pub fs: Option<String>,
    /// For a logical volume: where its bytes lie from `start` (a thin
    /// volume's unmapped blocks are gaps, read as zeros); None: the
    /// `size` bytes at `start`.
    pub pieces: Option<Vec<crate::fs::Piece>>,
}

impl MountFile {
    /// Its name without `.img`: `p2`, the directory its filesystem is
    /// mounted on with `--mount-filesystems`.
    pub fn stem(&self) -> &str {
        self.name.trim_end_matches(".img")
    }
}

/// The files a mount of `view` shows: the disk, then each partition.
pub fn files(view: &DiskView) -> Vec<MountFile> {
    let m = view.manifest();
    let fs_of = |partition: Option<u32>| {
        m.streams
            .iter()
            .find(|s| s.partition == partition && s.kind != crate::image::StreamKind::Boot)
            .and_then(|s| s.fs.as_ref())
            .map(|f| f.fstype.clone())
    };
    let disk_fs = if m.layout.partitions.is_empty() { fs_of(None) } else { None };
    let mut files = vec![MountFile { name: "disk.img".into(), start: 0, size: view.size(), fs: disk_fs, pieces: None }];
    for p in &m.layout.partitions {
        files.push(MountFile {
            name: format!("p{}.img", p.number),
            start: p.start,
            size: p.size,
            fs: fs_of(Some(p.number)),
            pieces: None,
        });
    }
    // A PV stored by its volumes, or whole (its group on it alone).
    for st in m.streams.iter().filter(|s| s.method == "lvm" || s.lvm.as_ref().is_some_and(|vg| vg.pvs.len() == 1)) {
        let (Some(vg), Some(p)) =
            (&st.lvm, m.layout.partitions.iter().find(|p| Some(p.number) == st.partition && p.start == st.start))
        else {
            continue;
        };
        files.extend(volume_files(view, vg, p.start, p.size));
    }
    files
}

/// The logical volumes of `vg`, whose PV is the `length` bytes at `start`
/// of the image's disk, as files named as /dev/mapper names them
/// (`VG-LV.img`, a hyphen in either doubled): each linear volume, and
/// each thin volume and snapshot of a pool whose metadata reads from the
/// image. LVM's hidden volumes, thin pools themselves and volumes klon
/// does not map (striped, mirrors) are left out.
fn volume_files(view: &DiskView, vg: &crate::fs::lvm::VolumeGroup, start: u64, length: u64) -> Vec<MountFile> {
    let name = |lv: &str| format!("{}-{}.img", vg.name.replace('-', "--"), lv.replace('-', "--"));
    let mut out = Vec::new();
    let mut pools = std::collections::HashMap::new();
    for lv in vg.lvs.iter().filter(|l| !l.hidden) {
        let size = lv.extents().saturating_mul(vg.extent_size);
        let pieces = match &lv.segments[..] {
            // (An external origin's snapshot reads its unmapped blocks
            // from that volume: not shown.)
            [crate::fs::lvm::Segment { thin: Some(t), .. }] if t.external_origin.is_some() => continue,
            [crate::fs::lvm::Segment { thin: Some(t), .. }] => {
                let pool = pools.entry(t.pool.clone()).or_insert_with(|| {
                    let pool_lv = vg.lv(&t.pool)?;
                    crate::fs::lvm::OpenPool::open(vg, pool_lv, view, start, length).ok()
                });
                let Some(dev) = pool.as_ref().and_then(|p| p.pool.devices.get(&t.device_id).map(|d| (p, d))) else {
                    continue;
                };
                dev.0.pieces(dev.1, size).0
            }
            _ if lv.segments.iter().any(|s| s.kind == "thin-pool") => continue,
            _ => match vg.linear_ranges(lv, length) {
                Some(r) => crate::fs::Piece::chain(&r),
                None => continue,
            },
        };
        out.push(MountFile {
            name: name(&lv.name),
            start,
            size,
            fs: lv.fs.as_ref().map(|f| f.fstype.clone()),
            pieces: Some(pieces),
        });
    }
    out
}

/// How a filesystem of type `fstype` (as the probe names it) is mounted
/// read-only without writing to it: the kernel types to try and the
/// options that keep a journal or log from being replayed.
fn read_only_mount(fstype: &str) -> Option<(&'static [&'static str], &'static str)> {
    let types = crate::device::mounts::kernel_types(fstype);
    let options = match fstype {
        "ext3" | "ext4" => "noload",
        "xfs" => "norecovery",
        "btrfs" => "rescue=nologreplay",
        _ => "",
    };
    (!types.is_empty()).then_some((types, options))
}

/// The FUSE filesystem: a directory of [`MountFile`]s (inode 2 onwards),
/// and the empty directories their filesystems are mounted on (after them).
struct ImageFs {
    view: DiskView,
    files: Vec<MountFile>,
    /// The names of the directories, with `--mount-filesystems`.
    dirs: Vec<String>,
    uid: u32,
    gid: u32,
    time: SystemTime,
}

/// How long the kernel may keep names and attributes: they never change.
const TTL: Duration = Duration::from_secs(3600);
const ROOT: u64 = 1;

impl ImageFs {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let dir = ino.checked_sub(2 + self.files.len() as u64).filter(|&d| d < self.dirs.len() as u64);
        let (kind, perm, size, nlink) = if ino == ROOT {
            (FileType::Directory, 0o555, 0, 2 + self.dirs.len() as u32)
        } else if dir.is_some() {
            (FileType::Directory, 0o555, 0, 2)
        } else {
            let f = self.files.get(ino.checked_sub(2)? as usize)?;
            (FileType::RegularFile, 0o444, f.size, 1)
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 128 << 10,
            flags: 0,
        })
    }

    /// The root directory's entries: inode, type, name.
    fn entries(&self) -> Vec<(u64, FileType, String)> {
        let mut entries = vec![(ROOT, FileType::Directory, ".".to_string()), (ROOT, FileType::Directory, "..".into())];
        entries
            .extend(self.files.iter().enumerate().map(|(i, f)| (i as u64 + 2, FileType::RegularFile, f.name.clone())));
        let first_dir = 2 + self.files.len() as u64;
        entries
            .extend(self.dirs.iter().enumerate().map(|(i, d)| (first_dir + i as u64, FileType::Directory, d.clone())));
        entries
    }

    fn file(&self, ino: INodeNo) -> Option<&MountFile> {
        self.files.get(u64::from(ino).checked_sub(2)? as usize)
    }
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // As much readahead as the kernel allows: reads are sequential more
        // often than not, and a chunk is decompressed once for all of them.
        let _ = config.set_max_readahead(8 << 20).or_else(|max| config.set_max_readahead(max));
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = (u64::from(parent) == ROOT)
            .then(|| self.entries().into_iter().skip(2).find(|e| OsStr::new(&e.2) == name))
            .flatten()
            .and_then(|e| self.attr(e.0));
        match found {
            Some(attr) => reply.entry(&TTL, &attr, fuser::Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.into()) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.file(ino) {
            // The content never changes: the kernel may keep what it read.
            Some(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(f) = self.file(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let len = (size as u64).min(f.size.saturating_sub(offset)) as usize;
        let mut buf = vec![0u8; len];
        let got = match &f.pieces {
            None => self.view.read(f.start + offset, &mut buf),
            // Nothing mapped: zeros (a volume without pieces would be the
            // bytes at start).
            Some(p) if p.is_empty() => Ok(()),
            Some(p) => crate::fs::Volume { disk: &self.view, start: f.start, len: f.size, pieces: p }
                .read_at(&mut buf, offset)
                .map_err(|e| match e {
                    crate::fs::FsError::Io(e) => e,
                    other => Error::Corrupt(other.to_string()),
                }),
        };
        match got {
            Ok(()) => reply.data(&buf),
            Err(e) => {
                use std::io::Write as _;
                // One write: the kernel log (see quiet_stdio) keeps each
                // write as one record.
                let message = format!(
                    "klon mount: reading {} bytes at offset {offset} of {} (image {}) failed, the reader gets an \
                     I/O error (EIO): {e}\n",
                    len,
                    f.name,
                    self.view.location().display()
                );
                let _ = std::io::stderr().write_all(message.as_bytes());
                reply.error(Errno::EIO);
            }
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = match u64::from(ino) {
            ROOT => self.entries(),
            // A mount point's own directory, under what is mounted on it.
            d if self.attr(d).is_some_and(|a| a.kind == FileType::Directory) => {
                vec![(d, FileType::Directory, ".".to_string()), (ROOT, FileType::Directory, "..".into())]
            }
            _ => return reply.error(Errno::ENOTDIR),
        };
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// Options of `klon mount`.
#[derive(Debug, Clone, Default)]
pub struct MountOptions {
    /// Serve in this process until unmounted (or Ctrl-C) rather than in
    /// the background.
    pub foreground: bool,
    /// Also mount every filesystem the kernel can mount, read-only, on
    /// `DIR/pN/`.
    pub mount_filesystems: bool,
    /// Where a stale lock of the repository, removed, is said.
    pub feedback: Feedback,
}

/// What a mount shows, for the command's report.
#[derive(Debug, Clone)]
pub struct Mounted {
    /// The image as named.
    pub image: PathBuf,
    /// The mount point.
    pub dir: PathBuf,
    /// Its files.
    pub files: Vec<MountFile>,
    /// With `--mount-filesystems`: per filesystem, where it was mounted or
    /// why it was not.
    pub filesystems: Vec<String>,
}

impl Mounted {
    /// The report's text.
    pub fn text(&self) -> String {
        let list: Vec<String> = self
            .files
            .iter()
            .map(|f| format!("  {:<10} {:>10}  ({} bytes)", f.name, human_bytes(f.size), f.size))
            .collect();
        let fss: String = self.filesystems.iter().map(|f| format!("  {f}\n")).collect();
        format!(
            "Mounted {} read-only on {}:\n{}\n{}`klon umount {}` unmounts it.\n",
            self.image.display(),
            self.dir.display(),
            list.join("\n"),
            fss,
            self.dir.display()
        )
    }
}

/// Refuses a mount point that is missing, not a directory or not empty
/// (what it holds would be hidden while mounted).
fn check_dir(dir: &Path) -> Result<()> {
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Usage(format!(
                "{} does not exist: make the directory to mount the image on first (mkdir {})",
                dir.display(),
                dir.display()
            )));
        }
        Err(e) => return Err(Error::io("looking at", dir, None, e)),
    };
    if !meta.is_dir() {
        return Err(Error::Usage(format!(
            "{} is not a directory: name an empty directory to mount the image on",
            dir.display()
        )));
    }
    let mut entries = std::fs::read_dir(dir).map_err(|e| Error::io("reading", dir, None, e))?;
    if entries.next().is_some() {
        return Err(Error::Refused(format!(
            "{} is not empty: mounting on it would hide what it holds; use an empty directory",
            dir.display()
        )));
    }
    Ok(())
}

/// Mounts the image at `image` read-only on `dir`. Returns once the mount
/// is ready, the serving process going on in the background (or, with
/// `foreground`, once it is unmounted again).
pub fn mount(image: &Path, dir: &Path, opts: &MountOptions, ready: impl FnOnce(&Mounted)) -> Result<()> {
    // The background process works from /, so as not to keep a directory busy.
    let absolute = |p: &Path| {
        if crate::repo::store::is_remote(p) {
            return Ok(p.to_path_buf());
        }
        std::path::absolute(p).map_err(|e| Error::io("looking at", p, None, e))
    };
    let (image, dir) = (&absolute(image)?, &absolute(dir)?);
    if crate::repo::store::is_remote(image) && !opts.foreground {
        return Err(Error::Usage(format!(
            "{} is in object storage: klon mounts it in the foreground only (its network client runs threads, \
             which a process going to the background cannot take along): add --foreground and leave it running; \
             klon umount {} from another terminal, or Ctrl-C, ends it",
            image.display(),
            dir.display()
        )));
    }
    let store = open_store(image, "mount", &opts.feedback)?;
    check_dir(dir)?;
    let view = DiskView::new(store)?;
    let files = files(&view);
    let mut mounted =
        Mounted { image: image.to_path_buf(), dir: dir.to_path_buf(), files: files.clone(), filesystems: Vec::new() };
    let to_mount: Vec<MountFile> = if opts.mount_filesystems {
        files.iter().filter(|f| f.fs.as_deref().and_then(read_only_mount).is_some()).cloned().collect()
    } else {
        Vec::new()
    };
    let is_snapshot = crate::repo::split_spec(image).map(|(repo, _)| repo);
    let fs = ImageFs {
        view,
        files,
        dirs: to_mount.iter().map(|f| f.stem().to_string()).collect(),
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        time: SystemTime::now(),
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::FSName(format!("klon:{}", image.display()).replace(',', "_")),
        MountOption::CUSTOM("subtype=klon".into()),
    ];
    // A repository's snapshot is held (a shared lock) by the store from
    // its opening, so no prune takes chunks away while they are read. Its
    // lock file names this process: the background process that serves
    // takes a lock of its own and removes this one's before this one ends.
    let feedback = opts.feedback.clone();
    let parent = std::process::id();
    let take_lock = move || -> Result<Option<crate::repo::lock::Lock>> {
        match &is_snapshot {
            Some(repo) => {
                let repo = crate::repo::Repository::open(repo)?;
                Ok(Some(crate::repo::lock::take_over(&repo.store, "mount", parent, &feedback)?))
            }
            None => Ok(None),
        }
    };
    if opts.foreground {
        let session = Session::new(fs, dir, &config).map_err(|e| mount_error(dir, e))?;
        return serve(session, dir, &to_mount, |fss| {
            mounted.filesystems = fss;
            ready(&mounted);
        });
    }
    let session = Session::new(fs, dir, &config).map_err(|e| mount_error(dir, e))?;
    daemon::detach(session, dir, &to_mount, take_lock, |fss| {
        mounted.filesystems = fss;
        ready(&mounted)
    })
}

/// Mounts the filesystem of each of `files` (in the mount on `dir`)
/// read-only on `dir/pN`, through a loop device that goes away with the
/// mount; says for each where it is mounted, or why not.
fn mount_filesystems(dir: &Path, files: &[MountFile]) -> Vec<String> {
    use nix::mount::MsFlags;
    let mut said = Vec::new();
    for f in files {
        let fstype = f.fs.as_deref().unwrap_or_default();
        let Some((types, options)) = read_only_mount(fstype) else { continue };
        let (file, at) = (dir.join(&f.name), dir.join(f.stem()));
        let device = match crate::device::loopdev::attach_read_only(&file) {
            Ok(d) => d,
            Err(e) => {
                said.push(format!("{} ({fstype}): not mounted: {e}", f.stem()));
                continue;
            }
        };
        let flags = MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
        let data = (!options.is_empty()).then_some(options);
        let mut last = nix::Error::ENODEV;
        let done = types.iter().any(|t| match nix::mount::mount(Some(&device.path), &at, Some(*t), flags, data) {
            Ok(()) => true,
            Err(e) => {
                last = e;
                false
            }
        });
        said.push(if done {
            let opts = if options.is_empty() { "ro".to_string() } else { format!("ro,{options}") };
            format!("{} ({fstype}): mounted on {} ({opts})", f.stem(), at.display())
        } else {
            let why = match last {
                nix::Error::ENODEV => format!("the kernel has no {} driver", types[0]),
                e => format!("{} says {e}", types.join("/")),
            };
            format!("{} ({fstype}): not mounted: {why}", f.stem())
        });
        // The loop device stays while mounted, and clears itself after.
        drop(device);
    }
    said
}

fn mount_error(dir: &Path, e: std::io::Error) -> Error {
    let hint = if e.kind() == std::io::ErrorKind::NotFound {
        " (no /dev/fuse: load the fuse module with modprobe fuse)"
    } else {
        ""
    };
    Error::io(format!("mounting the image with FUSE{hint} on"), dir, None, e)
}

/// Serves requests until the mount goes away (`klon umount`), or Ctrl-C,
/// SIGTERM or SIGHUP ask to unmount it. Once it serves, mounts the
/// filesystems of `to_mount` and tells `ready` what became of them.
fn serve(session: Session<ImageFs>, dir: &Path, to_mount: &[MountFile], ready: impl FnOnce(Vec<String>)) -> Result<()> {
    let background = session.spawn().map_err(|e| Error::io("serving the mount on", dir, None, e))?;
    ready(mount_filesystems(dir, to_mount));
    let mut background = Some(background);
    let mut said_busy = false;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let b = background.as_ref().expect("still serving");
        if b.guard.is_finished() {
            break;
        }
        if super::cancel::requested() {
            match unmount(dir) {
                Ok(()) => break,
                Err(e) => {
                    if !said_busy {
                        use std::io::Write as _;
                        let _ = std::io::stderr()
                            .write_all(format!("klon mount: cannot unmount {}: {e}\n", dir.display()).as_bytes());
                        said_busy = true;
                    }
                    super::cancel::reset();
                }
            }
        }
    }
    background.take().expect("still serving").join().map_err(|e| Error::io("serving the mount on", dir, None, e))
}

/// Unmounts the klon mount on `dir`: the filesystems mounted under it
/// first, then the mount itself.
fn unmount(dir: &Path) -> Result<()> {
    let busy = |what: &Path| {
        Error::Refused(format!(
            "{} is in use: a file in it is still open (or a filesystem is mounted from it); close it and \
             run klon umount {} again",
            what.display(),
            dir.display()
        ))
    };
    let mut below: Vec<PathBuf> = crate::device::mounts::mounts()?
        .into_iter()
        .map(|m| m.mountpoint)
        .filter(|m| m.starts_with(dir) && m != dir)
        .collect();
    below.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in &below {
        match nix::mount::umount(m.as_path()) {
            Ok(()) => {}
            Err(nix::errno::Errno::EBUSY) => return Err(busy(m)),
            Err(e) => return Err(Error::io("unmounting", m, None, e.into())),
        }
    }
    // A loop device lets go of its file a moment after its filesystem is
    // unmounted.
    let mut tries = if below.is_empty() { 1 } else { 20 };
    loop {
        tries -= 1;
        match nix::mount::umount(dir) {
            Ok(()) => return Ok(()),
            Err(nix::errno::Errno::EBUSY) if tries > 0 => std::thread::sleep(Duration::from_millis(100)),
            Err(nix::errno::Errno::EBUSY) => return Err(busy(dir)),
            Err(e) => return Err(Error::io("unmounting", dir, None, e.into())),
        }
    }
}

/// `klon umount DIR`: unmounts the klon mount on `dir`. Anything else
/// mounted there is refused.
pub fn umount(dir: &Path) -> Result<()> {
    let canonical = std::fs::canonicalize(dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Usage(format!("{} does not exist: nothing is mounted there", dir.display()))
        } else {
            Error::io("looking at", dir, None, e)
        }
    })?;
    let mounts = crate::device::mounts::mounts()?;
    let Some(m) = mounts.iter().rev().find(|m| m.mountpoint == canonical) else {
        return Err(Error::Usage(format!("nothing is mounted on {}", dir.display())));
    };
    if m.fstype != FSTYPE {
        return Err(Error::Refused(format!(
            "{} is not a klon mount ({} is mounted there, type {}): klon umount only undoes klon mount; use umount",
            dir.display(),
            m.source,
            m.fstype
        )));
    }
    unmount(&canonical)
}

/// Running the mount in a process of its own, in the background.
mod daemon {
    #![allow(unsafe_code)]

    use std::io::{Read as _, Write as _};
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::fs::FileTypeExt;
    use std::path::Path;

    use fuser::Session;

    use super::{ImageFs, MountFile, serve};
    use crate::error::{Error, Result};

    /// Hands `session` (mounted, not yet served) to a child process in a
    /// session of its own, which takes the lock `take_lock` gives and then
    /// serves it; returns once the child said it serves (calling `ready`),
    /// or with its error.
    pub(super) fn detach(
        session: Session<ImageFs>,
        dir: &Path,
        to_mount: &[MountFile],
        take_lock: impl FnOnce() -> Result<Option<crate::repo::lock::Lock>>,
        ready: impl FnOnce(Vec<String>),
    ) -> Result<()> {
        let threads = std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0);
        if threads != 1 {
            return Err(Error::Unsupported(format!(
                "klon mount cannot go to the background ({threads} threads run); use --foreground"
            )));
        }
        let (read_end, write_end) =
            nix::unistd::pipe().map_err(|e| Error::io("making a pipe for", dir, None, e.into()))?;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // SAFETY: this process runs one thread (checked above), so the child
        // is a whole copy of it and may do anything the parent could.
        match unsafe { nix::unistd::fork() } {
            Err(e) => Err(Error::io("starting the background process for", dir, None, e.into())),
            Ok(nix::unistd::ForkResult::Parent { .. }) => {
                drop(write_end);
                // The child holds the mount now; dropping the session here
                // would unmount it.
                std::mem::forget(session);
                let mut said = String::new();
                let _ = std::fs::File::from(read_end).read_to_string(&mut said);
                match said.split_once('\n') {
                    Some(("ok", filesystems)) => {
                        ready(filesystems.lines().map(str::to_string).collect());
                        Ok(())
                    }
                    Some((code, message)) => {
                        let _ = writeln!(std::io::stderr(), "klon: {message}");
                        std::process::exit(code.parse().unwrap_or(crate::error::exit::FAILURE));
                    }
                    None => Err(Error::Unsupported(format!(
                        "the background process of the mount on {} ended before it was ready; \
                         `klon umount {}` unmounts what is left",
                        dir.display(),
                        dir.display()
                    ))),
                }
            }
            Ok(nix::unistd::ForkResult::Child) => {
                drop(read_end);
                let code = child(session, dir, to_mount, take_lock, write_end);
                std::process::exit(code);
            }
        }
    }

    /// The background process: detaches from the terminal, says whether it
    /// serves, then serves until unmounted.
    fn child(
        mut session: Session<ImageFs>,
        dir: &Path,
        to_mount: &[MountFile],
        take_lock: impl FnOnce() -> Result<Option<crate::repo::lock::Lock>>,
        report: OwnedFd,
    ) -> i32 {
        let _ = nix::unistd::setsid();
        let _ = std::env::set_current_dir("/");
        quiet_stdio();
        let mut report = std::fs::File::from(report);
        let _lock = match take_lock() {
            Ok(lock) => lock,
            Err(e) => {
                let _ = session.unmount();
                let _ = write!(report, "{}\n{e}", e.exit_code());
                return e.exit_code();
            }
        };
        let ready = |filesystems: Vec<String>| {
            let _ = write!(report, "ok\n{}", filesystems.join("\n"));
            drop(report);
        };
        match serve(session, dir, to_mount, ready) {
            Ok(()) => 0,
            Err(e) => {
                let _ = std::io::stderr().write_all(format!("klon mount: {e}\n").as_bytes());
                e.exit_code()
            }
        }
    }

    /// stdin and stdout become /dev/null; stderr, where damaged chunks are
    /// reported, stays where it was when that is a terminal or a file. A
    /// pipe would keep whoever reads it waiting until the unmount: then
    /// the reports go to the kernel log (`dmesg`), or nowhere when it
    /// cannot be written.
    fn quiet_stdio() {
        let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") else {
            return;
        };
        let keep_stderr = std::fs::metadata("/proc/self/fd/2")
            .map(|m| m.file_type().is_char_device() || m.file_type().is_file())
            .unwrap_or(false);
        let kmsg = (!keep_stderr).then(|| std::fs::OpenOptions::new().write(true).open("/dev/kmsg").ok()).flatten();
        let mut fds = vec![(0, null.as_raw_fd()), (1, null.as_raw_fd())];
        if !keep_stderr {
            fds.push((2, kmsg.as_ref().map_or(null.as_raw_fd(), |k| k.as_raw_fd())));
        }
        for (fd, to) in fds {
            // SAFETY: dup2 onto the standard descriptors, which stay open.
            unsafe {
                libc::dup2(to, fd);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::backup::{BackupOptions, backup};
    use crate::engine::restore::RestoreOptions;
    use crate::testutil::{Rng, TempDir};

    const MIB: u64 = 1 << 20;

    #[test]
    fn reads_at_any_offset_match_what_restore_writes() {
        let t = TempDir::new("disk-view");
        let (src, img, dst) = (t.join("src.img"), t.join("image"), t.join("dst.img"));
        // A disk without a table, 20 MiB: random data with runs of zeros
        // the image leaves out, several chunks.
        let mut rng = Rng::seeded(11);
        let mut disk = rng.bytes((20 * MIB) as usize);
        disk[(3 * MIB) as usize..(5 * MIB) as usize].fill(0);
        disk[(12 * MIB) as usize..(12 * MIB + 300_000) as usize].fill(0);
        std::fs::write(&src, &disk).unwrap();
        let opts = BackupOptions {
            level: 1,
            feedback: crate::engine::feedback::Feedback::silent(),
            workers: 2,
            ..Default::default()
        };
        backup(&src, &img, &opts).unwrap();
        let ropts = RestoreOptions {
            grow_last: false,
            verify_after: false,
            feedback: crate::engine::feedback::Feedback::silent(),
            workers: 2,
        };
        crate::engine::source::prepare_restore(&img, &dst, &ropts.feedback).unwrap().restore(&ropts).unwrap();
        let want = std::fs::read(&dst).unwrap();
        assert!(want == disk);

        let view = DiskView::new(open_store(&img, "mount", &Feedback::silent()).unwrap()).unwrap();
        assert_eq!(view.size(), want.len() as u64);
        let mut whole = vec![1u8; want.len()];
        view.read(0, &mut whole).unwrap();
        assert!(whole == want, "the whole disk differs");
        // Pieces across chunk ends and zero runs, and past the end.
        for _ in 0..200 {
            let off = rng.below(want.len() as u64 + 4096);
            let len = rng.below(3 * MIB) as usize;
            let mut buf = vec![7u8; len];
            view.read(off, &mut buf).unwrap();
            let have = want.len().min(off as usize);
            let upto = want.len().min(off as usize + len);
            assert!(buf[..upto - have] == want[have..upto], "{len} bytes at {off}");
            assert!(buf[upto - have..].iter().all(|&b| b == 0), "past the end at {off}");
        }
        assert!(view.cache.lock().unwrap().len() <= CACHED_CHUNKS);
    }
}
