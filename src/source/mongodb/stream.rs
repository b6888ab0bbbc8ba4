//! One MongoDB change stream, read one raw event at a time: connecting, opening (after a
//! resume token or at the present), and resuming after failures with backoff. The source
//! ([`super::MongoSource`]) and `livegrid record` read through it.

use std::sync::Arc;
use std::time::Duration;

use bson::{Bson, Document, doc};
use mongodb::Client;
use mongodb::change_stream::ChangeStream;
use mongodb::change_stream::event::ResumeToken;
use mongodb::options::FullDocumentType;

use super::{MongoError, Watch};

/// Backoff between attempts to reopen a failed stream: doubling from the first to the last.
const RETRY_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// Attempts to reopen a stream before the reader gives up.
const RETRY_ATTEMPTS: u32 = 8;

/// How long MongoDB holds an empty `getMore` before answering.
const AWAIT: Duration = Duration::from_millis(50);

/// MongoDB's `ChangeStreamHistoryLost`.
const HISTORY_LOST: i32 = 286;

/// A change stream, resumed after failures.
pub struct StreamReader {
    runtime: Arc<tokio::runtime::Runtime>,
    client: Client,
    watch: Watch,
    stream: Option<ChangeStream<Document>>,
    /// The token after the last event read (or the stream's position while idle).
    token: Option<ResumeToken>,
    /// Whether the stream was invalidated: it reopens with `startAfter`, not `resumeAfter`.
    invalidated: bool,
    full_document: FullDocument,
}

/// Where an update event's document comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FullDocument {
    /// `updateLookup`: MongoDB reads the document when the event is read (it may be newer
    /// than the write, or gone: then the document has left every result).
    #[default]
    Lookup,
    /// `required`: the post-image stored with the write (exact; every watched collection
    /// needs `changeStreamPreAndPostImages` enabled, or the stream fails).
    PostImage,
}

/// The driver's client for `uri` on a small runtime of its own (never the server's): servers
/// unreachable for 5 s fail the operation rather than hang it.
pub(super) fn connect_driver(uri: &str) -> Result<(Arc<tokio::runtime::Runtime>, Client), MongoError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("livegrid-mongodb")
        .enable_all()
        .build()
        .map_err(MongoError::Runtime)?;
    let client = runtime.block_on(async {
        let mut options = mongodb::options::ClientOptions::parse(uri).await.map_err(MongoError::Uri)?;
        if options.server_selection_timeout.is_none() {
            options.server_selection_timeout = Some(Duration::from_secs(5));
        }
        options.app_name.get_or_insert_with(|| "livegrid".into());
        Client::with_options(options).map_err(MongoError::Uri)
    })?;
    Ok((Arc::new(runtime), client))
}

impl StreamReader {
    /// Connects to the deployment (the stream opens with [`StreamReader::open`]). Errors come
    /// quickly: an unreachable server fails within the server selection timeout, 5 s unless
    /// the URI sets `serverSelectionTimeoutMS`.
    pub fn connect(uri: &str, watch: Watch) -> Result<StreamReader, MongoError> {
        let (runtime, client) = connect_driver(uri)?;
        Ok(StreamReader {
            runtime,
            client,
            watch,
            stream: None,
            token: None,
            invalidated: false,
            full_document: FullDocument::default(),
        })
    }

    /// Where update events' documents come from (before [`StreamReader::open`]).
    pub fn set_full_document(&mut self, full_document: FullDocument) {
        self.full_document = full_document;
    }

    /// The driver's runtime and client, for snapshot reads.
    pub fn driver(&self) -> (Arc<tokio::runtime::Runtime>, Client) {
        (self.runtime.clone(), self.client.clone())
    }

    /// Opens the stream after `token`, or at the present.
    pub fn open(&mut self, token: Option<ResumeToken>) -> Result<(), MongoError> {
        self.token = token;
        self.invalidated = false;
        self.reopen()
    }

    /// The token after the last event read (or the stream's position while idle).
    pub fn token(&self) -> Option<&ResumeToken> {
        self.token.as_ref()
    }

    /// The stream was invalidated (its collection dropped or renamed): it reopens after it.
    pub fn invalidate(&mut self) {
        self.stream = None;
        self.invalidated = true;
    }

    /// The next event, or `None` when MongoDB had none within its await time. Failures the
    /// driver does not resume itself are retried here, from the last token, with backoff.
    pub fn next_event(&mut self) -> Result<Option<Document>, MongoError> {
        if self.stream.is_none() {
            self.reopen()?;
        }
        let stream = self.stream.as_mut().expect("opened above");
        match self.runtime.block_on(stream.next_if_any()) {
            Ok(Some(raw)) => {
                self.token = stream.resume_token();
                Ok(Some(raw))
            }
            Ok(None) => {
                if let Some(token) = stream.resume_token() {
                    self.token = Some(token);
                }
                Ok(None)
            }
            Err(failure) => {
                self.recover(failure)?;
                Ok(None)
            }
        }
    }

    fn reopen(&mut self) -> Result<(), MongoError> {
        self.stream = None;
        let (client, watch, token) = (self.client.clone(), self.watch.clone(), self.token.clone());
        let invalidated = self.invalidated;
        let full_document = match self.full_document {
            FullDocument::Lookup => FullDocumentType::UpdateLookup,
            FullDocument::PostImage => FullDocumentType::Required,
        };
        let opened = self.runtime.block_on(async move {
            let pipeline = match &watch {
                Watch::Deployment => Vec::new(),
                Watch::Only(names) => {
                    let any: Vec<Bson> = names
                        .iter()
                        .map(|name| match name.split_once('.') {
                            Some((db, coll)) => Bson::Document(doc! { "ns.db": db, "ns.coll": coll }),
                            None => Bson::Document(doc! { "ns.db": name }),
                        })
                        .collect();
                    vec![doc! { "$match": { "$or": any } }]
                }
            };
            let watch = client.watch().pipeline(pipeline).full_document(full_document).max_await_time(AWAIT);
            match token {
                Some(token) if invalidated => watch.start_after(token).await,
                token => watch.resume_after(token).await,
            }
        });
        match opened {
            Ok(stream) => {
                self.stream = Some(stream.with_type::<Document>());
                self.invalidated = false;
                Ok(())
            }
            Err(e) if history_lost(&e) => Err(MongoError::HistoryLost),
            Err(source) => Err(MongoError::Driver { context: "opening the change stream".into(), source }),
        }
    }

    fn recover(&mut self, failure: mongodb::error::Error) -> Result<(), MongoError> {
        if history_lost(&failure) {
            return Err(MongoError::HistoryLost);
        }
        tracing::warn!(error = %failure, "mongodb change stream failed; resuming from the last token");
        metrics::counter!("livegrid_mongodb_stream_retries").increment(1);
        let mut backoff = RETRY_BACKOFF.0;
        let mut last = MongoError::Driver { context: "reading the change stream".into(), source: failure };
        for _ in 0..RETRY_ATTEMPTS {
            match self.reopen() {
                Ok(()) => return Ok(()),
                Err(MongoError::HistoryLost) => return Err(MongoError::HistoryLost),
                Err(e) => {
                    tracing::warn!(error = %e, "reopening the mongodb change stream failed; retrying");
                    last = e;
                }
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(RETRY_BACKOFF.1);
        }
        Err(last)
    }
}

fn history_lost(error: &mongodb::error::Error) -> bool {
    matches!(&*error.kind, mongodb::error::ErrorKind::Command(command) if command.code == HISTORY_LOST)
}
