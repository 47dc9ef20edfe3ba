//! What a typed entry's fields are, read from its serde form, so that a query that names a
//! field the type does not have, or compares a field with a literal of another kind, is
//! an error at once rather than a silent non-match.
//!
//! The shape of a Rust entry type is traced once per type with `serde-reflection` (its
//! `Deserialize` implementation, walked with sample values, says each field's name and
//! format) and cached. Types whose form cannot be traced (hand-written `Deserialize`
//! impls that refuse the samples, `#[serde(flatten)]`, untagged enums) are not checked:
//! their queries behave as for types written without a Rust declaration.

use std::any::TypeId;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

use parking_lot::RwLock;
use serde_reflection::{ContainerFormat, Format, Registry, Tracer, TracerConfig};
use space_query::{Filter, Query, Value, ValueKind};

use crate::entry::Entry;
use crate::error::Result;
use space_query::QueryError;

/// What the values at one place of an entry can be.
#[derive(Clone, Debug, PartialEq)]
enum Shape {
    /// Not known (an enum, a type traced only in part): not checked below this point.
    Any,
    /// A value of this kind.
    Scalar(ValueKind),
    /// A list of such values; a path through it reaches every element.
    List(Box<Shape>),
    /// A struct with these fields.
    Struct(BTreeMap<String, Shape>),
    /// A map with keys only known at run time, of such values.
    Map(Box<Shape>),
    /// Such a value, or null.
    Optional(Box<Shape>),
}

/// Nesting followed when turning formats into shapes (recursive types stop being checked
/// below it).
const MAX_SHAPE_DEPTH: usize = 32;

impl Shape {
    fn of(format: &Format, registry: &Registry, depth: usize) -> Shape {
        if depth > MAX_SHAPE_DEPTH {
            return Shape::Any;
        }
        let scalar = Shape::Scalar;
        match format {
            Format::Bool => scalar(ValueKind::Bool),
            Format::I8
            | Format::I16
            | Format::I32
            | Format::I64
            | Format::U8
            | Format::U16
            | Format::U32
            | Format::U64
            | Format::F32
            | Format::F64 => scalar(ValueKind::Number),
            Format::Char | Format::Str => scalar(ValueKind::String),
            Format::Bytes => scalar(ValueKind::Bytes),
            Format::Unit => scalar(ValueKind::Null),
            Format::Option(inner) => {
                Shape::Optional(Box::new(Shape::of(inner, registry, depth + 1)))
            }
            Format::Seq(inner) | Format::TupleArray { content: inner, .. } => {
                Shape::List(Box::new(Shape::of(inner, registry, depth + 1)))
            }
            Format::Tuple(_) => Shape::List(Box::new(Shape::Any)),
            Format::Map { value, .. } => {
                Shape::Map(Box::new(Shape::of(value, registry, depth + 1)))
            }
            Format::TypeName(name) => match registry.get(name) {
                Some(ContainerFormat::Struct(fields)) => Shape::Struct(
                    fields
                        .iter()
                        .map(|f| (f.name.clone(), Shape::of(&f.value, registry, depth + 1)))
                        .collect(),
                ),
                Some(ContainerFormat::NewTypeStruct(inner)) => {
                    Shape::of(inner, registry, depth + 1)
                }
                Some(ContainerFormat::TupleStruct(_)) => Shape::List(Box::new(Shape::Any)),
                Some(ContainerFormat::UnitStruct) => scalar(ValueKind::Null),
                // Variants are strings or maps, and may not all be known.
                Some(ContainerFormat::Enum(_)) | None => Shape::Any,
            },
            // 128-bit integers may be written as strings; formats not traced to the end.
            Format::I128 | Format::U128 | Format::Variable(_) => Shape::Any,
        }
    }

