//! A replica driven by a log: the commands a durable engine logged, applied in order to
//! [`Engine::replica`] (as a shard's Raft group applies what it committed), give exactly
//! the state the engine itself recovers; an image of a replica, taken halfway and
//! installed elsewhere, continues to the same state.

use std::time::Duration;

use space_core::server::{Applied, Engine, LogHost};
use space_core::wire::RequestId;
use space_core::{EngineConfig, Fields, Filter, Lease, Query, Value};
use space_tests::TempDir;

fn job(n: i64) -> Fields {
    let mut f = Fields::new();
    f.push("n", Value::I64(n));
    f
}

/// A job large enough that an acknowledgement of its take is logged.
fn large_job(n: i64) -> Fields {
    let mut f = job(n);
    f.push(
        "body",
        Value::Str("x".repeat(space_core::server::ACKNOWLEDGE_FROM_BYTES)),
    );
    f
}

/// Takes what `query` finds on `engine` now, as a request with an id of its own: the id.
fn take_one(engine: &Engine, query: &Query) -> RequestId {
    let id = RequestId::new();
    engine
        .with_request(id, || engine.take(query, Duration::ZERO))
        .unwrap()
        .wait()
        .unwrap();
    id
}

/// Writes, takes (some of them acknowledged), claims (committed and released),
/// renewals, cancels and answered requests on a durable engine at `dir`; returns the
/// digest of its state.
fn run_history(dir: &std::path::Path) -> String {
    let engine = Engine::open(dir, EngineConfig::default()).unwrap();
    let jobs = Query::new("Job", Filter::All);
    for n in 0..200 {
        let lease = if n % 7 == 0 {
            Lease::For(Duration::from_secs(3600))
        } else {
            Lease::Forever
        };
        // The first taken are large: their takes' acknowledgements are logged.
        let fields = if n < 15 { large_job(n) } else { job(n) };
        engine
            .with_request(RequestId::new(), || {
                engine.write("Job", fields, None, lease)
            })
            .unwrap();
    }
    let takes: Vec<RequestId> = (0..50).map(|_| take_one(&engine, &jobs)).collect();
    // Some callers acknowledge their answers (a few twice; those of small entries are
    // passed over).
    assert_eq!(engine.acknowledge(&takes[..10]), 10);
    assert_eq!(engine.acknowledge(&takes[5..25]), 5);
    for i in 0..20 {
        let claimed = engine
            .claim(&jobs, Lease::For(Duration::from_secs(600)), Duration::ZERO)
            .unwrap()
            .wait()
            .unwrap();
        if i % 2 == 0 {
            engine.commit(&claimed.ticket).unwrap();
        } else if i >= 15 {
            // Released last, so that no later claim takes the entry again.
            engine.release(&claimed.ticket).unwrap();
        }
    }
    let digest = engine.state_digest();
    engine.close();
    digest
}

/// A replica that applied, in order, every command the durable engine at `dir` logged.
fn replica_of_log(dir: &std::path::Path) -> Engine {
    let host = LogHost::open(dir, &EngineConfig::default()).unwrap();
    let (_log, image) = host.open_log(0).unwrap();
    let replica = Engine::replica(None, EngineConfig::default());
    for (index, bytes) in &image.entries {
        replica.apply_logged(*index, bytes).unwrap();
    }
    replica
}

