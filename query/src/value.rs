//! Entry documents: the field values that queries are evaluated against.
//!
//! An entry is stored as [`Fields`]: an ordered list of `(name, Value)` pairs, produced from
//! any `Serialize` struct by [`to_fields`](crate::to_fields) and turned back into the struct
//! by [`from_fields`](crate::from_fields). Field names of Rust structs are `&'static str`,
//! so they are borrowed, not allocated, on every write.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::DocumentError;
pub use crate::kind::ValueKind;

/// The name of a field: borrowed for Rust struct fields, owned when decoded from elsewhere.
pub type FieldName = Cow<'static, str>;

/// One value in an entry document.
///
/// Numbers keep their original representation (`I64`, `U64`, `F64`) but compare as numbers
/// with each other: `3`, `3u64` and `3.0` are equal. Strings compare exactly (byte order).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// An absent value (`None`, `()`); a null field counts as missing.
    Null,
    /// A boolean.
    Bool(bool),
    /// A signed integer.
    I64(i64),
    /// An unsigned integer above `i64::MAX` or from an unsigned Rust field.
    U64(u64),
    /// A floating point number.
    F64(f64),
    /// A UTF-8 string.
    Str(String),
    /// Raw bytes (a `serde_bytes` field, for example).
    Bytes(Vec<u8>),
    /// A sequence; predicates on a list field match when any element matches.
    List(Vec<Value>),
    /// A nested structure or map, addressed with dotted paths (`address.city`).
    Map(Fields),
}

impl Value {
    /// The kind of this value.
    pub fn kind(&self) -> ValueKind {
        match self {
            Value::Null => ValueKind::Null,
            Value::Bool(_) => ValueKind::Bool,
            Value::I64(_) | Value::U64(_) | Value::F64(_) => ValueKind::Number,
            Value::Str(_) => ValueKind::String,
            Value::Bytes(_) => ValueKind::Bytes,
            Value::List(_) => ValueKind::List,
            Value::Map(_) => ValueKind::Map,
        }
    }

    /// The string inside, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Compares two scalar values the way queries do: numbers numerically across integer
    /// and float, strings by bytes, booleans `false < true`. Values of different kinds, NaN,
    /// and non-scalars are not comparable (`None`).
    pub fn compare(&self, other: &Value) -> Option<Ordering> {
        use Value::*;
        match (self, other) {
            (Bool(a), Bool(b)) => Some(a.cmp(b)),
            (Str(a), Str(b)) => Some(a.as_bytes().cmp(b.as_bytes())),
            (I64(a), I64(b)) => Some(a.cmp(b)),
            (I64(_) | U64(_), I64(_) | U64(_)) => Some(self.as_i128()?.cmp(&other.as_i128()?)),
            (F64(a), F64(b)) => a.partial_cmp(b),
            (I64(_) | U64(_), F64(f)) => cmp_int_float(self.as_i128()?, *f),
            (F64(f), I64(_) | U64(_)) => cmp_int_float(other.as_i128()?, *f).map(Ordering::reverse),
            _ => None,
        }
    }

    /// True when [`compare`](Self::compare) says the two are equal.
    pub fn same_as(&self, other: &Value) -> bool {
        self.compare(other) == Some(Ordering::Equal)
    }

    fn as_i128(&self) -> Option<i128> {
        match self {
            Value::I64(i) => Some(i128::from(*i)),
            Value::U64(u) => Some(i128::from(*u)),
            _ => None,
        }
    }
}

/// Exact comparison of an integer with a float (no rounding of the integer to f64).
fn cmp_int_float(i: i128, f: f64) -> Option<Ordering> {
    if f.is_nan() {
        return None;
    }
    // Every i64/u64 fits well inside this range; floats beyond it are beyond every integer.
    const LIMIT: f64 = 1.0e30;
    if f >= LIMIT {
        return Some(Ordering::Less);
    }
    if f <= -LIMIT {
        return Some(Ordering::Greater);
    }
    let floor = f.floor();
    // `floor` is integral and within ±1e30, so the cast is exact.
    match i.cmp(&(floor as i128)) {
        Ordering::Equal if f > floor => Some(Ordering::Less),
        other => Some(other),
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Str(v)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::F64(v)
    }
}
impl From<f32> for Value {
    fn from(v: f32) -> Self {
        Value::F64(f64::from(v))
    }
}
macro_rules! from_signed {
    ($($t:ty),*) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Self { Value::I64(i64::from(v)) }
        }
    )*};
}
from_signed!(i8, i16, i32, i64);
macro_rules! from_unsigned {
    ($($t:ty),*) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Self {
                let v = u64::from(v);
                match i64::try_from(v) {
                    Ok(i) => Value::I64(i),
                    Err(_) => Value::U64(v),
                }
            }
        }
    )*};
}
from_unsigned!(u8, u16, u32, u64);
impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Value::from(v as u64)
    }
}

