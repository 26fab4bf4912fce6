//! The Clonezilla image directory: which files it holds and what they say.
//!
//! `ocs-sr savedisk` writes, for a disk `sda`:
//! - `disk` (the disk name), `parts` (the partitions saved), `clonezilla-img`
//!   (its log), `Info-*.txt`, `blkdev.list`, `blkid.list`, `dev-fs.list`;
//! - `sda-pt.sf` (`sfdisk -d`), `sda-pt.parted` and `.compact` (`parted
//!   unit s print`: the only record of the disk's size), `sda-chs.sf`;
//! - `sda-mbr` (sector 0), MBR disks: `sda-hidden-data-after-mbr` (sectors
//!   1 up to the first partition, with `-j2`, at most 1 GiB), `sdaN-ebr`
//!   (the first EBR of extended partition N); GPT disks: `sda-gpt-1st`
//!   (the first 34 512-byte sectors), `sda-gpt-2nd` (the last 32: Clonezilla
//!   skips one sector too many, so the first sector of the backup entry
//!   array is not in it), `sda-gpt.gdisk`, `sda-gpt.sgdisk`;
//! - `swappt-sdaN.info` for swap partitions;
//! - a partition image per saved partition: `sdaN.<fs>-ptcl-img.<codec>`
//!   (partclone; `dd` for partitions without known filesystem), split as
//!   `.aa`, `.ab`, ... with `-i`; older images `sdaN.ntfs-img.*`
//!   (ntfsclone) and `sdaN.dd-img.*` (raw);
//! - MD5SUMS, SHA1SUMS, B2SUMS with `-gm`, `-gs`, `-gb`.
//!
//! A restore (`ocs-sr restoredisk`, default `-j`) recreates the table with
//! sfdisk from `sda-pt.sf` (MBR with its EBRs, or a GPT), writes the hidden
//! data back at sector 1 (MBR disks only, with `-j2`), the first 446 bytes of
//! `sdaN-ebr` into the first EBR and the first 446 bytes of `sda-mbr` (boot
//! code and disk signature) into sector 0. [`CzImage::boot`] holds the bytes
//! that sequence leaves outside the partitions.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::{Codec, CzImage, CzPartition, CzSwap, ImageKind, checksums};
use crate::error::{Error, Result, io_ctx};
use crate::table::build::{self, GptCopy, MbrEntry};
use crate::table::{DiskLayout, GptGeometry, Partition, TableKind};

/// Largest description file read whole (`disk`, `parts`, `*-pt.sf`, ...).
const MAX_TEXT: u64 = 4 << 20;
/// Largest hidden-data file taken (Clonezilla's limit is 1 GiB).
const MAX_HIDDEN: u64 = 1 << 30;
/// Most partitions accepted from a dump.
const MAX_PARTS: usize = 256;
/// Bytes Clonezilla saves in `-gpt-1st` (34 sectors of 512 bytes).
const GPT_1ST_LEN: u64 = 34 * 512;
/// Most bytes in `-gpt-2nd` (33 sectors of 512 bytes).
const GPT_2ND_MAX: u64 = 33 * 512;

/// Whether `dir` looks like a Clonezilla image (it has `disk` or `parts`
/// and a `clonezilla-img` or `*-pt.sf` file), as opposed to a klon image.
pub fn is_clonezilla_image(dir: &Path) -> bool {
    if dir.join("klon.json").exists() || !dir.is_dir() {
        return false;
    }
    let has_list = dir.join("disk").is_file() || dir.join("parts").is_file();
    if !has_list {
        return false;
    }
    if dir.join("clonezilla-img").is_file() {
        return true;
    }
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.flatten().any(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.ends_with("-pt.sf") || n.contains("-ptcl-img.") || n.contains(".ntfs-img") || n.contains(".dd-img")
        })
    })
}

/// Why `dir` is not a klon image's nor a Clonezilla image's directory, for
/// the message of a directory without `klon.json` that
/// [`is_clonezilla_image`] did not take.
pub fn not_clonezilla_because(dir: &Path) -> String {
    let state = |name: &str| match std::fs::metadata(dir.join(name)) {
        Ok(m) if m.is_file() && m.len() == 0 => "empty",
        Ok(m) if m.is_file() => "there",
        _ => "missing",
    };
    match (state("disk"), state("parts")) {
        ("missing", "missing") => "nor a Clonezilla image: no `disk` or `parts` file".to_string(),
        (disk, parts) => format!(
            "nor a whole Clonezilla image: `disk` is {disk} and `parts` is {parts}, but there is no partition \
             table dump (<disk>-pt.sf) or partition image"
        ),
    }
}

/// Reads a small text file whole; `None` when it does not exist.
/// The disks whose partition table dump (`<disk>-pt.sf`) `dir` holds.
fn saved_tables(dir: &Path) -> Result<Vec<String>> {
    let mut disks = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_ctx("listing", dir, None))? {
        let e = e.map_err(io_ctx("listing", dir, None))?;
        if let Some(disk) = e.file_name().to_str().and_then(|n| n.strip_suffix("-pt.sf"))
            && plain_name(disk)
        {
            disks.push(disk.to_string());
        }
    }
    disks.sort();
    Ok(disks)
}

fn read_text(dir: &Path, name: &str) -> Result<Option<String>> {
    let path = dir.join(name);
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("reading", &path, None, e)),
    };
    if !meta.is_file() || meta.len() > MAX_TEXT {
        return Err(Error::Corrupt(format!(
            "{name} in {} is not a text file of at most {MAX_TEXT} bytes",
            dir.display()
        )));
    }
    let bytes = std::fs::read(&path).map_err(io_ctx("reading", &path, None))?;
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| Error::Corrupt(format!("{name} in {} is not UTF-8 text", dir.display())))
}

/// Reads a small binary file whole (at most `max` bytes); `None` when it
/// does not exist.
fn read_bytes(dir: &Path, name: &str, max: u64) -> Result<Option<Vec<u8>>> {
    let path = dir.join(name);
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("reading", &path, None, e)),
    };
    if !meta.is_file() || meta.len() > max {
        return Err(Error::Corrupt(format!("{name} in {} is not a file of at most {max} bytes", dir.display())));
    }
    std::fs::read(&path).map(Some).map_err(io_ctx("reading", &path, None))
}

