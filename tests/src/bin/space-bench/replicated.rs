//! `replicated`: a replicated cluster of three durable nodes (replication factor 3)
//! against the same cluster at replication factor 1 and a NATS JetStream work queue
//! replicated three times, in one run; then the failover time of its shards.
//!
//! - Throughput: 50 connections moving 128-byte entries, half writing (keyless writes)
//!   and half taking by query; every acknowledged write and every take is one op. The
//!   JetStream side: three `nats-server` processes on loopback in one cluster, a
//!   WorkQueue stream with file storage and 3 replicas; 25 connections publish and wait
//!   for each publish's ack, 25 fetch one message and acknowledge it (`double_ack`, the
//!   ack the server confirms); every acknowledged publish and every acknowledged fetch is
//!   one op.
//! - Failover: an entry is written to a shard led by one node; that node is killed
//!   (SIGKILL) and the time until a take of the entry succeeds (through the client,
//!   which follows the shard's new leader) is recorded; the node restarts from its data
//!   directory before the next kill. The nodes take turns as victims.
//!
//! Three nodes and the bench client share the machine; each member runs
//! [`MEMBER_THREADS`] worker thread, as in the `cluster` workload. Each system is started
//! fresh for its measurement and stopped after it, so none runs beside another, and
//! after the kernel wrote out what the one before left for it to write.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::json;
use space_client::wire::{Request, Response};
use space_client::{ClientConfig, Connection, Key};

use crate::inproc::median;
use crate::node::{CONNECTIONS, PAYLOAD, Process, Window, run_sampled, space_throughput_sampled};
use space_tests::process::{cpu_seconds_of, free_addrs, start_node_at};

/// Nodes of each cluster.
pub(crate) const NODES: usize = 3;
/// Worker threads of each node (`space-node --threads`).
const MEMBER_THREADS: &str = "1";

/// An entry with a user key, so a failover probe can aim at one shard.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Probe {
    id: String,
}
space_core::entry!(Probe, "Probe", key = id);

/// A directory removed when dropped.
pub(crate) struct Scratch(pub(crate) PathBuf);

impl Scratch {
    /// A fresh directory named after `name`, this process and a count of those made.
    pub(crate) fn new(name: &str) -> Result<Scratch> {
        static MADE: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "space-bench-{name}-{}-{}",
            std::process::id(),
            MADE.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A replicated cluster of real nodes, each on its own data directory.
pub(crate) struct Cluster {
    shards: u32,
    addrs: Vec<String>,
    dirs: Vec<PathBuf>,
    nodes: Vec<Option<Process>>,
    _scratch: Scratch,
}

impl Cluster {
    /// A cluster of `NODES` durable nodes at `replication` in `shards` shards.
    pub(crate) fn start(replication: usize, shards: u32) -> Result<Cluster> {
        let scratch = Scratch::new(&format!("rf{replication}"))?;
        let addrs = free_addrs(NODES)?;
        let dirs = (0..NODES)
            .map(|i| scratch.0.join(format!("node-{i}")))
            .collect();
        let mut cluster = Cluster {
            shards,
            addrs,
            dirs,
            nodes: (0..NODES).map(|_| None).collect(),
            _scratch: scratch,
        };
        for i in 0..NODES {
            cluster.start_node(i, Some(replication))?;
        }
        Ok(cluster)
    }

    /// Starts node `i` (creating the cluster when `replication` is given, else
    /// restarting from its directory).
    fn start_node(&mut self, i: usize, replication: Option<usize>) -> Result<()> {
        let dir = self.dirs[i].to_string_lossy().into_owned();
        let cluster = self.addrs.join(",");
        let mut args = vec!["--data-dir", &dir, "--threads", MEMBER_THREADS];
        let replication = replication.map(|r| r.to_string());
        let shards = self.shards.to_string();
        if let Some(r) = &replication {
            args.extend([
                "--initial-cluster",
                &cluster,
                "--replication",
                r,
                "--shards",
                &shards,
            ]);
        }
        let (process, _) = start_node_at(&self.addrs[i], &args)?;
        self.nodes[i] = Some(process);
        Ok(())
    }

    /// The nodes' addresses, comma separated (client seeds).
    pub(crate) fn seeds(&self) -> String {
        self.addrs.join(",")
    }

    fn cpu_seconds(&self) -> f64 {
        self.nodes.iter().flatten().map(Process::cpu_seconds).sum()
    }
}

/// Waits until a write and a take through `seeds` succeed (every node up, leaders
/// elected).
pub(crate) async fn ready(seeds: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = async {
            let space = space_client::connect(seeds).await?;
            for i in 0..64 {
                let probe = Probe {
                    id: format!("ready-{i}"),
                };
                space.write(&probe).await?;
                space
                    .take_key::<Probe>(&Key::Name(probe.id.clone()))
                    .await?
                    .context("a probe just written was not there")?;
            }
            anyhow::Ok(())
        };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.context("the cluster did not become ready")),
        }
    }
}