    /// The shape the dotted `path` reaches, or the error for its first unknown field.
    fn at<'a>(&'a self, path: &str, entry_type: &str) -> Result<&'a Shape, QueryError> {
        let mut here = self;
        for (i, part) in path.split('.').enumerate() {
            here = here.through();
            here = match here {
                Shape::Struct(fields) => match fields.get(part) {
                    Some(shape) => shape,
                    None => {
                        let parent = path.split('.').take(i).collect::<Vec<_>>().join(".");
                        return Err(QueryError::UnknownField {
                            entry_type: entry_type.to_owned(),
                            field: path.to_owned(),
                            known: fields
                                .keys()
                                .map(|k| {
                                    if parent.is_empty() {
                                        k.clone()
                                    } else {
                                        format!("{parent}.{k}")
                                    }
                                })
                                .collect(),
                        });
                    }
                },
                Shape::Map(values) => values,
                // A path into a number, a string...: it reaches nothing.
                Shape::Scalar(kind) => {
                    return Err(QueryError::WrongType {
                        field: path.to_owned(),
                        field_kind: *kind,
                        literal_kind: ValueKind::Map,
                    });
                }
                _ => return Ok(&Shape::Any),
            };
        }
        Ok(here)
    }

    /// The shape of what a comparison meets here: inside options and lists (a list
    /// field matches when any element matches).
    fn through(&self) -> &Shape {
        let mut here = self;
        while let Shape::Optional(inner) | Shape::List(inner) = here {
            here = inner;
        }
        here
    }

    /// Whether a literal of `kind` can ever equal a value of this shape.
    fn admits(&self, kind: ValueKind) -> bool {
        if kind == ValueKind::Null {
            return true;
        }
        match self {
            Shape::Any => true,
            Shape::Scalar(k) => *k == kind,
            Shape::Struct(_) | Shape::Map(_) => kind == ValueKind::Map,
            // A whole list compared with a list literal, or an element with a scalar.
            Shape::List(inner) => kind == ValueKind::List || inner.admits(kind),
            Shape::Optional(inner) => inner.admits(kind),
        }
    }

    /// The kind to name in an error about this shape.
    fn kind(&self) -> ValueKind {
        match self.through() {
            Shape::Scalar(k) => *k,
            Shape::Struct(_) | Shape::Map(_) => ValueKind::Map,
            _ => ValueKind::List,
        }
    }
}

/// The shapes of the entry types used so far, by Rust type (`None`: not traceable).
fn shapes() -> &'static RwLock<HashMap<TypeId, Option<Arc<Shape>>>> {
    static SHAPES: OnceLock<RwLock<HashMap<TypeId, Option<Arc<Shape>>>>> = OnceLock::new();
    SHAPES.get_or_init(Default::default)
}

/// The shapes of the entry types used so far, by entry type name, for the calls that
/// name no Rust type (count, notify): the shape of the Rust type this process used for
/// the name first.
fn shapes_by_name() -> &'static RwLock<HashMap<&'static str, Arc<Shape>>> {
    static BY_NAME: OnceLock<RwLock<HashMap<&'static str, Arc<Shape>>>> = OnceLock::new();
    BY_NAME.get_or_init(Default::default)
}

/// The shape of `T`, traced on first use.
fn shape_of<T: Entry>() -> Option<Arc<Shape>> {
    let id = TypeId::of::<T>();
    if let Some(known) = shapes().read().get(&id) {
        return known.clone();
    }
    let traced = trace::<T>().map(Arc::new);
    match &traced {
        Some(shape) => {
            shapes_by_name()
                .write()
                .entry(T::ENTRY_TYPE)
                .or_insert_with(|| shape.clone());
        }
        None => tracing::debug!(
            entry_type = T::ENTRY_TYPE,
            "the entry type's serde form could not be traced: its queries are not checked against its fields"
        ),
    }
    shapes().write().insert(id, traced.clone());
    traced
}

/// Makes `T`'s fields known for the calls that name no Rust type (a typed call does it
/// too).
pub(crate) fn declare<T: Entry>() {
    shape_of::<T>();
}

/// Checks a query of a call that names no Rust type (count, notify) against the fields
/// of the Rust type this process used for its entry type, if it used one.
pub(crate) fn check_named(query: &Query) -> Result<()> {
    let shape = shapes_by_name().read().get(query.entry_type()).cloned();
    match shape {
        Some(shape) => Ok(check_filter(&shape, query.filter(), query.entry_type())?),
        None => Ok(()),
    }
}

fn trace<T: Entry>() -> Option<Shape> {
    // Human-readable, as documents are made: a UUID is a string there, not bytes.
    let mut tracer = Tracer::new(TracerConfig::default().is_human_readable(true));
    let (format, _) = tracer.trace_simple_type::<T>().ok()?;
    // Enums seen with only some of their variants are fine: they are not checked.
    let registry = tracer.registry_unchecked();
    match Shape::of(&format, &registry, 0) {
        shape @ Shape::Struct(_) => Some(shape),
        _ => None,
    }
}

/// Checks a query on entries of type `T` against `T`'s fields: every field it names
/// exists, and every literal is of a kind the field can hold.
pub(crate) fn check_query<T: Entry>(query: &Query) -> Result<()> {
    match shape_of::<T>() {
        Some(shape) => Ok(check_filter(&shape, query.filter(), T::ENTRY_TYPE)?),
        None => Ok(()),
    }
}

