//! MongoDB's total order over BSON values, and a hash that agrees with it.
//!
//! Values of different types compare by their canonical type (MinKey < undefined < null <
//! numbers < strings < documents < arrays < binary < ObjectId < booleans < dates < timestamps
//! < regexes < DBPointer < code < code with scope < MaxKey). Numbers of every width compare
//! by value: `1`, `1L`, `1.0` and `NumberDecimal("1")` are equal, and NaN sorts below every
//! other number. Documents compare element by element (type, then field name, then value),
//! so field order matters.
//!
//! Decimal128 values compare at double precision: two decimals that differ only beyond the
//! 15th significant digit compare equal.

use std::cmp::Ordering;
use std::hash::{Hash, Hasher};

use bson::{Bson, Document};

/// The rank of a value's type in MongoDB's canonical order; numbers share one rank, as do
/// strings and symbols.
pub fn canonical_rank(value: &Bson) -> u8 {
    match value {
        Bson::MinKey => 0,
        Bson::Undefined => 1,
        Bson::Null => 2,
        Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_) => 3,
        Bson::String(_) | Bson::Symbol(_) => 4,
        Bson::Document(_) => 5,
        Bson::Array(_) => 6,
        Bson::Binary(_) => 7,
        Bson::ObjectId(_) => 8,
        Bson::Boolean(_) => 9,
        Bson::DateTime(_) => 10,
        Bson::Timestamp(_) => 11,
        Bson::RegularExpression(_) => 12,
        Bson::DbPointer(_) => 13,
        Bson::JavaScriptCode(_) => 14,
        Bson::JavaScriptCodeWithScope(_) => 15,
        Bson::MaxKey => 16,
    }
}

/// A number of any BSON width, as far as ordering is concerned.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Number {
    Int(i64),
    Float(f64),
}

impl Number {
    pub(crate) fn of(value: &Bson) -> Option<Number> {
        match value {
            Bson::Int32(i) => Some(Number::Int(i64::from(*i))),
            Bson::Int64(i) => Some(Number::Int(*i)),
            Bson::Double(f) => Some(Number::Float(*f)),
            Bson::Decimal128(d) => Some(Number::Float(decimal_to_f64(d))),
            _ => None,
        }
    }

    pub(crate) fn is_nan(self) -> bool {
        matches!(self, Number::Float(f) if f.is_nan())
    }

    pub(crate) fn as_f64(self) -> f64 {
        match self {
            Number::Int(i) => i as f64,
            Number::Float(f) => f,
        }
    }
}

/// The value of a number of any width as the nearest double; `None` for other types.
pub fn number_as_f64(value: &Bson) -> Option<f64> {
    Number::of(value).map(Number::as_f64)
}

/// Converts a Decimal128 to the nearest double (NaN and infinities included).
pub(crate) fn decimal_to_f64(d: &bson::Decimal128) -> f64 {
    let text = d.to_string();
    match text.as_str() {
        "NaN" | "-NaN" => f64::NAN,
        "Infinity" => f64::INFINITY,
        "-Infinity" => f64::NEG_INFINITY,
        _ => text.parse().unwrap_or(f64::NAN),
    }
}

/// Compares two numbers exactly; NaN equals NaN and is below every other number.
pub(crate) fn compare_numbers(a: Number, b: Number) -> Ordering {
    match (a, b) {
        (Number::Int(x), Number::Int(y)) => x.cmp(&y),
        (Number::Float(x), Number::Float(y)) => compare_floats(x, y),
        (Number::Int(x), Number::Float(y)) => compare_int_float(x, y),
        (Number::Float(x), Number::Int(y)) => compare_int_float(y, x).reverse(),
    }
}

fn compare_floats(x: f64, y: f64) -> Ordering {
    match (x.is_nan(), y.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        // -0.0 == 0.0 here, as in MongoDB.
        (false, false) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
    }
}

/// Exact comparison of an i64 with an f64, without the rounding of `i as f64`.
fn compare_int_float(i: i64, f: f64) -> Ordering {
    const TWO_63: f64 = 9_223_372_036_854_775_808.0;
    if f.is_nan() {
        return Ordering::Greater;
    }
    if f >= TWO_63 {
        return Ordering::Less;
    }
    if f < -TWO_63 {
        return Ordering::Greater;
    }
    let truncated = f.trunc();
    // In range, so the cast is exact.
    match i.cmp(&(truncated as i64)) {
        Ordering::Equal => 0.0f64.partial_cmp(&(f - truncated)).unwrap_or(Ordering::Equal),
        other => other,
    }
}

