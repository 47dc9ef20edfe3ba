//! A replicated cluster of three real `space-node` processes (`--initial-cluster`): calls
//! are served by shard leaders; when a node is killed (SIGKILL) its shards' leadership
//! moves to the other two and work goes on. The history of every write and take is
//! checked: nothing acknowledged is lost, nothing is taken twice, nothing unexpected
//! appears. The killed node restarts from its data directory alone.

mod common;

use std::time::{Duration, Instant};

use common::{NodeProcess, free_addrs};
use serde::{Deserialize, Serialize};
use space_client::{Query, Space, SpaceError, connect};
use space_tests::TempDir;
use space_tests::history::{Ended, History, Op, check};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Job {
    id: u64,
}
space_client::entry!(Job, "Job");

const SHARDS: &str = "8";

fn start(addr: &str, dir: &TempDir, cluster: &str) -> NodeProcess {
    NodeProcess::start_at(
        addr,
        &[
            "--data-dir",
            &dir.0.to_string_lossy(),
            "--initial-cluster",
            cluster,
            "--shards",
            SHARDS,
        ],
    )
}

/// How a call ended, for the history: a call that never reached a node certainly did
/// nothing; one that may have reached it, perhaps did.
fn ended(e: &SpaceError) -> Ended {
    match e {
        SpaceError::Down { .. }
        | SpaceError::WrongNode { .. }
        | SpaceError::Unavailable { .. }
        | SpaceError::Rejected { .. } => Ended::Failed,
        _ => Ended::Unknown,
    }
}

/// Writes `ids`, retrying refused writes for up to 20 s; records each write's end.
async fn write_all(space: &Space, ids: std::ops::Range<u64>, history: &History) {
    for id in ids {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match space.write(&Job { id }).await {
                Ok(_) => {
                    history.record(Op::Write {
                        id,
                        ended: Ended::Ok,
                    });
                    break;
                }
                Err(e) if ended(&e) == Ended::Failed && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    history.record(Op::Write {
                        id,
                        ended: ended(&e),
                    });
                    break;
                }
            }
        }
    }
}

/// Takes `n` entries (or gives up after 20 s), recording each take's end.
async fn take_some(space: &Space, n: usize, history: &History) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = 0;
    while got < n && Instant::now() < deadline {
        match space
            .take::<Job>(&Query::of::<Job>(), Duration::from_millis(500))
            .await
        {
            Ok(Some(job)) => {
                got += 1;
                history.record(Op::Take {
                    got: Some(job.id),
                    ended: Ended::Ok,
                });
            }
            Ok(None) => {}
            Err(e) => {
                history.record(Op::Take {
                    got: None,
                    ended: ended(&e),
                });
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    got
}

/// What is left in the cluster, read until two reads agree.
async fn left(space: &Space) -> Vec<u64> {
    let mut previous = None;
    for _ in 0..100 {
        if let Ok(jobs) = space.contents::<Job>(&Query::of::<Job>()).await {
            let mut ids: Vec<u64> = jobs.iter().map(|j| j.id).collect();
            ids.sort_unstable();
            if previous.as_ref() == Some(&ids) {
                return ids;
            }
            previous = Some(ids);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the contents never settled");
}

/// The history's verdict once it is clean, or the last one after `patience`.
async fn clean_within(
    space: &Space,
    history: &History,
    patience: Duration,
) -> space_tests::history::Verdict {
    let deadline = Instant::now() + patience;
    loop {
        let verdict = check(&history.ops(), &left(space).await);
        if verdict.is_clean() || Instant::now() >= deadline {
            return verdict;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_loses_nothing_acknowledged_and_comes_back_from_its_directory() {
    let addrs = free_addrs(3);
    let cluster = addrs.join(",");
    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new("replicated")).collect();
    let mut nodes: Vec<Option<NodeProcess>> = addrs
        .iter()
        .zip(&dirs)
        .map(|(a, d)| Some(start(a, d, &cluster)))
        .collect();
    let space = connect(&addrs[0]).await.unwrap();
    let history = History::default();

    write_all(&space, 0..300, &history).await;
    assert_eq!(take_some(&space, 100, &history).await, 100);

    // One node dies; its shards elect leaders among the other two.
    if let Some(node) = nodes[2].take() {
        node.kill();
    }
    write_all(&space, 300..400, &history).await;
    take_some(&space, 100, &history).await;

    // An entry claimed by a take's claim that the failover cut off (its commit or
    // release never happened) is hidden until the claim lapses: it comes back then.
    let verdict = clean_within(&space, &history, Duration::from_secs(40)).await;
    assert!(verdict.is_clean(), "{verdict:?}");
    assert_eq!(
        verdict.acknowledged, 400,
        "writes were refused: {verdict:?}"
    );

    // It comes back from its directory alone and catches up.
    nodes[2] = Some(NodeProcess::start_at(
        &addrs[2],
        &["--data-dir", &dirs[2].0.to_string_lossy()],
    ));
    let verdict = clean_within(&space, &history, Duration::from_secs(40)).await;
    assert!(verdict.is_clean(), "after the restart: {verdict:?}");
}
