//! livegrid: the service around the pure core. Everything that touches the outside world
//! lives here: the command line, sources of change events (embedded store, MongoDB, replay
//! files), the HTTP/WebSocket server and its hub, cache invalidation and configuration.
//! Matching logic does not: it belongs to `livegrid-matcher` and `livegrid-engine`.

pub mod allocator;
pub mod auth;
pub mod budget;
pub mod cli;
pub mod commands;
pub mod health;
pub mod invalidation;
pub mod server;
pub mod source;
pub mod workload;