/// MongoDB's total order over BSON values.
pub fn compare_values(a: &Bson, b: &Bson) -> Ordering {
    let (ra, rb) = (canonical_rank(a), canonical_rank(b));
    if ra != rb {
        return ra.cmp(&rb);
    }
    match (a, b) {
        (Bson::String(x) | Bson::Symbol(x), Bson::String(y) | Bson::Symbol(y)) => x.as_bytes().cmp(y.as_bytes()),
        (Bson::Document(x), Bson::Document(y)) => compare_documents(x, y),
        (Bson::Array(x), Bson::Array(y)) => compare_arrays(x, y),
        (Bson::Binary(x), Bson::Binary(y)) => x
            .bytes
            .len()
            .cmp(&y.bytes.len())
            .then_with(|| u8::from(x.subtype).cmp(&u8::from(y.subtype)))
            .then_with(|| x.bytes.cmp(&y.bytes)),
        (Bson::ObjectId(x), Bson::ObjectId(y)) => x.bytes().cmp(&y.bytes()),
        (Bson::Boolean(x), Bson::Boolean(y)) => x.cmp(y),
        (Bson::DateTime(x), Bson::DateTime(y)) => x.timestamp_millis().cmp(&y.timestamp_millis()),
        (Bson::Timestamp(x), Bson::Timestamp(y)) => (x.time, x.increment).cmp(&(y.time, y.increment)),
        (Bson::RegularExpression(x), Bson::RegularExpression(y)) => {
            x.pattern.as_str().cmp(y.pattern.as_str()).then_with(|| x.options.as_str().cmp(y.options.as_str()))
        }
        (Bson::JavaScriptCode(x), Bson::JavaScriptCode(y)) => x.cmp(y),
        (Bson::JavaScriptCodeWithScope(x), Bson::JavaScriptCodeWithScope(y)) => {
            x.code.cmp(&y.code).then_with(|| compare_documents(&x.scope, &y.scope))
        }
        (Bson::DbPointer(x), Bson::DbPointer(y)) => format!("{x:?}").cmp(&format!("{y:?}")),
        _ => match (Number::of(a), Number::of(b)) {
            (Some(x), Some(y)) => compare_numbers(x, y),
            // MinKey, MaxKey, null and undefined: one value each.
            _ => Ordering::Equal,
        },
    }
}

/// Whether two values are equal in MongoDB's sense (`1 == 1.0`, field order matters).
#[inline]
pub fn values_equal(a: &Bson, b: &Bson) -> bool {
    // Same-type fast paths: the common case in filters, and exact.
    match (a, b) {
        (Bson::String(x), Bson::String(y)) => x == y,
        (Bson::Int32(x), Bson::Int32(y)) => x == y,
        (Bson::Int64(x), Bson::Int64(y)) => x == y,
        (Bson::Boolean(x), Bson::Boolean(y)) => x == y,
        (Bson::ObjectId(x), Bson::ObjectId(y)) => x == y,
        _ => canonical_rank(a) == canonical_rank(b) && compare_values(a, b) == Ordering::Equal,
    }
}

/// Compares documents element by element: canonical type, then field name, then value.
pub fn compare_documents(a: &Document, b: &Document) -> Ordering {
    let mut left = a.iter();
    let mut right = b.iter();
    loop {
        match (left.next(), right.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some((ka, va)), Some((kb, vb))) => {
                let ord = canonical_rank(va)
                    .cmp(&canonical_rank(vb))
                    .then_with(|| ka.as_bytes().cmp(kb.as_bytes()))
                    .then_with(|| compare_values(va, vb));
                if ord != Ordering::Equal {
                    return ord;
                }
            }
        }
    }
}

fn compare_arrays(a: &[Bson], b: &[Bson]) -> Ordering {
    for (va, vb) in a.iter().zip(b) {
        let ord = canonical_rank(va).cmp(&canonical_rank(vb)).then_with(|| compare_values(va, vb));
        if ord != Ordering::Equal {
            return ord;
        }
    }
    a.len().cmp(&b.len())
}

