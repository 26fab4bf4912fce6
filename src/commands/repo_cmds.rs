//! The commands of repositories: backup and convert into one, snapshots,
//! forget, prune, check, copy, unlock.

use serde_json::json;

use super::{feedback, print_json};
use crate::cli::{
    BackupArgs, CheckArgs, Cli, ConvertArgs, CopyArgs, ForgetArgs, InitArgs, KeyCommand, PruneArgs, SnapshotsArgs,
    UnlockArgs,
};
use crate::engine::backup::BackupOptions;
use crate::engine::czimage::ConvertOptions;
use crate::engine::snapshot::{self, SnapshotOptions};
use crate::error::{Error, Result};
use crate::repo::crypto;
use crate::repo::{Keep, Repository, check as repo_check, lock, prune as repo_prune};
use crate::ui::human_bytes;

/// `klon backup SOURCE REPO`: a new snapshot.
pub(super) fn backup(cli: &Cli, a: &BackupArgs, opts: &BackupOptions) -> Result<()> {
    let window = u32::try_from(a.window).map_err(|_| Error::Usage("--window is at most 8M".into()))?;
    let keep = match &a.keep {
        Some(k) => Some(Keep::parse(k).map_err(|why| Error::Usage(format!("--keep {k}: {why}")))?),
        None => None,
    };
    let sopts = SnapshotOptions { label: a.label.clone(), tags: a.tags.clone(), window, encrypt: a.encrypt };
    let report = snapshot::backup_to_repository(&a.source, &a.image, opts, &sopts)?;
    show_recovery_key(&report.repository, report.recovery_key.as_deref());
    let verified = verify_added(cli, &report, a.no_verify)?;
    let s = &report.snapshot;
    let full: u64 = s.image.streams.iter().map(|st| st.stored_bytes).sum();
    if !cli.quiet && !cli.json {
        let what = format!("Backed up {} ({})", a.source.display(), human_bytes(s.image.source.size));
        println!("{what} as {}", added_summary(&report, verified.is_some()));
    }
    if let Some(k) = &keep {
        Repository::open(&a.image)?.save_keep(k)?;
    }
    let kept = apply_saved_policy(cli, &a.image)
        .map_err(|e| e.with_note(&format!("the backup itself succeeded: snapshot {} is complete", &report.id[..8])))?;
    if cli.json {
        return print_json(&json!({
            "repository": report.repository,
            "created_repository": report.created_repository,
            "snapshot": report.id,
            "seconds": report.seconds,
            "read_bytes": report.read_bytes,
            "content_bytes": full,
            "added": s.added,
            "reused_chunks": report.reused_chunks,
            "verified": verified.is_some(),
            "warnings": report.warnings,
            "keep": kept,
            "recovery_key": report.recovery_key,
        }));
    }
    Ok(())
}

/// Shows the recovery key of a new encrypted repository, on standard
/// error (even with --quiet: it is shown only this once).
fn show_recovery_key(repo: &std::path::Path, key: Option<&str>) {
    if let Some(k) = key {
        eprintln!(
            "klon: {} is encrypted. Its recovery key unlocks it if the passphrase is lost; write it down and keep it \
             apart from the drive, it is shown only now:\n\n    {k}\n",
            repo.display()
        );
    }
}

/// "snapshot ID of REPO in S s: read …, added … in N new chunks …": what
/// a backup or conversion into a repository did.
fn added_summary(report: &snapshot::SnapshotReport, verified: bool) -> String {
    let s = &report.snapshot;
    format!(
        "snapshot {} of {}{} in {:.1} s: read {}, added {} in {} new chunks ({} chunks were there already){}",
        &report.id[..8],
        report.repository.display(),
        if report.created_repository { " (new repository)" } else { "" },
        report.seconds,
        human_bytes(report.read_bytes),
        human_bytes(s.added.stored_bytes),
        s.added.chunks,
        report.reused_chunks,
        if verified { ", what it added verified" } else { ", not verified (--no-verify)" }
    )
}

