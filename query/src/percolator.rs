//! The percolator: many stored queries (subscriptions) matched against each written entry.
//!
//! Matching every subscription against every write is hopeless at 100,000 subscriptions,
//! so subscriptions are indexed by what a matching entry must contain, in the style of
//! Lucene's Monitor presearcher. For each subscription the presearcher derives *anchors*:
//! a set of conditions such that every entry the query matches satisfies at least one.
//!
//! - the equalities of a conjunction, together, as one hash key (`status = Ready AND
//!   region = eu` is found by hashing an entry's `(status, region)` values);
//! - otherwise the conjunct expected to be most selective: a word of a text predicate, a
//!   prefix, or a numeric interval (kept in an interval tree per field);
//! - a top-level OR gets the anchors of each of its branches (and an IN, one per value);
//! - a query with no usable anchor (`NOT x`, `exists(f)`, ...) goes to a small catch-all
//!   list that every entry is checked against.
//!
//! An entry looks up its candidates through these indexes, and each candidate is then
//! verified with the native matcher, which covers the whole query language and agrees with
//! the tantivy form (the property tests check all three against each other), so no
//! candidate needs a tantivy index to be verified.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use crate::error::Result;
use crate::query::{Filter, Query};
use crate::value::{Fields, Value};
use crate::words::words;

/// The caller's id for a stored query.
pub type SubscriptionId = u64;

/// What a match cost, for statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MatchStats {
    /// Subscriptions verified with the native matcher.
    pub candidates: usize,
    /// Subscriptions that matched.
    pub matches: usize,
}

impl std::ops::AddAssign for MatchStats {
    fn add_assign(&mut self, other: MatchStats) {
        self.candidates += other.candidates;
        self.matches += other.matches;
    }
}

/// Stored queries, indexed for matching entries against all of them at once.
#[derive(Default)]
pub struct Percolator {
    subs: HashMap<SubscriptionId, Registered, Fixed>,
    types: HashMap<String, TypeIndex, Fixed>,
    /// Reused between matches.
    scratch: Vec<SubscriptionId>,
}

type Fixed = foldhash::fast::FixedState;

struct Registered {
    query: Arc<Query>,
    /// `None`: the catch-all list.
    anchors: Option<Vec<Anchor>>,
}

#[derive(Clone, Debug, PartialEq)]
enum Anchor {
    /// Equalities that must all hold, sorted by path.
    Conj(Vec<(String, Value)>),
    /// Equalities that must all hold, and a numeric interval on another field: the
    /// intervals are kept per equality key, so neither a crowded key nor a wide spread of
    /// intervals makes many candidates.
    ConjInterval {
        eqs: Vec<(String, Value)>,
        path: String,
        low: f64,
        high: f64,
    },
    /// One or two words (sorted) a text field must all contain.
    Words { path: String, words: Vec<String> },
    /// A prefix a string field must start with.
    Prefix { path: String, prefix: String },
    /// A closed numeric interval a field's value must fall in (an envelope of the real
    /// range; the native matcher decides open ends).
    Interval { path: String, low: f64, high: f64 },
}

impl Anchor {
    fn cost(&self) -> u32 {
        match self {
            Anchor::Conj(eqs) => 10 - eqs.len().min(5) as u32,
            Anchor::ConjInterval { .. } => 4,
            Anchor::Words { words, .. } => 13 - words.len() as u32,
            Anchor::Prefix { .. } => 14,
            Anchor::Interval { .. } => 20,
        }
    }
}

fn cost(anchors: &[Anchor]) -> u32 {
    anchors.iter().map(Anchor::cost).sum()
}

/// Values an equality anchor can hash.
fn hashable(v: &Value) -> bool {
    match v {
        Value::Bool(_) | Value::I64(_) | Value::U64(_) | Value::Str(_) => true,
        Value::F64(f) => f.is_finite(),
        _ => false,
    }
}

fn numeric(v: &Value) -> Option<f64> {
    match v {
        Value::I64(i) => Some(*i as f64),
        Value::U64(u) => Some(*u as f64),
        Value::F64(f) if !f.is_nan() => Some(*f),
        _ => None,
    }
}

