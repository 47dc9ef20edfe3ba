//! Fuzzing, on stable Rust, of every decoder that reads untrusted bytes: the frame codec,
//! the handshake, calls as a node (or a subscriber endpoint) decodes them, answers as a
//! client decodes them, documents (postcard and JSON), and the query text syntax.
//!
//! Inputs are random bytes and text, and valid encodings mutated (bytes flipped, inserted,
//! deleted, and runs repeated, which is how nesting grows). Whatever decodes is walked
//! further the way the node would (validated, matched, printed, encoded again). No input
//! may panic, overflow the stack, or make one decode allocate more than a bounded multiple
//! of its size.
//!
//! `SPACE_FUZZ_CASES` sets the cases per decoder (default 2,000, a short run for CI); the
//! long run is `SPACE_FUZZ_CASES=1000000 cargo test --release -p space-tests --test
//! fuzz_decoders`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use space_client::wire::{
    self, Envelope, Hello, Request, RequestId, Response, SpaceServiceRequest, SpaceServiceResponse,
    SubscriberServiceRequest, Target, Welcome,
};
use space_core::{Fields, Filter, Key, Lease, Query, Value};
use tokio_util::codec::Decoder;

// ----- a counting allocator: the most one decode holds at once ---------------------------

struct Counting;

thread_local! {
    static HELD: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = HELD.try_with(|h| {
            let now = h.get() + layout.size();
            h.set(now);
            let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
        });
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = HELD.try_with(|h| h.set(h.get().saturating_sub(layout.size())));
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns the most bytes it held allocated at once on this thread.
fn peak_of(f: impl FnOnce()) -> usize {
    let base = HELD.with(Cell::get);
    PEAK.with(|p| p.set(base));
    f();
    PEAK.with(Cell::get).saturating_sub(base)
}

/// What one decode of `input` may hold at once: a generous multiple of the input, plus
/// room for fixed-size buffers.
fn bound(input: usize) -> usize {
    64 * input + (1 << 20)
}

// ----- inputs ---------------------------------------------------------------------------

fn cases() -> u32 {
    std::env::var("SPACE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

/// An edit of a valid encoding.
#[derive(Clone, Debug)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    /// Repeats `len` bytes at a position `times` times (grows nesting).
    Repeat(usize, usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Delete),
        (any::<usize>(), 1..8usize, 1..2_000usize).prop_map(|(i, l, t)| Edit::Repeat(i, l, t)),
    ]
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = bytes.len().max(1);
        match *e {
            Edit::Flip(i, b) if !bytes.is_empty() => bytes[i % n] ^= b,
            Edit::Insert(i, b) => bytes.insert(i % (bytes.len() + 1), b),
            Edit::Delete(i) if !bytes.is_empty() => {
                bytes.remove(i % n);
            }
            Edit::Repeat(i, len, times) if !bytes.is_empty() => {
                let at = i % n;
                let run: Vec<u8> = bytes[at..(at + len).min(bytes.len())].to_vec();
                let tail = bytes.split_off(at);
                for _ in 0..times {
                    bytes.extend_from_slice(&run);
                }
                bytes.extend_from_slice(&tail);
            }
            _ => {}
        }
    }
    bytes
}

/// Random bytes, or one of `corpus` edited.
fn input(corpus: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let n = corpus.len();
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        (0..n, proptest::collection::vec(edit(), 0..6))
            .prop_map(move |(i, edits)| apply(corpus[i].clone(), &edits)),
    ]
}

fn doc() -> Fields {
    let mut inner = Fields::new();
    inner.push("city", Value::Str("Paris".into()));
    let mut f = Fields::new();
    f.push("id", Value::I64(-7));
    f.push("big", Value::U64(u64::MAX));
    f.push("amount", Value::F64(12.5));
    f.push(
        "tags",
        Value::List(vec![Value::Str("a".into()), Value::Null]),
    );
    f.push(
        "nested",
        Value::List(vec![Value::List(vec![Value::List(vec![Value::Bool(
            true,
        )])])]),
    );
    f.push("address", Value::Map(inner));
    f.push("bytes", Value::Bytes(vec![1, 2, 3]));
    f
}

fn query() -> Query {
    Query::for_type("Job")
        .eq("kind", "x")
        .gt("amount", 2.5)
        .between("n", 1, 9)
        .is_in("s", ["a", "b"])
        .text("body", "quick fox")
        .prefix("name", "Ab")
        .not(Filter::not(Filter::not(Filter::exists("note"))))
        .or(Filter::missing("x"))
}

