//! `livegrid replay`: the engine without a network. Replays a recorded change stream through
//! the grid with a set of queries registered along the way, writes every `result` and
//! `delta` message, and reports throughput and latency.
//!
//! Queries (one JSON object per line): `{"id", "ns", "filter", "sort", "skip", "limit",
//! "projection", "after"}`, where `after` is the number of events applied before the query is
//! registered (default 0). Replay keeps the database state in memory to answer initial
//! results and window re-reads.
//!
//! Output: one JSON message per line; on stderr a one-line JSON summary: `events`,
//! `skipped` (events without a document change), `queries`, `results`, `deltas`, `seconds`,
//! `events_per_sec`, `deltas_per_sec`, `p50_latency_ms`, `p99_latency_ms` (from a write entering the engine to
//! its delta leaving it), `cluster_bytes_sent` (bytes sent to the other processes of a
//! cluster; 0 on one process), `writes_only_events` and `writes_only_events_per_sec` (the
//! events after every query was registered and in the grid: the clock restarts there, so
//! initial results are not counted against the writes).

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use hdrhistogram::Histogram;
use livegrid_engine::memory::SharedMemory;
use livegrid_engine::{ClusterConfig, Engine, EngineConfig, EngineEvent, Message, QueryKey, Recycler};
use livegrid_matcher::QuerySpec;
use livegrid_protocol::{Frame, extjson};
use serde_json::Value;

use crate::cli::ReplayArgs;
use crate::source::replay::ReplaySource;
use crate::source::{Pulled, Source};

/// Exit status for unreadable input files.
const EXIT_BAD_INPUT: u8 = 2;
/// Exit status for failures while running.
const EXIT_FAILED: u8 = 1;

/// A query of the queries file.
#[derive(Debug, Clone)]
pub struct ReplayQuery {
    /// The subscription id.
    pub id: String,
    /// The namespace.
    pub ns: String,
    /// The query.
    pub spec: QuerySpec,
    /// Events applied before it is registered.
    pub after: u64,
}

