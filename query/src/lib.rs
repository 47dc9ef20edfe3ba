//! The query language of the space.
//!
//! A [`Query`] names an entry type and holds a [`Filter`] over that type's fields. Queries
//! are built in code with the builder ([`Query::of`]), from a template struct whose `None`
//! fields are wildcards ([`Query::like`]), or parsed from the text syntax used on the
//! command line ([`Query::parse`], syntax in the [`text`] module docs). They are
//! serde-serializable so they can travel over the wire.
//!
//! Entries are matched as documents: [`to_fields`] turns any `Serialize` struct into
//! [`Fields`] (field name → [`Value`]) and [`from_fields`] turns them back. The native
//! matcher ([`Query::matches`]) evaluates a query over a document; its meaning is the one
//! docs/ARCHITECTURE.md section 5 fixes: numbers compare as numbers across integer and float, strings
//! exactly, a missing field never equals anything, list fields are multi-valued.
//!
//! Many queries are matched against each written entry by the [`Percolator`] (notify at
//! scale), and `tantivy_form` (with the `tantivy` feature) gives every query its reference
//! meaning as a tantivy query, which the tests check the other two against.
//!
//! This crate knows nothing of spaces or networks.

mod de;
mod depth;
mod error;
mod kind;
mod matcher;
mod names;
mod percolator;
mod query;
mod ser;
#[cfg(feature = "tantivy")]
pub mod tantivy_form;
pub mod text;
mod value;
mod words;

pub use de::{from_fields, from_value};
pub use depth::MAX_DEPTH;
pub use error::{DocumentError, QueryError, Result};
pub use kind::ValueKind;
pub use names::{MAX_ENTRY_TYPE_BYTES, validate_entry_type, validate_path};
pub use percolator::{MatchStats, Percolator, SubscriptionId};
pub use query::{EntryType, Filter, Query};
pub use ser::{to_fields, to_value};
pub use value::{FieldName, Fields, IndexValue, Value};
pub use words::{MAX_WORD_BYTES, words};
