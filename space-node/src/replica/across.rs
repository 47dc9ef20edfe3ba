//! Calls by query across the shards a node serves: each shard has an engine of its own,
//! and a read, take or claim by query is answered by the first of them that has a match,
//! at once if one has, else by the first to get one within the timeout.
//!
//! Nothing is lost on the way: waits that lose are dropped (a dropped wait gives back
//! what it was handed), and a result that was ready at once but lost the race is given
//! back explicitly (entries untaken, claims released).

use std::time::Duration;

use futures::future::select_all;
use space_core::server::{Engine, Pending, Taken};
use space_core::{ClaimedDocument, Document, Lease, Query, Result};

/// The first of `engines` whose call (made by `start`, with a timeout) finds something
/// (`found`): each engine asked at once first, then all of them waited on. What a losing
/// engine found goes back through `give_back`. Returns the engine's position and what it
/// found, or `None` when nothing was found within `timeout`.
///
/// # Errors
/// The first error an engine's call returns (nothing was found before it).
async fn first_across<T: Send + 'static>(
    engines: &[Engine],
    timeout: Duration,
    start: impl Fn(&Engine, Duration) -> Result<Pending<T>>,
    found: impl Fn(&T) -> bool,
    give_back: impl Fn(&Engine, T),
) -> Result<Option<(usize, T)>> {
    // At once, one engine after the other: the first match wins, nothing else is taken.
    for (i, engine) in engines.iter().enumerate() {
        let got = start(engine, Duration::ZERO)?.wait_async().await;
        if found(&got) {
            return Ok(Some((i, got)));
        }
    }
    if timeout.is_zero() {
        return Ok(None);
    }
    if engines.is_empty() {
        // A node that leads no shard now (an election under way, or its shards not
        // formed yet) has nothing to wait on but its time: answering at once would end
        // a blocking call that its caller meant to wait. Its caller races the wait with
        // the node's leaderships changing, and asks again when they do.
        tokio::time::sleep(timeout).await;
        return Ok(None);
    }
    // Waiting on all of them.
    let pendings = engines
        .iter()
        .map(|e| start(e, timeout))
        .collect::<Result<Vec<_>>>()?;
    settle(engines, pendings, found, give_back).await
}

/// The first of `pendings` (one per engine) to find something; the others' findings go
/// back. A pending ready at once (a match arrived since the engines were asked) counts
/// before any wait.
async fn settle<T: Send + 'static>(
    engines: &[Engine],
    pendings: Vec<Pending<T>>,
    found: impl Fn(&T) -> bool,
    give_back: impl Fn(&Engine, T),
) -> Result<Option<(usize, T)>> {
    let (ready, waiting): (Vec<_>, Vec<_>) = pendings
        .into_iter()
        .enumerate()
        .partition(|(_, p)| p.is_ready());
    let mut winner = None;
    for (i, pending) in ready {
        let got = pending.wait_async().await;
        if !found(&got) {
            continue;
        }
        match winner {
            None => winner = Some((i, got)),
            Some(_) => give_back(&engines[i], got),
        }
    }
    if winner.is_some() || waiting.is_empty() {
        // Dropping the waits gives back anything handed to them meanwhile.
        return Ok(winner);
    }
    let (positions, waits): (Vec<usize>, Vec<_>) = waiting
        .into_iter()
        .map(|(i, p)| (i, Box::pin(p.wait_async())))
        .unzip();
    let (got, at, _rest) = select_all(waits).await;
    // Every wait has the same deadline: when the first ends empty, so do the others.
    Ok(found(&got).then_some((positions[at], got)))
}

/// Takes up to `max` entries (within `max_bytes` of documents) matching `query` from the
/// first engine that has any.
///
/// # Errors
/// As [`Engine::take_entries`].
pub async fn take_across(
    engines: &[Engine],
    query: &Query,
    max: usize,
    max_bytes: usize,
    timeout: Duration,
) -> Result<Option<(usize, Vec<Taken>)>> {
    first_across(
        engines,
        timeout,
        |e, t| e.take_entries(query, max, max_bytes, t),
        |taken| !taken.is_empty(),
        |e, taken| e.untake(taken),
    )
    .await
}

/// Claims an entry matching `query` on the first engine that has one.
///
/// # Errors
/// As [`Engine::claim`].
pub async fn claim_across(
    engines: &[Engine],
    query: &Query,
    lease: Lease,
    timeout: Duration,
) -> Result<Option<(usize, ClaimedDocument)>> {
    let claimed = first_across(
        engines,
        timeout,
        |e, t| e.claim(query, lease, t),
        Option::is_some,
        |e, claim| {
            if let Some(c) = claim {
                // Fails only if the claim already ended; the entry is back either way.
                let _ = e.release(&c.ticket);
            }
        },
    )
    .await?;
    Ok(claimed.and_then(|(i, c)| c.map(|c| (i, c))))
}

