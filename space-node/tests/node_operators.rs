//! What a node tells its operator: the startup line (version, durability, limits, auth),
//! warnings for refused connections and for entries a memory-mode node discards when it
//! stops, plain text in a log file (no colour codes), and a node id refused where the
//! cluster list decides it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use space_client::{ClientConfig, connect_with};
use space_tests::TempDir;

#[derive(Serialize, Deserialize)]
struct Job {
    n: u64,
}
space_client::entry!(Job, "Job");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_says_how_it_runs_what_it_refuses_and_what_it_discards() {
    let dir = TempDir::new("operators");
    let log = dir.0.join("node.log");
    let mut node = Command::new(env!("CARGO_BIN_EXE_space-node"))
        .args(["--listen", "127.0.0.1:0", "--auth-token", "s3cret"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(node.stdout.take().unwrap())
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
    let stopped = Command::new("kill")
        .args(["-TERM", &node.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    assert!(
        node.wait().unwrap().success(),
        "the node did not stop cleanly"
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

#[test]
fn a_node_id_is_refused_where_the_cluster_list_decides_it() {
    for cluster in ["--peers", "--initial-cluster"] {
        let mut node = Command::new(env!("CARGO_BIN_EXE_space-node"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--node-id",
                "2",
                cluster,
                "127.0.0.1:1,127.0.0.1:2",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A node that accepted the flags would run on: given 10 s to refuse them.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while node.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = node.kill();
        let out = node.wait_with_output().unwrap();
        assert!(
            !out.status.success(),
            "--node-id with {cluster} was accepted"
        );
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("--node-id") && said.contains(cluster),
            "the refusal does not name the flags: {said}"
        );
    }
}
