//! The `klon` binary: parse, dispatch, report errors with their exit code.

use clap::Parser;

fn main() {
    // The live USB image starts klon as /init: PID 1 of the initramfs.
    if klon::live::pid1::is_init() {
        klon::live::pid1::main();
    }
    let cli = klon::cli::Cli::parse();
    klon::engine::cancel::install();
    if let Err(e) = klon::commands::run(&cli) {
        // The message already includes the cause (an OS error's text).
        eprintln!("klon: {e}");
        std::process::exit(e.exit_code());
    }
}
