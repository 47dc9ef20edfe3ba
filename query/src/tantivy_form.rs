//! The tantivy form of queries: the reference meaning of the query language (docs/ARCHITECTURE.md
//! section 5).
//!
//! Entries are indexed into a small schema: `_type` (raw string), `fields` (a JSON field
//! with the raw tokenizer and fast values, for equality, ranges and `exists`) and `text` (a
//! JSON copy with tantivy's default tokenizer, for text predicates). [`EntrySchema::compile`]
//! turns a [`Query`] into a tantivy query over that schema, and [`naive_matches`] runs
//! every query against a batch of entries the slow, obvious way. The native matcher and the
//! [`Percolator`](crate::Percolator) must agree with it; the property tests check that.
//!
//! Numbers follow tantivy's canonical form: integral values are `i64` (or `u64` above
//! `i64::MAX`), other values `f64`, so `3`, `3u64` and `3.0` are one term. Byte fields are
//! not indexed (queries do not see them).

use std::collections::BTreeMap;
use std::ops::Bound;

use tantivy::collector::DocSetCollector;
use tantivy::directory::RamDirectory;
use tantivy::query::{
    AllQuery, BooleanQuery, ExistsQuery, Occur, Query as TantivyQuery, RangeQuery, TermQuery,
};
use tantivy::schema::{
    Field, IndexRecordOption, JsonObjectOptions, OwnedValue, STRING, Schema, TextFieldIndexing,
};
use tantivy::{Index, TantivyDocument, Term};

use crate::query::{Filter, Query};
use crate::value::{Fields, Value};
use crate::words::words;

/// The name of the JSON field that holds an entry's fields.
pub const FIELDS: &str = "fields";
/// The name of the tokenized JSON copy used by text predicates.
pub const TEXT: &str = "text";
/// The name of the raw entry-type field.
pub const TYPE: &str = "_type";

/// The tantivy schema entries are indexed into, with its fields.
#[derive(Clone)]
pub struct EntrySchema {
    schema: Schema,
    entry_type: Field,
    fields: Field,
    text: Field,
}

impl Default for EntrySchema {
    fn default() -> Self {
        EntrySchema::new()
    }
}

