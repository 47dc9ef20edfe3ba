//! Nesting limits: how deep documents and queries may be.
//!
//! Documents (lists and maps inside lists and maps) and queries (AND, OR and NOT inside
//! each other) are trees, and every walk over them (decoding, encoding, matching,
//! compiling, dropping) recurses once per level. A tree that arrives from outside (a frame,
//! a JSON text, a query typed on the command line, a Rust value a program builds) is
//! therefore refused past [`MAX_DEPTH`] levels *before* it is walked any deeper, so that no
//! input can overflow a stack: decoding counts the levels it has entered on the decoding
//! thread ([`Guard`]), and the checks of values built in memory stop at the limit instead
//! of walking on.

use std::cell::Cell;
use std::fmt::Display;

/// The deepest nesting accepted in a document (a top-level field is at depth 1, a value
/// inside a list or map one deeper) and in a query's filter (AND / OR / NOT levels).
/// Real entries and queries stay far below it; it exists to refuse hostile input.
pub const MAX_DEPTH: usize = 64;

thread_local! {
    /// Levels of documents and filters being decoded on this thread right now.
    static DECODING: Cell<usize> = const { Cell::new(0) };
}

/// One level of a tree being decoded; the level is left when the guard drops (also when
/// decoding fails or unwinds).
pub(crate) struct Guard(());

impl Guard {
    /// Enters one more level of `what` on this thread.
    ///
    /// # Errors
    /// A decoding error naming the limit when it would be more than [`MAX_DEPTH`] levels.
    pub(crate) fn enter<E: serde::de::Error>(what: impl Display) -> Result<Guard, E> {
        DECODING.with(|d| {
            let depth = d.get();
            if depth >= MAX_DEPTH {
                return Err(E::custom(format_args!(
                    "{what} nested deeper than {MAX_DEPTH} levels"
                )));
            }
            d.set(depth + 1);
            Ok(Guard(()))
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        DECODING.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

/// Room reserved up front for a decoded list or map of `hint` elements: a frame claims a
/// length before it proves it, and a nested tree reserves at every level at once, so the
/// reservation is small and the rest grows with what actually arrives.
pub(crate) fn prealloc(hint: Option<usize>) -> usize {
    hint.unwrap_or(0).min(16)
}

/// Decodes a list with a small up-front reservation (see [`prealloc`]); for the lists
/// inside nested trees (the parts of AND and OR).
pub(crate) fn small_vec<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    struct Small<T>(std::marker::PhantomData<T>);
    impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Small<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::with_capacity(prealloc(seq.size_hint()));
            while let Some(item) = seq.next_element()? {
                out.push(item);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Small(std::marker::PhantomData))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_counted_and_released() {
        let mut guards = Vec::new();
        for _ in 0..MAX_DEPTH {
            guards.push(Guard::enter::<serde::de::value::Error>("x").unwrap());
        }
        let err = Guard::enter::<serde::de::value::Error>("a list")
            .err()
            .expect("one level too many");
        assert!(
            err.to_string().contains("a list nested deeper than 64"),
            "{err}"
        );
        guards.pop();
        assert!(Guard::enter::<serde::de::value::Error>("x").is_ok());
        guards.clear();
        assert_eq!(DECODING.with(Cell::get), 0);
    }
}
