//! LVM2 physical volumes, read without device-mapper: the label, the PV
//! header, the metadata area and its newest metadata text (checked by its
//! crc, wrapping around the ring buffer), parsed into the volume group
//! with its logical volumes and their segments. Read-only; nothing is
//! activated. (Layout facts from LVM2's documentation and on-disk data;
//! the code is klon's own.)

use serde::{Deserialize, Serialize};

use super::Extent;
use super::probe::lvm_crc as crc;
use super::{FsError, Piece, ReadAt, Volume};
use crate::le::{le32, le64};

/// Magic of a metadata area header.
const MDA_MAGIC: &[u8; 16] = b" LVM2 x[5A%r0N*>";
/// Length of a metadata area header; a wrapped text goes on after it.
const MDA_HEADER_LEN: u64 = 512;
/// Most metadata text klon reads (LVM's default area is 1 MiB).
const MAX_TEXT: u64 = 16 << 20;
/// Deepest nesting of sections in metadata text.
const MAX_DEPTH: usize = 16;

/// A volume group as one of its PVs' metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeGroup {
    /// Its name.
    pub name: String,
    /// Its UUID, as LVM prints it.
    pub uuid: String,
    /// The metadata's sequence number (higher is newer).
    pub seqno: u64,
    /// Bytes an extent.
    pub extent_size: u64,
    /// This PV's UUID.
    pub pv_uuid: String,
    /// The PVs of the group.
    pub pvs: Vec<PhysicalVolume>,
    /// Its logical volumes, in the metadata's order.
    pub lvs: Vec<LogicalVolume>,
}

/// A PV of the group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhysicalVolume {
    /// Its name in the metadata (pv0, pv1, …).
    pub name: String,
    /// Its UUID.
    pub uuid: String,
    /// Byte offset of its first extent from the PV's start.
    pub pe_start: u64,
    /// Its extents.
    pub pe_count: u64,
}

/// A logical volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogicalVolume {
    /// Its name.
    pub name: String,
    /// Its UUID.
    pub uuid: String,
    /// Its segments, by logical extent.
    pub segments: Vec<Segment>,
    /// LVM's own volume, not shown to users (a thin pool's `_tmeta` and
    /// `_tdata`, the spare metadata volume): its status lacks VISIBLE.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hidden: bool,
    /// How a backup copied it: the filesystem whose used blocks it read,
    /// or "raw (why)" (absent: the PV was copied raw).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The filesystem found in it, when it was probed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<super::probe::FsInfo>,
    /// Bytes of it the backup copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    /// For a thin volume, bytes of it mapped in its pool; for a thin
    /// pool, bytes of its data blocks that some thin device maps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapped_bytes: Option<u64>,
}

impl LogicalVolume {
    /// Its extents.
    pub fn extents(&self) -> u64 {
        self.segments.iter().map(|s| s.extent_count).fold(0, u64::saturating_add)
    }
}

/// A run of a logical volume's extents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Its first logical extent.
    pub start_extent: u64,
    /// Its extents.
    pub extent_count: u64,
    /// LVM's segment type: `linear` (a one-stripe `striped`), `striped`,
    /// `thin-pool`, `thin`, `mirror`, `raid1`, …
    pub kind: String,
    /// For striped and linear segments: each stripe's PV name and first
    /// extent on it.
    pub stripes: Vec<(String, u64)>,
    /// Bytes a stripe's run (striped segments of more than one stripe).
    pub stripe_size: u64,
    /// For a `thin-pool` segment: its metadata and data volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolSegment>,
    /// For a `thin` segment: its pool and device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thin: Option<ThinSegment>,
}

/// What a `thin-pool` segment names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSegment {
    /// The (hidden) volume holding the pool's metadata (`NAME_tmeta`).
    pub metadata: String,
    /// The (hidden) volume holding its data blocks (`NAME_tdata`).
    pub data: String,
    /// Bytes a data block (LVM's chunk_size).
    pub chunk_size: u64,
    /// The transaction id LVM expects of the pool's metadata.
    pub transaction_id: u64,
}

/// What a `thin` segment names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThinSegment {
    /// The thin pool volume.
    pub pool: String,
    /// Its device id in the pool's metadata.
    pub device_id: u64,
    /// The volume it is a snapshot of, if it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// The volume outside the pool its unmapped blocks are read from (an
    /// external-origin snapshot), if it has one: then its unmapped
    /// blocks are not zeros.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_origin: Option<String>,
}

impl Segment {
    /// Where the segment's bytes lie on PV `pv` (its byte offset from the
    /// PV's start, and length), for a linear segment; None for others.
    pub fn linear_on(&self, vg: &VolumeGroup, pv: &str) -> Option<(u64, u64)> {
        let [(name, first)] = &self.stripes[..] else { return None };
        if self.kind != "linear" || name != pv {
            return None;
        }
        let p = vg.pvs.iter().find(|p| p.name == *pv)?;
        let at = p.pe_start.checked_add(first.checked_mul(vg.extent_size)?)?;
        Some((at, self.extent_count.checked_mul(vg.extent_size)?))
    }
}

