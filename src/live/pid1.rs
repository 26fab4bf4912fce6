//! klon as PID 1 of the live system: mount proc, sys and devtmpfs, load
//! the kernel modules the initramfs carries, read the stick's klon.conf,
//! then either run the unattended job or start a session (the wizard) on
//! every console; reap children; power off or reboot cleanly on request
//! (busybox `poweroff` sends SIGUSR2, `reboot` SIGTERM, `halt` SIGUSR1).
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::reboot::{RebootMode, reboot};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, kill, sigaction};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;

use super::job::{self, After};
use super::{BOOT_MNT, JOB_FILE, RESULT_FILE};
use crate::inventory::image_drive::{DRIVE_MOUNTS, ImageDrive};

const NONE: u8 = 0;
const POWEROFF: u8 = 1;
const REBOOT: u8 = 2;
static POWER: AtomicU8 = AtomicU8::new(NONE);

extern "C" fn on_signal(sig: libc::c_int) {
    let v = if sig == libc::SIGTERM || sig == libc::SIGINT { REBOOT } else { POWEROFF };
    POWER.store(v, Ordering::SeqCst);
}

/// Whether this process is PID 1 (the kernel started klon as /init).
pub fn is_init() -> bool {
    std::process::id() == 1
}

fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime").ok().and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(0.0)
}

fn say(msg: &str) {
    let mut o = std::io::stdout();
    let _ = writeln!(o, "klon live [{:6.2}] {msg}", uptime());
    let _ = o.flush();
}

fn early_mounts() {
    let m = |src: &str, at: &str, fstype: &str, flags: MsFlags, data: Option<&str>| {
        let _ = std::fs::create_dir_all(at);
        match mount(Some(src), at, Some(fstype), flags, data) {
            Ok(()) | Err(nix::Error::EBUSY) => {}
            Err(e) => eprintln!("klon: mounting {fstype} at {at}: {e}"),
        }
    };
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    m("proc", "/proc", "proc", nosuid, None);
    m("sysfs", "/sys", "sysfs", nosuid, None);
    m("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755"));
    m("devpts", "/dev/pts", "devpts", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("gid=5,mode=620,ptmxmode=666"));
    m("tmpfs", "/run", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"));
    m("tmpfs", "/tmp", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777"));
    let _ = std::fs::create_dir_all("/run/klon");
}

/// "legacy BIOS", "UEFI, Secure Boot on" or "UEFI, Secure Boot off".
pub fn firmware() -> String {
    if !Path::new("/sys/firmware/efi").exists() {
        return "legacy BIOS".into();
    }
    let vars = "/sys/firmware/efi/efivars";
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY;
    let _ = mount(Some("efivarfs"), vars, Some("efivarfs"), flags, None::<&str>);
    // 4 bytes of attributes, then the value.
    match std::fs::read(format!("{vars}/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c")) {
        Ok(b) if b.len() >= 5 && b[4] == 1 => "UEFI, Secure Boot on".into(),
        Ok(_) => "UEFI, Secure Boot off".into(),
        Err(_) => "UEFI".into(),
    }
}

/// Without /dev/console in the initramfs the kernel starts init with no
/// standard streams: attach them to the console now that devtmpfs is there.
fn fix_stdio() {
    if std::fs::metadata("/proc/self/fd/1").is_ok() {
        return;
    }
    if let Ok(f) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/console") {
        let _ = nix::unistd::dup2_stdin(&f);
        let _ = nix::unistd::dup2_stdout(&f);
        let _ = nix::unistd::dup2_stderr(&f);
    }
}

fn install_signals() {
    // No SA_RESTART: a signal interrupts waitpid, and the loop looks at POWER.
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::empty(), SigSet::empty());
    for sig in [Signal::SIGUSR1, Signal::SIGUSR2, Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let _ = unsafe { sigaction(sig, &action) };
    }
}

fn set_env(k: &str, v: &str) {
    // SAFETY: PID 1 sets its environment before it starts any thread.
    unsafe { std::env::set_var(k, v) }
}