/// Reads back what a new snapshot added (unless `no_verify`).
fn verify_added(cli: &Cli, report: &snapshot::SnapshotReport, no_verify: bool) -> Result<Option<u64>> {
    if no_verify {
        return Ok(None);
    }
    let bytes = snapshot::verify_added(&report.repository, &report.packs_written, &feedback(cli)).map_err(|e| {
        e.with_note(&format!(
            "snapshot {} was written but what it added does not read back correctly: do not rely on it; \
             check the drive, then run klon check --read-data {}",
            &report.id[..8],
            report.repository.display()
        ))
    })?;
    Ok(Some(bytes))
}

/// `klon convert CLONEZILLA-IMAGE REPO`: the Clonezilla image as a new
/// snapshot.
pub(super) fn convert(cli: &Cli, a: &ConvertArgs, opts: &ConvertOptions) -> Result<()> {
    let window = u32::try_from(a.window).map_err(|_| Error::Usage("--window is at most 8M".into()))?;
    let sopts = SnapshotOptions { label: a.label.clone(), tags: a.tags.clone(), window, encrypt: false };
    let report = crate::engine::czimage::convert_to_repository(&a.clonezilla_image, &a.image, opts, &sopts)?;
    let verified = verify_added(cli, &report, a.no_verify)?;
    let s = &report.snapshot;
    if cli.json {
        return print_json(&json!({
            "clonezilla_image": a.clonezilla_image,
            "repository": report.repository,
            "created_repository": report.created_repository,
            "snapshot": report.id,
            "seconds": report.seconds,
            "bytes": report.read_bytes,
            "added": s.added,
            "reused_chunks": report.reused_chunks,
            "verified": verified.is_some(),
        }));
    }
    if !cli.quiet {
        println!("Converted {} to {}", a.clonezilla_image.display(), added_summary(&report, verified.is_some()));
    }
    Ok(())
}

/// `klon snapshots REPO`.
pub(super) fn snapshots(cli: &Cli, a: &SnapshotsArgs) -> Result<()> {
    let repo = Repository::open(&a.repo)?;
    let all = repo.snapshots()?;
    let growth = growth(&repo, &all)?;
    if cli.json {
        let list: Vec<_> = all
            .iter()
            .map(|s| {
                let f = &s.file;
                json!({
                    "id": s.id, "short_id": s.short_id(), "time": f.time, "sequence": f.sequence, "created": f.created,
                    "utc_offset": f.utc_offset, "hostname": f.hostname, "label": f.label, "tags": f.tags,
                    "source": f.image.source,
                    "content_bytes": f.image.streams.iter().map(|st| st.stored_bytes).sum::<u64>(),
                    "added": f.added,
                    "last_check": repo_check::last(&repo, &s.id),
                })
            })
            .collect();
        return print_json(&json!({
            "repository": repo.dir, "encrypted": repo.keys.encrypted(), "snapshots": list, "growth": growth
        }));
    }
    if all.is_empty() {
        println!("{}: no snapshots yet", repo.dir.display());
        return Ok(());
    }
    println!(
        "{:<9} {:<20} {:<16} {:<28} {:>10} {:>10}  last check",
        "id", "time (UTC)", "host", "source", "size", "added"
    );
    for s in &all {
        let f = &s.file;
        let src = &f.image.source;
        let source = format!(
            "{} {}",
            src.model.as_deref().unwrap_or(&src.path),
            src.serial.as_deref().map(|x| format!("#{x}")).unwrap_or_default()
        );
        let check = match repo_check::last(&repo, &s.id) {
            Some(c) if c.ok => format!("OK {}", &c.time[..10]),
            Some(c) => format!("FAILED {}", &c.time[..10]),
            None => "never".into(),
        };
        println!(
            "{:<9} {:<20} {:<16} {:<28} {:>10} {:>10}  {check}{}",
            s.short_id(),
            f.created.replace('T', " ").trim_end_matches('Z'),
            f.label.as_deref().unwrap_or(&f.hostname),
            source.trim().chars().take(28).collect::<String>(),
            human_bytes(f.image.streams.iter().map(|st| st.stored_bytes).sum()),
            human_bytes(f.added.stored_bytes),
            if f.tags.is_empty() { String::new() } else { format!("  [{}]", f.tags.join(",")) }
        );
    }
    println!(
        "\n{} snapshots holding {} of disk content in {} of {}packs: {:.1}× deduplication and compression.",
        all.len(),
        human_bytes(growth.content_bytes),
        human_bytes(growth.pack_bytes),
        if repo.keys.encrypted() { "encrypted " } else { "" },
        if growth.pack_bytes > 0 { growth.content_bytes as f64 / growth.pack_bytes as f64 } else { 0.0 }
    );
    if let (Some(avg), None) = (growth.average_added, growth.free_bytes) {
        println!("The last backups added {} each on average.", human_bytes(avg));
    } else if let (Some(avg), Some(free)) = (growth.average_added, growth.free_bytes) {
        println!(
            "The last backups added {} each on average; {} free on the drive hold about {} more like them.",
            human_bytes(avg),
            human_bytes(free),
            growth.more_backups.map(|n| n.to_string()).unwrap_or_else(|| "many".into())
        );
    }
    Ok(())
}

