//! Shared pieces of the cross-crate tests and of `space-bench`: the entry types they use,
//! real node processes, and a hostile client.

use serde::{Deserialize, Serialize};

pub mod history;
pub mod hostile;
pub mod process;
pub mod proxy;

/// A fresh directory under the system's temporary directory (emptied first, created),
/// removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// A directory named after `name` and this process (and numbered, so that one
    /// process may make several of the same name).
    pub fn new(name: &str) -> TempDir {
        static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("space-test-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::create_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A unit of work, as a master hands it to workers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Unique id within a test.
    pub id: u64,
    /// What sort of job (indexed).
    pub kind: String,
    /// Some payload.
    pub size: u32,
}
space_core::entry!(Job, "Job", index = [kind]);

/// An order with a user-supplied key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// The order number, used as the entry's key.
    pub number: String,
    /// Where the order is in its life.
    pub status: String,
    /// Amount in cents.
    pub amount: f64,
    /// Free text.
    pub note: Option<String>,
}
space_core::entry!(Order, "Order", key = number, index = [status]);

/// The benchmark's entry: `{id: u64, kind: u32, payload: 64 bytes}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// Sequence number given by the producer.
    pub id: u64,
    /// Which consumer it is for in the field workload (indexed).
    pub kind: u32,
    /// 64 bytes of payload.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}
space_core::entry!(Item, "Item", index = [kind]);

/// An account activity, the entry of the notify workload: what a subscriber might watch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Activity {
    /// Customer number (skewed: a few customers are very active).
    pub customer: u32,
    /// One of ten regions (skewed).
    pub region: String,
    /// One of five statuses (skewed).
    pub status: String,
    /// Amount, 0 to 10,000.
    pub amount: f64,
    /// A few words of free text.
    pub body: String,
    /// Present on one entry in a hundred.
    pub note: Option<String>,
}
space_core::entry!(Activity, "Activity");

/// The notify workload: subscriptions of mixed shapes and the entries written against
/// them, drawn from skewed distributions.
pub mod workload {
    use rand::Rng;
    use space_core::{Filter, Query};

    use super::Activity;

    /// Distinct customers.
    pub const CUSTOMERS: u32 = 20_000;
    /// The regions.
    pub const REGIONS: [&str; 10] = [
        "eu-west", "eu-north", "us-east", "us-west", "ap-south", "ap-east", "sa", "af", "me", "oc",
    ];
    /// The statuses.
    pub const STATUSES: [&str; 5] = ["New", "Paid", "Shipped", "Held", "Cancelled"];
    /// Words of the free text.
    pub const VOCABULARY: usize = 5_000;

    /// A skewed pick in `0..n`: low values are much more likely (u^2 of a uniform u).
    pub fn skewed(rng: &mut impl Rng, n: usize) -> usize {
        let u: f64 = rng.random();
        ((u * u) * n as f64) as usize % n
    }

    /// The `i`-th word of the vocabulary.
    pub fn word(i: usize) -> String {
        format!("w{i}x")
    }

    /// One entry of the workload.
    pub fn activity(rng: &mut impl Rng) -> Activity {
        let words: Vec<String> = (0..8).map(|_| word(skewed(rng, VOCABULARY))).collect();
        Activity {
            customer: skewed(rng, CUSTOMERS as usize) as u32,
            region: REGIONS[skewed(rng, REGIONS.len())].to_owned(),
            status: STATUSES[skewed(rng, STATUSES.len())].to_owned(),
            amount: (rng.random::<f64>() * 10_000.0 * 100.0).round() / 100.0,
            body: words.join(" "),
            note: (rng.random::<f64>() < 0.01).then(|| "call back".to_owned()),
        }
    }

    /// The `i`-th subscription of the mixed workload: mostly equality conjunctions over
    /// skewed values, then numeric ranges, text, IN lists, and (for `i` below 3) a
    /// catch-all that every entry must be checked against.
    pub fn subscription(i: u64, rng: &mut impl Rng) -> Query {
        let q = Query::of::<Activity>();
        match (i, i % 20) {
            (0, _) => q.exists("note"),
            (1, _) => q.not(Filter::eq("status", "Cancelled")),
            (2, _) => q.and(Filter::exists("note").or(Filter::eq("region", "oc"))),
            (_, 0..=10) => q
                .eq("customer", skewed(rng, CUSTOMERS as usize) as u64)
                .eq("status", STATUSES[skewed(rng, STATUSES.len())]),
            (_, 11..=12) => q
                .eq("region", REGIONS[rng.random_range(0..REGIONS.len())])
                .eq("customer", rng.random_range(0..CUSTOMERS) as u64),
            (_, 13..=16) => {
                let low = rng.random_range(0.0..10_000.0f64).floor();
                q.between("amount", low, low + rng.random_range(0.5..3.0f64))
                    .eq("status", "Paid")
            }
            (_, 17..=18) => q.text(
                "body",
                format!(
                    "{} {}",
                    word(rng.random_range(0..VOCABULARY)),
                    word(rng.random_range(0..VOCABULARY))
                ),
            ),
            _ => q.is_in(
                "customer",
                [
                    rng.random_range(0..CUSTOMERS) as u64,
                    rng.random_range(0..CUSTOMERS) as u64,
                ],
            ),
        }
    }
}
