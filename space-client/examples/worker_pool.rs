//! A worker pool on the in-process space.
//!
//! A master splits a job (count the primes below a limit) into tasks and writes them into
//! the space; a pool of N workers (the client's worker helper) claims tasks, does the work,
//! writes results and commits the tasks; the master takes the results and adds them up. A notify subscriber watches the results being written and
//! reports progress. Nobody calls anybody: they coordinate only through entries.
//!
//! ```text
//! cargo run --release -p space-client --example worker_pool -- [WORKERS] [LIMIT] [--connect HOST:PORT]
//! ```
//!
//! Without `--connect` the space is in this process; with it, the same code runs against a
//! `space-node` (workers, master and subscriber each talk to the node).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use space_client::{
    BlockingSpace, EventKinds, Job, Notification, Query, Shutdown, Space, Work, connect_blocking,
};

/// Count the primes in `[from, to)`.
#[derive(Debug, Serialize, Deserialize)]
struct Task {
    job: u64,
    from: u64,
    to: u64,
}
space_client::entry!(Task, "example.Task", index = [job]);

/// The answer to one task.
#[derive(Debug, Serialize, Deserialize)]
struct Outcome {
    job: u64,
    from: u64,
    primes: u64,
}
space_client::entry!(Outcome, "example.Outcome", index = [job]);

const TASK_SIZE: u64 = 50_000;

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Does one task: counts its primes and writes the outcome.
fn work(space: &BlockingSpace, job: Job<Task>) -> space_client::Result<()> {
    let t = &job.entry;
    let primes = (t.from..t.to).filter(|&n| is_prime(n)).count() as u64;
    space.write(&Outcome {
        job: t.job,
        from: t.from,
        primes,
    })?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let node = match args.iter().position(|a| a == "--connect") {
        Some(i) if i + 1 < args.len() => {
            let addr = args.remove(i + 1);
            args.remove(i);
            Some(addr)
        }
        Some(_) => return Err("--connect needs HOST:PORT".into()),
        None => None,
    };
    let mut args = args.into_iter();
    let workers: usize = match args.next() {
        Some(a) => a.parse()?,
        None => std::thread::available_parallelism().map_or(2, |n| n.get()),
    };
    let limit: u64 = match args.next() {
        Some(a) => a.parse()?,
        None => 5_000_000,
    };
    let space = match &node {
        Some(addr) => connect_blocking(addr)?,
        None => Space::new().blocking(),
    };
    // A fresh job number per run, so runs against a shared node do not mix.
    let job = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    let start = Instant::now();

    // Progress: a subscriber told about every outcome written for this job.
    let outcomes = Query::of::<Outcome>().eq("job", job);
    let subscription = space.notify(&outcomes, EventKinds::WRITTEN)?;
    let tasks_total = limit.div_ceil(TASK_SIZE);
    let progress = std::thread::spawn(move || {
        let mut seen = 0u64;
        while let Some(n) = subscription.recv() {
            if let Notification::Event(e) = n {
                seen += 1;
                if seen.is_multiple_of((tasks_total / 10).max(1)) || seen == tasks_total {
                    println!(
                        "progress: {seen}/{tasks_total} tasks done (event #{} from {})",
                        e.seq, e.node
                    );
                }
                if seen == tasks_total {
                    return;
                }
            }
        }
    });

    // The workers: a pool that claims tasks, does them and commits them. A claim, not a
    // plain take: if a worker died mid-task, its task would come back to the space when
    // the claim's lease ran out, for another worker to do.
    let shutdown = Shutdown::new();
    let pool = {
        let (space, shutdown) = (space.clone(), shutdown.clone());
        let doer = space.clone();
        std::thread::spawn(move || {
            space
                .worker::<Task>(&Query::of::<Task>().eq("job", job))
                .concurrency(workers)
                .lease(Duration::from_secs(60))
                .shutdown_on(&shutdown)
                .run(move |task| work(&doer, task))
        })
    };

    // The master: write the tasks, then collect every outcome.
    let tasks: Vec<Task> = (0..tasks_total)
        .map(|i| Task {
            job,
            from: i * TASK_SIZE,
            to: ((i + 1) * TASK_SIZE).min(limit),
        })
        .collect();
    space.write_all(&tasks)?;
    let mut primes = 0;
    let mut collected = 0;
    while collected < tasks_total {
        let batch = space.take_all::<Outcome>(&outcomes, 64, Duration::from_secs(30))?;
        if batch.is_empty() {
            return Err("no outcome for 30 s: are the workers alive?".into());
        }
        collected += batch.len() as u64;
        primes += batch.iter().map(|o| o.primes).sum::<u64>();
    }
    shutdown.stop();
    let report = pool.join().map_err(|_| "the worker pool panicked")??;
    progress
        .join()
        .map_err(|_| "the progress reporter panicked")?;

    println!(
        "{primes} primes below {limit}: {tasks_total} tasks over {workers} workers ({report}) in {:.2?} ({})",
        start.elapsed(),
        node.as_deref()
            .map_or("in-process".to_owned(), |a| format!("on node {a}"))
    );
    Ok(())
}
