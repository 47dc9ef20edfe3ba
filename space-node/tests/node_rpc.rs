//! Every RPC of the node, end to end through `space-client`, against the real binary.

mod common;

use std::time::{Duration, Instant};

use common::NodeProcess;
use serde::{Deserialize, Serialize};
use space_client::wire::{Request, Response, Target};
use space_client::{
    Connect, Connection, EventKind, EventKinds, Lease, Notification, Query, Space, SpaceError,
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Job {
    id: u64,
    kind: String,
    #[serde(with = "serde_bytes")]
    blob: Vec<u8>,
}
space_client::entry!(Job, "Job", index = [kind]);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Order {
    number: String,
    amount: f64,
}
space_client::entry!(Order, "Order", key = number);

fn job(id: u64, kind: &str) -> Job {
    Job {
        id,
        kind: kind.into(),
        blob: vec![id as u8; 16],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_works_through_the_client() {
    let node = NodeProcess::start(&[]);
    let space = Space::connect(&node.addr).await.unwrap();
    assert_eq!(space.node().0, 1);

    // write, read, take, duplicates, take_all oldest first
    let r = space.write(&job(1, "a")).await.unwrap();
    assert_eq!(r.node.0, 1);
    space
        .write_all(&[job(2, "b"), job(3, "a"), job(3, "a")])
        .await
        .unwrap();
    let all = Query::of::<Job>();
    assert_eq!(space.count(&all).await.unwrap(), 4);
    assert_eq!(
        space.read::<Job>(&all, Duration::ZERO).await.unwrap(),
        Some(job(1, "a"))
    );
    assert_eq!(
        space.read_key::<Job>(&r.key).await.unwrap(),
        Some(job(1, "a"))
    );
    let a = Query::of::<Job>().eq("kind", "a");
    assert_eq!(
        space.take::<Job>(&a, Duration::ZERO).await.unwrap(),
        Some(job(1, "a"))
    );
    assert_eq!(space.take_key::<Job>(&r.key).await.unwrap(), None);
    assert_eq!(
        space.contents::<Job>(&a).await.unwrap(),
        vec![job(3, "a"), job(3, "a")]
    );
    let got = space
        .take_all::<Job>(&all, 10, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(got, vec![job(2, "b"), job(3, "a"), job(3, "a")]);

    // a blocked take wakes on a write from another client
    let other = Space::connect(&node.addr).await.unwrap();
    let taker = {
        let space = space.clone();
        tokio::spawn(async move {
            space
                .take::<Job>(&Query::of::<Job>(), Duration::from_secs(10))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    other.write(&job(9, "late")).await.unwrap();
    assert_eq!(taker.await.unwrap().unwrap(), Some(job(9, "late")));
    // and a timed-out take returns nothing after its timeout
    let start = Instant::now();
    assert_eq!(
        space
            .take::<Job>(&all, Duration::from_millis(200))
            .await
            .unwrap(),
        None
    );
    assert!(start.elapsed() >= Duration::from_millis(200));

    // claims: commit, release, renew
    space.write(&job(20, "c")).await.unwrap();
    let claim = space
        .claim::<Job>(&all, Lease::secs(30), Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(space.count(&all).await.unwrap(), 0);
    space.renew_claim(&claim, Lease::secs(60)).await.unwrap();
    space.release(&claim).await.unwrap();
    let claim = space
        .claim::<Job>(&all, Lease::secs(30), Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claim.claims, 2, "the node counts the entry's claims");
    space.commit(&claim).await.unwrap();
    assert!(matches!(
        space.commit(&claim).await,
        Err(SpaceError::ClaimLost { .. })
    ));

    // user keys, leases, renew, cancel
    let order = Order {
        number: "o-1".into(),
        amount: 5.0,
    };
    space
        .write_with_lease(&order, Lease::secs(60))
        .await
        .unwrap();
    assert!(matches!(
        space.write(&order).await,
        Err(SpaceError::KeyExists { .. })
    ));
    let key = "o-1".parse().unwrap();
    assert!(
        space
            .renew::<Order>(&key, Lease::secs(120))
            .await
            .unwrap()
            .is_some()
    );
    space.cancel::<Order>(&key).await.unwrap();
    assert_eq!(space.read_key::<Order>(&key).await.unwrap(), None);

    // typed errors come back as the node's variants
    let err = space
        .count(&Query::parse("Order", "amount:>lots").unwrap())
        .await;
    assert!(matches!(err, Err(SpaceError::Query(_)) | Ok(0)), "{err:?}");
    let err = space
        .write_with_lease(&job(1, "x"), Lease::For(Duration::ZERO))
        .await
        .unwrap_err();
    assert!(matches!(err, SpaceError::InvalidLease { .. }));

    // stats, topology, find for, find place for, contents paging
    let conn = Connection::open(&node.addr, Default::default())
        .await
        .unwrap();
    let stats = space.stats().await.unwrap();
    assert_eq!(stats.entries, 0);
    match conn.call(Request::Topology).await.unwrap() {
        Response::Topology(t) => {
            assert_eq!(t.owners.len(), 1024);
            assert!(t.owners.iter().all(|&o| o == 0));
            assert_eq!(t.nodes[0].address, node.addr);
        }
        other => panic!("{other:?}"),
    }
    match conn
        .call(Request::FindFor("k".parse().unwrap()))
        .await
        .unwrap()
    {
        Response::Node(n) => assert_eq!(n.address, node.addr),
        other => panic!("{other:?}"),
    }
    let place = conn
        .call(Request::FindPlaceFor {
            key: None,
            size: 100,
            labels: vec![("zone".into(), "x".into())],
        })
        .await;
    assert!(matches!(place, Err(SpaceError::Full { .. })), "{place:?}");
    for i in 0..2500 {
        space.write(&job(i, "page")).await.unwrap();
    }
    let mut after = None;
    let mut seen = 0;
    loop {
        let Response::Page {
            documents, next, ..
        } = conn
            .call(Request::Contents {
                query: Query::of::<Job>(),
                after,
                limit: 1000,
            })
            .await
            .unwrap()
        else {
            panic!("not a page");
        };
        seen += documents.len();
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(seen, 2500);
    assert_eq!(
        space
            .contents::<Job>(&Query::of::<Job>())
            .await
            .unwrap()
            .len(),
        2500
    );
    let taken = conn
        .call(Request::TakeDirect {
            target: Target::Query(Query::of::<Job>()),
            max: 2500,
            timeout: Duration::ZERO,
        })
        .await
        .unwrap();
    assert!(matches!(taken, Response::Documents(d) if d.len() == 2500));
}

/// A long count does not hold up the other calls of its connection: a status call sent
/// after it is answered while it runs. The node served one connection's requests in turn
/// up to their first wait, and a count never waits; and a worker busy counting neither
/// ran the tasks queued behind it nor polled the sockets. The status (which the client
/// uses to tell a frozen node from a busy one) was answered only after the whole count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_count_does_not_hold_up_its_connections_other_calls() {
    let node = NodeProcess::start(&[]);
    let space = Space::connect(&node.addr).await.unwrap();
    for batch in 0..100u64 {
        let jobs: Vec<Job> = (0..1_000).map(|i| job(batch * 1_000 + i, "bulk")).collect();
        space.write_all(&jobs).await.unwrap();
    }
    let conn = Connection::open(&node.addr, space_client::ClientConfig::default())
        .await
        .unwrap();
    // A filter no index answers, with a thousand values to compare each entry with.
    let query = Query::of::<Job>().is_in("id", 1_000_000..1_001_000u64);
    let count = {
        let conn = conn.clone();
        tokio::spawn(async move { conn.call(Request::Count(query)).await })
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    conn.call(Request::NodeStatus).await.unwrap();
    assert!(
        !count.is_finished(),
        "the status was answered only after the count"
    );
    match count.await.unwrap().unwrap() {
        Response::Count(n) => assert_eq!(n, 0),
        other => panic!("a count answers a count, not {other:?}"),
    }
}

/// Counts sent at once from many connections run one per worker thread of the node, and
/// the rest wait without a thread: a scan runs on a thread of its own (so that it holds up
/// nothing else), and each count waiting for its type's lock held one too, so a flood of
/// counts grew the node by a thread per count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_sent_at_once_run_one_per_worker_thread() {
    const COUNTS: usize = 12;
    let (node, space, before) = one_thread_node_of_30_000_jobs().await;
    let mut counts = Vec::new();
    for _ in 0..COUNTS {
        let conn = Connection::open(&node.addr, space_client::ClientConfig::default())
            .await
            .unwrap();
        // A filter no index answers, with a thousand values to compare each entry with.
        let query = Query::of::<Job>().is_in("id", 1_000_000..1_001_000u64);
        counts.push(tokio::spawn(async move {
            conn.call(Request::Count(query)).await
        }));
    }
    let mut most = before;
    while !counts.iter().all(|c| c.is_finished()) {
        most = most.max(node.threads());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for count in counts {
        match count.await.unwrap().unwrap() {
            Response::Count(n) => assert_eq!(n, 0),
            other => panic!("a count answers a count, not {other:?}"),
        }
    }
    // One scan at a time on its own thread, and a thread of slack for the node's own.
    assert!(
        most <= before + 2,
        "{COUNTS} counts at once grew the node from {before} to {most} threads"
    );
    // The node still serves everything else.
    assert_eq!(space.count(&Query::of::<Job>()).await.unwrap(), 30_000);
}

/// A node of one thread holding 30,000 `Job`s, a client of it, and the node's threads
/// (its runtime's, its blocking pool's) once they are written.
async fn one_thread_node_of_30_000_jobs() -> (NodeProcess, Space, usize) {
    let node = NodeProcess::start(&["--threads", "1"]);
    let space = Space::connect(&node.addr).await.unwrap();
    for batch in 0..30u64 {
        let jobs: Vec<Job> = (0..1_000).map(|i| job(batch * 1_000 + i, "bulk")).collect();
        space.write_all(&jobs).await.unwrap();
    }
    let threads = node.threads();
    assert!(threads > 0, "the node's threads can be read");
    (node, space, threads)
}

/// A count whose caller goes away (its connection closed) while it runs keeps its place
/// until its scan ends: counts sent and given up one after another still run one at a
/// time, rather than leaving a scan running on a thread of its own for each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_given_up_while_they_run_still_run_one_per_worker_thread() {
    use std::io::Write;
    let (node, space, before) = one_thread_node_of_30_000_jobs().await;
    let mut most = before;
    // A filter no index answers, with a thousand values to compare each entry with.
    let count = space_tests::hostile::frame(&space_tests::hostile::call_bytes(
        Request::Count(Query::of::<Job>().is_in("id", 1_000_000..1_001_000u64)),
        Instant::now() + Duration::from_secs(60),
    ));
    for _ in 0..12 {
        let mut caller = space_tests::hostile::raw(&node.addr).expect("a connection");
        caller.write_all(&count).expect("send the count");
        tokio::time::sleep(Duration::from_millis(20)).await;
        most = most.max(node.threads());
        // Its caller goes away while the count runs (or waits its turn).
        drop(caller);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        most = most.max(node.threads());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        most <= before + 2,
        "12 counts given up while they ran grew the node from {before} to {most} threads"
    );
    assert_eq!(space.count(&Query::of::<Job>()).await.unwrap(), 30_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_is_pushed_to_the_client_in_order() {
    let node = NodeProcess::start(&[]);
    let space = Space::connect(&node.addr).await.unwrap();
    let sub = space
        .notify(&Query::of::<Job>().eq("kind", "hot"), EventKinds::ALL)
        .await
        .unwrap();
    let mut keys = Vec::new();
    for i in 0..200 {
        let r = space
            .write(&job(i, if i % 2 == 0 { "hot" } else { "cold" }))
            .await
            .unwrap();
        if i % 2 == 0 {
            keys.push(r.key);
        }
    }
    space
        .take::<Job>(&Query::of::<Job>().eq("kind", "hot"), Duration::ZERO)
        .await
        .unwrap();
    let mut seqs = Vec::new();
    let mut got_keys = Vec::new();
    let mut kinds = Vec::new();
    while seqs.len() < 101 {
        match tokio::time::timeout(Duration::from_secs(10), sub.recv_async())
            .await
            .unwrap()
        {
            Some(Notification::Event(e)) => {
                seqs.push(e.seq);
                kinds.push(e.kind);
                if e.kind == EventKind::Written {
                    got_keys.push(e.key);
                }
                assert_eq!(e.node.0, 1);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seqs, (1..=101).collect::<Vec<_>>());
    assert_eq!(got_keys, keys);
    assert_eq!(kinds.last(), Some(&EventKind::Taken));
    sub.cancel();
    // Nothing more reaches the handle at once; the node drops the subscription right after.
    space.write(&job(1000, "hot")).await.unwrap();
    assert_eq!(sub.try_recv(), None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while space.stats().await.unwrap().subscriptions > 0 {
        assert!(
            Instant::now() < deadline,
            "the node kept a cancelled subscription"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Against a node too, a typo or a literal of the wrong kind fails at once, before any
/// entry of the type was written.
#[tokio::test]
async fn a_typo_or_a_kind_mismatch_fails_at_once_remotely() {
    let node = NodeProcess::start(&[]);
    let space = space_client::connect(&node.addr).await.unwrap();
    let started = Instant::now();
    let err = space
        .take::<Job>(&Query::of::<Job>().eq("knd", "a"), Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SpaceError::Query(space_client::QueryError::UnknownField { field, .. }) if field == "knd"),
        "{err:?}"
    );
    let err = space
        .read::<Job>(
            &Query::of::<Job>().eq("id", "seven"),
            Duration::from_secs(30),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SpaceError::Query(space_client::QueryError::WrongType { field, .. }) if field == "id"),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(30), "no wait");
}

/// A claim from before a node restarted (in memory) commits nothing after it: an entry
/// written again under the same key and claimed by another worker keeps that claim, and
/// the old ticket is told its claim is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_from_before_a_restart_does_not_commit_a_later_claim() {
    claim_across_a_restart(Vec::new).await;
}

/// The same for a durable node started again on a fresh data directory (its old one
/// wiped): its log starts from nothing, its claim tokens do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_from_a_wiped_data_directory_does_not_commit_a_later_claim() {
    let dirs: Vec<space_tests::TempDir> =
        (0..2).map(|_| space_tests::TempDir::new("wiped")).collect();
    let mut fresh = dirs.iter();
    claim_across_a_restart(|| {
        let dir = fresh.next().expect("two starts");
        vec![
            "--data-dir".to_owned(),
            dir.0.to_string_lossy().into_owned(),
        ]
    })
    .await;
}

/// Claims an order on a node started with `args()`, kills it, starts it again with
/// `args()` and claims the order written again there: the first ticket must be told its
/// claim is lost, and the second commits.
async fn claim_across_a_restart(mut args: impl FnMut() -> Vec<String>) {
    let addr = common::free_addrs(1).remove(0);
    let start = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        NodeProcess::start_at(&addr, &args)
    };
    let node = start(args());
    let order = Order {
        number: "o-7".into(),
        amount: 7.0,
    };
    let all = Query::of::<Order>();
    let claim_one = |space: Space| {
        let (order, all) = (order.clone(), all.clone());
        async move {
            space.write(&order).await.unwrap();
            let claim = space
                .claim::<Order>(&all, Lease::secs(30), Duration::ZERO)
                .await
                .unwrap()
                .expect("the order is claimed");
            (space, claim)
        }
    };
    let (old, old_claim) = claim_one(Space::connect(&addr).await.unwrap()).await;
    node.kill();
    let _node = start(args());
    let (new, new_claim) = claim_one(Space::connect(&addr).await.unwrap()).await;
    assert!(
        matches!(
            old.commit(&old_claim).await,
            Err(SpaceError::ClaimLost { .. })
        ),
        "the ticket from before the restart commits the later claim"
    );
    new.commit(&new_claim).await.unwrap();
    assert_eq!(new.count(&all).await.unwrap(), 0);
}
