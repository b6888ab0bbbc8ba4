//! One WebSocket connection: reads client messages, registers and ends subscriptions, and
//! writes what the hub queues for it, with heartbeats.
//!
//! # Errors
//! A bad message or a bad subscription gets an `error` message (with the subscription's id
//! when it has one) and the connection stays open. The connection closes when the client
//! closes it, stops answering pings, or does not read fast enough (its queue fills).
//!
//! # Disconnection
//! When a connection ends without unsubscribing, its subscriptions are detached, not ended:
//! they can be resumed on another connection within the grace window (see [`super::hub`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use livegrid_engine::{EngineError, QueryKey};
use livegrid_matcher::{Query, QuerySpec};
use livegrid_protocol::{ClientMessage, ErrorCode, ErrorMessage, ServerMessage, SubscribeMessage};
use tokio::sync::mpsc;

use super::AppState;
use super::hub::Outbox;

/// Close code for policy violations (RFC 6455), used for clients that cannot keep up.
const CLOSE_POLICY: u16 = 1008;
/// Close code for a server going away.
const CLOSE_GOING_AWAY: u16 = 1001;

/// Runs a session until the connection ends.
pub async fn run(socket: WebSocket, state: AppState) {
    let connection = state.next_connection.fetch_add(1, Ordering::Relaxed);
    let (queue, mut outgoing) = mpsc::channel::<String>(state.config.queue_capacity);
    let outbox = Arc::new(Outbox { queue, overflowed: AtomicBool::new(false), overflow: tokio::sync::Notify::new() });
    let (mut sink, mut stream) = socket.split();
    let mut subscriptions: HashMap<String, Active> = HashMap::new();
    let mut heartbeat = tokio::time::interval(state.config.heartbeat);
    heartbeat.tick().await;
    let mut awaiting_pong = false;
    let mut shutdown = state.shutdown.clone();
    metrics::gauge!("livegrid_connections").increment(1.0);
    let close = loop {
        tokio::select! {
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    let replies = handle(&state, connection, &outbox, &mut subscriptions, text.as_str()).await;
                    for reply in replies {
                        if outbox.queue.try_send(reply.to_json()).is_err() {
                            outbox.overflowed.store(true, Ordering::Release);
                        }
                    }
                }
                Some(Ok(Message::Pong(_))) => awaiting_pong = false,
                Some(Ok(Message::Binary(_))) => {
                    let error = error(None, ErrorCode::BadMessage, "binary frames are not supported; send JSON text".into());
                    let _ = outbox.queue.try_send(error.to_json());
                }
                Some(Ok(Message::Ping(_))) => {}
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break None,
            },
            Some(text) = outgoing.recv() => {
                metrics::counter!("livegrid_messages_out").increment(1);
                if sink.send(Message::Text(text.into())).await.is_err() {
                    break None;
                }
            }
            _ = outbox.overflow.notified() => {
                break Some((CLOSE_POLICY, "client too slow: outgoing queue full; reconnect and resubscribe"));
            }
            _ = heartbeat.tick() => {
                if awaiting_pong {
                    break Some((CLOSE_POLICY, "no pong to the last ping"));
                }
                awaiting_pong = true;
                if sink.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break None;
                }
            }
            _ = shutdown.changed() => break Some((CLOSE_GOING_AWAY, "server shutting down")),
        }
        if outbox.overflowed.load(Ordering::Acquire) {
            break Some((CLOSE_POLICY, "client too slow: outgoing queue full; reconnect and resubscribe"));
        }
    };
    let server_stopping = *shutdown.borrow();
    for active in subscriptions.into_values() {
        if server_stopping {
            end(&state, &active);
        } else {
            state.hub.detach(&active.name);
        }
    }
    if let Some((code, reason)) = close {
        tracing::info!(connection, code, reason, "closing connection");
        let _ = sink.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
    }
    metrics::gauge!("livegrid_connections").decrement(1.0);
}

fn error(id: Option<String>, code: ErrorCode, message: String) -> ServerMessage {
    ServerMessage::Error(ErrorMessage { id, code, message })
}

/// A subscription of this connection: its engine key and name.
struct Active {
    key: QueryKey,
    name: String,
}