impl EntrySchema {
    /// Builds the schema.
    pub fn new() -> EntrySchema {
        let mut builder = Schema::builder();
        let entry_type = builder.add_text_field(TYPE, STRING);
        let raw = JsonObjectOptions::default()
            .set_indexing_options(
                TextFieldIndexing::default()
                    .set_tokenizer("raw")
                    .set_index_option(IndexRecordOption::Basic),
            )
            .set_fast("raw");
        let fields = builder.add_json_field(FIELDS, raw);
        let tokenized = JsonObjectOptions::default().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer("default")
                .set_index_option(IndexRecordOption::Basic),
        );
        let text = builder.add_json_field(TEXT, tokenized);
        EntrySchema {
            schema: builder.build(),
            entry_type,
            fields,
            text,
        }
    }

    /// The tantivy schema.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The tantivy document of an entry.
    pub fn document(&self, entry_type: &str, fields: &Fields) -> TantivyDocument {
        let mut doc = TantivyDocument::new();
        doc.add_text(self.entry_type, entry_type);
        let object = object(fields);
        doc.add_object(self.fields, object.clone());
        doc.add_object(self.text, object);
        doc
    }

    /// The tantivy query with the same meaning as `query`.
    pub fn compile(&self, query: &Query) -> Box<dyn TantivyQuery> {
        let of_type: Box<dyn TantivyQuery> = Box::new(TermQuery::new(
            Term::from_field_text(self.entry_type, query.entry_type()),
            IndexRecordOption::Basic,
        ));
        match query.filter() {
            Filter::All => of_type,
            filter => Box::new(BooleanQuery::intersection(vec![
                of_type,
                self.filter(filter),
            ])),
        }
    }

    fn json_term(&self, field: Field, path: &str) -> Term {
        Term::from_field_json_path(field, path, false)
    }

    /// The term for `value` at `path` in the raw field; `None` for values that are not
    /// indexed (null, bytes, lists, maps).
    fn value_term(&self, path: &str, value: &Value) -> Option<Term> {
        let mut term = self.json_term(self.fields, path);
        match canonical(value)? {
            Canonical::I64(i) => term.append_type_and_fast_value(i),
            Canonical::U64(u) => term.append_type_and_fast_value(u),
            Canonical::F64(f) => term.append_type_and_fast_value(f),
            Canonical::Bool(b) => term.append_type_and_fast_value(b),
            Canonical::Str(s) => term.append_type_and_str(s),
        }
        Some(term)
    }

    /// A range over one path. A tantivy range needs both bounds of one term type, so
    /// bounds of different numeric types (`3` and `3.5`) become two half-open ranges.
    fn range(&self, path: &str, low: Bound<&Value>, high: Bound<&Value>) -> Box<dyn TantivyQuery> {
        let term = |b: Bound<&Value>| -> Option<Bound<Term>> {
            Some(match b {
                Bound::Included(v) => Bound::Included(self.value_term(path, v)?),
                Bound::Excluded(v) => Bound::Excluded(self.value_term(path, v)?),
                Bound::Unbounded => Bound::Unbounded,
            })
        };
        let typ = |b: Bound<&Value>| match b {
            Bound::Included(v) | Bound::Excluded(v) => canonical(v).map(|c| c.type_tag()),
            Bound::Unbounded => None,
        };
        let types = (typ(low), typ(high));
        let (Some(low), Some(high)) = (term(low), term(high)) else {
            return Box::new(BooleanQuery::new(Vec::new()));
        };
        match types {
            (Some(a), Some(b)) if a != b => Box::new(BooleanQuery::intersection(vec![
                Box::new(RangeQuery::new(low, Bound::Unbounded)),
                Box::new(RangeQuery::new(Bound::Unbounded, high)),
            ])),
            (None, None) => Box::new(AllQuery),
            _ => Box::new(RangeQuery::new(low, high)),
        }
    }

    fn exists(&self, path: &str) -> Box<dyn TantivyQuery> {
        Box::new(ExistsQuery::new(format!("{FIELDS}.{path}"), true))
    }

    fn filter(&self, filter: &Filter) -> Box<dyn TantivyQuery> {
        let nothing = || -> Box<dyn TantivyQuery> { Box::new(BooleanQuery::new(Vec::new())) };
        let eq = |path: &str, v: &Value| -> Box<dyn TantivyQuery> {
            match self.value_term(path, v) {
                Some(t) => Box::new(TermQuery::new(t, IndexRecordOption::Basic)),
                None => nothing(),
            }
        };
        let not = |q: Box<dyn TantivyQuery>| -> Box<dyn TantivyQuery> {
            Box::new(BooleanQuery::new(vec![
                (Occur::Must, Box::new(AllQuery)),
                (Occur::MustNot, q),
            ]))
        };
        match filter {
            Filter::All => Box::new(AllQuery),
            Filter::Eq(p, v) => eq(p, v),
            Filter::Ne(p, v) => Box::new(BooleanQuery::new(vec![
                (Occur::Must, self.exists(p)),
                (Occur::MustNot, eq(p, v)),
            ])),
            Filter::Lt(p, v) => self.range(p, Bound::Unbounded, Bound::Excluded(v)),
            Filter::Le(p, v) => self.range(p, Bound::Unbounded, Bound::Included(v)),
            Filter::Gt(p, v) => self.range(p, Bound::Excluded(v), Bound::Unbounded),
            Filter::Ge(p, v) => self.range(p, Bound::Included(v), Bound::Unbounded),
            Filter::Between(p, low, high) => {
                self.range(p, Bound::Included(low), Bound::Included(high))
            }
            Filter::In(p, vs) => {
                Box::new(BooleanQuery::union(vs.iter().map(|v| eq(p, v)).collect()))
            }
            Filter::Exists(p) => self.exists(p),
            Filter::Missing(p) => not(self.exists(p)),
            Filter::Prefix(p, prefix) => {
                let low = Value::Str(prefix.clone());
                match prefix_successor(prefix) {
                    Some(next) => {
                        self.range(p, Bound::Included(&low), Bound::Excluded(&Value::Str(next)))
                    }
                    None => self.range(p, Bound::Included(&low), Bound::Unbounded),
                }
            }
            Filter::Text(p, text) => {
                let terms: Vec<Box<dyn TantivyQuery>> = words(text)
                    .map(|w| {
                        let mut term = self.json_term(self.text, p);
                        term.append_type_and_str(&w);
                        Box::new(TermQuery::new(term, IndexRecordOption::Basic))
                            as Box<dyn TantivyQuery>
                    })
                    .collect();
                if terms.is_empty() {
                    nothing()
                } else {
                    Box::new(BooleanQuery::intersection(terms))
                }
            }
            Filter::And(parts) => Box::new(BooleanQuery::intersection(
                parts.iter().map(|f| self.filter(f)).collect(),
            )),
            Filter::Or(parts) => Box::new(BooleanQuery::union(
                parts.iter().map(|f| self.filter(f)).collect(),
            )),
            Filter::Not(inner) => not(self.filter(inner)),
        }
    }
}

