//! The commands of the `livegrid` binary, one module each.

pub mod match_docs;
pub mod record;
pub mod replay;
pub mod serve;
pub mod workload;
