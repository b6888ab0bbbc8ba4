//! Compiled filters: a query's filter document parsed into an [`Expr`] tree, the questions
//! the engine asks of it, and the limits it is parsed within.

use bson::Document;

use crate::error::QueryError;
use crate::expr::Expr;
use crate::index_plan::IndexPlan;
use crate::regex::RegexBudget;

/// A compiled MongoDB filter.
///
/// ```
/// use livegrid_matcher::Filter;
/// use bson::doc;
///
/// let filter = Filter::parse(&doc! {"status": "open", "tags": {"$in": ["x", "y"]}}).unwrap();
/// assert!(filter.matches(&doc! {"_id": 1, "status": "open", "tags": ["y", "z"]}));
/// assert!(!filter.matches(&doc! {"_id": 2, "status": "closed", "tags": ["x"]}));
/// ```
#[derive(Debug, Clone)]
pub struct Filter {
    root: Expr,
    /// See [`Filter::memory_estimate`].
    memory: usize,
    /// See [`Filter::regex_memory`].
    regex_memory: usize,
}

impl Filter {
    /// Parses and compiles a filter document, within the limits of [`crate::limits`]: at most
    /// [`crate::MAX_NESTING_DEPTH`] levels, paths of at most [`crate::MAX_PATH_COMPONENTS`]
    /// components and regexes of at most [`crate::QUERY_REGEX_BUDGET`] bytes in all.
    pub fn parse(source: &Document) -> Result<Self, QueryError> {
        // Checked before parsing, which recurses as deep as the document nests.
        let document_bytes = crate::limits::measure_document(source, "filter")?;
        let mut regexes = RegexBudget::default();
        let root = crate::parse::parse_filter(source, &mut regexes)?;
        Ok(Filter { root, memory: document_bytes + regexes.spent(), regex_memory: regexes.spent() })
    }

    /// Parses a filter from (canonical or relaxed Extended) JSON text.
    pub fn from_json(text: &str) -> Result<Self, QueryError> {
        let doc = livegrid_protocol::extjson::parse_document(text)?;
        Self::parse(&doc)
    }

    /// Whether `doc` matches the filter.
    #[inline]
    pub fn matches(&self, doc: &Document) -> bool {
        self.root.matches(doc)
    }

    /// A key that is equal for filter documents written identically (types included), so
    /// that their compiled forms and state can be shared.
    pub fn canonical_key(source: &Document) -> String {
        livegrid_protocol::extjson::to_canonical_string(source)
    }

    /// Roughly the heap bytes the compiled filter holds: its compiled regexes plus about the
    /// size of the filter document (its literals and a node per element). The lazy-DFA caches
    /// that matching threads keep per regex are not counted (see [`crate::regex`]).
    pub fn memory_estimate(&self) -> usize {
        self.memory
    }

    /// Bytes the filter's compiled regular expressions hold (at most
    /// [`crate::QUERY_REGEX_BUDGET`]).
    pub fn regex_memory(&self) -> usize {
        self.regex_memory
    }

    /// What an index of queries needs to find this filter from a document: predicates that
    /// every matching document satisfies.
    pub fn index_plan(&self) -> IndexPlan {
        IndexPlan::of(&self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{Bson, doc};
    use livegrid_protocol::extjson::ExtJsonError;

    use crate::limits::{MAX_NESTING_DEPTH, QUERY_REGEX_BUDGET};

    /// `{$and: [{$or: [... {a: 1} ...]}]}` nesting `levels` logical operators.
    fn nested_logic(levels: usize) -> Document {
        let mut filter = doc! {"a": 1};
        for i in 0..levels {
            filter = if i % 2 == 0 {
                doc! {"$and": [filter]}
            } else {
                doc! {"$or": [filter, {"b": 2}]}
            };
        }
        filter
    }

    /// Runs `parse` on a thread with a small stack, so that parsing recursively as deep as
    /// the document nests would overflow it.
    fn parse_on_small_stack(filter: &Document) -> Result<Filter, QueryError> {
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn_scoped(scope, || Filter::parse(filter))
                .expect("spawn")
                .join()
                .expect("parse panicked")
        })
    }

    /// Runs `body` on a thread with a stack large enough to build and drop documents nested
    /// 10,000 levels deep (dropping one recurses).
    fn on_large_stack(body: impl FnOnce() + Send) {
        std::thread::scope(|scope| {
            std::thread::Builder::new().stack_size(256 << 20).spawn_scoped(scope, body).expect("spawn").join()
        })
        .expect("test body panicked");
    }

    fn regex(pattern: &str, options: &str) -> Bson {
        Bson::RegularExpression(bson::Regex {
            pattern: pattern.try_into().unwrap(),
            options: options.try_into().unwrap(),
        })
    }

    fn too_deep() -> QueryError {
        QueryError::NestingTooDeep { part: "filter".into(), max: MAX_NESTING_DEPTH }
    }

