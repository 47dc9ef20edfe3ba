//! A node keeps its promises under hostile and careless use: deep or absurd requests get
//! typed errors (or a closed connection) and never crash it; notify costs one connection
//! per client and is capped; pushes from anyone but the node are refused; one handle
//! serves ten thousand blocked calls; connections, blocked calls and entry types are
//! bounded; stalled frames are cut off; a subscription's lease ends its stream; a call
//! acknowledges a bounded number of answers.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use space_client::wire::{self, Hello, Request, Response, Welcome};
use space_client::{
    ClientConfig, EventKinds, Filter, Lease, Notification, Query, SpaceError, connect,
    connect_blocking, connect_blocking_with, connect_with,
};
use space_tests::hostile::{
    answer_to, call_bytes, churn_entry_types, deep_document_call, deep_query_call,
    far_deadline_call, frame, raw, read_frame,
};
use space_tests::process::{Process, cli_binary, node_binary, start_node};

/// A node started with `args`, and its address.
fn node(args: &[&str]) -> (Process, String) {
    start_node(args).expect("start space-node")
}

/// The `space` command-line tool, up to date.
fn cli() -> std::path::PathBuf {
    cli_binary().expect("build the space CLI")
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Job {
    id: u64,
}
space_client::entry!(Job, "Job");

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Nested {
    id: u64,
    value: serde_json::Value,
}
space_client::entry!(Nested, "Nested");

fn nested_json(depth: usize) -> serde_json::Value {
    let mut v = serde_json::json!(1);
    for _ in 0..depth {
        v = serde_json::json!([v]);
    }
    v
}

// ----- the tests ----------------------------------------------------------------------

#[test]
fn deep_requests_get_typed_errors_and_never_crash_the_node() {
    let (_node, addr) = node(&[]);
    // Hostile frames: a query 10,000 NOTs deep (10 KB), a document 7,000 lists deep.
    for call in [deep_query_call(10_000), deep_document_call(7_000)] {
        assert!(
            answer_to(&addr, &call).is_none(),
            "an undecodable frame closes the connection"
        );
    }
    // Just inside the limit, the same shapes are answered.
    assert_eq!(
        answer_to(&addr, &deep_query_call(40)),
        Some(Ok(Response::Count(0)))
    );
    assert!(matches!(
        answer_to(&addr, &deep_document_call(40)),
        Some(Ok(Response::Receipts(_)))
    ));
    // Through the typed client: a deeply nested JSON value is refused before it is sent.
    let space = connect_blocking(&addr).unwrap();
    let err = space
        .write(&Nested {
            id: 1,
            value: nested_json(1_000),
        })
        .unwrap_err();
    assert!(err.to_string().contains("nested deeper"), "{err}");
    // (1,000 levels: deeper would overflow this test's own stack when it drops the
    // filter it built; the frames above went to 10,000.)
    let mut filter = Filter::eq("id", 1);
    for _ in 0..1_000 {
        filter = Filter::not(filter);
    }
    let err = space.count(&Query::new("Job", filter)).unwrap_err();
    assert!(matches!(err, SpaceError::Query(_)), "{err}");
    // The node is alive and well for everyone.
    space.write(&Job { id: 1 }).unwrap();
    assert_eq!(space.count(&Query::of::<Job>()).unwrap(), 1);
    // The CLI's parser refuses 10,000 nested parentheses with a message, not a crash.
    let text = format!("{}id:1{}", "(".repeat(10_000), ")".repeat(10_000));
    let out = std::process::Command::new(cli())
        .args(["--node", &addr, "count", "Job", &text])
        .output()
        .unwrap();
    // Exit code 2: an error (1 means found nothing).
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("deeper than 64"), "{stderr}");
}

