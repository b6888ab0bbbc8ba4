//! BSON type selectors for `$type`: aliases (`"string"`, `"number"`, ...) and type numbers.

use bson::Bson;

use crate::error::QueryError;

/// A set of BSON types, as selected by a `$type` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TypeSet(u32);

const NUMBER_CODES: [i32; 4] = [1, 16, 18, 19];

impl TypeSet {
    /// Parses the argument of `$type`: an alias, a type number, or an array of these.
    pub fn parse(arg: &Bson, path: &str) -> Result<Self, QueryError> {
        let mut set = TypeSet::default();
        match arg {
            Bson::Array(items) => {
                if items.is_empty() {
                    return Err(QueryError::bad_argument("$type", path, "must name at least one type"));
                }
                for item in items {
                    set.add(item, path)?;
                }
            }
            single => set.add(single, path)?,
        }
        Ok(set)
    }

    fn add(&mut self, selector: &Bson, path: &str) -> Result<(), QueryError> {
        let code = match selector {
            Bson::String(alias) if alias == "number" => {
                for code in NUMBER_CODES {
                    self.insert(code);
                }
                return Ok(());
            }
            Bson::String(alias) => alias_code(alias)
                .ok_or_else(|| QueryError::bad_argument("$type", path, format!("unknown type name {alias:?}")))?,
            Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_) => {
                let n = crate::bson_order::Number::of(selector).expect("numeric").as_f64();
                if n.fract() != 0.0 || !is_type_code(n as i32) {
                    return Err(QueryError::bad_argument("$type", path, format!("invalid type number {n}")));
                }
                n as i32
            }
            other => {
                return Err(QueryError::bad_argument(
                    "$type",
                    path,
                    format!("expected a type name or number, found {}", type_label(other)),
                ));
            }
        };
        self.insert(code);
        Ok(())
    }

    fn insert(&mut self, code: i32) {
        self.0 |= 1 << bit(code);
    }

    /// Whether `value` has one of the selected types.
    pub fn contains(&self, value: &Bson) -> bool {
        self.0 & (1 << bit(type_code(value))) != 0
    }
}

fn bit(code: i32) -> u32 {
    match code {
        -1 => 20,
        127 => 21,
        c => c as u32,
    }
}

fn is_type_code(code: i32) -> bool {
    matches!(code, -1 | 1..=19 | 127)
}

fn alias_code(alias: &str) -> Option<i32> {
    Some(match alias {
        "double" => 1,
        "string" => 2,
        "object" => 3,
        "array" => 4,
        "binData" => 5,
        "undefined" => 6,
        "objectId" => 7,
        "bool" => 8,
        "date" => 9,
        "null" => 10,
        "regex" => 11,
        "dbPointer" => 12,
        "javascript" => 13,
        "symbol" => 14,
        "javascriptWithScope" => 15,
        "int" => 16,
        "timestamp" => 17,
        "long" => 18,
        "decimal" => 19,
        "minKey" => -1,
        "maxKey" => 127,
        _ => return None,
    })
}

/// The BSON type number of a value.
pub fn type_code(value: &Bson) -> i32 {
    match value {
        Bson::Double(_) => 1,
        Bson::String(_) => 2,
        Bson::Document(_) => 3,
        Bson::Array(_) => 4,
        Bson::Binary(_) => 5,
        Bson::Undefined => 6,
        Bson::ObjectId(_) => 7,
        Bson::Boolean(_) => 8,
        Bson::DateTime(_) => 9,
        Bson::Null => 10,
        Bson::RegularExpression(_) => 11,
        Bson::DbPointer(_) => 12,
        Bson::JavaScriptCode(_) => 13,
        Bson::Symbol(_) => 14,
        Bson::JavaScriptCodeWithScope(_) => 15,
        Bson::Int32(_) => 16,
        Bson::Timestamp(_) => 17,
        Bson::Int64(_) => 18,
        Bson::Decimal128(_) => 19,
        Bson::MinKey => -1,
        Bson::MaxKey => 127,
    }
}

/// The alias of a value's type (what `$type` accepts for it), for error messages.
pub(crate) fn type_label(value: &Bson) -> &'static str {
    match value {
        Bson::Double(_) => "double",
        Bson::String(_) => "string",
        Bson::Document(_) => "object",
        Bson::Array(_) => "array",
        Bson::Binary(_) => "binData",
        Bson::Undefined => "undefined",
        Bson::ObjectId(_) => "objectId",
        Bson::Boolean(_) => "bool",
        Bson::DateTime(_) => "date",
        Bson::Null => "null",
        Bson::RegularExpression(_) => "regex",
        Bson::DbPointer(_) => "dbPointer",
        Bson::JavaScriptCode(_) => "javascript",
        Bson::Symbol(_) => "symbol",
        Bson::JavaScriptCodeWithScope(_) => "javascriptWithScope",
        Bson::Int32(_) => "int",
        Bson::Timestamp(_) => "timestamp",
        Bson::Int64(_) => "long",
        Bson::Decimal128(_) => "decimal",
        Bson::MinKey => "minKey",
        Bson::MaxKey => "maxKey",
    }
}
