//! Ordered containers keyed by sequence number, built for the store's access pattern:
//! new numbers arrive at the end, old ones leave mostly from the front, and scans go in
//! ascending order.
//!
//! Both group 64 consecutive numbers into one chunk kept in a `BTreeMap` by chunk number,
//! so the tree changes once per 64 inserts instead of on every one (a plain
//! `BTreeMap<u64, _>` allocates and splits nodes constantly under that pattern), and a
//! chunk disappears as soon as it is empty, so memory follows the live entries however far
//! the numbers have moved on.

use std::collections::BTreeMap;

const CHUNK_BITS: u32 = 6;
const CHUNK: u64 = 1 << CHUNK_BITS;

fn split(seq: u64) -> (u64, usize) {
    (seq >> CHUNK_BITS, (seq & (CHUNK - 1)) as usize)
}

/// Ascending positions of the set bits of `bits`.
fn bits_of(bits: u64) -> impl Iterator<Item = usize> {
    let mut rest = bits;
    std::iter::from_fn(move || {
        if rest == 0 {
            return None;
        }
        let i = rest.trailing_zeros() as usize;
        rest &= rest - 1;
        Some(i)
    })
}

/// The bits of a chunk's word at position `slot` and above.
fn at_or_above(slot: usize) -> u64 {
    u64::MAX << slot
}

struct Chunk<V> {
    live: u64,
    slots: [Option<V>; CHUNK as usize],
}

/// A map from sequence number to value, iterated in ascending order.
pub(crate) struct SeqMap<V> {
    chunks: BTreeMap<u64, Box<Chunk<V>>>,
    len: usize,
}

impl<V> Default for SeqMap<V> {
    fn default() -> Self {
        SeqMap {
            chunks: BTreeMap::new(),
            len: 0,
        }
    }
}

impl<V> SeqMap<V> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Inserts or replaces; returns the value that was there.
    pub(crate) fn insert(&mut self, seq: u64, value: V) -> Option<V> {
        let (key, slot) = split(seq);
        let chunk = self.chunks.entry(key).or_insert_with(|| {
            Box::new(Chunk {
                live: 0,
                slots: std::array::from_fn(|_| None),
            })
        });
        let old = chunk.slots[slot].replace(value);
        chunk.live |= 1 << slot;
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub(crate) fn get(&self, seq: u64) -> Option<&V> {
        let (key, slot) = split(seq);
        self.chunks.get(&key)?.slots[slot].as_ref()
    }

    pub(crate) fn get_mut(&mut self, seq: u64) -> Option<&mut V> {
        let (key, slot) = split(seq);
        self.chunks.get_mut(&key)?.slots[slot].as_mut()
    }

    pub(crate) fn remove(&mut self, seq: u64) -> Option<V> {
        let (key, slot) = split(seq);
        let chunk = self.chunks.get_mut(&key)?;
        let value = chunk.slots[slot].take()?;
        chunk.live &= !(1 << slot);
        if chunk.live == 0 {
            self.chunks.remove(&key);
        }
        self.len -= 1;
        Some(value)
    }

    /// Entries in ascending order of sequence number.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &V)> {
        self.iter_from(0)
    }

    /// Entries numbered `from` or more, in ascending order: a scan resumed where the last
    /// one stopped costs nothing for what lies before it.
    pub(crate) fn iter_from(&self, from: u64) -> impl Iterator<Item = (u64, &V)> {
        let (first, slot) = split(from);
        self.chunks.range(first..).flat_map(move |(&key, chunk)| {
            let live = if key == first {
                chunk.live & at_or_above(slot)
            } else {
                chunk.live
            };
            bits_of(live).filter_map(move |slot| {
                chunk.slots[slot]
                    .as_ref()
                    .map(|v| ((key << CHUNK_BITS) | slot as u64, v))
            })
        })
    }
}

/// A set of sequence numbers, iterated in ascending order; one bit per number.
#[derive(Default)]
pub(crate) struct SeqSet {
    words: BTreeMap<u64, u64>,
    len: usize,
}

impl SeqSet {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn insert(&mut self, seq: u64) {
        let (key, bit) = split(seq);
        let word = self.words.entry(key).or_insert(0);
        if *word & (1 << bit) == 0 {
            *word |= 1 << bit;
            self.len += 1;
        }
    }

    pub(crate) fn remove(&mut self, seq: u64) {
        let (key, bit) = split(seq);
        if let Some(word) = self.words.get_mut(&key)
            && *word & (1 << bit) != 0
        {
            *word &= !(1 << bit);
            self.len -= 1;
            if *word == 0 {
                self.words.remove(&key);
            }
        }
    }

    /// Members `from` or more, in ascending order.
    pub(crate) fn iter_from(&self, from: u64) -> impl Iterator<Item = u64> + '_ {
        let (first, bit) = split(from);
        self.words.range(first..).flat_map(move |(&key, &word)| {
            let word = if key == first {
                word & at_or_above(bit)
            } else {
                word
            };
            bits_of(word).map(move |bit| (key << CHUNK_BITS) | bit as u64)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn seq_map_behaves_like_an_ordered_map() {
        let mut m = SeqMap::default();
        let mut reference = std::collections::BTreeMap::new();
        let mut x: u64 = 7;
        for i in 0..5_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let seq = (x >> 33) % 2_000;
            if i % 3 == 0 {
                assert_eq!(m.remove(seq), reference.remove(&seq));
            } else {
                assert_eq!(m.insert(seq, i), reference.insert(seq, i));
            }
            assert_eq!(m.len(), reference.len());
        }
        let got: Vec<(u64, u64)> = m.iter().map(|(s, v)| (s, *v)).collect();
        let want: Vec<(u64, u64)> = reference.iter().map(|(s, v)| (*s, *v)).collect();
        assert_eq!(got, want);
        for from in [0, 1, 63, 64, 65, 127, 128, 999, 1_000, 1_999, 2_000, 5_000] {
            let got: Vec<(u64, u64)> = m.iter_from(from).map(|(s, v)| (s, *v)).collect();
            let want: Vec<(u64, u64)> = reference.range(from..).map(|(s, v)| (*s, *v)).collect();
            assert_eq!(got, want, "from {from}");
        }
        for (s, v) in &reference {
            assert_eq!(m.get(*s), Some(v));
        }
        for s in reference.keys().copied().collect::<Vec<_>>() {
            m.remove(s);
        }
        assert_eq!(m.len(), 0);
        assert!(m.chunks.is_empty(), "empty chunks are freed");
    }

    #[test]
    fn seq_set_behaves_like_an_ordered_set() {
        let mut s = SeqSet::default();
        let mut reference = BTreeSet::new();
        for i in 0..3_000u64 {
            let seq = (i * 7919) % 1_000 + (i / 1000) * 100_000;
            if i % 4 == 0 {
                s.remove(seq);
                reference.remove(&seq);
            } else {
                s.insert(seq);
                reference.insert(seq);
            }
        }
        assert_eq!(
            s.iter_from(0).collect::<Vec<_>>(),
            reference.iter().copied().collect::<Vec<_>>()
        );
        assert_eq!(s.len(), reference.len());
        for from in [
            0, 1, 63, 64, 65, 500, 999, 1_000, 100_000, 100_063, 200_999, 300_000,
        ] {
            assert_eq!(
                s.iter_from(from).collect::<Vec<_>>(),
                reference.range(from..).copied().collect::<Vec<_>>(),
                "from {from}"
            );
        }
    }
}
