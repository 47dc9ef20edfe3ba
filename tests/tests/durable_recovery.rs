//! Durable spaces in a data directory: what was acknowledged comes back after a restart;
//! torn tails are truncated; corrupt or foreign files are reported by name; leases and
//! claims keep their absolute deadlines; the log stays bounded.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use space_core::{BlockingSpace, EngineConfig, Lease, Query, Space, SpaceError};
use space_tests::{Job, TempDir};

fn job(id: u64) -> Job {
    Job {
        id,
        kind: if id.is_multiple_of(2) { "even" } else { "odd" }.into(),
        size: id as u32,
    }
}

fn jobs() -> Query {
    Query::of::<Job>()
}

/// The ids of the jobs in `space`, oldest first.
fn ids(space: &BlockingSpace) -> Vec<u64> {
    space
        .contents::<Job>(&jobs())
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect()
}

fn files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .collect();
    v.sort();
    v
}

fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.metadata().map_or(0, |m| m.len()))
        .sum()
}

#[test]
fn acknowledged_changes_survive_a_restart() {
    let dir = TempDir::new("restart");
    {
        let space = Space::open(&dir.0).unwrap().blocking();
        for i in 0..100 {
            space.write(&job(i)).unwrap();
        }
        for _ in 0..30 {
            space.take::<Job>(&jobs(), Duration::ZERO).unwrap().unwrap();
        }
        let even = Query::of::<Job>().eq("kind", "even");
        assert_eq!(space.count(&even).unwrap(), 35);
    }
    let space = Space::open(&dir.0).unwrap().blocking();
    assert_eq!(space.count(&jobs()).unwrap(), 70);
    assert_eq!(
        ids(&space),
        (30..100).collect::<Vec<_>>(),
        "order and contents kept"
    );
    // Keys keep working, and new writes do not reuse old keys.
    let r = space.write(&job(1000)).unwrap();
    assert_eq!(space.read_key::<Job>(&r.key).unwrap(), Some(job(1000)));
    assert_eq!(space.count(&jobs()).unwrap(), 71);
}

#[test]
fn a_directory_is_used_by_one_engine_at_a_time() {
    let dir = TempDir::new("lock");
    let _first = Space::open(&dir.0).unwrap();
    let err = Space::open(&dir.0).err().unwrap();
    assert!(matches!(err, SpaceError::Storage { .. }), "{err}");
    assert!(err.to_string().contains("in use"), "{err}");
}

#[test]
fn dropping_or_closing_a_space_releases_its_directory_at_once() {
    let dir = TempDir::new("release");
    let mut busy = EngineConfig::default();
    busy.snapshot_after_bytes = 4096;
    for round in 0..100 {
        let space = Space::open_with(&dir.0, busy.clone()).unwrap().blocking();
        // Keep the engine's threads busy: leases running out, snapshots being taken.
        for i in 0..40 {
            space
                .write_with_lease(&job(round * 100 + i), Lease::millis(1 + i % 3))
                .unwrap();
        }
        space.write(&job(round)).unwrap();
        if round % 2 == 0 {
            drop(space);
        } else {
            let other = space.clone();
            space.close();
            drop(other);
        }
        // Open again at once: the directory is free and holds every acknowledged change.
        let again = Space::open_with(&dir.0, busy.clone())
            .unwrap_or_else(|e| panic!("round {round}: {e}"))
            .blocking();
        assert!(ids(&again).contains(&round), "round {round}");
    }
    // After close, a clone's changes are refused as not durable rather than lost silently.
    let space = Space::open(&dir.0).unwrap().blocking();
    let other = space.clone();
    space.close();
    assert!(matches!(
        other.write(&job(1)),
        Err(SpaceError::Storage { .. })
    ));
}

#[test]
fn a_torn_tail_is_truncated() {
    let dir = TempDir::new("torn");
    {
        let space = Space::open(&dir.0).unwrap().blocking();
        for i in 0..10 {
            space.write(&job(i)).unwrap();
        }
    }
    // A crash in the middle of a write: half a record at the end of the log.
    let segment = files(&dir.0, "wal-").pop().unwrap();
    let len = fs::metadata(&segment).unwrap().len();
    fs::OpenOptions::new()
        .append(true)
        .open(&segment)
        .unwrap()
        .write_all(&[40, 0, 0, 0, 1, 2, 3, 4, 5, 0, 0, 0])
        .unwrap();
    let space = Space::open(&dir.0).unwrap().blocking();
    assert_eq!(space.count(&jobs()).unwrap(), 10);
    let cut = fs::read(&segment).unwrap();
    assert!(
        cut.len() as u64 <= len && !cut.ends_with(&[1, 2, 3, 4, 5, 0, 0, 0]),
        "the torn bytes were cut off"
    );
    space.write(&job(10)).unwrap();
    drop(space);
    assert_eq!(
        Space::open(&dir.0)
            .unwrap()
            .blocking()
            .count(&jobs())
            .unwrap(),
        11
    );
}

