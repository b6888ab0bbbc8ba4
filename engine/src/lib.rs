//! The matching grid of livegrid (see `DESIGN.md`).
#![forbid(missing_docs)]

pub mod aggregation;
pub mod doc_id;
pub mod engine;
pub mod event;
pub mod frames;
pub mod grid;
pub mod live_pipeline;
pub mod matching;
pub mod memory;
pub mod query_index;
pub mod records;
pub mod retention;
pub mod shrink;
pub mod slots;
pub mod snapshot;
pub mod subscription;
pub mod window;
pub mod wire;

pub use engine::{
    ClusterConfig, DEFAULT_FORWARD_CAPACITY, DEFAULT_RETENTION_BYTES, Engine, EngineConfig, EngineError, EngineEvent,
    Message, OUTPUT_BATCH, Recycler,
};
pub use event::{ChangeEvent, ChangeOp};
pub use grid::GridShape;
pub use query_index::QueryKey;
pub use records::home_process;
pub use snapshot::{Snapshot, SnapshotError, SnapshotSource};
