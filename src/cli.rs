//! Command-line interface: the commands and their flags.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use livegrid_engine::GridShape;

/// livegrid: a real-time query engine for MongoDB queries.
#[derive(Debug, Parser)]
#[command(name = "livegrid", version, about)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands of the `livegrid` binary.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Filter, sort and project Extended JSON documents read from stdin, one per line, and
    /// write the query's result to stdout, one per line: what a live query will return.
    Match(MatchArgs),
    /// Replay a recorded change stream through the grid with queries registered along the
    /// way; write every result and delta message, and a summary (throughput, latency) to
    /// stderr.
    Replay(ReplayArgs),
    /// Write a synthetic workload (events.jsonl, queries.jsonl) for `livegrid replay`.
    Workload(WorkloadArgs),
    /// Serve live queries over WebSocket and the embedded document store over REST.
    Serve(Box<ServeArgs>),
    /// Capture a MongoDB deployment's change stream as the JSON lines `livegrid replay` and
    /// `serve --replay` read (one event per line, cluster times included).
    Record(RecordArgs),
}

/// Flags of `livegrid record`.
#[derive(Debug, Args)]
pub struct RecordArgs {
    /// The deployment (a replica set or sharded cluster).
    #[arg(long, env = "LIVEGRID_MONGODB_URI")]
    pub mongodb: String,
    /// A database (`db`) or collection (`db.coll`) to record; repeat for more [default: all].
    #[arg(long)]
    pub watch: Vec<String>,
    /// Where to write the events (replaced if it exists).
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Stop after this many events [default: no limit].
    #[arg(long)]
    pub events: Option<u64>,
    /// Stop after this many seconds [default: no limit; stop with Ctrl-C].
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Where update events' documents come from (see `serve --full-document`).
    #[arg(long, value_enum, default_value_t)]
    pub full_document: crate::source::mongodb::FullDocument,
}

