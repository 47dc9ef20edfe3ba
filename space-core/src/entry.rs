//! Entries, keys and node ids.

use std::fmt;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use space_query::EntryType;
use uuid::Uuid;

/// A typed value that can live in the space.
///
/// Declare it with one line, [`entry!`](crate::entry):
///
/// ```
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Clone, Debug, Serialize, Deserialize)]
/// struct Order { id: String, status: String, amount: u32 }
///
/// // Entry type "Order", keyed by its `id` field, with an index on `status`.
/// space_core::entry!(Order, "Order", key = id, index = [status]);
/// ```
///
/// Without `key = ...` every write gets a fresh UUID v7 key, and equal entries are separate
/// entries (a bag). With a key field, the key is the entry's identity: writing a second
/// entry with a key that is present fails with [`SpaceError::KeyExists`](crate::SpaceError).
/// Indexed fields make equality queries on them touch only the matching entries.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not declared as an entry of the space",
    label = "not declared with `entry!`",
    note = "declare it next to the struct: `space_client::entry!({Self}, \"{Self}\");` (options: `key = field`, `index = [field, ...]`)"
)]
pub trait Entry: EntryType + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Top-level fields to index for equality lookups.
    const INDEXES: &'static [&'static str] = &[];

    /// The routing key the user supplies, if the entry type has one.
    fn key(&self) -> Option<Key> {
        None
    }
}

/// Declares a struct as an [`Entry`] in one line:
/// `entry!(Type, "StableName" [, key = field] [, index = [field, ...]])`, the options in
/// either order. A key or index field the struct does not have is a compile error:
///
/// ```compile_fail
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Order { id: String }
/// space_core::entry!(Order, "Order", index = [status]); // no field `status`
/// ```
#[macro_export]
macro_rules! entry {
    ($ty:ty, $name:literal, index = [$($field:ident),* $(,)?], key = $key:ident $(,)?) => {
        $crate::entry!($ty, $name, key = $key, index = [$($field),*]);
    };
    ($ty:ty, $name:literal $(, key = $key:ident)? $(, index = [$($field:ident),* $(,)?])? $(,)?) => {
        impl $crate::EntryType for $ty {
            const ENTRY_TYPE: &'static str = $name;
        }
        impl $crate::Entry for $ty {
            $(const INDEXES: &'static [&'static str] = &[$(stringify!($field)),*];)?
            $(
                fn key(&self) -> ::core::option::Option<$crate::Key> {
                    ::core::option::Option::Some($crate::IntoKey::to_key(&self.$key))
                }
            )?
        }
        // Every indexed field is a field of the struct.
        const _: fn(&$ty) = |_entry: &$ty| {
            $($(let _ = &_entry.$field;)*)?
        };
    };
}

/// The identity of an entry: a time-ordered UUID v7 minted by the space, or a key the user
/// supplies through the entry's key field.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Key {
    /// A key minted by the space.
    Id(Uuid),
    /// A user-supplied routing key.
    Name(String),
}

/// Bits of a minted key's `rand_b` that carry the store's sequence number (the rest of
/// the UUID v7 stays timestamp and random bits, as RFC 9562 allows for counters).
const SEQ_BITS: u32 = 48;
const SEQ_SHIFT: u32 = 14;
const SEQ_MASK: u128 = ((1u128 << SEQ_BITS) - 1) << SEQ_SHIFT;

impl Key {
    /// A fresh UUID v7 key (time-ordered).
    pub fn mint() -> Key {
        Key::Id(Uuid::now_v7())
    }

    /// A UUID v7 key from `base` (a fresh v7) that also carries `seq`, so that the store
    /// that minted it finds the entry without a key map. `None` when `seq` does not fit.
    pub(crate) fn with_seq(base: Uuid, seq: u64) -> Option<Key> {
        if seq >= 1 << SEQ_BITS {
            return None;
        }
        let bits = (base.as_u128() & !SEQ_MASK) | (u128::from(seq) << SEQ_SHIFT);
        Some(Key::Id(Uuid::from_u128(bits)))
    }

    /// The sequence number a minted key carries (only meaningful to the store that
    /// minted it, which checks that the entry there really has this key).
    pub(crate) fn seq_hint(&self) -> Option<u64> {
        match self {
            Key::Id(id) if id.get_version_num() == 7 => {
                Some(((id.as_u128() & SEQ_MASK) >> SEQ_SHIFT) as u64)
            }
            _ => None,
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Id(id) => id.fmt(f),
            Key::Name(n) => f.write_str(n),
        }
    }
}

impl FromStr for Key {
    type Err = std::convert::Infallible;
    /// A UUID in text form becomes [`Key::Id`], anything else [`Key::Name`].
    fn from_str(s: &str) -> Result<Key, Self::Err> {
        Ok(match Uuid::parse_str(s) {
            Ok(id) => Key::Id(id),
            Err(_) => Key::Name(s.to_owned()),
        })
    }
}

/// Values that can serve as an entry's key field.
pub trait IntoKey {
    /// The key for this value.
    fn to_key(&self) -> Key;
}

impl IntoKey for Uuid {
    fn to_key(&self) -> Key {
        Key::Id(*self)
    }
}
impl IntoKey for String {
    fn to_key(&self) -> Key {
        Key::Name(self.clone())
    }
}
impl IntoKey for str {
    fn to_key(&self) -> Key {
        Key::Name(self.to_owned())
    }
}
impl IntoKey for Key {
    fn to_key(&self) -> Key {
        self.clone()
    }
}
macro_rules! int_keys {
    ($($t:ty),*) => {$(
        impl IntoKey for $t {
            fn to_key(&self) -> Key { Key::Name(self.to_string()) }
        }
    )*};
}
int_keys!(u8, u16, u32, u64, u128, i8, i16, i32, i64, i128, usize);

/// The stable id of a node. The in-process space is node 0 unless told otherwise.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node-{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize)]
    struct KeyFirst {
        id: String,
        kind: String,
    }
    crate::entry!(KeyFirst, "KeyFirst", key = id, index = [kind]);

    #[derive(Serialize, Deserialize)]
    struct IndexFirst {
        id: String,
        kind: String,
    }
    crate::entry!(IndexFirst, "IndexFirst", index = [kind, id], key = id);

    #[test]
    fn entry_takes_its_options_in_either_order() {
        assert_eq!(KeyFirst::INDEXES, ["kind"]);
        assert_eq!(IndexFirst::INDEXES, ["kind", "id"]);
        let entry = IndexFirst {
            id: "o-1".into(),
            kind: "x".into(),
        };
        assert_eq!(entry.key(), Some(Key::Name("o-1".into())));
        assert_eq!(IndexFirst::ENTRY_TYPE, "IndexFirst");
    }

    #[test]
    fn keys_print_and_parse() {
        let k = Key::mint();
        assert_eq!(k.to_string().parse::<Key>().unwrap(), k);
        assert_eq!(
            "order-7".parse::<Key>().unwrap(),
            Key::Name("order-7".into())
        );
    }

    #[test]
    fn keys_carry_a_sequence_and_stay_uuid_v7() {
        let base = Uuid::now_v7();
        let k = Key::with_seq(base, 123_456_789).unwrap();
        assert_eq!(k.seq_hint(), Some(123_456_789));
        let Key::Id(id) = &k else { panic!() };
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        assert_eq!(id.get_timestamp(), base.get_timestamp());
        assert!(Key::with_seq(base, 1 << 48).is_none());
    }

    #[test]
    fn minted_keys_are_time_ordered() {
        let a = Key::mint();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = Key::mint();
        assert!(a < b);
    }
}
