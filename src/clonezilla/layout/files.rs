//! Which files a Clonezilla image directory holds: the saved tables, each
//! partition's image (its tool, filesystem, codec and pieces) and the
//! swap partitions' records.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::sfdisk::guid;
use super::{part_number, plain_name, read_text};
use crate::clonezilla::{Codec, CzPartition, CzSwap, ImageKind};
use crate::error::{Error, Result, io_ctx};
use crate::table::DiskLayout;

/// The disks whose partition table dump (`<disk>-pt.sf`) `dir` holds.
pub(super) fn saved_tables(dir: &Path) -> Result<Vec<String>> {
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

/// Codec from a file name suffix.
pub(super) fn codec_of(suffix: &str, file: &str) -> Result<Codec> {
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
pub(super) fn piece_suffix(mut i: u64) -> String {
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
pub(super) struct Found {
    pub(super) fs: String,
    pub(super) kind: ImageKind,
    pub(super) codec_suffix: Option<String>,
    pub(super) base: String,
    /// Piece suffix -> path; empty when the file is not split.
    pub(super) pieces: BTreeMap<String, PathBuf>,
    pub(super) whole: Option<PathBuf>,
}

/// Splits `<fs>-ptcl-img.<codec>[.<piece>]` (and the older forms) after
/// `<dev>.`: (fs, kind, codec suffix, piece suffix).
pub(super) fn parse_image_name(rest: &str) -> Option<(String, ImageKind, Option<String>, Option<String>)> {
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

/// Swap partitions from `swappt-<dev>.info`; the records of swap logical
/// volumes (`swappt-VG-LV.info`, the names in `volumes`) are left to the
/// volume groups.
pub(super) fn read_swaps(
    dir: &Path,
    disk: &str,
    layout: &DiskLayout,
    files: &HashMap<String, Vec<String>>,
    volumes: &[String],
) -> Result<Vec<CzSwap>> {
    let mut out = Vec::new();
    let mut names: Vec<&String> = files.values().flatten().filter(|n| n.starts_with("swappt-")).collect();
    names.sort();
    for name in names {
        let Some(dev) = name.strip_prefix("swappt-").and_then(|n| n.strip_suffix(".info")) else { continue };
        if volumes.iter().any(|v| v == dev) {
            continue;
        }
        let number = part_number(disk, dev)
            .filter(|n| layout.partitions.iter().any(|p| p.number == *n))
            .ok_or_else(|| Error::Corrupt(format!("{name} names {dev}, which the partition table does not hold")))?;
        let text = read_text(dir, name)?.unwrap_or_default();
        out.push(parse_swap_info(&text, name, number)?);
    }
    out.sort_by_key(|s| s.number);
    Ok(out)
}

/// A swap record (`UUID="…"`, `LABEL="…"` lines) from the file `name`.
pub(super) fn parse_swap_info(text: &str, name: &str, number: u32) -> Result<CzSwap> {
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
                    guid(&v).ok_or_else(|| Error::Corrupt(format!("{name} line {}: {v:?} is not a UUID", i + 1)))?,
                )
            }
            "LABEL" if !v.is_empty() => s.label = Some(v),
            _ => {}
        }
    }
    Ok(s)
}

/// Finds the image file (or pieces) of `dev` among `names` (the files of
/// `dir` starting with `<dev>.`).
pub(super) fn find_image(dir: &Path, dev: &str, names: &[String]) -> Result<Option<Found>> {
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
    pub(super) fn into_partition(self, number: u32, dev: &str, size: u64) -> Result<CzPartition> {
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
        let seen = crate::clonezilla::decompress::sniff(&head[..n]).filter(|c| *c != Codec::None);
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
