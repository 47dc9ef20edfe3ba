//! Chaos: replicated clusters of real `space-node` processes (3 and 5 nodes, replication
//! 3, durable) under repeated faults while writers, takers and claimers work: kill -9 of
//! a node (every node leads some shards, so each kill is a leader kill) and its restart
//! from its data directory, SIGSTOP/SIGCONT pauses longer than the election timeout, and
//! partitions that isolate a node (or, with 5 nodes, a minority of two) from its peers;
//! the last node runs on a slow disk throughout (each fsync of its log held 100 ms longer,
//! `--fault-sync-delay-ms`).
//! Peer traffic between nodes goes through one fault-injecting proxy per direction of
//! each pair (`--peer-via`), so a partition is a set of black-holed links.
//!
//! Half the jobs are padded past the size whose answers are acknowledged through the
//! shards' logs, so that takes, claims and commits of both sizes (answers dropped when the
//! client acknowledges them, and answers kept for their minute) meet the faults.
//!
//! Every operation is recorded as acknowledged, failed or unknown; once the faults heal,
//! the checker reads the history and what is left: no acknowledged write lost, no entry
//! taken twice, nothing unexpected. A subscriber listens throughout: it must be told
//! every acknowledged write at least once, or be told of a gap, and each node's numbers
//! must rise. Each scenario runs `SPACE_CHAOS_SECONDS` of faults
//! (12 by default, the form CI runs; 120 for the long form).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::replicated::{Job, SHARDS, clean_within, ended};
use common::{NodeProcess, Signal, free_addrs};
use futures::{FutureExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use space_client::{EventKinds, Key, Lease, Notification, Query, Space, Subscription, connect};
use space_tests::TempDir;
use space_tests::history::{Ended, History, Op};
use space_tests::proxy::{Link, Proxy};

/// A job as the writers write it: a [`Job`] (the takers and the checker read it as one)
/// with a padding of [`space_core::server::ACKNOWLEDGE_FROM_BYTES`] for even ids, none
/// for odd ones.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct PaddedJob {
    id: u64,
    pad: String,
}
space_client::entry!(PaddedJob, "Job");

impl PaddedJob {
    fn new(id: u64) -> PaddedJob {
        let pad = if id.is_multiple_of(2) {
            space_core::server::ACKNOWLEDGE_FROM_BYTES
        } else {
            0
        };
        PaddedJob {
            id,
            pad: "x".repeat(pad),
        }
    }
}

/// A cluster whose nodes' peer links pass through proxies the test controls.
struct Chaos {
    addrs: Vec<String>,
    dirs: Vec<TempDir>,
    nodes: Vec<Option<NodeProcess>>,
    /// `links[i][j]`: node i's peer traffic to node j (none for i == j).
    links: Vec<Vec<Option<Proxy>>>,
    /// The node whose disk is slow (each fsync of its log held [`SLOW_FSYNC_MS`] longer),
    /// across its restarts.
    slow_disk: Option<usize>,
    /// Each node's `--threads`, if given (1: the single-threaded runtime).
    threads: Option<&'static str>,
}

/// How much longer each fsync takes on a slow disk, in milliseconds.
const SLOW_FSYNC_MS: &str = "100";

impl Chaos {
    /// `n` nodes, node `slow_disk` (if any) on a slow disk, each running `threads` worker
    /// threads if given.
    async fn start(n: usize, slow_disk: Option<usize>, threads: Option<&'static str>) -> Chaos {
        let addrs = free_addrs(n);
        let mut links = Vec::new();
        for i in 0..n {
            let mut row = Vec::new();
            for (j, addr) in addrs.iter().enumerate() {
                row.push(if i == j {
                    None
                } else {
                    Some(Proxy::start(addr.parse().unwrap()).await.unwrap())
                });
            }
            links.push(row);
        }
        let mut chaos = Chaos {
            dirs: (0..n).map(|_| TempDir::new("chaos")).collect(),
            nodes: (0..n).map(|_| None).collect(),
            addrs,
            links,
            slow_disk,
            threads,
        };
        for i in 0..n {
            chaos.start_node(i);
        }
        chaos
    }