fn end(state: &AppState, active: &Active) {
    state.hub.remove(&active.name);
    let _ = state.engine.unregister(active.key);
    metrics::gauge!("livegrid_subscriptions").decrement(1.0);
}

/// Handles one client message; returns the replies to queue.
async fn handle(
    state: &AppState,
    connection: u64,
    outbox: &Arc<Outbox>,
    subscriptions: &mut HashMap<String, Active>,
    text: &str,
) -> Vec<ServerMessage> {
    if text.len() > state.config.max_message_bytes {
        return vec![error(
            None,
            ErrorCode::MessageTooLarge,
            format!("messages may be at most {} bytes", state.config.max_message_bytes),
        )];
    }
    let message: ClientMessage = match serde_json::from_str(text) {
        Ok(m) => m,
        Err(e) => return vec![error(None, ErrorCode::BadMessage, format!("invalid message: {e}"))],
    };
    match message {
        ClientMessage::Ping => vec![ServerMessage::Pong],
        ClientMessage::Unsubscribe { id } => match subscriptions.remove(&id) {
            Some(active) => {
                end(state, &active);
                Vec::new()
            }
            None => vec![error(
                Some(id.clone()),
                ErrorCode::BadMessage,
                format!("no subscription {id:?} on this connection"),
            )],
        },
        ClientMessage::Subscribe(subscribe) => {
            match subscribe_one(state, connection, outbox, subscriptions, *subscribe).await {
                Ok(()) => Vec::new(),
                Err(e) => vec![e],
            }
        }
    }
}

async fn subscribe_one(
    state: &AppState,
    connection: u64,
    outbox: &Arc<Outbox>,
    subscriptions: &mut HashMap<String, Active>,
    subscribe: SubscribeMessage,
) -> Result<(), ServerMessage> {
    let id = subscribe.id.clone();
    let fail = |code, message: String| error(Some(id.clone()), code, message);
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
    crate::store::check_namespace(&subscribe.ns).map_err(|e| fail(ErrorCode::BadQuery, e.to_string()))?;
    let spec = QuerySpec {
        filter: subscribe.filter,
        sort: subscribe.sort,
        skip: subscribe.skip,
        limit: subscribe.limit,
        projection: subscribe.projection,
    };
    Query::compile(&spec).map_err(|e| fail(ErrorCode::BadQuery, e.to_string()))?;
    if let Some(resume) = &subscribe.resume {
        if let Some(resumed) = state.hub.resume(&resume.token, resume.seq, outbox, &id) {
            subscriptions.insert(id, Active { key: resumed.key, name: resumed.name });
            metrics::counter!("livegrid_resumes").increment(1);
            return Ok(());
        }
        // Not resumable (expired, or missed messages no longer buffered): start afresh.
        if let Some(old) = state.hub.take_token(&resume.token) {
            let _ = state.engine.unregister(old);
            metrics::gauge!("livegrid_subscriptions").decrement(1.0);
        }
    }
    let engine_name = format!("{connection}/{}", state.next_connection.fetch_add(1, Ordering::Relaxed));
    state.hub.add(engine_name.clone(), 0, outbox.clone(), id.clone());
    let engine = state.engine.clone();
    let ns = subscribe.ns.clone();
    let engine_name_for_key = engine_name.clone();
    let registered = tokio::task::spawn_blocking(move || engine.register(&engine_name, &ns, &spec)).await;
    match registered {
        Ok(Ok(key)) => {
            state.hub.set_key(&engine_name_for_key, key);
            subscriptions.insert(id, Active { key, name: engine_name_for_key });
            metrics::gauge!("livegrid_subscriptions").increment(1.0);
            Ok(())
        }
        Ok(Err(e)) => {
            state.hub.remove(&engine_name_for_key);
            let code = match e {
                EngineError::BadQuery(_) => ErrorCode::BadQuery,
                _ => ErrorCode::Internal,
            };
            Err(fail(code, e.to_string()))
        }
        Err(e) => {
            state.hub.remove(&engine_name_for_key);
            Err(fail(ErrorCode::Internal, format!("registration failed: {e}")))
        }
    }
}

/// How long a session waits between heartbeats by default.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(20);
