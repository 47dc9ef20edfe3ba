//! Real `space-node` processes (and other servers) for `space-bench` and the process-level
//! tests of this crate.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

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
        cpu_seconds_of(self.0.id())
    }
}

/// CPU time (user + system) process `pid` has used so far, in seconds; 0 when it cannot be
/// read (the process is gone).
pub fn cpu_seconds_of(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
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

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A signal a test sends a process.
#[derive(Debug, Clone, Copy)]
pub enum Signal {
    /// SIGINT: Ctrl-C.
    Interrupt,
    /// SIGTERM: asked to stop.
    Terminate,
    /// SIGSTOP: paused, as a machine that freezes.
    Stop,
    /// SIGCONT: resumed after [`Signal::Stop`].
    Continue,
}

/// Sends `signal` to the process `pid`.
///
/// # Errors
///
/// When the process does not exist (any more) or may not be signalled.
pub fn signal(pid: u32, signal: Signal) -> Result<()> {
    let number = match signal {
        Signal::Interrupt => libc::SIGINT,
        Signal::Terminate => libc::SIGTERM,
        Signal::Stop => libc::SIGSTOP,
        Signal::Continue => libc::SIGCONT,
    };
    let pid = libc::pid_t::try_from(pid).context("a process id out of range")?;
    // SAFETY: kill(2) only reads its two integer arguments.
    if unsafe { libc::kill(pid, number) } != 0 {
        bail!(
            "sending {signal:?} to process {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Waits up to `limit` for `child` to exit: its status, or `None` if it still runs. A test
/// that waits for a process this way fails, rather than hang, when the process does not
/// end.
///
/// # Errors
///
/// When the child's status cannot be read.
pub fn exit_within(child: &mut Child, limit: Duration) -> Result<Option<ExitStatus>> {
    let until = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= until {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Prefixes of the environment variables cargo sets for one package's test run.
const PER_PACKAGE_VARS: [&str; 7] = [
    "CARGO_PKG_",
    "CARGO_MANIFEST_",
    "CARGO_CRATE_",
    "CARGO_BIN_",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "OUT_DIR",
];

/// A program target of the workspace: a binary or an example.
#[derive(Debug, Clone, Copy)]
pub enum Program<'a> {
    /// `--bin NAME`
    Bin(&'a str),
    /// `--example NAME`
    Example(&'a str),
}

/// The `space-node` binary of the profile this program was built in: release for
/// `space-bench` (built if missing), debug for tests (brought up to date).
pub fn node_binary() -> Result<PathBuf> {
    program("space-node", Program::Bin("space-node"))
}

/// The `space` command-line tool, found like [`node_binary`].
pub fn cli_binary() -> Result<PathBuf> {
    program("space-client", Program::Bin("space"))
}

/// The program `target` of the workspace's `package`, of the profile this program was
/// built in.
///
/// Debug (test) builds bring every binary and example of the workspace up to date with
/// `cargo build --workspace --bins --examples`: the features it resolves are those of
/// `cargo test --workspace`, so the programs share the tests' dependencies instead of a
/// second build of them (a no-op when up to date). Release builds (`space-bench`) build
/// only the one program, and only when it is missing.
pub fn program(package: &str, target: Program<'_>) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/space-bench, or target/<profile>/deps/<test>.
    let mut dir = exe.parent().context("no directory")?.to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let release = dir.file_name().is_some_and(|n| n == "release");
    let (path, kind, name) = match target {
        Program::Bin(name) => (dir.join(name), "--bin", name),
        Program::Example(name) => (dir.join("examples").join(name), "--example", name),
    };
    if release && path.exists() {
        return Ok(path);
    }
    // One workspace build brings every debug program up to date: a test that starts
    // programs many times (the CLI's) asks cargo once per test process, not every time.
    static DEBUG_BUILT: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut built = DEBUG_BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !release && *built && path.exists() {
        return Ok(path);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    // What cargo sets for the running test names its package; build scripts that watch
    // such variables (ring's does) would otherwise build again for every test package.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if PER_PACKAGE_VARS.iter().any(|p| name.starts_with(p)) {
            build.env_remove(name.as_ref());
        }
    }
    if release {
        build.args(["build", "--release", "-p", package, kind, name]);
    } else {
        build.args(["build", "--workspace", "--bins", "--examples"]);
    }
    let status = build.status()?;
    if !status.success() || !path.exists() {
        bail!("could not build {name}; run: cargo build -p {package} {kind} {name}");
    }
    *built = !release;
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

/// `n` free loopback addresses (bound and released at once), on ports below the
/// system's ephemeral range: no outgoing connection or port-0 listener (another node, a
/// proxy, a client) can take one of them while its node is down between a kill and a
/// restart. (A port the kernel handed out for port 0 can: a test's node once found its
/// own address taken that way when it started.) A process is never handed the same port
/// twice: the tests of one binary run at once, and one of them found the port it was
/// handed taken by another's node, handed it too after it was released.
///
/// # Errors
/// When `n` free ports are not found in many tries.
pub fn free_addrs(n: usize) -> Result<Vec<String>> {
    use rand::Rng;
    static HANDED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed = HANDED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut rng = rand::rng();
    let mut listeners: Vec<std::net::TcpListener> = Vec::new();
    for _ in 0..10_000 {
        if listeners.len() == n {
            break;
        }
        let port: u16 = rng.random_range(10_000..32_000);
        if handed.contains(&port) {
            continue;
        }
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            listeners.push(l);
        }
    }
    for l in &listeners {
        handed.push(l.local_addr()?.port());
    }
    if listeners.len() < n {
        bail!(
            "found {} free loopback ports of the {n} needed",
            listeners.len()
        );
    }
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::free_addrs;

    /// Tests that run at once each get ports no other was handed: two calls of 500
    /// ports drawn from 22,000 shared about 11 when each was only free when drawn.
    #[test]
    fn a_process_is_never_handed_the_same_port_twice() {
        let first = free_addrs(500).unwrap();
        let second = free_addrs(500).unwrap();
        let shared: Vec<&String> = second.iter().filter(|a| first.contains(a)).collect();
        assert!(shared.is_empty(), "handed twice: {shared:?}");
    }
}