/// A numeric range leaf as `(path, low, high)` (closed envelope).
fn interval(f: &Filter) -> Option<(&str, f64, f64)> {
    Some(match f {
        Filter::Lt(p, v) | Filter::Le(p, v) => (p, f64::NEG_INFINITY, numeric(v)?),
        Filter::Gt(p, v) | Filter::Ge(p, v) => (p, numeric(v)?, f64::INFINITY),
        Filter::Between(p, a, b) => (p, numeric(a)?, numeric(b)?),
        _ => return None,
    })
}

/// Anchors such that every entry matching `f` satisfies at least one; `None` when there is
/// no such set short of "every entry".
fn anchors(f: &Filter) -> Option<Vec<Anchor>> {
    match f {
        Filter::Eq(p, v) if hashable(v) => Some(vec![Anchor::Conj(vec![(p.clone(), v.clone())])]),
        Filter::In(p, vs) if vs.iter().all(hashable) => Some(
            vs.iter()
                .map(|v| Anchor::Conj(vec![(p.clone(), v.clone())]))
                .collect(),
        ),
        Filter::Text(p, text) => {
            // The two longest words: longer words tend to be rarer, and an entry is looked
            // up under every pair of its words, so a pair anchor is found exactly.
            let mut ws: Vec<String> = words(text).collect();
            ws.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
            ws.dedup();
            ws.truncate(2);
            ws.sort();
            (!ws.is_empty()).then(|| {
                vec![Anchor::Words {
                    path: p.clone(),
                    words: ws,
                }]
            })
        }
        Filter::Prefix(p, prefix) => Some(vec![Anchor::Prefix {
            path: p.clone(),
            prefix: prefix.clone(),
        }]),
        Filter::Lt(..) | Filter::Le(..) | Filter::Gt(..) | Filter::Ge(..) | Filter::Between(..) => {
            interval(f).map(|(path, low, high)| {
                vec![Anchor::Interval {
                    path: path.to_owned(),
                    low,
                    high,
                }]
            })
        }
        Filter::And(parts) => {
            let mut eqs: Vec<(String, Value)> = parts
                .iter()
                .filter_map(|p| match p {
                    Filter::Eq(path, v) if hashable(v) => Some((path.clone(), v.clone())),
                    _ => None,
                })
                .collect();
            // Every range is a necessary condition on its own. Two ranges on one field are
            // not intersected: on a list field each may hold for a different element
            // (`tags:[2 TO 3] AND tags:<1` matches `tags: [0, 2]`).
            let ranges: Vec<(&str, f64, f64)> = parts.iter().filter_map(interval).collect();
            if !eqs.is_empty() {
                eqs.sort_by(|a, b| a.0.cmp(&b.0));
                eqs.dedup_by(|a, b| a.0 == b.0);
                let range = ranges
                    .iter()
                    .find(|(path, ..)| !eqs.iter().any(|(p, _)| p == *path));
                return Some(vec![match range {
                    Some(&(path, low, high)) => Anchor::ConjInterval {
                        eqs,
                        path: path.to_owned(),
                        low,
                        high,
                    },
                    None => Anchor::Conj(eqs),
                }]);
            }
            parts.iter().filter_map(anchors).min_by_key(|a| cost(a))
        }
        Filter::Or(parts) => {
            let mut all = Vec::new();
            for p in parts {
                all.extend(anchors(p)?);
            }
            Some(all)
        }
        _ => None,
    }
}

/// The hasher for equality keys: fixed, so registration and matching agree.
fn key_hasher() -> impl Hasher {
    foldhash::fast::FixedState::with_seed(0x5eed_5eed).build_hasher()
}

