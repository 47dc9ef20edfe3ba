//! The crate workers use to reach the space.
//!
//! Today it offers the in-process space: a [`Space`] shared by the threads or tasks of one
//! program. The network client (`Space::connect`) will return the very same handle type,
//! so worker code written against this crate does not change when the space moves into a
//! `space-node` server.
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

pub use space_core::{
    BlockingSpace, Claim, ClaimTicket, Entry, EntryType, Event, EventKind, EventKinds, Filter,
    IntoKey, Key, Lease, NodeId, Notification, Query, QueryError, Receipt, Result, Space,
    SpaceError, Stats, Subscription, entry,
};

/// The README's examples, compiled and run as doc tests so that they stay true.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
