//! Predicate extraction for indexing queries.
//!
//! An engine that holds many queries cannot evaluate every one of them against every write.
//! [`IndexPlan`] names predicates that every document matching a filter must satisfy, so that
//! a query index can file the query under them and, for a written document, look up only
//! the queries whose plan the document meets (the *candidates*), then evaluate those. A plan
//! is a necessary condition, never a sufficient one: candidates are always evaluated.
//!
//! Document side: the values a document offers for a plan's path are the path's candidates
//! with leaf arrays expanded ([`document_values`]). An [`IndexPlan::Equality`] holds when one
//! of them equals one of the plan's values. An [`IndexPlan::Range`] holds when the [`Span`]
//! of those of the bounds' canonical type ([`range_rank`]) meets the bounds: the largest is
//! not below the lower bound and the smallest is not above the upper bound; one value need
//! not satisfy both, as in MongoDB (`{a: {$gt: 1, $lt: 5}}` matches `{a: [0, 9]}`).
//!
//! # For indexes
//! This module owns the rule; an index owns only its data structures. It files an equality
//! plan's query under [`equality_keys`] and looks a document up by the [`equality_key`] of
//! each of its [`document_values`] (equal values have equal keys). It files a range plan by
//! path and [`range_rank`], and asks, for a document's [`Span::of`] that path and rank,
//! which ranges the span [`meets`](Span::meets) (or a superset of them).

use std::cmp::Ordering;

use bson::{Bson, Document};

