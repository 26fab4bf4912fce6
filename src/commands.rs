//! What each command does and prints. Reports go to stdout (text, or JSON
//! with --json); progress and errors go to stderr.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use serde::Serialize;
use serde_json::json;

use crate::cli::{BackupArgs, Cli, CloneArgs, Command, ConvertArgs, InfoArgs, RestoreArgs, VerifyArgs};
use crate::clonezilla::is_clonezilla_image;
use crate::engine::backup::{self, BackupOptions};
use crate::engine::czimage;
use crate::engine::pipeline::default_workers;
use crate::engine::restore::{self, RestoreOptions};
use crate::engine::streams::PlanOptions;
use crate::engine::verify;
use crate::error::{Error, Result};
use crate::image::reader::describe_stream;
use crate::image::{ImageReader, Manifest};
use crate::ui::human_bytes;

/// Runs the parsed command line.
pub fn run(cli: &Cli) -> Result<()> {
    match &cli.command {
        Command::Disks => disks(cli),
        Command::Backup(a) => backup_cmd(cli, a),
        Command::Verify(a) => verify_cmd(cli, a),
        Command::Restore(a) => restore_cmd(cli, a),
        Command::Clone(a) => clone_cmd(cli, a),
        Command::Info(a) => info_cmd(cli, a),
        Command::Convert(a) => convert_cmd(cli, a),
        Command::Demo(a) => crate::demo::run(a.dir.as_deref(), cli.quiet, cli.json),
        Command::Help(a) => help(&a.command),
        Command::Live(a) => crate::live::run(cli, a),
    }
}

/// `klon help [COMMAND...]`: the help of klon, or of the command named.
fn help(names: &[String]) -> Result<()> {
    use clap::CommandFactory;
    let mut cmd = crate::cli::Cli::command();
    cmd.build();
    let mut cur = &mut cmd;
    for name in names {
        cur = cur
            .find_subcommand_mut(name)
            .ok_or_else(|| Error::Usage(format!("klon has no command {name:?}; `klon help` lists the commands")))?;
    }
    cur.print_long_help().map_err(|e| Error::io("writing the help to", Path::new("stdout"), None, e))
}

