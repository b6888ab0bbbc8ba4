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
use livegrid_matcher::Query;
use livegrid_protocol::{Cause, DeltaFrame, DeltaOp, Encoded, Frame, Position, ResultFrame};

use crate::doc_id::DocId;
use crate::frames::{Frames, Shown};
use crate::live_pipeline::Members;
use crate::live_pipeline::members::{At, contribute};
use crate::query_index::QueryKey;
use crate::records::{GroupInput, StageInit, StageInput, StageOutput, Transition, ViewInput, WirePipeline};
use crate::slots::Slots;
use crate::window::{Window, WindowOp};

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
    /// Live pipeline cores' members, by their grid registration's key (see
    /// [`crate::live_pipeline`]).
    cores: HashMap<QueryKey, Members>,
    slack: usize,
    /// Workers in the grid (a core's start and end go to each of the group stage).
    peers: usize,
    frames: Frames,
    slots: Slots,
}

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
    /// A stage whose windows keep `slack` documents beyond their visible end, in a grid of
    /// `peers` workers.
    pub fn new(slack: usize, peers: usize) -> Self {
        Subscriptions {
            subs: HashMap::default(),
            cores: HashMap::default(),
            slack,
            peers,
            frames: Frames::default(),
            slots: Slots::default(),
        }
    }

    /// How many query subscriptions this worker holds (pipeline subscriptions are the view
    /// stage's).
    pub fn len(&self) -> usize {
        self.subs.len()
    }

    /// Whether the worker holds no subscription.
    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    /// Applies the inputs of one complete timestamp (draining them). Outputs gather in `out`,
    /// which is handed to `flush` whenever it holds [`crate::frames::FLUSH_OUTPUTS`] or more,
    /// so that a timestamp with millions of deltas needs no buffer of millions. What live
    /// pipelines send on to the group stage gathers in `groups`.
    pub fn apply(
        &mut self,
        inputs: &mut Vec<StageInput>,
        out: &mut Vec<StageOutput>,
        flush: &mut dyn FnMut(&mut Vec<StageOutput>),
        groups: &mut Vec<GroupInput>,
    ) {
        // One input per (subscription, write) at most: ties in (position, kind) are between
        // different subscriptions, so an unstable sort (no scratch buffer) keeps the order.
        inputs.sort_unstable_by_key(|input| (input.order(), input.key()));
        self.frames.begin();
        let mut inputs = inputs.drain(..).peekable();
        while let Some(input) = inputs.next() {
            let time = input.order().0.time();
            self.frames.next(time, inputs.peek().map(|next| next.order().0.time()), out, flush);
            match input {
                StageInput::Init { key, query: wire, init, reload } => {
                    // Registration compiled both already; a failure here cannot happen.
                    let Ok(query) = wire.compile() else { continue };
                    match wire.pipeline {
                        Some(pipeline) => self.start_core(key, pipeline, init, groups),
                        None if reload => self.reload(key, init, out),
                        None => self.start(key, &query, init, out),
                    }
                }
                StageInput::Attach(attach) => groups.push(GroupInput::View(ViewInput::Attach(attach))),
                StageInput::Detach { core, view } => groups.push(GroupInput::View(ViewInput::Detach { core, view })),
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
                            self.core_write(key, &write, transition, groups);
                        } else {
                            self.transition(key, &write, transition, out);
                        }
                    }
                }
                StageInput::Notice { key, code, message } => out.push(StageOutput::Ended { key, code, message }),
                StageInput::Drop { key } => match self.subs.remove(&key).map(|sub| sub.mode) {
                    Some(Mode::Set { projected: Some(projected) }) => {
                        for slot in projected.hashes.into_keys() {
                            self.slots.release(slot);
                        }
                    }
                    _ => {
                        if let Some(members) = self.cores.remove(&key) {
                            members.release(&mut self.slots);
                            groups.extend(
                                (0..self.peers).map(|target| GroupInput::End { target: target as u32, core: key }),
                            );
                            groups.push(GroupInput::View(ViewInput::Drop { core: key }));
                        }
                    }
                },
            }
        }
    }

    /// A live pipeline's core starts from its snapshot: its members here, its groups on the
    /// group stage's workers, its outputs on the view stage (where its views attach next).
    fn start_core(&mut self, key: QueryKey, pipeline: WirePipeline, init: StageInit, groups: &mut Vec<GroupInput>) {
        // It compiled at registration.
        let Ok(compiled) = pipeline.compile() else { return };
        let docs = init.docs.into_iter().map(|d| d.0);
        let (members, changes) = Members::new(compiled, docs, init.position, &mut self.slots);
        self.cores.insert(key, members);
        let position = init.position;
        groups.extend((0..self.peers).map(|target| GroupInput::Start {
            target: target as u32,
            core: key,
            pipeline: pipeline.clone(),
            position,
        }));
        groups.push(GroupInput::View(ViewInput::Start { core: key, position }));
        contribute(key, changes, At { position, cause: Cause::None, entered: 0 }, groups);
    }

    /// Applies one write to a pipeline core's members; its contributions go to the group stage.
    fn core_write(&mut self, key: QueryKey, write: &Write, transition: Transition, groups: &mut Vec<GroupInput>) {
        let Write { at: (position, entered), cause, ref id, ref doc, .. } = *write;
        let doc = if transition.matches() { doc.as_deref() } else { None };
        let Some(members) = self.cores.get_mut(&key) else { return };
        let Some(changes) = members.apply(&mut self.slots, id, doc, position) else { return };
        if !changes.is_empty() {
            contribute(key, changes, At { position, cause, entered }, groups);
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
                let text = self.frames.encode(&doc, projected.as_deref().map(|p| &p.shown));
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
            let texts = visible.iter().map(|d| self.frames.encode(d, None)).collect();
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
        let Subscriptions { subs, frames, slots, .. } = self;
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
                        (op, Some(frames.encode(doc, None)))
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
                        let text = frames.encode(doc, Some(&projected.shown));
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
                frames.push(out, key, frame, entered);
            }
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

    fn emit(&mut self, key: QueryKey, ops: Vec<WindowOp>, at: (Position, u64), out: &mut Vec<StageOutput>) {
        let Subscriptions { subs, frames, .. } = self;
        if let Some(sub) = subs.get_mut(&key) {
            frames.emit(out, key, &mut sub.seq, ops, at);
        }
    }
}
