//! The pump: one thread that pulls batches from the [`Source`] and submits them to the
//! engine, in order. `Engine::submit` waits while the grid has too much in flight, and while
//! it waits the source is not pulled: that is how a fast producer is slowed down.
//!
//! The pump ends when the source ends, when it is asked to stop, or on a failure (a source
//! error or an engine that refuses events); a failure fails the server's health, because
//! from then on live results would silently fall behind the data.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use livegrid_engine::Engine;

use super::{Pulled, Source, SourceStats};
use crate::health::Health;

/// Events pulled at most per batch.
pub const MAX_BATCH: usize = 1024;
/// How long one pull waits for events before the pump looks at its stop flag again.
const WAIT: Duration = Duration::from_millis(50);

/// A running pump.
pub struct Pump {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<SourceStats>,
}

impl Pump {
    /// Starts pumping `source` into `engine` on a thread of its own.
    pub fn start(mut source: Box<dyn Source>, engine: Arc<Engine>, health: Arc<Health>) -> std::io::Result<Pump> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let stats = Arc::new(SourceStats::default());
        let reported = stats.clone();
        let thread =
            std::thread::Builder::new().name(format!("livegrid-source-{}", source.name())).spawn(move || {
                let name = source.name();
                let mut second = (Instant::now(), 0u64);
                while !stopping.load(Ordering::Acquire) {
                    let pulled = source.pull(MAX_BATCH, WAIT);
                    if second.0.elapsed() >= Duration::from_secs(1) {
                        reported.rate.store(second.1, Ordering::Relaxed);
                        second = (Instant::now(), 0);
                    }
                    match pulled {
                        Ok(Pulled::Events(events)) => {
                            let count = events.len() as u64;
                            let last = events.last().map(|e| e.position);
                            if let Err(e) = engine.submit(events) {
                                health.fail(format!("the engine refused events of the {name} source: {e}"));
                                return;
                            }
                            second.1 += count;
                            reported.events.fetch_add(count, Ordering::Relaxed);
                            metrics::counter!("livegrid_source_events", "source" => name).increment(count);
                            if let Some(seconds) = last.and_then(|p| source.event_seconds(p)) {
                                reported.last_event_seconds.store(seconds, Ordering::Relaxed);
                                let lag = reported.lag_seconds().unwrap_or(0);
                                metrics::gauge!("livegrid_source_lag_seconds", "source" => name).set(lag as f64);
                            }
                        }
                        Ok(Pulled::Idle) => {}
                        Ok(Pulled::Lost { namespaces, reason }) => {
                            let concerned = |ns: &str| namespaces.as_deref().is_none_or(|n| super::in_scope(ns, n));
                            match engine.end_subscriptions(concerned, &reason) {
                                Ok(ended) => {
                                    tracing::warn!(source = name, ended, reason = %reason, "subscriptions ended")
                                }
                                Err(e) => {
                                    health.fail(format!("the engine could not end subscriptions after {reason}: {e}"));
                                    return;
                                }
                            }
                        }
                        Ok(Pulled::Ended) => {
                            tracing::info!(source = name, "source ended");
                            return;
                        }
                        Err(e) => {
                            tracing::error!(source = name, error = %e, "source failed");
                            health.fail(format!("the {name} source failed: {e}"));
                            return;
                        }
                    }
                }
            })?;
        Ok(Pump { stop, thread: Some(thread), stats })
    }

    /// What the pump reports about its source.
    pub fn stats(&self) -> Arc<SourceStats> {
        self.stats.clone()
    }

    /// Waits for the source to end by itself (the store ends once closed and drained).
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// Stops after the batch in hand and waits for the thread.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        self.join();
    }
}
