//! Aggregation expressions, the part of them group keys and accumulators use: field paths
//! (`"$a.b"`), `$$ROOT`, literals, object and array expressions, and the operators people
//! use there: date parts (`$year`, `$month`, `$dayOfMonth`, `$hour`, `$minute`, `$second`,
//! `$dayOfWeek`, `$dayOfYear`, in UTC), strings (`$toLower`, `$toUpper`, `$concat`),
//! conditionals (`$cond`, `$ifNull`), arithmetic (`$add`, `$subtract`, `$multiply`,
//! `$divide`, `$abs`), comparisons (`$eq`, `$ne`, `$gt`, `$gte`, `$lt`, `$lte`), logic
//! (`$and`, `$or`, `$not`) and `$literal`.
//!
//! Values are `Option<Bson>`: `None` is a missing field. A field path through an array
//! collects the values of its documents, as in MongoDB. Where MongoDB would fail the whole
//! aggregation on a value of the wrong type (a string given to `$year`, a division by zero),
//! the expression gives null instead: a live result cannot fail because of one document.

use std::cmp::Ordering;

use bson::{Bson, Document};

use super::PipelineError;
use crate::bson_order::{compare_values, number_as_f64};

/// A compiled expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expression {
    /// A constant.
    Literal(Bson),
    /// `$$ROOT`: the whole document.
    Root,
    /// `"$a.b"`: the components of a field path.
    Field(Vec<String>),
    /// `{k: expr, ...}`.
    Object(Vec<(String, Expression)>),
    /// `[expr, ...]`.
    Array(Vec<Expression>),
    /// An operator and its arguments.
    Op(Op, Vec<Expression>),
}

/// The operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `$year`.
    Year,
    /// `$month`.
    Month,
    /// `$dayOfMonth`.
    DayOfMonth,
    /// `$hour`.
    Hour,
    /// `$minute`.
    Minute,
    /// `$second`.
    Second,
    /// `$dayOfWeek`.
    DayOfWeek,
    /// `$dayOfYear`.
    DayOfYear,
    /// `$toLower`.
    ToLower,
    /// `$toUpper`.
    ToUpper,
    /// `$concat`.
    Concat,
    /// `$cond`.
    Cond,
    /// `$ifNull`.
    IfNull,
    /// `$add`.
    Add,
    /// `$subtract`.
    Subtract,
    /// `$multiply`.
    Multiply,
    /// `$divide`.
    Divide,
    /// `$abs`.
    Abs,
    /// `$eq`.
    Eq,
    /// `$ne`.
    Ne,
    /// `$gt`.
    Gt,
    /// `$gte`.
    Gte,
    /// `$lt`.
    Lt,
    /// `$lte`.
    Lte,
    /// `$and`.
    And,
    /// `$or`.
    Or,
    /// `$not`.
    Not,
}

impl Op {
    fn named(name: &str) -> Option<Op> {
        Some(match name {
            "$year" => Op::Year,
            "$month" => Op::Month,
            "$dayOfMonth" => Op::DayOfMonth,
            "$hour" => Op::Hour,
            "$minute" => Op::Minute,
            "$second" => Op::Second,
            "$dayOfWeek" => Op::DayOfWeek,
            "$dayOfYear" => Op::DayOfYear,
            "$toLower" => Op::ToLower,
            "$toUpper" => Op::ToUpper,
            "$concat" => Op::Concat,
            "$cond" => Op::Cond,
            "$ifNull" => Op::IfNull,
            "$add" => Op::Add,
            "$subtract" => Op::Subtract,
            "$multiply" => Op::Multiply,
            "$divide" => Op::Divide,
            "$abs" => Op::Abs,
            "$eq" => Op::Eq,
            "$ne" => Op::Ne,
            "$gt" => Op::Gt,
            "$gte" => Op::Gte,
            "$lt" => Op::Lt,
            "$lte" => Op::Lte,
            "$and" => Op::And,
            "$or" => Op::Or,
            "$not" => Op::Not,
            _ => return None,
        })
    }

