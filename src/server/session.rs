//! One WebSocket connection: reads client messages, registers and ends subscriptions, and
//! writes what the hub queues for it, with heartbeats.
//!
//! # Errors
//! A bad message or a bad subscription gets an `error` message (with the subscription's id
//! when it has one) and the connection stays open. The connection closes when the client
//! closes it, stops answering pings, does not read fast enough (its queue fills: 1008), sends
//! a frame over the size limit (1009) or text that is not UTF-8 (1007).
//!
//! # The invalidation feed
//! After `{"type": "invalidations"}`, the connection also gets an `invalidate` message for
//! every change that makes cached REST reads stale (see [`crate::invalidation`]). A client that
//! falls more than [`crate::invalidation::FEED_QUEUE`] messages behind is cut (1008).
//!
//! # Heartbeats
//! The server pings every `heartbeat`. A peer is dropped only when nothing at all arrived
//! from it for a whole interval after a ping was sent. Frames already received are read
//! before the heartbeat is judged, and missed ticks are delayed, not bursted: a server that
//! was paused (a long GC-like stall, a suspended VM) gives every peer a fresh interval instead
//! of dropping them all at once.
//!
//! # Disconnection
//! When a connection ends without unsubscribing, its subscriptions are detached, not ended:
//! they can be resumed on another connection within the grace window (see [`super::hub`]). A
//! subscription resumed elsewhere while this connection is still open belongs to the new
//! connection: this one forgets it.
//!
//! # Off the runtime
//! Compiling a query and reading its initial result run on the blocking pool, never on the
//! runtime's threads.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use livegrid_engine::records::WirePipeline;
use livegrid_engine::{EngineError, QueryKey};
use livegrid_matcher::pipeline::first_match_source;
use livegrid_matcher::{Pipeline, PipelineError, Query, QuerySpec};
use livegrid_protocol::extjson::to_canonical_string;
use livegrid_protocol::{ClientMessage, ErrorCode, ErrorMessage, ServerMessage, SubscribeMessage};
use tokio::sync::broadcast;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite;

use super::AppState;
use super::hub::{Binding, ConnectionId, Outbox, Resume};
use super::listener::ConnectionPermit;
use super::query_limits;
use crate::auth::Principal;

/// Close code for policy violations (RFC 6455), used for clients that cannot keep up.
const CLOSE_POLICY: u16 = 1008;
/// Close code for a server going away.
const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code for a frame too large to process.
const CLOSE_TOO_BIG: u16 = 1009;
/// Close code for text that is not valid UTF-8.
const CLOSE_INVALID_DATA: u16 = 1007;
/// Close code for a broken WebSocket protocol.
const CLOSE_PROTOCOL: u16 = 1002;
/// Close code for a server error (here: the server failed).
const CLOSE_INTERNAL: u16 = 1011;
/// Queued messages written to a connection's socket in one go, at most.
const SEND_BATCH: usize = 64;

