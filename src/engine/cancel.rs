//! Ctrl-C, SIGTERM and SIGHUP: the first one asks running jobs to stop at
//! the next chunk, so they can clean up and say what state they left.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);
/// The wizard asks before aborting: a signal then only marks a pending
/// request, which the wizard turns into a stop (or not) after asking.
static ASK_FIRST: AtomicBool = AtomicBool::new(false);
static PENDING: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    if ASK_FIRST.load(Ordering::SeqCst) {
        PENDING.store(true, Ordering::SeqCst);
    } else {
        REQUESTED.store(true, Ordering::SeqCst);
    }
}

/// SIGHUP: the terminal is gone. Nobody is there to ask, so the job stops
/// at once; what it would print to the terminal goes to /dev/null instead
/// (writing to a hung-up terminal fails, and a failed print must not cut
/// the cleanup short).
extern "C" fn on_hangup(_: libc::c_int) {
    // SAFETY: open, isatty, dup2 and close are async-signal-safe; the path
    // is a NUL-terminated static string.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                if libc::isatty(fd) == 1 {
                    libc::dup2(null, fd);
                }
            }
            libc::close(null);
        }
    }
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Installs the SIGINT/SIGTERM/SIGHUP handlers.
pub fn install() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::empty(), SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let _ = unsafe { sigaction(sig, &action) };
    }
    let hangup = SigAction::new(SigHandler::Handler(on_hangup), SaFlags::empty(), SigSet::empty());
    // SAFETY: the handler only makes async-signal-safe calls (see on_hangup).
    let _ = unsafe { sigaction(Signal::SIGHUP, &hangup) };
}

/// Restores the default SIGPIPE action, so `klon info | head` ends quietly
/// like other command-line tools instead of failing on a closed pipe.
pub fn default_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: installing the default action runs no code of ours.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

/// Whether the user asked to stop.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Interactive use (the wizard): Ctrl-C only marks a pending request
/// ([`take_pending`]) until [`request`] is called.
pub fn set_ask_first(on: bool) {
    ASK_FIRST.store(on, Ordering::SeqCst);
}

/// Whether Ctrl-C was pressed since the last call (in ask-first mode);
/// clears the mark.
pub fn take_pending() -> bool {
    PENDING.swap(false, Ordering::SeqCst)
}

/// Asks running jobs to stop, as a signal would.
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Forgets a stop request, before the next job.
pub fn reset() {
    REQUESTED.store(false, Ordering::SeqCst);
    PENDING.store(false, Ordering::SeqCst);
}

/// An error to return when a stop was requested.
pub fn check(what: &str) -> crate::Result<()> {
    if requested() { Err(crate::Error::Cancelled(format!("{what} interrupted by the user"))) } else { Ok(()) }
}