/// A number or scalar in tantivy's canonical term form.
enum Canonical<'a> {
    I64(i64),
    U64(u64),
    F64(f64),
    Bool(bool),
    Str(&'a str),
}

impl Canonical<'_> {
    /// Which term type this is (bounds of one range must share it).
    fn type_tag(&self) -> u8 {
        match self {
            Canonical::I64(_) => 0,
            Canonical::U64(_) => 1,
            Canonical::F64(_) => 2,
            Canonical::Bool(_) => 3,
            Canonical::Str(_) => 4,
        }
    }
}

fn canonical(v: &Value) -> Option<Canonical<'_>> {
    Some(match v {
        Value::Bool(b) => Canonical::Bool(*b),
        Value::Str(s) => Canonical::Str(s),
        Value::I64(i) => Canonical::I64(*i),
        Value::U64(u) => match i64::try_from(*u) {
            Ok(i) => Canonical::I64(i),
            Err(_) => Canonical::U64(*u),
        },
        Value::F64(f) if !f.is_finite() => return None,
        Value::F64(f) => {
            if f.fract() == 0.0 && *f >= i64::MIN as f64 && *f <= i64::MAX as f64 {
                Canonical::I64(*f as i64)
            } else if f.fract() == 0.0 && *f >= 0.0 && *f <= u64::MAX as f64 {
                Canonical::U64(*f as u64)
            } else {
                Canonical::F64(*f)
            }
        }
        Value::Null | Value::Bytes(_) | Value::List(_) | Value::Map(_) => return None,
    })
}

