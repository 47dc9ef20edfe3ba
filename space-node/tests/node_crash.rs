//! Crash test: clients write, take and claim against a durable node that is killed with
//! SIGKILL at random moments and restarted, at least five times; then the space is
//! drained. Every acknowledged write must be taken exactly once by an acknowledged take or
//! be present at the end; no acknowledged take may come back. Lost, duplicated and
//! unexpected entries are counted and must be zero, and no batch may be found in part
//! (a batch is one record of the log).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{NodeProcess, free_addrs};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use space_client::{BlockingSpace, ClientConfig, Lease, Query, connect_blocking_with};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Parcel {
    id: u64,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
}
space_client::entry!(Parcel, "Parcel");

/// What the clients saw acknowledged.
#[derive(Default)]
struct History {
    attempted: HashSet<u64>,
    written: HashSet<u64>,
    /// The ids of each batch written (whatever its outcome).
    batches: Vec<Vec<u64>>,
    taken: Vec<u64>,
    failures: u64,
}

/// One step of a client: a call, and how many ops were acknowledged.
type Step = Box<dyn Fn(&BlockingSpace, &Mutex<History>) -> u64 + Send>;

/// Counts a failed call (the client goes on); no op was acknowledged.
fn fail(history: &Mutex<History>) -> u64 {
    history.lock().failures += 1;
    0
}

/// Entries in each batch the batch writer writes.
const BATCH: u64 = 4;

fn config() -> ClientConfig {
    ClientConfig {
        // Long enough to ride out a restart: a call is retried (with the same request id)
        // until the node is back.
        retry_for: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(1),
        ..ClientConfig::default()
    }
}

#[test]
fn acknowledged_work_survives_repeated_kill_9() {
    let dir = std::env::temp_dir().join(format!("space-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data_dir = dir.to_string_lossy().into_owned();
    // Below the ephemeral range: no other node's port-0 listener, nor a client's
    // connection, takes the port while the node is down between its runs.
    let addr = free_addrs(1).remove(0);
    let node = Arc::new(Mutex::new(Some(NodeProcess::start_at(
        &addr,
        &["--data-dir", &data_dir],
    ))));
    let history = Arc::new(Mutex::new(History::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let next_id = Arc::new(AtomicU64::new(1));
    let ops_since_restart = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();

    // Each client thread connects and repeats its step until told to stop; a step returns
    // the ops it saw acknowledged.
    let client = |step: Step| {
        let (addr, history, stop, ops) = (
            addr.clone(),
            history.clone(),
            stop.clone(),
            ops_since_restart.clone(),
        );
        std::thread::spawn(move || {
            let space = connect_blocking_with(&addr, config()).unwrap();
            while !stop.load(Ordering::Relaxed) {
                ops.fetch_add(step(&space, &history), Ordering::Relaxed);
            }
        })
    };
    for _ in 0..2 {
        let next_id = next_id.clone();
        clients.push(client(Box::new(move |space, history| {
            let id = next_id.fetch_add(1, Ordering::Relaxed);
            history.lock().attempted.insert(id);
            match space.write(&Parcel {
                id,
                payload: vec![id as u8; 64],
            }) {
                Ok(_) => {
                    history.lock().written.insert(id);
                    1
                }
                Err(_) => fail(history),
            }
        })));
    }
    {
        let next_id = next_id.clone();
        clients.push(client(Box::new(move |space, history| {
            let ids: Vec<u64> = (0..BATCH)
                .map(|_| next_id.fetch_add(1, Ordering::Relaxed))
                .collect();
            {
                let mut h = history.lock();
                h.attempted.extend(&ids);
                h.batches.push(ids.clone());
            }
            let parcels: Vec<Parcel> = ids
                .iter()
                .map(|&id| Parcel {
                    id,
                    payload: vec![id as u8; 64],
                })
                .collect();
            match space.write_all(&parcels) {
                Ok(_) => {
                    history.lock().written.extend(&ids);
                    BATCH
                }
                Err(_) => fail(history),
            }
        })));
    }
    clients.push(client(Box::new(|space, history| {
        match space.take::<Parcel>(&Query::of::<Parcel>(), Duration::from_millis(100)) {
            Ok(Some(p)) => {
                history.lock().taken.push(p.id);
                1
            }
            Ok(None) => 0,
            Err(_) => fail(history),
        }
    })));
    clients.push(client(Box::new(|space, history| {
        match space.claim::<Parcel>(
            &Query::of::<Parcel>(),
            Lease::secs(5),
            Duration::from_millis(100),
        ) {
            Ok(Some(claim)) => match space.commit(&claim) {
                Ok(()) => {
                    history.lock().taken.push(claim.entry.id);
                    1
                }
                // Not committed: the entry comes back when the claim runs out.
                Err(_) => fail(history),
            },
            Ok(None) => 0,
            Err(_) => fail(history),
        }
    })));

    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut kills = 0;
    while kills < 6 {
        std::thread::sleep(Duration::from_millis(rng.random_range(300..900)));
        if ops_since_restart.swap(0, Ordering::Relaxed) == 0 {
            continue; // let the clients do something between kills
        }
        if let Some(n) = node.lock().take() {
            n.kill();
        }
        kills += 1;
        std::thread::sleep(Duration::from_millis(rng.random_range(0..200)));
        *node.lock() = Some(NodeProcess::start_at(&addr, &["--data-dir", &data_dir]));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }

    // Drain what is left (claims in flight run out within their lease).
    std::thread::sleep(Duration::from_secs(5));
    let space = connect_blocking_with(&addr, config()).unwrap();
    let mut present = Vec::new();
    loop {
        let batch = space
            .take_all::<Parcel>(&Query::of::<Parcel>(), 1000, Duration::ZERO)
            .unwrap();
        if batch.is_empty() {
            break;
        }
        present.extend(batch.into_iter().map(|p| p.id));
    }

    let h = history.lock();
    let mut seen: HashMap<u64, u32> = HashMap::new();
    for id in h.taken.iter().chain(present.iter()) {
        *seen.entry(*id).or_default() += 1;
    }
    let lost = h.written.iter().filter(|id| !seen.contains_key(id)).count();
    let duplicated = seen.values().filter(|&&n| n > 1).count();
    let unexpected = seen.keys().filter(|id| !h.attempted.contains(id)).count();
    // Found in part: some of a batch's entries were taken or left, and not all.
    let torn = h
        .batches
        .iter()
        .filter(|ids| {
            let found = ids.iter().filter(|id| seen.contains_key(id)).count();
            found > 0 && found < ids.len()
        })
        .count();
    println!(
        "kills {kills}, written {} (of {} attempted), taken {}, present at the end {}, client failures {}; lost {lost}, duplicated {duplicated}, unexpected {unexpected}, batches found in part {torn} (of {})",
        h.written.len(),
        h.attempted.len(),
        h.taken.len(),
        present.len(),
        h.failures,
        h.batches.len()
    );
    assert!(kills >= 5);
    assert!(
        h.written.len() > 100 && !h.taken.is_empty(),
        "the clients did work"
    );
    assert_eq!((lost, duplicated, unexpected, torn), (0, 0, 0, 0));
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}