    /// How many arguments it takes: exactly, or at least (`None`: any).
    fn arity(self) -> (usize, Option<usize>) {
        match self {
            Op::Year
            | Op::Month
            | Op::DayOfMonth
            | Op::Hour
            | Op::Minute
            | Op::Second
            | Op::DayOfWeek
            | Op::DayOfYear
            | Op::ToLower
            | Op::ToUpper
            | Op::Abs
            | Op::Not => (1, Some(1)),
            Op::Cond => (3, Some(3)),
            Op::Subtract | Op::Divide | Op::Eq | Op::Ne | Op::Gt | Op::Gte | Op::Lt | Op::Lte => (2, Some(2)),
            Op::IfNull => (2, None),
            Op::Concat | Op::Add | Op::Multiply | Op::And | Op::Or => (0, None),
        }
    }
}

/// Nesting allowed inside one expression.
const MAX_DEPTH: usize = 64;

impl Expression {
    /// Parses an expression as written in a stage (`stage` names it in errors).
    pub fn parse(value: &Bson, stage: &str) -> Result<Expression, PipelineError> {
        parse(value, stage, 0)
    }

    /// Whether the expression reads nothing of the document.
    pub fn is_constant(&self) -> bool {
        match self {
            Expression::Literal(_) => true,
            Expression::Root | Expression::Field(_) => false,
            Expression::Object(fields) => fields.iter().all(|(_, e)| e.is_constant()),
            Expression::Array(items) | Expression::Op(_, items) => items.iter().all(Expression::is_constant),
        }
    }

    /// Evaluates the expression on `doc`; `None` is missing.
    pub fn evaluate(&self, doc: &Document) -> Option<Bson> {
        match self {
            Expression::Literal(value) => Some(value.clone()),
            Expression::Root => Some(Bson::Document(doc.clone())),
            Expression::Field(path) => field(doc, path),
            Expression::Object(fields) => {
                let mut out = Document::new();
                for (key, expr) in fields {
                    // Missing values leave their field out, as in MongoDB.
                    if let Some(value) = expr.evaluate(doc) {
                        out.insert(key.clone(), value);
                    }
                }
                Some(Bson::Document(out))
            }
            Expression::Array(items) => {
                Some(Bson::Array(items.iter().map(|e| e.evaluate(doc).unwrap_or(Bson::Null)).collect()))
            }
            Expression::Op(op, args) => Some(apply(*op, args, doc)),
        }
    }
}

fn parse(value: &Bson, stage: &str, depth: usize) -> Result<Expression, PipelineError> {
    if depth > MAX_DEPTH {
        return Err(PipelineError::bad(stage, format!("expressions nest deeper than {MAX_DEPTH} levels")));
    }
    match value {
        Bson::String(s) if s == "$$ROOT" || s == "$$CURRENT" => Ok(Expression::Root),
        Bson::String(s) if s.starts_with("$$") => {
            Err(PipelineError::bad(stage, format!("variable {s} is not supported (only $$ROOT and $$CURRENT)")))
        }
        Bson::String(s) if s.starts_with('$') => {
            let path = &s[1..];
            if path.is_empty() || path.split('.').any(str::is_empty) {
                return Err(PipelineError::bad(stage, format!("bad field path {s:?}")));
            }
            crate::limits::check_path_components(path)?;
            Ok(Expression::Field(path.split('.').map(str::to_string).collect()))
        }
        Bson::Array(items) => {
            Ok(Expression::Array(items.iter().map(|v| parse(v, stage, depth + 1)).collect::<Result<_, _>>()?))
        }
        Bson::Document(doc) => {
            let operator = doc.keys().next().filter(|k| k.starts_with('$'));
            match operator {
                Some(name) => {
                    if doc.len() != 1 {
                        return Err(PipelineError::bad(
                            stage,
                            format!("an expression object with operator {name} must have exactly one field"),
                        ));
                    }
                    let argument = doc.get(name).expect("the key exists");
                    if name == "$literal" {
                        return Ok(Expression::Literal(argument.clone()));
                    }
                    let op = Op::named(name).ok_or_else(|| PipelineError::UnsupportedOperator {
                        operator: name.clone(),
                        stage: stage.to_string(),
                    })?;
                    let args = arguments(op, name, argument, stage, depth)?;
                    let (min, max) = op.arity();
                    if args.len() < min || max.is_some_and(|max| args.len() > max) {
                        let wanted = match max {
                            Some(max) if max == min => format!("{min}"),
                            _ => format!("at least {min}"),
                        };
                        return Err(PipelineError::bad(
                            stage,
                            format!("{name} takes {wanted} argument(s), found {}", args.len()),
                        ));
                    }
                    Ok(Expression::Op(op, args))
                }
                None => {
                    let mut fields = Vec::with_capacity(doc.len());
                    for (key, value) in doc {
                        if key.starts_with('$') {
                            return Err(PipelineError::bad(stage, format!("field name {key:?} cannot start with $")));
                        }
                        fields.push((key.clone(), parse(value, stage, depth + 1)?));
                    }
                    Ok(Expression::Object(fields))
                }
            }
        }
        other => Ok(Expression::Literal(other.clone())),
    }
}