/// Loads the modules listed in /lib/modules/RELEASE/klon.load (paths
/// relative to that folder, dependencies first, as initramfs/build wrote
/// them) on a few threads: a module starts once the modules it depends on
/// (modules.dep) are in. Returns (loaded, failed).
pub fn load_modules() -> (usize, Vec<String>) {
    let release = nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    let dir = PathBuf::from("/lib/modules").join(&release);
    let list = std::fs::read_to_string(dir.join("klon.load")).unwrap_or_default();
    let order: Vec<String> =
        list.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect();
    let deps = parse_modules_dep(&std::fs::read_to_string(dir.join("modules.dep")).unwrap_or_default());
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 4);
    let (ok, failed) = load_in_parallel(&order, &deps, threads, |rel| {
        let f = std::fs::File::open(dir.join(rel)).map_err(|e| e.to_string())?;
        match nix::kmod::finit_module(&f, c"", nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::Error::EEXIST) => Ok(true),
            // ENODEV: hardware this machine lacks (a CPU's crc32c, a controller).
            Err(nix::Error::ENODEV) => Ok(false),
            Err(e) => Err(e.to_string()),
        }
    });
    (ok, failed)
}

/// modules.dep: "kernel/fs/btrfs/btrfs.ko: kernel/lib/raid6/raid6_pq.ko …".
pub fn parse_modules_dep(text: &str) -> BTreeMap<String, Vec<String>> {
    text.lines()
        .filter_map(|l| {
            let (m, d) = l.split_once(':')?;
            Some((m.trim().to_string(), d.split_whitespace().map(String::from).collect()))
        })
        .collect()
}

/// Runs `load` for every module of `order` on `threads` threads, each
/// module after its dependencies; a module whose dependency failed is not
/// tried. `load` returns Ok(true) when loaded, Ok(false) when the module
/// does not apply (no such hardware). Returns (loaded, failures).
pub fn load_in_parallel(
    order: &[String],
    deps: &BTreeMap<String, Vec<String>>,
    threads: usize,
    load: impl Fn(&str) -> Result<bool, String> + Sync,
) -> (usize, Vec<String>) {
    use std::collections::BTreeSet;
    use std::sync::{Condvar, Mutex};
    #[derive(Default)]
    struct State {
        next: BTreeSet<usize>,
        done: BTreeSet<String>,
        bad: BTreeSet<String>,
        loaded: usize,
        failed: Vec<String>,
    }
    let known: BTreeSet<&str> = order.iter().map(String::as_str).collect();
    let state = Mutex::new(State { next: (0..order.len()).collect(), ..Default::default() });
    let cv = Condvar::new();
    let name = |rel: &str| Path::new(rel).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if st.next.is_empty() {
                        cv.notify_all();
                        return;
                    }
                    // The first module (in order) whose dependencies are settled.
                    let ready = st.next.iter().copied().find(|&i| {
                        deps.get(&order[i]).is_none_or(|ds| {
                            ds.iter().all(|d| !known.contains(d.as_str()) || st.done.contains(d) || st.bad.contains(d))
                        })
                    });
                    let Some(i) = ready else {
                        st = cv.wait(st).unwrap_or_else(|e| e.into_inner());
                        continue;
                    };
                    st.next.remove(&i);
                    let rel = &order[i];
                    let broken = deps.get(rel).and_then(|ds| ds.iter().find(|d| st.bad.contains(*d)).cloned());
                    let outcome = match broken {
                        Some(d) => Err(format!("needs {}", name(&d))),
                        None => {
                            drop(st);
                            let r = load(rel);
                            st = state.lock().unwrap_or_else(|e| e.into_inner());
                            r
                        }
                    };
                    match outcome {
                        Ok(loaded) => {
                            st.loaded += usize::from(loaded);
                            st.done.insert(rel.clone());
                        }
                        Err(e) => {
                            st.failed.push(format!("{} ({e})", name(rel)));
                            st.bad.insert(rel.clone());
                        }
                    }
                    cv.notify_all();
                }
            });
        }
    });
    let st = state.into_inner().unwrap_or_else(|e| e.into_inner());
    (st.loaded, st.failed)
}

