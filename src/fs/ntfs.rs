//! NTFS: the clusters $Bitmap marks used, plus both boot sectors.
//!
//! What is read, in order, all through `Volume` with every value checked:
//! 1. The boot sector: sector and cluster size, the volume's sector count,
//!    where $MFT starts and how large an MFT record is.
//! 2. MFT record 0 ($MFT): the runlist of the MFT itself (following an
//!    $ATTRIBUTE_LIST into extension records if the MFT is fragmented).
//! 3. Record 3 ($Volume): the dirty flag of $VOLUME_INFORMATION.
//! 4. Record 5 (the root directory): its $I30 index, walked to find
//!    hiberfil.sys, whose first bytes tell whether Windows is hibernated
//!    (or was shut down with Fast Startup, which hibernates the kernel).
//! 5. Record 6 ($Bitmap): its $DATA runlist, then the bitmap itself, read
//!    in bounded chunks and turned into cluster ranges.
//!
//! Every MFT and index record gets its update-sequence fixups applied and
//! checked (a torn or damaged record fails the check). The map also holds
//! the boot area and the backup boot sector, which NTFS keeps in the sector
//! after the volume's last sector (the partition's last sector): it is not
//! inside any cluster, so $Bitmap does not cover it.
//!
//! NTFS keeps no free-cluster count on disk (Windows and ntfs-3g count
//! $Bitmap's clear bits at mount), so there is no counter to cross-check;
//! $Bitmap is the authority. It must at least mark the boot area, the
//! $MFT's clusters and its own, or it fails the check.

use super::Extent;
use super::{Driver, FsError, UsedMap, Volume, normalize};

/// The NTFS driver.
pub const DRIVER: Driver = Driver { fstypes: &["ntfs"], used_map };

/// Stride of the update sequence array: one fixup per 512 bytes.
const FIXUP_STRIDE: usize = 512;
/// Largest cluster NTFS allows (Windows 10 1709+: 2 MiB).
const MAX_CLUSTER: u64 = 2 << 20;
/// Bytes of the bitmap read at once.
const BITMAP_CHUNK: u64 = 1 << 20;
/// Largest attribute list accepted (they are a few KiB in practice).
const MAX_ATTR_LIST: u64 = 1 << 20;

const AT_ATTRIBUTE_LIST: u32 = 0x20;
const AT_VOLUME_INFORMATION: u32 = 0x70;
const AT_DATA: u32 = 0x80;
const AT_INDEX_ROOT: u32 = 0x90;
const AT_INDEX_ALLOCATION: u32 = 0xA0;
const AT_END: u32 = 0xFFFF_FFFF;

const REC_MFT: u64 = 0;
const REC_VOLUME: u64 = 3;
const REC_ROOT: u64 = 5;
const REC_BITMAP: u64 = 6;

const VOLUME_IS_DIRTY: u16 = 0x0001;
const MFT_RECORD_IN_USE: u16 = 0x0001;

fn corrupt<T>(msg: impl Into<String>) -> Result<T, FsError> {
    Err(FsError::Corrupt(format!("NTFS: {}", msg.into())))
}

fn get<const N: usize>(b: &[u8], off: usize, what: &str) -> Result<[u8; N], FsError> {
    match off.checked_add(N).and_then(|end| b.get(off..end)) {
        Some(s) => Ok(s.try_into().expect("slice of length N")),
        None => corrupt(format!("{what}: field at {off} lies outside its structure ({} bytes)", b.len())),
    }
}
fn u8_at(b: &[u8], off: usize, what: &str) -> Result<u8, FsError> {
    Ok(get::<1>(b, off, what)?[0])
}
fn u16_at(b: &[u8], off: usize, what: &str) -> Result<u16, FsError> {
    get::<2>(b, off, what).map(u16::from_le_bytes)
}
fn u32_at(b: &[u8], off: usize, what: &str) -> Result<u32, FsError> {
    get::<4>(b, off, what).map(u32::from_le_bytes)
}
fn u64_at(b: &[u8], off: usize, what: &str) -> Result<u64, FsError> {
    get::<8>(b, off, what).map(u64::from_le_bytes)
}
fn sub<'b>(b: &'b [u8], off: usize, len: usize, what: &str) -> Result<&'b [u8], FsError> {
    match off.checked_add(len).and_then(|end| b.get(off..end)) {
        Some(s) => Ok(s),
        None => corrupt(format!("{what}: {len} bytes at {off} lie outside its structure ({} bytes)", b.len())),
    }
}

/// The geometry from the boot sector.
#[derive(Debug, Clone, Copy)]
struct Boot {
    /// Bytes per sector.
    bps: u64,
    /// Bytes per cluster.
    cluster: u64,
    /// Sectors in the volume (the backup boot sector follows them).
    total_sectors: u64,
    /// Whole clusters in the volume: the bits $Bitmap must hold.
    total_clusters: u64,
    /// First cluster of $MFT.
    mft_lcn: u64,
    /// Bytes per MFT record.
    rec_size: u64,
}

fn parse_boot(b: &[u8], part_len: u64) -> Result<Boot, FsError> {
    if sub(b, 3, 8, "boot sector")? != b"NTFS    " {
        return corrupt("no NTFS signature in the boot sector");
    }
    if sub(b, 510, 2, "boot sector")? != [0x55, 0xAA] {
        return corrupt("boot sector lacks the 55 AA end marker");
    }
    let bps = u16_at(b, 0x0B, "boot sector")? as u64;
    if !(256..=4096).contains(&bps) || !bps.is_power_of_two() {
        return corrupt(format!("implausible sector size {bps}"));
    }
    let spc_raw = u8_at(b, 0x0D, "boot sector")?;
    let spc: u64 = match spc_raw {
        1..=0x80 if spc_raw.is_power_of_two() => spc_raw as u64,
        0xE0..=0xFF => 1u64 << (256 - spc_raw as u32),
        _ => return corrupt(format!("implausible sectors-per-cluster value {spc_raw:#x}")),
    };
    let cluster = bps * spc;
    if cluster > MAX_CLUSTER {
        return corrupt(format!("cluster size {cluster} exceeds {MAX_CLUSTER}"));
    }
    let total_sectors = u64_at(b, 0x28, "boot sector")?;
    let vol_bytes = total_sectors.checked_mul(bps).filter(|&v| v <= part_len);
    if total_sectors == 0 || vol_bytes.is_none() {
        return corrupt(format!(
            "the boot sector's {total_sectors} sectors of {bps} bytes do not fit the partition ({part_len} bytes)"
        ));
    }
    let total_clusters = total_sectors / spc;
    if total_clusters == 0 {
        return corrupt("the volume holds no whole cluster");
    }
    let mft_lcn = u64_at(b, 0x30, "boot sector")?;
    let mirr_lcn = u64_at(b, 0x38, "boot sector")?;
    if mft_lcn >= total_clusters || mirr_lcn >= total_clusters {
        return corrupt(format!(
            "$MFT (cluster {mft_lcn}) or $MFTMirr (cluster {mirr_lcn}) lies outside the volume ({total_clusters} clusters)"
        ));
    }
    let cpr = u8_at(b, 0x40, "boot sector")? as i8;
    let rec_size: u64 = if cpr < 0 {
        let shift = -(cpr as i32) as u32;
        if shift > 16 {
            return corrupt(format!("implausible MFT record size 2^{shift}"));
        }
        1u64 << shift
    } else {
        (cpr as u64) * cluster
    };
    if !(1024..=65536).contains(&rec_size) || !rec_size.is_power_of_two() {
        return corrupt(format!("implausible MFT record size {rec_size}"));
    }
    Ok(Boot { bps, cluster, total_sectors, total_clusters, mft_lcn, rec_size })
}