/// An operator's arguments: an array of them, one value, or the named forms of `$cond` and
/// the date operators (`{date: ..., timezone: ...}`; only UTC).
fn arguments(op: Op, name: &str, argument: &Bson, stage: &str, depth: usize) -> Result<Vec<Expression>, PipelineError> {
    let one = |v: &Bson| parse(v, stage, depth + 1);
    match (op, argument) {
        (Op::Cond, Bson::Document(d)) if !d.keys().any(|k| k.starts_with('$')) => {
            let part =
                |k: &str| d.get(k).ok_or_else(|| PipelineError::bad(stage, format!("$cond needs {k}"))).and_then(one);
            if let Some(extra) = d.keys().find(|k| !["if", "then", "else"].contains(&k.as_str())) {
                return Err(PipelineError::bad(stage, format!("$cond has an unknown field {extra}")));
            }
            Ok(vec![part("if")?, part("then")?, part("else")?])
        }
        (
            Op::Year | Op::Month | Op::DayOfMonth | Op::Hour | Op::Minute | Op::Second | Op::DayOfWeek | Op::DayOfYear,
            Bson::Document(d),
        ) if d.contains_key("date") => {
            if let Some(zone) = d.get("timezone")
                && !matches!(zone, Bson::String(z) if z == "UTC" || z == "Z" || z == "+00:00")
            {
                return Err(PipelineError::bad(stage, format!("{name}: only the UTC timezone is supported")));
            }
            Ok(vec![one(d.get("date").expect("checked"))?])
        }
        (_, Bson::Array(items)) => items.iter().map(one).collect(),
        (_, value) => Ok(vec![one(value)?]),
    }
}

/// The value at `path` in `doc`; through arrays, the values of their documents.
fn field(doc: &Document, path: &[String]) -> Option<Bson> {
    let first = doc.get(&path[0])?;
    descend(first, &path[1..])
}

fn descend(value: &Bson, rest: &[String]) -> Option<Bson> {
    if rest.is_empty() {
        return Some(value.clone());
    }
    match value {
        Bson::Document(d) => descend(d.get(&rest[0])?, &rest[1..]),
        Bson::Array(items) => Some(Bson::Array(
            items
                .iter()
                .filter_map(|item| match item {
                    Bson::Document(_) => descend(item, rest),
                    _ => None,
                })
                .collect(),
        )),
        _ => None,
    }
}

/// MongoDB's truthiness: false, null, missing and numeric zero are false.
pub fn truthy(value: &Option<Bson>) -> bool {
    match value {
        None | Some(Bson::Null) | Some(Bson::Undefined) | Some(Bson::Boolean(false)) => false,
        Some(v) => number_as_f64(v).is_none_or(|n| n != 0.0),
    }
}

