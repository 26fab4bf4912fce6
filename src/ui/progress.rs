//! Progress on stderr: indicatif bars on a terminal (overall, plus one per
//! partition when the job says which part each byte belongs to), a plain
//! line every few seconds elsewhere (serial consoles, logs), nothing with
//! --quiet. [`Console`] is the engine's reporter for the commands and the
//! wizard.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{human_bytes, human_duration};
use crate::engine::feedback::{Feedback, Meter, Reporter};

/// The reporter of the commands and the wizard: progress on stderr (bars
/// on a terminal, a line every few seconds elsewhere), warnings always
/// (above the bars), notes unless `quiet`, details as `verbose` asks.
pub struct Console {
    /// No progress, no notes (--quiet); warnings still show.
    pub quiet: bool,
    /// Details for diagnostics: 1 with `-v`, 2 with `-vv`.
    pub verbose: u8,
}

impl Console {
    /// A [`Feedback`] through the console, without details.
    pub fn feedback(quiet: bool) -> Feedback {
        Feedback::new(Console { quiet, verbose: 0 })
    }

    /// A [`Feedback`] through the console with `verbose` details.
    pub fn verbose(quiet: bool, verbose: u8) -> Feedback {
        Feedback::new(Console { quiet, verbose })
    }
}

impl Reporter for Console {
    fn meter(&self, label: &str, total: u64, parts: Vec<(String, u64)>) -> Box<dyn Meter> {
        Box::new(Progress::with_parts(label, total, parts, self.quiet))
    }

    fn warn(&self, message: &str) {
        suspend(|| eprintln!("klon: warning: {message}"));
    }

    fn note(&self, message: &str) {
        if !self.quiet {
            suspend(|| eprintln!("klon: {message}"));
        }
    }

    fn verbosity(&self) -> u8 {
        self.verbose
    }

    fn detail(&self, message: &str) {
        suspend(|| eprintln!("klon: {message}"));
    }
}

impl Meter for Progress {
    fn add(&mut self, n: u64) {
        Progress::add(self, n);
    }

    fn add_part(&mut self, index: usize, n: u64) {
        Progress::add_part(self, index, n);
    }

    fn finish(&mut self) {
        Progress::finish(self);
    }
}

/// The bars on screen, so the wizard can hide them while it asks a question.
static ACTIVE: Mutex<Option<MultiProgress>> = Mutex::new(None);

/// Runs `f` with the progress bars (if any) hidden, e.g. to ask a question
/// while a job runs; they are drawn again afterwards.
pub fn suspend<R>(f: impl FnOnce() -> R) -> R {
    let multi = ACTIVE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match multi {
        Some(m) => m.suspend(f),
        None => f(),
    }
}

/// Whether stderr is a terminal that indicatif draws on.
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal() && std::env::var("TERM").map(|t| !t.is_empty() && t != "dumb").unwrap_or(false)
}

fn style(label_width: usize) -> ProgressStyle {
    // At most 80 columns: label, bar, bytes, rate, ETA.
    ProgressStyle::with_template(&format!(
        "{{msg:{label_width}.{label_width}}} [{{bar:18}}] {{bytes:>9}}/{{total_bytes:<9}} {{bytes_per_sec:>11}} {{eta:>3}}"
    ))
    .expect("valid template")
    .progress_chars("=> ")
}

/// Progress of one job measured in bytes.
#[derive(Debug)]
pub struct Progress {
    label: String,
    total: u64,
    done: u64,
    started: Instant,
    last_line: Instant,
    bar: Option<ProgressBar>,
    parts: Vec<(String, u64, u64, Option<ProgressBar>)>,
    multi: Option<MultiProgress>,
    plain: bool,
}

impl Progress {
    /// Starts showing progress of `label` over `total` bytes.
    pub fn new(label: &str, total: u64, quiet: bool) -> Progress {
        Self::with_parts(label, total, Vec::new(), quiet)
    }

    /// Starts showing progress of `label` over `total` bytes with a bar per
    /// part (name, bytes): partitions of a disk. Count bytes with
    /// [`Progress::add_part`].
    pub fn with_parts(label: &str, total: u64, parts: Vec<(String, u64)>, quiet: bool) -> Progress {
        let terminal = stderr_is_terminal();
        let mut multi = None;
        let mut bar = None;
        let mut part_bars = Vec::new();
        if !quiet && terminal {
            let m = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let b = m.add(ProgressBar::new(total));
            b.set_style(style(20));
            b.set_message(format!("{label}: all"));
            // Parts with nothing to do get no bar; at most 12, so the bars
            // fit on a 25-line console.
            let shown = parts.iter().filter(|p| p.1 > 0).count() <= 12;
            for (name, len) in &parts {
                let pb = (shown && *len > 0).then(|| {
                    let pb = m.add(ProgressBar::new(*len));
                    pb.set_style(style(20));
                    pb.set_message(format!("  {name}"));
                    pb
                });
                part_bars.push(pb);
            }
            *ACTIVE.lock().unwrap_or_else(|e| e.into_inner()) = Some(m.clone());
            multi = Some(m);
            bar = Some(b);
        } else {
            part_bars = parts.iter().map(|_| None).collect();
        }
        Progress {
            label: label.to_string(),
            total,
            done: 0,
            started: Instant::now(),
            last_line: Instant::now(),
            plain: !quiet && !terminal,
            bar,
            parts: parts.into_iter().zip(part_bars).map(|((n, t), b)| (n, t, 0, b)).collect(),
            multi,
        }
    }

    /// Adds `n` bytes done.
    pub fn add(&mut self, n: u64) {
        self.done += n;
        if let Some(bar) = &self.bar {
            bar.set_position(self.done);
        } else if self.plain && self.last_line.elapsed() >= Duration::from_secs(5) {
            self.last_line = Instant::now();
            eprintln!("{}", self.line());
        }
    }

    /// Adds `n` bytes done in part `index` (and overall).
    pub fn add_part(&mut self, index: usize, n: u64) {
        if let Some(p) = self.parts.get_mut(index) {
            p.2 += n;
            if let Some(b) = &p.3 {
                b.set_position(p.2);
                if p.2 >= p.1 {
                    b.finish();
                }
            }
        }
        self.add(n);
    }

    fn line(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = self.done as f64 / secs;
        let pct = if self.total > 0 { self.done as f64 * 100.0 / self.total as f64 } else { 100.0 };
        let eta = if rate > 0.0 { (self.total.saturating_sub(self.done)) as f64 / rate } else { 0.0 };
        let part = self
            .parts
            .iter()
            .find(|p| p.2 > 0 && p.2 < p.1)
            .map(|p| format!(" [{}: {} of {}]", p.0, human_bytes(p.2), human_bytes(p.1)))
            .unwrap_or_default();
        format!(
            "{}: {} of {} ({pct:.0}%), {}/s, ETA {}{part}",
            self.label,
            human_bytes(self.done),
            human_bytes(self.total),
            human_bytes(rate as u64),
            human_duration(eta)
        )
    }

    /// Ends the display.
    pub fn finish(&self) {
        for p in &self.parts {
            if let Some(b) = &p.3 {
                b.finish_and_clear();
            }
        }
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if let Some(m) = &self.multi {
            let _ = m.clear();
            let mut active = ACTIVE.lock().unwrap_or_else(|e| e.into_inner());
            *active = None;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // A job that failed halfway leaves no bars behind.
        if self.multi.is_some() && ACTIVE.lock().map(|a| a.is_some()).unwrap_or(false) {
            self.finish();
        }
    }
}
