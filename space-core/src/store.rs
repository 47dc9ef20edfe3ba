//! The store of one entry type: records in write order, the key map, field indexes and the
//! type's schema. It holds data only; waiting, leases and events live in the engine.
//!
//! Records are kept in a [`SeqMap`] by a per-type sequence number that grows with every
//! write, so iterating it is oldest-first order. An index maps the normalised value of one
//! top-level field to the ordered [`SeqSet`] of sequence numbers holding it, so an equality
//! (or IN) on an indexed field visits only those records, still oldest first.

use serde::{Deserialize, Serialize};

use crate::document::Document;
use crate::lease::{Deadline, Now};
use crate::seq::{SeqMap, SeqSet};

use space_query::{Fields, Filter, IndexValue, Value, ValueKind};

use crate::entry::Key;

/// Hash maps of the store: keys are space-minted UUIDs or user strings, hashed often, and
/// not chosen by an attacker in a way that a seeded fast hash does not withstand.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// One stored entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) key: Key,
    /// The key is found through the key map (a user key, or a minted key that could not
    /// carry its sequence number); otherwise the key itself names the sequence number.
    pub(crate) mapped_key: bool,
    pub(crate) version: u64,
    pub(crate) fields: Fields,
    /// When the entry's lease runs out (`None`: forever).
    pub(crate) expires: Option<Deadline>,
    /// Set while the entry is claimed (hidden from everyone else).
    pub(crate) claim: Option<ClaimState>,
    /// How many times the entry was claimed (a claim that lapsed or was released
    /// included): a worker's attempt count.
    pub(crate) claims: u32,
}

/// A claim held on a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ClaimState {
    pub(crate) token: u64,
    pub(crate) expires: Deadline,
}

impl Record {
    pub(crate) fn expired(&self, now: &Now) -> bool {
        self.expires.is_some_and(|e| e <= now.get())
    }

    /// Visible to reads, takes, claims and counts: not claimed and not expired.
    pub(crate) fn visible(&self, now: &Now) -> bool {
        self.claim.is_none() && !self.expired(now)
    }

    pub(crate) fn document(&self) -> Document {
        Document {
            key: self.key.clone(),
            version: self.version,
            fields: self.fields.clone(),
        }
    }

    pub(crate) fn into_document(self) -> Document {
        Document {
            key: self.key,
            version: self.version,
            fields: self.fields,
        }
    }
}

struct FieldIndex {
    field: String,
    buckets: HashMap<IndexValue, SeqSet>,
}

/// Calls `f` with the index value of every scalar in the top-level `field` (each element
/// of a list field).
fn for_index_values(field: &str, fields: &Fields, mut f: impl FnMut(IndexValue)) {
    match fields.get(field) {
        Some(Value::List(items)) => items.iter().filter_map(IndexValue::of).for_each(&mut f),
        Some(v) => {
            if let Some(iv) = IndexValue::of(v) {
                f(iv);
            }
        }
        None => {}
    }
}

impl FieldIndex {
    fn add(&mut self, seq: u64, fields: &Fields) {
        let buckets = &mut self.buckets;
        for_index_values(&self.field, fields, |iv| {
            buckets.entry(iv).or_default().insert(seq);
        });
    }

    fn remove(&mut self, seq: u64, fields: &Fields) {
        let buckets = &mut self.buckets;
        for_index_values(&self.field, fields, |iv| {
            if let Some(set) = buckets.get_mut(&iv) {
                set.remove(seq);
                if set.is_empty() {
                    buckets.remove(&iv);
                }
            }
        });
    }
}

/// A field whose value kind differs from the type's schema.
pub(crate) struct KindConflict {
    pub(crate) field: String,
    pub(crate) expected: ValueKind,
    pub(crate) found: ValueKind,
}

/// Entries and bytes held by all the stores of an engine, for its limits; also counted
/// in `also` (what a node holds in all its replicas), when given.
#[derive(Default)]
pub(crate) struct Totals {
    pub(crate) entries: std::sync::atomic::AtomicU64,
    pub(crate) bytes: std::sync::atomic::AtomicU64,
    pub(crate) also: Option<std::sync::Arc<Totals>>,
}

impl Totals {
    /// Nothing held yet, counted also in `also` when given.
    pub(crate) fn counted_in(also: Option<std::sync::Arc<Totals>>) -> Totals {
        Totals {
            entries: 0.into(),
            bytes: 0.into(),
            also,
        }
    }

