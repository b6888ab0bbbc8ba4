//! Aggregation pipelines of the shape live results are made of: `$match`, `$unwind` and
//! `$sort` (the order of `$first`/`$last`) before one `$group`, then `$match`, `$sort`,
//! `$skip`, `$limit` and `$project` on its output, with MongoDB's semantics (null and missing
//! group keys are one group; `$sum` and `$avg` promote numeric types; `$min` and `$max`
//! compare in BSON order and ignore nulls; arrays are not unwound unless `$unwind` says so).
//!
//! [`Pipeline::evaluate`] runs a pipeline over documents once (REST, tests); the pieces it is
//! made of ([`Pipeline::contributions`], [`Groups`], [`Pipeline::finish`]) are what a live
//! pipeline maintains as documents come and go. Stages livegrid cannot keep live
//! (`$lookup`, `$facet`, `$setWindowFields`, ...) are refused naming the stage.

pub mod accumulator;
pub mod expression;

use std::collections::BTreeMap;
use std::sync::Arc;

use bson::{Bson, Document};

use crate::error::QueryError;
use crate::filter::Filter;
use crate::projection::Projection;
use crate::sort::{SortKey, SortSpec};
use accumulator::{Accumulator, Kind, Ordered, Rank, State};
use expression::Expression;

/// Why a pipeline was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PipelineError {
    /// A stage livegrid does not run.
    #[error("stage {stage} is not supported in live pipelines")]
    UnsupportedStage {
        /// The stage, such as `$lookup`.
        stage: String,
    },
    /// An expression operator or accumulator livegrid does not evaluate.
    #[error("operator {operator} is not supported (in {stage})")]
    UnsupportedOperator {
        /// The operator.
        operator: String,
        /// The stage it was used in.
        stage: String,
    },
    /// A malformed stage.
    #[error("bad {stage} stage: {reason}")]
    Bad {
        /// The stage.
        stage: String,
        /// What is wrong.
        reason: String,
    },
    /// A stage's filter, sort or projection was refused.
    #[error("bad {stage} stage: {source}")]
    Query {
        /// The stage.
        stage: String,
        /// Why.
        #[source]
        source: QueryError,
    },
}

impl PipelineError {
    /// Whether a stage or operator livegrid does not run is the cause (rather than a
    /// malformed pipeline).
    pub fn is_unsupported(&self) -> bool {
        matches!(self, PipelineError::UnsupportedStage { .. } | PipelineError::UnsupportedOperator { .. })
    }

    pub(crate) fn bad(stage: &str, reason: impl Into<String>) -> PipelineError {
        PipelineError::Bad { stage: stage.to_string(), reason: reason.into() }
    }
}

impl From<QueryError> for PipelineError {
    fn from(source: QueryError) -> Self {
        PipelineError::Query { stage: "pipeline".into(), source }
    }
}

/// `$unwind`.
#[derive(Debug, Clone, PartialEq)]
pub struct Unwind {
    path: Vec<String>,
    index_field: Option<String>,
    preserve: bool,
}

/// A stage before `$group`.
#[derive(Debug, Clone)]
pub enum Before {
    /// `$match`.
    Match(Filter),
    /// `$unwind`.
    Unwind(Unwind),
}

/// A stage after `$group`.
#[derive(Debug, Clone)]
pub enum After {
    /// `$match` on the groups.
    Match(Filter),
    /// `$sort`.
    Sort(SortSpec),
    /// `$skip`.
    Skip(u64),
    /// `$limit`.
    Limit(u64),
    /// `$project`.
    Project(Projection),
}

/// A compiled pipeline.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The stages before `$group`, in order.
    pub before: Vec<Before>,
    /// The order `$first` and `$last` see (a `$sort` before `$group`; `_id` without one).
    pub order: SortSpec,
    /// The group key.
    pub key: Expression,
    /// The output fields and their accumulators.
    pub accumulators: Vec<(String, Accumulator)>,
    /// The stages after `$group`, in order.
    pub after: Vec<After>,
}

/// What one document (or one unwound element of it) gives its group.
#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    /// The group key (null for a missing key).
    pub key: Bson,
    /// Where it stands in the group's order.
    pub rank: Rank,
    /// Each accumulator's value (`None`: missing).
    pub values: Vec<Option<Bson>>,
}

