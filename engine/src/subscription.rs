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
//!
//! # Encoding once
//! Messages leave as [`Frame`]s whose documents are already relaxed Extended JSON. Within one
//! timestamp, a document is encoded once per projection and the text is shared by every
//! subscription that shows it (without a projection, windows keep the written document itself,
//! so they share it too).
//!
//! # Unchanged documents
//! An unsorted subscription without a projection keeps nothing per document: the matching
//! stage says whether a write's document entered, stayed in or left its result. With a
//! projection it keeps, per document, a 64-bit hash of the text its client holds, keyed by
//! the document's 32-bit slot (ids are kept once per worker; no copies); a `change` whose
//! projected text equals it is not sent, so five updates of a field a projection leaves out
//! send nothing. Windows compare documents themselves.

use rustc_hash::FxHashMap as HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use bson::Document;
use livegrid_matcher::{Projection, Query};
use livegrid_protocol::{Cause, DeltaFrame, DeltaOp, Encoded, Frame, Position, ResultFrame};

use crate::doc_id::DocId;
use crate::live_pipeline::{Core, View};
use crate::query_index::QueryKey;
use crate::records::{StageInit, StageInput, StageOutput, Transition, WirePipeline};
use crate::slots::Slots;
use crate::window::{Window, WindowOp};

/// A projection with a fingerprint, so that equal projections share encodings.
struct Shown {
    projection: Projection,
    fingerprint: u64,
}

/// A projected unsorted subscription: its projection, and per document its client holds
/// (by slot) the hash of the text shown, so that a change the projection hides sends
/// nothing. Without a projection no per-document state is kept: the matching stage tells
/// whether the document entered, stayed in or left the result, and every write of a held
/// document changes what the client holds (sources emit no no-op updates: MongoDB writes no
/// oplog entry for them and the embedded store skips them).
struct Projected {
    shown: Shown,
    hashes: HashMap<u32, u64>,
}

enum Mode {
    /// No sort, skip or limit: the result is the set of matching documents.
    Set { projected: Option<Box<Projected>> },
    /// A sorted (or skipped, or limited) window.
    Window(Box<Window>),
    /// A live pipeline: the result is its output, one document per group, kept by a view of
    /// the core it shares with identical pipelines (see [`Watchers`]).
    Aggregate,
}

struct Subscription {
    seq: u64,
    skip_until: Position,
    mode: Mode,
    reload_pending: bool,
}

/// Subscriptions to one core whose stages after `$group` are the same: one view serves them
/// all, and each gets its operations (with its own `seq`).
struct Watchers {
    stages: Vec<u8>,
    view: View,
    keys: Vec<QueryKey>,
}

/// The subscription stage's state on one worker.
pub struct Subscriptions {
    subs: HashMap<QueryKey, Subscription>,
    /// Live pipeline cores, by their grid registration's key.
    cores: HashMap<QueryKey, Core>,
    /// The views of each core.
    watchers: HashMap<QueryKey, Vec<Watchers>>,
    slack: usize,
    encoder: Encoder,
    slots: Slots,
    group: Group,
}

/// Writes that share a position time (one transaction, one bulk request): a subscription's
/// deltas from them are marked `more` but the last, so that clients never show half of it.
#[derive(Default)]
struct Group {
    /// Whether the write being applied shares its time with another.
    active: bool,
    /// Per subscription, where its last delta of the group is in the output.
    last: HashMap<QueryKey, usize>,
}

impl Group {
    /// Pushes a delta: the subscription's previous delta of the same group gets `more`.
    fn push(&mut self, out: &mut Vec<StageOutput>, key: QueryKey, frame: DeltaFrame, entered: u64) {
        if self.active {
            if let Some(&index) = self.last.get(&key)
                && let Some(StageOutput::Frame { frame: Frame::Delta(previous), .. }) = out.get_mut(index)
            {
                previous.more = true;
            }
            self.last.insert(key, out.len());
        }
        out.push(StageOutput::Frame { key, frame: Frame::Delta(frame), entered });
    }
}

/// Encodings made during the current timestamp, by document (its address) and projection.
#[derive(Default)]
struct Encoder {
    encoded: HashMap<(usize, u64), Encoded>,
    /// The documents behind the addresses, kept alive while the addresses are keys.
    pinned: Vec<Arc<Document>>,
}

impl Encoder {
    fn clear(&mut self) {
        self.encoded.clear();
        self.pinned.clear();
    }

