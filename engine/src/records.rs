//! The records that flow through the grid's dataflow, stage to stage.
//!
//! ```text
//! ingest ──GridInput──▶ matching (worker (q, w)) ──StageInput──▶ subscriptions (worker key % peers) ──StageOutput──────────▶ engine
//!                                                                     │ GroupInput (live pipelines)                          ▲
//!                                                                     ▼                                                      │
//!                                                 groups (worker hash(core, group key) % peers) ──ViewInput──▶ views (core % peers)
//! ```

use bson::{Bson, Document};
use std::sync::Arc;

use livegrid_matcher::pipeline::{Contribution, decode_contributions, encode_contributions};
use livegrid_matcher::{Pipeline, PipelineError, Query, QueryError, QuerySpec};
use livegrid_protocol::{Cause, ErrorCode, Frame, Position};
use serde::{Deserialize, Serialize};

use crate::query_index::QueryKey;
use crate::wire::{WireDoc, WireEvent, WireValue};

/// A query as it travels: its parts as BSON documents, and, within one process, the compiled
/// form the registering thread made (compiled once per registration, shared by every worker
/// of the column and the subscription stage; a worker in another process compiles it again).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireQuery {
    /// The filter.
    pub filter: WireDoc,
    /// The sort, if any.
    pub sort: Option<WireDoc>,
    /// Documents to skip.
    pub skip: u64,
    /// Documents to show at most.
    pub limit: Option<u64>,
    /// The projection, if any.
    pub projection: Option<WireDoc>,
    /// The compiled query (not serialized: it does not cross processes).
    #[serde(skip)]
    pub compiled: Option<Arc<Query>>,
    /// For a live pipeline: the pipeline, whose `$group` output is the subscription's result
    /// (the filter is then the pipeline's first `$match`, what the grid's index uses).
    #[serde(default)]
    pub pipeline: Option<WirePipeline>,
}

/// An aggregation pipeline as it travels: its stages, and within one process the compiled
/// form (compiled once per registration).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WirePipeline {
    /// The stages, as `{"stages": [...]}`.
    pub stages: WireDoc,
    /// The compiled pipeline (not serialized: it does not cross processes).
    #[serde(skip)]
    pub compiled: Option<Arc<Pipeline>>,
}

impl WirePipeline {
    /// A pipeline's stages with their compiled form.
    pub fn new(stages: Vec<Bson>, compiled: Arc<Pipeline>) -> Self {
        WirePipeline { stages: WireDoc(Arc::new(bson::doc! {"stages": stages})), compiled: Some(compiled) }
    }

    /// The stages through `$group` and those after it (all stages, none after, without one).
    pub fn split_at_group(&self) -> (Vec<Bson>, Vec<Bson>) {
        let mut stages = self.stages.0.get_array("stages").cloned().unwrap_or_default();
        let after = match stages.iter().position(|s| s.as_document().is_some_and(|d| d.contains_key("$group"))) {
            Some(at) => stages.split_off(at + 1),
            None => Vec::new(),
        };
        (stages, after)
    }

    /// The stages after `$group`, as BSON bytes: subscriptions to one core with equal ones
    /// share a view.
    pub fn after_group(&self) -> Vec<u8> {
        let doc = bson::doc! {"after": self.split_at_group().1};
        doc.to_vec().unwrap_or_else(|_| format!("{doc:?}").into_bytes())
    }

    /// The compiled pipeline: the one it carries, or compiled here.
    pub fn compile(&self) -> Result<Arc<Pipeline>, PipelineError> {
        match &self.compiled {
            Some(pipeline) => Ok(pipeline.clone()),
            None => {
                let stages = self.stages.0.get_array("stages").map_err(|_| PipelineError::Bad {
                    stage: "pipeline".into(),
                    reason: "a pipeline is an array of stages".into(),
                })?;
                Pipeline::parse(stages).map(Arc::new)
            }
        }
    }
}

impl PartialEq for WireQuery {
    fn eq(&self, other: &Self) -> bool {
        let stages = |q: &WireQuery| q.pipeline.as_ref().map(|p| p.stages.clone());
        (&self.filter, &self.sort, self.skip, self.limit, &self.projection, stages(self))
            == (&other.filter, &other.sort, other.skip, other.limit, &other.projection, stages(other))
    }
}

