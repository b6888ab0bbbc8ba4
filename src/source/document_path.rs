//! Dotted paths into documents (`a.b.0.c`): reading, setting and removing values the way
//! MongoDB's update operators and change events (`updatedFields`, `removedFields`) address
//! them. Shared by the embedded store's updates and change-stream parsing.

use bson::{Bson, Document};

/// At most this many `null` elements are added to arrays by one update (MongoDB's limit).
pub const MAX_PADDING: usize = 1_500_000;

/// Why a path cannot be set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// An empty component or one starting with `$`.
    #[error("invalid field path")]
    Invalid,
    /// A non-numeric component inside an array.
    #[error("array elements are addressed by number")]
    NotIndex,
    /// Setting the path would pad arrays beyond [`MAX_PADDING`].
    #[error("can't backfill array to larger than {MAX_PADDING} elements")]
    Backfill,
    /// The path crosses a value that is neither a document nor an array.
    #[error("cannot create a field inside a non-document value")]
    NotDocument,
}

/// The value at a dotted path (documents and array indexes), if any.
pub fn get<'a>(doc: &'a Document, path: &str) -> Option<&'a Bson> {
    let mut parts = path.split('.');
    let mut current = doc.get(parts.next()?)?;
    for part in parts {
        current = match current {
            Bson::Document(d) => d.get(part)?,
            Bson::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(current)
}

/// The value at a dotted path, mutable.
pub fn get_mut<'a>(doc: &'a mut Document, path: &str) -> Option<&'a mut Bson> {
    let mut parts = path.split('.');
    let mut current = doc.get_mut(parts.next()?)?;
    for part in parts {
        current = match current {
            Bson::Document(d) => d.get_mut(part)?,
            Bson::Array(a) => a.get_mut(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(current)
}

/// Sets a dotted path, creating documents on the way; fails across a non-document.
pub fn set(doc: &mut Document, path: &str, value: Bson) -> Result<(), PathError> {
    let mut padding = MAX_PADDING;
    set_padded(doc, path, value, &mut padding)
}

/// [`set`], padding arrays by at most `padding` null elements (and counting them down).
pub fn set_padded(doc: &mut Document, path: &str, value: Bson, padding: &mut usize) -> Result<(), PathError> {
    if path.is_empty() || path.split('.').any(|p| p.is_empty() || p.starts_with('$')) {
        return Err(PathError::Invalid);
    }
    let (head, rest) = match path.split_once('.') {
        Some((h, r)) => (h, Some(r)),
        None => (path, None),
    };
    match rest {
        None => {
            doc.insert(head, value);
            Ok(())
        }
        Some(rest) => {
            let child = doc.entry(head.to_string()).or_insert_with(|| Bson::Document(Document::new()));
            set_in(child, rest, value, padding)
        }
    }
}

fn set_in(target: &mut Bson, rest: &str, value: Bson, padding: &mut usize) -> Result<(), PathError> {
    match target {
        Bson::Document(d) => set_padded(d, rest, value, padding),
        Bson::Array(items) => {
            let (head, tail) = match rest.split_once('.') {
                Some((h, t)) => (h, Some(t)),
                None => (rest, None),
            };
            let index: usize = head.parse().map_err(|_| PathError::NotIndex)?;
            if index >= items.len() {
                let added = index - items.len();
                if index > MAX_PADDING || added > *padding {
                    return Err(PathError::Backfill);
                }
                *padding -= added;
            }
            while items.len() <= index {
                items.push(Bson::Null);
            }
            match tail {
                None => {
                    items[index] = value;
                    Ok(())
                }
                Some(tail) => {
                    if matches!(items[index], Bson::Null) {
                        items[index] = Bson::Document(Document::new());
                    }
                    set_in(&mut items[index], tail, value, padding)
                }
            }
        }
        _ => Err(PathError::NotDocument),
    }
}

/// Removes a dotted path if present (array elements become null, as in MongoDB).
pub fn unset(doc: &mut Document, path: &str) {
    match path.rsplit_once('.') {
        None => {
            doc.remove(path);
        }
        Some((parent, last)) => match get_mut(doc, parent) {
            Some(Bson::Document(d)) => {
                d.remove(last);
            }
            Some(Bson::Array(a)) => {
                if let Some(slot) = last.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                    *slot = Bson::Null;
                }
            }
            _ => {}
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    #[test]
    fn reads_sets_and_removes_dotted_paths() {
        let mut d = doc! {"a": {"b": [1, {"c": 2}]}};
        assert_eq!(get(&d, "a.b.1.c"), Some(&Bson::Int32(2)));
        assert_eq!(get(&d, "a.x"), None);
        set(&mut d, "a.b.3", Bson::Int32(9)).unwrap();
        assert_eq!(get(&d, "a.b"), Some(&Bson::Array(vec![1.into(), doc! {"c": 2}.into(), Bson::Null, 9.into()])));
        unset(&mut d, "a.b.0");
        assert_eq!(get(&d, "a.b.0"), Some(&Bson::Null));
        assert_eq!(set(&mut d, "a.b.x", Bson::Null), Err(PathError::NotIndex));
        assert_eq!(set(&mut d, "a..b", Bson::Null), Err(PathError::Invalid));
        assert_eq!(set(&mut d, "a.b.1.c.d", Bson::Null), Err(PathError::NotDocument));
        // Padding counts down over calls: 5 elements fit a budget of 10, another 20 do not.
        let mut budget = 10;
        let mut padded = doc! {"z": []};
        set_padded(&mut padded, "z.5", Bson::Null, &mut budget).unwrap();
        assert_eq!(budget, 5);
        assert_eq!(set_padded(&mut padded, "z.26", Bson::Null, &mut budget), Err(PathError::Backfill));
    }
}
