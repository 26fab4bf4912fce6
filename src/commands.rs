//! What each command does and prints. Reports go to stdout (text, or JSON
//! with --json); progress and errors go to stderr.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

use serde::Serialize;
use serde_json::json;

use crate::cli::{BackupArgs, Cli, CloneArgs, Command, ConvertArgs, InfoArgs, MountArgs, RestoreArgs, VerifyArgs};
use crate::engine::backup::{self, BackupOptions};
use crate::engine::czimage;
use crate::engine::feedback::Feedback;
use crate::engine::pipeline::default_workers;
use crate::engine::restore::{self, RestoreOptions};
use crate::engine::source;
use crate::engine::streams::PlanOptions;
use crate::engine::verify;
use crate::error::{Error, Result};
use crate::ui::human_bytes;
use crate::ui::progress::Console;

mod repo_cmds;

/// Mounts the sftp:// locations `cli` names (images and repositories) and
/// puts their local paths in their place; they stay mounted while the
/// returned guards live.
pub fn localize(cli: &mut Cli) -> Result<Vec<crate::image::location::RemoteMount>> {
    use crate::image::location::localize as here;
    let mut paths: Vec<&mut std::path::PathBuf> = Vec::new();
    match &mut cli.command {
        Command::Backup(a) => paths.push(&mut a.image),
        Command::Snapshots(a) => paths.push(&mut a.repo),
        Command::Forget(a) => paths.push(&mut a.repo),
        Command::Prune(a) => paths.push(&mut a.repo),
        Command::Check(a) => paths.push(&mut a.repo),
        Command::Unlock(a) => paths.push(&mut a.repo),
        Command::Init(a) => paths.push(&mut a.repo),
        Command::Copy(a) => paths.extend([&mut a.from, &mut a.to]),
        Command::Verify(a) => paths.push(&mut a.image),
        Command::Restore(a) => paths.push(&mut a.image),
        Command::Deploy(a) => paths.push(&mut a.image),
        Command::Info(a) => paths.push(&mut a.image),
        Command::Mount(a) => paths.push(&mut a.image),
        _ => {}
    }
    let mut mounts = Vec::new();
    let said = Console::verbose(cli.quiet, cli.verbose);
    for p in paths {
        let (local, mount) = here(p, &said)?;
        *p = local;
        mounts.extend(mount);
    }
    Ok(mounts)
}

/// Where the engine's progress, warnings and notes go for `cli`: the
/// console, quiet with --quiet.
pub(crate) fn feedback(cli: &Cli) -> Feedback {
    Console::verbose(cli.quiet, cli.verbose)
}

/// Runs the parsed command line.
pub fn run(cli: &Cli) -> Result<()> {
    if let Some(f) = &cli.passphrase_file {
        crate::repo::crypto::set_passphrase_file(f)?;
    }
    match &cli.command {
        Command::Disks => disks(cli),
        Command::Backup(a) => backup_cmd(cli, a),
        Command::Snapshots(a) => repo_cmds::snapshots(cli, a),
        Command::Forget(a) => repo_cmds::forget(cli, a),
        Command::Prune(a) => repo_cmds::prune(cli, a),
        Command::Check(a) => repo_cmds::check(cli, a),
        Command::Unlock(a) => repo_cmds::unlock(cli, a),
        Command::Init(a) => repo_cmds::init(cli, a),
        Command::Key(k) => repo_cmds::key(cli, k),
        Command::Copy(a) => repo_cmds::copy(cli, a),
        Command::Verify(a) => verify_cmd(cli, a),
        Command::Restore(a) => restore_cmd(cli, a),
        Command::Clone(a) => clone_cmd(cli, a),
        Command::Deploy(a) => deploy_cmd(cli, a),
        Command::Receive(a) => receive_cmd(cli, a),
        Command::Serve(a) => crate::live::pxe::serve(&crate::live::pxe::ServeOptions {
            interface: a.interface.clone(),
            live: a.live.clone(),
            dhcp_range: a.dhcp_range,
            append: a.append.clone(),
            http_port: a.http_port,
            uefi_http: a.uefi_http,
        }),
        Command::Info(a) => info_cmd(cli, a),
        Command::Convert(a) => convert_cmd(cli, a),
        Command::Mount(a) => mount_cmd(cli, a),
        Command::Umount(a) => crate::engine::mount::umount(&a.dir),
        Command::Demo(a) => crate::demo::run(a.dir.as_deref(), cli.quiet, cli.json),
        Command::Help(a) => help(&a.command),
        Command::Completions(a) => completions(a.shell),
        Command::Man(a) => man(a.dir.as_deref()),
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

/// `klon completions SHELL`: the shell's completion script on stdout.
fn completions(shell: clap_complete::Shell) -> Result<()> {
    use clap::CommandFactory;
    let full = crate::cli::Cli::command();
    // The generators offer hidden commands too: leave the live system's
    // own out.
    let mut cmd = clap::Command::new("klon")
        .disable_help_subcommand(true)
        .version(env!("CARGO_PKG_VERSION"))
        .args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|c| !c.is_hide_set()).cloned());
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "klon", &mut out);
    std::io::Write::write_all(&mut std::io::stdout(), &out)
        .map_err(|e| Error::io("writing the completions to", Path::new("stdout"), None, e))
}