impl WireQuery {
    /// The query's parts.
    pub fn from_spec(spec: &QuerySpec) -> Self {
        let wrap = |d: &Document| WireDoc(Arc::new(d.clone()));
        WireQuery {
            filter: wrap(&spec.filter),
            sort: spec.sort.as_ref().map(wrap),
            skip: spec.skip,
            limit: spec.limit,
            projection: spec.projection.as_ref().map(wrap),
            compiled: None,
            pipeline: None,
        }
    }

    /// The query's parts with the compiled form of `spec`.
    pub fn with_compiled(spec: &QuerySpec, query: &Query) -> Self {
        WireQuery { compiled: Some(Arc::new(query.clone())), ..WireQuery::from_spec(spec) }
    }

    /// The compiled query: the one it carries, or compiled here.
    pub fn compile(&self) -> Result<Arc<Query>, QueryError> {
        match &self.compiled {
            Some(query) => Ok(query.clone()),
            None => Query::compile(&self.to_spec()).map(Arc::new),
        }
    }

    /// Back to a specification to compile.
    pub fn to_spec(&self) -> QuerySpec {
        QuerySpec {
            filter: (*self.filter.0).clone(),
            sort: self.sort.as_ref().map(|d| (*d.0).clone()),
            skip: self.skip,
            limit: self.limit,
            projection: self.projection.as_ref().map(|d| (*d.0).clone()),
        }
    }
}

/// What the ingest sends into the grid, addressed to one worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum GridInput {
    /// A write, for every worker of its write partition's row.
    Event {
        /// The receiving worker.
        target: u32,
        /// The write.
        event: WireEvent,
    },
    /// A subscription (or a re-read of its window), for every worker of its query partition's
    /// column.
    Register(Box<Registration>),
    /// A pipeline subscription attaching to its core (a registration whose query carries the
    /// pipeline), for one worker of the core's column.
    Attach(Box<Attach>),
    /// A pipeline subscription detaching from its core, for one worker of the core's column.
    Detach {
        /// The receiving worker.
        target: u32,
        /// The core's key.
        core: QueryKey,
        /// The subscription.
        view: QueryKey,
    },
    /// A request from a process that does not feed the grid, for worker 0 (whose process
    /// decides registrations against its retention buffer).
    Forward(Box<Forward>),
    /// A subscription ended by the feeding process, for its client on another process (one
    /// record, to any worker: the subscription stage turns it into [`StageOutput::Ended`],
    /// which reaches the subscription's process).
    Notice {
        /// The receiving worker.
        target: u32,
        /// The subscription.
        key: QueryKey,
        /// The error code for the client.
        code: ErrorCode,
        /// Why, for people.
        message: String,
    },
    /// The end of a subscription, for every worker of its column.
    Unregister {
        /// The receiving worker.
        target: u32,
        /// The subscription.
        key: QueryKey,
        /// Whether this worker tells the subscription stage (one per column does).
        head: bool,
    },
}

impl GridInput {
    /// The worker the record is for.
    pub fn target(&self) -> u32 {
        match self {
            GridInput::Event { target, .. }
            | GridInput::Unregister { target, .. }
            | GridInput::Notice { target, .. }
            | GridInput::Detach { target, .. } => *target,
            GridInput::Forward(_) => 0,
            GridInput::Register(r) => r.target,
            GridInput::Attach(a) => a.target,
        }
    }
}

/// What a process that does not feed the grid asks of the one that does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Forward {
    /// Register a query subscription whose initial result the asking process read.
    Register {
        /// The subscription (its key names the asking process).
        key: QueryKey,
        /// Its namespace.
        ns: String,
        /// Its query.
        spec: WireQuery,
        /// Its initial result.
        snapshot: WireSnapshot,
    },
    /// Register a live pipeline subscription (the feeding process shares cores).
    Pipeline {
        /// The subscription.
        key: QueryKey,
        /// Its namespace.
        ns: String,
        /// Its first `$match` (with its ACL) as a query.
        spec: WireQuery,
        /// The pipeline.
        pipeline: WirePipeline,
    },
    /// End a subscription.
    Unregister {
        /// The subscription.
        key: QueryKey,
    },
    /// A drained window's top, read again by the subscription's process.
    Reread {
        /// The subscription.
        key: QueryKey,
        /// The re-read.
        snapshot: WireSnapshot,
    },
}

