//! The grid's dataflow: what every timely worker builds once, and the input loops of the
//! first worker of each process.
//!
//! Worker i of a Q × W grid is (q, w) = (i / W, i % W). Records enter at worker 0, already
//! addressed to their worker (a write once per worker of its row, a registration once per
//! worker of its column), and move on exchange channels. In a cluster, the first worker of
//! every other process has an input too, through which its engine forwards registrations to
//! worker 0 (whose engine decides them against its retention buffer); each subscription's
//! messages are delivered to the process whose key it has, where its client is:
//!
//! ```text
//! input (worker 0) ─exchange by target─▶ matching ─exchange by subscription─▶ subscriptions ──────────────────────────▶ deliver
//!                                                                                  │ (live pipelines)                      ▲
//!                                                                                  └─by (core, group key)─▶ groups ─by core─▶ views
//! ```
//!
//! Timestamps are coarse: worker 0 puts everything it finds in its command channel under one
//! epoch, then advances. Epochs follow a microsecond clock, so that every process's input
//! advances without the processes talking to each other (an idle input follows the clock
//! every two milliseconds; a process whose clock is behind delays progress by that much).
//! The subscription, group and view stages each wait for an epoch to
//! complete before they order its records by position ([`epoch_stage`]). Worker 0 watches a
//! probe after the deliver stage and reports, per completed epoch, the last position fed in
//! it.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use livegrid_protocol::Position;
use timely::ExchangeData;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::core::Concat;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::{Operator, OutputBuilder};
use timely::dataflow::operators::vec::Input;
use timely::dataflow::operators::{Capability, Probe};
use timely::dataflow::{InputHandleVec, ProbeHandle, Stream};

use crate::live_pipeline::{GroupStage, Views};
use crate::matching::Matching;
use crate::records::{Forward, GridInput, GroupInput, StageInput, StageOutput, ViewInput};
use crate::subscription::Subscriptions;

/// The shape of the grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridShape {
    /// Query partitions (Q).
    pub query_partitions: usize,
    /// Write partitions (W).
    pub write_partitions: usize,
}

impl GridShape {
    /// Workers in the grid, Q × W.
    pub fn workers(&self) -> usize {
        self.query_partitions * self.write_partitions
    }

    /// The worker of query partition `q` and write partition `w`.
    pub fn worker(&self, q: usize, w: usize) -> u32 {
        (q * self.write_partitions + w) as u32
    }
}

impl std::fmt::Display for GridShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.query_partitions, self.write_partitions)
    }
}

impl std::str::FromStr for GridShape {
    type Err = String;

    /// Parses `QxW`, such as `2x1`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (q, w) = s.split_once(['x', 'X']).ok_or_else(|| format!("grid must look like QxW, found {s:?}"))?;
        let parse = |v: &str| v.trim().parse::<usize>().ok().filter(|n| *n > 0);
        match (parse(q), parse(w)) {
            (Some(q), Some(w)) => Ok(GridShape { query_partitions: q, write_partitions: w }),
            _ => Err(format!("grid partitions must be positive integers, found {s:?}")),
        }
    }
}

/// Records worker 0 puts under one epoch at most (it may exceed it by one command).
const MAX_EPOCH_RECORDS: usize = 4096;

/// Input buffers each epoch stage (subscriptions, groups, views) keeps for reuse, at most.
const MAX_SPARE_BUFFERS: usize = 4;

/// Records a kept buffer may hold room for (larger ones shrink back after use).
const MAX_KEPT_RECORDS: usize = 16_384;

/// Records in one delivery to the router, at most (unless timely hands over a larger buffer).
pub(crate) const DELIVERY_BATCH: usize = 1024;

/// Emptied output buffers waiting to be filled again, at most.
pub(crate) const MAX_RECYCLED_BUFFERS: usize = 8;

/// What the engine sends worker 0.
pub(crate) enum Command {
    /// Records to feed, and the last write position among everything fed so far.
    Feed(Vec<GridInput>, Position),
    /// Close the input: the grid drains and the workers exit.
    Shutdown,
    /// Panic on worker 0 (fault injection for tests of the failure path).
    Panic,
}