/// Where ssh (and sshfs, for sftp:// shares) looks for root's keys and
/// known hosts.
const SSH_DIR: &str = "/root/.ssh";

/// Copies the files of the stick's `ssh/` folder (a private key, known
/// hosts, a config) into `to`, readable by root alone, as ssh wants them;
/// how many. Nothing when the stick has no such folder.
fn take_ssh_keys(from: &Path, to: &Path) -> std::io::Result<usize> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(entries) = std::fs::read_dir(from) else { return Ok(0) };
    std::fs::create_dir_all(to)?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700))?;
    let mut n = 0;
    for e in entries {
        let e = e?;
        if !e.file_type()?.is_file() {
            continue;
        }
        let dest = to.join(e.file_name());
        std::fs::copy(e.path(), &dest)?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600))?;
        n += 1;
    }
    Ok(n)
}

fn read_config(spec: &str) -> BTreeMap<String, String> {
    // Booted from the network (klon serve --pxe): no stick to wait for.
    if spec.eq_ignore_ascii_case("none") {
        return BTreeMap::new();
    }
    let Some(part) = crate::device::uevent::wait_for(Duration::from_secs(15), || super::live_partition(spec)) else {
        say(&format!("the live stick ({spec}) did not show up: no klon.conf read"));
        return BTreeMap::new();
    };
    let drive = match ImageDrive::mount(&part, Path::new(BOOT_MNT), true) {
        Ok(d) => d,
        Err(e) => {
            say(&format!("cannot read klon.conf: {e}"));
            return BTreeMap::new();
        }
    };
    let path = Path::new(BOOT_MNT).join("klon.conf");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    match take_ssh_keys(&Path::new(BOOT_MNT).join("ssh"), Path::new(SSH_DIR)) {
        Ok(0) => {}
        Ok(n) => say(&format!("took {n} ssh files (keys, known hosts) from the stick's ssh/ folder")),
        Err(e) => say(&format!("cannot take the stick's ssh/ folder: {e}")),
    }
    let _ = drive.unmount();
    match crate::job::from_config(&text, "klon.conf") {
        Ok(m) => {
            if !m.is_empty() {
                say(&format!("read klon.conf from {}", part.device.display()));
            }
            m
        }
        Err(e) => {
            say(&format!("ignoring klon.conf: {e}"));
            BTreeMap::new()
        }
    }
}

/// The wired network by DHCP, when the settings ask for it (`net=dhcp`,
/// `job=receive`); a failure is said on the consoles (a job that needs the
/// network tries again and fails with the reason).
fn bring_up_network(
    config: &BTreeMap<String, String>,
    cmdline: &BTreeMap<String, String>,
    settings: &BTreeMap<String, String>,
) {
    let net = match job::net(config, cmdline) {
        Ok(Some(net)) => net,
        Ok(None) => return,
        Err(e) => {
            super::print_on_consoles(&format!("klon live: no network: {e}"));
            return;
        }
    };
    let wait = settings.get("wait").and_then(|w| w.trim().parse().ok()).unwrap_or(job::DEFAULT_WAIT);
    say("bringing up the network by DHCP");
    match super::net::bring_up(net.interface.as_deref(), Duration::from_secs(wait)) {
        Ok(lease) => super::print_on_consoles(&format!("klon live: network {}", lease.describe())),
        Err(e) => super::print_on_consoles(&format!("klon live: no network: {e}")),
    }
}

/// Waits for `pid` to end, reaping every other child meanwhile. Returns
/// its status, or `None` when a power request came first.
fn wait_for_child(pid: Pid, honour_power: bool) -> Option<WaitStatus> {
    loop {
        if honour_power && POWER.load(Ordering::SeqCst) != NONE {
            return None;
        }
        match waitpid(Pid::from_raw(-1), None) {
            Ok(st) if st.pid() == Some(pid) => return Some(st),
            Ok(_) => {}
            Err(nix::Error::EINTR) => {}
            Err(_) => return None,
        }
    }
}

