//! Notify: events only after registration, in order, numbered without gaps; kinds
//! filtered; cancel stops at once; slow subscribers get a gap, never silent loss.

use std::time::Duration;

use futures::StreamExt;
use space_core::{
    EngineConfig, EventKind, EventKinds, Filter, Lease, Notification, Query, Space, SpaceError,
};
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
    assert_eq!(space.stats().unwrap().subscriptions, 0);
}

#[test]
fn dropping_the_handle_unsubscribes() {
    let space = Space::new().blocking();
    {
        let _sub = space.notify(&Query::of::<Job>(), EventKinds::ALL).unwrap();
        assert_eq!(space.stats().unwrap().subscriptions, 1);
    }
    assert_eq!(space.stats().unwrap().subscriptions, 0);
}

#[test]
fn a_slow_subscriber_gets_a_counted_gap_and_later_events() {
    let mut config = EngineConfig::default();
    config.queue_capacity = 10;
    let space = Space::with_config(config).blocking();
    let sub = space
        .notify(&Query::of::<Job>(), EventKinds::WRITTEN)
        .unwrap();
    for i in 0..25 {
        space.write(&job(i, "a")).unwrap();
    }
    // Writers were never held up: all 25 writes are stored.
    assert_eq!(space.count(&Query::of::<Job>()).unwrap(), 25);
    // The oldest undelivered events fell off: one gap says which, then the latest ten.
    let got = drain(&sub);
    assert_eq!(got.len(), 11);
    assert_eq!(
        got[0],
        Notification::Gap {
            first_seq: 1,
            last_seq: 15
        }
    );
    let seqs: Vec<u64> = got[1..].iter().map(|n| n.event().unwrap().seq).collect();
    assert_eq!(seqs, (16..=25).collect::<Vec<_>>());
    assert_eq!(sub.dropped(), 15);
    space.write(&job(99, "a")).unwrap();
    assert_eq!(drain(&sub)[0].event().unwrap().seq, 26);
}

#[test]
fn a_subscriber_that_comes_back_gets_what_it_missed_or_a_gap() {
    let mut config = EngineConfig::default();
    config.queue_capacity = 8;
    let space = Space::with_config(config).blocking();
    let sub = space
        .notify_with_lease(&Query::of::<Job>(), EventKinds::WRITTEN, Lease::secs(60))
        .unwrap();
    for i in 0..3 {
        space.write(&job(i, "a")).unwrap();
    }
    let seen: Vec<u64> = drain(&sub).iter().map(|n| n.event().unwrap().seq).collect();
    assert_eq!(seen, vec![1, 2, 3]);
    // The subscriber goes away after seeing 2 (3 was received but not processed).
    let id = sub.detach();
    for i in 3..6 {
        space.write(&job(i, "a")).unwrap();
    }
    let back = space.resume(id, 2).unwrap();
    let replayed: Vec<u64> = drain(&back)
        .iter()
        .map(|n| n.event().unwrap().seq)
        .collect();
    assert_eq!(replayed, vec![3, 4, 5, 6]);
    // Away too long: what is no longer kept comes back as one gap.
    let id = back.detach();
    for i in 6..20 {
        space.write(&job(i, "a")).unwrap();
    }
    let back = space.resume(id, 6).unwrap();
    let got = drain(&back);
    assert_eq!(
        got[0],
        Notification::Gap {
            first_seq: 7,
            last_seq: 12
        }
    );
    let rest: Vec<u64> = got[1..].iter().map(|n| n.event().unwrap().seq).collect();
    assert_eq!(rest, (13..=20).collect::<Vec<_>>());
    back.cancel();
    assert!(matches!(
        space.resume(id, 20),
        Err(SpaceError::SubscriptionClosed { .. })
    ));
}

/// In-process, a position names the engine's node, the subscription, and the last
/// number handed out (not what is merely queued): `resume_at` picks up after it.
#[test]
fn a_position_resumes_after_what_was_handed_out_in_process() {
    let space = Space::new().blocking();
    let sub = space
        .notify_with_lease(&Query::of::<Job>(), EventKinds::WRITTEN, Lease::secs(60))
        .unwrap();
    for i in 0..5 {
        space.write(&job(i, "a")).unwrap();
    }
    let first: Vec<u64> = (0..2)
        .map(|_| {
            sub.recv_timeout(Duration::from_secs(1))
                .unwrap()
                .event()
                .unwrap()
                .seq
        })
        .collect();
    assert_eq!(first, vec![1, 2]);
    let position = sub.detach_at();
    assert_eq!(position.parts.len(), 1);
    assert_eq!(position.parts[0].node, space.to_async().node());
    assert_eq!(
        position.parts[0].last_seq, 2,
        "3 to 5 were queued, not handed out"
    );
    space.write(&job(5, "a")).unwrap();
    let back = space.resume_at(&position).unwrap();
    let replayed: Vec<u64> = drain(&back)
        .iter()
        .map(|n| n.event().unwrap().seq)
        .collect();
    assert_eq!(replayed, vec![3, 4, 5, 6]);
    assert_eq!(back.position().parts[0].last_seq, 6);
}

#[test]
fn many_subscriptions_of_every_shape_each_see_exactly_their_matches() {
    let space = Space::new().blocking();
    let kinds = ["a", "b", "c", "d"];
    let mut subs = Vec::new();
    for i in 0..400u64 {
        let q = match i % 8 {
            0 => Query::of::<Job>().eq("kind", kinds[(i / 8 % 4) as usize]),
            1 => Query::of::<Job>()
                .eq("kind", kinds[(i / 8 % 4) as usize])
                .eq("size", i % 5),
            2 => Query::of::<Job>().between("id", i, i + 20),
            3 => Query::of::<Job>().is_in("size", [i % 3, i % 7]),
            4 => Query::of::<Job>().prefix("kind", kinds[(i % 4) as usize]),
            5 => Query::of::<Job>().gt("size", 3).lt("id", 200),
            6 => Query::of::<Job>().not(Filter::eq("kind", "a")),
            _ => Query::parse("Job", &format!("kind:b OR id:<{}", i / 4)).unwrap(),
        };
        subs.push((q.clone(), space.notify(&q, EventKinds::WRITTEN).unwrap()));
    }
    let mut written = Vec::new();
    for i in 0..300u64 {
        let j = Job {
            id: i,
            kind: kinds[(i % 4) as usize].into(),
            size: (i % 9) as u32,
        };
        written.push((space.write(&j).unwrap().key, j));
    }
    for (q, sub) in &subs {
        let got: Vec<_> = std::iter::from_fn(|| sub.try_recv())
            .map(|n| n.event().unwrap().key.clone())
            .collect();
        let want: Vec<_> = written
            .iter()
            .filter(|(_, j)| q.matches(&space_query::to_fields(j).unwrap()))
            .map(|(k, _)| k.clone())
            .collect();
        assert_eq!(got, want, "{q}");
    }
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
