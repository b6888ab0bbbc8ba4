//! The REST API of the embedded store: documents by `_id` under `/v1/db/{db}/{coll}`.
//!
//! | method and path | does |
//! |---|---|
//! | `POST /v1/db/{db}/{coll}` | insert (an ObjectId `_id` is generated when missing) |
//! | `GET /v1/db/{db}/{coll}/{id}` | read |
//! | `PUT /v1/db/{db}/{coll}/{id}` | replace, or insert when absent |
//! | `PATCH /v1/db/{db}/{coll}/{id}` | update with operators (`$set`, `$inc`, ...) |
//! | `DELETE /v1/db/{db}/{coll}/{id}` | delete |
//! | `GET /v1/db/{db}/{coll}?filter=&sort=&skip=&limit=&projection=` | query |
//! | `POST /v1/db/{db}/{coll}/_bulk` | many writes in one atomic batch |
//!
//! Bodies and answers are relaxed Extended JSON. Every write answers with the positions it
//! took, once it is durable; errors, malformed requests included, are always
//! `{"code", "message"}` with the matching status, and never half-apply a write.

use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequest, FromRequestParts, Path as AxumPath, Query as AxumQuery, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bson::{Bson, Document};
use livegrid_matcher::pipeline::first_match_source;
use livegrid_matcher::{Pipeline, Query, QuerySpec};
use livegrid_protocol::{ErrorCode, Position, extjson};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::api_error::ApiError;
use super::query_limits;
use crate::auth::{Principal, acl};
use crate::invalidation::{Read, Ticket, canonical};
use crate::source::mongodb::MongoWrites;
use crate::source::store::{Guard, Store, Write, id_label, ids_from_path};

type Reply = Result<(StatusCode, Json<Value>), ApiError>;

/// A REST read: cacheable by HTTP caches, validated by an `ETag` derived from the result.
type ReadReply = Result<Response, ApiError>;

/// The answer to a read: `body` with `Cache-Control`, the canonical URL in
/// `Content-Location` and an `ETag` of `result` (the documents only, not the position, so that
/// writes elsewhere leave it alone), or `304 Not Modified` when the request's `If-None-Match`
/// names that tag. The read was watched under `ticket` (see [`crate::invalidation`]): without
/// one it is served with `max-age=0`.
fn cacheable(state: &AppState, request: &ReadRequest, ticket: Option<Ticket>, result: &Value, body: Value) -> Response {
    let tag = etag(result);
    let host = request.headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let target = request.uri.path_and_query().map_or_else(|| request.uri.path(), |pq| pq.as_str());
    let max_age = ticket.map_or(0, |ticket| state.cache.served(&ticket, host, target));
    let scope = if request.private { "private" } else { "public" };
    let location = HeaderValue::from_str(&request.canonical).unwrap_or_else(|_| HeaderValue::from_static("/"));
    let headers_out = [
        (header::ETAG, HeaderValue::from_str(&tag).expect("hex is a valid header")),
        (header::CACHE_CONTROL, HeaderValue::from_str(&format!("{scope}, max-age={max_age}")).expect("ascii")),
        (header::CONTENT_LOCATION, location),
    ];
    let matches = request
        .headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|candidate| matches!(candidate.trim(), "*") || candidate.trim().trim_start_matches("W/") == tag);
    if matches {
        return (StatusCode::NOT_MODIFIED, headers_out).into_response();
    }
    (StatusCode::OK, headers_out, Json(body)).into_response()
}

/// What answering a read needs of its request.
struct ReadRequest {
    headers: HeaderMap,
    uri: Uri,
    /// The canonical URL of what is read.
    canonical: String,
    /// Whether the answer is the caller's own (authenticated): shared caches must not keep it.
    private: bool,
}

/// Checks `spec` against the server's query limits and compiles it, on the blocking pool.
async fn compile(state: &AppState, spec: QuerySpec) -> Result<(QuerySpec, Query), ApiError> {
    let limits = state.config.query_limits();
    blocking(move || {
        let query = query_limits::compile(&spec, &limits).map_err(|(code, message)| {
            let code = if code == ErrorCode::QueryTooLarge { "query_too_large" } else { "bad_query" };
            ApiError::bad_request(code, message)
        })?;
        Ok((spec, query))
    })
    .await?
}

