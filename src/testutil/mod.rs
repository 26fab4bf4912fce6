//! Helpers for unit tests: running tools and deterministic data here; the
//! root gate, scratch files and directories, mounts and loop devices in
//! [`shared`], which the integration tests include too. Each cleans up
//! after itself on drop, so a failing test leaves nothing behind.

use std::process::{Command, Output};

mod shared;
pub use shared::*;

/// Runs `cmd` to completion and returns what it did; panics if it cannot
/// start (the tool is not installed).
pub fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {:?}: {e} (is it installed?)", cmd.get_program()))
}

/// Runs `cmd`; panics, showing its stdout and stderr, unless it succeeds.
/// Returns its stdout.
pub fn run(cmd: &mut Command) -> String {
    let o = output(cmd);
    assert!(
        o.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// [`run`] for a program and its arguments.
pub fn sh(prog: &str, args: &[&str]) -> String {
    run(Command::new(prog).args(args))
}

/// Runs `cmd`, which may fail: whether it succeeded, and its stdout
/// followed by its stderr.
pub fn try_run(cmd: &mut Command) -> (bool, String) {
    let o = output(cmd);
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

/// [`try_run`] for a program and its arguments.
pub fn try_sh(prog: &str, args: &[&str]) -> (bool, String) {
    try_run(Command::new(prog).args(args))
}

/// Deterministic pseudo-random numbers (xorshift64): the same state gives
/// the same sequence on every run. The state must not be 0.
pub struct Rng(pub u64);

impl Rng {
    /// A generator whose state is spread from `seed` (so seeds 0, 1, 2…
    /// give unrelated sequences).
    pub fn seeded(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next number (the new state).
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (below 1 for 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// `len` bytes, eight from each number (little-endian).
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }

    /// `len` bytes, one from each number (its low byte).
    pub fn low_bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}
