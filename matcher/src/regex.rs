//! MongoDB regular expressions on a linear-time engine.
//!
//! MongoDB runs PCRE; livegrid runs the `regex` crate's engine (`regex-automata`'s meta
//! regex), whose matching time is linear in the input. Patterns that need backtracking
//! features (look-around, back-references, possessive quantifiers) are rejected when the query
//! is parsed, as are patterns whose compiled form would exceed the size limits: a query can
//! never hang a worker.
//!
//! # Memory
//! Each regex's automata are limited to 1 MiB apiece, and all regexes of one query share a
//! [`RegexBudget`] ([`crate::QUERY_REGEX_BUDGET`]): a regex is compiled with what is left of
//! the budget as its limit and charged what it really holds afterwards, so a query of many
//! large regexes is rejected after a few of them instead of compiling for seconds. Matching
//! also keeps a lazy-DFA cache per regex and thread, which grows with use up to
//! [`HYBRID_CACHE_CAPACITY`] bytes in each direction; the budget does not count it.

use regex_automata::MatchKind;
use regex_automata::meta;
use regex_automata::nfa::thompson::WhichCaptures;
use regex_automata::util::syntax;

use crate::error::{QueryError, display_path};

/// Upper bound on each compiled automaton of one regex (forward and reverse NFA, one-pass DFA).
const SIZE_LIMIT: usize = 1 << 20;
/// Upper bound on group nesting.
const NEST_LIMIT: u32 = 64;
/// What a regex holds besides its automata (its structures and cache pool), charged to the
/// budget with the pattern's length, so that even tiny regexes cannot be compiled without end.
const REGEX_OVERHEAD: usize = 512;

/// The most bytes the lazy DFA of one regex caches in one matching thread, per direction.
pub const HYBRID_CACHE_CAPACITY: usize = 256 << 10;

/// Bytes of compiled regular expressions that the regexes of one query may still take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegexBudget {
    total: usize,
    spent: usize,
}

impl RegexBudget {
    /// A budget of `total` bytes.
    pub fn new(total: usize) -> Self {
        RegexBudget { total, spent: 0 }
    }

    /// The bytes the budget started with.
    pub fn total(&self) -> usize {
        self.total
    }

    /// The bytes charged so far.
    pub fn spent(&self) -> usize {
        self.spent
    }

    /// The bytes left.
    pub fn remaining(&self) -> usize {
        self.total.saturating_sub(self.spent)
    }
}

impl Default for RegexBudget {
    /// The budget of one query, [`crate::QUERY_REGEX_BUDGET`].
    fn default() -> Self {
        RegexBudget::new(crate::QUERY_REGEX_BUDGET)
    }
}

/// A compiled MongoDB regular expression with its original pattern and options.
#[derive(Debug, Clone)]
pub struct MongoRegex {
    pattern: String,
    options: String,
    compiled: meta::Regex,
}

impl MongoRegex {
    /// Compiles `pattern` with MongoDB `options` (`i`, `m`, `s`, `x`; `u` is accepted and
    /// implied), with a budget of its own. `path` names the field in errors.
    pub fn new(pattern: &str, options: &str, path: &str) -> Result<Self, QueryError> {
        Self::with_budget(pattern, options, path, &mut RegexBudget::default())
    }

