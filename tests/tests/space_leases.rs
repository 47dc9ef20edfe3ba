//! Leases on entries, claims and subscriptions: expiry happens by itself, renew extends,
//! cancel ends at once.

use std::time::{Duration, Instant};

use space_core::{EventKind, EventKinds, Lease, Notification, Query, Space, SpaceError};
use space_tests::Job;

fn job(id: u64) -> Job {
    Job {
        id,
        kind: "k".into(),
        size: 1,
    }
}

fn jobs() -> Query {
    Query::of::<Job>()
}

fn next_event(sub: &space_core::Subscription) -> space_core::Event {
    match sub.recv_timeout(Duration::from_secs(5)) {
        Some(Notification::Event(e)) => e,
        other => panic!("expected an event, got {other:?}"),
    }
}

#[test]
fn an_expired_entry_is_never_returned_and_produces_an_expiry_event() {
    let space = Space::new().blocking();
    let sub = space.notify(&jobs(), EventKinds::ALL).unwrap();
    let receipt = space.write_with_lease(&job(1), Lease::millis(60)).unwrap();
    assert!(receipt.expires.is_some());
    assert_eq!(next_event(&sub).kind, EventKind::Written);
    std::thread::sleep(Duration::from_millis(70));
    // Invisible from the deadline on, whether or not the reaper has run yet.
    assert_eq!(space.read_if_exists::<Job>(&jobs()).unwrap(), None);
    assert_eq!(space.take_if_exists::<Job>(&jobs()).unwrap(), None);
    assert_eq!(space.read_key::<Job>(&receipt.key).unwrap(), None);
    assert_eq!(space.count(&jobs()).unwrap(), 0);
    // The reaper removes it without any caller and announces it.
    let e = next_event(&sub);
    assert_eq!((e.kind, &e.key), (EventKind::Expired, &receipt.key));
    assert_eq!(space.stats().unwrap().entries, 0);
}

#[test]
fn renewing_an_entry_keeps_it_and_cancelling_removes_it_at_once() {
    let space = Space::new().blocking();
    let r = space.write_with_lease(&job(1), Lease::millis(80)).unwrap();
    std::thread::sleep(Duration::from_millis(40));
    space.renew::<Job>(&r.key, Lease::secs(60)).unwrap();
    std::thread::sleep(Duration::from_millis(80));
    assert_eq!(
        space.read_key::<Job>(&r.key).unwrap(),
        Some(job(1)),
        "renewed lease still runs"
    );
    space.cancel::<Job>(&r.key).unwrap();
    assert_eq!(space.read_key::<Job>(&r.key).unwrap(), None);
    assert_eq!(space.count(&jobs()).unwrap(), 0);
    assert!(matches!(
        space.cancel::<Job>(&r.key),
        Err(SpaceError::NotFound { .. })
    ));
    assert!(matches!(
        space.renew::<Job>(&r.key, Lease::secs(1)),
        Err(SpaceError::NotFound { .. })
    ));
}

#[test]
fn a_claimed_entry_is_hidden_and_commit_removes_it() {
    let space = Space::new().blocking();
    space.write(&job(1)).unwrap();
    let claim = space
        .claim::<Job>(&jobs(), Lease::secs(30), Duration::ZERO)
        .unwrap()
        .unwrap();
    assert_eq!(claim.entry, job(1));
    assert_eq!(
        space.read_if_exists::<Job>(&jobs()).unwrap(),
        None,
        "hidden from others"
    );
    assert_eq!(space.count(&jobs()).unwrap(), 0);
    space.commit(&claim).unwrap();
    assert_eq!(space.stats().unwrap().entries, 0);
    assert!(matches!(
        space.commit(&claim),
        Err(SpaceError::ClaimLost { .. })
    ));
}

#[test]
fn a_released_claim_puts_the_entry_back_for_a_waiting_taker() {
    let space = Space::new().blocking();
    space.write(&job(1)).unwrap();
    let claim = space
        .claim::<Job>(&jobs(), Lease::secs(30), Duration::ZERO)
        .unwrap()
        .unwrap();
    let taker = {
        let s = space.clone();
        std::thread::spawn(move || s.take::<Job>(&jobs(), Duration::from_secs(10)).unwrap())
    };
    while space.stats().unwrap().waiters == 0 {
        std::thread::yield_now();
    }
    space.release(&claim).unwrap();
    assert_eq!(taker.join().unwrap(), Some(job(1)));
    assert!(matches!(
        space.release(&claim),
        Err(SpaceError::ClaimLost { .. })
    ));
}

