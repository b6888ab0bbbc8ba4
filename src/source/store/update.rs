//! MongoDB update operators applied to a document: `$set $unset $inc $mul $min $max $rename
//! $push $pull $addToSet $pop $currentDate`. An update either consists of operators only or is
//! a replacement document; `_id` cannot change. Errors name the operator and the path, and a
//! failed update changes nothing (it works on a copy).

use bson::{Bson, Document, doc};
use livegrid_matcher::{Filter, compare_values, values_equal};

use crate::source::document_path::{self, PathError, get, unset};

/// Why an update was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpdateError {
    /// The update document is malformed.
    #[error("bad update: {0}")]
    Malformed(String),
    /// An operator cannot apply to the value at its path.
    #[error("{op} at {path}: {reason}")]
    Operator {
        /// The operator.
        op: String,
        /// The path.
        path: String,
        /// Why.
        reason: String,
    },
}

fn op_error(op: &str, path: &str, reason: impl Into<String>) -> UpdateError {
    UpdateError::Operator { op: op.to_string(), path: path.to_string(), reason: reason.into() }
}

/// The update operators this store applies.
pub const OPERATORS: &[&str] = &[
    "$set",
    "$unset",
    "$inc",
    "$mul",
    "$min",
    "$max",
    "$rename",
    "$currentDate",
    "$push",
    "$addToSet",
    "$pull",
    "$pop",
];

/// How far a positional `$set` may pad an array with nulls, as in MongoDB.
pub use crate::source::document_path::MAX_PADDING;

/// Checks an operator update's shape and paths without applying it: known operators,
/// documents of fields, field paths of at most [`livegrid_matcher::MAX_PATH_COMPONENTS`]
/// non-empty components, no `_id`. Cheap, so it runs before a write is queued.
pub fn validate(update: &Document) -> Result<(), UpdateError> {
    if update.is_empty() {
        return Err(UpdateError::Malformed("empty update".into()));
    }
    for (op, arg) in update {
        if !op.starts_with('$') {
            return Err(UpdateError::Malformed(format!("cannot mix operators and fields ({})", shorten(op))));
        }
        if !OPERATORS.contains(&op.as_str()) {
            return Err(UpdateError::Malformed(format!("unknown update operator {}", shorten(op))));
        }
        let Bson::Document(fields) = arg else {
            return Err(op_error(op, "(top level)", "needs a document of fields"));
        };
        for (path, value) in fields {
            check_path(op, path)?;
            if path == "_id" || path.starts_with("_id.") {
                return Err(op_error(op, path, "cannot modify _id"));
            }
            if op == "$rename" {
                let Bson::String(to) = value else { return Err(op_error(op, path, "the new name must be a string")) };
                check_path(op, to)?;
                if to == "_id" || to.starts_with("_id.") {
                    return Err(op_error(op, to, "cannot modify _id"));
                }
            }
        }
    }
    Ok(())
}

fn check_path(op: &str, path: &str) -> Result<(), UpdateError> {
    let components = path.split('.').count();
    if components > livegrid_matcher::MAX_PATH_COMPONENTS {
        return Err(op_error(
            op,
            &shorten(path),
            format!(
                "field path has {components} components; at most {} are allowed",
                livegrid_matcher::MAX_PATH_COMPONENTS
            ),
        ));
    }
    if path.is_empty() || path.split('.').any(|p| p.is_empty() || p.starts_with('$')) {
        return Err(op_error(op, &shorten(path), "invalid field path"));
    }
    Ok(())
}

fn path_error(op: &str, path: &str, error: PathError) -> UpdateError {
    let path = if matches!(error, PathError::Backfill) { shorten(path) } else { path.to_string() };
    UpdateError::Operator { op: op.to_string(), path, reason: error.to_string() }
}

/// A path or name cut to a length fit for an error message.
fn shorten(text: &str) -> String {
    if text.len() <= 64 {
        return text.to_string();
    }
    let cut: String = text.chars().take(64).collect();
    format!("{cut}...")
}

/// Whether an update document uses operators (`{$set: ...}`) rather than replacing.
pub fn is_operator_update(update: &Document) -> bool {
    update.keys().next().is_some_and(|k| k.starts_with('$'))
}

