//! The hub: delivers the engine's messages to the WebSocket connections that subscribed, and
//! keeps what resuming a subscription needs.
//!
//! Every subscription is known to the engine by its key (an integer); the hub maps keys to
//! routes: the connection that owns the subscription and its outgoing queue (none while
//! detached), the client's id for it, the resume token with what the token is bound to, and
//! a bounded buffer of its latest messages.
//!
//! # Encoding
//! The engine hands over frames whose documents are already encoded, shared by every
//! subscription that shows them; the hub only writes each message's small header (the
//! client's id, `seq`, indexes) around those shared bytes.
//!
//! # Backpressure
//! Queues are bounded: when a client does not read fast enough and its queue fills, the hub
//! marks the connection as overflowed and its session closes it with a reason, so the server's
//! memory stays bounded whatever clients do.
//!
//! # Resume
//! A resume token is 128 bits from the operating system's CSPRNG: a bearer secret of its
//! subscription, never derived from counters or ids. It is bound to the namespace and the
//! canonical query (and, once authentication exists, to the principal that subscribed): a
//! resume succeeds only with all of them equal.
//!
//! When a connection drops, its subscriptions are detached, not ended: the engine keeps them
//! and the hub keeps buffering their messages (at most `buffer` per subscription) for a grace
//! window. A subscribe with `{"resume": {"token", "seq"}}` moves the subscription to the new
//! connection, even while the old one is still open (a client that switched networks), and
//! sends exactly the messages after `seq`, continuing the numbering. Ownership moves with it:
//! the old connection's later close or `unsubscribe` no longer touches the subscription. A
//! subscription only moves to a connection opened after the one holding it, so a resume that
//! arrives late on a connection the client has already abandoned cannot pull it back.
//!
//! A token that cannot be honoured (unknown, expired, bound to something else) or an
//! impossible `seq` is treated as no token: the caller starts a fresh subscription and nothing
//! else changes. Only when the token and binding are right but the buffer no longer covers the
//! missed messages does the old subscription end, replaced by the fresh one.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use livegrid_engine::{EngineEvent, Message, QueryKey, Recycler};
use livegrid_protocol::{ErrorCode, ErrorMessage, Frame, ServerMessage};
use tokio::sync::mpsc;

use crate::budget::MemoryBudget;
use crate::invalidation::Invalidator;

/// A connection's side of the hub: a queue bounded in messages and in bytes.
#[derive(Debug)]
pub struct Outbox {
    /// Messages for the client, as JSON text.
    pub queue: mpsc::Sender<String>,
    /// Set when a message could not be queued: the session must close.
    pub overflowed: AtomicBool,
    /// Wakes the session when `overflowed` is set.
    pub overflow: tokio::sync::Notify,
    /// Bytes queued and not yet taken by the session.
    queued_bytes: AtomicUsize,
    /// At most this many bytes queued.
    max_bytes: usize,
}

impl Outbox {
    /// An outbox queueing at most `capacity` messages and `max_bytes` bytes, and its
    /// receiving end.
    pub fn new(capacity: usize, max_bytes: usize) -> (Arc<Outbox>, mpsc::Receiver<String>) {
        let (queue, outgoing) = mpsc::channel(capacity);
        let outbox = Outbox {
            queue,
            overflowed: AtomicBool::new(false),
            overflow: tokio::sync::Notify::new(),
            queued_bytes: AtomicUsize::new(0),
            max_bytes,
        };
        (Arc::new(outbox), outgoing)
    }

    /// Queues a message, or marks the connection as too slow.
    pub fn deliver(&self, json: String) {
        let queued = self.queue.max_capacity() - self.queue.capacity();
        metrics::histogram!("livegrid_outbox_depth").record(queued as f64);
        let bytes = json.len();
        let fits = self.queued_bytes.fetch_add(bytes, Ordering::AcqRel) + bytes <= self.max_bytes;
        if !fits || self.queue.try_send(json).is_err() {
            self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            if !self.overflowed.swap(true, Ordering::AcqRel) {
                metrics::counter!("livegrid_slow_consumers_cut").increment(1);
                self.overflow.notify_one();
            }
        }
    }

