//! The `space-node` binary: parses the command line, sets up logging, and serves until
//! SIGTERM or ctrl-c.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use space_core::NodeId;
use space_node::{Node, NodeConfig};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Durability {
    /// Entries live in memory only and are lost when the node stops.
    Memory,
    /// Every change is logged to --data-dir and acknowledged once it is on disk.
    Durable,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// A space node: holds entries and serves the space over the network.
#[derive(Parser, Debug)]
#[command(version, about, args_override_self = true)]
struct Args {
    /// A TOML file of settings, one per option, named as the options are without their
    /// dashes (`max-entries = 100000`, `label = ["zone=a"]`, `auth-token-file = "..."`);
    /// options given on the command line win over the file's.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on. Anything but loopback requires an auth token.
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Address clients are told to use (default: the listening address).
    #[arg(long)]
    advertise: Option<String>,
    /// Where to serve the admin endpoints (`/metrics`, `/health/live`, `/health/ready`):
    /// an address (port 0: any free port, logged at startup), or `off` (no endpoints, no
    /// metrics kept). Anything but loopback requires an auth token, which every admin
    /// request must then carry as `Authorization: Bearer <token>`.
    #[arg(long, default_value = "127.0.0.1:0", value_parser = parse_admin_listen)]
    admin_listen: AdminListen,
    /// This node's id (default 1). A cluster node's id is its position in
    /// --initial-cluster, so it is refused with it.
    #[arg(long, conflicts_with = "initial_cluster")]
    node_id: Option<u64>,
    /// A label this node carries, as key=value (repeatable), for FindPlaceFor.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// The token clients must present (or SPACE_AUTH_TOKEN; its value is never printed).
    #[arg(
        long,
        env = "SPACE_AUTH_TOKEN",
        hide_env_values = true,
        conflicts_with = "auth_token_file"
    )]
    auth_token: Option<String>,
    /// A file holding the token clients must present.
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
    /// Largest entry accepted, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_entry_bytes: u64,
    /// Most entries held; writes beyond get a Full error.
    #[arg(long)]
    max_entries: Option<u64>,
    /// Most bytes of entries held; writes beyond get a Full error.
    #[arg(long)]
    max_bytes: Option<u64>,
    /// Largest frame accepted on a connection, in bytes.
    #[arg(long, default_value_t = space_core::wire::DEFAULT_MAX_FRAME)]
    max_frame_bytes: usize,
    /// Most requests in flight on one connection; more get a Busy error.
    #[arg(long, default_value_t = 20_000)]
    max_in_flight: usize,
    /// Most client connections at once; more are refused with a Busy error.
    #[arg(long, default_value_t = 4_096)]
    max_connections: usize,
    /// Most blocked reads, takes and claims at once; more get a Busy error.
    #[arg(long, default_value_t = 50_000)]
    max_waiters: usize,
    /// Most subscriptions at once; more get a Busy error.
    #[arg(long, default_value_t = 10_000)]
    max_subscriptions: usize,
    /// Most subscriptions one client holds; more get a Busy error.
    #[arg(long, default_value_t = 1_000)]
    max_subscriptions_per_client: usize,
    /// Most events all subscriptions hold at once; past it a subscription drops its own
    /// oldest event (its subscriber sees a gap) to take a new one.
    #[arg(long, default_value_t = 1_000_000)]
    max_queued_events: usize,
    /// Most entry types held (empty ones are forgotten); writes of more get a Full error.
    #[arg(long, default_value_t = 10_000)]
    max_entry_types: usize,
    /// A durable node (--data-dir, not replicated) snapshots its state once its log grew
    /// by this many bytes (or by the size of the last snapshot, if larger). A replicated
    /// node shares them among its shards: each snapshots once its Raft log grew by its
    /// share (or by the size of its last snapshot, if larger), and keeps at most its share
    /// of entries behind its snapshot; so the node's logs hold about this much memory
    /// beyond their snapshots (more only where a shard's snapshot is larger than its
    /// share), whatever the entries' size.
    #[arg(long, default_value_t = space_core::DEFAULT_SNAPSHOT_AFTER_BYTES, value_parser = clap::value_parser!(u64).range(1..))]
    snapshot_after_bytes: u64,
    /// A replicated node snapshots each shard once its log grew by this many entries (or
    /// by its share of --snapshot-after-bytes, whichever comes first).
    #[arg(long, default_value_t = space_node::replica::SNAPSHOT_AFTER_ENTRIES, value_parser = clap::value_parser!(u64).range(1..))]
    snapshot_after_entries: u64,
    /// Fault injection for tests: each fsync of the data directory's log takes this many
    /// milliseconds longer (a slow disk). Zero, the default, in service.
    #[arg(long, default_value_t = 0)]
    fault_sync_delay_ms: u64,
    /// Fault injection for tests: the data directory's disk is full once its log wrote
    /// this many more bytes (the node then stops, as on a real full disk). Leave unset in
    /// service.
    #[arg(long)]
    fault_disk_full_after_bytes: Option<u64>,
    /// How long a frame may take to arrive once it has begun, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    frame_timeout_ms: u64,
    /// How long a subscriber may stay unreachable before its subscriptions are cancelled,
    /// in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    subscriber_timeout_ms: u64,
    /// Gone: the static cluster of earlier versions. Refused with a message that says
    /// what replaces it (--initial-cluster; --replication 1 keeps one copy per range).
    #[arg(long, hide = true)]
    peers: Option<String>,
    /// A replicated cluster's nodes, comma separated, the same list (and order) on every
    /// node, this node's --advertise (or --listen) address among them; needs --data-dir.
    /// The ranges are grouped into shards, each a Raft group of --replication nodes.
    /// Used to create the cluster: afterwards a node restarts from its data directory.
    #[arg(long, value_delimiter = ',')]
    initial_cluster: Vec<String>,
    /// Shards of a replicated cluster (fixed when it is created).
    #[arg(long, default_value_t = 64)]
    shards: u32,
    /// Replicas per shard of a replicated cluster: 1, 3 or 5 (default 3, or 1 with fewer
    /// than 3 nodes).
    #[arg(long)]
    replication: Option<usize>,
    /// Reach the replicated cluster's member listed as MEMBER at ADDR instead, as
    /// MEMBER=ADDR (repeatable): for a tunnel or a translated address (tests put a
    /// fault-injecting proxy there).
    #[arg(long = "peer-via", value_parser = parse_route)]
    peer_routes: Vec<(String, String)>,
    /// Keep entries durably in this directory (recovered at start).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// memory or durable (default: durable when --data-dir is given, else memory).
    #[arg(long, value_enum)]
    durability: Option<Durability>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Worker threads serving requests (default: one per core). With 1, the node runs
    /// on one thread (besides its write-ahead log's, and those counts and listings run
    /// on).
    #[arg(long)]
    threads: Option<usize>,
}