fn requests() -> Vec<Request> {
    vec![
        Request::WriteDirect {
            entry_type: "Job".into(),
            indexes: vec!["kind".into()],
            entries: vec![(doc(), Some(Key::Name("k".into()))), (doc(), None)],
            lease: Lease::secs(5),
            labels: vec![("zone".into(), "a".into())],
        },
        Request::TakeDirect {
            target: Target::Query(query()),
            max: 3,
            timeout: Duration::from_millis(250),
        },
        Request::ReadDirect {
            target: Target::Key {
                entry_type: "Job".into(),
                key: Key::mint(),
            },
            timeout: Duration::ZERO,
        },
        Request::Claim {
            query: query(),
            lease: Lease::secs(1),
            timeout: Duration::from_secs(1),
        },
        Request::Subscribe {
            query: query(),
            kinds: space_core::EventKinds::ALL,
            lease: Lease::Forever,
            endpoint: Some(wire::Endpoint {
                addr: "127.0.0.1:9".parse().unwrap(),
                secret: 7,
            }),
        },
        Request::Revoke(RequestId::new()),
        Request::Contents {
            query: query(),
            after: Some(3),
            limit: 10,
        },
    ]
}

fn call_bytes(request: Request) -> Vec<u8> {
    wire::encode(&tarpc::ClientMessage::Request(tarpc::Request {
        context: tarpc::context::current(),
        id: 1,
        message: SpaceServiceRequest::Call {
            envelope: Envelope {
                id: RequestId::new(),
                request: Arc::new(request),
                retry: false,
                fresh: false,
                acknowledged: Vec::new(),
                revocable: false,
            },
        },
    }))
}

// ----- walking what decoded, as the node would --------------------------------------------

fn walk_query(q: &Query) {
    if q.validate().is_ok() {
        let text = q.to_string();
        assert!(Query::parse(q.entry_type(), &text).is_ok(), "{text}");
        let _ = q.matches(&doc());
        let _ = space_query::tantivy_form::EntrySchema::new().compile(q);
    }
}

fn walk_fields(f: &Fields) {
    if f.validate().is_ok() {
        let _ = f.approx_size();
        let _ = wire::encode(f);
        let _ = serde_json::to_string(f);
        let _ = query().matches(f);
    }
}

fn walk_request(r: &Request) {
    if r.check().is_err() {
        return;
    }
    match r {
        Request::WriteDirect { entries, .. } => entries.iter().for_each(|(f, _)| walk_fields(f)),
        Request::TakeDirect {
            target: Target::Query(q),
            ..
        }
        | Request::ReadDirect {
            target: Target::Query(q),
            ..
        }
        | Request::Claim { query: q, .. }
        | Request::Count(q)
        | Request::Subscribe { query: q, .. } => walk_query(q),
        _ => {}
    }
    let _ = wire::encode(r);
}

/// Decodes `bytes` as the serving side of `SpaceService` does.
fn decode_call(bytes: &[u8]) {
    let mut codec = wire::ServerCodec::<SpaceServiceRequest, SpaceServiceResponse>::default();
    let decoded =
        tokio_serde::Deserializer::<tarpc::ClientMessage<SpaceServiceRequest>>::deserialize(
            Pin::new(&mut codec),
            &BytesMut::from(bytes),
        );
    if let Ok(tarpc::ClientMessage::Request(r)) = decoded {
        let SpaceServiceRequest::Call { envelope } = r.message;
        walk_request(&envelope.request);
    }
}

/// Checks that decoding `bytes` with `decode` stays within the memory bound.
fn bounded(what: &str, bytes: &[u8], decode: impl FnOnce(&[u8])) {
    let peak = peak_of(|| decode(bytes));
    assert!(
        peak <= bound(bytes.len()),
        "{what}: decoding {} bytes held {peak} bytes at once",
        bytes.len()
    );
}

// ----- the fuzz targets ------------------------------------------------------------------

#[test]
fn fuzz_frames_and_handshakes() {
    let mut corpus = vec![
        wire::encode(&Hello::new(Some("token".into()), 1 << 20)),
        wire::encode(&Welcome::Refused {
            reason: "no".into(),
        }),
    ];
    for r in requests() {
        let body = call_bytes(r);
        let mut framed = (body.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&body);
        corpus.push(framed);
    }
    runner()
        .run(&input(corpus), |bytes| {
            bounded("frames", &bytes, |bytes| {
                let mut codec = tokio_util::codec::LengthDelimitedCodec::builder()
                    .max_frame_length(64 << 10)
                    .new_codec();
                let mut buf = BytesMut::from(bytes);
                while let Ok(Some(frame)) = codec.decode(&mut buf) {
                    let _ = wire::decode::<Hello>(&frame);
                    let _ = wire::decode::<Welcome>(&frame);
                    decode_call(&frame);
                }
            });
            Ok(())
        })
        .unwrap();
}

#[test]
fn fuzz_calls_as_a_node_decodes_them() {
    let corpus: Vec<Vec<u8>> = requests().into_iter().map(call_bytes).collect();
    runner()
        .run(&input(corpus), |bytes| {
            bounded("calls", &bytes, decode_call);
            Ok(())
        })
        .unwrap();
}

