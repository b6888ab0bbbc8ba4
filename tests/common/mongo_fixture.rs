//! A wire-level MongoDB fixture for tests: a TCP server on loopback that speaks OP_MSG well
//! enough for the real `mongodb` driver to run change streams, snapshot `find`s and cursors
//! against it. It is a fixture for the protocol, never a database: it keeps every write in an
//! in-memory log, answers `find` by replaying the log up to the requested cluster time and
//! evaluating the query with livegrid's matcher, and serves change events from the log.
//!
//! What it speaks (replies follow MongoDB's documentation of these commands): the `isMaster`
//! / `hello` handshake of a replica-set primary (connect with `directConnection=true`),
//! `aggregate` with a `$changeStream` stage (`fullDocument: "updateLookup"`, `resumeAfter`,
//! `startAfter`, `startAtOperationTime`), `getMore` with `postBatchResumeToken` (an empty
//! batch after waiting), `find` with `readConcern: {level: "snapshot", atClusterTime}` (and
//! `cursor.atClusterTime` in the reply), `killCursors`, `endSessions`, `ping`. Faults to
//! inject: a resumable error (`ResumableChangeStreamError` label) on the next `getMore`, a
//! dropped connection, and lost history (code 286 `ChangeStreamHistoryLost` when a stream
//! resumes before it).
//!
//! Writes are made through the fixture's methods; the events of one [`MongoFixture::transaction`]
//! share one cluster time, as MongoDB's do.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{Read, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bson::{Bson, Document, Timestamp, doc};
use livegrid_matcher::{Query, QuerySpec};

const OP_MSG: i32 = 2013;

/// Events in one `getMore` reply at most.
const BATCH: usize = 1000;

/// How long an empty `getMore` waits for events when the driver gives no `maxTimeMS`.
const AWAIT: Duration = Duration::from_millis(300);

/// One write.
#[derive(Debug, Clone)]
pub enum Write {
    Insert(Document),
    /// The document after the update (with its `_id`).
    Update(Document),
    Replace(Document),
    /// The `_id` of the deleted document.
    Delete(Bson),
    /// The collection is dropped (a `drop` event; no deletes for its documents).
    DropCollection,
}

#[derive(Debug, Clone)]
struct Entry {
    time: Timestamp,
    ns: String,
    write: Write,
}

impl Entry {
    fn id(&self) -> Bson {
        match &self.write {
            Write::Insert(d) | Write::Update(d) | Write::Replace(d) => d.get("_id").cloned().unwrap_or(Bson::Null),
            Write::Delete(id) => id.clone(),
            Write::DropCollection => Bson::Null,
        }
    }
}

/// A fault to inject.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// The next `getMore` fails with a resumable error.
    ResumableGetMore,
    /// The next `getMore` closes its connection instead of replying.
    DropConnection,
    /// The next `getMore` with events returns, before them, an insert without its document.
    UndecodableEvent,
    /// The next `getMore` fails with a resumable error, and the history it would resume from
    /// is gone (code 286 on resume).
    LoseHistory,
    /// The next `find` fails with `SnapshotUnavailable` (246).
    SnapshotUnavailable,
}

enum Cursor {
    /// `matches`: the `$match` stages after `$changeStream`, applied to the events.
    Stream {
        db: String,
        coll: Option<String>,
        next: usize,
        lookup: Option<bool>,
        matches: Vec<livegrid_matcher::Filter>,
    },
}

#[derive(Default)]
struct State {
    log: Vec<Entry>,
    /// Entries before this index are no longer in the "oplog": a stream cannot resume there.
    history_start: usize,
    clock: u32,
    cursors: HashMap<i64, Cursor>,
    next_cursor: i64,
    faults: VecDeque<Fault>,
    commands: Vec<String>,
    /// The documents now, by namespace and `_id` (what `updateLookup` reads).
    current: HashMap<(String, String), Document>,
    /// Where each change stream started in the log (its first event's index).
    starts: Vec<usize>,
    /// Writes of open transactions, by session and transaction number.
    transactions: HashMap<String, Vec<(String, Write)>>,
    connection_id: i32,
}

struct Shared {
    topology: Topology,
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
    seconds: u32,
}

/// The fixture: a server on a loopback port until dropped.
pub struct MongoFixture {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

/// How the fixture presents itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Topology {
    /// A replica-set primary (change streams work).
    ReplicaSet,
    /// A standalone server: `$changeStream` is refused, as MongoDB refuses it.
    Standalone,
}