fn spawn_self(args: &[&str]) -> Option<Pid> {
    match Command::new("/proc/self/exe").args(args).spawn() {
        Ok(c) => Some(Pid::from_raw(c.id() as i32)),
        Err(e) => {
            say(&format!("cannot start klon {}: {e}", args.join(" ")));
            None
        }
    }
}

/// A session on every console; respawned when it ends; until a power
/// request.
fn sessions(shell_first: bool) -> ! {
    let mut running: Vec<(Pid, String, Instant)> = Vec::new();
    let start = |tty: &str, shell: bool| -> Option<Pid> {
        let mut args = vec!["live", "console", tty];
        if shell {
            args.push("--shell");
        }
        spawn_self(&args)
    };
    for tty in super::consoles(true) {
        let t = tty.display().to_string();
        if let Some(pid) = start(&t, shell_first) {
            running.push((pid, t, Instant::now()));
        }
    }
    loop {
        let req = POWER.load(Ordering::SeqCst);
        if req != NONE {
            shutdown(req);
        }
        match waitpid(Pid::from_raw(-1), None) {
            Ok(st) => {
                if let Some(i) = running.iter().position(|(p, _, _)| Some(*p) == st.pid()) {
                    let (_, tty, since) = running.remove(i);
                    // A session that dies at once (no such tty) is not
                    // restarted in a tight loop.
                    if since.elapsed() < Duration::from_secs(2) {
                        std::thread::sleep(Duration::from_secs(2));
                    }
                    if let Some(pid) = start(&tty, false) {
                        running.push((pid, tty, Instant::now()));
                    }
                }
            }
            Err(nix::Error::EINTR) => {}
            Err(_) => {
                nix::unistd::pause();
            }
        }
    }
}

/// Stops every process, flushes and unmounts, and powers off or reboots.
fn shutdown(how: u8) -> ! {
    let word = if how == REBOOT { "rebooting" } else { "powering off" };
    super::print_on_consoles(&format!("klon live: {word}"));
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        match nix::sys::wait::waitpid(Pid::from_raw(-1), Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Err(nix::Error::ECHILD) => break,
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(100)),
            _ => {}
        }
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    while waitpid(Pid::from_raw(-1), Some(nix::sys::wait::WaitPidFlag::WNOHANG))
        .is_ok_and(|s| s != WaitStatus::StillAlive)
    {}
    nix::unistd::sync();
    for &at in DRIVE_MOUNTS.iter().chain(&[BOOT_MNT]) {
        if umount2(at, MntFlags::empty()).is_err() {
            let _ = umount2(at, MntFlags::MNT_DETACH);
        }
    }
    nix::unistd::sync();
    let mode = if how == REBOOT { RebootMode::RB_AUTOBOOT } else { RebootMode::RB_POWER_OFF };
    let _ = reboot(mode);
    // Only reached when reboot(2) failed.
    loop {
        nix::unistd::pause();
    }
}

