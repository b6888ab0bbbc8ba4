//! `livegrid workload`: writes a synthetic replay workload (events and queries files) for
//! `livegrid replay`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::process::ExitCode;

use crate::cli::WorkloadArgs;
use crate::workload::{CHAT_NAMESPACE, Chat, NAMESPACE, Workload, change_stream_json};

/// Runs the command.
pub fn run(args: &WorkloadArgs) -> ExitCode {
    match write(args) {
        Ok(()) => {
            // Say what was written and what to do with it.
            let (events, queries) = (args.dir.join("events.jsonl"), args.dir.join("queries.jsonl"));
            let (kind, ns) = if args.fanout > 0 { ("chat", CHAT_NAMESPACE) } else { ("item", NAMESPACE) };
            eprintln!(
                "wrote {} change events to {} and {} queries to {} ({kind} workload on {ns}, seed {})",
                args.events,
                events.display(),
                args.queries,
                queries.display(),
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

fn write(args: &WorkloadArgs) -> std::io::Result<()> {
    std::fs::create_dir_all(&args.dir)?;
    if args.fanout > 0 {
        return write_chat(args);
    }
    let mut workload = Workload::new(args.seed);
    let mut queries = BufWriter::new(File::create(args.dir.join("queries.jsonl"))?);
    for i in 0..args.queries {
        let spec = workload.query();
        let line = serde_json::json!({
            "id": format!("q{i}"),
            "ns": NAMESPACE,
            "filter": livegrid_protocol::extjson::document_to_relaxed_json(&spec.filter),
        });
        writeln!(queries, "{line}")?;
    }
    queries.flush()?;
    let mut events = BufWriter::new(File::create(args.dir.join("events.jsonl"))?);
    for position in 1..=args.events {
        writeln!(events, "{}", change_stream_json(&workload.event(position)))?;
    }
    events.flush()
}

/// The high-fan-out chat workload (see [`Chat`]).
fn write_chat(args: &WorkloadArgs) -> std::io::Result<()> {
    use livegrid_protocol::extjson::document_to_relaxed_json;
    let mut chat = Chat::new(args.seed, args.queries, args.fanout);
    let mut queries = BufWriter::new(File::create(args.dir.join("queries.jsonl"))?);
    for i in 0..args.queries {
        let spec = chat.query(i);
        let mut line = serde_json::json!({"id": format!("q{i}"), "ns": CHAT_NAMESPACE, "filter": document_to_relaxed_json(&spec.filter)});
        if let Some(sort) = &spec.sort {
            line["sort"] = document_to_relaxed_json(sort);
        }
        if let Some(limit) = spec.limit {
            line["limit"] = limit.into();
        }
        writeln!(queries, "{line}")?;
    }
    queries.flush()?;
    let mut events = BufWriter::new(File::create(args.dir.join("events.jsonl"))?);
    for position in 1..=args.events {
        writeln!(events, "{}", change_stream_json(&chat.event(position)))?;
    }
    events.flush()
}
