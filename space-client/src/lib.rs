//! The crate workers use to reach the space: in-process, or on a `space-node`.
//!
//! A space holds typed *entries*. Workers **write** them, **read** a copy of one that matches
//! a query, **take** one (each entry goes to exactly one taker), **claim** one for a while
//! (a take that comes back if the worker dies), and **notify**: subscribe with a query and
//! be told of every later matching change. The same [`Space`] handle runs in-process and
//! against a node, so worker code does not change when the space moves into a server.
//!
//! # In-process
//!
//! [`Space::new`] gives a space shared by the threads or tasks of one program (no network);
//! [`Space::blocking`] its form for plain threads. An entry type is a serde struct declared
//! with [`entry!`] (a stable name, optionally a key field and indexed fields).
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use space_client::{Query, Space};
//! use std::time::Duration;
//!
//! #[derive(Serialize, Deserialize)]
//! struct Task { id: u64, kind: String }
//! space_client::entry!(Task, "Task", index = [kind]);
//!
//! let space = Space::new().blocking();
//! space.write(&Task { id: 1, kind: "resize".into() })?;
//! let resize = Query::of::<Task>().eq("kind", "resize");
//! let task: Option<Task> = space.take(&resize, Duration::from_secs(1))?;
//! assert_eq!(task.map(|t| t.id), Some(1));
//! # Ok::<(), space_client::SpaceError>(())
//! ```
//!
//! # On a node, async
//!
//! [`connect`] (or `Space::connect` with [`Connect`] in scope) reaches a node, or a
//! cluster through any of its members (`"host:7700,host2:7700"`); [`connect_blocking`] is
//! the form for plain threads; [`connect_with`] takes a [`ClientConfig`] (auth token,
//! timeouts, how notify events travel). Every operation has an async form on [`Space`]:
//!
//! ```no_run
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Serialize, Deserialize)]
//! # struct Task { id: u64, kind: String }
//! # space_client::entry!(Task, "Task", index = [kind]);
//! use space_client::{Query, connect};
//! use std::time::Duration;
//!
//! # async fn run() -> space_client::Result<()> {
//! let space = connect("127.0.0.1:7700").await?;
//! space.write(&Task { id: 2, kind: "resize".into() }).await?;
//! let task: Option<Task> = space
//!     .take(&Query::of::<Task>(), Duration::from_secs(5))
//!     .await?;
//! # let _ = task; Ok(()) }
//! ```
//!
//! A call whose future is dropped (a timeout around it, an aborted task) loses nothing: a
//! take or claim it made is given back.
//!
//! # Claims and worker pools
//!
//! A claim hides an entry for a lease; [`Space::commit`] removes it, [`Space::release`] or
//! the lease running out puts it back, and [`Claim::claims`] says how many times the entry
//! was claimed. [`Work::worker`] runs the whole loop (claim, renew while the handler runs,
//! commit, retry with backoff, dead-letter after N attempts, shut down cleanly):
//!
//! ```
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Serialize, Deserialize)]
//! # struct Task { id: u64, kind: String }
//! # space_client::entry!(Task, "Task", index = [kind]);
//! use space_client::{Lease, Query, Space};
//! use std::time::Duration;
//!
//! let space = Space::new().blocking();
//! space.write(&Task { id: 3, kind: "resize".into() })?;
//! if let Some(claim) = space.claim::<Task>(&Query::of::<Task>(), Lease::secs(30), Duration::ZERO)? {
//!     // ... do the work; if this worker died here, the task would come back in 30 s.
//!     space.commit(&claim)?;
//! }
//! # Ok::<(), space_client::SpaceError>(())
//! ```
//!
//! # Notify
//!
//! [`Space::notify`] returns a [`Subscription`]: a stream (async) or a receiver (`recv`,
//! `recv_timeout`) of [`Notification`]s, each an [`Event`] (node, entry type, key, kind,
//! sequence number), a `Gap` when events were dropped for a subscriber that fell behind,
//! or `Missed` when events may have been missed, how many not known (a node of a cluster
//! that lost the subscription, a shard's new leader that did not keep them all).
//!
//! ```
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Serialize, Deserialize)]
//! # struct Task { id: u64, kind: String }
//! # space_client::entry!(Task, "Task", index = [kind]);
//! use space_client::{EventKinds, Notification, Query, Space};
//! use std::time::Duration;
//!
//! let space = Space::new().blocking();
//! let watcher = space.notify(&Query::of::<Task>(), EventKinds::WRITTEN)?;
//! space.write(&Task { id: 4, kind: "resize".into() })?;
//! match watcher.recv_timeout(Duration::from_secs(1)) {
//!     Some(Notification::Event(e)) => assert_eq!(e.seq, 1),
//!     other => panic!("{other:?}"),
//! }
//! # Ok::<(), space_client::SpaceError>(())
//! ```
//!
//! # Queries
//!
//! Build them ([`Query::of`] then `eq ne lt le gt ge between is_in exists missing prefix
//! text`, and [`Filter`] trees with `and or not`), from a template ([`Query::like`]: `None`
//! fields are wildcards), or parse the text syntax ([`Query::parse`]):
//! `status:ReadyToShip AND amount:>100`, `amount:[10 TO 20]`, `status:(New, Held)`,
//! `name:Ab*`, `body:~"quick fox"`, `exists(note)`, `NOT status:Held`. Field names are
//! dotted paths into nested structs; a path reaching a list matches when any element
//! does. Numbers compare as numbers across integers and floats, strings exactly, a
//! missing field never equals anything. A query never misses silently: a field the entry
//! type lacks, or a literal of another kind than the field holds, is a
//! [`QueryError`] at once.
//!
//! # Errors
//!
//! Every fallible call returns [`SpaceError`]: bad input (a query, a document, a lease)
//! says what was wrong; `Down` means the call did not reach its node (nothing happened),
//! `Unreachable` and `TimedOut` that its outcome is unknown after retries;
//! [`SpaceError::is_unreachable`] tells those apart from refusals.

mod cluster;
mod connection;
mod revoke;
mod shard_feed;
mod subscriber;
pub mod worker;

pub use cluster::{
    Cluster, Connect, connect, connect_blocking, connect_blocking_with, connect_with, seeds,
    space_of,
};
pub use connection::{ClientConfig, Connection, Delivery};
pub use revoke::revoke_on_members;
pub use worker::{BlockingWorker, DeadLetter, Job, Shutdown, Work, Worker, WorkerReport};
/// The wire types (requests, answers, documents) for tools that speak to a node directly.
pub mod wire {
    pub use space_core::wire::*;
    pub use space_core::{ClaimTicket, ClaimedDocument, Document, Fields, Receipt, Stats, Value};
}
pub use space_core::{
    BlockingSpace, Claim, ClaimTicket, DocumentError, EngineConfig, Entry, EntryType, Event,
    EventKind, EventKinds, Fields, Filter, IntoKey, Key, Lease, MAX_LEASE, NodeId, Notification,
    PartPosition, Query, QueryError, Receipt, Result, Space, SpaceError, Stats, Subscription,
    SubscriptionPosition, TypeStats, Value, ValueKind, entry,
};

/// The README's examples, compiled and run as doc tests so that they stay true.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