/// Runs a session until the connection ends. `permit` keeps the connection's place under the
/// connection cap for as long as the session lives.
pub async fn run(socket: WebSocket, state: AppState, permit: Option<ConnectionPermit>, principal: Principal) {
    let _permit = permit;
    let mut principal = principal;
    let mut rate = RateLimit::new(state.config.max_messages_per_second);
    // Subscriptions opened with a token end when it expires.
    let mut expiry = Box::pin(tokio::time::sleep(expiry_of(&principal)));
    let connection: ConnectionId = state.next_connection.fetch_add(1, Ordering::Relaxed);
    let (outbox, mut outgoing) = Outbox::new(state.config.queue_capacity, state.config.queue_bytes);
    // A peer that stops reading blocks a send once socket buffers fill: such a send fails
    // after a heartbeat interval, so that the connection is cut rather than stuck.
    let send_timeout = state.config.heartbeat;
    let (mut sink, mut stream) = socket.split();
    let mut subscriptions: HashMap<String, Active> = HashMap::new();
    // The invalidation feed, once the client asked for it.
    let mut feed: Option<broadcast::Receiver<Arc<str>>> = None;
    let interval = state.config.heartbeat;
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_frame = Instant::now();
    let mut last_tick = Instant::now();
    let mut ping_sent: Option<Instant> = None;
    let mut shutdown = state.shutdown.clone();
    let health = state.health.clone();
    metrics::gauge!("livegrid_connections").increment(1.0);
    let close = loop {
        tokio::select! {
            // Frames already received are read first, so a pong that waited in the socket
            // during a pause of the server counts before the heartbeat is judged.
            biased;
            incoming = stream.next() => {
                if incoming.is_some() {
                    last_frame = Instant::now();
                }
                match incoming {
                    Some(Ok(Message::Text(text))) if !rate.admit() => {
                        metrics::counter!("livegrid_messages_rate_limited").increment(1);
                        let message = format!(
                            "at most {} messages per second: this one was dropped; slow down",
                            state.config.max_messages_per_second
                        );
                        outbox.deliver(error(None, ErrorCode::RateLimited, message).to_json());
                        drop(text);
                    }
                    Some(Ok(Message::Text(text))) => {
                        let before = principal.expires;
                        let replies = handle(
                            &state, connection, &outbox, &mut subscriptions, &mut feed, &mut principal, text.as_str(),
                        )
                        .await;
                        if principal.expires != before {
                            expiry.as_mut().reset(tokio::time::Instant::now() + expiry_of(&principal));
                        }
                        for reply in replies {
                            outbox.deliver(reply.to_json());
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        let error = error(None, ErrorCode::BadMessage, "binary frames are not supported; send JSON text".into());
                        outbox.deliver(error.to_json());
                    }
                    Some(Ok(Message::Pong(_) | Message::Ping(_))) => {}
                    Some(Ok(Message::Close(_))) | None => break None,
                    Some(Err(e)) => break read_error_close(e, state.config.frame_limit()),
                }
            }
            Some(text) = outgoing.recv() => {
                // The messages already waiting go out with this one: one flush (one write to
                // the socket) for the batch instead of one per message.
                let send = async {
                    let mut next = Some(text);
                    let mut batch = 0;
                    while let Some(text) = next {
                        outbox.taken(text.len());
                        metrics::counter!("livegrid_messages_out").increment(1);
                        sink.feed(Message::Text(text.into())).await?;
                        batch += 1;
                        next = if batch < SEND_BATCH { outgoing.try_recv().ok() } else { None };
                    }
                    sink.flush().await
                };
                match tokio::time::timeout(send_timeout, send).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break None,
                    Err(_) => {
                        metrics::counter!("livegrid_slow_consumers_cut").increment(1);
                        break Some((CLOSE_POLICY, "client too slow: not reading; reconnect and resume".to_string()));
                    }
                }
            }
            invalidation = next_invalidation(&mut feed) => match invalidation {
                Ok(json) => outbox.deliver(json.to_string()),
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    metrics::counter!("livegrid_slow_consumers_cut").increment(1);
                    break Some((CLOSE_POLICY, "client too slow: the invalidation feed fell behind; reconnect".to_string()));
                }
                Err(broadcast::error::RecvError::Closed) => feed = None,
            },
            _ = outbox.overflow.notified() => {
                break Some((CLOSE_POLICY, "client too slow: outgoing queue full; reconnect and resume".to_string()));
            }
            _ = heartbeat.tick() => {
                let now = Instant::now();
                // A tick far later than scheduled means this process was paused: the peer had
                // no chance to answer, so it gets a fresh interval.
                let paused = now.duration_since(last_tick) > interval + interval / 2;
                last_tick = now;
                if let Some(sent) = ping_sent
                    && last_frame < sent
                    && !paused
                {
                    break Some((CLOSE_POLICY, "no frame since the last ping".to_string()));
                }
                ping_sent = Some(now);
                if !matches!(tokio::time::timeout(send_timeout, sink.send(Message::Ping(Vec::new().into()))).await, Ok(Ok(()))) {
                    break None;
                }
            }
            _ = &mut expiry => {
                for (id, active) in subscriptions.drain() {
                    end(&state, connection, &active);
                    let message = "the token expired: authenticate again and subscribe again".to_string();
                    outbox.deliver(error(Some(id), ErrorCode::Unauthorized, message).to_json());
                }
                principal = Principal::anonymous();
                expiry.as_mut().reset(tokio::time::Instant::now() + expiry_of(&principal));
            }
            _ = shutdown.changed() => break Some((CLOSE_GOING_AWAY, "server shutting down".to_string())),
            reason = health.failed() => {
                // Every subscription learns that its result is no longer kept.
                for id in subscriptions.keys() {
                    let message = format!("livegrid failed ({reason}); results are no longer kept, reconnect later");
                    let error = error(Some(id.clone()), ErrorCode::Unavailable, message);
                    let _ = tokio::time::timeout(send_timeout, sink.send(Message::Text(error.to_json().into()))).await;
                }
                break Some((CLOSE_INTERNAL, format!("livegrid failed: {reason}")));
            }
        }
        if outbox.overflowed.load(Ordering::Acquire) {
            break Some((CLOSE_POLICY, "client too slow: outgoing queue full; reconnect and resume".to_string()));
        }
    };
    let server_stopping = *shutdown.borrow();
    for active in subscriptions.into_values() {
        if server_stopping {
            end(&state, connection, &active);
        } else {
            state.hub.detach(active.key, connection);
        }
    }
    if let Some((code, reason)) = close {
        tracing::info!(connection, code, reason = %reason, "closing connection");
        let frame = CloseFrame { code, reason: close_reason(&reason).into() };
        let _ = tokio::time::timeout(send_timeout, sink.send(Message::Close(Some(frame)))).await;
    }
    metrics::gauge!("livegrid_connections").decrement(1.0);
}

