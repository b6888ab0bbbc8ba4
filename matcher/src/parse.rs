//! Parsing filter documents into compiled [`Expr`] trees, with MongoDB's rules for what is an
//! operator, what is a literal, and which shapes are errors.

use bson::{Bson, Document};

use crate::bson_order::Number;
use crate::bson_type::{TypeSet, type_label};
use crate::error::QueryError;
use crate::expr::{Expr, OpTree, Pred};
use crate::operator::{CmpOp, InList};
use crate::path::FieldPath;
use crate::regex::{MongoRegex, RegexBudget};

/// Top-level operators MongoDB has and livegrid does not evaluate.
const UNSUPPORTED_TOP_LEVEL: &[&str] =
    &["$where", "$expr", "$text", "$jsonSchema", "$sampleRate", "$alwaysTrue", "$alwaysFalse"];

/// Field operators MongoDB has and livegrid does not evaluate.
const UNSUPPORTED_FIELD: &[&str] = &[
    "$near",
    "$nearSphere",
    "$geoWithin",
    "$geoIntersects",
    "$within",
    "$box",
    "$center",
    "$centerSphere",
    "$polygon",
    "$geometry",
    "$maxDistance",
    "$minDistance",
    "$bitsAllSet",
    "$bitsAnySet",
    "$bitsAllClear",
    "$bitsAnyClear",
    "$jsonSchema",
    "$text",
    "$where",
    "$expr",
];

/// Parses a filter document whose nesting depth has been checked, compiling its regexes
/// within `budget`.
pub(crate) fn parse_filter(filter: &Document, budget: &mut RegexBudget) -> Result<Expr, QueryError> {
    Parser { regexes: budget }.filter(filter, "")
}

/// The state of parsing one filter.
struct Parser<'b> {
    /// What the filter's regexes may still take.
    regexes: &'b mut RegexBudget,
}