/// `klon man [--dir DIR]`: klon.1 on stdout, or klon.1 and one page per
/// command (klon-backup.1, klon-key-add.1, …) written into DIR.
fn man(dir: Option<&Path>) -> Result<()> {
    use clap::CommandFactory;
    let mut cmd = crate::cli::Cli::command();
    cmd.build();
    let Some(dir) = dir else {
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd)
            .render(&mut out)
            .map_err(|e| Error::io("writing the man page to", Path::new("stdout"), None, e))?;
        return std::io::Write::write_all(&mut std::io::stdout(), &out)
            .map_err(|e| Error::io("writing the man page to", Path::new("stdout"), None, e));
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, None, e))?;
    // Hidden commands (the live system's own) get no page.
    let hidden = |c: &clap::Command| c.is_hide_set();
    let mut pages = vec![("klon".to_string(), cmd.clone())];
    let mut todo: Vec<(String, clap::Command)> =
        cmd.get_subcommands().filter(|c| !hidden(c)).map(|c| (format!("klon-{}", c.get_name()), c.clone())).collect();
    while let Some((name, c)) = todo.pop() {
        todo.extend(
            c.get_subcommands().filter(|s| !hidden(s)).map(|s| (format!("{name}-{}", s.get_name()), s.clone())),
        );
        pages.push((name, c));
    }
    for (name, c) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        let c = c.bin_name(name.replace('-', " "));
        clap_mangen::Man::new(c)
            .title(name.clone())
            .render(&mut out)
            .map_err(|e| Error::io("writing", &path, None, e))?;
        std::fs::write(&path, out).map_err(|e| Error::io("writing", &path, None, e))?;
    }
    Ok(())
}

/// Whether a command printed its JSON report (a failure's too).
static JSON_PRINTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn print_json(value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Unsupported(format!("encoding JSON: {e}")))?;
    println!("{text}");
    JSON_PRINTED.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// With `--json`, a command that failed without printing a report
/// prints one: `{"ok": false, "problem": "…", "exit_code": N}`.
pub fn json_failure(e: &Error) {
    if !JSON_PRINTED.load(std::sync::atomic::Ordering::Relaxed) {
        let _ = print_json(&serde_json::json!({ "ok": false, "problem": e.to_string(), "exit_code": e.exit_code() }));
    }
}

fn disks(cli: &Cli) -> Result<()> {
    #[allow(unused_mut)]
    let mut disks = crate::inventory::list_disks()?;
    // With the `udev` feature: serials udev knows and sysfs does not, and
    // the /dev/disk/by-id names.
    #[cfg(feature = "udev")]
    let by_id = crate::live::udev_props::enrich(&mut disks);
    if cli.json {
        print_json(&crate::ui::disks::to_json(&disks))
    } else {
        print!("{}", crate::ui::disks::render(&disks, std::io::stdout().is_terminal()));
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
        feedback: feedback(cli),
        workers,
        plan: PlanOptions { raw_all: a.read.raw, raw_unclean: a.read.raw_unclean },
        rescue: a.rescue,
    };
    if a.repo || a.encrypt || crate::repo::is_repository(&a.image) {
        return repo_cmds::backup(cli, a, &opts);
    }
    if a.label.is_some() || !a.tags.is_empty() || a.keep.is_some() {
        return Err(Error::Usage(format!(
            "--label, --tag and --keep are for snapshots of a repository; {} is not one (give --repo to make it one)",
            a.image.display()
        )));
    }
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
    let result = verify::verify(image, workers, &Console::feedback(quiet));
    verify::record_result(image, &result);
    result.map(Some).map_err(|e| {
        e.with_note(&format!(
            "the image at {} was written but does not read back correctly: do not rely on it; check the image drive",
            image.display()
        ))
    })
}

