//! [`Value`] → `Deserialize`: rebuilds a Rust value from a document, moving strings and
//! byte buffers instead of copying them.

use serde::de::value::{MapDeserializer, SeqDeserializer};
use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};

use crate::error::DocumentError;
use crate::value::{FieldName, Fields, Value};

/// Rebuilds a `T` from a document value.
///
/// # Errors
///
/// When the value does not have the shape `T` reads (a missing field, a value of another
/// kind).
pub fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, DocumentError> {
    T::deserialize(value)
}

/// Rebuilds an entry struct from its document fields.
///
/// # Errors
///
/// As [`from_value`].
pub fn from_fields<T: DeserializeOwned>(fields: Fields) -> Result<T, DocumentError> {
    T::deserialize(Value::Map(fields))
}

impl<'de> IntoDeserializer<'de, DocumentError> for Value {
    type Deserializer = Value;
    fn into_deserializer(self) -> Value {
        self
    }
}

fn fields_access(
    fields: Fields,
) -> MapDeserializer<'static, impl Iterator<Item = (MapKey, Value)>, DocumentError> {
    MapDeserializer::new(fields.into_inner().into_iter().map(|(k, v)| (MapKey(k), v)))
}

/// A field name or map key. Maps with integer keys are stored with the keys in text form
/// (as JSON does), so integer requests parse the text back.
struct MapKey(FieldName);

impl<'de> IntoDeserializer<'de, DocumentError> for MapKey {
    type Deserializer = MapKey;
    fn into_deserializer(self) -> MapKey {
        self
    }
}

macro_rules! parse_key {
    ($($method:ident => $visit:ident: $t:ty,)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DocumentError> {
            match self.0.parse::<$t>() {
                Ok(n) => visitor.$visit(n),
                Err(_) => visitor.visit_str(&self.0),
            }
        }
    )*};
}