/// Whether a device name as Clonezilla writes it is plain (no path, no
/// odd characters).
fn plain_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Partition number of `dev` on disk `disk`: sda5 -> 5, nvme0n1p2 -> 2,
/// loop0p1 -> 1.
fn part_number(disk: &str, dev: &str) -> Option<u32> {
    let rest = dev.strip_prefix(disk)?;
    let digits = if disk.ends_with(|c: char| c.is_ascii_digit()) { rest.strip_prefix('p')? } else { rest };
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) || digits.starts_with('0') {
        return None;
    }
    digits.parse().ok().filter(|&n| (1..=MAX_PARTS as u32).contains(&n))
}

/// One partition line of an sfdisk dump.
#[derive(Debug, Default)]
struct SfPart {
    line: usize,
    node: String,
    start: u64,
    size: u64,
    ptype: String,
    uuid: Option<String>,
    name: Option<String>,
    attrs: Option<String>,
    bootable: bool,
}

/// An sfdisk dump (`sfdisk -d`).
#[derive(Debug, Default)]
struct SfDump {
    label: String,
    label_id: Option<String>,
    first_lba: Option<u64>,
    last_lba: Option<u64>,
    sector_size: Option<u32>,
    table_length: Option<u32>,
    parts: Vec<SfPart>,
}

/// Splits `a=1, b="x, y", bootable` at commas outside quotes.
fn split_fields(s: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            '\\' if quoted => {
                cur.push(c);
                cur.push(chars.next()?);
            }
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    if quoted {
        return None;
    }
    out.push(cur);
    Some(out.into_iter().map(|f| f.trim().to_string()).filter(|f| !f.is_empty()).collect())
}

/// Removes the quotes of a quoted sfdisk value and its `\"`, `\\` and
/// `\xNN` escapes.
fn unquote(v: &str) -> Option<String> {
    let Some(inner) = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else { return Some(v.to_string()) };
    let mut bytes = Vec::new();
    let mut it = inner.bytes();
    while let Some(b) = it.next() {
        if b != b'\\' {
            bytes.push(b);
            continue;
        }
        match it.next()? {
            b'x' => {
                let h = [it.next()?, it.next()?];
                bytes.push(u8::from_str_radix(std::str::from_utf8(&h).ok()?, 16).ok()?);
            }
            c => bytes.push(c),
        }
    }
    String::from_utf8(bytes).ok()
}

fn parse_sf(text: &str, file: &str) -> Result<SfDump> {
    let mut d = SfDump::default();
    let mut unit_seen = false;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let n = i + 1;
        let bad = |why: &str| Error::Corrupt(format!("{file} line {n}: {why}: {line:?}"));
        if line.is_empty() || line.starts_with('#') || line.starts_with("partition table of ") {
            continue;
        }
        if line.starts_with("/dev/") || line.contains(" : ") {
            let (node, rest) = line.split_once(':').ok_or_else(|| bad("no ':' after the device"))?;
            let mut p = SfPart { line: n, node: node.trim().to_string(), ..Default::default() };
            let (mut has_start, mut has_size) = (false, false);
            for f in split_fields(rest).ok_or_else(|| bad("unbalanced quotes"))? {
                if f == "bootable" {
                    p.bootable = true;
                    continue;
                }
                let (k, v) = f.split_once('=').ok_or_else(|| bad("a field is not key=value"))?;
                let v = v.trim();
                let num = || v.parse::<u64>().map_err(|_| bad("not a number"));
                match k.trim() {
                    "start" => (p.start, has_start) = (num()?, true),
                    "size" => (p.size, has_size) = (num()?, true),
                    "type" | "Id" => p.ptype = v.to_string(),
                    "uuid" => p.uuid = Some(v.to_string()),
                    "name" => p.name = Some(unquote(v).ok_or_else(|| bad("bad name"))?),
                    "attrs" => p.attrs = Some(unquote(v).ok_or_else(|| bad("bad attrs"))?),
                    _ => return Err(bad(&format!("unknown field {k:?}"))),
                }
            }
            if !has_start || !has_size || p.ptype.is_empty() {
                return Err(bad("start, size or type missing"));
            }
            if d.parts.len() >= MAX_PARTS {
                return Err(bad(&format!("more than {MAX_PARTS} partitions")));
            }
            d.parts.push(p);
            continue;
        }
        let (k, v) = line.split_once(':').ok_or_else(|| bad("neither a header nor a partition line"))?;
        let v = v.trim();
        let num = || v.parse::<u64>().map_err(|_| bad("not a number"));
        match k.trim() {
            "label" => d.label = v.to_string(),
            "label-id" => d.label_id = Some(v.to_string()),
            "device" | "grain" => {}
            "unit" if v == "sectors" => unit_seen = true,
            "unit" => return Err(bad("only `unit: sectors` is understood")),
            "first-lba" => d.first_lba = Some(num()?),
            "last-lba" => d.last_lba = Some(num()?),
            "sector-size" => {
                d.sector_size = Some(
                    u32::try_from(num()?)
                        .ok()
                        .filter(|s| matches!(s, 512 | 1024 | 2048 | 4096))
                        .ok_or_else(|| bad("sector size must be 512, 1024, 2048 or 4096"))?,
                )
            }
            "table-length" => {
                d.table_length = Some(u32::try_from(num()?).ok().filter(|&t| t <= 4096).ok_or_else(|| bad("too long"))?)
            }
            _ => return Err(bad("unknown header")),
        }
    }
    if !unit_seen {
        return Err(Error::Corrupt(format!("{file}: no `unit: sectors` line (not an sfdisk dump?)")));
    }
    if d.label.is_empty() {
        // sfdisk before 2.26 wrote DOS tables without a label line.
        d.label = "dos".into();
    }
    Ok(d)
}

/// GPT attribute bits from sfdisk's `attrs="RequiredPartition GUID:63"`.
fn parse_attrs(s: &str) -> Option<u64> {
    let mut bits = 0u64;
    for word in s.split_whitespace() {
        match word {
            "RequiredPartition" | "RequiredPartiton" => bits |= 1,
            "NoBlockIOProtocol" => bits |= 1 << 1,
            "LegacyBIOSBootable" => bits |= 1 << 2,
            w => {
                let list = w.strip_prefix("GUID:")?;
                for b in list.split(',') {
                    let b: u32 = b.trim().parse().ok()?;
                    if !(48..=63).contains(&b) {
                        return None;
                    }
                    bits |= 1 << b;
                }
            }
        }
    }
    Some(bits)
}

/// Normalises a GUID to upper-case hyphenated form, checking its shape.
fn guid(s: &str) -> Option<String> {
    let ok = s.len() == 36
        && s.char_indices().all(|(i, c)| if matches!(i, 8 | 13 | 18 | 23) { c == '-' } else { c.is_ascii_hexdigit() });
    ok.then(|| s.to_ascii_uppercase())
}

