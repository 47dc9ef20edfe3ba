//! `hostile`: a well-behaved client's write-then-take round trips on a node, idle and
//! beside the hostile client of `space_tests::hostile` (deep and absurd requests, stalled,
//! trickled, oversized and junk frames, floods of blocked calls, subscriptions, entry types
//! and connections), in the same run. Reports the round trip's p50 / p99 each way, the p99
//! ratio, and the well-behaved client's errors (which must be none).
//!
//! The node, the well-behaved client and the hostile client share the machine: on two
//! cores the attack also takes CPU from the others. A third measurement separates the two:
//! the same attack on *another* node while the client works on its own, so the machine is
//! as busy but its node handles nothing hostile.

use std::time::{Duration, Instant};

use anyhow::Result;
use hdrhistogram::Histogram;
use serde_json::json;
use space_client::{Query, Space};
use space_tests::hostile::attack;

use crate::inproc::median;
use crate::node::{Blob, PAYLOAD, start_node, us};

/// Write-then-take round trips for `run_for`: their latencies, and how many failed.
async fn round_trips(space: &Space, run_for: Duration) -> Result<(Histogram<u64>, u64)> {
    let q = Query::of::<Blob>();
    let blob = Blob {
        payload: vec![7; PAYLOAD],
    };
    let mut h = Histogram::new(3)?;
    let mut errors = 0;
    let until = Instant::now() + run_for;
    while Instant::now() < until {
        let start = Instant::now();
        let ok = space.write(&blob).await.is_ok()
            && matches!(
                space.take::<Blob>(&q, Duration::from_secs(10)).await,
                Ok(Some(_))
            );
        if ok {
            h.record(start.elapsed().as_nanos() as u64)?;
        } else {
            errors += 1;
        }
    }
    Ok((h, errors))
}

pub fn run(runs: usize, seconds: u64) -> Result<()> {
    let (_node, addr) = start_node(&[])?;
    let (_other, other) = start_node(&[])?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let duration = Duration::from_secs(seconds);
    let mut rows: Vec<[f64; 7]> = Vec::new();
    for run in 1..=runs {
        let row = runtime.block_on(async {
            let space = space_client::connect(&addr).await?;
            let (idle, idle_errors) = round_trips(&space, duration).await?;
            let attack_here = attack(&addr);
            let (hostile, hostile_errors) = round_trips(&space, duration).await?;
            drop(attack_here);
            let attack_elsewhere = attack(&other);
            let (busy, busy_errors) = round_trips(&space, duration).await?;
            drop(attack_elsewhere);
            anyhow::Ok([
                us(&idle, 0.5),
                us(&idle, 0.99),
                us(&hostile, 0.5),
                us(&hostile, 0.99),
                us(&busy, 0.5),
                us(&busy, 0.99),
                (idle_errors + hostile_errors + busy_errors) as f64,
            ])
        })?;
        println!(
            "run {run}: idle p50/p99 {}/{} us | attacked p50/p99 {}/{} us ({:.2}x at p99) | another node attacked p50/p99 {}/{} us ({:.2}x) | errors {}",
            row[0],
            row[1],
            row[2],
            row[3],
            row[3] / row[1],
            row[4],
            row[5],
            row[5] / row[1],
            row[6]
        );
        rows.push(row);
    }
    let col = |i: usize| median(rows.iter().map(|r| r[i]).collect());
    let p99_ratio = median(rows.iter().map(|r| r[3] / r[1]).collect());
    let busy_ratio = median(rows.iter().map(|r| r[5] / r[1]).collect());
    println!(
        "{}",
        json!({
            "workload": "hostile",
            "runs": runs,
            "seconds_per_measurement": seconds,
            "idle_rtt_p50_us": col(0),
            "idle_rtt_p99_us": col(1),
            "hostile_rtt_p50_us": col(2),
            "hostile_rtt_p99_us": col(3),
            "p99_ratio": (p99_ratio * 100.0).round() / 100.0,
            "elsewhere_rtt_p50_us": col(4),
            "elsewhere_rtt_p99_us": col(5),
            "elsewhere_p99_ratio": (busy_ratio * 100.0).round() / 100.0,
            "errors": rows.iter().map(|r| r[6]).sum::<f64>(),
        })
    );
    Ok(())
}
