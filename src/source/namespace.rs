//! Namespaces, `db.collection`, with MongoDB's naming rules so that every namespace names
//! exactly one collection: the database name holds no `.` (the first dot splits), and names
//! avoid the characters MongoDB refuses.
//!
//! - database: 1 to 63 bytes, none of `/ \ . " $ * < > : | ?`, space or NUL;
//! - collection: non-empty, no `$` or NUL, not starting with `system.`;
//! - the whole namespace at most 255 bytes.

/// The longest database name MongoDB accepts, in bytes.
pub const MAX_DATABASE_BYTES: usize = 63;
/// The longest namespace MongoDB accepts, in bytes.
pub const MAX_NAMESPACE_BYTES: usize = 255;

/// A namespace MongoDB would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad namespace {shown:?}: {reason}")]
pub struct NamespaceError {
    /// The namespace, cut short when long.
    pub shown: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Checks `ns` (see the module docs).
pub fn check_namespace(ns: &str) -> Result<(), NamespaceError> {
    let bad = |reason| {
        let shown: String = ns.chars().take(80).collect();
        Err(NamespaceError { shown, reason })
    };
    if ns.len() > MAX_NAMESPACE_BYTES {
        return bad("namespaces are at most 255 bytes");
    }
    let Some((db, coll)) = ns.split_once('.') else { return bad("expected db.collection") };
    if db.is_empty() || coll.is_empty() {
        return bad("database and collection names must not be empty");
    }
    if db.len() > MAX_DATABASE_BYTES {
        return bad("database names are at most 63 bytes");
    }
    if db.contains(['/', '\\', '.', '"', '$', '*', '<', '>', ':', '|', '?', ' ', '\0']) {
        return bad("database names may not contain / \\ . \" $ * < > : | ? space or NUL");
    }
    if coll.contains(['$', '\0']) {
        return bad("collection names may not contain $ or NUL");
    }
    if coll.starts_with("system.") {
        return bad("system collections are reserved");
    }
    Ok(())
}

/// The namespace of a REST path's database and collection, checked.
pub fn join(db: &str, coll: &str) -> Result<String, NamespaceError> {
    if db.contains('.') {
        let shown: String = format!("{db}.{coll}").chars().take(80).collect();
        return Err(NamespaceError { shown, reason: "database names may not contain '.'" });
    }
    let ns = format!("{db}.{coll}");
    check_namespace(&ns)?;
    Ok(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mongodb_naming_rules() {
        assert!(check_namespace("app.todos").is_ok());
        assert!(check_namespace("app.todos.archive").is_ok(), "collections may contain dots");
        for bad in ["nodot", ".c", "a.", "a b.c", "a$.c", "a.c$", "a.system.users", "a\0.c", "a:b.c"] {
            assert!(check_namespace(bad).is_err(), "{bad:?}");
        }
        assert!(check_namespace(&format!("{}.c", "d".repeat(64))).is_err());
        assert!(check_namespace(&format!("d.{}", "c".repeat(300))).is_err());
        // The ambiguity that must not exist: db "a.b" + coll "c" versus db "a" + coll "b.c".
        assert!(join("a.b", "c").is_err());
        assert_eq!(join("a", "b.c").unwrap(), "a.b.c");
    }
}
