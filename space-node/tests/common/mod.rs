//! Starting the real `space-node` binary on an ephemeral loopback port.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

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
        let mut child = Command::new(env!("CARGO_BIN_EXE_space-node"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
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

    /// Sends SIGTERM and waits for the process to exit; returns whether it exited cleanly.
    pub fn terminate(mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().expect("wait");
        status.success()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
