//! Field operators: the predicates a filter applies to the candidates of one path.
//!
//! Operators written on one field (`{a: {$gt: 1, $lt: 5, $ne: 3}}`) form an [`OpTree`]: an
//! AND of leaves, some negated. Each leaf is tested against the candidates of the path on
//! its own (`$gt` and `$lt` may be satisfied by different array elements, as in MongoDB), and
//! a negation (`$ne`, `$nin`, `$not`, `$exists: false`) negates the whole leaf, so `$ne: 3`
//! fails on `[1, 3]`.

use std::cmp::Ordering;
use std::collections::HashSet;

use bson::{Bson, Document};

use crate::bson_order::{Number, canonical_rank, compare_values, value_hash, values_equal};
use crate::bson_type::TypeSet;
use crate::filter::Expr;
use crate::path::{FieldPath, LeafArrays};
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

/// A predicate on one candidate value (or a missing one).
#[derive(Debug, Clone)]
pub enum Pred {
    /// `$eq` (and implicit equality): `null` also matches a missing value.
    Eq(Bson),
    /// `$gt`, `$gte`, `$lt`, `$lte` with type bracketing.
    Cmp(CmpOp, Bson),
    /// `$in`: equal to one of the values or matching one of the regexes.
    In(InList),
    /// `$exists: true`.
    Exists,
    /// `$type`.
    Type(TypeSet),
    /// `$mod: [divisor, remainder]`.
    Mod {
        /// The divisor, never zero.
        divisor: i64,
        /// The expected remainder.
        remainder: i64,
    },
    /// `$regex` or a regex literal.
    Regex(MongoRegex),
    /// `$size`.
    Size(usize),
    /// `$elemMatch` over values: some element satisfies every operator.
    ElemMatchValue(Box<OpTree>),
    /// `$elemMatch` over documents: some document element matches the filter.
    ElemMatchDocument(Box<Expr>),
}

/// Operators on one path: leaves combined with AND and NOT.
#[derive(Debug, Clone)]
pub enum OpTree {
    /// Always this answer (`$all: []` is `Const(false)`).
    Const(bool),
    /// One operator, true when some candidate satisfies it.
    Leaf(Pred),
    /// Every child holds.
    And(Vec<OpTree>),
    /// The child does not hold.
    Not(Box<OpTree>),
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

    fn matches(&self, candidate: Option<&Bson>) -> bool {
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

impl Pred {
    /// Whether an array at the end of the path is expanded into its elements for this
    /// predicate.
    pub fn leaf_arrays(&self) -> LeafArrays {
        match self {
            Pred::Size(_) | Pred::ElemMatchValue(_) | Pred::ElemMatchDocument(_) => LeafArrays::Whole,
            _ => LeafArrays::Expand,
        }
    }

    /// Whether one candidate satisfies the predicate.
    pub fn matches(&self, candidate: Option<&Bson>) -> bool {
        match self {
            Pred::Eq(rhs) => match candidate {
                None => matches!(rhs, Bson::Null),
                Some(value) => values_equal(value, rhs),
            },
            Pred::Cmp(op, rhs) => compare_matches(*op, candidate, rhs),
            Pred::In(list) => list.matches(candidate),
            Pred::Exists => candidate.is_some(),
            Pred::Type(types) => candidate.is_some_and(|v| types.contains(v)),
            Pred::Mod { divisor, remainder } => candidate.and_then(Number::of).is_some_and(|n| {
                let f = n.as_f64();
                let value = match n {
                    Number::Int(i) => i,
                    Number::Float(_) if f.is_finite() => f.trunc() as i64,
                    Number::Float(_) => return false,
                };
                value.wrapping_rem(*divisor) == *remainder
            }),
            Pred::Regex(regex) => candidate.is_some_and(|v| regex_matches(regex, v)),
            Pred::Size(n) => matches!(candidate, Some(Bson::Array(items)) if items.len() == *n),
            Pred::ElemMatchValue(ops) => match candidate {
                Some(Bson::Array(items)) => items.iter().any(|item| ops.matches_value(item)),
                _ => false,
            },
            Pred::ElemMatchDocument(expr) => match candidate {
                Some(Bson::Array(items)) => {
                    items.iter().any(|item| matches!(item, Bson::Document(d) if expr.matches(d)))
                }
                _ => false,
            },
        }
    }
}

impl OpTree {
    /// Evaluates the operators on the candidates of `path` in `doc`.
    pub fn matches_path(&self, path: &FieldPath, doc: &Document) -> bool {
        match self {
            OpTree::Const(answer) => *answer,
            OpTree::Leaf(pred) => path.any(doc, pred.leaf_arrays(), &mut |candidate| pred.matches(candidate)),
            OpTree::And(children) => children.iter().all(|child| child.matches_path(path, doc)),
            OpTree::Not(child) => !child.matches_path(path, doc),
        }
    }

    /// Evaluates the operators on one value, with no array expansion (as `$elemMatch` does for
    /// each element).
    pub fn matches_value(&self, value: &Bson) -> bool {
        match self {
            OpTree::Const(answer) => *answer,
            OpTree::Leaf(pred) => pred.matches(Some(value)),
            OpTree::And(children) => children.iter().all(|child| child.matches_value(value)),
            OpTree::Not(child) => !child.matches_value(value),
        }
    }
}

fn regex_matches(regex: &MongoRegex, value: &Bson) -> bool {
    match value {
        Bson::String(s) | Bson::Symbol(s) => regex.is_match(s),
        Bson::RegularExpression(stored) => regex.is_same_regex(stored),
        _ => false,
    }
}

/// `$gt`/`$gte`/`$lt`/`$lte`: only values of the bound's canonical type compare, except
/// against MinKey and MaxKey, which every value is above or below. NaN equals NaN and is
/// neither above nor below any other number. A missing value counts as null.
fn compare_matches(op: CmpOp, candidate: Option<&Bson>, rhs: &Bson) -> bool {
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
