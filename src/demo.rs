//! `klon demo`: the main job on a built-in sample. Makes a small GPT disk
//! image with three partitions (text, random and sparse data, boot code in
//! the MBR), backs it up, verifies the image, restores it to a larger disk
//! image and compares every partition byte for byte.

use std::path::{Path, PathBuf};

use crate::device::Disk;
use crate::engine::backup::{self, BackupOptions};
use crate::engine::pipeline::default_workers;
use crate::engine::restore::RestoreOptions;
use crate::engine::verify;
use crate::error::{Error, Result};
use crate::ui::human_bytes;
use crate::ui::progress::Console;

const MIB: u64 = 1 << 20;

/// Runs the demo in `dir` (or a fresh temporary directory, removed after);
/// says what it did step by step, or with `json` prints one JSON report.
pub fn run(dir: Option<&Path>, quiet: bool, json: bool) -> Result<()> {
    let (dir, temporary) = match dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| Error::io("creating", d, None, e))?;
            (d.to_path_buf(), false)
        }
        None => {
            let d = std::env::temp_dir().join(format!("klon-demo-{}", std::process::id()));
            std::fs::create_dir(&d).map_err(|e| Error::io("creating", &d, None, e))?;
            (d, true)
        }
    };
    let result = run_in(&dir, quiet, json);
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let mut report = result?;
    if json {
        report["ok"] = serde_json::json!(true);
        report["dir"] = serde_json::json!(dir);
        report["dir_kept"] = serde_json::json!(!temporary);
        let text =
            serde_json::to_string_pretty(&report).map_err(|e| Error::Unsupported(format!("encoding JSON: {e}")))?;
        println!("{text}");
    }
    Ok(())
}

/// The steps of the demo; returns their report (for --json).
fn run_in(dir: &Path, quiet: bool, json: bool) -> Result<serde_json::Value> {
    let say = |line: String| {
        if !json {
            println!("{line}");
        }
    };
    let source = dir.join("sample-disk.img");
    let image = dir.join("sample-image");
    let target = dir.join("restored-disk.img");
    for p in [&source, &target] {
        if p.exists() {
            return Err(Error::Refused(format!("{} exists already; use an empty --dir", p.display())));
        }
    }
    make_sample_disk(&source, 64 * MIB)?;
    say(format!("1. Made a 64 MiB sample disk with a GPT and 3 partitions: {}", source.display()));

    let workers = default_workers();
    let b = backup::backup(
        &source,
        &image,
        &BackupOptions { feedback: Console::feedback(quiet), workers, ..Default::default() },
    )?;
    say(format!(
        "2. Backed up in {:.2} s: read {}, image {} in {}",
        b.seconds,
        human_bytes(b.read_bytes),
        human_bytes(b.image_bytes),
        b.image.display()
    ));
    let v = verify::verify(&image, workers, &Console::feedback(quiet))?;
    say(format!("3. Verified every checksum: {} chunks, {} in {:.2} s", v.chunks, human_bytes(v.bytes), v.seconds));

    let f = std::fs::File::create(&target).map_err(|e| Error::io("creating", &target, None, e))?;
    f.set_len(96 * MIB).map_err(|e| Error::io("sizing", &target, None, e))?;
    drop(f);
    let plan = crate::engine::source::prepare_restore(&image, &target, &Console::feedback(quiet))?;
    let r = plan.restore(&RestoreOptions {
        grow_last: true,
        verify_after: true,
        feedback: Console::feedback(quiet),
        workers,
    })?;
    say(format!(
        "4. Restored to a larger 96 MiB disk, last partition grown, read back and verified in {:.2} s: {}",
        r.seconds,
        target.display()
    ));

    let src = Disk::open_read_only(&source)?;
    let dst = Disk::open_read_only(&target)?;
    let layout = crate::table::read_layout(&src)?;
    let mut buf_a = vec![0u8; MIB as usize];
    let mut buf_b = vec![0u8; MIB as usize];
    for p in &layout.partitions {
        let mut off = 0;
        while off < p.size {
            let n = MIB.min(p.size - off) as usize;
            src.read_exact_at(&mut buf_a[..n], p.start + off)?;
            dst.read_exact_at(&mut buf_b[..n], p.start + off)?;
            if buf_a[..n] != buf_b[..n] {
                return Err(Error::VerifyAfter(format!("partition {} differs at offset {}", p.number, p.start + off)));
            }
            off += n as u64;
        }
    }
    src.read_exact_at(&mut buf_a[..440], 0)?;
    dst.read_exact_at(&mut buf_b[..440], 0)?;
    if buf_a[..440] != buf_b[..440] {
        return Err(Error::VerifyAfter("the MBR boot code differs".into()));
    }
    say(format!(
        "5. Compared: all {} partitions and the boot code are identical byte for byte.",
        layout.partitions.len()
    ));
    Ok(serde_json::json!({
        "source": { "path": source, "size": src.size, "partitions": layout.partitions.len() },
        "backup": {
            "image": b.image, "seconds": b.seconds, "read_bytes": b.read_bytes, "image_bytes": b.image_bytes,
        },
        "verify": { "chunks": v.chunks, "bytes": v.bytes, "seconds": v.seconds },
        "restore": {
            "target": target, "target_size": dst.size, "grow_last": true, "read_back": r.verified,
            "bytes_written": r.bytes_written, "seconds": r.seconds,
        },
        "compared": { "partitions": layout.partitions.len(), "boot_code": true, "identical": true },
    }))
}

