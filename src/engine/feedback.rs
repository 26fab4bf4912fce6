//! What the engine tells the person while a job runs — progress over
//! bytes, warnings, notes on what it is doing — through one reporter the
//! caller hands in. How that shows (bars on a terminal, a plain line every
//! few seconds on a console, nothing with --quiet, the wizard's screen) is
//! the user interface's business: `ui::progress::Console` is the one the
//! commands and the wizard use; [`Feedback::silent`] says nothing.

use std::sync::Arc;

/// How a job's progress, warnings and notes reach the person.
pub trait Reporter: Send + Sync {
    /// Starts a meter of `label` over `total` bytes, with one part per
    /// partition (name, bytes) when the job counts bytes by part.
    fn meter(&self, label: &str, total: u64, parts: Vec<(String, u64)>) -> Box<dyn Meter>;
    /// Something the person must know that does not stop the job.
    fn warn(&self, message: &str);
    /// What the job is doing now (a machine joined, a stage began): chatter
    /// that --quiet leaves out.
    fn note(&self, message: &str);
    /// How much detail the person asked for (`-v` 1, `-vv` 2; default 0).
    fn verbosity(&self) -> u8 {
        0
    }
    /// A detail for diagnostics (which method each partition gets, the
    /// helper programs' command lines), asked for with `-v`.
    fn detail(&self, _message: &str) {}
}

/// Progress of one job measured in bytes.
pub trait Meter: Send {
    /// `n` more bytes done.
    fn add(&mut self, n: u64);
    /// `n` more bytes done in part `index` (and overall).
    fn add_part(&mut self, index: usize, n: u64);
    /// The job is over: the meter goes away.
    fn finish(&mut self);
}

/// The reporter a job was handed: cheap to clone, shared by its threads.
#[derive(Clone)]
pub struct Feedback(Arc<dyn Reporter>);

impl Feedback {
    /// Reports through `r`.
    pub fn new(r: impl Reporter + 'static) -> Feedback {
        Feedback(Arc::new(r))
    }

    /// Reports nothing: no progress, no notes, and warnings only in the
    /// job's own report (tests, jobs inside other jobs).
    pub fn silent() -> Feedback {
        Feedback::new(Silent)
    }

    /// See [`Reporter::meter`].
    pub fn meter(&self, label: &str, total: u64, parts: Vec<(String, u64)>) -> Box<dyn Meter> {
        self.0.meter(label, total, parts)
    }

    /// See [`Reporter::warn`].
    pub fn warn(&self, message: &str) {
        self.0.warn(message);
    }

    /// See [`Reporter::note`].
    pub fn note(&self, message: &str) {
        self.0.note(message);
    }

    /// A detail of `level` (1 for `-v`, 2 for `-vv`): made and said only
    /// when that much detail was asked for.
    pub fn detail(&self, level: u8, message: impl FnOnce() -> String) {
        if self.0.verbosity() >= level {
            self.0.detail(&message());
        }
    }
}

impl Default for Feedback {
    fn default() -> Feedback {
        Feedback::silent()
    }
}

impl std::fmt::Debug for Feedback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Feedback")
    }
}

/// Says nothing.
struct Silent;

impl Reporter for Silent {
    fn meter(&self, _: &str, _: u64, _: Vec<(String, u64)>) -> Box<dyn Meter> {
        Box::new(Silent)
    }
    fn warn(&self, _: &str) {}
    fn note(&self, _: &str) {}
}

impl Meter for Silent {
    fn add(&mut self, _: u64) {}
    fn add_part(&mut self, _: usize, _: u64) {}
    fn finish(&mut self) {}
}

#[cfg(test)]
pub mod tests {
    //! A reporter for tests.
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A reporter that keeps what it is told, for tests that check what a
    /// job says.
    #[derive(Clone, Default)]
    pub struct Recorder(pub Arc<Mutex<Vec<String>>>);

    impl Recorder {
        /// What it was told: `warn: …`, `note: …`, `detail: …` (as with
        /// `-v`), `meter LABEL: DONE of TOTAL`.
        pub fn lines(&self) -> Vec<String> {
            self.0.lock().unwrap().clone()
        }
    }

    struct Counted {
        label: String,
        total: u64,
        done: u64,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Meter for Counted {
        fn add(&mut self, n: u64) {
            self.done += n;
        }
        fn add_part(&mut self, _: usize, n: u64) {
            self.add(n);
        }
        fn finish(&mut self) {
            let line = format!("meter {}: {} of {}", self.label, self.done, self.total);
            self.log.lock().unwrap().push(line);
        }
    }

    impl Reporter for Recorder {
        fn meter(&self, label: &str, total: u64, _: Vec<(String, u64)>) -> Box<dyn Meter> {
            Box::new(Counted { label: label.into(), total, done: 0, log: self.0.clone() })
        }
        fn warn(&self, m: &str) {
            self.0.lock().unwrap().push(format!("warn: {m}"));
        }
        fn note(&self, m: &str) {
            self.0.lock().unwrap().push(format!("note: {m}"));
        }
        fn verbosity(&self) -> u8 {
            1
        }
        fn detail(&self, m: &str) {
            self.0.lock().unwrap().push(format!("detail: {m}"));
        }
    }
}