/// Watches the read of `spec` on `ns` under `url` (before it is read), when caching is on.
async fn watch(state: &AppState, ns: &str, url: &str, spec: &QuerySpec, query: &Query) -> Option<Ticket> {
    if !state.cache.config().max_age_for(ns).caches() {
        return None;
    }
    let read = Read { ns: ns.to_string(), url: url.to_string(), spec: spec.clone(), query: query.clone() };
    state.cache.watch(read).await
}

/// A strong entity tag: two independent 64-bit hashes of the result's JSON text.
fn etag(result: &Value) -> String {
    use std::hash::{BuildHasher, Hasher};
    let text = result.to_string();
    let half = |seed: u64| {
        let mut hasher =
            std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().build_hasher();
        hasher.write_u64(seed);
        hasher.write(text.as_bytes());
        hasher.finish()
    };
    format!("\"{:016x}{:016x}\"", half(0x6c69_7665), half(0x6772_6964))
}

/// Bodies larger than this are parsed and checked on the blocking pool, not the runtime.
const LARGE_BODY: usize = 64 * 1024;

/// A JSON body as a BSON document, and whether it was large; its rejections are API errors.
pub struct JsonBody {
    /// The document.
    pub doc: Document,
    /// Whether the body was large enough that its checks belong on the blocking pool.
    pub large: bool,
}

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let json = request
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|mime| {
                let mime = mime.trim().to_ascii_lowercase();
                mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
            });
        if !json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected a body with content-type application/json",
            ));
        }
        let bytes = axum::body::Bytes::from_request(request, state).await.map_err(|rejection| {
            let status = rejection.status();
            let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "body_too_large" } else { "bad_body" };
            ApiError::new(status, code, rejection.body_text().to_lowercase())
        })?;
        let large = bytes.len() > LARGE_BODY;
        let parse = move || -> Result<Document, ApiError> {
            let value: Value = serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::bad_request("bad_json", format!("invalid JSON body: {e}")))?;
            body_document(value)
        };
        let doc = if large {
            tokio::task::spawn_blocking(parse)
                .await
                .map_err(|e| ApiError::internal(format!("parsing the body failed: {e}")))??
        } else {
            parse()?
        };
        Ok(JsonBody { doc, large })
    }
}

/// Who sent a request (its bearer token, or anonymous); a token that proves nothing is
/// refused with 401.
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        super::authenticate(state, &parts.headers, None).map(Caller)
    }
}

/// Refusal of what `principal` may not do: 401 when anonymous (a token may help), 403 when
/// authenticated.
fn denied(principal: &Principal, what: &str, ns: &str) -> ApiError {
    match &principal.user {
        None => {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", format!("anonymous clients may not {what} {ns}"))
        }
        Some(user) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", format!("user {user:?} may not {what} {ns}")),
    }
}

fn check_read(state: &AppState, ns: &str, principal: &Principal) -> Result<(), ApiError> {
    if state.rules.may_read(ns, principal) { Ok(()) } else { Err(denied(principal, "read", ns)) }
}

/// Path parameters; their rejections are API errors.
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Ok(Path(AxumPath::<T>::from_request_parts(parts, state).await?.0))
    }
}

/// Query-string parameters; their rejections are API errors.
pub struct UrlQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for UrlQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Ok(UrlQuery(AxumQuery::<T>::from_request_parts(parts, state).await?.0))
    }
}

fn namespace(db: &str, coll: &str) -> Result<String, ApiError> {
    Ok(crate::source::namespace::join(db, coll)?)
}

fn body_document(body: Value) -> Result<Document, ApiError> {
    extjson::document_from_json(body).map_err(|e| ApiError::bad_request("bad_json", e.to_string()))
}

/// Where the REST data API reads and writes: the embedded store, or MongoDB when the server
/// follows it. A replay file has no writer: `501`.
enum Data {
    Store(Arc<Store>),
    Mongo(Arc<MongoWrites>),
}

fn data(state: &AppState) -> Result<Data, ApiError> {
    match (&state.store, &state.mongo) {
        (Some(store), _) => Ok(Data::Store(store.clone())),
        (None, Some(mongo)) => Ok(Data::Mongo(mongo.clone())),
        (None, None) => Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "no_store",
            "this server reads a replay file: the REST data API needs the embedded store or MongoDB (serve without --replay)",
        )),
    }
}

/// Runs blocking work (store scans, MongoDB calls) on the blocking pool.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| ApiError::internal(format!("data task failed: {e}")))
}