/// What the workers send the engine.
pub(crate) enum Delivery {
    /// Messages and re-read requests of subscriptions.
    Outputs(Vec<StageOutput>),
    /// The first `commands` feed commands, and every write at or below `position`, have been
    /// fully processed.
    Processed {
        /// The last write position among them.
        position: Position,
        /// How many feed commands.
        commands: u64,
    },
    /// A worker failed (panicked): the grid's results can no longer be trusted.
    Failed(String),
}

/// Per-worker settings.
pub(crate) struct WorkerSetup {
    pub slack: usize,
    /// Processes the grid spans (each subscription's messages go to its own process).
    pub processes: usize,
    /// Where worker 0 hands requests forwarded by other processes to its engine.
    pub forwarded: Sender<Forward>,
    /// Forwarded requests handed over and not yet carried out.
    pub forward_pending: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub commands: Receiver<Command>,
    pub deliveries: Sender<Delivery>,
    /// Output buffers the router has emptied, for the deliver stage to fill again.
    pub recycled: Receiver<Vec<StageOutput>>,
    pub worker0: Sender<std::thread::Thread>,
}

/// Runs [`run_worker`], reporting a panic as [`Delivery::Failed`] instead of letting the grid
/// die unnoticed.
pub(crate) fn run_worker_reporting(worker: &mut timely::worker::Worker, setup: &WorkerSetup) {
    let index = worker.index();
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_worker(worker, setup)));
    if let Err(panic) = ran {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        // Timely poisons a worker's queues when a connection to another process breaks.
        let reason = if setup.processes > 1 && what.contains("MergeQueue poisoned") {
            format!(
                "grid worker {index} lost its connection to another process of the cluster (a process stopped or \
                 the network failed): restart the cluster"
            )
        } else {
            format!("grid worker {index} panicked: {what}")
        };
        let _ = setup.deliveries.send(Delivery::Failed(reason));
    }
}

