//! The `space` command-line tool against a running node.

mod common;

use std::process::{Command, Output};

use common::NodeProcess;
use space_tests::process::cli_binary;

fn space(node: &NodeProcess, args: &[&str]) -> Output {
    Command::new(cli_binary().expect("the space CLI"))
        .args(["--node", &node.addr])
        .args(args)
        .output()
        .expect("run space")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn the_cli_writes_reads_takes_counts_watches_and_reports() {
    let node = NodeProcess::start(&[]);
    let out = stdout(&space(
        &node,
        &[
            "write",
            "Order",
            r#"{"id":"o-1","status":"ReadyToShip","amount":150}"#,
        ],
    ));
    assert!(out.starts_with("written "), "{out}");
    stdout(&space(
        &node,
        &[
            "write",
            "Order",
            r#"{"id":"o-2","status":"New","amount":5}"#,
            "--key",
            "o-2",
        ],
    ));
    assert_eq!(stdout(&space(&node, &["count", "Order"])).trim(), "2");
    let out = stdout(&space(
        &node,
        &[
            "--json",
            "read",
            "Order",
            "status:ReadyToShip AND amount:>100",
        ],
    ));
    let doc: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(doc["fields"]["id"], "o-1");

    // A malformed query: a clear error pointing at the position, non-zero exit.
    let bad = space(&node, &["read", "Order", "status:ReadyToShip AND amount:>"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("syntax error at position 31"), "{err}");
    assert!(err.contains("                                 ^"), "{err}");

    // watch prints one JSON line per event
    let watcher = Command::new(cli_binary().expect("the space CLI"))
        .args([
            "--node",
            &node.addr,
            "--json",
            "watch",
            "Order",
            "--kinds",
            "written,taken",
            "--count",
            "2",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let out = stdout(&space(&node, &["--json", "take", "Order", "status:New"]));
    assert!(out.contains("\"o-2\""), "{out}");
    stdout(&space(
        &node,
        &[
            "write",
            "Order",
            r#"{"id":"o-3","status":"New","amount":1}"#,
        ],
    ));
    let watched = watcher.wait_with_output().unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&watched.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        (lines[0]["kind"].as_str(), lines[0]["seq"].as_u64()),
        (Some("Taken"), Some(1))
    );
    assert_eq!(
        (lines[1]["kind"].as_str(), lines[1]["seq"].as_u64()),
        (Some("Written"), Some(2))
    );

    let stats: serde_json::Value =
        serde_json::from_str(stdout(&space(&node, &["--json", "stats"])).trim()).unwrap();
    assert_eq!(stats["entries"], 2);
    let topo: serde_json::Value =
        serde_json::from_str(stdout(&space(&node, &["--json", "topology"])).trim()).unwrap();
    assert_eq!(topo["nodes"][0]["ranges"], serde_json::json!([[0, 1023]]));
    assert!(stdout(&space(&node, &["topology"])).contains("1024 ranges"));

    // An unreachable node: a clear error.
    let gone = Command::new(cli_binary().expect("the space CLI"))
        .args(["--node", "127.0.0.1:1", "count", "Order"])
        .output()
        .unwrap();
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("unreachable"));
}
