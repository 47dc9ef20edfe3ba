//! `node`: a space node against a Redis server, both on loopback, in one run.
//!
//! - (a) 50 connections moving 128-byte entries, half writing and half taking: space
//!   write + take against Redis LPUSH + BRPOP; every write and every take counts as one op;
//! - (b) the same in batches of 16: space write_all + take_all against Redis pipelines of
//!   16 LPUSH / 16 RPOP;
//! - (c) one connection doing sequential write-then-take round trips: the latency of each
//!   pair against Redis LPUSH + RPOP.
//!
//! The node binary is the release `space-node` beside this one (built if missing); Redis is
//! `redis-server` from the system, started on a free loopback port with persistence off.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::json;
use space_client::{Query, Space};
pub use space_tests::process::{Process, start_node};

use crate::inproc::median;

/// The entry moved: 128 bytes of payload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Blob {
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}
space_core::entry!(Blob, "Blob");

pub const CONNECTIONS: usize = 50;
const BATCH: usize = 16;
pub const PAYLOAD: usize = 128;

/// Starts redis-server on a free loopback port with the given extra settings.
pub fn start_redis(extra: &[&str]) -> Result<(Process, String)> {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let dir = std::env::temp_dir().join(format!("space-bench-redis-{port}"));
    std::fs::create_dir_all(&dir)?;
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--dir", &dir.to_string_lossy()])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!(
                "redis-server is missing or does not start ({e}); install it (Debian: apt-get install redis-server) to compare with Redis"
            )
        })?;
    let process = Process(child);
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(&addr).is_err() {
        if Instant::now() > deadline {
            bail!("redis-server did not start listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((process, addr))
}

async fn redis_connection(addr: &str) -> Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://{addr}/"))?;
    Ok(client.get_multiplexed_async_connection().await?)
}

/// Runs `writers` and `takers` tasks for `duration`; returns ops (writes + takes) per second.
async fn run_for<W, T, WF, TF>(duration: Duration, writer: W, taker: T) -> Result<f64>
where
    W: Fn(usize, Arc<AtomicBool>, Arc<AtomicU64>) -> WF,
    T: Fn(usize, Arc<AtomicBool>, Arc<AtomicU64>) -> TF,
    WF: std::future::Future<Output = Result<()>> + Send + 'static,
    TF: std::future::Future<Output = Result<()>> + Send + 'static,
{
    Ok(run_sampled(duration, || (), writer, taker).await?.rate)
}

/// A measured window: operations per second, and what a sample read at its start and
/// at its end (CPU time, for one).
pub struct Window<C> {
    /// Operations per second over the window.
    pub rate: f64,
    /// Operations counted in the window.
    pub ops: u64,
    /// The sample when the window opened.
    pub start: C,
    /// The sample when it closed.
    pub end: C,
}

/// [`run_for`], reading `sample` when the measured window opens and when it closes (the
/// warm-up before it and the stopping after it are left out). Every system a bench
/// compares is measured through it, so that all are timed and sampled alike.
pub(crate) async fn run_sampled<W, T, WF, TF, C>(
    duration: Duration,
    sample: impl Fn() -> C,
    writer: W,
    taker: T,
) -> Result<Window<C>>
where
    W: Fn(usize, Arc<AtomicBool>, Arc<AtomicU64>) -> WF,
    T: Fn(usize, Arc<AtomicBool>, Arc<AtomicU64>) -> TF,
    WF: std::future::Future<Output = Result<()>> + Send + 'static,
    TF: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..CONNECTIONS / 2 {
        tasks.push(tokio::spawn(writer(i, stop.clone(), ops.clone())));
        tasks.push(tokio::spawn(taker(i, stop.clone(), ops.clone())));
    }
    // Warm up, then measure a window.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (start_ops, start, start_sample) = (ops.load(Ordering::Relaxed), Instant::now(), sample());
    tokio::time::sleep(duration).await;
    let (moved, end_sample) = (ops.load(Ordering::Relaxed) - start_ops, sample());
    let rate = moved as f64 / start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    Ok(Window {
        rate,
        ops: moved,
        start: start_sample,
        end: end_sample,
    })
}

