//! The wizard driven end to end in a pseudo-terminal (tmux, 80x25) on
//! loop-device disks: backup, verify, restore, clone; going back a step;
//! a too-small target refused; cancelling at the confirmation leaves the
//! target untouched; receiving what klon deploy sends (two network
//! namespaces). Needs root and tmux; skipped without root unless
//! KLON_REQUIRE_ROOT_TESTS=1.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::disks::{
    MIB, TempDir, assert_same, blank_file, garbage_file, klon, make_gpt_disk, ok, read_at, run, run_with_input,
    text_bytes,
};
use common::loop_device::LoopDevice;

/// Loop devices are scarce and shared: run these tests one at a time.
static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// klon running in a private tmux server, on an 80x25 screen.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(cwd: &Path) -> Tmux {
        Tmux::start_with(cwd, &[])
    }

    /// klon with `args` (none: the wizard) on a terminal of its own.
    fn start_with(cwd: &Path, args: &[&str]) -> Tmux {
        Tmux::start_in(cwd, "", args)
    }

    /// `start_with`, klon run behind `prefix` (e.g. `ip netns exec NS`).
    fn start_in(cwd: &Path, prefix: &str, args: &[&str]) -> Tmux {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let socket = format!("klon-test-wizard-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        let cmd =
            format!("{prefix} {} {} ; echo KLON-EXITED $? ; sleep 600", env!("CARGO_BIN_EXE_klon"), args.join(" "));
        let st = Command::new("tmux")
            .args(["-L", &socket, "-f", "/dev/null", "new-session", "-d", "-s", "w", "-x", "80", "-y", "25", "-c"])
            .arg(cwd)
            .args(["-e", "TERM=xterm", &cmd])
            .status()
            .unwrap_or_else(|e| panic!("cannot run tmux: {e} (scripts/test installs it: apt-get install tmux)"));
        assert!(st.success(), "tmux new-session failed");
        Tmux { socket }
    }

    fn screen(&self) -> String {
        let o = Command::new("tmux")
            .args(["-L", &self.socket, "capture-pane", "-p", "-t", "w"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Sends tmux key names (Enter, Escape, Down, C-c) or literal text.
    fn keys(&self, keys: &[&str]) {
        for k in keys {
            let st = Command::new("tmux").args(["-L", &self.socket, "send-keys", "-t", "w", k]).status().unwrap();
            assert!(st.success());
        }
    }

    fn text(&self, s: &str) {
        let st = Command::new("tmux").args(["-L", &self.socket, "send-keys", "-t", "w", "-l", s]).status().unwrap();
        assert!(st.success());
    }

    /// Waits until the screen shows every one of `needles`.
    fn wait_for(&self, needles: &[&str], secs: u64) -> String {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.screen();
            if needles.iter().all(|n| s.contains(n)) {
                return s;
            }
            if Instant::now() > end {
                panic!("timed out waiting for {needles:?}; the screen shows:\n{s}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the screen differs from `old`.
    fn wait_change(&self, old: &str) -> String {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.screen();
            if s != old {
                return s;
            }
            assert!(Instant::now() < end, "the screen did not change:\n{s}");
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    /// In a menu on screen, moves the highlight (the "> " line) to the
    /// entry whose first line contains `needle`.
    fn highlight(&self, needle: &str) -> String {
        let mut s = self.screen();
        for _ in 0..40 {
            if s.lines().any(|l| l.starts_with("> ") && l.contains(needle)) {
                return s;
            }
            self.keys(&["Down"]);
            s = self.wait_change(&s);
        }
        panic!("no menu entry with {needle:?}:\n{s}");
    }

    fn choose(&self, needle: &str) {
        let s = self.highlight(needle);
        self.keys(&["Enter"]);
        self.wait_change(&s);
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["-L", &self.socket, "kill-server"]).status();
    }
}

fn dev_name(lo: &LoopDevice) -> String {
    lo.path.file_name().unwrap().to_string_lossy().into_owned()
}

/// "/dev/loop3  " as the first line of a disk entry starts.
fn entry(lo: &LoopDevice) -> String {
    format!("{}  ", lo.path.display())
}

fn blake(path: &Path) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update(&std::fs::read(path).unwrap());
    h.finalize()
}

fn data_ranges(disk: &Path) -> Vec<(u64, u64)> {
    let (parts, sector) = common::disks::sfdisk_parts(disk);
    parts.iter().map(|p| (p.start * sector, p.size * sector)).collect()
}

#[test]
fn wizard_backup_verify_restore_and_back_step() {
    require_root!();
    let _g = lock();
    let tmp = TempDir::new("wizard-bvr");
    let src_file = tmp.join("source.img");
    let dst_file = tmp.join("target.img");
    make_gpt_disk(&src_file, 64 * MIB);
    garbage_file(&dst_file, 96 * MIB);
    let images = tmp.join("images");
    std::fs::create_dir(&images).unwrap();
    let src = LoopDevice::attach(&src_file, None);
    let dst = LoopDevice::attach(&dst_file, None);

    let t = Tmux::start(&images);
    t.wait_for(&["main menu", "> Back up a disk"], 20);
    t.keys(&["Enter"]);
    // Source; then Esc from the next step comes back here.
    t.wait_for(&["Which disk do you want to copy?"], 30);
    t.choose(&entry(&src));
    t.wait_for(&["Where are the images?"], 30);
    t.keys(&["Escape"]);
    t.wait_for(&["Which disk do you want to copy?"], 30);
    t.choose(&entry(&src));
    t.wait_for(&["Where are the images?", "> Type a directory"], 30);
    t.keys(&["Enter"]);
    t.wait_for(&["Directory:"], 10);
    t.keys(&["Enter"]); // the default: the current directory
    let s = t.wait_for(&["Repository name:"], 10);
    assert!(s.contains(&format!("in {}", images.display())), "{s}");
    t.keys(&["Enter"]);
    let s = t.wait_for(
        &["> Start the backup", "Compression level: 3", "Verify the image afterwards: yes", "Keep: every snapshot"],
        10,
    );
    assert!(s.contains(&src.path.display().to_string()) && s.contains("into the new"), "{s}");
    t.keys(&["Enter"]);
    let s = t.wait_for(&["backup done", "Press Enter"], 120);
    assert!(s.contains("Verification: OK"), "{s}");
    assert!(s.contains(&format!("klon backup {}", src.path.display())), "{s}");
    assert!(s.contains("in a new repository") && s.contains("Added:"), "{s}");
    let repo: PathBuf =
        std::fs::read_dir(&images).unwrap().flatten().map(|e| e.path()).find(|p| p.is_dir()).expect("a repository");
    assert!(repo.join("klon-repository.json").exists());
    t.keys(&["Enter"]);

    // A second backup of the same disk: the same repository is proposed, a
    // Keep policy is set; the unchanged disk adds nothing.
    t.wait_for(&["main menu"], 10);
    t.choose("Back up a disk");
    t.wait_for(&["Which disk do you want to copy?"], 30);
    t.choose(&entry(&src));
    t.wait_for(&["Where are the images?"], 30);
    t.choose("Type a directory");
    t.wait_for(&["Directory:"], 10);
    t.keys(&["Enter"]);
    t.wait_for(&["Repository name:"], 10);
    t.keys(&["Enter"]);
    let s = t.wait_for(&["> Start the backup"], 10);
    assert!(!s.contains("into the new"), "{s}");
    t.choose("Keep:");
    t.wait_for(&["Keep:"], 10);
    t.text("nonsense=3");
    t.keys(&["Enter"]);
    t.wait_for(&["is not a rule"], 10);
    t.keys(&["Enter"]);
    t.choose("Keep:");
    t.text("last=5");
    t.keys(&["Enter"]);
    t.wait_for(&["Keep: keep the 5 newest snapshots"], 10);
    t.highlight("Start the backup");
    t.keys(&["Enter"]);
    let s = t.wait_for(&["backup done", "Press Enter"], 120);
    assert!(s.contains("Added:        0 B in 0 new chunks") && s.contains("no snapshot dropped"), "{s}");
    assert!(repo.join("keep.json").exists());
    t.keys(&["Enter"]);

    // Verify.
    t.wait_for(&["main menu"], 10);
    t.choose("Verify an image");
    t.wait_for(&["Where are the images?"], 10);
    t.keys(&["Enter"]);
    t.wait_for(&["Directory:"], 10);
    t.keys(&["Enter"]);
    let s = t.wait_for(&["Which image?", "snapshot "], 10);
    let name = repo.file_name().unwrap().to_string_lossy().to_string();
    assert_eq!(s.matches(&format!("{name}:")).count(), 2, "both snapshots are listed: {s}");
    t.keys(&["Enter"]);
    let s = t.wait_for(&["verify done", "Press Enter"], 120);
    assert!(s.contains("Verification: OK"), "{s}");
    assert!(s.contains("klon verify"), "{s}");
    t.keys(&["Enter"]);

    // Restore onto the larger disk, with a wrong name typed first.
    let before = blake(&dst_file);
    t.wait_for(&["main menu"], 10);
    t.choose("Restore an image");
    t.wait_for(&["Where are the images?"], 10);
    t.keys(&["Enter"]);
    t.wait_for(&["Directory:"], 10);
    t.keys(&["Enter"]);
    t.wait_for(&["Which image?"], 10);
    t.keys(&["Enter"]);
    t.wait_for(&["Which disk do you want to OVERWRITE?"], 30);
    t.choose(&entry(&dst));
    t.wait_for(&["Use the extra space?"], 10);
    t.keys(&["Enter"]);
    t.wait_for(&["Type to confirm:", "Everything on it is lost"], 30);
    t.text("nope");
    t.keys(&["Enter"]);
    t.wait_for(&["nothing was written"], 10);
    t.keys(&["Enter"]);
    t.wait_for(&["Type to confirm:"], 10);
    assert_eq!(blake(&dst_file), before, "a wrong name must not write anything");
    t.text(&dev_name(&dst));
    t.keys(&["Enter"]);
    let s = t.wait_for(&["restore done", "Press Enter"], 120);
    assert!(s.contains("Verification: OK"), "{s}");
    assert!(s.contains("klon restore --yes --grow-last"), "{s}");
    t.keys(&["Enter"]);
    t.wait_for(&["main menu"], 10);
    t.choose("Quit");
    t.wait_for(&["KLON-EXITED 0"], 10);

    // The data partitions arrived.
    for (start, len) in data_ranges(&src_file) {
        assert_same(&src_file, &dst_file, start, len, "restored partition");
    }
    assert_eq!(read_at(&src_file, 0, 440), read_at(&dst_file, 0, 440), "boot code");
}

#[test]
fn wizard_clone_refuses_small_target_and_cancel_leaves_target_untouched() {
    require_root!();
    let _g = lock();
    let tmp = TempDir::new("wizard-clone");
    let src_file = tmp.join("source.img");
    let small_file = tmp.join("small.img");
    let dst_file = tmp.join("target.img");
    make_gpt_disk(&src_file, 64 * MIB);
    garbage_file(&small_file, 32 * MIB);
    garbage_file(&dst_file, 64 * MIB);
    let src = LoopDevice::attach(&src_file, None);
    let small = LoopDevice::attach(&small_file, None);
    let dst = LoopDevice::attach(&dst_file, None);
    let before = blake(&dst_file);

    let t = Tmux::start(&tmp.0);
    t.wait_for(&["main menu"], 20);
    t.choose("Clone a disk to another disk");
    t.wait_for(&["Which disk do you want to copy?"], 30);
    t.choose(&entry(&src));
    let s = t.wait_for(&["Which disk do you want to OVERWRITE?"], 30);
    assert!(!s.contains(&format!("> {}", entry(&src))), "the source is offered as its own target:\n{s}");
    // The small disk is listed with the reason and cannot be chosen.
    let s = t.highlight(&entry(&small));
    assert!(s.contains("cannot be chosen: too small: needs 64.0 MiB, has 32.0 MiB"), "{s}");
    t.keys(&["Enter"]);
    t.wait_for(&["! That one cannot be chosen: too small"], 10);
    t.choose(&entry(&dst));
    // Same size: no question about extra space; straight to confirming.
    let s = t.wait_for(&["Type to confirm:", "will be overwritten with a copy of"], 30);
    assert!(s.contains(&dst.path.display().to_string()), "{s}");
    // Cancel at the confirmation: back to the target list, nothing written.
    t.keys(&["Escape"]);
    t.wait_for(&["Which disk do you want to OVERWRITE?"], 10);
    assert_eq!(blake(&dst_file), before, "cancelling must leave the target untouched");
    t.choose(&entry(&dst));
    t.wait_for(&["Type to confirm:"], 30);
    t.text(&dev_name(&dst));
    t.keys(&["Enter"]);
    let s = t.wait_for(&["clone done", "Press Enter"], 120);
    assert!(s.contains("Verification: OK"), "{s}");
    assert!(s.contains(&format!("klon clone --yes {} {}", src.path.display(), dst.path.display())), "{s}");
    t.keys(&["Enter"]);
    t.wait_for(&["main menu"], 10);
    // Ctrl-C asks before quitting; no keeps the wizard, yes quits.
    t.keys(&["C-c"]);
    t.wait_for(&["quit klon?"], 10);
    t.keys(&["n"]);
    t.wait_for(&["What do you want to do?"], 10);
    t.keys(&["C-c"]);
    t.wait_for(&["quit klon?"], 10);
    t.keys(&["y"]);
    t.wait_for(&["KLON-EXITED 0"], 10);

    for (start, len) in data_ranges(&src_file) {
        assert_same(&src_file, &dst_file, start, len, "cloned partition");
    }
    drop(small);
}

/// If the test fails while the wizard has the drive mounted (the wizard is
/// then killed with its tmux), unmount it before the loop device goes.
struct UnmountOnFailure;

impl Drop for UnmountOnFailure {
    fn drop(&mut self) {
        if mounted_at("/run/klon/drive") {
            let _ = Command::new("umount").args(["-l", "/run/klon/drive"]).status();
        }
    }
}

fn mounted_at(dir: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").unwrap().lines().any(|l| l.split(' ').nth(4) == Some(dir))
}

#[test]
fn wizard_waits_for_the_image_drive_and_unmounts_it() {
    require_root!();
    let _g = lock();
    assert!(!mounted_at("/run/klon/drive"), "something is already mounted at /run/klon/drive");
    let tmp = TempDir::new("wizard-drive");
    // An ext4 "USB drive" holding one image.
    let disk = tmp.join("disk.img");
    make_gpt_disk(&disk, 32 * MIB);
    let content = tmp.join("content");
    std::fs::create_dir(&content).unwrap();
    common::disks::ok(&common::disks::klon(&[
        "backup",
        "--quiet",
        disk.to_str().unwrap(),
        content.join("laptop").to_str().unwrap(),
    ]));
    let drive = tmp.join("drive.img");
    common::disks::run(
        "mke2fs",
        &["-q", "-F", "-t", "ext4", "-L", "KLONIMG", "-d", content.to_str().unwrap(), drive.to_str().unwrap(), "64M"],
    );

    let t = Tmux::start(&tmp.0);
    t.wait_for(&["main menu"], 20);
    t.choose("Verify an image");
    t.wait_for(&["Where are the images?"], 30);
    t.choose("Insert the USB drive now");
    t.wait_for(&["Insert the USB drive now.", "goes on by itself"], 10);
    // Plugging it in: the wizard notices by itself (kernel uevent).
    let lo = LoopDevice::attach(&drive, None);
    let _unmount = UnmountOnFailure;
    let s = t.wait_for(&["Which image?", "laptop"], 30);
    assert!(s.contains("complete, verified OK"), "{s}"); // klon backup verified it
    assert!(mounted_at("/run/klon/drive"));
    t.keys(&["Enter"]);
    let s = t.wait_for(&["verify done", "Press Enter"], 60);
    assert!(s.contains("Verification: OK"), "{s}");
    t.keys(&["Enter"]);
    t.wait_for(&["main menu"], 10);
    assert!(!mounted_at("/run/klon/drive"), "the image drive stayed mounted");
    t.choose("Quit");
    t.wait_for(&["KLON-EXITED 0"], 10);
    drop(lo);
}

/// "Where are the images?" puts the drives that hold images first, saying
/// how many (those in the drive's `klon-images` folder, where the live
/// system's jobs keep them, are found), and looking into a drive writes
/// nothing to it: an ext4 whose journal asks for recovery is byte for byte
/// the same afterwards (a plain read-only mount would have replayed it).
#[test]
fn wizard_lists_drives_holding_images_first_and_looks_without_writing() {
    require_root!();
    let _g = lock();
    let _unmount = UnmountOnFailure;
    let tmp = TempDir::new("wizard-drives");
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let empty = tmp.join("empty.img");
    run("mke2fs", &["-q", "-F", "-t", "ext4", "-L", "NOIMAGES", &path(&empty), "32M"]);
    run("debugfs", &["-w", "-R", "feature needs_recovery", &path(&empty)]);
    assert!(run("dumpe2fs", &["-h", &path(&empty)]).contains("needs_recovery"));
    let before = blake(&empty);
    let content = tmp.join("content");
    std::fs::create_dir_all(content.join("klon-images")).unwrap();
    let disk = tmp.join("disk.img");
    make_gpt_disk(&disk, 32 * MIB);
    for name in ["laptop", "desktop"] {
        ok(&klon(&["backup", "--quiet", &path(&disk), &path(&content.join("klon-images").join(name))]));
    }
    let drive = tmp.join("drive.img");
    run("mke2fs", &["-q", "-F", "-t", "ext4", "-L", "HASIMAGES", "-d", &path(&content), &path(&drive), "64M"]);
    // The drive without images comes first in disk order.
    let lo_empty = LoopDevice::attach(&empty, None);
    let lo_full = LoopDevice::attach(&drive, None);

    let t = Tmux::start(&tmp.0);
    t.wait_for(&["main menu"], 20);
    t.choose("Verify an image");
    let s = flat(&t.wait_for(&["Where are the images?", "HASIMAGES", "NOIMAGES"], 30));
    let (full_at, empty_at) = (s.find("\"HASIMAGES\"").unwrap(), s.find("\"NOIMAGES\"").unwrap());
    assert!(full_at < empty_at, "the drive holding images is not first: {s}");
    assert!(s[full_at..empty_at].contains("— 2 images"), "{s}");
    let rest = &s[empty_at..s.find("Insert the USB drive").unwrap()];
    assert!(!rest.contains("image"), "the drive without images says it holds some: {rest}");
    assert!(!mounted_at("/run/klon/peek"), "a drive stayed mounted after the look inside");
    t.choose("\"HASIMAGES\"");
    t.wait_for(&["Which image?", "laptop", "desktop"], 30);
    assert!(mounted_at("/run/klon/drive"));
    t.keys(&["Escape"]);
    t.wait_for(&["Where are the images?"], 10);
    t.keys(&["Escape"]);
    t.wait_for(&["main menu"], 10);
    assert!(!mounted_at("/run/klon/drive"), "the image drive stayed mounted");
    t.choose("Quit");
    t.wait_for(&["KLON-EXITED 0"], 10);
    drop((lo_empty, lo_full));
    assert_eq!(blake(&empty), before, "looking into the drive wrote to it");
}

#[test]
fn wizard_lists_and_restores_a_clonezilla_image() {
    require_root!();
    let _g = lock();
    let script = "label: dos\nstart=2048, size=61440, type=83, bootable\n";
    let f = common::clonezilla::build(TempDir::new("cz-wizard"), script, &[(1, "ext4")], &["-z9p", "-i", "0"]);
    let tmp = TempDir::new("wizard-cz");
    let dst_file = tmp.join("target.img");
    garbage_file(&dst_file, 256 * MIB);
    let dst = LoopDevice::attach(&dst_file, None);

    // The wizard runs in the directory holding the Clonezilla image (`cz`).
    let t = Tmux::start(&f._dir.0);
    t.wait_for(&["main menu"], 20);
    t.choose("Restore an image");
    t.wait_for(&["Where are the images?"], 10);
    t.keys(&["Enter"]);
    t.wait_for(&["Directory:"], 10);
    t.keys(&["Enter"]);
    let s = t.wait_for(&["Which image?", "(Clonezilla)"], 10);
    assert!(s.contains("1 partition images"), "{s}");
    t.keys(&["Enter"]);
    t.wait_for(&["Which disk do you want to OVERWRITE?"], 30);
    t.choose(&entry(&dst));
    t.wait_for(&["Use the extra space?"], 10);
    t.keys(&["Enter"]);
    let s = t.wait_for(&["Type to confirm:"], 30);
    assert!(s.contains("Clonezilla image"), "{s}");
    t.text(&dev_name(&dst));
    t.keys(&["Enter"]);
    let s = t.wait_for(&["restore done", "Press Enter"], 120);
    assert!(s.contains("Verification: OK"), "{s}");
    t.keys(&["Enter"]);
    t.wait_for(&["main menu"], 10);
    t.choose("Quit");
    t.wait_for(&["KLON-EXITED 0"], 10);
    drop(dst);

    // The partition grew (the wizard's default), and its filesystem with
    // it: clean, filling it, holding the files put on the source.
    assert_eq!(read_at(&f.disk, 0, 440), read_at(&dst_file, 0, 440), "boot code");
    let (parts, sector) = common::disks::sfdisk_parts(&dst_file);
    assert_eq!(parts[0].start, 2048);
    assert!(parts[0].size > 61440, "the partition did not grow");
    let part = tmp.join("p1");
    std::fs::write(&part, read_at(&dst_file, 2048 * sector, parts[0].size * sector)).unwrap();
    common::disks::run("e2fsck", &["-fn", part.to_str().unwrap()]);
    let sb = common::disks::run("dumpe2fs", &["-h", part.to_str().unwrap()]);
    let field = |key: &str| -> u64 { sb.lines().find_map(|l| l.strip_prefix(key)).unwrap().trim().parse().unwrap() };
    assert!(
        field("Block count:") * field("Block size:") > (parts[0].size * sector).saturating_sub(MIB),
        "the ext4 did not grow with its partition"
    );
    for (_, name, data) in &f.files {
        let got =
            Command::new("debugfs").args(["-R", &format!("cat /{name}"), part.to_str().unwrap()]).output().unwrap();
        assert!(got.stdout == *data, "{name} differs after the restore");
    }
}

/// The screen's words joined by single spaces (lines wrap anywhere).
fn flat(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// From the main menu: back up `src` into the current directory under
/// the proposed name, verified, and start it.
fn start_backup(t: &Tmux, src: &LoopDevice) {
    t.wait_for(&["main menu"], 20);
    t.choose("Back up a disk");
    t.wait_for(&["Which disk do you want to copy?"], 30);
    t.choose(&entry(src));
    t.wait_for(&["Where are the images?", "> Type a directory"], 30);
    t.keys(&["Enter"]);
    t.wait_for(&["Directory:"], 10);
    t.keys(&["Enter"]);
    t.wait_for(&["Repository name:"], 10);
    t.keys(&["Enter"]);
    t.wait_for(&["> Start the backup"], 10);
    t.keys(&["Enter"]);
}

/// A source with bad sectors in a file (real EIO from nbdkit's ddrescue
/// filter, through a loop device): the backup stops, the wizard says why
/// and offers rescue mode, explaining it. No leaves no image; yes runs the
/// rescue, and the summary names how many bytes could not be read and
/// where, and says the image is not a perfect copy.
#[test]
fn wizard_offers_a_rescue_when_the_source_has_unreadable_sectors() {
    require_root!();
    let _g = lock();
    let tmp = TempDir::new("wizard-rescue");
    let (disk, _, (fa, fl)) = common::failing::ext4_disk(&tmp);
    let bad1 = (fa + fl / 3) / 4096 * 4096 + 512;
    let bad = [(bad1, 512), (bad1 + 300 * 1024, 1024)];
    assert!(bad[1].0 + bad[1].1 < fa + fl);
    let failing = common::failing::FailingDisk::new(&tmp.0, &disk, &bad);
    let src = LoopDevice::attach_direct(&failing.path());
    let images = tmp.join("images");
    std::fs::create_dir(&images).unwrap();
    let entries = || std::fs::read_dir(&images).unwrap().flatten().map(|e| e.path()).collect::<Vec<_>>();

    let t = Tmux::start(&images);
    start_backup(&t, &src);
    let s = flat(&t.wait_for(&["Back up again in rescue mode?"], 120));
    for needle in [
        "sectors that cannot be read",
        "no snapshot was made, and the new repository was removed",
        "everything that can be read first",
        "stored as zeros",
        "listed in the image",
        "not be a perfect copy",
    ] {
        assert!(s.contains(needle), "the offer does not say {needle:?}:\n{s}");
    }
    // No: the error stays, and nothing is left in the directory.
    t.keys(&["n"]);
    let s = flat(&t.wait_for(&["error", "Press Enter"], 10));
    assert!(s.contains("Input/output error") && s.contains("--rescue"), "{s}");
    assert!(entries().is_empty(), "a refused rescue left {:?}", entries());
    t.keys(&["Enter"]);

    // Yes: the rescue runs.
    start_backup(&t, &src);
    t.wait_for(&["Back up again in rescue mode?"], 120);
    t.keys(&["y"]);
    let s = flat(&t.wait_for(&["backup done", "Press Enter"], 120));
    let image = entries().into_iter().find(|p| p.is_dir()).expect("an image");
    // A repository takes no rescued backup: a standalone image beside where it would be.
    assert!(image.file_name().unwrap().to_string_lossy().contains("-rescue-"), "{}", image.display());
    assert!(image.join("klon.json").exists());
    let v: serde_json::Value = serde_json::from_str(&common::disks::stdout(&common::disks::klon(&[
        "info",
        "--json",
        image.to_str().unwrap(),
    ])))
    .unwrap();
    let p1 = v["manifest"]["streams"].as_array().unwrap().iter().find(|s| s["name"] == "p1").unwrap();
    let ranges: Vec<(u64, u64)> =
        p1["unreadable"].as_array().unwrap().iter().map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap())).collect();
    assert_eq!(ranges.len(), 2, "{ranges:?}");
    for (&(a, l), &(b, bl)) in ranges.iter().zip(&bad) {
        assert!(a <= b && b + bl <= a + l && l <= 4096, "unreadable {a}+{l} does not fit bad sectors {b}+{bl}");
    }
    let lost: u64 = ranges.iter().map(|r| r.1).sum();
    let want = format!("Unreadable: {lost} bytes (partition 1: {lost} bytes in 2 places)");
    assert!(s.contains(&want), "the summary does not say {want:?}:\n{s}");
    assert!(s.contains("THE IMAGE IS NOT A PERFECT COPY: those bytes are zeros in it"), "{s}");
    assert!(s.contains("Verification: OK"), "{s}");
    assert!(s.contains(&format!("klon backup --rescue {}", src.path.display())), "{s}");
    t.keys(&["Enter"]);
    t.wait_for(&["main menu"], 10);
    t.choose("Quit");
    t.wait_for(&["KLON-EXITED 0"], 10);
    drop(t);
    drop(src);
}

/// The wizard makes an encrypted repository when asked (the passphrase
/// typed twice, the recovery key shown once on the result page), and asks
/// for the passphrase when it lists the repository's snapshots to
/// restore: the restored partitions are the source's.
#[test]
fn wizard_makes_an_encrypted_repository_and_restores_from_it() {
    require_root!();
    let _g = lock();
    let tmp = TempDir::new("wizard-encrypted");
    let src_file = tmp.join("source.img");
    let dst_file = tmp.join("target.img");
    make_gpt_disk(&src_file, 64 * MIB);
    garbage_file(&dst_file, 64 * MIB);
    let images = tmp.join("images");
    std::fs::create_dir(&images).unwrap();
    let src = LoopDevice::attach(&src_file, None);
    let dst = LoopDevice::attach(&dst_file, None);

    let t = Tmux::start(&images);
    t.wait_for(&["main menu"], 20);
    t.choose("Back up a disk");
    t.wait_for(&["Which disk do you want to copy?"], 30);
    t.choose(&entry(&src));
    t.wait_for(&["Where are the images?", "> Type a directory"], 30);
    t.keys(&["Enter"]);
    t.wait_for(&["Directory:"], 10);
    t.keys(&["Enter"]);
    t.wait_for(&["Repository name:"], 10);
    t.keys(&["Enter"]);
    t.wait_for(&["> Start the backup", "Encrypt the new repository: no"], 10);
    t.choose("Encrypt the new repository");
    t.wait_for(&["Encrypt the new repository: yes"], 10);
    t.choose("Then copy the snapshot to another drive");
    t.wait_for(&["Then copy the snapshot to another drive: yes"], 10);
    t.highlight("Start the backup");
    t.keys(&["Enter"]);
    t.wait_for(&["Passphrase for the new repository"], 10);
    t.text("wizard passphrase");
    t.keys(&["Enter"]);
    t.wait_for(&["The same passphrase again"], 10);
    t.text("wizard passphrase");
    t.keys(&["Enter"]);
    let s = flat(&t.wait_for(&["backup done", "Press Enter"], 120));
    assert!(s.contains("in a new repository") && s.contains("The repository is encrypted"), "{s}");
    assert!(s.contains("recovery key"), "{s}");
    let repo: PathBuf =
        std::fs::read_dir(&images).unwrap().flatten().map(|e| e.path()).find(|p| p.is_dir()).expect("a repository");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.join("klon-repository.json")).unwrap()).unwrap();
    assert_eq!(config["format_version"], 4, "{config}");
    t.keys(&["Enter"]);
    // The copy: to a second directory, the same keys, read back.
    let second = tmp.join("second");
    std::fs::create_dir(&second).unwrap();
    t.wait_for(&["copy to another drive", "Where are the images?"], 10);
    t.choose("Type a directory");
    t.wait_for(&["Directory:"], 10);
    for _ in 0..images.display().to_string().len() + 4 {
        t.keys(&["BSpace"]);
    }
    t.text(&second.display().to_string());
    t.keys(&["Enter"]);
    let s = flat(&t.wait_for(&["copy done", "Press Enter"], 60));
    assert!(s.contains("1 snapshot") && s.contains("read back and checked"), "{s}");
    let copy = second.join(repo.file_name().unwrap());
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_klon"));
    let o = c
        .args(["check", "--read-data", copy.to_str().unwrap()])
        .env("KLON_PASSPHRASE", "wizard passphrase")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let copy_config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(copy.join("klon-repository.json")).unwrap()).unwrap();
    assert_eq!(copy_config["encryption"], config["encryption"], "the copy has other keys");
    t.keys(&["Enter"]);
    t.wait_for(&["main menu"], 10);
    t.choose("Quit");
    t.wait_for(&["KLON-EXITED 0"], 10);

    // Restore, in a new session: the list asks for the passphrase.
    let t = Tmux::start(&images);
    t.wait_for(&["main menu"], 20);
    t.choose("Restore an image");
    t.wait_for(&["Where are the images?"], 10);
    t.keys(&["Enter"]);
    t.wait_for(&["Directory:"], 10);
    t.keys(&["Enter"]);
    t.wait_for(&["Passphrase for the encrypted repository"], 20);
    t.text("wizard passphrase");
    t.keys(&["Enter"]);
    t.wait_for(&["Which image?", "snapshot "], 20);
    restore_listed_image_and_quit(&t, &dst);
    for (start, len) in data_ranges(&src_file) {
        assert_same(&src_file, &dst_file, start, len, "restored partition");
    }
}

#[test]
fn a_restore_asks_first_and_names_what_the_target_holds_now() {
    let _l = lock();
    let t = TempDir::new("confirm");
    let src = t.join("src.img");
    make_gpt_disk(&src, 32 * MIB);
    let img = t.join("img");
    ok(&klon(&["backup", "--quiet", src.to_str().unwrap(), img.to_str().unwrap()]));
    // The target: a disk image with a GPT and an ext4 someone cares about.
    let target = t.join("target.img");
    blank_file(&target, 40 * MIB);
    run_with_input("sfdisk", &["-q", target.to_str().unwrap()], "label: gpt\nstart=2048, size=65536, type=L\n");
    let files = t.join("files");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("thesis.txt"), text_bytes(3, 2_000_000)).unwrap();
    run(
        "mke2fs",
        &[
            "-q",
            "-t",
            "ext4",
            "-L",
            "precious",
            "-d",
            files.to_str().unwrap(),
            "-E",
            "offset=1048576",
            target.to_str().unwrap(),
            "32M",
        ],
    );
    let before = std::fs::read(&target).unwrap();
    let tm = Tmux::start_with(&t.0, &["restore", img.to_str().unwrap(), target.to_str().unwrap()]);
    let screen = tm.wait_for(&["Type target.img to overwrite it"], 30);
    let flat = flat(&screen);
    assert!(
        flat.contains("It holds now: GPT table with partition 1 (32.0 MiB): ext4 \"precious\", ")
            && flat.contains(" used"),
        "{screen}"
    );
    tm.text("no");
    tm.keys(&["Enter"]);
    tm.wait_for(&["KLON-EXITED 5"], 30);
    assert!(std::fs::read(&target).unwrap() == before, "a cancelled restore wrote to its target");
}

