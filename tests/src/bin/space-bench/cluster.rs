//! `cluster`: three nodes in a static cluster against one node on its own, in one run.
//!
//! - 50 client connections moving 128-byte entries, half writing (keyless writes, spread
//!   over the nodes in turn) and half taking by query (a take sweeps the nodes, then waits
//!   on all of them at once); every write and every take counts as one op;
//! - the wake-up latency of a blocking take: a taker waits on the cluster, another client
//!   writes one matching entry (to whichever node its turn picks), and the time from the
//!   start of the write to the taker holding the entry is recorded.
//!
//! All four processes (three nodes and the single node) and the bench client share the
//! machine, so on a small machine the ratio mostly shows what routing costs. Each side runs
//! as it would be deployed on these cores: the single node with its default of one worker
//! thread per core, and each of the three members with [`MEMBER_THREADS`] (their share of
//! the cores; more threads than cores only adds context switches between the members).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde_json::json;
use space_client::Query;

use crate::inproc::median;
use crate::node::{
    Blob, CONNECTIONS, PAYLOAD, Process, space_throughput, start_node, start_node_at, us,
};

/// Cluster members.
const MEMBERS: usize = 3;

/// Worker threads of each member (`space-node --threads`).
const MEMBER_THREADS: &str = "1";

/// Starts a static cluster of `MEMBERS` nodes on free loopback ports; returns the
/// processes and the comma-separated member list (usable as client seeds).
fn start_cluster(args: &[&str]) -> Result<(Vec<Process>, String)> {
    let listeners = (0..MEMBERS)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let addrs = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<std::io::Result<Vec<_>>>()?;
    drop(listeners);
    let peers = addrs.join(",");
    let mut nodes = Vec::new();
    for addr in &addrs {
        let mut node_args = vec!["--peers", &peers, "--epoch", "1"];
        node_args.extend_from_slice(args);
        nodes.push(start_node_at(addr, &node_args)?.0);
    }
    Ok((nodes, peers))
}

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
    let (_cluster, seeds) = start_cluster(&["--threads", MEMBER_THREADS])?;
    let (_single, single) = start_node(&[])?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
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
            "member_threads": MEMBER_THREADS.parse::<u32>()?,
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