impl Forward {
    /// The subscription concerned.
    pub fn key(&self) -> QueryKey {
        match self {
            Forward::Register { key, .. }
            | Forward::Pipeline { key, .. }
            | Forward::Unregister { key }
            | Forward::Reread { key, .. } => *key,
        }
    }
}

/// A snapshot as it crosses processes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireSnapshot {
    /// The position it was read at.
    pub position: Position,
    /// The documents.
    pub docs: Vec<WireDoc>,
    /// Whether they are the whole result.
    pub complete: bool,
}

impl From<crate::snapshot::Snapshot> for WireSnapshot {
    fn from(snapshot: crate::snapshot::Snapshot) -> Self {
        let docs = snapshot.docs.into_iter().map(|d| WireDoc(Arc::new(d))).collect();
        WireSnapshot { position: snapshot.position, docs, complete: snapshot.complete }
    }
}

impl From<WireSnapshot> for crate::snapshot::Snapshot {
    fn from(snapshot: WireSnapshot) -> Self {
        let docs = snapshot.docs.into_iter().map(|d| Arc::unwrap_or_clone(d.0)).collect();
        crate::snapshot::Snapshot { docs, position: snapshot.position, complete: snapshot.complete }
    }
}

/// A subscription's registration (or window re-read) at one worker of its column.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registration {
    /// The receiving worker.
    pub target: u32,
    /// The subscription.
    pub key: QueryKey,
    /// Its namespace.
    pub ns: String,
    /// Its query.
    pub query: WireQuery,
    /// Ids of the snapshot's documents that belong to this worker's write partition.
    pub member_ids: Vec<WireValue>,
    /// Writes of this worker's partition after the snapshot that the grid already passed.
    pub replay: Vec<WireEvent>,
    /// For one worker of the column: the snapshot, passed on to the subscription stage.
    pub init: Option<StageInit>,
    /// Whether this re-reads an existing subscription's window.
    pub reload: bool,
}

/// A pipeline subscription attaching to the core it shares with identical pipelines: its
/// initial result is the core's state when the attach is applied, in position order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attach {
    /// The receiving worker.
    pub target: u32,
    /// The core's key (its grid registration).
    pub core: QueryKey,
    /// The subscription.
    pub view: QueryKey,
    /// Its pipeline (the stages after `$group` are its own).
    pub pipeline: WirePipeline,
    /// The last position fed when it attached: the result reflects every write up to it.
    pub position: Position,
}

/// A snapshot for the subscription stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageInit {
    /// The position the snapshot was read at.
    pub position: Position,
    /// The documents (not projected).
    pub docs: Vec<WireDoc>,
    /// Whether they are the whole result.
    pub complete: bool,
}

/// What the matching stage sends to the subscription stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum StageInput {
    /// A subscription starts (or its window is re-read).
    Init {
        /// The subscription.
        key: QueryKey,
        /// Its query.
        query: WireQuery,
        /// The snapshot.
        init: StageInit,
        /// Whether this re-reads a window.
        reload: bool,
    },
    /// One write's transitions for the subscriptions of one subscription-stage worker: the
    /// document now matches each subscription's filter, or no longer does. One record per
    /// (write, receiving worker), however many subscriptions it concerns, so that a write
    /// changing fifty results moves one document reference and fifty keys, not fifty records.
    Transitions {
        /// The write's position.
        position: Position,
        /// The write's kind.
        cause: Cause,
        /// The document id.
        id: WireValue,
        /// The document after the write, when it matches some of the subscriptions.
        doc: Option<WireDoc>,
        /// The subscriptions, each with how the document moves in its matching set. Never
        /// empty; all are routed to the worker of the first.
        keys: Vec<(QueryKey, Transition)>,
        /// When the write entered the engine (see [`WireEvent::entered`]).
        entered: u64,
    },
    /// A pipeline subscription attaches to its core.
    Attach(Box<Attach>),
    /// A pipeline subscription detaches from its core.
    Detach {
        /// The core's key.
        core: QueryKey,
        /// The subscription.
        view: QueryKey,
    },
    /// The subscription ended.
    Drop {
        /// The subscription.
        key: QueryKey,
    },
    /// The subscription's client must be told it ended (see [`GridInput::Notice`]).
    Notice {
        /// The subscription.
        key: QueryKey,
        /// The error code for the client.
        code: ErrorCode,
        /// Why, for people.
        message: String,
    },
}

