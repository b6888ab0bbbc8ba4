//! MongoDB query semantics for livegrid: parse a filter, sort and projection into a compiled
//! form, decide whether a document matches, and where it sorts, the way MongoDB 8 does.
//!
//! The crate does no I/O and knows nothing of the grid: the engine asks it three questions
//! (does this document match? where does it sort? what does the client see of it?) and one
//! more for its query index ([`Filter::index_plan`]: which predicates must every match
//! satisfy?).
//!
//! ```
//! use bson::doc;
//! use livegrid_matcher::{Query, QuerySpec};
//!
//! let query = Query::compile(&QuerySpec {
//!     filter: doc! {"kind": "post", "score": {"$gte": 10}},
//!     sort: Some(doc! {"score": -1}),
//!     limit: Some(2),
//!     projection: Some(doc! {"score": 1, "_id": 0}),
//!     ..Default::default()
//! })
//! .unwrap();
//! let docs = [
//!     doc! {"_id": 1, "kind": "post", "score": 12},
//!     doc! {"_id": 2, "kind": "post", "score": 30},
//!     doc! {"_id": 3, "kind": "page", "score": 99},
//!     doc! {"_id": 4, "kind": "post", "score": 11},
//! ];
//! assert_eq!(query.evaluate(&docs), vec![doc! {"score": 30}, doc! {"score": 12}]);
//! ```
//!
//! # Modules
//! - [`bson_order`]: MongoDB's total order over BSON values and an agreeing hash.
//! - [`path`]: dotted paths and implicit array traversal.
//! - [`filter`]: a compiled filter and what the engine asks of it.
//! - [`expr`], [`operator`]: the compiled filter tree and what each field operator does.
//! - [`sort`], [`projection`]: result order and shape.
//! - [`index_plan`]: predicates for indexing many queries.
//! - [`limits`]: how deep and how large a query may be.
#![forbid(missing_docs)]

pub mod bson_order;
pub mod bson_type;
pub mod error;
pub mod expr;
pub mod filter;
pub mod index_plan;
pub mod limits;
pub mod operator;
mod parse;
pub mod path;
pub mod pipeline;
pub mod projection;
pub mod query;
pub mod regex;
pub mod sort;

pub use bson_order::{compare_values, value_hash, values_equal};
pub use error::QueryError;
pub use filter::Filter;
pub use index_plan::{Bound, IndexPlan};
pub use limits::{
    FilterShape, MAX_NESTING_DEPTH, MAX_PATH_COMPONENTS, QUERY_REGEX_BUDGET, document_heap_bytes, filter_shape,
};
pub use path::{FieldPath, LeafArrays};
pub use pipeline::{Pipeline, PipelineError};
pub use projection::Projection;
pub use query::{Query, QuerySpec};
pub use regex::{MongoRegex, RegexBudget};
pub use sort::{Direction, SortKey, SortSpec};
