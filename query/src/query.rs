//! The query tree and its builder.

use serde::{Deserialize, Serialize};

use crate::error::{QueryError, Result};
use crate::names::{validate_entry_type, validate_path};
use crate::value::{Value, ValueKind};

/// A Rust type that names an entry type. Queries are always for one entry type.
///
/// `space-core`'s `Entry` trait builds on this; declare both with its `entry!` macro.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not declared as an entry type of the space",
    label = "not declared with `entry!`",
    note = "declare it next to the struct: `space_client::entry!({Self}, \"{Self}\");`"
)]
pub trait EntryType {
    /// The stable name of the entry type, such as `"OrderMessage"`. It is what the space
    /// stores and matches on, so it must not change when the Rust type is renamed.
    const ENTRY_TYPE: &'static str;
}

/// A predicate over one entry type's fields.
///
/// Build one with [`Query::of`] and the builder methods, from a template with
/// [`Query::like`], or from text with [`Query::parse`]. Consecutive builder calls are
/// joined with AND.
///
/// ```
/// # use space_query::{Query, EntryType, Filter};
/// struct Order;
/// impl EntryType for Order { const ENTRY_TYPE: &'static str = "Order"; }
/// let q = Query::of::<Order>()
///     .eq("status", "ReadyToShip")
///     .gt("amount", 100)
///     .and(Filter::eq("region", "eu").or(Filter::eq("region", "us")));
/// assert_eq!(q.to_string(), r#"status:ReadyToShip AND amount:>100 AND (region:eu OR region:us)"#);
/// assert_eq!(Query::parse("Order", &q.to_string()).unwrap(), q);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Query {
    entry_type: String,
    filter: Filter,
}

/// The predicate part of a query. Field names are dotted paths (`address.city`); a path
/// that reaches a list matches when any element matches.
///
/// Decoding a filter counts its nesting and refuses more than
/// [`MAX_DEPTH`](crate::MAX_DEPTH) levels, so a hostile frame cannot overflow the stack.
// `remote = "Self"` makes the derives inherent functions, which the trait impls below wrap
// (decoding with a depth guard around every level).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub enum Filter {
    /// Every entry of the type.
    All,
    /// The field equals the value (numbers compare numerically across int and float).
    Eq(String, Value),
    /// The field is present and does not equal the value.
    Ne(String, Value),
    /// The field is less than the value.
    Lt(String, Value),
    /// The field is less than or equal to the value.
    Le(String, Value),
    /// The field is greater than the value.
    Gt(String, Value),
    /// The field is greater than or equal to the value.
    Ge(String, Value),
    /// `low <= field <= high`.
    Between(String, Value, Value),
    /// The field equals one of the values.
    In(
        String,
        #[serde(deserialize_with = "crate::depth::small_vec")] Vec<Value>,
    ),
    /// The field is present and not null.
    Exists(String),
    /// The field is absent or null.
    Missing(String),
    /// The string field starts with the prefix.
    Prefix(String, String),
    /// The string field contains every word of the text (words are split on anything that
    /// is not a letter or digit, and compared in lower case).
    Text(String, String),
    /// All of the filters hold.
    And(#[serde(deserialize_with = "crate::depth::small_vec")] Vec<Filter>),
    /// At least one of the filters holds.
    Or(#[serde(deserialize_with = "crate::depth::small_vec")] Vec<Filter>),
    /// The filter does not hold.
    Not(Box<Filter>),
}

impl Serialize for Filter {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        Filter::serialize(self, s)
    }
}

impl<'de> Deserialize<'de> for Filter {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let _level = crate::depth::Guard::enter("a query's filter")?;
        Filter::deserialize(d)
    }
}

