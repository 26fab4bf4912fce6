//! The live USB system: klon as PID 1 of a small initramfs ([`pid1`]), a
//! session on each console, unattended jobs named on the kernel command
//! line or in the stick's klon.conf ([`job`]), the image drive
//! ([`crate::inventory::image_drive`]) and hot-plugging from kernel uevents
//! ([`crate::device::uevent`]).
//!
//! The live stick is the disk holding the FAT filesystem labelled
//! [`LIVE_LABEL`] (or the one `klon.live=LABEL=…|UUID=…` names); it is never
//! offered as a source, a target or an image drive.

pub mod job;
pub mod net;
pub mod pid1;
pub mod pxe;
#[cfg(feature = "udev")]
pub mod udev_props;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::{Cli, Command, LiveArgs, LiveCommand};
use crate::error::{Error, Result};
use crate::inventory::DiskInfo;
use crate::inventory::image_drive::{self, Candidate, ImageDrive};
pub use crate::inventory::image_drive::{COPY_MNT, DRIVE_MNT, LIVE_LABEL};
use crate::inventory::share;
use crate::ui::progress::Console;
use job::{Job, JobKind};

/// Where the live stick's FAT partition is mounted (read-only) to read klon.conf.
pub const BOOT_MNT: &str = "/run/klon/boot";
/// The merged job settings PID 1 hands to the job process.
pub const JOB_FILE: &str = "/run/klon/job.conf";
/// Written by the job process once it has printed its KLON-RESULT line.
pub const RESULT_FILE: &str = "/run/klon/result";

/// Runs `klon live …`.
pub fn run(_cli: &Cli, a: &LiveArgs) -> Result<()> {
    match &a.what {
        LiveCommand::Console { tty, shell } => console(tty, *shell),
        LiveCommand::Job { file } => {
            let code = run_job_file(file.as_deref().unwrap_or(Path::new(JOB_FILE)));
            std::process::exit(code)
        }
        LiveCommand::Drives => {
            for c in image_drives(&[])? {
                println!("{}", c.describe());
            }
            Ok(())
        }
    }
}

/// The live stick's spec from the kernel command line (`klon.live=`), or
/// `LABEL=KLONLIVE`.
pub fn live_spec() -> String {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    crate::job::from_cmdline(&cmdline).remove("live").unwrap_or_else(|| format!("LABEL={LIVE_LABEL}"))
}

/// Device numbers of the disks that hold the live system's FAT partition.
pub fn live_disks(disks: &[DiskInfo], spec: &str) -> Vec<u64> {
    image_drive::live_sticks(disks, spec)
}

/// The live stick's FAT partition, if it is there yet.
pub fn live_partition(spec: &str) -> Option<Candidate> {
    let disks = crate::inventory::list_disks().ok()?;
    image_drive::candidates(&disks, &[]).into_iter().find(|c| c.fs.fstype == "vfat" && c.matches(spec))
}

/// The filesystems offered as image drives: on every disk but the live
/// stick and the disks in `exclude` (the source or target being used).
pub fn image_drives(exclude: &[u64]) -> Result<Vec<Candidate>> {
    let disks = crate::inventory::list_disks()?;
    let mut ex = live_disks(&disks, &live_spec());
    ex.extend_from_slice(exclude);
    Ok(image_drive::candidates(&disks, &ex))
}

/// The disks offered as sources and targets: every disk but the live stick.
pub fn offered_disks() -> Result<Vec<DiskInfo>> {
    let disks = crate::inventory::list_disks()?;
    let stick = live_disks(&disks, &live_spec());
    Ok(disks.into_iter().filter(|d| !stick.contains(&d.devno)).collect())
}

/// Terminals the kernel writes its console to (`console=` on the command
/// line), as device paths; tty0 (the current screen) counts as /dev/tty1
/// when `for_session`.
pub fn consoles(for_session: bool) -> Vec<PathBuf> {
    let active = std::fs::read_to_string("/sys/class/tty/console/active").unwrap_or_default();
    let mut out: Vec<PathBuf> = Vec::new();
    for name in active.split_whitespace() {
        let name = if for_session && name == "tty0" { "tty1" } else { name };
        let p = PathBuf::from(format!("/dev/{name}"));
        if !out.contains(&p) {
            out.push(p);
        }
    }
    if out.is_empty() {
        out.push(PathBuf::from("/dev/console"));
    }
    out
}