/// A close reason within the 123 bytes a close frame allows, cut at a character boundary.
fn close_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

/// The close frame for a read error: a frame over the limit, text that is not UTF-8, a broken
/// protocol. `None` when the connection is simply gone.
fn read_error_close(error: axum::Error, limit: usize) -> Option<(u16, String)> {
    let inner = error.into_inner();
    let error = inner.downcast_ref::<tungstenite::Error>()?;
    match error {
        tungstenite::Error::Capacity(_) => {
            Some((CLOSE_TOO_BIG, format!("frame too large: messages may be at most {limit} bytes")))
        }
        tungstenite::Error::Utf8(_) => Some((CLOSE_INVALID_DATA, "text frame is not valid UTF-8".to_string())),
        tungstenite::Error::Protocol(e) => Some((CLOSE_PROTOCOL, format!("protocol error: {e}"))),
        _ => None,
    }
}

fn error(id: Option<String>, code: ErrorCode, message: String) -> ServerMessage {
    ServerMessage::Error(ErrorMessage { id, code, message })
}

/// A token bucket: `per_second` messages a second, in bursts of as many.
struct RateLimit {
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    fn new(per_second: u32) -> Self {
        let per_second = f64::from(per_second.max(1));
        RateLimit { per_second, tokens: per_second, last: Instant::now() }
    }