fn parse_route(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((member, via)) if !member.is_empty() && !via.is_empty() => {
            Ok((member.to_owned(), via.to_owned()))
        }
        _ => Err(format!("expected MEMBER=ADDR, got {s:?}")),
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tarpc=error,openraft=warn"));
    // Colour codes only for a terminal, not for a file or a log collector.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// What stops the node: SIGTERM or ctrl-c (SIGINT). The handlers are installed when this
/// is called, not when the future is first polled: it is called before the address line
/// is printed, so a tool that signals the node once it has read that line always gets a
/// clean stop, never the signal's default (death).
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("listening for ctrl-c")?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = interrupt.recv() => {}
            }
            tracing::info!("shutting down");
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        })
    }
}

/// The command line with the settings of a `--config FILE` (if one is given) put before
/// it, as options: those given on the command line come later and win.
fn with_config_file(argv: Vec<String>) -> Result<Vec<String>> {
    let path = argv.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix("--config=").map(str::to_owned).or_else(|| {
            (a == "--config")
                .then(|| argv.get(i + 1).cloned())
                .flatten()
        })
    });
    let Some(path) = path else {
        return Ok(argv);
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{path} is not TOML"))?;
    let known: Vec<String> = <Args as clap::CommandFactory>::command()
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_owned))
        .collect();
    let mut args = vec![argv.first().cloned().unwrap_or_default()];
    for (name, value) in table {
        let flag = name.replace('_', "-");
        if flag == "config" || !known.contains(&flag) {
            bail!("{path}: {name:?} is not an option of space-node (see --help)");
        }
        let values = match value {
            toml::Value::Array(items) => items,
            one => vec![one],
        };
        for value in values {
            match value {
                toml::Value::String(s) => args.extend([format!("--{flag}"), s]),
                toml::Value::Integer(n) => args.extend([format!("--{flag}"), n.to_string()]),
                toml::Value::Float(x) => args.extend([format!("--{flag}"), x.to_string()]),
                toml::Value::Boolean(true) => args.push(format!("--{flag}")),
                toml::Value::Boolean(false) => {}
                other => bail!("{path}: {name:?} cannot be {}", other.type_str()),
            }
        }
    }
    args.extend(argv.into_iter().skip(1));
    Ok(args)
}

