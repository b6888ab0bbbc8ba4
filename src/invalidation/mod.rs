//! Cache invalidation: REST reads become cacheable because livegrid knows the moment they go
//! stale.
//!
//! For every cacheable URL it serves, livegrid remembers until when a copy may live in a
//! cache, and watches the result with an internal subscription (one without a client) on the
//! same grid as client subscriptions: a document URL watches `{_id: {$in: ids the URL may
//! name}}`, a query URL its query. Spellings of one query share one watch (see
//! [`canonical`]). When the watch reports a change (a delta reaches the hub) while copies may
//! live, livegrid
//! - sends `PURGE` for every spelling served to each purge endpoint ([`purge`]);
//! - puts them into the cache sketch until their last copy expires ([`sketch`]);
//! - publishes them on the invalidation feed (`invalidate` messages on WebSockets that asked).
//!
//! A change that leaves a result alone produces no delta and so no purge. Watches end when the
//! last copy has expired; at most `entries` results are watched, and a read beyond that is
//! served with `max-age=0` (never cached without a watch). Anything that ends a watch early
//! (its source lost history, the server failed) invalidates its URLs as if they changed.
//!
//! # Races
//! A read whose watch saw a change after the read began is served with `max-age=0`: its
//! answer may predate the change. An answer already on its way to a cache when a change
//! arrives may be stored after the purge: URLs served within the last [`REPURGE_AFTER`] are
//! purged again that much later.
//!
//! # Threads
//! Deltas arrive on the hub's threads ([`Invalidator::changed`]: map lookups and queue
//! pushes); registering a watch runs on the blocking pool, expiry ([`Invalidator::tick`]) too.

pub mod canonical;
pub mod purge;
pub mod sketch;
pub mod ttl;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use livegrid_engine::{Engine, QueryKey};

use crate::budget::MemoryBudget;
use livegrid_matcher::{Query, QuerySpec};
use livegrid_protocol::{InvalidateMessage, Position, ServerMessage};
use tokio::sync::broadcast;

use purge::{Purger, Stale};
use sketch::Sketch;
use ttl::{History, MaxAge};

/// Spellings of one URL tracked at most; further spellings are served uncacheable.
pub const MAX_SPELLINGS: usize = 8;
/// An answer served this recently before a change is purged again this much later.
pub const REPURGE_AFTER: Duration = Duration::from_secs(1);
/// Caches may serve a copy a little past its expiry (Varnish's default grace is 10 s): copies
/// count as alive this much longer for purges.
pub const GRACE: Duration = Duration::from_secs(10);
/// Invalidation messages waiting for a slow feed reader at most before it is cut.
pub const FEED_QUEUE: usize = 1024;

/// How REST reads are cached and invalidated.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// The max-age of REST reads.
    pub max_age: MaxAge,
    /// Per-namespace overrides: `db.coll` or `db`.
    pub namespaces: BTreeMap<String, MaxAge>,
    /// Purge endpoints (`http://host[:port][/prefix]`).
    pub purge: Vec<String>,
    /// Results watched at most.
    pub entries: usize,
    /// Changes queued per purge endpoint at most.
    pub purge_queue: usize,
    /// Bits of the cache sketch.
    pub sketch_bits: u64,
    /// Hash functions of the cache sketch.
    pub sketch_hashes: u32,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_age: MaxAge::Fixed(0),
            namespaces: BTreeMap::new(),
            purge: Vec::new(),
            entries: 10_000,
            purge_queue: 10_000,
            sketch_bits: 1 << 18,
            sketch_hashes: 7,
        }
    }
}