/// Hashes a scalar in normalised form: values that compare equal hash equally.
fn hash_value(v: &Value, h: &mut impl Hasher) {
    match v {
        Value::Bool(b) => {
            h.write_u8(1);
            h.write_u8(u8::from(*b));
        }
        Value::I64(i) => {
            h.write_u8(2);
            h.write_i128(i128::from(*i));
        }
        Value::U64(u) => {
            h.write_u8(2);
            h.write_i128(i128::from(*u));
        }
        Value::F64(f) => {
            if f.fract() == 0.0 && f.abs() < 1.0e30 {
                h.write_u8(2);
                h.write_i128(*f as i128);
            } else {
                h.write_u8(3);
                h.write_u64(if *f == 0.0 { 0 } else { f.to_bits() });
            }
        }
        Value::Str(s) => {
            h.write_u8(4);
            h.write(s.as_bytes());
            h.write_u8(0xff);
        }
        _ => h.write_u8(0),
    }
}

fn key_of<'a>(values: impl Iterator<Item = &'a Value>) -> u64 {
    let mut h = key_hasher();
    for v in values {
        hash_value(v, &mut h);
    }
    h.finish()
}

/// Most combinations of multi-valued fields an entry is looked up under, per signature;
/// beyond it the signature's subscriptions are all taken as candidates.
const MAX_COMBINATIONS: usize = 1024;

/// Something kept per equality key.
type Keyed<T> = HashMap<u64, T, Fixed>;

#[derive(Default)]
struct TypeIndex {
    /// Equality conjunctions, by their sorted list of paths.
    conj: HashMap<Vec<String>, Keyed<Vec<SubscriptionId>>, Fixed>,
    /// Equality conjunctions with an interval, by (paths, interval path), then by key.
    conj_intervals: HashMap<(Vec<String>, String), Keyed<IntervalIndex>, Fixed>,
    /// Text words and word pairs, by path.
    words: HashMap<String, WordIndex, Fixed>,
    /// String prefixes, by path.
    prefixes: HashMap<String, PrefixIndex, Fixed>,
    /// Numeric intervals, by path.
    intervals: HashMap<String, IntervalIndex, Fixed>,
    catch_all: Vec<SubscriptionId>,
}

#[derive(Default)]
struct WordIndex {
    /// By the key of one word or of a sorted pair.
    by_key: HashMap<u64, Vec<SubscriptionId>, Fixed>,
    /// How many pair anchors there are (pairs of an entry's words are looked up only then).
    pairs: usize,
}

fn words_key<'a>(words: impl Iterator<Item = &'a str>) -> u64 {
    let mut h = key_hasher();
    for w in words {
        h.write(w.as_bytes());
        h.write_u8(0xff);
    }
    h.finish()
}

/// Most distinct words of an entry whose pairs are enumerated; beyond it every pair
/// anchor of the field is a candidate.
const MAX_PAIRED_WORDS: usize = 128;

#[derive(Default)]
struct PrefixIndex {
    by_prefix: HashMap<String, Vec<SubscriptionId>, Fixed>,
    /// Prefix byte lengths in use, with how many prefixes have each.
    lengths: BTreeMap<usize, usize>,
}

/// Gives memory back once a map is mostly empty, so that a burst of subscriptions does not
/// pin its peak footprint forever.
pub(crate) fn shrink_if_sparse<K: Eq + std::hash::Hash, V, S: BuildHasher>(
    map: &mut HashMap<K, V, S>,
) {
    if map.capacity() > 64 && map.len() * 4 < map.capacity() {
        map.shrink_to_fit();
    }
}

fn remove_id(list: &mut Vec<SubscriptionId>, id: SubscriptionId) {
    if let Some(i) = list.iter().position(|x| *x == id) {
        list.swap_remove(i);
    }
}

