//! The committer: one thread that turns queued write requests into redb transactions, many
//! requests per transaction and per fsync (group commit).
//!
//! Each round takes every request waiting in the queue (up to `max_group`), applies each one
//! against the transaction through an overlay, so that a failing request (a duplicate key, a
//! missing document, an update past a limit) leaves no trace while the others commit, and
//! commits once. Then, in this order: durable events go to the listener (the engine), and
//! each request gets its answer.
//!
//! With periodic durability the commit skips the fsync: requests are answered at once, and
//! their events wait in `pending` until the next flush makes them durable. A durable
//! reservation of positions always stays ahead of the positions handed out, so a restart
//! after a crash never reuses one.
//!
//! # Failure
//! A failed commit (a disk error, a failed fsync) cannot be retried safely: the store stops,
//! every queued and later request fails with `Unavailable`, and the server's health turns
//! failed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use bson::Document;
use livegrid_engine::{ChangeEvent, ChangeOp};
use livegrid_protocol::Position;
use redb::{ReadableTable, Table};
use tokio::sync::{mpsc, oneshot};

use super::{
    DOCS, Durability, Guard, Listener, META, POSITION, RESERVED, StoreConfig, StoreError, Write, decode, doc_key,
    id_label, limits, replacement, update, with_id,
};
use crate::health::Health;

/// Positions reserved on disk at a time: one extra fsync per this many writes.
const RESERVE_STEP: u64 = 1 << 16;
/// Events held for the next periodic flush before one is forced.
const MAX_PENDING: usize = 100_000;

/// A write request and where its answer goes.
pub(crate) struct Request {
    pub ns: String,
    pub writes: Vec<Write>,
    /// What every document the request changes must match.
    pub guard: Option<Guard>,
    pub reply: oneshot::Sender<Result<Vec<ChangeEvent>, StoreError>>,
}

/// What the committer is asked to do.
pub(crate) enum Job {
    /// Commit a request.
    Write(Request),
    /// Make everything durable and delivered, then answer.
    Sync(oneshot::Sender<Result<(), StoreError>>),
    /// The periodic flush.
    Tick,
}

/// The committer's threads.
pub(crate) struct Handle {
    committer: JoinHandle<()>,
    ticker: Option<(std::sync::mpsc::Sender<()>, JoinHandle<()>)>,
}

impl Handle {
    /// Waits for the committer to drain its queue (its senders must be gone).
    pub fn join(self) {
        if let Some((stop, thread)) = self.ticker {
            drop(stop);
            let _ = thread.join();
        }
        let _ = self.committer.join();
    }
}

/// Starts the committer (and, for periodic durability, its ticker).
pub(crate) fn start(
    db: Arc<redb::Database>,
    listener: Arc<Mutex<Option<Listener>>>,
    position: u64,
    config: &StoreConfig,
) -> Result<(mpsc::Sender<Job>, Handle), StoreError> {
    let (jobs, queue) = mpsc::channel(config.queue.max(1));
    let spawn_error = |e: std::io::Error| StoreError::Unavailable(format!("starting the committer: {e}"));
    let mut committer = Committer {
        db,
        listener,
        durability: config.durability,
        max_group: config.max_group.max(1),
        health: config.health.clone(),
        position,
        reserved: position,
        unsynced: false,
        pending: Vec::new(),
        failed: None,
        flushed: Instant::now(),
    };
    let committer = std::thread::Builder::new()
        .name("livegrid-commit".into())
        .spawn(move || {
            let health = committer.health.clone();
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| committer.run(queue))).is_err() {
                // Every queued writer gets "unavailable" as the queue drops; say why, loudly.
                health.fail("store: the committer thread panicked");
            }
        })
        .map_err(spawn_error)?;
    let ticker = match config.durability {
        Durability::Durable => None,
        Durability::Periodic(every) => {
            let (stop, stopped) = std::sync::mpsc::channel::<()>();
            let jobs = jobs.downgrade();
            let thread = std::thread::Builder::new()
                .name("livegrid-flush".into())
                .spawn(move || {
                    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                        let Some(jobs) = jobs.upgrade() else { break };
                        // A full queue means the committer is busy and will flush soon anyway.
                        let _ = jobs.try_send(Job::Tick);
                    }
                })
                .map_err(spawn_error)?;
            Some((stop, thread))
        }
    };
    Ok((jobs, Handle { committer, ticker }))
}