use crate::bson_order::{Number, canonical_rank, compare_values, value_hash, values_equal};
use crate::expr::{Expr, OpTree, Pred};
use crate::operator::CmpOp;
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
    pub fn admits(&self, doc: &Document) -> bool {
        match self {
            IndexPlan::Equality { path, values } => {
                document_values(path, doc, |v| values.iter().any(|x| values_equal(x, v)))
            }
            IndexPlan::Range { path, lower, upper } => range_rank(lower.as_ref(), upper.as_ref())
                .and_then(|rank| Span::of(path, doc, rank))
                .is_some_and(|span| span.meets(lower.as_ref(), upper.as_ref())),
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

/// Calls `visit` with each value `doc` offers a plan on `path` (its candidates with leaf
/// arrays expanded; missing ones offer nothing) until it returns `true`; returns whether it
/// did.
pub fn document_values<'d>(path: &FieldPath, doc: &'d Document, mut visit: impl FnMut(&'d Bson) -> bool) -> bool {
    path.any(doc, LeafArrays::Expand, &mut |candidate| candidate.is_some_and(&mut visit))
}

/// The key of a value in an equality index: equal values (in MongoDB's sense) have equal
/// keys, so a document meets an equality plan only if the key of one of its values is among
/// the plan's [`equality_keys`].
#[inline]
pub fn equality_key(value: &Bson) -> u64 {
    value_hash(value)
}

/// The keys an index files an equality plan's query under: the [`equality_key`] of each of
/// its values, once each, in ascending order.
pub fn equality_keys(values: &[Bson]) -> Vec<u64> {
    let mut keys: Vec<u64> = values.iter().map(equality_key).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// The canonical type ([`canonical_rank`]) of a range's bounds, which they share: only values
/// of this rank can meet the range, so an index files ranges by path and rank. `None` only
/// for a range without bounds, which plans never hold.
pub fn range_rank(lower: Option<&Bound>, upper: Option<&Bound>) -> Option<u8> {
    lower.or(upper).map(|b| canonical_rank(&b.value))
}

/// The smallest and the largest of the values a document offers a range plan on one path,
/// among those of the range's rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span<'d> {
    /// The smallest value.
    pub min: &'d Bson,
    /// The largest value.
    pub max: &'d Bson,
}

impl<'d> Span<'d> {
    /// The span of the values `doc` offers at `path` that have canonical type `rank`, or
    /// `None` when it offers none.
    pub fn of(path: &FieldPath, doc: &'d Document, rank: u8) -> Option<Span<'d>> {
        let mut span: Option<Span<'d>> = None;
        document_values(path, doc, |v| {
            if canonical_rank(v) == rank {
                span = Some(match span {
                    None => Span { min: v, max: v },
                    Some(Span { min, max }) => Span {
                        min: if compare_values(v, min) == Ordering::Less { v } else { min },
                        max: if compare_values(v, max) == Ordering::Greater { v } else { max },
                    },
                });
            }
            false
        });
        span
    }

    /// Whether the span meets a range: its largest value is not below the lower bound and its
    /// smallest not above the upper bound.
    pub fn meets(&self, lower: Option<&Bound>, upper: Option<&Bound>) -> bool {
        let above = |b: &Bound| match compare_values(self.max, &b.value) {
            Ordering::Greater => true,
            Ordering::Equal => b.inclusive,
            Ordering::Less => false,
        };
        let below = |b: &Bound| match compare_values(self.min, &b.value) {
            Ordering::Less => true,
            Ordering::Equal => b.inclusive,
            Ordering::Greater => false,
        };
        lower.is_none_or(above) && upper.is_none_or(below)
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
        OpTree::Leaf(Pred::Regex(regex)) => out.extend(regex_prefix_plan(path, regex)),
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

/// An anchored regular expression with a literal prefix (`^abc…`; without the `i`, `m` or `x`
/// option and without alternation) matches only strings from the prefix up to the prefix's
/// successor, and (as MongoDB's equality does) a stored regular expression equal to it.
fn regex_prefix_plan(path: &FieldPath, regex: &crate::regex::MongoRegex) -> Option<IndexPlan> {
    let (pattern, options) = (regex.pattern(), regex.options());
    if options.contains(['i', 'm', 'x']) || pattern.contains('|') {
        return None;
    }
    let rest = pattern.strip_prefix('^').or_else(|| pattern.strip_prefix("\\A"))?;
    let mut prefix = String::new();
    let mut chars = rest.chars().peekable();
    while let Some(&c) = chars.peek() {
        if ".^$*+?()[]{}|\\".contains(c) {
            break;
        }
        prefix.push(c);
        chars.next();
    }
    // A quantifier may drop or repeat the last literal character.
    if matches!(chars.peek(), Some('*' | '?' | '{')) {
        prefix.pop();
    }
    if prefix.is_empty() {
        return None;
    }
    let upper = successor(&prefix).map(|s| Bound { value: Bson::String(s), inclusive: false });
    let lower = Some(Bound { value: Bson::String(prefix), inclusive: true });
    let itself = Bson::RegularExpression(bson::Regex {
        pattern: pattern.to_string().try_into().ok()?,
        options: options.to_string().try_into().ok()?,
    });
    Some(IndexPlan::Union(vec![
        IndexPlan::Range { path: path.clone(), lower, upper },
        IndexPlan::Equality { path: path.clone(), values: vec![itself] },
    ]))
}

/// The smallest string above every string that starts with `prefix` (strings compare by
/// their UTF-8 bytes, which order as code points), or `None` when there is none.
fn successor(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        if let Some(next) = (last as u32 + 1..=char::MAX as u32).find_map(char::from_u32) {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
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
        let rank = range_rank(lower.as_ref(), upper.as_ref());
        let existing = merged.iter_mut().find(|p| {
            matches!(p, IndexPlan::Range { path: q, lower: l, upper: u }
                if *q == path && range_rank(l.as_ref(), u.as_ref()) == rank)
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
    use bson::{bson, doc};

    use crate::parse::parse_filter;
    use crate::regex::RegexBudget;

    fn plan(filter: Document) -> IndexPlan {
        IndexPlan::of(&parse_filter(&filter, &mut RegexBudget::default()).unwrap())
    }

    fn path(p: &str) -> FieldPath {
        FieldPath::parse(p).unwrap()
    }

    #[test]
    fn anchored_regexes_plan_the_range_of_their_prefix() {
        let admits = |filter: Document, d: Document| plan(filter).admits(&d);
        let prefix = doc! {"name": {"$regex": "^p12-"}};
        assert!(matches!(plan(prefix.clone()), IndexPlan::Union(_)));
        assert!(admits(prefix.clone(), doc! {"name": "p12-lamp"}));
        assert!(admits(prefix.clone(), doc! {"name": ["x", "p12-"]}));
        assert!(!admits(prefix.clone(), doc! {"name": "p13-lamp"}));
        assert!(!admits(prefix.clone(), doc! {"name": "p12"}));
        // A stored regular expression equal to the query's matches it, as in MongoDB.
        let stored = Bson::RegularExpression(bson::Regex {
            pattern: "^p12-".to_string().try_into().unwrap(),
            options: String::new().try_into().unwrap(),
        });
        assert!(admits(prefix, doc! {"name": stored}));
        // A quantifier after the last literal: the prefix stops before it.
        assert!(admits(doc! {"name": {"$regex": "^abc*"}}, doc! {"name": "ab"}));
        assert!(admits(doc! {"name": {"$regex": "^ab{0,2}"}}, doc! {"name": "a"}));
        // The successor of a prefix ending in the largest character.
        assert!(admits(doc! {"n": {"$regex": "^a\u{10FFFF}"}}, doc! {"n": "a\u{10FFFF}z"}));
        assert_eq!(successor("ab"), Some("ac".into()));
        assert_eq!(successor("a\u{10FFFF}"), Some("b".into()));
        assert_eq!(successor("\u{D7FF}"), Some("\u{E000}".into()));
        // Case-insensitive, multiline, alternation, unanchored: no plan.
        for filter in [
            doc! {"name": {"$regex": "^p12", "$options": "i"}},
            doc! {"name": {"$regex": "^p12", "$options": "m"}},
            doc! {"name": {"$regex": "^p1|q"}},
            doc! {"name": {"$regex": "p12"}},
            doc! {"name": {"$regex": "^.p"}},
        ] {
            assert_eq!(plan(filter.clone()), IndexPlan::Scan, "{filter}");
        }
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
    fn equality_keys_are_shared_by_equal_values() {
        assert_eq!(equality_keys(&[bson!(1), bson!(1.0), bson!(1_i64), bson!("1")]).len(), 2);
        assert_eq!(equality_key(&bson!(2)), equality_key(&bson!(2.0)));
        let doc = doc! {"a": [1, [2], {"b": 3}], "c": null};
        let mut offered = Vec::new();
        document_values(&path("a"), &doc, |v| {
            offered.push(v.clone());
            false
        });
        assert_eq!(offered, vec![bson!([1, [2], {"b": 3}]), bson!(1), bson!([2]), bson!({"b": 3})]);
        assert!(document_values(&path("c"), &doc, |v| *v == Bson::Null));
        assert!(!document_values(&path("missing"), &doc, |_| true));
    }

    #[test]
    fn spans_meet_ranges_by_their_ends() {
        let doc = doc! {"a": [0, "x", 9, 4.5]};
        let span = Span::of(&path("a"), &doc, canonical_rank(&bson!(1))).unwrap();
        assert_eq!((span.min, span.max), (&bson!(0), &bson!(9)));
        assert_eq!(Span::of(&path("a"), &doc, canonical_rank(&bson!(true))), None);
        let bound = |v: i32, inclusive| Some(Bound { value: bson!(v), inclusive });
        // {$gt: 1, $lt: 5} meets [0, 9]: one value need not satisfy both bounds.
        assert!(span.meets(bound(1, false).as_ref(), bound(5, false).as_ref()));
        assert!(span.meets(bound(9, true).as_ref(), None));
        assert!(!span.meets(bound(9, false).as_ref(), None));
        assert!(span.meets(None, bound(0, true).as_ref()));
        assert!(!span.meets(None, bound(0, false).as_ref()));
        assert_eq!(range_rank(None, bound(3, true).as_ref()), Some(canonical_rank(&bson!(3.5))));
    }

    #[test]
    fn elem_match_documents_index_below_their_path() {
        assert_eq!(
            plan(doc! {"items": {"$elemMatch": {"sku": "x", "qty": {"$gt": 1}}}}),
            IndexPlan::Equality { path: path("items.sku"), values: vec![bson!("x")] }
        );
    }
}
