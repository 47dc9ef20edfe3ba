//! The crate workers use to reach the space: in-process, or on a `space-node`.
//!
//! [`Space::new`] gives an in-process space shared by the threads or tasks of one program;
//! [`connect`] (or `Space::connect` with [`Connect`] in scope) gives the very same handle
//! type on a node, so worker code does not change when the space moves into a server.
//! [`connect_blocking`] is the form for plain threads.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use space_client::{Query, Space};
//! use std::time::Duration;
//!
//! #[derive(Serialize, Deserialize)]
//! struct Task { id: u64 }
//! space_client::entry!(Task, "Task");
//!
//! let space = Space::new().blocking();
//! space.write(&Task { id: 1 })?;
//! let task: Option<Task> = space.take(&Query::of::<Task>(), Duration::from_secs(1))?;
//! assert_eq!(task.map(|t| t.id), Some(1));
//! # Ok::<(), space_client::SpaceError>(())
//! ```

mod cluster;
mod connection;
mod revoke;
mod subscriber;
pub mod worker;

pub use cluster::{
    Cluster, Connect, connect, connect_blocking, connect_blocking_with, connect_with, space_of,
};
pub use connection::{ClientConfig, Connection, Delivery};
pub use worker::{BlockingWorker, DeadLetter, Job, Shutdown, Work, Worker, WorkerReport};
/// The wire types (requests, answers, documents) for tools that speak to a node directly.
pub mod wire {
    pub use space_core::wire::*;
    pub use space_core::{ClaimTicket, ClaimedDocument, Document, Fields, Receipt, Stats, Value};
}
pub use space_core::{
    BlockingSpace, Claim, ClaimTicket, DocumentError, EngineConfig, Entry, EntryType, Event,
    EventKind, EventKinds, Fields, Filter, IntoKey, Key, Lease, MAX_LEASE, NodeId, Notification,
    Query, QueryError, Receipt, Result, Space, SpaceError, Stats, Subscription, Value, ValueKind,
    entry,
};

/// The README's examples, compiled and run as doc tests so that they stay true.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