pub async fn space_throughput(addr: &str, batch: usize, duration: Duration) -> Result<f64> {
    Ok(space_throughput_sampled(addr, batch, duration, || ())
        .await?
        .rate)
}

/// [`space_throughput`], reading `sample` when the measured window opens and closes.
pub async fn space_throughput_sampled<C>(
    addr: &str,
    batch: usize,
    duration: Duration,
    sample: impl Fn() -> C,
) -> Result<Window<C>> {
    let mut spaces = Vec::new();
    for _ in 0..CONNECTIONS {
        spaces.push(Space::connect_to(addr).await?);
    }
    let spaces = Arc::new(spaces);
    let (ws, ts) = (spaces.clone(), spaces.clone());
    let window = run_sampled(
        duration,
        sample,
        move |i, stop, ops| {
            let space = ws[i].clone();
            async move {
                let blobs = vec![
                    Blob {
                        payload: vec![7; PAYLOAD]
                    };
                    batch
                ];
                while !stop.load(Ordering::Relaxed) {
                    if batch == 1 {
                        space.write(&blobs[0]).await?;
                    } else {
                        space.write_all(&blobs).await?;
                    }
                    ops.fetch_add(batch as u64, Ordering::Relaxed);
                }
                Ok(())
            }
        },
        move |i, stop, ops| {
            let space = ts[CONNECTIONS / 2 + i].clone();
            async move {
                let q = Query::of::<Blob>();
                while !stop.load(Ordering::Relaxed) {
                    let got = if batch == 1 {
                        space
                            .take::<Blob>(&q, Duration::from_millis(100))
                            .await?
                            .map_or(0, |_| 1)
                    } else {
                        space
                            .take_all::<Blob>(&q, batch, Duration::from_millis(100))
                            .await?
                            .len()
                    };
                    ops.fetch_add(got as u64, Ordering::Relaxed);
                }
                Ok(())
            }
        },
    )
    .await?;
    // Empty the space for the next measurement.
    let space = &spaces[0];
    while !space
        .take_all::<Blob>(&Query::of::<Blob>(), 10_000, Duration::ZERO)
        .await?
        .is_empty()
    {}
    Ok(window)
}

async fn redis_throughput(addr: &str, batch: usize, duration: Duration) -> Result<f64> {
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        conns.push(redis_connection(addr).await?);
    }
    let conns = Arc::new(conns);
    let (ws, ts) = (conns.clone(), conns.clone());
    let rate = run_for(
        duration,
        move |i, stop, ops| {
            let mut con = ws[i].clone();
            async move {
                let value = vec![7u8; PAYLOAD];
                while !stop.load(Ordering::Relaxed) {
                    if batch == 1 {
                        redis::cmd("LPUSH")
                            .arg("bench")
                            .arg(&value)
                            .query_async::<()>(&mut con)
                            .await?;
                    } else {
                        let mut pipe = redis::pipe();
                        for _ in 0..batch {
                            pipe.cmd("LPUSH").arg("bench").arg(&value).ignore();
                        }
                        pipe.query_async::<()>(&mut con).await?;
                    }
                    ops.fetch_add(batch as u64, Ordering::Relaxed);
                }
                Ok(())
            }
        },
        move |i, stop, ops| {
            let mut con = ts[CONNECTIONS / 2 + i].clone();
            async move {
                while !stop.load(Ordering::Relaxed) {
                    let got = if batch == 1 {
                        let r: Option<(String, Vec<u8>)> = redis::cmd("BRPOP")
                            .arg("bench")
                            .arg(0.1)
                            .query_async(&mut con)
                            .await?;
                        usize::from(r.is_some())
                    } else {
                        let mut pipe = redis::pipe();
                        for _ in 0..batch {
                            pipe.cmd("RPOP").arg("bench");
                        }
                        let r: Vec<Option<Vec<u8>>> = pipe.query_async(&mut con).await?;
                        let n = r.iter().filter(|x| x.is_some()).count();
                        if n == 0 {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        n
                    };
                    ops.fetch_add(got as u64, Ordering::Relaxed);
                }
                Ok(())
            }
        },
    )
    .await?;
    let mut con = conns[0].clone();
    redis::cmd("DEL")
        .arg("bench")
        .query_async::<()>(&mut con)
        .await?;
    Ok(rate)
}

