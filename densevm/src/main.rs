//! The `densevm` command: run, demo, bench and host-info.

use std::process::ExitCode;

use clap::Parser;

mod api_bridge;
mod bench;
mod cli;
mod commands;

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
            eprintln!("densevm: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