/// Flags of `livegrid serve` (each also read from the environment).
#[derive(Debug, Args, Default)]
pub struct ServeArgs {
    /// A TOML configuration file (flags and environment override it).
    #[arg(long, env = "LIVEGRID_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "LIVEGRID_LISTEN")]
    pub listen: Option<String>,
    /// Folder of the embedded store [default: ./data].
    #[arg(long, env = "LIVEGRID_DATA")]
    pub data: Option<PathBuf>,
    /// The grid, QxW [default: 1x1].
    #[arg(long, env = "LIVEGRID_GRID")]
    pub grid: Option<String>,
    /// Messages a connection may have queued before it is closed as too slow [default: 4096].
    #[arg(long, env = "LIVEGRID_QUEUE_CAPACITY")]
    pub queue_capacity: Option<usize>,
    /// Bytes a connection may have queued before it is closed as too slow [default: 67108864].
    #[arg(long, env = "LIVEGRID_QUEUE_BYTES")]
    pub queue_bytes: Option<usize>,
    /// Subscriptions per connection [default: 1000].
    #[arg(long, env = "LIVEGRID_MAX_SUBSCRIPTIONS")]
    pub max_subscriptions: Option<usize>,
    /// Largest client message in bytes [default: 1048576].
    #[arg(long, env = "LIVEGRID_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Seconds between WebSocket pings [default: 20].
    #[arg(long, env = "LIVEGRID_HEARTBEAT_SECONDS")]
    pub heartbeat_seconds: Option<u64>,
    /// Recent writes kept to catch subscriptions up [default: 100000].
    #[arg(long, env = "LIVEGRID_RETENTION")]
    pub retention: Option<usize>,
    /// Bytes of recent writes kept to catch subscriptions up (documents' rough heap size)
    /// [default: 268435456].
    #[arg(long, env = "LIVEGRID_RETENTION_BYTES")]
    pub retention_bytes: Option<usize>,
    /// Seconds the subscriptions of a dropped connection wait to be resumed [default: 60].
    #[arg(long, env = "LIVEGRID_RESUME_GRACE_SECONDS")]
    pub resume_grace_seconds: Option<u64>,
    /// Messages kept per subscription for resuming [default: 128].
    #[arg(long, env = "LIVEGRID_RESUME_BUFFER")]
    pub resume_buffer: Option<usize>,
    /// When writes reach the disk. `durable` (the default): a write is answered only once it
    /// is on disk, concurrent writes sharing one fsync (group commit). `periodic[:ms]`: answered
    /// at once and made durable at most `ms` (default 100) later: a crash loses up to that
    /// window of acknowledged writes (never part of one); deltas still go out only for durable
    /// writes [default: durable].
    #[arg(long, env = "LIVEGRID_DURABILITY")]
    pub durability: Option<String>,
    /// Bytes of messages kept per subscription for resuming [default: 1048576].
    #[arg(long, env = "LIVEGRID_RESUME_BUFFER_BYTES")]
    pub resume_buffer_bytes: Option<usize>,
    /// Connections open at once, WebSockets included [default: 10000].
    #[arg(long, env = "LIVEGRID_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Seconds for a request's headers to arrive [default: 10].
    #[arg(long, env = "LIVEGRID_HEADER_TIMEOUT_SECONDS")]
    pub header_timeout_seconds: Option<u64>,
    /// Largest REST request body in bytes [default: 20971520].
    #[arg(long, env = "LIVEGRID_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// How long HTTP caches may keep a REST read (Cache-Control max-age): seconds, or `auto`
    /// (`auto:MIN-MAX`, default bounds 1-3600) to estimate it per URL from how often its
    /// result changes. Cached results are watched and invalidated when they change; with 0
    /// caches revalidate every time, cheaply, through ETag and 304 [default: 0].
    #[arg(long, env = "LIVEGRID_CACHE_MAX_AGE")]
    pub cache_max_age: Option<crate::invalidation::ttl::MaxAge>,
    /// A max-age for one namespace, `db.coll=AGE` or `db=AGE` (repeatable).
    #[arg(long = "cache-namespace", env = "LIVEGRID_CACHE_NAMESPACES", value_delimiter = ',')]
    pub cache_namespaces: Vec<String>,
    /// Send `PURGE <url>` here when a cached result changes: http://host[:port][/prefix] of
    /// Varnish, nginx or a CDN adapter (repeatable).
    #[arg(long = "purge", env = "LIVEGRID_PURGE", value_delimiter = ',')]
    pub purge: Vec<String>,
    /// Cached results watched at once; reads beyond them are served with max-age=0
    /// [default: 10000].
    #[arg(long, env = "LIVEGRID_CACHE_ENTRIES")]
    pub cache_entries: Option<usize>,
    /// Changes queued per purge endpoint; beyond it purges are dropped and counted
    /// [default: 10000].
    #[arg(long, env = "LIVEGRID_PURGE_QUEUE")]
    pub purge_queue: Option<usize>,
    /// Bits of the cache sketch (GET /v1/cache-sketch) [default: 262144].
    #[arg(long, env = "LIVEGRID_SKETCH_BITS")]
    pub sketch_bits: Option<u64>,
    /// Hash functions of the cache sketch [default: 7].
    #[arg(long, env = "LIVEGRID_SKETCH_HASHES")]
    pub sketch_hashes: Option<u32>,
    /// Accept bearer tokens (JWT) signed with this HS256 secret (at least 32 bytes); needs
    /// --rules. Prefer the environment variable over the flag (process lists show flags).
    #[arg(long, env = "LIVEGRID_AUTH_SECRET", hide_env_values = true)]
    pub auth_secret: Option<String>,
    /// Accept bearer tokens (JWT) signed with the private key of this RS256 or ES256 public
    /// key (a PEM file); needs --rules.
    #[arg(long, env = "LIVEGRID_AUTH_PUBLIC_KEY")]
    pub auth_public_key: Option<PathBuf>,
    /// Who may read and write which namespaces (a TOML file; see README "Authentication").
    #[arg(long, env = "LIVEGRID_RULES")]
    pub rules: Option<PathBuf>,
    /// Serve HTTPS and WSS with this PEM certificate chain (with --tls-key).
    #[arg(long, env = "LIVEGRID_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "LIVEGRID_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// WebSocket connections one client address may hold at once [default: 1000].
    #[arg(long, env = "LIVEGRID_MAX_CONNECTIONS_PER_ADDRESS")]
    pub max_connections_per_address: Option<usize>,
    /// Messages a WebSocket connection may send per second; more get `rate_limited`
    /// [default: 1000].
    #[arg(long, env = "LIVEGRID_MAX_MESSAGES_PER_SECOND")]
    pub max_messages_per_second: Option<u32>,
    /// Values one $in, $nin or $all of a subscription may list [default: 10000].
    #[arg(long, env = "LIVEGRID_MAX_IN_VALUES")]
    pub max_in_values: Option<usize>,
    /// The furthest end (skip + limit) of a subscription's sorted window [default: 10000].
    #[arg(long, env = "LIVEGRID_MAX_WINDOW")]
    pub max_window: Option<u64>,
    /// Levels of nesting a subscription's filter may have, at most 100 [default: 100].
    #[arg(long, env = "LIVEGRID_MAX_FILTER_DEPTH")]
    pub max_filter_depth: Option<usize>,
    /// Bytes of one regular expression in a filter [default: 8192].
    #[arg(long, env = "LIVEGRID_MAX_REGEX_BYTES")]
    pub max_regex_bytes: Option<usize>,
    /// Bytes the compiled regular expressions of one filter may hold, at most 4194304
    /// [default: 1048576].
    #[arg(long, env = "LIVEGRID_MAX_REGEX_MEMORY")]
    pub max_regex_memory: Option<usize>,
    /// Bytes all subscriptions together may hold; new ones are refused beyond it
    /// [default: 1073741824].
    #[arg(long, env = "LIVEGRID_SUBSCRIPTION_MEMORY")]
    pub subscription_memory: Option<usize>,
    /// Bytes one subscription may hold (compiled query and window) [default: 16777216].
    #[arg(long, env = "LIVEGRID_MAX_SUBSCRIPTION_BYTES")]
    pub max_subscription_bytes: Option<usize>,
    /// Write requests waiting for the store's committer; writers wait beyond it [default: 4096].
    #[arg(long, env = "LIVEGRID_WRITE_QUEUE")]
    pub write_queue: Option<usize>,
    /// MiB of the embedded store's database pages kept in memory (read cache and write
    /// buffer) [default: 256].
    #[arg(long, env = "LIVEGRID_STORE_CACHE_MIB")]
    pub store_cache_mib: Option<usize>,
    /// Milliseconds a write may wait for room in that queue before it is refused with 503
    /// and Retry-After (nothing is written then) [default: 5000].
    #[arg(long, env = "LIVEGRID_WRITE_DEADLINE_MS")]
    pub write_deadline_ms: Option<u64>,
    /// Exit with status 1 when livegrid fails and can no longer keep results exact (a grid
    /// worker panicked, the engine refused committed writes, a commit failed) [default: true].
    #[arg(long, env = "LIVEGRID_EXIT_ON_FATAL")]
    pub exit_on_fatal: Option<bool>,
    /// Serve a recorded change stream (one MongoDB change event per line) instead of the
    /// embedded store: it is replayed once from the start, and the REST data API answers 501.
    #[arg(long, env = "LIVEGRID_REPLAY")]
    pub replay: Option<PathBuf>,
    /// With --replay: events per second at most [default: as fast as the engine takes them].
    #[arg(long, env = "LIVEGRID_REPLAY_RATE", requires = "replay")]
    pub replay_rate: Option<f64>,
    /// Follow a MongoDB replica set or sharded cluster (its change stream) instead of the
    /// embedded store; initial results are read from it. The resume token is kept in --data.
    #[arg(long, env = "LIVEGRID_MONGODB_URI", conflicts_with = "replay")]
    pub mongodb: Option<String>,
    /// With --mongodb: a database (`db`) or collection (`db.coll`) to watch; repeat for more
    /// [default: the whole deployment].
    #[arg(long, requires = "mongodb")]
    pub watch: Vec<String>,
    /// With --mongodb: skip change events that cannot be decoded (each is logged with its
    /// resume token) instead of stopping with an error [default: stop].
    #[arg(long, env = "LIVEGRID_SKIP_UNDECODABLE", requires = "mongodb")]
    pub skip_undecodable: Option<bool>,
    /// With --mongodb: where update events' documents come from: `lookup` (MongoDB reads the
    /// current document) or `post-image` (stored with each write; needs
    /// changeStreamPreAndPostImages on every watched collection) [default: lookup].
    #[arg(long, value_enum, env = "LIVEGRID_FULL_DOCUMENT", requires = "mongodb")]
    pub full_document: Option<crate::source::mongodb::FullDocument>,
    /// Cluster mode: a file of `host:port` lines, line i being process i's timely address.
    /// Every process gets the same file, --mongodb and --grid (the whole grid, split evenly);
    /// needs the MongoDB source.
    #[arg(long, env = "LIVEGRID_HOSTFILE")]
    pub hostfile: Option<PathBuf>,
    /// Cluster mode: this process's index in the hostfile (process 0 tails MongoDB and feeds
    /// the grid) [default: 0].
    #[arg(long, env = "LIVEGRID_PROCESS")]
    pub process: Option<usize>,
}

