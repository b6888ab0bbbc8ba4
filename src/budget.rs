//! The memory budget for subscriptions: what their compiled queries, windows and resume
//! buffers hold, counted against one limit for the whole server. Client subscriptions (the
//! hub) and the cache's watches (`crate::invalidation`) share it.
//!
//! New subscriptions are refused (`over_capacity`) while the budget is spent, and so is an
//! initial result that does not fit it; subscriptions that exist keep working, and what their
//! resume buffers hold is counted as it grows and shrinks. Windows and compiled queries are
//! estimates; outgoing queues are bounded per connection (`--queue-bytes`) instead.
//! `/metrics` shows the figure as `livegrid_subscription_memory_bytes`.

use std::sync::atomic::{AtomicUsize, Ordering};

use livegrid_matcher::Query;

/// Bytes charged per window slot of a subscription (ids and keys; the documents themselves
/// are shared).
const WINDOW_SLOT_BYTES: usize = 256;
/// Bytes charged per subscription whatever its query (routes, names, grid state).
const SUBSCRIPTION_BASE_BYTES: usize = 2048;

/// What a subscription to `query` is charged: a fixed part, its compiled query and its window
/// (with `slack` documents beyond the visible end).
pub fn subscription_charge(query: &Query, slack: usize) -> usize {
    let window = livegrid_engine::window::capacity(query, slack).unwrap_or(0);
    SUBSCRIPTION_BASE_BYTES
        .saturating_add(query.memory_estimate())
        .saturating_add(window.saturating_mul(WINDOW_SLOT_BYTES))
}

/// A shared byte budget.
#[derive(Debug)]
pub struct MemoryBudget {
    used: AtomicUsize,
    limit: usize,
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        MemoryBudget { used: AtomicUsize::new(0), limit }
    }

    /// Takes `bytes` if they fit.
    pub fn try_charge(&self, bytes: usize) -> bool {
        let taken = self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            used.checked_add(bytes).filter(|total| *total <= self.limit)
        });
        self.report();
        taken.is_ok()
    }

    /// Takes `bytes` whether or not they fit (memory already held).
    pub fn charge(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
        self.report();
    }

    /// Gives `bytes` back.
    pub fn release(&self, bytes: usize) {
        let _ = self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| Some(used.saturating_sub(bytes)));
        self.report();
    }

    /// Bytes in use.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    fn report(&self) {
        metrics::gauge!("livegrid_subscription_memory_bytes").set(self.used() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_within_the_limit() {
        let budget = MemoryBudget::new(100);
        assert!(budget.try_charge(60));
        assert!(!budget.try_charge(50));
        budget.charge(50);
        assert_eq!(budget.used(), 110);
        assert!(!budget.try_charge(1));
        budget.release(110);
        assert!(budget.try_charge(100));
        budget.release(1000);
        assert_eq!(budget.used(), 0);
    }
}
