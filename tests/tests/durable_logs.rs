//! Several engines on one data directory, each one log on the shared write-ahead log:
//! their appends share fsyncs, each is snapshotted and compacted on its own, and each comes
//! back after a restart exactly as it was, whatever the others did.

use std::time::Duration;

use space_core::server::{Engine, LogHost};
use space_core::{EngineConfig, Fields, Filter, Lease, Query, SpaceError, Value};
use space_tests::TempDir;

fn job(log: u32, n: i64) -> Fields {
    let mut f = Fields::new();
    f.push("log", Value::I64(i64::from(log)));
    f.push("n", Value::I64(n));
    f
}

/// The `n` of every job in `engine`, oldest first, and that all of them belong to `log`.
fn jobs(engine: &Engine, log: u32) -> Vec<i64> {
    engine
        .contents(&Query::new("Job", Filter::All))
        .unwrap()
        .iter()
        .map(|d| {
            assert_eq!(d.fields.get("log"), Some(&Value::I64(i64::from(log))));
            match d.fields.get("n") {
                Some(Value::I64(n)) => *n,
                other => panic!("{other:?}"),
            }
        })
        .collect()
}

const LOGS: u32 = 4;
const EACH: i64 = 2_000;

#[test]
fn engines_on_one_host_share_fsyncs_and_recover_independently() {
    let dir = TempDir::new("host");
    let mut config = EngineConfig::default();
    config.snapshot_after_bytes = 64 << 10;
    config.log_segment_bytes = 64 << 10;
    let host = LogHost::open(&dir.0, &config).unwrap();
    let engines: Vec<Engine> = (1..=LOGS)
        .map(|log| Engine::open_on(&host, log, config.clone()).unwrap())
        .collect();
    // One log, one engine.
    assert!(matches!(
        Engine::open_on(&host, 1, config.clone()),
        Err(SpaceError::Storage { .. })
    ));
    std::thread::scope(|s| {
        for (i, engine) in engines.iter().enumerate() {
            let log = i as u32 + 1;
            s.spawn(move || {
                for n in 0..EACH {
                    engine
                        .write("Job", job(log, n), None, Lease::Forever)
                        .unwrap();
                    if n % 10 == 9 {
                        engine.flush_blocking().unwrap();
                    }
                }
                // Each log then loses a different share of its entries.
                let taken = engine
                    .take_all(
                        &Query::new("Job", Filter::All),
                        log as usize * 100,
                        Duration::ZERO,
                    )
                    .unwrap()
                    .wait();
                assert_eq!(taken.len(), log as usize * 100);
                engine.flush_blocking().unwrap();
            });
        }
    });
    // Every flush waited for its own appends; what the others appended meanwhile rode on
    // the same fdatasync. (How many fdatasyncs that saves depends on how the writers'
    // threads are scheduled; that many of them carried several logs at once does not.)
    let (syncs, shared) = (host.syncs(), host.shared_syncs());
    assert!(
        shared * 5 >= syncs,
        "{shared} of {syncs} fsyncs carried more than one log's appends: the logs do not share them"
    );
    // The checkpoint worker serves every engine on the host: each log has snapshots of
    // its own, and the write-ahead log was compacted past what they hold.
    for engine in &engines {
        engine.checkpoint().unwrap();
    }
    let names: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for log in 1..=LOGS {
        let prefix = format!("snapshot-{log:04}-");
        assert!(
            names.iter().any(|n| n.starts_with(&prefix)),
            "no snapshot of log {log}: {names:?}"
        );
    }
    let before: Vec<Vec<i64>> = (1..=LOGS)
        .map(|log| jobs(&engines[log as usize - 1], log))
        .collect();
    drop(engines);
    drop(host);
    // Back from the directory alone: every log exactly as it was, in any order of opening.
    let host = LogHost::open(&dir.0, &config).unwrap();
    for log in (1..=LOGS).rev() {
        let engine = Engine::open_on(&host, log, config.clone()).unwrap();
        let after = jobs(&engine, log);
        assert_eq!(after, before[log as usize - 1], "log {log}");
        assert_eq!(after.len() as i64, EACH - i64::from(log) * 100);
        assert_eq!(after.first(), Some(&(i64::from(log) * 100)));
    }
}

#[test]
fn the_directory_is_free_once_the_host_and_its_engines_are_gone() {
    let dir = TempDir::new("free");
    let config = EngineConfig::default();
    let host = LogHost::open(&dir.0, &config).unwrap();
    let a = Engine::open_on(&host, 1, config.clone()).unwrap();
    let b = Engine::open_on(&host, 2, config.clone()).unwrap();
    a.write("Job", job(1, 1), None, Lease::Forever).unwrap();
    b.write("Job", job(2, 1), None, Lease::Forever).unwrap();
    a.flush_blocking().unwrap();
    b.flush_blocking().unwrap();
    drop(host);
    // A closed engine's later changes are not logged, and say so; the other goes on.
    a.close();
    assert!(matches!(
        a.write("Job", job(1, 2), None, Lease::Forever)
            .and_then(|_| a.flush_blocking()),
        Err(SpaceError::Storage { .. })
    ));
    b.write("Job", job(2, 2), None, Lease::Forever).unwrap();
    b.flush_blocking().unwrap();
    assert!(matches!(
        LogHost::open(&dir.0, &config),
        Err(SpaceError::Storage { .. })
    ));
    b.close();
    let host = LogHost::open(&dir.0, &config).unwrap();
    let a = Engine::open_on(&host, 1, config.clone()).unwrap();
    let b = Engine::open_on(&host, 2, config.clone()).unwrap();
    assert_eq!(jobs(&a, 1), vec![1]);
    assert_eq!(jobs(&b, 2), vec![1, 2]);
}

#[test]
fn checkpoints_of_one_log_at_the_same_time_both_succeed() {
    // The host's checkpoint worker may snapshot a log while its owner asks for one too
    // (at shutdown, or by hand): both must succeed, and the log must come back whole.
    let dir = TempDir::new("twice");
    let config = EngineConfig::default();
    let host = LogHost::open(&dir.0, &config).unwrap();
    let engine = Engine::open_on(&host, 1, config.clone()).unwrap();
    for round in 0..50 {
        engine
            .write("Job", job(1, round), None, Lease::Forever)
            .unwrap();
        engine.flush_blocking().unwrap();
        std::thread::scope(|s| {
            let a = s.spawn(|| engine.checkpoint());
            let b = s.spawn(|| engine.checkpoint());
            for (who, outcome) in [("first", a.join()), ("second", b.join())] {
                if let Err(e) = outcome.unwrap() {
                    panic!("round {round}: the {who} checkpoint failed: {e}");
                }
            }
        });
    }
    drop(engine);
    drop(host);
    let host = LogHost::open(&dir.0, &config).unwrap();
    let engine = Engine::open_on(&host, 1, config.clone()).unwrap();
    assert_eq!(jobs(&engine, 1), (0..50).collect::<Vec<_>>());
}