/// Applies and checks the update-sequence fixups of a multi-sector record
/// (MFT "FILE" or index "INDX" record) in place.
fn apply_fixups(buf: &mut [u8], magic: &[u8; 4], what: &str) -> Result<(), FsError> {
    let m = get::<4>(buf, 0, what)?;
    if &m != magic {
        if &m == b"BAAD" {
            return corrupt(format!("{what} is marked BAAD (a multi-sector transfer failed)"));
        }
        return corrupt(format!("{what} lacks its {:?} signature", String::from_utf8_lossy(magic)));
    }
    let usa_ofs = u16_at(buf, 4, what)? as usize;
    let usa_count = u16_at(buf, 6, what)? as usize;
    let sectors = buf.len() / FIXUP_STRIDE;
    if !buf.len().is_multiple_of(FIXUP_STRIDE) || usa_count != sectors + 1 {
        return corrupt(format!("{what}: update sequence of {usa_count} entries for {} bytes", buf.len()));
    }
    if usa_ofs < 8 || !usa_ofs.is_multiple_of(2) || usa_ofs + 2 * usa_count > FIXUP_STRIDE - 2 {
        return corrupt(format!("{what}: update sequence array at implausible offset {usa_ofs}"));
    }
    let usn = get::<2>(buf, usa_ofs, what)?;
    for i in 1..usa_count {
        let end = i * FIXUP_STRIDE - 2;
        if buf[end..end + 2] != usn {
            return corrupt(format!("{what}: update sequence mismatch in sector {} (torn or damaged record)", i - 1));
        }
        let fix = get::<2>(buf, usa_ofs + 2 * i, what)?;
        buf[end..end + 2].copy_from_slice(&fix);
    }
    Ok(())
}

/// One run of a runlist: `len` clusters from virtual cluster `vcn`, at
/// logical cluster `lcn` (None: sparse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    vcn: u64,
    len: u64,
    lcn: Option<u64>,
}

/// Decodes mapping pairs into runs starting at `lowest_vcn`; every run
/// must lie inside the volume and the pairs must end at `highest_vcn`.
fn decode_runs(mp: &[u8], lowest_vcn: u64, highest_vcn: u64, total_clusters: u64) -> Result<Vec<Run>, FsError> {
    let mut runs = Vec::new();
    let mut vcn = lowest_vcn;
    let mut lcn: i64 = 0;
    let mut p = 0usize;
    loop {
        let Some(&h) = mp.get(p) else {
            return corrupt("runlist runs off the end of its attribute");
        };
        if h == 0 {
            break;
        }
        let (ls, os) = ((h & 0x0F) as usize, (h >> 4) as usize);
        if ls == 0 || ls > 8 || os > 8 {
            return corrupt(format!("runlist header byte {h:#04x} is invalid"));
        }
        let lb = sub(mp, p + 1, ls, "runlist")?;
        let mut len = 0u64;
        for (i, &b) in lb.iter().enumerate() {
            len |= (b as u64) << (8 * i);
        }
        if len == 0 || len > (1u64 << 62) {
            return corrupt(format!("runlist run of {len} clusters"));
        }
        let ob = sub(mp, p + 1 + ls, os, "runlist")?;
        let run_lcn = if os == 0 {
            None
        } else {
            let mut delta = 0i64;
            for (i, &b) in ob.iter().enumerate() {
                delta |= (b as i64) << (8 * i);
            }
            if os < 8 && ob[os - 1] & 0x80 != 0 {
                delta |= -1i64 << (8 * os); // sign-extend
            }
            lcn = match lcn.checked_add(delta) {
                Some(l) if l >= 0 => l,
                _ => return corrupt("runlist points before the start of the volume"),
            };
            let l = lcn as u64;
            if l.checked_add(len).is_none_or(|e| e > total_clusters) {
                return corrupt(format!(
                    "runlist run {l}..+{len} reaches past the volume's end ({total_clusters} clusters)"
                ));
            }
            Some(l)
        };
        runs.push(Run { vcn, len, lcn: run_lcn });
        vcn = match vcn.checked_add(len) {
            Some(v) => v,
            None => return corrupt("runlist VCNs overflow"),
        };
        p += 1 + ls + os;
    }
    // An empty attribute has highest_vcn = -1.
    if vcn != highest_vcn.wrapping_add(1) {
        return corrupt(format!("runlist ends at VCN {vcn}, the attribute says {}", highest_vcn.wrapping_add(1)));
    }
    Ok(runs)
}

/// An attribute's value location.
#[derive(Debug, Clone)]
enum Body {
    Resident(Vec<u8>),
    NonResident { lowest_vcn: u64, data_size: u64, init_size: u64, runs: Vec<Run> },
}

#[derive(Debug, Clone)]
struct Attr {
    ty: u32,
    name: Vec<u16>,
    body: Body,
}

#[derive(Debug)]
struct Record {
    flags: u16,
    base_ref: u64,
    attrs: Vec<Attr>,
}

fn utf16(s: &str) -> Vec<u16> {
    s.encode_utf16().collect()
}

/// The values of a (possibly multi-piece) attribute put together.
#[derive(Debug)]
enum Stream {
    Resident(Vec<u8>),
    NonResident { data_size: u64, init_size: u64, runs: Vec<Run> },
}

impl Stream {
    fn data_size(&self) -> u64 {
        match self {
            Stream::Resident(v) => v.len() as u64,
            Stream::NonResident { data_size, .. } => *data_size,
        }
    }
}

struct Ntfs<'a, 'v> {
    vol: &'a Volume<'v>,
    boot: Boot,
    mft_runs: Vec<Run>,
    /// Records the MFT's $DATA holds.
    mft_records: u64,
}

impl Ntfs<'_, '_> {
    /// Reads `len` bytes at byte `off` of a non-resident value. Sparse runs
    /// read as zeros when `sparse_ok`, else they are an error.
    fn read_runs(&self, runs: &[Run], off: u64, len: u64, sparse_ok: bool, what: &str) -> Result<Vec<u8>, FsError> {
        let cs = self.boot.cluster;
        if off.checked_add(len).is_none() {
            return corrupt(format!("{what}: read at {off}..+{len} overflows"));
        }
        let mut out = self.vol_vec(len)?;
        let mut done = 0u64;
        while done < len {
            let pos = off + done;
            let vcn = pos / cs;
            let within = pos % cs;
            let i = runs.partition_point(|r| r.vcn + r.len <= vcn);
            let Some(r) = runs.get(i).filter(|r| r.vcn <= vcn) else {
                return corrupt(format!("{what}: byte {pos} is not mapped by its runlist"));
            };
            let avail = (r.vcn + r.len - vcn).saturating_mul(cs) - within;
            let n = avail.min(len - done);
            let dst = &mut out[done as usize..(done + n) as usize];
            match r.lcn {
                Some(lcn) => self.vol.read_at(dst, (lcn + (vcn - r.vcn)) * cs + within)?,
                None if sparse_ok => dst.fill(0),
                None => return corrupt(format!("{what}: sparse where it must not be")),
            }
            done += n;
        }
        Ok(out)
    }