/// Applies `update` (operators only) to `doc`, returning the new document.
pub fn apply(doc: &Document, update: &Document) -> Result<Document, UpdateError> {
    validate(update)?;
    let mut out = doc.clone();
    // Null elements this update may still add to pad arrays, over all its paths together: one
    // element costs far more in memory than in BSON, so the 16 MiB check alone does not bound it.
    let mut padding = MAX_PADDING;
    for (op, arg) in update {
        let Bson::Document(fields) = arg else {
            return Err(op_error(op, "(top level)", "needs a document of fields"));
        };
        if !op.starts_with('$') {
            return Err(UpdateError::Malformed(format!("cannot mix operators and fields ({op})")));
        }
        for (path, value) in fields {
            if path == "_id" || path.starts_with("_id.") {
                return Err(op_error(op, path, "cannot modify _id"));
            }
            apply_one(&mut out, op, path, value, &mut padding)?;
        }
    }
    Ok(out)
}

fn apply_one(doc: &mut Document, op: &str, path: &str, value: &Bson, padding: &mut usize) -> Result<(), UpdateError> {
    let mut set = |doc: &mut Document, path: &str, value: Bson, op: &str| {
        document_path::set_padded(doc, path, value, padding).map_err(|e| path_error(op, path, e))
    };
    match op {
        "$set" => set(doc, path, value.clone(), op),
        "$unset" => {
            unset(doc, path);
            Ok(())
        }
        "$inc" | "$mul" => {
            let current = get(doc, path);
            let result = arithmetic(op, path, current, value)?;
            set(doc, path, result, op)
        }
        "$min" | "$max" => {
            let replace = match get(doc, path) {
                None => true,
                Some(current) => {
                    let ord = compare_values(value, current);
                    if op == "$min" { ord.is_lt() } else { ord.is_gt() }
                }
            };
            if replace { set(doc, path, value.clone(), op) } else { Ok(()) }
        }
        "$rename" => {
            let Bson::String(to) = value else { return Err(op_error(op, path, "the new name must be a string")) };
            if let Some(v) = get(doc, path).cloned() {
                unset(doc, path);
                set(doc, to, v, op)?;
            }
            Ok(())
        }
        "$currentDate" => {
            let now = match value {
                Bson::Boolean(true) => Bson::DateTime(bson::DateTime::now()),
                Bson::Document(d) if d.get_str("$type").ok() == Some("date") => Bson::DateTime(bson::DateTime::now()),
                Bson::Document(d) if d.get_str("$type").ok() == Some("timestamp") => {
                    let secs = bson::DateTime::now().timestamp_millis() / 1000;
                    Bson::Timestamp(bson::Timestamp { time: secs as u32, increment: 1 })
                }
                _ => return Err(op_error(op, path, "expects true or {$type: \"date\"|\"timestamp\"}")),
            };
            set(doc, path, now, op)
        }
        "$push" | "$addToSet" => {
            let (items, each) = match value {
                Bson::Document(d) if d.contains_key("$each") => match d.get("$each") {
                    Some(Bson::Array(items)) => (items.clone(), true),
                    _ => return Err(op_error(op, path, "$each needs an array")),
                },
                v => (vec![v.clone()], false),
            };
            let _ = each;
            let mut array = match get(doc, path) {
                None => Vec::new(),
                Some(Bson::Array(a)) => a.clone(),
                Some(_) => return Err(op_error(op, path, "the field is not an array")),
            };
            for item in items {
                if op == "$push" || !array.iter().any(|x| values_equal(x, &item)) {
                    array.push(item);
                }
            }
            set(doc, path, Bson::Array(array), op)
        }
        "$pull" => {
            let Some(current) = get(doc, path) else { return Ok(()) };
            let Bson::Array(array) = current else { return Err(op_error(op, path, "the field is not an array")) };
            // A condition ({$gt: 5}, or fields of document elements) or a value to remove.
            let condition = match value {
                Bson::Document(d) if !d.is_empty() => {
                    let operator_form = d.keys().next().is_some_and(|k| k.starts_with('$'));
                    let filter = if operator_form {
                        doc! {"v": d.clone()}
                    } else {
                        d.clone()
                    };
                    Some((Filter::parse(&filter).map_err(|e| op_error(op, path, e.to_string()))?, operator_form))
                }
                _ => None,
            };
            let kept: Vec<Bson> = array
                .iter()
                .filter(|item| match &condition {
                    Some((filter, true)) => !filter.matches(&doc! {"v": (*item).clone()}),
                    Some((filter, false)) => !matches!(item, Bson::Document(d) if filter.matches(d)),
                    None => !values_equal(item, value),
                })
                .cloned()
                .collect();
            set(doc, path, Bson::Array(kept), op)
        }
        "$pop" => {
            let from_front = match value {
                Bson::Int32(-1) | Bson::Int64(-1) => true,
                Bson::Int32(1) | Bson::Int64(1) => false,
                Bson::Double(d) if *d == -1.0 => true,
                Bson::Double(d) if *d == 1.0 => false,
                _ => return Err(op_error(op, path, "expects 1 or -1")),
            };
            match get(doc, path) {
                None => Ok(()),
                Some(Bson::Array(a)) => {
                    let mut a = a.clone();
                    if !a.is_empty() {
                        if from_front {
                            a.remove(0);
                        } else {
                            a.pop();
                        }
                    }
                    set(doc, path, Bson::Array(a), op)
                }
                Some(_) => Err(op_error(op, path, "the field is not an array")),
            }
        }
        other => Err(UpdateError::Malformed(format!("unknown update operator {other}"))),
    }
}

