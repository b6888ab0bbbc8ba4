//! Helpers shared by the engine's integration tests (each test uses some of them).
#![allow(dead_code)]

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

/// xorshift64*: deterministic, so a failing seed can be replayed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}
