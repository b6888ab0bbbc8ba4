//! The query index of one grid worker: finds the queries a written document may match
//! without evaluating every query.
//!
//! Queries are filed under their [`IndexPlan`]: equality plans in a hash table per path
//! (value hash → queries), range plans in sorted lists per path and BSON type, and queries
//! with no usable predicate in a scan list. For a document, the index returns the *candidate*
//! queries: those whose plan the document meets, plus every scan query. Candidates are then
//! evaluated in full; the index only has to never miss a match (see `IndexPlan::admits`).
//!
//! Which keys a plan and a document have, and when a document's values meet a range, is the
//! matcher's rule ([`livegrid_matcher::index_plan`]); this module holds only the tables that
//! find them fast.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::cmp::Ordering;

use bson::{Bson, Document};
use livegrid_matcher::index_plan::{Span, document_values, equality_key, equality_keys, range_rank};
use livegrid_matcher::{Bound, FieldPath, IndexPlan, compare_values};

/// A registered query, as the index knows it.
pub type QueryKey = u64;

/// The index of the queries of one worker, by namespace.
#[derive(Default)]
pub struct QueryIndex {
    namespaces: HashMap<String, NamespaceIndex>,
}

#[derive(Default)]
struct NamespaceIndex {
    /// Path → equality key → queries.
    equality: HashMap<FieldPath, HashMap<u64, Bucket>>,
    /// (Path, range rank) → ranges.
    ranges: HashMap<(FieldPath, u8), RangeList>,
    scan: HashSet<QueryKey>,
}

impl QueryIndex {
    /// Files `query` of namespace `ns` under `plan`.
    pub fn insert(&mut self, ns: &str, query: QueryKey, plan: &IndexPlan) {
        let index = self.namespaces.entry(ns.to_string()).or_default();
        index.insert(query, plan);
    }

    /// Removes `query` filed under `plan` (the same plan it was inserted with).
    pub fn remove(&mut self, ns: &str, query: QueryKey, plan: &IndexPlan) {
        if let Some(index) = self.namespaces.get_mut(ns) {
            index.remove(query, plan);
            if index.is_empty() {
                self.namespaces.remove(ns);
            }
        }
    }

    /// Appends to `out` the queries `doc` may match (with repeats; callers deduplicate).
    pub fn candidates(&mut self, ns: &str, doc: &Document, out: &mut Vec<QueryKey>) {
        let Some(index) = self.namespaces.get_mut(ns) else { return };
        for (path, buckets) in &index.equality {
            document_values(path, doc, |v| {
                if let Some(bucket) = buckets.get(&equality_key(v)) {
                    out.extend_from_slice(bucket.as_slice());
                }
                false
            });
        }
        for ((path, rank), list) in &mut index.ranges {
            if let Some(span) = Span::of(path, doc, *rank) {
                list.candidates(span, out);
            }
        }
        out.extend(index.scan.iter().copied());
    }
}

impl NamespaceIndex {
    fn insert(&mut self, query: QueryKey, plan: &IndexPlan) {
        match plan {
            IndexPlan::Equality { path, values } => {
                let buckets = self.equality.entry(path.clone()).or_default();
                for key in equality_keys(values) {
                    buckets.entry(key).and_modify(|b| b.push(query)).or_insert(Bucket::One(query));
                }
            }
            IndexPlan::Range { path, lower, upper } => {
                let rank = range_rank(lower.as_ref(), upper.as_ref()).expect("a range has a bound");
                self.ranges.entry((path.clone(), rank)).or_default().insert(query, lower.clone(), upper.clone());
            }
            IndexPlan::Union(plans) => plans.iter().for_each(|p| self.insert(query, p)),
            IndexPlan::Scan => {
                self.scan.insert(query);
            }
        }
    }

