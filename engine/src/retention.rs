//! The retention buffer: the most recent writes fed to the grid, kept so that a subscription
//! whose snapshot was read before the grid passed some writes can have exactly those
//! replayed. It is bounded in writes and in bytes (each write charged the rough heap size of
//! its document), whichever is reached first, so large documents cannot make it hold more
//! memory than its byte bound. Gauges: `livegrid_retention_events`, `livegrid_retention_bytes`.
//!
//! # Invariant
//! The buffer holds every write fed after `evicted_up_to`, in position order. A snapshot read
//! at position P can be caught up if and only if `P >= evicted_up_to`; older snapshots fail
//! with a distinct error ([`crate::EngineError::StaleSnapshot`]) so that the caller reads
//! again.

use std::collections::VecDeque;
use std::sync::Arc;

use livegrid_protocol::Position;

use crate::event::ChangeEvent;

/// Bytes a retained write costs besides its document: the event, its namespace, the slot.
const EVENT_BYTES: usize = std::mem::size_of::<ChangeEvent>() + 64;

/// A bounded buffer of recent writes.
pub struct Retention {
    /// Each write with when it entered and what it is charged.
    events: VecDeque<(Arc<ChangeEvent>, u64, usize)>,
    capacity: usize,
    max_bytes: usize,
    bytes: usize,
    evicted_up_to: Position,
    last: Position,
}

impl Retention {
    /// A buffer keeping the last `capacity` writes, as many as fit in `max_bytes` (the last
    /// write is kept whatever its size).
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        Retention {
            events: VecDeque::new(),
            capacity: capacity.max(1),
            max_bytes,
            bytes: 0,
            evicted_up_to: Position::ZERO,
            last: Position::ZERO,
        }
    }

    /// Records a write as fed, with when it entered the engine (nanoseconds since start).
    pub fn push(&mut self, event: Arc<ChangeEvent>, at: u64) {
        debug_assert!(event.position > self.last || self.last.is_zero(), "positions only grow");
        self.last = self.last.max(event.position);
        let cost = EVENT_BYTES + event.ns.len() + event.doc.as_deref().map_or(0, livegrid_matcher::document_heap_bytes);
        self.bytes = self.bytes.saturating_add(cost);
        self.events.push_back((event, at, cost));
        while self.events.len() > self.capacity || (self.bytes > self.max_bytes && self.events.len() > 1) {
            let (evicted, _, cost) = self.events.pop_front().expect("non-empty");
            self.bytes -= cost;
            self.evicted_up_to = evicted.position;
        }
        metrics::gauge!("livegrid_retention_events").set(self.events.len() as f64);
        metrics::gauge!("livegrid_retention_bytes").set(self.bytes as f64);
    }

    /// The position of the last write fed.
    pub fn last_position(&self) -> Position {
        self.last
    }

    /// The writes after `position` with when they entered, or `None` when some of them were
    /// already evicted.
    pub fn since(&self, position: Position) -> Option<Vec<(Arc<ChangeEvent>, u64)>> {
        if position < self.evicted_up_to {
            return None;
        }
        let start = self.events.partition_point(|(e, _, _)| e.position <= position);
        Some(self.events.range(start..).map(|(e, at, _)| (e.clone(), *at)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ChangeOp;

    fn event(time: u64) -> Arc<ChangeEvent> {
        Arc::new(ChangeEvent {
            position: Position::new(time),
            ns: "db.c".into(),
            op: ChangeOp::Delete,
            id: bson::Bson::Int64(time as i64),
            doc: None,
        })
    }

    fn times(events: Vec<(Arc<ChangeEvent>, u64)>) -> Vec<(u64, u64)> {
        events.iter().map(|(e, at)| (e.position.time(), *at)).collect()
    }

    #[test]
    fn replays_exactly_what_follows_a_snapshot() {
        let mut r = Retention::new(3, usize::MAX);
        for p in [2, 4, 6, 8] {
            r.push(event(p), p * 10);
        }
        let at = Position::new;
        // 2 was evicted: a snapshot at 1 misses it, one at 2 or later does not.
        assert!(r.since(at(1)).is_none());
        assert_eq!(times(r.since(at(2)).unwrap()), vec![(4, 40), (6, 60), (8, 80)]);
        assert_eq!(times(r.since(at(5)).unwrap()), vec![(6, 60), (8, 80)]);
        // Inside a transaction: a snapshot at 4.1 follows 4.0.
        assert_eq!(times(r.since(Position::with_order(4, 1)).unwrap()), vec![(6, 60), (8, 80)]);
        assert!(r.since(at(8)).unwrap().is_empty());
        assert!(r.since(at(100)).unwrap().is_empty());
    }

    #[test]
    fn large_documents_evict_by_bytes() {
        let big = |time: u64| {
            let doc = bson::doc! {"_id": time as i64, "blob": "x".repeat(10_000)};
            Arc::new(ChangeEvent { doc: Some(Arc::new(doc)), ..(*event(time)).clone() })
        };
        let mut r = Retention::new(1_000, 25_000);
        for p in 1..=10 {
            r.push(big(p), p);
        }
        // Two 10 KB documents fit in 25 KB, a third does not.
        assert!(r.since(Position::new(7)).is_none());
        assert_eq!(times(r.since(Position::new(8)).unwrap()), vec![(9, 9), (10, 10)]);
        assert!(r.bytes <= 25_000);
        // One write larger than the bound is still kept: it is the last one.
        let mut r = Retention::new(1_000, 100);
        r.push(big(1), 1);
        assert_eq!(times(r.since(Position::ZERO).unwrap()), vec![(1, 1)]);
    }
}
