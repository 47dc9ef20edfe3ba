//! The worker helper on the in-process space: shutdown within the lease, a blocking pool
//! whose handler panics, attempts counted by the space. (The 10,000-job run and a worker
//! killed mid-job are in `space-node/tests/node_worker.rs`, against a real node.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use space_client::{DeadLetter, Job, Lease, Query, Shutdown, Space, Work};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Task {
    id: u64,
}
space_client::entry!(Task, "worker.Task");

fn tasks() -> Query {
    Query::of::<Task>()
}

fn dead_letters() -> Query {
    Query::of::<DeadLetter>().eq("entry_type", "worker.Task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_returns_within_the_lease_and_puts_an_unfinished_entry_back() {
    let space = Space::new();
    space.write(&Task { id: 1 }).await.unwrap();
    let shutdown = Shutdown::new();
    let started = Arc::new(tokio::sync::Notify::new());
    let lease = Duration::from_millis(600);
    let pool = {
        let started = started.clone();
        tokio::spawn(
            space
                .worker::<Task>(&tasks())
                .concurrency(2)
                .lease(lease)
                .shutdown_on(&shutdown)
                .run(move |_job: Job<Task>| {
                    let started = started.clone();
                    async move {
                        started.notify_one();
                        // Longer than any lease: only the shutdown's abort ends it.
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        Ok::<(), String>(())
                    }
                }),
        )
    };
    started.notified().await;
    // Renewals keep the claim while the handler runs past its first lease.
    tokio::time::sleep(lease * 2).await;
    assert_eq!(space.count(&tasks()).await.unwrap(), 0, "still claimed");
    let stopping = Instant::now();
    shutdown.stop();
    let report = pool.await.unwrap().unwrap();
    let took = stopping.elapsed();
    assert!(
        took < lease + Duration::from_millis(500),
        "the pool stopped {took:?} after the shutdown, with a lease of {lease:?}"
    );
    assert_eq!(report.aborted, 1, "{report}");
    assert_eq!(report.done, 0, "{report}");
    // Released at once, not left to lapse: the next claim is its second.
    let again = space
        .claim::<Task>(&tasks(), Lease::secs(30), Duration::ZERO)
        .await
        .unwrap()
        .expect("the aborted job is back in the space");
    assert_eq!(again.claims, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pool_stops_at_once() {
    let space = Space::new();
    let shutdown = Shutdown::new();
    let pool = tokio::spawn(
        space
            .worker::<Task>(&tasks())
            .concurrency(4)
            .poll(Duration::from_secs(60))
            .shutdown_on(&shutdown)
            .run(|_job: Job<Task>| async { Ok::<(), String>(()) }),
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = Instant::now();
    shutdown.stop();
    let report = pool.await.unwrap().unwrap();
    assert!(stopping.elapsed() < Duration::from_secs(5));
    assert_eq!(report, Default::default());
}

#[test]
fn a_blocking_pool_dead_letters_a_handler_that_panics_and_does_the_rest_once() {
    let space = Space::new().blocking();
    let jobs: Vec<Task> = (0..200).map(|id| Task { id }).collect();
    space.write_all(&jobs).unwrap();
    let runs: Arc<Vec<AtomicU32>> = Arc::new((0..200).map(|_| AtomicU32::new(0)).collect());
    let shutdown = Shutdown::new();
    let pool = {
        let (space, runs, shutdown) = (space.clone(), runs.clone(), shutdown.clone());
        std::thread::spawn(move || {
            space
                .worker::<Task>(&tasks())
                .concurrency(4)
                .max_attempts(2)
                .backoff(Duration::from_millis(5), Duration::from_millis(20))
                .poll(Duration::from_millis(50))
                .shutdown_on(&shutdown)
                .run(move |job: Job<Task>| {
                    runs[job.entry.id as usize].fetch_add(1, Ordering::SeqCst);
                    if job.entry.id % 20 == 7 {
                        panic!("task {} cannot be done", job.entry.id);
                    }
                    Ok::<(), String>(())
                })
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while space.count(&dead_letters()).unwrap() < 10 || space.count(&tasks()).unwrap() > 0 {
        assert!(
            Instant::now() < deadline,
            "the pool did not finish the jobs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    shutdown.stop();
    let report = pool.join().unwrap().unwrap();
    assert_eq!(report.done, 190, "{report}");
    assert_eq!(report.dead_lettered, 10, "{report}");
    assert_eq!(report.retried, 10, "{report}");
    for (id, runs) in runs.iter().enumerate() {
        let expected = if id % 20 == 7 { 2 } else { 1 };
        assert_eq!(runs.load(Ordering::SeqCst), expected, "task {id}");
    }
    let letters: Vec<DeadLetter> = space.contents(&dead_letters()).unwrap();
    assert_eq!(letters.len(), 10);
    for letter in letters {
        let task: Task = letter.entry().unwrap();
        assert_eq!(task.id % 20, 7);
        assert_eq!(letter.attempts, 2);
        assert!(
            letter
                .error
                .contains(&format!("task {} cannot be done", task.id))
                && letter.error.contains("panicked"),
            "{}",
            letter.error
        );
    }
}
