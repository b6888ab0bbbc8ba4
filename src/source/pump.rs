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
use std::time::Duration;

use livegrid_engine::Engine;

use super::{Pulled, Source};
use crate::health::Health;

/// Events pulled at most per batch.
pub const MAX_BATCH: usize = 1024;
/// How long one pull waits for events before the pump looks at its stop flag again.
const WAIT: Duration = Duration::from_millis(50);

/// A running pump.
pub struct Pump {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Pump {
    /// Starts pumping `source` into `engine` on a thread of its own.
    pub fn start(mut source: Box<dyn Source>, engine: Arc<Engine>, health: Arc<Health>) -> std::io::Result<Pump> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread =
            std::thread::Builder::new().name(format!("livegrid-source-{}", source.name())).spawn(move || {
                let name = source.name();
                while !stopping.load(Ordering::Acquire) {
                    match source.pull(MAX_BATCH, WAIT) {
                        Ok(Pulled::Events(events)) => {
                            let count = events.len() as u64;
                            if let Err(e) = engine.submit(events) {
                                health.fail(format!("the engine refused events of the {name} source: {e}"));
                                return;
                            }
                            metrics::counter!("livegrid_source_events", "source" => name).increment(count);
                        }
                        Ok(Pulled::Idle) => {}
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
        Ok(Pump { stop, thread: Some(thread) })
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