/// Flags of `livegrid workload`.
#[derive(Debug, Args)]
pub struct WorkloadArgs {
    /// The folder to write events.jsonl and queries.jsonl into.
    #[arg(long, visible_alias = "out")]
    pub dir: PathBuf,
    /// What the workload models (see README, "Workloads") [default: items, or chat with
    /// --fanout].
    #[arg(long, value_enum)]
    pub kind: Option<crate::workload::Kind>,
    /// Documents the collections start with: written as inserts before the other events, and
    /// every query is registered after them [default: 0 for items and chat, 10000 for the
    /// others].
    #[arg(long)]
    pub docs: Option<u64>,
    /// How many change events.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// How many queries.
    #[arg(long, default_value_t = 10_000)]
    pub queries: u64,
    /// The generator's seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// About how many subscriptions' results every write changes (chat: subscriptions per
    /// room; feed: feeds per author's post; shop: subscriptions per product write); 0 for the
    /// kind's default (chat 20, feed, shop and mixed 5). Without --kind, a value above 0
    /// chooses the chat workload.
    #[arg(long, default_value_t = 0)]
    pub fanout: u64,
}

/// Flags of `livegrid replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Change events, relaxed Extended JSON, one per line.
    #[arg(long)]
    pub events: Option<PathBuf>,
    /// Queries, one JSON object per line: {"id","ns","filter","sort","skip","limit","projection","after"}.
    #[arg(long)]
    pub queries: Option<PathBuf>,
    /// Where to write the messages, one JSON per line.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The grid: query partitions x write partitions.
    #[arg(long, default_value = "1x1")]
    pub grid: GridShape,
    /// Events fed to the grid at once.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Events per second at most (open loop, for latency at a fixed load) [default: as fast
    /// as the engine takes them].
    #[arg(long)]
    pub rate: Option<f64>,
    /// Recent events kept for catching up subscriptions.
    #[arg(long, default_value_t = 100_000)]
    pub retention: usize,
    /// Bytes of recent events kept for catching up subscriptions.
    #[arg(long, default_value_t = livegrid_engine::DEFAULT_RETENTION_BYTES)]
    pub retention_bytes: usize,
    /// Documents a sorted window keeps beyond its visible end.
    #[arg(long, default_value_t = 16)]
    pub slack: usize,
    /// Cluster mode: a file of `host:port` lines, one per process.
    #[arg(long)]
    pub hostfile: Option<PathBuf>,
    /// Cluster mode: this process's index (process 0 reads the files and writes the output).
    #[arg(long, default_value_t = 0)]
    pub process: usize,
}

/// Flags of `livegrid match`.
#[derive(Debug, Args)]
pub struct MatchArgs {
    /// The filter, as (Extended) JSON.
    #[arg(long, default_value = "{}")]
    pub filter: String,
    /// The sort, as JSON (`{"field": 1|-1, ...}`); without it documents keep input order.
    #[arg(long)]
    pub sort: Option<String>,
    /// How many result documents to leave out.
    #[arg(long, default_value_t = 0)]
    pub skip: u64,
    /// How many result documents to write at most (0: all).
    #[arg(long)]
    pub limit: Option<u64>,
    /// The projection, as JSON.
    #[arg(long)]
    pub projection: Option<String>,
}
