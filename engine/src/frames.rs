//! Outgoing messages of the stages that emit them (the subscription stage and the pipeline
//! view stage): documents encoded once per timestamp, `seq` numbering, and `more` on the
//! deltas of writes that share a position time.

use std::sync::Arc;

use bson::Document;
use livegrid_matcher::Projection;
use livegrid_protocol::{DeltaFrame, Encoded, Frame, Position};
use rustc_hash::FxHashMap as HashMap;

use crate::query_index::QueryKey;
use crate::records::StageOutput;
use crate::window::WindowOp;

/// Outputs gathered before they are handed on (see [`Frames::next`]).
pub const FLUSH_OUTPUTS: usize = 4096;

/// A projection with a fingerprint, so that equal projections share encodings.
pub struct Shown {
    /// The projection.
    pub projection: Projection,
    /// Its fingerprint (never 0: 0 is "no projection").
    pub fingerprint: u64,
}

/// What a stage needs to emit one timestamp's messages.
#[derive(Default)]
pub struct Frames {
    encoder: Encoder,
    group: Group,
    previous_time: Option<u64>,
}

impl Frames {
    /// Starts a timestamp: encodings of the previous one are dropped.
    pub fn begin(&mut self) {
        self.encoder.clear();
        self.group = Group::default();
        self.previous_time = None;
    }

    /// Moves on to the next input, of a write at position time `time` (`next`: the time of
    /// the input after it). When a new time starts, outputs gathered so far are handed to
    /// `flush` once there are [`FLUSH_OUTPUTS`] of them, so that a timestamp with millions of
    /// deltas needs no buffer of millions.
    pub fn next(
        &mut self,
        time: u64,
        next: Option<u64>,
        out: &mut Vec<StageOutput>,
        flush: &mut dyn FnMut(&mut Vec<StageOutput>),
    ) {
        let same_as_previous = self.previous_time == Some(time);
        if !same_as_previous {
            // A new write time: the group before it is complete.
            if out.len() >= FLUSH_OUTPUTS {
                flush(out);
            }
            self.group.last.clear();
        }
        self.group.active = next == Some(time) || same_as_previous;
        self.previous_time = Some(time);
    }

    /// Encodes `doc` as shown through `projection`, once per timestamp.
    pub fn encode(&mut self, doc: &Arc<Document>, projection: Option<&Shown>) -> Encoded {
        self.encoder.encode(doc, projection)
    }

    /// Pushes a delta of subscription `key`.
    pub fn push(&mut self, out: &mut Vec<StageOutput>, key: QueryKey, frame: DeltaFrame, entered: u64) {
        self.group.push(out, key, frame, entered);
    }

    /// Pushes one write's operations on subscription `key`'s list as deltas numbered after
    /// `seq`. They are marked `more` but the last: one write's changes (a document pushed out,
    /// another in) go together.
    pub fn emit(
        &mut self,
        out: &mut Vec<StageOutput>,
        key: QueryKey,
        seq: &mut u64,
        ops: Vec<WindowOp>,
        (position, entered): (Position, u64),
    ) {
        let count = ops.len();
        for (i, op) in ops.into_iter().enumerate() {
            let doc = op.doc.as_ref().map(|d| self.encode(d, None));
            *seq += 1;
            let frame = DeltaFrame {
                seq: *seq,
                op: op.op,
                doc_id: Encoded::value(&op.id),
                doc,
                index: op.index,
                old_index: op.old_index,
                cause: op.cause,
                position,
                more: i + 1 < count,
            };
            self.push(out, key, frame, entered);
        }
    }
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
