//! Purges: `PURGE <url>` to every configured endpoint (Varnish, nginx, a CDN adapter) when a
//! cached result changes.
//!
//! Each endpoint has its own task and its own bounded queue, so a slow or dead endpoint
//! delays no other and never the grid: when its queue is full, purges for it are dropped,
//! counted and logged (the URLs stay in the cache sketch until their copies expire). A task
//! takes what arrived within [`WINDOW`] as one batch, sends each distinct URL once (with the
//! `Host` the copy was requested under, which caches key on), at most [`CONCURRENCY`] at a
//! time, and retries failures with exponential backoff. `2xx` and `404` (nothing cached)
//! count as done.
//!
//! Metrics: `livegrid_purges_sent`, `livegrid_purges_failed`, `livegrid_purges_dropped`
//! (counters, by endpoint), `livegrid_purge_latency_seconds` (from the change reaching
//! livegrid's hub to the endpoint's answer) and `livegrid_purge_queue_depth`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::Empty;
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

/// Changes collected into one batch at most this long after the first.
pub const WINDOW: Duration = Duration::from_millis(5);
/// Purge requests in flight per endpoint at most.
pub const CONCURRENCY: usize = 32;
/// Tries per URL.
const ATTEMPTS: u32 = 4;
/// Wait before the first retry; doubled for each further one.
const BACKOFF: Duration = Duration::from_millis(100);
/// Time for one purge request.
const TIMEOUT: Duration = Duration::from_secs(2);

/// One stale URL to purge.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Stale {
    /// The `Host` header the copy was requested with (caches key on it).
    pub host: Option<Arc<str>>,
    /// The request target (path and query).
    pub target: Arc<str>,
}

/// Stale URLs from one change, and when livegrid learnt of it.
#[derive(Debug)]
struct Batch {
    urls: Vec<Stale>,
    since: Instant,
}

/// A purge endpoint that is not usable.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// Not a URL.
    #[error("purge endpoint {0:?} is not a URL: {1}")]
    Invalid(String, #[source] hyper::http::uri::InvalidUri),
    /// Not `http://host[:port][/prefix]`.
    #[error("purge endpoint {0:?} must be http://host[:port][/prefix] (https endpoints need a local adapter)")]
    Unsupported(String),
}

/// Checks an endpoint URL and returns it without a trailing `/`.
pub fn parse_endpoint(text: &str) -> Result<String, EndpointError> {
    let uri: Uri = text.parse().map_err(|e| EndpointError::Invalid(text.to_string(), e))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() || uri.query().is_some() {
        return Err(EndpointError::Unsupported(text.to_string()));
    }
    Ok(text.trim_end_matches('/').to_string())
}

/// The purge endpoints' queues.
pub struct Purger {
    endpoints: Vec<(String, mpsc::Sender<Batch>)>,
}

impl Purger {
    /// Starts a task per endpoint (on the current runtime), each queueing `queue` changes.
    pub fn start(endpoints: &[String], queue: usize) -> Purger {
        let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(HttpConnector::new());
        let endpoints = endpoints
            .iter()
            .map(|endpoint| {
                let (tx, rx) = mpsc::channel(queue.max(1));
                tokio::spawn(run(endpoint.clone(), rx, client.clone()));
                (endpoint.clone(), tx)
            })
            .collect();
        Purger { endpoints }
    }

    /// Whether there is any endpoint.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Queues `urls` for every endpoint; an endpoint whose queue is full drops them.
    pub fn purge(&self, urls: &[Stale], since: Instant) {
        for (endpoint, queue) in &self.endpoints {
            let batch = Batch { urls: urls.to_vec(), since };
            if queue.try_send(batch).is_err() {
                metrics::counter!("livegrid_purges_dropped", "endpoint" => endpoint.clone())
                    .increment(urls.len() as u64);
                tracing::warn!(
                    endpoint,
                    urls = urls.len(),
                    "purge queue full: purges dropped (the URLs stay in the cache sketch)"
                );
            }
            metrics::gauge!("livegrid_purge_queue_depth", "endpoint" => endpoint.clone())
                .set((queue.max_capacity() - queue.capacity()) as f64);
        }
    }
}

/// One endpoint's task: batches, deduplicates, sends, retries.
async fn run(endpoint: String, mut queue: mpsc::Receiver<Batch>, client: Client<HttpConnector, Empty<Bytes>>) {
    while let Some(first) = queue.recv().await {
        let mut pending: HashMap<Stale, Instant> = HashMap::new();
        let mut add = |batch: Batch| {
            for url in batch.urls {
                let since = pending.entry(url).or_insert(batch.since);
                *since = (*since).min(batch.since);
            }
        };
        add(first);
        let deadline = tokio::time::Instant::now() + WINDOW;
        while let Ok(Some(batch)) = tokio::time::timeout_at(deadline, queue.recv()).await {
            add(batch);
        }
        futures_util::stream::iter(pending)
            .for_each_concurrent(CONCURRENCY, |(url, since)| {
                let (client, endpoint) = (&client, &endpoint);
                async move { purge_one(client, endpoint, &url, since).await }
            })
            .await;
    }
}

/// Sends one purge, retrying with backoff; records the outcome.
async fn purge_one(client: &Client<HttpConnector, Empty<Bytes>>, endpoint: &str, url: &Stale, since: Instant) {
    let mut last_error = String::new();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(BACKOFF * 2u32.pow(attempt - 1)).await;
        }
        match send(client, endpoint, url).await {
            Ok(()) => {
                metrics::counter!("livegrid_purges_sent", "endpoint" => endpoint.to_string()).increment(1);
                metrics::histogram!("livegrid_purge_latency_seconds").record(since.elapsed().as_secs_f64());
                return;
            }
            Err(e) => last_error = e,
        }
    }
    metrics::counter!("livegrid_purges_failed", "endpoint" => endpoint.to_string()).increment(1);
    tracing::warn!(endpoint, url = %url.target, error = %last_error, attempts = ATTEMPTS, "purge failed");
}

async fn send(client: &Client<HttpConnector, Empty<Bytes>>, endpoint: &str, url: &Stale) -> Result<(), String> {
    let mut request = Request::builder()
        .method(Method::from_bytes(b"PURGE").expect("a valid method"))
        .uri(format!("{endpoint}{}", url.target));
    if let Some(host) = &url.host {
        request = request.header(hyper::header::HOST, host.as_ref());
    }
    let request = request.body(Empty::new()).map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(TIMEOUT, client.request(request))
        .await
        .map_err(|_| format!("no answer within {TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let status = response.status();
    if status.is_success() || status == StatusCode::NOT_FOUND { Ok(()) } else { Err(format!("status {status}")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_plain_http() {
        assert_eq!(parse_endpoint("http://127.0.0.1:6081/").unwrap(), "http://127.0.0.1:6081");
        assert_eq!(parse_endpoint("http://cache.local/purge").unwrap(), "http://cache.local/purge");
        assert!(matches!(parse_endpoint("https://cdn.example/"), Err(EndpointError::Unsupported(_))));
        assert!(matches!(parse_endpoint("127.0.0.1:6081"), Err(EndpointError::Unsupported(_))));
        assert!(matches!(parse_endpoint("http://a b"), Err(EndpointError::Invalid(..))));
    }
}