/// What `<disk>-pt.parted` says: (disk size in sectors, logical sector size).
fn parse_parted(text: &str, file: &str) -> Result<Option<(u64, u32)>> {
    let mut sectors = None;
    let mut ss = None;
    for (i, line) in text.lines().enumerate() {
        let bad = || Error::Corrupt(format!("{file} line {}: cannot read {line:?}", i + 1));
        if let Some(rest) = line.strip_prefix("Disk /dev/") {
            let v = rest.rsplit_once(": ").ok_or_else(bad)?.1.trim();
            let n = v.strip_suffix('s').and_then(|n| n.parse::<u64>().ok()).ok_or_else(bad)?;
            sectors = Some(n);
        } else if let Some(rest) = line.strip_prefix("Sector size (logical/physical): ") {
            let logical = rest.split('/').next().and_then(|v| v.strip_suffix('B')).and_then(|v| v.parse::<u32>().ok());
            ss = Some(logical.filter(|s| matches!(s, 512 | 1024 | 2048 | 4096)).ok_or_else(bad)?);
        }
    }
    Ok(match (sectors, ss) {
        (Some(n), Some(s)) if n > 0 => Some((n, s)),
        _ => None,
    })
}

/// Codec from a file name suffix.
fn codec_of(suffix: &str, file: &str) -> Result<Codec> {
    Ok(match suffix {
        "gz" => Codec::Gzip,
        "zst" => Codec::Zstd,
        "xz" => Codec::Xz,
        "lz4" => Codec::Lz4,
        "bz2" => Codec::Bzip2,
        "uncomp" => Codec::None,
        "lzo" => {
            return Err(Error::Unsupported(format!(
                "{file} is compressed with lzop (Clonezilla's -z3), which klon does not read; \
                 recompress it (lzop -dc | zstd) or save with -z9p (zstd) or -z1p (gzip)"
            )));
        }
        "lzma" | "lz" | "lrz" => {
            return Err(Error::Unsupported(format!(
                "{file} is compressed with {suffix}, which klon does not read; save with -z9p (zstd) or -z1p (gzip)"
            )));
        }
        _ => return Err(Error::Corrupt(format!("{file}: unknown compression suffix .{suffix}"))),
    })
}

/// The split suffix of piece `i`, as GNU split names them with its default
/// two letters: aa..yz, then zaaa..zyzz, then zzaaaa, ...
fn piece_suffix(mut i: u64) -> String {
    let mut width = 2u32;
    let mut prefix = String::new();
    loop {
        let block = 25 * 26u64.pow(width - 1);
        if i < block {
            let mut s = vec![b'a'; width as usize];
            for pos in (0..width as usize).rev() {
                s[pos] = b'a' + (i % 26) as u8;
                i /= 26;
            }
            return prefix + std::str::from_utf8(&s).expect("ascii");
        }
        i -= block;
        prefix.push('z');
        width += 1;
    }
}

/// One image file (or split set) found for a partition.
struct Found {
    fs: String,
    kind: ImageKind,
    codec_suffix: Option<String>,
    base: String,
    /// Piece suffix -> path; empty when the file is not split.
    pieces: BTreeMap<String, PathBuf>,
    whole: Option<PathBuf>,
}

/// Splits `<fs>-ptcl-img.<codec>[.<piece>]` (and the older forms) after
/// `<dev>.`: (fs, kind, codec suffix, piece suffix).
fn parse_image_name(rest: &str) -> Option<(String, ImageKind, Option<String>, Option<String>)> {
    let is_piece = |s: &str| s.len() >= 2 && s.bytes().all(|b| b.is_ascii_lowercase());
    let parts: Vec<&str> = rest.split('.').collect();
    let (head, tail) = parts.split_first()?;
    let (fs, kind) = if let Some(fs) = head.strip_suffix("-ptcl-img") {
        (fs.to_string(), ImageKind::Partclone)
    } else if *head == "ntfs-img" {
        ("ntfs".to_string(), ImageKind::Ntfsclone)
    } else if *head == "dd-img" {
        ("dd".to_string(), ImageKind::Raw)
    } else {
        return None;
    };
    if fs.is_empty() || !plain_name(&fs) {
        return None;
    }
    match tail {
        [] => Some((fs, kind, None, None)),
        [c] if is_piece(c) && !matches!(*c, "gz" | "xz" | "lz" | "zst" | "lzo" | "lzma" | "uncomp" | "bz" | "lrz") => {
            Some((fs, kind, None, Some(c.to_string())))
        }
        [c] => Some((fs, kind, Some(c.to_string()), None)),
        [c, p] if is_piece(p) => Some((fs, kind, Some(c.to_string()), Some(p.to_string()))),
        _ => None,
    }
}

/// A Clonezilla table with what [`CzImage::open`] needs besides the layout.
struct Table {
    layout: DiskLayout,
    /// MBR: (slot, type byte, start, sectors) of the extended partition.
    extended: Option<(u32, u8, u64, u64)>,
    /// MBR: the primary entries as the dump gives them.
    primaries: Vec<MbrEntry>,
}

