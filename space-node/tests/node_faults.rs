//! Faults and bad input against the real node: a client that vanishes mid-claim, a take
//! whose reply is lost, and junk on the wire. Junk gets a clean error or a closed
//! connection within 100 ms, the node's memory does not grow, and other clients see no
//! errors.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::NodeProcess;
use rand::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};
use space_client::wire::{Hello, Request, RequestId, Response, Target, Welcome};
use space_client::{
    ClientConfig, Connection, Lease, Query, SpaceError, connect_blocking, connect_blocking_with,
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Job {
    id: u64,
    note: String,
}
space_client::entry!(Job, "Job");

fn job(id: u64) -> Job {
    Job {
        id,
        note: "n".into(),
    }
}

#[test]
fn the_claim_of_a_client_that_vanished_comes_back_after_its_lease() {
    let node = NodeProcess::start(&[]);
    {
        let space = connect_blocking(&node.addr).unwrap();
        space.write(&job(1)).unwrap();
        let claim = space
            .claim::<Job>(&Query::of::<Job>(), Lease::millis(300), Duration::ZERO)
            .unwrap();
        assert!(claim.is_some());
        // The client goes away mid-claim: no commit, no release.
    }
    let other = connect_blocking(&node.addr).unwrap();
    assert_eq!(
        other.read_if_exists::<Job>(&Query::of::<Job>()).unwrap(),
        None,
        "hidden while claimed"
    );
    let start = Instant::now();
    let back = other
        .take::<Job>(&Query::of::<Job>(), Duration::from_secs(10))
        .unwrap();
    assert_eq!(back, Some(job(1)));
    assert!(start.elapsed() < Duration::from_secs(5));
}

/// The same entry type as `Job`, with a field of another kind: its entries do not decode.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct StrictJob {
    id: String,
}
space_client::entry!(StrictJob, "Job");

