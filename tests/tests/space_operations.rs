//! The operations of docs/ARCHITECTURE.md section 4, as the scenarios a user relies on.

use std::time::{Duration, Instant};

use space_core::{Filter, Lease, Query, Space, SpaceError};
use space_tests::{Job, Order};

fn job(id: u64, kind: &str) -> Job {
    Job {
        id,
        kind: kind.into(),
        size: id as u32,
    }
}

fn all_jobs() -> Query {
    Query::of::<Job>()
}

const SHORT: Duration = Duration::from_millis(50);

#[test]
fn read_returns_a_copy_and_leaves_the_entry() {
    let space = Space::new().blocking();
    space.write(&job(1, "a")).unwrap();
    let first: Option<Job> = space.read(&all_jobs(), Duration::ZERO).unwrap();
    let second: Option<Job> = space.read(&all_jobs(), Duration::ZERO).unwrap();
    assert_eq!(first, Some(job(1, "a")));
    assert_eq!(second, Some(job(1, "a")));
    assert_eq!(space.count(&all_jobs()).unwrap(), 1);
}

#[test]
fn take_removes_the_entry() {
    let space = Space::new().blocking();
    space.write(&job(1, "a")).unwrap();
    assert_eq!(
        space.take::<Job>(&all_jobs(), Duration::ZERO).unwrap(),
        Some(job(1, "a"))
    );
    assert_eq!(
        space.take::<Job>(&all_jobs(), Duration::ZERO).unwrap(),
        None
    );
    assert_eq!(space.count(&all_jobs()).unwrap(), 0);
}

#[test]
fn if_exists_forms_and_zero_timeouts_do_not_wait() {
    let space = Space::new().blocking();
    let writer = {
        let space = space.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            space.write(&job(1, "late")).unwrap();
        })
    };
    let start = Instant::now();
    assert_eq!(space.read_if_exists::<Job>(&all_jobs()).unwrap(), None);
    assert_eq!(space.take_if_exists::<Job>(&all_jobs()).unwrap(), None);
    assert_eq!(
        space.read::<Job>(&all_jobs(), Duration::ZERO).unwrap(),
        None
    );
    assert_eq!(
        space.take::<Job>(&all_jobs(), Duration::ZERO).unwrap(),
        None
    );
    assert!(
        space
            .take_all::<Job>(&all_jobs(), 5, Duration::ZERO)
            .unwrap()
            .is_empty()
    );
    assert!(
        space
            .claim::<Job>(&all_jobs(), Lease::secs(5), Duration::ZERO)
            .unwrap()
            .is_none()
    );
    // None of the calls above waited for the write that comes 300 ms later.
    assert!(start.elapsed() < Duration::from_millis(300));
    writer.join().unwrap();
}

#[test]
fn timeouts_are_honoured() {
    let space = Space::new().blocking();
    for _ in 0..3 {
        let start = Instant::now();
        assert_eq!(space.take::<Job>(&all_jobs(), SHORT).unwrap(), None);
        assert!(start.elapsed() >= SHORT);
        let start = Instant::now();
        assert_eq!(space.read::<Job>(&all_jobs(), SHORT).unwrap(), None);
        assert!(start.elapsed() >= SHORT);
    }
    assert_eq!(
        space.stats().unwrap().waiters,
        0,
        "timed-out waiters are removed"
    );
}

#[test]
fn duplicates_are_separate_entries() {
    let space = Space::new().blocking();
    let a = space.write(&job(7, "dup")).unwrap();
    let b = space.write(&job(7, "dup")).unwrap();
    assert_ne!(a.key, b.key);
    assert_eq!(space.count(&all_jobs()).unwrap(), 2);
    assert_eq!(
        space.take::<Job>(&all_jobs(), Duration::ZERO).unwrap(),
        Some(job(7, "dup"))
    );
    assert_eq!(
        space.take::<Job>(&all_jobs(), Duration::ZERO).unwrap(),
        Some(job(7, "dup"))
    );
    assert_eq!(
        space.take::<Job>(&all_jobs(), Duration::ZERO).unwrap(),
        None
    );
}

#[test]
fn reads_and_takes_return_the_oldest_match() {
    let space = Space::new().blocking();
    for i in 0..10 {
        space
            .write(&job(i, if i % 2 == 0 { "even" } else { "odd" }))
            .unwrap();
    }
    let odd = Query::of::<Job>().eq("kind", "odd");
    assert_eq!(
        space.read::<Job>(&odd, Duration::ZERO).unwrap().unwrap().id,
        1
    );
    let taken: Vec<u64> = std::iter::from_fn(|| space.take::<Job>(&odd, Duration::ZERO).unwrap())
        .map(|j| j.id)
        .collect();
    assert_eq!(taken, vec![1, 3, 5, 7, 9]);
    let big_even = Query::of::<Job>().eq("kind", "even").gt("size", 4);
    assert_eq!(
        space
            .take::<Job>(&big_even, Duration::ZERO)
            .unwrap()
            .unwrap()
            .id,
        6
    );
}