impl CacheConfig {
    /// Checks every setting, naming the first that is unusable.
    pub fn validate(&self) -> Result<(), String> {
        for endpoint in &self.purge {
            purge::parse_endpoint(endpoint).map_err(|e| e.to_string())?;
        }
        for ns in self.namespaces.keys() {
            if ns.is_empty() || ns.starts_with('.') || ns.ends_with('.') {
                return Err(format!("cache namespaces are `db` or `db.coll`, found {ns:?}"));
            }
        }
        let check = |name: &str, value: u64, min: u64, max: u64| {
            if value < min || value > max {
                Err(format!("{name} must be between {min} and {max}, found {value}"))
            } else {
                Ok(())
            }
        };
        check("cache_entries", self.entries as u64, 1, 10_000_000)?;
        check("purge_queue", self.purge_queue as u64, 1, 10_000_000)?;
        check("sketch_bits", self.sketch_bits, 64, 1 << 26)?;
        check("sketch_hashes", u64::from(self.sketch_hashes), 1, 64)
    }

    /// The max-age for reads of `ns`.
    pub fn max_age_for(&self, ns: &str) -> MaxAge {
        let db = ns.split('.').next().unwrap_or(ns);
        self.namespaces.get(ns).or_else(|| self.namespaces.get(db)).copied().unwrap_or(self.max_age)
    }
}

/// A REST read to watch: its namespace, canonical URL and query.
pub struct Read {
    /// The namespace.
    pub ns: String,
    /// The canonical URL (the watch's identity).
    pub url: String,
    /// The query to watch.
    pub spec: QuerySpec,
    /// That query, compiled.
    pub query: Query,
}

/// A read under watch: pass it to [`Invalidator::served`] with the answer.
pub struct Ticket {
    url: String,
    /// The watch it was taken on (a later watch of the same URL is another).
    key: QueryKey,
    started: Instant,
    max_age: MaxAge,
}

/// A copy handed out: which spelling, until when it may be cached, when it was last served.
struct Copy {
    url: Stale,
    expires: Instant,
    served: Instant,
}

/// One watched result.
struct Entry {
    key: QueryKey,
    /// Bytes charged to the memory budget.
    charge: usize,
    /// Whether its internal subscription is registered.
    live: bool,
    /// The spellings served (with their `Host`), at most [`MAX_SPELLINGS`].
    copies: Vec<Copy>,
    /// When a change last arrived.
    last_change: Option<Instant>,
    watched_since: Instant,
    /// What was known before this watch.
    learnt: History,
    /// Changes during this watch.
    changes: u32,
}

impl Entry {
    fn history(&self, now: Instant) -> History {
        self.learnt.then(History { observed: now.duration_since(self.watched_since), changes: self.changes })
    }

    /// Until when the watch is needed: the last copy's expiry, plus [`GRACE`].
    fn needed_until(&self) -> Instant {
        self.copies.iter().map(|c| c.expires).max().unwrap_or(self.watched_since) + GRACE
    }

    /// The copies that may still be in a cache at `now`, with their expiry.
    fn alive(&self, now: Instant) -> Vec<(Stale, Instant)> {
        self.copies.iter().filter(|c| c.expires + GRACE > now).map(|c| (c.url.clone(), c.expires)).collect()
    }
}

/// Watches cacheable results and invalidates their copies.
pub struct Invalidator {
    config: CacheConfig,
    engine: Arc<Engine>,
    /// Shared with client subscriptions.
    budget: Arc<MemoryBudget>,
    /// Documents a sorted window keeps beyond its end (for the charge).
    slack: usize,
    entries: DashMap<String, Entry>,
    by_key: DashMap<QueryKey, String>,
    /// Histories of URLs no longer watched (at most `4 * entries`).
    learnt: DashMap<String, History>,
    sketch: Mutex<Sketch>,
    purger: Purger,
    repurges: Mutex<VecDeque<(Instant, Vec<Stale>, Instant)>>,
    feed: broadcast::Sender<Arc<str>>,
}

