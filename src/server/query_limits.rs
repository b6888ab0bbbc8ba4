//! The limits a server puts on the queries clients send, each a setting of [`super::ServerConfig`]
//! below the matcher's own hard caps: the size of `$in`/`$nin`/`$all` lists, filter nesting,
//! the length of a regular expression and the memory a filter's compiled regular expressions
//! hold apply to subscriptions and REST reads alike; the end of a sorted window and the memory
//! a subscription holds apply to subscriptions. A query over a limit is refused with
//! `query_too_large` and a message naming the limit; a malformed one with `bad_query`.
//!
//! Compiling can take milliseconds (regular expressions): call these on the blocking pool.

use livegrid_matcher::{Query, QuerySpec};
use livegrid_protocol::ErrorCode;

/// The settings these checks read.
#[derive(Debug, Clone, Copy)]
pub struct QueryLimits {
    /// Values one `$in`, `$nin` or `$all` may list.
    pub max_in_values: usize,
    /// Levels of nesting a filter may have.
    pub max_filter_depth: usize,
    /// Bytes of one regular expression pattern.
    pub max_regex_bytes: usize,
    /// Bytes a filter's compiled regular expressions may hold together.
    pub max_regex_memory: usize,
    /// The end of a sorted window (`skip + limit`).
    pub max_window: u64,
    /// Bytes one subscription may hold.
    pub max_subscription_bytes: usize,
    /// Documents a sorted window keeps beyond its end (counted in what it holds).
    pub window_slack: usize,
}

/// Why a query was refused: `bad_query` or `query_too_large`, and what to tell the client.
pub type Refusal = (ErrorCode, String);

fn too_large<T>(message: String) -> Result<T, Refusal> {
    Err((ErrorCode::QueryTooLarge, message))
}

/// Checks `spec`'s shape and compiles it.
pub fn compile(spec: &QuerySpec, limits: &QueryLimits) -> Result<Query, Refusal> {
    let shape = livegrid_matcher::filter_shape(&spec.filter);
    let QueryLimits { max_in_values, max_filter_depth, max_regex_bytes, max_regex_memory, .. } = *limits;
    if shape.largest_set > max_in_values {
        let values = shape.largest_set;
        return too_large(format!("an $in, $nin or $all lists {values} values; at most {max_in_values} are allowed"));
    }
    if shape.depth > max_filter_depth {
        let depth = shape.depth;
        return too_large(format!("the filter nests {depth} levels; at most {max_filter_depth} are allowed"));
    }
    if shape.longest_regex > max_regex_bytes {
        let bytes = shape.longest_regex;
        return too_large(format!("a regular expression is {bytes} bytes; at most {max_regex_bytes} are allowed"));
    }
    let query = Query::compile(spec).map_err(|e| (ErrorCode::BadQuery, e.to_string()))?;
    let regex_memory = query.filter.regex_memory();
    if regex_memory > max_regex_memory {
        return too_large(format!(
            "the filter's regular expressions compile to {regex_memory} bytes; at most {max_regex_memory} are allowed"
        ));
    }
    Ok(query)
}

/// Checks what a compiled query would hold as a subscription; returns the bytes to charge
/// to the memory budget.
pub fn subscription_charge(query: &Query, limits: &QueryLimits) -> Result<usize, Refusal> {
    let max_window = limits.max_window;
    if let Some(end) = query.window_end().filter(|end| *end > max_window) {
        return too_large(format!(
            "the window ends at {end} (skip + limit); sorted windows may end at most at {max_window}"
        ));
    }
    let charge = crate::budget::subscription_charge(query, limits.window_slack);
    let max_bytes = limits.max_subscription_bytes;
    if charge > max_bytes {
        return too_large(format!(
            "this subscription would hold about {charge} bytes; at most {max_bytes} are allowed"
        ));
    }
    Ok(charge)
}