/// The fields of one entry (or of a nested structure), in declaration order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fields(Vec<(FieldName, Value)>);

impl Fields {
    /// No fields.
    pub fn new() -> Self {
        Fields(Vec::new())
    }

    /// Room for `n` fields.
    pub fn with_capacity(n: usize) -> Self {
        Fields(Vec::with_capacity(n))
    }

    /// Appends a field (a later field with the same name shadows nothing: the first wins).
    pub fn push(&mut self, name: impl Into<FieldName>, value: Value) {
        self.0.push((name.into(), value));
    }

    /// The value of the top-level field `name`.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// Number of top-level fields.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no fields.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The fields in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.0.iter().map(|(n, v)| (n.as_ref(), v))
    }

    /// Calls `visit` with every value a query can see at the dotted `path` and stops as
    /// soon as it returns true. Lists are flattened (a list field is multi-valued), and a
    /// path may pass through lists of structures. Null and bytes are not seen; a nested
    /// structure is seen only if it holds some value that is. Returns whether `visit`
    /// returned true.
    pub fn any_at<'a>(&'a self, path: &str, visit: &mut dyn FnMut(&'a Value) -> bool) -> bool {
        let (head, rest) = match path.split_once('.') {
            Some((h, r)) => (h, Some(r)),
            None => (path, None),
        };
        match self.get(head) {
            Some(v) => any_in(v, rest, visit),
            None => false,
        }
    }

    /// The number of bytes this document occupies, roughly (for limits and statistics).
    pub fn approx_size(&self) -> usize {
        self.0
            .iter()
            .map(|(n, v)| n.len() + approx_value_size(v))
            .sum()
    }

    pub(crate) fn into_inner(self) -> Vec<(FieldName, Value)> {
        self.0
    }

    /// Checks that the document can be stored and queried: every top-level field name is
    /// one a query can address (letters, digits, `_` and `-`), and lists and maps nest at
    /// most [`MAX_DEPTH`](crate::MAX_DEPTH) levels. Stops at the limit, so checking a
    /// hostile document costs no more than checking an acceptable one.
    ///
    /// # Errors
    /// [`DocumentError::FieldName`] or [`DocumentError::TooDeep`].
    pub fn validate(&self) -> Result<(), DocumentError> {
        for (name, _) in &self.0 {
            crate::names::validate_segment(name).map_err(|reason| DocumentError::FieldName {
                name: name.to_string(),
                reason: reason.to_owned(),
            })?;
        }
        if self.within_depth(1) {
            Ok(())
        } else {
            Err(DocumentError::TooDeep {
                limit: crate::MAX_DEPTH,
            })
        }
    }

    /// Whether the values of these fields, at `depth`, nest no deeper than the limit.
    fn within_depth(&self, depth: usize) -> bool {
        self.0.iter().all(|(_, v)| v.within_depth(depth))
    }
}

impl Value {
    /// Whether this value, at `depth`, nests no deeper than [`MAX_DEPTH`](crate::MAX_DEPTH).
    fn within_depth(&self, depth: usize) -> bool {
        if depth > crate::MAX_DEPTH {
            return false;
        }
        match self {
            Value::List(items) => items.iter().all(|v| v.within_depth(depth + 1)),
            Value::Map(fields) => fields.within_depth(depth + 1),
            _ => true,
        }
    }
}

