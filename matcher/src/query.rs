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

    /// The end of the window in the ordered result, `skip + limit` (saturating: a client may
    /// send `u64::MAX` as either), or `None` without a limit.
    pub fn window_end(&self) -> Option<u64> {
        self.limit.map(|limit| self.skip.saturating_add(limit))
    }

    /// Roughly the heap bytes the compiled query holds, for memory budgets: see
    /// [`Filter::memory_estimate`].
    pub fn memory_estimate(&self) -> usize {
        std::mem::size_of::<Query>()
            + self.filter.memory_estimate()
            + self.sort.memory_estimate()
            + self.projection.memory_estimate()
    }

    /// The query's result over `docs`: matching documents in result order, skipped, limited
    /// and projected. Without a sort the order is `_id` ascending.
    pub fn evaluate<'a>(&self, docs: impl IntoIterator<Item = &'a Document>) -> Vec<Document> {
        let mut keyed: Vec<_> =
            docs.into_iter().filter(|d| self.filter.matches(d)).map(|d| (self.sort.key(d), d)).collect();
        keyed.sort_by(|a, b| a.0.cmp(&b.0));
        let skip = saturating_usize(self.skip);
        let limit = self.limit.map_or(usize::MAX, saturating_usize);
        keyed.into_iter().skip(skip).take(limit).map(|(_, d)| self.projection.apply(d)).collect()
    }
}

/// A count as `usize`, `usize::MAX` where it does not fit (32-bit targets).
fn saturating_usize(count: u64) -> usize {
    usize::try_from(count).unwrap_or(usize::MAX)
}

/// Reads an optional non-negative integer (`skip`, `limit`) from a BSON value.
pub fn parse_count(value: &Bson, name: &str) -> Result<u64, QueryError> {
    match crate::bson_order::Number::of(value) {
        Some(n) if n.as_f64() >= 0.0 && n.as_f64().fract() == 0.0 => Ok(n.as_f64() as u64),
        // A document or array is named by type: printing one recurses as deep as it nests.
        _ if matches!(value, Bson::Document(_) | Bson::Array(_)) => Err(QueryError::Json(format!(
            "{name} must be a non-negative integer, found {}",
            crate::bson_type::type_label(value)
        ))),
        _ => Err(QueryError::Json(format!("{name} must be a non-negative integer, found {value}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn ids(query: &Query, docs: &[Document]) -> Vec<i32> {
        query.evaluate(docs).iter().map(|d| d.get_i32("_id").unwrap()).collect()
    }

    #[test]
    fn skip_and_limit_saturate() {
        let docs: Vec<Document> = (1..=4).map(|i| doc! {"_id": i}).collect();
        let query = Query::compile(&QuerySpec { skip: 1, limit: Some(u64::MAX), ..Default::default() }).unwrap();
        assert_eq!(query.window_end(), Some(u64::MAX));
        assert_eq!(ids(&query, &docs), vec![2, 3, 4]);
        let query = Query::compile(&QuerySpec { skip: u64::MAX, limit: Some(u64::MAX), ..Default::default() }).unwrap();
        assert_eq!(query.window_end(), Some(u64::MAX));
        assert_eq!(ids(&query, &docs), Vec::<i32>::new());
        let query = Query::compile(&QuerySpec { skip: 2, limit: Some(1), ..Default::default() }).unwrap();
        assert_eq!(query.window_end(), Some(3));
        assert_eq!(ids(&query, &docs), vec![3]);
        assert_eq!(Query::compile(&QuerySpec { skip: 2, ..Default::default() }).unwrap().window_end(), None);
    }

    #[test]
    fn memory_estimate_counts_every_part() {
        let base = Query::compile(&QuerySpec::default()).unwrap().memory_estimate();
        let full = Query::compile(&QuerySpec {
            filter: doc! {"a": {"$regex": "^x+y"}},
            sort: Some(doc! {"a": 1}),
            projection: Some(doc! {"a": 1}),
            ..Default::default()
        })
        .unwrap();
        let parts = full.filter.memory_estimate() + full.sort.memory_estimate() + full.projection.memory_estimate();
        assert!(full.filter.memory_estimate() > 0 && full.sort.memory_estimate() > 0);
        assert!(full.projection.memory_estimate() > 0);
        assert_eq!(full.memory_estimate(), base + parts);
    }

    #[test]
    fn deep_counts_are_named_by_type() {
        let mut value = Bson::Int32(1);
        for _ in 0..1_000 {
            value = Bson::Array(vec![value]);
        }
        assert_eq!(
            parse_count(&value, "skip").unwrap_err(),
            QueryError::Json("skip must be a non-negative integer, found array".into())
        );
        assert_eq!(parse_count(&Bson::Int32(3), "limit"), Ok(3));
    }
}
