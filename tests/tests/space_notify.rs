//! Notify: events only after registration, in order, numbered without gaps; kinds
//! filtered; cancel stops at once; slow subscribers get a gap, never silent loss.

use std::time::Duration;

use futures::StreamExt;
use space_core::{EngineConfig, EventKind, EventKinds, Notification, Query, Space};
use space_tests::Job;

fn job(id: u64, kind: &str) -> Job {
    Job {
        id,
        kind: kind.into(),
        size: 1,
    }
}

fn drain(sub: &space_core::Subscription) -> Vec<Notification> {
    std::iter::from_fn(|| sub.recv_timeout(Duration::from_millis(100))).collect()
}

#[test]
fn notify_sees_only_later_matching_writes_in_order_with_gapless_numbers() {
    let space = Space::new().blocking();
    space.write(&job(0, "hot")).unwrap();
    let sub = space
        .notify(&Query::of::<Job>().eq("kind", "hot"), EventKinds::WRITTEN)
        .unwrap();
    let mut keys = Vec::new();
    for i in 1..=50 {
        let r = space
            .write(&job(i, if i % 2 == 0 { "hot" } else { "cold" }))
            .unwrap();
        if i % 2 == 0 {
            keys.push(r.key);
        }
    }
    let events: Vec<_> = drain(&sub)
        .into_iter()
        .map(|n| n.event().cloned().unwrap())
        .collect();
    assert_eq!(events.len(), 25);
    for (i, (e, key)) in events.iter().zip(&keys).enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
        assert_eq!(&e.key, key, "in write order");
        assert_eq!(e.kind, EventKind::Written);
        assert_eq!(&*e.entry_type, "Job");
        assert_eq!(e.node, space.to_async().node());
    }
    // The event is enough to fetch the entry directly.
    assert_eq!(
        space.read_key::<Job>(&events[0].key).unwrap(),
        Some(job(2, "hot"))
    );
}

#[test]
fn kinds_are_filtered_as_asked() {
    let space = Space::new().blocking();
    let taken_only = space
        .notify(&Query::of::<Job>(), EventKinds::of(&[EventKind::Taken]))
        .unwrap();
    let everything = space.notify(&Query::of::<Job>(), EventKinds::ALL).unwrap();
    let r = space.write(&job(1, "a")).unwrap();
    space
        .take::<Job>(&Query::of::<Job>(), Duration::ZERO)
        .unwrap();
    let kinds = |sub| {
        drain(sub)
            .into_iter()
            .map(|n| n.event().unwrap().kind)
            .collect::<Vec<_>>()
    };
    assert_eq!(kinds(&taken_only), vec![EventKind::Taken]);
    assert_eq!(
        kinds(&everything),
        vec![EventKind::Written, EventKind::Taken]
    );
    let _ = r;
}

#[test]
fn sequence_numbers_stay_gapless_under_concurrent_writers() {
    let space = Space::new().blocking();
    let sub = space
        .notify(&Query::of::<Job>(), EventKinds::WRITTEN)
        .unwrap();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let s = space.clone();
            std::thread::spawn(move || {
                for i in 0..2_000 {
                    s.write(&job(w * 10_000 + i, "c")).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let seqs: Vec<u64> = drain(&sub).iter().map(|n| n.event().unwrap().seq).collect();
    assert_eq!(seqs, (1..=8_000).collect::<Vec<_>>());
}

#[test]
fn cancel_stops_delivery_at_once() {
    let space = Space::new().blocking();
    let sub = space.notify(&Query::of::<Job>(), EventKinds::ALL).unwrap();
    space.write(&job(1, "a")).unwrap();
    space.write(&job(2, "a")).unwrap();
    sub.cancel();
    space.write(&job(3, "a")).unwrap();
    assert_eq!(sub.try_recv(), None, "queued events are discarded too");
    assert_eq!(sub.recv(), None, "a cancelled subscription ends");
    assert_eq!(space.stats().subscriptions, 0);
}

#[test]
fn dropping_the_handle_unsubscribes() {
    let space = Space::new().blocking();
    {
        let _sub = space.notify(&Query::of::<Job>(), EventKinds::ALL).unwrap();
        assert_eq!(space.stats().subscriptions, 1);
    }
    assert_eq!(space.stats().subscriptions, 0);
}

#[test]
fn a_slow_subscriber_gets_a_counted_gap_and_later_events() {
    let space = Space::with_config(EngineConfig {
        queue_capacity: 10,
        ..EngineConfig::default()
    })
    .blocking();
    let sub = space
        .notify(&Query::of::<Job>(), EventKinds::WRITTEN)
        .unwrap();
    for i in 0..25 {
        space.write(&job(i, "a")).unwrap();
    }
    // Writers were never held up: all 25 writes are stored.
    assert_eq!(space.count(&Query::of::<Job>()).unwrap(), 25);
    let got = drain(&sub);
    assert_eq!(got.len(), 11);
    assert_eq!(got[9].event().unwrap().seq, 10);
    assert_eq!(
        got[10],
        Notification::Gap {
            first_seq: 11,
            last_seq: 25
        }
    );
    assert_eq!(sub.dropped(), 15);
    space.write(&job(99, "a")).unwrap();
    assert_eq!(drain(&sub)[0].event().unwrap().seq, 26);
}

#[tokio::test]
async fn subscriptions_are_streams() {
    let space = Space::new();
    let mut sub = space
        .notify(&Query::of::<Job>(), EventKinds::WRITTEN)
        .await
        .unwrap();
    let writer = {
        let space = space.clone();
        tokio::spawn(async move {
            for i in 0..3 {
                space.write(&job(i, "s")).await.unwrap();
            }
        })
    };
    let mut seqs = Vec::new();
    while seqs.len() < 3 {
        let n = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .unwrap()
            .unwrap();
        seqs.push(n.event().unwrap().seq);
    }
    writer.await.unwrap();
    assert_eq!(seqs, vec![1, 2, 3]);
    sub.cancel();
    assert_eq!(sub.next().await, None);
}
