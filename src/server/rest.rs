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
//! took; errors are `{"code", "message"}` with the matching status, and never half-apply a
//! write.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query as UrlQuery, State};
use axum::http::StatusCode;
use bson::{Bson, Document};
use livegrid_matcher::{Query, QuerySpec};
use livegrid_protocol::extjson;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::api_error::ApiError;
use crate::store::{Store, Write, id_label};

type Reply = Result<(StatusCode, Json<Value>), ApiError>;

fn namespace(db: &str, coll: &str) -> String {
    format!("{db}.{coll}")
}

fn body_document(body: Value) -> Result<Document, ApiError> {
    extjson::document_from_json(body).map_err(|e| ApiError::bad_request("bad_json", e.to_string()))
}

async fn blocking<T: Send + 'static>(
    store: &Arc<Store>,
    work: impl FnOnce(&Store) -> T + Send + 'static,
) -> Result<T, ApiError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || work(&store))
        .await
        .map_err(|e| ApiError::internal(format!("store task failed: {e}")))
}

fn written(events: &[livegrid_engine::ChangeEvent]) -> Value {
    json!({
        "_id": events.first().map(|e| extjson::to_relaxed_json(&e.id)),
        "position": events.last().map(|e| e.position),
    })
}

/// `POST /v1/db/{db}/{coll}`
pub async fn insert(
    State(state): State<AppState>,
    Path((db, coll)): Path<(String, String)>,
    body: Json<Value>,
) -> Reply {
    let doc = body_document(body.0)?;
    let ns = namespace(&db, &coll);
    let events = blocking(&state.store, move |s| s.write(&ns, vec![Write::Insert(doc)])).await??;
    Ok((StatusCode::CREATED, Json(written(&events))))
}

/// `GET /v1/db/{db}/{coll}/{id}`
pub async fn get(State(state): State<AppState>, Path((db, coll, id)): Path<(String, String, String)>) -> Reply {
    let ns = namespace(&db, &coll);
    let found = blocking(&state.store, move |s| {
        let id = s.resolve_id(&ns, &id)?;
        s.get(&ns, &id)?.ok_or_else(|| crate::store::StoreError::NotFound(id_label(&id), ns.clone()))
    })
    .await??;
    Ok((StatusCode::OK, Json(extjson::document_to_relaxed_json(&found))))
}

/// `PUT /v1/db/{db}/{coll}/{id}`
pub async fn replace(
    State(state): State<AppState>,
    Path((db, coll, id)): Path<(String, String, String)>,
    body: Json<Value>,
) -> Reply {
    let doc = body_document(body.0)?;
    let ns = namespace(&db, &coll);
    let events =
        blocking(&state.store, move |s| s.write(&ns, vec![Write::Replace(s.resolve_id(&ns, &id)?, doc)])).await??;
    let created = events.first().is_some_and(|e| e.op == livegrid_engine::ChangeOp::Insert);
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(written(&events))))
}

/// `PATCH /v1/db/{db}/{coll}/{id}`
pub async fn update(
    State(state): State<AppState>,
    Path((db, coll, id)): Path<(String, String, String)>,
    body: Json<Value>,
) -> Reply {
    let changes = body_document(body.0)?;
    if !crate::store::update::is_operator_update(&changes) {
        return Err(ApiError::bad_request(
            "bad_update",
            "PATCH takes update operators such as {\"$set\": {...}}; use PUT to replace",
        ));
    }
    let ns = namespace(&db, &coll);
    let events =
        blocking(&state.store, move |s| s.write(&ns, vec![Write::Update(s.resolve_id(&ns, &id)?, changes)])).await??;
    Ok((StatusCode::OK, Json(written(&events))))
}

/// `DELETE /v1/db/{db}/{coll}/{id}`
pub async fn delete(State(state): State<AppState>, Path((db, coll, id)): Path<(String, String, String)>) -> Reply {
    let ns = namespace(&db, &coll);
    let events = blocking(&state.store, move |s| s.write(&ns, vec![Write::Delete(s.resolve_id(&ns, &id)?)])).await??;
    Ok((StatusCode::OK, Json(written(&events))))
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
) -> Reply {
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
    let query = Query::compile(&spec).map_err(|e| ApiError::bad_request("bad_query", e.to_string()))?;
    let ns = namespace(&db, &coll);
    let k = query.limit.map(|l| (query.skip + l) as usize);
    let (docs, position) = blocking(&state.store, move |s| {
        s.read(&ns, &query, k).map(|snapshot| (query.evaluate(&snapshot.docs), snapshot.position))
    })
    .await??;
    let docs: Vec<Value> = docs.iter().map(extjson::document_to_relaxed_json).collect();
    Ok((StatusCode::OK, Json(json!({"docs": docs, "position": position}))))
}

/// `POST /v1/db/{db}/{coll}/_bulk` with `{"writes": [{"insert": doc} | {"replace": {"_id", "doc"}}
/// | {"update": {"_id", "update"}} | {"delete": {"_id"}}]}`
pub async fn bulk(State(state): State<AppState>, Path((db, coll)): Path<(String, String)>, body: Json<Value>) -> Reply {
    let body = body_document(body.0)?;
    let Ok(items) = body.get_array("writes") else {
        return Err(ApiError::bad_request("bad_bulk", "expected {\"writes\": [...]}"));
    };
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
    let ns = namespace(&db, &coll);
    let events = blocking(&state.store, move |s| s.write(&ns, writes)).await??;
    let positions: Vec<u64> = events.iter().map(|e| e.position).collect();
    let ids: Vec<Value> = events.iter().map(|e| extjson::to_relaxed_json(&e.id)).collect();
    Ok((StatusCode::OK, Json(json!({"positions": positions, "ids": ids}))))
}