fn build_table(sf: &SfDump, disk: &str, disk_size: u64, ss: u32, file: &str) -> Result<Table> {
    let ssl = u64::from(ss);
    let total = disk_size / ssl;
    let mut parts = Vec::new();
    let mut primaries = Vec::new();
    let mut extended = None;
    let kind = match sf.label.as_str() {
        "dos" => TableKind::Mbr,
        "gpt" => TableKind::Gpt,
        other => return Err(Error::Unsupported(format!("{file}: partition table type {other:?} is not supported"))),
    };
    let mut numbers = std::collections::HashSet::new();
    for p in &sf.parts {
        let bad = |why: String| Error::Corrupt(format!("{file} line {}: {why}", p.line));
        let dev = p.node.strip_prefix("/dev/").unwrap_or(&p.node);
        let number = part_number(disk, dev).ok_or_else(|| bad(format!("{} is not a partition of {disk}", p.node)))?;
        if p.size == 0 {
            continue; // an empty slot (old sfdisk)
        }
        if !numbers.insert(number) {
            return Err(bad(format!("partition {number} appears twice")));
        }
        let end = p.start.checked_add(p.size).filter(|&e| e <= total && p.start > 0);
        if end.is_none() {
            return Err(bad(format!(
                "partition {number} (sectors {}+{}) does not lie within the disk of {total} sectors",
                p.start, p.size
            )));
        }
        let (start_b, size_b) = (p.start * ssl, p.size * ssl);
        match kind {
            TableKind::Mbr => {
                let t =
                    u8::from_str_radix(&p.ptype, 16).map_err(|_| bad(format!("type {:?} is not a byte", p.ptype)))?;
                if t == 0 {
                    return Err(bad("type 0 with a size".into()));
                }
                if t == 0xEE {
                    return Err(Error::Unsupported(format!(
                        "{file} line {}: a GPT protective entry in a DOS dump: the image was saved by sfdisk \
                         older than 2.26, which could not dump GPT; klon cannot rebuild this GPT from it",
                        p.line
                    )));
                }
                if number <= 4 {
                    if p.start > 0xFFFF_FFFF || p.size > 0xFFFF_FFFF {
                        return Err(bad("start or size does not fit an MBR entry".into()));
                    }
                    primaries.push(MbrEntry {
                        slot: number,
                        bootable: p.bootable,
                        ptype: t,
                        start: p.start,
                        sectors: p.size,
                    });
                }
                if build::is_extended_type(t) {
                    if number > 4 || extended.is_some() {
                        return Err(bad("a second or a logical extended partition".into()));
                    }
                    extended = Some((number, t, p.start, p.size));
                    continue;
                }
                parts.push(Partition {
                    number,
                    start: start_b,
                    size: size_b,
                    type_id: format!("0x{t:02x}"),
                    name: String::new(),
                    uuid: None,
                    attributes: if p.bootable { 0x80 } else { 0 },
                    logical: number > 4,
                });
            }
            _ => {
                let type_id = guid(&p.ptype).ok_or_else(|| bad(format!("type {:?} is not a GUID", p.ptype)))?;
                let uuid = p.uuid.as_deref().and_then(guid).ok_or_else(|| bad("no valid uuid".into()))?;
                let attributes = match &p.attrs {
                    Some(a) => parse_attrs(a).ok_or_else(|| bad(format!("attributes {a:?} not understood")))?,
                    None => 0,
                };
                if p.bootable {
                    return Err(bad("`bootable` on a GPT partition".into()));
                }
                parts.push(Partition {
                    number,
                    start: start_b,
                    size: size_b,
                    type_id,
                    name: p.name.clone().unwrap_or_default(),
                    uuid: Some(uuid),
                    attributes,
                    logical: false,
                });
            }
        }
    }
    parts.sort_by_key(|p| (p.start, p.number));
    for w in parts.windows(2) {
        if w[0].start + w[0].size > w[1].start {
            return Err(Error::Corrupt(format!("{file}: partitions {} and {} overlap", w[0].number, w[1].number)));
        }
    }
    if kind == TableKind::Mbr {
        let ext = extended.map(|(_, _, s, n)| (s, s + n));
        for p in &parts {
            let (s, e) = (p.start / ssl, (p.start + p.size) / ssl);
            let inside = ext.is_some_and(|(es, ee)| s > es && e <= ee);
            let touches = ext.is_some_and(|(es, ee)| s < ee && es < e);
            if p.logical != inside || (!p.logical && touches) {
                return Err(Error::Corrupt(format!(
                    "{file}: partition {} {} the extended partition",
                    p.number,
                    if p.logical { "is logical but does not lie within" } else { "overlaps" }
                )));
            }
        }
    }
    let layout = DiskLayout {
        kind,
        sector_size: ss,
        disk_size,
        disk_id: None,
        partitions: parts,
        extended: extended.map(|(_, _, s, n)| (s * ssl, n * ssl)),
        gpt: None,
        warnings: Vec::new(),
    };
    Ok(Table { layout, extended, primaries })
}

/// Sorts and merges-checks boot ranges: no two may overlap.
fn check_boot(boot: &mut [(u64, Vec<u8>)], layout: &DiskLayout) -> Result<()> {
    boot.sort_by_key(|(o, _)| *o);
    for w in boot.windows(2) {
        if w[0].0 + w[0].1.len() as u64 > w[1].0 {
            return Err(Error::Corrupt(format!(
                "boot areas at bytes {} and {} overlap (a damaged table file?)",
                w[0].0, w[1].0
            )));
        }
    }
    for (o, b) in boot.iter() {
        let end = o + b.len() as u64;
        if end > layout.disk_size {
            return Err(Error::Corrupt(format!("a boot area at byte {o} reaches past the end of the disk")));
        }
        if let Some(p) = layout.partitions.iter().find(|p| *o < p.start + p.size && p.start < end) {
            return Err(Error::Corrupt(format!("the boot area at bytes {o}..{end} overlaps partition {}", p.number)));
        }
    }
    Ok(())
}

