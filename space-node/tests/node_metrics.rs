//! The admin endpoints of a real node: `/metrics` parses as the Prometheus text format and
//! its counters move as the operations done; `/health` answers; the token guards them.

mod common;

use std::time::Duration;

use common::{NodeProcess, Signal, free_addrs};
use serde::{Deserialize, Serialize};
use space_client::{ClientConfig, Query, SpaceError, connect_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Reading {
    sensor: String,
    value: u64,
}
space_client::entry!(Reading, "metrics.Reading", key = sensor);

/// Waits up to 20 s until the node whose admin endpoints are at `admin` is ready.
async fn until_ready(admin: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = get(admin, "/health/ready", None).await;
        if status == 200 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{admin} never ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A GET of `path` on `addr`: the status code and the body.
async fn get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    (status, body.to_owned())
}

/// The samples of a scrape, parsed as the Prometheus text format.
async fn scrape(addr: &str) -> prometheus_parse::Scrape {
    let (status, body) = get(addr, "/metrics", None).await;
    assert_eq!(status, 200, "{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("the Prometheus text format")
}

/// The value of `name` whose labels include all of `labels` (0 when there is none yet).
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
            prometheus_parse::Value::Summary(_) => 0.0,
        })
        .sum()
}

/// Writes readings `prefix-i` for each `i` of `ids`.
async fn write_readings(space: &space_client::Space, prefix: &str, ids: std::ops::Range<u64>) {
    for i in ids {
        space
            .write(&Reading {
                sensor: format!("{prefix}-{i}"),
                value: i,
            })
            .await
            .unwrap();
    }
}

/// Metrics the dashboard draws that a node serves only in a cluster with followers and
/// snapshots (checked by `a_leader_reports_each_followers_replication_lag`).
const ONLY_WITH_FOLLOWERS: &[&str] = &[
    "space_replication_lag_entries",
    "space_shard_commit_index",
    "space_shard_applied_index",
    "space_shard_last_log_index",
    "space_snapshot_bytes",
    "space_snapshot_created_timestamp_seconds",
];

/// Every metric the Grafana dashboard draws.
fn dashboard_metrics() -> std::collections::BTreeSet<String> {
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../docs/grafana/space-dashboard.json"))
            .expect("the dashboard is JSON");
    let mut drawn = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("an expression");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("space_") {
                    drawn.insert(word.to_owned());
                }
            }
        }
    }
    drawn
}