/// Feeds a value into a hasher so that values equal under [`values_equal`] hash alike:
/// numbers are normalised across widths, strings and symbols hash the same.
pub fn hash_value<H: Hasher>(value: &Bson, state: &mut H) {
    canonical_rank(value).hash(state);
    match value {
        Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_) => {
            hash_number(Number::of(value).expect("numeric"), state)
        }
        Bson::String(s) | Bson::Symbol(s) => s.hash(state),
        Bson::Document(d) => {
            d.len().hash(state);
            for (k, v) in d {
                k.hash(state);
                hash_value(v, state);
            }
        }
        Bson::Array(a) => {
            a.len().hash(state);
            for v in a {
                hash_value(v, state);
            }
        }
        Bson::Binary(b) => {
            u8::from(b.subtype).hash(state);
            b.bytes.hash(state);
        }
        Bson::ObjectId(o) => o.bytes().hash(state),
        Bson::Boolean(b) => b.hash(state),
        Bson::DateTime(d) => d.timestamp_millis().hash(state),
        Bson::Timestamp(t) => (t.time, t.increment).hash(state),
        Bson::RegularExpression(r) => {
            r.pattern.as_str().hash(state);
            r.options.as_str().hash(state);
        }
        Bson::JavaScriptCode(c) => c.hash(state),
        Bson::JavaScriptCodeWithScope(c) => c.code.hash(state),
        Bson::DbPointer(p) => format!("{p:?}").hash(state),
        Bson::MinKey | Bson::MaxKey | Bson::Null | Bson::Undefined => {}
    }
}

fn hash_number<H: Hasher>(n: Number, state: &mut H) {
    const TWO_63: f64 = 9_223_372_036_854_775_808.0;
    match n {
        Number::Int(i) => i.hash(state),
        Number::Float(f) if f.is_nan() => u64::MAX.hash(state),
        // Integral doubles hash as the integer they equal, so 1.0 and 1 meet.
        Number::Float(f) if f.fract() == 0.0 && (-TWO_63..TWO_63).contains(&f) => (f as i64).hash(state),
        Number::Float(f) => f.to_bits().hash(state),
    }
}

/// A 64-bit hash of a value that agrees with [`values_equal`]. It is the same in every
/// process and build (it places documents in write partitions across a cluster).
pub fn value_hash(value: &Bson) -> u64 {
    let mut hasher = rustc_hash::FxHasher::default();
    hash_value(value, &mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{bson, doc};

    #[test]
    fn numbers_compare_across_widths() {
        assert!(values_equal(&Bson::Int32(1), &Bson::Double(1.0)));
        assert!(values_equal(&Bson::Int64(1), &Bson::Decimal128("1.0".parse().unwrap())));
        assert_eq!(
            compare_values(&Bson::Int64(9007199254740993), &Bson::Double(9007199254740992.0)),
            Ordering::Greater
        );
        assert_eq!(compare_values(&Bson::Double(f64::NAN), &Bson::Int32(i32::MIN)), Ordering::Less);
        assert_eq!(compare_values(&Bson::Double(-0.0), &Bson::Int32(0)), Ordering::Equal);
        assert_eq!(compare_values(&Bson::Int64(i64::MAX), &Bson::Double(9.3e18)), Ordering::Less);
        assert_eq!(compare_values(&Bson::Int64(-5), &Bson::Double(-4.5)), Ordering::Less);
        assert_eq!(compare_values(&Bson::Int64(5), &Bson::Double(4.5)), Ordering::Greater);
    }

    #[test]
    fn type_order() {
        let ordered = [
            Bson::MinKey,
            Bson::Null,
            Bson::Int32(5),
            bson!("a"),
            bson!({"a": 1}),
            bson!([1]),
            Bson::ObjectId(bson::oid::ObjectId::new()),
            Bson::Boolean(false),
            Bson::DateTime(bson::DateTime::from_millis(0)),
            Bson::MaxKey,
        ];
        for w in ordered.windows(2) {
            assert_eq!(compare_values(&w[0], &w[1]), Ordering::Less, "{:?} < {:?}", w[0], w[1]);
        }
    }

    #[test]
    fn documents_compare_by_field_order() {
        let a = doc! {"x": 1, "y": 2};
        let b = doc! {"y": 2, "x": 1};
        assert_ne!(compare_documents(&a, &b), Ordering::Equal);
        assert!(values_equal(&bson!({"x": 1}), &bson!({"x": 1.0})));
        assert_eq!(value_hash(&bson!({"x": 1})), value_hash(&bson!({"x": 1.0})));
    }
}