    /// Records that the session took a message of `bytes` off the queue.
    pub fn taken(&self, bytes: usize) {
        self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// What a resume token is bound to: resuming needs all of it equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The namespace.
    pub ns: String,
    /// The query (filter, sort, skip, limit, projection) in canonical Extended JSON.
    pub query: String,
    /// Who subscribed. `None` until authentication exists; then a token resumes only for the
    /// principal that created it.
    pub principal: Option<String>,
}

/// A connection, as the owner of subscriptions.
pub type ConnectionId = u64;

struct Route {
    token: String,
    binding: Binding,
    owner: ConnectionId,
    outbox: Option<Arc<Outbox>>,
    client_id: String,
    /// The latest messages, oldest first, with their size in bytes.
    buffer: VecDeque<(Frame, usize)>,
    /// Bytes in `buffer`.
    buffered: usize,
    /// Bytes charged to the budget for the subscription itself.
    charge: usize,
    last_seq: u64,
    detached_at: Option<Instant>,
}

/// What became of a resume request.
pub enum Resume {
    /// The subscription with this key moved to the caller's connection; missed messages are
    /// queued.
    Resumed(QueryKey),
    /// The caller holds the subscription's token, but its missed messages are gone: the old
    /// subscription was removed from the hub and its engine key is returned to be ended.
    Replaced(QueryKey),
    /// The token is unusable for this request: start afresh; nothing was touched.
    Unusable,
    /// The token is another principal's: refuse (`unauthorized`); nothing was touched.
    Forbidden,
}

/// The server's subscription memory budget is spent.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the server's memory budget for subscriptions is spent")]
pub struct OverCapacity;

/// What a hub keeps per subscription, at most.
#[derive(Debug, Clone, Copy)]
pub struct HubLimits {
    /// Messages kept for resuming.
    pub messages: usize,
    /// Bytes of messages kept for resuming.
    pub bytes: usize,
    /// Bytes of an initial result; a larger one ends the subscription with
    /// `query_too_large`.
    pub result_bytes: usize,
}

/// Routes engine messages to connections.
pub struct Hub {
    routes: DashMap<QueryKey, Mutex<Route>>,
    tokens: DashMap<String, QueryKey>,
    limits: HubLimits,
    budget: Arc<MemoryBudget>,
    /// Where the messages of subscriptions without a route go: the cache watches.
    watches: Option<Arc<Invalidator>>,
}

/// Batches waiting for one hub shard at most.
const SHARD_QUEUE: usize = 64;

/// Work for one hub shard.
enum ShardWork {
    Messages(Vec<Message>),
    Ended { key: QueryKey, code: ErrorCode, message: String },
}

/// A fresh resume token: 128 bits from the operating system's CSPRNG, as hex.
fn new_token() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the operating system's random number generator failed");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Hub {
    /// A hub keeping `limits` per subscription for resuming, charging what subscriptions hold
    /// to `budget`.
    pub fn new(limits: HubLimits, budget: Arc<MemoryBudget>) -> Self {
        Hub { routes: DashMap::new(), tokens: DashMap::new(), limits, budget, watches: None }
    }

    /// Hands the messages of subscriptions the hub does not route (the cache's watches) to
    /// `invalidator`.
    pub fn with_invalidator(mut self, invalidator: Arc<Invalidator>) -> Self {
        self.watches = Some(invalidator);
        self
    }

    /// The subscriptions' memory budget.
    pub fn budget(&self) -> &MemoryBudget {
        &self.budget
    }

    /// Routes the messages of engine subscription `key` to `outbox` of connection `owner`, as
    /// `client_id`; its token is bound to `binding`. Charges `charge` bytes to the budget.
    pub fn add(
        &self,
        key: QueryKey,
        outbox: Arc<Outbox>,
        owner: ConnectionId,
        client_id: String,
        binding: Binding,
        charge: usize,
    ) -> Result<(), OverCapacity> {
        if !self.budget.try_charge(charge) {
            metrics::counter!("livegrid_subscriptions_refused").increment(1);
            return Err(OverCapacity);
        }
        let token = new_token();
        self.tokens.insert(token.clone(), key);
        let route = Route {
            token,
            binding,
            owner,
            outbox: Some(outbox),
            client_id,
            buffer: VecDeque::new(),
            buffered: 0,
            charge,
            last_seq: 0,
            detached_at: None,
        };
        self.routes.insert(key, Mutex::new(route));
        Ok(())
    }

    /// Forgets a route taken out of the map: its token and its memory.
    fn forget(&self, route: Mutex<Route>) -> Route {
        let route = route.into_inner().expect("route lock");
        self.tokens.remove(&route.token);
        self.budget.release(route.charge + route.buffered);
        route
    }

    /// Whether connection `owner` still owns `key` (it may have ended, or moved away).
    pub fn owns(&self, key: QueryKey, owner: ConnectionId) -> bool {
        self.routes.get(&key).is_some_and(|route| route.lock().expect("route lock").owner == owner)
    }

