//! The hub: delivers the engine's messages to the WebSocket connections that subscribed.
//!
//! Every subscription is known to the engine by a process-wide name (`connection/id`); the
//! hub maps names to the connection's outgoing queue and the client's own id. Queues are
//! bounded: when a client does not read fast enough and its queue fills, the hub marks the
//! connection as overflowed and its session closes it with a reason, so the server's memory
//! stays bounded whatever clients do.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use dashmap::DashMap;
use livegrid_engine::EngineEvent;
use livegrid_protocol::ServerMessage;
use tokio::sync::mpsc;

/// A connection's side of the hub.
#[derive(Debug)]
pub struct Outbox {
    /// Messages for the client, as JSON text.
    pub queue: mpsc::Sender<String>,
    /// Set when a message could not be queued: the session must close.
    pub overflowed: AtomicBool,
    /// Wakes the session when `overflowed` is set.
    pub overflow: tokio::sync::Notify,
}

struct Route {
    outbox: Arc<Outbox>,
    client_id: String,
}

/// Routes engine messages to connections.
#[derive(Default)]
pub struct Hub {
    routes: DashMap<String, Route>,
}

impl Hub {
    /// Routes the messages of engine subscription `name` to `outbox`, as `client_id`.
    pub fn add(&self, name: String, outbox: Arc<Outbox>, client_id: String) {
        self.routes.insert(name, Route { outbox, client_id });
    }

    /// Stops routing `name`.
    pub fn remove(&self, name: &str) {
        self.routes.remove(name);
    }

    /// How many subscriptions are routed.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether no subscription is routed.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Delivers engine events until the engine stops (run on a thread of its own).
    pub fn run(&self, events: crossbeam_channel::Receiver<EngineEvent>) {
        for event in events {
            let EngineEvent::Message { mut message, .. } = event else { continue };
            let name = match &message {
                ServerMessage::Result(r) => r.id.clone(),
                ServerMessage::Delta(d) => d.id.clone(),
                _ => continue,
            };
            let Some(route) = self.routes.get(&name) else { continue };
            match &mut message {
                ServerMessage::Result(r) => r.id = route.client_id.clone(),
                ServerMessage::Delta(d) => d.id = route.client_id.clone(),
                _ => {}
            }
            if route.outbox.queue.try_send(message.to_json()).is_err()
                && !route.outbox.overflowed.swap(true, Ordering::AcqRel)
            {
                route.outbox.overflow.notify_one();
            }
        }
    }
}