impl VolumeGroup {
    /// One line for a disk list: the group and its visible volumes, a
    /// thin pool with the thin volumes in it ("pve: root, swap, data
    /// (thin pool: vm-100-disk-0, …)").
    pub fn summary(&self) -> String {
        let in_pool = |pool: &str| -> Vec<&str> {
            let of = |l: &&LogicalVolume| l.segments.iter().any(|s| s.thin.as_ref().is_some_and(|t| t.pool == pool));
            self.lvs.iter().filter(of).map(|l| l.name.as_str()).collect()
        };
        let lvs: Vec<String> = self
            .lvs
            .iter()
            .filter(|l| !l.hidden && !l.segments.iter().any(|s| s.kind == "thin"))
            .map(|l| match l.segments.iter().any(|s| s.kind == "thin-pool") {
                true => format!("{} (thin pool: {})", l.name, in_pool(&l.name).join(", ")),
                false => l.name.clone(),
            })
            .collect();
        format!("volume group {}: {}", self.name, if lvs.is_empty() { "no volumes".into() } else { lvs.join(", ") })
    }
}

impl VolumeGroup {
    /// Where a linear logical volume's bytes lie on this PV (offsets from
    /// its start, in the volume's order), if it is linear on this PV, its
    /// segments follow each other from its first extent (sorted when
    /// read), and all lie inside the PV's `length` bytes.
    pub fn linear_ranges(&self, lv: &LogicalVolume, length: u64) -> Option<Vec<Extent>> {
        let ranges: Vec<Extent> =
            lv.segments.iter().map(|s| s.linear_on(self, &self.pvs[0].name)).collect::<Option<_>>()?;
        let contiguous = lv
            .segments
            .iter()
            .try_fold(0u64, |next, s| (s.start_extent == next).then(|| next.saturating_add(s.extent_count)))
            .is_some();
        let inside = ranges.iter().all(|&(s, l)| s.checked_add(l).is_some_and(|e| e <= length));
        (contiguous && inside && !ranges.is_empty()).then_some(ranges)
    }

    /// The logical volume named `name`.
    pub fn lv(&self, name: &str) -> Option<&LogicalVolume> {
        self.lvs.iter().find(|l| l.name == name)
    }

    /// The thin volumes of pool `pool` (each of one thin segment), with
    /// their device ids.
    pub fn thin_volumes<'a>(&'a self, pool: &'a str) -> impl Iterator<Item = (&'a LogicalVolume, u64)> + 'a {
        self.lvs.iter().filter_map(move |l| match &l.segments[..] {
            [Segment { thin: Some(t), .. }] if t.pool == pool => Some((l, t.device_id)),
            _ => None,
        })
    }
}

/// A thin pool of a volume group on a PV, its metadata read.
#[derive(Debug)]
pub struct OpenPool {
    /// Its metadata volume's bytes on the PV (offsets from its start).
    pub metadata: Vec<Extent>,
    /// Its data volume's pieces on the PV.
    pub data: Vec<Piece>,
    /// Its data volume's size.
    pub data_len: u64,
    /// What its metadata says.
    pub pool: super::thin::ThinPool,
}

/// Why a thin pool could not be mapped.
#[derive(Debug)]
pub enum PoolError {
    /// Its volumes or metadata do not allow it (said why).
    Unmapped(String),
    /// Reading failed.
    Io(crate::Error),
}

impl OpenPool {
    /// Reads thin pool `pool_lv` of `vg`, whose PV is the `length` bytes
    /// at `start` of `disk`: its metadata and data volumes must be linear
    /// on the PV and its metadata pass every check.
    pub fn open(
        vg: &VolumeGroup,
        pool_lv: &LogicalVolume,
        disk: &dyn ReadAt,
        start: u64,
        length: u64,
    ) -> Result<OpenPool, PoolError> {
        let no = |why: String| Err(PoolError::Unmapped(why));
        let [seg] = &pool_lv.segments[..] else { return no("it has more than one segment".into()) };
        let Some(p) = &seg.pool else {
            return no("LVM's metadata does not give its metadata and data volumes and block size".into());
        };
        let (Some(meta_lv), Some(data_lv)) = (vg.lv(&p.metadata), vg.lv(&p.data)) else {
            return no(format!("its volumes {} and {} are not both in the metadata", p.metadata, p.data));
        };
        let (Some(metadata), Some(data_r)) = (vg.linear_ranges(meta_lv, length), vg.linear_ranges(data_lv, length))
        else {
            return no(format!("its volumes {} and {} are not both linear on this PV", p.metadata, p.data));
        };
        let meta_pieces = Piece::chain(&metadata);
        let meta = Volume { disk, start, len: metadata.iter().map(|r| r.1).sum(), pieces: &meta_pieces };
        let pool = match super::thin::read(&meta) {
            Ok(pool) => pool,
            Err(FsError::Io(e)) => return Err(PoolError::Io(e)),
            Err(e) => return no(format!("its metadata failed a check ({e})")),
        };
        let data_len: u64 = data_r.iter().map(|r| r.1).sum();
        let cb = pool.data_block_size;
        if cb != p.chunk_size {
            return no(format!(
                "its metadata has data blocks of {cb} bytes where LVM's metadata says {}",
                p.chunk_size
            ));
        }
        if pool.data_blocks.checked_mul(cb).is_none_or(|b| b > data_len) {
            return no(format!(
                "its metadata counts {} data blocks of {cb} bytes, more than its data volume {} holds",
                pool.data_blocks, p.data
            ));
        }
        Ok(OpenPool { metadata, data: Piece::chain(&data_r), data_len, pool })
    }