    fn remove(&mut self, query: QueryKey, plan: &IndexPlan) {
        match plan {
            IndexPlan::Equality { path, values } => {
                if let Some(buckets) = self.equality.get_mut(path) {
                    for key in equality_keys(values) {
                        if let Some(bucket) = buckets.get_mut(&key)
                            && bucket.remove(query)
                        {
                            buckets.remove(&key);
                        }
                    }
                    if buckets.is_empty() {
                        self.equality.remove(path);
                    }
                }
            }
            IndexPlan::Range { path, lower, upper } => {
                let rank = range_rank(lower.as_ref(), upper.as_ref()).expect("a range has a bound");
                if let Some(list) = self.ranges.get_mut(&(path.clone(), rank)) {
                    list.remove(query);
                    if list.is_empty() {
                        self.ranges.remove(&(path.clone(), rank));
                    }
                }
            }
            IndexPlan::Union(plans) => plans.iter().for_each(|p| self.remove(query, p)),
            IndexPlan::Scan => {
                self.scan.remove(&query);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.equality.is_empty() && self.ranges.is_empty() && self.scan.is_empty()
    }
}

/// The queries filed under one value: most values name one query, kept inline (16 bytes).
enum Bucket {
    One(QueryKey),
    #[expect(
        clippy::box_collection,
        reason = "a thin pointer keeps every bucket at 16 bytes; few hold more than one query"
    )]
    Many(Box<Vec<QueryKey>>),
}

impl Bucket {
    fn as_slice(&self) -> &[QueryKey] {
        match self {
            Bucket::One(q) => std::slice::from_ref(q),
            Bucket::Many(qs) => qs,
        }
    }

    fn push(&mut self, query: QueryKey) {
        match self {
            Bucket::One(q) => *self = Bucket::Many(Box::new(vec![*q, query])),
            Bucket::Many(qs) => qs.push(query),
        }
    }

    /// Removes `query`; returns whether the bucket is now empty.
    fn remove(&mut self, query: QueryKey) -> bool {
        match self {
            Bucket::One(q) => *q == query,
            Bucket::Many(qs) => {
                qs.retain(|q| *q != query);
                if let [only] = qs[..] {
                    *self = Bucket::One(only);
                }
                qs_is_empty(self)
            }
        }
    }
}

fn qs_is_empty(bucket: &Bucket) -> bool {
    matches!(bucket, Bucket::Many(qs) if qs.is_empty())
}

/// Range plans on one path and type: lower-only ranges sorted by lower bound, upper-only
/// ranges sorted by upper bound, two-sided ranges sorted by lower bound under a segment tree
/// of their largest upper bounds, so that finding the ranges a value falls in costs
/// O(k log n) for k ranges found. New ranges wait in a short unsorted list until it is worth
/// re-sorting; removed ones are skipped until then.
#[derive(Default)]
struct RangeList {
    lower_only: Vec<(RangeKey, QueryKey)>,
    upper_only: Vec<(RangeKey, QueryKey)>,
    both: Vec<(RangeKey, RangeKey, QueryKey)>,
    /// Segment tree over `both`: node i holds the index of the entry with the largest upper
    /// bound below it; leaves start at `leaves`.
    max_upper: Vec<u32>,
    leaves: usize,
    pending: Vec<(Option<Bound>, Option<Bound>, QueryKey)>,
    removed: HashSet<QueryKey>,
    len: usize,
}

impl RangeList {
    fn insert(&mut self, query: QueryKey, lower: Option<Bound>, upper: Option<Bound>) {
        self.removed.remove(&query);
        self.pending.push((lower, upper, query));
        self.len += 1;
    }

