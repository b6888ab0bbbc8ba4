//! Errors of query parsing: every malformed or unsupported query is rejected here, naming
//! the operator and the path, instead of panicking or silently matching nothing.
//!
//! Where another library's error is the cause (Extended JSON, the regex compiler, a field
//! path inside a sort), it stays reachable through [`std::error::Error::source`]; messages
//! still say the cause too, since clients see only the message.

use std::sync::Arc;

use livegrid_protocol::extjson::ExtJsonError;
use regex_automata::meta::BuildError;

/// Why a filter, sort or projection was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// An operator MongoDB has but livegrid does not evaluate (yet).
    #[error("unsupported operator {op} at {path}")]
    Unsupported {
        /// The operator, such as `$where`.
        op: String,
        /// The path it was used on (`(top level)` for top-level operators).
        path: String,
    },
    /// An operator that does not exist in MongoDB's query language.
    #[error("unknown operator {op} at {path}")]
    UnknownOperator {
        /// The operator as written.
        op: String,
        /// The path it was used on.
        path: String,
    },
    /// An operator with an argument of the wrong shape.
    #[error("bad argument to {op} at {path}: {reason}")]
    BadArgument {
        /// The operator.
        op: String,
        /// The path it was used on.
        path: String,
        /// What is wrong with the argument.
        reason: String,
    },
    /// A regular expression that cannot be compiled or run in linear time.
    #[error("bad regex at {path}: {reason}")]
    Regex {
        /// The path the regex was used on.
        path: String,
        /// Why the regex was rejected, in one line.
        reason: String,
        /// The regex compiler's error, when it was the compiler that refused.
        #[source]
        source: Option<RegexBuildError>,
    },
    /// A malformed field path such as `a..b`.
    #[error("bad field path {path:?}: {reason}")]
    BadPath {
        /// The path as written.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A field path with more components than [`crate::MAX_PATH_COMPONENTS`]; the path itself
    /// may be huge, so only its start is kept.
    #[error("field path starting {path_prefix:?} has {components} components; at most {max} are allowed")]
    PathTooDeep {
        /// The first 64 characters of the path.
        path_prefix: String,
        /// How many components the path has.
        components: usize,
        /// The limit.
        max: usize,
    },
    /// A filter, sort or projection document nested deeper than
    /// [`crate::MAX_NESTING_DEPTH`] levels.
    #[error("{part} nests deeper than {max} levels (each document or array is a level)")]
    NestingTooDeep {
        /// Which document: `filter`, `sort` or `projection`.
        part: String,
        /// The limit.
        max: usize,
    },
    /// The regular expressions of one filter compile to more than its budget
    /// ([`crate::QUERY_REGEX_BUDGET`] unless given another).
    #[error("regexes of this query exceed the {} compile budget at {path}", display_bytes(*.budget))]
    RegexBudget {
        /// The path of the regex that did not fit.
        path: String,
        /// The budget in bytes.
        budget: usize,
    },
    /// A malformed sort specification.
    #[error("bad sort at {path}: {reason}")]
    Sort {
        /// The sort field.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A sort field that is not a valid field path.
    #[error("bad sort at {path}: {source}")]
    SortPath {
        /// The sort field as written.
        path: String,
        /// Why it is not a path.
        #[source]
        source: Box<QueryError>,
    },
    /// A malformed projection.
    #[error("bad projection at {path}: {reason}")]
    Projection {
        /// The projected field.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The query is not valid (Extended) JSON, or a part of it has the wrong JSON type.
    #[error("bad query json: {0}")]
    Json(String),
    /// The query text is not valid (Extended) JSON.
    #[error("bad query json: {0}")]
    ExtJson(#[source] Arc<ExtJsonError>),
}

impl From<ExtJsonError> for QueryError {
    fn from(error: ExtJsonError) -> Self {
        QueryError::ExtJson(Arc::new(error))
    }
}

/// The regex compiler's error, shared so that [`QueryError`] stays cheap to clone. Two are
/// equal when they say the same (the compiler's error has no equality of its own).
#[derive(Debug, Clone, thiserror::Error)]
#[error(transparent)]
pub struct RegexBuildError(Arc<BuildError>);

impl RegexBuildError {
    /// The compiler's error, with its details ([`BuildError::size_limit`],
    /// [`BuildError::syntax_error`]).
    pub fn get(&self) -> &BuildError {
        &self.0
    }
}

impl From<BuildError> for RegexBuildError {
    fn from(error: BuildError) -> Self {
        RegexBuildError(Arc::new(error))
    }
}

impl PartialEq for RegexBuildError {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

impl Eq for RegexBuildError {}

impl QueryError {
    pub(crate) fn bad_argument(op: &str, path: &str, reason: impl Into<String>) -> Self {
        QueryError::BadArgument { op: op.to_string(), path: display_path(path), reason: reason.into() }
    }

    pub(crate) fn unsupported(op: &str, path: &str) -> Self {
        QueryError::Unsupported { op: op.to_string(), path: display_path(path) }
    }

    pub(crate) fn unknown(op: &str, path: &str) -> Self {
        QueryError::UnknownOperator { op: op.to_string(), path: display_path(path) }
    }
}

/// Paths in messages: the dotted path, or `(top level)` for the query root.
pub(crate) fn display_path(path: &str) -> String {
    if path.is_empty() { "(top level)".to_string() } else { path.to_string() }
}

/// Byte counts in messages: whole MiB or KiB when exact, bytes otherwise.
fn display_bytes(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}
