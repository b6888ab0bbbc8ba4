//! Predicate extraction for indexing queries.
//!
//! An engine that holds many queries cannot evaluate every one of them against every write.
//! [`IndexPlan`] names predicates that every document matching a filter must satisfy, so that
//! a query index can file the query under them and, for a written document, look up only
//! the queries whose plan the document meets (the *candidates*), then evaluate those. A plan
//! is a necessary condition, never a sufficient one: candidates are always evaluated.
//!
//! Document side: the values a document offers for a plan's path are the path's candidates
//! with leaf arrays expanded ([`crate::FieldPath::candidates`] with
//! [`crate::LeafArrays::Expand`]). An [`IndexPlan::Equality`] holds when one of them equals one
//! of the plan's values (hash with [`crate::value_hash`]). An [`IndexPlan::Range`] holds when,
//! among the candidates of the bounds' canonical type, the largest is not below the lower
//! bound and the smallest is not above the upper bound; one value need not satisfy both, as
//! in MongoDB (`{a: {$gt: 1, $lt: 5}}` matches `{a: [0, 9]}`).

use std::cmp::Ordering;

use bson::Bson;

use crate::bson_order::{Number, canonical_rank, compare_values};
use crate::filter::Expr;
use crate::operator::{CmpOp, OpTree, Pred};
use crate::path::{FieldPath, LeafArrays};

/// One end of a range.
#[derive(Debug, Clone, PartialEq)]
pub struct Bound {
    /// The bound value.
    pub value: Bson,
    /// Whether the bound itself is inside the range.
    pub inclusive: bool,
}

/// Predicates every match of a filter satisfies; see the module docs.
#[derive(Debug, Clone, PartialEq)]
#[expect(clippy::large_enum_variant, reason = "built once per registered query, never stored in bulk")]
pub enum IndexPlan {
    /// Some candidate at `path` equals one of `values`.
    Equality {
        /// The field path.
        path: FieldPath,
        /// The values, at least one.
        values: Vec<Bson>,
    },
    /// The candidates at `path` of the bounds' type reach into the range.
    Range {
        /// The field path.
        path: FieldPath,
        /// The lower bound, if any.
        lower: Option<Bound>,
        /// The upper bound, if any (at least one bound is present).
        upper: Option<Bound>,
    },
    /// At least one of the plans holds (from `$or`).
    Union(Vec<IndexPlan>),
    /// No predicate can be extracted: the query must see every write.
    Scan,
}

impl IndexPlan {
    /// The best plan for a compiled filter.
    pub fn of(expr: &Expr) -> IndexPlan {
        let mut conjuncts = Vec::new();
        collect(expr, &mut conjuncts);
        merge_ranges(&mut conjuncts);
        conjuncts.into_iter().max_by_key(IndexPlan::score).unwrap_or(IndexPlan::Scan)
    }

    /// Whether `doc` satisfies the plan, by the document-side rules in the module docs. Every
    /// document the filter matches is admitted; an index must find at least these.
    pub fn admits(&self, doc: &bson::Document) -> bool {
        match self {
            IndexPlan::Equality { path, values } => path.any(doc, LeafArrays::Expand, &mut |candidate| {
                candidate.is_some_and(|v| values.iter().any(|x| crate::values_equal(x, v)))
            }),
            IndexPlan::Range { path, lower, upper } => {
                let rank = lower.as_ref().or(upper.as_ref()).map(|b| canonical_rank(&b.value));
                let (mut min, mut max): (Option<&Bson>, Option<&Bson>) = (None, None);
                path.any(doc, LeafArrays::Expand, &mut |candidate| {
                    if let Some(v) = candidate.filter(|v| Some(canonical_rank(v)) == rank) {
                        if min.is_none_or(|m| compare_values(v, m) == Ordering::Less) {
                            min = Some(v);
                        }
                        if max.is_none_or(|m| compare_values(v, m) == Ordering::Greater) {
                            max = Some(v);
                        }
                    }
                    false
                });
                let (Some(min), Some(max)) = (min, max) else { return false };
                let above = |b: &Bound, v: &Bson| match compare_values(v, &b.value) {
                    Ordering::Greater => true,
                    Ordering::Equal => b.inclusive,
                    Ordering::Less => false,
                };
                let below = |b: &Bound, v: &Bson| match compare_values(v, &b.value) {
                    Ordering::Less => true,
                    Ordering::Equal => b.inclusive,
                    Ordering::Greater => false,
                };
                lower.as_ref().is_none_or(|b| above(b, max)) && upper.as_ref().is_none_or(|b| below(b, min))
            }
            IndexPlan::Union(plans) => plans.iter().any(|p| p.admits(doc)),
            IndexPlan::Scan => true,
        }
    }