    /// Compiles like [`MongoRegex::new`], charging the compiled size to `budget`; fails with
    /// [`QueryError::RegexBudget`] when the regex does not fit in what is left of it.
    pub fn with_budget(pattern: &str, options: &str, path: &str, budget: &mut RegexBudget) -> Result<Self, QueryError> {
        let mut syntax = syntax::Config::new().utf8(true).nest_limit(NEST_LIMIT);
        for flag in options.chars() {
            syntax = match flag {
                'i' => syntax.case_insensitive(true),
                'm' => syntax.multi_line(true),
                's' => syntax.dot_matches_new_line(true),
                'x' => syntax.ignore_whitespace(true),
                'u' => syntax,
                other => {
                    return Err(QueryError::Regex {
                        path: display_path(path),
                        reason: format!("invalid regex option {other:?}"),
                        source: None,
                    });
                }
            };
        }
        let over_budget = || QueryError::RegexBudget { path: display_path(path), budget: budget.total() };
        let remaining = budget.remaining();
        let floor = REGEX_OVERHEAD + pattern.len();
        if remaining < floor {
            return Err(over_budget());
        }
        let limit = SIZE_LIMIT.min(remaining - floor);
        // The settings of `regex::Regex` (leftmost-first, UTF-8 empty matches), with explicit
        // capture groups left out: only whether there is a match is ever asked.
        let config = meta::Config::new()
            .match_kind(MatchKind::LeftmostFirst)
            .utf8_empty(true)
            .which_captures(WhichCaptures::Implicit)
            .nfa_size_limit(Some(limit))
            .onepass_size_limit(Some(limit))
            .dfa_size_limit(Some(limit))
            .hybrid_cache_capacity(HYBRID_CACHE_CAPACITY);
        let compiled = meta::Builder::new().configure(config).syntax(syntax).build(pattern).map_err(|e| {
            if e.size_limit().is_some() && limit < SIZE_LIMIT {
                over_budget()
            } else {
                let reason = match (e.size_limit(), e.syntax_error()) {
                    (Some(size), _) => format!("compiled regex exceeds size limit of {size} bytes"),
                    (None, Some(syntax_error)) => first_line(&syntax_error.to_string()),
                    (None, None) => first_line(&e.to_string()),
                };
                QueryError::Regex { path: display_path(path), reason, source: Some(e.into()) }
            }
        })?;
        let cost = floor + compiled.memory_usage();
        if cost > remaining {
            return Err(over_budget());
        }
        budget.spent += cost;
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

    /// The heap bytes the compiled regex holds (what [`MongoRegex::with_budget`] charged),
    /// lazy-DFA caches of matching threads aside.
    pub fn memory_usage(&self) -> usize {
        REGEX_OVERHEAD + self.pattern.len() + self.compiled.memory_usage()
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

    #[test]
    fn errors_keep_their_summary_and_source() {
        use std::error::Error;

        let err = MongoRegex::new("(a)\\1", "", "f").unwrap_err();
        let QueryError::Regex { path, reason, source: Some(source) } = &err else { panic!("{err:?}") };
        assert_eq!((path.as_str(), reason.as_str()), ("f", "backreferences are not supported"));
        assert!(source.get().syntax_error().is_some());
        assert!(err.source().is_some());
        assert_eq!(err, MongoRegex::new("(a)\\1", "", "f").unwrap_err());

        let err = MongoRegex::new("(a{1000}){1000}", "", "f").unwrap_err();
        let QueryError::Regex { path, reason, source: Some(source) } = &err else { panic!("{err:?}") };
        assert_eq!((path.as_str(), reason.as_str()), ("f", "compiled regex exceeds size limit of 1048576 bytes"));
        assert_eq!(source.get().size_limit(), Some(1 << 20));
        assert_eq!(err.to_string(), "bad regex at f: compiled regex exceeds size limit of 1048576 bytes");

        let err = MongoRegex::new("a", "q", "f").unwrap_err();
        assert!(matches!(err, QueryError::Regex { source: None, .. }), "{err:?}");
    }

    #[test]
    fn budget_is_charged_what_the_regex_holds() {
        let mut budget = RegexBudget::new(1 << 20);
        let regex = MongoRegex::with_budget("^ab+c", "i", "f", &mut budget).unwrap();
        assert!(regex.memory_usage() >= REGEX_OVERHEAD);
        assert_eq!(budget.spent(), regex.memory_usage());
        assert_eq!(budget.remaining(), (1 << 20) - regex.memory_usage());
    }

    #[test]
    fn large_regexes_exhaust_the_budget() {
        // `\w{20}` compiles to about 1 MiB with Unicode word characters: four fit in 4 MiB at most.
        let mut budget = RegexBudget::default();
        let mut compiled = 0;
        let err = loop {
            match MongoRegex::with_budget("\\w{20}", "", "f", &mut budget) {
                Ok(_) => compiled += 1,
                Err(e) => break e,
            }
            assert!(compiled < 10, "the budget never ran out");
        };
        assert!(compiled >= 1);
        assert_eq!(err, QueryError::RegexBudget { path: "f".into(), budget: crate::QUERY_REGEX_BUDGET });
        assert_eq!(err.to_string(), "regexes of this query exceed the 4 MiB compile budget at f");
        assert!(budget.spent() <= crate::QUERY_REGEX_BUDGET);
    }

    #[test]
    fn tiny_regexes_are_charged_too() {
        let mut budget = RegexBudget::new(10 * 1024);
        let fitted = (0..100).take_while(|_| MongoRegex::with_budget("abc", "", "f", &mut budget).is_ok()).count();
        assert!((1..100).contains(&fitted), "{fitted}");
    }
}
