//! Snapshot reads: the engine's only way back to the data, implemented by whoever owns it
//! (the embedded store, MongoDB, the replay harness).

use bson::Document;
use livegrid_matcher::{Query, QuerySpec};
use livegrid_protocol::Position;

/// A consistent read of a query's result.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Matching documents, whole (not projected). For a windowed query, the first `k` in
    /// sort order; otherwise all of them, in any order.
    pub docs: Vec<Document>,
    /// The position the read reflects: every write at or below it and none above.
    pub position: Position,
    /// Whether `docs` holds every matching document.
    pub complete: bool,
}

/// A snapshot read failed; the source's own error is kept as the cause.
#[derive(Debug, Clone, thiserror::Error)]
#[error("snapshot read failed: {0}")]
pub struct SnapshotError(#[source] pub std::sync::Arc<dyn std::error::Error + Send + Sync>);

impl SnapshotError {
    /// A snapshot error caused by `source`.
    pub fn new(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        SnapshotError(std::sync::Arc::new(source))
    }
}

/// Reads query results at a known position.
pub trait SnapshotSource: Send + Sync {
    /// Reads the result of `query` (compiled from `spec`) in namespace `ns`: with `k`, the
    /// first `k` matching documents in the query's sort order (ignoring its skip, limit and
    /// projection); without, every matching document. Sources that evaluate queries
    /// themselves use the compiled form; those that send them elsewhere (MongoDB) the spec.
    fn read(&self, ns: &str, spec: &QuerySpec, query: &Query, k: Option<usize>) -> Result<Snapshot, SnapshotError>;
}
