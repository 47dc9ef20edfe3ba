//! The native matcher: evaluates a filter directly over an entry's fields.
//!
//! This is the fast path used by the store and by notify. Its meaning is fixed by the rules
//! in docs/ARCHITECTURE.md section 5: numbers compare as numbers across integer and float, strings
//! compare exactly, a missing (or null) field never equals anything, and a list field is
//! multi-valued (a predicate holds when it holds for any element). Byte fields are opaque
//! (not seen by queries), and a nested structure counts as present when it holds at least
//! one value a query can see.

use std::cmp::Ordering;

use crate::query::{Filter, Query};
use crate::value::{Fields, Value};
use crate::words::words;

impl Query {
    /// Whether an entry with these fields matches the query's filter. The entry type is
    /// not checked here: the caller looks entries up by type.
    pub fn matches(&self, fields: &Fields) -> bool {
        self.filter().matches(fields)
    }
}

impl Filter {
    /// Whether an entry with these fields matches.
    pub fn matches(&self, fields: &Fields) -> bool {
        match self {
            Filter::All => true,
            Filter::And(parts) => parts.iter().all(|p| p.matches(fields)),
            Filter::Or(parts) => parts.iter().any(|p| p.matches(fields)),
            Filter::Not(inner) => !inner.matches(fields),
            Filter::Eq(f, v) => fields.any_at(f, &mut |x| x.same_as(v)),
            Filter::Ne(f, v) => {
                fields.any_at(f, &mut |_| true) && !fields.any_at(f, &mut |x| x.same_as(v))
            }
            Filter::Lt(f, v) => cmp_any(fields, f, v, |o| o == Ordering::Less),
            Filter::Le(f, v) => cmp_any(fields, f, v, |o| o != Ordering::Greater),
            Filter::Gt(f, v) => cmp_any(fields, f, v, |o| o == Ordering::Greater),
            Filter::Ge(f, v) => cmp_any(fields, f, v, |o| o != Ordering::Less),
            Filter::Between(f, low, high) => fields.any_at(f, &mut |x| {
                x.compare(low).is_some_and(|o| o != Ordering::Less)
                    && x.compare(high).is_some_and(|o| o != Ordering::Greater)
            }),
            Filter::In(f, values) => fields.any_at(f, &mut |x| values.iter().any(|v| x.same_as(v))),
            Filter::Exists(f) => fields.any_at(f, &mut |_| true),
            Filter::Missing(f) => !fields.any_at(f, &mut |_| true),
            Filter::Prefix(f, p) => fields.any_at(f, &mut |x| {
                x.as_str().is_some_and(|s| s.starts_with(p.as_str()))
            }),
            Filter::Text(f, text) => {
                let mut wanted: Vec<String> = words(text).collect();
                !wanted.is_empty()
                    && fields.any_at(f, &mut |x| {
                        if let Value::Str(s) = x {
                            for w in words(s) {
                                wanted.retain(|q| *q != w);
                            }
                        }
                        wanted.is_empty()
                    })
            }
        }
    }
}

fn cmp_any(fields: &Fields, f: &str, v: &Value, ok: impl Fn(Ordering) -> bool) -> bool {
    fields.any_at(f, &mut |x| x.compare(v).is_some_and(&ok))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Query;

    fn doc() -> Fields {
        let mut address = Fields::new();
        address.push("city", Value::Str("Paris".into()));
        let mut item1 = Fields::new();
        item1.push("sku", Value::Str("A-1".into()));
        let mut item2 = Fields::new();
        item2.push("sku", Value::Str("B-2".into()));
        let mut f = Fields::new();
        f.push("status", Value::Str("ReadyToShip".into()));
        f.push("amount", Value::F64(150.0));
        f.push("count", Value::I64(3));
        f.push("note", Value::Null);
        f.push(
            "tags",
            Value::List(vec![Value::Str("red".into()), Value::Str("big".into())]),
        );
        f.push("body", Value::Str("The quick brown Fox, jumps!".into()));
        f.push("address", Value::Map(address));
        f.push(
            "items",
            Value::List(vec![Value::Map(item1), Value::Map(item2)]),
        );
        f
    }

    fn q() -> Query {
        Query::for_type("Order")
    }

    #[test]
    fn scalar_predicates() {
        let d = doc();
        assert!(q().eq("status", "ReadyToShip").matches(&d));
        assert!(!q().eq("status", "readytoship").matches(&d));
        assert!(q().eq("amount", 150).matches(&d));
        assert!(q().gt("amount", 100).le("count", 3.0).matches(&d));
        assert!(!q().lt("amount", 150).matches(&d));
        assert!(q().between("count", 3, 3).matches(&d));
        assert!(q().is_in("count", [1, 2, 3]).matches(&d));
        assert!(q().ne("status", "Held").matches(&d));
        assert!(!q().ne("nothing", "Held").matches(&d), "ne needs the field");
        assert!(!q().gt("status", 1).matches(&d), "strings are not numbers");
        assert!(
            q().gt("status", "Ready").matches(&d),
            "strings compare by bytes"
        );
        assert!(q().prefix("status", "Ready").matches(&d));
    }

    #[test]
    fn missing_and_null_never_equal_anything() {
        let d = doc();
        assert!(q().missing("note").matches(&d));
        assert!(q().missing("nowhere").matches(&d));
        assert!(!q().exists("note").matches(&d));
        assert!(q().not(Filter::eq("note", 1)).matches(&d));
        assert!(!q().eq("note", "").matches(&d));
    }

    #[test]
    fn lists_and_paths() {
        let d = doc();
        assert!(q().eq("tags", "big").matches(&d));
        assert!(!q().ne("tags", "big").matches(&d));
        assert!(q().eq("address.city", "Paris").matches(&d));
        assert!(q().eq("items.sku", "B-2").matches(&d));
        assert!(!q().eq("address.city.x", "Paris").matches(&d));
    }

    #[test]
    fn text_matches_all_words_in_any_case() {
        let d = doc();
        assert!(q().text("body", "fox QUICK").matches(&d));
        assert!(!q().text("body", "fox cat").matches(&d));
        assert!(
            !q().text("status", "ready").matches(&d),
            "words, not substrings"
        );
        assert!(
            q().text("tags", "red big").matches(&d),
            "words from all values of a list"
        );
    }
}
