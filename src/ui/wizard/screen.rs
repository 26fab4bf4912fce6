//! One screen at a time on an 80x25 console: a title, some text, and one
//! question (a menu, a line of text, a typed confirmation). Esc goes back;
//! Ctrl-C asks whether to quit.

use console::{Key, Term};
use dialoguer::theme::SimpleTheme;
use dialoguer::{Confirm, Select};

use crate::engine::cancel;
use crate::error::{Error, Result};

/// The answer to a screen: go on with a value, or go back one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Nav<T> {
    /// Go on.
    Go(T),
    /// Esc: back one step.
    Back,
}

/// Marks the error that ends the wizard after "Quit klon?" got a yes.
pub const QUIT: &str = "klon was quit with Ctrl-C";

/// Whether `e` is the wizard's own quit.
pub fn is_quit(e: &Error) -> bool {
    matches!(e, Error::Cancelled(m) if m == QUIT)
}

/// Console width used for text.
pub const WIDTH: usize = 78;
/// Console height the screens are laid out for.
pub const HEIGHT: usize = 25;

/// One entry of a menu: its text (may span lines) and, when it cannot be
/// chosen, why.
#[derive(Debug, Clone)]
pub struct Item {
    /// What is shown.
    pub text: String,
    /// Why it cannot be chosen, if it cannot.
    pub blocked: Option<String>,
}

impl Item {
    /// An entry that can be chosen.
    pub fn new(text: impl Into<String>) -> Item {
        Item { text: text.into(), blocked: None }
    }
    /// An entry shown but not choosable, with the reason.
    pub fn blocked(text: impl Into<String>, why: impl Into<String>) -> Item {
        Item { text: text.into(), blocked: Some(why.into()) }
    }
}

/// Wraps `text` to `width` columns, keeping its line breaks and indents.
pub fn wrap(text: &str, width: usize) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if line.chars().count() <= width {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let indent: String = line.chars().take_while(|c| *c == ' ').collect();
        let mut cur = String::new();
        for word in line.split_whitespace() {
            if !cur.is_empty() && cur.chars().count() + 1 + word.chars().count() > width {
                out.push_str(&cur);
                out.push('\n');
                cur = if indent.is_empty() { String::new() } else { indent.clone() + "  " };
            } else if !cur.is_empty() && !cur.ends_with(' ') {
                cur.push(' ');
            }
            if cur.is_empty() {
                cur.push_str(&indent);
            }
            cur.push_str(word);
        }
        out.push_str(&cur);
        out.push('\n');
    }
    out
}

fn io_err(e: std::io::Error) -> Error {
    Error::io("using", "the terminal", None, e)
}

/// The terminal the wizard talks on.
#[derive(Debug, Clone)]
pub struct Screen {
    /// stderr, where dialoguer and the progress bars draw.
    pub term: Term,
}

impl Default for Screen {
    fn default() -> Self {
        Screen { term: Term::stderr() }
    }
}

impl Screen {
    /// Clears the console and shows `title` and `body`; returns the number
    /// of lines used.
    pub fn page(&self, title: &str, body: &str) -> Result<usize> {
        let t = &self.term;
        t.clear_screen().map_err(io_err)?;
        let head = format!("klon — {title}");
        let mut lines = 2;
        t.write_line(&head).map_err(io_err)?;
        t.write_line(&"=".repeat(head.chars().count().min(WIDTH))).map_err(io_err)?;
        if !body.is_empty() {
            let w = wrap(body, WIDTH);
            for l in w.lines() {
                t.write_line(l).map_err(io_err)?;
                lines += 1;
            }
            t.write_line("").map_err(io_err)?;
            lines += 1;
        }
        Ok(lines)
    }

    /// After a key read was interrupted by Ctrl-C: asks whether to quit.
    fn ask_quit(&self) -> Result<()> {
        let _ = cancel::take_pending();
        let _ = self.term.show_cursor();
        self.term.write_line("").map_err(io_err)?;
        let quit = Confirm::with_theme(&SimpleTheme)
            .with_prompt("Ctrl-C: quit klon? Nothing more will be done")
            .default(false)
            .interact_on_opt(&self.term);
        let _ = cancel::take_pending();
        match quit {
            Ok(Some(false)) | Ok(None) => Ok(()),
            Ok(Some(true)) | Err(_) => Err(Error::Cancelled(QUIT.into())),
        }
    }