fn verify_cmd(cli: &Cli, a: &VerifyArgs) -> Result<()> {
    let r = match source::verify(&a.image, threads(a.threads)?, &feedback(cli)) {
        Ok(r) => r,
        Err(e) => {
            // The report says what failed too; the exit code stays the error's.
            if cli.json {
                print_json(&json!({
                    "image": a.image, "ok": false, "problem": e.to_string(), "exit_code": e.exit_code(),
                }))?;
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
    // Wrapped at words to the terminal's width (a terminal cuts words).
    let width = console::Term::stderr().size_checked().map_or(80, |(_, w)| usize::from(w).max(40));
    eprint!("{}", crate::ui::wizard::screen::wrap(description, width - 1));
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
    if let Some(name) = &a.volume {
        let plan = crate::engine::volume::prepare(&a.image, &a.target, name, &feedback(cli))?;
        confirm(&plan.target.path, &plan.describe(), a.write.yes)?;
        let r = plan.restore(!a.write.no_verify_after, &feedback(cli))?;
        if cli.json {
            return print_json(&json!({
                "image": a.image, "volume": name, "target": a.target, "bytes_written": r.bytes_written,
                "verified": r.verified, "seconds": r.seconds,
            }));
        }
        if !cli.quiet {
            println!(
                "Restored volume {name} of {} to {}: {} in {:.1} s{}",
                a.image.display(),
                a.target.display(),
                human_bytes(r.bytes_written),
                r.seconds,
                if r.verified { ", read back and compared" } else { "" }
            );
        }
        return Ok(());
    }
    let opts = RestoreOptions {
        grow_last: a.write.grow_last,
        verify_after: !a.write.no_verify_after,
        feedback: feedback(cli),
        workers: threads(a.threads)?,
    };
    if a.grow_all && a.write.grow_last {
        return Err(Error::Usage(
            "--grow-all grows every partition klon can, --grow-last only the last: choose one".into(),
        ));
    }
    let plan = match a.partition {
        None => source::prepare_restore_fit(&a.image, &a.target, a.grow_all, &opts.feedback)?,
        Some(_) if a.write.grow_last => {
            return Err(Error::Usage(
                "--grow-last grows a disk's last partition; it does not go with --partition".into(),
            ));
        }
        Some(n) => source::prepare_partition_restore(&a.image, &a.target, n, a.to, &opts.feedback)?,
    };
    if a.write.yes {
        // Without --yes the confirmation shows them.
        for w in plan.source.warnings() {
            eprintln!("klon: warning: {w}");
        }
    }
    confirm(&plan.target.path, &plan.describe(), a.write.yes)?;
    let r = plan.restore(&opts)?;
    report_written(cli, "Restored", "image", &a.image, &a.target, &r)
}

fn deploy_cmd(cli: &Cli, a: &crate::cli::DeployArgs) -> Result<()> {
    use crate::engine::deploy::{DeployOptions, deploy};
    if a.clients.is_none() && a.wait.is_none() {
        return Err(Error::Usage(
            "klon deploy needs --clients N (start when N machines joined) or --wait SECONDS (start that long after \
             the first joined), or both"
                .into(),
        ));
    }
    let opts = DeployOptions {
        interface: a.interface.clone(),
        port: a.port,
        clients: a.clients,
        wait: a.wait,
        max_bitrate: a.max_bitrate.clone(),
        report_wait: std::time::Duration::from_secs(a.report_wait),
        late: a.late.map(std::time::Duration::from_secs),
        feedback: feedback(cli),
    };
    let exported = match crate::engine::export::needs_export(&a.image) {
        true => Some(export_for_deploy(cli, a)?),
        false => None,
    };
    let r = deploy(exported.as_ref().map_or(&a.image, |e| &e.0), &opts)?;
    if cli.json {
        let receivers: Vec<_> = r
            .receivers
            .iter()
            .map(|r| {
                json!({"ip": r.ip, "unicast": r.unicast, "ok": r.outcome.as_ref().is_some_and(|o| o.ok),
                       "report": r.outcome})
            })
            .collect();
        print_json(
            &json!({"image": a.image, "bytes_sent": r.bytes_sent, "seconds": r.seconds, "receivers": receivers}),
        )?;
    } else if !cli.quiet {
        println!("{}", r.text());
    }
    if r.all_ok() {
        Ok(())
    } else {
        let failed: Vec<&str> =
            r.receivers.iter().filter(|r| !r.outcome.as_ref().is_some_and(|o| o.ok)).map(|r| r.ip.as_str()).collect();
        Err(Error::Unsupported(if r.receivers.is_empty() {
            "no receiver joined".into()
        } else {
            format!("the image did not reach every machine whole: {} failed (see the summary)", failed.join(", "))
        }))
    }
}

fn receive_cmd(cli: &Cli, a: &crate::cli::ReceiveArgs) -> Result<()> {
    use crate::engine::deploy::{ReceiveOptions, receive};
    if !a.write.yes {
        return Err(Error::Refused(format!(
            "klon receive writes {} as soon as the image arrives, with nobody to ask: add --yes",
            a.target.display()
        )));
    }
    let opts = ReceiveOptions {
        interface: a.interface.clone(),
        port: a.port,
        restore: RestoreOptions {
            grow_last: a.write.grow_last,
            verify_after: !a.write.no_verify_after,
            feedback: feedback(cli),
            workers: threads(None)?,
        },
    };
    let r = receive(&a.target, &opts)?;
    report_written(cli, "Received and restored", "source", Path::new("the multicast stream"), &a.target, &r)
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
            "verified": r.verified, "table_reread": r.table_reread, "seconds": r.seconds,
            "growth": r.growth, "resized": r.resized,
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
        if let Some(note) = r.table_note(to) {
            println!("{note}");
        }
        if let Some(g) = r.growth.as_ref().filter(|g| g.grown) {
            println!("{}", g.note);
        }
        for g in r.resized.iter().filter(|g| g.grown) {
            println!("{}", g.note);
        }
    }
    for g in r.growth.iter().chain(&r.resized).filter(|g| !g.grown) {
        eprintln!("klon: warning: {}", g.note);
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
        feedback: feedback(cli),
        workers: threads(a.threads)?,
    };
    let r = crate::engine::clone::clone(plan, &opts)?;
    report_written(cli, "Cloned", "source", &a.source, &a.target, &r)
}

/// A klon image written for `klon deploy`, removed when dropped.
struct Exported(std::path::PathBuf);

impl Drop for Exported {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes the snapshot or Clonezilla image `a.image` as a klon image under
/// `--export-dir` (the temporary directory by default), after checking
/// that it has room for it.
fn export_for_deploy(cli: &Cli, a: &crate::cli::DeployArgs) -> Result<Exported> {
    use crate::engine::export::{ExportOptions, Exportable};
    let base = a.export_dir.clone().unwrap_or_else(std::env::temp_dir);
    let source = Exportable::open(&a.image, &feedback(cli))?;
    let need = source.most_bytes()?;
    let free = nix::sys::statvfs::statvfs(&base)
        .map(|v| v.blocks_available() * v.fragment_size())
        .map_err(|e| Error::io("reading the free space of", &base, None, e.into()))?;
    if free < need {
        return Err(Error::Refused(format!(
            "{} is sent as a klon image, written first into {}: it may need up to {} and {} is free there; give \
             --export-dir DIR on a drive with room",
            a.image.display(),
            base.display(),
            crate::units::human_bytes(need),
            crate::units::human_bytes(free)
        )));
    }
    crate::scratch::remove_stale(&base, "deploy");
    let dir = crate::scratch::path_in(&base, "deploy");
    let opts = ExportOptions {
        level: crate::engine::backup::DEFAULT_LEVEL,
        workers: default_workers(),
        feedback: feedback(cli),
    };
    // Removed also when the export fails half-way (the sink removes its
    // partial directory; this removes a finished one).
    let image = source.write(&dir, &opts)?;
    Ok(Exported(image))
}

fn convert_cmd(cli: &Cli, a: &ConvertArgs) -> Result<()> {
    let workers = threads(a.threads)?;
    let opts = czimage::ConvertOptions { level: a.level, split_size: a.split, feedback: feedback(cli), workers };
    if a.repo || crate::repo::is_repository(&a.image) {
        return repo_cmds::convert(cli, a, &opts);
    }
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

fn mount_cmd(cli: &Cli, a: &MountArgs) -> Result<()> {
    let opts = crate::engine::mount::MountOptions {
        foreground: a.foreground,
        mount_filesystems: a.mount_filesystems,
        feedback: feedback(cli),
    };
    crate::engine::mount::mount(&a.image, &a.dir, &opts, |m| {
        let files: Vec<_> =
            m.files.iter().map(|f| json!({ "name": f.name, "start": f.start, "size": f.size })).collect();
        if cli.json {
            let _ =
                print_json(&json!({ "image": m.image, "dir": m.dir, "files": files, "filesystems": m.filesystems }));
        } else if !cli.quiet {
            print!("{}", m.text());
        }
        let _ = std::io::stdout().flush();
    })
}

fn info_cmd(cli: &Cli, a: &InfoArgs) -> Result<()> {
    let source = match source::open(&a.image, "info", &feedback(cli)) {
        Ok(s) => s,
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
    let (text, json) = source.info();
    if cli.json {
        return print_json(&json);
    }
    print!("{text}");
    Ok(())
}
