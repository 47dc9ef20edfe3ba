//! Takes and claims whose callers give up (a `timeout` around the call, as workers do)
//! while a matching write arrives, raced thousands of times against real nodes: every
//! written entry is later taken exactly once. Nothing is lost, nothing is doubled.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use std::io::Write;

use std::sync::Arc;

use common::{NodeProcess, count_on, direct, free_addrs, start_cluster, until, write_on};
use rand::Rng;
use serde::{Deserialize, Serialize};
use space_client::wire::Target;
use space_client::wire::{Envelope, Request, RequestId, Response};
use space_client::{Lease, Query, Space, connect};
use space_tests::TempDir;
use space_tests::hostile;
use space_tests::proxy::{Link, Proxy};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Job {
    id: u64,
}
space_client::entry!(Job, "Job");

/// What the races saw: ids handed to takers, and how many calls were given up.
#[derive(Default)]
struct Tally {
    taken: Vec<u64>,
    given_up: usize,
}

/// `rounds` rounds of `parallel` races each: a blocking take (or claim, committed at once)
/// given up after a random few milliseconds, against a write of a fresh entry landing at
/// about the same time.
async fn race(space: &Space, rounds: u64, parallel: u64, claims: bool) -> Tally {
    let mut tally = Tally::default();
    for round in 0..rounds {
        let mut tasks = Vec::new();
        for i in 0..parallel {
            let id = round * parallel + i;
            let (give_up, write_after) = {
                let mut rng = rand::rng();
                (rng.random_range(1..6u64), rng.random_range(0..6u64))
            };
            let taker = space.clone();
            tasks.push(tokio::spawn(async move {
                let q = Query::of::<Job>();
                let wait = Duration::from_secs(30);
                let give_up = Duration::from_millis(give_up);
                if claims {
                    // The claim is given up; one that arrives is committed outside the race.
                    let claimed = tokio::time::timeout(
                        give_up,
                        taker.claim::<Job>(&q, Lease::secs(600), wait),
                    )
                    .await;
                    match claimed {
                        Ok(Ok(Some(c))) => {
                            taker.commit(&c).await.unwrap();
                            Ok(Ok(Some(c.entry)))
                        }
                        Ok(Ok(None)) => Ok(Ok(None)),
                        Ok(Err(e)) => Ok(Err(e)),
                        Err(elapsed) => Err(elapsed),
                    }
                } else {
                    tokio::time::timeout(give_up, taker.take::<Job>(&q, wait)).await
                }
            }));
            let writer = space.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(write_after)).await;
                writer.write(&Job { id }).await.unwrap();
                Ok(Ok(None))
            }));
        }
        for t in tasks {
            match t.await.unwrap() {
                Ok(Ok(Some(job))) => tally.taken.push(job.id),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => panic!("a call failed: {e}"),
                Err(_elapsed) => tally.given_up += 1,
            }
        }
    }
    tally
}

/// Takes everything left, waiting until `expected` entries are accounted for (revokes of
/// given-up calls run in the background) or a generous deadline passes.
async fn drain(space: &Space, mut taken: Vec<u64>, expected: usize) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while taken.len() < expected && Instant::now() < deadline {
        let more: Vec<Job> = space
            .take_all(&Query::of::<Job>(), 10_000, Duration::from_millis(200))
            .await
            .unwrap();
        taken.extend(more.into_iter().map(|j| j.id));
    }
    // Anything more than expected shows up here too.
    let extra: Vec<Job> = space
        .take_all(&Query::of::<Job>(), 10_000, Duration::from_millis(500))
        .await
        .unwrap();
    taken.extend(extra.into_iter().map(|j| j.id));
    taken
}

fn check(written: u64, taken: &[u64], given_up: usize) {
    let mut times: HashMap<u64, usize> = HashMap::new();
    for id in taken {
        *times.entry(*id).or_default() += 1;
    }
    let lost = (0..written).filter(|id| !times.contains_key(id)).count();
    let duplicated = times.values().filter(|&&n| n > 1).count();
    let unexpected = times.keys().filter(|&&id| id >= written).count();
    eprintln!(
        "written {written}, calls given up {given_up}: lost {lost}, duplicated {duplicated}, unexpected {unexpected}"
    );
    assert!(
        given_up > written as usize / 10,
        "the races must give up calls often"
    );
    assert_eq!((lost, duplicated, unexpected), (0, 0, 0));
}

