//! Words: how text is split for text predicates (tantivy's default tokenizer).

/// Longest word kept by the text tokenizer, in bytes; longer words are dropped, as
/// tantivy's default tokenizer does.
pub const MAX_WORD_BYTES: usize = 40;

/// Splits text into lower-cased words: runs of letters and digits, at most
/// [`MAX_WORD_BYTES`] long (longer runs are dropped). This is tantivy's default tokenizer:
/// split on anything not alphanumeric, drop long tokens, lower-case each character.
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty() && w.len() < MAX_WORD_BYTES)
        .map(|w| w.chars().flat_map(char::to_lowercase).collect())
}
