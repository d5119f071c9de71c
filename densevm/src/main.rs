//! The `densevm` command: run, demo, bench, host-info and serve.

use std::process::ExitCode;

use clap::Parser;

mod api_bridge;
mod bench;
mod cli;
mod commands;
mod logging;
mod seccomp;

use cli::{Cli, Command};

fn main() -> ExitCode {
    let started = std::time::Instant::now();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; usage errors exit 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match logging::init(cli.log.log_level, cli.log.log_format) {
        Ok(directives) => {
            tracing::debug!(version = env!("CARGO_PKG_VERSION"), filter = %directives, "densevm starting")
        }
        Err(e) => {
            // Plain stderr: there is no logger to report through.
            say_error(&e);
            return ExitCode::from(e.exit_code());
        }
    }
    let result = match cli.command {
        Command::Run(args) => commands::run::main(args, started),
        Command::Demo(args) => commands::demo::main(args),
        Command::HostInfo(args) => commands::host_info::main(args),
        Command::Bench(args) => bench::main(args),
        Command::Serve(args) => commands::serve::main(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // The command's failure is the CLI's answer to the user, not a log line: a
            // plain stderr line whatever the log level or format.
            say_error(&e);
            ExitCode::from(e.exit_code())
        }
    }
}

/// Writes `densevm: error: <e>` to stderr. A closed stderr (a parent that stopped
/// reading) loses the line but must not turn the exit code into a panic's 101.
fn say_error(e: &dyn std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "densevm: error: {e}");
}
