//! The hub: delivers the engine's messages to the WebSocket connections that subscribed, and
//! keeps what resuming a subscription needs.
//!
//! Every subscription is known to the engine by a process-wide name; the hub maps names to
//! routes: the connection's outgoing queue (none while detached), the client's id for it, the
//! resume token, and a bounded buffer of its latest messages.
//!
//! # Backpressure
//! Queues are bounded: when a client does not read fast enough and its queue fills, the hub
//! marks the connection as overflowed and its session closes it with a reason, so the server's
//! memory stays bounded whatever clients do.
//!
//! # Resume
//! When a connection drops, its subscriptions are detached, not ended: the engine keeps them
//! and the hub keeps buffering their messages (at most `buffer` per subscription) for a grace
//! window. A subscribe with `{"resume": {"token", "seq"}}` reattaches the subscription to the
//! new connection and sends exactly the messages after `seq`, continuing the numbering; if the
//! buffer no longer holds all of them, the caller starts a fresh subscription instead.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use livegrid_engine::{EngineEvent, QueryKey};
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

impl Outbox {
    fn deliver(&self, json: String) {
        let queued = self.queue.max_capacity() - self.queue.capacity();
        metrics::histogram!("livegrid_outbox_depth").record(queued as f64);
        if self.queue.try_send(json).is_err() && !self.overflowed.swap(true, Ordering::AcqRel) {
            self.overflow.notify_one();
        }
    }
}

struct Route {
    key: QueryKey,
    token: String,
    outbox: Option<Arc<Outbox>>,
    client_id: String,
    /// The latest messages, oldest first.
    buffer: VecDeque<ServerMessage>,
    last_seq: u64,
    detached_at: Option<Instant>,
}

/// A resumed subscription.
pub struct Resumed {
    /// The engine's name of the subscription.
    pub name: String,
    /// The engine's key.
    pub key: QueryKey,
}

/// Routes engine messages to connections.
pub struct Hub {
    routes: DashMap<String, Mutex<Route>>,
    tokens: DashMap<String, String>,
    buffer: usize,
    instance: String,
    next_token: AtomicU64,
}

impl Hub {
    /// A hub keeping `buffer` messages per subscription for resuming.
    pub fn new(buffer: usize) -> Self {
        Hub {
            routes: DashMap::new(),
            tokens: DashMap::new(),
            buffer,
            instance: bson::oid::ObjectId::new().to_hex(),
            next_token: AtomicU64::new(1),
        }
    }

    /// Routes the messages of engine subscription `name` (key `key`) to `outbox`, as
    /// `client_id`.
    pub fn add(&self, name: String, key: QueryKey, outbox: Arc<Outbox>, client_id: String) {
        let token = format!("{}.{}", self.instance, self.next_token.fetch_add(1, Ordering::Relaxed));
        self.tokens.insert(token.clone(), name.clone());
        let route = Route {
            key,
            token,
            outbox: Some(outbox),
            client_id,
            buffer: VecDeque::new(),
            last_seq: 0,
            detached_at: None,
        };
        self.routes.insert(name, Mutex::new(route));
    }

    /// Sets the engine key of `name` once registration returned it.
    pub fn set_key(&self, name: &str, key: QueryKey) {
        if let Some(route) = self.routes.get(name) {
            route.lock().expect("route lock").key = key;
        }
    }

    /// Removes the subscription a token names, returning its engine key.
    pub fn take_token(&self, token: &str) -> Option<QueryKey> {
        let (_, name) = self.tokens.remove(token)?;
        let (_, route) = self.routes.remove(&name)?;
        Some(route.into_inner().expect("route lock").key)
    }

    /// Stops routing `name`.
    pub fn remove(&self, name: &str) {
        if let Some((_, route)) = self.routes.remove(name) {
            self.tokens.remove(&route.into_inner().expect("route lock").token);
        }
    }

    /// Detaches `name` from its connection: messages are buffered for a later resume.
    pub fn detach(&self, name: &str) {
        if let Some(route) = self.routes.get(name) {
            let mut route = route.lock().expect("route lock");
            route.outbox = None;
            route.detached_at = Some(Instant::now());
        }
    }

    /// Reattaches the subscription of `token` to `outbox` as `client_id`, sending the messages
    /// after `seq`. `None` when the token is unknown or the missed messages are not all
    /// buffered any more.
    pub fn resume(&self, token: &str, seq: u64, outbox: &Arc<Outbox>, client_id: &str) -> Option<Resumed> {
        let name = self.tokens.get(token)?.clone();
        let route = self.routes.get(&name)?;
        let mut route = route.lock().expect("route lock");
        let first = route.buffer.front().map_or(route.last_seq + 1, seq_of);
        if seq > route.last_seq || first > seq + 1 {
            return None;
        }
        route.client_id = client_id.to_string();
        for message in route.buffer.iter().filter(|m| seq_of(m) > seq) {
            outbox.deliver(named(message.clone(), client_id, None).to_json());
        }
        route.outbox = Some(outbox.clone());
        route.detached_at = None;
        Some(Resumed { name, key: route.key })
    }

    /// The subscriptions detached for longer than `grace`, removed from the hub; the caller
    /// ends them in the engine.
    pub fn expire(&self, grace: Duration) -> Vec<QueryKey> {
        let expired: Vec<String> = self
            .routes
            .iter()
            .filter(|r| r.lock().expect("route lock").detached_at.is_some_and(|at| at.elapsed() >= grace))
            .map(|r| r.key().clone())
            .collect();
        expired
            .into_iter()
            .filter_map(|name| self.routes.remove(&name))
            .map(|(_, route)| {
                let route = route.into_inner().expect("route lock");
                self.tokens.remove(&route.token);
                route.key
            })
            .collect()
    }

    /// How many subscriptions are routed (attached or detached).
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
            let EngineEvent::Message { message, latency, .. } = event else { continue };
            let name = match &message {
                ServerMessage::Result(r) => r.id.clone(),
                ServerMessage::Delta(d) => d.id.clone(),
                _ => continue,
            };
            let Some(route) = self.routes.get(&name) else { continue };
            let mut route = route.lock().expect("route lock");
            let message = named(message, &route.client_id, Some(&route.token));
            if let Some(latency) = latency {
                metrics::histogram!("livegrid_event_to_delta_seconds").record(latency.as_secs_f64());
                metrics::counter!("livegrid_deltas_out").increment(1);
            }
            if let Some(outbox) = &route.outbox {
                outbox.deliver(message.to_json());
            }
            route.last_seq = seq_of(&message);
            route.buffer.push_back(message);
            if route.buffer.len() > self.buffer {
                route.buffer.pop_front();
            }
        }
    }
}

fn seq_of(message: &ServerMessage) -> u64 {
    match message {
        ServerMessage::Result(r) => r.seq,
        ServerMessage::Delta(d) => d.seq,
        _ => 0,
    }
}

/// The message as the client knows it: its id, and on results the resume token.
fn named(mut message: ServerMessage, client_id: &str, token: Option<&str>) -> ServerMessage {
    match &mut message {
        ServerMessage::Result(r) => {
            r.id = client_id.to_string();
            if let Some(token) = token {
                r.token = Some(token.to_string());
            }
        }
        ServerMessage::Delta(d) => d.id = client_id.to_string(),
        _ => {}
    }
    message
}
