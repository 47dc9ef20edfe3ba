//! A hostile client: raw connections and calls that try to crash, stall or exhaust a
//! node (deep and absurd requests, stalled and trickled frames, oversized frames, junk,
//! floods of blocked calls, subscriptions, entry types and connections), for the tests
//! and for `space-bench -- hostile`, which measure how a well-behaved client fares
//! beside it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use space_client::wire::Value;
use space_client::wire::{
    self, Envelope, Fields, Hello, Request, RequestId, Response, SpaceServiceRequest,
    SpaceServiceResponse, Welcome,
};
use space_client::{EventKinds, Filter, Lease, Query, SpaceError};

/// `body` as a frame: its length (4 bytes, big-endian), then the body.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// Reads one frame's body; `None` when the peer closed the connection (or said nothing
/// for ten seconds) first.
pub fn read_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).ok()?;
    Some(body)
}

/// A connection past the handshake, or the node's answer to the handshake (a refusal).
///
/// # Panics
/// When the node cannot be reached or gives no welcome at all.
pub fn raw(addr: &str) -> Result<TcpStream, Welcome> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s.write_all(&frame(&wire::encode(&Hello::new(None, 16 << 20))))
        .expect("send the hello");
    let welcome: Welcome = wire::decode(&read_frame(&mut s).expect("a welcome")).expect("decode");
    match welcome {
        Welcome::Accepted { .. } => Ok(s),
        other => Err(other),
    }
}

/// The bytes of one call of `request` with the given deadline.
pub fn call_bytes(request: Request, deadline: Instant) -> Vec<u8> {
    envelope_bytes(
        Envelope {
            id: RequestId::new(),
            request: Arc::new(request),
            retry: false,
            fresh: true,
            acknowledged: Vec::new(),
            // As a client that would revoke the call if it gave it up: a take or claim
            // of a client that vanishes gives its entries back.
            revocable: true,
        },
        deadline,
    )
}

/// The bytes of one call of `envelope` (a request with the id and retry mark the caller
/// chose) with the given deadline.
pub fn envelope_bytes(envelope: Envelope, deadline: Instant) -> Vec<u8> {
    let mut context = tarpc::context::current();
    context.deadline = deadline;
    let message = tarpc::ClientMessage::Request(tarpc::Request {
        context,
        id: 1,
        message: SpaceServiceRequest::Call { envelope },
    });
    wire::encode(&message)
}

/// `bytes` with the first occurrence of `pattern` replaced by `with`.
fn splice(bytes: &[u8], pattern: &[u8], with: &[u8]) -> Vec<u8> {
    let at = bytes
        .windows(pattern.len())
        .position(|w| w == pattern)
        .expect("the pattern is in the encoding");
    [&bytes[..at], with, &bytes[at + pattern.len()..]].concat()
}

/// Sends one raw call on a fresh connection and returns the node's answer, or `None` if
/// it closed the connection instead.
pub fn answer_to(addr: &str, call: &[u8]) -> Option<Result<Response, SpaceError>> {
    let mut s = raw(addr).ok()?;
    s.write_all(&frame(call)).ok()?;
    let body = read_frame(&mut s)?;
    let response: tarpc::Response<SpaceServiceResponse> = wire::decode(&body).ok()?;
    match response.message {
        Ok(SpaceServiceResponse::Call(answer)) => Some(answer),
        Err(_) => None,
    }
}

/// A count whose query is `depth` NOTs deep (built by hand: a value that deep could not
/// be built and encoded safely).
pub fn deep_query_call(depth: usize) -> Vec<u8> {
    let three_nots = Filter::not(Filter::not(Filter::not(Filter::All)));
    let bytes = call_bytes(
        Request::Count(Query::new("Job", three_nots)),
        Instant::now() + Duration::from_secs(10),
    );
    let mut deep = vec![15u8; depth];
    deep.push(0);
    splice(&bytes, &[15, 15, 15, 0], &deep)
}

/// A write of an entry of type "Deep" whose field holds lists `depth` deep.
pub fn deep_document_call(depth: usize) -> Vec<u8> {
    let mut fields = Fields::new();
    let three = Value::List(vec![Value::List(vec![Value::List(vec![Value::Null])])]);
    fields.push("a", three);
    let bytes = call_bytes(
        Request::WriteDirect {
            entry_type: "Deep".into(),
            indexes: Vec::new(),
            entries: vec![(fields, None)],
            lease: Lease::Forever,
            labels: Vec::new(),
        },
        Instant::now() + Duration::from_secs(10),
    );
    let mut deep = [7u8, 1].repeat(depth);
    deep.push(0);
    splice(&bytes, &[7, 1, 7, 1, 7, 1, 0], &deep)
}