fn nullish(value: &Option<Bson>) -> bool {
    matches!(value, None | Some(Bson::Null) | Some(Bson::Undefined))
}

fn apply(op: Op, args: &[Expression], doc: &Document) -> Bson {
    let values: Vec<Option<Bson>> = match op {
        // Evaluated lazily below.
        Op::Cond | Op::IfNull | Op::And | Op::Or => Vec::new(),
        _ => args.iter().map(|a| a.evaluate(doc)).collect(),
    };
    match op {
        Op::Year | Op::Month | Op::DayOfMonth | Op::Hour | Op::Minute | Op::Second | Op::DayOfWeek | Op::DayOfYear => {
            let Some(Bson::DateTime(date)) = &values[0] else { return Bson::Null };
            let nanos = i128::from(date.timestamp_millis()) * 1_000_000;
            let Ok(t) = time::OffsetDateTime::from_unix_timestamp_nanos(nanos) else { return Bson::Null };
            Bson::Int32(match op {
                Op::Year => t.year(),
                Op::Month => i32::from(u8::from(t.month())),
                Op::DayOfMonth => i32::from(t.day()),
                Op::Hour => i32::from(t.hour()),
                Op::Minute => i32::from(t.minute()),
                Op::Second => i32::from(t.second()),
                // MongoDB: 1 (Sunday) to 7 (Saturday).
                Op::DayOfWeek => i32::from(t.weekday().number_from_sunday()),
                _ => i32::from(t.ordinal()),
            })
        }
        Op::ToLower | Op::ToUpper => {
            let text = match &values[0] {
                None | Some(Bson::Null) => String::new(),
                Some(Bson::String(s)) => s.clone(),
                Some(other) => match number_as_f64(other) {
                    Some(_) => other.to_string(),
                    None => return Bson::Null,
                },
            };
            Bson::String(if op == Op::ToLower { text.to_lowercase() } else { text.to_uppercase() })
        }
        Op::Concat => {
            let mut out = String::new();
            for value in &values {
                match value {
                    Some(Bson::String(s)) => out.push_str(s),
                    _ => return Bson::Null,
                }
            }
            Bson::String(out)
        }
        Op::Cond => {
            let branch = if truthy(&args[0].evaluate(doc)) { &args[1] } else { &args[2] };
            branch.evaluate(doc).unwrap_or(Bson::Null)
        }
        Op::IfNull => {
            let (last, tried) = args.split_last().expect("arity checked");
            for arg in tried {
                let value = arg.evaluate(doc);
                if !nullish(&value) {
                    return value.unwrap_or(Bson::Null);
                }
            }
            last.evaluate(doc).unwrap_or(Bson::Null)
        }
        Op::And => Bson::Boolean(args.iter().all(|a| truthy(&a.evaluate(doc)))),
        Op::Or => Bson::Boolean(args.iter().any(|a| truthy(&a.evaluate(doc)))),
        Op::Not => Bson::Boolean(!truthy(&values[0])),
        Op::Eq | Op::Ne | Op::Gt | Op::Gte | Op::Lt | Op::Lte => {
            let (a, b) = (values[0].clone().unwrap_or(Bson::Null), values[1].clone().unwrap_or(Bson::Null));
            let order = compare_values(&a, &b);
            Bson::Boolean(match op {
                Op::Eq => order == Ordering::Equal,
                Op::Ne => order != Ordering::Equal,
                Op::Gt => order == Ordering::Greater,
                Op::Gte => order != Ordering::Less,
                Op::Lt => order == Ordering::Less,
                _ => order != Ordering::Greater,
            })
        }
        Op::Add | Op::Subtract | Op::Multiply | Op::Divide | Op::Abs => arithmetic(op, &values),
    }
}

/// A number as an integer (if it is one) or a double.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Num {
    Int(i64, bool),
    Float(f64),
}

