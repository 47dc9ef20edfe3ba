//! The space: entries, the engine that stores and matches them, and the in-process
//! [`Space`] handle.
//!
//! Workers coordinate through a shared space of typed entries: [`write`](Space::write) an
//! entry, [`read`](Space::read) a copy of one that matches a query, [`take`](Space::take)
//! one (each entry goes to exactly one taker), [`claim`](Space::claim) one for a while,
//! and [`notify`](Space::notify) to be told about every later matching change.
//!
//! The crate is layered:
//! - [`Entry`] and [`entry!`] declare Rust types as entries; [`Key`]s identify them;
//! - [`server::Engine`] is the whole space over documents (field maps), one lock per entry
//!   type; it is what the network node serves (the [`server`] module holds what a server
//!   needs beyond the typed handles, [`remote`] what a remote backend implements);
//! - [`Space`] (async) and [`BlockingSpace`] (threads) are the typed handles users hold.
//!
//! The rules every operation keeps (oldest first, longest waiter wins, zero timeout does
//! not wait, expired entries are never returned, each entry taken once) are those of
//! docs/ARCHITECTURE.md section 4; the engine module documents how they are kept.

#[cfg(test)]
mod determinism;
mod document;
mod durable;
mod engine;
mod entry;
mod error;
mod hash;
mod lease;
mod notify;
mod schema;
mod seq;
mod signal;
mod space;
mod state;
mod store;
mod timers;
mod wal;
pub mod wire;

pub use document::{ClaimTicket, ClaimedDocument, Document, Receipt};
pub use durable::DEFAULT_SNAPSHOT_AFTER_BYTES;
pub use engine::{EngineConfig, Holdings, RoomCheck, Stats, TypeStats};
pub use entry::{Entry, IntoKey, Key, NodeId};
pub use error::{Result, SpaceError};
pub use lease::{Clock, Lease, MAX_LEASE};
pub use notify::{
    DEFAULT_QUEUE_CAPACITY, Event, EventKind, EventKinds, Notification, PartPosition, Subscription,
    SubscriptionPosition,
};
pub use space::{BlockingSpace, Claim, Space};
pub use space_query::{
    DocumentError, EntryType, Fields, Filter, Query, QueryError, Value, ValueKind,
};

/// What a server hosting a space needs beyond the typed handles: the engine over documents
/// (its operations, the answers its state keeps for retried requests, and what a take
/// removed, to put back when its caller never got it). `space-node` is built on it.
pub mod server {
    pub use crate::engine::{
        Applied, Engine, HostedLog, LOGGED_ID_BIT, LogHost, LogImage, LogMark, LoggedView, Pending,
        Proposals, Registered, new_logged_id,
    };
    pub use crate::state::{ACKNOWLEDGE_FROM_BYTES, Answer, Taken};
    pub use crate::wal::LogId;
}

/// What a remote backend implements, so that [`Space`] and
/// [`Subscription`] work over a network (`space-client` does).
pub mod remote {
    pub use crate::notify::RemoteFeed;
    pub use crate::space::RemoteBackend;
}

/// Gives memory back once a map is mostly empty, so that a burst (of subscriptions, say)
/// does not pin its peak footprint forever.
pub(crate) fn shrink_if_sparse<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher>(
    map: &mut std::collections::HashMap<K, V, S>,
) {
    if map.capacity() > 64 && map.len() * 4 < map.capacity() {
        map.shrink_to_fit();
    }
}
