//! The `klon` binary: parse, dispatch, report errors with their exit code.
//! With no arguments on a terminal it opens the wizard.

use std::io::IsTerminal;

use clap::Parser;

fn main() {
    // The live USB image starts klon as /init: PID 1 of the initramfs.
    if klon::live::pid1::is_init() {
        klon::live::pid1::main();
    }
    if std::env::args_os().len() == 1 && std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
        klon::engine::cancel::install();
        if let Err(e) = klon::ui::wizard::run(false) {
            eprintln!("klon: {e}");
            std::process::exit(e.exit_code());
        }
        return;
    }
    // `klon --config FILE`: the job a file describes, as the command line
    // it stands for.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut cli = match klon::job::expand_config(&args) {
        Ok(Some(line)) => klon::cli::Cli::parse_from(line),
        Ok(None) => klon::cli::Cli::parse_from(args),
        Err(e) => {
            eprintln!("klon: {e}");
            if args.iter().any(|a| a == "--json") {
                klon::commands::json_failure(&e);
            }
            std::process::exit(e.exit_code());
        }
    };
    klon::engine::cancel::install();
    klon::engine::cancel::default_sigpipe();
    // Images and repositories on other machines (sftp://), mounted while
    // the command runs.
    let result = klon::commands::localize(&mut cli).and_then(|remote| {
        let r = klon::commands::run(&cli);
        let unmounted: klon::Result<()> = remote.into_iter().try_for_each(|m| m.unmount());
        r.and(unmounted)
    });
    if let Err(e) = result {
        // The message already includes the cause (an OS error's text).
        eprintln!("klon: {e}");
        if cli.json {
            klon::commands::json_failure(&e);
        }
        std::process::exit(e.exit_code());
    }
}