async fn space_rtt(addr: &str, n: usize) -> Result<Histogram<u64>> {
    let space = Space::connect_to(addr).await?;
    let q = Query::of::<Blob>();
    let blob = Blob {
        payload: vec![7; PAYLOAD],
    };
    let mut h = Histogram::new(3)?;
    for i in 0..n + 200 {
        let start = Instant::now();
        space.write(&blob).await?;
        space
            .take::<Blob>(&q, Duration::ZERO)
            .await?
            .context("a written entry was not there to take")?;
        if i >= 200 {
            h.record(start.elapsed().as_nanos() as u64)?;
        }
    }
    Ok(h)
}

async fn redis_rtt(addr: &str, n: usize) -> Result<Histogram<u64>> {
    let mut con = redis_connection(addr).await?;
    let value = vec![7u8; PAYLOAD];
    let mut h = Histogram::new(3)?;
    for i in 0..n + 200 {
        let start = Instant::now();
        redis::cmd("LPUSH")
            .arg("rtt")
            .arg(&value)
            .query_async::<()>(&mut con)
            .await?;
        let v: Option<Vec<u8>> = redis::cmd("RPOP").arg("rtt").query_async(&mut con).await?;
        v.context("a pushed value was not there to pop")?;
        if i >= 200 {
            h.record(start.elapsed().as_nanos() as u64)?;
        }
    }
    Ok(h)
}

trait ConnectTo {
    async fn connect_to(addr: &str) -> Result<Space>;
}

impl ConnectTo for Space {
    async fn connect_to(addr: &str) -> Result<Space> {
        Ok(space_client::connect(addr).await?)
    }
}

/// Runs `measure` (operations per second over `duration`) and returns its figure with the
/// CPU time `server` spent per operation meanwhile, in microseconds (connecting included).
pub async fn with_cpu(
    server: &Process,
    duration: Duration,
    measure: impl std::future::Future<Output = Result<f64>>,
) -> Result<(f64, f64)> {
    let before = server.cpu_seconds();
    let ops_per_s = measure.await?;
    let cpu = server.cpu_seconds() - before;
    let ops = ops_per_s * duration.as_secs_f64();
    Ok((ops_per_s, cpu * 1e6 / ops.max(1.0)))
}

/// What keeping metrics costs: the node with metrics (`on`) and the same without
/// (`off`), measured in turns of half the duration (on, off, off, on, on, off) so that the
/// machine's drift weighs on both alike. Returns the throughput with and without, and the
/// CPU per operation without.
async fn metrics_cost(
    on: (&Process, &str),
    off: (&Process, &str),
    duration: Duration,
) -> Result<[f64; 3]> {
    let slice = duration / 2;
    // Operations, and CPU microseconds, of each node (0: on, 1: off).
    let mut done = [(0.0f64, 0.0f64); 2];
    for first_on in [true, false, true] {
        for metered in [first_on, !first_on] {
            let (process, addr) = if metered { on } else { off };
            let (rate, cpu_per_op) =
                with_cpu(process, slice, space_throughput(addr, 1, slice)).await?;
            let ops = rate * slice.as_secs_f64();
            let k = usize::from(!metered);
            done[k].0 += ops;
            done[k].1 += cpu_per_op * ops;
        }
    }
    let seconds = slice.as_secs_f64() * 3.0;
    Ok([
        done[0].0 / seconds,
        done[1].0 / seconds,
        done[1].1 / done[1].0.max(1.0),
    ])
}

pub fn us(h: &Histogram<u64>, q: f64) -> f64 {
    (h.value_at_quantile(q) as f64 / 100.0).round() / 10.0
}

