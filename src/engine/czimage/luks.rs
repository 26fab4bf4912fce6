//! A Clonezilla image's LUKS volume as one partition stream: the saved
//! LUKS header at the partition's start, then the filesystem's stored
//! blocks at the volume's data offset, encrypted with the volume key as
//! dm-crypt would have written them through the opened volume.
//!
//! The key comes from the passphrase ([`LuksOrigin::unlock`]), asked for
//! only by what writes (restore, convert): verify and info read the
//! filesystem's image as it is stored, decrypted, and check its checksums.
//!
//! dm-crypt encrypts whole sectors (up to 4096 bytes), and a filesystem's
//! blocks may be smaller: a sector only partly used has its unused bytes
//! written as zeros (they are free blocks of the filesystem, which nothing
//! reads), and a sector two runs share is written once, with both.

use super::{BlockSource, Origin, open_stream, stream_info};
use crate::clonezilla::CzLuks;
use crate::error::{Error, Result};
use crate::fs::FsInfo;
use crate::fs::luks::VolumeKey;
use crate::image::format::CHUNK_SIZE;
use crate::image::manifest::{Fill, StreamInfo, StreamKind};
use crate::table::Partition;

/// One LUKS volume's stream.
pub(super) struct LuksOrigin {
    volume: CzLuks,
    source: Box<dyn BlockSource>,
    key: Option<VolumeKey>,
}

/// The stream of LUKS volume `v` on partition `p`; its stored bytes.
pub(super) fn stream(v: &CzLuks, p: &Partition) -> Result<(StreamInfo, Origin, u64)> {
    let source = open_stream(&v.inner)?;
    if source.device_size() > v.inner.size {
        return Err(Error::Corrupt(format!(
            "{}: the image is of a {}-byte filesystem, but LUKS volume {} holds {} bytes",
            v.inner.pieces[0].display(),
            source.device_size(),
            v.mapper,
            v.inner.size
        )));
    }
    let h = &v.header;
    let mut info = stream_info(format!("p{}", p.number), StreamKind::Partition, Some(p.number), p.start, p.size);
    info.method = "luks".into();
    info.method_reason = format!(
        "LUKS{} volume ({}, {}-byte sectors): its header from {}, then Clonezilla's {} of the volume it held \
         (opened as {}, saved decrypted), encrypted again with the volume key the passphrase unlocks",
        h.version,
        h.cipher,
        h.sector_size,
        v.header_file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        source.describe(),
        v.mapper
    );
    info.fill = Fill::Free;
    info.fs = Some(FsInfo { fstype: "crypto_LUKS".into(), label: None, uuid: Some(h.uuid.clone()) });
    let stored = v.header_bytes.len() as u64 + source.stored_bytes();
    info.fs_used_bytes = Some(stored);
    info.fs_total_bytes = Some(p.size);
    Ok((info, Origin::Luks(Box::new(LuksOrigin { volume: v.clone(), source, key: None })), stored))
}

impl LuksOrigin {
    /// The volume's device and the image it is in, for questions and errors.
    pub(super) fn name(&self) -> String {
        format!("LUKS volume {} (saved as {})", self.volume.device, self.volume.mapper)
    }

    /// Whether the volume key is known.
    pub(super) fn unlocked(&self) -> bool {
        self.key.is_some()
    }

    /// Unlocks the volume key with `passphrase`; false when it opens no
    /// keyslot.
    pub(super) fn unlock(&mut self, passphrase: &str) -> Result<bool> {
        let v = &self.volume;
        let key = v
            .header
            .unlock(&v.header_bytes, passphrase.as_bytes())
            .map_err(|why| Error::Corrupt(format!("{}: {why}", v.header_file.display())))?;
        self.key = key;
        Ok(self.key.is_some())
    }

    /// Hands `push` the partition's bytes in order (partition offsets):
    /// the header, then the filesystem's stored blocks at the data offset,
    /// encrypted when the key is known and as stored otherwise (for
    /// verify). False when `push` said stop.
    pub(super) fn read(&mut self, push: &mut dyn FnMut(u64, &[u8]) -> bool) -> Result<bool> {
        let v = &self.volume;
        let chunk = CHUNK_SIZE as usize;
        for (i, piece) in v.header_bytes.chunks(chunk).enumerate() {
            if !push((i * chunk) as u64, piece) {
                return Ok(false);
            }
        }
        let base = v.header.data_offset;
        let file = v.inner.pieces[0].display().to_string();
        let mut sectors = self.key.as_ref().map(Sectors::new);
        let mut end = 0u64;
        while let Some((offset, bytes)) = self.source.next_run(chunk)? {
            crate::engine::cancel::check("reading the Clonezilla image")?;
            let run_end = offset.checked_add(bytes.len() as u64).filter(|&e| e <= v.inner.size);
            if offset < end || run_end.is_none() {
                return Err(Error::Corrupt(format!(
                    "{file}: data at offset {offset} ({} bytes) lies outside LUKS volume {} ({} bytes) or out of \
                     order",
                    bytes.len(),
                    v.mapper,
                    v.inner.size
                )));
            }
            end = offset + bytes.len() as u64;
            let more = match &mut sectors {
                None => push(base + offset, &bytes),
                Some(s) => s.add(offset, &bytes, &mut |at, b| push(base + at, b)),
            };
            if !more {
                return Ok(false);
            }
        }
        Ok(match &mut sectors {
            Some(s) => s.flush(&mut |at, b| push(base + at, b)),
            None => true,
        })
    }
}