/// Prints `line` on every console (the screen and the serial port), or on
/// stdout when there is none.
pub fn print_on_consoles(line: &str) {
    let mut any = false;
    for c in consoles(false) {
        if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(&c) {
            any |= f.write_all(format!("{line}\n").as_bytes()).is_ok();
        }
    }
    if !any {
        println!("{line}");
    }
}

/// Runs the wizard on the current terminal (the live stick never offered),
/// and does what it asks: a rescue shell, or a reboot or power-off, which
/// PID 1 carries out (SIGTERM reboots, SIGUSR2 powers off, as busybox's
/// `reboot` and `poweroff` ask).
pub fn start_wizard() -> Result<()> {
    use crate::ui::wizard::{WizardContext, WizardExit, run_with};
    let disks = crate::inventory::list_disks()?;
    let stick = live_disks(&disks, &live_spec());
    let exclude = disks.iter().filter(|d| stick.contains(&d.devno)).map(|d| d.path.clone()).collect();
    let network: crate::ui::wizard::BringUpNetwork =
        || net::bring_up(None, Duration::from_secs(20)).map(|l| (l.iface.clone(), l.describe()));
    match run_with(WizardContext { live: true, exclude, network: Some(network) })? {
        WizardExit::Quit => Ok(()),
        WizardExit::Shell => rescue_shell(),
        WizardExit::Reboot => ask_init(nix::sys::signal::Signal::SIGTERM),
        WizardExit::PowerOff => ask_init(nix::sys::signal::Signal::SIGUSR2),
    }
}

fn ask_init(sig: nix::sys::signal::Signal) -> Result<()> {
    nix::unistd::sync();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(1), sig)
        .map_err(|e| Error::io("asking init to shut down", Path::new("/proc/1"), None, e.into()))?;
    // PID 1 ends every session; wait for it.
    std::thread::sleep(Duration::from_secs(60));
    Ok(())
}

/// Runs the rescue shell on the current terminal and waits for it.
pub fn rescue_shell() -> Result<()> {
    let sh = Path::new("/bin/sh");
    if !sh.exists() {
        println!("No rescue shell in this image.");
        return Ok(());
    }
    println!("Rescue shell: 'exit' returns to klon; 'poweroff' or 'reboot' end the live system.");
    let status = std::process::Command::new(sh).arg("-l").status().map_err(|e| Error::io("starting", sh, None, e))?;
    let _ = status;
    Ok(())
}

