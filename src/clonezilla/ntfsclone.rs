//! ntfsclone's "special image" format (old Clonezilla's `*.ntfs-img`).
//!
//! What `ntfsclone --save-image -o -` writes (format 10.x; integers
//! little-endian):
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0 | 16 | `"\0ntfsclone-image"` |
//! | 16 | 1 | major version (10) |
//! | 17 | 1 | minor version (1 in ntfs-3g 2022) |
//! | 18 | 4 | cluster size |
//! | 22 | 8 | device size in bytes |
//! | 30 | 8 | number of clusters of the volume |
//! | 38 | 8 | clusters in use |
//! | 46 | 4 | offset of the image data (56: the header padded to 8 bytes) |
//!
//! Then, from cluster 0 on, records: a command byte 1 followed by one
//! cluster of data (the next cluster), or 0 followed by an i64 count of
//! clusters that are skipped (not in use). After the volume's last cluster
//! comes one more data record: the device's bytes past the volume (at most
//! a cluster; it holds the backup boot sector), only as many bytes as the
//! device has there. Then the stream ends.

use std::io::Read;

use super::BlockSource;
use super::decompress::read_full;
use super::pieces::PiecePos;
use crate::error::{Error, Result};

/// The ntfsclone image magic.
pub const MAGIC: &[u8; 16] = b"\0ntfsclone-image";
const HEADER: usize = 50;
/// Largest cluster size accepted (NTFS allows up to 2 MiB).
const MAX_CLUSTER: u32 = 2 << 20;
const CMD_GAP: u8 = 0;
const CMD_NEXT: u8 = 1;

/// Reads an ntfsclone special image.
pub struct NtfscloneReader {
    r: Box<dyn Read + Send>,
    pos: PiecePos,
    /// Offset in the decompressed stream.
    offset: u64,
    major: u8,
    minor: u8,
    cluster_size: u32,
    device_size: u64,
    nr_clusters: u64,
    inuse: u64,
    /// Bytes of the device past the volume's clusters (the last record).
    tail: u64,
    /// Next cluster the stream describes.
    lcn: u64,
    /// Data records seen for clusters of the volume.
    data_clusters: u64,
    /// A command byte read ahead (the one that ended the previous run).
    peeked: Option<u8>,
    finished: bool,
}

impl NtfscloneReader {
    /// Reads the header from `r`; `pos` tells where `r` is in the image
    /// file's pieces (for errors).
    pub fn new(r: Box<dyn Read + Send>, pos: PiecePos) -> Result<NtfscloneReader> {
        let mut me = NtfscloneReader {
            r,
            pos,
            offset: 0,
            major: 0,
            minor: 0,
            cluster_size: 0,
            device_size: 0,
            nr_clusters: 0,
            inuse: 0,
            tail: 0,
            lcn: 0,
            data_clusters: 0,
            peeked: None,
            finished: false,
        };
        let mut h = [0u8; HEADER];
        let n = me.fill(&mut h, "the ntfsclone header")?;
        if n < HEADER || &h[..16] != MAGIC {
            return Err(me.corrupt("not an ntfsclone image (no \"\\0ntfsclone-image\" magic at the start)"));
        }
        me.major = h[16];
        me.minor = h[17];
        if me.major != 10 {
            return Err(Error::Unsupported(format!(
                "{}: ntfsclone image format {}.{} is not supported (10.x is)",
                me.pos.first().display(),
                me.major,
                me.minor
            )));
        }
        let le64 = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().unwrap_or_default());
        me.cluster_size = u32::from_le_bytes(h[18..22].try_into().unwrap_or_default());
        me.device_size = le64(22);
        me.nr_clusters = le64(30);
        me.inuse = le64(38);
        let data_at = u32::from_le_bytes(h[46..50].try_into().unwrap_or_default()) as u64;
        let cs = me.cluster_size as u64;
        if !me.cluster_size.is_power_of_two() || !(512..=MAX_CLUSTER).contains(&me.cluster_size) {
            return Err(me.corrupt(format!("implausible cluster size {} in the ntfsclone header", cs)));
        }
        let volume = me.nr_clusters.checked_mul(cs);
        match volume {
            Some(v) if me.nr_clusters > 0 && v <= me.device_size && (me.device_size as i64) > 0 => {
                me.tail = (me.device_size - v).min(cs);
            }
            _ => {
                return Err(me.corrupt(format!(
                    "the ntfsclone header's {} clusters of {cs} bytes do not fit its device size {}",
                    me.nr_clusters, me.device_size
                )));
            }
        }
        if me.inuse > me.nr_clusters {
            return Err(
                me.corrupt(format!("the ntfsclone header says {} of {} clusters are in use", me.inuse, me.nr_clusters))
            );
        }
        if !(HEADER as u64..=4096).contains(&data_at) {
            return Err(me.corrupt(format!("implausible image data offset {data_at} in the ntfsclone header")));
        }
        let mut skip = vec![0u8; (data_at - HEADER as u64) as usize];
        me.exact(&mut skip, "the ntfsclone header padding")?;
        Ok(me)
    }

    fn at(&self) -> String {
        self.pos.at(self.offset)
    }

    fn corrupt(&self, msg: impl std::fmt::Display) -> Error {
        Error::Corrupt(format!("{}: {msg}", self.at()))
    }

    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<usize> {
        let done = read_full(&mut self.r, buf, &self.pos, what)?;
        self.offset += done as u64;
        Ok(done)
    }

    fn exact(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        let n = self.fill(buf, what)?;
        if n < buf.len() {
            return Err(self.corrupt(format!("the image ends early: {what} needs {} bytes, {n} are left", buf.len())));
        }
        Ok(())
    }

    /// The next command byte, `None` at the end of the stream.
    fn command(&mut self) -> Result<Option<u8>> {
        if let Some(c) = self.peeked.take() {
            return Ok(Some(c));
        }
        let mut c = [0u8; 1];
        Ok(if self.fill(&mut c, "an ntfsclone record")? == 0 { None } else { Some(c[0]) })
    }

    /// After the last record: the stream must end here.
    fn finish(&mut self) -> Result<()> {
        if self.data_clusters != self.inuse {
            return Err(self.corrupt(format!(
                "the image holds {} clusters in use, its header says {}",
                self.data_clusters, self.inuse
            )));
        }
        let mut probe = [0u8; 64];
        let n = self.fill(&mut probe, "the end of the image")?;
        if n > 0 {
            self.offset -= n as u64;
            return Err(self.corrupt(format!("unexpected data after the last cluster ({n} bytes or more)")));
        }
        self.finished = true;
        Ok(())
    }
}