    /// Where the `len` bytes at `offset` of the data volume lie on the PV.
    fn data_on_disk(&self, offset: u64, len: u64) -> Vec<Extent> {
        // (Reads nothing: the disk is not used.)
        Volume { disk: &NoDisk, start: 0, len: self.data_len, pieces: &self.data }.on_disk(offset, len)
    }

    /// The PV ranges of every data block thin device `dev` maps (all
    /// inside the data volume: checked when opened).
    pub fn mapped(&self, dev: &super::thin::ThinDevice) -> Vec<Extent> {
        let cb = self.pool.data_block_size;
        dev.runs.iter().flat_map(|&(_, d, n)| self.data_on_disk(d * cb, n * cb)).collect()
    }

    /// Thin device `dev` as a volume of `size` bytes: its pieces on the
    /// PV (unmapped blocks are gaps, read as zeros), and the PV ranges of
    /// blocks it maps past `size`.
    pub fn pieces(&self, dev: &super::thin::ThinDevice, size: u64) -> (Vec<Piece>, Vec<Extent>) {
        let cb = self.pool.data_block_size;
        let (mut pieces, mut beyond) = (Vec::new(), Vec::new());
        for &(v, d, n) in &dev.runs {
            let (at, total) = (v.saturating_mul(cb), n * cb);
            let inside = size.saturating_sub(at).min(total);
            let mut off = at;
            for (disk, len) in self.data_on_disk(d * cb, inside) {
                pieces.push(Piece { at: off, disk, len });
                off += len;
            }
            if inside < total {
                beyond.extend(self.data_on_disk(d * cb + inside, total - inside));
            }
        }
        (pieces, beyond)
    }
}

/// A disk of no bytes, for working out where a volume's bytes lie.
#[derive(Debug)]
struct NoDisk;

impl ReadAt for NoDisk {
    fn read_exact_at(&self, _buf: &mut [u8], offset: u64) -> crate::Result<()> {
        Err(crate::Error::Corrupt(format!("nothing to read at {offset}")))
    }

    fn size(&self) -> u64 {
        0
    }
}

/// Reads the volume group from the PV that `v` holds (its label in one of
/// the first four sectors). An error says what failed and where.
pub fn read(v: &Volume) -> Result<VolumeGroup, FsError> {
    let bad = |why: String| Err(FsError::Corrupt(why));
    let (label_at, b) = (0..4u64)
        .find_map(|s| v.read_vec(s * 512, 512).ok().filter(|b| &b[..8] == b"LABELONE").map(|b| (s, b)))
        .ok_or_else(|| FsError::Corrupt("no LVM2 label in the first 4 sectors".into()))?;
    if &b[24..32] != b"LVM2 001" || le64(&b, 8) != label_at {
        return bad(format!("the LVM2 label at sector {label_at} is not one klon reads"));
    }
    if le32(&b, 16) != crc(&b[20..]) {
        return bad(format!("the LVM2 label at sector {label_at}: its crc does not match"));
    }
    // The PV header: uuid, size, then the data areas and the metadata
    // areas, each list ended by a zero entry.
    let mut at = le32(&b, 20) as usize;
    let pv_uuid = uuid_of(b.get(at..at + 32).ok_or_else(|| FsError::Corrupt("the PV header is cut off".into()))?)?;
    at += 40;
    let mut lists: [Vec<(u64, u64)>; 2] = [Vec::new(), Vec::new()];
    for list in &mut lists {
        loop {
            let Some(e) = b.get(at..at + 16) else { return bad("the PV header's area lists are cut off".into()) };
            at += 16;
            let (off, size) = (le64(e, 0), le64(e, 8));
            if off == 0 {
                break;
            }
            list.push((off, size));
        }
    }
    let mdas = &lists[1];
    if mdas.is_empty() {
        return bad("the PV has no metadata area (its volume group's metadata is on another PV)".into());
    }
    let mut newest: Option<VolumeGroup> = None;
    let mut last_error = None;
    for &(start, size) in mdas {
        match metadata_text(v, start, size).and_then(|t| parse_metadata(&t, &pv_uuid)) {
            Ok(vg) if newest.as_ref().is_none_or(|n| vg.seqno > n.seqno) => newest = Some(vg),
            Ok(_) => {}
            Err(e) => last_error = Some(e),
        }
    }
    match (newest, last_error) {
        (Some(vg), _) => Ok(vg),
        (None, Some(e)) => Err(e),
        (None, None) => bad("no metadata area holds metadata".into()),
    }
}