/// Applies writes to `ns` for `principal` and returns the changes they made. With
/// authentication, `principal` must be allowed to write `ns`, and every document the writes
/// change must admit it in its `_acl.write`: a guard checked in the transaction that writes.
async fn write(
    state: &AppState,
    principal: &Principal,
    ns: String,
    writes: Vec<Write>,
    large: bool,
) -> Result<Vec<livegrid_engine::ChangeEvent>, ApiError> {
    if !state.rules.may_write(&ns, principal) {
        return Err(denied(principal, "write", &ns));
    }
    let guard = match state.auth {
        Some(_) => Some(Guard::new(acl::writable_by(principal))?),
        None => None,
    };
    match data(state)? {
        Data::Store(store) => Ok(store.write_guarded(&ns, writes, guard, large).await?),
        Data::Mongo(mongo) => Ok(blocking(move || mongo.write(&ns, writes, guard.as_ref())).await??),
    }
}

/// The `_id` a URL path segment names (see the store's module docs).
async fn resolve(state: &AppState, ns: &str, segment: String) -> Result<Bson, ApiError> {
    let ns = ns.to_string();
    match data(state)? {
        Data::Store(store) => Ok(blocking(move || store.resolve_id(&ns, &segment)).await??),
        Data::Mongo(mongo) => Ok(blocking(move || mongo.resolve_id(&ns, &segment)).await??),
    }
}

/// The document with `_id` `id` in `ns`, if there is one.
async fn fetch(state: &AppState, ns: &str, id: Bson) -> Result<Option<Document>, ApiError> {
    let ns = ns.to_string();
    match data(state)? {
        Data::Store(store) => Ok(blocking(move || store.get(&ns, &id)).await??),
        Data::Mongo(mongo) => Ok(blocking(move || mongo.get(&ns, &id)).await??),
    }
}

/// The answer to a one-document write: its `_id` and position, and whether it changed the
/// document (an update or replacement that changes nothing is a no-op, as in MongoDB: no
/// event, no position).
fn written(id: Option<&Bson>, events: &[livegrid_engine::ChangeEvent]) -> Value {
    let id = events.first().map(|e| &e.id).or(id);
    json!({
        "_id": id.map(extjson::to_relaxed_json),
        "position": events.last().map(|e| e.position),
        "modified": !events.is_empty(),
    })
}

/// `POST /v1/db/{db}/{coll}`
pub async fn insert(
    State(state): State<AppState>,
    Path((db, coll)): Path<(String, String)>,
    Caller(principal): Caller,
    body: JsonBody,
) -> Reply {
    let ns = namespace(&db, &coll)?;
    let events = write(&state, &principal, ns, vec![Write::Insert(body.doc)], body.large).await?;
    Ok((StatusCode::CREATED, Json(written(None, &events))))
}

/// `GET /v1/db/{db}/{coll}/{id}`
pub async fn get(
    State(state): State<AppState>,
    Path((db, coll, segment)): Path<(String, String, String)>,
    headers: HeaderMap,
    uri: Uri,
) -> ReadReply {
    let ns = namespace(&db, &coll)?;
    let principal = super::authenticate(&state, &headers, None)?;
    check_read(&state, &ns, &principal)?;
    let canonical = canonical::document_url(&db, &coll, &segment);
    // Watched before it is read: any document the segment may name, as the caller may see it.
    // Only anonymous reads are the same for everyone and so cacheable by shared caches.
    let shared = !principal.is_authenticated();
    let ids = ids_from_path(&segment);
    let spec = QuerySpec {
        filter: state.visible(&bson::doc! {"_id": {"$in": ids}}, &principal),
        sort: None,
        skip: 0,
        limit: None,
        projection: None,
    };
    let ticket = match shared && state.cache.config().max_age_for(&ns).caches() {
        true => {
            let (spec, query) = compile(&state, spec).await?;
            watch(&state, &ns, &canonical, &spec, &query).await
        }
        false => None,
    };
    let id = resolve(&state, &ns, segment).await?;
    let not_found = ApiError::from(crate::source::store::StoreError::NotFound(id_label(&id), ns.clone()));
    let found = fetch(&state, &ns, id).await?;
    // A document the caller may not read does not exist for it.
    let found = found.filter(|doc| state.auth.is_none() || acl::may_read(doc, &principal)).ok_or(not_found)?;
    let found = extjson::document_to_relaxed_json(&found);
    let request = ReadRequest { headers, uri, canonical, private: !shared };
    Ok(cacheable(&state, &request, ticket, &found, found.clone()))
}