    /// Encodes `doc` as shown through `projection`, once per timestamp.
    fn encode(&mut self, doc: &Arc<Document>, projection: Option<&Shown>) -> Encoded {
        let slot = (Arc::as_ptr(doc) as usize, projection.map_or(0, |p| p.fingerprint));
        if let Some(text) = self.encoded.get(&slot) {
            return text.clone();
        }
        let text = match projection {
            Some(p) => Encoded::document(&p.projection.apply(doc)),
            None => Encoded::document(doc),
        };
        self.pinned.push(doc.clone());
        self.encoded.insert(slot, text.clone());
        text
    }
}

/// Outputs gathered before they are handed on (see [`Subscriptions::apply`]).
pub const FLUSH_OUTPUTS: usize = 4096;

/// One write as the subscription stage applies it to each subscription it concerns.
struct Write {
    /// Its position, and when it entered the engine.
    at: (Position, u64),
    cause: Cause,
    id: DocId,
    /// The id's encoding, made once for all the write's deltas.
    id_text: std::cell::OnceCell<Encoded>,
    /// The document after the write, if any subscription matches it.
    doc: Option<Arc<Document>>,
}

/// The hash of an encoded text (for the unchanged-document check).
fn text_hash(text: &Encoded) -> u64 {
    let mut hasher = rustc_hash::FxHasher::default();
    text.as_str().hash(&mut hasher);
    hasher.finish()
}

impl Subscriptions {
    /// A stage whose windows keep `slack` documents beyond their visible end.
    pub fn new(slack: usize) -> Self {
        Subscriptions {
            subs: HashMap::default(),
            cores: HashMap::default(),
            watchers: HashMap::default(),
            slack,
            encoder: Encoder::default(),
            slots: Slots::default(),
            group: Group::default(),
        }
    }

    /// How many subscriptions this worker holds.
    pub fn len(&self) -> usize {
        self.subs.len()
    }

    /// Whether the worker holds no subscription.
    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    /// Applies the inputs of one complete timestamp (draining them). Outputs gather in `out`,
    /// which is handed to `flush` whenever it holds [`FLUSH_OUTPUTS`] or more, so that a
    /// timestamp with millions of deltas needs no buffer of millions.
    pub fn apply(
        &mut self,
        inputs: &mut Vec<StageInput>,
        out: &mut Vec<StageOutput>,
        flush: &mut impl FnMut(&mut Vec<StageOutput>),
    ) {
        // One input per (subscription, write) at most: ties in (position, kind) are between
        // different subscriptions, so an unstable sort (no scratch buffer) keeps the order.
        inputs.sort_unstable_by_key(|input| (input.order(), input.key()));
        self.encoder.clear();
        self.group = Group::default();
        let mut previous_time = None;
        let mut inputs = inputs.drain(..).peekable();
        while let Some(input) = inputs.next() {
            let time = input.order().0.time();
            let same_as_next = inputs.peek().is_some_and(|next| next.order().0.time() == time);
            let same_as_previous = previous_time == Some(time);
            if !same_as_previous {
                // A new write time: the group before it is complete.
                if out.len() >= FLUSH_OUTPUTS {
                    flush(out);
                }
                self.group.last.clear();
            }
            self.group.active = same_as_next || same_as_previous;
            previous_time = Some(time);
            match input {
                StageInput::Init { key, query: wire, init, reload } => {
                    // Registration compiled both already; a failure here cannot happen.
                    let Ok(query) = wire.compile() else { continue };
                    let Ok(pipeline) = wire.pipeline.as_ref().map(WirePipeline::compile).transpose() else { continue };
                    if let Some(pipeline) = pipeline {
                        // A live pipeline's core: its views attach next.
                        let docs = init.docs.into_iter().map(|d| d.0);
                        self.cores.insert(key, Core::new(pipeline, docs, init.position, &mut self.slots));
                    } else if reload {
                        self.reload(key, init, out);
                    } else {
                        self.start(key, &query, init, out);
                    }
                }
                StageInput::Attach(attach) => self.attach(*attach, out),
                StageInput::Detach { core, view } => {
                    self.subs.remove(&view);
                    if let Some(list) = self.watchers.get_mut(&core) {
                        for watchers in list.iter_mut() {
                            watchers.keys.retain(|k| *k != view);
                        }
                        list.retain(|watchers| !watchers.keys.is_empty());
                    }
                }
                StageInput::Transitions { position, cause, id, doc, keys, entered } => {
                    let write = Write {
                        at: (position, entered),
                        cause,
                        id: DocId::from(id.0),
                        id_text: std::cell::OnceCell::new(),
                        doc: doc.map(|d| d.0),
                    };
                    for (key, transition) in keys {
                        if self.cores.contains_key(&key) {
                            self.core_write(key, &write, transition, out);
                        } else {
                            self.transition(key, &write, transition, out);
                        }
                    }
                }
                StageInput::Drop { key } => match self.subs.remove(&key).map(|sub| sub.mode) {
                    Some(Mode::Set { projected: Some(projected) }) => {
                        for slot in projected.hashes.into_keys() {
                            self.slots.release(slot);
                        }
                    }
                    _ => {
                        if let Some(core) = self.cores.remove(&key) {
                            for watchers in self.watchers.remove(&key).unwrap_or_default() {
                                for view in watchers.keys {
                                    self.subs.remove(&view);
                                }
                            }
                            core.release(&mut self.slots);
                        }
                    }
                },
            }
        }
    }