    fn add(&self, bytes: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.entries.fetch_add(1, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
        if let Some(also) = &self.also {
            also.add(bytes);
        }
    }

    fn sub(&self, bytes: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.entries.fetch_sub(1, Relaxed);
        self.bytes.fetch_sub(bytes, Relaxed);
        if let Some(also) = &self.also {
            also.sub(bytes);
        }
    }
}

impl Drop for Totals {
    /// An engine that goes (a replica replaced by a snapshot's) takes what it held out
    /// of the count it was part of.
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(also) = &self.also {
            also.entries.fetch_sub(*self.entries.get_mut(), Relaxed);
            also.bytes.fetch_sub(*self.bytes.get_mut(), Relaxed);
        }
    }
}

/// The records of one entry type.
#[derive(Default)]
pub(crate) struct Store {
    totals: std::sync::Arc<Totals>,
    next_seq: u64,
    records: SeqMap<Record>,
    /// Sequence numbers of the records whose keys do not carry them.
    mapped_keys: HashMap<Key, u64>,
    indexes: Vec<FieldIndex>,
    schema: HashMap<String, ValueKind>,
    bytes: usize,
}

impl Store {
    /// A store that counts its records into `totals`.
    pub(crate) fn new(totals: std::sync::Arc<Totals>) -> Store {
        Store {
            totals,
            ..Store::default()
        }
    }

    /// The sequence number the next new record gets (write order); applying a command
    /// that brings it in moves the count on.
    pub(crate) fn upcoming_seq(&self) -> u64 {
        self.next_seq + 1
    }

    pub(crate) fn len(&self) -> usize {
        self.records.len()
    }

    /// The last sequence number handed out.
    pub(crate) fn last_seq(&self) -> u64 {
        self.next_seq
    }

    /// Continues numbering after `seq`.
    pub(crate) fn skip_to(&mut self, seq: u64) {
        self.next_seq = self.next_seq.max(seq);
    }

