//! A Clonezilla image's LVM2 physical volume as one partition stream: the
//! PV's label and metadata area made from the saved metadata text (what
//! `pvcreate --restorefile` and `vgcfgrestore` write), then each logical
//! volume's stored blocks where its segments put them on the partition.
//!
//! The stream yields its bytes in increasing partition offset, as every
//! stream does. A volume whose segments lie out of disk order is read in
//! passes: its image is opened again when a later piece of the disk holds
//! an earlier part of the volume (partclone images are read front to back
//! only). After the last piece, each image is read to its end, so that all
//! of partclone's checksums are checked as for a partition.

use super::{BlockSource, CzPartition, Origin, open_stream, stream_info, swap_header};
use crate::clonezilla::{CzVolumeContent, CzVolumeGroup};
use crate::error::{Error, Result};
use crate::fs::FsInfo;
use crate::image::format::CHUNK_SIZE;
use crate::image::manifest::{Fill, StreamInfo, StreamKind};
use crate::table::Partition;

/// The bytes of a swap volume's header, as a stream of one run.
struct Header(Option<Vec<u8>>);

impl BlockSource for Header {
    fn next_run(&mut self, _max_len: usize) -> Result<Option<(u64, Vec<u8>)>> {
        Ok(self.0.take().map(|b| (0, b)))
    }
    fn stored_bytes(&self) -> u64 {
        self.0.as_ref().map_or(0, |b| b.len() as u64)
    }
    fn device_size(&self) -> u64 {
        0
    }
    fn block_size(&self) -> u32 {
        1
    }
    fn describe(&self) -> String {
        "a fresh swap header".into()
    }
}

/// What a volume's bytes come from.
enum Content {
    Image(CzPartition),
    Swap(Vec<u8>),
}

/// One logical volume, read front to back (and again when needed).
struct VolumeReader {
    /// "VG/LV", for messages.
    name: String,
    size: u64,
    content: Content,
    source: Box<dyn BlockSource>,
    /// A run (or its rest) read but not yet handed on.
    pending: Option<(u64, Vec<u8>)>,
    /// Volume offset below which the source's runs are used up.
    used_to: u64,
    /// Where the source's last run ended (runs come in order).
    end: u64,
    /// The source has ended.
    done: bool,
}

impl VolumeReader {
    fn open(content: &Content) -> Result<Box<dyn BlockSource>> {
        match content {
            Content::Image(part) => open_stream(part),
            Content::Swap(header) => Ok(Box::new(Header(Some(header.clone())))),
        }
    }

    fn file(&self) -> String {
        match &self.content {
            Content::Image(p) => p.pieces[0].display().to_string(),
            Content::Swap(_) => format!("the swap header of {}", self.name),
        }
    }

    /// The source's next run, checked to lie inside the volume after the
    /// one before.
    fn next(&mut self) -> Result<Option<(u64, Vec<u8>)>> {
        if let Some(r) = self.pending.take() {
            return Ok(Some(r));
        }
        if self.done {
            return Ok(None);
        }
        crate::engine::cancel::check("reading the Clonezilla image")?;
        match self.source.next_run(CHUNK_SIZE as usize)? {
            None => {
                self.done = true;
                Ok(None)
            }
            Some((offset, bytes)) => {
                let end = offset.checked_add(bytes.len() as u64).filter(|&e| e <= self.size);
                if offset < self.end || end.is_none() {
                    return Err(Error::Corrupt(format!(
                        "{}: data at offset {offset} ({} bytes) lies outside logical volume {} ({} bytes) or out \
                         of order",
                        self.file(),
                        bytes.len(),
                        self.name,
                        self.size
                    )));
                }
                self.end = offset + bytes.len() as u64;
                Ok(Some((offset, bytes)))
            }
        }
    }

    /// Hands `f` the volume's stored bytes in `from..to` (volume offsets),
    /// in order; false when `f` said stop.
    fn runs(&mut self, from: u64, to: u64, f: &mut dyn FnMut(u64, &[u8]) -> bool) -> Result<bool> {
        if from < self.used_to {
            self.source = Self::open(&self.content)?;
            (self.pending, self.used_to, self.end, self.done) = (None, 0, 0, false);
        }
        while let Some((offset, bytes)) = self.next()? {
            let end = offset + bytes.len() as u64;
            if end <= from {
                continue;
            }
            if offset >= to {
                self.pending = Some((offset, bytes));
                break;
            }
            let (a, b) = (offset.max(from), end.min(to));
            if !f(a, &bytes[(a - offset) as usize..(b - offset) as usize]) {
                return Ok(false);
            }
            if end > to {
                self.pending = Some((to, bytes[(to - offset) as usize..].to_vec()));
                break;
            }
        }
        self.used_to = to;
        Ok(true)
    }