impl Contribution {
    /// The contribution as a BSON document (its key left out: it travels as the key).
    pub fn to_document(&self) -> Document {
        let values: Vec<Bson> = self
            .values
            .iter()
            .map(|v| match v {
                Some(v) => Bson::Document(bson::doc! {"v": v.clone()}),
                None => Bson::Document(Document::new()),
            })
            .collect();
        let sub: Vec<Bson> = self.rank.1.iter().map(|i| Bson::Int64(*i as i64)).collect();
        bson::doc! {"r": self.rank.0.to_bson(), "u": sub, "v": values}
    }

    /// The contribution [`Contribution::to_document`] wrote, under `key`.
    pub fn from_document(key: Bson, doc: &Document) -> Option<Contribution> {
        let sort = SortKey::from_bson(doc.get("r")?)?;
        let sub = doc.get_array("u").ok()?.iter().map(|i| i.as_i64().map(|i| i as u64)).collect::<Option<Vec<_>>>()?;
        let values = doc
            .get_array("v")
            .ok()?
            .iter()
            .map(|v| v.as_document().map(|d| d.get("v").cloned()))
            .collect::<Option<Vec<_>>>()?;
        Some(Contribution { key, rank: Rank(sort, sub), values })
    }
}

/// Contributions as compact BSON bytes (a live pipeline keeps these per document: a tenth of
/// the memory of the values themselves); equal contributions encode to equal bytes. `None`
/// when BSON cannot hold them (a value from a key BSON refuses).
pub fn encode_contributions(contributions: &[Contribution]) -> Option<Vec<u8>> {
    let list: Vec<Bson> = contributions
        .iter()
        .map(|c| {
            let mut doc = c.to_document();
            doc.insert("k", c.key.clone());
            Bson::Document(doc)
        })
        .collect();
    bson::doc! {"c": list}.to_vec().ok()
}

/// The contributions [`encode_contributions`] wrote.
pub fn decode_contributions(bytes: &[u8]) -> Option<Vec<Contribution>> {
    let doc = Document::from_reader(bytes).ok()?;
    doc.get_array("c")
        .ok()?
        .iter()
        .map(|c| {
            let c = c.as_document()?;
            Contribution::from_document(c.get("k")?.clone(), c)
        })
        .collect()
}

fn stage_name(stage: &Bson) -> Result<(&str, &Bson), PipelineError> {
    match stage {
        Bson::Document(d) if d.len() == 1 => {
            let (name, spec) = d.iter().next().expect("one field");
            Ok((name.as_str(), spec))
        }
        _ => Err(PipelineError::bad(
            "pipeline",
            "each stage is an object with exactly one field, such as {\"$match\": {...}}",
        )),
    }
}

fn query(stage: &str) -> impl Fn(QueryError) -> PipelineError + '_ {
    move |source| PipelineError::Query { stage: stage.to_string(), source }
}

fn document<'a>(stage: &str, spec: &'a Bson) -> Result<&'a Document, PipelineError> {
    match spec {
        Bson::Document(d) => Ok(d),
        _ => Err(PipelineError::bad(stage, "the stage takes an object")),
    }
}

fn count(stage: &str, spec: &Bson) -> Result<u64, PipelineError> {
    match spec {
        Bson::Int32(n) if *n >= 0 => Ok(*n as u64),
        Bson::Int64(n) if *n >= 0 => Ok(*n as u64),
        Bson::Double(f) if *f >= 0.0 && f.fract() == 0.0 && *f < 9.0e15 => Ok(*f as u64),
        _ => Err(PipelineError::bad(stage, "the stage takes a non-negative integer")),
    }
}

/// The source of a pipeline's first stage when it is a `$match` (an empty filter otherwise):
/// the filter a live pipeline registers with the grid, whose predicate index finds the
/// documents it may concern.
pub fn first_match_source(stages: &[Bson]) -> Document {
    stages
        .first()
        .and_then(Bson::as_document)
        .and_then(|stage| stage.get_document("$match").ok())
        .cloned()
        .unwrap_or_default()
}

/// At most this many stages.
const MAX_STAGES: usize = 100;

