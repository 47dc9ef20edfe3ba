//! Property tests for the query language: the text form round-trips through the builder,
//! and the native matcher agrees with a plain reference evaluation written independently
//! over JSON documents.

use proptest::prelude::*;
use serde_json::{Value as Json, json};
use space_query::{Fields, Filter, Query, Value};

const FIELDS: [&str; 6] = ["a", "b", "s", "tags", "addr.city", "missing_one"];

fn any_path() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(FIELDS.to_vec()).prop_map(str::to_owned),
        "[a-zA-Z_][a-zA-Z0-9_-]{0,6}(\\.[a-zA-Z_][a-zA-Z0-9_]{0,4}){0,2}",
    ]
}

fn small_literal() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-3i64..4).prop_map(Value::I64),
        prop::sample::select(vec![-1.5f64, 0.0, 1.0, 2.5, 3.0]).prop_map(Value::F64),
        prop::sample::select(vec!["x", "y", "red", "Paris", "ab", "abc"])
            .prop_map(|s| Value::Str(s.into())),
        any::<bool>().prop_map(Value::Bool),
    ]
}

fn wide_literal() -> impl Strategy<Value = Value> {
    prop_oneof![
        small_literal(),
        any::<i64>().prop_map(Value::I64),
        (i64::MAX as u64 + 1..=u64::MAX).prop_map(Value::U64),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::F64),
        any::<String>().prop_map(Value::Str),
    ]
}

fn leaf(lit: BoxedStrategy<Value>) -> impl Strategy<Value = Filter> {
    let words = prop_oneof![
        prop::sample::select(vec!["red", "quick fox", "Paris", "x y"]).prop_map(str::to_owned),
        "[a-z]{1,5}( [a-z]{1,5}){0,2}",
    ];
    let prefix = prop_oneof![
        prop::sample::select(vec!["a", "ab", "P", "re"]).prop_map(str::to_owned),
        any::<String>().prop_filter("non-empty", |s| !s.is_empty()),
    ];
    prop_oneof![
        (any_path(), lit.clone()).prop_map(|(f, v)| Filter::Eq(f, v)),
        (any_path(), lit.clone()).prop_map(|(f, v)| Filter::Ne(f, v)),
        (any_path(), lit.clone()).prop_map(|(f, v)| Filter::Lt(f, v)),
        (any_path(), lit.clone()).prop_map(|(f, v)| Filter::Le(f, v)),
        (any_path(), lit.clone()).prop_map(|(f, v)| Filter::Gt(f, v)),
        (any_path(), lit.clone()).prop_map(|(f, v)| Filter::Ge(f, v)),
        (any_path(), -3i64..4, 0i64..4).prop_map(|(f, lo, w)| Filter::between(f, lo, lo + w)),
        (any_path(), prop::collection::vec(lit, 1..4)).prop_map(|(f, vs)| Filter::In(f, vs)),
        any_path().prop_map(Filter::Exists),
        any_path().prop_map(Filter::Missing),
        (any_path(), prefix).prop_map(|(f, p)| Filter::Prefix(f, p)),
        (any_path(), words).prop_map(|(f, w)| Filter::Text(f, w)),
    ]
}

fn filter(lit: BoxedStrategy<Value>) -> impl Strategy<Value = Filter> {
    leaf(lit).prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 2..4).prop_map(Filter::And),
            prop::collection::vec(inner.clone(), 2..4).prop_map(Filter::Or),
            inner.prop_map(|f| Filter::Not(Box::new(f))),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn text_form_round_trips(f in filter(wide_literal().boxed())) {
        let q = Query::new("T", f);
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

fn json_scalar() -> impl Strategy<Value = Json> {
    prop_oneof![
        (-3i64..4).prop_map(|i| json!(i)),
        prop::sample::select(vec![-1.5f64, 0.0, 1.0, 2.5, 3.0]).prop_map(|f| json!(f)),
        prop::sample::select(vec![
            "x",
            "y",
            "red",
            "Paris",
            "abc",
            "ab",
            "the quick fox",
            "Red Fox"
        ])
        .prop_map(|s| json!(s)),
        any::<bool>().prop_map(|b| json!(b)),
        Just(Json::Null),
    ]
}

fn document() -> impl Strategy<Value = Json> {
    (
        prop::option::of(json_scalar()),
        prop::option::of(json_scalar()),
        prop::option::of(json_scalar()),
        prop::option::of(prop::collection::vec(json_scalar(), 0..4)),
        prop::option::of(json_scalar()),
    )
        .prop_map(|(a, b, s, tags, city)| {
            let mut m = serde_json::Map::new();
            for (k, v) in [("a", a), ("b", b), ("s", s)] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            if let Some(t) = tags {
                m.insert("tags".into(), Json::Array(t));
            }
            if let Some(c) = city {
                m.insert("addr".into(), json!({ "city": c }));
            }
            Json::Object(m)
        })
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
