//! Notify that cannot fail in silence: a node refuses a subscription whose endpoint it
//! cannot reach, a client falls back to carrying events over its own connection, and
//! polled subscriptions deliver and end like pushed ones.

mod common;

use std::time::{Duration, Instant};

use common::NodeProcess;
use serde::{Deserialize, Serialize};
use space_client::wire::{Request, Response};
use space_client::{
    ClientConfig, Connection, Delivery, EventKinds, Lease, Notification, Query, Space, SpaceError,
    connect_with,
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Alert {
    level: u32,
}
space_client::entry!(Alert, "delivery.Alert");

fn config(delivery: Delivery, advertise: Option<&str>) -> ClientConfig {
    ClientConfig {
        delivery,
        subscriber_advertise: advertise.map(|a| a.parse().expect("an address")),
        ..ClientConfig::default()
    }
}

/// Writes `n` alerts and checks that the subscription is told each, in order.
async fn written_and_told(space: &Space, sub: &space_client::Subscription, n: u32) {
    for level in 0..n {
        space.write(&Alert { level }).await.unwrap();
    }
    let mut told = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while told < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let next = tokio::time::timeout(left, sub.recv_async()).await;
        match next {
            Ok(Some(Notification::Event(e))) => {
                told += 1;
                assert_eq!(e.seq, u64::from(told), "in order, without holes");
            }
            other => panic!("after {told} of {n} events: {other:?}"),
        }
    }
}

