//! A hostile client against a real node (deep and absurd requests, stalled, trickled,
//! oversized and junk frames, floods of blocked calls, subscriptions, entry types and
//! connections) while a well-behaved client keeps working: every one of its operations
//! succeeds, and the node is still whole afterwards. (How its latency fares is measured by
//! `space-bench -- hostile`, not asserted here.)

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use space_client::{Query, Space, connect};
use space_tests::hostile::attack;
use space_tests::process::start_node;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Work {
    id: u64,
}
space_client::entry!(Work, "Work");

/// Write-then-take round trips for `run_for`; every one must succeed.
async fn work(space: &Space, run_for: Duration, next: &mut u64) -> Histogram<u64> {
    let mut h = Histogram::<u64>::new(3).unwrap();
    let until = Instant::now() + run_for;
    while Instant::now() < until {
        let start = Instant::now();
        space.write(&Work { id: *next }).await.unwrap();
        let got = space
            .take::<Work>(&Query::of::<Work>(), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(got, Some(Work { id: *next }));
        *next += 1;
        h.record(start.elapsed().as_micros() as u64).unwrap();
    }
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_client_does_not_hurt_a_well_behaved_one() {
    let (_node, addr) = start_node(&["--frame-timeout-ms", "1000"]).unwrap();
    let space = connect(&addr).await.unwrap();
    let mut next = 0;
    let idle = work(&space, Duration::from_secs(2), &mut next).await;
    let attack = attack(&addr);
    let hostile = work(&space, Duration::from_secs(6), &mut next).await;
    let actions = attack.actions.load(std::sync::atomic::Ordering::Relaxed);
    drop(attack);
    eprintln!(
        "well-behaved round trips: idle p50 {} / p99 {} us ({} ops); beside the hostile client p50 {} / p99 {} us ({} ops, {actions} hostile rounds)",
        idle.value_at_quantile(0.5),
        idle.value_at_quantile(0.99),
        idle.len(),
        hostile.value_at_quantile(0.5),
        hostile.value_at_quantile(0.99),
        hostile.len(),
    );
    assert!(actions > 0, "the attack ran");
    // The node is whole: counts add up, and nothing the hostile client left blocks others.
    assert_eq!(space.count(&Query::of::<Work>()).await.unwrap(), 0);
    let stats = space.stats().await.unwrap();
    assert!(stats.waiters < 50, "{stats:?}");
    let fresh = connect(&addr).await.unwrap();
    fresh.write(&Work { id: u64::MAX }).await.unwrap();
}