#[test]
fn a_replica_applying_the_log_holds_the_engines_state() {
    let dir = TempDir::new("replica-apply");
    let live = run_history(&dir.0);
    assert!(live.contains("answer"), "the history answered no request");

    // The engine recovers that state from its own directory.
    let recovered = Engine::open(&dir.0, EngineConfig::default()).unwrap();
    assert_eq!(recovered.state_digest(), live);
    recovered.close();
    drop(recovered);

    // The same commands, read as a log's owner reads them, drive a replica.
    let host = LogHost::open(&dir.0, &EngineConfig::default()).unwrap();
    let (_log, image) = host.open_log(0).unwrap();
    assert!(image.entries.len() > 250, "{} entries", image.entries.len());
    let replica = Engine::replica(None, EngineConfig::default());
    let half = image.entries.len() / 2;
    let mut handed_image = None;
    let mut stored = 0;
    for (i, (index, bytes)) in image.entries.iter().enumerate() {
        if matches!(
            replica.apply_logged(*index, bytes).unwrap(),
            Applied::Stored(_)
        ) {
            stored += 1;
        }
        if i + 1 == half {
            handed_image = Some((*index, replica.image(*index)));
        }
    }
    assert_eq!(stored, 200);
    assert_eq!(replica.state_digest(), live);

    // A replica that starts from an image taken halfway and applies the rest agrees too.
    let (cut, bytes) = handed_image.unwrap();
    let late = Engine::replica_from_image(None, EngineConfig::default(), &bytes).unwrap();
    for (index, bytes) in image.entries.range(cut + 1..) {
        late.apply_logged(*index, bytes).unwrap();
    }
    assert_eq!(late.state_digest(), live);

    // Bytes that are not a command are refused, and change nothing.
    assert!(
        replica
            .apply_logged(10_000, b"\xff\xffnot a command")
            .is_err()
    );
    assert_eq!(replica.state_digest(), live);
    // A damaged image is refused.
    let mut damaged = bytes.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x55;
    assert!(Engine::replica_from_image(None, EngineConfig::default(), &damaged).is_err());
}

/// An acknowledged answer drops the entries it held, alike live, on recovery and on a
/// replica applying the log: a retry is refused (`Acknowledged`), and giving the request
/// up puts nothing back (its caller has the entry). An answer not acknowledged, or one
/// holding less than `ACKNOWLEDGE_FROM_BYTES` of entries, is kept whole, and given back.
#[test]
fn acknowledged_answers_drop_their_entries_alike_live_on_replay_and_on_replicas() {
    use space_core::server::Answer;
    let dir = TempDir::new("replica-acknowledged");
    let engine = Engine::open(&dir.0, EngineConfig::default()).unwrap();
    let jobs = Query::new("Job", Filter::All);
    for n in 0..3 {
        engine
            .write("Job", large_job(n), None, Lease::Forever)
            .unwrap();
    }
    engine.write("Job", job(3), None, Lease::Forever).unwrap();
    let (acknowledged, kept) = (take_one(&engine, &jobs), take_one(&engine, &jobs));
    let claim = RequestId::new();
    let claimed = engine
        .with_request(claim, || {
            engine.claim(&jobs, Lease::For(Duration::from_secs(600)), Duration::ZERO)
        })
        .unwrap()
        .wait()
        .unwrap();
    // A write's receipt holds no entry: passed over.
    let write = RequestId::new();
    engine
        .with_request(write, || engine.write("Job", job(9), None, Lease::Forever))
        .unwrap();
    let small = take_one(&engine, &jobs);
    assert_eq!(
        engine.acknowledge(&[acknowledged, claim, write, small, RequestId::new()]),
        2
    );
    assert!(matches!(engine.answer(small), Some(Answer::Documents(d)) if d.len() == 1));
    assert_eq!(engine.answer(acknowledged), Some(Answer::Acknowledged));
    assert_eq!(engine.answer(claim), Some(Answer::Acknowledged));
    assert!(matches!(engine.answer(kept), Some(Answer::Documents(d)) if d.len() == 1));
    assert!(matches!(engine.answer(write), Some(Answer::Receipts(_))));
    // Given up after the acknowledgement, the take puts nothing back, and the claim
    // stays with its claimer; the take not acknowledged gives its entry back.
    assert!(engine.give_back(acknowledged));
    assert!(engine.give_back(claim));
    assert_eq!(engine.count(&jobs).unwrap(), 1);
    assert!(engine.give_back(kept));
    assert_eq!(engine.count(&jobs).unwrap(), 2);
    engine.commit(&claimed.ticket).unwrap();
    let live = engine.state_digest();
    engine.close();
    drop(engine);

    let recovered = Engine::open(&dir.0, EngineConfig::default()).unwrap();
    assert_eq!(recovered.answer(acknowledged), Some(Answer::Acknowledged));
    assert_eq!(recovered.state_digest(), live);
    recovered.close();
    drop(recovered);

    let replica = replica_of_log(&dir.0);
    assert_eq!(replica.answer(acknowledged), Some(Answer::Acknowledged));
    assert_eq!(replica.state_digest(), live);
    // A replica decides nothing: it logs no acknowledgement of its own.
    assert_eq!(replica.acknowledge(&[kept]), 0);
}

