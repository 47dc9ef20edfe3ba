//! What a node tells its operator: the startup line (version, durability, limits, auth),
//! warnings for refused connections and for entries a memory-mode node discards when it
//! stops, plain text in a log file (no colour codes), and a node id refused where the
//! cluster list decides it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use space_client::{ClientConfig, connect_with};
use space_tests::TempDir;
use space_tests::process::{Signal, exit_within, signal};

#[derive(Serialize, Deserialize)]
struct Job {
    n: u64,
}
space_client::entry!(Job, "Job");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_says_how_it_runs_what_it_refuses_and_what_it_discards() {
    let dir = TempDir::new("operators");
    let log = dir.0.join("node.log");
    let mut node = Running(
        Command::new(env!("CARGO_BIN_EXE_space-node"))
            .args(["--listen", "127.0.0.1:0", "--auth-token", "s3cret"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(node.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();

    // A client without the token is refused; one with it writes three entries.
    let stranger = {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || space_tests::hostile::raw(&addr).is_err())
    };
    assert!(stranger.await.unwrap(), "a client without the token got in");
    let config = ClientConfig {
        token: Some("s3cret".into()),
        ..ClientConfig::default()
    };
    let space = connect_with(&addr, config).await.unwrap();
    for n in 0..3 {
        space.write(&Job { n }).await.unwrap();
    }
    drop(space);
    signal(node.0.id(), Signal::Terminate).unwrap();
    let stopped = exit_within(&mut node.0, Duration::from_secs(30)).unwrap();
    assert!(
        stopped.is_some_and(|s| s.success()),
        "the node did not stop cleanly: {stopped:?}"
    );

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in a log file:\n{text}"
    );
    let serving = text
        .lines()
        .find(|l| l.contains("serving"))
        .unwrap_or_else(|| panic!("no startup line:\n{text}"));
    for said in [
        concat!("version=", env!("CARGO_PKG_VERSION")),
        "durability=memory",
        "auth=true",
        "max_entry_bytes=",
        "max_connections=",
    ] {
        assert!(
            serving.contains(said),
            "the startup line lacks {said}: {serving}"
        );
    }
    assert!(
        text.lines()
            .any(|l| l.contains("WARN") && l.contains("wrong or missing auth token")),
        "the refused client was not warned of:\n{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("WARN") && l.contains("discarded") && l.contains("entries=3")),
        "the discarded entries were not said:\n{text}"
    );
}

/// Runs `space-node` with `args`, which it should refuse: a node that accepted them
/// would run on, so it is given 10 s to exit.
fn refused(args: &[&str]) -> std::process::Output {
    let mut node = Command::new(env!("CARGO_BIN_EXE_space-node"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while node.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = node.kill();
    node.wait_with_output().unwrap()
}

#[test]
fn a_node_id_is_refused_where_the_cluster_list_decides_it() {
    let out = refused(&[
        "--listen",
        "127.0.0.1:0",
        "--node-id",
        "2",
        "--initial-cluster",
        "127.0.0.1:1,127.0.0.1:2",
    ]);
    assert!(
        !out.status.success(),
        "--node-id with --initial-cluster was accepted"
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("--node-id") && said.contains("--initial-cluster"),
        "the refusal does not name the flags: {said}"
    );
}

/// The static cluster's flag is refused with what replaces it, not taken for something
/// else or met with a bare "unexpected argument".
#[test]
fn the_static_cluster_flag_is_refused_with_what_replaces_it() {
    let out = refused(&[
        "--listen",
        "127.0.0.1:0",
        "--peers",
        "127.0.0.1:1,127.0.0.1:2",
    ]);
    assert!(!out.status.success(), "--peers was accepted");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("--initial-cluster") && said.contains("--replication 1"),
        "the refusal does not say what replaces --peers: {said}"
    );
}

/// A node process, killed when dropped (a failing test leaves none behind).
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `space-node` with `args`; its address, once it says it listens.
fn start_with(args: &[&str]) -> (Running, String) {
    let mut node = Command::new(env!("CARGO_BIN_EXE_space-node"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(node.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    (Running(node), addr)
}

/// How many of `n` writes the node at `addr` accepts.
async fn accepted(addr: &str, n: u64) -> u64 {
    let space = space_client::connect(addr).await.unwrap();
    let mut ok = 0;
    for i in 0..n {
        match space.write(&Job { n: i }).await {
            Ok(_) => ok += 1,
            Err(space_client::SpaceError::Full { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_sets_options_and_the_command_line_wins() {
    let dir = TempDir::new("config");
    let file = dir.0.join("node.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:0\"\nmax-entries = 2\nlabel = [\"zone=a\"]\nlog_format = \"text\"\n",
    )
    .unwrap();
    let config = file.to_string_lossy().into_owned();

    let (node, addr) = start_with(&["--config", &config]);
    assert_eq!(
        accepted(&addr, 3).await,
        2,
        "the file's max-entries was not applied"
    );
    drop(node);

    let (node, addr) = start_with(&["--config", &config, "--max-entries", "5"]);
    assert_eq!(accepted(&addr, 3).await, 3, "the command line did not win");
    drop(node);

    // A setting that is not an option: refused, named.
    std::fs::write(&file, "max_entrys = 1\n").unwrap();
    let out = refused(&["--config", &config, "--listen", "127.0.0.1:0"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"max_entrys\" is not an option"),
        "{out:?}"
    );
}
