//! Recorded change streams as a [`Source`]: one MongoDB change event per line (relaxed
//! Extended JSON, as `watch()` emits them; see [`change_stream_event`]). The database state
//! is kept in memory, so that snapshot reads (initial results, window re-reads) see exactly
//! the events pulled so far. Used by `livegrid replay` and by `livegrid serve --replay`.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use livegrid_engine::memory::SharedMemory;
use livegrid_engine::{ChangeEvent, SnapshotSource};
use livegrid_protocol::Position;

use super::change_stream_event::{self, Parsed};
use super::{Pulled, Source, SourceError};

/// A change-stream file, read into memory, pulled event by event.
pub struct ReplaySource {
    path: String,
    lines: std::iter::Enumerate<std::vec::IntoIter<String>>,
    previous: Position,
    memory: Arc<SharedMemory>,
    applied: u64,
    skipped: u64,
    /// Events per second at most, from the first pull on.
    rate: Option<f64>,
    started: Option<Instant>,
    /// An event read ahead that starts the next pull (a pull never ends inside one position
    /// time: the events of a transaction reach the engine in one step).
    held: Option<ChangeEvent>,
}

impl ReplaySource {
    /// Reads the file (parsing is left to the pulls).
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let io = |source| SourceError::Io { path: path.display().to_string(), source };
        let lines: Vec<String> =
            BufReader::new(File::open(path).map_err(io)?).lines().collect::<Result<_, _>>().map_err(io)?;
        Ok(ReplaySource {
            path: path.display().to_string(),
            lines: lines.into_iter().enumerate(),
            previous: Position::ZERO,
            memory: Arc::new(SharedMemory::default()),
            applied: 0,
            skipped: 0,
            held: None,
            rate: None,
            started: None,
        })
    }

    /// Whether `events_per_second` can pace a replay: a positive, finite number.
    pub fn valid_rate(events_per_second: f64) -> bool {
        events_per_second.is_finite() && events_per_second > 0.0
    }

    /// Paces the replay: at most `events_per_second` events (at least one per pull).
    pub fn with_rate(mut self, events_per_second: f64) -> Self {
        self.rate = (events_per_second > 0.0).then_some(events_per_second);
        self
    }

    /// Events pulled (writes).
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Lines without a document change (`drop`, `invalidate`, ...), skipped.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// How many events the pace allows now, waiting up to `wait` for one to be due.
    fn allowance(&mut self, max: usize, wait: Duration) -> usize {
        let Some(rate) = self.rate else { return max };
        let started = *self.started.get_or_insert_with(Instant::now);
        let due = |now: Instant| ((now - started).as_secs_f64() * rate) as u64;
        let mut now = Instant::now();
        if due(now) <= self.applied {
            let next = started + Duration::from_secs_f64((self.applied + 1) as f64 / rate);
            std::thread::sleep(next.saturating_duration_since(now).min(wait));
            now = Instant::now();
        }
        (due(now).saturating_sub(self.applied) as usize).min(max)
    }
}

impl Source for ReplaySource {
    fn name(&self) -> &'static str {
        "replay"
    }

    fn snapshots(&self) -> Arc<dyn SnapshotSource> {
        self.memory.clone()
    }

    fn pull(&mut self, max: usize, wait: Duration) -> Result<Pulled, SourceError> {
        let allowed = self.allowance(max.max(1), wait);
        if allowed == 0 {
            return Ok(Pulled::Idle);
        }
        let mut events = Vec::with_capacity(allowed.min(4096));
        if let Some(event) = self.held.take() {
            self.hand_out(event, &mut events);
        }
        while let Some((index, line)) = self.lines.next() {
            if line.trim().is_empty() {
                continue;
            }
            let line_no = index as u64 + 1;
            let state = self.memory.0.lock().expect("memory state");
            let parsed = change_stream_event::parse(&line, line_no, self.previous, |ns, id| state.get(ns, id).cloned())
                .map_err(|source| SourceError::Event { path: self.path.clone(), line: line_no, source })?;
            drop(state);
            match parsed {
                Parsed::Write(event) => {
                    self.previous = event.position;
                    let full = events.len() >= allowed;
                    if full
                        && events.last().is_none_or(|last: &ChangeEvent| last.position.time() != event.position.time())
                    {
                        self.held = Some(event);
                        break;
                    }
                    self.hand_out(event, &mut events);
                }
                Parsed::Skipped(_) => self.skipped += 1,
            }
        }
        Ok(if events.is_empty() { Pulled::Ended } else { Pulled::Events(events) })
    }
}