    fn remove(&mut self, query: QueryKey) {
        self.removed.insert(query);
        self.len = self.len.saturating_sub(1);
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn sorted_len(&self) -> usize {
        self.lower_only.len() + self.upper_only.len() + self.both.len()
    }

    /// Folds pending ranges and removals into the sorted lists.
    fn rebuild(&mut self) {
        let removed = std::mem::take(&mut self.removed);
        let keep = |q: &QueryKey| !removed.contains(q);
        self.lower_only.retain(|(_, q)| keep(q));
        self.upper_only.retain(|(_, q)| keep(q));
        self.both.retain(|(_, _, q)| keep(q));
        for (lower, upper, query) in self.pending.drain(..) {
            if !keep(&query) {
                continue;
            }
            let low = |b: Bound| RangeKey::of(&b.value, Round::Down);
            let high = |b: Bound| RangeKey::of(&b.value, Round::Up);
            match (lower, upper) {
                (Some(l), Some(u)) => self.both.push((low(l), high(u), query)),
                (Some(l), None) => self.lower_only.push((low(l), query)),
                (None, Some(u)) => self.upper_only.push((high(u), query)),
                (None, None) => unreachable!("a range has a bound"),
            }
        }
        self.lower_only.sort_by(|a, b| a.0.cmp(&b.0));
        self.upper_only.sort_by(|a, b| a.0.cmp(&b.0));
        self.both.sort_by(|a, b| a.0.cmp(&b.0));
        self.build_tree();
    }

    fn build_tree(&mut self) {
        self.leaves = self.both.len().next_power_of_two().max(1);
        self.max_upper = vec![u32::MAX; 2 * self.leaves];
        for i in 0..self.both.len() {
            self.max_upper[self.leaves + i] = i as u32;
        }
        for node in (1..self.leaves).rev() {
            self.max_upper[node] = self.larger_upper(self.max_upper[2 * node], self.max_upper[2 * node + 1]);
        }
    }

    fn larger_upper(&self, a: u32, b: u32) -> u32 {
        match (a, b) {
            (u32::MAX, x) | (x, u32::MAX) => x,
            (a, b) if self.both[a as usize].1 < self.both[b as usize].1 => b,
            (a, _) => a,
        }
    }

    /// Collects the entries of `both` below `node` with index under `end` and upper bound at
    /// least `min`.
    fn stab(&self, node: usize, span: (usize, usize), end: usize, min: &RangeKey, out: &mut Vec<QueryKey>) {
        let best = self.max_upper[node];
        if span.0 >= end || best == u32::MAX || self.both[best as usize].1 < *min {
            return;
        }
        if node >= self.leaves {
            let q = self.both[best as usize].2;
            if !self.removed.contains(&q) {
                out.push(q);
            }
            return;
        }
        let mid = (span.0 + span.1) / 2;
        self.stab(2 * node, (span.0, mid), end, min, out);
        self.stab(2 * node + 1, (mid, span.1), end, min, out);
    }

    /// Ranges that a document's values spanning `span` may meet: the sorted lists assume
    /// inclusive bounds and round outward, so they find a superset of those it meets;
    /// pending ranges are checked exactly.
    fn candidates(&mut self, span: Span<'_>, out: &mut Vec<QueryKey>) {
        if self.pending.len() + self.removed.len() > 16 + self.sorted_len() / 8 {
            self.rebuild();
        }
        let (min_key, max_key) = (RangeKey::of(span.min, Round::Down), RangeKey::of(span.max, Round::Up));
        let end = self.lower_only.partition_point(|(l, _)| *l <= max_key);
        out.extend(self.lower_only[..end].iter().map(|(_, q)| *q).filter(|q| !self.removed.contains(q)));
        let start = self.upper_only.partition_point(|(u, _)| *u < min_key);
        out.extend(self.upper_only[start..].iter().map(|(_, q)| *q).filter(|q| !self.removed.contains(q)));
        let end = self.both.partition_point(|(l, _, _)| *l <= max_key);
        if end > 0 {
            self.stab(1, (0, self.leaves), end, &min_key, out);
        }
        for (lower, upper, q) in &self.pending {
            if span.meets(lower.as_ref(), upper.as_ref()) && !self.removed.contains(q) {
                out.push(*q);
            }
        }
    }
}

/// A range bound (or a document's value) in a compact form for the sorted lists: numbers as
/// doubles rounded outward by one unit in the last place (so that rounding never loses a
/// candidate), strings as text, anything else boxed. Keys are compared only with keys of the
/// same BSON type.
#[derive(Debug, Clone)]
enum RangeKey {
    Number(f64),
    Text(Box<str>),
    Other(Box<Bson>),
}

#[derive(Debug, Clone, Copy)]
enum Round {
    Down,
    Up,
}

impl RangeKey {
    fn of(value: &Bson, round: Round) -> RangeKey {
        if let Some(f) = livegrid_matcher::bson_order::number_as_f64(value) {
            return RangeKey::Number(match round {
                Round::Down => f.next_down(),
                Round::Up => f.next_up(),
            });
        }
        match value {
            Bson::String(s) | Bson::Symbol(s) => RangeKey::Text(s.as_str().into()),
            other => RangeKey::Other(Box::new(other.clone())),
        }
    }
}

impl Ord for RangeKey {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (RangeKey::Number(a), RangeKey::Number(b)) => a.total_cmp(b),
            (RangeKey::Text(a), RangeKey::Text(b)) => a.as_bytes().cmp(b.as_bytes()),
            (RangeKey::Other(a), RangeKey::Other(b)) => compare_values(a, b),
            // Lists hold one type; a mismatch cannot happen, order it anyway.
            (a, b) => a.rank().cmp(&b.rank()),
        }
    }
}

