//! The text-menu wizard: `klon` with no arguments on a terminal, and the
//! live system's front end. Back up, restore, verify and clone, guided one
//! screen at a time on an 80x25 console, keyboard only.
//!
//! Every step can be left with Esc (back one step); Ctrl-C asks before
//! quitting or stopping a job. A destructive step names what will be
//! overwritten and needs the target's name (or the end of its serial)
//! typed. Each job ends with a summary and the batch command that does the
//! same.

pub mod browse;
pub mod disks;
pub mod images;
pub mod screen;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::engine::backup::{self, BackupOptions};
use crate::engine::clone::{self as clone_engine, CloneOptions};
use crate::engine::pipeline::default_workers;
use crate::engine::restore::RestoreOptions;
use crate::engine::streams::PlanOptions;
use crate::engine::{cancel, verify};
use crate::error::{Error, Result};
use crate::ui::progress::{self, Console};
use crate::ui::{human_bytes, human_duration};

use disks::{Listed, Need};
use images::ImageDir;
use screen::{Item, Nav, Screen};

/// What the caller (the live system) is told to do when the wizard ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WizardExit {
    /// The person chose Quit (or quit with Ctrl-C).
    Quit,
    /// Open a shell, then start the wizard again.
    Shell,
    /// Reboot the machine.
    Reboot,
    /// Power the machine off.
    PowerOff,
}

/// How the wizard runs.
#[derive(Debug, Clone, Default)]
pub struct WizardContext {
    /// In the live system: Shell, Reboot and Power off are offered, and the
    /// image drive is mounted under /run/klon/drive.
    pub live: bool,
    /// Disks never offered (the live stick, when the caller knows it; a
    /// disk with a partition labelled KLONLIVE is left out anyway). A
    /// partition stands for its whole disk.
    pub exclude: Vec<PathBuf>,
    /// Brings up the network (the live system: DHCP) and says how:
    /// (interface, one line for the person). `None`: the machine's own
    /// network is used as it is.
    pub network: Option<BringUpNetwork>,
}

/// Brings up the network; returns the interface and a line about it.
pub type BringUpNetwork = fn() -> Result<(String, String)>;

/// Runs the wizard; Shell opens `$SHELL` (or /bin/sh) and comes back;
/// Reboot and Power off run `reboot` / `poweroff`.
pub fn run(live: bool) -> Result<()> {
    loop {
        let run_with_exit = run_with(WizardContext { live, exclude: Vec::new(), network: None })?;
        match run_with_exit {
            WizardExit::Quit => return Ok(()),
            WizardExit::Shell => {
                let sh = std::env::var("SHELL").unwrap_or_else(|_| "/bin/sh".into());
                eprintln!("Type exit to go back to klon.");
                let _ = std::process::Command::new(sh).status();
            }
            WizardExit::Reboot | WizardExit::PowerOff => {
                let cmd = if matches!(run_with_exit, WizardExit::Reboot) { "reboot" } else { "poweroff" };
                let _ = std::process::Command::new("sync").status();
                return match std::process::Command::new(cmd).status() {
                    Ok(s) if s.success() => Ok(()),
                    Ok(s) => Err(Error::Unsupported(format!("{cmd} failed ({s}); use the power button"))),
                    Err(e) => Err(Error::io(format!("running {cmd}:"), cmd, None, e)),
                };
            }
        }
    }
}

/// Runs the wizard until the person leaves it; says why.
pub fn run_with(ctx: WizardContext) -> Result<WizardExit> {
    cancel::set_ask_first(true);
    cancel::reset();
    let scr = Screen::default();
    let r = main_menu(&scr, &ctx);
    cancel::set_ask_first(false);
    let _ = scr.term.show_cursor();
    match r {
        Err(e) if screen::is_quit(&e) => Ok(WizardExit::Quit),
        other => other,
    }
}

struct State {
    /// Last directory typed for images.
    last_dir: String,
}

fn main_menu(scr: &Screen, ctx: &WizardContext) -> Result<WizardExit> {
    let mut st = State { last_dir: String::new() };
    let mut entries: Vec<(&str, u8)> = vec![
        ("Back up a disk", 1),
        ("Restore an image", 2),
        ("Verify an image", 3),
        ("Browse an image (get files back)", 10),
        ("Clone a disk to another disk", 4),
        ("Receive an image from the network (klon deploy)", 11),
        ("Show disks", 5),
    ];
    if ctx.live {
        entries.extend([("Shell", 6), ("Reboot", 7), ("Power off", 8)]);
    } else {
        entries.push(("Quit", 9));
    }
    let items: Vec<Item> = entries.iter().map(|e| Item::new(e.0)).collect();
    let mut default = 0;
    loop {
        cancel::reset();
        let body = "klon backs up whole disks into images, restores them, verifies them and \
                    copies disks. Nothing is written to a disk before you confirm it by typing its name.";
        let Nav::Go(i) = scr.select("main menu", body, "What do you want to do?", &items, default)? else { continue };
        default = i;
        let r = match entries[i].1 {
            1 => backup_flow(scr, ctx, &mut st),
            2 => restore_flow(scr, ctx, &mut st),
            3 => verify_flow(scr, ctx, &mut st),
            4 => clone_flow(scr, ctx),
            5 => show_disks(scr, ctx),
            10 => browse_flow(scr, ctx, &mut st),
            11 => receive_flow(scr, ctx),
            6 => return Ok(WizardExit::Shell),
            7 => {
                if confirm_leave(scr, "Reboot now?")? {
                    return Ok(WizardExit::Reboot);
                }
                Ok(())
            }
            8 => {
                if confirm_leave(scr, "Power off now?")? {
                    return Ok(WizardExit::PowerOff);
                }
                Ok(())
            }
            _ => return Ok(WizardExit::Quit),
        };
        match r {
            Ok(()) => {}
            Err(e) if screen::is_quit(&e) => return Err(e),
            Err(e) => scr.message("error", &explain(&e))?,
        }
    }
}