impl<'de> de::Deserializer<'de> for MapKey {
    type Error = DocumentError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DocumentError> {
        match self.0 {
            FieldName::Borrowed(s) => visitor.visit_str(s),
            FieldName::Owned(s) => visitor.visit_string(s),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DocumentError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DocumentError> {
        visitor.visit_enum(self.0.into_deserializer())
    }

    parse_key! {
        deserialize_i8 => visit_i8: i8,
        deserialize_i16 => visit_i16: i16,
        deserialize_i32 => visit_i32: i32,
        deserialize_i64 => visit_i64: i64,
        deserialize_u8 => visit_u8: u8,
        deserialize_u16 => visit_u16: u16,
        deserialize_u32 => visit_u32: u32,
        deserialize_u64 => visit_u64: u64,
    }

    serde::forward_to_deserialize_any! {
        bool i128 u128 f32 f64 char str string bytes byte_buf option unit unit_struct
        seq tuple tuple_struct map struct identifier ignored_any
    }
}

impl<'de> de::Deserializer<'de> for Value {
    type Error = DocumentError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DocumentError> {
        match self {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(b),
            Value::I64(i) => visitor.visit_i64(i),
            Value::U64(u) => visitor.visit_u64(u),
            Value::F64(f) => visitor.visit_f64(f),
            Value::Str(s) => visitor.visit_string(s),
            Value::Bytes(b) => visitor.visit_byte_buf(b),
            Value::List(items) => {
                let mut seq = SeqDeserializer::new(items.into_iter());
                let out = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(out)
            }
            Value::Map(fields) => {
                let mut map = fields_access(fields);
                let out = visitor.visit_map(&mut map)?;
                map.end()?;
                Ok(out)
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DocumentError> {
        match self {
            Value::Null => visitor.visit_none(),
            other => visitor.visit_some(other),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DocumentError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DocumentError> {
        match self {
            Value::Str(variant) => visitor.visit_enum(variant.into_deserializer()),
            Value::Map(fields) if fields.len() == 1 => {
                let (variant, value) = fields
                    .into_iter()
                    .next()
                    .ok_or_else(|| DocumentError::Custom("empty enum map".into()))?;
                visitor.visit_enum(EnumAccess { variant, value })
            }
            other => Err(DocumentError::Custom(format!(
                "expected an enum (a string or a map with one entry), found a {}",
                other.kind()
            ))),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map struct
        identifier ignored_any
    }
}

struct EnumAccess {
    variant: FieldName,
    value: Value,
}

impl<'de> de::EnumAccess<'de> for EnumAccess {
    type Error = DocumentError;
    type Variant = Value;

    fn variant_seed<S: de::DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Value), DocumentError> {
        let name: de::value::CowStrDeserializer<'_, DocumentError> =
            self.variant.into_deserializer();
        Ok((seed.deserialize(name)?, self.value))
    }
}

impl<'de> de::VariantAccess<'de> for Value {
    type Error = DocumentError;

    fn unit_variant(self) -> Result<(), DocumentError> {
        match self {
            Value::Null => Ok(()),
            other => Err(DocumentError::Custom(format!(
                "expected a unit variant, found a {}",
                other.kind()
            ))),
        }
    }
    fn newtype_variant_seed<S: de::DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<S::Value, DocumentError> {
        seed.deserialize(self)
    }
    fn tuple_variant<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DocumentError> {
        de::Deserializer::deserialize_any(self, visitor)
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DocumentError> {
        de::Deserializer::deserialize_any(self, visitor)
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use crate::{from_fields, to_fields, to_value};

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    enum Status {
        Ready,
        Held(String),
        Moved { to: u32 },
        Pair(i8, i8),
    }

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    struct Inner {
        city: String,
        zip: Option<u32>,
    }

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    struct Order {
        id: u64,
        amount: f64,
        neg: i32,
        status: Status,
        others: Vec<Status>,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        address: Inner,
        tags: std::collections::BTreeMap<String, bool>,
        by_id: std::collections::BTreeMap<u32, String>,
        c: char,
        unit: (),
        tuple: (u8, String),
        big: u64,
    }

    fn sample() -> Order {
        Order {
            id: 7,
            amount: 12.5,
            neg: -3,
            status: Status::Held("x".into()),
            others: vec![Status::Ready, Status::Moved { to: 4 }, Status::Pair(-1, 2)],
            payload: vec![1, 2, 3],
            address: Inner {
                city: "Paris".into(),
                zip: None,
            },
            tags: [("a".to_string(), true)].into_iter().collect(),
            by_id: [(3, "three".to_string())].into_iter().collect(),
            c: 'z',
            unit: (),
            tuple: (9, "nine".into()),
            big: u64::MAX,
        }
    }

    #[test]
    fn structs_round_trip_through_documents() {
        let order = sample();
        let fields = to_fields(&order).unwrap();
        assert_eq!(fields.get("id"), Some(&crate::Value::I64(7)));
        assert_eq!(fields.get("big"), Some(&crate::Value::U64(u64::MAX)));
        assert_eq!(
            fields.get("payload"),
            Some(&crate::Value::Bytes(vec![1, 2, 3]))
        );
        let back: Order = from_fields(fields).unwrap();
        assert_eq!(back, order);
    }

    #[test]
    fn documents_survive_json_and_come_back() {
        let fields = to_fields(&sample()).unwrap();
        let json = serde_json::to_string(&fields).unwrap();
        let parsed: crate::Fields = serde_json::from_str(&json).unwrap();
        // JSON has no bytes type: the payload comes back as a list of numbers, and the
        // struct still deserializes from it.
        let back: Order = from_fields(parsed).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn non_structs_and_wide_integers_are_refused() {
        assert!(matches!(
            to_fields(&5u32),
            Err(crate::DocumentError::NotAStruct { .. })
        ));
        assert!(matches!(
            to_value(&(u128::MAX)),
            Err(crate::DocumentError::Unsupported(_))
        ));
        let mut m = std::collections::HashMap::new();
        m.insert(vec![1u8], 1);
        assert!(matches!(to_value(&m), Err(crate::DocumentError::MapKey(_))));
    }

    #[test]
    fn wrong_shapes_give_errors_not_panics() {
        let fields = to_fields(&Inner {
            city: "x".into(),
            zip: Some(1),
        })
        .unwrap();
        let r: Result<Order, _> = from_fields(fields);
        assert!(r.is_err());
    }
}