    fn vol_vec(&self, len: u64) -> Result<Vec<u8>, FsError> {
        if len > super::MAX_METADATA_READ {
            return corrupt(format!("metadata read of {len} bytes is implausibly large"));
        }
        Ok(vec![0u8; len as usize])
    }

    fn read_record(&self, n: u64) -> Result<Record, FsError> {
        if n >= self.mft_records {
            return corrupt(format!("MFT record {n} is beyond the MFT's {} records", self.mft_records));
        }
        let what = format!("MFT record {n}");
        let buf = self.read_runs(&self.mft_runs, n * self.boot.rec_size, self.boot.rec_size, false, &what)?;
        parse_record(buf, self.boot.total_clusters, &what)
    }

    /// The value of attribute `ty` named `name` of base record `n`,
    /// gathered across extension records when it has an attribute list.
    fn stream(&self, n: u64, ty: u32, name: &[u16]) -> Result<Option<Stream>, FsError> {
        let base = self.read_record(n)?;
        if base.flags & MFT_RECORD_IN_USE == 0 {
            return corrupt(format!("MFT record {n} is not in use"));
        }
        self.stream_of(&base, n, ty, name)
    }

    fn stream_of(&self, base: &Record, n: u64, ty: u32, name: &[u16]) -> Result<Option<Stream>, FsError> {
        let mut pieces: Vec<Attr> = Vec::new();
        if let Some(list) = base.attrs.iter().find(|a| a.ty == AT_ATTRIBUTE_LIST) {
            let value = match &list.body {
                Body::Resident(v) => v.clone(),
                Body::NonResident { data_size, init_size, runs, .. } => {
                    if *data_size > MAX_ATTR_LIST || init_size < data_size {
                        return corrupt(format!("MFT record {n}: attribute list of {data_size} bytes"));
                    }
                    self.read_runs(runs, 0, *data_size, false, "attribute list")?
                }
            };
            let mut wanted: Vec<(u64, u64)> = Vec::new(); // (lowest_vcn, record)
            let mut p = 0usize;
            while p < value.len() {
                let e_ty = u32_at(&value, p, "attribute list")?;
                let e_len = u16_at(&value, p + 4, "attribute list")? as usize;
                if e_len < 0x1A || p + e_len > value.len() {
                    return corrupt(format!("MFT record {n}: attribute list entry of {e_len} bytes"));
                }
                let nl = u8_at(&value, p + 6, "attribute list")? as usize;
                let no = u8_at(&value, p + 7, "attribute list")? as usize;
                let e_name = sub(&value, p + no, 2 * nl, "attribute list name")?;
                if no + 2 * nl > e_len {
                    return corrupt(format!("MFT record {n}: attribute list name outside its entry"));
                }
                if e_ty == ty && le_u16s(e_name) == name {
                    let vcn = u64_at(&value, p + 8, "attribute list")?;
                    let rec = u64_at(&value, p + 0x10, "attribute list")? & 0xFFFF_FFFF_FFFF;
                    wanted.push((vcn, rec));
                }
                p += e_len;
            }
            let mut cache: Vec<(u64, Record)> = Vec::new();
            for (vcn, rec) in wanted {
                if !cache.iter().any(|(r, _)| *r == rec) {
                    if rec == n {
                        cache.push((rec, Record { flags: base.flags, base_ref: 0, attrs: base.attrs.clone() }));
                    } else {
                        let r = self.read_record(rec)?;
                        if r.flags & MFT_RECORD_IN_USE == 0 || r.base_ref & 0xFFFF_FFFF_FFFF != n {
                            return corrupt(format!("MFT record {rec} is not an extension of record {n}"));
                        }
                        cache.push((rec, r));
                    }
                }
                let r = &cache.iter().find(|(r, _)| *r == rec).expect("just cached").1;
                let piece = r
                    .attrs
                    .iter()
                    .find(|a| {
                        a.ty == ty
                            && a.name == name
                            && match &a.body {
                                Body::NonResident { lowest_vcn, .. } => *lowest_vcn == vcn,
                                Body::Resident(_) => vcn == 0,
                            }
                    })
                    .ok_or_else(|| {
                        FsError::Corrupt(format!(
                            "NTFS: attribute {ty:#x} piece at VCN {vcn} of record {n} missing from record {rec}"
                        ))
                    })?;
                pieces.push(piece.clone());
            }
        } else {
            pieces.extend(base.attrs.iter().filter(|a| a.ty == ty && a.name == name).cloned());
        }
        if pieces.is_empty() {
            return Ok(None);
        }
        if let [Attr { body: Body::Resident(v), .. }] = pieces.as_slice() {
            return Ok(Some(Stream::Resident(v.clone())));
        }
        let mut all: Vec<(u64, u64, u64, Vec<Run>)> = Vec::new();
        for p in pieces {
            match p.body {
                Body::Resident(_) => {
                    return corrupt(format!("MFT record {n}: attribute {ty:#x} in several resident pieces"));
                }
                Body::NonResident { lowest_vcn, data_size, init_size, runs } => {
                    all.push((lowest_vcn, data_size, init_size, runs))
                }
            }
        }
        all.sort_by_key(|p| p.0);
        if all[0].0 != 0 {
            return corrupt(format!("MFT record {n}: attribute {ty:#x} has no piece at VCN 0"));
        }
        let (data_size, init_size) = (all[0].1, all[0].2);
        let mut runs: Vec<Run> = Vec::new();
        for (lowest, _, _, r) in all {
            let next = runs.last().map_or(0, |l| l.vcn + l.len);
            if lowest != next {
                return corrupt(format!("MFT record {n}: attribute {ty:#x} pieces are not contiguous at VCN {lowest}"));
            }
            runs.extend(r);
        }
        let mapped = runs.last().map_or(0, |l| l.vcn + l.len);
        if mapped.checked_mul(self.boot.cluster).is_none_or(|m| m < data_size) || init_size > data_size {
            return corrupt(format!(
                "MFT record {n}: attribute {ty:#x} maps {mapped} clusters for {data_size} bytes (initialized {init_size})"
            ));
        }
        Ok(Some(Stream::NonResident { data_size, init_size, runs }))
    }

    /// Reads `len` bytes at `off` of a stream; bytes past the initialized
    /// size read as zeros, past the data size are an error.
    fn read_stream(&self, s: &Stream, off: u64, len: u64, what: &str) -> Result<Vec<u8>, FsError> {
        let end = off.checked_add(len).filter(|&e| e <= s.data_size());
        if end.is_none() {
            return corrupt(format!("{what}: {len} bytes at {off} lie past its end ({} bytes)", s.data_size()));
        }
        match s {
            Stream::Resident(v) => Ok(v[off as usize..(off + len) as usize].to_vec()),
            Stream::NonResident { init_size, runs, .. } => {
                let mut out = self.read_runs(runs, off, len, true, what)?;
                if off + len > *init_size {
                    let from = init_size.saturating_sub(off) as usize;
                    out[from..].fill(0);
                }
                Ok(out)
            }
        }
    }
}