    /// Stops routing `key` if `owner` owns it; `true` when it did (the caller then ends the
    /// engine subscription).
    pub fn remove(&self, key: QueryKey, owner: ConnectionId) -> bool {
        let removed = self.routes.remove_if(&key, |_, route| route.lock().expect("route lock").owner == owner);
        removed.map(|(_, route)| self.forget(route)).is_some()
    }

    /// Detaches `key` from connection `owner`, if it still owns it: messages are buffered
    /// for a later resume.
    pub fn detach(&self, key: QueryKey, owner: ConnectionId) {
        if let Some(route) = self.routes.get(&key) {
            let mut route = route.lock().expect("route lock");
            if route.owner == owner {
                route.outbox = None;
                route.detached_at = Some(Instant::now());
            }
        }
    }

    /// Moves the subscription of `token` to `outbox` of connection `owner` as `client_id`,
    /// sending the messages after `seq` (see the module docs).
    pub fn resume(
        &self,
        token: &str,
        seq: u64,
        binding: &Binding,
        outbox: &Arc<Outbox>,
        owner: ConnectionId,
        client_id: &str,
    ) -> Resume {
        let Some(key) = self.tokens.get(token).map(|k| *k) else { return Resume::Unusable };
        let Some(entry) = self.routes.get(&key) else { return Resume::Unusable };
        let mut route = entry.lock().expect("route lock");
        if route.binding.principal != binding.principal {
            return Resume::Forbidden;
        }
        match resumable(&route, seq, binding, owner) {
            Some(true) => {}
            None => return Resume::Unusable,
            Some(false) => {
                // The missed messages are gone: replace the subscription, unless someone else
                // moved or ended it in the meantime (the check is repeated under the map's lock).
                drop(route);
                drop(entry);
                let removed = self.routes.remove_if(&key, |_, route| {
                    resumable(&route.lock().expect("route lock"), seq, binding, owner) == Some(false)
                });
                return match removed {
                    Some((_, route)) => {
                        self.forget(route);
                        Resume::Replaced(key)
                    }
                    None => Resume::Unusable,
                };
            }
        }
        route.client_id = client_id.to_string();
        for (frame, _) in route.buffer.iter().filter(|(f, _)| f.seq() > seq) {
            outbox.deliver(frame.to_json(client_id, None));
        }
        route.owner = owner;
        route.outbox = Some(outbox.clone());
        route.detached_at = None;
        Resume::Resumed(key)
    }

    /// The subscriptions detached for longer than `grace`, removed from the hub; the caller
    /// ends them in the engine.
    pub fn expire(&self, grace: Duration) -> Vec<QueryKey> {
        let expired: Vec<QueryKey> = self
            .routes
            .iter()
            .filter(|r| r.lock().expect("route lock").detached_at.is_some_and(|at| at.elapsed() >= grace))
            .map(|r| *r.key())
            .collect();
        expired
            .into_iter()
            .filter_map(|key| {
                self.routes.remove_if(&key, |_, r| {
                    r.lock().expect("route lock").detached_at.is_some_and(|at| at.elapsed() >= grace)
                })
            })
            .map(|(key, route)| {
                self.forget(route);
                key
            })
            .collect()
    }

