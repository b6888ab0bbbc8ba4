//! The accept loop: TCP connections into HTTP/1.1 (with WebSocket upgrades), within limits.
//!
//! # Limits
//! - At most `max_connections` connections are open at once, WebSockets included (a
//!   connection's permit moves into its WebSocket session when it upgrades). Connections
//!   beyond the cap are closed at once and counted in `livegrid_connections_refused`.
//! - A request's headers must arrive within `header_timeout`, so a client trickling header
//!   bytes cannot hold a connection forever; idle keep-alive connections are closed after
//!   the same time.
//!
//! # Shutdown
//! When the stop signal fires, the loop stops accepting and every connection finishes its
//! request in flight; WebSocket sessions close themselves on the same signal.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tower::ServiceExt;

/// A connection's place under the connection cap, carried by its requests so that a
/// WebSocket session can keep it after the upgrade.
#[derive(Clone, Debug)]
pub struct ConnectionPermit(#[allow(dead_code)] pub Arc<OwnedSemaphorePermit>);

/// Limits of the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct ListenLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Time for a request's headers to arrive (and for an idle connection to send one).
    pub header_timeout: Duration,
}

/// Serves `app` on `listener` until `stop` turns true.
pub async fn serve(listener: TcpListener, app: Router, limits: ListenLimits, mut stop: watch::Receiver<bool>) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // Every connection task holds a receiver: `closed()` resolves when the last one ends.
    let (open_tx, open_rx) = watch::channel(());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped(&mut stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!("livegrid_connections_refused").increment(1);
            tracing::debug!(%peer, "connection refused: at the connection cap");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let permit = ConnectionPermit(Arc::new(permit));
        let app = app.clone();
        let service = TowerToHyperService::new(app.map_request(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(permit.clone());
            request.map(axum::body::Body::new)
        }));
        // HTTP/1.1 only: the header timeout below is an HTTP/1 setting.
        let mut builder = Builder::new(TokioExecutor::new()).http1_only();
        builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        let (open, mut stop) = (open_rx.clone(), stop.clone());
        tokio::spawn(async move {
            let _open = open;
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stopped(&mut stop) => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    drop(open_rx);
    // Requests in flight get a moment to finish; WebSocket sessions end on the stop signal.
    if tokio::time::timeout(Duration::from_secs(10), open_tx.closed()).await.is_err() {
        tracing::warn!("connections still open after 10 s of shutdown");
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
