//! `Serialize` → [`Value`]: turns any serde value into a document value without going
//! through an intermediate text format.

use serde::Serialize;
use serde::ser::{self, Impossible};

use crate::error::DocumentError;
use crate::value::{FieldName, Fields, Value};

/// Converts any serializable value into a [`Value`].
///
/// # Errors
/// [`DocumentError::TooDeep`] for lists and maps nested deeper than
/// [`MAX_DEPTH`](crate::MAX_DEPTH) (checked as the value is built, so a runaway recursive
/// value stops there), and the errors of the value's own `Serialize`.
pub fn to_value<T: Serialize + ?Sized>(value: &T) -> Result<Value, DocumentError> {
    value.serialize(ValueSerializer { depth: 0 })
}

/// Converts a struct (or string-keyed map) into the [`Fields`] of an entry document.
///
/// # Errors
/// [`DocumentError::NotAStruct`] when the value is not a struct or map, and the errors of
/// [`to_value`] for values the document model cannot hold.
pub fn to_fields<T: Serialize + ?Sized>(value: &T) -> Result<Fields, DocumentError> {
    match to_value(value)? {
        Value::Map(fields) => Ok(fields),
        other => Err(DocumentError::NotAStruct {
            found: other.kind(),
        }),
    }
}

/// Builds the value at nesting `depth` (0 for the entry itself, 1 for its fields).
#[derive(Clone, Copy)]
struct ValueSerializer {
    depth: usize,
}

impl ValueSerializer {
    /// The serializer of a value one level inside this one.
    fn child(self) -> Result<ValueSerializer, DocumentError> {
        if self.depth >= crate::MAX_DEPTH {
            return Err(DocumentError::TooDeep {
                limit: crate::MAX_DEPTH,
            });
        }
        Ok(ValueSerializer {
            depth: self.depth + 1,
        })
    }
}

fn int128(v: i128) -> Result<Value, DocumentError> {
    if let Ok(i) = i64::try_from(v) {
        Ok(Value::I64(i))
    } else if let Ok(u) = u64::try_from(v) {
        Ok(Value::U64(u))
    } else {
        Err(DocumentError::Unsupported(format!(
            "integer {v} does not fit in 64 bits"
        )))
    }
}

fn single(name: &'static str, value: Value) -> Value {
    let mut f = Fields::with_capacity(1);
    f.push(name, value);
    Value::Map(f)
}

impl ser::Serializer for ValueSerializer {
    type Ok = Value;
    type Error = DocumentError;
    type SerializeSeq = SeqBuilder;
    type SerializeTuple = SeqBuilder;
    type SerializeTupleStruct = SeqBuilder;
    type SerializeTupleVariant = VariantSeqBuilder;
    type SerializeMap = MapBuilder;
    type SerializeStruct = StructBuilder;
    type SerializeStructVariant = VariantStructBuilder;