fn arithmetic(op: &str, path: &str, current: Option<&Bson>, operand: &Bson) -> Result<Bson, UpdateError> {
    let number = |v: &Bson| livegrid_matcher::bson_order::number_as_f64(v).is_some();
    if !number(operand) {
        return Err(op_error(op, path, "needs a number"));
    }
    let current = match current {
        None if op == "$inc" => return Ok(operand.clone()),
        None => &Bson::Int32(0),
        Some(c) if number(c) => c,
        Some(_) => return Err(op_error(op, path, "the field is not a number")),
    };
    let result = match (current, operand) {
        (Bson::Int32(a), Bson::Int32(b)) => {
            let r = if op == "$inc" { a.checked_add(*b) } else { a.checked_mul(*b) };
            r.map(Bson::Int32).unwrap_or_else(|| {
                Bson::Int64(if op == "$inc" { i64::from(*a) + i64::from(*b) } else { i64::from(*a) * i64::from(*b) })
            })
        }
        (Bson::Int32(_) | Bson::Int64(_), Bson::Int32(_) | Bson::Int64(_)) => {
            let (a, b) = (as_i64(current), as_i64(operand));
            let r = if op == "$inc" { a.checked_add(b) } else { a.checked_mul(b) };
            Bson::Int64(r.ok_or_else(|| op_error(op, path, "integer overflow"))?)
        }
        _ => {
            let (a, b) = (
                livegrid_matcher::bson_order::number_as_f64(current).expect("number"),
                livegrid_matcher::bson_order::number_as_f64(operand).expect("number"),
            );
            Bson::Double(if op == "$inc" { a + b } else { a * b })
        }
    };
    Ok(result)
}