/// `klon live console TTY`: becomes a session leader with TTY as its
/// controlling terminal and runs the wizard there, again and again.
fn console(tty: &Path, shell_first: bool) -> Result<()> {
    let _ = nix::unistd::setsid();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(tty)
        .map_err(|e| Error::io("opening console", tty, None, e))?;
    let dup = |r: nix::Result<()>| r.map_err(|e| Error::io("redirecting to", tty, None, e.into()));
    dup(nix::unistd::dup2_stdin(&f))?;
    dup(nix::unistd::dup2_stdout(&f))?;
    dup(nix::unistd::dup2_stderr(&f))?;
    drop(f);
    let name = tty.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let term = if name.starts_with("ttyS") || name.starts_with("ttyUSB") || name.starts_with("hvc") {
        "vt220"
    } else {
        "linux"
    };
    set_env("TERM", term);
    if shell_first {
        rescue_shell()?;
    }
    loop {
        if let Err(e) = start_wizard() {
            eprintln!("klon: {e}");
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}

#[allow(unsafe_code)]
fn set_env(k: &str, v: &str) {
    // SAFETY: called while the process has a single thread.
    unsafe { std::env::set_var(k, v) }
}

/// Finds a disk by `/dev/…` path or `serial=…`, waiting up to `wait` for
/// it to appear; never the live stick.
pub fn resolve_disk(spec: &str, wait: Duration) -> Result<PathBuf> {
    let live = live_spec();
    let found = crate::device::uevent::wait_for(wait, || {
        let disks = crate::inventory::list_disks().ok()?;
        let stick = live_disks(&disks, &live);
        let hit = disks.iter().find(|d| disk_matches(d, spec))?;
        Some(if stick.contains(&hit.devno) { Err(hit.path.clone()) } else { Ok(hit.path.clone()) })
    });
    match found {
        Some(Ok(p)) => Ok(p),
        Some(Err(p)) => Err(Error::Refused(format!("{spec} ({}) is the live stick", p.display()))),
        None => {
            let have = crate::inventory::list_disks()
                .map(|ds| {
                    ds.iter()
                        .map(|d| format!("{} serial {}", d.path.display(), d.serial.as_deref().unwrap_or("-")))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            Err(Error::Usage(format!("no disk {spec} after {} s (disks: {have})", wait.as_secs())))
        }
    }
}

/// Whether disk `d` is the one `spec` names (`/dev/…` or `serial=…`).
pub fn disk_matches(d: &DiskInfo, spec: &str) -> bool {
    let spec = spec.trim();
    if let Some(s) = spec.strip_prefix("serial=").or_else(|| spec.strip_prefix("SERIAL=")) {
        return d.serial.as_deref().is_some_and(|x| x == s);
    }
    d.path == Path::new(spec)
}

/// Mounts the drive `spec` names (the only candidate when none), on
/// none of the disks `exclude`, at `at` (a read-only disk only when
/// mounting `read_only`).
fn mount_drive(job: &Job, spec: Option<&str>, exclude: &[u64], at: &str, read_only: bool) -> Result<ImageDrive> {
    let wait_secs = job.wait_secs;
    if let Some(spec) = spec.filter(|s| share::is_share(s)) {
        let share = share::parse(spec)?;
        let want = job.net.as_ref().and_then(|n| n.interface.as_deref());
        let lease = net::bring_up(want, Duration::from_secs(wait_secs))
            .map_err(|e| e.with_note(&format!("the network share {} needs the network", share.describe())))?;
        eprintln!("klon: network {}; image drive {}", lease.describe(), share.describe());
        let password = job.drive_password.as_ref().map(|p| p.0.as_str());
        return ImageDrive::mount_share(&share, password, Path::new(at), read_only);
    }
    let live = live_spec();
    let offered = |disks: &[DiskInfo]| -> Vec<Candidate> {
        let mut ex = live_disks(disks, &live);
        ex.extend_from_slice(exclude);
        image_drive::candidates(disks, &ex).into_iter().filter(|c| read_only || !c.read_only).collect()
    };
    let wait = Duration::from_secs(wait_secs);
    let picked = crate::device::uevent::wait_for(wait, || {
        let cands = offered(&crate::inventory::list_disks().ok()?);
        image_drive::choose(&cands, spec).ok().cloned()
    });
    let c = match picked {
        Some(c) => c,
        None => {
            // Say why, with what there is now.
            let cands = offered(&crate::inventory::list_disks()?);
            return Err(image_drive::choose(&cands, spec)
                .err()
                .unwrap_or_else(|| Error::Usage("no image drive".into())));
        }
    };
    if let Some(m) = c.mountpoints.first() {
        return Err(Error::Refused(format!(
            "image drive {} is already mounted at {}",
            c.device.display(),
            m.display()
        )));
    }
    eprintln!("klon: {} {}", if at == DRIVE_MNT { "image drive" } else { "second drive" }, c.describe());
    ImageDrive::mount(&c, Path::new(at), read_only)
}

fn devno_of(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.rdev())
}

/// Runs `job` with the same code as `klon backup/restore/verify`, printing
/// progress on stdout/stderr. Returns a one-line summary.
pub fn run_job(job: &Job) -> Result<String> {
    run_job_on(job, &mut None)
}

/// The file on the image drive (in its images folder) that keeps one line
/// per unattended job: when it ended and its KLON-RESULT.
pub const JOBS_LOG: &str = "klon-jobs.log";

/// The disk a backup reads (its source) or a restore writes (its target),
/// once it is there; none for a verify.
fn job_disk(job: &Job, wait: Duration) -> Result<Option<PathBuf>> {
    Ok(match job.kind {
        JobKind::Backup => Some(resolve_disk(job.source.as_deref().unwrap_or_default(), wait)?),
        JobKind::Restore => Some(resolve_disk(job.target.as_deref().unwrap_or_default(), wait)?),
        _ => None,
    })
}

/// The image drive a job used, to keep its result on.
enum UsedDrive {
    /// A drive: its device and filesystem.
    Disk(PathBuf, String),
    /// A network share, and its user's password.
    Share(share::Share, Option<job::Secret>),
}

impl UsedDrive {
    fn describe(&self) -> String {
        match self {
            UsedDrive::Disk(d, _) => d.display().to_string(),
            UsedDrive::Share(s, _) => s.describe(),
        }
    }
}

/// [`run_job`], noting in `drive` which drive held the images once one
/// was mounted.
fn run_job_on(job: &Job, used_drive: &mut Option<UsedDrive>) -> Result<String> {
    match job.kind {
        JobKind::Receive => return run_receive_job(job),
        _ if job.drive.as_deref().is_some_and(job::is_s3) => return run_s3_job(job),
        JobKind::Clone => return run_clone_job(job),
        _ => {}
    }
    let wait = Duration::from_secs(job.wait_secs);
    let disk = job_disk(job, wait)?;
    let exclude: Vec<u64> = disk.as_deref().and_then(devno_of).into_iter().collect();
    let drive = mount_drive(job, job.drive.as_deref(), &exclude, DRIVE_MNT, job.kind != JobKind::Backup)?;
    *used_drive = Some(match &drive.share {
        Some(s) => UsedDrive::Share(s.clone(), job.drive_password.clone()),
        None => UsedDrive::Disk(drive.device.clone(), drive.fstype.clone()),
    });
    let on_drive = drive.device.display().to_string();
    let images = drive.images_dir()?;
    let folder = images.strip_prefix(&drive.mountpoint).unwrap_or(&images).to_path_buf();
    let image = images.join(&job.image);
    let cli = match job.kind {
        JobKind::Backup => job.command(disk.as_deref(), None, Some(&image), None),
        _ => job.command(None, disk.as_deref(), Some(&image), None),
    };
    let cli = match cli {
        Ok(c) => c,
        Err(e) => {
            let _ = drive.unmount();
            return Err(e);
        }
    };
    if let Some(p) = &job.passphrase {
        crate::repo::crypto::set_passphrase(p.0.clone());
    }
    let started = std::time::Instant::now();
    let result = crate::commands::run(&cli).map_err(|e| match job.kind {
        JobKind::Backup if !job.flag("rescue") && crate::engine::backup::is_unreadable_source(&e) => e.with_note(
            "in an unattended job: rescue = yes in klon.conf, or klon.rescue=yes on the kernel command line",
        ),
        _ => e,
    });
    // A rescued backup's result says what it could not read.
    let lost = match (&result, job.kind) {
        (Ok(()), JobKind::Backup) => crate::image::Manifest::load(&image).ok().and_then(|m| {
            m.unreadable_places().map(|places| {
                format!(
                    "; WARNING: {} bytes could not be read and are stored as zeros ({places}; klon info lists them): \
                     the image is NOT a perfect copy of the disk",
                    m.unreadable_bytes()
                )
            })
        }),
        _ => None,
    };
    // The new snapshot to the second drive, once the backup is complete.
    let copied = match (&result, &job.copy_drive) {
        (Ok(()), Some(spec)) => {
            let mut not_on = exclude.clone();
            not_on.push(drive.disk_devno);
            Some(copy_to_second_drive(job, spec, &image, &not_on))
        }
        _ => None,
    };
    let unmounted = drive.unmount();
    result?;
    let copied = copied.transpose()?.unwrap_or_default();
    unmounted?;
    let image = format!("image {} on {on_drive}", folder.join(&job.image).display());
    let what = match (job.kind, disk) {
        (JobKind::Backup, Some(d)) => format!("backup of {} to {image}", d.display()),
        (JobKind::Restore, Some(d)) => format!("restore of {image} to {}", d.display()),
        _ => format!("verify of {image}"),
    };
    Ok(format!("{what} in {:.1} s{copied}{}", started.elapsed().as_secs_f64(), lost.unwrap_or_default()))
}

/// A backup, restore or verify of a repository in an S3 store (`drive =
/// s3://BUCKET/PREFIX`, the repository `PREFIX/IMAGE`): the network, the
/// store's settings handed to klon's S3 client (in memory, written
/// nowhere), then the command on `s3://BUCKET/PREFIX/IMAGE` (a backup with
/// `--repo`). No jobs log: an object store has no file to append to; the
/// result stays on the consoles.
fn run_s3_job(job: &Job) -> Result<String> {
    let store = job.drive.as_deref().unwrap_or_default().trim().trim_end_matches('/');
    let wait = Duration::from_secs(job.wait_secs);
    let disk = job_disk(job, wait)?;
    let want = job.net.as_ref().and_then(|n| n.interface.as_deref());
    let lease = net::bring_up(want, wait).map_err(|e| e.with_note(&format!("{store} needs the network")))?;
    eprintln!("klon: network {}; repositories in {store}", lease.describe());
    crate::repo::s3::set_settings(job.s3.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect());
    let repo = PathBuf::from(format!("{store}/{}", job.image));
    let mut j = job.clone();
    if job.kind == JobKind::Backup {
        j.options.insert("repo".into(), "yes".into());
    }
    let cli = match job.kind {
        JobKind::Backup => j.command(disk.as_deref(), None, Some(&repo), None)?,
        _ => j.command(None, disk.as_deref(), Some(&repo), None)?,
    };
    if let Some(p) = &job.passphrase {
        crate::repo::crypto::set_passphrase(p.0.clone());
    }
    let started = std::time::Instant::now();
    crate::commands::run(&cli)?;
    let what = match (job.kind, disk) {
        (JobKind::Backup, Some(d)) => format!("backup of {} to {}", d.display(), repo.display()),
        (JobKind::Restore, Some(d)) => format!("restore of {} to {}", repo.display(), d.display()),
        _ => format!("verify of {}", repo.display()),
    };
    Ok(format!("{what} in {:.1} s", started.elapsed().as_secs_f64()))
}

/// The receive job: the network (PID 1 brought it up; again here if it
/// failed then), then `klon receive --multicast --yes TARGET` on it.
fn run_receive_job(job: &Job) -> Result<String> {
    let wait = Duration::from_secs(job.wait_secs);
    let target = resolve_disk(job.target.as_deref().unwrap_or_default(), wait)?;
    let want = job.net.as_ref().and_then(|n| n.interface.as_deref());
    let lease = net::bring_up(want, wait).map_err(|e| e.with_note("job=receive needs the network"))?;
    let cli = job.command(None, Some(&target), None, Some(&lease.iface))?;
    if let Command::Receive(r) = &cli.command {
        eprintln!("klon: network {}; waiting for klon deploy (port {})", lease.describe(), r.port);
    }
    let started = std::time::Instant::now();
    crate::commands::run(&cli)?;
    Ok(format!(
        "receive of klon deploy's image on {} ({}) to {} in {:.1} s",
        lease.iface,
        lease.address,
        target.display(),
        started.elapsed().as_secs_f64()
    ))
}

/// The clone job: `klon clone --yes SOURCE TARGET`, no image drive (the
/// clone refuses a target that is the source).
fn run_clone_job(job: &Job) -> Result<String> {
    let wait = Duration::from_secs(job.wait_secs);
    let source = resolve_disk(job.source.as_deref().unwrap_or_default(), wait)?;
    let target = resolve_disk(job.target.as_deref().unwrap_or_default(), wait)?;
    let cli = job.command(Some(&source), Some(&target), None, None)?;
    let started = std::time::Instant::now();
    crate::commands::run(&cli)?;
    Ok(format!("clone of {} to {} in {:.1} s", source.display(), target.display(), started.elapsed().as_secs_f64()))
}

/// Appends `line`, with the time, to the jobs log in the images folder of
/// the drive (mounted read-write for it, then unmounted).
fn keep_result(drive: &UsedDrive, line: &str) -> Result<()> {
    use std::io::Write as _;
    let at = Path::new(DRIVE_MNT);
    let (mounted, dir) = match drive {
        UsedDrive::Disk(device, fstype) => {
            (crate::device::mounts::Mounted::mount(device, fstype, at, false)?, at.join(image_drive::IMAGES_DIR))
        }
        UsedDrive::Share(s, password) => {
            (s.mount(password.as_ref().map(|p| p.0.as_str()), at, false)?, s.images_dir(at))
        }
    };
    let path = dir.join(JOBS_LOG);
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::OpenOptions::new().create(true).append(true).open(&path))
        .and_then(|mut f| {
            f.write_all(format!("{} {line}\n", crate::image::manifest::now_rfc3339()).as_bytes())?;
            f.sync_all()
        })
        .map_err(|e| Error::io("appending to", &path, None, e));
    let unmounted = mounted.unmount();
    written?;
    unmounted
}

/// Copies the newest snapshot of the repository `repo` (just made) into
/// the repository of the same name on the drive `spec` names (on none of
/// the disks `not_on`). Returns what to add to the job's summary.
fn copy_to_second_drive(job: &Job, spec: &str, repo: &Path, not_on: &[u64]) -> Result<String> {
    let note = |e: Error| e.with_note("the backup itself is complete; the copy to the second drive failed");
    if !crate::repo::is_repository(repo) {
        return Err(Error::Usage(format!(
            "copy_drive={spec}: {} is a standalone image, not a repository (set repo = yes to back up into one)",
            job.image
        )));
    }
    let id = crate::repo::Repository::open(repo).and_then(|r| r.resolve(None)).map_err(note)?.id;
    let second = mount_drive(job, Some(spec), not_on, COPY_MNT, false).map_err(note)?;
    let on = second.device.display().to_string();
    let copied = second
        .images_dir()
        .and_then(|dir| {
            crate::engine::snapshot::copy_snapshot_into(repo, &dir.join(&job.image), &id, &Console::feedback(false))
        })
        .map_err(note);
    let unmounted = second.unmount();
    let report = copied?;
    unmounted.map_err(note)?;
    Ok(format!(
        "; snapshot {} copied to {}/{} on {on} ({} chunks sent, read back)",
        &id[..8],
        image_drive::IMAGES_DIR,
        job.image,
        report.chunks
    ))
}

/// `klon live job FILE`: runs the job, prints KLON-RESULT on every console,
/// records that it did, and returns the exit code.
pub fn run_job_file(file: &Path) -> i32 {
    let mut used_drive = None;
    let outcome = std::fs::read_to_string(file)
        .map_err(|e| Error::io("reading", file, None, e))
        .and_then(|t| crate::job::from_config(&t, &file.display().to_string()))
        .and_then(|s| job::parse(&s, &BTreeMap::new()))
        .and_then(|j| j.ok_or_else(|| Error::Usage("no job given".into())))
        .and_then(|j| {
            if j.kind == JobKind::Receive {
                eprintln!("klon: unattended receive onto {}", j.target.as_deref().unwrap_or_default());
            } else {
                eprintln!("klon: unattended {} of image {:?}", j.kind.name(), j.image);
            }
            run_job_on(&j, &mut used_drive)
                .map_err(|e| (j.kind, e))
                .map_err(|(k, e)| e.with_note(&format!("{} failed", k.name())))
        });
    let (line, code) = match outcome {
        Ok(summary) => (format!("KLON-RESULT: ok {summary}"), 0),
        Err(e) => (format!("KLON-RESULT: failed (exit {}) {e}", e.exit_code()), e.exit_code()),
    };
    let _ = std::io::stdout().flush();
    print_on_consoles(&line);
    // Kept on the image drive too: the machine may be off when someone
    // comes to look.
    if let Some(drive) = &used_drive
        && let Err(e) = keep_result(drive, &line)
    {
        print_on_consoles(&format!("klon: the result could not be kept in {JOBS_LOG} on {}: {e}", drive.describe()));
    }
    let _ = std::fs::write(RESULT_FILE, format!("{line}\n"));
    code
}