    /// A pipeline subscription attaches to its core: its initial result is the core's state
    /// through its stages after `$group` (a view other subscriptions may share already).
    fn attach(&mut self, attach: crate::records::Attach, out: &mut Vec<StageOutput>) {
        let Some(core) = self.cores.get(&attach.core) else {
            // The core is registered before its views.
            debug_assert!(false, "a view attached to a missing core");
            return;
        };
        let stages = attach.pipeline.after_group();
        let list = self.watchers.entry(attach.core).or_default();
        let docs = match list.iter_mut().find(|watchers| watchers.stages == stages) {
            Some(watchers) => {
                watchers.keys.push(attach.view);
                watchers.view.shown()
            }
            None => {
                // It compiled at registration.
                let Ok(pipeline) = attach.pipeline.compile() else { return };
                let (view, docs) = View::new(pipeline, core);
                list.push(Watchers { stages, view, keys: vec![attach.view] });
                docs
            }
        };
        let position = attach.position.max(core.position());
        let docs = docs.iter().map(|d| self.encoder.encode(d, None)).collect();
        let frame = Frame::Result(ResultFrame { seq: 1, docs, position });
        out.push(StageOutput::Frame { key: attach.view, frame, entered: 0 });
        let sub = Subscription { seq: 1, skip_until: position, mode: Mode::Aggregate, reload_pending: false };
        self.subs.insert(attach.view, sub);
    }

    /// Applies one write to a pipeline core, and what it changed to the core's views.
    fn core_write(&mut self, key: QueryKey, write: &Write, transition: Transition, out: &mut Vec<StageOutput>) {
        let Write { at: (position, entered), cause, ref id, ref doc, .. } = *write;
        let doc = if transition.matches() { doc.as_deref() } else { None };
        let Subscriptions { subs, cores, slots, watchers, .. } = self;
        let Some(core) = cores.get_mut(&key) else { return };
        let Some(changes) = core.apply(slots, id, doc, position) else { return };
        if changes.is_empty() {
            return;
        }
        let core = &*core;
        let mut pending = Vec::new();
        for watchers in watchers.get_mut(&key).into_iter().flatten() {
            let ops = watchers.view.apply(core, &changes, cause);
            if ops.is_empty() {
                continue;
            }
            for view in &watchers.keys {
                // Every write a core applies after a view attached is past its start.
                debug_assert!(subs.get(view).is_none_or(|sub| position > sub.skip_until));
                pending.push((*view, ops.clone()));
            }
        }
        for (view, ops) in pending {
            self.emit(view, ops, (position, entered), out);
        }
    }

    fn start(&mut self, key: QueryKey, query: &Query, init: StageInit, out: &mut Vec<StageOutput>) {
        let docs = init.docs.into_iter().map(|d| d.0);
        let (mode, shown) = if !crate::window::is_window(query) {
            let mut projected = (!query.projection.is_identity()).then(|| {
                let fingerprint = {
                    let mut hasher = rustc_hash::FxHasher::default();
                    format!("{:?}", query.projection).hash(&mut hasher);
                    hasher.finish() | 1
                };
                let shown = Shown { projection: query.projection.clone(), fingerprint };
                Box::new(Projected { shown, hashes: HashMap::default() })
            });
            let mut texts = Vec::new();
            for doc in docs {
                let text = self.encoder.encode(&doc, projected.as_deref().map(|p| &p.shown));
                if let (Some(projected), Some(id)) = (projected.as_mut(), doc.get("_id")) {
                    let slot = self.slots.acquire(&DocId::new(id));
                    if projected.hashes.insert(slot, text_hash(&text)).is_some() {
                        self.slots.release(slot);
                    }
                }
                texts.push(text);
            }
            (Mode::Set { projected }, texts)
        } else {
            let mut window = Window::new(query, self.slack);
            window.load(docs, init.complete);
            window.mark_shown();
            let visible: Vec<Arc<Document>> = window.visible().cloned().collect();
            let texts = visible.iter().map(|d| self.encoder.encode(d, None)).collect();
            (Mode::Window(Box::new(window)), texts)
        };
        let frame = Frame::Result(ResultFrame { seq: 1, docs: shown, position: init.position });
        out.push(StageOutput::Frame { key, frame, entered: 0 });
        self.subs.insert(key, Subscription { seq: 1, skip_until: init.position, mode, reload_pending: false });
    }