    /// The records in write order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &Record)> {
        self.records.iter()
    }

    /// The indexed fields.
    pub(crate) fn indexed_fields(&self) -> Vec<String> {
        self.indexes.iter().map(|i| i.field.clone()).collect()
    }

    /// Approximate bytes held by the records' documents.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether a top-level field is indexed.
    pub(crate) fn has_index(&self, field: &str) -> bool {
        self.indexes.iter().any(|i| i.field == field)
    }

    /// Adds an index on a top-level field, indexing existing records; returns false when
    /// the index was there already.
    pub(crate) fn ensure_index(&mut self, field: &str) -> bool {
        if self.indexes.iter().any(|i| i.field == field) {
            return false;
        }
        let mut index = FieldIndex {
            field: field.to_owned(),
            buckets: HashMap::default(),
        };
        for (seq, r) in self.records.iter() {
            index.add(seq, &r.fields);
        }
        self.indexes.push(index);
        true
    }

    /// The kind of value the type stores in a top-level scalar field, if known.
    pub(crate) fn kind_of(&self, field: &str) -> Option<ValueKind> {
        self.schema
            .get(field)
            .copied()
            .filter(|k| !matches!(k, ValueKind::List | ValueKind::Map))
    }

    /// The schema: the kind of every field seen so far, sorted by name.
    pub(crate) fn schema(&self) -> Vec<(String, ValueKind)> {
        let mut out: Vec<_> = self.schema.iter().map(|(k, v)| (k.clone(), *v)).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Restores a schema saved with [`schema`](Self::schema).
    pub(crate) fn set_schema(&mut self, schema: Vec<(String, ValueKind)>) {
        self.schema = schema.into_iter().collect();
    }

    /// Checks the document's field kinds against the schema without changing it. Returns
    /// whether the document has fields the schema does not know yet.
    pub(crate) fn check_kinds(&self, fields: &Fields) -> Result<bool, KindConflict> {
        let mut unknown = false;
        for (name, value) in fields.iter() {
            let found = value.kind();
            if found == ValueKind::Null {
                continue;
            }
            match self.schema.get(name) {
                Some(&expected) if expected != found => {
                    return Err(KindConflict {
                        field: name.to_owned(),
                        expected,
                        found,
                    });
                }
                Some(_) => {}
                None => unknown = true,
            }
        }
        Ok(unknown)
    }

    /// Records the kinds of fields not seen before.
    pub(crate) fn learn_kinds(&mut self, fields: &Fields) {
        for (name, value) in fields.iter() {
            let kind = value.kind();
            if kind != ValueKind::Null && !self.schema.contains_key(name) {
                self.schema.insert(name.to_owned(), kind);
            }
        }
    }

    pub(crate) fn contains_key(&self, key: &Key) -> bool {
        self.seq_of(key).is_some()
    }

    /// The sequence number of the record with this key.
    pub(crate) fn seq_of(&self, key: &Key) -> Option<u64> {
        if let Some(seq) = key.seq_hint()
            && self.records.get(seq).is_some_and(|r| &r.key == key)
        {
            return Some(seq);
        }
        self.mapped_keys.get(key).copied()
    }

    pub(crate) fn get(&self, seq: u64) -> Option<&Record> {
        self.records.get(seq)
    }

    pub(crate) fn get_mut(&mut self, seq: u64) -> Option<&mut Record> {
        self.records.get_mut(seq)
    }

    /// Stores a record under `seq` (a fresh one, or the one it had before it was handed
    /// out and came back, so it keeps its place in the order).
    pub(crate) fn insert(&mut self, seq: u64, record: Record) {
        for index in &mut self.indexes {
            index.add(seq, &record.fields);
        }
        let size = record.fields.approx_size();
        self.bytes += size;
        self.totals.add(size as u64);
        if record.mapped_key {
            self.mapped_keys.insert(record.key.clone(), seq);
        }
        self.records.insert(seq, record);
    }

    pub(crate) fn remove(&mut self, seq: u64) -> Option<Record> {
        let record = self.records.remove(seq)?;
        for index in &mut self.indexes {
            index.remove(seq, &record.fields);
        }
        let size = record.fields.approx_size();
        self.bytes -= size;
        self.totals.sub(size as u64);
        if record.mapped_key {
            self.mapped_keys.remove(&record.key);
        }
        Some(record)
    }

    /// Calls `visit` on every visible record that matches `filter`, oldest first, until it
    /// returns false. Uses a field index when the filter has an equality or IN on an
    /// indexed field at its top level.
    pub(crate) fn for_each_match(
        &self,
        filter: &Filter,
        now: &Now,
        visit: impl FnMut(u64, &Record) -> bool,
    ) {
        self.for_each_match_from(filter, now, 0, visit);
    }

    /// As [`for_each_match`](Self::for_each_match), over the records numbered `from` or
    /// more only: a page of a listing starts where the last one ended, without looking
    /// at (or matching) the records before it, so listing a type costs one pass over it
    /// rather than a pass per page.
    pub(crate) fn for_each_match_from(
        &self,
        filter: &Filter,
        now: &Now,
        from: u64,
        mut visit: impl FnMut(u64, &Record) -> bool,
    ) {
        match self.plan(filter) {
            None => {
                for (seq, r) in self.records.iter_from(from) {
                    examined();
                    if r.visible(now) && filter.matches(&r.fields) && !visit(seq, r) {
                        return;
                    }
                }
            }
            Some(sets) => {
                // When the filter is just the equality (or IN) the index answers, every
                // candidate matches: index buckets hold exactly the values that compare
                // equal. Otherwise the rest of the filter is checked on each candidate.
                let covered = !matches!(filter, Filter::And(_));
                merge_ordered(&sets, from, &mut |seq| {
                    examined();
                    match self.records.get(seq) {
                        Some(r) if r.visible(now) && (covered || filter.matches(&r.fields)) => {
                            visit(seq, r)
                        }
                        _ => true,
                    }
                });
            }
        }
    }

    /// The index buckets that contain every match of `filter`, or `None` for a full scan.
    fn plan(&self, filter: &Filter) -> Option<Vec<&SeqSet>> {
        let leaves: &[Filter] = match filter {
            Filter::And(parts) => parts,
            leaf => std::slice::from_ref(leaf),
        };
        let mut best: Option<(usize, Vec<&SeqSet>)> = None;
        for leaf in leaves {
            let (field, values): (&str, Vec<&Value>) = match leaf {
                Filter::Eq(f, v) => (f, vec![v]),
                Filter::In(f, vs) => (f, vs.iter().collect()),
                _ => continue,
            };
            let Some(index) = self.indexes.iter().find(|i| i.field == field) else {
                continue;
            };
            let sets: Vec<&SeqSet> = values
                .into_iter()
                .filter_map(IndexValue::of)
                .filter_map(|iv| index.buckets.get(&iv))
                .collect();
            let size = sets.iter().map(|s| s.len()).sum();
            if best.as_ref().is_none_or(|(b, _)| size < *b) {
                best = Some((size, sets));
            }
        }
        best.map(|(_, sets)| sets)
    }
}

