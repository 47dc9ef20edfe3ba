//! The coarse kinds of document values, for schema checks and error messages.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The coarse kind of a value, used for schema checks and error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ValueKind {
    /// `Value::Null`.
    Null,
    /// `Value::Bool`.
    Bool,
    /// Any of `I64`, `U64`, `F64`.
    Number,
    /// `Value::Str`.
    String,
    /// `Value::Bytes`.
    Bytes,
    /// `Value::List`.
    List,
    /// `Value::Map`.
    Map,
}

impl fmt::Display for ValueKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ValueKind::Null => "null",
            ValueKind::Bool => "bool",
            ValueKind::Number => "number",
            ValueKind::String => "string",
            ValueKind::Bytes => "bytes",
            ValueKind::List => "list",
            ValueKind::Map => "map",
        })
    }
}