    /// Reads the rest of the source, so that every checksum is checked.
    fn drain(&mut self) -> Result<()> {
        self.pending = None;
        while self.next()?.is_some() {}
        Ok(())
    }
}

/// The PV's bytes: its start, then the volumes' pieces in disk order.
pub(super) struct PvOrigin {
    /// The PV's first bytes (label, metadata area), up to its first extent.
    start: Vec<u8>,
    /// (volume, first volume offset, length, partition offset), sorted by
    /// partition offset.
    pieces: Vec<(usize, u64, u64, u64)>,
    volumes: Vec<VolumeReader>,
}

impl PvOrigin {
    /// Pushes the stream's bytes (partition offset + `start`) in order;
    /// false when `push` said stop.
    pub(super) fn read(&mut self, start: u64, push: &mut dyn FnMut(u64, &[u8]) -> bool) -> Result<bool> {
        for (i, piece) in self.start.chunks(CHUNK_SIZE as usize).enumerate() {
            if !push(start + (i * CHUNK_SIZE as usize) as u64, piece) {
                return Ok(false);
            }
        }
        for &(v, from, len, at) in &self.pieces {
            let mut f = |offset: u64, bytes: &[u8]| push(start + at + (offset - from), bytes);
            if !self.volumes[v].runs(from, from + len, &mut f)? {
                return Ok(false);
            }
        }
        for v in &mut self.volumes {
            v.drain()?;
        }
        Ok(true)
    }
}

/// The stream of volume group `g`'s PV, partition `p`; its stored bytes.
pub(super) fn stream(g: &CzVolumeGroup, p: &Partition) -> Result<(StreamInfo, Origin, u64)> {
    let vg = &g.vg;
    let start = crate::fs::lvm::pv_start(vg, &g.conf, g.pv_size)
        .map_err(|e| Error::Corrupt(format!("lvm_{}.conf: {e}", vg.name)))?;
    let mut info = stream_info(format!("p{}", p.number), StreamKind::Partition, Some(p.number), p.start, p.size);
    let mut described = vg.clone();
    let mut volumes = Vec::new();
    let mut pieces = Vec::new();
    let mut stored = start.len() as u64;
    for (i, v) in g.volumes.iter().enumerate() {
        let name = format!("{}/{}", vg.name, v.name);
        let (content, method, fs) = match &v.content {
            CzVolumeContent::Image(part) => {
                let fs =
                    (part.fs != "dd").then(|| FsInfo { fstype: super::fstype_of(&part.fs), label: None, uuid: None });
                (Content::Image(part.clone()), part.fs.clone(), fs)
            }
            CzVolumeContent::Swap(s) => {
                let header = swap_header(v.size, s.uuid.as_deref(), s.label.as_deref());
                let fs = FsInfo { fstype: "swap".into(), label: s.label.clone(), uuid: s.uuid.clone() };
                (Content::Swap(header), "swap header".into(), Some(fs))
            }
        };
        let source = VolumeReader::open(&content)?;
        if source.device_size() > v.size {
            return Err(Error::Corrupt(format!(
                "the image of logical volume {name} is of a {}-byte filesystem, but the volume holds {} bytes",
                source.device_size(),
                v.size
            )));
        }
        stored += source.stored_bytes();
        if let Some(lv) = described.lvs.iter_mut().find(|l| l.name == v.name) {
            lv.method = Some(method);
            lv.fs = fs;
            lv.used_bytes = Some(source.stored_bytes());
        }
        let mut from = 0;
        for &(at, len) in &v.ranges {
            pieces.push((i, from, len, at));
            from += len;
        }
        volumes.push(VolumeReader {
            name,
            size: v.size,
            content,
            source,
            pending: None,
            used_to: 0,
            end: 0,
            done: false,
        });
    }
    pieces.sort_by_key(|&(_, _, _, at)| at);
    let mut end = start.len() as u64;
    for &(v, _, len, at) in &pieces {
        if at < end || at + len > p.size {
            return Err(Error::Corrupt(format!(
                "lvm_{}.conf: logical volume {} overlaps the PV's metadata or another volume, or ends outside \
                 partition {}",
                vg.name, volumes[v].name, p.number
            )));
        }
        end = at + len;
    }
    info.method = "lvm".into();
    info.method_reason = format!(
        "LVM2 physical volume of volume group {}: its label and metadata made from Clonezilla's lvm_{}.conf, each \
         logical volume from its image",
        vg.name, vg.name
    );
    info.fill = Fill::Free;
    info.fs = Some(FsInfo { fstype: "LVM2_member".into(), label: None, uuid: Some(vg.pv_uuid.clone()) });
    info.fs_used_bytes = Some(stored);
    info.fs_total_bytes = Some(p.size);
    info.lvm = Some(described);
    Ok((info, Origin::Pv(PvOrigin { start, pieces, volumes }), stored))
}