struct Committer {
    db: Arc<redb::Database>,
    listener: Arc<Mutex<Option<Listener>>>,
    durability: Durability,
    max_group: usize,
    health: Arc<Health>,
    /// The last position committed.
    position: u64,
    /// Positions up to here are reserved on disk.
    reserved: u64,
    /// Whether commits since the last fsync are not durable yet.
    unsynced: bool,
    /// Committed events not yet durable (periodic durability only).
    pending: Vec<ChangeEvent>,
    /// Why the store stopped, once it did.
    failed: Option<String>,
    /// When commits last became durable.
    flushed: Instant,
}

impl Committer {
    fn run(&mut self, mut queue: mpsc::Receiver<Job>) {
        let mut round = Vec::with_capacity(self.max_group);
        while let Some(job) = queue.blocking_recv() {
            round.push(job);
            while round.len() < self.max_group {
                match queue.try_recv() {
                    Ok(job) => round.push(job),
                    Err(_) => break,
                }
            }
            metrics::gauge!("livegrid_store_queue_depth").set(queue.len() as f64);
            self.round(std::mem::take(&mut round));
        }
        // Closing: make everything durable, deliver it, and mark the stop as clean.
        if self.failed.is_none() {
            let closed = self.flush().and_then(|()| self.mark_clean());
            if let Err(e) = closed {
                self.fail(format!("final flush failed: {e}"));
            }
        }
    }

    fn round(&mut self, jobs: Vec<Job>) {
        let started = Instant::now();
        let mut requests = Vec::new();
        let mut syncs = Vec::new();
        let mut tick = false;
        for job in jobs {
            match job {
                Job::Write(request) => requests.push(request),
                Job::Sync(reply) => syncs.push(reply),
                Job::Tick => tick = true,
            }
        }
        if let Some(reason) = &self.failed {
            for request in requests {
                let _ = request.reply.send(Err(StoreError::Unavailable(reason.clone())));
            }
            for reply in syncs {
                let _ = reply.send(Err(StoreError::Unavailable(reason.clone())));
            }
            return;
        }
        let answers = match self.commit(&requests) {
            Ok(answers) => answers,
            Err(e) => {
                let reason = format!("commit failed: {e}");
                self.fail(reason.clone());
                for request in requests {
                    let _ = request.reply.send(Err(StoreError::Unavailable(reason.clone())));
                }
                for reply in syncs {
                    let _ = reply.send(Err(StoreError::Unavailable(reason.clone())));
                }
                return;
            }
        };
        let committed: usize = answers.iter().filter_map(|a| a.as_ref().ok()).map(Vec::len).sum();
        if committed > 0 {
            metrics::histogram!("livegrid_store_commit_seconds").record(started.elapsed().as_secs_f64());
            metrics::histogram!("livegrid_store_group_size").record(requests.len() as f64);
        }
        let fresh = answers.iter().filter_map(|a| a.as_ref().ok()).flatten().cloned();
        if self.unsynced {
            self.pending.extend(fresh);
        } else {
            // Durable now, and with it every earlier commit: deliver in position order.
            let mut durable = std::mem::take(&mut self.pending);
            durable.extend(fresh);
            self.deliver(durable);
        }
        for (request, answer) in requests.into_iter().zip(answers) {
            metrics::histogram!("livegrid_store_write_seconds").record(started.elapsed().as_secs_f64());
            let _ = request.reply.send(answer);
        }
        // A busy committer flushes on time by itself: the ticker's nudge may not fit the queue.
        let due = match self.durability {
            Durability::Periodic(every) => self.unsynced && self.flushed.elapsed() >= every,
            Durability::Durable => false,
        };
        if tick || due || !syncs.is_empty() || self.pending.len() >= MAX_PENDING {
            let flushed = self.flush();
            if let Err(e) = &flushed {
                self.fail(format!("flush failed: {e}"));
            }
            for reply in syncs {
                let _ = reply.send(match &flushed {
                    Ok(()) => Ok(()),
                    Err(e) => Err(StoreError::Unavailable(e.to_string())),
                });
            }
        }
    }