impl BlockSource for NtfscloneReader {
    /// Yields at least one whole cluster even when `max_len` is smaller.
    fn next_run(&mut self, max_len: usize) -> Result<Option<(u64, Vec<u8>)>> {
        if self.finished {
            return Ok(None);
        }
        let cs = self.cluster_size as u64;
        let mut out: Vec<u8> = Vec::new();
        let mut start = 0u64;
        loop {
            let end_lcn = self.nr_clusters + u64::from(self.tail > 0);
            if self.lcn == end_lcn {
                if !out.is_empty() {
                    return Ok(Some((start, out)));
                }
                self.finish()?;
                return Ok(None);
            }
            let Some(cmd) = self.command()? else {
                return Err(self.corrupt(format!("the image ends early, at cluster {} of {}", self.lcn, end_lcn)));
            };
            match cmd {
                CMD_GAP => {
                    if !out.is_empty() {
                        self.peeked = Some(cmd);
                        return Ok(Some((start, out)));
                    }
                    let mut n = [0u8; 8];
                    self.exact(&mut n, "an ntfsclone gap record")?;
                    let n = i64::from_le_bytes(n);
                    if n <= 0 || n as u64 > self.nr_clusters - self.lcn.min(self.nr_clusters) {
                        self.offset -= 9;
                        return Err(self.corrupt(format!(
                            "an ntfsclone gap of {n} clusters at cluster {} overruns the volume's {} clusters",
                            self.lcn, self.nr_clusters
                        )));
                    }
                    self.lcn += n as u64;
                }
                CMD_NEXT => {
                    let len = if self.lcn < self.nr_clusters { cs } else { self.tail };
                    let full = !out.is_empty() && (out.len() as u64 + len > max_len as u64 || len < cs);
                    if full {
                        self.peeked = Some(cmd);
                        return Ok(Some((start, out)));
                    }
                    if out.is_empty() {
                        start = self.lcn * cs;
                        out.reserve((max_len as u64).clamp(cs, 64 << 20) as usize);
                    }
                    let at = out.len();
                    out.resize(at + len as usize, 0);
                    let what = format!("cluster {}", self.lcn);
                    let n = self.fill(&mut out[at..], &what)?;
                    if n < len as usize {
                        return Err(self.corrupt(format!("the image ends early, inside cluster {}", self.lcn)));
                    }
                    if self.lcn < self.nr_clusters {
                        self.data_clusters += 1;
                    }
                    self.lcn += 1;
                }
                c => {
                    self.offset -= 1;
                    return Err(self.corrupt(format!(
                        "unknown ntfsclone record type {c} at cluster {} (0 or 1 expected)",
                        self.lcn
                    )));
                }
            }
        }
    }

    fn stored_bytes(&self) -> u64 {
        self.inuse * self.cluster_size as u64 + self.tail
    }

    fn device_size(&self) -> u64 {
        self.device_size
    }

    fn block_size(&self) -> u32 {
        self.cluster_size
    }