/// Builds the dataflow on one worker and, on worker 0, runs the ingest loop.
fn run_worker(worker: &mut timely::worker::Worker, setup: &WorkerSetup) {
    let index = worker.index();
    let peers = worker.peers();
    let mut input = InputHandleVec::<u64, GridInput>::new();
    let probe = ProbeHandle::new();
    let slack = setup.slack;
    let deliveries = setup.deliveries.clone();
    let recycled = setup.recycled.clone();
    // Outputs go to the first worker of the process that must receive them; in one process,
    // they stay where they are.
    let threads = peers / setup.processes.max(1);
    let clustered = setup.processes > 1;
    let sink_route = move |output: &StageOutput| {
        if clustered { (output.process() * threads) as u64 } else { index as u64 }
    };
    let forwarded = setup.forwarded.clone();
    let forward_pending = setup.forward_pending.clone();

    worker.dataflow::<u64, _, _>(|scope| {
        let transitions = scope.input_from(&mut input).unary(
            Exchange::new(|r: &GridInput| u64::from(r.target())),
            "Matching",
            |_capability, _info| {
                let mut matching = Matching::new(peers);
                let mut produced = Vec::new();
                move |input, output| {
                    input.for_each_stamp(|capability, data| {
                        let mut session = output.session(&capability);
                        for record in data.flat_map(|d| d.drain(..)) {
                            if let GridInput::Forward(request) = record {
                                // For this process's engine; it waits when the engine is behind.
                                forward_pending.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                                if forwarded.send(*request).is_err() {
                                    forward_pending.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                                }
                                continue;
                            }
                            matching.handle(record, &mut produced);
                            session.give_iterator(produced.drain(..));
                        }
                    });
                }
            },
        );
        let mut subscriptions = Subscriptions::new(slack, peers);
        let (outputs, group_inputs) = epoch_stage(
            transitions,
            |r: &StageInput| r.key(),
            "Subscriptions",
            move |inputs, out, flush, groups: &mut Vec<GroupInput>| subscriptions.apply(inputs, out, flush, groups),
        );
        let mut groups = GroupStage::default();
        let (view_inputs, _) = epoch_stage(
            group_inputs,
            GroupInput::route,
            "Groups",
            move |inputs, out: &mut Vec<ViewInput>, _, _: &mut Vec<()>| groups.apply(inputs, out),
        );
        let mut views = Views::default();
        let (view_outputs, _) = epoch_stage(
            view_inputs,
            ViewInput::core,
            "Views",
            move |inputs, out: &mut Vec<StageOutput>, flush, _: &mut Vec<()>| views.apply(inputs, out, flush),
        );
        outputs
            .concat(view_outputs)
            .unary::<timely::container::CapacityContainerBuilder<Vec<()>>, _, _, _>(
                Exchange::new(sink_route),
                "Deliver",
                move |_capability, _info| {
                    move |input, _output| {
                        // Outputs are copied into a buffer the router hands back once it has
                        // read it: timely's buffers are then freed on this thread, and no
                        // fresh memory is taken per batch (fresh pages cost page faults).
                        let mut batch: Vec<StageOutput> = Vec::new();
                        input.for_each(|_, data| {
                            if batch.len() + data.len() > batch.capacity() {
                                if !batch.is_empty() {
                                    // The engine may be gone at shutdown; nothing is waiting then.
                                    let _ = deliveries.send(Delivery::Outputs(std::mem::take(&mut batch)));
                                }
                                batch = recycled
                                    .try_recv()
                                    .unwrap_or_else(|_| Vec::with_capacity(DELIVERY_BATCH.max(data.len())));
                            }
                            batch.append(data);
                        });
                        if !batch.is_empty() {
                            let _ = deliveries.send(Delivery::Outputs(batch));
                        }
                    }
                },
            )
            .probe_with(&probe);
    });

    if !index.is_multiple_of(threads) {
        // The first worker of each process has an input (worker 0's feeds the grid, the
        // others' forward requests); the rest close theirs and just work.
        drop(input);
        return;
    }
    let _ = setup.worker0.send(std::thread::current());
    let mut epoch = 0u64;
    let mut fed = Position::ZERO;
    let mut commands: u64 = 0;
    let mut pending: VecDeque<(u64, Position, u64)> = VecDeque::new();
    let mut last_advance = std::time::Instant::now();
    loop {
        let mut advanced = false;
        let mut shutdown = false;
        let mut records_in_epoch = 0usize;
        // An epoch is applied as a whole by the subscription stage: bound its size, so that a
        // backlog becomes many small epochs rather than one huge one held in memory at once.
        while records_in_epoch < MAX_EPOCH_RECORDS {
            match setup.commands.try_recv() {
                Ok(Command::Feed(records, position)) => {
                    records_in_epoch += records.len().max(1);
                    for record in records {
                        input.send(record);
                    }
                    fed = fed.max(position);
                    commands += 1;
                    advanced = true;
                }
                Ok(Command::Panic) => panic!("injected worker panic"),
                Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => {
                    shutdown = true;
                    break;
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        if advanced {
            pending.push_back((epoch, fed, commands));
        }
        // In a cluster every process's input follows the clock even when idle: the grid
        // completes an epoch only once every input has passed it.
        if advanced || (clustered && last_advance.elapsed() >= FOLLOW_CLOCK) {
            epoch = next_epoch(epoch);
            input.advance_to(epoch);
            last_advance = std::time::Instant::now();
        }
        if shutdown {
            break;
        }
        let idle = match (pending.is_empty(), clustered) {
            (false, _) => Duration::from_micros(200),
            (true, false) => Duration::from_millis(20),
            (true, true) => FOLLOW_CLOCK,
        };
        worker.step_or_park(Some(idle));
        report_progress(&probe, &mut pending, &setup.deliveries);
    }
    drop(input);
    while worker.step_or_park(Some(Duration::from_millis(1))) {
        report_progress(&probe, &mut pending, &setup.deliveries);
    }
    report_progress(&probe, &mut pending, &setup.deliveries);
}

/// How often an idle input of a cluster advances (each advance is progress traffic between
/// all workers).
const FOLLOW_CLOCK: Duration = Duration::from_millis(2);

/// The epoch after `epoch`: the clock in microseconds, so that the inputs of all processes
/// advance together without talking to each other, and at least one more than before.
fn next_epoch(epoch: u64) -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
    now.max(epoch + 1)
}

fn report_progress(
    probe: &ProbeHandle<u64>,
    pending: &mut VecDeque<(u64, Position, u64)>,
    deliveries: &Sender<Delivery>,
) {
    let mut done = None;
    while let Some(&(epoch, position, commands)) = pending.front() {
        if probe.less_equal(&epoch) {
            break;
        }
        done = Some(Delivery::Processed { position, commands });
        pending.pop_front();
    }
    if let Some(delivery) = done {
        let _ = deliveries.send(delivery);
    }
}

/// A capability to send at one epoch.
type Stamp = Capability<u64>;

/// A stage that applies each epoch's records, routed to workers by `route`, once the epoch is
/// complete (all its records have arrived), in epoch order. `apply` drains one epoch's records
/// and fills its two outputs; it may hand the first to the `flush` it is given as it goes, so
/// that an epoch with millions of outputs needs no buffer of millions.
///
/// Buffers live as long as the operator: an epoch's records can be many megabytes, and fresh
/// buffers each time cost page faults and copies. What is kept is bounded
/// ([`MAX_SPARE_BUFFERS`] of [`MAX_KEPT_RECORDS`]), so that memory returns once a burst has
/// passed.
fn epoch_stage<'scope, I, O1, O2, A>(
    stream: Stream<'scope, u64, Vec<I>>,
    route: impl Fn(&I) -> u64 + 'static,
    name: &str,
    mut apply: A,
) -> (Stream<'scope, u64, Vec<O1>>, Stream<'scope, u64, Vec<O2>>)
where
    I: ExchangeData,
    O1: Clone + 'static,
    O2: Clone + 'static,
    A: FnMut(&mut Vec<I>, &mut Vec<O1>, &mut dyn FnMut(&mut Vec<O1>), &mut Vec<O2>) + 'static,
{
    let mut builder = OperatorBuilder::new(name.to_owned(), stream.scope());
    let mut input = builder.new_input(stream, Exchange::new(move |r: &I| route(r)));
    let (first, first_stream) = builder.new_output::<Vec<O1>>();
    let (second, second_stream) = builder.new_output::<Vec<O2>>();
    let mut first = OutputBuilder::from(first);
    let mut second = OutputBuilder::from(second);
    builder.build(move |_initial| {
        // Per epoch: a capability for each output, and the records so far.
        let mut stash: BTreeMap<u64, (Stamp, Stamp, Vec<I>)> = BTreeMap::new();
        let mut spare: Vec<Vec<I>> = Vec::new();
        let mut produced: Vec<O1> = Vec::new();
        let mut passed: Vec<O2> = Vec::new();
        move |frontiers| {
            let mut first = first.activate();
            let mut second = second.activate();
            input.for_each_stamp(|capability, data| {
                // Messages under an empty stamp claim no time; there are none here.
                let Some(&time) = capability.least() else { return };
                let entry = stash.entry(time).or_insert_with(|| {
                    let retain = |port| capability.retain_least(port).expect("non-empty stamp");
                    (retain(0), retain(1), spare.pop().unwrap_or_default())
                });
                entry.2.extend(data.flat_map(|d| d.drain(..)));
            });
            while let Some((&time, _)) = stash.first_key_value() {
                if frontiers[0].less_equal(&time) {
                    break;
                }
                let (first_capability, second_capability, mut inputs) = stash.remove(&time).expect("present");
                {
                    let mut session = first.session(&first_capability);
                    apply(&mut inputs, &mut produced, &mut |out| session.give_iterator(out.drain(..)), &mut passed);
                    session.give_iterator(produced.drain(..));
                }
                if !passed.is_empty() {
                    second.session(&second_capability).give_iterator(passed.drain(..));
                }
                produced.shrink_to(MAX_KEPT_RECORDS);
                passed.shrink_to(MAX_KEPT_RECORDS);
                // A few buffers of bounded size are kept; a burst's are given back.
                if spare.len() < MAX_SPARE_BUFFERS {
                    inputs.clear();
                    inputs.shrink_to(MAX_KEPT_RECORDS);
                    spare.push(inputs);
                }
            }
        }
    });
    (first_stream, second_stream)
}
