//! Helpers shared by the engine's integration tests.

use std::thread::JoinHandle;

use livegrid_engine::{Engine, EngineEvent, QueryKey};
use livegrid_protocol::Frame;

/// Reads the engine's (bounded) output on a thread of its own until the engine shuts down,
/// returning every message with its subscription key: consumers must read concurrently.
pub fn collect_frames(engine: &Engine) -> JoinHandle<Vec<(QueryKey, Frame)>> {
    let messages = engine.messages().clone();
    std::thread::spawn(move || {
        let mut frames = Vec::new();
        for event in messages {
            if let EngineEvent::Messages(batch) = event {
                frames.extend(batch.into_iter().map(|m| (m.key, m.frame)));
            }
        }
        frames
    })
}