pub fn run(runs: usize, seconds: u64, rtt_samples: usize) -> Result<()> {
    let threads = std::env::var("SPACE_BENCH_NODE_THREADS").unwrap_or_default();
    let node_args: Vec<&str> = if threads.is_empty() {
        vec![]
    } else {
        vec!["--threads", &threads]
    };
    let (node, node_addr) = start_node(&node_args)?;
    // What keeping metrics costs: two more nodes that serve only that comparison, in
    // turns, so that they have the same history (a node that served the measurements
    // above is slower than a fresh one): one as nodes run by default (metrics kept, admin
    // endpoints served), one with `--admin-listen off`.
    let (metered_node, metered_addr) = start_node(&node_args)?;
    let unmetered_args: Vec<&str> = node_args
        .iter()
        .copied()
        .chain(["--admin-listen", "off"])
        .collect();
    let (unmetered_node, unmetered_addr) = start_node(&unmetered_args)?;
    let (redis_server, redis_addr) = start_redis(&[])?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let duration = Duration::from_secs(seconds);
    let mut rows: Vec<[f64; 13]> = Vec::new();
    for run in 1..=runs {
        let row = runtime.block_on(async {
            let (space, space_cpu) =
                with_cpu(&node, duration, space_throughput(&node_addr, 1, duration)).await?;
            let (redis, redis_cpu) = with_cpu(
                &redis_server,
                duration,
                redis_throughput(&redis_addr, 1, duration),
            )
            .await?;
            let space_batch = space_throughput(&node_addr, BATCH, duration).await?;
            let redis_batch = redis_throughput(&redis_addr, BATCH, duration).await?;
            let [metered, unmetered, unmetered_cpu] = metrics_cost(
                (&metered_node, &metered_addr),
                (&unmetered_node, &unmetered_addr),
                duration,
            )
            .await?;
            let s = space_rtt(&node_addr, rtt_samples).await?;
            let r = redis_rtt(&redis_addr, rtt_samples).await?;
            anyhow::Ok([
                space,
                redis,
                space_batch,
                redis_batch,
                us(&s, 0.5),
                us(&s, 0.99),
                us(&r, 0.5),
                us(&r, 0.99),
                space_cpu,
                redis_cpu,
                unmetered,
                unmetered_cpu,
                metered,
            ])
        })?;
        println!(
            "run {run}: space {:.0} ops/s vs redis {:.0} ({:.2}), server CPU {:.1} vs {:.1} us/op | batches of {BATCH}: space {:.0} vs redis {:.0} ({:.2}) | rtt p50/p99 space {}/{} us, redis {}/{} us | metrics on/off in turns {:.0}/{:.0} ops/s ({:.3}), CPU off {:.1} us/op",
            row[0],
            row[1],
            row[0] / row[1],
            row[8],
            row[9],
            row[2],
            row[3],
            row[2] / row[3],
            row[4],
            row[5],
            row[6],
            row[7],
            row[12],
            row[10],
            row[12] / row[10],
            row[11]
        );
        rows.push(row);
    }
    let col = |i: usize| median(rows.iter().map(|r| r[i]).collect());
    let ratio = |a: usize, b: usize| median(rows.iter().map(|r| r[a] / r[b]).collect());
    println!(
        "{}",
        json!({
            "workload": "node",
            "connections": CONNECTIONS,
            "entry_bytes": PAYLOAD,
            "batch": BATCH,
            "runs": runs,
            "seconds_per_measurement": seconds,
            "space_ops_per_s": col(0).round(),
            "redis_ops_per_s": col(1).round(),
            "ratio": (ratio(0, 1) * 1000.0).round() / 1000.0,
            "space_cpu_us_per_op": (col(8) * 10.0).round() / 10.0,
            "redis_cpu_us_per_op": (col(9) * 10.0).round() / 10.0,
            "batch_space_ops_per_s": col(2).round(),
            "batch_redis_ops_per_s": col(3).round(),
            "batch_ratio": (ratio(2, 3) * 1000.0).round() / 1000.0,
            "rtt_p50_us": col(4),
            "rtt_p99_us": col(5),
            "redis_rtt_p50_us": col(6),
            "redis_rtt_p99_us": col(7),
            "metrics_off_ops_per_s": col(10).round(),
            "metrics_on_ops_per_s": col(12).round(),
            "metrics_ratio": (ratio(12, 10) * 1000.0).round() / 1000.0,
            "metrics_off_cpu_us_per_op": (col(11) * 10.0).round() / 10.0,
        })
    );
    Ok(())
}

