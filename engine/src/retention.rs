//! The retention buffer: the most recent writes fed to the grid, kept so that a subscription
//! whose snapshot was read before the grid passed some writes can have exactly those
//! replayed.
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

/// A bounded buffer of recent writes.
pub struct Retention {
    events: VecDeque<(Arc<ChangeEvent>, u64)>,
    capacity: usize,
    evicted_up_to: Position,
    last: Position,
}

impl Retention {
    /// A buffer keeping the last `capacity` writes.
    pub fn new(capacity: usize) -> Self {
        Retention {
            events: VecDeque::new(),
            capacity: capacity.max(1),
            evicted_up_to: Position::ZERO,
            last: Position::ZERO,
        }
    }

    /// Records a write as fed, with when it entered the engine (nanoseconds since start).
    pub fn push(&mut self, event: Arc<ChangeEvent>, at: u64) {
        debug_assert!(event.position > self.last || self.last.is_zero(), "positions only grow");
        self.last = self.last.max(event.position);
        self.events.push_back((event, at));
        while self.events.len() > self.capacity {
            let (evicted, _) = self.events.pop_front().expect("non-empty");
            self.evicted_up_to = evicted.position;
        }
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
        let start = self.events.partition_point(|(e, _)| e.position <= position);
        Some(self.events.range(start..).cloned().collect())
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
        let mut r = Retention::new(3);
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
}