fn le_u16s(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}

/// Parses an MFT record (fixups applied here) into its attributes.
fn parse_record(mut buf: Vec<u8>, total_clusters: u64, what: &str) -> Result<Record, FsError> {
    apply_fixups(&mut buf, b"FILE", what)?;
    let flags = u16_at(&buf, 0x16, what)?;
    let attrs_off = u16_at(&buf, 0x14, what)? as usize;
    let in_use = u32_at(&buf, 0x18, what)? as usize;
    let base_ref = u64_at(&buf, 0x20, what)?;
    if in_use > buf.len() || attrs_off < 0x30 || !attrs_off.is_multiple_of(8) || attrs_off + 4 > in_use {
        return corrupt(format!("{what}: attributes at {attrs_off}, {in_use} bytes in use of {}", buf.len()));
    }
    let b = &buf[..in_use];
    let mut attrs = Vec::new();
    let mut p = attrs_off;
    loop {
        let ty = u32_at(b, p, what)?;
        if ty == AT_END {
            break;
        }
        let alen = u32_at(b, p + 4, what)? as usize;
        if alen < 0x18 || !alen.is_multiple_of(8) || p.checked_add(alen).is_none_or(|e| e > in_use) {
            return corrupt(format!("{what}: attribute {ty:#x} of {alen} bytes at {p}"));
        }
        let a = &b[p..p + alen];
        let aw = format!("{what} attribute {ty:#x}");
        let non_res = u8_at(a, 8, &aw)?;
        let nl = u8_at(a, 9, &aw)? as usize;
        let no = u16_at(a, 10, &aw)? as usize;
        let name = le_u16s(sub(a, no, 2 * nl, &aw)?);
        let body = match non_res {
            0 => {
                let vlen = u32_at(a, 0x10, &aw)? as usize;
                let voff = u16_at(a, 0x14, &aw)? as usize;
                Body::Resident(sub(a, voff, vlen, &aw)?.to_vec())
            }
            1 => {
                if alen < 0x40 {
                    return corrupt(format!("{aw}: non-resident header of {alen} bytes"));
                }
                let lowest_vcn = u64_at(a, 0x10, &aw)?;
                let highest_vcn = u64_at(a, 0x18, &aw)?;
                let mp_off = u16_at(a, 0x20, &aw)? as usize;
                let data_size = u64_at(a, 0x30, &aw)?;
                let init_size = u64_at(a, 0x38, &aw)?;
                if mp_off < 0x40 || mp_off >= alen {
                    return corrupt(format!("{aw}: mapping pairs at {mp_off}"));
                }
                let runs = decode_runs(&a[mp_off..], lowest_vcn, highest_vcn, total_clusters)
                    .map_err(|e| FsError::Corrupt(format!("{aw}: {e}")))?;
                Body::NonResident { lowest_vcn, data_size, init_size, runs }
            }
            _ => return corrupt(format!("{aw}: non-resident flag {non_res}")),
        };
        attrs.push(Attr { ty, name, body });
        p += alen;
    }
    Ok(Record { flags, base_ref, attrs })
}

/// Opens the volume: boot sector, then $MFT's own runlist.
fn open<'a, 'v>(vol: &'a Volume<'v>) -> Result<Ntfs<'a, 'v>, FsError> {
    let mut bs = [0u8; 512];
    vol.read_at(&mut bs, 0)?;
    let boot = parse_boot(&bs, vol.len)?;
    // Record 0 sits at the MFT's first cluster; read it directly to learn
    // where the rest of the MFT is.
    let rec0_runs = [Run { vcn: 0, len: boot.rec_size.div_ceil(boot.cluster), lcn: Some(boot.mft_lcn) }];
    if boot.mft_lcn + rec0_runs[0].len > boot.total_clusters {
        return corrupt("$MFT's first record lies past the volume's end");
    }
    let mut fs = Ntfs { vol, boot, mft_runs: rec0_runs.to_vec(), mft_records: 1 };
    let rec0 = fs.read_record(REC_MFT)?;
    if rec0.flags & MFT_RECORD_IN_USE == 0 {
        return corrupt("$MFT's record is not in use");
    }
    // The piece at VCN 0 is in record 0 itself; with it the extension
    // records an attribute list names can be read.
    let first = rec0
        .attrs
        .iter()
        .find(|a| a.ty == AT_DATA && a.name.is_empty() && matches!(a.body, Body::NonResident { lowest_vcn: 0, .. }))
        .ok_or_else(|| FsError::Corrupt("NTFS: $MFT has no non-resident $DATA at VCN 0".into()))?;
    let Body::NonResident { data_size, runs, .. } = &first.body else { unreachable!() };
    if runs.first().is_none_or(|r| r.lcn != Some(boot.mft_lcn)) {
        return corrupt("$MFT's $DATA does not start where the boot sector says");
    }
    let records = data_size / boot.rec_size;
    fs.mft_runs = runs.clone();
    fs.mft_records = records;
    let Some(Stream::NonResident { runs, data_size, .. }) = fs.stream_of(&rec0, REC_MFT, AT_DATA, &[])? else {
        return corrupt("$MFT's $DATA is resident");
    };
    if runs.iter().any(|r| r.lcn.is_none()) {
        return corrupt("$MFT's $DATA is sparse");
    }
    fs.mft_runs = runs;
    fs.mft_records = data_size / boot.rec_size;
    if fs.mft_records <= REC_BITMAP {
        return corrupt(format!("$MFT holds only {} records", fs.mft_records));
    }
    Ok(fs)
}

/// Unclean if $Volume's dirty flag is set.
fn check_dirty(fs: &Ntfs) -> Result<(), FsError> {
    let Some(Stream::Resident(vi)) = fs.stream(REC_VOLUME, AT_VOLUME_INFORMATION, &[])? else {
        return corrupt("$Volume has no resident $VOLUME_INFORMATION");
    };
    let major = u8_at(&vi, 8, "$VOLUME_INFORMATION")?;
    if !(1..=3).contains(&major) {
        return corrupt(format!("unknown NTFS version {major}"));
    }
    let flags = u16_at(&vi, 0x0A, "$VOLUME_INFORMATION")?;
    if flags & VOLUME_IS_DIRTY != 0 {
        return Err(FsError::Unclean("NTFS is marked dirty: run chkdsk /f in Windows".into()));
    }
    Ok(())
}