    #[test]
    fn json_errors_keep_their_cause() {
        use std::error::Error;

        let err = Filter::from_json(r#"{"a": {"$oid": "zz"}}"#).unwrap_err();
        assert!(err.to_string().starts_with("bad query json: invalid extended json: "), "{err}");
        assert!(err.source().is_some_and(|s| s.to_string().starts_with("invalid extended json: ")), "{err:?}");
        let QueryError::ExtJson(cause) = &err else { panic!("{err:?}") };
        assert!(matches!(**cause, ExtJsonError::ExtJson(_)), "{cause}");
        assert_eq!(
            Filter::from_json("[1]").unwrap_err().to_string(),
            "bad query json: expected a json object, found an array"
        );
    }

    #[test]
    fn logical_nesting_is_bounded() {
        // 1 + 2 × 49 levels: within the limit; one more operator goes over it.
        assert!(Filter::parse(&nested_logic(49)).unwrap().matches(&doc! {"a": 1}));
        assert_eq!(Filter::parse(&nested_logic(50)).unwrap_err(), too_deep());
        assert_eq!(Filter::parse(&nested_logic(150)).unwrap_err(), too_deep());
        assert_eq!(Filter::parse(&nested_logic(1_000)).unwrap_err(), too_deep());
    }

    #[test]
    fn nesting_10000_deep_fails_without_recursing() {
        on_large_stack(|| {
            let logic = nested_logic(10_000);
            assert_eq!(parse_on_small_stack(&logic).unwrap_err(), too_deep());

            let mut elem_match = doc! {"x": 1};
            for _ in 0..10_000 {
                elem_match = doc! {"a": {"$elemMatch": elem_match}};
            }
            assert_eq!(parse_on_small_stack(&elem_match).unwrap_err(), too_deep());

            let mut not = doc! {"$eq": 1};
            for _ in 0..10_000 {
                not = doc! {"$not": not};
            }
            assert_eq!(parse_on_small_stack(&doc! {"a": not}).unwrap_err(), too_deep());

            let mut literal = Bson::Int32(1);
            for _ in 0..10_000 {
                literal = Bson::Document(doc! {"b": literal});
            }
            assert_eq!(parse_on_small_stack(&doc! {"a": {"$in": [literal]}}).unwrap_err(), too_deep());
        });
    }

    #[test]
    fn deep_paths_are_errors_everywhere() {
        let deep = vec!["p"; 10_000].join(".");
        let filters = [
            doc! {deep.clone(): 1},
            doc! {"$and": [{"a": 1}, {deep.clone(): 1}]},
            doc! {"$or": [{deep.clone(): {"$gt": 1}}]},
            doc! {"$nor": [{deep.clone(): {"$regex": "x"}}]},
            doc! {"a": {"$elemMatch": {deep.clone(): 1}}},
            doc! {"a": {"$not": {"$elemMatch": {deep.clone(): 1}}}},
            doc! {"a": {"$all": [{"$elemMatch": {deep.clone(): 1}}]}},
        ];
        for filter in filters {
            let err = Filter::parse(&filter).unwrap_err();
            // Inside `$elemMatch` the path counts with the enclosing `a`.
            assert!(matches!(err, QueryError::PathTooDeep { components: 10_000 | 10_001, .. }), "{err}");
            assert!(err.to_string().len() < 200, "{err}");
        }
    }

    #[test]
    fn elem_match_paths_count_with_their_prefix() {
        let outer = vec!["a"; 60].join(".");
        let inner = vec!["b"; 40].join(".");
        let filter = Filter::parse(&doc! {outer.clone(): {"$elemMatch": {inner.clone(): 1}}}).unwrap();
        // The index plan joins the two paths; exactly 100 components.
        assert!(matches!(filter.index_plan(), IndexPlan::Equality { path, .. } if path.components().count() == 100));
        let err = Filter::parse(&doc! {outer: {"$elemMatch": {format!("{inner}.c"): 1}}}).unwrap_err();
        assert!(matches!(err, QueryError::PathTooDeep { components: 101, .. }), "{err}");
    }

    #[test]
    fn many_large_regexes_fail_within_the_budget() {
        let clauses: Vec<Bson> =
            (0..500).map(|i| Bson::Document(doc! {format!("f{i}"): {"$regex": "\\w{20}"}})).collect();
        let err = Filter::parse(&doc! {"$and": clauses}).unwrap_err();
        // Each `\w{20}` compiles to about 1 MiB: the budget runs out after a few of them, long
        // before all 500 are compiled.
        let QueryError::RegexBudget { path, budget } = &err else { panic!("{err}") };
        assert_eq!(*budget, QUERY_REGEX_BUDGET);
        let failed_at: usize = path.trim_start_matches('f').parse().unwrap();
        assert!((1..10).contains(&failed_at), "{path}");
        assert_eq!(err.to_string(), format!("regexes of this query exceed the 4 MiB compile budget at {path}"));
    }

    #[test]
    fn ordinary_regexes_fit_the_budget() {
        let filter = doc! {
            "name": {"$regex": "^ada", "$options": "i"},
            "email": {"$in": [regex("@example\\.com$", "")]},
            "bio": {"$not": regex("\\bengine\\b", "i")},
            "$or": [{"code": {"$regex": "^[A-Z]{3}-\\d{4}$"}}, {"word": {"$regex": "\\w{20}"}}],
        };
        assert!(Filter::parse(&filter).is_ok());
    }

    #[test]
    fn memory_estimate_grows_with_regexes() {
        let estimate = |n: usize| {
            let clauses: Vec<Bson> =
                (0..n).map(|i| Bson::Document(doc! {"f": {"$regex": format!("^x{i}[a-z]+y$")}})).collect();
            Filter::parse(&doc! {"$or": clauses}).unwrap().memory_estimate()
        };
        let (one, ten) = (estimate(1), estimate(10));
        assert!(one > 0 && ten > one, "{one} {ten}");
        let literal = Filter::parse(&doc! {"f": "^x0[a-z]+y$"}).unwrap().memory_estimate();
        let regex = Filter::parse(&doc! {"f": {"$regex": "^x0[a-z]+y$"}}).unwrap().memory_estimate();
        assert!(regex > literal + 500, "{regex} {literal}");
        let large = Filter::parse(&doc! {"f": {"$regex": "\\w{20}"}}).unwrap().memory_estimate();
        assert!(large > 500_000, "{large}");
    }
}
