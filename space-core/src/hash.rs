//! The stable key hash: which of the 1024 ranges a key belongs to.
//!
//! `hash32(key)` is xxHash32 (seed 0) of the key's canonical bytes: `0x01` followed by the
//! 16 bytes of a UUID key, or `0x02` followed by the UTF-8 bytes of a user key. xxHash32 is
//! a published, platform-independent function, so the same key lands in the same range on
//! every machine and every version; the test vectors below pin it.

use uuid::Uuid;

use crate::entry::Key;

/// The canonical bytes of a key, as hashed.
fn canonical(key: &Key, mut f: impl FnMut(&[u8]) -> u32) -> u32 {
    match key {
        Key::Id(id) => {
            let mut buf = [0u8; 17];
            buf[0] = 1;
            buf[1..].copy_from_slice(id.as_bytes());
            f(&buf)
        }
        Key::Name(name) => {
            let mut buf = Vec::with_capacity(name.len() + 1);
            buf.push(2);
            buf.extend_from_slice(name.as_bytes());
            f(&buf)
        }
    }
}

/// The stable 32-bit hash of a key.
pub fn hash32(key: &Key) -> u32 {
    canonical(key, |bytes| twox_hash::XxHash32::oneshot(0, bytes))
}

impl Key {
    /// As [`with_seq`](Self::with_seq), choosing the key's free random bits so that its
    /// range is one `owns` accepts (a node mints keys inside its own ranges, so that
    /// FindFor finds the entry there). `None` when no choice lands in an owned range.
    pub(crate) fn with_seq_in(base: Uuid, seq: u64, owns: &dyn Fn(u32) -> bool) -> Option<Key> {
        let first = Key::with_seq(base, seq)?;
        if owns(range_of(&first)) {
            return Some(first);
        }
        // rand_a (12 bits at 64..76) and the low 14 bits of rand_b are free.
        let fixed = match &first {
            Key::Id(id) => id.as_u128() & !((0xfffu128 << 64) | 0x3fff),
            Key::Name(_) => return None,
        };
        (0u128..(1 << 26)).find_map(|v| {
            let bits = fixed | ((v & 0xfff) << 64) | (v >> 12);
            let key = Key::Id(Uuid::from_u128(bits));
            owns(range_of(&key)).then_some(key)
        })
    }
}

/// The number of hash ranges the key space is split into.
pub const RANGES: u32 = 1024;

/// The range of a key: `hash32(key) >> 22`, one of [`RANGES`].
pub fn range_of(key: &Key) -> u32 {
    hash32(key) >> 22
}

/// The first range of shard `shard` when the ranges are grouped into `shards` shards
/// (between 1 and [`RANGES`]) of consecutive ranges: `shard * RANGES / shards`, so shard
/// `s` holds the ranges from its first up to the next shard's first.
pub fn first_range_of_shard(shard: u32, shards: u32) -> u32 {
    (u64::from(shard) * u64::from(RANGES) / u64::from(shards.max(1))) as u32
}

/// The shard holding `range` when the ranges are grouped into `shards` shards (see
/// [`first_range_of_shard`]).
pub fn shard_of_range(range: u32, shards: u32) -> u32 {
    // The last shard whose first range, floor(s * R / S), is at or below `range`:
    // s * R < (range + 1) * S, so s = ceil((range + 1) * S / R) - 1.
    let (r, s, n) = (
        u64::from(range.min(RANGES - 1)),
        u64::from(shards.max(1)),
        u64::from(RANGES),
    );
    (((r + 1) * s).div_ceil(n) - 1) as u32
}

/// A set of ranges (one flag per range).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeSet(pub Vec<bool>);

impl RangeSet {
    /// Every range.
    pub fn all() -> RangeSet {
        RangeSet(vec![true; RANGES as usize])
    }

    /// Whether `range` is in the set.
    pub fn contains(&self, range: u32) -> bool {
        self.0.get(range as usize).copied().unwrap_or(false)
    }

    /// How many ranges the set holds.
    pub fn len(&self) -> usize {
        self.0.iter().filter(|&&b| b).count()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xxhash32_is_the_published_function() {
        // Reference values of xxHash32 with seed 0.
        assert_eq!(twox_hash::XxHash32::oneshot(0, b""), 0x02CC_5D05);
        assert_eq!(twox_hash::XxHash32::oneshot(0, b"a"), 0x550D_7456);
        assert_eq!(twox_hash::XxHash32::oneshot(0, b"abc"), 0x32D1_53FF);
    }

    /// Pinned: a change here moves every entry to another range.
    #[test]
    fn key_hash_test_vectors() {
        let vectors = [
            (Key::Name("order-1".into()), 3_430_279_802u32),
            (Key::Id(uuid::Uuid::nil()), 3_010_348_796),
        ];
        for (key, want) in vectors {
            assert_eq!(hash32(&key), want, "{key}");
        }
        assert_eq!(
            hash32(&Key::Name(String::new())),
            twox_hash::XxHash32::oneshot(0, &[2])
        );
        assert_eq!(range_of(&Key::Name("order-1".into())), 3_430_279_802 >> 22);
    }
}