#[test]
fn an_expired_claim_puts_the_entry_back_and_a_late_commit_fails_clearly() {
    let space = Space::new().blocking();
    let sub = space
        .notify(
            &jobs(),
            EventKinds::of(&[EventKind::Claimed, EventKind::Released]),
        )
        .unwrap();
    space.write(&job(1)).unwrap();
    let claim = space
        .claim::<Job>(&jobs(), Lease::millis(50), Duration::ZERO)
        .unwrap()
        .unwrap();
    assert_eq!(next_event(&sub).kind, EventKind::Claimed);
    let start = Instant::now();
    // A waiting reader sees the entry come back when the claim runs out.
    let back: Option<Job> = space.read(&jobs(), Duration::from_secs(5)).unwrap();
    assert_eq!(back, Some(job(1)));
    assert!(start.elapsed() >= Duration::from_millis(40));
    assert_eq!(next_event(&sub).kind, EventKind::Released);
    let err = space.commit(&claim).unwrap_err();
    assert!(matches!(err, SpaceError::ClaimLost { .. }));
    assert!(err.to_string().contains("lease ran out"), "{err}");
    // Someone else can claim it now, and the old ticket cannot touch the new claim.
    let again = space
        .claim::<Job>(&jobs(), Lease::secs(30), Duration::ZERO)
        .unwrap()
        .unwrap();
    assert!(space.release(&claim).is_err());
    space.renew_claim(&again, Lease::secs(60)).unwrap();
    space.commit(&again).unwrap();
}

#[test]
fn a_claim_counts_the_claims_of_its_entry_released_and_lapsed_ones_included() {
    let space = Space::new().blocking();
    space.write(&job(1)).unwrap();
    let claim = |lease| {
        space
            .claim::<Job>(&jobs(), lease, Duration::from_secs(5))
            .unwrap()
            .expect("the entry is claimable")
    };
    let first = claim(Lease::secs(30));
    assert_eq!(first.claims, 1);
    space.release(&first).unwrap();
    let second = claim(Lease::millis(30));
    assert_eq!(second.claims, 2);
    // The claim lapses; the next one waits for it and counts it.
    let third = claim(Lease::secs(30));
    assert_eq!(third.claims, 3);
    space.commit(&third).unwrap();
    // A new entry starts again from one.
    space.write(&job(2)).unwrap();
    assert_eq!(claim(Lease::secs(30)).claims, 1);
}

#[test]
fn a_blocked_claim_is_served_by_a_write() {
    let space = Space::new().blocking();
    let claimer = {
        let s = space.clone();
        std::thread::spawn(move || {
            s.claim::<Job>(&jobs(), Lease::secs(30), Duration::from_secs(10))
                .unwrap()
        })
    };
    while space.stats().unwrap().waiters == 0 {
        std::thread::yield_now();
    }
    space.write(&job(9)).unwrap();
    let claim = claimer.join().unwrap().unwrap();
    assert_eq!(claim.entry, job(9));
    assert_eq!(
        space.stats().unwrap().entries,
        1,
        "a claimed entry stays stored until commit"
    );
    space.commit(&claim).unwrap();
    assert_eq!(space.stats().unwrap().entries, 0);
}

#[test]
fn claims_need_a_finite_lease() {
    let space = Space::new().blocking();
    let err = space
        .claim::<Job>(&jobs(), Lease::Forever, Duration::ZERO)
        .unwrap_err();
    assert!(matches!(err, SpaceError::InvalidLease { .. }), "{err}");
}

#[test]
fn a_subscription_lease_ends_delivery_by_itself() {
    let space = Space::new().blocking();
    let sub = space
        .notify_with_lease(&jobs(), EventKinds::WRITTEN, Lease::millis(50))
        .unwrap();
    space.write(&job(1)).unwrap();
    assert_eq!(next_event(&sub).seq, 1);
    std::thread::sleep(Duration::from_millis(100));
    space.write(&job(2)).unwrap();
    assert_eq!(sub.recv_timeout(Duration::from_millis(200)), None);
    assert!(sub.is_closed());
    assert!(matches!(
        sub.renew(Lease::secs(1)),
        Err(SpaceError::SubscriptionClosed { .. })
    ));
    assert_eq!(space.stats().unwrap().subscriptions, 0);
}