/// Answers decided more than a minute before a newer one are forgotten, by the times
/// the log holds: alike live, when the engine recovers its directory (whatever its clock
/// says then), and on a replica applying the same log.
#[test]
fn answers_older_than_a_minute_are_forgotten_alike_live_on_replay_and_on_replicas() {
    use space_core::Clock;
    use std::time::SystemTime;
    let dir = TempDir::new("replica-answers");
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let clock = Clock::manual(start);
    let config = || {
        let mut config = EngineConfig::default();
        config.clock = clock.clone();
        config
    };
    let engine = Engine::open(&dir.0, config()).unwrap();
    let write = |n| {
        let id = RequestId::new();
        engine
            .with_request(id, || engine.write("Job", job(n), None, Lease::Forever))
            .unwrap();
        id
    };
    let first = write(1);
    clock.advance(Duration::from_secs(30));
    let second = write(2);
    clock.advance(Duration::from_secs(30));
    let third = write(3);
    // Exactly a minute after the first: it is still answered.
    assert!(engine.answer(first).is_some());
    clock.advance(Duration::from_secs(1));
    let fourth = write(4);
    assert!(
        engine.answer(first).is_none(),
        "a minute-old answer is kept"
    );
    for id in [second, third, fourth] {
        assert!(engine.answer(id).is_some(), "a younger answer is forgotten");
    }
    let live = engine.state_digest();
    engine.close();
    drop(engine);

    // Recovered an hour later: the log's times decide, not the clock's.
    clock.advance(Duration::from_secs(3600));
    let recovered = Engine::open(&dir.0, config()).unwrap();
    assert!(recovered.answer(first).is_none());
    assert!(recovered.answer(second).is_some());
    assert_eq!(recovered.state_digest(), live);
    recovered.close();
    drop(recovered);

    // A replica applying the same log agrees.
    let replica = replica_of_log(&dir.0);
    assert_eq!(replica.state_digest(), live);
}

/// Replicas given one `Holdings` (a node's replicas of its shards) count what they hold
/// there together, and a replica that goes (replaced by a snapshot's) takes its part out.
#[test]
fn replicas_count_what_they_hold_into_the_nodes_holdings() {
    let source = Engine::new(EngineConfig::default());
    for n in 0..10 {
        source.write("Job", job(n), None, Lease::Forever).unwrap();
    }
    let image = source.image(0);
    let holdings = space_core::Holdings::default();
    let mut config = EngineConfig::default();
    config.holdings = Some(holdings.clone());
    let first = Engine::replica_from_image(None, config.clone(), &image).unwrap();
    let second = Engine::replica_from_image(None, config, &image).unwrap();
    assert_eq!(holdings.entries(), 20);
    assert_eq!(
        holdings.bytes(),
        first.held_bytes() + second.held_bytes(),
        "{holdings:?}"
    );
    assert!(holdings.bytes() > 0);
    second
        .take(&Query::new("Job", Filter::All), Duration::ZERO)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(holdings.entries(), 19);
    second.close();
    drop(second);
    assert_eq!(
        holdings.entries(),
        10,
        "the replica that went took its part out"
    );
    assert_eq!(holdings.bytes(), first.held_bytes());
}
