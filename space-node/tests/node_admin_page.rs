//! The admin page in a real browser: three real nodes of a replicated cluster, headless
//! Chromium driven through WebDriver (`chromedriver`), and assertions on what the page
//! shows: three nodes up, every shard with a leader, the entry types written with their
//! counts; then one node killed, and the page showing it down and the shards' new leaders
//! within 5 s. Screenshots are saved (`SPACE_SCREENSHOT_DIR`, by default the test's
//! target directory).
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); the paths
//! can be given with `SPACE_CHROMIUM` and `SPACE_CHROMEDRIVER`.

mod common;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{NodeProcess, free_addrs};
use fantoccini::{Client, ClientBuilder};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use space_client::{ClientConfig, connect_with};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Order {
    number: String,
}
space_client::entry!(Order, "page.Order", key = number);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Invoice {
    number: String,
}
space_client::entry!(Invoice, "page.Invoice", key = number);

const SHARDS: usize = 16;

/// A program found by an environment variable, or at its Debian path, or on the `PATH`.
fn program(var: &str, debian: &str, name: &str) -> PathBuf {
    if let Ok(path) = std::env::var(var) {
        return PathBuf::from(path);
    }
    if std::path::Path::new(debian).exists() {
        return PathBuf::from(debian);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.exists())
        })
        .unwrap_or_else(|| {
            panic!(
                "{name} is needed for the browser test: apt-get install chromium chromium-driver \
                 (or set {var})"
            )
        })
}

/// `chromedriver` in a process group of its own: killed with the browsers it started
/// when dropped, even when the test fails.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Driver {
        let port = free_addrs(1)[0]
            .rsplit_once(':')
            .map(|(_, p)| p.to_owned())
            .expect("a port");
        let child = Command::new(program(
            "SPACE_CHROMEDRIVER",
            "/usr/bin/chromedriver",
            "chromedriver",
        ))
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start chromedriver");
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        driver
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The whole group: chromedriver and the browsers it started.
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver) -> Client {
    let chromium = program("SPACE_CHROMIUM", "/usr/bin/chromium", "chromium");
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            // Headless, as root in CI, and nothing fetched from beyond the machine.
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
            ],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a WebDriver session in headless Chromium")
}

/// What the page shows, read from its elements: each node's id and the UP/DOWN it shows,
/// each shard's leader ("" for none), each entry type's count, and the recent changes.
async fn shown(page: &Client) -> Value {
    page.execute(
        r##"
        const nodes = [...document.querySelectorAll("#nodes .node")].map(n => ({
            id: Number(n.dataset.node), state: n.querySelector(".state").innerText.trim() }));
        const shards = [...document.querySelectorAll("#shards .shard")].map(s => s.dataset.leader);
        const types = Object.fromEntries([...document.querySelectorAll("#types tbody tr[data-type]")]
            .map(r => [r.dataset.type, Number(r.cells[1].innerText.replace(/,/g, ""))]));
        const changes = [...document.querySelectorAll("#changes li")].map(l => l.innerText);
        return { nodes, shards, types, changes };
        "##,
        vec![],
    )
    .await
    .expect("run a script in the page")
}

/// Waits until `ok` holds of what the page shows, or `patience` passes; returns the last
/// reading and whether it held.
async fn until(page: &Client, patience: Duration, ok: impl Fn(&Value) -> bool) -> (Value, bool) {
    let deadline = Instant::now() + patience;
    loop {
        let now = shown(page).await;
        if ok(&now) {
            return (now, true);
        }
        if Instant::now() >= deadline {
            return (now, false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn states(shown: &Value) -> Vec<(u64, String)> {
    shown["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .map(|n| {
                    (
                        n["id"].as_u64().unwrap_or(0),
                        n["state"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn leaders(shown: &Value) -> Vec<String> {
    shown["shards"]
        .as_array()
        .map(|s| {
            s.iter()
                .map(|l| l.as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

async fn screenshot(page: &Client, name: &str) {
    let dir = std::env::var_os("SPACE_SCREENSHOT_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")), PathBuf::from);
    let png = page.screenshot().await.expect("a screenshot");
    std::fs::create_dir_all(&dir).expect("the screenshot directory");
    std::fs::write(dir.join(name), png).expect("save the screenshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_page_shows_the_cluster_and_a_node_going_down() {
    let driver = Driver::start();
    let addrs = free_addrs(6);
    let (data, admin) = addrs.split_at(3);
    let cluster = data.join(",");
    let dirs: Vec<_> = (0..3)
        .map(|i| space_tests::TempDir::new(&format!("admin-page-{i}")))
        .collect();
    let shards = SHARDS.to_string();
    let mut nodes: Vec<Option<NodeProcess>> = (0..3)
        .map(|i| {
            Some(NodeProcess::start_at(
                &data[i],
                &[
                    "--data-dir",
                    &dirs[i].0.to_string_lossy(),
                    "--initial-cluster",
                    &cluster,
                    "--shards",
                    &shards,
                    "--admin-listen",
                    &admin[i],
                ],
            ))
        })
        .collect();

    let space = connect_with(&cluster, ClientConfig::default())
        .await
        .expect("connect to the cluster");
    for i in 0..30 {
        space
            .write(&Order {
                number: format!("o-{i}"),
            })
            .await
            .expect("write an order");
    }
    for i in 0..12 {
        space
            .write(&Invoice {
                number: format!("i-{i}"),
            })
            .await
            .expect("write an invoice");
    }

    let page = browser(&driver).await;
    page.goto(&format!("http://{}/", admin[0]))
        .await
        .expect("open the admin page");
    let (seen, ok) = until(&page, Duration::from_secs(20), |p| {
        states(p).iter().filter(|(_, s)| s == "UP").count() == 3
            && leaders(p).len() == SHARDS
            && leaders(p).iter().all(|l| !l.is_empty())
            && p["types"]["page.Order"] == 30
            && p["types"]["page.Invoice"] == 12
    })
    .await;
    screenshot(&page, "admin-page.png").await;
    assert!(
        ok,
        "the page should show 3 nodes up, {SHARDS} shards led and the types written: {seen:#}"
    );
    assert_eq!(
        states(&seen),
        vec![
            (1, "UP".to_owned()),
            (2, "UP".to_owned()),
            (3, "UP".to_owned())
        ]
    );

    // Node 3 dies: the page on node 1 shows it down, and every shard led by node 1 or 2.
    let led_by_3 = leaders(&seen).iter().filter(|l| *l == "3").count();
    assert!(led_by_3 > 0, "node 3 leads some shards at first: {seen:#}");
    nodes[2].take().expect("node 3").kill();
    let killed = Instant::now();
    let (after, ok) = until(&page, Duration::from_secs(5), |p| {
        states(p) == vec![(1, "UP".into()), (2, "UP".into()), (3, "DOWN".into())]
            && leaders(p).len() == SHARDS
            && leaders(p).iter().all(|l| l == "1" || l == "2")
    })
    .await;
    let took = killed.elapsed();
    screenshot(&page, "admin-page-node-down.png").await;
    assert!(
        ok,
        "within 5 s of the kill the page should show node 3 down and new leaders: {after:#}"
    );
    let changes = after["changes"].to_string();
    assert!(
        changes.contains("node 3") && changes.contains("is down"),
        "the recent changes name the node that went down: {changes}"
    );
    eprintln!("the page showed the failover {took:?} after the kill");
    page.close().await.expect("close the browser");
    drop(nodes);
}