impl StageInput {
    /// The subscription concerned (the first of a write's transitions): it routes the record.
    pub fn key(&self) -> QueryKey {
        match self {
            StageInput::Init { key, .. } | StageInput::Drop { key } | StageInput::Notice { key, .. } => *key,
            StageInput::Transitions { keys, .. } => keys[0].0,
            StageInput::Attach(attach) => attach.core,
            StageInput::Detach { core, .. } => *core,
        }
    }

    /// Order inside one timestamp: by position, snapshots before writes at the same position,
    /// attaches after them, detaches and then drops last.
    pub fn order(&self) -> (Position, u8) {
        match self {
            StageInput::Init { init, .. } => (init.position, 0),
            StageInput::Transitions { position, .. } => (*position, 1),
            StageInput::Attach(attach) => (attach.position, 2),
            StageInput::Detach { .. } => (Position::MAX, 2),
            StageInput::Drop { .. } => (Position::MAX, 3),
            StageInput::Notice { .. } => (Position::MAX, 4),
        }
    }
}

/// How a write moves a document relative to the documents matching one subscription's
/// filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Transition {
    /// It matches now and did not before.
    Enter,
    /// It matched and still does (its after-image is new).
    Stay,
    /// It matched and no longer does (or was deleted).
    Leave,
}

impl Transition {
    /// Whether the document matches after the write.
    pub fn matches(self) -> bool {
        self != Transition::Leave
    }

    /// Whether the document matched before the write.
    pub fn matched(self) -> bool {
        self != Transition::Enter
    }
}

/// What the subscription stage emits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum StageOutput {
    /// A message of a subscription: its initial result or a delta, documents encoded.
    Frame {
        /// The subscription.
        key: QueryKey,
        /// The message.
        frame: Frame,
        /// When the write behind a delta entered the engine (0 for results and when unknown).
        entered: u64,
    },
    /// The window of a subscription drained: read its top documents again.
    NeedsReload {
        /// The subscription.
        key: QueryKey,
    },
    /// The subscription ended (see [`GridInput::Notice`]).
    Ended {
        /// The subscription.
        key: QueryKey,
        /// The error code for the client.
        code: ErrorCode,
        /// Why, for people.
        message: String,
    },
}

impl StageOutput {
    /// The process that must receive it: its subscription's process (which reads a window's
    /// re-read, as it read the initial result).
    pub fn process(&self) -> usize {
        match self {
            StageOutput::Frame { key, .. } | StageOutput::Ended { key, .. } | StageOutput::NeedsReload { key } => {
                home_process(*key)
            }
        }
    }
}

/// Bits of a subscription key below the process that reserved it.
pub const PROCESS_SHIFT: u32 = 48;

/// The process a subscription key was reserved on (where its client is).
pub fn home_process(key: QueryKey) -> usize {
    (key >> PROCESS_SHIFT) as usize
}

/// What the subscription stage sends the group stage for live pipelines (see
/// [`crate::live_pipeline`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum GroupInput {
    /// A core starts: every worker of the group stage gets one, with the pipeline it computes
    /// its groups' outputs with.
    Start {
        /// The receiving worker.
        target: u32,
        /// The core.
        core: QueryKey,
        /// Its pipeline.
        pipeline: WirePipeline,
        /// The position of its snapshot.
        position: Position,
    },
    /// What one write (or the core's snapshot) takes out of and puts into one group.
    Contribute(Box<Contribute>),
    /// A core ended: every worker of the group stage gets one.
    End {
        /// The receiving worker.
        target: u32,
        /// The core.
        core: QueryKey,
    },
    /// For the view stage: passed on as it is.
    View(ViewInput),
}

impl GroupInput {
    /// The group-stage worker it is for (modulo the workers).
    pub fn route(&self) -> u64 {
        match self {
            GroupInput::Start { target, .. } | GroupInput::End { target, .. } => u64::from(*target),
            GroupInput::Contribute(contribute) => contribute.route,
            GroupInput::View(view) => view.core(),
        }
    }