impl CzImage {
    /// Reads the directory's description files and finds every partition's
    /// image file (and pieces). Checks structure only, not data.
    pub fn open(dir: &Path) -> Result<CzImage> {
        if !dir.is_dir() {
            return Err(Error::Usage(format!("{} is not a directory", dir.display())));
        }
        if dir.join("klon.json").exists() {
            return Err(Error::Usage(format!("{} is a klon image, not a Clonezilla image", dir.display())));
        }
        for (file, what) in [
            ("ecryptfs.info", "encrypted with eCryptfs (ocs-sr -enc); decrypt it first"),
            ("lvm_vg_dev.list", "holds LVM volumes, which klon does not restore from Clonezilla images"),
        ] {
            if dir.join(file).exists() {
                return Err(Error::Unsupported(format!("the Clonezilla image {} is {what}", dir.display())));
            }
        }
        refuse_opened_luks(dir)?;
        let mut saveparts = false;
        let disk_text = match read_text(dir, "disk")? {
            Some(t) => t,
            None if dir.join("parts").is_file() => {
                // saveparts writes no `disk` file, but the table files of
                // the disk the partitions are on.
                saveparts = true;
                match saved_tables(dir)?.as_slice() {
                    [one] => one.clone(),
                    _ => {
                        return Err(Error::Unsupported(format!(
                            "{} is a Clonezilla partition image (saveparts) without the partition table of one \
                             disk (no single <disk>-pt.sf), so klon cannot tell where its partitions belong; \
                             restore it with Clonezilla's restoreparts",
                            dir.display()
                        )));
                    }
                }
            }
            None => return Err(Error::Corrupt(format!("{}: the file `disk` is missing", dir.display()))),
        };
        let disks: Vec<&str> = disk_text.split_whitespace().collect();
        let disk = match disks.as_slice() {
            [] => return Err(Error::Corrupt(format!("{}: the file `disk` names no disk", dir.display()))),
            [d] if plain_name(d) => d.to_string(),
            [d] => return Err(Error::Corrupt(format!("{}: `disk` names {d:?}, not a disk name", dir.display()))),
            many => {
                return Err(Error::Unsupported(format!(
                    "{} holds {} disks ({}); klon restores one disk at a time",
                    dir.display(),
                    many.len(),
                    many.join(", ")
                )));
            }
        };
        let mut warnings = Vec::new();

        // The table and the disk's size.
        let sf_name = format!("{disk}-pt.sf");
        let sf_text = read_text(dir, &sf_name)?
            .ok_or_else(|| Error::Corrupt(format!("{}: {sf_name} (the partition table) is missing", dir.display())))?;
        let sf = parse_sf(&sf_text, &sf_name)?;
        let parted_name = format!("{disk}-pt.parted");
        let parted = match read_text(dir, &parted_name)? {
            Some(t) => parse_parted(&t, &parted_name)?,
            None => None,
        };
        let gpt_1st_name = format!("{disk}-gpt-1st");
        let gpt_1st = if sf.label == "gpt" { read_bytes(dir, &gpt_1st_name, 1 << 20)? } else { None };
        let (sectors, ss) = match parted {
            Some((n, s)) => (n, s),
            None => {
                // Without parted's record the size of a GPT disk still shows in
                // its primary header (backup header at the last LBA).
                let from_gpt = gpt_1st.as_ref().filter(|b| b.len() as u64 >= 1024 && &b[512..520] == b"EFI PART");
                match from_gpt {
                    Some(b) if sf.sector_size.unwrap_or(512) == 512 => {
                        let alt = u64::from_le_bytes(b[512 + 32..512 + 40].try_into().expect("8 bytes"));
                        warnings.push(format!(
                            "{parted_name} is empty or missing (parted was not installed when the image was \
                             saved): the disk size is taken from the primary GPT header ({} sectors)",
                            alt.saturating_add(1)
                        ));
                        (alt.saturating_add(1), 512)
                    }
                    _ => {
                        return Err(Error::Unsupported(format!(
                            "{}: the size of the source disk is unknown: {parted_name} is empty or missing \
                             (parted was not installed when Clonezilla saved the image), and klon needs the \
                             disk size to restore an MBR disk faithfully",
                            dir.display()
                        )));
                    }
                }
            }
        };
        if let Some(s) = sf.sector_size
            && s != ss
        {
            return Err(Error::Corrupt(format!(
                "{sf_name} says {s}-byte sectors, {parted_name} says {ss}-byte sectors"
            )));
        }
        let disk_size = sectors
            .checked_mul(u64::from(ss))
            .filter(|&s| s < 1 << 60)
            .ok_or_else(|| Error::Corrupt(format!("{parted_name}: disk size of {sectors} sectors is not plausible")))?;
        let Table { mut layout, extended, primaries } = build_table(&sf, &disk, disk_size, ss, &sf_name)?;

        // Bytes outside the partitions.
        let mbr_name = format!("{disk}-mbr");
        let mbr = read_bytes(dir, &mbr_name, 512)?;
        if let Some(m) = &mbr
            && m.len() != 512
        {
            return Err(Error::Corrupt(format!("{mbr_name} holds {} bytes, not 512", m.len())));
        }
        let mut boot: Vec<(u64, Vec<u8>)> = Vec::new();
        match layout.kind {
            TableKind::Mbr => {
                let id = match &sf.label_id {
                    Some(v) => {
                        let hex = v.strip_prefix("0x").unwrap_or(v);
                        let n = u32::from_str_radix(hex, 16)
                            .map_err(|_| Error::Corrupt(format!("{sf_name}: label-id {v:?} is not a DOS disk id")))?;
                        Some(n)
                    }
                    None => None,
                };
                let mut entries = primaries.clone();
                entries.sort_by_key(|e| e.slot);
                let table = build::mbr_entries(&entries)?;
                let sector0 = match &mbr {
                    Some(m) => {
                        let mut s = m.clone();
                        if s[446..510] != table[..] || s[510..512] != [0x55, 0xAA] {
                            if !same_lba_entries(&s[446..510], &table) {
                                warnings.push(format!(
                                    "the partition entries in {mbr_name} differ from {sf_name}; the MBR's \
                                     entries are rebuilt from {sf_name}, as Clonezilla's restore (sfdisk) does"
                                ));
                                s[446..510].copy_from_slice(&table);
                            }
                            s[510] = 0x55;
                            s[511] = 0xAA;
                        }
                        s
                    }
                    None => {
                        warnings.push(format!("{mbr_name} is missing: the MBR gets no boot code"));
                        let mut s = vec![0u8; 512];
                        s[446..510].copy_from_slice(&table);
                        s[510] = 0x55;
                        s[511] = 0xAA;
                        s
                    }
                };
                let sig = u32::from_le_bytes(sector0[440..444].try_into().expect("4 bytes"));
                if let Some(id) = id
                    && id != sig
                {
                    return Err(Error::Corrupt(format!(
                        "{mbr_name} has disk id 0x{sig:08x}, {sf_name} says 0x{id:08x}"
                    )));
                }
                layout.disk_id = Some(format!("0x{:08x}", id.unwrap_or(sig)));
                boot.push((0, sector0));
                hidden_data(dir, &disk, &layout, &mut boot, &mut warnings)?;
                let mut chain = build::mbr_ebr_chain(&layout)?;
                if let (Some((slot, ..)), Some(first)) = (extended, chain.first_mut()) {
                    let ext_dev = if disk.ends_with(|c: char| c.is_ascii_digit()) {
                        format!("{disk}p{slot}")
                    } else {
                        format!("{disk}{slot}")
                    };
                    let ebr_name = format!("{ext_dev}-ebr");
                    match read_bytes(dir, &ebr_name, 512)? {
                        Some(e) if e.len() == 512 => {
                            if e[446..] != first.1[446..] {
                                warnings.push(format!(
                                    "{ebr_name} (the source's first EBR) differs from the EBR sfdisk builds from \
                                     {sf_name}; the rebuilt one is used, as Clonezilla's restore does"
                                ));
                            }
                            first.1[..446].copy_from_slice(&e[..446]);
                        }
                        Some(_) => return Err(Error::Corrupt(format!("{ebr_name} does not hold 512 bytes"))),
                        None => {}
                    }
                }
                boot.extend(chain.into_iter().map(|(o, s)| (o, s.to_vec())));
            }
            TableKind::Gpt => {
                let bytes = gpt_1st.ok_or_else(|| {
                    Error::Corrupt(format!("{}: {gpt_1st_name} (the primary GPT) is missing", dir.display()))
                })?;
                gpt_boot(dir, &disk, &sf, &sf_name, &bytes, mbr.as_deref(), &mut layout, &mut boot, &mut warnings)?;
            }
            TableKind::None => {}
        }
        check_boot(&mut boot, &layout)?;

        // Partition images.
        let parts_text = read_text(dir, "parts")?
            .ok_or_else(|| Error::Corrupt(format!("{}: the file `parts` is missing", dir.display())))?;
        let listed: Vec<String> = parts_text.split_whitespace().map(str::to_string).collect();
        if listed.is_empty() && !layout.partitions.is_empty() {
            return Err(Error::Corrupt(format!(
                "{}: the file `parts` is empty, but {sf_name} describes {} partitions: the image holds \
                 none of their contents (was the save interrupted?)",
                dir.display(),
                layout.partitions.len()
            )));
        }
        if listed.len() > MAX_PARTS {
            return Err(Error::Corrupt(format!("`parts` lists more than {MAX_PARTS} partitions")));
        }
        let mut files: HashMap<String, Vec<String>> = HashMap::new();
        for e in std::fs::read_dir(dir).map_err(io_ctx("listing", dir, None))? {
            let e = e.map_err(io_ctx("listing", dir, None))?;
            if let Some(name) = e.file_name().to_str()
                && let Some((dev, _)) = name.split_once('.')
            {
                files.entry(dev.to_string()).or_default().push(name.to_string());
            }
        }
        let swap = read_swaps(dir, &disk, &layout, &files)?;
        let mut partitions = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for dev in &listed {
            if !plain_name(dev) {
                return Err(Error::Corrupt(format!("`parts` lists {dev:?}, not a device name")));
            }
            let number = part_number(&disk, dev).ok_or_else(|| {
                Error::Unsupported(format!(
                    "`parts` lists {dev}, which is not a partition of {disk} (LVM or another disk?); \
                     klon restores one disk's partitions"
                ))
            })?;
            if !seen.insert(number) {
                return Err(Error::Corrupt(format!("`parts` lists {dev} twice")));
            }
            let is_ext = extended.is_some_and(|(slot, ..)| slot == number);
            let part = layout.partitions.iter().find(|p| p.number == number);
            let found = find_image(dir, dev, files.get(dev.as_str()).map(Vec::as_slice).unwrap_or(&[]))?;
            let Some(found) = found else {
                if is_ext || swap.iter().any(|s| s.number == number) {
                    continue;
                }
                return Err(Error::Corrupt(format!("image file for {dev} is missing from {}", dir.display())));
            };
            if is_ext {
                // Its image holds the first EBR, which `boot` carries.
                continue;
            }
            let part =
                part.ok_or_else(|| Error::Corrupt(format!("`parts` lists {dev}, which {sf_name} does not describe")))?;
            partitions.push(found.into_partition(number, dev, part.size)?);
        }
        partitions.sort_by_key(|p: &CzPartition| {
            layout.partitions.iter().position(|q| q.number == p.number).unwrap_or(usize::MAX)
        });
        if saveparts {
            warnings.push(format!(
                "a Clonezilla partition image (saveparts) of {} of {disk}, not of a whole disk: a restore writes \
                 them into the same partitions of a disk whose table has them, and leaves the rest of it alone \
                 (klon restore --partition N puts one elsewhere)",
                listed.join(", ")
            ));
        }
        for p in &layout.partitions {
            if !saveparts && !seen.contains(&p.number) && !swap.iter().any(|s| s.number == p.number) {
                warnings.push(format!(
                    "partition {} has no image in this Clonezilla image (not listed in `parts`): a restore \
                     creates it but leaves its contents as they are on the target",
                    p.number
                ));
            }
        }
        let checksum_files =
            checksums::FILE_NAMES.iter().map(|n| dir.join(n)).filter(|p| p.is_file()).collect::<Vec<_>>();
        if checksum_files.is_empty() {
            warnings.push(
                "no checksum files (MD5SUMS, SHA1SUMS, B2SUMS): only partclone's own checksums protect the data"
                    .to_string(),
            );
        }
        Ok(CzImage {
            dir: dir.to_path_buf(),
            disk,
            layout,
            boot,
            partitions,
            swap,
            checksum_files,
            warnings,
            saveparts,
        })
    }
}