fn as_i64(v: &Bson) -> i64 {
    match v {
        Bson::Int32(i) => i64::from(*i),
        Bson::Int64(i) => *i,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(d: Document, u: Document) -> Document {
        apply(&d, &u).unwrap()
    }

    #[test]
    fn set_unset_and_dotted_paths() {
        assert_eq!(
            up(doc! {"_id": 1, "a": 1}, doc! {"$set": {"b.c": 2, "a": 5}}),
            doc! {"_id": 1, "a": 5, "b": {"c": 2}}
        );
        assert_eq!(
            up(doc! {"_id": 1, "a": {"x": 1, "y": 2}}, doc! {"$unset": {"a.x": ""}}),
            doc! {"_id": 1, "a": {"y": 2}}
        );
        assert_eq!(up(doc! {"_id": 1, "a": [1, 2]}, doc! {"$set": {"a.1": 9}}), doc! {"_id": 1, "a": [1, 9]});
        assert!(apply(&doc! {"_id": 1, "a": 5}, &doc! {"$set": {"a.b": 1}}).is_err());
        assert!(apply(&doc! {"_id": 1}, &doc! {"$set": {"_id": 2}}).is_err());
    }

    #[test]
    fn arithmetic_and_comparisons() {
        assert_eq!(up(doc! {"n": 1}, doc! {"$inc": {"n": 2, "m": 5}}), doc! {"n": 3, "m": 5});
        assert_eq!(up(doc! {"n": i32::MAX}, doc! {"$inc": {"n": 1}}), doc! {"n": i64::from(i32::MAX) + 1});
        assert_eq!(up(doc! {"n": 2}, doc! {"$mul": {"n": 1.5, "z": 3}}), doc! {"n": 3.0, "z": 0});
        assert_eq!(up(doc! {"n": 5}, doc! {"$min": {"n": 3}, "$max": {"m": 1}}), doc! {"n": 3, "m": 1});
        assert_eq!(up(doc! {"n": 5}, doc! {"$max": {"n": 3}}), doc! {"n": 5});
        assert!(apply(&doc! {"n": "x"}, &doc! {"$inc": {"n": 1}}).is_err());
        assert!(apply(&doc! {"n": 1}, &doc! {"$inc": {"n": "x"}}).is_err());
    }

    #[test]
    fn arrays() {
        assert_eq!(up(doc! {"a": [1]}, doc! {"$push": {"a": 2}}), doc! {"a": [1, 2]});
        assert_eq!(up(doc! {}, doc! {"$push": {"a": {"$each": [1, 2]}}}), doc! {"a": [1, 2]});
        assert_eq!(up(doc! {"a": [1, 2]}, doc! {"$addToSet": {"a": {"$each": [2, 3]}}}), doc! {"a": [1, 2, 3]});
        assert_eq!(up(doc! {"a": [1, 5, 9]}, doc! {"$pull": {"a": {"$gte": 5}}}), doc! {"a": [1]});
        assert_eq!(up(doc! {"a": [1, 5, 1]}, doc! {"$pull": {"a": 1}}), doc! {"a": [5]});
        assert_eq!(up(doc! {"a": [{"x": 1}, {"x": 2}]}, doc! {"$pull": {"a": {"x": 2}}}), doc! {"a": [{"x": 1}]});
        assert_eq!(up(doc! {"a": [1, 2, 3]}, doc! {"$pop": {"a": -1}}), doc! {"a": [2, 3]});
        assert_eq!(up(doc! {"a": [1, 2, 3]}, doc! {"$pop": {"a": 1}}), doc! {"a": [1, 2]});
        assert!(apply(&doc! {"a": 1}, &doc! {"$push": {"a": 2}}).is_err());
    }

    #[test]
    fn rename_current_date_and_errors() {
        assert_eq!(up(doc! {"a": 1, "b": 2}, doc! {"$rename": {"a": "c"}}), doc! {"b": 2, "c": 1});
        let d = up(doc! {}, doc! {"$currentDate": {"at": true}});
        assert!(matches!(d.get("at"), Some(Bson::DateTime(_))));
        assert!(apply(&doc! {}, &doc! {}).is_err());
        assert!(apply(&doc! {}, &doc! {"$set": {"a": 1}, "b": 2}).is_err());
        assert!(apply(&doc! {}, &doc! {"$foo": {"a": 1}}).is_err());
    }

    #[test]
    fn mongodb_limits() {
        // Padding: allowed up to the limit, refused past it without allocating.
        let padded = up(doc! {"a": [1]}, doc! {"$set": {"a.3": 2}});
        assert_eq!(padded, doc! {"a": [1, null, null, 2]});
        let err = apply(&doc! {"a": [1]}, &doc! {"$set": {"a.1000000000": 1}}).unwrap_err();
        assert!(err.to_string().contains("can't backfill array to larger than 1500000 elements"), "{err}");
        // Padding adds up over all the paths of one update.
        let many: Document = (0..3).map(|i| (format!("a{i}.1000000"), Bson::Int32(1))).collect();
        let err = apply(&doc! {"a0": [], "a1": [], "a2": []}, &doc! {"$set": many}).unwrap_err();
        assert!(err.to_string().contains("can't backfill"), "{err}");
        assert!(apply(&doc! {"_id": 1, "a": 1}, &doc! {"$rename": {"a": "_id"}}).is_err());
        // An existing element may be set at any index.
        assert!(apply(&doc! {"a": [1]}, &doc! {"$set": {"a.0": 5}}).is_ok());
        // Paths: at most 100 components, reported without echoing the whole path.
        let deep = vec!["a"; 5_000].join(".");
        let err = validate(&doc! {"$set": {deep.as_str(): 1}}).unwrap_err();
        assert!(err.to_string().contains("5000 components"), "{err}");
        assert!(err.to_string().len() < 300);
        let ok = vec!["a"; 100].join(".");
        assert!(validate(&doc! {"$set": {ok.as_str(): 1}}).is_ok());
        assert!(validate(&doc! {"$rename": {"a": deep.as_str()}}).is_err());
        assert!(validate(&doc! {"$set": {"a..b": 1}}).is_err());
        assert!(validate(&doc! {"$where": {"a": 1}}).is_err());
    }
}