#[test]
fn a_claimed_entry_that_does_not_decode_is_released_at_once() {
    let node = NodeProcess::start(&[]);
    let space = connect_blocking(&node.addr).unwrap();
    space.write(&job(1)).unwrap();
    let err = space
        .claim::<StrictJob>(&Query::of::<StrictJob>(), Lease::secs(600), Duration::ZERO)
        .unwrap_err();
    assert!(matches!(err, SpaceError::Document { .. }), "{err}");
    // Given back at once, not when the claim's lease runs out.
    let claim = space
        .claim::<Job>(
            &Query::of::<Job>(),
            Lease::secs(60),
            Duration::from_secs(10),
        )
        .unwrap()
        .expect("the entry is there again");
    assert_eq!(claim.entry, job(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_retried_after_a_lost_reply_gets_the_same_entry() {
    let node = NodeProcess::start(&[]);
    let conn = Connection::open(&node.addr, ClientConfig::default())
        .await
        .unwrap();
    let space = space_client::connect(&node.addr).await.unwrap();
    space.write_all(&[job(1), job(2)]).await.unwrap();
    let take = || Request::TakeDirect {
        target: Target::Query(Query::of::<Job>()),
        max: 1,
        timeout: Duration::ZERO,
    };
    let id = RequestId::new();
    let first = conn.call_with_id(id, take()).await.unwrap();
    // The reply is "lost": the client sends the same request again.
    let again = conn.call_with_id(id, take()).await.unwrap();
    assert_eq!(first, again);
    let Response::Documents(docs) = &first else {
        panic!("{first:?}")
    };
    assert_eq!(docs.len(), 1);
    // Nothing was lost: the other entry is still there, the first is gone.
    assert_eq!(space.count(&Query::of::<Job>()).await.unwrap(), 1);

    // A blocking take and its retry, both in flight, share one answer.
    let id = RequestId::new();
    let wait = || Request::TakeDirect {
        target: Target::Query(Query::of::<Job>().eq("id", 7)),
        max: 1,
        timeout: Duration::from_secs(10),
    };
    let (c1, c2) = (conn.clone(), conn.clone());
    let a = tokio::spawn(async move { c1.call_with_id(id, wait()).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let b = tokio::spawn(async move { c2.call_with_id(id, wait()).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    space.write(&job(7)).await.unwrap();
    let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
    assert_eq!(a, b);
    assert_eq!(
        space.count(&Query::of::<Job>()).await.unwrap(),
        1,
        "the retry took nothing more"
    );
}

/// Reads from `s` until the node closes it or answers a frame; returns how long it took.
fn until_closed_or_answered(s: &mut TcpStream) -> (Duration, Vec<u8>) {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return (start.elapsed(), got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

fn hello(token: Option<&str>) -> Vec<u8> {
    frame(&postcard_bytes(&Hello::new(
        token.map(str::to_owned),
        1 << 20,
    )))
}

fn postcard_bytes<T: Serialize>(v: &T) -> Vec<u8> {
    // The wire's own codec, through the client crate's wire module.
    space_client::wire::encode(v)
}

fn junk_rounds(addr: &str, rng: &mut rand::rngs::StdRng) -> Vec<(&'static str, Duration)> {
    let mut out = Vec::new();
    let mut send = |name: &'static str, bytes: Vec<u8>| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.write_all(&bytes).unwrap();
        let (took, _) = until_closed_or_answered(&mut s);
        out.push((name, took));
    };
    let mut random = vec![0u8; 256];
    rng.fill_bytes(&mut random);
    random[0] |= 0x80; // an honest junk stream: its "length" is not a small frame
    send("random bytes", random);
    send("length prefix 2^31", vec![0x80, 0, 0, 0, 1, 2, 3]);
    send(
        "length prefix 2^32-1",
        vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3],
    );
    let mut garbage = vec![0u8; 40];
    rng.fill_bytes(&mut garbage);
    send("a valid frame with a garbage body", frame(&garbage));
    let mut after = hello(None);
    after.extend_from_slice(&(70_000u32).to_be_bytes());
    after.extend_from_slice(&[0u8; 64]);
    send("a frame over the limit after the handshake", after);
    let mut after = hello(None);
    after.extend_from_slice(&frame(&garbage));
    send("a garbage request after the handshake", after);
    out
}

#[test]
fn junk_on_the_wire_is_refused_quickly_without_hurting_anyone() {
    let node = NodeProcess::start(&["--max-frame-bytes", "65536", "--max-entry-bytes", "2048"]);
    // Another client works through all of this and must see no error.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let worker = {
        let (addr, stop, done) = (node.addr.clone(), stop.clone(), done.clone());
        std::thread::spawn(move || -> Result<(), SpaceError> {
            let space = connect_blocking(&addr)?;
            while !stop.load(Ordering::Relaxed) {
                space.write(&job(1))?;
                space.take::<Job>(&Query::of::<Job>(), Duration::from_secs(1))?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    // Warm up, then measure the node's memory around many rounds of junk.
    for _ in 0..20 {
        junk_rounds(&node.addr, &mut rng);
    }
    // Two spans of 200 rounds: memory that junk leaks grows in both, where bounded
    // growth shows in one at most: the allocator committing memory in steps (mimalloc's
    // segments), and what the node keeps as it warms up beside the other client (seen:
    // about 2 MiB a span over the first three spans, then none).
    let mut grown = Vec::new();
    for span in 0..2 {
        let before = node.resident_bytes();
        for round in 0..200 {
            for (name, took) in junk_rounds(&node.addr, &mut rng) {
                assert!(
                    took < Duration::from_millis(100),
                    "span {span}, round {round}: {name} took {took:?}"
                );
            }
        }
        grown.push(node.resident_bytes().saturating_sub(before));
    }
    assert!(
        grown.iter().min().is_some_and(|g| *g < 4 * 1024 * 1024),
        "node memory grew by {grown:?} bytes in each of two spans of 200 rounds of junk"
    );

    // Bad requests on a good connection: typed errors, and the connection stays usable.
    let space = connect_blocking(&node.addr).unwrap();
    let err = space
        .count(&Query::of::<Job>().gt("id", f64::NAN))
        .unwrap_err();
    assert!(matches!(err, SpaceError::Query(_)), "{err}");
    let big = Job {
        id: 1,
        note: "x".repeat(5000),
    };
    let err = space.write(&big).unwrap_err();
    assert!(
        matches!(err, SpaceError::TooLarge { limit: 2048, .. }),
        "{err}"
    );
    assert!(space.write(&job(2)).is_ok());

    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap().unwrap();
    assert!(done.load(Ordering::Relaxed) > 0);
}

#[test]
fn a_wrong_token_is_refused_with_a_clear_error() {
    let node = NodeProcess::start(&["--auth-token", "s3cret"]);
    let start = Instant::now();
    let mut s = TcpStream::connect(&node.addr).unwrap();
    s.write_all(&hello(Some("wrong"))).unwrap();
    let (took, answer) = until_closed_or_answered(&mut s);
    assert!(took < Duration::from_millis(100), "{took:?}");
    let welcome: Welcome = space_client::wire::decode(&answer[4..]).unwrap();
    assert!(
        matches!(welcome, Welcome::Refused { ref reason } if reason.contains("token")),
        "{welcome:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(1));

    let err = connect_blocking(&node.addr).err().unwrap();
    assert!(matches!(err, SpaceError::Rejected { .. }), "{err}");
    let ok = connect_blocking_with(
        &node.addr,
        ClientConfig {
            token: Some("s3cret".into()),
            ..ClientConfig::default()
        },
    );
    assert!(ok.is_ok());
}

#[test]
fn listening_beyond_loopback_requires_a_token() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_space-node"))
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("requires an auth token"), "{stderr}");
}

#[test]
fn sigterm_stops_the_node_cleanly() {
    let node = NodeProcess::start(&[]);
    let space = connect_blocking(&node.addr).unwrap();
    space.write(&job(1)).unwrap();
    assert!(node.terminate(), "space-node exits with success on SIGTERM");
}

#[test]
fn sigterm_right_after_the_address_line_stops_the_node_cleanly() {
    // Tools start a node and stop it as soon as it has said where it listens: from that
    // line on, SIGTERM is a clean stop, never the signal's default (death).
    for _ in 0..10 {
        let node = NodeProcess::start(&[]);
        assert!(
            node.terminate(),
            "space-node exits with success on a SIGTERM sent right after its address line"
        );
    }
}

#[test]
fn a_client_reconnects_after_the_node_restarts() {
    let node = NodeProcess::start(&[]);
    let addr = node.addr.clone();
    let space = connect_blocking(&addr).unwrap();
    space.write(&job(1)).unwrap();
    node.kill();
    // While the node is down (and the client has seen its connection close), a new call
    // fails at once, saying nothing was sent. (A call already on its way when the node
    // died keeps retrying instead, to learn whether it was done.)
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let err = space.write(&job(2)).unwrap_err();
    assert!(matches!(err, SpaceError::Down { .. }), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    // Once it is back, the client finds it by itself.
    let _node = NodeProcess::start_at(&addr, &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match space.write(&job(3)) {
            Ok(_) => break,
            Err(SpaceError::Down { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{e}"),
        }
    }
    // A fresh in-memory node: only the write made after the restart is there.
    assert_eq!(
        space
            .take::<Job>(&Query::of::<Job>(), Duration::ZERO)
            .unwrap(),
        Some(job(3))
    );
}

/// A durable node whose disk fills up refuses the write that does not fit with a typed
/// storage error and stops at once (exit status 1), as a crash would, rather than serve
/// from memory the disk does not hold. Restarted once there is room, it holds every
/// write it acknowledged (and at most the one it refused, which may have reached the
/// disk in part: its outcome is unknown).
#[test]
fn a_node_whose_disk_fills_up_stops_and_comes_back_with_what_it_acknowledged() {
    let dir = space_tests::TempDir::new("full-disk");
    let data_dir = dir.0.to_string_lossy().into_owned();
    let addr = common::free_addrs(1).remove(0);
    let mut node = NodeProcess::start_at(
        &addr,
        &[
            "--data-dir",
            &data_dir,
            "--fault-disk-full-after-bytes",
            "262144",
        ],
    );
    let space = connect_blocking_with(&node.addr, ClientConfig::default()).expect("connect");
    let note = "x".repeat(4096);
    let mut acknowledged = Vec::new();
    let refused = loop {
        let id = acknowledged.len() as u64;
        assert!(id < 1_000, "the disk never filled up");
        match space.write(&Job {
            id,
            note: note.clone(),
        }) {
            Ok(_) => acknowledged.push(id),
            Err(e) => break e,
        }
    };
    // Told the disk is full; or, should the node stop before that answer leaves (it
    // waits a moment for it), unreachable: an unknown outcome either way.
    assert!(
        matches!(&refused, SpaceError::Storage { reason, .. } if reason.contains("no space left"))
            || refused.is_unreachable(),
        "the write that did not fit was not refused as a full disk: {refused}"
    );
    let status = node
        .exited_within(Duration::from_secs(10))
        .expect("the node with a full disk went on running");
    assert_eq!(status.code(), Some(1), "{status}");
    drop(node);
    let node = NodeProcess::start_at(&addr, &["--data-dir", &data_dir]);
    let space = connect_blocking_with(&node.addr, ClientConfig::default()).expect("connect");
    let held: Vec<Job> = space.contents(&Query::of::<Job>()).expect("contents");
    let held: std::collections::BTreeSet<u64> = held.into_iter().map(|j| j.id).collect();
    let lost: Vec<u64> = acknowledged
        .iter()
        .copied()
        .filter(|id| !held.contains(id))
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(
        held.len() <= acknowledged.len() + 1,
        "{} entries held for {} acknowledged writes",
        held.len(),
        acknowledged.len()
    );
    // The restarted node serves as before.
    space
        .write(&job(10_000))
        .expect("a write after the restart");
}