    fn handle<T>(&self, r: std::result::Result<T, dialoguer::Error>) -> Result<Option<T>> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(dialoguer::Error::IO(e)) if e.kind() == std::io::ErrorKind::Interrupted => {
                self.ask_quit()?;
                Ok(None)
            }
            Err(dialoguer::Error::IO(e)) => Err(io_err(e)),
        }
    }

    /// A menu. Blocked items are listed with their reason and cannot be
    /// chosen. Returns the index chosen, or Back on Esc.
    pub fn select(&self, title: &str, body: &str, prompt: &str, items: &[Item], default: usize) -> Result<Nav<usize>> {
        let mut default = default.min(items.len().saturating_sub(1));
        let mut notice = String::new();
        let texts: Vec<String> = items
            .iter()
            .map(|i| match &i.blocked {
                None => i.text.clone(),
                Some(why) => {
                    format!("{}\n{}", i.text, wrap(&format!("      cannot be chosen: {why}"), WIDTH).trim_end())
                }
            })
            .collect();
        let tallest = texts.iter().map(|t| t.lines().count()).max().unwrap_or(1).max(1);
        loop {
            let full_body = if notice.is_empty() { body.to_string() } else { format!("{body}\n\n{notice}") };
            let used = self.page(title, full_body.trim_start())?;
            // Rows left for items: keep the prompt, paging line and a spare.
            let rows = HEIGHT.saturating_sub(used + 3).max(tallest);
            let per_page = (rows / tallest).max(1);
            let hint = if items.len() > per_page { " (←/→ more pages)" } else { "" };
            let r = Select::with_theme(&SimpleTheme)
                .with_prompt(format!("{prompt} — arrows, Enter; Esc goes back{hint}"))
                .items(&texts)
                .default(default)
                .max_length(per_page)
                .interact_on_opt(&self.term);
            let Some(choice) = self.handle(r)? else { continue };
            match choice {
                None => return Ok(Nav::Back),
                Some(i) => match &items[i].blocked {
                    None => return Ok(Nav::Go(i)),
                    Some(why) => {
                        notice = format!("! That one cannot be chosen: {why}");
                        default = i;
                    }
                },
            }
        }
    }

    /// A line of text with a default; Esc goes back.
    pub fn input(&self, title: &str, body: &str, prompt: &str, default: &str) -> Result<Nav<String>> {
        self.page(title, body)?;
        self.read_line(prompt, default)
    }

    /// Reads a line at the cursor: printable keys, Backspace, Enter; Esc
    /// returns Back. `default` is pre-filled.
    pub fn read_line(&self, prompt: &str, default: &str) -> Result<Nav<String>> {
        self.read_text(prompt, default, false)
    }

    /// Reads a secret (a password) at the cursor as [`Self::read_line`]
    /// does, showing a `*` for each character typed.
    pub fn read_secret(&self, prompt: &str) -> Result<Nav<String>> {
        self.read_text(prompt, "", true)
    }

    fn read_text(&self, prompt: &str, default: &str, masked: bool) -> Result<Nav<String>> {
        let t = &self.term;
        let mut text: Vec<char> = default.chars().collect();
        loop {
            t.clear_line().map_err(io_err)?;
            let shown: String = if masked { "*".repeat(text.len()) } else { text.iter().collect() };
            t.write_str(&format!("{prompt}: {shown}")).map_err(io_err)?;
            t.flush().map_err(io_err)?;
            let key = match t.read_key() {
                Ok(k) => k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                    t.write_line("").map_err(io_err)?;
                    self.ask_quit()?;
                    continue;
                }
                Err(e) => return Err(io_err(e)),
            };
            match key {
                Key::Escape => {
                    t.write_line("").map_err(io_err)?;
                    return Ok(Nav::Back);
                }
                Key::Enter => {
                    t.write_line("").map_err(io_err)?;
                    let line: String = text.iter().collect();
                    return Ok(Nav::Go(if masked { line } else { line.trim().to_string() }));
                }
                Key::Backspace => {
                    text.pop();
                }
                Key::Char(c) if !c.is_control() => text.push(c),
                _ => {}
            }
        }
    }

    /// Waits for Enter (or Esc) after a message.
    pub fn wait(&self, prompt: &str) -> Result<()> {
        let t = &self.term;
        t.write_str(prompt).map_err(io_err)?;
        t.flush().map_err(io_err)?;
        loop {
            match t.read_key() {
                Ok(Key::Enter) | Ok(Key::Escape) => {
                    t.write_line("").map_err(io_err)?;
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                    t.write_line("").map_err(io_err)?;
                    self.ask_quit()?;
                    t.write_str(prompt).map_err(io_err)?;
                }
                Err(e) => return Err(io_err(e)),
            }
        }
    }

    /// Shows a message page and waits for Enter.
    pub fn message(&self, title: &str, body: &str) -> Result<()> {
        self.page(title, body)?;
        self.wait("Press Enter to go on.")
    }

    /// A yes/no question on the current page (Esc = no).
    pub fn yes_no(&self, prompt: &str, default: bool) -> Result<bool> {
        loop {
            let r = Confirm::with_theme(&SimpleTheme).with_prompt(prompt).default(default).interact_on_opt(&self.term);
            if let Some(v) = self.handle(r)? {
                return Ok(v.unwrap_or(false));
            }
        }
    }
}
