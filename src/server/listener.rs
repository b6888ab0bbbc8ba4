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
//! # TLS
//! With a certificate and key (`--tls-cert`, `--tls-key`), every connection speaks TLS
//! (rustls; TLS 1.2 and 1.3) before HTTP; the handshake must finish within `header_timeout`.
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
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// A connection's place under the connection cap, carried by its requests so that a
/// WebSocket session can keep it after the upgrade.
#[derive(Clone, Debug)]
pub struct ConnectionPermit(#[allow(dead_code)] pub Arc<OwnedSemaphorePermit>);

/// Limits of the accept loop.
#[derive(Clone)]
pub struct ListenLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Time for a request's headers to arrive (and for an idle connection to send one).
    pub header_timeout: Duration,
    /// TLS for every connection, when configured.
    pub tls: Option<TlsAcceptor>,
}

/// A certificate chain and key that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file that does not hold what it should.
    #[error("{path}: {source}")]
    Pem {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// rustls refused the pair.
    #[error("the TLS certificate and key do not work together: {0}")]
    Config(#[from] tokio_rustls::rustls::Error),
}

/// A TLS acceptor from a PEM certificate chain and a PEM private key.
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> Result<TlsAcceptor, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let pem = |path: &std::path::Path| {
        let path = path.display().to_string();
        move |source| TlsError::Pem { path, source }
    };
    let chain =
        CertificateDer::pem_file_iter(cert).map_err(pem(cert))?.collect::<Result<Vec<_>, _>>().map_err(pem(cert))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(pem(key))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves `app` on `listener` until `stop` turns true. The listener is shared so that a
/// cluster process can answer on it while it waits for the others, then serve for real.
pub async fn serve(listener: Arc<TcpListener>, app: Router, limits: ListenLimits, mut stop: watch::Receiver<bool>) {
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
            request.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            request.map(axum::body::Body::new)
        }));
        let (open, stop, limits) = (open_rx.clone(), stop.clone(), limits.clone());
        tokio::spawn(async move {
            let _open = open;
            match &limits.tls {
                None => serve_connection(TokioIo::new(stream), service, &limits, stop, peer).await,
                Some(acceptor) => match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => serve_connection(TokioIo::new(tls), service, &limits, stop, peer).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                },
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

/// Serves HTTP/1.1 (with upgrades) on one connection until it ends or the server stops.
async fn serve_connection<I, S>(
    io: I,
    service: S,
    limits: &ListenLimits,
    mut stop: watch::Receiver<bool>,
    peer: std::net::SocketAddr,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = axum::response::Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // HTTP/1.1 only: the header timeout below is an HTTP/1 setting.
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let connection = builder.serve_connection_with_upgrades(io, service);
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
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