    /// The core concerned.
    pub fn core(&self) -> QueryKey {
        match self {
            GroupInput::Start { core, .. } | GroupInput::End { core, .. } => *core,
            GroupInput::Contribute(contribute) => contribute.core,
            GroupInput::View(view) => view.core(),
        }
    }

    /// Order inside one timestamp: by position, a core's start before its contributions,
    /// its end last (the view stage orders what passes through).
    pub fn order(&self) -> (Position, u8) {
        match self {
            GroupInput::Start { position, .. } => (*position, 0),
            GroupInput::Contribute(contribute) => (contribute.position, 1),
            GroupInput::End { .. } => (Position::MAX, 3),
            GroupInput::View(view) => view.order(),
        }
    }
}

/// One write's contributions to one group of a core: those it took out (-1) and put in (+1).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Contribute {
    /// The core.
    pub core: QueryKey,
    /// A hash of the core and the group key: the group's worker.
    pub route: u64,
    /// The write's position (the snapshot's, for a core's initial contributions).
    pub position: Position,
    /// The write's kind.
    pub cause: Cause,
    /// When the write entered the engine (0 for a snapshot).
    pub entered: u64,
    /// The contributions, each with how many times it goes in (negative: out).
    pub changes: WireContributions,
}

/// Contributions with counts, crossing processes as compact BSON.
#[derive(Debug, Clone, Default)]
pub struct WireContributions(pub Vec<(Contribution, i64)>);

impl Serialize for WireContributions {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let contributions: Vec<Contribution> = self.0.iter().map(|(c, _)| c.clone()).collect();
        // Pipelines whose stages are not BSON are refused when parsed, so this holds.
        let bytes = encode_contributions(&contributions)
            .ok_or_else(|| serde::ser::Error::custom("contributions BSON cannot hold"))?;
        let counts: Vec<i64> = self.0.iter().map(|(_, n)| *n).collect();
        (bytes, counts).serialize(s)
    }
}

impl<'de> Deserialize<'de> for WireContributions {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (bytes, counts) = <(Vec<u8>, Vec<i64>)>::deserialize(d)?;
        let contributions =
            decode_contributions(&bytes).ok_or_else(|| serde::de::Error::custom("malformed contributions"))?;
        Ok(WireContributions(contributions.into_iter().zip(counts).collect()))
    }
}

/// What the view stage of live pipelines receives (by core).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ViewInput {
    /// A core starts; its views attach after it.
    Start {
        /// The core.
        core: QueryKey,
        /// The position of its snapshot.
        position: Position,
    },
    /// The outputs of a core's groups one write touched (on one group-stage worker).
    Outputs {
        /// The core.
        core: QueryKey,
        /// The write's position.
        position: Position,
        /// The write's kind.
        cause: Cause,
        /// When the write entered the engine.
        entered: u64,
        /// Each touched group's key, and its output now (`None`: the group is gone).
        groups: Vec<(WireValue, Option<WireDoc>)>,
    },
    /// A pipeline subscription attaches to its core.
    Attach(Box<Attach>),
    /// A pipeline subscription detaches from its core.
    Detach {
        /// The core.
        core: QueryKey,
        /// The subscription.
        view: QueryKey,
    },
    /// A core ended, with every view still on it.
    Drop {
        /// The core.
        core: QueryKey,
    },
}

impl ViewInput {
    /// The core: it routes the record.
    pub fn core(&self) -> QueryKey {
        match self {
            ViewInput::Start { core, .. }
            | ViewInput::Outputs { core, .. }
            | ViewInput::Detach { core, .. }
            | ViewInput::Drop { core } => *core,
            ViewInput::Attach(attach) => attach.core,
        }
    }

    /// Order inside one timestamp: by position, a core's start before the outputs at its
    /// position, attaches after them, detaches and then drops last.
    pub fn order(&self) -> (Position, u8) {
        match self {
            ViewInput::Start { position, .. } => (*position, 0),
            ViewInput::Outputs { position, .. } => (*position, 1),
            ViewInput::Attach(attach) => (attach.position, 2),
            ViewInput::Detach { .. } => (Position::MAX, 2),
            ViewInput::Drop { .. } => (Position::MAX, 3),
        }
    }
}