    /// Whether one more message may be taken now.
    fn admit(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_second).min(self.per_second);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How long until `principal`'s token expires (a year for anonymous connections).
fn expiry_of(principal: &Principal) -> Duration {
    principal.expires_in().unwrap_or(Duration::from_secs(365 * 86_400))
}

/// The next message of the invalidation feed, if the client follows it.
async fn next_invalidation(
    feed: &mut Option<broadcast::Receiver<Arc<str>>>,
) -> Result<Arc<str>, broadcast::error::RecvError> {
    match feed {
        Some(feed) => feed.recv().await,
        None => std::future::pending().await,
    }
}

/// A subscription of this connection: its engine key.
struct Active {
    key: QueryKey,
}

fn end(state: &AppState, connection: ConnectionId, active: &Active) {
    // A subscription resumed on another connection is no longer this connection's to end.
    if state.hub.remove(active.key, connection) {
        unregister(state, active.key);
        metrics::gauge!("livegrid_subscriptions").decrement(1.0);
    }
}

/// Ends an engine subscription on the blocking pool (it may wait for the engine's ingest lock).
fn unregister(state: &AppState, key: QueryKey) {
    let engine = state.engine.clone();
    tokio::task::spawn_blocking(move || {
        let _ = engine.unregister(key);
    });
}

/// Handles one client message; returns the replies to queue.
async fn handle(
    state: &AppState,
    connection: ConnectionId,
    outbox: &Arc<Outbox>,
    subscriptions: &mut HashMap<String, Active>,
    feed: &mut Option<broadcast::Receiver<Arc<str>>>,
    principal: &mut Principal,
    text: &str,
) -> Vec<ServerMessage> {
    if text.len() > state.config.max_message_bytes {
        return vec![error(
            None,
            ErrorCode::MessageTooLarge,
            format!("messages may be at most {} bytes", state.config.max_message_bytes),
        )];
    }
    // Subscriptions that ended in the engine or moved to another connection are not ours.
    subscriptions.retain(|_, active| state.hub.owns(active.key, connection));
    let message: ClientMessage = match serde_json::from_str(text) {
        Ok(m) => m,
        Err(e) => return vec![error(None, ErrorCode::BadMessage, format!("invalid message: {e}"))],
    };
    match message {
        ClientMessage::Ping {} => vec![ServerMessage::Pong],
        ClientMessage::Auth { token } => match &state.auth {
            Some(auth) => match auth.verify(&token) {
                Ok(proven) => {
                    *principal = proven;
                    Vec::new()
                }
                Err(e) => vec![error(None, ErrorCode::Unauthorized, e.to_string())],
            },
            None => vec![error(None, ErrorCode::Unauthorized, "this server does not use authentication".into())],
        },
        ClientMessage::Invalidations {} => {
            if feed.is_none() {
                *feed = Some(state.cache.feed());
            }
            Vec::new()
        }
        ClientMessage::Unsubscribe { id } => match subscriptions.remove(&id) {
            Some(active) => {
                end(state, connection, &active);
                Vec::new()
            }
            None => vec![error(
                Some(id.clone()),
                ErrorCode::BadMessage,
                format!("no subscription {id:?} on this connection"),
            )],
        },
        ClientMessage::Subscribe(subscribe) => {
            match subscribe_one(state, connection, outbox, subscriptions, principal, *subscribe).await {
                Ok(()) => Vec::new(),
                Err(e) => vec![e],
            }
        }
    }
}

/// A query compiled on the blocking pool, with what it will cost (and for a live pipeline,
/// the pipeline).
struct Compiled {
    query: Query,
    charge: usize,
    pipeline: Option<WirePipeline>,
}

/// Compiles a live pipeline's stages.
fn compile_pipeline(stages: Vec<bson::Bson>) -> Result<WirePipeline, query_limits::Refusal> {
    let pipeline = Pipeline::parse(&stages)
        .and_then(|pipeline| pipeline.check_live().map(|()| pipeline))
        .map_err(|e| (pipeline_error_code(&e), e.to_string()))?;
    Ok(WirePipeline::new(stages, Arc::new(pipeline)))
}

/// The error code of a refused pipeline: a stage or operator livegrid does not keep live, or
/// a malformed one.
fn pipeline_error_code(error: &PipelineError) -> ErrorCode {
    if error.is_unsupported() { ErrorCode::UnsupportedStage } else { ErrorCode::BadPipeline }
}

async fn subscribe_one(
    state: &AppState,
    connection: ConnectionId,
    outbox: &Arc<Outbox>,
    subscriptions: &mut HashMap<String, Active>,
    principal: &Principal,
    subscribe: SubscribeMessage,
) -> Result<(), ServerMessage> {
    let id = subscribe.id.clone();
    let fail = |code, message: String| error(Some(id.clone()), code, message);
    if let Some(reason) = state.health.failure() {
        return Err(fail(ErrorCode::Unavailable, format!("livegrid failed ({reason}); reconnect later")));
    }
    if subscriptions.contains_key(&id) {
        return Err(fail(
            ErrorCode::DuplicateSubscription,
            format!("subscription {id:?} is already active on this connection"),
        ));
    }
    if subscriptions.len() >= state.config.max_subscriptions {
        return Err(fail(
            ErrorCode::TooManySubscriptions,
            format!("a connection may hold {} subscriptions", state.config.max_subscriptions),
        ));
    }
    crate::source::namespace::check_namespace(&subscribe.ns)
        .map_err(|e| fail(ErrorCode::BadNamespace, e.to_string()))?;
    // A service subscribes as the user it names; nobody else may.
    let on_behalf;
    let principal = match &subscribe.on_behalf_of {
        None => principal,
        Some(user) if principal.has_role("service") && !user.sub.is_empty() => {
            on_behalf = Principal {
                user: Some(user.sub.clone()),
                roles: user.roles.clone(),
                expires: principal.expires,
                via: principal.user.clone(),
            };
            &on_behalf
        }
        Some(_) => {
            return Err(fail(
                ErrorCode::Unauthorized,
                "only a token with the service role may subscribe as another user".into(),
            ));
        }
    };
    if !state.rules.may_read(&subscribe.ns, principal) {
        let who = principal.user.as_deref().map_or("anonymous clients".to_string(), |u| format!("user {u:?}"));
        return Err(fail(ErrorCode::Unauthorized, format!("{who} may not read {}", subscribe.ns)));
    }
    if subscribe.pipeline.is_some()
        && (!subscribe.filter.is_empty()
            || subscribe.sort.is_some()
            || subscribe.skip != 0
            || subscribe.limit.is_some()
            || subscribe.projection.is_some())
    {
        return Err(fail(
            ErrorCode::BadPipeline,
            "a pipeline subscription takes its filter, sort, skip, limit and projection as stages".into(),
        ));
    }
    let stages = subscribe.pipeline.clone();
    let match_source = stages.as_deref().map(first_match_source);
    let spec = QuerySpec {
        // Only what the principal may read: object ACLs are part of the query (of a pipeline's
        // first $match).
        filter: state.visible(match_source.as_ref().unwrap_or(&subscribe.filter), principal),
        sort: subscribe.sort,
        skip: subscribe.skip,
        limit: subscribe.limit,
        projection: subscribe.projection,
    };
    let compiled = {
        let (spec, limits) = (spec.clone(), state.config.query_limits());
        tokio::task::spawn_blocking(move || -> Result<Compiled, query_limits::Refusal> {
            // The pipeline first: its errors name the stage.
            let pipeline = stages.map(compile_pipeline).transpose()?;
            let query = query_limits::compile(&spec, &limits)?;
            let charge = query_limits::subscription_charge(&query, &limits)?;
            Ok(Compiled { query, charge, pipeline })
        })
        .await
        .map_err(|e| fail(ErrorCode::Internal, format!("compiling the query failed: {e}")))?
        .map_err(|(code, message)| fail(code, message))?
    };
    let mut canonical = canonical_query(&spec);
    if let Some(stages) = &subscribe.pipeline {
        canonical.push_str(&format!("|{}", to_canonical_string(&bson::doc! {"pipeline": stages.clone()})));
    }
    let binding = Binding { ns: subscribe.ns.clone(), query: canonical, principal: principal.binding() };
    if let Some(resume) = &subscribe.resume {
        match state.hub.resume(&resume.token, resume.seq, &binding, outbox, connection, &id) {
            Resume::Resumed(key) => {
                // Resumed twice on this connection under different ids: the newest id wins.
                subscriptions.retain(|_, active| active.key != key);
                subscriptions.insert(id, Active { key });
                metrics::counter!("livegrid_resumes").increment(1);
                return Ok(());
            }
            Resume::Replaced(old) => {
                // The client's own subscription, whose missed messages are gone: replace it.
                subscriptions.retain(|_, active| active.key != old);
                unregister(state, old);
                metrics::gauge!("livegrid_subscriptions").decrement(1.0);
            }
            Resume::Unusable => metrics::counter!("livegrid_resumes_refused").increment(1),
            Resume::Forbidden => {
                metrics::counter!("livegrid_resumes_refused").increment(1);
                return Err(fail(ErrorCode::Unauthorized, "this resume token belongs to another user".into()));
            }
        }
    }
    // The key first, so that the hub can route the result the moment the grid emits it.
    let key = state.engine.reserve_key();
    state
        .hub
        .add(key, outbox.clone(), connection, id.clone(), binding, compiled.charge)
        .map_err(|e| fail(ErrorCode::OverCapacity, format!("{e}; retry later")))?;
    let engine = state.engine.clone();
    let ns = subscribe.ns.clone();
    let registered = tokio::task::spawn_blocking(move || match compiled.pipeline {
        Some(pipeline) => engine.register_pipeline_as(key, &ns, &spec, &compiled.query, pipeline),
        None => engine.register_as(key, &ns, &spec, &compiled.query),
    })
    .await;
    match registered {
        Ok(Ok(())) => {
            if !state.hub.owns(key, connection) {
                // Ended while registering (the server failed, or its result was refused).
                unregister(state, key);
                return Ok(());
            }
            subscriptions.insert(id, Active { key });
            metrics::gauge!("livegrid_subscriptions").increment(1.0);
            Ok(())
        }
        Ok(Err(e)) => {
            state.hub.remove(key, connection);
            unregister(state, key);
            let code = match e {
                EngineError::BadQuery(_) => ErrorCode::BadQuery,
                EngineError::BadPipeline(_) => ErrorCode::BadPipeline,
                EngineError::StaleSnapshot { .. } => ErrorCode::StaleSnapshot,
                EngineError::Closed => ErrorCode::Unavailable,
                _ => ErrorCode::Internal,
            };
            Err(fail(code, e.to_string()))
        }
        Err(e) => {
            state.hub.remove(key, connection);
            unregister(state, key);
            Err(fail(ErrorCode::Internal, format!("registration failed: {e}")))
        }
    }
}

/// The query as resume tokens are bound to it: every part in canonical Extended JSON.
fn canonical_query(spec: &QuerySpec) -> String {
    let part = |d: &Option<bson::Document>| d.as_ref().map(to_canonical_string).unwrap_or_default();
    format!(
        "{}|{}|{}|{:?}|{}",
        to_canonical_string(&spec.filter),
        part(&spec.sort),
        spec.skip,
        spec.limit,
        part(&spec.projection)
    )
}

/// How long a session waits between heartbeats by default.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(20);
