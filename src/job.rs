//! One job spec. A job's settings — the lines of `klon --config FILE`, of
//! the live stick's `klon.conf`, and the `klon.KEY=VALUE` words of the
//! kernel command line — are klon's own command line under the same names:
//! `job` names the command; its operands (`source`, `image`, `target`) and
//! options (`level`, `grow_last` for `--grow-last`, `yes`, `keep`, …) are
//! settings, a `-` in a name may be written `_`, and a flag takes `yes` or
//! `no`. The command line's definition (clap's, in [`crate::cli`]) is the
//! only one: it gives every name, check and default, so a setting means
//! exactly what the option means.
//!
//! The live system adds its own keys (where the image drive is, what to do
//! afterwards: [`crate::live::job`]); batch use takes a file of settings
//! with `klon --config FILE` ([`expand_config`]).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

use clap::{CommandFactory, Parser};

use crate::cli::Cli;
use crate::error::{Error, Result};

/// Splits a kernel command line into words, keeping double-quoted parts
/// together (`klon.drive="LABEL=My Drive"`), the way the kernel does.
pub fn split_cmdline(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(cur);
    }
    words
}

/// The `klon.*` settings of a kernel command line, prefix removed, `-`
/// written as `_`. A bare `klon.KEY` means `KEY=yes`.
pub fn from_cmdline(cmdline: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for w in split_cmdline(cmdline) {
        let Some(rest) = w.strip_prefix("klon.") else { continue };
        let (k, v) = rest.split_once('=').unwrap_or((rest, "yes"));
        out.insert(normalise_key(k), v.to_string());
    }
    out
}

/// Parses a settings file (klon.conf, or `klon --config FILE`): `KEY =
/// VALUE` per line (a `klon.` prefix on keys is accepted), `#` starts a
/// comment, values may be double-quoted. `origin` names the file in errors.
pub fn from_config(text: &str, origin: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_start_matches('\u{feff}').trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(Error::Usage(format!("{origin} line {}: expected KEY = VALUE, got {line:?}", n + 1)));
        };
        let k = k.trim();
        let k = normalise_key(k.strip_prefix("klon.").unwrap_or(k));
        let v = v.trim();
        let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
        if out.insert(k.clone(), v.to_string()).is_some() {
            return Err(Error::Usage(format!("{origin} line {}: {k} is set twice", n + 1)));
        }
    }
    Ok(out)
}

/// Settings as a settings file's text.
pub fn to_config(settings: &BTreeMap<String, String>) -> String {
    settings.iter().map(|(k, v)| format!("{k} = \"{v}\"\n")).collect()
}

fn normalise_key(k: &str) -> String {
    k.trim().to_ascii_lowercase().replace('-', "_")
}

/// A flag's setting: `yes` or `no` (and their usual spellings).
pub fn yes(key: &str, v: &str) -> Result<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "yes" | "y" | "true" | "on" => Ok(true),
        "0" | "no" | "n" | "false" | "off" | "" => Ok(false),
        other => Err(Error::Usage(format!("{key}={other}: use yes or no"))),
    }
}

/// A passphrase: compared and cloned, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// What a command takes, by setting name.
struct Shape {
    /// Its operands, in order, and whether each must be given.
    operands: Vec<(String, bool)>,
    /// Its options and whether each takes a value (else: a flag).
    options: Vec<(String, bool)>,
}

impl Shape {
    fn of(cmd: &clap::Command) -> Shape {
        let mut operands = Vec::new();
        let mut options = Vec::new();
        for a in cmd.get_arguments() {
            if a.is_positional() {
                // In the order declared, which is clap's order of operands.
                operands.push((a.get_id().to_string(), a.is_required_set()));
            } else if let Some(long) = a.get_long()
                && !matches!(long, "help" | "version")
            {
                options.push((normalise_key(long), a.get_action().takes_values()));
            }
        }
        Shape { operands, options }
    }

    fn names(&self) -> Vec<&str> {
        self.operands.iter().chain(&self.options).map(|(n, _)| n.as_str()).collect()
    }
}

/// The commands a job can be: every command that does one thing (not the
/// live system's own, not help).
fn job_command(name: &str) -> Result<clap::Command> {
    let cli = Cli::command();
    let usable = |c: &&clap::Command| !c.is_hide_set() && !c.has_subcommands() && c.get_name() != "help";
    match cli.get_subcommands().filter(usable).find(|c| c.get_name() == name) {
        Some(c) => Ok(c.clone()),
        None => {
            let names: Vec<&str> = cli.get_subcommands().filter(usable).map(|c| c.get_name()).collect();
            Err(Error::Usage(format!("job={name}: not a job klon runs (jobs: {})", names.join(", "))))
        }
    }
}

