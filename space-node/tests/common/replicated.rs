//! Helpers for tests of replicated clusters: entry types, starting nodes, and recording
//! and checking histories of operations.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use space_client::{Query, Space, SpaceError};
use space_tests::TempDir;
use space_tests::history::{Ended, History, Op, Verdict, check};

use super::NodeProcess;

/// A job: an entry without a user key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Unique in a test.
    pub id: u64,
}
space_client::entry!(Job, "Job");

/// A parcel: an entry without a user key, with a body of any size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Parcel {
    /// What makes it large.
    pub body: String,
}
space_client::entry!(Parcel, "Parcel");

/// An order: an entry keyed by its number.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// Its key.
    pub number: String,
}
space_client::entry!(Order, "Order", key = number);

/// An entry with a body of any size (a limit's tests), keyed by its number.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Blob {
    /// Its key.
    pub number: String,
    /// What makes it large.
    pub body: String,
}
space_client::entry!(Blob, "Blob", key = number);

/// Shards of the test clusters.
pub const SHARDS: &str = "8";

/// Starts node `addr` of `cluster` on `dir` (or restarts it from there).
pub fn start(addr: &str, dir: &TempDir, cluster: &str) -> NodeProcess {
    start_with_shards(addr, dir, cluster, SHARDS)
}

/// [`start`] for a cluster of `shards` shards.
pub fn start_with_shards(addr: &str, dir: &TempDir, cluster: &str, shards: &str) -> NodeProcess {
    start_with(addr, dir, cluster, shards, &[])
}

/// [`start_with_shards`] with `extra` options (a fault to inject, say).
pub fn start_with(
    addr: &str,
    dir: &TempDir,
    cluster: &str,
    shards: &str,
    extra: &[&str],
) -> NodeProcess {
    let data_dir = dir.0.to_string_lossy();
    let mut args = vec![
        "--data-dir",
        &data_dir,
        "--initial-cluster",
        cluster,
        "--shards",
        shards,
    ];
    args.extend_from_slice(extra);
    NodeProcess::start_at(addr, &args)
}

/// How a call ended, for the history: a call that never reached a node certainly did
/// nothing; one that may have reached it, perhaps did.
pub fn ended(e: &SpaceError) -> Ended {
    match e {
        // A node answers wrong-node only for what it did not do (a call whose shard
        // leadership ended is answered from the shard's log once it has a new leader);
        // unavailable may mean that the outcome could not be learnt: unknown.
        SpaceError::Down { .. } | SpaceError::WrongNode { .. } | SpaceError::Rejected { .. } => {
            Ended::Failed
        }
        _ => Ended::Unknown,
    }
}

/// Writes `ids`, retrying refused writes for up to 20 s; records each write's end.
pub async fn write_all(space: &Space, ids: std::ops::Range<u64>, history: &History) {
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
pub async fn take_some(space: &Space, n: usize, history: &History) -> usize {
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

/// What is left in the cluster, read until two reads agree (for a minute at most: a
/// listing that keeps failing fails the test rather than holding it).
pub async fn left(space: &Space) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut previous = None;
    let mut failure = None;
    while Instant::now() < deadline {
        match space.contents::<Job>(&Query::of::<Job>()).await {
            Ok(jobs) => {
                let mut ids: Vec<u64> = jobs.iter().map(|j| j.id).collect();
                ids.sort_unstable();
                if previous.as_ref() == Some(&ids) {
                    return ids;
                }
                previous = Some(ids);
            }
            Err(e) => failure = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the contents never settled within a minute; the last failure: {failure:?}");
}

/// The history's verdict once it is clean, or the last one after `patience`.
pub async fn clean_within(space: &Space, history: &History, patience: Duration) -> Verdict {
    let deadline = Instant::now() + patience;
    loop {
        let verdict = check(&history.ops(), &left(space).await);
        if verdict.is_clean() || Instant::now() >= deadline {
            return verdict;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
