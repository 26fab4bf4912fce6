//! The partition table Clonezilla saved: `sfdisk -d`'s dump (`<disk>-pt.sf`)
//! and `parted`'s print (the disk's size), parsed and checked, and the
//! table klon builds from them.

use super::{MAX_PARTS, part_number};
use crate::error::{Error, Result};
use crate::table::build::{self, MbrEntry};
use crate::table::{DiskLayout, Partition, TableKind};

/// One partition line of an sfdisk dump.
#[derive(Debug, Default)]
pub(super) struct SfPart {
    pub(super) line: usize,
    pub(super) node: String,
    pub(super) start: u64,
    pub(super) size: u64,
    pub(super) ptype: String,
    pub(super) uuid: Option<String>,
    pub(super) name: Option<String>,
    pub(super) attrs: Option<String>,
    pub(super) bootable: bool,
}

/// An sfdisk dump (`sfdisk -d`).
#[derive(Debug, Default)]
pub(super) struct SfDump {
    pub(super) label: String,
    pub(super) label_id: Option<String>,
    pub(super) first_lba: Option<u64>,
    pub(super) last_lba: Option<u64>,
    pub(super) sector_size: Option<u32>,
    pub(super) table_length: Option<u32>,
    pub(super) parts: Vec<SfPart>,
}

/// Splits `a=1, b="x, y", bootable` at commas outside quotes.
pub(super) fn split_fields(s: &str) -> Option<Vec<String>> {
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
pub(super) fn unquote(v: &str) -> Option<String> {
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

pub(super) fn parse_sf(text: &str, file: &str) -> Result<SfDump> {
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
pub(super) fn parse_attrs(s: &str) -> Option<u64> {
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
pub(super) fn guid(s: &str) -> Option<String> {
    let ok = s.len() == 36
        && s.char_indices().all(|(i, c)| if matches!(i, 8 | 13 | 18 | 23) { c == '-' } else { c.is_ascii_hexdigit() });
    ok.then(|| s.to_ascii_uppercase())
}

/// What `<disk>-pt.parted` says: (disk size in sectors, logical sector size).
pub(super) fn parse_parted(text: &str, file: &str) -> Result<Option<(u64, u32)>> {
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

/// A Clonezilla table with what [`CzImage::open`] needs besides the layout.
pub(super) struct Table {
    pub(super) layout: DiskLayout,
    /// MBR: (slot, type byte, start, sectors) of the extended partition.
    pub(super) extended: Option<(u32, u8, u64, u64)>,
    /// MBR: the primary entries as the dump gives them.
    pub(super) primaries: Vec<MbrEntry>,
}

pub(super) fn build_table(sf: &SfDump, disk: &str, disk_size: u64, ss: u32, file: &str) -> Result<Table> {
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