/// The settings the command `name` takes: its operands, then its options.
pub fn settings_of(name: &str) -> Result<Vec<String>> {
    Ok(Shape::of(&job_command(name)?).names().into_iter().map(String::from).collect())
}

/// The command line (`klon NAME --option=VALUE … -- OPERAND …`) that
/// `settings` make for the command `name`. Every key must be one of the
/// command's operands or options; `hint` is added to the refusal of one
/// that is not.
pub fn command_line(name: &str, settings: &BTreeMap<String, String>, hint: &str) -> Result<Vec<String>> {
    let shape = Shape::of(&job_command(name)?);
    let mut line = vec!["klon".to_string(), name.to_string()];
    for (k, v) in settings {
        if shape.operands.iter().any(|(o, _)| o == k) {
            continue;
        }
        let flag = format!("--{}", k.replace('_', "-"));
        match shape.options.iter().find(|(o, _)| o == k) {
            Some((_, true)) => line.push(format!("{flag}={v}")),
            Some((_, false)) => {
                if yes(k, v)? {
                    line.push(flag);
                }
            }
            None => {
                return Err(Error::Usage(format!(
                    "{k} is not a setting of job={name} (its settings: {}){hint}",
                    shape.names().join(", ")
                )));
            }
        }
    }
    line.push("--".into());
    for (o, required) in &shape.operands {
        match settings.get(o) {
            Some(v) => line.push(v.clone()),
            None if *required => return Err(Error::Usage(format!("job={name} needs {o}=…"))),
            None => {}
        }
    }
    Ok(line)
}

/// Parses a command line [`command_line`] made, with the problem (if any)
/// named by the setting it came from.
pub fn parse_line(line: &[String]) -> Result<Cli> {
    Cli::try_parse_from(line).map_err(|e| {
        use clap::error::{ContextKind, ContextValue};
        let text = e.to_string();
        let first = text.lines().next().unwrap_or_default().trim_start_matches("error: ").to_string();
        let setting = match (e.get(ContextKind::InvalidArg), e.get(ContextKind::InvalidValue)) {
            (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) if arg.starts_with("--") => {
                let key = normalise_key(arg.trim_start_matches("--").split([' ', '=']).next().unwrap_or_default());
                format!("{key}={value}: ")
            }
            _ => String::new(),
        };
        Error::Usage(format!("{setting}{first}"))
    })
}

/// The command `settings` describe (`job` names it).
pub fn command(settings: &BTreeMap<String, String>, hint: &str) -> Result<Cli> {
    let Some(name) = settings.get("job").map(|j| j.trim().to_ascii_lowercase()) else {
        return Err(Error::Usage("no job: say which command, e.g. job = backup".into()));
    };
    let mut rest = settings.clone();
    rest.remove("job");
    parse_line(&command_line(&name, &rest, hint)?)
}

/// What the live stick's klon.conf has that a batch job file does not.
const LIVE_ONLY: &[&str] = &["drive", "after", "wait", "net", "live", "shell", "copy_drive"];