    fn serialize_bool(self, v: bool) -> Result<Value, DocumentError> {
        Ok(Value::Bool(v))
    }
    fn serialize_i8(self, v: i8) -> Result<Value, DocumentError> {
        Ok(Value::from(v))
    }
    fn serialize_i16(self, v: i16) -> Result<Value, DocumentError> {
        Ok(Value::from(v))
    }
    fn serialize_i32(self, v: i32) -> Result<Value, DocumentError> {
        Ok(Value::from(v))
    }
    fn serialize_i64(self, v: i64) -> Result<Value, DocumentError> {
        Ok(Value::from(v))
    }
    fn serialize_i128(self, v: i128) -> Result<Value, DocumentError> {
        int128(v)
    }
    fn serialize_u8(self, v: u8) -> Result<Value, DocumentError> {
        Ok(Value::from(v))
    }
    fn serialize_u16(self, v: u16) -> Result<Value, DocumentError> {
        Ok(Value::from(v))
    }
    fn serialize_u32(self, v: u32) -> Result<Value, DocumentError> {
        Ok(Value::from(v))
    }
    fn serialize_u64(self, v: u64) -> Result<Value, DocumentError> {
        Ok(Value::from(v))
    }
    fn serialize_u128(self, v: u128) -> Result<Value, DocumentError> {
        match i128::try_from(v) {
            Ok(i) => int128(i),
            Err(_) => Err(DocumentError::Unsupported(format!(
                "integer {v} does not fit in 64 bits"
            ))),
        }
    }
    fn serialize_f32(self, v: f32) -> Result<Value, DocumentError> {
        Ok(Value::F64(f64::from(v)))
    }
    fn serialize_f64(self, v: f64) -> Result<Value, DocumentError> {
        Ok(Value::F64(v))
    }
    fn serialize_char(self, v: char) -> Result<Value, DocumentError> {
        Ok(Value::Str(v.to_string()))
    }
    fn serialize_str(self, v: &str) -> Result<Value, DocumentError> {
        Ok(Value::Str(v.to_owned()))
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<Value, DocumentError> {
        Ok(Value::Bytes(v.to_vec()))
    }
    fn serialize_none(self) -> Result<Value, DocumentError> {
        Ok(Value::Null)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Value, DocumentError> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<Value, DocumentError> {
        Ok(Value::Null)
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<Value, DocumentError> {
        Ok(Value::Null)
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<Value, DocumentError> {
        Ok(Value::Str(variant.to_owned()))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<Value, DocumentError> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<Value, DocumentError> {
        Ok(single(variant, value.serialize(self.child()?)?))
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<SeqBuilder, DocumentError> {
        Ok(SeqBuilder {
            items: Vec::with_capacity(len.unwrap_or(0).min(4096)),
            inner: self.child()?,
        })
    }
    fn serialize_tuple(self, len: usize) -> Result<SeqBuilder, DocumentError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<SeqBuilder, DocumentError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<VariantSeqBuilder, DocumentError> {
        Ok(VariantSeqBuilder(
            variant,
            self.child()?.serialize_seq(Some(len))?,
        ))
    }
    fn serialize_map(self, len: Option<usize>) -> Result<MapBuilder, DocumentError> {
        Ok(MapBuilder {
            fields: Fields::with_capacity(len.unwrap_or(0).min(4096)),
            key: None,
            inner: self.child()?,
        })
    }
    fn serialize_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<StructBuilder, DocumentError> {
        Ok(StructBuilder(Fields::with_capacity(len), self.child()?))
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<VariantStructBuilder, DocumentError> {
        Ok(VariantStructBuilder(
            variant,
            Fields::with_capacity(len),
            self.child()?.child()?,
        ))
    }
}

struct SeqBuilder {
    items: Vec<Value>,
    /// Serializes the elements.
    inner: ValueSerializer,
}

impl ser::SerializeSeq for SeqBuilder {
    type Ok = Value;
    type Error = DocumentError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), DocumentError> {
        self.items.push(v.serialize(self.inner)?);
        Ok(())
    }
    fn end(self) -> Result<Value, DocumentError> {
        Ok(Value::List(self.items))
    }
}

impl ser::SerializeTuple for SeqBuilder {
    type Ok = Value;
    type Error = DocumentError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), DocumentError> {
        ser::SerializeSeq::serialize_element(self, v)
    }
    fn end(self) -> Result<Value, DocumentError> {
        ser::SerializeSeq::end(self)
    }
}

impl ser::SerializeTupleStruct for SeqBuilder {
    type Ok = Value;
    type Error = DocumentError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), DocumentError> {
        ser::SerializeSeq::serialize_element(self, v)
    }
    fn end(self) -> Result<Value, DocumentError> {
        ser::SerializeSeq::end(self)
    }
}

struct VariantSeqBuilder(&'static str, SeqBuilder);

impl ser::SerializeTupleVariant for VariantSeqBuilder {
    type Ok = Value;
    type Error = DocumentError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), DocumentError> {
        ser::SerializeSeq::serialize_element(&mut self.1, v)
    }
    fn end(self) -> Result<Value, DocumentError> {
        Ok(single(self.0, Value::List(self.1.items)))
    }
}

struct MapBuilder {
    fields: Fields,
    key: Option<String>,
    /// Serializes the values.
    inner: ValueSerializer,
}

impl ser::SerializeMap for MapBuilder {
    type Ok = Value;
    type Error = DocumentError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), DocumentError> {
        self.key = Some(key.serialize(KeySerializer)?);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), DocumentError> {
        let key = self
            .key
            .take()
            .ok_or_else(|| DocumentError::Custom("map value without a key".into()))?;
        self.fields.push(key, v.serialize(self.inner)?);
        Ok(())
    }
    fn end(self) -> Result<Value, DocumentError> {
        Ok(Value::Map(self.fields))
    }
}

/// The fields built so far, and the serializer of their values.
struct StructBuilder(Fields, ValueSerializer);

impl ser::SerializeStruct for StructBuilder {
    type Ok = Value;
    type Error = DocumentError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        v: &T,
    ) -> Result<(), DocumentError> {
        self.0.push(FieldName::Borrowed(key), v.serialize(self.1)?);
        Ok(())
    }
    fn end(self) -> Result<Value, DocumentError> {
        Ok(Value::Map(self.0))
    }
}

/// A struct variant: its name, the fields built so far (inside a map named after the
/// variant), and the serializer of their values.
struct VariantStructBuilder(&'static str, Fields, ValueSerializer);

impl ser::SerializeStructVariant for VariantStructBuilder {
    type Ok = Value;
    type Error = DocumentError;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        v: &T,
    ) -> Result<(), DocumentError> {
        self.1.push(FieldName::Borrowed(key), v.serialize(self.2)?);
        Ok(())
    }
    fn end(self) -> Result<Value, DocumentError> {
        Ok(single(self.0, Value::Map(self.1)))
    }
}

/// Serializes map keys: strings as they are, integers and chars in their text form.
struct KeySerializer;

fn bad_key(what: &str) -> DocumentError {
    DocumentError::MapKey(what.to_owned())
}

impl ser::Serializer for KeySerializer {
    type Ok = String;
    type Error = DocumentError;
    type SerializeSeq = Impossible<String, DocumentError>;
    type SerializeTuple = Impossible<String, DocumentError>;
    type SerializeTupleStruct = Impossible<String, DocumentError>;
    type SerializeTupleVariant = Impossible<String, DocumentError>;
    type SerializeMap = Impossible<String, DocumentError>;
    type SerializeStruct = Impossible<String, DocumentError>;
    type SerializeStructVariant = Impossible<String, DocumentError>;

    fn serialize_str(self, v: &str) -> Result<String, DocumentError> {
        Ok(v.to_owned())
    }
    fn serialize_char(self, v: char) -> Result<String, DocumentError> {
        Ok(v.to_string())
    }
    fn serialize_i8(self, v: i8) -> Result<String, DocumentError> {
        Ok(v.to_string())
    }
    fn serialize_i16(self, v: i16) -> Result<String, DocumentError> {
        Ok(v.to_string())
    }
    fn serialize_i32(self, v: i32) -> Result<String, DocumentError> {
        Ok(v.to_string())
    }
    fn serialize_i64(self, v: i64) -> Result<String, DocumentError> {
        Ok(v.to_string())
    }
    fn serialize_u8(self, v: u8) -> Result<String, DocumentError> {
        Ok(v.to_string())
    }
    fn serialize_u16(self, v: u16) -> Result<String, DocumentError> {
        Ok(v.to_string())
    }
    fn serialize_u32(self, v: u32) -> Result<String, DocumentError> {
        Ok(v.to_string())
    }
    fn serialize_u64(self, v: u64) -> Result<String, DocumentError> {
        Ok(v.to_string())
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<String, DocumentError> {
        Ok(variant.to_owned())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<String, DocumentError> {
        value.serialize(self)
    }
    fn serialize_bool(self, _v: bool) -> Result<String, DocumentError> {
        Err(bad_key("a bool"))
    }
    fn serialize_f32(self, _v: f32) -> Result<String, DocumentError> {
        Err(bad_key("a float"))
    }
    fn serialize_f64(self, _v: f64) -> Result<String, DocumentError> {
        Err(bad_key("a float"))
    }
    fn serialize_bytes(self, _v: &[u8]) -> Result<String, DocumentError> {
        Err(bad_key("bytes"))
    }
    fn serialize_none(self) -> Result<String, DocumentError> {
        Err(bad_key("none"))
    }
    fn serialize_some<T: Serialize + ?Sized>(self, _v: &T) -> Result<String, DocumentError> {
        Err(bad_key("an option"))
    }
    fn serialize_unit(self) -> Result<String, DocumentError> {
        Err(bad_key("unit"))
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<String, DocumentError> {
        Err(bad_key("a unit struct"))
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _value: &T,
    ) -> Result<String, DocumentError> {
        Err(bad_key("an enum variant with data"))
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Self::SerializeSeq, DocumentError> {
        Err(bad_key("a sequence"))
    }
    fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple, DocumentError> {
        Err(bad_key("a tuple"))
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleStruct, DocumentError> {
        Err(bad_key("a tuple struct"))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant, DocumentError> {
        Err(bad_key("an enum variant with data"))
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap, DocumentError> {
        Err(bad_key("a map"))
    }
    fn serialize_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStruct, DocumentError> {
        Err(bad_key("a struct"))
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant, DocumentError> {
        Err(bad_key("an enum variant with data"))
    }
}