    /// Applies every request in one transaction; a request that fails leaves no trace.
    fn commit(&mut self, requests: &[Request]) -> Result<Vec<Result<Vec<ChangeEvent>, StoreError>>, redb::Error> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let mut txn = self.db.begin_write()?;
        let mut answers = Vec::with_capacity(requests.len());
        let mut position = self.position;
        let mut reserved = self.reserved;
        {
            let mut docs = txn.open_table(DOCS)?;
            for request in requests {
                let mut overlay = Overlay::default();
                match overlay.apply(&docs, &request.ns, &request.writes, request.guard.as_ref(), position) {
                    Ok(events) => {
                        for (key, value) in overlay.changes {
                            match value {
                                Some(bytes) => docs.insert(key.as_slice(), bytes.as_slice())?,
                                None => docs.remove(key.as_slice())?,
                            };
                        }
                        position += events.len() as u64;
                        answers.push(Ok(events));
                    }
                    Err(e) => answers.push(Err(e)),
                }
            }
            let mut meta = txn.open_table(META)?;
            meta.insert(POSITION, position)?;
            if position > reserved {
                reserved = position + RESERVE_STEP;
                meta.insert(RESERVED, reserved)?;
            }
        }
        if position == self.position {
            // Nothing applied: leave the disk alone.
            txn.abort()?;
            return Ok(answers);
        }
        // The reservation must be durable before any position beyond the old one is used.
        let durable = self.durability == Durability::Durable || reserved != self.reserved;
        txn.set_durability(if durable { redb::Durability::Immediate } else { redb::Durability::None })
            .map_err(|e| redb::Error::Corrupted(format!("setting durability: {e}")))?;
        txn.commit()?;
        self.position = position;
        self.reserved = reserved;
        // An fsync makes every earlier commit durable too.
        self.unsynced = !durable;
        if durable {
            self.flushed = Instant::now();
        }
        Ok(answers)
    }

    /// Makes every commit durable and hands pending events on.
    fn flush(&mut self) -> Result<(), redb::Error> {
        if self.unsynced {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(redb::Durability::Immediate)
                .map_err(|e| redb::Error::Corrupted(format!("setting durability: {e}")))?;
            txn.commit()?;
            self.unsynced = false;
        }
        self.flushed = Instant::now();
        let pending = std::mem::take(&mut self.pending);
        self.deliver(pending);
        Ok(())
    }

    /// Records a clean stop: the next start continues right after the last position.
    fn mark_clean(&mut self) -> Result<(), redb::Error> {
        let txn = self.db.begin_write()?;
        txn.open_table(META)?.insert(RESERVED, self.position)?;
        txn.commit()?;
        Ok(())
    }

    fn deliver(&self, events: Vec<ChangeEvent>) {
        if events.is_empty() {
            return;
        }
        if let Some(listener) = self.listener.lock().expect("listener lock").as_ref() {
            listener(events);
        }
    }

    fn fail(&mut self, reason: String) {
        self.failed = Some(reason.clone());
        self.pending.clear();
        self.health.fail(format!("store: {reason}"));
    }
}

/// A request's changes, applied over the transaction's state without touching it.
#[derive(Default)]
struct Overlay {
    /// The new bytes of each key the request touched (`None`: deleted), in first-touch order.
    changes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    index: HashMap<Vec<u8>, usize>,
}

