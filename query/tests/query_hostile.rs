//! Hostile input for documents and queries: nesting far past the limit, in every form it can
//! arrive in (postcard frames, JSON, the text syntax, Rust values, the builder), gets a
//! typed error and never overflows the stack.

use serde::Serialize;
use space_query::{DocumentError, Fields, Filter, MAX_DEPTH, Query, QueryError, Value, to_fields};

/// Postcard's encoding of a length or enum tag below 128: one byte.
fn varint(n: u8) -> u8 {
    assert!(n < 128);
    n
}

/// A query for type "T" whose filter is `depth` nested NOTs around `All`, as postcard bytes
/// (built by hand: building the value itself would need the recursion under test).
fn nested_nots(depth: usize) -> Vec<u8> {
    const NOT: u8 = 15;
    const ALL: u8 = 0;
    let mut bytes = vec![varint(1), b'T'];
    bytes.extend(std::iter::repeat_n(NOT, depth));
    bytes.push(ALL);
    bytes
}

/// Fields `{a: [[[...null...]]]}` with lists nested `depth` deep, as postcard bytes.
fn nested_lists(depth: usize) -> Vec<u8> {
    const LIST: u8 = 7;
    const NULL: u8 = 0;
    let mut bytes = vec![varint(1), varint(1), b'a'];
    for _ in 0..depth {
        bytes.extend([LIST, varint(1)]);
    }
    bytes.push(NULL);
    bytes
}

#[test]
fn deep_queries_in_frames_are_refused() {
    // (postcard reports every custom error as the same generic one)
    assert!(postcard::from_bytes::<Query>(&nested_nots(10_000)).is_err());
    assert!(postcard::from_bytes::<Query>(&nested_nots(MAX_DEPTH + 1)).is_err());
    // Just inside the limit decodes (the NOTs plus the query itself).
    let q: Query = postcard::from_bytes(&nested_nots(MAX_DEPTH - 1)).unwrap();
    assert!(q.validate().is_ok());
}

#[test]
fn deep_documents_in_frames_are_refused() {
    assert!(postcard::from_bytes::<Fields>(&nested_lists(7_000)).is_err());
    assert!(postcard::from_bytes::<Fields>(&nested_lists(MAX_DEPTH)).is_err());
    let ok: Fields = postcard::from_bytes(&nested_lists(MAX_DEPTH - 1)).unwrap();
    assert!(ok.validate().is_ok());
}

#[test]
fn deep_json_is_refused() {
    let depth = 10_000;
    let json = format!("{{\"a\":{}1{}}}", "[".repeat(depth), "]".repeat(depth));
    let err = serde_json::from_str::<Fields>(&json).unwrap_err();
    assert!(err.to_string().contains("deep"), "{err}");
    let json = format!(
        "{{\"a\":{}1{}}}",
        "{\"b\":".repeat(depth),
        "}".repeat(depth)
    );
    assert!(serde_json::from_str::<Fields>(&json).is_err());
}

#[test]
fn deep_query_text_is_a_syntax_error() {
    let depth = 10_000;
    let parens = format!("{}a:1{}", "(".repeat(depth), ")".repeat(depth));
    match Query::parse("T", &parens) {
        Err(QueryError::Syntax { message, .. }) => {
            assert!(message.contains("deeper than 64"), "{message}")
        }
        other => panic!("expected a syntax error, got {other:?}"),
    }
    let nots = format!("{}a:1", "NOT ".repeat(depth));
    assert!(matches!(
        Query::parse("T", &nots),
        Err(QueryError::Syntax { .. })
    ));
    let fine = format!("{}a:1{}", "(".repeat(20), ")".repeat(20));
    assert!(Query::parse("T", &fine).is_ok());
}

#[derive(Serialize)]
struct Chain {
    next: Option<Box<Chain>>,
}

#[derive(Serialize)]
struct Holder {
    chain: Chain,
}

fn chain(depth: usize) -> Chain {
    let mut c = Chain { next: None };
    for _ in 0..depth {
        c = Chain {
            next: Some(Box::new(c)),
        };
    }
    c
}

#[test]
fn deep_rust_values_are_refused_while_they_are_built() {
    let err = to_fields(&Holder {
        chain: chain(2_000),
    })
    .unwrap_err();
    assert_eq!(err, DocumentError::TooDeep { limit: MAX_DEPTH });
    // A chain that fits: each link is a map level below the field.
    assert!(
        to_fields(&Holder {
            chain: chain(MAX_DEPTH - 2)
        })
        .unwrap()
        .validate()
        .is_ok()
    );
}

#[test]
fn deep_built_values_and_filters_fail_validation() {
    let mut v = Value::Null;
    for _ in 0..1_000 {
        v = Value::List(vec![v]);
    }
    let mut f = Fields::new();
    f.push("a", v);
    assert_eq!(
        f.validate(),
        Err(DocumentError::TooDeep { limit: MAX_DEPTH })
    );

    let mut filter = Filter::eq("a", 1);
    for _ in 0..1_000 {
        filter = Filter::not(filter);
    }
    assert_eq!(
        Query::new("T", filter).validate(),
        Err(QueryError::TooDeep { limit: MAX_DEPTH })
    );
}

#[test]
fn unaddressable_names_are_refused() {
    for bad in ["", "a.b", "with space", "tab\t"] {
        let mut f = Fields::new();
        f.push(bad.to_owned(), Value::I64(1));
        assert!(
            matches!(f.validate(), Err(DocumentError::FieldName { .. })),
            "{bad:?}"
        );
    }
    let mut f = Fields::new();
    f.push("ok_name-2", Value::I64(1));
    assert!(f.validate().is_ok());
    assert!(Query::for_type("").validate().is_err());
    assert!(Query::for_type("x".repeat(300)).validate().is_err());
}