macro_rules! leaf_builders {
    ($($(#[$doc:meta])* $name:ident => $variant:ident;)*) => {
        impl Filter {
            $(
                $(#[$doc])*
                pub fn $name(field: impl Into<String>, value: impl Into<Value>) -> Filter {
                    Filter::$variant(field.into(), value.into())
                }
            )*
        }
        impl Query {
            $(
                $(#[$doc])*
                #[must_use]
                pub fn $name(self, field: impl Into<String>, value: impl Into<Value>) -> Query {
                    self.and(Filter::$name(field, value))
                }
            )*
        }
    };
}

leaf_builders! {
    /// `field == value`.
    eq => Eq;
    /// `field != value` (and the field is present).
    ne => Ne;
    /// `field < value`.
    lt => Lt;
    /// `field <= value`.
    le => Le;
    /// `field > value`.
    gt => Gt;
    /// `field >= value`.
    ge => Ge;
}

impl Filter {
    /// `low <= field <= high`.
    pub fn between(
        field: impl Into<String>,
        low: impl Into<Value>,
        high: impl Into<Value>,
    ) -> Filter {
        Filter::Between(field.into(), low.into(), high.into())
    }

    /// `field` equals one of `values`.
    pub fn is_in<V: Into<Value>>(
        field: impl Into<String>,
        values: impl IntoIterator<Item = V>,
    ) -> Filter {
        Filter::In(field.into(), values.into_iter().map(Into::into).collect())
    }

    /// `field` is present and not null.
    pub fn exists(field: impl Into<String>) -> Filter {
        Filter::Exists(field.into())
    }

    /// `field` is absent or null.
    pub fn missing(field: impl Into<String>) -> Filter {
        Filter::Missing(field.into())
    }

    /// The string `field` starts with `prefix`.
    pub fn prefix(field: impl Into<String>, prefix: impl Into<String>) -> Filter {
        Filter::Prefix(field.into(), prefix.into())
    }

    /// The string `field` contains every word of `words`.
    pub fn text(field: impl Into<String>, words: impl Into<String>) -> Filter {
        Filter::Text(field.into(), words.into())
    }

    /// Both filters; nested ANDs are flattened and `All` drops out.
    #[must_use]
    pub fn and(self, other: Filter) -> Filter {
        let mut parts = Vec::new();
        for f in [self, other] {
            match f {
                Filter::All => {}
                Filter::And(inner) => parts.extend(inner),
                f => parts.push(f),
            }
        }
        match parts.len() {
            0 => Filter::All,
            1 => parts.pop().unwrap_or(Filter::All),
            _ => Filter::And(parts),
        }
    }

    /// Either filter; nested ORs are flattened and an `All` makes the whole OR `All`.
    #[must_use]
    pub fn or(self, other: Filter) -> Filter {
        let mut parts = Vec::new();
        for f in [self, other] {
            match f {
                Filter::All => return Filter::All,
                Filter::Or(inner) => parts.extend(inner),
                f => parts.push(f),
            }
        }
        Filter::Or(parts)
    }

    /// The negation of `filter`.
    #[allow(clippy::should_implement_trait)]
    pub fn not(filter: Filter) -> Filter {
        Filter::Not(Box::new(filter))
    }

    /// Checks that field names and literals make sense: no empty path segments, no NaN or
    /// non-scalar literals, ranges with comparable ordered bounds, text with words; and
    /// that AND, OR and NOT nest at most [`MAX_DEPTH`](crate::MAX_DEPTH) levels (checked
    /// first, and without walking past the limit).
    ///
    /// # Errors
    ///
    /// The first problem found: the error names the field and says why.
    pub fn validate(&self) -> Result<()> {
        if !self.within_depth(1) {
            return Err(QueryError::TooDeep {
                limit: crate::MAX_DEPTH,
            });
        }
        self.visit_leaves(&mut |leaf| leaf.validate_leaf())
    }

    /// Whether this filter, at `depth`, nests no deeper than the limit.
    fn within_depth(&self, depth: usize) -> bool {
        if depth > crate::MAX_DEPTH {
            return false;
        }
        match self {
            Filter::And(parts) | Filter::Or(parts) => {
                parts.iter().all(|p| p.within_depth(depth + 1))
            }
            Filter::Not(inner) => inner.within_depth(depth + 1),
            _ => true,
        }
    }

    /// Calls `f` on every leaf predicate (not on `All`, `And`, `Or`, `Not`).
    ///
    /// # Errors
    ///
    /// The first error `f` returns; the walk stops there.
    pub fn visit_leaves(&self, f: &mut dyn FnMut(&Filter) -> Result<()>) -> Result<()> {
        match self {
            Filter::All => Ok(()),
            Filter::And(parts) | Filter::Or(parts) => {
                parts.iter().try_for_each(|p| p.visit_leaves(f))
            }
            Filter::Not(inner) => inner.visit_leaves(f),
            leaf => f(leaf),
        }
    }

    /// The field path of a leaf predicate.
    pub fn field(&self) -> Option<&str> {
        match self {
            Filter::Eq(f, _)
            | Filter::Ne(f, _)
            | Filter::Lt(f, _)
            | Filter::Le(f, _)
            | Filter::Gt(f, _)
            | Filter::Ge(f, _)
            | Filter::Between(f, _, _)
            | Filter::In(f, _)
            | Filter::Exists(f)
            | Filter::Missing(f)
            | Filter::Prefix(f, _)
            | Filter::Text(f, _) => Some(f),
            Filter::All | Filter::And(_) | Filter::Or(_) | Filter::Not(_) => None,
        }
    }

    /// The literal values a leaf compares its field with.
    pub fn literals(&self) -> Vec<&Value> {
        match self {
            Filter::Eq(_, v)
            | Filter::Ne(_, v)
            | Filter::Lt(_, v)
            | Filter::Le(_, v)
            | Filter::Gt(_, v)
            | Filter::Ge(_, v) => vec![v],
            Filter::Between(_, a, b) => vec![a, b],
            Filter::In(_, vs) => vs.iter().collect(),
            _ => Vec::new(),
        }
    }

    fn validate_leaf(&self) -> Result<()> {
        let Some(field) = self.field() else {
            return Ok(());
        };
        validate_path(field)?;
        for literal in self.literals() {
            validate_literal(field, literal)?;
        }
        let is_range = matches!(
            self,
            Filter::Lt(..) | Filter::Le(..) | Filter::Gt(..) | Filter::Ge(..) | Filter::Between(..)
        );
        if is_range
            && let Some(b) = self
                .literals()
                .into_iter()
                .find(|v| matches!(v, Value::Bool(_)))
        {
            return Err(QueryError::InvalidLiteral {
                field: field.to_owned(),
                reason: format!(
                    "a range needs numbers or strings, not {b:?}; use field:true or field:false"
                ),
            });
        }
        match self {
            Filter::Between(_, low, high) => match low.compare(high) {
                None => Err(QueryError::BadRange {
                    field: field.to_owned(),
                    reason: format!("cannot compare a {} with a {}", low.kind(), high.kind()),
                }),
                Some(std::cmp::Ordering::Greater) => Err(QueryError::BadRange {
                    field: field.to_owned(),
                    reason: "the low bound is above the high bound".to_owned(),
                }),
                Some(_) => Ok(()),
            },
            Filter::In(_, values) if values.is_empty() => Err(QueryError::InvalidLiteral {
                field: field.to_owned(),
                reason: "an IN list needs at least one value".to_owned(),
            }),
            Filter::Text(_, words) if crate::words::words(words).next().is_none() => {
                Err(QueryError::NoWords {
                    field: field.to_owned(),
                })
            }
            Filter::Prefix(_, p) if p.is_empty() => Err(QueryError::EmptyPrefix {
                field: field.to_owned(),
            }),
            _ => Ok(()),
        }
    }
}

impl std::ops::Not for Filter {
    type Output = Filter;
    fn not(self) -> Filter {
        Filter::not(self)
    }
}

fn validate_literal(field: &str, v: &Value) -> Result<()> {
    let reason = match v {
        Value::F64(f) if f.is_nan() => "NaN matches nothing; compare with a number".to_owned(),
        Value::F64(f) if f.is_infinite() => "infinite numbers are not allowed".to_owned(),
        Value::Null => "null is not a value to compare with; use missing(field)".to_owned(),
        Value::Bytes(_) | Value::List(_) | Value::Map(_) => {
            format!(
                "a {} is not a value to compare with; use a string, number or bool",
                v.kind()
            )
        }
        _ => return Ok(()),
    };
    Err(QueryError::InvalidLiteral {
        field: field.to_owned(),
        reason,
    })
}

impl Query {
    /// Every entry of the entry type `T`; narrow it with the builder methods.
    pub fn of<T: EntryType + ?Sized>() -> Query {
        Query::for_type(T::ENTRY_TYPE)
    }

    /// Every entry of the named entry type (for tools that do not have the Rust type).
    pub fn for_type(entry_type: impl Into<String>) -> Query {
        Query {
            entry_type: entry_type.into(),
            filter: Filter::All,
        }
    }

    /// A query from an entry type name and a filter.
    pub fn new(entry_type: impl Into<String>, filter: Filter) -> Query {
        Query {
            entry_type: entry_type.into(),
            filter,
        }
    }

    /// Template-by-example: every field of `template` that is not `None` (null) must be
    /// equal; `None` fields are wildcards. Nested structs become dotted paths.
    ///
    /// # Errors
    /// [`QueryError::Template`] when `template` is not a struct, and
    /// [`QueryError::InvalidLiteral`] for a field holding a list, bytes or a map of a kind
    /// that cannot be compared.
    pub fn like<T: EntryType + ?Sized>(template: &impl Serialize) -> Result<Query> {
        let fields = crate::to_fields(template)?;
        let mut filter = Filter::All;
        add_template_fields(&mut filter, "", &fields)?;
        Ok(Query {
            entry_type: T::ENTRY_TYPE.to_owned(),
            filter,
        })
    }

    /// The entry type this query is for.
    pub fn entry_type(&self) -> &str {
        &self.entry_type
    }

    /// The predicate.
    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    /// ANDs another filter onto this query.
    #[must_use]
    pub fn and(mut self, filter: Filter) -> Query {
        self.filter = std::mem::replace(&mut self.filter, Filter::All).and(filter);
        self
    }

    /// ORs another filter with this query's filter.
    #[must_use]
    pub fn or(mut self, filter: Filter) -> Query {
        self.filter = std::mem::replace(&mut self.filter, Filter::All).or(filter);
        self
    }

    /// ANDs the negation of `filter` onto this query.
    #[must_use]
    pub fn not(self, filter: Filter) -> Query {
        self.and(Filter::not(filter))
    }

    /// `low <= field <= high`.
    #[must_use]
    pub fn between(
        self,
        field: impl Into<String>,
        low: impl Into<Value>,
        high: impl Into<Value>,
    ) -> Query {
        self.and(Filter::between(field, low, high))
    }

    /// `field` equals one of `values`.
    #[must_use]
    pub fn is_in<V: Into<Value>>(
        self,
        field: impl Into<String>,
        values: impl IntoIterator<Item = V>,
    ) -> Query {
        self.and(Filter::is_in(field, values))
    }

    /// `field` is present and not null.
    #[must_use]
    pub fn exists(self, field: impl Into<String>) -> Query {
        self.and(Filter::exists(field))
    }

    /// `field` is absent or null.
    #[must_use]
    pub fn missing(self, field: impl Into<String>) -> Query {
        self.and(Filter::missing(field))
    }

    /// The string `field` starts with `prefix`.
    #[must_use]
    pub fn prefix(self, field: impl Into<String>, prefix: impl Into<String>) -> Query {
        self.and(Filter::prefix(field, prefix))
    }

    /// The string `field` contains every word of `words`.
    #[must_use]
    pub fn text(self, field: impl Into<String>, words: impl Into<String>) -> Query {
        self.and(Filter::text(field, words))
    }

    /// Checks field names and literals; see [`Filter::validate`]. The space calls this
    /// before it runs a query, so a bad query is an error, never a silent non-match.
    ///
    /// # Errors
    ///
    /// The first problem found: the error names the field and says why.
    pub fn validate(&self) -> Result<()> {
        if let Err(reason) = validate_entry_type(&self.entry_type) {
            return Err(QueryError::InvalidField {
                field: self.entry_type.clone(),
                reason: reason.to_owned(),
            });
        }
        self.filter.validate()
    }

    /// Checks the query's literals against the kinds of value each field holds, as told
    /// by `kind_of(field)` (`None` for a field not seen yet). A number compared with a
    /// string field is a [`QueryError::WrongType`].
    ///
    /// # Errors
    ///
    /// `QueryError::WrongType` for the first literal of another kind than its field holds.
    pub fn check_kinds(&self, kind_of: &dyn Fn(&str) -> Option<ValueKind>) -> Result<()> {
        self.filter.visit_leaves(&mut |leaf| {
            let Some(field) = leaf.field() else {
                return Ok(());
            };
            let Some(field_kind) = kind_of(field) else {
                return Ok(());
            };
            let literal_kinds: Vec<ValueKind> = match leaf {
                Filter::Prefix(..) | Filter::Text(..) => vec![ValueKind::String],
                _ => leaf.literals().iter().map(|v| v.kind()).collect(),
            };
            match literal_kinds.into_iter().find(|k| *k != field_kind) {
                Some(literal_kind) => Err(QueryError::WrongType {
                    field: field.to_owned(),
                    field_kind,
                    literal_kind,
                }),
                None => Ok(()),
            }
        })
    }
}

fn add_template_fields(filter: &mut Filter, prefix: &str, fields: &crate::Fields) -> Result<()> {
    for (name, value) in fields.iter() {
        let path = if prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{prefix}.{name}")
        };
        match value {
            Value::Null => {}
            Value::Map(inner) => add_template_fields(filter, &path, inner)?,
            Value::Bytes(_) | Value::List(_) => {
                return Err(QueryError::InvalidLiteral {
                    field: path,
                    reason: format!(
                        "a template field holding a {} cannot be matched; leave it None",
                        value.kind()
                    ),
                });
            }
            scalar => {
                let f = std::mem::replace(filter, Filter::All);
                *filter = f.and(Filter::Eq(path, scalar.clone()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Order;
    impl EntryType for Order {
        const ENTRY_TYPE: &'static str = "Order";
    }

    #[derive(Serialize)]
    struct OrderTemplate {
        status: Option<String>,
        amount: Option<u32>,
        address: Option<Address>,
    }

    #[derive(Serialize)]
    struct Address {
        city: Option<String>,
        zip: Option<u32>,
    }

    #[test]
    fn builder_joins_with_and_and_flattens() {
        let q = Query::of::<Order>()
            .eq("a", 1)
            .eq("b", 2)
            .and(Filter::eq("c", 3));
        assert_eq!(
            q.filter(),
            &Filter::And(vec![
                Filter::eq("a", 1),
                Filter::eq("b", 2),
                Filter::eq("c", 3)
            ])
        );
        assert_eq!(Query::of::<Order>().filter(), &Filter::All);
        assert_eq!(
            Query::of::<Order>().or(Filter::eq("a", 1)).filter(),
            &Filter::All
        );
    }

    #[test]
    fn templates_turn_set_fields_into_equalities() {
        let q = Query::like::<Order>(&OrderTemplate {
            status: Some("Ready".into()),
            amount: None,
            address: Some(Address {
                city: Some("Paris".into()),
                zip: None,
            }),
        })
        .unwrap();
        assert_eq!(
            q.filter(),
            &Filter::And(vec![
                Filter::eq("status", "Ready"),
                Filter::eq("address.city", "Paris")
            ])
        );
        let all = Query::like::<Order>(&OrderTemplate {
            status: None,
            amount: None,
            address: None,
        })
        .unwrap();
        assert_eq!(all.filter(), &Filter::All);
        assert!(matches!(
            Query::like::<Order>(&3u8),
            Err(QueryError::Template(_))
        ));
    }

    #[test]
    fn validation_names_the_problem() {
        let err = Query::of::<Order>()
            .gt("amount", f64::NAN)
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("NaN"), "{err}");
        let err = Query::of::<Order>()
            .between("a", 5, 1)
            .validate()
            .unwrap_err();
        assert!(matches!(err, QueryError::BadRange { .. }));
        let err = Query::of::<Order>()
            .between("a", 1, "x")
            .validate()
            .unwrap_err();
        assert!(matches!(err, QueryError::BadRange { .. }));
        let err = Query::of::<Order>().eq("a..b", 1).validate().unwrap_err();
        assert!(matches!(err, QueryError::InvalidField { .. }));
        let err = Query::of::<Order>()
            .text("body", "  ,, ")
            .validate()
            .unwrap_err();
        assert!(matches!(err, QueryError::NoWords { .. }));
        let err = Query::of::<Order>()
            .is_in("a", Vec::<i64>::new())
            .validate()
            .unwrap_err();
        assert!(matches!(err, QueryError::InvalidLiteral { .. }));
    }

    #[test]
    fn kinds_are_checked_against_the_schema() {
        let q = Query::of::<Order>().gt("amount", "lots");
        let err = q
            .check_kinds(&|f| (f == "amount").then_some(ValueKind::Number))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "field \"amount\" holds number values, but the query compares it with a string"
        );
        assert!(
            Query::of::<Order>()
                .gt("amount", 3.5)
                .check_kinds(&|_| Some(ValueKind::Number))
                .is_ok()
        );
    }
}