/// How a repository grows.
#[derive(Debug, serde::Serialize)]
struct Growth {
    /// Disk content all snapshots hold, counted once per snapshot.
    content_bytes: u64,
    /// Bytes of the repository's packs.
    pack_bytes: u64,
    /// Bytes free on the filesystem that holds the repository (none
    /// known for object storage).
    free_bytes: Option<u64>,
    /// What each of the last (up to 10) backups but the first added, on average.
    average_added: Option<u64>,
    /// How many more such backups fit in the free room.
    more_backups: Option<u64>,
}

fn growth(repo: &Repository, all: &[crate::repo::SnapshotEntry]) -> Result<Growth> {
    let content_bytes = all.iter().flat_map(|s| &s.file.image.streams).map(|st| st.stored_bytes).sum();
    // One index at a time: all of them at once (repo.load_index) would
    // hold every chunk's entry in memory for a sum of pack sizes.
    let mut pack_bytes = 0;
    for (name, _) in repo.pack_names(".idx")? {
        pack_bytes += repo.pack_index(&name)?.pack_size;
    }
    let free_bytes = repo
        .store
        .local_dir()
        .map(|dir| nix::sys::statvfs::statvfs(dir).map(|v| v.blocks_available() * v.fragment_size()).unwrap_or(0));
    // The oldest snapshot added everything: leave it out of the average.
    let recent: Vec<u64> = all
        .iter()
        .take(10)
        .filter(|s| !std::ptr::eq(*s, all.last().expect("not empty")))
        .map(|s| s.file.added.stored_bytes)
        .collect();
    let average_added = (!recent.is_empty()).then(|| recent.iter().sum::<u64>() / recent.len() as u64);
    let more_backups = average_added.zip(free_bytes).and_then(|(a, free)| (a > 0).then(|| free / a));
    Ok(Growth { content_bytes, pack_bytes, free_bytes, average_added, more_backups })
}

/// `klon forget REPO --keep-…`.
pub(super) fn forget(cli: &Cli, a: &ForgetArgs) -> Result<()> {
    let given = Keep {
        last: a.keep_last,
        hourly: a.keep_hourly,
        daily: a.keep_daily,
        weekly: a.keep_weekly,
        monthly: a.keep_monthly,
        yearly: a.keep_yearly,
    };
    let repo = Repository::open(&a.repo)?;
    let keep = if given.is_empty() {
        repo.keep()?.ok_or_else(|| {
            Error::Usage(format!(
                "give at least one --keep-… option (klon forget never deletes every snapshot); {} has no saved \
                 policy (--save keeps one, applied after each backup)",
                repo.dir.display()
            ))
        })?
    } else {
        given
    };
    let _lock = repo.lock("forget", true, &feedback(cli))?;
    let policy = keep.policy();
    let (decisions, all) = repo_prune::forget(&repo, &policy, a.dry_run)?;
    if a.save && !a.dry_run {
        repo.save_keep(&keep)?;
    }
    let forgotten: Vec<String> = decisions.iter().filter(|d| !d.keep).map(|d| d.id.clone()).collect();
    let pruned = if a.prune { Some(repo_prune::prune(&repo, a.dry_run, &forgotten)?) } else { None };
    if cli.json {
        return print_json(&json!({
            "repository": repo.dir, "dry_run": a.dry_run, "policy": policy.describe(),
            "decisions": decisions.iter().map(|d| json!({"id": d.id, "keep": d.keep, "reasons": d.reasons})).collect::<Vec<_>>(),
            "prune": pruned,
        }));
    }
    if !cli.quiet {
        for d in &decisions {
            let s = all.iter().find(|s| s.id == d.id).expect("decided on these");
            println!(
                "{} {}  {}  {}",
                if d.keep { "keep" } else { "drop" },
                &d.id[..8],
                s.file.created.replace('T', " ").trim_end_matches('Z'),
                if d.keep { d.reasons.join(", ") } else { String::new() }
            );
        }
        let dropped = decisions.iter().filter(|d| !d.keep).count();
        let verb = if a.dry_run { "would drop" } else { "dropped" };
        println!("{}: {verb} {dropped} of {} snapshots ({})", repo.dir.display(), decisions.len(), policy.describe());
        if let Some(p) = &pruned {
            print_prune(p);
        } else if dropped > 0 && !a.dry_run {
            println!("Their room is freed by klon prune {} (or forget --prune).", repo.dir.display());
        }
    }
    Ok(())
}

