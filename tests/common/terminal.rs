//! A command run on a terminal of its own (a detached tmux session): what
//! it shows is read back, keys are typed into it, and the session is ended
//! when dropped.

use std::process::Command;
use std::time::{Duration, Instant};

pub struct Terminal {
    socket: String,
}

impl Terminal {
    /// Starts `cmd` (a shell command line) on a 120×30 terminal; `name`
    /// tells this test's terminal from others running at the same time.
    pub fn start(name: &str, cmd: &str) -> Terminal {
        let t = Terminal { socket: format!("klon-test-{name}-{}", std::process::id()) };
        t.tmux(&["-f", "/dev/null", "new-session", "-d", "-s", "w", "-x", "120", "-y", "30", "-e", "TERM=xterm", cmd]);
        t
    }

    fn tmux(&self, args: &[&str]) {
        let st = Command::new("tmux").args(["-L", &self.socket]).args(args).status().expect("running tmux");
        assert!(st.success(), "tmux {args:?}");
    }

    /// What the terminal shows now.
    pub fn screen(&self) -> String {
        let o = Command::new("tmux").args(["-L", &self.socket, "capture-pane", "-p", "-t", "w"]).output();
        String::from_utf8_lossy(&o.expect("running tmux").stdout).into_owned()
    }

    /// Waits (at most a minute) until the terminal shows `needle`; returns
    /// the screen.
    pub fn wait_for(&self, needle: &str) -> String {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.screen();
            if s.contains(needle) {
                return s;
            }
            assert!(Instant::now() < end, "waiting for {needle:?}; the terminal shows:\n{s}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Types `text`, then Enter.
    pub fn type_line(&self, text: &str) {
        self.tmux(&["send-keys", "-t", "w", "-l", text]);
        self.tmux(&["send-keys", "-t", "w", "Enter"]);
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["-L", &self.socket, "kill-server"]).status();
    }
}

/// A shell command line that runs `argv` with its standard output to
/// `out`, then appends `KLON-EXITED <status>` to `out` and stays (so the
/// terminal can still be read): see [`exit_status`].
pub fn command_line(argv: &[&str], out: &std::path::Path) -> String {
    let quote = |a: &str| format!("'{}'", a.replace('\'', r"'\''"));
    let out = quote(&out.to_string_lossy());
    let cmd: Vec<String> = argv.iter().map(|a| quote(a)).collect();
    format!("{} > {out}; echo KLON-EXITED $? >> {out}; sleep 60", cmd.join(" "))
}

/// Waits (at most a minute) for the command of [`command_line`] to end;
/// returns its standard output and exit status.
pub fn exit_status(t: &Terminal, out: &std::path::Path) -> (String, i32) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let said = std::fs::read_to_string(out).unwrap_or_default();
        if let Some(at) = said.find("KLON-EXITED ") {
            let code = said[at + 12..].trim().parse().expect("an exit status");
            return (said[..at].to_string(), code);
        }
        assert!(Instant::now() < end, "the command did not end; the terminal shows:\n{}", t.screen());
        std::thread::sleep(Duration::from_millis(50));
    }
}