impl Pipeline {
    /// Compiles a pipeline (an array of stages).
    pub fn parse(stages: &[Bson]) -> Result<Pipeline, PipelineError> {
        if stages.len() > MAX_STAGES {
            return Err(PipelineError::bad("pipeline", format!("at most {MAX_STAGES} stages")));
        }
        // What a pipeline computes is built from documents (BSON already) and from its own
        // literals and field names: when the stages are BSON, so is every contribution.
        if bson::doc! {"stages": stages.to_vec()}.to_vec().is_err() {
            return Err(PipelineError::bad("pipeline", "stages must be storable as BSON (no NUL in field names)"));
        }
        let mut before = Vec::new();
        let mut order = None;
        let mut group = None;
        let mut after = Vec::new();
        for stage in stages {
            let (name, spec) = stage_name(stage)?;
            match (name, group.is_some()) {
                ("$group", false) => group = Some(parse_group(document(name, spec)?)?),
                ("$group", true) => return Err(PipelineError::bad(name, "a live pipeline has one $group")),
                ("$match", grouped) => {
                    let filter = Filter::parse(document(name, spec)?).map_err(query(name))?;
                    if grouped { after.push(After::Match(filter)) } else { before.push(Before::Match(filter)) }
                }
                ("$unwind", false) => before.push(Before::Unwind(parse_unwind(spec)?)),
                ("$sort", grouped) => {
                    let sort = SortSpec::parse(document(name, spec)?).map_err(query(name))?;
                    if grouped { after.push(After::Sort(sort)) } else { order = Some(sort) }
                }
                ("$skip", true) => after.push(After::Skip(count(name, spec)?)),
                ("$limit", true) => after.push(After::Limit(count(name, spec)?)),
                ("$project", true) => {
                    after.push(After::Project(Projection::parse(document(name, spec)?).map_err(query(name))?))
                }
                ("$unwind" | "$skip" | "$limit" | "$project", _) => {
                    let place = if group.is_some() { "after" } else { "before" };
                    return Err(PipelineError::bad(
                        name,
                        format!("{name} {place} $group is not supported in live pipelines"),
                    ));
                }
                (other, _) if other.starts_with('$') => {
                    return Err(PipelineError::UnsupportedStage { stage: other.to_string() });
                }
                (other, _) => return Err(PipelineError::bad("pipeline", format!("{other:?} is not a stage"))),
            }
        }
        let (key, accumulators) = group.ok_or_else(|| {
            PipelineError::bad("pipeline", "a live pipeline needs a $group stage (without one, subscribe to a query)")
        })?;
        Ok(Pipeline { before, order: order.unwrap_or_default(), key, accumulators, after })
    }

    /// Whether the pipeline can be kept live: its output must keep `_id`, which names each
    /// group in the deltas (a `$project` may not leave it out).
    pub fn check_live(&self) -> Result<(), PipelineError> {
        for stage in &self.after {
            if let After::Project(projection) = stage
                && !projection.apply(&bson::doc! {"_id": 1}).contains_key("_id")
            {
                return Err(PipelineError::bad(
                    "$project",
                    "a live pipeline keeps _id: it names each group in the deltas",
                ));
            }
        }
        Ok(())
    }

    /// The filter of the first stage, if it is a `$match`: what the grid's index can use.
    pub fn first_match(&self) -> Option<&Filter> {
        match self.before.first() {
            Some(Before::Match(filter)) => Some(filter),
            _ => None,
        }
    }

    /// What `doc` gives its groups: none if a `$match` drops it, several after an `$unwind`.
    pub fn contributions(&self, doc: &Document) -> Vec<Contribution> {
        if !self.before.iter().any(|stage| matches!(stage, Before::Unwind(_))) {
            // Only $match stages: the document itself, uncopied.
            let admitted = self.before.iter().all(|stage| match stage {
                Before::Match(filter) => filter.matches(doc),
                Before::Unwind(_) => true,
            });
            return if admitted { vec![self.contribution(doc, Vec::new())] } else { Vec::new() };
        }
        let mut docs = vec![(doc.clone(), Vec::new())];
        for stage in &self.before {
            docs = match stage {
                Before::Match(filter) => docs.into_iter().filter(|(d, _)| filter.matches(d)).collect(),
                Before::Unwind(unwind) => docs
                    .into_iter()
                    .flat_map(|(d, rank)| {
                        unwind.apply(&d).into_iter().enumerate().map(move |(i, u)| {
                            let mut rank = rank.clone();
                            rank.push(i as u64);
                            (u, rank)
                        })
                    })
                    .collect(),
            };
        }
        docs.into_iter().map(|(d, sub)| self.contribution(&d, sub)).collect()
    }