impl TypeIndex {
    fn add(&mut self, id: SubscriptionId, anchor: &Anchor) {
        match anchor {
            Anchor::Conj(eqs) => {
                let paths: Vec<String> = eqs.iter().map(|(p, _)| p.clone()).collect();
                let key = key_of(eqs.iter().map(|(_, v)| v));
                self.conj
                    .entry(paths)
                    .or_default()
                    .entry(key)
                    .or_default()
                    .push(id);
            }
            Anchor::ConjInterval {
                eqs,
                path,
                low,
                high,
            } => {
                let paths: Vec<String> = eqs.iter().map(|(p, _)| p.clone()).collect();
                let key = key_of(eqs.iter().map(|(_, v)| v));
                self.conj_intervals
                    .entry((paths, path.clone()))
                    .or_default()
                    .entry(key)
                    .or_default()
                    .add(*low, *high, id);
            }
            Anchor::Words { path, words } => {
                let index = self.words.entry(path.clone()).or_default();
                index
                    .by_key
                    .entry(words_key(words.iter().map(String::as_str)))
                    .or_default()
                    .push(id);
                if words.len() == 2 {
                    index.pairs += 1;
                }
            }
            Anchor::Prefix { path, prefix } => {
                let index = self.prefixes.entry(path.clone()).or_default();
                let list = index.by_prefix.entry(prefix.clone()).or_default();
                if list.is_empty() {
                    *index.lengths.entry(prefix.len()).or_default() += 1;
                }
                list.push(id);
            }
            Anchor::Interval { path, low, high } => {
                self.intervals
                    .entry(path.clone())
                    .or_default()
                    .add(*low, *high, id);
            }
        }
    }

