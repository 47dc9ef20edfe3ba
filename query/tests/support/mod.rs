//! Strategies shared by the query property tests: random filters and random documents.
#![allow(dead_code)]

use proptest::prelude::*;
use serde_json::{Value as Json, json};
use space_query::{Filter, Value};

const FIELDS: [&str; 6] = ["a", "b", "s", "tags", "addr.city", "missing_one"];

pub fn any_path() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(FIELDS.to_vec()).prop_map(str::to_owned),
        "[a-zA-Z_][a-zA-Z0-9_-]{0,6}(\\.[a-zA-Z_][a-zA-Z0-9_]{0,4}){0,2}",
    ]
}

pub fn small_literal() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-3i64..4).prop_map(Value::I64),
        prop::sample::select(vec![-1.5f64, 0.0, 1.0, 2.5, 3.0]).prop_map(Value::F64),
        prop::sample::select(vec!["x", "y", "red", "Paris", "ab", "abc"])
            .prop_map(|s| Value::Str(s.into())),
        any::<bool>().prop_map(Value::Bool),
    ]
}

pub fn wide_literal() -> impl Strategy<Value = Value> {
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

pub fn leaf(lit: BoxedStrategy<Value>) -> impl Strategy<Value = Filter> {
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

pub fn filter(lit: BoxedStrategy<Value>) -> impl Strategy<Value = Filter> {
    leaf(lit).prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 2..4).prop_map(Filter::And),
            prop::collection::vec(inner.clone(), 2..4).prop_map(Filter::Or),
            inner.prop_map(|f| Filter::Not(Box::new(f))),
        ]
    })
}

pub fn json_scalar() -> impl Strategy<Value = Json> {
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

pub fn document() -> impl Strategy<Value = Json> {
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