/// After a backup into a repository with a saved policy: forget and prune.
fn apply_saved_policy(cli: &Cli, dir: &std::path::Path) -> Result<Option<serde_json::Value>> {
    let repo = Repository::open(dir)?;
    let Some(keep) = repo.keep()? else { return Ok(None) };
    let _lock = repo.lock("forget", true, &feedback(cli))?;
    let (decisions, _) = repo_prune::forget(&repo, &keep.policy(), false)?;
    let dropped: Vec<&str> = decisions.iter().filter(|d| !d.keep).map(|d| &d.id[..8]).collect();
    let pruned = if dropped.is_empty() { None } else { Some(repo_prune::prune(&repo, false, &[])?) };
    if !cli.quiet && !cli.json {
        println!(
            "Keep policy ({}): {}{}",
            keep.policy().describe(),
            if dropped.is_empty() {
                "every snapshot kept".to_string()
            } else {
                format!("dropped {}", dropped.join(", "))
            },
            pruned.as_ref().map(|p| format!(", freed {}", human_bytes(p.bytes_freed))).unwrap_or_default()
        );
    }
    Ok(Some(json!({ "policy": keep.policy().describe(), "dropped": dropped, "prune": pruned })))
}

/// `klon prune REPO`.
pub(super) fn prune(cli: &Cli, a: &PruneArgs) -> Result<()> {
    let repo = Repository::open(&a.repo)?;
    let _lock = repo.lock("prune", true, &feedback(cli))?;
    let r = repo_prune::prune(&repo, a.dry_run, &[])?;
    if cli.json {
        return print_json(&r);
    }
    if !cli.quiet {
        print_prune(&r);
    }
    Ok(())
}

fn print_prune(r: &repo_prune::PruneReport) {
    let (verb, del, rew) =
        if r.dry_run { ("would free", "would delete", "rewrite") } else { ("freed", "deleted", "rewrote") };
    println!(
        "Prune {verb} {}: {del} {} packs, {rew} {}, dropped {} unreferenced chunks, kept {}; {} leftover files of cut-short jobs. Packs now take {}.",
        human_bytes(r.bytes_freed),
        r.packs_deleted,
        r.packs_rewritten,
        r.chunks_dropped,
        r.chunks_kept,
        r.leftovers,
        human_bytes(r.bytes_after)
    );
}

/// `klon check REPO [--read-data]`.
pub(super) fn check(cli: &Cli, a: &CheckArgs) -> Result<()> {
    let r = repo_check::check(&a.repo, a.read_data, &feedback(cli))?;
    if cli.json {
        print_json(&json!({ "repository": a.repo, "ok": r.problems.is_empty(), "report": r }))?;
    } else if !cli.quiet || !r.problems.is_empty() {
        for n in &r.notes {
            println!("note: {n}");
        }
        for p in &r.problems {
            println!("PROBLEM: {p}");
        }
        println!(
            "{}: {} — {} snapshots, {} packs, {} chunks{}",
            a.repo.display(),
            if r.problems.is_empty() { "OK".to_string() } else { format!("{} problems", r.problems.len()) },
            r.snapshots,
            r.packs,
            r.chunks,
            if a.read_data {
                format!(", {} read and checked", human_bytes(r.bytes_read))
            } else {
                ", data not read (--read-data reads it)".into()
            }
        );
    }
    if r.problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Corrupt(format!(
            "{}: {} problems (listed above): {}",
            a.repo.display(),
            r.problems.len(),
            r.problems[0]
        )))
    }
}

