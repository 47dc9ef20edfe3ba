//! Real `space-node` processes (and other servers) for `space-bench` and the process-level
//! tests of this crate.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

/// A child process killed when dropped.
pub struct Process(pub Child);

impl Process {
    /// Files (sockets included) the process has open.
    pub fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.0.id())).map_or(0, |d| d.count())
    }

    /// CPU time (user + system) the process has used so far, in seconds; 0 when it cannot
    /// be read (the process is gone).
    pub fn cpu_seconds(&self) -> f64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.0.id())) else {
            return 0.0;
        };
        // The command name (field 2) may hold spaces; the fields after its `)` are fixed.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return 0.0;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after `)`.
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // SAFETY: sysconf reads a constant of the system; it has no preconditions.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        (ticks(11) + ticks(12)) / per_second
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `space-node` binary of the profile this program was built in: release for
/// `space-bench` (built if missing), debug for tests (brought up to date).
pub fn node_binary() -> Result<PathBuf> {
    binary("space-node", "space-node", cfg!(debug_assertions))
}

/// The binary `name` of the workspace's `package`, of the profile this program was built
/// in; built with cargo if missing, or always when `refresh` (a no-op when it is up to
/// date).
pub fn binary(package: &str, name: &str, refresh: bool) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/space-bench, or target/<profile>/deps/<test>.
    let mut dir = exe.parent().context("no directory")?.to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if refresh || !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", package, "--bin", name]);
        if dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build.status()?;
        if !status.success() || !path.exists() {
            bail!("could not build {name}; run: cargo build --release -p {package}");
        }
    }
    Ok(path)
}

/// Starts a node on a free loopback port; returns it and its address.
pub fn start_node(args: &[&str]) -> Result<(Process, String)> {
    start_node_at("127.0.0.1:0", args)
}

/// Starts a node listening on `listen`; returns it and the address it reports.
pub fn start_node_at(listen: &str, args: &[&str]) -> Result<(Process, String)> {
    let mut child = Command::new(node_binary()?)
        .args(["--listen", listen])
        .args(args)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting space-node")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .with_context(|| format!("unexpected first line from space-node: {line:?}"))?
        .to_owned();
    Ok((Process(child), addr))
}
