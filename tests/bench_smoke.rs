//! scripts/bench is a benchmark, not a test: nothing here times anything.
//! This only checks that the script still parses and offers its options;
//! CI's `scripts/bench --quick` smoke run checks that it works end to end.

use std::path::Path;
use std::process::Command;

#[test]
fn bench_script_parses_and_shows_its_options() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench");
    let out = match Command::new("python3").arg(&script).arg("--help").output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("skipped: python3 not runnable ({e})");
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "scripts/bench --help failed: {}", String::from_utf8_lossy(&out.stderr));
    for option in ["--quick", "--runs", "--fresh", "--workdir", "--out", "--only"] {
        assert!(text.contains(option), "scripts/bench --help does not mention {option}:\n{text}");
    }
}