/// Deterministic bytes that do not compress (xorshift64).
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn text_bytes(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 100);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(
            format!("line {i}: klon backs up disks into compressed, checksummed images.\n").as_bytes(),
        );
        i += 1;
    }
    out.truncate(len);
    out
}

/// Writes the sample disk: a GPT with an ESP-typed partition holding text,
/// a Linux partition with random and text data and a mostly empty one.
pub fn make_sample_disk(path: &Path, size: u64) -> Result<PathBuf> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io("creating", path, None, e))?;
    f.set_len(size).map_err(|e| Error::io("sizing", path, None, e))?;
    let gpt_err = |e: gpt::GptError| Error::Unsupported(format!("writing the sample GPT: {e}"));
    let mut f = f;
    let mbr = gpt::mbr::ProtectiveMBR::with_lb_size(((size / 512) - 1).min(u32::MAX as u64) as u32);
    mbr.overwrite_lba0(&mut f).map_err(|e| Error::Unsupported(format!("writing the sample MBR: {e}")))?;
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .create_from_device(f, None)
        .map_err(gpt_err)?;
    let esp = disk.add_partition("EFI", 8 * MIB, gpt::partition_types::EFI, 0, None).map_err(gpt_err)?;
    let data = disk.add_partition("data", 24 * MIB, gpt::partition_types::LINUX_FS, 0, None).map_err(gpt_err)?;
    let spare = disk.add_partition("spare", 20 * MIB, gpt::partition_types::LINUX_FS, 0, None).map_err(gpt_err)?;
    let parts = disk.partitions().clone();
    let f = disk.write().map_err(gpt_err)?;
    let disk = Disk { file: f, ..Disk::open_source(path)? };
    let start = |id: u32| parts[&id].first_lba * 512;
    // Boot code area of the MBR (bytes 0..440), as a bootloader would fill it.
    disk.write_all_at(&random_bytes(440, 440), 0)?;
    disk.write_all_at(&text_bytes(3 * MIB as usize), start(esp))?;
    disk.write_all_at(&random_bytes(7, 6 * MIB as usize), start(data))?;
    disk.write_all_at(&text_bytes(8 * MIB as usize), start(data) + 10 * MIB)?;
    disk.write_all_at(&random_bytes(9, 64 << 10), start(spare) + 5 * MIB)?;
    disk.sync()?;
    Ok(path.to_path_buf())
}
