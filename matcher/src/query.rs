//! A whole query: filter, sort, skip, limit and projection, and its result over a set of
//! documents (the reference every live result is checked against).

use bson::{Bson, Document};

use crate::error::QueryError;
use crate::filter::Filter;
use crate::projection::Projection;
use crate::sort::SortSpec;

/// A compiled query.
#[derive(Debug, Clone)]
pub struct Query {
    /// Which documents belong to the result.
    pub filter: Filter,
    /// Result order; empty means `_id` ascending.
    pub sort: SortSpec,
    /// How many documents of the ordered result to leave out.
    pub skip: u64,
    /// How many documents to show at most; `None` for all.
    pub limit: Option<u64>,
    /// Which fields of each document to show.
    pub projection: Projection,
}

/// The parts of a query as documents, before compilation.
#[derive(Debug, Clone, Default)]
pub struct QuerySpec {
    /// The filter document.
    pub filter: Document,
    /// The sort document, if any.
    pub sort: Option<Document>,
    /// Documents to skip.
    pub skip: u64,
    /// Documents to show at most; 0 or `None` means no limit, as in MongoDB.
    pub limit: Option<u64>,
    /// The projection document, if any.
    pub projection: Option<Document>,
}

impl Query {
    /// Compiles a query.
    pub fn compile(spec: &QuerySpec) -> Result<Self, QueryError> {
        Ok(Query {
            filter: Filter::parse(&spec.filter)?,
            sort: spec.sort.as_ref().map(SortSpec::parse).transpose()?.unwrap_or_default(),
            skip: spec.skip,
            limit: spec.limit.filter(|l| *l > 0),
            projection: spec.projection.as_ref().map(Projection::parse).transpose()?.unwrap_or_default(),
        })
    }

    /// Whether the query shows a window of an ordered result (a limit or skip), so that
    /// documents outside the window can move into it.
    pub fn is_windowed(&self) -> bool {
        self.skip > 0 || self.limit.is_some()
    }

    /// The query's result over `docs`: matching documents in result order, skipped, limited
    /// and projected. Without a sort the order is `_id` ascending.
    pub fn evaluate<'a>(&self, docs: impl IntoIterator<Item = &'a Document>) -> Vec<Document> {
        let mut keyed: Vec<_> =
            docs.into_iter().filter(|d| self.filter.matches(d)).map(|d| (self.sort.key(d), d)).collect();
        keyed.sort_by(|a, b| a.0.cmp(&b.0));
        let limit = self.limit.map_or(usize::MAX, |l| l as usize);
        keyed.into_iter().skip(self.skip as usize).take(limit).map(|(_, d)| self.projection.apply(d)).collect()
    }
}

/// Reads an optional non-negative integer (`skip`, `limit`) from a BSON value.
pub fn parse_count(value: &Bson, name: &str) -> Result<u64, QueryError> {
    match crate::bson_order::Number::of(value) {
        Some(n) if n.as_f64() >= 0.0 && n.as_f64().fract() == 0.0 => Ok(n.as_f64() as u64),
        _ => Err(QueryError::Json(format!("{name} must be a non-negative integer, found {value}"))),
    }
}
