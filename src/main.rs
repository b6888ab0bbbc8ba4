//! The `livegrid` binary: parses the command line and runs one command.

use std::process::ExitCode;

/// mimalloc: documents are allocated on one thread and freed on another all the time, which
/// the system allocator handles poorly.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use livegrid::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Match(args) => livegrid::commands::match_docs::run(&args),
        Command::Replay(args) => livegrid::commands::replay::run(&args),
        Command::Workload(args) => livegrid::commands::workload::run(&args),
        Command::Serve(args) => livegrid::commands::serve::run(&args),
    }
}