/// Turns runs of plain bytes (volume offsets, in order) into whole
/// encrypted sectors.
struct Sectors<'k> {
    key: &'k VolumeKey,
    size: u64,
    /// A sector only partly filled so far: its offset and plain bytes.
    pending: Option<(u64, Vec<u8>)>,
}

impl<'k> Sectors<'k> {
    fn new(key: &'k VolumeKey) -> Self {
        Sectors { key, size: u64::from(key.sector_size()), pending: None }
    }

    /// Takes the plain bytes `bytes` at volume offset `at`; hands `out`
    /// every sector it completes, encrypted. False when `out` said stop.
    fn add(&mut self, mut at: u64, mut bytes: &[u8], out: &mut dyn FnMut(u64, &[u8]) -> bool) -> bool {
        let s = self.size;
        if let Some((start, _)) = &self.pending
            && at >= start + s
            && !self.flush(out)
        {
            return false;
        }
        // The start of a sector: the pending one, or a new one.
        if !at.is_multiple_of(s) || self.pending.is_some() {
            let start = at - at % s;
            let (_, buf) = self.pending.get_or_insert_with(|| (start, vec![0; s as usize]));
            let from = (at - start) as usize;
            let n = (s as usize - from).min(bytes.len());
            buf[from..from + n].copy_from_slice(&bytes[..n]);
            at += n as u64;
            bytes = &bytes[n..];
            if !at.is_multiple_of(s) {
                return true; // the run ended inside this sector
            }
            if !self.flush(out) {
                return false;
            }
        }
        let whole = bytes.len() - bytes.len() % s as usize;
        if whole > 0 {
            let mut b = bytes[..whole].to_vec();
            self.key.encrypt(at, &mut b);
            if !out(at, &b) {
                return false;
            }
            at += whole as u64;
            bytes = &bytes[whole..];
        }
        if !bytes.is_empty() {
            let mut buf = vec![0; s as usize];
            buf[..bytes.len()].copy_from_slice(bytes);
            self.pending = Some((at, buf));
        }
        true
    }

    /// Hands on the partly filled sector, if any.
    fn flush(&mut self, out: &mut dyn FnMut(u64, &[u8]) -> bool) -> bool {
        match self.pending.take() {
            Some((at, mut buf)) => {
                self.key.encrypt(at, &mut buf);
                out(at, &buf)
            }
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs of blocks smaller than the sector, sharing sectors, crossing
    /// their boundaries and spanning several: each touched sector comes out
    /// once, in order, as the whole volume (unstored bytes zero) encrypts.
    #[test]
    fn runs_become_whole_encrypted_sectors_each_once() {
        let key = VolumeKey::new(&[7u8; 64], 4096).unwrap();
        let runs: Vec<(u64, Vec<u8>)> = vec![
            (1024, vec![1; 1024]),
            (3072, vec![2; 2048]),
            (8192, vec![3; 8192]),
            (20992, vec![4; 512]),
            (24576, vec![5; 5120]),
            (32768 + 3072, vec![6; 1024]),
        ];
        let mut plain = vec![0u8; 40960];
        for (at, b) in &runs {
            plain[*at as usize..*at as usize + b.len()].copy_from_slice(b);
        }
        let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut sectors = Sectors::new(&key);
        for (at, b) in &runs {
            assert!(sectors.add(*at, b, &mut |a, b| {
                out.push((a, b.to_vec()));
                true
            }));
        }
        assert!(sectors.flush(&mut |a, b| {
            out.push((a, b.to_vec()));
            true
        }));
        let mut written = Vec::new();
        let mut end = 0;
        for (at, b) in &out {
            assert!(*at >= end && at % 4096 == 0 && b.len() % 4096 == 0, "{at} {}", b.len());
            end = at + b.len() as u64;
            for (i, sector) in b.chunks(4096).enumerate() {
                written.push(at / 4096 + i as u64);
                let s = (at + i as u64 * 4096) as usize;
                let mut expected = plain[s..s + 4096].to_vec();
                key.encrypt(s as u64, &mut expected);
                assert_eq!(sector, &expected[..], "sector at {s}");
            }
        }
        assert_eq!(written, vec![0, 1, 2, 3, 5, 6, 7, 8]);
    }
}