/// `klon --config FILE`: when `args` (the process's, program name first)
/// give `--config FILE`, the command line the file's job makes, with the
/// global options (`--json`, `--quiet`, `--passphrase-file`) given beside
/// it. The file's `passphrase`, if any, is the repository's passphrase.
/// `None`: no `--config`.
pub fn expand_config(args: &[OsString]) -> Result<Option<Vec<OsString>>> {
    let mut file = None;
    let mut globals = Vec::new();
    let mut others = Vec::new();
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        // `--config` is an option of klon itself: before any command.
        if file.is_none() && !s.starts_with('-') {
            return Ok(None);
        }
        if s == "--config" {
            let f = it.next().ok_or_else(|| Error::Usage("--config needs a FILE".into()))?;
            file = Some(std::path::PathBuf::from(f));
        } else if let Some(f) = s.strip_prefix("--config=") {
            file = Some(f.into());
        } else if matches!(s.as_ref(), "-q" | "--quiet" | "--json" | "-v" | "-vv" | "--verbose")
            || s.starts_with("--passphrase-file=")
        {
            globals.push(a.clone());
        } else if s == "--passphrase-file" {
            globals.push(a.clone());
            globals.extend(it.next().cloned());
        } else {
            others.push(s.into_owned());
        }
    }
    let Some(file) = file else { return Ok(None) };
    if let Some(other) = others.first() {
        return Err(Error::Usage(format!(
            "{other}: with --config FILE the job and its settings come from FILE; besides it give only \
             --json, --quiet or --passphrase-file"
        )));
    }
    let text = std::fs::read_to_string(&file).map_err(|e| Error::io("reading the job file", &file, None, e))?;
    let in_file = |e: Error| e.with_note(&format!("in {}", file.display()));
    let mut settings = from_config(&text, &file.display().to_string())?;
    if let Some(p) = settings.remove("passphrase") {
        warn_if_readable(&file);
        crate::repo::crypto::set_passphrase(p);
    }
    let hint = if settings.keys().any(|k| LIVE_ONLY.contains(&k.as_str())) {
        format!(
            " — {} are for the live stick's klon.conf; in a job file give the image as a path",
            LIVE_ONLY.join(", ")
        )
    } else {
        String::new()
    };
    let Some(name) = settings.remove("job").map(|j| j.trim().to_ascii_lowercase()) else {
        return Err(in_file(Error::Usage("no job: say which command, e.g. job = backup".into())));
    };
    let line = command_line(&name, &settings, &hint).map_err(in_file)?;
    parse_line(&line).map_err(in_file)?;
    let mut out: Vec<OsString> = vec![args[0].clone()];
    out.extend(globals);
    out.extend(line.into_iter().skip(1).map(OsString::from));
    Ok(Some(out))
}