#[test]
fn fuzz_answers_and_pushes_as_a_client_decodes_them() {
    let documents = vec![space_core::Document {
        key: Key::mint(),
        version: 3,
        fields: doc(),
    }];
    let answers = [
        Response::Documents(documents.clone()),
        Response::Page {
            documents,
            next: Some(9),
            listed: vec![0, 5],
            of: 64,
        },
        Response::ShardCounts {
            counts: vec![(0, 3), (5, 1)],
            of: 64,
        },
        Response::Stats(space_core::Stats::default()),
    ];
    let mut corpus: Vec<Vec<u8>> = answers
        .into_iter()
        .map(|a| {
            wire::encode(&tarpc::Response {
                request_id: 1,
                message: Ok(SpaceServiceResponse::Call(Ok(a))),
            })
        })
        .collect();
    corpus.push(wire::encode(&tarpc::ClientMessage::Request(
        tarpc::Request {
            context: tarpc::context::current(),
            id: 1,
            message: SubscriberServiceRequest::Deliver {
                node: space_core::NodeId(1),
                shard: Some(5),
                subscription: 2,
                notifications: vec![
                    space_core::Notification::Gap {
                        first_seq: 1,
                        last_seq: 2,
                    },
                    space_core::Notification::Missed { seq: 3 },
                ],
            },
        },
    )));
    runner()
        .run(&input(corpus), |bytes| {
            bounded("answers", &bytes, |bytes| {
                if let Ok(r) = wire::decode::<tarpc::Response<SpaceServiceResponse>>(bytes)
                    && let Ok(SpaceServiceResponse::Call(Ok(Response::Documents(docs)))) = r.message
                {
                    docs.iter().for_each(|d| walk_fields(&d.fields));
                }
                let mut codec = wire::ServerCodec::<SubscriberServiceRequest, ()>::default();
                let _ = tokio_serde::Deserializer::<
                    tarpc::ClientMessage<SubscriberServiceRequest>,
                >::deserialize(Pin::new(&mut codec), &BytesMut::from(bytes));
            });
            Ok(())
        })
        .unwrap();
}

#[test]
fn fuzz_documents_in_postcard_and_json() {
    let corpus = vec![
        wire::encode(&doc()),
        serde_json::to_vec(&doc()).unwrap(),
        br#"{"a":[[[1]]],"b":{"c":{"d":"x"}},"e":1e308,"f":-0.0}"#.to_vec(),
    ];
    runner()
        .run(&input(corpus), |bytes| {
            bounded("documents", &bytes, |bytes| {
                if let Ok(f) = wire::decode::<Fields>(bytes) {
                    walk_fields(&f);
                }
                if let Ok(f) = serde_json::from_slice::<Fields>(bytes) {
                    walk_fields(&f);
                }
            });
            Ok(())
        })
        .unwrap();
}

#[test]
fn fuzz_the_query_text_syntax() {
    let corpus: Vec<Vec<u8>> = [
        query().to_string(),
        "status:ReadyToShip AND amount:>100".into(),
        "(region:eu OR region:us) AND NOT status:Held".into(),
        r#"amount:[10 TO 20] status:(New, Held) name:Ab* body:~"quick fox" exists(note)"#.into(),
        r#"a:"\u{1F600}\"\\" OR b:!=-1e9"#.into(),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect();
    runner()
        .run(&input(corpus), |bytes| {
            let text = String::from_utf8_lossy(&bytes);
            bounded("query text", text.as_bytes(), |t| {
                let text = String::from_utf8_lossy(t);
                if let Ok(q) = Query::parse("Job", &text) {
                    walk_query(&q);
                }
            });
            Ok(())
        })
        .unwrap();
}

/// A document of lists nested to the depth limit, each claiming 4,000 elements (as many
/// as the bytes left could hold, which is all the decoder checks) and holding one list,
/// reserves little while it is decoded and refused: each level reserves room for a few
/// elements, not for its claim. With serde's own reservation for the tagged form's
/// lists (up to 1 MiB a level) these 4,192 bytes held 8 MB; the fuzzer found the same
/// with 1,231 bytes holding 1.1 MB.
#[test]
fn nested_lists_claiming_long_lengths_reserve_little() {
    // One field, "a", whose value is a list holding a list ... (postcard: the tagged
    // form's variant 7, then the length as a varint), then 4,000 nulls.
    let mut bytes = vec![1, 1, b'a'];
    for _ in 0..63 {
        bytes.extend_from_slice(&[7, 0xA0, 0x1F]);
    }
    bytes.extend_from_slice(&[0; 4_000]);
    bounded("nested claims", &bytes, |bytes| {
        assert!(
            wire::decode::<Fields>(bytes).is_err(),
            "the lists never came"
        );
    });
}