/// Reads an entry matching `query` from the first engine that has one.
///
/// # Errors
/// As [`Engine::read`].
pub async fn read_across(
    engines: &[Engine],
    query: &Query,
    timeout: Duration,
) -> Result<Option<(usize, Document)>> {
    let read = first_across(
        engines,
        timeout,
        |e, t| e.read(query, t),
        Option::is_some,
        |_, _| {},
    )
    .await?;
    Ok(read.and_then(|(i, d)| d.map(|d| (i, d))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use space_core::{EngineConfig, Fields, Filter, Value};

    fn engines(n: usize) -> Vec<Engine> {
        (0..n)
            .map(|_| Engine::new(EngineConfig::default()))
            .collect()
    }

    fn job(n: i64) -> Fields {
        let mut f = Fields::new();
        f.push("n", Value::I64(n));
        f
    }

    fn held(engines: &[Engine]) -> Vec<u64> {
        engines.iter().map(|e| e.stats().entries).collect()
    }

    #[tokio::test]
    async fn a_wait_on_no_engine_lasts_its_timeout() {
        // A node leading no shard still holds a blocking call for its time (its caller
        // ends it when the node's leaderships change), rather than answering "nothing".
        let jobs = Query::new("Job", Filter::All);
        let wait = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let claimed = claim_across(&[], &jobs, Lease::Forever, wait)
            .await
            .unwrap();
        assert!(claimed.is_none());
        assert!(
            started.elapsed() >= wait,
            "answered after {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn the_first_engine_with_a_match_answers_at_once() {
        let es = engines(3);
        let jobs = Query::new("Job", Filter::All);
        es[2].write("Job", job(1), None, Lease::Forever).unwrap();
        let (at, taken) = take_across(&es, &jobs, 5, 1 << 20, Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((at, taken.len()), (2, 1));
        assert_eq!(held(&es), [0, 0, 0]);
        assert!(
            take_across(&es, &jobs, 5, 1 << 20, Duration::ZERO)
                .await
                .unwrap()
                .is_none()
        );
        es[1].write("Job", job(2), None, Lease::Forever).unwrap();
        let (at, _) = claim_across(
            &es,
            &jobs,
            Lease::For(Duration::from_secs(60)),
            Duration::ZERO,
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(at, 1);
        es[0].write("Job", job(3), None, Lease::Forever).unwrap();
        let (at, doc) = read_across(&es, &jobs, Duration::ZERO)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((at, doc.fields.get("n")), (0, Some(&Value::I64(3))));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wait_on_all_engines_ends_with_the_first_write_and_leaves_no_waiter() {
        let es = engines(3);
        let jobs = Query::new("Job", Filter::All);
        let writer = es[1].clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            writer.write("Job", job(7), None, Lease::Forever).unwrap();
        });
        let (at, taken) = take_across(&es, &jobs, 1, 1 << 20, Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((at, taken.len()), (1, 1));
        for e in &es {
            assert_eq!(e.stats().waiters, 0, "a losing wait stayed");
        }
        // Nothing at all: every wait ends empty at the timeout.
        let none = take_across(&es, &jobs, 1, 1 << 20, Duration::from_millis(50))
            .await
            .unwrap();
        assert!(none.is_none());
    }

    #[tokio::test]
    async fn what_losing_engines_took_at_once_goes_back() {
        // Matches in every engine by the time they are waited on: one wins, the others'
        // entries and claims go back.
        let es = engines(3);
        let jobs = Query::new("Job", Filter::All);
        for e in &es {
            e.write("Job", job(1), None, Lease::Forever).unwrap();
        }
        let pendings = es
            .iter()
            .map(|e| e.take_entries(&jobs, 1, 1 << 20, Duration::from_secs(5)))
            .collect::<Result<Vec<_>>>()
            .unwrap();
        let (at, taken) = settle(
            &es,
            pendings,
            |t: &Vec<Taken>| !t.is_empty(),
            |e, t| e.untake(t),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(taken.len(), 1);
        let mut expected = [1, 1, 1];
        expected[at] = 0;
        assert_eq!(held(&es), expected, "a losing engine's entry was lost");

        let claims = es
            .iter()
            .map(|e| {
                e.claim(
                    &jobs,
                    Lease::For(Duration::from_secs(60)),
                    Duration::from_secs(5),
                )
            })
            .collect::<Result<Vec<_>>>()
            .unwrap();
        let winner = settle(
            &es,
            claims,
            Option::is_some,
            |e, c: Option<ClaimedDocument>| {
                if let Some(c) = c {
                    let _ = e.release(&c.ticket);
                }
            },
        )
        .await
        .unwrap()
        .unwrap();
        // Only the winner's entry is still claimed: the others can be claimed again.
        for (i, e) in es.iter().enumerate() {
            let again = e
                .claim(&jobs, Lease::For(Duration::from_secs(60)), Duration::ZERO)
                .unwrap()
                .wait();
            assert_eq!(again.is_some(), i != winner.0 && i != at, "engine {i}");
        }
    }
}
