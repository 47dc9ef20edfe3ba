//! Errors of the query crate: one enum for documents, one for queries.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::kind::ValueKind;

/// What went wrong turning a Rust value into an entry document or back.
#[derive(Clone, Debug, Error, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum DocumentError {
    /// The top level of an entry must be a struct (or a map with string keys).
    #[error("an entry must be a struct or a map with string keys, not a {found}")]
    NotAStruct {
        /// The kind of value that was given instead.
        found: ValueKind,
    },
    /// A value the document model cannot hold, such as an integer wider than 64 bits.
    #[error("unsupported value: {0}")]
    Unsupported(String),
    /// A map whose keys are not strings or integers.
    #[error("map keys must be strings or integers, not {0}")]
    MapKey(String),
    /// The entry's own `Serialize` or `Deserialize` implementation reported a problem, or
    /// a document did not have the shape of the requested type.
    #[error("{0}")]
    Custom(String),
    /// Lists and maps nested deeper than the limit ([`MAX_DEPTH`](crate::MAX_DEPTH)).
    #[error("the document is nested deeper than {limit} levels")]
    TooDeep {
        /// The deepest nesting accepted.
        limit: usize,
    },
    /// A top-level field whose name no query could address (empty, or with characters
    /// other than letters, digits, `_` and `-`).
    #[error("field name {name:?}: {reason}")]
    FieldName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl serde::ser::Error for DocumentError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        DocumentError::Custom(msg.to_string())
    }
}

impl serde::de::Error for DocumentError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        DocumentError::Custom(msg.to_string())
    }
}

/// What is wrong with a query.
#[derive(Clone, Debug, Error, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum QueryError {
    /// The text form could not be parsed; `position` is the byte offset of the problem.
    #[error("syntax error at position {position}: {message}")]
    Syntax {
        /// Byte offset into the query text.
        position: usize,
        /// What was expected or found there.
        message: String,
    },
    /// A field path that is empty or has an empty segment (`a..b`).
    #[error("invalid field name {field:?}: {reason}")]
    InvalidField {
        /// The field path as given.
        field: String,
        /// Why it is not valid.
        reason: String,
    },
    /// A literal a query cannot compare with: NaN, bytes, lists, maps or null.
    #[error("field {field:?}: {reason}")]
    InvalidLiteral {
        /// The field the literal was compared with.
        field: String,
        /// Why the literal is not usable.
        reason: String,
    },
    /// A `between` whose bounds are of different kinds or out of order.
    #[error("field {field:?}: empty or mixed range: {reason}")]
    BadRange {
        /// The field of the range.
        field: String,
        /// What is wrong with the bounds.
        reason: String,
    },
    /// A text predicate without a single word in it.
    #[error("field {field:?}: text predicate has no words to match")]
    NoWords {
        /// The field of the text predicate.
        field: String,
    },
    /// A prefix predicate with an empty prefix (use `exists` instead).
    #[error("field {field:?}: empty prefix (use exists({field}) to test for presence)")]
    EmptyPrefix {
        /// The field of the prefix predicate.
        field: String,
    },
    /// A query literal of a kind that the field never holds, for example a number compared
    /// with a string field.
    #[error(
        "field {field:?} holds {field_kind} values, but the query compares it with a {literal_kind}"
    )]
    WrongType {
        /// The field.
        field: String,
        /// The kind of value the entry type stores in that field.
        field_kind: ValueKind,
        /// The kind of the literal in the query.
        literal_kind: ValueKind,
    },
    /// A field the entry type does not have (its Rust declaration lists its fields).
    #[error("entry type {entry_type:?} has no field {field:?}; its fields are {known:?}")]
    UnknownField {
        /// The entry type.
        entry_type: String,
        /// The field path as given.
        field: String,
        /// The fields the type has at that level (dotted paths).
        known: Vec<String>,
    },
    /// A template could not be turned into a query.
    #[error("template: {0}")]
    Template(DocumentError),
    /// AND, OR and NOT nested deeper than the limit ([`MAX_DEPTH`](crate::MAX_DEPTH)).
    #[error("the query is nested deeper than {limit} levels")]
    TooDeep {
        /// The deepest nesting accepted.
        limit: usize,
    },
}

impl From<DocumentError> for QueryError {
    fn from(e: DocumentError) -> Self {
        QueryError::Template(e)
    }
}

/// Result alias for this crate's query operations.
pub type Result<T, E = QueryError> = std::result::Result<T, E>;