    /// What one (unwound) document gives its group; `sub` are its `$unwind` indices.
    fn contribution(&self, doc: &Document, sub: Vec<u64>) -> Contribution {
        // Only $first and $last look at the order: the others keep no rank.
        let ranked = self.accumulators.iter().any(|(_, acc)| matches!(acc.kind, Kind::First | Kind::Last));
        Contribution {
            key: self.key.evaluate(doc).unwrap_or(Bson::Null),
            rank: if ranked { Rank(self.order.key(doc), sub) } else { Rank(SortKey::default(), Vec::new()) },
            values: self.accumulators.iter().map(|(_, acc)| acc.expression.evaluate(doc)).collect(),
        }
    }

    /// Groups with nothing in them.
    pub fn groups(&self) -> Groups {
        Groups { kinds: self.accumulators.iter().map(|(_, a)| a.kind).collect(), groups: BTreeMap::new() }
    }

    /// The output document of a group.
    pub fn output(&self, key: &Bson, group: &Group) -> Document {
        let mut out = Document::new();
        out.insert("_id", key.clone());
        for ((name, acc), state) in self.accumulators.iter().zip(&group.states) {
            out.insert(name.clone(), state.value(acc.kind));
        }
        out
    }

    /// The stages after `$group` applied to the group outputs (given in `_id` order).
    pub fn finish(&self, docs: Vec<Document>) -> Vec<Document> {
        let docs = docs.into_iter().map(|d| ((), Arc::new(d))).collect();
        self.finish_keyed(docs).into_iter().map(|(_, d)| Arc::unwrap_or_clone(d)).collect()
    }

    /// [`Pipeline::finish`] over shared documents, each carried with a tag (a live pipeline
    /// tags them with their group): documents no stage rewrites stay the same allocation.
    pub fn finish_keyed<T>(&self, mut docs: Vec<(T, Arc<Document>)>) -> Vec<(T, Arc<Document>)> {
        for stage in &self.after {
            match stage {
                After::Match(filter) => docs.retain(|(_, d)| filter.matches(d)),
                // Stable: ties stay in `_id` order. One key per document, not two per comparison.
                After::Sort(sort) => docs.sort_by_cached_key(|(_, d)| sort.key(d)),
                After::Skip(n) => {
                    docs.drain(..(*n as usize).min(docs.len()));
                }
                After::Limit(n) => docs.truncate(*n as usize),
                After::Project(projection) => {
                    docs = docs.into_iter().map(|(t, d)| (t, Arc::new(projection.apply(&d)))).collect()
                }
            }
        }
        docs
    }

    /// Runs the pipeline over `docs` once. Without a `$sort` after `$group`, groups come in
    /// `_id` order.
    pub fn evaluate<'a>(&self, docs: impl IntoIterator<Item = &'a Document>) -> Vec<Document> {
        self.finish(self.group_outputs(docs))
    }

    /// The `$group` stage's output over `docs`, in `_id` order (before the stages after it).
    pub fn group_outputs<'a>(&self, docs: impl IntoIterator<Item = &'a Document>) -> Vec<Document> {
        let mut groups = self.groups();
        for doc in docs {
            for contribution in self.contributions(doc) {
                groups.change(&contribution, 1);
            }
        }
        groups.groups.iter().map(|(key, group)| self.output(&key.0, group)).collect()
    }
}

/// One group's accumulator states and how many contributions it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// Contributions in it; the group exists while this is positive.
    pub members: i64,
    /// One state per accumulator.
    pub states: Vec<State>,
}

/// The groups of a pipeline, by key.
#[derive(Debug, Clone)]
pub struct Groups {
    kinds: Vec<Kind>,
    /// By key in BSON order.
    pub groups: BTreeMap<Ordered, Group>,
}

impl Groups {
    /// Takes a contribution in `by` times (or out, with `by` negative); a group exists while
    /// it holds contributions.
    pub fn change(&mut self, contribution: &Contribution, by: i64) {
        let key = Ordered(contribution.key.clone());
        let kinds = &self.kinds;
        let group = self
            .groups
            .entry(key.clone())
            .or_insert_with(|| Group { members: 0, states: kinds.iter().map(|kind| State::empty(*kind)).collect() });
        group.members += by;
        for ((state, kind), value) in group.states.iter_mut().zip(kinds).zip(&contribution.values) {
            state.change(*kind, value, &contribution.rank, by);
        }
        if group.members <= 0 {
            self.groups.remove(&key);
        }
    }
}