impl ReplaySource {
    fn hand_out(&mut self, event: ChangeEvent, events: &mut Vec<ChangeEvent>) {
        // The state moves with the pulls: a snapshot read sees what was pulled.
        self.memory.0.lock().expect("memory state").apply(&event);
        self.applied += 1;
        events.push(event);
    }
}

#[cfg(test)]
mod transaction_tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn a_pull_never_ends_inside_a_transaction() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let event = |id: i32, t: u32, i: u32| {
            format!(
                r#"{{"operationType":"insert","ns":"a.b","clusterTime":{{"$timestamp":{{"t":{t},"i":{i}}}}},"documentKey":{{"_id":{id}}},"fullDocument":{{"_id":{id}}}}}"#
            )
        };
        // Events 2, 3 and 4 are one transaction (one cluster time).
        for (id, i) in [(1, 1), (2, 2), (3, 2), (4, 2), (5, 3)] {
            writeln!(f, "{}", event(id, 100, i)).unwrap();
        }
        let mut source = ReplaySource::open(f.path()).unwrap();
        let mut sizes = Vec::new();
        while let Pulled::Events(events) = source.pull(2, Duration::ZERO).unwrap() {
            sizes.push(events.len());
        }
        assert_eq!(sizes, vec![4, 1], "the transaction is not split");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livegrid_matcher::{Query, QuerySpec};

    fn file(lines: &[&str]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), lines.join("\n")).unwrap();
        file
    }

    #[test]
    fn pulls_in_order_and_reads_what_was_pulled() {
        let f = file(&[
            r#"{"operationType":"insert","ns":"a.b","documentKey":{"_id":1},"fullDocument":{"_id":1,"n":1}}"#,
            r#"{"operationType":"drop","ns":"a.b"}"#,
            "",
            r#"{"operationType":"insert","ns":"a.b","documentKey":{"_id":2},"fullDocument":{"_id":2,"n":2}}"#,
            r#"{"operationType":"delete","ns":"a.b","documentKey":{"_id":1}}"#,
        ]);
        let mut source = ReplaySource::open(f.path()).unwrap();
        let all = Query::compile(&QuerySpec::default()).unwrap();
        let Pulled::Events(first) = source.pull(2, Duration::ZERO).unwrap() else { panic!("events expected") };
        assert_eq!(first.iter().map(|e| e.position.time()).collect::<Vec<_>>(), vec![1, 4]);
        let snapshot = source.snapshots().read("a.b", &QuerySpec::default(), &all, None).unwrap();
        assert_eq!((snapshot.docs.len(), snapshot.position), (2, Position::new(4)));
        let Pulled::Events(rest) = source.pull(10, Duration::ZERO).unwrap() else { panic!("events expected") };
        assert_eq!(rest.len(), 1);
        assert!(matches!(source.pull(10, Duration::ZERO).unwrap(), Pulled::Ended));
        assert_eq!((source.applied(), source.skipped()), (3, 1));
        assert_eq!(source.snapshots().read("a.b", &QuerySpec::default(), &all, None).unwrap().docs.len(), 1);
    }

    #[test]
    fn bad_lines_name_their_place() {
        let f = file(&[
            r#"{"operationType":"insert","ns":"a.b","documentKey":{"_id":1},"fullDocument":{"_id":1}}"#,
            "nope",
        ]);
        let mut source = ReplaySource::open(f.path()).unwrap();
        let error = source.pull(10, Duration::ZERO).unwrap_err();
        assert!(matches!(error, SourceError::Event { line: 2, .. }), "{error}");
        assert!(matches!(ReplaySource::open(Path::new("/nonexistent/x")), Err(SourceError::Io { .. })));
    }

    #[test]
    fn a_rate_paces_the_pulls() {
        let line = r#"{"operationType":"insert","ns":"a.b","documentKey":{"_id":1},"fullDocument":{"_id":1}}"#;
        let f = file(&vec![line; 50]);
        let mut source = ReplaySource::open(f.path()).unwrap().with_rate(1000.0);
        // Whatever the timing, one pull never runs ahead of the pace by more than its wait.
        let mut pulled = 0;
        let started = Instant::now();
        while pulled < 50 {
            if let Pulled::Events(e) = source.pull(100, Duration::from_millis(5)).unwrap() {
                pulled += e.len();
            }
            assert!(pulled as f64 <= started.elapsed().as_secs_f64() * 1000.0 + 1.0);
        }
    }
}
