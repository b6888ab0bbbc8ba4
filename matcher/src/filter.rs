//! Compiled filters: the tree a query's filter document parses into, and its evaluation.

use bson::Document;

use crate::error::QueryError;
use crate::index_plan::IndexPlan;
use crate::operator::OpTree;
use crate::path::FieldPath;

/// A node of a compiled filter.
#[derive(Debug, Clone)]
pub enum Expr {
    /// Always this answer (the empty filter is `Const(true)`).
    Const(bool),
    /// Every child matches (`$and`, and the fields of one filter document).
    And(Vec<Expr>),
    /// Some child matches.
    Or(Vec<Expr>),
    /// No child matches.
    Nor(Vec<Expr>),
    /// Operators on one field path.
    Path {
        /// The field path.
        path: FieldPath,
        /// The operators applied to its candidates.
        ops: OpTree,
    },
}

impl Expr {
    /// Whether `doc` satisfies this expression.
    pub fn matches(&self, doc: &Document) -> bool {
        match self {
            Expr::Const(answer) => *answer,
            Expr::And(children) => children.iter().all(|c| c.matches(doc)),
            Expr::Or(children) => children.iter().any(|c| c.matches(doc)),
            Expr::Nor(children) => !children.iter().any(|c| c.matches(doc)),
            Expr::Path { path, ops } => ops.matches_path(path, doc),
        }
    }
}

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
}

impl Filter {
    /// Parses and compiles a filter document.
    pub fn parse(source: &Document) -> Result<Self, QueryError> {
        let root = crate::parse::parse_filter(source, "")?;
        Ok(Filter { root })
    }

    /// Parses a filter from (canonical or relaxed Extended) JSON text.
    pub fn from_json(text: &str) -> Result<Self, QueryError> {
        let doc = livegrid_protocol::extjson::parse_document(text).map_err(|e| QueryError::Json(e.to_string()))?;
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

    /// What an index of queries needs to find this filter from a document: predicates that
    /// every matching document satisfies.
    pub fn index_plan(&self) -> IndexPlan {
        IndexPlan::of(&self.root)
    }
}