impl RangeKey {
    fn rank(&self) -> u8 {
        match self {
            RangeKey::Number(_) => 0,
            RangeKey::Text(_) => 1,
            RangeKey::Other(_) => 2,
        }
    }
}

impl PartialOrd for RangeKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for RangeKey {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for RangeKey {}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;
    use livegrid_matcher::Filter;
    use proptest::prelude::*;

    fn scalar() -> impl Strategy<Value = Bson> {
        prop_oneof![
            (-5i32..5).prop_map(Bson::Int32),
            (-5i32..5).prop_map(|i| Bson::Double(f64::from(i) + 0.5)),
            prop_oneof![Just("a"), Just("b"), Just("c")].prop_map(|s| Bson::String(s.into())),
            // Where doubles cannot hold every integer: rounding must never lose a candidate.
            (-3i64..3).prop_map(|d| Bson::Int64((1i64 << 53) + d)),
            (0i64..3).prop_map(|d| Bson::Int64(i64::MAX - d)),
            Just(Bson::Double(9007199254740992.0)),
            Just(Bson::Double(9.223372036854776e18)),
        ]
    }

    fn filter() -> impl Strategy<Value = Document> {
        let op = prop_oneof![Just("$gt"), Just("$gte"), Just("$lt"), Just("$lte")];
        let leaf = prop_oneof![
            (prop_oneof![Just("a"), Just("b")], scalar()).prop_map(|(f, v)| doc! {f: v}),
            (prop_oneof![Just("a"), Just("b")], op.clone(), scalar()).prop_map(|(f, o, v)| doc! {f: {o: v}}),
            (op.clone(), scalar(), op, scalar()).prop_map(|(o1, v1, o2, v2)| doc! {"a": {o1: v1, o2: v2}}),
            (prop::collection::vec(scalar(), 1..3)).prop_map(|vs| doc! {"b": {"$in": vs}}),
            Just(doc! {"a": {"$exists": true}}),
        ];
        prop_oneof![leaf.clone(), prop::collection::vec(leaf, 1..3).prop_map(|fs| doc! {"$or": fs})]
    }

    fn document() -> impl Strategy<Value = Document> {
        (
            prop::option::of(scalar()),
            prop::option::of(prop_oneof![scalar(), prop::collection::vec(scalar(), 0..3).prop_map(Bson::Array)]),
        )
            .prop_map(|(a, b)| {
                let mut d = doc! {"_id": 1};
                if let Some(a) = a {
                    d.insert("a", a);
                }
                if let Some(b) = b {
                    d.insert("b", b);
                }
                d
            })
    }

    proptest! {
        /// The index never misses a query that matches, with insertions and removals mixed.
        #[test]
        fn candidates_include_every_match(filters in prop::collection::vec(filter(), 1..60), removed in prop::collection::vec(any::<bool>(), 60), docs in prop::collection::vec(document(), 1..10)) {
            let compiled: Vec<Filter> = filters.iter().map(|f| Filter::parse(f).unwrap()).collect();
            let mut index = QueryIndex::default();
            for (i, f) in compiled.iter().enumerate() {
                index.insert("db.c", i as u64, &f.index_plan());
            }
            for (i, f) in compiled.iter().enumerate() {
                if removed[i] {
                    index.remove("db.c", i as u64, &f.index_plan());
                }
            }
            for d in &docs {
                let mut out = Vec::new();
                index.candidates("db.c", d, &mut out);
                for (i, f) in compiled.iter().enumerate() {
                    if !removed[i] && f.matches(d) {
                        prop_assert!(out.contains(&(i as u64)), "query {:?} matches {:?} but is not a candidate", filters[i], d);
                    }
                    if removed[i] {
                        prop_assert!(!out.contains(&(i as u64)), "removed query {} is a candidate", i);
                    }
                }
                let mut other = Vec::new();
                index.candidates("db.other", d, &mut other);
                prop_assert!(other.is_empty());
            }
        }
    }
}