/// One system's measurement.
#[derive(Clone, Copy)]
struct Measured {
    /// Operations per second.
    rate: f64,
    /// The servers' CPU microseconds per operation.
    server_us: f64,
    /// This process's (the clients') CPU microseconds per operation.
    client_us: f64,
}

impl Measured {
    /// The measurement of a window sampled with `(servers' CPU seconds, clients' CPU
    /// seconds)`.
    fn of(window: &Window<(f64, f64)>) -> Measured {
        let per_op = 1e6 / (window.ops.max(1) as f64);
        Measured {
            rate: window.rate,
            server_us: (window.end.0 - window.start.0) * per_op,
            client_us: (window.end.1 - window.start.1) * per_op,
        }
    }
}

/// CPU seconds this process (the bench's clients) has used so far.
fn client_cpu_seconds() -> f64 {
    cpu_seconds_of(std::process::id())
}

/// Writes out whatever the systems measured before left for the kernel to write
/// (JetStream's file store syncs on a timer, so a measurement of it leaves megabytes
/// unwritten), so that its writeback does not land in the next system's measurement,
/// whose `fdatasync`s would queue behind it.
fn settle_disk() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Space throughput through `cluster`, its nodes' and its clients' CPU per op, over the
/// measured window only (as JetStream's).
async fn measure_space(cluster: &Cluster, duration: Duration) -> Result<Measured> {
    let cpu = || (cluster.cpu_seconds(), client_cpu_seconds());
    let window = space_throughput_sampled(&cluster.seeds(), 1, duration, cpu).await?;
    Ok(Measured::of(&window))
}

/// Three `nats-server` processes in one cluster, JetStream on, each on its own store.
struct Nats {
    processes: Vec<Process>,
    client_urls: Vec<String>,
    _scratch: Scratch,
}

impl Nats {
    /// Starts the three servers, again on other ports (a few times) when one of them
    /// never listens: a port found free may be taken before its server binds it (by
    /// another process's outgoing connection, for one).
    fn start() -> Result<Nats> {
        let mut tries = 0;
        loop {
            match Nats::start_once() {
                Err(e) if tries < 2 && e.to_string().starts_with(NOT_LISTENING) => {
                    tries += 1;
                    eprintln!("{e}: starting NATS again on other ports");
                }
                started => return started,
            }
        }
    }

