//! Starting the real `space-node` binary on an ephemeral loopback port, and finding the
//! other binaries of the workspace.
#![allow(dead_code)]

pub mod replicated;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use space_client::wire::{Request, Response};
pub use space_tests::process::Signal;

/// A running node process; killed when dropped.
pub struct NodeProcess {
    child: Child,
    /// Where it listens (127.0.0.1:port).
    pub addr: String,
}

impl NodeProcess {
    /// Starts `space-node --listen 127.0.0.1:0` with extra arguments and waits until it
    /// says where it listens.
    pub fn start(args: &[&str]) -> NodeProcess {
        let mut all = vec!["--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        Self::start_args(&all)
    }

    /// Starts a node on a given address (for restarts on the same port).
    pub fn start_at(addr: &str, args: &[&str]) -> NodeProcess {
        let mut all = vec!["--listen", addr];
        all.extend_from_slice(args);
        Self::start_args(&all)
    }

    fn start_args(args: &[&str]) -> NodeProcess {
        // `SPACE_TEST_NODE_LOG=<filter>` logs each node at that level into a file of
        // `SPACE_TEST_NODE_LOG_DIR` (default: the temporary directory), for diagnosis.
        let (filter, stderr) = match std::env::var("SPACE_TEST_NODE_LOG") {
            Ok(filter) => {
                let dir = std::env::var("SPACE_TEST_NODE_LOG_DIR")
                    .map_or_else(|_| std::env::temp_dir(), std::path::PathBuf::from);
                let listen = args.get(1).copied().unwrap_or("node").replace(':', "-");
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                let file = std::fs::File::create(dir.join(format!("node-{listen}-{nanos}.log")))
                    .expect("create a node log file");
                (filter, Stdio::from(file))
            }
            Err(_) => ("warn,tarpc=off,openraft=error".to_owned(), Stdio::inherit()),
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_space-node"))
            .args(args)
            .env("RUST_LOG", filter)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start space-node");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the address line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        NodeProcess { child, addr }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Threads the node process has now (0 once it is gone).
    pub fn threads(&self) -> usize {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("Threads:"))
                    .and_then(|n| n.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// Resident memory of the node process, in bytes.
    pub fn resident_bytes(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/statm", self.pid()))
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |pages| pages * 4096)
    }

    /// Files (sockets included) the node process has open.
    pub fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map_or(0, |d| d.count())
    }

    /// Kills the process at once (SIGKILL) and waits for it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends the node `signal`; fails the test when it cannot.
    pub fn signal(&self, signal: Signal) {
        space_tests::process::signal(self.pid(), signal).expect("signal the node");
    }

    /// Waits up to `limit` for the process to exit by itself; its status, if it did.
    pub fn exited_within(
        &mut self,
        limit: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        space_tests::process::exit_within(&mut self.child, limit).expect("wait")
    }

    /// Sends SIGTERM and waits up to a minute for the process to exit; returns whether it
    /// exited cleanly (a node still running then is killed, and did not).
    pub fn terminate(mut self) -> bool {
        self.signal(Signal::Terminate);
        space_tests::process::exit_within(&mut self.child, std::time::Duration::from_secs(60))
            .expect("wait")
            .is_some_and(|status| status.success())
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` free loopback addresses below the ephemeral range
/// ([`space_tests::process::free_addrs`]).
pub fn free_addrs(n: usize) -> Vec<String> {
    space_tests::process::free_addrs(n).expect("free loopback ports")
}

/// A cluster of real nodes, each on a fresh data directory of its own (removed with the
/// cluster).
pub struct Cluster {
    /// The nodes, in member order.
    pub nodes: Vec<NodeProcess>,
    _dirs: Vec<space_tests::TempDir>,
}

/// Starts a cluster of one copy per range (8 shards) on `addrs`; `extra[i]` are node i's
/// extra arguments. Returns once every node has the layout committed by the meta group
/// and every shard it holds led (a minute at most, else it panics).
pub fn start_cluster(addrs: &[String], extra: &[&[&str]]) -> Cluster {
    start_cluster_of(addrs, "1", replicated::SHARDS, extra)
}

/// [`start_cluster`] with `replication` copies of each of `shards` shards.
pub fn start_cluster_of(
    addrs: &[String],
    replication: &str,
    shards: &str,
    extra: &[&[&str]],
) -> Cluster {
    let list = addrs.join(",");
    let dirs: Vec<space_tests::TempDir> = addrs
        .iter()
        .map(|_| space_tests::TempDir::new("cluster"))
        .collect();
    let nodes = addrs
        .iter()
        .zip(&dirs)
        .enumerate()
        .map(|(i, (addr, dir))| {
            let dir = dir.0.to_string_lossy();
            let mut args = vec![
                "--data-dir",
                &dir,
                "--initial-cluster",
                &list,
                "--replication",
                replication,
                "--shards",
                shards,
            ];
            args.extend_from_slice(extra.get(i).copied().unwrap_or(&[]));
            NodeProcess::start_at(addr, &args)
        })
        .collect();
    // Its own runtime on its own thread: callers may be inside a runtime or not.
    let addrs = addrs.to_vec();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            for (i, addr) in addrs.iter().enumerate() {
                until_serving(addr, i as u64 + 1).await;
            }
        });
    })
    .join()
    .expect("the cluster never served");
    Cluster { nodes, _dirs: dirs }
}

/// Waits until the node at `addr`, member `me`, has the cluster's layout from its meta
/// group and a leader for every shard it holds.
async fn until_serving(addr: &str, me: u64) {
    use space_client::wire::{Request, Response};
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let conn = space_client::Connection::open(addr, space_client::ClientConfig::default())
        .await
        .expect("connect to a starting node");
    loop {
        let laid_out = matches!(
            conn.call(Request::MetaGroup).await,
            Ok(Response::MetaGroup(Some(m))) if m.layout_version > 0
        );
        let led = match conn.call(Request::Shards).await {
            Ok(Response::Shards(shards)) => shards
                .iter()
                .all(|s| !s.replicas.contains(&space_client::NodeId(me)) || s.leader.is_some()),
            _ => false,
        };
        if laid_out && led {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the node at {addr} did not serve within a minute"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Polls `check` every 50 ms until it holds or `within` passes; whether it held.
pub fn until(within: std::time::Duration, mut check: impl FnMut() -> bool) -> bool {
    let give_up = std::time::Instant::now() + within;
    while std::time::Instant::now() < give_up {
        if check() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    check()
}

/// The node at `addr`'s answer to `request`, on a connection of its own (not through
/// the address the node advertises).
pub fn direct(addr: &str, request: Request) -> Response {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let call = space_tests::hostile::call_bytes(request, deadline);
    match space_tests::hostile::answer_to(addr, &call) {
        Some(Ok(answer)) => answer,
        other => panic!("the node did not answer: {other:?}"),
    }
}

/// The blocked reads, takes and claims on the node at `addr`, asked directly.
pub fn waiters_on(addr: &str) -> u64 {
    match direct(addr, Request::Stats) {
        Response::Stats(stats) => stats.waiters,
        other => panic!("not stats: {other:?}"),
    }
}

/// The visible entries of `entry_type` on the node at `addr` (on a replicated node, in
/// the shards it leads), asked directly.
pub fn count_on(addr: &str, entry_type: &str) -> u64 {
    match direct(
        addr,
        Request::Count(space_client::Query::for_type(entry_type)),
    ) {
        Response::Count(n) => n,
        // A replicated node counts in the shards it leads.
        Response::ShardCounts { counts, .. } => counts.iter().map(|(_, n)| n).sum(),
        other => panic!("not a count: {other:?}"),
    }
}

/// Writes an entry of `entry_type` with an `id` field on the node at `addr`, directly.
pub fn write_on(addr: &str, entry_type: &str, id: i64) {
    let mut fields = space_client::Fields::new();
    fields.push("id", space_client::Value::I64(id));
    let written = direct(
        addr,
        Request::WriteDirect {
            entry_type: entry_type.into(),
            indexes: Vec::new(),
            entries: vec![(fields, None)],
            lease: space_client::Lease::Forever,
            labels: Vec::new(),
        },
    );
    assert!(matches!(written, Response::Receipts(_)), "{written:?}");
}