fn parse_group(spec: &Document) -> Result<(Expression, Vec<(String, Accumulator)>), PipelineError> {
    let key =
        spec.get("_id").ok_or_else(|| PipelineError::bad("$group", "a $group needs an _id (null for one group)"))?;
    let key = Expression::parse(key, "$group")?;
    let mut accumulators = Vec::new();
    for (name, value) in spec {
        if name == "_id" {
            continue;
        }
        if name.contains('.') || name.starts_with('$') {
            return Err(PipelineError::bad(
                "$group",
                format!("field name {name:?} cannot contain '.' or start with $"),
            ));
        }
        accumulators.push((name.clone(), Accumulator::parse(name, value)?));
    }
    Ok((key, accumulators))
}

fn parse_unwind(spec: &Bson) -> Result<Unwind, PipelineError> {
    let stage = "$unwind";
    let (path, index_field, preserve) = match spec {
        Bson::String(path) => (path.clone(), None, false),
        Bson::Document(d) => {
            if let Some(extra) =
                d.keys().find(|k| !["path", "includeArrayIndex", "preserveNullAndEmptyArrays"].contains(&k.as_str()))
            {
                return Err(PipelineError::bad(stage, format!("unknown option {extra}")));
            }
            let path = d.get_str("path").map_err(|_| PipelineError::bad(stage, "path must be a string"))?;
            let index = match d.get("includeArrayIndex") {
                None => None,
                Some(Bson::String(s)) if !s.starts_with('$') && !s.is_empty() => Some(s.clone()),
                Some(_) => return Err(PipelineError::bad(stage, "includeArrayIndex must be a field name")),
            };
            let preserve = match d.get("preserveNullAndEmptyArrays") {
                None => false,
                Some(Bson::Boolean(b)) => *b,
                Some(_) => return Err(PipelineError::bad(stage, "preserveNullAndEmptyArrays must be a boolean")),
            };
            (path.to_string(), index, preserve)
        }
        _ => return Err(PipelineError::bad(stage, "takes a field path such as \"$tags\" or an object")),
    };
    let Some(path) = path.strip_prefix('$').filter(|p| !p.is_empty() && !p.split('.').any(str::is_empty)) else {
        return Err(PipelineError::bad(stage, format!("path {path:?} must be a field path starting with $")));
    };
    crate::limits::check_path_components(path)?;
    Ok(Unwind { path: path.split('.').map(str::to_string).collect(), index_field, preserve })
}

impl Unwind {
    /// The documents `doc` unwinds into.
    fn apply(&self, doc: &Document) -> Vec<Document> {
        let value = get_path(doc, &self.path);
        let with = |value: Option<Bson>, index: Bson| {
            let mut out = doc.clone();
            if let Some(value) = value {
                set_path(&mut out, &self.path, value);
            }
            if let Some(field) = &self.index_field {
                out.insert(field.clone(), index);
            }
            out
        };
        match value {
            Some(Bson::Array(items)) if !items.is_empty() => {
                items.iter().enumerate().map(|(i, item)| with(Some(item.clone()), Bson::Int64(i as i64))).collect()
            }
            Some(Bson::Array(_)) | Some(Bson::Null) | None => {
                if self.preserve {
                    // An empty array disappears from the document; null and missing stay.
                    let mut out = with(None, Bson::Null);
                    if matches!(value, Some(Bson::Array(_))) {
                        remove_path(&mut out, &self.path);
                    }
                    vec![out]
                } else {
                    Vec::new()
                }
            }
            Some(_) => vec![with(None, Bson::Null)],
        }
    }
}

fn get_path<'a>(doc: &'a Document, path: &[String]) -> Option<&'a Bson> {
    let mut value = doc.get(&path[0])?;
    for part in &path[1..] {
        value = match value {
            Bson::Document(d) => d.get(part)?,
            _ => return None,
        };
    }
    Some(value)
}

fn set_path(doc: &mut Document, path: &[String], value: Bson) {
    if path.len() == 1 {
        doc.insert(path[0].clone(), value);
    } else if let Some(Bson::Document(inner)) = doc.get_mut(&path[0]) {
        set_path(inner, &path[1..], value);
    }
}

fn remove_path(doc: &mut Document, path: &[String]) {
    if path.len() == 1 {
        doc.remove(&path[0]);
    } else if let Some(Bson::Document(inner)) = doc.get_mut(&path[0]) {
        remove_path(inner, &path[1..]);
    }
}

#[cfg(test)]
mod conformance;