impl Parser<'_> {
    /// Parses a filter document; `prefix` is the path of the enclosing `$elemMatch`.
    fn filter(&mut self, filter: &Document, prefix: &str) -> Result<Expr, QueryError> {
        let mut conjuncts = Vec::with_capacity(filter.len());
        for (key, value) in filter {
            if let Some(op) = key.strip_prefix('$') {
                match op {
                    "and" | "or" | "nor" => {
                        let children = self.logical_list(key, value, prefix)?;
                        conjuncts.push(match op {
                            "and" => Expr::And(children),
                            "or" => Expr::Or(children),
                            _ => Expr::Nor(children),
                        });
                    }
                    "comment" => {}
                    _ if UNSUPPORTED_TOP_LEVEL.contains(&key.as_str()) => {
                        return Err(QueryError::unsupported(key, prefix));
                    }
                    _ => return Err(QueryError::unknown(key, prefix)),
                }
                continue;
            }
            let full = join(prefix, key);
            // Inside `$elemMatch` the predicate reads the enclosing path and this one together.
            crate::limits::check_path_components(&full)?;
            let path = FieldPath::parse(key).map_err(|e| match e {
                QueryError::BadPath { reason, .. } => QueryError::BadPath { path: full.clone(), reason },
                other => other,
            })?;
            let ops = self.field_value(value, &full)?;
            conjuncts.push(Expr::Path { path, ops });
        }
        Ok(match conjuncts.len() {
            0 => Expr::Const(true),
            1 => conjuncts.pop().expect("one"),
            _ => Expr::And(conjuncts),
        })
    }

    fn logical_list(&mut self, op: &str, value: &Bson, prefix: &str) -> Result<Vec<Expr>, QueryError> {
        let Bson::Array(items) = value else {
            return Err(QueryError::bad_argument(op, prefix, format!("must be an array, found {}", type_label(value))));
        };
        if items.is_empty() {
            return Err(QueryError::bad_argument(op, prefix, "must be a non-empty array"));
        }
        items
            .iter()
            .map(|item| match item {
                Bson::Document(d) => self.filter(d, prefix),
                other => Err(QueryError::bad_argument(
                    op,
                    prefix,
                    format!("entries must be documents, found {}", type_label(other)),
                )),
            })
            .collect()
    }

    /// Parses the value written for a field: a literal (implicit `$eq`), a regex, or operators.
    fn field_value(&mut self, value: &Bson, path: &str) -> Result<OpTree, QueryError> {
        match value {
            Bson::RegularExpression(r) => {
                Ok(OpTree::Leaf(Pred::Regex(self.regex(r.pattern.as_str(), r.options.as_str(), path)?)))
            }
            Bson::Document(d) if is_operator_document(d) => self.operators(d, path),
            literal => Ok(OpTree::Leaf(Pred::Eq(literal.clone()))),
        }
    }

    /// Parses an operator document such as `{$gt: 1, $lt: 5}` on `path`.
    fn operators(&mut self, ops: &Document, path: &str) -> Result<OpTree, QueryError> {
        let mut leaves = Vec::with_capacity(ops.len());
        let regex = self.regex_pair(ops, path)?;
        let mut regex_done = false;
        for (op, arg) in ops {
            let tree = match op.as_str() {
                "$eq" => OpTree::Leaf(Pred::Eq(arg.clone())),
                "$ne" => {
                    if matches!(arg, Bson::RegularExpression(_)) {
                        return Err(QueryError::bad_argument(op, path, "cannot be a regex (use $not)"));
                    }
                    OpTree::Not(Box::new(OpTree::Leaf(Pred::Eq(arg.clone()))))
                }
                "$gt" | "$gte" | "$lt" | "$lte" => {
                    let cmp = match op.as_str() {
                        "$gt" => CmpOp::Gt,
                        "$gte" => CmpOp::Gte,
                        "$lt" => CmpOp::Lt,
                        _ => CmpOp::Lte,
                    };
                    if matches!(arg, Bson::RegularExpression(_)) {
                        return Err(QueryError::bad_argument(op, path, "cannot be a regex"));
                    }
                    OpTree::Leaf(Pred::Cmp(cmp, arg.clone()))
                }
                "$in" => OpTree::Leaf(Pred::In(self.in_list(op, arg, path)?)),
                "$nin" => OpTree::Not(Box::new(OpTree::Leaf(Pred::In(self.in_list(op, arg, path)?)))),
                "$exists" => {
                    let leaf = OpTree::Leaf(Pred::Exists);
                    if is_truthy(arg) { leaf } else { OpTree::Not(Box::new(leaf)) }
                }
                "$type" => OpTree::Leaf(Pred::Type(TypeSet::parse(arg, path)?)),
                "$mod" => parse_mod(arg, path)?,
                "$regex" | "$options" => {
                    if regex_done {
                        continue;
                    }
                    regex_done = true;
                    OpTree::Leaf(Pred::Regex(regex.clone().expect("regex pair was parsed")))
                }
                "$size" => OpTree::Leaf(Pred::Size(parse_size(arg, path)?)),
                "$all" => self.all(arg, path)?,
                "$elemMatch" => OpTree::Leaf(self.elem_match(arg, path)?),
                "$not" => OpTree::Not(Box::new(self.not(arg, path)?)),
                other if UNSUPPORTED_FIELD.contains(&other) => {
                    return Err(QueryError::unsupported(other, path));
                }
                other => return Err(QueryError::unknown(other, path)),
            };
            leaves.push(tree);
        }
        Ok(match leaves.len() {
            1 => leaves.pop().expect("one"),
            _ => OpTree::And(leaves),
        })
    }

    /// `$regex` with optional `$options`; `$options` alone is an error.
    fn regex_pair(&mut self, ops: &Document, path: &str) -> Result<Option<MongoRegex>, QueryError> {
        let options = match ops.get("$options") {
            None => None,
            Some(Bson::String(o)) => Some(o.as_str()),
            Some(other) => {
                return Err(QueryError::bad_argument(
                    "$options",
                    path,
                    format!("must be a string, found {}", type_label(other)),
                ));
            }
        };
        let (pattern, literal_options) = match ops.get("$regex") {
            None if options.is_some() => {
                return Err(QueryError::bad_argument("$options", path, "needs a $regex"));
            }
            None => return Ok(None),
            Some(Bson::String(p)) => (p.as_str(), ""),
            Some(Bson::RegularExpression(r)) => (r.pattern.as_str(), r.options.as_str()),
            Some(other) => {
                return Err(QueryError::bad_argument(
                    "$regex",
                    path,
                    format!("must be a string or regex, found {}", type_label(other)),
                ));
            }
        };
        if !literal_options.is_empty() && options.is_some() {
            return Err(QueryError::bad_argument("$options", path, "options set in both $regex and $options"));
        }
        if pattern.contains('\0') {
            return Err(QueryError::bad_argument("$regex", path, "pattern contains a null byte"));
        }
        let flags = options.unwrap_or(literal_options);
        self.regex(pattern, flags, path).map(Some)
    }

    fn in_list(&mut self, op: &str, arg: &Bson, path: &str) -> Result<InList, QueryError> {
        let Bson::Array(items) = arg else {
            return Err(QueryError::bad_argument(op, path, format!("needs an array, found {}", type_label(arg))));
        };
        let mut values = Vec::with_capacity(items.len());
        let mut regexes = Vec::new();
        for item in items {
            match item {
                Bson::RegularExpression(r) => regexes.push(self.regex(r.pattern.as_str(), r.options.as_str(), path)?),
                Bson::Document(d) if is_operator_document(d) => {
                    return Err(QueryError::bad_argument(op, path, "cannot nest operators ($-documents) inside"));
                }
                value => values.push(value.clone()),
            }
        }
        Ok(InList::new(values, regexes))
    }

    fn all(&mut self, arg: &Bson, path: &str) -> Result<OpTree, QueryError> {
        let Bson::Array(items) = arg else {
            return Err(QueryError::bad_argument("$all", path, format!("needs an array, found {}", type_label(arg))));
        };
        if items.is_empty() {
            return Ok(OpTree::Const(false));
        }
        let is_elem_match =
            |v: &Bson| matches!(v, Bson::Document(d) if d.keys().next().is_some_and(|k| k == "$elemMatch"));
        let elem_matches = items.iter().filter(|v| is_elem_match(v)).count();
        if elem_matches != 0 && elem_matches != items.len() {
            return Err(QueryError::bad_argument("$all", path, "cannot mix $elemMatch and values"));
        }
        let mut leaves = Vec::with_capacity(items.len());
        for item in items {
            let pred = match item {
                Bson::Document(d) if is_elem_match(item) => {
                    if d.len() != 1 {
                        return Err(QueryError::bad_argument(
                            "$all",
                            path,
                            "an $elemMatch entry must hold only $elemMatch",
                        ));
                    }
                    self.elem_match(d.get("$elemMatch").expect("checked"), path)?
                }
                Bson::Document(d) if is_operator_document(d) => {
                    return Err(QueryError::bad_argument("$all", path, "cannot nest operators other than $elemMatch"));
                }
                Bson::RegularExpression(r) => Pred::Regex(self.regex(r.pattern.as_str(), r.options.as_str(), path)?),
                value => Pred::Eq(value.clone()),
            };
            leaves.push(OpTree::Leaf(pred));
        }
        Ok(OpTree::And(leaves))
    }

    /// `$elemMatch`: the value form when the argument's operators are field operators
    /// (`{$gt: 1}`), the document form otherwise (`{b: 1}`, `{$or: [...]}`).
    fn elem_match(&mut self, arg: &Bson, path: &str) -> Result<Pred, QueryError> {
        let Bson::Document(d) = arg else {
            return Err(QueryError::bad_argument(
                "$elemMatch",
                path,
                format!("needs a document, found {}", type_label(arg)),
            ));
        };
        let value_form = d.keys().next().is_some_and(|k| {
            k.starts_with('$')
                && !matches!(k.as_str(), "$and" | "$or" | "$nor" | "$where" | "$expr" | "$text" | "$comment")
        });
        if value_form {
            Ok(Pred::ElemMatchValue(Box::new(self.operators(d, path)?)))
        } else {
            Ok(Pred::ElemMatchDocument(Box::new(self.filter(d, path)?)))
        }
    }

    /// `$not`: a regex, or an operator document to negate.
    fn not(&mut self, arg: &Bson, path: &str) -> Result<OpTree, QueryError> {
        match arg {
            Bson::RegularExpression(r) => {
                Ok(OpTree::Leaf(Pred::Regex(self.regex(r.pattern.as_str(), r.options.as_str(), path)?)))
            }
            Bson::Document(d) if d.is_empty() => Err(QueryError::bad_argument("$not", path, "cannot be empty")),
            Bson::Document(d) if is_operator_document(d) => self.operators(d, path),
            Bson::Document(_) => Err(QueryError::bad_argument(
                "$not",
                path,
                "needs operators ($-keys) or a regex, not a literal document",
            )),
            other => Err(QueryError::bad_argument(
                "$not",
                path,
                format!("needs a regex or a document, found {}", type_label(other)),
            )),
        }
    }

    /// Compiles a regex within the filter's budget.
    fn regex(&mut self, pattern: &str, options: &str, path: &str) -> Result<MongoRegex, QueryError> {
        MongoRegex::with_budget(pattern, options, path, self.regexes)
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") }
}