fn check_filter(shape: &Shape, filter: &Filter, entry_type: &str) -> Result<(), QueryError> {
    let compare = |field: &str, values: &[&Value]| -> Result<(), QueryError> {
        let at = shape.at(field, entry_type)?;
        for value in values {
            if !at.admits(value.kind()) {
                return Err(QueryError::WrongType {
                    field: field.to_owned(),
                    field_kind: at.kind(),
                    literal_kind: value.kind(),
                });
            }
        }
        Ok(())
    };
    match filter {
        Filter::All => Ok(()),
        Filter::Eq(f, v)
        | Filter::Ne(f, v)
        | Filter::Lt(f, v)
        | Filter::Le(f, v)
        | Filter::Gt(f, v)
        | Filter::Ge(f, v) => compare(f, &[v]),
        Filter::Between(f, low, high) => compare(f, &[low, high]),
        Filter::In(f, values) => compare(f, &values.iter().collect::<Vec<_>>()),
        Filter::Exists(f) | Filter::Missing(f) => shape.at(f, entry_type).map(|_| ()),
        Filter::Prefix(f, _) | Filter::Text(f, _) => compare(f, &[&Value::Str(String::new())]),
        Filter::And(all) | Filter::Or(all) => all
            .iter()
            .try_for_each(|f| check_filter(shape, f, entry_type)),
        Filter::Not(inner) => check_filter(shape, inner, entry_type),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::SpaceError;
    use serde::{Deserialize, Serialize};
    use std::collections::HashMap;

    #[derive(Serialize, Deserialize)]
    struct Address {
        city: String,
        zip: Option<u32>,
    }

    #[derive(Serialize, Deserialize)]
    enum Status {
        New,
        Held { reason: String },
    }

    #[derive(Serialize, Deserialize)]
    struct Order {
        id: String,
        amount: f64,
        paid: bool,
        tags: Vec<String>,
        address: Address,
        status: Status,
        extra: HashMap<String, i64>,
        note: Option<String>,
    }
    crate::entry!(Order, "schema.Order");

    fn check(q: Query) -> Result<()> {
        check_query::<Order>(&q)
    }

    fn of() -> Query {
        Query::of::<Order>()
    }

    #[test]
    fn fields_and_kinds_that_fit_the_type_pass() {
        check(of()).unwrap();
        check(of().eq("id", "o-1").gt("amount", 10).eq("paid", true)).unwrap();
        check(of().eq("tags", "rush").eq("address.city", "Oslo")).unwrap();
        check(of().eq("address.zip", 1234).eq("extra.anything", 5)).unwrap();
        check(of().eq("status", "New").exists("note").prefix("id", "o-")).unwrap();
        check(of().eq("status.Held.reason", "x")).unwrap();
        check(of().eq("note", Value::Null)).unwrap();
    }

    #[test]
    fn a_field_the_type_lacks_is_named_with_the_fields_it_has() {
        let err = check(of().eq("amout", 10)).unwrap_err();
        let SpaceError::Query(QueryError::UnknownField { field, known, .. }) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(field, "amout");
        assert!(known.contains(&"amount".to_owned()), "{known:?}");
        assert!(err.to_string().contains("amount"), "{err}");
        let err = check(of().eq("address.town", "Oslo")).unwrap_err();
        let SpaceError::Query(QueryError::UnknownField { known, .. }) = &err else {
            panic!("{err:?}")
        };
        assert!(known.contains(&"address.city".to_owned()), "{known:?}");
        assert!(matches!(
            check(of().exists("nope")),
            Err(SpaceError::Query(QueryError::UnknownField { .. }))
        ));
    }

    #[test]
    fn a_literal_of_another_kind_is_refused() {
        for (q, field) in [
            (of().eq("amount", "10"), "amount"),
            (of().eq("id", 1), "id"),
            (of().eq("address.zip", "0150"), "address.zip"),
            (of().prefix("amount", "1"), "amount"),
            (of().eq("tags", 3), "tags"),
            (
                Query::new(
                    "schema.Order",
                    Filter::eq("id", "x").or(Filter::eq("paid", 1)),
                ),
                "paid",
            ),
        ] {
            match check(q) {
                Err(SpaceError::Query(QueryError::WrongType { field: f, .. })) => {
                    assert_eq!(f, field)
                }
                other => panic!("{field}: {other:?}"),
            }
        }
        let err = check(of().eq("amount", "ten")).unwrap_err();
        assert!(err.to_string().contains("number"), "{err}");
    }
}
