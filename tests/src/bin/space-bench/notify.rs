//! `notify`: writes matched against S subscriptions of mixed shapes (the workload module of
//! `space-tests`), against the naive way of doing it in the same run.
//!
//! For each S it measures, single-threaded (so per core):
//! - `writes_per_s`: `Space::write` with S live subscriptions, events delivered into their
//!   logs;
//! - `match_p50_us` / `match_p99_us`: the percolator's match of one entry;
//! - `candidates_per_match`: candidates verified per match found (1 is perfect), with
//!   `candidates_per_write` and `matches_per_write` beside it;
//! - `bytes_per_subscription`: heap bytes the subscriptions hold, per subscription (the
//!   space's whole cost: handle, log, percolator entry);
//! - `naive_writes_per_s`: on a sample of the same writes, a one-document tantivy index per
//!   write with every subscription's (precompiled) tantivy query run against it. The sample's
//!   matches are checked to equal the percolator's.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use hdrhistogram::Histogram;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::json;
use space_core::{EventKinds, Query, Space};
use space_query::tantivy_form::EntrySchema;
use space_query::{Fields, Percolator, to_fields};
use space_tests::{Activity, workload};
use tantivy::collector::Count;
use tantivy::directory::RamDirectory;

use crate::inproc::median;

/// Bytes the C allocator has handed out and not got back (all arenas, and large blocks
/// it mapped directly): exact, unlike resident memory, and free to read.
fn allocated_bytes() -> u64 {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks + info.hblkhd) as u64
}

struct Measured {
    writes_per_s: f64,
    match_p50_us: f64,
    match_p99_us: f64,
    candidates: usize,
    matches: usize,
    bytes_per_subscription: f64,
    naive_writes_per_s: f64,
}

fn queries(s: u64, seed: u64) -> Vec<Query> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..s)
        .map(|i| workload::subscription(i, &mut rng))
        .collect()
}

fn entries(n: u64, seed: u64) -> Vec<Activity> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| workload::activity(&mut rng)).collect()
}

fn measure(s: u64, writes: u64, naive_sample: usize, seed: u64) -> Result<Measured> {
    let queries = queries(s, seed);
    let activities = entries(writes, seed + 1);
    let docs: Vec<Fields> = activities.iter().map(to_fields).collect::<Result<_, _>>()?;

    // The percolator alone: match latency and candidates.
    let mut percolator = Percolator::new();
    for (id, q) in queries.iter().enumerate() {
        percolator.register(id as u64, q.clone())?;
    }
    let mut latency = Histogram::<u64>::new(3)?;
    let mut ids = Vec::new();
    let (mut candidates, mut matches) = (0, 0);
    for doc in &docs {
        ids.clear();
        let start = Instant::now();
        let stats = percolator.match_entry("Activity", doc, &mut ids);
        latency.record(start.elapsed().as_nanos() as u64)?;
        candidates += stats.candidates;
        matches += stats.matches;
    }

    // The space: S live subscriptions, single-threaded writes.
    let allocated_before = allocated_bytes();
    let space = Space::new().blocking();
    let subs: Vec<_> = queries
        .iter()
        .map(|q| space.notify(q, EventKinds::WRITTEN))
        .collect::<Result<_, _>>()?;
    let bytes_per_subscription =
        allocated_bytes().saturating_sub(allocated_before) as f64 / s as f64;
    let start = Instant::now();
    for a in &activities {
        space.write(a)?;
    }
    let writes_per_s = writes as f64 / start.elapsed().as_secs_f64();
    let delivered: u64 = subs
        .iter()
        .map(|sub| std::iter::from_fn(|| sub.try_recv()).count() as u64)
        .sum();
    if delivered == 0 && matches > 0 {
        bail!("the space delivered no events although the percolator found {matches} matches");
    }
    drop(subs);

    // The naive way, on a sample: a one-document index per write, every query run on it.
    let schema = EntrySchema::new();
    let compiled: Vec<_> = queries.iter().map(|q| schema.compile(q)).collect();
    let sample = &docs[..naive_sample.min(docs.len())];
    let start = Instant::now();
    for doc in sample {
        let mut writer = tantivy::Index::builder()
            .schema(schema.schema().clone())
            .single_segment_index_writer(RamDirectory::create(), 15_000_000)?;
        writer.add_document(schema.document("Activity", doc))?;
        let index = writer.finalize()?;
        let searcher = index.reader()?.searcher();
        let mut naive_ids = Vec::new();
        for (id, q) in compiled.iter().enumerate() {
            if searcher.search(q.as_ref(), &Count)? > 0 {
                naive_ids.push(id as u64);
            }
        }
        ids.clear();
        percolator.match_entry("Activity", doc, &mut ids);
        if ids != naive_ids {
            bail!("the percolator and the naive way disagree: {ids:?} vs {naive_ids:?}");
        }
    }
    let naive_writes_per_s = sample.len() as f64 / start.elapsed().as_secs_f64();

    Ok(Measured {
        writes_per_s,
        match_p50_us: latency.value_at_quantile(0.5) as f64 / 1000.0,
        match_p99_us: latency.value_at_quantile(0.99) as f64 / 1000.0,
        candidates,
        matches,
        bytes_per_subscription,
        naive_writes_per_s,
    })
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub fn run(sizes: &[u64], writes: u64, runs: usize) -> Result<()> {
    let mut results = Vec::new();
    for &s in sizes {
        // The naive way costs about S tantivy searches per write: sample accordingly.
        let naive_sample = ((2_000_000 / s.max(1)) as usize).clamp(3, 200);
        let mut all = Vec::new();
        for run in 0..runs {
            let m = measure(s, writes, naive_sample, 1000 + run as u64)?;
            println!(
                "S={s} run {}: {:.0} writes/s, match p50 {:.1}us p99 {:.1}us, {:.2} candidates/match ({:.1} candidates, {:.1} matches per write), {:.0} B/subscription, naive {:.2} writes/s",
                run + 1,
                m.writes_per_s,
                m.match_p50_us,
                m.match_p99_us,
                m.candidates as f64 / m.matches.max(1) as f64,
                m.candidates as f64 / writes as f64,
                m.matches as f64 / writes as f64,
                m.bytes_per_subscription,
                m.naive_writes_per_s
            );
            all.push(m);
        }
        let med = |f: &dyn Fn(&Measured) -> f64| median(all.iter().map(f).collect());
        let writes_per_s = med(&|m| m.writes_per_s);
        let naive = med(&|m| m.naive_writes_per_s);
        results.push(json!({
            "subscriptions": s,
            "writes_per_s": writes_per_s.round(),
            "match_p50_us": round2(med(&|m| m.match_p50_us)),
            "match_p99_us": round2(med(&|m| m.match_p99_us)),
            "candidates_per_match": round2(med(&|m| m.candidates as f64 / m.matches.max(1) as f64)),
            "candidates_per_write": round2(med(&|m| m.candidates as f64 / writes as f64)),
            "matches_per_write": round2(med(&|m| m.matches as f64 / writes as f64)),
            "bytes_per_subscription": med(&|m| m.bytes_per_subscription).round(),
            "naive_writes_per_s": round2(naive),
            "naive_sample_writes": naive_sample,
            "vs_naive": (writes_per_s / naive.max(1e-9)).round(),
        }));
        // Let the allocator settle between sizes.
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "{}",
        json!({"workload": "notify", "writes_per_size": writes, "runs": runs, "results": results})
    );
    Ok(())
}