#[test]
fn take_all_returns_at_least_one_and_at_most_max_oldest_first() {
    let space = Space::new().blocking();
    for i in 0..7 {
        space.write(&job(i, "x")).unwrap();
    }
    let got: Vec<u64> = space
        .take_all::<Job>(&all_jobs(), 3, SHORT)
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(got, vec![0, 1, 2]);
    let got: Vec<u64> = space
        .take_all::<Job>(&all_jobs(), 10, SHORT)
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(got, vec![3, 4, 5, 6]);
    // Empty space: waits for the first one, then returns it.
    let writer = {
        let space = space.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            space.write(&job(100, "x")).unwrap();
        })
    };
    let got = space
        .take_all::<Job>(&all_jobs(), 10, Duration::from_secs(10))
        .unwrap();
    assert_eq!(got, vec![job(100, "x")]);
    writer.join().unwrap();
    assert!(
        space
            .take_all::<Job>(&all_jobs(), 10, SHORT)
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        space.take_all::<Job>(&all_jobs(), 0, SHORT),
        Err(SpaceError::ZeroMax)
    ));
}

#[test]
fn write_all_is_all_or_nothing() {
    let space = Space::new().blocking();
    let orders = |numbers: &[&str]| -> Vec<Order> {
        numbers
            .iter()
            .map(|n| Order {
                number: (*n).into(),
                status: "New".into(),
                amount: 1.0,
                note: None,
            })
            .collect()
    };
    assert_eq!(space.write_all(&orders(&["a", "b"])).unwrap().len(), 2);
    // "b" exists already: nothing of this batch is stored.
    let err = space.write_all(&orders(&["c", "b"])).unwrap_err();
    assert!(matches!(err, SpaceError::KeyExists { .. }), "{err}");
    assert_eq!(space.count(&Query::of::<Order>()).unwrap(), 2);
    // A batch that repeats a key is refused too.
    assert!(space.write_all(&orders(&["d", "d"])).is_err());
    assert_eq!(space.count(&Query::of::<Order>()).unwrap(), 2);
}

#[test]
fn keys_give_direct_access() {
    let space = Space::new().blocking();
    let receipt = space.write(&job(1, "a")).unwrap();
    assert_eq!(
        space.read_key::<Job>(&receipt.key).unwrap(),
        Some(job(1, "a"))
    );
    assert_eq!(
        space.take_key::<Job>(&receipt.key).unwrap(),
        Some(job(1, "a"))
    );
    assert_eq!(space.take_key::<Job>(&receipt.key).unwrap(), None);
    // User keys: the key field is the identity.
    let order = Order {
        number: "o-17".into(),
        status: "New".into(),
        amount: 20.0,
        note: None,
    };
    let r = space.write(&order).unwrap();
    assert_eq!(r.key.to_string(), "o-17");
    assert!(matches!(
        space.write(&order),
        Err(SpaceError::KeyExists { .. })
    ));
    assert_eq!(
        space.read_key::<Order>(&"o-17".parse().unwrap()).unwrap(),
        Some(order)
    );
}

#[test]
fn contents_and_count_see_a_snapshot_of_matches() {
    let space = Space::new().blocking();
    for i in 0..5 {
        space.write(&job(i, if i < 3 { "a" } else { "b" })).unwrap();
    }
    let a = Query::of::<Job>().eq("kind", "a");
    assert_eq!(space.count(&a).unwrap(), 3);
    let ids: Vec<u64> = space
        .contents::<Job>(&a)
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(ids, vec![0, 1, 2]);
    let q = Query::parse("Job", "kind:b OR size:<1").unwrap();
    assert_eq!(space.count(&q).unwrap(), 3);
}