fn approx_value_size(v: &Value) -> usize {
    8 + match v {
        Value::Str(s) => s.len(),
        Value::Bytes(b) => b.len(),
        Value::List(l) => l.iter().map(approx_value_size).sum(),
        Value::Map(m) => m.approx_size(),
        _ => 0,
    }
}

fn any_in<'a>(v: &'a Value, rest: Option<&str>, visit: &mut dyn FnMut(&'a Value) -> bool) -> bool {
    match (v, rest) {
        // Null is absent; bytes are opaque to queries.
        (Value::Null | Value::Bytes(_), _) => false,
        (Value::List(items), _) => items.iter().any(|item| any_in(item, rest, visit)),
        // A structure is present only through a value a query can see.
        (Value::Map(_), None) => visible(v) && visit(v),
        (_, None) => visit(v),
        (Value::Map(m), Some(path)) => m.any_at(path, visit),
        (_, Some(_)) => false,
    }
}

/// Whether a query can see anything in `v`: not null, not bytes, and for lists and
/// structures, something inside that is seen.
fn visible(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bytes(_) => false,
        Value::List(items) => items.iter().any(visible),
        Value::Map(m) => m.0.iter().any(|(_, v)| visible(v)),
        _ => true,
    }
}

impl FromIterator<(FieldName, Value)> for Fields {
    fn from_iter<I: IntoIterator<Item = (FieldName, Value)>>(iter: I) -> Self {
        Fields(iter.into_iter().collect())
    }
}

impl IntoIterator for Fields {
    type Item = (FieldName, Value);
    type IntoIter = std::vec::IntoIter<(FieldName, Value)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// A hashable, normalised form of a scalar value, so that values that compare equal
/// (`3` and `3.0`) land in the same index bucket.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum IndexValue {
    /// `false` or `true`.
    Bool(bool),
    /// Any integral number (including integral floats).
    Int(i128),
    /// A non-integral float, by its bits.
    Float(u64),
    /// A string.
    Str(String),
}

impl IndexValue {
    /// The index form of a scalar; `None` for null, bytes, lists, maps and NaN.
    pub fn of(v: &Value) -> Option<IndexValue> {
        Some(match v {
            Value::Bool(b) => IndexValue::Bool(*b),
            Value::I64(i) => IndexValue::Int(i128::from(*i)),
            Value::U64(u) => IndexValue::Int(i128::from(*u)),
            Value::F64(f) => {
                if f.is_nan() {
                    return None;
                }
                if f.fract() == 0.0 && f.abs() < 1.0e30 {
                    IndexValue::Int(*f as i128)
                } else {
                    IndexValue::Float(f.to_bits())
                }
            }
            Value::Str(s) => IndexValue::Str(s.clone()),
            _ => return None,
        })
    }
}

// Serialization of values: natural (untagged) in human-readable formats such as JSON,
// tagged in compact binary formats such as postcard that cannot describe themselves.
// Encoding borrows every level (nothing is copied), and decoding counts the levels it
// enters (see the `depth` module), so both are linear in the input and bounded in depth.