/// Refuses an image holding LUKS volumes Clonezilla opened while saving
/// (5.9.9 asks): `luks-dev.list` has a line `/dev/<part> <uuid> <mapper
/// name>` per volume, whose decrypted filesystem is saved as `<mapper
/// name>.<fs>-ptcl-img.*` and whose LUKS header is in
/// `<part>-luksHeader.bin`. Clonezilla's restore rebuilds the container
/// (luksFormat with the saved header, then the filesystem into it); klon
/// does not.
fn refuse_opened_luks(dir: &Path) -> Result<()> {
    let Some(text) = read_text(dir, "luks-dev.list")? else { return Ok(()) };
    let volumes: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let part = f[0].strip_prefix("/dev/").unwrap_or(f[0]);
            match f.get(2) {
                Some(map) => format!("{part} (saved decrypted as {map})"),
                None => part.to_string(),
            }
        })
        .collect();
    Err(Error::Unsupported(format!(
        "the Clonezilla image {} holds LUKS-encrypted partitions that Clonezilla opened and saved decrypted: {} \
         (listed in luks-dev.list, their LUKS headers in <part>-luksHeader.bin); klon does not re-create LUKS \
         containers, so it cannot restore or check this image: restore it with Clonezilla (ocs-sr restoredisk), \
         which writes the LUKS header back and the filesystem into it",
        dir.display(),
        if volumes.is_empty() { "none named".to_string() } else { volumes.join(", ") }
    )))
}

/// Whether two 64-byte primary tables describe the same partitions (start,
/// size, type, status), whatever their CHS fields say.
fn same_lba_entries(a: &[u8], b: &[u8]) -> bool {
    (0..4).all(|i| {
        let (x, y) = (&a[16 * i..16 * i + 16], &b[16 * i..16 * i + 16]);
        x[0] == y[0] && x[4] == y[4] && x[8..16] == y[8..16]
    })
}

