//! `space-bench`: measures the space against a peer in the same process and the same run,
//! and prints one JSON object as its last line (docs/ARCHITECTURE.md section 10).
//!
//! ```text
//! cargo run --release -p space-tests --bin space-bench -- inproc [--entries N] [--runs R]
//! cargo run --release -p space-tests --bin space-bench -- notify [--sizes 1000,10000,100000]
//! cargo run --release -p space-tests --bin space-bench -- node [--runs R] [--seconds S]
//! cargo run --release -p space-tests --bin space-bench -- durable [--runs R] [--seconds S]
//! cargo run --release -p space-tests --bin space-bench -- cluster [--runs R] [--seconds S]
//! cargo run --release -p space-tests --bin space-bench -- hostile [--runs R] [--seconds S]
//! cargo run --release -p space-tests --bin space-bench -- replicated [--runs R] [--kills K] [--shards S]
//! ```

mod cluster;
mod hostile;
mod inproc;
mod node;
mod notify;
mod replicated;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// The bench's allocator: the same as the nodes' (see `space-node`'s), for every
/// client in this process alike, the space's and each peer's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Measures the space against a peer in the same run; the last line is JSON.")]
struct Cli {
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Subcommand)]
enum Workload {
    /// The in-process space vs crossbeam-channel: 2 producers and 2 consumers.
    Inproc {
        /// Entries moved per run.
        #[arg(long, default_value_t = 1_000_000)]
        entries: u64,
        /// Runs per measurement; medians are reported.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Wake-up samples per run.
        #[arg(long, default_value_t = 2_000)]
        wakeups: u64,
    },
    /// Notify at scale: writes matched against S subscriptions of mixed shapes, vs the
    /// naive way (a one-document tantivy index per write, every subscription run on it).
    Notify {
        /// Subscription counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
        sizes: Vec<u64>,
        /// Writes per size.
        #[arg(long, default_value_t = 100_000)]
        writes: u64,
        /// Runs per size; medians are reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// A space node against Redis on loopback: 50 connections writing and taking, batches
    /// of 16 against pipelines of 16, and single round-trip latency; and the same node
    /// with its metrics off (`--admin-listen off`), for what keeping them costs.
    Node {
        /// Runs; medians are reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Seconds per throughput measurement.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        /// Round trips per latency measurement.
        #[arg(long, default_value_t = 10_000)]
        rtt_samples: usize,
    },
    /// A durable node against Redis with appendfsync always (50 connections writing and
    /// taking), and the time to recover a million entries.
    Durable {
        /// Runs; medians are reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Seconds per throughput measurement.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        /// Entries written before the recovery is timed.
        #[arg(long, default_value_t = 1_000_000)]
        recovery_entries: usize,
    },
    /// Three durable nodes keeping one copy of each range (replication 1) against one
    /// durable node: 50 connections writing and taking through the cluster-aware client,
    /// and the wake-up latency of a blocking take.
    Cluster {
        /// Runs (alternating which configuration goes first); medians are reported.
        #[arg(long, default_value_t = 6)]
        runs: usize,
        /// Seconds per throughput measurement.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        /// Wake-ups per latency measurement.
        #[arg(long, default_value_t = 2_000)]
        wakeup_samples: usize,
    },
    /// A replicated cluster (3 durable nodes, replication 3) against the same at
    /// replication 1 and a NATS JetStream work queue replicated 3 times; and the time
    /// from kill -9 of a shard's leader to the first successful take on that shard.
    Replicated {
        /// Runs; medians are reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Seconds per throughput measurement.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        /// Leader kills for the failover times.
        #[arg(long, default_value_t = 20)]
        kills: usize,
        /// Shards of each cluster.
        #[arg(long, default_value_t = 64)]
        shards: u32,
    },
    /// A well-behaved client's round trips on a node, idle and beside a hostile client.
    Hostile {
        /// Runs; medians are reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().workload {
        Workload::Inproc {
            entries,
            runs,
            wakeups,
        } => inproc::run(entries, runs, wakeups),
        Workload::Notify {
            sizes,
            writes,
            runs,
        } => notify::run(&sizes, writes, runs),
        Workload::Node {
            runs,
            seconds,
            rtt_samples,
        } => node::run(runs, seconds, rtt_samples),
        Workload::Durable {
            runs,
            seconds,
            recovery_entries,
        } => node::run_durable(runs, seconds, recovery_entries),
        Workload::Cluster {
            runs,
            seconds,
            wakeup_samples,
        } => cluster::run(runs, seconds, wakeup_samples),
        Workload::Hostile { runs, seconds } => hostile::run(runs, seconds),
        Workload::Replicated {
            runs,
            seconds,
            kills,
            shards,
        } => replicated::run(runs, seconds, kills, shards),
    }
}