/// The tagged form, encoded: borrows the value.
#[derive(Serialize)]
enum TaggedRef<'a> {
    Null,
    Bool(bool),
    I64(i64),
    U64(u64),
    F64(f64),
    Str(&'a str),
    #[serde(with = "serde_bytes")]
    Bytes(&'a [u8]),
    List(&'a [Value]),
    Map(&'a Fields),
}

/// The tagged form, decoded. Its variants mirror [`TaggedRef`] one for one.
#[derive(Deserialize)]
enum Tagged {
    Null,
    Bool(bool),
    I64(i64),
    U64(u64),
    F64(f64),
    Str(String),
    #[serde(with = "serde_bytes")]
    Bytes(Vec<u8>),
    /// Decoded with a small reservation: a list claims its length before it proves it,
    /// and serde's own would reserve up to 1 MiB at each of the 64 levels.
    #[serde(deserialize_with = "crate::depth::small_vec")]
    List(Vec<Value>),
    Map(Fields),
}

impl Serialize for Value {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            match self {
                Value::Null => s.serialize_unit(),
                Value::Bool(b) => s.serialize_bool(*b),
                Value::I64(i) => s.serialize_i64(*i),
                Value::U64(u) => s.serialize_u64(*u),
                Value::F64(f) => s.serialize_f64(*f),
                Value::Str(v) => s.serialize_str(v),
                Value::Bytes(b) => s.serialize_bytes(b),
                Value::List(l) => s.collect_seq(l),
                Value::Map(m) => m.serialize(s),
            }
        } else {
            let tagged = match self {
                Value::Null => TaggedRef::Null,
                Value::Bool(b) => TaggedRef::Bool(*b),
                Value::I64(i) => TaggedRef::I64(*i),
                Value::U64(u) => TaggedRef::U64(*u),
                Value::F64(f) => TaggedRef::F64(*f),
                Value::Str(v) => TaggedRef::Str(v),
                Value::Bytes(b) => TaggedRef::Bytes(b),
                Value::List(l) => TaggedRef::List(l),
                Value::Map(m) => TaggedRef::Map(m),
            };
            tagged.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let _level = crate::depth::Guard::enter("a document value")?;
        if d.is_human_readable() {
            d.deserialize_any(ValueVisitor)
        } else {
            Ok(match Tagged::deserialize(d)? {
                Tagged::Null => Value::Null,
                Tagged::Bool(b) => Value::Bool(b),
                Tagged::I64(i) => Value::I64(i),
                Tagged::U64(u) => Value::U64(u),
                Tagged::F64(f) => Value::F64(f),
                Tagged::Str(v) => Value::Str(v),
                Tagged::Bytes(b) => Value::Bytes(b),
                Tagged::List(l) => Value::List(l),
                Tagged::Map(m) => Value::Map(m),
            })
        }
    }
}

struct ValueVisitor;

impl<'de> serde::de::Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a value")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::I64(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::F64(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<Value, E> {
        Ok(Value::Bytes(v.to_vec()))
    }
    fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Value, E> {
        Ok(Value::Bytes(v))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(crate::depth::prealloc(seq.size_hint()));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::List(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        FieldsVisitor.visit_map(map).map(Value::Map)
    }
}

impl Serialize for Fields {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k.as_ref(), v)))
    }
}

struct FieldsVisitor;

impl<'de> serde::de::Visitor<'de> for FieldsVisitor {
    type Value = Fields;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map of field names to values")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let mut fields = Fields::with_capacity(crate::depth::prealloc(map.size_hint()));
        while let Some((k, v)) = map.next_entry::<String, Value>()? {
            fields.push(k, v);
        }
        Ok(fields)
    }
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(FieldsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_compare_across_representations() {
        assert!(Value::I64(3).same_as(&Value::F64(3.0)));
        assert!(Value::U64(u64::MAX).compare(&Value::I64(-1)) == Some(Ordering::Greater));
        assert_eq!(
            Value::I64(9_007_199_254_740_993).compare(&Value::F64(9_007_199_254_740_992.0)),
            Some(Ordering::Greater)
        );
        assert_eq!(
            Value::F64(2.5).compare(&Value::I64(2)),
            Some(Ordering::Greater)
        );
        assert_eq!(
            Value::F64(-2.5).compare(&Value::I64(-2)),
            Some(Ordering::Less)
        );
        assert_eq!(Value::F64(f64::NAN).compare(&Value::I64(1)), None);
        assert_eq!(Value::Str("1".into()).compare(&Value::I64(1)), None);
    }

    #[test]
    fn index_values_agree_with_equality() {
        assert_eq!(
            IndexValue::of(&Value::F64(7.0)),
            IndexValue::of(&Value::U64(7))
        );
        assert_ne!(
            IndexValue::of(&Value::F64(7.5)),
            IndexValue::of(&Value::I64(7))
        );
        assert_eq!(
            IndexValue::of(&Value::F64(-0.0)),
            IndexValue::of(&Value::I64(0))
        );
        assert_eq!(IndexValue::of(&Value::List(vec![])), None);
    }

    #[test]
    fn json_form_is_natural() {
        let mut f = Fields::new();
        f.push("a", Value::I64(1));
        f.push("b", Value::List(vec![Value::Str("x".into()), Value::Null]));
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(json, r#"{"a":1,"b":["x",null]}"#);
        let back: Fields = serde_json::from_str(&json).unwrap();
        assert_eq!(back, f);
    }
}
