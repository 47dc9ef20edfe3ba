//! A node runs many shard groups, each with a replica engine and, where it leads, a
//! serving engine: on a log host they all share the host's threads, and closing one of
//! them leaves the host's threads serving the rest.

use std::sync::Arc;
use std::time::{Duration, Instant};

use space_core::server::{Engine, LogHost, Proposals};
use space_core::{EngineConfig, Fields, Lease, Result, Value};
use space_tests::TempDir;

/// Threads of this process now.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// Proposals that are committed at once (a log of one member, for this test).
struct AtOnce;

impl Proposals for AtOnce {
    fn propose(&self, _command: Vec<u8>) -> u64 {
        0
    }
    fn reserve(&self) -> u64 {
        0
    }
    fn fill(&self, _seq: u64, _command: Vec<u8>) {}
    fn settled(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>> {
        Box::pin(async { Ok(()) })
    }
    fn settled_blocking(&self) -> Result<()> {
        Ok(())
    }
}

#[test]
fn engines_of_many_groups_share_their_hosts_threads() {
    let dir = TempDir::new("groups-threads");
    let host = LogHost::open(&dir.0, &EngineConfig::default()).unwrap();
    let durable = Engine::open_on(&host, 0, EngineConfig::default()).unwrap();
    let image = Engine::replica(None, EngineConfig::default()).image(0);

    let before = threads();
    let mut engines = Vec::new();
    for _ in 0..64 {
        engines.push(Engine::replica(Some(&host), EngineConfig::default()));
        engines.push(
            Engine::leading(
                Some(&host),
                EngineConfig::default(),
                &image,
                Arc::new(AtOnce),
            )
            .unwrap(),
        );
    }
    assert_eq!(
        threads(),
        before,
        "engines on a host started threads of their own"
    );
    // Without a host, each has its own (so the count above can tell).
    let own: Vec<Engine> = (0..4)
        .map(|_| Engine::replica(None, EngineConfig::default()))
        .collect();
    assert!(threads() >= before + 4);
    drop(own);

    // A serving engine's lease timers run on the host's timer thread.
    let mut f = Fields::new();
    f.push("n", Value::I64(1));
    let leading = engines[1].clone();
    leading
        .write(
            "Job",
            f.clone(),
            None,
            Lease::For(Duration::from_millis(200)),
        )
        .unwrap();
    assert!(leading.stats().timers > 0);

    // Closing the group engines leaves the host's threads serving its durable engine:
    // its leased entry is still removed by the timer (reads alone would only hide it).
    for e in &engines {
        e.close();
    }
    drop(engines);
    durable
        .write("Job", f, None, Lease::For(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while durable.stats().entries > 0 {
        assert!(
            Instant::now() < deadline,
            "the host's timer stopped with a group engine"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
