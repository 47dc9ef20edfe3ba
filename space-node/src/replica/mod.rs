//! Replicated shards: each shard of ranges is a Raft group (openraft) whose committed log
//! drives a replica [`Engine`](space_core::server::Engine) on every member
//! (docs/ARCHITECTURE.md section 9).
//!
//! This module is the one place that knows openraft's types: the rest of the node speaks
//! of [`ShardGroup`]s, [`Proposal`]s and [`Applied`] outcomes. Pieces:
//! - [`LogStore`] keeps a group's Raft log as one log of the node's shared write-ahead log
//!   ([`HostedLog`](space_core::server::HostedLog)): every group's appends share one
//!   `fdatasync`; the vote, the committed log id and the purge point are the log's
//!   metadata record.
//! - [`StateMachine`] applies committed commands to a replica engine through the engine's
//!   one apply, and makes and installs snapshots from the engine's state image.

mod log_store;
mod state_machine;

use serde::{Deserialize, Serialize};
pub use space_core::server::Applied;

pub use log_store::LogStore;
pub use state_machine::StateMachine;

/// A command for a shard's log: the bytes of a command the leader's engine decided (see
/// [`Engine::apply_logged`](space_core::server::Engine::apply_logged)).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl std::fmt::Display for Proposal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "command of {} bytes", self.0.len())
    }
}

openraft::declare_raft_types!(
    /// The Raft types of a shard group: proposals in, applied outcomes out; members are
    /// nodes by id, reached at the address their [`Member`] names.
    pub Shard:
        D = Proposal,
        R = Applied,
        NodeId = u64,
        Node = Member,
);

/// A member of a shard group as Raft knows it: the address its node serves peers on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// `host:port` of the node.
    pub addr: String,
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.addr)
    }
}

/// A Raft entry of a shard's log.
pub type Entry = openraft::alias::EntryOf<Shard>;
/// A Raft log id (term, leader, index).
pub type LogId = openraft::alias::LogIdOf<Shard>;
/// A Raft vote.
pub type Vote = openraft::alias::VoteOf<Shard>;
/// A Raft node running one shard group on this node.
pub type ShardGroup = openraft::Raft<Shard, StateMachine>;

/// An `io::Error` for what a store finds wrong (openraft's storage traits speak
/// `io::Error`).
fn io_error(what: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(what.to_string())
}

#[cfg(test)]
mod tests;
