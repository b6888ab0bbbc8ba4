//! Field operators, one candidate value at a time: comparisons with MongoDB's type
//! bracketing, `$in` lists, `$mod` and regexes. The tree these operators sit in, and how
//! they combine over a path's candidates, is [`crate::expr`].

use std::cmp::Ordering;
use std::collections::HashSet;

use bson::Bson;

use crate::bson_order::{Number, canonical_rank, compare_values, value_hash, values_equal};
use crate::regex::MongoRegex;

/// The comparison of `$gt`, `$gte`, `$lt` and `$lte`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// `$gt`
    Gt,
    /// `$gte`
    Gte,
    /// `$lt`
    Lt,
    /// `$lte`
    Lte,
}

/// The values and regexes of a `$in` list.
#[derive(Debug, Clone)]
pub struct InList {
    values: Vec<Bson>,
    regexes: Vec<MongoRegex>,
    /// Hashes of `values`, built for long lists to reject most candidates without comparing.
    hashes: Option<HashSet<u64>>,
    has_null: bool,
}

/// Lists longer than this get a hash set for lookups.
const IN_HASH_THRESHOLD: usize = 8;

impl InList {
    pub(crate) fn new(values: Vec<Bson>, regexes: Vec<MongoRegex>) -> Self {
        let has_null = values.iter().any(|v| matches!(v, Bson::Null));
        let hashes = (values.len() > IN_HASH_THRESHOLD).then(|| values.iter().map(value_hash).collect());
        InList { values, regexes, hashes, has_null }
    }

    /// The literal values of the list.
    pub fn values(&self) -> &[Bson] {
        &self.values
    }

    /// Whether the list holds regexes.
    pub fn has_regexes(&self) -> bool {
        !self.regexes.is_empty()
    }

    pub(crate) fn matches(&self, candidate: Option<&Bson>) -> bool {
        let Some(value) = candidate else {
            return self.has_null;
        };
        let found = match &self.hashes {
            Some(hashes) => hashes.contains(&value_hash(value)) && self.values.iter().any(|v| values_equal(v, value)),
            None => self.values.iter().any(|v| values_equal(v, value)),
        };
        found || self.regexes.iter().any(|r| regex_matches(r, value))
    }
}

/// `$mod`: the value, truncated toward zero, leaves `remainder` when divided by `divisor`.
pub(crate) fn mod_matches(divisor: i64, remainder: i64, value: &Bson) -> bool {
    let Some(n) = Number::of(value) else { return false };
    let f = n.as_f64();
    let value = match n {
        Number::Int(i) => i,
        Number::Float(_) if f.is_finite() => f.trunc() as i64,
        Number::Float(_) => return false,
    };
    value.wrapping_rem(divisor) == remainder
}

/// A regex matches strings and symbols, and equals an identical stored regex.
pub(crate) fn regex_matches(regex: &MongoRegex, value: &Bson) -> bool {
    match value {
        Bson::String(s) | Bson::Symbol(s) => regex.is_match(s),
        Bson::RegularExpression(stored) => regex.is_same_regex(stored),
        _ => false,
    }
}

/// `$gt`/`$gte`/`$lt`/`$lte`: only values of the bound's canonical type compare, except
/// against MinKey and MaxKey, which every value is above or below. NaN equals NaN and is
/// neither above nor below any other number. A missing value counts as null.
pub(crate) fn compare_matches(op: CmpOp, candidate: Option<&Bson>, rhs: &Bson) -> bool {
    let value = candidate.unwrap_or(&Bson::Null);
    // Same-type fast paths for the common integer and string ranges; exact.
    let fast = match (value, rhs) {
        (Bson::Int32(x), Bson::Int32(y)) => Some(x.cmp(y)),
        (Bson::Int64(x), Bson::Int64(y)) => Some(x.cmp(y)),
        (Bson::String(x), Bson::String(y)) => Some(x.as_bytes().cmp(y.as_bytes())),
        (Bson::DateTime(x), Bson::DateTime(y)) => Some(x.timestamp_millis().cmp(&y.timestamp_millis())),
        _ => None,
    };
    if let Some(ord) = fast {
        return ordering_satisfies(op, ord);
    }
    if canonical_rank(value) != canonical_rank(rhs) {
        return match rhs {
            Bson::MinKey => matches!(op, CmpOp::Gt | CmpOp::Gte),
            Bson::MaxKey => matches!(op, CmpOp::Lt | CmpOp::Lte),
            _ => false,
        };
    }
    let (lhs_nan, rhs_nan) =
        (Number::of(value).is_some_and(Number::is_nan), Number::of(rhs).is_some_and(Number::is_nan));
    if lhs_nan || rhs_nan {
        return lhs_nan && rhs_nan && matches!(op, CmpOp::Gte | CmpOp::Lte);
    }
    ordering_satisfies(op, compare_values(value, rhs))
}

fn ordering_satisfies(op: CmpOp, ord: Ordering) -> bool {
    match op {
        CmpOp::Gt => ord == Ordering::Greater,
        CmpOp::Gte => ord != Ordering::Less,
        CmpOp::Lt => ord == Ordering::Less,
        CmpOp::Lte => ord != Ordering::Greater,
    }
}
