//! Shared pieces of the cross-crate tests and of `space-bench`: the entry types they use.

use serde::{Deserialize, Serialize};

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
