//! The server's health: whether livegrid can still keep its promises.
//!
//! Any part that finds it can no longer keep results exact (the engine refused a committed
//! write, a grid worker panicked, the store failed to commit, the source was lost) calls
//! [`Health::fail`] with the reason. The state never goes back to healthy: results may have
//! diverged from the data, so the only honest recovery is a restart, after which clients
//! resume or re-subscribe. `/healthz` answers 503 with the reason, every subscription receives
//! an `unavailable` error, and `livegrid serve --exit-on-fatal` (the default) exits non-zero.

use std::sync::OnceLock;

use tokio::sync::watch;

/// Shared health of one server.
#[derive(Debug)]
pub struct Health {
    reason: OnceLock<String>,
    changed: watch::Sender<bool>,
}

impl Default for Health {
    fn default() -> Self {
        Health { reason: OnceLock::new(), changed: watch::channel(false).0 }
    }
}

impl Health {
    /// A healthy state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the server failed; the first reason wins.
    pub fn fail(&self, reason: impl Into<String>) {
        let reason = reason.into();
        if self.reason.set(reason.clone()).is_ok() {
            tracing::error!(reason = %reason, "livegrid failed: results can no longer be kept exact");
            metrics::gauge!("livegrid_failed").set(1.0);
            self.changed.send_replace(true);
        }
    }

    /// Why the server failed, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.reason.get().map(String::as_str)
    }

    /// Resolves once the server has failed.
    pub async fn failed(&self) -> &str {
        let mut changed = self.changed.subscribe();
        let _ = changed.wait_for(|failed| *failed).await;
        self.failure().unwrap_or("unknown failure")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_reason_wins_and_waiters_wake() {
        let health = std::sync::Arc::new(Health::new());
        assert_eq!(health.failure(), None);
        let waiter = {
            let health = health.clone();
            tokio::spawn(async move { health.failed().await.to_string() })
        };
        health.fail("engine refused writes");
        health.fail("later");
        assert_eq!(waiter.await.unwrap(), "engine refused writes");
        assert_eq!(health.failure(), Some("engine refused writes"));
        assert_eq!(health.failed().await, "engine refused writes");
    }
}