    /// How selective the plan is likely to be; higher is better.
    fn score(&self) -> u32 {
        match self {
            IndexPlan::Equality { values, .. } => 1000 - values.len().min(900) as u32,
            IndexPlan::Union(plans) => 50 + plans.iter().map(IndexPlan::score).min().unwrap_or(0) / 100,
            IndexPlan::Range { lower: Some(_), upper: Some(_), .. } => 40,
            IndexPlan::Range { .. } => 20,
            IndexPlan::Scan => 0,
        }
    }

    /// The same plan on paths below `prefix` (for `$elemMatch` on `prefix`).
    fn under(self, prefix: &FieldPath) -> IndexPlan {
        match self {
            IndexPlan::Equality { path, values } => IndexPlan::Equality { path: prefix.join(&path), values },
            IndexPlan::Range { path, lower, upper } => IndexPlan::Range { path: prefix.join(&path), lower, upper },
            IndexPlan::Union(plans) => IndexPlan::Union(plans.into_iter().map(|p| p.under(prefix)).collect()),
            IndexPlan::Scan => IndexPlan::Scan,
        }
    }
}

fn collect(expr: &Expr, out: &mut Vec<IndexPlan>) {
    match expr {
        Expr::And(children) => children.iter().for_each(|c| collect(c, out)),
        Expr::Or(children) => {
            let plans: Vec<IndexPlan> = children.iter().map(IndexPlan::of).collect();
            if plans.iter().all(|p| *p != IndexPlan::Scan) {
                out.push(IndexPlan::Union(plans));
            }
        }
        Expr::Path { path, ops } => collect_ops(path, ops, out),
        Expr::Const(_) | Expr::Nor(_) => {}
    }
}

fn collect_ops(path: &FieldPath, ops: &OpTree, out: &mut Vec<IndexPlan>) {
    match ops {
        OpTree::And(children) => children.iter().for_each(|c| collect_ops(path, c, out)),
        OpTree::Leaf(Pred::Eq(value)) if equality_indexable(value) => {
            out.push(IndexPlan::Equality { path: path.clone(), values: vec![value.clone()] })
        }
        OpTree::Leaf(Pred::In(list))
            if !list.has_regexes() && !list.values().is_empty() && list.values().iter().all(equality_indexable) =>
        {
            out.push(IndexPlan::Equality { path: path.clone(), values: list.values().to_vec() })
        }
        OpTree::Leaf(Pred::Cmp(op, value)) if range_indexable(value) => {
            let bound = Some(Bound { value: value.clone(), inclusive: matches!(op, CmpOp::Gte | CmpOp::Lte) });
            let (lower, upper) = match op {
                CmpOp::Gt | CmpOp::Gte => (bound, None),
                CmpOp::Lt | CmpOp::Lte => (None, bound),
            };
            out.push(IndexPlan::Range { path: path.clone(), lower, upper });
        }
        OpTree::Leaf(Pred::ElemMatchValue(inner)) => collect_ops(path, inner, out),
        OpTree::Leaf(Pred::ElemMatchDocument(expr)) => {
            let inner = IndexPlan::of(expr);
            if inner != IndexPlan::Scan {
                out.push(inner.under(path));
            }
        }
        OpTree::Leaf(_) | OpTree::Const(_) | OpTree::Not(_) => {}
    }
}

/// `null` also matches missing values, which no index key represents.
fn equality_indexable(value: &Bson) -> bool {
    !matches!(value, Bson::Null | Bson::Undefined)
}

/// Scalars other than null, NaN, MinKey and MaxKey (which compare across types).
fn range_indexable(value: &Bson) -> bool {
    !matches!(value, Bson::Null | Bson::Undefined | Bson::MinKey | Bson::MaxKey | Bson::Array(_) | Bson::Document(_))
        && !Number::of(value).is_some_and(Number::is_nan)
}