/// The node's allocator. A node allocates and frees small buffers at a high rate for as
/// long as it runs; with glibc's allocator its throughput fell to two thirds of a fresh
/// node's after about a million requests (`_int_malloc` walking fragmented bins was 10%
/// of its CPU, against 2% on a fresh node). Built with mimalloc's `no_thp`, so that it
/// does not ask for transparent huge pages on its arenas (`madvise(MADV_HUGEPAGE)`):
/// where the kernel then compacts memory to fault one in (`defrag` set to `madvise`,
/// Debian's default), first-touching memory ran at about 110 MB/s against 1.2 GB/s in
/// 4 KiB pages; a fifth of a replicated node's CPU under load went to zeroing fresh
/// huge pages, and an idle node of 64 shards held 190 MiB (47 without).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Where the admin endpoints are served, if anywhere.
#[derive(Clone, Copy, Debug)]
enum AdminListen {
    On(SocketAddr),
    Off,
}

fn parse_admin_listen(s: &str) -> Result<AdminListen, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(AdminListen::Off);
    }
    s.trim()
        .parse()
        .map(AdminListen::On)
        .map_err(|e| format!("{s:?} is neither an address such as 127.0.0.1:9100 nor off ({e})"))
}

fn main() -> Result<()> {
    let args = Args::parse_from(with_config_file(std::env::args().collect())?);
    init_logs(args.log_format);
    let mut runtime = match args.threads {
        Some(0) => bail!("--threads must be at least 1"),
        // One thread: tokio's single-threaded scheduler, which hands tasks over with
        // less synchronisation than the multi-threaded one with one worker (about 6% more
        // operations, and as much less CPU per operation, in the replicated benchmark).
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            runtime.worker_threads(n);
            runtime
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    runtime
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(serve(args))
}

async fn serve(args: Args) -> Result<()> {
    let token = match (&args.auth_token, &args.auth_token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(path)) => {
            let t = std::fs::read_to_string(path)
                .with_context(|| format!("reading the token file {}", path.display()))?;
            let t = t.trim().to_owned();
            if t.is_empty() {
                bail!("the token file {} is empty", path.display());
            }
            Some(t)
        }
        (None, None) => None,
    };
    if args.peers.is_some() {
        bail!(
            "--peers (the static cluster) is gone: create the cluster with --initial-cluster \
             ADDRS --data-dir DIR, and add --replication 1 for one copy of each range as \
             --peers kept"
        );
    }
    let data_dir = match (args.durability, args.data_dir) {
        (Some(Durability::Durable), None) => bail!("--durability durable needs --data-dir DIR"),
        (Some(Durability::Memory), _) => None,
        (_, dir) => dir,
    };
    let config = NodeConfig {
        data_dir,
        initial_cluster: args.initial_cluster,
        shards: args.shards,
        replication: args.replication,
        peer_routes: args.peer_routes,
        listen: args.listen,
        advertise: args.advertise,
        node: NodeId(args.node_id.unwrap_or(1)),
        labels: args.labels,
        token,
        max_frame: args.max_frame_bytes,
        max_in_flight: args.max_in_flight,
        max_connections: args.max_connections,
        max_waiters: args.max_waiters,
        max_subscriptions: args.max_subscriptions,
        max_subscriptions_per_client: args.max_subscriptions_per_client,
        max_queued_events: args.max_queued_events,
        max_entry_types: args.max_entry_types,
        frame_timeout: Duration::from_millis(args.frame_timeout_ms.max(1)),
        subscriber_timeout: Duration::from_millis(args.subscriber_timeout_ms.max(1)),
        max_entry_bytes: args.max_entry_bytes,
        snapshot_after_bytes: args.snapshot_after_bytes,
        snapshot_after_entries: args.snapshot_after_entries,
        sync_delay: Duration::from_millis(args.fault_sync_delay_ms),
        full_after_bytes: args.fault_disk_full_after_bytes,
        max_entries: args.max_entries,
        max_bytes: args.max_bytes,
        ..NodeConfig::default()
    };
    let node = Node::bind(config).await?;
    if let AdminListen::On(addr) = args.admin_listen {
        let bound = node.serve_admin(addr).await?;
        tracing::info!(admin = %bound, "admin endpoints: / (the admin page), /metrics, /health/live, /health/ready");
    }
    let shutdown = shutdown_signal()?;
    // The first line on stdout names the address: tools starting the node on port 0 read it.
    println!("listening on {}", node.local_addr()?);
    if let Err(e) = node.serve(shutdown).await {
        // Stop at once, as a crash would: the engines' memory may be ahead of the disk, so
        // winding down (or serving on) could show what a restart will not have.
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    Ok(())
}