/// Counts a record a scan looked at, on this thread (test builds only: what a test of a
/// scan's cost reads with [`examined_so_far`]).
#[inline]
fn examined() {
    #[cfg(test)]
    EXAMINED.with(|n| n.set(n.get() + 1));
}

#[cfg(test)]
thread_local! {
    static EXAMINED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Records scans on this thread have looked at so far (test builds only).
#[cfg(test)]
pub(crate) fn examined_so_far() -> u64 {
    EXAMINED.with(std::cell::Cell::get)
}

/// Visits the union of ordered sets in ascending order (each number once), from `from`
/// on, until `visit` returns false.
fn merge_ordered(sets: &[&SeqSet], from: u64, visit: &mut dyn FnMut(u64) -> bool) {
    if let [only] = sets {
        for seq in only.iter_from(from) {
            if !visit(seq) {
                return;
            }
        }
        return;
    }
    let mut iters: Vec<_> = sets.iter().map(|s| s.iter_from(from).peekable()).collect();
    loop {
        let next = iters.iter_mut().filter_map(|it| it.peek().copied()).min();
        let Some(seq) = next else {
            return;
        };
        for it in &mut iters {
            if it.peek().copied() == Some(seq) {
                it.next();
            }
        }
        if !visit(seq) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: i64, tags: &[&str]) -> Record {
        let mut f = Fields::new();
        f.push("kind", Value::I64(kind));
        f.push(
            "tags",
            Value::List(tags.iter().map(|t| Value::Str((*t).into())).collect()),
        );
        Record {
            key: Key::mint(),
            mapped_key: true,
            version: 1,
            fields: f,
            expires: None,
            claim: None,
            claims: 0,
        }
    }

    fn matches(store: &Store, filter: &Filter) -> Vec<u64> {
        let mut out = Vec::new();
        store.for_each_match(
            filter,
            &Now::new(&crate::lease::Clock::system()),
            |seq, _| {
                out.push(seq);
                true
            },
        );
        out
    }

    #[test]
    fn indexed_lookups_agree_with_scans_and_keep_order() {
        let mut indexed = Store::default();
        let mut plain = Store::default();
        indexed.ensure_index("kind");
        indexed.ensure_index("tags");
        for i in 0..200 {
            let r = record(i % 5, if i % 3 == 0 { &["a", "b"] } else { &["b"] });
            let seq = indexed.upcoming_seq();
            indexed.skip_to(seq);
            plain.skip_to(seq);
            indexed.insert(seq, r.clone());
            plain.insert(seq, r);
        }
        for seq in (1..200).step_by(7) {
            indexed.remove(seq);
            plain.remove(seq);
        }
        let filters = [
            Filter::eq("kind", 3),
            Filter::eq("kind", 3.0),
            Filter::is_in("kind", [1, 4]),
            Filter::eq("tags", "a").and(Filter::eq("kind", 2)),
            Filter::eq("kind", 9),
            Filter::gt("kind", 2),
        ];
        for f in filters {
            let got = matches(&indexed, &f);
            assert_eq!(got, matches(&plain, &f), "{f}");
            assert!(got.windows(2).all(|w| w[0] < w[1]), "oldest first");
        }
        assert!(indexed.plan(&Filter::eq("kind", 1)).is_some());
        assert!(indexed.plan(&Filter::gt("kind", 1)).is_none());
    }

    #[test]
    fn schema_conflicts_are_reported() {
        let mut s = Store::default();
        s.learn_kinds(&record(1, &[]).fields);
        let mut f = Fields::new();
        f.push("kind", Value::Str("x".into()));
        let c = s.check_kinds(&f).err().unwrap();
        assert_eq!(
            (c.field.as_str(), c.expected, c.found),
            ("kind", ValueKind::Number, ValueKind::String)
        );
        let mut ok = Fields::new();
        ok.push("kind", Value::Null);
        assert!(s.check_kinds(&ok).is_ok());
    }
}
