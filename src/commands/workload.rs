//! `livegrid workload`: writes a synthetic workload (events and queries files) for `livegrid
//! replay` and the benchmarks' peers (see [`crate::workload`]).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::process::ExitCode;

use crate::cli::WorkloadArgs;
use crate::workload::{Kind, change_stream_json, generator, query_json};

/// Runs the command.
pub fn run(args: &WorkloadArgs) -> ExitCode {
    let (kind, docs) = settings(args);
    match write(args, kind, docs) {
        Ok(()) => {
            // Say what was written and what to do with it.
            let (events, queries) = (args.dir.join("events.jsonl"), args.dir.join("queries.jsonl"));
            eprintln!(
                "wrote {} change events ({docs} initial documents, then {} writes) to {} and {} queries to {} ({} workload, seed {})",
                docs + args.events,
                args.events,
                events.display(),
                args.queries,
                queries.display(),
                format!("{kind:?}").to_lowercase(),
                args.seed
            );
            eprintln!(
                "replay them with: livegrid replay --events {} --queries {} --out {}",
                events.display(),
                queries.display(),
                args.dir.join("out.jsonl").display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// The kind and the number of initial documents, defaults applied.
fn settings(args: &WorkloadArgs) -> (Kind, u64) {
    let kind = args.kind.unwrap_or(if args.fanout > 0 { Kind::Chat } else { Kind::Items });
    let docs = args.docs.unwrap_or(match kind {
        Kind::Items | Kind::Chat => 0,
        Kind::Feed | Kind::Shop | Kind::Mixed => 10_000,
    });
    (kind, docs)
}

/// Writes the files: the initial documents as inserts (positions 1 to `docs`), the writes,
/// and the queries, each registered once the initial documents are in.
fn write(args: &WorkloadArgs, kind: Kind, docs: u64) -> std::io::Result<()> {
    std::fs::create_dir_all(&args.dir)?;
    let mut generator = generator(kind, args.seed, docs, args.queries, args.fanout);
    let mut events = BufWriter::new(File::create(args.dir.join("events.jsonl"))?);
    for i in 0..docs {
        writeln!(events, "{}", change_stream_json(&generator.initial(i).at(i + 1)))?;
    }
    let mut queries = BufWriter::new(File::create(args.dir.join("queries.jsonl"))?);
    for i in 0..args.queries {
        let (ns, spec) = generator.query(i);
        writeln!(queries, "{}", query_json(&format!("q{i}"), ns, &spec, docs))?;
    }
    queries.flush()?;
    for position in docs + 1..=docs + args.events {
        writeln!(events, "{}", change_stream_json(&generator.write().at(position)))?;
    }
    events.flush()
}