/// `PUT /v1/db/{db}/{coll}/{id}`
pub async fn replace(
    State(state): State<AppState>,
    Path((db, coll, id)): Path<(String, String, String)>,
    Caller(principal): Caller,
    body: JsonBody,
) -> Reply {
    let ns = namespace(&db, &coll)?;
    let id = resolve(&state, &ns, id).await?;
    let events = write(&state, &principal, ns, vec![Write::Replace(id.clone(), body.doc)], body.large).await?;
    let created = events.first().is_some_and(|e| e.op == livegrid_engine::ChangeOp::Insert);
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(written(Some(&id), &events))))
}

/// `PATCH /v1/db/{db}/{coll}/{id}`
pub async fn update(
    State(state): State<AppState>,
    Path((db, coll, id)): Path<(String, String, String)>,
    Caller(principal): Caller,
    body: JsonBody,
) -> Reply {
    let (changes, large) = (body.doc, body.large);
    if !crate::source::store::update::is_operator_update(&changes) {
        return Err(ApiError::bad_request(
            "bad_update",
            "PATCH takes update operators such as {\"$set\": {...}}; use PUT to replace",
        ));
    }
    let ns = namespace(&db, &coll)?;
    let id = resolve(&state, &ns, id).await?;
    let events = write(&state, &principal, ns, vec![Write::Update(id.clone(), changes)], large).await?;
    Ok((StatusCode::OK, Json(written(Some(&id), &events))))
}

/// `DELETE /v1/db/{db}/{coll}/{id}`
pub async fn delete(
    State(state): State<AppState>,
    Path((db, coll, id)): Path<(String, String, String)>,
    Caller(principal): Caller,
) -> Reply {
    let ns = namespace(&db, &coll)?;
    let id = resolve(&state, &ns, id).await?;
    let events = write(&state, &principal, ns, vec![Write::Delete(id.clone())], false).await?;
    Ok((StatusCode::OK, Json(written(Some(&id), &events))))
}

/// Query parameters of `GET /v1/db/{db}/{coll}`.
#[derive(Debug, Deserialize)]
pub struct QueryParams {
    filter: Option<String>,
    sort: Option<String>,
    skip: Option<u64>,
    limit: Option<u64>,
    projection: Option<String>,
}

/// `GET /v1/db/{db}/{coll}?filter=&sort=&skip=&limit=&projection=`
pub async fn query(
    State(state): State<AppState>,
    Path((db, coll)): Path<(String, String)>,
    UrlQuery(params): UrlQuery<QueryParams>,
    headers: HeaderMap,
    uri: Uri,
) -> ReadReply {
    let parse = |name: &str, text: &Option<String>| {
        text.as_deref()
            .map(|t| extjson::parse_document(t).map_err(|e| ApiError::bad_request("bad_query", format!("{name}: {e}"))))
            .transpose()
    };
    let spec = QuerySpec {
        filter: parse("filter", &params.filter)?.unwrap_or_default(),
        sort: parse("sort", &params.sort)?,
        skip: params.skip.unwrap_or(0),
        limit: params.limit,
        projection: parse("projection", &params.projection)?,
    };
    let ns = namespace(&db, &coll)?;
    let principal = super::authenticate(&state, &headers, None)?;
    check_read(&state, &ns, &principal)?;
    let canonical = canonical::query_url(&db, &coll, &spec);
    let shared = !principal.is_authenticated();
    // Only what the caller may read. Compiling (regexes) and scanning belong on the blocking
    // pool; an anonymous result is watched before it is read.
    let mut spec = canonical::query_key(&spec);
    spec.filter = state.visible(&spec.filter, &principal);
    let (spec, query) = compile(&state, spec).await?;
    let ticket = match shared {
        true => watch(&state, &ns, &canonical, &spec, &query).await,
        false => None,
    };
    let (docs, position) = match data(&state)? {
        Data::Store(store) => {
            blocking(move || {
                let k = query.window_end().map(|end| usize::try_from(end).unwrap_or(usize::MAX));
                let snapshot = store.read(&ns, &query, k)?;
                Ok::<_, ApiError>((query.evaluate(&snapshot.docs), snapshot.position))
            })
            .await??
        }
        Data::Mongo(mongo) => blocking(move || mongo.query(&ns, &spec)).await??,
    };
    let docs = Value::Array(docs.iter().map(extjson::document_to_relaxed_json).collect());
    let request = ReadRequest { headers, uri, canonical, private: !shared };
    Ok(cacheable(&state, &request, ticket, &docs, json!({"docs": docs, "position": position})))
}

