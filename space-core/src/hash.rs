//! The stable key hash: which of the 1024 ranges a key belongs to.
//!
//! `hash32(key)` is xxHash32 (seed 0) of the key's canonical bytes: `0x01` followed by the
//! 16 bytes of a UUID key, or `0x02` followed by the UTF-8 bytes of a user key. xxHash32 is
//! a published, platform-independent function, so the same key lands in the same range on
//! every machine and every version; the test vectors below pin it.

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
        assert_eq!(
            crate::wire::range_of(&Key::Name("order-1".into())),
            3_430_279_802 >> 22
        );
    }
}
