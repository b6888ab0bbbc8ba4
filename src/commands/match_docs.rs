//! `livegrid match`: runs one query over documents read from stdin.
//!
//! Input is Extended JSON, one document per line (blank lines are skipped). Output is the
//! query's result as relaxed Extended JSON, one document per line: in input order without a
//! sort, in sort order with one. Exit status: 0 on success, 2 for a bad query, 1 for
//! unreadable input; errors are one line on stderr.

use std::collections::BTreeMap;
use std::io::{BufRead, BufWriter, Write};
use std::process::ExitCode;

use bson::Document;
use livegrid_matcher::{Query, QueryError, QuerySpec, SortKey};
use livegrid_protocol::extjson;

use crate::cli::MatchArgs;

/// Exit status for a query that does not parse.
pub const EXIT_BAD_QUERY: u8 = 2;
/// Exit status for input that cannot be read.
pub const EXIT_BAD_INPUT: u8 = 1;

/// Runs the command on stdin and stdout.
pub fn run(args: &MatchArgs) -> ExitCode {
    let query = match compile(args) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("error: bad query: {e}");
            return ExitCode::from(EXIT_BAD_QUERY);
        }
    };
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    match run_query(&query, std::io::stdin().lock(), &mut out).and_then(|()| out.flush().map_err(RunError::Output)) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`| head`) is the reader's choice, not an error.
        Err(RunError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_BAD_INPUT)
        }
    }
}

/// Compiles the query given on the command line.
pub fn compile(args: &MatchArgs) -> Result<Query, QueryError> {
    let parse =
        |name: &str, text: &str| extjson::parse_document(text).map_err(|e| QueryError::Json(format!("--{name}: {e}")));
    Query::compile(&QuerySpec {
        filter: parse("filter", &args.filter)?,
        sort: args.sort.as_deref().map(|s| parse("sort", s)).transpose()?,
        skip: args.skip,
        limit: args.limit,
        projection: args.projection.as_deref().map(|p| parse("projection", p)).transpose()?,
    })
}

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A line of input is not an Extended JSON document.
    #[error("line {line}: {message}")]
    BadDocument {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// Reading stdin failed.
    #[error("reading input: {0}")]
    Input(std::io::Error),
    /// Writing stdout failed.
    #[error("writing output: {0}")]
    Output(std::io::Error),
}

/// Runs `query` over the documents in `input`, writing the result to `out`.
pub fn run_query(query: &Query, input: impl BufRead, out: &mut impl Write) -> Result<(), RunError> {
    let sorted = !query.sort.is_empty();
    let window = query.limit.map(|l| usize::try_from(query.skip.saturating_add(l)).unwrap_or(usize::MAX));
    let mut skipped = 0u64;
    let mut written = 0u64;
    // Sorted: the best `skip + limit` documents so far, keyed by sort key and input line (so
    // that documents with equal `_id`s are all kept).
    let mut best: BTreeMap<(SortKey, usize), Document> = BTreeMap::new();
    for (index, line) in input.lines().enumerate() {
        let line = line.map_err(RunError::Input)?;
        if line.trim().is_empty() {
            continue;
        }
        let doc = extjson::parse_document(&line)
            .map_err(|e| RunError::BadDocument { line: index + 1, message: e.to_string() })?;
        if !query.filter.matches(&doc) {
            continue;
        }
        if sorted {
            best.insert((query.sort.key(&doc), index), doc);
            if window.is_some_and(|w| best.len() > w) {
                best.pop_last();
            }
            continue;
        }
        if skipped < query.skip {
            skipped += 1;
            continue;
        }
        write_doc(out, &query.projection.apply(&doc))?;
        written += 1;
        if query.limit.is_some_and(|l| written >= l) {
            return Ok(());
        }
    }
    for doc in best.values().skip(query.skip as usize) {
        write_doc(out, &query.projection.apply(doc))?;
    }
    Ok(())
}

fn write_doc(out: &mut impl Write, doc: &Document) -> Result<(), RunError> {
    writeln!(out, "{}", extjson::to_relaxed_string(doc)).map_err(RunError::Output)
}
