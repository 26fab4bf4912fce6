//! The `klon` binary: parse, dispatch, report errors with their exit code.

use clap::Parser;

fn main() {
    let cli = klon::cli::Cli::parse();
    klon::engine::cancel::install();
    klon::engine::cancel::default_sigpipe();
    if let Err(e) = klon::commands::run(&cli) {
        // The message already includes the cause (an OS error's text).
        eprintln!("klon: {e}");
        std::process::exit(e.exit_code());
    }
}