impl Overlay {
    fn current(&self, docs: &Table<&[u8], &[u8]>, key: &[u8]) -> Result<Option<Document>, StoreError> {
        if let Some(&i) = self.index.get(key) {
            return self.changes[i].1.as_deref().map(super::decode).transpose();
        }
        let stored = docs.get(key).map_err(redb::Error::from)?;
        stored.map(|v| decode(v.value())).transpose()
    }

    fn set(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        match self.index.get(&key) {
            Some(&i) => self.changes[i].1 = value,
            None => {
                self.index.insert(key.clone(), self.changes.len());
                self.changes.push((key, value));
            }
        }
    }

    fn apply(
        &mut self,
        docs: &Table<&[u8], &[u8]>,
        ns: &str,
        writes: &[Write],
        guard: Option<&Guard>,
        mut position: u64,
    ) -> Result<Vec<ChangeEvent>, StoreError> {
        let refused = |id: &bson::Bson| StoreError::Refused(id_label(id), ns.into());
        let guarded = |before: &Option<Document>, id: &bson::Bson| match (guard, before) {
            (Some(guard), Some(before)) if !guard.admits(before) => Err(refused(id)),
            _ => Ok(()),
        };
        let mut events = Vec::with_capacity(writes.len());
        for write in writes {
            let (op, id, after) = match write {
                Write::Insert(doc) => {
                    let doc = with_id(doc.clone())?;
                    let id = doc.get("_id").cloned().expect("with_id sets _id");
                    let key = doc_key(ns, &id)?;
                    if self.current(docs, &key)?.is_some() {
                        return Err(StoreError::Duplicate(id_label(&id), ns.into()));
                    }
                    self.set(key, Some(limits::encode_checked(&doc)?));
                    (ChangeOp::Insert, id, Some(doc))
                }
                Write::Replace(id, doc) => {
                    let doc = replacement(id, doc.clone())?;
                    let key = doc_key(ns, id)?;
                    let before = self.current(docs, &key)?;
                    guarded(&before, id)?;
                    if before.as_ref() == Some(&doc) {
                        // A no-op, as in MongoDB: no write, no event, no position.
                        continue;
                    }
                    let existed = before.is_some();
                    self.set(key, Some(limits::encode_checked(&doc)?));
                    (if existed { ChangeOp::Replace } else { ChangeOp::Insert }, id.clone(), Some(doc))
                }
                Write::Update(id, changes) => {
                    let key = doc_key(ns, id)?;
                    let before = self.current(docs, &key)?;
                    guarded(&before, id)?;
                    let Some(before) = before else {
                        return Err(StoreError::NotFound(id_label(id), ns.into()));
                    };
                    let after = if update::is_operator_update(changes) {
                        update::apply(&before, changes)?
                    } else {
                        replacement(id, changes.clone())?
                    };
                    if after == before {
                        continue;
                    }
                    let bytes = limits::encode_checked(&after).map_err(|e| match e {
                        limits::LimitError::TooLarge { size } => limits::LimitError::UpdatedTooLarge { size },
                        other => other,
                    })?;
                    self.set(key, Some(bytes));
                    (ChangeOp::Update, id.clone(), Some(after))
                }
                Write::Delete(id) => {
                    let key = doc_key(ns, id)?;
                    let before = self.current(docs, &key)?;
                    guarded(&before, id)?;
                    if before.is_none() {
                        return Err(StoreError::NotFound(id_label(id), ns.into()));
                    }
                    self.set(key, None);
                    (ChangeOp::Delete, id.clone(), None)
                }
            };
            position += 1;
            events.push(ChangeEvent {
                position: Position::new(position),
                ns: ns.to_string(),
                op,
                id,
                doc: after.map(Arc::new),
            });
        }
        Ok(events)
    }
}