/// `klon init REPO [--encrypt]`.
pub(super) fn init(cli: &Cli, a: &InitArgs) -> Result<()> {
    let window = u32::try_from(a.window).map_err(|_| Error::Usage("--window is at most 8M".into()))?;
    if crate::repo::exists(&a.repo)? {
        return Err(Error::Usage(format!("{} is a repository already", a.repo.display())));
    }
    let repo = Repository::create_with(&a.repo, window, a.encrypt)?;
    show_recovery_key(&repo.dir, repo.recovery_key.as_deref());
    if cli.json {
        return print_json(&json!({
            "repository": repo.dir,
            "id": repo.config.id,
            "window": repo.config.window,
            "encrypted": repo.keys.encrypted(),
            "recovery_key": repo.recovery_key,
        }));
    }
    if !cli.quiet {
        println!(
            "{}: a new {}repository (window {})",
            repo.dir.display(),
            if repo.keys.encrypted() { "encrypted " } else { "" },
            human_bytes(u64::from(window))
        );
    }
    Ok(())
}

/// `klon key list|add|passwd|remove REPO`.
pub(super) fn key(cli: &Cli, k: &KeyCommand) -> Result<()> {
    let dir = match k {
        KeyCommand::List(a) => &a.repo,
        KeyCommand::Add(a) | KeyCommand::Passwd(a) => &a.repo,
        KeyCommand::Remove(a) => &a.repo,
    };
    let mut repo = Repository::open(dir)?;
    let Some(enc) = repo.config.encryption.clone() else {
        return Err(Error::Usage(format!(
            "{} is not encrypted: it has no keys (klon init --encrypt makes an encrypted repository)",
            dir.display()
        )));
    };
    let used = repo.keys.slot().unwrap_or_default().to_string();
    let mut slots = enc.keys.clone();
    let changed = match k {
        KeyCommand::List(_) => None,
        KeyCommand::Add(a) | KeyCommand::Passwd(a) => {
            let pass = crypto::new_passphrase(&format!("{}", dir.display()), a.new_passphrase_file.as_deref())?;
            let slot = crypto::add_passphrase(&repo.keys, &pass)?;
            let id = slot.id.clone();
            slots.push(slot);
            if matches!(k, KeyCommand::Passwd(_)) {
                slots.retain(|s| s.id != used);
                Some(format!("passphrase {used} replaced by {id}"))
            } else {
                Some(format!("passphrase {id} added"))
            }
        }
        KeyCommand::Remove(a) => {
            if !slots.iter().any(|s| s.id == a.slot) {
                return Err(Error::Usage(format!(
                    "{} has no key slot {} (klon key list shows them)",
                    dir.display(),
                    a.slot
                )));
            }
            slots.retain(|s| s.id != a.slot);
            if !slots.iter().any(|s| s.kind == "passphrase") {
                return Err(Error::Refused(format!(
                    "{} is the last passphrase of {}: add another first (klon key add)",
                    a.slot,
                    dir.display()
                )));
            }
            Some(format!("key slot {} removed", a.slot))
        }
    };
    if let Some(what) = &changed {
        let _lock = repo.lock("key", true, &feedback(cli))?;
        repo.set_key_slots(slots.clone())?;
        if !cli.quiet && !cli.json {
            println!("{}: {what}", dir.display());
        }
    }
    if cli.json {
        return print_json(&json!({
            "repository": repo.dir,
            "changed": changed,
            "keys": slots.iter().map(|s| json!({"id": s.id, "kind": s.kind, "created": s.created,
                "unlocked_with": s.id == used})).collect::<Vec<_>>(),
        }));
    }
    if changed.is_none() && !cli.quiet {
        for s in &slots {
            println!("{}  {:<10}  added {}{}", s.id, s.kind, s.created, if s.id == used { "  (used now)" } else { "" });
        }
    }
    Ok(())
}