#[test]
fn a_corrupt_snapshot_is_reported_by_name() {
    let dir = TempDir::new("corrupt");
    {
        let space = Space::open(&dir.0).unwrap();
        let b = space.blocking();
        for i in 0..50 {
            b.write(&job(i)).unwrap();
        }
        space.local_engine().unwrap().checkpoint().unwrap();
    }
    let snapshot = files(&dir.0, "snapshot-")
        .pop()
        .expect("a snapshot was written");
    let mut bytes = fs::read(&snapshot).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    fs::write(&snapshot, bytes).unwrap();
    let err = Space::open(&dir.0).expect_err("a corrupt snapshot must not load");
    let name = snapshot.file_name().unwrap().to_string_lossy().into_owned();
    assert!(matches!(err, SpaceError::Storage { .. }), "{err}");
    assert!(
        err.to_string().contains(&name),
        "the error names the file: {err}"
    );
    assert!(err.to_string().contains("corrupt"), "{err}");
}

#[test]
fn a_foreign_file_is_reported_by_name() {
    let dir = TempDir::new("foreign");
    fs::write(
        dir.0.join("wal-00000000000000000001.log"),
        b"GIF89a this is not a log",
    )
    .unwrap();
    let err = Space::open(&dir.0).err().unwrap();
    assert!(
        err.to_string().contains("wal-00000000000000000001.log"),
        "{err}"
    );
    assert!(err.to_string().contains("not a space log segment"), "{err}");
}

#[test]
fn leases_expire_across_a_restart() {
    let dir = TempDir::new("lease");
    {
        let space = Space::open(&dir.0).unwrap().blocking();
        space.write_with_lease(&job(1), Lease::millis(300)).unwrap();
        space.write_with_lease(&job(2), Lease::secs(600)).unwrap();
        space.write(&job(3)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(400));
    let space = Space::open(&dir.0).unwrap().blocking();
    assert_eq!(
        ids(&space),
        vec![2, 3],
        "the entry whose lease ran out while down is gone"
    );
    // A lease that runs out after the restart still expires by itself.
    space.write_with_lease(&job(4), Lease::millis(200)).unwrap();
    drop(space);
    let space = Space::open(&dir.0).unwrap().blocking();
    assert_eq!(space.count(&jobs()).unwrap(), 3);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(space.count(&jobs()).unwrap(), 2);
}

#[test]
fn claims_survive_a_restart_and_run_out_after_it() {
    let dir = TempDir::new("claims");
    let ticket;
    {
        let space = Space::open(&dir.0).unwrap().blocking();
        space.write(&job(1)).unwrap();
        space.write(&job(2)).unwrap();
        let long = space
            .claim::<Job>(&jobs(), Lease::secs(600), Duration::ZERO)
            .unwrap()
            .unwrap();
        let short = space
            .claim::<Job>(&jobs(), Lease::millis(400), Duration::ZERO)
            .unwrap()
            .unwrap();
        assert_eq!((long.entry.id, short.entry.id), (1, 2));
        ticket = long.ticket().clone();
    }
    let space = Space::open(&dir.0).unwrap().blocking();
    assert_eq!(
        space.count(&jobs()).unwrap(),
        0,
        "both still claimed after the restart"
    );
    // The short claim runs out: its entry comes back to a waiting taker.
    let back = space.take::<Job>(&jobs(), Duration::from_secs(5)).unwrap();
    assert_eq!(back, Some(job(2)));
    // The long claim's ticket still commits.
    space.commit(&ticket).unwrap();
    drop(space);
    let space = Space::open(&dir.0).unwrap().blocking();
    assert_eq!(space.count(&jobs()).unwrap(), 0);
    assert_eq!(space.stats().unwrap().entries, 0);
}

#[test]
fn the_log_stays_bounded_under_a_long_write_take_loop() {
    let dir = TempDir::new("bounded");
    let mut config = EngineConfig::default();
    config.log_segment_bytes = 256 << 10;
    config.snapshot_after_bytes = 512 << 10;
    let space = Space::open_with(&dir.0, config.clone()).unwrap().blocking();
    let mut peak = 0;
    // About 30 MiB through the log: two records per entry, each carrying a 1 KiB field.
    let big = |i: u64| Job {
        id: i,
        kind: "x".repeat(1024),
        size: 0,
    };
    for i in 0..15_000u64 {
        space.write(&big(i)).unwrap();
        if i >= 10 {
            space.take::<Job>(&jobs(), Duration::ZERO).unwrap().unwrap();
        }
        if i % 500 == 0 {
            peak = peak.max(dir_bytes(&dir.0));
        }
    }
    assert!(peak < 8 << 20, "the data directory peaked at {peak} bytes");
    assert!(
        files(&dir.0, "wal-").len() <= 8,
        "{:?}",
        files(&dir.0, "wal-")
    );
    drop(space);
    let space = Space::open_with(&dir.0, config).unwrap().blocking();
    assert_eq!(ids(&space), (14_990..15_000).collect::<Vec<_>>());
}