/// Adds the hidden data after the MBR (sector 1 up to the first partition)
/// as Clonezilla's restore writes it: whole 512-byte sectors, only when it
/// fits before the first partition (and the first EBR).
fn hidden_data(
    dir: &Path,
    disk: &str,
    layout: &DiskLayout,
    boot: &mut Vec<(u64, Vec<u8>)>,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let name = format!("{disk}-hidden-data-after-mbr");
    let first = layout.partitions.iter().map(|p| p.start).chain(layout.extended.map(|e| e.0)).min();
    let gap = first.map_or(0, |f| f.saturating_sub(512));
    match read_bytes(dir, &name, MAX_HIDDEN)? {
        Some(mut data) => {
            data.truncate(data.len() / 512 * 512);
            if data.len() as u64 > gap {
                warnings.push(format!(
                    "{name} ({} bytes) does not fit between the MBR and the first partition ({gap} bytes); \
                     it is not restored (Clonezilla skips it too)",
                    data.len()
                ));
            } else if !data.is_empty() {
                boot.push((512, data));
            }
        }
        None if gap > 0 => {
            let why = if dir.join(format!("{name}.notes.txt")).exists() {
                "it was larger than Clonezilla's limit"
            } else {
                "the image was saved without -j2"
            };
            warnings.push(format!(
                "the {gap} bytes between the MBR and the first partition were not saved ({why}); a restore \
                 leaves them as they are on the target (boot loaders such as GRUB keep code there)"
            ));
        }
        None => {}
    }
    Ok(())
}

/// Swap partitions from `swappt-<dev>.info`.
fn read_swaps(
    dir: &Path,
    disk: &str,
    layout: &DiskLayout,
    files: &HashMap<String, Vec<String>>,
) -> Result<Vec<CzSwap>> {
    let mut out = Vec::new();
    let mut names: Vec<&String> = files.values().flatten().filter(|n| n.starts_with("swappt-")).collect();
    names.sort();
    for name in names {
        let Some(dev) = name.strip_prefix("swappt-").and_then(|n| n.strip_suffix(".info")) else { continue };
        let number = part_number(disk, dev)
            .filter(|n| layout.partitions.iter().any(|p| p.number == *n))
            .ok_or_else(|| Error::Corrupt(format!("{name} names {dev}, which the partition table does not hold")))?;
        let text = read_text(dir, name)?.unwrap_or_default();
        let mut s = CzSwap { number, uuid: None, label: None };
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| Error::Corrupt(format!("{name} line {}: not KEY=\"value\": {line:?}", i + 1)))?;
            let v = v.trim().trim_matches('"').to_string();
            match k {
                "UUID" if !v.is_empty() => {
                    s.uuid = Some(
                        guid(&v)
                            .ok_or_else(|| Error::Corrupt(format!("{name} line {}: {v:?} is not a UUID", i + 1)))?,
                    )
                }
                "LABEL" if !v.is_empty() => s.label = Some(v),
                _ => {}
            }
        }
        out.push(s);
    }
    out.sort_by_key(|s| s.number);
    Ok(out)
}