impl MongoFixture {
    pub fn start() -> MongoFixture {
        Self::start_as(Topology::ReplicaSet)
    }

    pub fn start_as(topology: Topology) -> MongoFixture {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let seconds = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as u32;
        let shared = Arc::new(Shared {
            topology,
            state: Mutex::new(State { next_cursor: 1, ..Default::default() }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            seconds,
        });
        let accepting = shared.clone();
        std::thread::spawn(move || {
            while !accepting.stop.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let shared = accepting.clone();
                        std::thread::spawn(move || serve_connection(stream, &shared, addr));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        MongoFixture { addr, shared }
    }

    /// A URI for the driver. The monitor checks the server every half second (the driver's
    /// least): after a dropped connection the driver waits for a check before it selects the
    /// server again, and the default ten seconds would make recovery times in tests a lottery.
    pub fn uri(&self) -> String {
        format!("mongodb://{}/?directConnection=true&serverMonitoringMode=poll&heartbeatFrequencyMS=500", self.addr)
    }

    pub fn insert(&self, ns: &str, doc: Document) {
        self.transaction(vec![(ns, Write::Insert(doc))]);
    }

    pub fn update(&self, ns: &str, doc: Document) {
        self.transaction(vec![(ns, Write::Update(doc))]);
    }

    pub fn replace(&self, ns: &str, doc: Document) {
        self.transaction(vec![(ns, Write::Replace(doc))]);
    }

    /// Drops a collection: a `drop` event, and no deletes for its documents (as MongoDB).
    pub fn drop_collection(&self, ns: &str) {
        self.transaction(vec![(ns, Write::DropCollection)]);
    }

    pub fn delete(&self, ns: &str, id: impl Into<Bson>) {
        self.transaction(vec![(ns, Write::Delete(id.into()))]);
    }

    /// Writes that commit together: their events share one cluster time.
    pub fn transaction(&self, writes: Vec<(&str, Write)>) {
        let mut state = self.shared.state.lock().unwrap();
        commit(&mut state, self.shared.seconds, writes.into_iter().map(|(ns, w)| (ns.to_string(), w)).collect());
        self.shared.changed.notify_all();
    }

    /// The cluster time of the last write.
    pub fn cluster_time(&self) -> Timestamp {
        let state = self.shared.state.lock().unwrap();
        Timestamp { time: self.shared.seconds, increment: state.clock }
    }

    pub fn inject(&self, fault: Fault) {
        self.shared.state.lock().unwrap().faults.push_back(fault);
    }

    /// Forgets the change stream's history: streams resuming before now get code 286.
    pub fn lose_history(&self) {
        let mut state = self.shared.state.lock().unwrap();
        state.history_start = state.log.len();
    }

    /// Where each change stream opened so far started in the log: the index of the first
    /// write it returns (writes are counted from 0 in the order they were made).
    pub fn stream_starts(&self) -> Vec<usize> {
        self.shared.state.lock().unwrap().starts.clone()
    }

    /// Waits (up to 10 s) until every open change stream has read every write so far: with
    /// `updateLookup`, what an update event carries depends on when it is read, so tests that
    /// compare two streams let both read each write before the next write to its document.
    pub fn wait_streams_caught_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            {
                let state = self.shared.state.lock().unwrap();
                let end = state.log.len();
                if state.cursors.values().all(|Cursor::Stream { next, .. }| *next >= end) {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "change streams did not catch up within 10 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// How many writes were made.
    pub fn writes(&self) -> usize {
        self.shared.state.lock().unwrap().log.len()
    }

    /// The command names received so far.
    pub fn commands(&self) -> Vec<String> {
        self.shared.state.lock().unwrap().commands.clone()
    }

    /// What each of `queries` (id, then a subscribe message's filter, sort and limit) shows
    /// over the documents of `ns` now.
    pub fn expected(&self, ns: &str, queries: &[(&str, serde_json::Value)]) -> BTreeMap<String, Vec<Document>> {
        let docs = self.documents(ns);
        queries
            .iter()
            .map(|(id, q)| {
                let spec = QuerySpec {
                    filter: q.get("filter").map(|f| bson::serialize_to_document(f).unwrap()).unwrap_or_default(),
                    sort: q.get("sort").map(|s| bson::serialize_to_document(s).unwrap()),
                    limit: q.get("limit").and_then(|l| l.as_u64()),
                    ..Default::default()
                };
                (id.to_string(), Query::compile(&spec).unwrap().evaluate(&docs))
            })
            .collect()
    }

    /// The documents of `ns` now, by `_id`.
    pub fn documents(&self, ns: &str) -> Vec<Document> {
        let state = self.shared.state.lock().unwrap();
        let time = Timestamp { time: self.shared.seconds, increment: state.clock };
        documents_at(&state.log, ns, time)
    }
}

/// Commits writes at one new cluster time; returns it.
fn commit(state: &mut State, seconds: u32, writes: Vec<(String, Write)>) -> Timestamp {
    state.clock += 1;
    let time = Timestamp { time: seconds, increment: state.clock };
    for (ns, write) in writes {
        let entry = Entry { time, ns, write };
        let key = (entry.ns.clone(), format!("{:?}", entry.id()));
        match &entry.write {
            Write::Insert(d) | Write::Update(d) | Write::Replace(d) => {
                state.current.insert(key, d.clone());
            }
            Write::Delete(_) => {
                state.current.remove(&key);
            }
            Write::DropCollection => state.current.retain(|(ns, _), _| *ns != entry.ns),
        }
        state.log.push(entry);
    }
    time
}

type View = HashMap<(String, String), Document>;

fn apply_to(view: &mut View, ns: &str, write: &Write) {
    let id = match write {
        Write::Insert(d) | Write::Update(d) | Write::Replace(d) => d.get("_id").cloned().unwrap_or(Bson::Null),
        Write::Delete(id) => id.clone(),
        Write::DropCollection => {
            view.retain(|(n, _), _| n != ns);
            return;
        }
    };
    let key = (ns.to_string(), format!("{id:?}"));
    match write {
        Write::Insert(d) | Write::Update(d) | Write::Replace(d) => {
            view.insert(key, d.clone());
        }
        Write::Delete(_) => {
            view.remove(&key);
        }
        Write::DropCollection => {}
    }
}

/// The `_id` a write command's query names, and the condition the rest of it puts on that
/// document: the fixture writes by `{_id: value}` or `{$and: [{_id: value}, condition]}`.
fn query_id(q: &Document) -> Result<(Bson, Option<livegrid_matcher::Filter>), Document> {
    let plain = |q: &Document| match q.get("_id") {
        Some(id) if q.len() == 1 && !matches!(id, Bson::Document(d) if d.keys().any(|k| k.starts_with('$'))) => {
            Some(id.clone())
        }
        _ => None,
    };
    if let Some(id) = plain(q) {
        return Ok((id, None));
    }
    let by_id = q.get_array("$and").ok().filter(|_| q.len() == 1).and_then(|all| match all.first() {
        Some(Bson::Document(first)) => plain(first),
        _ => None,
    });
    let condition = livegrid_matcher::Filter::parse(q).ok();
    match (by_id, condition) {
        (Some(id), Some(condition)) => Ok((id, Some(condition))),
        _ => Err(error(2, "BadValue", "the fixture writes by {_id: value} (and a condition) only", &[])),
    }
}

fn duplicate(ns: &str, index: usize, id: &Bson) -> Document {
    doc! {
        "ok": 1.0, "n": 0,
        "writeErrors": [{ "index": index as i32, "code": 11000, "errmsg": format!("E11000 duplicate key error collection: {ns} index: _id_ dup key: {{ _id: {id} }}") }],
    }
}

/// The writes an `insert`, `update` or `delete` command makes on `view`, and its reply counts
/// (`n`, `nModified`, upserted ids).
fn plan(command: &Document, ns: &str, view: &mut View) -> Result<(Vec<Write>, Document), Document> {
    let mut writes = Vec::new();
    let mut reply = doc! {};
    let current = |view: &View, id: &Bson| view.get(&(ns.to_string(), format!("{id:?}"))).cloned();
    if let Ok(docs) = command.get_array("documents") {
        for doc in docs {
            let Bson::Document(doc) = doc else { return Err(error(2, "BadValue", "documents must be documents", &[])) };
            let id = doc.get("_id").cloned().unwrap_or(Bson::Null);
            if current(view, &id).is_some() {
                let mut refused = duplicate(ns, writes.len(), &id);
                refused.insert("n", writes.len() as i32);
                return Err(refused);
            }
            let write = Write::Insert(doc.clone());
            apply_to(view, ns, &write);
            writes.push(write);
        }
        reply.insert("n", writes.len() as i32);
    } else if let Ok(updates) = command.get_array("updates") {
        let (mut matched, mut modified, mut upserted) = (0, 0, Vec::new());
        for (index, update) in updates.iter().enumerate() {
            let Bson::Document(update) = update else { return Err(error(2, "BadValue", "bad update", &[])) };
            let (id, condition) = query_id(update.get_document("q").unwrap_or(&Document::new()))?;
            let u = update.get_document("u").map_err(|_| error(2, "BadValue", "u must be a document", &[]))?;
            let upsert = update.get_bool("upsert").unwrap_or(false);
            let mut before = current(view, &id);
            if before.as_ref().is_some_and(|doc| condition.as_ref().is_some_and(|c| !c.matches(doc))) {
                // Not selected; an upsert then inserts a second document with this `_id`.
                if upsert {
                    return Err(duplicate(ns, index, &id));
                }
                before = None;
            }
            let operators = livegrid::source::store::update::is_operator_update(u);
            let base = before.clone().unwrap_or_else(|| doc! { "_id": id.clone() });
            let after = if operators {
                livegrid::source::store::update::apply(&base, u)
                    .map_err(|e| error(9, "FailedToParse", &e.to_string(), &[]))?
            } else {
                let mut replaced = doc! { "_id": id.clone() };
                replaced.extend(u.clone().into_iter().filter(|(k, _)| k != "_id"));
                replaced
            };
            let write = match &before {
                None if !upsert => continue,
                None => {
                    upserted.push(Bson::Document(doc! { "index": index as i32, "_id": id.clone() }));
                    Write::Insert(after)
                }
                Some(before) => {
                    matched += 1;
                    if *before == after {
                        continue;
                    }
                    modified += 1;
                    if operators { Write::Update(after) } else { Write::Replace(after) }
                }
            };
            apply_to(view, ns, &write);
            writes.push(write);
        }
        reply.insert("n", matched + upserted.len() as i32);
        reply.insert("nModified", modified);
        if !upserted.is_empty() {
            reply.insert("upserted", upserted);
        }
    } else if let Ok(deletes) = command.get_array("deletes") {
        for delete in deletes {
            let Bson::Document(delete) = delete else { return Err(error(2, "BadValue", "bad delete", &[])) };
            let (id, condition) = query_id(delete.get_document("q").unwrap_or(&Document::new()))?;
            if current(view, &id).is_some_and(|doc| condition.as_ref().is_none_or(|c| c.matches(&doc))) {
                let write = Write::Delete(id);
                apply_to(view, ns, &write);
                writes.push(write);
            }
        }
        reply.insert("n", writes.len() as i32);
    }
    Ok((writes, reply))
}

/// `insert`, `update`, `delete`: applied now, or kept for the transaction they belong to.
fn write_command(command: &Document, db: &str, state: &mut State, seconds: u32) -> Document {
    let name = command.keys().next().cloned().unwrap_or_default();
    let coll = command.get_str(&name).unwrap_or_default();
    let ns = format!("{db}.{coll}");
    let in_transaction = command.get_bool("autocommit").is_ok_and(|a| !a);
    let key = transaction_key(command);
    let mut view = state.current.clone();
    if in_transaction {
        for (ns, write) in state.transactions.get(&key).into_iter().flatten() {
            apply_to(&mut view, ns, write);
        }
    }
    let (writes, mut reply) = match plan(command, &ns, &mut view) {
        Ok(planned) => planned,
        Err(reply) => return reply,
    };
    if in_transaction {
        state.transactions.entry(key).or_default().extend(writes.into_iter().map(|w| (ns.clone(), w)));
        reply.insert("ok", 1.0);
        return reply;
    }
    if !writes.is_empty() {
        let time = commit(state, seconds, writes.into_iter().map(|w| (ns.clone(), w)).collect());
        reply.insert("operationTime", time);
    }
    reply.insert("ok", 1.0);
    reply
}

fn transaction_key(command: &Document) -> String {
    let number = command.get("txnNumber").cloned().unwrap_or(Bson::Null);
    format!("{:?}/{number:?}", command.get("lsid"))
}

impl Drop for MongoFixture {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.changed.notify_all();
    }
}

/// The documents of `ns` at cluster time `time`, by replaying the log.
fn documents_at(log: &[Entry], ns: &str, time: Timestamp) -> Vec<Document> {
    let mut docs: BTreeMap<String, Document> = BTreeMap::new();
    for entry in log.iter().filter(|e| e.ns == ns && e.time <= time) {
        let key = format!("{:?}", entry.id());
        match &entry.write {
            Write::Insert(d) | Write::Update(d) | Write::Replace(d) => {
                docs.insert(key, d.clone());
            }
            Write::Delete(_) => {
                docs.remove(&key);
            }
            Write::DropCollection => docs.clear(),
        }
    }
    docs.into_values().collect()
}

fn serve_connection(mut stream: TcpStream, shared: &Shared, addr: SocketAddr) {
    stream.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let _ = stream.set_nodelay(true);
    loop {
        let Some((request_id, command)) = read_message(&mut stream, shared) else { return };
        let reply = match handle(&command, shared, addr) {
            Handled::Reply(reply) => reply,
            Handled::Drop => return,
        };
        if write_message(&mut stream, request_id, &reply).is_err() {
            return;
        }
    }
}

/// Reads one OP_MSG: its request id and its command (kind-1 sequences folded in as arrays).
fn read_message(stream: &mut TcpStream, shared: &Shared) -> Option<(i32, Document)> {
    let mut header = [0u8; 16];
    read_exact(stream, &mut header, shared)?;
    let length = i32::from_le_bytes(header[0..4].try_into().unwrap()) as usize;
    let request_id = i32::from_le_bytes(header[4..8].try_into().unwrap());
    let opcode = i32::from_le_bytes(header[12..16].try_into().unwrap());
    let mut body = vec![0u8; length.checked_sub(16)?];
    read_exact(stream, &mut body, shared)?;
    assert_eq!(opcode, OP_MSG, "the fixture speaks OP_MSG only");
    let mut at = 4; // flag bits
    let mut command = Document::new();
    let mut sequences: Vec<(String, Vec<Bson>)> = Vec::new();
    while at < body.len() {
        let kind = body[at];
        at += 1;
        match kind {
            0 => {
                let size = i32::from_le_bytes(body[at..at + 4].try_into().unwrap()) as usize;
                command = Document::from_reader(&body[at..at + size]).unwrap();
                at += size;
            }
            1 => {
                let size = i32::from_le_bytes(body[at..at + 4].try_into().unwrap()) as usize;
                let end = at + size;
                let mut p = at + 4;
                let name_end = p + body[p..].iter().position(|b| *b == 0).unwrap();
                let name = String::from_utf8(body[p..name_end].to_vec()).unwrap();
                p = name_end + 1;
                let mut docs = Vec::new();
                while p < end {
                    let size = i32::from_le_bytes(body[p..p + 4].try_into().unwrap()) as usize;
                    docs.push(Bson::Document(Document::from_reader(&body[p..p + size]).unwrap()));
                    p += size;
                }
                sequences.push((name, docs));
                at = end;
            }
            other => panic!("unknown OP_MSG section kind {other}"),
        }
    }
    for (name, docs) in sequences {
        command.insert(name, docs);
    }
    Some((request_id, command))
}

fn read_exact(stream: &mut TcpStream, buf: &mut [u8], shared: &Shared) -> Option<()> {
    let mut read = 0;
    while read < buf.len() {
        if shared.stop.load(Ordering::Acquire) {
            return None;
        }
        match stream.read(&mut buf[read..]) {
            Ok(0) => return None,
            Ok(n) => read += n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return None,
        }
    }
    Some(())
}

fn write_message(stream: &mut TcpStream, response_to: i32, reply: &Document) -> std::io::Result<()> {
    let mut doc = Vec::new();
    reply.to_writer(&mut doc).unwrap();
    let length = 16 + 4 + 1 + doc.len();
    let mut out = Vec::with_capacity(length);
    out.extend_from_slice(&(length as i32).to_le_bytes());
    out.extend_from_slice(&response_to.wrapping_add(1_000_000).to_le_bytes());
    out.extend_from_slice(&response_to.to_le_bytes());
    out.extend_from_slice(&OP_MSG.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.push(0);
    out.extend_from_slice(&doc);
    stream.write_all(&out)
}

enum Handled {
    Reply(Document),
    Drop,
}

fn error(code: i32, name: &str, message: &str, labels: &[&str]) -> Document {
    let mut reply = doc! { "ok": 0.0, "code": code, "codeName": name, "errmsg": message };
    if !labels.is_empty() {
        reply.insert("errorLabels", labels.iter().map(|l| Bson::String(l.to_string())).collect::<Vec<_>>());
    }
    reply
}

/// Resume tokens name a place in the log: "before entry `next`".
fn token(next: usize) -> Document {
    doc! { "_data": format!("{next:016x}") }
}

fn token_place(token: &Document) -> Option<usize> {
    usize::from_str_radix(token.get_str("_data").ok()?, 16).ok()
}

fn handle(command: &Document, shared: &Shared, addr: SocketAddr) -> Handled {
    let name = command.keys().next().cloned().unwrap_or_default();
    let db = command.get_str("$db").unwrap_or("admin").to_string();
    let mut state = shared.state.lock().unwrap();
    state.commands.push(name.clone());
    let now = Timestamp { time: shared.seconds, increment: state.clock };
    let reply = match name.as_str() {
        "isMaster" | "ismaster" | "hello" => {
            state.connection_id += 1;
            doc! {
                "helloOk": true,
                "ismaster": true,
                "isWritablePrimary": true,
                "setName": "rs0",
                "hosts": [addr.to_string()],
                "me": addr.to_string(),
                "maxBsonObjectSize": 16 * 1024 * 1024_i64,
                "maxMessageSizeBytes": 48_000_000_i32,
                "maxWriteBatchSize": 100_000_i32,
                "logicalSessionTimeoutMinutes": 30_i32,
                "connectionId": state.connection_id,
                "minWireVersion": 0_i32,
                "maxWireVersion": 21_i32,
                "ok": 1.0,
            }
        }
        "ping" | "endSessions" | "buildInfo" => doc! { "ok": 1.0 },
        "killCursors" => {
            let killed: Vec<Bson> = command.get_array("cursors").cloned().unwrap_or_default();
            for id in &killed {
                if let Bson::Int64(id) = id {
                    state.cursors.remove(id);
                }
            }
            doc! { "cursorsKilled": killed, "cursorsNotFound": [], "cursorsAlive": [], "cursorsUnknown": [], "ok": 1.0 }
        }
        "aggregate" if shared.topology == Topology::Standalone => {
            error(40573, "Location40573", "The $changeStream stage is only supported on replica sets", &[])
        }
        "aggregate" => aggregate(command, &db, &mut state, now),
        "getMore" => {
            let id = command.get_i64("getMore").unwrap_or(0);
            // Faults of `getMore` are taken here (an undecodable event stays until a batch
            // has events to put it in front of); those of other commands wait for them.
            let fault = match state.faults.front().copied() {
                Some(Fault::SnapshotUnavailable) => None,
                Some(Fault::UndecodableEvent) => Some(Fault::UndecodableEvent),
                other => {
                    state.faults.pop_front();
                    other
                }
            };
            match fault {
                Some(Fault::UndecodableEvent) => {
                    drop(state);
                    return Handled::Reply(get_more(id, shared, AWAIT));
                }
                Some(Fault::LoseHistory) => {
                    state.cursors.remove(&id);
                    state.history_start = state.log.len() + 1;
                    error(262, "ExceededTimeLimit", "injected resumable error", &["ResumableChangeStreamError"])
                }
                Some(Fault::ResumableGetMore) => {
                    state.cursors.remove(&id);
                    error(262, "ExceededTimeLimit", "injected resumable error", &["ResumableChangeStreamError"])
                }
                Some(Fault::DropConnection) => return Handled::Drop,
                Some(Fault::SnapshotUnavailable) | None => {
                    let wait = command
                        .get("maxTimeMS")
                        .and_then(Bson::as_i64)
                        .or_else(|| command.get_i32("maxTimeMS").ok().map(i64::from))
                        .map_or(AWAIT, |ms| Duration::from_millis(ms as u64));
                    drop(state);
                    return Handled::Reply(get_more(id, shared, wait));
                }
            }
        }
        "find" if state.faults.front() == Some(&Fault::SnapshotUnavailable) => {
            state.faults.pop_front();
            error(246, "SnapshotUnavailable", "injected: the snapshot is not available yet", &[])
        }
        "find" => find(command, &db, &state, now),
        "insert" | "update" | "delete" => {
            let reply = write_command(command, &db, &mut state, shared.seconds);
            shared.changed.notify_all();
            if reply.contains_key("operationTime") {
                return Handled::Reply(reply);
            }
            reply
        }
        "commitTransaction" => {
            let writes = state.transactions.remove(&transaction_key(command)).unwrap_or_default();
            if writes.is_empty() {
                doc! { "ok": 1.0 }
            } else {
                let time = commit(&mut state, shared.seconds, writes);
                shared.changed.notify_all();
                return Handled::Reply(doc! { "ok": 1.0, "operationTime": time });
            }
        }
        "dropDatabase" => {
            let collections: std::collections::BTreeSet<String> = state
                .current
                .keys()
                .map(|(ns, _)| ns.clone())
                .filter(|ns| ns.split_once('.').is_some_and(|(d, _)| d == db))
                .collect();
            if !collections.is_empty() {
                commit(
                    &mut state,
                    shared.seconds,
                    collections.into_iter().map(|ns| (ns, Write::DropCollection)).collect(),
                );
                shared.changed.notify_all();
            }
            doc! { "ok": 1.0 }
        }
        "abortTransaction" => {
            state.transactions.remove(&transaction_key(command));
            doc! { "ok": 1.0 }
        }
        other => error(
            59,
            "CommandNotFound",
            &format!("no such command: '{other}' (the fixture speaks only what livegrid uses)"),
            &[],
        ),
    };
    let mut reply = reply;
    reply.insert("operationTime", now);
    Handled::Reply(reply)
}

fn aggregate(command: &Document, db: &str, state: &mut State, now: Timestamp) -> Document {
    let pipeline = command.get_array("pipeline").cloned().unwrap_or_default();
    let Some(stage) = pipeline.first().and_then(Bson::as_document).and_then(|s| s.get_document("$changeStream").ok())
    else {
        return error(40324, "Location40324", "the fixture only runs $changeStream pipelines", &[]);
    };
    let coll = match command.get("aggregate") {
        Some(Bson::String(coll)) => Some(coll.clone()),
        _ => None,
    };
    // `lookup`: Some(false) reads the document when the event is read (updateLookup),
    // Some(true) gives the post-image stored with the write (required, whenAvailable).
    let lookup = match stage.get_str("fullDocument") {
        Ok("updateLookup") => Some(false),
        Ok("required" | "whenAvailable") => Some(true),
        _ => None,
    };
    let mut matches = Vec::new();
    for stage in &pipeline[1..] {
        let Some(filter) = stage.as_document().and_then(|s| s.get_document("$match").ok()) else {
            return error(40324, "Location40324", "the fixture only runs $match after $changeStream", &[]);
        };
        match livegrid_matcher::Filter::parse(filter) {
            Ok(filter) => matches.push(filter),
            Err(e) => return error(2, "BadValue", &e.to_string(), &[]),
        }
    }
    let resume = stage.get_document("resumeAfter").or_else(|_| stage.get_document("startAfter")).ok();
    let next = match (resume, stage.get_timestamp("startAtOperationTime").ok()) {
        (Some(token), _) => match token_place(token) {
            Some(place) => place,
            None => return error(260, "InvalidResumeToken", "cannot decode the resume token", &[]),
        },
        (None, Some(time)) => state.log.iter().position(|e| e.time >= time).unwrap_or(state.log.len()),
        (None, None) => state.log.len(),
    };
    let resuming = resume.is_some() || stage.get_timestamp("startAtOperationTime").is_ok();
    if resuming && next < state.history_start {
        return error(
            286,
            "ChangeStreamHistoryLost",
            "Resume of change stream was not possible, as the resume point may no longer be in the oplog.",
            &[],
        );
    }
    state.starts.push(next);
    let id = state.next_cursor;
    state.next_cursor += 1;
    let ns = format!("{db}.{}", coll.clone().unwrap_or_else(|| "$cmd.aggregate".into()));
    state.cursors.insert(id, Cursor::Stream { db: db.to_string(), coll, next, lookup, matches });
    let _ = now;
    doc! { "cursor": { "firstBatch": [], "postBatchResumeToken": token(next), "id": id, "ns": ns }, "ok": 1.0 }
}

fn get_more(id: i64, shared: &Shared, wait: Duration) -> Document {
    let deadline = Instant::now() + wait;
    let mut state = shared.state.lock().unwrap();
    loop {
        let now = Timestamp { time: shared.seconds, increment: state.clock };
        let log_len = state.log.len();
        let Some(Cursor::Stream { db, coll, next, lookup, matches }) = state.cursors.get(&id) else {
            return error(43, "CursorNotFound", &format!("cursor id {id} not found"), &[]);
        };
        let (start, lookup) = (*next, *lookup);
        // A cluster-wide stream is opened on `admin`.
        let everything = db == "admin" && coll.is_none();
        let mut events = Vec::new();
        let mut until = start;
        for (index, entry) in state.log.iter().enumerate().skip(start) {
            if events.len() == BATCH {
                break;
            }
            until = index + 1;
            let watched = everything
                || entry.ns.split_once('.').is_some_and(|(d, c)| d == db && coll.as_deref().is_none_or(|w| w == c));
            if !watched {
                continue;
            }
            let event = event(&state.current, index, entry, lookup);
            if matches.iter().all(|m| m.matches(&event)) {
                events.push(Bson::Document(event));
            }
        }
        let (db, coll) = (db.clone(), coll.clone());
        if !events.is_empty() && state.faults.front() == Some(&Fault::UndecodableEvent) {
            state.faults.pop_front();
            let bogus = doc! { "_id": token(start), "operationType": "insert", "clusterTime": now, "ns": { "db": "app", "coll": "items" }, "documentKey": { "_id": -1 } };
            events.insert(0, Bson::Document(bogus));
        }
        let timed_out = Instant::now() >= deadline || shared.stop.load(Ordering::Acquire);
        if !events.is_empty() || timed_out {
            let until = if events.is_empty() { log_len } else { until };
            if let Some(Cursor::Stream { next, .. }) = state.cursors.get_mut(&id) {
                *next = until;
            }
            let ns = format!("{db}.{}", coll.unwrap_or_else(|| "$cmd.aggregate".into()));
            let mut reply = doc! { "cursor": { "nextBatch": events, "postBatchResumeToken": token(until), "id": id, "ns": ns }, "ok": 1.0 };
            reply.insert("operationTime", now);
            return reply;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        state = shared.changed.wait_timeout(state, left).unwrap().0;
    }
}

/// The change event for log entry `index`, as MongoDB emits it.
fn event(current: &HashMap<(String, String), Document>, index: usize, entry: &Entry, lookup: Option<bool>) -> Document {
    let (db, coll) = entry.ns.split_once('.').unwrap();
    let id = entry.id();
    let mut event = doc! {
        "_id": token(index + 1),
        "clusterTime": entry.time,
        "wallTime": bson::DateTime::now(),
        "ns": { "db": db, "coll": coll },
        "documentKey": { "_id": id.clone() },
    };
    match &entry.write {
        Write::Insert(d) => {
            event.insert("operationType", "insert");
            event.insert("fullDocument", d.clone());
        }
        Write::Replace(d) => {
            event.insert("operationType", "replace");
            event.insert("fullDocument", d.clone());
        }
        Write::Update(d) => {
            event.insert("operationType", "update");
            event.insert("updateDescription", doc! { "updatedFields": d.clone(), "removedFields": [] });
            match lookup {
                Some(false) => {
                    // updateLookup reads the document as it is when the event is returned: a
                    // later write may have changed or deleted it (then `fullDocument` is null).
                    let now = current.get(&(entry.ns.clone(), format!("{id:?}"))).cloned();
                    event.insert("fullDocument", now.map_or(Bson::Null, Bson::Document));
                }
                // The post-image: the document right after this write.
                Some(true) => {
                    event.insert("fullDocument", d.clone());
                }
                None => {}
            }
        }
        Write::Delete(_) => {
            event.insert("operationType", "delete");
        }
        Write::DropCollection => {
            event.insert("operationType", "drop");
            event.remove("documentKey");
        }
    }
    event
}

fn find(command: &Document, db: &str, state: &State, now: Timestamp) -> Document {
    let coll = command.get_str("find").unwrap_or_default();
    let ns = format!("{db}.{coll}");
    let at =
        command.get_document("readConcern").ok().and_then(|rc| rc.get_timestamp("atClusterTime").ok()).unwrap_or(now);
    if at > now {
        return error(4, "NoSuchKey", "atClusterTime is in the future (the fixture has no later writes)", &[]);
    }
    let spec = QuerySpec {
        filter: command.get_document("filter").cloned().unwrap_or_default(),
        sort: command.get_document("sort").ok().cloned(),
        skip: command
            .get("skip")
            .and_then(Bson::as_i64)
            .or_else(|| command.get_i32("skip").ok().map(i64::from))
            .unwrap_or(0) as u64,
        limit: command
            .get("limit")
            .and_then(Bson::as_i64)
            .or_else(|| command.get_i32("limit").ok().map(i64::from))
            .filter(|l| *l > 0)
            .map(|l| l as u64),
        projection: command.get_document("projection").ok().cloned(),
    };
    let query = match Query::compile(&spec) {
        Ok(query) => query,
        Err(e) => return error(2, "BadValue", &e.to_string(), &[]),
    };
    let docs = documents_at(&state.log, &ns, at);
    let batch: Vec<Bson> = query.evaluate(&docs).into_iter().map(Bson::Document).collect();
    doc! { "cursor": { "firstBatch": batch, "id": 0_i64, "ns": ns, "atClusterTime": at }, "ok": 1.0 }
}