/// Writes `entries` blobs into a durable in-process space at `dir` in batches, closes it,
/// and times reopening (recovery). Returns (entries recovered, seconds).
fn recovery_time(dir: &std::path::Path, entries: usize) -> Result<(u64, f64)> {
    let _ = std::fs::remove_dir_all(dir);
    {
        let space = Space::open(dir)?.blocking();
        let batch: Vec<Blob> = (0..1000)
            .map(|_| Blob {
                payload: vec![7; PAYLOAD],
            })
            .collect();
        for _ in 0..entries / batch.len() {
            space.write_all(&batch)?;
        }
    }
    let start = Instant::now();
    let engine = space_core::server::Engine::open(dir, space_core::EngineConfig::default())?;
    let took = start.elapsed().as_secs_f64();
    let n = engine.stats().entries;
    drop(engine);
    let _ = std::fs::remove_dir_all(dir);
    Ok((n, took))
}

/// `durable`: a durable node (every change fsynced before it is acknowledged) against Redis
/// with `appendonly yes` and `appendfsync always`, the 50-connection write + take workload;
/// and how long recovering a million entries takes.
pub fn run_durable(runs: usize, seconds: u64, recovery_entries: usize) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("space-bench-durable-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let node_dir = dir.join("node");
    let (node, node_addr) = start_node(&["--data-dir", &node_dir.to_string_lossy()])?;
    let (redis_server, redis_addr) =
        start_redis(&["--appendonly", "yes", "--appendfsync", "always"])?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let duration = Duration::from_secs(seconds);
    let mut rows = Vec::new();
    for run in 1..=runs {
        let row = runtime.block_on(async {
            let (space, space_cpu) =
                with_cpu(&node, duration, space_throughput(&node_addr, 1, duration)).await?;
            let (redis, redis_cpu) = with_cpu(
                &redis_server,
                duration,
                redis_throughput(&redis_addr, 1, duration),
            )
            .await?;
            anyhow::Ok((space, redis, space_cpu, redis_cpu))
        })?;
        println!(
            "run {run}: durable space {:.0} ops/s vs redis (fsync always) {:.0} ({:.2}), server CPU {:.1} vs {:.1} us/op",
            row.0,
            row.1,
            row.0 / row.1,
            row.2,
            row.3
        );
        rows.push(row);
    }
    let (n, took) = recovery_time(&dir.join("recovery"), recovery_entries)?;
    let per_million = took / (n.max(1) as f64 / 1_000_000.0);
    println!("recovered {n} entries in {took:.2}s ({per_million:.2}s per million)");
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{}",
        json!({
            "workload": "durable",
            "connections": CONNECTIONS,
            "entry_bytes": PAYLOAD,
            "runs": runs,
            "space_ops_per_s": median(rows.iter().map(|r| r.0).collect()).round(),
            "redis_ops_per_s": median(rows.iter().map(|r| r.1).collect()).round(),
            "ratio": (median(rows.iter().map(|r| r.0 / r.1).collect()) * 1000.0).round() / 1000.0,
            "space_cpu_us_per_op": (median(rows.iter().map(|r| r.2).collect()) * 10.0).round() / 10.0,
            "redis_cpu_us_per_op": (median(rows.iter().map(|r| r.3).collect()) * 10.0).round() / 10.0,
            "recovered_entries": n,
            "recovery_s": (took * 1000.0).round() / 1000.0,
            "recovery_s_per_million_entries": (per_million * 1000.0).round() / 1000.0,
        })
    );
    Ok(())
}
