//! `$group` accumulators as state that takes documents in and out: `$sum`, `$avg`, `$count`,
//! `$min`, `$max`, `$addToSet`, `$first`, `$last`.
//!
//! Every state answers the same whatever order documents arrived and left in, so a group
//! maintained by deltas equals the group computed from scratch: sums keep integers exactly
//! and doubles as a multiset summed in one fixed order; `$min`, `$max` and `$addToSet` keep
//! a multiset of values in BSON order; `$first` and `$last` keep values by the group's order
//! (a `$sort` before `$group`, then `_id`).

use std::cmp::Ordering;
use std::collections::BTreeMap;

use bson::Bson;

use super::PipelineError;
use super::expression::{Expression, Num};
use crate::bson_order::compare_values;
use crate::sort::SortKey;

/// A BSON value ordered by MongoDB's order (1 and 1.0 are equal).
#[derive(Debug, Clone)]
pub struct Ordered(pub Bson);

impl PartialEq for Ordered {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Ordered {}
impl PartialOrd for Ordered {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ordered {
    fn cmp(&self, other: &Self) -> Ordering {
        compare_values(&self.0, &other.0)
    }
}

/// A BSON value in MongoDB's order, with equal values of different types (1 and 1.0) kept
/// apart in a fixed order, so that which of them an accumulator shows does not depend on the
/// order documents arrived in.
#[derive(Debug, Clone)]
pub struct Exact(pub Bson);

impl Exact {
    fn tie(&self) -> (u8, String) {
        (self.0.element_type() as u8, format!("{:?}", self.0))
    }
}

impl PartialEq for Exact {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Exact {}
impl PartialOrd for Exact {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Exact {
    fn cmp(&self, other: &Self) -> Ordering {
        compare_values(&self.0, &other.0).then_with(|| self.tie().cmp(&other.tie()))
    }
}

/// Where a document stands in its group's order: the sort key (which ends with `_id`), then
/// which element of each `$unwind` it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Rank(pub SortKey, pub Vec<u64>);

impl Eq for Rank {}
impl PartialOrd for Rank {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Rank {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

/// Which accumulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `$sum`.
    Sum,
    /// `$avg`.
    Avg,
    /// `$count`.
    Count,
    /// `$min`.
    Min,
    /// `$max`.
    Max,
    /// `$addToSet`.
    AddToSet,
    /// `$first`.
    First,
    /// `$last`.
    Last,
}

/// One accumulator of a `$group`: its kind and expression.
#[derive(Debug, Clone, PartialEq)]
pub struct Accumulator {
    /// Which.
    pub kind: Kind,
    /// What it accumulates (`$count` counts documents: a constant 1).
    pub expression: Expression,
}

impl Accumulator {
    /// Parses `{"$sum": <expr>}` and the like.
    pub fn parse(name: &str, spec: &bson::Bson) -> Result<Accumulator, PipelineError> {
        let bad = |reason: String| PipelineError::bad("$group", format!("field {name}: {reason}"));
        let Bson::Document(spec) = spec else {
            return Err(bad("an accumulator must be an object such as {\"$sum\": 1}".into()));
        };
        if spec.len() != 1 {
            return Err(bad("an accumulator object has exactly one field".into()));
        }
        let (op, argument) = spec.iter().next().expect("one field");
        let kind = match op.as_str() {
            "$sum" => Kind::Sum,
            "$avg" => Kind::Avg,
            "$count" => Kind::Count,
            "$min" => Kind::Min,
            "$max" => Kind::Max,
            "$addToSet" => Kind::AddToSet,
            "$first" => Kind::First,
            "$last" => Kind::Last,
            "$push" | "$mergeObjects" | "$stdDevPop" | "$stdDevSamp" | "$top" | "$bottom" | "$topN" | "$bottomN"
            | "$firstN" | "$lastN" | "$maxN" | "$minN" | "$median" | "$percentile" | "$accumulator" => {
                return Err(PipelineError::UnsupportedOperator { operator: op.clone(), stage: "$group".into() });
            }
            other => return Err(bad(format!("unknown accumulator {other}"))),
        };
        let expression = match kind {
            Kind::Count => {
                if !matches!(argument, Bson::Document(d) if d.is_empty()) {
                    return Err(bad("$count takes no argument: {\"$count\": {}}".into()));
                }
                Expression::Literal(Bson::Int32(1))
            }
            _ => Expression::parse(argument, "$group")?,
        };
        Ok(Accumulator { kind, expression })
    }
}

/// Numbers summed exactly: integers as one wide integer, doubles as a multiset.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sum {
    ints: i128,
    longs: i64,
    numbers: i64,
    doubles: BTreeMap<u64, i64>,
}

impl Sum {
    fn change(&mut self, value: &Bson, by: i64) {
        match value {
            Bson::Int32(i) => self.ints += i128::from(*i) * i128::from(by),
            Bson::Int64(i) => {
                self.ints += i128::from(*i) * i128::from(by);
                self.longs += by;
            }
            other => match Num::of(other) {
                // Doubles (and decimals, summed as doubles).
                Some(n) => {
                    let f = match n {
                        Num::Float(f) => f,
                        Num::Int(i, _) => i as f64,
                    };
                    let count = self.doubles.entry(f.to_bits()).or_insert(0);
                    *count += by;
                    if *count == 0 {
                        self.doubles.remove(&f.to_bits());
                    }
                }
                None => return,
            },
        }
        self.numbers += by;
    }