/// Intersects the ranges on one path into one plan with both bounds where their types agree.
fn merge_ranges(plans: &mut Vec<IndexPlan>) {
    let mut merged: Vec<IndexPlan> = Vec::with_capacity(plans.len());
    for plan in plans.drain(..) {
        let IndexPlan::Range { path, lower, upper } = plan else {
            merged.push(plan);
            continue;
        };
        let rank = lower.as_ref().or(upper.as_ref()).map(|b| canonical_rank(&b.value));
        let existing = merged.iter_mut().find(|p| {
            matches!(p, IndexPlan::Range { path: q, lower: l, upper: u }
                if *q == path && l.as_ref().or(u.as_ref()).map(|b| canonical_rank(&b.value)) == rank)
        });
        match existing {
            Some(IndexPlan::Range { lower: l, upper: u, .. }) => {
                *l = tighter(l.take(), lower, Ordering::Greater);
                *u = tighter(u.take(), upper, Ordering::Less);
            }
            _ => merged.push(IndexPlan::Range { path, lower, upper }),
        }
    }
    *plans = merged;
}

/// The tighter of two bounds: the larger lower bound (`prefer` = Greater) or the smaller
/// upper bound (`prefer` = Less); on equal values the exclusive one.
fn tighter(a: Option<Bound>, b: Option<Bound>, prefer: Ordering) -> Option<Bound> {
    match (a, b) {
        (None, b) => b,
        (a, None) => a,
        (Some(a), Some(b)) => match compare_values(&a.value, &b.value) {
            Ordering::Equal => Some(Bound { value: a.value, inclusive: a.inclusive && b.inclusive }),
            ord if ord == prefer => Some(a),
            _ => Some(b),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Filter;
    use bson::{bson, doc};

    fn plan(filter: bson::Document) -> IndexPlan {
        Filter::parse(&filter).unwrap().index_plan()
    }

    fn path(p: &str) -> FieldPath {
        FieldPath::parse(p).unwrap()
    }

    #[test]
    fn picks_equality_over_ranges() {
        assert_eq!(
            plan(doc! {"age": {"$gt": 5}, "city": "Paris"}),
            IndexPlan::Equality { path: path("city"), values: vec![bson!("Paris")] }
        );
        assert_eq!(
            plan(doc! {"tag": {"$in": ["a", "b"]}}),
            IndexPlan::Equality { path: path("tag"), values: vec![bson!("a"), bson!("b")] }
        );
    }

    #[test]
    fn merges_ranges_on_one_path() {
        assert_eq!(
            plan(doc! {"age": {"$gt": 5, "$lte": 10}, "x": {"$ne": 1}}),
            IndexPlan::Range {
                path: path("age"),
                lower: Some(Bound { value: bson!(5), inclusive: false }),
                upper: Some(Bound { value: bson!(10), inclusive: true }),
            }
        );
    }

    #[test]
    fn unions_of_or_branches() {
        assert_eq!(
            plan(doc! {"$or": [{"a": 1}, {"b": {"$lt": 3}}]}),
            IndexPlan::Union(vec![
                IndexPlan::Equality { path: path("a"), values: vec![bson!(1)] },
                IndexPlan::Range {
                    path: path("b"),
                    lower: None,
                    upper: Some(Bound { value: bson!(3), inclusive: false })
                },
            ])
        );
        assert_eq!(plan(doc! {"$or": [{"a": 1}, {"b": {"$exists": true}}]}), IndexPlan::Scan);
    }

    #[test]
    fn scans_what_cannot_be_indexed() {
        assert_eq!(plan(doc! {"a": null}), IndexPlan::Scan);
        assert_eq!(plan(doc! {"a": {"$ne": 1}}), IndexPlan::Scan);
        assert_eq!(plan(doc! {"a": {"$in": [1, null]}}), IndexPlan::Scan);
        assert_eq!(plan(doc! {}), IndexPlan::Scan);
    }

    #[test]
    fn elem_match_documents_index_below_their_path() {
        assert_eq!(
            plan(doc! {"items": {"$elemMatch": {"sku": "x", "qty": {"$gt": 1}}}}),
            IndexPlan::Equality { path: path("items.sku"), values: vec![bson!("x")] }
        );
    }
}
