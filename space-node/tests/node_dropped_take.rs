//! Takes and claims whose callers give up (a `timeout` around the call, as workers do)
//! while a matching write arrives, raced thousands of times against real nodes: every
//! written entry is later taken exactly once. Nothing is lost, nothing is doubled.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{NodeProcess, free_addrs, start_cluster};
use rand::Rng;
use serde::{Deserialize, Serialize};
use space_client::{Lease, Query, Space, connect};

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