    /// Ends every subscription: the server failed and its results can no longer be trusted
    /// (sessions tell their clients). Returns the engine keys.
    pub fn fail_all(&self) -> Vec<QueryKey> {
        let keys: Vec<QueryKey> = self.routes.iter().map(|r| *r.key()).collect();
        keys.into_iter()
            .filter_map(|key| self.routes.remove(&key))
            .map(|(key, route)| {
                self.forget(route);
                key
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

    /// Delivers engine events until the engine stops (run on a thread of its own); calls
    /// `failed` if the engine reports a failure, and `end` for subscriptions the hub ends
    /// itself (a result too large for the limits or the budget).
    ///
    /// The work is spread over `shards` threads: this one splits each batch by subscription
    /// (`key % shards`, so each subscription's messages stay in order on one thread) and hands
    /// the parts over bounded queues to shard threads, which encode and deliver them.
    pub fn run(
        &self,
        events: crossbeam_channel::Receiver<EngineEvent>,
        recycler: &Recycler,
        shards: usize,
        failed: impl Fn(String),
        end: impl Fn(QueryKey) + Sync,
    ) {
        let shards = shards.max(1);
        std::thread::scope(|scope| {
            let mut queues = Vec::with_capacity(shards);
            for shard in 0..shards {
                let (queue, work) = crossbeam_channel::bounded::<ShardWork>(SHARD_QUEUE);
                queues.push(queue);
                let end = &end;
                std::thread::Builder::new()
                    .name(format!("livegrid-hub-{shard}"))
                    .spawn_scoped(scope, move || {
                        for item in work {
                            match item {
                                ShardWork::Messages(mut batch) => {
                                    for message in batch.drain(..) {
                                        self.deliver(message, end);
                                    }
                                    recycler.give(batch);
                                }
                                ShardWork::Ended { key, code, message } => self.ended(key, code, message),
                            }
                        }
                    })
                    .expect("starting a hub thread");
            }
            let shard_of = |key: QueryKey| (key % shards as u64) as usize;
            // A shard whose queue is gone has panicked: its subscriptions hear nothing more.
            let lost = || failed("a hub thread stopped: deltas no longer reach clients".into());
            'events: for event in events {
                match event {
                    EngineEvent::Messages(mut batch) => {
                        // Batches go back to the engine once read (see `Recycler`).
                        let mut parts: Vec<Vec<Message>> = (0..shards).map(|_| Vec::new()).collect();
                        for message in batch.drain(..) {
                            let part = &mut parts[shard_of(message.key)];
                            if part.capacity() == 0 {
                                *part = recycler.take();
                            }
                            part.push(message);
                        }
                        recycler.give(batch);
                        for (shard, (queue, part)) in queues.iter().zip(parts).enumerate() {
                            if part.is_empty() {
                                continue;
                            }
                            // Waits while the shard is behind: the engine's output, and with it
                            // the grid, slows down instead of memory growing.
                            if queue.send(ShardWork::Messages(part)).is_err() {
                                lost();
                                break 'events;
                            }
                            metrics::gauge!("livegrid_hub_queue_depth", "shard" => shard.to_string())
                                .set(queue.len() as f64);
                        }
                    }
                    EngineEvent::Failed(reason) => failed(reason),
                    EngineEvent::Ended { key, code, message } => {
                        if queues[shard_of(key)].send(ShardWork::Ended { key, code, message }).is_err() {
                            lost();
                            break 'events;
                        }
                    }
                    EngineEvent::Processed(_) => {}
                }
            }
            // The engine stopped: the shards finish what they hold and end.
            drop(queues);
        });
    }

    /// The engine ended a subscription (its window could not be refilled): tell its client.
    fn ended(&self, key: QueryKey, code: ErrorCode, message: String) {
        let Some((_, route)) = self.routes.remove(&key) else {
            if let Some(watches) = &self.watches {
                watches.ended(key);
            }
            return;
        };
        let route = self.forget(route);
        if let Some(outbox) = &route.outbox {
            let error = ServerMessage::Error(ErrorMessage { id: Some(route.client_id.clone()), code, message });
            outbox.deliver(error.to_json());
        }
        metrics::gauge!("livegrid_subscriptions").decrement(1.0);
    }

    /// Delivers one message to its subscription's connection and resume buffer.
    fn deliver(&self, message: Message, end: &impl Fn(QueryKey)) {
        let Message { key, frame, latency } = message;
        let Some(entry) = self.routes.get(&key) else {
            match (&self.watches, &frame) {
                (Some(watches), Frame::Delta(delta)) => watches.changed(key, delta.position, !delta.more),
                // A watch's initial result must fit the same limits as a client's.
                (Some(watches), Frame::Result(_)) => {
                    let bytes = frame.shared_bytes();
                    let fits = bytes <= self.limits.result_bytes && self.budget.try_charge(bytes);
                    if fits {
                        self.budget.release(bytes);
                    } else if watches.refuse(key) {
                        end(key);
                    }
                }
                _ => {}
            }
            return;
        };
        let mut route = entry.lock().expect("route lock");
        if let Some(latency) = latency {
            metrics::histogram!("livegrid_event_to_delta_seconds").record(latency.as_secs_f64());
            metrics::counter!("livegrid_deltas_out").increment(1);
        }
        let json = frame.to_json(&route.client_id, Some(&route.token));
        let bytes = json.len();
        if let Frame::Result(_) = frame {
            // An initial result is charged before anyone holds on to it.
            let refused = if bytes > self.limits.result_bytes {
                Some((
                    ErrorCode::QueryTooLarge,
                    format!(
                        "the result is {bytes} bytes; a subscription may hold at most {}",
                        self.limits.result_bytes
                    ),
                ))
            } else if !self.budget.try_charge(bytes) {
                Some((
                    ErrorCode::OverCapacity,
                    "the server's memory budget for subscriptions is spent; retry later".into(),
                ))
            } else {
                self.budget.release(bytes);
                None
            };
            if let Some((code, message)) = refused {
                let (client_id, outbox) = (route.client_id.clone(), route.outbox.clone());
                drop(route);
                drop(entry);
                if let Some((_, route)) = self.routes.remove(&key) {
                    self.forget(route);
                    end(key);
                    metrics::gauge!("livegrid_subscriptions").decrement(1.0);
                }
                if let Some(outbox) = outbox {
                    outbox.deliver(ServerMessage::Error(ErrorMessage { id: Some(client_id), code, message }).to_json());
                }
                return;
            }
        }
        if let Some(outbox) = &route.outbox {
            outbox.deliver(json);
        }
        route.last_seq = frame.seq();
        // Buffered frames share their documents with everything else that carries them.
        let held = 64 + frame.shared_bytes();
        route.buffer.push_back((frame, held));
        route.buffered += held;
        self.budget.charge(held);
        while route.buffer.len() > self.limits.messages
            || (route.buffered > self.limits.bytes && route.buffer.len() > 1)
        {
            let (_, dropped) = route.buffer.pop_front().expect("non-empty");
            route.buffered -= dropped;
            self.budget.release(dropped);
        }
    }
}

/// Whether a resume to `seq` by connection `owner` with `binding` can be honoured: `Some(true)`
/// from the buffer, `Some(false)` by the right client whose missed messages are gone, `None`
/// not at all. A subscription only moves forward, to a connection opened after the one holding
/// it: a resume arriving late on a connection the client already left must not pull it back.
fn resumable(route: &Route, seq: u64, binding: &Binding, owner: ConnectionId) -> Option<bool> {
    if route.binding != *binding || seq > route.last_seq || owner < route.owner {
        return None;
    }
    let first = route.buffer.front().map_or(route.last_seq + 1, |(f, _)| f.seq());
    Some(first <= seq + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(query: &str) -> Binding {
        Binding { ns: "db.c".into(), query: query.into(), principal: None }
    }

    #[test]
    fn tokens_are_random_and_bound() {
        let hub = Hub::new(
            HubLimits { messages: 8, bytes: 1 << 20, result_bytes: 1 << 20 },
            Arc::new(MemoryBudget::new(1000)),
        );
        let (outbox, _rx) = Outbox::new(16, 1 << 20);
        hub.add(7, outbox.clone(), 1, "a".into(), binding("{}"), 400).unwrap();
        hub.add(8, outbox.clone(), 1, "b".into(), binding("{}"), 400).unwrap();
        assert!(hub.add(9, outbox.clone(), 1, "c".into(), binding("{}"), 400).is_err());
        let tokens: Vec<String> = hub.tokens.iter().map(|t| t.key().clone()).collect();
        assert_eq!(tokens.len(), 2);
        assert!(tokens.iter().all(|t| t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit())));
        assert_ne!(tokens[0], tokens[1]);
        let token = hub.routes.get(&7).unwrap().lock().unwrap().token.clone();
        hub.routes.get(&7).unwrap().lock().unwrap().last_seq = 1;
        let (other, _rx2) = Outbox::new(16, 1 << 20);
        // Another query, a guessed token, an impossible seq: unusable, nothing touched.
        assert!(matches!(hub.resume(&token, 1, &binding("{\"x\":1}"), &other, 2, "z"), Resume::Unusable));
        assert!(matches!(
            hub.resume("00112233445566778899aabbccddeeff", 1, &binding("{}"), &other, 2, "z"),
            Resume::Unusable
        ));
        assert!(matches!(hub.resume(&token, 99, &binding("{}"), &other, 2, "z"), Resume::Unusable));
        assert!(hub.owns(7, 1));
        // The right token moves the subscription; the old connection can no longer touch it.
        assert!(matches!(hub.resume(&token, 1, &binding("{}"), &other, 2, "z"), Resume::Resumed(7)));
        assert!(hub.owns(7, 2));
        // A late resume from the older connection cannot pull it back.
        assert!(matches!(hub.resume(&token, 1, &binding("{}"), &outbox, 1, "a"), Resume::Unusable));
        assert!(hub.owns(7, 2));
        hub.detach(7, 1);
        assert!(!hub.remove(7, 1));
        assert!(hub.routes.get(&7).unwrap().lock().unwrap().outbox.is_some());
        assert!(hub.remove(7, 2));
        assert_eq!(hub.budget().used(), 400);
    }
}
