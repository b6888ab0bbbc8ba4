//! The `livegrid` binary: parses the command line and runs one command.

use std::process::ExitCode;

/// mimalloc, with the settings of `livegrid::allocator` (see there why).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use livegrid::cli::{Cli, Command};

fn main() -> ExitCode {
    livegrid::allocator::configure();
    let cli = Cli::parse();
    match cli.command {
        Command::Match(args) => livegrid::commands::match_docs::run(&args),
        Command::Replay(args) => livegrid::commands::replay::run(&args),
        Command::Workload(args) => livegrid::commands::workload::run(&args),
        Command::Serve(args) => livegrid::commands::serve::run(&args),
        Command::Record(args) => livegrid::commands::record::run(&args),
    }
}
