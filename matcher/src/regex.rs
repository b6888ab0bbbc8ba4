//! MongoDB regular expressions on a linear-time engine.
//!
//! MongoDB runs PCRE; livegrid runs the `regex` crate, whose matching time is linear in the
//! input. Patterns that need backtracking features (look-around, back-references, possessive
//! quantifiers) are rejected when the query is parsed, as are patterns whose compiled form
//! would exceed the size limits: a query can never hang a worker.

use crate::error::QueryError;

/// Upper bound on the compiled program and lazy-DFA cache of one regex.
const SIZE_LIMIT: usize = 1 << 20;
/// Upper bound on group nesting.
const NEST_LIMIT: u32 = 64;

/// A compiled MongoDB regular expression with its original pattern and options.
#[derive(Debug, Clone)]
pub struct MongoRegex {
    pattern: String,
    options: String,
    compiled: regex::Regex,
}

impl MongoRegex {
    /// Compiles `pattern` with MongoDB `options` (`i`, `m`, `s`, `x`; `u` is accepted and
    /// implied). `path` names the field in errors.
    pub fn new(pattern: &str, options: &str, path: &str) -> Result<Self, QueryError> {
        let mut builder = regex::RegexBuilder::new(pattern);
        builder.size_limit(SIZE_LIMIT).dfa_size_limit(SIZE_LIMIT).nest_limit(NEST_LIMIT);
        for flag in options.chars() {
            match flag {
                'i' => builder.case_insensitive(true),
                'm' => builder.multi_line(true),
                's' => builder.dot_matches_new_line(true),
                'x' => builder.ignore_whitespace(true),
                'u' => &mut builder,
                other => {
                    return Err(QueryError::Regex {
                        path: crate::error::display_path(path),
                        reason: format!("invalid regex option {other:?}"),
                    });
                }
            };
        }
        let compiled = builder.build().map_err(|e| QueryError::Regex {
            path: crate::error::display_path(path),
            reason: first_line(&e.to_string()),
        })?;
        let mut sorted: Vec<char> = options.chars().collect();
        sorted.sort_unstable();
        sorted.dedup();
        Ok(MongoRegex { pattern: pattern.to_string(), options: sorted.into_iter().collect(), compiled })
    }

    /// Whether the regex matches somewhere in `text`.
    pub fn is_match(&self, text: &str) -> bool {
        self.compiled.is_match(text)
    }

    /// The pattern as written.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The options, sorted.
    pub fn options(&self) -> &str {
        &self.options
    }

    /// Whether `value` is a stored regex identical to this one (same pattern and options).
    pub fn is_same_regex(&self, value: &bson::Regex) -> bool {
        value.pattern.as_str() == self.pattern && value.options.as_str() == self.options
    }
}

fn first_line(message: &str) -> String {
    // regex errors span several lines (the pattern with a caret); keep the summary.
    let lines: Vec<&str> = message.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    match lines.iter().find(|l| l.starts_with("error:")) {
        Some(l) => l.trim_start_matches("error:").trim().to_string(),
        None => lines.last().map(|s| s.to_string()).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        assert!(MongoRegex::new("^ab", "i", "a").unwrap().is_match("ABc"));
        assert!(MongoRegex::new("^b", "m", "a").unwrap().is_match("a\nb"));
        assert!(!MongoRegex::new("^b", "", "a").unwrap().is_match("a\nb"));
        assert!(MongoRegex::new("a.b", "s", "a").unwrap().is_match("a\nb"));
        assert!(MongoRegex::new("a b # comment", "x", "a").unwrap().is_match("ab"));
        assert!(MongoRegex::new("a", "q", "f").is_err());
    }

    #[test]
    fn backtracking_features_are_errors() {
        let err = MongoRegex::new("(a)\\1", "", "f").unwrap_err();
        assert!(matches!(err, QueryError::Regex { .. }), "{err}");
        assert!(MongoRegex::new("a(?=b)", "", "f").is_err());
        assert!(MongoRegex::new("(a{1000}){1000}", "", "f").is_err());
    }
}