/// PID 1's main: never returns.
pub fn main() -> ! {
    early_mounts();
    fix_stdio();
    install_signals();
    // Ctrl-Alt-Del: a SIGINT to PID 1 (a clean reboot), not an instant reset.
    let _ = nix::sys::reboot::set_cad_enabled(false);
    set_env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin");
    set_env("HOME", "/root");
    set_env("TERM", "linux");
    let _ = std::fs::create_dir_all("/root");
    say(&format!("klon {} live system starting", env!("CARGO_PKG_VERSION")));
    let (ok, failed) = load_modules();
    if failed.is_empty() {
        say(&format!("{ok} kernel modules loaded"));
    } else {
        say(&format!("{ok} kernel modules loaded; not loaded: {}", failed.join(", ")));
    }
    say(&format!("firmware: {}", firmware()));
    let cmdline = crate::job::from_cmdline(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    let config = read_config(&super::live_spec());
    let settings = job::merge(&config, &cmdline).unwrap_or_else(|_| {
        let mut s = config.clone();
        s.extend(cmdline.clone());
        s
    });
    bring_up_network(&config, &cmdline, &settings);
    match job::parse(&config, &cmdline) {
        Ok(None) => sessions(settings.get("shell").is_some_and(|v| !matches!(v.as_str(), "0" | "no" | "false"))),
        Err(e) => {
            super::print_on_consoles(&format!("KLON-RESULT: failed (exit {}) bad job settings: {e}", e.exit_code()));
            sessions(false)
        }
        Ok(Some(j)) => {
            let _ = std::fs::remove_file(RESULT_FILE);
            if let Err(e) = std::fs::write(JOB_FILE, crate::job::to_config(&settings)) {
                super::print_on_consoles(&format!("KLON-RESULT: failed (exit 3) writing {JOB_FILE}: {e}"));
                sessions(false)
            }
            say(&format!("starting the unattended {} (afterwards: {:?})", j.kind.name(), j.after));
            let status = spawn_self(&["live", "job", JOB_FILE]).and_then(|pid| wait_for_child(pid, false));
            if !Path::new(RESULT_FILE).exists() {
                super::print_on_consoles(&format!(
                    "KLON-RESULT: failed the job process ended without a result ({status:?})"
                ));
            }
            match j.after {
                After::Poweroff => shutdown(POWEROFF),
                After::Reboot => shutdown(REBOOT),
                After::Shell => sessions(true),
                After::Wizard => sessions(false),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn the_stick_s_ssh_files_are_taken_for_root_alone() {
        use std::os::unix::fs::PermissionsExt;
        let t = crate::testutil::TempDir::new("ssh-keys");
        let (from, to) = (t.0.join("stick-ssh"), t.0.join("root-ssh"));
        assert_eq!(take_ssh_keys(&from, &to).unwrap(), 0, "no folder, nothing");
        std::fs::create_dir_all(from.join("sub")).unwrap();
        std::fs::write(from.join("id_ed25519"), "KEY").unwrap();
        std::fs::write(from.join("known_hosts"), "10.0.0.2 ssh-ed25519 AAAA").unwrap();
        assert_eq!(take_ssh_keys(&from, &to).unwrap(), 2);
        assert_eq!(std::fs::read_to_string(to.join("id_ed25519")).unwrap(), "KEY");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&to), mode(&to.join("id_ed25519")), mode(&to.join("known_hosts"))), (0o700, 0o600, 0o600));
        assert!(!to.join("sub").exists());
    }

    #[test]
    fn modules_load_after_their_dependencies() {
        let dep = "a.ko:\nb.ko: a.ko\nc.ko: b.ko a.ko\nd.ko:\ne.ko: d.ko\nf.ko: e.ko\ng.ko: builtin.ko\n";
        let deps = parse_modules_dep(dep);
        assert_eq!(deps["c.ko"], vec!["b.ko", "a.ko"]);
        let order: Vec<String> =
            ["a.ko", "b.ko", "c.ko", "d.ko", "e.ko", "f.ko", "g.ko"].iter().map(|s| s.to_string()).collect();
        for threads in [1, 2, 4] {
            let seen = Mutex::new(Vec::new());
            let (ok, failed) = load_in_parallel(&order, &deps, threads, |m| {
                let mut s = seen.lock().unwrap();
                for d in &deps[m] {
                    if order.contains(d) {
                        assert!(s.contains(d), "{m} before {d}");
                    }
                }
                s.push(m.to_string());
                if m == "e.ko" { Err("bad".into()) } else { Ok(m != "d.ko") }
            });
            // d does not apply (no hardware), e fails, f is not tried.
            assert_eq!(ok, 4, "threads {threads}");
            assert_eq!(failed, vec!["e (bad)".to_string(), "f (needs e)".to_string()]);
            assert!(!seen.lock().unwrap().contains(&"f.ko".to_string()));
        }
    }
}