impl Num {
    pub(crate) fn of(value: &Bson) -> Option<Num> {
        match value {
            Bson::Int32(i) => Some(Num::Int(i64::from(*i), false)),
            Bson::Int64(i) => Some(Num::Int(*i, true)),
            Bson::Double(f) => Some(Num::Float(*f)),
            Bson::Decimal128(d) => Some(Num::Float(crate::bson_order::decimal_to_f64(d))),
            _ => None,
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            Num::Int(i, _) => i as f64,
            Num::Float(f) => f,
        }
    }

    /// As BSON: an int32 while both operands were int32 and it fits, else an int64.
    pub(crate) fn to_bson(self) -> Bson {
        match self {
            Num::Int(i, long) => match i32::try_from(i) {
                Ok(small) if !long => Bson::Int32(small),
                _ => Bson::Int64(i),
            },
            Num::Float(f) => Bson::Double(f),
        }
    }
}

fn arithmetic(op: Op, values: &[Option<Bson>]) -> Bson {
    if values.iter().any(nullish) {
        return Bson::Null;
    }
    let values: Vec<&Bson> = values.iter().map(|v| v.as_ref().expect("not nullish")).collect();
    match op {
        Op::Abs => match Num::of(values[0]) {
            Some(Num::Int(i, long)) => {
                i.checked_abs().map_or(Bson::Double((i as f64).abs()), |a| Num::Int(a, long).to_bson())
            }
            Some(Num::Float(f)) => Bson::Double(f.abs()),
            None => Bson::Null,
        },
        Op::Add => {
            // Numbers, and at most one date (a date plus milliseconds is a date).
            let mut date = None;
            let mut total = Num::Int(0, false);
            for value in values {
                match value {
                    Bson::DateTime(d) if date.is_none() => date = Some(d.timestamp_millis()),
                    other => match Num::of(other) {
                        Some(n) => total = combine(total, n, i64::checked_add, |a, b| a + b),
                        None => return Bson::Null,
                    },
                }
            }
            match date {
                Some(millis) => {
                    Bson::DateTime(bson::DateTime::from_millis(millis.saturating_add(total.as_f64() as i64)))
                }
                None => total.to_bson(),
            }
        }
        Op::Subtract => match (values[0], values[1]) {
            (Bson::DateTime(a), Bson::DateTime(b)) => {
                Bson::Int64(a.timestamp_millis().saturating_sub(b.timestamp_millis()))
            }
            (Bson::DateTime(a), other) => match Num::of(other) {
                Some(n) => {
                    Bson::DateTime(bson::DateTime::from_millis(a.timestamp_millis().saturating_sub(n.as_f64() as i64)))
                }
                None => Bson::Null,
            },
            (a, b) => match (Num::of(a), Num::of(b)) {
                (Some(a), Some(b)) => combine(a, b, i64::checked_sub, |a, b| a - b).to_bson(),
                _ => Bson::Null,
            },
        },
        Op::Multiply => {
            let mut total = Num::Int(1, false);
            for value in values {
                match Num::of(value) {
                    Some(n) => total = combine(total, n, i64::checked_mul, |a, b| a * b),
                    None => return Bson::Null,
                }
            }
            total.to_bson()
        }
        _ => match (Num::of(values[0]), Num::of(values[1])) {
            (Some(a), Some(b)) if b.as_f64() != 0.0 => Bson::Double(a.as_f64() / b.as_f64()),
            _ => Bson::Null,
        },
    }
}

/// Integer arithmetic while it fits (int32 stays int32 while it fits), else doubles.
fn combine(a: Num, b: Num, int: fn(i64, i64) -> Option<i64>, float: fn(f64, f64) -> f64) -> Num {
    match (a, b) {
        (Num::Int(x, lx), Num::Int(y, ly)) => match int(x, y) {
            Some(z) => {
                let long = lx || ly || i32::try_from(z).is_err();
                Num::Int(z, long)
            }
            None => Num::Float(float(x as f64, y as f64)),
        },
        _ => Num::Float(float(a.as_f64(), b.as_f64())),
    }
}