/// Finds the image file (or pieces) of `dev` among `names` (the files of
/// `dir` starting with `<dev>.`).
fn find_image(dir: &Path, dev: &str, names: &[String]) -> Result<Option<Found>> {
    let mut found: Vec<Found> = Vec::new();
    for name in names {
        let Some(rest) = name.strip_prefix(dev).and_then(|r| r.strip_prefix('.')) else { continue };
        let Some((fs, kind, codec, piece)) = parse_image_name(rest) else { continue };
        let base = match &codec {
            Some(c) => format!("{dev}.{}.{c}", rest.split('.').next().unwrap_or_default()),
            None => format!("{dev}.{}", rest.split('.').next().unwrap_or_default()),
        };
        let f = match found.iter_mut().position(|f| f.base == base) {
            Some(i) => &mut found[i],
            None => {
                found.push(Found {
                    fs,
                    kind,
                    codec_suffix: codec,
                    base: base.clone(),
                    pieces: BTreeMap::new(),
                    whole: None,
                });
                found.last_mut().expect("just pushed")
            }
        };
        match piece {
            Some(p) => {
                f.pieces.insert(p, dir.join(name));
            }
            None => f.whole = Some(dir.join(name)),
        }
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(Error::Corrupt(format!(
            "{} holds several images of {dev} ({}); remove the stale one",
            dir.display(),
            found.iter().map(|f| f.base.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

impl Found {
    fn into_partition(self, number: u32, dev: &str, size: u64) -> Result<CzPartition> {
        let pieces: Vec<PathBuf> = match (self.whole, self.pieces.is_empty()) {
            (Some(w), true) => vec![w],
            (Some(_), false) => {
                return Err(Error::Corrupt(format!(
                    "{} exists both whole and split into pieces; remove the stale one",
                    self.base
                )));
            }
            (None, _) => {
                let n = self.pieces.len() as u64;
                let mut v = Vec::with_capacity(self.pieces.len());
                let mut map = self.pieces;
                for i in 0..n {
                    let suffix = piece_suffix(i);
                    match map.remove(&suffix) {
                        Some(p) => v.push(p),
                        None => {
                            return Err(Error::Corrupt(format!(
                                "piece .{suffix} of {} is missing (found {n} pieces)",
                                self.base
                            )));
                        }
                    }
                }
                if let Some(extra) = map.keys().next() {
                    return Err(Error::Corrupt(format!("piece .{extra} of {} is out of sequence", self.base)));
                }
                v
            }
        };
        let file = self.base.clone();
        let named = match &self.codec_suffix {
            Some(c) => Some(codec_of(c, &file)?),
            None => None,
        };
        let mut head = [0u8; 8];
        let mut f = File::open(&pieces[0]).map_err(io_ctx("opening", &pieces[0], None))?;
        let mut n = 0;
        while n < head.len() {
            match f.read(&mut head[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("reading", &pieces[0], Some(n as u64), e)),
            }
        }
        if n == 0 {
            return Err(Error::Corrupt(format!("{} is empty", pieces[0].display())));
        }
        // The compressed codec the first bytes show (partclone's or
        // ntfsclone's own magic, or anything else, means uncompressed).
        let seen = super::decompress::sniff(&head[..n]).filter(|c| *c != Codec::None);
        // Old images without a codec suffix: the magic says.
        let codec = named.unwrap_or(seen.unwrap_or(Codec::None));
        let agrees = match codec {
            Codec::None => seen.is_none(),
            c => seen == Some(c),
        };
        if !agrees {
            return Err(Error::Corrupt(format!(
                "{file}: the name says {codec:?} but the data starts like {}",
                seen.map_or("uncompressed data".to_string(), |c| format!("{c:?}"))
            )));
        }
        Ok(CzPartition { number, device: dev.to_string(), fs: self.fs, kind: self.kind, codec, pieces, size })
    }
}

/// The GPT's bytes outside the partitions: `-gpt-1st` up to the end of the
/// primary entry array (sector 0's boot code from `-mbr`, which Clonezilla
/// writes last), and the backup entry array and header at the disk's end
/// (from `-gpt-2nd`, its missing first sector from the primary array).
/// Checks both copies against the dump and fills in `layout.gpt`.
#[allow(clippy::too_many_arguments)]
fn gpt_boot(
    dir: &Path,
    disk: &str,
    sf: &SfDump,
    sf_name: &str,
    first: &[u8],
    mbr: Option<&[u8]>,
    layout: &mut DiskLayout,
    boot: &mut Vec<(u64, Vec<u8>)>,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let name1 = format!("{disk}-gpt-1st");
    if layout.sector_size != 512 {
        return Err(Error::Unsupported(format!(
            "the disk has {}-byte sectors: Clonezilla saves GPT copies in 512-byte units, which do not hold \
             such a table whole",
            layout.sector_size
        )));
    }
    if (first.len() as u64) < GPT_1ST_LEN {
        return Err(Error::Corrupt(format!("{name1} holds {} bytes, not {GPT_1ST_LEN}", first.len())));
    }
    let ss = 512u64;
    let p = build::parse_gpt_header(&first[512..1024], 1, layout.disk_size, 512)
        .map_err(|why| Error::Corrupt(format!("{name1}: the primary GPT header is invalid: {why}")))?;
    let entries_end = p.entries_lba * ss + p.entries_len();
    if p.entries_lba < 2 || entries_end > first.len() as u64 {
        return Err(Error::Unsupported(format!(
            "{name1}: the entry array (LBA {}, {} bytes) is not within the 34 sectors Clonezilla saves",
            p.entries_lba,
            p.entries_len()
        )));
    }
    let entries = &first[(p.entries_lba * ss) as usize..entries_end as usize];
    let parts = build::parse_gpt_entries(&p, entries, layout.disk_size, 512)
        .map_err(|e| Error::Corrupt(format!("{name1}: {e}")))?;
    if parts != layout.partitions {
        return Err(Error::Corrupt(format!(
            "{name1} and {sf_name} describe different partitions (one of them is damaged or stale)"
        )));
    }
    let checks = [
        ("label-id", sf.label_id.as_deref().and_then(guid), Some(p.disk_guid.clone())),
        ("first-lba", sf.first_lba.map(|v| v.to_string()), Some(p.first_usable_lba.to_string())),
        ("last-lba", sf.last_lba.map(|v| v.to_string()), Some(p.last_usable_lba.to_string())),
        ("table-length", sf.table_length.map(|v| v.to_string()), Some(p.num_entries.to_string())),
    ];
    for (what, from_sf, from_gpt) in checks {
        if let Some(v) = from_sf
            && Some(&v) != from_gpt.as_ref()
        {
            return Err(Error::Corrupt(format!(
                "{sf_name} says {what} {v}, {name1} says {}",
                from_gpt.unwrap_or_default()
            )));
        }
    }
    // Sector 0: the protective MBR; its boot code as -mbr has it.
    let mut head = first[..entries_end.div_ceil(ss) as usize * ss as usize].to_vec();
    if let Some(m) = mbr {
        if m[446..] != head[446..512] {
            warnings.push(format!(
                "{disk}-mbr and {name1} disagree on the protective MBR's table; the one in {name1} is used"
            ));
        }
        head[..446].copy_from_slice(&m[..446]);
    }
    boot.push((0, head));

    // The backup copy.
    let total = layout.disk_size / ss;
    let name2 = format!("{disk}-gpt-2nd");
    let second = read_bytes(dir, &name2, 1 << 20)?;
    let n_entries_sectors = p.entries_len().div_ceil(ss);
    let mut backup_valid = false;
    let mut backup_entries_lba = p.alternate_lba.saturating_sub(n_entries_sectors);
    let why_not = match &second {
        None => Some(format!("{name2} is missing")),
        Some(b)
            if b.is_empty()
                || !(b.len() as u64).is_multiple_of(ss)
                || b.len() as u64 > GPT_2ND_MAX.min(layout.disk_size / 2) =>
        {
            Some(format!("{name2} holds {} bytes, not whole sectors of the disk's end", b.len()))
        }
        Some(b) => {
            let off = layout.disk_size - b.len() as u64;
            let last = &b[b.len() - 512..];
            match build::parse_gpt_header(last, total - 1, layout.disk_size, 512) {
                Err(why) => Some(format!("the backup header in {name2} is invalid: {why}")),
                Ok(h) => {
                    let same = GptCopy {
                        my_lba: h.my_lba,
                        alternate_lba: 1,
                        entries_lba: h.entries_lba,
                        entries_crc: h.entries_crc,
                        ..p.clone()
                    };
                    let arr_off = h.entries_lba * ss;
                    let arr_end = arr_off + n_entries_sectors * ss;
                    if h != same || h.entries_crc != p.entries_crc || p.alternate_lba != total - 1 {
                        Some(format!("the backup header in {name2} does not match the primary"))
                    } else if arr_end > (total - 1) * ss {
                        Some(format!("the backup entry array named in {name2} overlaps its header"))
                    } else {
                        let mut array = entries.to_vec();
                        array.resize((n_entries_sectors * ss) as usize, 0);
                        // The part of the array the file holds must be the primary's.
                        let covered = arr_off.max(off).min(arr_end);
                        let in_file = &b
                            [(covered.max(off) - off).min(b.len() as u64) as usize..(arr_end.max(off) - off) as usize];
                        if in_file != &array[(covered - arr_off) as usize..] {
                            Some(format!("the backup entry array in {name2} differs from the primary"))
                        } else {
                            backup_valid = true;
                            backup_entries_lba = h.entries_lba;
                            let rest_at = arr_end.max(off);
                            boot.push((arr_off, array));
                            boot.push((rest_at, b[(rest_at - off) as usize..].to_vec()));
                            None
                        }
                    }
                }
            }
        }
    };
    if let Some(why) = why_not {
        let w = format!("backup GPT not usable from the image ({why}); the restore rewrites it from the primary");
        warnings.push(w.clone());
        layout.warnings.push(w);
    }
    layout.disk_id = Some(p.disk_guid.clone());
    layout.gpt = Some(GptGeometry {
        first_usable_lba: p.first_usable_lba,
        last_usable_lba: p.last_usable_lba,
        primary_entries_lba: p.entries_lba,
        backup_header_lba: p.alternate_lba,
        backup_entries_lba,
        num_entries: p.num_entries,
        entry_size: p.entry_size,
        primary_valid: true,
        backup_valid,
    });
    if dir.join(format!("{disk}-hidden-data-after-mbr")).exists() {
        warnings
            .push(format!("{disk}-hidden-data-after-mbr is not restored: Clonezilla restores it on MBR disks only"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
