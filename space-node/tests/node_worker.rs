//! The worker helper against a real node: 8 workers and 10,000 jobs of which 1% always
//! fail, and a worker killed mid-job.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{NodeProcess, Signal, free_addrs};
use serde::{Deserialize, Serialize};
use space_client::{DeadLetter, Job, Query, Shutdown, Space, Work, WorkerReport, connect};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Payment {
    id: u64,
}
space_client::entry!(Payment, "worker.Payment");

const JOBS: u64 = 10_000;
const MAX_ATTEMPTS: u32 = 3;

fn payments() -> Query {
    Query::of::<Payment>()
}

fn dead_letters() -> Query {
    Query::of::<DeadLetter>().eq("entry_type", "worker.Payment")
}

fn always_fails(id: u64) -> bool {
    id % 100 == 42
}

/// Waits until `done` says the work is over, then stops the pool and returns its report.
async fn stop_when(
    pool: tokio::task::JoinHandle<space_client::Result<WorkerReport>>,
    shutdown: &Shutdown,
    mut done: impl AsyncFnMut() -> bool,
) -> WorkerReport {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done().await {
        assert!(
            Instant::now() < deadline && !pool.is_finished(),
            "the pool did not finish its jobs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.stop();
    pool.await
        .expect("the pool's task")
        .expect("the pool stopped cleanly")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_workers_do_every_good_job_once_and_dead_letter_every_bad_one() {
    let node = NodeProcess::start(&[]);
    let space = connect(&node.addr).await.unwrap();
    let jobs: Vec<Payment> = (0..JOBS).map(|id| Payment { id }).collect();
    for chunk in jobs.chunks(500) {
        space.write_all(chunk).await.unwrap();
    }
    let runs: Arc<Vec<AtomicU32>> = Arc::new((0..JOBS).map(|_| AtomicU32::new(0)).collect());
    let good = Arc::new(AtomicU64::new(0));
    let shutdown = Shutdown::new();
    let pool = tokio::spawn({
        let (runs, good) = (runs.clone(), good.clone());
        space
            .worker::<Payment>(&payments())
            .concurrency(8)
            .lease(Duration::from_secs(5))
            .max_attempts(MAX_ATTEMPTS)
            .backoff(Duration::from_millis(10), Duration::from_millis(50))
            .poll(Duration::from_millis(200))
            .shutdown_on(&shutdown)
            .run(move |job: Job<Payment>| {
                let (runs, good) = (runs.clone(), good.clone());
                async move {
                    let id = job.entry.id;
                    runs[id as usize].fetch_add(1, Ordering::SeqCst);
                    if always_fails(id) {
                        return Err(format!(
                            "payment {id} was declined (attempt {})",
                            job.attempt
                        ));
                    }
                    good.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            })
    });
    let bad = JOBS / 100;
    let report = stop_when(pool, &shutdown, async || {
        good.load(Ordering::SeqCst) == JOBS - bad
            && space.count(&dead_letters()).await.unwrap() == bad
            && space.count(&payments()).await.unwrap() == 0
    })
    .await;

    assert_eq!(report.done, JOBS - bad, "{report}");
    assert_eq!(report.dead_lettered, bad, "{report}");
    assert_eq!(
        report.retried,
        bad * u64::from(MAX_ATTEMPTS - 1),
        "{report}"
    );
    assert_eq!((report.lost, report.aborted), (0, 0), "{report}");
    for (id, runs) in runs.iter().enumerate() {
        let expected = if always_fails(id as u64) {
            MAX_ATTEMPTS
        } else {
            1
        };
        assert_eq!(runs.load(Ordering::SeqCst), expected, "job {id}");
    }
    let letters: Vec<DeadLetter> = space.contents(&dead_letters()).await.unwrap();
    assert_eq!(letters.len() as u64, bad);
    for letter in &letters {
        let payment: Payment = letter.entry().unwrap();
        assert!(always_fails(payment.id), "{letter:?}");
        assert_eq!(letter.attempts, MAX_ATTEMPTS);
        assert_eq!(
            letter.error,
            format!(
                "payment {} was declined (attempt {MAX_ATTEMPTS})",
                payment.id
            )
        );
    }
    assert_eq!(space.count(&payments()).await.unwrap(), 0);
}

#[test]
fn a_worker_killed_mid_job_loses_nothing() {
    let node = NodeProcess::start(&[]);
    let lease = Duration::from_secs(1);
    // The doomed worker runs on a runtime of its own, with its own connection; dropping
    // the runtime ends it mid-job as a crash would: no commit, no release, no renewal.
    let doomed = tokio::runtime::Runtime::new().unwrap();
    let (started_tx, started) = std::sync::mpsc::channel();
    doomed.block_on(async {
        let space = connect(&node.addr).await.unwrap();
        space.write(&Payment { id: 7 }).await.unwrap();
        tokio::spawn(space.worker::<Payment>(&payments()).lease(lease).run(
            move |job: Job<Payment>| {
                let started_tx = started_tx.clone();
                async move {
                    let _ = started_tx.send(job.entry.id);
                    std::future::pending::<()>().await;
                    Ok::<(), String>(())
                }
            },
        ));
    });
    assert_eq!(started.recv_timeout(Duration::from_secs(10)), Ok(7));
    doomed.shutdown_background();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let space: Space = connect(&node.addr).await.unwrap();
        let rescued = Arc::new(AtomicU32::new(0));
        let shutdown = Shutdown::new();
        let pool = tokio::spawn({
            let rescued = rescued.clone();
            space
                .worker::<Payment>(&payments())
                .lease(lease)
                .poll(Duration::from_millis(200))
                .shutdown_on(&shutdown)
                .run(move |job: Job<Payment>| {
                    let rescued = rescued.clone();
                    async move {
                        assert_eq!((job.entry.id, job.attempt), (7, 2));
                        rescued.fetch_add(1, Ordering::SeqCst);
                        Ok::<(), String>(())
                    }
                })
        });
        let report = stop_when(pool, &shutdown, async || {
            rescued.load(Ordering::SeqCst) == 1
        })
        .await;
        assert_eq!(report.done, 1, "{report}");
        assert_eq!(space.count(&payments()).await.unwrap(), 0);
    });
}

/// A pool rides out its node's restart: the calls that could not reach it pause their
/// slot, and the pool goes on with the node once it is back; every job is done. The node
/// is killed while one job's handler runs, so that job's commit cannot reach it: the
/// report counts it unsettled, and the job, its claim lapsed, is handled again. (Other
/// commits the kill cut off may have landed before the node died; they count unsettled
/// too, and their jobs are not handled again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_survives_its_node_restarting() {
    const CUT_OFF: u64 = 42;
    let dir = std::env::temp_dir().join(format!("space-worker-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data_dir = dir.to_string_lossy().into_owned();
    // Below the ephemeral range: no other node's port-0 listener, nor a client's
    // connection, takes the port while the node is down between its runs.
    let addr = free_addrs(1).remove(0);
    let node = NodeProcess::start_at(&addr, &["--data-dir", &data_dir]);
    let config = space_client::ClientConfig {
        retry_for: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        ..space_client::ClientConfig::default()
    };
    let space = space_client::connect_with(&addr, config).await.unwrap();
    // How many times each job was handled.
    let handled = Arc::new(std::sync::Mutex::new(BTreeMap::<u64, u32>::new()));
    let times_handled = {
        let handled = handled.clone();
        move || handled.lock().expect("the jobs handled").clone()
    };
    let kill_now = Arc::new(tokio::sync::Notify::new());
    let killed = Arc::new(tokio::sync::Notify::new());
    let shutdown = Shutdown::new();
    let pool = tokio::spawn({
        let (handled, kill_now, killed) = (handled.clone(), kill_now.clone(), killed.clone());
        space
            .worker::<Payment>(&payments())
            .concurrency(4)
            .lease(Duration::from_secs(2))
            .backoff(Duration::from_millis(20), Duration::from_millis(200))
            .poll(Duration::from_millis(200))
            .shutdown_on(&shutdown)
            .run(move |job: Job<Payment>| {
                let id = job.entry.id;
                let first_time = {
                    let mut handled = handled.lock().expect("the jobs handled");
                    let times = handled.entry(id).or_default();
                    *times += 1;
                    *times == 1
                };
                let (kill_now, killed) = (kill_now.clone(), killed.clone());
                async move {
                    if id == CUT_OFF && first_time {
                        kill_now.notify_one();
                        killed.notified().await;
                    }
                    Ok::<(), String>(())
                }
            })
    });
    let first: Vec<Payment> = (0..100).map(|id| Payment { id }).collect();
    space.write_all(&first).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), kill_now.notified())
        .await
        .expect("the job to cut off handled");
    node.kill();
    killed.notify_one();
    // Down for longer than a call's retries: the slots meet the errors and pause.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!pool.is_finished(), "the pool stopped on a transient error");
    let _node = NodeProcess::start_at(&addr, &["--data-dir", &data_dir]);
    let second: Vec<Payment> = (100..200).map(|id| Payment { id }).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match space.write_all(&second).await {
            Ok(_) => break,
            Err(e) if e.is_unreachable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let report = stop_when(pool, &shutdown, async || {
        let handled = times_handled();
        handled.len() == 200
            && handled.get(&CUT_OFF).is_some_and(|&times| times > 1)
            && space.count(&payments()).await.unwrap() == 0
    })
    .await;
    assert_eq!(times_handled().get(&CUT_OFF), Some(&2));
    assert!(
        (1..=4).contains(&report.unsettled),
        "the commit the kill cut off, and at most one per slot: {report}"
    );
    // The job cut off counts twice: unsettled, then done.
    assert!(report.done + report.unsettled > 200, "{report}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A dead letter that cannot be written because the node is out of reach for a moment
/// does not stop the pool: the claim lapses, the entry is claimed again, and the dead
/// letter is written once the node is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_write_that_meets_a_paused_node_does_not_stop_the_pool() {
    let node = NodeProcess::start(&[]);
    let config = space_client::ClientConfig {
        retry_for: Duration::from_millis(500),
        call_timeout: Duration::from_millis(500),
        ..space_client::ClientConfig::default()
    };
    let space = space_client::connect_with(&node.addr, config)
        .await
        .unwrap();
    space.write(&Payment { id: 42 }).await.unwrap();
    let (paused_tx, paused_rx) = std::sync::mpsc::channel::<()>();
    let paused_rx = Arc::new(std::sync::Mutex::new(paused_rx));
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let shutdown = Shutdown::new();
    let pool = tokio::spawn(
        space
            .worker::<Payment>(&payments())
            .lease(Duration::from_secs(2))
            .max_attempts(1)
            .poll(Duration::from_millis(200))
            .shutdown_on(&shutdown)
            .run(move |job: Job<Payment>| {
                let (started_tx, paused_rx) = (started_tx.clone(), paused_rx.clone());
                async move {
                    let _ = started_tx.send(job.attempt);
                    if job.attempt == 1 {
                        // Fail once the node is paused: the dead letter meets it.
                        let paused =
                            tokio::task::spawn_blocking(move || paused_rx.lock().unwrap().recv());
                        let _ = paused.await;
                    }
                    Err::<(), String>(format!("payment {} declined", job.entry.id))
                }
            }),
    );
    assert_eq!(started.recv().await, Some(1));
    node.signal(Signal::Stop);
    paused_tx.send(()).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    node.signal(Signal::Continue);
    assert!(
        !pool.is_finished(),
        "the pool stopped on a node out of reach"
    );
    let report = stop_when(pool, &shutdown, async || {
        space.count(&dead_letters()).await.is_ok_and(|n| n >= 1)
            && space.count(&payments()).await.is_ok_and(|n| n == 0)
    })
    .await;
    assert!(report.dead_lettered >= 1, "{report}");
}

/// A pool stopped while the claim it gave up cannot be released yet (the node claimed the
/// entry, then stopped answering) returns only once that claim is released, so that a
/// process that exits when `run` returns leaves no entry hidden for the rest of a lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_pool_returns_once_the_claim_it_gave_up_is_released() {
    use space_tests::proxy::{Link, Proxy};
    let addr = common::free_addrs(1).remove(0);
    // The pool reaches the node through a proxy that can hold its answers (the node
    // advertises the proxy's address); the test asks the node directly.
    let proxy = Proxy::start(addr.parse().unwrap()).await.unwrap();
    let _node = NodeProcess::start_at(&addr, &["--advertise", &proxy.addr().to_string()]);
    let space = connect(&proxy.addr().to_string()).await.unwrap();
    let shutdown = Shutdown::new();
    let pool = tokio::spawn({
        let (space, shutdown) = (space.clone(), shutdown.clone());
        async move {
            space
                .worker::<Payment>(&payments())
                .concurrency(1)
                .lease(Duration::from_secs(600))
                .shutdown_on(&shutdown)
                .run(|_job: Job<Payment>| async { Ok::<(), String>(()) })
                .await
        }
    });
    let on_node = |check: fn(&str) -> bool| {
        let addr = addr.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                common::until(Duration::from_secs(10), || check(&addr))
            })
            .await
            .unwrap()
        }
    };
    assert!(
        on_node(|a| common::waiters_on(a) == 1).await,
        "the pool's claim never waited on the node"
    );
    // A job arrives and the waiting claim claims it; its answer is held on the way.
    proxy.set(Link::HoldReplies);
    let written = addr.clone();
    tokio::task::spawn_blocking(move || common::write_on(&written, "worker.Payment", 1))
        .await
        .unwrap();
    assert!(
        on_node(|a| common::count_on(a, "worker.Payment") == 0).await,
        "the pool's claim did not claim the job"
    );
    // Then the node cannot be reached, and the pool stops: the claim is given up, and its
    // revoke cannot leave yet.
    proxy.set(Link::Cut);
    shutdown.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !pool.is_finished(),
        "the pool returned before the claim it gave up was released"
    );
    proxy.set(Link::Open);
    let report = tokio::time::timeout(Duration::from_secs(30), pool)
        .await
        .expect("the pool returned once its node answered again")
        .unwrap()
        .unwrap();
    assert_eq!(report.done, 0);
    let left = addr.clone();
    let count = tokio::task::spawn_blocking(move || common::count_on(&left, "worker.Payment"))
        .await
        .unwrap();
    assert_eq!(count, 1, "the job the pool gave up is not visible again");
}