    fn start_once() -> Result<Nats> {
        let scratch = Scratch::new("nats")?;
        let client = free_addrs(NODES)?;
        let routes = free_addrs(NODES)?;
        let route_list = routes
            .iter()
            .map(|r| format!("nats://{r}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut processes = Vec::new();
        for i in 0..NODES {
            let (_, port) = client[i].rsplit_once(':').context("an address")?;
            let dir = scratch.0.join(format!("js-{i}"));
            let child = Command::new("nats-server")
                .args(["-a", "127.0.0.1", "-p", port, "-js", "-sd"])
                .arg(&dir)
                .args(["-n", &format!("n{i}"), "--cluster_name", "bench"])
                .args(["--cluster", &format!("nats://{}", routes[i])])
                .args(["--routes", &route_list])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| {
                    anyhow::anyhow!(
                        "nats-server is missing or does not start ({e}); install it (Debian: apt-get install nats-server) to compare with NATS JetStream"
                    )
                })?;
            processes.push(Process(child));
        }
        for addr in &client {
            wait_listening(addr)?;
        }
        Ok(Nats {
            processes,
            client_urls: client.iter().map(|a| format!("nats://{a}")).collect(),
            _scratch: scratch,
        })
    }

    fn cpu_seconds(&self) -> f64 {
        self.processes.iter().map(Process::cpu_seconds).sum()
    }
}

/// How [`wait_listening`]'s error starts.
const NOT_LISTENING: &str = "nothing listens on";

fn wait_listening(addr: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("{NOT_LISTENING} {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

const STREAM: &str = "JOBS";
const SUBJECT: &str = "jobs";
const CONSUMER: &str = "workers";

/// The work queue's pull consumer, creating the stream and consumer if missing (retried
/// while the cluster elects its meta leader).
async fn work_queue(
    js: &async_nats::jetstream::Context,
) -> Result<async_nats::jetstream::consumer::PullConsumer> {
    use async_nats::jetstream::{consumer, stream};
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = async {
            let stream = js
                .get_or_create_stream(stream::Config {
                    name: STREAM.into(),
                    subjects: vec![SUBJECT.into()],
                    retention: stream::RetentionPolicy::WorkQueue,
                    storage: stream::StorageType::File,
                    num_replicas: NODES,
                    ..Default::default()
                })
                .await?;
            let consumer = stream
                .get_or_create_consumer(
                    CONSUMER,
                    consumer::pull::Config {
                        durable_name: Some(CONSUMER.into()),
                        ack_policy: consumer::AckPolicy::Explicit,
                        ..Default::default()
                    },
                )
                .await?;
            anyhow::Ok(consumer)
        };
        match attempt.await {
            Ok(c) => return Ok(c),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.context("the JetStream work queue could not be created")),
        }
    }
}

/// JetStream R3 work-queue throughput (acknowledged publishes + acknowledged fetches per
/// second), the servers' and the clients' CPU per op.
async fn measure_jetstream(nats: &Nats, duration: Duration) -> Result<Measured> {
    let mut contexts = Vec::new();
    for i in 0..CONNECTIONS {
        let url = &nats.client_urls[i % nats.client_urls.len()];
        let client = async_nats::connect(url.as_str()).await?;
        contexts.push(async_nats::jetstream::new(client));
    }
    drop(work_queue(&contexts[0]).await?);
    let contexts = Arc::new(contexts);
    let (publishers, fetchers) = (contexts.clone(), contexts);
    let cpu = || (nats.cpu_seconds(), client_cpu_seconds());
    let window = run_sampled(
        duration,
        cpu,
        // Connection 2i publishes, 2i + 1 fetches.
        move |i, stop, ops| {
            let js = publishers[2 * i].clone();
            async move {
                let payload = vec![7u8; PAYLOAD];
                while !stop.load(Ordering::Relaxed) {
                    js.publish(SUBJECT, payload.clone().into()).await?.await?;
                    ops.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            }
        },
        move |i, stop, ops| {
            let js = fetchers[2 * i + 1].clone();
            async move {
                let consumer: async_nats::jetstream::consumer::PullConsumer =
                    js.get_consumer_from_stream(CONSUMER, STREAM).await?;
                while !stop.load(Ordering::Relaxed) {
                    let mut batch = consumer
                        .fetch()
                        .max_messages(1)
                        .expires(Duration::from_millis(100))
                        .messages()
                        .await?;
                    while let Some(message) = batch.next().await {
                        message
                            .map_err(|e| anyhow::anyhow!(e))?
                            .double_ack()
                            .await
                            .map_err(|e| anyhow::anyhow!(e))?;
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                }
                anyhow::Ok(())
            }
        },
    )
    .await?;
    Ok(Measured::of(&window))
}

/// The node that leads the shard of `key`, as `seeds`' topology says.
async fn leader_of(seeds: &str, key: &Key) -> Result<usize> {
    let first = seeds.split(',').next().context("no seed")?;
    let conn = Connection::open(first, ClientConfig::default()).await?;
    let Response::Topology(topology) = conn.call(Request::Topology).await? else {
        bail!("a topology was asked for");
    };
    let owner = topology.owner_of(key).context("no owner")?;
    seeds
        .split(',')
        .position(|a| a == owner.address)
        .context("the owner is not a member")
}

/// The longest one step of a failover may take (each is bounded by its own deadlines,
/// well within this).
const STEP_LIMIT: Duration = Duration::from_secs(90);

/// `fut`, or an error naming `what` once it has run [`STEP_LIMIT`]: a step that outlives
/// its own deadlines ends the bench saying where it stuck, not in silence.
async fn step<T, E: Into<anyhow::Error>>(
    what: impl std::fmt::Display,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(STEP_LIMIT, fut).await {
        Ok(done) => done.map_err(Into::into),
        Err(_) => bail!("{what} did not finish within {STEP_LIMIT:?}"),
    }
}

/// Kills the leader of a probe's shard `kills` times and records the
/// time from each kill to the first successful take of the probe.
async fn failovers(cluster: &mut Cluster, kills: usize) -> Result<Histogram<u64>> {
    let mut h = Histogram::new(3)?;
    let seeds = cluster.seeds();
    for k in 0..kills {
        step(
            format_args!("kill {k}: the cluster's readiness"),
            ready(&seeds),
        )
        .await?;
        // The leader of this probe's shard is the victim (leadership does not move back
        // to a restarted node, so victims are whoever leads now).
        let id = format!("failover-{k}");
        let key = Key::Name(id.clone());
        let victim = step(
            format_args!("kill {k}: asking the leader"),
            leader_of(&seeds, &key),
        )
        .await?;
        let space = step(
            format_args!("kill {k}: connecting"),
            space_client::connect(&seeds),
        )
        .await?;
        step(
            format_args!("kill {k}: writing the probe"),
            space.write(&Probe { id }),
        )
        .await?;
        if let Some(node) = cluster.nodes[victim].take() {
            drop(node); // SIGKILL and reaped
        }
        let killed = Instant::now();
        loop {
            let taken = tokio::time::timeout(STEP_LIMIT, space.take_key::<Probe>(&key))
                .await
                .with_context(|| {
                    format!("kill {k}: a take did not finish within {STEP_LIMIT:?}")
                })?;
            match taken {
                Ok(Some(_)) => break,
                Ok(None) => bail!("the probe written before the kill is gone"),
                Err(_) if killed.elapsed() < Duration::from_secs(60) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => return Err(anyhow::Error::new(e).context("no failover within 60 s")),
            }
        }
        h.record(killed.elapsed().as_micros() as u64)?;
        cluster.start_node(victim, None)?;
        // Let the restarted node rejoin its groups before the next kill.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(h)
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    (h.value_at_quantile(q) as f64 / 100.0).round() / 10.0
}

/// Measurements of one system that may fail before one succeeds: a call of either
/// system's client that times out once (seen of JetStream's fetches) must not end the
/// bench.
const MEASURE_TRIES: usize = 3;

/// `measure`, made again (up to [`MEASURE_TRIES`] in all) when it fails, saying so on the
/// bench's output and counting it in `repeated`.
fn measured(
    what: &str,
    run: usize,
    repeated: &mut usize,
    measure: impl Fn() -> Result<Measured>,
) -> Result<Measured> {
    let mut tries = 1;
    loop {
        match measure() {
            Ok(m) => return Ok(m),
            Err(e) if tries < MEASURE_TRIES => {
                println!("run {run}: the {what} measurement failed ({e:#}); measuring it again");
                tries += 1;
                *repeated += 1;
            }
            Err(e) => return Err(e.context(format!("run {run}: the {what} measurement"))),
        }
    }
}

/// Runs the replicated workload and prints the medians as JSON.
pub fn run(runs: usize, seconds: u64, kills: usize, shards: u32) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let duration = Duration::from_secs(seconds);
    // Each system runs alone while it is measured: an idle cluster's timers (64 groups
    // tick many times a second) would otherwise take cores from the one measured.
    let space = |replication: usize| -> Result<Measured> {
        settle_disk();
        let cluster = Cluster::start(replication, shards)?;
        runtime.block_on(async {
            ready(&cluster.seeds()).await?;
            measure_space(&cluster, duration).await
        })
    };
    let jetstream = || -> Result<Measured> {
        settle_disk();
        let nats = Nats::start()?;
        runtime.block_on(async {
            let js = async_nats::jetstream::new(
                async_nats::connect(nats.client_urls[0].as_str()).await?,
            );
            work_queue(&js).await?;
            measure_jetstream(&nats, duration).await
        })
    };
    let mut rows: Vec<[f64; 8]> = Vec::new();
    let mut repeated = 0;
    for run in 1..=runs {
        let r3 = measured("rf3", run, &mut repeated, || space(3))?;
        let r1 = measured("rf1", run, &mut repeated, || space(1))?;
        let js = measured("JetStream R3", run, &mut repeated, jetstream)?;
        let row = [
            r3.rate,
            r1.rate,
            js.rate,
            r3.server_us,
            r1.server_us,
            js.server_us,
            r3.client_us,
            js.client_us,
        ];
        println!(
            "run {run}: rf3 {:.0} ops/s, rf1 {:.0}, JetStream R3 {:.0} (ratio {:.2}) | server CPU us/op rf3 {:.1}, rf1 {:.1}, JetStream {:.1} | client CPU us/op rf3 {:.1}, JetStream {:.1}",
            row[0],
            row[1],
            row[2],
            row[0] / row[2],
            row[3],
            row[4],
            row[5],
            row[6],
            row[7]
        );
        rows.push(row);
    }
    settle_disk();
    let mut rf3 = Cluster::start(3, shards)?;
    let failover = runtime.block_on(failovers(&mut rf3, kills))?;
    println!(
        "failover over {kills} kills: p50 {} ms, p99 {} ms, max {} ms",
        ms(&failover, 0.5),
        ms(&failover, 0.99),
        ms(&failover, 1.0)
    );
    let col = |i: usize| (median(rows.iter().map(|r| r[i]).collect()) * 10.0).round() / 10.0;
    println!(
        "{}",
        json!({
            "workload": "replicated",
            "nodes": NODES,
            "shards": shards,
            "member_threads": MEMBER_THREADS.parse::<u32>()?,
            "connections": CONNECTIONS,
            "entry_bytes": PAYLOAD,
            "runs": runs,
            "seconds_per_measurement": seconds,
            "ops_per_s": col(0).round(),
            "rf1_ops_per_s": col(1).round(),
            "jetstream_r3_ops_per_s": col(2).round(),
            "ratio_vs_jetstream": (median(rows.iter().map(|r| r[0] / r[2]).collect()) * 1000.0).round() / 1000.0,
            "space_cpu_us_per_op": col(3),
            "rf1_cpu_us_per_op": col(4),
            "jetstream_cpu_us_per_op": col(5),
            "space_client_cpu_us_per_op": col(6),
            "jetstream_client_cpu_us_per_op": col(7),
            "measurements_repeated": repeated,
            "failover_kills": kills,
            "failover_p50_ms": ms(&failover, 0.5),
            "failover_p99_ms": ms(&failover, 0.99),
            "failover_max_ms": ms(&failover, 1.0),
        })
    );
    Ok(())
}