    fn describe(&self) -> String {
        format!(
            "ntfsclone {}.{}, {}-byte clusters, {} of {} in use",
            self.major, self.minor, self.cluster_size, self.inuse, self.nr_clusters
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::decompress::tests::compress;
    use super::super::partclone::tests::{decode_all, run, split, tmpdir};
    use super::super::{Codec, CzPartition, ImageKind, open_stream};
    use super::*;
    use std::path::{Path, PathBuf};

    /// An NTFS on a device of `size` bytes (of `sectors` sectors when
    /// given) and its ntfsclone special image.
    fn make(dir: &Path, size: u64, sectors: Option<u64>) -> (PathBuf, PathBuf) {
        let img = dir.join("ntfs.img");
        let _ = std::fs::remove_file(&img);
        run("truncate", &["-s", &size.to_string(), img.to_str().unwrap()]);
        let sectors = sectors.map(|n| n.to_string());
        let mut args = vec!["-F", "-Q", "-q", "-c", "4096", img.to_str().unwrap()];
        args.extend(sectors.as_deref());
        run("mkntfs", &args);
        let saved = dir.join("sda1.ntfs-img");
        let _ = std::fs::remove_file(&saved);
        run("ntfsclone", &["-f", "--save-image", "-o", saved.to_str().unwrap(), img.to_str().unwrap()]);
        (img, saved)
    }

    fn open(pieces: Vec<PathBuf>, codec: Codec) -> Result<Box<dyn BlockSource>> {
        let part = CzPartition {
            number: 1,
            device: "sda1".into(),
            fs: "ntfs".into(),
            kind: ImageKind::Ntfsclone,
            codec,
            pieces,
            size: 0,
        };
        open_stream(&part)
    }

    fn decode(pieces: Vec<PathBuf>, codec: Codec, max_len: usize) -> Result<Vec<u8>> {
        let mut s = open(pieces, codec)?;
        decode_all(s.as_mut(), max_len)
    }

    #[test]
    fn ntfsclone_images_match_ntfsclone_restore() {
        let dir = tmpdir("ntfs");
        // A device a whole number of clusters long, one with a partial
        // last cluster (the tail record is then short), and a volume of
        // half its device (the tail record is a whole cluster; the rest of
        // the device is not in the image).
        for (size, sectors) in [(16u64 << 20, None), ((16 << 20) + 2560, None), (16 << 20, Some(16_000))] {
            let (img, saved) = make(&dir, size, sectors);
            let rest = dir.join("restored.img");
            let _ = std::fs::remove_file(&rest);
            run("ntfsclone", &["-f", "--restore-image", "-o", rest.to_str().unwrap(), saved.to_str().unwrap()]);
            let mut oracle = std::fs::read(&rest).unwrap();
            assert_eq!(oracle.len() as u64, sectors.map_or(size, |n| n * 512));
            oracle.resize(size as usize, 0);
            for max_len in [1 << 20, 4096, 3 * 4096 + 5] {
                let ours = decode(vec![saved.clone()], Codec::None, max_len).unwrap();
                assert!(ours == oracle, "size {size}, runs of {max_len}: differs from ntfsclone --restore-image");
            }
            // Compressed and split the way Clonezilla stores it.
            let bytes = std::fs::read(&saved).unwrap();
            let gz = compress(Codec::Gzip, &bytes);
            let pieces = split(&dir.join("sda1.ntfs-img.gz"), &gz, gz.len() / 3 + 1);
            assert!(decode(pieces.clone(), Codec::Gzip, 1 << 20).unwrap() == oracle);
            for p in pieces {
                std::fs::remove_file(p).unwrap();
            }
            let s = open(vec![saved.clone()], Codec::None).unwrap();
            assert!(s.describe().starts_with("ntfsclone 10."), "{}", s.describe());
            assert_eq!(s.device_size(), size);
            let _ = img;
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn damaged_ntfsclone_images_are_errors_naming_the_file() {
        let dir = tmpdir("ntfs-bad");
        let (_, saved) = make(&dir, 16 << 20, None);
        let good = std::fs::read(&saved).unwrap();
        let mut bad_cmd = good.clone();
        bad_cmd[56] = 7;
        let mut bad_gap = good.clone();
        // The first gap record follows three clusters.
        let gap_at = 56 + 3 * (1 + 4096);
        assert_eq!(bad_gap[gap_at], 0);
        bad_gap[gap_at + 1..gap_at + 9].copy_from_slice(&(1i64 << 40).to_le_bytes());
        let mut bad_magic = good.clone();
        bad_magic[3] ^= 1;
        for (bytes, words) in [
            (good[..good.len() - 10].to_vec(), "ends early"),
            ([&good[..], b"more"].concat(), "after the last cluster"),
            (bad_cmd, "unknown ntfsclone record type 7"),
            (bad_gap, "overruns"),
            (bad_magic, "not an ntfsclone image"),
        ] {
            std::fs::write(&saved, &bytes).unwrap();
            match decode(vec![saved.clone()], Codec::None, 1 << 20) {
                Err(e @ Error::Corrupt(_)) => {
                    let m = e.to_string();
                    assert!(m.contains("sda1.ntfs-img") && m.contains(words), "{m}");
                }
                Err(e) => panic!("expected Corrupt, got {e}"),
                Ok(_) => panic!("damage not detected ({words})"),
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
