//! Property tests for the query language: the text form round-trips through the builder,
//! and the native matcher agrees with a plain reference evaluation written independently
//! over JSON documents.

mod support;

use proptest::prelude::*;
use serde_json::{Value as Json, json};
use space_query::{Fields, Filter, Query, Value};
use support::{document, filter, small_literal, wide_literal};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn text_form_round_trips(f in filter(wide_literal().boxed())) {
        let q = Query::new("T", f);
        prop_assume!(q.validate().is_ok());
        let text = q.to_string();
        let back = Query::parse("T", &text);
        prop_assert_eq!(back.as_ref(), Ok(&q), "text: {}", text);
    }

    #[test]
    fn matcher_agrees_with_reference(f in filter(small_literal().boxed()), doc in document()) {
        let fields: Fields = serde_json::from_value(doc.clone()).unwrap();
        let q = Query::new("T", f.clone());
        prop_assert_eq!(q.matches(&fields), reference(&f, &doc), "query: {} doc: {}", q, doc);
    }
}

// ---- The reference evaluation: deliberately simple, over JSON. ----

/// All non-null scalar values at a dotted path, with lists flattened.
fn values_at<'a>(doc: &'a Json, path: &str) -> Vec<&'a Json> {
    let mut current = vec![doc];
    for segment in path.split('.') {
        let mut next = Vec::new();
        for v in current {
            let mut stack = vec![v];
            while let Some(v) = stack.pop() {
                match v {
                    Json::Array(items) => stack.extend(items.iter()),
                    Json::Object(m) => {
                        if let Some(x) = m.get(segment) {
                            next.push(x);
                        }
                    }
                    _ => {}
                }
            }
        }
        current = next;
    }
    let mut out = Vec::new();
    let mut stack = current;
    while let Some(v) = stack.pop() {
        match v {
            Json::Array(items) => stack.extend(items.iter()),
            Json::Null => {}
            v => out.push(v),
        }
    }
    out
}

fn literal_json(v: &Value) -> Json {
    match v {
        Value::I64(i) => json!(i),
        Value::F64(f) => json!(f),
        Value::Str(s) => json!(s),
        Value::Bool(b) => json!(b),
        other => panic!("unexpected literal {other:?}"),
    }
}

/// Orders two scalars of the same kind; None when kinds differ.
fn order(a: &Json, b: &Json) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Json::String(x), Json::String(y)) => Some(x.as_bytes().cmp(y.as_bytes())),
        (Json::Bool(x), Json::Bool(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

fn tokens(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    for c in s.chars().chain(std::iter::once(' ')) {
        if c.is_alphanumeric() {
            word.extend(c.to_lowercase());
        } else if !word.is_empty() {
            out.push(std::mem::take(&mut word));
        }
    }
    out
}

fn reference(f: &Filter, doc: &Json) -> bool {
    use std::cmp::Ordering::*;
    let cmp = |path: &str, lit: &Value, ok: &dyn Fn(std::cmp::Ordering) -> bool| {
        let lit = literal_json(lit);
        values_at(doc, path)
            .iter()
            .any(|v| order(v, &lit).is_some_and(ok))
    };
    match f {
        Filter::All => true,
        Filter::And(ps) => ps.iter().all(|p| reference(p, doc)),
        Filter::Or(ps) => ps.iter().any(|p| reference(p, doc)),
        Filter::Not(p) => !reference(p, doc),
        Filter::Eq(p, v) => cmp(p, v, &|o| o == Equal),
        Filter::Ne(p, v) => !values_at(doc, p).is_empty() && !cmp(p, v, &|o| o == Equal),
        Filter::Lt(p, v) => cmp(p, v, &|o| o == Less),
        Filter::Le(p, v) => cmp(p, v, &|o| o != Greater),
        Filter::Gt(p, v) => cmp(p, v, &|o| o == Greater),
        Filter::Ge(p, v) => cmp(p, v, &|o| o != Less),
        Filter::Between(p, lo, hi) => {
            let (lo, hi) = (literal_json(lo), literal_json(hi));
            values_at(doc, p).iter().any(|v| {
                order(v, &lo).is_some_and(|o| o != Less)
                    && order(v, &hi).is_some_and(|o| o != Greater)
            })
        }
        Filter::In(p, vs) => vs.iter().any(|v| cmp(p, v, &|o| o == Equal)),
        Filter::Exists(p) => !values_at(doc, p).is_empty(),
        Filter::Missing(p) => values_at(doc, p).is_empty(),
        Filter::Prefix(p, pre) => values_at(doc, p)
            .iter()
            .any(|v| v.as_str().is_some_and(|s| s.starts_with(pre.as_str()))),
        Filter::Text(p, words) => {
            let have: Vec<String> = values_at(doc, p)
                .iter()
                .filter_map(|v| v.as_str())
                .flat_map(tokens)
                .collect();
            let want = tokens(words);
            !want.is_empty() && want.iter().all(|w| have.contains(w))
        }
    }
}
