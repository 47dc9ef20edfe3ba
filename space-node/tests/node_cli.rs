//! The `space` command-line tool against a running node.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output};
use std::time::Duration;

use common::{NodeProcess, count_on, free_addrs, until, waiters_on, write_on};
use space_tests::process::{Signal, cli_binary, exit_within, signal};
use space_tests::proxy::{Link, Proxy};

fn space(node: &NodeProcess, args: &[&str]) -> Output {
    space_at(&node.addr, args)
}

/// Runs `space` with `args` against the node (or the seeds) at `addr`.
fn space_at(addr: &str, args: &[&str]) -> Output {
    Command::new(cli_binary().expect("the space CLI"))
        .args(["--node", addr])
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

/// A `space` process running in the background (a watch), killed if a test fails before
/// it exits.
struct Background(std::process::Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `space` with `args` in the background; its stdout lines arrive on the receiver.
fn background(
    node: &NodeProcess,
    args: &[&str],
) -> (Background, std::sync::mpsc::Receiver<String>) {
    background_at(&node.addr, args)
}

/// Starts `space` with `args` against the node at `addr` in the background; its stdout
/// lines arrive on the receiver.
fn background_at(addr: &str, args: &[&str]) -> (Background, std::sync::mpsc::Receiver<String>) {
    let mut child = Background(
        Command::new(cli_binary().expect("the space CLI"))
            .args(["--node", addr])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run space"),
    );
    let lines = lines_of(child.0.stdout.take().expect("stdout"));
    (child, lines)
}

/// The lines `out` gives, as they come, on a receiver.
fn lines_of(out: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    lines
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

/// Exit codes tell found, nothing and error apart; durations read as people write them;
/// errors come as JSON with `--json`; ping says the node answers.
#[test]
fn exit_codes_durations_json_errors_and_ping() {
    let node = NodeProcess::start(&[]);
    let code = |o: &Output| o.status.code();

    // Nothing there: exit code 1, after the wait asked for.
    let started = std::time::Instant::now();
    let empty = space(&node, &["take", "Job", "--timeout", "300ms"]);
    assert_eq!(code(&empty), Some(1), "{empty:?}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    assert_eq!(code(&space(&node, &["read", "Job"])), Some(1));

    // A lease as a duration; a found entry: exit code 0.
    let written = space(&node, &["write", "Job", r#"{"n":1}"#, "--lease", "1m"]);
    assert_eq!(code(&written), Some(0), "{written:?}");
    let read = space(&node, &["--json", "read", "Job", "n:1", "--timeout", "5s"]);
    assert_eq!(code(&read), Some(0), "{read:?}");
    let doc: serde_json::Value = serde_json::from_str(stdout(&read).trim()).unwrap();
    assert_eq!(doc["fields"]["n"], 1);
    assert_eq!(
        code(&space(&node, &["take", "Job", "--timeout", "forever"])),
        Some(0)
    );

    // Not a duration: exit code 2, saying what a duration looks like.
    let bad = space(&node, &["write", "Job", r#"{"n":2}"#, "--lease", "soon"]);
    assert_eq!(code(&bad), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("500ms, 5s or 1m"),
        "{bad:?}"
    );

    // An error with --json: one JSON object on stdout, exit code 2; the node's typed
    // error as its detail.
    let refused = space(
        &node,
        &[
            "--json",
            "write",
            "Job",
            r#"{"n": {"a": 1}}"#,
            "--lease",
            "9999d",
        ],
    );
    assert_eq!(code(&refused), Some(2), "{refused:?}");
    let err: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&refused.stdout).trim()).unwrap();
    assert!(err["error"]["message"].is_string(), "{err}");
    assert!(err["error"]["detail"].is_object(), "{err}");

    // By key: read leaves it, take removes it, a second take finds nothing (an older
    // entry is there, which a query would find first).
    assert_eq!(
        code(&space(&node, &["write", "Job", r#"{"n":8}"#])),
        Some(0)
    );
    let keyed = space(&node, &["write", "Job", r#"{"n":7}"#, "--key", "job-7"]);
    assert_eq!(code(&keyed), Some(0), "{keyed:?}");
    let read = space(&node, &["--json", "read", "Job", "--key", "job-7"]);
    let doc: serde_json::Value = serde_json::from_str(stdout(&read).trim()).unwrap();
    assert_eq!(
        (doc["key"].as_str(), doc["fields"]["n"].as_i64()),
        (Some("job-7"), Some(7))
    );
    assert_eq!(
        code(&space(&node, &["take", "Job", "--key", "job-7"])),
        Some(0)
    );
    assert_eq!(
        code(&space(&node, &["take", "Job", "--key", "job-7"])),
        Some(1)
    );
    assert_eq!(
        code(&space(&node, &["read", "Job", "n:7", "--key", "job-7"])),
        Some(2)
    );

    // Ping: the node answers.
    let ping = space(&node, &["--json", "ping"]);
    let said: serde_json::Value = serde_json::from_str(stdout(&ping).trim()).unwrap();
    assert_eq!(said["address"], node.addr.as_str());
    assert!(said["round_trip_ms"].as_f64().is_some_and(|ms| ms >= 0.0));
    assert!(stdout(&space(&node, &["ping"])).contains("answered in"));
}

/// Runs `space` with `input` on its stdin.
fn space_with_stdin(node: &NodeProcess, args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(cli_binary().expect("the space CLI"))
        .args(["--node", &node.addr])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run space");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("space's output")
}

fn json_lines(o: &Output) -> Vec<serde_json::Value> {
    stdout(o)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// A stream of large entries from stdin goes in batches a node takes: 20 entries of 900
/// KiB are more than one request may carry (16 MiB), so a batch ends by bytes before it
/// reaches 256 entries. (Cut by count alone, the first batch was refused whole: "the
/// request is ... bytes, over the connection's frame limit".)
#[test]
fn large_entries_from_stdin_go_in_batches_under_the_frame_limit() {
    let node = NodeProcess::start(&[]);
    let body = "x".repeat(900 << 10);
    let lines: String = (0..20)
        .map(|n| format!("{{\"n\":{n},\"body\":\"{body}\"}}\n"))
        .collect();
    let written = space_with_stdin(&node, &["--json", "write", "Parcel", "-"], &lines);
    assert!(
        written.status.success(),
        "{:?}",
        String::from_utf8_lossy(&written.stderr)
    );
    assert_eq!(json_lines(&written).len(), 20);
    assert_eq!(stdout(&space(&node, &["count", "Parcel"])).trim(), "20");
}

/// Batches from stdin with a key field, listings, and a claim's life: claim, release,
/// claim again, commit; renew and cancel by key; each with its exit code.
#[test]
fn batches_from_stdin_contents_claims_renewals_and_cancels() {
    let node = NodeProcess::start(&[]);
    let code = |o: &Output| o.status.code();
    let lines = "{\"id\":\"a\",\"n\":1}\n\n{\"id\":\"b\",\"n\":2}\n{\"id\":7,\"n\":3}\n";
    let written = space_with_stdin(
        &node,
        &["--json", "write", "Order", "-", "--key-field", "id"],
        lines,
    );
    let keys: Vec<_> = json_lines(&written)
        .iter()
        .map(|r| r["key"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(keys, ["a", "b", "7"]);
    // A line that is not an object: exit code 2, naming the line; nothing of its batch
    // is written.
    let bad = space_with_stdin(&node, &["write", "Order", "-"], "{\"n\":4}\n[1,2]\n");
    assert_eq!(code(&bad), Some(2), "{bad:?}");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("line 2"),
        "{bad:?}"
    );
    let missing = space(
        &node,
        &["write", "Order", r#"{"n":5}"#, "--key-field", "id"],
    );
    assert_eq!(code(&missing), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no key field \"id\""));

    // Contents: everything, or the first few; nothing matching is exit code 1.
    let all = json_lines(&space(&node, &["--json", "contents", "Order"]));
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(all[0]["fields"]["n"], 1);
    let two = json_lines(&space(
        &node,
        &["--json", "contents", "Order", "--limit", "2"],
    ));
    assert_eq!(two.len(), 2);
    assert_eq!(
        code(&space(&node, &["contents", "Order", "n:>10"])),
        Some(1)
    );

    // A claim: printed with its token and count; it hides the entry until released.
    let claim = |query: &str| {
        let out = space(&node, &["--json", "claim", "Order", query, "--lease", "1m"]);
        json_lines(&out).remove(0)
    };
    let first = claim("n:1");
    assert_eq!(
        (first["key"].as_str(), first["claims"].as_u64()),
        (Some("a"), Some(1))
    );
    let token = first["token"].as_u64().unwrap().to_string();
    assert_eq!(stdout(&space(&node, &["count", "Order"])).trim(), "2");
    stdout(&space(&node, &["release", "Order", "a", &token]));
    let second = claim("n:1");
    assert_eq!(second["claims"], 2);
    let token = second["token"].as_u64().unwrap().to_string();
    let wrong = space(
        &node,
        &["renew", "Order", "a", "--lease", "1m", "--claim", "999999"],
    );
    assert_eq!(code(&wrong), Some(2), "{wrong:?}");
    stdout(&space(
        &node,
        &["renew", "Order", "a", "--lease", "2m", "--claim", &token],
    ));
    stdout(&space(&node, &["commit", "Order", "a", &token]));
    let again = space(&node, &["--json", "commit", "Order", "a", &token]);
    assert_eq!(code(&again), Some(2));
    let err: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&again.stdout).trim()).unwrap();
    assert!(err["error"]["detail"].is_object(), "{err}");
    let nothing = space(&node, &["claim", "Order", "n:1"]);
    assert_eq!(code(&nothing), Some(1), "{nothing:?}");

    // Renew and cancel by key.
    let renewed = json_lines(&space(
        &node,
        &["--json", "renew", "Order", "b", "--lease", "1h"],
    ));
    assert_eq!(renewed[0]["renewed"], "b");
    assert!(
        renewed[0]["expires"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    stdout(&space(&node, &["cancel", "Order", "7"]));
    assert_eq!(stdout(&space(&node, &["count", "Order"])).trim(), "1");
    let gone = space(&node, &["cancel", "Order", "7"]);
    assert_eq!(code(&gone), Some(2), "{gone:?}");
    let syntax = space(&node, &["claim", "Order", "n:>"]);
    assert_eq!(code(&syntax), Some(2));
}

/// `space watch` does not wait in silence for a node that is gone: it exits with an
/// error.
#[test]
fn watch_exits_with_an_error_when_its_node_goes_away() {
    use std::time::Instant;

    let node = NodeProcess::start(&[]);
    let (mut watch, printed) = background(&node, &["watch", "Alert"]);
    // Once an event is printed, the subscription is in place.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        stdout(&space(&node, &["write", "Alert", r#"{"level":1}"#]));
        if printed
            .recv_timeout(Duration::from_secs(1))
            .is_ok_and(|l| l.contains("Written"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "watch printed nothing");
    }
    node.kill();
    let status = exit_within(&mut watch.0, Duration::from_secs(30))
        .expect("the watch's status")
        .expect("space watch kept waiting after its node went away");
    assert_eq!(status.code(), Some(2));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut watch.0.stderr.take().expect("stderr"), &mut stderr)
        .unwrap();
    assert!(stderr.contains("went away"), "{stderr}");
}

/// Presses Ctrl-C on a background `space`: its exit code, once it has exited (`None`
/// when killed by a signal); fails if it still runs 10 s later.
fn interrupt(watch: &mut Background) -> Option<i32> {
    signal(watch.0.id(), Signal::Interrupt).expect("Ctrl-C");
    let status = exit_within(&mut watch.0, Duration::from_secs(10))
        .expect("the status of space")
        .expect("space went on after Ctrl-C");
    status.code()
}

/// Ctrl-C ends a watch even when it comes while the watch is busy asking its node
/// whether it is there (the node paused, so the question waits), not only while it
/// waits for events.
#[test]
fn ctrl_c_ends_a_watch_whatever_it_is_doing() {
    let node = NodeProcess::start(&[]);
    for args in [&["watch", "Alert"][..], &["stats", "--watch", "1s"][..]] {
        let (mut watch, printed) = background(&node, args);
        // Listening: the watch says so; the stats watch has printed its first line.
        if args[0] == "watch" {
            let mut said = BufReader::new(watch.0.stderr.take().expect("stderr")).lines();
            said.next().expect("a line").expect("text");
        } else {
            printed
                .recv_timeout(Duration::from_secs(10))
                .expect("a line");
        }
        signal(node.pid(), Signal::Stop).expect("pause the node");
        // The watch asks every 2 s whether its node is there, the stats watch every 1 s
        // for its counters; either question now waits for the paused node.
        std::thread::sleep(Duration::from_secs(3));
        let code = interrupt(&mut watch);
        signal(node.pid(), Signal::Continue).expect("resume the node");
        assert_eq!(code, Some(0), "space {args:?} after Ctrl-C");
    }
}

/// `space types` lists the entry types with their counts; a watch stopped with Ctrl-C
/// is picked up with `--resume`, and gets what was written meanwhile.
#[test]
fn types_and_a_watch_resumed_after_ctrl_c() {
    let node = NodeProcess::start(&[]);
    assert_eq!(space(&node, &["types"]).status.code(), Some(1), "none yet");

    let (mut watch, printed) = background(&node, &["--json", "watch", "Alert"]);
    let mut said = BufReader::new(watch.0.stderr.take().expect("stderr")).lines();
    let first = said.next().expect("a line").expect("text");
    let id: u64 = first
        .strip_prefix("watching as subscription ")
        .and_then(|rest| rest.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{first}"));
    for level in 1..=3 {
        stdout(&space(
            &node,
            &["write", "Alert", &format!(r#"{{"level":{level}}}"#)],
        ));
        let line = printed
            .recv_timeout(Duration::from_secs(10))
            .expect("an event");
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(event["seq"], level, "{line}");
    }
    // Ctrl-C: the watch leaves its subscription on the node and exits cleanly.
    assert_eq!(interrupt(&mut watch), Some(0));

    for level in 4..=5 {
        stdout(&space(
            &node,
            &["write", "Alert", &format!(r#"{{"level":{level}}}"#)],
        ));
    }
    let resumed = space(
        &node,
        &[
            "--json",
            "watch",
            "Alert",
            "--resume",
            &id.to_string(),
            "--after",
            "3",
            "--count",
            "2",
        ],
    );
    let seqs: Vec<_> = json_lines(&resumed)
        .iter()
        .map(|e| e["seq"].clone())
        .collect();
    assert_eq!(seqs, [4, 5]);

    let types = json_lines(&space(&node, &["--json", "types"]));
    assert_eq!(types.len(), 1, "{types:?}");
    assert_eq!(
        (
            types[0]["entry_type"].as_str(),
            types[0]["entries"].as_u64()
        ),
        (Some("Alert"), Some(5))
    );
    assert!(types[0]["bytes"].as_u64().is_some_and(|b| b > 0));
}

/// The CLI says when a query names a field no entry of the type ever had, and a literal
/// of another kind than the field holds is an error.
#[test]
fn the_cli_notes_fields_never_seen_and_refuses_kinds_that_cannot_match() {
    let node = NodeProcess::start(&[]);
    let fresh = space(&node, &["count", "Order", "status:New"]);
    assert!(
        String::from_utf8_lossy(&fresh.stderr)
            .contains("no entry of type \"Order\" was written yet"),
        "{fresh:?}"
    );
    stdout(&space(
        &node,
        &["write", "Order", r#"{"status":"New","amount":5}"#],
    ));
    let typo = space(&node, &["count", "Order", "stauts:New"]);
    assert_eq!(stdout(&typo).trim(), "0");
    let note = String::from_utf8_lossy(&typo.stderr).into_owned();
    assert!(
        note.contains("has had a field \"stauts\"") && note.contains("fields seen: amount, status"),
        "{note}"
    );
    let fine = space(&node, &["count", "Order", "status:New AND amount:>1"]);
    assert_eq!(stdout(&fine).trim(), "1");
    assert!(fine.stderr.is_empty(), "{fine:?}");
    let kind = space(&node, &["read", "Order", "amount:lots"]);
    assert_eq!(kind.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&kind.stderr).contains("holds number values"),
        "{kind:?}"
    );
}

/// `space stats --watch` prints the counters again at each interval.
#[test]
fn stats_watch_prints_the_counters_at_each_interval() {
    let node = NodeProcess::start(&[]);
    stdout(&space(&node, &["write", "Alert", r#"{"level":1}"#]));
    stdout(&space(&node, &["write", "Alert", r#"{"level":2}"#]));
    let out = space(
        &node,
        &["--json", "stats", "--watch", "100ms", "--count", "3"],
    );
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 3, "{lines:?}");
    for line in &lines {
        assert_eq!(line["entries"], 2, "{line}");
        assert!(line["entries_per_s"].is_number(), "{line}");
    }
    let text = stdout(&space(
        &node,
        &["stats", "--watch", "100ms", "--count", "1"],
    ));
    assert!(text.starts_with("2 entries"), "{text}");
    let bad = space(&node, &["stats", "--watch", "0s", "--count", "1"]);
    assert_eq!(bad.status.code(), Some(2));
}

/// `--node` takes a cluster's nodes separated by commas, as the library's `connect` does:
/// one that does not answer is passed over.
#[test]
fn the_cli_takes_a_list_of_nodes_and_passes_over_one_that_is_down() {
    let node = NodeProcess::start(&[]);
    let down = common::free_addrs(1).remove(0);
    let listed = format!("{down}, {}", node.addr);
    let run = |args: &[&str]| {
        Command::new(cli_binary().expect("the space CLI"))
            .args(["--node", &listed])
            .args(args)
            .output()
            .expect("run space")
    };
    stdout(&run(&["write", "Job", r#"{"n":1}"#]));
    assert_eq!(stdout(&run(&["count", "Job"])).trim(), "1");
}

/// Output piped into a program that stops reading (`space contents Job | head -1`) ends
/// the tool quietly, as with other Unix tools: no panic on a closed stdout.
#[test]
fn output_into_a_closed_pipe_ends_the_cli_quietly() {
    let node = NodeProcess::start(&[]);
    for n in 0..50 {
        stdout(&space(&node, &["write", "Job", &format!(r#"{{"n":{n}}}"#)]));
    }
    let mut child = Command::new(cli_binary().expect("the space CLI"))
        .args(["--node", &node.addr, "contents", "Job"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run space");
    // The reader goes away before the tool writes.
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("space ends");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(output.status.code(), Some(101), "{output:?}");
}

/// A CLI take whose node took the entry, with the answer held on its way: the take of
/// `space take Job --timeout <timeout>`, run through a proxy the node advertises (the
/// test asks the node directly, at the returned address).
struct HeldTake {
    cli: Background,
    stderr: std::sync::mpsc::Receiver<String>,
    proxy: Proxy,
    addr: String,
    _node: NodeProcess,
    _runtime: tokio::runtime::Runtime,
}

impl HeldTake {
    fn start(timeout: &str) -> HeldTake {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let addr = free_addrs(1).remove(0);
        let proxy = runtime
            .block_on(Proxy::start(addr.parse().expect("an address")))
            .expect("a proxy");
        let node = NodeProcess::start_at(&addr, &["--advertise", &proxy.addr().to_string()]);
        let (mut cli, _stdout) = background_at(
            &proxy.addr().to_string(),
            &["take", "Job", "--timeout", timeout],
        );
        let stderr = lines_of(cli.0.stderr.take().expect("stderr"));
        assert!(
            until(Duration::from_secs(10), || waiters_on(&addr) == 1),
            "the CLI's take never waited on the node"
        );
        // The entry arrives and the waiting take takes it; its answer is held on the way.
        proxy.set(Link::HoldReplies);
        write_on(&addr, "Job", 1);
        assert!(
            until(Duration::from_secs(10), || count_on(&addr, "Job") == 0),
            "the CLI's take did not take the entry"
        );
        HeldTake {
            cli,
            stderr,
            proxy,
            addr,
            _node: node,
            _runtime: runtime,
        }
    }

    /// Opens the link again, then waits up to `limit` for the CLI to exit: its exit code
    /// (`None` while it still runs, or if a signal ended it), once what it said meanwhile
    /// is added to `said`.
    fn exit_code_once_open(&mut self, limit: Duration, said: &mut Vec<String>) -> Option<i32> {
        self.proxy.set(Link::Open);
        let exited = until(limit, || self.cli.0.try_wait().ok().flatten().is_some());
        said.extend(self.stderr.try_iter());
        if !exited {
            return None;
        }
        self.cli.0.wait().expect("exited").code()
    }
}

/// A take the CLI gives up because its node stopped answering, after the node took the
/// entry, is revoked before the CLI exits: the entry comes back once the node can be
/// reached again, rather than stay taken by a process that exited before its revoke went.
#[test]
fn a_take_the_cli_gives_up_gives_its_entry_back_before_the_cli_exits() {
    let mut held = HeldTake::start("3s");
    // Then the node cannot be reached at all: the CLI gives the take up and revokes it,
    // and the revoke cannot leave the CLI yet (a revoke written to a connection before
    // its process exits would still arrive).
    held.proxy.set(Link::Cut);
    let mut said = Vec::new();
    let gave_up = until(Duration::from_secs(30), || {
        said.extend(held.stderr.try_iter());
        said.iter().any(|l| l.contains("giving back"))
            || held.cli.0.try_wait().ok().flatten().is_some()
    });
    assert!(
        gave_up,
        "the CLI neither gave the take up nor exited: {said:?}"
    );
    assert_eq!(
        held.exit_code_once_open(Duration::from_secs(70), &mut said),
        Some(2),
        "the CLI did not exit with code 2 once its node answered again: {said:?}"
    );
    assert!(
        until(Duration::from_secs(5), || count_on(&held.addr, "Job") == 1),
        "the entry the CLI's take gave up on was not given back: {said:?}"
    );
}

/// Ctrl-C during a take gives the take up as a failure would: the CLI revokes it and waits
/// for the revoke before it exits (code 130), so an entry whose answer was on its way when
/// the key was pressed is given back rather than kept by a process that is gone.
#[test]
fn ctrl_c_during_a_take_gives_its_entry_back() {
    let mut held = HeldTake::start("30s");
    // Ctrl-C comes while the take's answer is held.
    signal(held.cli.0.id(), Signal::Interrupt).expect("Ctrl-C");
    // The revoke reaches the node (only answers are held), which puts the entry back; the
    // CLI waits for the revoke's answer before it exits.
    let given_back = until(Duration::from_secs(10), || count_on(&held.addr, "Job") == 1);
    let mut said: Vec<String> = held.stderr.try_iter().collect();
    assert!(
        given_back,
        "the entry the interrupted take had taken was not given back: {said:?}"
    );
    assert_eq!(
        held.exit_code_once_open(Duration::from_secs(30), &mut said),
        Some(130),
        "the CLI did not exit with code 130 once its revoke was answered: {said:?}"
    );
    assert!(
        said.iter().any(|l| l.contains("interrupted")),
        "the CLI did not say it was interrupted: {said:?}"
    );
}

/// A process killed while its take waits on a node ends that wait: the node sees the
/// connection close and drops the take, so the next entry written goes to a live taker
/// rather than into the answer of a take nobody will read (kept for a retry that never
/// comes, then gone).
#[test]
fn a_take_whose_process_is_killed_while_waiting_takes_nothing() {
    let node = NodeProcess::start_at(&free_addrs(1).remove(0), &[]);
    let (cli, _stdout) = background(&node, &["take", "Job", "--timeout", "60s"]);
    assert!(
        until(Duration::from_secs(10), || waiters_on(&node.addr) == 1),
        "the CLI's take never waited on the node"
    );
    drop(cli); // kill -9, and reaped
    assert!(
        until(Duration::from_secs(10), || waiters_on(&node.addr) == 0),
        "the node kept the take of a process that is gone waiting"
    );
    write_on(&node.addr, "Job", 1);
    assert!(
        until(Duration::from_secs(2), || count_on(&node.addr, "Job") == 1),
        "the entry went to the take of a process that is gone"
    );
}

/// On a replicated cluster, a watch stopped with Ctrl-C prints its position (its last
/// number on each shard), and `--resume-at` picks it up there: it gets what was written
/// meanwhile, each event naming its shard, and nothing it had.
#[test]
fn a_watch_of_a_replicated_cluster_resumes_at_its_position() {
    let addrs = free_addrs(3);
    let _cluster = common::start_cluster_of(&addrs, "3", common::replicated::SHARDS, &[]);
    let seeds = addrs.join(",");
    let (mut watch, printed) = background_at(&seeds, &["--json", "watch", "Alert"]);
    let said = lines_of(watch.0.stderr.take().expect("stderr"));
    let first = said.recv_timeout(Duration::from_secs(30)).expect("a line");
    assert!(first.contains("Ctrl-C prints the position"), "{first}");
    let write = |level: u32| {
        stdout(&space_at(
            &seeds,
            &["write", "Alert", &format!(r#"{{"level":{level}}}"#)],
        ))
    };
    for level in 1..=3 {
        write(level);
        let line = printed
            .recv_timeout(Duration::from_secs(10))
            .expect("an event");
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(event["shard"].is_u64(), "{line}");
    }
    assert_eq!(interrupt(&mut watch), Some(0));
    let stopped = said
        .recv_timeout(Duration::from_secs(10))
        .expect("the position");
    let position = stopped
        .strip_prefix("stopped: --resume-at '")
        .and_then(|rest| rest.strip_suffix("' picks it up"))
        .unwrap_or_else(|| panic!("{stopped}"));

    let keys: Vec<String> = (4..=5)
        .map(|level| write(level).trim().to_owned())
        .collect();
    let resumed = space_at(
        &seeds,
        &[
            "--json",
            "watch",
            "Alert",
            "--resume-at",
            position,
            "--count",
            "2",
        ],
    );
    let told: Vec<String> = json_lines(&resumed)
        .iter()
        .map(|e| e["key"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(told.len(), 2, "{told:?}");
    for key in &keys {
        assert!(
            told.iter().any(|t| key.contains(t.as_str())),
            "{key} not in {told:?}"
        );
    }
    let refused = space_at(
        &seeds,
        &["watch", "Alert", "--resume-at", "{not a position"],
    );
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--resume-at takes the position"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
