//! `klon.log`: what a backup did, written into its image directory for
//! whoever looks at the image later — the command, the source disk, the
//! method and the bytes of each partition, the warnings, the time it
//! took, and the command that makes the same backup again (as
//! Clonezilla's "next time you can run this command"). Informational:
//! not covered by the image's checksums, never read by klon.

use std::path::Path;

use super::backup::{BackupOptions, BackupReport, DEFAULT_LEVEL, DEFAULT_SPLIT};
use crate::units::human_bytes;

/// The log's file name in an image directory.
pub const LOG_NAME: &str = "klon.log";

/// The text of the log of the backup `report` of `source` made with `opts`.
pub fn backup_log(report: &BackupReport, source: &Path, opts: &BackupOptions) -> String {
    let m = &report.manifest;
    let mut o = String::new();
    let mut line = |s: String| {
        o.push_str(&s);
        o.push('\n');
    };
    line(format!(
        "klon {}: backup finished {} in {:.1} s",
        env!("CARGO_PKG_VERSION"),
        crate::image::manifest::now_rfc3339(),
        report.seconds
    ));
    let argv: Vec<String> = std::env::args().map(|a| quote(&a)).collect();
    line(format!("command line: {}", argv.join(" ")));
    let s = &m.source;
    let mut source_line = format!(
        "source: {}, {} bytes ({}), {}/{}-byte sectors",
        s.path,
        s.size,
        human_bytes(s.size),
        s.logical_sector_size,
        s.physical_sector_size
    );
    for (what, v) in [("model", &s.model), ("serial", &s.serial), ("transport", &s.transport)] {
        if let Some(v) = v {
            source_line += &format!(", {what} {v:?}");
        }
    }
    line(source_line);
    let n = m.layout.partitions.len();
    line(format!("table: {}, {n} partition{}", m.layout.kind, if n == 1 { "" } else { "s" }));
    line("streams: method (why), bytes of the source, bytes stored:".into());
    for st in &m.streams {
        let fs = st.fs.as_ref().map(|f| format!(", {}", f.fstype)).unwrap_or_default();
        line(format!(
            "  {}{fs}: {} ({}), {} of {}, {} stored",
            st.name,
            st.method,
            st.method_reason,
            human_bytes(st.length),
            if st.partition.is_some() { "partition" } else { "disk" },
            human_bytes(st.stored_bytes)
        ));
    }
    if report.warnings.is_empty() {
        line("warnings: none".into());
    } else {
        line("warnings:".into());
        for w in &report.warnings {
            line(format!("  {w}"));
        }
    }
    line(format!(
        "read {} from the source; the image holds {} in its files",
        human_bytes(report.read_bytes),
        human_bytes(report.image_bytes)
    ));
    line(format!("the same backup again: {}", repeat_command(source, opts)));
    o
}

/// The command that makes the same backup of `source` into a new image.
pub fn repeat_command(source: &Path, opts: &BackupOptions) -> String {
    let mut args = vec!["klon".to_string(), "backup".to_string()];
    if opts.level != DEFAULT_LEVEL {
        args.push(format!("--level={}", opts.level));
    }
    if opts.split_size != DEFAULT_SPLIT {
        args.push(format!("--split={}M", opts.split_size >> 20));
    }
    for (on, flag) in [
        (opts.plan.raw_all, "--raw"),
        (opts.plan.raw_unclean, "--raw-unclean"),
        (opts.rescue, "--rescue"),
        (opts.allow_mounted, "--allow-mounted"),
    ] {
        if on {
            args.push(flag.into());
        }
    }
    // Absolute: the log is read later, from wherever.
    let source = std::path::absolute(source).unwrap_or_else(|_| source.to_path_buf());
    args.push(quote(&source.to_string_lossy()));
    args.push("NEW-IMAGE".into());
    args.join(" ")
}

/// `s` as a shell word.
fn quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Writes the log of `report` into its image directory. A failure is a
/// warning (the image is complete without it).
pub fn write_backup_log(report: &BackupReport, source: &Path, opts: &BackupOptions) -> Option<String> {
    let path = report.image.join(LOG_NAME);
    crate::image::manifest::write_synced(&path, backup_log(report, source, opts).as_bytes())
        .err()
        .map(|e| format!("could not write {} ({e}); the image is complete without it", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeat_commands_quote_and_name_only_what_differs() {
        let mut opts = BackupOptions::default();
        assert_eq!(repeat_command(Path::new("/dev/sda"), &opts), "klon backup /dev/sda NEW-IMAGE");
        opts.level = 9;
        opts.split_size = 100 << 20;
        opts.plan.raw_unclean = true;
        assert_eq!(
            repeat_command(Path::new("/tmp/my disk's.img"), &opts),
            r"klon backup --level=9 --split=100M --raw-unclean '/tmp/my disk'\''s.img' NEW-IMAGE"
        );
    }
}