fn confirm_leave(scr: &Screen, q: &str) -> Result<bool> {
    scr.page("leave", "")?;
    scr.yes_no(q, false)
}

/// An error in plain words with what to do next.
fn explain(e: &Error) -> String {
    let next = match e {
        e if backup::is_unreadable_source(e) => {
            "The disk may be failing. To copy everything that can be read, choose Back up a disk and answer \
             yes when rescue mode is offered (klon backup --rescue from a script)."
        }
        Error::Refused(_) => "Nothing was written. Choose differently, or fix what is named above.",
        Error::Cancelled(_) => "",
        Error::Io { .. } => "Check the cables and the drive (dmesg shows the kernel's messages), then try again.",
        Error::Corrupt(_) => "The image cannot be trusted: use another image, or make a new backup.",
        Error::VerifyAfter(_) => "The written disk does not match: do not use it; try again or use another disk.",
        Error::Key(_) => {
            "Nothing was written. Try again with the right passphrase (a repository's recovery key opens it too)."
        }
        Error::Usage(_) | Error::Unsupported(_) => "",
    };
    let mut s = e.to_string();
    if let Some(first) = s.get(..1) {
        s = first.to_uppercase() + &s[1..];
    }
    if next.is_empty() { s } else { format!("{s}\n\n{next}") }
}

fn show_disks(scr: &Screen, ctx: &WizardContext) -> Result<()> {
    let list = disks::list(&ctx.exclude)?;
    let body = if list.is_empty() {
        "No disks found.".to_string()
    } else {
        list.iter().map(disks::describe).collect::<Vec<_>>().join("\n")
    };
    scr.message("disks", &body)
}

