//! `cluster`: three nodes keeping one copy of each range (replication 1) against one node
//! on its own, all durable, in one run.
//!
//! - 50 client connections moving 128-byte entries, half writing (keyless writes, spread
//!   over the nodes in turn) and half taking by query (a take sweeps the nodes, then waits
//!   on all of them at once); every write and every take counts as one op;
//! - the wake-up latency of a blocking take: a taker waits on the cluster, another client
//!   writes one matching entry (to whichever node its turn picks), and the time from the
//!   start of the write to the taker holding the entry is recorded.
//!
//! All four processes (three nodes and the single node) and the bench client share the
//! machine, so on a small machine the ratio mostly shows what routing and the shards' Raft
//! groups cost. Each side runs as it would be deployed on these cores: the single node
//! with its default of one worker thread per core, and each of the three members with one
//! (their share of the cores; more threads than cores only adds context switches between
//! the members).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde_json::json;
use space_client::Query;

use crate::inproc::median;
use crate::node::{Blob, CONNECTIONS, PAYLOAD, space_throughput, start_node, us};
use crate::replicated::{Cluster, NODES as MEMBERS, Scratch, ready};

/// Shards of the cluster (the default of `space-node --initial-cluster`).
const SHARDS: u32 = 64;

/// Blocking-take wake-ups through `seeds`: `samples` times, a taker waits, a writer writes
/// one entry, and the time from the write's start to the take's return is recorded.
async fn wakeups(seeds: &str, samples: usize) -> Result<Histogram<u64>> {
    let taker = space_client::connect(seeds).await?;
    let writer = space_client::connect(seeds).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Instant>(1);
    let taking = tokio::spawn(async move {
        let q = Query::of::<Blob>();
        for _ in 0..samples + 100 {
            taker
                .take::<Blob>(&q, Duration::from_secs(10))
                .await?
                .context("a blocking take timed out with a writer writing")?;
            if tx.send(Instant::now()).await.is_err() {
                break;
            }
        }
        anyhow::Ok(())
    });
    let blob = Blob {
        payload: vec![7; PAYLOAD],
    };
    let mut h = Histogram::new(3)?;
    for i in 0..samples + 100 {
        // Let the taker get back to waiting on every node.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let start = Instant::now();
        writer.write(&blob).await?;
        let woke = rx.recv().await.context("the taker stopped")?;
        if i >= 100 {
            h.record(woke.saturating_duration_since(start).as_nanos() as u64)?;
        }
    }
    taking.await??;
    Ok(h)
}

/// Runs the cluster workload `runs` times and prints the medians as JSON.
pub fn run(runs: usize, seconds: u64, wakeup_samples: usize) -> Result<()> {
    let cluster = Cluster::start(1, SHARDS)?;
    let seeds = cluster.seeds();
    let scratch = Scratch::new("single")?;
    let (_single, single) = start_node(&["--data-dir", &scratch.0.to_string_lossy()])?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(ready(&seeds))?;
    let duration = Duration::from_secs(seconds);
    let mut rows: Vec<[f64; 6]> = Vec::new();
    for run in 1..=runs {
        let row = runtime.block_on(async {
            // Alternate which goes first, so neither always runs on a fresher machine.
            let (cluster, one) = if run % 2 == 1 {
                let cluster = space_throughput(&seeds, 1, duration).await?;
                (cluster, space_throughput(&single, 1, duration).await?)
            } else {
                let one = space_throughput(&single, 1, duration).await?;
                (space_throughput(&seeds, 1, duration).await?, one)
            };
            let cw = wakeups(&seeds, wakeup_samples).await?;
            let sw = wakeups(&single, wakeup_samples).await?;
            anyhow::Ok([
                cluster,
                one,
                us(&cw, 0.5),
                us(&cw, 0.99),
                us(&sw, 0.5),
                us(&sw, 0.99),
            ])
        })?;
        println!(
            "run {run}: {MEMBERS} nodes {:.0} ops/s vs one node {:.0} ({:.2}) | blocking-take wake-up p50/p99: {MEMBERS} nodes {}/{} us, one node {}/{} us",
            row[0],
            row[1],
            row[0] / row[1],
            row[2],
            row[3],
            row[4],
            row[5]
        );
        rows.push(row);
    }
    let col = |i: usize| (median(rows.iter().map(|r| r[i]).collect()) * 10.0).round() / 10.0;
    println!(
        "{}",
        json!({
            "workload": "cluster",
            "nodes": MEMBERS,
            "replication": 1,
            "shards": SHARDS,
            "connections": CONNECTIONS,
            "entry_bytes": PAYLOAD,
            "runs": runs,
            "seconds_per_measurement": seconds,
            "ops_per_s": col(0).round(),
            "single_node_ops_per_s": col(1).round(),
            "ratio": (median(rows.iter().map(|r| r[0] / r[1]).collect()) * 1000.0).round() / 1000.0,
            "wakeup_p50_us": col(2),
            "wakeup_p99_us": col(3),
            "single_node_wakeup_p50_us": col(4),
            "single_node_wakeup_p99_us": col(5),
        })
    );
    Ok(())
}