#[test]
fn templates_and_text_queries_select_entries() {
    #[derive(serde::Serialize)]
    struct OrderTemplate {
        status: Option<&'static str>,
        amount: Option<f64>,
    }
    let space = Space::new().blocking();
    for (n, status, amount, note) in [
        ("1", "New", 5.0, Some("rush delivery please")),
        ("2", "ReadyToShip", 150.0, None),
        ("3", "ReadyToShip", 50.0, Some("Gift wrap, rush")),
    ] {
        space
            .write(&Order {
                number: n.into(),
                status: status.into(),
                amount,
                note: note.map(str::to_owned),
            })
            .unwrap();
    }
    let t = Query::like::<Order>(&OrderTemplate {
        status: Some("ReadyToShip"),
        amount: None,
    })
    .unwrap();
    assert_eq!(space.count(&t).unwrap(), 2);
    let q = Query::parse("Order", "status:ReadyToShip AND amount:>100").unwrap();
    assert_eq!(
        space
            .read::<Order>(&q, Duration::ZERO)
            .unwrap()
            .unwrap()
            .number,
        "2"
    );
    let rush = Query::of::<Order>().text("note", "RUSH");
    assert_eq!(space.count(&rush).unwrap(), 2);
    let no_note = Query::of::<Order>().and(Filter::missing("note"));
    assert_eq!(space.count(&no_note).unwrap(), 1);
}

#[test]
fn a_blocked_take_wakes_only_for_a_matching_write() {
    let space = Space::new().blocking();
    let taker = {
        let space = space.clone();
        std::thread::spawn(move || {
            space
                .take::<Job>(
                    &Query::of::<Job>().eq("kind", "wanted"),
                    Duration::from_secs(10),
                )
                .unwrap()
        })
    };
    while space.stats().unwrap().waiters == 0 {
        std::thread::yield_now();
    }
    space.write(&job(1, "other")).unwrap();
    space.write(&job(2, "wanted")).unwrap();
    assert_eq!(taker.join().unwrap(), Some(job(2, "wanted")));
    assert_eq!(space.count(&all_jobs()).unwrap(), 1, "the other job stays");
}

#[test]
fn the_longest_waiting_taker_wins_and_readers_get_copies() {
    let space = Space::new().blocking();
    let mut takers = Vec::new();
    for n in 0..3 {
        let s = space.clone();
        takers.push(std::thread::spawn(move || {
            s.take::<Job>(&all_jobs(), Duration::from_secs(10)).unwrap()
        }));
        while space.stats().unwrap().waiters < n + 1 {
            std::thread::yield_now();
        }
    }
    let reader = {
        let s = space.clone();
        std::thread::spawn(move || s.read::<Job>(&all_jobs(), Duration::from_secs(10)).unwrap())
    };
    while space.stats().unwrap().waiters < 4 {
        std::thread::yield_now();
    }
    for id in 0..3 {
        space.write(&job(id, "x")).unwrap();
    }
    let got: Vec<u64> = takers
        .into_iter()
        .map(|t| t.join().unwrap().unwrap().id)
        .collect();
    assert_eq!(
        got,
        vec![0, 1, 2],
        "served in the order they started waiting"
    );
    // Readers are not in the takers' queue: the reader got a copy of the first write.
    assert_eq!(reader.join().unwrap(), Some(job(0, "x")));
    assert_eq!(space.count(&all_jobs()).unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_forms_work_from_tasks() {
    let space = Space::new();
    let taker = {
        let space = space.clone();
        tokio::spawn(async move {
            space
                .take::<Job>(&all_jobs(), Duration::from_secs(10))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    space.write(&job(5, "async")).await.unwrap();
    assert_eq!(taker.await.unwrap().unwrap(), Some(job(5, "async")));
    let start = Instant::now();
    assert_eq!(space.read::<Job>(&all_jobs(), SHORT).await.unwrap(), None);
    assert!(start.elapsed() >= SHORT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_take_future_loses_nothing() {
    const N: u64 = 500;
    let space = Space::new();
    let query = all_jobs();
    // Every round writes one job from another task while a take races against a short
    // timer; when the timer wins, the take future is dropped, sometimes just after it was
    // handed the job. Every job must then be either returned by a take or still stored.
    let mut completed_takes = 0;
    for i in 0..N {
        let writer = {
            let space = space.clone();
            tokio::spawn(async move { space.write(&job(i, "race")).await.unwrap() })
        };
        tokio::select! {
            got = space.take::<Job>(&query, Duration::from_secs(10)) => {
                if got.unwrap().is_some() {
                    completed_takes += 1;
                }
            }
            _ = tokio::time::sleep(Duration::from_micros(i % 40)) => {}
        }
        writer.await.unwrap();
    }
    let left = space.count(&query).await.unwrap();
    assert_eq!(
        completed_takes + left,
        N,
        "taken {completed_takes}, left {left}"
    );
    assert_eq!(
        space.stats().await.unwrap().waiters,
        0,
        "dropped takes leave no waiter behind"
    );
}