/// Runs the command.
pub fn run(args: &ReplayArgs) -> ExitCode {
    match execute(args) {
        Ok(summary) => {
            eprintln!("{summary}");
            ExitCode::SUCCESS
        }
        Err(ReplayError::Input(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(EXIT_BAD_INPUT)
        }
        Err(ReplayError::Failed(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// An input file is missing or malformed.
    #[error("{0}")]
    Input(String),
    /// The engine or the output failed.
    #[error("{0}")]
    Failed(String),
}

fn cluster(args: &ReplayArgs) -> Result<Option<ClusterConfig>, ReplayError> {
    let Some(hostfile) = &args.hostfile else { return Ok(None) };
    super::read_hostfile(hostfile, args.process).map(Some).map_err(ReplayError::Input)
}

/// Runs a replay and returns its summary line.
pub fn execute(args: &ReplayArgs) -> Result<String, ReplayError> {
    let config = EngineConfig {
        shape: args.grid,
        cluster: cluster(args)?,
        retention: args.retention,
        retention_bytes: args.retention_bytes,
        slack: args.slack,
        ..Default::default()
    };
    let memory = Arc::new(SharedMemory::default());
    if config.cluster.as_ref().is_some_and(|c| c.process != 0) {
        // Other processes only lend their workers; process 0 reads the files and writes.
        let engine = Engine::start(config, memory).map_err(|e| ReplayError::Failed(e.to_string()))?;
        engine.close();
        let sent = engine.cluster_bytes_sent();
        return Ok(
            serde_json::json!({"process": args.process, "role": "worker", "cluster_bytes_sent": sent}).to_string()
        );
    }
    let (events_path, queries_path, out_path) = match (&args.events, &args.queries, &args.out) {
        (Some(e), Some(q), Some(o)) => (e, q, o),
        _ => return Err(ReplayError::Input("--events, --queries and --out are required (on process 0)".into())),
    };
    let mut queries = read_queries(queries_path)?;
    queries.sort_by_key(|q| q.after);
    let mut source = ReplaySource::open(events_path).map_err(|e| ReplayError::Input(e.to_string()))?;
    if let Some(rate) = args.rate {
        if !ReplaySource::valid_rate(rate) {
            return Err(ReplayError::Input(format!(
                "--rate must be a positive number of events per second, found {rate}"
            )));
        }
        source = source.with_rate(rate);
    }

    let engine = Engine::start(config, source.snapshots()).map_err(|e| ReplayError::Failed(e.to_string()))?;
    let out = File::create(out_path).map_err(|e| ReplayError::Input(format!("{}: {e}", out_path.display())))?;
    let messages = engine.messages().clone();
    let recycler = engine.recycler().clone();
    // Each subscription's id by engine key, known before its first message can arrive.
    let names: Arc<DashMap<QueryKey, Arc<str>>> = Arc::new(DashMap::new());
    let writer = {
        let names = names.clone();
        std::thread::Builder::new()
            .name("livegrid-writer".into())
            .spawn(move || write_messages(&messages, &recycler, &names, out))
            .map_err(|e| ReplayError::Failed(format!("starting the output writer: {e}")))?
    };

    let mut next_query = 0;
    let register_due = |applied: u64, next_query: &mut usize, engine: &Engine| -> Result<(), ReplayError> {
        while *next_query < queries.len() && queries[*next_query].after <= applied {
            let q = &queries[*next_query];
            let bad = |e: String| ReplayError::Input(format!("query {:?}: {e}", q.id));
            let query = livegrid_matcher::Query::compile(&q.spec).map_err(|e| bad(format!("bad query: {e}")))?;
            let key = engine.reserve_key();
            names.insert(key, Arc::from(q.id.as_str()));
            engine.register_as(key, &q.ns, &q.spec, &query).map_err(|e| bad(e.to_string()))?;
            *next_query += 1;
        }
        Ok(())
    };
    register_due(0, &mut next_query, &engine)?;
    // Queries registered before the first event are in the grid before the clock starts: the
    // figures are about events, not registrations (those registered later are timed).
    if !engine.settle(Duration::from_secs(600)) {
        return Err(ReplayError::Failed("the engine did not take the queries within 10 minutes".into()));
    }
    let started = Instant::now();
    // The writes-only phase: from when every query is registered and in the grid.
    let mut writes_only = (next_query == queries.len()).then_some((started, 0u64));
    loop {
        // A batch ends where the next query is due, so that it sees exactly `after` events.
        let until_query = queries.get(next_query).map_or(u64::MAX, |q| q.after.saturating_sub(source.applied()));
        let max = (args.batch as u64).min(until_query).max(1) as usize;
        match source.pull(max, Duration::from_millis(1)).map_err(|e| ReplayError::Input(e.to_string()))? {
            Pulled::Events(events) => {
                engine.submit(events).map_err(|e| ReplayError::Failed(e.to_string()))?;
                register_due(source.applied(), &mut next_query, &engine)?;
                if writes_only.is_none() && next_query == queries.len() {
                    if !engine.settle(Duration::from_secs(600)) {
                        return Err(ReplayError::Failed(
                            "the engine did not take the queries within 10 minutes".into(),
                        ));
                    }
                    writes_only = Some((Instant::now(), source.applied()));
                }
            }
            Pulled::Idle => {}
            Pulled::Ended => break,
            // Replay files have nothing to lose.
            Pulled::Lost { .. } => {}
        }
    }
    register_due(u64::MAX, &mut next_query, &engine)?;
    if !engine.settle(Duration::from_secs(600)) {
        return Err(ReplayError::Failed("the engine did not finish within 10 minutes".into()));
    }
    let seconds = started.elapsed().as_secs_f64();
    let writes_only = writes_only.map(|(from, applied)| (source.applied() - applied, from.elapsed().as_secs_f64()));
    engine.close();
    let sent = engine.cluster_bytes_sent();
    drop(engine);
    let stats = writer.join().map_err(|_| ReplayError::Failed("output writer panicked".into()))??;
    let totals = Totals { events: source.applied(), skipped: source.skipped(), queries: queries.len(), seconds, sent };
    Ok(summary(&totals, &stats, writes_only))
}

fn read_lines(path: &Path) -> Result<Vec<String>, ReplayError> {
    let file = File::open(path).map_err(|e| ReplayError::Input(format!("{}: {e}", path.display())))?;
    BufReader::new(file)
        .lines()
        .collect::<Result<_, _>>()
        .map_err(|e| ReplayError::Input(format!("{}: {e}", path.display())))
}

/// Reads the queries file.
pub fn read_queries(path: &Path) -> Result<Vec<ReplayQuery>, ReplayError> {
    let mut queries = Vec::new();
    for (index, line) in read_lines(path)?.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |message: String| ReplayError::Input(format!("{}:{}: {message}", path.display(), index + 1));
        let value: Value = serde_json::from_str(line).map_err(|e| at(format!("invalid json: {e}")))?;
        queries.push(parse_query(value).map_err(at)?);
    }
    Ok(queries)
}

fn parse_query(value: Value) -> Result<ReplayQuery, String> {
    let Value::Object(mut fields) = value else { return Err("a query must be a json object".into()) };
    let id = match fields.remove("id") {
        Some(Value::String(s)) => s,
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err("\"id\" is required (string or number)".into()),
    };
    let ns = match fields.remove("ns") {
        Some(Value::String(s)) if s.contains('.') => s,
        _ => return Err("\"ns\" is required, as \"db.collection\"".into()),
    };
    let doc = |name: &str, v: Value| extjson::document_from_json(v).map_err(|e| format!("\"{name}\": {e}"));
    let count = |name: &str, v: Option<Value>| -> Result<Option<u64>, String> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => {
                n.as_u64().map(Some).ok_or_else(|| format!("\"{name}\" must be a non-negative integer"))
            }
            Some(_) => Err(format!("\"{name}\" must be a non-negative integer")),
        }
    };
    let filter = fields.remove("filter").map(|v| doc("filter", v)).transpose()?.unwrap_or_default();
    let sort = fields.remove("sort").filter(|v| !v.is_null()).map(|v| doc("sort", v)).transpose()?;
    let projection = fields.remove("projection").filter(|v| !v.is_null()).map(|v| doc("projection", v)).transpose()?;
    let skip = count("skip", fields.remove("skip"))?.unwrap_or(0);
    let limit = count("limit", fields.remove("limit"))?;
    let after = count("after", fields.remove("after"))?.unwrap_or(0);
    if let Some(unknown) = fields.keys().next() {
        return Err(format!("unknown field {unknown:?}"));
    }
    Ok(ReplayQuery { id, ns, spec: QuerySpec { filter, sort, skip, limit, projection }, after })
}

/// Output bytes gathered before one write to the file.
const OUTPUT_BUFFER: usize = 1 << 20;

/// Latencies are counted up to an hour.
const MAX_LATENCY_MICROS: u64 = 3_600_000_000;

/// What the writer saw.
#[derive(Debug)]
pub struct OutputStats {
    results: u64,
    deltas: u64,
    /// Write-to-delta latencies in microseconds (3 significant digits, constant memory).
    latencies: Histogram<u64>,
}

impl Default for OutputStats {
    fn default() -> Self {
        OutputStats { results: 0, deltas: 0, latencies: Histogram::new(3).expect("3 significant digits are valid") }
    }
}

/// Writes every message, one JSON line each, with the same encoder as the server: each
/// message is a small header around documents encoded once on the grid.
fn write_messages(
    messages: &crossbeam_channel::Receiver<EngineEvent>,
    recycler: &Recycler,
    names: &DashMap<QueryKey, Arc<str>>,
    out: File,
) -> Result<OutputStats, ReplayError> {
    let mut out = out;
    let mut stats = OutputStats::default();
    let failed = |e: std::io::Error| ReplayError::Failed(format!("writing output: {e}"));
    // Lines are written straight into one buffer, flushed at about a mebibyte.
    let mut buffer = Vec::with_capacity(OUTPUT_BUFFER + 64 * 1024);
    // The subscriptions' ids, copied from the shared map once each (no lock per message).
    let mut known: rustc_hash::FxHashMap<QueryKey, Arc<str>> = Default::default();
    for event in messages {
        let EngineEvent::Messages(mut batch) = event else { continue };
        for message in batch.drain(..) {
            let Message { key, frame, latency } = message;
            match &frame {
                Frame::Result(_) => stats.results += 1,
                Frame::Delta(_) => stats.deltas += 1,
            }
            if let Some(latency) = latency {
                // The histogram grows to any value up to an hour; beyond, it counts as an hour.
                let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).min(MAX_LATENCY_MICROS);
                stats.latencies.record(micros).map_err(|e| ReplayError::Failed(format!("latency histogram: {e}")))?;
            }
            let name =
                known.entry(key).or_insert_with(|| names.get(&key).map(|n| n.clone()).unwrap_or_else(|| Arc::from("")));
            frame.write_json(name, None, &mut buffer);
            buffer.push(b'\n');
            if buffer.len() >= OUTPUT_BUFFER {
                out.write_all(&buffer).map_err(failed)?;
                buffer.clear();
            }
        }
        recycler.give(batch);
    }
    out.write_all(&buffer).map_err(failed)?;
    out.flush().map_err(failed)?;
    Ok(stats)
}