    fn total(&self) -> Bson {
        if self.doubles.is_empty() {
            if let (0, Ok(small)) = (self.longs, i32::try_from(self.ints)) {
                return Bson::Int32(small);
            }
            if let Ok(long) = i64::try_from(self.ints) {
                return Bson::Int64(long);
            }
        }
        Bson::Double(
            self.ints as f64 + self.doubles.iter().map(|(bits, n)| f64::from_bits(*bits) * *n as f64).sum::<f64>(),
        )
    }

    fn average(&self) -> Bson {
        if self.numbers == 0 {
            return Bson::Null;
        }
        let total = match self.total() {
            Bson::Int32(i) => f64::from(i),
            Bson::Int64(i) => i as f64,
            Bson::Double(f) => f,
            _ => return Bson::Null,
        };
        Bson::Double(total / self.numbers as f64)
    }
}

/// What an accumulator holds for one group.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// `$sum`, `$avg`.
    Sum(Sum),
    /// `$count`.
    Count(i64),
    /// `$min`, `$max`, `$addToSet`: values and how many documents gave each.
    Values(BTreeMap<Exact, i64>),
    /// `$first`, `$last`: each document's value by its rank.
    Ranked(BTreeMap<Rank, Bson>),
}

impl State {
    /// The state of accumulator `kind` holding nothing.
    pub fn empty(kind: Kind) -> State {
        match kind {
            Kind::Sum | Kind::Avg => State::Sum(Sum::default()),
            Kind::Count => State::Count(0),
            Kind::Min | Kind::Max | Kind::AddToSet => State::Values(BTreeMap::new()),
            Kind::First | Kind::Last => State::Ranked(BTreeMap::new()),
        }
    }

    /// Takes a document's value in (`by` = 1) or out (`by` = -1); `rank` places it in the
    /// group's order.
    pub fn change(&mut self, kind: Kind, value: &Option<Bson>, rank: &Rank, by: i64) {
        match self {
            State::Sum(sum) => {
                if let Some(value) = value {
                    sum.change(value, by);
                }
            }
            State::Count(n) => *n += by,
            State::Values(values) => {
                let counted = match (kind, value) {
                    (_, None) => false,
                    // $min and $max ignore nulls; $addToSet keeps them.
                    (Kind::Min | Kind::Max, Some(Bson::Null | Bson::Undefined)) => false,
                    _ => true,
                };
                if counted {
                    let key = Exact(value.clone().expect("counted"));
                    let count = values.entry(key.clone()).or_insert(0);
                    *count += by;
                    if *count <= 0 {
                        values.remove(&key);
                    }
                }
            }
            State::Ranked(ranked) => {
                if by > 0 {
                    ranked.insert(rank.clone(), value.clone().unwrap_or(Bson::Null));
                } else {
                    ranked.remove(rank);
                }
            }
        }
    }

    /// The accumulated value.
    pub fn value(&self, kind: Kind) -> Bson {
        match self {
            State::Sum(sum) if kind == Kind::Avg => sum.average(),
            State::Sum(sum) => sum.total(),
            State::Count(n) => i32::try_from(*n).map_or(Bson::Int64(*n), Bson::Int32),
            State::Values(values) => match kind {
                Kind::Min => values.keys().next().map_or(Bson::Null, |v| v.0.clone()),
                Kind::Max => values.keys().next_back().map_or(Bson::Null, |v| v.0.clone()),
                _ => {
                    // Distinct in MongoDB's sense: of equal values (1 and 1.0), the first.
                    let mut distinct: Vec<Bson> = Vec::with_capacity(values.len());
                    for value in values.keys() {
                        if distinct.last().is_none_or(|last| compare_values(last, &value.0) != Ordering::Equal) {
                            distinct.push(value.0.clone());
                        }
                    }
                    Bson::Array(distinct)
                }
            },
            State::Ranked(ranked) => {
                let pick = if kind == Kind::First { ranked.values().next() } else { ranked.values().next_back() };
                pick.cloned().unwrap_or(Bson::Null)
            }
        }
    }
}