    fn start_node(&mut self, i: usize) {
        let mut args = vec![
            "--data-dir".to_owned(),
            self.dirs[i].0.to_string_lossy().into_owned(),
            "--initial-cluster".to_owned(),
            self.addrs.join(","),
            "--shards".to_owned(),
            SHARDS.to_owned(),
        ];
        if self.slow_disk == Some(i) {
            args.push("--fault-sync-delay-ms".to_owned());
            args.push(SLOW_FSYNC_MS.to_owned());
        }
        if let Some(threads) = self.threads {
            args.push("--threads".to_owned());
            args.push(threads.to_owned());
        }
        for (j, link) in self.links[i].iter().enumerate() {
            if let Some(proxy) = link {
                args.push("--peer-via".to_owned());
                args.push(format!("{}={}", self.addrs[j], proxy.addr()));
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let addr = self.addrs[i].clone();
        self.nodes[i] = Some(tokio::task::block_in_place(|| {
            NodeProcess::start_at(&addr, &args)
        }));
    }

    fn kill(&mut self, i: usize) {
        if let Some(node) = self.nodes[i].take() {
            tokio::task::block_in_place(|| node.kill());
        }
    }

    fn signal(&self, i: usize, signal: Signal) {
        if let Some(node) = &self.nodes[i] {
            node.signal(signal);
        }
    }

    /// Black-holes every link between `side` and the other nodes.
    fn partition(&self, side: &[usize]) {
        for (i, row) in self.links.iter().enumerate() {
            for (j, link) in row.iter().enumerate() {
                if let Some(proxy) = link
                    && side.contains(&i) != side.contains(&j)
                {
                    proxy.set(Link::Blackhole);
                }
            }
        }
    }

    fn heal(&self) {
        for proxy in self.links.iter().flatten().flatten() {
            proxy.set(Link::Open);
        }
    }
}

/// The faults one scenario may inject.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill,
    Pause,
    Partition,
}

/// Injects faults, one at a time, until `until`; at most `minority` nodes are affected
/// at once. Returns what it did.
async fn nemesis(
    chaos: &mut Chaos,
    rng: &mut StdRng,
    until: Instant,
    minority: usize,
) -> Vec<String> {
    let n = chaos.addrs.len();
    let mut done = Vec::new();
    let settle = Duration::from_millis(1_500);
    while Instant::now() < until {
        let fault = [Fault::Kill, Fault::Pause, Fault::Partition][rng.random_range(0..3)];
        let mut side: Vec<usize> = Vec::new();
        let size = rng.random_range(1..=minority);
        while side.len() < size {
            let i = rng.random_range(0..n);
            if !side.contains(&i) {
                side.push(i);
            }
        }
        let hold = Duration::from_millis(rng.random_range(800..2_500));
        done.push(format!("{fault:?} {side:?} for {hold:?}"));
        match fault {
            Fault::Kill => {
                for &i in &side {
                    chaos.kill(i);
                }
                tokio::time::sleep(hold).await;
                for &i in &side {
                    chaos.start_node(i);
                }
            }
            Fault::Pause => {
                for &i in &side {
                    chaos.signal(i, Signal::Stop);
                }
                tokio::time::sleep(hold).await;
                for &i in &side {
                    chaos.signal(i, Signal::Continue);
                }
            }
            Fault::Partition => {
                chaos.partition(&side);
                tokio::time::sleep(hold).await;
                chaos.heal();
            }
        }
        tokio::time::sleep(settle).await;
    }
    done
}

/// Entries in each batch the batch writer writes.
const BATCH: u64 = 3;

/// Writers (two of single entries, one of batches), takers and claimers, recording every
/// operation until `stop`.
fn workers(
    space: &Space,
    history: &Arc<History>,
    acknowledged: &Arc<Mutex<HashMap<Key, u64>>>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let next_id = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    // Two writers of single entries, and one of batches: each batch is one entry of its
    // shard's log, all or nothing, and its retry across a failover is answered whole
    // from the replicated answers.
    for size in [1, 1, BATCH] {
        let (space, history, acknowledged, stop, next_id) = (
            space.clone(),
            history.clone(),
            acknowledged.clone(),
            stop.clone(),
            next_id.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let ids: Vec<u64> = (0..size)
                    .map(|_| next_id.fetch_add(1, Ordering::Relaxed))
                    .collect();
                let jobs: Vec<PaddedJob> = ids.iter().map(|&id| PaddedJob::new(id)).collect();
                let written = match jobs.as_slice() {
                    [job] => space.write(job).await.map(|r| vec![r]),
                    jobs => space.write_all(jobs).await,
                };
                let ended = match written {
                    Ok(receipts) => {
                        let mut acknowledged = acknowledged.lock().unwrap();
                        for (receipt, &id) in receipts.into_iter().zip(&ids) {
                            acknowledged.insert(receipt.key, id);
                        }
                        Ended::Ok
                    }
                    Err(e) => ended(&e),
                };
                for id in ids {
                    history.record(Op::Write { id, ended });
                }
                if ended != Ended::Ok {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    let (space2, history2, stop2) = (space.clone(), history.clone(), stop.clone());
    tasks.push(tokio::spawn(async move {
        while !stop2.load(Ordering::Relaxed) {
            match space2
                .take::<Job>(&Query::of::<Job>(), Duration::from_millis(300))
                .await
            {
                Ok(got) => history2.record(Op::Take {
                    got: got.map(|j| j.id),
                    ended: Ended::Ok,
                }),
                Err(e) => {
                    history2.record(Op::Take {
                        got: None,
                        ended: ended(&e),
                    });
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }));
    let (space, history, stop) = (space.clone(), history.clone(), stop.clone());
    tasks.push(tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let claim = space
                .claim::<Job>(
                    &Query::of::<Job>(),
                    Lease::secs(3),
                    Duration::from_millis(300),
                )
                .await;
            let op = match claim {
                Ok(None) => continue,
                Ok(Some(claim)) => match space.commit(&claim).await {
                    Ok(()) => Op::Take {
                        got: Some(claim.entry.id),
                        ended: Ended::Ok,
                    },
                    Err(e) => Op::Take {
                        got: None,
                        ended: ended(&e),
                    },
                },
                Err(e) => Op::Take {
                    got: None,
                    ended: ended(&e),
                },
            };
            history.record(op);
        }
    }));
    tasks
}

/// What a subscription was told: each shard's sequence numbers in order (between two
/// gaps), the keys told, and the gaps announced.
#[derive(Default)]
struct Heard {
    seqs: HashMap<(u32, usize), Vec<u64>>,
    keys: HashSet<Key>,
    gaps: usize,
}

impl Heard {
    /// Shards whose numbers did not follow one another (a number repeated or skipped
    /// without a gap told).
    fn out_of_order(&self) -> Vec<u32> {
        self.seqs
            .iter()
            .filter(|(_, s)| s.windows(2).any(|w| w[1] != w[0] + 1))
            .map(|((shard, _), _)| *shard)
            .collect()
    }
}

/// Records what `sub` is told, until it ends or the task is aborted.
fn listen(mut sub: Subscription, heard: Arc<Mutex<Heard>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(n) = sub.next().await {
            let mut heard = heard.lock().unwrap();
            match n {
                Notification::Event(e) => {
                    let since_gap = heard.gaps;
                    let shard = e
                        .shard
                        .expect("an event of a replicated cluster names its shard");
                    heard
                        .seqs
                        .entry((shard, since_gap))
                        .or_default()
                        .push(e.seq);
                    heard.keys.insert(e.key);
                }
                Notification::Gap { .. } | Notification::Missed { .. } => heard.gaps += 1,
            }
        }
    })
}

/// One scenario at a time: each has the machine's cores to itself.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One scenario: `n` nodes (each running `threads` worker threads if given), faults
/// touching at most `minority` of them at once.
async fn scenario(n: usize, minority: usize, threads: Option<&'static str>, seed: u64) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let seconds: u64 = std::env::var("SPACE_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    // The last node's disk is slow throughout.
    let mut chaos = Chaos::start(n, Some(n - 1), threads).await;
    let space = connect(&chaos.addrs.join(",")).await.unwrap();
    let history = Arc::new(History::default());
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(Mutex::new(HashMap::new()));
    let heard = Arc::new(Mutex::new(Heard::default()));
    let sub = space
        .notify(&Query::of::<Job>(), EventKinds::WRITTEN)
        .await
        .unwrap();
    let listener = listen(sub, heard.clone());
    let tasks = workers(&space, &history, &acknowledged, &stop);

    let mut rng = StdRng::seed_from_u64(seed);
    let until = Instant::now() + Duration::from_secs(seconds);
    let faults = nemesis(&mut chaos, &mut rng, until, minority).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    // Everything healed: every node runs, no link is cut.
    chaos.heal();

    // A claim whose answer a fault cut off is hidden until it lapses (30 s at most).
    let verdict =
        match std::panic::AssertUnwindSafe(clean_within(&space, &history, Duration::from_secs(45)))
            .catch_unwind()
            .await
        {
            Ok(verdict) => verdict,
            Err(panic) => {
                // What each node sees of the shards, for the cluster's side of a failure.
                eprintln!("seed {seed}: faults {faults:?}");
                for (i, addr) in chaos.addrs.iter().enumerate() {
                    eprintln!("node {}: {}", i + 1, shard_view(addr).await);
                }
                // A new client's listing: whether the old client's state is at fault.
                let listed = tokio::time::timeout(Duration::from_secs(20), async {
                    let fresh = connect(&chaos.addrs.join(",")).await?;
                    fresh.contents::<Job>(&Query::of::<Job>()).await
                })
                .await;
                eprintln!(
                    "a new client's listing: {:?}",
                    listed.map(|r| r.map(|jobs| jobs.len()))
                );
                std::panic::resume_unwind(panic)
            }
        };
    let ops = history.ops();
    let count = |f: &dyn Fn(&Op) -> bool| ops.iter().filter(|o| f(o)).count();
    eprintln!(
        "{n} nodes (node {n} on a slow disk), seed {seed}: {} faults {faults:?}; {} writes ({} unknown), {} takes; {verdict:?}",
        faults.len(),
        count(&|o| matches!(o, Op::Write { .. })),
        count(&|o| matches!(
            o,
            Op::Write {
                ended: Ended::Unknown,
                ..
            }
        )),
        count(&|o| matches!(o, Op::Take { got: Some(_), .. })),
    );
    if !verdict.is_clean() {
        // The operations around each missing write, for the record.
        for id in &verdict.missing {
            if let Some(at) = ops
                .iter()
                .position(|o| matches!(o, Op::Write { id: w, .. } if w == id))
            {
                let key = acknowledged
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|(_, i)| *i == id)
                    .map(|(k, _)| k.clone());
                eprintln!(
                    "around the write of {id} (key {key:?}): {:?}",
                    &ops[at.saturating_sub(8)..(at + 8).min(ops.len())]
                );
            }
        }
        // And every operation on each entry seen twice, with its neighbours.
        for id in &verdict.twice {
            for (at, op) in ops.iter().enumerate() {
                if matches!(op, Op::Write { id: w, .. } | Op::Take { got: Some(w), .. } if w == id)
                {
                    eprintln!(
                        "entry {id} seen twice; op {at} of {}: {:?}",
                        ops.len(),
                        &ops[at.saturating_sub(6)..(at + 6).min(ops.len())]
                    );
                }
            }
        }
    }
    assert!(
        verdict.is_clean(),
        "seed {seed}, faults {faults:?}: {verdict:?}"
    );

    // The subscription: told every acknowledged write at least once, or told of a gap;
    // each shard's numbers follow one another.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (untold, gaps) = loop {
        let (untold, gaps) = {
            let heard = heard.lock().unwrap();
            let untold = acknowledged
                .lock()
                .unwrap()
                .keys()
                .filter(|k| !heard.keys.contains(*k))
                .count();
            (untold, heard.gaps)
        };
        if untold == 0
            || Instant::now() >= deadline
            || (gaps > 0 && deadline - Instant::now() < Duration::from_secs(25))
        {
            break (untold, gaps);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    listener.abort();
    let out_of_order = heard.lock().unwrap().out_of_order();
    eprintln!(
        "seed {seed}: the subscription was told {} of {} acknowledged writes, {gaps} gaps",
        verdict.acknowledged - untold.min(verdict.acknowledged),
        verdict.acknowledged
    );
    assert!(
        out_of_order.is_empty(),
        "seed {seed}: the numbers of shards {out_of_order:?} did not follow one another"
    );
    assert!(
        untold == 0 || gaps > 0,
        "seed {seed}: {untold} acknowledged writes were never told, and no gap was announced"
    );
    assert!(
        verdict.acknowledged > 0,
        "no write was acknowledged: {verdict:?}"
    );
}

/// The shards as the node at `addr` sees them (their leaders and terms), or why it did
/// not say within a few seconds.
async fn shard_view(addr: &str) -> String {
    use space_client::wire::{Request, Response};
    use space_client::{ClientConfig, Connection};
    let asked = async {
        let conn = Connection::open(addr, ClientConfig::default()).await?;
        conn.call(Request::Shards).await
    };
    match tokio::time::timeout(Duration::from_secs(5), asked).await {
        Ok(Ok(Response::Shards(shards))) => shards
            .iter()
            .map(|s| format!("{}: {:?} t{}", s.shard, s.leader.map(|l| l.0), s.term))
            .collect::<Vec<_>>()
            .join(", "),
        Ok(other) => format!("{other:?}"),
        Err(_) => "no answer within 5 s".to_owned(),
    }
}

fn seed() -> u64 {
    std::env::var("SPACE_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_under_kills_pauses_and_partitions_lose_nothing() {
    // One thread each (tokio's single-threaded runtime), as the replicated benchmark's
    // nodes run; the five nodes run one worker per core.
    scenario(3, 1, Some("1"), seed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_under_faults_of_a_minority_lose_nothing() {
    scenario(5, 2, None, seed()).await;
}

/// Two keys of two different shards the node at `addr` leads, as `conn`'s node sees the
/// topology once every shard has a leader.
async fn keys_led_by(conn: &Arc<space_client::Connection>, addr: &str) -> [Key; 2] {
    use space_client::wire::{Request, Response, range_of, shard_of_range};
    let shards: u32 = SHARDS.parse().unwrap();
    let shard_of = |k: &Key| shard_of_range(range_of(k), shards);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Response::Topology(t)) = conn.call(Request::Topology).await {
            let mut found = (0..10_000)
                .map(|i| Key::Name(format!("o-{i}")))
                .filter(|k| t.owner_of(k).is_some_and(|o| o.address == addr));
            if let Some(a) = found.next()
                && let Some(b) = found.find(|b| shard_of(b) != shard_of(&a))
            {
                return [a, b];
            }
        }
        assert!(Instant::now() < deadline, "{addr} leads no shard");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A write request of one `Order` with `key`.
fn write_order(key: Key) -> space_client::wire::Request {
    write_of("Order", key)
}

/// A write request of one entry of `entry_type` with `key`.
fn write_of(entry_type: &str, key: Key) -> space_client::wire::Request {
    space_client::wire::Request::WriteDirect {
        entry_type: entry_type.into(),
        indexes: Vec::new(),
        entries: vec![(space_client::wire::Fields::new(), Some(key))],
        lease: Lease::Forever,
        labels: Vec::new(),
    }
}

/// Writes an `Order` with `key` through `conn`, asking again until its node serves the
/// key's shard (its first leaders may still be being elected).
async fn write_once_served(conn: &Arc<space_client::Connection>, key: &Key) {
    use space_client::wire::Response;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(
        conn.call(write_order(key.clone())).await,
        Ok(Response::Receipts(_))
    ) {
        assert!(
            Instant::now() < deadline,
            "the node never served the key {key:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A request retried with its id while its first run, dropped before it answered, is
/// not committed yet (its leader is cut off from its peers): the retry must not be
/// answered from the leader's uncommitted state. It waits for the commit like the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_not_answered_before_its_first_run_is_committed() {
    use space_client::wire::{RequestId, Response};
    use space_client::{ClientConfig, Connection};
    let _alone = ONE_AT_A_TIME.lock().await;
    let chaos = Chaos::start(3, None, None).await;
    let conn = Connection::open(&chaos.addrs[0], ClientConfig::default())
        .await
        .unwrap();
    let [warm, key] = keys_led_by(&conn, &chaos.addrs[0]).await;
    write_once_served(&conn, &warm).await;
    // Cut off from its peers, the first node cannot commit; the first run is dropped.
    chaos.partition(&[0]);
    let id = RequestId::new();
    let first = tokio::time::timeout(
        Duration::from_millis(500),
        conn.call_with_id(id, write_order(key.clone())),
    )
    .await;
    // Not answered, or answered that nothing was done (the shard's leadership moved or
    // ended here just then): never acknowledged.
    assert!(
        !matches!(first, Ok(Ok(Response::Receipts(_)))),
        "a write was acknowledged without its peers: {first:?}"
    );
    if let Ok(answer) = &first {
        eprintln!("the first run was answered at once: {answer:?}");
    }
    let retry = tokio::time::timeout(
        Duration::from_secs(2),
        conn.call_with_id(id, write_order(key)),
    )
    .await;
    assert!(
        !matches!(retry, Ok(Ok(Response::Receipts(_)))),
        "the retry was acknowledged before its write was committed: {retry:?}"
    );
    chaos.heal();
}

/// A node cut off from its peers for several election timeouts, then back: the shards
/// the others lead keep their leaders and terms. (A member that campaigned alone while
/// cut off would come back with a higher term and depose every leader it follows; with
/// pre-vote it asks first, is refused while the leaders are heard from, and its term
/// stays.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_and_back_deposes_no_leader() {
    use space_client::wire::{Request, Response, ShardInfo, Topology};
    use space_client::{ClientConfig, Connection};
    let _alone = ONE_AT_A_TIME.lock().await;
    let chaos = Chaos::start(3, None, None).await;
    let conn = Connection::open(&chaos.addrs[0], ClientConfig::default())
        .await
        .unwrap();
    let shards = async || match conn.call(Request::Shards).await {
        Ok(Response::Shards(shards)) => shards,
        other => panic!("the first node did not list its shards: {other:?}"),
    };
    let Ok(Response::Topology(Topology { nodes, .. })) = conn.call(Request::Topology).await else {
        panic!("the first node gave no topology");
    };
    let cut_off = nodes
        .iter()
        .find(|n| n.address == chaos.addrs[2])
        .expect("the third node is a member")
        .node;
    // Every shard led, and the same leaders for a second (the first elections are over).
    let deadline = Instant::now() + Duration::from_secs(30);
    let before: Vec<ShardInfo> = loop {
        let first = shards().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let again = shards().await;
        if first.iter().all(|s| s.leader.is_some()) && first == again {
            break again;
        }
        assert!(
            Instant::now() < deadline,
            "the shards never settled: {again:?}"
        );
    };
    let kept: Vec<&ShardInfo> = before
        .iter()
        .filter(|s| s.leader != Some(cut_off))
        .collect();
    assert!(
        !kept.is_empty(),
        "the third node leads every shard: {before:?}"
    );

    // Five times the longest election timeout alone, then back.
    chaos.partition(&[2]);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    chaos.heal();
    // Long enough for the node's messages to reach every leader many times over.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let after = shards().await;
    for was in kept {
        let now = after
            .iter()
            .find(|s| s.shard == was.shard)
            .expect("every shard is listed");
        assert_eq!(
            (now.leader, now.term),
            (was.leader, was.term),
            "shard {} changed leader or term when node {cut_off:?} came back \
             (before: {before:?}, after: {after:?})",
            was.shard
        );
    }
}

/// Reads are linearizable: a leader cut off from its replicas answers no read of a
/// change it decided but cannot commit (a dirty read), nor, once the others have
/// elected a leader who changed an entry, the entry as it was (a stale read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_answers_no_dirty_or_stale_read() {
    use space_client::wire::{Request, Response, Target};
    use space_client::{ClientConfig, Connection};
    let _alone = ONE_AT_A_TIME.lock().await;
    let chaos = Chaos::start(3, None, None).await;
    let open = async |addr: &str| {
        Connection::open(addr, ClientConfig::default())
            .await
            .unwrap()
    };
    let (cut, writer) = (open(&chaos.addrs[0]).await, open(&chaos.addrs[0]).await);
    // Two shards the first node leads: one for the entry the others will take, one for
    // the write that will not commit.
    let [kept, uncommitted] = keys_led_by(&cut, &chaos.addrs[0]).await;
    write_once_served(&cut, &kept).await;
    let read = |key: &Key| Request::ReadDirect {
        target: Target::Key {
            entry_type: "Order".into(),
            key: key.clone(),
        },
        timeout: Duration::ZERO,
    };
    let found = |answer: &Result<Response, space_client::SpaceError>| {
        matches!(answer, Ok(Response::Document(Some(_))))
    };
    assert!(
        found(&cut.call(read(&kept)).await),
        "the write was not read back"
    );

    chaos.partition(&[0]);
    // Decided by the cut-off leader, never committed: no read may tell of it.
    let write = tokio::spawn({
        let uncommitted = uncommitted.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(3),
                writer.call(write_order(uncommitted)),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let dirty = tokio::spawn({
        let (cut, request) = (cut.clone(), read(&uncommitted));
        async move { cut.call(request).await }
    });

    // Meanwhile the others elect a leader for the kept entry's shard (either of them),
    // who takes it; the cut-off node is asked for it at once.
    let others = [open(&chaos.addrs[1]).await, open(&chaos.addrs[2]).await];
    let deadline = Instant::now() + Duration::from_secs(20);
    for turn in 0.. {
        let take = others[turn % 2]
            .call(Request::TakeDirect {
                target: Target::Key {
                    entry_type: "Order".into(),
                    key: kept.clone(),
                },
                max: 1,
                timeout: Duration::ZERO,
            })
            .await;
        match take {
            Ok(Response::Documents(d)) if d.len() == 1 => break,
            other => assert!(
                Instant::now() < deadline,
                "the majority never took the entry: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stale = cut.call(read(&kept)).await;
    assert!(
        !found(&stale),
        "the cut-off leader read an entry a newer leader took: {stale:?}"
    );
    // The majority acknowledges a write of a type the cut-off leader never held: asked by
    // query, the cut-off leader must not say that nothing matches.
    for turn in 0.. {
        match others[turn % 2].call(write_of("Fresh", kept.clone())).await {
            Ok(Response::Receipts(_)) => break,
            other => assert!(
                Instant::now() < deadline,
                "the majority never acknowledged the write: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let denied = cut
        .call(Request::ReadDirect {
            target: Target::Query(Query::for_type("Fresh")),
            timeout: Duration::ZERO,
        })
        .await;
    let denies = match &denied {
        Ok(Response::Document(None)) => true,
        Ok(Response::NoneInShards { searched, .. }) => !searched.is_empty(),
        _ => false,
    };
    assert!(
        !denies,
        "the cut-off leader denied a write the majority acknowledged: {denied:?}"
    );
    // Counts and listings are reads too: the cut-off leader counts and lists neither the
    // taken entry nor the uncommitted one.
    let orders = Query::for_type("Order");
    match cut.call(Request::Count(orders.clone())).await {
        Ok(Response::ShardCounts { counts, .. }) => assert_eq!(
            counts.iter().map(|(_, n)| n).sum::<u64>(),
            0,
            "the cut-off leader counted stale or uncommitted entries: {counts:?}"
        ),
        Ok(other) => panic!("a count answered {other:?}"),
        Err(_) => {}
    }
    let listed = cut
        .call(Request::Contents {
            query: orders,
            after: None,
            limit: 100,
        })
        .await;
    assert!(
        !matches!(&listed, Ok(Response::Page { documents, .. }) if !documents.is_empty()),
        "the cut-off leader listed stale or uncommitted entries: {listed:?}"
    );
    let dirty = dirty.await.unwrap();
    assert!(
        !found(&dirty),
        "a write its leader could not commit was read: {dirty:?}"
    );
    chaos.heal();
    let _ = write.await;
}