/// Walks an index node's entries: returns the file reference of an entry
/// named `name` (ASCII, case-insensitive) and pushes the child VCNs.
fn scan_entries(node: &[u8], name: &[u8], children: &mut Vec<u64>, what: &str) -> Result<Option<u64>, FsError> {
    let entries_off = u32_at(node, 0, what)? as usize;
    let in_use = u32_at(node, 4, what)? as usize;
    if in_use > node.len() || entries_off < 16 || entries_off > in_use {
        return corrupt(format!("{what}: index header (entries at {entries_off}, {in_use} bytes in use)"));
    }
    let b = &node[..in_use];
    let mut p = entries_off;
    loop {
        let len = u16_at(b, p + 8, what)? as usize;
        let key_len = u16_at(b, p + 10, what)? as usize;
        let flags = u16_at(b, p + 12, what)?;
        if len < 16 || !len.is_multiple_of(8) || p + len > in_use {
            return corrupt(format!("{what}: index entry of {len} bytes at {p}"));
        }
        let e = &b[p..p + len];
        if flags & 0x01 != 0 {
            if len < 24 {
                return corrupt(format!("{what}: index entry too short for its child pointer"));
            }
            children.push(u64_at(e, len - 8, what)?);
        }
        if flags & 0x02 != 0 {
            return Ok(None);
        }
        let key = sub(e, 16, key_len, what)?;
        let nl = u8_at(key, 0x40, what)? as usize;
        let kname = sub(key, 0x42, 2 * nl, what)?;
        if nl == name.len() && kname.chunks_exact(2).zip(name).all(|(c, &n)| c[1] == 0 && c[0].eq_ignore_ascii_case(&n))
        {
            return Ok(Some(u64_at(e, 0, what)? & 0xFFFF_FFFF_FFFF));
        }
        p += len;
    }
}

/// The MFT record of `name` in the root directory, by walking its whole
/// $I30 index (a small tree; every live node is visited at most once).
fn find_in_root(fs: &Ntfs, name: &str) -> Result<Option<u64>, FsError> {
    let i30 = utf16("$I30");
    let root = fs.read_record(REC_ROOT)?;
    if root.flags & 0x03 != 0x03 {
        return corrupt("the root directory's record is not an in-use directory");
    }
    let Some(Stream::Resident(ir)) = fs.stream_of(&root, REC_ROOT, AT_INDEX_ROOT, &i30)? else {
        return corrupt("the root directory has no resident $INDEX_ROOT");
    };
    let block_size = u32_at(&ir, 8, "$INDEX_ROOT")? as u64;
    let mut children = Vec::new();
    if let Some(r) = scan_entries(
        sub(&ir, 16, ir.len().saturating_sub(16), "$INDEX_ROOT")?,
        name.as_bytes(),
        &mut children,
        "root index",
    )? {
        return Ok(Some(r));
    }
    if children.is_empty() {
        return Ok(None);
    }
    if !(512..=65536).contains(&block_size) || !block_size.is_power_of_two() {
        return corrupt(format!("root index block size {block_size}"));
    }
    let Some(alloc) = fs.stream_of(&root, REC_ROOT, AT_INDEX_ALLOCATION, &i30)? else {
        return corrupt("the root index has children but no $INDEX_ALLOCATION");
    };
    let vcn_unit = if block_size >= fs.boot.cluster { fs.boot.cluster } else { 512 };
    let max_blocks = alloc.data_size() / block_size;
    let mut visited: Vec<u64> = Vec::new();
    while let Some(vcn) = children.pop() {
        if visited.contains(&vcn) {
            return corrupt(format!("root index block {vcn} is reached twice"));
        }
        if visited.len() as u64 >= max_blocks {
            return corrupt("root index has more nodes than its allocation holds");
        }
        visited.push(vcn);
        let what = format!("root index block at VCN {vcn}");
        let off = vcn.checked_mul(vcn_unit).ok_or_else(|| FsError::Corrupt(format!("NTFS: {what} overflows")))?;
        let mut blk = fs.read_stream(&alloc, off, block_size, &what)?;
        apply_fixups(&mut blk, b"INDX", &what)?;
        if u64_at(&blk, 0x10, &what)? != vcn {
            return corrupt(format!("{what} says it is at VCN {}", u64_at(&blk, 0x10, &what)?));
        }
        if let Some(r) = scan_entries(&blk[0x18..], name.as_bytes(), &mut children, &what)? {
            return Ok(Some(r));
        }
    }
    Ok(None)
}

/// Unclean if hiberfil.sys holds a hibernation image (also what Fast
/// Startup leaves behind).
fn check_hibernation(fs: &Ntfs) -> Result<(), FsError> {
    let Some(rec) = find_in_root(fs, "hiberfil.sys")? else { return Ok(()) };
    let Some(data) = fs.stream(rec, AT_DATA, &[])? else { return Ok(()) };
    if data.data_size() < 4 {
        return Ok(());
    }
    let head = fs.read_stream(&data, 0, 4, "hiberfil.sys")?;
    if head == b"hibr" || head == b"HIBR" {
        return Err(FsError::Unclean(
            "Windows is hibernated or was shut down with Fast Startup: boot it and shut down fully".into(),
        ));
    }
    Ok(())
}

/// Turns set bits of `bits` (bit 0 = cluster `first`) into cluster runs,
/// stopping at `limit` clusters; `cur` carries an open run across chunks.
fn bits_to_runs(bits: &[u8], first: u64, limit: u64, cur: &mut Option<u64>, out: &mut Vec<(u64, u64)>) {
    for (i, &byte) in bits.iter().enumerate() {
        let c0 = first + 8 * i as u64;
        if c0 >= limit {
            break;
        }
        if c0 + 8 <= limit && (byte == 0 || byte == 0xFF) {
            match (byte, *cur) {
                (0, Some(s)) => {
                    out.push((s, c0 - s));
                    *cur = None;
                }
                (0xFF, None) => *cur = Some(c0),
                _ => {}
            }
            continue;
        }
        for bit in 0..8 {
            let c = c0 + bit;
            if c >= limit {
                break;
            }
            match (byte >> bit & 1 != 0, *cur) {
                (false, Some(s)) => {
                    out.push((s, c - s));
                    *cur = None;
                }
                (true, None) => *cur = Some(c),
                _ => {}
            }
        }
    }
}

/// Whether clusters `lcn..+len` are all inside the (sorted, merged) runs.
fn covered(runs: &[(u64, u64)], lcn: u64, len: u64) -> bool {
    let i = runs.partition_point(|r| r.0 + r.1 <= lcn);
    runs.get(i).is_some_and(|r| r.0 <= lcn && lcn + len <= r.0 + r.1)
}

