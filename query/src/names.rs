//! Names: which field names and entry type names a query can address.

use crate::error::{QueryError, Result};

/// Checks a dotted field path: non-empty segments of letters, digits, `_` and `-`.
///
/// # Errors
///
/// `QueryError::InvalidField` saying what is wrong with the path.
pub fn validate_path(field: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(QueryError::InvalidField {
            field: field.to_owned(),
            reason: reason.to_owned(),
        })
    };
    if field.is_empty() {
        return bad("the field name is empty");
    }
    for segment in field.split('.') {
        if segment.is_empty() {
            return bad("a dotted path has an empty segment");
        }
        validate_segment(segment).or_else(bad)?;
    }
    Ok(())
}

/// Checks one field name (a segment of a path): why no query could address it, if so.
pub(crate) fn validate_segment(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        Err("the field name is empty")
    } else if !name.chars().all(is_field_char) {
        Err("field names may contain only letters, digits, '_' and '-'")
    } else {
        Ok(())
    }
}

/// Longest entry type name accepted, in bytes.
pub const MAX_ENTRY_TYPE_BYTES: usize = 256;

/// Checks an entry type name: not empty, at most [`MAX_ENTRY_TYPE_BYTES`] bytes, no
/// control characters. Says why not, if it is not usable.
///
/// # Errors
///
/// Why the name is not a valid entry type name.
pub fn validate_entry_type(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        Err("the entry type name is empty")
    } else if name.len() > MAX_ENTRY_TYPE_BYTES {
        Err("the entry type name is longer than 256 bytes")
    } else if name.chars().any(char::is_control) {
        Err("the entry type name contains control characters")
    } else {
        Ok(())
    }
}

/// Characters allowed in a field name segment.
pub(crate) fn is_field_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '-'
}