/// Whether a document is an operator document (`{$gt: 1}`) rather than a literal to compare.
fn is_operator_document(doc: &Document) -> bool {
    doc.keys().next().is_some_and(|k| k.starts_with('$'))
}

fn parse_mod(arg: &Bson, path: &str) -> Result<OpTree, QueryError> {
    let Bson::Array(items) = arg else {
        return Err(QueryError::bad_argument(
            "$mod",
            path,
            format!("needs an array [divisor, remainder], found {}", type_label(arg)),
        ));
    };
    if items.len() != 2 {
        return Err(QueryError::bad_argument("$mod", path, format!("needs exactly 2 elements, found {}", items.len())));
    }
    let as_int = |v: &Bson, what: &str| -> Result<i64, QueryError> {
        let n = Number::of(v).ok_or_else(|| {
            QueryError::bad_argument("$mod", path, format!("{what} must be a number, found {}", type_label(v)))
        })?;
        match n {
            Number::Int(i) => Ok(i),
            Number::Float(f) if f.is_finite() && f.abs() < 9.2e18 => Ok(f.trunc() as i64),
            Number::Float(_) => Err(QueryError::bad_argument("$mod", path, format!("{what} must be a finite number"))),
        }
    };
    let divisor = as_int(&items[0], "divisor")?;
    let remainder = as_int(&items[1], "remainder")?;
    if divisor == 0 {
        return Err(QueryError::bad_argument("$mod", path, "divisor cannot be 0"));
    }
    Ok(OpTree::Leaf(Pred::Mod { divisor, remainder }))
}

fn parse_size(arg: &Bson, path: &str) -> Result<usize, QueryError> {
    let n = Number::of(arg)
        .ok_or_else(|| QueryError::bad_argument("$size", path, format!("needs a number, found {}", type_label(arg))))?;
    let f = n.as_f64();
    if f.fract() != 0.0 || f.is_nan() {
        return Err(QueryError::bad_argument("$size", path, "must be a whole number"));
    }
    if f < 0.0 {
        return Err(QueryError::bad_argument("$size", path, "may not be negative"));
    }
    Ok(f as usize)
}

/// MongoDB's truthiness for `$exists`: false, 0, null and undefined are false.
fn is_truthy(value: &Bson) -> bool {
    match value {
        Bson::Boolean(b) => *b,
        Bson::Null | Bson::Undefined => false,
        v => Number::of(v).is_none_or(|n| n.as_f64() != 0.0),
    }
}