fn print_json(value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Unsupported(format!("encoding JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

fn disks(cli: &Cli) -> Result<()> {
    #[allow(unused_mut)]
    let mut disks = crate::device::sysfs::list_disks()?;
    // With the `udev` feature: serials udev knows and sysfs does not, and
    // the /dev/disk/by-id names.
    #[cfg(feature = "udev")]
    let by_id = crate::live::udev_props::enrich(&mut disks);
    if cli.json {
        print_json(&disks)
    } else {
        print!("{}", crate::device::sysfs::render_disks(&disks));
        #[cfg(feature = "udev")]
        for (d, names) in disks.iter().zip(&by_id) {
            for n in names {
                println!("{n} -> {}", d.path.display());
            }
        }
        Ok(())
    }
}

fn threads(t: Option<usize>) -> Result<usize> {
    match t {
        Some(0) => Err(Error::Usage("--threads must be at least 1".into())),
        Some(n) => Ok(n),
        None => Ok(default_workers()),
    }
}

fn backup_cmd(cli: &Cli, a: &BackupArgs) -> Result<()> {
    let workers = threads(a.threads)?;
    let opts = BackupOptions {
        level: a.level,
        split_size: a.split,
        allow_mounted: a.read.allow_mounted,
        quiet: cli.quiet,
        workers,
        plan: PlanOptions { raw_all: a.read.raw, raw_unclean: a.read.raw_unclean },
    };
    let report = backup::backup(&a.source, &a.image, &opts)?;
    let verified = verify_new_image(&report.image, a.no_verify, workers, cli.quiet)?;
    if cli.json {
        return print_json(&json!({
            "image": report.image,
            "seconds": report.seconds,
            "read_bytes": report.read_bytes,
            "image_bytes": report.image_bytes,
            "verified": verified.is_some(),
            "warnings": report.warnings,
            "streams": report.manifest.streams.iter().map(|s| json!({
                "name": s.name, "partition": s.partition, "method": s.method,
                "stored_bytes": s.stored_bytes, "compressed_bytes": s.compressed_bytes,
            })).collect::<Vec<_>>(),
        }));
    }
    if !cli.quiet {
        let ratio = if report.image_bytes > 0 { report.read_bytes as f64 / report.image_bytes as f64 } else { 0.0 };
        println!(
            "Backed up {} ({}) to {} in {:.1} s: read {}, image {} ({ratio:.1}:1){}",
            a.source.display(),
            human_bytes(report.manifest.source.size),
            report.image.display(),
            report.seconds,
            human_bytes(report.read_bytes),
            human_bytes(report.image_bytes),
            match &verified {
                Some(v) => format!(", verified in {:.1} s", v.seconds),
                None => ", not verified (--no-verify)".to_string(),
            }
        );
    }
    Ok(())
}

/// Reads a newly written image back (unless `skip`), keeping the outcome.
fn verify_new_image(image: &Path, skip: bool, workers: usize, quiet: bool) -> Result<Option<verify::VerifyReport>> {
    if skip {
        return Ok(None);
    }
    let result = verify::verify(image, workers, quiet);
    verify::record_result(image, &result);
    result.map(Some).map_err(|e| {
        e.with_note(&format!(
            "the image at {} was written but does not read back correctly: do not rely on it; check the image drive",
            image.display()
        ))
    })
}

fn verify_cmd(cli: &Cli, a: &VerifyArgs) -> Result<()> {
    let r = match czimage::verify_any(&a.image, threads(a.threads)?, cli.quiet) {
        Ok(r) => r,
        Err(e) => {
            // The report says what failed too; the exit code stays the error's.
            if cli.json {
                print_json(&json!({ "image": a.image, "ok": false, "problem": e.to_string() }))?;
            }
            return Err(e);
        }
    };
    if cli.json {
        return print_json(&json!({
            "image": a.image, "ok": true, "streams": r.streams, "chunks": r.chunks,
            "bytes": r.bytes, "seconds": r.seconds,
        }));
    }
    if !cli.quiet {
        println!(
            "{}: OK — {} streams, {} chunks, {} checked in {:.1} s",
            a.image.display(),
            r.streams,
            r.chunks,
            human_bytes(r.bytes),
            r.seconds
        );
    }
    Ok(())
}

/// Asks before overwriting `target`: on a terminal the person types the
/// target's name; elsewhere `--yes` is required.
fn confirm(target: &Path, description: &str, yes: bool) -> Result<()> {
    if yes {
        return Ok(());
    }
    let shown = target.display().to_string();
    if !std::io::stdin().is_terminal() {
        return Err(Error::Refused(format!(
            "this overwrites {shown}; standard input is not a terminal, so confirm with --yes"
        )));
    }
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or(shown.clone());
    eprintln!("{description}");
    eprint!("Type {name} to overwrite it, anything else to cancel: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| Error::io("reading the confirmation from", Path::new("stdin"), None, e))?;
    if line.trim() == name { Ok(()) } else { Err(Error::Cancelled(format!("nothing was written to {shown}"))) }
}

fn restore_cmd(cli: &Cli, a: &RestoreArgs) -> Result<()> {
    let opts = RestoreOptions {
        grow_last: a.write.grow_last,
        verify_after: !a.write.no_verify_after,
        quiet: cli.quiet,
        workers: threads(a.threads)?,
    };
    let plan = czimage::AnyRestorePlan::prepare(&a.image, &a.target)?;
    confirm(&plan.target().path, &plan.describe(), a.write.yes)?;
    let r = plan.restore(&opts)?;
    report_written(cli, "Restored", "image", &a.image, &a.target, &r)
}

/// The report of a restore or a clone.
fn report_written(
    cli: &Cli,
    done: &str,
    from_key: &str,
    from: &Path,
    to: &Path,
    r: &restore::RestoreReport,
) -> Result<()> {
    if cli.json {
        return print_json(&json!({
            from_key: from, "target": to, "bytes_written": r.bytes_written,
            "verified": r.verified, "seconds": r.seconds,
        }));
    }
    if !cli.quiet {
        println!(
            "{done} {} to {} in {:.1} s: wrote {}{}",
            from.display(),
            to.display(),
            r.seconds,
            human_bytes(r.bytes_written),
            if r.verified { ", read back and compared" } else { ", not read back (--no-verify-after)" }
        );
    }
    Ok(())
}

fn clone_cmd(cli: &Cli, a: &CloneArgs) -> Result<()> {
    let plan = crate::engine::clone::prepare(
        &a.source,
        &a.target,
        PlanOptions { raw_all: a.read.raw, raw_unclean: a.read.raw_unclean },
        a.read.allow_mounted,
    )?;
    for w in &plan.warnings {
        eprintln!("klon: warning: {w}");
    }
    confirm(&plan.target.path, &plan.describe(), a.write.yes)?;
    let opts = crate::engine::clone::CloneOptions {
        grow_last: a.write.grow_last,
        verify_after: !a.write.no_verify_after,
        quiet: cli.quiet,
        workers: threads(a.threads)?,
    };
    let r = crate::engine::clone::clone(plan, &opts)?;
    report_written(cli, "Cloned", "source", &a.source, &a.target, &r)
}

fn convert_cmd(cli: &Cli, a: &ConvertArgs) -> Result<()> {
    let workers = threads(a.threads)?;
    let opts = czimage::ConvertOptions { level: a.level, split_size: a.split, quiet: cli.quiet, workers };
    let report = czimage::convert(&a.clonezilla_image, &a.image, &opts)?;
    let verified = verify_new_image(&report.image, a.no_verify, workers, cli.quiet)?;
    if cli.json {
        return print_json(&json!({
            "clonezilla_image": a.clonezilla_image, "image": report.image, "seconds": report.seconds,
            "bytes": report.bytes, "image_bytes": report.image_bytes, "verified": verified.is_some(),
        }));
    }
    if !cli.quiet {
        println!(
            "Converted {} to {} in {:.1} s: {} of data, image {}{}",
            a.clonezilla_image.display(),
            report.image.display(),
            report.seconds,
            human_bytes(report.bytes),
            human_bytes(report.image_bytes),
            match &verified {
                Some(v) => format!(", verified in {:.1} s", v.seconds),
                None => ", not verified (--no-verify)".to_string(),
            }
        );
    }
    Ok(())
}

fn cz_info(cli: &Cli, dir: &Path) -> Result<()> {
    let src = czimage::CzSource::open(dir)?;
    let im = &src.image;
    let streams = src.stream_infos();
    if cli.json {
        return print_json(&json!({
            "image": dir,
            "format": "clonezilla",
            "disk": im.disk,
            "layout": im.layout,
            "streams": streams,
            "partition_images": im.partitions.iter().map(|p| json!({
                "partition": p.number, "device": p.device, "fs": p.fs,
                "kind": format!("{:?}", p.kind).to_lowercase(), "codec": format!("{:?}", p.codec).to_lowercase(),
                "pieces": p.pieces, "bytes": p.pieces.iter().map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0)).sum::<u64>(),
            })).collect::<Vec<_>>(),
            "checksum_files": im.checksum_files,
            "warnings": im.warnings,
        }));
    }
    print!("{}", render_cz_info(&src));
    Ok(())
}

/// The text `klon info` prints for a Clonezilla image.
pub fn render_cz_info(src: &czimage::CzSource) -> String {
    use std::fmt::Write as _;
    let im = &src.image;
    let mut o = String::new();
    let _ = writeln!(o, "Image:        {} (Clonezilla)", im.dir.display());
    let _ = writeln!(
        o,
        "Source:       {} — {}, {} bytes, {}-byte sectors",
        im.disk,
        human_bytes(im.layout.disk_size),
        im.layout.disk_size,
        im.layout.sector_size
    );
    let _ = writeln!(
        o,
        "Table:        {:?}{}",
        im.layout.kind,
        im.layout.disk_id.as_deref().map(|x| format!(", disk id {x}")).unwrap_or_default()
    );
    let _ = writeln!(o, "Streams:");
    for st in src.stream_infos() {
        let _ = writeln!(
            o,
            "  {:<24} start {:>14}  size {:>10}  {}",
            describe_stream(&st),
            st.start,
            human_bytes(st.length),
            st.fs.as_ref().map(|f| f.fstype.as_str()).unwrap_or("-")
        );
        let _ = writeln!(o, "  {:<24} {}; {} stored", "", st.method_reason, human_bytes(st.stored_bytes));
        if let Some(p) = im.partitions.iter().find(|p| Some(p.number) == st.partition) {
            let bytes: u64 = p.pieces.iter().map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0)).sum();
            let names: Vec<String> =
                p.pieces.iter().map(|f| f.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
            let shown = if names.len() > 3 {
                format!("{} … {} ({} pieces)", names[0], names[names.len() - 1], names.len())
            } else {
                names.join(", ")
            };
            let _ = writeln!(o, "  {:<24} {:?}-compressed, {}: {shown}", "", p.codec, human_bytes(bytes));
        }
    }
    if im.checksum_files.is_empty() {
        let _ = writeln!(o, "Checksums:    partclone's own (no checksum files)");
    } else {
        let names: Vec<String> = im
            .checksum_files
            .iter()
            .map(|f| f.file_name().unwrap_or_default().to_string_lossy().into_owned())
            .collect();
        let _ = writeln!(o, "Checksums:    partclone's own, and {}", names.join(", "));
    }
    for w in &im.warnings {
        let _ = writeln!(o, "Note:         {w}");
    }
    let _ = writeln!(o, "Verified:     run klon verify (reads every byte; nothing is written to the image)");
    o
}

fn info_cmd(cli: &Cli, a: &InfoArgs) -> Result<()> {
    if is_clonezilla_image(&a.image) {
        return cz_info(cli, &a.image);
    }
    let reader = match ImageReader::open(&a.image) {
        Ok(r) => r,
        Err(e @ Error::Corrupt(_)) => {
            if cli.json {
                print_json(&json!({ "image": a.image, "complete": false, "problem": e.to_string() }))?;
            } else {
                println!("Image:        {}\nComplete:     no — {e}", a.image.display());
            }
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let m = &reader.manifest;
    let last_verify = verify::last_result(&a.image);
    if cli.json {
        return print_json(&json!({
            "image": a.image,
            "complete": true,
            "last_verify": last_verify,
            "image_bytes": backup::image_size(m),
            "manifest": m,
        }));
    }
    print!("{}", render_info(&a.image, m));
    match last_verify {
        Some(v) if v.ok => println!("Verified:     OK on {} (klon {})", v.time, v.klon_version),
        Some(v) => {
            println!("Verified:     FAILED on {}: {}", v.time, v.problem.as_deref().unwrap_or("unknown problem"))
        }
        None => println!("Verified:     never (run klon verify)"),
    }
    Ok(())
}

/// The text `klon info` prints.
pub fn render_info(dir: &Path, m: &Manifest) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let s = &m.source;
    let _ = writeln!(o, "Image:        {}", dir.display());
    let _ = writeln!(o, "Complete:     yes (size {})", human_bytes(backup::image_size(m)));
    let _ = writeln!(o, "Created:      {} by klon {} (format {})", m.created, m.klon_version, m.format_version);
    let _ = writeln!(
        o,
        "Source:       {} — {}, {} bytes, {}/{}-byte sectors, {}{}{}",
        s.path,
        human_bytes(s.size),
        s.size,
        s.logical_sector_size,
        s.physical_sector_size,
        s.transport.as_deref().unwrap_or("unknown"),
        s.model.as_deref().map(|x| format!(", model {x}")).unwrap_or_default(),
        s.serial.as_deref().map(|x| format!(", serial {x}")).unwrap_or_default(),
    );
    let _ = writeln!(
        o,
        "Table:        {:?}{}",
        m.layout.kind,
        m.layout.disk_id.as_deref().map(|x| format!(", disk id {x}")).unwrap_or_default()
    );
    let _ = writeln!(
        o,
        "Compression:  {} level {}, {} KiB chunks",
        m.compression.algorithm,
        m.compression.level,
        m.chunk_size >> 10
    );
    let _ = writeln!(o, "Streams:");
    for st in &m.streams {
        let part = m.layout.partitions.iter().find(|p| Some(p.number) == st.partition);
        let fs = st
            .fs
            .as_ref()
            .map(|f| format!("{}{}", f.fstype, f.label.as_deref().map(|l| format!(" \"{l}\"")).unwrap_or_default()))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            o,
            "  {:<24} start {:>14}  size {:>10}  {}",
            describe_stream(st),
            st.start,
            human_bytes(st.length),
            part.map(|p| format!(
                "type {}{}",
                p.type_id,
                if p.name.is_empty() { String::new() } else { format!(" \"{}\"", p.name) }
            ))
            .unwrap_or_default()
        );
        let uuid = st.fs.as_ref().and_then(|f| f.uuid.as_deref()).map(|u| format!(", UUID {u}")).unwrap_or_default();
        let used = match (st.fs_used_bytes, st.fs_total_bytes, st.fs_block_size) {
            (Some(u), Some(t), Some(b)) => format!(", {} used of {} ({b}-byte blocks)", human_bytes(u), human_bytes(t)),
            _ => String::new(),
        };
        let _ = writeln!(o, "  {:<24} filesystem {fs}{uuid}{used}", "");
        let _ = writeln!(
            o,
            "  {:<24} method {}: {}; stored {} -> {} in {} chunks",
            "",
            st.method,
            st.method_reason,
            human_bytes(st.stored_bytes),
            human_bytes(st.compressed_bytes),
            st.chunks
        );
    }
    o
}