fn shell_quote(p: &Path) -> String {
    let s = p.display().to_string();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+:=,".contains(c)) {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

// ---------------------------------------------------------------- backup

fn pick_source(scr: &Screen, ctx: &WizardContext, title: &str, list: &[Listed], default: usize) -> Result<Nav<usize>> {
    let items: Vec<Item> = list
        .iter()
        .map(|l| match disks::source_block(&l.info) {
            None => Item::new(disks::describe(l)),
            Some(why) => Item::blocked(disks::describe(l), why),
        })
        .collect();
    if items.is_empty() {
        scr.message(title, "No disks found. Connect the disk and try again.")?;
        return Ok(Nav::Back);
    }
    let _ = ctx;
    scr.select(title, "", "Which disk do you want to copy?", &items, default)
}

fn default_image_name(dir: &Path, l: &Listed) -> String {
    // A repository of this disk on the drive: backups over time go there.
    let base = disks::safe_name(l.info.model.as_deref().unwrap_or(&l.info.name));
    if crate::repo::is_repository(&dir.join(&base)) || !dir.join(&base).exists() {
        return base;
    }
    let mut n = 2;
    loop {
        let name = format!("{base}-{n}");
        if crate::repo::is_repository(&dir.join(&name)) || !dir.join(&name).exists() {
            return name;
        }
        n += 1;
    }
}

fn backup_flow(scr: &Screen, ctx: &WizardContext, st: &mut State) -> Result<()> {
    let title = "back up a disk";
    let list = disks::list(&ctx.exclude)?;
    let mut step = 0;
    let mut src = 0usize;
    let mut dir: Option<ImageDir> = None;
    let mut name = String::new();
    let mut level = crate::engine::backup::DEFAULT_LEVEL;
    let mut verify_after = true;
    let mut keep: Option<crate::repo::Keep> = None;
    let mut encrypt = false;
    let mut copy_after = false;
    loop {
        match step {
            0 => match pick_source(scr, ctx, title, &list, src)? {
                Nav::Go(i) => {
                    src = i;
                    step = 1;
                }
                Nav::Back => return Ok(()),
            },
            1 => {
                drop(dir.take()); // unmounts a drive chosen before
                match images::choose_dir(
                    scr,
                    title,
                    ctx.live,
                    &ctx.exclude,
                    Some(list[src].info.devno),
                    &mut st.last_dir,
                    ctx.network,
                )? {
                    Nav::Go(d) => {
                        name = default_image_name(&d.path, &list[src]);
                        dir = Some(d);
                        step = 2;
                    }
                    Nav::Back => step = 0,
                }
            }
            2 => {
                let d = dir.as_ref().expect("chosen");
                let body = format!(
                    "Backups go into a repository in {}: a directory that keeps every backup of the disk as a \
                     snapshot and stores only what changed since the others. The name proposed is the disk's \
                     model; the name of an existing repository adds a snapshot to it.",
                    d.path.display()
                );
                match scr.input(title, &body, "Repository name", &name)? {
                    Nav::Back => step = 1,
                    Nav::Go(n) => {
                        if n.is_empty() || n.contains('/') {
                            scr.message(title, "Type a name without '/', for example laptop.")?;
                        } else if d.path.join(&n).exists() && !crate::repo::is_repository(&d.path.join(&n)) {
                            scr.message(
                                title,
                                &format!("{n} already exists in {}: choose another name.", d.path.display()),
                            )?;
                        } else {
                            name = n;
                            step = 3;
                        }
                    }
                }
            }
            3 => {
                let d = dir.as_ref().expect("chosen");
                let l = &list[src];
                let repo_dir = d.path.join(&name);
                // (A store that cannot be asked is taken as holding one: the
                // backup then says why it cannot be read.)
                let exists = crate::repo::exists(&repo_dir).unwrap_or(true);
                // (An encrypted one asks for its passphrase here, once.)
                let existing = if exists { crate::repo::Repository::open(&repo_dir).ok() } else { None };
                if keep.is_none() {
                    keep = existing.as_ref().and_then(|r| r.keep().ok().flatten());
                }
                let body = format!(
                    "Copy {} ({}, {}) as a new snapshot into the {}repository {}.\nThe disk is only read.",
                    l.info.path.display(),
                    l.info.model.as_deref().unwrap_or("unknown model"),
                    human_bytes(l.info.size),
                    match &existing {
                        Some(r) if r.keys.encrypted() => "encrypted ",
                        Some(_) => "",
                        None if exists => "(unreadable: see the message after Start) ",
                        None => "new ",
                    },
                    repo_dir.display()
                );
                let keep_text = match &keep {
                    Some(k) => k.policy().describe(),
                    None => "every snapshot".to_string(),
                };
                let items = [
                    Item::new("Start the backup"),
                    Item::new(format!("Compression level: {level} (1 fastest .. 22 smallest; Enter changes)")),
                    Item::new(format!(
                        "Verify the image afterwards: {} (Enter changes)",
                        if verify_after { "yes" } else { "no" }
                    )),
                    Item::new(format!("Keep: {keep_text} (Enter changes)")),
                ];
                let mut items = items.to_vec();
                items.push(Item::new(format!(
                    "Then copy the snapshot to another drive: {} (Enter changes; the drive is asked afterwards)",
                    if copy_after { "yes" } else { "no" }
                )));
                if !exists {
                    items.push(Item::new(format!(
                        "Encrypt the new repository: {} (Enter changes; a passphrase is asked at the start)",
                        if encrypt { "yes" } else { "no" }
                    )));
                }
                match scr.select(title, &body, "Ready", &items, 0)? {
                    Nav::Back => step = 2,
                    Nav::Go(0) => step = 4,
                    Nav::Go(1) => {
                        if let Nav::Go(t) = scr.input(
                            title,
                            "zstd level: 3 is fast and good; higher levels are slower (as klon backup --level).",
                            "Level (1-22)",
                            &level.to_string(),
                        )? {
                            match t.parse::<i32>() {
                                Ok(v) if (1..=22).contains(&v) => level = v,
                                _ => scr.message(title, "Type a number from 1 to 22.")?,
                            }
                        }
                    }
                    Nav::Go(2) => verify_after = !verify_after,
                    Nav::Go(4) => copy_after = !copy_after,
                    Nav::Go(5) => encrypt = !encrypt,
                    Nav::Go(_) => {
                        let now = keep.map(|k| keep_spec(&k)).unwrap_or_default();
                        if let Nav::Go(t) = scr.input(
                            title,
                            "Which snapshots to keep after each backup, e.g. daily=7,weekly=4,monthly=12 \
                             (rules: last, hourly, daily, weekly, monthly, yearly: the newest snapshot of each of \
                             the N latest days, weeks, ... that have one). Empty: keep every snapshot.",
                            "Keep",
                            &now,
                        )? {
                            if t.trim().is_empty() {
                                keep = None;
                            } else {
                                match crate::repo::Keep::parse(&t) {
                                    Ok(k) => keep = Some(k),
                                    Err(why) => scr.message(title, &format!("{why}."))?,
                                }
                            }
                        }
                    }
                }
            }
            _ => {
                let d = dir.take().expect("chosen");
                let image = d.path.join(&name);
                let source = list[src].info.path.clone();
                let encrypt = encrypt && !crate::repo::exists(&image).unwrap_or(true);
                let r = run_snapshot(scr, &source, &image, level, verify_after, keep, encrypt);
                if let (Ok(Some(id)), true) = (&r, copy_after) {
                    let not_on = Some(list[src].info.devno);
                    let copied = copy_to_another_drive(scr, ctx, st, &image, id, not_on, &d.path);
                    drop(d); // unmount a drive the wizard mounted
                    return copied;
                }
                drop(d); // unmount a drive the wizard mounted
                return r.map(|_| ());
            }
        }
    }
}

/// After a backup into `repo` made snapshot `id`: copies it into a
/// repository of the same name on another drive (or directory) that the
/// person chooses — a second copy — made with the same window and keys
/// when it is new; only the chunks it lacks are sent, then read back.
fn copy_to_another_drive(
    scr: &Screen,
    ctx: &WizardContext,
    st: &mut State,
    repo: &Path,
    id: &str,
    not_on: Option<u64>,
    first_dir: &Path,
) -> Result<()> {
    let title = "copy to another drive";
    let name = repo.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    let dir = loop {
        let Nav::Go(d) = images::choose_dir_at(
            scr,
            title,
            ctx.live,
            &ctx.exclude,
            not_on,
            &mut st.last_dir,
            Path::new(images::COPY_MOUNT),
            ctx.network,
        )?
        else {
            return Ok(());
        };
        if same_dir(&d.path, first_dir) || (d.mounted.is_some() && same_filesystem(&d.path, first_dir)) {
            scr.message(title, "That is where the backup went: choose another drive or directory.")?;
            continue;
        }
        break d;
    };
    let to = dir.path.join(&name);
    if to.exists() && !crate::repo::is_repository(&to) {
        return scr.message(title, &format!("{} exists and is not a repository: nothing was copied.", to.display()));
    }
    scr.page(title, &format!("Copying snapshot {} into {} ...", &id[..8], to.display()))?;
    let copied = run_job(scr, "copy", "No snapshot is copied.", || -> Result<crate::repo::copy::CopyReport> {
        crate::engine::snapshot::copy_snapshot_into(repo, &to, id, &Console::feedback(false))
    });
    let body = match copied {
        Ok(r) => format!(
            "Copied into {}: {} ({} chunks, {} sent), what it added read back and checked.\n\n\
             The same from a script:\n  klon copy {} {} {}",
            to.display(),
            if r.copied.is_empty() { "the snapshot was there already".to_string() } else { "1 snapshot".to_string() },
            r.chunks,
            human_bytes(r.stored_bytes),
            shell_quote(repo),
            shell_quote(&to),
            &id[..8]
        ),
        Err(e) => format!("The copy failed: {e}\n\nThe backup itself is complete; copy it again later."),
    };
    let r = scr.message("copy done", &body);
    drop(dir); // unmount a drive the wizard mounted
    r
}

/// Whether `a` and `b` are on the same filesystem (a drive mounted twice).
fn same_filesystem(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    matches!((std::fs::metadata(a), std::fs::metadata(b)), (Ok(x), Ok(y)) if x.dev() == y.dev())
}

/// Whether `a` and `b` are the same directory.
fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Runs `job` on its own thread while this one watches for Ctrl-C and asks
/// before stopping it.
fn run_job<T: Send>(scr: &Screen, what: &str, on_stop: &str, job: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    cancel::reset();
    std::thread::scope(|s| {
        let h = s.spawn(job);
        while !h.is_finished() {
            if cancel::take_pending() {
                let stop = progress::suspend(|| {
                    let _ = scr.term.show_cursor();
                    eprintln!();
                    let q = format!("Ctrl-C: stop the {what}? {on_stop}");
                    let r = dialoguer::Confirm::with_theme(&dialoguer::theme::SimpleTheme)
                        .with_prompt(q)
                        .default(false)
                        .interact_on_opt(&scr.term);
                    let _ = scr.term.clear_last_lines(2);
                    // A second Ctrl-C while asking means yes.
                    matches!(r, Ok(Some(true)) | Err(_))
                });
                let _ = cancel::take_pending();
                if stop {
                    cancel::request();
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        h.join().unwrap_or_else(|_| Err(Error::Unsupported(format!("the {what} stopped unexpectedly"))))
    })
}

/// How the wizard backs a disk up: its defaults, the level chosen, rescue
/// mode or not.
fn backup_options(level: i32, rescue: bool) -> BackupOptions {
    BackupOptions { level, rescue, feedback: Console::feedback(false), ..Default::default() }
}

/// Where a rescued backup of a disk whose snapshots go into `repo` is
/// written: a new directory beside it, `NAME-rescue-DATE` (`-2`, … when
/// taken).
fn rescue_image_name(repo: &Path) -> PathBuf {
    let base = format!(
        "{}-rescue-{}",
        repo.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "disk".into()),
        &crate::image::manifest::now_rfc3339()[..10]
    );
    let parent = repo.parent().unwrap_or(Path::new("."));
    let mut path = parent.join(&base);
    let mut n = 2;
    while path.exists() || crate::image::writer::partial_dir_for(&path).exists() {
        path = parent.join(format!("{base}-{n}"));
        n += 1;
    }
    path
}

/// `daily=7,weekly=4`: a policy as the Keep setting is typed.
fn keep_spec(k: &crate::repo::Keep) -> String {
    [
        ("last", k.last),
        ("hourly", k.hourly),
        ("daily", k.daily),
        ("weekly", k.weekly),
        ("monthly", k.monthly),
        ("yearly", k.yearly),
    ]
    .iter()
    .filter(|(_, n)| *n > 0)
    .map(|(r, n)| format!("{r}={n}"))
    .collect::<Vec<_>>()
    .join(",")
}

/// Backs `source` up as a new snapshot of the repository `repo` (made if
/// need be), verifies what it added, saves the Keep policy and applies it.
fn run_snapshot(
    scr: &Screen,
    source: &Path,
    repo: &Path,
    level: i32,
    verify_after: bool,
    keep: Option<crate::repo::Keep>,
    encrypt: bool,
) -> Result<Option<String>> {
    use crate::engine::snapshot;
    let title = "back up a disk";
    scr.page(title, &format!("Backing up {} into {}. Ctrl-C stops.", source.display(), repo.display()))?;
    let opts = backup_options(level, false);
    if encrypt {
        // Asked here, on this thread (typed twice), not on the backup's.
        let p = crate::repo::crypto::passphrase(&format!("the new repository {}", repo.display()), true)?;
        crate::repo::crypto::set_passphrase(p);
    }
    let sopts = snapshot::SnapshotOptions { window: crate::repo::DEFAULT_WINDOW, encrypt, ..Default::default() };
    let report = match run_job(scr, "backup", "No snapshot is made.", || {
        snapshot::backup_to_repository(source, repo, &opts, &sopts)
    }) {
        Ok(r) => r,
        Err(e) if backup::is_unreadable_source(&e) => {
            if !offer_rescue(scr, source, &e)? {
                return Err(e);
            }
            // A repository takes no rescued backup: a standalone image beside it.
            let image = rescue_image_name(repo);
            return run_backup(scr, source, &image, level, verify_after, true).map(|()| None);
        }
        Err(e) => return Err(e),
    };
    let verdict = if verify_after {
        scr.term.write_line("Verifying what the backup added ...").ok();
        match run_job(scr, "verification", "The snapshot stays; it is just not checked.", || {
            snapshot::verify_added(repo, &report.packs_written, &Console::feedback(false))
        }) {
            Ok(_) => "OK, every chunk this backup added reads back and its checksums hold".to_string(),
            Err(e) => format!("FAILED: {e}. Do not rely on this snapshot; check the image drive."),
        }
    } else {
        "not verified (you turned it off)".to_string()
    };
    let mut kept = String::new();
    if let Some(k) = keep {
        let r = crate::repo::Repository::open(repo)?;
        r.save_keep(&k)?;
        let _lock = r.lock("forget", true, &Console::feedback(false))?;
        let (decisions, _) = crate::repo::prune::forget(&r, &k.policy(), false)?;
        let dropped: Vec<&str> = decisions.iter().filter(|d| !d.keep).map(|d| &d.id[..8]).collect();
        let freed = if dropped.is_empty() { 0 } else { crate::repo::prune::prune(&r, false, &[])?.bytes_freed };
        kept = format!(
            "Keep:         {} — {}\n",
            k.policy().describe(),
            if dropped.is_empty() {
                "no snapshot dropped".to_string()
            } else {
                format!(
                    "dropped {} older snapshots ({}), freed {}",
                    dropped.len(),
                    dropped.join(", "),
                    human_bytes(freed)
                )
            }
        );
    }
    let s = &report.snapshot;
    let mut warnings = report.warnings.iter().map(|w| format!("Warning: {w}\n")).collect::<String>();
    if let Some(k) = &report.recovery_key {
        warnings += &format!(
            "The repository is encrypted. Its recovery key unlocks it if the passphrase is lost: write it down \
             and keep it apart from the drive; it is shown only now:\n  {k}\n"
        );
    }
    let body = format!(
        "Backup of {} finished: snapshot {}{}.\n\n\
         Time:         {}\n\
         Read:         {} at {}\n\
         Added:        {} in {} new chunks ({} were in the repository already)\n\
         Verification: {verdict}\n\
         {kept}{warnings}\n\
         Every snapshot restores on its own (Restore an image lists them).\n\
         The same from a script:\n  klon backup {} {}",
        source.display(),
        &report.id[..8],
        if report.created_repository { " in a new repository" } else { "" },
        human_duration(report.seconds),
        human_bytes(report.read_bytes),
        rate(report.read_bytes, report.seconds),
        human_bytes(s.added.stored_bytes),
        s.added.chunks,
        report.reused_chunks,
        shell_quote(source),
        shell_quote(repo),
    );
    scr.message("backup done", &body)?;
    Ok(Some(report.id.clone()))
}

/// After a backup stopped at sectors of `source` that cannot be read:
/// says so, explains rescue mode, and asks whether to back up again in it.
fn offer_rescue(scr: &Screen, source: &Path, e: &Error) -> Result<bool> {
    let body = format!(
        "The backup stopped: {} has sectors that cannot be read (the disk may be failing).\n\n{e}\n\n\
         Rescue mode copies everything that can be read first, then tries the unreadable places again in \
         smaller pieces, asking the disk for each sector at most three times so a dying disk is not worn \
         out. Sectors that still cannot be read are stored as zeros and listed in the image (klon info \
         shows where). The image will then not be a perfect copy of the disk.",
        source.display()
    );
    scr.page("back up a disk", &body)?;
    scr.yes_no("Back up again in rescue mode?", true)
}

/// Backs `source` up into a new standalone image `image`; with `rescue`,
/// reading around unreadable sectors from the start, else offering that
/// when the backup meets one.
fn run_backup(scr: &Screen, source: &Path, image: &Path, level: i32, verify_after: bool, rescue: bool) -> Result<()> {
    let title = "back up a disk";
    let workers = default_workers();
    let mut rescue = rescue;
    let report = loop {
        let mode = if rescue { " in rescue mode" } else { "" };
        scr.page(title, &format!("Backing up {} to {}{mode}. Ctrl-C stops.", source.display(), image.display()))?;
        let opts = backup_options(level, rescue);
        match run_job(scr, "backup", "The unfinished image will be removed.", || backup::backup(source, image, &opts)) {
            Ok(r) => break r,
            Err(e) if !rescue && backup::is_unreadable_source(&e) => {
                if !offer_rescue(scr, source, &e)? {
                    return Err(e);
                }
                rescue = true;
            }
            Err(e) => return Err(e),
        }
    };
    let verified = if verify_after {
        scr.term.write_line("Verifying the image ...").ok();
        let r = run_job(scr, "verification", "The image stays; it is just not checked.", || {
            verify::verify(&report.image, workers, &Console::feedback(false))
        });
        verify::record_result(&report.image, &r);
        Some(r)
    } else {
        None
    };
    let ratio = if report.image_bytes > 0 { report.read_bytes as f64 / report.image_bytes as f64 } else { 0.0 };
    let verdict = match &verified {
        None => "not verified (you turned it off)".to_string(),
        Some(Ok(v)) => format!("OK, every checksum holds (checked in {})", human_duration(v.seconds)),
        Some(Err(e)) => format!("FAILED: {e}. Do not rely on this image; check the image drive."),
    };
    let mut cmd =
        format!("klon backup{} {} {}", if rescue { " --rescue" } else { "" }, shell_quote(source), shell_quote(image));
    if level != 3 {
        cmd.push_str(&format!(" --level {level}"));
    }
    if !verify_after {
        cmd.push_str(" --no-verify");
    }
    // What a rescue could not read; the backup's warning saying the same
    // is left out.
    let lost = report.manifest.unreadable_places();
    let mut warnings = report
        .warnings
        .iter()
        .filter(|w| lost.is_none() || !w.contains("could not be read"))
        .map(|w| format!("Warning: {w}\n"))
        .collect::<String>();
    if let Some(places) = &lost {
        warnings = format!(
            "Unreadable:   {} bytes ({places})\n\n\
             THE IMAGE IS NOT A PERFECT COPY: those bytes are zeros in it, and on every disk restored from it. \
             klon info {} lists where they are and how to find the files they hit.\n{warnings}",
            report.manifest.unreadable_bytes(),
            shell_quote(&report.image)
        );
    }
    let body = format!(
        "Backup of {}{} finished.\n\n\
         Time:         {}\n\
         Read:         {} at {}\n\
         Image:        {} ({})\n\
         Compression:  {ratio:.1}:1\n\
         Verification: {verdict}\n\
         {warnings}\n\
         The same from a script:\n  {cmd}",
        source.display(),
        if rescue { " in rescue mode" } else { "" },
        human_duration(report.seconds),
        human_bytes(report.read_bytes),
        rate(report.read_bytes, report.seconds),
        human_bytes(report.image_bytes),
        report.image.display(),
    );
    scr.message("backup done", &body)
}

fn rate(bytes: u64, secs: f64) -> String {
    format!("{}/s", human_bytes((bytes as f64 / secs.max(0.001)) as u64))
}

// ---------------------------------------------------------------- images

fn pick_image(scr: &Screen, title: &str, dir: &Path, default: usize) -> Result<Nav<(PathBuf, Option<Need>)>> {
    let mut found = images::list_images(dir);
    if found.is_empty() {
        scr.message(
            title,
            &format!("There are no klon or Clonezilla images in {}. Choose another directory or drive.", dir.display()),
        )?;
        return Ok(Nav::Back);
    }
    let items: Vec<Item> = found.iter().map(|f| f.item.clone()).collect();
    let body = format!("Images in {}:", dir.display());
    Ok(match scr.select(title, &body, "Which image?", &items, default)? {
        Nav::Back => Nav::Back,
        Nav::Go(i) => {
            let f = found.swap_remove(i);
            Nav::Go((f.path, f.need))
        }
    })
}

fn verify_flow(scr: &Screen, ctx: &WizardContext, st: &mut State) -> Result<()> {
    let title = "verify an image";
    let mut step = 0;
    let mut dir: Option<ImageDir> = None;
    loop {
        match step {
            0 => {
                drop(dir.take()); // unmounts a drive chosen before
                match images::choose_dir(scr, title, ctx.live, &ctx.exclude, None, &mut st.last_dir, ctx.network)? {
                    Nav::Go(d) => {
                        dir = Some(d);
                        step = 1;
                    }
                    Nav::Back => return Ok(()),
                }
            }
            _ => {
                let d = dir.as_ref().expect("chosen");
                let Nav::Go((image, _)) = pick_image(scr, title, &d.path, 0)? else {
                    step = 0;
                    continue;
                };
                scr.page(
                    title,
                    &format!(
                        "Verifying {}: every checksum is read; no disk is touched. Ctrl-C stops.",
                        image.display()
                    ),
                )?;
                let r = run_job(scr, "verification", "Nothing is changed.", || {
                    crate::engine::source::verify(&image, default_workers(), &Console::feedback(false))
                });
                let cmd = format!("klon verify {}", shell_quote(&image));
                let body = match &r {
                    Ok(v) => format!(
                        "{}: OK.\n\nTime:         {}\nChecked:      {} in {} chunks at {}\nVerification: OK, every checksum holds\n\nThe same from a script:\n  {cmd}",
                        image.display(),
                        human_duration(v.seconds),
                        human_bytes(v.bytes),
                        v.chunks,
                        rate(v.bytes, v.seconds)
                    ),
                    Err(e) => format!("{}\n\nVerification: FAILED\n\nThe same from a script:\n  {cmd}", explain(e)),
                };
                return scr.message("verify done", &body);
            }
        }
    }
}

fn browse_flow(scr: &Screen, ctx: &WizardContext, st: &mut State) -> Result<()> {
    let title = "browse an image";
    loop {
        let dir = match images::choose_dir(scr, title, ctx.live, &ctx.exclude, None, &mut st.last_dir, ctx.network)? {
            Nav::Go(d) => d,
            Nav::Back => return Ok(()),
        };
        let Nav::Go((image, _)) = pick_image(scr, title, &dir.path, 0)? else {
            continue;
        };
        // The drive stays mounted while the image is: copies go onto it.
        if let Err(e) = browse::browse(scr, title, &image, &dir, ctx.live) {
            scr.message(title, &explain(&e))?;
            continue;
        }
        return Ok(());
    }
}

// ---------------------------------------------------------------- confirm

/// The typed confirmation of a destructive step: the target's name, its
/// path, or the last four (or more) characters of its serial.
fn confirm_destroy(scr: &Screen, title: &str, what: &str, target: &Listed) -> Result<Nav<()>> {
    let name = target.info.name.clone();
    let serial = target.info.serial.clone().filter(|s| s.len() >= 4);
    let hint = match &serial {
        Some(s) => format!("Type {name} (or the last 4 characters of its serial, {}) to go on.", &s[s.len() - 4..]),
        None => format!("Type {name} to go on."),
    };
    let body = format!(
        "{what}\n\nThe target is:\n{}\n\nEverything on it is lost. {hint} Esc goes back.",
        disks::describe(target)
    );
    loop {
        let Nav::Go(t) = scr.input(title, &body, "Type to confirm", "")? else { return Ok(Nav::Back) };
        let ok = t == name
            || Path::new(&t) == target.info.path
            || serial.as_ref().is_some_and(|s| t.len() >= 4 && s.ends_with(&t));
        if ok {
            return Ok(Nav::Go(()));
        }
        scr.message(
            title,
            &format!("\"{t}\" is not {name}: nothing was written. Type the name exactly, or press Esc to go back."),
        )?;
    }
}

fn pick_target(
    scr: &Screen,
    ctx: &WizardContext,
    title: &str,
    list: &[Listed],
    source: Option<u64>,
    never: &[u64],
    need: Need,
) -> Result<Nav<usize>> {
    let (items, index) = disks::target_items(list, source, never, need);
    let _ = ctx;
    if items.is_empty() {
        scr.message(title, "No other disk can be written to. Connect the target disk and try again.")?;
        return Ok(Nav::Back);
    }
    let body = if need.size == 0 {
        "The image's size is known once it arrives: a disk too small is refused then, before anything is written."
            .to_string()
    } else {
        format!("The copy needs {} or more.", human_bytes(need.size))
    };
    Ok(match scr.select(title, &body, "Which disk do you want to OVERWRITE?", &items, 0)? {
        Nav::Back => Nav::Back,
        Nav::Go(i) => Nav::Go(index[i]),
    })
}

/// What to do with a larger target's extra room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grow {
    /// Nothing: the partitions stay as they are.
    No,
    /// Extend the last partition (`--grow-last`).
    Last,
    /// Every partition klon grows, in proportion (`--grow-all`).
    All,
}

impl Grow {
    /// The option of the command that does the same.
    fn flag(self) -> &'static str {
        match self {
            Grow::No => "",
            Grow::Last => " --grow-last",
            Grow::All => " --grow-all",
        }
    }
}

/// Asks what to do with a larger target's room; `all` offers growing every
/// partition (restore), not only the last (clone).
fn ask_grow(scr: &Screen, title: &str, target: &Listed, need: Need, all: bool) -> Result<Nav<Grow>> {
    if target.info.size <= need.size {
        return Ok(Nav::Go(Grow::No));
    }
    let body = format!(
        "The target ({}) is larger than the original disk ({}). The partitions can be made larger to use the space (an ext2/3/4, NTFS, XFS or btrfs filesystem in one grows with it).",
        human_bytes(target.info.size),
        human_bytes(need.size)
    );
    let mut items = vec![(Item::new("Extend the last partition to the end of the disk"), Grow::Last)];
    if all {
        items.push((Item::new("Grow every partition whose filesystem can grow, in proportion to its size"), Grow::All));
    }
    items.push((Item::new("Keep the partitions as they are"), Grow::No));
    let shown: Vec<Item> = items.iter().map(|(i, _)| i.clone()).collect();
    Ok(match scr.select(title, &body, "Use the extra space?", &shown, 0)? {
        Nav::Back => Nav::Back,
        Nav::Go(i) => Nav::Go(items[i].1),
    })
}

// ---------------------------------------------------------------- restore

fn restore_flow(scr: &Screen, ctx: &WizardContext, st: &mut State) -> Result<()> {
    let title = "restore an image";
    let mut step = 0;
    let mut dir: Option<ImageDir> = None;
    let mut image = PathBuf::new();
    let mut need = Need { size: 0, sector_size: 512 };
    let mut list: Vec<Listed> = Vec::new();
    let mut target = 0usize;
    let mut grow = Grow::No;
    loop {
        match step {
            0 => {
                drop(dir.take()); // unmounts a drive chosen before
                match images::choose_dir(scr, title, ctx.live, &ctx.exclude, None, &mut st.last_dir, ctx.network)? {
                    Nav::Go(d) => {
                        dir = Some(d);
                        step = 1;
                    }
                    Nav::Back => return Ok(()),
                }
            }
            1 => match pick_image(scr, title, &dir.as_ref().expect("chosen").path, 0)? {
                Nav::Back => step = 0,
                Nav::Go((p, n)) => {
                    image = p;
                    need = n.expect("complete images only");
                    step = 2;
                }
            },
            2 => {
                list = disks::list(&ctx.exclude)?;
                let never = disks::disks_holding(&image);
                // A klon image or snapshot also goes onto a smaller disk
                // when its partitions can shrink to fit (the next step
                // says whether they can, and how).
                let pick = if crate::clonezilla::is_clonezilla_image(&image) { need } else { Need { size: 0, ..need } };
                match pick_target(scr, ctx, title, &list, None, &never, pick)? {
                    Nav::Back => step = 1,
                    Nav::Go(i) => {
                        target = i;
                        step = 3;
                    }
                }
            }
            3 => match ask_grow(scr, title, &list[target], need, !crate::clonezilla::is_clonezilla_image(&image))? {
                Nav::Back => step = 2,
                Nav::Go(g) => {
                    grow = g;
                    step = 4;
                }
            },
            4 => {
                // All refusals happen here, before anything is written.
                let plan = match crate::engine::source::prepare_restore_fit(
                    &image,
                    &list[target].info.path,
                    grow == Grow::All,
                    &Console::feedback(false),
                ) {
                    Ok(p) => p,
                    Err(e) => {
                        scr.message(title, &explain(&e))?;
                        step = 2;
                        continue;
                    }
                };
                match confirm_destroy(scr, title, &plan.describe(), &list[target])? {
                    Nav::Back => {
                        drop(plan);
                        step = if list[target].info.size > need.size { 3 } else { 2 };
                    }
                    Nav::Go(()) => {
                        let tpath = list[target].info.path.clone();
                        scr.page(
                            title,
                            &format!("Restoring {} to {}. Ctrl-C stops.", image.display(), tpath.display()),
                        )?;
                        let opts = RestoreOptions {
                            grow_last: grow == Grow::Last,
                            verify_after: true,
                            feedback: Console::feedback(false),
                            workers: default_workers(),
                        };
                        let r = run_job(
                            scr,
                            "restore",
                            "The disk will be left unusable (its partition table wiped).",
                            || plan.restore(&opts),
                        );
                        let mut cmd = format!(
                            "klon restore --yes{} {} {}",
                            grow.flag(),
                            shell_quote(&image),
                            shell_quote(&tpath)
                        );
                        cmd = cmd.replace("  ", " ");
                        let body = match r {
                            Ok(r) => {
                                format!(
                                    "Restored {} to {}.\n\nTime:         {}\nWritten:      {} at {}\nVerification: {}\n\nThe same from a script:\n  {cmd}",
                                    image.display(),
                                    tpath.display(),
                                    human_duration(r.seconds),
                                    human_bytes(r.bytes_written),
                                    rate(r.bytes_written, r.seconds),
                                    if r.verified {
                                        "OK, everything read back matches the image"
                                    } else {
                                        "not read back"
                                    }
                                ) + &r.table_note(&tpath).map(|n| format!("\n\n{n}")).unwrap_or_default()
                                    + &r.growth_note().map(|n| format!("\n\n{n}")).unwrap_or_default()
                                    + &r.resized.iter().map(|g| format!("\n\n{}", g.note)).collect::<String>()
                            }
                            Err(e) => format!("The restore did not finish.\n\n{}", explain(&e)),
                        };
                        drop(dir.take());
                        return scr.message("restore done", &body);
                    }
                }
            }
            _ => unreachable!("no such step"),
        }
    }
}

// ---------------------------------------------------------------- receive

/// Receives what `klon deploy` sends by multicast onto a disk chosen here,
/// with the checks of a restore, and reports to the sender.
fn receive_flow(scr: &Screen, ctx: &WizardContext) -> Result<()> {
    use crate::engine::deploy::{DEFAULT_PORT, ReceiveOptions, receive};
    let title = "receive from the network";
    let (interface, net_line) = match ctx.network {
        Some(up) => {
            scr.page(title, "Bringing up the network by DHCP ...")?;
            match up() {
                Ok((iface, line)) => (Some(iface), format!("Network: {line}.")),
                Err(e) => {
                    return scr.message(
                        title,
                        &format!(
                            "No network: {}\n\nConnect a network cable (to the network klon deploy sends on) and try \
                             again.",
                            explain(&e)
                        ),
                    );
                }
            }
        }
        None => (None, "The machine's network is used as it is.".to_string()),
    };
    let list = disks::list(&ctx.exclude)?;
    let Nav::Go(target) = pick_target(scr, ctx, title, &list, None, &[], Need { size: 0, sector_size: 512 })? else {
        return Ok(());
    };
    let what = format!(
        "{net_line}\n\nThe image klon deploy sends (on port {DEFAULT_PORT}) will be written to {} as it arrives, every \
         chunk checked, and read back.",
        list[target].info.path.display()
    );
    let Nav::Go(()) = confirm_destroy(scr, title, &what, &list[target])? else { return Ok(()) };
    let tpath = list[target].info.path.clone();
    scr.page(
        title,
        &format!(
            "{net_line}\n\nWaiting for klon deploy on the network, then writing {}. Ctrl-C stops.",
            tpath.display()
        ),
    )?;
    let opts = ReceiveOptions {
        interface: interface.clone(),
        port: DEFAULT_PORT,
        restore: RestoreOptions {
            grow_last: false,
            verify_after: true,
            feedback: Console::feedback(false),
            workers: default_workers(),
        },
    };
    let r = run_job(scr, "receive", "The disk will be left unusable (its partition table wiped).", || {
        receive(&tpath, &opts)
    });
    let cmd = format!(
        "klon receive --multicast --yes{} {}",
        interface.map(|i| format!(" --interface {i}")).unwrap_or_default(),
        shell_quote(&tpath)
    );
    let body = match r {
        Ok(r) => format!(
            "Received and restored onto {}.\n\nTime:         {}\nWritten:      {} at {}\nVerification: {}\n\nThe \
             sender was told. The same from a script:\n  {cmd}",
            tpath.display(),
            human_duration(r.seconds),
            human_bytes(r.bytes_written),
            rate(r.bytes_written, r.seconds),
            if r.verified { "OK, everything read back matches the image" } else { "not read back" }
        ),
        Err(e) => format!("The image was not received whole.\n\n{}", explain(&e)),
    };
    scr.message("receive done", &body)
}

// ---------------------------------------------------------------- clone

fn clone_flow(scr: &Screen, ctx: &WizardContext) -> Result<()> {
    let title = "clone a disk";
    let list = disks::list(&ctx.exclude)?;
    if list.len() < 2 {
        return scr.message(title, "Cloning needs two disks: connect the target disk and try again.");
    }
    let mut step = 0;
    let mut src = 0usize;
    let mut target = 0usize;
    let mut grow = Grow::No;
    loop {
        let need = Need { size: list[src].info.size, sector_size: list[src].info.logical_sector_size };
        match step {
            0 => match pick_source(scr, ctx, title, &list, src)? {
                Nav::Back => return Ok(()),
                Nav::Go(i) => {
                    src = i;
                    step = 1;
                }
            },
            1 => match pick_target(scr, ctx, title, &list, Some(list[src].info.devno), &[], need)? {
                Nav::Back => step = 0,
                Nav::Go(i) => {
                    target = i;
                    step = 2;
                }
            },
            2 => match ask_grow(scr, title, &list[target], need, false)? {
                Nav::Back => step = 1,
                Nav::Go(g) => {
                    grow = g;
                    step = 3;
                }
            },
            _ => {
                let (s, t) = (list[src].info.path.clone(), list[target].info.path.clone());
                let plan = match clone_engine::prepare(&s, &t, PlanOptions::default(), false) {
                    Ok(p) => p,
                    Err(e) => {
                        scr.message(title, &explain(&e))?;
                        step = 1;
                        continue;
                    }
                };
                let Nav::Go(()) = confirm_destroy(scr, title, &plan.describe(), &list[target])? else {
                    step = if list[target].info.size > need.size { 2 } else { 1 };
                    continue;
                };
                scr.page(title, &format!("Copying {} to {}. Ctrl-C stops.", s.display(), t.display()))?;
                let opts = CloneOptions {
                    grow_last: grow == Grow::Last,
                    verify_after: true,
                    feedback: Console::feedback(false),
                    workers: default_workers(),
                };
                let r = run_job(scr, "clone", "The target will be left unusable (its partition table wiped).", || {
                    clone_engine::clone(plan, &opts)
                });
                let cmd = format!("klon clone --yes{} {} {}", grow.flag(), shell_quote(&s), shell_quote(&t));
                let body = match r {
                    Ok(r) => {
                        format!(
                            "Copied {} to {}.\n\nTime:         {}\nWritten:      {} at {}\nVerification: {}\n\nThe same from a script:\n  {cmd}",
                            s.display(),
                            t.display(),
                            human_duration(r.seconds),
                            human_bytes(r.bytes_written),
                            rate(r.bytes_written, r.seconds),
                            if r.verified {
                                "OK, the target reads back the same as the source"
                            } else {
                                "not read back"
                            }
                        ) + &r.table_note(&t).map(|n| format!("\n\n{n}")).unwrap_or_default()
                            + &r.growth_note().map(|n| format!("\n\n{n}")).unwrap_or_default()
                    }
                    Err(e) => format!("The clone did not finish.\n\n{}", explain(&e)),
                };
                return scr.message("clone done", &body);
            }
        }
    }
}