/// `POST /v1/db/{db}/{coll}/_aggregate` with `{"pipeline": [...]}`: the pipeline run once over
/// the documents of `db.coll` the caller may read, `{"docs": [...], "position": P}` (the same
/// semantics as a live pipeline; see `livegrid_matcher::pipeline`).
pub async fn aggregate(
    State(state): State<AppState>,
    Path((db, coll)): Path<(String, String)>,
    Caller(principal): Caller,
    body: JsonBody,
) -> Reply {
    let ns = namespace(&db, &coll)?;
    check_read(&state, &ns, &principal)?;
    let Ok(stages) = body.doc.get_array("pipeline").cloned() else {
        return Err(ApiError::bad_request("bad_pipeline", "expected {\"pipeline\": [stages]}"));
    };
    // The documents its first $match admits (and the caller may read), read like a query's.
    let filter = first_match_source(&stages);
    let pipeline = blocking(move || Pipeline::parse(&stages)).await?.map_err(|e| {
        let code = if e.is_unsupported() { "unsupported_stage" } else { "bad_pipeline" };
        ApiError::bad_request(code, e.to_string())
    })?;
    let spec = QuerySpec { filter: state.visible(&filter, &principal), ..Default::default() };
    let (spec, query) = compile(&state, spec).await?;
    let (docs, position) = match data(&state)? {
        Data::Store(store) => {
            blocking(move || {
                let snapshot = store.read(&ns, &query, None)?;
                Ok::<_, ApiError>((pipeline.evaluate(&snapshot.docs), snapshot.position))
            })
            .await??
        }
        Data::Mongo(mongo) => {
            blocking(move || {
                let (docs, position) = mongo.query(&ns, &spec)?;
                Ok::<_, ApiError>((pipeline.evaluate(&docs), position))
            })
            .await??
        }
    };
    let docs: Vec<Value> = docs.iter().map(extjson::document_to_relaxed_json).collect();
    Ok((StatusCode::OK, Json(json!({"docs": docs, "position": position}))))
}

/// `POST /v1/db/{db}/{coll}/_bulk` with `{"writes": [{"insert": doc} | {"replace": {"_id", "doc"}}
/// | {"update": {"_id", "update"}} | {"delete": {"_id"}}]}`
pub async fn bulk(
    State(state): State<AppState>,
    Path((db, coll)): Path<(String, String)>,
    Caller(principal): Caller,
    body: JsonBody,
) -> Reply {
    let (large, body) = (body.large, body.doc);
    let Ok(items) = body.get_array("writes") else {
        return Err(ApiError::bad_request("bad_bulk", "expected {\"writes\": [...]}"));
    };
    let items_len = items.len();
    let mut writes = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let bad = |why: &str| ApiError::bad_request("bad_bulk", format!("writes[{i}]: {why}"));
        let Bson::Document(item) = item else { return Err(bad("not a document")) };
        let (kind, arg) = item.iter().next().ok_or_else(|| bad("empty"))?;
        let id = || match arg {
            Bson::Document(d) => d.get("_id").cloned().ok_or_else(|| bad("needs _id")),
            _ => Err(bad("needs a document")),
        };
        let sub = |field: &str| match arg {
            Bson::Document(d) => d.get_document(field).cloned().map_err(|_| bad(&format!("needs {field}"))),
            _ => Err(bad("needs a document")),
        };
        writes.push(match kind.as_str() {
            "insert" => match arg {
                Bson::Document(d) => Write::Insert(d.clone()),
                _ => return Err(bad("insert needs a document")),
            },
            "replace" => Write::Replace(id()?, sub("doc")?),
            "update" => Write::Update(id()?, sub("update")?),
            "delete" => Write::Delete(id()?),
            other => return Err(bad(&format!("unknown write {other:?}"))),
        });
    }
    let ns = namespace(&db, &coll)?;
    let events = write(&state, &principal, ns, writes, large || items_len > 64).await?;
    let positions: Vec<Position> = events.iter().map(|e| e.position).collect();
    let ids: Vec<Value> = events.iter().map(|e| extjson::to_relaxed_json(&e.id)).collect();
    Ok((StatusCode::OK, Json(json!({"positions": positions, "ids": ids}))))
}