/// What a replay did, for its summary.
struct Totals {
    events: u64,
    skipped: u64,
    queries: usize,
    seconds: f64,
    /// Bytes sent to the other processes of a cluster.
    sent: u64,
}

/// The summary line; `writes_only`: events and seconds after every query was registered.
fn summary(totals: &Totals, stats: &OutputStats, writes_only: Option<(u64, f64)>) -> String {
    let Totals { events, skipped, queries, seconds, sent } = *totals;
    let latencies = &stats.latencies;
    let percentile =
        |p: f64| -> Option<f64> { (!latencies.is_empty()).then(|| latencies.value_at_quantile(p) as f64 / 1000.0) };
    let (writes_only_events, writes_only_seconds) = writes_only.unwrap_or((0, 0.0));
    serde_json::json!({
        "writes_only_events": writes_only_events,
        "writes_only_events_per_sec": if writes_only_seconds > 0.0 {
            (writes_only_events as f64 / writes_only_seconds).round()
        } else {
            0.0
        },
        "cluster_bytes_sent": sent,
        "events": events,
        "skipped": skipped,
        "queries": queries,
        "results": stats.results,
        "deltas": stats.deltas,
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "events_per_sec": if seconds > 0.0 { (events as f64 / seconds).round() } else { 0.0 },
        "deltas_per_sec": if seconds > 0.0 { (stats.deltas as f64 / seconds).round() } else { 0.0 },
        "p50_latency_ms": percentile(0.5),
        "p99_latency_ms": percentile(0.99),
    })
    .to_string()
}