fn used_map(vol: &Volume) -> Result<UsedMap, FsError> {
    let fs = open(vol)?;
    check_dirty(&fs)?;
    check_hibernation(&fs)?;
    let boot = fs.boot;
    let Some(bitmap) = fs.stream(REC_BITMAP, AT_DATA, &[])? else {
        return corrupt("$Bitmap has no $DATA");
    };
    let need = boot.total_clusters.div_ceil(8);
    if bitmap.data_size() < need {
        return corrupt(format!(
            "$Bitmap holds {} bits for {} clusters",
            bitmap.data_size().saturating_mul(8),
            boot.total_clusters
        ));
    }
    if let Stream::NonResident { init_size, .. } = &bitmap
        && *init_size < need
    {
        return corrupt(format!("$Bitmap is initialized for only {init_size} of {need} bytes"));
    }
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut cur = None;
    let mut off = 0u64;
    while off < need {
        let n = BITMAP_CHUNK.min(need - off);
        let chunk = fs.read_stream(&bitmap, off, n, "$Bitmap")?;
        bits_to_runs(&chunk, off * 8, boot.total_clusters, &mut cur, &mut runs);
        off += n;
    }
    if let Some(s) = cur {
        runs.push((s, boot.total_clusters - s));
    }
    // The bitmap must at least account for the boot area, the MFT and
    // itself; if not, it is not to be trusted.
    let boot_clusters = 8192u64.div_ceil(boot.cluster).min(boot.total_clusters);
    let mut must: Vec<(u64, u64, &str)> = vec![(0, boot_clusters, "the boot area")];
    must.extend(fs.mft_runs.iter().filter_map(|r| r.lcn.map(|l| (l, r.len, "$MFT"))));
    if let Stream::NonResident { runs: br, .. } = &bitmap {
        must.extend(br.iter().filter_map(|r| r.lcn.map(|l| (l, r.len, "$Bitmap"))));
    }
    for (lcn, len, what) in must {
        if !covered(&runs, lcn, len) {
            return corrupt(format!("$Bitmap marks clusters {lcn}..+{len} of {what} free"));
        }
    }
    let cs = boot.cluster;
    let mut extents: Vec<Extent> = runs.iter().map(|&(s, l)| (s * cs, l * cs)).collect();
    drop(runs);
    let vol_bytes = boot.total_sectors * boot.bps;
    extents.push((0, 8192.min(vol_bytes)));
    // The backup boot sector: the sector right after the volume, which is
    // the partition's last sector as Windows and mkntfs lay it out.
    // Should the partition extend further, its last sector too (where
    // tools that look for the backup at the partition's end find it).
    let mut total_bytes = vol_bytes;
    if vol_bytes + boot.bps <= vol.len {
        extents.push((vol_bytes, boot.bps));
        extents.push((vol.len - boot.bps, boot.bps));
        total_bytes = vol_bytes + boot.bps;
    }
    let (extents, used_bytes) = normalize(extents, vol.len)?;
    Ok(UsedMap { block_size: cs as u32, total_bytes, used_bytes, extents })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Disk;
    use crate::testutil::{Rng, TempDir, sh, unmount};
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command};

    /// An ntfs-3g FUSE mount of an image file, unmounted (and the daemon
    /// waited for, so everything is written) on drop.
    struct Mount {
        dir: PathBuf,
        child: Child,
        mounted: bool,
    }
    impl Mount {
        fn new(file: &Path, dir: &Path) -> Mount {
            Mount::with_options(file, dir, "no_detach")
        }
        fn with_options(file: &Path, dir: &Path, opts: &str) -> Mount {
            std::fs::create_dir_all(dir).unwrap();
            let child = Command::new("ntfs-3g")
                .args(["-o", opts])
                .arg(file)
                .arg(dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("running ntfs-3g");
            let mut m = Mount { dir: dir.to_path_buf(), child, mounted: false };
            let want = format!(" {} ", dir.display());
            for _ in 0..100 {
                let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
                if mi.lines().any(|l| l.contains(&want) && l.contains(" fuse")) {
                    m.mounted = true;
                    return m;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            panic!("ntfs-3g did not mount {}", file.display());
        }
        fn unmount(mut self) {
            self.finish();
        }
        fn finish(&mut self) {
            if self.mounted {
                self.mounted = false;
                if !unmount(&self.dir) {
                    let _ = self.child.kill();
                }
                let _ = self.child.wait();
            }
        }
    }
    impl Drop for Mount {
        fn drop(&mut self) {
            if self.mounted {
                unmount(&self.dir);
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }

    fn mkntfs(file: &Path, size: u64, cluster: u32) {
        std::fs::File::create(file).unwrap().set_len(size).unwrap();
        sh("mkntfs", &["-F", "-Q", "-q", "-c", &cluster.to_string(), "-L", "klon", file.to_str().unwrap()]);
    }

    /// Fills roughly `fill` bytes with files of varied sizes (some tiny and
    /// resident, some fragmented by deleting every other file).
    fn populate(file: &Path, mnt: &Path, fill: u64, seed: u64, holes: bool) {
        let m = Mount::new(file, mnt);
        let sub = mnt.join("dir/sub");
        std::fs::create_dir_all(&sub).unwrap();
        let mut rng = Rng(seed | 1);
        let mut written = 0u64;
        let mut i = 0;
        while written < fill {
            let len = match rng.next() % 4 {
                0 => (rng.next() % 600) as usize,
                1 => (rng.next() % 20000) as usize,
                _ => (rng.next() % 300_000) as usize,
            };
            let len = len.min((fill - written) as usize);
            let dir = if i % 3 == 0 { &sub } else { mnt };
            if std::fs::write(dir.join(format!("f{i}.bin")), Rng((seed + i) | 1).low_bytes(len)).is_err() {
                break; // full
            }
            written += len as u64;
            i += 1;
        }
        // Free every fifth file so free space is fragmented.
        for j in (0..if holes { i } else { 0 }).step_by(5) {
            let dir = if j % 3 == 0 { &sub } else { mnt };
            let _ = std::fs::remove_file(dir.join(format!("f{j}.bin")));
        }
        m.unmount();
    }

    /// Used clusters according to ntfsclone's special image (one command
    /// byte per cluster run: 0 = gap of n clusters, 1 = one used cluster
    /// followed by its bytes), as cluster runs; also its cluster count.
    fn ntfsclone_used(file: &Path, tmp: &Path) -> (Vec<(u64, u64)>, u64, u64) {
        let img = tmp.join("clone.simg");
        let _ = std::fs::remove_file(&img);
        sh("ntfsclone", &["-q", "--save-image", "-o", img.to_str().unwrap(), file.to_str().unwrap()]);
        let d = std::fs::read(&img).unwrap();
        std::fs::remove_file(&img).unwrap();
        assert_eq!(&d[..16], b"\0ntfsclone-image");
        let cs = u32::from_le_bytes(d[0x12..0x16].try_into().unwrap()) as usize;
        let nr = u64::from_le_bytes(d[0x1e..0x26].try_into().unwrap());
        let inuse = u64::from_le_bytes(d[0x26..0x2e].try_into().unwrap());
        let mut p = u32::from_le_bytes(d[0x2e..0x32].try_into().unwrap()) as usize;
        let mut c = 0u64;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        while p < d.len() {
            match d[p] {
                0 => {
                    c += u64::from_le_bytes(d[p + 1..p + 9].try_into().unwrap());
                    p += 9;
                }
                1 => {
                    // Past the volume: ntfsclone's copy of the backup boot sector.
                    if c < nr {
                        match runs.last_mut() {
                            Some(l) if l.0 + l.1 == c => l.1 += 1,
                            _ => runs.push((c, 1)),
                        }
                    }
                    c += 1;
                    p += 1 + cs;
                }
                x => panic!("ntfsclone image: unknown command {x}"),
            }
        }
        (runs, nr, inuse)
    }

    fn map(file: &Path) -> Result<UsedMap, FsError> {
        let d = Disk::open_source(file).unwrap();
        let v = Volume::new(&d, 0, d.size);
        used_map(&v)
    }

    /// Compares used_map with ntfsclone's used clusters, exactly.
    fn check_against_ntfsclone(file: &Path, tmp: &Path, cluster: u64) -> UsedMap {
        let m = map(file).unwrap_or_else(|e| panic!("used_map: {e}"));
        let (runs, nr, inuse) = ntfsclone_used(file, tmp);
        let size = std::fs::metadata(file).unwrap().len();
        assert_eq!(m.block_size as u64, cluster);
        let vol_bytes = (size / 512 - 1) * 512;
        assert_eq!(nr, vol_bytes / cluster, "cluster count");
        let mut want: Vec<Extent> = runs.iter().map(|&(s, l)| (s * cluster, l * cluster)).collect();
        want.push((0, 8192));
        want.push((vol_bytes, 512));
        let (want, want_used) = normalize(want, size).unwrap();
        assert_eq!(runs.iter().map(|r| r.1).sum::<u64>(), inuse, "ntfsclone's own count");
        assert_eq!(m.extents, want, "used clusters differ from ntfsclone's");
        assert_eq!(m.used_bytes, want_used);
        assert_eq!(m.total_bytes, size);
        m
    }

    fn ntfsfix_clean(file: &Path) {
        let out = sh("ntfsfix", &["-n", file.to_str().unwrap()]);
        assert!(!out.contains("BAD") && !out.contains("rror"), "ntfsfix -n: {out}");
    }

    #[test]
    fn matches_ntfsclone_in_several_layouts() {
        let t = TempDir::new("layouts");
        let f = t.0.join("fs.img");
        let mnt = t.0.join("mnt");
        // (partition size, cluster size, bytes of files)
        let cases: [(u64, u32, u64); 7] = [
            (8 << 20, 512, 0),
            (24 << 20, 512, 10 << 20),
            ((48 << 20) + 3 * 512, 1024, 20 << 20),
            (64 << 20, 4096, 40 << 20),
            (64 << 20, 4096, 61 << 20), // nearly full
            ((96 << 20) + 7 * 512, 16384, 30 << 20),
            (128 << 20, 65536, 60 << 20),
        ];
        for (i, &(size, cluster, fill)) in cases.iter().enumerate() {
            mkntfs(&f, size, cluster);
            if fill > 0 {
                populate(&f, &mnt, fill, i as u64 + 1, i != 4);
            }
            ntfsfix_clean(&f);
            let m = check_against_ntfsclone(&f, &t.0, cluster as u64);
            eprintln!(
                "case {i}: {size} bytes, cluster {cluster}: {} used in {} extents",
                m.used_bytes,
                m.extents.len()
            );
        }
    }

    #[test]
    fn bitmap_only_counts_whole_clusters() {
        // A partition whose sector count is not a multiple of the cluster:
        // the tail sectors are outside every cluster; the backup boot
        // sector still is the last sector.
        let t = TempDir::new("tail");
        let f = t.0.join("fs.img");
        let size = (32 << 20) + 5 * 512;
        mkntfs(&f, size, 4096);
        let m = check_against_ntfsclone(&f, &t.0, 4096);
        assert_eq!(*m.extents.last().unwrap(), (size - 512, 512));
    }

    /// Byte offsets (in the image file) of $VOLUME_INFORMATION's flags in
    /// $MFT and in $MFTMirr.
    fn volume_flags_offsets(file: &Path) -> [u64; 2] {
        let img = std::fs::read(file).unwrap();
        let boot = parse_boot(&img[..512], img.len() as u64).unwrap();
        let rec_off = boot.mft_lcn * boot.cluster + REC_VOLUME * boot.rec_size;
        let rec = &img[rec_off as usize..(rec_off + boot.rec_size) as usize];
        let mut p = u16::from_le_bytes([rec[0x14], rec[0x15]]) as usize;
        loop {
            let ty = u32::from_le_bytes(rec[p..p + 4].try_into().unwrap());
            let len = u32::from_le_bytes(rec[p + 4..p + 8].try_into().unwrap()) as usize;
            assert_ne!(ty, AT_END, "no $VOLUME_INFORMATION");
            if ty == AT_VOLUME_INFORMATION {
                let voff = u16::from_le_bytes([rec[p + 0x14], rec[p + 0x15]]) as usize;
                let pos = p + voff + 0x0A;
                assert!(pos % 512 < 510, "flags fall on a fixup slot");
                let mirr_lcn = u64::from_le_bytes(img[0x38..0x40].try_into().unwrap());
                return [rec_off + pos as u64, mirr_lcn * boot.cluster + REC_VOLUME * boot.rec_size + pos as u64];
            }
            p += len;
        }
    }

    #[test]
    fn dirty_volume_is_unclean() {
        let t = TempDir::new("dirty");
        let f = t.0.join("fs.img");
        mkntfs(&f, 16 << 20, 4096);
        map(&f).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&f).unwrap();
        for off in volume_flags_offsets(&f) {
            file.write_all_at(&VOLUME_IS_DIRTY.to_le_bytes(), off).unwrap();
        }
        drop(file);
        // ntfs-3g's own view agrees the flag is set.
        let info = sh("ntfsinfo", &["-f", "-m", f.to_str().unwrap()]);
        assert!(info.contains("Volume Flags: 0x0001"), "{info}");
        match map(&f) {
            Err(FsError::Unclean(m)) => assert!(m.contains("chkdsk"), "{m}"),
            r => panic!("dirty volume: {r:?}"),
        }
        sh("ntfsfix", &["-d", f.to_str().unwrap()]);
        map(&f).unwrap();
    }

    #[test]
    fn hibernated_windows_is_unclean() {
        let t = TempDir::new("hiber");
        let f = t.0.join("fs.img");
        let mnt = t.0.join("mnt");
        // (signature, cluster size, extra root entries): with many entries
        // the root index has index blocks; with 64 KiB clusters their VCNs
        // count 512-byte units.
        for (i, (head, cluster, n)) in
            [(b"hibr", 1024, 0), (b"HIBR", 1024, 60), (b"HIBR", 65536, 200)].into_iter().enumerate()
        {
            mkntfs(&f, 32 << 20, cluster);
            let m = Mount::new(&f, &mnt);
            for j in 0..n {
                std::fs::write(mnt.join(format!("a-long-file-name-{j:04}.txt")), b"x").unwrap();
            }
            let mut body = head.to_vec();
            body.resize(1 << 20, 0);
            std::fs::write(mnt.join("hiberfil.sys"), &body).unwrap();
            m.unmount();
            match map(&f) {
                Err(FsError::Unclean(m)) => assert!(m.contains("Fast Startup"), "{m}"),
                r => panic!("hibernated ({i}): {r:?}"),
            }
            let d = Disk::open_source(&f).unwrap();
            let v = Volume::new(&d, 0, d.size);
            let fs = open(&v).unwrap();
            let blocks = fs.read_record(REC_ROOT).unwrap().attrs.iter().any(|a| a.ty == AT_INDEX_ALLOCATION);
            assert!(blocks, "case {i}: the root index has index blocks");
            drop(fs);
            // ntfs-3g agrees: it refuses a read-write mount. Once it removes
            // the hibernation file the volume is clean.
            let m = Mount::with_options(&f, &mnt, "no_detach,remove_hiberfile");
            assert!(!mnt.join("hiberfil.sys").exists());
            m.unmount();
            check_against_ntfsclone(&f, &t.0, cluster as u64);
        }
    }

    #[test]
    fn fragmented_mft() {
        // Fill a small-cluster volume with 4 KiB files, free every other
        // one, then create many more (empty) files: the MFT has to grow
        // into the 4 KiB holes and ends up in many runs, its $DATA spread
        // over an attribute list and extension records.
        let t = TempDir::new("frag");
        let f = t.0.join("fs.img");
        let mnt = t.0.join("mnt");
        mkntfs(&f, 16 << 20, 512);
        let m = Mount::new(&f, &mnt);
        let four_k = Rng(5).low_bytes(4096);
        let mut n = 0;
        while std::fs::write(mnt.join(format!("f{n}")), &four_k).is_ok() {
            n += 1;
        }
        for j in (0..n).step_by(2) {
            std::fs::remove_file(mnt.join(format!("f{j}"))).unwrap();
        }
        let mut k = 0;
        while k < 7000 && std::fs::write(mnt.join(format!("e{k}")), b"").is_ok() {
            k += 1;
        }
        m.unmount();
        ntfsfix_clean(&f);
        let fs_map = check_against_ntfsclone(&f, &t.0, 512);
        let d = Disk::open_source(&f).unwrap();
        let v = Volume::new(&d, 0, d.size);
        let fs = open(&v).unwrap();
        let rec0 = fs.read_record(REC_MFT).unwrap();
        let has_list = rec0.attrs.iter().any(|a| a.ty == AT_ATTRIBUTE_LIST);
        eprintln!(
            "{n} + {k} files; MFT: {} records in {} runs, attribute list: {has_list}; {} extents",
            fs.mft_records,
            fs.mft_runs.len(),
            fs_map.extents.len()
        );
        assert!(fs.mft_runs.len() > 50, "the MFT did not fragment");
        assert!(has_list, "the MFT did not get an attribute list");
    }

    #[test]
    fn mutations_never_panic() {
        let t = TempDir::new("mut");
        let f = t.0.join("fs.img");
        let mnt = t.0.join("mnt");
        mkntfs(&f, 16 << 20, 1024);
        populate(&f, &mnt, 4 << 20, 9, true);
        // hiberfil.sys so the root index and its data get read too.
        let m = Mount::new(&f, &mnt);
        for j in 0..50 {
            std::fs::write(mnt.join(format!("name-{j:03}")), b"y").unwrap();
        }
        std::fs::write(mnt.join("hiberfil.sys"), vec![0u8; 8192]).unwrap();
        m.unmount();
        let orig = std::fs::read(&f).unwrap();
        let boot = parse_boot(&orig[..512], orig.len() as u64).unwrap();
        let mft = (boot.mft_lcn * boot.cluster) as usize;
        let rec = boot.rec_size as usize;
        // Regions: boot sector, records 0..16, the root's index block(s)
        // and the bitmap's first bytes (found through the reader).
        let d = Disk::open_source(&f).unwrap();
        let v = Volume::new(&d, 0, d.size);
        let fs = open(&v).unwrap();
        let mut regions: Vec<(usize, usize)> = vec![(0, 512), (mft, 16 * rec)];
        let root = fs.read_record(REC_ROOT).unwrap();
        for a in &root.attrs {
            if let Body::NonResident { runs, .. } = &a.body {
                for r in runs {
                    regions.push(((r.lcn.unwrap() * boot.cluster) as usize, (r.len * boot.cluster) as usize));
                }
            }
        }
        if let Some(Stream::NonResident { runs, .. }) = fs.stream(REC_BITMAP, AT_DATA, &[]).unwrap() {
            regions.push(((runs[0].lcn.unwrap() * boot.cluster) as usize, 512));
        }
        drop(fs);
        drop(d);
        let mut rng = Rng(0x5eed_1234_abcd_ef01);
        let (mut oks, mut errs) = (0, 0);
        for _ in 0..400 {
            let mut img = orig.clone();
            let flips = 1 + rng.next() % 4;
            for _ in 0..flips {
                let (start, len) = regions[(rng.next() % regions.len() as u64) as usize];
                let pos = start + (rng.next() % len as u64) as usize;
                img[pos] ^= (rng.next() as u8) | 1;
            }
            std::fs::write(&f, &img).unwrap();
            let r = std::panic::catch_unwind(|| map(&f).map(|m| m.used_bytes));
            match r {
                Ok(Ok(_)) => oks += 1,
                Ok(Err(_)) => errs += 1,
                Err(_) => panic!("used_map panicked"),
            }
        }
        eprintln!("mutations: {oks} Ok, {errs} Err");
        assert!(errs > 0);
    }

    #[test]
    fn rejects_bad_boot_sectors() {
        let t = TempDir::new("boot");
        let f = t.0.join("fs.img");
        mkntfs(&f, 8 << 20, 4096);
        let orig = std::fs::read(&f).unwrap();
        let cases: [(usize, &[u8]); 8] = [
            (3, b"NTFX"),
            (0x0B, &[0, 3]),                     // 768-byte sectors
            (0x0D, &[3]),                        // 3 sectors per cluster
            (0x28, &u64::MAX.to_le_bytes()),     // huge volume
            (0x30, &(1u64 << 40).to_le_bytes()), // $MFT past the end
            (0x40, &[0x20]),                     // 32-cluster records
            (0x1FE, &[0, 0]),                    // no 55 AA
            (0x28, &0u64.to_le_bytes()),         // empty volume
        ];
        for (off, bytes) in cases {
            let mut img = orig.clone();
            img[off..off + bytes.len()].copy_from_slice(bytes);
            std::fs::write(&f, &img).unwrap();
            assert!(matches!(map(&f), Err(FsError::Corrupt(_))), "boot sector change at {off:#x}");
        }
    }

    #[test]
    fn runlist_decoding() {
        // 0x21: 1-byte length, 2-byte offset; then a sparse run; then a
        // negative delta.
        let mp = [0x21, 0x10, 0x00, 0x01, 0x01, 0x05, 0x11, 0x08, 0xF0, 0x00];
        let runs = decode_runs(&mp, 0, 0x10 + 5 + 8 - 1, 1000).unwrap();
        assert_eq!(
            runs,
            vec![
                Run { vcn: 0, len: 0x10, lcn: Some(0x100) },
                Run { vcn: 0x10, len: 5, lcn: None },
                Run { vcn: 0x15, len: 8, lcn: Some(0x100 - 0x10) },
            ]
        );
        assert!(decode_runs(&mp, 0, 100, 1000).is_err(), "wrong highest VCN");
        assert!(decode_runs(&mp, 0, 0x1C, 0x100).is_err(), "past the volume");
        assert!(decode_runs(&[0x21, 0x10, 0x00], 0, 0xF, 1000).is_err(), "truncated");
        assert!(decode_runs(&[0x11, 0x10, 0x80, 0x00], 0, 0xF, 1000).is_err(), "negative LCN");
        assert!(decode_runs(&[0x01, 0x00, 0x00], 0, 0, 1000).is_err(), "zero length");
    }
}