/// What subscribing from a client that pushes only to `advertise` says.
async fn refused(node: &NodeProcess, advertise: &str) -> (Space, SpaceError) {
    let space = connect_with(&node.addr, config(Delivery::Push, Some(advertise)))
        .await
        .unwrap();
    let err = space
        .notify(&Query::of::<Alert>(), EventKinds::WRITTEN)
        .await
        .unwrap_err();
    (space, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_the_node_cannot_reach_is_refused_at_once_naming_it() {
    let node = NodeProcess::start(&[]);
    // Nothing listens there: the connection is refused.
    let (_, err) = refused(&node, "127.0.0.1:1").await;
    assert!(
        matches!(&err, SpaceError::EndpointUnreachable { endpoint, .. } if endpoint == "127.0.0.1:1"),
        "{err:?}"
    );
    // Something listens there but never answers (as a black hole would): refused too,
    // after the node's few seconds of trying.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let (space, err) = refused(&node, &addr).await;
    assert!(
        matches!(&err, SpaceError::EndpointUnreachable { endpoint, .. } if *endpoint == addr),
        "{err:?}"
    );
    assert!(err.to_string().contains(&addr), "{err}");
    // Nothing was left registered on the node.
    let stats = space.stats().await.unwrap();
    assert_eq!(stats.subscriptions, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_the_node_cannot_reach_gets_its_events_over_its_own_connection() {
    let node = NodeProcess::start(&[]);
    let space = connect_with(&node.addr, config(Delivery::Auto, Some("127.0.0.1:1")))
        .await
        .unwrap();
    let sub = space
        .notify(&Query::of::<Alert>(), EventKinds::WRITTEN)
        .await
        .expect("falls back to polling");
    written_and_told(&space, &sub, 300).await;
    // Later subscriptions poll at once.
    let again = space
        .notify(&Query::of::<Alert>().gt("level", 1000), EventKinds::WRITTEN)
        .await
        .unwrap();
    space.write(&Alert { level: 5000 }).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(20), again.recv_async()).await {
        Ok(Some(Notification::Event(e))) => assert_eq!(e.seq, 1),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polled_subscription_delivers_and_ends_with_its_lease() {
    let node = NodeProcess::start(&[]);
    let space = connect_with(&node.addr, config(Delivery::Poll, None))
        .await
        .unwrap();
    let sub = space
        .notify_with_lease(
            &Query::of::<Alert>(),
            EventKinds::WRITTEN,
            Lease::For(Duration::from_secs(2)),
        )
        .await
        .unwrap();
    written_and_told(&space, &sub, 50).await;
    // When the lease ends, the stream ends (and does not hang).
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while sub.recv_async().await.is_some() {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the polled stream did not end with its lease"
    );
}

/// A client that goes away in the middle of a poll leaves nothing behind: once the poll
/// it left waiting ends (the client asked for 10 s), its polled subscription is cancelled
/// after the node's subscriber timeout like any unpolled one.
#[test]
fn a_poll_cut_off_by_its_client_going_away_does_not_keep_the_subscription() {
    let node = NodeProcess::start(&["--subscriber-timeout-ms", "300"]);
    let client = tokio::runtime::Runtime::new().unwrap();
    client.block_on(async {
        let space = connect_with(&node.addr, config(Delivery::Poll, None))
            .await
            .unwrap();
        let sub = space
            .notify(&Query::of::<Alert>(), EventKinds::WRITTEN)
            .await
            .unwrap();
        // Let the first poll start waiting on the node, then leave it there.
        tokio::time::sleep(Duration::from_millis(200)).await;
        std::mem::forget(sub);
        std::mem::forget(space);
    });
    // The client vanishes mid-poll, as a crash would.
    client.shutdown_background();
    let observer = tokio::runtime::Runtime::new().unwrap();
    observer.block_on(async {
        let space = connect_with(&node.addr, config(Delivery::Push, None))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(25);
        loop {
            let stats = space.stats().await.unwrap();
            if stats.subscriptions == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the node kept the subscription of a client gone mid-poll: {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

/// Receives the next notification, waiting up to 20 s.
async fn next(sub: &space_client::Subscription) -> Option<Notification> {
    tokio::time::timeout(Duration::from_secs(20), sub.recv_async())
        .await
        .ok()
        .flatten()
}

/// A subscription made by a client that polls, detached with its position, is picked up
/// by a client that pushes: it goes on being polled, from where it stood, without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polled_subscription_is_resumed_by_a_client_that_pushes() {
    let node = NodeProcess::start(&[]);
    let poller = connect_with(&node.addr, config(Delivery::Poll, None))
        .await
        .unwrap();
    let sub = poller
        .notify(&Query::of::<Alert>(), EventKinds::WRITTEN)
        .await
        .unwrap();
    for level in 0..5 {
        poller.write(&Alert { level }).await.unwrap();
    }
    for seq in 1..=2 {
        assert!(matches!(next(&sub).await, Some(Notification::Event(e)) if e.seq == seq));
    }
    let position = sub.detach_at();
    for level in 5..8 {
        poller.write(&Alert { level }).await.unwrap();
    }
    let pusher = connect_with(&node.addr, config(Delivery::Push, None))
        .await
        .unwrap();
    let sub = pusher.resume_at(&position).await.unwrap();
    for seq in 3..=8 {
        match next(&sub).await {
            Some(Notification::Event(e)) => assert_eq!(e.seq, seq, "in order, without a gap"),
            other => panic!("event {seq} was expected, not {other:?}"),
        }
    }
}

/// A subscription the node pushes, picked up by a client that polls: the node does not
/// poll a pushed subscription, so the client says it may have missed events (a gap),
/// subscribes anew, and is told of every later write; it is not left waiting in silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_subscription_resumed_by_a_client_that_polls_says_what_it_lost() {
    let node = NodeProcess::start(&[]);
    let pusher = connect_with(&node.addr, config(Delivery::Push, None))
        .await
        .unwrap();
    let sub = pusher
        .notify(&Query::of::<Alert>(), EventKinds::WRITTEN)
        .await
        .unwrap();
    written_and_told(&pusher, &sub, 3).await;
    let position = sub.detach_at();
    let poller = connect_with(
        &node.addr,
        ClientConfig {
            // Renewed (and registered anew where lost) every second.
            subscription_lease: Duration::from_secs(3),
            ..config(Delivery::Poll, None)
        },
    )
    .await
    .unwrap();
    let sub = poller.resume_at(&position).await.unwrap();
    assert!(
        matches!(next(&sub).await, Some(Notification::Missed { .. })),
        "events may have been missed: said first"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sub.unreached().is_empty() || sub.position().parts.is_empty() {
        assert!(Instant::now() < deadline, "never registered anew");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    written_and_told(&poller, &sub, 3).await;
}

/// A poll made again after the answer that said its subscription ended was lost (the
/// connection dropped) is told again that it ended, rather than that the subscription is
/// unknown, which a client takes for a lost subscription (a gap). Events it would have
/// lost are not made up: a poll asking for ones the ended subscription took with it is
/// still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_retried_after_its_subscription_ended_is_told_the_end_again() {
    use space_client::wire::{Request, Response};
    let node = NodeProcess::start(&[]);
    let conn = space_client::Connection::open(&node.addr, ClientConfig::default())
        .await
        .unwrap();
    let Response::Subscribed(id) = conn
        .call(Request::Subscribe {
            query: Query::of::<Alert>(),
            kinds: EventKinds::WRITTEN,
            lease: Lease::For(Duration::from_secs(1)),
            endpoint: None,
        })
        .await
        .unwrap()
    else {
        panic!("not subscribed")
    };
    let space = connect_with(&node.addr, config(Delivery::Poll, None))
        .await
        .unwrap();
    space.write(&Alert { level: 1 }).await.unwrap();
    let poll = |after| {
        conn.call(Request::Poll {
            id,
            after,
            wait: Duration::from_secs(2),
        })
    };
    let mut after = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let Response::Notifications {
            notifications,
            ended,
        } = poll(after).await.unwrap()
        else {
            panic!("no notifications")
        };
        if let Some(Notification::Event(e)) = notifications.last() {
            after = e.seq;
        }
        if ended {
            break;
        }
        assert!(Instant::now() < deadline, "the lease never ended");
    }
    assert_eq!(after, 1, "the write was told");
    // The answer saying it ended is lost; the client polls again.
    match poll(after).await {
        Ok(Response::Notifications {
            notifications,
            ended: true,
        }) if notifications.is_empty() => {}
        other => panic!("the end was not told again: {other:?}"),
    }
    assert!(
        matches!(poll(0).await, Err(SpaceError::SubscriptionClosed { .. })),
        "an event gone with the subscription is not answered as told"
    );
}

/// A restarted node gives no subscription an id its last run gave: a renewal of a
/// subscription the node lost finds it gone (the client then registers it anew, after a
/// gap), rather than renewing another client's subscription that took its id (the first
/// client would then be told nothing from that node, and its cancel end the other's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_gives_no_subscription_an_id_it_gave_before() {
    let addr = common::free_addrs(1).remove(0);
    let subscribe = || async {
        let conn = Connection::open(&addr, ClientConfig::default())
            .await
            .unwrap();
        let answer = conn
            .call(Request::Subscribe {
                query: Query::of::<Alert>(),
                kinds: EventKinds::WRITTEN,
                lease: Lease::For(Duration::from_secs(60)),
                endpoint: None,
            })
            .await
            .unwrap();
        let Response::Subscribed(id) = answer else {
            panic!("{answer:?}")
        };
        (conn, id)
    };
    let node = NodeProcess::start_at(&addr, &[]);
    let (_, before) = subscribe().await;
    node.kill();
    let _node = NodeProcess::start_at(&addr, &[]);
    let (conn, after) = subscribe().await;
    assert_ne!(before, after, "the restarted node gave an id again");
    let renewed = conn
        .call(Request::RenewSubscription {
            id: before,
            lease: Lease::For(Duration::from_secs(60)),
        })
        .await;
    assert!(
        matches!(renewed, Err(SpaceError::SubscriptionClosed { .. })),
        "{renewed:?}"
    );
}

/// A node that restarted has a pushed subscription back within moments: the end of its
/// push connection makes the client renew at once and soon after, not only at the next
/// regular renewal (a quarter to a third of the lease: 15 to 20 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_has_a_pushed_subscription_back_soon() {
    let addr = common::free_addrs(1).remove(0);
    let node = NodeProcess::start_at(&addr, &[]);
    let config = ClientConfig {
        subscription_lease: Duration::from_secs(60),
        ..config(Delivery::Push, None)
    };
    let space = connect_with(&node.addr, config).await.unwrap();
    let sub = space
        .notify(&Query::of::<Alert>(), EventKinds::WRITTEN)
        .await
        .unwrap();
    node.kill();
    let _node = NodeProcess::start_at(&addr, &[]);
    match tokio::time::timeout(Duration::from_secs(10), sub.recv_async()).await {
        Ok(Some(Notification::Missed { .. })) => {}
        other => panic!("the lost part was not found before the regular renewal: {other:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sub.unreached().is_empty() {
        assert!(Instant::now() < deadline, "never registered anew");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Told from the new registration's start.
    space.write(&Alert { level: 9 }).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), sub.recv_async()).await {
        Ok(Some(Notification::Event(e))) => assert_eq!(e.seq, 1),
        other => panic!("{other:?}"),
    }
}
