//! `livegrid record`: captures a MongoDB deployment's change stream as the JSON lines that
//! `livegrid replay` and `serve --replay` read: one event per line, in relaxed Extended JSON,
//! as MongoDB emits it (with `fullDocument` looked up, and cluster times, so that positions
//! and transactions survive), so that benchmarks replay real production traffic.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::cli::RecordArgs;
use crate::source::mongodb::{MongoError, StreamReader, Watch};

/// Why recording failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The stream failed.
    #[error(transparent)]
    Mongo(#[from] MongoError),
    /// The output could not be written.
    #[error("writing {path}: {source}")]
    Output {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A flag is out of range.
    #[error("{0}")]
    Usage(String),
}

/// Runs the command: the summary (events, seconds) goes to stdout.
pub fn run(args: &RecordArgs) -> ExitCode {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // Ctrl-C ends the recording cleanly (what was written is flushed).
        let _ = ctrlc_handler(move || stop.store(true, Ordering::Release));
    }
    match record(args, &stop) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Records until `--events`, `--seconds` or `stop`; returns the summary line.
pub fn record(args: &RecordArgs, stop: &AtomicBool) -> Result<String, RecordError> {
    if let Some(seconds) = args.seconds
        && !(seconds.is_finite() && seconds > 0.0)
    {
        return Err(RecordError::Usage(format!("--seconds must be a positive number, found {seconds}")));
    }
    let watch = if args.watch.is_empty() { Watch::Deployment } else { Watch::Only(args.watch.clone()) };
    let mut reader = StreamReader::connect(&args.mongodb, watch)?;
    reader.set_full_document(args.full_document);
    reader.open(None)?;
    let failed = |source| RecordError::Output { path: args.out.display().to_string(), source };
    let mut out = BufWriter::new(File::create(&args.out).map_err(failed)?);
    let started = Instant::now();
    let deadline = args.seconds.map(|s| started + Duration::from_secs_f64(s));
    let limit = args.events.unwrap_or(u64::MAX);
    let mut events = 0u64;
    let mut last_flush = Instant::now();
    while events < limit && !stop.load(Ordering::Acquire) && deadline.is_none_or(|d| Instant::now() < d) {
        match reader.next_event()? {
            Some(raw) => {
                let line = livegrid_protocol::extjson::document_to_relaxed_json(&raw);
                writeln!(out, "{line}").map_err(failed)?;
                events += 1;
            }
            None => {
                if last_flush.elapsed() > Duration::from_secs(1) {
                    out.flush().map_err(failed)?;
                    last_flush = Instant::now();
                }
            }
        }
    }
    out.flush().map_err(failed)?;
    out.get_ref().sync_all().map_err(failed)?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(serde_json::json!({ "events": events, "seconds": (seconds * 1000.0).round() / 1000.0, "out": args.out.display().to_string() })
        .to_string())
}

/// Calls `on_interrupt` on SIGINT (Ctrl-C), on a thread of its own.
fn ctrlc_handler(on_interrupt: impl Fn() + Send + 'static) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("livegrid-record-signal".into()).spawn(move || {
        runtime.block_on(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                on_interrupt();
            }
        })
    })?;
    Ok(())
}