/// "Browse an image": the image's ext4 is mounted read-only, a folder of
/// it is copied to the image drive (compared file for file), and leaving
/// unmounts everything.
#[test]
fn wizard_browses_an_image_and_copies_files_to_the_image_drive() {
    require_root!();
    let _g = lock();
    let tmp = TempDir::new("wizard-browse");
    // A GPT disk whose partition 1 is an ext4 with files.
    let files = tmp.join("files");
    std::fs::create_dir_all(files.join("docs/sub")).unwrap();
    std::fs::write(files.join("docs/letter.txt"), common::disks::text_bytes(3, 50_000)).unwrap();
    std::fs::write(files.join("docs/sub/photo.raw"), common::disks::random_bytes(4, 700_000)).unwrap();
    let fs = tmp.join("fs.img");
    common::disks::run("mke2fs", &["-q", "-t", "ext4", "-d", files.to_str().unwrap(), fs.to_str().unwrap(), "24M"]);
    let disk = tmp.join("disk.img");
    common::disks::blank_file(&disk, 32 * MIB);
    common::disks::run("sgdisk", &["-n", "1:2048:+24M", "-t", "1:8300", disk.to_str().unwrap()]);
    common::disks::write_at(&disk, MIB, &std::fs::read(&fs).unwrap());
    let images = tmp.join("images");
    std::fs::create_dir(&images).unwrap();
    common::disks::ok(&common::disks::klon(&[
        "backup",
        "--quiet",
        disk.to_str().unwrap(),
        images.join("pc").to_str().unwrap(),
    ]));

    let t = Tmux::start(&images);
    t.wait_for(&["main menu"], 20);
    t.choose("Browse an image");
    t.wait_for(&["Where are the images?"], 10);
    t.keys(&["Enter"]);
    t.wait_for(&["Directory:"], 10);
    t.keys(&["Enter"]);
    t.wait_for(&["Which image?"], 10);
    t.keys(&["Enter"]);
    let s = t.wait_for(&["What now?"], 30);
    let flat_s = flat(&s);
    assert!(flat_s.contains("is mounted read-only on") && flat_s.contains("p1 (ext4): mounted on"), "{s}");
    let at = std::env::temp_dir().join(format!("klon-browse-{}", t_pid(&flat_s)));
    assert!(mounted_at(&at.join("p1").display().to_string()), "p1 is not mounted at {}", at.display());
    t.choose("Show the files in a folder");
    t.wait_for(&["Folder: p1"], 10);
    t.text("/docs");
    t.keys(&["Enter"]);
    let s = t.wait_for(&["p1/docs holds 2 entries", "letter.txt"], 10);
    assert!(s.contains("sub/"), "{s}");
    t.choose("Copy a file or folder");
    t.wait_for(&["Path to copy:"], 10);
    t.text("p1/docs");
    t.keys(&["Enter"]);
    let s = t.wait_for(&["Copied 2 files"], 30);
    assert!(flat(&s).contains("klon-files/pc/docs"), "{s}");
    common::disks::run(
        "diff",
        &["-r", files.join("docs").to_str().unwrap(), images.join("klon-files/pc/docs").to_str().unwrap()],
    );
    // A path that leaves the mount copies nothing.
    t.choose("Copy a file or folder");
    t.wait_for(&["Path to copy:"], 10);
    t.text("../etc");
    t.keys(&["Enter"]);
    t.wait_for(&["Nothing copied", "not a path inside the mount"], 10);
    t.choose("Unmount it and go back");
    t.wait_for(&["main menu"], 20);
    assert!(!mounted_at(&at.display().to_string()), "the image stayed mounted at {}", at.display());
    assert!(!at.exists(), "{} was left behind", at.display());
    t.choose("Quit");
    t.wait_for(&["KLON-EXITED 0"], 10);
}

