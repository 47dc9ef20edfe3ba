//! Differential test of notify matching: for random subscriptions and random entries, the
//! percolator's pairs equal the naive result (each subscription's tantivy query run
//! against the entries) and the native matcher's.

mod support;

use proptest::prelude::*;
use space_query::tantivy_form::{EntrySchema, naive_matches};
use space_query::{Fields, Percolator, Query};
use support::{document, filter, small_literal};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn percolator_tantivy_and_native_agree(
        filters in prop::collection::vec(filter(small_literal().boxed()), 1..16),
        docs in prop::collection::vec((document(), any::<bool>()), 1..8),
    ) {
        let queries: Vec<(u64, Query)> = filters
            .into_iter()
            .map(|f| Query::new("T", f))
            .filter(|q| q.validate().is_ok())
            .enumerate()
            .map(|(i, q)| (i as u64, q))
            .collect();
        let entries: Vec<(&str, Fields)> = docs
            .into_iter()
            .map(|(d, other_type)| (if other_type { "U" } else { "T" }, serde_json::from_value(d).unwrap()))
            .collect();
        let entry_refs: Vec<(&str, &Fields)> = entries.iter().map(|(t, f)| (*t, f)).collect();

        let mut percolator = Percolator::new();
        for (id, q) in &queries {
            percolator.register(*id, q.clone()).unwrap();
        }
        let (pairs, _) = percolator.match_batch(&entry_refs);

        let schema = EntrySchema::new();
        let query_refs: Vec<(u64, &Query)> = queries.iter().map(|(id, q)| (*id, q)).collect();
        let naive = naive_matches(&schema, &query_refs, &entry_refs).unwrap();

        let mut native = Vec::new();
        for (id, q) in &queries {
            for (i, (t, f)) in entry_refs.iter().enumerate() {
                if *t == q.entry_type() && q.matches(f) {
                    native.push((*id, i));
                }
            }
        }
        native.sort_unstable();

        let describe = || {
            let qs: Vec<String> = queries.iter().map(|(id, q)| format!("{id}: {q}")).collect();
            let es: Vec<String> = entries.iter().map(|(t, f)| format!("{t} {}", serde_json::to_string(f).unwrap())).collect();
            format!("queries:\n{}\nentries:\n{}", qs.join("\n"), es.join("\n"))
        };
        prop_assert_eq!(&native, &naive, "native vs tantivy\n{}", describe());
        prop_assert_eq!(&pairs, &naive, "percolator vs tantivy\n{}", describe());
    }
}
