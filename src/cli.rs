//! Command-line interface: the commands and their flags.

use clap::{Args, Parser, Subcommand};

/// livegrid: a real-time query engine for MongoDB queries.
#[derive(Debug, Parser)]
#[command(name = "livegrid", version, about)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands of the `livegrid` binary.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Filter, sort and project Extended JSON documents read from stdin, one per line, and
    /// write the query's result to stdout, one per line: what a live query will return.
    Match(MatchArgs),
}

/// Flags of `livegrid match`.
#[derive(Debug, Args)]
pub struct MatchArgs {
    /// The filter, as (Extended) JSON.
    #[arg(long, default_value = "{}")]
    pub filter: String,
    /// The sort, as JSON (`{"field": 1|-1, ...}`); without it documents keep input order.
    #[arg(long)]
    pub sort: Option<String>,
    /// How many result documents to leave out.
    #[arg(long, default_value_t = 0)]
    pub skip: u64,
    /// How many result documents to write at most (0: all).
    #[arg(long)]
    pub limit: Option<u64>,
    /// The projection, as JSON.
    #[arg(long)]
    pub projection: Option<String>,
}
