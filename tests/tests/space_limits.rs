//! The engine's own bounds: entry types (empty ones forgotten, a cap on the rest), blocked
//! calls and subscriptions are capped with typed errors; entries given back after a take
//! find their place even when their type was forgotten meanwhile; a subscription whose
//! lease runs out still delivers what it matched while alive; writes name usable types
//! and fields.

use std::time::Duration;

use space_core::server::Engine;
use space_core::{EngineConfig, EventKinds, Fields, Lease, Query, Space, SpaceError, Value};
use space_tests::Job;

fn doc(id: i64) -> Fields {
    let mut f = Fields::new();
    f.push("id", Value::I64(id));
    f
}

fn limited(types: usize, waiters: usize, subscriptions: usize) -> Engine {
    let mut config = EngineConfig::default();
    config.max_entry_types = Some(types);
    config.max_waiters = Some(waiters);
    config.max_subscriptions = Some(subscriptions);
    Engine::new(config)
}

#[test]
fn empty_entry_types_are_forgotten_and_the_rest_are_capped() {
    let engine = limited(100, 10, 10);
    // Many types used once and emptied: they do not pile up.
    for i in 0..5_000 {
        let t = format!("Type{i}");
        engine.write(&t, doc(i), None, Lease::Forever).unwrap();
        let taken = engine
            .take(&Query::for_type(&t), Duration::ZERO)
            .unwrap()
            .wait();
        assert!(taken.is_some());
    }
    assert!(engine.stats().entry_types <= 100, "{:?}", engine.stats());
    // Types that hold entries count against the cap, with a typed error past it.
    let mut held = 0;
    let err = loop {
        match engine.write(&format!("Held{held}"), doc(1), None, Lease::Forever) {
            Ok(_) => held += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(held, 100, "exactly the cap of types with entries");
    assert!(matches!(err, SpaceError::Full { .. }), "{err}");
    // Looking at a type that does not exist neither creates it nor fails.
    assert_eq!(engine.count(&Query::for_type("Nowhere")).unwrap(), 0);
    assert!(
        engine
            .read_key("Nowhere", &space_core::Key::mint())
            .is_none()
    );
    // Emptying one makes room for another.
    engine
        .take(&Query::for_type("Held0"), Duration::ZERO)
        .unwrap()
        .wait()
        .unwrap();
    engine.write("Fresh", doc(1), None, Lease::Forever).unwrap();
}

#[test]
fn an_entry_given_back_finds_its_type_even_after_the_type_was_forgotten() {
    let engine = limited(2_000, 10, 10);
    engine.write("Gone", doc(7), None, Lease::Forever).unwrap();
    let taken = engine
        .take_entries(&Query::for_type("Gone"), 1, usize::MAX, Duration::ZERO)
        .unwrap()
        .wait();
    assert_eq!(taken.len(), 1);
    // Enough new types to sweep the emptied one away, then a new entry of the same type,
    // numbered from scratch.
    for i in 0..1_100 {
        engine
            .write(&format!("Other{i}"), doc(i), None, Lease::Forever)
            .unwrap();
    }
    let fresh = engine.write("Gone", doc(8), None, Lease::Forever).unwrap();
    engine.untake(taken);
    let docs = engine.contents(&Query::for_type("Gone")).unwrap();
    let ids: Vec<_> = docs.iter().map(|d| d.fields.get("id").cloned()).collect();
    assert_eq!(ids.len(), 2, "both entries are there: {ids:?}");
    assert!(ids.contains(&Some(Value::I64(7))) && ids.contains(&Some(Value::I64(8))));
    assert!(engine.read_key("Gone", &fresh.key).is_some());
    for d in docs {
        assert!(
            engine.read_key("Gone", &d.key).is_some(),
            "found by its key"
        );
    }
}

#[test]
fn blocked_calls_and_subscriptions_are_capped_with_typed_errors() {
    let engine = limited(100, 3, 2);
    let q = Query::for_type("Job");
    let waits: Vec<_> = (0..3)
        .map(|_| engine.take(&q, Duration::from_secs(60)).unwrap())
        .collect();
    let err = engine.take(&q, Duration::from_secs(60)).err().unwrap();
    assert!(matches!(err, SpaceError::Busy { .. }), "{err}");
    // A call that does not wait is still served.
    assert!(engine.read(&q, Duration::ZERO).unwrap().wait().is_none());
    drop(waits);
    assert!(
        engine.take(&q, Duration::from_secs(60)).is_ok(),
        "room again"
    );

    let subs: Vec<_> = (0..2)
        .map(|_| {
            engine
                .subscribe(&q, EventKinds::ALL, Lease::Forever)
                .unwrap()
        })
        .collect();
    let err = engine
        .subscribe(&q, EventKinds::ALL, Lease::Forever)
        .err()
        .unwrap();
    assert!(matches!(err, SpaceError::Busy { .. }), "{err}");
    drop(subs);
    assert!(
        engine
            .subscribe(&q, EventKinds::ALL, Lease::Forever)
            .is_ok()
    );
}

#[test]
fn a_subscription_whose_lease_runs_out_delivers_what_it_matched_then_ends() {
    let space = Space::new().blocking();
    let sub = space
        .notify_with_lease(&Query::of::<Job>(), EventKinds::WRITTEN, Lease::millis(100))
        .unwrap();
    for id in 0..3 {
        space
            .write(&Job {
                id,
                kind: "k".into(),
                size: 1,
            })
            .unwrap();
    }
    // The subscriber reads only after the lease ran out.
    std::thread::sleep(Duration::from_millis(300));
    let seqs: Vec<u64> = std::iter::from_fn(|| sub.recv())
        .map(|n| n.event().map(|e| e.seq).unwrap_or_default())
        .collect();
    assert_eq!(seqs, vec![1, 2, 3], "matched while alive, then the end");
    assert!(sub.is_closed());
}

#[test]
fn writes_need_a_usable_entry_type_and_field_names() {
    let engine = Engine::default();
    let err = engine.write("", doc(1), None, Lease::Forever).unwrap_err();
    assert!(matches!(err, SpaceError::InvalidEntryType { .. }), "{err}");
    let err = engine
        .write("T\u{0}", doc(1), None, Lease::Forever)
        .unwrap_err();
    assert!(matches!(err, SpaceError::InvalidEntryType { .. }), "{err}");
    for bad in ["", "a.b", "two words"] {
        let mut f = Fields::new();
        f.push(bad.to_owned(), Value::I64(1));
        let err = engine.write("T", f, None, Lease::Forever).unwrap_err();
        assert!(
            err.to_string().contains("field name"),
            "{bad:?} gives {err}"
        );
    }
    assert_eq!(engine.stats().entries, 0);
}