    fn reload(&mut self, key: QueryKey, init: StageInit, out: &mut Vec<StageOutput>) {
        let Some(sub) = self.subs.get_mut(&key) else { return };
        let Mode::Window(window) = &mut sub.mode else { return };
        window.load(init.docs.into_iter().map(|d| d.0), init.complete);
        sub.skip_until = sub.skip_until.max(init.position);
        sub.reload_pending = false;
        let ops = window.flush();
        self.emit(key, ops, (init.position, 0), out);
    }

    /// Applies one write to one subscription.
    fn transition(&mut self, key: QueryKey, write: &Write, transition: Transition, out: &mut Vec<StageOutput>) {
        let Write { at: (position, entered), cause, ref id, ref doc, .. } = *write;
        let doc = if transition.matches() { doc.as_ref() } else { None };
        let Subscriptions { subs, encoder, slots, .. } = self;
        let Some(sub) = subs.get_mut(&key) else { return };
        if position <= sub.skip_until {
            return;
        }
        match &mut sub.mode {
            Mode::Set { projected } => {
                let (op, text) = match (doc, projected) {
                    (None, None) => (DeltaOp::Remove, None),
                    (Some(doc), None) => {
                        let op = if transition.matched() { DeltaOp::Change } else { DeltaOp::Add };
                        (op, Some(encoder.encode(doc, None)))
                    }
                    (None, Some(projected)) => {
                        let Some(slot) = slots.find(id) else { return };
                        if projected.hashes.remove(&slot).is_none() {
                            return;
                        }
                        slots.release(slot);
                        (DeltaOp::Remove, None)
                    }
                    (Some(doc), Some(projected)) => {
                        let text = encoder.encode(doc, Some(&projected.shown));
                        let hash = text_hash(&text);
                        let slot = slots.find(id);
                        let held = slot.and_then(|slot| projected.hashes.get(&slot).copied());
                        if held == Some(hash) {
                            // What the client holds already: nothing to send.
                            return;
                        }
                        let slot = match (held, slot) {
                            (Some(_), Some(slot)) => slot,
                            _ => slots.acquire(id),
                        };
                        projected.hashes.insert(slot, hash);
                        (if held.is_some() { DeltaOp::Change } else { DeltaOp::Add }, Some(text))
                    }
                };
                sub.seq += 1;
                let frame = DeltaFrame {
                    seq: sub.seq,
                    op,
                    doc_id: write.id_text.get_or_init(|| Encoded::value(&id.to_bson())).clone(),
                    doc: text,
                    index: None,
                    old_index: None,
                    cause,
                    position,
                    more: false,
                };
                self.group.push(out, key, frame, entered);
            }
            // A pipeline's writes reach it through its core.
            Mode::Aggregate => {}
            Mode::Window(window) => {
                if sub.reload_pending {
                    // Held back until the re-read arrives; the buffer keeps up silently.
                    window.desync();
                    match doc {
                        Some(d) => window.upsert(d, cause),
                        None => window.remove(id, cause),
                    };
                    return;
                }
                if window.might_drain() {
                    // This write may drain the window: keep what the client has, in case.
                    window.desync();
                }
                let mut ops = match doc {
                    Some(d) => window.upsert(d, cause),
                    None => window.remove(id, cause),
                };
                if window.needs_reload() {
                    sub.reload_pending = true;
                    out.push(StageOutput::NeedsReload { key });
                    return;
                }
                ops.extend(window.flush());
                self.emit(key, ops, (position, entered), out);
            }
        }
    }

    fn emit(
        &mut self,
        key: QueryKey,
        ops: Vec<WindowOp>,
        (position, entered): (Position, u64),
        out: &mut Vec<StageOutput>,
    ) {
        let count = ops.len();
        for (i, op) in ops.into_iter().enumerate() {
            let doc = op.doc.as_ref().map(|d| self.encoder.encode(d, None));
            let Some(sub) = self.subs.get_mut(&key) else { return };
            sub.seq += 1;
            let frame = DeltaFrame {
                seq: sub.seq,
                op: op.op,
                doc_id: Encoded::value(&op.id),
                doc,
                index: op.index,
                old_index: op.old_index,
                cause: op.cause,
                position,
                // One write's window changes (a document pushed out, another in) go together.
                more: i + 1 < count,
            };
            self.group.push(out, key, frame, entered);
        }
    }
}