impl Invalidator {
    /// An invalidator for `engine`, charging its watches to `budget`; starts the purge tasks
    /// on the current runtime.
    pub fn start(config: CacheConfig, engine: Arc<Engine>, budget: Arc<MemoryBudget>, slack: usize) -> Arc<Self> {
        let purger = Purger::start(&config.purge, config.purge_queue);
        let sketch = Mutex::new(Sketch::new(config.sketch_bits, config.sketch_hashes));
        Arc::new(Invalidator {
            engine,
            budget,
            slack,
            entries: DashMap::new(),
            by_key: DashMap::new(),
            learnt: DashMap::new(),
            sketch,
            purger,
            repurges: Mutex::new(VecDeque::new()),
            feed: broadcast::channel(FEED_QUEUE).0,
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// Watches `read` before it is read. `None`: serve it with `max-age=0` (caching is off for
    /// its namespace, all watches or the memory budget are taken, its watch is still
    /// registering or failed).
    pub async fn watch(self: &Arc<Self>, read: Read) -> Option<Ticket> {
        let max_age = self.config.max_age_for(&read.ns);
        if !max_age.caches() {
            return None;
        }
        let now = Instant::now();
        if let Some(entry) = self.entries.get(&read.url) {
            return entry.live.then(|| Ticket { url: read.url.clone(), key: entry.key, started: now, max_age });
        }
        let charge = crate::budget::subscription_charge(&read.query, self.slack);
        if self.entries.len() >= self.config.entries || !self.budget.try_charge(charge) {
            metrics::counter!("livegrid_cache_watches_refused").increment(1);
            return None;
        }
        let key = self.engine.reserve_key();
        let learnt = self.learnt.remove(&read.url).map(|(_, h)| h).unwrap_or_default();
        let entry = Entry {
            key,
            charge,
            live: false,
            copies: Vec::new(),
            last_change: None,
            watched_since: now,
            learnt,
            changes: 0,
        };
        let inserted = match self.entries.entry(read.url.clone()) {
            dashmap::Entry::Occupied(_) => false,
            dashmap::Entry::Vacant(vacant) => {
                vacant.insert(entry);
                true
            }
        };
        if !inserted {
            self.budget.release(charge);
            return None;
        }
        self.by_key.insert(key, read.url.clone());
        // Registered by a task of its own: a request that goes away meanwhile (its client
        // disconnected) cannot leave the watch half made.
        let this = self.clone();
        let registering = tokio::spawn(async move { this.register(key, read).await });
        let url = registering.await.ok().flatten()?;
        Some(Ticket { url, key, started: Instant::now(), max_age })
    }

    /// Registers watch `key` in the engine; its URL once it is live.
    async fn register(&self, key: QueryKey, read: Read) -> Option<String> {
        let engine = self.engine.clone();
        let Read { ns, url, spec, query } = read;
        let registered = tokio::task::spawn_blocking(move || engine.register_as(key, &ns, &spec, &query)).await;
        if let Ok(Ok(())) = registered {
            // (No other map access while the entry's shard is locked.)
            let live = self.entries.get_mut(&url).filter(|e| e.key == key).map(|mut e| e.live = true).is_some();
            metrics::gauge!("livegrid_cache_watches").set(self.entries.len() as f64);
            if live {
                return Some(url);
            }
        } else {
            tracing::warn!(url, error = ?registered, "watching a cacheable result failed: served uncacheable");
        }
        self.drop_watch(&url, key);
        let engine = self.engine.clone();
        let _ = tokio::task::spawn_blocking(move || engine.unregister(key)).await;
        None
    }

    /// Removes watch `key` of `url` (if it is still that watch) and gives its memory back;
    /// returns it.
    fn drop_watch(&self, url: &str, key: QueryKey) -> Option<Entry> {
        self.by_key.remove(&key);
        let (_, entry) = self.entries.remove_if(url, |_, e| e.key == key)?;
        self.budget.release(entry.charge);
        Some(entry)
    }

    /// Records that `target` (requested with `host`) was answered for `ticket`'s read, and
    /// returns the max-age to serve it with (0: uncacheable).
    pub fn served(&self, ticket: &Ticket, host: Option<&str>, target: &str) -> u32 {
        let now = Instant::now();
        let evicted = {
            let Some(mut entry) = self.entries.get_mut(&ticket.url) else { return 0 };
            if !entry.live || entry.key != ticket.key || entry.last_change.is_some_and(|at| at >= ticket.started) {
                return 0;
            }
            let ttl = ticket.max_age.ttl(&entry.history(now));
            if ttl == 0 {
                return 0;
            }
            let expires = now + Duration::from_secs(u64::from(ttl));
            entry.copies.retain(|c| c.expires + GRACE > now);
            let url = Stale { host: host.map(Arc::from), target: Arc::from(target) };
            let mut evicted = None;
            if let Some(copy) = entry.copies.iter_mut().find(|c| c.url == url) {
                copy.expires = copy.expires.max(expires);
                copy.served = now;
            } else {
                if entry.copies.len() >= MAX_SPELLINGS {
                    // The least recently served spelling makes room, invalidated as if it
                    // changed: it is no longer watched.
                    let oldest = (0..entry.copies.len()).min_by_key(|i| entry.copies[*i].served).expect("full");
                    let copy = entry.copies.swap_remove(oldest);
                    evicted = Some((copy.url, copy.expires));
                }
                entry.copies.push(Copy { url, expires, served: now });
            }
            (ttl, evicted)
        };
        let (ttl, evicted) = evicted;
        if let Some(copy) = evicted {
            self.invalidate(&[copy], self.engine.processed(), now);
        }
        ttl
    }

    /// A delta of watch `key` at `position` reached the hub; `whole` when no delta of the
    /// same write follows (called on the hub's threads).
    pub fn changed(&self, key: QueryKey, position: Position, whole: bool) {
        let Some(url) = self.by_key.get(&key).map(|u| u.clone()) else { return };
        let now = Instant::now();
        let Some(mut entry) = self.entries.get_mut(&url) else { return };
        if entry.key != key {
            return;
        }
        entry.last_change = Some(now);
        if !whole {
            return;
        }
        entry.changes = entry.changes.saturating_add(1);
        let alive = entry.alive(now);
        let recent: Vec<Stale> = entry
            .copies
            .iter()
            .filter(|c| now.duration_since(c.served) < REPURGE_AFTER)
            .map(|c| c.url.clone())
            .collect();
        drop(entry);
        self.invalidate(&alive, position, now);
        if !recent.is_empty() {
            let mut repurges = self.repurges.lock().expect("repurge lock");
            if repurges.len() < self.config.purge_queue {
                repurges.push_back((now + REPURGE_AFTER, recent, now));
            }
        }
    }

    /// Watch `key` ended in the engine: its URLs are invalidated, as they can no longer be
    /// watched.
    pub fn ended(&self, key: QueryKey) {
        self.end_early(key);
    }

    /// Watch `key`'s initial result does not fit the limits: the watch ends (its URLs are
    /// invalidated) and `true` tells the caller to end it in the engine.
    pub fn refuse(&self, key: QueryKey) -> bool {
        let ended = self.end_early(key);
        if ended {
            metrics::counter!("livegrid_cache_watches_refused").increment(1);
        }
        ended
    }

    /// Ends watch `key` before its copies expired: invalidates them and keeps what it learnt.
    /// Whether there was such a watch.
    fn end_early(&self, key: QueryKey) -> bool {
        let Some(url) = self.by_key.get(&key).map(|u| u.clone()) else { return false };
        let now = Instant::now();
        let Some(entry) = self.drop_watch(&url, key) else { return false };
        self.invalidate(&entry.alive(now), self.engine.processed(), now);
        self.forget(url, &entry, now);
        true
    }

    /// Invalidates every watched URL and ends every watch (the server failed); returns the
    /// engine keys to end.
    pub fn fail_all(&self) -> Vec<QueryKey> {
        let watched: Vec<(String, QueryKey)> = self.entries.iter().map(|e| (e.key().clone(), e.key)).collect();
        let (position, now) = (self.engine.processed(), Instant::now());
        watched
            .into_iter()
            .filter_map(|(url, key)| self.drop_watch(&url, key))
            .map(|entry| {
                self.invalidate(&entry.alive(now), position, now);
                entry.key
            })
            .collect()
    }

    /// Marks `copies` stale: purges, the sketch (each until its copy expires), the feed.
    fn invalidate(&self, copies: &[(Stale, Instant)], position: Position, since: Instant) {
        if copies.is_empty() {
            return;
        }
        metrics::counter!("livegrid_cache_invalidations").increment(copies.len() as u64);
        let urls: Vec<Stale> = copies.iter().map(|(url, _)| url.clone()).collect();
        self.purger.purge(&urls, since);
        let mut targets: Vec<String> = Vec::with_capacity(copies.len());
        {
            let mut sketch = self.sketch.lock().expect("sketch lock");
            for (url, until) in copies {
                if *until > since {
                    sketch.add(&url.target, *until);
                }
                if !targets.iter().any(|t| **t == *url.target) {
                    targets.push(url.target.to_string());
                }
            }
        }
        if self.feed.receiver_count() > 0 {
            let message = ServerMessage::Invalidate(InvalidateMessage { urls: targets, position }).to_json();
            let _ = self.feed.send(Arc::from(message));
        }
    }

    /// Keeps what watching `url` taught.
    fn forget(&self, url: String, entry: &Entry, now: Instant) {
        remember(&self.learnt, self.config.entries.saturating_mul(4), url, entry.history(now));
    }

    /// Ends the watches whose copies have all expired (the caller ends their engine
    /// subscriptions), expires the sketch, sends due repurges. Run it every few hundred
    /// milliseconds on the blocking pool.
    pub fn tick(&self) -> Vec<QueryKey> {
        let now = Instant::now();
        let expired: Vec<(String, QueryKey)> = self
            .entries
            .iter()
            .filter(|e| e.live && e.needed_until() <= now)
            .map(|e| (e.key().clone(), e.key))
            .collect();
        let mut ended = Vec::with_capacity(expired.len());
        for (url, key) in expired {
            let Some((url, entry)) = self.entries.remove_if(&url, |_, e| e.key == key && e.needed_until() <= now)
            else {
                continue;
            };
            self.by_key.remove(&key);
            self.budget.release(entry.charge);
            ended.push(key);
            self.forget(url, &entry, now);
        }
        let sketched = {
            let mut sketch = self.sketch.lock().expect("sketch lock");
            sketch.expire(now);
            sketch.len()
        };
        let due: Vec<(Vec<Stale>, Instant)> = {
            let mut repurges = self.repurges.lock().expect("repurge lock");
            let mut due = Vec::new();
            while repurges.front().is_some_and(|(at, ..)| *at <= now) {
                let (_, copies, since) = repurges.pop_front().expect("checked");
                due.push((copies, since));
            }
            due
        };
        for (copies, since) in due {
            self.purger.purge(&copies, since);
        }
        metrics::gauge!("livegrid_cache_watches").set(self.entries.len() as f64);
        metrics::gauge!("livegrid_cache_sketch_urls").set(sketched as f64);
        ended
    }

    /// The cache sketch as clients fetch it (encoded outside the sketch's lock).
    pub fn sketch(&self) -> sketch::Encoded {
        let bits = self.sketch.lock().expect("sketch lock").bits();
        bits.encode()
    }

    /// Results watched now.
    pub fn watched(&self) -> usize {
        self.entries.len()
    }

    /// The invalidation feed: `invalidate` messages as JSON text.
    pub fn feed(&self) -> broadcast::Receiver<Arc<str>> {
        self.feed.subscribe()
    }
}

/// Adds `history` for `url` to `learnt`, making room first when it holds `cap` (an arbitrary
/// entry goes).
fn remember(learnt: &DashMap<String, History>, cap: usize, url: String, history: History) {
    if learnt.len() >= cap {
        // The iterator's shard guard must be gone before `remove` locks that shard.
        let old = learnt.iter().next().map(|e| e.key().clone());
        if let Some(old) = old {
            learnt.remove(&old);
        }
    }
    learnt.insert(url, history);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_was_learnt_stays_bounded() {
        let learnt = DashMap::new();
        for i in 0..50 {
            remember(&learnt, 8, format!("/u/{i}"), History::default());
            assert!(learnt.len() <= 8);
        }
        assert!(learnt.contains_key("/u/49"));
    }
}
