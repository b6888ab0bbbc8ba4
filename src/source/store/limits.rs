//! MongoDB's limits on stored documents, checked before a write is committed and before a
//! stored document is decoded.
//!
//! - A document is at most 16 MiB of BSON ([`MAX_BSON_SIZE`], MongoDB's `BSONObjectTooLarge`).
//! - Documents nest at most 100 levels ([`MAX_NESTING_DEPTH`]), arrays included.
//!
//! The depth of stored bytes is measured without recursion, so a document written by an older
//! build (or a corrupt page) can never overflow a thread's stack when it is read: it fails
//! with an error instead.

use bson::Document;
use bson::raw::{RawBsonRef, RawDocument, RawIter};

/// The largest document MongoDB stores, in bytes of BSON.
pub const MAX_BSON_SIZE: usize = 16 * 1024 * 1024;

/// The deepest nesting MongoDB accepts in a stored document.
pub const MAX_NESTING_DEPTH: usize = livegrid_matcher::MAX_NESTING_DEPTH;

/// A document outside MongoDB's limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Larger than [`MAX_BSON_SIZE`].
    #[error("document is {size} bytes of BSON; at most {MAX_BSON_SIZE} are allowed (BSONObjectTooLarge, code 10334)")]
    TooLarge {
        /// Its size in bytes.
        size: usize,
    },
    /// An update would make the document larger than [`MAX_BSON_SIZE`].
    #[error("resulting document after update is {size} bytes, larger than {MAX_BSON_SIZE} (code 17419)")]
    UpdatedTooLarge {
        /// Its size in bytes.
        size: usize,
    },
    /// Nested deeper than [`MAX_NESTING_DEPTH`].
    #[error("document nests deeper than {MAX_NESTING_DEPTH} levels (code 15)")]
    TooDeep,
    /// The bytes are not BSON.
    #[error("malformed BSON: {0}")]
    Malformed(String),
}

/// Encodes `doc`, checking its size and depth.
pub fn encode_checked(doc: &Document) -> Result<Vec<u8>, LimitError> {
    let bytes = doc.to_vec().map_err(|e| LimitError::Malformed(e.to_string()))?;
    check_bytes(&bytes)?;
    Ok(bytes)
}

/// Checks encoded BSON for size and depth, iteratively.
pub fn check_bytes(bytes: &[u8]) -> Result<(), LimitError> {
    if bytes.len() > MAX_BSON_SIZE {
        return Err(LimitError::TooLarge { size: bytes.len() });
    }
    let root = RawDocument::from_bytes(bytes).map_err(|e| LimitError::Malformed(e.to_string()))?;
    // One iterator per open level: the stack's length is the current depth.
    let mut stack: Vec<RawIter<'_>> = vec![root.iter_elements()];
    while let Some(top) = stack.last_mut() {
        let Some(element) = top.next() else {
            stack.pop();
            continue;
        };
        let element = element.map_err(|e| LimitError::Malformed(e.to_string()))?;
        let child = match element.value().map_err(|e| LimitError::Malformed(e.to_string()))? {
            RawBsonRef::Document(d) => d.iter_elements(),
            RawBsonRef::Array(a) => a.iter_elements(),
            _ => continue,
        };
        if stack.len() >= MAX_NESTING_DEPTH {
            return Err(LimitError::TooDeep);
        }
        stack.push(child);
    }
    Ok(())
}

/// Decodes stored bytes, refusing (rather than overflowing on) anything too deep.
pub fn decode_checked(bytes: &[u8]) -> Result<Document, LimitError> {
    check_bytes(bytes)?;
    Document::from_reader(bytes).map_err(|e| LimitError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{Bson, doc};

    /// Raw BSON nested `depth` levels deep (built by hand: building it as a `Document` and
    /// dropping it would recurse).
    fn nested_bytes(depth: usize) -> Vec<u8> {
        // {"a": {"a": ... {} ...}}: each level adds 4 (length) + 1 (type) + 2 ("a\0") + 1 (end).
        let mut inner: Vec<u8> = vec![5, 0, 0, 0, 0];
        for _ in 0..depth {
            let len = (4 + 1 + 2 + inner.len() + 1) as i32;
            let mut outer = len.to_le_bytes().to_vec();
            outer.extend_from_slice(&[0x03, b'a', 0]);
            outer.extend_from_slice(&inner);
            outer.push(0);
            inner = outer;
        }
        inner
    }

    #[test]
    fn depth_is_measured_without_recursion() {
        assert!(check_bytes(&nested_bytes(MAX_NESTING_DEPTH - 1)).is_ok());
        assert_eq!(check_bytes(&nested_bytes(MAX_NESTING_DEPTH)), Err(LimitError::TooDeep));
        // Far deeper than any stack could recurse through.
        assert_eq!(decode_checked(&nested_bytes(200_000)).unwrap_err(), LimitError::TooDeep);
        let arrays = doc! {"a": [[[[1]]]]};
        assert!(encode_checked(&arrays).is_ok());
    }

    #[test]
    fn size_is_limited() {
        let big = doc! {"s": "x".repeat(MAX_BSON_SIZE)};
        assert!(matches!(encode_checked(&big), Err(LimitError::TooLarge { .. })));
        let fits = doc! {"s": Bson::String("x".repeat(MAX_BSON_SIZE - 100))};
        assert!(encode_checked(&fits).is_ok());
        assert!(matches!(check_bytes(&[1, 2, 3]), Err(LimitError::Malformed(_))));
    }
}