/// Waits up to 10 s until the node's admin endpoint at `admin` serves every one of
/// `metrics`.
async fn until_served(admin: &str, metrics: &[String]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = get(admin, "/metrics", None).await;
        let served: std::collections::BTreeSet<&str> = body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let missing: Vec<_> = metrics
            .iter()
            .filter(|m| !served.contains(m.as_str()))
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dashboard draws metrics the node does not serve: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_operations_done_and_health_answers() {
    let admin = free_addrs(1).remove(0);
    let node = NodeProcess::start(&["--admin-listen", &admin]);
    assert_eq!(get(&admin, "/health/live", None).await.0, 200);
    assert_eq!(get(&admin, "/health/ready", None).await.0, 200);
    let space = connect_with(&node.addr, ClientConfig::default())
        .await
        .unwrap();
    let ok_writes = [("operation", "write"), ("outcome", "ok")];
    let sub = space
        .notify(&Query::of::<Reading>(), space_client::EventKinds::WRITTEN)
        .await
        .unwrap();
    let before = scrape(&admin).await;

    write_readings(&space, "s", 0..1_000).await;
    // A refused write counts as an error.
    let again = space
        .write(&Reading {
            sensor: "s-0".into(),
            value: 0,
        })
        .await;
    assert!(
        matches!(again, Err(SpaceError::KeyExists { .. })),
        "{again:?}"
    );
    let taken = space
        .take::<Reading>(&Query::of::<Reading>(), Duration::ZERO)
        .await
        .unwrap();
    assert!(taken.is_some());

    // The subscriber was told of every write.
    for _ in 0..1_000 {
        let told = tokio::time::timeout(Duration::from_secs(10), sub.recv_async()).await;
        assert!(matches!(
            told,
            Ok(Some(space_client::Notification::Event(_)))
        ));
    }
    // A batch's acknowledgement reaches the node after the events reach the subscriber.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        let after = scrape(&admin).await;
        let delivered = value(&after, "space_events_delivered_total", &[])
            - value(&before, "space_events_delivered_total", &[]);
        if delivered >= 1_000.0 || std::time::Instant::now() > deadline {
            break after;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let rose = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    assert_eq!(rose("space_operations_total", &ok_writes), 1_000.0);
    assert_eq!(
        rose(
            "space_operations_total",
            &[("operation", "write"), ("outcome", "error")]
        ),
        1.0
    );
    assert_eq!(
        rose(
            "space_operations_total",
            &[("operation", "take"), ("outcome", "ok")]
        ),
        1.0
    );
    // Every write's latency is in the histogram.
    assert_eq!(
        rose(
            "space_operation_duration_seconds",
            &[("operation", "write")]
        ),
        1_001.0
    );
    assert_eq!(
        value(
            &after,
            "space_entries",
            &[("entry_type", "metrics.Reading")]
        ),
        999.0
    );
    assert!(
        value(
            &after,
            "space_entry_bytes",
            &[("entry_type", "metrics.Reading")]
        ) > 0.0
    );
    assert!(value(&after, "space_connections", &[]) >= 1.0);
    assert_eq!(rose("space_events_delivered_total", &[]), 1_000.0);
    assert_eq!(rose("space_event_gaps_total", &[]), 0.0);
    // The refused write is counted by the error's kind.
    assert_eq!(
        rose("space_rejected_requests_total", &[("reason", "key_exists")]),
        1.0
    );

    // A take that waits shows as a waiter of its entry type while it waits.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    struct Awaited {
        id: u64,
    }
    space_client::entry!(Awaited, "metrics.Awaited");
    let waiting = {
        let space = space.clone();
        tokio::spawn(async move {
            space
                .take::<Awaited>(&Query::of::<Awaited>(), Duration::from_secs(30))
                .await
        })
    };
    let awaited = [("entry_type", "metrics.Awaited")];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while value(&scrape(&admin).await, "space_waiters", &awaited) != 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the take never waited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    space.write(&Awaited { id: 1 }).await.unwrap();
    assert!(waiting.await.unwrap().unwrap().is_some());
    assert_eq!(value(&scrape(&admin).await, "space_waiters", &awaited), 0.0);
    assert_eq!(value(&after, "space_subscriptions", &[]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoints_want_the_token_when_the_node_has_one() {
    the_token_is_wanted("s3cret").await;
    // A token with characters a browser percent-encodes in an address.
    the_token_is_wanted("s3cret/+=").await;
}

async fn the_token_is_wanted(token: &str) {
    let in_address: String = token
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'0'..=b'9' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect();
    let admin = free_addrs(1).remove(0);
    let node = NodeProcess::start(&["--admin-listen", &admin, "--auth-token", token]);
    assert_eq!(get(&admin, "/metrics", None).await.0, 401);
    assert_eq!(get(&admin, "/health/live", Some("wrong")).await.0, 401);
    assert_eq!(get(&admin, "/health/live", Some(token)).await.0, 200);
    // The page and its data, from a browser: the token in the address.
    assert_eq!(get(&admin, "/", None).await.0, 401);
    assert_eq!(get(&admin, "/?token=guess", None).await.0, 401);
    let (status, page) = get(&admin, &format!("/?token={in_address}"), None).await;
    assert_eq!(status, 200);
    assert!(page.contains("<title>space"), "{page}");
    assert_eq!(
        get(&admin, &format!("/api/picture?token={in_address}x"), None)
            .await
            .0,
        401
    );
    let (status, picture) = get(
        &admin,
        &format!("/api/picture?x=1&token={in_address}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{picture}");
    // A client with the wrong token is refused, and counted by reason.
    let wrong = ClientConfig {
        token: Some("guess".into()),
        ..ClientConfig::default()
    };
    assert!(connect_with(&node.addr, wrong).await.is_err());
    let (status, body) = get(&admin, "/metrics", Some(token)).await;
    assert_eq!(status, 200);
    assert!(body.contains("space_connections"), "{body}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap();
    assert!(
        value(
            &scrape,
            "space_rejected_connections_total",
            &[("reason", "token")]
        ) >= 1.0,
        "{body}"
    );
}

/// Each node of a cluster of more nodes than replicas (two nodes, replication 1: each
/// replicates half the shards) is ready once the meta group has committed the layout and
/// the shards it replicates have leaders; the others' leaders it does not know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_is_ready_once_its_own_shards_have_leaders() {
    let addrs = free_addrs(4);
    let (data, admins) = (&addrs[..2], &addrs[2..]);
    let cluster = data.join(",");
    let dirs = [
        space_tests::TempDir::new("ready-1"),
        space_tests::TempDir::new("ready-2"),
    ];
    let start = |i: usize| {
        NodeProcess::start_at(
            &data[i],
            &[
                "--data-dir",
                &dirs[i].0.to_string_lossy(),
                "--initial-cluster",
                &cluster,
                "--replication",
                "1",
                "--shards",
                "4",
                "--admin-listen",
                &admins[i],
            ],
        )
    };
    // Alone, the first node has no meta group quorum (its voters are both nodes).
    let _first = start(0);
    let (status, body) = get(&admins[0], "/health/ready", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("meta group"), "{body}");
    let _second = start(1);
    for admin in admins {
        until_ready(admin).await;
    }
    // Each node knows the leaders of its own shards; `space topology` shows them all.
    let shown =
        std::process::Command::new(space_tests::process::cli_binary().expect("the space CLI"))
            .args(["--node", &data[0], "--json", "topology"])
            .output()
            .unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    let shards = shown["shards"].as_array().expect("shards");
    assert_eq!(shards.len(), 4, "{shown}");
    assert!(shards.iter().all(|s| s["leader"].is_u64()), "{shown}");
}

/// A replicated node (a cluster of one, replication 1) reports its write-ahead log's group
/// commits and each shard's term and leader, and is ready once every shard has a leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_node_reports_its_log_and_its_shards() {
    let addrs = free_addrs(2);
    let (addr, admin) = (&addrs[0], &addrs[1]);
    let dir = space_tests::TempDir::new("metrics");
    let _node = NodeProcess::start_at(
        addr,
        &[
            "--data-dir",
            &dir.0.to_string_lossy(),
            "--initial-cluster",
            addr,
            "--replication",
            "1",
            "--shards",
            "4",
            "--admin-listen",
            admin,
        ],
    );
    until_ready(admin).await;
    let space = connect_with(addr, ClientConfig::default()).await.unwrap();
    let before = scrape(admin).await;
    write_readings(&space, "r", 0..100).await;
    let after = scrape(admin).await;
    let commits = value(&after, "space_log_fsync_seconds", &[])
        - value(&before, "space_log_fsync_seconds", &[]);
    assert!(
        (1.0..=200.0).contains(&commits),
        "{commits} group commits for 100 acknowledged writes"
    );
    for shard in ["0", "1", "2", "3"] {
        assert_eq!(
            value(&after, "space_shard_leader", &[("shard", shard)]),
            1.0
        );
        assert!(value(&after, "space_shard_term", &[("shard", shard)]) >= 1.0);
    }
    assert_eq!(value(&after, "space_shards_led", &[]), 4.0);
    // A cluster of one: its meta group is led by the node, at the layout's first version.
    assert_eq!(value(&after, "space_meta_group_leader", &[]), 1.0);
    assert!(value(&after, "space_meta_group_term", &[]) >= 1.0);
    assert_eq!(value(&after, "space_layout_version", &[]), 1.0);

    // Every metric the Grafana dashboard in the repository draws is one the node serves
    // (a subscriber told of a write and a refused connection make the last ones appear).
    let sub = space
        .notify(&Query::of::<Reading>(), space_client::EventKinds::WRITTEN)
        .await
        .unwrap();
    space
        .write(&Reading {
            sensor: "last".into(),
            value: 0,
        })
        .await
        .unwrap();
    let told = tokio::time::timeout(Duration::from_secs(10), sub.recv_async()).await;
    assert!(matches!(
        told,
        Ok(Some(space_client::Notification::Event(_)))
    ));
    // A write of a key that is there is refused (reason "key_exists").
    let again = space
        .write(&Reading {
            sensor: "r-0".into(),
            value: 0,
        })
        .await;
    assert!(
        matches!(again, Err(SpaceError::KeyExists { .. })),
        "{again:?}"
    );
    // A connection that closes before its handshake is refused (reason "handshake").
    drop(tokio::net::TcpStream::connect(addr).await.unwrap());
    let drawn = dashboard_metrics();
    assert!(drawn.len() >= 10, "{drawn:?}");
    let here: Vec<String> = drawn
        .into_iter()
        .filter(|m| !ONLY_WITH_FOLLOWERS.contains(&m.as_str()))
        .collect();
    until_served(admin, &here).await;
}

/// A subscriber that does not keep up shows as lag, then as a gap counted when it is told
/// of the events it lost; a durable node reports its snapshots' size and time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_shows_lag_and_gaps_and_snapshots_are_reported() {
    use space_client::wire::{Request, Response};
    use space_client::{Connection, EventKinds, Lease, Notification};

    let admin = free_addrs(1).remove(0);
    let dir = space_tests::TempDir::new("metrics-snapshots");
    let node = NodeProcess::start(&[
        "--admin-listen",
        &admin,
        "--data-dir",
        &dir.0.to_string_lossy(),
        "--snapshot-after-bytes",
        "16384",
        "--max-queued-events",
        "100",
    ]);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let conn = Connection::open(&node.addr, ClientConfig::default())
        .await
        .unwrap();
    // A polled subscription nobody polls: the slowest subscriber there is.
    let Response::Subscribed(id) = conn
        .call(Request::Subscribe {
            query: Query::of::<Reading>(),
            kinds: EventKinds::WRITTEN,
            lease: Lease::For(Duration::from_secs(120)),
            endpoint: None,
        })
        .await
        .unwrap()
    else {
        panic!("not subscribed")
    };
    let space = connect_with(&node.addr, ClientConfig::default())
        .await
        .unwrap();
    let before = scrape(&admin).await;
    write_readings(&space, "slow", 0..1_000).await;
    let behind = scrape(&admin).await;
    let lag = value(&behind, "space_subscriber_lag_events", &[]);
    assert!(
        (100.0..=1_000.0).contains(&lag),
        "a subscriber that took none of 1,000 events (100 held) lags: {lag}"
    );

    // Polled now: what fell off the queue arrives as a gap, and is counted.
    let Response::Notifications { notifications, .. } = conn
        .call(Request::Poll {
            id,
            after: 0,
            wait: Duration::from_secs(1),
        })
        .await
        .unwrap()
    else {
        panic!("no notifications")
    };
    assert!(
        matches!(notifications.first(), Some(Notification::Gap { .. })),
        "the poll begins with a gap: {:?}",
        notifications.first()
    );
    let after = scrape(&admin).await;
    let gaps = value(&after, "space_event_gaps_total", &[])
        - value(&before, "space_event_gaps_total", &[]);
    assert!(gaps >= 1.0, "the gap is counted: {gaps}");
    assert!(
        value(&after, "space_subscriber_lag_events", &[]) < lag,
        "the lag falls once events are taken"
    );

    // Every write was a record of the write-ahead log.
    let appended = value(&after, "space_log_appends_total", &[])
        - value(&before, "space_log_appends_total", &[]);
    assert!(
        appended >= 1_000.0,
        "{appended} records appended for 1,000 writes"
    );
    // About 1,000 logged writes are more than 16 KiB of log: a snapshot was made.
    let bytes = value(&after, "space_snapshot_bytes", &[("shard", "all")]);
    assert!(bytes > 0.0, "a snapshot of some bytes: {bytes}");
    let made = value(
        &after,
        "space_snapshot_created_timestamp_seconds",
        &[("shard", "all")],
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (started - 1.0..=now + 1.0).contains(&made),
        "made during the test: {made} not in {started}..{now}"
    );
}

/// On a cluster of three, each shard's log indexes and snapshots are reported, and its
/// leader reports each follower's lag: a paused follower falls behind by the writes it missed, and
/// catches up when it wakes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_reports_each_followers_replication_lag() {
    let addrs = free_addrs(4);
    let (data, admin) = (&addrs[..3], &addrs[3]);
    let cluster = data.join(",");
    let dirs: Vec<_> = (0..3)
        .map(|i| space_tests::TempDir::new(&format!("metrics-lag-{i}")))
        .collect();
    let nodes: Vec<NodeProcess> = (0..3)
        .map(|i| {
            let mut args = vec![
                "--data-dir".to_owned(),
                dirs[i].0.to_string_lossy().into_owned(),
                "--initial-cluster".to_owned(),
                cluster.clone(),
                "--shards".to_owned(),
                "4".to_owned(),
                "--snapshot-after-entries".to_owned(),
                "20".to_owned(),
            ];
            if i == 0 {
                args.extend(["--admin-listen".to_owned(), admin.clone()]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            NodeProcess::start_at(&data[i], &args)
        })
        .collect();
    until_ready(admin).await;
    let space = connect_with(&cluster, ClientConfig::default())
        .await
        .unwrap();
    // The writes go to node 1's shards only (shard s holds ranges s * 256 up to
    // (s + 1) * 256): a write to a shard node 3 led would wait for its new leader.
    let shard_of = |sensor: &str| {
        use space_client::IntoKey;
        (space_client::wire::range_of(&sensor.to_key()) / 256).to_string()
    };
    let write = |from: u64, n: u64, only: Option<Vec<String>>| {
        let space = space.clone();
        async move {
            let mut done = 0;
            for i in from..from + n {
                let sensor = format!("lag-{i}");
                if only
                    .as_ref()
                    .is_some_and(|o| !o.contains(&shard_of(&sensor)))
                {
                    continue;
                }
                space.write(&Reading { sensor, value: i }).await.unwrap();
                done += 1;
            }
            done
        }
    };
    assert_eq!(write(0, 200, None).await, 200);
    let shards: Vec<String> = (0..4).map(|s| s.to_string()).collect();
    let scrape1 = scrape(admin).await;
    // The shards node 1 leads.
    let mine: Vec<&String> = shards
        .iter()
        .filter(|s| value(&scrape1, "space_shard_leader", &[("shard", s)]) == 1.0)
        .collect();
    assert!(!mine.is_empty(), "node 1 leads a shard");
    for s in &shards {
        let (last, committed, applied, log) = (
            value(&scrape1, "space_shard_last_log_index", &[("shard", s)]),
            value(&scrape1, "space_shard_commit_index", &[("shard", s)]),
            value(&scrape1, "space_shard_applied_index", &[("shard", s)]),
            value(&scrape1, "space_shard_log_bytes", &[("shard", s)]),
        );
        assert!(
            applied >= 1.0 && committed >= applied && last >= committed && log >= 1.0,
            "shard {s}: last {last}, committed {committed}, applied {applied}, {log} bytes of log kept"
        );
    }

    // Every shard's log grew past 20 entries: each was snapshot on node 1.
    for s in &shards {
        let bytes = value(&scrape1, "space_snapshot_bytes", &[("shard", s)]);
        let made = value(
            &scrape1,
            "space_snapshot_created_timestamp_seconds",
            &[("shard", s)],
        );
        assert!(
            bytes > 0.0 && made > 0.0,
            "shard {s}: snapshot of {bytes} bytes made at {made}"
        );
    }

    // Node 3 pauses: the shards node 1 leads go on without it, and it falls behind.
    nodes[2].signal(Signal::Stop);
    let written = write(200, 200, Some(mine.iter().map(|s| (*s).clone()).collect())).await;
    assert!(written >= 20, "{written} writes to node 1's shards");
    let paused = scrape(admin).await;
    nodes[2].signal(Signal::Continue);
    let behind: f64 = mine
        .iter()
        .map(|s| {
            value(
                &paused,
                "space_replication_lag_entries",
                &[("shard", s), ("follower", "3")],
            )
        })
        .sum();
    let up_to_date: f64 = mine
        .iter()
        .map(|s| {
            value(
                &paused,
                "space_replication_lag_entries",
                &[("shard", s), ("follower", "2")],
            )
        })
        .sum();
    assert!(
        behind >= 20.0,
        "node 3, paused, lacks the writes to node 1's shards: {behind}"
    );
    assert!(
        up_to_date < behind,
        "node 2 kept up ({up_to_date}) where node 3 fell behind ({behind})"
    );
    // The dashboard's replication panels draw what this node serves.
    let replication: Vec<String> = ONLY_WITH_FOLLOWERS
        .iter()
        .map(|m| (*m).to_owned())
        .collect();
    assert!(replication.iter().all(|m| dashboard_metrics().contains(m)));
    until_served(admin, &replication).await;
    // Awake, it catches up.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = scrape(admin).await;
        let lag: f64 = mine
            .iter()
            .map(|s| {
                value(
                    &now,
                    "space_replication_lag_entries",
                    &[("shard", s), ("follower", "3")],
                )
            })
            .sum();
        if lag == 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node 3 never caught up: {lag}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(nodes);
}

/// After a node's push connection to a client ends (the node was killed), the client's
/// hurried renewals go to that node only (it named itself when it connected): the live
/// nodes get none, not one per round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hurried_renewals_go_only_to_the_node_that_went_away() {
    let addrs = free_addrs(3);
    let admin = free_addrs(1).remove(0);
    let mut cluster =
        common::start_cluster_of(&addrs, "3", "4", &[&["--admin-listen", &admin], &[], &[]]);
    until_ready(&admin).await;
    let config = ClientConfig {
        // Regular renewals 15 to 20 s apart: none in what is watched here.
        subscription_lease: Duration::from_secs(60),
        delivery: space_client::Delivery::Push,
        ..ClientConfig::default()
    };
    let space = connect_with(&addrs.join(","), config).await.unwrap();
    let _sub = space
        .notify(&Query::of::<Reading>(), space_client::EventKinds::WRITTEN)
        .await
        .unwrap();
    let renewals = |scrape: &prometheus_parse::Scrape| {
        value(
            scrape,
            "space_operations_total",
            &[("operation", "renew_subscription")],
        )
    };
    let before = renewals(&scrape(&admin).await);
    if let Some(node) = cluster.nodes.pop() {
        node.kill();
    }
    // Rounds at once, then 250, 750, 1,750 and 3,750 ms after, all failing on node 3.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = renewals(&scrape(&admin).await);
    assert_eq!(
        after - before,
        0.0,
        "node 1 was renewed {} times",
        after - before
    );
}