/// The wizard's process id, from the mount point it names
/// (klon-browse-PID).
fn t_pid(screen: &str) -> String {
    let at = screen.find("klon-browse-").expect("the mount point is named") + "klon-browse-".len();
    screen[at..].chars().take_while(|c| c.is_ascii_digit()).collect()
}

/// Two network namespaces joined by a veth pair: the sender's (`kws…`,
/// 10.78.9.1) and the receiver's (`kwr…`, 10.78.9.2); removed, with what
/// runs in them, when dropped.
struct TwoHosts {
    sender: String,
    receiver: String,
}

impl TwoHosts {
    fn new() -> TwoHosts {
        let pid = std::process::id();
        let h = TwoHosts { sender: format!("kws-{pid}"), receiver: format!("kwr-{pid}") };
        let (s, r) = (h.sender.as_str(), h.receiver.as_str());
        run("ip", &["netns", "add", s]);
        run("ip", &["netns", "add", r]);
        run("ip", &["-n", s, "link", "add", "e0", "type", "veth", "peer", "name", "e0", "netns", r]);
        for (ns, addr) in [(s, "10.78.9.1/24"), (r, "10.78.9.2/24")] {
            run("ip", &["-n", ns, "addr", "add", addr, "brd", "+", "dev", "e0"]);
            run("ip", &["-n", ns, "link", "set", "e0", "up"]);
            run("ip", &["-n", ns, "link", "set", "lo", "up"]);
            run("ip", &["-n", ns, "route", "add", "224.0.0.0/4", "dev", "e0"]);
        }
        h
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in [&self.sender, &self.receiver] {
            let out = Command::new("ip").args(["netns", "pids", ns]).output().unwrap();
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// "Receive an image from the network": the wizard (on a machine in a
/// network namespace) asks for the disk and the confirmation, then waits;
/// `klon deploy` in the other namespace sends the image by multicast; the
/// wizard shows the restore read back and the command for scripts, the
/// sender's summary has the machine OK, and the disk equals the source.
#[test]
fn wizard_receives_an_image_klon_deploy_sends() {
    require_root!();
    let _g = lock();
    let tmp = TempDir::new("wizard-receive");
    let src_file = tmp.join("source.img");
    let dst_file = tmp.join("target.img");
    make_gpt_disk(&src_file, 32 * MIB);
    garbage_file(&dst_file, 32 * MIB);
    let image = tmp.join("image");
    ok(&klon(&["backup", "--quiet", src_file.to_str().unwrap(), image.to_str().unwrap()]));
    let dst = LoopDevice::attach(&dst_file, None);
    let hosts = TwoHosts::new();

    let t = Tmux::start_in(&tmp.0, &format!("ip netns exec {}", hosts.receiver), &[]);
    t.wait_for(&["main menu"], 20);
    t.choose("Receive an image from the network");
    let s = t.wait_for(&["Which disk do you want to OVERWRITE?"], 30);
    assert!(s.contains("The image's size is known once it arrives"), "{s}");
    t.choose(&entry(&dst));
    let s = t.wait_for(&["Type to confirm:"], 30);
    assert!(flat(&s).contains("will be written to"), "{s}");
    t.text(&dev_name(&dst));
    t.keys(&["Enter"]);
    t.wait_for(&["Waiting for klon deploy on the network"], 30);
    let o = Command::new("ip")
        .args(["netns", "exec", &hosts.sender, env!("CARGO_BIN_EXE_klon"), "--json", "deploy"])
        .args([image.to_str().unwrap(), "--multicast", "--interface", "e0", "--clients", "1", "--report-wait", "60"])
        .output()
        .unwrap();
    let s = t.wait_for(&["receive done", "Press Enter"], 120);
    assert!(s.contains("Verification: OK"), "{s}");
    assert!(flat(&s).contains(&format!("klon receive --multicast --yes {}", dst.path.display())), "{s}");
    ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["receivers"][0]["ip"], "10.78.9.2", "{v}");
    assert_eq!(v["receivers"][0]["ok"], true, "{v}");
    t.keys(&["Enter"]);
    t.wait_for(&["main menu"], 10);
    t.choose("Quit");
    t.wait_for(&["KLON-EXITED 0"], 10);
    assert!(
        std::fs::read(&dst_file).unwrap() == std::fs::read(&src_file).unwrap(),
        "the disk the wizard received differs from the source"
    );
}

/// "A network share" on "Where are the images?": the location is typed,
/// then an SMB user's password, shown as stars only; a share that cannot
/// be mounted (here: this machine's kernel has no SMB client, or nothing
/// answers SMB on 127.0.0.1) is refused with the reason and the location,
/// never the password, nothing stays mounted, and the wizard goes back to
/// the location. (Mounting a share for real is tested in the live system,
/// tests/live.rs, whose kernel has the clients.)
#[test]
fn wizard_asks_for_a_network_share_and_its_password_without_showing_it() {
    require_root!();
    let _g = lock();
    assert!(!mounted_at("/run/klon/drive"), "something is already mounted at /run/klon/drive");
    let tmp = TempDir::new("wizard-share");
    let t = Tmux::start(&tmp.0);
    t.wait_for(&["main menu"], 20);
    t.choose("Verify an image");
    t.wait_for(&["Where are the images?"], 30);
    t.choose("A network share");
    t.wait_for(&["smb://[USER@]HOST", "nfs://HOST", "Location: smb://"], 10);
    // A location without a share is refused with what to write.
    t.text("nowhere");
    t.keys(&["Enter"]);
    t.wait_for(&["smb://nowhere: no share (write smb://[USER@]HOST", "Press Enter"], 10);
    t.keys(&["Enter"]);
    // The typed text stays: rub out the host, then type the real one.
    t.wait_for(&["Location: smb://nowhere"], 10);
    for _ in 0.."nowhere".len() {
        t.keys(&["BSpace"]);
    }
    t.text("backup@127.0.0.1/images/lab");
    t.keys(&["Enter"]);
    t.wait_for(&["The password of backup on 127.0.0.1", "Password:"], 10);
    t.text("s3cret,pw");
    let s = t.wait_for(&["Password: *********"], 10);
    assert!(!s.contains("s3cret"), "the password is shown:\n{s}");
    t.keys(&["Enter"]);
    let s = t.wait_for(&["mounting the network share smb://backup@127.0.0.1/images/lab", "Press Enter"], 30);
    assert!(
        s.contains("no SMB client") || s.contains("does not answer SMB") || s.contains("cannot reach"),
        "no reason given:\n{s}"
    );
    assert!(!s.contains("s3cret"), "the password is shown:\n{s}");
    assert!(!mounted_at("/run/klon/drive"), "something stayed mounted");
    t.keys(&["Enter"]);
    t.wait_for(&["Location: smb://backup@127.0.0.1/images/lab"], 10);
    t.keys(&["Escape"]);
    t.wait_for(&["Where are the images?"], 10);
    t.keys(&["Escape"]);
    t.wait_for(&["main menu"], 10);
    t.choose("Quit");
    t.wait_for(&["KLON-EXITED 0"], 10);
}

/// An S3 store as the wizard's image location (typed as a network share's):
/// a key that does not open the bucket is refused with the reason and the
/// secret never shown; with the right key a backup makes a repository in
/// the bucket (Garage, a real S3 server), and in a new session a restore
/// lists its snapshot and writes it back byte for byte.
#[test]
fn wizard_backs_up_to_and_restores_from_an_s3_store() {
    require_root!();
    let _g = lock();
    let tmp = TempDir::new("wizard-s3");
    let g = require_garage!(&tmp);
    let src_file = tmp.join("source.img");
    let dst_file = tmp.join("target.img");
    make_gpt_disk(&src_file, 64 * MIB);
    garbage_file(&dst_file, 64 * MIB);
    let src = LoopDevice::attach(&src_file, None);
    let dst = LoopDevice::attach(&dst_file, None);
    let url = "s3://klon/wizard";

    // Types the store's location and settings; `secret` for the key.
    let open_store = |t: &Tmux, secret: &str| {
        t.wait_for(&["Where are the images?"], 30);
        t.choose("A network share");
        t.wait_for(&["s3://BUCKET[/PREFIX]", "Location: "], 10);
        let s = t.screen();
        let typed = s.lines().find_map(|l| l.trim().strip_prefix("Location: ")).unwrap_or("").trim().len();
        for _ in 0..typed {
            t.keys(&["BSpace"]);
        }
        t.text(url);
        t.keys(&["Enter"]);
        t.wait_for(&["Endpoint:"], 10);
        t.text(&g.endpoint);
        t.keys(&["Enter"]);
        t.wait_for(&["Region: us-east-1"], 10);
        for _ in 0.."us-east-1".len() {
            t.keys(&["BSpace"]);
        }
        t.text("garage");
        t.keys(&["Enter"]);
        t.wait_for(&["Access key:"], 10);
        t.text(&g.key_id);
        t.keys(&["Enter"]);
        t.wait_for(&["The secret of access key", "Secret key:"], 10);
        t.text(secret);
        let s = t.wait_for(&["Secret key: ****"], 10);
        assert!(!s.contains(secret), "the secret is shown:\n{s}");
        t.keys(&["Enter"]);
    };

    let t = Tmux::start(&tmp.0);
    t.wait_for(&["main menu"], 20);
    t.choose("Back up a disk");
    t.wait_for(&["Which disk do you want to copy?"], 30);
    t.choose(&entry(&src));
    let wrong = format!("{}x", &g.secret[..g.secret.len() - 1]);
    open_store(&t, &wrong);
    let s = flat(&t.wait_for(&["does not answer as it should", "Press Enter"], 60));
    assert!(s.contains(url) && !s.contains(&wrong), "{s}");
    t.keys(&["Enter"]);
    t.wait_for(&["Location: s3://klon/wizard"], 10);
    t.keys(&["Escape"]);
    open_store(&t, &g.secret);
    let s = t.wait_for(&["Repository name:"], 60);
    assert!(flat(&s).contains("in s3://klon/wizard"), "{s}");
    let name = s.lines().find_map(|l| l.trim().strip_prefix("Repository name: ")).unwrap().trim().to_string();
    assert!(!name.is_empty(), "{s}");
    t.keys(&["Enter"]);
    let s = t.wait_for(&["> Start the backup"], 20);
    assert!(flat(&s).contains("into the new repository s3://klon/wizard/"), "{s}");
    t.keys(&["Enter"]);
    let s = t.wait_for(&["backup done", "Press Enter"], 120);
    assert!(s.contains("Verification: OK") && flat(&s).contains("in a new repository"), "{s}");
    t.keys(&["Enter"]);
    t.wait_for(&["main menu"], 10);
    t.choose("Quit");
    t.wait_for(&["KLON-EXITED 0"], 10);

    // The repository is in the bucket: klon itself checks every byte.
    let repo = format!("{url}/{name}");
    let mut c = Command::new(env!("CARGO_BIN_EXE_klon"));
    let o = c.args(["check", "--read-data", &repo]).envs(g.env()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // A new session: the settings are asked again, the snapshot listed.
    let t = Tmux::start(&tmp.0);
    t.wait_for(&["main menu"], 20);
    t.choose("Restore an image");
    open_store(&t, &g.secret);
    t.wait_for(&["Which image?", "snapshot "], 60);
    restore_listed_image_and_quit(&t, &dst);
    for (start, len) in data_ranges(&src_file) {
        assert_same(&src_file, &dst_file, start, len, "restored partition");
    }
}

/// On "Which image?": restores the image highlighted onto `dst` (a disk of
/// the image's size: no question about extra space), checks the wizard's
/// read-back said OK, and quits the wizard.
fn restore_listed_image_and_quit(t: &Tmux, dst: &LoopDevice) {
    t.keys(&["Enter"]);
    t.wait_for(&["Which disk do you want to OVERWRITE?"], 30);
    t.choose(&entry(dst));
    t.wait_for(&["Type to confirm:"], 30);
    t.text(&dev_name(dst));
    t.keys(&["Enter"]);
    let s = t.wait_for(&["restore done", "Press Enter"], 120);
    assert!(s.contains("Verification: OK"), "{s}");
    t.keys(&["Enter"]);
    t.wait_for(&["main menu"], 10);
    t.choose("Quit");
    t.wait_for(&["KLON-EXITED 0"], 10);
}