/// `klon unlock REPO`.
pub(super) fn unlock(cli: &Cli, a: &UnlockArgs) -> Result<()> {
    let repo = Repository::open(&a.repo)?;
    let removed = lock::remove_all(&*repo.store)?;
    if !cli.quiet {
        for l in &removed {
            println!("removed the lock of {} (process {} on {}, since {})", l.job, l.pid, l.hostname, l.time);
        }
        println!("{}: {} locks removed", repo.dir.display(), removed.len());
    }
    Ok(())
}

/// `klon copy FROM TO [SNAPSHOT...]`.
pub(super) fn copy(cli: &Cli, a: &CopyArgs) -> Result<()> {
    let started = std::time::Instant::now();
    if !(1..=22).contains(&a.level) {
        return Err(Error::Usage(format!("compression level {} is out of range: use 1 to 22", a.level)));
    }
    let src = Repository::open(&a.from)?;
    let _src_lock = src.lock("copy", false, &feedback(cli))?;
    let created = !crate::repo::exists(&a.to)?;
    let to_secret = match (&a.to_passphrase_file, std::env::var("KLON_TO_PASSPHRASE")) {
        (Some(f), _) => Some(crypto::read_passphrase_file(f)?),
        (None, Ok(p)) if !p.is_empty() => Some(p),
        _ => None,
    };
    let dst = if created {
        Repository::create_like(&a.to, &src)?
    } else {
        Repository::open_with(&a.to, to_secret.as_deref()).map_err(|e| match e {
            Error::Key(_) => e.with_note(
                "the destination's passphrase, when it is not the source's: --to-passphrase-file FILE or \
                 KLON_TO_PASSPHRASE",
            ),
            e => e,
        })?
    };
    let dst_lock = dst.lock("copy", false, &feedback(cli))?;
    let report = match crate::repo::copy::copy(&src, &dst, &a.snapshots, a.level) {
        Ok(r) => r,
        Err(e) if created && dst.snapshots().is_ok_and(|s| s.is_empty()) => {
            drop(dst_lock);
            let note = match dst.store.destroy() {
                Ok(()) => "the new repository was removed".to_string(),
                Err(r) => format!("removing the new repository {} failed too ({r}): delete it", a.to.display()),
            };
            return Err(e.with_note(&note));
        }
        Err(e) => return Err(e),
    };
    let verified = if a.no_verify || report.packs_written.is_empty() {
        None
    } else {
        Some(snapshot::verify_added(&a.to, &report.packs_written, &feedback(cli)).map_err(|e| {
            e.with_note(&format!(
                "the copies were written but what they added does not read back correctly: do not rely on them; \
                 check the drive, then run klon check --read-data {}",
                a.to.display()
            ))
        })?)
    };
    let seconds = started.elapsed().as_secs_f64();
    if cli.json {
        return print_json(&json!({
            "from": a.from, "to": a.to, "created_repository": created,
            "copied": report.copied.iter().map(|(new, old)| json!({"snapshot": new, "from": old})).collect::<Vec<_>>(),
            "skipped": report.skipped, "chunks": report.chunks, "stored_bytes": report.stored_bytes,
            "verified": verified.is_some(), "seconds": seconds,
        }));
    }
    if !cli.quiet {
        for (new, old) in &report.copied {
            println!("copied snapshot {} as {}", &old[..8], &new[..8]);
        }
        println!(
            "{} snapshots copied into {}{} ({} there already) in {seconds:.1} s: {} chunks sent, {}{}",
            report.copied.len(),
            a.to.display(),
            if created { " (new repository)" } else { "" },
            report.skipped.len(),
            report.chunks,
            human_bytes(report.stored_bytes),
            match verified {
                Some(_) if report.chunks > 0 => ", read back",
                _ if report.chunks == 0 => "",
                _ => ", not read back (--no-verify)",
            }
        );
    }
    Ok(())
}