#[test]
fn a_call_acknowledging_too_many_answers_is_refused_and_the_node_serves_on() {
    let (_node, addr) = node(&[]);
    let call = |acknowledged: usize| {
        space_tests::hostile::envelope_bytes(
            wire::Envelope {
                id: wire::RequestId::new(),
                request: std::sync::Arc::new(Request::Count(Query::of::<Job>())),
                retry: false,
                fresh: false,
                acknowledged: (0..acknowledged).map(|_| wire::RequestId::new()).collect(),
                revocable: false,
            },
            Instant::now() + Duration::from_secs(10),
        )
    };
    match answer_to(&addr, &call(wire::MAX_ACKNOWLEDGED + 1)) {
        Some(Err(SpaceError::Protocol { reason })) => {
            assert!(reason.contains("acknowledges 1025 answers"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // At the bound (ids the node never saw: passed over), and after: answered.
    assert_eq!(
        answer_to(&addr, &call(wire::MAX_ACKNOWLEDGED)),
        Some(Ok(Response::Count(0)))
    );
    assert_eq!(answer_to(&addr, &call(0)), Some(Ok(Response::Count(0))));
}

#[test]
fn absurd_values_get_typed_errors_and_no_panics() {
    let (_node, addr) = node(&[]);
    // A deadline a century away: answered, and the connection's task survives.
    assert_eq!(
        answer_to(&addr, &far_deadline_call()),
        Some(Ok(Response::Count(0)))
    );

    // An entry over the frame limit: a typed error at once, before anything is sent.
    let space = connect_blocking(&addr).unwrap();
    let huge = Nested {
        id: 1,
        value: serde_json::Value::String("x".repeat(17 << 20)),
    };
    let start = Instant::now();
    let err = space.write(&huge).unwrap_err();
    assert!(matches!(err, SpaceError::TooLarge { .. }), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "refused at once, not after retries: {:?}",
        start.elapsed()
    );
    space.write(&Job { id: 1 }).unwrap();

    // A take that waits "forever" is served like any other.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let space = connect(&addr).await.unwrap();
        let taken = space
            .take::<Job>(&Query::of::<Job>(), Duration::MAX)
            .await
            .unwrap();
        assert_eq!(taken, Some(Job { id: 1 }));
        let waiter = {
            let space = space.clone();
            tokio::spawn(async move { space.take::<Job>(&Query::of::<Job>(), Duration::MAX).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        space.write(&Job { id: 2 }).await.unwrap();
        assert_eq!(waiter.await.unwrap().unwrap(), Some(Job { id: 2 }));
    });

    // The CLI with an absurd timeout: no panic, the entry comes back.
    space.write(&Job { id: 3 }).unwrap();
    let out = std::process::Command::new(cli())
        .args(["--node", &addr, "take", "Job", "--timeout", "forever"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains('3'));
}

#[test]
fn many_subscriptions_share_one_connection_and_are_capped() {
    let (node_process, addr) = node(&["--max-subscriptions-per-client", "2000"]);
    let space = connect_blocking(&addr).unwrap();
    let q = Query::of::<Job>();
    let subs: Vec<_> = (0..2000)
        .map(|_| space.notify(&q, EventKinds::WRITTEN).unwrap())
        .collect();
    let err = space.notify(&q, EventKinds::WRITTEN).unwrap_err();
    assert!(matches!(err, SpaceError::Busy { .. }), "{err}");
    space.write(&Job { id: 1 }).unwrap();
    for sub in &subs {
        let n = sub.recv_timeout(Duration::from_secs(30)).expect("an event");
        assert_eq!(n.event().map(|e| e.seq), Some(1));
    }
    let fds = node_process.open_files();
    assert!(
        fds < 64,
        "the node pushes to one client over one connection, it has {fds} files open"
    );
    drop(subs);
    let stats = space.stats().unwrap();
    assert!(stats.subscriptions <= 2000);
}

#[test]
fn subscriptions_of_a_client_that_vanished_are_cancelled() {
    let (_node, addr) = node(&["--subscriber-timeout-ms", "500"]);
    {
        let space = connect_blocking(&addr).unwrap();
        let q = Query::of::<Job>();
        for _ in 0..50 {
            // Forever, and let go without cancelling: as a client that crashed.
            space
                .notify_with_lease(&q, EventKinds::ALL, Lease::Forever)
                .unwrap()
                .detach();
        }
        assert_eq!(space.stats().unwrap().subscriptions, 50);
    } // the client's runtime and its endpoint go away
    let space = connect_blocking(&addr).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut id = 0;
    while space.stats().unwrap().subscriptions > 0 {
        assert!(Instant::now() < deadline, "{:?}", space.stats().unwrap());
        space.write(&Job { id }).unwrap();
        id += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn events_held_for_absent_subscribers_are_bounded() {
    let (_node, addr) = node(&[
        "--max-queued-events",
        "20000",
        "--subscriber-timeout-ms",
        "600000",
    ]);
    {
        let space = connect_blocking(&addr).unwrap();
        for _ in 0..1_000 {
            space
                .notify_with_lease(&Query::of::<Job>(), EventKinds::ALL, Lease::Forever)
                .unwrap()
                .detach();
        }
    } // the subscriber goes away; its subscriptions stay until their endpoint times out
    let space = connect_blocking(&addr).unwrap();
    for round in 0..20u64 {
        let jobs: Vec<Job> = (0..100)
            .map(|i| Job {
                id: round * 100 + i,
            })
            .collect();
        space.write_all(&jobs).unwrap();
    }
    // 1,000 subscriptions told of 2,000 writes would hold 2,000,000 events.
    let stats = space.stats().unwrap();
    assert_eq!(stats.subscriptions, 1_000);
    assert!(stats.queued_events <= 21_000, "{stats:?}");
}

#[test]
fn pushes_from_anyone_but_the_nodes_are_refused() {
    let (_node, addr) = node(&[]);
    let endpoint = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let space = connect_blocking_with(
        &addr,
        ClientConfig {
            subscriber_bind: endpoint,
            ..ClientConfig::default()
        },
    )
    .unwrap();
    let sub = space
        .notify(&Query::of::<Job>(), EventKinds::WRITTEN)
        .unwrap();
    // A forger connects to the endpoint, without the secret and with a guessed one.
    for token in [None, Some("0".repeat(32))] {
        let mut s = TcpStream::connect(endpoint).unwrap();
        s.write_all(&frame(&wire::encode(&Hello::new(token, 1 << 20))))
            .unwrap();
        let welcome: Welcome = wire::decode(&read_frame(&mut s).unwrap()).unwrap();
        assert!(
            matches!(welcome, Welcome::Refused { ref reason } if reason.contains("secret")),
            "{welcome:?}"
        );
    }
    // Only the node's real events arrive.
    space.write(&Job { id: 9 }).unwrap();
    let n = sub.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(n.event().map(|e| e.seq), Some(1));
    assert!(sub.try_recv().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_handle_serves_ten_thousand_blocked_calls() {
    let (_node, addr) = node(&[]);
    let space = connect(&addr).await.unwrap();
    const N: u64 = 10_000;
    let takers: Vec<_> = (0..N)
        .map(|_| {
            let space = space.clone();
            tokio::spawn(async move {
                space
                    .take::<Job>(&Query::of::<Job>(), Duration::from_secs(120))
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Ten thousand writes at once queue behind each other on a debug node sharing 2
    // cores with other tests: the writer's handle allows each more than the default 10 s.
    let writer = space_client::connect_with(
        &addr,
        space_client::ClientConfig {
            call_timeout: Duration::from_secs(60),
            ..space_client::ClientConfig::default()
        },
    )
    .await
    .unwrap();
    let writers: Vec<_> = (0..N)
        .map(|id| {
            let space = writer.clone();
            tokio::spawn(async move { space.write(&Job { id }).await })
        })
        .collect();
    for w in writers {
        w.await.unwrap().unwrap();
    }
    let mut got = std::collections::HashSet::new();
    for t in takers {
        let job = t.await.unwrap().unwrap().expect("every take is served");
        assert!(got.insert(job.id), "taken twice: {}", job.id);
    }
    assert_eq!(got.len() as u64, N);
}

#[test]
fn connections_blocked_calls_and_entry_types_are_bounded() {
    let (_node, addr) = node(&[
        "--max-connections",
        "8",
        "--max-waiters",
        "20",
        "--max-entry-types",
        "50",
    ]);
    let space = connect_blocking(&addr).unwrap();
    // Blocked calls past the cap: Busy, and the others keep waiting.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let blocked = rt.block_on(async {
        let space = connect(&addr).await.unwrap();
        let calls: Vec<_> = (0..20)
            .map(|_| {
                let space = space.clone();
                tokio::spawn(async move {
                    space
                        .take::<Job>(&Query::of::<Job>(), Duration::from_secs(60))
                        .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let err = space
            .take::<Job>(&Query::of::<Job>(), Duration::from_secs(60))
            .await
            .unwrap_err();
        assert!(matches!(err, SpaceError::Busy { .. }), "{err}");
        calls
    });
    assert_eq!(space.stats().unwrap().waiters, 20);
    for id in 0..20 {
        space.write(&Job { id }).unwrap();
    }
    rt.block_on(async {
        for c in blocked {
            assert!(c.await.unwrap().unwrap().is_some());
        }
    });

    // Entry types: emptied ones are forgotten; the ones holding entries are capped.
    rt.block_on(async {
        let cluster = space_client::Cluster::open(&[&addr], ClientConfig::default())
            .await
            .unwrap();
        churn_entry_types(&cluster, "T", 500).await.unwrap();
    });
    assert!(space.stats().unwrap().entry_types <= 50);

    // Connections past the cap are refused with Busy; the open ones keep working.
    let mut open = Vec::new();
    let err = loop {
        match raw(&addr) {
            Ok(s) => open.push(s),
            Err(welcome) => break welcome,
        }
        assert!(open.len() < 100, "the cap holds");
    };
    assert!(matches!(err, Welcome::Busy { .. }), "{err:?}");
    space.write(&Job { id: 100 }).unwrap();
}

#[test]
fn stalled_and_trickled_frames_are_cut_off() {
    let (_node, addr) = node(&["--frame-timeout-ms", "300"]);
    // Part of a frame, then nothing.
    let mut s = raw(&addr).expect("accepted");
    s.write_all(&[0, 0, 0, 100, 1, 2, 3]).unwrap();
    let start = Instant::now();
    assert!(read_frame(&mut s).is_none(), "closed, not answered");
    assert!(start.elapsed() < Duration::from_secs(5));
    // A frame a byte at a time.
    let mut s = raw(&addr).expect("accepted");
    s.write_all(&[0, 0, 0, 100]).unwrap();
    let mut cut = false;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(50));
        if s.write_all(&[1]).is_err() {
            cut = true;
            break;
        }
    }
    assert!(
        cut || read_frame(&mut s).is_none(),
        "the trickle was cut off"
    );
    // An idle connection between frames is fine.
    let mut s = raw(&addr).expect("accepted");
    std::thread::sleep(Duration::from_millis(800));
    let call = call_bytes(
        Request::Count(Query::of::<Job>()),
        Instant::now() + Duration::from_secs(10),
    );
    s.write_all(&frame(&call)).unwrap();
    assert!(read_frame(&mut s).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_subscription_ends_with_its_lease_after_its_events() {
    let (_node, addr) = node(&[]);
    let space = connect_with(&addr, ClientConfig::default()).await.unwrap();
    let sub = space
        .notify_with_lease(&Query::of::<Job>(), EventKinds::WRITTEN, Lease::millis(500))
        .await
        .unwrap();
    for id in 0..3 {
        space.write(&Job { id }).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut seqs = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(n) = sub.recv_async().await {
            if let Notification::Event(e) = n {
                seqs.push(e.seq);
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream ends");
    assert_eq!(seqs, vec![1, 2, 3]);
    assert!(sub.is_closed());
}

#[test]
fn the_help_never_shows_the_token() {
    let out = std::process::Command::new(node_binary().unwrap())
        .arg("--help")
        .env("SPACE_AUTH_TOKEN", "hunter2-secret")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--auth-token"));
    assert!(!help.contains("hunter2-secret"), "{help}");
}
