//! Sources of change events: where writes come from (a recorded change stream today; the
//! embedded store and MongoDB's change stream next), and how they become the engine's
//! [`livegrid_engine::ChangeEvent`]s.

pub mod change_stream_event;