/// A passphrase in a file others can read is said (not refused: the file
/// may be on a filesystem without modes).
fn warn_if_readable(file: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(file)
        && m.permissions().mode() & 0o077 != 0
    {
        eprintln!(
            "klon: warning: {} holds a passphrase and others may read it (chmod 600 {})",
            file.display(),
            file.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Command;

    fn settings(s: &str) -> BTreeMap<String, String> {
        from_config(s, "test").unwrap()
    }

    #[test]
    fn cmdline_words_and_quotes() {
        let w = split_cmdline("BOOT_IMAGE=/vmlinuz quiet  klon.drive=\"LABEL=My Drive\" klon.job=backup\n");
        assert_eq!(w, vec!["BOOT_IMAGE=/vmlinuz", "quiet", "klon.drive=LABEL=My Drive", "klon.job=backup"]);
        let m = from_cmdline("console=ttyS0 klon.job=restore klon.grow-last klon.target=serial=T1");
        assert_eq!(m.get("job").unwrap(), "restore");
        assert_eq!(m.get("grow_last").unwrap(), "yes");
        assert_eq!(m.get("target").unwrap(), "serial=T1");
        assert!(!m.contains_key("console"));
    }

    #[test]
    fn config_file() {
        let m = settings("# comment\n\u{feff}job = backup\r\nsource=/dev/sda\nklon.image = \"pc 1\"\n\n");
        assert_eq!(m.get("job").unwrap(), "backup");
        assert_eq!(m.get("image").unwrap(), "pc 1");
        let e = from_config("nonsense\n", "jobs/x.conf").unwrap_err().to_string();
        assert!(e.contains("jobs/x.conf line 1"), "{e}");
        let e = from_config("level = 3\nlevel = 9\n", "f").unwrap_err().to_string();
        assert!(e.contains("line 2: level is set twice"), "{e}");
        let m = from_cmdline("klon.job=verify klon.image=\"a b\" klon.drive=UUID=1234-ABCD");
        assert_eq!(from_config(&to_config(&m), "f").unwrap(), m);
    }

    #[test]
    fn settings_are_the_command_lines_options_with_its_defaults() {
        let cli = command(&settings("job = backup\nsource = /dev/sda\nimage = /mnt/pc\n"), "").unwrap();
        let Command::Backup(b) = cli.command else { panic!("{cli:?}") };
        assert_eq!((b.source.to_str(), b.image.to_str()), (Some("/dev/sda"), Some("/mnt/pc")));
        assert_eq!(b.level, crate::engine::backup::DEFAULT_LEVEL, "the command line's default");
        assert!(!b.rescue && !b.no_verify && !b.repo);
        let cli = command(
            &settings(
                "job = backup\nsource = /dev/sda\nimage = /mnt/pc\nlevel = 9\nno-verify = yes\nrescue = no\n\
                 keep = daily=7,weekly=4\nsplit = 2G\nallow_mounted = yes\n",
            ),
            "",
        )
        .unwrap();
        let Command::Backup(b) = cli.command else { panic!() };
        assert_eq!((b.level, b.no_verify, b.rescue, b.split), (9, true, false, 2 << 30));
        assert_eq!(b.keep.as_deref(), Some("daily=7,weekly=4"));
        assert!(b.read.allow_mounted);
        // Restore and clone: the operands in the command's order, flags by name.
        let cli =
            command(&settings("job=restore\ntarget=/dev/sdb\nimage=/mnt/pc\ngrow_last=1\nyes=yes\n"), "").unwrap();
        let Command::Restore(r) = cli.command else { panic!() };
        assert_eq!((r.image.to_str(), r.target.to_str()), (Some("/mnt/pc"), Some("/dev/sdb")));
        assert!(r.write.grow_last && r.write.yes && !r.grow_all);
        let cli = command(&settings("job=clone\nsource=/dev/sda\ntarget=/dev/sdb\n"), "").unwrap();
        let Command::Clone(c) = cli.command else { panic!() };
        assert_eq!((c.source.to_str(), c.target.to_str(), c.write.yes), (Some("/dev/sda"), Some("/dev/sdb"), false));
        // An operand that starts with '-' stays an operand.
        let cli = command(&settings("job=verify\nimage=-odd name\n"), "").unwrap();
        let Command::Verify(v) = cli.command else { panic!() };
        assert_eq!(v.image.to_str(), Some("-odd name"));
    }

    #[test]
    fn bad_settings_are_named() {
        let e = |s: &str| command(&settings(s), " (hint)").unwrap_err().to_string();
        let m = e("job=backup\nsource=/dev/sda\nimage=x\nlevel=high\n");
        assert!(m.starts_with("level=high: ") && m.contains("--level"), "{m}");
        let m = e("job=backup\nsource=/dev/sda\nimage=x\nkeep=daily\n");
        assert!(m.starts_with("keep=daily: ") && m.contains("RULE=N"), "{m}");
        let m = e("job=verify\nimage=x\nrescue=yes\n");
        assert!(m.contains("rescue is not a setting of job=verify") && m.contains("image, threads"), "{m}");
        assert!(m.ends_with("(hint)"), "{m}");
        let m = e("job=backup\nimage=x\n");
        assert_eq!(m, "job=backup needs source=…");
        let m = e("job=format\n");
        assert!(m.contains("not a job klon runs") && m.contains("backup") && !m.contains("live"), "{m}");
        let m = e("job=verify\nimage=x\nthreads=0x\n");
        assert!(m.starts_with("threads=0x: "), "{m}");
        let m = e("job=restore\nimage=x\ntarget=/dev/sdb\nyes=perhaps\n");
        assert_eq!(m, "yes=perhaps: use yes or no");
        assert!(e("image=x\n").contains("no job"));
        assert!(e("job=key\n").contains("not a job"), "a command with subcommands is not a job");
    }

    #[test]
    fn a_job_file_becomes_the_command_line() {
        let dir = crate::testutil::TempDir::new("jobfile");
        let f = dir.join("weekly.conf");
        std::fs::write(&f, "job = backup\nsource = /dev/sda\nimage = \"/mnt/usb/pc 1\"\nlevel = 5\nrepo = yes\n")
            .unwrap();
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        let got = expand_config(&args(&["klon", "--json", "--config", f.to_str().unwrap()])).unwrap().unwrap();
        assert_eq!(got, args(&["klon", "--json", "backup", "--level=5", "--repo", "--", "/dev/sda", "/mnt/usb/pc 1"]));
        assert_eq!(expand_config(&args(&["klon", "disks"])).unwrap(), None);
        assert_eq!(expand_config(&args(&["klon", "help", "--config"])).unwrap(), None, "a command's own words");
        let e = expand_config(&args(&["klon", "--config", f.to_str().unwrap(), "restore"])).unwrap_err();
        assert!(e.to_string().contains("only --json, --quiet or --passphrase-file"), "{e}");
        std::fs::write(&f, "job = backup\nsource = /dev/sda\nimage = pc\ndrive = LABEL=USB\n").unwrap();
        let e = expand_config(&args(&["klon", &format!("--config={}", f.display())])).unwrap_err().to_string();
        assert!(e.contains("drive is not a setting") && e.contains("live stick's klon.conf"), "{e}");
        assert!(e.contains("weekly.conf"), "the file is named: {e}");
    }
}
