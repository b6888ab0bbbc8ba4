//! The matching grid of livegrid (see the crate README and `DESIGN.md`).
#![forbid(missing_docs)]

pub mod doc_id;
pub mod event;
pub mod window;
pub mod wire;