/// Where LVM puts a PV's label: its second sector.
const LABEL_SECTOR: u64 = 1;
/// Where its first metadata area starts: after the label's 4 KiB.
const MDA_START: u64 = 4096;

/// The first `pe_start` bytes of a PV holding volume group `vg` as its
/// one PV, `pv_size` bytes long, with `text` (LVM's metadata text, as
/// vgcfgbackup writes it) as the group's metadata: what `pvcreate --uuid
/// --restorefile` and then `vgcfgrestore` write there. The label in sector
/// 1 (the PV header: UUID, size, a data area from `pe_start`, one metadata
/// area from 4 KiB up to `pe_start`; the extension marking it in use), the
/// metadata area's header, the text after it; zeros elsewhere.
pub fn pv_start(vg: &VolumeGroup, text: &str, pv_size: u64) -> Result<Vec<u8>, FsError> {
    let bad = |why: String| Err(FsError::Corrupt(format!("volume group {}: {why}", vg.name)));
    let [pv] = &vg.pvs[..] else {
        return bad(format!("it has {} physical volumes; klon writes groups of one", vg.pvs.len()));
    };
    let uuid: Vec<u8> = pv.uuid.bytes().filter(|&c| c != b'-').collect();
    if uuid.len() != 32 || !uuid.iter().all(u8::is_ascii_alphanumeric) {
        return bad(format!("its PV's UUID {:?} is not LVM's", pv.uuid));
    }
    let mut body = on_disk_text(text, &vg.name)?.into_bytes();
    body.push(0);
    let mda_size = pv.pe_start.saturating_sub(MDA_START);
    if pv.pe_start > 64 << 20 || mda_size < MDA_HEADER_LEN + body.len() as u64 {
        return bad(format!(
            "its first extent at byte {} leaves no room for {} bytes of metadata",
            pv.pe_start,
            body.len()
        ));
    }
    let mut out = vec![0u8; pv.pe_start as usize];
    // The label and PV header.
    let l = (LABEL_SECTOR * 512) as usize;
    let label = &mut out[l..l + 512];
    label[..8].copy_from_slice(b"LABELONE");
    label[8..16].copy_from_slice(&LABEL_SECTOR.to_le_bytes());
    label[20..24].copy_from_slice(&32u32.to_le_bytes());
    label[24..32].copy_from_slice(b"LVM2 001");
    let mut at = 32;
    let mut put = |label: &mut [u8], bytes: &[u8]| {
        label[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(label, &uuid);
    put(label, &pv_size.to_le_bytes());
    for (offset, size) in [(pv.pe_start, 0), (0, 0), (MDA_START, mda_size), (0, 0)] {
        put(label, &offset.to_le_bytes());
        put(label, &size.to_le_bytes());
    }
    // The extension: version 2, in use by a group, no bootloader areas.
    put(label, &2u32.to_le_bytes());
    put(label, &1u32.to_le_bytes());
    let sum = crc(&label[20..]);
    label[16..20].copy_from_slice(&sum.to_le_bytes());
    // The metadata area: its header, then the text.
    let m = MDA_START as usize;
    let text_at = m + MDA_HEADER_LEN as usize;
    out[text_at..text_at + body.len()].copy_from_slice(&body);
    let header = &mut out[m..m + MDA_HEADER_LEN as usize];
    header[4..20].copy_from_slice(MDA_MAGIC);
    header[20..24].copy_from_slice(&1u32.to_le_bytes());
    header[24..32].copy_from_slice(&MDA_START.to_le_bytes());
    header[32..40].copy_from_slice(&mda_size.to_le_bytes());
    header[40..48].copy_from_slice(&MDA_HEADER_LEN.to_le_bytes());
    header[48..56].copy_from_slice(&(body.len() as u64).to_le_bytes());
    header[56..60].copy_from_slice(&crc(&body).to_le_bytes());
    let sum = crc(&header[4..]);
    header[..4].copy_from_slice(&sum.to_le_bytes());
    Ok(out)
}

/// Metadata text as LVM keeps it in a metadata area: the group's section
/// first (LVM's scan takes the group's name from the text's first word),
/// then the top-level settings (`contents`, `version`, …) that a
/// vgcfgbackup file has before it; comments left out.
fn on_disk_text(text: &str, vg: &str) -> Result<String, FsError> {
    let bad = |why: &str| FsError::Corrupt(format!("the metadata text of volume group {vg}: {why}"));
    let mut section: Option<(usize, usize)> = None;
    let mut settings = String::new();
    let mut at = 0;
    let b = text.as_bytes();
    while at < b.len() {
        let line_end = text[at..].find('\n').map_or(b.len(), |i| at + i + 1);
        let line = text[at..line_end].trim();
        let is_start = line.strip_prefix(vg).is_some_and(|r| r.trim_start().starts_with('{'));
        if section.is_none() && is_start {
            let end = section_end(text, at).ok_or_else(|| bad("its section is not closed"))?;
            section = Some((at, end));
            at = end;
            continue;
        }
        let setting = line.split('#').next().unwrap_or("").trim();
        if !setting.is_empty() {
            settings.push_str(setting);
            settings.push('\n');
        }
        at = line_end;
    }
    let (start, end) = section.ok_or_else(|| bad("no section of it"))?;
    Ok(format!("{}\n\n{settings}", text[start..end].trim_end()))
}

/// The byte after the `}` closing the section that starts at `start` (its
/// first `{`), braces in strings and comments not counted.
fn section_end(text: &str, start: usize) -> Option<usize> {
    let (mut depth, mut in_string, mut in_comment, mut escaped) = (0usize, false, false, false);
    for (i, c) in text[start..].char_indices() {
        match c {
            _ if in_comment => in_comment = c != '\n',
            _ if in_string => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    in_string = false;
                }
            }
            '#' => in_comment = true,
            '"' => in_string = true,
            '{' => depth += 1,
            '}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(start + i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// The current metadata text of the area at byte `start` (`size` bytes).
fn metadata_text(v: &Volume, start: u64, size: u64) -> Result<String, FsError> {
    let bad = |why: &str| Err(FsError::Corrupt(format!("the LVM2 metadata area at byte {start}: {why}")));
    let h = v.read_vec(start, MDA_HEADER_LEN)?;
    if &h[4..20] != MDA_MAGIC || le32(&h, 20) != 1 {
        return bad("not a metadata area header klon reads");
    }
    if le32(&h, 0) != crc(&h[4..]) {
        return bad("its header's crc does not match");
    }
    if le64(&h, 24) != start || le64(&h, 32) != size || size <= MDA_HEADER_LEN {
        return bad("its header gives another place or size");
    }
    // The first location is the current text.
    let (off, len, sum) = (le64(&h, 40), le64(&h, 48), le32(&h, 56));
    if off == 0 || len == 0 {
        return bad("it holds no metadata");
    }
    if off < MDA_HEADER_LEN || off >= size || len > size - MDA_HEADER_LEN || len > MAX_TEXT {
        return bad("its metadata's place or length is out of range");
    }
    // The text may wrap to just after the header.
    let first = len.min(size - off);
    let mut text = v.read_vec(start + off, first)?;
    if first < len {
        text.extend(v.read_vec(start + MDA_HEADER_LEN, len - first)?);
    }
    if crc(&text) != sum {
        return bad("its metadata text's crc does not match");
    }
    while text.last() == Some(&0) {
        text.pop();
    }
    String::from_utf8(text).or_else(|_| bad("its metadata text is not UTF-8"))
}

/// A value of the metadata text.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Number(i64),
    Text(String),
    List(Vec<Value>),
    Section(Vec<(String, Value)>),
}

impl Value {
    fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Section(items) => items.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn number(&self, key: &str) -> Result<u64, String> {
        match self.get(key) {
            Some(Value::Number(n)) if *n >= 0 => Ok(*n as u64),
            _ => Err(format!("no number {key}")),
        }
    }

    fn text(&self, key: &str) -> Result<String, String> {
        match self.get(key) {
            Some(Value::Text(t)) => Ok(t.clone()),
            _ => Err(format!("no text {key}")),
        }
    }

    fn sections(&self) -> impl Iterator<Item = (&String, &Value)> {
        let items = match self {
            Value::Section(items) => &items[..],
            _ => &[],
        };
        items.iter().filter(|(_, v)| matches!(v, Value::Section(_))).map(|(k, v)| (k, v))
    }
}

/// Parses LVM's text format: `key = value` (numbers, "strings", [lists])
/// and `name { … }` sections; `#` starts a comment.
fn parse_text(text: &str) -> Result<Value, String> {
    let mut p = Parser { b: text.as_bytes(), at: 0 };
    let items = p.items(0)?;
    p.skip();
    if p.at != p.b.len() {
        return Err(format!("unexpected '{}' at byte {}", p.b[p.at] as char, p.at));
    }
    Ok(Value::Section(items))
}

struct Parser<'a> {
    b: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn skip(&mut self) {
        while let Some(&c) = self.b.get(self.at) {
            if c == b'#' {
                while self.b.get(self.at).is_some_and(|&c| c != b'\n') {
                    self.at += 1;
                }
            } else if c.is_ascii_whitespace() {
                self.at += 1;
            } else {
                break;
            }
        }
    }

    fn name(&mut self) -> Option<String> {
        let from = self.at;
        while self.b.get(self.at).is_some_and(|c| c.is_ascii_alphanumeric() || b"_.+-".contains(c)) {
            self.at += 1;
        }
        (self.at > from).then(|| String::from_utf8_lossy(&self.b[from..self.at]).into_owned())
    }

    fn items(&mut self, depth: usize) -> Result<Vec<(String, Value)>, String> {
        if depth > MAX_DEPTH {
            return Err(format!("sections nested deeper than {MAX_DEPTH}"));
        }
        let mut items = Vec::new();
        loop {
            self.skip();
            match self.b.get(self.at) {
                None | Some(b'}') => return Ok(items),
                _ => {}
            }
            let at = self.at;
            let key = self.name().ok_or_else(|| format!("a name expected at byte {at}"))?;
            self.skip();
            match self.b.get(self.at) {
                Some(b'{') => {
                    self.at += 1;
                    let inner = self.items(depth + 1)?;
                    self.skip();
                    if self.b.get(self.at) != Some(&b'}') {
                        return Err(format!("section {key} is not closed"));
                    }
                    self.at += 1;
                    items.push((key, Value::Section(inner)));
                }
                Some(b'=') => {
                    self.at += 1;
                    let v = self.value(depth)?;
                    items.push((key, v));
                }
                _ => return Err(format!("'=' or '{{' expected after {key} at byte {}", self.at)),
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, String> {
        self.skip();
        let at = self.at;
        match self.b.get(at) {
            Some(b'"') => {
                self.at += 1;
                let mut s = Vec::new();
                loop {
                    match self.b.get(self.at) {
                        None => return Err(format!("a string from byte {at} is not closed")),
                        Some(b'"') => break,
                        Some(b'\\') => {
                            self.at += 1;
                            s.extend(self.b.get(self.at));
                        }
                        Some(&c) => s.push(c),
                    }
                    self.at += 1;
                }
                self.at += 1;
                Ok(Value::Text(String::from_utf8_lossy(&s).into_owned()))
            }
            Some(b'[') => {
                if depth > MAX_DEPTH {
                    return Err(format!("lists nested deeper than {MAX_DEPTH}"));
                }
                self.at += 1;
                let mut list = Vec::new();
                loop {
                    self.skip();
                    if self.b.get(self.at) == Some(&b']') {
                        self.at += 1;
                        return Ok(Value::List(list));
                    }
                    list.push(self.value(depth + 1)?);
                    self.skip();
                    match self.b.get(self.at) {
                        Some(b',') => self.at += 1,
                        Some(b']') => {}
                        _ => return Err(format!("a list from byte {at} is not closed")),
                    }
                }
            }
            Some(c) if c.is_ascii_digit() || *c == b'-' => {
                self.at += 1;
                while self.b.get(self.at).is_some_and(u8::is_ascii_digit) {
                    self.at += 1;
                }
                let s = std::str::from_utf8(&self.b[at..self.at]).expect("ASCII");
                s.parse().map(Value::Number).map_err(|_| format!("number {s} at byte {at} is out of range"))
            }
            _ => Err(format!("a value expected at byte {at}")),
        }
    }
}

/// The volume group the metadata text describes (its one top-level
/// section), as PV `pv_uuid` holds it.
pub fn parse_metadata(text: &str, pv_uuid: &str) -> Result<VolumeGroup, FsError> {
    let bad = |why: String| FsError::Corrupt(format!("the LVM2 metadata text: {why}"));
    let top = parse_text(text).map_err(bad)?;
    let mut vgs = top.sections();
    let (name, vg) = vgs.next().ok_or_else(|| bad("no volume group in it".into()))?;
    let sectors = |v: u64| v.checked_mul(512).ok_or_else(|| bad("a size is out of range".into()));
    let extent_size = sectors(vg.number("extent_size").map_err(bad)?)?;
    if extent_size == 0 {
        return Err(bad("extent_size is 0".into()));
    }
    let mut pvs = Vec::new();
    for (pv_name, pv) in vg.get("physical_volumes").map(|p| p.sections().collect::<Vec<_>>()).unwrap_or_default() {
        pvs.push(PhysicalVolume {
            name: pv_name.clone(),
            uuid: pv.text("id").map_err(|e| bad(format!("PV {pv_name}: {e}")))?,
            pe_start: sectors(pv.number("pe_start").map_err(|e| bad(format!("PV {pv_name}: {e}")))?)?,
            pe_count: pv.number("pe_count").map_err(|e| bad(format!("PV {pv_name}: {e}")))?,
        });
    }
    let mut lvs = Vec::new();
    for (lv_name, lv) in vg.get("logical_volumes").map(|l| l.sections().collect::<Vec<_>>()).unwrap_or_default() {
        let lv_bad = |e: String| bad(format!("LV {lv_name}: {e}"));
        let mut segments = Vec::new();
        for (seg_name, seg) in lv.sections().filter(|(k, _)| k.starts_with("segment")) {
            let seg_bad = |e: String| lv_bad(format!("{seg_name}: {e}"));
            let mut kind = seg.text("type").map_err(seg_bad)?;
            let mut stripes = Vec::new();
            if let Some(Value::List(items)) = seg.get("stripes") {
                for pair in items.chunks(2) {
                    match pair {
                        [Value::Text(pv), Value::Number(n)] if *n >= 0 => stripes.push((pv.clone(), *n as u64)),
                        _ => return Err(seg_bad("its stripes are not pairs of a PV and an extent".into())),
                    }
                }
            }
            if kind == "striped" && stripes.len() == 1 {
                kind = "linear".into();
            }
            let stripe_size = match seg.get("stripe_size") {
                Some(Value::Number(n)) if *n >= 0 => sectors(*n as u64)?,
                _ => 0,
            };
            // A thin segment's fields, when all are there (else the pool
            // is copied whole, with a warning, where it is planned).
            let pool = (kind == "thin-pool")
                .then(|| {
                    Some(PoolSegment {
                        metadata: seg.text("metadata").ok()?,
                        data: seg.text("pool").ok()?,
                        chunk_size: seg.number("chunk_size").ok()?.checked_mul(512)?,
                        transaction_id: seg.number("transaction_id").ok()?,
                    })
                })
                .flatten();
            let thin = (kind == "thin")
                .then(|| {
                    Some(ThinSegment {
                        pool: seg.text("thin_pool").ok()?,
                        device_id: seg.number("device_id").ok()?,
                        origin: seg.text("origin").ok(),
                        external_origin: seg.text("external_origin").ok(),
                    })
                })
                .flatten();
            segments.push(Segment {
                start_extent: seg.number("start_extent").map_err(seg_bad)?,
                extent_count: seg.number("extent_count").map_err(seg_bad)?,
                kind,
                stripes,
                stripe_size,
                pool,
                thin,
            });
        }
        segments.sort_by_key(|s| s.start_extent);
        lvs.push(LogicalVolume {
            name: lv_name.clone(),
            uuid: lv.text("id").map_err(lv_bad)?,
            // (LVM always writes a status; without one, shown.)
            hidden: matches!(lv.get("status"), Some(Value::List(l)) if !l.contains(&Value::Text("VISIBLE".into()))),
            segments,
            method: None,
            fs: None,
            used_bytes: None,
            mapped_bytes: None,
        });
    }
    Ok(VolumeGroup {
        name: name.clone(),
        uuid: vg.text("id").map_err(bad)?,
        seqno: vg.number("seqno").map_err(bad)?,
        extent_size,
        pv_uuid: pv_uuid.to_string(),
        pvs,
        lvs,
    })
}

/// A PV UUID as LVM prints it (32 characters in groups of 6-4-4-4-4-4-6).
pub(crate) fn uuid_of(raw: &[u8]) -> Result<String, FsError> {
    if !raw.iter().all(u8::is_ascii_alphanumeric) {
        return Err(FsError::Corrupt("the PV header's UUID is not LVM's".into()));
    }
    let mut uuid = String::with_capacity(38);
    for (i, &c) in raw.iter().enumerate() {
        if matches!(i, 6 | 10 | 14 | 18 | 22 | 26) {
            uuid.push('-');
        }
        uuid.push(c as char);
    }
    Ok(uuid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"vgt {
id = "yzHROh-e4n0-EgUI-9tDH-qhC7-UoKI-pBlHCC"
seqno = 2
format = "lvm2" # informational
status = ["RESIZEABLE", "READ", "WRITE"]
flags = []
extent_size = 8192
physical_volumes {
pv0 {
id = "syhlGy-rWBn-NvOq-jCnq-vHLA-c22z-4sUjA6"
device = "/dev/loop0"
dev_size = 131072
pe_start = 2048
pe_count = 15
}
}
logical_volumes {
lv2 {
id = "hhhhhh-bbbb-cccc-dddd-eeee-ffff-gggggg"
segment_count = 2
segment2 {
start_extent = 1
extent_count = 2
type = "striped"
stripe_count = 1
stripes = [
"pv0", 2
]
}
segment1 {
start_extent = 0
extent_count = 1
type = "striped"
stripe_count = 1
stripes = ["pv0", 5]
}
}
pool {
id = "pppppp-bbbb-cccc-dddd-eeee-ffff-gggggg"
segment1 {
start_extent = 0
extent_count = 3
type = "thin-pool"
metadata = "pool_tmeta"
pool = "pool_tdata"
}
}
snap {
id = "ssssss-bbbb-cccc-dddd-eeee-ffff-gggggg"
status = ["READ", "VISIBLE"]
segment1 {
start_extent = 0
extent_count = 3
type = "thin"
thin_pool = "pool"
transaction_id = 1
device_id = 4
external_origin = "lv2"
}
}
}
}
# Generated by LVM2
contents = "Text Format Volume Group"
version = 1
description = "a \"quoted\" word"
creation_time = 1796439027
"#;

    #[test]
    fn a_volume_group_reads_with_its_segments_in_order() {
        let vg = parse_metadata(TEXT, "pv-uuid").unwrap();
        assert_eq!((vg.name.as_str(), vg.seqno, vg.extent_size), ("vgt", 2, 4 << 20));
        assert_eq!(vg.pvs[0].pe_start, 1 << 20);
        let lv2 = &vg.lvs[0];
        assert_eq!(lv2.extents(), 3);
        assert_eq!(lv2.segments[0].stripes, vec![("pv0".to_string(), 5)]);
        assert_eq!(lv2.segments[0].linear_on(&vg, "pv0"), Some(((1 << 20) + 5 * (4 << 20), 4 << 20)));
        assert_eq!(lv2.segments[1].kind, "linear");
        assert_eq!(vg.lvs[1].segments[0].kind, "thin-pool");
        assert_eq!(vg.lvs[1].segments[0].linear_on(&vg, "pv0"), None);
        // Without chunk_size and transaction_id the pool's fields are
        // not all there: none (its data volume is copied whole).
        assert_eq!(vg.lvs[1].segments[0].pool, None);
        let thin = vg.lvs[2].segments[0].thin.as_ref().unwrap();
        assert_eq!((thin.pool.as_str(), thin.device_id, thin.origin.as_deref()), ("pool", 4, None));
        assert_eq!(thin.external_origin.as_deref(), Some("lv2"));
        assert_eq!(vg.summary(), "volume group vgt: lv2, pool (thin pool: snap)");
    }

    /// Bytes in memory, read as a disk.
    #[derive(Debug)]
    struct Bytes(Vec<u8>);

    impl ReadAt for Bytes {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> crate::Result<()> {
            let at = offset as usize;
            buf.copy_from_slice(&self.0[at..at + buf.len()]);
            Ok(())
        }

        fn size(&self) -> u64 {
            self.0.len() as u64
        }
    }

    #[test]
    fn a_written_pv_start_reads_back_as_the_same_group() {
        let pv_uuid = "syhlGy-rWBn-NvOq-jCnq-vHLA-c22z-4sUjA6";
        let vg = parse_metadata(TEXT, pv_uuid).unwrap();
        let size = 64u64 << 20;
        let start = pv_start(&vg, TEXT, size).unwrap();
        assert_eq!(start.len() as u64, vg.pvs[0].pe_start);
        let mut disk = start.clone();
        disk.resize(size as usize, 0xA5);
        let back = read(&Volume::new(&Bytes(disk.clone()), 0, size)).unwrap();
        assert_eq!(back, vg);
        // The text in the area starts with the group's section (LVM's scan
        // reads the name there), the settings after it.
        let text_at = 4096 + 512;
        assert!(start[text_at..].starts_with(b"vgt {\nid = "), "{:?}", &start[text_at..text_at + 16]);
        let text = String::from_utf8_lossy(&start[text_at..]);
        assert!(text.contains("}\n\ncontents = \"Text Format Volume Group\"\nversion = 1\n"), "{text}");
        // The PV header: its size, a data area at the first extent, the
        // metadata area from 4 KiB to it.
        assert_eq!(le64(&start, 512 + 64), size);
        assert_eq!((le64(&start, 512 + 72), le64(&start, 512 + 80)), (1 << 20, 0));
        assert_eq!((le64(&start, 512 + 104), le64(&start, 512 + 112)), (4096, (1 << 20) - 4096));
        // A changed byte of the text is caught by its crc.
        disk[4096 + 600] ^= 1;
        assert!(read(&Volume::new(&Bytes(disk), 0, size)).is_err());
        // No room for the text, or a group of two PVs: refused.
        let mut small = vg.clone();
        small.pvs[0].pe_start = 4096 + 1024;
        assert!(pv_start(&small, TEXT, size).unwrap_err().to_string().contains("no room"));
        let mut two = vg.clone();
        two.pvs.push(two.pvs[0].clone());
        assert!(pv_start(&two, TEXT, size).unwrap_err().to_string().contains("2 physical volumes"));
    }

    #[test]
    fn hostile_text_is_refused_with_where() {
        for (text, needle) in [
            ("vg { id = \"x\" ", "not closed"),
            ("vg { extent_size = 99999999999999999999 }", "out of range"),
            (&"a { ".repeat(40), "deeper"),
            ("vg { id = [\"a\", ", "a value expected"),
            ("vg { = 3 }", "a name expected"),
            ("vg { seqno = 1 id = \"u\" extent_size = 0 }", "extent_size is 0"),
            ("x = 1", "no volume group"),
        ] {
            let e = parse_metadata(text, "p").unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
        let bad_stripes = TEXT.replace("stripes = [\"pv0\", 5]", "stripes = [\"pv0\", \"pv1\"]");
        assert!(parse_metadata(&bad_stripes, "p").unwrap_err().to_string().contains("pairs"));
    }
}
