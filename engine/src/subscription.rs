//! The subscription stage: turns a subscription's transitions into its messages.
//!
//! Transitions for one subscription come from every worker of its column, so within a
//! timestamp they arrive in any order; the stage applies them sorted by position once the
//! timestamp is complete. It skips writes at or below the snapshot position the subscription
//! was registered (or re-read) at, keeps exactly what the client was shown, and numbers the
//! messages (`seq` grows by one per message).
//!
//! # Invariant
//! Applying a subscription's messages in `seq` order to its initial result yields, once the
//! engine has processed position X, the query's result on the database state at X. A window
//! never shows more than `limit` documents after any message: pushed-out documents are
//! removed before others are added. While a window waits for a re-read, its messages are
//! held back and then sent as one reconciliation, so the client never sees a window that is
//! short of documents it should show.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::sync::Arc;

use bson::Document;
use livegrid_matcher::{Projection, Query};
use livegrid_protocol::{Cause, DeltaOp, Position};

use crate::doc_id::DocId;
use crate::query_index::QueryKey;
use crate::records::{StageInit, StageInput, StageOutput};
use crate::window::{Window, WindowOp};
use crate::wire::{WireDoc, WireValue};

enum Mode {
    /// No sort, skip or limit: the result is a set.
    Set { ids: HashSet<DocId>, projection: Option<Box<Projection>> },
    /// A sorted (or skipped, or limited) window.
    Window(Box<Window>),
}

struct Subscription {
    seq: u64,
    skip_until: Position,
    mode: Mode,
    reload_pending: bool,
}

/// The subscription stage's state on one worker.
pub struct Subscriptions {
    subs: HashMap<QueryKey, Subscription>,
    slack: usize,
}

impl Subscriptions {
    /// A stage whose windows keep `slack` documents beyond their visible end.
    pub fn new(slack: usize) -> Self {
        Subscriptions { subs: HashMap::default(), slack }
    }

    /// How many subscriptions this worker holds.
    pub fn len(&self) -> usize {
        self.subs.len()
    }

    /// Whether the worker holds no subscription.
    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    /// Applies the inputs of one complete timestamp.
    pub fn apply(&mut self, mut inputs: Vec<StageInput>, out: &mut Vec<StageOutput>) {
        inputs.sort_by_key(StageInput::order);
        for input in inputs {
            match input {
                StageInput::Init { key, query, init, reload } => {
                    let Ok(query) = Query::compile(&query.to_spec()) else { continue };
                    if reload {
                        self.reload(key, init, out);
                    } else {
                        self.start(key, &query, init, out);
                    }
                }
                StageInput::Transition { key, position, cause, id, doc, entered } => {
                    self.transition(key, (position, entered), cause, DocId(id.0), doc.map(|d| d.0), out)
                }
                StageInput::Drop { key } => {
                    self.subs.remove(&key);
                }
            }
        }
    }

    fn start(&mut self, key: QueryKey, query: &Query, init: StageInit, out: &mut Vec<StageOutput>) {
        let docs = init.docs.into_iter().map(|d| d.0);
        let (mode, shown) = if !crate::window::is_window(query) {
            let docs: Vec<Arc<Document>> = docs.collect();
            let ids = docs.iter().filter_map(|d| d.get("_id").cloned()).map(DocId).collect();
            let shown: Vec<Arc<Document>> = docs.iter().map(|d| project(&query.projection, d)).collect();
            (
                Mode::Set {
                    ids,
                    projection: (!query.projection.is_identity()).then(|| Box::new(query.projection.clone())),
                },
                shown,
            )
        } else {
            let mut window = Window::new(query, self.slack);
            window.load(docs, init.complete);
            window.mark_shown();
            let shown: Vec<Arc<Document>> = window.visible().cloned().collect();
            (Mode::Window(Box::new(window)), shown)
        };
        out.push(StageOutput::Result {
            key,
            seq: 1,
            docs: shown.into_iter().map(WireDoc).collect(),
            position: init.position,
        });
        self.subs.insert(key, Subscription { seq: 1, skip_until: init.position, mode, reload_pending: false });
    }

    fn reload(&mut self, key: QueryKey, init: StageInit, out: &mut Vec<StageOutput>) {
        let Some(sub) = self.subs.get_mut(&key) else { return };
        let Mode::Window(window) = &mut sub.mode else { return };
        window.load(init.docs.into_iter().map(|d| d.0), init.complete);
        sub.skip_until = sub.skip_until.max(init.position);
        sub.reload_pending = false;
        Self::flush(key, sub, (init.position, 0), out);
    }

    fn transition(
        &mut self,
        key: QueryKey,
        (position, entered): (Position, u64),
        cause: Cause,
        id: DocId,
        doc: Option<Arc<Document>>,
        out: &mut Vec<StageOutput>,
    ) {
        let Some(sub) = self.subs.get_mut(&key) else { return };
        if position <= sub.skip_until {
            return;
        }
        match &mut sub.mode {
            Mode::Set { ids, projection } => {
                let op = match (&doc, ids.contains(&id)) {
                    (Some(_), true) => DeltaOp::Change,
                    (Some(_), false) => DeltaOp::Add,
                    (None, true) => DeltaOp::Remove,
                    (None, false) => return,
                };
                match op {
                    DeltaOp::Add => {
                        ids.insert(id.clone());
                    }
                    DeltaOp::Remove => {
                        ids.remove(&id);
                    }
                    _ => {}
                }
                sub.seq += 1;
                out.push(StageOutput::Delta {
                    key,
                    seq: sub.seq,
                    op,
                    id: WireValue(id.0),
                    doc: doc.map(|d| {
                        WireDoc(match projection {
                            Some(p) => Arc::new(p.apply(&d)),
                            None => d,
                        })
                    }),
                    index: None,
                    old_index: None,
                    cause,
                    position,
                    entered,
                });
            }
            Mode::Window(window) => {
                if sub.reload_pending {
                    // Held back until the re-read arrives; the buffer keeps up silently.
                    window.desync();
                    match &doc {
                        Some(d) => window.upsert(d, cause),
                        None => window.remove(&id, cause),
                    };
                    return;
                }
                if window.might_drain() {
                    // This write may drain the window: keep what the client has, in case.
                    window.desync();
                }
                let mut ops = match &doc {
                    Some(d) => window.upsert(d, cause),
                    None => window.remove(&id, cause),
                };
                if window.needs_reload() {
                    sub.reload_pending = true;
                    out.push(StageOutput::NeedsReload { key });
                    return;
                }
                ops.extend(window.flush());
                Self::emit(key, sub, ops, (position, entered), out);
            }
        }
    }

    fn flush(key: QueryKey, sub: &mut Subscription, at: (Position, u64), out: &mut Vec<StageOutput>) {
        let Mode::Window(window) = &mut sub.mode else { return };
        let ops = window.flush();
        Self::emit(key, sub, ops, at, out);
    }

    fn emit(
        key: QueryKey,
        sub: &mut Subscription,
        ops: Vec<WindowOp>,
        (position, entered): (Position, u64),
        out: &mut Vec<StageOutput>,
    ) {
        for op in ops {
            sub.seq += 1;
            out.push(StageOutput::Delta {
                key,
                seq: sub.seq,
                op: op.op,
                id: WireValue(op.id),
                doc: op.doc.map(WireDoc),
                index: op.index,
                old_index: op.old_index,
                cause: op.cause,
                position,
                entered,
            });
        }
    }
}

fn project(projection: &Projection, doc: &Arc<Document>) -> Arc<Document> {
    if projection.is_identity() { doc.clone() } else { Arc::new(projection.apply(doc)) }
}
