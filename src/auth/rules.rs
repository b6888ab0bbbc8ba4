//! Read and write rules per namespace (`--rules FILE`):
//!
//! ```toml
//! [namespaces."app.posts"]
//! read = "authenticated"
//! write = ["role:editor", "user:alice"]
//! [namespaces."app.*"]
//! read = "public"
//! write = ["role:admin"]
//! ```
//!
//! A rule is `"public"` (anyone, anonymous too), `"authenticated"` (any valid token), or a
//! list of `"role:NAME"` and `"user:ID"` (any of them). Patterns are a namespace (`db.coll`),
//! a database's collections (`db.*`) or everything (`*`); the most specific pattern wins. With
//! authentication configured, what no rule allows is denied; a missing `read` or `write` in
//! the winning pattern denies that too.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::Principal;

/// Who may do something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Anyone.
    Public,
    /// Anyone with a valid token.
    Authenticated,
    /// Principals with one of these roles or ids.
    Only(Vec<Grant>),
}

/// One entry of a rule's list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// A role.
    Role(String),
    /// A user id (`sub`).
    User(String),
}

impl Access {
    /// Whether `principal` is allowed.
    pub fn allows(&self, principal: &Principal) -> bool {
        match self {
            Access::Public => true,
            Access::Authenticated => principal.is_authenticated(),
            Access::Only(grants) => grants.iter().any(|grant| match grant {
                Grant::Role(role) => principal.is_authenticated() && principal.has_role(role),
                Grant::User(user) => principal.user.as_deref() == Some(user.as_str()),
            }),
        }
    }
}

/// A rules file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// Not TOML of the expected shape.
    #[error("rules file: {0}")]
    Toml(#[from] toml::de::Error),
    /// A rule that is none of the accepted forms.
    #[error("rules for {pattern:?}: {message}")]
    Rule {
        /// The namespace pattern.
        pattern: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    namespaces: BTreeMap<String, RuleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    read: Option<AccessFile>,
    write: Option<AccessFile>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum AccessFile {
    Word(String),
    List(Vec<String>),
}

/// What one pattern allows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    /// Who may read (`None`: nobody).
    pub read: Option<Access>,
    /// Who may write (`None`: nobody).
    pub write: Option<Access>,
}

/// The rules of a deployment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    patterns: BTreeMap<String, Rule>,
}

impl Rules {
    /// Rules from the text of a rules file.
    pub fn parse(text: &str) -> Result<Self, RulesError> {
        let file: RulesFile = toml::from_str(text)?;
        let mut patterns = BTreeMap::new();
        for (pattern, rule) in file.namespaces {
            let bad = |message: String| RulesError::Rule { pattern: pattern.clone(), message };
            let valid = pattern == "*"
                || pattern.strip_suffix(".*").is_some_and(|db| !db.is_empty() && !db.contains(['.', '*']))
                || (!pattern.contains('*')
                    && pattern.split_once('.').is_some_and(|(d, c)| !d.is_empty() && !c.is_empty()));
            if !valid {
                return Err(bad("a pattern is `db.coll`, `db.*` or `*`".into()));
            }
            let access = |access: Option<AccessFile>| access.map(|a| parse_access(a).map_err(&bad)).transpose();
            let rule = Rule { read: access(rule.read)?, write: access(rule.write)? };
            patterns.insert(pattern.clone(), rule);
        }
        Ok(Rules { patterns })
    }

    /// Rules that allow everything (authentication without a rules file is refused at start;
    /// these are for servers without authentication).
    pub fn allow_all() -> Self {
        let all = Rule { read: Some(Access::Public), write: Some(Access::Public) };
        Rules { patterns: BTreeMap::from([("*".to_string(), all)]) }
    }

    /// The rule for `ns`: the most specific pattern's, or one that allows nothing.
    pub fn rule(&self, ns: &str) -> Rule {
        let db = ns.split('.').next().unwrap_or(ns);
        self.patterns
            .get(ns)
            .or_else(|| self.patterns.get(&format!("{db}.*")))
            .or_else(|| self.patterns.get("*"))
            .cloned()
            .unwrap_or_default()
    }

    /// Whether `principal` may read `ns`.
    pub fn may_read(&self, ns: &str, principal: &Principal) -> bool {
        self.rule(ns).read.is_some_and(|a| a.allows(principal))
    }

    /// Whether `principal` may write `ns`.
    pub fn may_write(&self, ns: &str, principal: &Principal) -> bool {
        self.rule(ns).write.is_some_and(|a| a.allows(principal))
    }
}

fn parse_access(access: AccessFile) -> Result<Access, String> {
    match access {
        AccessFile::Word(word) if word == "public" => Ok(Access::Public),
        AccessFile::Word(word) if word == "authenticated" => Ok(Access::Authenticated),
        AccessFile::Word(word) => Err(format!("{word:?} is not `public`, `authenticated` or a list")),
        AccessFile::List(items) => items
            .into_iter()
            .map(|item| match item.split_once(':') {
                Some(("role", role)) if !role.is_empty() => Ok(Grant::Role(role.to_string())),
                Some(("user", user)) if !user.is_empty() => Ok(Grant::User(user.to_string())),
                _ => Err(format!("{item:?} is not `role:NAME` or `user:ID`")),
            })
            .collect::<Result<_, _>>()
            .map(Access::Only),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str, roles: &[&str]) -> Principal {
        Principal {
            user: Some(id.into()),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            expires: None,
            via: None,
        }
    }

    #[test]
    fn the_most_specific_pattern_wins_and_nothing_else_is_allowed() {
        let rules = Rules::parse(
            r#"
            [namespaces."app.posts"]
            read = "authenticated"
            write = ["role:editor", "user:alice"]
            [namespaces."app.*"]
            read = "public"
            write = ["role:admin"]
            "#,
        )
        .unwrap();
        let (anon, bob, alice, editor, admin) = (
            Principal::anonymous(),
            user("bob", &[]),
            user("alice", &[]),
            user("eve", &["editor"]),
            user("root", &["admin"]),
        );
        assert!(!rules.may_read("app.posts", &anon) && rules.may_read("app.posts", &bob));
        assert!(rules.may_write("app.posts", &alice) && rules.may_write("app.posts", &editor));
        assert!(!rules.may_write("app.posts", &bob) && !rules.may_write("app.posts", &admin), "exact wins");
        assert!(rules.may_read("app.other", &anon) && rules.may_write("app.other", &admin));
        assert!(!rules.may_write("app.other", &editor));
        assert!(!rules.may_read("shop.items", &admin), "no rule: denied");
        for bad in [
            "[namespaces.\"app\"]\nread = \"public\"",
            "[namespaces.\"a*.b\"]\nread = \"public\"",
            "[namespaces.\"app.x\"]\nread = \"everyone\"",
            "[namespaces.\"app.x\"]\nread = [\"group:x\"]",
            "[namespaces.\"app.x\"]\nreed = \"public\"",
        ] {
            assert!(Rules::parse(bad).is_err(), "{bad}");
        }
        assert!(Rules::allow_all().may_write("any.thing", &anon));
    }
}