    fn remove(&mut self, id: SubscriptionId, anchor: &Anchor) {
        match anchor {
            Anchor::Conj(eqs) => {
                let paths: Vec<String> = eqs.iter().map(|(p, _)| p.clone()).collect();
                let key = key_of(eqs.iter().map(|(_, v)| v));
                if let Some(sig) = self.conj.get_mut(&paths) {
                    if let Some(list) = sig.get_mut(&key) {
                        remove_id(list, id);
                        if list.is_empty() {
                            sig.remove(&key);
                            shrink_if_sparse(sig);
                        }
                    }
                    if sig.is_empty() {
                        self.conj.remove(&paths);
                    }
                }
            }
            Anchor::ConjInterval { eqs, path, .. } => {
                let sig = (
                    eqs.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
                    path.clone(),
                );
                let key = key_of(eqs.iter().map(|(_, v)| v));
                if let Some(by_key) = self.conj_intervals.get_mut(&sig) {
                    if let Some(index) = by_key.get_mut(&key) {
                        index.remove(id);
                        if index.is_empty() {
                            by_key.remove(&key);
                            shrink_if_sparse(by_key);
                        }
                    }
                    if by_key.is_empty() {
                        self.conj_intervals.remove(&sig);
                    }
                }
            }
            Anchor::Words { path, words } => {
                if let Some(index) = self.words.get_mut(path) {
                    let key = words_key(words.iter().map(String::as_str));
                    if let Some(list) = index.by_key.get_mut(&key) {
                        let before = list.len();
                        remove_id(list, id);
                        if list.len() < before && words.len() == 2 {
                            index.pairs -= 1;
                        }
                        if list.is_empty() {
                            index.by_key.remove(&key);
                            shrink_if_sparse(&mut index.by_key);
                        }
                    }
                    if index.by_key.is_empty() {
                        self.words.remove(path);
                    }
                }
            }
            Anchor::Prefix { path, prefix } => {
                if let Some(index) = self.prefixes.get_mut(path) {
                    if let Some(list) = index.by_prefix.get_mut(prefix) {
                        remove_id(list, id);
                        if list.is_empty() {
                            index.by_prefix.remove(prefix);
                            shrink_if_sparse(&mut index.by_prefix);
                            if let Some(n) = index.lengths.get_mut(&prefix.len()) {
                                *n -= 1;
                                if *n == 0 {
                                    index.lengths.remove(&prefix.len());
                                }
                            }
                        }
                    }
                    if index.by_prefix.is_empty() {
                        self.prefixes.remove(path);
                    }
                }
            }
            Anchor::Interval { path, .. } => {
                if let Some(index) = self.intervals.get_mut(path) {
                    index.remove(id);
                    if index.is_empty() {
                        self.intervals.remove(path);
                    }
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.conj.is_empty()
            && self.conj_intervals.is_empty()
            && self.words.is_empty()
            && self.prefixes.is_empty()
            && self.intervals.is_empty()
            && self.catch_all.is_empty()
    }

    /// Pushes the candidate subscriptions for an entry (with repeats).
    fn candidates(&mut self, fields: &Fields, out: &mut Vec<SubscriptionId>) {
        for (paths, buckets) in &self.conj {
            each_key(fields, paths, |key| match key {
                Some(key) => {
                    if let Some(list) = buckets.get(&key) {
                        out.extend_from_slice(list);
                    }
                }
                None => buckets
                    .values()
                    .for_each(|list| out.extend_from_slice(list)),
            });
        }
        for ((paths, path), by_key) in &mut self.conj_intervals {
            let stab = |index: &mut IntervalIndex, out: &mut Vec<SubscriptionId>| {
                index.refresh();
                fields.any_at(path, &mut |v| {
                    if let Some(x) = numeric(v) {
                        index.stab(x, out);
                    }
                    false
                });
            };
            each_key(fields, paths, |key| match key {
                Some(key) => {
                    if let Some(index) = by_key.get_mut(&key) {
                        stab(index, out);
                    }
                }
                None => by_key.values_mut().for_each(|index| stab(index, out)),
            });
        }
        for (path, index) in &self.words {
            // Text predicates match words from all the field's values together.
            let mut ws: Vec<String> = Vec::new();
            fields.any_at(path, &mut |v| {
                if let Value::Str(s) = v {
                    ws.extend(words(s));
                }
                false
            });
            ws.sort_unstable();
            ws.dedup();
            let mut look = |key: u64| {
                if let Some(list) = index.by_key.get(&key) {
                    out.extend_from_slice(list);
                }
            };
            for w in &ws {
                look(words_key(std::iter::once(w.as_str())));
            }
            if index.pairs > 0 {
                if ws.len() <= MAX_PAIRED_WORDS {
                    for (i, a) in ws.iter().enumerate() {
                        for b in &ws[i + 1..] {
                            look(words_key([a.as_str(), b.as_str()].into_iter()));
                        }
                    }
                } else {
                    index
                        .by_key
                        .values()
                        .for_each(|list| out.extend_from_slice(list));
                }
            }
        }
        for (path, index) in &self.prefixes {
            fields.any_at(path, &mut |v| {
                if let Value::Str(s) = v {
                    for &len in index.lengths.keys() {
                        if len > s.len() {
                            break;
                        }
                        if s.is_char_boundary(len)
                            && let Some(list) = index.by_prefix.get(&s[..len])
                        {
                            out.extend_from_slice(list);
                        }
                    }
                }
                false
            });
        }
        for (path, index) in &mut self.intervals {
            index.refresh();
            fields.any_at(path, &mut |v| {
                if let Some(x) = numeric(v) {
                    index.stab(x, out);
                }
                false
            });
        }
        out.extend_from_slice(&self.catch_all);
    }
}

/// Calls `f` with the equality key of every combination of the entry's values at `paths`
/// (several when fields are multi-valued), or once with `None` when there are too many
/// combinations to enumerate. Calls nothing when a path has no value.
fn each_key(fields: &Fields, paths: &[String], mut f: impl FnMut(Option<u64>)) {
    let mut values: Vec<Vec<&Value>> = Vec::with_capacity(paths.len());
    for p in paths {
        let mut vs = Vec::new();
        fields.any_at(p, &mut |v| {
            if hashable(v) {
                vs.push(v);
            }
            false
        });
        if vs.is_empty() {
            return;
        }
        values.push(vs);
    }
    let combinations = values
        .iter()
        .map(Vec::len)
        .try_fold(1usize, |acc, n| acc.checked_mul(n));
    let Some(n) = combinations.filter(|&n| n <= MAX_COMBINATIONS) else {
        f(None);
        return;
    };
    let mut choice = vec![0usize; values.len()];
    for _ in 0..n {
        f(Some(key_of(
            choice.iter().zip(&values).map(|(&i, vs)| vs[i]),
        )));
        // Next combination (odometer order).
        for (slot, vs) in choice.iter_mut().zip(&values) {
            *slot += 1;
            if *slot < vs.len() {
                break;
            }
            *slot = 0;
        }
    }
}

impl Percolator {
    /// An empty percolator.
    pub fn new() -> Percolator {
        Percolator::default()
    }

    /// Stores `query` under `id` (replacing what `id` had). The query is shared, not
    /// copied: callers usually keep it too.
    ///
    /// # Errors
    /// The validation errors of [`Query::validate`].
    pub fn register(&mut self, id: SubscriptionId, query: impl Into<Arc<Query>>) -> Result<()> {
        let query = query.into();
        query.validate()?;
        self.unregister(id);
        let anchors = anchors(query.filter());
        let index = self.types.entry(query.entry_type().to_owned()).or_default();
        match &anchors {
            Some(list) => list.iter().for_each(|a| index.add(id, a)),
            None => index.catch_all.push(id),
        }
        self.subs.insert(id, Registered { query, anchors });
        Ok(())
    }

    /// Removes the query stored under `id`; returns whether there was one.
    pub fn unregister(&mut self, id: SubscriptionId) -> bool {
        let Some(reg) = self.subs.remove(&id) else {
            return false;
        };
        shrink_if_sparse(&mut self.subs);
        let entry_type = reg.query.entry_type();
        if let Some(index) = self.types.get_mut(entry_type) {
            match &reg.anchors {
                Some(list) => list.iter().for_each(|a| index.remove(id, a)),
                None => remove_id(&mut index.catch_all, id),
            }
            if index.is_empty() {
                self.types.remove(entry_type);
            }
        }
        true
    }

    /// Number of stored queries.
    pub fn len(&self) -> usize {
        self.subs.len()
    }

    /// True when no query is stored.
    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    /// The query stored under `id`.
    pub fn query(&self, id: SubscriptionId) -> Option<&Query> {
        self.subs.get(&id).map(|r| r.query.as_ref())
    }

    /// Appends to `out` the ids of the stored queries that match one entry (each id once,
    /// in ascending order).
    pub fn match_entry(
        &mut self,
        entry_type: &str,
        fields: &Fields,
        out: &mut Vec<SubscriptionId>,
    ) -> MatchStats {
        let Some(index) = self.types.get_mut(entry_type) else {
            return MatchStats::default();
        };
        let mut candidates = std::mem::take(&mut self.scratch);
        candidates.clear();
        index.candidates(fields, &mut candidates);
        candidates.sort_unstable();
        candidates.dedup();
        let mut stats = MatchStats {
            candidates: candidates.len(),
            matches: 0,
        };
        for &id in &candidates {
            if self.subs.get(&id).is_some_and(|r| r.query.matches(fields)) {
                out.push(id);
                stats.matches += 1;
            }
        }
        self.scratch = candidates;
        stats
    }

    /// Matches a batch of entries: `(query id, entry position)` pairs, sorted.
    pub fn match_batch(
        &mut self,
        entries: &[(&str, &Fields)],
    ) -> (Vec<(SubscriptionId, usize)>, MatchStats) {
        let mut pairs = Vec::new();
        let mut stats = MatchStats::default();
        let mut ids = Vec::new();
        for (i, (entry_type, fields)) in entries.iter().enumerate() {
            ids.clear();
            stats += self.match_entry(entry_type, fields, &mut ids);
            pairs.extend(ids.iter().map(|&id| (id, i)));
        }
        pairs.sort_unstable();
        (pairs, stats)
    }
}

/// Numeric intervals of one field, for stabbing queries ("which intervals contain x").
///
/// A centred interval tree answers in O(log n + hits). It is rebuilt lazily: new intervals
/// wait in a short list that is scanned directly, removed ones are skipped until the next
/// rebuild, and a rebuild happens when either has grown to a fraction of the tree.
#[derive(Default)]
struct IntervalIndex {
    items: Vec<(f64, f64, SubscriptionId)>,
    tree: Option<Box<Node>>,
    pending: Vec<(f64, f64, SubscriptionId)>,
    removed: HashSet<SubscriptionId, Fixed>,
}

struct Node {
    center: f64,
    /// Intervals containing `center`, by ascending low end.
    by_low: Vec<u32>,
    /// The same, by descending high end.
    by_high: Vec<u32>,
    left: Option<Box<Node>>,
    right: Option<Box<Node>>,
}

impl IntervalIndex {
    fn add(&mut self, low: f64, high: f64, id: SubscriptionId) {
        self.removed.remove(&id);
        self.pending.push((low, high, id));
    }

    fn remove(&mut self, id: SubscriptionId) {
        self.pending.retain(|(_, _, x)| *x != id);
        if self.items.iter().any(|(_, _, x)| *x == id) {
            self.removed.insert(id);
        }
        if self.removed.len() * 2 > self.items.len() {
            self.rebuild();
        }
    }

    fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.items.len() == self.removed.len()
    }

    fn refresh(&mut self) {
        if self.pending.len() > 32 + self.items.len() / 16
            || self.removed.len() * 4 > self.items.len() + 64
        {
            self.rebuild();
        }
    }

    fn rebuild(&mut self) {
        let removed = std::mem::take(&mut self.removed);
        let mut items: Vec<_> = std::mem::take(&mut self.items)
            .into_iter()
            .filter(|(_, _, id)| !removed.contains(id))
            .collect();
        items.append(&mut self.pending);
        let all: Vec<u32> = (0..items.len() as u32).collect();
        self.tree = build(&items, all);
        self.items = items;
    }

    fn stab(&self, x: f64, out: &mut Vec<SubscriptionId>) {
        let before = out.len();
        let mut node = self.tree.as_deref();
        while let Some(n) = node {
            if x < n.center {
                for &i in &n.by_low {
                    let (low, _, id) = self.items[i as usize];
                    if low > x {
                        break;
                    }
                    out.push(id);
                }
                node = n.left.as_deref();
            } else if x > n.center {
                for &i in &n.by_high {
                    let (_, high, id) = self.items[i as usize];
                    if high < x {
                        break;
                    }
                    out.push(id);
                }
                node = n.right.as_deref();
            } else {
                out.extend(n.by_low.iter().map(|&i| self.items[i as usize].2));
                break;
            }
        }
        if !self.removed.is_empty() {
            let mut i = before;
            while i < out.len() {
                if self.removed.contains(&out[i]) {
                    out.swap_remove(i);
                } else {
                    i += 1;
                }
            }
        }
        out.extend(
            self.pending
                .iter()
                .filter(|(low, high, _)| *low <= x && x <= *high)
                .map(|(_, _, id)| *id),
        );
    }
}

fn build(items: &[(f64, f64, SubscriptionId)], ids: Vec<u32>) -> Option<Box<Node>> {
    if ids.is_empty() {
        return None;
    }
    let mut ends: Vec<f64> = ids
        .iter()
        .flat_map(|&i| [items[i as usize].0, items[i as usize].1])
        .filter(|e| e.is_finite())
        .collect();
    let center = if ends.is_empty() {
        0.0
    } else {
        let mid = ends.len() / 2;
        *ends.select_nth_unstable_by(mid, f64::total_cmp).1
    };
    let (mut left, mut right, mut here) = (Vec::new(), Vec::new(), Vec::new());
    for i in ids {
        let (low, high, _) = items[i as usize];
        if high < center {
            left.push(i);
        } else if low > center {
            right.push(i);
        } else {
            here.push(i);
        }
    }
    let mut by_low = here.clone();
    by_low.sort_by(|a, b| items[*a as usize].0.total_cmp(&items[*b as usize].0));
    let mut by_high = here;
    by_high.sort_by(|a, b| items[*b as usize].1.total_cmp(&items[*a as usize].1));
    Some(Box::new(Node {
        center,
        by_low,
        by_high,
        left: build(items, left),
        right: build(items, right),
    }))
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
    fn anchors_follow_the_shape_of_the_query() {
        let q = Query::for_type("T").eq("b", 1).eq("a", "x").gt("n", 3);
        assert_eq!(
            anchors(q.filter()),
            Some(vec![Anchor::ConjInterval {
                eqs: vec![("a".into(), Value::from("x")), ("b".into(), Value::I64(1))],
                path: "n".into(),
                low: 3.0,
                high: f64::INFINITY,
            }])
        );
        let q = Query::for_type("T")
            .eq("b", 1)
            .eq("a", "x")
            .prefix("n", "z");
        assert_eq!(
            anchors(q.filter()),
            Some(vec![Anchor::Conj(vec![
                ("a".into(), Value::from("x")),
                ("b".into(), Value::I64(1))
            ])])
        );
        // Two ranges on one field anchor on one of them, never on their intersection (on a
        // list field each may hold for a different element).
        let q = Query::for_type("T").gt("n", 3).lt("n", 9);
        let anchored = anchors(q.filter());
        assert!(
            anchored
                == Some(vec![Anchor::Interval {
                    path: "n".into(),
                    low: 3.0,
                    high: f64::INFINITY
                }])
                || anchored
                    == Some(vec![Anchor::Interval {
                        path: "n".into(),
                        low: f64::NEG_INFINITY,
                        high: 9.0
                    }]),
            "{anchored:?}"
        );
        let q = Query::new(
            "T",
            Filter::eq("a", 1).or(Filter::text("body", "quick brownest")),
        );
        assert_eq!(anchors(q.filter()).map(|a| a.len()), Some(2));
        assert_eq!(anchors(Query::for_type("T").exists("a").filter()), None);
        assert_eq!(
            anchors(
                &Filter::eq("a", 1)
                    .or(Filter::exists("b"))
                    .or(Filter::eq("c", 2))
            ),
            None
        );
    }

    #[test]
    fn interval_index_finds_exactly_the_containing_intervals() {
        let mut index = IntervalIndex::default();
        let mut reference = Vec::new();
        let mut x: u64 = 1;
        let mut next = || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            (x >> 40) as f64 / 100.0
        };
        for id in 0..2_000u64 {
            let a = next();
            let w = next() / 50.0;
            let (low, high) = match id % 7 {
                0 => (f64::NEG_INFINITY, a),
                1 => (a, f64::INFINITY),
                _ => (a, a + w),
            };
            index.add(low, high, id);
            reference.push((low, high, id));
            if id % 5 == 0 {
                index.remove(id / 2);
                reference.retain(|(_, _, i)| *i != id / 2);
            }
        }
        for _ in 0..300 {
            index.refresh();
            let x = next();
            let mut got = Vec::new();
            index.stab(x, &mut got);
            got.sort_unstable();
            got.dedup();
            let mut want: Vec<u64> = reference
                .iter()
                .filter(|(l, h, _)| *l <= x && x <= *h)
                .map(|(_, _, i)| *i)
                .collect();
            want.sort_unstable();
            assert_eq!(got, want, "x = {x}");
        }
    }

    #[test]
    fn multi_valued_fields_find_conjunctions_through_any_combination() {
        let mut p = Percolator::new();
        p.register(1, Query::for_type("T").eq("tag", "b").eq("zone", 2))
            .unwrap();
        p.register(2, Query::for_type("T").eq("tag", "z")).unwrap();
        let e = entry(&[
            ("tag", Value::List(vec![Value::from("a"), Value::from("b")])),
            ("zone", Value::List(vec![Value::I64(1), Value::F64(2.0)])),
        ]);
        let mut out = Vec::new();
        let stats = p.match_entry("T", &e, &mut out);
        assert_eq!(out, vec![1]);
        assert_eq!(
            stats,
            MatchStats {
                candidates: 1,
                matches: 1
            }
        );
    }

    #[test]
    fn unregistering_leaves_nothing_behind() {
        let mut p = Percolator::new();
        for id in 0..100u64 {
            let q = match id % 6 {
                5 => Query::for_type("T")
                    .eq("a", 1)
                    .between("n", 1, id as i64 + 1),
                0 => Query::for_type("T").eq("a", id as i64),
                1 => Query::for_type("T").text("body", "fox"),
                2 => Query::for_type("T").prefix("name", "ab"),
                3 => Query::for_type("T").between("n", 1, id as i64 + 1),
                _ => Query::for_type("T").exists("x"),
            };
            p.register(id, q).unwrap();
        }
        for id in 0..100u64 {
            assert!(p.unregister(id));
        }
        assert!(p.is_empty());
        assert!(p.types.is_empty(), "type indexes are dropped when empty");
    }
}
