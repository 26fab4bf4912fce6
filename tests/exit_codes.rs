//! The exit code and the message of failures that are easy to get wrong:
//! what kind of failure it is decides the code (README's table).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::disks::*;

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs a copy of klon (in `t`, where user nobody can reach it) as user
/// nobody, whom the permissions bind (root passes them all).
fn klon_as_nobody(t: &TempDir, args: &[&str]) -> Output {
    let bin = t.join("klon-bin");
    if !bin.exists() {
        std::fs::copy(env!("CARGO_BIN_EXE_klon"), &bin).unwrap();
        chmod(&bin, 0o755);
        chmod(&t.0, 0o755);
    }
    Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(&bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run setpriv (util-linux)")
}

/// An image klon may not read is an I/O error that says so (exit 3), not
/// a damaged or foreign image (exit 4): a directory it may not search, and
/// a manifest it may not read.
#[test]
fn an_image_klon_may_not_read_is_an_io_error_naming_the_permission() {
    require_root!();
    let t = TempDir::new("perm");
    let (_, img) = small_image(&t);
    let img_s = img.to_str().unwrap();
    let target = t.join("target.img");

    chmod(&img, 0o700);
    for args in [vec!["verify", img_s], vec!["info", img_s], vec!["restore", "--yes", img_s, target.to_str().unwrap()]]
    {
        let o = klon_as_nobody(&t, &args);
        fails_with(&o, 3, &[img_s, "Permission denied"]);
        assert!(!stderr(&o).contains("not a klon image"), "{}", stderr(&o));
    }
    assert!(!target.exists());

    chmod(&img, 0o755);
    chmod(&img.join("klon.json"), 0o600);
    let o = klon_as_nobody(&t, &["verify", img_s]);
    fails_with(&o, 3, &["klon.json", "Permission denied"]);
    chmod(&img.join("klon.json"), 0o644);
    ok(&klon_as_nobody(&t, &["verify", img_s]));
}

/// A checksum file of the manifest that is not text is a damaged image
/// (exit 4), not an I/O error.
#[test]
fn a_manifest_checksum_file_that_is_not_text_is_damage() {
    let t = TempDir::new("b3-utf8");
    let (_, img) = small_image(&t);
    std::fs::write(img.join("klon.json.b3"), b"\xff\xfe\x80 klon.json\n").unwrap();
    for cmd in ["verify", "info"] {
        let o = klon(&[cmd, img.to_str().unwrap()]);
        fails_with(&o, 4, &["klon.json.b3"]);
    }
}

/// `klon help --help` is a request for help like `klon help` (exit 0), and
/// `klon help COMMAND` gives that command's help.
#[test]
fn help_of_help_succeeds() {
    for args in [&["help", "--help"][..], &["help", "-h"], &["help"]] {
        let o = klon(args);
        ok(&o);
        assert!(stdout(&o).contains("Usage: klon"), "{args:?}: {}", stdout(&o));
    }
    let o = klon(&["help", "restore"]);
    ok(&o);
    assert!(stdout(&o).contains("--grow-last"), "{}", stdout(&o));
    fails_with(&klon(&["help", "no-such-command"]), 2, &["no-such-command"]);
}

/// `verify --json` of a damaged image prints its report, with "ok": false
/// and the problem, and keeps exit 4.
#[test]
fn verify_json_reports_a_failure() {
    let t = TempDir::new("verify-json");
    let (_, img) = small_image(&t);
    let file = data_files(&img)[0].clone();
    let len = std::fs::metadata(&file).unwrap().len();
    let mut b = read_at(&file, len / 2, 1);
    b[0] ^= 1;
    write_at(&file, len / 2, &b);
    let name = file.file_name().unwrap().to_str().unwrap();
    let o = klon(&["verify", "--json", img.to_str().unwrap()]);
    fails_with(&o, 4, &[name]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("verify --json prints JSON on failure");
    assert_eq!(v["ok"], serde_json::json!(false), "{v}");
    assert_eq!(v["image"].as_str(), img.to_str());
    assert!(v["problem"].as_str().is_some_and(|p| p.contains(name)), "{v}");
    assert_eq!(v["exit_code"], serde_json::json!(4), "{v}");
    // A failure to open the image is reported the same way.
    let o = klon(&["verify", "--json", t.join("nothing-here").to_str().unwrap()]);
    fails_with(&o, 2, &["does not exist"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("JSON");
    assert_eq!(v["ok"], serde_json::json!(false), "{v}");
}

/// `demo --json` prints one JSON report of what the demo did, no text.
#[test]
fn demo_json_prints_a_json_report() {
    let t = TempDir::new("demo-json");
    let o = klon(&["demo", "--json", "--quiet", "--dir", t.join("demo").to_str().unwrap()]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("demo --json prints JSON");
    assert_eq!(v["ok"], serde_json::json!(true), "{v}");
    assert_eq!(v["source"]["size"].as_u64(), Some(64 * MIB), "{v}");
    assert_eq!(v["restore"]["target_size"].as_u64(), Some(96 * MIB), "{v}");
    assert_eq!(v["compared"]["partitions"].as_u64(), Some(3), "{v}");
    assert!(v["backup"]["image_bytes"].as_u64().is_some_and(|b| b > 0), "{v}");
    assert!(v["verify"]["chunks"].as_u64().is_some_and(|c| c > 0), "{v}");
}

/// The files of a Clonezilla savedisk image of a 16 MiB MBR disk `sda`
/// with one partition, without its partition images; `parts` as given.
fn clonezilla_dir(dir: &Path, parts: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("disk"), "sda\n").unwrap();
    std::fs::write(dir.join("parts"), parts).unwrap();
    std::fs::write(dir.join("clonezilla-img"), "").unwrap();
    std::fs::write(
        dir.join("sda-pt.sf"),
        "label: dos\ndevice: /dev/sda\nunit: sectors\nsector-size: 512\n\n\
         /dev/sda1 : start=        2048, size=       16384, type=83\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("sda-pt.parted"),
        "Model:  (file)\nDisk /dev/sda: 32768s\nSector size (logical/physical): 512B/512B\n\
         Partition Table: msdos\nDisk Flags: \n\nNumber  Start  End     Size    Type     File system  Flags\n \
         1      2048s  18431s  16384s  primary\n\n",
    )
    .unwrap();
}

/// An empty `parts` file is called empty, not missing: in a Clonezilla
/// image (its partitions then have no data: a damaged image, exit 4), and
/// in a directory that has only `disk` and `parts`.
#[test]
fn an_empty_clonezilla_parts_file_is_called_empty() {
    let t = TempDir::new("cz-empty-parts");
    let img = t.join("cz");
    clonezilla_dir(&img, "");
    for args in [vec!["info", img.to_str().unwrap()], vec!["verify", img.to_str().unwrap()]] {
        let o = klon(&args);
        fails_with(&o, 4, &["`parts` is empty"]);
        assert!(!stderr(&o).contains("missing"), "{}", stderr(&o));
    }
    let only = t.join("only-lists");
    std::fs::create_dir_all(&only).unwrap();
    std::fs::write(only.join("disk"), "sda\n").unwrap();
    std::fs::write(only.join("parts"), "").unwrap();
    let o = klon(&["info", only.to_str().unwrap()]);
    fails_with(&o, 4, &["`parts` is empty"]);
    assert!(!stderr(&o).contains("no `disk` or `parts` file"), "{}", stderr(&o));
}

/// `klon info` reads only a small `last-verify.json` (klon's own is a few
/// hundred bytes): a record padded to 2 MiB is ignored, not read whole and
/// taken; a FIFO in its place is not opened (that waited for a writer).
#[test]
fn info_ignores_an_oversized_or_odd_last_verify_record() {
    let t = TempDir::new("last-verify");
    let (_, img) = small_image(&t);
    let record = img.join("last-verify.json");
    let mut text =
        br#"{"time": "2026-01-01T00:00:00Z", "ok": true, "klon_version": "0.0.0", "problem": null}"#.to_vec();
    ok(&klon(&["info", img.to_str().unwrap()]));
    std::fs::write(&record, &text).unwrap();
    assert!(stdout(&klon(&["info", img.to_str().unwrap()])).contains("Verified:     OK"));
    text.resize(2 << 20, b' ');
    std::fs::write(&record, &text).unwrap();
    let o = klon(&["info", img.to_str().unwrap()]);
    ok(&o);
    assert!(stdout(&o).contains("Verified:     never"), "{}", stdout(&o));

    std::fs::remove_file(&record).unwrap();
    nix::unistd::mkfifo(&record, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_klon"))
        .args(["info", img.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > std::time::Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("klon info waited for a writer of the FIFO last-verify.json");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = child.wait_with_output().unwrap();
    ok(&o);
    assert!(stdout(&o).contains("Verified:     never"), "{}", stdout(&o));
}

/// Rewrites the manifest of `img` with `change` and its checksum file to
/// match, as a damaged manifest with a recomputed sum would be.
fn rewrite_manifest(img: &Path, change: impl FnOnce(&mut serde_json::Value)) {
    let path = img.join("klon.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    change(&mut m);
    let text = serde_json::to_vec_pretty(&m).unwrap();
    std::fs::write(&path, &text).unwrap();
    std::fs::write(img.join("klon.json.b3"), format!("{}  klon.json\n", blake3::hash(&text).to_hex())).unwrap();
}

/// Stored byte counts that add up past 2^64 in a manifest are damage
/// (exit 4, said so), not an arithmetic overflow (a panic, exit 101).
#[test]
fn stored_bytes_adding_up_past_u64_are_damage() {
    let t = TempDir::new("sum-overflow");
    let (src, img) = (t.join("src.img"), t.join("image"));
    make_gpt_disk(&src, 48 * MIB);
    ok(&klon(&["backup", "--no-verify", src.to_str().unwrap(), img.to_str().unwrap()]));
    rewrite_manifest(&img, |m| {
        let streams = m["streams"].as_array_mut().unwrap();
        assert!(streams.len() >= 2, "{streams:?}");
        for s in streams {
            s["stored_bytes"] = (u64::MAX / 2 + 1).into();
            s["compressed_bytes"] = (u64::MAX / 2 + 1).into();
        }
    });
    for args in [
        vec!["verify", img.to_str().unwrap()],
        vec!["restore", "--yes", img.to_str().unwrap(), t.join("dst.img").to_str().unwrap()],
        vec!["info", img.to_str().unwrap()],
        vec!["info", "--json", img.to_str().unwrap()],
    ] {
        let o = klon(&args);
        assert!(!stderr(&o).contains("panicked"), "{args:?}: {}", stderr(&o));
        if args[0] != "info" {
            fails_with(&o, 4, &["klon.json", "stored bytes", "damaged"]);
        }
    }
    assert!(!t.join("dst.img").exists(), "the refused restore left its target file");
}

/// A 0-byte source is refused as nothing to copy (exit 2, no image made);
/// one smaller than a sector, or not a whole number of sectors, is copied
/// with a warning saying so, and restores byte for byte.
#[test]
fn an_empty_or_partial_sector_source_is_refused_or_warned_about() {
    let t = TempDir::new("tiny");
    let empty = t.join("empty.img");
    blank_file(&empty, 0);
    let img = t.join("image0");
    let o = klon(&["backup", empty.to_str().unwrap(), img.to_str().unwrap()]);
    fails_with(&o, 2, &[empty.to_str().unwrap(), "0 bytes"]);
    assert!(!img.exists() && !t.join("image0.klon-partial").exists());
    let o = klon(&["clone", "--yes", empty.to_str().unwrap(), t.join("copy.img").to_str().unwrap()]);
    fails_with(&o, 2, &[empty.to_str().unwrap(), "0 bytes"]);
    assert!(!t.join("copy.img").exists());

    let odd = t.join("odd.img");
    std::fs::write(&odd, random_bytes(5, 511)).unwrap();
    let img = t.join("image1");
    let o = klon(&["backup", "--json", odd.to_str().unwrap(), img.to_str().unwrap()]);
    ok(&o);
    assert!(stderr(&o).contains("warning") && stderr(&o).contains("511 bytes"), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(
        v["warnings"].as_array().is_some_and(|w| w.iter().any(|w| w.as_str().unwrap().contains("511 bytes"))),
        "{v}"
    );
    let back = t.join("back.img");
    ok(&klon(&["restore", "--yes", img.to_str().unwrap(), back.to_str().unwrap()]));
    assert_eq!(std::fs::read(&back).unwrap(), random_bytes(5, 511));
}

/// A directory encrypted with gocryptfs (as Clonezilla's newer `-enc`
/// images are) is named as such, not "not a klon image": without a
/// passphrase it asks for one; with one, what gocryptfs says of a damaged
/// directory is passed on (tests/clonezilla_encrypted.rs opens real ones).
#[test]
fn a_gocryptfs_directory_is_named_with_what_to_do() {
    let t = TempDir::new("gocryptfs");
    let dir = t.join("enc");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("gocryptfs.conf"), b"{\"Version\": 2}").unwrap();
    std::fs::write(dir.join("gocryptfs.diriv"), [7u8; 16]).unwrap();
    std::fs::write(dir.join("Xq3kVf0aZ2-Qf8bB2pJ9yA"), b"ciphertext").unwrap();
    let pass = t.join("pass");
    std::fs::write(&pass, "some passphrase\n").unwrap();
    for cmd in ["info", "verify"] {
        fails_with(&klon(&[cmd, dir.to_str().unwrap()]), 6, &["encrypted with gocryptfs", "needs a passphrase"]);
        let o = klon(&["--passphrase-file", pass.to_str().unwrap(), cmd, dir.to_str().unwrap()]);
        fails_with(&o, 1, &["gocryptfs could not open the image", "encrypted with gocryptfs"]);
    }
}

#[test]
fn help_names_the_wizard_and_its_examples_are_real_commands() {
    let o = klon(&["--help"]);
    ok(&o);
    let help = stdout(&o);
    assert!(help.contains("no command, on a terminal: the wizard"), "{help}");
    let examples: Vec<&str> =
        help.lines().skip_while(|l| *l != "Examples:").skip(1).take_while(|l| !l.is_empty()).collect();
    assert!(examples.len() >= 5, "{help}");
    for line in examples {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[0], "klon", "{line}");
        // An option of klon itself (--config FILE) is in the usage lines.
        if words.len() > 1 && words[1].starts_with("--") {
            assert!(help.contains(&format!("klon {} ", words[1])), "no {} in the usage:\n{help}", words[1]);
            continue;
        }
        // Each example's command exists and takes the options it shows.
        if words.len() > 1 && !words[1].starts_with('/') && words[1] != "the" {
            ok(&klon(&["help", words[1]]));
            let long = stdout(&klon(&["help", words[1]]));
            for opt in words.iter().filter(|w| w.starts_with("--")) {
                assert!(long.contains(opt), "klon {} has no {opt}:\n{long}", words[1]);
            }
        }
    }
}

#[test]
fn bash_completion_completes_commands_and_options() {
    let o = klon(&["completions", "bash"]);
    ok(&o);
    let t = TempDir::new("completions");
    let script = t.join("klon.bash");
    std::fs::write(&script, stdout(&o)).unwrap();
    // What bash offers after "klon ba" and after "klon backup --ra".
    let complete = |words: &str| {
        let probe = format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}}-1)); \
             _klon klon \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; echo \"${{COMPREPLY[@]}}\"",
            script.display()
        );
        let o = std::process::Command::new("bash").args(["--norc", "-c", &probe]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(complete("klon ba"), "backup");
    assert!(!complete("klon l").split(' ').any(|w| w == "live"), "the hidden live command is offered");
    let opts = complete("klon backup --ra");
    assert!(opts.split(' ').any(|w| w == "--raw") && opts.split(' ').any(|w| w == "--raw-unclean"), "{opts}");
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let o = klon(&["completions", shell]);
        ok(&o);
        assert!(stdout(&o).contains("backup") && stdout(&o).contains("raw-unclean"), "{shell}");
    }
    fails_with(&klon(&["completions", "tcsh"]), 2, &["tcsh"]);
}

#[test]
fn man_pages_are_written_for_every_command() {
    let t = TempDir::new("man");
    let dir = t.join("man1");
    ok(&klon(&["man", "--dir", dir.to_str().unwrap()]));
    let mut pages: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    pages.sort();
    for want in ["klon.1", "klon-backup.1", "klon-restore.1", "klon-key-add.1", "klon-completions.1"] {
        assert!(pages.iter().any(|p| p == want), "no {want} in {pages:?}");
    }
    assert!(!pages.iter().any(|p| p.contains("live")), "a page for the live system's hidden command: {pages:?}");
    let backup = std::fs::read_to_string(dir.join("klon-backup.1")).unwrap();
    assert!(backup.starts_with(".ie") || backup.contains(".TH klon-backup 1"), "{backup}");
    assert!(backup.contains("raw\\-unclean") && backup.contains("klon backup"), "{backup}");
    let o = klon(&["man"]);
    ok(&o);
    assert!(stdout(&o).contains(".TH klon 1"), "{}", stdout(&o));
}

#[test]
fn json_failures_print_ok_false_with_the_problem_once() {
    let t = TempDir::new("json-fail");
    let missing = t.join("no-such-disk");
    let (missing, img, out) = (missing.to_str().unwrap(), t.join("img"), t.join("out"));
    let cases: [(&[&str], i32); 4] = [
        (&["--json", "backup", missing, img.to_str().unwrap()], 3),
        (&["--json", "restore", "--yes", missing, out.to_str().unwrap()], 2),
        (&["--json", "info", missing], 2),
        (&["--json", "snapshots", missing], 2),
    ];
    for (args, code) in cases {
        let o = klon(args);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {}", stderr(&o));
        // One JSON document on stdout, the same problem as on stderr.
        let v: serde_json::Value =
            serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{args:?}: {e}: {}", stdout(&o)));
        assert_eq!(v["ok"], serde_json::json!(false), "{args:?}: {v}");
        assert_eq!(v["exit_code"], serde_json::json!(code), "{args:?}: {v}");
        let problem = v["problem"].as_str().unwrap();
        assert!(problem.contains("no-such-disk") && stderr(&o).contains(problem), "{args:?}: {v}");
    }
    // Without --json, nothing on stdout.
    let o = klon(&["info", missing]);
    assert!(stdout(&o).is_empty(), "{}", stdout(&o));
}

/// `-v` says each partition's method and why, and the workers; `-vv` on a
/// restore too; without it neither is said.
#[test]
fn verbose_says_each_partitions_method_and_the_workers() {
    let t = TempDir::new("verbose");
    let (src, img, out) = (t.join("src.img"), t.join("image"), t.join("out.img"));
    make_gpt_disk(&src, 32 * MIB);
    let o = klon(&["-v", "backup", src.to_str().unwrap(), img.to_str().unwrap()]);
    ok(&o);
    let said = stderr(&o);
    for needle in ["partition 1: ", "partition 2: ", "to read of", "backup: ", " workers"] {
        assert!(said.contains(needle), "-v did not say {needle:?}:\n{said}");
    }
    let o = klon(&["-vv", "restore", "--yes", img.to_str().unwrap(), out.to_str().unwrap()]);
    ok(&o);
    assert!(stderr(&o).contains("streams written in this order: "), "{}", stderr(&o));
    let o = klon(&["backup", src.to_str().unwrap(), t.join("again").to_str().unwrap()]);
    ok(&o);
    assert!(!stderr(&o).contains("to read of") && !stderr(&o).contains(" workers"), "{}", stderr(&o));
}
