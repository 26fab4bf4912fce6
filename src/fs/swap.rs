//! Linux swap: only the header page is worth keeping.
//!
//! A swap area (version 1, "SWAPSPACE2") starts with one page: boot bits
//! (1024 bytes), then `version` (u32), `last_page` (u32), `nr_badpages`
//! (u32), the UUID (16 bytes), the label (16 bytes), the bad page list, and
//! the 10-byte magic in the page's last 10 bytes. Everything after the
//! header page is scratch space the kernel overwrites, so a restore needs
//! the header page only: it keeps the UUID and label that /etc/fstab and
//! resume= may refer to.
//!
//! The page size is the one the swap was made for (4096 on x86); the magic
//! is looked for at the end of each possible page size.

use super::{Driver, FsError, UsedMap, Volume, normalize};
use crate::le::le32;

/// The swap driver.
pub const DRIVER: Driver = Driver { fstypes: &["swap"], used_map };

/// Page sizes a swap header may have been written for.
const PAGE_SIZES: [u64; 5] = [4096, 8192, 16384, 32768, 65536];

/// Most bad pages the version 1 header can list (the list fills the rest
/// of a 4096-byte page after the fixed fields).
const MAX_BADPAGES: u32 = 637;

fn used_map(vol: &Volume) -> Result<UsedMap, FsError> {
    let mut page = None;
    for p in PAGE_SIZES {
        if p > vol.len {
            break;
        }
        let mut magic = [0u8; 10];
        vol.read_at(&mut magic, p - 10)?;
        match &magic {
            b"SWAPSPACE2" => {
                page = Some(p);
                break;
            }
            b"SWAP-SPACE" => {
                return Err(FsError::Corrupt(
                    "old-style (version 0) swap area is not supported; run mkswap to recreate it".into(),
                ));
            }
            b"S1SUSPEND\0" | b"S2SUSPEND\0" | b"ULSUSPEND\0" | b"LINHIB0001" => {
                return Err(FsError::Unclean(
                    "the swap area holds a hibernation image: resume Linux and shut it down fully".into(),
                ));
            }
            _ => {}
        }
    }
    let page = page.ok_or_else(|| FsError::Corrupt("no swap signature (SWAPSPACE2) found".into()))?;
    let hdr = vol.read_vec(0, page)?;
    let version = le32(&hdr, 1024);
    if version != 1 {
        let why = if version.swap_bytes() == 1 {
            "swap header is in the other byte order (made on a big-endian machine)".to_string()
        } else {
            format!("swap header version {version} is not 1")
        };
        return Err(FsError::Corrupt(why));
    }
    let last_page = le32(&hdr, 1028) as u64;
    let nr_bad = le32(&hdr, 1032);
    if last_page == 0 {
        return Err(FsError::Corrupt("swap header: last_page is 0".into()));
    }
    let total = (last_page + 1).checked_mul(page).filter(|&t| t <= vol.len).ok_or_else(|| {
        FsError::Corrupt(format!(
            "swap header: last_page {last_page} ({page}-byte pages) lies beyond the partition's end ({} bytes)",
            vol.len
        ))
    })?;
    if nr_bad > MAX_BADPAGES {
        return Err(FsError::Corrupt(format!("swap header: {nr_bad} bad pages listed (at most {MAX_BADPAGES})")));
    }
    let (extents, used_bytes) = normalize(vec![(0, page)], vol.len)?;
    Ok(UsedMap { block_size: page as u32, total_bytes: total, used_bytes, extents })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Disk;
    use crate::testutil::{Rng, TempFile, run};
    use std::path::Path;
    use std::process::Command;

    fn mkswap(file: &Path, args: &[&str]) {
        run(Command::new("mkswap").args(args).arg(file));
    }

    fn map(file: &Path) -> Result<UsedMap, FsError> {
        let d = Disk::open_source(file).unwrap();
        let v = Volume::new(&d, 0, d.size);
        used_map(&v)
    }

    fn write(file: &Path, off: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new().write(true).open(file).unwrap().write_all_at(data, off).unwrap();
    }

    #[test]
    fn header_page_only() {
        for (size, args) in [
            (16u64 << 20, vec!["-L", "klonswap"]),
            ((40 << 20) + 4096 * 3 + 1000, vec![]),
            (64 << 10, vec!["-U", "01234567-89ab-cdef-0123-456789abcdef"]),
        ] {
            let f = TempFile::new("hdr", size);
            mkswap(&f.0, &args);
            let m = map(&f.0).unwrap();
            assert_eq!(m.extents, vec![(0, 4096)]);
            assert_eq!(m.used_bytes, 4096);
            assert_eq!(m.block_size, 4096);
            assert_eq!(m.total_bytes, size / 4096 * 4096, "size {size}");
        }
    }

    #[test]
    fn larger_page_size() {
        let f = TempFile::new("p64k", 8 << 20);
        mkswap(&f.0, &["-p", "65536"]);
        let m = map(&f.0).unwrap();
        assert_eq!(m.extents, vec![(0, 65536)]);
        assert_eq!(m.total_bytes, 8 << 20);
    }

    #[test]
    fn refuses_bad_headers() {
        let f = TempFile::new("bad", 1 << 20);
        assert!(matches!(map(&f.0), Err(FsError::Corrupt(_))), "no signature");
        mkswap(&f.0, &[]);
        write(&f.0, 1024, &2u32.to_le_bytes());
        assert!(matches!(map(&f.0), Err(FsError::Corrupt(_))), "version 2");
        write(&f.0, 1024, &1u32.to_be_bytes());
        assert!(matches!(map(&f.0), Err(FsError::Corrupt(_))), "big endian");
        write(&f.0, 1024, &1u32.to_le_bytes());
        map(&f.0).unwrap();
        write(&f.0, 1028, &1000u32.to_le_bytes());
        assert!(matches!(map(&f.0), Err(FsError::Corrupt(_))), "last_page past the end");
        write(&f.0, 1028, &255u32.to_le_bytes());
        write(&f.0, 1032, &5000u32.to_le_bytes());
        assert!(matches!(map(&f.0), Err(FsError::Corrupt(_))), "bad pages");
        write(&f.0, 1032, &0u32.to_le_bytes());
        map(&f.0).unwrap();
        write(&f.0, 4086, b"S1SUSPEND\0");
        assert!(matches!(map(&f.0), Err(FsError::Unclean(_))), "hibernation image");
        write(&f.0, 4086, b"SWAP-SPACE");
        assert!(matches!(map(&f.0), Err(FsError::Corrupt(_))), "version 0");
        // Too small to hold a page.
        let g = TempFile::new("tiny", 2048);
        assert!(matches!(map(&g.0), Err(FsError::Corrupt(_))));
    }

    #[test]
    fn mutations_never_panic() {
        let f = TempFile::new("mut", 1 << 20);
        mkswap(&f.0, &["-L", "mut"]);
        let orig = std::fs::read(&f.0).unwrap();
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for _ in 0..300 {
            let mut img = orig.clone();
            for _ in 0..4 {
                let x = rng.next();
                let pos = if x & 1 == 0 { 1024 + (x >> 8) as usize % 16 } else { (x >> 8) as usize % 4096 };
                img[pos] ^= (x >> 40) as u8 | 1;
            }
            std::fs::write(&f.0, &img).unwrap();
            let r = std::panic::catch_unwind(|| map(&f.0).map(|_| ()));
            assert!(r.is_ok(), "used_map panicked");
        }
    }
}