/// The smallest string above every string that starts with `prefix` (`None`: there is
/// none, the range is unbounded above).
pub(crate) fn prefix_successor(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match last {
            '\u{D7FF}' => Some('\u{E000}'),
            char::MAX => None,
            c => char::from_u32(c as u32 + 1),
        };
        if let Some(n) = next {
            chars.push(n);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

fn owned(v: &Value) -> OwnedValue {
    match v {
        Value::Null | Value::Bytes(_) => OwnedValue::Null,
        Value::Bool(b) => OwnedValue::Bool(*b),
        Value::I64(i) => OwnedValue::I64(*i),
        Value::U64(u) => OwnedValue::U64(*u),
        Value::F64(f) => OwnedValue::F64(*f),
        Value::Str(s) => OwnedValue::Str(s.clone()),
        Value::List(items) => OwnedValue::Array(items.iter().map(owned).collect()),
        Value::Map(m) => {
            OwnedValue::Object(m.iter().map(|(k, v)| (k.to_owned(), owned(v))).collect())
        }
    }
}

fn object(fields: &Fields) -> BTreeMap<String, OwnedValue> {
    let mut out = BTreeMap::new();
    for (k, v) in fields.iter() {
        // The first of two equal names wins, as in the native matcher.
        out.entry(k.to_owned()).or_insert_with(|| owned(v));
    }
    out
}

/// The naive reference: indexes `entries` into a fresh in-RAM index and runs every query
/// against it. Returns `(query id, entry position)` pairs, sorted.
pub fn naive_matches(
    schema: &EntrySchema,
    queries: &[(u64, &Query)],
    entries: &[(&str, &Fields)],
) -> tantivy::Result<Vec<(u64, usize)>> {
    let mut writer = Index::builder()
        .schema(schema.schema().clone())
        .single_segment_index_writer(RamDirectory::create(), 15_000_000)?;
    for (entry_type, fields) in entries {
        writer.add_document(schema.document(entry_type, fields))?;
    }
    let index = writer.finalize()?;
    let reader = index.reader()?;
    let searcher = reader.searcher();
    let mut pairs = Vec::new();
    for (id, query) in queries {
        let docs = searcher.search(schema.compile(query).as_ref(), &DocSetCollector)?;
        pairs.extend(docs.into_iter().map(|d| (*id, d.doc_id as usize)));
    }
    pairs.sort_unstable();
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pairs: &[(&str, Value)]) -> Fields {
        pairs
            .iter()
            .map(|(k, v)| (std::borrow::Cow::Owned((*k).to_owned()), v.clone()))
            .collect()
    }

    #[test]
    fn prefix_successors_bound_exactly_the_prefixed_strings() {
        assert_eq!(prefix_successor("ab").as_deref(), Some("ac"));
        assert_eq!(prefix_successor("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_successor("\u{10FFFF}"), None);
        assert_eq!(prefix_successor("\u{D7FF}").as_deref(), Some("\u{E000}"));
    }

    #[test]
    fn the_tantivy_form_matches_as_documented() {
        let schema = EntrySchema::new();
        let a = entry(&[
            ("n", Value::I64(3)),
            ("s", Value::Str("Ready".into())),
            ("body", Value::Str("The quick Fox".into())),
        ]);
        let b = entry(&[
            ("n", Value::F64(3.5)),
            ("s", Value::Str("Held".into())),
            ("blob", Value::Bytes(vec![1, 2])),
        ]);
        let c = entry(&[
            ("n", Value::U64(u64::MAX)),
            (
                "tags",
                Value::List(vec![Value::Str("x".into()), Value::Null]),
            ),
        ]);
        let entries = [("T", &a), ("T", &b), ("T", &c), ("U", &a)];
        let cases: Vec<(Query, Vec<usize>)> = vec![
            (Query::for_type("T"), vec![0, 1, 2]),
            (Query::for_type("T").eq("n", 3.0), vec![0]),
            (Query::for_type("T").gt("n", 3), vec![1, 2]),
            (Query::for_type("T").lt("n", 3.5), vec![0]),
            (Query::for_type("T").between("n", 3, 3.5), vec![0, 1]),
            (Query::for_type("T").eq("n", u64::MAX), vec![2]),
            (Query::for_type("T").ne("s", "Ready"), vec![1]),
            (Query::for_type("T").missing("s"), vec![2]),
            (Query::for_type("T").exists("tags"), vec![2]),
            (Query::for_type("T").exists("blob"), vec![]),
            (Query::for_type("T").prefix("s", "Re"), vec![0]),
            (Query::for_type("T").text("body", "fox QUICK"), vec![0]),
            (Query::for_type("T").is_in("s", ["Held", "Nope"]), vec![1]),
            (
                Query::for_type("T").not(Filter::eq("s", "Held")),
                vec![0, 2],
            ),
            (Query::for_type("U").eq("s", "Ready"), vec![3]),
        ];
        let queries: Vec<(u64, &Query)> = cases
            .iter()
            .enumerate()
            .map(|(i, (q, _))| (i as u64, q))
            .collect();
        let got = naive_matches(&schema, &queries, &entries).unwrap();
        for (i, (q, want)) in cases.iter().enumerate() {
            let hits: Vec<usize> = got
                .iter()
                .filter(|(id, _)| *id == i as u64)
                .map(|(_, d)| *d)
                .collect();
            assert_eq!(&hits, want, "{q}");
            // The native matcher says the same.
            let native: Vec<usize> = entries
                .iter()
                .enumerate()
                .filter(|(_, (t, f))| *t == q.entry_type() && q.matches(f))
                .map(|(i, _)| i)
                .collect();
            assert_eq!(&native, want, "native: {q}");
        }
    }
}