async fn dropped_calls_lose_nothing(addr: &str, rounds: u64, claims: bool) {
    let space = connect(addr).await.unwrap();
    let parallel = 50;
    let tally = race(&space, rounds, parallel, claims).await;
    let written = rounds * parallel;
    let taken = drain(&space, tally.taken, written as usize).await;
    check(written, &taken, tally.given_up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_takes_on_one_node_lose_nothing() {
    let node = NodeProcess::start(&[]);
    dropped_calls_lose_nothing(&node.addr, 60, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_claims_on_one_node_lose_nothing() {
    let node = NodeProcess::start(&[]);
    dropped_calls_lose_nothing(&node.addr, 30, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_takes_on_three_nodes_lose_nothing() {
    let addrs = free_addrs(3);
    let _nodes = start_cluster(&addrs, &[]);
    dropped_calls_lose_nothing(&addrs.join(","), 40, false).await;
}

/// A durable node whose every fsync takes a second longer (a take's answer waits that
/// long for its record), advertising `advertise` if given; and its directory.
fn slow_durable_node(addr: &str, advertise: Option<&str>) -> (NodeProcess, TempDir) {
    let dir = TempDir::new("slow-take");
    let data_dir = dir.0.to_string_lossy().into_owned();
    let mut args = vec!["--data-dir", &data_dir, "--fault-sync-delay-ms", "1000"];
    if let Some(a) = advertise {
        args.extend(["--advertise", a]);
    }
    (NodeProcess::start_at(addr, &args), dir)
}

/// Sends `request` (which takes or claims the one `Job` on the slow durable node at
/// `addr`) from a raw client that then vanishes (its process killed: no revoke sent)
/// while the node makes the change durable: the node never sends the answer, and gives
/// the entry back rather than keeping it for a retry that will not come (or, claimed,
/// hidden for its lease).
fn vanish_after(addr: &str, request: Request) {
    write_on(addr, "Job", 1);
    let mut client = hostile::raw(addr).expect("a connection");
    let call = hostile::call_bytes(request, Instant::now() + Duration::from_secs(30));
    client
        .write_all(&hostile::frame(&call))
        .expect("send the call");
    assert!(
        until(Duration::from_secs(5), || count_on(addr, "Job") == 0),
        "the call never took the entry"
    );
    // It waits for its record's fsync; its client goes away without a word.
    drop(client);
    assert!(
        until(Duration::from_secs(10), || count_on(addr, "Job") == 1),
        "the entry went to the answer of a client that is gone"
    );
}

#[test]
fn a_take_whose_client_vanishes_before_its_answer_gives_its_entry_back() {
    let (node, _dir) = slow_durable_node(&free_addrs(1).remove(0), None);
    let take = Request::TakeDirect {
        target: Target::Query(Query::for_type("Job")),
        max: 1,
        timeout: Duration::ZERO,
    };
    vanish_after(&node.addr, take);
}

#[test]
fn a_claim_whose_client_vanishes_before_its_answer_releases_its_entry() {
    let (node, _dir) = slow_durable_node(&free_addrs(1).remove(0), None);
    let claim = Request::Claim {
        query: Query::for_type("Job"),
        lease: Lease::secs(600),
        timeout: Duration::ZERO,
    };
    vanish_after(&node.addr, claim);
}

/// The commit of a claim whose client vanishes before its answer: given back if the
/// client would have revoked it (the commit of a take across nodes, which claims and then
/// commits what it took), standing if not (a worker's commit once its work is done).
#[test]
fn a_commit_whose_client_vanishes_before_its_answer_stands_unless_it_was_revocable() {
    for (revocable, visible, stored) in [(true, 1, 1), (false, 0, 0)] {
        let (node, _dir) = slow_durable_node(&free_addrs(1).remove(0), None);
        write_on(&node.addr, "Job", 1);
        let claim = Request::Claim {
            query: Query::for_type("Job"),
            lease: Lease::secs(600),
            timeout: Duration::ZERO,
        };
        let Response::Claimed(Some(claimed)) = direct(&node.addr, claim) else {
            panic!("nothing was claimed");
        };
        let commit = hostile::envelope_bytes(
            Envelope {
                id: RequestId::new(),
                request: Arc::new(Request::Commit(claimed.ticket)),
                retry: false,
                fresh: true,
                acknowledged: Vec::new(),
                revocable,
            },
            Instant::now() + Duration::from_secs(30),
        );
        let mut client = hostile::raw(&node.addr).expect("a connection");
        client
            .write_all(&hostile::frame(&commit))
            .expect("send the commit");
        // Decided, and waiting for its record's fsync: its client goes away.
        std::thread::sleep(Duration::from_millis(200));
        drop(client);
        // The fsync, and a give-back's.
        std::thread::sleep(Duration::from_millis(2500));
        let Response::Stats(stats) = direct(&node.addr, Request::Stats) else {
            panic!("no stats");
        };
        assert_eq!(
            (count_on(&node.addr, "Job"), stats.entries),
            (visible, stored),
            "revocable {revocable}: (visible, stored) entries"
        );
    }
}

/// A take whose connection breaks while the node makes it durable is given up by the
/// node, which cannot tell a client that died from one whose connection broke. The
/// client, alive, sends the take again, learns that the node gave it up, and takes
/// afresh: its caller gets the entry, taken once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_whose_connection_breaks_before_its_answer_takes_afresh() {
    takes_afresh_through_a_cut(|proxy| async move {
        let space = connect(&proxy).await?;
        Ok(space
            .take::<Job>(&Query::of::<Job>(), Duration::from_secs(30))
            .await?
            .map(|job| job.id))
    })
    .await;
}

/// As [`a_take_whose_connection_breaks_before_its_answer_takes_afresh`], through the
/// plain [`Connection::call`](space_client::Connection::call), which has no revokes of
/// its own: it too takes afresh rather than fail `Revoked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_call_whose_connection_breaks_before_its_answer_takes_afresh() {
    takes_afresh_through_a_cut(|proxy| async move {
        let conn =
            space_client::Connection::open(&proxy, space_client::ClientConfig::default()).await?;
        let request = Request::TakeDirect {
            target: Target::Query(Query::of::<Job>()),
            max: 1,
            timeout: Duration::from_secs(30),
        };
        match conn.call(request).await? {
            Response::Documents(docs) => Ok(docs
                .first()
                .and_then(|d| d.fields.get("id"))
                .and_then(|id| match id {
                    space_client::Value::I64(id) => u64::try_from(*id).ok(),
                    space_client::Value::U64(id) => Some(*id),
                    _ => None,
                })),
            other => anyhow::bail!("a take answered {other:?}"),
        }
    })
    .await;
}

/// Writes one `Job` (id 1) on a slow durable node reached through a proxy, has `take`
/// (given the proxy's address) take it, cuts the proxy's link while the take is made
/// durable and opens it again: the take returns job 1, which is not back in the space.
async fn takes_afresh_through_a_cut<F>(take: impl FnOnce(String) -> F + Send + 'static)
where
    F: Future<Output = anyhow::Result<Option<u64>>> + Send + 'static,
{
    let addr = free_addrs(1).remove(0);
    // The client reaches the node through a proxy (which the node advertises); the test
    // asks the node directly.
    let proxy = Proxy::start(addr.parse().unwrap()).await.unwrap();
    let (_node, _dir) = slow_durable_node(&addr, Some(&proxy.addr().to_string()));
    let space = connect(&proxy.addr().to_string()).await.unwrap();
    space.write(&Job { id: 1 }).await.unwrap();
    let taker = tokio::spawn(take(proxy.addr().to_string()));
    let on_node = |check: fn(&str) -> bool| {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || until(Duration::from_secs(10), || check(&addr)))
    };
    assert!(
        on_node(|a| count_on(a, "Job") == 0).await.unwrap(),
        "the take never removed the entry"
    );
    // The take waits for its record's fsync; its connection breaks, and comes back.
    proxy.set(Link::Cut);
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.set(Link::Open);
    let taken = taker.await.unwrap();
    assert_eq!(taken.map_err(|e| e.to_string()), Ok(Some(1)));
    // Given back and taken again: not back in the space as well.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        on_node(|a| count_on(a, "Job") == 0).await.unwrap(),
        "the entry taken is in the space as well"
    );
}
