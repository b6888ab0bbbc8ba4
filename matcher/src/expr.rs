//! The compiled filter tree: logical nodes over field paths, the operators applied on each
//! path, and their evaluation against a document.
//!
//! The three node types are one recursive tree (`$elemMatch` holds a whole filter inside an
//! operator), so they live together; what each operator does with one value is in
//! [`crate::operator`].
//!
//! Operators written on one field (`{a: {$gt: 1, $lt: 5, $ne: 3}}`) form an [`OpTree`]: an
//! AND of leaves, some negated. Each leaf is tested against the candidates of the path on
//! its own (`$gt` and `$lt` may be satisfied by different array elements, as in MongoDB), and
//! a negation (`$ne`, `$nin`, `$not`, `$exists: false`) negates the whole leaf, so `$ne: 3`
//! fails on `[1, 3]`.

use bson::{Bson, Document};

use crate::bson_order::values_equal;
use crate::bson_type::TypeSet;
use crate::operator::{CmpOp, InList, compare_matches, mod_matches, regex_matches};
use crate::path::{FieldPath, LeafArrays};
use crate::regex::MongoRegex;

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
            Pred::Mod { divisor, remainder } => candidate.is_some_and(|v| mod_matches(*divisor, *remainder, v)),
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
