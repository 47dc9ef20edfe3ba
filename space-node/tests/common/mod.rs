//! Starting the real `space-node` binary on an ephemeral loopback port, and finding the
//! other binaries of the workspace.
#![allow(dead_code)]

pub mod replicated;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

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

/// `n` free loopback addresses (bound and released at once), on ports below the
/// system's ephemeral range: no outgoing connection or port-0 listener (a proxy, a
/// client) can take one of them while its node is down between a kill and a restart.
pub fn free_addrs(n: usize) -> Vec<String> {
    use rand::Rng;
    let mut rng = rand::rng();
    let mut listeners: Vec<std::net::TcpListener> = Vec::new();
    while listeners.len() < n {
        let port: u16 = rng.random_range(10_000..32_000);
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            listeners.push(l);
        }
    }
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect()
}

/// Starts a cluster of the given members; `extra[i]` are node i's extra arguments.
pub fn start_cluster(addrs: &[String], epoch: u64, extra: &[&[&str]]) -> Vec<NodeProcess> {
    let peers = addrs.join(",");
    let epoch = epoch.to_string();
    addrs
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let mut args = vec!["--peers", &peers, "--epoch", &epoch];
            args.extend_from_slice(extra.get(i).copied().unwrap_or(&[]));
            NodeProcess::start_at(a, &args)
        })
        .collect()
}