/// A count with a deadline a century away.
pub fn far_deadline_call() -> Vec<u8> {
    call_bytes(
        Request::Count(Query::for_type("Job")),
        Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600),
    )
}

/// Writes one entry of each of `count` entry types named `prefix` and a number, and takes
/// it again at once: entry types used once and emptied.
///
/// # Errors
/// The first call that fails.
pub async fn churn_entry_types(
    cluster: &Arc<space_client::Cluster>,
    prefix: &str,
    count: u64,
) -> Result<(), SpaceError> {
    for i in 0..count {
        let entry_type = format!("{prefix}{i}");
        let mut f = Fields::new();
        f.push("i", Value::U64(i));
        cluster
            .call(Request::WriteDirect {
                entry_type: entry_type.clone(),
                indexes: Vec::new(),
                entries: vec![(f, None)],
                lease: Lease::Forever,
                labels: Vec::new(),
            })
            .await?;
        cluster
            .call(Request::TakeDirect {
                target: wire::Target::Query(Query::for_type(entry_type)),
                max: 1,
                timeout: Duration::ZERO,
            })
            .await?;
    }
    Ok(())
}

/// The hostile client at work; stops (and waits for its threads) when dropped.
pub struct Attack {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Hostile actions done so far.
    pub actions: Arc<AtomicU64>,
}

impl Drop for Attack {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Starts attacking the node at `addr` from several threads, until the returned handle
/// drops. Leaves room under the node's connection cap for well-behaved clients (it holds
/// at most about 40 connections at once).
pub fn attack(addr: &str) -> Attack {
    let stop = Arc::new(AtomicBool::new(false));
    let actions = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    let mut spawn = |name: &str, f: fn(&str, &AtomicBool)| {
        let (addr, stop, actions) = (addr.to_owned(), stop.clone(), actions.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("hostile-{name}"))
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        f(&addr, &stop);
                        actions.fetch_add(1, Ordering::Relaxed);
                    }
                })
                .expect("spawn"),
        );
    };
    spawn("deep", |addr, _| {
        let _ = answer_to(addr, &deep_query_call(10_000));
        let _ = answer_to(addr, &deep_document_call(7_000));
        let _ = answer_to(addr, &far_deadline_call());
    });
    spawn("frames", |addr, _| {
        // Oversized, junk, and stalled frames.
        if let Ok(mut s) = raw(addr) {
            let _ = s.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
            let _ = read_frame(&mut s);
        }
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.write_all(&[0x80; 64]);
            let _ = read_frame(&mut s);
        }
    });
    spawn("stall", |addr, stop| {
        // Twenty connections that start a frame and stall, then trickle.
        let mut held: Vec<TcpStream> = (0..20)
            .filter_map(|_| raw(addr).ok())
            .filter_map(|mut s| s.write_all(&[0, 0, 1, 0, 9]).ok().map(|()| s))
            .collect();
        for _ in 0..20 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            held.retain_mut(|s| s.write_all(&[1]).is_ok());
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    spawn("floods", |addr, _| {
        // Blocked calls, subscriptions and entry types, as many as the node lets it have.
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            let Ok(space) = space_client::connect(addr).await else {
                return;
            };
            let waits: Vec<_> = (0..2_000)
                .map(|_| {
                    let space = space.clone();
                    tokio::spawn(async move {
                        space
                            .read::<Flood>(&Query::of::<Flood>(), Duration::from_millis(500))
                            .await
                    })
                })
                .collect();
            let mut subs = Vec::new();
            for _ in 0..200 {
                match space.notify(&Query::of::<Flood>(), EventKinds::ALL).await {
                    Ok(s) => subs.push(s),
                    Err(_) => break,
                }
            }
            if let Ok(cluster) = space_client::Cluster::open(&[addr], Default::default()).await {
                let prefix = format!("Churn{}-", rand::random::<u64>());
                let _ = churn_entry_types(&cluster, &prefix, 200).await;
            }
            for w in waits {
                let _ = w.await;
            }
            drop(subs);
        });
    });
    Attack {
        stop,
        threads,
        actions,
    }
}

/// The entry type the floods wait for (nobody writes it).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Flood {
    /// Unused.
    pub n: u64,
}
space_core::entry!(Flood, "Flood");
