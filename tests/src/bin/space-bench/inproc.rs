//! `inproc`: the in-process space against crossbeam-channel, 2 producers and 2 consumers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde_json::json;
use space_core::{BlockingSpace, Query, Space};
use space_tests::Item;

const PRODUCERS: u64 = 2;
const CONSUMERS: u32 = 2;
/// Capacity of the bounded crossbeam channels of the peer.
const CHANNEL_CAPACITY: usize = 1024;

fn item(id: u64) -> Item {
    Item {
        id,
        kind: (id % u64::from(CONSUMERS)) as u32,
        payload: vec![(id & 0xff) as u8; 64],
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs `producers` and `consumers` threads; returns entries moved per second.
fn run_threads(
    entries: u64,
    producer: impl Fn(u64, u64) + Send + Sync + 'static,
    consumer: impl Fn(u32, &AtomicU64) -> Result<u64> + Send + Sync + 'static,
) -> Result<f64> {
    let producer = Arc::new(producer);
    let consumer = Arc::new(consumer);
    let consumed = Arc::new(AtomicU64::new(0));
    let per_producer = entries / PRODUCERS;
    let start = Instant::now();
    let consumers: Vec<_> = (0..CONSUMERS)
        .map(|c| {
            let (consumer, consumed) = (consumer.clone(), consumed.clone());
            std::thread::spawn(move || consumer(c, &consumed))
        })
        .collect();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let producer = producer.clone();
            std::thread::spawn(move || producer(p * per_producer, per_producer))
        })
        .collect();
    for p in producers {
        p.join()
            .map_err(|_| anyhow::anyhow!("a producer panicked"))?;
    }
    let mut total = 0;
    for c in consumers {
        total += c
            .join()
            .map_err(|_| anyhow::anyhow!("a consumer panicked"))??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    if total != per_producer * PRODUCERS {
        bail!(
            "moved {total} entries, expected {}",
            per_producer * PRODUCERS
        );
    }
    Ok(total as f64 / elapsed)
}

/// The space, consumers taking by entry type (`by_kind == false`) or only their own kind.
fn space_run(entries: u64, by_kind: bool) -> Result<f64> {
    let space = Space::new().blocking();
    let total = entries / PRODUCERS * PRODUCERS;
    let writer = space.clone();
    run_threads(
        entries,
        move |first, n| {
            for id in first..first + n {
                if let Err(e) = writer.write(&item(id)) {
                    eprintln!("write failed: {e}");
                    return;
                }
            }
        },
        move |c, consumed| {
            let query = if by_kind {
                Query::of::<Item>().eq("kind", c)
            } else {
                Query::of::<Item>()
            };
            let mine_total = if by_kind {
                total / u64::from(CONSUMERS)
            } else {
                total
            };
            let mut mine = 0;
            loop {
                let done = if by_kind {
                    mine >= mine_total
                } else {
                    consumed.load(Ordering::Relaxed) >= total
                };
                if done {
                    return Ok(mine);
                }
                if space
                    .take::<Item>(&query, Duration::from_millis(20))?
                    .is_some()
                {
                    mine += 1;
                    consumed.fetch_add(1, Ordering::Relaxed);
                }
            }
        },
    )
}

/// crossbeam-channel: one bounded channel shared by all (`by_kind == false`), or one per
/// kind.
fn crossbeam_run(entries: u64, by_kind: bool) -> Result<f64> {
    let channels: Vec<_> = (0..if by_kind { CONSUMERS } else { 1 })
        .map(|_| crossbeam_channel::bounded::<Item>(CHANNEL_CAPACITY))
        .collect();
    let senders: Vec<_> = channels.iter().map(|(s, _)| s.clone()).collect();
    let receivers: Vec<_> = channels.iter().map(|(_, r)| r.clone()).collect();
    drop(channels);
    let total = entries / PRODUCERS * PRODUCERS;
    run_threads(
        entries,
        move |first, n| {
            for id in first..first + n {
                let it = item(id);
                let ch = if by_kind { it.kind as usize } else { 0 };
                if senders[ch].send(it).is_err() {
                    return;
                }
            }
        },
        move |c, consumed| {
            let rx = &receivers[if by_kind { c as usize } else { 0 }];
            let mine_total = if by_kind {
                total / u64::from(CONSUMERS)
            } else {
                total
            };
            let mut mine = 0;
            loop {
                let done = if by_kind {
                    mine >= mine_total
                } else {
                    consumed.load(Ordering::Relaxed) >= total
                };
                if done {
                    return Ok(mine);
                }
                if let Ok(it) = rx.recv_timeout(Duration::from_millis(20)) {
                    std::hint::black_box(&it);
                    mine += 1;
                    consumed.fetch_add(1, Ordering::Relaxed);
                }
            }
        },
    )
}

/// Time from a write to the return of a take that was already blocked waiting for it.
/// The entry carries the write time (nanoseconds since `base`) in its id.
fn space_wakeups(samples: u64) -> Result<Histogram<u64>> {
    let space = Space::new().blocking();
    let base = Instant::now();
    let taker = {
        let space = space.clone();
        std::thread::spawn(move || -> Result<Histogram<u64>> {
            let mut h = Histogram::new(3)?;
            let q = Query::of::<Item>();
            for _ in 0..samples {
                let it = space
                    .take::<Item>(&q, Duration::from_secs(10))?
                    .context("a wake-up sample timed out")?;
                let now = base.elapsed().as_nanos() as u64;
                h.record(now.saturating_sub(it.id) / 1000)?;
            }
            Ok(h)
        })
    };
    for _ in 0..samples {
        wait_for_waiter(&space);
        let mut it = item(0);
        it.id = base.elapsed().as_nanos() as u64;
        space.write(&it)?;
    }
    taker
        .join()
        .map_err(|_| anyhow::anyhow!("the taker panicked"))?
}

/// Waits until the taker is blocked in the space (and a little longer, so it is asleep).
fn wait_for_waiter(space: &BlockingSpace) {
    while space.stats().unwrap().waiters == 0 {
        std::thread::yield_now();
    }
    std::thread::sleep(Duration::from_micros(200));
}

/// The same measurement for a crossbeam channel (the peer's wake-up latency).
fn crossbeam_wakeups(samples: u64) -> Result<Histogram<u64>> {
    let (tx, rx) = crossbeam_channel::bounded::<(Instant, Item)>(1);
    let taker = std::thread::spawn(move || -> Result<Histogram<u64>> {
        let mut h = Histogram::new(3)?;
        for _ in 0..samples {
            let (sent, _) = rx.recv()?;
            h.record(sent.elapsed().as_micros() as u64)?;
        }
        Ok(h)
    });
    for _ in 0..samples {
        std::thread::sleep(Duration::from_micros(300));
        tx.send((Instant::now(), item(0)))?;
    }
    taker
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver panicked"))?
}

pub fn run(entries: u64, runs: usize, wakeups: u64) -> Result<()> {
    let mut space_rates = Vec::new();
    let mut cb_rates = Vec::new();
    let mut field_space_rates = Vec::new();
    let mut field_cb_rates = Vec::new();
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    let mut cb_p50s = Vec::new();
    let mut cb_p99s = Vec::new();
    for run in 1..=runs {
        // Interleave the space and its peer so both see the same machine conditions.
        let cb = crossbeam_run(entries, false)?;
        let sp = space_run(entries, false)?;
        let field_cb = crossbeam_run(entries, true)?;
        let field_sp = space_run(entries, true)?;
        let w = space_wakeups(wakeups)?;
        let cw = crossbeam_wakeups(wakeups)?;
        println!(
            "run {run}: space {sp:.0}/s crossbeam {cb:.0}/s ratio {:.2} | field: space {field_sp:.0}/s crossbeam {field_cb:.0}/s ratio {:.2} | wake-up p50 {}us p99 {}us (crossbeam p50 {}us p99 {}us)",
            sp / cb,
            field_sp / field_cb,
            w.value_at_quantile(0.5),
            w.value_at_quantile(0.99),
            cw.value_at_quantile(0.5),
            cw.value_at_quantile(0.99),
        );
        space_rates.push(sp);
        cb_rates.push(cb);
        field_space_rates.push(field_sp);
        field_cb_rates.push(field_cb);
        p50s.push(w.value_at_quantile(0.5) as f64);
        p99s.push(w.value_at_quantile(0.99) as f64);
        cb_p50s.push(cw.value_at_quantile(0.5) as f64);
        cb_p99s.push(cw.value_at_quantile(0.99) as f64);
    }
    let ratios: Vec<f64> = space_rates
        .iter()
        .zip(&cb_rates)
        .map(|(s, c)| s / c)
        .collect();
    let field_ratios: Vec<f64> = field_space_rates
        .iter()
        .zip(&field_cb_rates)
        .map(|(s, c)| s / c)
        .collect();
    let out = json!({
        "workload": "inproc",
        "entries_per_run": entries,
        "runs": runs,
        "producers": PRODUCERS,
        "consumers": CONSUMERS,
        "space_ops_per_s": median(space_rates).round(),
        "crossbeam_ops_per_s": median(cb_rates).round(),
        "ratio": (median(ratios) * 1000.0).round() / 1000.0,
        "field_space_ops_per_s": median(field_space_rates).round(),
        "field_crossbeam_ops_per_s": median(field_cb_rates).round(),
        "field_ratio": (median(field_ratios) * 1000.0).round() / 1000.0,
        "wakeup_p50_us": median(p50s),
        "wakeup_p99_us": median(p99s),
        "crossbeam_wakeup_p50_us": median(cb_p50s),
        "crossbeam_wakeup_p99_us": median(cb_p99s),
    });
    println!("{out}");
    Ok(())
}
